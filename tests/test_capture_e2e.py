"""Capture end to end on a real vLLM server (CPU): step plugin on, proxy in front.

More adapters (4) than GPU slots (max_loras=2) and than the CPU cache (max_cpu_loras=3),
so slots are contended and adapters are loaded during the run."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import polars as pl
import pytest
from vllm_support import VllmServer, measure_speed, start_proxy

from tracekit import schema

pytestmark = pytest.mark.vllm

MAX_LORAS = 2
N_REQUESTS = 320


def make_requests(n: int, adapters: list[str], seed: int = 0, rate: float = 30.0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)  # Poisson arrivals
        adapter = None if rng.random() < 0.1 else rng.choice(adapters)
        plen = rng.randint(4, 120)
        out.append({
            "i": i, "arrival": t, "adapter": adapter,
            "prompt": [rng.randint(10, 2000) for _ in range(plen)],
            "max_tokens": rng.randint(2, 24), "stream": rng.random() < 0.8,
        })  # fmt: skip
    return out


async def send_all(url: str, reqs: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """An open-loop client: each request leaves at its arrival time."""
    start = time.perf_counter()

    async def one(s: aiohttp.ClientSession, r: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, r["arrival"] - (time.perf_counter() - start)))
        body = {"model": r["adapter"] or base, "prompt": r["prompt"], "max_tokens": r["max_tokens"],
                "ignore_eos": True, "stream": r["stream"]}
        async with s.post(url + "/v1/completions", json=body) as resp:
            data = await resp.read()
            assert resp.status == 200, data[:300]
            if r["stream"]:
                assert b'"usage":{' not in data  # the proxy strips what we did not ask for
            return {"sent_at": time.perf_counter() - start, **r}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        return await asyncio.gather(*(one(s, r) for r in reqs))


def stop_proxy(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 0


def read_steps(d: Path) -> pl.DataFrame:
    df, _ = schema.read(d, "steps")
    return df


def test_capture_end_to_end(tmp_path: Path, tiny_model: Path, tiny_adapters: dict[str, Path]) -> None:
    steps_dir = tmp_path / "steps"
    cap1, cap2 = tmp_path / "capture", tmp_path / "recapture"
    env = {"TRACEKIT_STEPS_DIR": str(steps_dir), "TRACEKIT_STEPS_FLUSH_S": "1"}
    with VllmServer(tiny_model, tiny_adapters, max_loras=MAX_LORAS, max_cpu_loras=3, max_num_seqs=16,
                    env=env, extra_args=["--no-enable-prefix-caching"]) as srv:
        # 30 req/s of about 13 output tokens, or less where the server is slower: at most
        # about half of what its 16 seats serve (a CPU without AVX-512 is ~10x slower).
        speed = measure_speed(srv.url, srv.served_model_name, batch=16)
        rate = min(30.0, 0.5 * 16 / (13 * speed.batch_decode_s))
        reqs = make_requests(N_REQUESTS, sorted(tiny_adapters), rate=rate)
        time.sleep(2.5)  # the speed probe's steps reach the disk before the traffic's
        probe_steps = read_steps(steps_dir).height if list(steps_dir.glob("*.parquet")) else 0
        # 1. Traffic through the proxy.
        proxy, url = start_proxy(srv.url, cap1)
        try:
            asyncio.run(send_all(url, reqs, srv.served_model_name))
        finally:
            stop_proxy(proxy)
        time.sleep(2.5)  # > TRACEKIT_STEPS_FLUSH_S: the plugin's parts are on disk
        steps1 = read_steps(steps_dir).filter(pl.col("step") >= probe_steps)

        # 2. The captured trace replays again (through a second proxy) to the same requests.
        trace, _ = schema.read_trace(cap1)
        proxy2, url2 = start_proxy(srv.url, cap2)
        try:
            replay_capture(cap1, url2, tmp_path / "replayed.parquet")
        finally:
            stop_proxy(proxy2)
        # No wait here: the steps of the replay reach the disk through the flush at shutdown.
    steps_all = read_steps(steps_dir).filter(pl.col("step") >= probe_steps)

    # One captured row per request sent, with its adapter and token counts.
    cap, meta = schema.read(cap1, "results")
    assert cap.height == N_REQUESTS and (cap["status"] == "ok").all()
    assert cap["request_id"].n_unique() == N_REQUESTS
    sent = Counter((r["adapter"], len(r["prompt"]), r["max_tokens"]) for r in reqs)
    got = Counter(zip(cap["adapter"].to_list(), cap["prompt_tokens"].to_list(), cap["output_tokens"].to_list(), strict=True))
    assert got == sent
    assert (cap["generated_tokens"] == cap["output_tokens"]).all()
    streamed = cap.filter(pl.col("ttft_s").is_not_null())
    assert streamed.height == sum(r["stream"] for r in reqs)
    assert (streamed["ttft_s"] <= streamed["e2e_s"]).all()
    assert meta.context["base_models"] == [srv.served_model_name]

    # The engine's steps add up to exactly the tokens sent (prefix caching off, no preemption).
    assert steps1["num_preempted"].sum() == 0
    assert steps1["prefill_tokens"].sum() == sum(len(r["prompt"]) for r in reqs)
    assert steps1["decode_tokens"].sum() == sum(r["max_tokens"] - 1 for r in reqs)
    # Every batch holds at most max_loras distinct adapters; slots were contended.
    assert steps1["active_adapters"].list.len().max() <= MAX_LORAS
    assert steps1["active_adapters"].list.len().max() == MAX_LORAS
    assert steps1["adapter_loads"].sum() >= 1
    assert (steps1["duration_s"] > 0).all() and steps1["step"].is_sorted()
    ctx = schema.read_meta(steps_dir).context
    assert ctx["max_loras"] == MAX_LORAS and ctx["max_cpu_loras"] == 3 and ctx["max_num_seqs"] == 16
    assert ctx["kv_capacity_tokens"] == ctx["num_gpu_blocks"] * ctx["block_size"] > 0
    assert ctx["source"] == "vllm-plugin" and ctx["vllm_version"] == "0.32.0"
    assert schema.adapter_ranks(ctx) == {"a1": 8, "a2": 16, "a3": 8, "a4": 16}

    # The capture replays to the same request sequence: the replay sent every captured
    # request at its captured arrival time with its adapter and token counts (and got
    # them all back), and the second proxy saw exactly those requests.
    replayed, _ = schema.read(tmp_path / "replayed.parquet", "results")
    cols = ["request_id", "adapter", "prompt_tokens", "output_tokens"]
    a, b = replayed.sort("request_id"), trace.sort("request_id")
    assert a.select(cols).equals(b.select(cols))
    assert ((a["arrival_s"] - b["arrival_s"]).abs() < 1e-6).all()
    assert (replayed["generated_tokens"] == replayed["output_tokens"]).all()
    cap2_df, _ = schema.read_trace(cap2)
    key = ["adapter", "prompt_tokens", "output_tokens"]
    assert Counter(map(tuple, cap2_df.select(key).rows())) == Counter(map(tuple, trace.select(key).rows()))
    assert steps_all["prefill_tokens"].sum() == 2 * steps1["prefill_tokens"].sum()


def replay_capture(capture: Path, url: str, out: Path) -> None:
    """Replay a capture with `replay run` (the replay package's open-loop runner)."""
    r = subprocess.run(
        [sys.executable, "-c", "from replay.cli import main; main()", "run", str(capture), "--target", "vllm",
         "--url", url, "--out", str(out), "--until-done", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res, _ = schema.read(out, "results")
    assert (res["status"] == "ok").all(), json.dumps(res.filter(pl.col("status") != "ok").head(3).to_dicts(), default=str)


def test_stat_logger_fallback(tmp_path: Path, tiny_model: Path, tiny_adapters: dict[str, Path]) -> None:
    """Without the EngineCore hook (VLLM_PLUGINS keeps only the stat logger), coarser rows
    still come from vLLM's per-iteration stats, and their token counts add up."""
    steps_dir = tmp_path / "steps"
    reqs = make_requests(24, sorted(tiny_adapters), seed=3)
    for r in reqs:
        r["arrival"] /= 4
    env = {"TRACEKIT_STEPS_DIR": str(steps_dir), "TRACEKIT_STEPS_FLUSH_S": "1", "VLLM_PLUGINS": "tracekit_steps_stats"}
    with VllmServer(tiny_model, tiny_adapters, max_loras=MAX_LORAS, env=env,
                    extra_args=["--no-enable-prefix-caching", "--enable-logging-iteration-details"]) as srv:
        asyncio.run(send_all(srv.url, reqs, srv.served_model_name))
    steps, meta = schema.read(steps_dir, "steps")
    assert meta.context["source"] == "vllm-stat-logger"
    assert steps["prefill_tokens"].sum() == sum(len(r["prompt"]) for r in reqs)
    assert steps["decode_tokens"].sum() == sum(r["max_tokens"] - 1 for r in reqs)
    assert (steps["duration_s"] > 0).all()
    assert not (steps_dir / "_tracekit_engine_hook.json").exists()


@pytest.mark.parametrize("mode", ["abort", "interrupt", "drain"])
def test_steps_of_a_running_burst_survive_a_server_stop(
    tmp_path: Path, tiny_model: Path, tiny_adapters: dict[str, Path], mode: str
) -> None:
    """Stopping the server (SIGTERM) in the middle of a burst: the steps buffered in the
    EngineCore are flushed before it exits. The periodic flush is set far beyond the
    test, so any row of the burst on disk came from the flushes at shutdown (the speed
    probe's rows, written when the engine fell idle after it, are left out).

    abort: vLLM's default (`--shutdown-timeout 0`), SIGTERM to the whole process group as
    systemd sends it; vLLM would kill the EngineCore right after, so the plugin asks for
    a grace window; the workers stop too, so the running step fails and the EngineCore
    leaves through its error path. interrupt: the same with SIGINT (Ctrl-C in the server's
    terminal). drain: `--shutdown-timeout 120`, SIGTERM to the API
    server only (as `docker stop` sends it); the engine keeps stepping until the burst is
    done, and those steps are written as they come."""
    steps_dir = tmp_path / "steps"
    rng = random.Random(5)
    adapters = sorted(tiny_adapters)
    drain = ["--shutdown-timeout", "120"] if mode == "drain" else []
    srv = VllmServer(tiny_model, tiny_adapters, max_loras=MAX_LORAS, max_cpu_loras=4, max_num_seqs=2,
                     env={"TRACEKIT_STEPS_DIR": str(steps_dir), "TRACEKIT_STEPS_FLUSH_S": "3600"},
                     extra_args=["--no-enable-prefix-caching", *drain], log_path=tmp_path / "server.log").start()  # fmt: skip
    try:
        # Long requests, two at a time (about five rounds of them), keep the engine busy for
        # about 15 s (440 tokens at most: the model length), so the stop below comes
        # mid-burst: the API server, starved of CPU by the engine on a 2-core machine,
        # hands responses out in bunches seconds apart.
        speed = measure_speed(srv.url, "a1", batch=2)
        long = max(32, min(440, int(16.0 / (5 * speed.batch_decode_s))))
        reqs = [{"adapter": rng.choice(adapters), "prompt": [rng.randint(10, 2000) for _ in range(rng.randint(4, 60))],
                 "max_tokens": rng.choice([4, 8, long])} for _ in range(32)]  # fmt: skip
        time.sleep(1.5)  # the probe's steps reach the disk (idle flush) and are left out below
        probe_steps = read_steps(steps_dir).height if list(steps_dir.glob("*.parquet")) else 0
        async def burst() -> list[Any]:
            async with aiohttp.ClientSession() as s:

                async def one(r: dict[str, Any]) -> dict[str, Any]:
                    body = {"model": r["adapter"], "prompt": r["prompt"], "max_tokens": r["max_tokens"], "ignore_eos": True}
                    async with s.post(srv.url + "/v1/completions", json=body) as resp:
                        assert resp.status == 200
                        return await resp.json()

                tasks = [asyncio.create_task(one(r)) for r in reqs]
                # Stop once some requests are done and others still run.
                while sum(t.done() for t in tasks) < 4:
                    await asyncio.sleep(0.05)
                assert not all(t.done() for t in tasks)
                stop = functools.partial(srv.stop, timeout=150, group=mode != "drain",
                                         sig=signal.SIGINT if mode == "interrupt" else signal.SIGTERM)
                await asyncio.get_running_loop().run_in_executor(None, stop)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(burst())
    finally:
        srv.stop()
    # An aborted request still answers 200, with the tokens it got so far and a
    # finish_reason other than "length"; a request the server never answered raised.
    served = [x for x in results if isinstance(x, dict)]
    finished = [x for x in served if x["choices"][0]["finish_reason"] == "length"]
    assert len(finished) >= 4
    log = (tmp_path / "server.log").read_text(errors="replace")
    steps = read_steps(steps_dir).filter(pl.col("step") >= probe_steps)
    assert "tracekit: ERROR" not in log, log[-3000:]
    # Every token a client received has its step on disk: the prompt of every request that
    # produced a token, and every output token after the first (the prefill step makes
    # the first). More may be there: aborted requests' last steps.
    started = [x["usage"] for x in served if x["usage"]["completion_tokens"] >= 1]
    prefill, decode = int(steps["prefill_tokens"].sum()), int(steps["decode_tokens"].sum())
    got = (sum(u["prompt_tokens"] for u in started), sum(u["completion_tokens"] - 1 for u in started))
    if mode == "drain":  # every request ran to its end, and every step of it is on disk
        assert len(finished) == len(reqs), [x for x in results if not isinstance(x, dict)][:3]
        assert (prefill, decode) == (sum(len(r["prompt"]) for r in reqs), sum(r["max_tokens"] - 1 for r in reqs))
    else:  # the stop came mid-burst: some requests were cut short
        assert len(finished) < len(reqs)
    assert prefill >= got[0] and decode >= got[1], (prefill, decode, got, log[-4000:])
    assert steps["step"].is_sorted() and steps["active_adapters"].list.len().max() <= MAX_LORAS
