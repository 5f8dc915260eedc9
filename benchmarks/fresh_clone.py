"""Time from a fresh clone to a first twin run of one's own CSV, as the README's flow
runs it: `git clone`, `make demo` (creates .venv, installs the package, runs the demo),
then `tracekit import table` of a CSV log and `twin run` of it.

    flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/fresh_clone.py

Clones the committed HEAD of this repository (local clone: no network for the code;
`pip` uses the machine's package registry and cache, as a user's would). The commands
are the README's, taken from its `own-csv` block (tests/test_readme_flow.py checks the
same block). Writes benchmarks/results/fresh_clone.md and fresh_clone.json.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))

from test_readme_flow import readme_flow  # noqa: E402


def run(cmd: list[str] | str, cwd: Path) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, shell=isinstance(cmd, str), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    steps = readme_flow((ROOT / "README.md").read_text())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="tracekit-clone-") as tmp:
        clone = Path(tmp) / "lora-tracekit"
        times: list[tuple[str, float]] = [("git clone", run(["git", "clone", "-q", str(ROOT), str(clone)], Path(tmp)))]
        for cmd in steps:
            if cmd.startswith("git clone"):  # done above, into a temporary folder
                continue
            times.append((cmd, run(cmd, clone)))
        out_file = clone / "mine-twin.parquet"
        assert out_file.exists(), "the flow's twin run wrote no results"
    total = sum(t for _, t in times)
    out = {
        "command": ".venv/bin/python benchmarks/fresh_clone.py",
        "commit": head,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "steps": [{"command": c, "wall_s": round(t, 2)} for c, t in times],
        "total_s": round(total, 1),
        "after_setup_s": round(sum(t for c, t in times if not c.startswith(("git clone", "make"))), 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fresh_clone.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [
        "# From a fresh clone to a first twin run of your own CSV",
        "",
        f"Command: `{out['command']}` ({out['at']}, commit {head}); {out['machine']}; "
        f"load average {out['load_avg_1m_end']} at the end.",
        "",
        "| step | wall (s) |",
        "|---|---:|",
        *[f"| `{shlex.join(shlex.split(c))[:110]}` | {t:.1f} |" for c, t in times],
        f"| **total** | **{total:.1f}** |",
        "",
        f"After `make demo`, the two commands on one's own CSV take {out['after_setup_s']:.1f} s. `make demo` "
        "includes creating `.venv` and installing the package from the machine's package registry and cache "
        "(most of its time), then the demo itself.",
    ]
    (RESULTS / "fresh_clone.md").write_text("\n".join(md) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
