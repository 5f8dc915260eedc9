"""`replay report`, `replay compare`, the twin target, and the results-building invariants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.cli import main as replay_main
from replay.runner import ERROR, OK, TIMEOUT, UNFINISHED, Recorder
from replay.targets import results_from_recorder
from tracekit.metrics import summarize
from tracekit.schema import new_context, read, write

REQUIRED_JSON_KEYS = {"throughput_tok_s", "output_tok_s", "completed", "unfinished", "errors",
                      "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "starved"}


def synth_trace(tmp_path: Path, duration: float = 20.0) -> Path:
    from tracekit.cli import main as tk

    out = tmp_path / "trace.parquet"
    res = CliRunner().invoke(tk, ["synth", "--adapters", "6", "--rates", "0.8,0.4", "--ranks", "8,16",
                                  "--window", str(duration), "--lengths", "fixed:64,32", "--seed", "1",
                                  "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def twin_run(trace: Path, out: Path, *extra: str) -> None:
    res = CliRunner().invoke(replay_main, ["run", str(trace), "--target", "twin", "--profile", "h100-llama-3.1-8b",
                                           "--max-loras", "4", "--max-cpu-loras", "6", "--out", str(out), *extra])
    assert res.exit_code == 0, res.output


def test_twin_target_writes_results_of_the_whole_trace(tmp_path: Path) -> None:
    trace = synth_trace(tmp_path)
    twin_run(trace, tmp_path / "twin.parquet")
    tr, _ = read(trace, "trace")
    res, meta = read(tmp_path / "twin.parquet", "results")
    assert sorted(res["request_id"].to_list()) == sorted(tr["request_id"].to_list())
    assert set(res["target"].unique()) == {"twin"}
    assert meta.context["serving_config"]["max_loras"] == 4
    assert meta.context["window_s"] == 20.0 and meta.context["target"] == "twin"
    ok = res.filter(pl.col("status") == "ok")
    assert ok.height > 0 and (ok["generated_tokens"] == ok["output_tokens"]).all()


def test_report_json_tables_and_plots(tmp_path: Path) -> None:
    trace = synth_trace(tmp_path)
    twin_run(trace, tmp_path / "twin.parquet")
    res = CliRunner().invoke(replay_main, ["report", str(tmp_path / "twin.parquet"), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert REQUIRED_JSON_KEYS <= set(s)
    df, meta = read(tmp_path / "twin.parquet", "results")
    assert s["completed"] == int((df["status"] == "ok").sum())
    assert s["completed"] + s["unfinished"] + s["errors"] == df.height
    assert {r["adapter"] for r in s["per_adapter"]} == set(df["adapter"].drop_nulls().unique())
    res = CliRunner().invoke(replay_main, ["report", str(tmp_path / "twin.parquet"), "--plots", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "starvation verdict" in res.output and "dispatch lag" in res.output
    for name in ("throughput.png", "running.png", "latency.png"):
        png = (tmp_path / "p" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compare_two_twin_configs_and_refuse_other_traces(tmp_path: Path) -> None:
    trace = synth_trace(tmp_path)
    twin_run(trace, tmp_path / "a.parquet")
    twin_run(trace, tmp_path / "b.parquet", "--max-num-seqs", "4")
    res = CliRunner().invoke(replay_main, ["compare", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"),
                                           "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    sa = summarize(*_load(tmp_path / "a.parquet"))
    sb = summarize(*_load(tmp_path / "b.parquet"))
    m = d["metrics"]["throughput_tok_s"]
    assert m["a"] == pytest.approx(sa["throughput_tok_s"]) and m["b"] == pytest.approx(sb["throughput_tok_s"])
    assert m["rel_err"] == pytest.approx((sb["throughput_tok_s"] - sa["throughput_tok_s"]) / sa["throughput_tok_s"])
    assert d["metrics"]["mean_ttft_ms"]["rel_err"] > 0  # 4 sequences at a time queue requests
    # Identical runs compare with zero error everywhere.
    res = CliRunner().invoke(replay_main, ["compare", str(tmp_path / "a.parquet"), str(tmp_path / "a.parquet"),
                                           "--json", "--plots", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    same = json.loads(res.output.splitlines()[0])
    assert all(v["rel_err"] in (0.0, None) for v in same["metrics"].values())
    assert (tmp_path / "p" / "compare_throughput.png").exists()
    # A different trace is refused with one line.
    other = tmp_path / "o"
    other.mkdir()
    twin_run(synth_trace(other, duration=10.0), tmp_path / "c.parquet")
    res = CliRunner().invoke(replay_main, ["compare", str(tmp_path / "a.parquet"), str(tmp_path / "c.parquet")])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "not a run of the same trace" in res.output


def _load(path: Path) -> tuple[pl.DataFrame, dict]:
    df, meta = read(path, "results")
    return df, meta.context


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([OK, ERROR, TIMEOUT, UNFINISHED]), st.integers(1, 50), st.floats(0, 5),
                  st.floats(0, 0.2), st.floats(0, 1), st.booleans()),
        min_size=1, max_size=40),
    st.floats(0, 3),
)
def test_results_from_recorder_invariants(rows: list, warmup: float) -> None:
    """Whatever happened to each request, the results conform, counts partition the
    requests, and only completed requests carry latencies, with ttft <= e2e."""
    n = len(rows)
    arrival = np.sort(np.array([r[2] for r in rows]))
    trace = pl.DataFrame({"request_id": [f"r{i}" for i in range(n)], "arrival_s": arrival,
                          "adapter": [None if i % 2 else "a" for i in range(n)],
                          "prompt_tokens": np.full(n, 8, np.int32),
                          "output_tokens": np.array([r[1] for r in rows], np.int32)})
    rec = Recorder(n)
    for i, (status, out_tok, _, lag, dur, sent) in enumerate(rows):
        rec.status[i] = status
        if status == UNFINISHED and not sent:
            continue
        rec.dispatch[i] = arrival[i] + lag
        if status == OK:
            rec.first_token[i] = rec.dispatch[i] + dur / 4
            rec.end[i] = rec.dispatch[i] + dur
            rec.generated[i] = out_tok
            rec.itl[i] = [dur * 0.75 / max(out_tok - 1, 1)] * (out_tok - 1)
        else:
            rec.end[i] = rec.dispatch[i] + dur
            rec.error[i] = "boom" if status != UNFINISHED else None
    table = results_from_recorder(trace, rec, "vllm")
    df = pl.from_arrow(table)
    ok = df.filter(pl.col("status") == "ok")
    assert ok.height == sum(r[0] == OK for r in rows)
    assert df.filter(pl.col("status") != "ok")["ttft_s"].null_count() == n - ok.height
    assert (ok["ttft_s"] <= ok["e2e_s"] + 1e-12).all()
    assert (df.filter(pl.col("dispatch_s").is_null())["error"] == "not sent").all()
    ctx = {"window_s": 6.0, "warmup_s": warmup}
    s = summarize(df, ctx)
    measured = df.filter(pl.col("arrival_s") >= warmup)
    assert s["requests"] == measured.height
    assert s["completed"] + s["unfinished"] + s["errors"] == measured.height
    assert s["window_s"] == pytest.approx(6.0 - warmup)


def test_results_file_roundtrip_keeps_itl_lists(tmp_path: Path) -> None:
    trace = pl.DataFrame({"request_id": ["x", "y"], "arrival_s": [0.0, 1.0], "adapter": [None, "a"],
                          "prompt_tokens": [4, 5], "output_tokens": [3, 1]})
    rec = Recorder(2)
    rec.status[:] = OK
    rec.dispatch[:] = [0.001, 1.002]
    rec.first_token[:] = [0.01, 1.01]
    rec.end[:] = [0.03, 1.01]
    rec.generated[:] = [3, 1]
    rec.itl = [[0.01, 0.01], []]
    path = write(tmp_path / "r.parquet", results_from_recorder(trace, rec, "vllm"), "results", new_context())
    df, _ = read(path, "results")
    assert df["itl_s"].to_list()[0] == pytest.approx([0.01, 0.01])
    assert df["tpot_s"].to_list()[0] == pytest.approx(0.01) and df["tpot_s"][1] is None
