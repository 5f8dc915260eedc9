"""The twin's scheduler: vLLM V1's `Scheduler.schedule()` decisions, with LoRA.

Read it next to `vllm/v1/core/sched/scheduler.py`; the order of decisions is the same:

1. RUNNING requests first, in running order: each gets `min(tokens it still needs,
   token_budget)` (1 for a decode, a chunk for a prefill), while `token_budget > 0`.
   KV blocks of `block_size` are allocated for the tokens scheduled; when the free blocks
   do not suffice, the request at the *tail* of `running` is preempted (recompute: its
   blocks are freed, its computed tokens reset, it goes back to the *front* of
   `waiting`), until the allocation fits or the request preempted itself.
2. Then, only if nothing was preempted this step, WAITING requests FCFS while
   `token_budget > 0` and `len(running) < max_num_seqs`: a request whose adapter would
   make more than `max_loras` distinct adapters is skipped (stays waiting, the scan
   goes on); the first request whose blocks do not fit stops the scan.
3. Adapters of the batch must sit in GPU slots (`max_loras`, LRU); an adapter missing
   there is loaded from the CPU cache (`max_cpu_loras`, LRU), or from disk first when it
   is not cached there either. Each load adds its time to the step. The worker does this
   in set order over the batch, so a new adapter can evict one of the same batch, which
   is then loaded again (`AdapterSlots`).

What is different, and why (speed: one simulated hour of a saturated server in seconds):

- `waiting` is one FIFO per adapter plus two heaps of their heads keyed by arrival
  order (adapters with running requests and the base model; the others), so the next
  waiting request costs O(log A); when `max_loras` adapters run, every other adapter's
  requests are skipped by looking at the first heap only -- O(1), not one skip per
  request. Requests join their adapter's FIFO implicitly once their arrival time has
  passed (a pointer into the arrival-sorted trace), so an arrival costs nothing.
- A decoding request's progress is implicit: generated tokens = step - `dbase`. The
  number of decodes that cross a block boundary this step is a histogram lookup, the
  context they hold a running sum, finishes a heap. Only requests that change phase
  (admitted, prefill done, finished, preempted) cost Python work. When the fast check
  (everything running fits the token budget and the free blocks) fails, vLLM's running
  loop runs exactly: vectorised in numpy when only KV blocks bind (preemption from
  the tail has a closed form, see `_schedule_running_vectorized`), else request by
  request.
- The `max_loras` check counts the adapters of every running request (vLLM counts those
  scheduled this step; they differ only when the token budget cuts the running list).
  This keeps vLLM's own assertion (never more than `max_loras` adapters in a batch) true.

Not modelled (the paper's servers ran without them): prefix caching, speculative
decoding, async scheduling, priority scheduling, long_prefill_token_threshold. KV
capacity is the profile's, less vLLM's null block.

Adapter-load cost (our choice, documented): `profile.adapter_load_s(rank, max_lora_rank)`
is the CPU->GPU slot load the paper measured. An adapter also missing from the CPU cache
is read from disk first; that costs `adapter_load.cpu_miss_factor` (default 2.0) times
the slot load on top, so a full miss costs 3x a GPU-slot miss.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Collection, Sequence

import numpy as np

BASE = -1  # adapter index of base-model requests (no LoRA)
DEFAULT_CPU_MISS_FACTOR = 2.0
# Below this many running requests the per-request loop is cheaper than numpy. Tests set
# it very high to check that both ways give the same schedule.
VECTORIZED_MIN_RUNNING = 8


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class WaitingQueue:
    """vLLM's `waiting` queue (FCFS by arrival, preempted requests at the front), kept
    as one FIFO per adapter and two heaps of (key of head, queue): queues of adapters
    with running requests (and the base model's), and the others.

    When `max_loras` adapters are running, vLLM skips every waiting request of any other
    adapter; here that is "look only at the first heap", O(1) instead of one skip per
    request. Otherwise the next waiting request is the smaller of the two heads.

    Keys: a request's index in arrival order; a preempted request gets a negative key
    that decreases with each preemption, so the latest preempted is the global front.
    Heap entries are checked lazily: one is stale when its key is no longer the head's or
    its queue moved to the other heap."""

    def __init__(self, adapter_idx: np.ndarray, valid: np.ndarray, num_adapters: int):
        # Queue `num_adapters` holds base-model requests (BASE); it is always admissible.
        self.num_queues = num_adapters + 1
        self.base_queue = num_adapters
        queue_of = np.where(adapter_idx < 0, num_adapters, adapter_idx)
        idx = np.flatnonzero(valid)
        keys = queue_of[idx]
        if self.num_queues < 2**15:
            keys = keys.astype(np.int16)  # numpy's stable sort is a radix sort on 16 bits
        order = idx[np.argsort(keys, kind="stable")]
        counts = np.bincount(queue_of[idx], minlength=self.num_queues)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        # Request ids grouped by queue, in arrival order (numpy: no Python int per request).
        self._reqs: np.ndarray = order
        self._head: list[int] = starts.tolist()
        self._end: list[int] = (starts + counts).tolist()
        self._front: list[deque[tuple[int, int]]] = [deque() for _ in range(self.num_queues)]
        self._admissible = [False] * self.num_queues
        self._admissible[self.base_queue] = True
        self._heaps: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
        for q in range(self.num_queues):
            if counts[q] > 0:
                self._heaps[self._admissible[q]].append((int(self._reqs[self._head[q]]), q))
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
        return int(self._reqs[h]) if h < self._end[q] else None

    def _top(self, which: bool) -> tuple[int, int] | None:
        heap = self._heaps[which]
        admissible, fronts, heads, ends, reqs = self._admissible, self._front, self._head, self._end, self._reqs
        while heap:
            key, q = heap[0]
            # The queue's current head key (inlined `_head_key`: this is the hot path).
            front = fronts[q]
            if front:
                head_key = front[0][0]
            else:
                h = heads[q]
                head_key = int(reqs[h]) if h < ends[q] else None
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
            heapq.heappush(self._heaps[running], (key, q))

    def pop(self, q: int) -> None:
        """Take the head of queue `q` (just returned by `peek`)."""
        self.version += 1
        front = self._front[q]
        if front:
            front.popleft()
            self.num_front -= 1
        else:
            self._head[q] += 1
            self.num_taken += 1
        key = self._head_key(q)
        if key is not None:
            heapq.heappush(self._heaps[self._admissible[q]], (key, q))

    def prepend(self, q: int, req: int) -> None:
        """A preempted request goes back to the front of `waiting`."""
        self.version += 1
        self._prepend_key -= 1
        self._front[q].appendleft((self._prepend_key, req))
        self.num_front += 1
        heapq.heappush(self._heaps[self._admissible[q]], (self._prepend_key, q))

    def next_key(self, q: int) -> int | None:
        return self._head_key(q)


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
        self._order = order
        self._keys: dict[int, int] = {}

    def key(self, a: int) -> int:
        if self._order is not None:
            return int(self._order[a])
        k = self._keys.get(a)
        if k is None:
            k = self._keys[a] = set_order_key(a)
        return k

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
        gpu, cpu, key = self.gpu, self.cpu, self.key
        pending = [(key(a), a) for a in joined if a not in gpu]
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
                        heapq.heappush(pending, (key(victim), victim))
                cpu[a] = None
            if len(gpu) >= self.max_loras:
                if ev is None:
                    ev = _Evictions(self, batch, joined, step)
                victim = ev.pop(gpu, here)
                del gpu[victim]
                if victim in batch:
                    heapq.heappush(pending, (key(victim), victim))
            gpu[a] = None
            loads.append((a, miss))
        return loads


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
        joined_set = set(joined)
        self.before_set = {a for a in batch if a not in joined_set}
        key = slots.key
        self.before = sorted((key(a), a) for a in self.before_set)
        self.prev = step - 1
        # Per cache (keyed by id): [the others by (last use, key), position in them,
        # position in `before`].
        self.state: dict[int, list] = {}  # type: ignore[type-arg]

    def pop(self, cache: dict[int, None], here: tuple[int, int]) -> int:
        """The adapter to evict from `cache` (the caller deletes it)."""
        st = self.state.get(id(cache))
        if st is None:
            key, last, before = self.slots.key, self.slots.last_used, self.before_set
            others = sorted((last.get(a, _NEVER), key(a), a) for a in cache if a not in before)
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
    )

    def __init__(self) -> None:
        self.prefills: list[tuple[int, int]] = []  # (request, tokens scheduled)
        self.num_decodes = 0
        self.unscheduled_decodes = 0
        self.prefill_tokens = 0
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

    @property
    def num_scheduled(self) -> int:
        return len(self.prefills) + self.num_decodes


class Scheduler:
    """Running/waiting queues, KV blocks and adapter slots of one simulated vLLM engine.

    Request state (lists indexed by request, arrival order): `gen` tokens generated so
    far (for requests in prefill; decoding ones derive it from `dbase`), `computed`
    (num_computed_tokens of a request in prefill), `dbase` (a decoding request has
    generated `step - dbase` tokens at the start of `step`)."""

    def __init__(
        self,
        *,
        prompt: list[int],
        output: list[int],
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
    ):
        n = len(prompt)
        self.prompt = prompt
        self.output = output
        self.adapter: list[int] = adapter_idx.tolist()
        self.num_adapters = len(adapter_rank)
        self.adapter_rank = adapter_rank
        self.adapter_load_cost = adapter_load_s
        self.cpu_miss_factor = cpu_miss_factor
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.used_blocks = 0

        self.gen = [0] * n
        self.computed = [0] * n
        self.dbase = [0] * n
        self.in_decode = [False] * n
        # numpy copies of in_decode and prompt - dbase, for the vectorised running loop.
        self._dec_np = np.zeros(n, dtype=bool)
        self._pmd_np = np.zeros(n, dtype=np.int64)
        # Step whose end produced the first token / the last one (-1: not yet); numpy,
        # written once per request, read as whole columns for the results.
        self.first_token_step = np.full(n, -1, dtype=np.int64)
        self.end_step = np.full(n, -1, dtype=np.int64)

        self.waiting = WaitingQueue(adapter_idx, valid, self.num_adapters)
        self.running: dict[int, None] = {}  # running order = admission order
        self.prefilling: dict[int, None] = {}  # running requests still in prefill, same order
        self.num_decoding = 0
        # Decoding requests by (prompt - 1 - dbase) % block_size: those whose key equals
        # (-step) % block_size start a new KV block at `step`.
        self.block_phase = [0] * block_size
        # sum(prompt - dbase) over decoding requests: their context at `step` is that
        # sum + num_decoding * step.
        self.decode_ctx_base = 0
        self.finish_heap: list[tuple[int, int]] = []  # (finish step, request)
        # Adapters of running requests -> how many (BASE excluded), and their rank sum.
        self.running_adapters: dict[int, int] = {}
        self.running_rank_sum = 0
        self.adapters_version = 0  # bumped whenever the running adapter set changes
        self.slots = AdapterSlots(max_loras, max_cpu_loras)

        # (arrived, waiting.version, loras full) when the waiting scan last found nothing.
        self._no_waiting: tuple[int, int, bool] | None = None
        self.total_preemptions = 0
        self.total_adapter_loads = 0
        self.total_adapter_load_s = 0.0
        self.finished_steps: list[tuple[int, int]] = []  # (request, step) finished last update

    # --- helpers ------------------------------------------------------------------------
    def num_computed(self, r: int, step: int) -> int:
        if self.in_decode[r]:
            return self.prompt[r] + step - self.dbase[r] - 1
        return self.computed[r]

    def generated(self, r: int, step: int) -> int:
        return step - self.dbase[r] if self.in_decode[r] else self.gen[r]

    def num_waiting(self, num_arrived_valid: int) -> int:
        return num_arrived_valid - self.waiting.num_taken + self.waiting.num_front

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
        self._dec_np[r] = True
        self._pmd_np[r] = self.prompt[r] - dbase
        self.block_phase[(self.prompt[r] - 1 - dbase) % self.block_size] += 1
        self.decode_ctx_base += self.prompt[r] - dbase
        self.num_decoding += 1
        heapq.heappush(self.finish_heap, (dbase + self.output[r] - 1, r))

    def _stop_decode(self, r: int, step: int) -> None:
        """Leave decode state; `gen` holds the tokens generated by the start of `step`."""
        dbase = self.dbase[r]
        self.gen[r] = step - dbase
        self.block_phase[(self.prompt[r] - 1 - dbase) % self.block_size] -= 1
        self.decode_ctx_base -= self.prompt[r] - dbase
        self.num_decoding -= 1
        self.in_decode[r] = False
        self._dec_np[r] = False

    def _shift_decode(self, r: int) -> None:
        """A decoding request not scheduled this step: it does not advance."""
        dbase = self.dbase[r]
        self.block_phase[(self.prompt[r] - 1 - dbase) % self.block_size] -= 1
        self.block_phase[(self.prompt[r] - 2 - dbase) % self.block_size] += 1
        self.decode_ctx_base -= 1
        self.dbase[r] = dbase + 1
        self._pmd_np[r] -= 1
        heapq.heappush(self.finish_heap, (dbase + self.output[r], r))

    def _preempt(self, r: int, step: int) -> int:
        """Preempt by recompute; returns the blocks freed."""
        del self.running[r]
        freed = cdiv(self.num_computed(r, step), self.block_size)
        if self.in_decode[r]:
            self._stop_decode(r, step)
        else:
            del self.prefilling[r]
        self.computed[r] = 0
        self.used_blocks -= freed
        # Not in this step's batch: its adapter was last used by the previous one.
        self._remove_running_adapter(self.adapter[r], step - 1)
        q = self.adapter[r] if self.adapter[r] != BASE else self.num_adapters
        self.waiting.prepend(q, r)
        self.total_preemptions += 1
        return freed

    # --- schedule -----------------------------------------------------------------------
    def schedule(self, step: int, num_arrived: int) -> StepPlan:
        plan = StepPlan()
        bs = self.block_size
        token_budget = self.max_num_batched_tokens
        free_blocks = self.num_blocks - self.used_blocks
        prompt, gen, computed = self.prompt, self.gen, self.computed

        # First, schedule the RUNNING requests. Fast check: does everything fit?
        decode_blocks = self.block_phase[(-step) % bs]
        prefill_need = 0
        prefill_blocks = 0
        for r in self.prefilling:
            c = computed[r]
            need = prompt[r] + gen[r] - c
            prefill_need += need
            prefill_blocks += cdiv(c + need, bs) - cdiv(c, bs)
        if (
            self.num_decoding + prefill_need <= token_budget
            and decode_blocks + prefill_blocks <= free_blocks
        ):
            for r in self.prefilling:
                need = prompt[r] + gen[r] - computed[r]
                plan.prefills.append((r, need))
                plan.context_tokens += prompt[r] + gen[r]
            plan.num_decodes = self.num_decoding
            plan.prefill_tokens = prefill_need
            plan.context_tokens += self.decode_ctx_base + self.num_decoding * step
            token_budget -= self.num_decoding + prefill_need
            self.used_blocks += decode_blocks + prefill_blocks
        else:
            token_budget = self._schedule_running_exact(step, plan)

        # Next, schedule the WAITING requests (only when nothing was preempted).
        if not plan.num_preempted:
            waiting = self.waiting
            free_blocks = self.num_blocks - self.used_blocks
            running_adapters = self.running_adapters
            while token_budget > 0:
                if len(self.running) >= self.max_num_seqs:
                    break
                # A request whose adapter would exceed max_loras is skipped: with
                # max_loras adapters running, only their queues (and the base
                # model's) are looked at.
                loras_full = len(running_adapters) >= self.max_loras
                idle_key = (num_arrived, waiting.version, loras_full)
                if idle_key == self._no_waiting:
                    break  # same arrivals, same queues as when the scan last found none
                head = waiting.peek(num_arrived, loras_full)
                if head is None:
                    self._no_waiting = idle_key
                    break
                q, r = head
                a = self.adapter[r]
                num_new_tokens = min(prompt[r] + gen[r], token_budget)
                new_blocks = cdiv(num_new_tokens, bs)
                if new_blocks > free_blocks:
                    break
                waiting.pop(q)
                self.running[r] = None
                self.prefilling[r] = None
                computed[r] = 0
                if a != BASE:
                    count = running_adapters.get(a, 0)
                    if count:
                        running_adapters[a] = count + 1
                    else:
                        self._add_running_adapter(a, step, plan)  # first one: slots, loads
                plan.prefills.append((r, num_new_tokens))
                plan.prefill_tokens += num_new_tokens
                plan.context_tokens += num_new_tokens
                token_budget -= num_new_tokens
                free_blocks -= new_blocks
                self.used_blocks += new_blocks

        if plan.joined:
            self._load_adapters(step, plan)
        if plan.batch_adapters is None:
            plan.num_adapters = len(self.running_adapters)
            plan.rank_sum = self.running_rank_sum
        self.total_adapter_loads += plan.adapter_loads
        self.total_adapter_load_s += plan.adapter_load_s
        return plan

    def _schedule_running_exact(self, step: int, plan: StepPlan) -> int:
        """vLLM's running loop when not everything fits. Returns the token budget left."""
        if len(self.running) >= VECTORIZED_MIN_RUNNING:
            left = self._schedule_running_vectorized(step, plan)
            if left is not None:
                return left
        return self._schedule_running_loop(step, plan)

    def _schedule_running_vectorized(self, step: int, plan: StepPlan) -> int | None:
        """The running loop when every running request fits the token budget, so only
        KV blocks bind (the common case of a saturated server), in numpy.

        Request i (running order) needs `need[i]` new blocks; when the blocks free plus
        those held by the last k requests cannot cover the cumulative need up to i, the
        tail is preempted. g(i) = the fewest tail preemptions that cover request i;
        i + g(i) grows strictly with i, so the requests scheduled are exactly the
        prefix with i + g(i) <= n - 1, and the rest are preempted, tail first -- what
        vLLM's loop does one request at a time. None: the token budget binds."""
        order = list(self.running)
        n = len(order)
        idx = np.fromiter(order, dtype=np.int64, count=n)
        in_dec = self._dec_np[idx]
        nc = self._pmd_np[idx] + (step - 1)  # decoding: prompt - dbase + step - 1
        tokens = np.ones(n, dtype=np.int64)
        for i in np.flatnonzero(~in_dec).tolist():  # the few requests still in prefill
            r = order[i]
            nc[i] = self.computed[r]
            tokens[i] = self.prompt[r] + self.gen[r] - self.computed[r]
        if int(tokens.sum()) > self.max_num_batched_tokens:
            return None
        bs = self.block_size
        held = -(-nc // bs)
        need = -(-(nc + tokens) // bs) - held
        cum_need = np.cumsum(need)
        tail_held = np.cumsum(held[::-1])
        deficit = cum_need - (self.num_blocks - self.used_blocks)
        g = np.where(deficit <= 0, 0, np.searchsorted(tail_held, deficit, side="left") + 1)
        m = int(np.count_nonzero(np.arange(n) + g <= n - 1))  # requests scheduled
        for victim in reversed(order[m:]):
            self._preempt(victim, step)
            plan.num_preempted += 1
        if m == 0:
            return self.max_num_batched_tokens
        self.used_blocks += int(cum_need[m - 1])
        plan.context_tokens += int((nc[:m] + tokens[:m]).sum())
        plan.num_decodes = int(np.count_nonzero(in_dec[:m]))
        for i in np.flatnonzero(~in_dec[:m]).tolist():
            plan.prefills.append((order[i], int(tokens[i])))
            plan.prefill_tokens += int(tokens[i])
        return self.max_num_batched_tokens - plan.prefill_tokens - plan.num_decodes

    def _schedule_running_loop(self, step: int, plan: StepPlan) -> int:
        """vLLM's running loop request by request: token budget, block allocation and
        preemption from the tail. Returns the token budget left."""
        bs = self.block_size
        token_budget = self.max_num_batched_tokens
        free_blocks = self.num_blocks - self.used_blocks
        order = list(self.running)
        scheduled_decodes: list[int] = []
        i = 0
        while i < len(order) and token_budget > 0:
            r = order[i]
            if self.in_decode[r]:
                nc = self.prompt[r] + step - self.dbase[r] - 1
                num_new_tokens = 1
            else:
                nc = self.computed[r]
                num_new_tokens = min(self.prompt[r] + self.gen[r] - nc, token_budget)
            new_blocks = cdiv(nc + num_new_tokens, bs) - cdiv(nc, bs)
            preempted_self = False
            while new_blocks > free_blocks:
                # The request cannot be scheduled: preempt the lowest-priority (tail).
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
            token_budget -= num_new_tokens
            plan.context_tokens += nc + num_new_tokens
            if self.in_decode[r]:
                scheduled_decodes.append(r)
            else:
                plan.prefills.append((r, num_new_tokens))
                plan.prefill_tokens += num_new_tokens
            i += 1
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

    # --- update from output ---------------------------------------------------------------
    def update(self, step: int, plan: StepPlan) -> None:
        """vLLM's `update_from_output`: tokens computed and sampled, first tokens and
        finishes recorded (`first_token_step`, `end_step`), finished requests freed."""
        prompt, gen, computed, output = self.prompt, self.gen, self.computed, self.output
        bs = self.block_size
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
                    self._finish(r, step, cdiv(c, bs))
                else:
                    self._start_decode(r, step + 1)
        heap = self.finish_heap
        running, in_decode, dbase_of = self.running, self.in_decode, self.dbase
        while heap and heap[0][0] <= step:
            f, r = heapq.heappop(heap)
            if f != step or r not in running or not in_decode[r] or dbase_of[r] + output[r] - 1 != f:
                continue  # stale entry (preempted or shifted since)
            # A decode finished (`_stop_decode` + `_finish`, inlined: the hot path).
            dbase = dbase_of[r]
            gen[r] = output[r]
            self.block_phase[(prompt[r] - 1 - dbase) % bs] -= 1
            self.decode_ctx_base -= prompt[r] - dbase
            self.num_decoding -= 1
            in_decode[r] = False
            self._dec_np[r] = False
            del running[r]
            self.used_blocks -= cdiv(prompt[r] + output[r] - 1, bs)
            self.end_step[r] = step
            a = self.adapter[r]
            if a != BASE:
                count = self.running_adapters[a] - 1
                if count:
                    self.running_adapters[a] = count
                else:
                    self._remove_running_adapter(a, step)

    def _finish(self, r: int, step: int, blocks: int) -> None:
        del self.running[r]
        self.used_blocks -= blocks
        self.end_step[r] = step
        self._remove_running_adapter(self.adapter[r], step)

    # --- invariants (debug mode, used by tests) -------------------------------------------
    def check_invariants(self, step: int, plan: StepPlan) -> None:
        """Slow full check after `update(step)`; raises AssertionError."""
        bs = self.block_size
        nxt = step + 1
        used = sum(cdiv(self.num_computed(r, nxt), bs) for r in self.running)
        assert used == self.used_blocks, f"step {step}: blocks {self.used_blocks} != {used}"
        assert 0 <= self.used_blocks <= self.num_blocks, f"step {step}: over-allocated"
        assert plan.num_scheduled <= self.max_num_seqs, f"step {step}: > max_num_seqs"
        tokens = plan.prefill_tokens + plan.num_decodes
        assert tokens <= self.max_num_batched_tokens, f"step {step}: > max_num_batched_tokens"
        assert plan.num_adapters <= self.max_loras, f"step {step}: > max_loras adapters"
        assert len(self.running) <= self.max_num_seqs
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
