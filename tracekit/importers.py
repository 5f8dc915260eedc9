"""`tracekit import`: traces from elsewhere -> tracekit traces.

`tracekit import table FILE` takes your own CSV, Parquet or JSONL (tracekit.import_table).
The public formats below name no adapters, so each request is given one, drawn from a
popularity law over `--adapters N`, seeded:

- ``azure``: Azure LLM inference traces 2023/2024, CSV ``TIMESTAMP,ContextTokens,
  GeneratedTokens`` (TIMESTAMP a date-time such as ``2023-11-16 18:15:46.6805900``, an
  optional time-zone suffix is ignored; plain seconds are accepted too).
- ``burstgpt``: BurstGPT CSV ``Timestamp,Model,Request tokens,Response tokens,Total
  tokens,Log Type`` (Timestamp in seconds); failed requests (zero response tokens) are
  skipped and counted.
- ``mooncake``: Mooncake / Bailian JSONL, one object per line with ``timestamp`` (ms),
  ``input_length``, ``output_length`` and ``hash_ids`` (chained prefix-block hashes of
  ``--block-tokens`` tokens, 512 in Mooncake's traces). They become the trace's
  ``prefix_hashes`` as they are, one per full prompt block (Mooncake lists the partial
  last block too; the schema's column, and a prefix cache, count full blocks only), with
  ``prefix_block_tokens`` in the context.

Time: 0 is the first request of the file; ``--start/--end`` select a window in those
seconds, then ``--speed`` divides time (2 = twice the rate).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl
import pyarrow as pa

from tracekit import schema
from tracekit.cliutil import LazyGroup, console, err_console, parse_csv_ints, user_errors
from tracekit.prefix import tokens_from_block_hashes
from tracekit.schema import TracekitError
from tracekit.synth import adapter_names, assign_round_robin, popularity_weights

FORMATS = ("azure", "burstgpt", "mooncake")


def check_text(path: Path, fmt: str) -> None:
    """Refuse a binary file (a Parquet file, say) before it is parsed as text, whose
    "column names" would be kilobytes of bytes."""
    try:
        head = path.open("rb").read(4096)
    except OSError as e:
        raise TracekitError(f"{path}: cannot read: {e.strerror or e}") from None
    if head.startswith(b"PAR1"):
        raise TracekitError(f"{path}: a Parquet file, not {fmt} text; for a table of your own, "
                            + schema.import_hint(path))
    if b"\x00" in head:
        raise TracekitError(f"{path}: a binary file, not {fmt} text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise TracekitError(f"{path}: not UTF-8 text (byte {e.start}): not a {fmt} file") from None


def found_columns(names: list[str], limit: int = 12) -> str:
    """The columns a file has, shortened for one error line."""
    shown = [n if len(n) <= 40 else n[:37] + "..." for n in names[:limit]]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _scan_csv(path: Path, columns: list[str]) -> pl.LazyFrame:
    """A lazy CSV scan, every column a string (we parse and report values ourselves)."""
    check_text(path, "CSV")
    try:
        lf = pl.scan_csv(path, infer_schema=False)
        names = lf.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        raise TracekitError(f"{path}: cannot read as CSV: {str(e).splitlines()[0]}") from None
    lf = lf.rename({c: c.strip() for c in names})
    names = [c.strip() for c in names]
    for c in columns:
        if c not in names:
            raise TracekitError(f"{path}: missing column {c!r} (found: {found_columns(names)})")
    return lf


def _number(col: str, integer: bool) -> tuple[pl.Expr, pl.Expr]:
    """(value as Float64, "is bad" flag) expressions for a string column."""
    v = pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    bad = v.is_null() | v.is_nan() | v.is_infinite()
    if integer:
        bad = bad | (v != v.floor())
    return v, bad


def _collect(lf: pl.LazyFrame, values: dict[str, pl.Expr], checks: dict[str, tuple[pl.Expr, str]], path: Path) -> pl.DataFrame:
    """Collect numeric columns in one streaming pass (the strings are never held whole);
    on a bad value, name its CSV line and the raw text."""
    flags = {f"_bad_{name}": expr for name, (expr, _) in checks.items()}
    try:
        df = lf.select(**values, **flags).collect(engine="streaming")
    except pl.exceptions.PolarsError as e:
        raise TracekitError(f"{path}: cannot read as CSV: {str(e).splitlines()[0]}") from None
    for name, (_, why) in checks.items():
        bad = df[f"_bad_{name}"]
        if bad.any():
            i = int(bad.arg_max())  # type: ignore[arg-type]
            raw = lf.select(pl.col(name)).slice(i, 1).collect().item()
            raise TracekitError(f"{path}: line {i + 2}: {name} {why}: {raw!r}")
    return df.drop(list(flags))


# Date-times with up to 9 fractional digits and an optional zone suffix: whole seconds
# and the fraction are parsed apart, so 7-digit fractions (Azure 2023) work.
_DATETIME = r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})"
_FRACTION = r"^\S+[ T]\d{2}:\d{2}:\d{2}\.(\d+)"
_LAYOUT = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.(\d{1,9}))?(\S*)$")


def _datetime_exprs(first: str) -> tuple[dict[str, pl.Expr], pl.Expr, pl.Expr | None]:
    """(value exprs, "is bad" expr, "row has the first row's layout" expr or None).

    Azure files are fixed-width, so when the first row fits the pattern the fast path
    slices fixed positions (4x cheaper than regex extraction); rows of another layout
    send the whole file down the general regex path."""
    raw = pl.col("TIMESTAMP").str.strip_chars()
    m = _LAYOUT.match(first)
    if m is None:
        dt = (raw.str.extract(_DATETIME, 1) + " " + raw.str.extract(_DATETIME, 2)).str.to_datetime(
            "%Y-%m-%d %H:%M:%S", strict=False, time_unit="us"
        )
        frac = ("0." + raw.str.extract(_FRACTION, 1).fill_null("0")).cast(pl.Float64, strict=False)
        return {"t_whole": dt.dt.epoch("s"), "t_frac": frac}, dt.is_null(), None
    k = len(m.group(1) or "")
    dt = raw.str.slice(0, 19).str.replace("T", " ", literal=True, n=1).str.to_datetime(
        "%Y-%m-%d %H:%M:%S", strict=False, time_unit="us"
    )
    frac = raw.str.slice(20, k).cast(pl.Int64, strict=False) / 10**k if k else pl.lit(0.0)
    ok = raw.str.len_bytes() == len(first)
    if k:
        ok = ok & (raw.str.slice(19, 1) == ".") & frac.is_not_null()
    return {"t_whole": dt.dt.epoch("s"), "t_frac": frac}, dt.is_null() & ok, ok


def read_azure(path: Path) -> tuple[pl.DataFrame, dict[str, int]]:
    lf = _scan_csv(path, ["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
    head = lf.select(pl.col("TIMESTAMP").str.strip_chars()).head(1).collect()
    first = str(head.item()) if head.height else ""
    numeric_ts = head.height > 0 and head.cast(pl.Float64, strict=False).item() is not None
    prompt, bad_prompt = _number("ContextTokens", True)
    output, bad_output = _number("GeneratedTokens", True)
    token_checks = {
        "ContextTokens": (bad_prompt, "is not an integer"),
        "GeneratedTokens": (bad_output, "is not an integer"),
    }
    if numeric_ts:  # plain seconds
        t, bad_t = _number("TIMESTAMP", False)
        checks = {"TIMESTAMP": (bad_t, "is not a number"), **token_checks}
        df = _collect(lf, {"t": t, "prompt_tokens": prompt, "output_tokens": output}, checks, path)
        return df, {}
    values, bad_t, layout_ok = _datetime_exprs(first)
    if layout_ok is not None:
        values = {**values, "_layout_ok": layout_ok}
    checks = {"TIMESTAMP": (bad_t, "is not a date-time"), **token_checks}
    df = _collect(lf, {**values, "prompt_tokens": prompt, "output_tokens": output}, checks, path)
    if layout_ok is not None:
        if not df["_layout_ok"].all():
            values, bad_t, _ = _datetime_exprs("")  # mixed layouts: the general path
            checks["TIMESTAMP"] = (bad_t, "is not a date-time")
            df = _collect(lf, {**values, "prompt_tokens": prompt, "output_tokens": output}, checks, path)
        else:
            df = df.drop("_layout_ok")
    # Whole seconds are exact integers, made relative before adding the fraction so
    # float64 keeps sub-microsecond resolution. A zone suffix is dropped (one zone per trace).
    whole = df["t_whole"]
    base = whole.min() if df.height else 0
    df = df.select(((whole - base).cast(pl.Float64) + df["t_frac"]).alias("t"), "prompt_tokens", "output_tokens")
    return df, {}


def read_burstgpt(path: Path) -> tuple[pl.DataFrame, dict[str, int]]:
    lf = _scan_csv(path, ["Timestamp", "Request tokens", "Response tokens"])
    t, bad_t = _number("Timestamp", False)
    prompt, bad_prompt = _number("Request tokens", True)
    output, bad_output = _number("Response tokens", True)
    out = _collect(
        lf,
        {"t": t, "prompt_tokens": prompt, "output_tokens": output},
        {
            "Timestamp": (bad_t, "is not a number"),
            "Request tokens": (bad_prompt, "is not an integer"),
            "Response tokens": (bad_output, "is not an integer"),
        },
        path,
    )
    # Failed requests (zero response tokens) stay here: they still fix time 0, and
    # import_trace skips and counts them within the selected window.
    return out, {}


def read_mooncake(path: Path) -> tuple[pl.DataFrame, dict[str, int]]:
    rows_t: list[float] = []
    rows_in: list[int] = []
    rows_out: list[int] = []
    rows_hash: list[list[int]] = []

    check_text(path, "JSONL")
    try:
        fh = path.open("r", encoding="utf-8", errors="replace")
    except OSError as e:
        raise TracekitError(f"{path}: cannot read: {e.strerror or e}") from None
    # A line-by-line loop here: JSONL traces are ~10^4-10^6 lines, and it lets a bad
    # line be named exactly.
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TracekitError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TracekitError(f"{path}: line {lineno}: expected a JSON object")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in obj:
                    raise TracekitError(f"{path}: line {lineno}: missing field {key!r}")
                v = obj[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                    raise TracekitError(f"{path}: line {lineno}: {key} is not a number: {v!r}")
            if obj["input_length"] != int(obj["input_length"]) or obj["output_length"] != int(obj["output_length"]):
                raise TracekitError(f"{path}: line {lineno}: input_length/output_length must be integers")
            hashes = obj.get("hash_ids") or []
            if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes):
                raise TracekitError(f"{path}: line {lineno}: hash_ids must be a list of integers")
            rows_t.append(float(obj["timestamp"]) / 1000.0)  # ms -> s
            rows_in.append(int(obj["input_length"]))
            rows_out.append(int(obj["output_length"]))
            rows_hash.append(hashes)
    out = pl.DataFrame(
        {"t": rows_t, "prompt_tokens": rows_in, "output_tokens": rows_out, "hash_ids": rows_hash},
        schema={"t": pl.Float64, "prompt_tokens": pl.Float64, "output_tokens": pl.Float64, "hash_ids": pl.List(pl.Int64)},
    )
    return out, {}


def _skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v)


def assign_adapters(
    n: int, adapters: int, popularity: str, ranks: list[int], seed: int
) -> tuple[pl.Series, dict[str, dict[str, Any]]]:
    """Adapters for n requests of a trace that names none: each request draws one of
    `adapters` by the popularity law (0 = all to the base model), ranks round-robin then
    shuffled. Returns the adapter column and the context's `adapters` entry."""
    weights = popularity_weights(max(adapters, 1), popularity)
    rng = np.random.default_rng(seed)
    if not adapters:
        return pl.Series("adapter", [None] * n, dtype=pl.String), {}
    names = adapter_names(adapters)
    idx = rng.choice(adapters, size=n, p=weights)
    col = pl.Series("adapter", names, dtype=pl.String).gather(pl.Series(idx))
    rank_of = assign_round_robin(list(ranks), adapters, rng)
    return col, {name: {"rank": int(rank_of[i]), "path": None} for i, name in enumerate(names)}


READERS = {"azure": read_azure, "burstgpt": read_burstgpt, "mooncake": read_mooncake}


def import_trace(
    fmt: str,
    path: str | Path,
    adapters: int,
    popularity: str = "uniform",
    ranks: list[int] | None = None,
    start: float | None = None,
    end: float | None = None,
    speed: float = 1.0,
    seed: int = 0,
    token_ids: bool = False,
    block_tokens: int = 512,
    vocab_size: int = 32000,
) -> tuple[pl.DataFrame, dict[str, Any], dict[str, int]]:
    """Read a public trace; return (trace frame, context, skipped-row counts).

    `token_ids` (Mooncake only) adds `prompt_token_ids` built from the `hash_ids` of
    `block_tokens`-token blocks, so replaying the trace reproduces its prefix sharing."""
    if fmt not in READERS:
        raise TracekitError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if token_ids and fmt != "mooncake":
        raise TracekitError("--token-ids needs prefix-block hashes, which only the mooncake format has")
    if fmt == "mooncake" and block_tokens < 1:
        raise TracekitError("--block-tokens must be at least 1")
    if token_ids and (block_tokens < 1 or vocab_size < 2):
        raise TracekitError("--block-tokens must be at least 1 and --vocab-size at least 2")
    p = Path(path)
    if not p.is_file():
        raise TracekitError(f"{p}: no such file")
    if adapters < 0:
        raise TracekitError("--adapters must be at least 0 (0 = every request to the base model)")
    if not (speed > 0 and np.isfinite(speed)):
        raise TracekitError(f"--speed must be a positive number, got {speed}")
    if start is not None and end is not None and end <= start:
        raise TracekitError(f"--end ({end}) must be after --start ({start})")
    ranks = ranks or [8]
    if any(r < 1 for r in ranks):
        raise TracekitError(f"--ranks must be positive integers, got {ranks}")
    popularity_weights(max(adapters, 1), popularity)  # a bad law fails before the file is read

    raw, skipped = READERS[fmt](p)
    raw = raw.with_row_index("row")
    if raw.height == 0:
        raise TracekitError(f"{p}: no requests in the file")
    t0 = float(raw["t"].min())  # type: ignore[arg-type]
    rel = raw["t"] - t0
    lo = 0.0 if start is None else float(start)
    keep = rel >= lo
    if end is not None:
        keep = keep & (rel < float(end))
    raw = raw.with_columns(((rel - lo) / speed).alias("arrival_s")).filter(keep)
    if fmt == "burstgpt":
        failed = raw["output_tokens"] == 0
        skipped["failed_zero_response"] = int(failed.sum())
        raw = raw.filter(~failed)
    bad_tokens = (raw["prompt_tokens"] < 1) | (raw["output_tokens"] < 1)
    if bad_tokens.any():
        skipped["zero_tokens"] = int(bad_tokens.sum())
        raw = raw.filter(~bad_tokens)
    if raw.height == 0:
        why = f"; skipped: {_skipped_text(skipped)}" if any(skipped.values()) else ""
        raise TracekitError(f"{p}: no requests left in the selected window{why}")
    raw = raw.sort("arrival_s", maintain_order=True)

    n = raw.height
    adapter_col, ctx_adapters = assign_adapters(n, adapters, popularity, ranks, seed)
    df = pl.DataFrame(
        {
            "request_id": f"{fmt}-" + raw["row"].cast(pl.String).str.zfill(8),
            "arrival_s": raw["arrival_s"],
            "adapter": adapter_col,
            "prompt_tokens": raw["prompt_tokens"].cast(pl.Int32),
            "output_tokens": raw["output_tokens"].cast(pl.Int32),
        }
    )
    extra_ctx: dict[str, Any] = {}
    if fmt == "mooncake" and raw["hash_ids"].list.len().sum() > 0:
        full = raw.select(pl.col("hash_ids").list.head(pl.col("prompt_tokens").cast(pl.Int64) // block_tokens))
        df = df.with_columns(prefix_hashes=full["hash_ids"])
        extra_ctx[schema.CTX_PREFIX_BLOCK_TOKENS] = int(block_tokens)
    if token_ids:
        hashes = raw["hash_ids"]
        hash_offsets = np.zeros(n + 1, np.int64)
        np.cumsum(hashes.list.len().to_numpy(), out=hash_offsets[1:])
        offsets, values = tokens_from_block_hashes(
            raw["prompt_tokens"].to_numpy(), hash_offsets, hashes.explode().drop_nulls().to_numpy(),
            block_tokens, vocab_size,
        )
        if offsets[-1] > np.iinfo(np.int32).max:
            raise TracekitError(
                f"{p}: --token-ids would hold {offsets[-1]:,} tokens, over one column's limit; "
                "select a window with --start/--end"
            )
        lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
        df = df.with_columns(pl.Series("prompt_token_ids", lists))
    if end is not None:
        window = (float(end) - lo) / speed
    else:
        window = float(df["arrival_s"].max()) if n else 0.0  # type: ignore[arg-type]
    generator = {
        "format": fmt,
        "file": str(p),
        "adapters": adapters,
        "popularity": popularity,
        "ranks": [int(r) for r in ranks],
        "start": start,
        "end": end,
        "speed": speed,
        "skipped": skipped,
    }
    if token_ids:
        generator.update(token_ids=True, block_tokens=block_tokens, vocab_size=vocab_size)
    context = schema.new_context(
        source=fmt,
        adapters=ctx_adapters,
        window_s=window,
        generator=generator,
        seed=int(seed),
        **extra_ctx,
    )
    return df, context, skipped


def _public_cmd(fmt: str, what: str, short: str) -> click.Command:
    """`tracekit import FORMAT FILE`: one public format, adapters assigned by a law."""

    @click.command(fmt, help=f"Import {what} as a tracekit trace (adapters drawn by --popularity).", short_help=short)
    @click.argument("file", type=click.Path(path_type=Path))
    @click.option("--adapters", type=int, required=True, help="Adapters to spread requests over (0 = base model only).")
    @click.option("--popularity", default="uniform", show_default=True, help="uniform | zipf:ALPHA")
    @click.option("--ranks", default="8", show_default=True, help="LoRA ranks, e.g. 8,16 (round-robin, then shuffled).")
    @click.option("--start", type=float, default=None, help="Where the trace starts, seconds after the file's first request.")
    @click.option("--window", type=float, default=None,
                  help="The trace's window: seconds from --start [default: to the file's last request].")
    @click.option("--end", type=float, default=None, hidden=True, help="Old: window end after the first request.")
    @click.option("--speed", type=float, default=1.0, show_default=True, help="Time is divided by this (2 = twice the rate).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--token-ids", is_flag=True, help="mooncake: add prompt_token_ids that reproduce the trace's prefix sharing (hash_ids).")
    @click.option("--block-tokens", type=int, default=512, show_default=True, help="Tokens per hash_ids block (mooncake): the trace's prefix_block_tokens.")
    @click.option("--vocab-size", type=int, default=32000, show_default=True, help="Token ids stay below this (the model's vocabulary).")
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
    @user_errors
    def cmd(
        file: Path,
        adapters: int,
        popularity: str,
        ranks: str,
        start: float | None,
        window: float | None,
        end: float | None,
        speed: float,
        seed: int,
        token_ids: bool,
        block_tokens: int,
        vocab_size: int,
        out: Path,
        as_json: bool,
    ) -> None:
        t0 = time.perf_counter()
        if end is not None:  # the old name, kept for one version
            if window is not None:
                raise TracekitError("--end is the old way to give --window: give --window only")
            click.echo("note: --end is now --window (seconds from --start; the old name goes in the next version)",
                       err=True)
        elif window is not None:
            if not window > 0:
                raise TracekitError(f"--window must be positive, got {window}")
            end = (start or 0.0) + window
        with err_console.status(f"importing {file}..."):
            df, context, skipped = import_trace(
                fmt, file, adapters, popularity, parse_csv_ints(ranks, "--ranks"), start, end, speed, seed,
                token_ids=token_ids, block_tokens=block_tokens, vocab_size=vocab_size,
            )
            schema.write(out, df, schema.KIND_TRACE, context)
        if as_json:
            w = context["window_s"]
            click.echo(json.dumps({"out": str(out), "requests": df.height, "window_s": w,
                                   "mean_rate_req_s": df.height / w if w > 0 else None, "adapters": adapters,
                                   "popularity": popularity, "skipped": skipped, "took_s": time.perf_counter() - t0}))
            return
        rows = [("out", str(out)), ("requests", f"{df.height:,}"), ("window", f"{context['window_s']:,.1f} s")]
        if context["window_s"] > 0:
            rows.append(("mean rate", f"{df.height / context['window_s']:,.3f} req/s"))
        rows.append(("adapters", f"{adapters:,} ({popularity})"))
        rows += [(f"skipped ({why.replace('_', ' ')})", f"{count:,}") for why, count in skipped.items()]
        rows.append(("took", f"{time.perf_counter() - t0:.2f} s"))
        print_facts(f"tracekit import {fmt}", rows)

    return cmd


def print_facts(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column table of facts (name, value)."""
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    for name, value in rows:
        t.add_row(name, value)
    console.print(t)


@click.group(
    "import",
    cls=LazyGroup,
    lazy={"table": "tracekit.import_table:table_cmd"},
)
def import_cmd() -> None:
    """Bring a trace in: your own table (CSV, Parquet, JSONL) or a public trace."""


for _fmt, _what, _short in (
    ("azure", "an Azure LLM inference trace (CSV TIMESTAMP,ContextTokens,GeneratedTokens)", "Azure LLM inference trace (CSV)."),
    ("burstgpt", "a BurstGPT trace (CSV Timestamp,Request tokens,Response tokens)", "BurstGPT trace (CSV)."),
    ("mooncake", "a Mooncake / Bailian trace (JSONL timestamp ms, input_length, output_length, hash_ids)",
     "Mooncake / Bailian trace (JSONL)."),
):
    import_cmd.add_command(_public_cmd(_fmt, _what, _short))
