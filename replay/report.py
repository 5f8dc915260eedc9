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
from tracekit.summary import (
    TOP_ADAPTERS,
    fmt,
    per_adapter_table,
    render_config,
    render_head,
    render_latency,
    starving_reason,
)


def load_results(path: str | Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    df, meta = read(path, KIND_RESULTS)
    return df, dict(meta.context)


def report_dict(results: pl.DataFrame, context: dict[str, Any]) -> dict[str, Any]:
    """The summary (tracekit.metrics.summarize) plus the run's identity and per-adapter rows."""
    out = summarize(results, context)
    out["target"] = context.get("target") or (results["target"][0] if results.height else None)
    out["warmup_s"] = float(context.get("warmup_s") or 0.0)
    out["interrupted"] = bool(context.get("interrupted", False))
    out["per_adapter"] = per_adapter(results, context).sort(["requests", "adapter"], descending=[True, False]).to_dicts()
    if context.get("configuration"):
        out["configuration"] = context["configuration"]
    reason = starving_reason(out, context.get("twin"), context.get("configuration"))
    if reason:
        out["starving_reason"] = reason
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    """Kept for callers of the old name: `tracekit.summary.fmt`."""
    return fmt(v, frac=digits >= 3 and isinstance(v, float) and abs(v) <= 1.0)


def render_summary(results: pl.DataFrame, context: dict[str, Any], out: Console, per_adapter_rows: int | None = None,
                   show_all: bool = False) -> dict[str, Any]:
    """The run's configuration (when the results say it), counts and verdict (with the
    limit a starving twin hit), latency with its coverage, and the per-adapter table
    (top `per_adapter_rows`, default 20, unless `show_all`)."""
    s = report_dict(results, context)
    cfg = context.get("configuration")
    render_config(cfg, out)
    if s["target"] == "vllm" and context.get("url"):
        out.print(f"target vllm at {context['url']} (model {context.get('served_model') or '?'}): "
                  "its configuration is the server's own")
    title = f"replay results: target {s['target']}, window {s['window_s']:,.1f} s" + (
        f" after {s['warmup_s']:g} s warm-up" if s["warmup_s"] else "")
    render_head(s, title, out, twin=context.get("twin"), config=cfg)
    render_latency(s, out)
    if s["per_adapter"]:
        out.print(per_adapter_table(s["per_adapter"], show_all=show_all, top=per_adapter_rows or TOP_ADAPTERS,
                                    width=out.width))
    errs = results.filter(pl.col("status").is_in(["error", "timeout"]))
    if errs.height:
        top = errs.group_by("error").len().sort("len", descending=True).head(5)
        et = Table(title="most common errors")
        et.add_column("count", justify="right")
        et.add_column("error")
        for r in top.iter_rows():
            et.add_row(fmt(int(r[1])), str(r[0]))
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
@click.option("--all", "show_all", is_flag=True, help=f"Every adapter in the per-adapter table (default: the top {TOP_ADAPTERS}).")
@user_errors
def report_cmd(results: Path, as_json: bool, plots_dir: Path | None, show_all: bool) -> None:
    """Throughput, completion counts, TTFT/TPOT/ITL/E2E and dispatch-lag percentiles,
    starvation verdict and per-adapter table of a results file."""
    df, ctx = load_results(results)
    if as_json:
        s = report_dict(df, ctx)
        click.echo(json.dumps(_json_safe(s), default=str))
    else:
        render_summary(df, ctx, console, show_all=show_all)
    if plots_dir is not None:
        from tracekit.plots import write_plots
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
