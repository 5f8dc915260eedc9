"""The twin's public interface: what replay and predictor call.

Stable signatures; the implementations live in `twin.engine` (scheduler and the
simulation loop), `twin.profile` / `twin.timing` / `twin.memory` (profiles, step-time
and KV-capacity models).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa


@dataclass(frozen=True)
class ServingConfig:
    """vLLM engine arguments the twin models, named as vLLM names them.

    Defaults mirror vLLM's own (`EngineArgs`) where they apply; the paper's runs used
    `max_num_seqs=2048, max_num_batched_tokens=2048`."""

    max_loras: int = 1
    # None = vLLM's default: the CPU cache holds as many adapters as GPU slots.
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_lora: bool = True
    # Override of the KV capacity in tokens (e.g. taken from a captured server); None = model it.
    kv_capacity_tokens: int | None = None
    max_model_len: int | None = None

    @property
    def cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SimResult:
    """What `simulate` returns: results and (optionally) steps in the tracekit schemas."""

    results: pa.Table  # tracekit results schema (conforming columns)
    steps: pa.Table | None  # tracekit steps schema, when asked for
    summary: dict[str, Any]  # tracekit.metrics.summarize(...) plus twin counters
    context: dict[str, Any] = field(default_factory=dict)  # to write as tracekit.context


def simulate(
    trace: pl.DataFrame,
    profile: Any,
    config: ServingConfig,
    *,
    trace_context: dict[str, Any] | None = None,
    window_s: float | None = None,
    record_steps: bool = False,
) -> SimResult:
    """Simulate vLLM serving `trace` under `config` with the timing of `profile`.

    `profile` is a `twin.profile.Profile` or a name/path accepted by `load_profile`.
    `window_s`: requests still unfinished at the end are `unfinished` (None = the trace
    context's `window_s`, else run until every request finishes)."""
    from twin.engine import simulate as _simulate

    return _simulate(
        trace, profile, config, trace_context=trace_context, window_s=window_s, record_steps=record_steps
    )
