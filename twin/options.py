"""The serving-configuration flags, by vLLM's names, shared by every command that runs
the twin (`twin run`, `replay run --target twin`, `predictor recommend`).

Every flag defaults to None, meaning "what the profile's server ran with"
(`ServingConfig.for_profile`), so one profile's defaults hold everywhere and a command
never carries a second copy of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import click
import numpy as np
import pyarrow as pa

from tracekit.schema import TracekitError, adapter_ranks
from twin.config import ServingConfig

if TYPE_CHECKING:
    import polars as pl

F = TypeVar("F", bound=Callable[..., Any])

# (flag, type, help); bool flags get vLLM's `--no-` form too.
SERVING_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("max_loras", int, "GPU adapter slots (adapters per batch) [default: 1, as vLLM]."),
    ("max_cpu_loras", int, "CPU adapter cache size [default: --max-loras, as vLLM]."),
    ("max_lora_rank", int, "Largest adapter rank [default: the trace's largest]."),
    ("max_num_seqs", int, "Max requests per step [default: the profile's server]."),
    ("max_num_batched_tokens", int, "Token budget per step [default: the profile's server]."),
    ("gpu_memory_utilization", float, "Fraction of GPU memory vLLM may use [default: the profile's server]."),
    ("block_size", int, "KV-cache block size in tokens [default: the profile's server]."),
    ("kv_capacity_tokens", int, "Override the profile's KV capacity (tokens)."),
    ("enable_prefix_caching", bool, "vLLM's prefix caching, keyed by adapter [default: the profile's server]."),
    ("scheduler_reserve_full_isl", bool,
     "Admit a waiting request only when blocks for its whole prompt are free [default: the profile's server]."),
    ("async_scheduling", bool, "Schedule the next step while one executes [default: the profile's server]."),
)
SERVING_FLAG_NAMES = tuple(name for name, _, _ in SERVING_FLAGS)


def serving_options(help_prefix: str = "", exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Add every serving flag to a click command (values arrive as keyword arguments);
    `exclude`: flags a command computes itself rather than takes."""

    def deco(fn: F) -> F:
        for name, typ, text in reversed(SERVING_FLAGS):
            if name in exclude:
                continue
            flag = "--" + name.replace("_", "-")
            if typ is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_prefix + text)(fn)
            else:
                fn = click.option(flag, name, type=typ, default=None, help=help_prefix + text)(fn)
        return fn

    return deco


def trace_max_rank(trace: pl.DataFrame | pa.Table, context: Mapping[str, Any], default: int = 16) -> int:
    """The largest rank among the adapters the trace uses (vLLM's `--max-lora-rank` must
    be at least that), from the trace context's adapters; `default` when none is known."""
    ranks = adapter_ranks(context)
    used = _adapters_used(trace)
    known = [r for name, r in ranks.items() if name in used]
    return max(known) if known else default


def _adapters_used(trace: pl.DataFrame | pa.Table) -> set[str]:
    """The adapter names the trace's requests use (the base model, null, not among them);
    a dictionary-encoded column from the codes its rows use."""
    if not isinstance(trace, pa.Table):  # a polars frame
        return set(trace.get_column("adapter").drop_nulls().unique().to_list())
    used: set[str] = set()
    for chunk in trace.column("adapter").chunks:
        if pa.types.is_dictionary(chunk.type):
            codes = np.asarray(chunk.indices.to_numpy(zero_copy_only=False))
            codes = codes[~np.isnan(codes)] if codes.dtype.kind == "f" else codes  # nulls
            labels = chunk.dictionary.to_pylist()
            # Codes counted, not np.unique'd (a sort, and numpy.ma imported on first use).
            used.update(labels[int(i)] for i in np.flatnonzero(np.bincount(codes.astype(np.intp), minlength=len(labels))))
        else:
            import pyarrow.compute as pc

            used.update(pc.unique(chunk).to_pylist())
    used.discard(None)  # type: ignore[arg-type]
    return used


def config_from_options(
    profile: Any, trace: pl.DataFrame | pa.Table | None, context: Mapping[str, Any], options: Mapping[str, Any]
) -> ServingConfig:
    """The ServingConfig for these flag values: unset ones from the profile's server,
    `max_lora_rank` from the trace. Bad values are one TracekitError line."""
    kw = {k: options.get(k) for k in SERVING_FLAG_NAMES}
    if kw["max_lora_rank"] is None and trace is not None:
        kw["max_lora_rank"] = trace_max_rank(trace, context)
    try:
        config = ServingConfig.for_profile(profile, **kw)
    except (TypeError, ValueError) as e:
        raise TracekitError(f"bad serving configuration: {e}") from None
    return config.check()


def describe_config(profile: Any, config: ServingConfig, options: Mapping[str, Any],
                    kv_capacity_tokens: int | None) -> dict[str, Any]:
    """The configuration a run used, every value resolved (defaults included), and where
    each came from: what `twin run` and `replay run --target twin` print and write to
    their results' context (`configuration`)."""
    from twin.config import server_defaults

    data = getattr(profile, "data", profile)
    server = server_defaults(data if isinstance(data, Mapping) else {})
    given = {k for k in SERVING_FLAG_NAMES if options.get(k) is not None}

    def source(name: str) -> str:
        if name in given:
            return "flag"
        if name == "max_loras":
            return "vLLM's default"
        if name == "max_cpu_loras":
            return "= max_loras, vLLM's default"
        if name == "max_lora_rank":
            return "the trace's largest rank (16 if none known)"
        if name == "kv_capacity_tokens":
            return "the profile's memory model"
        if name in ("max_num_seqs", "max_num_batched_tokens"):
            return str(server.get("defaults_from") or "the profile's server")
        return f"the profile's server (vLLM {server.get('vllm_version')})"

    out: dict[str, Any] = {
        "profile": getattr(profile, "name", str(profile)),
        "max_loras": config.max_loras,
        "max_cpu_loras": config.cpu_loras,
        "max_lora_rank": config.max_lora_rank,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "kv_capacity_tokens": None if kv_capacity_tokens is None else int(kv_capacity_tokens),
        "block_size": config.block_size,
        "enable_prefix_caching": config.enable_prefix_caching,
    }
    out["from"] = {k: source(k) for k in out if k != "profile"}
    return out


def run_window(trace: str, num_requests: int, window: float | None, drain: bool,
               trace_context: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a twin run's trace size and `--window`/`--drain`, and returns the context
    the run starts from: the trace's, where `--drain` moves its window aside (the engine
    cuts at the trace's window unless told to drain)."""
    if num_requests == 0:
        raise TracekitError(f"{trace}: the trace has no requests")
    if window is not None and not window > 0:
        raise TracekitError(f"--window must be positive, got {window}")
    if drain and window is not None:
        raise TracekitError("--drain never cuts the run: give --window or --drain, not both")
    context = {k: v for k, v in trace_context.items() if k != "parts"}
    if drain:
        context["trace_window_s"] = context.pop("window_s", None)
    return context
