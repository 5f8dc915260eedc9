"""A fleet in the twin: N engines, each today's twin with its own configuration, behind a
router (`twin.routing`), from a plan (`twin.fleet_plan`).

Static routing (round-robin; placement with every adapter on one GPU) makes the GPUs
independent: the whole trace is routed up front and each GPU's requests are one
`twin.api.simulate` run, in this process, in local worker processes, or on Ray. Each
run sees exactly its own requests, so the merged results are the same bit for bit
however the runs are split. A router that reads the engines' state (least-loaded,
adapter-affinity, placement over several GPUs) couples the GPUs it chooses among: those
run as one co-simulation (`twin.cosim`), each such group and each GPU alone being one
independent task, so a placement with a few busy adapters on two GPUs each still runs
mostly in parallel.

The results are one table in the trace's order with a `replica` column (the GPU's
name); the summary has each GPU's and the fleet's throughput, served fraction, starving
adapters (served < 90% of offered, `tracekit.metrics.adapter_service`, judged on the requests
that arrived before the window's last 5%, or before the time the longest answer takes at
the mean ITL of the GPU serving them if longer) and TTFT / ITL percentiles.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from tracekit import parallel
from tracekit.metrics import BASE_ADAPTER, adapter_service, summarize
from tracekit.schema import TracekitError, adapter_ranks, conform
from twin.config import ServingConfig
from twin.fleet_plan import FleetPlan, GpuPlan, ResolvedFleet, resolve
from twin.profile import Profile, load_profile
from twin.routing import Router

# Counters of a GPU's twin run kept in the fleet summary.
GPU_COUNTERS = ("steps", "preemptions", "adapter_loads", "kv_capacity_tokens", "rejected", "fast_forward_steps",
                "engine_loop_s", "simulated_s")
# Requests arriving in the window's last part are not judged for an adapter's starvation:
# they may still be running at the cut with nothing wrong (`adapter_service`'s tail_s).
# That part is 5% of the window, and at least the time the trace's longest answer takes
# at the GPU's mean ITL. Measured on a Zipf fleet hour: every request of the adapters
# that starved only at the cut had arrived in the last 4 minutes, on GPUs whose p99 TTFT
# was under a second; in a 10-minute window, one 1,700-token answer 35 s before the cut
# made an adapter of three requests starve on a GPU at 94 ms p99 TTFT.
JUDGED_TAIL_FRACTION = 0.05
# A part's run summary keeps its GPU's judged metrics under this key (`fleet_summary`).
JUDGED_MEMO = "_judged_metrics"
SUMMARY_KEYS = ("requests", "completed", "unfinished", "throughput_tok_s", "offered_tok_s", "served_frac", "starved",
                "req_s", "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "mean_itl_ms", "p50_itl_ms", "p90_itl_ms", "p99_itl_ms", "mean_e2e_ms", "p50_e2e_ms", "p99_e2e_ms", "window_s")


@dataclass
class FleetResult:
    results: pa.Table | None  # results schema + `replica`, in the trace's (arrival) order (None: summary only)
    summary: dict[str, Any]  # {"fleet": {...}, "gpus": [{...}, ...], router, static, ...}
    context: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, pa.Table] | None = None  # GPU name -> its steps, when asked for


# What a worker imports while this process prepares the tasks.
WORKER_MODULES = ("twin.fleet", "twin.engine", "twin.cosim")
# Below this many requests a fleet runs in this process by default: starting a worker
# (spawn, imports) costs 1-2 s here, more than such runs save (a 4-GPU, 23k-request fleet:
# 6.3 s on 2 workers, 2.2 s in one process).
IN_PROCESS_BELOW = 100_000


def default_jobs(requests: int | None = None) -> int:
    if requests is not None and requests < IN_PROCESS_BELOW:
        return 1
    return max(1, os.cpu_count() or 1)


def adapter_codes(trace: pl.DataFrame) -> tuple[np.ndarray, list[str | None]]:
    """Per request an index into `names` (sorted adapter names, then None for the base
    model when the trace has base requests)."""
    col = trace.get_column("adapter")
    names: list[str | None] = list(col.drop_nulls().unique().sort().to_list())
    base = col.null_count() > 0
    codes = col.cast(pl.Enum([n for n in names if n is not None])).to_physical().cast(pl.Int64)
    codes_np = codes.fill_null(len(names)).to_numpy()
    if base:
        names.append(None)
    return codes_np, names


def run_gpu(
    name: str, trace: pl.DataFrame, profile: Profile, config: ServingConfig, context: dict[str, Any],
    window_s: float | None, record_steps: bool, fast_forward: bool, longest_output_tokens: int | None = None,
) -> tuple[pa.Table, dict[str, Any], pa.Table | None]:
    """One GPU's twin run (in a worker or in this process). `longest_output_tokens` (the
    fleet trace's): its metrics as the fleet's summary judges it are made here too
    (`judge_part`), so a fleet's GPUs are summarised in the workers that ran them."""
    from twin.engine import simulate

    t0 = time.perf_counter()
    res = simulate(trace, profile, config, trace_context=context, window_s=window_s, record_steps=record_steps,
                   fast_forward=fast_forward)
    import resource

    summary = dict(res.summary)
    summary["wall_s"] = time.perf_counter() - t0
    summary["pid"] = os.getpid()
    # Peak memory of the process that ran this GPU (a worker, or this process).
    summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    part = (res.results, summary, res.steps)
    if longest_output_tokens is not None:
        judge_part(part, context, longest_output_tokens)
    return part


def judge_part(part: tuple[pa.Table, dict[str, Any], Any], context: dict[str, Any] | None,
               longest_output_tokens: int) -> None:
    """Keep with a GPU's run the metrics a fleet summary judges that GPU by (`JUDGED_MEMO`,
    `_judged`), over the window its run measured: `fleet_summary` reuses them where the
    fleet's window is the same (a trace context's `window_s`), else makes them again."""
    results, summary = part[0], part[1]
    if results.num_rows:
        s = {k: summary.get(k) for k in SUMMARY_KEYS}
        summary[JUDGED_MEMO] = _judged(_metrics_frame(results), s, context or {}, float(s["window_s"]),
                                       longest_output_tokens)


def _judged(rows: pl.DataFrame, s: dict[str, Any], ctx: dict[str, Any], window: float,
            longest_output_tokens: int) -> tuple[Any, dict[str, Any], float, pl.DataFrame]:
    """One GPU's judged metrics from its rows and their summary `s`: (their key: window,
    longest answer and rows; `s`; its judged tail; its adapters' service over that tail)."""
    tail = judged_tail_s(window, longest_output_tokens, s.get("mean_itl_ms"))
    return (window, longest_output_tokens, rows.height), s, tail, adapter_service(rows, ctx, tail_s=tail)


def gpu_key(adapters: Any, config: ServingConfig, window_s: float | None, record_steps: bool,
            fast_forward: bool) -> tuple[Any, ...]:
    """What one GPU's run under static placement depends on, as a cache key: its adapters
    (so its requests), its configuration and the run's options."""
    return (tuple(sorted(adapters, key=str)), config, window_s, record_steps, fast_forward)


class SharedTrace:
    """A trace written once to an Arrow IPC file that worker processes on this machine
    memory-map (once per process), so that a task names its rows instead of carrying them:
    a planner runs dozens of single GPUs of one trace, and each GPU's requests (5 MB at
    2,000 adapters and 200 req/s) cost 20 ms to ship here. `close()` removes the file."""

    def __init__(self, trace: pl.DataFrame):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="tracekit-shared-")
        self.path = os.path.join(self.dir, "trace.arrow")
        trace.write_ipc(self.path, compression="uncompressed")

    def rows(self, rows: np.ndarray) -> SharedRows:
        return SharedRows(self.path, np.ascontiguousarray(rows, dtype=np.int64))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class SharedRows:
    """Rows of a `SharedTrace`: `frame()` is `trace[rows]`."""

    path: str
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self) -> pl.DataFrame:
        if _SHARED.get("path") != self.path:
            _SHARED.update(path=self.path, frame=pl.read_ipc(self.path))
        return _SHARED["frame"][self.rows]


_SHARED: dict[str, Any] = {}  # this process's memory-mapped `SharedTrace` (the latest one)


def run_alone(
    gpu: GpuPlan, trace: pl.DataFrame | SharedRows, profile: Profile, config: ServingConfig, kv_capacity_tokens: int,
    context: dict[str, Any], window_s: float | None, fast_forward: bool, longest_output_tokens: int,
    keep_starving: bool = True,
) -> tuple[tuple[pa.Table, dict[str, Any], pa.Table | None] | None, dict[str, Any]]:
    """One GPU of a placement plan (with its requests, in arrival order) run and judged
    alone, in a worker or in this process: its run as `run_gpu` gives it (what a fleet run
    with the same GPU reuses) and its summary as a one-GPU fleet's (`fleet_summary`),
    judged as in the fleet: over its own tail, for the fleet trace's
    `longest_output_tokens` at this GPU's mean ITL. `keep_starving=False`: no run back
    where an adapter starves (a planner reuses only runs of GPUs that pass; a run is
    12 MB at 100k requests, 25 ms to ship here)."""
    if isinstance(trace, SharedRows):
        trace = trace.frame()
    part = run_gpu(gpu.name, trace, profile, config, context, window_s, False, fast_forward)
    plan = FleetPlan(gpus=(gpu,), profile=profile.name, router="placement")
    fleet = ResolvedFleet(plan=plan, configs=[config], kv_capacity_tokens=[kv_capacity_tokens], warnings=[])
    res = _assemble(trace, np.zeros(trace.height, dtype=np.int64), [part], plan, fleet, "placement", True, context,
                    window_s, profile.name, {}, longest_output_tokens, results=False)
    fails = res.summary["fleet"]["starving_adapters"] > 0 or bool(res.summary["gpus"][0].get("starved"))
    return (None if fails and not keep_starving else part), res.summary


def simulate_fleet(
    trace: pl.DataFrame,
    profile: Any,
    plan: FleetPlan,
    router: str | None = None,
    *,
    trace_context: dict[str, Any] | None = None,
    window_s: float | None = None,
    executor: str = "local",
    jobs: int | None = None,
    ray_address: str | None = None,
    record_steps: bool = False,
    fast_forward: bool = True,
    progress: bool = False,
    resolved: ResolvedFleet | None = None,
    pool: parallel.Pool | None = None,
    cache: dict[Any, Any] | None = None,
    results: bool = True,
) -> FleetResult:
    """Simulate the fleet `plan` serving `trace` behind `router` (default: the plan's,
    else placement). `executor`/`jobs`/`ray_address`: where static per-GPU runs go (or
    `pool`, workers kept across calls). `cache`: a dict kept across calls with the same
    trace, so that a GPU whose adapters and configuration did not change is not run again
    (placement only: there a GPU's requests are its adapters'). `results=False`: the
    summary only (`_assemble`)."""
    prof = load_profile(profile)
    ctx_in = {k: v for k, v in (trace_context or {}).items() if k != "parts"}
    router_name = router or plan.router or "placement"
    if window_s is None and ctx_in.get("window_s"):
        window_s = float(ctx_in["window_s"])
    if window_s is not None and not window_s > 0:
        raise TracekitError(f"--window must be positive, got {window_s}")
    trace = trace.sort("arrival_s", maintain_order=True)
    codes, names = adapter_codes(trace)
    if resolved is None:
        resolved = resolve(plan, prof, names, adapter_ranks(ctx_in), router_name)
    rt = Router(router_name, len(plan.gpus), plan.placement())
    jobs = default_jobs(trace.height) if jobs is None else jobs
    if jobs < 1:
        raise TracekitError("--jobs must be at least 1")
    t0 = time.perf_counter()
    comps = rt.components(names)
    static = all(len(c) == 1 for c in comps)
    own = parallel.Pool(executor, jobs, ray_address) if pool is None else None
    try:
        use = pool if pool is not None else own
        assert use is not None
        # Each GPU's metrics are made where it ran (its judged tail allows for the fleet's longest answer).
        longest = int(trace.get_column("output_tokens").max() or 0)  # type: ignore[arg-type]
        if static:
            replica = rt.route_static(codes, names)
            parts = _run_static(trace, replica, prof, resolved, ctx_in, window_s, use, record_steps, fast_forward,
                                progress, cache if router_name == "placement" else None, longest)
        else:
            replica, parts = _run_coupled(trace, codes, names, rt, comps, prof, resolved, ctx_in, window_s, use,
                                          record_steps, fast_forward, cache if router_name == "placement" else None,
                                          longest)
    finally:
        if own is not None:
            own.close()
    wall = time.perf_counter() - t0
    info = {"executor": executor, "jobs": jobs, "fleet_wall_s": wall,
            "coupled_groups": [[plan.gpus[g].name for g in c] for c in comps if len(c) > 1]}
    return _assemble(trace, replica, parts, plan, resolved, router_name, static, ctx_in, window_s, prof.name, info,
                     results=results)


def run_task(kind: str, args: tuple[Any, ...]) -> Any:
    """One independent task of a fleet run: a GPU alone, or a coupled group."""
    return run_gpu(*args) if kind == "gpu" else run_group(*args)


def run_group(
    names: list[str], trace: pl.DataFrame, profile: Profile, plan: FleetPlan, router: str,
    configs: list[ServingConfig], kvs: list[int], context: dict[str, Any], window_s: float | None, record_steps: bool,
    fast_forward: bool = True, longest_output_tokens: int | None = None,
) -> tuple[np.ndarray, list[Any]]:
    """A coupled group of GPUs (in a worker or in this process): co-simulated, each GPU's
    metrics made here with `longest_output_tokens` (`judge_part`)."""
    from twin.cosim import cosimulate

    codes, anames = adapter_codes(trace)
    fleet = ResolvedFleet(plan=plan, configs=configs, kv_capacity_tokens=kvs, warnings=[])
    rt = Router(router, len(plan.gpus), plan.placement())
    replica, parts = cosimulate(trace, codes, anames, rt, profile, fleet, context, window_s, record_steps, fast_forward)
    if longest_output_tokens is not None:
        for part in parts:
            if part is not None:
                judge_part(part, context, longest_output_tokens)
    return replica, parts


def _run_coupled(
    trace: pl.DataFrame, codes: np.ndarray, names: list[str | None], rt: Router, comps: list[list[int]], prof: Profile,
    fleet: ResolvedFleet, ctx: dict[str, Any], window_s: float | None, pool: parallel.Pool, record_steps: bool,
    fast_forward: bool, cache: dict[Any, Any] | None, longest: int | None = None,
) -> tuple[np.ndarray, list[Any]]:
    """GPUs in groups that share requests: each group one co-simulation, each GPU alone
    one plain run; all of them independent tasks. The router's decisions depend only on
    the GPUs they choose among, so the groups route as the whole fleet would."""
    plan = fleet.plan
    portable = Profile(prof.name, prof.data)
    comp_of_code = np.empty(len(names), dtype=np.int64)
    comp_of_gpu = {g: k for k, c in enumerate(comps) for g in c}
    for k, a in enumerate(names):
        comp_of_code[k] = comp_of_gpu[rt.candidates(a)[0]]
    comp_of_req = comp_of_code[codes]
    replica = np.full(trace.height, -1, dtype=np.int64)
    parts: list[Any] = [None] * len(plan.gpus)
    tasks: list[tuple[Any, ...]] = []
    kinds: list[tuple[str, list[int], np.ndarray]] = []
    for k, comp in enumerate(comps):
        rows = np.flatnonzero(comp_of_req == k)
        if rows.size == 0:
            continue
        if len(comp) == 1:
            g = comp[0]
            replica[rows] = g
            key = None
            if cache is not None:
                key = gpu_key(plan.gpus[g].adapters, fleet.configs[g], window_s, record_steps, fast_forward)
                if key in cache:
                    parts[g] = cache[key]
                    continue
            tasks.append((plan.gpus[g].name, trace[rows], portable, fleet.configs[g], ctx, window_s, record_steps,
                          fast_forward, longest))
            kinds.append(("gpu", comp, rows))
        else:
            sub_plan = FleetPlan(gpus=tuple(plan.gpus[g] for g in comp), profile=plan.profile, router=plan.router)
            tasks.append(([plan.gpus[g].name for g in comp], trace[rows], portable, sub_plan, rt.name,
                          [fleet.configs[g] for g in comp], [fleet.kv_capacity_tokens[g] for g in comp], ctx, window_s,
                          record_steps, fast_forward, longest))
            kinds.append(("group", comp, rows))
    # Largest first, so that the longest task does not start last.
    order = sorted(range(len(tasks)), key=lambda i: -len(kinds[i][2]))
    for j, out in pool.run(run_task, [(kinds[i][0], tasks[i]) for i in order], help=True, warm=WORKER_MODULES):
        kind, comp, rows = kinds[order[j]]
        if kind == "gpu":
            parts[comp[0]] = out
            if cache is not None:
                g = comp[0]
                cache[gpu_key(plan.gpus[g].adapters, fleet.configs[g], window_s, record_steps, fast_forward)] = out
        else:
            local, group_parts = out
            replica[rows] = np.asarray(comp, dtype=np.int64)[local]
            for i, g in enumerate(comp):
                parts[g] = group_parts[i]
    return replica, parts


def _run_static(
    trace: pl.DataFrame, replica: np.ndarray, prof: Profile, fleet: ResolvedFleet, ctx: dict[str, Any],
    window_s: float | None, pool: parallel.Pool, record_steps: bool, fast_forward: bool, progress: bool,
    cache: dict[Any, Any] | None, longest: int | None = None,
) -> list[tuple[pa.Table, dict[str, Any], pa.Table | None] | None]:
    plan = fleet.plan
    portable = Profile(prof.name, prof.data)  # plain data: pickles to workers
    tasks: list[tuple[Any, ...]] = []
    which: list[int] = []
    out: list[tuple[pa.Table, dict[str, Any], pa.Table | None] | None] = [None] * len(plan.gpus)
    keys: list[Any] = [None] * len(plan.gpus)
    for g, gpu in enumerate(plan.gpus):
        if cache is not None:
            keys[g] = gpu_key(gpu.adapters, fleet.configs[g], window_s, record_steps, fast_forward)
            if keys[g] in cache:
                out[g] = cache[keys[g]]
                continue
        sub = trace.filter(pl.Series(replica == g))
        if sub.height == 0:
            continue
        tasks.append((gpu.name, sub, portable, fleet.configs[g], ctx, window_s, record_steps, fast_forward, longest))
        which.append(g)
    # Largest first: with fewer workers than GPUs, the longest run does not start last.
    order = sorted(range(len(tasks)), key=lambda k: -tasks[k][1].height)
    tasks = [tasks[k] for k in order]
    which = [which[k] for k in order]
    it = pool.run(run_gpu, tasks, help=True, warm=WORKER_MODULES)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tracekit.cliutil import err_console

    with Progress(TextColumn("twin fleet"), BarColumn(), MofNCompleteColumn(), TextColumn("GPUs"), TimeElapsedColumn(),
                  console=err_console, disable=not progress, transient=True) as bar:
        task = bar.add_task("gpus", total=len(tasks))
        for k, part in it:
            out[which[k]] = part
            if cache is not None:
                cache[keys[which[k]]] = part
            bar.advance(task)
    return out


def _assemble(
    trace: pl.DataFrame, replica: np.ndarray, parts: list[tuple[pa.Table, dict[str, Any], pa.Table | None] | None],
    plan: FleetPlan, fleet: ResolvedFleet, router: str, static: bool, ctx_in: dict[str, Any], window_s: float | None,
    profile_name: str, run_info: dict[str, Any], longest_output_tokens: int | None = None, results: bool = True,
) -> FleetResult:
    """The fleet's results (in trace order) and summary from its GPUs' parts.
    `results=False`: the summary only (a planner's check), from the parts' metric columns
    as they come, GPU after GPU: no reordering or check of every column (0.5 s at a
    million requests). Counts, rates and percentiles are those of the ordered table; a
    fleet-wide mean may differ from it in the last digits (its sum's order)."""
    names = plan.names
    tables, positions = [], []
    for g, part in enumerate(parts):
        if part is None:
            continue
        table = part[0] if results else part[0].select(_metric_columns(part[0]))
        table = table.append_column("replica", pa.array([names[g]] * table.num_rows, type=pa.string()))
        tables.append(table)
        if results:
            positions.append(np.flatnonzero(replica == g))
    if not tables:
        raise TracekitError("the fleet served no request")
    merged = pa.concat_tables(tables)
    if results:
        pos = np.concatenate(positions)
        if pos.size and bool((pos[1:] > pos[:-1]).all()):
            pass  # in trace order already (one GPU judged alone): no copy of every column
        elif pos.size == trace.height:  # every request routed: invert the permutation, O(n)
            order = np.empty_like(pos)
            order[pos] = np.arange(pos.size, dtype=pos.dtype)
            merged = merged.take(pa.array(order))
        else:
            merged = merged.take(pa.array(np.argsort(pos, kind="stable")))
        merged = conform(merged, "results", source="twin fleet")
    ctx = dict(ctx_in)
    ctx.update(
        target="twin",
        profile=profile_name,
        window_s=None if window_s is None else float(window_s),
        fleet={
            "router": router,
            "static": static,
            "plan": plan.to_dict(),
            "gpus": [{"name": g.name, "serving_config": c.to_dict(), "kv_capacity_tokens": kv}
                     for g, c, kv in zip(plan.gpus, fleet.configs, fleet.kv_capacity_tokens, strict=True)],
        },
    )
    ctx.pop("serving_config", None)
    summary = fleet_summary(merged, ctx, plan, fleet, parts, longest_output_tokens)
    summary.update(router=router, static=static, **run_info)
    steps = None
    if any(p is not None and p[2] is not None for p in parts):
        steps = {names[g]: p[2] for g, p in enumerate(parts) if p is not None and p[2] is not None}
    return FleetResult(results=merged if results else None, summary=summary, context=ctx, steps=steps)


_NOT_METRICS = frozenset({"request_id", "target", "error", "prompt_token_ids", "prefix_hashes", "tenant", "session_id"})


def _metric_columns(results: pa.Table) -> list[str]:
    """The columns a summary reads."""
    return [c for c in results.column_names if c not in _NOT_METRICS]


def _metrics_frame(results: pa.Table) -> pl.DataFrame:
    return pl.from_arrow(results.select(_metric_columns(results)))  # type: ignore[return-value]


def fleet_summary(
    results: pa.Table, ctx: dict[str, Any], plan: FleetPlan, fleet: ResolvedFleet | None,
    parts: list[Any] | None = None, longest_output_tokens: int | None = None,
) -> dict[str, Any]:
    """The fleet's and each GPU's metrics from a results table with a `replica` column
    (twin or real: the same code). Starving adapters are judged fleet-wide (an adapter
    on two GPUs starves when both together serve under 90% of what it is offered) and
    per GPU (its requests on that GPU). Each GPU's judged tail is its own (`judged_tail_s`
    at its mean ITL), an adapter on several GPUs is judged over the longest of theirs:
    so under static placement a GPU's verdict does not depend on the other GPUs, and a
    GPU run alone is judged as in the fleet. `longest_output_tokens`: the longest answer
    the tail allows for (default: these results' longest). A GPU's metrics are kept in its
    part's summary (`JUDGED_MEMO`) and reused when the part comes back with as many rows,
    the same window and longest answer: a part is reused (`simulate_fleet(cache=...)`)
    only where a GPU's requests are its own adapters', so those are the same rows."""
    df = _metrics_frame(results)
    # One GPU's run is the whole fleet (a GPU judged alone): its run's own summary is
    # `summarize` of the same rows, window and warm-up (the engine's `_finish`), not made again.
    mine = [p for p in parts or () if p is not None]
    one = len(plan.gpus) == 1 and len(mine) == 1 and mine[0][0].num_rows == df.height
    whole = {k: mine[0][1].get(k) for k in SUMMARY_KEYS} if one else summarize(df, ctx)
    window = whole["window_s"]
    if longest_output_tokens is None:
        longest_output_tokens = int(df["output_tokens"].max() or 0)

    def judged_tail(mean_itl_ms: float | None) -> float:
        return judged_tail_s(window, longest_output_tokens, mean_itl_ms)

    gpus = []
    by_replica: dict[Any, pl.DataFrame] | None = None

    def rows_of(g: int) -> pl.DataFrame | None:
        """GPU g's rows: its part's (the fleet's rows of that GPU, in the same order), else
        the results' partition by replica (real results have no parts)."""
        nonlocal by_replica
        if one:
            return df
        if parts is not None:
            return None if parts[g] is None else _metrics_frame(parts[g][0])
        if by_replica is None:
            by_replica = df.partition_by("replica", as_dict=True, maintain_order=True) if "replica" in df.columns else {}
        return by_replica.get((plan.gpus[g].name,))

    services: dict[str, pl.DataFrame] = {}
    tails: dict[str, float] = {}
    starving_gpus = 0
    for g, gpu in enumerate(plan.gpus):
        row: dict[str, Any] = {"name": gpu.name, "adapters_listed": sum(1 for a in gpu.adapters if a is not None)}
        part = parts[g] if parts is not None else None
        memo = part[1] if part is not None else {}
        sub = None if part is not None else rows_of(g)  # a part: its rows are made only if needed
        height = part[0].num_rows if part is not None else (0 if sub is None else sub.height)
        if height == 0:
            row.update(requests=0, adapters=0, starving_adapters=0, starved=False)
        else:
            # A GPU run once and judged alone (a planner's screening) and then in a fleet
            # (its run reused): its metrics are those of the same rows, judged over the same
            # window and longest answer, so they are kept with its run and not made again.
            known = memo.get(JUDGED_MEMO)
            if known is None or known[0] != (window, longest_output_tokens, height):
                sub = rows_of(g) if sub is None else sub
                assert sub is not None
                s = whole if sub.height == df.height else summarize(sub, ctx)  # one GPU served all: the same rows
                known = _judged(sub, {k: s.get(k) for k in SUMMARY_KEYS}, ctx, window, longest_output_tokens)
                if memo:
                    memo[JUDGED_MEMO] = known
            s, tails[gpu.name], svc = known[1], known[2], known[3]
            services[gpu.name] = svc
            row.update(s)
            row.update(adapters=int(svc.height), starving_adapters=int(svc["starved"].sum()),
                       min_adapter_served_frac=float(svc["served_frac"].min()), judged_tail_s=tails[gpu.name])
        if fleet is not None:
            c = fleet.configs[g]
            row.update(max_loras=c.max_loras, max_cpu_loras=c.cpu_loras, max_lora_rank=c.max_lora_rank,
                       kv_capacity_tokens=fleet.kv_capacity_tokens[g])
        if parts is not None and parts[g] is not None:
            row.update({k: parts[g][1].get(k) for k in GPU_COUNTERS if k in parts[g][1]})
            row["twin_wall_s"] = parts[g][1].get("wall_s")
            row["pid"] = parts[g][1].get("pid")
            row["peak_rss_mib"] = parts[g][1].get("peak_rss_mib")
        starving_gpus += bool(row.get("starved")) or row.get("starving_adapters", 0) > 0
        gpus.append(row)
    service = _fleet_service(df, ctx, services, tails, judged_tail(whole.get("mean_itl_ms")))
    starving = service.filter(pl.col("starved"))
    at_cut = adapter_service(df, ctx)
    fleet_row = {k: whole.get(k) for k in SUMMARY_KEYS}
    fleet_row.update(gpus=len(plan.gpus), adapters=int(at_cut.height),
                     starving_adapters=int(starving.height),
                     starving_adapter_names=starving.sort("served_frac")["adapter"].to_list()[:50],
                     worst_adapter_names=service.sort(["served_frac", "adapter"])["adapter"].to_list()[:10],
                     starving_adapters_at_cut=int(at_cut["starved"].sum()),
                     judged_tail_s=max(tails.values(), default=judged_tail(whole.get("mean_itl_ms"))),
                     min_adapter_served_frac=float(service["served_frac"].min()) if service.height else 1.0)
    fleet_row["starving_gpus"] = int(starving_gpus)
    return {"fleet": fleet_row, "gpus": gpus}


def judged_tail_s(window_s: float, longest_output_tokens: int, mean_itl_ms: float | None) -> float:
    """The window's last part whose arrivals are not judged for starvation: 5% of it, or
    the time the longest answer takes at `mean_itl_ms` if longer; at most half of it."""
    longest = float(longest_output_tokens) * (mean_itl_ms or 0.0) / 1e3
    return min(max(JUDGED_TAIL_FRACTION * window_s, longest), 0.5 * window_s)


def _fleet_service(df: pl.DataFrame, ctx: dict[str, Any], services: dict[str, pl.DataFrame], tails: dict[str, float],
                   default_tail: float) -> pl.DataFrame:
    """Each adapter's service over the whole fleet, judged over the longest tail of the
    GPUs that served it (one GPU each: those GPUs' own services)."""
    if not services or "replica" not in df.columns:
        return adapter_service(df, ctx, tail_s=default_tail)
    names = pl.col("adapter").fill_null(BASE_ADAPTER)
    spread = df.select(names.alias("adapter"), "replica").unique().group_by("adapter").agg(
        pl.col("replica").replace_strict(tails, default=default_tail, return_dtype=pl.Float64).max().alias("tail"),
        pl.len().alias("gpus"))
    if int(spread["gpus"].max() or 0) <= 1:
        return pl.concat(list(services.values())).sort("adapter")
    parts = []
    for (tail,), group in spread.partition_by("tail", as_dict=True).items():
        rows = df.filter(names.is_in(group["adapter"].implode()))
        parts.append(adapter_service(rows, ctx, tail_s=float(tail)))
    return pl.concat(parts).sort("adapter")
