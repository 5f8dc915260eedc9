"""The open-loop runner: send each request at its own arrival time, record what happened.

Requests are sent at absolute deadlines `t0 + arrival_s` on a monotonic clock
(`time.perf_counter`), so sleeps never accumulate drift; the achieved send time of each request is
recorded (`dispatch_s`), which makes the replay's own fidelity visible. The runner knows
nothing about HTTP: a target gives it a coroutine `send(i, rec)` that fills row `i` of the
`Recorder`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.text import Text

# Status codes stored in the recorder; names match the results schema.
OK, ERROR, TIMEOUT, UNFINISHED = 0, 1, 2, 3
STATUS_NAMES = ("ok", "error", "timeout", "unfinished")


class Recorder:
    """Per-request outcomes in preallocated arrays (O(1) work and no allocation per request
    beyond the inter-token gaps). Times are seconds since the replay started."""

    def __init__(self, n: int, t0: float = 0.0):
        self.t0 = t0
        self.dispatch = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)
        self.end = np.full(n, np.nan)
        self.generated = np.full(n, -1, dtype=np.int64)
        self.cached = np.full(n, -1, dtype=np.int64)  # prompt tokens the server took from its prefix cache
        self.status = np.full(n, UNFINISHED, dtype=np.int8)
        self.itl: list[list[float] | None] = [None] * n
        self.error: list[str | None] = [None] * n
        self.completed = 0
        self.failed = 0
        self.sent = 0


@dataclass
class RunOptions:
    max_concurrency: int | None = None
    # Stop sending at this replay time and mark requests still running `unfinished`.
    cut_s: float | None = None
    drain_timeout_s: float = 30.0
    progress: bool = True
    # Handle SIGINT/SIGTERM (only possible on the main thread).
    handle_signals: bool = True


@dataclass
class RunOutcome:
    recorder: Recorder
    interrupted: bool = False
    # Replay time when sending stopped (cut, interrupt, or the last send).
    stopped_s: float | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0


TIMER_SLACK_S = 0.0012
SPIN_S = 0.0002
SendFn = Callable[[int, Recorder], Awaitable[None]]


async def run_open_loop(arrivals: np.ndarray, send: SendFn, opts: RunOptions, console: Console | None = None) -> RunOutcome:
    """Send request i at `arrivals[i]` seconds after start (arrivals sorted ascending)."""
    loop = asyncio.get_running_loop()
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    clock = time.perf_counter
    n = len(arrivals)
    # Optional target hooks: `prepare(n)` before the clock starts (open connections),
    # `prebuild(i)` before waiting for request i's deadline, and `start(i, rec) -> Future`,
    # which writes the request synchronously (no task-start hop between deadline and send).
    prepare = getattr(send, "prepare", None)
    prebuild = getattr(send, "prebuild", None)
    start_now: Callable[[int, Recorder], asyncio.Future[None]] | None = getattr(send, "start", None)
    if prepare is not None:
        await prepare(n)
    if os.environ.get("TRACEKIT_REPLAY_GC") != "default":
        # Setup objects (the trace, prompt ids, imports) never die during a replay: freeze
        # them out of the collector, so its full passes stay short and do not delay a send.
        gc.collect()
        gc.freeze()
    t0 = clock() + 0.05  # a short head start so the first deadline is not already late
    rec = Recorder(n, t0)
    out = RunOutcome(rec)
    cap = opts.max_concurrency or 0
    pending: deque[int] = deque()  # due but held back by --max-concurrency
    inflight: set[asyncio.Future[None]] = set()
    stop_at: list[float] = []  # clock time of the first stop request (signal)
    hard_stop = asyncio.Event()
    sending_done = asyncio.Event()
    all_done = asyncio.Event()  # nothing left to send and nothing in flight
    ticker_finished = False
    ticker_stop = asyncio.Event()
    cpu0, wall0 = time.process_time(), time.perf_counter()

    async def guarded(i: int) -> None:
        try:
            await send(i, rec)
        except asyncio.CancelledError:
            # Cut at the window end or interrupted: the request did not finish.
            rec.status[i] = UNFINISHED
            rec.error[i] = "interrupted" if stop_at else "cut at window end"

    def start(i: int) -> None:
        fut: asyncio.Future[None]
        if start_now is not None:
            fut = start_now(i, rec)
            fut.add_done_callback(lambda f: on_cancelled(i) if f.cancelled() else None)
        else:
            fut = loop.create_task(guarded(i))
        inflight.add(fut)
        fut.add_done_callback(on_done)
        rec.sent += 1

    def on_cancelled(i: int) -> None:
        # Same record as `guarded` makes for a cancelled task.
        rec.status[i] = UNFINISHED
        rec.error[i] = "interrupted" if stop_at else "cut at window end"

    def on_done(task: asyncio.Future[None]) -> None:
        inflight.discard(task)
        if pending and not ticker_stop.is_set():
            start(pending.popleft())
        if ticker_finished and not pending:
            sending_done.set()
        if sending_done.is_set() and not inflight:
            all_done.set()

    def fire(i: int) -> None:
        if ticker_stop.is_set():
            return
        if cap and len(inflight) >= cap:
            pending.append(i)
        else:
            start(i)

    def finish_sending() -> None:
        nonlocal ticker_finished
        ticker_finished = True
        if not pending:
            sending_done.set()
            if not inflight:
                all_done.set()

    def stop_sending() -> None:
        ticker_stop.set()
        pending.clear()
        sending_done.set()
        if not inflight:
            all_done.set()

    def on_signal() -> None:
        if stop_at:
            hard_stop.set()  # a second Ctrl-C: stop waiting for the drain
        else:
            stop_at.append(clock())
            stop_sending()

    async def tick_in_loop() -> None:
        # Event-loop timers tick in whole milliseconds (epoll, libuv) and fire up to a
        # millisecond off, which alone would put the p99 dispatch lag over 1 ms: sleep on
        # the loop until just before the deadline, then the last stretch on a precise clock.
        for i in range(n):
            deadline = t0 + float(arrivals[i])
            if prebuild is not None:
                prebuild(i)
            left = deadline - clock() - TIMER_SLACK_S
            if left > 0:
                await asyncio.sleep(left)
            if ticker_stop.is_set():
                return
            left = deadline - clock()
            if left > SPIN_S:
                # Blocks the loop for at most TIMER_SLACK_S: chunks read meanwhile get
                # their timestamps up to that late, far below a real server's ITL.
                time.sleep(left - SPIN_S)
            # time.sleep overshoots by ~50-100 us (kernel timer slack): spin the rest.
            while clock() < deadline:
                pass
            fire(i)
        finish_sending()

    ticker_task = loop.create_task(tick_in_loop())
    installed: list[int] = []
    if opts.handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    cut_deadline = t0 + opts.cut_s if opts.cut_s is not None else None

    live = None
    if opts.progress:
        live = Live(Text(""), console=console or Console(stderr=True), auto_refresh=False, transient=False)
        live.start()
    last = (clock(), 0)

    def refresh(final: bool = False) -> None:
        nonlocal last
        if live is None:
            return
        now = clock()
        if final:
            live.update(Text(f"replay done in {now - t0:.1f} s: sent {rec.sent}/{n}, completed {rec.completed}, "
                             f"errors {rec.failed}, {rec.completed / max(now - t0, 1e-9):.1f} req/s completed"), refresh=True)
            return
        done = rec.completed + rec.failed
        rate = (done - last[1]) / max(now - last[0], 1e-9)
        last = (now, done)
        live.update(Text.from_markup(
            f"[bold]replay[/] t={max(now - t0, 0):7.1f}s  sent {rec.sent}/{n}  completed {rec.completed}  "
            f"errors {rec.failed}  in flight {len(inflight)}  rate {rate:6.1f} req/s"
            + ("  [yellow]stopping[/]" if stop_at else "")), refresh=True)

    try:
        # Phase 1: sending. Ends when every request is sent, the cut comes, or a signal.
        while not sending_done.is_set():
            timeout = 0.25
            if cut_deadline is not None:
                timeout = min(timeout, max(cut_deadline - clock(), 0.0))
            try:
                await asyncio.wait_for(sending_done.wait(), timeout=timeout)
            except asyncio.TimeoutError:
                pass
            if cut_deadline is not None and clock() >= cut_deadline:
                stop_sending()
            refresh()
        out.stopped_s = clock() - t0
        # Phase 2: drain the requests in flight, bounded by the cut and the drain timeout.
        while inflight and not hard_stop.is_set():
            now = clock()
            limit = cut_deadline
            if stop_at:
                limit = min(limit, stop_at[0] + opts.drain_timeout_s) if limit else stop_at[0] + opts.drain_timeout_s
            if limit is not None and now >= limit:
                break
            timeout = 0.25 if limit is None else min(0.25, limit - now)
            try:
                await asyncio.wait_for(all_done.wait(), timeout=timeout)
            except asyncio.TimeoutError:
                pass
            refresh()
        for task in list(inflight):
            task.cancel()
        if inflight:
            await asyncio.wait(set(inflight), timeout=5.0)
    finally:
        ticker_stop.set()
        ticker_task.cancel()
        close = getattr(send, "close", None)
        if close is not None:
            close()
        for sig in installed:
            loop.remove_signal_handler(sig)
        refresh(final=True)
        if live is not None:
            live.stop()
    out.interrupted = bool(stop_at)
    if stop_at:
        out.stopped_s = stop_at[0] - t0
    out.wall_s = time.perf_counter() - wall0
    out.cpu_s = time.process_time() - cpu0
    return out


def new_event_loop_policy() -> None:
    """Use uvloop when installed: lower per-request overhead and steadier dispatch."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
