"""`twin run`: simulate vLLM serving a trace under one configuration."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from tracekit.cliutil import user_errors
from tracekit.metrics import per_adapter
from tracekit.schema import (
    KIND_RESULTS,
    KIND_STEPS,
    TracekitError,
    read,
    read_trace_arrow,
    write,
)
from tracekit.summary import (
    facts_table,
    fmt,
    per_adapter_table,
    render_config,
    render_head,
    render_latency,
    starving_reason,
)
from twin.config import TWIN_COUNTERS
from twin.options import config_from_options, describe_config, run_window, serving_options
from twin.routing import ROUTERS


def render(summary: dict[str, Any], title: str, context: dict[str, Any] | None = None,
           per_adapter: list[dict[str, Any]] | None = None, show_all: bool = False) -> None:
    """The summary as `vllm bench serve` users read it: the configuration it ran, counts
    and verdict (with the limit a starving run hit), latency with its coverage, the twin's
    counters and the busiest adapters."""
    from tracekit.cliutil import console

    ctx = context or {}
    cfg = ctx.get("configuration")
    render_config(cfg, console)
    render_head(summary, title, console, twin=summary, config=cfg)
    render_latency(summary, console)
    t = facts_table("the twin's engine")
    for name, key in (("engine steps", "steps"), ("preemptions", "preemptions"), ("adapter loads", "adapter_loads"),
                      ("KV cache capacity (tokens)", "kv_capacity_tokens"),
                      ("prefill tokens computed", "prefill_tokens_computed")):
        t.add_row(name, fmt(summary.get(key)))
    if summary.get("cached_prompt_tokens") is not None:
        t.add_row("prompt tokens from the prefix cache", fmt(summary["cached_prompt_tokens"]))
    console.print(t)
    if per_adapter:
        console.print(per_adapter_table(per_adapter, show_all=show_all, width=console.width))


@click.command("run")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Shipped profile name or profile JSON path.")
@serving_options()
@click.option("--window", "window", type=float, default=None,
              help="Cut the run at S seconds; requests still running then are `unfinished` "
                   "[default: the trace's window, else run until every request finishes].")
@click.option("--drain", is_flag=True, help="Never cut: simulate until every request finishes.")
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
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Also write throughput.png, running.png and latency.png into DIR.")
@click.option("--all", "show_all", is_flag=True, help="Every adapter in the per-adapter table (default: the top 20).")
@user_errors
def run_cmd(
    trace: Path,
    profile_name: str,
    window: float | None,
    drain: bool,
    out: Path,
    steps_out: Path | None,
    no_fast_forward: bool,
    as_json: bool,
    fleet_plan: Path | None,
    router: str | None,
    executor: str,
    jobs: int | None,
    ray_address: str | None,
    plots_dir: Path | None,
    show_all: bool,
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
                  executor, jobs, ray_address, serving, drain=drain)
        return
    for flag, value in (("--router", router), ("--jobs", jobs), ("--ray-address", ray_address),
                        ("--executor", None if executor == "local" else executor)):
        if value is not None:
            raise TracekitError(f"{flag} applies only with --fleet PLAN")

    started = time.perf_counter()
    profile = load_profile(profile_name)
    df, meta = read_trace_arrow(trace, dictionary=["adapter"])
    context = run_window(trace, df.num_rows, window, drain, meta.context)
    config = config_from_options(profile, df, meta.context, serving)
    res = simulate(
        df,
        profile,
        config,
        trace_context=context,
        window_s=window,
        record_steps=steps_out is not None,
        fast_forward=not no_fast_forward,
        trace_checked=True,  # read_trace_arrow checked it
        dictionary_strings=True,  # written as plain strings (tracekit.schema.write)
    )
    res.context["trace_path"] = str(trace)
    # What ran, defaults included, and the twin's counters: a later `replay report` of
    # these results says the same as this summary.
    res.context["configuration"] = describe_config(profile, config, serving, res.summary.get("kv_capacity_tokens"))
    res.context["twin"] = {k: v for k, v in res.summary.items() if k in TWIN_COUNTERS}
    # `simulate`'s results went through `conform` already (SimResult's contract).
    write(out, res.results, KIND_RESULTS, res.context, conformed=True)
    if steps_out is not None and res.steps is not None:
        write(steps_out, res.steps, KIND_STEPS, res.context)
    res.summary["wall_s"] = time.perf_counter() - started
    reason = starving_reason(res.summary, res.summary, res.context["configuration"])
    if reason:
        res.summary["starving_reason"] = reason
    if as_json:
        click.echo(json.dumps(dict(res.summary, configuration=res.context["configuration"]), indent=2, default=str))
    else:
        import polars as pl  # the per-adapter table only (`--json` never imports polars)

        from tracekit.cliutil import console

        # The per-adapter table reads no identifiers nor lists: a million request ids
        # converted to polars for nothing cost a tenth of a second.
        unread = ("request_id", "target", "error", "tenant", "session_id", "prompt_token_ids", "prefix_hashes", "itl_s")
        results_df: pl.DataFrame = pl.from_arrow(res.results.drop_columns(  # type: ignore[assignment]
            [c for c in unread if c in res.results.column_names]))
        # Strings as the file has them (the adapter and status came dictionary-encoded).
        results_df = results_df.with_columns(pl.col("adapter", "status").cast(pl.String))
        rows = per_adapter(results_df, res.context).to_dicts()
        render(res.summary, f"twin run: {profile.name}, window {res.summary['window_s']:,.1f} s", res.context,
               rows, show_all)
        console.print(f"wrote {out} ({res.results.num_rows:,} requests)"
                      + (f" and {steps_out} ({res.steps.num_rows:,} steps)" if steps_out and res.steps is not None else "")
                      + f" in {res.summary['wall_s']:.2f} s")
    if plots_dir is not None:
        from tracekit.plots import write_plots

        df_all, _ = read(out, KIND_RESULTS)
        try:
            paths = write_plots([("twin", df_all, res.context)], plots_dir)
        except OSError as e:
            raise TracekitError(f"--plots {plots_dir}: cannot write: {e}") from None
        click.echo("plots: " + ", ".join(str(p) for p in paths), err=as_json)
