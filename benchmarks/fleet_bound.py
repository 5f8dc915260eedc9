"""What binds a fleet GPU at the planning benchmark's loads: compute (the token budget),
KV cache (preemptions) or LoRA slots (requests waiting for one of max_loras slots)?

Trace: as benchmarks/fleet_plan.py (2,000 adapters, Zipf 1.0, gamma CV 2, ranks
8/16/32, one hour, seed 0) at --rate. Plan: recommend's split over --gpus GPUs (every GPU
at the fleet's largest rank), run in the fleet twin at each max_loras of --max-loras.
Per run, the fleet's worst GPU figures: tokens per engine step against the step's token
budget (max_num_batched_tokens), preemptions (the KV cache ran out), adapter loads into
GPU slots, p99 TTFT and starving adapters.

Usage: .venv/bin/python benchmarks/fleet_bound.py [--rate 100] [--gpus 6] [--max-loras 32,64,96]
Writes benchmarks/results/fleet_bound.{md,json}. Run under `flock /tmp/tracekit-heavy.lock`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PROFILE = "h100-llama-3.1-8b"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--gpus", type=int, default=6)
    ap.add_argument("--max-loras", default="32,64,96")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from fleet_speed import machine

    from predictor.fleet import TwinCheck, adapter_loads, recommend_answer, recommend_split
    from tracekit import parallel, schema
    from tracekit.synth import synthesize
    from twin.fleet_plan import FleetPlan
    from twin.profile import load_profile

    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-bound-") as tmp:
        tr, ctx = synthesize(2000, None, [8, 16, 32], 3600.0, seed=0, total_rate=args.rate, popularity="zipf:1.0",
                             arrivals="gamma:2")
        path = schema.write(Path(tmp) / "trace.parquet", tr, "trace", ctx)
        rec = recommend_answer(path, PROFILE)
        loads = adapter_loads(tr, 3600.0, schema.adapter_ranks(ctx))
        load_of = dict(zip(loads["adapter"], loads["load"], strict=True))
        base = recommend_split(load_of, args.gpus, rec, PROFILE)
        budget = int(rec["serving"]["max_num_batched_tokens"])
        with parallel.Pool("local", args.jobs) as pool, \
                contextlib.closing(TwinCheck(tr, dict(ctx), load_profile(PROFILE), None, pool)) as check:
            for ml in [int(x) for x in args.max_loras.split(",")]:
                gpus = tuple(dataclasses.replace(g, settings={**g.settings, "max_loras": min(ml, len(g.adapters))})
                             for g in base.gpus)
                t0 = time.perf_counter()
                v = check.run(FleetPlan(gpus=gpus, profile=PROFILE, router="placement"))
                per = v["per_gpu"]
                tok_step = [g["throughput_tok_s"] * (g.get("window_s") or 3600.0) / max(1, g.get("steps") or 1)
                            for g in per]
                rows.append({
                    "max_loras": ml, "kv_capacity_tokens": per[0]["kv_capacity_tokens"], "ok": v["ok"],
                    "starving_adapters": v["starving_adapters"], "worst_served": v["min_adapter_served_frac"],
                    "p99_ttft_s": (v["p99_ttft_ms"] or 0.0) / 1e3,
                    "max_tokens_per_step": max(tok_step), "budget": budget,
                    "max_preemptions": max(g.get("preemptions") or 0 for g in per),
                    "max_adapter_loads_per_s": max((g.get("adapter_loads") or 0) / 3600.0 for g in per),
                    "offered_tok_s_per_gpu": max(g["offered_tok_s"] for g in per),
                    "served_tok_s_per_gpu": max(g["throughput_tok_s"] for g in per),
                    "wall_s": time.perf_counter() - t0,
                })
    res = {"machine": machine(), "load_avg_end": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/fleet_bound.py " + " ".join(sys.argv[1:]),
           "rate": args.rate, "gpus": args.gpus, "adapters_per_gpu": len(base.gpus[0].adapters), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet_bound.json").write_text(json.dumps(res, indent=2, default=str))
    lines = [
        "# What binds a fleet GPU: compute, KV cache or LoRA slots",
        "",
        f"Machine: {res['machine']}; load average at the end {res['load_avg_end'][0]:.1f}. Command: `{res['command']}` "
        f"({res['when']}).",
        f"Trace: 2,000 adapters, Zipf 1.0, gamma CV 2, ranks 8/16/32, one hour at {args.rate:g} req/s, seed 0. Plan: "
        f"recommend's split over {args.gpus} GPUs ({res['adapters_per_gpu']} adapters each, max_lora_rank 32), "
        "at each max_loras; profile h100-llama-3.1-8b. Per run, the largest value over the GPUs.",
        "",
        "| max_loras | KV tokens | tokens per step (budget) | preemptions | adapter loads / s | offered / served tok/s per GPU "
        "| p99 TTFT s | starving adapters (worst served) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['max_loras']} | {r['kv_capacity_tokens']:,} | {r['max_tokens_per_step']:,.0f} ({r['budget']:,}) | "
            f"{r['max_preemptions']:,} | {r['max_adapter_loads_per_s']:.1f} | {r['offered_tok_s_per_gpu']:,.0f} / "
            f"{r['served_tok_s_per_gpu']:,.0f} | {r['p99_ttft_s']:,.1f} | {r['starving_adapters']} ({r['worst_served']:.1%}) |")
    def bound(r: dict) -> str:
        if r["max_preemptions"] > 0:
            return "the KV cache (requests preempted)"
        if r["max_tokens_per_step"] >= 0.9 * r["budget"]:
            return "compute (steps near their token budget)"
        return "LoRA slots (steps well under their token budget, no preemption: requests wait for a slot)"

    lines += ["", "What binds, by these figures:", ""]
    lines += [f"- max_loras {r['max_loras']}: {bound(r)}" for r in rows]
    (RESULTS / "fleet_bound.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
