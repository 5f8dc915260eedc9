"""Serving metrics of a results table, with the paper's definitions.

Shared by `twin run`, `replay report` and `replay compare`, so real and simulated runs
are summarised by exactly the same code.

- throughput (`throughput_tok_s`): input + output tokens of the *completed* requests
  divided by the window, as the paper (and `vllm bench serve`'s total token rate) do.
- offered (`offered_tok_s`): input + output tokens of every request that arrived in the
  window, divided by the window.
- starving: served throughput under 90% of offered (`1 - thr / offered >= 0.10`).
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


def summarize(results: pl.DataFrame, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One flat dict of the run's metrics (times in ms, rates per second)."""
    window = window_of(results, context)
    in_window = results.filter(pl.col("arrival_s") <= window)
    ok = results.filter(pl.col("status") == "ok")
    out: dict[str, Any] = {"window_s": window, "requests": results.height}
    out["completed"] = ok.height
    out["unfinished"] = int((results["status"] == "unfinished").sum())
    out["errors"] = int(results["status"].is_in(["error", "timeout"]).sum())
    out["timeouts"] = int((results["status"] == "timeout").sum())
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
    _pcts(itl_values(ok), 1e3, "itl", out)
    lag = (ok["dispatch_s"] - ok["arrival_s"]).cast(pl.Float64).to_numpy() if ok.height else np.array([])
    _pcts(lag, 1e3, "dispatch_lag", out)
    return out


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
    window = window_of(results, context)
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
