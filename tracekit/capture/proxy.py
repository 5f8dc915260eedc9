"""`tracekit proxy`: a transparent reverse proxy in front of vLLM's OpenAI API that
records each completion request as a results-kind row (trace columns + what happened).

What the client sees is what the server sent, byte for byte (status, headers, body,
stream events), with one exception: on a stream whose client did not ask for usage, the
proxy asks for it (`stream_options.include_usage`) and removes that final usage event
from what the client receives. POST /v1/completions and /v1/chat/completions are
recorded; every other path is passed through unrecorded.

Every recorded request has exactly one row (`rows.py` says what each status means):
- a client that hangs up (queued, before its first token, or mid-stream) cancels the
  handler at once (aiohttp's `handler_cancellation`), which closes the upstream
  connection, so vLLM aborts the request as it would without the proxy;
- on SIGTERM/SIGINT the proxy stops listening, lets requests in flight finish for up to
  `--drain-timeout` seconds, then ends the rest (status `unfinished`), and only then
  writes its last part; a second signal ends the drain at once. A `kill -9` loses at
  most one `--flush-every` interval;
- a body that is not JSON is forwarded and answered by the server, and recorded as an
  error; an unreachable server is a 502 and an error row.

Recorded per request (no prompt or completion text; token ids only with
--keep-token-ids and token-id prompts):
- `arrival_s`: seconds since the proxy started (the capture clock), `dispatch_s` the same;
- `adapter`: the request's `model`, or null when it names a base model of the server
  (models that `/v1/models` lists with no `parent`);
- `prompt_tokens`, `output_tokens` (= `generated_tokens` when served; the request's
  `max_tokens` otherwise), `cached_tokens` (when the server reports them);
- `prefix_hashes` (`prompts.py`): one keyed hash per full KV block of the prompt;
- `first_token_s`, `ttft_s` (streams only), `end_s`, `e2e_s`, `tpot_s`, `itl_s` (the gaps
  between content events of a stream), `status`, `error`.
Filter on `status == "ok"` to replay exactly what was served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from tracekit.capture.prompts import (
    PrefixHasher,
    block_size_from_metrics,
    gather_quietly,
    prompt_ids,
    tokenize,
    tokenize_body,
)
from tracekit.capture.rows import CaptureWriter, Record, row_of
from tracekit.capture.sse import relay_stream
from tracekit.cliutil import console, err_console, user_errors
from tracekit.prefix import DEFAULT_BLOCK_TOKENS
from tracekit.schema import CTX_PREFIX_BLOCK_TOKENS, TracekitError, new_context

RECORDED_PATHS = ("/v1/completions", "/v1/chat/completions")
# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp recomputes for the new message.
_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
TOKENIZE_CONCURRENCY = 4  # /tokenize calls in flight at once: the server's own work comes first
MAX_PENDING_TOKENIZE = 10_000  # beyond this backlog, rows go without hashes (counted)
CUT_WAIT_S = 5.0  # after cutting, how long the handlers get to record themselves


@dataclass
class ProxyStats:
    recorded: int = 0
    passed_through: int = 0
    upstream_errors: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    hash_errors: int = 0
    hash_skipped: int = 0
    drained: int = 0  # requests in flight at the stop that finished within the drain timeout
    # Seconds from the stop signal to: the drain's end, the cut requests' rows, the last part.
    drain_s: float | None = None
    cut_s: float | None = None
    stop_s: float | None = None

    # The writer's figures, kept here for one place to read a run's outcome.
    parts: int = 0
    write_errors: int = 0
    rows_dropped: int = 0


@dataclass
class ProxyState:
    upstream: str
    out_dir: Path
    flush_every_s: float = 10.0
    keep_token_ids: bool = False
    drain_timeout_s: float = 30.0
    prefix_hashes: bool = True
    prefix_block_tokens: int | None = None  # None: the server's block size (else 16)
    t0: float = field(default_factory=time.perf_counter)
    t0_unix: float = field(default_factory=time.time)
    base_models: set[str] | None = None  # None until /v1/models answered
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: ProxyStats = field(default_factory=ProxyStats)
    seq: int = 0
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    last_models_try: float = -1e9
    server_block_size: int | None = None
    server_prefix_caching: bool | None = None
    hasher: PrefixHasher | None = None
    stopping: bool = False
    inflight: dict[Record, asyncio.Task[Any]] = field(default_factory=dict)
    others: set[asyncio.Task[Any]] = field(default_factory=set)  # passthrough handlers
    hash_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # Set whenever a handler ends. A handler's task is its connection's (it goes on to the
    # next keep-alive request), so the drain cannot wait on the tasks themselves.
    handler_ended: asyncio.Event = field(default_factory=asyncio.Event)
    hash_error: str | None = None
    writer: CaptureWriter = field(init=False)

    def __post_init__(self) -> None:
        self.writer = CaptureWriter(self.out_dir, self.context)

    @property
    def rows(self) -> list[tuple[Any, ...]]:
        """Rows not written yet."""
        return self.writer.rows

    def context(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.hasher is not None:
            extra[CTX_PREFIX_BLOCK_TOKENS] = self.hasher.block_tokens
        return new_context(
            source="proxy",
            target="proxy",
            upstream=self.upstream,
            model=sorted(self.base_models)[0] if self.base_models else None,
            base_models=sorted(self.base_models) if self.base_models is not None else None,
            adapters=dict(self.adapters),
            t0_unix=self.t0_unix,
            t0_monotonic=self.t0,
            flush_every_s=self.flush_every_s,
            drain_timeout_s=self.drain_timeout_s,
            keep_token_ids=self.keep_token_ids,
            server_block_size=self.server_block_size,
            server_enable_prefix_caching=self.server_prefix_caching,
            **extra,
        )

    def get_hasher(self) -> PrefixHasher:
        """The capture's hasher, fixed at first use: the server's block size if known."""
        if self.hasher is None:
            self.hasher = PrefixHasher(self.prefix_block_tokens or self.server_block_size or DEFAULT_BLOCK_TOKENS)
        return self.hasher

    def sync_stats(self) -> ProxyStats:
        self.stats.parts = self.writer.parts
        self.stats.write_errors = self.writer.write_errors
        self.stats.rows_dropped = self.writer.rows_dropped
        return self.stats


def _now(state: ProxyState) -> float:
    return time.perf_counter() - state.t0


# --- what the server is -------------------------------------------------------------------


async def refresh_models(state: ProxyState, session: Any) -> None:
    """Learn the server's base models (and adapter ranks, if their folders are readable),
    and, once, its KV block size (vLLM's `/metrics`), before any prompt is hashed."""
    state.last_models_try = time.perf_counter()
    try:
        async with session.get(state.upstream + "/v1/models") as r:
            if r.status != 200:
                return
            data = (await r.json(content_type=None)).get("data") or []
    except Exception:  # noqa: BLE001 - upstream down or not vLLM: try again later
        return
    bases = {str(m["id"]) for m in data if isinstance(m, dict) and m.get("id") and not m.get("parent")}
    state.base_models = bases
    for m in data:
        if isinstance(m, dict) and m.get("parent") and m.get("id"):
            root = m.get("root")
            state.adapters.setdefault(str(m["id"]), {"rank": _rank_on_disk(root), "path": root})
    if state.server_block_size is None and state.hasher is None:
        with contextlib.suppress(Exception):
            async with session.get(state.upstream + "/metrics") as r:
                if r.status == 200:
                    state.server_block_size, state.server_prefix_caching = block_size_from_metrics(await r.text())


def _rank_on_disk(path: Any) -> int | None:
    if not isinstance(path, str):
        return None
    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- the handlers -------------------------------------------------------------------------


def make_app(state: ProxyState) -> Any:
    from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

    session_box: dict[str, ClientSession] = {}
    # Requests whose prompt the server must tokenize for the hashes (text, chat).
    rec_tokenize: dict[Record, dict[str, Any] | None] = {}
    tokenize_slots = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

    async def on_startup(_: web.Application) -> None:
        # No overall timeout: a long generation may stream for minutes. auto_decompress off:
        # bodies go to the client exactly as the upstream encoded them.
        session_box["s"] = ClientSession(
            connector=TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        await refresh_models(state, session_box["s"])

    async def on_cleanup(_: web.Application) -> None:
        await session_box["s"].close()

    def fwd_headers(headers: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in headers.items() if k.lower() not in _HOP}

    async def passthrough(request: web.Request) -> web.StreamResponse:
        state.stats.passed_through += 1
        session = session_box["s"]
        body = await request.read()
        try:
            up = await session.request(
                request.method, state.upstream + request.path_qs, data=body or None, headers=fwd_headers(request.headers)
            )
        except Exception as e:  # noqa: BLE001 - any failure to reach the upstream is a 502
            state.stats.upstream_errors += 1
            return _bad_gateway(e)
        async with up:
            resp = web.StreamResponse(status=up.status, reason=up.reason, headers=fwd_headers(up.headers))
            await resp.prepare(request)
            with contextlib.suppress(ConnectionResetError):  # the client hung up: nothing to do
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            return resp

    async def recorded(request: web.Request) -> web.StreamResponse:
        rec = Record(arrival=_now(state))
        state.inflight[rec] = asyncio.current_task()  # type: ignore[assignment]
        try:
            return await _recorded(request, rec)
        except asyncio.CancelledError:
            if rec.cut:
                rec.fail("unfinished", f"cut by the proxy's stop: still running after its "
                         f"{state.drain_timeout_s:g}s drain")
            elif not rec.done:
                rec.fail("cancelled", _hangup_text(rec))
            raise
        except (ClientError, ConnectionResetError) as e:
            # aiohttp reports a write to a gone client as a ClientConnectionResetError too:
            # the client's transport tells which side went away.
            transport = request.transport
            if transport is None or transport.is_closing():
                if not rec.done:
                    rec.fail("cancelled", _hangup_text(rec))
            else:
                # The upstream died mid-answer: record it, then drop the client's connection
                # too, as the client would have seen from the server itself.
                rec.fail("error", f"upstream closed mid-answer: {e.__class__.__name__}")
            raise
        except Exception as e:
            rec.fail("error", f"proxy error: {e!r}"[:500])
            raise
        finally:
            state.inflight.pop(rec, None)
            state.handler_ended.set()
            finish(rec)

    async def _recorded(request: web.Request, rec: Record) -> web.StreamResponse:
        session = session_box["s"]
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            model, max_tokens = body.get("model"), body.get("max_tokens") or body.get("max_completion_tokens")
            rec.model = model if isinstance(model, str) else None
            rec.max_tokens = max_tokens if isinstance(max_tokens, int) else None
            rec.prompt_ids = prompt_ids(body)
            rec.stream = bool(body.get("stream"))
        if state.stopping:
            # Arrived on an open connection after the stop began: not forwarded.
            rec.fail("error", "rejected: the proxy is stopping")
            return web.json_response({"error": {"message": "the proxy is stopping", "type": "ServiceUnavailable",
                                                "code": 503}}, status=503, headers={"Connection": "close"})
        if not isinstance(body, dict):
            return await _forward_unparsed(request, raw, rec)
        if state.base_models is None and time.perf_counter() - state.last_models_try > 5:
            await refresh_models(state, session)
        if state.prefix_hashes and rec.prompt_ids is None:
            rec_tokenize[rec] = tokenize_body(request.path, body)
        strip_usage = False
        send = raw
        if rec.stream:
            opts = body.get("stream_options") or {}
            if not (isinstance(opts, dict) and opts.get("include_usage")):
                # Ask for usage; the client never sees the event it did not ask for.
                body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                send = json.dumps(body).encode()
                strip_usage = True
        # No compressed answers on recorded paths: the proxy must read usage from them.
        up_headers = {k: v for k, v in fwd_headers(request.headers).items() if k.lower() != "accept-encoding"}
        try:
            up = await session.post(state.upstream + request.path_qs, data=send, headers=up_headers)
        except (ClientError, OSError, asyncio.TimeoutError) as e:
            state.stats.upstream_errors += 1
            rec.fail("error", f"upstream unreachable: {e.__class__.__name__}")
            rec_tokenize.pop(rec, None)
            return _bad_gateway(e)
        rec.answered = True
        try:
            headers = fwd_headers(up.headers)
            if not rec.stream or up.status != 200 or "text/event-stream" not in up.headers.get("Content-Type", ""):
                data = await up.read()
                if up.status == 200:
                    with contextlib.suppress(ValueError, AttributeError):
                        rec.usage = json.loads(data).get("usage")
                else:
                    rec.fail("error", _http_error(up.status, data))
                rec.end = _now(state)
                rec.done = True
                answer = web.Response(body=data, status=up.status, reason=up.reason, headers=headers)
                if state.stopping:
                    answer.force_close()  # the client reconnects elsewhere
                return answer
            resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
            if state.stopping:
                resp.force_close()
            await resp.prepare(request)
            await relay_stream(up, resp, rec, strip_usage, lambda: _now(state))
            rec.end = _now(state)
            try:
                await resp.write_eof()
            except ConnectionResetError:
                # Clients often hang up right after `data: [DONE]`, before the chunked
                # terminator: that request was served. Earlier, it was cut short.
                if not rec.done:
                    raise
            return resp
        except BaseException:
            # Whatever ended it early (client gone, proxy stopping): drop the upstream
            # connection, never return it to the pool, so that the server aborts now.
            up.close()
            raise
        finally:
            up.release()

    async def _forward_unparsed(request: web.Request, raw: bytes, rec: Record) -> web.StreamResponse:
        # Not a JSON object: the server answers with its own error; forward it, and record
        # the request as an error (it is traffic the server saw).
        rec.fail("error", "request body is not a JSON object")
        try:
            up = await session_box["s"].post(state.upstream + request.path_qs, data=raw, headers=fwd_headers(request.headers))
        except (ClientError, OSError, asyncio.TimeoutError) as e:
            state.stats.upstream_errors += 1
            return _bad_gateway(e)
        rec.answered = True
        async with up:
            data = await up.read()
            rec.error = f"request body is not a JSON object; the server answered {_http_error(up.status, data)}"[:500]
            rec.end = _now(state)
            rec.done = True
            return web.Response(body=data, status=up.status, reason=up.reason, headers=fwd_headers(up.headers))

    def finish(rec: Record) -> None:
        """The request's row, exactly once: now, or after the server tokenized its prompt."""
        if rec.finished:
            return
        rec.finished = True
        if rec.end is None:
            rec.end = _now(state)
        adapter = rec.model
        if adapter is not None and state.base_models is not None and adapter in state.base_models:
            adapter = None
        tbody = rec_tokenize.pop(rec, None)
        if state.prefix_hashes and rec.prompt_ids is not None:
            rec.prefix_hashes = state.get_hasher().hashes(rec.prompt_ids, adapter)
        elif tbody is not None and rec.answered:
            if len(state.hash_tasks) >= MAX_PENDING_TOKENIZE:
                state.stats.hash_skipped += 1
            else:
                task = asyncio.get_running_loop().create_task(hash_then_add(rec, adapter, tbody))
                state.hash_tasks.add(task)
                task.add_done_callback(state.hash_tasks.discard)
                return
        add_row(rec, adapter)

    async def hash_then_add(rec: Record, adapter: str | None, tbody: dict[str, Any]) -> None:
        try:
            async with tokenize_slots:
                ids = await tokenize(session_box["s"], state.upstream, tbody)
            rec.prefix_hashes = state.get_hasher().hashes(ids, adapter)
            rec.prompt_len = len(ids)
        except asyncio.CancelledError:
            state.stats.hash_skipped += 1
            raise
        except Exception as e:  # noqa: BLE001 - no hashes for this row; the row itself stays
            state.stats.hash_errors += 1
            if str(e) != state.hash_error:
                state.hash_error = str(e)
                err_console.print(f"[yellow]tracekit proxy: no prefix hashes for a request: {e}[/]")
        finally:
            add_row(rec, adapter)

    def add_row(rec: Record, adapter: str | None) -> None:
        state.seq += 1
        row = row_of(rec, f"px-{state.session_id}-{state.seq:09d}", adapter, state.keep_token_ids)
        if adapter is not None and rec.status == "ok" and adapter not in state.adapters:
            state.adapters[adapter] = {"rank": None, "path": None}
        state.writer.add(row)
        state.stats.recorded += 1
        state.stats.by_status[rec.status] += 1

    async def dispatch(request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and request.path in RECORDED_PATHS:
            return await recorded(request)
        task = asyncio.current_task()
        assert task is not None
        state.others.add(task)
        try:
            return await passthrough(request)
        finally:
            state.others.discard(task)
            state.handler_ended.set()

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def _hangup_text(rec: Record) -> str:
    if rec.first is not None:
        return f"client hung up mid-stream after {len(rec.gaps) + 1} token events"
    if rec.answered and rec.stream:
        return "client hung up before the first token"
    if rec.answered or rec.model is not None:
        return "client hung up before the answer"
    return "client hung up while sending its request"


def _bad_gateway(e: BaseException) -> Any:
    from aiohttp import web

    msg = f"upstream unreachable: {e.__class__.__name__}: {e}"
    return web.json_response({"error": {"message": msg, "type": "BadGateway", "code": 502}}, status=502)


def _http_error(status: int, data: bytes) -> str:
    try:
        obj = json.loads(data)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        msg = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        msg = data[:200].decode(errors="replace")
    return f"HTTP {status}: {str(msg)[:500]}"


# --- running and stopping -------------------------------------------------------------------


async def _flusher(state: ProxyState, stop: asyncio.Event) -> None:
    while True:
        try:
            await asyncio.wait_for(stop.wait(), timeout=state.flush_every_s)
            return
        except asyncio.TimeoutError:
            await state.writer.flush()


async def _drain_and_cut(state: ProxyState, cut_now: asyncio.Event, t_stop: float) -> None:
    """Let what is in flight finish until the drain timeout (or a second signal), then
    end the rest; each ended request records itself as `unfinished`."""
    loop = asyncio.get_running_loop()
    deadline = t_stop + state.drain_timeout_s
    at_stop = len(state.inflight)
    if at_stop:
        err_console.print(f"tracekit proxy: stopping; {at_stop} request(s) in flight, waiting up to "
                          f"{state.drain_timeout_s:g}s (signal again to end them now)")
    while state.inflight or state.others:
        remaining = deadline - loop.time()
        if remaining <= 0 or cut_now.is_set():
            break
        state.handler_ended.clear()
        waits = {asyncio.ensure_future(cut_now.wait()), asyncio.ensure_future(state.handler_ended.wait())}
        await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    left = dict(state.inflight)
    state.stats.drained = max(at_stop - len(left), 0)
    state.stats.drain_s = loop.time() - t_stop
    for rec, task in left.items():
        rec.cut = True
        task.cancel()
    for task in list(state.others):
        task.cancel()
    if left or state.others:
        await asyncio.wait({*left.values(), *state.others}, timeout=CUT_WAIT_S)


async def serve(state: ProxyState, host: str, port: int, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, cut_now: asyncio.Event | None = None) -> ProxyStats:
    """Run the proxy until SIGINT/SIGTERM (or `stop` is set); drain, cut, write, return."""
    from aiohttp import web

    app = make_app(state)
    # handler_cancellation: a client that goes away cancels its handler at once (and so
    # the upstream request), not only at the proxy's next write to it.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise TracekitError(f"--listen {host}:{port}: cannot listen: {e.strerror or e}") from None
    stop = stop or asyncio.Event()
    cut_now = cut_now or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (cut_now if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    flush_stop = asyncio.Event()
    flusher = asyncio.create_task(_flusher(state, flush_stop))
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        t_stop = loop.time()
        state.stopping = True
        for s in list(runner.sites):
            await s.stop()  # no new connections
        # Open connections stay open (aiohttp's pre_shutdown would drop the bodies still
        # arriving on them): a request that arrives on one from now on is refused with a
        # 503 and recorded, and runner.cleanup() closes them after the drain.
        await _drain_and_cut(state, cut_now, t_stop)
        state.stats.cut_s = loop.time() - t_stop
        # Rows waiting for their prompt's hashes: until the drain's end, then without them.
        await gather_quietly(state.hash_tasks, timeout=max(t_stop + state.drain_timeout_s - loop.time(), 1.0))
        await runner.cleanup()
        flush_stop.set()
        await flusher  # a part being written completes first
        await state.writer.flush()
        state.stats.stop_s = loop.time() - t_stop
    return state.sync_stats()


def _parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise TracekitError(f"--listen: expected HOST:PORT, got {value!r}") from None
    return host or "127.0.0.1", p


def _check_upstream(url: str) -> str:
    from urllib.parse import urlparse

    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise TracekitError(f"--upstream: expected an http(s) URL like http://127.0.0.1:8000, got {url!r}")
    return url.rstrip("/")


@click.command("proxy")
@click.option("--upstream", required=True, help="vLLM server URL, e.g. http://127.0.0.1:8000")
@click.option("--listen", default="127.0.0.1:8001", show_default=True, help="HOST:PORT to listen on")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="capture directory (Parquet parts)")
@click.option("--flush-every", type=float, default=10.0, show_default=True, help="seconds between parts")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="on SIGTERM/SIGINT, seconds to let requests in flight finish before ending them")
@click.option("--prefix-hashes/--no-prefix-hashes", default=True, show_default=True,
              help="record each prompt's prefix_hashes (text prompts through the server's /tokenize)")
@click.option("--prefix-block-tokens", type=int, default=None,
              help="tokens per hashed block [default: the server's KV block size, else 16]")
@click.option("--keep-token-ids", is_flag=True, help="store prompt_token_ids of token-id prompts")
@click.option("--json", "as_json", is_flag=True, help="at the stop, print the summary as one JSON object (the banner on stderr)")
@user_errors
def proxy_cmd(upstream: str, listen: str, out_dir: str, flush_every: float, drain_timeout: float,
              prefix_hashes: bool, prefix_block_tokens: int | None, keep_token_ids: bool, as_json: bool = False) -> None:
    """Record traffic to a vLLM server while passing it through unchanged.

    Each completion request becomes one row of a results-kind capture (arrival,
    adapter, token counts, prefix hashes, TTFT, end, status); no prompt or completion
    text is kept."""
    if flush_every <= 0:
        raise TracekitError(f"--flush-every: must be positive, got {flush_every}")
    if drain_timeout < 0:
        raise TracekitError(f"--drain-timeout: must be non-negative, got {drain_timeout}")
    if prefix_block_tokens is not None and prefix_block_tokens < 1:
        raise TracekitError(f"--prefix-block-tokens: must be at least 1, got {prefix_block_tokens}")
    host, port = _parse_listen(listen)
    state = ProxyState(upstream=_check_upstream(upstream), out_dir=Path(out_dir), flush_every_s=flush_every,
                       keep_token_ids=keep_token_ids, drain_timeout_s=drain_timeout, prefix_hashes=prefix_hashes,
                       prefix_block_tokens=prefix_block_tokens)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    (err_console if as_json else console).print(
        f"tracekit proxy: http://{host}:{port} -> {state.upstream}, capture in {out_dir} "
        f"(a part every {flush_every:g}s); Ctrl-C to stop")
    stats = asyncio.run(serve(state, host, port))
    if as_json:
        click.echo(json.dumps(proxy_summary(state, stats), indent=2))
    else:
        _print_summary(state, stats)
    if stats.write_errors and state.rows:
        sys.exit(1)


def proxy_summary(state: ProxyState, stats: ProxyStats) -> dict[str, Any]:
    """The run's outcome as `--json` prints it (the same figures as the table)."""
    return {
        "requests_recorded": stats.recorded,
        "by_status": {k: stats.by_status[k] for k in ("ok", "cancelled", "error", "unfinished")},
        "drained_at_stop": stats.drained, "drain_s": stats.drain_s, "cut_s": stats.cut_s, "stop_s": stats.stop_s,
        "passed_through": stats.passed_through, "upstream_unreachable": stats.upstream_errors,
        "rows_written": state.writer.rows_written, "parts": stats.parts, "out": str(state.out_dir),
        "prefix_block_tokens": state.hasher.block_tokens if state.hasher else None,
        "prefix_hash_errors": stats.hash_errors, "prefix_hash_skipped": stats.hash_skipped,
        "write_errors": stats.write_errors, "rows_not_written": len(state.rows), "rows_dropped": stats.rows_dropped,
    }


def _print_summary(state: ProxyState, stats: ProxyStats) -> None:
    from rich.table import Table

    t = Table(title="tracekit proxy", show_header=False)
    by = stats.by_status
    t.add_row("requests recorded", f"{stats.recorded} (ok {by['ok']}, client hung up {by['cancelled']}, "
              f"errors {by['error']}, cut by the stop {by['unfinished']})")
    if stats.stop_s is not None:
        t.add_row("stop", f"{stats.drained} in flight finished during the drain, {by['unfinished']} cut; "
                  f"after the signal: drain over {stats.drain_s:.2f}s, cut rows {stats.cut_s:.2f}s, "
                  f"last part written {stats.stop_s:.2f}s")
    t.add_row("other requests passed through", str(stats.passed_through))
    t.add_row("upstream unreachable (502)", str(stats.upstream_errors))
    t.add_row("rows written", f"{state.writer.rows_written} in {stats.parts} parts in {state.out_dir}")
    if state.hasher is not None or stats.hash_errors or stats.hash_skipped:
        t.add_row("prefix hashes", f"blocks of {state.hasher.block_tokens if state.hasher else '-'} tokens; "
                  f"{stats.hash_errors} rows without (tokenize failed), {stats.hash_skipped} skipped")
    if stats.write_errors:
        t.add_row("[red]write errors[/]", f"{stats.write_errors} (rows not written: {len(state.rows)}, dropped: {stats.rows_dropped})")
    console.print(t)
