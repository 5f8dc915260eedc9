"""`predictor train`: fit the starving-load model on a twin sweep, cross-validated on
held-out workloads (GroupKFold), and compare with the paper's models.

Training table: one row per (workload, max_loras) of the sweep whose load reached its
limit (some cell starved: served <= 90% of its offered load); the target is the starving
load, the offered load at which the GPU's served share falls to 90% (whether compute or
adapter churn is the limit). Workload features come from the workload's cell with the
most adapters (the best estimate).

Cross-validation scores both the model's error (its held-out MAPE is the `model error`
of the safety rule, `predictor.safety`) and the decision: every held-out workload's
model-only recommendation is scored on its own swept cells (`predictor.score`, both
scores), against its best non-starving cell. The paper's baselines (one decision tree and
a random forest on the paper's 8 features, predicting the best max_cpu_loras and
max_loras directly) are scored the same way.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl

from predictor import pio
from predictor import score as scoring
from predictor.model import (
    MODEL_FEATURES,
    PAPER_FEATURES,
    CapacityModel,
    derived,
    from_sklearn_linear,
    from_sklearn_tree,
)
from predictor.plan import plan
from tracekit.cliutil import console, user_errors
from tracekit.metrics import STARVING_THRESHOLD
from tracekit.schema import TracekitError

TREE_DEPTH = 5
MIN_LEAF = 3


def workload_table(df: pl.DataFrame) -> pl.DataFrame:
    """Per workload: its features (from its cell with the most adapters) and its label."""
    fcols = [c for c in df.columns if c.startswith("f_")]
    feats = (
        df.sort("max_cpu_loras", "max_loras", descending=[True, False])
        .unique("workload_key", keep="first")
        .select(["workload_key", "workload", *fcols])
        .rename({c: c[2:] for c in fcols})
    )
    best = df.filter(pl.col("is_best")).select(
        "workload_key",
        pl.col("max_loras").alias("best_max_loras"),
        pl.col("max_cpu_loras").alias("best_max_cpu_loras"),
        pl.col("throughput_tok_s").alias("best_throughput_tok_s"),
    )
    return feats.join(best, on="workload_key", how="left").sort("workload_key")


def starving_load(off: np.ndarray, thr: np.ndarray, served: np.ndarray) -> float | None:
    """The offered load (tok/s) at which one GPU's served share falls to 90%, from one
    (workload, max_loras) group's cells sorted by offered load; None when no cell starved
    (the sweep never found the limit: a lower bound only).

    Between the last cell that does not starve and the first that does, a saturated GPU
    serves its capacity whatever it is offered (served ~ C / offered), with C the
    throughput the starving cell reached; the point is kept between the two cells."""
    starved = np.flatnonzero(1.0 - served >= STARVING_THRESHOLD)
    if starved.size == 0:
        return None
    j = int(starved[0])
    lo = float(off[j - 1]) if j > 0 else 0.0
    return float(np.clip(thr[j] / (1.0 - STARVING_THRESHOLD), lo, off[j]))


def capacity_table(df: pl.DataFrame) -> pl.DataFrame:
    """Per (workload, max_loras): `capacity_tok_s`, the starving load (see
    `starving_load`), and `saturated`: whether the sweep found it (else censored)."""
    wt = workload_table(df).drop("workload", "best_max_loras", "best_max_cpu_loras", "best_throughput_tok_s")
    rows = []
    ok = df.filter(pl.col("status") == "ok").sort("offered_tok_s")
    for (wk, ml), g in ok.group_by("workload_key", "max_loras"):
        cap = starving_load(g["offered_tok_s"].to_numpy(), g["throughput_tok_s"].to_numpy(), g["served_frac"].to_numpy())
        rows.append({"workload_key": wk, "max_loras": ml,
                     "capacity_tok_s": cap if cap is not None else float(g["offered_tok_s"].max()),
                     "saturated": cap is not None, "max_lora_rank": g["max_lora_rank"][0],
                     "kv_capacity_tokens": g["kv_capacity_tokens"][0]})
    if not rows:
        raise TracekitError("dataset has no successful twin runs")
    g = pl.DataFrame(rows, schema_overrides={"max_loras": df.schema["max_loras"]})
    t = g.join(wt, on="workload_key", how="left").sort("workload_key", "max_loras")
    d = [derived(a, tpr, ml, kv) for a, tpr, ml, kv in
         t.select("adapter_tok_s", "tokens_per_req", "max_loras", "kv_capacity_tokens").iter_rows()]
    return t.with_columns(pl.DataFrame(d))


def _xy(t: pl.DataFrame, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    X = t.select(features).to_numpy().astype(np.float64)
    y = np.log(np.maximum(t["capacity_tok_s"].to_numpy().astype(np.float64), 1e-6))
    return X, y


def fit(kind: str, t: pl.DataFrame, features: list[str] = MODEL_FEATURES) -> CapacityModel:
    X, y = _xy(t, features)
    if len(y) < 2:
        raise TracekitError(f"training needs at least 2 saturated (workload, max_loras) groups, got {len(y)}")
    if kind == "tree":
        from sklearn.tree import DecisionTreeRegressor

        est = DecisionTreeRegressor(max_depth=TREE_DEPTH, min_samples_leaf=MIN_LEAF, random_state=0).fit(X, y)
        return from_sklearn_tree(est, features)
    if kind == "linear":
        from sklearn.linear_model import RidgeCV
        from sklearn.preprocessing import StandardScaler

        sc = StandardScaler().fit(X)
        # Constant columns (e.g. one rank everywhere) have scale 0: keep them inert.
        sc.scale_ = np.where(sc.scale_ > 0, sc.scale_, 1.0)
        est = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(sc.transform(X), y)
        return from_sklearn_linear(sc, est, features)
    raise TracekitError(f"--kind {kind}: expected tree or linear")


def _kv_lookup(df: pl.DataFrame) -> dict[tuple[int, int], int]:
    return {
        (int(r[0]), int(r[1])): int(r[2])
        for r in df.select("max_loras", "max_lora_rank", "kv_capacity_tokens").unique().iter_rows()
    }


def _decision(cells: pl.DataFrame, ml: int, n: int, workload: str, best_n: int | None) -> dict[str, Any]:
    sc = scoring.score(cells, ml, n)
    return {"workload": workload, "max_loras": ml, "adapters": n, "best_adapters": best_n,
            "strict": sc["strict"], "interpolated": sc["interpolated"]}


def cross_validate(df: pl.DataFrame, kinds: tuple[str, ...] = ("tree", "linear"), folds: int = 5,
                   baselines: bool = True, safety_z: float | None = None) -> dict[str, Any]:
    """GroupKFold over workloads. Per model kind: the held-out error of the starving load
    (MAPE, bias, residuals) and the held-out workloads' model-only decisions, taken with
    the safety rule at sigma = this MAPE (the twin is the truth here: no twin error)."""
    from sklearn.model_selection import GroupKFold

    from predictor.safety import load_rule

    z = load_rule().safety_z if safety_z is None else safety_z
    ct = capacity_table(df)
    train_t = ct.filter(pl.col("saturated"))
    wt = workload_table(df)
    wkeys = wt["workload_key"].to_list()
    k = min(folds, len(wkeys))
    if k < 2:
        raise TracekitError("cross-validation needs at least 2 workloads")
    kv = _kv_lookup(df)
    ml_grid = sorted(set(df["max_loras"].to_list()))
    n_max = int(df["max_cpu_loras"].max())
    cells_by_w = {key: g for (key,), g in df.group_by("workload_key")}
    wrows = {r["workload_key"]: r for r in wt.iter_rows(named=True)}
    widx = np.arange(len(wkeys))
    splits = list(GroupKFold(n_splits=k).split(widx, groups=widx))

    out: dict[str, Any] = {}
    for kind in kinds:
        res: list[float] = []
        models = []
        for tr, _ in splits:
            tr_keys = {wkeys[i] for i in tr}
            tr_t = train_t.filter(pl.col("workload_key").is_in(list(tr_keys)))
            if tr_t.height < 2:
                models.append(None)
                continue
            m = fit(kind, tr_t)
            models.append(m)
            te_t = train_t.filter(~pl.col("workload_key").is_in(list(tr_keys)))
            if te_t.height:
                X, y = _xy(te_t, m.features)
                res += (y - m.predict_log(X)).tolist()
        r = np.asarray(res, dtype=np.float64)
        mape = float(np.mean(np.abs(np.expm1(-r)))) if r.size else None
        step = min(0.9, z * (mape or 0.0))
        decisions = []
        for (_, te), m in zip(splits, models, strict=True):
            if m is None:
                continue
            for i in te:
                w = wrows[wkeys[i]]
                if w["best_max_cpu_loras"] is None:
                    continue  # starves in every swept config: no decision to judge
                p = plan(m, w, lambda ml, rk: kv.get((ml, rk), 0), n_max, ml_grid,
                         below=lambda sp, f=1.0 - step: max(1, int(sp * f)))
                if p is None:
                    continue
                decisions.append(_decision(cells_by_w[wkeys[i]], p.max_loras, p.adapters, w["workload"],
                                           w["best_max_cpu_loras"]))
        out[kind] = _summarise(res, decisions)
        out[kind]["safety_step"] = step
    if baselines:
        out.update(_paper_baselines(wt, cells_by_w, k))
    infeasible = int(wt["best_max_cpu_loras"].is_null().sum())
    for m in out.values():
        m["infeasible"] = infeasible
    return out


def _summarise(res: list[float], decisions: list[dict[str, Any]]) -> dict[str, Any]:
    r = np.asarray(res, dtype=np.float64)
    n_err = [abs(d["adapters"] - d["best_adapters"]) / d["best_adapters"] for d in decisions if d.get("best_adapters")]
    interp = scoring.summarise(decisions, "interpolated")
    strict = scoring.summarise(decisions, "strict")
    return {
        "capacity_mape": float(np.mean(np.abs(np.expm1(-r)))) if r.size else None,
        "capacity_bias": float(np.mean(np.expm1(-r))) if r.size else None,
        "adapters_mape": float(np.mean(n_err)) if n_err else None,
        "mean_shortfall": interp["mean_shortfall"],
        "starved_frac": (interp["starved"] / interp["workloads"]) if interp["workloads"] else None,
        "strict_mean_shortfall": strict["mean_shortfall"],
        "strict_starved_frac": (strict["starved"] / strict["workloads"]) if strict["workloads"] else None,
        "workloads": len(decisions),
        "residuals": r.tolist(),
        "decisions": decisions,
    }


def _paper_baselines(wt: pl.DataFrame, cells_by_w: dict[str, pl.DataFrame], k: int) -> dict[str, Any]:
    """The paper's approach: regress the best (max_cpu_loras, max_loras) on 8 features."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.model_selection import GroupKFold
    from sklearn.tree import DecisionTreeRegressor

    lab = wt.filter(pl.col("best_max_cpu_loras").is_not_null())
    if lab.height < 2:
        return {}
    X = lab.select(PAPER_FEATURES).to_numpy().astype(np.float64)
    Y = lab.select("best_max_cpu_loras", "best_max_loras").to_numpy().astype(np.float64)
    out = {}
    makers = {
        "paper_tree": lambda: DecisionTreeRegressor(random_state=0),
        "paper_forest": lambda: RandomForestRegressor(n_estimators=100, random_state=0, n_jobs=1),
    }
    idx = np.arange(lab.height)
    for name, make in makers.items():
        decisions = []
        for tr, te in GroupKFold(n_splits=min(k, lab.height)).split(idx, groups=idx):
            est = make().fit(X[tr], Y[tr])
            for i, (n_hat, ml_hat) in zip(te, est.predict(X[te]), strict=True):
                w = lab.row(int(i), named=True)
                n, ml = max(1, int(round(n_hat))), max(1, int(round(ml_hat)))
                decisions.append(_decision(cells_by_w[w["workload_key"]], min(ml, n), n, w["workload"],
                                           w["best_max_cpu_loras"]))
        out[name] = _summarise([], decisions)
    return out


def train(dataset: Path, kind: str = "auto", folds: int = 5) -> tuple[CapacityModel, dict[str, Any]]:
    df, ctx = pio.read(dataset)
    if "is_best" not in df.columns:
        raise TracekitError(f"{dataset}: no labels (is it a finished `predictor dataset` output?)")
    cv = cross_validate(df, kinds=("tree", "linear") if kind == "auto" else (kind,), folds=folds)

    # The held-out error is the model's part of the safety step: the smaller, the closer
    # a model-only answer may go to the starving point.
    chosen = kind if kind != "auto" else min(("tree", "linear"), key=lambda k: cv[k]["capacity_mape"] or 1.0)
    t = capacity_table(df).filter(pl.col("saturated"))
    model = fit(chosen, t)
    model.residuals = [round(x, 5) for x in cv[chosen]["residuals"]]
    digest = hashlib.sha256(Path(dataset).read_bytes()).hexdigest()[:16] if Path(dataset).is_file() else None
    model.meta = {
        "profile": ctx.get("profile"),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": {"path": str(dataset), "sha256_16": digest, "cells": df.height,
                    "workloads": df["workload_key"].n_unique(), "training_rows": t.height,
                    "spec": ctx.get("spec"), "simulator": ctx.get("simulator")},
        "max_loras_grid": sorted(set(df["max_loras"].to_list())),
        "max_cpu_loras_range": [int(df["max_cpu_loras"].min()), int(df["max_cpu_loras"].max())],
        "target": "log starving load (tok/s at 90% served) per (workload, max_loras)",
        # What the sweep's twin ran with besides max_loras / max_cpu_loras / max_lora_rank:
        # a model-only answer for other settings is outside what it learned.
        "serving": ctx.get("serving"),
        "cv": {name: {k: v for k, v in m.items() if k not in ("residuals", "decisions")} for name, m in cv.items()},
        "cv_folds": folds,
    }
    return model, cv


def print_cv(cv: dict[str, Any], chosen: str | None = None) -> None:
    from rich.table import Table

    t = Table(title="cross-validation on held-out workloads (GroupKFold)")
    for c in ("model", "starving-load MAPE", "bias", "adapters MAPE", "mean shortfall (interp.)", "strict",
              "starved", "workloads"):
        t.add_column(c, justify="right" if c != "model" else "left")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    for name, m in cv.items():
        label = name + (" (shipped)" if name == chosen else "")
        t.add_row(label, pct(m["capacity_mape"]), pct(m["capacity_bias"]), pct(m["adapters_mape"]),
                  pct(m["mean_shortfall"]), pct(m["strict_mean_shortfall"]), pct(m["starved_frac"]), str(m["workloads"]))
    console.print(t)


@click.command("train")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Model file (JSON).")
@click.option("--kind", type=click.Choice(["auto", "tree", "linear"]), default="auto", show_default=True,
              help="Shallow tree or linear model on the log starving load; auto picks the smaller CV error.")
@click.option("--folds", type=int, default=5, show_default=True, help="GroupKFold folds over workloads.")
@click.option("--json", "as_json", is_flag=True, help="Print the saved model and its cross-validation as one JSON object.")
@user_errors
def train_cmd(dataset: Path, out: Path, kind: str, folds: int, as_json: bool = False) -> None:
    """Train the starving-load model on DATASET (from `predictor dataset`), report CV error."""
    if folds < 2:
        raise TracekitError("--folds must be at least 2")
    model, cv = train(dataset, kind, folds)
    if out.suffix == "":
        out = out.with_suffix(".json")
    model.save(out)
    if as_json:
        import json

        click.echo(json.dumps({"model": str(out), "kind": model.kind, "cv": cv}, indent=2, default=str))
        return
    print_cv(cv, model.kind)
    console.print(f"saved {model.kind} model -> {out} (held-out error {model.meta['cv'][model.kind]['capacity_mape']:.1%})")
