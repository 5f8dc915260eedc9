"""`twin run`: simulate vLLM serving a trace under one configuration."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from tracekit.cliutil import console, user_errors
from tracekit.schema import (
    KIND_RESULTS,
    KIND_STEPS,
    TracekitError,
    read_trace,
    write,
)
from twin.options import config_from_options, serving_options
from twin.routing import ROUTERS


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render(summary: dict[str, Any], title: str) -> None:
    """The summary as `vllm bench serve` users read it, plus the twin's counters."""
    if summary.get("oom"):
        console.print(
            f"[bold red]OOM[/]: the server would not start under this configuration "
            f"({summary.get('oom_reason') or 'no room for the KV cache'}); "
            f"all {summary['requests']:,} requests are unfinished"
        )
    t = Table(title=title, show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("window (s)", _fmt(summary["window_s"])),
        ("requests", _fmt(summary["requests"])),
        ("completed", _fmt(summary["completed"])),
        ("unfinished", _fmt(summary["unfinished"])),
        ("rejected (too long)", _fmt(summary.get("rejected", 0))),
        ("throughput (tok/s, in+out of completed)", _fmt(summary["throughput_tok_s"])),
        ("offered (tok/s)", _fmt(summary["offered_tok_s"])),
        ("served fraction", _fmt(summary["served_frac"], 3)),
        ("starving (served < 90% of offered)", "[red]yes[/]" if summary["starved"] else "[green]no[/]"),
        ("request throughput (req/s)", _fmt(summary["req_s"], 2)),
        ("engine steps", _fmt(summary["steps"])),
        ("preemptions", _fmt(summary["preemptions"])),
        ("adapter loads", _fmt(summary["adapter_loads"])),
        ("KV cache capacity (tokens)", _fmt(summary["kv_capacity_tokens"])),
    ]
    for name, value in rows:
        t.add_row(name, value)
    console.print(t)
    lat = Table(title="latency (ms)")
    for c in ("metric", "mean", "p50", "p90", "p99"):
        lat.add_column(c, justify="right" if c != "metric" else "left")
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency")):
        lat.add_row(label, *(_fmt(summary.get(f"{p}_{key}_ms")) for p in ("mean", "p50", "p90", "p99")))
    console.print(lat)


@click.command("run")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Shipped profile name or profile JSON path.")
@serving_options()
@click.option("--window", "window", type=float, default=None,
              help="Seconds simulated; unfinished requests then are `unfinished` [default: the trace's window_s, else until all finish].")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Results Parquet file.")
@click.option("--steps-out", type=click.Path(path_type=Path), default=None, help="Also write every engine step (steps Parquet).")
@click.option("--no-fast-forward", is_flag=True, help="Plain step-by-step loop (same results, slower; for checks).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of tables.")
@click.option("--fleet", "fleet_plan", type=click.Path(path_type=Path), default=None,
              help="A fleet plan (JSON: GPUs, each with its configuration and adapters): one twin per GPU behind --router.")
@click.option("--router", type=click.Choice(ROUTERS), default=None,
              help="fleet: how requests are sent to GPUs [default: the plan's, else placement].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="fleet: where independent GPU runs go (local processes, or Ray).")
@click.option("--jobs", type=int, default=None,
              help="fleet: parallel GPU runs [default: the CPU count; 1 under 100k requests, where starting workers costs more].")
@click.option("--ray-address", default=None, help="fleet: Ray cluster address [default: start a local one].")
@user_errors
def run_cmd(
    trace: Path,
    profile_name: str,
    window: float | None,
    out: Path,
    steps_out: Path | None,
    no_fast_forward: bool,
    as_json: bool,
    fleet_plan: Path | None,
    router: str | None,
    executor: str,
    jobs: int | None,
    ray_address: str | None,
    **serving: Any,
) -> None:
    """Simulate vLLM serving TRACE with LoRA adapters; write per-request results.
    With --fleet PLAN: one twin per GPU of the plan behind --router, one results file
    with a `replica` column (--steps-out is then a folder, one steps file per GPU)."""
    from twin.engine import simulate
    from twin.profile import load_profile

    if fleet_plan is not None:
        from twin.fleet_cmd import run_fleet

        run_fleet(trace, profile_name, fleet_plan, router, window, out, steps_out, no_fast_forward, as_json,
                  executor, jobs, ray_address, serving)
        return
    for flag, value in (("--router", router), ("--jobs", jobs), ("--ray-address", ray_address),
                        ("--executor", None if executor == "local" else executor)):
        if value is not None:
            raise TracekitError(f"{flag} applies only with --fleet PLAN")

    started = time.perf_counter()
    profile = load_profile(profile_name)
    df, meta = read_trace(trace)
    if df.height == 0:
        raise TracekitError(f"{trace}: the trace has no requests")
    if window is not None and not window > 0:
        raise TracekitError(f"--window must be positive, got {window}")
    config = config_from_options(profile, df, meta.context, serving)
    context = {k: v for k, v in meta.context.items() if k != "parts"}
    res = simulate(
        df,
        profile,
        config,
        trace_context=context,
        window_s=window,
        record_steps=steps_out is not None,
        fast_forward=not no_fast_forward,
    )
    res.context["trace_path"] = str(trace)
    write(out, res.results, KIND_RESULTS, res.context)
    if steps_out is not None and res.steps is not None:
        write(steps_out, res.steps, KIND_STEPS, res.context)
    res.summary["wall_s"] = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps(res.summary, indent=2, default=str))
        return
    render(res.summary, f"twin: {profile.name}, max_loras {config.max_loras}, max_cpu_loras {config.cpu_loras}, "
                        f"max_lora_rank {config.max_lora_rank}")
    console.print(f"wrote {out} ({res.results.num_rows:,} requests)"
                  + (f" and {steps_out} ({res.steps.num_rows:,} steps)" if steps_out and res.steps is not None else "")
                  + f" in {res.summary['wall_s']:.2f} s")
