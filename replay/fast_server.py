"""A fast OpenAI-compatible streaming server for testing and benchmarking the replayer.

It speaks the part of vLLM's API the replayer uses (`/v1/models`, streaming
`/v1/completions` with `stream_options.include_usage`, `/v1/load_lora_adapter`) and
streams exactly `max_tokens` tokens, `--itl-ms` apart, after `--ttft-ms`. It does no model
work, so what a benchmark measures is the load generator, not the server.

Fault injection for tests, chosen by the request's `model`:
`fail-500` answers HTTP 500, `hang` never answers, `drop` closes the connection
mid-stream, `midstream-error` sends an error event after the first token.

Run: `python -m replay.fast_server --port 8100 [--ttft-ms 0] [--itl-ms 0]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientConnectionResetError, web

BASE_MODEL = "fast-base"
# aiohttp's default listen backlog (128) overflows when an open-loop client bursts new
# connections at a busy server, and the kernel then resets them.
BACKLOG = 2048


@dataclass
class ServerState:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    adapters: dict[str, str] = field(default_factory=dict)
    # Request bodies seen, for tests to check what the replayer sent (bounded).
    seen: list[dict[str, Any]] = field(default_factory=list)
    keep_seen: int = 0
    load_calls: int = 0
    # time.monotonic() (CLOCK_MONOTONIC, shared by every process on the machine) when
    # each completion request arrived: lets a benchmark measure any client's send times.
    received: list[float] = field(default_factory=list)


def make_app(state: ServerState) -> web.Application:
    async def models(_: web.Request) -> web.Response:
        data = [{"id": BASE_MODEL, "object": "model", "root": BASE_MODEL, "parent": None}]
        data += [{"id": a, "object": "model", "root": p, "parent": BASE_MODEL} for a, p in state.adapters.items()]
        return web.json_response({"object": "list", "data": data})

    async def load_lora(request: web.Request) -> web.Response:
        body = await request.json()
        state.load_calls += 1
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return web.json_response({"error": {"message": "lora_name and lora_path required"}}, status=400)
        state.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"received": state.received})

    async def reset(_: web.Request) -> web.Response:
        state.received.clear()
        return web.json_response({"ok": True})

    async def completions(request: web.Request) -> web.StreamResponse:
        state.received.append(time.monotonic())
        body = await request.json()
        if len(state.seen) < state.keep_seen:
            state.seen.append(body)
        model = body.get("model")
        if model == "fail-500":
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        if model == "hang":
            await asyncio.sleep(3600)
        if model != BASE_MODEL and model not in state.adapters and model not in ("drop", "midstream-error"):
            return web.json_response({"error": {"message": f"The model `{model}` does not exist."}}, status=404)
        n = int(body.get("max_tokens") or 16)
        prompt = body.get("prompt") or []
        n_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await _stream(request, resp, body, model, n, n_prompt)
        except (ConnectionResetError, ClientConnectionResetError):
            pass  # the client went away (cut, timeout, Ctrl-C): nothing to answer
        return resp

    async def _stream(request: web.Request, resp: web.StreamResponse, body: dict[str, Any], model: str,
                      n: int, n_prompt: int) -> None:
        await resp.prepare(request)
        if state.ttft_s:
            await asyncio.sleep(state.ttft_s)
        created = int(time.time())
        for i in range(n):
            if i and state.itl_s:
                await asyncio.sleep(state.itl_s)
            if model == "drop" and i == 1:
                # Close the socket under the client, as a crashed server would.
                assert request.transport is not None
                request.transport.close()
                return
            if model == "midstream-error" and i == 1:
                err = {"error": {"message": "injected mid-stream error", "code": 500}}
                await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                break
            chunk = {"id": "cmpl-x", "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": 0, "text": " t", "logprobs": None, "finish_reason": None if i < n - 1 else "length"}]}
            await resp.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "cmpl-x", "object": "text_completion", "created": created, "model": model, "choices": [],
                     "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}}
            await resp.write(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/load_lora_adapter", load_lora)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset)
    return app


class BackgroundServer:
    """The server on its own event loop in a daemon thread (for tests): `with BackgroundServer() as s:`."""

    def __init__(self, state: ServerState | None = None, host: str = "127.0.0.1"):
        self.state = state or ServerState()
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(self.state), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, backlog=BACKLOG)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--ttft-ms", type=float, default=0.0)
    ap.add_argument("--itl-ms", type=float, default=0.0)
    args = ap.parse_args()
    try:
        import uvloop  # the server must not be the bottleneck of a benchmark

        uvloop.install()
    except ImportError:
        pass
    state = ServerState(ttft_s=args.ttft_ms / 1e3, itl_s=args.itl_ms / 1e3)
    web.run_app(make_app(state), host=args.host, port=args.port, access_log=None, print=None, backlog=BACKLOG,
                handler_cancellation=True, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
