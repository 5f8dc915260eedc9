"""Step-time models: seconds for one engine step from the batch's composition.

A small, swappable interface in the manner of Vidur's execution-time predictors, without
their registries: a model is anything with `predict(...)` over numpy arrays, built from
the profile's `step_time` section by `step_time_model(section)`. The one shipped kind,
`linear`, is a non-negative linear model over physically meaningful features:

    t = intercept
        + prefill_tokens * c_p       (compute-bound prompt tokens)
        + decode_tokens * c_d        (one per decoding request: sampling, streaming, ...)
        + context_tokens * c_x       (KV tokens the scheduled requests attend to)
        + [LoRA batch] * (max_loras * c_slot      kernels launched over every GPU slot
                          + num_adapters * c_a    per distinct adapter in the batch
                          + rank_sum * c_r        LoRA FLOPs grow with the ranks
                          + (prefill+decode) * c_lt   per-token LoRA shrink/expand
                          + (prefill+decode) * max_loras * c_st   the kernels' grid over slots
                          + (prefill+decode) * max_lora_rank * c_rt)  weights padded to max_lora_rank
        + prefill_reqs * c_pr        (per request with prompt tokens in the step)

`prefill_reqs` is an optional input (default 0, so older callers keep working): the
per-request work of a request entering the batch (vLLM's input-batch row, block table,
sampling state; the API server's request intake, which the engine waits for when every
request arrives at once). The all-at-once calibration runs with up to 8192 requests pin
it down; without it those runs' duration and TTFT were under-predicted by up to 20%.

Every coefficient is >= 0 (each feature only adds work), which keeps extrapolation to
unseen batch shapes sane. `fit_linear` fits them by non-negative least squares on
relative error, from captured steps or from aggregate benchmark runs (see
`twin.calibrate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES: tuple[str, ...] = (
    "intercept",
    "prefill_tokens",
    "decode_tokens",
    "context_tokens",
    "lora_slots",
    "num_adapters",
    "rank_sum",
    "lora_tokens",
    "lora_slot_tokens",
    "lora_base",
    "prefill_reqs",
    "lora_slot_rank_tokens",
    "lora_rank_tokens",
)
# What each feature means, written into the profile so that it reads on its own.
FEATURE_DOC: dict[str, str] = {
    "intercept": "s per step (scheduler, launch, sampling floor)",
    "prefill_tokens": "s per prompt token computed in the step",
    "decode_tokens": "s per decoding request in the step",
    "context_tokens": "s per KV token attended by the scheduled requests",
    "lora_slots": "s per GPU adapter slot (max_loras) when the batch uses LoRA",
    "num_adapters": "s per distinct adapter in the batch",
    "rank_sum": "s per unit of the summed ranks of the batch's adapters",
    "lora_tokens": "s per token (prefill + decode) when the batch uses LoRA",
    "lora_base": "s per step when the batch uses LoRA (LoRA metadata, extra kernel launches)",
    "lora_slot_rank_tokens": "s per (GPU adapter slot x max_lora_rank x token) when the batch uses "
    "LoRA: the kernels' work over every slot, padded to max_lora_rank",
    "lora_rank_tokens": "s per (max_lora_rank x token) when the batch uses LoRA: shrink/expand work "
    "per token, each token with its own adapter's weights padded to max_lora_rank",
    "prefill_reqs": "s per request with prompt tokens in the step (a request entering the batch: "
    "input-batch row, block table, sampling state, request intake)",
    "lora_slot_tokens": "s per (GPU adapter slot x token) when the batch uses LoRA: vLLM's "
    "Triton LoRA kernels launch a grid over every slot and every token tile",
}


def _formula(c: Any, p: Any, d: Any, x: Any, a: Any, r: Any, n: Any, slots: Any, mr: Any) -> Any:
    """The step-time formula, the only one: seconds (before the floor) for coefficients
    `c` (in FEATURES order) and a step's composition. Plain floats and numpy arrays
    alike, with the same operations in the same order, so the step loop's scalar calls
    and the fast-forward's vectorised ones give the same bits. `features` derives the
    design matrix from it; a term with a zero coefficient adds exactly 0."""
    tokens = p + d
    return (
        c[0] + c[1] * p + c[2] * d + c[3] * x + c[10] * n
        + (a > 0) * (
            c[4] * slots + c[5] * a + c[6] * r + c[7] * tokens + c[8] * (slots * tokens) + c[9]
            + c[11] * (slots * mr * tokens) + c[12] * (mr * tokens)
        )
    )  # fmt: skip


def features(
    prefill_tokens: Any,
    decode_tokens: Any,
    context_tokens: Any,
    num_adapters: Any,
    rank_sum: Any,
    *,
    max_lora_rank: Any = 16,
    max_loras: Any = 1,
    prefill_reqs: Any = 0,
) -> np.ndarray:
    """The design matrix (n, len(FEATURES)) for arrays of step compositions: column i is
    the formula with coefficient i set to 1 and the others to 0 (the formula is linear)."""
    cols = [np.asarray(v, dtype=np.float64) for v in (prefill_tokens, decode_tokens, context_tokens, num_adapters, rank_sum, prefill_reqs)]
    shape = np.broadcast_shapes(*(col.shape for col in cols))
    args = [np.broadcast_to(col, shape) for col in cols]
    slots = np.asarray(max_loras, dtype=np.float64)
    mr = np.asarray(max_lora_rank, dtype=np.float64)
    unit = np.eye(len(FEATURES))
    p, d, x, a, r, n = args
    out = [np.broadcast_to(_formula(unit[i], p, d, x, a, r, n, slots, mr), shape) for i in range(len(FEATURES))]
    return np.stack([np.ravel(col) for col in out], axis=1)


@dataclass
class LinearStepTime:
    """t = max(formula(coef, step), `min_s`) seconds (`_formula`)."""

    coef: dict[str, float]
    min_s: float = 1e-5
    _vec: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._vec = np.array([float(self.coef.get(f, 0.0)) for f in FEATURES])

    @classmethod
    def from_section(cls, st: Mapping[str, Any]) -> LinearStepTime:
        coef = dict(st.get("coef", {}))
        if "intercept_s" in st:  # the lead's first layout kept the intercept apart
            coef.setdefault("intercept", float(st["intercept_s"]))
        return cls(coef=coef, min_s=float(st.get("min_s", 1e-5)))

    def predict(
        self,
        prefill_tokens: Any,
        decode_tokens: Any,
        context_tokens: Any,
        num_adapters: Any,
        rank_sum: Any,
        *,
        max_lora_rank: Any = 16,
        max_loras: Any = 1,
        prefill_reqs: Any = 0,
    ) -> np.ndarray:
        """Seconds per step, element-wise over numpy arrays (scalars broadcast)."""
        f = np.float64
        t = _formula(
            tuple(float(v) for v in self._vec),
            np.asarray(prefill_tokens, dtype=f), np.asarray(decode_tokens, dtype=f),
            np.asarray(context_tokens, dtype=f), np.asarray(num_adapters, dtype=f),
            np.asarray(rank_sum, dtype=f), np.asarray(prefill_reqs, dtype=f),
            np.asarray(max_loras, dtype=f), np.asarray(max_lora_rank, dtype=f),
        )  # fmt: skip
        return np.maximum(t, self.min_s)

    def scalar(self, *, max_lora_rank: float = 16, max_loras: float = 1):  # type: ignore[no-untyped-def]
        """A plain-float function (p, d, x, a, r, n=0) -> seconds for step-by-step loops
        (n: prefill_reqs): the same `_formula`, so bit-identical to `predict`, at about a
        microsecond per call instead of numpy's ~20 us on length-1 arrays."""
        c = tuple(float(v) for v in self._vec)
        slots, mr, lo = float(max_loras), float(max_lora_rank), float(self.min_s)

        def step_time(p: float, d: float, x: float, a: float, r: float, n: float = 0.0) -> float:
            t = _formula(c, p, d, x, a, r, n, slots, mr)
            return t if t > lo else lo

        return step_time


def step_time_model(section: Mapping[str, Any]) -> LinearStepTime:
    """The model a profile's `step_time` section describes."""
    kind = section.get("kind", "linear")
    if kind != "linear":
        from tracekit.schema import TracekitError

        raise TracekitError(f"profile step_time: unknown kind {kind!r} (known: linear)")
    return LinearStepTime.from_section(section)


# --- fitting ----------------------------------------------------------------------------


@dataclass
class LinearFit:
    coef: dict[str, float]
    used: list[str]


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    *,
    use: Sequence[str] = FEATURES,
    relative: bool = True,
    row_weight: np.ndarray | None = None,
) -> LinearFit:
    """Non-negative least squares of y ~ x[:, use]; relative error when `relative`.

    Features absent from `use` (or constant zero in the data) get coefficient 0: the
    data cannot say anything about them, and we prefer to say so than to guess."""
    from scipy.optimize import nnls

    idx = [FEATURES.index(f) for f in use if np.any(x[:, FEATURES.index(f)] != 0)]
    a = x[:, idx].astype(np.float64)
    b = np.asarray(y, dtype=np.float64).copy()
    w = np.ones(len(b))
    if relative:
        w = w / np.maximum(np.abs(b), 1e-9)
    if row_weight is not None:
        w = w * row_weight
    # Scale columns so that NNLS sees comparable magnitudes (tokens vs ones vs slots).
    scale = np.maximum(np.abs(a).max(axis=0), 1e-12)
    sol, _ = nnls((a * w[:, None]) / scale, b * w, maxiter=50 * len(idx) + 100)
    coef = {f: 0.0 for f in FEATURES}
    for j, v in zip(idx, sol / scale, strict=True):
        coef[FEATURES[j]] = float(v)
    return LinearFit(coef=coef, used=[FEATURES[j] for j in idx])


def error_stats(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAPE (%), signed mean error (%), and R^2 of predictions."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    ok = np.abs(true) > 0
    ape = np.abs(pred[ok] - true[ok]) / np.abs(true[ok])
    ss_res = float(np.sum((pred - true) ** 2))
    ss_tot = float(np.sum((true - true.mean()) ** 2))
    return {
        "n": int(len(true)),
        "mape_pct": round(100 * float(ape.mean()), 3) if len(ape) else float("nan"),
        "bias_pct": round(100 * float(np.mean((pred[ok] - true[ok]) / true[ok])), 3) if len(ape) else float("nan"),
        "r2": round(1.0 - ss_res / ss_tot, 5) if ss_tot > 0 else float("nan"),
    }
