"""The data contracts (tracekit.schema): round trips, and one clear error line for every
kind of invalid input the foundation issue lists, through the CLI (exit 2, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tracekit import schema
from tracekit.cli import main
from tracekit.schema import TracekitError


def trace_table(n: int = 4) -> pa.Table:
    return pa.table(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "arrival_s": pa.array(np.linspace(0.0, 3.0, n), pa.float64()),
            "adapter": ["lora-0000" if i % 2 else None for i in range(n)],
            "prompt_tokens": pa.array([10 + i for i in range(n)], pa.int32()),
            "output_tokens": pa.array([5 + i for i in range(n)], pa.int32()),
        }
    )


def steps_table(n: int = 3) -> pa.Table:
    return pa.table(
        {
            "step": pa.array(range(n), pa.int64()),
            "t_s": pa.array([0.1 * i for i in range(n)], pa.float64()),
            "duration_s": pa.array([0.05] * n, pa.float64()),
            "num_running": pa.array([2] * n, pa.int32()),
            "num_waiting": pa.array([0] * n, pa.int32()),
            "prefill_reqs": pa.array([1] * n, pa.int32()),
            "prefill_tokens": pa.array([100] * n, pa.int32()),
            "decode_reqs": pa.array([1] * n, pa.int32()),
            "decode_tokens": pa.array([1] * n, pa.int32()),
            "active_adapters": pa.array([["lora-0000"]] * n, pa.list_(pa.string())),
            "kv_usage": pa.array([0.25] * n, pa.float64()),
            "num_preempted": pa.array([0] * n, pa.int32()),
            "adapter_loads": pa.array([0] * n, pa.int32()),
        }
    )


def results_table(n: int = 4) -> pa.Table:
    t = trace_table(n)
    arr = t.column("arrival_s").to_numpy()
    extra = {
        "target": ["twin"] * n,
        "status": ["ok"] * (n - 1) + ["unfinished"],
        "dispatch_s": arr,
        "first_token_s": arr + 0.1,
        "end_s": arr + 0.5,
        "generated_tokens": pa.array([5 + i for i in range(n)], pa.int32()),
        "ttft_s": [0.1] * n,
        "e2e_s": [0.5] * n,
        "tpot_s": [0.01] * n,
        "error": [None] * n,
    }
    for k, v in extra.items():
        t = t.append_column(k, pa.array(v) if not isinstance(v, pa.Array) else v)
    return t


def raw_write(path: Path, table: pa.Table, kind: str = "trace", version: str = "1", context: str = "{}") -> Path:
    """Write Parquet by hand (bypassing validation) to build invalid files."""
    md = {b"tracekit.kind": kind.encode(), b"tracekit.schema": version.encode(), b"tracekit.context": context.encode()}
    pq.write_table(table.replace_schema_metadata(md), path)
    return path


def cli_error(path: Path) -> str:
    """Run `tracekit inspect PATH`; assert one error line and exit 2; return the line."""
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)  # not an uncaught exception
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in res.output
    return lines[0]


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,table", [("trace", trace_table()), ("steps", steps_table()), ("results", results_table())]
)
def test_round_trip_keeps_data_and_metadata(tmp_path: Path, kind: str, table: pa.Table) -> None:
    ctx = schema.new_context(source="test", adapters={"lora-0000": {"rank": 8, "path": None}})
    p = schema.write(tmp_path / f"{kind}.parquet", table, kind, ctx)
    back, meta = schema.read_arrow(p)
    assert meta.kind == kind and meta.schema == schema.SCHEMA_VERSION
    assert meta.context["source"] == "test"
    assert schema.adapter_ranks(meta.context) == {"lora-0000": 8}
    assert back.schema.names == [f.name for f in schema.full_schema(kind) if f.name in table.column_names]
    for name in table.column_names:
        assert back.column(name).to_pylist() == table.column(name).to_pylist()
    assert not list(tmp_path.glob(".*tmp")), "temp file left behind"


def test_write_casts_to_canonical_types_and_drops_unknown_columns(tmp_path: Path) -> None:
    t = trace_table().set_column(3, "prompt_tokens", pa.array([1, 2, 3, 4], pa.int64()))
    t = t.append_column("junk", pa.array([1, 2, 3, 4]))
    schema.write(tmp_path / "t.parquet", t, "trace")
    s = pq.read_schema(tmp_path / "t.parquet")
    assert s.field("prompt_tokens").type == pa.int32()
    assert "junk" not in s.names


def test_dictionary_encoded_strings_write_the_file_of_their_decoded_table(tmp_path: Path) -> None:
    # A conformed table may keep string columns dictionary-encoded (the twin's adapter,
    # target and status): the file must be the one the plain strings give -- the same
    # key-value metadata (the stored Arrow schema included), Parquet schema and data, for
    # pyarrow and polars readers alike.
    rng = np.random.default_rng(0)
    n = 3000
    names = pa.array(["lora-a", "lora-b", None, "lora-c"])
    plain = pa.table({
        "request_id": pa.array([f"r{i:05d}" for i in range(n)]),
        "arrival_s": pa.array(np.sort(rng.uniform(0, 100, n))),
        "adapter": names.take(pa.array(rng.integers(0, 4, n))),
        "prompt_tokens": pa.array(rng.integers(1, 500, n).astype(np.int32)),
        "output_tokens": pa.array(rng.integers(1, 500, n).astype(np.int32)),
        "prefix_hashes": pa.array([[int(x) for x in rng.integers(0, 9, int(k))] for k in rng.integers(0, 4, n)],
                                  pa.list_(pa.int64())),
    })  # fmt: skip
    plain = schema.conform(plain, "trace")
    parts = [plain.slice(0, 1000), plain.slice(1000)]  # two chunks, each its own dictionary
    chunks = [t.column("adapter").combine_chunks().dictionary_encode() for t in parts]
    encoded = plain.set_column(2, pa.field("adapter", chunks[0].type), pa.chunked_array(chunks))
    ctx = {"source": "test"}
    a = schema.write(tmp_path / "plain.parquet", plain, "trace", ctx, row_group_size=1200, conformed=True)
    b = schema.write(tmp_path / "encoded.parquet", encoded, "trace", ctx, row_group_size=1200, conformed=True)
    ma, mb = pq.read_metadata(a), pq.read_metadata(b)
    assert ma.metadata == mb.metadata and ma.schema.equals(mb.schema)
    assert pq.read_table(a).equals(pq.read_table(b))
    assert pq.read_schema(b).field("adapter").type == pa.string()
    assert pl.read_parquet(a).equals(pl.read_parquet(b)) and pl.read_parquet(b).schema["adapter"] == pl.String
    assert schema.read_arrow(b)[0].equals(schema.read_arrow(a)[0])


def test_directory_of_parts_reads_as_one_dataset(tmp_path: Path) -> None:
    w = schema.PartWriter(tmp_path / "cap", "trace", {"source": "test"})
    w.write_part(trace_table(3))
    w.write_part(trace_table(5).set_column(0, "request_id", pa.array([f"s{i}" for i in range(5)])))
    (tmp_path / "cap" / "_SUCCESS").write_text("")  # ignored, like any Parquet reader does
    df, meta = schema.read(tmp_path / "cap")
    assert df.height == 8 and meta.context["parts"] == 2
    lf, _ = schema.scan(tmp_path / "cap")
    assert lf.select(pl.len()).collect().item() == 8


@given(
    arrivals=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30),
    data=st.data(),
)
@settings(max_examples=30, deadline=None)
def test_read_trace_sorts_and_round_trips_any_valid_trace(tmp_path_factory, arrivals, data) -> None:
    n = len(arrivals)
    prompt = data.draw(st.lists(st.integers(1, 2**31 - 1), min_size=n, max_size=n))
    t = pa.table(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "arrival_s": pa.array(arrivals, pa.float64()),
            "adapter": [None] * n,
            "prompt_tokens": pa.array(prompt, pa.int32()),
            "output_tokens": pa.array([1] * n, pa.int32()),
        }
    )
    p = schema.write(tmp_path_factory.mktemp("t") / "t.parquet", t, "trace")
    df, _ = schema.read_trace(p)
    assert df["arrival_s"].to_list() == sorted(arrivals)
    assert sorted(df["prompt_tokens"].to_list()) == sorted(prompt)


# --- invalid input: one line naming the file and the problem, exit 2 --------------------


def test_missing_column(tmp_path: Path) -> None:
    p = raw_write(tmp_path / "t.parquet", trace_table().drop_columns(["output_tokens"]))
    line = cli_error(p)
    assert str(p) in line and "missing column 'output_tokens'" in line
    with pytest.raises(TracekitError, match="missing column 'output_tokens'"):
        schema.read(p)


def test_wrong_type(tmp_path: Path) -> None:
    t = trace_table().set_column(3, "prompt_tokens", pa.array(["a", "b", "c", "d"]))
    p = raw_write(tmp_path / "t.parquet", t)
    line = cli_error(p)
    assert str(p) in line and "'prompt_tokens' has type string" in line


def test_non_numeric_arrival(tmp_path: Path) -> None:
    t = trace_table().set_column(1, "arrival_s", pa.array(["0", "1", "soon", "3"]))
    p = raw_write(tmp_path / "t.parquet", t)
    line = cli_error(p)
    assert str(p) in line and "'arrival_s' has type string" in line


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_negative_nan_or_infinite_arrival(tmp_path: Path, bad: float) -> None:
    t = trace_table().set_column(1, "arrival_s", pa.array([0.0, 1.0, bad, 3.0]))
    p = raw_write(tmp_path / "t.parquet", t)
    line = cli_error(p)
    assert str(p) in line and "row 2" in line and "arrival_s must be a non-negative number" in line
    with pytest.raises(TracekitError, match="row 2: arrival_s"):
        schema.read(p)


@pytest.mark.parametrize("col", ["prompt_tokens", "output_tokens"])
def test_zero_tokens(tmp_path: Path, col: str) -> None:
    t = trace_table()
    t = t.set_column(t.schema.get_field_index(col), col, pa.array([3, 0, 3, 3], pa.int32()))
    p = raw_write(tmp_path / "t.parquet", t)
    line = cli_error(p)
    assert str(p) in line and f"row 1: {col} must be at least 1" in line
    with pytest.raises(TracekitError, match=f"row 1: {col} must be at least 1"):
        schema.read(p)
    with pytest.raises(TracekitError, match=f"{col} must be at least 1"):
        schema.write(tmp_path / "w.parquet", t, "trace")


def test_unknown_kind(tmp_path: Path) -> None:
    p = raw_write(tmp_path / "t.parquet", trace_table(), kind="weights")
    line = cli_error(p)
    assert str(p) in line and "unknown tracekit.kind 'weights'" in line


def test_newer_schema_version(tmp_path: Path) -> None:
    p = raw_write(tmp_path / "t.parquet", trace_table(), version=str(schema.SCHEMA_VERSION + 1))
    line = cli_error(p)
    assert str(p) in line and "newer than this tool supports" in line


def test_csv_handed_in_as_parquet(tmp_path: Path) -> None:
    p = tmp_path / "trace.parquet"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n")
    line = cli_error(p)
    assert str(p) in line and "not a Parquet file" in line and "CSV" in line


def test_parquet_without_tracekit_metadata(tmp_path: Path) -> None:
    p = tmp_path / "plain.parquet"
    pq.write_table(trace_table(), p)
    assert "no tracekit.kind metadata" in cli_error(p)


def test_bad_context_json(tmp_path: Path) -> None:
    p = raw_write(tmp_path / "t.parquet", trace_table(), context="{not json")
    assert "tracekit.context is not valid JSON" in cli_error(p)


def test_missing_file_and_empty_directory(tmp_path: Path) -> None:
    assert "no such file or directory" in cli_error(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    assert "holds no Parquet parts" in cli_error(tmp_path / "empty")


def test_directory_mixing_kinds(tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    schema.write(d / "a.parquet", trace_table(), "trace")
    schema.write(d / "b.parquet", steps_table(), "steps")
    assert "part is a steps file, others are trace" in cli_error(d)


def test_expected_kind_mismatch(tmp_path: Path) -> None:
    p = schema.write(tmp_path / "s.parquet", steps_table(), "steps")
    with pytest.raises(TracekitError, match="expected a trace file, got a steps file"):
        schema.read_trace(p)


def test_results_bad_status_and_steps_negative_duration(tmp_path: Path) -> None:
    r = results_table()
    r = r.set_column(r.schema.get_field_index("status"), "status", pa.array(["ok", "ok", "lost", "ok"]))
    with pytest.raises(TracekitError, match="row 2: status must be one of"):
        schema.write(tmp_path / "r.parquet", r, "results")
    s = steps_table().set_column(2, "duration_s", pa.array([0.1, -0.1, 0.1]))
    with pytest.raises(TracekitError, match="duration_s is negative"):
        schema.write(tmp_path / "s.parquet", s, "steps")


def test_context_is_json_in_metadata(tmp_path: Path) -> None:
    p = schema.write(tmp_path / "t.parquet", trace_table(), "trace", {"window_s": 3.0, "seed": 1})
    md = pq.read_schema(p).metadata
    assert md[b"tracekit.kind"] == b"trace"
    assert int(md[b"tracekit.schema"]) == schema.SCHEMA_VERSION
    assert json.loads(md[b"tracekit.context"]) == {"window_s": 3.0, "seed": 1}


# --- the one trace validation (check_trace), shared by every command -------------------


def test_repeated_request_id_names_both_rows(tmp_path: Path) -> None:
    t = trace_table(5).set_column(0, "request_id", pa.array(["a", "b", "c", "b", "e"]))
    p = raw_write(tmp_path / "t.parquet", t)
    line = cli_error(p)
    assert line == f"error: {p}: row 3: request_id 'b' repeats row 1 (request ids must be unique)"
    # Ids out of sorted order take the hashing path; the line is the same.
    t = t.set_column(0, "request_id", pa.array(["z", "b", "c", "b", "a"]))
    assert "row 3: request_id 'b' repeats row 1" in cli_error(raw_write(tmp_path / "u.parquet", t))


def test_repeat_across_parts_names_the_part_files(tmp_path: Path) -> None:
    d = tmp_path / "cap"
    d.mkdir()
    raw_write(d / "part-0.parquet", trace_table(3))
    second = trace_table(3).set_column(0, "request_id", pa.array(["x", "r2", "y"]))
    raw_write(d / "part-1.parquet", second)
    line = cli_error(d)
    assert f"{d / 'part-1.parquet'}: row 1: request_id 'r2' repeats row 2 of {d / 'part-0.parquet'}" in line
    # A bad value in the second part is named by that part and its own row.
    bad = trace_table(3).set_column(0, "request_id", pa.array(["x", "y", "z"]))
    bad = bad.set_column(3, "prompt_tokens", pa.array([4, 4, 0], pa.int32()))
    raw_write(d / "part-1.parquet", bad)
    assert f"{d / 'part-1.parquet'}: row 2: prompt_tokens must be at least 1, got 0" in cli_error(d)


def test_read_trace_columns_checks_every_value_of_the_columns_it_reads(tmp_path: Path) -> None:
    """Columns read once for a command that needs only them (recommend --fast): their
    values get the same lines as the whole check; a column not read is not checked."""
    d = tmp_path / "cap"
    d.mkdir()
    raw_write(d / "part-0.parquet", trace_table(3))
    bad = trace_table(3).set_column(0, "request_id", pa.array(["x", "r2", "y"]))  # repeats part-0's r2
    raw_write(d / "part-1.parquet", bad)
    table, meta, check = schema.read_trace_columns(d, ["arrival_s", "adapter", "prompt_tokens"], dictionary=["adapter"])
    assert table.num_rows == 6 and check.rows == 6 and pa.types.is_dictionary(table.column("adapter").type)
    assert table.column_names == ["arrival_s", "adapter", "prompt_tokens"] and meta.kind == "trace"
    with pytest.raises(TracekitError, match="row 1: request_id 'r2' repeats row 2 of"):
        schema.read_trace_columns(d, ["request_id", "arrival_s"])
    raw_write(d / "part-1.parquet", bad.set_column(3, "prompt_tokens", pa.array([4, 4, 0], pa.int32())))
    with pytest.raises(TracekitError) as e:
        schema.read_trace_columns(d, ["arrival_s", "prompt_tokens"])
    assert str(e.value) == f"{d / 'part-1.parquet'}: row 2: prompt_tokens must be at least 1, got 0"
    assert schema.read_trace_columns(d, ["arrival_s", "output_tokens"])[2].rows == 6
    with pytest.raises(TracekitError, match="expected a trace file, got a steps file"):
        schema.read_trace_columns(raw_write(tmp_path / "s.parquet", steps_table(), "steps"), ["arrival_s"])


def test_iter_trace_columns_checks_each_row_group_and_names_its_row(tmp_path: Path) -> None:
    d = tmp_path / "cap"
    d.mkdir()
    raw_write(d / "part-0.parquet", trace_table(3))
    bad = trace_table(4).set_column(3, "prompt_tokens", pa.array([4, 4, 4, 0], pa.int32()))
    pq.write_table(bad.replace_schema_metadata(pq.read_schema(d / "part-0.parquet").metadata), d / "part-1.parquet",
                   row_group_size=2)  # two row groups: the bad row is row 1 of the second
    meta, rows, tables = schema.iter_trace_columns(d, ["arrival_s", "adapter", "prompt_tokens"], dictionary=["adapter"])
    assert rows == 7 and meta.kind == "trace"
    with pytest.raises(TracekitError) as e:
        list(tables)
    assert str(e.value) == f"{d / 'part-1.parquet'}: row 3: prompt_tokens must be at least 1, got 0"
    _, _, tables = schema.iter_trace_columns(d, ["arrival_s", "output_tokens"])
    assert [t.num_rows for t in tables] == [3, 2, 2]
    with pytest.raises(ValueError, match="request ids"):
        schema.iter_trace_columns(d, ["request_id"])


def test_unsorted_trace_is_sorted_on_read_with_one_note(tmp_path: Path) -> None:
    t = trace_table(4).set_column(1, "arrival_s", pa.array([0.0, 2.0, 1.0, 3.0]))
    p = raw_write(tmp_path / "t.parquet", t)
    df, _ = schema.read_trace(p)
    assert df["arrival_s"].to_list() == [0.0, 1.0, 2.0, 3.0]
    assert df["request_id"].to_list() == ["r0", "r2", "r1", "r3"]
    _, _, check = schema.scan_trace(p)
    assert check.unsorted_row == 2 and check.rows == 4
    res = CliRunner().invoke(main, ["inspect", str(p), "--json"])
    assert res.exit_code == 0
    assert res.stderr.splitlines() == [f"note: {p}: row 2: arrivals are not in order; sorted on read"]
    assert json.loads(res.stdout)["trace"]["first_arrival_s"] == 0.0

