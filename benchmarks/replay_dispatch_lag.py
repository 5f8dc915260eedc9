"""Where `replay run`'s client-side dispatch lag comes from: percentiles and when the >1 ms ones happen.

Replays a Poisson trace (prompt 64 / output 16 tokens) against `replay.fast_server` with each
HTTP client (`h1`: the default, request written synchronously at the deadline; `aiohttp`:
the earlier task-per-request client) and prints p50/p90/p99/max of `dispatch_s - arrival_s`
and how many requests per trace second were over 1 ms (clustered counts point at the
machine pausing the process, spread ones at the client's own loop).

Run: `.venv/bin/python benchmarks/replay_dispatch_lag.py --clients h1,aiohttp --rate 200 --duration 15`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import replay_fidelity as rf  # noqa: E402

from tracekit.schema import read  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="h1,aiohttp")
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=15.0)
    args = ap.parse_args()
    port = rf.free_port()
    url = f"http://127.0.0.1:{port}"
    srv = subprocess.Popen([sys.executable, "-m", "replay.fast_server", "--port", str(port), "--itl-ms", "1"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                rf.http(f"{url}/v1/models")
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for client in args.clients.split(","):
                trace, _, _ = rf.make_trace(work, args.rate, args.duration, 1)
                out = work / "r.parquet"
                subprocess.run([str(rf.VENV_BIN / "replay"), "run", str(trace), "--target", "vllm", "--url", url,
                                "--drain", "--no-progress", "--out", str(out)],
                               env=dict(os.environ, TRACEKIT_REPLAY_HTTP=client), check=True, capture_output=True)
                res, _ = read(out, "results")
                lag = (res["dispatch_s"] - res["arrival_s"]).to_numpy() * 1e3
                late = np.where(lag > 1)[0]
                per_s = np.bincount(np.floor(res["arrival_s"].to_numpy()[late]).astype(int)).tolist() if len(late) else []
                p50, p90, p99 = np.percentile(lag, [50, 90, 99])
                print(f"{client}: p50 {p50:.3f} p90 {p90:.3f} p99 {p99:.3f} max {lag.max():.1f} ms; "
                      f">1 ms: {len(late)} (per second {per_s}); load {os.getloadavg()[0]:.1f}")
    finally:
        srv.terminate()
        srv.wait(10)


if __name__ == "__main__":
    main()
