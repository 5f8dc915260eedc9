"""The step recorder: buffers one row per executed engine batch and writes steps parts.

The engine thread only appends a tuple (`add`); a background thread writes Parquet parts
every `TRACEKIT_STEPS_FLUSH_S` seconds (default 10), after `IDLE_FLUSH_S` of engine
idleness, every `SHUTDOWN_FLUSH_S` once the server is stopping, and at `close`. A write
error is reported once and the rows stay buffered (bounded); the engine is never
disturbed. Nothing here imports vLLM.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("tracekit.capture")

ENV_DIR = "TRACEKIT_STEPS_DIR"
ENV_FLUSH = "TRACEKIT_STEPS_FLUSH_S"
HOOK_MARKER = "_tracekit_engine_hook.json"  # leading "_": Parquet readers skip it
ERROR_FILE = "_tracekit_error.txt"
IDLE_FLUSH_S = 0.5  # write buffered rows once the engine has been idle this long
SHUTDOWN_FLUSH_S = 1.0  # while a shutdown drains, write at least this often
MAX_BUFFERED_ROWS = 2_000_000  # if writes keep failing, drop the oldest rows beyond this

COLUMNS = (
    "step", "t_s", "duration_s", "num_running", "num_waiting", "prefill_reqs",
    "prefill_tokens", "decode_reqs", "decode_tokens", "active_adapters", "kv_usage",
    "num_preempted", "adapter_loads", "context_tokens", "adapter_load_s",
    "loaded_adapters", "engine_elapsed_s", "cached_tokens",
)  # fmt: skip
# Positions LoadMerger fills at flush time.
COL_ADAPTER_LOADS, COL_ADAPTER_LOAD_S, COL_LOADED_ADAPTERS = 12, 14, 15


def steps_dir() -> Path | None:
    """The output directory, or None when capture is off."""
    d = os.environ.get(ENV_DIR, "").strip()
    return Path(d) if d else None


def vllm_version() -> str | None:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001 - version is informational only
        return None


def fail_loudly(directory: Path | None, msg: str) -> None:
    """A vLLM whose internals lack what we read: say so once, in the log and the output dir."""
    text = f"tracekit step capture disabled: {msg} (vLLM {vllm_version()}; tested with 0.32.0)"
    logger.error(text)
    print(f"tracekit: ERROR {text}", file=sys.stderr, flush=True)
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / ERROR_FILE).write_text(text + "\n")
        except OSError:
            pass


class StepRecorder:
    """Buffers step rows and writes them as steps-schema parts; never raises to its caller."""

    def __init__(self, directory: Path, context: Mapping[str, Any], flush_every_s: float | None = None,
                 prefix: str = "steps", merger: Any = None):
        from tracekit.schema import KIND_STEPS, PartWriter, new_context

        self.directory = directory
        self.flush_every_s = flush_every_s if flush_every_s is not None else float(os.environ.get(ENV_FLUSH, "10"))
        self.context = new_context(**context)
        self._writer = PartWriter(directory, KIND_STEPS, self.context, prefix=prefix)
        # A deque: the engine thread appends while the flusher pops from the left, each
        # operation atomic under the GIL, so no row is lost to a swap race.
        self._rows: deque[tuple[Any, ...]] = deque()
        self._merger = merger  # fills adapter-load columns from load events, if given
        self._write_lock = threading.Lock()  # one write at a time (flusher vs shutdown)
        self._error_logged = False
        self.last_add = time.perf_counter()
        self.rows_dropped = 0
        self._stop = threading.Event()
        self.shutting_down = False  # set once the server is shutting down
        _warm_up_writer()
        self._thread = threading.Thread(target=self._flush_loop, name="tracekit-steps-flush", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def add(self, row: tuple[Any, ...]) -> None:
        self._rows.append(row)  # deque.append is atomic under the GIL: no lock on the hot path
        self.last_add = time.perf_counter()

    @property
    def pending(self) -> int:
        """Rows not written yet."""
        return len(self._rows)

    def update_context(self, **items: Any) -> None:
        """Context for parts written from now on (e.g. adapters first seen at run time)."""
        self.context.update(items)
        self._writer.context = dict(self.context)

    def _flush_loop(self) -> None:
        # Write every flush_every_s, and also as soon as the engine has been idle for
        # IDLE_FLUSH_S: vLLM kills the EngineCore at once on shutdown (its default
        # --shutdown-timeout is 0), so rows of a finished burst must not wait for a timer.
        last = time.perf_counter()
        while not self._stop.wait(min(self.flush_every_s, IDLE_FLUSH_S / 2)):
            now = time.perf_counter()
            every = SHUTDOWN_FLUSH_S if self.shutting_down else self.flush_every_s
            due = now - last >= every or now - self.last_add >= IDLE_FLUSH_S
            if self._rows and due:
                self.flush()
                last = now

    def flush(self) -> None:
        with self._write_lock:
            rows = [self._rows.popleft() for _ in range(len(self._rows))]
            if not rows:
                return
            try:
                if self._merger is not None:
                    rows = self._merger.merge(rows)
                self._writer.write_part(rows_to_table(rows))
            except Exception as e:  # noqa: BLE001 - a capture problem must never stop the engine
                self._report_error(f"cannot write steps to {self.directory}: {e}")
                self._rows.extendleft(reversed(rows))  # keep them for the next try, bounded
                excess = len(self._rows) - MAX_BUFFERED_ROWS
                for _ in range(max(excess, 0)):
                    self._rows.popleft()
                self.rows_dropped += max(excess, 0)

    def _report_error(self, msg: str) -> None:
        if self._error_logged:
            return
        self._error_logged = True
        logger.error("tracekit: %s (steps stay buffered; further errors not logged)", msg)
        print(f"tracekit: ERROR {msg}", file=sys.stderr, flush=True)

    def hurry(self) -> None:
        """The server is stopping: write what is buffered now, in a thread (a signal
        handler must not wait for the writer's lock), and from now on every
        SHUTDOWN_FLUSH_S, so that a kill after the grace loses at most that long. A draining
        shutdown keeps stepping for a while; those rows are written as they come."""
        self.shutting_down = True
        threading.Thread(target=self.flush, name="tracekit-steps-shutdown-flush", daemon=True).start()

    def close(self) -> None:
        """Stop the flush loop and write what is left; later calls write any rows added since."""
        self._stop.set()
        self.flush()


def _warm_up_writer() -> None:
    """Import and exercise the Parquet path once at start-up: the flush at shutdown has
    only milliseconds before vLLM kills the EngineCore, too few for first-time imports."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tracekit.schema import conform

    table = conform(rows_to_table([(0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, [], 0.0, 0, 0, 0, 0.0, [], None, 0)]), "steps")
    pq.write_table(table, pa.BufferOutputStream(), compression="zstd")


def rows_to_table(rows: list[tuple[Any, ...]]) -> Any:
    import pyarrow as pa

    from tracekit.schema import full_schema

    cols = list(zip(*rows, strict=True))
    schema = full_schema("steps")
    return pa.table({name: pa.array(col, type=schema.field(name).type) for name, col in zip(COLUMNS, cols, strict=True)})
