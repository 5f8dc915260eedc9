"""Twin accuracy against real one-hour H100 runs (the paper's Llama-3.1-8B config sweeps).

    .venv/bin/python benchmarks/twin_accuracy.py [--subset N] [--procs 2] [--seed 0]

For every `ok` run of benchmarks/data/llama_config_sweeps.csv: generate the workload with
`tracekit.synth.synthesize(adapters=max_cpu_loras, rates, ranks, duration_s=3600,
lengths="sharegpt")`, simulate it with the shipped `h100-llama-3.1-8b` profile under the
run's configuration (max_num_seqs 2048, max_num_batched_tokens 2048, 3600 s window),
and compare throughput (input + output tokens of completed requests / window), mean ITL
and the starving verdict (served < 90% of offered) with what the real server measured.
The profile was fitted from the calibration runs and the KV table
(scripts/fit_h100_profiles.py), except three split shares fitted on these sweeps
(scripts/fit_sweep_terms.py reads this benchmark's .json). `--cv TERMS_JSON` gives the
held-out figure: each workload simulated with the shares of the fold that left it out.
Also checks the memory model's OOM prediction on every run the server did not start.

    .venv/bin/python benchmarks/twin_accuracy.py --procs 2                       # shipped profile
    .venv/bin/python benchmarks/twin_accuracy.py --procs 2 \
        --cv twin/data/sweep_terms_h100.json --out benchmarks/results/twin_accuracy_cv

Writes benchmarks/results/twin_accuracy.{md,json,png} (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
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
WINDOW_S = 3600.0
STARVING = 0.10
# Step-time terms that scripts/fit_sweep_terms.py re-splits (recorded with every run).
SPLIT_FEATURES = ("lora_tokens", "lora_rank_tokens", "lora_slot_tokens", "lora_slot_rank_tokens", "prefill_reqs")


def load_runs() -> pl.DataFrame:
    from benchmarks.sweeps import sweep_runs

    rows = []
    for r in sweep_runs():
        rates, ranks = "/".join(r["rate_strs"]), "/".join(r["rank_strs"])
        rows.append(
            {
                "workload": f"rate {rates} ranks {ranks}",
                "rates": r["rates"],
                "ranks": r["ranks"],
                "max_loras": int(r["max_loras"]),
                "max_cpu_loras": int(r["max_cpu_loras"]),
                "max_lora_rank": int(r["max_lora_rank"]),
                "status": r["status"],
                "real_tok_s": r["total_tok_s"],
                "real_itl_ms": r["mean_itl_ms"],
                "real_ideal_tok_s": r["ideal_tok_s_est"],
            }
        )
    return pl.DataFrame(rows)


def _synth_seed(workload: str, adapters: int, seed: int) -> int:
    # One workload per (rates, ranks, served adapters), shared by every max_loras, as in
    # the paper where each configuration replays the same request stream.
    import zlib

    return (zlib.crc32(f"{workload}|{adapters}".encode()) + seed) % (2**31)


def with_terms(prof: Any, terms: dict[str, Any] | None) -> Any:
    """The profile with the sweep-fitted terms of `terms` (see scripts/fit_sweep_terms.py)
    in place of its own."""
    if not terms:
        return prof
    from twin.profile import Profile

    data = json.loads(json.dumps(prof.to_dict()))
    data["step_time"]["coef"].update(terms["coef"])
    data["request_intake"] = {"s_per_request": terms["request_intake_s"]}
    return Profile.from_dict(data)


def simulate_run(args: tuple[dict[str, Any], int, dict[str, Any] | None]) -> dict[str, Any]:
    run, seed, terms = args
    import polars as pl

    from tracekit.synth import synthesize
    from twin.api import ServingConfig, simulate
    from twin.profile import load_profile

    prof = with_terms(load_profile(PROFILE), terms)
    cfg = ServingConfig(
        max_loras=run["max_loras"],
        max_cpu_loras=run["max_cpu_loras"],
        max_lora_rank=run["max_lora_rank"],
        max_num_seqs=2048,
        max_num_batched_tokens=2048,
    )
    out = dict(run)
    est = prof.kv_estimate(cfg)
    out["twin_kv_tokens"] = est.kv_tokens
    out["twin_oom"] = not est.starts
    if run["status"] != "ok":
        return out
    t0 = time.perf_counter()
    trace, ctx = synthesize(
        adapters=run["max_cpu_loras"],
        rates=run["rates"],
        ranks=run["ranks"],
        duration_s=WINDOW_S,
        lengths="sharegpt",
        seed=_synth_seed(run["workload"], run["max_cpu_loras"], seed),
    )
    # The paper's servers registered every adapter at start-up (`--lora-modules`; its client
    # reads them from /v1/models), which reads each into the CPU cache and a GPU slot, as
    # the replay's /v1/load_lora_adapter does: the run starts with them loaded.
    ctx = dict(ctx, adapters_loaded=dict.fromkeys(ctx["adapters"]))
    res = simulate(trace, prof, cfg, trace_context=ctx, window_s=WINDOW_S, record_steps=True)
    s = res.summary
    # Sums over the simulated steps, for scripts/fit_sweep_terms.py: engine busy time,
    # tokens of LoRA batches (every request of these workloads has an adapter), and the
    # arrivals the engine took in.
    st = pl.from_arrow(res.steps)
    starts = st["t_s"].to_numpy()
    arrival = np.sort(trace["arrival_s"].to_numpy())
    out.update(
        busy_s=float(st["duration_s"].sum()),
        lora_tokens=float((st["prefill_tokens"].cast(pl.Float64) + st["decode_tokens"].cast(pl.Float64)).sum()),
        ingested=int(np.searchsorted(arrival, starts[-1], side="right")) if len(starts) else 0,
        prefill_reqs=float(st["prefill_reqs"].sum()),
        terms={
            **{f: prof.step_model.coef.get(f, 0.0) for f in SPLIT_FEATURES},
            "request_intake_s": prof.request_intake_s,
        },
    )
    out.update(
        twin_tok_s=float(s["throughput_tok_s"]),
        twin_itl_ms=float(s.get("mean_itl_ms") or float("nan")),
        twin_served_frac=float(s.get("served_frac") or float("nan")),
        twin_starved=bool(s.get("starved")),
        twin_arrivals=int(trace.height),
        twin_completed=int(s.get("completed", 0)),
        wall_s=time.perf_counter() - t0,
    )
    return out


def ape(pred: float, true: float) -> float:
    return abs(pred - true) / abs(true) if true else float("nan")


# max_loras bands the issue reports the saturated error by.
BANDS = (("<= 16", 0, 16), ("32-96", 17, 96), (">= 128", 97, 1 << 30))


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok" and "twin_tok_s" in r]
    tp = [ape(r["twin_tok_s"], r["real_tok_s"]) for r in ok]
    tp_signed = [(r["twin_tok_s"] - r["real_tok_s"]) / r["real_tok_s"] for r in ok]
    with_itl = [r for r in ok if r["real_itl_ms"] and not math.isnan(r["twin_itl_ms"])]
    itl = [ape(r["twin_itl_ms"], r["real_itl_ms"]) for r in with_itl]
    itl_signed = [(r["twin_itl_ms"] - r["real_itl_ms"]) / r["real_itl_ms"] for r in with_itl]
    agree = [r["twin_starved"] == r["real_starved"] for r in ok]
    oom_rows = [r for r in rows if r["status"] in ("ok", "OOM")]
    oom_agree = [r["twin_oom"] == (r["status"] == "OOM") for r in oom_rows]
    return {
        "runs": len(ok),
        "throughput_mape_pct": 100 * float(np.mean(tp)) if tp else float("nan"),
        "throughput_bias_pct": 100 * float(np.mean(tp_signed)) if tp else float("nan"),
        "throughput_max_ape_pct": 100 * float(np.max(tp)) if tp else float("nan"),
        "itl_mape_pct": 100 * float(np.mean(itl)) if itl else float("nan"),
        "itl_bias_pct": 100 * float(np.mean(itl_signed)) if itl else float("nan"),
        "verdict_agreement_pct": 100 * float(np.mean(agree)) if agree else float("nan"),
        "oom_runs": sum(r["status"] == "OOM" for r in oom_rows),
        "oom_agreement_pct": 100 * float(np.mean(oom_agree)) if oom_agree else float("nan"),
    }


def by_band(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Saturated (the real run starves) and unsaturated runs apart, each overall and by
    max_loras band."""
    ok = [r for r in rows if r["status"] == "ok" and "twin_tok_s" in r]
    out: dict[str, dict[str, Any]] = {}
    for part, sat in (("saturated", True), ("unsaturated", False)):
        sub = [r for r in ok if bool(r["real_starved"]) is sat]
        out[part] = summarise(sub)
        for label, lo, hi in BANDS:
            out[f"{part} max_loras {label}"] = summarise([r for r in sub if lo <= r["max_loras"] <= hi])
    return out


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "twin_tok_s" in r]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.8))
    for a, real, twin, label in (
        (ax[0], "real_tok_s", "twin_tok_s", "throughput (tok/s)"),
        (ax[1], "real_itl_ms", "twin_itl_ms", "mean ITL (ms)"),
    ):
        x = np.array([r[real] for r in ok], float)
        y = np.array([r[twin] for r in ok], float)
        c = ["tab:red" if r["real_starved"] else "tab:blue" for r in ok]
        a.scatter(x, y, s=10, c=c, alpha=0.7)
        lo, hi = np.nanmin([x.min(), y.min()]), np.nanmax([x.max(), y.max()])
        a.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        a.set_xlabel(f"real H100 {label}")
        a.set_ylabel(f"twin {label}")
        a.set_title(label + " (red: real run starves)")
    fig.suptitle(f"twin vs {len(ok)} real one-hour runs, Llama-3.1-8B on H100 ({PROFILE})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_md(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    total = summarise(rows)
    lines = [
        "# Twin accuracy against real H100 runs (Llama-3.1-8B config sweeps)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; wall time {meta['wall_s']:.0f} s with {meta['procs']} processes.  ",
        *(
            [
                "**Held-out check** (`--cv`): each workload is simulated with the sweep-fitted splits "
                f"of the fold that left that workload out (`{meta.get('cv_terms')}`), so no workload's own "
                "runs shaped its prediction. Everything else is the shipped profile.  "
            ]
            if meta.get("cv_terms")
            else [
                f"Shipped profile `{PROFILE}`: the splits are the ones fitted on all 9 workloads, so this "
                "table is in-sample for them; the held-out figures are in `twin_accuracy_cv.md`.  "
            ]
        ),
        "What was fitted on what (said plainly). From the calibration runs and the KV table only "
        "(scripts/fit_h100_profiles.py): memory, adapter loads, and every step-time coefficient "
        "except two splits. Those runs fix the LoRA cost per token only at max_loras 300 / "
        "max_lora_rank 8, and the per-request cost only in total; how the first splits into "
        "per-token, per-max_lora_rank and per-slot terms, and which share of the second is paid "
        "when a request arrives (the engine core takes in every arrival, admitted or not) rather "
        "than when it enters the batch, are 3 numbers fitted on these sweeps by "
        "scripts/fit_sweep_terms.py, leave-one-workload-out. The *form* of the step model was also "
        "revised after seeing these sweeps, more than once (history in the git log and in "
        "scripts/fit_h100_profiles.py): before the issue-6 revision the twin had 8.6% throughput MAPE and "
        "16.0% mean-ITL MAPE on all runs.  ",
        "Issue 11 revision, no new parameter: the twin loads adapters as vLLM's worker does (the batch's "
        "adapters in set order, so a new adapter can evict one of its own batch, loaded again in the same "
        "step; checked load for load against a real vLLM server), and the paper's servers start with every "
        "adapter registered. The shares were refitted for it (two iterations, leave-one-workload-out; slot "
        "share 0.82 -> 0.80). Before it, held out: 2.9% overall, saturated 4.4% (max_loras <= 16: 4.8%, "
        "signed +3.2%; 32-96: 4.3%, +0.3%; >= 128: 4.4%, +2.8%, worst 19.1%), mean ITL on saturated runs 8.0%, "
        "verdict 99.2%.  ",
        "What is left (not modelled): at max_loras 16 the real servers lose throughput as the arrival rate "
        "grows (3.2/1.6/0.025 req/s: 14.2k tok/s with 32 adapters, 10.9k with 384), and their mean ITL *falls* "
        "(120 -> 78 ms) with median ITL 0.01 ms: tokens reach the client in bundles, the API server's "
        "streaming lags behind the engine. The twin has no frontend, so it keeps the engine's throughput "
        "and ITL there (+11% to +20% with 320-384 adapters on the 3.2/1.6 workloads).  ",
        "Workloads generated with `tracekit.synth.synthesize(adapters=max_cpu_loras, rates, ranks, "
        "duration_s=3600, lengths=\"sharegpt\")`, one stream per (workload, served adapters); "
        "config max_num_seqs 2048, max_num_batched_tokens 2048, window 3600 s.  ",
        "Real verdict: starving when `served_frac_est < 0.9` (the data's estimate: offered req/s x "
        "~419 tokens); twin verdict: the twin's own served/offered on its trace.",
        "",
        "## Overall",
        "",
        "| runs | throughput MAPE | throughput bias | mean-ITL MAPE | starving verdict agrees | OOM predicted (of real OOM+ok runs) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {total['runs']} | {total['throughput_mape_pct']:.1f}% (target <= 5%) | {total['throughput_bias_pct']:+.1f}% | "
        f"{total['itl_mape_pct']:.1f}% (target <= 15%) | {total['verdict_agreement_pct']:.1f}% (target >= 90%) | "
        f"{total['oom_agreement_pct']:.1f}% agree ({total['oom_runs']} OOM runs) |",
        "",
        "Paper's own twin on its held-out runs: throughput MAPE 8.8%, mean ITL 18.1%.",
        "",
        "## Saturated runs apart, by max_loras band",
        "",
        "Saturated: the real run starves (served < 90% of offered). Signed error: twin minus real, "
        "over real (positive: the twin over-predicts).",
        "",
        "| subset | runs | throughput MAPE | signed | worst | mean-ITL MAPE | ITL signed | verdict agrees |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in by_band(rows).items():
        if not s["runs"]:
            continue
        lines.append(
            f"| {name} | {s['runs']} | {s['throughput_mape_pct']:.1f}% | {s['throughput_bias_pct']:+.1f}% | "
            f"{s['throughput_max_ape_pct']:.1f}% | {s['itl_mape_pct']:.1f}% | {s['itl_bias_pct']:+.1f}% | "
            f"{s['verdict_agreement_pct']:.0f}% |"
        )
    lines += [
        "",
        "## Per workload",
        "",
        "| workload (rates req/s; ranks) | runs | throughput MAPE | bias | mean-ITL MAPE | verdict agrees | real starving runs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for wl in sorted({r["workload"] for r in rows}):
        sub = [r for r in rows if r["workload"] == wl]
        s = summarise(sub)
        if not s["runs"]:
            continue
        n_starv = sum(bool(r.get("real_starved")) for r in sub if r["status"] == "ok")
        lines.append(
            f"| {wl} | {s['runs']} | {s['throughput_mape_pct']:.1f}% | {s['throughput_bias_pct']:+.1f}% | "
            f"{s['itl_mape_pct']:.1f}% | {s['verdict_agreement_pct']:.0f}% | {n_starv} |"
        )
    lines += [
        "",
        "Figure: `twin_accuracy.png` (twin vs real, throughput and mean ITL). Per-run rows: `twin_accuracy.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description="twin accuracy vs the paper's H100 config sweeps")
    ap.add_argument("--subset", type=int, default=0, help="only every k-th ok run (0 = all)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT / "twin_accuracy"))
    ap.add_argument("--from-json", action="store_true", help="only re-render the .md/.png from the saved .json")
    ap.add_argument(
        "--cv",
        metavar="TERMS_JSON",
        help="held-out check: simulate each workload with the sweep-fitted terms of the fold that left it out "
        "(the 'folds' of scripts/fit_sweep_terms.py's output), not the shipped profile's",
    )
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:
        saved = json.loads(out.with_suffix(".json").read_text())
        write_md(saved["runs"], saved["meta"], out.with_suffix(".md"))
        figure(saved["runs"], out.with_suffix(".png"))
        return

    runs = load_runs().with_columns(
        real_starved=(1 - pl.col("real_tok_s") / pl.col("real_ideal_tok_s")) >= STARVING
    )
    todo = runs.filter(pl.col("status").is_in(["ok", "OOM"])).to_dicts()
    if args.subset:
        ok = [r for r in todo if r["status"] == "ok"][:: args.subset]
        todo = ok + [r for r in todo if r["status"] == "OOM"]
    # Heaviest first, so the two processes finish together.
    todo.sort(key=lambda r: -(r["max_cpu_loras"] * sum(r["rates"])))
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    from rich.progress import Progress

    # spawn, not fork: polars' thread pool does not survive a fork (the children hang).
    with multiprocessing.get_context("spawn").Pool(args.procs) as pool, Progress() as bar:
        task = bar.add_task("simulating runs", total=len(todo))
        folds = json.loads(Path(args.cv).read_text())["folds"] if args.cv else {}
        jobs = [(r, args.seed, folds[r["workload"]] if args.cv else None) for r in todo]
        for row in pool.imap_unordered(simulate_run, jobs):
            rows.append(row)
            bar.advance(task)
    wall = time.perf_counter() - t0
    rows.sort(key=lambda r: (r["workload"], r["max_cpu_loras"], r["max_loras"]))
    meta = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU ({platform.processor() or platform.platform()})",
        "procs": args.procs,
        "wall_s": wall,
        "profile": PROFILE,
        "cv_terms": os.path.relpath(args.cv, ROOT) if args.cv else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    summary["bands"] = by_band(rows)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1, default=str) + "\n")
    write_md(rows, meta, out.with_suffix(".md"))
    figure(rows, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out.with_suffix('.md')} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
