"""`predictor dataset`: sweep the twin over workloads x configurations, resumably.

Each cell (workload, max_loras, max_cpu_loras) synthesises one GPU's trace (the
workload's rates and ranks over `max_cpu_loras` adapters), runs the twin, and keeps the
summary (throughput, offered load, served fraction, TTFT/ITL) and the trace's features.

Resumable: finished cells are flushed as Parquet parts into `<out>.parts/` every few
seconds; on restart, cells already there (or in an earlier `<out>`) are skipped, unless
they were simulated under another version of the profile or by a twin that behaves
differently (`profile_digest`). The merged `<out>` (with the labels) is written at the
end, and the parts are removed once it holds every cell.

Labels (the paper's rule): per workload, the cell with the highest throughput among those
that do not starve (served < 90% of offered = starving); with `--slo-ttft-p99 S`, also
the best cell whose p99 TTFT is within S seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import polars as pl

from predictor import features as feats
from predictor import pio
from predictor import spec as specmod
from predictor.spec import Cell, Spec
from tracekit import parallel
from tracekit.cliutil import console, user_errors
from tracekit.metrics import STARVING_THRESHOLD
from tracekit.schema import TracekitError

DEFAULT_SIMULATOR = "twin.api:simulate"
FLUSH_EVERY_S = 5.0
FLUSH_EVERY_ROWS = 32


def _resolve(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise TracekitError(f"--simulator {path}: cannot import: {e}") from None


def serving_config(prof: Any, cell: Cell) -> Any:
    """The cell's ServingConfig: its max_loras / max_cpu_loras / max_lora_rank, the spec's
    `serving` flags, the rest from the profile's server (as `twin run` takes them)."""
    from twin.api import ServingConfig

    return ServingConfig.for_profile(prof, **dict(cell.serving), max_loras=cell.max_loras,
                                     max_cpu_loras=cell.max_cpu_loras, max_lora_rank=cell.max_lora_rank).check()


def run_cell(cell: Cell, profile: str, simulator: str = DEFAULT_SIMULATOR) -> dict[str, Any]:
    """Simulate one cell; returns one dataset row. Runs in a worker (local or Ray)."""
    from tracekit.synth import synthesize
    from twin.profile import load_profile

    w = cell.workload
    t0 = time.perf_counter()
    duration = cell.cell_duration()
    trace, ctx = synthesize(
        adapters=cell.max_cpu_loras,
        rates=list(w.rates),
        ranks=list(w.ranks),
        duration_s=duration,
        lengths=w.lengths,
        seed=w.seed,
        popularity=w.popularity,
        arrivals=w.arrivals,
    )
    prof = load_profile(profile)
    config = serving_config(prof, cell)
    kv = int(prof.kv_capacity_tokens(config))
    row: dict[str, Any] = {
        "cell_key": cell.key,
        "workload_key": w.key,
        "workload": w.label,
        "rates": json.dumps(list(w.rates)),
        "ranks": json.dumps(list(w.ranks)),
        "lengths": w.lengths,
        "arrivals": w.arrivals,
        "popularity": w.popularity,
        "seed": w.seed,
        "max_loras": cell.max_loras,
        "max_cpu_loras": cell.max_cpu_loras,
        "max_lora_rank": cell.max_lora_rank,
        "duration_s": duration,
        "kv_capacity_tokens": kv,
        "requests": trace.height,
    }
    f = feats.compute(trace, ctx)
    row.update({f"f_{k}": v for k, v in f.items()})
    if kv <= 0:
        # The server would not start: the profile says the adapters' slots leave no KV cache.
        row.update(status="oom", throughput_tok_s=0.0, offered_tok_s=f["offered_tok_s"], served_frac=0.0,
                   starved=True, p99_ttft_ms=None, mean_ttft_ms=None, mean_itl_ms=None, completed=0)
    else:
        res = _resolve(simulator)(trace, prof, config, trace_context=ctx, window_s=duration)
        s = res.summary
        row.update(
            status="ok",
            throughput_tok_s=float(s["throughput_tok_s"]),
            offered_tok_s=float(s["offered_tok_s"]),
            served_frac=float(s["served_frac"]),
            starved=bool(s["starved"]),
            p99_ttft_ms=s.get("p99_ttft_ms"),
            mean_ttft_ms=s.get("mean_ttft_ms"),
            mean_itl_ms=s.get("mean_itl_ms"),
            completed=int(s.get("completed", 0)),
        )
    row["sim_wall_s"] = time.perf_counter() - t0
    return row


ROW_SCHEMA: dict[str, Any] = {
    "p99_ttft_ms": pl.Float64,
    "mean_ttft_ms": pl.Float64,
    "mean_itl_ms": pl.Float64,
}


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema_overrides=ROW_SCHEMA, infer_schema_length=None)


# The fingerprint runs: one GPU past its capacity with every mechanism at work (GPU slot
# and CPU cache evictions, chunked prefills, preemptions from a small KV cache), once as
# the profile's server and once with prefix caching (shared system prompts), async
# scheduling and full-prompt admission on.
_FP_RUNS = (
    {},
    {"enable_prefix_caching": True, "async_scheduling": True, "scheduler_reserve_full_isl": True},
)


@functools.lru_cache(maxsize=8)
def _fingerprint(profile_json: str, simulator: str) -> str:
    from tracekit.synth import synthesize
    from twin.api import ServingConfig
    from twin.config import TWIN_COUNTERS
    from twin.profile import Profile

    prof = Profile.from_dict(json.loads(profile_json))
    h = hashlib.sha256(profile_json.encode())
    for i, flags in enumerate(_FP_RUNS):
        trace, ctx = synthesize(24, [2.0, 0.5, 0.1], [8, 16, 32], 30.0, seed=11 + i,
                                **({"turns": 2, "system_prompts": "2:64"} if flags else {}))
        cfg = ServingConfig.for_profile(prof, max_loras=4, max_cpu_loras=8, max_lora_rank=32, max_num_seqs=16,
                                        max_num_batched_tokens=256, kv_capacity_tokens=4096, **flags)
        res = _resolve(simulator)(trace, prof, cfg, trace_context=ctx, window_s=30.0)
        if getattr(res, "results", None) is not None:
            df = pl.from_arrow(res.results)
            for c in sorted(df.columns):
                col = df[c]
                if col.dtype.is_numeric():
                    h.update(c.encode() + col.cast(pl.Float64).fill_null(-1.0).to_numpy().tobytes())
                else:
                    h.update(c.encode() + "\0".join(map(str, col.to_list())).encode())
        # With per-request results, the twin's counters of what the server did (steps,
        # preemptions, adapter loads...); not its own bookkeeping (fast-forwarded steps,
        # loop times), which a faster engine changes without moving a number.
        keep = TWIN_COUNTERS if getattr(res, "results", None) is not None else tuple(res.summary or {})
        summary = {k: v for k, v in (res.summary or {}).items()
                   if k in keep and isinstance(v, (int, float)) and "wall" not in k and "loop" not in k}
        h.update(json.dumps(summary, sort_keys=True).encode())
    return h.hexdigest()[:16]


def profile_digest(prof: Any, simulator: str = DEFAULT_SIMULATOR) -> str:
    """Identifies what a cell's numbers come from: the profile's content and the twin's
    behaviour. The latter is a fingerprint, the exact results of two small runs of one
    saturated GPU (every scheduling mechanism at work, `_FP_RUNS`), so that cells simulated
    by a twin that schedules or times anything differently are redone on resume, while a
    change that moves no number (a refactor) keeps them."""
    return _fingerprint(json.dumps(prof.to_dict(), sort_keys=True, default=str), simulator)


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def finished_rows(out: Path, profile_sha: str | None = None) -> pl.DataFrame | None:
    """Every finished cell: the merged OUT of an earlier sweep plus the parts of an
    interrupted one, keeping only cells simulated under `profile_sha` when given."""
    frames = []
    if out.exists():
        frames.append(pio.read(out)[0])
    parts = parts_dir(out)
    if parts.is_dir():
        frames += [pl.read_parquet(f) for f in sorted(parts.glob("*.parquet")) if not f.name.startswith(("_", "."))]
    if not frames:
        return None
    df = pl.concat(frames, how="diagonal_relaxed")
    if profile_sha is not None:
        if "profile_sha" not in df.columns:
            return None
        df = df.filter(pl.col("profile_sha") == profile_sha)
    return df


def done_keys(out: Path, profile_sha: str | None = None) -> set[str]:
    df = finished_rows(out, profile_sha)
    return set() if df is None else set(df["cell_key"].to_list())


# --- executors (tracekit.parallel: shared with the fleet twin) -------------------------


def _iter_local(cells: list[Cell], profile: str, simulator: str, jobs: int) -> Iterator[dict[str, Any]]:
    for _, row in parallel.iter_local(run_cell, [(c, profile, simulator) for c in cells], jobs):
        yield row


def _iter_ray(cells: list[Cell], profile: str, simulator: str, jobs: int, address: str | None) -> Iterator[dict[str, Any]]:
    for _, row in parallel.iter_ray(run_cell, [(c, profile, simulator) for c in cells], jobs, address):
        yield row


def sweep(
    spec: Spec,
    profile: str,
    out: Path,
    *,
    executor: str = "local",
    jobs: int = 1,
    ray_address: str | None = None,
    simulator: str = DEFAULT_SIMULATOR,
    slo_ttft_p99_s: float | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Run every cell not yet in `<out>.parts/`, then merge, label and write `out`.

    `time_budget_s`: stop starting cells after this long (a chunk of a long sweep, e.g.
    under a shared lock); the finished ones persist in the parts, `out` is written only
    once every cell is done, and the returned context says `complete`."""
    from twin.profile import load_profile

    parts = parts_dir(out)
    cells = spec.cells()
    sha = profile_digest(load_profile(profile), simulator)
    done = done_keys(out, sha)
    todo = [c for c in cells if c.key not in done]
    cfg0 = serving_config(load_profile(profile), cells[0]).to_dict() if cells else {}
    context = {
        "profile": profile,
        # What every cell ran with besides the swept max_loras / max_cpu_loras / rank.
        "serving": {k: v for k, v in cfg0.items() if k not in ("max_loras", "max_cpu_loras", "max_lora_rank")},
        "spec": spec.to_dict(),
        "simulator": simulator,
        "profile_sha": sha,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    session = uuid.uuid4().hex[:8]
    buf: list[dict[str, Any]] = []
    n_part = 0
    n_run = 0
    last_flush = time.monotonic()
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal n_part, last_flush, buf
        if buf:
            pio.write(parts / f"part-{session}-{n_part:05d}.parquet", _frame(buf), context)
            n_part += 1
            buf = []
        last_flush = time.monotonic()

    it: Iterable[dict[str, Any]]
    if executor == "local":
        it = _iter_local(todo, profile, simulator, jobs)
    elif executor == "ray":
        if ray_address:
            parallel.check_reachable(ray_address)
        it = _iter_ray(todo, profile, simulator, jobs, ray_address)
    else:
        raise TracekitError(f"--executor {executor}: expected local or ray")

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("twin sweep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not progress, transient=False,
    ) as bar:
        task = bar.add_task("cells", total=len(cells), completed=len(cells) - len(todo))
        try:
            for row in it:
                buf.append({**row, "profile_sha": sha})
                n_run += 1
                bar.advance(task)
                if len(buf) >= FLUSH_EVERY_ROWS or time.monotonic() - last_flush > FLUSH_EVERY_S:
                    flush()
                if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                    break
        finally:
            # Interrupted or failed: keep every finished cell for the next run.
            flush()
    elapsed = time.perf_counter() - t0
    df = finished_rows(out, sha)
    if df is None:
        raise TracekitError(f"{out}: no finished cells")
    keys = {c.key for c in cells}
    df = df.filter(pl.col("cell_key").is_in(list(keys))).unique("cell_key", keep="last")
    df = label(df, slo_ttft_p99_s)
    context.update(
        cells=len(cells),
        cells_run=n_run,
        sweep_wall_s=elapsed,
        runs_per_min=(n_run / elapsed * 60.0) if n_run and elapsed > 0 else None,
        executor=executor,
        jobs=jobs,
        slo_ttft_p99_s=slo_ttft_p99_s,
        complete=len(df) == len(cells),
    )
    if not context["complete"]:
        return df, context
    pio.write(out, df.sort("workload", "max_loras", "max_cpu_loras"), context)
    if len(df) == len(cells):
        # Every cell is in OUT now: the parts are redundant (a rerun reads OUT).
        shutil.rmtree(parts, ignore_errors=True)
    return df, context


def label(df: pl.DataFrame, slo_ttft_p99_s: float | None = None) -> pl.DataFrame:
    """Mark each workload's best non-starving cell (`is_best`), and the best that also
    meets the TTFT p99 objective (`is_best_slo`, only with an objective)."""
    ok = (pl.col("status") == "ok") & (pl.col("served_frac") > 1.0 - STARVING_THRESHOLD)
    df = df.drop([c for c in ("is_best", "is_best_slo") if c in df.columns]).with_row_index("_i")

    def mark(cond: pl.Expr, name: str) -> pl.Expr:
        # Highest throughput; ties go to fewer GPU slots (less memory reserved).
        best = (
            df.filter(cond)
            .sort(["throughput_tok_s", "max_loras"], descending=[True, False])
            .unique("workload_key", keep="first")
        )
        return pl.col("_i").is_in(best["_i"].implode()).alias(name)

    cols = [mark(ok, "is_best")]
    if slo_ttft_p99_s is not None:
        cols.append(mark(ok & (pl.col("p99_ttft_ms") <= slo_ttft_p99_s * 1e3), "is_best_slo"))
    return df.with_columns(cols).drop("_i")


def labels_summary(df: pl.DataFrame, context: dict[str, Any], out: Path) -> dict[str, Any]:
    """The sweep's summary as `--json` prints it: each workload's best configuration."""
    best = df.filter(pl.col("is_best")).sort("workload")
    keep = ("cells_run", "sweep_wall_s", "runs_per_min", "executor", "jobs")
    return {
        "out": str(out), "cells": df.height, "workloads": df["workload_key"].n_unique(),
        "starving_everywhere": df["workload_key"].n_unique() - best.height,
        "best": best.select("workload", "max_loras", "max_cpu_loras", "throughput_tok_s", "served_frac").to_dicts(),
        **{k: context[k] for k in keep if k in context},
    }


def print_labels(df: pl.DataFrame, context: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"predictor dataset -> {out}  ({df.height} cells, {df['workload_key'].n_unique()} workloads)")
    for col in ("workload", "max_loras", "max_cpu_loras", "throughput tok/s", "served"):
        t.add_column(col, justify="right" if col != "workload" else "left")
    best = df.filter(pl.col("is_best")).sort("workload")
    for r in best.head(30).iter_rows(named=True):
        t.add_row(r["workload"], str(r["max_loras"]), str(r["max_cpu_loras"]), f"{r['throughput_tok_s']:,.0f}", f"{r['served_frac']:.1%}")
    if best.height > 30:
        t.add_row(f"... {best.height - 30} more", "", "", "", "")
    none = df["workload_key"].n_unique() - best.height
    console.print(t)
    if none:
        console.print(f"[yellow]{none} workload(s) starve in every configuration[/yellow]")
    rpm = context.get("runs_per_min")
    if rpm:
        console.print(f"ran {context['cells_run']} twin runs in {context['sweep_wall_s']:.1f} s: {rpm:,.1f} runs/min ({context['executor']}, jobs={context['jobs']})")


@click.command("dataset")
@click.option("--profile", required=True, help="Twin profile name or JSON path (e.g. h100-llama-3.1-8b).")
@click.option("--workloads", "workloads", required=True, help="Sweep SPEC: JSON file, inline JSON or a key=value grid (see `predictor.spec`).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Dataset Parquet file; finished cells persist in OUT.parts/.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), show_default=True, help="Parallel twin runs (local processes or Ray CPUs).")
@click.option("--ray-address", default=None, help="Ray cluster address (default: start a local Ray).")
@click.option("--slo-ttft-p99", "slo", type=float, default=None, help="Also label the best config whose p99 TTFT <= S seconds.")
@click.option("--simulator", default=DEFAULT_SIMULATOR, hidden=True, help="module:function with twin.api.simulate's signature.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object (progress on stderr).")
@user_errors
def dataset_cmd(profile: str, workloads: str, out: Path, executor: str, jobs: int, ray_address: str | None, slo: float | None,
                simulator: str, as_json: bool = False) -> None:
    """Sweep the twin over workloads x (max_loras, max_cpu_loras) and label the best configs.

    SPEC is a JSON file, inline JSON, or a one-line grid (`;` between items, `,` between
    values, `/` inside one workload's rates or ranks), e.g.

    \b
      rates=0.4/0.05/0.0125,0.8/0.4/0.05;ranks=8/16/16;max_loras=16,32;max_cpu_loras=16,32,64
      random=50;seed=1;duration=600
    \b
      {"random": {"n": 50}, "workloads": [{"rates": [0.4, 0.05], "ranks": [8, 16]}],
       "configs": {"max_loras": [16, 32], "max_cpu_loras": [16, 64]}, "duration_s": 600}

    Keys: rates, ranks, max_loras, max_cpu_loras, duration(_s), max_requests, max_load(_req_s),
    seed, lengths, arrivals, popularity, random. Interrupted sweeps resume from OUT.parts/.
    """
    from twin.profile import load_profile

    if jobs < 1:
        raise TracekitError("--jobs must be at least 1")
    if slo is not None and slo <= 0:
        raise TracekitError("--slo-ttft-p99 must be a positive number of seconds")
    load_profile(profile)  # fail early on a bad name
    spec = specmod.load(workloads)
    df, ctx = sweep(spec, profile, out, executor=executor, jobs=jobs, ray_address=ray_address,
                    simulator=simulator, slo_ttft_p99_s=slo, progress=not as_json)
    if as_json:
        click.echo(json.dumps(labels_summary(df, ctx, out), indent=2, default=str))
    else:
        print_labels(df, ctx, out)
