"""Capture loses nothing at a stop and passes hang-ups on (issue 10), on a real vLLM server.

Part `stop`: 48 requests of 600 output tokens (streamed and not, over three models: the
base and two adapters) in flight through `tracekit proxy --drain-timeout 5`, 16 seats on
the server; SIGTERM to the proxy 3 s after they were sent. Counted per repeat: rows on
disk, `ok` rows with their full 600 tokens, cut rows marked `unfinished`, seconds from
SIGTERM to the proxy's exit, and seconds until the server has nothing running (the cut
requests were aborted there).

Part `hangup`: 2 seats, both held by long requests; a request queued behind them
(streamed, then not) whose client hangs up: seconds until `vllm:num_requests_waiting`
is back to 0. Then a 900-token stream whose client hangs up after 5 events: seconds
until `vllm:num_requests_running` is back to 0. Through the proxy, and straight to the
server as the baseline; the gauges are polled every 10 ms.

Run (each part holds the shared lock for a few minutes):
  flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/capture_stop.py --part stop
  flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/capture_stop.py --part hangup
Writes benchmarks/results/capture_stop.{md,json} (a part keeps the other's last results).
Needs .venv-vllm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from capture_proxy_overhead import save_part  # noqa: E402
from vllm_support import (  # noqa: E402
    VllmServer,
    build_adapters,
    build_model,
    gauges,
    hang_up,
    measure_speed,
    start_proxy,
)

from tracekit import schema  # noqa: E402

RESULTS = HERE / "results"
ADAPTERS = {"a1": 8, "a2": 16, "a3": 8, "a4": 16}


async def wait_gauge(url: str, key: str, want: float, timeout: float, every: float = 0.01) -> float | None:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if (await asyncio.to_thread(gauges, url))[key] == want:
            return time.perf_counter() - t
        await asyncio.sleep(every)
    return None


# --- the stop -----------------------------------------------------------------------------------


def one_stop(srv: VllmServer, work: Path, rep: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(rep)
    models = [srv.served_model_name, "a1", "a2"]
    reqs = [{"model": models[i % 3], "max_tokens": args.tokens, "ignore_eos": True, "stream": i % 2 == 0,
             "prompt": [rng.randint(10, 2000) for _ in range(32)]} for i in range(args.requests)]
    out = work / f"stop-{rep}"
    log = work / f"proxy-stop-{rep}.log"
    proxy, url = start_proxy(srv.url, out, "--drain-timeout", str(args.drain), log=log)

    async def run() -> tuple[float, float | None]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

            async def send(body: dict[str, Any]) -> None:
                try:
                    async with s.post(url + "/v1/completions", json=body) as r:
                        await r.read()
                except aiohttp.ClientError:
                    pass  # cut by the stop

            tasks = [asyncio.create_task(send(b)) for b in reqs]
            await asyncio.sleep(args.stop_after)
            t = time.perf_counter()
            proxy.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proxy.wait, args.drain + 60)
            gone = time.perf_counter() - t
            await asyncio.gather(*tasks)
            idle = await wait_gauge(srv.url, "running", 0, timeout=30)
            return gone, idle

    try:
        gone, idle = asyncio.run(run())
    finally:
        if proxy.poll() is None:
            proxy.kill()
    df, _ = schema.read(out, "results")
    ok = df.filter(df["status"] == "ok")
    cut = df.filter(df["status"] == "unfinished")
    res = {
        "repeat": rep, "sent": len(reqs), "rows": df.height, "unique_ids": df["request_id"].n_unique(),
        "ok": ok.height, "ok_full_tokens": int((ok["generated_tokens"] == args.tokens).sum()),
        "cut": cut.height, "cut_marked": int(cut["error"].str.contains("drain").sum()),
        "other": df.height - ok.height - cut.height, "proxy_exit_s": gone, "server_idle_after_s": idle,
        "exit_code": proxy.returncode, **stop_phases(log.read_text(errors="replace")),
    }
    print(json.dumps(res), flush=True)
    return res


def stop_phases(summary: str) -> dict[str, float | None]:
    """The proxy's own account of its stop, from its summary table."""
    flat = " ".join(re.sub("[\u2500-\u257f]", " ", summary).split())
    m = re.search(r"drain over ([\d.]+)s, cut rows ([\d.]+)s, last part written ([\d.]+)s", flat)
    keys = ("drain_s", "cut_s", "last_part_s")
    return dict(zip(keys, (float(x) for x in m.groups()), strict=True)) if m else dict.fromkeys(keys)


def part_stop(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = build_model(size="tiny")
    adapters = build_adapters(model, ADAPTERS)
    with VllmServer(model, adapters, max_loras=2, max_cpu_loras=4, max_num_seqs=16, max_model_len=1024,
                    log_path=work / "server-stop.log") as srv:
        speed = measure_speed(srv.url, "a1", batch=16)
        runs = [one_stop(srv, work, r, args) for r in range(args.repeats)]
    return {"speed": vars(speed), "runs": runs, "params": {k: getattr(args, k) for k in
                                                          ("requests", "tokens", "drain", "stop_after", "repeats")}}


# --- hang-ups -----------------------------------------------------------------------------------


async def hangups(server: str, via: str, repeats: int, hold: int) -> dict[str, list[float | None]]:
    body = {"model": "a1", "prompt": list(range(100, 140)), "ignore_eos": True}
    out: dict[str, list[float | None]] = {"queued_stream": [], "queued_json": [], "mid_stream": []}
    async with aiohttp.ClientSession() as s:

        async def blocker() -> None:
            async with s.post(server + "/v1/completions", json={**body, "max_tokens": hold}) as r:
                await r.read()

        for _ in range(repeats):
            for stream in (True, False):
                blockers = [asyncio.create_task(blocker()) for _ in range(2)]
                assert await wait_gauge(server, "running", 2, timeout=60) is not None
                req = asyncio.create_task(s.post(via + "/v1/completions", json={**body, "max_tokens": 8, "stream": stream}))
                if await wait_gauge(server, "waiting", 1, timeout=60) is None:
                    state = ("pending" if not req.done() else "cancelled" if req.cancelled()
                             else repr(req.exception()) if req.exception() else f"HTTP {req.result().status}")
                    raise RuntimeError(f"the request via {via} never queued (repeat {len(out['mid_stream'])}, "
                                       f"stream={stream}, hold {hold} tokens): request {state}, "
                                       f"blockers done {[b.done() for b in blockers]}, gauges {gauges(server)}")
                hang_up(req)
                with_ = "queued_stream" if stream else "queued_json"
                out[with_].append(await wait_gauge(server, "waiting", 0, timeout=10))
                for b in blockers:
                    b.cancel()
                assert await wait_gauge(server, "running", 0, timeout=60) is not None
            async with s.post(via + "/v1/completions", json={**body, "max_tokens": 900, "stream": True}) as r:
                for _ in range(5):
                    await r.content.readline()
                r.close()
            out["mid_stream"].append(await wait_gauge(server, "running", 0, timeout=10))
            await asyncio.sleep(0.2)
    return out


def part_hangup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = build_model(size="tiny")
    adapters = build_adapters(model, ADAPTERS)
    with VllmServer(model, adapters, max_loras=2, max_num_seqs=2, max_model_len=2048,
                    log_path=work / "server-hangup.log") as srv:
        speed = measure_speed(srv.url, "a1", batch=2)
        hold = min(1900, max(64, int(10.0 / speed.batch_decode_s)))
        print(f"server speed {speed}; seats held for {hold} tokens", flush=True)
        proxy, url = start_proxy(srv.url, work / "hangup")
        try:
            via_proxy = asyncio.run(hangups(srv.url, url, args.repeats, hold))
            direct = asyncio.run(hangups(srv.url, srv.url, args.repeats, hold))
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(timeout=60)
    df, _ = schema.read(work / "hangup", "results")
    return {"speed": vars(speed), "proxy": via_proxy, "direct": direct, "rows": df.height,
            "rows_cancelled": int((df["status"] == "cancelled").sum()), "sent_through_proxy": 3 * args.repeats}


# --- the report ---------------------------------------------------------------------------------


def _stat(xs: list[float | None]) -> str:
    got = [x for x in xs if x is not None]
    if not got:
        return "never"
    worst = "never" if len(got) < len(xs) else f"{max(got):.3f}"
    return f"{statistics.median(got):.3f} | {worst}"


def render(data: dict[str, Any]) -> str:
    lines = ["# Capture at a stop and on client hang-ups (real vLLM, CPU)", ""]
    for part in ("stop", "hangup"):
        if part in data:
            m = data[part]["meta"]
            lines.append(f"`{part}`: `{m['command']}` ({m['date_utc']}); {m['machine']}; vLLM server dtype {m['dtype']}, "
                         f"tiny Llama with 4 LoRA adapters.")
    if "stop" in data:
        d = data["stop"]
        p, runs = d["params"], d["runs"]
        tot = {k: sum(r[k] for r in runs) for k in ("sent", "rows", "ok", "ok_full_tokens", "cut", "cut_marked", "other")}
        lines += [
            "", f"## Stop with {p['requests']} requests of {p['tokens']} tokens in flight",
            "",
            f"16 seats; requests over base, a1, a2, streamed and not; `--drain-timeout {p['drain']:g}`; SIGTERM "
            f"{p['stop_after']:g} s after sending; {p['repeats']} repeats. Server speed: "
            f"{d['speed']['decode_s'] * 1e3:.1f} ms per token alone (the load here is fixed, not sized from it).",
            "",
            "Seconds from SIGTERM: the drain's end, the cut requests' rows, the last part written (the proxy's own "
            "summary), the process gone (seen by the client).",
            "",
            "| repeat | rows / sent | ok (all with full tokens) | cut, marked | other | drain over s | "
            "cut rows s | last part s | **proxy exit s** | server idle after s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        f = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        for r in runs:
            idle = f(r["server_idle_after_s"]) if r["server_idle_after_s"] is not None else "never"
            lines.append(f"| {r['repeat']} | {r['rows']} / {r['sent']} | {r['ok']} ({r['ok_full_tokens']}) | "
                         f"{r['cut']}, {r['cut_marked']} | {r['other']} | {f(r.get('drain_s'))} | {f(r.get('cut_s'))} | "
                         f"{f(r.get('last_part_s'))} | **{r['proxy_exit_s']:.2f}** | {idle} |")
        worst_exit = max(r["proxy_exit_s"] for r in runs)
        lines += ["", f"**Total: {tot['rows']} rows for {tot['sent']} requests**; {tot['ok']} ok, "
                  f"{tot['ok_full_tokens']} of them with all {p['tokens']} tokens; {tot['cut']} cut, {tot['cut_marked']} "
                  f"marked as cut by the drain; {tot['other']} other. Proxy gone at most {worst_exit:.2f} s after "
                  f"SIGTERM (drain timeout {p['drain']:g} s)."]
    if "hangup" in data:
        d = data["hangup"]
        lines += [
            "", "## Client hang-ups", "",
            f"2 seats held by long requests; seconds from the client's hang-up until the server's gauge is back "
            f"down (polled every 10 ms, so about 10-20 ms of each figure is the polling); "
            f"{len(d['proxy']['mid_stream'])} of each. Server speed: {d['speed']['decode_s'] * 1e3:.1f} ms per token alone.",
            "",
            "| hang-up | gauge | through the proxy: **median s** | **worst s** | straight to vLLM: median s | worst s |",
            "|---|---|---|---|---|---|",
        ]
        for key, label, gauge in (("queued_stream", "queued, streamed", "waiting"),
                                  ("queued_json", "queued, not streamed", "waiting"),
                                  ("mid_stream", "mid-stream, 900-token request", "running")):
            lines.append(f"| {label} | `vllm:num_requests_{gauge}` | {_stat(d['proxy'][key])} | {_stat(d['direct'][key])} |")
        lines += ["", f"Proxy rows: {d['rows']} for {d['sent_through_proxy']} requests sent through it, "
                  f"{d['rows_cancelled']} with status `cancelled`.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["stop", "hangup"], required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--drain", type=float, default=5.0)
    ap.add_argument("--stop-after", type=float, default=3.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="capture-stop-"))
    res = part_stop(args, work) if args.part == "stop" else part_hangup(args, work)
    save_part(RESULTS, "capture_stop", args.part, res, render, "capture_stop.py")


if __name__ == "__main__":
    main()
