"""The capacity model: what the predictor learns, and how it turns into a configuration.

Why capacity: below saturation a GPU serves what it is offered; above, it serves its
capacity and the rest queues until it starves. So served throughput ~ min(offered,
capacity), and the best adapters-per-GPU is the most adapters whose offered load the GPU
still serves. The model predicts the *starving load* (the offered tokens/s at which one
GPU's served share falls to 90%, the paper's starving rule) for a workload's shape and a
given max_loras / max_lora_rank. It varies little and smoothly, so a shallow tree or a
linear model on its log predicts it well, and the starving point in adapters follows by
division (the quantity the twin search finds too, see `predictor.safety`); a model that
predicted adapter counts directly would have to learn that division itself.

Models are stored as plain JSON (tree arrays or linear coefficients), evaluated with
numpy: no pickle, no scikit-learn import at recommend time (it costs ~0.5 s).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from predictor.features import FEATURES
from tracekit.schema import TracekitError

# Workload features the capacity depends on: intensive ones only (not the fleet size).
WORKLOAD_FEATURES = [
    "rate_mean", "rate_cv", "rate_max", "top_share", "rank_mean", "rank_max", "rank_traffic_mean",
    "burstiness", "prompt_mean", "prompt_p90", "output_mean", "output_p90", "tokens_per_req",
    "adapter_tok_s",
]
CONFIG_FEATURES = ["max_loras", "max_lora_rank", "kv_capacity_tokens"]
# Workload x config: what the GPU would face near its limit.
# slot_pressure: adapters per GPU slot if the GPU took 10k tok/s of this traffic (adapter
#   churn: slots thrash when far more adapters than slots are active);
# kv_requests: requests of mean length the KV cache holds at once.
DERIVED_FEATURES = ["slot_pressure", "kv_requests"]
MODEL_FEATURES = WORKLOAD_FEATURES + CONFIG_FEATURES + DERIVED_FEATURES
CONFIG_DESCRIPTIONS = {
    "max_loras": "GPU adapter slots (max_loras)",
    "max_lora_rank": "max_lora_rank",
    "kv_capacity_tokens": "KV-cache tokens left by this config",
    "slot_pressure": "adapters per GPU slot at 10k tok/s of this traffic",
    "kv_requests": "requests the KV cache holds at once",
}
REFERENCE_LOAD_TOK_S = 10_000.0


def derived(adapter_tok_s: float, tokens_per_req: float, max_loras: float, kv_tokens: float) -> dict[str, float]:
    """The DERIVED_FEATURES of one (workload, config)."""
    return {
        "slot_pressure": REFERENCE_LOAD_TOK_S / max(adapter_tok_s, 1e-9) / max(max_loras, 1.0),
        "kv_requests": kv_tokens / max(tokens_per_req, 1.0),
    }
# The paper's baseline inputs: summary statistics of the adapters' rates and sizes.
PAPER_FEATURES = ["rate_mean", "rate_std", "rate_min", "rate_max", "rank_mean", "rank_std", "rank_min", "rank_max"]
# Schema 2: the target is the starving load (served 90%); schema 1 models (the load at
# 97% served, with a load factor) are refused.
MODEL_SCHEMA = 2


def describe(name: str) -> str:
    return FEATURES.get(name) or CONFIG_DESCRIPTIONS.get(name, name)


@dataclass
class CapacityModel:
    """log(starving load tok/s) = f(features); `kind` is `tree` or `linear`."""

    kind: str
    features: list[str]
    params: dict[str, Any]
    # Held-out log(true / predicted) residuals of cross-validation.
    residuals: list[float] | None = None
    meta: dict[str, Any] | None = None

    # --- evaluation ---------------------------------------------------------------
    def predict_log(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        p = self.params
        if self.kind == "linear":
            z = (X - np.asarray(p["mean"])) / np.asarray(p["scale"])
            return z @ np.asarray(p["coef"]) + float(p["intercept"])
        if self.kind == "tree":
            return self._tree_leaf_values(X, self._tree_leaves(X))
        raise TracekitError(f"model: unknown kind {self.kind!r}")

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self.predict_log(X))

    def _tree_leaves(self, X: np.ndarray) -> np.ndarray:
        p = self.params
        left, right = np.asarray(p["left"]), np.asarray(p["right"])
        feat, thr = np.asarray(p["feature"]), np.asarray(p["threshold"])
        node = np.zeros(X.shape[0], dtype=np.int64)
        rows = np.arange(X.shape[0])
        while True:
            inner = left[node] >= 0
            if not inner.any():
                return node
            go_left = X[rows, np.maximum(feat[node], 0)] <= thr[node]
            node = np.where(inner, np.where(go_left, left[node], right[node]), node)

    def _tree_leaf_values(self, X: np.ndarray, leaves: np.ndarray) -> np.ndarray:
        return np.asarray(self.params["value"], dtype=np.float64)[leaves]

    # --- explanation --------------------------------------------------------------
    def explain(self, x: np.ndarray) -> list[str]:
        """Why this starving load, in words: the tree path, or the main linear contributions."""
        x = np.asarray(x, dtype=np.float64).ravel()
        p = self.params
        if self.kind == "tree":
            left, right = p["left"], p["right"]
            node, out = 0, []
            while left[node] >= 0:
                f = p["feature"][node]
                name, thr = self.features[f], p["threshold"][node]
                if x[f] <= thr:
                    out.append(f"{describe(name)} = {x[f]:,.4g} <= {thr:,.4g}")
                    node = left[node]
                else:
                    out.append(f"{describe(name)} = {x[f]:,.4g} > {thr:,.4g}")
                    node = right[node]
            out.append(
                f"-> starving load {math.exp(p['value'][node]):,.0f} tok/s "
                f"(leaf of {p['n_samples'][node]} training cases)"
            )
            return out
        z = (x - np.asarray(p["mean"])) / np.asarray(p["scale"])
        contrib = z * np.asarray(p["coef"])
        order = np.argsort(-np.abs(contrib))[:3]
        out = [f"baseline starving load {math.exp(p['intercept']):,.0f} tok/s (the training mean)"]
        for i in order:
            out.append(f"{describe(self.features[i])} = {x[i]:,.4g}: {math.expm1(contrib[i]):+.1%}")
        return out

    # --- io -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MODEL_SCHEMA,
            "kind": self.kind,
            "features": self.features,
            "params": self.params,
            "residuals": self.residuals,
            "meta": self.meta or {},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        except OSError as e:
            raise TracekitError(f"{p}: cannot write: {e.strerror or e}") from None
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CapacityModel:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise TracekitError(f"--model {p}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TracekitError(f"--model {p}: not a predictor model (JSON): {e}") from None
        if not isinstance(d, dict) or d.get("kind") not in ("tree", "linear") or "params" not in d:
            raise TracekitError(f"--model {p}: not a predictor model (no kind/params)")
        schema = int(d.get("schema", 1))
        if schema > MODEL_SCHEMA:
            raise TracekitError(f"--model {p}: model schema is newer than this tool; upgrade lora-tracekit")
        if schema < MODEL_SCHEMA:
            raise TracekitError(f"--model {p}: an older model (schema {schema}, another target); retrain it with `predictor train`")
        return cls(kind=d["kind"], features=list(d["features"]), params=d["params"],
                   residuals=d.get("residuals"), meta=d.get("meta"))


def from_sklearn_tree(est: Any, features: list[str]) -> CapacityModel:
    t = est.tree_
    return CapacityModel(
        kind="tree",
        features=features,
        params={
            "left": t.children_left.tolist(),
            "right": t.children_right.tolist(),
            "feature": t.feature.tolist(),
            "threshold": t.threshold.tolist(),
            "value": t.value[:, 0, 0].tolist(),
            "n_samples": t.n_node_samples.tolist(),
        },
    )


def from_sklearn_linear(scaler: Any, est: Any, features: list[str]) -> CapacityModel:
    return CapacityModel(
        kind="linear",
        features=features,
        params={
            "mean": scaler.mean_.tolist(),
            "scale": scaler.scale_.tolist(),
            "coef": np.asarray(est.coef_).ravel().tolist(),
            "intercept": float(est.intercept_),
        },
    )
