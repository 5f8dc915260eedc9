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

`summarize` (and `window_of`, `measured`, `itl_values`) take a polars frame or an Arrow
table and compute on numpy columns: `twin run`'s path never imports polars (a tenth of a
second of its start), and every caller gets the same numbers from the same code. Token
sums are int64 (a million 7k-token prompts overflow int32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from tracekit.schema import RESULT_STATUSES, numbers, status_codes

if TYPE_CHECKING:
    import polars as pl

    Results = pl.DataFrame | pa.Table

STARVING_THRESHOLD = 0.10
BASE_ADAPTER = "<base>"  # the base model's requests, in per-adapter tables
PERCENTILES = (50, 90, 99)
_OK, _ERROR, _TIMEOUT, _UNFINISHED, _CANCELLED = (RESULT_STATUSES.index(s) for s in
                                                  ("ok", "error", "timeout", "unfinished", "cancelled"))


def _height(results: Results) -> int:
    return results.num_rows if isinstance(results, pa.Table) else results.height


def _numbers(results: Results, name: str, null: float = np.nan, rows: np.ndarray | None = None) -> np.ndarray:
    """A numeric column (or its sorted `rows`) as numpy, nulls `null` (NaN: as float64)."""
    if isinstance(results, pa.Table):
        return numbers(results.column(name), null, rows)
    col = results.get_column(name)
    if rows is not None:
        col = col.gather(rows)
    x = np.asarray(col.to_numpy())
    return x if not col.null_count() or np.isnan(null) else np.where(col.is_null().to_numpy(), null, x)


def _floats(results: Results, name: str, rows: np.ndarray | None = None) -> np.ndarray:
    return _numbers(results, name, rows=rows).astype(np.float64, copy=False)


def _ints(results: Results, name: str, rows: np.ndarray | None = None, fill: np.ndarray | None = None) -> np.ndarray:
    """An integer column (or its sorted `rows`); nulls from `fill` (else 0: a sum skips them)."""
    if fill is None:
        return _numbers(results, name, 0, rows)
    x = _numbers(results, name, rows=rows)
    if x.dtype.kind == "f":  # nulls
        x = np.where(np.isnan(x), fill, x).astype(np.int64)
    return x


def _arrow(results: Results, name: str) -> pa.ChunkedArray | pa.Array:
    """Column `name` as Arrow (a polars column converted)."""
    return results.column(name) if isinstance(results, pa.Table) else results.get_column(name).to_arrow()


def _status_codes(results: Results) -> np.ndarray:
    return status_codes(_arrow(results, "status"))


def window_of(results: Results, context: Mapping[str, Any] | None = None) -> float:
    """The measurement window in seconds: the one the run declared, else up to the last end."""
    ctx = context or {}
    w = ctx.get("window_s")
    if w:
        return float(w)
    if not _height(results):
        return 1e-9
    ends = _floats(results, "end_s")
    ends = ends[~np.isnan(ends)]
    last_end = float(ends.max()) if ends.size else 0.0
    last_arrival = float(_floats(results, "arrival_s").max())
    return max(last_end, last_arrival, 1e-9)


def _pcts(values: np.ndarray, scale: float, prefix: str, out: dict[str, Any]) -> None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        out[f"mean_{prefix}_ms"] = None
        for p in PERCENTILES:
            out[f"p{p}_{prefix}_ms"] = None
        return
    out[f"mean_{prefix}_ms"] = float(values.mean() * scale)
    for p, v in zip(PERCENTILES, percentiles(values), strict=True):
        out[f"p{p}_{prefix}_ms"] = float(v * scale)


def percentiles(values: np.ndarray) -> np.ndarray:
    """`np.percentile(values, PERCENTILES)` (numpy's default, linear method), the same
    floats, without the `np.unique` inside it, whose first call imports numpy.ma (a
    fortieth of a second of `twin run`'s start). Values: finite, at least one."""
    n = values.size
    q = np.true_divide(np.asarray(PERCENTILES), 100)
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1  # the largest value
    prev[above] = -1
    nxt[above] = -1
    prev, nxt = prev.astype(np.intp), nxt.astype(np.intp)
    part = np.partition(values, sorted({0, n - 1, *(int(i) % n for i in prev), *(int(i) % n for i in nxt)}))
    a, b = part[prev], part[nxt]
    gamma = np.asarray(virtual - prev, dtype=virtual.dtype)
    # numpy's _lerp: from below under one half, from above at or over it.
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


def warmup_of(context: Mapping[str, Any] | None) -> float:
    return float((context or {}).get("warmup_s") or 0.0)


def measured(results: Results, context: Mapping[str, Any] | None = None) -> tuple[Results, float]:
    """The rows metrics count (arrived after the warm-up) and the window they share."""
    warmup = warmup_of(context)
    window = window_of(results, context)
    if warmup > 0:
        keep = _floats(results, "arrival_s") >= warmup
        results = results.filter(pa.array(keep)) if isinstance(results, pa.Table) else results.filter(keep)
        window = max(window - warmup, 1e-9)
    return results, window


def summarize(results: Results, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One flat dict of the run's metrics (times in ms, rates per second)."""
    results, window = measured(results, context)
    window_end = window + warmup_of(context)
    arrival = _floats(results, "arrival_s")
    status = _status_codes(results)
    ok = status == _OK
    done = np.flatnonzero(ok)  # the completed requests' rows, in order
    completed = int(done.size)
    out: dict[str, Any] = {"window_s": window, "requests": _height(results)}
    out["completed"] = completed
    out["unfinished"] = int((status == _UNFINISHED).sum())
    out["errors"] = int(((status == _ERROR) | (status == _TIMEOUT)).sum())
    out["timeouts"] = int((status == _TIMEOUT).sum())
    # A capture's requests whose client hung up: neither served nor the server's fault.
    out["cancelled"] = int((status == _CANCELLED).sum())
    # What a completed request generated, else what it asked for.
    generated = _ints(results, "generated_tokens", done, fill=_ints(results, "output_tokens", done))
    in_tok = int(_ints(results, "prompt_tokens", done).sum(dtype=np.int64))
    out_tok = int(generated.sum(dtype=np.int64))
    out["total_input_tokens"] = in_tok
    out["total_output_tokens"] = out_tok
    out["throughput_tok_s"] = (in_tok + out_tok) / window
    out["output_tok_s"] = out_tok / window
    out["input_tok_s"] = in_tok / window
    out["req_s"] = completed / window
    in_window = arrival <= window_end
    every = bool(in_window.all())
    arrived = _height(results) if every else int(in_window.sum())

    def offered_sum(name: str) -> int:
        x = _ints(results, name)
        return int(x.sum(dtype=np.int64) if every else x[in_window].sum(dtype=np.int64))

    offered = offered_sum("prompt_tokens") + offered_sum("output_tokens") if arrived else 0
    out["offered_tok_s"] = offered / window
    out["offered_req_s"] = arrived / window
    out["served_frac"] = out["throughput_tok_s"] / out["offered_tok_s"] if offered else 1.0
    out["starved"] = bool(1.0 - out["served_frac"] >= STARVING_THRESHOLD)

    _pcts(_floats(results, "ttft_s", done), 1e3, "ttft", out)
    tpot = _floats(results, "tpot_s", done)
    _pcts(tpot, 1e3, "tpot", out)
    _pcts(_floats(results, "e2e_s", done), 1e3, "e2e", out)
    if _has_itl(results, ok):
        _pcts(_recorded_itl(results, ok), 1e3, "itl", out)
    else:
        _itl_from_tpot(tpot, generated, out)
    lag = _floats(results, "dispatch_s", done) - arrival[done]
    _pcts(lag, 1e3, "dispatch_lag", out)
    return out


def _has_itl(results: Results, ok: np.ndarray) -> bool:
    """Whether some request counted recorded its inter-token gaps (`itl_s`)."""
    if "itl_s" not in (results.column_names if isinstance(results, pa.Table) else results.columns):
        return False
    col = _arrow(results, "itl_s")
    if not col.null_count:
        return bool(ok.any())
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False))
    return bool(valid[ok].any())


def _recorded_itl(results: Results, ok: np.ndarray) -> np.ndarray:
    """Every recorded gap of the requests `ok` selects, in row order (null gaps dropped)."""
    import pyarrow.compute as pc

    col = _arrow(results, "itl_s")
    gaps = pc.list_flatten(col.filter(pa.array(ok)))
    return np.asarray(gaps.drop_null().to_numpy(), dtype=np.float64)


def _itl_from_tpot(tpot: np.ndarray, generated: np.ndarray, out: dict[str, Any]) -> None:
    """ITL statistics without recorded gaps: `_pcts` of each request's mean gap (tpot)
    repeated once per gap, computed from (mean gap, number of gaps) pairs without
    materialising the repeated array (tens of millions of values for an hour of a busy
    server: ~1 s saved)."""
    weights = np.maximum(generated - 1, 0)
    keep = np.isfinite(tpot) & (weights > 0)
    values, weights = tpot[keep], weights[keep]
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


def itl_values(ok: Results) -> np.ndarray:
    """Every inter-token gap when the run recorded them; else each request's mean gap
    repeated once per gap, which gives the same token-weighted mean."""
    every = np.ones(_height(ok), dtype=bool)
    if _has_itl(ok, every):
        return _recorded_itl(ok, every)
    gaps = np.maximum(_ints(ok, "generated_tokens", fill=_ints(ok, "output_tokens")) - 1, 0)
    tpot = _floats(ok, "tpot_s")
    keep = ~np.isnan(tpot) & (gaps > 0)
    return np.repeat(tpot[keep], gaps[keep])


def per_adapter(results: pl.DataFrame, context: Mapping[str, Any] | None = None) -> pl.DataFrame:
    """Per-adapter counts, throughput and latency (base model shown as `<base>`)."""
    import polars as pl

    results, window = measured(results, context)
    ok = pl.col("status") == "ok"
    return (
        results.with_columns(pl.col("adapter").fill_null(BASE_ADAPTER))
        .group_by("adapter")
        .agg(
            pl.len().alias("requests"),
            ok.sum().alias("completed"),
            (pl.col("status") == "unfinished").sum().alias("unfinished"),
            pl.col("status").is_in(["error", "timeout"]).sum().alias("errors"),
            ((pl.col("prompt_tokens").cast(pl.Int64) + pl.col("generated_tokens").fill_null(pl.col("output_tokens")).cast(pl.Int64)).filter(ok).sum() / window).alias("throughput_tok_s"),
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
    import polars as pl

    results, window = measured(results, context)
    if tail_s > 0:
        window = max(window - tail_s, 1e-9)
        results = results.filter(pl.col("arrival_s") <= window + warmup_of(context))
    window_end = window + warmup_of(context)
    ok = pl.col("status") == "ok"
    tokens = pl.col("prompt_tokens").cast(pl.Int64) + pl.col("generated_tokens").fill_null(pl.col("output_tokens")).cast(pl.Int64)
    offered = (pl.col("prompt_tokens").cast(pl.Int64) + pl.col("output_tokens").cast(pl.Int64)).filter(pl.col("arrival_s") <= window_end)
    out = (
        results.with_columns(pl.col("adapter").fill_null(BASE_ADAPTER))
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
