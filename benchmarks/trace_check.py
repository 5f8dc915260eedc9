"""The cost of the one trace validation (tracekit.schema.check_trace) on a 10 M-row trace,
against reading the same columns, and `tracekit inspect` whole with it.

    flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/trace_check.py [--repeats 3]

1. `check_trace` in process as commands run it (`scan_trace`: the check columns read
   with pyarrow, then checked with numpy) on the 10 M-row trace of
   benchmarks/tracekit_bench.py (ids in sorted order, as synth and the importers write
   them). Baseline: one lazy pass that reads the same four columns (min and max of each,
   the least any check must do).
2. The same rows with request ids shuffled (a capture's ids are in completion order):
   the fingerprint path of the uniqueness check.
3. `tracekit inspect FILE --json`, the whole process (wall, CPU, peak RSS), which now
   validates before it summarises; target <= 5 s and <= 2 GiB.

Writes benchmarks/results/trace_check.md and trace_check.json; medians of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from tracekit_bench import SYNTH_10M, timed  # noqa: E402

from tracekit import schema  # noqa: E402

COLUMNS = ("request_id", "arrival_s", "prompt_tokens", "output_tokens")


def best_of(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tracekit-bench"))
    args = ap.parse_args()
    work, r = args.workdir, args.repeats
    work.mkdir(parents=True, exist_ok=True)
    big = work / "trace10m.parquet"
    if not big.exists():
        subprocess.run([str(BIN / "tracekit"), "synth", *SYNTH_10M, "--out", str(big)], check=True, capture_output=True)
    shuffled = work / "trace10m_shuffled_ids.parquet"
    if not shuffled.exists():
        t, meta = schema.read_arrow(big)
        ids = np.random.default_rng(0).permutation(t.num_rows)
        df = pl.from_arrow(t).with_columns(pl.Series("request_id", [f"cap-{i:09d}" for i in ids]))
        schema.write(shuffled, df, "trace", meta.context)
        del t, df
    lf, _ = schema.scan(big)
    rows = lf.select(pl.len()).collect().item()
    base = best_of(lambda: lf.select(*[pl.col(c).min().alias(f"{c}_lo") for c in COLUMNS],
                                     *[pl.col(c).max().alias(f"{c}_hi") for c in COLUMNS]).collect(), r)
    # As every command checks a trace it scans: the check columns read, then checked.
    sorted_ids = best_of(lambda: schema.scan_trace(big), r)
    hashed = best_of(lambda: schema.scan_trace(shuffled), r)
    proc = [timed([str(BIN / "tracekit"), "inspect", str(big), "--json"]) for _ in range(r)]
    out = {
        "command": f".venv/bin/python benchmarks/trace_check.py --repeats {r}",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_1m_end": None,
        "rows": rows,
        "read_four_columns_s_median": statistics.median(base),
        "check_sorted_ids_s_median": statistics.median(sorted_ids),
        "check_shuffled_ids_s_median": statistics.median(hashed),
        "inspect_wall_s_median": statistics.median(p[0] for p in proc),
        "inspect_cpu_s_median": statistics.median(p[2] for p in proc),
        "inspect_peak_rss_mib_median": statistics.median(p[1] for p in proc),
        "all": {"read": base, "sorted": sorted_ids, "shuffled": hashed, "inspect": proc},
    }
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trace_check.json").write_text(json.dumps(out, indent=1) + "\n")
    b = out["read_four_columns_s_median"]
    md = f"""# The one trace validation on {rows:,} rows

Command: `{out['command']}` ({out['at']}); {out['machine']}; load average {out['load_avg_1m_end']} at the end.
Medians of {r}. Trace: `tracekit synth {' '.join(SYNTH_10M)}` (ShareGPT lengths).

| what | wall (median) | vs reading the columns |
| --- | ---: | ---: |
| baseline: one lazy pass reading `{', '.join(COLUMNS)}` (min, max) | {b:.2f} s | 1.0x |
| `scan_trace` (read + `check_trace`), ids in sorted order (synth, importers) | {out['check_sorted_ids_s_median']:.2f} s | {out['check_sorted_ids_s_median'] / b:.1f}x |
| `scan_trace` (read + `check_trace`), ids shuffled (a capture): fingerprinted uniqueness | {out['check_shuffled_ids_s_median']:.2f} s | {out['check_shuffled_ids_s_median'] / b:.1f}x |

`tracekit inspect FILE --json`, whole process, validation included: {out['inspect_wall_s_median']:.2f} s wall,
{out['inspect_cpu_s_median']:.2f} s CPU, {out['inspect_peak_rss_mib_median']:.0f} MiB peak (targets <= 5 s, <= 2 GiB).
"""
    (RESULTS / "trace_check.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
