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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl
import pyarrow as pa

from tracekit import schema
from tracekit.cliutil import console, user_errors
from tracekit.metrics import BASE_ADAPTER as BASE
from tracekit.schema import TracekitError

# Share of the busiest adapters reported by `top_share`: 10% of the fleet.
TOP_FRACTION = 0.10
GAP_SAMPLE = 200_000  # requests: past this, burstiness is estimated on the first part of the window
CHUNK = 1 << 17  # rows per pass: temporaries stay small, in cache, and their memory reused

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


def _add_counts(counts: np.ndarray, x: np.ndarray, where: str) -> np.ndarray:
    """`counts` (occurrences of each value 0, 1, ...) plus those of the integers `x`
    (`where`: the error's prefix)."""
    if x.size == 0:
        return counts
    if x.dtype == np.uint64:
        x = x.astype(np.int64)
    if x.min() < 0:
        raise TracekitError(f"{where}token counts must be at least 1")
    c = np.bincount(x)
    if c.size > counts.size:
        c[: counts.size] += counts
        return c
    counts[: c.size] += c
    return counts


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


def _tables(trace: pl.LazyFrame | pl.DataFrame | pa.Table) -> pa.Table:
    """The feature columns as an Arrow table."""
    if not isinstance(trace, pa.Table):
        trace = trace.lazy().select(FEATURE_COLUMNS).collect().to_arrow()
    return trace.select(list(FEATURE_COLUMNS))


def _passes(tables: Iterable[pa.Table], names: dict[str, int]) -> Iterator[tuple[np.ndarray, ...]]:
    """(adapter slot, arrival, prompt, output) numpy views, CHUNK rows at a time. Slots
    number adapter names in order of appearance (`names` grows as they come; each table
    may have its own dictionary); the base model's requests (null, or an adapter named
    BASE) get slot -1."""
    for table in tables:
        for batch in table.to_batches():
            chunk = batch.column(1)
            if not pa.types.is_dictionary(chunk.type):
                chunk = chunk.dictionary_encode()
            remap = np.array([-1 if a == BASE else names.setdefault(a, len(names))
                              for a in chunk.dictionary.to_pylist()] + [-1], dtype=np.int64)  # fmt: skip
            codes = chunk.indices
            codes = codes.to_numpy(zero_copy_only=False) if codes.null_count == 0 else codes.fill_null(-1).to_numpy()
            # Codes that are already slots (a first dictionary, nothing to the base model)
            # need no gather.
            same = codes.min(initial=0) >= 0 and bool((remap[:-1] == np.arange(len(remap) - 1)).all())
            cols = [batch.column(i).to_numpy(zero_copy_only=False) for i in (0, 2, 3)]
            for lo in range(0, len(codes), CHUNK):
                part = codes[lo:lo + CHUNK]
                yield part if same else remap[part], *(c[lo:lo + CHUNK] for c in cols)


def compute_with_loads(
    trace: pl.LazyFrame | pl.DataFrame | pa.Table, context: Mapping[str, Any] | None = None, source: str | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Features of a trace given as an Arrow table or a (lazy) polars frame with the
    trace columns, and its context (see `compute_from_tables`)."""
    table = _tables(trace)
    return compute_from_tables([table], table.num_rows, context, source)


def compute_from_tables(
    tables: Iterable[pa.Table], requests: int, context: Mapping[str, Any] | None = None, source: str | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Features of a trace given as Arrow tables of FEATURE_COLUMNS one after another
    (`tracekit.schema.iter_trace_columns`: a row group at a time, adapter names
    dictionary-encoded; the fast path) with `requests` rows in all, and its context.

    Adapters listed in the context's `adapters` with no request count as rate 0 (they
    are served, so they occupy the CPU cache). Requests without an adapter are base-model
    traffic: counted in the load and in `base_share`, not as an adapter.

    Also returns each adapter's offered tokens/s (for splitting the fleet over GPUs).
    `source`: the file its errors name."""
    ctx = dict(context or {})
    ranks = schema.adapter_ranks(ctx)
    where = f"{source}: " if source else ""
    if requests == 0:
        raise TracekitError(f"{where}trace has no requests: nothing to compute features from")
    if not ctx.get("window_s"):  # the window is the span of arrivals: their maximum first
        tables = list(tables)
        last_arrival = max(float(c.to_numpy(zero_copy_only=False).max())
                           for t in tables for c in t.column("arrival_s").chunks if len(c))  # fmt: skip
    else:
        last_arrival = 0.0
    window = _window(ctx, last_arrival, requests)
    # One pass, CHUNK rows at a time: per-adapter counts and token sums (bincounts over
    # slots; the base model in the last one), length histograms, whether arrivals are in
    # order; the burstiness sample's adapters and arrivals are kept (a first part).
    cutoff = window * GAP_SAMPLE / requests if requests > GAP_SAMPLE else math.inf
    names: dict[str, int] = {}
    n_by_slot = np.zeros(0, np.int64)
    tok_by_slot = np.zeros(0)  # float64 sums of integers are exact below 2**53
    hist = {"prompt": np.zeros(0, np.int64), "output": np.zeros(0, np.int64)}
    sample: list[tuple[np.ndarray, np.ndarray]] = []
    last, in_order, base_n = -math.inf, True, 0
    for slot, arrival, prompt, output in _passes(tables, names):
        k = len(names)
        if n_by_slot.size < k:
            n_by_slot = np.concatenate([n_by_slot, np.zeros(k - n_by_slot.size, np.int64)])
            tok_by_slot = np.concatenate([tok_by_slot, np.zeros(k - tok_by_slot.size)])
        base = slot < 0
        if base.any():
            base_n += int(base.sum())
            slot = np.where(base, k, slot)  # the base model's slot, dropped below
        n_by_slot += np.bincount(slot, minlength=k + 1)[:k]
        tok_by_slot += np.bincount(slot, weights=np.add(prompt, output, dtype=np.float64), minlength=k + 1)[:k]
        for x, key in ((prompt, "prompt"), (output, "output")):
            hist[key] = _add_counts(hist[key], x, where)
        if arrival.size:
            in_order = in_order and arrival[0] >= last and bool((arrival[1:] >= arrival[:-1]).all())
            last = float(arrival[-1])
        keep = (arrival < cutoff) & (slot < k)
        if keep.any():
            sample.append((slot[keep], arrival[keep]))
    names_all = list(names)  # slot order
    k_all = len(names_all)
    n_by_code, tok_by_code = n_by_slot[:k_all], tok_by_slot[:k_all]

    lens: dict[str, float] = {}
    for key, counts_ in hist.items():
        # Mean, std and p90 from the lengths' histogram, not three passes over millions.
        v = np.flatnonzero(counts_)
        c = counts_[v]
        mean = float(np.dot(v.astype(np.float64), c) / requests)
        lens[f"{key}_mean"] = mean
        lens[f"{key}_std"] = float(np.sqrt(np.dot((v - mean) ** 2, c) / requests))
        lens[f"{key}_p90"] = _p90(v, c)

    counts = {names_all[i]: int(n_by_code[i]) for i in np.flatnonzero(n_by_code)}
    names = sorted(set(counts) | set(ranks))
    if not names:
        raise TracekitError(f"{where}trace has no adapter traffic and its context lists no adapters")
    n_req = np.array([counts.get(a, 0) for a in names], dtype=np.float64)
    rates = n_req / window
    # Unknown ranks (a trace without adapter metadata) default to vLLM's max_lora_rank 16.
    rank = np.array([ranks.get(a, 16) for a in names], dtype=np.float64)

    k = max(1, math.ceil(TOP_FRACTION * len(names)))
    adapter_req = n_req.sum()
    top = np.sort(n_req)[::-1][:k].sum() / adapter_req if adapter_req else 0.0
    burst = _burstiness(sample, in_order, k_all)

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


def _burstiness(sample: list[tuple[np.ndarray, np.ndarray]], in_order: bool, k: int) -> float:
    """Request-weighted CV of each adapter's inter-arrival gaps, from the sample's
    (adapter, arrival) pairs; adapters with fewer than 3 requests say nothing about it
    (1.0, Poisson, when none has more).

    Burstiness needs every adapter's gaps in time order, the costliest part on big traces:
    past GAP_SAMPLE requests it is estimated on the window's first part that holds about
    that many (stationary traffic has the same gaps throughout; the answer stays fast on
    hour-long fleets of millions of requests). A trace's window starts at arrival 0."""
    if not sample:
        return 1.0
    c = np.concatenate([s[0] for s in sample])
    t = np.concatenate([s[1] for s in sample])
    if not in_order:
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
    return compute_with_loads(table, meta.context, str(path))[0], meta


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
