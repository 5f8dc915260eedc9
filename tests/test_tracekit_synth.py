"""tracekit synth: the paper's generator (per-adapter Poisson rates), power-law popularity,
gamma arrivals; the Python API others call and the CLI."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tracekit import schema
from tracekit.cli import main
from tracekit.schema import TracekitError
from tracekit.synth import popularity_weights, synthesize


def test_paper_workload_counts_within_3_sigma_and_per_adapter_rates_match() -> None:
    """Request count within 3 sigma of sum(rates) x duration; every adapter's empirical
    rate matches its assigned one (per-adapter 4.5 sigma, and a chi-square over all)."""
    rates = [1.6, 0.8, 0.4]
    adapters, duration = 60, 600.0
    for seed in range(3):
        df, ctx = synthesize(adapters, rates, [8, 16, 32], duration, lengths="fixed:8,8", seed=seed)
        assigned = {a: info["rate"] for a, info in ctx["adapters"].items()}
        expected_total = sum(assigned.values()) * duration
        # Round-robin: each rate on adapters/len(rates) adapters.
        assert Counter(assigned.values()) == Counter({r: adapters // 3 for r in rates})
        assert math.isclose(expected_total, sum(rates) * adapters / 3 * duration)
        assert abs(df.height - expected_total) <= 3 * math.sqrt(expected_total)
        counts = dict(df.group_by("adapter").len().iter_rows())
        chi2 = 0.0
        for a, rate in assigned.items():
            mean = rate * duration
            got = counts.get(a, 0)
            assert abs(got - mean) <= 4.5 * math.sqrt(mean), (a, got, mean)
            chi2 += (got - mean) ** 2 / mean
        # chi-square with 60 dof: mean 60, sd ~11; 120 is > 5 sd out.
        assert chi2 < 120


def test_trace_conventions() -> None:
    df, ctx = synthesize(12, [0.5, 1.0], [8, 16], 200.0, lengths="fixed:100,20", seed=3)
    assert df.schema == {
        "request_id": pl.String, "arrival_s": pl.Float64, "adapter": pl.String,
        "prompt_tokens": pl.Int32, "output_tokens": pl.Int32,
    }
    assert df["request_id"].n_unique() == df.height
    assert df["arrival_s"].is_sorted()
    assert df["arrival_s"].min() >= 0 and df["arrival_s"].max() < 200.0
    assert set(df["adapter"].unique()) <= set(ctx["adapters"])
    assert list(ctx["adapters"]) == [f"lora-{i:04d}" for i in range(12)]
    assert ctx["source"] == "synth" and ctx["window_s"] == 200.0 and ctx["seed"] == 3
    assert ctx["generator"]["rates"] == [0.5, 1.0] and ctx["generator"]["lengths"] == "fixed:100,20"
    assert schema.adapter_ranks(ctx) == {a: i["rank"] for a, i in ctx["adapters"].items()}
    assert Counter(schema.adapter_ranks(ctx).values()) == Counter({8: 6, 16: 6})
    assert all(info["path"] is None for info in ctx["adapters"].values())
    assert (df["prompt_tokens"] == 100).all() and (df["output_tokens"] == 20).all()
    # The frame passes the data contract as is.
    schema.conform(df.to_arrow(), "trace")


def test_seed_determines_trace() -> None:
    a, ca = synthesize(20, [1.0], [8, 16], 100.0, seed=7)
    b, cb = synthesize(20, [1.0], [8, 16], 100.0, seed=7)
    c, _ = synthesize(20, [1.0], [8, 16], 100.0, seed=8)
    assert a.equals(b) and ca["adapters"] == cb["adapters"]
    assert not a.equals(c)


@given(
    adapters=st.integers(1, 40),
    rates=st.lists(st.sampled_from([0.0, 0.05, 0.4, 0.8, 1.6]), min_size=1, max_size=5),
    ranks=st.lists(st.sampled_from([8, 16, 32, 64]), min_size=1, max_size=4),
    duration=st.floats(1.0, 300.0),
    seed=st.integers(0, 2**32 - 1),
    arrivals=st.sampled_from(["poisson", "gamma:0.5", "gamma:3"]),
)
@settings(max_examples=60, deadline=None)
def test_invariants(adapters, rates, ranks, duration, seed, arrivals) -> None:
    assume(any(r > 0 for r in rates[:adapters]))  # all-zero rates are refused (test_bad_parameters)
    df, ctx = synthesize(adapters, rates, ranks, duration, lengths="fixed:4,4", seed=seed, arrivals=arrivals)
    assert df["arrival_s"].is_sorted()
    if df.height:
        assert 0.0 <= df["arrival_s"].min() and df["arrival_s"].max() < duration
    assert df["request_id"].n_unique() == df.height
    assert len(ctx["adapters"]) == adapters
    # Round-robin then shuffled: each value appears floor or ceil of adapters/len times.
    for values, key in ((rates, "rate"), (ranks, "rank")):
        got = Counter(info[key] for info in ctx["adapters"].values())
        want: Counter = Counter()
        for i in range(adapters):
            want[values[i % len(values)]] += 1
        assert got == want
    # Zero-rate adapters get no requests.
    silent = {a for a, info in ctx["adapters"].items() if info["rate"] == 0}
    assert not silent & set(df["adapter"].unique().to_list())


def test_total_rate_with_zipf_popularity() -> None:
    df, ctx = synthesize(50, None, [8], 400.0, lengths="fixed:4,4", total_rate=100.0, popularity="zipf:1.2", seed=1)
    w = popularity_weights(50, "zipf:1.2")
    assert math.isclose(sum(i["rate"] for i in ctx["adapters"].values()), 100.0)
    counts = df.group_by("adapter").len().sort("adapter")["len"].to_numpy()
    share = counts / counts.sum()
    # The most popular adapter's share matches its weight within a few binomial sigma.
    sd = math.sqrt(w[0] * (1 - w[0]) / df.height)
    assert abs(share[0] - w[0]) < 5 * sd
    assert counts[0] > counts[10] > counts[-1]


def test_rates_with_zipf_keep_the_offered_load() -> None:
    _, uni = synthesize(30, [1.6, 0.8, 0.4], [8], 10.0, lengths="fixed:4,4", seed=0)
    _, zipf = synthesize(30, [1.6, 0.8, 0.4], [8], 10.0, lengths="fixed:4,4", seed=0, popularity="zipf:1")
    r_uni = [i["rate"] for i in uni["adapters"].values()]
    r_zipf = [i["rate"] for i in zipf["adapters"].values()]
    assert math.isclose(sum(r_uni), sum(r_zipf))
    assert np.allclose(np.array(r_zipf) / sum(r_zipf), popularity_weights(30, "zipf:1"))


def test_popularity_weights() -> None:
    assert np.allclose(popularity_weights(4, "uniform"), 0.25)
    w = popularity_weights(3, "zipf:1")
    assert np.allclose(w, np.array([1, 1 / 2, 1 / 3]) / (1 + 1 / 2 + 1 / 3))
    assert np.allclose(popularity_weights(5, "zipf:0"), 0.2)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_arrivals_have_the_requested_cv_and_rate(cv: float) -> None:
    df, _ = synthesize(1, [5.0], [8], 4000.0, lengths="fixed:4,4", arrivals=f"gamma:{cv}", seed=2)
    gaps = np.diff(df["arrival_s"].to_numpy())
    assert abs(gaps.std() / gaps.mean() - cv) < 0.1 * cv
    assert abs(df.height / 4000.0 - 5.0) < 0.1 * 5.0


def test_sharegpt_lengths_in_synth() -> None:
    df, _ = synthesize(10, [5.0], [8], 400.0, lengths="sharegpt", seed=0)
    assert abs(df["prompt_tokens"].mean() / 222 - 1) < 0.05
    assert abs(df["output_tokens"].mean() / 196 - 1) < 0.05
    assert df["prompt_tokens"].max() <= 1024 and df["prompt_tokens"].min() >= 4
    assert (df["prompt_tokens"] + df["output_tokens"]).max() <= 2048


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"adapters": 0}, "--adapters"),
        ({"duration_s": 0.0}, "--window"),
        ({"rates": None}, "exactly one of --rates and --total-rate"),
        ({"total_rate": 3.0}, "exactly one of --rates and --total-rate"),
        ({"rates": [-1.0]}, "--rates must be non-negative"),
        ({"rates": [0.0, 0.0]}, "--rates: every rate is 0, so the trace would hold no requests"),
        ({"rates": None, "total_rate": 0.0}, "--total-rate: every rate is 0"),
        ({"ranks": [0]}, "--ranks must be positive"),
        ({"arrivals": "gamma:x"}, "--arrivals 'gamma:x'"),
        ({"arrivals": "weibull"}, "--arrivals 'weibull'"),
        ({"rates": None, "total_rate": 1.0, "popularity": "zipf:-1"}, "ALPHA must be"),
        ({"lengths": "lognormal"}, "unknown length spec"),
    ],
)
def test_bad_parameters(kwargs, msg) -> None:
    args = {"adapters": 3, "rates": [1.0], "ranks": [8], "duration_s": 10.0, "lengths": "fixed:4,4"}
    args.update(kwargs)
    with pytest.raises(TracekitError, match=msg.replace("(", r"\(")):
        synthesize(**args)


def test_cli_writes_a_valid_trace(tmp_path: Path) -> None:
    out = tmp_path / "trace.parquet"
    res = CliRunner().invoke(
        main,
        ["synth", "--adapters", "6", "--rates", "1.6,0.8,0.4", "--ranks", "8,16", "--window", "60",
         "--lengths", "sharegpt", "--seed", "0", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    df, meta = schema.read(out, "trace")
    assert meta.context["source"] == "synth" and len(meta.context["adapters"]) == 6
    assert df.height > 0 and df["arrival_s"].is_sorted()
    direct, _ = synthesize(6, [1.6, 0.8, 0.4], [8, 16], 60.0, lengths="sharegpt", seed=0)
    assert df.equals(direct)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--rates", "1,x"], "--rates: expected comma-separated numbers"),
        (["--rates", "1", "--ranks", "8,a"], "--ranks: expected comma-separated integers"),
        (["--rates", "1", "--lengths", "fixed:10"], "--lengths 'fixed:10'"),
        (["--rates", "1", "--lengths", "file:/no/such.parquet"], "no such file"),
        (["--total-rate", "5", "--popularity", "pareto"], "--popularity 'pareto'"),
        (["--rates", "0"], "--rates: every rate is 0"),
        (["--rates", "0.0001"], "no request arrived: 0.0003 req/s in all over 10 s"),
    ],
)
def test_cli_bad_flags_give_one_error_line(tmp_path: Path, args, msg) -> None:
    res = CliRunner().invoke(main, ["synth", "--adapters", "3", "--window", "10", *args, "--out", str(tmp_path / "t.parquet")])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and msg in res.stderr, res.stderr
    assert not (tmp_path / "t.parquet").exists()


def test_gamma_arrivals_are_stationary_from_the_start() -> None:
    """No burst at t=0: the first tenth of the window holds a tenth of the requests.
    (Starting each adapter at an arrival, or a plain uniform fraction of an ordinary gap,
    front-loads bursty processes.)"""
    df, _ = synthesize(400, [0.5], [8], 200.0, lengths="fixed:4,4", arrivals="gamma:3", seed=11)
    first = (df["arrival_s"] < 20.0).sum() / df.height
    assert abs(first - 0.1) < 0.02, first


def test_console_scripts_end_to_end(tmp_path: Path) -> None:
    """The installed `tracekit` entry point: synth, then inspect --json of its output."""
    import json
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "tracekit"
    out = tmp_path / "t.parquet"
    subprocess.run(
        [str(exe), "synth", "--adapters", "5", "--rates", "2", "--window", "30", "--out", str(out)],
        check=True, capture_output=True,
    )
    res = subprocess.run([str(exe), "inspect", str(out), "--json"], check=True, capture_output=True, text=True)
    info = json.loads(res.stdout)
    assert info["kind"] == "trace" and info["trace"]["adapters"] == 5
    bad = subprocess.run([str(exe), "inspect", str(tmp_path / "none.parquet")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_sine_modulation_keeps_the_mean_rate_and_shapes_time() -> None:
    rate, duration, amp = 40.0, 1000.0, 0.8
    df, ctx = synthesize(1, [rate], [8], duration, lengths="fixed:4,4", modulation=f"sine:{duration},{amp}", seed=5)
    mean = rate * duration
    assert abs(df.height - mean) < 4 * math.sqrt(mean)
    t = df["arrival_s"].to_numpy()
    # Rate rises in the first half-period and falls in the second: the expected ratio of
    # counts is (1 + 2A/pi) / (1 - 2A/pi).
    first, second = (t < duration / 2).sum(), (t >= duration / 2).sum()
    want = (1 + 2 * amp / math.pi) / (1 - 2 * amp / math.pi)
    assert abs(first / second / want - 1) < 0.08
    assert ctx["generator"]["modulation"] == f"sine:{duration},{amp}"
    with pytest.raises(TracekitError, match="AMPLITUDE in"):
        synthesize(1, [1.0], [8], 10.0, lengths="fixed:4,4", modulation="sine:10,2")


def test_multi_turn_conversations_share_prefixes_within_an_adapter_only() -> None:
    from tracekit.prefix import block_hashes

    df, ctx = synthesize(adapters=3, rates=[2.0], ranks=[8], duration_s=30, lengths="fixed:20,8",
                         seed=1, turns=3, system_prompts="2:32")
    assert df["prompt_token_ids"].list.len().to_list() == df["prompt_tokens"].to_list()
    for _, g in df.group_by("adapter", maintain_order=True):
        ids = g["prompt_token_ids"].to_list()
        # Turn k + 1 extends turn k by its answer and a new user message.
        for k in range(0, len(ids) - 1, 3):
            if k + 1 < len(ids):
                assert ids[k + 1][: len(ids[k])] == ids[k]
                assert len(ids[k + 1]) == len(ids[k]) + 8 + 20
        assert all(len(x) >= 32 + 20 for x in ids)
    rows = df.to_dicts()
    a = rows[0]
    b = next(r for r in rows if r["adapter"] != a["adapter"] and r["prompt_token_ids"][:32] == a["prompt_token_ids"][:32])
    ha, hb = block_hashes(a["prompt_token_ids"], a["adapter"]), block_hashes(b["prompt_token_ids"], b["adapter"])
    # Same system prompt, other adapter: no shared block (vLLM keys blocks by adapter).
    assert set(ha).isdisjoint(hb)
    hashed, hctx = synthesize(adapters=3, rates=[2.0], ranks=[8], duration_s=30, lengths="fixed:20,8",
                              seed=1, turns=3, system_prompts="2:32", token_ids="hashes")
    assert hctx["prefix_block_tokens"] == 16
    assert hashed["prefix_hashes"].to_list()[0] == block_hashes(rows[0]["prompt_token_ids"], rows[0]["adapter"], 16)
    assert "prompt_token_ids" not in hashed.columns


def test_prefix_hash_key_changes_every_hash_but_keeps_equality() -> None:
    from tracekit.prefix import block_hashes, new_salt

    ids = list(range(1000, 1040))
    plain = block_hashes(ids, "a")
    assert len(plain) == 2 and block_hashes(ids[:35], "a") == plain  # full blocks only
    assert block_hashes(ids[:16] + [7] * 16, "a")[0] == plain[0]
    assert block_hashes(ids[:16] + [7] * 16, "a")[1] != plain[1]
    salt = new_salt()
    salted = block_hashes(ids, "a", key=salt)
    assert set(salted).isdisjoint(plain) and salted == block_hashes(ids, "a", key=salt)


def test_old_duration_flag_still_works_for_one_version(tmp_path: Path) -> None:
    new, old = tmp_path / "new.parquet", tmp_path / "old.parquet"
    args = ["synth", "--adapters", "3", "--rates", "1", "--lengths", "fixed:4,4"]
    assert CliRunner().invoke(main, [*args, "--window", "20", "--out", str(new)]).exit_code == 0
    res = CliRunner().invoke(main, [*args, "--duration", "20", "--out", str(old)])
    assert res.exit_code == 0 and "note: --duration is now --window" in res.stderr
    assert schema.read(new)[0].equals(schema.read(old)[0])
    assert "--duration" not in CliRunner().invoke(main, ["synth", "--help"]).output  # hidden
    res = CliRunner().invoke(main, [*args, "--duration", "20", "--window", "20", "--out", str(old)])
    assert res.exit_code == 2 and "error: --duration is the old name of --window" in res.stderr


def test_synth_and_import_print_json_summaries(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["synth", "--adapters", "3", "--rates", "1", "--window", "30", "--lengths",
                                    "fixed:4,4", "--json", "--out", str(tmp_path / "t.parquet")])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["requests"] == schema.read(tmp_path / "t.parquet")[0].height and s["adapters"] == 3 and s["window_s"] == 30
    csv = Path(__file__).parent / "data" / "burstgpt_sample.csv"
    res = CliRunner().invoke(main, ["import", "burstgpt", str(csv), "--adapters", "2", "--json",
                                    "--out", str(tmp_path / "b.parquet")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["requests"] == schema.read(tmp_path / "b.parquet")[0].height
