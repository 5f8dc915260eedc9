"""The paper's Llama config sweeps (benchmarks/data/llama_config_sweeps.csv, measured on
one H100), parsed once for the benchmarks that check the twin and the predictor against
them. Each run's workload (three per-adapter rates, three ranks) is read from its `dir`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl

SWEEPS = Path(__file__).resolve().parent / "data" / "llama_config_sweeps.csv"
_WORKLOAD = re.compile(r"rate_([\d.]+)-([\d.]+)-([\d.]+)_size_(\d+)-(\d+)-(\d+)")


def sweep_runs() -> list[dict[str, Any]]:
    """One dict per run whose directory names its workload: the CSV row's columns, plus
    `rate_strs`/`rank_strs` (as written in the directory), `rates` and `ranks`."""
    out = []
    for r in pl.read_csv(SWEEPS, infer_schema_length=10000).iter_rows(named=True):
        m = _WORKLOAD.search(r["dir"])
        if not m:
            continue
        rate_strs, rank_strs = [m.group(i) for i in (1, 2, 3)], [m.group(i) for i in (4, 5, 6)]
        out.append(dict(r, rate_strs=rate_strs, rank_strs=rank_strs,
                        rates=[float(x) for x in rate_strs], ranks=[int(x) for x in rank_strs]))  # fmt: skip
    return out
