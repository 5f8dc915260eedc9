"""Train the predictor models shipped in predictor/models/ (one per twin profile).

    flock /tmp/tracekit-heavy.lock .venv/bin/python scripts/train_shipped_models.py
        [--profiles h100-llama-3.1-8b,...] [--workloads 36] [--jobs 2] [--duration 3600] [--budget-s 540]

With --budget-s the sweeps stop after that long (exit 3: rerun to continue; finished cells
persist), so a long sweep can run in chunks under the shared lock.

For each profile: a twin sweep (`predictor dataset`) over random workloads shaped like
the paper's (three per-adapter rates from 3.2 .. 0.003125 req/s, three ranks from 8/16/32,
ShareGPT lengths; a third of them with bursty gamma arrivals) x max_loras {16, 32, 64, 128}
x max_cpu_loras {8 .. 384}, then `predictor train` (GroupKFold over workloads, auto-picks
tree or linear). The sweep is resumable: rerunning after an interruption continues.

Choices:
- 3600 s windows, as the paper's runs: requests in flight at the window's end are not
  counted and queues take time to settle, so shorter windows understate what a GPU
  sustains (1200 s: a GPU the twin serves at 97% over an hour shows 93%), and a model
  trained on them recommends too few adapters per GPU.
- cells offered over 60 req/s per GPU are skipped (2-3x any capacity seen), and no cell
  simulates more than 100,000 requests (a window is shortened to hold that many), which
  keeps every cell near a GPU's capacity at the full hour. A few minutes per profile on
  a 2-core machine.
The dataset is kept in benchmarks/results/predictor_dataset_<profile>.parquet. The models
are first guesses of `recommend`'s twin search and the whole of `recommend --fast`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from predictor import dataset, spec, train  # noqa: E402
from predictor.recommend import shipped_model_path  # noqa: E402


def training_spec(n: int, duration: float, seed: int = 2024) -> spec.Spec:
    return spec.from_dict({
        "random": {"n": n, "seed": seed, "arrivals": ["poisson", "poisson", "gamma:2"]},
        "configs": {"max_loras": [16, 32, 64, 128],
                    "max_cpu_loras": [8, 16, 32, 48, 64, 96, 128, 160, 192, 256, 384]},
        "duration_s": duration,
        "max_requests": 100000,
        "max_load_req_s": 60.0,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", default="h100-llama-3.1-8b,h100-qwen-2.5-7b")
    ap.add_argument("--workloads", type=int, default=36)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=None, help="stop sweeping after this long (exit 3)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    for prof in args.profiles.split(","):
        ds = ROOT / "benchmarks" / "results" / f"predictor_dataset_{prof}.parquet"
        sp = training_spec(args.workloads, args.duration)
        print(f"[{prof}] sweeping {len(sp.cells())} cells -> {ds}", flush=True)
        budget = None if args.budget_s is None else max(1.0, args.budget_s - (time.perf_counter() - t0))
        df, ctx = dataset.sweep(sp, prof, ds, jobs=args.jobs, time_budget_s=budget)
        if not ctx["complete"]:
            print(f"[{prof}] {df.height} of {len(sp.cells())} cells done: rerun to continue", flush=True)
            sys.exit(3)
        dataset.print_labels(df, ctx, ds)
        model, cv = train.train(ds, kind="auto", folds=5)
        model.meta["dataset"]["path"] = str(ds.relative_to(ROOT))
        out = model.save(shipped_model_path(prof))
        train.print_cv(cv, model.kind)
        print(f"[{prof}] saved {model.kind} model -> {out.relative_to(ROOT)} "
              f"(held-out error {model.meta['cv'][model.kind]['capacity_mape']:.1%})")
        print(json.dumps(model.meta["cv"], indent=1))


if __name__ == "__main__":
    main()
