"""Workload features of a trace: what the predictor sees.

Every feature is a rate, a share, a ratio or a length statistic, so it does not change
when the same traffic is recorded for longer, or when the fleet grows by more adapters
of the same mix. The only features that scale with the fleet are named so:
`n_adapters`, `total_req_s` and `offered_tok_s`.

Computed with numpy over four columns read once (adapter names as dictionary codes:
counts and sums per adapter are bincounts), so a trace of millions of requests is
read column by column, never as Python rows.
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
import pyarrow as pa

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


FEATURE_COLUMNS = ("arrival_s", "adapter", "prompt_tokens", "output_tokens")  # all the features read


def window_of(lf: pl.LazyFrame, context: Mapping[str, Any]) -> float:
    """The trace's window in seconds: its context's `window_s`, else the span of arrivals."""
    s = lf.select(pl.col("arrival_s").max().alias("mx"), pl.len().alias("n")).collect()
    return _window(context, float(s["mx"][0] or 0.0), int(s["n"][0]))


def _window(context: Mapping[str, Any], last_arrival: float, n: int) -> float:
    w = context.get("window_s")
    if w:
        return float(w)
    if n == 0:
        return 1.0
    # No declared window: the span of arrivals, with the mean gap added so that n
    # Poisson arrivals over T give a rate of n/T rather than n/(T - one gap).
    return max(last_arrival * (1.0 + 1.0 / n), 1e-9)


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
    interpolation it does not move when the same requests are recorded twice."""
    if counts.size == 0:
        return 0.0
    cum = np.cumsum(counts)
    return float(values[np.searchsorted(cum, 0.9 * cum[-1] - 1e-9)])


def compute(lf: pl.LazyFrame | pl.DataFrame | pa.Table, context: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Features of a trace (see `compute_with_loads`)."""
    return compute_with_loads(lf, context)[0]


def _columns(trace: pl.LazyFrame | pl.DataFrame | pa.Table) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """(adapter code per request, -1 for the base model; adapter names; the numeric
    columns as numpy), from an Arrow table (adapter dictionary-encoded or not) or a
    polars frame."""
    if not isinstance(trace, pa.Table):
        trace = trace.lazy().select(FEATURE_COLUMNS).collect().to_arrow()
    adapter = trace.column("adapter")
    if not pa.types.is_dictionary(adapter.type):
        adapter = adapter.dictionary_encode()
    adapter = adapter.unify_dictionaries() if adapter.num_chunks > 1 else adapter
    if adapter.num_chunks == 0:
        codes, names = np.zeros(0, np.int64), []
    else:
        codes = np.concatenate([c.indices.fill_null(-1).to_numpy().astype(np.int32, copy=False)
                                for c in adapter.chunks])
        names = adapter.chunk(0).dictionary.to_pylist()
    # A literal "<base>" adapter name is the base model, as a null is.
    if BASE in names:
        codes[codes == names.index(BASE)] = -1
    cols = {c: trace.column(c).to_numpy() for c in ("arrival_s", "prompt_tokens", "output_tokens")}
    return codes, names, cols


def compute_with_loads(
    trace: pl.LazyFrame | pl.DataFrame | pa.Table, context: Mapping[str, Any] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Features of a trace given as an Arrow table (`tracekit.schema.read_trace_columns`
    of FEATURE_COLUMNS, the adapter column dictionary-encoded: the fast path) or a
    (lazy) polars frame with the trace columns, and its context.

    Adapters listed in the context's `adapters` with no request count as rate 0 (they
    are served, so they occupy the CPU cache). Requests without an adapter are base-model
    traffic: counted in the load and in `base_share`, not as an adapter.

    Also returns each adapter's offered tokens/s (for splitting the fleet over GPUs)."""
    ctx = dict(context or {})
    ranks = schema.adapter_ranks(ctx)
    codes, names_all, cols = _columns(trace)
    arrival, prompt, output = cols["arrival_s"], cols["prompt_tokens"], cols["output_tokens"]
    requests = int(codes.size)
    if requests == 0:
        raise TracekitError("trace has no requests: nothing to compute features from")
    window = _window(ctx, float(arrival.max()), requests)
    k_all = len(names_all)
    # Base-model requests (code -1) are counted in a slot of their own, the last one.
    slot = np.where(codes >= 0, codes, k_all) if codes.min() < 0 else codes
    n_by_code = np.bincount(slot, minlength=k_all + 1)
    # Token sums as float64 are exact (integers far below 2**53).
    tok_by_code = np.bincount(slot, weights=np.add(prompt, output, dtype=np.float64), minlength=k_all + 1)
    base_n = int(n_by_code[k_all])
    n_by_code, tok_by_code = n_by_code[:k_all], tok_by_code[:k_all]

    lens: dict[str, float] = {}
    for x, key in ((prompt, "prompt"), (output, "output")):
        # Mean, std and p90 from the lengths' histogram (a bincount), not three passes
        # over millions of requests.
        v, c = _histogram(x)
        mean = float(np.dot(v.astype(np.float64), c) / requests)
        lens[f"{key}_mean"] = mean
        lens[f"{key}_std"] = float(np.sqrt(np.dot((v - mean) ** 2, c) / requests))
        lens[f"{key}_p90"] = _p90(v, c)

    counts = {names_all[i]: int(n_by_code[i]) for i in np.flatnonzero(n_by_code)}
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
    burst = _burstiness(codes, arrival, k_all, window)

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
    for i in np.flatnonzero(n_by_code):
        loads[names_all[i]] = float(tok_by_code[i]) / window
    return {name: out[name] for name in FEATURE_NAMES}, loads


def _burstiness(codes: np.ndarray, arrival: np.ndarray, k: int, window: float) -> float:
    """Request-weighted CV of each adapter's inter-arrival gaps; adapters with fewer than
    3 requests say nothing about it (1.0, Poisson, when none has more).

    Burstiness needs every adapter's gaps in time order, the costliest part on big traces:
    past GAP_SAMPLE requests it is estimated on the window's first part that holds about
    that many (stationary traffic has the same gaps throughout; the answer stays fast on
    hour-long fleets of millions of requests). A trace's window starts at arrival 0."""
    sel = codes >= 0
    if codes.size > GAP_SAMPLE:
        sel &= arrival < window * GAP_SAMPLE / codes.size
    c, t = codes[sel], arrival[sel]
    if t.size > 1 and not (t[1:] >= t[:-1]).all():
        order = np.lexsort((t, c))
    else:  # in arrival order (the usual case): a stable sort by adapter keeps it per adapter
        order = np.argsort(c.astype(np.int16) if k < 1 << 15 else c, kind="stable")
    c, t = c[order], t[order]
    same = c[1:] == c[:-1]
    gap, gc = np.diff(t)[same], c[1:][same]
    n = np.bincount(c, minlength=k)  # requests per adapter in the sample
    ng = np.bincount(gc, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(gc, weights=gap, minlength=k) / ng
        # Two passes (mean, then squared deviations), as exact as a library's std.
        var = np.bincount(gc, weights=(gap - mean[gc]) ** 2, minlength=k) / (ng - 1)
    ok = (n >= 3) & (mean > 0)
    if not ok.any():
        return 1.0
    return float(np.average(np.sqrt(var[ok]) / mean[ok], weights=n[ok]))


def from_file(path: str | os.PathLike[str]) -> tuple[dict[str, float], schema.Meta]:
    """Features of a trace or results file (or a directory of parts): its columns read
    once, every trace value checked (request ids too, as every command that reads a
    whole trace does)."""
    table, meta, _ = schema.read_trace_columns(path, ("request_id", *FEATURE_COLUMNS), dictionary=["adapter"])
    try:
        return compute(table, meta.context), meta
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
