"""Speed of `twin run`: the whole process (interpreter start, Parquet in and out
included), fast-forward on vs the plain step-by-step loop of the same engine
(`--no-fast-forward`, bit-identical results) as the baseline, in the same run.

Cases (one simulated hour each, synthetic traces from `tracekit.synth`, ShareGPT lengths):
- heavy: the issue's case: 384 adapters, rates 1.6/0.8/0.4 req/s, ranks 8/16,
  max_loras 64, max_cpu_loras 384, max_num_seqs 2048, max_num_batched_tokens 2048;
  the server saturates and the waiting queue grows to about a million requests.
- moderate: 96 adapters at 0.1/0.05/0.025 req/s (not starving, max_loras 32).
- sparse: 8 adapters, 0.05 req/s each: long decode-only stretches between arrivals,
  where fast-forward does the most.

Usage: .venv/bin/python benchmarks/twin_speed.py [--repeats 3] [--cases heavy,moderate,sparse]
Writes benchmarks/results/twin_speed.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TWIN = [str(Path(sys.executable).parent / "twin")]  # the console script of this environment
PROFILE = "h100-llama-3.1-8b"

CASES = {
    "heavy": {"adapters": 384, "rates": [1.6, 0.8, 0.4], "ranks": [8, 16],
              "flags": ["--max-loras", "64", "--max-cpu-loras", "384"]},
    "moderate": {"adapters": 96, "rates": [0.1, 0.05, 0.025], "ranks": [8, 16],
                 "flags": ["--max-loras", "32", "--max-cpu-loras", "96"]},
    "sparse": {"adapters": 8, "rates": [0.05], "ranks": [8, 16],
               "flags": ["--max-loras", "8", "--max-cpu-loras", "8"]},
}
COMMON = ["--max-num-seqs", "2048", "--max-num-batched-tokens", "2048"]


def run_once(trace: Path, out_dir: Path, flags: list[str], fast: bool) -> tuple[float, dict]:
    cmd = [*TWIN, "run", str(trace), "--profile", PROFILE, *flags, *COMMON,
           "--out", str(out_dir / "results.parquet"), "--json"]
    if not fast:
        cmd.append("--no-fast-forward")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"twin run failed: {proc.stderr.strip()}")
    summary = json.loads(proc.stdout)
    # CPU seconds of the process: what the wall time would be on an idle machine (the
    # work is single-threaded apart from short pyarrow/polars bursts), much less
    # sensitive than wall time to the other jobs sharing the 2 cores.
    summary["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, summary


def phases(case: dict) -> dict[str, float]:
    """Where the time of one `twin run` goes, measured in this process (heavy case)."""
    from tracekit import schema
    from twin import engine
    from twin.api import ServingConfig
    from twin.engine import simulate

    # CPU time of this process per phase (steadier than wall time on a shared machine).
    clock = time.process_time
    t0 = clock()
    tr, meta = schema.read_trace(case["trace"])
    t1 = clock()
    cfg = ServingConfig(max_loras=64, max_cpu_loras=384, max_lora_rank=16, max_num_seqs=2048, max_num_batched_tokens=2048)
    run = engine._Loop.run
    loop_cpu: list[float] = []

    def timed_run(self: engine._Loop, fast_forward: bool) -> None:
        start = clock()
        run(self, fast_forward)
        loop_cpu.append(clock() - start)

    engine._Loop.run = timed_run  # type: ignore[method-assign]
    try:
        res = simulate(tr, PROFILE, cfg, trace_context=meta.context)
    finally:
        engine._Loop.run = run  # type: ignore[method-assign]
    t2 = clock()
    schema.write(Path(case["out"]), res.results, "results", res.context)
    t3 = clock()
    loop = loop_cpu[0]
    return {"read_trace_s": t1 - t0, "engine_loop_s": loop, "simulate_rest_s": t2 - t1 - loop, "write_results_s": t3 - t2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tracekit import schema
    from tracekit.synth import synthesize

    rows = []
    tmp_heavy: dict | None = None
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        for name in args.cases.split(","):
            case = CASES[name]
            tr, ctx = synthesize(case["adapters"], case["rates"], case["ranks"], 3600.0, lengths="sharegpt", seed=0)
            trace = schema.write(tmpdir / f"{name}.parquet", tr, "trace", ctx)
            walls: dict[bool, list[float]] = {True: [], False: []}
            cpus: dict[bool, list[float]] = {True: [], False: []}
            loops: dict[bool, list[float]] = {True: [], False: []}
            summary: dict[bool, dict] = {}
            for _ in range(args.repeats):
                # Interleaved, so load from other processes hits both alike.
                for fast in (True, False):
                    wall, summ = run_once(trace, tmpdir, case["flags"], fast)
                    walls[fast].append(wall)
                    loops[fast].append(summ["engine_loop_s"])
                    cpus[fast].append(summ["cpu_s"])
                    summary[fast] = summ
            s = summary[True]
            same = {k: summary[False][k] for k in ("completed", "steps", "preemptions", "throughput_tok_s")} == {
                k: s[k] for k in ("completed", "steps", "preemptions", "throughput_tok_s")}
            ff, base = statistics.median(walls[True]), statistics.median(walls[False])
            rows.append({
                "case": name, "arrivals": tr.height, "completed": s["completed"], "steps": s["steps"],
                "fast_forward_steps": s["fast_forward_steps"], "preemptions": s["preemptions"],
                "starved": s["starved"], "wall_s_fast_forward": ff, "wall_s_plain": base,
                "walls_fast_forward": walls[True], "walls_plain": walls[False],
                "speedup": base / ff,
                "cpu_s_fast_forward": statistics.median(cpus[True]), "cpu_s_plain": statistics.median(cpus[False]),
                "loop_s_fast_forward": statistics.median(loops[True]), "loop_s_plain": statistics.median(loops[False]),
                "loop_speedup": statistics.median(loops[False]) / statistics.median(loops[True]), "arrivals_per_s": tr.height / ff,
                "completions_per_s": s["completed"] / ff, "steps_per_s": s["steps"] / ff,
                "same_results": same,
            })
            print(json.dumps(rows[-1]))
            if name == "heavy":
                tmp_heavy = {"trace": trace, "out": tmpdir / "phases.parquet"}
        breakdown = phases(tmp_heavy) if tmp_heavy else None
    machine = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), Python {platform.python_version()}"
    load = "load average at the end {:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(*os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine, "command": f".venv/bin/python benchmarks/twin_speed.py --repeats {args.repeats} --cases {args.cases}",
            "profile": PROFILE, "load": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / "twin_speed.json").write_text(json.dumps({"meta": meta, "rows": rows, "heavy_phases": breakdown}, indent=2) + "\n")
    lines = [
        "# twin speed: `twin run`, whole process (Parquet in and out included)",
        "",
        f"Machine: {machine}; {load} (shared with other jobs: timings are noisy; medians of {args.repeats} "
        "interleaved runs). Baseline: the same engine with `--no-fast-forward` (plain step loop, "
        "bit-identical results), measured in the same run.",
        f"Profile `{PROFILE}`; `--max-num-seqs 2048 --max-num-batched-tokens 2048`; one simulated hour.",
        f"Command: `{meta['command']}` ({meta['date']}).",
        "",
        "| case | arrivals | completed | steps | fast-forwarded steps | wall s (ff / plain) | CPU s of the process (ff / plain) | speedup (wall) | engine loop s (ff / plain) | loop speedup | arrivals/s | completions/s | steps/s | same results |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['arrivals']:,} | {r['completed']:,} | {r['steps']:,} | "
            f"{r['fast_forward_steps']:,} ({r['fast_forward_steps'] / max(r['steps'], 1):.0%}) | "
            f"{r['wall_s_fast_forward']:.2f} / {r['wall_s_plain']:.2f} | {r['cpu_s_fast_forward']:.2f} / {r['cpu_s_plain']:.2f} | {r['speedup']:.2f}x | "
            f"{r['loop_s_fast_forward']:.2f} / {r['loop_s_plain']:.2f} | {r['loop_speedup']:.2f}x | "
            f"{r['arrivals_per_s']:,.0f} | {r['completions_per_s']:,.0f} | {r['steps_per_s']:,.0f} | "
            f"{'yes' if r['same_results'] else 'NO'} |"
        )
    if breakdown:
        lines += ["", "Where the heavy case's time goes (CPU seconds, one run in the benchmark's own process, so "
                  "without interpreter start and imports, about 0.5 s): "
                  + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f} s" for k, v in breakdown.items()) + "."]
    lines += [
        "",
        "Rates are per second of wall time of the whole `twin run` process (the figures the issue asks",
        "for); CPU s is the same process's user + system CPU time, a steadier figure on a shared machine. The paper's twin took 67.5 s on the heavy case on this kind of machine; Vidur about",
        "1,000 requests/s.",
    ]
    (RESULTS / "twin_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
