"""Predictor files: a dataset is a Parquet table with metadata, like tracekit's files.

Metadata keys `predictor.kind` (dataset), `predictor.schema` (an integer version) and a
JSON `predictor.context` (profile, spec, provenance). Written atomically (temp name,
then rename), so an interrupted sweep never leaves half a part behind.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tracekit.schema import TracekitError

KIND_DATASET = "dataset"
SCHEMA_VERSION = 1
META_KIND = b"predictor.kind"
META_SCHEMA = b"predictor.schema"
META_CONTEXT = b"predictor.context"


def write(path: str | os.PathLike[str], df: pl.DataFrame, context: Mapping[str, Any], kind: str = KIND_DATASET) -> Path:
    p = Path(path)
    table = df.to_arrow()
    table = table.replace_schema_metadata(
        {
            META_KIND: kind.encode(),
            META_SCHEMA: str(SCHEMA_VERSION).encode(),
            META_CONTEXT: json.dumps(dict(context), sort_keys=True, default=str).encode(),
        }
    )
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, p)
    except OSError as e:
        raise TracekitError(f"{p}: cannot write: {e.strerror or e}") from None
    return p


def read(path: str | os.PathLike[str], kind: str = KIND_DATASET) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A predictor file (or a directory of parts) and its context, checked."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.parquet") if not f.name.startswith(("_", ".")))
        if not files:
            raise TracekitError(f"{p}: directory holds no Parquet parts")
    elif p.exists():
        files = [p]
    else:
        raise TracekitError(f"{p}: no such file or directory")
    frames, ctx = [], {}
    for f in files:
        try:
            md = pq.read_schema(f).metadata or {}
        except (pa.ArrowInvalid, OSError) as e:
            raise TracekitError(f"{f}: not a Parquet file: {str(e).splitlines()[0]}") from None
        got = md.get(META_KIND, b"").decode()
        if got != kind:
            what = f"a tracekit {md[b'tracekit.kind'].decode()} file" if b"tracekit.kind" in md else "not a predictor file"
            raise TracekitError(f"{f}: expected a predictor {kind} file, got {got or what}")
        if int(md.get(META_SCHEMA, b"1")) > SCHEMA_VERSION:
            raise TracekitError(f"{f}: predictor.schema is newer than this tool supports; upgrade lora-tracekit")
        ctx = json.loads(md.get(META_CONTEXT, b"{}") or b"{}")
        frames.append(pl.read_parquet(f))
    df = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    return df, ctx
