"""Speed of a 16-GPU fleet hour in the twin (static placement), against its own GPUs run
one by one, and on Ray.

Trace: `tracekit synth` 2,000 adapters, Zipf popularity 1.0, gamma arrivals of CV 2,
ranks 8/16/32, one hour, ShareGPT lengths, 400 req/s in all (1.44 M requests). Plan:
`predictor recommend`'s split over 16 GPUs (its max_loras, the fleet's largest rank),
static placement. Profile h100-llama-3.1-8b.

Measured (whole `twin run` processes, medians of --repeats, interleaved):
- fleet, one process on one core: `taskset -c 0 twin run TRACE --fleet PLAN --jobs 1`;
- the sum of the 16 GPUs' single runs: each GPU's own trace file through
  `taskset -c 0 twin run` with that GPU's flags (the baseline the issue names);
- fleet on 2 local worker processes (`--jobs 2`) and on a local Ray cluster of 2 workers
  (`--executor ray --jobs 2`, Ray's start-up included; and on a local cluster of 2 CPUs
  started beforehand, `--ray-address`), all checked to write the same
  results file as the one-process run, bit for bit;
- peak memory (max RSS) of every process: the one-process run, and each worker as
  it reports itself.

Usage: .venv/bin/python benchmarks/fleet_speed.py [--repeats 2] [--rate 400]
Writes benchmarks/results/fleet_speed.{md,json}. Run under `flock /tmp/tracekit-heavy.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
PROFILE = "h100-llama-3.1-8b"
GPUS = 16


def machine() -> str:
    model = "unknown CPU"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return f"{os.cpu_count()}-core {model} ({simd}), {platform.machine()}, Python {platform.python_version()}"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall s, max RSS MiB of the process, stdout) of one command."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rss_kib = int(p.stderr.strip().splitlines()[-1])
    return wall, rss_kib / 1024, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rate", type=float, default=400.0)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from predictor.fleet import adapter_loads, recommend_answer, recommend_split
    from tracekit import schema
    from tracekit.parallel import SINGLE_THREAD_ENV
    from tracekit.synth import synthesize

    twin = str(BIN / "twin")
    one_core = ["taskset", "-c", "0"]
    with tempfile.TemporaryDirectory(prefix="fleet-speed-") as tmp:
        tmpd = Path(tmp)
        tr, ctx = synthesize(2000, None, [8, 16, 32], 3600.0, seed=0, total_rate=args.rate, popularity="zipf:1.0",
                             arrivals="gamma:2")
        trace = schema.write(tmpd / "trace.parquet", tr, "trace", ctx)
        rec = recommend_answer(trace, PROFILE)
        loads = adapter_loads(tr, 3600.0, schema.adapter_ranks(ctx))
        plan = recommend_split(dict(zip(loads["adapter"], loads["load"], strict=True)), GPUS, rec, PROFILE)
        assert len(plan.gpus) == GPUS, len(plan.gpus)
        plan_path = plan.save(tmpd / "plan.json")
        singles = []
        for g in plan.gpus:
            import polars as pl

            sub = tr.filter(pl.col("adapter").is_in(list(g.adapters)))
            sctx = dict(ctx, adapters={a: ctx["adapters"][a] for a in g.adapters})
            path = schema.write(tmpd / f"{g.name}.parquet", sub, "trace", sctx)
            flags = [x for k, v in g.settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
            singles.append((g.name, path, flags, sub.height))

        def fleet(out: str, extra: list[str], pin: bool) -> tuple[float, float, dict]:
            cmd = [*(one_core if pin else []), twin, "run", str(trace), "--profile", PROFILE, "--fleet", str(plan_path),
                   "--out", str(tmpd / out), "--json", *extra]
            wall, rss, stdout = timed(cmd)
            return wall, rss, json.loads(stdout)

        runs: dict[str, list[float]] = {"one_core": [], "singles_sum": [], "local2": [], "ray2": [], "ray2_up": []}
        rss: dict[str, list[float]] = {"one_core": [], "singles_max": [], "local2_workers": [], "ray2_workers": [],
                                       "local2_parent": [], "ray2_parent": []}
        # A local Ray cluster of 2 CPUs started beforehand (`--ray-address`: an existing
        # cluster, whose start-up is not the fleet run's), held by a driver process of
        # ours that shuts it down when its stdin closes.
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, ray; c = ray.init(num_cpus=2, include_dashboard=False, "
             "log_to_driver=False); print(c.address_info['gcs_address'], flush=True); sys.stdin.read(); ray.shutdown()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            # Started as `--executor ray` starts its own local cluster: single-threaded workers.
            env=dict(os.environ, RAY_AUTH_MODE="disabled", **SINGLE_THREAD_ENV))
        assert holder.stdout is not None
        ray_address = holder.stdout.readline().strip()
        sims: list[float] = []
        summary = {}
        for _ in range(args.repeats):
            w, r, s = fleet("one.parquet", ["--jobs", "1"], pin=True)
            runs["one_core"].append(w)
            rss["one_core"].append(r)
            sims.append(sum(g["twin_wall_s"] for g in s["gpus"]))
            summary = s
            tot, peak = 0.0, 0.0
            for _name, path, flags, _n in singles:
                w, r, _ = timed([*one_core, twin, "run", str(path), "--profile", PROFILE, *flags,
                                 "--out", str(tmpd / "single.parquet"), "--json"])
                tot += w
                peak = max(peak, r)
            runs["singles_sum"].append(tot)
            rss["singles_max"].append(peak)
            w, r, s2 = fleet("local2.parquet", ["--jobs", "2"], pin=False)
            runs["local2"].append(w)
            rss["local2_parent"].append(r)
            rss["local2_workers"].append(max(g["peak_rss_mib"] for g in s2["gpus"]))
            w, r, s3 = fleet("ray2.parquet", ["--executor", "ray", "--jobs", "2"], pin=False)
            runs["ray2"].append(w)
            rss["ray2_parent"].append(r)
            rss["ray2_workers"].append(max(g["peak_rss_mib"] for g in s3["gpus"]))
            w, _r, _s4 = fleet("ray2_up.parquet", ["--executor", "ray", "--jobs", "2", "--ray-address", ray_address],
                               pin=False)
            runs["ray2_up"].append(w)
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=120)
        one = pq.read_table(tmpd / "one.parquet")
        same_local = one.equals(pq.read_table(tmpd / "local2.parquet"))
        same_ray = one.equals(pq.read_table(tmpd / "ray2.parquet"))
        same_ray_up = one.equals(pq.read_table(tmpd / "ray2_up.parquet"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    peak = {k: max(v) for k, v in rss.items()}
    out = {
        "machine": machine(), "load_avg_end": os.getloadavg(),
        "command": "flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/fleet_speed.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rate_req_s": args.rate, "requests": tr.height,
        "gpus": GPUS, "walls": runs, "median_s": med, "peak_rss_mib": peak,
        "ratio_one_core_vs_singles": med["one_core"] / med["singles_sum"],
        "ratio_one_core_vs_in_process_sims": med["one_core"] / statistics.median(sims),
        "in_process_sims_s": statistics.median(sims),
        "ray2_speedup_vs_one_process": med["one_core"] / med["ray2"],
        "ray2_running_speedup_vs_one_process": med["one_core"] / med["ray2_up"], "same_results_ray2_running": same_ray_up,
        "local2_speedup_vs_one_process": med["one_core"] / med["local2"],
        "same_results_local2": same_local, "same_results_ray2": same_ray,
        "fleet": {k: summary["fleet"].get(k) for k in ("throughput_tok_s", "served_frac", "starving_adapters", "p99_ttft_ms")},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet_speed.json").write_text(json.dumps(out, indent=2, default=str))
    ok = lambda b: "met" if b else "missed"  # noqa: E731
    lines = [
        "# Fleet twin speed: a 16-GPU hour, static placement",
        "",
        f"Machine: {out['machine']}; load average at the end {out['load_avg_end'][0]:.1f} (shared with other jobs; "
        f"wall times are medians of {args.repeats} interleaved runs). Command: `{out['command']}` ({out['when']}).",
        f"Trace: 2,000 adapters, Zipf 1.0, gamma CV 2, ranks 8/16/32, one hour at {args.rate:g} req/s "
        f"({tr.height:,} requests); plan: recommend's split over {GPUS} GPUs (static placement); profile {PROFILE}.",
        "",
        "| run | wall s (median) | peak RSS per process MiB | goal |",
        "|---|---:|---:|---|",
        f"| fleet, one process, one core (`taskset -c 0 ... --jobs 1`) | {med['one_core']:.1f} | {peak['one_core']:,.0f} | "
        f"<= 1.5x the singles: {out['ratio_one_core_vs_singles']:.2f}x {ok(out['ratio_one_core_vs_singles'] <= 1.5)}; "
        f"<= 2 GiB {ok(peak['one_core'] <= 2048)} |",
        f"| the 16 GPUs' single `twin run`s, one core, summed | {med['singles_sum']:.1f} | {peak['singles_max']:,.0f} | baseline |",
        f"| fleet, 2 local worker processes (`--jobs 2`) | {med['local2']:.1f} | {peak['local2_parent']:,.0f} parent, "
        f"{peak['local2_workers']:,.0f} worker | same results: {same_local} |",
        f"| fleet, local Ray cluster of 2 workers (`--executor ray --jobs 2`, Ray start included) | {med['ray2']:.1f} | "
        f"{peak['ray2_parent']:,.0f} parent, {peak['ray2_workers']:,.0f} worker | faster than one process: "
        f"{out['ray2_speedup_vs_one_process']:.2f}x {ok(out['ray2_speedup_vs_one_process'] > 1)}; same results: {same_ray} |",
        f"| fleet, the same on a local Ray cluster of 2 CPUs already running (`--ray-address`) | {med['ray2_up']:.1f} | | "
        f"faster than one process: {out['ray2_running_speedup_vs_one_process']:.2f}x "
        f"{ok(out['ray2_running_speedup_vs_one_process'] > 1)}; same results: {same_ray_up} |",
        "",
        f"The one-process fleet spends {out['in_process_sims_s']:.1f} s in the 16 GPUs' simulations; the rest is reading "
        "the trace once, splitting it, merging and summarising (per GPU and per adapter), and writing one results file. "
        "The singles pay interpreter start-up, imports and Parquet I/O 16 times. With workers, this process "
        "simulates GPUs itself while they (or Ray) start, and they take the rest once one is up.",
        f"Fleet in the twin: {out['fleet']}.",
    ]
    (RESULTS / "fleet_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
