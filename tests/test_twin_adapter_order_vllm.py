"""The twin's adapter slots against a real vLLM server (CPU): the slot loads the step
plugin captured, step by step, are the ones `twin.scheduler.AdapterSlots` gives for the
same batches.

8 adapters, 4 GPU slots, a CPU cache of 6: the batch is mostly full, adapters come and
go, and a new adapter often evicts one of its own batch, which vLLM loads again in the
same step (the twin gave one load per new adapter before it modelled this).

vLLM's worker walks the batch in the iteration order of a Python set of `LoRARequest`s,
which hash by adapter name. The server runs with a fixed PYTHONHASHSEED, and the
adapters are named so that their hashes modulo 8 differ: a set of up to 4 of them
(8 hash slots) then iterates in that order whatever the set, so that order is a fixed
key per adapter, as `AdapterSlots(order=...)` takes it. The adapters are registered at
start-up (`--lora-modules`), which loads them into the caches in that order: the twin
starts from the same state (`AdapterSlots.preload`)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from vllm_support import VLLM_PYTHON, VllmServer

from tracekit import schema
from twin.scheduler import AdapterSlots

pytestmark = pytest.mark.vllm

HASH_SEED = "1234"
MAX_LORAS, MAX_CPU_LORAS, N_ADAPTERS = 4, 6, 8
WAVES, WAVE = 6, 60


def names_by_hash_slot() -> dict[str, int]:
    """8 adapter names whose str hashes (under HASH_SEED, in vLLM's Python) fall in
    distinct slots of an 8-slot set table: name -> slot."""
    script = (
        "import json\nslots = {}\ni = 0\n"
        "while len(slots) < 8:\n"
        "    name = f'lora-{i}'\n    slots.setdefault(hash(name) & 7, name)\n    i += 1\n"
        "print(json.dumps({n: s for s, n in slots.items()}))\n"
    )
    out = subprocess.run([str(VLLM_PYTHON), "-c", script], env={"PYTHONHASHSEED": HASH_SEED},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


async def send(url: str, names: list[str]) -> None:
    """Waves of requests sent at once, each after the last one is done (so the load does
    not depend on the machine's speed), adapters at random, outputs of 2..40 tokens: the
    batch fills its 4 adapters, and they change whenever one's last request finishes."""
    rng = random.Random(0)

    async def one(s: aiohttp.ClientSession, name: str, plen: int, max_tokens: int) -> None:
        body = {"model": name, "prompt": [rng.randint(10, 2000) for _ in range(plen)], "max_tokens": max_tokens,
                "ignore_eos": True}  # fmt: skip
        async with s.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, (await resp.read())[:300]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for _ in range(WAVES):
            wave = [(rng.choice(names), rng.randint(8, 60), rng.randint(2, 40)) for _ in range(WAVE)]
            await asyncio.gather(*(one(s, *r) for r in wave))


def test_slot_loads_match_a_real_server(tmp_path: Path, tiny_model: Path, tiny_adapters: dict[str, Path]) -> None:
    slot_of = names_by_hash_slot()
    names = sorted(slot_of)
    folders = list(tiny_adapters.values())
    adapters = {name: folders[i % len(folders)] for i, name in enumerate(names)}  # registration order
    steps_dir = tmp_path / "steps"
    env = {"TRACEKIT_STEPS_DIR": str(steps_dir), "TRACEKIT_STEPS_FLUSH_S": "1", "PYTHONHASHSEED": HASH_SEED}
    with VllmServer(tiny_model, adapters, max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS, max_num_seqs=16,
                    env=env, extra_args=["--no-enable-prefix-caching"]) as srv:  # fmt: skip
        asyncio.run(send(srv.url, names))
        time.sleep(2.5)  # > TRACEKIT_STEPS_FLUSH_S: the plugin's parts are on disk
    steps, _ = schema.read(steps_dir, "steps")
    batches = [set(b) for b in steps["active_adapters"].to_list()]
    captured = [list(x) for x in steps["loaded_adapters"].to_list()]
    assert max(len(b) for b in batches) == MAX_LORAS

    index = {name: i for i, name in enumerate(names)}
    slots = AdapterSlots(MAX_LORAS, MAX_CPU_LORAS, order=[slot_of[n] for n in names])
    slots.preload([index[n] for n in adapters])
    prev: set[str] = set()
    twin = []
    for step, batch in enumerate(batches):
        for name in prev - batch:
            slots.last_used[index[name]] = step - 1
        joined = [index[n] for n in sorted(batch - prev)]
        loads = slots.activate({index[n]: 1 for n in batch}, joined, step)
        twin.append([names[a] for a, _ in loads])
        prev = batch

    # Loads of an adapter that was in the previous batch and stays in this one: evicted
    # within the step by a new adapter. They happen on the real server...
    again = sum(len([a for a in cap if a in before and a in now])
                for cap, before, now in zip(captured, [set()] + batches, batches, strict=False))  # fmt: skip
    assert again >= 3, f"only {again} in-step reloads: the traffic did not contend for slots"
    # ... and the twin gives every step's loads, in vLLM's order.
    mismatched = [(i, twin[i], captured[i]) for i in range(len(batches)) if twin[i] != captured[i]]
    assert not mismatched, f"{len(mismatched)} of {len(batches)} steps differ, first: {mismatched[:3]}"
    assert sum(map(len, twin)) == int(steps["adapter_loads"].sum())
    print(f"{len(batches)} steps, {sum(map(len, captured))} slot loads of which {again} in-step reloads")
