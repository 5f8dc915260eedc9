"""Closed-batch microbenchmarks, replayed step by step to fit step time from aggregates.

`vllm bench serve --request-rate inf` sends every request at once. With every arrival at
t=0, vLLM's scheduling decisions depend on token counts only, never on how long a step
takes: the sequence of batches is fixed before any timing is known. So the measured
summaries are *linear* in the step-time coefficients:

    duration   = sum over steps of t(step)
    mean TTFT  = sum over steps of t(step) x (requests whose first token comes at or after it) / N
    mean ITL   = sum over steps of t(step) x (requests between first and last token) / gaps

`schedule_closed_batch` replays vLLM V1's scheduler for such a batch (running requests
first, then waiting ones FCFS; token budget with chunked prefill; `max_num_seqs`; KV
blocks with preemption of the running queue's tail; at most `max_loras` distinct
adapters per batch) and returns those three weighted feature sums, so that
`twin.timing.fit_linear` can fit the coefficients to what the benchmark measured.
Decode-only stretches are advanced in one computation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twin.timing import FEATURES, features


@dataclass
class Microbench:
    """One benchmark run: what was sent, the server config, and what was measured."""

    name: str
    prompt_tokens: int
    output_tokens: int
    num_requests: int
    max_num_seqs: int
    kv_tokens: int
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_adapters: int = 0  # 0 = base model only
    adapter_rank: int = 8
    max_loras: int = 1
    max_lora_rank: int = 16
    seed: int = 0
    measured: dict[str, float] = field(default_factory=dict)  # duration_s, mean_ttft_s, mean_itl_s


@dataclass
class Schedule:
    """Per-step features and each request's first/last token step."""

    x: np.ndarray  # (steps, len(FEATURES))
    first_step: np.ndarray  # (N,)
    last_step: np.ndarray  # (N,)
    output_tokens: np.ndarray  # (N,)
    num_preempted: int = 0

    def aggregates(self) -> dict[str, np.ndarray]:
        """Feature sums whose dot product with the coefficients gives each metric."""
        n = len(self.x)
        out: dict[str, np.ndarray] = {"duration_s": self.x.sum(axis=0)}
        cnt = np.bincount(self.first_step, minlength=n)
        w_ttft = cnt[::-1].cumsum()[::-1]  # requests whose first token is at step >= s
        out["mean_ttft_s"] = (w_ttft @ self.x) / len(self.first_step)
        gaps = float(np.sum(np.maximum(self.output_tokens - 1, 0)))
        if gaps > 0:
            diff = np.zeros(n + 1)
            np.add.at(diff, self.first_step + 1, 1.0)
            np.add.at(diff, self.last_step + 1, -1.0)
            w_itl = np.cumsum(diff)[:n]
            out["mean_itl_s"] = (w_itl @ self.x) / gaps
        return out


def schedule_closed_batch(mb: Microbench) -> Schedule:
    """Replay vLLM V1's scheduling of `mb` (all requests arrive at t=0)."""
    n_req = mb.num_requests
    bs = mb.block_size
    prompt = np.full(n_req, mb.prompt_tokens, dtype=np.int64)
    out_len = np.full(n_req, max(mb.output_tokens, 1), dtype=np.int64)
    if mb.num_adapters > 0:
        # The paper's client draws each request's adapter at random.
        adapter = np.random.default_rng(mb.seed).integers(0, mb.num_adapters, n_req)
    else:
        adapter = np.full(n_req, -1)
    computed = np.zeros(n_req, dtype=np.int64)
    generated = np.zeros(n_req, dtype=np.int64)
    held = np.zeros(n_req, dtype=np.int64)
    first = np.full(n_req, -1, dtype=np.int64)
    last = np.full(n_req, -1, dtype=np.int64)
    free_blocks = mb.kv_tokens // bs
    running: list[int] = []
    waiting: deque[int] = deque(range(n_req))
    # Segments of identical-shape steps:
    # (count, prefill, decode, ctx0, ctx_step, n_adapters, rank_sum, prefill_reqs)
    segs: list[tuple[int, int, int, int, int, int, int, int]] = []
    step = 0
    preempted_total = 0
    rank = mb.adapter_rank

    def blocks_for(tokens: int) -> int:
        return -(-tokens // bs)

    while running or waiting:
        # --- fast path: a decode-only stretch where nothing can join or finish ---------
        if running and (not waiting or len(running) >= mb.max_num_seqs) and len(running) <= mb.max_num_batched_tokens:
            ids = np.asarray(running)
            todo = prompt[ids] + generated[ids] - computed[ids]
            if np.all(todo == 1) and np.all(generated[ids] >= 1):
                k = int(np.min(out_len[ids] - generated[ids])) - 1  # steps before the first finish
                if k > 0:
                    c0 = computed[ids]

                    def need(j: int, c0: np.ndarray = c0, ids: np.ndarray = ids) -> int:
                        return int(np.sum(-(-(c0 + j) // bs) - held[ids]))

                    if need(k) > free_blocks:  # largest j that fits, by bisection
                        lo, hi = 0, k
                        while lo < hi:
                            mid = (lo + hi + 1) // 2
                            lo, hi = (mid, hi) if need(mid) <= free_blocks else (lo, mid - 1)
                        k = lo
                    if k > 0:
                        new_held = -(-(c0 + k) // bs)
                        free_blocks -= int(np.sum(new_held - held[ids]))
                        held[ids] = new_held
                        r = len(ids)
                        ads = {int(a) for a in adapter[ids] if a >= 0}
                        segs.append((k, 0, r, int(c0.sum()) + r, r, len(ads), rank * len(ads), 0))
                        computed[ids] += k
                        generated[ids] += k
                        step += k
                        continue
        # --- one ordinary step ---------------------------------------------------------
        budget = mb.max_num_batched_tokens
        sched: list[tuple[int, int]] = []
        sched_adapters: set[int] = set()
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = int(min(prompt[r] + generated[r] - computed[r], budget))
            extra = blocks_for(int(computed[r]) + n) - int(held[r])
            victim = -1
            while extra > free_blocks:
                # Preempt by recompute from the tail of the running queue.
                victim = running.pop()
                free_blocks += int(held[victim])
                held[victim] = 0
                computed[victim] = 0
                waiting.appendleft(victim)
                preempted = True
                preempted_total += 1
                if victim == r:
                    break
            if victim == r:
                break
            free_blocks -= extra
            held[r] += extra
            sched.append((r, n))
            if adapter[r] >= 0:
                sched_adapters.add(int(adapter[r]))
            budget -= n
            i += 1
        if not preempted:
            skipped: list[int] = []
            while waiting and budget > 0 and len(running) < mb.max_num_seqs:
                r = waiting[0]
                a = int(adapter[r])
                if a >= 0 and a not in sched_adapters and len(sched_adapters) >= mb.max_loras:
                    skipped.append(waiting.popleft())  # would exceed max_loras: skip it
                    continue
                n = int(min(prompt[r] + generated[r] - computed[r], budget))
                extra = blocks_for(int(computed[r]) + n) - int(held[r])
                if extra > free_blocks:
                    break
                waiting.popleft()
                free_blocks -= extra
                held[r] += extra
                running.append(r)
                sched.append((r, n))
                if a >= 0:
                    sched_adapters.add(a)
                budget -= n
            waiting.extendleft(reversed(skipped))
        if not sched:
            raise RuntimeError(f"{mb.name}: nothing schedulable (KV cache too small for one request?)")
        p_tok = d_tok = ctx = n_pre = 0
        finished: list[int] = []
        for r, n in sched:
            is_decode = generated[r] >= 1 and n == 1 and computed[r] >= prompt[r]
            if is_decode:
                d_tok += 1
            else:
                p_tok += n
                n_pre += 1
            computed[r] += n
            ctx += int(computed[r])
            if computed[r] == prompt[r] + generated[r]:
                generated[r] += 1
                if first[r] < 0:
                    first[r] = step
                if generated[r] >= out_len[r]:
                    last[r] = step
                    finished.append(r)
        for r in finished:
            free_blocks += int(held[r])
            held[r] = 0
        if finished:
            done = set(finished)
            running = [r for r in running if r not in done]
        segs.append((1, p_tok, d_tok, ctx, 0, len(sched_adapters), rank * len(sched_adapters), n_pre))
        step += 1

    seg = np.array(segs, dtype=np.int64)
    counts = seg[:, 0]
    rep = np.repeat(np.arange(len(seg)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    ctx = seg[rep, 3] + seg[rep, 4] * within
    x = features(
        seg[rep, 1],
        seg[rep, 2],
        ctx,
        seg[rep, 5],
        seg[rep, 6],
        max_lora_rank=mb.max_lora_rank,
        max_loras=mb.max_loras,
        prefill_reqs=seg[rep, 7],
    )
    assert x.shape[1] == len(FEATURES)
    return Schedule(x=x, first_step=first, last_step=last, output_tokens=out_len, num_preempted=preempted_total)


def predict_metrics(mb: Microbench, coef: dict[str, float], sched: Schedule | None = None) -> dict[str, Any]:
    """Duration, mean TTFT and mean ITL that the coefficients predict for `mb`."""
    sched = sched or schedule_closed_batch(mb)
    vec = np.array([coef.get(f, 0.0) for f in FEATURES])
    return {k: float(v @ vec) for k, v in sched.aggregates().items()}
