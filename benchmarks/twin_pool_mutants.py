"""Would the prefix-cache property tests catch a broken block pool? (issue 11)

Each mutant below breaks one rule of `twin/kv_cache.py` / the scheduler's hit cap in a
temporary copy of the package; `tests/test_twin_properties.py -k prefix` (hypothesis,
the invariant checks after every step) must then fail. Writes
benchmarks/results/twin_pool_mutants.{md,json}.

Run: .venv/bin/python benchmarks/twin_pool_mutants.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# (the rule it breaks, file, original text, mutant)
MUTANTS = [
    ("a released unit keeps its reference (ref counts exact)", "twin/kv_cache.py",
     "        ref = self.unit_ref[uid] - 1\n        self.unit_ref[uid] = ref\n",
     "        ref = self.unit_ref[uid] - 1\n        self.unit_ref[uid] = ref + (ref == 0)\n"),
    ("a hit on a free unit does not count its holder (ref counts exact)", "twin/kv_cache.py",
     "        self.unit_ref[uid] = ref + 1\n        if ref:", "        self.unit_ref[uid] = ref + (ref > 0)\n        if ref:"),
    ("lookups read the first adapter's cache (two adapters share a block)", "twin/kv_cache.py",
     "        cached = self.cached[q]\n        hit: list[int] = []",
     "        cached = self.cached[0] if any(self.cached[0]) else self.cached[q]\n        hit: list[int] = []"),
    ("units registered in the first adapter's cache (two adapters share a block)", "twin/kv_cache.py",
     "        self.cached[q][key] = uid\n        return uid", "        self.cached[0][key] = uid\n        return uid"),
    ("a hit may cover the whole prompt (hit <= prompt - 1 token)", "twin/scheduler.py",
     "        max_hit = (num_tokens - 1) // bs", "        max_hit = num_tokens // bs"),
    ("an evicted run's blocks stay counted free (no block both free and held)", "twin/kv_cache.py",
     "                used = c if c <= n else n\n                self.queued_blocks -= used",
     "                used = c if c <= n else n\n                self.queued_blocks -= used - (used > 1)"),
    ("an evicted unit stays in the cache map (no block both free and held)", "twin/kv_cache.py",
     "                del self.cached[self.unit_q[eid]][self.unit_key[eid]]\n", ""),
]


def run_tests(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/test_twin_properties.py", "-k", "prefix"],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for part in ("twin", "tracekit", "tests", "pyproject.toml"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy)(src, root / part)
        base = run_tests(root)
        if base.returncode != 0:
            raise SystemExit(f"the property tests fail on the unmutated code:\n{base.stdout[-2000:]}")
        for rule, path, old, new in MUTANTS:
            original = (ROOT / path).read_text()
            if old not in original:
                raise SystemExit(f"mutant {rule!r}: its text is no longer in {path}; update the mutant")
            (root / path).write_text(original.replace(old, new, 1))
            t0 = time.perf_counter()
            r = run_tests(root)
            (root / path).write_text(original)
            why = next((ln.strip()[2:].strip() for ln in r.stdout.splitlines() if ln.strip().startswith("E ")), "")
            rows.append({"rule": rule, "file": path, "caught": r.returncode != 0, "seconds": round(time.perf_counter() - t0, 1),
                         "first_error": why[:200]})  # fmt: skip
            print(json.dumps(rows[-1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = ".venv/bin/python benchmarks/twin_pool_mutants.py"
    (RESULTS / "twin_pool_mutants.json").write_text(json.dumps({"command": cmd, "mutants": rows}, indent=2) + "\n")
    lines = ["# Prefix-cache property tests against broken block pools", "",
             f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Each mutant breaks one rule in a copy "
             "of the package; `tests/test_twin_properties.py -k prefix` must fail.", "",
             f"Caught: {sum(r['caught'] for r in rows)} of {len(rows)}.", "",
             "| broken rule | file | caught | seconds | first error |", "|---|---|---|---:|---|"]
    lines += [f"| {r['rule']} | `{r['file']}` | {'yes' if r['caught'] else 'NO'} | {r['seconds']} | {r['first_error'].replace('|', '/')} |"
              for r in rows]
    (RESULTS / "twin_pool_mutants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
