"""`tracekit proxy` against a deterministic fake vLLM upstream (fast, no vLLM needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import polars as pl
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


ABORTED = web.AppKey("aborted", list)
FAKE_BLOCK_SIZE = 4  # the fake server's KV block size, as its /metrics reports it


def fake_tokens(text: str) -> list[int]:
    """The fake server's tokenizer: one id per whitespace-separated word."""
    return [zlib.crc32(w.encode()) % 1000 + 3 for w in text.split()]


def fake_chat_text(messages: list[dict[str, Any]]) -> str:
    return "".join(f"{m['role']}: {m['content']} " for m in messages) + "assistant:"


def fake_vllm() -> web.Application:
    """Answers like vLLM 0.32. Test-only request fields: `fake_queue_s` (seconds before
    the server answers, as a queued request waits), `fake_token_s` (seconds per streamed
    token). `app[ABORTED]` collects the times at which a request's connection went
    away before its answer was complete (vLLM aborts such a request)."""
    aborted: list[float] = []

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": BASE, "object": "model", "root": "/models/base", "parent": None},
            {"id": "a1", "object": "model", "root": "/nonexistent/a1", "parent": BASE},
        ]})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text='# HELP vllm:cache_config_info x\n'
                            f'vllm:cache_config_info{{block_size="{FAKE_BLOCK_SIZE}",enable_prefix_caching="True",'
                            'engine="0"}} 1.0\n')

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        text = fake_chat_text(body["messages"]) if "messages" in body else body["prompt"]
        toks = fake_tokens(text)
        return web.json_response({"tokens": toks, "count": len(toks), "max_model_len": 2048})

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "Invalid JSON", "type": "BadRequestError", "code": 400}},
                                     status=400)
        try:
            return await answer(request, body)
        except (asyncio.CancelledError, ConnectionResetError):
            aborted.append(time.perf_counter())
            raise

    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        prompt = body.get("prompt") or body.get("messages")
        if isinstance(prompt, str):
            ptoks = len(fake_tokens(prompt))
        elif "messages" in body:
            ptoks = len(fake_tokens(fake_chat_text(body["messages"])))
        else:
            ptoks = len(prompt)
        n = int(body.get("max_tokens", 4))
        if body.get("fake_queue_s"):
            await asyncio.sleep(float(body["fake_queue_s"]))
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
            await asyncio.sleep(float(body.get("fake_token_s", 0.002)))
        await resp.write_eof()
        return resp

    app = web.Application()
    app[ABORTED] = aborted
    app.router.add_get("/v1/models", models)
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def with_proxy(tmp: Path, fn: Callable[..., Any], upstream: bool = True,
                     keep_token_ids: bool = False, out: Path | None = None, flush_every: float = 30.0,
                     drain_timeout: float = 30.0, stop_inside: bool = False,
                     cut_now: asyncio.Event | None = None) -> ProxyState:
    """Run `fn(url, state)` against a proxy in front of the fake server; with
    `stop_inside`, `fn(url, state, stop, served, app)` stops the proxy itself and awaits
    `served` (serve's task)."""
    runner = None
    up_port = free_port()
    app = fake_vllm()
    if upstream:
        # As vLLM: the server notices at once that a client went away.
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", up_port).start()
    state = ProxyState(upstream=f"http://127.0.0.1:{up_port}", out_dir=out or tmp / "cap",
                       flush_every_s=flush_every, keep_token_ids=keep_token_ids, drain_timeout_s=drain_timeout)
    port = free_port()
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(state, "127.0.0.1", port, ready=ready, stop=stop, cut_now=cut_now))
    await ready.wait()
    try:
        if stop_inside:
            await fn(f"http://127.0.0.1:{port}", state, stop, task, app)
        else:
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
    from tracekit.metrics import summarize

    s = summarize(df)
    assert (s["completed"], s["cancelled"], s["errors"]) == (1, 1, 0)  # a hang-up is neither served nor an error


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


def test_upstream_going_down_mid_run_gives_502_rows_and_the_proxy_keeps_serving(tmp_path: Path) -> None:
    """The server goes away between requests (kept-alive connections to it die with it),
    then comes back on the same port: 502s with their rows meanwhile, served again after."""
    up_port = free_port()

    async def start_upstream() -> web.AppRunner:
        runner = web.AppRunner(fake_vllm(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", up_port, reuse_address=True).start()
        return runner

    async def main() -> ProxyState:
        runner = await start_upstream()
        state = ProxyState(upstream=f"http://127.0.0.1:{up_port}", out_dir=tmp_path / "cap", flush_every_s=30.0)
        port = free_port()
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(state, "127.0.0.1", port, ready=ready, stop=stop))
        await ready.wait()
        url = f"http://127.0.0.1:{port}"
        statuses = []
        try:
            for stream in (False, True):
                statuses.append((await post(url, {"model": "a1", "prompt": [1, 2], "max_tokens": 2, "stream": stream}))[0])
            await runner.cleanup()  # the server goes down
            for stream in (False, True):
                st_, data, _ = await post(url, {"model": "a1", "prompt": [1, 2, 3], "max_tokens": 2, "stream": stream})
                assert b"upstream unreachable" in data
                statuses.append(st_)
            runner = await start_upstream()  # and comes back
            for stream in (False, True):
                statuses.append((await post(url, {"model": "a1", "prompt": [1], "max_tokens": 2, "stream": stream}))[0])
        finally:
            stop.set()
            await task
            await runner.cleanup()
        assert statuses == [200, 200, 502, 502, 200, 200]
        return state

    state = asyncio.run(main())
    assert state.stats.upstream_errors == 2
    df, _ = schema.read(tmp_path / "cap")
    assert df["status"].to_list() == ["ok", "ok", "error", "error", "ok", "ok"]
    assert df["error"][2].startswith("upstream unreachable") and df["prompt_tokens"].to_list()[2:4] == [3, 3]


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


def test_rows_kept_while_unwritable_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the bound, the oldest unwritten rows go (counted); the rest are written once
    the directory works again."""
    from tracekit.capture import rows as rows_mod

    monkeypatch.setattr(rows_mod, "MAX_BUFFERED_ROWS", 3)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    w = rows_mod.CaptureWriter(blocker / "cap", lambda: schema.new_context(source="test"))
    recs = [Record(arrival=float(i), model="a1", prompt_ids=[1, 2], max_tokens=2) for i in range(5)]
    for i, rec in enumerate(recs):
        rec.usage, rec.end, rec.done = {"prompt_tokens": 2, "completion_tokens": 2}, float(i) + 0.5, True
        w.add(rows_mod.row_of(rec, f"r{i}", "a1", False))
    asyncio.run(w.flush())
    assert (w.write_errors, w.rows_dropped, len(w.rows)) == (1, 2, 3)
    blocker.unlink()
    asyncio.run(w.flush())
    df, _ = schema.read(blocker / "cap")
    assert df["request_id"].to_list() == ["r2", "r3", "r4"] and w.rows_written == 3


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
        (["--upstream", "http://127.0.0.1:1", "--out", "x", "--drain-timeout", "-1"], "--drain-timeout"),
        (["--upstream", "http://127.0.0.1:1", "--out", "x", "--prefix-block-tokens", "0"], "--prefix-block-tokens"),
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
    as_json = ["--json"] if how == "SIGINT" else []  # the same summary, for scripts
    px = subprocess.Popen(
        [*TRACEKIT, "proxy", "--upstream", f"http://127.0.0.1:{up_port}",
         "--listen", f"127.0.0.1:{port}", "--out", str(out), "--flush-every", flush, *as_json],
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
            summary = px.stdout.read()
            if as_json:
                got = json.loads(summary)
                assert got["requests_recorded"] == got["rows_written"] == 5 and got["by_status"]["ok"] == 5, got
                assert got["parts"] == 1 and got["by_status"]["unfinished"] == 0
            else:
                assert "5 (ok 5," in summary and "rows written" in summary and "5 in 1 parts" in summary, summary
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


# --- every request has its row: stops, hang-ups, bad bodies ----------------------------------


def test_stop_drains_in_flight_requests_then_cuts_the_rest(tmp_path: Path) -> None:
    """A stop lets short requests finish, ends those still running at the drain timeout
    (the server sees them go away), records every one, and only then writes."""
    drain = 1.0

    async def fn(url: str, state: ProxyState, stop: asyncio.Event, served: asyncio.Task[Any], app: Any) -> None:
        async with aiohttp.ClientSession() as s:

            async def one(n: int, token_s: float, stream: bool) -> int:
                body = {"model": "a1", "prompt": [1, 2, 3], "max_tokens": n, "stream": stream,
                        "fake_queue_s": 0.0 if stream else n * token_s, "fake_token_s": token_s}
                try:
                    async with s.post(url + "/v1/completions", json=body) as r:
                        await r.read()
                        return r.status
                except aiohttp.ClientError:
                    return -1

            short = [asyncio.create_task(one(5, 0.05, st)) for st in (True, False)]
            long = [asyncio.create_task(one(400, 0.05, st)) for st in (True, False, True)]
            await asyncio.sleep(0.1)
            t = time.perf_counter()
            stop.set()
            await served
            took = time.perf_counter() - t
            assert drain <= took < drain + 3.0, took
            assert [await x for x in short] == [200, 200]
            await asyncio.gather(*long)
            await asyncio.sleep(0.2)
            assert len(app[ABORTED]) == 3  # the cut requests were aborted upstream

    state = asyncio.run(with_proxy(tmp_path, fn, drain_timeout=drain, stop_inside=True))
    df, _ = schema.read(tmp_path / "cap")
    assert df.height == 5 == state.stats.recorded == state.writer.rows_written
    assert sorted(df["status"].to_list()) == ["ok", "ok", "unfinished", "unfinished", "unfinished"]
    cut = df.filter(pl.col("status") == "unfinished")
    assert cut["error"].str.contains("drain").all() and (cut["output_tokens"] == 400).all()
    assert state.stats.drained == 2 and state.stats.by_status["unfinished"] == 3


def test_a_second_signal_ends_the_drain_at_once(tmp_path: Path) -> None:
    cut_now = asyncio.Event()  # what a second SIGTERM/SIGINT sets

    async def fn(url: str, state: ProxyState, stop: asyncio.Event, served: asyncio.Task[Any], app: Any) -> None:
        async with aiohttp.ClientSession() as s:
            body = {"model": "a1", "prompt": [1], "max_tokens": 1000, "stream": True, "fake_token_s": 0.05}
            req = asyncio.create_task(s.post(url + "/v1/completions", json=body))
            await asyncio.sleep(0.2)
            t = time.perf_counter()
            stop.set()
            await asyncio.sleep(0.2)
            assert not served.done()  # draining (30 s)
            cut_now.set()
            await served
            assert time.perf_counter() - t < 3
            with contextlib.suppress(aiohttp.ClientError):
                r = await req
                await r.read()

    asyncio.run(with_proxy(tmp_path, fn, stop_inside=True, cut_now=cut_now))
    df, _ = schema.read(tmp_path / "cap")
    assert df["status"].to_list() == ["unfinished"]


@pytest.mark.parametrize("stream", [False, True])
def test_hang_up_while_queued_aborts_upstream_at_once(tmp_path: Path, stream: bool) -> None:
    """The client goes away while the server has not answered yet (queued, or before its
    first token): the proxy drops the upstream connection at once."""

    async def fn(url: str, state: ProxyState, stop: asyncio.Event, served: asyncio.Task[Any], app: Any) -> None:
        body = {"model": "a1", "prompt": [1, 2], "max_tokens": 3, "stream": stream, "fake_queue_s": 30}
        async with aiohttp.ClientSession() as s:
            req = asyncio.create_task(s.post(url + "/v1/completions", json=body))
            await asyncio.sleep(0.3)
            t = time.perf_counter()
            req.cancel()  # the client hangs up
            with contextlib.suppress(asyncio.CancelledError):
                await req
        deadline = time.perf_counter() + 5
        while not app[ABORTED] and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        assert app[ABORTED] and app[ABORTED][0] - t < 1.0

    asyncio.run(with_proxy(tmp_path, fn, stop_inside=True))
    df, _ = schema.read(tmp_path / "cap")
    row = df.row(0, named=True)
    assert row["status"] == "cancelled" and "hung up before the answer" in row["error"]
    assert row["output_tokens"] == 3 and row["prompt_tokens"] == 2


def test_body_that_is_not_json_is_forwarded_and_recorded(tmp_path: Path) -> None:
    async def fn(url: str, state: ProxyState) -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", data=b'{"model": "a1", "prompt": [1', headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400 and b"Invalid JSON" in await r.read()
            async with s.post(url + "/v1/chat/completions", data=b"[1, 2]") as r:
                assert r.status == 200 or r.status >= 400

    asyncio.run(with_proxy(tmp_path, fn))
    df, _ = schema.read(tmp_path / "cap")
    assert df.height == 2 and df["status"].to_list() == ["error", "error"]
    assert "not a JSON object" in df["error"][0] and "HTTP 400: Invalid JSON" in df["error"][0]


def test_every_request_has_exactly_one_row_whatever_happens(tmp_path: Path) -> None:
    """A mix of served, failed, malformed, hung-up and cut requests, then a stop."""
    rng = random.Random(7)
    kinds = [rng.choice(["ok", "ok-stream", "unknown", "bad-json", "hangup", "long"]) for _ in range(40)]

    async def fn(url: str, state: ProxyState, stop: asyncio.Event, served: asyncio.Task[Any], app: Any) -> None:
        async with aiohttp.ClientSession() as s:

            async def one(kind: str) -> None:
                await asyncio.sleep(rng.uniform(0, 0.3))
                body: Any = {"model": "a1", "prompt": [1, 2, 3], "max_tokens": 4, "stream": kind != "ok"}
                if kind == "unknown":
                    body["model"] = "nope"
                if kind in ("hangup", "long"):
                    body.update(max_tokens=500, fake_token_s=0.02)
                data = b"{oops" if kind == "bad-json" else json.dumps(body).encode()
                try:
                    async with s.post(url + "/v1/completions", data=data) as r:
                        if kind == "hangup":
                            await r.content.readline()
                            return  # leaving the block closes the connection mid-stream
                        await r.read()
                except aiohttp.ClientError:
                    pass

            tasks = [asyncio.create_task(one(k)) for k in kinds]
            await asyncio.sleep(0.8)
            stop.set()
            await served
            await asyncio.gather(*tasks)

    state = asyncio.run(with_proxy(tmp_path, fn, drain_timeout=0.5, stop_inside=True))
    df, _ = schema.read(tmp_path / "cap")
    assert df.height == len(kinds) == state.stats.recorded and df["request_id"].n_unique() == len(kinds)
    got = Counter(df["status"].to_list())
    want_ok = sum(k in ("ok", "ok-stream") for k in kinds)
    assert got["ok"] == want_ok and got["unfinished"] == kinds.count("long")
    assert got["cancelled"] == kinds.count("hangup")
    assert got["error"] == kinds.count("unknown") + kinds.count("bad-json")


# --- prefix hashes ----------------------------------------------------------------------------


def test_prefix_hashes_of_token_text_and_chat_prompts(tmp_path: Path) -> None:
    """One hash per full block of the server's block size (from its /metrics); equal
    prefixes of one adapter hash equal, another adapter or another prefix does not; text
    and chat prompts are tokenized by the server (/tokenize, chat template applied)."""
    words = [f"w{i}" for i in range(30)]
    U1, U2 = "hi there how are you today my friend", "bye now see you later then my friend"  # noqa: N806
    system = {"role": "system", "content": " ".join(words[:10])}

    async def fn(url: str, state: ProxyState) -> None:
        reqs = [
            ("/v1/completions", {"model": "a1", "prompt": list(range(10, 22)), "max_tokens": 2}),  # 3 blocks
            ("/v1/completions", {"model": "a1", "prompt": [*range(10, 18), 99, 98, 97, 96, 95], "max_tokens": 2}),
            ("/v1/completions", {"model": "a2", "prompt": list(range(10, 22)), "max_tokens": 2}),
            ("/v1/completions", {"model": "a1", "prompt": " ".join(words[:12]), "max_tokens": 2}),
            ("/v1/completions", {"model": "a1", "prompt": " ".join(words[:8] + ["x"] * 5), "max_tokens": 2,
                                 "stream": True}),
            ("/v1/chat/completions", {"model": "a1", "messages": [system, {"role": "user", "content": U1}],
                                      "max_tokens": 2}),
            ("/v1/chat/completions", {"model": "a1", "messages": [system, {"role": "user", "content": U2}],
                                      "max_tokens": 2, "stream": True}),
        ]
        for path, body in reqs:
            status, _, _ = await post(url, body, path=path)
            assert status == 200

    state = asyncio.run(with_proxy(tmp_path, fn))
    df, meta = schema.read(tmp_path / "cap")
    assert meta.context[schema.CTX_PREFIX_BLOCK_TOKENS] == FAKE_BLOCK_SIZE
    h = df["prefix_hashes"].to_list()
    assert [len(x) for x in h[:3]] == [3, 3, 3]
    assert h[0][:2] == h[1][:2] and h[0][2] != h[1][2]  # 8 shared tokens: two shared blocks
    assert not set(h[0]) & set(h[2])  # another adapter shares nothing
    assert len(h[3]) == 3 and h[3][:2] == h[4][:2] and h[3][2] != h[4][2]
    chat_ids = [fake_tokens(fake_chat_text([system, {"role": "user", "content": c}])) for c in (U1, U2)]
    assert [len(x) for x in h[5:]] == [len(x) // FAKE_BLOCK_SIZE for x in chat_ids]
    shared = next(i for i, (a, b) in enumerate(zip(*chat_ids, strict=False)) if a != b) // FAKE_BLOCK_SIZE
    assert shared >= 2 and h[5][:shared] == h[6][:shared] and h[5][shared] != h[6][shared]
    assert state.stats.hash_errors == 0
    # The key is the capture's own: written nowhere, so unkeyed hashes do not match.
    from tracekit.prefix import block_hashes

    assert block_hashes(list(range(10, 22)), "a1", FAKE_BLOCK_SIZE) != h[0]


def test_the_drain_ends_when_the_last_request_does(tmp_path: Path) -> None:
    """With a long drain timeout, a stop takes as long as the requests in flight, not the
    timeout (handlers on kept-alive connections included)."""

    async def fn(url: str, state: ProxyState, stop: asyncio.Event, served: asyncio.Task[Any], app: Any) -> None:
        async with aiohttp.ClientSession() as s:  # one kept-alive connection for both requests
            status, _, _ = await post(url, {"model": "a1", "prompt": [1], "max_tokens": 2})
            body = {"model": "a1", "prompt": [1], "max_tokens": 10, "stream": True, "fake_token_s": 0.05}
            async with s.post(url + "/v1/completions", json=body) as r:
                await r.content.readline()
                t = time.perf_counter()
                stop.set()
                await r.read()
            await served
            assert time.perf_counter() - t < 3.0  # the drain timeout is 30 s

    asyncio.run(with_proxy(tmp_path, fn, stop_inside=True))
    df, _ = schema.read(tmp_path / "cap")
    assert df["status"].to_list() == ["ok", "ok"]


def test_a_request_still_arriving_at_the_stop_is_refused_and_recorded(tmp_path: Path) -> None:
    """Its headers came before the stop, its body after: not forwarded, a 503, a row."""

    async def fn(url: str, state: ProxyState, stop: asyncio.Event, served: asyncio.Task[Any], app: Any) -> None:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"model": "a1", "prompt": [1, 2], "max_tokens": 3}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.sleep(0.2)
        writer.write(body)
        await writer.drain()
        head = await reader.readline()
        assert b"503" in head
        writer.close()
        await served

    asyncio.run(with_proxy(tmp_path, fn, stop_inside=True))
    df, _ = schema.read(tmp_path / "cap")
    assert df["status"].to_list() == ["error"] and "stopping" in df["error"][0]
    assert df["adapter"][0] == "a1" and df["output_tokens"][0] == 3
