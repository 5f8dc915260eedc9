"""The simulation loop: drive `twin.scheduler.Scheduler` step by step through time.

One engine step = schedule (vLLM's `Scheduler.schedule`), execute (duration from the
profile's step-time model plus adapter loads), update (`update_from_output`: tokens
sampled, requests finished and freed). Requests whose arrival time is at or before a
step's start are in `waiting` for that step; an idle engine jumps to the next arrival.
The steps record what vLLM's step plugin reads right after `schedule()`: `num_running`,
`num_waiting` and `kv_usage` as the scheduler left them, prefill tokens computed (a
prefix-cache hit is not computed).

Fast-forward: a stretch of steps where only decoding happens is advanced in one numpy
computation: step times vectorised over the stretch, start times by a cumulative sum.
The scheduler decides whether a stretch may start and how far its KV blocks allow it
(`Scheduler.decode_stretch`, `stretch_blocks`, with the same admission rule as a normal
step); the loop ends it before the next finish, before the first step whose scheduling
sees an arrival that could be admitted, and at the window's end. Turning it off
(`fast_forward=False`) gives the plain step loop, which must produce bit-identical
results (tests check it).

Request intake: a profile's `request_intake.s_per_request` (the engine core's work to
take in a new request, admitted or not) is charged to the first step that starts after
each arrival; inside a stretch, where step starts and arrivals depend on each other, it
is solved by fixed-point iteration (`_Loop._with_intake`).

Async scheduling (`async_scheduling`): vLLM schedules step N+1 while step N executes and
takes in new requests meanwhile. So step N+1's scheduling sees the arrivals up to the
start of step N (after an idle engine, up to now), a step's intake runs alongside its
execution (the step lasts the longer of the two; after idle it comes first), and
finished requests give back their blocks and seats one step late (the scheduler's part).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from tracekit.metrics import summarize
from tracekit.schema import TracekitError, adapter_ranks, conform
from twin.config import ServingConfig, SimResult
from twin.kv_cache import prefix_keys
from twin.profile import Profile, load_profile
from twin.scheduler import BASE, DEFAULT_CPU_MISS_FACTOR, Scheduler, Stretch

if TYPE_CHECKING:
    import polars as pl

MAX_STRETCH = 8192  # steps per fast-forward computation (bounds the arrays' size)
# Fast-forward attempts that advance fewer steps than this back off (exponentially, up
# to 2**FF_BACKOFF_MAX steps between attempts): an attempt costs a few plain steps' worth
# of checks, so it must pay for itself. Only the speed depends on these, not the results.
FF_GAIN = 8
FF_BACKOFF_MAX = 8
MIN_TRY = 2  # a stretch must reach this many steps before the next finish to be tried
MIN_STRETCH = 12  # below this the plain steps (~10 us each) beat numpy's fixed cost
# Stretches up to this many steps go step by step in plain floats (a microsecond a step,
# no numpy set-up); longer ones in numpy.
SCALAR_STRETCH = 128
NEVER = 1 << 62  # a step number no run reaches (an int: compares with steps stay integer ones)


def _resolve_adapters(
    col: pa.ChunkedArray, context: dict[str, Any], config: ServingConfig
) -> tuple[np.ndarray, list[str], list[int]]:
    """Adapter index per request (BASE for the base model), names, ranks (sorted names:
    the index does not depend on the trace's row order), from the column's dictionary
    codes (a million names cost nothing more)."""
    n = len(col)
    if not config.enable_lora:
        return np.full(n, BASE, dtype=np.int32), [], []
    if not pa.types.is_dictionary(col.type):
        import pyarrow.compute as pc

        col = pc.dictionary_encode(col)
    d = col.unify_dictionaries().combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    ind = d.indices
    # The codes from their buffer (a null's slot holds some code; masked below).
    codes = np.frombuffer(ind.buffers()[1], dtype=ind.type.to_pandas_dtype())[ind.offset : ind.offset + n]
    null = _nulls(d) if d.null_count else None
    if null is not None:
        codes = codes.copy()
        codes[null] = 0
    dictionary = d.dictionary.to_pylist()
    used = np.flatnonzero(np.bincount(codes[~null] if null is not None else codes, minlength=len(dictionary)))
    names = sorted(dictionary[i] for i in used)
    where = {name: i for i, name in enumerate(names)}
    remap = np.array([where.get(v, BASE) for v in dictionary] or [BASE], dtype=np.int32)
    idx = remap[codes]
    if null is not None:
        idx[null] = BASE
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


def _registered_adapters(context: dict[str, Any], names: list[str]) -> list[int]:
    """Adapters the replay registered on the server before sending (`/v1/load_lora_adapter`,
    the context's `adapters_loaded`, in that order), as adapter indices; one the trace never
    uses gets an index past the trace's adapters (it still takes a slot). vLLM read each
    into the CPU cache and activated it in a GPU slot, so the run starts with them there."""
    registered = context.get("adapters_loaded")
    if not registered or not names:
        return []
    if not isinstance(registered, (dict, list)):
        raise TracekitError(
            f"trace context adapters_loaded: expected adapter names, got {type(registered).__name__}"
        )
    index = {name: i for i, name in enumerate(names)}
    out: list[int] = []
    for name in registered:
        if str(name) not in index:
            index[str(name)] = len(index)
        out.append(index[str(name)])
    return out


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
        self._set_key: int | None = None

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
    trace: pl.DataFrame | pa.Table,
    profile: Any,
    config: ServingConfig,
    *,
    trace_context: dict[str, Any] | None = None,
    window_s: float | None = None,
    record_steps: bool = False,
    fast_forward: bool = True,
    check_invariants: bool = False,
    trace_checked: bool = False,
    dictionary_strings: bool = False,
) -> SimResult:
    """Simulate vLLM serving `trace` under `config`; see `twin.api.simulate`.

    `trace_checked`: the trace's values went through `tracekit.schema`'s checks already
    (`read_trace_arrow`), so the results, whose other columns the engine makes, are not
    checked again. `dictionary_strings`: the results' adapter (as the trace has it),
    target and status columns stay dictionary-encoded, for a caller that writes them
    (`tracekit.schema.write` records them as the plain strings): no million strings made.

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

    # The results keep the trace's own columns; an Arrow table stays Arrow (a million
    # request ids converted to polars and back cost more than the simulation's set-up).
    table = trace if isinstance(trace, pa.Table) else trace.to_arrow()
    if not _sorted(table.column("arrival_s")):
        table = table.take(pa.array(np.argsort(table.column("arrival_s").to_numpy(), kind="stable")))
    # The numbers straight from Arrow (no polars frame of the whole trace).
    arrival = _numpy(table.column("arrival_s"), np.float64)
    # The conformed trace's int32 (the scheduler reads them in place).
    prompt_np = _numpy(table.column("prompt_tokens"), np.int32)
    output_np = _numpy(table.column("output_tokens"), np.int32)
    adapter_idx, names, ranks = _resolve_adapters(table.column("adapter"), ctx_in, config)

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
    too_long = np.add(prompt_np, output_np, dtype=np.int64) > max_len
    valid = ~too_long & ~oom

    prefix = None
    if config.enable_prefix_caching:
        # vLLM's block hash carries the LoRA name only when LoRA is on (the names are
        # needed only to hash token ids, not for a trace's own prefix_hashes).
        col = table.column("adapter")
        prefix = prefix_keys(table, ctx_in, config.block_size,
                             lambda: col.to_pylist() if config.enable_lora else [None] * len(col))  # fmt: skip
    cpu_factor = float(prof.data.get("adapter_load", {}).get("cpu_miss_factor", DEFAULT_CPU_MISS_FACTOR))
    sched = Scheduler(
        prompt=prompt_np,
        output=output_np,
        arrival=arrival,
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
        enable_prefix_caching=config.enable_prefix_caching,
        scheduler_reserve_full_isl=config.scheduler_reserve_full_isl,
        async_scheduling=config.async_scheduling,
        prefix=prefix,
    )
    sched.slots.preload(_registered_adapters(ctx_in, names))
    loop = _Loop(sched, prof, config, arrival, valid, window, record_steps, check_invariants)
    loop_started = time.perf_counter()
    if not oom:
        loop.run(fast_forward)
    loop_s = time.perf_counter() - loop_started
    return _finish(table, arrival, sched, loop, prof, config, ctx_in, window_s, valid, too_long, oom, window, max_len,
                   kv_tokens, num_blocks, oom_reason, loop_s, names, record_steps, values_checked=trace_checked,
                   dictionary_strings=dictionary_strings)


def _finish(
    table: pa.Table, arrival: np.ndarray, sched: Scheduler, loop: _Loop, prof: Profile, config: ServingConfig,
    ctx_in: dict[str, Any], window_s: float | None, valid: np.ndarray, too_long: np.ndarray, oom: bool, window: float,
    max_len: int, kv_tokens: int, num_blocks: int, oom_reason: str, loop_s: float, names: list[str], record_steps: bool,
    *, values_checked: bool = False, dictionary_strings: bool = False,
) -> SimResult:
    """Results, summary and steps of a finished run (a whole trace's, or one engine's of
    a coupled fleet, `twin.cosim`)."""
    results, status = _results(table, arrival, sched, loop, valid, too_long, oom, window, max_len, values_checked,
                               dictionary_strings)
    ctx = dict(ctx_in)
    ctx.update(
        target="twin",
        profile=prof.name,
        serving_config=config.to_dict(),
        window_s=None if window_s is None else float(window_s),
    )
    # The metrics read no identifiers: leave the string columns out of the copy, and give
    # them the status by its codes (a dictionary: no million strings to compare).
    skip = {"request_id", "adapter", "target", "status", "error", "prompt_token_ids", "prefix_hashes", "tenant", "session_id"}
    metrics_in = results.select([c for c in results.column_names if c not in skip]).append_column(
        "status", pa.DictionaryArray.from_arrays(_primitive(status, pa.int8()), pa.array(STATUS_LABELS)))
    summary = summarize(metrics_in, ctx)
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
        prefill_tokens_computed=loop.prefill_tokens,
        kv_blocks_in_use=sched.used_blocks,  # when the simulation stopped
        engine_loop_s=loop_s,  # wall time of the step loop alone (speed benchmarks)
        **sched.summary(),
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
        self.kw = {"max_lora_rank": config.max_lora_rank, "max_loras": config.max_loras}
        self.step_time = profile.step_time_scalar(**self.kw)
        # Engine time per arriving request, charged to the first step that starts after
        # its arrival; `ingested`: arrivals charged so far.
        self.intake = profile.request_intake_s
        self.ingested = 0
        self.async_scheduling = config.async_scheduling
        self.step = 0
        self.t = 0.0
        self.t_end = 0.0
        # `run(until=...)` stops before a step that would start at or after `until` and
        # resumes there (a coupled fleet's engines advance to each routing instant,
        # `twin.cosim`); `_resume` holds the loop's state between calls.
        self.horizon = math.inf
        self._resume: tuple[float, int, float | None, int] | None = None
        self.step_end: list[float] = []
        self.steps = _Steps()
        self.ff_steps = 0
        self.prefill_tokens = 0
        # A failed fast-forward attempt says when the next one could succeed.
        self._ff_retry_step = 0
        self._ff_retry_t = -math.inf
        self._ff_misses = 0  # attempts in a row that advanced fewer than FF_GAIN steps

    def _num_arrived_valid(self, k: int) -> int:
        return k if self.valid_prefix is None else int(self.valid_prefix[k])

    def run(self, fast_forward: bool, until: float = math.inf) -> None:
        sched = self.sched
        # Arrival times stay a numpy array: a Python list of a million floats costs
        # more (memory, page faults) than the per-step search it would speed up.
        arrivals = self.arrival
        view, size = arrivals.data, len(arrivals)
        n = self.num_requests
        async_ = self.async_scheduling
        if self._resume is None:
            t = float(arrivals[0]) if n else 0.0
            # Async scheduling: the time up to which the next step's scheduling sees
            # arrivals (the start of the step in flight; None: no step in flight).
            in_flight: float | None = None
            step = 0
            arrived = 0  # arrivals up to t (t only grows: search near the last count, in cache)
        else:
            t, step, in_flight, arrived = self._resume
        self.horizon = until
        window = min(self.window, until)
        record = self.record
        cols = self.steps.cols
        step_end = self.step_end
        intake = self.intake
        prefill_total = self.prefill_tokens
        # The next step at which a fast-forward may be tried (a local: one compare per step).
        ff_at: int = self._ff_retry_step if fast_forward else NEVER
        while t < window:
            # Arrivals up to t: near the last count first (t only grows); bisect on a
            # view, a third of numpy's per-call cost.
            k = bisect_right(view, t, arrived, arrived + 256 if arrived + 256 < size else size)
            arrived = k if k < arrived + 256 else bisect_right(view, t, k)
            num_arrived = arrived
            seen = num_arrived if in_flight is None else bisect_right(view, in_flight)
            if not sched.running:
                if sched.waiting.peek(seen, False) is None:
                    # Nothing to run until the step in flight is done (async): then
                    # vLLM frees what it finished and takes in what arrived meanwhile.
                    sched.release_pending()
                    in_flight = None
                    seen = num_arrived
                    if sched.waiting.peek(num_arrived, False) is None:
                        # Idle: jump to the next arrival (none left: done, or paused
                        # until more are added).
                        if num_arrived >= n:
                            break
                        t = float(arrivals[num_arrived])
                        continue
            elif step >= ff_at and not sched.prefilling and t >= self._ff_retry_t:
                k = self._fast_forward(step, t, seen, in_flight)
                if k < FF_GAIN:
                    # Short or no stretch: each such attempt in a row waits twice as many
                    # steps before the next (a saturated server, or stretches of a few
                    # steps, where trying costs more than it saves); a long one resets it.
                    self._ff_misses += 1
                    self._ff_retry_step = max(self._ff_retry_step, step + k + (1 << min(self._ff_misses, FF_BACKOFF_MAX)) - 1)
                else:
                    self._ff_misses = 0
                ff_at = self._ff_retry_step
                if k:
                    step += k
                    t = step_end[-1]
                    if async_:
                        in_flight = self.t  # the start of the stretch's last step
                    continue
            plan = sched.schedule(step, seen)
            busy = self.step_time(
                plan.prefill_tokens, plan.num_decodes, plan.context_tokens, plan.num_adapters, plan.rank_sum,
                len(plan.prefills),
            )
            work = intake * (num_arrived - self.ingested)
            if in_flight is None:
                dur = (busy + work) + plan.adapter_load_s
            else:  # async: the intake runs while the step executes
                busy += plan.adapter_load_s
                dur = busy if busy >= work else work
            self.ingested = num_arrived
            t_next = t + dur
            prefill_total += plan.prefill_tokens
            if record:
                # What vLLM's step plugin reads right after schedule(), and the batch's
                # adapters, before `update` lets finished requests go.
                if plan.batch_adapters is not None:
                    cols["adapters_id"].append(self.steps.one_off_set(plan.batch_adapters))
                else:
                    cols["adapters_id"].append(self.steps.adapters_id(sched.adapters_version, sched.running_adapters))
                cols["num_running"].append(sched.num_seats)
                cols["num_waiting"].append(sched.num_waiting(self._num_arrived_valid(seen)))
                cols["kv_usage"].append(sched.used_blocks / sched.num_blocks)
            sched.update(step, plan)
            step_end.append(t_next)
            if self.check:
                sched.check_invariants(step, plan)
            if record:
                cols["t_s"].append(t)
                cols["duration_s"].append(dur)
                cols["prefill_reqs"].append(len(plan.prefills))
                cols["prefill_tokens"].append(plan.prefill_tokens)
                cols["decode_reqs"].append(plan.num_decodes)
                cols["decode_tokens"].append(plan.num_decodes)
                cols["num_preempted"].append(plan.num_preempted)
                cols["adapter_loads"].append(plan.adapter_loads)
                cols["context_tokens"].append(plan.context_tokens)
                cols["adapter_load_s"].append(plan.adapter_load_s)
                if plan.loaded:
                    self.steps.loaded[step] = list(plan.loaded)
            if plan.num_scheduled == 0:
                # Nothing could run (cannot happen with valid requests): avoid a spin.
                raise AssertionError(f"twin: step {step} scheduled nothing with {len(sched.running)} running")
            if async_:
                in_flight = t
            step += 1
            t = t_next
        self.step = step
        self.t_end = t
        self.prefill_tokens = prefill_total
        self._resume = (t, step, in_flight, arrived)

    def _fast_forward(self, step: int, t: float, seen: int, in_flight: float | None) -> int:
        """Advance a decode-only stretch starting at `step` in one computation; returns
        the number of steps advanced (0: take a normal step)."""
        sched = self.sched
        finish = sched.next_finish(step)
        if finish is None or finish - step < MIN_TRY:
            # Nothing to gain before that finish (a cheap check: a saturated server
            # finishes a request nearly every step).
            self._ff_retry_step = step + 1 if finish is None else finish + 1
            return 0
        if not sched.decode_blocks_fit(step):
            self._ff_retry_step = finish + 1  # full KV: only a finish frees blocks
            return 0
        st = sched.decode_stretch(step, seen)
        if st is None:
            return 0
        k = min(st.next_finish - step, MAX_STRETCH)
        if k <= SCALAR_STRETCH:
            return self._stretch_scalar(st, step, t, k, in_flight)
        n_dec, na, rs = st.num_decodes, st.num_adapters, st.rank_sum
        # Steps only get longer during a stretch (the context grows), so the first one
        # bounds how many fit before the window or an admissible arrival -- checked
        # before any numpy work. With async scheduling a step sees arrivals up to the
        # previous step's start: one step more.
        lag = 1 if self.async_scheduling else 0
        end = min(self.window, self.horizon)  # no step may start at or after it
        limit = min(end, st.until_s)
        d0 = self.step_time(0, n_dec, st.ctx_base + n_dec * step, na, rs)
        if d0 > 0 and (limit - t) / d0 + 1 + lag < MIN_STRETCH:
            self._ff_retry_t = limit
            return 0
        k, need = sched.stretch_blocks(step, k)
        if k < MIN_STRETCH:
            return 0
        steps_idx = step + np.arange(k, dtype=np.int64)
        ctx = st.ctx_base + n_dec * steps_idx
        dur = self.profile.step_time(
            np.zeros(k), np.full(k, float(n_dec)), ctx.astype(np.float64), np.full(k, float(na)), np.full(k, float(rs)), **self.kw
        )
        ends = np.cumsum(np.concatenate([[t], dur]))[1:]
        starts = np.concatenate([[t], ends[:-1]])
        if self.intake:
            k, dur, starts, ends = self._with_intake(dur, starts, ends)
            if k < MIN_STRETCH:
                return 0
            need, ctx = need[:k], ctx[:k]
        # The time up to which each step's scheduling sees arrivals.
        if self.async_scheduling:
            prev = t if in_flight is None else in_flight
            seen_s = np.concatenate([[prev], starts[:-1]])
        else:
            seen_s = starts
        # Stop at the first step that starts at/after the window or sees an admissible arrival.
        k = min(k, int(np.searchsorted(starts, end, side="left")), int(np.searchsorted(seen_s, st.until_s, side="left")))
        if k < MIN_STRETCH:
            return 0
        starts, dur, ends, need, ctx, seen_s = starts[:k], dur[:k], ends[:k], need[:k], ctx[:k], seen_s[:k]
        if self.record:
            self._record_stretch(starts, dur, ctx, need, n_dec, seen_s)
        sched.advance(st, need, seen_s)
        if self.intake:
            self.ingested = int(self.arrival.searchsorted(starts[-1], "right"))
        self.step_end.extend(ends.tolist())
        self.t = float(starts[-1])
        self.ff_steps += k
        if self.check:
            # The scheduler's state after the stretch equals k plain decode steps.
            sched.check_invariants(step + k - 1, _decode_plan(n_dec, na))
        return k

    def _stretch_scalar(self, st: Stretch, step: int, t: float, k: int, in_flight: float | None) -> int:
        """A short decode-only stretch step by step in plain floats: no schedule/update
        (the scheduler's `advance` commits it), no numpy set-up. Same operations in the
        same order as the plain loop, so the same bits."""
        sched = self.sched
        bs, phase = sched.block_size, sched.block_phase
        free = sched.num_blocks - sched.used_blocks
        n_dec, na, rs, base = st.num_decodes, st.num_adapters, st.rank_sum, st.ctx_base
        window, until = min(self.window, self.horizon), st.until_s
        step_time, c, arrivals = self.step_time, self.intake, self.arrival
        async_ = self.async_scheduling
        overlap = in_flight is not None  # async: a step in flight to overlap the intake with
        seen_t = t if in_flight is None else in_flight
        ingested = self.ingested
        starts: list[float] = []
        durs: list[float] = []
        needs: list[int] = []  # blocks allocated by the end of each step, cumulative
        seens: list[float] = []
        ctxs: list[int] = []
        used = 0
        t_cur = t
        for s in range(step, step + k):
            seen_at = seen_t if async_ else t_cur
            if t_cur >= window or seen_at >= until:
                break
            nb = phase[(-s) % bs]
            if used + nb > free:
                break
            ctx = base + n_dec * s
            busy = step_time(0, n_dec, ctx, na, rs)
            if c:
                arrived = int(arrivals.searchsorted(t_cur, "right"))
                work = c * (arrived - ingested)
                ingested = arrived
                if async_ and overlap:
                    dur = busy if busy >= work else work
                else:
                    dur = busy + work
            else:
                dur = busy
            used += nb
            starts.append(t_cur)
            durs.append(dur)
            needs.append(used)
            seens.append(seen_at)
            ctxs.append(ctx)
            seen_t = t_cur
            overlap = True
            t_cur = t_cur + dur
        k = len(starts)
        if k == 0:
            return 0
        if self.record:
            self._record_stretch(np.asarray(starts), np.asarray(durs), np.asarray(ctxs), np.asarray(needs), n_dec,
                                 np.asarray(seens))  # fmt: skip
        sched.advance(st, needs, seens)
        if c:
            self.ingested = ingested
        self.step_end.extend(starts[1:])
        self.step_end.append(t_cur)
        self.t = starts[-1]
        self.ff_steps += k
        if self.check:
            sched.check_invariants(step + k - 1, _decode_plan(n_dec, na))
        return k

    def _with_intake(
        self, base: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Step durations of a stretch with request intake: each step pays for the
        arrivals since the previous step started, which depend on when the steps start
        (added to the step, or overlapped with it under async scheduling). Solved by
        fixed-point iteration from the intake-free schedule; arrival counts only grow
        between iterations, and the steps are exact up to the first step whose count
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
            dur = np.maximum(base, c * taken) if self.async_scheduling else base + c * taken
            ends = np.cumsum(np.concatenate([[starts[0]], dur]))[1:]
            starts = np.concatenate([starts[:1], ends[:-1]])
            prev = arrived
        # Not converged: keep the prefix whose arrival counts held in the last iteration
        # (their starts, and so their durations, are final).
        same = arrival.searchsorted(starts, "right") == prev
        k = len(base) if same.all() else int(np.argmin(same))
        return k, dur, starts, ends

    def _record_stretch(
        self, starts: np.ndarray, dur: np.ndarray, ctx: np.ndarray, need: np.ndarray, n_dec: int, seen_s: np.ndarray
    ) -> None:
        sched = self.sched
        k = len(starts)
        cols = self.steps.cols
        arrived = np.searchsorted(self.arrival, seen_s, side="right")
        arrived_valid = arrived if self.valid_prefix is None else self.valid_prefix[arrived]
        waiting = arrived_valid - sched.waiting.num_taken + sched.waiting.num_front
        used_before = sched.used_blocks
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


def _strings(codes: np.ndarray, labels: Sequence[str], null: np.ndarray | None = None) -> pa.Array:
    """A string column from codes into a few `labels` (`null`: True where null), built as
    Arrow's buffers with numpy: each row's bytes gathered from a fixed-width table of the
    labels (one numpy item per label), padding dropped. A million rows in a few ms, with
    no Arrow compute kernel (importing them alone costs 70 ms); very long labels go
    through Arrow's dictionary cast instead."""
    n = len(codes)
    enc = [label.encode() for label in labels]
    bits, null_count = None, 0
    if null is not None and null.any():
        bits, null_count = pa.py_buffer(np.packbits(~null, bitorder="little")), int(null.sum())
        enc.append(b"")  # a null's slot: no bytes (its code may be anything)
        codes = np.where(null, len(enc) - 1, codes)
    lens = np.array([len(b) for b in enc], dtype=np.int32)
    width = int(lens.max()) if enc else 0
    if width == 0:
        return pa.StringArray.from_buffers(n, pa.py_buffer(np.zeros(n + 1, dtype=np.int32)), pa.py_buffer(b""), bits, null_count)
    equal = bool((lens == width).all())
    if equal:
        total = n * width
        offsets = np.arange(0, total + 1, width, dtype=np.int32) if total < 2**31 else None
    else:
        row_len = lens[codes]
        total = int(row_len.sum(dtype=np.int64))
        offsets = None
    if total >= 2**31 or n * width > 4 * total + (1 << 20):
        values = pa.array(labels, type=pa.string())
        return pa.DictionaryArray.from_arrays(_primitive(codes, pa.int32(), null), values).cast(pa.string())
    if offsets is None:
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(row_len, out=offsets[1:])
    table = np.zeros((len(enc), width), dtype=np.uint8)
    for i, b in enumerate(enc):
        table[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    item = f"V{width}"  # a label's padded bytes as one item: a 1-d gather, not a 2-d one
    data = table.view(item).ravel()[codes].view(np.uint8)
    if not equal:
        keep = np.ascontiguousarray(np.arange(width) < lens[:, None]).view(item).ravel()
        data = data[keep[codes].view(np.bool_)]
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32, copy=False)), pa.py_buffer(data), bits, null_count)


def _decoded(col: pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A dictionary-encoded string column as plain strings (`_strings`); others as they are."""
    if not pa.types.is_dictionary(col.type):
        return col
    d = col.unify_dictionaries().combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_string(d.type.value_type) or d.dictionary.null_count:
        return col.cast(pa.string())
    ind = d.indices
    codes = np.frombuffer(ind.buffers()[1], dtype=ind.type.to_pandas_dtype())[ind.offset : ind.offset + len(d)]
    return _strings(codes, d.dictionary.to_pylist(), _nulls(d) if d.null_count else None)


def _nulls(arr: pa.Array) -> np.ndarray:
    """Where `arr` is null, from its validity bitmap."""
    bits = arr.buffers()[0]
    if bits is None or arr.null_count == 0:
        return np.zeros(len(arr), dtype=bool)
    valid = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")[arr.offset : arr.offset + len(arr)]
    return valid == 0


def _primitive(x: np.ndarray, typ: pa.DataType, mask: np.ndarray | None = None) -> pa.Array:
    """A numpy array as an Arrow array of `typ` from its buffer, no copy when it has that
    type already. `mask`: True where null."""
    x = np.ascontiguousarray(x, dtype=typ.to_pandas_dtype())
    if mask is None or not mask.any():
        return pa.Array.from_buffers(typ, len(x), [None, pa.py_buffer(x)], null_count=0)
    bits = pa.py_buffer(np.packbits(~mask, bitorder="little"))
    return pa.Array.from_buffers(typ, len(x), [bits, pa.py_buffer(x)], null_count=int(mask.sum()))


def _numpy(col: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """A column without nulls as a numpy array of `dtype` (one copy at most)."""
    a = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return a.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _sorted(col: pa.ChunkedArray) -> bool:
    a = col.to_numpy()
    return bool(a.size < 2 or (a[1:] >= a[:-1]).all())


def _results(
    table: pa.Table,
    arrival: np.ndarray,
    sched: Scheduler,
    loop: _Loop,
    valid: np.ndarray,
    too_long: np.ndarray,
    oom: bool,
    window: float,
    max_len: int,
    values_checked: bool = False,
    dictionary_strings: bool = False,
) -> tuple[pa.Table, np.ndarray]:
    """The results table (the trace's columns and the outcomes, built as numpy columns
    with the results schema's types) and each request's status code (STATUS_LABELS)."""
    n = table.num_rows
    step_end = np.asarray(loop.step_end + [np.nan], dtype=np.float64)  # index -1 -> nan
    out = sched.columns()
    end_step = out["end_step"]
    # Whole columns, computed in place where that gives the same floats: most of a
    # saturated hour's requests are never admitted, and every 10 MB temporary costs
    # more in fresh pages than its arithmetic.
    first = step_end[out["first_token_step"]]
    end = step_end[end_step]
    gen = out["gen"].astype(np.int32)
    # Requests still decoding when the loop stopped: tokens generated by then.
    last = loop.step
    for r in sched.running:
        if sched.in_decode[r]:
            gen[r] = last - sched.dbase[r]
    ok = end_step >= 0
    ok &= end <= window
    if np.isfinite(window):
        first[~(first <= window)] = np.nan
    not_ok = ~ok
    end[not_ok] = np.nan
    status = not_ok.view(np.int8).copy()  # index into STATUS_LABELS: ok 0, unfinished 1
    error: pa.Array = pa.nulls(n, pa.string())
    if too_long.any() and not oom:
        status[too_long] = 2
        msg = f"prompt + output tokens exceed the model length ({max_len - 1} tokens)"
        messages = np.full(n, None, dtype=object)
        messages[too_long] = msg
        error = pa.array(messages, type=pa.string())
        gen[too_long] = 0
    # The arrival itself when every request arrived inside the window (no copy).
    dispatch = arrival if bool((arrival <= window).all()) else np.where(arrival <= window, arrival, np.nan)
    ttft = first - arrival
    e2e = end - arrival
    tpot = end - first
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(tpot, gen - 1, out=tpot)
    ok &= gen > 1
    tpot[~ok] = np.nan

    def f64(x: np.ndarray) -> pa.Array:
        # NaN -> null, with the validity bitmap packed by numpy (8x cheaper than a mask).
        x = np.ascontiguousarray(x, dtype=np.float64)
        valid = ~np.isnan(x)
        bits = pa.py_buffer(np.packbits(valid, bitorder="little"))
        return pa.Array.from_buffers(pa.float64(), len(x), [bits, pa.py_buffer(x)], null_count=len(x) - int(valid.sum()))

    def labels(codes: np.ndarray, values: list[str]) -> pa.Array:
        if dictionary_strings:
            return pa.DictionaryArray.from_arrays(_primitive(codes, pa.int8()), pa.array(values, type=pa.string()))
        return _strings(codes, values)

    extra = {
        "target": labels(np.zeros(n, dtype=np.int8), ["twin"]),
        "status": labels(status, STATUS_LABELS),
        "dispatch_s": f64(dispatch),
        "first_token_s": f64(first),
        "end_s": f64(end),
        "generated_tokens": _primitive(gen, pa.int32()),
        "ttft_s": f64(ttft),
        "e2e_s": f64(e2e),
        "tpot_s": f64(tpot),
        "error": error,
        # vLLM's num_cached_tokens: the prefix-cache hit when first admitted (null: never admitted).
        "cached_tokens": _primitive(out["cached_tokens"], pa.int32(), out["cached_tokens"] < 0),
    }
    table = table.drop_columns([c for c in extra if c in table.column_names])
    if not dictionary_strings:
        i = table.schema.get_field_index("adapter")
        table = table.set_column(i, "adapter", _decoded(table.column("adapter")))
    for name, col in extra.items():
        table = table.append_column(name, col)
    return conform(table, "results", source="twin", keep_dictionary=dictionary_strings,
                   check_values=not values_checked), status  # fmt: skip
