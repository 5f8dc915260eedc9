"""The twin's scheduler: vLLM V1's `Scheduler.schedule()` decisions, with LoRA.

One scheduler for everything that needs vLLM's decisions: serving (`twin.engine`), its
fast-forward over decode-only stretches (`decode_stretch` / `advance`, which decide with
the same admission rule as a normal step) and the step-time fitting from benchmark runs
(`twin.microbench`). Read it next to `vllm/v1/core/sched/scheduler.py`; the order of
decisions is the same:

1. RUNNING requests first, in running order: each gets `min(tokens it still needs,
   token_budget)` (1 for a decode, a chunk for a prefill), while `token_budget > 0`.
   KV blocks of `block_size` are allocated for the tokens scheduled; when the free blocks
   do not suffice, the request at the *tail* of `running` is preempted (recompute: its
   blocks are freed, its computed tokens reset, it goes back to the *front* of
   `waiting`), until the allocation fits or the request preempted itself.
2. Then, only if nothing was preempted this step, WAITING requests FCFS while
   `token_budget > 0` and `len(running) < max_num_seqs`: a request whose adapter would
   make more than `max_loras` distinct adapters is skipped (stays waiting, the scan
   goes on); the first request whose blocks do not fit stops the scan (`_admission`).
   With prefix caching (`enable_prefix_caching`) a request first takes the longest
   cached prefix of its prompt (`twin.kv_cache`); with `scheduler_reserve_full_isl` it
   is admitted only if blocks for its whole prompt are free, not just its first chunk.
   Which limit ended the scan while requests were left waiting is counted per step
   (`admission_blocked`).
3. Adapters of the batch must sit in GPU slots (`max_loras`, LRU); an adapter missing
   there is loaded from the CPU cache (`max_cpu_loras`, LRU), or from disk first when it
   is not cached there either. Each load adds its time to the step. The worker does this
   in set order over the batch, so a new adapter can evict one of the same batch, which
   is then loaded again (`AdapterSlots`).
4. `update` is vLLM's `update_from_output`: tokens sampled, finished requests freed. With
   `async_scheduling`, vLLM schedules step N+1 before step N's output is processed, so a
   request finishing at step N keeps its blocks and its `max_num_seqs` seat through the
   scheduling of step N+1 (`pending`, freed at the start of `update(N+1)`); a step that
   could schedule nothing but for those is scheduled again once they are freed (vLLM
   runs no batch for an empty schedule). The engine loop models the rest of async
   scheduling (arrivals seen one step later, intake overlapped with execution).

What is different, and why (speed: one simulated hour of a saturated server in seconds):

- `waiting` is one FIFO per adapter plus two heaps of their heads keyed by arrival
  order (adapters with running requests and the base model; the others), so the next
  waiting request costs O(log A); when `max_loras` adapters run, every other adapter's
  requests are skipped by looking at the first heap only -- O(1), not one skip per
  request. Requests join their adapter's FIFO implicitly once their arrival time has
  passed (a pointer into the arrival-sorted trace), so an arrival costs nothing.
- A decoding request's progress is implicit: generated tokens = step - `dbase`. The
  number of decodes that cross a block boundary this step is a histogram lookup, the
  context they hold a running sum, finishes lists by step. Only requests that change phase
  (admitted, prefill done, finished, preempted) cost Python work. When the fast check
  (everything running fits the token budget and the free blocks) fails, vLLM's running
  loop runs exactly: when only KV blocks bind and no block is shared, the preemptions
  from the tail have a closed form found by walking back from the tail over the few
  victims (`_preempt_for_blocks`); else request by request.
- The `max_loras` check counts the adapters of every running request (vLLM counts those
  scheduled this step). They differ only when the token budget cuts the running list,
  and then the budget is spent, so no waiting request is looked at: the same admissions.
- With async scheduling a request finished in the previous step is never chosen for
  preemption (vLLM may pick it as the tail of `running` and free its blocks a step early).

Not modelled: speculative decoding, priority scheduling, long_prefill_token_threshold,
the KV watermark (0 by default), KV connectors. KV capacity is the profile's, less vLLM's
null block.

Adapter-load cost (our choice, documented): `profile.adapter_load_s(rank, max_lora_rank)`
is the CPU->GPU slot load the paper measured. An adapter also missing from the CPU cache
is read from disk first; that costs `adapter_load.cpu_miss_factor` (default 2.0) times
the slot load on top, so a full miss costs 3x a GPU-slot miss.
"""

from __future__ import annotations

import bisect
import heapq
from array import array
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Protocol

import numpy as np
from librt.vecs import append as vec_append
from librt.vecs import vec
from mypy_extensions import i64

from twin.kv_cache import BlockPool

BASE = -1  # adapter index of base-model requests (no LoRA)
DEFAULT_CPU_MISS_FACTOR = 2.0
# From this many running requests up, a step where only KV blocks bind finds its
# preemptions from the tail in closed form (`_preempt_for_blocks`) rather than by vLLM's
# loop. Tests set it very high to check that both ways give the same schedule.
FAST_PREEMPT_MIN_RUNNING = 8
# The limits that can end the waiting scan with requests left waiting, in the order vLLM
# checks them (the keys of summary["admission_blocked"]).
BLOCK_REASONS = ("max_num_batched_tokens", "max_num_seqs", "kv_blocks", "max_loras")
TOKENS, SEQS, KV, LORAS = range(4)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def int_array(values: Sequence[int] | np.ndarray) -> array:
    """Per-request integers as an `array.array` (one that grows: `add_request`): built
    from numpy in one copy (a list of a million ints costs ten times more), and read back
    as plain ints in the loop."""
    if isinstance(values, np.ndarray):
        return array("q", values.astype(np.int64, copy=False).tobytes())
    return array("q", values)


# Per-request outcome columns (int32: first-token step, end step, cached tokens) and the
# valid-request prefix sums of a fixed-size run: a memoryview of a numpy array, read
# and written as plain ints as fast as an `array.array`, but sharing the caller's array
# (no copy) and, for state, allocated as numpy does (zero pages left untouched until a
# request is admitted, huge pages): a million requests' set-up cost a tenth of a second
# of page faults as arrays. A coupled fleet's engine, which appends, keeps arrays. The
# columns the step loop reads most are `vec[i64]` instead (`int_vec`).
IntColumn = array | memoryview


def int_vec(values: Sequence[int] | np.ndarray) -> vec[i64]:
    """The per-request integers the step loop reads and writes most (lengths, adapter,
    progress), as a native vector (`librt.vecs`): the compiled loop reads and writes its
    items unboxed, ten times faster than a memoryview's, which makes a Python int per
    read. Built from numpy in one copy; grown (a coupled fleet's engine) by `vec_append`."""
    return vec[i64](np.ascontiguousarray(values, dtype=np.int64).data)


def vec_column(v: vec[i64]) -> np.ndarray:
    """A read-only numpy view of `v`."""
    return np.frombuffer(memoryview(v), dtype=np.int64) if len(v) else np.zeros(0, np.int64)


def int_view(values: Sequence[int] | np.ndarray, dtype: type = np.int64) -> memoryview:
    """`values` as a memoryview of integers (the caller's array when it has an integer
    dtype and is contiguous)."""
    a = np.asarray(values)
    if a.dtype.kind not in "iu":
        a = a.astype(dtype)
    return np.ascontiguousarray(a).data


def _column(n: int, fill: int, dtype: type, growable: bool) -> IntColumn:
    """A per-request state column of `n` entries equal to `fill`."""
    if growable:
        return array("q" if dtype is np.int64 else "i", [fill]) * n
    return (np.zeros(n, dtype) if fill == 0 else np.full(n, fill, dtype)).data


def _entry(key: int, q: int, num_queues: int) -> int:
    """A `WaitingQueue` heap entry: (key, queue) as one int, ordered as the pair (queues
    are numbered below `num_queues`); `divmod(entry, num_queues)` reads it back."""
    return key * num_queues + q


class PrefixUnits(Protocol):
    """Request r's prefix units: (keys, engine-block ends); `twin.kv_cache.PrefixKeys`,
    or a coupled fleet engine's view of it (`twin.cosim`)."""

    def of(self, r: int) -> tuple[list[int], list[int]]: ...


class WaitingQueue:
    """vLLM's `waiting` queue (FCFS by arrival, preempted requests at the front), kept
    as one FIFO per adapter and two heaps of (key of head, queue): queues of adapters
    with running requests (and the base model's), and the others.

    When `max_loras` adapters are running, vLLM skips every waiting request of any other
    adapter; here that is "look only at the first heap", O(1) instead of one skip per
    request. Otherwise the next waiting request is the smaller of the two heads.

    Keys: a request's index in arrival order; a preempted request gets a negative key
    that decreases with each preemption, so the latest preempted is the global front.
    A heap entry is one int, `key * num_queues + q` (ordered as the pair (key, q), and
    an int compares and sifts faster than a tuple). Entries are checked lazily: one is
    stale when its key is no longer the head's or its queue moved to the other heap."""

    def __init__(self, reqs: vec[i64], starts: np.ndarray, counts: np.ndarray):
        """Queue q holds `reqs[starts[q]:starts[q] + counts[q]]` (request ids, arrival
        order); the last queue is the base model's, always admissible."""
        self.num_queues = len(starts)
        self.base_queue = self.num_queues - 1
        self._setup(reqs, starts, counts)

    @classmethod
    def for_trace(cls, adapter_idx: np.ndarray, valid: np.ndarray, num_adapters: int) -> WaitingQueue:
        """Every valid request of a trace, queued by adapter (`adapter_idx`, BASE: the
        base model's queue, number `num_adapters`)."""
        num_queues = num_adapters + 1
        # numpy's stable sort is a radix sort on 16 bits.
        small = np.int16 if num_queues < 2**15 else np.int64
        keys = np.where(adapter_idx < 0, num_adapters, adapter_idx).astype(small)
        if valid.all():
            order = np.argsort(keys, kind="stable")
        else:
            idx = np.flatnonzero(valid)
            keys = keys[idx]
            order = idx[np.argsort(keys, kind="stable")]
        counts = np.bincount(keys, minlength=num_queues)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        # Request ids grouped by queue, in arrival order (no Python int per request).
        return cls(int_vec(order), starts, counts)

    @classmethod
    def for_arrivals(cls, capacity: np.ndarray) -> WaitingQueue:
        """An empty queue that requests join as they arrive (`append`), at most
        `capacity[q]` in queue q (the last queue is the base model's): an engine of a
        coupled fleet (`twin.cosim`) takes requests as the router sends them."""
        capacity = np.asarray(capacity, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(capacity)[:-1]]).astype(np.int64)
        return cls(int_vec(np.zeros(int(capacity.sum()), dtype=np.int64)), starts, np.zeros_like(capacity))

    def append(self, q: int, r: int) -> None:
        """Request `r` (the latest arrival: keys stay in arrival order) joins queue `q`."""
        e = self._end[q]
        self._reqs[e] = r
        self._end[q] = e + 1
        if not self._front[q] and self._head[q] == e:  # the queue's new head
            heapq.heappush(self._heaps[self._admissible[q]], _entry(r, q, self.num_queues))

    def _setup(self, reqs: vec[i64], starts: np.ndarray, counts: np.ndarray) -> None:
        self._reqs = reqs
        self._head: list[int] = starts.tolist()
        self._end: list[int] = (starts + counts).tolist()
        self._front: list[deque[tuple[int, int]]] = [deque() for _ in range(self.num_queues)]
        self._admissible = [False] * self.num_queues
        self._admissible[self.base_queue] = True
        self._heaps: tuple[list[int], list[int]] = ([], [])
        nq = self.num_queues
        for q in range(nq):
            if counts[q] > 0:
                self._heaps[self._admissible[q]].append(_entry(self._reqs[self._head[q]], q, nq))
        for h in self._heaps:
            heapq.heapify(h)
        self._prepend_key = 0
        self.num_front = 0  # preempted requests waiting
        self.num_taken = 0  # requests admitted for the first time
        self.version = 0  # bumped by every change of heads or heaps (not by arrivals)

    def _head_key(self, q: int) -> int | None:
        front = self._front[q]
        if front:
            return front[0][0]
        h = self._head[q]
        return self._reqs[h] if h < self._end[q] else None

    def _top(self, which: bool) -> tuple[int, int] | None:
        heap = self._heaps[which]
        admissible, fronts, heads, ends, reqs = self._admissible, self._front, self._head, self._end, self._reqs
        nq = self.num_queues
        while heap:
            key, q = divmod(heap[0], nq)  # `_entry` read back
            # The queue's current head key (inlined `_head_key`: this is the hot path).
            front = fronts[q]
            head_key: int | None
            if front:
                head_key = front[0][0]
            else:
                h = heads[q]
                head_key = reqs[h] if h < ends[q] else None
            if admissible[q] is not which or key != head_key:
                heapq.heappop(heap)  # stale entry
                continue
            return key, q
        return None

    def peek(self, num_arrived: int, running_only: bool) -> tuple[int, int] | None:
        """(queue, request) of the first waiting request that has arrived, or None.
        `running_only`: only adapters with running requests and the base model."""
        best = self._top(True)
        if not running_only:
            other = self._top(False)
            if other is not None and (best is None or other[0] < best[0]):
                best = other
        if best is None or best[0] >= num_arrived:
            return None
        key, q = best
        front = self._front[q]
        return q, (front[0][1] if front else key)

    def set_running(self, q: int, running: bool) -> None:
        """Queue `q`'s adapter gained its first / lost its last running request."""
        if q == self.base_queue or self._admissible[q] is running:
            return
        self.version += 1
        self._admissible[q] = running
        key = self._head_key(q)
        if key is not None:
            heapq.heappush(self._heaps[running], _entry(key, q, self.num_queues))

    def pop(self, q: int) -> None:
        """Take the head of queue `q` (just returned by `peek`)."""
        self.version += 1
        front = self._front[q]
        if front:
            taken = front.popleft()[0]
            self.num_front -= 1
        else:
            taken = self._reqs[self._head[q]]
            self._head[q] += 1
            self.num_taken += 1
        heap = self._heaps[self._admissible[q]]
        nq = self.num_queues
        # The taken head's entry is normally its heap's top (`peek` just returned it):
        # replace it by the new head's in one sift rather than push now and pop it stale.
        top = bool(heap) and heap[0] == _entry(taken, q, nq)
        if front:
            key = front[0][0]
        else:
            h = self._head[q]
            if h >= self._end[q]:
                if top:
                    heapq.heappop(heap)
                return
            key = self._reqs[h]
        if top:
            heapq.heapreplace(heap, _entry(key, q, nq))
        else:
            heapq.heappush(heap, _entry(key, q, nq))

    def prepend(self, q: int, req: int) -> None:
        """A preempted request goes back to the front of `waiting`."""
        self.version += 1
        self._prepend_key -= 1
        self._front[q].appendleft((self._prepend_key, req))
        self.num_front += 1
        heapq.heappush(self._heaps[self._admissible[q]], _entry(self._prepend_key, q, self.num_queues))

    def next_key(self, q: int) -> int | None:
        return self._head_key(q)

    def first_key(self) -> int | None:
        """Key of the first request in FCFS order, admissible or not, arrived or not
        (negative: a preempted one); None when no request is left to wait."""
        keys = [top[0] for top in (self._top(True), self._top(False)) if top is not None]
        return min(keys) if keys else None


def set_order_key(a: int) -> int:
    """A fixed pseudo-random 64-bit key per adapter index (splitmix64): the twin's stand-in
    for the order in which Python iterates vLLM's set of `LoRARequest`s, which hash by
    adapter name (randomised per process), so one more than another at random and the
    same way from one step to the next."""
    z = (a + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


_NEVER = -(1 << 62)  # last use of an adapter never used nor registered


class AdapterSlots:
    """GPU adapter slots (`max_loras`) and the CPU adapter cache (`max_cpu_loras`), both
    LRU, driven as vLLM's worker drives them (`LRUCacheWorkerLoRAManager._apply_adapters`,
    the same in the paper's vLLM 0.8.5 and in 0.32).

    Every step the worker walks the batch's adapters in the iteration order of a Python
    set (`set_order_key`) and, for each: reads it from disk into the CPU cache if missing
    there (evicting the CPU cache's least recently used adapter, which also leaves its GPU
    slot), then activates it in a GPU slot if missing there (evicting the least recently
    used *active* adapter), and touches it in both caches. An adapter of this batch that
    comes later in that order has not been touched yet this step, so it can be the least
    recently used one: it is evicted, and loaded again when the walk reaches it. With the
    batch holding all `max_loras` adapters, one new adapter costs on average about
    1 + max_loras / 6 slot loads, not one (checked against a real vLLM server in
    tests/test_twin_adapter_order_vllm.py).

    The LRU order is kept implicitly: an adapter in the batch was touched at the previous
    step and is touched again at this one, in set order; `last_used[a]` is the last step
    an adapter *not* in the batch was in one (the scheduler writes it when the adapter's
    last running request leaves). So the order is (step of last use, set order key), and
    the walk costs nothing in a step where no adapter joins the batch.

    `order`: a key per adapter index in place of `set_order_key` (tests: a real server's
    set order)."""

    def __init__(self, max_loras: int, max_cpu_loras: int, order: Sequence[int] | None = None):
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.gpu: dict[int, None] = {}
        self.cpu: dict[int, None] = {}
        self.last_used: dict[int, int] = {}
        # Set order key per adapter, filled on first use (`keys[a]`: a dict lookup, no call).
        self.keys = _OrderKeys(order)

    def key(self, a: int) -> int:
        return self.keys[a]

    def preload(self, adapters: Sequence[int]) -> None:
        """Adapters registered while no step runs, in this order (`/v1/load_lora_adapter`,
        `--lora-modules` at start-up): vLLM's `add_adapter` reads each into the CPU cache
        and activates it in a GPU slot, each evicting the least recently used one, so the
        last `max_cpu_loras` / `max_loras` of them stay, the first registered oldest."""
        n = len(adapters)
        for i, a in enumerate(adapters):
            for cache, size in ((self.cpu, self.max_cpu_loras), (self.gpu, self.max_loras)):
                if a not in cache:
                    if len(cache) >= size:
                        victim = min(cache, key=lambda x: (self.last_used.get(x, _NEVER), self.key(x), x))
                        del cache[victim]
                        if cache is self.cpu:
                            self.gpu.pop(victim, None)
                    cache[a] = None
            self.last_used[a] = i - n - 1  # before step 0, in registration order

    def activate(self, batch: Collection[int], joined: Sequence[int], step: int) -> list[tuple[int, int]]:
        """vLLM's worker for the batch of `step`: every adapter of `batch` ends up in a GPU
        slot. `joined`: the adapters of `batch` that were not in the batch of `step - 1`
        (the others were, and sit in GPU slots). Returns the loads in the order the worker
        does them: (adapter, 1) for a CPU -> GPU slot load, (adapter, 2) when it was read
        from disk first. An adapter may appear after a new one: evicted by it and loaded
        again in the same step."""
        gpu, cpu, keys = self.gpu, self.cpu, self.keys
        pending = [(keys[a], a) for a in joined if a not in gpu]
        if not pending:
            return []  # hits only: the walk just touches them (implicit)
        heapq.heapify(pending)
        # The eviction order, built at the first eviction: adapters of the previous batch
        # (touched at step - 1) by set order; every other one by (last use, set order).
        ev: _Evictions | None = None
        loads: list[tuple[int, int]] = []
        while pending:
            here = heapq.heappop(pending)
            a = here[1]
            if a in gpu:
                continue  # pushed twice (a joined adapter also evicted): loaded already
            miss = 1
            if a not in cpu:
                miss = 2
                if len(cpu) >= self.max_cpu_loras:
                    if ev is None:
                        ev = _Evictions(self, batch, joined, step)
                    victim = ev.pop(cpu, here)
                    del cpu[victim]
                    gpu.pop(victim, None)  # vLLM's remove_adapter deactivates it too
                    if victim in batch:
                        heapq.heappush(pending, (keys[victim], victim))
                cpu[a] = None
            if len(gpu) >= self.max_loras:
                if ev is None:
                    ev = _Evictions(self, batch, joined, step)
                victim = ev.pop(gpu, here)
                del gpu[victim]
                if victim in batch:
                    heapq.heappush(pending, (keys[victim], victim))
            gpu[a] = None
            loads.append((a, miss))
        return loads


class _OrderKeys(dict[int, int]):
    """Adapter -> set order key (`set_order_key`, or a given `order`), made on first lookup."""

    def __init__(self, order: Sequence[int] | None):
        super().__init__()
        self.order = order

    def __missing__(self, a: int) -> int:
        k = self[a] = set_order_key(a) if self.order is None else int(self.order[a])
        return k


class _Evictions:
    """The least recently used adapter of a cache while `AdapterSlots.activate` walks a
    batch, in O(log n) per eviction: the walk is at set order position `here`; adapters
    of the batch before it are touched (most recent: never evicted), the previous batch's
    adapters after it were last touched at step - 1, in set order, and every other one at
    `last_used`. Each list is built at its cache's first eviction and consumed from the
    front, since `here` only grows (adapters added to a cache meanwhile are touched ones)."""

    def __init__(self, slots: AdapterSlots, batch: Collection[int], joined: Sequence[int], step: int):
        self.slots = slots
        self.batch = batch
        # Set operations and map/zip in C, not generator expressions: a step of a fleet
        # GPU with many adapters and few slots evicts nearly every step.
        self.before_set = set(batch).difference(joined)
        before = self.before_set
        self.before = sorted(zip(map(slots.keys.__getitem__, before), before, strict=True))
        self.prev = step - 1
        # Per cache (keyed by id): [the others by (last use, key), position in them,
        # position in `before`].
        self.state: dict[int, list] = {}  # type: ignore[type-arg]

    def pop(self, cache: dict[int, None], here: tuple[int, int]) -> int:
        """The adapter to evict from `cache` (the caller deletes it)."""
        st = self.state.get(id(cache))
        if st is None:
            keys, last = self.slots.keys, self.slots.last_used
            rest = cache.keys() - self.before_set
            others = sorted(zip(map(last.get, rest, repeat(_NEVER)), map(keys.__getitem__, rest), rest, strict=True))
            st = self.state[id(cache)] = [others, 0, 0]
        others, i, j = st
        batch = self.batch
        # Skip what left the cache, and adapters of this batch the walk already touched.
        while i < len(others) and (
            others[i][2] not in cache or (others[i][2] in batch and (others[i][1], others[i][2]) <= here)
        ):
            i += 1
        before = self.before
        j = max(j, bisect.bisect_right(before, here))
        while j < len(before) and before[j][1] not in cache:
            j += 1
        cand_other = others[i] if i < len(others) else None
        cand_before = before[j] if j < len(before) else None
        if cand_before is not None and (cand_other is None or (self.prev, *cand_before) < cand_other):
            st[1], st[2] = i, j + 1
            return cand_before[1]
        assert cand_other is not None, "no adapter to evict (more adapters in the batch than slots)"
        st[1], st[2] = i + 1, j
        return cand_other[2]


class StepPlan:
    """What `schedule()` decided for one step (the twin's SchedulerOutput)."""

    __slots__ = (
        "prefills",
        "num_decodes",
        "unscheduled_decodes",
        "prefill_tokens",
        "context_tokens",
        "num_adapters",
        "rank_sum",
        "num_preempted",
        "adapter_loads",
        "adapter_load_s",
        "loaded",
        "joined",
        "batch_adapters",
        "blocked",
    )

    def __init__(self) -> None:
        self.prefills: list[tuple[int, int]] = []  # (request, tokens computed this step)
        self.num_decodes = 0
        self.unscheduled_decodes = 0
        self.prefill_tokens = 0  # prompt tokens computed (a prefix-cache hit is not)
        self.context_tokens = 0
        self.num_adapters = 0
        self.rank_sum = 0
        self.num_preempted = 0
        self.adapter_loads = 0
        self.adapter_load_s = 0.0
        self.loaded: list[int] = []
        self.joined: list[int] = []  # adapters whose first running request came in this step
        # Distinct adapters of the batch when it is not all of `running` (slow path).
        self.batch_adapters: tuple[int, ...] | None = None
        self.blocked: int | None = None  # the limit that ended the waiting scan (BLOCK_REASONS)

    @property
    def num_scheduled(self) -> int:
        return len(self.prefills) + self.num_decodes


@dataclass
class Stretch:
    """A decode-only stretch that may start at `step` (`Scheduler.decode_stretch`):
    every running request decodes, none finishes before `next_finish`, and no waiting
    request can be admitted while no arrival reaches `until_s`."""

    next_finish: int  # the step at which the first running request finishes
    until_s: float  # the earliest arrival that could let a waiting request in (inf: none)
    num_decodes: int
    ctx_base: int  # context tokens of step s: ctx_base + num_decodes * s
    num_adapters: int
    rank_sum: int
    blocked: int | None  # the limit that keeps waiting requests out (BLOCK_REASONS)


class Scheduler:
    """Running/waiting queues, KV blocks and adapter slots of one simulated vLLM engine.

    Request state (lists indexed by request, arrival order): `gen` tokens generated so
    far (for requests in prefill; decoding ones derive it from `dbase`), `computed`
    (num_computed_tokens of a request in prefill), `dbase` (a decoding request has
    generated `step - dbase` tokens at the start of `step`).

    `schedule(step, num_arrived)`: `num_arrived` is how many requests (arrival order)
    this step's scheduling sees; `arrival` their times (for `decode_stretch`)."""

    def __init__(
        self,
        *,
        prompt: Sequence[int] | np.ndarray,
        output: Sequence[int] | np.ndarray,
        adapter_idx: np.ndarray,
        valid: np.ndarray,
        adapter_rank: list[int],
        adapter_load_s: list[float],
        cpu_miss_factor: float,
        max_loras: int,
        max_cpu_loras: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        block_size: int,
        num_blocks: int,
        arrival: np.ndarray | None = None,
        enable_prefix_caching: bool = False,
        scheduler_reserve_full_isl: bool = False,
        async_scheduling: bool = False,
        prefix: PrefixUnits | None = None,
        waiting_capacity: np.ndarray | None = None,
    ):
        n = len(prompt)
        # `waiting_capacity` (per queue): requests are added as they arrive (`add_request`).
        growable = waiting_capacity is not None
        ints = int_array if growable else int_view
        self.prompt: vec[i64] = int_vec(prompt)
        self.output: vec[i64] = int_vec(output)
        self.arrival = np.zeros(n) if arrival is None else arrival
        self.adapter: vec[i64] = int_vec(adapter_idx)
        self.num_adapters = len(adapter_rank)
        self.adapter_rank = adapter_rank
        self.adapter_load_cost = adapter_load_s
        self.cpu_miss_factor = cpu_miss_factor
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.used_blocks = 0  # blocks some request holds (vLLM: not in the free queue)
        self.reserve_full_isl = scheduler_reserve_full_isl
        self.async_scheduling = async_scheduling

        self.gen: vec[i64] = int_vec(np.zeros(n, np.int64))
        self.computed: vec[i64] = int_vec(np.zeros(n, np.int64))
        self.dbase: vec[i64] = int_vec(np.zeros(n, np.int64))
        self.in_decode = bytearray(n)  # 0/1 (read most: a bytearray's items are the cheapest)
        # Step whose end produced the first token / the last one (-1: not yet), written
        # once per request, read as whole columns for the results (`columns`).
        self.first_token_step = _column(n, -1, np.int32, growable)
        self.end_step = _column(n, -1, np.int32, growable)
        # vLLM's num_cached_tokens: the prefix-cache hit at the first admission (-1: never admitted).
        self.cached_tokens = _column(n, -1, np.int32, growable)

        # `waiting_capacity` also turns on the finish log (the step of each finish, for a
        # router's count of outstanding requests).
        if waiting_capacity is not None:
            self.waiting = WaitingQueue.for_arrivals(waiting_capacity)
        else:
            self.waiting = WaitingQueue.for_trace(adapter_idx, valid, self.num_adapters)
        self.finish_log: list[int] | None = [] if growable else None
        # Valid requests among the first k (None: all are): how many have arrived.
        self._valid_upto: IntColumn | None = None if valid.all() else ints(np.concatenate([[0], np.cumsum(valid)]))
        self.running: dict[int, None] = {}  # running order = admission order
        self.prefilling: dict[int, None] = {}  # running requests still in prefill, same order
        self.num_decoding = 0
        # Decoding requests by (prompt - 1 - dbase) % block_size: those whose key equals
        # (-step) % block_size start a new KV block at `step`.
        self.block_phase = [0] * block_size
        # sum(prompt - dbase) over decoding requests: their context at `step` is that
        # sum + num_decoding * step.
        self.decode_ctx_base = 0
        # Decoding requests by the step at which they finish (stale entries are skipped
        # when read), and a heap of those steps (for the next finish of a stretch).
        self.finish_at: dict[int, list[int]] = {}
        self.finish_steps: list[int] = []
        # Adapters of running requests -> how many (BASE excluded), and their rank sum.
        self.running_adapters: dict[int, int] = {}
        self.running_rank_sum = 0
        self.adapters_version = 0  # bumped whenever the running adapter set changes
        self.slots = AdapterSlots(max_loras, max_cpu_loras)
        # Async scheduling: (request, computed tokens) finished last step, blocks and seat
        # not yet given back.
        self.pending: list[tuple[int, int]] = []

        # Prefix caching: the block pool and, per request holding blocks, the cached units
        # it holds (path order), their blocks, how many of its prompt's units it has
        # allocated, its keys, and its resumable run after a preemption.
        self.pool: BlockPool | None = None
        self.prefix = prefix
        if enable_prefix_caching:
            self.pool = BlockPool(num_blocks, self.num_adapters + 1)
            self.held_units: dict[int, list[int]] = {}
            self.held_w: dict[int, int] = {}
            self.kpos: dict[int, int] = {}
            self._keys: dict[int, tuple[list[int], list[int]]] = {}
            self.run_of: dict[int, int] = {}

        # (arrived, waiting.version, loras full) when the waiting scan last found nothing.
        self._no_waiting: tuple[int, int, bool] | None = None
        self.total_preemptions = 0
        self.total_adapter_loads = 0
        self.total_adapter_load_s = 0.0
        self.admission_blocked = [0] * len(BLOCK_REASONS)  # steps per limit (BLOCK_REASONS)
        # The last `_admission`'s blocks required less its hit blocks still in the free
        # queue: what it needs whatever evictions take of those (`_admission_blocked`).
        self._admission_floor = 0
        self.cached_tokens_total = 0  # prompt tokens taken from the prefix cache, all admissions

    def add_request(self, prompt: int, output: int, adapter: int, valid: bool) -> int:
        """A request arriving after every request already added (a coupled fleet's
        engine, `twin.cosim`; `arrival` is the caller's array, written before the loop
        runs past it); returns its index. An invalid one (too long) is kept for the
        results but never queued."""
        r = len(self.prompt)
        self.prompt = vec_append(self.prompt, prompt)
        self.output = vec_append(self.output, output)
        self.adapter = vec_append(self.adapter, adapter)
        self.gen = vec_append(self.gen, 0)
        self.computed = vec_append(self.computed, 0)
        self.dbase = vec_append(self.dbase, 0)
        for col in (self.first_token_step, self.end_step, self.cached_tokens):
            assert isinstance(col, array)  # a growable engine's columns are arrays
            col.append(-1)
        self.in_decode.append(0)
        upto = self._valid_upto
        if not valid and upto is None:
            upto = self._valid_upto = array("q", range(r + 1))
        if upto is not None:
            assert isinstance(upto, array)
            upto.append(upto[-1] + valid)
        if valid:
            self.waiting.append(self._queue(r), r)
        return r

    # --- helpers ------------------------------------------------------------------------
    def num_computed(self, r: int, step: int) -> int:
        if self.in_decode[r]:
            return self.prompt[r] + step - self.dbase[r] - 1
        return self.computed[r]

    def generated(self, r: int, step: int) -> int:
        return step - self.dbase[r] if self.in_decode[r] else self.gen[r]

    def num_waiting(self, num_arrived_valid: int) -> int:
        return num_arrived_valid - self.waiting.num_taken + self.waiting.num_front

    def columns(self) -> dict[str, np.ndarray]:
        """Per-request outcomes as numpy columns (views): first_token_step, end_step
        (-1: not reached), generated tokens of requests no longer decoding, cached_tokens
        (-1: never admitted)."""
        return {
            "first_token_step": np.asarray(memoryview(self.first_token_step)),
            "end_step": np.asarray(memoryview(self.end_step)),
            "gen": vec_column(self.gen),
            "cached_tokens": np.asarray(memoryview(self.cached_tokens)),
        }

    @property
    def num_seats(self) -> int:
        """Requests that hold a `max_num_seqs` seat (vLLM's len(running))."""
        return len(self.running) + len(self.pending)

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "admission_blocked": dict(zip(BLOCK_REASONS, self.admission_blocked, strict=True)),
        }
        if self.pool is not None:
            out["cached_prompt_tokens"] = self.cached_tokens_total
            out["evicted_cached_units"] = self.pool.evicted_units
        return out

    def _queue(self, r: int) -> int:
        a = self.adapter[r]
        return a if a != BASE else self.num_adapters

    def _add_running_adapter(self, a: int, step: int, plan: StepPlan) -> None:
        if a == BASE:
            return
        count = self.running_adapters.get(a, 0)
        self.running_adapters[a] = count + 1
        if count == 0:
            self.waiting.set_running(a, True)
            self.running_rank_sum += self.adapter_rank[a]
            self.adapters_version += 1
            plan.joined.append(a)  # slots and loads once the batch is known (`_load_adapters`)

    def _load_adapters(self, step: int, plan: StepPlan) -> None:
        """vLLM's worker puts the batch's adapters in GPU slots (`AdapterSlots.activate`);
        each load adds its time to the step."""
        for a, miss in self.slots.activate(self.running_adapters, plan.joined, step):
            cost = self.adapter_load_cost[a] * (1.0 if miss == 1 else 1.0 + self.cpu_miss_factor)
            plan.adapter_loads += 1
            plan.adapter_load_s += cost
            plan.loaded.append(a)

    def _remove_running_adapter(self, a: int, step: int) -> None:
        if a == BASE:
            return
        count = self.running_adapters[a] - 1
        if count:
            self.running_adapters[a] = count
        else:
            del self.running_adapters[a]
            self.waiting.set_running(a, False)
            self.running_rank_sum -= self.adapter_rank[a]
            self.adapters_version += 1
            self.slots.last_used[a] = step

    def _start_decode(self, r: int, step: int) -> None:
        """Request `r` finished its prefill at `step - 1` and decodes from `step` on."""
        self.in_decode[r] = True
        dbase = step - self.gen[r]
        self.dbase[r] = dbase
        self.block_phase[(self.prompt[r] - 1 - dbase) % self.block_size] += 1
        self.decode_ctx_base += self.prompt[r] - dbase
        self.num_decoding += 1
        self._finishes_at(dbase + self.output[r] - 1, r)

    def _finishes_at(self, f: int, r: int) -> None:
        bucket = self.finish_at.get(f)
        if bucket is None:
            self.finish_at[f] = [r]
            heapq.heappush(self.finish_steps, f)
        else:
            bucket.append(r)

    def _stop_decode(self, r: int, step: int) -> None:
        """Leave decode state; `gen` holds the tokens generated by the start of `step`."""
        dbase = self.dbase[r]
        self.gen[r] = step - dbase
        self.block_phase[(self.prompt[r] - 1 - dbase) % self.block_size] -= 1
        self.decode_ctx_base -= self.prompt[r] - dbase
        self.num_decoding -= 1
        self.in_decode[r] = False

    def _shift_decode(self, r: int) -> None:
        """A decoding request not scheduled this step: it does not advance."""
        dbase = self.dbase[r]
        self.block_phase[(self.prompt[r] - 1 - dbase) % self.block_size] -= 1
        self.block_phase[(self.prompt[r] - 2 - dbase) % self.block_size] += 1
        self.decode_ctx_base -= 1
        self.dbase[r] = dbase + 1
        self._finishes_at(dbase + self.output[r], r)

    # --- KV blocks ----------------------------------------------------------------------
    def _allocate(self, n: int) -> None:
        """Take `n` free blocks (the caller checked that they are free)."""
        self.used_blocks += n
        if self.pool is not None:
            self.pool.take(n)

    def _cache_units(self, r: int, full_blocks: int) -> None:
        """vLLM caches a request's blocks as soon as a scheduled chunk will fill them:
        register the prompt's units that end within `full_blocks` full blocks. A unit
        some other request cached first stays that request's; this one's copy is its own."""
        pool = self.pool
        assert pool is not None
        keys, ends = self._keys[r]
        k = self.kpos[r]
        if k >= len(keys) or ends[k] > full_blocks:
            return
        q = self._queue(r)
        cached = pool.cached[q]
        held = self.held_units[r]
        while k < len(keys) and ends[k] <= full_blocks:
            key = keys[k]
            if key not in cached:
                width = ends[k] - (ends[k - 1] if k else 0)
                held.append(pool.register(q, key, width))
                self.held_w[r] += width
            k += 1
        self.kpos[r] = k

    def _free_blocks(self, r: int, computed: int, resumable: bool) -> int:
        """Give back request `r`'s blocks (it holds cdiv(computed, block_size)); returns
        the blocks that became free (with prefix caching, shared ones stay held). vLLM
        frees tail first: the partial last block (no hash) is reused first; full blocks
        stay cached in the free queue, deepest first; after a preemption the request may
        hit its own blocks past its prompt's units again when it resumes."""
        bs = self.block_size
        total = cdiv(computed, bs)
        pool = self.pool
        if pool is None:
            self.used_blocks -= total
            return total
        full = computed // bs
        pool.free_plain += total - full
        keys, ends = self._keys[r]
        own = full - self.held_w[r]  # full blocks no other request can hit
        if own > 0:
            beyond = full - (ends[-1] if keys else 0) if resumable and self.kpos[r] == len(keys) else 0
            if beyond > 0:
                self.run_of[r] = pool.add_run(beyond, owner=r)
            if own > beyond:
                pool.add_run(own - beyond)
        freed = total - self.held_w[r]
        for uid in reversed(self.held_units[r]):
            freed += pool.release(uid)
        self.used_blocks -= freed
        self.held_units[r] = []
        self.held_w[r] = 0
        self.kpos[r] = 0
        if not resumable:
            del self._keys[r], self.held_units[r], self.held_w[r], self.kpos[r]
        return freed

    def release_pending(self) -> None:
        """Async scheduling: give back the blocks and seats of last step's finished
        requests (vLLM's update of the step in flight)."""
        for r, computed in self.pending:
            self._free_blocks(r, computed, False)
        self.pending.clear()

    def _preempt(self, r: int, step: int) -> int:
        """Preempt by recompute; returns the blocks freed."""
        del self.running[r]
        freed = self._free_blocks(r, self.num_computed(r, step), True)
        if self.in_decode[r]:
            self._stop_decode(r, step)
        else:
            del self.prefilling[r]
        self.computed[r] = 0
        # Not in this step's batch: its adapter was last used by the previous one.
        self._remove_running_adapter(self.adapter[r], step - 1)
        self.waiting.prepend(self._queue(r), r)
        self.total_preemptions += 1
        return freed

    # --- admission ----------------------------------------------------------------------
    def _admission(self, r: int, token_budget: int, free_blocks: int) -> tuple[int, int, Sequence[int], int, int] | None:
        """vLLM's check for admitting waiting request `r` (its prefix-cache hit, then
        `allocate_slots`): (tokens to compute now, new blocks, hit units, hit blocks, own
        resumable blocks hit), or None when its blocks do not fit `free_blocks`. The one
        admission rule: the waiting scan and `decode_stretch` both ask it."""
        bs = self.block_size
        num_tokens = self.prompt[r] + self.gen[r]
        pool = self.pool
        if pool is None:
            n = num_tokens if num_tokens < token_budget else token_budget
            new_blocks = cdiv(n, bs)
            required = cdiv(num_tokens, bs) if self.reserve_full_isl else new_blocks
            self._admission_floor = required
            return None if required > free_blocks else (n, new_blocks, (), 0, 0)
        keys, ends = self._keys.get(r) or self.prefix_of(r)
        # A hit leaves the last token to compute (vLLM samples from it), in whole blocks.
        max_hit = (num_tokens - 1) // bs
        uids, hit_blocks, walked = pool.lookup(self._queue(r), keys, ends, max_hit)
        evictable = pool.evictable(uids)
        own = 0
        rid = self.run_of.get(r)
        if rid is not None and walked == len(keys):
            own = min(pool.run_blocks(rid, r), max_hit - hit_blocks)
            hit_blocks += own
            evictable += own
        hit = hit_blocks * bs
        n = min(num_tokens - hit, token_budget)
        new_blocks = cdiv(hit + n, bs) - hit_blocks
        required = (cdiv(num_tokens, bs) - hit_blocks if self.reserve_full_isl else new_blocks) + evictable
        self._admission_floor = required - evictable
        return None if required > free_blocks else (n, new_blocks, uids, hit_blocks, own)

    def prefix_of(self, r: int) -> tuple[list[int], list[int]]:
        """Request `r`'s prefix units (keys, engine-block ends); none without prefix info."""
        return self.prefix.of(r) if self.prefix is not None else ([], [])

    def _admit(self, r: int, q: int, step: int, plan: StepPlan, adm: tuple[int, int, Sequence[int], int, int]) -> int:
        """Move waiting request `r` (head of queue `q`) to running with the allocation
        `_admission` found; returns the tokens scheduled."""
        n, new_blocks, uids, hit_blocks, own = adm
        self.waiting.pop(q)
        self.running[r] = None
        self.prefilling[r] = None
        hit = 0
        pool = self.pool
        if pool is not None:
            if r not in self._keys:
                self._keys[r] = self.prefix_of(r)
            for uid in uids:
                self.used_blocks += pool.touch(uid)
            rid = self.run_of.pop(r, None)
            if rid is not None:
                if own:
                    pool.take_run(rid, own)
                    self.used_blocks += own
                else:
                    pool.disown_run(rid)
            self.held_units[r] = list(uids)
            self.held_w[r] = (self._keys[r][1][len(uids) - 1] if uids else 0)
            self.kpos[r] = len(uids)
            hit = hit_blocks * self.block_size
            self.cached_tokens_total += hit
        if self.cached_tokens[r] < 0:
            self.cached_tokens[r] = hit
        self.computed[r] = hit
        self.used_blocks += new_blocks
        if pool is not None:
            pool.take(new_blocks)
            self._cache_units(r, (hit + n) // self.block_size)
        a = self.adapter[r]
        if a != BASE:
            count = self.running_adapters.get(a, 0)
            if count:
                self.running_adapters[a] = count + 1
            else:
                self._add_running_adapter(a, step, plan)  # first one: slots, loads
        plan.prefills.append((r, n))
        plan.prefill_tokens += n
        plan.context_tokens += hit + n
        return n

    # --- schedule -----------------------------------------------------------------------
    def schedule(self, step: int, num_arrived: int) -> StepPlan:
        plan = self._schedule(step, num_arrived)
        if self.pending and plan.num_scheduled == 0:
            # Async scheduling: only last step's finished requests (their seats, their
            # blocks) stood in the way. vLLM runs no batch for an empty schedule; it
            # waits for the step in flight, frees them and schedules again.
            self.release_pending()
            plan = self._schedule(step, num_arrived)
        if plan.blocked is not None:
            waiting = self.waiting
            arrived = num_arrived if self._valid_upto is None else self._valid_upto[num_arrived]
            if arrived - waiting.num_taken + waiting.num_front > 0:  # requests left waiting
                self.admission_blocked[plan.blocked] += 1
        self.total_adapter_loads += plan.adapter_loads
        self.total_adapter_load_s += plan.adapter_load_s
        return plan

    def _schedule(self, step: int, num_arrived: int) -> StepPlan:
        plan = StepPlan()
        bs = self.block_size
        token_budget = self.max_num_batched_tokens
        free_blocks = self.num_blocks - self.used_blocks
        prompt, gen, computed = self.prompt, self.gen, self.computed

        # First, schedule the RUNNING requests. Fast check: does everything fit?
        decode_blocks = self.block_phase[(-step) % bs]
        prefill_need = 0
        prefill_blocks = 0
        chunks = []  # (request, tokens it still needs): the plan's prefills if all fits
        for r in self.prefilling:
            c = computed[r]
            need = prompt[r] + gen[r] - c
            prefill_need += need
            prefill_blocks += -(-(c + need) // bs) - -(-c // bs)
            chunks.append((r, need))
        fits_budget = self.num_decoding + prefill_need <= token_budget
        if (
            fits_budget
            and decode_blocks + prefill_blocks > free_blocks
            and self.pool is None
            and len(self.running) >= FAST_PREEMPT_MIN_RUNNING
        ):
            # Only KV blocks bind: preempt the tail in one go, then schedule the rest.
            self._preempt_for_blocks(step, plan, decode_blocks + prefill_blocks - free_blocks)
            free_blocks = self.num_blocks - self.used_blocks
            decode_blocks = self.block_phase[(-step) % bs]
            prefill_need = prefill_blocks = 0
            chunks = []
            for r in self.prefilling:
                c = computed[r]
                need = prompt[r] + gen[r] - c
                prefill_need += need
                prefill_blocks += -(-(c + need) // bs) - -(-c // bs)
                chunks.append((r, need))
        if fits_budget and decode_blocks + prefill_blocks <= free_blocks:
            plan.prefills = chunks
            for r, need in chunks:
                plan.context_tokens += computed[r] + need
            plan.num_decodes = self.num_decoding
            plan.prefill_tokens = prefill_need
            plan.context_tokens += self.decode_ctx_base + self.num_decoding * step
            token_budget -= self.num_decoding + prefill_need
            self._allocate(decode_blocks + prefill_blocks)
            if self.pool is not None:
                for r in self.prefilling:
                    self._cache_units(r, (prompt[r] + gen[r]) // bs)
        else:
            token_budget = self._schedule_running_exact(step, plan)

        # Next, schedule the WAITING requests (only when nothing was preempted).
        if plan.num_preempted:
            plan.blocked = KV
        else:
            waiting = self.waiting
            free_blocks = self.num_blocks - self.used_blocks
            running_adapters = self.running_adapters
            seats = len(self.running) + len(self.pending)
            max_seqs, max_loras = self.max_num_seqs, self.max_loras
            first = True
            while True:
                if token_budget <= 0:
                    plan.blocked = TOKENS
                    break
                if seats >= max_seqs:
                    plan.blocked = SEQS
                    break
                # A request whose adapter would exceed max_loras is skipped: with
                # max_loras adapters running, only their queues (and the base
                # model's) are looked at.
                loras_full = len(running_adapters) >= max_loras
                if first:
                    first = False
                    if (num_arrived, waiting.version, loras_full) == self._no_waiting:
                        # Same arrivals, same queues as when the scan last found none.
                        plan.blocked = LORAS if loras_full else None
                        break
                head = waiting.peek(num_arrived, loras_full)
                if head is None:
                    self._no_waiting = (num_arrived, waiting.version, loras_full)
                    plan.blocked = LORAS if loras_full else None
                    break
                q, r = head
                adm = self._admission(r, token_budget, free_blocks)
                if adm is None:
                    plan.blocked = KV
                    break
                used = self.used_blocks
                token_budget -= self._admit(r, q, step, plan, adm)
                free_blocks -= self.used_blocks - used
                seats += 1

        if plan.joined:
            self._load_adapters(step, plan)
        if plan.batch_adapters is None:
            plan.num_adapters = len(self.running_adapters)
            plan.rank_sum = self.running_rank_sum
        return plan

    def _schedule_running_exact(self, step: int, plan: StepPlan) -> int:
        """vLLM's running loop when not everything fits. Returns the token budget left."""
        if len(self.running) >= FAST_PREEMPT_MIN_RUNNING:
            left = self._schedule_budget_cut(step, plan)
            if left is not None:
                return left
        return self._schedule_running_loop(step, plan)

    def _schedule_budget_cut(self, step: int, plan: StepPlan) -> int | None:
        """vLLM's running loop in closed form when the token budget cuts it and every
        request still in prefill comes after every decoding one in running order (long
        prompts chunked behind the decodes: a prefix-cached server's common step):
        each decode gets its token, the prefills the rest of the budget in order, and
        nothing is preempted when the blocks of all that fit the free blocks -- the
        same schedule as the loop, in O(prefills). Returns the token budget left; None
        when this is not such a step (the loop decides)."""
        prefilling, running = self.prefilling, self.running
        n_dec = self.num_decoding
        left = self.max_num_batched_tokens - n_dec
        if left < 0 or not all(a == b for a, b in zip(reversed(prefilling), reversed(running), strict=False)):
            return None
        bs = self.block_size
        prompt, gen, computed = self.prompt, self.gen, self.computed
        decode_blocks = self.block_phase[(-step) % bs]
        blocks = decode_blocks
        chunks: list[tuple[int, int, int]] = []  # (request, tokens, new blocks)
        for r in prefilling:
            if left <= 0:
                break
            c = computed[r]
            n = prompt[r] + gen[r] - c
            if n > left:
                n = left
            nb = -(-(c + n) // bs) - -(-c // bs)
            blocks += nb
            chunks.append((r, n, nb))
            left -= n
        if blocks > self.num_blocks - self.used_blocks:
            return None  # the loop preempts
        # Commit as the loop does: the decodes' blocks, then each prefill's chunk (its
        # blocks taken from the pool before its full blocks are cached).
        pool = self.pool
        self.used_blocks += blocks
        pending = decode_blocks
        for r, n, nb in chunks:
            pending += nb
            plan.prefills.append((r, n))
            plan.prefill_tokens += n
            plan.context_tokens += computed[r] + n
            if pool is not None:
                pool.take(pending)
                pending = 0
                self._cache_units(r, (computed[r] + n) // bs)
        if pending and pool is not None:
            pool.take(pending)
        plan.num_decodes = n_dec
        plan.context_tokens += self.decode_ctx_base + n_dec * step
        if len(chunks) < len(prefilling):
            # The batch is a strict subset of running: count its own adapters (those
            # with a request other than the prefills left out).
            adapter = self.adapter
            out: dict[int, int] = {}
            for r in list(prefilling)[len(chunks) :]:
                a = adapter[r]
                out[a] = out.get(a, 0) + 1
            batch = sorted(a for a, count in self.running_adapters.items() if count > out.get(a, 0))
            plan.batch_adapters = tuple(batch)
            plan.num_adapters = len(batch)
            plan.rank_sum = sum(self.adapter_rank[a] for a in batch)
            self.adapters_version += 1
        return left

    def _preempt_for_blocks(self, step: int, plan: StepPlan, deficit: int) -> None:
        """vLLM's running loop when every running request fits the token budget and only
        `deficit` KV blocks are missing (a saturated server's common step), in closed form.

        vLLM schedules the running requests in order and, when one's blocks do not fit,
        preempts the tail until they do (or it preempted itself). Preempting the k last
        requests lets the n - k first ones run exactly when the blocks they hold plus the
        blocks they would have needed cover `deficit`; vLLM ends with the smallest such k
        (request i needs g(i) victims, i + g(i) grows with i: the scheduled requests are
        the longest prefix that fits). So: walk back from the tail, preempting, until the
        cover reaches the deficit -- O(victims), not O(running). Without prefix caching
        only: a shared block frees nothing until its last holder goes."""
        bs = self.block_size
        prompt, gen, dbase, in_decode = self.prompt, self.gen, self.dbase, self.in_decode
        victims = []
        cover = 0
        for r in reversed(self.running):
            if cover >= deficit:
                break
            if in_decode[r]:
                nc = prompt[r] + step - dbase[r] - 1
                cover += -(-nc // bs) + (nc % bs == 0)
            else:
                cover += -(-(prompt[r] + gen[r]) // bs)  # the blocks it holds and needs
            victims.append(r)
        for r in victims:
            self._preempt(r, step)
        plan.num_preempted += len(victims)

    def _schedule_running_loop(self, step: int, plan: StepPlan) -> int:
        """vLLM's running loop request by request: token budget, block allocation and
        preemption from the tail. Returns the token budget left."""
        bs = self.block_size
        token_budget = self.max_num_batched_tokens
        free_blocks = self.num_blocks - self.used_blocks
        order = list(self.running)
        scheduled_decodes: list[int] = []
        pool = self.pool
        prompt, gen, computed, dbase, in_decode = self.prompt, self.gen, self.computed, self.dbase, self.in_decode
        # Blocks allocated but not yet taken from the pool: taking them together is the
        # same as one by one as long as nothing else touches the free queue in between
        # (a preemption's frees, a unit cached), so they are taken before those.
        pending = 0
        i = 0
        while i < len(order) and token_budget > 0:
            r = order[i]
            if in_decode[r]:
                nc = prompt[r] + step - dbase[r] - 1
                num_new_tokens = 1
            else:
                nc = computed[r]
                num_new_tokens = min(prompt[r] + gen[r] - nc, token_budget)
            new_blocks = cdiv(nc + num_new_tokens, bs) - cdiv(nc, bs)
            preempted_self = False
            while new_blocks > free_blocks:
                # The request cannot be scheduled: preempt the lowest-priority (tail).
                if pending and pool is not None:
                    pool.take(pending)
                    pending = 0
                victim = order.pop()
                free_blocks += self._preempt(victim, step)
                plan.num_preempted += 1
                if victim == r:
                    preempted_self = True
                    break
            if preempted_self:
                break
            free_blocks -= new_blocks
            self.used_blocks += new_blocks
            pending += new_blocks
            token_budget -= num_new_tokens
            plan.context_tokens += nc + num_new_tokens
            if in_decode[r]:
                scheduled_decodes.append(r)
            else:
                plan.prefills.append((r, num_new_tokens))
                plan.prefill_tokens += num_new_tokens
                if pool is not None:
                    pool.take(pending)
                    pending = 0
                    self._cache_units(r, (nc + num_new_tokens) // bs)
            i += 1
        if pending and pool is not None:
            pool.take(pending)
        # Requests the token budget did not reach stay where they are.
        for r in order[i:]:
            if self.in_decode[r]:
                self._shift_decode(r)
                plan.unscheduled_decodes += 1
        plan.num_decodes = len(scheduled_decodes)
        if i < len(order):
            # The batch is a strict subset of running: count its own adapters.
            batch = sorted({self.adapter[r] for r in order[:i]} - {BASE})
            plan.batch_adapters = tuple(batch)
            plan.num_adapters = len(batch)
            plan.rank_sum = sum(self.adapter_rank[a] for a in batch)
            self.adapters_version += 1
        return token_budget

    # --- decode-only stretches (the engine's fast-forward) ---------------------------------
    def next_finish(self, step: int) -> int | None:
        """The step at which the first running request finishes decoding (None: none is
        decoding). Skips finish lists whose requests all left or moved since."""
        steps, finish_at = self.finish_steps, self.finish_at
        running, in_decode, dbase, output = self.running, self.in_decode, self.dbase, self.output
        while steps:
            f = steps[0]
            bucket = finish_at.get(f)
            if f >= step and bucket is not None and any(
                r in running and in_decode[r] and dbase[r] + output[r] - 1 == f for r in bucket
            ):
                return f
            heapq.heappop(steps)
            finish_at.pop(f, None)
        return None

    def decode_blocks_fit(self, step: int) -> bool:
        """Whether the decodes' new KV blocks of `step` fit the free blocks (else no
        decode-only stretch can start there: the step preempts)."""
        return self.block_phase[(-step) % self.block_size] <= self.num_blocks - self.used_blocks

    def decode_stretch(self, step: int, num_arrived: int) -> Stretch | None:
        """Whether the steps from `step` on can only decode: every running request
        decodes within the token budget, nothing is pending (async), and no waiting
        request is admissible (`_admission`, the waiting scan's own rule) now or before
        an arrival at `until_s`. None: take a normal step."""
        n_dec = self.num_decoding
        if self.prefilling or self.pending or n_dec != len(self.running) or n_dec > self.max_num_batched_tokens:
            return None
        finish = self.next_finish(step)
        if finish is None:
            return None
        blocked = self._admission_blocked(step, num_arrived)
        if blocked is None:
            return None
        until_s, reason = blocked
        return Stretch(
            next_finish=finish, until_s=until_s, num_decodes=n_dec, ctx_base=self.decode_ctx_base,
            num_adapters=len(self.running_adapters), rank_sum=self.running_rank_sum, blocked=reason,
        )  # fmt: skip

    def _admission_blocked(self, step: int, num_arrived: int) -> tuple[float, int | None] | None:
        """(earliest arrival time that could change it, limit) if no waiting request can
        be admitted at `step` nor at any later step of a decode-only stretch that
        starts now (inf: only a finish can); None when a request is admissible now. The
        checks are the waiting scan's, in its order."""
        inf = float("inf")
        budget = self.max_num_batched_tokens - self.num_decoding
        if budget <= 0:
            return inf, TOKENS  # the decodes take the whole token budget
        if self.num_seats >= self.max_num_seqs:
            return inf, SEQS  # only a finish can free a seat
        free = self.num_blocks - self.used_blocks - self.block_phase[(-step) % self.block_size]
        loras_full = len(self.running_adapters) >= self.max_loras
        head = self.waiting.peek(num_arrived, loras_full)
        if head is not None:
            if self._admission(head[1], budget, free) is not None:
                return None
            # Blocked now. Free blocks only shrink during the stretch, but the decodes'
            # new blocks may evict cached free blocks the head would hit, and that can
            # shrink what it needs by more than the blocks taken (a trace's prefix unit
            # spans several engine blocks: one evicted block drops the unit's hit). What
            # it needs never falls below its requirement less those hit blocks: blocked
            # for the whole stretch only if even that does not fit (a property test
            # found a stretch that skipped an admission).
            return (inf, KV) if self._admission_floor > free else None
        # Nothing admissible has arrived: the next arrival that would be admissible.
        head = self.waiting.peek(len(self.prompt) + 1, loras_full)
        until = inf if head is None else float(self.arrival[head[1]])
        return until, (LORAS if loras_full else None)

    def stretch_blocks(self, step: int, k: int) -> tuple[int, np.ndarray]:
        """(steps from `step` whose decode blocks fit the free blocks, at most `k`;
        blocks allocated by the end of each of them, cumulative)."""
        bs = self.block_size
        steps_idx = step + np.arange(k, dtype=np.int64)
        need = np.cumsum(np.asarray(self.block_phase, dtype=np.int64)[(-steps_idx) % bs])
        k = min(k, int(np.searchsorted(need, self.num_blocks - self.used_blocks, side="right")))
        return k, need[:k]

    def advance(self, stretch: Stretch, need: Sequence[int] | np.ndarray, seen_s: Sequence[float] | np.ndarray) -> None:
        """Commit a decode-only stretch of len(need) steps: the blocks its decodes
        allocated, and the limit that kept waiting requests out in each step in which
        some were waiting (`seen_s`: the time up to which each step's scheduling saw
        arrivals)."""
        k = len(need)
        self._allocate(int(need[-1]))
        if stretch.blocked is None:
            return
        key = self.waiting.first_key()
        if key is None:
            return
        if key < 0:  # a preempted request: waiting all along
            self.admission_blocked[stretch.blocked] += k
            return
        t = float(self.arrival[key])
        before = int(np.searchsorted(seen_s, t, side="left")) if isinstance(seen_s, np.ndarray) else bisect.bisect_left(seen_s, t)
        self.admission_blocked[stretch.blocked] += k - before

    # --- update from output ---------------------------------------------------------------
    def update(self, step: int, plan: StepPlan) -> None:
        """vLLM's `update_from_output`: tokens computed and sampled, first tokens and
        finishes recorded (`first_token_step`, `end_step`), finished requests freed
        (with async scheduling, at the next step's update)."""
        if self.pending:
            self.release_pending()
        prompt, gen, computed, output = self.prompt, self.gen, self.computed, self.output
        bs = self.block_size
        finish_at = self.finish_at
        running, in_decode, dbase_of = self.running, self.in_decode, self.dbase
        phase = self.block_phase
        ctx_add = n_started = 0
        for r, n in plan.prefills:
            c = computed[r] + n
            computed[r] = c
            if c == prompt[r] + gen[r]:
                # Prefill done (first time or after a preemption): one token sampled.
                g = gen[r] + 1
                gen[r] = g
                if g == 1:
                    self.first_token_step[r] = step
                del self.prefilling[r]
                if g >= output[r]:
                    self._finish(r, step, c)
                else:
                    # `_start_decode(r, step + 1)`, inlined (the hot path).
                    in_decode[r] = 1
                    dbase = step + 1 - g
                    dbase_of[r] = dbase
                    p = prompt[r]
                    phase[(p - 1 - dbase) % bs] += 1
                    ctx_add += p - dbase
                    n_started += 1
                    f = dbase + output[r] - 1
                    bucket = finish_at.get(f)
                    if bucket is None:
                        finish_at[f] = [r]
                        heapq.heappush(self.finish_steps, f)
                    else:
                        bucket.append(r)
        bucket = finish_at.pop(step, None)
        if bucket is None:
            self.decode_ctx_base += ctx_add
            self.num_decoding += n_started
            return
        fast_free = self.pool is None and not self.async_scheduling
        adapter, running_adapters, end_step = self.adapter, self.running_adapters, self.end_step
        log = self.finish_log
        freed = 0
        # By request index, as a heap of (step, request) would give them (the order frees
        # reach the free queue).
        for r in sorted(bucket) if len(bucket) > 1 else bucket:
            if r not in running or not in_decode[r] or dbase_of[r] + output[r] - 1 != step:
                continue  # stale entry (preempted or shifted since)
            # A decode finished (`_stop_decode` + `_finish`, inlined: the hot path).
            dbase = dbase_of[r]
            p, o = prompt[r], output[r]
            gen[r] = o
            phase[(p - 1 - dbase) % bs] -= 1
            ctx_add -= p - dbase
            n_started -= 1
            in_decode[r] = 0
            del running[r]
            if fast_free:
                freed += -(-(p + o - 1) // bs)
            else:
                self._give_back(r, p + o - 1)
            end_step[r] = step
            if log is not None:
                log.append(step)
            a = adapter[r]
            if a != BASE:
                count = running_adapters[a] - 1
                if count:
                    running_adapters[a] = count
                else:
                    self._remove_running_adapter(a, step)
        self.used_blocks -= freed
        self.decode_ctx_base += ctx_add
        self.num_decoding += n_started

    def _give_back(self, r: int, computed: int) -> None:
        if self.async_scheduling:
            self.pending.append((r, computed))
        else:
            self._free_blocks(r, computed, False)

    def _finish(self, r: int, step: int, computed: int) -> None:
        del self.running[r]
        self._give_back(r, computed)
        self.end_step[r] = step
        if self.finish_log is not None:
            self.finish_log.append(step)
        self._remove_running_adapter(self.adapter[r], step)

    # --- invariants (debug mode, used by tests) -------------------------------------------
    def check_invariants(self, step: int, plan: StepPlan) -> None:
        """Slow full check after `update(step)`; raises AssertionError."""
        bs = self.block_size
        nxt = step + 1
        holders = [(r, self.num_computed(r, nxt)) for r in self.running] + list(self.pending)
        if self.pool is None:
            used = sum(cdiv(c, bs) for _, c in holders)
        else:
            pool = self.pool
            pool.check()
            assert pool.num_free() + self.used_blocks == self.num_blocks, (
                f"step {step}: free {pool.num_free()} + held {self.used_blocks} != {self.num_blocks} (a block both free and held)"
            )
            refs: dict[int, int] = {}
            used = 0
            for r, c in holders:
                units = self.held_units[r]
                assert sum(pool.unit_width[u] for u in units) == self.held_w[r] <= cdiv(c, bs), f"step {step}: request {r} units"
                used += cdiv(c, bs) - self.held_w[r]
                for u in units:
                    assert pool.unit_q[u] == self._queue(r), f"step {step}: unit {u} shared across adapters"
                    refs[u] = refs.get(u, 0) + 1
            live = {u for m in pool.cached for u in m.values()}
            for u in live:
                assert pool.unit_ref[u] == refs.get(u, 0), f"step {step}: unit {u} ref {pool.unit_ref[u]} != {refs.get(u, 0)}"
            used += sum(pool.unit_width[u] for u in refs)
        assert used == self.used_blocks, f"step {step}: blocks {self.used_blocks} != {used}"
        assert 0 <= self.used_blocks <= self.num_blocks, f"step {step}: over-allocated"
        assert plan.num_scheduled <= self.max_num_seqs, f"step {step}: > max_num_seqs"
        tokens = plan.prefill_tokens + plan.num_decodes
        assert tokens <= self.max_num_batched_tokens, f"step {step}: > max_num_batched_tokens"
        assert plan.num_adapters <= self.max_loras, f"step {step}: > max_loras adapters"
        assert self.num_seats <= self.max_num_seqs
        adapters = {self.adapter[r] for r in self.running} - {BASE}
        assert adapters == set(self.running_adapters), f"step {step}: adapter set drift"
        assert len(adapters) <= self.max_loras
        assert all(a in self.slots.gpu for a in adapters), f"step {step}: adapter not in GPU slot"
        assert len(self.slots.gpu) <= self.max_loras and len(self.slots.cpu) <= self.slots.max_cpu_loras
        dec = [r for r in self.running if self.in_decode[r]]
        assert len(dec) == self.num_decoding
        assert list(self.prefilling) == [r for r in self.running if not self.in_decode[r]]
        phase = [0] * bs
        for r in dec:
            phase[(self.prompt[r] - 1 - self.dbase[r]) % bs] += 1
            g = nxt - self.dbase[r]
            assert 1 <= g < self.output[r], f"step {step}: request {r} generated {g}"
        assert phase == self.block_phase
        assert self.decode_ctx_base == sum(self.prompt[r] - self.dbase[r] for r in dec)
        for r in self.running:
            hit = int(self.cached_tokens[r])
            assert 0 <= hit <= self.prompt[r] - 1, f"step {step}: request {r} hit {hit} tokens of {self.prompt[r]}"
