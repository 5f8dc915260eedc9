"""`tracekit inspect`: what a trace, steps or results file holds, read lazily.

A trace (or the trace columns of a results file) is summarised by: request count,
window, mean and peak rate, adapters and their ranks, popularity skew (share of the top
10% of adapters, Gini), burstiness (CV of inter-arrival times) and length percentiles.
Only the columns needed are read (polars `scan_parquet`), so a 10-million-row trace
costs a few hundred MB, not the whole file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl

from tracekit import schema
from tracekit.cliutil import console, err_console, renamed, user_errors
from tracekit.schema import TracekitError

LENGTH_QUANTILES = (0.5, 0.9, 0.99)
TOP_SHARE = 0.10  # popularity skew: share of requests going to the top 10% of adapters
TOP_ADAPTERS = 20  # busiest adapters listed by name (as every per-adapter table: tracekit.summary)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 = all equal, -> 1 = one holds all."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = x.size
    total = x.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def top_share(counts: np.ndarray, frac: float = TOP_SHARE) -> float:
    """Share of all requests that the most popular `frac` of adapters receive."""
    x = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = x.sum()
    if x.size == 0 or total <= 0:
        return 0.0
    k = max(1, math.ceil(frac * x.size))
    return float(x[:k].sum() / total)


def interarrival_cv(arrivals: np.ndarray) -> float | None:
    """Coefficient of variation of the gaps between consecutive arrivals (1 for Poisson)."""
    if arrivals.size < 3:
        return None
    gaps = np.diff(arrivals)
    mean = gaps.mean()
    if mean <= 0:
        return None
    return float(gaps.std() / mean)


def peak_rate(arrivals: np.ndarray, bin_s: float) -> float:
    """Most arrivals in any aligned bin of `bin_s` seconds, per second."""
    if arrivals.size == 0:
        return 0.0
    bins = np.floor((arrivals - arrivals[0]) / bin_s).astype(np.int64)
    return float(np.bincount(bins).max() / bin_s)


def _length_exprs(col: str) -> list[pl.Expr]:
    c = pl.col(col)
    return [c.mean().alias(f"{col}_mean"), c.min().alias(f"{col}_min"), c.max().alias(f"{col}_max")]


def int_quantiles(values: np.ndarray, qs: tuple[float, ...] = LENGTH_QUANTILES) -> list[float | None]:
    """Exact quantiles (the value at rank round(q * (n - 1))) of non-negative integers.

    Token counts are small integers, so one bincount (O(n)) replaces a sort per quantile."""
    n = values.size
    if n == 0:
        return [None] * len(qs)
    ranks = np.array([round(q * (n - 1)) for q in qs])
    if values.min() >= 0 and values.max() <= 50_000_000:
        cum = np.cumsum(np.bincount(values))
        return [float(v) for v in np.searchsorted(cum, ranks, side="right")]
    return [float(v) for v in np.sort(values)[ranks]]


def trace_stats(lf: pl.LazyFrame, context: dict[str, Any], top: int | None = TOP_ADAPTERS) -> dict[str, Any]:
    """Summary of the trace columns of a lazy frame (a trace or results file) whose
    values `schema.check_trace` has validated."""
    scalars = lf.select(
        pl.len().alias("requests"),
        pl.col("adapter").null_count().alias("base_requests"),
        *_length_exprs("prompt_tokens"),
        *_length_exprs("output_tokens"),
    )
    per_adapter = lf.group_by("adapter").agg(pl.len().alias("n"))
    arrivals_q = lf.select(pl.col("arrival_s"))
    lengths_q = lf.select(pl.col("prompt_tokens"), pl.col("output_tokens"))
    try:
        s, counts, arr, lengths = pl.collect_all([scalars, per_adapter, arrivals_q, lengths_q])
    except pl.exceptions.PolarsError as e:
        raise TracekitError(f"cannot read trace columns: {str(e).splitlines()[0]}") from None
    row = s.row(0, named=True)
    n = int(row["requests"])
    arrivals = arr["arrival_s"].to_numpy()
    del arr
    if arrivals.size > 1 and np.any(arrivals[1:] < arrivals[:-1]):
        arrivals = np.sort(arrivals)  # parts of a directory need not be in global order
    first = float(arrivals[0]) if n else 0.0
    last = float(arrivals[-1]) if n else 0.0
    window = float(context.get("window_s") or 0.0) or last
    optional = [f.name for f in schema.full_schema(schema.KIND_TRACE) if f.name not in schema.required_schema(schema.KIND_TRACE).names]
    out: dict[str, Any] = {
        "requests": n,
        "optional_columns": [c for c in optional if c in lf.collect_schema().names()],
        "window_s": window,
        "first_arrival_s": first,
        "last_arrival_s": last,
        "mean_rate_req_s": n / window if window > 0 else None,
        "peak_rate_1s_req_s": peak_rate(arrivals, 1.0),
        "peak_rate_60s_req_s": peak_rate(arrivals, 60.0),
        "interarrival_cv": interarrival_cv(arrivals),
    }
    del arrivals

    ranks = schema.adapter_ranks(context)
    named = counts.filter(pl.col("adapter").is_not_null())
    seen = dict(zip(named["adapter"].to_list(), named["n"].to_list(), strict=True))
    # Adapters the context declares but that got no request still count for skew.
    all_names = sorted(set(seen) | set(ranks))
    per = np.array([seen.get(a, 0) for a in all_names], dtype=np.int64)
    out["adapters"] = len(all_names)
    out["adapters_with_requests"] = len(seen)
    out["base_model_requests"] = int(row["base_requests"])
    out["top10pct_adapter_share"] = top_share(per) if per.size else None
    out["adapter_gini"] = gini(per) if per.size else None
    by_rank: dict[str, dict[str, int]] = {}
    for name, c in zip(all_names, per.tolist(), strict=True):
        key = str(ranks[name]) if name in ranks else "unknown"
        d = by_rank.setdefault(key, {"adapters": 0, "requests": 0})
        d["adapters"] += 1
        d["requests"] += int(c)
    busiest = np.argsort(-per, kind="stable")[:top]
    out["top_adapters"] = [
        {"adapter": all_names[i], "rank": ranks.get(all_names[i]), "requests": int(per[i]),
         "share": float(per[i] / max(per.sum(), 1))}
        for i in busiest
    ]
    out["ranks"] = dict(sorted(by_rank.items(), key=lambda kv: (kv[0] == "unknown", int(kv[0]) if kv[0].isdigit() else 0)))
    for col in ("prompt_tokens", "output_tokens"):
        # Token counts are integers: min, max and the percentiles stay integers.
        out[col] = {
            k.removeprefix(col + "_"): (None if v is None else float(v) if k.endswith("_mean") else int(v))
            for k, v in row.items() if k.startswith(col)
        }
        qv = int_quantiles(lengths[col].to_numpy())
        out[col].update({f"p{round(q * 100)}": None if v is None else int(v) for q, v in zip(LENGTH_QUANTILES, qv, strict=True)})
    return out


def steps_stats(lf: pl.LazyFrame) -> dict[str, Any]:
    """Summary of an engine steps file (captured or simulated)."""
    d = pl.col("duration_s")
    try:
        s = lf.select(
            pl.len().alias("steps"),
            pl.col("t_s").min().alias("first_t_s"),
            (pl.col("t_s") + d).max().alias("last_t_s"),
            d.sum().alias("busy_s"),
            d.mean().alias("mean_step_s"),
            *[d.quantile(q, "nearest").alias(f"p{round(q * 100)}_step_s") for q in (0.5, 0.9, 0.99)],
            pl.col("num_running").mean().alias("mean_running"),
            pl.col("num_waiting").max().alias("max_waiting"),
            pl.col("prefill_tokens").sum().alias("prefill_tokens"),
            pl.col("decode_tokens").sum().alias("decode_tokens"),
            pl.col("active_adapters").list.len().mean().alias("mean_active_adapters"),
            pl.col("active_adapters").list.len().max().alias("max_active_adapters"),
            pl.col("kv_usage").max().alias("max_kv_usage"),
            pl.col("num_preempted").sum().alias("preemptions"),
            pl.col("adapter_loads").sum().alias("adapter_loads"),
        ).collect()
    except pl.exceptions.PolarsError as e:
        raise TracekitError(f"cannot read steps columns: {str(e).splitlines()[0]}") from None
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in s.row(0, named=True).items()}
    span = (out["last_t_s"] or 0.0) - (out["first_t_s"] or 0.0)
    out["span_s"] = span
    out["busy_frac"] = (out["busy_s"] or 0.0) / span if span > 0 else None
    tokens = (out["prefill_tokens"] or 0) + (out["decode_tokens"] or 0)
    out["tokens_per_s"] = tokens / span if span > 0 else None
    return out


def results_stats(lf: pl.LazyFrame, context: dict[str, Any]) -> dict[str, Any]:
    """Serving metrics of a results file (shared definitions: tracekit.metrics)."""
    from tracekit import metrics

    # Prompt token ids can dwarf everything else and no metric needs them.
    cols = [c for c in lf.collect_schema().names() if c != "prompt_token_ids"]
    try:
        df = lf.select(cols).collect()
    except pl.exceptions.PolarsError as e:
        raise TracekitError(f"cannot read results: {str(e).splitlines()[0]}") from None
    out = metrics.summarize(df, context)
    out["targets"] = sorted(str(t) for t in df["target"].unique().to_list())
    out["status"] = dict(sorted((str(k), int(v)) for k, v in df.group_by("status").len().iter_rows()))
    return out


def inspect_path(path: str | Path, top: int | None = TOP_ADAPTERS) -> dict[str, Any]:
    """Everything `tracekit inspect --json` prints, as a dict."""
    lf, meta = schema.scan(path)
    if meta.kind != schema.KIND_STEPS:
        lf, meta, _ = schema.scan_trace(path)  # the values every command checks
    out: dict[str, Any] = {"path": str(path), "kind": meta.kind, "schema": meta.schema}
    ctx = meta.context
    out["context"] = {k: v for k, v in ctx.items() if k != "adapters"}
    try:
        if meta.kind == schema.KIND_STEPS:
            out["steps"] = steps_stats(lf)
        else:
            out["trace"] = trace_stats(lf, ctx, top)
            if meta.kind == schema.KIND_RESULTS:
                out["results"] = results_stats(lf, ctx)
    except TracekitError as e:
        raise TracekitError(f"{path}: {e}") from None
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    """Integers as integers; other numbers with `digits` decimals (rates, shares: 3)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.{digits}f}"
    return str(v)


def _print_report(info: dict[str, Any]) -> None:
    from rich.table import Table

    ctx = info["context"]
    head = Table(title=f"{info['path']}  ({info['kind']}, schema {info['schema']})", show_header=False)
    head.add_column("", style="bold")
    head.add_column("")
    for key in ("source", "model", "parts", "seed", "created_at", "tool_version"):
        if key in ctx:
            head.add_row(key, _fmt(ctx[key]))
    if "generator" in ctx:
        gen = {k: v for k, v in ctx["generator"].items() if v is not None}
        head.add_row("generator", json.dumps(gen))
    tr = info.get("trace")
    if tr:
        head.add_row("requests", _fmt(tr["requests"]))
        head.add_row("window", f"{_fmt(tr['window_s'], 1)} s")
        head.add_row("mean rate", f"{_fmt(tr['mean_rate_req_s'])} req/s")
        head.add_row("peak rate (1 s / 60 s bins)", f"{_fmt(tr['peak_rate_1s_req_s'])} / {_fmt(tr['peak_rate_60s_req_s'])} req/s")
        head.add_row("inter-arrival CV", _fmt(tr["interarrival_cv"]))
        head.add_row("adapters (with requests)", f"{_fmt(tr['adapters'])} ({_fmt(tr['adapters_with_requests'])})")
        head.add_row("base-model requests", _fmt(tr["base_model_requests"]))
        if tr["optional_columns"]:
            head.add_row("optional columns", ", ".join(tr["optional_columns"]))
        head.add_row("top 10% adapters' share", _fmt(tr["top10pct_adapter_share"]))
        head.add_row("adapter Gini", _fmt(tr["adapter_gini"]))
    console.print(head)
    if tr:
        lt = Table(title="lengths (tokens)")
        lt.add_column("")
        for c in ("mean", "min", "p50", "p90", "p99", "max"):
            lt.add_column(c, justify="right")
        for col in ("prompt_tokens", "output_tokens"):
            d = tr[col]
            lt.add_row(col, *[_fmt(d.get(c), 1) for c in ("mean", "min", "p50", "p90", "p99", "max")])
        console.print(lt)
        if tr["top_adapters"]:
            shown, total = len(tr["top_adapters"]), tr["adapters"]
            named = tr["requests"] - tr["base_model_requests"]
            at = Table(title=f"adapters by requests ({shown} of {total})" if shown < total else f"adapters by requests ({total})",
                       show_footer=True)
            at.add_column("adapter", f"all {total:,}", no_wrap=True)
            at.add_column("rank", justify="right", no_wrap=True)
            at.add_column("requests", f"{named:,}", justify="right", no_wrap=True)
            at.add_column("share", "100.0%" if named else "-", justify="right", no_wrap=True)
            for d in tr["top_adapters"]:
                at.add_row(d["adapter"], _fmt(d["rank"]), _fmt(d["requests"]), f"{100 * d['share']:.1f}%")
            if shown < total:
                at.caption = f"{total - shown:,} more adapters: --all shows every row"
            console.print(at)
        if tr["ranks"]:
            rt = Table(title="adapters by LoRA rank")
            rt.add_column("rank")
            rt.add_column("adapters", justify="right")
            rt.add_column("requests", justify="right")
            for rank, d in tr["ranks"].items():
                rt.add_row(rank, _fmt(d["adapters"]), _fmt(d["requests"]))
            console.print(rt)
    for section in ("steps", "results"):
        if section in info:
            t = Table(title=section, show_header=False)
            t.add_column("", style="bold")
            t.add_column("", justify="right")
            for k, v in info[section].items():
                t.add_row(k, _fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v))
            console.print(t)


def plot(path: str | Path, out: str | Path) -> Path:
    """A PNG of the file: for traces, the arrival rate over time, adapter popularity
    (rank-frequency) and the prompt/output length histograms; for steps, step duration
    and batch size over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lf, meta = schema.scan(path)
    out = Path(out)
    if meta.kind == schema.KIND_STEPS:
        df = lf.select("t_s", "duration_s", "num_running", "num_waiting").sort("t_s").collect()
        fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        axes[0].plot(df["t_s"], df["duration_s"] * 1e3, lw=0.6)
        axes[0].set_ylabel("step duration (ms)")
        axes[1].plot(df["t_s"], df["num_running"], lw=0.8, label="num_running")
        axes[1].plot(df["t_s"], df["num_waiting"], lw=0.8, label="num_waiting")
        axes[1].set_ylabel("requests")
        axes[1].set_xlabel("t (s)")
        axes[1].legend()
    else:
        arr = lf.select("arrival_s").collect()["arrival_s"].to_numpy()
        counts = lf.group_by("adapter").len().collect()["len"].to_numpy()
        lengths = lf.select("prompt_tokens", "output_tokens").collect()
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        span = float(arr.max()) if arr.size else 1.0
        bin_s = max(1.0, span / 300)  # about 300 bins over the trace
        nbins = max(1, int(np.ceil(span / bin_s)))
        hist, edges = np.histogram(arr, bins=nbins, range=(0.0, nbins * bin_s))
        axes[0, 0].plot(edges[:-1], hist / bin_s, lw=0.8)
        axes[0, 0].set_xlabel("arrival (s)")
        axes[0, 0].set_ylabel(f"rate (req/s, {bin_s:g} s bins)")
        c = np.sort(counts)[::-1]
        axes[0, 1].loglog(np.arange(1, c.size + 1), c, marker=".", lw=0.8)
        axes[0, 1].set_xlabel("adapter popularity rank")
        axes[0, 1].set_ylabel("requests")
        for ax, col in ((axes[1, 0], "prompt_tokens"), (axes[1, 1], "output_tokens")):
            ax.hist(lengths[col].to_numpy(), bins=60)
            ax.set_xlabel(col)
            ax.set_ylabel("requests")
    fig.suptitle(f"{Path(path).name} ({meta.kind})")
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise TracekitError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write DIR/<name>.png: rate over time, adapter popularity, length histograms "
                   "(steps: duration and batch over time).")
@click.option("--all", "show_all", is_flag=True, help=f"List every adapter (default: the busiest {TOP_ADAPTERS}).")
@renamed("--plot", "--plots", "plots_dir", type=click.Path(dir_okay=False, path_type=Path))
@user_errors
def inspect_cmd(path: Path, as_json: bool, plots_dir: Path | None, show_all: bool) -> None:
    """Summarise a trace, steps or results file (or a directory of Parquet parts)."""
    # The old --plot took the PNG's own name; --plots takes the folder.
    plot_path = None
    if plots_dir is not None:
        plot_path = plots_dir if plots_dir.suffix.lower() == ".png" else plots_dir / f"{path.name.split('.')[0] or 'plot'}.png"
    with err_console.status(f"reading {path}..."):
        info = inspect_path(path, None if show_all else TOP_ADAPTERS)
        if plot_path is not None:
            info["plot"] = str(plot(path, plot_path))
    if as_json:
        click.echo(json.dumps(info, default=str))
    else:
        _print_report(info)
        if plot_path is not None:
            console.print(f"plot: {plot_path}")
