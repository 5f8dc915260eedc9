"""Cross-validated error of the predictor on held-out twin workloads, against the paper's
models (one decision tree and a random forest on the paper's 8 features), same data.

    .venv/bin/python benchmarks/predictor_cv.py [--profile h100-llama-3.1-8b] [--folds 5]

Dataset: benchmarks/results/predictor_dataset_<profile>.parquet (written by
scripts/train_shipped_models.py). GroupKFold over workloads: no workload is in both the
training and the test part. Per method:
- starving-load MAPE / bias: error of the predicted starving load (offered tok/s at which
  one GPU's served share falls to 90%) of each held-out (workload, max_loras) whose sweep
  starved (our models only): the `model error` of the safety rule (`predictor.safety`);
- adapters MAPE: |recommended - best swept| / best swept;
- mean shortfall / starved: the model-only recommendation (safety step = the rule's z x
  this MAPE; the twin is the truth here, so no twin error) scored on the held-out
  workload's swept cells (`predictor.score`: interpolated, and strict at the count below),
  vs that workload's best non-starving cell.

The paper's 8 features are taken as the mean, std, min and max of the adapters' rates
and of their ranks (its workloads are described by three rates and three ranks); its
models predict the best max_cpu_loras and max_loras directly.

Writes benchmarks/results/predictor_cv.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="h100-llama-3.1-8b")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()

    from benchmarks.predictor_common import twin_commit
    from predictor import pio
    from predictor.train import cross_validate

    ds = OUT / f"predictor_dataset_{args.profile}.parquet"
    df, ctx = pio.read(ds)
    t0 = time.perf_counter()
    cv = cross_validate(df, kinds=("tree", "linear"), folds=args.folds)
    wall = time.perf_counter() - t0
    names = list(cv)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    lines = [
        f"# predictor cross-validation on held-out twin workloads ({args.profile})", "",
        f"Machine: 2-core CPU ({platform.machine()}), Python {platform.python_version()}, shared. "
        f"Command: `.venv/bin/python benchmarks/predictor_cv.py --profile {args.profile} --folds {args.folds}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {wall:.1f} s). Twin: commit {twin_commit()}.",
        f"Dataset: `{ds.relative_to(ROOT)}`: {df.height} twin runs, {df['workload_key'].n_unique()} workloads "
        f"({ctx.get('spec', {}).get('duration_s')} s windows). GroupKFold over workloads, {args.folds} folds.", "",
        "| model | starving-load MAPE | bias | adapters MAPE | mean shortfall (interp.) | starved | "
        "mean shortfall (strict) | starved | workloads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        m = cv[n]
        step = f" (step {m['safety_step']:.1%})" if "safety_step" in m else ""
        lines.append(f"| {n}{step} | {pct(m['capacity_mape'])} | {pct(m['capacity_bias'])} | {pct(m['adapters_mape'])} | "
                     f"{pct(m['mean_shortfall'])} | {pct(m['starved_frac'])} | {pct(m['strict_mean_shortfall'])} | "
                     f"{pct(m['strict_starved_frac'])} | {m['workloads']} |")
    lines += ["", "tree/linear: our starving-load models (log tok/s per (workload, max_loras); adapters per GPU =",
              "starving load / per-adapter load, less the safety step). paper_tree/paper_forest: the paper's approach",
              "(best config regressed directly on 8 rate/rank statistics)."]
    (OUT / "predictor_cv.md").write_text("\n".join(lines) + "\n")
    (OUT / "predictor_cv.json").write_text(json.dumps(
        {"profile": args.profile, "dataset": str(ds.relative_to(ROOT)), "folds": args.folds,
         "twin_commit": twin_commit(),
         "methods": {n: {k: v for k, v in m.items() if k != "residuals"} for n, m in cv.items()}}, indent=1, default=str))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, title in zip(axes, ("adapters_mape", "mean_shortfall", "starved_frac"),
                              ("adapters-per-GPU error", "throughput shortfall (interp.)", "starving recommendations"),
                              strict=True):
        vals = [100 * (cv[n][key] or 0.0) for n in names]
        ax.bar(names, vals, color=["C0", "C1", "C7", "C8"][: len(names)])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("%")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"held-out twin workloads ({args.profile}), GroupKFold", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "predictor_cv.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
