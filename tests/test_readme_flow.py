"""The README's first flow, as written there: `make demo`, then `tracekit import table`
of one's own CSV and `twin run` of it (benchmarks/fresh_clone.py times the same block
from a fresh clone)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tracekit import schema

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- own-csv flow -->"


def readme_flow(text: str) -> list[str]:
    """The shell commands of the README's `own-csv` block, continuation lines joined and
    comments dropped."""
    block = text.split(MARK, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds: list[str] = []
    pending = ""
    for line in block.splitlines():
        line = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        cmds.append((pending + line.strip()).strip())
        pending = ""
    return cmds


def test_readme_block_is_clone_demo_import_and_twin_run() -> None:
    cmds = readme_flow((ROOT / "README.md").read_text())
    assert cmds[0].startswith("git clone") and cmds[0].endswith("&& cd lora-tracekit") and cmds[1] == "make demo"
    assert cmds[2].startswith(".venv/bin/tracekit import table examples/my_requests.csv")
    assert cmds[3].startswith(".venv/bin/twin run mine.parquet") and len(cmds) == 4


def test_readme_flow_runs_as_written(tmp_path: Path) -> None:
    cmds = readme_flow((ROOT / "README.md").read_text())
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out" / "demo"))
    # `make demo` is setup (the venv this test runs in) plus examples/demo.sh.
    p = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "out" / "demo" / "results.parquet").exists()
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "my_requests.csv", tmp_path / "examples")
    for cmd in cmds[2:]:
        cmd = cmd.replace(".venv/bin/", f"{bindir}/")
        p = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (cmd, p.stderr[-2000:])
        assert "error" not in p.stderr
    res, meta = schema.read(tmp_path / "mine-twin.parquet", "results")
    trace, _ = schema.read_trace(tmp_path / "mine.parquet")
    assert res.height == trace.height > 1000
    assert meta.context["configuration"]["max_loras"] == 8
    assert set(meta.context["adapters"]) == {"support-bot", "sql-gen", "summarizer", "legal-qa", "code-review",
                                             "translator-de"}
    assert "not starving" in p.stdout
