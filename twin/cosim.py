"""Co-simulation of a fleet whose router reads the engines' state (least-loaded,
adapter-affinity, placement with an adapter on several GPUs): the engines advance
together in time and take requests as they are routed.

The engine interface the driver needs of one GPU (`Engine`):

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

The engine side is `SteppedEngine` (below, on `twin.engine`'s loop and scheduler): the scheduler's waiting queue takes
arrivals during a run (`Scheduler.add_request`, room per adapter queue fixed by the
requests that may be routed there) and the loop stops before a step that would start at
or after a given time and resumes there (`_Loop.run(until=...)`); an engine sent a set of
requests gives the results `simulate` gives on that set, bit for bit (tested, with async
scheduling and prefix caching), when every adapter it may be sent reaches it: its adapter
table is its candidates' (fixed before routing), and the scheduler's stand-in for vLLM's
set order of adapters (`twin.scheduler.set_order_key`) is keyed by that table's index, so
an engine that never receives one of its candidate adapters orders the others by another
(equally random) draw than `simulate` on its requests would.

Only engines the request may go to are advanced to its arrival: a GPU that shares no
adapter with the request's candidates runs on freely (fast-forward included) until a
request of its own needs it.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any, Protocol

import numpy as np
import polars as pl

from tracekit.schema import TracekitError
from twin.config import ServingConfig, SimResult
from twin.engine import _finish, _Loop, _registered_adapters, _resolve_adapters
from twin.fleet_plan import ResolvedFleet
from twin.kv_cache import PrefixKeys, prefix_keys
from twin.profile import Profile, load_profile
from twin.routing import Router
from twin.scheduler import BASE, DEFAULT_CPU_MISS_FACTOR, Scheduler


class Engine(Protocol):
    """What the driver needs of one GPU (see the module doc)."""

    def add(self, request: int, arrival_s: float) -> None: ...

    def run_until(self, t: float) -> None: ...

    def finished_by(self, t: float) -> int: ...

    def holds(self, adapter: str | None) -> bool: ...

    def finish(self) -> SimResult: ...


class _RoutedPrefix:
    """The prefix units of an engine's requests in the order they were added: request r
    is row `rows[r]` of the candidates' `PrefixKeys`."""

    def __init__(self, keys: PrefixKeys, rows: list[int]):
        self.keys = keys
        self.rows = rows

    def of(self, r: int) -> tuple[list[int], list[int]]:
        return self.keys.of(self.rows[r])


class SteppedEngine:
    """One GPU of a coupled fleet (`twin.cosim`): requests are added as the router sends
    them, in arrival order, and the engine is advanced to each routing instant. The same
    scheduler and loop as `simulate`, so an engine sent a set of requests gives the same
    results, bit for bit, as `simulate` on that set.

    `trace`: the fleet's trace in arrival order; `candidates`: its rows that may be sent
    here, ascending (they fix the adapter table, the waiting queues' room and the prefix
    units)."""

    def __init__(self, trace: pl.DataFrame, candidates: np.ndarray, profile: Any, config: ServingConfig,
                 context: dict[str, Any] | None, window_s: float | None, record_steps: bool = False,
                 fast_forward: bool = True):
        self.prof = load_profile(profile)
        self.config = config.check()
        self.ctx_in = dict(context or {})
        self.window_s = window_s
        self.record_steps = record_steps
        self.fast_forward = fast_forward
        self.trace = trace
        self.candidates = candidates
        sub = trace[candidates]
        codes, self.names, ranks = _resolve_adapters(sub.get_column("adapter").to_arrow(), self.ctx_in, config)
        self.code_of = {n: i for i, n in enumerate(self.names)}
        # Python lists: the driver reads one request at a time (a numpy scalar costs more).
        self.prompt_all = trace.get_column("prompt_tokens").cast(pl.Int64).to_list()
        self.output_all = trace.get_column("output_tokens").cast(pl.Int64).to_list()
        self.adapter_all = trace.get_column("adapter").to_list()
        self.kv_tokens = int(self.prof.kv_capacity_tokens(config))
        self.num_blocks = self.kv_tokens // config.block_size - 1
        if self.num_blocks <= 0:
            raise TracekitError("an engine of the fleet has no room for the KV cache")
        self.max_len = min(config.max_model_len or 1 << 62, self.num_blocks * config.block_size + 1)
        n_q = len(self.names) + 1
        capacity = np.bincount(np.where(codes < 0, n_q - 1, codes), minlength=n_q)
        size = max(len(candidates), 1)
        # Arrival times of the requests added so far; the rest stay inf (never arrived).
        self.arrival = np.full(size, np.inf)
        self.valid = np.ones(size, dtype=bool)
        self.rows: list[int] = []  # fleet trace rows, in the order added
        prefix = None
        if config.enable_prefix_caching:
            keys = prefix_keys(sub, self.ctx_in, config.block_size,
                               lambda: sub.get_column("adapter").to_list() if config.enable_lora else [None] * sub.height)
            self._cand_pos: list[int] = []
            prefix = None if keys is None else _RoutedPrefix(keys, self._cand_pos)
        cpu_factor = float(self.prof.data.get("adapter_load", {}).get("cpu_miss_factor", DEFAULT_CPU_MISS_FACTOR))
        self.sched = Scheduler(
            prompt=[], output=[], arrival=self.arrival, adapter_idx=np.zeros(0, dtype=np.int64),
            valid=np.zeros(0, dtype=bool), adapter_rank=ranks,
            adapter_load_s=[self.prof.adapter_load_s(r, config.max_lora_rank) for r in ranks],
            cpu_miss_factor=cpu_factor, max_loras=config.max_loras, max_cpu_loras=config.cpu_loras,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size, num_blocks=self.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            scheduler_reserve_full_isl=config.scheduler_reserve_full_isl,
            async_scheduling=config.async_scheduling, prefix=prefix,  # type: ignore[arg-type]
            waiting_capacity=capacity,
        )  # fmt: skip
        self.sched.slots.preload(_registered_adapters(self.ctx_in, self.names))
        self.window = math.inf if window_s is None else float(window_s)
        self.loop = _Loop(self.sched, self.prof, config, self.arrival, self.valid[:0], self.window, record_steps, False)
        self.loop.num_requests = 0  # requests added so far
        # Valid requests among the first k (the loop's count of waiting ones), kept for
        # every k up to the room: an invalid one lowers the counts after it.
        self._valid_prefix = np.arange(size + 1, dtype=np.int64)
        self.finish_times: list[float] = []
        self.loop_s = 0.0

    def add(self, request: int, arrival_s: float) -> None:
        """Row `request` of the fleet's trace, arriving at `arrival_s` (in arrival order)."""
        p, o = self.prompt_all[request], self.output_all[request]
        a = self.adapter_all[request]
        code = BASE if a is None or not self.config.enable_lora else self.code_of[a]
        ok = p + o <= self.max_len
        r = self.sched.add_request(p, o, code, ok)
        self.arrival[r] = arrival_s
        self.rows.append(request)
        if self.config.enable_prefix_caching:
            self._cand_pos.append(int(np.searchsorted(self.candidates, request)))
        loop = self.loop
        loop.num_requests = r + 1
        if not ok:
            self.valid[r] = False
            self._valid_prefix[r + 1 :] -= 1
            loop.all_valid = False
            loop.valid_prefix = self._valid_prefix

    def run_until(self, t: float) -> None:
        """Execute every step that starts before `t`."""
        resume = self.loop._resume
        if resume is not None and resume[0] >= t:
            return  # the next step starts at or after `t`: the loop would run none (most routing instants)
        t0 = time.perf_counter()
        self.loop.run(self.fast_forward, until=t)
        self.loop_s += time.perf_counter() - t0
        log = self.sched.finish_log
        assert log is not None
        ends = self.loop.step_end
        for s in log[len(self.finish_times):]:
            self.finish_times.append(ends[s])

    def finished_by(self, t: float) -> int:
        return bisect.bisect_right(self.finish_times, t)

    def holds(self, adapter: str | None) -> bool:
        if adapter is None:
            return True
        code = self.code_of.get(adapter)
        return code is not None and code in self.sched.slots.gpu

    def finish(self) -> SimResult:
        """Run to the window's end (or until every request finished); the results of the
        requests it was sent, in the order they were added."""
        self.run_until(math.inf)
        k = len(self.rows)
        table = self.trace[self.rows].to_arrow()
        valid = self.valid[:k]
        return _finish(table, self.arrival[:k], self.sched, self.loop, self.prof, self.config, self.ctx_in,
                       self.window_s, valid, ~valid, False, self.window, self.max_len, self.kv_tokens, self.num_blocks,
                       "", self.loop_s, self.names, self.record_steps)


class _State:
    """`twin.routing.ReplicaState` over the engines at the current routing instant."""

    def __init__(self, engines: list[Engine], routed: list[int]):
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
    fast_forward: bool = True,
) -> tuple[np.ndarray, list[Any]]:
    """Route and simulate together; returns (replica per request, per-GPU parts)."""
    import os
    import resource

    t0 = time.perf_counter()
    g_count = len(fleet.configs)
    may = np.zeros((g_count, len(names)), dtype=bool)  # may[g, code]: code's requests may go to g
    for k, a in enumerate(names):
        may[router.candidates(a), k] = True
    engines: list[Engine] = [
        SteppedEngine(trace, np.flatnonzero(may[g][codes]), profile, c, context, window_s, record_steps, fast_forward)
        for g, c in enumerate(fleet.configs)
    ]
    n = trace.height
    arrival = trace.get_column("arrival_s").cast(pl.Float64).to_list()
    replica_of = [0] * n
    routed = [0] * len(engines)
    state = _State(engines, routed)
    window = math.inf if window_s is None else float(window_s)
    # Per adapter code: its candidate GPUs (a router's candidates do not change) and,
    # where there is one, the GPU itself. Python lists: this loop runs once per request.
    cands_of = [router.candidates(a) for a in names]
    only_of = [c[0] if len(c) == 1 else -1 for c in cands_of]
    code_list = codes.tolist()
    for i in range(n):
        t = arrival[i]
        code = code_list[i]
        r = only_of[code]
        if r < 0:
            cands = cands_of[code]
            if t < window:
                state.t = t
                for g in cands:
                    engines[g].run_until(t)
            r = router.route(names[code], state)
        replica_of[i] = r
        routed[r] += 1
        engines[r].add(i, t)
    replica = np.asarray(replica_of, dtype=np.int64)
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
