"""Targets behind one interface: `replay(trace, context, options) -> Replayed`.

Both targets return a results table in the tracekit results schema, on the same clock
(0 = replay start; a request's `arrival_s` is when it was due), so a real run and a twin
run of the same trace line up row for row.

Latencies (`ttft_s`, `e2e_s`) are measured from `dispatch_s`, the moment the request was
actually sent, as `vllm bench serve` does; the replay's own lag (`dispatch_s - arrival_s`)
is reported separately. On the twin, dispatch is exact (`dispatch_s = arrival_s`).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from replay.runner import (
    STATUS_NAMES,
    UNFINISHED,
    Recorder,
    RunOptions,
    new_event_loop_policy,
    run_open_loop,
)
from tracekit.schema import (
    CTX_PREFIX_BLOCK_TOKENS,
    KIND_RESULTS,
    TracekitError,
    conform,
    full_schema,
)


@dataclass
class Replayed:
    results: pa.Table
    # Merged into the results file's context (target, url, window, flags, counters).
    context: dict[str, Any] = field(default_factory=dict)


def server_replay_context(target: Any, outcome: Any, cut_s: float | None, **server: Any) -> dict[str, Any]:
    """The results' context of a replay against real servers: `server` (which servers,
    what they loaded), then the client's settings and how the run went, and the window:
    the cut, or where an interrupted run stopped if that came first."""
    window = cut_s
    if outcome.interrupted:
        window = outcome.stopped_s if window is None else min(window, outcome.stopped_s or window)
    ctx: dict[str, Any] = {
        **server,
        "max_concurrency": target.max_concurrency,
        "request_timeout_s": target.request_timeout_s,
        "interrupted": outcome.interrupted,
        "replayer_cpu_s": outcome.cpu_s,
        "replayer_wall_s": outcome.wall_s,
        "prompt_seed": target.seed,
    }
    if window is not None:
        ctx["window_s"] = float(window)
    return ctx


class Target(Protocol):
    name: str

    def replay(self, trace: pl.DataFrame, trace_context: dict[str, Any], cut_s: float | None) -> Replayed:
        """Run `trace` (sorted by arrival; arrivals already scaled by --speed). `cut_s`:
        stop sending there and mark requests still running `unfinished` (None = no cut)."""
        ...


def results_from_recorder(trace: pl.DataFrame, rec: Recorder, target: str) -> pa.Table:
    """The trace columns plus what happened to each request, as a conforming results table."""
    dispatch = rec.dispatch
    first = rec.first_token
    end = rec.end
    gen = rec.generated
    ok = rec.status == 0
    with np.errstate(invalid="ignore"):
        ttft = first - dispatch
        e2e = end - dispatch
        tpot = np.where(gen > 1, (end - first) / np.maximum(gen - 1, 1), np.nan)
    errors = list(rec.error)
    for i in np.flatnonzero((rec.status == UNFINISHED) & np.isnan(dispatch)):
        errors[i] = errors[i] or "not sent"

    def col(a: np.ndarray, keep: np.ndarray | None = None) -> pa.Array:
        mask = np.isnan(a) if keep is None else (np.isnan(a) | ~keep)
        return pa.array(a, type=pa.float64(), mask=mask)

    cols: dict[str, Any] = {name: trace[name].to_arrow() for name in trace.columns}
    cols["target"] = pa.array([target] * trace.height, type=pa.string())
    cols["status"] = pa.array([STATUS_NAMES[s] for s in rec.status], type=pa.string())
    cols["dispatch_s"] = col(dispatch)
    cols["first_token_s"] = col(first)
    cols["end_s"] = col(end)
    cols["generated_tokens"] = pa.array(gen, type=pa.int32(), mask=gen < 0)
    # Latencies only for completed requests: partial ones would bias every percentile.
    cols["ttft_s"] = col(ttft, ok)
    cols["e2e_s"] = col(e2e, ok)
    cols["tpot_s"] = col(tpot, ok)
    cols["error"] = pa.array(errors, type=pa.string())
    cols["itl_s"] = pa.array(rec.itl, type=pa.list_(pa.float32()))
    if (rec.cached >= 0).any():
        cols["cached_tokens"] = pa.array(rec.cached, type=pa.int32(), mask=rec.cached < 0)
    order = [f.name for f in full_schema(KIND_RESULTS) if f.name in cols]
    return conform(pa.table({k: cols[k] for k in order}), KIND_RESULTS, source="replay results")


@dataclass
class VllmTarget:
    url: str
    lora_dir: str | os.PathLike[str] | None = None
    model: str | None = None
    max_concurrency: int | None = None
    request_timeout_s: float | None = 300.0
    drain_timeout_s: float = 30.0
    seed: int = 0
    token_id_range: tuple[int, int] = (1000, 2000)
    progress: bool = True
    handle_signals: bool = True
    name: str = "vllm"

    def replay(self, trace: pl.DataFrame, trace_context: dict[str, Any], cut_s: float | None) -> Replayed:
        new_event_loop_policy()
        try:
            return asyncio.run(self._replay(trace, trace_context, cut_s))
        except KeyboardInterrupt:
            # Only reachable before sending starts (the runner handles SIGINT itself).
            raise TracekitError("interrupted before the replay started; nothing was written") from None

    async def _replay(self, trace: pl.DataFrame, trace_context: dict[str, Any], cut_s: float | None) -> Replayed:
        import aiohttp

        from replay.vllm_target import (
            PromptSource,
            VllmSender,
            load_adapters,
            resolve_adapters,
            server_info,
        )

        url = self.url.rstrip("/")
        # No connection cap: open-loop means the client never queues requests itself.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        setup_timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=setup_timeout) as session:
            info = await server_info(session, url, self.model)
            needed = sorted({a for a in trace["adapter"].drop_nulls().unique().to_list()})
            paths = resolve_adapters(needed, info.known, trace_context, self.lora_dir)
            await load_adapters(session, url, paths)
            sender = VllmSender(session, url, trace, info.base_model,
                                PromptSource(trace, self.seed, self.token_id_range,
                                             trace_context.get(CTX_PREFIX_BLOCK_TOKENS)),
                                self.request_timeout_s, time.perf_counter)
            opts = RunOptions(max_concurrency=self.max_concurrency, cut_s=cut_s,
                              drain_timeout_s=self.drain_timeout_s, progress=self.progress,
                              handle_signals=self.handle_signals)
            outcome = await run_open_loop(trace["arrival_s"].to_numpy(), sender, opts)
        table = results_from_recorder(trace, outcome.recorder, self.name)
        ctx = server_replay_context(self, outcome, cut_s, url=url, served_model=info.base_model,
                                    adapters_loaded=dict(paths))
        return Replayed(table, ctx)


@dataclass
class TwinTarget:
    profile: Any
    config: Any  # twin.api.ServingConfig
    name: str = "twin"

    def replay(self, trace: pl.DataFrame, trace_context: dict[str, Any], cut_s: float | None) -> Replayed:
        from twin.api import simulate

        ctx = dict(trace_context)
        # The twin cuts at the trace context's window when given none: make the cut explicit.
        ctx.pop("window_s", None)
        try:
            sim = simulate(trace, self.profile, self.config, trace_context=ctx, window_s=cut_s)
        except ModuleNotFoundError as e:
            raise TracekitError(f"the twin is not available in this installation ({e})") from None
        table = sim.results
        if "target" in table.column_names:
            table = table.drop_columns(["target"])
        table = table.append_column("target", pa.array([self.name] * table.num_rows, type=pa.string()))
        table = conform(table, KIND_RESULTS, source="twin results")
        out_ctx = {k: v for k, v in (sim.context or {}).items() if k not in trace_context}
        out_ctx["serving_config"] = self.config.to_dict()
        out_ctx["profile"] = getattr(self.profile, "name", str(self.profile))
        from twin.config import TWIN_COUNTERS

        twin_counters = {k: v for k, v in (sim.summary or {}).items() if k in TWIN_COUNTERS}
        if twin_counters:
            out_ctx["twin"] = twin_counters
        if cut_s is not None:
            out_ctx["window_s"] = float(cut_s)
        return Replayed(table, out_ctx)
