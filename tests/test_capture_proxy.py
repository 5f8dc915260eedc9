"""`tracekit proxy` against a deterministic fake vLLM upstream (fast, no vLLM needed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_support import free_port

from tracekit import schema
from tracekit.capture.proxy import ProxyState, serve
from tracekit.capture.rows import Record
from tracekit.capture.sse import relay_stream

REPO = Path(__file__).resolve().parents[1]
BASE = "base-model"
TRACEKIT = [sys.executable, "-c", "from tracekit.cli import main; main()"]


# --- a fake upstream that writes exactly what vLLM 0.32 writes ---------------------------


def vllm_events(model: str, n: int, prompt_tokens: int, include_usage: bool) -> list[bytes]:
    evs = []
    for i in range(n):
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
                 "choices": [{"index": 0, "text": f" t{i}", "logprobs": None,
                              "finish_reason": "length" if i == n - 1 else None, "stop_reason": None}]}
        evs.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    if include_usage:
        usage = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model, "choices": [],
                 "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}}
        evs.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    evs.append(b"data: [DONE]\n\n")
    return evs


def fake_vllm() -> web.Application:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": BASE, "object": "model", "root": "/models/base", "parent": None},
            {"id": "a1", "object": "model", "root": "/nonexistent/a1", "parent": BASE},
        ]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body.get("prompt") or body.get("messages")
        ptoks = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        n = int(body.get("max_tokens", 4))
        if body.get("model") == "drop":  # the server dies mid-stream
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for ev in vllm_events("drop", 2, ptoks, False)[:2]:
                await resp.write(ev)
            assert request.transport is not None
            request.transport.close()
            return resp
        if body.get("model") not in (BASE, "a1", "a2", "a3"):
            return web.json_response({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        if not body.get("stream"):
            return web.json_response({"id": "cmpl-1", "choices": [{"text": "x" * n}],
                                      "usage": {"prompt_tokens": ptoks, "completion_tokens": n, "total_tokens": ptoks + n}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "X-Upstream": "yes"})
        await resp.prepare(request)
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        for ev in vllm_events(body["model"], n, ptoks, include):
            await resp.write(ev)
            await asyncio.sleep(0.002)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def with_proxy(tmp: Path, fn: Callable[[str, ProxyState], Any], upstream: bool = True,
                     keep_token_ids: bool = False, out: Path | None = None, flush_every: float = 30.0) -> ProxyState:
    runner = None
    up_port = free_port()
    if upstream:
        runner = web.AppRunner(fake_vllm())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", up_port).start()
    state = ProxyState(upstream=f"http://127.0.0.1:{up_port}", out_dir=out or tmp / "cap",
                       flush_every_s=flush_every, keep_token_ids=keep_token_ids)
    port = free_port()
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(state, "127.0.0.1", port, ready=ready, stop=stop))
    await ready.wait()
    try:
        await fn(f"http://127.0.0.1:{port}", state)
    finally:
        stop.set()
        await task
        if runner is not None:
            await runner.cleanup()
    return state


async def post(url: str, body: dict[str, Any], path: str = "/v1/completions") -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        return r.status, await r.read(), r.headers


def test_stream_without_usage_is_stripped_and_recorded(tmp_path: Path) -> None:
    async def fn(url: str, state: ProxyState) -> None:
        status, data, headers = await post(url, {"model": "a1", "prompt": [1, 2, 3, 4, 5], "max_tokens": 6, "stream": True})
        assert status == 200 and headers["X-Upstream"] == "yes"
        # Exactly what vLLM sends without include_usage: the usage event is gone.
        assert data == b"".join(vllm_events("a1", 6, 5, include_usage=False))

    with_usage = asyncio.run(with_proxy(tmp_path, fn))
    assert with_usage.stats.recorded == 1
    df, meta = schema.read(tmp_path / "cap", "results")
    row = df.row(0, named=True)
    assert (row["adapter"], row["prompt_tokens"], row["output_tokens"], row["generated_tokens"]) == ("a1", 5, 6, 6)
    assert row["status"] == "ok" and row["target"] == "proxy"
    assert 0 <= row["ttft_s"] <= row["e2e_s"] and row["first_token_s"] == pytest.approx(row["arrival_s"] + row["ttft_s"])
    assert len(row["itl_s"]) == 5 and row["tpot_s"] > 0
    assert row["prompt_token_ids"] is None  # not asked for
    assert meta.context["source"] == "proxy" and meta.context["base_models"] == [BASE]


def test_stream_with_usage_passes_unchanged(tmp_path: Path) -> None:
    async def fn(url: str, state: ProxyState) -> None:
        body = {"model": BASE, "prompt": [1, 2, 3], "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
        status, data, _ = await post(url, body)
        assert data == b"".join(vllm_events(BASE, 3, 3, include_usage=True))

    asyncio.run(with_proxy(tmp_path, fn, keep_token_ids=True))
    df, _ = schema.read(tmp_path / "cap")
    row = df.row(0, named=True)
    assert row["adapter"] is None  # the served base model
    assert row["prompt_token_ids"] == [1, 2, 3]  # --keep-token-ids


def test_non_stream_errors_and_other_paths(tmp_path: Path) -> None:
    async def fn(url: str, state: ProxyState) -> None:
        status, data, _ = await post(url, {"model": "a2", "prompt": "one two", "max_tokens": 2})
        assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 2
        status, data, _ = await post(url, {"model": "zz", "prompt": "x", "max_tokens": 2})
        assert status == 404 and b"does not exist" in data
        status, data, _ = await post(url, {"model": "a3", "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 2, "stream": True}, path="/v1/chat/completions")
        assert status == 200 and b'"usage"' not in data
        async with aiohttp.ClientSession() as s, s.get(url + "/v1/models") as r:
            assert r.status == 200 and len((await r.json())["data"]) == 2
        async with aiohttp.ClientSession() as s, s.get(url + "/nope") as r:
            assert r.status == 404

    state = asyncio.run(with_proxy(tmp_path, fn))
    assert state.stats.recorded == 3 and state.stats.passed_through == 2
    df, meta = schema.read(tmp_path / "cap")
    assert df["status"].to_list() == ["ok", "error", "ok"]
    assert df["adapter"].to_list() == ["a2", "zz", "a3"]
    assert "HTTP 404" in df["error"][1]
    assert df["ttft_s"][0] is None and df["ttft_s"][2] is not None  # TTFT only on streams
    assert set(meta.context["adapters"]) == {"a1", "a2", "a3"}  # a failed name is not an adapter


def test_upstream_dying_mid_stream_is_recorded(tmp_path: Path) -> None:
    async def fn(url: str, state: ProxyState) -> None:
        with pytest.raises(aiohttp.ClientPayloadError):
            await post(url, {"model": "drop", "prompt": [1, 2], "max_tokens": 5, "stream": True})
        status, _, _ = await post(url, {"model": "a1", "prompt": [1], "max_tokens": 2, "stream": True})
        assert status == 200  # and the proxy carries on

    asyncio.run(with_proxy(tmp_path, fn))
    df, _ = schema.read(tmp_path / "cap")
    assert df["status"].to_list() == ["error", "ok"]
    assert "mid-answer" in df["error"][0] and df["ttft_s"][0] is not None


def test_client_hanging_up(tmp_path: Path) -> None:
    """Right after `data: [DONE]` the request was served; mid-stream it was cut short."""

    async def fn(url: str, state: ProxyState) -> None:
        async with aiohttp.ClientSession() as s:
            for n in (3, 200):
                body = {"model": "a1", "prompt": [1, 2], "max_tokens": n, "stream": True}
                async with s.post(url + "/v1/completions", json=body) as r:
                    if n == 3:
                        while not (await r.content.readline()).startswith(b"data: [DONE]"):
                            pass
                    else:
                        await r.content.readline()
                    r.close()
                await asyncio.sleep(0.8)

    asyncio.run(with_proxy(tmp_path, fn))
    df, _ = schema.read(tmp_path / "cap")
    assert df["status"].to_list() == ["ok", "cancelled"]
    assert df["output_tokens"][0] == 3 and "mid-stream" in df["error"][1]
    assert df["output_tokens"][1] == 200  # what was asked for: the demand, for a replay


def test_upstream_down_gives_502_and_keeps_running(tmp_path: Path) -> None:
    async def fn(url: str, state: ProxyState) -> None:
        for _ in range(2):
            status, data, _ = await post(url, {"model": "a1", "prompt": [1], "max_tokens": 2, "stream": True})
            assert status == 502 and b"upstream unreachable" in data
        async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
            assert r.status == 502

    state = asyncio.run(with_proxy(tmp_path, fn, upstream=False))
    assert state.stats.upstream_errors == 3
    df, _ = schema.read(tmp_path / "cap")
    assert df["status"].to_list() == ["error", "error"] and df["prompt_tokens"].to_list() == [1, 1]


def test_unwritable_dir_is_reported_and_traffic_flows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = blocker / "cap"  # mkdir fails: its parent is a file

    async def fn(url: str, state: ProxyState) -> None:
        for _ in range(3):
            status, _, _ = await post(url, {"model": "a1", "prompt": [1, 2], "max_tokens": 2, "stream": True})
            assert status == 200
            await asyncio.sleep(0.15)  # flushes fail meanwhile
        assert state.writer.write_errors >= 1 and len(state.rows) == 3  # kept in memory
        blocker.unlink()  # the disk "comes back"
        await asyncio.sleep(0.3)
        assert not state.rows

    state = asyncio.run(with_proxy(tmp_path, fn, out=out, flush_every=0.1))
    assert "cannot write capture" in capsys.readouterr().err
    df, _ = schema.read(out)
    assert df.height == 3 and state.stats.parts >= 1


# --- the relay, under any chunking of the upstream bytes ----------------------------------


class _FakeContent:
    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c


class _FakeUp:
    def __init__(self, chunks: list[bytes]):
        self.content = _FakeContent(chunks)


class _FakeResp:
    def __init__(self) -> None:
        self.data = b""

    async def write(self, b: bytes) -> None:
        self.data += b


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), cuts=st.lists(st.integers(0, 4000), max_size=12), strip=st.booleans())
def test_relay_is_byte_exact_under_any_chunking(n: int, cuts: list[int], strip: bool) -> None:
    events = vllm_events("a1", n, 7, include_usage=True)
    stream = b"".join(events)
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True) if b > a]
    rec = Record(arrival=0.0, model="a1", prompt_ids=None, max_tokens=n)
    resp = _FakeResp()
    asyncio.run(relay_stream(_FakeUp(chunks), resp, rec, strip, lambda: 0.0))
    expected = b"".join(e for e in events if not (strip and b'"choices":[]' in e))
    assert resp.data == expected
    assert rec.usage == {"prompt_tokens": 7, "total_tokens": 7 + n, "completion_tokens": n}
    assert rec.first is not None and len(rec.gaps) == n - 1


def test_relay_with_continuous_usage_and_chat_role_event() -> None:
    role = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    toks = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":3,'
            b'"completion_tokens":%d}}\n\n' % (i + 1) for i in range(4)]
    final = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    stream = [role, *toks, final, b"data: [DONE]\n\n"]
    rec = Record(arrival=0.0, model="a1", prompt_ids=None, max_tokens=4)
    resp = _FakeResp()
    asyncio.run(relay_stream(_FakeUp(stream), resp, rec, True, lambda: 0.0))
    assert resp.data == b"".join([role, *toks, b"data: [DONE]\n\n"])
    assert rec.usage == {"prompt_tokens": 3, "completion_tokens": 4}
    assert len(rec.gaps) == 3  # four token events; the role event is not a token


# --- the command line -------------------------------------------------------------------------


def _tracekit(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRACEKIT, *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upstream", "localhost:8000", "--out", "x"], "--upstream"),
        (["--upstream", "http://127.0.0.1:1", "--listen", "nohost", "--out", "x"], "--listen"),
        (["--upstream", "http://127.0.0.1:1", "--out", "x", "--flush-every", "0"], "--flush-every"),
    ],
)
def test_bad_flags_give_one_error_line(args: list[str], message: str) -> None:
    r = _tracekit("proxy", *args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_process_stop_keeps_the_capture(tmp_path: Path, how: str) -> None:
    """SIGINT/SIGTERM flush what is buffered; kill -9 loses at most the last interval."""
    up_port, port = free_port(), free_port()
    up = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
         f"from test_capture_proxy import fake_vllm; from aiohttp import web; "
         f"web.run_app(fake_vllm(), host='127.0.0.1', port={up_port}, print=None)"],
    )
    out = tmp_path / "cap"
    flush = "0.3" if how == "SIGKILL" else "60"
    px = subprocess.Popen(
        [*TRACEKIT, "proxy", "--upstream", f"http://127.0.0.1:{up_port}",
         "--listen", f"127.0.0.1:{port}", "--out", str(out), "--flush-every", flush],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_port(port)
        _wait_port(up_port)

        async def send() -> None:
            for _ in range(5):
                status, _, _ = await post(f"http://127.0.0.1:{port}", {"model": "a1", "prompt": [1, 2], "max_tokens": 2, "stream": True})
                assert status == 200

        asyncio.run(send())
        if how == "SIGKILL":
            time.sleep(1.0)  # > one flush interval
        px.send_signal(getattr(signal, how))
        px.wait(timeout=20)
        if how != "SIGKILL":
            assert px.returncode == 0, px.stderr.read()
        df, _ = schema.read(out)
        assert df.height == 5
        assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    finally:
        for p in (px, up):
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} never opened")
