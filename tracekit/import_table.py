"""`tracekit import table FILE`: the user's own requests (CSV, Parquet or JSONL) as a trace.

The file needs one row per request with an arrival time, prompt tokens and output
tokens; columns named as the trace's (`request_id, arrival_s, adapter, prompt_tokens,
output_tokens`, and optionally `tenant, session_id`, and `rank`, the adapter's LoRA
rank) are taken as they are, and `--map trace_column=their_column` names the others. A
Parquet file that already has the trace's columns needs no flag at all.

- Arrivals: numbers in `--time-unit` (s, ms or us), or date-times (ISO 8601 text, with
  or without a zone, or Parquet timestamps). Date-times, and numbers that read as a
  clock (the first arrival a day or more after 0, e.g. Unix time), start at 0 with
  the first request; `--time-zero keep|first` decides it yourself.
- Adapters: the `adapter` column (empty = the base model, as is `--base-model NAME`);
  without one, `--adapters N` draws them as the public importers do, else every request
  goes to the base model. Ranks come from a `rank` column, from the adapters' PEFT
  folders (`--lora-dir DIR`: DIR/<adapter>/adapter_config.json, whose path the trace
  then carries for replay), or `--rank R` for all; otherwise they stay unknown.
- Every value is checked as `tracekit.schema.check_trace` checks a trace, and a bad one
  is named by its line (CSV, JSONL) or row (Parquet) in FILE; `--drop-invalid` drops
  requests without a usable arrival or with token counts below 1 (failed requests in
  a log), and counts them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl

from tracekit import schema
from tracekit.cliutil import err_console, parse_csv_ints, user_errors
from tracekit.importers import assign_adapters, check_text, found_columns, print_facts
from tracekit.schema import TracekitError

FORMATS = ("csv", "parquet", "jsonl")
SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
            ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
# Columns a table may bring, by the trace's names. `rank` goes to the context.
COLUMNS = ("request_id", "arrival_s", "adapter", "prompt_tokens", "output_tokens", "tenant", "session_id", "rank")
REQUIRED = ("arrival_s", "prompt_tokens", "output_tokens")
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
# Numeric arrivals whose first value is this far from 0 read as a clock, not trace time.
CLOCK_AFTER_S = 86_400.0


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    by_suffix = SUFFIXES.get(path.suffix.lower())
    if by_suffix:
        return by_suffix
    try:
        head = path.open("rb").read(64)
    except OSError as e:
        raise TracekitError(f"{path}: cannot read: {e.strerror or e}") from None
    if head.startswith(b"PAR1"):
        return "parquet"
    return "jsonl" if head.lstrip().startswith(b"{") else "csv"


def parse_map(items: tuple[str, ...]) -> dict[str, str]:
    """`--map trace_column=their_column` (repeatable, or comma-separated) -> {trace: theirs}."""
    out: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            if not pair.strip():
                continue
            ours, sep, theirs = pair.partition("=")
            ours, theirs = ours.strip(), theirs.strip()
            if not sep or not ours or not theirs:
                raise TracekitError(f"--map {pair!r}: expected TRACE_COLUMN=YOUR_COLUMN, e.g. arrival_s=timestamp")
            if ours not in COLUMNS:
                raise TracekitError(f"--map {pair!r}: {ours!r} is not a trace column (one of {', '.join(COLUMNS)})")
            out[ours] = theirs
    return out


def _scan(path: Path, fmt: str) -> pl.LazyFrame:
    try:
        if fmt == "parquet":
            lf = pl.scan_parquet(path)
        elif fmt == "csv":
            check_text(path, "CSV")
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            # Every column as text: values are parsed here, so a bad one is named exactly.
            lf = pl.scan_csv(path, infer_schema=False, separator=sep)
        else:
            check_text(path, "JSONL")
            lf = pl.scan_ndjson(path, infer_schema_length=1000)
        lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        raise TracekitError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    return lf


def _where(path: Path, fmt: str, row: int) -> str:
    """A row of the file as its user finds it: CSV and JSONL by line, Parquet by row."""
    if fmt == "csv":
        return f"{path}: line {row + 2}"  # after the header line
    if fmt == "jsonl":
        return f"{path}: line {row + 1}"
    return f"{path}: row {row}"


def _numeric(col: str, dtype: pl.DataType) -> pl.Expr:
    c = pl.col(col)
    if dtype == pl.String:
        return c.str.strip_chars().cast(pl.Float64, strict=False)
    if dtype.is_numeric():
        return c.cast(pl.Float64)
    return pl.lit(None, pl.Float64)


def _is_datetime_text(lf: pl.LazyFrame, col: str) -> bool:
    """Whether a text column holds date-times (its first value is not a number)."""
    first = lf.select(pl.col(col).drop_nulls().first()).collect().item()
    if first is None:
        return False
    try:
        float(str(first).strip())
    except ValueError:
        return True
    return False


def read_table(
    path: str | Path,
    fmt: str | None = None,
    mapping: dict[str, str] | None = None,
    time_unit: str = "s",
    time_zero: str = "auto",
    drop_invalid: bool = False,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The trace columns of a user's table, in its row order, converted and checked.

    Returns (frame with the trace columns present, facts for the context: the mapping,
    how arrivals were read, rows dropped)."""
    p = Path(path)
    if not p.is_file():
        raise TracekitError(f"{p}: no such file")
    fmt = detect_format(p, fmt)
    if fmt not in FORMATS:
        raise TracekitError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if time_unit not in TIME_UNITS:
        raise TracekitError(f"--time-unit {time_unit!r}: expected s, ms or us")
    lf = _scan(p, fmt)
    names = lf.collect_schema().names()
    if fmt == "csv":  # header cells often carry spaces
        lf = lf.rename({c: c.strip() for c in names if c != c.strip()})
        names = [c.strip() for c in names]
    mapping = dict(mapping or {})
    for ours, theirs in mapping.items():
        if theirs not in names:
            raise TracekitError(f"{p}: no column {theirs!r} (for --map {ours}={theirs}); columns: {found_columns(names)}")
    source = {c: mapping.get(c, c) for c in COLUMNS if mapping.get(c, c) in names}
    for c in REQUIRED:
        if c not in source:
            raise TracekitError(
                f"{p}: missing column {c!r}; name yours with --map {c}=YOUR_COLUMN (columns: {found_columns(names)})"
            )
    dtypes = lf.collect_schema()

    def label(c: str) -> str:
        return c if source[c] == c else f"{c} (column {source[c]!r})"

    values: dict[str, pl.Expr] = {}
    bad: dict[str, tuple[pl.Expr, str]] = {}
    # Arrivals: a number in --time-unit, or a date-time.
    a_col, a_type = source["arrival_s"], dtypes[source["arrival_s"]]
    as_datetime = a_type in (pl.Datetime, pl.Date) or isinstance(a_type, pl.Datetime) or (
        a_type == pl.String and _is_datetime_text(lf, a_col))
    if as_datetime:
        if a_type == pl.String:
            # time_zone UTC: offsets are honoured, and text without one reads as UTC (one zone per file).
            dt = pl.col(a_col).str.strip_chars().str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
        else:
            dt = pl.col(a_col).cast(pl.Datetime("us"))
        # Whole microseconds since the epoch: exact, made relative below.
        values["_t_us"] = dt.dt.epoch("us")
        bad["arrival_s"] = (dt.is_null(), "is not a date-time (as the first row's)")
    else:
        v = _numeric(a_col, a_type)
        values["_t"] = v * TIME_UNITS[time_unit]
        bad["arrival_s"] = (v.is_null() | v.is_nan() | v.is_infinite() | (v < 0),
                            "must be a non-negative number")
    for c in ("prompt_tokens", "output_tokens", "rank"):
        if c not in source:
            continue
        v = _numeric(source[c], dtypes[source[c]])
        values[c] = v
        wrong = v.is_nan() | v.is_infinite() | (v != v.floor()) | (v < 1)
        # A rank may be unknown (empty); a token count may not.
        bad[c] = (wrong.fill_null(False) if c == "rank" else v.is_null() | wrong, "must be a whole number >= 1")
    for c in ("request_id", "adapter", "tenant", "session_id"):
        if c in source:
            values[c] = pl.col(source[c]).cast(pl.String).str.strip_chars()
    flags = {f"_bad_{c}": e for c, (e, _) in bad.items()}
    try:
        df = lf.select(**values, **flags).collect(engine="streaming")
    except pl.exceptions.PolarsError as e:
        raise TracekitError(f"{p}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    if df.height == 0:
        raise TracekitError(f"{p}: no requests in the file")
    df = df.with_row_index("_row")
    dropped = 0
    if drop_invalid:
        invalid = pl.any_horizontal([pl.col(f"_bad_{c}") for c in bad if c != "rank"])
        dropped = int(df.select(invalid.sum()).item())
        df = df.filter(~invalid)
        if df.height == 0:
            raise TracekitError(f"{p}: every request lacks a usable arrival or token counts ({dropped:,} dropped)")
    # The earliest bad row, as check_trace reports it.
    found = sorted((int(df["_row"][int(df[f"_bad_{c}"].arg_max())]), k, c)  # type: ignore[arg-type]
                   for k, c in enumerate(bad) if df[f"_bad_{c}"].any())
    for i, _, c in found[:1]:
        raw = lf.select(pl.col(source[c])).slice(i, 1).collect().item()
        raise TracekitError(f"{_where(p, fmt, i)}: {label(c)} {bad[c][1]}, got {raw!r}")
    df = df.drop([f"_bad_{c}" for c in bad])

    facts: dict[str, Any] = {"format": fmt, "map": {k: v for k, v in source.items() if k != v}, "dropped_invalid": dropped}
    if as_datetime:
        base = int(df["_t_us"].min())  # type: ignore[arg-type]
        if time_zero == "keep":
            raise TracekitError("--time-zero keep: arrivals are date-times; they start at the first request")
        arrival = (df["_t_us"] - base).cast(pl.Float64) / 1e6
        facts["arrivals"] = "date-times; 0 = the first request"
        facts["time_zero_utc_us"] = base  # the first request, microseconds since the epoch
        df = df.drop("_t_us")
    else:
        first = float(df["_t"].min())  # type: ignore[arg-type]
        rebase = time_zero == "first" or (time_zero == "auto" and first >= CLOCK_AFTER_S)
        arrival = df["_t"] - first if rebase else df["_t"]
        facts["arrivals"] = f"numbers in {time_unit}" + ("; 0 = the first request" if rebase else "")
        if rebase:
            facts["time_zero"] = first
            if time_zero == "auto":
                schema.notes.info(f"{p}: arrivals start at {first:,.0f} s, a clock rather than trace time: "
                                  "time 0 is the first request (--time-zero keep keeps them)")
        df = df.drop("_t")
    df = df.with_columns(arrival.alias("arrival_s"))
    if "request_id" not in df.columns:
        width = max(8, len(str(int(df["_row"].max()))))  # type: ignore[arg-type]
        df = df.with_columns(("row-" + pl.col("_row").cast(pl.String).str.zfill(width)).alias("request_id"))
    # The one validation of a trace, on the file's own rows (ids unique, values in range).
    rows = df["_row"]
    schema.check_trace(df.select("request_id", "arrival_s", "prompt_tokens", "output_tokens").lazy(), str(p),
                       where=lambda i: _where(p, fmt, int(rows[i])))
    facts["columns"] = sorted(source)
    return df.drop("_row"), facts


def adapter_context(
    df: pl.DataFrame, rank: int | None, lora_dir: Path | None, path: Path
) -> dict[str, dict[str, Any]]:
    """The context's `adapters`: each adapter's rank and PEFT folder, where known."""
    names = sorted(df["adapter"].drop_nulls().unique().to_list()) if "adapter" in df.columns else []
    table_rank: dict[str, int] = {}
    if "rank" in df.columns:
        per = df.filter(pl.col("adapter").is_not_null() & pl.col("rank").is_not_null()).group_by("adapter").agg(
            pl.col("rank").min().alias("lo"), pl.col("rank").max().alias("hi"))
        for name, lo, hi in per.iter_rows():
            if lo != hi:
                raise TracekitError(f"{path}: adapter {name!r} has ranks {int(lo)} and {int(hi)} in the rank column")
            table_rank[name] = int(lo)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        info: dict[str, Any] = {"rank": table_rank.get(name, rank), "path": None}
        if lora_dir is not None:
            cfg = lora_dir / name / "adapter_config.json"
            if cfg.is_file():
                try:
                    r = json.loads(cfg.read_text()).get("r")
                except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise TracekitError(f"{cfg}: not a PEFT adapter config: {e}") from None
                if isinstance(r, int) and r >= 1:
                    info["rank"] = r
                info["path"] = str((lora_dir / name).resolve())
        out[name] = info
    return out


def import_table(
    path: str | Path,
    *,
    fmt: str | None = None,
    mapping: dict[str, str] | None = None,
    time_unit: str = "s",
    time_zero: str = "auto",
    window: float | None = None,
    adapters: int | None = None,
    popularity: str = "uniform",
    ranks: list[int] | None = None,
    rank: int | None = None,
    lora_dir: Path | None = None,
    base_model: str | None = None,
    drop_invalid: bool = False,
    seed: int = 0,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A user's table as (trace frame sorted by arrival, trace context)."""
    p = Path(path)
    if time_zero not in ("auto", "first", "keep"):
        raise TracekitError(f"--time-zero {time_zero!r}: expected auto, first or keep")
    if rank is not None and rank < 1:
        raise TracekitError(f"--rank must be at least 1, got {rank}")
    if window is not None and not (window > 0 and np.isfinite(window)):
        raise TracekitError(f"--window must be a positive number of seconds, got {window}")
    if lora_dir is not None and not lora_dir.is_dir():
        raise TracekitError(f"--lora-dir {lora_dir}: no such directory")
    df, facts = read_table(p, fmt, mapping, time_unit, time_zero, drop_invalid)
    generator: dict[str, Any] = {"file": str(p), **facts}
    if "adapter" in df.columns:
        if adapters is not None:
            raise TracekitError(f"--adapters: {p} names its adapters (column "
                                f"{facts['map'].get('adapter', 'adapter')!r}); --adapters is for files without one")
        df = df.with_columns(pl.when(pl.col("adapter") == "").then(None).otherwise(pl.col("adapter")).alias("adapter"))
        if base_model is not None:
            df = df.with_columns(pl.when(pl.col("adapter") == base_model).then(None).otherwise(pl.col("adapter")).alias("adapter"))
        ctx_adapters = adapter_context(df, rank, lora_dir, p)
    else:
        if adapters is not None and adapters < 0:
            raise TracekitError("--adapters must be at least 0 (0 = every request to the base model)")
        ranks = ranks or [rank or 8]
        col, ctx_adapters = assign_adapters(df.height, adapters or 0, popularity, ranks, seed)
        df = df.with_columns(col)
        generator.update(adapters_drawn=adapters or 0, popularity=popularity, ranks=ranks, seed=seed)
    order = [c for c in ("request_id", "arrival_s", "adapter", "prompt_tokens", "output_tokens", "tenant", "session_id")
             if c in df.columns]
    unsorted = not df["arrival_s"].is_sorted()
    df = df.select(order).with_columns(pl.col("prompt_tokens").cast(pl.Int32), pl.col("output_tokens").cast(pl.Int32))
    if unsorted:
        df = df.sort("arrival_s", maintain_order=True)
    generator["sorted_on_import"] = unsorted
    # Without --window, the window ends one mean gap after the last arrival (n arrivals
    # over T give a rate of n / T, as predictor.features estimates it).
    last = float(df["arrival_s"].max())  # type: ignore[arg-type]
    span = last * (1.0 + 1.0 / df.height)
    if window is not None and window < last:
        # The window is the trace's length: a request past it is not in the trace.
        cut = int((df["arrival_s"] >= window).sum())
        df = df.filter(pl.col("arrival_s") < window)
        generator["after_window"] = cut
        if df.height == 0:
            raise TracekitError(f"--window {window:g}: every request arrives after it")
    context = schema.new_context(
        source="table",
        adapters=ctx_adapters,
        window_s=float(window) if window is not None else span,
        generator=generator,
    )
    return df, context


@click.command("table", short_help="Your own requests: CSV, Parquet or JSONL.")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Trace Parquet file to write.")
@click.option("--map", "maps", multiple=True, metavar="TRACE_COLUMN=YOUR_COLUMN",
              help="Your name of a trace column (repeat, or comma-separate): e.g. --map arrival_s=ts,adapter=model.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="File format [default: from the name].")
@click.option("--time-unit", type=click.Choice(list(TIME_UNITS)), default="s", show_default=True,
              help="Unit of numeric arrivals (date-times need none).")
@click.option("--time-zero", type=click.Choice(["auto", "first", "keep"]), default="auto", show_default=True,
              help="first: time 0 is the first request; keep: numbers as they are; auto: first for date-times and clocks.")
@click.option("--window", type=float, default=None,
              help="The trace's window in seconds (requests after it are left out) [default: up to the last arrival].")
@click.option("--base-model", default=None, help="The adapter value that means the base model (empty values do too).")
@click.option("--rank", type=int, default=None, help="LoRA rank of every adapter without a rank column or --lora-dir config.")
@click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of PEFT adapters (DIR/<adapter>): ranks from their configs, paths kept for replay.")
@click.option("--adapters", type=int, default=None,
              help="Only for a file without adapters: draw N adapters by --popularity (0 = base model).")
@click.option("--popularity", default="uniform", show_default=True, help="With --adapters: uniform | zipf:ALPHA.")
@click.option("--ranks", default=None, help="With --adapters: ranks, e.g. 8,16 (round-robin, then shuffled) [default: --rank, else 8].")
@click.option("--seed", type=int, default=0, show_default=True, help="With --adapters: the draw's seed.")
@click.option("--drop-invalid", is_flag=True,
              help="Drop (and count) requests without a usable arrival or with token counts below 1, instead of stopping.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@user_errors
def table_cmd(
    file: Path, out: Path, maps: tuple[str, ...], fmt: str | None, time_unit: str, time_zero: str,
    window: float | None, base_model: str | None, rank: int | None, lora_dir: Path | None,
    adapters: int | None, popularity: str, ranks: str | None, seed: int, drop_invalid: bool, as_json: bool,
) -> None:
    """Import your own requests (CSV, Parquet or JSONL; one row per request) as a trace.

    Needs an arrival time and prompt and output token counts per row; columns named as
    the trace's (request_id, arrival_s, adapter, prompt_tokens, output_tokens, tenant,
    session_id, rank) are found by name, --map names yours."""
    t0 = time.perf_counter()
    with err_console.status(f"importing {file}..."):
        df, context = import_table(
            file, fmt=fmt, mapping=parse_map(maps), time_unit=time_unit, time_zero=time_zero, window=window,
            adapters=adapters, popularity=popularity, ranks=parse_csv_ints(ranks, "--ranks") if ranks else None,
            rank=rank, lora_dir=lora_dir, base_model=base_model, drop_invalid=drop_invalid, seed=seed,
        )
        schema.write(out, df, schema.KIND_TRACE, context)
    gen = context["generator"]
    ads = context["adapters"]
    known = sum(1 for a in ads.values() if a.get("rank") is not None)
    summary = {
        "out": str(out),
        "requests": df.height,
        "window_s": context["window_s"],
        "mean_rate_req_s": df.height / context["window_s"] if context["window_s"] > 0 else None,
        "adapters": len(ads),
        "adapters_with_rank": known,
        "base_model_requests": int(df["adapter"].null_count()),
        "columns_mapped": gen["map"],
        "arrivals": gen["arrivals"],
        "dropped_invalid": gen["dropped_invalid"],
        "after_window": gen.get("after_window", 0),
        "sorted_on_import": gen["sorted_on_import"],
        "took_s": time.perf_counter() - t0,
    }
    if as_json:
        click.echo(json.dumps(summary))
        return
    rows = [
        ("out", str(out)),
        ("requests", f"{df.height:,}"),
        ("window", f"{context['window_s']:,.1f} s"),
    ]
    if summary["mean_rate_req_s"] is not None:
        rows.append(("mean rate", f"{summary['mean_rate_req_s']:,.3f} req/s"))
    rows.append(("adapters (rank known)", f"{len(ads):,} ({known:,})"))
    rows.append(("base-model requests", f"{summary['base_model_requests']:,}"))
    rows.append(("arrivals", gen["arrivals"]))
    if gen["map"]:
        rows.append(("columns mapped", ", ".join(f"{k} <- {v}" for k, v in gen["map"].items())))
    if gen["dropped_invalid"]:
        rows.append(("dropped (invalid)", f"{gen['dropped_invalid']:,}"))
    if summary["after_window"]:
        rows.append(("left out (after --window)", f"{summary['after_window']:,}"))
    if gen["sorted_on_import"]:
        rows.append(("order", "sorted by arrival (the file was not)"))
    rows.append(("took", f"{summary['took_s']:.2f} s"))
    print_facts(f"tracekit import table {file.name}", rows)
