"""The simulation loop: drive `twin.scheduler.Scheduler` step by step through time.

One engine step = schedule (vLLM's `Scheduler.schedule`), execute (duration from the
profile's step-time model plus adapter loads), update (`update_from_output`: tokens
sampled, requests finished and freed). Requests whose arrival time is at or before a
step's start are in `waiting` for that step; an idle engine jumps to the next arrival.

Fast-forward: a stretch of steps where only decoding happens (no request in prefill,
no admission possible, no finish, enough free KV blocks) is advanced in one numpy
computation: step times vectorised over the stretch, start times by a cumulative sum.
The stretch ends before the next finish, before the step whose KV blocks would not fit,
before the first step that starts after an arrival that could be admitted, and at the
window's end. Turning it off (`fast_forward=False`) gives the plain step loop, which
must produce bit-identical results (tests check it).

Request intake: a profile's `request_intake.s_per_request` (the engine core's work to
take in a new request, admitted or not) is added to the first step that starts after
each arrival; inside a stretch, where step starts and arrivals depend on each other, it
is solved by fixed-point iteration (`_Loop._with_intake`).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from tracekit.metrics import summarize
from tracekit.schema import TracekitError, adapter_ranks, conform
from twin.config import ServingConfig, SimResult
from twin.profile import Profile, load_profile
from twin.scheduler import BASE, DEFAULT_CPU_MISS_FACTOR, Scheduler, cdiv

MAX_STRETCH = 8192  # steps per fast-forward computation (bounds the arrays' size)
MIN_STRETCH = 12  # below this the plain steps (~10 us each) beat numpy's fixed cost


def _step_time_scalar(profile: Profile, config: ServingConfig) -> Callable[..., float]:
    """A per-step scalar step-time function, bit-identical to `profile.step_time`.

    The profile's vectorised function costs ~20 us per call on length-1 arrays; a step
    loop needs ~1 us. The profile's own scalar form is used after *verifying* it gives
    the same bits as the vectorised one on random batches (the fast-forward uses the
    vectorised one, and both paths must agree bit for bit); else the vectorised one is
    called step by step."""
    kw = {"max_lora_rank": config.max_lora_rank, "max_loras": config.max_loras}

    def generic(p: float, d: float, x: float, a: float, r: float, n: float = 0.0) -> float:
        args = (np.array([p]), np.array([d]), np.array([x]), np.array([a]), np.array([r]))
        if n:  # prefill_reqs: optional, so a profile class without it still works
            return float(profile.step_time(*args, prefill_reqs=np.array([n]), **kw)[0])
        return float(profile.step_time(*args, **kw)[0])

    make = getattr(profile, "step_time_scalar", None)
    if make is None:
        return generic
    scalar = make(**kw)
    rng = np.random.default_rng(0)
    cols = [rng.integers(0, hi, 64).astype(np.float64) for hi in (4096, 2048, 400_000, 64, 2048)]
    cols[0][:8] = 0.0
    cols[3][8:16] = 0.0
    ref = profile.step_time(*cols, **kw)
    mine = np.array([scalar(*(float(col[i]) for col in cols)) for i in range(64)])
    try:  # with prefill_reqs too (profiles whose step model takes it)
        nreq = rng.integers(0, 64, 64).astype(np.float64)
        ref_n = profile.step_time(*cols, prefill_reqs=nreq, **kw)
        mine_n = np.array([scalar(*(float(col[i]) for col in cols), float(nreq[i])) for i in range(64)])
        ref, mine = np.concatenate([ref, ref_n]), np.concatenate([mine, mine_n])
    except TypeError:  # a step model without prefill_reqs: accept and ignore it
        five = scalar

        def scalar(p: float, d: float, x: float, a: float, r: float, n: float = 0.0) -> float:
            return five(p, d, x, a, r)

        def generic(p: float, d: float, x: float, a: float, r: float, n: float = 0.0) -> float:
            return float(profile.step_time(np.array([p]), np.array([d]), np.array([x]), np.array([a]), np.array([r]), **kw)[0])
    return scalar if np.array_equal(ref, mine) else generic


def _resolve_adapters(
    trace: pl.DataFrame, context: dict[str, Any], config: ServingConfig
) -> tuple[np.ndarray, list[str], list[int]]:
    """Adapter index per request (BASE for the base model), names, ranks (sorted names:
    the index does not depend on the trace's row order)."""
    col = trace.get_column("adapter")
    if not config.enable_lora:
        return np.full(trace.height, BASE, dtype=np.int64), [], []
    names = col.drop_nulls().unique().sort().to_list()
    # An Enum over the sorted names: codes follow that order (fast on millions of rows).
    idx = col.cast(pl.Enum(names)).to_physical().cast(pl.Int64).fill_null(BASE).to_numpy()
    ranks_ctx = adapter_ranks(context)
    ranks = []
    for name in names:
        rank = ranks_ctx.get(name, config.max_lora_rank)
        if rank > config.max_lora_rank:
            raise TracekitError(
                f"adapter {name!r} has rank {rank} > --max-lora-rank {config.max_lora_rank} "
                "(vLLM refuses to load it)"
            )
        ranks.append(int(rank))
    return idx, names, ranks


class _Steps:
    """Step rows as growing columns (lists, extended by arrays for stretches)."""

    COLS = (
        "t_s", "duration_s", "num_running", "num_waiting", "prefill_reqs", "prefill_tokens",
        "decode_reqs", "decode_tokens", "kv_usage", "num_preempted", "adapter_loads",
        "context_tokens", "adapter_load_s", "adapters_id",
    )  # fmt: skip

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {c: [] for c in self.COLS}
        self.loaded: dict[int, list[int]] = {}  # step -> adapters loaded
        self.adapter_sets: list[tuple[int, ...]] = []
        self._set_key: tuple[int, int] | None = None

    def adapters_id(self, version: int, current: Any) -> int:
        if self._set_key != version:
            self.adapter_sets.append(tuple(sorted(current)))
            self._set_key = version
        return len(self.adapter_sets) - 1

    def one_off_set(self, adapters: tuple[int, ...]) -> int:
        self.adapter_sets.append(adapters)
        self._set_key = None
        return len(self.adapter_sets) - 1

    def table(self, names: list[str]) -> pa.Table:
        c = self.cols
        n = len(c["t_s"])
        ids = np.asarray(c["adapters_id"], dtype=np.int64)
        lens = np.array([len(s) for s in self.adapter_sets], dtype=np.int64)
        flat_sets = np.array([a for s in self.adapter_sets for a in s], dtype=np.int64)
        set_start = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else np.zeros(0, np.int64)
        step_lens = lens[ids] if n else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(step_lens)]).astype(np.int32)
        # Gather each step's set: start of its set + position within it.
        pos = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1].astype(np.int64), step_lens)
        flat = flat_sets[np.repeat(set_start[ids], step_lens) + pos] if n else np.zeros(0, np.int64)
        name_arr = pa.array(names, type=pa.string())
        active = pa.ListArray.from_arrays(pa.array(offsets), name_arr.take(pa.array(flat)))
        loaded_lists = [[names[a] for a in self.loaded[i]] if i in self.loaded else [] for i in range(n)] if self.loaded else [[]] * n
        i32 = np.int32
        return pa.table(
            {
                "step": pa.array(np.arange(n, dtype=np.int64)),
                "t_s": pa.array(np.asarray(c["t_s"], dtype=np.float64)),
                "duration_s": pa.array(np.asarray(c["duration_s"], dtype=np.float64)),
                "num_running": pa.array(np.asarray(c["num_running"], dtype=i32)),
                "num_waiting": pa.array(np.asarray(c["num_waiting"], dtype=i32)),
                "prefill_reqs": pa.array(np.asarray(c["prefill_reqs"], dtype=i32)),
                "prefill_tokens": pa.array(np.asarray(c["prefill_tokens"], dtype=i32)),
                "decode_reqs": pa.array(np.asarray(c["decode_reqs"], dtype=i32)),
                "decode_tokens": pa.array(np.asarray(c["decode_tokens"], dtype=i32)),
                "active_adapters": active,
                "kv_usage": pa.array(np.asarray(c["kv_usage"], dtype=np.float64)),
                "num_preempted": pa.array(np.asarray(c["num_preempted"], dtype=i32)),
                "adapter_loads": pa.array(np.asarray(c["adapter_loads"], dtype=i32)),
                "context_tokens": pa.array(np.asarray(c["context_tokens"], dtype=np.int64)),
                "adapter_load_s": pa.array(np.asarray(c["adapter_load_s"], dtype=np.float64)),
                "loaded_adapters": pa.array(loaded_lists, type=pa.list_(pa.string())),
            }
        )


def simulate(
    trace: pl.DataFrame,
    profile: Any,
    config: ServingConfig,
    *,
    trace_context: dict[str, Any] | None = None,
    window_s: float | None = None,
    record_steps: bool = False,
    fast_forward: bool = True,
    check_invariants: bool = False,
) -> SimResult:
    """Simulate vLLM serving `trace` under `config`; see `twin.api.simulate`.

    `fast_forward=False` runs the plain step loop (the speed baseline; same results).
    `check_invariants=True` checks KV blocks, batch limits and bookkeeping after every
    step (slow; for tests)."""
    prof = load_profile(profile)
    ctx_in = dict(trace_context or {})
    config.check()
    if window_s is None and ctx_in.get("window_s"):
        window_s = float(ctx_in["window_s"])
    if window_s is not None and not window_s > 0:
        raise TracekitError(f"--window must be positive, got {window_s}")
    window = math.inf if window_s is None else float(window_s)

    trace = trace.sort("arrival_s", maintain_order=True)
    arrival = trace.get_column("arrival_s").cast(pl.Float64).to_numpy()
    prompt_np = trace.get_column("prompt_tokens").cast(pl.Int64).to_numpy()
    output_np = trace.get_column("output_tokens").cast(pl.Int64).to_numpy()
    adapter_idx, names, ranks = _resolve_adapters(trace, ctx_in, config)

    kv_tokens = int(prof.kv_capacity_tokens(config))
    oom_reason = ""
    if kv_tokens <= 0:
        est = getattr(prof, "kv_estimate", None)
        oom_reason = (getattr(est(config), "reason", "") if est else "") or "no room for the KV cache"
    # vLLM's BlockPool keeps one block aside (the null block): the rest hold requests.
    num_blocks = kv_tokens // config.block_size - 1
    oom = num_blocks <= 0
    # vLLM rejects a request longer than max_model_len; one that can never fit in the
    # KV cache would block the queue forever, so it is rejected too.
    max_len = min(config.max_model_len or 1 << 62, num_blocks * config.block_size + 1)
    too_long = (prompt_np + output_np) > max_len
    valid = ~too_long & ~oom

    cpu_factor = float(prof.data.get("adapter_load", {}).get("cpu_miss_factor", DEFAULT_CPU_MISS_FACTOR))
    sched = Scheduler(
        prompt=prompt_np.tolist(),
        output=output_np.tolist(),
        adapter_idx=adapter_idx,
        valid=valid,
        adapter_rank=ranks,
        adapter_load_s=[prof.adapter_load_s(r, config.max_lora_rank) for r in ranks],
        cpu_miss_factor=cpu_factor,
        max_loras=config.max_loras,
        max_cpu_loras=config.cpu_loras,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        block_size=config.block_size,
        num_blocks=max(num_blocks, 0),
    )
    loop = _Loop(sched, prof, config, arrival, valid, window, record_steps, check_invariants)
    loop_started = time.perf_counter()
    if not oom:
        loop.run(fast_forward)
    loop_s = time.perf_counter() - loop_started

    return _finish(trace, sched, loop, prof, config, ctx_in, window_s, valid, too_long, oom, window, max_len,
                   kv_tokens, num_blocks, oom_reason, loop_s, names, record_steps)


def _finish(
    trace: pl.DataFrame, sched: Scheduler, loop: _Loop, prof: Profile, config: ServingConfig, ctx_in: dict[str, Any],
    window_s: float | None, valid: np.ndarray, too_long: np.ndarray, oom: bool, window: float, max_len: int,
    kv_tokens: int, num_blocks: int, oom_reason: str, loop_s: float, names: list[str], record_steps: bool,
) -> SimResult:
    """Results, summary and steps of a finished run (a whole-trace one, or one engine of
    a coupled fleet)."""
    results = _results(trace, sched, loop, valid, too_long, oom, window, max_len)
    ctx = dict(ctx_in)
    ctx.update(
        target="twin",
        profile=prof.name,
        serving_config=config.to_dict(),
        window_s=None if window_s is None else float(window_s),
    )
    # The metrics read no identifiers: leave the largest string columns out of the copy.
    skip = {"request_id", "target", "error", "prompt_token_ids", "tenant", "session_id"}
    results_df: pl.DataFrame = pl.from_arrow(results.select([c for c in results.column_names if c not in skip]))  # type: ignore[assignment]
    summary = summarize(results_df, ctx)
    summary.update(
        steps=loop.step,
        preemptions=sched.total_preemptions,
        adapter_loads=sched.total_adapter_loads,
        adapter_load_s=sched.total_adapter_load_s,
        kv_capacity_tokens=max(kv_tokens, 0),
        num_blocks=max(num_blocks, 0),
        oom=oom,
        oom_reason=oom_reason if oom else None,
        rejected=int(too_long.sum()) if not oom else 0,
        fast_forward_steps=loop.ff_steps,
        simulated_s=loop.t_end,
        engine_loop_s=loop_s,  # wall time of the step loop alone (speed benchmarks)
    )
    steps = loop.steps.table(names) if record_steps else None
    return SimResult(results=results, steps=steps, summary=summary, context=ctx)


class _Loop:
    """The engine loop over time (state kept on the instance for the fast-forward)."""

    def __init__(
        self,
        sched: Scheduler,
        profile: Profile,
        config: ServingConfig,
        arrival: np.ndarray,
        valid: np.ndarray,
        window: float,
        record_steps: bool,
        check_invariants: bool,
    ):
        self.sched = sched
        self.profile = profile
        self.config = config
        self.arrival = arrival
        self.num_requests = len(arrival)
        # Valid requests arrived among the first k: for num_waiting.
        self.all_valid = bool(valid.all())
        self.valid_prefix = None if self.all_valid else np.concatenate([[0], np.cumsum(valid)]).astype(np.int64)
        self.window = window
        self.record = record_steps
        self.check = check_invariants
        self.step_time = _step_time_scalar(profile, config)
        # Engine time per arriving request, charged to the first step that starts after
        # its arrival; `ingested`: arrivals charged so far.
        self.intake = profile.request_intake_s
        self.ingested = 0
        self.kw = {"max_lora_rank": config.max_lora_rank, "max_loras": config.max_loras}
        self.step = 0
        self.t = 0.0
        self.t_end = 0.0
        # `run(until=...)` stops before a step that would start at or after `until` and
        # resumes where it stopped (a coupled fleet's engines advance to each routing instant).
        self.horizon = math.inf
        self._started = False
        self.step_end: list[float] = []
        self.steps = _Steps()
        self.ff_steps = 0
        # A failed fast-forward attempt says when the next one could succeed.
        self._ff_retry_step = 0
        self._ff_retry_t = -math.inf

    def _num_arrived_valid(self, k: int) -> int:
        return k if self.valid_prefix is None else int(self.valid_prefix[k])

    def run(self, fast_forward: bool, until: float = math.inf) -> None:
        sched = self.sched
        # Arrival times stay a numpy array: a Python list of a million floats costs
        # more (memory, page faults) than the per-step searchsorted it would speed up.
        arrivals = self.arrival
        n = self.num_requests
        window = self.window
        if self._started:
            t, step = self.t, self.step
        else:
            t = float(arrivals[0]) if n else 0.0
            step = 0
            self._started = True
        self.horizon = until
        window = min(window, until)
        record = self.record
        cols = self.steps.cols
        step_end = self.step_end
        intake = self.intake
        while t < window:
            num_arrived = int(arrivals.searchsorted(t, "right"))
            if not sched.running:
                if sched.waiting.peek(num_arrived, False) is None:
                    # Idle: jump to the next arrival (none left: done, or paused until
                    # more are added).
                    if num_arrived >= n:
                        break
                    t = float(arrivals[num_arrived])
                    continue
            elif fast_forward and not sched.prefilling and step >= self._ff_retry_step and t >= self._ff_retry_t:
                k = self._fast_forward(step, t, num_arrived)
                if k:
                    step += k
                    t = step_end[-1]
                    continue
            plan = sched.schedule(step, num_arrived)
            dur = (
                self.step_time(
                    plan.prefill_tokens, plan.num_decodes, plan.context_tokens, plan.num_adapters, plan.rank_sum,
                    len(plan.prefills),
                )
                + intake * (num_arrived - self.ingested)
            ) + plan.adapter_load_s
            self.ingested = num_arrived
            t_next = t + dur
            if record:
                # The batch's adapters: before `update` lets finished requests go.
                if plan.batch_adapters is not None:
                    cols["adapters_id"].append(self.steps.one_off_set(plan.batch_adapters))
                else:
                    cols["adapters_id"].append(self.steps.adapters_id(sched.adapters_version, sched.running_adapters))
            sched.update(step, plan)
            step_end.append(t_next)
            if self.check:
                sched.check_invariants(step, plan)
            if record:
                cols["t_s"].append(t)
                cols["duration_s"].append(dur)
                cols["num_running"].append(len(sched.running))
                cols["num_waiting"].append(sched.num_waiting(self._num_arrived_valid(num_arrived)))
                cols["prefill_reqs"].append(len(plan.prefills))
                cols["prefill_tokens"].append(plan.prefill_tokens)
                cols["decode_reqs"].append(plan.num_decodes)
                cols["decode_tokens"].append(plan.num_decodes)
                cols["kv_usage"].append(sched.used_blocks / sched.num_blocks)
                cols["num_preempted"].append(plan.num_preempted)
                cols["adapter_loads"].append(plan.adapter_loads)
                cols["context_tokens"].append(plan.context_tokens)
                cols["adapter_load_s"].append(plan.adapter_load_s)
                if plan.loaded:
                    self.steps.loaded[step] = list(plan.loaded)
            if plan.num_scheduled == 0:
                # Nothing could run (cannot happen with valid requests): avoid a spin.
                raise AssertionError(f"twin: step {step} scheduled nothing with {len(sched.running)} running")
            step += 1
            t = t_next
        self.step = step
        self.t = t
        self.t_end = t

    def _admission_blocked_until(self, step: int, num_arrived: int) -> float | None:
        """If no waiting request can be admitted at `step` nor at any later step of a
        decode-only stretch that starts now, the earliest arrival time that could change
        that (inf: none); None when a request is admissible now."""
        sched = self.sched
        if len(sched.running) >= sched.max_num_seqs:
            return math.inf  # only a finish can free a seat
        waiting = sched.waiting
        running_adapters = sched.running_adapters
        budget = sched.max_num_batched_tokens - sched.num_decoding
        if budget <= 0:
            return math.inf  # the decodes take the whole token budget
        free = sched.num_blocks - sched.used_blocks - sched.block_phase[(-step) % sched.block_size]
        loras_full = len(running_adapters) >= sched.max_loras
        head = waiting.peek(num_arrived, loras_full)
        if head is not None:
            r = head[1]
            need = cdiv(min(sched.prompt[r] + sched.gen[r], budget), sched.block_size)
            # Free blocks only shrink during the stretch: blocked now, blocked then.
            return math.inf if need > free else None
        # Nothing admissible has arrived: the next arrival that would be admissible.
        head = waiting.peek(self.num_requests + 1, loras_full)
        return math.inf if head is None else float(self.arrival[head[1]])

    def _fast_forward(self, step: int, t: float, num_arrived: int) -> int:
        """Advance a decode-only stretch starting at `step` in one computation; returns
        the number of steps advanced (0: take a normal step)."""
        sched = self.sched
        n_dec = sched.num_decoding
        if n_dec != len(sched.running) or n_dec > sched.max_num_batched_tokens:
            return 0
        # Next finish (skip stale heap entries).
        heap = sched.finish_heap
        while heap:
            f, r = heap[0]
            if r in sched.running and sched.in_decode[r] and sched.dbase[r] + sched.output[r] - 1 == f:
                break
            heapq.heappop(heap)
        if not heap:
            return 0
        k = min(heap[0][0] - step, MAX_STRETCH)
        if k < MIN_STRETCH:
            self._ff_retry_step = heap[0][0] + 1  # nothing to gain before that finish
            return 0
        until = self._admission_blocked_until(step, num_arrived)
        if until is None:
            return 0
        # Steps only get longer during a stretch (the context grows), so the first one
        # bounds how many fit before `until` -- checked before any numpy work.
        na, rs = len(sched.running_adapters), sched.running_rank_sum
        limit = min(self.window, until, self.horizon)
        d0 = self.step_time(0, n_dec, sched.decode_ctx_base + n_dec * step, na, rs)
        if d0 > 0 and (limit - t) / d0 + 1 < MIN_STRETCH:
            self._ff_retry_t = limit
            return 0
        # KV blocks: decodes crossing a block boundary at each step of the stretch.
        bs = sched.block_size
        steps_idx = step + np.arange(k, dtype=np.int64)
        phases = np.asarray(sched.block_phase, dtype=np.int64)
        need = np.cumsum(phases[(-steps_idx) % bs])
        free = sched.num_blocks - sched.used_blocks
        k = min(k, int(np.searchsorted(need, free, side="right")))
        if k < MIN_STRETCH:
            return 0
        steps_idx = steps_idx[:k]
        need = need[:k]
        ctx = sched.decode_ctx_base + n_dec * steps_idx
        dur = self.profile.step_time(
            np.zeros(k), np.full(k, float(n_dec)), ctx.astype(np.float64), np.full(k, float(na)), np.full(k, float(rs)), **self.kw
        )
        ends = np.cumsum(np.concatenate([[t], dur]))[1:]
        starts = np.concatenate([[t], ends[:-1]])
        if self.intake:
            k, dur, starts, ends = self._with_intake(dur, starts, ends)
            if k < MIN_STRETCH:
                return 0
            steps_idx, need, ctx = steps_idx[:k], need[:k], ctx[:k]
        # Stop at the first step that starts at/after the window or an admissible arrival.
        k = min(k, int(np.searchsorted(starts, limit, side="left")))
        if k < MIN_STRETCH:
            return 0
        sched.used_blocks += int(need[k - 1])
        if self.intake:
            self.ingested = int(self.arrival.searchsorted(starts[k - 1], "right"))
        self.step_end.extend(ends[:k].tolist())
        self.ff_steps += k
        if self.record:
            self._record_stretch(starts[:k], dur[:k], ctx[:k], need[:k], n_dec)
        if self.check:
            # The scheduler's state after the stretch equals k plain decode steps.
            sched.check_invariants(step + k - 1, _decode_plan(n_dec, na))
        return k

    def _with_intake(
        self, base: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Step durations of a stretch with request intake: each step pays for the
        arrivals since the previous step started, which depend on when the steps start.
        Solved by fixed-point iteration from the intake-free schedule; arrival counts only
        grow between iterations, and the steps are exact up to the first step whose count
        changed in the last iteration. Same float operations as the plain loop, so the
        result is bit-identical to it. Returns (exact steps, durations, starts, ends)."""
        arrival, c = self.arrival, self.intake
        prev = None
        dur = base
        for _ in range(8):
            arrived = arrival.searchsorted(starts, "right")
            if prev is not None and (arrived == prev).all():
                return len(base), dur, starts, ends
            taken = np.diff(arrived, prepend=self.ingested)
            dur = base + c * taken
            ends = np.cumsum(np.concatenate([[starts[0]], dur]))[1:]
            starts = np.concatenate([starts[:1], ends[:-1]])
            prev = arrived
        # Not converged: keep the prefix whose arrival counts held in the last iteration
        # (their starts, and so their durations, are final).
        same = arrival.searchsorted(starts, "right") == prev
        k = len(base) if same.all() else int(np.argmin(same))
        return k, dur, starts, ends

    def _record_stretch(self, starts: np.ndarray, dur: np.ndarray, ctx: np.ndarray, need: np.ndarray, n_dec: int) -> None:
        sched = self.sched
        k = len(starts)
        cols = self.steps.cols
        arrived = np.searchsorted(self.arrival, starts, side="right")
        arrived_valid = arrived if self.valid_prefix is None else self.valid_prefix[arrived]
        waiting = arrived_valid - sched.waiting.num_taken + sched.waiting.num_front
        used_before = sched.used_blocks - int(need[-1])
        cols["t_s"].extend(starts.tolist())
        cols["duration_s"].extend(dur.tolist())
        cols["num_running"].extend([n_dec] * k)
        cols["num_waiting"].extend(waiting.tolist())
        cols["prefill_reqs"].extend([0] * k)
        cols["prefill_tokens"].extend([0] * k)
        cols["decode_reqs"].extend([n_dec] * k)
        cols["decode_tokens"].extend([n_dec] * k)
        cols["kv_usage"].extend(((used_before + need) / sched.num_blocks).tolist())
        cols["num_preempted"].extend([0] * k)
        cols["adapter_loads"].extend([0] * k)
        cols["context_tokens"].extend(ctx.tolist())
        cols["adapter_load_s"].extend([0.0] * k)
        sid = self.steps.adapters_id(sched.adapters_version, sched.running_adapters)
        cols["adapters_id"].extend([sid] * k)


def _decode_plan(n_dec: int, na: int):  # type: ignore[no-untyped-def]
    from twin.scheduler import StepPlan

    plan = StepPlan()
    plan.num_decodes = n_dec
    plan.num_adapters = na
    return plan


STATUS_LABELS = ["ok", "unfinished", "error"]


def _strings(codes: np.ndarray, labels: list[str]) -> pa.Array:
    """A string column from label codes, built from buffers (a million rows in ~20 ms;
    through Python objects or a dictionary cast it takes 10x longer)."""
    raw = [lab.encode() for lab in labels]
    width = max(len(b) for b in raw)
    table = np.zeros((len(raw), width), dtype=np.uint8)
    for i, b in enumerate(raw):
        table[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    lens = np.array([len(b) for b in raw], dtype=np.int64)[codes]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    data = table[codes][np.arange(width) < lens[:, None]]
    return pa.StringArray.from_buffers(len(codes), pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))


def _results(
    trace: pl.DataFrame,
    sched: Scheduler,
    loop: _Loop,
    valid: np.ndarray,
    too_long: np.ndarray,
    oom: bool,
    window: float,
    max_len: int,
) -> pa.Table:
    """The results table, built as numpy columns."""
    n = trace.height
    arrival = trace.get_column("arrival_s").cast(pl.Float64).to_numpy()
    step_end = np.asarray(loop.step_end + [np.nan], dtype=np.float64)  # index -1 -> nan
    first_step = np.asarray(sched.first_token_step, dtype=np.int64)
    end_step = np.asarray(sched.end_step, dtype=np.int64)
    first = step_end[first_step]
    end = step_end[end_step]
    gen = np.asarray(sched.gen, dtype=np.int64)
    # Requests still decoding when the loop stopped: tokens generated by then.
    last = loop.step
    for r in sched.running:
        if sched.in_decode[r]:
            gen[r] = last - sched.dbase[r]
    ok = (end_step >= 0) & (end <= window)
    if np.isfinite(window):
        first = np.where(first <= window, first, np.nan)
    end = np.where(ok, end, np.nan)
    status = np.where(ok, 0, 1).astype(np.int64)  # index into STATUS_LABELS
    error: pa.Array = pa.nulls(n, pa.string())
    if too_long.any() and not oom:
        status[too_long] = 2
        msg = f"prompt + output tokens exceed the model length ({max_len - 1} tokens)"
        error = pa.array(np.where(too_long, msg, None).astype(object), type=pa.string())
        gen[too_long] = 0
    dispatch = np.where(arrival <= window, arrival, np.nan)
    ttft = first - arrival
    e2e = end - arrival
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(ok & (gen > 1), (end - first) / (gen - 1), np.nan)

    def f64(x: np.ndarray) -> pa.Array:
        return pa.array(x, type=pa.float64(), from_pandas=True)  # NaN -> null

    table = trace.to_arrow()
    extra = {
        "target": _strings(np.zeros(n, dtype=np.int64), ["twin"]),
        "status": _strings(status, STATUS_LABELS),
        "dispatch_s": f64(dispatch),
        "first_token_s": f64(first),
        "end_s": f64(end),
        "generated_tokens": pa.array(gen.astype(np.int32)),
        "ttft_s": f64(ttft),
        "e2e_s": f64(e2e),
        "tpot_s": f64(tpot),
        "error": error,
    }
    for name, col in extra.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, col)
    return conform(table, "results", source="twin")
