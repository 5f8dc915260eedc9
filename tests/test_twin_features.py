"""vLLM 0.32's serving features in the twin, each on a hand-checked scenario that fails
without it: prefix caching by adapter (hits, the cap, LRU eviction of freed blocks,
partial recompute after a preemption), full-prompt admission, async scheduling (frees
one step late, arrivals seen one step late, intake overlapped), the trace's two forms of
prefix sharing and the rule that maps a trace block size onto the engine's, and the
counts of what kept waiting requests out."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest
from test_twin_engine import profile, trace

from tracekit.prefix import block_hashes
from twin.api import ServingConfig
from twin.engine import simulate
from twin.kv_cache import engine_blocks_covered

SYS = list(range(100, 140))  # a 40-token "system prompt": two full blocks of 16 and 8 tokens


def ids_trace(rows: list[tuple[float, str | None, list[int], int]]) -> pl.DataFrame:
    """A trace with prompt_token_ids: (arrival, adapter, ids, output tokens)."""
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(len(rows))],
            "arrival_s": [float(r[0]) for r in rows],
            "adapter": [r[1] for r in rows],
            "prompt_tokens": [len(r[2]) for r in rows],
            "output_tokens": [r[3] for r in rows],
            "prompt_token_ids": [r[2] for r in rows],
        },
        schema={"request_id": pl.String, "arrival_s": pl.Float64, "adapter": pl.String, "prompt_tokens": pl.Int32,
                "output_tokens": pl.Int32, "prompt_token_ids": pl.List(pl.Int32)},
    )  # fmt: skip


def cached(res: Any) -> list[int | None]:
    return res.results.column("cached_tokens").to_pylist()


def run(tr: pl.DataFrame, cfg: ServingConfig, **prof: Any) -> Any:
    res = simulate(tr, profile(**prof), cfg, record_steps=True, check_invariants=True)
    plain = simulate(tr, profile(**prof), cfg, record_steps=True, fast_forward=False)
    assert res.results.equals(plain.results) and res.steps.equals(plain.steps)
    assert res.summary["admission_blocked"] == plain.summary["admission_blocked"]
    return res


def test_prefix_hits_are_keyed_by_adapter_and_capped_at_the_prompt_minus_one() -> None:
    tr = ids_trace([
        (0.0, "a", SYS + [1, 2, 3], 3),      # computes all 43 tokens
        (1.0, "a", SYS + [4, 5, 6, 7], 3),   # same system prompt: its two full blocks hit
        (1.0, "b", SYS + [4], 2),            # another adapter: shares nothing
        (2.0, "a", SYS + [1, 2, 3], 2),      # the same prompt again: still 32 (the third block is partial)
        (3.0, "a", SYS[:32], 2),             # 32 tokens, both blocks cached: the hit stops at 16 (prompt - 1)
        (4.0, None, SYS + [1, 2, 3], 2),     # the base model: its own key space
    ])  # fmt: skip
    cfg = ServingConfig(max_loras=2, max_cpu_loras=2, max_num_batched_tokens=64, enable_prefix_caching=True)
    res = run(tr, cfg, kv_tokens=1024)
    assert cached(res) == [0, 32, 0, 32, 16, 0]
    steps = res.steps.to_pydict()
    # The steps count the prefill tokens computed, not those taken from the cache.
    assert sum(steps["prefill_tokens"]) == sum(tr["prompt_tokens"]) - 80 == res.summary["prefill_tokens_computed"]
    assert res.summary["cached_prompt_tokens"] == 80
    # r4's hit block is r0's; its own second block is a new copy: 2 of 63 blocks held.
    assert steps["kv_usage"][steps["prefill_tokens"].index(16)] == pytest.approx(2 / 63)
    off = run(tr, cfg.replace(enable_prefix_caching=False), kv_tokens=1024)
    assert cached(off) == [0] * 6
    assert sum(off.steps.to_pydict()["prefill_tokens"]) == sum(tr["prompt_tokens"])


def test_freed_blocks_stay_cached_and_the_least_recently_freed_go_first() -> None:
    """7 usable blocks; A, B, C, D (33 distinct tokens, 3 blocks each, one at a time)
    leave their two full blocks cached when they finish. D's allocation evicts A's (the
    oldest freed); then B again hits both of its blocks while A again hits nothing."""
    p = {name: [1000 * i + j for j in range(33)] for i, name in enumerate("ABCD", start=1)}
    tr = ids_trace([(0.0, "a", p["A"], 1), (1.0, "a", p["B"], 1), (2.0, "a", p["C"], 1), (3.0, "a", p["D"], 1),
                    (4.0, "a", p["B"], 1), (5.0, "a", p["A"], 1)])  # fmt: skip
    cfg = ServingConfig(max_loras=1, max_num_batched_tokens=64, enable_prefix_caching=True)
    res = run(tr, cfg, kv_tokens=128)
    assert res.summary["num_blocks"] == 7
    assert cached(res) == [0, 0, 0, 0, 32, 0]
    assert res.summary["evicted_cached_units"] >= 2


def test_a_preempted_request_recomputes_only_what_was_evicted() -> None:
    """Two decoding requests outgrow 7 blocks: r1 (the tail) is preempted at 48 computed
    tokens; its three full blocks stay cached; r0's next block evicts r1's deepest one
    (tail first), so r1 resumes on its two prompt blocks and recomputes 17 of 49 tokens."""
    tr = ids_trace([(0.0, None, list(range(1000, 1032)), 40), (0.0, None, list(range(2000, 2032)), 40)])
    cfg = ServingConfig(max_num_batched_tokens=64, enable_prefix_caching=True)
    res = run(tr, cfg, kv_tokens=128)
    assert res.summary["preemptions"] == 1
    steps = res.steps.to_pydict()
    recompute = [p for p, n in zip(steps["prefill_tokens"], steps["prefill_reqs"], strict=True) if n][1:]
    assert recompute == [17]
    assert cached(res) == [0, 0]  # cached_tokens is the hit at the first admission, as vLLM reports it
    off = run(tr, cfg.replace(enable_prefix_caching=False), kv_tokens=128)
    steps_off = off.steps.to_pydict()
    assert [p for p, n in zip(steps_off["prefill_tokens"], steps_off["prefill_reqs"], strict=True) if n][1:] == [49]


def test_full_prompt_admission_waits_for_blocks_for_the_whole_prompt() -> None:
    """9 blocks, budget 32, two 80-token prompts (5 blocks each). Admitting on the first
    chunk lets r1 in beside r0's last chunk and the two thrash (9 preemptions); with
    --scheduler-reserve-full-isl r1 waits until r0 is done, and nothing is preempted."""
    tr = trace([(0.0, None, 80, 20), (0.0, None, 80, 20)])
    first_chunk = run(tr, ServingConfig(max_num_batched_tokens=32), kv_tokens=160)
    full = run(tr, ServingConfig(max_num_batched_tokens=32, scheduler_reserve_full_isl=True), kv_tokens=160)
    assert first_chunk.summary["preemptions"] == 9
    assert full.summary["preemptions"] == 0
    assert first_chunk.steps.to_pydict()["prefill_tokens"][2] == 32  # r0's last 16 + r1's first 16
    assert full.steps.to_pydict()["prefill_tokens"][2] == 16
    assert full.summary["admission_blocked"]["kv_blocks"] > first_chunk.summary["admission_blocked"]["kv_blocks"]


def test_async_scheduling_frees_seats_and_sees_arrivals_one_step_late() -> None:
    # max_num_seqs 2: r0 finishes at step 2; synchronously r2 takes its seat at step 3,
    # with async scheduling at step 4 (step 3 was scheduled while r0 still held it).
    tr = trace([(0.0, None, 4, 3), (0.0, None, 4, 10), (0.0, None, 4, 2)])
    sync = run(tr, ServingConfig(max_num_seqs=2))
    asyn = run(tr, ServingConfig(max_num_seqs=2, async_scheduling=True))
    assert sync.steps.to_pydict()["prefill_reqs"][:5] == [2, 0, 0, 1, 0]
    assert asyn.steps.to_pydict()["prefill_reqs"][:5] == [2, 0, 0, 0, 1]
    assert asyn.steps.to_pydict()["num_running"][3] == 2  # r1 and r0's seat, not yet given back
    # A request arriving during step 1 is admitted at step 2, or at step 3 when step 2
    # was scheduled while step 1 ran.
    tr = trace([(0.0, None, 4, 20), (0.15, None, 4, 2)])
    assert run(tr, ServingConfig()).results.column("first_token_s").to_pylist()[1] == pytest.approx(0.3)
    assert run(tr, ServingConfig(async_scheduling=True)).results.column("first_token_s").to_pylist()[1] == pytest.approx(0.4)
    # With nothing in flight to overlap, an arrival is taken in at once, as without async.
    tr = trace([(0.0, None, 4, 2), (5.0, None, 4, 2)])
    assert run(tr, ServingConfig(async_scheduling=True)).results.column("first_token_s").to_pylist() == pytest.approx([0.1, 5.1])


def test_async_scheduling_overlaps_request_intake_with_execution() -> None:
    """50 ms of intake per request: synchronously each step waits for the intake of the
    requests that arrived during the previous one; with async scheduling the intake runs
    while the step executes, so a 100 ms step absorbs two arrivals."""
    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.uniform(0.0, 10.0, 120))
    tr = trace([(0.0, None, 4, 400)] + [(float(t), None, 4, 1) for t in arrivals])
    cfg = ServingConfig(max_num_seqs=256)
    sync = run(tr, cfg, intake_s=0.05)
    asyn = run(tr, cfg.replace(async_scheduling=True), intake_s=0.05)
    for res, combine in ((sync, lambda gpu, work: gpu + work), (asyn, max)):
        s = pl.from_arrow(res.steps)
        arrived = np.searchsorted(np.concatenate([[0.0], arrivals]), s["t_s"].to_numpy(), side="right")
        charged = np.diff(arrived, prepend=0)
        # The first step follows an idle engine: nothing to overlap, its intake comes first.
        want = [0.1 + 0.05 * charged[0]] + [combine(0.1, 0.05 * c) for c in charged[1:]]
        assert np.allclose(s["duration_s"].to_numpy(), want, atol=1e-12)
    assert asyn.summary["simulated_s"] < sync.summary["simulated_s"]


def test_prefix_hashes_give_the_same_run_as_token_ids() -> None:
    """`prefix_hashes` (tracekit.prefix at the engine's block size) and `prompt_token_ids`
    are two forms of one trace: the twin gives bit-identical results from either."""
    rng = np.random.default_rng(1)
    systems = [rng.integers(1000, 2000, 48).tolist() for _ in range(2)]
    rows = []
    for i in range(60):
        ids = systems[i % 2] + rng.integers(1000, 2000, int(rng.integers(1, 60))).tolist()
        rows.append((0.2 * i, ["a", "b", None][i % 3], ids, int(rng.integers(1, 30))))
    with_ids = ids_trace(rows)
    hashes = [block_hashes(ids, a, 16) for _, a, ids, _ in rows]
    with_hashes = with_ids.drop("prompt_token_ids").with_columns(pl.Series("prefix_hashes", hashes, dtype=pl.List(pl.Int64)))
    cfg = ServingConfig(max_loras=2, max_cpu_loras=2, max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=True)
    a = simulate(with_ids, profile(kv_tokens=2048), cfg, record_steps=True, check_invariants=True)
    b = simulate(with_hashes, profile(kv_tokens=2048), cfg, trace_context={"prefix_block_tokens": 16}, record_steps=True)
    assert a.steps.equals(b.steps)
    assert cached(a) == cached(b) and sum(cached(a)) > 0
    with pytest.raises(Exception, match="prefix_block_tokens"):
        simulate(with_hashes, profile(kv_tokens=2048), cfg)


@pytest.mark.parametrize(("trace_block", "engine_block"), [(16, 16), (32, 16), (64, 16), (16, 32), (24, 16), (16, 24)])
def test_trace_block_size_maps_onto_the_engine_block_size(trace_block: int, engine_block: int) -> None:
    """The stated rule (twin.kv_cache.engine_blocks_covered): the first j trace blocks
    identify the first floor(j * trace_block / block_size) engine blocks. Checked on the
    twin: hashes at `trace_block` over a shared prefix give the hit the rule predicts,
    which is at most the hit of the token ids at the engine's block size."""
    shared = list(range(1000, 1000 + 7 * 48))  # 336 shared tokens
    prompts = [shared + [1, 2, 3], shared + list(range(5000, 5000 + 50))]
    rows = [(float(i), "a", ids, 2) for i, ids in enumerate(prompts)]
    cfg = ServingConfig(block_size=engine_block, max_num_batched_tokens=1024, enable_prefix_caching=True)
    hashes = [block_hashes(ids, "a", trace_block) for ids in prompts]
    tr = ids_trace(rows).drop("prompt_token_ids").with_columns(pl.Series("prefix_hashes", hashes, dtype=pl.List(pl.Int64)))
    res = run_ctx(tr, cfg, {"prefix_block_tokens": trace_block})
    common_trace_blocks = len(shared) // trace_block  # the blocks whose hashes the two prompts share
    engine_hit = int(engine_blocks_covered(common_trace_blocks, trace_block, engine_block))
    assert cached(res)[1] == engine_hit * engine_block
    exact = run(ids_trace(rows), cfg, kv_tokens=8192)
    assert cached(res)[1] <= cached(exact)[1] == (len(shared) // engine_block) * engine_block
    assert int(engine_blocks_covered(3, 512, 16)) == 96 and int(engine_blocks_covered(3, 16, 32)) == 1


def run_ctx(tr: pl.DataFrame, cfg: ServingConfig, ctx: dict[str, Any]) -> Any:
    res = simulate(tr, profile(kv_tokens=8192), cfg, trace_context=ctx, record_steps=True, check_invariants=True)
    return res


def test_admission_blocked_counts_the_limit_that_ended_the_waiting_scan() -> None:
    # max_num_seqs 1: r1 waits through r0's 5 steps, all counted for max_num_seqs.
    tr = trace([(0.0, None, 4, 5), (0.0, None, 4, 30)])
    res = run(tr, ServingConfig(max_num_seqs=1))
    assert res.summary["admission_blocked"] == {"max_num_batched_tokens": 0, "max_num_seqs": 5, "kv_blocks": 0, "max_loras": 0}
    # max_loras 1: b waits while a runs (including the decode-only stretch, fast-forwarded).
    tr = trace([(0.0, "a", 4, 40), (0.0, "b", 4, 2)])
    res = run(tr, ServingConfig(max_loras=1, max_cpu_loras=2))
    assert res.summary["admission_blocked"]["max_loras"] == 40 and res.summary["fast_forward_steps"] > 0
    # A long prompt takes the whole budget for 3 steps; then the decodes leave room.
    tr = trace([(0.0, None, 96, 2), (0.0, None, 4, 2)])
    res = run(tr, ServingConfig(max_num_batched_tokens=32))
    assert res.summary["admission_blocked"]["max_num_batched_tokens"] == 3
    # No room for the second request's blocks until the first is done.
    tr = trace([(0.0, None, 40, 20), (0.0, None, 40, 20)])
    res = run(tr, ServingConfig(), kv_tokens=80)
    assert res.summary["admission_blocked"]["kv_blocks"] == 20


def test_an_imported_mooncake_trace_hits_in_its_512_token_blocks(tmp_path: Any) -> None:
    """`tracekit import mooncake` writes hash_ids as prefix_hashes; the twin maps each
    512-token block onto 32 engine blocks and hits whole shared blocks: request 1 shares
    12 blocks with request 0, request 2 shares 13, request 3 shares 12."""
    from pathlib import Path

    from tracekit.importers import import_trace
    from twin.profile import load_profile

    df, ctx, _ = import_trace("mooncake", Path(__file__).parent / "data" / "mooncake_sample.jsonl", adapters=0)
    prof = load_profile("h100-llama-3.1-8b")
    cfg = ServingConfig.for_profile(prof, enable_prefix_caching=True, enable_lora=False)
    res = simulate(df, prof, cfg, trace_context=ctx, window_s=600.0, check_invariants=True)
    assert cached(res) == [0, 12 * 512, 13 * 512, 12 * 512, 0, 0, 0, 0]
    off = simulate(df, prof, cfg.replace(enable_prefix_caching=False), trace_context=ctx, window_s=600.0)
    assert off.summary["prefill_tokens_computed"] - res.summary["prefill_tokens_computed"] == 37 * 512
