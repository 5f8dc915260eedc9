"""Shared pieces of the predictor benchmarks: traces, the twin's commit, the machine,
scoring rows against sweeps, and markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
INCOMPLETE = 3  # exit code of a chunked benchmark that stopped at its time budget: rerun it
# Workers of the truth sweeps: they run under the shared lock, which holds the machine's
# cores for them (a cell's numbers do not depend on how many run at once).
SWEEP_JOBS = max(1, min(2, len(os.sched_getaffinity(0))))
# The paper's grid (its real sweeps measured these max_loras / max_cpu_loras).
PAPER_MAX_LORAS = [16, 32, 64, 96, 128, 160, 192]
PAPER_COUNTS = [16, 32, 64, 96, 128, 160, 192, 256, 320, 384]


def twin_commit() -> str:
    """The last commit that touched twin/ (what the twin's numbers come from), with
    `+dirty` when twin/ has uncommitted changes."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    c = git("log", "-1", "--format=%h %cs", "--", "twin/") or "unknown"
    return c + (" +dirty" if git("status", "--porcelain", "--", "twin/") else "")


def head_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores ({model or platform.machine()}), Python {platform.python_version()}, "
            f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end (shared machine)")


def make_trace(directory: Path, name: str, rates: list[float], ranks: list[int], *, seed: int, fleet: int = 384,
               duration_s: float = 3600.0, lengths: str = "sharegpt") -> Path:
    from tracekit import schema
    from tracekit.synth import synthesize

    df, ctx = synthesize(fleet, rates, ranks, duration_s, lengths=lengths, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    return schema.write(directory / f"{name}.parquet", df, "trace", ctx)


def workload_name(rates: Iterable[float], ranks: Iterable[int]) -> str:
    return f"{'/'.join(f'{r:g}' for r in rates)} r{'/'.join(str(k) for k in ranks)}"


def scored(method: str, workload: str, ml: int, n: int, cells: pl.DataFrame, **extra: Any) -> dict[str, Any]:
    from predictor.score import score

    sc = score(cells, ml, n)
    return {"workload": workload, "method": method, "max_loras": ml, "adapters": n, **extra,
            "best": (sc["best_max_loras"], sc["best_adapters"]), "best_tok_s": sc["best_tok_s"],
            "strict": sc["strict"], "interpolated": sc["interpolated"]}


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from predictor.score import summarise

    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        i, s = summarise(rs, "interpolated"), summarise(rs, "strict")
        out.append({"method": m, "workloads": i["workloads"], "interp_mean": i["mean_shortfall"],
                    "interp_max": i["max_shortfall"], "interp_starved": i["starved"], "strict_mean": s["mean_shortfall"],
                    "strict_max": s["max_shortfall"], "strict_starved": s["starved"]})
    return out


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def summary_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | mean shortfall (interpolated) | worst | starving | mean shortfall (strict) | worst | starving | workloads |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary(rows):
        lines.append(f"| {s['method']} | {pct(s['interp_mean'])} | {pct(s['interp_max'])} | {s['interp_starved']} | "
                     f"{pct(s['strict_mean'])} | {pct(s['strict_max'])} | {s['strict_starved']} | {s['workloads']} |")
    return lines


def rows_md(rows: list[dict[str, Any]], extra: Mapping[str, str] | None = None) -> list[str]:
    """Per-workload rows: recommendation, both scores, and `extra` columns (key -> header)."""
    extra = dict(extra or {})
    head = ["workload", "method", "(max_loras, adapters)", "best measured", "interpolated tok/s", "shortfall",
            "strict cell", "strict shortfall", *extra.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        i, s = r["interpolated"], r["strict"]
        cells = [r["workload"], r["method"], f"({r['max_loras']}, {r['adapters']})",
                 f"({r['best'][0]}, {r['best'][1]}) {r['best_tok_s'] or 0:,.0f}",
                 f"{i['throughput_tok_s']:,.0f}", "STARVES" if i["starved"] else pct(i["shortfall"]),
                 str(s["cell"]), "STARVES" if s["starved"] else pct(s["shortfall"])]
        for k in extra:
            v = r.get(k)
            if v is None:
                cells.append("-")
            elif k == "step":
                cells.append(pct(v))
            else:
                cells.append(f"{v:,.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def med_max(xs: list[float]) -> tuple[float, float]:
    return (statistics.median(xs), max(xs)) if xs else (float("nan"), float("nan"))
