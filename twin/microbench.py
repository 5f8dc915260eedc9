"""Closed-batch microbenchmarks, replayed step by step to fit step time from aggregates.

`vllm bench serve --request-rate inf` sends every request at once. With every arrival at
t=0, vLLM's scheduling decisions depend on token counts only, never on how long a step
takes: the sequence of batches is fixed before any timing is known. So the measured
summaries are *linear* in the step-time coefficients:

    duration   = sum over steps of t(step)
    mean TTFT  = sum over steps of t(step) x (requests whose first token comes at or after it) / N
    mean ITL   = sum over steps of t(step) x (requests between first and last token) / gaps

`schedule_closed_batch` replays such a batch through the twin's own scheduler
(`twin.scheduler.Scheduler`, the one serving uses: the same KV blocks with vLLM's null
block, preemption, `max_loras` rule and decode-only stretches) and returns those three
weighted feature sums, so that `twin.timing.fit_linear` can fit the coefficients to what
the benchmark measured. The paper's benchmark servers ran vLLM 0.8.5: no prefix caching
(its prompts were random anyway), synchronous scheduling, admission on the first chunk.
"""

from __future__ import annotations

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
    """Replay vLLM V1's scheduling of `mb` (all requests arrive at t=0) through the
    twin's scheduler."""
    from twin.scheduler import BASE, Scheduler

    n_req = mb.num_requests
    if mb.num_adapters > 0:
        # The paper's client draws each request's adapter at random.
        adapter = np.random.default_rng(mb.seed).integers(0, mb.num_adapters, n_req).astype(np.int64)
    else:
        adapter = np.full(n_req, BASE, dtype=np.int64)
    n_ad = max(mb.num_adapters, 0)
    sched = Scheduler(
        prompt=[mb.prompt_tokens] * n_req,
        output=[max(mb.output_tokens, 1)] * n_req,
        adapter_idx=adapter,
        valid=np.ones(n_req, dtype=bool),
        adapter_rank=[mb.adapter_rank] * n_ad,
        adapter_load_s=[0.0] * n_ad,  # the fit sees loads through the features only
        cpu_miss_factor=0.0,
        max_loras=mb.max_loras,
        max_cpu_loras=max(mb.max_loras, n_ad, 1),
        max_num_seqs=mb.max_num_seqs,
        max_num_batched_tokens=mb.max_num_batched_tokens,
        block_size=mb.block_size,
        num_blocks=mb.kv_tokens // mb.block_size - 1,  # vLLM's null block, as the engine
    )
    # Segments of identical-shape steps:
    # (count, prefill, decode, ctx0, ctx_step, n_adapters, rank_sum, prefill_reqs)
    segs: list[tuple[int, int, int, int, int, int, int, int]] = []
    step = 0
    while sched.running or sched.waiting.peek(n_req, False) is not None:
        st = sched.decode_stretch(step, n_req)
        if st is not None and st.next_finish > step:
            k, need = sched.stretch_blocks(step, st.next_finish - step)
            if k > 0:
                seen = np.zeros(k)
                sched.advance(st, need, seen)
                segs.append((k, 0, st.num_decodes, st.ctx_base + st.num_decodes * step, st.num_decodes,
                             st.num_adapters, st.rank_sum, 0))
                step += k
                continue
        plan = sched.schedule(step, n_req)
        if plan.num_scheduled == 0:
            raise RuntimeError(f"{mb.name}: nothing schedulable (KV cache too small for one request?)")
        segs.append((1, plan.prefill_tokens, plan.num_decodes, plan.context_tokens, 0,
                     plan.num_adapters, plan.rank_sum, len(plan.prefills)))
        sched.update(step, plan)
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
    return Schedule(
        x=x, first_step=sched.columns()["first_token_step"].astype(np.int64),
        last_step=sched.columns()["end_step"].astype(np.int64),
        output_tokens=np.full(n_req, max(mb.output_tokens, 1), dtype=np.int64), num_preempted=sched.total_preemptions,
    )  # fmt: skip


def predict_metrics(mb: Microbench, coef: dict[str, float], sched: Schedule | None = None) -> dict[str, Any]:
    """Duration, mean TTFT and mean ITL that the coefficients predict for `mb`."""
    sched = sched or schedule_closed_batch(mb)
    vec = np.array([coef.get(f, 0.0) for f in FEATURES])
    return {k: float(v @ vec) for k, v in sched.aggregates().items()}
