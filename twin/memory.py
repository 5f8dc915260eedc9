"""The memory model: how many KV-cache tokens vLLM gets for a serving configuration.

vLLM sizes its KV cache at start-up: it loads the weights (and, with LoRA, allocates
`max_loras` GPU slots of `max_lora_rank` for every LoRA-able layer), runs a profiling
pass to find the peak activation memory (the sampler's buffers grow with
`max_num_seqs`; LoRA adds its own buffers), and gives what is left of
`gpu_memory_utilization x total` to KV blocks of `block_size` tokens. It refuses to
start when the cache cannot hold one request of `max_model_len` tokens: that is the
"OOM" of the paper's sweeps (the server did not start), not a lack of any KV room.

    free = total * util - reserved - weights(max_loras, max_lora_rank)
           - sampler(max_num_seqs) - lora_activation(max_loras)
    kv_tokens = floor(free / (kv_bytes_per_token * block_size)) * block_size

with weights = base + per_rank_slot * max_loras * max_lora_rank + per_slot * max_loras
and sampler = per_seq * max(0, max_num_seqs - free_seqs). Every coefficient is fitted
from vLLM's own reports (`fit_memory`), the KV bytes per token come from the model's
architecture (layers x KV heads x head size x 2 x dtype bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

GIB = 1024**3


@dataclass(frozen=True)
class KVEstimate:
    """What the memory model says about one configuration."""

    kv_tokens: int  # KV-cache tokens vLLM would report (before the max_model_len check)
    free_gib: float  # memory left for the KV cache
    starts: bool  # False = the server would not start (the paper's OOM)
    reason: str  # why it would not start ("" when it starts)


def _num(mem: Mapping[str, Any], key: str) -> float:
    return float(mem.get(key, 0.0) or 0.0)


def estimate_kv(
    mem: Mapping[str, Any],
    *,
    max_loras: int,
    max_lora_rank: int,
    enable_lora: bool = True,
    max_num_seqs: int = 256,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
) -> KVEstimate:
    """KV capacity for a `memory` section of kind `fitted` (see the module docstring)."""
    if mem.get("kind") == "fixed":
        tokens = int(mem["kv_tokens"])
        need = int(max_model_len or mem.get("max_model_len") or 0)
        ok = tokens > 0 and tokens >= need
        return KVEstimate(tokens, float("nan"), ok, "" if ok else "KV cache smaller than max_model_len")
    slots = max_loras if enable_lora else 0
    weights = _num(mem, "weights_gib")
    lora_act = 0.0
    if enable_lora:
        weights += _num(mem, "lora_gib_per_rank_slot") * slots * max_lora_rank
        weights += _num(mem, "lora_gib_per_slot") * slots
        lora_act = _num(mem, "lora_activation_gib") + _num(mem, "lora_activation_gib_per_slot") * slots
    sampler = _num(mem, "sampler_gib_per_seq") * max(0.0, max_num_seqs - _num(mem, "sampler_free_seqs"))
    usable = _num(mem, "gpu_memory_gib") * gpu_memory_utilization - _num(mem, "reserved_gib")
    free = usable - weights - sampler - lora_act
    kvb = _num(mem, "kv_bytes_per_token")
    blocks = int(np.floor(free * GIB / (kvb * block_size))) if free > 0 and kvb > 0 else 0
    tokens = max(blocks, 0) * block_size
    need = int(max_model_len or mem.get("max_model_len") or 1)
    if tokens <= 0:
        return KVEstimate(0, free, False, f"no memory left for the KV cache ({free:.2f} GiB)")
    if tokens < need:
        return KVEstimate(
            tokens, free, False, f"KV cache of {tokens} tokens cannot hold max_model_len={need}"
        )
    return KVEstimate(tokens, free, True, "")


# --- fitting ----------------------------------------------------------------------------


def _minimax(a: np.ndarray, y: np.ndarray) -> tuple[float, ...] | None:
    """Non-negative x minimising max |a x - y| (None if the solver fails)."""
    from scipy.optimize import linprog

    n, k = a.shape
    # variables: x (k), t; minimise t subject to  a x - y <= t  and  y - a x <= t
    c = np.r_[np.zeros(k), 1.0]
    ub = np.vstack([np.c_[a, -np.ones(n)], np.c_[-a, -np.ones(n)]])
    rhs = np.r_[y, -y]
    res = linprog(c, A_ub=ub, b_ub=rhs, bounds=[(0, None)] * (k + 1), method="highs")
    return tuple(float(v) for v in res.x[:k]) if res.success else None


def fit_memory(
    runs: Sequence[Mapping[str, Any]],
    *,
    kv_bytes_per_token: int,
    gpu_memory_gib: float,
    max_model_len: int,
    gpu_memory_utilization: float = 0.9,
    block_size: int = 16,
) -> dict[str, Any]:
    """Fit a `memory` section from vLLM start-up reports.

    `runs`: dicts with enable_lora, max_loras, max_lora_rank, max_num_seqs,
    kv_cache_tokens and (where known) model_weights_gib (weights + LoRA slots, as vLLM
    logs it). Returns the section with its fit error on these runs."""
    rows = [dict(r) for r in runs if r.get("kv_cache_tokens")]
    kvb = float(kv_bytes_per_token)

    # 1. weights: the no-LoRA load, plus LoRA slots linear in slots x rank and in slots
    #    (Llama's extra-vocab embeddings cost per slot, whatever the rank).
    base_w = [r["model_weights_gib"] for r in rows if not r["enable_lora"] and r.get("model_weights_gib")]
    lw = [r for r in rows if r["enable_lora"] and r.get("model_weights_gib")]
    w0 = float(np.median(base_w))
    if lw:
        from scipy.optimize import nnls

        a = np.array([[r["max_loras"] * r["max_lora_rank"], r["max_loras"]] for r in lw], float)
        y = np.array([r["model_weights_gib"] - w0 for r in lw], float)
        (per_rank_slot, per_slot), _ = nnls(a, y)
    else:
        per_rank_slot = per_slot = 0.0

    def weights_of(r: Mapping[str, Any]) -> float:
        if not r["enable_lora"]:
            return w0
        return w0 + per_rank_slot * r["max_loras"] * r["max_lora_rank"] + per_slot * r["max_loras"]

    # 2. what the KV cache plus weights took: the rest is activation peak + reserved.
    for r in rows:
        r["_used"] = r["kv_cache_tokens"] * kvb / GIB + weights_of(r)
    plain = [r for r in rows if not r["enable_lora"]]
    usable = max(r["_used"] for r in plain)  # the runs where the sampler is not the peak
    # 3. sampler buffers: linear in max_num_seqs above the point where they dominate.
    big = [r for r in plain if usable - r["_used"] > 0.02]
    if len(big) >= 2:
        s = np.array([r["max_num_seqs"] for r in big], float)
        d = np.array([usable - r["_used"] for r in big], float)
        slope, icpt = np.polyfit(s, d, 1)
        per_seq = max(float(slope), 0.0)
        free_seqs = float(-icpt / slope) if slope > 0 else 0.0
    else:
        per_seq, free_seqs = 0.0, 0.0

    def sampler_of(r: Mapping[str, Any]) -> float:
        return per_seq * max(0.0, r["max_num_seqs"] - free_seqs)

    # 4. LoRA's own activation buffers and slot costs, fitted on the KV tokens themselves
    #    (relative error, so small caches count as much as large ones): vLLM's logged
    #    weight sizes move in allocator-sized lumps, the KV tokens are what matters.
    lr = [r for r in rows if r["enable_lora"]]
    l0 = 0.0
    if lr:
        from scipy.optimize import nnls

        scale = np.array([1.0 / (r["kv_cache_tokens"] * kvb / GIB) for r in lr])
        a = np.array([[1.0, r["max_loras"] * r["max_lora_rank"], r["max_loras"]] for r in lr], float)
        y = np.array([usable - w0 - sampler_of(r) - r["kv_cache_tokens"] * kvb / GIB for r in lr], float)
        (l0, per_rank_slot, per_slot), _ = nnls(a * scale[:, None], y * scale)
        # Then minimise the worst relative error (a Chebyshev fit, as a linear program),
        # starting from nothing but the data: the target is "every row within 2%".
        mm = _minimax(a * scale[:, None], y * scale)
        if mm is not None:
            l0, per_rank_slot, per_slot = mm
    l1 = 0.0

    mem: dict[str, Any] = {
        "kind": "fitted",
        "gpu_memory_gib": gpu_memory_gib,
        "reserved_gib": round(gpu_memory_gib * gpu_memory_utilization - usable, 6),
        "weights_gib": round(w0, 6),
        "lora_gib_per_rank_slot": float(per_rank_slot),
        "lora_gib_per_slot": float(per_slot),
        "sampler_gib_per_seq": per_seq,
        "sampler_free_seqs": round(free_seqs, 1),
        "lora_activation_gib": float(l0),
        "lora_activation_gib_per_slot": float(l1),
        "kv_bytes_per_token": int(kvb),
        "max_model_len": int(max_model_len),
    }
    errs = []
    for r in rows:
        est = estimate_kv(
            mem,
            max_loras=int(r["max_loras"] or 1),
            max_lora_rank=int(r["max_lora_rank"] or 16),
            enable_lora=bool(r["enable_lora"]),
            max_num_seqs=int(r["max_num_seqs"]),
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        errs.append(abs(est.kv_tokens - r["kv_cache_tokens"]) / r["kv_cache_tokens"])
    mem["fit_error"] = {
        "runs": len(rows),
        "kv_tokens_mape_pct": round(100 * float(np.mean(errs)), 3),
        "kv_tokens_max_ape_pct": round(100 * float(np.max(errs)), 3),
    }
    return mem
