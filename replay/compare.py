"""`replay compare A B`: two results of the same trace side by side (e.g. real vs twin)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl
from rich import box
from rich.table import Table

from replay.report import _json_safe, load_results
from tracekit.cliutil import console, user_errors
from tracekit.metrics import measured, per_adapter, summarize
from tracekit.schema import TracekitError
from tracekit.summary import TOP_ADAPTERS, fit, fmt

COMPARED = (
    "completed", "unfinished", "errors", "throughput_tok_s", "output_tok_s", "req_s", "served_frac",
    "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "p50_itl_ms", "p99_itl_ms",
    "mean_e2e_ms", "p50_e2e_ms", "p99_e2e_ms",
)
PER_ADAPTER = ("completed", "throughput_tok_s", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms")
# Arrivals of the same trace may differ by float rounding only (e.g. after --speed 1.0).
ARRIVAL_TOLERANCE_S = 1e-6


def check_same_trace(a: pl.DataFrame, b: pl.DataFrame, name_a: str, name_b: str) -> None:
    """Refuse two results that are not runs of the same trace (ids and arrivals)."""
    if a.height != b.height:
        raise TracekitError(f"{name_b}: not a run of the same trace as {name_a} ({b.height} requests vs {a.height})")
    sa = a.select("request_id", "arrival_s").sort("request_id")
    sb = b.select("request_id", "arrival_s").sort("request_id")
    diff = sa["request_id"] != sb["request_id"]
    if diff.any():
        i = int(np.flatnonzero(diff.to_numpy())[0])
        raise TracekitError(
            f"{name_b}: not a run of the same trace as {name_a} (request_id {sb['request_id'][i]!r} vs {sa['request_id'][i]!r})"
        )
    gap = np.abs(sa["arrival_s"].to_numpy() - sb["arrival_s"].to_numpy())
    if gap.size and gap.max() > ARRIVAL_TOLERANCE_S:
        i = int(gap.argmax())
        raise TracekitError(
            f"{name_b}: not a run of the same trace as {name_a} (request {sa['request_id'][i]!r} arrives at "
            f"{sb['arrival_s'][i]:.6f} s vs {sa['arrival_s'][i]:.6f} s; was one run with --speed?)"
        )


def rel_err(a: Any, b: Any) -> float | None:
    """(B - A) / |A|: B's error taking A as the reference (None when undefined)."""
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    if a == 0:
        return 0.0 if b == 0 else None
    return (b - a) / abs(a)


def compare_dict(a: pl.DataFrame, ctx_a: dict[str, Any], b: pl.DataFrame, ctx_b: dict[str, Any]) -> dict[str, Any]:
    sa, sb = summarize(a, ctx_a), summarize(b, ctx_b)
    metrics = {k: {"a": sa.get(k), "b": sb.get(k), "rel_err": rel_err(sa.get(k), sb.get(k))} for k in COMPARED}
    metrics["starved"] = {"a": sa["starved"], "b": sb["starved"], "rel_err": None}
    pa_a = per_adapter(a, ctx_a)
    pa_b = per_adapter(b, ctx_b)
    joined = pa_a.join(pa_b, on="adapter", how="full", suffix="_b", coalesce=True)
    rows = []
    for r in joined.to_dicts():
        row: dict[str, Any] = {"adapter": r["adapter"], "requests": r.get("requests") or r.get("requests_b") or 0}
        for k in PER_ADAPTER:
            row[f"{k}_a"], row[f"{k}_b"] = r.get(k), r.get(f"{k}_b")
            row[f"{k}_rel_err"] = rel_err(r.get(k), r.get(f"{k}_b"))
        rows.append(row)
    errs = [abs(r["throughput_tok_s_rel_err"]) for r in rows if r["throughput_tok_s_rel_err"] is not None]
    ttft_errs = [abs(r["mean_ttft_ms_rel_err"]) for r in rows if r["mean_ttft_ms_rel_err"] is not None]
    return {
        "a": {"target": ctx_a.get("target"), "window_s": sa["window_s"]},
        "b": {"target": ctx_b.get("target"), "window_s": sb["window_s"]},
        "metrics": metrics,
        "per_adapter": sorted(rows, key=lambda r: (-int(r["requests"]), str(r["adapter"]))),
        "per_adapter_mean_abs_throughput_err": float(np.mean(errs)) if errs else None,
        "per_adapter_mean_abs_ttft_err": float(np.mean(ttft_errs)) if ttft_errs else None,
    }


def _per_adapter_errors(rows: list[dict[str, Any]], show_all: bool, width: int) -> Table:
    """B's relative error per adapter, busiest adapters first, the top 20 unless `show_all`."""
    shown = rows if show_all else rows[:TOP_ADAPTERS]
    heads = {"completed": "done", "throughput_tok_s": "tok/s", "mean_ttft_ms": "TTFT", "p99_ttft_ms": "p99 TTFT",
             "mean_tpot_ms": "TPOT"}
    cells = [(heads[k], [f"{(r[f'{k}_rel_err'] or 0) * 100:+.1f}%" for r in shown]) for k in PER_ADAPTER]
    name_w = max([len("adapter"), *(len(str(r["adapter"])) for r in shown)])
    keep = fit(name_w, [("req", [fmt(r["requests"]) for r in shown]), *cells], width)
    cols = [k for i, k in enumerate(PER_ADAPTER) if i + 1 in keep]
    title = "per adapter, by requests: B's relative error" + (
        f" ({len(shown)} of {len(rows)})" if len(shown) < len(rows) else f" ({len(rows)})")
    pt = Table(title=title, box=box.SIMPLE_HEAVY, pad_edge=False)
    pt.add_column("adapter", no_wrap=True, min_width=name_w)
    pt.add_column("req", justify="right", no_wrap=True)
    for k in cols:
        pt.add_column(heads[k], justify="right", no_wrap=True)
    for r in shown:
        pt.add_row(str(r["adapter"]), fmt(r["requests"]), *(_pct(r[f"{k}_rel_err"]) for k in cols))
    notes = []
    if len(shown) < len(rows):
        notes.append(f"{len(rows) - len(shown)} more adapters: --all shows every row")
    left = [heads[k] for k in PER_ADAPTER if k not in cols]
    if left:
        notes.append(f"left out to fit {width} columns: {', '.join(left)} (--json has them)")
    if notes:
        pt.caption = "; ".join(notes)
    return pt


def _pct(v: float | None) -> str:
    if v is None:
        return "-"
    color = "green" if abs(v) <= 0.1 else "yellow" if abs(v) <= 0.25 else "red"
    return f"[{color}]{v * 100:+.1f}%[/]"


@click.command("compare")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Write compare_throughput.png, compare_running.png, compare_latency.png into DIR.")
@click.option("--all", "show_all", is_flag=True, help=f"Every adapter in the per-adapter table (default: the top {TOP_ADAPTERS}).")
@user_errors
def compare_cmd(a: Path, b: Path, as_json: bool, plots_dir: Path | None, show_all: bool) -> None:
    """Compare two results of the same trace (A is the reference, e.g. real vLLM; B e.g. the
    twin): each metric with B's relative error, per-adapter errors, overlaid timelines."""
    da, ca = load_results(a)
    db, cb = load_results(b)
    check_same_trace(da, db, str(a), str(b))
    d = compare_dict(da, ca, db, cb)
    fleet = "replica" in da.columns and "replica" in db.columns
    if fleet:
        from replay.fleet_compare import per_replica

        d["per_replica"] = per_replica(da, ca, db, cb)
    la = f"A:{ca.get('target') or a.stem}"
    lb = f"B:{cb.get('target') or b.stem}"
    if as_json:
        click.echo(json.dumps(_json_safe(d), default=str))
    else:
        t = Table(title=f"{la} ({a.name}) vs {lb} ({b.name})", box=box.SIMPLE_HEAVY)
        for c in ("metric", la, lb, "rel. error (B-A)/A"):
            t.add_column(c, justify="left" if c == "metric" else "right", no_wrap=True)
        na, nb = measured(da, ca)[0].height, measured(db, cb)[0].height  # after any warm-up
        t.add_row("requests (measured)", fmt(na), fmt(nb), "")
        for k, m in d["metrics"].items():
            frac = k == "served_frac"
            t.add_row(k, fmt(m["a"], frac=frac), fmt(m["b"], frac=frac), _pct(m["rel_err"]))
        console.print(t)
        ka, kb = d["metrics"]["completed"]["a"], d["metrics"]["completed"]["b"]
        console.print(f"latency rows count completed requests only: {la} {ka:,} of {na:,}, {lb} {kb:,} of {nb:,}")
        console.print(_per_adapter_errors(d["per_adapter"], show_all, console.width))
        if fleet:
            from replay.fleet_compare import render_per_replica

            render_per_replica(d["per_replica"], console)
        if d["per_adapter_mean_abs_throughput_err"] is not None:
            console.print(f"mean |per-adapter throughput error| {d['per_adapter_mean_abs_throughput_err'] * 100:.1f}%"
                          + (f", mean |per-adapter TTFT error| {d['per_adapter_mean_abs_ttft_err'] * 100:.1f}%"
                             if d["per_adapter_mean_abs_ttft_err"] is not None else ""))
    if plots_dir is not None:
        from tracekit.plots import write_plots

        try:
            paths = write_plots([(la, da, ca), (lb, db, cb)], plots_dir, prefix="compare_")
        except OSError as e:
            raise TracekitError(f"--plots {plots_dir}: cannot write: {e}") from None
        click.echo("plots: " + ", ".join(str(p) for p in paths), err=as_json)
