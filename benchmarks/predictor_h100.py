"""The predictor against real one-hour H100 runs (the paper's 9 Llama-3.1-8B workloads).

    .venv/bin/python benchmarks/predictor_h100.py [--verify]

For each workload of benchmarks/data/llama_config_sweeps.csv (measured data from the
paper's repository, see benchmarks/data/README.md): synthesise a one-hour trace with 384
adapters of that workload's rates and ranks, ask `predictor recommend` (the model shipped
for h100-llama-3.1-8b, trained on twin sweeps only), look up the real run at the nearest
measured grid point (nearest max_cpu_loras on a log scale, then nearest max_loras), and
compare its real throughput with the best real configuration that does not starve
(served >= 90% of offered). Goal: mean shortfall <= 3%, no recommendation that starves.

Baselines on the same traces: the paper's models (one decision tree and a random forest
on the paper's 8 features, predicting the best max_cpu_loras and max_loras directly),
trained on the same twin dataset. With --verify, also `recommend --verify` (the twin
checks and corrects the recommendation). And the twin oracle: the best non-starving
config of a twin sweep over the paper's grid for each workload, i.e. the best any model
trained on this twin could do; the gap between it and the real best is the twin's.

Writes benchmarks/results/predictor_h100.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results"
PROFILE = "h100-llama-3.1-8b"
FLEET = 384


def real_runs() -> pl.DataFrame:
    from benchmarks.sweeps import sweep_runs

    rows = []
    for r in sweep_runs():
        if r["status"] == "no_result":  # no measurement: not a grid point
            continue
        rows.append({
            "workload": f"{'/'.join(r['rate_strs'])} r{'/'.join(r['rank_strs'])}",
            "rates": r["rates"],
            "ranks": r["ranks"],
            "max_loras": int(r["max_loras"]),
            "max_cpu_loras": int(r["max_cpu_loras"]),
            "status": r["status"],
            "throughput_tok_s": float(r["total_tok_s"] or 0.0) if r["status"] == "ok" else 0.0,
            "served_frac": float(r["served_frac_est"] or 0.0) if r["status"] == "ok" else 0.0,
        })
    return pl.DataFrame(rows)


def judge(cells: pl.DataFrame, ml: int, n: int) -> dict[str, Any]:
    from predictor.plan import nearest_cell

    best = cells.filter((pl.col("status") == "ok") & (pl.col("served_frac") >= 0.9)).sort("throughput_tok_s", descending=True)
    c = nearest_cell(cells, ml, n)
    starved = c["status"] != "ok" or c["served_frac"] < 0.9
    b = best.row(0, named=True) if best.height else None
    return {
        "grid_max_loras": c["max_loras"], "grid_max_cpu_loras": c["max_cpu_loras"],
        "real_tok_s": c["throughput_tok_s"], "real_served": c["served_frac"], "starved": bool(starved),
        "best_max_loras": b["max_loras"] if b else None, "best_max_cpu_loras": b["max_cpu_loras"] if b else None,
        "best_tok_s": b["throughput_tok_s"] if b else None,
        "shortfall": (1.0 - c["throughput_tok_s"] / b["throughput_tok_s"]) if b else None,
    }


def paper_baselines(dataset: Path) -> dict[str, Any]:
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.tree import DecisionTreeRegressor

    from predictor import pio
    from predictor.model import PAPER_FEATURES
    from predictor.train import workload_table

    df, _ = pio.read(dataset)
    wt = workload_table(df).filter(pl.col("best_max_cpu_loras").is_not_null())
    X = wt.select(PAPER_FEATURES).to_numpy()
    Y = wt.select("best_max_cpu_loras", "best_max_loras").to_numpy().astype(float)
    return {
        "paper_tree": DecisionTreeRegressor(random_state=0).fit(X, Y),
        "paper_forest": RandomForestRegressor(n_estimators=100, random_state=0).fit(X, Y),
    }


def twin_oracle(runs: pl.DataFrame, jobs: int) -> dict[str, tuple[int, int]]:
    """What the twin alone would pick: sweep it over the paper's grid for each workload
    (3600 s windows as the real runs, cached in benchmarks/results/predictor_h100_twin_sweep.parquet) and
    take its best non-starving cell. Separates the twin's error from the model's."""
    from predictor import dataset, spec

    wls = runs.select("workload", "rates", "ranks").unique("workload").sort("workload")
    sp = spec.from_dict({
        "workloads": [{"rates": r["rates"], "ranks": r["ranks"], "name": r["workload"]} for r in wls.iter_rows(named=True)],
        "configs": {"max_loras": [16, 32, 64, 128], "max_cpu_loras": [16, 32, 64, 96, 128, 160, 192, 256, 320, 384]},
        "duration_s": 3600, "max_requests": 100000, "max_load_req_s": 60,
    })
    df, _ = dataset.sweep(sp, PROFILE, OUT / "predictor_h100_twin_sweep.parquet", jobs=jobs, progress=False)
    return {r["workload"]: (r["max_loras"], r["max_cpu_loras"]) for r in df.filter(pl.col("is_best")).iter_rows(named=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--verify", action="store_true", help="also score recommend --verify")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats of recommend")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the twin-oracle sweep")
    args = ap.parse_args()

    from predictor import features as F
    from predictor.model import PAPER_FEATURES
    from predictor.recommend import recommend, shipped_model_path, verify
    from tracekit import schema
    from tracekit.synth import synthesize

    model_meta = json.loads(shipped_model_path(PROFILE).read_text())["meta"]
    dataset = ROOT / model_meta["dataset"]["path"]
    baselines = paper_baselines(dataset)
    runs = real_runs()
    oracle = twin_oracle(runs, args.jobs)
    tmp = OUT / ".predictor_h100_traces"
    tmp.mkdir(parents=True, exist_ok=True)
    rows, timings, read_ms, first_ms, process_ms = [], [], [], [], []
    for (wl,), cells in sorted(runs.group_by("workload"), key=lambda kv: kv[0][0]):
        r0 = cells.row(0, named=True)
        df, ctx = synthesize(FLEET, r0["rates"], r0["ranks"], 3600.0, lengths="sharegpt", seed=0)
        path = schema.write(tmp / f"{wl.replace('/', '-').replace(' ', '_')}.parquet", df, "trace", ctx)
        recs = [recommend(path, PROFILE) for _ in range(args.repeats)]
        rec = recs[-1]
        timings.append(statistics.median(r["answer_ms"] for r in recs))
        first_ms.append(recs[0]["answer_ms"])
        t0 = time.perf_counter()
        subprocess.run([str(ROOT / ".venv" / "bin" / "predictor"), "recommend", str(path), "--profile", PROFILE, "--json"],
                       check=True, capture_output=True)
        process_ms.append((time.perf_counter() - t0) * 1e3)
        # Same-script baseline for the timing: just reading the trace's columns.
        t = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pl.read_parquet(path, columns=["arrival_s", "adapter", "prompt_tokens", "output_tokens"])
            t.append((time.perf_counter() - t0) * 1e3)
        read_ms.append(statistics.median(t))
        row = {"workload": wl, "method": "predictor", "max_loras": rec["max_loras"], "max_cpu_loras": rec["max_cpu_loras"],
               "pred_tok_s": rec["throughput_tok_s"], "gpus": rec["gpus"], "risk": rec["starving_risk"],
               **judge(cells, rec["max_loras"], rec["max_cpu_loras"])}
        rows.append(row)
        plain = recommend(path, PROFILE, use_twin_margin=False)
        rows.append({"workload": wl, "method": "predictor --no-twin-margin", "max_loras": plain["max_loras"],
                     "max_cpu_loras": plain["max_cpu_loras"], "pred_tok_s": plain["throughput_tok_s"], "gpus": plain["gpus"],
                     "risk": plain["starving_risk"], **judge(cells, plain["max_loras"], plain["max_cpu_loras"])})
        if args.verify:
            v = verify(dict(rec), path, PROFILE)
            rows.append({"workload": wl, "method": "predictor --verify", "max_loras": v["max_loras"],
                         "max_cpu_loras": v["max_cpu_loras"], "pred_tok_s": v["throughput_tok_s"], "gpus": v["gpus"],
                         "risk": v["starving_risk"], **judge(cells, v["max_loras"], v["max_cpu_loras"])})
        if wl in oracle:
            ml, n = oracle[wl]
            rows.append({"workload": wl, "method": "twin oracle (grid sweep)", "max_loras": ml, "max_cpu_loras": n,
                         "pred_tok_s": None, "gpus": math.ceil(FLEET / n), "risk": None, **judge(cells, ml, n)})
        f, _ = F.from_file(path)
        x = np.array([[f[k] for k in PAPER_FEATURES]])
        for name, est in baselines.items():
            n_hat, ml_hat = est.predict(x)[0]
            n, ml = max(1, int(round(n_hat))), max(1, int(round(ml_hat)))
            rows.append({"workload": wl, "method": name, "max_loras": min(ml, n), "max_cpu_loras": n,
                         "pred_tok_s": None, "gpus": math.ceil(FLEET / n), "risk": None, **judge(cells, min(ml, n), n)})
        print(f"{wl}: predictor -> ({rec['max_loras']}, {rec['max_cpu_loras']}) shortfall {row['shortfall']}", flush=True)
    for p in tmp.glob("*.parquet"):
        p.unlink()
    tmp.rmdir()

    res = pl.DataFrame(rows)
    summary = (
        res.group_by("method", maintain_order=True)
        # A starving config's throughput is not a valid comparison: shortfall is averaged
        # over the recommendations that do not starve, and starving ones are counted.
        .agg(pl.col("shortfall").filter(~pl.col("starved")).mean().alias("mean_shortfall"),
             pl.col("shortfall").filter(~pl.col("starved")).max().alias("max_shortfall"),
             pl.col("starved").sum().alias("starved"), pl.len().alias("workloads"))
    )
    meta = {
        "machine": f"2-core CPU ({platform.machine()}), Python {platform.python_version()}, shared with other jobs",
        "command": "  ".join([".venv/bin/python benchmarks/predictor_h100.py"] + (["--verify"] if args.verify else [])),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": {"kind": json.loads(shipped_model_path(PROFILE).read_text())["kind"],
                  "dataset": model_meta["dataset"]["path"], "trained_at": model_meta.get("trained_at")},
        "recommend_ms_median": statistics.median(timings),
        "recommend_ms_max": max(timings),
        "read_columns_ms_median": statistics.median(read_ms),
        "recommend_first_call_ms": first_ms,
        "cli_process_ms_median": statistics.median(process_ms),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "predictor_h100.json").write_text(json.dumps({"meta": meta, "summary": summary.to_dicts(), "rows": res.to_dicts()}, indent=1, default=str))

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.1%}"

    lines = [
        "# predictor vs real H100 runs (Llama-3.1-8B, the paper's 9 workloads, 384 adapters)", "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}` ({meta['date']}).",
        f"Model: shipped `{meta['model']['kind']}` model for {PROFILE}, trained on twin sweeps only ({meta['model']['dataset']}).",
        "Real runs: benchmarks/data/llama_config_sweeps.csv; a recommendation is looked up at the nearest measured",
        "grid point (nearest max_cpu_loras on a log scale, then nearest max_loras); `starved` = served < 90% of",
        "offered in the real run, or the server ran out of memory. Shortfall = 1 - real throughput / best real",
        "non-starving throughput of that workload.", "",
        "| method | mean shortfall (non-starving recs) | max shortfall | starved in the real run | workloads |", "|---|---:|---:|---:|---:|",
    ]
    for s in summary.iter_rows(named=True):
        lines.append(f"| {s['method']} | {pct(s['mean_shortfall'])} | {pct(s['max_shortfall'])} | {s['starved']} | {s['workloads']} |")
    lines += ["", "| workload | method | recommended (max_loras, max_cpu_loras) | grid point | real tok/s | real served | best real (ml, n) | best tok/s | shortfall | predicted tok/s | GPUs |",
              "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in res.iter_rows(named=True):
        pred = "-" if r["pred_tok_s"] is None else f"{r['pred_tok_s']:,.0f}"
        lines.append(
            f"| {r['workload']} | {r['method']} | ({r['max_loras']}, {r['max_cpu_loras']}) | ({r['grid_max_loras']}, {r['grid_max_cpu_loras']}) | "
            f"{r['real_tok_s']:,.0f} | {r['real_served']:.0%}{' STARVED' if r['starved'] else ''} | ({r['best_max_loras']}, {r['best_max_cpu_loras']}) | "
            f"{r['best_tok_s']:,.0f} | {pct(r['shortfall'])} | {pred} | {r['gpus']} |"
        )
    lines += ["", f"`recommend` answer time (in-process, trace read + features + model + fleet split), median over workloads of "
              f"the median of {args.repeats}: {meta['recommend_ms_median']:.0f} ms (max {meta['recommend_ms_max']:.0f} ms); "
              f"reading the same trace's 4 columns with polars alone: {meta['read_columns_ms_median']:.0f} ms "
              f"(ratio {meta['recommend_ms_median'] / meta['read_columns_ms_median']:.1f}x). First call in a process "
              f"(cold caches): median {statistics.median(first_ms):.0f} ms. The whole `predictor recommend --json` process "
              f"(Python start-up and imports of polars/numpy included): median {meta['cli_process_ms_median']:.0f} ms."]
    (OUT / "predictor_h100.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    methods = summary["method"].to_list()
    wls = sorted(set(res["workload"].to_list()))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        sub = {r["workload"]: r for r in res.filter(pl.col("method") == m).iter_rows(named=True)}
        vals = [100 * (sub[x]["shortfall"] or 0.0) for x in wls]
        bars = ax.bar(np.arange(len(wls)) + i * w, vals, w, label=m)
        for b, x in zip(bars, wls, strict=True):
            if sub[x]["starved"]:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), "S", ha="center", va="bottom", fontsize=8, color="red")
    ax.axhline(3, color="grey", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(wls)) + 0.4 - w / 2, wls, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("shortfall vs best real non-starving (%)")
    ax.set_title("Recommended config, real H100 throughput (S = starves in the real run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "predictor_h100.png", dpi=120)
    print((OUT / "predictor_h100.md").read_text())


if __name__ == "__main__":
    main()
