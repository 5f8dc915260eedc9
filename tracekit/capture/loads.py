"""Adapter loads: events recorded where vLLM loads an adapter, attributed to steps.

A load event is (perf_counter at its end, adapter name or None, lora_int_id, seconds,
kind), kind "cpu" (disk -> CPU cache) or "gpu" (CPU cache -> GPU slot). In vLLM's
multiprocess executor the LoRA managers live in a Worker process while the scheduler
lives in the EngineCore; the worker then appends its events to a sidecar file in the
steps directory that the EngineCore's recorder merges by time (perf_counter is
CLOCK_MONOTONIC, one clock for every process on the machine). Nothing here imports vLLM.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from pathlib import Path
from typing import Any

from tracekit.capture.steps import (
    COL_ADAPTER_LOAD_S,
    COL_ADAPTER_LOADS,
    COL_LOADED_ADAPTERS,
    steps_dir,
)

logger = logging.getLogger("tracekit.capture")

LoadEvent = tuple[float, "str | None", int, float, str]
LOADS_GLOB = "_adapter_loads-*.jsonl"  # leading "_": Parquet readers skip these sidecars

load_events: list[LoadEvent] = []  # loads seen in this process
lora_names: dict[int, str] = {}  # lora_int_id -> name


class _State:
    hook_active = False  # True in the process that runs the scheduler hook


state = _State()


def record_load(event: LoadEvent) -> None:
    """Keep a load for the step rows: in memory where the scheduler hook runs, else in
    this process's sidecar file."""
    if state.hook_active:
        load_events.append(event)
        return
    directory = steps_dir()
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / f"_adapter_loads-{os.getpid()}.jsonl").open("a") as f:
            f.write(json.dumps(list(event)) + "\n")
    except OSError as e:
        logger.warning("tracekit: cannot record an adapter load: %s", e)


class LoadMerger:
    """Attributes adapter-load events to the step rows that contain them, at flush time."""

    def __init__(self, directory: Path, t0: float):
        self.directory = directory
        self.t0 = t0
        self.offsets: dict[Path, int] = {}
        self.carry: list[LoadEvent] = []

    def _drain(self) -> list[LoadEvent]:
        events = self.carry
        self.carry = []
        n = len(load_events)  # take a prefix: the engine thread may append meanwhile
        events += load_events[:n]
        del load_events[:n]
        for path in self.directory.glob(LOADS_GLOB):
            try:
                with path.open("rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                try:
                    t, name, lora_id, secs, kind = json.loads(line)
                    events.append((float(t), name, int(lora_id), float(secs), str(kind)))
                except (ValueError, TypeError):
                    continue
        return sorted(events, key=lambda e: e[0])

    def merge(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        events = self._drain()
        if not events or not rows:
            self.carry = events
            return rows
        ends = [self.t0 + r[1] + r[2] for r in rows]
        out = [list(r) for r in rows]
        for ev in events:
            t, name, lora_id, secs, kind = ev
            i = bisect.bisect_left(ends, t)
            if i == len(out):
                self.carry.append(ev)  # belongs to a step not closed yet
                continue
            if t < self.t0 + out[i][1]:
                # Outside any step: warm-up, start-up registration of --lora-modules, or
                # /v1/load_lora_adapter while idle. It costs no step time: not a step's load.
                continue
            row = out[i]
            row[COL_ADAPTER_LOAD_S] = (row[COL_ADAPTER_LOAD_S] or 0.0) + secs
            if kind == "gpu":
                row[COL_ADAPTER_LOADS] = (row[COL_ADAPTER_LOADS] or 0) + 1
                row[COL_LOADED_ADAPTERS] = [*(row[COL_LOADED_ADAPTERS] or []),
                                            name or lora_names.get(lora_id, str(lora_id))]
        return [tuple(r) for r in out]
