"""vLLM step-capture plugin: one steps-schema row per executed engine batch, as Parquet parts.

Installed into the vLLM environment with `pip install 'lora-tracekit[vllm-plugin]'`, it is
found by vLLM through two entry points and does nothing unless `TRACEKIT_STEPS_DIR` names
an output directory:

- `vllm.general_plugins` (`tracekit_steps`) -> `register_general_plugin`: runs in every
  vLLM process. When
  enabled it wraps `EngineCore.__init__` so that, inside the EngineCore process, the
  scheduler's `schedule` and `update_from_output` of that engine are timed and read: the
  exact batch (prefill and decode requests and tokens, context tokens, the adapters in
  it), queue lengths, KV usage and preemptions. It also wraps the LoRA managers'
  loading (disk -> CPU cache) and activation (CPU -> GPU slot) to record adapter loads.
- `vllm.stat_logger_plugins` (`tracekit_steps_stats`) -> `TracekitStepLogger`: runs in
  the API server process. It checks once that the stats fields it reads exist (failing
  loudly otherwise) and, only if the EngineCore hook is not active (e.g.
  `VLLM_PLUGINS=tracekit_steps_stats` leaves it out), writes coarser rows from vLLM's
  per-iteration stats (`source: vllm-stat-logger`; needs
  `--enable-logging-iteration-details`).

Rows are buffered in memory and written by a background thread every
`TRACEKIT_STEPS_FLUSH_S` seconds (default 10) and at engine shutdown / interpreter exit,
so the engine loop only appends a tuple. A write error is logged once; the engine is
never disturbed. Pinned and tested against vLLM 0.32.0 (CPU build).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger("tracekit.vllm_plugin")

ENV_DIR = "TRACEKIT_STEPS_DIR"
ENV_FLUSH = "TRACEKIT_STEPS_FLUSH_S"
HOOK_MARKER = "_tracekit_engine_hook.json"  # leading "_": Parquet readers skip it
ERROR_FILE = "_tracekit_error.txt"
ENV_SHUTDOWN_GRACE = "TRACEKIT_SHUTDOWN_GRACE_S"  # EngineCore's time to flush before SIGKILL
IDLE_FLUSH_S = 0.5  # write buffered rows once the engine has been idle this long
SHUTDOWN_FLUSH_S = 1.0  # while a shutdown drains, write at least this often
MAX_BUFFERED_ROWS = 2_000_000  # if writes keep failing, drop the oldest rows beyond this

try:  # the stat logger must subclass vLLM's base; outside the vLLM env this module still imports
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError:  # pragma: no cover - exercised only without vLLM
    StatLoggerBase = object  # type: ignore[assignment,misc]

COLUMNS = (
    "step", "t_s", "duration_s", "num_running", "num_waiting", "prefill_reqs",
    "prefill_tokens", "decode_reqs", "decode_tokens", "active_adapters", "kv_usage",
    "num_preempted", "adapter_loads", "context_tokens", "adapter_load_s",
    "loaded_adapters", "engine_elapsed_s",
)  # fmt: skip


def steps_dir() -> Path | None:
    """The output directory, or None when capture is off."""
    d = os.environ.get(ENV_DIR, "").strip()
    return Path(d) if d else None


def _vllm_version() -> str | None:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001 - version is informational only
        return None


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
                self._writer.write_part(_rows_to_table(rows))
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

    table = conform(_rows_to_table([(0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, [], 0.0, 0, 0, 0, 0.0, [], None)]), "steps")
    pq.write_table(table, pa.BufferOutputStream(), compression="zstd")


def _rows_to_table(rows: list[tuple[Any, ...]]) -> Any:
    import pyarrow as pa

    from tracekit.schema import full_schema

    cols = list(zip(*rows, strict=True))
    schema = full_schema("steps")
    return pa.table({name: pa.array(col, type=schema.field(name).type) for name, col in zip(COLUMNS, cols, strict=True)})


def _fail_loudly(directory: Path | None, msg: str) -> None:
    """A vLLM whose internals lack what we read: say so once, in the log and the output dir."""
    text = f"tracekit step capture disabled: {msg} (vLLM {_vllm_version()}; tested with 0.32.0)"
    logger.error(text)
    print(f"tracekit: ERROR {text}", file=sys.stderr, flush=True)
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / ERROR_FILE).write_text(text + "\n")
        except OSError:
            pass


# --- configuration context -----------------------------------------------------------------


def _adapter_rank(path: str | None) -> int | None:
    if not path:
        return None
    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lora_modules_from_argv(argv: list[str]) -> dict[str, str]:
    """`--lora-modules name=path ...` (or JSON items) from the server's command line.

    The EngineCore process never sees the front end's adapter list, but it inherits its
    argv (fork, or multiprocessing spawn's `sys.argv` preparation), so we read it there."""
    items: list[str] = []
    collecting = False
    for arg in argv:
        if arg == "--lora-modules" or arg.startswith("--lora-modules="):
            collecting = True
            if "=" in arg.split("--lora-modules", 1)[1][:1]:
                items.append(arg.split("=", 1)[1])
        elif arg.startswith("-"):
            collecting = False
        elif collecting:
            items.append(arg)
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if item.startswith("{"):
            try:
                d = json.loads(item)
                out[str(d["name"])] = str(d["path"])
            except (ValueError, KeyError, TypeError):
                pass
        elif "=" in item:
            name, path = item.split("=", 1)
            out[name] = path
    return out


def config_context(vllm_config: Any) -> dict[str, Any]:
    """The server configuration that `twin calibrate` needs, from a VllmConfig."""
    mc = vllm_config.model_config
    sc = vllm_config.scheduler_config
    cc = vllm_config.cache_config
    lc = getattr(vllm_config, "lora_config", None)
    block_size = int(cc.block_size)
    num_blocks = getattr(cc, "num_gpu_blocks", None)
    served = getattr(mc, "served_model_name", None)
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    ctx: dict[str, Any] = {
        "source": "vllm-plugin",
        "vllm_version": _vllm_version(),
        "model": served or mc.model,
        "model_path": mc.model,
        "dtype": str(getattr(mc, "dtype", "")).replace("torch.", "") or None,
        "max_model_len": getattr(mc, "max_model_len", None),
        "enable_lora": lc is not None,
        "max_loras": int(lc.max_loras) if lc is not None else 0,
        "max_cpu_loras": int(lc.max_cpu_loras or lc.max_loras) if lc is not None else 0,
        "max_lora_rank": int(lc.max_lora_rank) if lc is not None else 0,
        "max_num_seqs": int(sc.max_num_seqs),
        "max_num_batched_tokens": int(sc.max_num_batched_tokens),
        "enable_chunked_prefill": bool(getattr(sc, "enable_chunked_prefill", True)),
        "enable_prefix_caching": bool(getattr(cc, "enable_prefix_caching", False)),
        "async_scheduling": bool(getattr(sc, "async_scheduling", False)),
        "block_size": block_size,
        "num_gpu_blocks": int(num_blocks) if num_blocks else None,
        "kv_capacity_tokens": int(num_blocks) * block_size if num_blocks else None,
        "device": str(getattr(getattr(vllm_config, "device_config", None), "device", "")) or None,
    }
    modules = lora_modules_from_argv(sys.argv)
    ctx["adapters"] = {name: {"rank": _adapter_rank(path), "path": path} for name, path in modules.items()}
    return ctx


# --- adapter loads --------------------------------------------------------------------------

# A load event: (perf_counter at its end, adapter name or None, lora_int_id, seconds, kind),
# kind "cpu" (disk -> CPU cache) or "gpu" (CPU cache -> GPU slot).
LoadEvent = tuple[float, "str | None", int, float, str]
LOADS_GLOB = "_adapter_loads-*.jsonl"  # leading "_": Parquet readers skip these sidecars

_load_events: list[LoadEvent] = []  # loads seen in this process
_lora_names: dict[int, str] = {}  # lora_int_id -> name
_hook_active = False  # True in the process that runs the scheduler hook


def _record_load(event: LoadEvent) -> None:
    """Keep a load for the step rows. In vLLM's multiprocess executor the LoRA managers
    live in a Worker process while the scheduler lives in EngineCore; the worker then
    appends its events to a sidecar file that the EngineCore recorder merges by time
    (perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine)."""
    if _hook_active:
        _load_events.append(event)
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
        n = len(_load_events)  # take a prefix: the engine thread may append meanwhile
        events += _load_events[:n]
        del _load_events[:n]
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
        import bisect

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
            row[14] = (row[14] or 0.0) + secs
            if kind == "gpu":
                row[12] = (row[12] or 0) + 1
                row[15] = [*(row[15] or []), name or _lora_names.get(lora_id, str(lora_id))]
        return [tuple(r) for r in out]


def _wrap_lora_loads() -> None:
    """Record adapter loads: disk -> CPU cache (`_load_adapter`) and CPU -> GPU slot
    (`activate_adapter`, counted only when it really moved weights into a slot)."""
    try:
        from vllm.lora.model_manager import LRUCacheLoRAModelManager
        from vllm.lora.worker_manager import WorkerLoRAManager
    except ImportError as e:
        _fail_loudly(steps_dir(), f"cannot import vLLM's LoRA managers: {e}")
        return

    orig_activate = LRUCacheLoRAModelManager.activate_adapter
    orig_load = WorkerLoRAManager._load_adapter

    def activate_adapter(self: Any, lora_id: int) -> bool:
        start = time.perf_counter()
        result = orig_activate(self, lora_id)
        if result:
            end = time.perf_counter()
            _record_load((end, _lora_names.get(lora_id), lora_id, end - start, "gpu"))
        return result

    def _load_adapter(self: Any, lora_request: Any) -> Any:
        start = time.perf_counter()
        result = orig_load(self, lora_request)
        end = time.perf_counter()
        _lora_names.setdefault(lora_request.lora_int_id, lora_request.lora_name)
        _record_load((end, lora_request.lora_name, lora_request.lora_int_id, end - start, "cpu"))
        return result

    LRUCacheLoRAModelManager.activate_adapter = activate_adapter  # type: ignore[method-assign]
    WorkerLoRAManager._load_adapter = _load_adapter  # type: ignore[method-assign]


# --- the scheduler hook (EngineCore process) --------------------------------------------------

# What the hook reads from vLLM internals; a missing one disables capture, loudly.
_SCHEDULER_ATTRS = ("schedule", "update_from_output", "requests", "get_request_counts", "kv_cache_manager",
                    "vllm_config", "shutdown")
_OUTPUT_ATTRS = ("num_scheduled_tokens", "total_num_scheduled_tokens", "scheduled_spec_decode_tokens",
                 "preempted_req_ids")
_REQUEST_ATTRS = ("num_computed_tokens", "num_prompt_tokens", "lora_request")


class StepHook:
    """Per-scheduler state: times each executed batch and builds its row.

    Timing. With the default synchronous loop, `EngineCore.step` is schedule -> execute
    -> update_from_output, and a row spans all of it. With async scheduling or a batch
    queue (GPU, pipeline parallel), batch N+1 is scheduled while batch N still runs, so
    one `step()` call is not one batch. Rows are therefore keyed by the SchedulerOutput:
    the row is built when the batch is scheduled and closed when *that* output reaches
    `update_from_output`. Its start is max(its schedule time, the previous batch's end):
    overlapping batches are cut at the previous end, so rows tile the busy time without
    double counting and each row's duration is the time the engine spent on that batch
    alone. Only the synchronous path was tested (the CPU platform forces async off)."""

    def __init__(self, scheduler: Any, recorder: StepRecorder, t0: float):
        self.scheduler = scheduler
        self.recorder = recorder
        self.t0 = t0
        self.step = 0
        self.last_end = t0
        # id(SchedulerOutput) -> (schedule start, batch fields); at most batch-queue-size long.
        self.pending: dict[int, tuple[float, tuple[Any, ...]]] = {}
        self.elapsed_ms: float | None = None
        self.known_adapters: set[str] = set(recorder.context.get("adapters", {}))

    def wrap(self) -> None:
        sched = self.scheduler
        orig_schedule: Callable[..., Any] = sched.schedule
        orig_update: Callable[..., Any] = sched.update_from_output

        def schedule(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = orig_schedule(*args, **kwargs)
            if out.total_num_scheduled_tokens > 0:  # an empty schedule runs no batch
                try:
                    self.pending[id(out)] = (start, self._batch_fields(out))
                except Exception as e:  # noqa: BLE001 - never break scheduling
                    self._disable(f"reading the scheduled batch failed: {e!r}")
            return out

        def update_from_output(scheduler_output: Any, model_output: Any) -> Any:
            result = orig_update(scheduler_output, model_output)
            entry = self.pending.pop(id(scheduler_output), None)
            if entry is not None:
                self._close_row(entry)
            return result

        sched.schedule = schedule
        sched.update_from_output = update_from_output
        sched._tracekit_hook = self

    def _disable(self, msg: str) -> None:
        _fail_loudly(self.recorder.directory, msg)
        self.pending.clear()
        # Unwrap: the class methods take over again, the engine keeps running untouched.
        for name in ("schedule", "update_from_output"):
            self.scheduler.__dict__.pop(name, None)

    def _batch_fields(self, out: Any) -> tuple[Any, ...]:
        # Runs once per step over the batch: kept to a few attribute reads per request.
        requests = self.scheduler.requests
        spec = out.scheduled_spec_decode_tokens
        prefill_reqs = prefill_tokens = decode_reqs = decode_tokens = 0
        context = 0
        adapters: set[str] = set()
        for req_id, n in out.num_scheduled_tokens.items():
            req = requests[req_id]
            computed_after = req.num_computed_tokens  # schedule() has already advanced it
            context += computed_after
            # Decode: the prompt was already computed and only one token (+ its speculative
            # tokens) is scheduled. Anything else is prefill: a (chunk of a) prompt, or a
            # recompute of prompt + outputs after preemption.
            if computed_after - n >= req.num_prompt_tokens and (n == 1 or (spec and n == 1 + len(spec.get(req_id, ())))):
                decode_reqs += 1
                decode_tokens += n
            else:
                prefill_reqs += 1
                prefill_tokens += n
            lora = req.lora_request
            if lora is not None:
                adapters.add(lora.lora_name)
        if not adapters <= self.known_adapters:
            self._learn_adapters(out, adapters - self.known_adapters)
        num_running, num_waiting = self.scheduler.get_request_counts()
        preempted = out.preempted_req_ids
        return (
            num_running, num_waiting, prefill_reqs, prefill_tokens, decode_reqs, decode_tokens,
            sorted(adapters), float(self.scheduler.kv_cache_manager.usage),
            len(preempted) if preempted else 0, context,
        )  # fmt: skip

    def _learn_adapters(self, out: Any, names: set[str]) -> None:
        """Adapters seen for the first time (rare): note their ids and, for ones loaded at
        run time (/v1/load_lora_adapter), add them to the context of later parts."""
        for req_id in out.num_scheduled_tokens:
            lora = self.scheduler.requests[req_id].lora_request
            if lora is not None and lora.lora_name in names:
                names.discard(lora.lora_name)
                _lora_names.setdefault(lora.lora_int_id, lora.lora_name)
                self._learn_adapter(lora.lora_name, getattr(lora, "lora_path", None))

    def _learn_adapter(self, name: str, path: str | None) -> None:
        self.known_adapters.add(name)
        if name in self.recorder.context.get("adapters", {}):
            return  # from --lora-modules: already in the context
        adapters = dict(self.recorder.context.get("adapters", {}))
        adapters[name] = {"rank": _adapter_rank(path), "path": path}
        self.recorder.update_context(adapters=adapters)

    def _close_row(self, entry: tuple[float, tuple[Any, ...]]) -> None:
        sched_start, fields = entry
        end = time.perf_counter()
        start = max(sched_start, self.last_end)
        self.last_end = end
        elapsed = self.elapsed_ms / 1e3 if self.elapsed_ms is not None else None
        self.elapsed_ms = None
        (num_running, num_waiting, prefill_reqs, prefill_tokens, decode_reqs, decode_tokens,
         adapters, kv_usage, preempted, context) = fields  # fmt: skip
        # Adapter-load columns start empty; LoadMerger fills them at flush time.
        self.recorder.add((
            self.step, start - self.t0, end - start, num_running, num_waiting, prefill_reqs,
            prefill_tokens, decode_reqs, decode_tokens, adapters, kv_usage, preempted,
            0, context, 0.0, [], elapsed,
        ))  # fmt: skip
        self.step += 1


def _check_attrs(obj: Any, names: tuple[str, ...], what: str) -> list[str]:
    return [f"{what}.{n}" for n in names if not hasattr(obj, n)]


def _install_scheduler_hook(scheduler: Any) -> None:
    global _hook_active
    directory = steps_dir()
    if directory is None or getattr(scheduler, "_tracekit_hook", None) is not None:
        return
    missing = _check_attrs(scheduler, _SCHEDULER_ATTRS, "Scheduler")
    if not missing:
        from vllm.v1.core.sched.output import SchedulerOutput
        from vllm.v1.request import Request

        fields = set(getattr(SchedulerOutput, "__dataclass_fields__", {}))
        missing = [f"SchedulerOutput.{n}" for n in _OUTPUT_ATTRS if n not in fields]
        init_code = Request.__init__.__code__
        names = set(init_code.co_names) | set(dir(Request))
        missing += [f"Request.{n}" for n in _REQUEST_ATTRS if n not in names]
    if missing:
        _fail_loudly(directory, "missing " + ", ".join(missing))
        return
    try:
        context = config_context(scheduler.vllm_config)
        t0 = time.perf_counter()
        context.update(t0_unix=time.time(), t0_monotonic=t0, pid=os.getpid())
        recorder = StepRecorder(directory, context, merger=LoadMerger(directory, t0))
        hook = StepHook(scheduler, recorder, t0)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / HOOK_MARKER).write_text(json.dumps(context, default=str))
        _load_events.clear()  # dummy-LoRA warm-up loads are not traffic
        hook.wrap()
        _flush_on_signal(recorder)
        _hook_active = True
    except Exception as e:  # noqa: BLE001 - never stop the engine from starting
        _fail_loudly(directory, f"could not start: {e!r}")
        return
    logger.info("tracekit: recording engine steps to %s", directory)


def _flush_on_signal(recorder: StepRecorder) -> None:
    """Start writing the buffered rows the moment SIGTERM/SIGINT reaches the EngineCore,
    in a thread (a signal handler must not wait for the writer's lock), instead of at the
    engine loop's next turn, which the process manager's SIGKILL may pre-empt. vLLM's own
    handler (registered before the engine is built) runs as before."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.getsignal(sig)
        if not callable(prev):
            continue  # default or ignored: not vLLM's EngineCore, leave it alone

        def handler(signum: int, frame: Any, prev: Callable[..., Any] = prev) -> None:
            recorder.hurry()
            prev(signum, frame)

        signal.signal(sig, handler)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the block is done, then deliver them as they would have
    been. The EngineCore resets both to the default action before its teardown, and the
    process manager's own SIGTERM often lands there, a moment after the one that started
    the shutdown: it would kill the process in the middle of writing the last steps."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGTERM, signal.SIGINT)
    prev = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(got):
            signal.raise_signal(sig)


_installed = False


def register_general_plugin() -> None:
    """`vllm.general_plugins` entry point: called once in every vLLM process.

    With TRACEKIT_STEPS_DIR unset it returns at once: nothing is wrapped, zero cost.
    `EngineCore.__init__` loads general plugins at its very start, before it builds the
    scheduler, so wrapping `Scheduler.__init__` here reaches the engine's scheduler."""
    global _installed
    if _installed or steps_dir() is None:
        return
    _installed = True
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    orig_init = Scheduler.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        _install_scheduler_hook(self)

    Scheduler.__init__ = __init__  # type: ignore[method-assign]

    # vLLM's own iteration timing (model output wait), when iteration details are on.
    orig_attach = getattr(EngineCore, "_attach_iteration_details", None)
    if orig_attach is not None:

        def _attach_iteration_details(self: Any, outputs: Any, details: Any) -> Any:
            hook = getattr(getattr(self, "scheduler", None), "_tracekit_hook", None)
            if hook is not None and details is not None and not getattr(details, "is_dummy", False):
                hook.elapsed_ms = float(details.elapsed_ms)
            return orig_attach(self, outputs, details)

        EngineCore._attach_iteration_details = _attach_iteration_details  # type: ignore[method-assign]

    # A shutdown requested by other means than a signal (the API server's shutdown
    # message): EngineCoreProc._handle_shutdown sees it first, every loop turn.
    try:
        from vllm.v1.engine.core import EngineCoreProc
    except ImportError:  # pragma: no cover - other vLLM layouts: the idle flush still applies
        EngineCoreProc = None  # type: ignore[assignment,misc]
    orig_handle = getattr(EngineCoreProc, "_handle_shutdown", None)
    if orig_handle is not None:

        def _handle_shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
            hook = getattr(getattr(self, "scheduler", None), "_tracekit_hook", None)
            state = getattr(getattr(self, "shutdown_state", None), "name", "RUNNING")
            if hook is not None and state != "RUNNING" and not hook.recorder.shutting_down:
                hook.recorder.hurry()
            return orig_handle(self, *args, **kwargs)

        EngineCoreProc._handle_shutdown = _handle_shutdown  # type: ignore[union-attr]

    # Write the last rows before the executor's teardown, which takes seconds and may
    # outlast the grace: EngineCore.shutdown runs on every exit path, including a step
    # that failed because the workers were stopped by the same signal.
    orig_core_shutdown = EngineCore.shutdown

    def shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        hook = getattr(getattr(self, "scheduler", None), "_tracekit_hook", None)
        if hook is not None:
            with signals_deferred():
                hook.recorder.close()
        return orig_core_shutdown(self, *args, **kwargs)

    EngineCore.shutdown = shutdown  # type: ignore[method-assign]
    _grant_shutdown_grace()
    _wrap_lora_loads()


def _grant_shutdown_grace() -> None:
    """In the API server process: give the EngineCore a few seconds between SIGTERM and
    SIGKILL so that the flush above runs. With vLLM's default `--shutdown-timeout 0`
    the process manager kills the EngineCore right after SIGTERM, and the rows of the
    last seconds (a burst still running when the server stops) were lost. vLLM grants
    the same kind of window on ROCm for device teardown; the EngineCore exits as soon as
    it is done, so a normal shutdown does not wait for the whole grace."""
    try:
        from vllm.v1.engine import utils as engine_utils
    except ImportError:  # pragma: no cover - other vLLM layouts: the idle flush still applies
        return
    orig = getattr(engine_utils, "get_engine_process_shutdown_timeout", None)
    if orig is None or getattr(orig, "_tracekit", False):
        return
    grace = float(os.environ.get(ENV_SHUTDOWN_GRACE, "5"))

    def get_engine_process_shutdown_timeout(request_timeout: Any, process_timeout: Any) -> Any:
        t = orig(request_timeout, process_timeout)
        # Only where vLLM would kill at once (both timeouts zero), as its ROCm rule does.
        if request_timeout == 0 and process_timeout == 0:
            return max(t or 0.0, grace)
        return t

    get_engine_process_shutdown_timeout._tracekit = True  # type: ignore[attr-defined]
    engine_utils.get_engine_process_shutdown_timeout = get_engine_process_shutdown_timeout


# --- the stat logger (API server process) --------------------------------------------------

_STATS_FIELDS = ("num_running_reqs", "num_waiting_reqs", "kv_cache_usage", "running_lora_adapters", "iteration_details")
_ITER_FIELDS = ("iteration_timestamp", "num_preempted_reqs")
_DETAIL_FIELDS = ("num_ctx_requests", "num_ctx_tokens", "num_generation_requests", "num_generation_tokens", "elapsed_ms")


class TracekitStepLogger(StatLoggerBase):  # type: ignore[misc,valid-type]
    """`vllm.stat_logger_plugins` entry point.

    vLLM instantiates it in the API server process and calls `record` once per engine
    step. With capture off, `record` returns at once. With capture on and the EngineCore
    hook active, it only checks the stats fields once. Without the hook it writes rows
    from the stats (needs `--enable-logging-iteration-details` for per-step tokens and
    timing); those rows cannot tell which adapters were in the batch (it uses the running
    ones), nor adapter loads or context tokens."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.directory = steps_dir()
        self.vllm_config = vllm_config
        self.engine_index = engine_index
        self.enabled = self.directory is not None
        self.checked = False
        self.fallback: StepRecorder | None = None
        self.step = 0
        self.t0 = time.perf_counter()

    def log_engine_initialized(self) -> None:
        if not self.enabled or self.directory is None:
            return
        if (self.directory / HOOK_MARKER).exists():
            return  # the EngineCore hook writes the rows
        obs = getattr(self.vllm_config, "observability_config", None)
        if not getattr(obs, "enable_logging_iteration_details", False):
            _fail_loudly(self.directory, "the EngineCore hook is not active and vLLM was started without "
                         "--enable-logging-iteration-details, so no per-step data is available")
            self.enabled = False
            return
        logger.warning(
            "tracekit: EngineCore hook not active (is the general plugin filtered out by VLLM_PLUGINS?); "
            "recording coarser steps from vLLM stats"
        )
        try:
            ctx = config_context(self.vllm_config)
            ctx.update(source="vllm-stat-logger", t0_unix=time.time(), t0_monotonic=self.t0)
            self.fallback = StepRecorder(self.directory, ctx, prefix="steps-stats")
        except Exception as e:  # noqa: BLE001
            _fail_loudly(self.directory, f"stat logger could not start: {e!r}")
            self.enabled = False

    def _check(self, scheduler_stats: Any, iteration_stats: Any) -> bool:
        self.checked = True
        missing = _check_attrs(scheduler_stats, _STATS_FIELDS, "SchedulerStats")
        if iteration_stats is not None:
            missing += _check_attrs(iteration_stats, _ITER_FIELDS, "IterationStats")
        if missing:
            _fail_loudly(self.directory, "missing " + ", ".join(missing))
            self.enabled = False
            if self.fallback is not None:
                self.fallback.close()
                self.fallback = None
        return self.enabled

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
        if not self.enabled or scheduler_stats is None:
            return
        if not self.checked and not self._check(scheduler_stats, iteration_stats):
            return
        if self.fallback is None:
            return
        details = scheduler_stats.iteration_details
        if details is None or getattr(details, "is_dummy", False):
            return
        now = time.perf_counter()
        dur = float(details.elapsed_ms) / 1e3
        adapters = sorted(k for k, v in (scheduler_stats.running_lora_adapters or {}).items() if v)
        self.fallback.add((
            self.step, max(now - dur - self.t0, 0.0), dur, scheduler_stats.num_running_reqs,
            scheduler_stats.num_waiting_reqs, details.num_ctx_requests, details.num_ctx_tokens,
            details.num_generation_requests, details.num_generation_tokens, adapters,
            float(scheduler_stats.kv_cache_usage),
            iteration_stats.num_preempted_reqs if iteration_stats is not None else None,
            None, None, None, None, dur,
        ))  # fmt: skip
        self.step += 1
