"""The metrics and the trace check on Arrow and polars alike (one implementation, every
caller), and `twin run`'s path without polars."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracekit import schema
from tracekit.metrics import PERCENTILES, itl_values, percentiles, summarize, window_of
from tracekit.schema import RESULT_STATUSES, TracekitError, check_trace, new_context
from tracekit.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=1, max_size=300))
def test_percentiles_are_numpys_to_the_bit(values: list[float]) -> None:
    v = np.asarray(values)
    assert percentiles(v.copy()).tobytes() == np.percentile(v, PERCENTILES).tobytes()


def test_percentiles_are_numpys_on_large_arrays_with_ties() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 100, 101, 86_562):
        for v in (rng.random(n), rng.integers(0, 4, n).astype(float), np.exp(rng.normal(0, 3, n))):
            assert percentiles(v).tobytes() == np.percentile(v, PERCENTILES).tobytes()


def results_frame(n: int = 4000, seed: int = 0) -> pl.DataFrame:
    """Results with every status, null latencies and tokens, and recorded ITL lists."""
    rng = np.random.default_rng(seed)
    status = rng.choice(list(RESULT_STATUSES), n)
    arrival = np.sort(rng.uniform(0, 100, n))
    ok = status == "ok"
    ttft = np.where(ok, rng.uniform(0.01, 2, n), np.nan)
    gen = rng.integers(1, 300, n)
    tpot = np.where(ok & (gen > 1), rng.uniform(0.01, 0.05, n), np.nan)
    itl = [None if rng.random() < 0.3 else list(rng.uniform(0.01, 0.05, rng.integers(0, 4)).astype(np.float32))
           for _ in range(n)]  # fmt: skip
    df = pl.DataFrame({
        "request_id": [f"q{i}" for i in range(n)], "arrival_s": arrival, "adapter": rng.choice(["a", "b"], n),
        "prompt_tokens": rng.integers(1, 4000, n).astype(np.int32), "output_tokens": rng.integers(1, 500, n).astype(np.int32),
        "target": ["t"] * n, "status": status, "dispatch_s": arrival + 0.001,
        "first_token_s": arrival + ttft, "end_s": np.where(ok, arrival + 10, np.nan),
        "generated_tokens": pl.Series(np.where(rng.random(n) < 0.2, -1, gen)).replace(-1, None).cast(pl.Int32),
        "ttft_s": ttft, "e2e_s": np.where(ok, 10.0, np.nan), "tpot_s": tpot,
        "itl_s": pl.Series(itl, dtype=pl.List(pl.Float32)),
    })  # fmt: skip
    return df.with_columns(pl.col(c).fill_nan(None) for c in ("first_token_s", "end_s", "ttft_s", "e2e_s", "tpot_s"))


@pytest.mark.parametrize("ctx", [{}, {"window_s": 80.0}, {"window_s": 100.0, "warmup_s": 20.0}])
def test_summarize_is_the_same_on_a_polars_frame_and_on_arrow(ctx: dict) -> None:
    df = results_frame()
    want = summarize(df, ctx)
    for other in (df.to_arrow(), df.with_columns(pl.col("status").cast(pl.Categorical)).to_arrow(),
                  pa.Table.from_batches(df.to_arrow().to_batches(max_chunksize=999))):  # fmt: skip
        got = summarize(other, ctx)
        assert list(got) == list(want) and got == want
    counted = df.filter(pl.col("arrival_s") >= ctx.get("warmup_s", 0.0))
    assert want["requests"] == counted.height and want["completed"] == int((counted["status"] == "ok").sum())
    assert want["errors"] == int(counted["status"].is_in(["error", "timeout"]).sum())
    assert want["mean_itl_ms"] is not None
    # Without recorded gaps: each request's mean gap, weighted by its gaps.
    no_itl = df.drop("itl_s")
    s = summarize(no_itl, ctx)
    assert s == summarize(no_itl.to_arrow(), ctx)
    ok = no_itl.filter((pl.col("status") == "ok") & (pl.col("arrival_s") >= ctx.get("warmup_s", 0.0)))
    gaps = itl_values(ok)
    assert s["mean_itl_ms"] == pytest.approx(gaps.mean() * 1e3)
    assert window_of(df, ctx) == window_of(df.to_arrow(), ctx)


def test_token_sums_do_not_overflow_int32() -> None:
    """A million 7k-token prompts offer 7e9 tokens: more than an int32 holds."""
    n = 1_000_000
    t = pa.table({"arrival_s": np.linspace(0, 3599, n), "prompt_tokens": np.full(n, 7000, np.int32),
                  "output_tokens": np.full(n, 300, np.int32), "status": pa.array(["unfinished"] * n).dictionary_encode(),
                  "generated_tokens": np.zeros(n, np.int32), "ttft_s": np.full(n, np.nan), "tpot_s": np.full(n, np.nan),
                  "e2e_s": np.full(n, np.nan), "dispatch_s": np.zeros(n)})  # fmt: skip
    s = summarize(t, {"window_s": 3600.0})
    assert s["offered_tok_s"] == pytest.approx(7300 * n / 3600.0)
    assert s["served_frac"] == 0.0 and s["starved"]


def test_check_trace_reads_arrow_and_polars_alike() -> None:
    ids = [f"id-{i:04d}" for i in range(50)]  # one width: compared as bytes
    t = pa.table({"request_id": ids, "arrival_s": np.arange(50.0), "prompt_tokens": np.ones(50, np.int32),
                  "output_tokens": np.ones(50, np.int32)})  # fmt: skip
    for data in (t, pl.from_arrow(t), pl.from_arrow(t).lazy(), pa.Table.from_batches(t.to_batches(max_chunksize=7))):
        assert check_trace(data, "f") == schema.TraceCheck(rows=50, unsorted_row=None)
    # A repeat far from its first row, in another chunk, ids of one width or of several.
    for rid in (ids[:40] + [ids[3]] + ids[41:], [f"r{i}" for i in range(40)] + ["r3"] + [f"r{i}" for i in range(41, 50)]):
        bad = t.set_column(0, "request_id", pa.array(rid))
        for data in (bad, pl.from_arrow(bad).lazy(), pa.Table.from_batches(bad.to_batches(max_chunksize=7))):
            with pytest.raises(TracekitError, match=rf"^f: row 40: request_id '{rid[3]}' repeats row 3 "):
                check_trace(data, "f")
    # Shuffled unique ids take the hashing path and pass; the first late arrival is found.
    late = t.set_column(0, "request_id", pa.array(ids[::-1])).set_column(1, "arrival_s", pa.array([0.0, 2.0, 1.0] + [5.0] * 47))
    assert check_trace(late, "f").unsorted_row == 2
    # Shuffled ids of more than 8 bytes (fingerprinted) with one repeat.
    long_ids = [f"request-{i:06d}" for i in range(50)][::-1]
    long_ids[30] = long_ids[12]
    with pytest.raises(TracekitError, match=rf"^f: row 30: request_id '{long_ids[12]}' repeats row 12 "):
        check_trace(t.set_column(0, "request_id", pa.array(long_ids)), "f")
    nulls = t.set_column(3, "output_tokens", pa.array([1] * 9 + [None] * 41, pa.int32()))
    with pytest.raises(TracekitError, match="^f: row 9: output_tokens must be at least 1, got None$"):
        check_trace(nulls, "f")
    inf = t.set_column(1, "arrival_s", pa.array([0.0] * 20 + [np.inf] * 30))
    with pytest.raises(TracekitError, match="^f: row 20: arrival_s must be a non-negative number, got inf$"):
        check_trace(inf, "f")


def test_float_columns_are_byte_stream_split_and_read_back_the_same(tmp_path: Path) -> None:
    tr, ctx = synthesize(4, [1.0], [8], 30.0, seed=0)
    p = schema.write(tmp_path / "t.parquet", tr, "trace", ctx)
    col = pq.ParquetFile(p).metadata.row_group(0).column(1)
    assert col.path_in_schema == "arrival_s" and "BYTE_STREAM_SPLIT" in col.encodings
    df, _ = schema.read(p)
    assert df.equals(pl.from_arrow(tr) if isinstance(tr, pa.Table) else tr)
    assert pl.read_parquet(p).equals(df)


def test_twin_run_json_imports_no_polars(tmp_path: Path) -> None:
    """`twin run --json` reads, checks, simulates, summarises and writes without
    importing polars (a tenth of a second of its start), numpy.ma or pyarrow.compute."""
    tr, ctx = synthesize(8, [0.5], [8, 16], 60.0, seed=1)
    p = schema.write(tmp_path / "t.parquet", tr, "trace", new_context(**ctx))
    code = ("import sys, json; from twin.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(json.dumps([m for m in ('polars', 'numpy.ma', 'pyarrow.compute') if m in sys.modules]))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, "run", str(p), "--profile", "h100-llama-3.1-8b", "--max-loras", "4",
                          "--json", "--out", str(tmp_path / "r.parquet")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert json.loads(out.stdout)["requests"] == (tr.num_rows if isinstance(tr, pa.Table) else tr.height)
    assert json.loads(out.stderr.strip().splitlines()[-1]) == []


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.lists(st.binary(min_size=0, max_size=20), min_size=2, max_size=40))
def test_id_order_of_one_width_is_byte_order(width: int, raw: list[bytes]) -> None:
    """Ids of one width compared as 8-byte words: the same answers as Python's byte
    comparison, NUL bytes included."""
    ids = [(b + b"\x00" * width)[:width] for b in raw]
    col = pa.chunked_array([pa.array(ids, pa.binary())])
    words = schema._id_words(schema._fixed_width_ids(col))
    pairs = list(zip(ids, ids[1:], strict=False))
    want = (any(b < a for a, b in pairs), any(b == a for a, b in pairs))
    assert schema._id_order(col, words) == want
    assert schema._maybe_repeats(col, words) >= (len(set(ids)) < len(ids))
