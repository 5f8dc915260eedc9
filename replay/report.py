"""`replay report`: the metrics of one results file, as tables, JSON and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import polars as pl
from rich.console import Console
from rich.table import Table

from tracekit.cliutil import console, user_errors
from tracekit.metrics import per_adapter, summarize
from tracekit.schema import KIND_RESULTS, read

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"), ("dispatch_lag", "dispatch lag"))


def load_results(path: str | Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    df, meta = read(path, KIND_RESULTS)
    return df, dict(meta.context)


def report_dict(results: pl.DataFrame, context: dict[str, Any]) -> dict[str, Any]:
    """The summary (tracekit.metrics.summarize) plus the run's identity and per-adapter rows."""
    out = summarize(results, context)
    out["target"] = context.get("target") or (results["target"][0] if results.height else None)
    out["warmup_s"] = float(context.get("warmup_s") or 0.0)
    out["interrupted"] = bool(context.get("interrupted", False))
    out["per_adapter"] = per_adapter(results, context).to_dicts()
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits if abs(v) < 1000 else 0}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render_summary(results: pl.DataFrame, context: dict[str, Any], out: Console, per_adapter_rows: int | None = None) -> dict[str, Any]:
    s = report_dict(results, context)
    head = Table(title=f"replay results: target {s['target']}, window {s['window_s']:.1f} s"
                 + (f" after {s['warmup_s']:g} s warm-up" if s["warmup_s"] else ""), show_header=False)
    head.add_column("metric")
    head.add_column("value", justify="right")
    rows = [
        ("requests (measured)", s["requests"]), ("completed", s["completed"]), ("unfinished", s["unfinished"]),
        ("errors (incl. timeouts)", s["errors"]), ("timeouts", s["timeouts"]),
        *((("cancelled (client hung up)", s["cancelled"]),) if s.get("cancelled") else ()),
        ("throughput (in+out tok/s, paper)", s["throughput_tok_s"]), ("output tok/s", s["output_tok_s"]),
        ("requests/s", s["req_s"]), ("offered (in+out tok/s)", s["offered_tok_s"]),
        ("served fraction", s["served_frac"]),
    ]
    for k, v in rows:
        head.add_row(k, _fmt(v, 3 if k in ("served fraction",) else 1))
    verdict = "[red]STARVED[/] (served < 90% of offered)" if s["starved"] else "[green]not starved[/]"
    head.add_row("starvation verdict", verdict)
    out.print(head)

    lat = Table(title="latency (ms)")
    for c in ("metric", "mean", "p50", "p90", "p99"):
        lat.add_column(c, justify="right" if c != "metric" else "left")
    for key, label in LATENCIES:
        lat.add_row(label, *(_fmt(s.get(f"{p}_{key}_ms"), 3 if key == "dispatch_lag" else 1) for p in ("mean", "p50", "p90", "p99")))
    out.print(lat)

    pa_rows = s["per_adapter"]
    if pa_rows:
        t = Table(title=f"per adapter ({len(pa_rows)})")
        cols = ["adapter", "requests", "completed", "unfinished", "errors", "throughput_tok_s", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms"]
        heads = ["adapter", "req", "done", "unfin.", "err", "tok/s", "TTFT ms", "p99 TTFT", "TPOT ms"]
        for c, h in zip(cols, heads, strict=True):
            if c == "adapter":
                t.add_column(h, no_wrap=True, min_width=8)
            else:
                t.add_column(h, justify="right")
        shown = pa_rows if per_adapter_rows is None else sorted(pa_rows, key=lambda r: -r["requests"])[:per_adapter_rows]
        for r in shown:
            t.add_row(*(_fmt(r[c]) for c in cols))
        if len(shown) < len(pa_rows):
            t.caption = f"{len(pa_rows) - len(shown)} more adapters: `replay report` shows all"
        out.print(t)
    errs = results.filter(pl.col("status").is_in(["error", "timeout"]))
    if errs.height:
        top = errs.group_by("error").len().sort("len", descending=True).head(5)
        et = Table(title="most common errors")
        et.add_column("count", justify="right")
        et.add_column("error")
        for r in top.iter_rows():
            et.add_row(str(r[1]), str(r[0]))
        out.print(et)
    return s


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


@click.command("report")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Write throughput.png, running.png and latency.png into DIR.")
@user_errors
def report_cmd(results: Path, as_json: bool, plots_dir: Path | None) -> None:
    """Throughput, completion counts, TTFT/TPOT/ITL/E2E and dispatch-lag percentiles,
    starvation verdict and per-adapter table of a results file."""
    df, ctx = load_results(results)
    if as_json:
        s = report_dict(df, ctx)
        click.echo(json.dumps(_json_safe(s), default=str))
    else:
        render_summary(df, ctx, console)
    if plots_dir is not None:
        from replay.plots import write_plots
        from tracekit.schema import TracekitError

        try:
            paths = write_plots([(str(ctx.get("target") or "run"), df, ctx)], plots_dir)
        except OSError as e:
            raise TracekitError(f"--plots {plots_dir}: cannot write: {e}") from None
        msg = "plots: " + ", ".join(str(p) for p in paths)
        if as_json:
            click.echo(msg, err=True)
        else:
            console.print(msg)
