"""The twin's scheduler and engine on hand-checkable scenarios, and `twin run`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner

from tracekit import schema
from twin import engine
from twin import scheduler as sched_mod
from twin.api import ServingConfig
from twin.cli import main
from twin.engine import simulate
from twin.profile import Profile


def profile(
    kv_tokens: int = 4096, step_s: float = 0.1, load_ms: float = 0.0, intake_s: float = 0.0, **coef: float
) -> Profile:
    return Profile.from_dict(
        {
            "name": "test",
            "memory": {"kind": "fixed", "kv_tokens": kv_tokens},
            "step_time": {"kind": "linear", "intercept_s": step_s, "coef": coef},
            "adapter_load": {"base_ms": load_ms, "per_rank_ms": 0.0},
            "request_intake": {"s_per_request": intake_s},
        }
    )


def trace(rows: list[tuple[float, str | None, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(len(rows))],
            "arrival_s": [float(r[0]) for r in rows],
            "adapter": [r[1] for r in rows],
            "prompt_tokens": [r[2] for r in rows],
            "output_tokens": [r[3] for r in rows],
        },
        schema={"request_id": pl.String, "arrival_s": pl.Float64, "adapter": pl.String,
                "prompt_tokens": pl.Int32, "output_tokens": pl.Int32},
    )


def by_id(res) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {row["request_id"]: row for row in res.results.to_pylist()}


def test_chunked_prefill_and_adapter_load_exact_steps() -> None:
    # r0: 20-token prompt, budget 16 -> chunks of 16 then 4; r1 arrives during step 0 and
    # joins step 1 with its whole 10-token prompt. The first step loads adapter `a` from
    # disk (CPU miss): 3 x 50 ms on top of the 100 ms step.
    tr = trace([(0.0, "a", 20, 3), (0.05, "a", 10, 2)])
    cfg = ServingConfig(max_loras=1, max_num_batched_tokens=16, max_lora_rank=8)
    res = simulate(tr, profile(kv_tokens=64, load_ms=50.0), cfg, record_steps=True, check_invariants=True)
    assert res.summary["num_blocks"] == 3  # 64 tokens = 4 blocks, one is vLLM's null block
    steps = res.steps.to_pydict()
    assert steps["prefill_tokens"] == [16, 14, 0, 0]
    assert steps["prefill_reqs"] == [1, 2, 0, 0]
    assert steps["decode_tokens"] == [0, 0, 2, 1]
    # As vLLM's step plugin reads them: right after schedule(), before finishes free.
    assert steps["num_running"] == [1, 2, 2, 1]
    assert steps["adapter_loads"] == [1, 0, 0, 0]
    assert steps["loaded_adapters"] == [["a"], [], [], []]
    assert steps["active_adapters"] == [["a"]] * 4
    assert steps["duration_s"] == pytest.approx([0.25, 0.1, 0.1, 0.1])
    assert steps["context_tokens"] == [16, 30, 32, 22]
    r = by_id(res)
    assert r["r0"]["first_token_s"] == pytest.approx(0.35) and r["r0"]["end_s"] == pytest.approx(0.55)
    assert r["r1"]["first_token_s"] == pytest.approx(0.35) and r["r1"]["end_s"] == pytest.approx(0.45)
    assert r["r1"]["ttft_s"] == pytest.approx(0.30)
    assert r["r0"]["tpot_s"] == pytest.approx(0.1)
    assert [r[k]["status"] for k in ("r0", "r1")] == ["ok", "ok"]
    assert res.summary["completed"] == 2 and res.summary["steps"] == 4


def test_preemption_by_recompute_from_the_tail() -> None:
    # Two blocks of KV (plus vLLM's null block). Both 16-token prompts fit; at step 1 r0's first decode needs a
    # new block: r1 (the tail) is preempted, goes back to waiting, and is recomputed
    # (16 prompt + 1 generated = 17 tokens, 2 blocks) once r0 finishes.
    tr = trace([(0.0, None, 16, 3), (0.0, None, 16, 3)])
    cfg = ServingConfig(max_num_batched_tokens=64)
    res = simulate(tr, profile(kv_tokens=48), cfg, record_steps=True, check_invariants=True)
    steps = res.steps.to_pydict()
    assert steps["num_preempted"] == [1 if i == 1 else 0 for i in range(5)]
    assert steps["prefill_tokens"] == [32, 0, 0, 17, 0]
    assert steps["decode_tokens"] == [0, 1, 1, 0, 1]
    assert steps["num_waiting"] == [0, 1, 1, 0, 0]
    assert steps["kv_usage"] == [1.0] * 5  # after schedule(): r0 holds both blocks until step 2 ends
    r = by_id(res)
    assert r["r1"]["first_token_s"] == pytest.approx(0.1)  # its first token came before the preemption
    assert r["r1"]["end_s"] == pytest.approx(0.5)
    assert r["r1"]["generated_tokens"] == 3
    assert res.summary["preemptions"] == 1


def test_max_loras_skips_waiting_request_and_keeps_its_place() -> None:
    # max_loras=1: b's request is skipped while a runs; the later a request is admitted
    # ahead of it; b goes in once a's requests are done.
    tr = trace([(0.0, "a", 4, 2), (0.0, "b", 4, 2), (0.0, "a", 4, 2)])
    cfg = ServingConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=8)
    res = simulate(tr, profile(), cfg, record_steps=True, check_invariants=True)
    steps = res.steps.to_pydict()
    assert steps["active_adapters"] == [["a"], ["a"], ["b"], ["b"]]
    assert steps["prefill_reqs"] == [2, 0, 1, 0]
    r = by_id(res)
    assert r["r2"]["end_s"] < r["r1"]["first_token_s"]


def test_gpu_slots_and_cpu_cache_are_lru() -> None:
    # One GPU slot, two CPU slots, adapters used a, b, a, c, a: loads a(disk) b(disk)
    # a(CPU hit) c(disk, evicts b from CPU) a(CPU hit) -> costs 3,3,1,3,1 x 10 ms.
    rows = [(float(i), name, 4, 1) for i, name in enumerate("abaca")]
    cfg = ServingConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=8)
    res = simulate(trace(rows), profile(load_ms=10.0), cfg, record_steps=True, check_invariants=True)
    steps = res.steps.to_pydict()
    assert steps["adapter_load_s"] == pytest.approx([0.03, 0.03, 0.01, 0.03, 0.01])
    assert res.summary["adapter_loads"] == 5


def test_window_makes_requests_unfinished_and_oom() -> None:
    tr = trace([(0.0, None, 8, 50), (0.0, None, 8, 2), (9.0, None, 8, 2)])
    res = simulate(tr, profile(), ServingConfig(), window_s=1.0, check_invariants=True)
    r = by_id(res)
    assert r["r0"]["status"] == "unfinished" and r["r0"]["end_s"] is None
    assert 0 < r["r0"]["generated_tokens"] < 50
    assert r["r1"]["status"] == "ok"
    assert r["r2"]["status"] == "unfinished" and r["r2"]["dispatch_s"] is None
    oom = simulate(tr, profile(kv_tokens=0), ServingConfig())
    assert oom.summary["oom"] is True
    assert set(oom.results.column("status").to_pylist()) == {"unfinished"}


def test_request_longer_than_kv_is_an_error_not_a_deadlock() -> None:
    tr = trace([(0.0, None, 100, 10), (0.0, None, 8, 2)])
    res = simulate(tr, profile(kv_tokens=64), ServingConfig(), check_invariants=True)
    r = by_id(res)
    assert r["r0"]["status"] == "error" and "exceed" in r["r0"]["error"]
    assert r["r1"]["status"] == "ok"


def random_trace(seed: int, n: int = 300, adapters: int = 6) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    names = [f"lora-{i}" for i in range(adapters)] + [None]
    return trace(
        [
            (float(t), names[int(a)], int(p), int(o))
            for t, a, p, o in zip(
                np.sort(rng.uniform(0, 15, n)), rng.integers(0, adapters + 1, n),
                rng.integers(1, 400, n), rng.integers(1, 300, n), strict=True,
            )
        ]
    )


LINEAR = {"prefill_tokens": 1e-4, "decode_tokens": 2e-4, "context_tokens": 1e-7, "num_adapters": 1e-3, "rank_sum": 1e-5}


@pytest.mark.parametrize("seed,intake_s", [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.002), (4, 0.02)])
def test_fast_forward_and_vectorized_preemption_are_bit_identical(
    seed: int, intake_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = random_trace(seed)
    prof = profile(kv_tokens=3000, step_s=0.01, load_ms=5.0, intake_s=intake_s, **LINEAR)
    cfg = ServingConfig(max_loras=3, max_cpu_loras=4, max_num_seqs=24, max_num_batched_tokens=256, max_lora_rank=16)
    fast = simulate(tr, prof, cfg, record_steps=True, check_invariants=True)
    plain = simulate(tr, prof, cfg, record_steps=True, fast_forward=False)
    monkeypatch.setattr(sched_mod, "FAST_PREEMPT_MIN_RUNNING", 10**9)
    loop = simulate(tr, prof, cfg, record_steps=True, fast_forward=False)
    assert fast.summary["fast_forward_steps"] > 0 and fast.summary["preemptions"] > 0
    for other in (plain, loop):
        assert fast.results.equals(other.results)
        assert fast.steps.equals(other.steps)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_budget_cut_running_loop_in_closed_form_is_bit_identical(
    prefix_caching: bool, monkeypatch: pytest.MonkeyPatch, on_source_twin: bool
) -> None:
    # Long prompts chunked behind many decodes: the token budget cuts the running loop
    # most steps, which `_schedule_budget_cut` schedules in closed form; vLLM's loop
    # request by request must give the same schedule (KV invariants checked every step).
    if on_source_twin:
        return  # the spy below needs the source; it ran there
    rng = np.random.default_rng(7)
    n = 200
    tr = trace([(float(t), f"lora-{a}", int(p), int(o)) for t, a, p, o in zip(
        np.sort(rng.uniform(0, 20, n)), rng.integers(0, 4, n), rng.integers(200, 900, n), rng.integers(20, 200, n),
        strict=True)])  # fmt: skip
    # Prefix sharing as Mooncake writes it: a few system prompts of 16-token blocks, then
    # blocks of the request's own (ids: one per distinct prefix block).
    sys_blocks = rng.integers(2, 12, 3)
    hashes = [[int(s) * 100 + j for j in range(min(int(sys_blocks[s]), p // 16))]
              + [10_000 + i * 100 + j for j in range(p // 16 - min(int(sys_blocks[s]), p // 16))]
              for i, (s, p) in enumerate(zip(rng.integers(0, 3, n), tr["prompt_tokens"].to_list(), strict=True))]
    tr = tr.with_columns(prefix_hashes=pl.Series(hashes, dtype=pl.List(pl.Int64)))
    ctx = {"prefix_block_tokens": 16}
    prof = profile(kv_tokens=12000, step_s=0.01, **LINEAR)
    cfg = ServingConfig(max_loras=2, max_cpu_loras=4, max_num_seqs=64, max_num_batched_tokens=256, max_lora_rank=16,
                        enable_prefix_caching=prefix_caching)  # fmt: skip
    taken = []
    cut = sched_mod.Scheduler._schedule_budget_cut

    def spy(self: sched_mod.Scheduler, step: int, plan: sched_mod.StepPlan) -> int | None:
        left = cut(self, step, plan)
        taken.append(left is not None)
        return left

    monkeypatch.setattr(sched_mod.Scheduler, "_schedule_budget_cut", spy)
    fast = simulate(tr, prof, cfg, trace_context=ctx, record_steps=True, check_invariants=True)
    assert sum(taken) > 100 and not all(taken)  # both ways are taken
    if prefix_caching:
        assert fast.summary["cached_prompt_tokens"] > 0
    monkeypatch.setattr(sched_mod, "FAST_PREEMPT_MIN_RUNNING", 10**9)
    loop = simulate(tr, prof, cfg, trace_context=ctx, record_steps=True, fast_forward=False)
    assert fast.results.equals(loop.results)
    assert fast.steps.equals(loop.steps)


def test_twin_run_cli_writes_results_and_steps(tmp_path: Path) -> None:
    tr = random_trace(5, n=120)
    ctx = {"adapters": {f"lora-{i}": {"rank": 8 if i % 2 else 16} for i in range(6)}, "window_s": 10.0}
    schema.write(tmp_path / "t.parquet", tr, "trace", ctx)
    prof = profile(kv_tokens=3000, step_s=0.01, **LINEAR)
    prof.save(tmp_path / "p.json")
    args = ["run", str(tmp_path / "t.parquet"), "--profile", str(tmp_path / "p.json"), "--max-loras", "2",
            "--max-cpu-loras", "4", "--out", str(tmp_path / "r.parquet"), "--steps-out", str(tmp_path / "s.parquet")]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "throughput" in out.output and "starving" in out.output
    res, meta = schema.read(tmp_path / "r.parquet", "results")
    assert res.height == 120 and meta.context["target"] == "twin"
    assert meta.context["serving_config"]["max_lora_rank"] == 16  # largest rank of the trace
    assert meta.context["window_s"] == 10.0
    steps, _ = schema.read(tmp_path / "s.parquet", "steps")
    assert steps.height > 0
    js = CliRunner().invoke(main, [*args, "--json"])
    assert js.exit_code == 0
    assert json.loads(js.output)["requests"] == 120


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras (2) must be >= --max-loras (4)"),
        (["--max-lora-rank", "8"], "rank 16 > --max-lora-rank 8"),
        (["--window", "-1"], "--window must be positive"),
    ],
)
def test_twin_run_bad_input_is_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    tr = random_trace(1, n=10)
    schema.write(tmp_path / "t.parquet", tr, "trace", {"adapters": {f"lora-{i}": {"rank": 16} for i in range(6)}})
    profile().save(tmp_path / "p.json")
    out = CliRunner().invoke(main, ["run", str(tmp_path / "t.parquet"), "--profile", str(tmp_path / "p.json"),
                                    "--out", str(tmp_path / "r.parquet"), *extra])
    assert out.exit_code == 2
    assert message in out.output and "Traceback" not in out.output


def test_twin_run_missing_profile_and_oom(tmp_path: Path) -> None:
    schema.write(tmp_path / "t.parquet", random_trace(1, n=10), "trace", {})
    out = CliRunner().invoke(main, ["run", str(tmp_path / "t.parquet"), "--profile", "no-such-profile",
                                    "--out", str(tmp_path / "r.parquet")])
    assert out.exit_code == 2 and "no-such-profile" in out.output
    profile(kv_tokens=0).save(tmp_path / "oom.json")
    out = CliRunner().invoke(main, ["run", str(tmp_path / "t.parquet"), "--profile", str(tmp_path / "oom.json"),
                                    "--out", str(tmp_path / "r.parquet")])
    assert out.exit_code == 0 and "OOM" in out.output


def test_itl_percentiles_without_materialising_gaps() -> None:
    # tracekit.metrics computes ITL statistics from (mean gap, gaps) pairs; they must
    # equal numpy's on the repeated array it replaced.
    from tracekit.metrics import _pcts, itl_values, summarize

    rng = np.random.default_rng(3)
    n = 500
    ok = pl.DataFrame({
        "request_id": [str(i) for i in range(n)], "arrival_s": np.zeros(n), "adapter": [None] * n,
        "prompt_tokens": np.ones(n, dtype=np.int32), "output_tokens": rng.integers(1, 50, n).astype(np.int32),
        "status": ["ok"] * n, "dispatch_s": np.zeros(n), "first_token_s": np.ones(n), "end_s": np.full(n, 2.0),
        "generated_tokens": rng.integers(1, 50, n).astype(np.int32), "ttft_s": np.ones(n), "e2e_s": np.full(n, 2.0),
        "tpot_s": np.round(rng.uniform(0.01, 0.05, n), 3),  # ties on purpose
    })
    want: dict = {}
    _pcts(itl_values(ok), 1e3, "itl", want)
    got = summarize(ok, {"window_s": 10.0})
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_decodes_cut_by_the_token_budget_wait_and_resume() -> None:
    # In the twin (as in vLLM without long-prefill limits) running requests never exceed
    # the token budget, so this path is reached by shrinking the budget mid-run: the
    # decode the budget does not reach must not advance, then finish one step later.
    s = sched_mod.Scheduler(
        prompt=[4, 4, 4], output=[4, 4, 4], adapter_idx=np.full(3, sched_mod.BASE), valid=np.ones(3, dtype=bool),
        adapter_rank=[], adapter_load_s=[], cpu_miss_factor=2.0, max_loras=1, max_cpu_loras=1,
        max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_blocks=100,
    )
    plan = s.schedule(0, 3)
    s.update(0, plan)
    assert [s.generated(r, 1) for r in range(3)] == [1, 1, 1]
    s.max_num_batched_tokens = 2
    for step in range(1, 7):
        plan = s.schedule(step, 3)
        assert plan.num_decodes + plan.prefill_tokens <= 2
        s.update(step, plan)
        s.check_invariants(step, plan)
        if step == 1:
            assert plan.unscheduled_decodes == 1
            assert [s.generated(r, 2) for r in range(3)] == [2, 2, 1]
    assert s.end_step[:2].tolist() == [3, 3]  # r0, r1: tokens 2, 3, 4 at steps 1-3
    assert s.end_step[2] == 6  # r2 waited through steps 1-3, then decoded at 4-6
    assert s.used_blocks == 0 and not s.running


def test_request_intake_is_charged_to_the_step_after_each_arrival() -> None:
    """With a request-intake cost, every step lasts its batch's step time plus the cost
    of the requests that arrived since the previous step started, fast-forward or not;
    every arrival before the last step's start is charged exactly once."""
    rng = np.random.default_rng(7)
    n = 400
    # Long decodes and steady arrivals: decode-only stretches that arrivals cut into.
    tr = trace([(float(t), "a", 8, int(o)) for t, o in zip(np.sort(rng.uniform(0, 20, n)), rng.integers(50, 200, n), strict=True)])
    cfg = ServingConfig(max_loras=1, max_cpu_loras=1, max_num_seqs=4, max_num_batched_tokens=64, max_lora_rank=8)
    c = 0.003
    res = simulate(tr, profile(kv_tokens=1 << 20, step_s=0.01, intake_s=c), cfg, record_steps=True)
    base = simulate(tr, profile(kv_tokens=1 << 20, step_s=0.01), cfg, record_steps=True)
    assert res.summary["fast_forward_steps"] > 0
    st = pl.from_arrow(res.steps)
    starts = st["t_s"].to_numpy()
    arrival = np.sort(tr["arrival_s"].to_numpy())
    arrived = np.searchsorted(arrival, starts, side="right")
    charged = np.diff(arrived, prepend=0)
    assert charged.sum() == arrived[-1] and charged.max() >= 1
    assert np.allclose(st["duration_s"].to_numpy(), 0.01 + c * charged, rtol=0, atol=1e-12)
    # Intake makes the same work take longer.
    assert res.summary["simulated_s"] > base.summary["simulated_s"]


def test_string_columns_from_codes_match_arrow() -> None:
    # The results' string columns are built from codes with numpy (`engine._strings`):
    # equal and unequal label lengths, empty labels, nulls, and labels too long for the
    # fixed-width table (Arrow's cast) must all give Arrow's own strings.
    rng = np.random.default_rng(3)
    n = 5000
    for labels in (["ok", "unfinished", "error"], ["twin"], ["a", "", "ccc"], ["lora-01", "lora-02"], ["x" * 3000, "y"]):
        for with_null in (False, True):
            codes = rng.integers(0, len(labels), n).astype(np.int8)
            null = rng.random(n) < 0.3 if with_null else None
            got = engine._strings(codes, labels, null)
            got.validate(full=True)
            want = pa.array([None if null is not None and null[i] else labels[codes[i]] for i in range(n)], pa.string())
            assert got.equals(want), (labels, with_null)
    assert engine._strings(np.zeros(3, np.int8), [], np.ones(3, bool)).null_count == 3
    col = pa.chunked_array([pa.array(["b", None, "a"]).dictionary_encode(), pa.array(["c", "a"]).dictionary_encode()])
    assert engine._decoded(col).to_pylist() == ["b", None, "a", "c", "a"]
