"""`replay run`: one trace against real vLLM or the twin, into a results Parquet file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import polars as pl

from tracekit.cliutil import console, renamed, user_errors
from tracekit.schema import KIND_RESULTS, TracekitError, read_trace, write
from twin.options import SERVING_FLAG_NAMES, config_from_options, describe_config, serving_options
from twin.routing import ROUTERS

TWIN_FLAGS = ("profile", *SERVING_FLAG_NAMES)
VLLM_FLAGS = ("url", "lora_dir", "model", "max_concurrency", "request_timeout", "drain_timeout")


def _parse_id_range(value: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in value.split(":"))
    except ValueError:
        raise TracekitError(f"--token-id-range: expected LO:HI, got {value!r}") from None
    if not 0 <= lo < hi:
        raise TracekitError(f"--token-id-range: need 0 <= LO < HI, got {value!r}")
    return lo, hi


def prepare_trace(trace: pl.DataFrame, speed: float) -> pl.DataFrame:
    """Arrivals scaled by --speed: the load the target is actually offered."""
    if speed != 1.0:
        trace = trace.with_columns(pl.col("arrival_s") / speed)
    return trace


def cut_for(trace_context: dict[str, Any], duration: float | None, until_done: bool, speed: float) -> float | None:
    """Where the run is cut: --window, else the trace's own window (scaled), else none."""
    if until_done:
        return None
    if duration is not None:
        return duration
    w = trace_context.get("window_s")
    return float(w) / speed if w else None


def _check_writable(out: Path) -> None:
    """Fail before a long run, not after it, when --out cannot be written."""
    if out.is_dir():
        raise TracekitError(f"--out {out}: is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TracekitError(f"--out {out}: cannot write there: {e.strerror or e}") from None


@click.command("run")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["vllm", "twin"]), required=True, help="Where to replay.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Results Parquet file.")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Time scale: 2 sends twice as fast (results then hold the scaled arrival_s).")
@click.option("--window", "duration", type=float, default=None,
              help="Cut the run at S seconds (stop sending; requests still running become `unfinished`) "
                   "[default: the trace's window, else run until every request finishes].")
@click.option("--drain", "until_done", is_flag=True,
              help="Never cut: wait for every request to finish (bounded by --request-timeout).")
@click.option("--warmup", type=float, default=0.0, show_default=True,
              help="Exclude requests arriving in the first S seconds from the metrics (context warmup_s).")
@click.option("--url", default=None,
              help="vllm: base URL of the OpenAI-compatible server; URL1,URL2,... for a fleet (one per GPU of --plan).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="A fleet plan (JSON; see `twin run --fleet`): its GPUs are the servers of --url, or twins.")
@click.option("--router", type=click.Choice(ROUTERS), default=None,
              help="fleet: how requests are sent to GPUs [default: the plan's, else placement].")
@click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
              help="vllm: folder of adapters (DIR/<name>, else a folder of the same rank).")
@click.option("--model", default=None, help="vllm: served base model name [default: from /v1/models].")
@click.option("--max-concurrency", type=int, default=None, help="vllm: cap on requests in flight.")
@click.option("--request-timeout", type=float, default=300.0, show_default=True, help="vllm: per-request timeout (s).")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="vllm: after Ctrl-C/SIGTERM, wait this long for requests in flight.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of prompt token ids not in the trace.")
@click.option("--token-id-range", default="1000:2000", show_default=True,
              help="vllm: LO:HI band of token ids drawn for prompts the trace did not capture.")
@click.option("--no-progress", is_flag=True, help="No live progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object instead of tables.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Also write throughput.png, running.png and latency.png into DIR.")
@click.option("--all", "show_all", is_flag=True, help="Every adapter in the per-adapter table (default: the top 20).")
@click.option("--profile", default=None, help="twin: profile name or path.")
@serving_options(help_prefix="twin: ")
@renamed("--duration", "--window", "duration", type=float)
@renamed("--until-done", "--drain", "until_done", is_flag=True)
@user_errors
def run_cmd(trace: Path, target: str, out: Path, speed: float, duration: float | None, until_done: bool,
            warmup: float, no_progress: bool, seed: int, token_id_range: str, as_json: bool,
            plots_dir: Path | None, show_all: bool, plan_path: Path | None, router: str | None,
            **flags: Any) -> None:
    """Replay TRACE open-loop against a vLLM server (--target vllm --url URL) or the twin
    (--target twin --profile P ...), and write per-request results to --out. A fleet:
    --plan PLAN [--router R] with --url URL1,URL2,... (one server per GPU) or the twin;
    the results then have a `replica` column."""
    if speed <= 0:
        raise TracekitError(f"--speed must be positive, got {speed}")
    if duration is not None and duration <= 0:
        raise TracekitError(f"--window must be positive, got {duration}")
    if warmup < 0:
        raise TracekitError(f"--warmup must be non-negative, got {warmup}")
    if flags["max_concurrency"] is not None and flags["max_concurrency"] < 1:
        raise TracekitError(f"--max-concurrency must be at least 1, got {flags['max_concurrency']}")
    wrong = VLLM_FLAGS if target == "twin" else TWIN_FLAGS
    defaults = {"request_timeout": 300.0, "drain_timeout": 30.0}
    for name in wrong:
        if flags[name] is not None and flags[name] != defaults.get(name):
            raise TracekitError(f"--{name.replace('_', '-')} does not apply to --target {target}")

    _check_writable(out)
    df, meta = read_trace(trace)
    if df.height == 0:
        raise TracekitError(f"{trace}: the trace has no requests")
    df = prepare_trace(df, speed)
    cut = cut_for(meta.context, duration, until_done, speed)
    if cut is not None and warmup >= cut:
        raise TracekitError(f"--warmup {warmup} must be shorter than the run ({cut:g} s)")

    plan = None
    if plan_path is not None:
        from twin.fleet_plan import FleetPlan

        plan = FleetPlan.load(plan_path)
        router = router or plan.router or "placement"
    elif router is not None:
        raise TracekitError("--router needs --plan PLAN (the fleet's GPUs and their adapters)")
    tgt: Any
    if target == "vllm" and (plan is not None or (flags["url"] and "," in flags["url"])):
        from replay.fleet_target import VllmFleetTarget, parse_urls

        if plan is None:
            raise TracekitError("--url lists several servers: pass --plan PLAN (one GPU per server, in order)")
        tgt = VllmFleetTarget(urls=parse_urls(flags["url"] or ""), plan=plan, router=router or "placement",
                              lora_dir=flags["lora_dir"], model=flags["model"], max_concurrency=flags["max_concurrency"],
                              request_timeout_s=flags["request_timeout"], drain_timeout_s=flags["drain_timeout"],
                              seed=seed, token_id_range=_parse_id_range(token_id_range), progress=not no_progress)
    elif target == "twin" and plan is not None:
        from replay.fleet_target import TwinFleetTarget

        if not flags["profile"]:
            raise TracekitError("--target twin needs --profile (see `twin profiles`)")
        given = [k for k in SERVING_FLAG_NAMES if flags.get(k) is not None]
        if given:
            raise TracekitError(f"--{given[0].replace('_', '-')} does not apply with --plan: set it per GPU in the plan")
        from twin.profile import load_profile

        tgt = TwinFleetTarget(profile=load_profile(flags["profile"]), plan=plan, router=router or "placement")
    elif target == "vllm":
        from replay.targets import VllmTarget

        if not flags["url"]:
            raise TracekitError("--target vllm needs --url (e.g. http://127.0.0.1:8000)")
        tgt = VllmTarget(url=flags["url"], lora_dir=flags["lora_dir"], model=flags["model"],
                         max_concurrency=flags["max_concurrency"], request_timeout_s=flags["request_timeout"],
                         drain_timeout_s=flags["drain_timeout"], seed=seed,
                         token_id_range=_parse_id_range(token_id_range), progress=not no_progress)
    else:
        from replay.targets import TwinTarget

        if not flags["profile"]:
            raise TracekitError("--target twin needs --profile (see `twin profiles`)")
        try:
            from twin.profile import load_profile
        except ModuleNotFoundError as e:
            raise TracekitError(f"the twin is not available in this installation ({e})") from None
        profile = load_profile(flags["profile"])
        config = config_from_options(profile, df, meta.context, flags)
        tgt = TwinTarget(profile=profile, config=config)

    replayed = tgt.replay(df, dict(meta.context), cut)
    if target == "twin" and plan is None:  # a fleet's per-GPU configurations are in its `fleet` context
        kv = (replayed.context.get("twin") or {}).get("kv_capacity_tokens")
        replayed.context["configuration"] = describe_config(profile, config, flags, kv)
    context = {k: v for k, v in meta.context.items() if k not in ("window_s", "parts")}
    context.update(replayed.context)
    context.update({
        "kind_of_run": "replay",
        "target": target,
        "trace_path": str(trace),
        "trace_window_s": meta.context.get("window_s"),
        "speed": speed,
        "warmup_s": warmup,
        "replay_flags": {"window": duration, "drain": until_done, "seed": seed,
                         **({"plan": str(plan_path), "router": router} if plan is not None else {}),
                         **{k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()
                            if v is not None and k in (VLLM_FLAGS if target == "vllm" else TWIN_FLAGS)}},
    })
    write(out, replayed.results, KIND_RESULTS, context)

    from replay.report import _json_safe, load_results, render_summary, report_dict

    res, ctx = load_results(out)
    if as_json:
        click.echo(json.dumps(_json_safe(dict(report_dict(res, ctx), out=str(out))), default=str))
    else:
        render_summary(res, ctx, console, show_all=show_all)
        if plan is not None:
            import pyarrow.parquet as pq

            from twin.fleet import fleet_summary
            from twin.fleet_cmd import render_fleet

            render_fleet(fleet_summary(pq.read_table(out), ctx, plan, None), f"fleet: router {router}, per replica")
        if context.get("interrupted"):
            console.print("[yellow]interrupted: results so far were written[/]")
        console.print(f"wrote {out} ({res.height:,} requests)")
    if plots_dir is not None:
        from tracekit.plots import write_plots

        try:
            paths = write_plots([(target, res, ctx)], plots_dir)
        except OSError as e:
            raise TracekitError(f"--plots {plots_dir}: cannot write: {e}") from None
        click.echo("plots: " + ", ".join(str(p) for p in paths), err=as_json)
