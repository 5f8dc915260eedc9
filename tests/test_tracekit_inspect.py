"""tracekit inspect: trace statistics against eager numpy, directories of parts, steps and
results files, --json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tracekit import schema
from tracekit.cli import main
from tracekit.inspect import (
    gini,
    inspect_path,
    int_quantiles,
    interarrival_cv,
    peak_rate,
    top_share,
)
from tracekit.synth import synthesize


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=200))
@settings(max_examples=100, deadline=None)
def test_skew_measures_bounds(counts) -> None:
    x = np.array(counts)
    g = gini(x)
    assert 0.0 <= g < 1.0 + 1e-12
    s = top_share(x)
    if x.sum() > 0:
        k = max(1, math.ceil(0.1 * x.size))
        assert k / x.size - 1e-12 <= s <= 1.0 + 1e-12  # the top 10% hold at least 10%
    if x.sum() > 0 and (x == x[0]).all():
        assert g == pytest.approx(0.0, abs=1e-12)


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=300), st.booleans())
@settings(max_examples=80, deadline=None)
def test_int_quantiles_equal_sorting(values, huge) -> None:
    v = np.array(values, np.int64) + (10**9 if huge else 0)  # huge: the sort fallback
    s = np.sort(v)
    assert int_quantiles(v) == [float(s[round(q * (v.size - 1))]) for q in (0.5, 0.9, 0.99)]


def test_skew_measures_known_values() -> None:
    assert gini(np.array([0, 0, 0, 10])) == pytest.approx(0.75)
    assert gini(np.array([5, 5])) == 0.0
    assert top_share(np.array([90] + [10] * 9) / 1.0) == pytest.approx(0.5)
    assert peak_rate(np.array([0.1, 0.2, 0.3, 1.5, 5.0]), 1.0) == 3.0
    assert interarrival_cv(np.arange(10.0)) == 0.0


def test_trace_stats_match_eager_computation(tmp_path: Path) -> None:
    df, ctx = synthesize(30, None, [8, 16, 32], 600.0, total_rate=20.0, popularity="zipf:1", seed=4)
    p = schema.write(tmp_path / "t.parquet", df, "trace", ctx)
    info = inspect_path(p)
    tr = info["trace"]
    assert info["kind"] == "trace" and tr["requests"] == df.height
    assert tr["window_s"] == 600.0 and tr["mean_rate_req_s"] == pytest.approx(df.height / 600.0)
    counts = np.array([(df["adapter"] == a).sum() for a in ctx["adapters"]])
    assert tr["adapter_gini"] == pytest.approx(gini(counts))
    assert tr["top10pct_adapter_share"] == pytest.approx(np.sort(counts)[::-1][:3].sum() / counts.sum())
    arr = df["arrival_s"].to_numpy()
    assert tr["interarrival_cv"] == pytest.approx(np.diff(arr).std() / np.diff(arr).mean())
    assert tr["interarrival_cv"] == pytest.approx(1.0, abs=0.1)  # Poisson
    assert tr["peak_rate_1s_req_s"] == np.bincount(np.floor(arr - arr[0]).astype(int)).max()
    for col in ("prompt_tokens", "output_tokens"):
        v = df[col].to_numpy()
        assert tr[col]["mean"] == pytest.approx(v.mean())
        assert tr[col]["p50"] == pytest.approx(np.percentile(v, 50, method="nearest"), abs=1)
        assert tr[col]["max"] == v.max()
    busiest = df.group_by("adapter").len().sort(["len", "adapter"], descending=[True, False]).head(20)
    assert [d["requests"] for d in tr["top_adapters"]] == busiest["len"].to_list()
    assert tr["top_adapters"][0]["rank"] == ctx["adapters"][tr["top_adapters"][0]["adapter"]]["rank"]
    by_rank = {r: {"adapters": 0, "requests": 0} for r in ("8", "16", "32")}
    for a, i in ctx["adapters"].items():
        by_rank[str(i["rank"])]["adapters"] += 1
        by_rank[str(i["rank"])]["requests"] += int((df["adapter"] == a).sum())
    assert tr["ranks"] == by_rank


def test_directory_of_parts_equals_single_file(tmp_path: Path) -> None:
    df, ctx = synthesize(8, [1.0, 0.5], [8], 300.0, seed=1)
    single = inspect_path(schema.write(tmp_path / "one.parquet", df, "trace", ctx))
    w = schema.PartWriter(tmp_path / "parts", "trace", ctx)
    # Parts written out of time order: inspect must still see the global order.
    for chunk in reversed(list(df.iter_slices(n_rows=200))):
        w.write_part(chunk)
    parted = inspect_path(tmp_path / "parts")
    assert parted["context"]["parts"] == w.parts_written > 1
    for key in ("requests", "interarrival_cv", "adapter_gini", "peak_rate_1s_req_s", "prompt_tokens"):
        assert parted["trace"][key] == pytest.approx(single["trace"][key])


def test_adapters_without_requests_count_for_skew(tmp_path: Path) -> None:
    df, ctx = synthesize(10, [1.0, 0.0], [8], 100.0, seed=0)
    info = inspect_path(schema.write(tmp_path / "t.parquet", df, "trace", ctx))
    assert info["trace"]["adapters"] == 10 and info["trace"]["adapters_with_requests"] == 5
    assert info["trace"]["top10pct_adapter_share"] > 0.15  # 1 of the 5 busy adapters


def test_json_output_is_one_object(tmp_path: Path) -> None:
    df, ctx = synthesize(4, [1.0], [8, 16], 50.0, seed=0)
    p = schema.write(tmp_path / "t.parquet", df, "trace", ctx)
    res = CliRunner().invoke(main, ["inspect", str(p), "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["kind"] == "trace" and obj["trace"]["requests"] == df.height
    res = CliRunner().invoke(main, ["inspect", str(p)])
    assert res.exit_code == 0 and "inter-arrival CV" in res.stdout and "rank" in res.stdout


def test_steps_file(tmp_path: Path) -> None:
    n = 50
    t = pa.table(
        {
            "step": pa.array(range(n), pa.int64()),
            "t_s": np.arange(n) * 0.1,
            "duration_s": np.full(n, 0.05),
            "num_running": pa.array([3] * n, pa.int32()),
            "num_waiting": pa.array([i % 4 for i in range(n)], pa.int32()),
            "prefill_reqs": pa.array([1] * n, pa.int32()),
            "prefill_tokens": pa.array([64] * n, pa.int32()),
            "decode_reqs": pa.array([2] * n, pa.int32()),
            "decode_tokens": pa.array([2] * n, pa.int32()),
            "active_adapters": [["a", "b"][: 1 + i % 2] for i in range(n)],
            "kv_usage": np.linspace(0, 0.5, n),
            "num_preempted": pa.array([1 if i == 7 else 0 for i in range(n)], pa.int32()),
            "adapter_loads": pa.array([1 if i < 2 else 0 for i in range(n)], pa.int32()),
        }
    )
    info = inspect_path(schema.write(tmp_path / "s.parquet", t, "steps"))
    s = info["steps"]
    assert info["kind"] == "steps" and s["steps"] == n
    assert s["span_s"] == pytest.approx(4.95) and s["busy_frac"] == pytest.approx(2.5 / 4.95)
    assert s["max_waiting"] == 3 and s["preemptions"] == 1 and s["adapter_loads"] == 2
    assert s["max_active_adapters"] == 2 and s["max_kv_usage"] == pytest.approx(0.5)
    assert s["tokens_per_s"] == pytest.approx(n * 66 / 4.95)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "s.parquet"), "--plot", str(tmp_path / "s.png")])
    assert res.exit_code == 0 and "preemptions" in res.stdout
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_results_file(tmp_path: Path) -> None:
    df, ctx = synthesize(3, [2.0], [8], 20.0, lengths="fixed:10,5", seed=0)
    n = df.height
    arr = df["arrival_s"].to_numpy()
    status = ["ok"] * (n - 2) + ["error", "unfinished"]
    res_t = df.to_arrow()
    extra = {
        "target": pa.array(["twin"] * n),
        "status": pa.array(status),
        "dispatch_s": pa.array(arr),
        "first_token_s": pa.array(arr + 0.2),
        "end_s": pa.array(arr + 1.0),
        "generated_tokens": pa.array([5] * n, pa.int32()),
        "ttft_s": pa.array([0.2] * n),
        "e2e_s": pa.array([1.0] * n),
        "tpot_s": pa.array([0.2] * n),
        "error": pa.array([None] * n, pa.string()),
    }
    for k, v in extra.items():
        res_t = res_t.append_column(k, v)
    info = inspect_path(schema.write(tmp_path / "r.parquet", res_t, "results", ctx))
    assert info["trace"]["requests"] == n
    r = info["results"]
    assert r["status"] == {"error": 1, "ok": n - 2, "unfinished": 1}
    assert r["completed"] == n - 2 and r["mean_ttft_ms"] == pytest.approx(200.0)
    assert r["targets"] == ["twin"]


def test_plot_writes_png_for_trace_and_steps(tmp_path: Path) -> None:
    df, ctx = synthesize(6, [1.0], [8], 100.0, seed=0)
    p = schema.write(tmp_path / "t.parquet", df, "trace", ctx)
    res = CliRunner().invoke(main, ["inspect", str(p), "--json", "--plot", str(tmp_path / "t.png")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["plot"] == str(tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
