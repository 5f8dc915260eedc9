"""vLLM's adapter activation order in the twin (`twin.scheduler.AdapterSlots`), and
adapters that start loaded because the replay registered them.

The reference below is the worker's procedure written out step by step with two
OrderedDicts (vLLM's `LRUCacheWorkerLoRAManager._apply_adapters` + `add_adapter` +
`LRUCacheLoRAModelManager.activate_adapter`): for each adapter of the batch in set order,
read it into the CPU cache if missing (evicting the CPU cache's oldest, which also leaves
its GPU slot), else touch it; activate it in a GPU slot if missing (evicting the oldest
active adapter), else touch it. `AdapterSlots` keeps that order implicitly (to cost
nothing in steps where no adapter joins); it must give the same loads, step by step."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.api import ServingConfig
from twin.engine import simulate
from twin.profile import Profile
from twin.scheduler import AdapterSlots, set_order_key


def reference_loads(
    batches: Sequence[set[int]], max_loras: int, max_cpu_loras: int, key: Sequence[int], preload: Sequence[int] = ()
) -> list[list[tuple[int, int]]]:
    gpu: OrderedDict[int, None] = OrderedDict()
    cpu: OrderedDict[int, None] = OrderedDict()

    def add(a: int) -> int:
        miss = 0
        if a in cpu:
            cpu.move_to_end(a)
        else:
            miss = 2
            if len(cpu) >= max_cpu_loras:
                gone, _ = cpu.popitem(last=False)
                gpu.pop(gone, None)  # remove_adapter deactivates it
            cpu[a] = None
        if a in gpu:
            gpu.move_to_end(a)
        else:
            miss = miss or 1
            if len(gpu) >= max_loras:
                gpu.popitem(last=False)
            gpu[a] = None
        return miss

    for a in preload:
        add(a)
    out = []
    for batch in batches:
        loads = []
        for a in sorted(batch, key=lambda x: key[x]):
            miss = add(a)
            if miss:
                loads.append((a, miss))
        out.append(loads)
    return out


def twin_loads(
    batches: Sequence[set[int]], max_loras: int, max_cpu_loras: int, key: Sequence[int] | None, preload: Sequence[int] = ()
) -> list[list[tuple[int, int]]]:
    """Drive AdapterSlots as the scheduler does: `last_used` written when an adapter
    leaves the batch, `activate` with the adapters that joined."""
    slots = AdapterSlots(max_loras, max_cpu_loras, order=key)
    slots.preload(list(preload))
    prev: set[int] = set()
    out = []
    for step, batch in enumerate(batches):
        for a in prev - batch:
            slots.last_used[a] = step - 1
        joined = sorted(batch - prev)
        out.append(slots.activate(dict.fromkeys(batch, 1), joined, step))
        assert set(slots.gpu) >= batch and len(slots.gpu) <= max_loras and len(slots.cpu) <= max_cpu_loras
        assert set(slots.gpu) <= set(slots.cpu)
        prev = batch
    return out


@st.composite
def batch_sequences(draw: st.DrawFn) -> tuple[list[set[int]], int, int, list[int], list[int]]:
    n = draw(st.integers(1, 12))
    max_loras = draw(st.integers(1, 6))
    max_cpu_loras = max_loras + draw(st.integers(0, 4))
    steps = draw(st.integers(1, 40))
    batches = [
        set(draw(st.lists(st.integers(0, n - 1), max_size=max_loras, unique=True))) for _ in range(steps)
    ]
    key = draw(st.permutations(list(range(n))))
    preload = draw(st.lists(st.integers(0, n - 1), max_size=2 * n))
    return batches, max_loras, max_cpu_loras, list(key), preload


@settings(max_examples=400, deadline=None)
@given(batch_sequences())
def test_slots_follow_vllms_worker(case: tuple[list[set[int]], int, int, list[int], list[int]]) -> None:
    batches, max_loras, max_cpu_loras, key, preload = case
    assert twin_loads(batches, max_loras, max_cpu_loras, key, preload) == reference_loads(
        batches, max_loras, max_cpu_loras, key, preload
    )


def test_default_order_is_the_set_order_key() -> None:
    batches = [{0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {0, 3, 4}, {0, 1, 4}] * 3
    key = [set_order_key(a) for a in range(5)]
    assert twin_loads(batches, 3, 4, None) == reference_loads(batches, 3, 4, key)


def test_a_new_adapter_evicts_one_of_its_own_batch() -> None:
    # Full batch {x, y} (max_loras 2); x leaves and n joins. In set order n < y < x: the
    # walk reaches n first, while y (of this batch too) is not touched yet and is the
    # least recently used active adapter, so n evicts y; then y is loaded again, evicting x.
    n, y, x = 0, 1, 2
    slots = AdapterSlots(2, 3, order=[0, 1, 2])
    assert slots.activate({x: 1, y: 1}, [x, y], 0) == [(y, 2), (x, 2)]
    slots.last_used[x] = 0
    assert slots.activate({y: 1, n: 1}, [n], 1) == [(n, 2), (y, 1)]
    assert set(slots.gpu) == {n, y}
    # The other way round (x first in set order), the leaver goes and nothing else.
    slots = AdapterSlots(2, 3, order=[0, 2, 1])
    slots.activate({x: 1, y: 1}, [x, y], 0)
    slots.last_used[x] = 0
    assert slots.activate({y: 1, n: 1}, [n], 1) == [(n, 2)]


def _profile(load_ms: float) -> Profile:
    return Profile.from_dict(
        {
            "name": "test",
            "memory": {"kind": "fixed", "kv_tokens": 4096},
            "step_time": {"kind": "linear", "intercept_s": 0.1, "coef": {}},
            "adapter_load": {"base_ms": load_ms, "per_rank_ms": 0.0},
        }
    )


def _trace(rows: list[tuple[float, str, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(len(rows))],
            "arrival_s": [r[0] for r in rows],
            "adapter": [r[1] for r in rows],
            "prompt_tokens": [r[2] for r in rows],
            "output_tokens": [r[3] for r in rows],
        },
        schema={"request_id": pl.String, "arrival_s": pl.Float64, "adapter": pl.String,
                "prompt_tokens": pl.Int32, "output_tokens": pl.Int32},
    )  # fmt: skip


def test_engine_reloads_an_adapter_of_the_batch_within_the_step() -> None:
    # Name the three adapters by their place in the twin's set order: n < y < x.
    names = ["a", "b", "c"]  # adapter indices 0, 1, 2 (sorted names)
    n, y, x = (names[i] for i in sorted(range(3), key=set_order_key))
    # x and y start together (x for 3 tokens, y for 10); n waits (max_loras 2) and joins
    # when x is done: n evicts y, y is loaded again in the same step.
    tr = _trace([(0.0, x, 4, 3), (0.0, y, 4, 10), (0.0, n, 4, 2)])
    cfg = ServingConfig(max_loras=2, max_cpu_loras=3, max_lora_rank=8)
    res = simulate(tr, _profile(load_ms=10.0), cfg, record_steps=True, check_invariants=True)
    steps = res.steps.to_pydict()
    join = steps["loaded_adapters"].index([n, y])  # the step n joins: n, then y again
    assert steps["active_adapters"][join] == sorted([n, y])
    assert steps["adapter_loads"][join] == 2
    # n read from disk (3 x 10 ms), y from the CPU cache (10 ms), on top of the 100 ms step.
    assert steps["duration_s"][join] == pytest.approx(0.1 + 0.03 + 0.01)
    assert res.summary["adapter_loads"] == 4  # x, y at the start; n, y at the join


def test_adapters_registered_by_the_replay_start_loaded() -> None:
    # The replay registered a then b (`adapters_loaded`, in that order): vLLM read both
    # into the CPU cache and activated each in a GPU slot, so with one slot b is active
    # and a is in the CPU cache.
    tr = _trace([(0.0, "b", 4, 2), (1.0, "a", 4, 2)])
    cfg = ServingConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=8)
    prof = _profile(load_ms=10.0)
    ctx = {"adapters_loaded": {"a": "/lora/a", "b": "/lora/b"}}
    res = simulate(tr, prof, cfg, trace_context=ctx, record_steps=True, check_invariants=True)
    steps = res.steps.to_pydict()
    assert steps["loaded_adapters"] == [[], [], ["a"], []]
    assert steps["adapter_load_s"] == pytest.approx([0.0, 0.0, 0.01, 0.0])  # a: a CPU hit
    cold = simulate(tr, prof, cfg, record_steps=True).steps.to_pydict()
    assert cold["adapter_load_s"] == pytest.approx([0.03, 0.0, 0.03, 0.0])  # both from disk
    # An adapter registered but absent from the trace still takes its slot: here it is
    # the last one registered, so b starts in the CPU cache only.
    ctx = {"adapters_loaded": {"a": "/lora/a", "b": "/lora/b", "z": "/lora/z"}}
    res = simulate(tr, prof, ServingConfig(max_loras=1, max_cpu_loras=3, max_lora_rank=8), trace_context=ctx,
                   record_steps=True)  # fmt: skip
    assert res.steps.to_pydict()["adapter_load_s"] == pytest.approx([0.01, 0.0, 0.01, 0.0])
