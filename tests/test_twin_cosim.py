"""The coupled fleet: engines that take requests as they are routed give the results of
`simulate` on the same requests, bit for bit; a router that reads engine state saw
exactly the state the final results imply at each routing instant."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracekit.schema import adapter_ranks
from tracekit.synth import synthesize
from twin import cosim
from twin.api import ServingConfig
from twin.cosim import SteppedEngine
from twin.engine import simulate
from twin.fleet import _assemble, adapter_codes, simulate_fleet
from twin.fleet_plan import FleetPlan, resolve
from twin.profile import load_profile
from twin.routing import Router

PROFILE = "h100-llama-3.1-8b"


@pytest.fixture(scope="module")
def fleet_trace() -> tuple[pl.DataFrame, dict]:
    df, ctx = synthesize(adapters=12, rates=None, total_rate=60.0, popularity="zipf:1.0", arrivals="gamma:2",
                         ranks=[8, 16], duration_s=120.0, seed=3)
    return df.sort("arrival_s", maintain_order=True), ctx


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(every=st.integers(1, 40), seats=st.sampled_from([4, 16, 256]), slots=st.integers(1, 4))
def test_an_engine_fed_request_by_request_is_simulate(fleet_trace, every: int, seats: int, slots: int) -> None:  # type: ignore[no-untyped-def]
    df, ctx = fleet_trace
    df = df.head(800)
    prof = load_profile(PROFILE)
    cfg = ServingConfig.for_profile(prof, max_loras=slots, max_cpu_loras=12, max_lora_rank=16, max_num_seqs=seats)
    ref = simulate(df, prof, cfg, trace_context=ctx, window_s=30.0)
    eng = SteppedEngine(df, np.arange(df.height), prof, cfg, ctx, 30.0)
    arr = df["arrival_s"].to_numpy()
    for i in range(df.height):
        if i % every == 0:
            eng.run_until(float(arr[i]))  # advanced to arrival instants, as a router does
        eng.add(i, float(arr[i]))
    assert eng.finish().results.equals(ref.results)


@settings(max_examples=10, deadline=None)
@given(every=st.integers(1, 30), seats=st.sampled_from([4, 32]), slots=st.integers(1, 3),
       async_=st.booleans(), prefix=st.booleans(), kv_tokens=st.sampled_from([3000, 40000]))
def test_engine_is_simulate_with_async_scheduling_and_prefix_caching(every: int, seats: int, slots: int,
                                                                     async_: bool, prefix: bool, kv_tokens: int) -> None:
    # Multi-turn chats on shared system prompts (prefix hits), a small KV cache
    # (preemptions), requests added as a router would: the fleet's trace holds other rows
    # too, routed elsewhere; this engine's adapter table is that of its own rows.
    df, ctx = synthesize(adapters=5, rates=None, total_rate=12.0, popularity="zipf:1.0", arrivals="gamma:2",
                         ranks=[8, 16], duration_s=40.0, seed=5, turns=3, system_prompts="2:64")
    df = df.sort("arrival_s", maintain_order=True).with_row_index("row")
    prof = load_profile(PROFILE)
    cfg = ServingConfig.for_profile(prof, max_loras=slots, max_cpu_loras=5, max_lora_rank=16, max_num_seqs=seats,
                                    async_scheduling=async_, enable_prefix_caching=prefix, max_num_batched_tokens=512,
                                    kv_capacity_tokens=kv_tokens)
    mine = df.filter(pl.col("row") % 3 != 1)  # rows 1, 4, 7, ... go to another GPU
    ref = simulate(mine.drop("row"), prof, cfg, trace_context=ctx, window_s=30.0)
    full = df.drop("row")
    rows = mine["row"].to_numpy()
    eng = SteppedEngine(full, rows, prof, cfg, ctx, 30.0)
    arr = full["arrival_s"].to_numpy()
    for j, i in enumerate(rows):
        if j % every == 0:
            eng.run_until(float(arr[i]))
        eng.add(int(i), float(arr[i]))
    got = eng.finish()
    assert got.results.equals(ref.results)
    for key in ("preemptions", "steps", "adapter_loads", "cached_prompt_tokens"):
        assert got.summary.get(key) == ref.summary.get(key)


def test_a_static_router_through_the_coupled_path_is_the_static_fleet(fleet_trace) -> None:  # type: ignore[no-untyped-def]
    df, ctx = fleet_trace
    names = sorted(df["adapter"].unique().to_list())
    plan = FleetPlan.from_dict({"gpus": [{"adapters": names[i::3], "max_loras": 2} for i in range(3)]})
    prof = load_profile(PROFILE)
    static = simulate_fleet(df, prof, plan, "placement", trace_context=ctx, jobs=1)
    codes, nm = adapter_codes(df)
    fleet = resolve(plan, prof, nm, adapter_ranks(ctx), "placement")
    rep, parts = cosim.cosimulate(df, codes, nm, Router("placement", 3, plan.placement()), prof, fleet, ctx, 120.0, False)
    coupled = _assemble(df, rep, parts, plan, fleet, "placement", False, ctx, 120.0, prof.name, {})
    assert coupled.results.equals(static.results)


class Truth:
    """Replica state at time t as the final results say it was."""

    def __init__(self, replica: list[int], end: np.ndarray, upto: int, t: float):
        self.replica, self.end, self.upto, self.t = replica, end, upto, t

    def outstanding(self, r: int) -> int:
        mine = [j for j in range(self.upto) if self.replica[j] == r]
        return sum(1 for j in mine if not self.end[j] <= self.t)

    def holds(self, r: int, adapter: str | None) -> bool:  # unused by least-loaded
        raise AssertionError


@pytest.mark.parametrize("router", ["least-loaded", "placement"])
def test_each_routing_decision_saw_the_state_the_results_imply(fleet_trace, router: str) -> None:  # type: ignore[no-untyped-def]
    df, ctx = fleet_trace
    df = df.head(600)
    names = sorted(df["adapter"].unique().to_list())
    # placement: the busiest adapters on two GPUs each, the others on one.
    gpus = [{"adapters": names[:3] + names[3::3], "max_loras": 2, "max_num_seqs": 8},
            {"adapters": names[:3] + names[4::3], "max_loras": 2, "max_num_seqs": 8},
            {"adapters": names[5::3], "max_loras": 2, "max_num_seqs": 8}]
    plan = FleetPlan.from_dict({"gpus": gpus})
    res = simulate_fleet(df, PROFILE, plan, router, trace_context=ctx)
    assert not res.summary["static"]
    out = pl.from_arrow(res.results)
    rep = [int(x[-1]) for x in out["replica"].to_list()]
    end = out["end_s"].fill_null(np.inf).to_numpy()
    arr = out["arrival_s"].to_numpy()
    offline = Router(router, 3, plan.placement())
    for i in range(out.height):
        want = offline.route(out["adapter"][i], Truth(rep, end, i, float(arr[i])))
        assert want == rep[i], f"request {i}"


def test_coupled_routers_spread_and_report(fleet_trace) -> None:  # type: ignore[no-untyped-def]
    df, ctx = fleet_trace
    names = sorted(df["adapter"].unique().to_list())
    plan = FleetPlan.from_dict({"gpus": [{"adapters": names, "max_loras": 4} for _ in range(3)]})
    for router in ("least-loaded", "adapter-affinity"):
        res = simulate_fleet(df, PROFILE, plan, router, trace_context=ctx)
        assert not res.summary["static"] and res.summary["coupled_groups"] == [["gpu-00", "gpu-01", "gpu-02"]]
        counts = [g["requests"] for g in res.summary["gpus"]]
        assert sum(counts) == df.height and min(counts) > 0.1 * df.height, counts
    # adapter-affinity keeps adapters on fewer GPUs than least-loaded does.
    def spread(router: str) -> float:
        out = pl.from_arrow(simulate_fleet(df, PROFILE, plan, router, trace_context=ctx).results)
        return out.group_by("adapter").agg(pl.col("replica").n_unique())["replica"].mean()  # type: ignore[return-value]

    assert spread("adapter-affinity") < spread("least-loaded")


def test_groups_that_share_no_adapter_run_apart_with_the_same_results(fleet_trace) -> None:  # type: ignore[no-untyped-def]
    df, ctx = fleet_trace
    names = sorted(df["adapter"].unique().to_list())
    # Two coupled pairs (each shares a busy adapter) and a GPU alone.
    gpus = [{"adapters": [names[0], *names[3:5]], "max_loras": 2}, {"adapters": [names[0], *names[5:7]], "max_loras": 2},
            {"adapters": [names[1], *names[7:9]], "max_loras": 2}, {"adapters": [names[1], *names[9:11]], "max_loras": 2},
            {"adapters": [names[2], names[11]], "max_loras": 2}]
    plan = FleetPlan.from_dict({"gpus": gpus})
    prof = load_profile(PROFILE)
    split = simulate_fleet(df, prof, plan, "placement", trace_context=ctx, jobs=2)
    assert split.summary["coupled_groups"] == [["gpu-00", "gpu-01"], ["gpu-02", "gpu-03"]]
    # The whole fleet as one co-simulation routes and serves the same.
    codes, nm = adapter_codes(df)
    fleet = resolve(plan, prof, nm, adapter_ranks(ctx), "placement")
    rep, parts = cosim.cosimulate(df, codes, nm, Router("placement", 5, plan.placement()), prof, fleet, ctx, 120.0, False)
    whole = _assemble(df, rep, parts, plan, fleet, "placement", False, ctx, 120.0, prof.name, {})
    assert split.results.equals(whole.results)


@pytest.mark.slow
def test_coupled_groups_on_ray_give_the_same_results(fleet_trace) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ray", reason="Ray not installed (pip install 'lora-tracekit[ray]')")
    df, ctx = fleet_trace
    names = sorted(df["adapter"].unique().to_list())
    gpus = [{"adapters": [names[0], *names[2:7]], "max_loras": 2}, {"adapters": [names[0], *names[7:]], "max_loras": 2},
            {"adapters": [names[1]], "max_loras": 1}]
    plan = FleetPlan.from_dict({"gpus": gpus})
    local = simulate_fleet(df, PROFILE, plan, "placement", trace_context=ctx, jobs=1)
    ray = simulate_fleet(df, PROFILE, plan, "placement", trace_context=ctx, executor="ray", jobs=2)
    assert local.results.equals(ray.results)


def test_coupled_fleet_without_fast_forward_is_the_same() -> None:
    # Sparse arrivals: decode-only stretches between routing instants are fast-forwarded.
    df, ctx = synthesize(adapters=4, rates=None, total_rate=1.0, ranks=[8, 16], duration_s=300.0, seed=9)
    names = sorted(df["adapter"].unique().to_list())
    plan = FleetPlan.from_dict({"gpus": [{"adapters": names, "max_loras": 4} for _ in range(2)]})
    a = simulate_fleet(df, PROFILE, plan, "least-loaded", trace_context=ctx)
    b = simulate_fleet(df, PROFILE, plan, "least-loaded", trace_context=ctx, fast_forward=False)
    assert a.results.equals(b.results)
    assert sum(g["fast_forward_steps"] for g in a.summary["gpus"]) > 0 == sum(g["fast_forward_steps"] for g in b.summary["gpus"])
