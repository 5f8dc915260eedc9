"""`predictor recommend`: how many adapters one GPU takes, with which vLLM settings, and
how many GPUs the fleet needs; explained, with how sure it is.

Two ways to answer, one rule (`predictor.safety`):

- default, the twin search (`predictor.search`): the twin runs one GPU's share of the
  trace (its real requests) and finds, for each max_loras the memory allows, the starving
  point (the most adapters served at > 90%); the trained model, where the profile has
  one, only gives the first guesses. Seconds for an hour of a 384-adapter fleet.
- `--fast`, the model alone: the trained model's starving point, in milliseconds.

Either way the answer is the best max_loras' starving point less a safety step derived
from the twin's calibration error (and, model only, the model's cross-validated error),
with the range of counts and throughput those errors allow. A profile without a trained
model (`twin calibrate` on one's own capture) gets the twin search from a probe of the
whole fleet.

`recommend_gpu` is the core (a trace's requests + profile + serving settings -> one GPU's
answer), for other commands to call on any group of adapters; `recommend` adds the fleet.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import polars as pl
import pyarrow as pa

from predictor.model import CapacityModel
from predictor.safety import Safety, safety
from predictor.search import TwinRun
from tracekit.cliutil import console, user_errors
from tracekit.schema import TracekitError

MODELS_DIR = Path(__file__).parent / "models"
# The twin window of the search (at most the trace's own): an hour, as the paper's runs
# and the shipped models' sweeps. Shorter windows understate what a GPU sustains
# (requests in flight at the end are not counted, queues take time to settle).
SEARCH_WINDOW_S = 3600.0
# Serving settings a trained model takes as given: a model-only answer for other values
# is outside what it learned (the twin search is not: it runs them).
MODEL_SETTINGS = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "block_size",
                  "enable_prefix_caching", "scheduler_reserve_full_isl", "async_scheduling", "kv_capacity_tokens",
                  "max_model_len")
# With no model, the first guess is the whole fleet; a run that keeps up steps this far
# beyond its lower bound (the model's guesses step 1 + 2 x its error instead).
NO_MODEL_UP = 1.25


def shipped_model_path(profile_name: str) -> Path:
    """predictor/models/<profile>.json; a profile given as a JSON path maps to its name."""
    name = Path(profile_name).name
    if name.endswith(".json"):
        name = name[: -len(".json")]
    return MODELS_DIR / f"{name}.json"


def shipped_models() -> list[str]:
    return sorted(f.stem for f in MODELS_DIR.glob("*.json"))


def find_model(model: Path | CapacityModel | None, profile: Any) -> tuple[CapacityModel | None, str | None]:
    """The model to use and its path: the one given, else the one shipped for the
    profile (by the profile's name), else none."""
    if isinstance(model, CapacityModel):
        return model, None
    if model is not None:
        return CapacityModel.load(model), str(model)
    name = getattr(profile, "name", None) or str(profile)
    p = shipped_model_path(name)
    if p.exists():
        return CapacityModel.load(p), str(p)
    return None, None


@dataclass
class GpuAnswer:
    """One GPU's answer for a group of adapters of one mix."""

    method: str
    max_loras: int
    adapters: int  # adapters per GPU: vLLM's --max-cpu-loras is set to this
    max_lora_rank: int
    config: Any  # twin.config.ServingConfig of the answer (max_cpu_loras = adapters)
    starving_point: float
    adapters_range: tuple[int, int]
    throughput_tok_s: float
    throughput_range_tok_s: tuple[float, float]
    offered_tok_s: float
    capacity_tok_s: float  # what one GPU of the answer's configuration serves when saturated
    served_frac: float | None
    p99_ttft_ms: float | None
    kv_capacity_tokens: int
    safety: Safety
    fleet_adapters: int
    starving_max_loras: int = 0  # the max_loras whose starving point the answer is below
    twin_runs: list[TwinRun] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    explanation: list[str] = field(default_factory=list)
    model_path: str | None = None
    answer_ms: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # the serving flags the user gave


def serving_config(profile: Any, context: Mapping[str, Any], wf: Mapping[str, float],
                   settings: Mapping[str, Any] | None) -> Any:
    """The user's serving settings over the profile's server (`twin.options`), with
    max_lora_rank the trace's largest unless set (and then at least that)."""
    from twin.options import config_from_options

    opts = dict(settings or {})
    if opts.get("max_cpu_loras") is not None:
        raise TracekitError("--max-cpu-loras is not taken: recommend sizes vLLM's CPU adapter cache to hold every "
                            "adapter of a GPU, the adapters per GPU it answers")
    rank = int(wf["rank_max"])
    if opts.get("max_lora_rank") is not None and int(opts["max_lora_rank"]) < rank:
        raise TracekitError(f"--max-lora-rank {opts['max_lora_rank']} is below the trace's largest adapter rank {rank}: "
                            "vLLM would refuse those adapters")
    opts["max_lora_rank"] = opts.get("max_lora_rank") or rank
    return config_from_options(profile, None, context, opts)


def _model_off_domain(model: CapacityModel, profile: Any, config: Any) -> list[str]:
    """The settings where `config` differs from what the model's sweep ran with."""
    from twin.api import ServingConfig

    trained = (model.meta or {}).get("serving") or ServingConfig.for_profile(profile).to_dict()
    mine = config.to_dict()
    return [f"{k}={trained.get(k)!r} (here {mine.get(k)!r})" for k in MODEL_SETTINGS if trained.get(k) != mine.get(k)]


def recommend_gpu(
    trace: pl.DataFrame | pl.LazyFrame | pa.Table | None,
    context: Mapping[str, Any],
    profile: Any,
    settings: Mapping[str, Any] | None = None,
    *,
    fast: bool = False,
    model: Path | CapacityModel | None = None,
    use_model: bool = True,
    jobs: int = 1,
    on_run: Callable[[TwinRun], None] | None = None,
    features: tuple[dict[str, float], dict[str, float]] | None = None,
    simulator: str = "twin.api:simulate",
) -> GpuAnswer:
    """One GPU's answer for the adapters of `trace` (all of them: the group to place).

    `settings`: serving flags by vLLM's names (None = the profile's server's value;
    `max_loras` pins it); `fast`: the model alone; `use_model=False`: the twin search
    without the model's guesses (what a profile with no model gets); `on_run`: called
    with each twin run as it finishes (sequential search); `features`: (features, loads)
    when already computed (then `trace` may be None for `fast`); `simulator`:
    module:function in place of the twin (tests)."""
    from predictor import features as feats
    from predictor.plan import best_of, model_starving_points, plan
    from twin.profile import load_profile

    t0 = time.perf_counter()
    prof = load_profile(profile)
    ctx = dict(context)
    wf, loads = features if features is not None else feats.compute_with_loads(trace, ctx)
    n_fleet = len(loads)
    per_adapter = float(wf["adapter_tok_s"])
    config = serving_config(prof, ctx, wf, settings)
    pinned = (settings or {}).get("max_loras")
    mdl, mpath = find_model(model, prof) if use_model or fast else (None, None)
    warnings: list[str] = []
    if fast and mdl is None:
        raise TracekitError(f"--fast needs a trained model and {prof.name} has none (shipped: "
                            f"{', '.join(shipped_models()) or 'none'}): drop --fast for the twin search, or pass --model")
    if mdl is not None:
        off = _model_off_domain(mdl, prof, config)
        if off and fast:
            warnings.append("the model was trained at " + ", ".join(off) + ": its answer is outside what it learned; "
                            "drop --fast for the twin search, which runs these settings")

    from predictor.search import SERVED_OK, Trials, allowed_max_loras, search

    grid = allowed_max_loras(prof, config, n_fleet, pinned)
    if not grid:
        raise TracekitError(f"{prof.name}: no max_loras fits the GPU's memory at max_lora_rank {config.max_lora_rank}"
                            + (f" (--max-loras {pinned})" if pinned else ""))

    def kv(ml: int, rank: int) -> int:
        return int(prof.kv_capacity_tokens(config.replace(max_loras=ml, max_cpu_loras=max(ml, n_fleet), max_lora_rank=rank)))

    points = []
    if mdl is not None:
        trained = (mdl.meta or {}).get("max_loras_grid") or grid
        lo_ml, hi_ml = min(trained), max(trained)
        # A model answers for the max_loras it was trained on (a tree does not extrapolate).
        in_range = [m for m in grid if lo_ml <= m <= hi_ml] or grid
        points = model_starving_points(mdl, wf, kv, in_range)

    if fast:
        assert mdl is not None
        sf = safety(prof, mdl)
        p = plan(mdl, wf, kv, n_fleet, [q["max_loras"] for q in points], below=sf.below)
        if p is None:
            raise TracekitError(f"{prof.name}: every max_loras runs out of GPU memory at max_lora_rank {config.max_lora_rank}")
        n = p.adapters
        offered = n * per_adapter
        cap = 0.9 * p.starving_load_tok_s  # what a GPU serves at its starving point
        thr = min(offered, cap)
        ans = GpuAnswer(
            method="model", max_loras=p.max_loras, adapters=n, max_lora_rank=p.max_lora_rank,
            config=config.replace(max_loras=p.max_loras, max_cpu_loras=n), starving_point=p.starving_point,
            adapters_range=_range(sf, p.starving_point, n_fleet), throughput_tok_s=thr,
            throughput_range_tok_s=(min(offered, cap * (1 - sf.step)), min(offered, cap * (1 + sf.step))),
            offered_tok_s=offered, capacity_tok_s=cap, served_frac=None, p99_ttft_ms=None, kv_capacity_tokens=p.kv_capacity_tokens,
            safety=sf, fleet_adapters=n_fleet, starving_max_loras=p.starving_max_loras,
            candidates=p.candidates, warnings=warnings, model_path=mpath)
        ans.explanation = _explain_model(mdl, p, wf, ans)
        ans.settings = dict(settings or {})
        ans.answer_ms = (time.perf_counter() - t0) * 1e3
        return ans

    sf = safety(prof, None)
    if trace is None:
        raise ValueError("recommend_gpu: the twin search needs the trace's requests")
    frame = trace.collect() if isinstance(trace, pl.LazyFrame) else trace
    window = min(float(feats.window_of(frame.lazy(), ctx)), SEARCH_WINDOW_S)
    trials = Trials(frame, ctx, loads, prof, config, window, simulator)
    trials.on_run = on_run
    need = n_fleet / max(1e-9, 1.0 - sf.step)  # what the whole fleet on one GPU must clear
    if points:
        start = best_of(points)["max_loras"]
        up = 1.0 + 2.0 * max(0.02, _model_err(mdl))

        def first_guess(ml: int) -> float:
            # Outside the max_loras it was trained on, the nearest one's answer.
            q = min(points, key=lambda q: (abs(math.log(q["max_loras"] / ml)), q["max_loras"]))
            return float(q["starving_point"])

        res = search(trials, grid, start, first_guess, up=up, jobs=jobs, need=need)
        method = "twin search"
    else:
        start = grid[len(grid) // 2]
        res = search(trials, grid, start, None, up=NO_MODEL_UP, jobs=jobs, need=need)
        method = ("twin search (model not used)" if not use_model else
                  "twin search (no trained model for this profile: first guess from a run of the whole fleet)")
    best = res.best
    assert best is not None
    if best.starving_point < 1.0:
        raise TracekitError(f"one adapter of this trace alone offers more than one GPU serves at max_loras {grid[0]} "
                            f"(the twin serves {best.runs[0].served_frac:.0%} of it)")
    star = max(best.starving_point, float(n_fleet)) if best.fits else best.starving_point
    n = min(n_fleet, sf.below(star))
    ml = min(best.max_loras, n)
    check = trials.run(ml, n, purpose="check")
    for _ in range(3):  # the step below should have left room; if the twin disagrees, step down again
        if check.ok or n <= 1:
            break
        n = max(1, min(n - 1, sf.below(n * check.served_frac / 0.9)))
        ml = min(best.max_loras, n)
        check = trials.run(ml, n, purpose="check")
    runs = list(trials._cache.values())  # in the order they ran (workers' runs as their max_loras finished)
    # What one GPU serves saturated: the most the twin saw it serve, or the 90% it serves
    # at the starving point (where the whole fleet fits, located by the scaled-up runs).
    cap = max([r.throughput_tok_s for r in best.runs] + [check.throughput_tok_s, SERVED_OK * star * per_adapter])
    thr = check.throughput_tok_s
    ans = GpuAnswer(
        method=method, max_loras=ml, adapters=n, max_lora_rank=int(config.max_lora_rank),
        config=config.replace(max_loras=ml, max_cpu_loras=n), starving_point=star,
        adapters_range=_range(sf, star, n_fleet), throughput_tok_s=thr,
        throughput_range_tok_s=(min(thr, cap * (1 - sf.step)), min(check.offered_tok_s, max(thr, thr * (1 + sf.step)))),
        offered_tok_s=check.offered_tok_s, capacity_tok_s=cap, served_frac=check.served_frac, p99_ttft_ms=check.p99_ttft_ms,
        kv_capacity_tokens=kv(ml, int(config.max_lora_rank)), safety=sf, fleet_adapters=n_fleet,
        starving_max_loras=best.max_loras, twin_runs=list(runs), warnings=warnings, model_path=mpath,
        candidates=[{"max_loras": m, "starving_point": r.starving_point, "fits": r.fits, "feasible": r.feasible,
                     "runs": len(r.runs),
                     "model_starving_point": next((q["starving_point"] for q in points if q["max_loras"] == m), None)}
                    for m, r in sorted(res.per_ml.items())])
    ans.explanation = _explain_search(ans, best, res, wf)
    ans.settings = dict(settings or {})
    ans.answer_ms = (time.perf_counter() - t0) * 1e3
    return ans


def _model_err(model: CapacityModel | None) -> float:
    from predictor.safety import model_error

    return model_error(model) if model is not None else 0.25


def _range(sf: Safety, star: float, n_fleet: int) -> tuple[int, int]:
    lo, hi = sf.range(star)
    return min(lo, n_fleet), min(hi, n_fleet)


def _explain_model(model: CapacityModel, p: Any, wf: Mapping[str, float], a: GpuAnswer) -> list[str]:
    sf = a.safety
    return [
        f"The model (no twin run) puts one GPU's starving load at max_loras={p.max_loras}, max_lora_rank="
        f"{p.max_lora_rank} ({p.kv_capacity_tokens:,} KV tokens) at {p.starving_load_tok_s:,.0f} tok/s offered, because "
        + "; ".join(model.explain(p.x)) + ".",
        f"Each adapter offers {wf['adapter_tok_s']:,.1f} tok/s on average ({wf['rate_mean']:.4g} req/s x "
        f"{wf['tokens_per_req']:.0f} tokens): the GPU starves at about {p.starving_point:,.1f} adapters.",
        _safety_sentence(sf, p.starving_point, a.adapters, a.fleet_adapters),
    ]


def _safety_sentence(sf: Safety, star: float, n: int, n_fleet: int) -> str:
    src = f"the twin's calibration error {sf.twin_error:.1%} ({sf.twin_error_source})"
    if sf.model_error:
        src += f" and the model's cross-validated error {sf.model_error:.1%}"
    s = (f"The safety step is {sf.z:g} x {sf.sigma:.1%} = {sf.step:.1%} ({src}): "
         f"{star:,.1f} x (1 - {sf.step:.3f}) -> {sf.below(star)} adapters")
    if n >= n_fleet and sf.below(star) >= n_fleet:
        s += f"; the whole fleet ({n_fleet} adapters) fits on one GPU."
    else:
        s += "."
    return s


def _explain_search(a: GpuAnswer, best: Any, res: Any, wf: Mapping[str, float]) -> list[str]:
    cand = ", ".join(
        f"max_loras={c['max_loras']}: {'all ' + str(a.fleet_adapters) + ' fit' if c['fits'] else format(c['starving_point'], ',.1f')}"
        for c in a.candidates)
    out = [
        f"The twin ran one GPU's share of this trace {len(a.twin_runs)} times ({res.wall_s:.1f} s): "
        f"adapters served at > 90% of what they offer, per max_loras: {cand}.",
        f"Best: max_loras={best.max_loras}, whose starving point is {'at least ' if best.fits else ''}"
        f"{a.starving_point:,.1f} adapters ({wf['adapter_tok_s']:,.1f} tok/s each).",
        _safety_sentence(a.safety, a.starving_point, a.adapters, a.fleet_adapters),
    ]
    if a.served_frac is not None:
        out.append(f"Checked in the twin: {a.adapters} adapters at max_loras={a.max_loras} are served "
                   f"{a.served_frac:.1%} ({a.throughput_tok_s:,.0f} of {a.offered_tok_s:,.0f} tok/s offered).")
    return out


# From this vLLM on (the one the project runs), both scheduler flags exist and default on;
# before it a server may lack them (the paper's 0.8.5 has neither) and then runs as if off.
NEW_SCHEDULER_FLAGS_FROM = (0, 32)


def _older_than(version: Any, first: tuple[int, ...]) -> bool:
    """Is `version` ("0.8.5") known and older than `first`? Unknown versions are not."""
    parts = []
    for x in str(version or "").split("."):
        digits = "".join(c for c in x if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return bool(parts) and tuple(parts) < first


def vllm_command(profile: Any, config: Any) -> str:
    """The vLLM command line of a configuration, for the profile's model and server."""
    from twin.config import server_defaults

    prof_data = getattr(profile, "data", {}) or {}
    server = server_defaults(prof_data)
    model = str((prof_data.get("model") or {}).get("name") or "MODEL")
    args = ["vllm", "serve", model, "--enable-lora",
            "--max-loras", str(config.max_loras), "--max-cpu-loras", str(config.cpu_loras),
            "--max-lora-rank", str(config.max_lora_rank),
            "--max-num-seqs", str(config.max_num_seqs), "--max-num-batched-tokens", str(config.max_num_batched_tokens),
            "--gpu-memory-utilization", f"{config.gpu_memory_utilization:g}", "--block-size", str(config.block_size),
            "--enable-prefix-caching" if config.enable_prefix_caching else "--no-enable-prefix-caching"]
    # Both are stated whatever their value: vLLM 0.32 turns them on when not given
    # (async scheduling where the executor supports it). For an older vLLM (the paper's
    # 0.8.5 knows neither, and behaves as if off) they are stated only when on.
    old = _older_than(server.get("vllm_version"), NEW_SCHEDULER_FLAGS_FROM)
    for name in ("async_scheduling", "scheduler_reserve_full_isl"):
        v = bool(getattr(config, name))
        if v or not old:
            args.append(("--" if v else "--no-") + name.replace("_", "-"))
    if config.kv_capacity_tokens is not None:
        args += ["--num-gpu-blocks-override", str(int(config.kv_capacity_tokens) // int(config.block_size))]
    if config.max_model_len is not None:
        args += ["--max-model-len", str(config.max_model_len)]
    return " ".join(shlex.quote(a) for a in args)


def recommend(
    trace_path: Path,
    profile: Any,
    settings: Mapping[str, Any] | None = None,
    *,
    fast: bool = False,
    model: Path | CapacityModel | None = None,
    use_model: bool = True,
    jobs: int = 1,
    on_run: Callable[[TwinRun], None] | None = None,
    simulator: str = "twin.api:simulate",
) -> dict[str, Any]:
    """The recommendation for a trace file, as the --json object (`gpu_adapters`: each
    GPU's adapters). `answer_ms` counts from here on, after the libraries are imported."""
    from predictor import features as feats
    from predictor.plan import split_fleet
    from tracekit import schema
    from twin.profile import load_profile

    t0 = time.perf_counter()
    prof = load_profile(profile)
    # The model alone needs the four feature columns (read once, checked); the twin search
    # replays the whole trace, so it reads and checks all of it.
    trace: pl.DataFrame | None = None
    if fast:  # a row group at a time, checked as read
        meta, rows, tables = schema.iter_trace_columns(trace_path, feats.FEATURE_COLUMNS, dictionary=["adapter"])
        wf, loads = feats.compute_from_tables(tables, rows, meta.context, str(trace_path))
    else:
        trace, meta = schema.read_trace(trace_path)
        wf, loads = feats.compute_with_loads(trace, meta.context, str(trace_path))
    a = recommend_gpu(trace, meta.context, prof, settings, fast=fast, model=model, use_model=use_model, jobs=jobs,
                      on_run=on_run, features=(wf, loads), simulator=simulator)
    gpus = split_fleet(loads, a.adapters)
    gpu_loads = [sum(loads[x] for x in g) for g in gpus]
    out = answer_dict(a, prof)
    out.update(
        trace=str(trace_path), gpus=len(gpus), gpu_load_tok_s=[round(x, 1) for x in gpu_loads],
        fleet_throughput_tok_s=float(sum(min(g, a.throughput_tok_s) for g in gpu_loads)) if a.throughput_tok_s else None,
        gpu_adapters=gpus,
    )
    out["explanation"] = " ".join(a.explanation + [
        f"{a.fleet_adapters} adapters need {len(gpus)} GPU(s) of {a.adapters} (busiest adapters first onto the "
        f"least loaded GPU); the busiest GPU is offered {max(gpu_loads):,.0f} tok/s."])
    out["answer_ms"] = (time.perf_counter() - t0) * 1e3
    return out


def configuration(a: GpuAnswer, profile: Any) -> dict[str, Any]:
    """Every setting of the answer, resolved, and where each came from (as `twin run`
    states its own, `twin.options.describe_config`); max_loras and max_cpu_loras are the
    answer's."""
    from twin.options import describe_config

    conf = describe_config(profile, a.config, a.settings, a.kv_capacity_tokens)
    pinned = a.settings.get("max_loras") is not None
    conf["from"]["max_loras"] = "flag" if pinned else ("the model" if a.method == "model" else "searched in the twin")
    conf["from"]["max_cpu_loras"] = "vLLM's CPU adapter cache, sized to hold the adapters per GPU"
    server = _server(profile)
    for name in ("gpu_memory_utilization", "scheduler_reserve_full_isl", "async_scheduling"):
        conf[name] = getattr(a.config, name)
        conf["from"][name] = "flag" if a.settings.get(name) is not None else \
            f"the profile's server (vLLM {server.get('vllm_version')})"
    return conf


def _server(profile: Any) -> dict[str, Any]:
    """The profile's server section over the defaults (`twin.config.server_defaults`)."""
    from twin.config import server_defaults

    data = getattr(profile, "data", profile)
    return server_defaults(data if isinstance(data, Mapping) else {})


def answer_dict(a: GpuAnswer, profile: Any) -> dict[str, Any]:
    """The JSON form of one GPU's answer."""
    return {
        "method": a.method,
        "profile": getattr(profile, "name", str(profile)),
        "adapters": a.fleet_adapters,
        "adapters_per_gpu": a.adapters,
        "adapters_per_gpu_range": list(a.adapters_range),
        "max_loras": a.max_loras,
        "max_lora_rank": a.max_lora_rank,
        "starving_point": round(a.starving_point, 2),
        "throughput_tok_s": round(a.throughput_tok_s, 1),
        "throughput_range_tok_s": [round(x, 1) for x in a.throughput_range_tok_s],
        "offered_tok_s": round(a.offered_tok_s, 1),
        "capacity_tok_s": round(a.capacity_tok_s, 1),
        "served_frac": a.served_frac,
        "p99_ttft_ms": a.p99_ttft_ms,
        "kv_capacity_tokens": a.kv_capacity_tokens,
        "serving": a.config.to_dict(),
        "configuration": configuration(a, profile),
        "vllm_command": vllm_command(profile, a.config),
        "safety": a.safety.to_dict(),
        "twin_runs": [r.to_dict() for r in a.twin_runs],
        "candidates": [{k: v for k, v in c.items()} for c in a.candidates],
        "warnings": list(a.warnings),
        "model": a.model_path,
        "gpu_answer_ms": a.answer_ms,
    }


def _print(rec: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"predictor recommend {rec['trace']}  ({rec['method']})", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    lo, hi = rec["adapters_per_gpu_range"]
    t.add_row("adapters per GPU", f"{rec['adapters_per_gpu']}   (range {lo}-{hi})")
    t.add_row("GPU adapter slots (--max-loras)", str(rec["max_loras"]))
    s = rec["serving"]
    t.add_row("CPU adapter cache (--max-cpu-loras)", f"{s['max_cpu_loras']}: holds every adapter of the GPU")
    t.add_row("--max-lora-rank", str(rec["max_lora_rank"]))
    t.add_row("engine limits", f"--max-num-seqs {s['max_num_seqs']}, --max-num-batched-tokens {s['max_num_batched_tokens']}, "
              f"--gpu-memory-utilization {s['gpu_memory_utilization']:g} ({rec['kv_capacity_tokens']:,} KV tokens)")
    src = rec["configuration"]["from"]
    t.add_row("engine limits from", src["max_num_seqs"] if src["max_num_seqs"] == src["max_num_batched_tokens"]
              else f"--max-num-seqs: {src['max_num_seqs']}; --max-num-batched-tokens: {src['max_num_batched_tokens']}")
    sched = [("prefix caching", "enable_prefix_caching"), ("async scheduling", "async_scheduling"),
             ("full-prompt admission", "scheduler_reserve_full_isl")]
    unset = [src[k] for _, k in sched if src.get(k) != "flag"]
    t.add_row("scheduler", ", ".join(f"{label} {'on' if s[k] else 'off'}" + (" (flag)" if src.get(k) == "flag" else "")
                                     for label, k in sched) + (f"; from {unset[0]}" if unset else ""))
    sf = rec["safety"]
    src_err = f"the twin's calibration error {sf['twin_error']:.1%}"
    if sf["model_error"]:
        src_err += f" with the model's cross-validated error {sf['model_error']:.1%}"
    t.add_row("safety step", f"{sf['step']:.1%} below the starving point {rec['starving_point']:,.1f} "
              f"({sf['z']:g} x {sf['sigma']:.1%}: {src_err})")
    tl, th = rec["throughput_range_tok_s"]
    served = f", {rec['served_frac']:.1%} of {rec['offered_tok_s']:,.0f} offered" if rec.get("served_frac") is not None else ""
    t.add_row("expected throughput per GPU", f"{rec['throughput_tok_s']:,.0f} tok/s (range {tl:,.0f}-{th:,.0f}{served})")
    if rec.get("p99_ttft_ms") is not None:
        t.add_row("p99 TTFT in the twin", f"{rec['p99_ttft_ms'] / 1e3:,.2f} s")
    t.add_row("GPUs for the fleet", f"{rec['gpus']} for {rec['adapters']} adapters")
    t.add_row("answered in", f"{rec['answer_ms'] / 1e3:.2f} s" if rec["answer_ms"] >= 1000 else f"{rec['answer_ms']:.0f} ms")
    console.print(t)
    if rec["twin_runs"]:
        windows = sorted({x["window_s"] for x in rec["twin_runs"]})
        r = Table(title=f"twin runs: one GPU's share of the trace, {' / '.join(f'{w:,.0f}' for w in windows)} s simulated")
        for c in ("#", "", "max_loras", "adapters", "offered tok/s", "served", "throughput", "p99 TTFT s", "wall s"):
            r.add_column(c, justify="right")
        for i, x in enumerate(rec["twin_runs"], 1):
            p99 = "-" if x["p99_ttft_ms"] is None else f"{x['p99_ttft_ms'] / 1e3:,.1f}"
            r.add_row(str(i), x["purpose"], str(x["max_loras"]), str(x["adapters"]), f"{x['offered_tok_s']:,.0f}",
                      f"{x['served_frac']:.1%}" + (" starved" if x["starved"] else ""), f"{x['throughput_tok_s']:,.0f}",
                      p99, f"{x['wall_s']:.1f}")
        console.print(r)
    for w in rec["warnings"]:
        console.print(f"[yellow]warning: {w}[/yellow]")
    console.print(rec["explanation"])
    console.print("\nvLLM command (each GPU; add --lora-modules for the adapters it holds, listed with --json):")
    console.print(rec["vllm_command"], soft_wrap=True, highlight=False, markup=False)


def _cli() -> click.Command:
    from twin.options import serving_options

    @click.command("recommend")
    @click.argument("trace", type=click.Path(path_type=Path))
    @click.option("--profile", required=True, help="Twin profile (shipped name or JSON path, e.g. from `twin calibrate`).")
    @click.option("--fast", is_flag=True, help="The trained model alone (milliseconds, no twin run).")
    @click.option("--verify", is_flag=True,
                  help="The twin search around the model's answer (the default; the flag is kept for older scripts).")
    @click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
                  help="Processes for the twin search (several max_loras at once).")
    @click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Model from `predictor train` (default: the one shipped for --profile, if any).")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @serving_options(exclude=("max_cpu_loras",))
    @user_errors
    def recommend_cmd(trace: Path, profile: str, fast: bool, verify: bool, jobs: int, model_path: Path | None,
                      as_json: bool, **settings: Any) -> None:
        """How many adapters of TRACE one GPU serves, with which vLLM settings, and how many GPUs.

        By default the twin searches it (seconds; with a trained model's first guesses where
        the profile has one); --fast answers from the model alone. Serving flags are vLLM's;
        unset ones are what the profile's server ran with; --max-loras fixes the slots
        instead of searching them. The answer sizes vLLM's CPU adapter cache (--max-cpu-loras)
        to hold the adapters per GPU."""
        if fast and verify:
            raise TracekitError("--fast and --verify exclude each other: --fast is the model alone, --verify "
                                "(the default) checks it in the twin")
        if as_json:
            rec = recommend(trace, profile, settings, fast=fast, model=model_path, jobs=jobs)
        else:
            status = console.status("reading the trace")
            n = [0]

            def on_run(r: TwinRun) -> None:
                n[0] += 1
                status.update(f"twin search: run {n[0]} (max_loras {r.max_loras}, {r.adapters} adapters: "
                              f"served {r.served_frac:.1%})")

            with status:
                rec = recommend(trace, profile, settings, fast=fast, model=model_path, jobs=jobs, on_run=on_run)
        if as_json:
            click.echo(json.dumps(rec, default=str))
            return
        _print(rec)

    for p in recommend_cmd.params:  # here max_loras is an answer unless fixed
        if p.name == "max_loras" and isinstance(p, click.Option):
            p.help = "Fix the GPU adapter slots instead of searching them [default: searched]."
    return recommend_cmd


recommend_cmd = _cli()
