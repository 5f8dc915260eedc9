"""Workload features of a trace: what the predictor sees.

Every feature is a rate, a share, a ratio or a length statistic, so it does not change
when the same traffic is recorded for longer, or when the fleet grows by more adapters
of the same mix. The only features that scale with the fleet are named so:
`n_adapters`, `total_req_s` and `offered_tok_s`.

Computed with polars expressions over a lazy scan (group-by per adapter, then one
aggregation), so a trace of millions of requests is read column by column, never as
Python rows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl

from tracekit import schema
from tracekit.cliutil import console, user_errors
from tracekit.schema import TracekitError

BASE = "<base>"
# Share of the busiest adapters reported by `top_share`: 10% of the fleet.
TOP_FRACTION = 0.10
GAP_SAMPLE = 200_000  # requests: past this, burstiness is estimated on the first part of the window

# Feature names, in a fixed order (the model's columns). Descriptions feed `--help`,
# the table and the explanations.
FEATURES: dict[str, str] = {
    "rate_mean": "mean per-adapter request rate (req/s)",
    "rate_std": "std of per-adapter request rates (req/s)",
    "rate_cv": "coefficient of variation of per-adapter rates",
    "rate_min": "slowest adapter's rate (req/s)",
    "rate_max": "busiest adapter's rate (req/s)",
    "rate_p50": "median per-adapter rate (req/s)",
    "top_share": "share of requests sent to the busiest 10% of adapters",
    "rank_mean": "mean LoRA rank over adapters",
    "rank_std": "std of LoRA ranks over adapters",
    "rank_min": "smallest LoRA rank",
    "rank_max": "largest LoRA rank (sets max_lora_rank)",
    "rank_traffic_mean": "request-weighted mean LoRA rank",
    "base_share": "share of requests to the base model (no adapter)",
    "burstiness": "request-weighted CV of per-adapter inter-arrival gaps (Poisson = 1)",
    "prompt_mean": "mean prompt tokens",
    "prompt_std": "std of prompt tokens",
    "prompt_p90": "90th percentile prompt tokens",
    "output_mean": "mean output tokens",
    "output_std": "std of output tokens",
    "output_p90": "90th percentile output tokens",
    "tokens_per_req": "mean prompt + output tokens per request",
    "adapter_tok_s": "mean offered tokens per second per adapter",
    "n_adapters": "adapters in the fleet (scales with the fleet)",
    "total_req_s": "total request rate (req/s; scales with the fleet)",
    "offered_tok_s": "total offered tokens per second (scales with the fleet)",
}
FEATURE_NAMES = list(FEATURES)


def window_of(lf: pl.LazyFrame, context: Mapping[str, Any]) -> float:
    """The trace's window in seconds: its context's `window_s`, else the span of arrivals."""
    w = context.get("window_s")
    if w:
        return float(w)
    # No declared window: the span of arrivals, with the mean gap added so that n
    # Poisson arrivals over T give a rate of n/T rather than n/(T - one gap).
    s = lf.select(pl.col("arrival_s").max().alias("mx"), pl.len().alias("n")).collect()
    mx, n = float(s["mx"][0] or 0.0), int(s["n"][0])
    if n == 0:
        return 1.0
    return max(mx * (1.0 + 1.0 / n), 1e-9)


def _histogram(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values ascending, their counts): a bincount for token counts (small
    non-negative integers), else np.unique."""
    if x.size and np.issubdtype(x.dtype, np.integer) and x.min() >= 0 and x.max() < 1 << 24:
        c = np.bincount(x)
        v = np.flatnonzero(c)
        return v, c[v]
    return np.unique(x, return_counts=True)


def _p90(values: np.ndarray, counts: np.ndarray) -> float:
    """p90 as the inverted CDF (smallest length with >= 90% at or below it): unlike
    interpolating quantiles, it does not move when the same traffic repeats."""
    if values.size == 0:
        return 0.0
    cum = np.cumsum(counts)
    return float(values[np.searchsorted(cum, 0.9 * cum[-1] - 1e-9)])


def compute(lf: pl.LazyFrame | pl.DataFrame, context: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Features of a trace (see `compute_with_loads`)."""
    return compute_with_loads(lf, context)[0]


def compute_with_loads(
    lf: pl.LazyFrame | pl.DataFrame, context: Mapping[str, Any] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Features of a trace given as a (lazy) frame with the trace columns, and its context.

    Adapters listed in the context's `adapters` with no request count as rate 0 (they
    are served, so they occupy the CPU cache). Requests without an adapter are base-model
    traffic: counted in the load and in `base_share`, not as an adapter.

    Also returns each adapter's offered tokens/s (for splitting the fleet over GPUs)."""
    ctx = dict(context or {})
    lf = lf.lazy()
    window = window_of(lf, ctx)
    ranks = schema.adapter_ranks(ctx)

    cols = lf.select("arrival_s", "adapter", "prompt_tokens", "output_tokens").with_columns(pl.col("adapter").fill_null(BASE))
    per_q = cols.group_by("adapter").agg(
        pl.len().alias("n"),
        (pl.col("prompt_tokens").cast(pl.Int64) + pl.col("output_tokens")).sum().alias("tokens"),
    )
    # Burstiness needs every adapter's gaps in time order, the costliest part on big
    # traces: past GAP_SAMPLE requests it is estimated on the window's first part that
    # holds about that many (stationary traffic has the same gaps throughout; the
    # answer stays fast on hour-long fleets of millions of requests).
    n_total = int(lf.select(pl.len()).collect().item())  # Parquet metadata: no scan
    gaps_lf = cols
    if n_total > GAP_SAMPLE:  # a trace's window starts at arrival 0 (tracekit.schema)
        gaps_lf = cols.filter(pl.col("arrival_s") < window * GAP_SAMPLE / n_total)
    gaps_q = gaps_lf.group_by("adapter").agg(
        pl.len().alias("gap_n"),
        # Sorting within each adapter is cheaper than one global sort first.
        pl.col("arrival_s").sort().diff().mean().alias("gap_mean"),
        pl.col("arrival_s").sort().diff().std().alias("gap_std"),
    )
    # Lengths: the two integer columns once, then numpy (a bincount for the p90 is far
    # cheaper than grouping or sorting millions of rows).
    lens_q = lf.select("prompt_tokens", "output_tokens")
    per, gaps, lens_df = pl.collect_all([per_q, gaps_q, lens_q])
    requests = lens_df.height
    if requests == 0:
        raise TracekitError("trace has no requests: nothing to compute features from")
    lens: dict[str, float] = {}
    for col, key in (("prompt_tokens", "prompt"), ("output_tokens", "output")):
        x = lens_df[col].to_numpy()
        lens[f"{key}_mean"] = float(x.mean())
        lens[f"{key}_std"] = float(x.std())
        lens[f"{key}_p90"] = _p90(*_histogram(x))

    counts = dict(zip(per["adapter"].to_list(), per["n"].to_list(), strict=True))
    base_n = int(counts.pop(BASE, 0))
    names = sorted(set(counts) | set(ranks))
    if not names:
        raise TracekitError("trace has no adapter traffic and its context lists no adapters")
    n_req = np.array([counts.get(a, 0) for a in names], dtype=np.float64)
    rates = n_req / window
    # Unknown ranks (a trace without adapter metadata) default to vLLM's max_lora_rank 16.
    rank = np.array([ranks.get(a, 16) for a in names], dtype=np.float64)

    k = max(1, math.ceil(TOP_FRACTION * len(names)))
    adapter_req = n_req.sum()
    top = np.sort(n_req)[::-1][:k].sum() / adapter_req if adapter_req else 0.0

    # Burstiness: CV of inter-arrival gaps per adapter, weighted by its requests; adapters
    # with fewer than 3 requests say nothing about it.
    g = gaps.filter((pl.col("adapter") != BASE) & (pl.col("gap_n") >= 3) & (pl.col("gap_mean") > 0))
    if g.height:
        cv = (g["gap_std"] / g["gap_mean"]).to_numpy()
        burst = float(np.average(cv, weights=g["gap_n"].to_numpy()))
    else:
        burst = 1.0

    tokens_per_req = float(lens["prompt_mean"] + lens["output_mean"])
    out: dict[str, float] = {
        "rate_mean": float(rates.mean()),
        "rate_std": float(rates.std()),
        "rate_cv": float(rates.std() / rates.mean()) if rates.mean() > 0 else 0.0,
        "rate_min": float(rates.min()),
        "rate_max": float(rates.max()),
        "rate_p50": float(np.median(rates)),
        "top_share": float(top),
        "rank_mean": float(rank.mean()),
        "rank_std": float(rank.std()),
        "rank_min": float(rank.min()),
        "rank_max": float(rank.max()),
        "rank_traffic_mean": float(np.average(rank, weights=n_req)) if adapter_req else float(rank.mean()),
        "base_share": base_n / requests,
        "burstiness": burst,
        **{key: float(v) if v is not None else 0.0 for key, v in lens.items()},
        "tokens_per_req": tokens_per_req,
        "adapter_tok_s": float(rates.mean() * tokens_per_req),
        "n_adapters": float(len(names)),
        "total_req_s": requests / window,
        "offered_tok_s": requests / window * tokens_per_req,
    }
    loads = {a: 0.0 for a in names}
    for a, tok in zip(per["adapter"].to_list(), per["tokens"].to_list(), strict=True):
        if a != BASE:
            loads[a] = float(tok) / window
    return {name: out[name] for name in FEATURE_NAMES}, loads


def from_file(path: str | os.PathLike[str]) -> tuple[dict[str, float], schema.Meta]:
    """Features of a trace or results file (or a directory of parts), read lazily."""
    lf, meta, _ = schema.scan_trace(path)  # the validation every command applies
    try:
        return compute(lf, meta.context), meta
    except pl.exceptions.PolarsError as e:
        raise TracekitError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    except TracekitError as e:
        raise TracekitError(f"{path}: {e}") from None


@click.command("features")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@user_errors
def features_cmd(trace: Path, as_json: bool) -> None:
    """Workload features of TRACE (a trace or results file, or a directory of parts)."""
    feats, _ = from_file(trace)
    if as_json:
        click.echo(json.dumps(feats, sort_keys=False))
        return
    from rich.table import Table

    t = Table(title=f"predictor features {trace}")
    t.add_column("feature", style="bold")
    t.add_column("value", justify="right")
    t.add_column("meaning")
    for name, value in feats.items():
        t.add_row(name, f"{value:,.4g}", FEATURES[name])
    console.print(t)
