"""tracekit import of the public trace formats, on hand-written samples (tests/data)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tracekit import schema
from tracekit.cli import main
from tracekit.importers import import_trace, tokens_from_block_hashes
from tracekit.schema import TracekitError

DATA = Path(__file__).parent / "data"


def run_import(tmp_path: Path, *args: str) -> tuple[object, Path]:
    out = tmp_path / "out.parquet"
    res = CliRunner().invoke(main, ["import", *args, "--out", str(out)])
    return res, out


def test_azure_2023(tmp_path: Path) -> None:
    res, out = run_import(tmp_path, "azure", str(DATA / "azure_2023_sample.csv"), "--adapters", "4", "--ranks", "8,16")
    assert res.exit_code == 0, res.output
    df, meta = schema.read(out, "trace")
    assert df.height == 12
    assert df["arrival_s"][0] == 0.0
    assert df["arrival_s"][1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-7)
    assert meta.context["window_s"] == pytest.approx(65.00149 - 46.68059, abs=1e-6)
    assert df["prompt_tokens"].to_list()[:3] == [374, 396, 879]
    assert df["output_tokens"].to_list()[:3] == [44, 109, 143]
    assert meta.context["source"] == "azure"
    assert Counter(schema.adapter_ranks(meta.context).values()) == Counter({8: 2, 16: 2})
    assert df["request_id"].n_unique() == 12 and df["request_id"][0] == "azure-00000000"


def test_azure_2024_timezone_suffix(tmp_path: Path) -> None:
    df, ctx, skipped = import_trace("azure", DATA / "azure_2024_sample.csv", adapters=2)
    assert df.height == 8 and skipped == {}
    assert df["arrival_s"].to_list()[:2] == pytest.approx([0.0, 0.0226170 - 0.0098590], abs=1e-9)
    assert ctx["window_s"] == pytest.approx(2.3300120 - 0.0098590, abs=1e-9)


def test_burstgpt_skips_failed_rows_and_says_so(tmp_path: Path) -> None:
    res, out = run_import(tmp_path, "burstgpt", str(DATA / "burstgpt_sample.csv"), "--adapters", "3")
    assert res.exit_code == 0, res.output
    assert "skipped (failed zero response)" in res.stdout and "│ 3" in res.stdout
    df, meta = schema.read(out)
    assert df.height == 8 and (df["output_tokens"] > 0).all()
    assert df["arrival_s"].to_list() == [0, 40, 135, 136, 156, 165, 177, 197]
    assert meta.context["generator"]["skipped"] == {"failed_zero_response": 3}


def test_mooncake_ms_timestamps() -> None:
    df, ctx, _ = import_trace("mooncake", DATA / "mooncake_sample.jsonl", adapters=2, popularity="zipf:1")
    assert df.height == 8
    assert df["arrival_s"].to_list() == pytest.approx([0, 0, 27.482, 30.535, 32.730, 39.369, 47.070, 57.794])
    assert df["prompt_tokens"][0] == 6955 and df["output_tokens"][0] == 52
    assert ctx["window_s"] == pytest.approx(57.794)


def test_window_and_speed() -> None:
    df, ctx, _ = import_trace("burstgpt", DATA / "burstgpt_sample.csv", adapters=2, start=100, end=190, speed=2.0)
    assert df["arrival_s"].to_list() == [17.5, 18.0, 28.0, 32.5, 38.5]
    assert ctx["window_s"] == 45.0
    assert ctx["generator"]["start"] == 100 and ctx["generator"]["speed"] == 2.0


def test_base_model_only_and_popularity() -> None:
    df, ctx, _ = import_trace("azure", DATA / "azure_2023_sample.csv", adapters=0)
    assert df["adapter"].null_count() == df.height and ctx["adapters"] == {}
    a, _, _ = import_trace("azure", DATA / "azure_2023_sample.csv", adapters=3, seed=5)
    b, _, _ = import_trace("azure", DATA / "azure_2023_sample.csv", adapters=3, seed=5)
    assert a.equals(b)
    assert set(a["adapter"]) <= {"lora-0000", "lora-0001", "lora-0002"}


@pytest.mark.parametrize(
    "fmt,content,msg",
    [
        ("azure", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,3\n", "missing column 'GeneratedTokens'"),
        ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,3,4\nyesterday,3,4\n", "line 3: TIMESTAMP is not a date-time"),
        ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,three,4\n", "line 2: ContextTokens is not an integer"),
        ("burstgpt", "Timestamp,Model,Request tokens,Response tokens\n1,m,2.5,3\n", "line 2: Request tokens is not an integer"),
        ("mooncake", '{"timestamp": 0, "input_length": 3, "output_length": 4}\n{"timestamp": 1,\n', "line 2: not valid JSON"),
        ("mooncake", '{"timestamp": 0, "input_length": 3}\n', "line 1: missing field 'output_length'"),
        ("mooncake", '{"timestamp": "x", "input_length": 3, "output_length": 4}\n', "line 1: timestamp is not a number"),
    ],
)
def test_bad_files_give_one_error_line_naming_file_and_line(tmp_path: Path, fmt, content, msg) -> None:
    f = tmp_path / "in.txt"
    f.write_text(content)
    res, out = run_import(tmp_path, fmt, str(f), "--adapters", "2")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(f) in lines[0] and msg in lines[0], res.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--speed", "0"], "--speed must be a positive number"),
        (["--start", "10", "--end", "5"], "--end (5.0) must be after --start"),
        (["--start", "10", "--window", "0"], "--window must be positive"),
        (["--window", "10", "--end", "5"], "--end is the old way to give --window"),
        (["--start", "1000"], "no requests left in the selected window"),
        (["--popularity", "zipf:x"], "--popularity 'zipf:x'"),
    ],
)
def test_bad_flags(tmp_path: Path, args, msg) -> None:
    res, _ = run_import(tmp_path, "burstgpt", str(DATA / "burstgpt_sample.csv"), "--adapters", "2", *args)
    assert res.exit_code == 2 and msg in res.stderr, res.stderr


def test_missing_file(tmp_path: Path) -> None:
    res, _ = run_import(tmp_path, "azure", str(tmp_path / "nope.csv"), "--adapters", "2")
    assert res.exit_code == 2 and "nope.csv: no such file" in res.stderr
    with pytest.raises(TracekitError, match="unknown format"):
        import_trace("sharegpt", DATA / "azure_2023_sample.csv", adapters=1)


rows_strategy = st.lists(
    st.tuples(st.integers(0, 10**7), st.integers(1, 10**6), st.integers(0, 10**5)), min_size=1, max_size=40
)


@given(rows=rows_strategy, fmt=st.sampled_from(["azure", "burstgpt", "mooncake"]))
@settings(max_examples=60, deadline=None)
def test_import_keeps_every_valid_row(tmp_path_factory, rows, fmt) -> None:
    """Any file of these formats: every row with tokens >= 1 becomes one request, with its
    token counts, at its time relative to the first row, sorted."""
    d = tmp_path_factory.mktemp("imp")
    if fmt == "azure":
        # Microsecond ticks written as date-times with a 7-digit fraction.
        import datetime as dt

        base = dt.datetime(2023, 11, 16, 18, 0, 0)
        lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
        for t, p, o in rows:
            ts = base + dt.timedelta(microseconds=t)
            lines.append(f"{ts:%Y-%m-%d %H:%M:%S}.{ts.microsecond:06d}0,{p},{o}")
        times = [t / 1e6 for t, _, _ in rows]
        f = d / "a.csv"
    elif fmt == "burstgpt":
        lines = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
        lines += [f"{t},ChatGPT,{p},{o},{p + o},Conversation log" for t, p, o in rows]
        times = [float(t) for t, _, _ in rows]
        f = d / "b.csv"
    else:
        lines = [json.dumps({"timestamp": t, "input_length": p, "output_length": o, "hash_ids": [1]}) for t, p, o in rows]
        times = [t / 1e3 for t, _, _ in rows]
        f = d / "m.jsonl"
    f.write_text("\n".join(lines) + "\n")
    if all(o < 1 for _, _, o in rows):
        with pytest.raises(TracekitError, match="no requests left"):
            import_trace(fmt, f, adapters=3, seed=0)
        return
    df, ctx, skipped = import_trace(fmt, f, adapters=3, seed=0)
    t0 = min(times)
    want = sorted((round(t - t0, 6), p, o) for t, (_, p, o) in zip(times, rows, strict=True) if o >= 1)
    got = sorted(
        (round(a, 6), p, o)
        for a, p, o in zip(df["arrival_s"], df["prompt_tokens"], df["output_tokens"], strict=True)
    )
    assert got == want
    assert df["arrival_s"].is_sorted() and df["request_id"].n_unique() == df.height
    dropped = sum(1 for _, _, o in rows if o < 1)
    assert sum(skipped.values()) == dropped


def test_mooncake_token_ids_reproduce_prefix_sharing(tmp_path: Path) -> None:
    res, out = run_import(tmp_path, "mooncake", str(DATA / "mooncake_sample.jsonl"), "--adapters", "2", "--token-ids", "--vocab-size", "5000")
    assert res.exit_code == 0, res.output
    df, meta = schema.read(out)
    ids = df["prompt_token_ids"].to_list()
    assert [len(x) for x in ids] == df["prompt_tokens"].to_list()
    assert min(min(x) for x in ids) >= 1000 and max(max(x) for x in ids) < 5000
    # Rows 0 and 1 share their first 12 hash ids: exactly 12 x 512 tokens of prefix.
    a, b = ids[0], ids[1]
    first_diff = next(i for i in range(len(b)) if a[i] != b[i])
    assert 12 * 512 <= first_diff < 12 * 512 + 4
    assert meta.context["generator"]["token_ids"] is True
    from tracekit.inspect import inspect_path

    assert inspect_path(out)["trace"]["optional_columns"] == ["prompt_token_ids", "prefix_hashes"]
    res, _ = run_import(tmp_path, "azure", str(DATA / "azure_2023_sample.csv"), "--adapters", "2", "--token-ids")
    assert res.exit_code == 2 and "only the mooncake format" in res.stderr


@given(
    reqs=st.lists(
        st.tuples(st.integers(1, 40), st.lists(st.integers(0, 5), max_size=6)), min_size=2, max_size=6
    ),
    block=st.integers(1, 8),
)
@settings(max_examples=80, deadline=None)
def test_block_token_ids_share_exactly_the_shared_blocks(reqs, block) -> None:
    lens = np.array([n for n, _ in reqs])
    hoff = np.zeros(len(reqs) + 1, np.int64)
    np.cumsum([len(h) for _, h in reqs], out=hoff[1:])
    hv = np.array([x for _, h in reqs for x in h], np.int64)
    off, vals = tokens_from_block_hashes(lens, hoff, hv, block_tokens=block, vocab_size=50_000)
    toks = [vals[off[i] : off[i + 1]] for i in range(len(reqs))]
    assert [t.size for t in toks] == lens.tolist()
    assert vals.min() >= 1000 and vals.max() < 50_000

    def block_of(i: int, b: int) -> tuple:
        return tuple(toks[i][b * block : (b + 1) * block])

    for i in range(len(reqs)):
        for j in range(len(reqs)):
            for b in range(-(-min(lens[i], lens[j]) // block)):
                hi, hj = reqs[i][1], reqs[j][1]
                full = len(block_of(i, b)) == len(block_of(j, b)) == block
                if b < len(hi) and b < len(hj) and hi[b] == hj[b]:
                    n = min(len(block_of(i, b)), len(block_of(j, b)))
                    assert block_of(i, b)[:n] == block_of(j, b)[:n]  # same hash: same tokens
                elif i != j and full and block >= 4:
                    assert block_of(i, b) != block_of(j, b)  # different hash (or unlisted): differ


def test_azure_plain_seconds_and_bad_numbers(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,3,4\n12.0,5,6\n11.0,7,8\n")
    df, ctx, _ = import_trace("azure", f, adapters=1)
    assert df["arrival_s"].to_list() == [0.0, 0.5, 1.5] and df["prompt_tokens"].to_list() == [3, 7, 5]
    g = tmp_path / "b.csv"
    g.write_text("Timestamp,Model,Request tokens,Response tokens\n1,m,3,4\ninf,m,3,4\n")
    with pytest.raises(TracekitError, match="line 3: Timestamp is not a number: 'inf'"):
        import_trace("burstgpt", g, adapters=1)


def test_azure_mixed_timestamp_layouts_fall_back_to_the_general_parser(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,3,4\n"
        "2023-11-16T18:15:47.5,3,4\n"
        "2023-11-16 18:15:48,3,4\n"
        "2023-11-16 18:15:49.000000100+00:00,3,4\n"
    )
    df, _, _ = import_trace("azure", f, adapters=1)
    assert df["arrival_s"].to_list() == pytest.approx([0.0, 0.81941, 1.31941, 2.3194101], abs=1e-9)
    g = tmp_path / "b.csv"
    g.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,3,4\n2023-13-16 18:15:46.6805900,3,4\n")
    with pytest.raises(TracekitError, match="line 3: TIMESTAMP is not a date-time: '2023-13-16"):
        import_trace("azure", g, adapters=1)


def test_window_from_start_and_the_old_end(tmp_path: Path) -> None:
    f = str(DATA / "burstgpt_sample.csv")
    res, out = run_import(tmp_path, "burstgpt", f, "--adapters", "2", "--start", "100", "--window", "90")
    assert res.exit_code == 0, res.output
    new = schema.read(out)[0]
    res, out = run_import(tmp_path, "burstgpt", f, "--adapters", "2", "--start", "100", "--end", "190")
    assert res.exit_code == 0 and "note: --end is now --window" in res.stderr
    assert schema.read(out)[0].equals(new)


def test_mooncake_hash_ids_become_prefix_hashes(tmp_path: Path) -> None:
    """Mooncake's hash_ids are the trace's prefix_hashes as they are, one per full
    512-token block (the partial last block's id is left out), block size in the context."""
    res, out = run_import(tmp_path, "mooncake", str(DATA / "mooncake_sample.jsonl"), "--adapters", "2")
    assert res.exit_code == 0, res.output
    df, meta = schema.read(out)
    assert meta.context["prefix_block_tokens"] == 512
    raw = [json.loads(line) for line in (DATA / "mooncake_sample.jsonl").read_text().splitlines() if line.strip()]
    by_len = {r["input_length"]: r["hash_ids"] for r in raw}
    for p, h in zip(df["prompt_tokens"].to_list(), df["prefix_hashes"].to_list(), strict=True):
        assert h == by_len[p][: p // 512]
    assert "prompt_token_ids" not in df.columns
