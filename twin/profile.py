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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracekit.schema import TracekitError
from twin.api import ServingConfig

PROFILES_DIR = Path(__file__).parent / "profiles"
GIB = 1024**3


@dataclass
class Profile:
    """A calibrated profile. `step_time` and `kv_capacity_tokens` are the twin's inputs.

    JSON layout (all sections readable and documented in place):
      name, description, hardware{gpu, gpu_memory_gib}, model{name, weights_gib,
      kv_bytes_per_token, lora_bytes_per_rank_slot},
      memory{kind, ...}, step_time{kind, features, coef, intercept_s, ...},
      adapter_load{kind, ms_by_rank or base_ms/per_rank_ms},
      fitted_from, fit_error."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)

    # --- memory ---------------------------------------------------------------------
    def kv_capacity_tokens(self, config: ServingConfig) -> int:
        """KV-cache tokens vLLM would report for this configuration; 0 means OOM."""
        if config.kv_capacity_tokens is not None:
            return int(config.kv_capacity_tokens)
        mem = self.data.get("memory", {})
        if mem.get("kind") == "fixed":
            return int(mem["kv_tokens"])
        model = self.data["model"]
        hw = self.data["hardware"]
        usable = hw["gpu_memory_gib"] * GIB * config.gpu_memory_utilization
        lora = 0.0
        if config.enable_lora:
            lora = config.max_loras * config.max_lora_rank * model.get("lora_bytes_per_rank_slot", 0.0)
        free = usable - model["weights_gib"] * GIB - mem.get("overhead_gib", 0.0) * GIB - lora
        if free <= 0:
            return 0
        blocks = int(free // (model["kv_bytes_per_token"] * config.block_size))
        return max(blocks, 0) * config.block_size

    # --- step time ------------------------------------------------------------------
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
    ) -> np.ndarray:
        """Seconds per step, element-wise over arrays (scalars broadcast).

        prefill_tokens: prompt tokens scheduled this step; decode_tokens: one per decoding
        request; context_tokens: KV tokens the scheduled requests attend to; num_adapters:
        distinct adapters in the batch; rank_sum: sum of their ranks."""
        st = self.data["step_time"]
        c = st["coef"]
        p = np.asarray(prefill_tokens, dtype=np.float64)
        d = np.asarray(decode_tokens, dtype=np.float64)
        x = np.asarray(context_tokens, dtype=np.float64)
        a = np.asarray(num_adapters, dtype=np.float64)
        r = np.asarray(rank_sum, dtype=np.float64)
        t = (
            st.get("intercept_s", 0.0)
            + c.get("prefill_tokens", 0.0) * p
            + c.get("decode_tokens", 0.0) * d
            + c.get("context_tokens", 0.0) * x
            + c.get("num_adapters", 0.0) * a
            + c.get("rank_sum", 0.0) * r
            + c.get("lora_tokens", 0.0) * (a > 0) * (p + d)
        )
        return np.maximum(t, st.get("min_s", 1e-5))

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
        return cls(name=str(data["name"]), data=data)

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
    return Profile.from_dict(data)
