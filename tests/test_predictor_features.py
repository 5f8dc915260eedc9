"""Trace features: known values, and invariance to trace length, fleet size and row order."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from predictor import features as F
from predictor.cli import main
from tracekit import schema
from tracekit.synth import synthesize

INTENSIVE = [n for n in F.FEATURE_NAMES if n not in ("n_adapters", "total_req_s", "offered_tok_s")]


def _trace(times: list[float], adapters: list[str | None], p: list[int], o: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(len(times))],
            "arrival_s": times,
            "adapter": adapters,
            "prompt_tokens": pl.Series(p, dtype=pl.Int32),
            "output_tokens": pl.Series(o, dtype=pl.Int32),
        }
    )


def test_known_values_by_hand() -> None:
    # a: 4 requests, b: 1 request, c: listed but silent, one base-model request; 10 s window.
    df = _trace([0, 1, 2, 3, 5, 9], ["a", "a", "a", "a", "b", None], [100] * 6, [50] * 6)
    ctx = {"window_s": 10.0, "adapters": {"a": {"rank": 8}, "b": {"rank": 32}, "c": {"rank": 16}}}
    f, loads = F.compute_with_loads(df, ctx)
    assert f["n_adapters"] == 3
    assert f["rate_mean"] == pytest.approx(5 / 3 / 10)
    assert f["rate_max"] == pytest.approx(0.4) and f["rate_min"] == 0.0
    assert f["top_share"] == pytest.approx(4 / 5)  # ceil(10% of 3) = 1 adapter
    assert f["rank_mean"] == pytest.approx(56 / 3) and f["rank_max"] == 32
    assert f["rank_traffic_mean"] == pytest.approx((4 * 8 + 32) / 5)
    assert f["base_share"] == pytest.approx(1 / 6)
    assert f["burstiness"] == pytest.approx(0.0)  # a's gaps are all 1 s
    assert f["tokens_per_req"] == 150
    assert f["total_req_s"] == pytest.approx(0.6) and f["offered_tok_s"] == pytest.approx(90.0)
    assert loads == {"a": pytest.approx(60.0), "b": pytest.approx(15.0), "c": 0.0}


def test_poisson_burstiness_is_one_and_gamma_is_bursty() -> None:
    df, ctx = synthesize(50, [0.5], [8], 2000.0, lengths="fixed:10,10", seed=3)
    assert F.compute(df, ctx)["burstiness"] == pytest.approx(1.0, abs=0.05)
    df, ctx = synthesize(50, [0.5], [8], 2000.0, lengths="fixed:10,10", seed=3, arrivals="gamma:3")
    assert F.compute(df, ctx)["burstiness"] > 2.0


def reference_burstiness(df: pl.DataFrame) -> float:
    """The definition, directly: each adapter's inter-arrival CV (n-1), weighted by its
    requests, over adapters with 3 requests or more (1.0 when there is none)."""
    cvs, weights = [], []
    for _, g in df.filter(pl.col("adapter").is_not_null()).group_by("adapter"):
        gaps = np.diff(np.sort(g["arrival_s"].to_numpy()))
        if g.height >= 3 and gaps.mean() > 0:
            cvs.append(gaps.std(ddof=1) / gaps.mean())
            weights.append(g.height)
    return float(np.average(cvs, weights=weights)) if cvs else 1.0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), copies=st.integers(2, 3))
@example(seed=328, n=3, copies=2)  # an outlier gap between copies (found by CI, stop 18)
def test_longer_trace_same_features(seed: int, n: int, copies: int) -> None:
    """Repeating a trace back to back (window x copies) keeps every intensive feature."""
    df, ctx = synthesize(10 * n, [0.4, 0.05, 0.0125], [8, 16, 32], 300.0, lengths="sharegpt", seed=seed)
    w = ctx["window_s"]
    long = pl.concat([df.with_columns(pl.col("arrival_s") + k * w) for k in range(copies)])
    f1 = F.compute(df, ctx)
    f2 = F.compute(long, dict(ctx, window_s=w * copies))
    for name in INTENSIVE + ["n_adapters", "total_req_s", "offered_tok_s"]:
        if name == "burstiness":
            # Not intensive to the bit: each copy adds a gap from an adapter's last arrival
            # to its first in the next copy, which a rare adapter of the short trace can
            # make an outlier (seed 328: 39 s against a mean gap of 2.1 s, CV 0.93 -> 1.35).
            # Both are what the definition gives.
            assert f1[name] == pytest.approx(reference_burstiness(df), rel=1e-9), name
            assert f2[name] == pytest.approx(reference_burstiness(long), rel=1e-9), name
        elif name in ("prompt_std", "output_std", "rate_std", "rate_cv"):
            # Sample statistics: n-1 denominators.
            assert f2[name] == pytest.approx(f1[name], rel=0.05, abs=1e-6), name
        else:
            assert f2[name] == pytest.approx(f1[name], rel=1e-9, abs=1e-12), name


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5))
def test_bigger_fleet_of_same_mix_same_features(seed: int, n: int) -> None:
    """A fleet of two copies of every adapter: intensive features unchanged, fleet features x2."""
    df, ctx = synthesize(10 * n, [0.4, 0.05, 0.0125], [8, 16, 32], 200.0, seed=seed)
    twin = df.with_columns(pl.concat_str(pl.col("adapter"), pl.lit("-copy")).alias("adapter"),
                           pl.concat_str(pl.col("request_id"), pl.lit("c")).alias("request_id"))
    both = pl.concat([df, twin]).sort("arrival_s")
    ads = dict(ctx["adapters"])
    ads.update({f"{a}-copy": v for a, v in ctx["adapters"].items()})
    f1, f2 = F.compute(df, ctx), F.compute(both, dict(ctx, adapters=ads))
    for name in INTENSIVE:
        assert f2[name] == pytest.approx(f1[name], rel=1e-6, abs=1e-9), name
    for name in ("n_adapters", "total_req_s", "offered_tok_s"):
        assert f2[name] == pytest.approx(2 * f1[name], rel=1e-9), name


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_row_order_does_not_matter(seed: int) -> None:
    df, ctx = synthesize(20, [0.3, 0.1], [8, 16], 100.0, seed=seed)
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=seed)
    a, b = F.compute(df, ctx), F.compute(shuffled, ctx)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k


def test_arrow_columns_give_the_polars_frame_s_features(tmp_path) -> None:
    """recommend --fast reads four columns as Arrow (adapter names as dictionary codes):
    the same features and loads as the whole frame, base-model requests included."""
    df, ctx = synthesize(40, [0.4, 0.05], [8, 16], 300.0, seed=2, arrivals="gamma:2")
    base = pl.int_range(pl.len()) % 5 == 0  # every fifth request to the base model
    df = df.with_columns(pl.when(base).then(None).otherwise(pl.col("adapter")).alias("adapter"))
    path = schema.write(tmp_path / "t.parquet", df, schema.KIND_TRACE, ctx)
    table, meta, _ = schema.read_trace_columns(path, F.FEATURE_COLUMNS, dictionary=["adapter"])
    (fa, la), (fp, lp) = F.compute_with_loads(table, meta.context), F.compute_with_loads(df, ctx)
    assert fa["base_share"] > 0.1
    for k in fa:
        assert fa[k] == pytest.approx(fp[k], rel=1e-12, abs=1e-15), k
    assert la == pytest.approx(lp, rel=1e-12)
    # A row group at a time (each with its own adapter dictionary), as recommend --fast reads.
    pq.write_table(pq.read_table(path), tmp_path / "g.parquet", row_group_size=97)
    meta, rows, tables = schema.iter_trace_columns(tmp_path / "g.parquet", F.FEATURE_COLUMNS, dictionary=["adapter"])
    fg, lg = F.compute_from_tables(tables, rows, ctx)
    for k in fg:
        assert fg[k] == pytest.approx(fp[k], rel=1e-12, abs=1e-15), k
    assert lg == pytest.approx(lp, rel=1e-12)


def test_cli_json_and_table_and_errors(tmp_path) -> None:
    df, ctx = synthesize(30, [0.4, 0.05], [8, 16], 120.0, seed=1)
    path = schema.write(tmp_path / "t.parquet", df, schema.KIND_TRACE, ctx)
    r = CliRunner().invoke(main, ["features", str(path), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert list(got) == F.FEATURE_NAMES
    assert got["n_adapters"] == 30
    assert np.isclose(got["rate_mean"], df.height / 120.0 / 30)
    r = CliRunner().invoke(main, ["features", str(path)])
    assert r.exit_code == 0 and "burstiness" in r.output
    bad = tmp_path / "bad.parquet"
    bad.write_text("request_id,arrival_s\n")
    r = CliRunner().invoke(main, ["features", str(bad)])
    assert r.exit_code == 2 and r.output.startswith("error:") and "bad.parquet" in r.output
    r = CliRunner().invoke(main, ["features", str(tmp_path / "missing.parquet")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_big_traces_estimate_burstiness_on_the_window_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past GAP_SAMPLE requests, burstiness comes from the first part of the window (the
    answer stays fast on fleets of millions of requests); every other feature is still
    computed on the whole trace, and burstiness stays close to the full estimate."""
    for arrivals in ("poisson", "gamma:2"):
        df, ctx = synthesize(adapters=40, rates=[2.0, 0.5], ranks=[8, 16], duration_s=1200, seed=5, arrivals=arrivals)
        full = F.compute(df, ctx)
        monkeypatch.setattr(F, "GAP_SAMPLE", df.height // 5)
        part = F.compute(df, ctx)
        monkeypatch.undo()
        for k, v in full.items():
            if k == "burstiness":
                assert part[k] == pytest.approx(v, rel=0.05)
            else:
                assert part[k] == v, k
