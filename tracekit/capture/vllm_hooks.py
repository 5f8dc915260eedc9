"""Every hook of the step plugin into vLLM's internals, in one place.

`register_general_plugin` is the `vllm.general_plugins` entry point: vLLM calls it in
every one of its processes. With `TRACEKIT_STEPS_DIR` unset it returns at once and
nothing is wrapped. Otherwise it wraps the vLLM attributes below; a missing one
disables capture with one loud error (in the log and `_tracekit_error.txt`) and the
engine keeps serving. Pinned and tested against vLLM 0.32.0 (CPU build).

What is wrapped (the process it runs in):
- `vllm.v1.core.sched.scheduler.Scheduler.__init__` (EngineCore): installs `StepHook`
  on each scheduler built, which replaces that instance's `schedule` and
  `update_from_output` and reads, once per step:
  - `Scheduler.requests`, `.get_request_counts()`, `.kv_cache_manager.usage`,
    `.vllm_config`;
  - `SchedulerOutput.num_scheduled_tokens`, `.total_num_scheduled_tokens`,
    `.scheduled_spec_decode_tokens`, `.preempted_req_ids`, `.scheduled_new_reqs`
    (`NewRequestData.num_computed_tokens`: the prefix-cache hit of a request entering
    the batch);
  - `Request.num_computed_tokens`, `.num_prompt_tokens`, `.lora_request`
    (`LoRARequest.lora_name`, `.lora_int_id`, `.lora_path`).
- `vllm.v1.engine.core.EngineCore._attach_iteration_details` (EngineCore): vLLM's own
  timing of the model output, `details.elapsed_ms`, `details.is_dummy`.
- `vllm.v1.engine.core.EngineCoreProc._handle_shutdown` (EngineCore): sees a shutdown
  requested by message (`self.shutdown_state.name`) and starts writing.
- `vllm.v1.engine.core.EngineCore.shutdown` (EngineCore): writes the last steps before
  the executor's teardown, holding a late SIGTERM meanwhile.
- `vllm.v1.engine.utils.get_engine_process_shutdown_timeout` (API server): a grace
  window between SIGTERM and SIGKILL of the EngineCore, only where vLLM gives none.
- `vllm.lora.model_manager.LRUCacheLoRAModelManager.activate_adapter` and
  `vllm.lora.worker_manager.WorkerLoRAManager._load_adapter` (Worker): adapter loads.
- The server's configuration, read once (`config_context`): `VllmConfig.model_config`
  (`.model`, `.served_model_name`, `.dtype`, `.max_model_len`), `.scheduler_config`
  (`.max_num_seqs`, `.max_num_batched_tokens`, `.enable_chunked_prefill`,
  `.async_scheduling`, `.scheduler_reserve_full_isl`), `.cache_config` (`.block_size`,
  `.num_gpu_blocks`, `.enable_prefix_caching`), `.lora_config` (`.max_loras`,
  `.max_cpu_loras`, `.max_lora_rank`), `.device_config.device`; and the server's
  `--lora-modules` from `sys.argv`.
- The stat-logger fallback (`stat_logger.py`) subclasses
  `vllm.v1.metrics.loggers.StatLoggerBase` and reads the `SchedulerStats`,
  `IterationStats` and iteration-details fields listed here as `STATS_FIELDS`,
  `ITER_FIELDS` and `DETAIL_FIELDS`.
- `vllm.__version__`, written into each capture's context (`steps.vllm_version`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracekit.capture import loads
from tracekit.capture.loads import LoadMerger, lora_names, record_load
from tracekit.capture.signals import flush_on_signal, signals_deferred
from tracekit.capture.steps import (
    HOOK_MARKER,
    StepRecorder,
    fail_loudly,
    logger,
    steps_dir,
    vllm_version,
)

ENV_SHUTDOWN_GRACE = "TRACEKIT_SHUTDOWN_GRACE_S"  # EngineCore's time to flush before SIGKILL

# What the hook reads from vLLM internals; a missing one disables capture, loudly.
SCHEDULER_ATTRS = ("schedule", "update_from_output", "requests", "get_request_counts", "kv_cache_manager",
                   "vllm_config", "shutdown")
OUTPUT_ATTRS = ("num_scheduled_tokens", "total_num_scheduled_tokens", "scheduled_spec_decode_tokens",
                "preempted_req_ids", "scheduled_new_reqs")
NEW_REQUEST_ATTRS = ("num_computed_tokens",)
REQUEST_ATTRS = ("num_computed_tokens", "num_prompt_tokens", "lora_request")
# The stat-logger fallback's fields.
STATS_FIELDS = ("num_running_reqs", "num_waiting_reqs", "kv_cache_usage", "running_lora_adapters", "iteration_details")
ITER_FIELDS = ("iteration_timestamp", "num_preempted_reqs")
DETAIL_FIELDS = ("num_ctx_requests", "num_ctx_tokens", "num_generation_requests", "num_generation_tokens", "elapsed_ms")


def check_attrs(obj: Any, names: tuple[str, ...], what: str) -> list[str]:
    return [f"{what}.{n}" for n in names if not hasattr(obj, n)]


# --- the server's configuration --------------------------------------------------------------


def adapter_rank(path: str | None) -> int | None:
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
    """The server configuration that `twin calibrate` and the twin need, from a VllmConfig,
    by vLLM's names."""
    mc = vllm_config.model_config
    sc = vllm_config.scheduler_config
    cc = vllm_config.cache_config
    lc = getattr(vllm_config, "lora_config", None)
    block_size = int(cc.block_size)
    num_blocks = getattr(cc, "num_gpu_blocks", None)
    served = getattr(mc, "served_model_name", None)
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    reserve = getattr(sc, "scheduler_reserve_full_isl", None)
    ctx: dict[str, Any] = {
        "source": "vllm-plugin",
        "vllm_version": vllm_version(),
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
        "scheduler_reserve_full_isl": bool(reserve) if reserve is not None else None,
        "async_scheduling": bool(getattr(sc, "async_scheduling", False)),
        "block_size": block_size,
        "num_gpu_blocks": int(num_blocks) if num_blocks else None,
        "kv_capacity_tokens": int(num_blocks) * block_size if num_blocks else None,
        "device": str(getattr(getattr(vllm_config, "device_config", None), "device", "")) or None,
    }
    modules = lora_modules_from_argv(sys.argv)
    ctx["adapters"] = {name: {"rank": adapter_rank(path), "path": path} for name, path in modules.items()}
    return ctx


# --- the scheduler hook (EngineCore process) --------------------------------------------------


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
    alone. Only the synchronous path was tested (the CPU platform forces async off).

    A row is added before `update_from_output` returns, so before the EngineCore sends
    that step's tokens to the API server: a client never receives a token whose step is
    not buffered yet."""

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
        fail_loudly(self.recorder.directory, msg)
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
        # A request entering the batch: its computed tokens at scheduling are the prefix
        # cache's hit (taken before schedule() advanced them).
        cached = 0
        for new in out.scheduled_new_reqs:
            cached += new.num_computed_tokens
        if not adapters <= self.known_adapters:
            self._learn_adapters(out, adapters - self.known_adapters)
        num_running, num_waiting = self.scheduler.get_request_counts()
        preempted = out.preempted_req_ids
        return (
            num_running, num_waiting, prefill_reqs, prefill_tokens, decode_reqs, decode_tokens,
            sorted(adapters), float(self.scheduler.kv_cache_manager.usage),
            len(preempted) if preempted else 0, context, cached,
        )  # fmt: skip

    def _learn_adapters(self, out: Any, names: set[str]) -> None:
        """Adapters seen for the first time (rare): note their ids and, for ones loaded at
        run time (/v1/load_lora_adapter), add them to the context of later parts."""
        for req_id in out.num_scheduled_tokens:
            lora = self.scheduler.requests[req_id].lora_request
            if lora is not None and lora.lora_name in names:
                names.discard(lora.lora_name)
                lora_names.setdefault(lora.lora_int_id, lora.lora_name)
                self._learn_adapter(lora.lora_name, getattr(lora, "lora_path", None))

    def _learn_adapter(self, name: str, path: str | None) -> None:
        self.known_adapters.add(name)
        if name in self.recorder.context.get("adapters", {}):
            return  # from --lora-modules: already in the context
        adapters = dict(self.recorder.context.get("adapters", {}))
        adapters[name] = {"rank": adapter_rank(path), "path": path}
        self.recorder.update_context(adapters=adapters)

    def _close_row(self, entry: tuple[float, tuple[Any, ...]]) -> None:
        sched_start, fields = entry
        end = time.perf_counter()
        start = max(sched_start, self.last_end)
        self.last_end = end
        elapsed = self.elapsed_ms / 1e3 if self.elapsed_ms is not None else None
        self.elapsed_ms = None
        (num_running, num_waiting, prefill_reqs, prefill_tokens, decode_reqs, decode_tokens,
         adapters, kv_usage, preempted, context, cached) = fields  # fmt: skip
        # Adapter-load columns start empty; LoadMerger fills them at flush time.
        self.recorder.add((
            self.step, start - self.t0, end - start, num_running, num_waiting, prefill_reqs,
            prefill_tokens, decode_reqs, decode_tokens, adapters, kv_usage, preempted,
            0, context, 0.0, [], elapsed, cached,
        ))  # fmt: skip
        self.step += 1


def install_scheduler_hook(scheduler: Any) -> None:
    directory = steps_dir()
    if directory is None or getattr(scheduler, "_tracekit_hook", None) is not None:
        return
    missing = check_attrs(scheduler, SCHEDULER_ATTRS, "Scheduler")
    if not missing:
        from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
        from vllm.v1.request import Request

        fields = set(getattr(SchedulerOutput, "__dataclass_fields__", {}))
        missing = [f"SchedulerOutput.{n}" for n in OUTPUT_ATTRS if n not in fields]
        new_fields = set(getattr(NewRequestData, "__dataclass_fields__", {}))
        missing += [f"NewRequestData.{n}" for n in NEW_REQUEST_ATTRS if n not in new_fields]
        init_code = Request.__init__.__code__
        names = set(init_code.co_names) | set(dir(Request))
        missing += [f"Request.{n}" for n in REQUEST_ATTRS if n not in names]
    if missing:
        fail_loudly(directory, "missing " + ", ".join(missing))
        return
    try:
        context = config_context(scheduler.vllm_config)
        t0 = time.perf_counter()
        context.update(t0_unix=time.time(), t0_monotonic=t0, pid=os.getpid())
        recorder = StepRecorder(directory, context, merger=LoadMerger(directory, t0))
        hook = StepHook(scheduler, recorder, t0)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / HOOK_MARKER).write_text(json.dumps(context, default=str))
        loads.load_events.clear()  # dummy-LoRA warm-up loads are not traffic
        hook.wrap()
        flush_on_signal(recorder)
        loads.state.hook_active = True
    except Exception as e:  # noqa: BLE001 - never stop the engine from starting
        fail_loudly(directory, f"could not start: {e!r}")
        return
    logger.info("tracekit: recording engine steps to %s", directory)


class _Installed:
    done = False


installed = _Installed()


def register_general_plugin() -> None:
    """`vllm.general_plugins` entry point: called once in every vLLM process.

    With TRACEKIT_STEPS_DIR unset it returns at once: nothing is wrapped, zero cost.
    `EngineCore.__init__` loads general plugins at its very start, before it builds the
    scheduler, so wrapping `Scheduler.__init__` here reaches the engine's scheduler."""
    if installed.done or steps_dir() is None:
        return
    installed.done = True
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    orig_init = Scheduler.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        install_scheduler_hook(self)

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


def _wrap_lora_loads() -> None:
    """Record adapter loads: disk -> CPU cache (`_load_adapter`) and CPU -> GPU slot
    (`activate_adapter`, counted only when it really moved weights into a slot)."""
    try:
        from vllm.lora.model_manager import LRUCacheLoRAModelManager
        from vllm.lora.worker_manager import WorkerLoRAManager
    except ImportError as e:
        fail_loudly(steps_dir(), f"cannot import vLLM's LoRA managers: {e}")
        return

    orig_activate = LRUCacheLoRAModelManager.activate_adapter
    orig_load = WorkerLoRAManager._load_adapter

    def activate_adapter(self: Any, lora_id: int) -> bool:
        start = time.perf_counter()
        result = orig_activate(self, lora_id)
        if result:
            end = time.perf_counter()
            record_load((end, lora_names.get(lora_id), lora_id, end - start, "gpu"))
        return result

    def _load_adapter(self: Any, lora_request: Any) -> Any:
        start = time.perf_counter()
        result = orig_load(self, lora_request)
        end = time.perf_counter()
        lora_names.setdefault(lora_request.lora_int_id, lora_request.lora_name)
        record_load((end, lora_request.lora_name, lora_request.lora_int_id, end - start, "cpu"))
        return result

    LRUCacheLoRAModelManager.activate_adapter = activate_adapter  # type: ignore[method-assign]
    WorkerLoRAManager._load_adapter = _load_adapter  # type: ignore[method-assign]
