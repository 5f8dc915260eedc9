"""The open-loop runner on its own (no HTTP): schedule, caps and cuts as properties."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.runner import OK, UNFINISHED, Recorder, RunOptions, run_open_loop


def _run(arrivals: np.ndarray, service_s: list[float], opts: RunOptions) -> tuple[Recorder, list[int], int]:
    order: list[int] = []
    peak = [0, 0]  # current, max in flight

    async def send(i: int, rec: Recorder) -> None:
        rec.dispatch[i] = time.perf_counter() - rec.t0
        order.append(i)
        peak[0] += 1
        peak[1] = max(peak[1], peak[0])
        try:
            await asyncio.sleep(service_s[i])
            rec.end[i] = time.perf_counter() - rec.t0
            rec.status[i] = OK
            rec.completed += 1
        finally:
            peak[0] -= 1

    out = asyncio.run(run_open_loop(arrivals, send, opts))
    return out.recorder, order, peak[1]


@settings(max_examples=12, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 0.02), min_size=1, max_size=25),
    service=st.floats(0.0, 0.03),
    cap=st.one_of(st.none(), st.integers(1, 4)),
)
def test_every_request_sent_once_in_order_never_early(gaps: list[float], service: float, cap: int | None) -> None:
    arrivals = np.cumsum(gaps)
    rec, order, peak = _run(arrivals, [service] * len(gaps), RunOptions(max_concurrency=cap, progress=False, handle_signals=False))
    assert order == list(range(len(gaps)))
    assert (rec.status == OK).all()
    # Never sent before its time (perf_counter is monotonic; allow float rounding).
    assert (rec.dispatch - arrivals).min() >= -1e-6
    if cap is not None:
        assert peak <= cap
    else:
        # Open loop: lag does not accumulate with the service time. A closed loop would
        # lag by up to 25 x 30 ms here; the bound is loose because a shared CI machine
        # can pause the process for ~0.1 s.
        assert np.median(rec.dispatch - arrivals) < 0.2


@settings(max_examples=8, deadline=None)
@given(cut=st.floats(0.02, 0.15), n=st.integers(2, 20))
def test_cut_marks_the_rest_unfinished(cut: float, n: int) -> None:
    arrivals = np.linspace(0.0, 0.2, n)
    rec, order, _ = _run(arrivals, [0.05] * n, RunOptions(cut_s=cut, progress=False, handle_signals=False))
    sent = np.zeros(n, bool)
    sent[order] = True
    assert not sent[arrivals > cut + 0.005].any()  # nothing sent after the cut
    # Whatever had not finished by the cut is unfinished; finished ones ended before it.
    fin = rec.status == OK
    assert (rec.end[fin] <= cut + 0.01).all()
    assert (rec.status[~fin] == UNFINISHED).all()
