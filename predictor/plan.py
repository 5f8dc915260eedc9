"""From a starving-load model to a configuration, and from one GPU to a fleet: shared by
`recommend --fast`, the search's first guesses, training's cross-validation and the
benchmarks, so all of them judge the same decision."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from predictor.model import CapacityModel, derived


@dataclass
class Plan:
    max_loras: int
    adapters: int  # adapters per GPU (vLLM's --max-cpu-loras is set to this)
    max_lora_rank: int
    starving_point: float  # predicted adapters at which the GPU's served share falls to 90%
    starving_load_tok_s: float  # the same, as offered tok/s
    kv_capacity_tokens: int
    x: np.ndarray  # model input row (for the explanation)
    starving_max_loras: int = 0  # the max_loras the starving point is for (max_loras may be cut to adapters)
    candidates: list[dict[str, Any]] = field(default_factory=list)


def model_row(model: CapacityModel, wf: Mapping[str, float], max_loras: int, max_lora_rank: int, kv: int) -> list[float]:
    cfg = {"max_loras": float(max_loras), "max_lora_rank": float(max_lora_rank), "kv_capacity_tokens": float(kv)}
    cfg.update(derived(wf["adapter_tok_s"], wf["tokens_per_req"], max_loras, kv))
    return [float(cfg[f]) if f in cfg else float(wf[f]) for f in model.features]


def model_starving_points(
    model: CapacityModel, wf: Mapping[str, float], kv_tokens: Callable[[int, int], int], max_loras_grid: list[int],
) -> list[dict[str, Any]]:
    """For each max_loras the memory allows (kv > 0): the model's starving load and
    starving point (adapters of this mix at that load)."""
    rank = int(wf["rank_max"])
    per_adapter = float(wf["adapter_tok_s"])
    out, rows = [], []
    for ml in sorted(set(int(m) for m in max_loras_grid)):
        kv = int(kv_tokens(ml, rank))
        if kv <= 0:
            continue
        out.append({"max_loras": ml, "kv_capacity_tokens": kv})
        rows.append(model_row(model, wf, ml, rank, kv))
    if not out:
        return []
    X = np.asarray(rows, dtype=np.float64)
    loads = model.predict(X)
    for o, load, x in zip(out, loads, X, strict=True):
        o["starving_load_tok_s"] = float(load)
        o["starving_point"] = float(load / per_adapter) if per_adapter > 0 else math.inf
        o["x"] = x
    return out


def best_of(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The max_loras with the largest starving point (the most adapters and throughput
    per GPU); within 1% of it, the fewest GPU slots (less memory reserved)."""
    top = max(p["starving_point"] for p in points)
    near = [p for p in points if p["starving_point"] >= top * 0.99]
    return min(near, key=lambda p: p["max_loras"])


def plan(
    model: CapacityModel,
    wf: Mapping[str, float],
    kv_tokens: Callable[[int, int], int],
    n_fleet: int,
    max_loras_grid: list[int],
    below: Callable[[float], int],
) -> Plan | None:
    """The model-only configuration for a workload with features `wf` and `n_fleet`
    adapters: the max_loras with the largest predicted starving point, filled to
    `below(starving point)` adapters (the safety rule, `predictor.safety`), at most the
    fleet. `kv_tokens(max_loras, max_lora_rank)` is the profile's KV capacity (0 = OOM).
    None when every max_loras runs out of memory."""
    points = model_starving_points(model, wf, kv_tokens, max_loras_grid)
    if not points:
        return None
    # A max_loras above its own answer is not a configuration vLLM takes (max_cpu_loras
    # >= max_loras); keep those only when nothing else is left.
    usable = [p for p in points if min(n_fleet, below(p["starving_point"])) >= p["max_loras"]] or points[:1]
    b = best_of(usable)
    n = max(1, min(n_fleet, below(b["starving_point"])))
    return Plan(
        max_loras=min(int(b["max_loras"]), n), adapters=n, max_lora_rank=int(wf["rank_max"]),
        starving_point=float(b["starving_point"]), starving_load_tok_s=float(b["starving_load_tok_s"]),
        kv_capacity_tokens=int(b["kv_capacity_tokens"]), x=b["x"], starving_max_loras=int(b["max_loras"]),
        candidates=[{k: v for k, v in p.items() if k != "x"} for p in points],
    )


def split_fleet(loads: Mapping[str, float], per_gpu: int) -> list[list[str]]:
    """Adapters to GPUs: ceil(N / per_gpu) GPUs, busiest adapter first onto the least
    loaded GPU with a free adapter slot (longest-processing-time greedy), so per-GPU
    loads come out even."""
    names = sorted(loads, key=lambda a: (-loads[a], a))
    n_gpus = max(1, math.ceil(len(names) / max(1, per_gpu)))
    gpus: list[list[str]] = [[] for _ in range(n_gpus)]
    # (load, GPU) of the GPUs with a free slot: the least loaded, lowest index first.
    heap = [(0.0, i) for i in range(n_gpus)]
    for a in names:
        load, i = heapq.heappop(heap)
        gpus[i].append(a)
        if len(gpus[i]) < per_gpu:
            heapq.heappush(heap, (load + loads[a], i))
    return gpus


def representative(loads: Mapping[str, float], n: int) -> list[str]:
    """`n` adapters with the fleet's mix of loads (evenly spaced in load order): one GPU's
    share of the fleet, as the twin search simulates it."""
    names = sorted(loads, key=lambda a: (loads[a], a))
    if n >= len(names):
        return names
    idx = np.unique(np.round(np.linspace(0, len(names) - 1, n)).astype(int))
    return [names[i] for i in idx]
