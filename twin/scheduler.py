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
   is not cached there either. Each load adds its time to the step.

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

import heapq
from collections import deque

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
        self._setup(order, starts, counts)

    @classmethod
    def for_arrivals(cls, capacity: np.ndarray) -> WaitingQueue:
        """An empty queue that requests join as they arrive (`append`), at most
        `capacity[q]` in queue q (the last queue is the base model's): an engine of a
        coupled fleet takes requests as the router sends them."""
        self = cls.__new__(cls)
        self.num_queues = len(capacity)
        self.base_queue = self.num_queues - 1
        capacity = np.asarray(capacity, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(capacity)[:-1]]).astype(np.int64)
        self._setup(np.zeros(int(capacity.sum()), dtype=np.int64), starts, np.zeros_like(capacity))
        return self

    def append(self, q: int, r: int) -> None:
        """Request `r` (the latest arrival: keys stay in arrival order) joins queue `q`."""
        e = self._end[q]
        self._reqs[e] = r
        self._end[q] = e + 1
        if not self._front[q] and self._head[q] == e:  # the queue's new head
            heapq.heappush(self._heaps[self._admissible[q]], (r, q))

    def _setup(self, reqs: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        self._reqs: np.ndarray = reqs
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


class AdapterSlots:
    """GPU adapter slots (`max_loras`) and the CPU adapter cache (`max_cpu_loras`), both
    LRU as in vLLM's `LRUCacheLoRAModelManager`.

    An adapter with running requests is touched every step, so it is never the least
    recently used; its last use is recorded when its last running request leaves.
    Ties (adapters last used in the same step) go to the lower adapter index, so the
    result does not depend on set iteration order."""

    def __init__(self, max_loras: int, max_cpu_loras: int):
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.gpu: dict[int, None] = {}
        self.cpu: dict[int, None] = {}
        self.last_used: dict[int, int] = {}

    def _evict(self, cache: dict[int, None], in_use: dict[int, int]) -> int:
        victim = min(
            (a for a in cache if a not in in_use), key=lambda a: (self.last_used.get(a, -1), a)
        )
        del cache[victim]
        return victim

    def activate(self, a: int, in_use: dict[int, int]) -> int:
        """Make adapter `a` resident in a GPU slot. Returns 0 (hit), 1 (GPU-slot miss,
        CPU hit) or 2 (miss in both). `in_use`: adapters with running requests."""
        if a in self.gpu:
            return 0
        miss = 1
        if a not in self.cpu:
            miss = 2
            if len(self.cpu) >= self.max_cpu_loras:
                gone = self._evict(self.cpu, in_use)
                # vLLM's remove_adapter also deactivates it from its GPU slot.
                self.gpu.pop(gone, None)
            self.cpu[a] = None
        if len(self.gpu) >= self.max_loras:
            self._evict(self.gpu, in_use)
        self.gpu[a] = None
        return miss


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
        waiting_capacity: np.ndarray | None = None,
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

        # `waiting_capacity` (per queue): requests are added as they arrive (`add_request`),
        # and each finish is logged (`finish_log`, the step it happened in).
        self.waiting = (WaitingQueue(adapter_idx, valid, self.num_adapters) if waiting_capacity is None
                        else WaitingQueue.for_arrivals(waiting_capacity))
        self.finish_log: list[int] | None = None if waiting_capacity is None else []
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

    def add_request(self, prompt: int, output: int, adapter: int, valid: bool) -> int:
        """A request arriving now (after every request already added); returns its index.
        An invalid one (too long) is kept for the results but never queued."""
        r = len(self.prompt)
        self.prompt.append(prompt)
        self.output.append(output)
        self.adapter.append(adapter)
        self.gen.append(0)
        self.computed.append(0)
        self.dbase.append(0)
        self.in_decode.append(False)
        if r >= len(self.end_step):  # numpy columns grow by doubling
            grow = max(1024, len(self.end_step))
            self._dec_np = np.concatenate([self._dec_np, np.zeros(grow, dtype=bool)])
            self._pmd_np = np.concatenate([self._pmd_np, np.zeros(grow, dtype=np.int64)])
            self.first_token_step = np.concatenate([self.first_token_step, np.full(grow, -1, dtype=np.int64)])
            self.end_step = np.concatenate([self.end_step, np.full(grow, -1, dtype=np.int64)])
        if valid:
            self.waiting.append(adapter if adapter != BASE else self.num_adapters, r)
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

    def _add_running_adapter(self, a: int, step: int, plan: StepPlan) -> None:
        if a == BASE:
            return
        count = self.running_adapters.get(a, 0)
        self.running_adapters[a] = count + 1
        if count == 0:
            self.waiting.set_running(a, True)
            self.running_rank_sum += self.adapter_rank[a]
            self.adapters_version += 1
            miss = self.slots.activate(a, self.running_adapters)
            if miss:
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
        self._remove_running_adapter(self.adapter[r], step)
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
            if self.finish_log is not None:
                self.finish_log.append(step)
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
        if self.finish_log is not None:
            self.finish_log.append(step)
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
