"""A toy serving model with `twin.api.simulate`'s signature, for the predictor's unit
tests: the sweep, training and recommendation machinery are tested against a system
whose answer is known in closed form (capacity depends on KV memory, adapter churn and
request length; served = min(offered, capacity)). The real twin is tested in
test_predictor_twin.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import polars as pl

TOY_PROFILE = {
    "name": "toy-gpu",
    "description": "test profile: 64 GiB GPU, an 8B model",
    "hardware": {"gpu": "toy", "gpu_memory_gib": 64.0},
    "model": {"name": "toy-8b", "weights_gib": 15.0, "kv_bytes_per_token": 131072,
              "lora_bytes_per_rank_slot": 2.5e6},
    "memory": {"kind": "linear", "overhead_gib": 2.0},
    "step_time": {"kind": "linear", "coef": {"prefill_tokens": 1e-5, "decode_tokens": 1e-4}, "intercept_s": 0.01},
}


def toy_capacity(kv_tokens: float, max_loras: int, max_cpu_loras: int, tokens_per_req: float) -> float:
    """Tokens/s one toy GPU sustains."""
    mem = min(1.0, kv_tokens / 250_000.0) ** 0.5
    churn = 1.0 - 0.2 * max(0.0, 1.0 - max_loras / max_cpu_loras)
    length = (420.0 / max(tokens_per_req, 1.0)) ** 0.1
    return 11_000.0 * mem * churn * length


# Every configuration simulate() was given, in order (tests check what a caller passed).
SEEN: list[Any] = []


def simulate(trace: pl.DataFrame, profile: Any, config: Any, *, trace_context: Any = None,
             window_s: float | None = None, record_steps: bool = False) -> SimpleNamespace:
    SEEN.append(config)
    window = float(window_s or (trace_context or {}).get("window_s") or trace["arrival_s"].max())
    tokens = float((trace["prompt_tokens"] + trace["output_tokens"]).sum())
    offered = tokens / window
    tpr = tokens / max(trace.height, 1)
    cap = toy_capacity(profile.kv_capacity_tokens(config), config.max_loras, config.cpu_loras, tpr)
    thr = min(offered, cap) * 0.995
    rho = offered / cap
    served = thr / offered if offered else 1.0
    summary = {
        "throughput_tok_s": thr, "offered_tok_s": offered, "served_frac": served,
        "starved": served < 0.9, "completed": int(trace.height * served),
        "p99_ttft_ms": 100.0 / max(1e-3, 1.0 - min(rho, 0.999)), "mean_ttft_ms": 50.0, "mean_itl_ms": 25.0,
    }
    return SimpleNamespace(summary=summary, results=None, steps=None, context={})


TRAIN_GRID = "random=16;seed=7;max_loras=16,32,64;max_cpu_loras=8,16,32,48,64,96,128,192,256,384;duration=120;max_load=120"


def make_dataset(directory: Any) -> tuple[Any, str]:
    """A labelled toy dataset (16 random workloads) and the toy profile path."""
    import json
    from pathlib import Path

    from predictor import dataset, spec

    d = Path(directory)
    prof = d / "toy.json"
    prof.write_text(json.dumps(TOY_PROFILE))
    out = d / "toy-dataset.parquet"
    dataset.sweep(spec.load(TRAIN_GRID), str(prof), out, simulator="predictor_toy:simulate", progress=False)
    return out, str(prof)
