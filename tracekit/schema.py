"""The data contracts: trace, steps and results Parquet files.

Every package reads and writes these files through this module only. A file carries
key-value metadata `tracekit.kind`, `tracekit.schema` (an integer version) and a JSON
`tracekit.context`. A path may be a single file or a directory of Parquet parts (a
capture); parts are read as one dataset, and files whose names start with `_` or `.` are
ignored, as every Parquet reader does.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracekit import __version__

if TYPE_CHECKING:
    import polars as pl

KIND_TRACE = "trace"
KIND_STEPS = "steps"
KIND_RESULTS = "results"
KINDS = (KIND_TRACE, KIND_STEPS, KIND_RESULTS)
SCHEMA_VERSION = 1

META_KIND = b"tracekit.kind"
META_SCHEMA = b"tracekit.schema"
META_CONTEXT = b"tracekit.context"

# cancelled: the client hung up before the answer was complete (capture only).
RESULT_STATUSES = ("ok", "error", "timeout", "unfinished", "cancelled")
# Context key: tokens per block of a trace's `prefix_hashes`.
CTX_PREFIX_BLOCK_TOKENS = "prefix_block_tokens"


class TracekitError(Exception):
    """A user-facing problem: printed as one line, never as a traceback."""


# Notes about input that was accepted as it is meant (e.g. a trace sorted on read). The
# command line prints them as `note: ...` on stderr (tracekit.cliutil); a library caller
# sees them only if it configures logging.
notes = logging.getLogger("tracekit.notes")
notes.addHandler(logging.NullHandler())
notes.propagate = False



def import_hint(path: str | os.PathLike[str]) -> str:
    """Where a table that is not a tracekit file comes in."""
    return f"import it with `tracekit import table {path} --out trace.parquet`"


# --- schemas ---------------------------------------------------------------------------

TRACE_REQUIRED = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("arrival_s", pa.float64(), nullable=False),
        pa.field("adapter", pa.string()),  # null = base model
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("output_tokens", pa.int32(), nullable=False),
    ]
)
TRACE_OPTIONAL = pa.schema(
    [
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        # Prefix sharing without the prompt: one hash per full prompt block of
        # `prefix_block_tokens` tokens (named in the context, CTX_PREFIX_BLOCK_TOKENS),
        # chained (a block's hash covers every token before it), keyed by adapter, and
        # salted per capture; equal prefixes of one adapter hash equal.
        pa.field("prefix_hashes", pa.list_(pa.int64())),
        pa.field("tenant", pa.string()),
        pa.field("session_id", pa.string()),
    ]
)

STEPS_REQUIRED = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("t_s", pa.float64(), nullable=False),  # step start, trace/capture clock
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("num_running", pa.int32()),
        pa.field("num_waiting", pa.int32()),
        pa.field("prefill_reqs", pa.int32()),
        pa.field("prefill_tokens", pa.int32()),
        pa.field("decode_reqs", pa.int32()),
        pa.field("decode_tokens", pa.int32()),
        pa.field("active_adapters", pa.list_(pa.string())),
        pa.field("kv_usage", pa.float64()),
        pa.field("num_preempted", pa.int32()),
        pa.field("adapter_loads", pa.int32()),
    ]
)
STEPS_OPTIONAL = pa.schema(
    [
        # Tokens of KV context held by the scheduled requests (what attention reads).
        pa.field("context_tokens", pa.int64()),
        # Seconds of this step spent loading adapters into GPU slots, where known.
        pa.field("adapter_load_s", pa.float64()),
        # Names of the adapters loaded into GPU slots during this step.
        pa.field("loaded_adapters", pa.list_(pa.string())),
        # Duration as vLLM's own iteration details report it (model output wait only).
        pa.field("engine_elapsed_s", pa.float64()),
        # Prompt tokens that the requests entering this batch found in the prefix cache.
        pa.field("cached_tokens", pa.int64()),
    ]
)

RESULTS_EXTRA_REQUIRED = pa.schema(
    [
        pa.field("target", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("dispatch_s", pa.float64()),
        pa.field("first_token_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("generated_tokens", pa.int32()),
        pa.field("ttft_s", pa.float64()),
        pa.field("e2e_s", pa.float64()),
        pa.field("tpot_s", pa.float64()),
        pa.field("error", pa.string()),
    ]
)
RESULTS_OPTIONAL = pa.schema(
    [
        # Every inter-token (inter-chunk) gap of the stream, in seconds.
        pa.field("itl_s", pa.list_(pa.float32())),
        # Prompt tokens served from the prefix cache (vLLM's num_cached_tokens).
        pa.field("cached_tokens", pa.int32()),
        # The fleet replica (GPU) that served the request.
        pa.field("replica", pa.string()),
    ]
)

_REQUIRED = {
    KIND_TRACE: TRACE_REQUIRED,
    KIND_STEPS: STEPS_REQUIRED,
    KIND_RESULTS: pa.schema(list(TRACE_REQUIRED) + list(RESULTS_EXTRA_REQUIRED)),
}
_OPTIONAL = {
    KIND_TRACE: TRACE_OPTIONAL,
    KIND_STEPS: STEPS_OPTIONAL,
    KIND_RESULTS: pa.schema(list(TRACE_OPTIONAL) + list(RESULTS_OPTIONAL)),
}


def required_schema(kind: str) -> pa.Schema:
    return _REQUIRED[_check_kind(kind)]


def full_schema(kind: str) -> pa.Schema:
    """Required then optional columns, in their canonical order."""
    return pa.schema(list(_REQUIRED[_check_kind(kind)]) + list(_OPTIONAL[kind]))


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise TracekitError(f"unknown tracekit kind {kind!r} (expected one of {', '.join(KINDS)})")
    return kind


# --- metadata ---------------------------------------------------------------------------


@dataclass
class Meta:
    kind: str
    schema: int
    context: dict[str, Any] = field(default_factory=dict)


def new_context(**items: Any) -> dict[str, Any]:
    """A context with the fields every file carries; callers add model, adapters, etc."""
    ctx: dict[str, Any] = {
        "tool_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ctx.update({k: v for k, v in items.items() if v is not None})
    return ctx


def _meta_bytes(kind: str, context: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {
        META_KIND: kind.encode(),
        META_SCHEMA: str(SCHEMA_VERSION).encode(),
        META_CONTEXT: json.dumps(context, sort_keys=True, default=str).encode(),
    }


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*.parquet")
            if not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts)
        )
        if not files:
            raise TracekitError(f"{path}: directory holds no Parquet parts")
        return files
    if not path.exists():
        raise TracekitError(f"{path}: no such file or directory")
    return [path]


def _file_meta(path: Path) -> Meta:
    try:
        md = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _looks_like_text(path):
            raise TracekitError(f"{path}: not a Parquet file but text (CSV or JSONL?); {import_hint(path)}") from None
        raise TracekitError(f"{path}: not a Parquet file: {first}") from None
    if META_KIND not in md:
        raise TracekitError(f"{path}: a plain Parquet file, not a tracekit file (no tracekit.kind metadata); {import_hint(path)}")
    kind = md[META_KIND].decode()
    if kind not in KINDS:
        raise TracekitError(f"{path}: unknown tracekit.kind {kind!r}")
    try:
        version = int(md.get(META_SCHEMA, b"1").decode())
    except ValueError:
        raise TracekitError(f"{path}: tracekit.schema is not an integer") from None
    if version > SCHEMA_VERSION:
        raise TracekitError(
            f"{path}: tracekit.schema {version} is newer than this tool supports "
            f"({SCHEMA_VERSION}); upgrade lora-tracekit"
        )
    try:
        context = json.loads(md.get(META_CONTEXT, b"{}").decode() or "{}")
    except json.JSONDecodeError:
        raise TracekitError(f"{path}: tracekit.context is not valid JSON") from None
    return Meta(kind=kind, schema=version, context=context)


def _looks_like_text(path: Path) -> bool:
    try:
        head = path.open("rb").read(512)
    except OSError:
        return False
    return bool(head) and b"\x00" not in head and not head.startswith(b"PAR1")


def read_meta(path: str | os.PathLike[str], kind: str | None = None) -> Meta:
    """Kind, schema version and context of a file or a directory of parts.

    For a directory, the first part's context is returned, with `parts` set."""
    p = Path(path)
    files = _parquet_files(p)
    metas = [_file_meta(f) for f in (files if len(files) <= 64 else files[:1] + files[-1:])]
    first = metas[0]
    for f, m in zip(files, metas, strict=False):
        if m.kind != first.kind:
            raise TracekitError(f"{f}: part is a {m.kind} file, others are {first.kind}")
    if kind is not None and first.kind != kind:
        raise TracekitError(f"{p}: expected a {kind} file, got a {first.kind} file")
    if len(files) > 1:
        first.context = dict(first.context, parts=len(files))
    return first


# --- validation -------------------------------------------------------------------------


def _castable(actual: pa.DataType, wanted: pa.DataType) -> bool:
    if actual.equals(wanted) or pa.types.is_null(actual):
        return True
    if pa.types.is_integer(wanted):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(wanted):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_string(wanted):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_list(wanted):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _castable(
            actual.value_type, wanted.value_type
        )
    return False


def conform(
    table: pa.Table,
    kind: str,
    source: str = "<data>",
    parts: list[tuple[str, int]] | None = None,
    keep_dictionary: bool = False,
    check_values: bool = True,
) -> pa.Table:
    """Check columns, types and values, cast to the canonical schema, drop unknown columns.

    `keep_dictionary`: a dictionary-encoded string column stays encoded (for readers that
    want its codes; the default casts it to plain strings). `check_values=False`: the
    caller vouches for the values (a table built from checked ones), so only columns and
    types are checked (`check_trace` over a million request ids costs 0.05 s). Raises TracekitError naming
    `source` (or, with `parts` = [(file, rows), ...] of tables concatenated in that order,
    the file holding the row) and the first problem."""
    req = required_schema(kind)
    opt = _OPTIONAL[kind]
    cols: list[pa.Array | pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for f in req:
        if f.name not in table.column_names:
            raise TracekitError(f"{source}: missing column {f.name!r} for a {kind} file")
        fields.append(f)
    fields += [f for f in opt if f.name in table.column_names]
    for i, f in enumerate(fields):
        col = table.column(f.name)
        if keep_dictionary and pa.types.is_dictionary(col.type) and _castable(col.type.value_type, f.type):
            fields[i] = pa.field(f.name, pa.dictionary(col.type.index_type, f.type), f.nullable)
            cols.append(col if col.type.equals(fields[i].type) else col.cast(fields[i].type))
            continue
        if not _castable(col.type, f.type):
            raise TracekitError(
                f"{source}: column {f.name!r} has type {col.type}, expected {f.type}"
            )
        if col.type.equals(f.type):
            # Already the type (the usual case): no cast, no copy.
            cols.append(col)
            continue
        try:
            cols.append(col.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise TracekitError(f"{source}: column {f.name!r} cannot be read as {f.type}: {e}") from None
    out = pa.Table.from_arrays(cols, schema=pa.schema(fields))
    if not check_values:
        pass
    elif kind == KIND_STEPS:
        _check_steps(out, source)
    else:
        check_trace(out, source, kind, parts)
    return out


@dataclass
class TraceCheck:
    """What the value checks of a trace found beyond its validity."""

    rows: int
    # First row that arrives before the row above it (None: sorted by arrival).
    unsorted_row: int | None


_CHECKED_COLUMNS = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "target", "status")


def _trace_checks(kind: str) -> list[tuple[str, Callable[[pa.ChunkedArray], int | None], str]]:
    """(column, first bad row of that column or None, what the column must be), in
    reporting order."""
    checks: list[tuple[str, Callable[[pa.ChunkedArray], int | None], str]] = [
        ("request_id", _first_null, "must be a string (it is null)"),
        # NaN (and null, read as NaN) fails `>= 0`; so does -inf; +inf fails `< inf`.
        ("arrival_s", lambda c: _first_false(_floats(c), lambda x: (x >= 0) & (x < np.inf)),
         "must be a non-negative number"),
        ("prompt_tokens", lambda c: _first_false(_floats(c), lambda x: x >= 1), "must be at least 1"),
        ("output_tokens", lambda c: _first_false(_floats(c), lambda x: x >= 1), "must be at least 1"),
    ]
    if kind == KIND_RESULTS:
        checks += [
            ("target", _first_null, "must be a string (it is null)"),
            ("status", lambda c: _first_false(status_codes(c), lambda x: x >= 0),
             f"must be one of {', '.join(RESULT_STATUSES)}"),
        ]
    return checks


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    return numbers(col, np.nan)


def numbers(col: pa.ChunkedArray | pa.Array, null: float = np.nan, rows: np.ndarray | None = None) -> np.ndarray:
    """A numeric column (or its `rows`, sorted indices) as one numpy array, nulls
    replaced by `null` (NaN: an integer column with nulls comes as float64). One chunk
    without nulls is no copy; nulls are read from the validity bitmap, at `rows` only
    (Arrow's own conversion of a million-row column with nulls costs several times more)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = []
    start = 0
    for chunk in chunks:
        n = len(chunk)
        at = None
        if rows is not None:
            lo, hi = np.searchsorted(rows, [start, start + n])
            at = rows[lo:hi] - start
        start += n
        if chunk.null_count == 0 or pa.types.is_dictionary(chunk.type) or pa.types.is_boolean(chunk.type):
            values = np.asarray(chunk.to_numpy(zero_copy_only=False))
            parts.append(values if at is None else values[at])
            continue
        values = np.frombuffer(chunk.buffers()[1], dtype=chunk.type.to_pandas_dtype())[chunk.offset:chunk.offset + n]
        bitmap = np.frombuffer(chunk.buffers()[0], dtype=np.uint8)
        if at is None:
            valid = _valid(chunk)
        else:
            values = values[at]
            bit = at + chunk.offset
            valid = ((bitmap[bit >> 3] >> (bit & 7).astype(np.uint8)) & 1).astype(bool)
        if values.dtype.kind in "iu" and not float(null).is_integer():
            values = values.astype(np.float64)
        parts.append(np.where(valid, values, values.dtype.type(null)))
    if not parts:
        return np.zeros(0, dtype=col.type.to_pandas_dtype())
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _first_false(x: np.ndarray, good: Callable[[np.ndarray], np.ndarray]) -> int | None:
    ok = good(x)
    return None if ok.all() else int(np.argmin(ok))


def _valid(chunk: pa.Array) -> np.ndarray:
    """A chunk's validity as booleans, from its bitmap (no compute kernel)."""
    n = len(chunk)
    if chunk.null_count == 0:
        return np.ones(n, dtype=bool)
    bitmap = chunk.buffers()[0]
    if bitmap is None:  # the null type: nothing valid
        return np.zeros(n, dtype=bool)
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return bits[chunk.offset:chunk.offset + n].astype(bool)


def _first_null(col: pa.ChunkedArray) -> int | None:
    if col.null_count == 0:
        return None
    start = 0
    for chunk in col.chunks:
        if chunk.null_count:
            return start + int(np.argmin(_valid(chunk)))
        start += len(chunk)
    return None


def status_codes(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Each row's status as its index in RESULT_STATUSES (-1: not one of them, or null),
    through the column's dictionary when it has one (no million strings compared)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    codes = []
    for chunk in chunks:
        if not pa.types.is_dictionary(chunk.type):
            import pyarrow.compute as pc

            chunk = pc.dictionary_encode(chunk)
        labels = chunk.dictionary.to_pylist()
        lut = np.array([RESULT_STATUSES.index(s) if s in RESULT_STATUSES else -1 for s in labels] + [-1], np.int8)
        idx = np.asarray(chunk.indices.to_numpy(zero_copy_only=False))
        if idx.dtype.kind == "f":  # null statuses: the lookup's last entry
            idx = np.where(np.isnan(idx), len(labels), idx)
        codes.append(lut[idx.astype(np.intp, copy=False)])
    return np.concatenate(codes) if codes else np.zeros(0, np.int8)


def _locate(source: str, parts: list[tuple[str, int]] | None, row: int) -> tuple[str, int]:
    """(file, row within it) of a row of parts read one after another."""
    for name, n in parts or []:
        if row < n:
            return name, row
        row -= n
    return source, row


def _check_table(data: pa.Table | pl.DataFrame | pl.LazyFrame, source: str) -> pa.Table:
    """The columns `check_trace` reads, as an Arrow table (a polars frame is collected
    and converted: its check columns only)."""
    if isinstance(data, pa.Table):
        return data.select([c for c in _CHECKED_COLUMNS if c in data.column_names])
    import polars as pl

    try:
        names = data.collect_schema().names()
        frame = data.select([c for c in _CHECKED_COLUMNS if c in names])
        if isinstance(frame, pl.LazyFrame):
            frame = frame.collect()
    except pl.exceptions.PolarsError as e:
        raise TracekitError(f"{source}: cannot read: {str(e).splitlines()[0]}") from None
    return frame.to_arrow()


def check_trace(
    data: pa.Table | pl.DataFrame | pl.LazyFrame,
    source: str,
    kind: str = KIND_TRACE,
    parts: list[tuple[str, int]] | None = None,
    where: Callable[[int], str] | None = None,
) -> TraceCheck:
    """The one validation of a trace's values (or of the trace columns of a results file),
    which every command reading a trace goes through, in one pass over four columns
    (numpy on the Arrow buffers): request ids present and unique, arrivals finite and
    >= 0, token counts >= 1 (and, for results, a known status). Raises one TracekitError
    line `FILE: row N: COLUMN must ...` (rows count from 0, within the part file of a
    directory). Types are checked before, on the Parquet schema (`scan`, `conform`).
    Arrivals need not be sorted: the first row out of order is returned, and
    `read_trace` sorts (with a note).

    `data`: an Arrow table, or a polars frame (lazy or not: its check columns are
    collected). It checks the columns `data` has: a command that reads only some of
    them (e.g. `read_trace_columns` for `predictor recommend --fast`, which never uses
    request ids) checks those, every value of them.

    `where(row)` names a row another way (e.g. `FILE: line 12` of an imported CSV)."""

    def at(i: int) -> tuple[str, str]:
        if where is not None:
            return "", where(i)
        name, local = _locate(source, parts, i)
        return name, f"{name}: row {local}"

    table = _check_table(data, source)
    present = set(table.column_names)
    checks = [c for c in _trace_checks(kind) if c[0] in present]
    # The earliest bad row is reported (a user fixes a file top-down), by column order within it.
    found = sorted((bad, i) for i, (col, first_bad, _) in enumerate(checks)
                   if (bad := first_bad(table.column(col))) is not None)  # fmt: skip
    if found:
        bad, i = found[0]
        col, _, why = checks[i]
        value = table.column(col)[bad].as_py()
        got = "" if value is None and "null" in why else f", got {value!r}" if isinstance(value, str) else f", got {value}"
        raise TracekitError(f"{at(bad)[1]}: {col} {why}{got}")
    if "request_id" in present:
        rid = table.column("request_id")
        ids = _fixed_width_ids(rid)
        words = None if ids is None else _id_words(ids)
        unsorted_ids, adjacent_equal = _id_order(rid, words)
        # Ids in sorted order (as synth and the importers write them) are unique when no
        # two neighbours are equal: a cheap test that spares hashing 10 M strings.
        if adjacent_equal or (unsorted_ids and _maybe_repeats(rid, words)):
            dup = _first_duplicate(rid)
            if dup is not None:
                first, again, value = dup
                (name, here), (name0, there) = at(again), at(first)
                earlier = there.removeprefix(f"{name0}: ") + (f" of {name0}" if name0 != name else "")
                if where is not None:
                    earlier = there.rpartition(": ")[2]
                raise TracekitError(f"{here}: request_id {value!r} repeats {earlier} (request ids must be unique)")
    unsorted = None
    if "arrival_s" in present and table.num_rows > 1:
        a = _floats(table.column("arrival_s"))
        later = np.flatnonzero(a[1:] < a[:-1])
        unsorted = int(later[0]) + 1 if later.size else None
    return TraceCheck(rows=table.num_rows, unsorted_row=unsorted)


def _fixed_width(chunk: pa.Array) -> np.ndarray | None:
    """A string chunk whose values all have one byte length as a numpy bytes array
    (`S<width>`, a view of its data); None when the lengths differ."""
    if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)
            or pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)) or chunk.null_count:  # fmt: skip
        return None
    n = len(chunk)
    wide = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
    offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if wide else np.int32)[chunk.offset:chunk.offset + n + 1]
    width = int(offsets[1] - offsets[0]) if n else 0
    if width == 0 or int(offsets[-1] - offsets[0]) != width * n or not (np.diff(offsets) == width).all():
        return None
    data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[int(offsets[0]):int(offsets[-1])]
    return data.view(f"S{width}")


def _fixed_width_ids(rid: pa.ChunkedArray) -> np.ndarray | None:
    """The ids as one numpy bytes array when they all have one byte length, else None."""
    views = [_fixed_width(c) for c in rid.chunks if len(c)]
    if not views or any(v is None for v in views) or len({v.dtype for v in views}) != 1:  # type: ignore[union-attr]
        return None
    return views[0] if len(views) == 1 else np.concatenate(views)  # type: ignore[arg-type,return-value]


def _id_words(ids: np.ndarray) -> list[np.ndarray]:
    """Ids of one width (`S<width>`) as 8-byte big-endian words, in order (the last one
    overlapping the one before when the width is not a multiple of 8): comparing the
    word lists lexicographically compares the ids byte by byte, and equal lists are
    equal ids. Up to 8 bytes: one word holding the bytes themselves."""
    n, width = len(ids), ids.dtype.itemsize
    raw = ids.view(np.uint8)
    if width <= 8:
        key = np.zeros(n, dtype=np.uint64)
        for j in range(width):
            key |= raw[j::width].astype(np.uint64) << np.uint64(8 * (width - 1 - j))
        return [key]
    offsets = range(0, width, 8) if width % 8 == 0 else [*range(0, width - 7, 8), width - 8]
    return [np.ndarray((n,), dtype=">u8", buffer=raw, offset=off, strides=(width,)).astype(np.uint64) for off in offsets]


def _id_order(rid: pa.ChunkedArray, words: list[np.ndarray] | None) -> tuple[bool, bool]:
    """(some id sorts before the one above it, some id equals the one above it); `words`:
    `_id_words` of the ids (None: ids of several widths)."""
    if len(rid) < 2:
        return False, False
    if words is not None:
        below = np.zeros(len(rid) - 1, dtype=bool)
        equal = np.ones(len(rid) - 1, dtype=bool)
        for w in words:
            below |= equal & (w[1:] < w[:-1])
            equal &= w[1:] == w[:-1]
        return bool(below.any()), bool(equal.any())
    import pyarrow.compute as pc

    later, earlier = rid.slice(1), rid.slice(0, len(rid) - 1)
    return bool(pc.any(pc.less(later, earlier)).as_py()), bool(pc.any(pc.equal(later, earlier)).as_py())


def _maybe_repeats(rid: pa.ChunkedArray, words: list[np.ndarray] | None) -> bool:
    """Whether some id may repeat: two equal 64-bit fingerprints (a repeat always shows;
    a collision is ruled out by `_first_duplicate`). Ids of one width: their words mixed
    (up to 8 bytes: the word itself, exact), sorted (Arrow's hash kernels take 3x longer
    on a million ids); others: Arrow's distinct values."""
    if words is None:
        import pyarrow.compute as pc

        return len(pc.unique(rid)) < len(rid)
    if len(words) == 1:
        fp = words[0].copy()
    else:
        fp = np.full(len(rid), 0x243F6A8885A308D3, dtype=np.uint64)
        for w in words:
            fp ^= w
            fp *= np.uint64(0x9E3779B97F4A7C15)
            fp ^= fp >> np.uint64(29)
    fp.sort()
    return bool((fp[1:] == fp[:-1]).any())


def _first_duplicate(rid: pa.ChunkedArray) -> tuple[int, int, str] | None:
    """(first row, row of its first repeat, id) of the earliest repeated request id.

    Dictionary codes count distinct ids in order of first appearance, so a row repeats
    an earlier id exactly when its code is not above every code before it."""
    import pyarrow.compute as pc

    # One memo over every chunk: the chunks share the codes.
    chunks = pc.dictionary_encode(rid).chunks
    codes = np.concatenate([np.asarray(c.indices.to_numpy(zero_copy_only=False)) for c in chunks]) if chunks else np.zeros(0)
    if codes.size < 2:
        return None
    repeat = codes[1:] <= np.maximum.accumulate(codes)[:-1]
    if not repeat.any():
        return None
    again = int(np.argmax(repeat)) + 1
    first = int(np.argmax(codes == codes[again]))
    return first, again, str(rid[again].as_py())


def _check_steps(t: pa.Table, source: str) -> None:
    import pyarrow.compute as pc

    for name in (f.name for f in STEPS_REQUIRED if not f.nullable):
        if t.column(name).null_count:
            raise TracekitError(f"{source}: row {_first_bad(pc.is_null(t.column(name))) or 0}: {name} is null")
    bad = _first_bad(pc.less(t.column("duration_s"), 0.0))
    if bad is not None:
        raise TracekitError(f"{source}: row {bad}: duration_s is negative")


def _first_bad(mask: pa.ChunkedArray | pa.Array) -> int | None:
    import pyarrow.compute as pc

    mask = pc.fill_null(mask, True)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


# --- writing ----------------------------------------------------------------------------


def _to_arrow(data: pa.Table | pl.DataFrame | Mapping[str, Any]) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, Mapping):
        return pa.table(dict(data))
    return data.to_arrow()  # a polars frame


def write(
    path: str | os.PathLike[str],
    data: pa.Table | pl.DataFrame | Mapping[str, Any],
    kind: str,
    context: Mapping[str, Any] | None = None,
    row_group_size: int = 1_000_000,
    conformed: bool = False,
) -> Path:
    """Validate and write one tracekit file atomically (temp file, then rename).

    `conformed`: `data` is an Arrow table that `conform` returned for this `kind` (as
    `twin.engine.simulate`'s results are): not checked a second time (a million-row
    results file's checks cost a tenth of a second)."""
    p = Path(path)
    table = data if conformed and isinstance(data, pa.Table) else conform(_to_arrow(data), kind, source=str(p))
    table = table.replace_schema_metadata(_meta_bytes(kind, context or {}))
    # The columns as the file records them: a dictionary-encoded string column (a
    # conformed table may keep one, `conform(keep_dictionary=True)`) is written from its
    # dictionary, with no hashing of a million values, and recorded as the plain column
    # it stands for, so the file is the one its decoded table would give.
    schema = pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in table.schema],
                       metadata=table.schema.metadata)  # fmt: skip
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        # No dictionary for request_id nor list columns (token ids, prefix hashes: nearly
        # every value distinct, a dictionary only costs time), and min/max statistics for
        # plain numbers only (a compare per string or list value buys nothing a reader
        # filters on; on a million prefix-hash lists it costs a quarter of a second).
        flat = [f.name for f in schema if not (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))]
        # Nor for floats (times: nearly all distinct, so the dictionary is built, overflows
        # and is dropped; without it a million-row results file writes in half the time
        # and comes out smaller).
        dictionary = [c for c in flat if c != "request_id" and not pa.types.is_floating(schema.field(c).type)]
        stats = [f.name for f in schema if f.name in flat
                 and not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
        # Lists of integers (prefix hashes, token ids): delta-encoded and lz4, which writes
        # a million prefix-hash lists in 0.6x the time of zstd and reads them back in 0.3x
        # (consecutive ids such as Mooncake's shrink too; random 64-bit hashes stay their size).
        int_lists = [f.name for f in schema if f.name not in flat and pa.types.is_integer(f.type.value_type)]
        compression: Any = "zstd"
        # Floats (times) byte-stream-split: their bytes grouped by significance, which
        # zstd compresses better and faster (a million-row results file: 0.8x the write
        # time, 0.8x the size; pyarrow reads the column in half the time).
        encoding: dict[str, str] = {f.name: "BYTE_STREAM_SPLIT" for f in schema if pa.types.is_floating(f.type)}
        if int_lists:
            leaves = [f"{c}.list.element" for c in int_lists]
            compression = {c: "zstd" for c in flat} | dict.fromkeys(leaves, "lz4")
            for f in schema:  # other lists (of strings) keep zstd
                if f.name not in flat and f.name not in int_lists:
                    compression[f"{f.name}.list.element"] = "zstd"
            encoding |= dict.fromkeys(leaves, "DELTA_BINARY_PACKED")
        options: dict[str, Any] = dict(compression=compression, use_dictionary=dictionary, write_statistics=stats,
                                       column_encoding=encoding or None)  # fmt: skip
        if schema.equals(table.schema):
            pq.write_table(table, tmp, row_group_size=row_group_size, **options)
        else:
            # Parquet's own schema is the same either way; the stored Arrow schema (what
            # readers restore the types from) is the plain one, serialized as the writer does.
            kv = {b"ARROW:schema": base64.b64encode(schema.serialize().to_pybytes()), **(schema.metadata or {})}
            with pq.ParquetWriter(tmp, table.schema, store_schema=False, **options) as writer:
                writer.write_table(table, row_group_size=row_group_size)
                writer.add_key_value_metadata(kv)
        os.replace(tmp, p)
    except OSError as e:
        raise TracekitError(f"{p}: cannot write: {e.strerror or e}") from None
    return p


class PartWriter:
    """Writes a capture as numbered Parquet parts in a directory, one part per flush.

    Each part is complete on disk before it is visible (temp name, then rename), so a
    process killed at any moment leaves only whole parts behind."""

    def __init__(self, directory: str | os.PathLike[str], kind: str, context: Mapping[str, Any], prefix: str = "part"):
        self.directory = Path(directory)
        self.kind = _check_kind(kind)
        self.context = dict(context)
        self.prefix = prefix
        self.parts_written = 0
        self.rows_written = 0
        self._session = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

    def write_part(self, data: pa.Table | pl.DataFrame | Mapping[str, Any]) -> Path | None:
        table = _to_arrow(data)
        if table.num_rows == 0:
            return None
        name = f"{self.prefix}-{self._session}-{self.parts_written:06d}.parquet"
        path = write(self.directory / name, table, self.kind, self.context)
        self.parts_written += 1
        self.rows_written += table.num_rows
        return path


# --- reading ----------------------------------------------------------------------------


def scan(path: str | os.PathLike[str], kind: str | None = None) -> tuple[pl.LazyFrame, Meta]:
    """A lazy frame over a file or a directory of parts, with its metadata checked.

    Column presence and types are checked against the schema on the Parquet schema
    alone (no data read); values are checked by `scan_trace` and `read`."""
    import polars as pl

    p = Path(path)
    meta = _scan_meta(p, kind)
    files = _parquet_files(p)
    try:
        lf = pl.scan_parquet([str(f) for f in files]) if len(files) > 1 else pl.scan_parquet(str(files[0]))
    except Exception as e:  # polars raises several exception types for bad files
        raise TracekitError(f"{p}: cannot read: {str(e).splitlines()[0]}") from None
    return lf, meta


def _scan_meta(p: Path, kind: str | None = None) -> Meta:
    """`read_meta`, and the required columns' presence and types from the Parquet schema
    (no data read)."""
    meta = read_meta(p, kind)
    files = _parquet_files(p)
    req = required_schema(meta.kind)
    for f in files if len(files) <= 1024 else files[:1] + files[-1:]:
        schema = pq.read_schema(f)
        for field_ in req:
            idx = schema.get_field_index(field_.name)
            if idx < 0:
                raise TracekitError(f"{f}: missing column {field_.name!r} for a {meta.kind} file")
            if not _castable(schema.field(idx).type, field_.type):
                raise TracekitError(
                    f"{f}: column {field_.name!r} has type {schema.field(idx).type}, expected {field_.type}"
                )
    return meta


def _parts(files: list[Path]) -> list[tuple[str, int]] | None:
    """(file, rows) of each part of a directory, from the Parquet footers (no data read)."""
    if len(files) < 2:
        return None
    return [(str(f), pq.ParquetFile(f).metadata.num_rows) for f in files]


def scan_trace(path: str | os.PathLike[str]) -> tuple[pl.LazyFrame, Meta, TraceCheck]:
    """A trace (or a results file, for its trace columns) as a lazy frame, its values
    validated (`check_trace`) in one pass over the columns that carry them. The frame
    keeps the file's row order; `TraceCheck.unsorted_row` says whether that is arrival
    order."""
    p = Path(path)
    lf, meta = scan(p)
    if meta.kind == KIND_STEPS:
        raise TracekitError(f"{p}: expected a trace file, got a steps file")
    files = _parquet_files(p)
    parts = _parts(files)
    names = pq.read_schema(files[0]).names
    table, _ = read_arrow(p, columns=[c for c in _CHECKED_COLUMNS if c in names])  # the columns the checks read
    check = check_trace(table, str(p), meta.kind, parts)
    # The columns go back to the system before the caller reads the frame (10 M rows'
    # ids and numbers: half a gigabyte that would add to the caller's peak).
    del table
    pa.default_memory_pool().release_unused()
    if check.unsorted_row is not None and meta.kind == KIND_TRACE:
        _note_unsorted(str(p), parts, check.unsorted_row)
    return lf, meta, check


def read_trace_columns(
    path: str | os.PathLike[str], columns: Iterable[str], dictionary: Iterable[str] = ()
) -> tuple[pa.Table, Meta, TraceCheck]:
    """Some trace columns of a trace (or of a results file), read once into memory in file
    order, their values checked by `check_trace`. For a command that reads every row of
    a few columns: one read of those, instead of a lazy check and then a second pass
    (2 M request ids alone take longer to read than the four numeric columns).
    `dictionary` as in `read_arrow`."""
    p = Path(path)
    columns = list(columns)
    meta = _scan_meta(p)  # kind, presence and types of the required columns
    if meta.kind == KIND_STEPS:
        raise TracekitError(f"{p}: expected a trace file, got a steps file")
    table, meta = read_arrow(p, columns=columns, dictionary=dictionary)
    parts = _parts(_parquet_files(p))
    check = check_trace(table, str(p), meta.kind, parts)
    if check.unsorted_row is not None and meta.kind == KIND_TRACE:
        _note_unsorted(str(p), parts, check.unsorted_row)
    return table, meta, check


def iter_trace_columns(
    path: str | os.PathLike[str], columns: Iterable[str], dictionary: Iterable[str] = ()
) -> tuple[Meta, int, Iterator[pa.Table]]:
    """`read_trace_columns` a row group at a time: (metadata, rows, the row groups as
    tables), each checked by `check_trace` as it is read (an error names the part file
    and its row). For a one-pass reader of a few columns (features of millions of
    requests): a row group's memory is reused for the next one instead of the whole
    columns' being faulted in. Request ids are not among `columns` (their uniqueness is
    a check over the whole trace: `read_trace_columns`). Each table's dictionary columns
    (`dictionary`) have their own dictionary."""
    p = Path(path)
    columns = list(columns)
    if "request_id" in columns:
        raise ValueError("iter_trace_columns: request ids need the whole trace's check (read_trace_columns)")
    meta = _scan_meta(p)  # kind, presence and types of the required columns
    if meta.kind == KIND_STEPS:
        raise TracekitError(f"{p}: expected a trace file, got a steps file")
    files = _parquet_files(p)
    readers = [(f, pq.ParquetFile(f, read_dictionary=list(dictionary) or None)) for f in files]

    groups = [(f, pf, g) for f, pf in readers for g in range(pf.metadata.num_row_groups)]

    def read(i: int) -> pa.Table:
        f, pf, g = groups[i]
        try:
            return pf.read_row_group(g, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise TracekitError(f"{f}: cannot read: {str(e).splitlines()[0]}") from None

    def tables() -> Iterator[pa.Table]:
        from concurrent.futures import ThreadPoolExecutor

        last, noted, start, prev = -math.inf, False, 0, None
        # With a second core, the next row group is read (Parquet decoding releases the
        # GIL) while the caller works on this one; on one core that only adds switches.
        with ThreadPoolExecutor(1) as ahead:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            early = cores > 1
            nxt = ahead.submit(read, 0) if groups and early else None
            for i, (f, _, _) in enumerate(groups):
                t = nxt.result() if nxt is not None else read(i)
                nxt = ahead.submit(read, i + 1) if early and i + 1 < len(groups) else None
                if f != prev:
                    start, prev = 0, f
                name, offset = str(f), start
                check = check_trace(t, name, meta.kind,
                                    where=lambda r, name=name, offset=offset: f"{name}: row {offset + r}")
                unsorted = check.unsorted_row
                if t.num_rows and "arrival_s" in columns:
                    if t.column("arrival_s")[0].as_py() < last:
                        unsorted = 0
                    last = t.column("arrival_s")[-1].as_py()
                if unsorted is not None and not noted and meta.kind == KIND_TRACE:
                    notes.info(f"{name}: row {offset + unsorted}: arrivals are not in order; sorted on read")
                    noted = True
                start += t.num_rows
                yield t

    return meta, sum(pf.metadata.num_rows for _, pf in readers), tables()


def _note_unsorted(source: str, parts: list[tuple[str, int]] | None, row: int) -> None:
    name, local = _locate(source, parts, row)
    notes.info(f"{name}: row {local}: arrivals are not in order; sorted on read")


def read_arrow(
    path: str | os.PathLike[str],
    kind: str | None = None,
    columns: Iterable[str] | None = None,
    dictionary: Iterable[str] = (),
) -> tuple[pa.Table, Meta]:
    """Read and validate a whole file (or directory of parts) as an Arrow table.

    `dictionary`: string columns to read dictionary-encoded (adapter names: a few
    distinct values over a million rows read twice as fast and come with their codes)."""
    p = Path(path)
    meta = read_meta(p, kind)
    files = _parquet_files(p)
    dictionary = list(dictionary)
    try:
        # ParquetFile, not read_table: the latter imports pyarrow.dataset (0.1 s) for nothing.
        tables = [pq.ParquetFile(f, read_dictionary=dictionary or None).read(columns=list(columns) if columns else None)
                  for f in files]  # fmt: skip
        if len(tables) > 1 and dictionary:
            tables = [t.unify_dictionaries() for t in tables]
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, OSError) as e:
        raise TracekitError(f"{p}: cannot read: {str(e).splitlines()[0]}") from None
    if columns is None:
        parts = [(str(f), t.num_rows) for f, t in zip(files, tables, strict=True)] if len(files) > 1 else None
        table = conform(table, meta.kind, source=str(p), parts=parts, keep_dictionary=bool(dictionary))
    return table, meta


def read(path: str | os.PathLike[str], kind: str | None = None) -> tuple[pl.DataFrame, Meta]:
    """Read and validate a whole file (or directory of parts) as a polars DataFrame."""
    table, meta = read_arrow(path, kind)
    import polars as pl

    return pl.from_arrow(table), meta  # type: ignore[return-value]


def read_trace(path: str | os.PathLike[str]) -> tuple[pl.DataFrame, Meta]:
    """A validated trace, sorted by arrival. Results files are accepted too (their trace
    columns). A trace file out of arrival order is sorted, with a note; a results file
    is in completion order by nature, so sorting it is silent."""
    p = Path(path)
    if read_meta(p).kind == KIND_STEPS:
        raise TracekitError(f"{p}: expected a trace file, got a steps file")
    df, meta = read(p)
    if meta.kind == KIND_RESULTS:
        keep = [f.name for f in full_schema(KIND_TRACE) if f.name in df.columns]
        df = df.select(keep)
    if not df["arrival_s"].is_sorted():
        if meta.kind == KIND_TRACE:
            row = int((df["arrival_s"].diff() < 0).arg_true()[0])
            _note_unsorted(str(p), _parts(_parquet_files(p)), row)
        df = df.sort("arrival_s", maintain_order=True)
    return df, meta


def read_trace_arrow(path: str | os.PathLike[str], dictionary: Iterable[str] = ()) -> tuple[pa.Table, Meta]:
    """`read_trace` as an Arrow table (no conversion of its string columns; `dictionary`
    as in `read_arrow`), sorted by arrival the same way."""
    p = Path(path)
    if read_meta(p).kind == KIND_STEPS:
        raise TracekitError(f"{p}: expected a trace file, got a steps file")
    table, meta = read_arrow(p, dictionary=dictionary)
    if meta.kind == KIND_RESULTS:
        table = table.select([f.name for f in full_schema(KIND_TRACE) if f.name in table.column_names])
    arrival = table.column("arrival_s").to_numpy()
    if arrival.size > 1 and not (arrival[1:] >= arrival[:-1]).all():
        if meta.kind == KIND_TRACE:
            row = int(np.flatnonzero(arrival[1:] < arrival[:-1])[0]) + 1
            _note_unsorted(str(p), _parts(_parquet_files(p)), row)
        table = table.take(pa.array(np.argsort(arrival, kind="stable")))
    return table, meta


def adapter_ranks(context: Mapping[str, Any]) -> dict[str, int]:
    """Adapter name -> LoRA rank, from a context's `adapters` entry.

    `adapters` is a mapping name -> {"rank": int, "path": str | None}."""
    out: dict[str, int] = {}
    for name, info in (context.get("adapters") or {}).items():
        rank = info.get("rank") if isinstance(info, Mapping) else info
        if rank is not None:
            out[str(name)] = int(rank)
    return out
