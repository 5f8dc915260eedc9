"""The data contracts: trace, steps and results Parquet files.

Every package reads and writes these files through this module only. A file carries
key-value metadata `tracekit.kind`, `tracekit.schema` (an integer version) and a JSON
`tracekit.context`. A path may be a single file or a directory of Parquet parts (a
capture); parts are read as one dataset, and files whose names start with `_` or `.` are
ignored, as every Parquet reader does.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tracekit import __version__

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
        hint = " (is it a CSV? convert it with `tracekit import`)" if _looks_like_text(path) else ""
        raise TracekitError(f"{path}: not a Parquet file{hint}: {first}") from None
    if META_KIND not in md:
        raise TracekitError(f"{path}: Parquet file has no tracekit.kind metadata (not a tracekit file)")
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


def conform(table: pa.Table, kind: str, source: str = "<data>") -> pa.Table:
    """Check columns and types, cast to the canonical schema, drop unknown columns.

    Raises TracekitError naming `source` and the first problem found."""
    req = required_schema(kind)
    opt = _OPTIONAL[kind]
    cols: list[pa.Array | pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for f in req:
        if f.name not in table.column_names:
            raise TracekitError(f"{source}: missing column {f.name!r} for a {kind} file")
        fields.append(f)
    fields += [f for f in opt if f.name in table.column_names]
    for f in fields:
        col = table.column(f.name)
        if not _castable(col.type, f.type):
            raise TracekitError(
                f"{source}: column {f.name!r} has type {col.type}, expected {f.type}"
            )
        try:
            cols.append(col.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise TracekitError(f"{source}: column {f.name!r} cannot be read as {f.type}: {e}") from None
    out = pa.Table.from_arrays(cols, schema=pa.schema(fields))
    _check_values(out, kind, source)
    return out


def _first_bad(mask: pa.ChunkedArray | pa.Array) -> int | None:
    import pyarrow.compute as pc

    mask = pc.fill_null(mask, True)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


def _check_values(t: pa.Table, kind: str, source: str) -> None:
    import pyarrow.compute as pc

    def fail(row: int, msg: str) -> None:
        raise TracekitError(f"{source}: row {row}: {msg}")

    for name in (f.name for f in required_schema(kind) if not f.nullable):
        if t.column(name).null_count:
            fail(_first_bad(pc.is_null(t.column(name))) or 0, f"{name} is null")
    if kind in (KIND_TRACE, KIND_RESULTS):
        arr = t.column("arrival_s")
        bad = _first_bad(pc.or_(pc.less(arr, 0.0), pc.invert(pc.is_finite(arr))))
        if bad is not None:
            fail(bad, f"arrival_s must be a non-negative number, got {arr[bad].as_py()}")
        for name in ("prompt_tokens", "output_tokens"):
            bad = _first_bad(pc.less_equal(t.column(name), 0))
            if bad is not None:
                fail(bad, f"{name} must be at least 1, got {t.column(name)[bad].as_py()}")
    if kind == KIND_RESULTS:
        bad = _first_bad(pc.invert(pc.is_in(t.column("status"), pa.array(RESULT_STATUSES))))
        if bad is not None:
            fail(bad, f"status must be one of {', '.join(RESULT_STATUSES)}, got {t.column('status')[bad].as_py()!r}")
    if kind == KIND_STEPS:
        bad = _first_bad(pc.less(t.column("duration_s"), 0.0))
        if bad is not None:
            fail(bad, "duration_s is negative")


# --- writing ----------------------------------------------------------------------------


def _to_arrow(data: pa.Table | pl.DataFrame | Mapping[str, Any]) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pl.DataFrame):
        return data.to_arrow()
    return pa.table(dict(data))


def write(
    path: str | os.PathLike[str],
    data: pa.Table | pl.DataFrame | Mapping[str, Any],
    kind: str,
    context: Mapping[str, Any] | None = None,
    row_group_size: int = 1_000_000,
) -> Path:
    """Validate and write one tracekit file atomically (temp file, then rename)."""
    p = Path(path)
    table = conform(_to_arrow(data), kind, source=str(p))
    table = table.replace_schema_metadata(_meta_bytes(kind, context or {}))
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
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
    alone (no data read); value checks happen in `read`."""
    p = Path(path)
    meta = read_meta(p, kind)
    files = _parquet_files(p)
    schema = pq.read_schema(files[0])
    req = required_schema(meta.kind)
    for f in req:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            raise TracekitError(f"{files[0]}: missing column {f.name!r} for a {meta.kind} file")
        if not _castable(schema.field(idx).type, f.type):
            raise TracekitError(
                f"{files[0]}: column {f.name!r} has type {schema.field(idx).type}, expected {f.type}"
            )
    try:
        lf = pl.scan_parquet([str(f) for f in files]) if len(files) > 1 else pl.scan_parquet(str(files[0]))
    except Exception as e:  # polars raises several exception types for bad files
        raise TracekitError(f"{p}: cannot read: {str(e).splitlines()[0]}") from None
    return lf, meta


def read_arrow(path: str | os.PathLike[str], kind: str | None = None, columns: Iterable[str] | None = None) -> tuple[pa.Table, Meta]:
    """Read and validate a whole file (or directory of parts) as an Arrow table."""
    p = Path(path)
    meta = read_meta(p, kind)
    files = _parquet_files(p)
    try:
        tables = [pq.read_table(f, columns=list(columns) if columns else None) for f in files]
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, OSError) as e:
        raise TracekitError(f"{p}: cannot read: {str(e).splitlines()[0]}") from None
    if columns is None:
        table = conform(table, meta.kind, source=str(p))
    return table, meta


def read(path: str | os.PathLike[str], kind: str | None = None) -> tuple[pl.DataFrame, Meta]:
    """Read and validate a whole file (or directory of parts) as a polars DataFrame."""
    table, meta = read_arrow(path, kind)
    return pl.from_arrow(table), meta  # type: ignore[return-value]


def read_trace(path: str | os.PathLike[str]) -> tuple[pl.DataFrame, Meta]:
    """A trace, sorted by arrival. Results files are accepted too (their trace columns)."""
    df, meta = read(path)
    if meta.kind == KIND_STEPS:
        raise TracekitError(f"{path}: expected a trace file, got a steps file")
    if meta.kind == KIND_RESULTS:
        keep = [f.name for f in full_schema(KIND_TRACE) if f.name in df.columns]
        df = df.select(keep)
    return df.sort("arrival_s", maintain_order=True), meta


def adapter_ranks(context: Mapping[str, Any]) -> dict[str, int]:
    """Adapter name -> LoRA rank, from a context's `adapters` entry.

    `adapters` is a mapping name -> {"rank": int, "path": str | None}."""
    out: dict[str, int] = {}
    for name, info in (context.get("adapters") or {}).items():
        rank = info.get("rank") if isinstance(info, Mapping) else info
        if rank is not None:
            out[str(name)] = int(rank)
    return out
