"""`twin calibrate` on steps captured from a real vLLM server (CPU), end to end."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from conftest import TEST_ADAPTER_RANKS
from vllm_support import VllmServer, build_adapters

from tracekit import schema
from twin.api import ServingConfig
from twin.cli import main as twin_cli
from twin.profile import load_profile


async def _send(url: str, base: str, adapters: list[str], n: int, seed: int) -> None:
    """Bursts of mixed prompts/outputs over the adapters, so steps differ in shape."""
    rng = random.Random(seed)

    async def one(s: aiohttp.ClientSession, delay: float) -> None:
        await asyncio.sleep(delay)
        body = {
            "model": rng.choice(adapters + [base]),
            "prompt": [rng.randint(10, 2000) for _ in range(rng.randint(8, 200))],
            "max_tokens": rng.randint(4, 40),
            "ignore_eos": True,
        }
        async with s.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, (await resp.read())[:300]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(one(s, rng.random() * 6.0) for _ in range(n)))


@pytest.mark.vllm
def test_calibrate_from_a_real_capture(tmp_path: Path, medium_model: Path, vllm_cache_dir: Path) -> None:
    adapters = build_adapters(medium_model, TEST_ADAPTER_RANKS, vllm_cache_dir)
    steps_dir = tmp_path / "steps"
    env = {"TRACEKIT_STEPS_DIR": str(steps_dir), "TRACEKIT_STEPS_FLUSH_S": "1"}
    with VllmServer(medium_model, adapters, max_loras=2, max_cpu_loras=4, max_num_seqs=16,
                    max_num_batched_tokens=256, env=env, extra_args=["--no-enable-prefix-caching"]) as srv:
        asyncio.run(_send(srv.url, srv.served_model_name, sorted(adapters), 80, 0))
        time.sleep(2.5)  # > TRACEKIT_STEPS_FLUSH_S
    ctx = schema.read_meta(steps_dir).context
    out = tmp_path / "cpu.json"
    t0 = time.perf_counter()
    res = CliRunner().invoke(twin_cli, ["calibrate", str(steps_dir), "--out", str(out), "--name", "cpu-medium"])
    took = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    prof = load_profile(out)
    d: dict[str, Any] = json.loads(out.read_text())
    assert d["memory"]["kv_tokens"] == ctx["kv_capacity_tokens"] > 0
    assert prof.kv_capacity_tokens(ServingConfig()) == ctx["kv_capacity_tokens"]
    assert d["captured_server_config"]["max_loras"] == 2
    assert d["fitted_from"]["steps"] >= 50
    # A real CPU server is noisy; the fitted model must still explain most of the
    # variation of held-out steps, and more tokens must cost more time.
    held = d["step_time"]["fit_error"]["held_out"]
    assert held["r2"] > 0.3, held
    c = d["step_time"]["coef"]
    assert c["prefill_tokens"] > 0 or c["decode_tokens"] > 0
    assert took < 30
