"""The fleet twin: plans, routers, static per-GPU runs (same bits however split), and
`twin run --fleet` with its bad-input errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from tracekit import parallel, schema
from tracekit.metrics import adapter_service, summarize
from tracekit.synth import synthesize
from twin.api import ServingConfig
from twin.cli import main as twin_main
from twin.engine import simulate
from twin.fleet import SUMMARY_KEYS, WORKER_MODULES, run_alone, simulate_fleet
from twin.fleet_plan import FleetPlan, resolve
from twin.profile import load_profile
from twin.routing import Router

PROFILE = "h100-llama-3.1-8b"


@pytest.fixture(scope="module")
def small_trace() -> tuple[pl.DataFrame, dict]:
    # 12 adapters of ranks 8/16, Zipf popularity, bursty: 2 minutes at ~60 req/s.
    df, ctx = synthesize(adapters=12, rates=None, total_rate=60.0, popularity="zipf:1.0", arrivals="gamma:2",
                         ranks=[8, 16], duration_s=120.0, seed=3)
    return df, ctx


def plan_of(groups: list[list[str]], **settings) -> FleetPlan:  # type: ignore[no-untyped-def]
    return FleetPlan.from_dict({"gpus": [{"adapters": g, **settings} for g in groups]})


def split(names: list[str], k: int) -> list[list[str]]:
    return [names[i::k] for i in range(k)]


def test_static_placement_is_each_gpus_own_twin_run(small_trace) -> None:  # type: ignore[no-untyped-def]
    df, ctx = small_trace
    names = sorted(df["adapter"].unique().to_list())
    plan = plan_of(split(names, 3), max_loras=2, max_num_seqs=64)
    prof = load_profile(PROFILE)
    res = simulate_fleet(df, prof, plan, "placement", trace_context=ctx, jobs=1)
    assert res.summary["static"] and res.results.num_rows == df.height
    out = pl.from_arrow(res.results)
    # Rows in the trace's order, each on the GPU that lists its adapter.
    assert out["request_id"].to_list() == df.sort("arrival_s", maintain_order=True)["request_id"].to_list()
    where = {a: f"gpu-{i:02d}" for i, g in enumerate(split(names, 3)) for a in g}
    assert out["replica"].to_list() == [where[a] for a in out["adapter"].to_list()]
    fleet = resolve(plan, prof, names, schema.adapter_ranks(ctx), "placement")
    for g, gpu in enumerate(plan.gpus):
        sub = df.filter(pl.col("adapter").is_in(list(gpu.adapters)))
        alone = simulate(sub, prof, fleet.configs[g], trace_context=ctx)
        import pyarrow.compute as pc

        mine = res.results.filter(pc.equal(res.results["replica"], gpu.name)).drop_columns(["replica"])
        assert mine.equals(alone.results)
        row = res.summary["gpus"][g]
        assert row["throughput_tok_s"] == pytest.approx(alone.summary["throughput_tok_s"], rel=1e-12)
        assert row["max_lora_rank"] == max(schema.adapter_ranks(ctx)[a] for a in gpu.adapters)
        assert row["max_cpu_loras"] == len(gpu.adapters)  # a plan deploys its adapters
    whole = summarize(pl.from_arrow(res.results), res.context)
    assert res.summary["fleet"]["throughput_tok_s"] == pytest.approx(whole["throughput_tok_s"])


def test_a_gpu_alone_is_judged_as_in_the_fleet(small_trace) -> None:  # type: ignore[no-untyped-def]
    """Static placement: a GPU's starving adapters are judged over its own tail (its mean
    ITL), so its verdict run alone (what `predictor plan` screens) is the fleet's."""
    df, ctx = small_trace
    names = sorted(df["adapter"].unique().to_list())
    # Few slots and seats on a busy trace: some adapters starve, at different ITLs per GPU.
    plan = plan_of(split(names, 3), max_loras=1, max_num_seqs=8)
    prof = load_profile(PROFILE)
    ctx = dict(ctx, window_s=120.0)
    res = simulate_fleet(df, prof, plan, "placement", trace_context=ctx, jobs=1)
    rows = res.summary["gpus"]
    assert len({round(r["judged_tail_s"], 6) for r in rows}) > 1  # the GPUs' tails differ
    assert res.summary["fleet"]["starving_adapters"] == sum(r["starving_adapters"] for r in rows) > 0
    fleet = resolve(plan, prof, names, schema.adapter_ranks(ctx), "placement")
    ordered = df.sort("arrival_s", maintain_order=True)
    longest = int(df["output_tokens"].max())
    for g, gpu in enumerate(plan.gpus):
        sub = ordered.filter(pl.col("adapter").is_in(list(gpu.adapters)))
        part, alone = run_alone(gpu, sub, prof, fleet.configs[g], fleet.kv_capacity_tokens[g], ctx, 120.0, True, longest)
        a, f = alone["gpus"][0], rows[g]
        for k in ("starving_adapters", "min_adapter_served_frac", "judged_tail_s", *SUMMARY_KEYS):
            assert a[k] == pytest.approx(f[k], rel=1e-12), k
        assert alone["fleet"]["starving_adapters"] == f["starving_adapters"]
        # Alone, the GPU's metrics are its run's own summary (not made again): the fleet's.
        assert {k: alone["fleet"][k] for k in SUMMARY_KEYS} == {k: part[1][k] for k in SUMMARY_KEYS}
        assert {k: part[1][k] for k in SUMMARY_KEYS} == {k: summarize(pl.from_arrow(part[0]), ctx)[k] for k in SUMMARY_KEYS}


def test_a_gpus_judged_metrics_are_kept_with_its_run(small_trace, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A GPU judged alone (`run_alone`, a planner's screening) keeps its metrics with its
    run: a fleet that reuses the run gives the summary the fleet computes afresh, without
    summarising that GPU's requests again."""
    import twin.fleet as tf
    from twin.fleet import JUDGED_MEMO, gpu_key

    df, ctx = small_trace
    names = sorted(df["adapter"].unique().to_list())
    plan = plan_of(split(names, 3), max_loras=1, max_num_seqs=8)
    prof = load_profile(PROFILE)
    ctx = dict(ctx, window_s=120.0)
    fresh = simulate_fleet(df, prof, plan, "placement", trace_context=ctx, jobs=1).summary
    fleet = resolve(plan, prof, names, schema.adapter_ranks(ctx), "placement")
    ordered = df.sort("arrival_s", maintain_order=True)
    longest = int(df["output_tokens"].max())
    cache = {}
    for g, gpu in enumerate(plan.gpus):
        sub = ordered.filter(pl.col("adapter").is_in(list(gpu.adapters)))
        part, _ = run_alone(gpu, sub, prof, fleet.configs[g], fleet.kv_capacity_tokens[g], ctx, 120.0, True, longest)
        assert JUDGED_MEMO in part[1]
        cache[gpu_key(gpu.adapters, fleet.configs[g], 120.0, False, True)] = part
    calls = []
    monkeypatch.setattr(tf, "summarize", lambda *a, **k: calls.append(1) or summarize(*a, **k))
    reused = simulate_fleet(df, prof, plan, "placement", trace_context=ctx, jobs=1, cache=cache).summary
    assert len(calls) == 1  # the fleet's own rows only
    run_facts = ("twin_wall_s", "pid", "peak_rss_mib", "engine_loop_s")  # of each GPU's run: another run here
    for a, b in zip(reused["gpus"], fresh["gpus"], strict=True):
        diff = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if k not in run_facts and a.get(k) != b.get(k)}
        assert not diff, diff
    assert reused["fleet"] == fresh["fleet"]


@pytest.mark.parametrize("shared", [False, True])
def test_a_summary_only_fleet_run_gives_the_full_runs_summary(small_trace, shared) -> None:  # type: ignore[no-untyped-def]
    """`results=False` (a planner's check) summarises the GPUs' rows as they come, not in
    the trace's order: every GPU's metrics and the fleet's counts and percentiles are
    the ordered table's; a fleet-wide mean may differ in its last digits. Static, and with
    the busiest adapter on two GPUs (co-simulated)."""
    df, ctx = small_trace
    names = df["adapter"].value_counts(sort=True)["adapter"].to_list()
    groups = split(names, 3)
    if shared:
        groups[1] = [*groups[1], names[0]]
    plan = plan_of(groups, max_loras=1, max_num_seqs=8)
    prof = load_profile(PROFILE)
    ctx = dict(ctx, window_s=120.0)
    full = simulate_fleet(df, prof, plan, "placement", trace_context=ctx, jobs=1)
    brief = simulate_fleet(df, prof, plan, "placement", trace_context=ctx, jobs=1, results=False)
    assert brief.results is None and full.results is not None
    assert full.summary["static"] is not shared and full.summary["fleet"]["starving_adapters"] > 0
    run_facts = ("twin_wall_s", "pid", "peak_rss_mib", "engine_loop_s", "fleet_wall_s")
    for a, b in zip(brief.summary["gpus"], full.summary["gpus"], strict=True):
        assert {k: v for k, v in a.items() if k not in run_facts} == {k: v for k, v in b.items() if k not in run_facts}
    fa, fb = brief.summary["fleet"], full.summary["fleet"]
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fb[k], float):
            assert fa[k] == pytest.approx(fb[k], rel=1e-12), k
        else:
            assert fa[k] == fb[k], k


def test_split_does_not_change_a_bit(small_trace) -> None:  # type: ignore[no-untyped-def]
    df, ctx = small_trace
    names = sorted(df["adapter"].unique().to_list())
    plan = plan_of(split(names, 4), max_loras=2)
    one = simulate_fleet(df, PROFILE, plan, trace_context=ctx, jobs=1)
    # A fresh pool: this process runs GPUs itself while the workers start.
    two = simulate_fleet(df, PROFILE, plan, trace_context=ctx, jobs=2)
    assert one.results.equals(two.results)
    with parallel.Pool("local", 2) as pool:
        pool.start(WORKER_MODULES, wait=True)  # workers up: every GPU goes to them
        up = simulate_fleet(df, PROFILE, plan, trace_context=ctx, jobs=2, pool=pool)
    assert one.results.equals(up.results)
    pids = {g["pid"] for g in up.summary["gpus"]}
    # Worker processes only (one of the two may take every GPU: these runs take
    # milliseconds, and the pool waits for the first worker to be up, not both).
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    rr1 = simulate_fleet(df, PROFILE, plan, "round-robin", trace_context=ctx, jobs=1)
    rep = pl.from_arrow(rr1.results)["replica"].to_list()
    assert rep == [f"gpu-{i % 4:02d}" for i in range(df.height)]


def test_a_helping_pool_runs_every_task_once() -> None:
    # This process takes tasks while the workers start, the workers the rest: each once.
    with parallel.Pool("local", 2) as pool:
        got = list(pool.run(parallel.import_modules, [(("json",),)] * 8, help=True, warm=("json",)))
    assert sorted(i for i, _ in got) == list(range(8))
    assert os.getpid() in {pid for _, pid in got}  # the first ran here, before any worker was up


@pytest.mark.slow
def test_ray_gives_the_same_results(small_trace) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ray", reason="Ray not installed (pip install 'lora-tracekit[ray]')")
    df, ctx = small_trace
    names = sorted(df["adapter"].unique().to_list())
    plan = plan_of(split(names, 3), max_loras=2)
    local = simulate_fleet(df, PROFILE, plan, trace_context=ctx, jobs=1)
    ray = simulate_fleet(df, PROFILE, plan, trace_context=ctx, executor="ray", jobs=2)
    assert ray.summary["executor"] == "ray"
    assert local.results.equals(ray.results)


class FakeState:
    """Replica state as a router sees it: outstanding counts and resident adapters."""

    def __init__(self, outstanding: list[int], resident: list[set[str]]):
        self.out = outstanding
        self.res = resident

    def outstanding(self, r: int) -> int:
        return self.out[r]

    def holds(self, r: int, adapter: str | None) -> bool:
        return adapter in self.res[r]


def test_routers_pick_by_their_rule() -> None:
    placement = {"a": [0, 2], "b": [1]}
    st = FakeState([3, 0, 1], [{"b"}, set(), {"a"}])
    assert Router("placement", 3, placement).route("a", st) == 2  # fewest outstanding of 0 and 2
    assert Router("placement", 3, placement).route("b", st) == 1
    assert Router("least-loaded", 3, placement).route("a", st) == 1  # ignores the placement
    aff = Router("adapter-affinity", 3, placement)
    assert aff.route("b", st) == 0  # held by GPU 0, though it is the busiest
    assert aff.route("c", st) == 1  # held nowhere: the least loaded
    # Ties go round: an idle fleet is served in turn.
    idle = FakeState([0, 0, 0], [set(), set(), set()])
    ll = Router("least-loaded", 3, {})
    assert [ll.route("x", idle) for _ in range(5)] == [0, 1, 2, 0, 1]
    rr = Router("round-robin", 3, {})
    assert [rr.route("x", st) for _ in range(4)] == [0, 1, 2, 0]
    assert Router("placement", 3, placement).is_static(["b"]) and not Router("placement", 3, placement).is_static(["a"])
    assert not Router("least-loaded", 3, {}).is_static(["a"]) and Router("round-robin", 3, {}).is_static(["a"])


def test_adapter_service_adds_up_to_the_summary(small_trace) -> None:  # type: ignore[no-untyped-def]
    df, ctx = small_trace
    res = simulate(df, PROFILE, ServingConfig.for_profile(load_profile(PROFILE), max_loras=2, max_cpu_loras=12,
                                                          max_lora_rank=16, max_num_seqs=16), trace_context=ctx)
    out = pl.from_arrow(res.results)
    svc = adapter_service(out, res.context)
    assert svc.height == 12
    assert svc["throughput_tok_s"].sum() == pytest.approx(res.summary["throughput_tok_s"])
    assert svc["offered_tok_s"].sum() == pytest.approx(res.summary["offered_tok_s"])
    assert (svc["starved"] == (svc["served_frac"] < 0.9)).all()


def write_trace(tmp_path: Path, small_trace) -> Path:  # type: ignore[no-untyped-def]
    df, ctx = small_trace
    return schema.write(tmp_path / "trace.parquet", df, "trace", ctx)


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(twin_main, list(args))
    return r.exit_code, r.output


def test_twin_run_fleet_writes_replicas_and_the_summary(tmp_path: Path, small_trace) -> None:  # type: ignore[no-untyped-def]
    tpath = write_trace(tmp_path, small_trace)
    names = sorted(small_trace[0]["adapter"].unique().to_list())
    plan = tmp_path / "plan.json"
    plan_of(split(names, 2), max_loras=2).save(plan)
    code, out = run("run", str(tpath), "--profile", PROFILE, "--fleet", str(plan), "--out", str(tmp_path / "r.parquet"),
                    "--json", "--jobs", "1", "--steps-out", str(tmp_path / "steps"))
    assert code == 0, out
    s = json.loads(out)
    assert [g["name"] for g in s["gpus"]] == ["gpu-00", "gpu-01"] and s["fleet"]["gpus"] == 2
    res, meta = schema.read(tmp_path / "r.parquet", "results")
    assert set(res["replica"].unique()) == {"gpu-00", "gpu-01"}
    assert meta.context["fleet"]["router"] == "placement"
    assert sum(g["requests"] for g in s["gpus"]) == res.height
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["gpu-00.parquet", "gpu-01.parquet"]
    code, out = run("run", str(tpath), "--profile", PROFILE, "--fleet", str(plan), "--out", str(tmp_path / "r.parquet"))
    assert code == 0 and "gpu-01" in out and "fleet" in out


@pytest.mark.parametrize("gpus,args,message", [
    ([{"adapters": ["lora-0000"]}], [], "trace adapter(s) on no GPU of the plan: lora-0001"),
    ([{"adapters": "ALL", "max_loras": 2}], [], "'adapters' must be a list"),
    ([{"adapters": [], "max_lora": 2}], [], "unknown field 'max_lora' (did you mean 'max_loras'?)"),
    ([{"name": "g", "adapters": []}, {"name": "g", "adapters": []}], [], "g: two GPUs have this name"),
    ([{"adapters": [], "max_loras": "8"}], [], "max_loras must be an integer"),
    (None, ["--max-loras", "4"], "--max-loras does not apply with --fleet"),
])
def test_bad_plans_are_one_error_line(tmp_path: Path, small_trace, gpus, args, message) -> None:  # type: ignore[no-untyped-def]
    tpath = write_trace(tmp_path, small_trace)
    names = sorted(small_trace[0]["adapter"].unique().to_list())
    plan = tmp_path / "plan.json"
    if gpus is None:
        gpus = [{"adapters": names}]
    elif gpus and gpus[0].get("adapters") == ["lora-0000"]:
        gpus = [{"adapters": ["lora-0000"]}, {"adapters": names[2:]}]
    plan.write_text(json.dumps({"gpus": gpus}))
    code, out = run("run", str(tpath), "--profile", PROFILE, "--fleet", str(plan), "--out", str(tmp_path / "r.parquet"), *args)
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out


def test_gpu_that_does_not_fit_its_memory_is_named(tmp_path: Path, small_trace) -> None:  # type: ignore[no-untyped-def]
    tpath = write_trace(tmp_path, small_trace)
    names = sorted(small_trace[0]["adapter"].unique().to_list())
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"gpus": [{"name": "ok", "adapters": names[:6]},
                                         {"name": "big", "adapters": names[6:], "max_loras": 512, "max_lora_rank": 256}]}))
    code, out = run("run", str(tpath), "--profile", PROFILE, "--fleet", str(plan), "--out", str(tmp_path / "r.parquet"))
    assert code == 2 and out.startswith("error: ") and "big: does not fit its memory" in out and len(out.strip().splitlines()) == 1


def test_rank_too_large_for_a_gpu_is_named(tmp_path: Path, small_trace) -> None:  # type: ignore[no-untyped-def]
    tpath = write_trace(tmp_path, small_trace)
    df, ctx = small_trace
    ranks = schema.adapter_ranks(ctx)
    r16 = sorted(a for a, r in ranks.items() if r == 16)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"gpus": [{"name": "small", "adapters": sorted(ranks), "max_lora_rank": 8}]}))
    code, out = run("run", str(tpath), "--profile", PROFILE, "--fleet", str(plan), "--out", str(tmp_path / "r.parquet"))
    assert code == 2 and f"small: holds adapter {r16[0]!r} of rank 16 > max_lora_rank 8" in out


def test_unused_plan_adapter_is_a_warning(tmp_path: Path, small_trace) -> None:  # type: ignore[no-untyped-def]
    tpath = write_trace(tmp_path, small_trace)
    names = sorted(small_trace[0]["adapter"].unique().to_list())
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"gpus": [{"adapters": names + ["ghost-1"], "max_loras": 4}]}))
    r = CliRunner().invoke(twin_main, ["run", str(tpath), "--profile", PROFILE, "--fleet", str(plan),
                                                       "--out", str(tmp_path / "r.parquet"), "--json"])
    assert r.exit_code == 0, r.output
    assert "warning: " in r.stderr and "1 plan adapter(s) the trace never uses: ghost-1" in r.stderr
    assert json.loads(r.stdout)["fleet"]["gpus"] == 1


def test_round_robin_needs_every_gpu_to_take_every_rank(tmp_path: Path, small_trace) -> None:  # type: ignore[no-untyped-def]
    df, ctx = small_trace
    ranks = schema.adapter_ranks(ctx)
    r8 = sorted(a for a, r in ranks.items() if r == 8)
    r16 = sorted(a for a, r in ranks.items() if r == 16)
    plan = plan_of([r8, r16])
    prof = load_profile(PROFILE)
    fleet = resolve(plan, prof, sorted(ranks), ranks, "placement")
    assert [c.max_lora_rank for c in fleet.configs] == [8, 16]
    fleet = resolve(plan, prof, sorted(ranks), ranks, "round-robin")
    assert [c.max_lora_rank for c in fleet.configs] == [16, 16]  # any GPU may get a rank-16 adapter


def test_round_robin_static_routing_matches_one_by_one() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, 50)
    a = Router("round-robin", 4, {}).route_static(codes, ["x", "y", "z"])
    r = Router("round-robin", 4, {})
    st = FakeState([0] * 4, [set()] * 4)
    assert a.tolist() == [r.route("x", st) for _ in range(50)]
