"""`predictor dataset`: sweep the twin over workloads x configurations, resumably.

Each cell (workload, max_loras, max_cpu_loras) synthesises one GPU's trace (the
workload's rates and ranks over `max_cpu_loras` adapters), runs the twin, and keeps the
summary (throughput, offered load, served fraction, TTFT/ITL) and the trace's features.

Resumable: finished cells are flushed as Parquet parts into `<out>.parts/` every few
seconds; on restart, cells already there (or in an earlier `<out>`) are skipped, unless
they were simulated under another version of the profile. The merged `<out>` (with the
labels) is written at the end, and the parts are removed once it holds every cell.

Labels (the paper's rule): per workload, the cell with the highest throughput among those
that do not starve (served < 90% of offered = starving); with `--slo-ttft-p99 S`, also
the best cell whose p99 TTFT is within S seconds.
"""

from __future__ import annotations

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


def run_cell(cell: Cell, profile: str, simulator: str = DEFAULT_SIMULATOR) -> dict[str, Any]:
    """Simulate one cell; returns one dataset row. Runs in a worker (local or Ray)."""
    from tracekit.synth import synthesize
    from twin.api import ServingConfig
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
    config = ServingConfig(
        max_loras=cell.max_loras,
        max_cpu_loras=cell.max_cpu_loras,
        max_lora_rank=cell.max_lora_rank,
        # The paper's (and the measured runs') engine limits.
        max_num_seqs=2048,
        max_num_batched_tokens=2048,
    )
    kv = int(prof.kv_capacity_tokens(config))
    row: dict[str, Any] = {
        "cell_key": cell.key,
        "profile_sha": profile_digest(prof),
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


def profile_digest(prof: Any) -> str:
    """Identifies the profile's content: cells simulated under another version of the
    profile are not reused on resume."""
    import hashlib

    return hashlib.sha256(json.dumps(prof.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


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
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Run every cell not yet in `<out>.parts/`, then merge, label and write `out`."""
    from twin.profile import load_profile

    parts = parts_dir(out)
    cells = spec.cells()
    sha = profile_digest(load_profile(profile))
    done = done_keys(out, sha)
    todo = [c for c in cells if c.key not in done]
    context = {
        "profile": profile,
        "spec": spec.to_dict(),
        "simulator": simulator,
        "profile_sha": sha,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    session = uuid.uuid4().hex[:8]
    buf: list[dict[str, Any]] = []
    n_part = 0
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
                buf.append(row)
                bar.advance(task)
                if len(buf) >= FLUSH_EVERY_ROWS or time.monotonic() - last_flush > FLUSH_EVERY_S:
                    flush()
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
        cells_run=len(todo),
        sweep_wall_s=elapsed,
        runs_per_min=(len(todo) / elapsed * 60.0) if todo and elapsed > 0 else None,
        executor=executor,
        jobs=jobs,
        slo_ttft_p99_s=slo_ttft_p99_s,
    )
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
@user_errors
def dataset_cmd(profile: str, workloads: str, out: Path, executor: str, jobs: int, ray_address: str | None, slo: float | None, simulator: str) -> None:
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
                    simulator=simulator, slo_ttft_p99_s=slo)
    print_labels(df, ctx, out)
