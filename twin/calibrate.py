"""Fit profiles: from captured steps (`twin calibrate`), or from aggregate benchmark runs.

Two routes to the same `step_time` section (see `twin.timing`):

- captured steps (`tracekit` steps files, one row per engine step with its duration):
  regress each step's duration on its composition; the error is measured on held-out
  steps (a random fifth), then the model is refitted on all of them.
- aggregate `vllm bench` runs with every request sent at once (`twin.microbench`):
  replay each run's schedule, then fit the coefficients so that the predicted
  duration, mean TTFT and mean ITL match what each run measured; the error is measured
  leaving each run out in turn.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl

from tracekit.schema import TracekitError
from twin.timing import FEATURE_DOC, FEATURES, LinearStepTime, error_stats, features, fit_linear

# --- from aggregate benchmark runs ------------------------------------------------------

METRICS = ("duration_s", "mean_ttft_s", "mean_itl_s")
# ITL and duration carry what the twin must get right (throughput, ITL); TTFT of an
# all-at-once burst also holds the API server's intake of thousands of requests, which
# the step model does not describe, so it counts for less.
METRIC_WEIGHT = {"duration_s": 1.0, "mean_ttft_s": 0.5, "mean_itl_s": 2.0}


def microbench_aggregates(mbs: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """Each run's feature sums per metric (`twin.microbench`): what the fits and the
    evaluations below multiply by coefficients."""
    from twin.microbench import schedule_closed_batch

    return [schedule_closed_batch(mb).aggregates() for mb in mbs]


def fit_from_microbenches(
    mbs: Sequence[Any], *, use: Sequence[str] = FEATURES, aggs: Sequence[dict[str, np.ndarray]] | None = None
) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]:
    """Fit step-time coefficients to microbenchmark summaries (`aggs`: their
    `microbench_aggregates`, when already computed).

    Returns (coef, fit_error, per_run rows with measured and predicted metrics)."""
    if aggs is None:
        aggs = microbench_aggregates(mbs)

    def rows_of(ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xs, ys, ws = [], [], []
        for i in ids:
            for m in METRICS:
                if m in aggs[i] and mbs[i].measured.get(m):
                    xs.append(aggs[i][m])
                    ys.append(mbs[i].measured[m])
                    ws.append(METRIC_WEIGHT[m])
        return np.array(xs), np.array(ys), np.array(ws)

    everything = list(range(len(mbs)))
    x, y, w = rows_of(everything)
    fit = fit_linear(x, y, use=use, row_weight=w)

    # Leave one run out: refit without it, predict it.
    loo: dict[str, list[tuple[float, float]]] = {m: [] for m in METRICS}
    for i in everything:
        xi, yi, wi = rows_of([j for j in everything if j != i])
        v = np.array([fit_linear(xi, yi, use=use, row_weight=wi).coef[f] for f in FEATURES])
        for m in METRICS:
            if m in aggs[i] and mbs[i].measured.get(m):
                loo[m].append((float(aggs[i][m] @ v), mbs[i].measured[m]))
    err: dict[str, Any] = {"method": "leave-one-run-out", "runs": len(mbs)}
    for m in METRICS:
        if loo[m]:
            pred, true = np.array(loo[m]).T
            err[m] = error_stats(pred, true)
    err["in_sample"], per_run = evaluate_microbenches(mbs, fit.coef, aggs=aggs)
    return fit.coef, err, per_run


def evaluate_microbenches(
    mbs: Sequence[Any],
    coef: Mapping[str, float],
    *,
    request_intake_s: float = 0.0,
    aggs: Sequence[dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(error stats, per-run rows) of fixed coefficients on microbenchmark summaries.

    `request_intake_s`: engine time per arriving request. Every request of these runs
    arrives at once, so the engine takes all of them in before its first step: the
    whole intake adds to the duration and to every request's TTFT."""
    if aggs is None:
        aggs = microbench_aggregates(mbs)
    vec = np.array([float(coef.get(f, 0.0)) for f in FEATURES])
    per_run, stats = [], {}
    for mb, agg in zip(mbs, aggs, strict=True):
        row: dict[str, Any] = {"run": mb.name}
        for m in METRICS:
            if m in agg and mb.measured.get(m):
                pred = float(agg[m] @ vec)
                if m in ("duration_s", "mean_ttft_s"):
                    pred += request_intake_s * mb.num_requests
                row[m] = mb.measured[m]
                row[m + "_pred"] = pred
        per_run.append(row)
    for m in METRICS:
        pairs = [(r[m + "_pred"], r[m]) for r in per_run if m in r]
        if pairs:
            pred, true = np.array(pairs).T
            stats[m] = error_stats(pred, true)
    return stats, per_run


def paper_microbenches(
    calibration_csv: str | Path, model: str, kv_tokens_of: Any
) -> list[Any]:
    """The paper's all-at-once runs for `model` from `calibration_runs.csv`.

    `kv_tokens_of(max_loras, max_lora_rank, enable_lora, max_num_seqs)` fills in the KV
    capacity where the run did not log it (from the fitted memory model)."""
    from twin.microbench import Microbench

    df = pl.read_csv(calibration_csv, infer_schema_length=10000)
    df = df.filter(
        (pl.col("model") == model)
        & pl.col("experiment").str.contains("predictor_default_latency|predictor_latency_overhead|predictor_loading")
        & (pl.col("status") == "ok")
    )
    out = []
    for r in df.sort("dir").iter_rows(named=True):
        n = int(r["num_prompts"])
        lora = bool(r["enable_lora"])
        max_loras = int(r["max_loras"] or 1)
        rank = int(r["max_lora_rank"] or 16)
        # find_max_batch runs left max_num_seqs at vLLM's default (their gauges never
        # show more than 256 running) and spread requests over all max_loras adapters.
        seqs = int(r["max_num_seqs"] or 256)
        loading = "predictor_loading" in r["experiment"]
        adapter_rank = rank
        if loading:
            # The adapter-loading runs sent their requests one at a time (the gauges show
            # one running request) to vLLM's default max_loras=1: their ITL is the step
            # time of a one-request LoRA batch; their duration and TTFT hold the client's
            # pacing and the loads, so only the ITL is used.
            seqs, max_loras = 1, 1
            m = re.search(r"adapter_rank_(\d+)", r["dir"])
            adapter_rank = int(m.group(1)) if m else rank
        kv = r["kv_cache_tokens"] or kv_tokens_of(max_loras, rank, lora, seqs)
        n_adapters = 0
        if loading:
            n_adapters = 1
        elif lora:
            m = re.search(r"__\d+_\d+_(\d+)$", r["dir"].rstrip("/"))
            n_adapters = int(m.group(1)) if m else max_loras
        measured = {} if loading else {"duration_s": float(r["duration_s"]), "mean_ttft_s": float(r["mean_ttft_ms"]) / 1e3}
        out_tokens = round(r["total_output_tokens"] / n)
        if out_tokens > 1 and r["mean_itl_ms"]:
            measured["mean_itl_s"] = float(r["mean_itl_ms"]) / 1e3
        out.append(
            Microbench(
                name=r["dir"].split("estimators/")[-1],
                prompt_tokens=round(r["total_input_tokens"] / n),
                output_tokens=out_tokens,
                num_requests=n,
                max_num_seqs=seqs,
                kv_tokens=int(kv),
                max_num_batched_tokens=int(r["chunked_max_batched_tokens"] or 2048),
                num_adapters=n_adapters,
                adapter_rank=adapter_rank,
                max_loras=max_loras if lora else 1,
                max_lora_rank=rank,
                measured=measured,
            )
        )
    return out


# --- from captured steps ----------------------------------------------------------------


def _steps_files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise TracekitError(f"{p}: no such file or directory")
        out.append(path)
    return out


def load_steps(paths: Sequence[str]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Steps from files or capture directories, with the adapter ranks resolved.

    Adds num_adapters, rank_sum and (when the capture lacks it) an estimated
    context_tokens = kv_usage x KV capacity. Returns (frame, merged context)."""
    from tracekit.schema import KIND_STEPS, adapter_ranks, read

    frames = []
    ctx: dict[str, Any] = {}
    for path in _steps_files(paths):
        df, meta = read(path, KIND_STEPS)
        c = dict(meta.context or {})
        ranks = adapter_ranks(c)
        server = c.get("server") if isinstance(c.get("server"), Mapping) else {}
        cfg = {**server, **{k: c[k] for k in c if k not in ("adapters", "server")}}
        kv_cap = cfg.get("kv_capacity_tokens")
        default_rank = int(cfg.get("max_lora_rank") or 16)
        lens = df["active_adapters"].list.len().fill_null(0)
        rank_sum = [
            sum(ranks.get(a, default_rank) for a in (acts or [])) for acts in df["active_adapters"].to_list()
        ]
        df = df.with_columns(num_adapters=lens, rank_sum=pl.Series(rank_sum, dtype=pl.Int64))
        if "context_tokens" not in df.columns or df["context_tokens"].null_count() == len(df):
            if kv_cap and "kv_usage" in df.columns:
                est = (df["kv_usage"].fill_null(0.0) * float(kv_cap)).round(0)
                df = df.with_columns(context_tokens=est.cast(pl.Int64))
            else:
                df = df.with_columns(context_tokens=pl.lit(0, dtype=pl.Int64))
            cfg["context_tokens_estimated"] = True
        if "adapter_load_s" not in df.columns:
            df = df.with_columns(adapter_load_s=pl.lit(None, dtype=pl.Float64))
        keep = [
            "duration_s", "prefill_tokens", "decode_tokens", "context_tokens",
            "num_adapters", "rank_sum", "adapter_loads", "adapter_load_s",
        ]
        frames.append(df.select(keep).with_columns(pl.lit(str(path)).alias("source")))
        for k, v in cfg.items():
            ctx.setdefault(k, v)
        ctx.setdefault("adapters", {}).update(c.get("adapters") or {})
    steps = pl.concat(frames, how="vertical_relaxed")
    return steps, ctx


def fit_from_steps(
    steps: pl.DataFrame, ctx: Mapping[str, Any], *, holdout: float = 0.2, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(step_time section, adapter_load section) fitted from captured steps."""
    s = steps.filter(
        (pl.col("duration_s") > 0) & ((pl.col("prefill_tokens") + pl.col("decode_tokens")) > 0)
    ).fill_null(0)
    if len(s) < 10:
        raise TracekitError(
            f"calibrate: only {len(s)} usable steps (need at least 10 with tokens and a duration)"
        )
    max_loras = int(ctx.get("max_loras") or 1)
    max_lora_rank = int(ctx.get("max_lora_rank") or 16)
    x = features(
        s["prefill_tokens"].to_numpy(),
        s["decode_tokens"].to_numpy(),
        s["context_tokens"].to_numpy(),
        s["num_adapters"].to_numpy(),
        s["rank_sum"].to_numpy(),
        max_lora_rank=max_lora_rank,
        max_loras=max_loras,
    )
    y = s["duration_s"].to_numpy().astype(np.float64)
    loads = s["adapter_loads"].to_numpy().astype(np.float64)
    load_s = s["adapter_load_s"].to_numpy().astype(np.float64)
    # A step that loads adapters also waits for them: take the measured load time off
    # when the capture has it, otherwise fit seconds-per-load as one more column.
    measured_loads = bool(np.any(load_s > 0))
    y_model = np.maximum(y - load_s, 1e-6) if measured_loads else y
    use = list(FEATURES)
    if len(set(x[:, FEATURES.index("num_adapters")])) <= 1:
        # Every step had the same adapter count: the LoRA terms cannot be told apart
        # from the intercept, so keep only the per-token LoRA term.
        use = [f for f in use if f not in ("lora_slots", "num_adapters", "rank_sum")]
    xa = np.c_[x, loads] if not measured_loads and loads.any() else x

    cols = [s[c].to_numpy() for c in ("prefill_tokens", "decode_tokens", "context_tokens", "num_adapters", "rank_sum")]

    def predict(coef: dict[str, float], idx: np.ndarray) -> np.ndarray:
        return LinearStepTime(coef).predict(*[c[idx] for c in cols], max_loras=max_loras, max_lora_rank=max_lora_rank)

    def fit(idx: np.ndarray) -> tuple[dict[str, float], float]:
        from scipy.optimize import nnls

        f = fit_linear(x[idx], y_model[idx], use=use)
        pred = predict(f.coef, idx)
        per_load = 0.0
        if xa.shape[1] > x.shape[1]:
            # Seconds per adapter load: NNLS on what the step model leaves over.
            (per_load,), _ = nnls(loads[idx, None], y_model[idx] - pred)
        # The relative-error fit follows the typical step; the twin's throughput and mean
        # latencies are sums of step times, so the coefficients are scaled to give the
        # measured total (a relative fit under-predicts the long prefill chunks: about 9%
        # of the total on the CPU captures).
        rest = y_model[idx].sum() - per_load * loads[idx].sum()
        if pred.sum() > 0 and rest > 0:
            scale = float(rest / pred.sum())
            f.coef = {k: v * scale for k, v in f.coef.items()}
        return f.coef, float(per_load)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(s))
    n_test = max(1, int(round(holdout * len(s)))) if holdout > 0 else 0
    test, train = order[:n_test], order[n_test:]
    err: dict[str, Any] = {"method": f"random {holdout:.0%} of steps held out (seed {seed})"}
    if n_test:
        coef_tr, per_load_tr = fit(train)
        pred = predict(coef_tr, test) + per_load_tr * loads[test]
        err["held_out"] = error_stats(pred, y_model[test])
    everything = np.arange(len(s))
    coef, per_load = fit(everything)
    pred_all = predict(coef, everything) + per_load * loads
    err["in_sample"] = error_stats(pred_all, y_model)
    section = {
        "kind": "linear",
        "coef": coef,
        "features": {f: FEATURE_DOC[f] for f in FEATURES},
        "fitted_features": list(use),  # the others were not identifiable from this data
        "min_s": float(max(np.min(y_model) * 0.5, 1e-6)),
        "fit_error": err,
    }
    if measured_loads:
        per = load_s[loads > 0] / loads[loads > 0]
        adapter_load = {"kind": "constant", "base_ms": round(1e3 * float(np.median(per)), 4), "per_rank_ms": 0.0,
                        "fitted_from": "adapter_load_s / adapter_loads of captured steps (median)"}
    else:
        adapter_load = {"kind": "constant", "base_ms": round(1e3 * per_load, 4), "per_rank_ms": 0.0,
                        "fitted_from": "step durations regressed on adapter_loads" if loads.any() else
                        "no adapter loads in the capture: 0"}
    return section, adapter_load


# vLLM versions from which `scheduler_reserve_full_isl` exists and defaults to True (for a
# capture whose context does not record the flag).
FULL_ISL_DEFAULT_FROM = (0, 32)


def _version(v: Any) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(v or ""))[:2]
    return tuple(int(x) for x in parts)


def server_from_context(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """The profile's `server` section: what the captured vLLM ran with, from the step
    plugin's context (vLLM's names; see twin.config.SERVER_DEFAULTS), so that the twin's
    serving defaults are that server's."""
    from twin.config import SERVER_FIELDS

    server: dict[str, Any] = {"vllm_version": str(ctx.get("vllm_version") or "unknown")}
    for k in SERVER_FIELDS:
        v = ctx.get(k)
        if v is not None:
            server[k] = bool(v) if isinstance(v, bool) else v
    notes = []
    if "scheduler_reserve_full_isl" not in server:
        v = _version(ctx.get("vllm_version"))
        server["scheduler_reserve_full_isl"] = bool(v) and v >= FULL_ISL_DEFAULT_FROM
        notes.append(
            f"scheduler_reserve_full_isl not recorded by the capture: vLLM {server['vllm_version']}'s default assumed"
        )
    for k in ("enable_prefix_caching", "async_scheduling"):
        if k not in server:
            notes.append(f"{k} not recorded by the capture: off assumed")
            server[k] = False
    if notes:
        server["note"] = "; ".join(notes)
    return server


def profile_from_steps(
    paths: Sequence[str],
    *,
    name: str | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    kv_capacity_tokens: int | None = None,
) -> dict[str, Any]:
    """A complete profile dict from captured steps files/directories.

    The KV capacity comes from the capture (`kv_capacity_tokens` in its context) or from
    `kv_capacity_tokens`; without either, no profile (the twin could not use it)."""
    steps, ctx = load_steps(paths)
    kv = kv_capacity_tokens or ctx.get("kv_capacity_tokens")
    if not kv or int(kv) <= 0:
        raise TracekitError(
            f"{paths[0]}: the capture did not record the KV capacity (kv_capacity_tokens); "
            "pass --kv-capacity-tokens N (vLLM's log: 'GPU KV cache size: N tokens')"
        )
    st, al = fit_from_steps(steps, ctx, holdout=holdout, seed=seed)
    model = str(ctx.get("model") or "unknown-model")
    memory: dict[str, Any] = {"kind": "fixed", "kv_tokens": int(kv)}
    if kv_capacity_tokens:
        memory["note"] = "kv_tokens given to twin calibrate (--kv-capacity-tokens)"
    if ctx.get("max_model_len"):
        memory["max_model_len"] = int(ctx["max_model_len"])
    captured = {k: ctx.get(k) for k in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_seqs",
                                        "max_num_batched_tokens", "block_size", "kv_capacity_tokens") if ctx.get(k) is not None}
    server = server_from_context(ctx)
    return {
        "name": name or f"calibrated-{Path(str(model)).name}",
        "description": f"{model}, fitted from {len(steps)} captured steps (vLLM {server['vllm_version']})",
        "hardware": {"device": ctx.get("device", "as captured")},
        "model": {"name": model},
        "server": server,
        "captured_server_config": captured,
        "memory": memory,
        "step_time": st,
        "adapter_load": al,
        "fitted_from": {
            "kind": "captured steps",
            "files": [str(p) for p in paths],
            "steps": len(steps),
            "context_tokens_estimated": bool(ctx.get("context_tokens_estimated", False)),
            "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }


# --- command ------------------------------------------------------------------------------


@click.command("calibrate")
@click.argument("steps", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Profile JSON to write.")
@click.option("--name", default=None, help="Profile name (default: calibrated-<model>).")
@click.option("--holdout", default=0.2, show_default=True, type=click.FloatRange(0, 0.9),
              help="Fraction of steps held out to measure the fit error.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the held-out split.")
@click.option("--kv-capacity-tokens", type=click.IntRange(min=1), default=None,
              help="The server's KV capacity in tokens, when the capture did not record it.")
@click.option("--json", "as_json", is_flag=True, help="Print the fitted profile's summary as one JSON object.")
def _calibrate(
    steps: tuple[str, ...], out: str, name: str | None, holdout: float, seed: int, kv_capacity_tokens: int | None,
    as_json: bool = False,
) -> None:
    """Fit a twin profile (step time, adapter load, KV capacity) from captured steps.

    STEPS: steps Parquet files or capture directories (tracekit steps schema)."""
    from rich.table import Table

    from tracekit.cliutil import console
    from twin.profile import Profile

    with console.status("fitting step time...") if not as_json else contextlib.nullcontext():
        data = profile_from_steps(list(steps), name=name, holdout=holdout, seed=seed, kv_capacity_tokens=kv_capacity_tokens)
    path = Profile.from_dict(data).save(out)
    st = data["step_time"]
    if as_json:
        click.echo(json.dumps({
            "profile": str(path), "name": data["name"], "steps": data["fitted_from"]["steps"],
            "coef": st["coef"], "fit_error": st["fit_error"], "adapter_load_ms": data["adapter_load"]["base_ms"],
            "kv_tokens": data["memory"].get("kv_tokens"), "server": data["server"],
        }, indent=2, default=str))
        return
    t = Table(title=f"profile {data['name']} <- {data['fitted_from']['steps']} steps")
    t.add_column("feature")
    t.add_column("coefficient", justify="right")
    t.add_column("meaning")
    for f in FEATURES:
        t.add_row(f, f"{st['coef'][f]:.4g}", FEATURE_DOC[f])
    console.print(t)
    e = st["fit_error"]
    for k in ("held_out", "in_sample"):
        if k in e:
            console.print(f"{k}: MAPE {e[k]['mape_pct']:.2f}%  R^2 {e[k]['r2']:.4f}  (n={e[k]['n']})")
    console.print(f"adapter load: {data['adapter_load']['base_ms']} ms; KV tokens: {data['memory'].get('kv_tokens')}")
    sv = data["server"]
    flags = ", ".join(f"{k} {'on' if sv.get(k) else 'off'}" for k in ("enable_prefix_caching", "scheduler_reserve_full_isl",
                                                                      "async_scheduling"))
    console.print(f"server (the twin's defaults for this profile): vLLM {sv['vllm_version']}, {flags}")
    console.print(f"wrote {path}")


def _wrap() -> click.Command:
    from tracekit.cliutil import user_errors

    _calibrate.callback = user_errors(_calibrate.callback)  # type: ignore[arg-type]
    return _calibrate


calibrate_cmd = _wrap()
