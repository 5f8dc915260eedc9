"""`tracekit proxy`: a transparent reverse proxy in front of vLLM's OpenAI API that
records each completion request as a results-kind row (trace columns + what happened).

What the client sees is what the server sent, byte for byte (status, headers, body,
stream events), with one exception: on a stream whose client did not ask for usage, the
proxy asks for it (`stream_options.include_usage`) and removes that final usage event
from what the client receives. Only POST /v1/completions and /v1/chat/completions are
recorded; every other path is passed through unrecorded.

Recorded per request (no prompt or completion text; token ids only with
--keep-token-ids and token-id prompts):
- `arrival_s`: seconds since the proxy started (the capture clock), `dispatch_s` the same;
- `adapter`: the request's `model`, or null when it names a base model of the server
  (models that `/v1/models` lists with no `parent`);
- `prompt_tokens`, `output_tokens` (= `generated_tokens`): from the server's `usage`;
- `first_token_s`, `ttft_s` (streams only), `end_s`, `e2e_s`, `tpot_s`, `itl_s` (the gaps
  between content events of a stream), `status`, `error`.
Requests that failed before the server reported usage keep the token counts the request
itself tells (the length of a token-id prompt, `max_tokens`), else 1, and status `error`:
filter on `status == "ok"` to replay exactly what was served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from tracekit.cliutil import console, err_console, user_errors
from tracekit.schema import KIND_RESULTS, PartWriter, TracekitError, full_schema, new_context

RECORDED_PATHS = ("/v1/completions", "/v1/chat/completions")
# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp recomputes for the new message.
_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
MAX_BUFFERED_ROWS = 1_000_000  # while the output dir is unwritable, keep at most this many rows

ROW_FIELDS = (
    "request_id", "arrival_s", "adapter", "prompt_tokens", "output_tokens", "prompt_token_ids",
    "target", "status", "dispatch_s", "first_token_s", "end_s", "generated_tokens", "ttft_s",
    "e2e_s", "tpot_s", "error", "itl_s",
)  # fmt: skip


@dataclass
class ProxyStats:
    recorded: int = 0
    passed_through: int = 0
    upstream_errors: int = 0
    parts: int = 0
    write_errors: int = 0
    rows_dropped: int = 0


@dataclass
class ProxyState:
    upstream: str
    out_dir: Path
    flush_every_s: float = 10.0
    keep_token_ids: bool = False
    t0: float = field(default_factory=time.perf_counter)
    t0_unix: float = field(default_factory=time.time)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    base_models: set[str] | None = None  # None until /v1/models answered
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: ProxyStats = field(default_factory=ProxyStats)
    seq: int = 0
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    last_models_try: float = -1e9
    write_error: str | None = None
    writer: PartWriter | None = None

    def context(self) -> dict[str, Any]:
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
            keep_token_ids=self.keep_token_ids,
        )


def _now(state: ProxyState) -> float:
    return time.perf_counter() - state.t0


# --- the base model / adapter split ---------------------------------------------------------


async def refresh_models(state: ProxyState, session: Any) -> None:
    """Learn the server's base models (and adapter ranks, if their folders are readable)."""
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


def _rank_on_disk(path: Any) -> int | None:
    if not isinstance(path, str):
        return None
    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- stream parsing -------------------------------------------------------------------------


def _data_objects(event: bytes) -> Iterator[Any]:
    """The JSON value of each `data:` line of an SSE event; stops at one that is not JSON."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                yield json.loads(line[5:])
            except ValueError:
                return


def _usage_of(event: bytes) -> dict[str, Any] | None:
    """The `usage` object of an SSE event, if it carries one (cheap test before parsing)."""
    if b'"usage":{' not in event and b'"usage": {' not in event:
        return None
    obj = next(_data_objects(event), None)
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


def _is_usage_only(event: bytes) -> bool:
    """The final event that include_usage adds: no choices, only usage."""
    return b'"choices":[]' in event or b'"choices": []' in event


# Chat streams open with a role-only delta that carries no token.
_ROLE_ONLY = b'"delta":{"role":"assistant","content":""}'


def _error_of(event: bytes) -> str | None:
    if b'"error"' not in event:
        return None
    for obj in _data_objects(event):
        if isinstance(obj, dict) and obj.get("error"):
            err = obj["error"]
            return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    return None


def _prompt_ids(body: Mapping[str, Any]) -> list[int] | None:
    p = body.get("prompt")
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        return p
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], list) and all(isinstance(x, int) for x in p[0]):
        return p[0]
    return None


# --- the handler ----------------------------------------------------------------------------


@dataclass
class _Record:
    arrival: float
    model: str | None
    prompt_ids: list[int] | None
    max_tokens: int | None
    first: float | None = None
    last_chunk: float | None = None
    gaps: list[float] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    status: str = "ok"
    error: str | None = None
    done: bool = False  # the stream's `data: [DONE]` went to the client


def make_app(state: ProxyState) -> Any:
    from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

    session_box: dict[str, ClientSession] = {}

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
        arrival = _now(state)
        session = session_box["s"]
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return await _forward_unparsed(request, raw)
        model = body.get("model")
        if state.base_models is None and time.perf_counter() - state.last_models_try > 5:
            await refresh_models(state, session)
        ids = _prompt_ids(body)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        rec = _Record(arrival, model if isinstance(model, str) else None, ids, max_tokens if isinstance(max_tokens, int) else None)
        stream = bool(body.get("stream"))
        strip_usage = False
        send = raw
        if stream:
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
        except Exception as e:  # noqa: BLE001
            state.stats.upstream_errors += 1
            rec.status, rec.error = "error", f"upstream unreachable: {e.__class__.__name__}"
            finish(rec, _now(state))
            return _bad_gateway(e)
        try:
            async with up:
                headers = fwd_headers(up.headers)
                if not stream or up.status != 200 or "text/event-stream" not in up.headers.get("Content-Type", ""):
                    data = await up.read()
                    rec.first = None
                    if up.status == 200:
                        with contextlib.suppress(ValueError, AttributeError):
                            rec.usage = json.loads(data).get("usage")
                    else:
                        rec.status, rec.error = "error", _http_error(up.status, data)
                    finish(rec, _now(state))
                    return web.Response(body=data, status=up.status, reason=up.reason, headers=headers)
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
                await resp.prepare(request)
                try:
                    await _relay_stream(up, resp, rec, strip_usage, state)
                    await resp.write_eof()
                except ConnectionResetError:
                    # Clients often hang up right after `data: [DONE]`, before the chunked
                    # terminator: that request was served. Earlier, it was cut short.
                    if not rec.done:
                        rec.status, rec.error = "error", "client disconnected mid-stream"
                finish(rec, _now(state))
                return resp
        except asyncio.CancelledError:
            rec.status, rec.error = "error", "client disconnected (request cancelled)"
            finish(rec, _now(state))
            raise
        except ClientError as e:
            # The upstream died mid-answer: record it, then drop the client's connection
            # too, as the client would have seen from the server itself.
            rec.status, rec.error = "error", f"upstream closed mid-answer: {e.__class__.__name__}"
            finish(rec, _now(state))
            raise

    async def _forward_unparsed(request: web.Request, raw: bytes) -> web.StreamResponse:
        # Not JSON: the server will answer with its own error; forward it, record nothing.
        try:
            up = await session_box["s"].post(state.upstream + request.path_qs, data=raw, headers=fwd_headers(request.headers))
        except Exception as e:  # noqa: BLE001
            return _bad_gateway(e)
        async with up:
            data = await up.read()
            return web.Response(body=data, status=up.status, reason=up.reason, headers=fwd_headers(up.headers))

    def finish(rec: _Record, end: float) -> None:
        state.seq += 1
        usage = rec.usage or {}
        prompt = usage.get("prompt_tokens")
        gen = usage.get("completion_tokens")
        if not isinstance(prompt, int) or prompt < 1:
            prompt = len(rec.prompt_ids) if rec.prompt_ids else 1
            if rec.status == "ok":
                rec.status, rec.error = "error", "server reported no usage"
        generated = gen if isinstance(gen, int) else None
        output = generated if generated and generated > 0 else (rec.max_tokens if rec.max_tokens and rec.max_tokens > 0 else 1)
        adapter = rec.model
        if adapter is not None and state.base_models is not None and adapter in state.base_models:
            adapter = None
        elif adapter is not None and rec.status == "ok" and adapter not in state.adapters:
            state.adapters[adapter] = {"rank": None, "path": None}
        ttft = rec.first - rec.arrival if rec.first is not None else None
        e2e = end - rec.arrival
        tpot = (end - rec.first) / (generated - 1) if rec.first is not None and generated and generated > 1 else None
        state.rows.append((
            f"px-{state.session_id}-{state.seq:09d}", rec.arrival, adapter, prompt, output,
            rec.prompt_ids if state.keep_token_ids else None, "proxy", rec.status, rec.arrival,
            rec.first, end, generated, ttft, e2e, tpot, rec.error, rec.gaps if rec.gaps else None,
        ))  # fmt: skip
        state.stats.recorded += 1

    async def dispatch(request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and request.path in RECORDED_PATHS:
            return await recorded(request)
        return await passthrough(request)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def _relay_stream(up: Any, resp: Any, rec: _Record, strip_usage: bool, state: ProxyState) -> None:
    """Forward SSE events as they arrive, each unchanged; note first-token time, gaps, usage."""
    buf = b""
    async for chunk in up.content.iter_any():
        now = _now(state)
        buf += chunk
        out = []
        # SSE events end with a blank line; vLLM writes "\n\n".
        while True:
            cut = buf.find(b"\n\n")
            if cut < 0:
                break
            event, buf = buf[: cut + 2], buf[cut + 2 :]
            usage = _usage_of(event)
            if usage is not None:
                rec.usage = usage  # the last one wins (continuous_usage_stats sends many)
            if usage is not None and _is_usage_only(event):
                if strip_usage:
                    continue
            elif not event.startswith(b"data: [DONE]") and _ROLE_ONLY not in event:
                err = _error_of(event)
                if err is not None:
                    rec.status, rec.error = "error", err
                elif rec.first is None:
                    rec.first = now
                else:
                    rec.gaps.append(now - (rec.last_chunk or now))
                rec.last_chunk = now
            out.append(event)
        if out:
            await resp.write(b"".join(out))
            if out[-1].startswith(b"data: [DONE]"):
                rec.done = True
    if buf:
        await resp.write(buf)  # a trailing partial event: forward as is
    rec.done = rec.done or rec.usage is not None


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


# --- writing parts --------------------------------------------------------------------------


def rows_to_table(rows: list[tuple[Any, ...]]) -> Any:
    import pyarrow as pa

    schema = full_schema(KIND_RESULTS)
    cols = list(zip(*rows, strict=True))
    return pa.table({name: pa.array(col, type=schema.field(name).type) for name, col in zip(ROW_FIELDS, cols, strict=True)})


def write_rows(state: ProxyState, rows: list[tuple[Any, ...]]) -> bool:
    """Write rows as one part; False (after reporting, once per distinct error) if it failed.

    Runs in a worker thread: it touches only the writer, never `state.rows`."""
    try:
        if state.writer is None:
            state.writer = PartWriter(state.out_dir, KIND_RESULTS, state.context(), prefix="capture")
        state.writer.context = state.context()  # adapters/base models learnt so far
        state.writer.write_part(rows_to_table(rows))
    except (TracekitError, OSError) as e:
        state.stats.write_errors += 1
        if str(e) != state.write_error:
            state.write_error = str(e)
            err_console.print(f"[red]tracekit proxy: cannot write capture: {e}; still serving, rows kept in memory[/]")
        return False
    state.stats.parts += 1
    if state.write_error is not None:
        err_console.print(f"[green]tracekit proxy: writing to {state.out_dir} works again[/]")
        state.write_error = None
    return True


def _requeue(state: ProxyState, rows: list[tuple[Any, ...]]) -> None:
    """Put unwritten rows back in front (event-loop thread only), bounded."""
    state.rows[:0] = rows
    excess = len(state.rows) - MAX_BUFFERED_ROWS
    if excess > 0:
        del state.rows[:excess]
        state.stats.rows_dropped += excess


async def flush(state: ProxyState) -> None:
    """Write what is buffered as one part, off the event loop; traffic is never affected."""
    rows, state.rows = state.rows, []  # swapped in the loop thread: no append is lost
    if rows and not await asyncio.to_thread(write_rows, state, rows):
        _requeue(state, rows)


async def _flusher(state: ProxyState, stop: asyncio.Event) -> None:
    while True:
        try:
            await asyncio.wait_for(stop.wait(), timeout=state.flush_every_s)
            return  # shutting down: serve() writes the last part after in-flight requests end
        except asyncio.TimeoutError:
            await flush(state)


async def serve(state: ProxyState, host: str, port: int, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> ProxyStats:
    """Run the proxy until SIGINT/SIGTERM (or `stop` is set), then flush and return."""
    from aiohttp import web

    app = make_app(state)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise TracekitError(f"--listen {host}:{port}: cannot listen: {e.strerror or e}") from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    flusher = asyncio.create_task(_flusher(state, stop))
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        stop.set()
        await flusher  # a part being written completes first
        await runner.cleanup()  # stop accepting, let in-flight requests finish (aiohttp's grace)
        await flush(state)
    return state.stats


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
@click.option("--keep-token-ids", is_flag=True, help="store prompt_token_ids of token-id prompts")
@user_errors
def proxy_cmd(upstream: str, listen: str, out_dir: str, flush_every: float, keep_token_ids: bool) -> None:
    """Record traffic to a vLLM server while passing it through unchanged.

    Each completion request becomes one row of a results-kind capture (arrival,
    adapter, token counts, TTFT, end, status); no prompt or completion text is kept."""
    if flush_every <= 0:
        raise TracekitError(f"--flush-every: must be positive, got {flush_every}")
    host, port = _parse_listen(listen)
    state = ProxyState(upstream=_check_upstream(upstream), out_dir=Path(out_dir), flush_every_s=flush_every,
                       keep_token_ids=keep_token_ids)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    console.print(f"tracekit proxy: http://{host}:{port} -> {state.upstream}, capture in {out_dir} "
                  f"(a part every {flush_every:g}s); Ctrl-C to stop")
    stats = asyncio.run(serve(state, host, port))
    _print_summary(state, stats)
    if stats.write_errors and state.rows:
        sys.exit(1)


def _print_summary(state: ProxyState, stats: ProxyStats) -> None:
    from rich.table import Table

    t = Table(title="tracekit proxy", show_header=False)
    t.add_row("requests recorded", str(stats.recorded))
    t.add_row("other requests passed through", str(stats.passed_through))
    t.add_row("upstream unreachable (502)", str(stats.upstream_errors))
    t.add_row("parts written", f"{stats.parts} in {state.out_dir}")
    if stats.write_errors:
        t.add_row("[red]write errors[/]", f"{stats.write_errors} (rows not written: {len(state.rows)}, dropped: {stats.rows_dropped})")
    console.print(t)
