"""Bad input, as a user meets it: every installed console script, as its own process, on
each bad file of tests/bad_inputs.py; counts the (command, bad file) pairs tried and
those that give exactly one `error: ...` line naming the file, exit code 2 and nothing
on stdout.

    flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/bad_input.py [--jobs 2]

Writes benchmarks/results/bad_input.md and bad_input.json (the pairs that fail, if any,
with their output). The fast suite runs the same matrix in process (tests/test_bad_input.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bad_inputs import bad_files, bad_profiles, good_inputs, pairs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracekit-bad-") as tmp:
        d = Path(tmp)
        bad, profiles, good = bad_files(d / "files"), bad_profiles(d / "profiles"), good_inputs(d / "good")
        todo = pairs(bad, profiles)

        def one(item: tuple) -> dict:
            script, words, slot, name, argv = item
            f = (profiles if slot == "profile" else bad)[name]
            out = d / "out" / f"{script}-{'-'.join(words)}-{slot}-{name}"
            out.mkdir(parents=True, exist_ok=True)
            p = subprocess.run([str(BIN / script), *argv(f, out, good)], capture_output=True, text=True, timeout=300)
            err = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("note: ")]
            ok = (p.returncode == 2 and p.stdout.strip() == "" and len(err) == 1 and err[0].startswith("error: ")
                  and f.name in err[0] and "Traceback" not in p.stderr)
            text = err[0] if len(err) == 1 else p.stderr[-500:]
            return {"command": f"{script} {' '.join(words)}", "slot": slot, "file": name, "ok": ok,
                    "exit": p.returncode, "error": text.replace(tmp, "...")}

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(one, todo))
        wall = time.perf_counter() - t0
    clean = sum(r["ok"] for r in rows)
    commands = sorted({r["command"] for r in rows})
    files = sorted({r["file"] for r in rows})
    out = {
        "command": f"{Path(sys.executable).relative_to(ROOT) if str(sys.executable).startswith(str(ROOT)) else sys.executable}"
                   f" benchmarks/bad_input.py --jobs {args.jobs}",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "pairs_tried": len(rows),
        "pairs_one_line_exit_2": clean,
        "commands": commands,
        "bad_files": files,
        "wall_s": round(wall, 1),
        "failing": [r for r in rows if not r["ok"]],
        "lines": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bad_input.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [
        "# Bad input: every console script on each bad file",
        "",
        f"Command: `{out['command']}` ({out['at']}); {out['machine']}.",
        "",
        f"**{clean} of {len(rows)}** (command, bad file) pairs give exactly one `error: ...` line naming the file, "
        f"exit code 2 and nothing on stdout ({len(commands)} commands, {len(files)} bad files; each pair is the "
        f"installed script run as its own process; {wall:.0f} s).",
        "",
        "| command | pairs | one line, exit 2 |",
        "|---|---:|---:|",
    ]
    for c in commands:
        mine = [r for r in rows if r["command"] == c]
        md.append(f"| `{c}` | {len(mine)} | {sum(r['ok'] for r in mine)} |")
    md += ["", "Bad files: " + ", ".join(f"`{f}`" for f in files) + " (tests/bad_inputs.py builds them).", ""]
    if out["failing"]:
        md += ["## Failing pairs", ""] + [f"- `{r['command']}` <- `{r['file']}`: exit {r['exit']}: {r['error']!r}"
                                          for r in out["failing"]]
    md += ["## One line per bad trace file, as `tracekit inspect` prints it", ""]
    for r in rows:
        if r["command"] == "tracekit inspect":
            md.append(f"- `{r['file']}`: `{r['error']}`")
    (RESULTS / "bad_input.md").write_text("\n".join(md) + "\n")
    print(f"{clean} of {len(rows)} pairs: one error line, exit 2 ({wall:.0f} s)")


if __name__ == "__main__":
    main()
