"""The twin's public interface: what replay and predictor call.

Stable signatures; the implementations live in `twin.engine` (scheduler and the
simulation loop), `twin.config` (the configuration and result types), `twin.profile` / `twin.timing` / `twin.memory` (profiles, step-time
and KV-capacity models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from twin.config import ServingConfig, SimResult, server_defaults

if TYPE_CHECKING:
    import polars as pl

__all__ = ["ServingConfig", "SimResult", "server_defaults", "simulate"]


def simulate(
    trace: pl.DataFrame | pa.Table,
    profile: Any,
    config: ServingConfig,
    *,
    trace_context: dict[str, Any] | None = None,
    window_s: float | None = None,
    record_steps: bool = False,
) -> SimResult:
    """Simulate vLLM serving `trace` (a polars frame or an Arrow table, the trace
    schema) under `config` with the timing of `profile`.

    `profile` is a `twin.profile.Profile` or a name/path accepted by `load_profile`.
    `window_s`: requests still unfinished at the end are `unfinished` (None = the trace
    context's `window_s`, else run until every request finishes)."""
    from twin.engine import simulate as _simulate

    return _simulate(
        trace, profile, config, trace_context=trace_context, window_s=window_s, record_steps=record_steps
    )
