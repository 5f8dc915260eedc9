"""`tracekit import table`: a user's own CSV, Parquet or JSONL in, a proper trace out."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tracekit import schema
from tracekit.cli import main
from tracekit.import_table import import_table, parse_map
from tracekit.schema import TracekitError

LOG_CSV = """ts,model,input_len,output_len,user
2024-05-10T10:00:00Z,support-bot,120,40,acme
2024-05-10T12:00:00.5+02:00,base,300,10,acme
2024-05-10T10:00:01.25Z,sql-gen,80,200,globex
2024-05-10T10:00:00.75Z,support-bot,50,20,acme
"""
LOG_MAP = "arrival_s=ts,adapter=model,prompt_tokens=input_len,output_tokens=output_len,tenant=user"


def run(*args: str) -> object:
    return CliRunner().invoke(main, ["import", "table", *args])


def one_error(res: object) -> str:
    assert res.exit_code == 2, res.output  # type: ignore[attr-defined]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr  # type: ignore[attr-defined]
    return lines[0]


def test_csv_log_with_mapped_columns_and_iso_times(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    f.write_text(LOG_CSV)
    out = tmp_path / "t.parquet"
    res = run(str(f), "--map", LOG_MAP, "--base-model", "base", "--rank", "16", "--out", str(out))
    assert res.exit_code == 0, res.output
    df, meta = schema.read_trace(out)
    # The +02:00 row is 10:00:00.5 UTC: zones are honoured; 0 is the first request.
    assert df["arrival_s"].to_list() == [0.0, 0.5, 0.75, 1.25]
    assert df["adapter"].to_list() == ["support-bot", None, "support-bot", "sql-gen"]
    assert df["prompt_tokens"].to_list() == [120, 300, 50, 80]
    assert df["tenant"].to_list() == ["acme", "acme", "acme", "globex"]
    assert df["request_id"].to_list() == ["row-00000000", "row-00000001", "row-00000003", "row-00000002"]
    ctx = meta.context
    assert ctx["source"] == "table"
    assert ctx["adapters"] == {"sql-gen": {"rank": 16, "path": None}, "support-bot": {"rank": 16, "path": None}}
    assert ctx["window_s"] == pytest.approx(1.25 * (1 + 1 / 4))
    assert ctx["generator"]["sorted_on_import"] is True
    assert ctx["generator"]["time_zero_utc_us"] == int(datetime(2024, 5, 10, 10, tzinfo=timezone.utc).timestamp() * 1e6)
    assert "sorted by arrival" in res.stdout and "columns mapped" in res.stdout


def test_plain_parquet_with_the_documented_columns_needs_no_flags(tmp_path: Path) -> None:
    src = pl.DataFrame({
        "request_id": ["a", "b", "c"], "arrival_s": [0.25, 0.5, 1.0], "adapter": ["x", None, "y"],
        "prompt_tokens": [10, 20, 30], "output_tokens": [5, 6, 7], "other": [1, 2, 3],
    })
    src.write_parquet(tmp_path / "plain.parquet")
    out = tmp_path / "t.parquet"
    res = run(str(tmp_path / "plain.parquet"), "--out", str(out), "--window", "2")
    assert res.exit_code == 0, res.output
    df, meta = schema.read_trace(out)
    assert df.to_dict(as_series=False) == src.drop("other").with_columns(
        pl.col("prompt_tokens").cast(pl.Int32), pl.col("output_tokens").cast(pl.Int32)).to_dict(as_series=False)
    assert meta.context["window_s"] == 2.0 and set(meta.context["adapters"]) == {"x", "y"}
    # Importing a trace again gives the same rows.
    again = tmp_path / "again.parquet"
    assert run(str(out), "--out", str(again)).exit_code == 0
    assert schema.read_trace(again)[0].equals(df)


def test_jsonl_clock_in_ms_starts_at_the_first_request_with_a_note(tmp_path: Path) -> None:
    f = tmp_path / "log.jsonl"
    rows = [{"t": 1715335200000 + k, "in": 3, "out": 4, "id": f"q{k}"} for k in (0, 500, 250)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "t.parquet"
    res = run(str(f), "--map", "arrival_s=t,prompt_tokens=in,output_tokens=out,request_id=id",
              "--time-unit", "ms", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    assert res.stderr.startswith(f"note: {f}: arrivals start at 1,715,335,200 s")
    df, _ = schema.read_trace(out)
    assert df["arrival_s"].to_list() == [0.0, 0.25, 0.5] and df["request_id"].to_list() == ["q0", "q250", "q500"]
    assert json.loads(res.stdout)["sorted_on_import"] is True
    # --time-zero keep keeps the clock, in seconds.
    kept, _ = import_table(f, mapping=parse_map(("arrival_s=t,prompt_tokens=in,output_tokens=out",)),
                           time_unit="ms", time_zero="keep")
    assert kept["arrival_s"].min() == pytest.approx(1715335200.0)


def test_numbers_in_us_and_parquet_timestamps(tmp_path: Path) -> None:
    f = tmp_path / "us.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,1,1\n1500000,2,2\n")
    df, _ = import_table(f, time_unit="us")
    assert df["arrival_s"].to_list() == [0.0, 1.5]
    ts = pl.DataFrame({
        "when": [datetime(2024, 1, 1, 0, 0, 1), datetime(2024, 1, 1), datetime(2024, 1, 1, 0, 0, 0, 250000)],
        "prompt_tokens": [1, 2, 3], "output_tokens": [1, 1, 1],
    })
    ts.write_parquet(tmp_path / "ts.parquet")
    df, ctx = import_table(tmp_path / "ts.parquet", mapping={"arrival_s": "when"})
    assert df["arrival_s"].to_list() == [0.0, 0.25, 1.0] and df["prompt_tokens"].to_list() == [2, 3, 1]


def test_ranks_from_a_lora_dir_and_a_rank_column(tmp_path: Path) -> None:
    for name, r in (("support-bot", 8), ("sql-gen", 32)):
        (tmp_path / "loras" / name).mkdir(parents=True)
        (tmp_path / "loras" / name / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    f = tmp_path / "log.csv"
    f.write_text(LOG_CSV)
    _, ctx = import_table(f, mapping=parse_map((LOG_MAP,)), lora_dir=tmp_path / "loras")
    ads = ctx["adapters"]
    assert ads["support-bot"] == {"rank": 8, "path": str((tmp_path / "loras" / "support-bot").resolve())}
    assert ads["sql-gen"]["rank"] == 32 and ads["base"] == {"rank": None, "path": None}
    g = tmp_path / "ranked.csv"
    g.write_text("arrival_s,adapter,rank,prompt_tokens,output_tokens\n0,a,8,1,1\n1,b,,1,1\n2,a,8,1,1\n")
    _, ctx = import_table(g)
    assert ctx["adapters"] == {"a": {"rank": 8, "path": None}, "b": {"rank": None, "path": None}}
    g.write_text("arrival_s,adapter,rank,prompt_tokens,output_tokens\n0,a,8,1,1\n1,a,16,1,1\n")
    with pytest.raises(TracekitError, match="adapter 'a' has ranks 8 and 16"):
        import_table(g)


def test_a_file_without_adapters_draws_them_only_when_asked(tmp_path: Path) -> None:
    f = tmp_path / "n.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{i},3,4\n" for i in range(50)))
    df, ctx = import_table(f)
    assert df["adapter"].null_count() == 50 and ctx["adapters"] == {}
    df, ctx = import_table(f, adapters=5, popularity="zipf:1", ranks=[8, 16], seed=3)
    assert df["adapter"].null_count() == 0 and len(ctx["adapters"]) == 5
    assert {a["rank"] for a in ctx["adapters"].values()} == {8, 16}
    g = tmp_path / "log.csv"
    g.write_text(LOG_CSV)
    with pytest.raises(TracekitError, match="--adapters: .* names its adapters"):
        import_table(g, mapping=parse_map((LOG_MAP,)), adapters=3)


@pytest.mark.parametrize(
    "name,content,args,msg",
    [
        ("a.csv", "arrival_s,prompt_tokens,output_tokens\n0,3,3\n1,0,3\nx,3,3\n", [],
         "a.csv: line 3: prompt_tokens must be a whole number >= 1, got '0'"),
        ("b.csv", "ts,p,o\n0,3,3\n1,3,2.5\n", ["--map", "arrival_s=ts,prompt_tokens=p,output_tokens=o"],
         "b.csv: line 3: output_tokens (column 'o') must be a whole number >= 1, got '2.5'"),
        ("c.csv", "arrival_s,prompt_tokens,output_tokens\n0,3,3\n-1,3,3\n", [],
         "c.csv: line 3: arrival_s must be a non-negative number, got '-1'"),
        ("d.csv", "arrival_s,prompt_tokens,output_tokens\n2024-01-01 00:00:00,3,3\nlater,3,3\n", [],
         "d.csv: line 3: arrival_s is not a date-time"),
        ("e.csv", "request_id,arrival_s,prompt_tokens,output_tokens\nq,0,3,3\nr,1,3,3\nq,2,3,3\n", [],
         "e.csv: line 4: request_id 'q' repeats line 2 (request ids must be unique)"),
        ("f.csv", "time,prompt_tokens,output_tokens\n0,3,3\n", [],
         "f.csv: missing column 'arrival_s'; name yours with --map arrival_s=YOUR_COLUMN (columns: time, prompt_tokens"),
        ("g.csv", "arrival_s,prompt_tokens,output_tokens\n0,3,3\n", ["--map", "arrival_s=when"],
         "g.csv: no column 'when' (for --map arrival_s=when)"),
        ("h.csv", "arrival_s,prompt_tokens,output_tokens\n0,3,3\n", ["--map", "arrival=when"],
         "--map 'arrival=when': 'arrival' is not a trace column"),
        ("i.jsonl", '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 3}\n{"arrival_s": 1, "prompt_tokens": null, "output_tokens": 3}\n', [],
         "i.jsonl: line 2: prompt_tokens must be a whole number >= 1, got None"),
        ("j.csv", "arrival_s,prompt_tokens,output_tokens\n", [], "j.csv: no requests in the file"),
    ],
)
def test_bad_tables_give_one_line_naming_the_line_and_column(tmp_path: Path, name, content, args, msg) -> None:
    f = tmp_path / name
    f.write_text(content)
    out = tmp_path / "t.parquet"
    line = one_error(run(str(f), *args, "--out", str(out)))
    assert msg in line, line
    assert not out.exists()


def test_bad_parquet_rows_are_named_by_row(tmp_path: Path) -> None:
    pl.DataFrame({"arrival_s": [0.0, float("nan")], "prompt_tokens": [1, 1], "output_tokens": [1, 1]}).write_parquet(
        tmp_path / "n.parquet")
    assert "n.parquet: row 1: arrival_s must be a non-negative number, got nan" in one_error(
        run(str(tmp_path / "n.parquet"), "--out", str(tmp_path / "t.parquet")))


def test_drop_invalid_counts_what_it_drops(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,3,3\n1,3,0\n,3,3\n3,3,3\n")
    res = run(str(f), "--drop-invalid", "--out", str(tmp_path / "t.parquet"), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["dropped_invalid"] == 2
    df, meta = schema.read_trace(tmp_path / "t.parquet")
    assert df["arrival_s"].to_list() == [0.0, 3.0] and meta.context["generator"]["dropped_invalid"] == 2


def test_window_leaves_out_later_requests(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    f.write_text("arrival_s,prompt_tokens,output_tokens\n0,3,3\n1,3,3\n5,3,3\n")
    df, ctx = import_table(f, window=2.0)
    assert df.height == 2 and ctx["window_s"] == 2.0 and ctx["generator"]["after_window"] == 1


def test_other_commands_name_this_command_for_a_table(tmp_path: Path) -> None:
    f = tmp_path / "log.csv"
    f.write_text(LOG_CSV)
    pl.DataFrame({"arrival_s": [0.0], "prompt_tokens": [1], "output_tokens": [1]}).write_parquet(tmp_path / "p.parquet")
    for path in (f, tmp_path / "p.parquet"):
        line = one_error(CliRunner().invoke(main, ["inspect", str(path)]))
        assert f"`tracekit import table {path} --out trace.parquet`" in line
    line = one_error(CliRunner().invoke(main, ["import", "azure", str(tmp_path / "p.parquet"), "--adapters", "2",
                                               "--out", str(tmp_path / "z.parquet")]))
    assert "a Parquet file, not CSV text" in line and "tracekit import table" in line and len(line) < 300


rows_strategy = st.lists(
    st.tuples(st.floats(0, 1e5, allow_nan=False), st.integers(1, 10**6), st.integers(1, 10**5),
              st.sampled_from([None, "a", "b", "c"])),
    min_size=1, max_size=40,
)


@given(rows=rows_strategy, fmt=st.sampled_from(["csv", "parquet", "jsonl"]))
@settings(max_examples=40, deadline=None)
def test_every_valid_row_arrives_as_written(tmp_path_factory, rows, fmt) -> None:
    d = tmp_path_factory.mktemp("t")
    src = pl.DataFrame(
        {"arrival_s": [r[0] for r in rows], "prompt_tokens": [r[1] for r in rows],
         "output_tokens": [r[2] for r in rows], "adapter": [r[3] for r in rows]},
        schema={"arrival_s": pl.Float64, "prompt_tokens": pl.Int64, "output_tokens": pl.Int64, "adapter": pl.String},
    )
    f = d / f"in.{fmt}"
    {"csv": src.write_csv, "parquet": src.write_parquet, "jsonl": src.write_ndjson}[fmt](f)
    df, ctx = import_table(f, time_zero="keep")
    order = np.argsort(src["arrival_s"].to_numpy(), kind="stable")
    assert df["arrival_s"].to_list() == pytest.approx(src["arrival_s"].to_numpy()[order].tolist(), rel=1e-15)
    assert df["prompt_tokens"].to_list() == src["prompt_tokens"].to_numpy()[order].tolist()
    assert df["adapter"].to_list() == [src["adapter"][int(i)] for i in order]
    assert set(ctx["adapters"]) == set(src["adapter"].drop_nulls().to_list())
    schema.write(d / "t.parquet", df, "trace", ctx)  # a valid trace
