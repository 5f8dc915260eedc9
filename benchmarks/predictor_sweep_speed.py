"""Dataset generation throughput: twin runs per minute, locally and on a local Ray cluster.

    .venv/bin/python benchmarks/predictor_sweep_speed.py [--workloads 4] [--duration 600]

One fixed sweep (random paper-like workloads x max_loras {16, 64} x max_cpu_loras
{16, 32, 64, 128, 256}, h100-llama-3.1-8b, `duration` s windows) is run from scratch by
each executor into its own directory: local with 1 process (the baseline), local with 2
processes, and Ray (ray.init() on this machine, 2 CPUs). Reported: runs/min and the ratio
to the 1-process baseline measured in the same script. The machine has 2 cores shared with
other jobs, so the parallel ratios are bounded by 2 and noisy.

Writes benchmarks/results/predictor_sweep_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
PROFILE = "h100-llama-3.1-8b"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", type=int, default=4)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from predictor import dataset, spec

    sp = spec.from_dict({"random": {"n": args.workloads, "seed": 11},
                         "configs": {"max_loras": [16, 64], "max_cpu_loras": [16, 32, 64, 128, 256]},
                         "duration_s": args.duration, "max_requests": 40000, "max_load_req_s": 60})
    cells = len(sp.cells())
    variants = [("local", 1), ("local", 2), ("ray", 2)]
    walls: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, so drifting load hits every variant alike
        for executor, jobs in variants:
            d = Path(tempfile.mkdtemp(prefix="predsweep-"))
            try:
                t0 = time.perf_counter()
                dataset.sweep(sp, PROFILE, d / "ds.parquet", executor=executor, jobs=jobs, progress=False)
                walls[(executor, jobs)].append(time.perf_counter() - t0)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            print(executor, jobs, walls[(executor, jobs)][-1], flush=True)
    results = []
    for (executor, jobs), w in walls.items():
        wall = statistics.median(w)
        results.append({"executor": executor, "jobs": jobs, "cells": cells, "wall_s": wall, "walls_s": w,
                        "runs_per_min": cells / wall * 60.0})
    base = results[0]["runs_per_min"]
    cmd = (f".venv/bin/python benchmarks/predictor_sweep_speed.py --workloads {args.workloads} "
           f"--duration {args.duration:g} --repeats {args.repeats}")
    load = os.getloadavg()
    lines = [
        "# predictor dataset generation throughput (twin runs per minute)", "",
        f"Machine: 2-core CPU ({platform.machine()}), Python {platform.python_version()}, shared with other jobs "
        f"(noisy: median of {args.repeats} interleaved runs per executor; local jobs>1 and Ray workers run "
        "polars/BLAS single-threaded, the serial baseline uses polars' default threads).",
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on 2 cores: other engineers' jobs share them.",
        f"Sweep: {cells} cells ({args.workloads} random paper-like workloads x (max_loras, max_cpu_loras)), "
        f"{args.duration:g} s windows, profile {PROFILE}; wall time includes process/Ray start-up.", "",
        "| executor | jobs | cells | wall s (median) | runs | twin runs/min | vs local, 1 job |", "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        runs = ", ".join(f"{x:.1f}" for x in r["walls_s"])
        lines.append(f"| {r['executor']} | {r['jobs']} | {r['cells']} | {r['wall_s']:.1f} | {runs} | {r['runs_per_min']:.0f} | {r['runs_per_min'] / base:.2f}x |")
    (OUT / "predictor_sweep_speed.md").write_text("\n".join(lines) + "\n")
    (OUT / "predictor_sweep_speed.json").write_text(json.dumps({"command": cmd, "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
