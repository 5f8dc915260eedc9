"""The twin's configuration and result types. This module imports no other twin module,
so `api`, `engine`, `profile` and the scheduler can all depend on it without a cycle.

Field names are vLLM's own (`EngineArgs`), so a configuration reads as the server's
command line. Where vLLM's default depends on the server (its GPU, its version), the
default here is None and is filled from the profile's `server` section by
`ServingConfig.for_profile`: a profile records what its server ran with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import pyarrow as pa

from tracekit.schema import TracekitError

# What a profile without a `server` section stands for: the paper's patched vLLM 0.8.5
# (synchronous scheduling, prefix caching off, admission on the first chunk only); its
# batch limits then are vLLM's own for the profile's GPU (`server_defaults`).
SERVER_DEFAULTS: dict[str, Any] = {
    "vllm_version": "0.8.5",
    "max_num_seqs": 256,
    "max_num_batched_tokens": 2048,
    "block_size": 16,
    "gpu_memory_utilization": 0.9,
    "enable_prefix_caching": False,
    "scheduler_reserve_full_isl": False,
    "async_scheduling": False,
}
# The fields of ServingConfig that a profile's `server` section may set.
SERVER_FIELDS = tuple(k for k in SERVER_DEFAULTS if k != "vllm_version")


@dataclass(frozen=True)
class ServingConfig:
    """vLLM engine arguments the twin models, named as vLLM names them.

    Build one with `ServingConfig.for_profile(profile, ...)` so that every field the
    user did not set takes the profile's server's value; the plain constructor keeps
    the defaults of `SERVER_DEFAULTS`."""

    max_loras: int = 1
    # None = vLLM's default: the CPU cache holds as many adapters as GPU slots.
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    max_num_seqs: int = SERVER_DEFAULTS["max_num_seqs"]
    max_num_batched_tokens: int = SERVER_DEFAULTS["max_num_batched_tokens"]
    block_size: int = SERVER_DEFAULTS["block_size"]
    gpu_memory_utilization: float = SERVER_DEFAULTS["gpu_memory_utilization"]
    enable_lora: bool = True
    # Override of the KV capacity in tokens (e.g. taken from a captured server); None = model it.
    kv_capacity_tokens: int | None = None
    max_model_len: int | None = None
    # vLLM's prefix caching (`--enable-prefix-caching`): full prompt blocks, hashed in a
    # chain keyed by the adapter, are reused by later requests of the same adapter.
    enable_prefix_caching: bool = SERVER_DEFAULTS["enable_prefix_caching"]
    # `--scheduler-reserve-full-isl`: a waiting request is admitted only when blocks for
    # its whole prompt are free (not just for its first chunk).
    scheduler_reserve_full_isl: bool = SERVER_DEFAULTS["scheduler_reserve_full_isl"]
    # `--async-scheduling`: the next step is scheduled while the current one executes.
    async_scheduling: bool = SERVER_DEFAULTS["async_scheduling"]

    @property
    def cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> ServingConfig:
        """Raise one TracekitError line, naming the flag, for what vLLM would refuse."""
        for name in ("max_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise TracekitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.cpu_loras < self.max_loras:
            raise TracekitError(
                f"--max-cpu-loras ({self.cpu_loras}) must be >= --max-loras ({self.max_loras}), as vLLM requires"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise TracekitError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        return self

    def replace(self, **changes: Any) -> ServingConfig:
        return replace(self, **changes)

    @classmethod
    def for_profile(cls, profile: Any, **overrides: Any) -> ServingConfig:
        """A configuration whose unset fields (absent or None in `overrides`) take the
        profile's server values (`server_defaults`). `profile`: a Profile, or its data."""
        data = getattr(profile, "data", profile)
        base = server_defaults(data if isinstance(data, Mapping) else {})
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"ServingConfig has no field(s) {', '.join(sorted(unknown))}")
        kw = {k: v for k, v in base.items() if k in names}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


# The vLLM whose defaults a profile gets where its server section does not say.
DEFAULTS_VLLM_VERSION = "0.32.0"


def vllm_batch_defaults(gpu_memory_gib: float | None, gpu_name: str | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) that vLLM 0.32's OpenAI API server picks
    when neither is given (`EngineArgs.get_batch_defaults`): 1024 and 16384 on GPUs of
    160 GiB or more, 1024 and 8192 from 70 GiB (but not an A100, where large batches
    cost throughput), else 256 and 2048, which is also its answer when it cannot query
    the device (memory unknown here)."""
    mem = float(gpu_memory_gib or 0.0)
    name = (gpu_name or "").lower()
    if mem >= 160:
        return 1024, 16384
    if mem >= 70 and "a100" not in name:
        return 1024, 8192
    return 256, 2048


def server_defaults(profile_data: Mapping[str, Any]) -> dict[str, Any]:
    """The serving defaults a profile's server ran with: its `server` section over
    `SERVER_DEFAULTS`. Where the section does not record `max_num_seqs` or
    `max_num_batched_tokens`, they are vLLM 0.32's own for the profile's GPU
    (`vllm_batch_defaults` of `hardware.gpu_memory_gib` and `hardware.gpu`).
    `defaults_from` says, in words, where those two came from."""
    out = dict(SERVER_DEFAULTS)
    section = profile_data.get("server") or {}
    section = section if isinstance(section, Mapping) else {}
    out.update({k: v for k, v in section.items() if k in SERVER_DEFAULTS and v is not None})
    missing = [k for k in ("max_num_seqs", "max_num_batched_tokens") if section.get(k) is None]
    if not missing:
        out["defaults_from"] = f"the profile's server (vLLM {out['vllm_version']})"
        return out
    hw = profile_data.get("hardware") or {}
    hw = hw if isinstance(hw, Mapping) else {}
    mem = hw.get("gpu_memory_gib")
    mem = float(mem) if isinstance(mem, (int, float)) and not isinstance(mem, bool) else None
    gpu = str(hw.get("gpu") or hw.get("device") or "")
    seqs, tokens = vllm_batch_defaults(mem, gpu)
    out.update({k: v for k, v in (("max_num_seqs", seqs), ("max_num_batched_tokens", tokens)) if k in missing})
    where = f"{gpu or 'a GPU'} with {mem:g} GiB" if mem else f"{gpu or 'a GPU'} of unknown memory"
    out["defaults_from"] = f"vLLM {DEFAULTS_VLLM_VERSION}'s API-server defaults for {where}"
    if len(missing) == 1:
        out["defaults_from"] += f" ({missing[0]}; the rest from the profile's server)"
    return out


# The twin's counters a results context carries (`twin`), for reports made later: steps,
# preemptions, adapter loads, KV capacity, rejections, whether the server would start,
# and which limit held waiting requests back (`admission_blocked`, where counted).
TWIN_COUNTERS = ("steps", "preemptions", "adapter_loads", "kv_capacity_tokens", "num_blocks", "rejected",
                 "oom", "oom_reason", "admission_blocked", "prefill_tokens_computed", "cached_prompt_tokens")


@dataclass
class SimResult:
    """What `simulate` returns: results and (optionally) steps in the tracekit schemas."""

    results: pa.Table  # tracekit results schema (conforming columns)
    steps: pa.Table | None  # tracekit steps schema, when asked for
    summary: dict[str, Any]  # tracekit.metrics.summarize(...) plus twin counters
    context: dict[str, Any] = field(default_factory=dict)  # to write as tracekit.context
