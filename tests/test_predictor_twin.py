"""The predictor with the real twin: a small sweep; the default twin search on fresh
traces for the shipped profiles; the engine limits it is told; and a profile calibrated
from captured steps, with no trained model, getting an answer."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from predictor import dataset as D
from predictor import spec as S
from predictor.cli import main
from predictor.recommend import shipped_model_path
from tracekit import schema
from tracekit.synth import synthesize
from twin.api import ServingConfig, simulate
from twin.profile import load_profile, shipped_profiles

PROFILES = [p for p in ("h100-llama-3.1-8b", "h100-qwen-2.5-7b") if p in shipped_profiles()]


@pytest.mark.skipif(not PROFILES, reason="no shipped twin profile")
def test_small_twin_sweep_is_consistent(tmp_path) -> None:
    grid = "rates=3.2/1.6/0.1,0.05/0.0125/0.003125;ranks=8/8/32;max_loras=16,32;max_cpu_loras=16,32,64;duration=120;max_load=200"
    df, ctx = D.sweep(S.load(grid), PROFILES[0], tmp_path / "ds.parquet", progress=False)
    assert df.height == 10 and ctx["cells_run"] == 10 and ctx["complete"]
    assert ctx["serving"]["max_num_seqs"] == load_profile(PROFILES[0]).data["server"]["max_num_seqs"]
    ok = df.filter(pl.col("status") == "ok")
    # Summaries are internally consistent: served = throughput / offered.
    assert ((ok["throughput_tok_s"] / ok["offered_tok_s"] - ok["served_frac"]).abs() < 1e-9).all()
    heavy = df.filter(pl.col("workload").str.starts_with("rate_3.2"))
    light = df.filter(pl.col("workload").str.starts_with("rate_0.05"))
    # 64 adapters at 1.6 req/s each is ~45k tok/s: more than any H100 serves.
    assert heavy.filter(pl.col("max_cpu_loras") == 64)["starved"].all()
    # The light workload (~0.02 req/s per adapter) is served fully everywhere.
    assert not light["starved"].any()
    assert light.filter(pl.col("is_best"))["max_cpu_loras"][0] == 64


@pytest.mark.parametrize("profile", PROFILES)
def test_default_twin_search_on_a_fresh_trace(profile, tmp_path) -> None:
    if not shipped_model_path(profile).exists():
        pytest.skip(f"no shipped model for {profile} (run scripts/train_shipped_models.py)")
    df, ctx = synthesize(384, [0.4, 0.05, 0.0125], [8, 16, 16], 900.0, seed=3)
    path = schema.write(tmp_path / "t.parquet", df, "trace", ctx)
    r = CliRunner().invoke(main, ["recommend", str(path), "--profile", profile, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["method"] == "twin search" and out["max_lora_rank"] == 16
    n = out["adapters_per_gpu"]
    assert 16 <= n <= 384 and out["max_loras"] <= n and out["serving"]["max_cpu_loras"] == n
    # Below the starving point by the stated step; the twin, run on that share, serves it.
    assert n <= out["starving_point"] * (1 - out["safety"]["step"]) + 1
    final = out["twin_runs"][-1]
    assert final["adapters"] == n and not final["starved"] and out["served_frac"] == final["served_frac"]
    # Runs on either side of the starving point at the chosen max_loras bracket it.
    at = [x for x in out["twin_runs"] if x["max_loras"] == out["max_loras"] and x["load"] == 1.0]
    assert any(not x["starved"] and x["adapters"] <= out["starving_point"] for x in at)
    assert out["adapters_per_gpu_range"][0] == n <= out["adapters_per_gpu_range"][1]
    assert f"--max-cpu-loras {n} " in out["vllm_command"]


def test_fewer_seats_fewer_adapters_and_the_big_answer_starves_there(tmp_path) -> None:
    """The engine limits are inputs: at --max-num-seqs 256 a GPU takes fewer adapters
    than at the profile's 2048, and the 2048 answer run at 256 seats serves less."""
    prof = "h100-llama-3.1-8b"
    df, ctx = synthesize(384, [0.8, 0.4, 0.05], [8, 8, 32], 900.0, seed=4)
    path = schema.write(tmp_path / "t.parquet", df, "trace", ctx)
    outs = {}
    for seats in (2048, 256):
        r = CliRunner().invoke(main, ["recommend", str(path), "--profile", prof, "--json", "--max-num-seqs", str(seats)])
        assert r.exit_code == 0, r.output
        outs[seats] = json.loads(r.output)
        assert outs[seats]["serving"]["max_num_seqs"] == seats and f"--max-num-seqs {seats} " in outs[seats]["vllm_command"]
    assert outs[256]["adapters_per_gpu"] < outs[2048]["adapters_per_gpu"]
    big = outs[2048]
    from predictor.plan import representative

    names = representative(_loads(df, ctx), big["adapters_per_gpu"])
    sub = df.filter(pl.col("adapter").is_in(names))
    cfg = ServingConfig.for_profile(prof, max_loras=big["max_loras"], max_cpu_loras=big["adapters_per_gpu"],
                                    max_lora_rank=32, max_num_seqs=256)
    res = simulate(sub, prof, cfg, trace_context=dict(ctx, adapters={a: ctx["adapters"][a] for a in names}), window_s=900.0)
    assert res.summary["served_frac"] < big["served_frac"] - 0.03


def _loads(df: pl.DataFrame, ctx: dict) -> dict[str, float]:
    from predictor import features as F

    return F.compute_with_loads(df, ctx)[1]


def _captured_steps(n: int, seed: int) -> dict[str, np.ndarray | list]:
    """Steps of a small CPU-like server (a known linear step time plus noise)."""
    rng = np.random.default_rng(seed)
    decode = rng.integers(0, 16, n)
    prefill = np.where(rng.random(n) < 0.3, rng.integers(1, 512, n), 0)
    decode[(prefill + decode) == 0] = 1
    ctx_tok = decode * rng.integers(20, 400, n) + prefill
    active = [sorted(set(rng.choice(["a1", "a2", "a3", "a4"], size=rng.integers(1, 3)).tolist())) for _ in range(n)]
    dur = (0.008 + 1.7e-3 * prefill + 1.9e-3 * decode + 5e-6 * ctx_tok) * (1 + 0.03 * rng.standard_normal(n))
    return {
        "step": np.arange(n), "t_s": np.cumsum(dur) - dur, "duration_s": dur,
        "num_running": (decode + (prefill > 0)).astype(np.int32), "num_waiting": np.zeros(n, np.int32),
        "prefill_reqs": (prefill > 0).astype(np.int32), "prefill_tokens": prefill.astype(np.int32),
        "decode_reqs": decode.astype(np.int32), "decode_tokens": decode.astype(np.int32), "active_adapters": active,
        "kv_usage": np.minimum(ctx_tok / 65536, 1.0), "num_preempted": np.zeros(n, np.int32),
        "adapter_loads": np.zeros(n, np.int32), "context_tokens": ctx_tok.astype(np.int64),
    }


def test_a_calibrated_profile_without_a_model_gets_an_answer(tmp_path) -> None:
    """`twin calibrate` on a capture, then `predictor recommend --profile mine.json` with no
    dataset or training step: the twin search answers, from a run of the whole fleet."""
    from twin.cli import main as twin_cli

    ctx = schema.new_context(model="tiny", source="test", adapters={a: {"rank": r} for a, r in
                             {"a1": 8, "a2": 16, "a3": 8, "a4": 16}.items()},
                             max_loras=2, max_cpu_loras=4, max_lora_rank=16, max_num_seqs=16,
                             max_num_batched_tokens=512, block_size=16, kv_capacity_tokens=65536, max_model_len=2048)
    schema.write(tmp_path / "steps.parquet", _captured_steps(1500, 1), schema.KIND_STEPS, ctx)
    r = CliRunner().invoke(twin_cli, ["calibrate", str(tmp_path / "steps.parquet"), "--out", str(tmp_path / "mine.json")])
    assert r.exit_code == 0, r.output
    df, tctx = synthesize(64, [0.05, 0.01], [8, 16], 1800.0, lengths="fixed:100,30", seed=2)
    path = schema.write(tmp_path / "t.parquet", df, "trace", tctx)
    # No serving flag either: the captured server's settings are the profile's server section.
    r = CliRunner().invoke(main, ["recommend", str(path), "--profile", str(tmp_path / "mine.json"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["method"].startswith("twin search (no trained model") and out["model"] is None
    assert (out["serving"]["max_num_seqs"], out["serving"]["max_num_batched_tokens"]) == (16, 512)
    assert "--max-num-seqs 16 " in out["vllm_command"] and "--max-num-batched-tokens 512 " in out["vllm_command"]
    assert out["twin_runs"][0]["adapters"] == 64  # the first guess: the whole fleet
    assert 1 <= out["adapters_per_gpu"] <= 64 and not out["twin_runs"][-1]["starved"]
    assert out["safety"]["twin_error_source"].startswith("held-out step times")
    # --fast has no model to use here, and says so.
    r = CliRunner().invoke(main, ["recommend", str(path), "--profile", str(tmp_path / "mine.json"), "--fast"])
    assert r.exit_code == 2 and "--fast needs a trained model" in r.output
