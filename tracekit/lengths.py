"""Prompt and output length distributions for synthetic traces.

A spec names where (prompt_tokens, output_tokens) pairs come from:

- ``sharegpt``: pairs from ShareGPT V3 as the paper used it (first two turns,
  4 <= prompt <= 1024, prompt + output <= 2048), shipped as a compact table built by
  ``scripts/build_sharegpt_lengths.py`` (see ``tracekit/data/README.md``).
- ``fixed:IN,OUT``: every request has IN prompt and OUT output tokens.
- ``file:PATH``: empirical pairs from a tracekit trace/results file (or a directory of
  parts), or from a CSV/Parquet file with ``prompt_tokens`` and ``output_tokens`` columns.

Pairs are resampled jointly (with replacement), so the correlation between prompt and
output length in the source is kept.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracekit.schema import TracekitError

DATA_DIR = Path(__file__).parent / "data"
SHAREGPT_TABLE = DATA_DIR / "sharegpt_lengths.parquet"

SPEC_HELP = "sharegpt | fixed:IN,OUT | file:PATH"


def _as_pairs(prompt: np.ndarray, output: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    prompt = np.asarray(prompt, dtype=np.int64)
    output = np.asarray(output, dtype=np.int64)
    if prompt.size == 0:
        raise TracekitError(f"{source}: no length pairs")
    if (prompt < 1).any() or (output < 1).any():
        raise TracekitError(f"{source}: token counts must be at least 1")
    return prompt.astype(np.int32), output.astype(np.int32)


@functools.lru_cache(maxsize=1)
def sharegpt_pairs() -> tuple[np.ndarray, np.ndarray]:
    """The shipped ShareGPT V3 (prompt, output) token-count pairs."""
    if not SHAREGPT_TABLE.exists():
        raise TracekitError(
            f"{SHAREGPT_TABLE}: shipped ShareGPT length table is missing "
            "(rebuild it with scripts/build_sharegpt_lengths.py)"
        )
    t = pq.read_table(SHAREGPT_TABLE)
    return _as_pairs(
        t.column("prompt_tokens").to_numpy(), t.column("output_tokens").to_numpy(), str(SHAREGPT_TABLE)
    )


def _pairs_from_file(path_str: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path_str)
    if not path.exists():
        raise TracekitError(f"--lengths file:{path_str}: no such file or directory")
    table: pa.Table
    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        try:
            table = pacsv.read_csv(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise TracekitError(f"{path}: cannot read CSV: {str(e).splitlines()[0]}") from None
    else:
        try:
            md = pq.read_schema(path if path.is_file() else next(path.rglob("*.parquet"))).metadata or {}
        except (pa.ArrowInvalid, OSError, StopIteration):
            md = {}
        if b"tracekit.kind" in md:
            from tracekit import schema

            table, _ = schema.read_arrow(path)
        else:
            try:
                table = pq.read_table(path)
            except (pa.ArrowInvalid, OSError) as e:
                raise TracekitError(f"{path}: not a Parquet or CSV file: {str(e).splitlines()[0]}") from None
    for col in ("prompt_tokens", "output_tokens"):
        if col not in table.column_names:
            raise TracekitError(f"{path}: missing column {col!r} for --lengths file:")
    try:
        prompt = table.column("prompt_tokens").to_numpy(zero_copy_only=False)
        output = table.column("output_tokens").to_numpy(zero_copy_only=False)
        prompt = prompt.astype(np.float64)
        output = output.astype(np.float64)
    except (ValueError, TypeError, pa.ArrowInvalid):
        raise TracekitError(f"{path}: prompt_tokens/output_tokens must be numbers") from None
    if np.isnan(prompt).any() or np.isnan(output).any():
        raise TracekitError(f"{path}: prompt_tokens/output_tokens have missing values")
    return _as_pairs(prompt, output, str(path))


def parse_fixed(arg: str, spec: str) -> tuple[int, int]:
    parts = arg.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        pin, pout = int(parts[0]), int(parts[1])
    except ValueError:
        raise TracekitError(f"--lengths {spec!r}: expected fixed:IN,OUT with two integers") from None
    if pin < 1 or pout < 1:
        raise TracekitError(f"--lengths {spec!r}: token counts must be at least 1")
    return pin, pout


def source_pairs(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """All (prompt, output) pairs a spec draws from (one pair for `fixed`)."""
    name, _, arg = spec.partition(":")
    if name == "sharegpt" and not arg:
        return sharegpt_pairs()
    if name == "fixed":
        pin, pout = parse_fixed(arg, spec)
        return np.array([pin], np.int32), np.array([pout], np.int32)
    if name == "file" and arg:
        return _pairs_from_file(arg)
    raise TracekitError(f"--lengths {spec!r}: unknown length spec (expected {SPEC_HELP})")


def sample_lengths(spec: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` (prompt_tokens, output_tokens) pairs as int32 arrays."""
    return sample_pairs(source_pairs(spec), n, rng)


def sample_pairs(
    pairs: tuple[np.ndarray, np.ndarray], n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` pairs jointly, with replacement, from `source_pairs(...)`."""
    prompt, output = pairs
    if prompt.size == 1:
        return np.full(n, prompt[0], np.int32), np.full(n, output[0], np.int32)
    idx = rng.integers(0, prompt.size, size=n)
    return prompt[idx], output[idx]
