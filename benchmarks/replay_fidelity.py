"""Replay fidelity and overhead: `replay run` against `vllm bench serve`, same server, same trace.

Both clients replay the same Poisson trace (fixed prompt 64 / output 16 tokens) against
`replay.fast_server` (streams tokens 1 ms apart, no model work), each in its own process:
- dispatch lag, measured on the server for both clients (arrival time of each request on
  CLOCK_MONOTONIC minus its trace time, offset so the earliest request is on time), and,
  for `replay run`, also on the client (`dispatch_s - arrival_s` in its results);
- achieved rate: requests / (last arrival - first arrival) at the server, over the trace's;
- CPU time per request of the client process (getrusage of the child), minus the CPU of a
  20-request run of the same tool (start-up: imports, tokenizer), divided by the
  difference in requests.
Then the rate is pushed up until `replay run`'s p99 lag passes 1 ms or its rate falls
more than 1% short.

Run: `.venv/bin/python benchmarks/replay_fidelity.py` (needs .venv-vllm for the baseline;
`--no-baseline` skips it). Writes benchmarks/results/replay.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from tracekit.schema import new_context, read, write  # noqa: E402

VENV_BIN = Path(sys.executable).parent
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
BENCH = ("import argparse, sys; from vllm.benchmarks.serve import add_cli_args, main; "
         "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
PROMPT, OUTPUT = 64, 16
# `replay run` with its default HTTP client (h1stream: synchronous write at the deadline)
# and with the earlier aiohttp client (a task per request), the before/after of the change.
REPLAY_TOOLS = {"replay": "h1", "replay-aiohttp": "aiohttp"}
LABEL = {"replay": "replay run", "replay-aiohttp": "replay run (aiohttp client, before)"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def make_trace(dirpath: Path, rate: float, duration: float, seed: int) -> tuple[Path, Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rate * duration)
    arr = np.cumsum(rng.exponential(1 / rate, n))
    arr -= arr[0]  # both tools send the first request at their start
    df = pl.DataFrame({"request_id": [f"r{i}" for i in range(n)], "arrival_s": arr, "adapter": [None] * n,
                       "prompt_tokens": np.full(n, PROMPT, np.int32), "output_tokens": np.full(n, OUTPUT, np.int32)})
    trace = dirpath / f"trace-{rate:g}-{n}.parquet"
    write(trace, df, "trace", new_context(source="benchmark"))
    jsonl = dirpath / f"trace-{rate:g}-{n}.jsonl"
    with jsonl.open("w") as f:
        for i, t in enumerate(arr):
            # hash_ids: 4 chunks of 16 tokens = a 64-token prompt, unique per request.
            f.write(json.dumps({"timestamp": float(t), "input_length": PROMPT, "output_length": OUTPUT,
                                "hash_ids": [i * 4 + k for k in range(4)]}) + "\n")
    return trace, jsonl, arr


def run_child(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> tuple[float, float, str]:
    """Run a client; return (CPU seconds of that child, wall seconds, output tail)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        tail = out.read().decode(errors="replace")[-3000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{tail}")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - t0, tail


def server_lags(url: str, arrivals: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-request lag measured at the server, and achieved rate / trace rate."""
    recv = np.array(http(f"{url}/_stats")["received"])
    n = len(arrivals)
    if len(recv) < n:  # some requests never reached the server: no one-to-one mapping
        return np.full(n, np.nan), float("nan")
    recv = np.sort(recv)[-n:]  # `vllm bench serve` sends one test request first
    lag = recv - arrivals
    lag -= lag.min()
    ratio = ((n - 1) / (recv[-1] - recv[0])) / ((n - 1) / (arrivals[-1] - arrivals[0]))
    return lag, float(ratio)


def run_replay(url: str, trace: Path, out: Path, client: str = "h1") -> dict[str, Any]:
    env = dict(os.environ, TRACEKIT_REPLAY_HTTP=client)
    cpu, wall, _ = run_child([str(VENV_BIN / "replay"), "run", str(trace), "--target", "vllm", "--url", url,
                              "--drain", "--no-progress", "--out", str(out)], env=env)
    res, meta = read(out, "results")
    lag = (res["dispatch_s"] - res["arrival_s"]).to_numpy()
    errors = res.filter(pl.col("status") != "ok").group_by("error").len().sort("len", descending=True).head(3)
    return {"cpu_s": cpu, "wall_s": wall, "ok": int((res["status"] == "ok").sum()), "n": res.height,
            "errors": {str(e): int(k) for e, k in errors.iter_rows()},
            "client_lag_p50_ms": float(np.percentile(lag, 50) * 1e3),
            "client_lag_p99_ms": float(np.percentile(lag, 99) * 1e3),
            "client_lag_max_ms": float(lag.max() * 1e3),
            "in_process_cpu_s": meta.context.get("replayer_cpu_s")}


def run_bench(url: str, jsonl: Path, n: int, tokenizer: Path, result_dir: Path) -> dict[str, Any]:
    name = f"bench-{jsonl.stem}.json"
    cmd = [str(VLLM_PY), "-c", BENCH, "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
           "--model", "fast-base", "--tokenizer", str(tokenizer), "--dataset-name", "timed_trace",
           "--dataset-path", str(jsonl), "--num-prompts", str(n), "--disable-tqdm",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    cpu, wall, _ = run_child(cmd, env=env)
    got = json.loads((result_dir / name).read_text())
    return {"cpu_s": cpu, "wall_s": wall, "ok": int(got.get("completed", 0)), "n": n}


def measure(tool: str, url: str, rate: float, duration: float, work: Path, tokenizer: Path | None, seed: int) -> dict[str, Any]:
    trace, jsonl, arr = make_trace(work, rate, duration, seed)
    http(f"{url}/_reset", b"{}")
    if tool in REPLAY_TOOLS:
        row = run_replay(url, trace, work / f"res-{rate:g}-{len(arr)}.parquet", REPLAY_TOOLS[tool])
    else:
        assert tokenizer is not None
        row = run_bench(url, jsonl, len(arr), tokenizer, work)
    lag, ratio = server_lags(url, arr)
    row.update({"tool": tool, "rate": rate, "duration_s": duration, "server_lag_p50_ms": float(np.percentile(lag, 50) * 1e3),
                "server_lag_p99_ms": float(np.percentile(lag, 99) * 1e3), "achieved_rate_ratio": ratio})
    if tool not in REPLAY_TOOLS:
        row.update(client_lag_p50_ms=float("nan"), client_lag_p99_ms=float("nan"))
    # Other jobs share these two cores: the 1-minute load average says how much.
    row["loadavg_1m"] = os.getloadavg()[0]
    return row


def tiny_tokenizer(cache: Path) -> Path:
    """The test suite's tiny model (its tokenizer is all `vllm bench serve` needs), built
    into a private folder so a concurrent test session's cache is never disturbed."""
    import vllm_support

    return vllm_support.build_model(cache, size="tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sweep", default="400,800,1200,1600", help="Rates pushed after the main one.")
    ap.add_argument("--sweep-duration", type=float, default=15.0)
    ap.add_argument("--no-baseline", action="store_true", help="Skip `vllm bench serve`.")
    ap.add_argument("--no-aiohttp", action="store_true", help="Skip `replay run` on its earlier aiohttp client.")
    ap.add_argument("--sweep-aiohttp", action="store_true", help="Also push the rate with the aiohttp client.")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "replay")
    ap.add_argument("--report-only", action="store_true", help="Rewrite the .md from the saved .json.")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        tools = list(dict.fromkeys(r["tool"] for r in saved["rows"]))
        for k, v in saved["args"].items():
            setattr(args, k, v)
        write_report(saved["rows"], saved["startup"], args, tools, saved["machine"])
        return
    baseline = not args.no_baseline and VLLM_PY.exists()
    tools = ["replay"] + (["replay-aiohttp"] if not args.no_aiohttp else []) + (["vllm bench serve"] if baseline else [])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "replay.fast_server", "--port", str(port), "--itl-ms", "1"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(100):
            try:
                http(f"{url}/v1/models")
                break
            except OSError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            tokenizer = tiny_tokenizer(work / "model") if baseline else None
            startup = {t: measure(t, url, 20.0, 1.0, work, tokenizer, 7) for t in tools}
            plan = [("main", rep, args.rate, args.duration, rep) for rep in range(args.repeats)]
            plan += [("sweep", 0, float(x), args.sweep_duration, 100) for x in args.sweep.split(",") if x]
            for phase, rep, rate, duration, seed in plan:
                for t in tools:
                    if phase == "sweep" and t == "replay-aiohttp" and not args.sweep_aiohttp:
                        continue
                    try:
                        row = measure(t, url, rate, duration, work, tokenizer, seed)
                    except RuntimeError as e:  # a client that crashes is a result, not the end
                        print(f"{t} at {rate:g} req/s failed: {str(e)[-500:]}", file=sys.stderr)
                        continue
                    row.update(phase=phase, repeat=rep)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(10)
    for r in rows:
        s = startup[r["tool"]]
        r["cpu_ms_per_request"] = (r["cpu_s"] - s["cpu_s"]) / (r["n"] - s["n"]) * 1e3
    write_report(rows, startup, args, tools)


def _num(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and v == v else "n/a"


def write_report(rows: list[dict[str, Any]], startup: dict[str, Any], args: argparse.Namespace, tools: list[str],
                 machine: str | None = None) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = machine or f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), shared with other jobs, Python {platform.python_version()}"
    cmd = "  ".join(["python benchmarks/replay_fidelity.py", f"--rate {args.rate:g} --duration {args.duration:g} --repeats {args.repeats} --sweep {args.sweep} --sweep-duration {args.sweep_duration:g}"
                                                         + (" --no-aiohttp" if getattr(args, "no_aiohttp", False) else "")
                                                         + (" --sweep-aiohttp" if getattr(args, "sweep_aiohttp", False) else "")])
    saved_args = {k: getattr(args, k) for k in ("rate", "duration", "repeats", "sweep", "sweep_duration")}
    def nan_to_none(v: Any) -> Any:  # strict JSON has no NaN
        if isinstance(v, float) and v != v:
            return None
        if isinstance(v, list):
            return [nan_to_none(x) for x in v]
        return {k: nan_to_none(x) for k, x in v.items()} if isinstance(v, dict) else v

    args.out.with_suffix(".json").write_text(json.dumps(nan_to_none({"machine": machine, "command": cmd, "args": saved_args,
                                                                     "startup": startup, "rows": rows}), indent=1))
    main_rows = [r for r in rows if r["phase"] == "main"]

    def med(tool: str, key: str) -> float:
        # NaN (a run where some requests never reached the server) is left out.
        vals = [r[key] for r in main_rows if r["tool"] == tool and isinstance(r[key], (int, float)) and r[key] == r[key]]
        return median(vals) if vals else float("nan")

    lines = [
        "# Replay fidelity and overhead",
        "",
        f"Machine: {machine}. Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "Server: `replay.fast_server` (16 tokens streamed 1 ms apart, no model), its own process.",
        "Trace: Poisson arrivals, prompt 64 / output 16 tokens, the same for every client.",
        "Lag at the server: arrival at the server minus trace time, offset so the earliest request is on",
        "time (the same measurement for every client). Client lag: `dispatch_s - arrival_s` from `replay run`'s results;",
        "`replay run` stamps `dispatch_s` right before `transport.write` of the request bytes (its h1stream client,",
        "called synchronously at the deadline); the aiohttp client (before) stamps it when the request's task starts,",
        "before aiohttp builds and writes the request, so its client lag understates its true lag.",
        "CPU/request: the client process's CPU (user+sys), minus a 20-request run's (start-up), per extra request.",
        "",
        f"## At {args.rate:g} req/s for {args.duration:g} s (median of {args.repeats} runs)",
        "",
        "| client | ok / sent | p99 lag at server (ms) | p50 lag at server (ms) | p99 client lag (ms) | achieved / trace rate | CPU ms / request | machine load (1-min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in tools:
        oks = [r["ok"] for r in main_rows if r["tool"] == t]
        n = main_rows[[r["tool"] for r in main_rows].index(t)]["n"]
        ok = f"{min(oks)}-{max(oks)}" if min(oks) != max(oks) else str(oks[0])
        client = f"{med(t, 'client_lag_p99_ms'):.3f}" if t in REPLAY_TOOLS else "n/a"
        lines.append(f"| `{LABEL.get(t, t)}` | {ok} / {n} | {med(t, 'server_lag_p99_ms'):.3f} | "
                     f"{med(t, 'server_lag_p50_ms'):.3f} | {client} | {med(t, 'achieved_rate_ratio'):.4f} | "
                     f"{med(t, 'cpu_ms_per_request'):.3f} | {med(t, 'loadavg_1m'):.1f} |")
    lag99, ratio = med("replay", "client_lag_p99_ms"), med("replay", "achieved_rate_ratio")
    lines += ["", f"Targets for `replay run`: p99 dispatch lag <= 1 ms: {'met' if lag99 <= 1.0 else 'NOT met'} "
              f"({lag99:.3f} ms on the client, {med('replay', 'server_lag_p99_ms'):.3f} ms at the server); "
              f"achieved rate within 1%: {'met' if abs(ratio - 1) <= 0.01 else 'NOT met'} ({ratio:.4f}). "
              f"Read them with the machine load beside them: the client, the server and other jobs share two cores."]
    for base in ("replay-aiohttp", "vllm bench serve"):
        if base in tools:
            lines += ["", f"`replay run` / `{LABEL.get(base, base)}`: CPU per request "
                      f"{med('replay', 'cpu_ms_per_request') / med(base, 'cpu_ms_per_request'):.2f}; "
                      f"p99 server-side lag {med('replay', 'server_lag_p99_ms') / med(base, 'server_lag_p99_ms'):.2f}"
                      + (f"; p99 client lag {med('replay', 'client_lag_p99_ms') / med(base, 'client_lag_p99_ms'):.2f}"
                         if base in REPLAY_TOOLS else "") + "."]
    lines += ["", f"## Pushing the rate ({args.sweep_duration:g} s per rate, one run each)", "",
              "| rate (req/s) | client | ok / sent | p99 lag at server (ms) | p99 client lag (ms) | achieved / trace rate | CPU ms / request | machine load (1-min) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["phase"] != "sweep":
            continue
        client = _num(r["client_lag_p99_ms"], 3) if r["tool"] in REPLAY_TOOLS else "n/a"
        lines.append(f"| {r['rate']:g} | `{LABEL.get(r['tool'], r['tool'])}` | {r['ok']} / {r['n']} | "
                     f"{_num(r['server_lag_p99_ms'], 3)} | {client} | {_num(r['achieved_rate_ratio'], 4)} | {r['cpu_ms_per_request']:.3f} | {r['loadavg_1m']:.1f} |")
    degraded = [r["rate"] for r in rows if r["tool"] == "replay"
                and not (r["client_lag_p99_ms"] <= 1.0 and (r["achieved_rate_ratio"] or 0.0) >= 0.99)]
    lines += ["", "First rate where `replay run` degrades (p99 client lag > 1 ms or rate short by > 1%): "
              + (f"{min(degraded):g} req/s." if degraded else "none of those measured.")]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
