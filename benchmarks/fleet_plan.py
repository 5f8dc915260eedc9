"""Planning a fleet: `predictor plan` on 2,000 adapters, against today's `predictor
recommend` plan, both checked in the twin.

Traces: `tracekit synth --adapters 2000 --total-rate R --popularity zipf:1.0 --arrivals
gamma:2 --ranks 8,16,32 --duration 3600` (ShareGPT lengths, seed 0), for each R in
--rates. Profile h100-llama-3.1-8b.

For each trace:
- `predictor plan` as a whole process (its wall time is the planning time), its GPU
  count, and its twin verdict (starving adapters: served < 90% of offered, judged on the
  requests that arrived before the window's last 5%);
- today's `predictor recommend` plan and its verdict in the twin (the planner checks it);
- today's way made to pass: recommend's split (`predictor.plan.split_fleet`, every GPU
  at the fleet's largest rank) with one more GPU at a time until the twin finds no
  starving adapter, so that both counts are of plans that do not starve.

With `--baseline-source`, each `predictor plan` is followed by the same run on the
twin's source (TWIN_PURE_PYTHON=1, not its compiled step loop), `--repeats` times
interleaved: medians of each.

Usage: .venv/bin/python benchmarks/fleet_plan.py [--rates 100,200] [--jobs 2] [--repeats 1] [--baseline-source]
Writes benchmarks/results/fleet_plan.{md,json}. Run under `flock /tmp/tracekit-heavy.lock`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
PROFILE = "h100-llama-3.1-8b"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="100,200")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-extra", type=int, default=8, help="GPUs added to today's split at most")
    ap.add_argument("--seed", type=int, default=0, help="synth seed (another one: a held-out trace)")
    ap.add_argument("--adapters", type=int, default=2000)
    ap.add_argument("--name", default="fleet_plan", help="results file stem (e.g. fleet_plan_heldout)")
    ap.add_argument("--repeats", type=int, default=1, help="plan runs per trace (the median is reported)")
    ap.add_argument("--baseline-source", action="store_true",
                    help="also run each plan on the twin's source (TWIN_PURE_PYTHON=1), interleaved")
    args = ap.parse_args()
    os.environ.pop("TWIN_PURE_PYTHON", None)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from fleet_speed import machine

    import twin
    from predictor.fleet import TwinCheck, adapter_loads, recommend_answer, recommend_split
    from tracekit import parallel, schema
    from tracekit.synth import synthesize
    from twin.profile import load_profile

    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-plan-") as tmp:
        for rate in [float(x) for x in args.rates.split(",")]:
            tr, ctx = synthesize(args.adapters, None, [8, 16, 32], 3600.0, seed=args.seed, total_rate=rate,
                                 popularity="zipf:1.0",
                                 arrivals="gamma:2")
            trace = schema.write(Path(tmp) / f"trace{rate:g}.parquet", tr, "trace", ctx)
            out = Path(tmp) / f"plan{rate:g}.json"
            walls: dict[bool, list[float]] = {False: [], True: []}  # pure -> walls
            answers: dict[bool, dict] = {}
            for _ in range(args.repeats):
                for pure in (False, True) if args.baseline_source else (False,):
                    env = dict(os.environ, TWIN_PURE_PYTHON="1") if pure else None
                    t0 = time.perf_counter()
                    p = subprocess.run([str(BIN / "predictor"), "plan", str(trace), "--profile", PROFILE, "--out",
                                        str(out), "--json", "--jobs", str(args.jobs)], capture_output=True, text=True,
                                       cwd=ROOT, env=env)  # fmt: skip
                    walls[pure].append(time.perf_counter() - t0)
                    if p.returncode != 0:
                        raise SystemExit(f"predictor plan failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
                    answers[pure] = json.loads(p.stdout)
            d = answers[False]
            wall = statistics.median(walls[False])
            same = not args.baseline_source or (answers[True]["plan"]["gpus"] == d["plan"]["gpus"]
                                                and answers[True]["search"] == d["search"])
            # Today's way with more GPUs until the twin passes it (not part of the planning time).
            rec = recommend_answer(trace, PROFILE)
            loads = adapter_loads(tr, 3600.0, schema.adapter_ranks(ctx))
            load_of = dict(zip(loads["adapter"], loads["load"], strict=True))
            today_ok = None
            tries = []
            t1 = time.perf_counter()
            with parallel.Pool("local", args.jobs) as pool, \
                    contextlib.closing(TwinCheck(tr, dict(ctx), load_profile(PROFILE), None, pool)) as check:
                for g in range(d["today_gpus"] + 1, d["today_gpus"] + 1 + args.max_extra):
                    v = check.run(recommend_split(load_of, g, rec, PROFILE))
                    tries.append({"gpus": v["gpus"], "starving_adapters": v["starving_adapters"], "ok": v["ok"]})
                    if v["ok"]:
                        today_ok = v["gpus"]
                        break
            rows.append({
                "rate_req_s": rate, "requests": tr.height, "offered_tok_s": d["plan"]["meta"]["offered_tok_s"],
                "plan_wall_s": wall, "plan_walls": walls[False], "plan_in_process_s": d["elapsed_s"],
                "source_walls": walls[True] or None,
                "source_wall_s": statistics.median(walls[True]) if walls[True] else None,
                "source_same_answer": same if args.baseline_source else None, "plan_gpus": d["gpus"], "plan_ok": d["ok"],
                "plan_packing": d["plan"]["meta"].get("packing"),
                "plan_max_loras": sorted({g["max_loras"] for g in d["plan"]["gpus"]}),
                "plan_fewest": d["plan"]["meta"].get("fewest"),
                "plan_starving": d["verdict"]["starving_adapters"], "plan_p99_ttft_s": (d["verdict"]["p99_ttft_ms"] or 0) / 1e3,
                "today_gpus": d["today_gpus"], "today_starving": d["today_verdict"]["starving_adapters"],
                "today_worst_served": d["today_verdict"]["min_adapter_served_frac"],
                "today_split_passing_gpus": today_ok, "today_split_tries": tries,
                "today_split_check_s": time.perf_counter() - t1, "search": d["search"], "summary": d["summary"],
                "twin_plan_runs": d["twin_plan_runs"], "twin_gpu_runs": d.get("twin_gpu_runs"),
                # The twin time the answer needs at the least: every GPU of the plan and of
                # today's plan run once (CPU seconds, and on --jobs workers).
                "full_checks_cpu_s": sum(g.get("twin_wall_s") or 0.0 for v in (d["verdict"], d["today_verdict"])
                                         for g in v["per_gpu"]),
                "search_evaluations": len(d["search"]),
            })
            rows[-1]["full_checks_wall_bound_s"] = rows[-1]["full_checks_cpu_s"] / args.jobs
    res = {"machine": machine(), "twin": twin.NATIVE, "load_avg_end": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/fleet_plan.py " + " ".join(sys.argv[1:]),
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=2, default=str))
    lines = [
        f"# Planning a fleet: `predictor plan` on {args.adapters:,} adapters vs today's `predictor recommend`",
        "",
        f"Machine: {res['machine']}; twin step loop: {res['twin']}; load average at the end {res['load_avg_end'][0]:.1f} "
        f"(shared with other jobs); plan time: median of {args.repeats}. "
        f"Command: `{res['command']}` ({res['when']}).",
        f"Traces: `tracekit synth --adapters {args.adapters} --total-rate R --popularity zipf:1.0 --arrivals gamma:2 "
        f"--ranks 8,16,32 --duration 3600 --seed {args.seed}`; profile h100-llama-3.1-8b. Starving adapter: served < 90% of offered in the twin, "
        "judged on requests that arrived before the window's last 5% (or the time the trace's longest answer takes at the mean ITL of the GPU serving it, if longer).",
        "",
        "| R req/s | requests | plan: wall s (goal <= 10) | plan: GPUs (packing, max_loras) | plan: starving adapters | "
        "today's recommend: GPUs | today's: starving adapters (worst served) | today's split (recommend's max_loras), "
        "fewest GPUs with none starving |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rate_req_s']:g} | {r['requests']:,} | {r['plan_wall_s']:.1f} | {r['plan_gpus']} ({r['plan_packing']}, "
            f"{'/'.join(map(str, r['plan_max_loras']))}) | "
            f"{r['plan_starving']} | {r['today_gpus']} | {r['today_starving']} ({r['today_worst_served']:.0%}) | "
            f"{r['today_split_passing_gpus'] or 'none up to ' + str(r['today_gpus'] + args.max_extra)} |")
    for r in rows:
        if r["source_walls"]:
            lines += ["", f"R = {r['rate_req_s']:g} on the twin's source (TWIN_PURE_PYTHON=1), interleaved: "
                      f"{r['source_wall_s']:.1f} s (runs {', '.join(f'{w:.1f}' for w in r['source_walls'])}) against "
                      f"{r['plan_wall_s']:.1f} s compiled (runs {', '.join(f'{w:.1f}' for w in r['plan_walls'])}): "
                      f"{r['source_wall_s'] / r['plan_wall_s']:.2f}x; same plan and search: "
                      f"{'yes' if r['source_same_answer'] else 'NO'}."]
    lines += ["", "Where the planning time goes: the two full checks the answer needs (every GPU of the plan and of "
              "today's plan, each run once) take, in the twin:", ""]
    lines += [f"- R = {r['rate_req_s']:g}: {r['full_checks_cpu_s']:.1f} CPU-s, {r['full_checks_wall_bound_s']:.1f} s on "
              f"{args.jobs} workers at best; the search judged {r['search_evaluations']} candidates (today's plan included) "
              f"with {r['twin_gpu_runs']} single-GPU twin runs in all"
              for r in rows]
    lines += ["", "What the planner said:", ""] + [f"- R = {r['rate_req_s']:g}: {r['summary']}" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
