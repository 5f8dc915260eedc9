"""From a capacity model to a configuration: shared by `recommend`, training's
cross-validation and the benchmarks, so all three judge the same decision."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from predictor.model import SUSTAINED_SERVED, CapacityModel, derived
from tracekit.metrics import STARVING_THRESHOLD


@dataclass
class Plan:
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    capacity_tok_s: float  # predicted capacity of one GPU at this config
    gpu_load_tok_s: float  # offered load per GPU at max_cpu_loras adapters
    throughput_tok_s: float  # expected served throughput per GPU
    kv_capacity_tokens: int
    x: np.ndarray  # model input row (for the explanation)
    candidates: list[dict[str, Any]] = field(default_factory=list)


def model_row(model: CapacityModel, wf: Mapping[str, float], max_loras: int, max_lora_rank: int, kv: int) -> list[float]:
    cfg = {"max_loras": float(max_loras), "max_lora_rank": float(max_lora_rank), "kv_capacity_tokens": float(kv)}
    cfg.update(derived(wf["adapter_tok_s"], wf["tokens_per_req"], max_loras, kv))
    return [float(cfg[f]) if f in cfg else float(wf[f]) for f in model.features]


def plan(
    model: CapacityModel,
    wf: Mapping[str, float],
    kv_tokens: Callable[[int, int], int],
    n_fleet: int,
    max_loras_grid: list[int],
    margin: float = 1.0,
) -> Plan | None:
    """The best (max_loras, max_cpu_loras) for a workload with features `wf` and
    `n_fleet` adapters. `kv_tokens(max_loras, max_lora_rank)` is the profile's KV capacity
    (0 = OOM). `margin` scales the load put on a GPU further down (e.g. for the twin's
    own error against real hardware). Returns None when every max_loras runs out of memory."""
    rank = int(wf["rank_max"])
    per_adapter = float(wf["adapter_tok_s"])
    cands, rows = [], []
    for ml in sorted(set(int(m) for m in max_loras_grid)):
        kv = int(kv_tokens(ml, rank))
        if kv <= 0:
            continue
        cands.append((ml, kv))
        rows.append(model_row(model, wf, ml, rank, kv))
    if not cands:
        return None
    X = np.asarray(rows, dtype=np.float64)
    caps = model.predict(X)

    def adapters_for(cap: float) -> int:
        """Adapters whose load fills load_factor x margin of `cap`, within 1..n_fleet."""
        n = int(math.floor(model.load_factor * margin * cap / per_adapter)) if per_adapter > 0 else n_fleet
        return max(1, min(n, n_fleet))

    options = []
    for (ml, kv), cap, x in zip(cands, caps, X, strict=True):
        n = adapters_for(cap)
        if n < ml:
            # vLLM needs max_cpu_loras >= max_loras; fewer slots than this only when
            # no larger n fits, handled below.
            continue
        load = n * per_adapter
        options.append(dict(max_loras=ml, max_cpu_loras=n, capacity_tok_s=float(cap), gpu_load_tok_s=load,
                            throughput_tok_s=min(load, float(cap)), kv_capacity_tokens=kv, x=x))
    if not options:
        ml, kv = cands[0]
        cap = float(caps[0])
        n = adapters_for(cap)
        options = [dict(max_loras=min(ml, n), max_cpu_loras=n, capacity_tok_s=cap, gpu_load_tok_s=n * per_adapter,
                        throughput_tok_s=min(n * per_adapter, cap), kv_capacity_tokens=kv, x=X[0])]
    top = max(o["throughput_tok_s"] for o in options)
    # Within 0.5% of the best throughput, prefer the most headroom (capacity / load).
    near = [o for o in options if o["throughput_tok_s"] >= top * 0.995]
    best = max(near, key=lambda o: (o["capacity_tok_s"] / max(o["gpu_load_tok_s"], 1e-9), -o["max_loras"]))
    return Plan(
        max_loras=int(best["max_loras"]), max_cpu_loras=int(best["max_cpu_loras"]), max_lora_rank=rank,
        capacity_tok_s=float(best["capacity_tok_s"]), gpu_load_tok_s=float(best["gpu_load_tok_s"]),
        throughput_tok_s=float(best["throughput_tok_s"]), kv_capacity_tokens=int(best["kv_capacity_tokens"]),
        x=best["x"], candidates=[{k: v for k, v in o.items() if k != "x"} for o in options],
    )


def starving_risk(model: CapacityModel, capacity_hat: float, gpu_load: float) -> float:
    """P(the GPU starves), with the true capacity drawn from the model's held-out errors
    (true / predicted). A GPU serves >= 97% of loads up to its capacity and, past it,
    about capacity x 0.97 / load: starving (< 90%) starts near 0.97 / 0.9 x capacity."""
    if gpu_load <= 0:
        return 0.0
    res = np.asarray(model.residuals or [0.0], dtype=np.float64)
    true_cap = capacity_hat * np.exp(res)
    return float(np.mean(true_cap * SUSTAINED_SERVED / (1.0 - STARVING_THRESHOLD) < gpu_load))


def risk_level(p: float) -> str:
    return "low" if p < 0.05 else ("medium" if p < 0.25 else "high")


def split_fleet(loads: Mapping[str, float], per_gpu: int) -> list[list[str]]:
    """Adapters to GPUs: ceil(N / per_gpu) GPUs, busiest adapter first onto the least
    loaded GPU with a free adapter slot (longest-processing-time greedy), so per-GPU
    loads come out even."""
    names = sorted(loads, key=lambda a: (-loads[a], a))
    n_gpus = max(1, math.ceil(len(names) / max(1, per_gpu)))
    gpus: list[list[str]] = [[] for _ in range(n_gpus)]
    load = np.zeros(n_gpus)
    for a in names:
        free = [i for i in range(n_gpus) if len(gpus[i]) < per_gpu]
        i = min(free, key=lambda j: load[j])
        gpus[i].append(a)
        load[i] += loads[a]
    return gpus


def nearest_cell(cells: Any, max_loras: int, max_cpu_loras: int) -> dict[str, Any] | None:
    """The measured/simulated cell nearest a recommendation: nearest max_cpu_loras on a
    log scale (ties to fewer adapters), then nearest max_loras at that max_cpu_loras."""
    import polars as pl

    if cells.height == 0:
        return None
    ns = np.array(sorted(set(cells["max_cpu_loras"].to_list())), dtype=np.float64)
    n = ns[np.argmin(np.abs(np.log(ns) - math.log(max(max_cpu_loras, 1))) + 1e-9 * ns)]
    at = cells.filter(pl.col("max_cpu_loras") == n)
    mls = np.array(sorted(set(at["max_loras"].to_list())), dtype=np.float64)
    ml = mls[np.argmin(np.abs(np.log(mls) - math.log(max(max_loras, 1))) + 1e-9 * mls)]
    return at.filter(pl.col("max_loras") == ml).row(0, named=True)


def interpolate_cell(cells: Any, max_loras: int, max_cpu_loras: int) -> dict[str, Any] | None:
    """What a sweep says about a recommendation between its grid points, at the nearest
    max_loras: offered load interpolated linearly in max_cpu_loras, served fraction
    min(served of the swept cell below, plateau / offered) with the plateau the most the
    GPU served anywhere in the group (served ~ min(offered, capacity)). Outside the swept
    range: the nearest cell."""
    import polars as pl

    if cells.height == 0:
        return None
    mls = np.array(sorted(set(cells["max_loras"].to_list())), dtype=np.float64)
    ml = mls[np.argmin(np.abs(np.log(mls) - math.log(max(max_loras, 1))) + 1e-9 * mls)]
    at = cells.filter((pl.col("max_loras") == ml) & (pl.col("status") == "ok")).sort("max_cpu_loras")
    if at.height == 0:
        return nearest_cell(cells, max_loras, max_cpu_loras)
    ns = at["max_cpu_loras"].to_numpy().astype(np.float64)
    n = float(max_cpu_loras)
    if n <= ns[0] or n >= ns[-1]:
        return nearest_cell(at, int(ml), max_cpu_loras)
    i = int(np.searchsorted(ns, n, side="right") - 1)
    off = float(np.interp(n, ns, at["offered_tok_s"].to_numpy()))
    plateau = float(at["throughput_tok_s"].max())
    served = min(float(at["served_frac"][i]), plateau / off if off > 0 else 1.0)
    return {"max_loras": int(ml), "max_cpu_loras": int(max_cpu_loras), "status": "ok",
            "throughput_tok_s": off * served, "offered_tok_s": off, "served_frac": served}


def representative(loads: Mapping[str, float], n: int) -> list[str]:
    """`n` adapters with the fleet's mix of loads (evenly spaced in load order): one GPU
    filled to max_cpu_loras, as the model sees it."""
    names = sorted(loads, key=lambda a: (loads[a], a))
    if n >= len(names):
        return names
    idx = np.unique(np.round(np.linspace(0, len(names) - 1, n)).astype(int))
    return [names[i] for i in idx]
