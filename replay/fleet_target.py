"""A fleet target: one trace against several vLLM servers (one per GPU of a plan) behind
the router the fleet twin uses (`twin.routing`), or against the fleet twin itself.

Each request is routed at its send instant and goes to its replica's server as the
single-server target sends it (same prompt ids for the same seed: one prompt source for
the whole fleet, drawn in request order). The results are one table with a `replica`
column (the plan's GPU names), so that `replay compare` lines a real fleet up with the
fleet twin row for row and replica by replica.

What the router knows of real servers (`ReplicaState`):
- outstanding requests: its own bookkeeping, +1 when a request is sent, -1 when its
  stream ends (the twin's count: routed and not finished);
- adapter residency: its own record of the adapters it sent to each server, least
  recently sent first out, `max_loras` deep (the plan's `max_loras`, else the server's
  `max_lora` from vLLM's `/metrics` `vllm:lora_requests_info`, else 1). vLLM's slots
  are LRU in scheduling order, so the record is exact while the server schedules
  requests in the order they were sent, and lags it when requests wait.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
import polars as pl
import pyarrow as pa

from replay.runner import Recorder, RunOptions, new_event_loop_policy, run_open_loop
from replay.targets import Replayed, results_from_recorder, server_replay_context
from tracekit.schema import CTX_PREFIX_BLOCK_TOKENS, KIND_RESULTS, TracekitError, conform
from twin.fleet_plan import FleetPlan, check_covers
from twin.routing import Router

MAX_LORA_RE = re.compile(r'vllm:lora_requests_info\{[^}]*max_lora="(\d+)"')


def parse_urls(value: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    if not urls:
        raise TracekitError("--url: expected URL or URL1,URL2,...")
    if len(set(urls)) != len(urls):
        raise TracekitError(f"--url: a server is listed twice ({value})")
    return urls


class FleetSender:
    """Routes each request at its send instant, then sends it with its replica's sender;
    keeps the router's view of the replicas (`twin.routing.ReplicaState`)."""

    def __init__(self, senders: list[Any], router: Router, adapters: list[str | None], slots: list[int],
                 shared_body: bool):
        self.senders = senders
        self.router = router
        self.adapters = adapters
        self.replica = np.full(len(adapters), -1, dtype=np.int64)
        self.inflight = [0] * len(senders)
        self.slots = slots
        self.resident: list[OrderedDict[str, None]] = [OrderedDict() for _ in senders]
        self.shared_body = shared_body
        self.bodies: dict[int, bytes] = {}

    # --- ReplicaState ---
    def outstanding(self, replica: int) -> int:
        return self.inflight[replica]

    def holds(self, replica: int, adapter: str | None) -> bool:
        return adapter is None or adapter in self.resident[replica]

    def _route(self, i: int) -> int:
        a = self.adapters[i]
        r = self.router.route(a, self)
        self.replica[i] = r
        self.inflight[r] += 1
        if a is not None:
            lru = self.resident[r]
            lru[a] = None
            lru.move_to_end(a)
            while len(lru) > self.slots[r]:
                lru.popitem(last=False)
        return r

    def _done(self, r: int) -> None:
        self.inflight[r] -= 1

    # --- the runner's hooks ---
    @property
    def start(self) -> Any:
        return self._start if all(s.pool is not None for s in self.senders) else None

    async def prepare(self, n: int) -> None:
        for s in self.senders:
            await s.prepare(n)

    def prebuild(self, i: int) -> None:
        # The body does not depend on the server (same base model name): build it ahead
        # (only for the synchronous send: `__call__` builds its own).
        if self.shared_body and self.start is not None and i not in self.bodies:
            self.bodies[i] = self.senders[0].body(i)

    def _start(self, i: int, rec: Recorder) -> asyncio.Future[None]:
        r = self._route(i)
        s = self.senders[r]
        body = self.bodies.pop(i, None) if self.shared_body else None
        if body is None:
            body = s.body(i)
        s.ready[i] = s.head + str(len(body)).encode() + b"\r\n\r\n" + body
        fut = s.start(i, rec)
        fut.add_done_callback(lambda _f, r=r: self._done(r))
        return fut

    async def __call__(self, i: int, rec: Recorder) -> None:
        r = self._route(i)
        self.bodies.pop(i, None)
        try:
            await self.senders[r](i, rec)
        finally:
            self._done(r)

    def close(self) -> None:
        for s in self.senders:
            s.close()


async def server_max_lora(session: Any, url: str) -> int | None:
    """`max_lora` as the server reports it in `/metrics` (vllm:lora_requests_info)."""
    import aiohttp

    try:
        async with session.get(f"{url}/metrics") as resp:
            if resp.status != 200:
                return None
            m = MAX_LORA_RE.search(await resp.text())
            return int(m.group(1)) if m else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


@dataclass
class VllmFleetTarget:
    urls: list[str]
    plan: FleetPlan
    router: str
    lora_dir: Any = None
    model: str | None = None
    max_concurrency: int | None = None
    request_timeout_s: float | None = 300.0
    drain_timeout_s: float = 30.0
    seed: int = 0
    token_id_range: tuple[int, int] = (1000, 2000)
    progress: bool = True
    handle_signals: bool = True
    name: str = "vllm"

    def replay(self, trace: pl.DataFrame, trace_context: dict[str, Any], cut_s: float | None) -> Replayed:
        if len(self.urls) != len(self.plan.gpus):
            raise TracekitError(f"--url lists {len(self.urls)} server(s) for the {len(self.plan.gpus)} GPU(s) of "
                                f"{self.plan.source}: one URL per GPU, in the plan's order")
        new_event_loop_policy()
        try:
            return asyncio.run(self._replay(trace, trace_context, cut_s))
        except KeyboardInterrupt:
            raise TracekitError("interrupted before the replay started; nothing was written") from None

    async def _replay(self, trace: pl.DataFrame, trace_context: dict[str, Any], cut_s: float | None) -> Replayed:
        import aiohttp

        from replay.vllm_target import (
            PromptSource,
            VllmSender,
            load_adapters,
            resolve_adapters,
            server_info,
        )
        from twin.fleet import adapter_codes

        adapters = trace["adapter"].to_list()
        _, names = adapter_codes(trace)
        router = Router(self.router, len(self.urls), self.plan.placement())
        used = sorted(a for a in names if a is not None)
        for w in check_covers(self.plan, names):
            click.echo(f"warning: {w}", err=True)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            infos = [await server_info(session, u, self.model) for u in self.urls]
            loaded: dict[str, dict[str, str]] = {}
            slots: list[int] = []
            for url, info, gpu in zip(self.urls, infos, self.plan.gpus, strict=True):
                # Each server registers what the router may send it.
                need = [a for a in gpu.adapters if a is not None and a in used] if self.router == "placement" else used
                paths = resolve_adapters(need, info.known, trace_context, self.lora_dir)
                await load_adapters(session, url, paths)
                loaded[gpu.name] = dict(paths)
                ml = gpu.settings.get("max_loras") or await server_max_lora(session, url) or 1
                slots.append(int(ml))
            # Captured prefix hashes become shared token prefixes, as a single-server replay does.
            prompts = PromptSource(trace, self.seed, self.token_id_range, trace_context.get(CTX_PREFIX_BLOCK_TOKENS))
            senders = [VllmSender(session, url, trace, info.base_model, prompts, self.request_timeout_s, time.perf_counter)
                       for url, info in zip(self.urls, infos, strict=True)]
            shared = len({info.base_model for info in infos}) == 1
            fleet = FleetSender(senders, router, adapters, slots, shared)
            opts = RunOptions(max_concurrency=self.max_concurrency, cut_s=cut_s, drain_timeout_s=self.drain_timeout_s,
                              progress=self.progress, handle_signals=self.handle_signals)
            outcome = await run_open_loop(trace["arrival_s"].to_numpy(), fleet, opts)
        table = results_from_recorder(trace, outcome.recorder, self.name)
        gpu_names = self.plan.names
        rep = [gpu_names[r] if r >= 0 else None for r in fleet.replica.tolist()]
        table = conform(table.append_column("replica", pa.array(rep, type=pa.string())), KIND_RESULTS, source="fleet replay")
        fleet_ctx = {
            "router": self.router,
            "plan": self.plan.to_dict(),
            "gpus": [{"name": g.name, "url": u, "adapters_loaded": loaded[g.name], "router_slots": s}
                     for g, u, s in zip(self.plan.gpus, self.urls, slots, strict=True)],
            "residency": "the router's own record of the adapters it sent, max_loras deep per server",
        }
        ctx = server_replay_context(self, outcome, cut_s, url=",".join(self.urls), served_model=infos[0].base_model,
                                    fleet=fleet_ctx)
        return Replayed(table, ctx)


@dataclass
class TwinFleetTarget:
    """The fleet twin behind the same interface (`replay run --target twin --plan`)."""

    profile: Any
    plan: FleetPlan
    router: str
    name: str = "twin"

    def replay(self, trace: pl.DataFrame, trace_context: dict[str, Any], cut_s: float | None) -> Replayed:
        from twin.fleet import simulate_fleet

        ctx = dict(trace_context)
        ctx.pop("window_s", None)
        res = simulate_fleet(trace, self.profile, self.plan, self.router, trace_context=ctx, window_s=cut_s)
        out_ctx = {k: v for k, v in res.context.items() if k not in trace_context}
        out_ctx["twin"] = {"fleet": res.summary["fleet"], "gpus": res.summary["gpus"]}
        if cut_s is not None:
            out_ctx["window_s"] = float(cut_s)
        return Replayed(res.results, out_ctx)
