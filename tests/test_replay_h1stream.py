"""replay.h1stream: the HTTP/1.1 response parser, fed a response split at arbitrary points."""

from __future__ import annotations

import asyncio
import contextlib
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from replay.h1stream import ConnPool, ResponseSink, _Conn


class Sink(ResponseSink):
    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.ended = 0
        self.lost: list[BaseException | None] = []

    def on_head(self, status: int, now: float) -> None:
        self.status = status

    def on_body(self, data: bytes, now: float) -> bool:
        self.body += data
        return False

    def on_end(self, now: float) -> None:
        self.ended += 1

    def on_lost(self, exc: BaseException | None, now: float) -> None:
        self.lost.append(exc)


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


def chunked(parts: list[bytes]) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in parts:
        out += f"{len(p):x}".encode() + b"\r\n" + p + b"\r\n"
    return out + b"0\r\n\r\n"


def feed(conn: _Conn, data: bytes, cuts: list[int]) -> None:
    pos = 0
    for c in sorted(set(x % (len(data) + 1) for x in cuts)) + [len(data)]:
        if c > pos:
            conn.data_received(data[pos:c])
            pos = c


def new_conn() -> tuple[ConnPool, _Conn, FakeTransport]:
    pool = ConnPool("127.0.0.1", 1, clock=lambda: 0.0)
    conn = _Conn(pool)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    pool.all.add(conn)
    return pool, conn, t


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
       cuts=st.lists(st.integers(0, 10_000), max_size=12),
       second_len=st.integers(0, 30))
def test_any_split_gives_the_same_body_and_keep_alive_reuse(parts: list[bytes], cuts: list[int], second_len: int) -> None:
    pool, conn, t = new_conn()
    s1 = Sink()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", s1)
    feed(conn, chunked(parts), cuts)
    assert (s1.status, s1.body, s1.ended, s1.lost) == (200, b"".join(parts), 1, [])
    assert pool.idle == [conn] and not t.aborted  # back in the pool after the terminating chunk
    # The same connection carries a Content-Length response next.
    pool.idle.clear()
    s2 = Sink()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", s2)
    body = bytes(range(second_len))
    feed(conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % second_len + body, cuts)
    assert (s2.status, s2.body, s2.ended) == (404, body, 1)
    assert t.written == b"GET / HTTP/1.1\r\n\r\n" * 2


def test_connection_close_response_is_not_reused_and_garbage_is_an_error() -> None:
    pool, conn, t = new_conn()
    s = Sink()
    conn.send(b"x", s)
    conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert s.ended == 1 and pool.idle == [] and t.aborted
    pool, conn, t = new_conn()
    s = Sink()
    conn.send(b"x", s)
    conn.data_received(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert t.aborted and len(s.lost) == 1 and "bad HTTP response" in str(s.lost[0])


def test_drop_mid_stream_reports_lost_and_read_until_close_reports_end() -> None:
    pool, conn, _ = new_conn()
    s = Sink()
    conn.send(b"x", s)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    conn.connection_lost(ConnectionResetError("reset"))
    assert s.ended == 0 and len(s.lost) == 1 and s.body == b"hel" and conn not in pool.all
    pool, conn, _ = new_conn()
    s = Sink()
    conn.send(b"x", s)
    conn.data_received(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    conn.connection_lost(None)
    assert s.ended == 1 and s.lost == [] and s.body == b"all of it"


async def _serve_counting(conns: list[int]) -> tuple[asyncio.AbstractServer, int]:
    """A keep-alive HTTP server on a free port answering every request "ok"; appends to
    `conns` the number of the connection that served each request."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    opened = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n, opened[0] = opened[0], opened[0] + 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                conns.append(n)
                writer.write(answer)
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _get(pool: ConnPool) -> int:
    s = Sink()
    pool.send(lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", s, lambda: None)
    for _ in range(400):
        await asyncio.sleep(0.005)
        if s.ended:
            break
    return s.ended


def test_an_idle_connection_past_the_servers_keep_alive_is_not_reused() -> None:
    """A connection idle for up to `reuse_limit_s` carries the next request; one idle
    longer (the server may be closing it: vLLM's keep-alive is 5 s) is closed and the
    request goes on a new connection (the pool's clock, set by hand: no replacement timer
    fires)."""

    async def run() -> tuple[list[int], list[int]]:
        conns: list[int] = []
        server, port = await _serve_counting(conns)
        now = [0.0]
        pool = ConnPool("127.0.0.1", port, clock=lambda: now[0], max_idle_s=60.0, reuse_limit_s=4.5)
        await pool.prewarm(1)
        ended = []
        for t in (0.0, 4.4, 9.0, 9.5):  # reuse at 4.4 s idle; at 4.6 s idle, a new one
            now[0] = t
            ended.append(await _get(pool))
        pool.close()
        server.close()
        return conns, ended

    conns, ended = asyncio.run(run())
    assert ended == [1, 1, 1, 1]
    assert conns == [0, 0, 1, 1], conns


def test_an_idle_connection_is_replaced_ahead_of_the_next_request() -> None:
    """After `max_idle_s` idle, the pool opens a connection's replacement and swaps it in
    once open, so the next request finds a fresh idle connection and waits for no
    connect."""

    async def run() -> tuple[list[int], int, bool]:
        conns: list[int] = []
        server, port = await _serve_counting(conns)
        pool = ConnPool("127.0.0.1", port, clock=time.perf_counter, max_idle_s=0.2)
        await pool.prewarm(1)
        first = pool.idle[0]
        await asyncio.sleep(0.5)  # past max_idle_s: replaced
        fresh = len(pool.idle) == 1 and pool.idle[0] is not first and first.closed
        ended = await _get(pool)
        pool.close()
        server.close()
        return conns, ended, fresh

    conns, ended, fresh = asyncio.run(run())
    assert fresh and ended == 1
    # Served on a replacement (one every 0.2 s idle), not on the first connection.
    assert len(conns) == 1 and conns[0] >= 1, conns
