"""Regenerate every predictor figure with one command, in the right order, each step under
the shared lock and in chunks of at most ~9 minutes (sweeps resume where they stopped).

    .venv/bin/python benchmarks/predictor_figures.py [--skip-training]

Do not wrap this in flock yourself: each step takes /tmp/tracekit-heavy.lock on its own
and lets others in between chunks.

1. scripts/train_shipped_models.py: the twin sweeps and the shipped models of both H100
   profiles (cells simulated under another version of a profile are redone);
2. benchmarks/predictor_h100.py --tune: the real Llama sweeps; chooses the safety rule's
   z (predictor/rule.json) with workloads held out, then scores every method;
3. benchmarks/predictor_lomo.py: Qwen and a CPU profile with twin sweeps as truth, z
   untouched;
4. benchmarks/predictor_answer_time.py: answer times, one core and two;
5. benchmarks/predictor_cv.py: the models' cross-validated error (seconds: without the lock).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/tracekit-heavy.lock"
CHUNK = "540"
INCOMPLETE = 3


def step(args: list[str], lock: bool = True) -> None:
    while True:
        t0 = time.perf_counter()
        print(f"== {' '.join(args)}", flush=True)
        rc = subprocess.call((["flock", LOCK] if lock else []) + [sys.executable, *args], cwd=ROOT)
        print(f"== rc {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc == INCOMPLETE:
            time.sleep(10)  # between chunks: others may take the lock
            continue
        if rc:
            sys.exit(rc)
        return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-training", action="store_true", help="keep the shipped models as they are")
    args = ap.parse_args()
    if not args.skip_training:
        step(["scripts/train_shipped_models.py", "--budget-s", CHUNK])
    step(["benchmarks/predictor_h100.py", "--tune", "--budget-s", CHUNK])
    step(["benchmarks/predictor_lomo.py", "--budget-s", CHUNK])
    step(["benchmarks/predictor_answer_time.py"])
    step(["benchmarks/predictor_cv.py"], lock=False)  # seconds of CPU: no need to queue for the lock


if __name__ == "__main__":
    main()
