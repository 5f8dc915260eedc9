"""The step plugin's logic without vLLM: rows, parts, load attribution, argv, switches.

The real engine is exercised by tests/test_capture_e2e.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracekit import schema
from tracekit.capture import loads, steps, vllm_hooks
from tracekit.capture.stat_logger import TracekitStepLogger


def _row(step: int, t: float, dur: float) -> tuple[Any, ...]:
    return (step, t, dur, 1, 0, 0, 0, 1, 1, ["a1"], 0.1, 0, 0, 10, 0.0, [], None, 0)


def test_recorder_writes_steps_parts_and_flushes_on_close(tmp_path: Path) -> None:
    rec = steps.StepRecorder(tmp_path / "steps", {"max_loras": 2, "source": "vllm-plugin"}, flush_every_s=3600)
    for i in range(5):
        rec.add(_row(i, i * 0.01, 0.01))
    rec.flush()
    rec.add(_row(5, 0.05, 0.01))
    rec.close()
    rec.close()  # idempotent (engine shutdown and atexit both call it)
    parts = sorted((tmp_path / "steps").glob("*.parquet"))
    assert len(parts) == 2
    df, meta = schema.read(tmp_path / "steps", "steps")
    assert df["step"].to_list() == list(range(6))
    assert meta.context["max_loras"] == 2 and meta.context["tool_version"]


@pytest.mark.parametrize("flush_every", [0.05, 3600.0])
def test_recorder_background_flush(tmp_path: Path, flush_every: float) -> None:
    """On the timer, and (timer far away) once the engine has been idle for IDLE_FLUSH_S."""
    rec = steps.StepRecorder(tmp_path / "s", {}, flush_every_s=flush_every)
    rec.add(_row(0, 0.0, 0.01))
    deadline = time.monotonic() + 5
    while not list((tmp_path / "s").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list((tmp_path / "s").glob("*.parquet"))
    rec.close()


def test_recorder_hurries_once_the_server_stops(tmp_path: Path) -> None:
    """A busy engine with the timer far away writes nothing until shutdown; from the
    shutdown signal on, rows reach disk within a flush-loop turn while the engine still
    steps (a draining shutdown), and rows added after close() are written by the next."""
    rec = steps.StepRecorder(tmp_path / "s", {}, flush_every_s=3600)

    def busy(first: int, n: int) -> None:
        for i in range(first, first + n):
            rec.add(_row(i, i * 0.05, 0.05))
            time.sleep(0.05)  # never idle for IDLE_FLUSH_S

    busy(0, 16)
    assert not list((tmp_path / "s").glob("*.parquet"))
    rec.hurry()
    busy(16, 30)  # 1.5 s
    parts = list((tmp_path / "s").glob("*.parquet"))
    assert len(parts) >= 2, parts  # the signal's flush, then one every SHUTDOWN_FLUSH_S
    assert schema.read(tmp_path / "s", "steps")[0].height > 16 + 5  # rows of the drain, before close
    rec.close()
    rec.add(_row(46, 2.3, 0.05))  # a step after an early close (shutdown while draining)
    rec.close()
    assert schema.read(tmp_path / "s", "steps")[0]["step"].to_list() == list(range(47))


def test_signals_deferred_delivers_after_the_block(tmp_path: Path) -> None:
    """A SIGTERM that lands while the last steps are written (the EngineCore has already
    reset it to the default action) waits for the write, then ends the process as it would
    have."""
    done, after = tmp_path / "done", tmp_path / "after"
    script = f"""
import os, signal, time
from tracekit.capture.signals import signals_deferred
signal.signal(signal.SIGTERM, signal.SIG_DFL)
with signals_deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    open({str(done)!r}, "w").write("x")
open({str(after)!r}, "w").write("x")
"""
    r = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
    assert done.exists(), r.stderr
    assert not after.exists()
    assert r.returncode == -signal.SIGTERM


def test_recorder_write_error_is_logged_once_and_rows_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("x")
    rec = steps.StepRecorder(blocker / "steps", {}, flush_every_s=3600)
    rec.add(_row(0, 0.0, 0.01))
    rec.flush()
    rec.add(_row(1, 0.01, 0.01))
    rec.flush()
    err = capsys.readouterr().err
    assert err.count("cannot write steps") == 1
    blocker.unlink()
    rec.close()
    df, _ = schema.read(blocker / "steps")
    assert df["step"].to_list() == [0, 1]


@settings(max_examples=80, deadline=None)
@given(
    durs=st.lists(st.floats(0.001, 0.05), min_size=1, max_size=20),
    gaps=st.lists(st.floats(0.0, 0.02), min_size=20, max_size=20),
    events=st.lists(st.tuples(st.floats(0, 1.5), st.sampled_from(["gpu", "cpu"]), st.floats(0, 0.01)), max_size=15),
)
def test_load_merger_puts_each_load_in_the_step_that_contains_it(durs: list[float], gaps: list[float],
                                                                 events: list[tuple[float, str, float]]) -> None:
    t0 = 100.0
    rows, t = [], 0.0
    for i, d in enumerate(durs):
        t += gaps[i]
        rows.append(_row(i, t, d))
        t += d
    merger = loads.LoadMerger(Path("/nonexistent"), t0)
    loads.load_events.clear()
    loads.load_events.extend((t0 + et, f"a{j}", j, secs, kind) for j, (et, kind, secs) in enumerate(events))
    out = merger.merge(rows)

    def inside(et: float, r: tuple[Any, ...]) -> bool:  # on the absolute clock, as vLLM's events are
        return t0 + r[1] <= t0 + et <= t0 + r[1] + r[2]

    carried = 0
    for j, (et, kind, _secs) in enumerate(events):
        owner = [r for r in out if inside(et, r)]
        if t0 + et > t0 + rows[-1][1] + rows[-1][2]:
            carried += 1
        elif owner and kind == "gpu":
            assert any(f"a{j}" in r[15] for r in owner)
    gpu_inside = sum(1 for et, kind, _ in events if kind == "gpu" and any(inside(et, r) for r in rows))
    assert sum(r[12] for r in out) == gpu_inside  # loads between steps are not a step's
    assert len(merger.carry) == carried
    total = sum(secs for et, _, secs in events if any(inside(et, r) for r in rows))
    assert sum(r[14] for r in out) == pytest.approx(total, abs=1e-9)


def test_load_merger_reads_worker_sidecars(tmp_path: Path) -> None:
    """Multiprocess executor: loads come from the Worker process through a sidecar file."""
    t0 = 50.0
    side = tmp_path / "_adapter_loads-123.jsonl"
    side.write_text(json.dumps([t0 + 0.015, "a3", 3, 0.004, "gpu"]) + "\n" + '[1, "half')  # half-written line
    loads.load_events.clear()
    merger = loads.LoadMerger(tmp_path, t0)
    out = merger.merge([_row(0, 0.0, 0.01), _row(1, 0.01, 0.01)])
    assert out[1][12] == 1 and out[1][15] == ["a3"] and out[0][12] == 0
    with side.open("a") as f:
        f.write('", 1, 0.1, "cpu"]\n')
    out = merger.merge([_row(2, 0.02, 0.01)])  # the rest of the line arrives later: read once
    assert out[0][12] == 0


def test_lora_modules_from_argv() -> None:
    argv = ["api_server", "--model", "m", "--lora-modules", "a1=/p/1", "a2=/p/2", "--max-loras", "2",
            '--lora-modules={"name": "a3", "path": "/p/3", "base_model_name": "m"}']
    assert vllm_hooks.lora_modules_from_argv(argv) == {"a1": "/p/1", "a2": "/p/2", "a3": "/p/3"}
    assert vllm_hooks.lora_modules_from_argv(["--model", "m"]) == {}


def test_disabled_plugin_wraps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(steps.ENV_DIR, raising=False)
    monkeypatch.setattr(vllm_hooks.installed, "done", False)
    vllm_hooks.register_general_plugin()  # would import vLLM if it did anything: not installed here
    assert vllm_hooks.installed.done is False
    logger = TracekitStepLogger(SimpleNamespace(), 0)
    assert logger.enabled is False
    logger.record(object(), object())  # returns at once, touches nothing


class _Req(SimpleNamespace):
    pass


def test_batch_fields_split_prefill_decode_and_adapters(tmp_path: Path) -> None:
    lora = lambda n, i: SimpleNamespace(lora_name=n, lora_int_id=i, lora_path=None)  # noqa: E731
    requests = {
        # a new 10-token prompt, fully scheduled (schedule() already advanced computed tokens)
        "p": _Req(num_computed_tokens=10, num_prompt_tokens=10, lora_request=lora("a1", 1)),
        # a chunked prefill: the second chunk of 8 tokens of a 20-token prompt
        "c": _Req(num_computed_tokens=16, num_prompt_tokens=20, lora_request=None),
        # a decode: one token after a 5-token prompt and 3 outputs
        "d": _Req(num_computed_tokens=8, num_prompt_tokens=5, lora_request=lora("a2", 2)),
        # a recompute after preemption: 12 tokens past a 4-token prompt at once
        "r": _Req(num_computed_tokens=16, num_prompt_tokens=4, lora_request=lora("a1", 1)),
        # a new 40-token prompt whose first two blocks (32 tokens) hit the prefix cache
        "h": _Req(num_computed_tokens=40, num_prompt_tokens=40, lora_request=None),
    }
    sched = SimpleNamespace(requests=requests, get_request_counts=lambda: (4, 3),
                            kv_cache_manager=SimpleNamespace(usage=0.25))
    # NewRequestData carries the computed tokens at admission: the prefix-cache hit.
    new_reqs = [SimpleNamespace(req_id="p", num_computed_tokens=0), SimpleNamespace(req_id="h", num_computed_tokens=32)]
    out = SimpleNamespace(num_scheduled_tokens={"p": 10, "c": 8, "d": 1, "r": 12, "h": 8},
                          scheduled_spec_decode_tokens={}, preempted_req_ids={"x"}, scheduled_new_reqs=new_reqs)
    rec = steps.StepRecorder(tmp_path / "s", {"adapters": {"a1": {"rank": 8}}}, flush_every_s=3600)
    hook = vllm_hooks.StepHook(sched, rec, t0=0.0)
    fields = hook._batch_fields(out)
    (running, waiting, pre_reqs, pre_toks, dec_reqs, dec_toks, adapters, kv, preempted, context, cached) = fields
    assert (running, waiting, kv, preempted) == (4, 3, 0.25, 1)
    assert (pre_reqs, pre_toks, dec_reqs, dec_toks) == (4, 38, 1, 1)
    assert adapters == ["a1", "a2"] and context == 10 + 16 + 8 + 16 + 40 and cached == 32
    assert "a2" in rec.context["adapters"]  # learnt at run time
    rec.close()


def test_missing_vllm_fields_fail_loudly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Another vLLM whose scheduler or stats lack a field: one loud error, no crash, no rows."""
    monkeypatch.setenv(steps.ENV_DIR, str(tmp_path / "steps"))
    sched = SimpleNamespace(schedule=lambda: None, requests={})  # no update_from_output, ...
    vllm_hooks.install_scheduler_hook(sched)
    assert not hasattr(sched, "_tracekit_hook")
    text = (tmp_path / "steps" / steps.ERROR_FILE).read_text()
    assert "Scheduler.update_from_output" in text and "tested with 0.32.0" in text
    logger = TracekitStepLogger(SimpleNamespace(), 0)
    stats = SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.1)  # 2 fields missing
    for _ in range(3):
        logger.record(stats, SimpleNamespace(iteration_timestamp=0.0, num_preempted_reqs=0))
    err = capsys.readouterr().err
    assert err.count("SchedulerStats.running_lora_adapters") == 1 and logger.enabled is False
