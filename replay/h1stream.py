"""A minimal HTTP/1.1 streaming client on asyncio protocols, for dispatch precision.

Why not aiohttp for the requests themselves: with a task per request, a request's bytes
leave one event-loop iteration after its deadline (the task-start hop, behind every
stream chunk read in that iteration), and each chunk costs a task switch and a stream
reader. Here the request is written synchronously from the runner's callback at its
deadline (`dispatch_s` is stamped right before `transport.write`), and each read is one
`data_received` call that de-chunks and counts SSE events in place.

Scope: plain `http://` (no TLS), keep-alive connections from a pool, responses with
chunked transfer encoding, Content-Length, or read-until-close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any


class ResponseSink:
    """What a connection reports a response to. Methods are called on the loop thread."""

    def on_head(self, status: int, now: float) -> None: ...

    def on_body(self, data: bytes, now: float) -> bool:
        """Body bytes (de-chunked). Return True when the response needs no more reading
        as far as the caller is concerned (the connection still reads it to its end)."""
        return False

    def on_end(self, now: float) -> None: ...

    def on_lost(self, exc: BaseException | None, now: float) -> None: ...


_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _LENGTH, _UNTIL_CLOSE, _IDLE = range(8)


class _Conn(asyncio.Protocol):
    def __init__(self, pool: ConnPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.buf = b""
        self.state = _IDLE
        self.left = 0
        self.keep_alive = True
        self.closed = False
        self.idle_since = 0.0  # pool clock when it last went idle
        self.refresh: asyncio.TimerHandle | None = None  # its replacement, if it stays idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, sink: ResponseSink) -> None:
        self.sink = sink
        self.state = _HEAD
        self.buf = b""
        self.keep_alive = True
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        now = self.pool.clock()  # everything in one read arrived together
        if self.sink is None:
            # Bytes nobody asked for: the connection is out of step; drop it.
            self.abort()
            return
        buf = self.buf + data if self.buf else data
        self.buf = b""
        try:
            self._parse(buf, now)
        except ValueError as e:
            sink = self.sink
            self.abort()
            if sink is not None:
                sink.on_lost(ValueError(f"bad HTTP response: {e}"), now)

    def _parse(self, buf: bytes, now: float) -> None:
        pos = 0
        n = len(buf)
        while pos < n:
            st = self.state
            if st == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    self.buf = buf[pos:]
                    return
                self._head(buf[pos:end], now)
                pos = end + 4
            elif st == _CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    self.buf = buf[pos:]
                    return
                size = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.state, self.left = _CHUNK_DATA, size
            elif st == _CHUNK_DATA:
                take = min(self.left, n - pos)
                self._body(buf[pos:pos + take], now)
                pos += take
                self.left -= take
                if self.left == 0:
                    self.state, self.left = _CHUNK_CRLF, 2
            elif st == _CHUNK_CRLF:
                take = min(self.left, n - pos)
                pos += take
                self.left -= take
                if self.left == 0:
                    self.state = _CHUNK_SIZE
            elif st == _TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    self.buf = buf[pos:]
                    return
                empty = end == pos  # an empty line ends the trailer (fields are ignored)
                pos = end + 2
                if empty:
                    self._finish(now)
            elif st == _LENGTH:
                take = min(self.left, n - pos)
                if take:
                    self._body(buf[pos:pos + take], now)
                pos += take
                self.left -= take
                if self.left == 0:
                    self._finish(now)
            elif st == _UNTIL_CLOSE:
                self._body(buf[pos:], now)
                pos = n
            else:  # _IDLE: bytes after the response ended
                self.abort()
                return

    def _head(self, head: bytes, now: float) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError(f"status line {lines[0][:80]!r}")
        status = int(parts[1])
        chunked = False
        length: int | None = None
        self.keep_alive = parts[0] != b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                length = int(value.strip())
            elif name == b"connection":
                self.keep_alive = value.strip().lower() != b"close"
        if self.sink is not None:
            self.sink.on_head(status, now)
        if chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.state, self.left = _LENGTH, length
            if length == 0:
                self._finish(now)
        else:
            self.state = _UNTIL_CLOSE
            self.keep_alive = False

    def _body(self, data: bytes, now: float) -> None:
        if self.sink is not None and data:
            self.sink.on_body(data, now)

    def _finish(self, now: float) -> None:
        sink, self.sink = self.sink, None
        self.state = _IDLE
        if sink is not None:
            sink.on_end(now)
        if self.keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        now = self.pool.clock()
        if self.state == _UNTIL_CLOSE:
            sink.on_end(now)
        else:
            sink.on_lost(exc, now)


class _Waiter:
    """A request between `ConnPool.send` and its write."""

    __slots__ = ("data", "sink", "on_write", "conn", "cancelled")

    def __init__(self, data: Callable[[], bytes], sink: ResponseSink, on_write: Callable[[], None]):
        self.data, self.sink, self.on_write = data, sink, on_write
        self.conn: _Conn | None = None
        self.cancelled = False

    def write(self, conn: _Conn) -> None:
        self.conn = conn
        payload = self.data()
        self.on_write()  # dispatch_s: right before the bytes are written
        conn.send(payload, self.sink)

    def abort(self) -> None:
        self.cancelled = True
        if self.conn is not None:
            self.conn.abort()


# Connects in flight at once when requests wait for a connection.
MAX_CONNECTING = 4
# The server closes idle connections after its keep-alive (vLLM's
# VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default), and a request written as that close
# crosses on the wire is lost ("Server disconnected"; seen on 3 requests of a real
# two-server replay). So a connection idle MAX_IDLE_S gets a replacement, opened ahead of
# need (a request that waits for a connect is dispatched late: over a second once, on a
# busy server) and swapped in once open; one idle REUSE_LIMIT_S is never written to.
MAX_IDLE_S = 3.5
REUSE_LIMIT_S = 4.5


class ConnPool:
    """Keep-alive connections to one host; `send` writes at once on an idle connection and
    only opens a new one (asynchronously) when none is idle."""

    def __init__(self, host: str, port: int, clock: Callable[[], float], max_idle_s: float = MAX_IDLE_S,
                 reuse_limit_s: float = REUSE_LIMIT_S):
        self.host, self.port, self.clock = host, port, clock
        self.max_idle_s, self.reuse_limit_s = max_idle_s, reuse_limit_s
        self.idle: list[_Conn] = []
        self.all: set[_Conn] = set()
        self.connecting: set[asyncio.Task[Any]] = set()
        self.waiting: deque[_Waiter] = deque()

    async def _open(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        conn: _Conn = proto  # type: ignore[assignment]
        self.all.add(conn)
        return conn

    async def prewarm(self, k: int) -> None:
        """Open k idle connections before the replay starts, so early requests do not pay
        a connect."""
        conns = await asyncio.gather(*(self._open() for _ in range(k)))
        for conn in conns:
            self._idle(conn)

    def send(self, data: Callable[[], bytes], sink: ResponseSink, on_write: Callable[[], None]) -> Callable[[], None]:
        """Send a request (bytes built by `data()`); `on_write` runs right before the bytes
        are written. Returns a function that aborts the request.

        With no idle connection the request waits, first in first out, for the next
        connection to come free or to open. At most MAX_CONNECTING connects run at once:
        one connect per waiting request would burst SYNs at a busy server, and a dropped SYN
        costs a 1 s (then 3 s) retransmit."""
        w = _Waiter(data, sink, on_write)
        if self.idle:
            # The most recently idle first; past one too old, all the rest are older.
            oldest_ok = self.clock() - self.reuse_limit_s
            while self.idle:
                conn = self.idle.pop()
                if conn.closed:
                    continue
                if conn.idle_since < oldest_ok:  # its replacement is late (a starved loop)
                    for old in (conn, *self.idle):
                        self._retire(old)
                    self.idle.clear()
                    break
                if conn.refresh is not None:
                    conn.refresh.cancel()
                    conn.refresh = None
                w.write(conn)
                return w.abort
        self.waiting.append(w)
        self._maybe_connect()
        return w.abort

    def _idle(self, conn: _Conn) -> None:
        conn.idle_since = self.clock()
        self.idle.append(conn)
        with contextlib.suppress(RuntimeError):  # no running loop: a connection driven by hand
            conn.refresh = asyncio.get_running_loop().call_later(self.max_idle_s, self._refresh, conn)

    def _refresh(self, conn: _Conn) -> None:
        """`conn` stayed idle `max_idle_s`: open its replacement (at most MAX_CONNECTING
        at once, like every connect), which takes its place once open."""
        conn.refresh = None
        if conn.closed or conn not in self.idle:
            return
        loop = asyncio.get_running_loop()
        if len(self.connecting) >= MAX_CONNECTING:
            conn.refresh = loop.call_later(0.05, self._refresh, conn)
            return
        task = loop.create_task(self._replace(conn))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _replace(self, old: _Conn) -> None:
        try:
            new = await self._open()
        except OSError:
            return  # `old` stays until the reuse limit; a request then connects itself
        if old in self.idle:
            self.idle.remove(old)
            self._retire(old)
        self.release(new)

    @staticmethod
    def _retire(conn: _Conn) -> None:
        conn.closed = True
        if conn.refresh is not None:
            conn.refresh.cancel()
            conn.refresh = None
        if conn.transport is not None:
            conn.transport.close()

    def _maybe_connect(self) -> None:
        live = sum(1 for x in self.waiting if not x.cancelled)
        while len(self.connecting) < min(MAX_CONNECTING, live):
            task = asyncio.get_running_loop().create_task(self._connect())
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect(self) -> None:
        try:
            conn = await self._open()
        except OSError as e:
            # The server is unreachable: the oldest waiting request fails with the reason.
            while self.waiting:
                w = self.waiting.popleft()
                if not w.cancelled:
                    w.sink.on_lost(e, self.clock())
                    break
            asyncio.get_running_loop().call_soon(self._maybe_connect)
            return
        self.release(conn)
        asyncio.get_running_loop().call_soon(self._maybe_connect)

    def release(self, conn: _Conn) -> None:
        while self.waiting:
            w = self.waiting.popleft()
            if not w.cancelled:
                w.write(conn)
                return
        self._idle(conn)

    def discard(self, conn: _Conn) -> None:
        self.all.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        for t in list(self.connecting):
            t.cancel()
        for conn in list(self.all):
            self._retire(conn)
        self.idle.clear()
