"""Timelines of a results table (throughput, running requests, latency) and their PNGs.

One binning for `replay report`, `replay compare`, `replay run` and `twin run`, so
overlaid runs share bins exactly. TTFT is drawn on a log scale: a queue's p99 of
minutes would flatten a p50 of milliseconds to the axis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tracekit.metrics import window_of


def bin_width(horizon: float) -> float:
    """About 60-120 bins over the run, on a round number of seconds."""
    for w in (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if horizon / w <= 120:
            return float(w)
    return 1200.0


def timelines(results: pl.DataFrame, context: Mapping[str, Any] | None = None, width: float | None = None,
              horizon: float | None = None) -> dict[str, np.ndarray]:
    """Per-bin series: completed tokens/s (input+output), output tokens/s, offered tokens/s,
    running requests (sampled at bin starts), p50/p99 TTFT and mean TPOT of requests by arrival bin."""
    if horizon is None:
        horizon = window_of(results, context)
        ends = results["end_s"].drop_nulls()
        if ends.len():
            horizon = max(horizon, float(ends.max()))  # type: ignore[arg-type]
    width = width or bin_width(horizon)
    nb = max(int(np.ceil(horizon / width)), 1)
    edges = np.arange(nb + 1) * width
    ok = results.filter(pl.col("status") == "ok")
    end = ok["end_s"].to_numpy()
    tokens = (ok["prompt_tokens"] + ok["generated_tokens"].fill_null(ok["output_tokens"])).to_numpy()
    out_tok = ok["generated_tokens"].fill_null(ok["output_tokens"]).to_numpy()
    thr = np.histogram(end, bins=edges, weights=tokens)[0] / width
    out_thr = np.histogram(end, bins=edges, weights=out_tok)[0] / width
    arr = results["arrival_s"].to_numpy()
    offered = np.histogram(arr, bins=edges, weights=(results["prompt_tokens"] + results["output_tokens"]).to_numpy())[0] / width
    start = results["dispatch_s"].fill_null(results["arrival_s"]).to_numpy()
    stop = results["end_s"].to_numpy()
    stop = np.where(np.isnan(stop), np.inf, stop)
    t = edges[:-1]
    starts_sorted, stops_sorted = np.sort(start), np.sort(stop)
    running = np.searchsorted(starts_sorted, t, side="right") - np.searchsorted(stops_sorted, t, side="right")
    ttft_p50 = np.full(nb, np.nan)
    ttft_p99 = np.full(nb, np.nan)
    tpot_mean = np.full(nb, np.nan)
    if ok.height:
        idx = np.minimum((ok["arrival_s"].to_numpy() // width).astype(int), nb - 1)
        ttft = ok["ttft_s"].cast(pl.Float64).to_numpy()
        tpot = ok["tpot_s"].cast(pl.Float64).to_numpy()
        order = np.argsort(idx, kind="stable")
        bounds = np.searchsorted(idx[order], np.arange(nb + 1))
        for b in range(nb):
            sel = order[bounds[b]:bounds[b + 1]]
            if sel.size:
                v = ttft[sel][np.isfinite(ttft[sel])]
                if v.size:
                    ttft_p50[b], ttft_p99[b] = np.percentile(v, [50, 99])
                w = tpot[sel][np.isfinite(tpot[sel])]
                if w.size:
                    tpot_mean[b] = w.mean()
    return {"t": t + width / 2, "t_start": t, "width": np.array(width), "throughput_tok_s": thr,
            "output_tok_s": out_thr, "offered_tok_s": offered, "running": running.astype(float),
            "ttft_p50_ms": ttft_p50 * 1e3, "ttft_p99_ms": ttft_p99 * 1e3, "tpot_mean_ms": tpot_mean * 1e3}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(runs: Sequence[tuple[str, pl.DataFrame, Mapping[str, Any]]], out_dir: Path, prefix: str = "") -> list[Path]:
    """Throughput, running requests and latency over time, one PNG each, runs overlaid."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    horizon = 0.0
    for _, res, ctx in runs:
        h = window_of(res, ctx)
        ends = res["end_s"].drop_nulls()
        horizon = max(horizon, h, float(ends.max()) if ends.len() else 0.0)  # type: ignore[arg-type]
    width = bin_width(horizon)
    series = [(label, timelines(res, ctx, width, horizon), ctx) for label, res, ctx in runs]
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (label, s, _) in enumerate(series):
        ax.plot(s["t"], s["throughput_tok_s"], label=f"{label} served (in+out tok/s)", color=f"C{i}")
        ax.plot(s["t"], s["output_tok_s"], label=f"{label} output tok/s", color=f"C{i}", ls=":")
    ax.plot(series[0][1]["t"], series[0][1]["offered_tok_s"], label="offered (in+out tok/s)", color="grey", ls="--")
    _finish(ax, fig, "throughput over time", "tokens / s", series)
    paths.append(_save(fig, out_dir / f"{prefix}throughput.png", plt))

    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (label, s, _) in enumerate(series):
        ax.step(s["t_start"], s["running"], where="post", label=label, color=f"C{i}")
    _finish(ax, fig, "requests in flight over time (sent, not finished)", "requests", series)
    paths.append(_save(fig, out_dir / f"{prefix}running.png", plt))

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    done = [(int((res["status"] == "ok").sum()), res.height) for _, res, _ in runs]
    for i, (label, s, _) in enumerate(series):
        label = f"{label} ({done[i][0]:,} of {done[i][1]:,} completed)"
        ax1.plot(s["t"], s["ttft_p50_ms"], label=f"{label} p50", color=f"C{i}")
        ax1.plot(s["t"], s["ttft_p99_ms"], label=f"{label} p99", color=f"C{i}", ls=":")
        ax2.plot(s["t"], s["tpot_mean_ms"], label=f"{label} mean", color=f"C{i}")
    if any(np.isfinite(s["ttft_p99_ms"]).any() and np.nanmax(s["ttft_p99_ms"]) > 0 for _, s, _ in series):
        ax1.set_yscale("log")
    ax1.set_ylabel("TTFT (ms, log scale)")
    ax2.set_ylabel("TPOT (ms)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax1.set_title("latency of completed requests, by arrival time")
    _finish(ax2, fig, None, None, series)
    paths.append(_save(fig, out_dir / f"{prefix}latency.png", plt))
    return paths


def _finish(ax: Any, fig: Any, title: str | None, ylabel: str | None, series: Sequence[tuple[str, dict[str, Any], Mapping[str, Any]]]) -> None:
    ax.set_xlabel("time since start (s)")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    for _, _, ctx in series:
        if ctx.get("warmup_s"):
            ax.axvline(float(ctx["warmup_s"]), color="k", lw=0.8, ls="-.")
        if ctx.get("window_s"):
            ax.axvline(float(ctx["window_s"]), color="k", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
