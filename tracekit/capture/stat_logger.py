"""The stat-logger fallback: coarser step rows from vLLM's per-iteration stats.

`vllm.stat_logger_plugins` entry point (`tracekit_steps_stats`). vLLM instantiates it in
the API server process and calls `record` once per engine step. It checks once that the
stats fields it reads exist (failing loudly otherwise) and writes rows only when the
EngineCore hook is not active (e.g. `VLLM_PLUGINS=tracekit_steps_stats` leaves it out);
those rows need `--enable-logging-iteration-details` (`source: vllm-stat-logger`).
"""

from __future__ import annotations

import time
from typing import Any

from tracekit.capture.steps import HOOK_MARKER, StepRecorder, fail_loudly, logger, steps_dir
from tracekit.capture.vllm_hooks import ITER_FIELDS, STATS_FIELDS, check_attrs, config_context

try:  # the stat logger must subclass vLLM's base; outside the vLLM env this module still imports
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError:  # pragma: no cover - exercised only without vLLM
    StatLoggerBase = object  # type: ignore[assignment,misc]


class TracekitStepLogger(StatLoggerBase):  # type: ignore[misc,valid-type]
    """With capture off, `record` returns at once. With capture on and the EngineCore
    hook active, it only checks the stats fields once. Without the hook it writes rows
    from the stats; those rows cannot tell which adapters were in the batch (it uses
    the running ones), nor adapter loads, context or cached tokens."""

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
            fail_loudly(self.directory, "the EngineCore hook is not active and vLLM was started without "
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
            fail_loudly(self.directory, f"stat logger could not start: {e!r}")
            self.enabled = False

    def _check(self, scheduler_stats: Any, iteration_stats: Any) -> bool:
        self.checked = True
        missing = check_attrs(scheduler_stats, STATS_FIELDS, "SchedulerStats")
        if iteration_stats is not None:
            missing += check_attrs(iteration_stats, ITER_FIELDS, "IterationStats")
        if missing:
            fail_loudly(self.directory, "missing " + ", ".join(missing))
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
            None, None, None, None, dur, None,
        ))  # fmt: skip
        self.step += 1
