"""Invariants of the twin under random traces and configurations (hypothesis).

Each example runs the engine in its invariant-check mode (KV blocks recounted from the
requests after every step, batch limits, adapter slots, bookkeeping) and then checks the
outputs: no request lost or duplicated, completed requests generated exactly their
output tokens, every step within max_num_seqs / max_num_batched_tokens / max_loras,
all KV blocks free at the end, and the same inputs give bit-identical outputs, with or
without fast-forward."""

from __future__ import annotations

import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin import scheduler as sched_mod
from twin.api import ServingConfig
from twin.engine import simulate
from twin.profile import Profile


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[pl.DataFrame, Profile, ServingConfig, float | None]:
    n = draw(st.integers(1, 60))
    adapters = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    names = [f"a{i}" for i in range(adapters)] + [None]
    tr = pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            # Rounded arrivals: ties (equal arrival times) must be handled too.
            "arrival_s": np.round(rng.uniform(0, draw(st.sampled_from([0.5, 3.0, 20.0])), n), 1),
            "adapter": [names[i] for i in rng.integers(0, adapters + 1, n)],
            "prompt_tokens": rng.integers(1, draw(st.sampled_from([20, 200, 700])), n).astype(np.int32),
            "output_tokens": rng.integers(1, draw(st.sampled_from([5, 60, 300])), n).astype(np.int32),
        }
    )
    max_loras = draw(st.integers(1, 4))
    # Small max_num_seqs keeps batches tiny; large ones reach the vectorised running loop.
    config = ServingConfig(
        max_loras=max_loras,
        max_cpu_loras=max_loras + draw(st.integers(0, 3)),
        max_lora_rank=16,
        max_num_seqs=draw(st.sampled_from([1, 2, 5, 12, 40])),
        max_num_batched_tokens=draw(st.sampled_from([8, 32, 64, 512])),
        block_size=draw(st.sampled_from([1, 4, 16])),
    )
    profile = Profile.from_dict(
        {
            "name": "prop",
            "memory": {"kind": "fixed", "kv_tokens": draw(st.sampled_from([0, 64, 256, 1024, 8192]))},
            "step_time": {
                "kind": "linear",
                "intercept_s": 0.01,
                "coef": {"prefill_tokens": 1e-4, "decode_tokens": 1e-4, "context_tokens": 1e-6, "num_adapters": 1e-3},
            },
            "adapter_load": {"base_ms": draw(st.sampled_from([0.0, 5.0])), "per_rank_ms": 0.1},
        }
    )
    window = draw(st.sampled_from([None, 2.0, 10.0]))
    return tr, profile, config, window


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants(scenario: tuple[pl.DataFrame, Profile, ServingConfig, float | None]) -> None:
    tr, profile, config, window = scenario
    res = simulate(tr, profile, config, window_s=window, record_steps=True, check_invariants=True)
    out = pl.from_arrow(res.results)
    assert isinstance(out, pl.DataFrame)

    # No request lost or duplicated.
    assert sorted(out["request_id"].to_list()) == sorted(tr["request_id"].to_list())

    ok = out.filter(pl.col("status") == "ok")
    assert (ok["generated_tokens"] == ok["output_tokens"]).all()
    assert (ok["first_token_s"] <= ok["end_s"]).all() and (ok["first_token_s"] > ok["arrival_s"]).all()
    if window is not None:
        assert (ok["end_s"] <= window).all()
    else:
        # Without a window everything that fits in the KV cache completes.
        assert out.filter(pl.col("status") == "unfinished").height == (tr.height if res.summary["oom"] else 0)
    assert (out["generated_tokens"] <= out["output_tokens"]).all()

    steps = res.steps
    assert steps is not None
    s = pl.from_arrow(steps)
    assert isinstance(s, pl.DataFrame)
    if s.height:
        assert (s["prefill_reqs"] + s["decode_reqs"] <= config.max_num_seqs).all()
        assert (s["prefill_tokens"] + s["decode_tokens"] <= config.max_num_batched_tokens).all()
        assert (s["active_adapters"].list.len() <= config.max_loras).all()
        assert (s["kv_usage"] <= 1.0).all()
        assert (s["duration_s"] > 0).all()
        assert (s["t_s"].diff().drop_nulls() > 0).all()
    if window is None:
        assert res.summary["kv_blocks_in_use"] == 0  # all blocks free at the end
    # Tokens the batches decoded or sampled add up to what requests generated (a
    # request samples one token per decode and one per completed prefill).
    assert int(s["decode_tokens"].sum()) <= int(out["generated_tokens"].sum())

    # Deterministic, and neither fast-forward nor the vectorised running loop changes
    # anything: compare with the plain step loop, request by request.
    saved = sched_mod.FAST_PREEMPT_MIN_RUNNING
    sched_mod.FAST_PREEMPT_MIN_RUNNING = 10**9
    try:
        again = simulate(tr, profile, config, window_s=window, record_steps=True, fast_forward=False)
    finally:
        sched_mod.FAST_PREEMPT_MIN_RUNNING = saved
    assert res.results.equals(again.results)
    assert steps.equals(again.steps)


Scenario = tuple[pl.DataFrame, Profile, ServingConfig, float | None, dict, list[list[int]]]


@st.composite
def shared_prefix_scenarios(draw: st.DrawFn) -> Scenario:
    """Multi-turn chats over a few adapters and the base model, with shared system
    prompts that different adapters use too, some prompts sent again as they were (a
    retry: a hit on the whole prompt is possible), under prefix caching and any mix of
    full-prompt admission and async scheduling, in KV caches from tight to ample. The
    sharing is in the trace either as token ids (hashed by the twin, keyed by adapter) or
    as `prefix_hashes` as Mooncake writes them: one id per distinct prefix block, the same
    for every adapter (so only the pool keeps adapters apart), in blocks of the engine's
    size or twice it. Returns (trace, profile, config, window, trace context, token ids)."""
    n = draw(st.integers(1, 50))
    adapters = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    bs = draw(st.sampled_from([1, 4, 16]))
    systems = [rng.integers(1000, 1010 if draw(st.booleans()) else 2000, int(rng.integers(0, 80))).tolist() for _ in range(3)]
    names = [f"a{i}" for i in range(adapters)] + [None]
    history: dict[object, list[int]] = {}
    rows = []
    for _ in range(n):
        a = names[int(rng.integers(0, adapters + 1))]
        prev = history.get(a)
        if prev is None or rng.random() < 0.3:
            prev = list(systems[int(rng.integers(0, 3))])
        ids = prev + rng.integers(1000, 1004, int(rng.integers(1, 60))).tolist()  # few ids: repeats happen
        same = [x for b, x in rows if b == a]
        if same and rng.random() < 0.15:
            ids = list(same[int(rng.integers(0, len(same)))])  # the same prompt again
        history[a] = ids + rng.integers(1000, 2000, int(rng.integers(0, 20))).tolist()
        rows.append((a, ids))
    tr = pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "arrival_s": np.sort(np.round(rng.uniform(0, draw(st.sampled_from([0.5, 5.0, 30.0])), n), 1)),
            "adapter": [a for a, _ in rows],
            "prompt_tokens": np.array([len(x) for _, x in rows], dtype=np.int32),
            "output_tokens": rng.integers(1, draw(st.sampled_from([5, 40, 200])), n).astype(np.int32),
            "prompt_token_ids": [x for _, x in rows],
        },
        schema_overrides={"prompt_token_ids": pl.List(pl.Int32)},
    )
    ids_of = [x for _, x in rows]
    context: dict = {}
    if draw(st.booleans()):
        tb = bs * draw(st.sampled_from([1, 2]))
        block_ids: dict[tuple[int, ...], int] = {}
        hashes = [[block_ids.setdefault(tuple(x[: (j + 1) * tb]), len(block_ids)) for j in range(len(x) // tb)] for x in ids_of]
        tr = tr.drop("prompt_token_ids").with_columns(prefix_hashes=pl.Series(hashes, dtype=pl.List(pl.Int64)))
        context = {"prefix_block_tokens": tb}
    max_loras = draw(st.integers(1, 3))
    config = ServingConfig(
        max_loras=max_loras,
        max_cpu_loras=max_loras + draw(st.integers(0, 2)),
        max_lora_rank=16,
        max_num_seqs=draw(st.sampled_from([1, 3, 12, 40])),
        max_num_batched_tokens=draw(st.sampled_from([8, 32, 512])),
        block_size=bs,
        enable_prefix_caching=True,
        scheduler_reserve_full_isl=draw(st.booleans()),
        async_scheduling=draw(st.booleans()),
    )
    profile = Profile.from_dict(
        {
            "name": "prop",
            "memory": {"kind": "fixed", "kv_tokens": draw(st.sampled_from([160, 400, 1024, 8192]))},
            "step_time": {"kind": "linear", "intercept_s": 0.01, "coef": {"prefill_tokens": 1e-4, "decode_tokens": 1e-4}},
            "adapter_load": {"base_ms": 1.0, "per_rank_ms": 0.0},
            "request_intake": {"s_per_request": draw(st.sampled_from([0.0, 0.003]))},
        }
    )
    return tr, profile, config, draw(st.sampled_from([None, 3.0])), context, ids_of


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shared_prefix_scenarios())
def test_prefix_cache_invariants(scenario: Scenario) -> None:
    """Under prefix caching, after every step (`check_invariants`): no block is both free
    and held (free + held = all blocks), every cached block's reference count equals the
    requests holding it, and no two adapters share a block. On the results: a hit never
    exceeds the prompt minus one token, and is never longer than the (block-aligned)
    prefix the prompt shares with another request of the same adapter -- so adapters
    never share a cached prefix. Fast-forward changes nothing."""
    tr, profile, config, window, context, ids = scenario
    res = simulate(tr, profile, config, trace_context=context, window_s=window, record_steps=True, check_invariants=True)
    out = pl.from_arrow(res.results)
    assert isinstance(out, pl.DataFrame)
    adapters = tr["adapter"].to_list()
    bs = config.block_size
    for i, hit in enumerate(out["cached_tokens"].to_list()):
        if hit is None:
            continue
        assert 0 <= hit <= len(ids[i]) - 1
        assert hit % bs == 0
        shared = max((_lcp(ids[i], ids[j]) for j in range(len(ids)) if j != i and adapters[j] == adapters[i]), default=0)
        assert hit <= shared // bs * bs, f"request {i}: hit {hit} > prefix shared within its adapter ({shared})"
    ok = out.filter(pl.col("status") == "ok")
    assert (ok["generated_tokens"] == ok["output_tokens"]).all()
    if window is None:
        assert out.filter(pl.col("status") == "unfinished").height == 0
        assert res.summary["kv_blocks_in_use"] == 0
    s = pl.from_arrow(res.steps)
    assert isinstance(s, pl.DataFrame)
    if s.height:
        assert (s["prefill_tokens"] + s["decode_tokens"] <= config.max_num_batched_tokens).all()
        assert (s["kv_usage"] <= 1.0).all()
    assert int(s["prefill_tokens"].sum()) == res.summary["prefill_tokens_computed"]
    plain = simulate(tr, profile, config, trace_context=context, window_s=window, record_steps=True, fast_forward=False)
    assert res.results.equals(plain.results) and res.steps.equals(plain.steps)
    assert res.summary["admission_blocked"] == plain.summary["admission_blocked"]
    # Nor does the closed-form running loop (a budget-cut step): vLLM's loop request by request.
    saved = sched_mod.FAST_PREEMPT_MIN_RUNNING
    sched_mod.FAST_PREEMPT_MIN_RUNNING = 10**9
    try:
        loop = simulate(tr, profile, config, trace_context=context, window_s=window, record_steps=True, fast_forward=False)
    finally:
        sched_mod.FAST_PREEMPT_MIN_RUNNING = saved
    assert res.results.equals(loop.results) and res.steps.equals(loop.steps)


def test_fast_forward_takes_the_admission_an_eviction_allows() -> None:
    """Found by `test_prefix_cache_invariants` (a CI run): r1, preempted, waits with its
    blocks cached in the free queue while r0 decodes alone. A decode's new block evicts
    one of them; the trace's prefix unit spans two engine blocks, so r1's hit loses the
    unit and it needs fewer free blocks than before: the plain loop admits it there. A
    decode-only stretch that took "blocked now" for "blocked until a finish" skipped
    that admission (r1's first token 6 ms late)."""
    tr = pl.DataFrame({"request_id": ["r0", "r1"], "arrival_s": [0.0, 0.1], "adapter": ["a0", None],
                       "prompt_tokens": pl.Series([88, 93], dtype=pl.Int32),
                       "output_tokens": pl.Series([36, 30], dtype=pl.Int32),
                       "prefix_hashes": pl.Series([[0, 1], [0, 2]], dtype=pl.List(pl.Int64))})
    profile = Profile(name="prop", data={
        "name": "prop", "memory": {"kind": "fixed", "kv_tokens": 160},
        "step_time": {"kind": "linear", "intercept_s": 0.01, "coef": {"prefill_tokens": 1e-4, "decode_tokens": 1e-4}},
        "adapter_load": {"base_ms": 1.0, "per_rank_ms": 0.0}, "request_intake": {"s_per_request": 0.0}})
    config = ServingConfig(max_loras=1, max_cpu_loras=1, max_lora_rank=16, max_num_seqs=3, max_num_batched_tokens=8,
                           block_size=16, enable_prefix_caching=True)
    ctx = {"prefix_block_tokens": 32}
    ff = simulate(tr, profile, config, trace_context=ctx, record_steps=True, check_invariants=True)
    plain = simulate(tr, profile, config, trace_context=ctx, record_steps=True, fast_forward=False)
    steps = pl.from_arrow(plain.steps)
    assert isinstance(steps, pl.DataFrame)
    assert steps["num_preempted"].sum() >= 2  # r1 is preempted, then admitted again mid-stretch
    assert ff.results.equals(plain.results) and ff.steps.equals(plain.steps)
