"""Scoring a recommendation against measured (or simulated) sweeps of one workload.

A sweep measures a grid of (max_loras, max_cpu_loras) cells; a recommendation usually
falls between two measured adapter counts. Two scores, at the measured max_loras nearest
the recommendation's (on a log scale):

- strict: the measured cell at the count just below the recommendation (the nearest above
  when none is below): what the grid proves;
- interpolated: between the measured counts around it. Where the upper one does not
  starve, neither does the recommendation and its throughput is interpolated linearly.
  Where the upper one starves, the recommendation's offered load is interpolated
  linearly and the GPU serves at most what the upper, overloaded cell served (a
  saturated GPU serves its capacity; with more adapters, churn only lowers it):
  served = min(served below, throughput above / offered); it starves below 90%.

Shortfall = 1 - throughput / the best measured non-starving throughput of the workload,
floored at 0 (a recommendation between grid points can beat every measured cell).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from tracekit.metrics import STARVING_THRESHOLD

SERVED_OK = 1.0 - STARVING_THRESHOLD


def _ok(served: float, status: str = "ok") -> bool:
    return status == "ok" and 1.0 - served < STARVING_THRESHOLD


def best_cell(cells: pl.DataFrame) -> dict[str, Any] | None:
    """The measured non-starving cell with the highest throughput (ties: fewer slots)."""
    ok = cells.filter((pl.col("status") == "ok") & (1.0 - pl.col("served_frac") < STARVING_THRESHOLD))
    if ok.height == 0:
        return None
    return ok.sort(["throughput_tok_s", "max_loras"], descending=[True, False]).row(0, named=True)


def nearest_max_loras(cells: pl.DataFrame, max_loras: int) -> int:
    mls = np.array(sorted(set(cells["max_loras"].to_list())), dtype=np.float64)
    return int(mls[np.argmin(np.abs(np.log(mls) - math.log(max(max_loras, 1))) + 1e-9 * mls)])


def score(cells: pl.DataFrame, max_loras: int, adapters: int) -> dict[str, Any]:
    """Both scores of the recommendation (max_loras, adapters) on one workload's cells
    (columns max_loras, max_cpu_loras, status, throughput_tok_s, served_frac,
    offered_tok_s)."""
    best = best_cell(cells)
    ml = nearest_max_loras(cells, max_loras)
    at = cells.filter(pl.col("max_loras") == ml).sort("max_cpu_loras")
    ns = at["max_cpu_loras"].to_list()
    rows = at.to_dicts()
    below = [r for r in rows if r["max_cpu_loras"] <= adapters]
    strict_cell = below[-1] if below else rows[0]
    strict = _scored(strict_cell["throughput_tok_s"] if strict_cell["status"] == "ok" else 0.0,
                     _ok(strict_cell["served_frac"], strict_cell["status"]), best)
    strict["cell"] = (ml, strict_cell["max_cpu_loras"])
    above = [r for r in rows if r["max_cpu_loras"] >= adapters]
    if not below or not above or below[-1]["max_cpu_loras"] == adapters:
        interp = dict(strict)  # on a grid point, or outside the measured counts
    else:
        lo, hi = below[-1], above[0]
        t = (adapters - lo["max_cpu_loras"]) / (hi["max_cpu_loras"] - lo["max_cpu_loras"])
        if lo["status"] != "ok":
            interp = _scored(0.0, False, best)
        elif _ok(hi["served_frac"], hi["status"]):
            thr = lo["throughput_tok_s"] + t * (hi["throughput_tok_s"] - lo["throughput_tok_s"])
            interp = _scored(thr, True, best)
        else:
            off = lo["offered_tok_s"] + t * (hi["offered_tok_s"] - lo["offered_tok_s"])
            cap = hi["throughput_tok_s"] if hi["status"] == "ok" else 0.0
            served = min(float(lo["served_frac"]), cap / off if off > 0 else 1.0)
            interp = _scored(off * served, _ok(served), best)
        interp["cell"] = (ml, f"{lo['max_cpu_loras']}-{hi['max_cpu_loras']}")
    return {
        "max_loras_scored": ml, "grid_counts": ns,
        "best_max_loras": best["max_loras"] if best else None,
        "best_adapters": best["max_cpu_loras"] if best else None,
        "best_tok_s": best["throughput_tok_s"] if best else None,
        "strict": strict, "interpolated": interp,
    }


def _scored(thr: float, ok: bool, best: dict[str, Any] | None) -> dict[str, Any]:
    short = None
    if best is not None and best["throughput_tok_s"] > 0:
        short = max(0.0, 1.0 - thr / float(best["throughput_tok_s"])) if ok else None
    return {"throughput_tok_s": float(thr), "starved": not ok, "shortfall": short}


def summarise(scores: list[dict[str, Any]], which: str) -> dict[str, Any]:
    """Mean and worst shortfall over the recommendations that do not starve, and how many starve."""
    s = [x[which] for x in scores if x.get(which)]
    sf = [x["shortfall"] for x in s if not x["starved"] and x["shortfall"] is not None]
    return {"mean_shortfall": float(np.mean(sf)) if sf else None, "max_shortfall": float(np.max(sf)) if sf else None,
            "starved": int(sum(x["starved"] for x in s)), "workloads": len(s)}
