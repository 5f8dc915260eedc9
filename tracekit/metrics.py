"""Serving metrics of a results table, with the paper's definitions.

Shared by `twin run`, `replay report` and `replay compare`, so real and simulated runs
are summarised by exactly the same code.

- throughput (`throughput_tok_s`): input + output tokens of the *completed* requests
  divided by the window, as the paper (and `vllm bench serve`'s total token rate) do.
- offered (`offered_tok_s`): input + output tokens of every request that arrived in the
  window, divided by the window.
- starving: served throughput under 90% of offered (`1 - thr / offered >= 0.10`).
- warm-up: a context `warmup_s` (set by `replay run --warmup`) drops requests that
  arrived before it and shortens the window to `window_s - warmup_s`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

STARVING_THRESHOLD = 0.10
PERCENTILES = (50, 90, 99)


def window_of(results: pl.DataFrame, context: Mapping[str, Any] | None = None) -> float:
    """The measurement window in seconds: the one the run declared, else up to the last end."""
    ctx = context or {}
    w = ctx.get("window_s")
    if w:
        return float(w)
    ends = results.get_column("end_s").drop_nulls() if results.height else pl.Series([], dtype=pl.Float64)
    last_end = float(ends.max()) if ends.len() else 0.0  # type: ignore[arg-type]
    last_arrival = float(results["arrival_s"].max()) if results.height else 0.0  # type: ignore[arg-type]
    return max(last_end, last_arrival, 1e-9)


def _pcts(values: np.ndarray, scale: float, prefix: str, out: dict[str, Any]) -> None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        out[f"mean_{prefix}_ms"] = None
        for p in PERCENTILES:
            out[f"p{p}_{prefix}_ms"] = None
        return
    out[f"mean_{prefix}_ms"] = float(values.mean() * scale)
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
        out[f"p{p}_{prefix}_ms"] = float(v * scale)


def warmup_of(context: Mapping[str, Any] | None) -> float:
    return float((context or {}).get("warmup_s") or 0.0)


def measured(results: pl.DataFrame, context: Mapping[str, Any] | None = None) -> tuple[pl.DataFrame, float]:
    """The rows metrics count (arrived after the warm-up) and the window they share."""
    warmup = warmup_of(context)
    window = window_of(results, context)
    if warmup > 0:
        results = results.filter(pl.col("arrival_s") >= warmup)
        window = max(window - warmup, 1e-9)
    return results, window


def summarize(results: pl.DataFrame, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One flat dict of the run's metrics (times in ms, rates per second)."""
    results, window = measured(results, context)
    window_end = window + warmup_of(context)
    in_window = results.filter(pl.col("arrival_s") <= window_end)
    ok = results.filter(pl.col("status") == "ok")
    out: dict[str, Any] = {"window_s": window, "requests": results.height}
    out["completed"] = ok.height
    out["unfinished"] = int((results["status"] == "unfinished").sum())
    out["errors"] = int(results["status"].is_in(["error", "timeout"]).sum())
    out["timeouts"] = int((results["status"] == "timeout").sum())
    # A capture's requests whose client hung up: neither served nor the server's fault.
    out["cancelled"] = int((results["status"] == "cancelled").sum())
    in_tok = int(ok["prompt_tokens"].sum()) if ok.height else 0
    out_tok = int(ok["generated_tokens"].fill_null(ok["output_tokens"]).sum()) if ok.height else 0
    out["total_input_tokens"] = in_tok
    out["total_output_tokens"] = out_tok
    out["throughput_tok_s"] = (in_tok + out_tok) / window
    out["output_tok_s"] = out_tok / window
    out["input_tok_s"] = in_tok / window
    out["req_s"] = ok.height / window
    offered = int(in_window["prompt_tokens"].sum() + in_window["output_tokens"].sum()) if in_window.height else 0
    out["offered_tok_s"] = offered / window
    out["offered_req_s"] = in_window.height / window
    out["served_frac"] = out["throughput_tok_s"] / out["offered_tok_s"] if offered else 1.0
    out["starved"] = bool(1.0 - out["served_frac"] >= STARVING_THRESHOLD)

    _pcts(ok["ttft_s"].cast(pl.Float64).to_numpy(), 1e3, "ttft", out)
    _pcts(ok["tpot_s"].cast(pl.Float64).to_numpy(), 1e3, "tpot", out)
    _pcts(ok["e2e_s"].cast(pl.Float64).to_numpy(), 1e3, "e2e", out)
    _itl_pcts(ok, out)
    lag = (ok["dispatch_s"] - ok["arrival_s"]).cast(pl.Float64).to_numpy() if ok.height else np.array([])
    _pcts(lag, 1e3, "dispatch_lag", out)
    return out


def _itl_pcts(ok: pl.DataFrame, out: dict[str, Any]) -> None:
    """ITL statistics. Without recorded gaps this is `_pcts(itl_values(ok))` computed
    from (mean gap, number of gaps) pairs, without materialising the repeated array
    (tens of millions of values for an hour of a busy server: ~1 s saved)."""
    if "itl_s" in ok.columns and ok["itl_s"].null_count() < ok.height:
        _pcts(itl_values(ok), 1e3, "itl", out)
        return
    gaps = (ok["generated_tokens"].fill_null(ok["output_tokens"]) - 1).clip(lower_bound=0)
    values = ok["tpot_s"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    weights = gaps.cast(pl.Int64).to_numpy()
    keep = np.isfinite(values) & (weights > 0)
    values, weights = values[keep], weights[keep]
    if values.size == 0:
        _pcts(np.array([]), 1e3, "itl", out)
        return
    order = np.argsort(values, kind="stable")
    values, cum = values[order], np.cumsum(weights[order])
    n = int(cum[-1])
    out["mean_itl_ms"] = float((values * weights[order]).sum() / n * 1e3)
    for p in PERCENTILES:
        # numpy's default (linear) percentile on the virtual sorted repeated array.
        h = (n - 1) * p / 100.0
        lo = int(np.floor(h))
        a = values[np.searchsorted(cum, lo, side="right")]
        b = values[np.searchsorted(cum, min(lo + 1, n - 1), side="right")]
        out[f"p{p}_itl_ms"] = float((a + (b - a) * (h - lo)) * 1e3)


def itl_values(ok: pl.DataFrame) -> np.ndarray:
    """Every inter-token gap when the run recorded them; else each request's mean gap
    repeated once per gap, which gives the same token-weighted mean."""
    if "itl_s" in ok.columns and ok["itl_s"].null_count() < ok.height:
        return ok["itl_s"].explode().drop_nulls().cast(pl.Float64).to_numpy()
    gaps = (ok["generated_tokens"].fill_null(ok["output_tokens"]) - 1).clip(lower_bound=0)
    tpot = ok["tpot_s"].cast(pl.Float64)
    df = pl.DataFrame({"tpot": tpot, "n": gaps}).filter(pl.col("tpot").is_not_null() & (pl.col("n") > 0))
    if df.height == 0:
        return np.array([])
    return np.repeat(df["tpot"].to_numpy(), df["n"].to_numpy())


def per_adapter(results: pl.DataFrame, context: Mapping[str, Any] | None = None) -> pl.DataFrame:
    """Per-adapter counts, throughput and latency (base model shown as `<base>`)."""
    results, window = measured(results, context)
    ok = pl.col("status") == "ok"
    return (
        results.with_columns(pl.col("adapter").fill_null("<base>"))
        .group_by("adapter")
        .agg(
            pl.len().alias("requests"),
            ok.sum().alias("completed"),
            (pl.col("status") == "unfinished").sum().alias("unfinished"),
            pl.col("status").is_in(["error", "timeout"]).sum().alias("errors"),
            ((pl.col("prompt_tokens") + pl.col("generated_tokens").fill_null(pl.col("output_tokens"))).filter(ok).sum() / window).alias("throughput_tok_s"),
            (pl.col("ttft_s").filter(ok).mean() * 1e3).alias("mean_ttft_ms"),
            (pl.col("ttft_s").filter(ok).quantile(0.99) * 1e3).alias("p99_ttft_ms"),
            (pl.col("tpot_s").filter(ok).mean() * 1e3).alias("mean_tpot_ms"),
        )
        .sort("adapter")
    )


def adapter_service(results: pl.DataFrame, context: Mapping[str, Any] | None = None, tail_s: float = 0.0) -> pl.DataFrame:
    """Per adapter (base model as `<base>`): offered and served token rates with
    `summarize`'s definitions (completed requests' tokens / window; tokens of every
    request that arrived in the window / window), the served fraction, and whether the
    adapter starves (served < 90% of offered). What "no adapter starves" means for a fleet.

    `tail_s`: requests that arrived in the window's last `tail_s` seconds are not judged
    (they may still be running at the cut through no fault of the server: an adapter with
    20 requests in an hour, one of them a 1,700-token answer arriving two minutes before
    the end, would "starve" at the cut); rates are then over the window less `tail_s`."""
    results, window = measured(results, context)
    if tail_s > 0:
        window = max(window - tail_s, 1e-9)
        results = results.filter(pl.col("arrival_s") <= window + warmup_of(context))
    window_end = window + warmup_of(context)
    ok = pl.col("status") == "ok"
    tokens = pl.col("prompt_tokens").cast(pl.Int64) + pl.col("generated_tokens").fill_null(pl.col("output_tokens")).cast(pl.Int64)
    offered = (pl.col("prompt_tokens").cast(pl.Int64) + pl.col("output_tokens").cast(pl.Int64)).filter(pl.col("arrival_s") <= window_end)
    out = (
        results.with_columns(pl.col("adapter").fill_null("<base>"))
        .group_by("adapter")
        .agg(
            pl.len().alias("requests"),
            ok.sum().alias("completed"),
            (tokens.filter(ok).sum() / window).alias("throughput_tok_s"),
            (offered.sum() / window).alias("offered_tok_s"),
        )
        .with_columns(
            pl.when(pl.col("offered_tok_s") > 0)
            .then(pl.col("throughput_tok_s") / pl.col("offered_tok_s"))
            .otherwise(1.0)
            .alias("served_frac")
        )
        .with_columns((1.0 - pl.col("served_frac") >= STARVING_THRESHOLD).alias("starved"))
        .sort("adapter")
    )
    return out
