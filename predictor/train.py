"""`predictor train`: fit the capacity model on a twin sweep, cross-validated on held-out
workloads (GroupKFold), and compare with the paper's models.

Training table: one row per (workload, max_loras) of the sweep whose load reached its
limit (some cell served < 97% of its offered load); the target is the sustainable load,
the highest offered load one GPU serves at >= 97% (compute- or adapter-churn-limited). Workload
features come from the workload's cell with the most adapters (the best estimate).

Cross-validation scores both the capacity error and the decision: for every held-out
workload, the recommendation is looked up at the nearest swept cell, which tells
whether it starves and how far its throughput falls short of the workload's best
non-starving cell. The paper's baselines (one decision tree and a random forest on the
paper's 8 features, predicting the best max_cpu_loras and max_loras directly) are scored
the same way.
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
from predictor.model import (
    MODEL_FEATURES,
    PAPER_FEATURES,
    SUSTAINED_SERVED,
    CapacityModel,
    derived,
    from_sklearn_linear,
    from_sklearn_tree,
)
from predictor.plan import interpolate_cell, plan
from tracekit.cliutil import console, user_errors
from tracekit.metrics import STARVING_THRESHOLD
from tracekit.schema import TracekitError

SATURATED_BELOW = SUSTAINED_SERVED
# Offered load per GPU as a fraction of predicted capacity, tried in cross-validation.
LOAD_FACTORS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.8)
STARVED_LOSS = 0.3
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


def sustainable_load(off: np.ndarray, thr: np.ndarray, served: np.ndarray) -> float | None:
    """The highest offered load (tok/s) one GPU serves at >= SATURATED_BELOW, from one
    (workload, max_loras) group's cells sorted by offered load; None when no cell fell
    below (the sweep never found the limit: a lower bound only).

    Between the last cell above and the first below, served ~ min(1, C / offered) with
    C the throughput the cell below reached; this also holds when the limit is adapter
    churn (many adapters per slot) rather than compute, where served falls gradually."""
    below = np.flatnonzero(served < SATURATED_BELOW)
    if below.size == 0:
        return None
    j = int(below[0])
    lo = float(off[j - 1]) if j > 0 else 0.0
    return float(np.clip(thr[j] / SATURATED_BELOW, lo, off[j]))


def capacity_table(df: pl.DataFrame) -> pl.DataFrame:
    """Per (workload, max_loras): `capacity_tok_s`, the sustainable offered load (see
    `sustainable_load`), and `saturated`: whether the sweep found it (else censored)."""
    wt = workload_table(df).drop("workload", "best_max_loras", "best_max_cpu_loras", "best_throughput_tok_s")
    rows = []
    ok = df.filter(pl.col("status") == "ok").sort("offered_tok_s")
    for (wk, ml), g in ok.group_by("workload_key", "max_loras"):
        cap = sustainable_load(g["offered_tok_s"].to_numpy(), g["throughput_tok_s"].to_numpy(), g["served_frac"].to_numpy())
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


def _score(cells: pl.DataFrame, best_thr: float | None, ml: int, n: int) -> dict[str, Any]:
    # Judged between grid points by interpolation: a nearest-grid lookup would mostly
    # measure how coarse the sweep's grid is, not how good the decision is.
    c = interpolate_cell(cells, ml, n)
    if c is None:
        return {"starved": True, "shortfall": None}
    starved = c["status"] != "ok" or c["served_frac"] <= 1.0 - STARVING_THRESHOLD
    thr = float(c["throughput_tok_s"] or 0.0)
    return {
        "cell_max_loras": c["max_loras"], "cell_max_cpu_loras": c["max_cpu_loras"],
        "starved": bool(starved), "throughput_tok_s": thr,
        "shortfall": (1.0 - thr / best_thr) if best_thr else None,
    }


def cross_validate(df: pl.DataFrame, kinds: tuple[str, ...] = ("tree", "linear"), folds: int = 5, baselines: bool = True) -> dict[str, Any]:
    """GroupKFold over workloads. Returns per-method metrics and held-out residuals."""
    from sklearn.model_selection import GroupKFold

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

    out: dict[str, Any] = {}
    gkf = GroupKFold(n_splits=k)
    widx = np.arange(len(wkeys))
    for kind in kinds:
        res: list[float] = []
        decisions: dict[float, list[dict[str, Any]]] = {lf: [] for lf in LOAD_FACTORS}
        for tr, te in gkf.split(widx, groups=widx):
            tr_keys = {wkeys[i] for i in tr}
            tr_t = train_t.filter(pl.col("workload_key").is_in(list(tr_keys)))
            if tr_t.height < 2:
                continue
            m = fit(kind, tr_t)
            te_t = train_t.filter(~pl.col("workload_key").is_in(list(tr_keys)))
            if te_t.height:
                X, y = _xy(te_t, m.features)
                res += (y - m.predict_log(X)).tolist()
            for lf in LOAD_FACTORS:
                m.load_factor = lf
                for i in te:
                    wk = wkeys[i]
                    w = wrows[wk]
                    if w["best_max_cpu_loras"] is None:
                        continue  # starves in every swept config: no decision to judge
                    p = plan(m, w, lambda ml, r: kv.get((ml, r), 0), n_max, ml_grid)
                    if p is None:
                        continue
                    s = _score(cells_by_w[wk], w["best_throughput_tok_s"], p.max_loras, p.max_cpu_loras)
                    decisions[lf].append({"workload": w["workload"], "max_loras": p.max_loras,
                                          "max_cpu_loras": p.max_cpu_loras,
                                          "best_max_cpu_loras": w["best_max_cpu_loras"], **s})
        by_lf = {lf: _summarise(res, d) for lf, d in decisions.items()}
        # The load factor is chosen on held-out decisions (see `_summarise`'s loss).
        lf = min(LOAD_FACTORS, key=lambda f: by_lf[f]["loss"] if by_lf[f]["loss"] is not None else 1.0)
        out[kind] = dict(by_lf[lf], load_factor=lf)
    if baselines:
        out.update(_paper_baselines(wt, cells_by_w, k))
    infeasible = int(wt["best_max_cpu_loras"].is_null().sum())
    for m in out.values():
        m["infeasible"] = infeasible
    return out


def _summarise(res: list[float], decisions: list[dict[str, Any]]) -> dict[str, Any]:
    r = np.asarray(res, dtype=np.float64)
    sf = [d["shortfall"] for d in decisions if d["shortfall"] is not None]
    n_err = [abs(d["max_cpu_loras"] - d["best_max_cpu_loras"]) / d["best_max_cpu_loras"]
             for d in decisions if d.get("best_max_cpu_loras")]
    # Decision loss: the shortfall, or 0.3 for a GPU that starves (a starving GPU also
    # fails its users: as bad as leaving 30% of the throughput on the table).
    loss = [STARVED_LOSS if d["starved"] else (d["shortfall"] or 0.0) for d in decisions]
    return {
        "loss": float(np.mean(loss)) if loss else None,
        "capacity_mape": float(np.mean(np.abs(np.expm1(-r)))) if r.size else None,
        "capacity_bias": float(np.mean(np.expm1(-r))) if r.size else None,
        "max_cpu_loras_mape": float(np.mean(n_err)) if n_err else None,
        "mean_shortfall": float(np.mean(sf)) if sf else None,
        "starved_frac": float(np.mean([d["starved"] for d in decisions])) if decisions else None,
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
                s = _score(cells_by_w[w["workload_key"]], w["best_throughput_tok_s"], min(ml, n), n)
                decisions.append({"workload": w["workload"], "max_loras": min(ml, n), "max_cpu_loras": n,
                                  "best_max_cpu_loras": w["best_max_cpu_loras"], **s})
        out[name] = _summarise([], decisions)
    return out


def train(dataset: Path, kind: str = "auto", folds: int = 5) -> tuple[CapacityModel, dict[str, Any]]:
    df, ctx = pio.read(dataset)
    if "is_best" not in df.columns:
        raise TracekitError(f"{dataset}: no labels (is it a finished `predictor dataset` output?)")
    cv = cross_validate(df, kinds=("tree", "linear") if kind == "auto" else (kind,), folds=folds)

    def badness(m: dict[str, Any]) -> float:
        return (m["loss"] if m["loss"] is not None else 1.0) + (m["capacity_mape"] or 0.0)

    chosen = kind if kind != "auto" else min(("tree", "linear"), key=lambda k: badness(cv[k]))
    t = capacity_table(df).filter(pl.col("saturated"))
    model = fit(chosen, t)
    model.residuals = [round(x, 5) for x in cv[chosen]["residuals"]]
    model.load_factor = float(cv[chosen]["load_factor"])
    digest = hashlib.sha256(Path(dataset).read_bytes()).hexdigest()[:16] if Path(dataset).is_file() else None
    model.meta = {
        "profile": ctx.get("profile"),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": {"path": str(dataset), "sha256_16": digest, "cells": df.height,
                    "workloads": df["workload_key"].n_unique(), "training_rows": t.height,
                    "spec": ctx.get("spec"), "simulator": ctx.get("simulator")},
        "max_loras_grid": sorted(set(df["max_loras"].to_list())),
        "max_cpu_loras_range": [int(df["max_cpu_loras"].min()), int(df["max_cpu_loras"].max())],
        "target": "log capacity_tok_s per (workload, max_loras)",
        "cv": {name: {k: v for k, v in m.items() if k not in ("residuals", "decisions")} for name, m in cv.items()},
        "cv_folds": folds,
    }
    return model, cv


def print_cv(cv: dict[str, Any], chosen: str | None = None) -> None:
    from rich.table import Table

    t = Table(title="cross-validation on held-out workloads (GroupKFold)")
    for c in ("model", "capacity MAPE", "capacity bias", "max_cpu_loras MAPE", "mean shortfall", "starved", "workloads"):
        t.add_column(c, justify="right" if c != "model" else "left")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    for name, m in cv.items():
        label = name + (" (shipped)" if name == chosen else "")
        t.add_row(label, pct(m["capacity_mape"]), pct(m["capacity_bias"]), pct(m["max_cpu_loras_mape"]),
                  pct(m["mean_shortfall"]), pct(m["starved_frac"]), str(m["workloads"]))
    console.print(t)


@click.command("train")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Model file (JSON).")
@click.option("--kind", type=click.Choice(["auto", "tree", "linear"]), default="auto", show_default=True,
              help="Shallow tree or linear model on log capacity; auto picks the better in CV.")
@click.option("--folds", type=int, default=5, show_default=True, help="GroupKFold folds over workloads.")
@user_errors
def train_cmd(dataset: Path, out: Path, kind: str, folds: int) -> None:
    """Train the capacity model on DATASET (from `predictor dataset`), report CV error."""
    if folds < 2:
        raise TracekitError("--folds must be at least 2")
    model, cv = train(dataset, kind, folds)
    if out.suffix == "":
        out = out.with_suffix(".json")
    model.save(out)
    print_cv(cv, model.kind)
    console.print(f"saved {model.kind} model -> {out} (load factor {model.load_factor:.2f} of predicted capacity)")
