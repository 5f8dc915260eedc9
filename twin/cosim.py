"""Co-simulation of a fleet whose router reads the engines' state (least-loaded,
adapter-affinity, placement with an adapter on several GPUs): the engines advance
together in time and take requests as they are routed.

The engine interface the driver needs of one GPU (`SteppedEngine`):

    add(request, arrival_s)   request `request` (its index in the fleet's trace, which is
                              in arrival order) joins this engine's waiting queue at
                              `arrival_s`; requests are added in arrival order
    run_until(t)              execute every step that starts before `t` (strictly: a step
                              that starts at `t` must still see a request arriving at `t`)
    finished_by(t) -> int     requests of this engine whose last token came at or before t
    holds(adapter) -> bool    the adapter sits in one of the engine's GPU slots now
    finish() -> part          run to the window's end; (results, summary, steps) as
                              `twin.fleet.run_gpu` returns them, rows in `add` order

The driver, for each request in arrival order at time t: advance the engines it may be
sent to until t, read `outstanding(r) = routed(r) - finished_by(r, t)` and `holds`, route,
add. The state at t depends only on steps that started before t, and those only on
requests that arrived before t, so each decision sees exactly what a router in front of
real servers would see, and the result does not depend on how far any engine ran ahead.

The engine side is `twin.engine.SteppedEngine`: the scheduler's waiting queue takes
arrivals during a run (`Scheduler.add_request`, room per adapter queue fixed by the
requests that may be routed there) and the loop stops before a step that would start at
or after a given time and resumes there (`_Loop.run(until=...)`); an engine sent a set of
requests gives the results `simulate` gives on that set, bit for bit (tested).

Only engines the request may go to are advanced to its arrival: a GPU that shares no
adapter with the request's candidates runs on freely (fast-forward included) until a
request of its own needs it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import polars as pl

from twin.fleet_plan import ResolvedFleet
from twin.profile import Profile
from twin.routing import Router


class SteppedEngine(Protocol):
    def add(self, request: int, arrival_s: float) -> None: ...

    def run_until(self, t: float) -> None: ...

    def finished_by(self, t: float) -> int: ...

    def holds(self, adapter: str | None) -> bool: ...

    def finish(self) -> tuple[Any, dict[str, Any], Any]: ...


class _State:
    """`twin.routing.ReplicaState` over the engines at the current routing instant."""

    def __init__(self, engines: list[SteppedEngine], routed: list[int]):
        self.engines = engines
        self.routed = routed
        self.t = 0.0

    def outstanding(self, replica: int) -> int:
        return self.routed[replica] - self.engines[replica].finished_by(self.t)

    def holds(self, replica: int, adapter: str | None) -> bool:
        return self.engines[replica].holds(adapter)


def cosimulate(
    trace: pl.DataFrame, codes: np.ndarray, names: list[str | None], router: Router, profile: Profile,
    fleet: ResolvedFleet, context: dict[str, Any], window_s: float | None, record_steps: bool,
) -> tuple[np.ndarray, list[Any]]:
    """Route and simulate together; returns (replica per request, per-GPU parts)."""
    import os
    import resource
    import time

    from twin.engine import SteppedEngine

    t0 = time.perf_counter()
    g_count = len(fleet.configs)
    may = np.zeros((g_count, len(names)), dtype=bool)  # may[g, code]: code's requests may go to g
    for k, a in enumerate(names):
        may[router.candidates(a), k] = True
    engines: list[SteppedEngine] = [
        SteppedEngine(trace, np.flatnonzero(may[g][codes]), profile, c, context, window_s, record_steps)
        for g, c in enumerate(fleet.configs)
    ]
    n = trace.height
    arrival = trace.get_column("arrival_s").cast(pl.Float64).to_numpy()
    replica = np.empty(n, dtype=np.int64)
    routed = [0] * len(engines)
    state = _State(engines, routed)
    window = np.inf if window_s is None else float(window_s)
    for i in range(n):
        t = float(arrival[i])
        adapter = names[int(codes[i])]
        cands = router.candidates(adapter)
        if t < window and len(cands) > 1:
            state.t = t
            for r in cands:
                engines[r].run_until(t)
        r = router.route(adapter, state) if len(cands) > 1 else cands[0]
        replica[i] = r
        routed[r] += 1
        engines[r].add(i, t)
    parts: list[Any] = []
    for g, e in enumerate(engines):
        if not routed[g]:
            parts.append(None)
            continue
        res = e.finish()
        summary = dict(res.summary, wall_s=time.perf_counter() - t0, pid=os.getpid(),
                       peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        parts.append((res.results, summary, res.steps))
    return replica, parts
