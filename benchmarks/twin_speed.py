"""Speed of `twin run`: the whole process (interpreter start, Parquet in and out
included), fast-forward on vs the plain step-by-step loop of the same engine
(`--no-fast-forward`, bit-identical results) as the baseline, in the same run.

Cases (one simulated hour each; synthetic traces from `tracekit.synth`, ShareGPT lengths,
except `mooncake`):
- heavy: the issue's case: 384 adapters, rates 1.6/0.8/0.4 req/s, ranks 8/16,
  max_loras 64, max_cpu_loras 384, max_num_seqs 2048, max_num_batched_tokens 2048;
  the server saturates and the waiting queue grows to about a million requests.
- moderate: 96 adapters at 0.1/0.05/0.025 req/s (not starving, max_loras 32).
- sparse: 8 adapters, 0.05 req/s each: long decode-only stretches between arrivals,
  where fast-forward does the most.
- mooncake: prefix caching on, from `prefix_hashes`: about a million requests of
  Mooncake-like chats (`mooncake_like`: 512-token hash blocks, shared system prompts,
  multi-turn sessions whose prompts grow, 7k-token prompts on average) over 384 adapters,
  max_loras 64.

Every case runs with the profile's server defaults (the paper's: prefix caching, full-
prompt admission and async scheduling off) except where its flags say otherwise. Peak
memory is the `twin run` process's own maximum resident set (GNU time's %M; a child forked from
this process would report this process's size as its own).

Usage: .venv/bin/python benchmarks/twin_speed.py [--repeats 3] [--cases heavy,moderate,sparse,mooncake] [--baseline DIR]
Writes benchmarks/results/twin_speed.md and .json (`--name`: another stem, e.g. for a
before/after against another checkout).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

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
    "mooncake": {"adapters": 384, "requests": 1_050_000, "ranks": [8, 16],
                 "flags": ["--max-loras", "64", "--max-cpu-loras", "384", "--enable-prefix-caching"]},
}
COMMON = ["--max-num-seqs", "2048", "--max-num-batched-tokens", "2048"]
BASELINE_CASES = ("heavy", "mooncake")  # the cases `--baseline` runs too
SOURCE = "source"  # `--baseline source`: this checkout's twin run as pure Python
TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None  # GNU time (`-f %M`), for peak memory


def run_once(trace: Path, out_dir: Path, flags: list[str], fast: bool, checkout: str | None = None) -> tuple[float, dict]:
    """One `twin run` process, writing `out_dir`/results.parquet (base.parquet for a
    baseline); `checkout`: run another source tree's twin instead (a baseline such as
    main, with this environment's packages), or `source`: this checkout's twin as pure
    Python (TWIN_PURE_PYTHON=1, not its compiled step loop)."""
    env = {k: v for k, v in os.environ.items() if k != "TWIN_PURE_PYTHON"}
    if checkout in (None, SOURCE):
        twin = TWIN
        if checkout == SOURCE:
            env["TWIN_PURE_PYTHON"] = "1"
    else:
        twin = [sys.executable, "-c", f"import sys; sys.path.insert(0, {checkout!r}); sys.argv = ['twin'] + sys.argv[1:]; "
                "from twin.cli import main; main()"]  # fmt: skip
    cmd = [*twin, "run", str(trace), "--profile", PROFILE, *flags, *COMMON,
           "--out", str(out_dir / ("results.parquet" if checkout is None else "base.parquet")), "--json"]
    if not fast:
        cmd.append("--no-fast-forward")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as peak:  # fmt: skip
        # Peak memory through GNU time, which forks the run from its own small process: a
        # child forked from this one (a gigabyte after making the Mooncake trace) would
        # report this process's resident set as its own peak (Linux keeps the high-water
        # mark across exec). CPU: wait4 on time, its child included (time's own is ~1 ms).
        launch = [TIME, "-f", "%M", "-o", peak.name] if TIME else []
        t0 = time.perf_counter()
        proc = subprocess.Popen([*launch, *cmd], stdout=out, stderr=err, text=True, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time (and peak memory without time)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"twin run failed: {err.read().strip()}")
        summary = json.loads(out.read())
        summary["peak_rss_gib"] = (int(peak.read().split()[-1]) if TIME else usage.ru_maxrss) / 2**20
    # CPU seconds of the process: what the wall time would be on an idle machine (the
    # work is single-threaded apart from short pyarrow/polars bursts), much less
    # sensitive than wall time to the other jobs sharing the 2 cores.
    summary["cpu_s"] = usage.ru_utime + usage.ru_stime
    return wall, summary


# Summary entries that are timings, not results.
TIMINGS = ("wall_s", "engine_loop_s", "cpu_s", "peak_rss_gib")


def differences(a: Path, sa: dict, b: Path, sb: dict) -> list[str]:
    """What differs between two runs' outputs: the results files (schema, every value,
    the context but its creation time) and the summaries (every entry but timings);
    [] when they are the same."""
    ta, tb = pq.read_table(a), pq.read_table(b)
    out = [] if ta.schema.remove_metadata().equals(tb.schema.remove_metadata()) else ["results schema"]
    if not out and not ta.equals(tb):
        out.append("results values")

    def ctx(t: pa.Table) -> dict:
        return {k: v for k, v in json.loads(t.schema.metadata[b"tracekit.context"]).items() if k != "created_at"}

    if ctx(ta) != ctx(tb):
        out.append("results context")
    keys = [k for k in sa if k not in TIMINGS]
    if keys != [k for k in sb if k not in TIMINGS]:
        out.append("summary entries")
    out += [f"summary {k}" for k in keys if k in sb and sa[k] != sb[k]]
    return out


def mooncake_like(n: int, duration_s: float, adapters: int, ranks: list[int], seed: int = 0) -> tuple[pa.Table, dict]:
    """A Mooncake-like trace with `prefix_hashes` (512-token blocks), about `n` requests.

    Sessions of multi-turn chats: a session opens with one of 64 shared system prompts (2
    to 8 blocks, Zipf-popular) and each turn adds 1-4 blocks of its own, the next turn's
    prompt holding the previous one, as a chat's does; turns are 20-120 s apart, sessions
    start uniformly over the hour, each on one adapter. Hash ids are consecutive integers
    per distinct prefix block, as in Mooncake's traces (their input lengths average 7-12k
    tokens; these 7k)."""
    from tracekit.schema import new_context

    rng = np.random.default_rng(seed)
    block = 512
    n_sys = 64
    sys_len = rng.integers(2, 9, n_sys)
    sys_off = np.concatenate([[0], np.cumsum(sys_len)])
    turns = rng.integers(1, 9, n)
    sessions = int(np.searchsorted(np.cumsum(turns), n)) + 1
    turns = turns[:sessions]
    turns[-1] -= int(turns.sum()) - n
    sess_of = np.repeat(np.arange(sessions), turns)
    first = np.concatenate([[0], np.cumsum(turns)[:-1]])[sess_of]  # each request's session's first request
    zipf = 1.0 / np.arange(1, n_sys + 1) ** 1.1
    sess_sys = rng.choice(n_sys, sessions, p=zipf / zipf.sum())
    sess_adapter = rng.integers(0, adapters, sessions)
    new_blocks = rng.integers(1, 5, n)

    def within_session(x: np.ndarray) -> np.ndarray:
        c = np.cumsum(x)
        return c - np.where(first > 0, c[first - 1], 0)

    sys_blocks = sys_len[sess_sys[sess_of]]
    lens = sys_blocks + within_session(new_blocks)
    prompt = lens * block + rng.integers(0, block, n)
    output = np.exp(rng.uniform(np.log(16), np.log(512), n)).astype(np.int64)
    sess_total = np.bincount(sess_of, weights=new_blocks, minlength=sessions).astype(np.int64)
    sess_base = sys_off[-1] + np.concatenate([[0], np.cumsum(sess_total)[:-1]])
    offsets = np.concatenate([[0], np.cumsum(lens)])
    req = np.repeat(np.arange(n), lens)
    pos = np.arange(int(offsets[-1])) - offsets[req]
    sb = sys_blocks[req]
    values = np.where(pos < sb, sys_off[sess_sys[sess_of[req]]] + pos, sess_base[sess_of[req]] + pos - sb)
    arrival = rng.uniform(0, duration_s, sessions)[sess_of] + within_session(
        rng.uniform(20, 120, n) * (np.arange(n) != first))
    keep = np.flatnonzero(arrival < duration_s)
    keep = keep[np.argsort(arrival[keep], kind="stable")]
    names = [f"lora-{i:04d}" for i in range(adapters)]
    hashes = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)).take(pa.array(keep))
    ids = pl.int_range(0, len(keep), eager=True).cast(pl.String).str.zfill(8)
    table = pa.table({
        "request_id": ("mc-" + ids).to_arrow(),
        "arrival_s": pa.array(arrival[keep]),
        "adapter": pa.array(names).take(pa.array(sess_adapter[sess_of[keep]])),
        "prompt_tokens": pa.array(prompt[keep].astype(np.int32)),
        "output_tokens": pa.array(output[keep].astype(np.int32)),
        "prefix_hashes": hashes,
    })  # fmt: skip
    ctx = new_context(source="mooncake-like (benchmarks/twin_speed.py)", window_s=duration_s, prefix_block_tokens=block,
                      adapters={a: {"rank": ranks[i % len(ranks)], "path": None} for i, a in enumerate(names)})  # fmt: skip
    return table, ctx


def phases(case: dict) -> dict[str, float]:
    """Where the time of one `twin run` goes, measured in this process (heavy case), on
    the path `twin run` takes (`read_trace_arrow`, `simulate(trace_checked=True, dictionary_strings=True)`,
    `write`). The loop's own time is the summary's `engine_loop_s` (wall time: the
    compiled twin's functions take no timing patch)."""
    from tracekit import schema
    from twin.api import ServingConfig
    from twin.engine import simulate

    # CPU time of this process per phase (steadier than wall time on a shared machine).
    clock = time.process_time
    t0 = clock()
    tr, meta = schema.read_trace_arrow(case["trace"], dictionary=["adapter"])
    t1 = clock()
    cfg = ServingConfig(max_loras=64, max_cpu_loras=384, max_lora_rank=16, max_num_seqs=2048, max_num_batched_tokens=2048)
    res = simulate(tr, PROFILE, cfg, trace_context=meta.context, trace_checked=True, dictionary_strings=True)
    t2 = clock()
    schema.write(Path(case["out"]), res.results, "results", res.context, conformed=True)  # as `twin run` writes them
    t3 = clock()
    loop = float(res.summary["engine_loop_s"])
    return {"start_and_imports_s": start_and_imports(), "read_trace_s": t1 - t0,
            "simulate_setup_results_and_summary_s": t2 - t1 - loop, "engine_loop_s": loop, "write_results_s": t3 - t2}


def start_and_imports(repeats: int = 5) -> float:
    """CPU seconds of a process that starts and imports what `twin run` imports (median)."""
    code = "from twin.cli import main; import twin.run_cmd, twin.engine"
    cpu = []
    for _ in range(repeats):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        _, _, usage = os.wait4(proc.pid, 0)
        cpu.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--baseline", default=None,
                    help="another checkout (e.g. `git worktree add /tmp/main main`) whose twin runs the heavy and "
                         "mooncake cases interleaved with this one, for a before/after in the same conditions; "
                         "`source`: this checkout's twin as pure Python (TWIN_PURE_PYTHON=1), against its compiled step loop")
    ap.add_argument("--name", default="twin_speed", help="results file stem")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.pop("TWIN_PURE_PYTHON", None)
    import twin
    from tracekit import schema
    from tracekit.synth import synthesize

    # Bytecode first, as an installed package has it (with PYTHONDONTWRITEBYTECODE set, an
    # editable checkout would otherwise compile its sources in every timed process).
    for pkg in ("twin", "tracekit"):
        compileall.compile_dir(ROOT / pkg, quiet=1)

    rows = []
    tmp_heavy: dict | None = None
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        for name in args.cases.split(","):
            case = CASES[name]
            if name == "mooncake":
                tr, ctx = mooncake_like(case["requests"], 3600.0, case["adapters"], case["ranks"])
            else:
                tr, ctx = synthesize(case["adapters"], case["rates"], case["ranks"], 3600.0, lengths="sharegpt", seed=0)
            trace = schema.write(tmpdir / f"{name}.parquet", tr, "trace", ctx)
            n_arrivals = tr.num_rows if isinstance(tr, pa.Table) else tr.height
            walls: dict[bool, list[float]] = {True: [], False: []}
            cpus: dict[bool, list[float]] = {True: [], False: []}
            loops: dict[bool, list[float]] = {True: [], False: []}
            summary: dict[bool, dict] = {}
            rss: dict[bool, list[float]] = {True: [], False: []}
            base_walls: list[float] = []
            plain_diff: set[str] = set()
            base_diff: set[str] = set()
            base_cpus: list[float] = []
            base_rss: list[float] = []
            for _ in range(args.repeats):
                if args.baseline and name in BASELINE_CASES:
                    wall, summ = run_once(trace, tmpdir, case["flags"], True, args.baseline)
                    base_walls.append(wall)
                    base_cpus.append(summ["cpu_s"])
                    base_rss.append(summ["peak_rss_gib"])
                    base_summary = summ
                # Interleaved, so load from other processes hits both alike.
                for fast in (True, False):
                    wall, summ = run_once(trace, tmpdir, case["flags"], fast)
                    if not fast:
                        plain_diff |= set(differences(tmpdir / "results.parquet", summ, tmpdir / "ff.parquet", summary[True]))
                    else:
                        (tmpdir / "results.parquet").replace(tmpdir / "ff.parquet")
                        if base_walls:
                            base_diff |= set(differences(tmpdir / "base.parquet", base_summary, tmpdir / "ff.parquet", summ))
                    walls[fast].append(wall)
                    loops[fast].append(summ["engine_loop_s"])
                    cpus[fast].append(summ["cpu_s"])
                    rss[fast].append(summ["peak_rss_gib"])
                    summary[fast] = summ
            s = summary[True]
            # fast-forward's summary differs from the plain loop's in its own counter only.
            same = not [d for d in plain_diff if d != "summary fast_forward_steps"]
            ff, base = statistics.median(walls[True]), statistics.median(walls[False])
            rows.append({
                "case": name, "arrivals": n_arrivals, "completed": s["completed"], "steps": s["steps"],
                "fast_forward_steps": s["fast_forward_steps"], "preemptions": s["preemptions"],
                "starved": s["starved"], "wall_s_fast_forward": ff, "wall_s_plain": base,
                "walls_fast_forward": walls[True], "walls_plain": walls[False],
                "speedup": base / ff,
                "cpu_s_fast_forward": statistics.median(cpus[True]), "cpu_s_plain": statistics.median(cpus[False]),
                "loop_s_fast_forward": statistics.median(loops[True]), "loop_s_plain": statistics.median(loops[False]),
                "loop_speedup": statistics.median(loops[False]) / statistics.median(loops[True]), "arrivals_per_s": n_arrivals / ff,
                "completions_per_s": s["completed"] / ff, "steps_per_s": s["steps"] / ff,
                "same_results": same, "peak_rss_gib": max(rss[True]), "peak_rss_gib_plain": max(rss[False]),
                "prefix_caching": "--enable-prefix-caching" in case["flags"],
                "baseline": {"checkout": args.baseline, "wall_s": statistics.median(base_walls), "walls": base_walls,
                             "cpu_s": statistics.median(base_cpus), "peak_rss_gib": max(base_rss),
                             "same_results": not base_diff, "differences": sorted(base_diff)} if base_walls else None,
                "cached_prompt_tokens": s.get("cached_prompt_tokens"), "prefill_tokens_computed": s.get("prefill_tokens_computed"),
            })
            print(json.dumps(rows[-1]))
            if name == "heavy":
                tmp_heavy = {"trace": trace, "out": tmpdir / "phases.parquet"}
        breakdown = phases(tmp_heavy) if tmp_heavy else None
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), platform.machine())
    isa = "AVX-512" if " avx512f" in cpuinfo else "AVX2, no AVX-512" if " avx2" in cpuinfo else "no AVX2"
    machine = f"{os.cpu_count()}-core {model} ({isa}), Python {platform.python_version()}"
    load = "load average at the end {:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(*os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = f" --baseline {args.baseline}" if args.baseline else ""
    base += f" --name {args.name}" if args.name != "twin_speed" else ""  # the command that wrote this file
    meta = {"machine": machine, "twin": twin.NATIVE, "command": f".venv/bin/python benchmarks/twin_speed.py --repeats {args.repeats} --cases {args.cases}{base}",
            "profile": PROFILE, "load": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "heavy_phases": breakdown}, indent=2) + "\n")
    lines = [
        "# twin speed: `twin run`, whole process (Parquet in and out included)",
        "",
        f"Machine: {machine}; {load} (shared with other jobs: timings are noisy; medians of {args.repeats} "
        f"interleaved runs). Twin step loop: {twin.NATIVE} (mypyc, setup.py). Baseline: the same engine with `--no-fast-forward` (plain step loop, "
        "bit-identical results), measured in the same run.",
        f"Profile `{PROFILE}`; `--max-num-seqs 2048 --max-num-batched-tokens 2048`; one simulated hour; "
        "every new feature off (the profile's server) except the mooncake case's prefix caching.",
        f"Command: `{meta['command']}` ({meta['date']}).",
        "",
        "| case | arrivals | completed | steps | fast-forwarded steps | wall s (ff / plain) | CPU s of the process (ff / plain) | speedup (wall) | engine loop s (ff / plain) | loop speedup | arrivals/s | completions/s | steps/s | peak memory GiB | same results |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['arrivals']:,} | {r['completed']:,} | {r['steps']:,} | "
            f"{r['fast_forward_steps']:,} ({r['fast_forward_steps'] / max(r['steps'], 1):.0%}) | "
            f"{r['wall_s_fast_forward']:.2f} / {r['wall_s_plain']:.2f} | {r['cpu_s_fast_forward']:.2f} / {r['cpu_s_plain']:.2f} | {r['speedup']:.2f}x | "
            f"{r['loop_s_fast_forward']:.2f} / {r['loop_s_plain']:.2f} | {r['loop_speedup']:.2f}x | "
            f"{r['arrivals_per_s']:,.0f} | {r['completions_per_s']:,.0f} | {r['steps_per_s']:,.0f} | "
            f"{r['peak_rss_gib']:.2f} | {'yes' if r['same_results'] else 'NO'} |"
        )
    for r in rows:
        if r.get("baseline"):
            b = r["baseline"]
            what = "this checkout's twin as pure Python, TWIN_PURE_PYTHON=1" if b["checkout"] == SOURCE else f"`--baseline {b['checkout']}`"
            lines += ["", f"Baseline in the same run ({what}, its `twin run` interleaved with this "
                      f"one's on the {r['case']} case): {b['wall_s']:.2f} s wall, {b['cpu_s']:.2f} s CPU (medians of "
                      f"{len(b['walls'])}), peak memory {b['peak_rss_gib']:.2f} GiB; this checkout "
                      f"{r['wall_s_fast_forward']:.2f} s / {r['cpu_s_fast_forward']:.2f} s, {r['peak_rss_gib']:.2f} GiB: "
                      f"{b['wall_s'] / r['wall_s_fast_forward']:.2f}x wall, {b['cpu_s'] / r['cpu_s_fast_forward']:.2f}x CPU; "
                      "results files and summary identical to the baseline's: "
                      + ("yes" if b["same_results"] else "NO, " + ", ".join(b["differences"])) + "."]
    if breakdown:
        lines += ["", "Where the heavy case's time goes (CPU seconds; start and imports: a process importing what "
                  "`twin run` imports, median of 5; the rest: one run in the benchmark's own process, on `twin run`'s "
                  "path): "
                  + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f} s" for k, v in breakdown.items()) + "."]
    lines += [
        "",
        "Rates are per second of wall time of the whole `twin run` process (the figures the issue asks",
        "for); CPU s is the same process's user + system CPU time, a steadier figure on a shared machine. The paper's twin took 67.5 s on the heavy case on this kind of machine; Vidur about",
        "1,000 requests/s. Plain-loop rates (same run): "
        + "; ".join(f"{r['case']}: {r['arrivals'] / r['wall_s_plain']:,.0f} arrivals/s, {r['completed'] / r['wall_s_plain']:,.0f} "
                    f"completions/s, {r['steps'] / r['wall_s_plain']:,.0f} steps/s" for r in rows) + ".",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
