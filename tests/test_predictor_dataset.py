"""`predictor dataset`: spec parsing, the sweep, labels and resuming after a crash
(against the toy simulator of predictor_toy, whose answers are known)."""

from __future__ import annotations

import json

import polars as pl
import predictor_toy
import pytest
from click.testing import CliRunner

from predictor import dataset as D
from predictor import pio
from predictor import spec as S
from predictor.cli import main
from tracekit.schema import TracekitError
from twin.profile import load_profile

SIM = "predictor_toy:simulate"
GRID = "rates=0.4/0.05/0.0125,1.6/0.4/0.1;ranks=8/16/16;max_loras=16,32;max_cpu_loras=16,32,64,128;duration=60;max_load=200"


@pytest.fixture
def toy_profile(tmp_path):
    p = tmp_path / "toy.json"
    p.write_text(json.dumps(predictor_toy.TOY_PROFILE))
    return str(p)


def test_grid_and_json_specs_agree() -> None:
    g = S.load(GRID)
    j = S.load(json.dumps({
        "duration_s": 60, "max_load_req_s": 200,
        "workloads": [{"rates": [0.4, 0.05, 0.0125], "ranks": [8, 16, 16]}, {"rates": [1.6, 0.4, 0.1], "ranks": [8, 16, 16]}],
        "configs": {"max_loras": [16, 32], "max_cpu_loras": [16, 32, 64, 128]},
    }))
    assert [c.key for c in g.cells()] == [c.key for c in j.cells()]
    # max_loras <= max_cpu_loras only: 4 + 3 per workload.
    assert len(g.cells()) == 14
    assert all(c.max_loras <= c.max_cpu_loras for c in g.cells())
    assert {c.max_lora_rank for c in g.cells()} == {16}


def test_random_workloads_are_reproducible_and_varied() -> None:
    a = S.load('{"random": {"n": 8, "seed": 3}}').workloads
    b = S.load("random=8;seed=3").workloads
    assert a == b
    assert len({w.key for w in a}) == 8
    assert all(len(w.rates) == 3 and set(w.ranks) <= {8, 16, 32} for w in a)


def test_overloaded_cells_are_skipped_and_capped() -> None:
    s = S.load("rates=3.2;max_loras=16;max_cpu_loras=16,32,64;max_load=60;duration=300;max_requests=5000")
    assert [c.max_cpu_loras for c in s.cells()] == [16]  # 32 x 3.2 > 60 req/s
    c = s.cells()[0]
    assert c.cell_duration() == pytest.approx(max(60.0, 5000 / (3.2 * 16)))


@pytest.mark.parametrize("bad,msg", [
    ("rates=0.4;max_loras=64;max_cpu_loras=16", "no cell left"),
    ("rates=abc", "rates"),
    ("rates=0.4;foo=1", "unknown key"),
    ('{"workloads": []}', "no workloads"),
    ('{"workloads": [{"rates": [0.1], "bogus": 1}]}', "bogus"),
    ("{not json", "invalid JSON"),
    ("/nonexistent/spec.json", "no such file"),
])
def test_bad_specs_say_what_is_wrong(bad: str, msg: str) -> None:
    with pytest.raises(TracekitError, match=msg):
        S.load(bad)


def test_sweep_labels_best_non_starving(tmp_path, toy_profile) -> None:
    df, ctx = D.sweep(S.load(GRID), toy_profile, tmp_path / "ds.parquet", simulator=SIM, progress=False)
    assert df.height == 14 and ctx["cells_run"] == 14
    back, ctx2 = pio.read(tmp_path / "ds.parquet")
    assert back.height == 14 and ctx2["profile"] == toy_profile
    for _, g in df.group_by("workload_key"):
        ok = g.filter((pl.col("status") == "ok") & (pl.col("served_frac") > 0.9))
        best = g.filter(pl.col("is_best"))
        assert best.height == 1
        assert best["throughput_tok_s"][0] == pytest.approx(ok["throughput_tok_s"].max())
    # The toy GPU sustains ~9-11k tok/s; the heavy workload (0.7 req/s x ~420 tok per
    # adapter) fits 32 adapters, not 64.
    heavy = df.filter(pl.col("workload").str.starts_with("rate_1.6") & pl.col("is_best"))
    assert heavy["max_cpu_loras"][0] == 32
    assert set(df.columns) >= {"f_rate_mean", "f_burstiness", "kv_capacity_tokens", "sim_wall_s"}


def test_slo_label(tmp_path, toy_profile) -> None:
    df, _ = D.sweep(S.load(GRID), toy_profile, tmp_path / "ds.parquet", simulator=SIM, progress=False, slo_ttft_p99_s=0.15)
    for (_,), g in df.group_by("workload_key"):
        b = g.filter(pl.col("is_best_slo"))
        assert b.height <= 1
        if b.height:
            assert b["p99_ttft_ms"][0] <= 150.0
            assert b["throughput_tok_s"][0] <= g.filter(pl.col("is_best"))["throughput_tok_s"][0]


CALLS = {"n": 0, "fail_after": None}


def counting_simulate(*args, **kwargs):
    CALLS["n"] += 1
    if CALLS["fail_after"] is not None and CALLS["n"] > CALLS["fail_after"]:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-sweep
    return predictor_toy.simulate(*args, **kwargs)


def test_resume_after_interruption_skips_finished_cells(tmp_path, toy_profile, monkeypatch) -> None:
    monkeypatch.setattr(D, "FLUSH_EVERY_ROWS", 3)
    out = tmp_path / "ds.parquet"
    spec = S.load(GRID)
    # The digest's fingerprint runs (cached per process) are not cells: take them first.
    D.profile_digest(load_profile(toy_profile), "test_predictor_dataset:counting_simulate")
    CALLS.update(n=0, fail_after=8)
    with pytest.raises(KeyboardInterrupt):
        D.sweep(spec, toy_profile, out, simulator="test_predictor_dataset:counting_simulate", progress=False)
    assert not out.exists()
    kept = D.done_keys(out)
    assert len(kept) == 8  # every finished cell was flushed on the way out
    CALLS.update(n=0, fail_after=None)
    df, ctx = D.sweep(spec, toy_profile, out, simulator="test_predictor_dataset:counting_simulate", progress=False)
    assert CALLS["n"] == 14 - 8 and ctx["cells_run"] == 6
    assert df.height == 14 and df["cell_key"].n_unique() == 14
    assert not D.parts_dir(out).exists()  # merged into OUT
    # A third run has nothing left to do.
    CALLS.update(n=0)
    D.sweep(spec, toy_profile, out, simulator="test_predictor_dataset:counting_simulate", progress=False)
    assert CALLS["n"] == 0


def test_parallel_local_matches_serial(tmp_path, toy_profile) -> None:
    a, _ = D.sweep(S.load(GRID), toy_profile, tmp_path / "a.parquet", simulator=SIM, progress=False, jobs=1)
    b, _ = D.sweep(S.load(GRID), toy_profile, tmp_path / "b.parquet", simulator=SIM, progress=False, jobs=2)
    cols = ["cell_key", "throughput_tok_s", "served_frac", "is_best"]
    assert a.sort("cell_key").select(cols).equals(b.sort("cell_key").select(cols))


def test_cli_runs_and_reports_errors(tmp_path, toy_profile) -> None:
    out = tmp_path / "ds.parquet"
    r = CliRunner().invoke(main, ["dataset", "--profile", toy_profile, "--workloads", GRID, "--out", str(out),
                                  "--simulator", SIM, "--jobs", "1"])
    assert r.exit_code == 0, r.output
    assert out.exists() and "runs/min" in r.output
    # --json: one object on stdout, the same best configurations as the labelled file.
    r = CliRunner().invoke(main, ["dataset", "--profile", toy_profile, "--workloads", GRID, "--out", str(out),
                                  "--simulator", SIM, "--jobs", "1", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    best = pl.read_parquet(out).filter(pl.col("is_best"))
    assert summary["out"] == str(out) and summary["cells"] == pl.read_parquet(out).height
    assert sorted((b["workload"], b["max_loras"]) for b in summary["best"]) == sorted(best.select("workload", "max_loras").rows())
    r = CliRunner().invoke(main, ["dataset", "--profile", toy_profile, "--workloads", "rates=x", "--out", str(out)])
    assert r.exit_code == 2 and r.output.startswith("error: workload spec")
    r = CliRunner().invoke(main, ["dataset", "--profile", "no-such-profile", "--workloads", GRID, "--out", str(out)])
    assert r.exit_code == 2 and "--profile no-such-profile" in r.output
    r = CliRunner().invoke(main, ["dataset", "--profile", toy_profile, "--workloads", GRID, "--out", str(out), "--jobs", "0"])
    assert r.exit_code == 2 and "--jobs" in r.output
    r = CliRunner().invoke(main, ["dataset", "--profile", toy_profile, "--workloads", GRID, "--out", str(tmp_path / "r.parquet"),
                                  "--executor", "ray", "--ray-address", "127.0.0.1:1"])
    assert r.exit_code == 2 and "--ray-address 127.0.0.1:1: cannot connect" in r.output


def test_a_changed_profile_invalidates_finished_cells(tmp_path, toy_profile) -> None:
    out = tmp_path / "ds.parquet"
    _, ctx = D.sweep(S.load(GRID), toy_profile, out, simulator=SIM, progress=False)
    assert ctx["cells_run"] == 14
    prof = json.loads(open(toy_profile).read())
    prof["model"]["lora_bytes_per_rank_slot"] *= 2  # a recalibrated profile
    open(toy_profile, "w").write(json.dumps(prof))
    df, ctx = D.sweep(S.load(GRID), toy_profile, out, simulator=SIM, progress=False)
    assert ctx["cells_run"] == 14 and df.height == 14
    assert df["profile_sha"].n_unique() == 1


def test_a_twin_that_behaves_differently_invalidates_finished_cells(tmp_path, toy_profile, monkeypatch) -> None:
    """The digest holds the twin's behaviour (a fingerprint of small saturated runs), not
    its code: the same simulator keeps the cells, one whose numbers move redoes them."""
    out = tmp_path / "ds.parquet"
    _, ctx = D.sweep(S.load(GRID), toy_profile, out, simulator=SIM, progress=False)
    _, again = D.sweep(S.load(GRID), toy_profile, out, simulator=SIM, progress=False)
    assert again["cells_run"] == 0 and again["profile_sha"] == ctx["profile_sha"]
    real = D.profile_digest(load_profile("h100-llama-3.1-8b"))
    assert real == D.profile_digest(load_profile("h100-llama-3.1-8b")) != D.profile_digest(
        load_profile("h100-qwen-2.5-7b"))
    slower = predictor_toy.toy_capacity
    monkeypatch.setattr(predictor_toy, "toy_capacity", lambda *a: 0.97 * slower(*a))  # a twin 3% slower
    D._fingerprint.cache_clear()
    df, changed = D.sweep(S.load(GRID), toy_profile, out, simulator=SIM, progress=False)
    assert changed["cells_run"] == 14 and changed["profile_sha"] != ctx["profile_sha"] and df.height == 14
