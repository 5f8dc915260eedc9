"""The twin's step loop compiled with mypyc (setup.py, `twin.NATIVE_MODULES`) is the same
program as its source: same results and steps, bit for bit, on runs that take every path
(prefix caching from hashes, async scheduling, full-prompt admission, preemption,
fast-forward, adapter loads, a coupled fleet behind a dynamic router)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

import twin

BIN = Path(sys.executable).parent


def test_the_step_loop_is_compiled_where_a_c_compiler_is() -> None:
    if os.environ.get("TWIN_PURE_PYTHON"):
        pytest.skip("TWIN_PURE_PYTHON is set: this run checks the source twin")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the install builds the pure-Python twin")
    assert twin.NATIVE == "compiled", twin.NATIVE


def _run(args: list[str], out: Path, pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TWIN_PURE_PYTHON"}
    if pure:
        env["TWIN_PURE_PYTHON"] = "1"
    p = subprocess.run([str(BIN / "twin"), "run", *args, "--out", str(out), "--json"], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def _same(a: Path, b: Path) -> None:
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.replace_schema_metadata(None).equals(tb.replace_schema_metadata(None)), f"{a.name} differs"


def _process_figure(key: str) -> bool:
    """A figure of the run's process, not of the simulation: wall times, pid, memory."""
    return key.endswith("wall_s") or key in ("engine_loop_s", "pid", "peak_rss_mib")


def _summary(s: object) -> object:
    if isinstance(s, dict):
        return {k: _summary(v) for k, v in s.items() if not _process_figure(k)}
    if isinstance(s, list):
        return [_summary(v) for v in s]
    return s


@pytest.mark.skipif(twin.NATIVE != "compiled", reason=f"the twin is not compiled here ({twin.NATIVE})")
def test_compiled_and_source_twin_give_identical_runs(tmp_path: Path) -> None:
    trace = tmp_path / "t.parquet"
    subprocess.run([str(BIN / "tracekit"), "synth", "--adapters", "12", "--total-rate", "6", "--popularity", "zipf:1",
                    "--arrivals", "gamma:2", "--ranks", "8,16", "--window", "120", "--turns", "3",
                    "--system-prompts", "3:400", "--token-ids", "hashes", "--out", str(trace)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    # Small slots and KV cache: adapter loads, waiting on slots and blocks, preemptions.
    one = [str(trace), "--profile", "h100-llama-3.1-8b", "--max-loras", "2", "--max-cpu-loras", "6",
           "--max-num-seqs", "32", "--max-num-batched-tokens", "512", "--kv-capacity-tokens", "12000",
           "--enable-prefix-caching", "--async-scheduling", "--scheduler-reserve-full-isl"]  # fmt: skip
    runs = {}
    for pure in (False, True):
        d = tmp_path / ("pure" if pure else "compiled")
        d.mkdir()
        runs[pure] = _run([*one, "--steps-out", str(d / "steps.parquet")], d / "results.parquet", pure)
    assert runs[False]["preemptions"] > 0 and runs[False]["cached_prompt_tokens"] > 0
    assert runs[False]["fast_forward_steps"] > 0 and runs[False]["adapter_loads"] > 0
    assert _summary(runs[False]) == _summary(runs[True])
    for name in ("results.parquet", "steps.parquet"):
        _same(tmp_path / "compiled" / name, tmp_path / "pure" / name)

    # A coupled fleet (engines fed request by request: the scheduler's growable mode).
    names = sorted(pl.read_parquet(trace)["adapter"].drop_nulls().unique().to_list())
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"gpus": [{"adapters": names, "max_loras": 3, "max_num_seqs": 32,
                                          "enable_prefix_caching": True} for _ in range(2)]}))
    fleet = [str(trace), "--profile", "h100-llama-3.1-8b", "--fleet", str(plan), "--router", "least-loaded"]
    out = {pure: _run(fleet, tmp_path / f"fleet-{pure}.parquet", pure) for pure in (False, True)}
    assert _summary(out[False]) == _summary(out[True])
    _same(tmp_path / "fleet-False.parquet", tmp_path / "fleet-True.parquet")
