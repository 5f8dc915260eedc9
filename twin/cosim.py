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

The twin's engine (`twin.engine`) takes a whole trace up front today; the engine side of
this interface (a waiting queue that takes arrivals during a run, and a loop that stops
at a given time and resumes) comes with the scheduler's restructure (issue 11). Until
then a coupled fleet is refused with one clear line.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import polars as pl

from tracekit.schema import TracekitError
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


def make_engine(
    trace: pl.DataFrame, profile: Profile, config: Any, context: dict[str, Any], window_s: float | None,
    record_steps: bool,
) -> SteppedEngine:
    raise TracekitError(
        "this router over this plan couples the GPUs (it reads the engines' state, or an adapter is on several GPUs); "
        "the coupled fleet simulation needs the twin engine to take arrivals during a run, which it does not yet: "
        "use --router round-robin, or a placement with each adapter on one GPU"
    )


def cosimulate(
    trace: pl.DataFrame, codes: np.ndarray, names: list[str | None], router: Router, profile: Profile,
    fleet: ResolvedFleet, context: dict[str, Any], window_s: float | None, record_steps: bool,
) -> tuple[np.ndarray, list[Any]]:
    """Route and simulate together; returns (replica per request, per-GPU parts)."""
    engines = [make_engine(trace, profile, c, context, window_s, record_steps) for c in fleet.configs]
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
    return replica, [e.finish() if routed[g] else None for g, e in enumerate(engines)]
