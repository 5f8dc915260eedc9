"""`twin run TRACE --fleet PLAN --router R`: a fleet of twins behind a router, one results
file with a `replica` column, and a summary per GPU and for the fleet."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tracekit.cliutil import console
from tracekit.schema import KIND_RESULTS, KIND_STEPS, TracekitError, read_trace, write
from twin.options import SERVING_FLAG_NAMES, run_window


def _f(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render_fleet(summary: dict[str, Any], title: str) -> None:
    """One row per GPU and one for the fleet: load, service, starving adapters (served
    < 90% of offered), p99 TTFT and mean ITL."""
    t = Table(title=title)
    cols = ("GPU", "adapters", "max_loras", "rank", "offered tok/s", "served", "starving", "TTFT p99 s", "ITL ms")
    for c in cols:
        t.add_column(c, justify="left" if c == "GPU" else "right")

    def row(name: str, r: dict[str, Any], style: str = "") -> None:
        starving = r.get("starving_adapters", 0)
        served = r.get("served_frac")
        p99 = r.get("p99_ttft_ms")
        t.add_row(
            name, _f(r.get("adapters")), _f(r.get("max_loras")), _f(r.get("max_lora_rank")), _f(r.get("offered_tok_s")),
            "-" if served is None else (f"[red]{served:.1%}[/]" if r.get("starved") else f"{served:.1%}"),
            f"[red]{starving}[/]" if starving else "0",
            "-" if p99 is None else f"{p99 / 1e3:,.2f}",
            _f(r.get("mean_itl_ms"), 1),
            style=style,
        )

    for g in summary["gpus"]:
        row(g["name"], g)
    fleet = summary["fleet"]
    row(f"fleet ({fleet['gpus']})", fleet, style="bold")
    console.print(t)
    names = fleet.get("starving_adapter_names") or []
    judged = (f"requests that arrived before their GPU's last {fleet.get('judged_tail_s', 0):,.0f} s at most; "
              f"{fleet.get('starving_adapters_at_cut', 0)} starve counting every request at the cut")
    if names:
        more = fleet["starving_adapters"] - len(names[:10])
        console.print(f"[red]starving adapters[/] (served < 90% of offered, {judged}): {', '.join(names[:10])}"
                      + (f" and {more} more" if more > 0 else ""))
    else:
        console.print(f"[green]no adapter starves[/] (each is served >= 90% of what it is offered; {judged})")


def run_fleet(
    trace: Path, profile_name: str, plan_path: Path, router: str | None, window: float | None, out: Path,
    steps_out: Path | None, no_fast_forward: bool, as_json: bool, executor: str, jobs: int | None,
    ray_address: str | None, serving: dict[str, Any], drain: bool = False,
) -> None:
    from twin.fleet import adapter_codes, simulate_fleet
    from twin.fleet_plan import FleetPlan, resolve
    from twin.profile import load_profile
    from twin.routing import ROUTERS

    given = [k for k in SERVING_FLAG_NAMES if serving.get(k) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise TracekitError(f"{flag} does not apply with --fleet: set it per GPU in the plan")
    started = time.perf_counter()
    plan = FleetPlan.load(plan_path)
    router = router or plan.router or "placement"
    if router not in ROUTERS:
        raise TracekitError(f"--router {router}: expected one of {', '.join(ROUTERS)}")
    profile = load_profile(profile_name)
    if plan.profile and Path(plan.profile).stem != Path(profile.name).stem and plan.profile != profile_name:
        click.echo(f"warning: {plan_path}: made for profile {plan.profile}, run with {profile.name}", err=True)
    df, meta = read_trace(trace)
    context = run_window(trace, df.height, window, drain, meta.context)
    from tracekit.schema import adapter_ranks

    _, names = adapter_codes(df)
    fleet = resolve(plan, profile, names, adapter_ranks(context), router)
    for w in fleet.warnings:
        click.echo(f"warning: {w}", err=True)
    from tracekit import parallel
    from twin.fleet import WORKER_MODULES, default_jobs

    jobs = default_jobs(df.height) if jobs is None else jobs
    if jobs < 1:
        raise TracekitError("--jobs must be at least 1")
    pool = parallel.Pool(executor, jobs, ray_address)
    pool.start(WORKER_MODULES)  # workers (or Ray) start while this process routes and splits the trace
    try:
        res = simulate_fleet(df, profile, plan, router, trace_context=context, window_s=window, executor=executor,
                             jobs=jobs, pool=pool, record_steps=steps_out is not None,
                             fast_forward=not no_fast_forward, progress=not as_json, resolved=fleet)
    finally:
        pool.close(wait=False)  # Ray's shutdown (a second or two) overlaps the write
    res.context["trace_path"] = str(trace)
    try:
        write(out, res.results, KIND_RESULTS, res.context)
    finally:
        pool.join()
    written = [str(out)]
    if steps_out is not None and res.steps:
        steps_out.mkdir(parents=True, exist_ok=True)
        for name, steps in res.steps.items():
            ctx = dict(res.context, replica=name)
            written.append(str(write(steps_out / f"{name}.parquet", steps, KIND_STEPS, ctx)))
    res.summary["wall_s"] = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps(res.summary, default=str))
        return
    how = "static: independent GPU runs" if res.summary["static"] else "coupled: engines advanced together"
    render_fleet(res.summary, f"twin fleet: {profile.name}, router {router} ({how}, {res.summary['executor']}, "
                              f"jobs {res.summary['jobs']})")
    console.print(f"wrote {', '.join(written[:3])}{' ...' if len(written) > 3 else ''} "
                  f"({res.results.num_rows:,} requests) in {res.summary['wall_s']:.2f} s")
