"""The predictor with the real twin: a small sweep, and the shipped models answering
(and being verified by the twin) on fresh traces."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from predictor import dataset as D
from predictor import spec as S
from predictor.cli import main
from predictor.recommend import shipped_model_path
from tracekit import schema
from tracekit.synth import synthesize
from twin.profile import shipped_profiles

PROFILES = [p for p in ("h100-llama-3.1-8b", "h100-qwen-2.5-7b") if p in shipped_profiles()]


@pytest.mark.skipif(not PROFILES, reason="no shipped twin profile")
def test_small_twin_sweep_is_consistent(tmp_path) -> None:
    grid = "rates=3.2/1.6/0.1,0.05/0.0125/0.003125;ranks=8/8/32;max_loras=16,32;max_cpu_loras=16,32,64;duration=120;max_load=200"
    df, ctx = D.sweep(S.load(grid), PROFILES[0], tmp_path / "ds.parquet", progress=False)
    assert df.height == 10 and ctx["cells_run"] == 10
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
def test_shipped_model_recommends_and_verifies(profile, tmp_path) -> None:
    if not shipped_model_path(profile).exists():
        pytest.skip(f"no shipped model for {profile} (run scripts/train_shipped_models.py)")
    df, ctx = synthesize(384, [0.4, 0.05, 0.0125], [8, 16, 16], 900.0, seed=3)
    path = schema.write(tmp_path / "t.parquet", df, "trace", ctx)
    r = CliRunner().invoke(main, ["recommend", str(path), "--profile", profile, "--json", "--verify"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert 16 <= out["max_cpu_loras"] <= 384 and out["max_loras"] <= out["max_cpu_loras"]
    assert out["max_lora_rank"] == 16
    # The twin, run on the busiest GPU's share, does not see it starve.
    assert not out["verify"]["runs"][-1]["starved"] or out["verify"]["corrected"]
    final = [x for x in out["verify"]["runs"] if x["max_cpu_loras"] == out["max_cpu_loras"]][-1]
    assert not final["starved"]
