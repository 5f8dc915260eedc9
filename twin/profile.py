"""Profiles: the hardware+model facts the twin needs, as a JSON file a person can read.

A profile holds three fitted parts behind small interfaces:
- memory: KV capacity in tokens for a serving configuration (0 = the server would OOM);
- step time: seconds for one engine step from the batch's composition;
- adapter load: seconds to load one adapter into a GPU slot.

Shipped profiles live in `twin/profiles/<name>.json`; `load_profile` takes a name or a path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracekit.schema import TracekitError
from twin.config import ServingConfig
from twin.memory import KVEstimate, estimate_kv
from twin.timing import LinearStepTime, step_time_model

PROFILES_DIR = Path(__file__).parent / "profiles"
GIB = 1024**3


@dataclass
class Profile:
    """A calibrated profile. `step_time` and `kv_capacity_tokens` are the twin's inputs.

    JSON layout (all sections readable and documented in place):
      name, description, hardware{gpu, gpu_memory_gib}, model{name, weights_gib,
      kv_bytes_per_token, lora_bytes_per_rank_slot},
      memory{kind: fitted|fixed, ...} (twin.memory), step_time{kind: linear, coef,
      features, fit_error, ...} (twin.timing), adapter_load{kind, ms_by_rank or
      base_ms/per_rank_ms}, fitted_from (which data, which script)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    _step_model: LinearStepTime | None = field(default=None, init=False, repr=False, compare=False)

    # --- memory ---------------------------------------------------------------------
    def kv_estimate(self, config: ServingConfig) -> KVEstimate:
        """The memory model's full answer (tokens, free GiB, whether vLLM would start)."""
        if config.kv_capacity_tokens is not None:
            tokens = int(config.kv_capacity_tokens)
            return KVEstimate(tokens, float("nan"), tokens > 0, "" if tokens > 0 else "kv_capacity_tokens <= 0")
        mem = dict(self.data.get("memory", {}))
        if mem.get("kind") not in ("fixed", "fitted"):
            mem = self._legacy_memory()
        return estimate_kv(
            mem,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            enable_lora=config.enable_lora,
            max_num_seqs=config.max_num_seqs,
            block_size=config.block_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len or mem.get("max_model_len"),
        )

    def kv_capacity_tokens(self, config: ServingConfig) -> int:
        """KV-cache tokens vLLM would report for this configuration; 0 means OOM (the
        server would not start: no room, or less than one max_model_len request)."""
        est = self.kv_estimate(config)
        return est.kv_tokens if est.starts else 0

    def _legacy_memory(self) -> dict[str, Any]:
        # The lead's first layout: model{weights_gib, kv_bytes_per_token, lora_bytes_per_rank_slot}.
        model = self.data.get("model", {})
        hw = self.data.get("hardware", {})
        mem = self.data.get("memory", {})
        return {
            "kind": "fitted",
            "gpu_memory_gib": hw.get("gpu_memory_gib", 0.0),
            "reserved_gib": mem.get("overhead_gib", 0.0),
            "weights_gib": model.get("weights_gib", 0.0),
            "lora_gib_per_rank_slot": model.get("lora_bytes_per_rank_slot", 0.0) / GIB,
            "kv_bytes_per_token": model.get("kv_bytes_per_token", 0),
        }

    # --- step time ------------------------------------------------------------------
    @property
    def step_model(self) -> LinearStepTime:
        """The step-time predictor (built once from the `step_time` section)."""
        if self._step_model is None:
            self._step_model = step_time_model(self.data["step_time"])
        return self._step_model

    def step_time(
        self,
        prefill_tokens: np.ndarray,
        decode_tokens: np.ndarray,
        context_tokens: np.ndarray,
        num_adapters: np.ndarray,
        rank_sum: np.ndarray,
        *,
        max_lora_rank: int,
        max_loras: int,
        prefill_reqs: np.ndarray | float = 0,
    ) -> np.ndarray:
        """Seconds per step, element-wise over arrays (scalars broadcast).

        prefill_tokens: prompt tokens scheduled this step; decode_tokens: one per decoding
        request; context_tokens: KV tokens the scheduled requests attend to (their
        computed tokens after this step, summed); num_adapters: distinct adapters in the
        batch; rank_sum: sum of their ranks; prefill_reqs (optional, default 0): requests
        with prompt tokens in the step. Adapter loads are not included: add
        `adapter_load_s` for each load the step waits for."""
        return self.step_model.predict(
            prefill_tokens,
            decode_tokens,
            context_tokens,
            num_adapters,
            rank_sum,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            prefill_reqs=prefill_reqs,
        )

    def step_time_scalar(self, *, max_lora_rank: int, max_loras: int) -> Callable[..., float]:
        """(p, d, x, a, r, n=0) -> seconds on plain floats (n: prefill_reqs), bit-identical to `step_time`,
        for step-by-step loops (~1 us per call)."""
        return self.step_model.scalar(max_lora_rank=max_lora_rank, max_loras=max_loras)

    @property
    def request_intake_s(self) -> float:
        """Engine time per arriving request (the engine core takes each new request in
        between steps: deserialise, build the request, queue it), charged to the step
        that follows its arrival. 0 when the profile has no `request_intake` section."""
        return float(self.data.get("request_intake", {}).get("s_per_request", 0.0))  # checked by from_dict

    # --- adapter loads --------------------------------------------------------------
    def adapter_load_s(self, rank: int, max_lora_rank: int) -> float:
        """Seconds to load one adapter of `rank` into a GPU slot sized `max_lora_rank`."""
        al = self.data.get("adapter_load", {})
        table = al.get("ms_by_rank")
        if table:
            row = table.get(str(max_lora_rank)) or table[max(table, key=lambda k: int(k))]
            if str(rank) in row:
                return float(row[str(rank)]) / 1e3
            return float(np.mean([float(v) for v in row.values()])) / 1e3
        return (al.get("base_ms", 0.0) + al.get("per_rank_ms", 0.0) * rank) / 1e3

    # --- io -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        for key in ("name", "step_time"):
            if key not in data:
                raise TracekitError(f"profile: missing section {key!r}")
        prof = cls(name=str(data["name"]), data=data)
        prof.step_model  # noqa: B018 - fail now, with one clear line, on a bad section
        intake = data.get("request_intake", {})
        value = intake.get("s_per_request", 0.0) if isinstance(intake, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise TracekitError(
                f"profile {prof.name}: request_intake must be {{\"s_per_request\": seconds >= 0}}, got {intake!r}"
            )
        return prof

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data, name=self.name)

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return p


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str | os.PathLike[str] | Profile) -> Profile:
    """A Profile from a shipped name (e.g. `h100-llama-3.1-8b`) or a JSON path."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    s = str(name_or_path)
    path = Path(s)
    if not path.exists():
        path = PROFILES_DIR / f"{s}.json"
    if not path.exists():
        names = ", ".join(shipped_profiles()) or "none"
        raise TracekitError(f"--profile {s}: no such file or shipped profile (shipped: {names})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TracekitError(f"{path}: not a valid profile JSON: {e}") from None
    if not isinstance(data, dict):
        raise TracekitError(f"{path}: not a valid profile JSON: expected an object at the top level")
    try:
        return Profile.from_dict(data)
    except TracekitError as e:  # name the file: a user may hold several profiles
        msg = str(e)
        raise TracekitError(msg if msg.startswith(str(path)) else f"{path}: {msg.removeprefix('profile: ')}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TracekitError(f"{path}: not a valid profile: a section has the wrong shape ({type(e).__name__}: {e})") from None
