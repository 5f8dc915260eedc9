"""The `vllm` target: a running vLLM OpenAI-compatible server, over streaming HTTP.

Each request goes to `/v1/completions` with its adapter as `model` (the served base model
when null), a prompt of exactly `prompt_tokens` token ids, `max_tokens = output_tokens`
and `ignore_eos`, so the server does the work the trace recorded. Adapters the server
does not know are loaded through `/v1/load_lora_adapter` before anything is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import polars as pl

from replay.h1stream import ConnPool, ResponseSink
from replay.runner import ERROR, OK, TIMEOUT, Recorder
from tracekit.schema import TracekitError, adapter_ranks

# Token ids drawn for prompts the trace did not capture: a band of ordinary tokens in
# every common vocabulary (special ids sit at the very start or the very end).
DEFAULT_TOKEN_ID_RANGE = (1000, 2000)
ERROR_TEXT_MAX = 300
# Connections opened before the replay starts (more are opened when a burst needs them).
PREWARM_CONNECTIONS = 16
# Set to "aiohttp" to send with aiohttp, a task per request (the earlier client; kept as an
# escape hatch and as the fidelity benchmark's baseline).
HTTP_CLIENT_ENV = "TRACEKIT_REPLAY_HTTP"


@dataclass
class ServerInfo:
    base_model: str
    known: set[str]


async def server_info(session: aiohttp.ClientSession, url: str, base_model: str | None) -> ServerInfo:
    try:
        async with session.get(f"{url}/v1/models") as resp:
            if resp.status != 200:
                raise TracekitError(f"--url {url}: GET /v1/models answered HTTP {resp.status}")
            data = (await resp.json()).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        raise TracekitError(f"--url {url}: cannot reach the server ({type(e).__name__}: {e})") from None
    ids = [str(m.get("id")) for m in data]
    if base_model is None:
        bases = [str(m.get("id")) for m in data if not m.get("parent")]
        if not bases:
            raise TracekitError(f"--url {url}: /v1/models lists no base model; pass --model")
        base_model = bases[0]
    return ServerInfo(base_model=base_model, known=set(ids))


def _adapter_rank_on_disk(folder: Path) -> int | None:
    cfg = folder / "adapter_config.json"
    try:
        return int(json.loads(cfg.read_text()).get("r"))
    except (OSError, ValueError, TypeError):
        return None


def resolve_adapters(
    needed: list[str], known: set[str], context: Mapping[str, Any], lora_dir: str | os.PathLike[str] | None
) -> dict[str, str]:
    """Adapter name -> local path for every needed adapter the server does not know.

    Order: the path in the trace context, `lora_dir/<name>`, then a folder in `lora_dir`
    holding an adapter of the same rank (so many synthetic adapters run on copies of a
    few real ones). Raises naming every adapter that cannot be found."""
    infos = context.get("adapters") or {}
    ranks = adapter_ranks(context)
    by_rank: dict[int, Path] = {}
    root = Path(lora_dir) if lora_dir else None
    if root is not None:
        if not root.is_dir():
            raise TracekitError(f"--lora-dir {root}: not a directory")
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            r = _adapter_rank_on_disk(sub)
            if r is not None:
                by_rank.setdefault(r, sub)
    out: dict[str, str] = {}
    missing: list[str] = []
    for name in needed:
        if name in known:
            continue
        info = infos.get(name)
        path = info.get("path") if isinstance(info, Mapping) else None
        if path and (Path(path) / "adapter_config.json").is_file():
            out[name] = str(Path(path).resolve())
        elif root is not None and (root / name / "adapter_config.json").is_file():
            out[name] = str((root / name).resolve())
        elif root is not None and ranks.get(name) in by_rank:
            out[name] = str(by_rank[ranks[name]].resolve())
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        hint = "" if root is not None else " (pass --lora-dir DIR)"
        raise TracekitError(
            f"{len(missing)} adapter(s) unknown to the server and not found: {shown}{hint}; nothing was sent"
        )
    return out


async def load_adapters(session: aiohttp.ClientSession, url: str, paths: Mapping[str, str]) -> None:
    for name, path in paths.items():
        try:
            async with session.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}) as resp:
                text = await resp.text()
                # A concurrent loader (or an earlier run) may have registered it already.
                if resp.status != 200 and "already" not in text.lower():
                    raise TracekitError(
                        f"loading adapter {name!r} from {path} failed: HTTP {resp.status}: {text[:200]}"
                        " (is VLLM_ALLOW_RUNTIME_LORA_UPDATING=True set on the server?)"
                    )
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise TracekitError(f"loading adapter {name!r}: {type(e).__name__}: {e}") from None


class PromptSource:
    """Exactly `prompt_tokens` ids per request, in this order of preference:
    - the captured ids (`prompt_token_ids`, when of the right length);
    - ids rebuilt from `prefix_hashes` (a capture's, `block_tokens` per hash, from the
      trace's context): equal hash chains give equal token prefixes, so the server's
      prefix cache hits where it hit on the captured traffic (`tracekit.prefix`);
    - ids drawn from one seeded generator in request order (requests start in trace
      order, so a run is reproducible)."""

    def __init__(self, trace: pl.DataFrame, seed: int, id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE,
                 block_tokens: int | None = None):
        self.lengths = trace["prompt_tokens"].to_numpy()
        self.captured: list[list[int] | None] | None = None
        if "prompt_token_ids" in trace.columns:
            self.captured = trace["prompt_token_ids"].to_list()
        self.block_tokens = int(block_tokens) if block_tokens else None
        self.hash_valid: np.ndarray | None = None
        if "prefix_hashes" in trace.columns and self.block_tokens:
            import pyarrow as pa

            arr = trace["prefix_hashes"].to_arrow()
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            # Offsets and values, not Python lists: a long capture holds millions of hashes.
            self.hash_valid = arr.is_valid().to_numpy(zero_copy_only=False)
            counts = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            self.hash_off = np.zeros(counts.size + 1, np.int64)
            np.cumsum(counts, out=self.hash_off[1:])
            self.hash_val = arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        # One generator: building one per request costs more than the rest of a send.
        self.rng = np.random.default_rng(seed)
        self.lo, self.hi = id_range

    def ids(self, i: int) -> list[int]:
        n = int(self.lengths[i])
        if self.captured is not None:
            got = self.captured[i]
            if got is not None and len(got) == n:
                return got
        if self.hash_valid is not None and self.hash_valid[i]:
            from tracekit.prefix import tokens_from_block_hashes

            a, b = self.hash_off[i], self.hash_off[i + 1]
            _, values = tokens_from_block_hashes(
                np.array([n]), np.array([0, b - a]), self.hash_val[a:b], self.block_tokens,  # type: ignore[arg-type]
                id_range=(self.lo, self.hi), first_request=i,
            )
            return values.tolist()
        return self.rng.integers(self.lo, self.hi, size=n).tolist()


class VllmSender:
    """Builds and streams one request; fills the Recorder row. One instance per run."""

    def __init__(self, session: aiohttp.ClientSession, url: str, trace: pl.DataFrame, base_model: str,
                 prompts: PromptSource, request_timeout_s: float | None, clock: Any):
        self.session = session
        self.endpoint = f"{url}/v1/completions"
        self.model_json = [json.dumps(a if a is not None else base_model).encode() for a in trace["adapter"].to_list()]
        self.output_tokens = trace["output_tokens"].to_numpy()
        self.prompts = prompts
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self.clock = clock
        self.headers = {"Content-Type": "application/json"}
        self.request_timeout_s = request_timeout_s
        self.pool: ConnPool | None = None
        self.ready: dict[int, bytes] = {}
        u = urlsplit(url)
        if u.scheme == "http" and u.hostname and os.environ.get(HTTP_CLIENT_ENV, "h1") != "aiohttp":
            # Plain HTTP: requests go through the synchronous-dispatch client (h1stream);
            # https stays on aiohttp (`__call__`).
            self.pool = ConnPool(u.hostname, u.port or 80, clock)
            path = (u.path.rstrip("/") + "/v1/completions").encode()
            host = (u.netloc or u.hostname).encode()
            self.head = (b"POST " + path + b" HTTP/1.1\r\nHost: " + host
                         + b"\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: ")

    @property
    def start(self) -> Any:
        """`start(i, rec) -> Future`, the runner's synchronous send, when the URL allows it."""
        return self._start if self.pool is not None else None

    async def prepare(self, n: int) -> None:
        if self.pool is not None:
            await self.pool.prewarm(min(n, PREWARM_CONNECTIONS))

    def prebuild(self, i: int) -> None:
        """Build request i's bytes ahead of its deadline (the runner calls this before it
        waits), so the time at the deadline is one write."""
        if self.pool is not None and i not in self.ready:
            body = self.body(i)
            self.ready[i] = self.head + str(len(body)).encode() + b"\r\n\r\n" + body

    def _request_bytes(self, i: int) -> bytes:
        self.prebuild(i)
        return self.ready.pop(i)

    def _start(self, i: int, rec: Recorder) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        sink = _SseSink(self, i, rec, fut)
        t0 = rec.t0
        clock = self.clock

        def stamp() -> None:
            rec.dispatch[i] = clock() - t0

        assert self.pool is not None
        sink.abort = self.pool.send(lambda: self._request_bytes(i), sink, stamp)
        if self.request_timeout_s is not None:
            sink.timer = loop.call_later(self.request_timeout_s, sink.on_timeout)
        fut.add_done_callback(sink.on_future_done)
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def body(self, i: int) -> bytes:
        # Assembled by hand: json.dumps of a long id list is most of a request's CPU.
        ids = ",".join(map(str, self.prompts.ids(i))).encode()
        return (b'{"model":' + self.model_json[i] + b',"prompt":[' + ids + b'],"max_tokens":'
                + str(int(self.output_tokens[i])).encode()
                + b',"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}')

    async def __call__(self, i: int, rec: Recorder) -> None:
        data = self.body(i)
        clock, t0 = self.clock, rec.t0
        first = last = None
        gaps: list[float] = []
        usage_tokens = None
        chunks = 0
        buf = b""
        done = False
        rec.dispatch[i] = clock() - t0
        try:
            async with self.session.post(self.endpoint, data=data, timeout=self.timeout, headers=self.headers) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:ERROR_TEXT_MAX]
                    self._fail(i, rec, ERROR, f"HTTP {resp.status}: {_error_message(text)}")
                    return
                async for piece in resp.content.iter_any():
                    now = clock()  # every event in one read arrived together
                    buf += piece.replace(b"\r\n", b"\n") if b"\r" in piece else piece
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        if not ev.startswith(b"data:"):
                            continue
                        payload = ev[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        # Token chunks are counted without parsing them (the bulk of the
                        # stream); usage, error and unexpected events are parsed.
                        if b'"choices":[{' not in payload or b'"usage":{' in payload:
                            obj = json.loads(payload)
                            if "error" in obj:
                                msg = _error_message(json.dumps(obj["error"] if isinstance(obj["error"], dict) else obj))
                                self._fail(i, rec, ERROR, f"stream error: {msg}", first, last, chunks, gaps)
                                return
                            usage = obj.get("usage")
                            if usage:
                                usage_tokens = usage.get("completion_tokens")
                                details = usage.get("prompt_tokens_details")
                                # vLLM reports it with --enable-prompt-tokens-details.
                                if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                                    rec.cached[i] = details["cached_tokens"]
                            if not obj.get("choices"):
                                continue
                        chunks += 1
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)  # type: ignore[operator]
                        last = now
                    if done:
                        break
                if not done:
                    self._fail(i, rec, ERROR, "stream ended before [DONE]", first, last, chunks, gaps)
                    return
        except (asyncio.TimeoutError, TimeoutError):
            self._fail(i, rec, TIMEOUT, "request timeout", first, last, chunks, gaps)
            return
        except aiohttp.ClientError as e:
            self._fail(i, rec, ERROR, f"{type(e).__name__}: {e}"[:ERROR_TEXT_MAX], first, last, chunks, gaps)
            return
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._fail(i, rec, ERROR, f"bad stream event: {e}"[:ERROR_TEXT_MAX], first, last, chunks, gaps)
            return
        rec.end[i] = (last if last is not None else clock()) - t0
        if first is not None:
            rec.first_token[i] = first - t0
        rec.generated[i] = usage_tokens if usage_tokens is not None else chunks
        rec.itl[i] = gaps
        rec.status[i] = OK
        rec.completed += 1

    def _fail(self, i: int, rec: Recorder, status: int, msg: str, first: float | None = None,
              last: float | None = None, chunks: int = 0, gaps: list[float] | None = None) -> None:
        t0 = rec.t0
        rec.end[i] = self.clock() - t0
        if first is not None:
            rec.first_token[i] = first - t0
        rec.generated[i] = chunks
        rec.itl[i] = gaps or None
        rec.status[i] = status
        rec.error[i] = msg
        rec.failed += 1


class _SseSink(ResponseSink):
    """One streamed completion: counts token events, stamps them, and settles the future."""

    __slots__ = ("sender", "i", "rec", "fut", "status", "buf", "first", "last", "gaps", "chunks",
                 "usage_tokens", "done", "abort", "timer")

    def __init__(self, sender: VllmSender, i: int, rec: Recorder, fut: asyncio.Future[None]):
        self.sender, self.i, self.rec, self.fut = sender, i, rec, fut
        self.status = 0
        self.buf = b""
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.done = False
        self.abort: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def on_head(self, status: int, now: float) -> None:
        self.status = status

    def on_body(self, data: bytes, now: float) -> bool:
        if self.fut.done():
            return True
        if self.status != 200:
            self.buf += data
            return False
        buf = self.buf + data if self.buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        *events, self.buf = buf.split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data:"):
                continue
            payload = ev[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                self._ok()
                return True
            # Token chunks are counted without parsing them (the bulk of the stream);
            # usage, error and unexpected events are parsed.
            if b'"choices":[{' not in payload or b'"usage":{' in payload:
                try:
                    obj = json.loads(payload)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    self._fail(ERROR, f"bad stream event: {e}"[:ERROR_TEXT_MAX], now, abort=True)
                    return True
                if "error" in obj:
                    msg = _error_message(json.dumps(obj["error"] if isinstance(obj["error"], dict) else obj))
                    self._fail(ERROR, f"stream error: {msg}", now, abort=True)
                    return True
                usage = obj.get("usage")
                if usage:
                    self.usage_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details")
                    # vLLM reports it with --enable-prompt-tokens-details.
                    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                        self.rec.cached[self.i] = details["cached_tokens"]
                if not obj.get("choices"):
                    continue
            self.chunks += 1
            if self.first is None:
                self.first = now
            else:
                self.gaps.append(now - self.last)  # type: ignore[operator]
            self.last = now
        return False

    def on_end(self, now: float) -> None:
        if self.fut.done():
            return
        if self.status != 200:
            text = self.buf.decode("utf-8", "replace")[:ERROR_TEXT_MAX]
            self._fail(ERROR, f"HTTP {self.status}: {_error_message(text)}", now)
        else:
            self._fail(ERROR, "stream ended before [DONE]", now)

    def on_lost(self, exc: BaseException | None, now: float) -> None:
        if self.fut.done():
            return
        what = f"{type(exc).__name__}: {exc}" if exc is not None else "ServerDisconnectedError: Server disconnected"
        self._fail(ERROR, what[:ERROR_TEXT_MAX], now)

    def on_timeout(self) -> None:
        if not self.fut.done():
            self._fail(TIMEOUT, "request timeout", self.sender.clock(), abort=True)

    def on_future_done(self, fut: asyncio.Future[None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if fut.cancelled() and self.abort is not None:
            self.abort()  # cut or interrupted: the runner records it unfinished

    def _ok(self) -> None:
        rec, i, t0 = self.rec, self.i, self.rec.t0
        rec.end[i] = (self.last if self.last is not None else self.sender.clock()) - t0
        if self.first is not None:
            rec.first_token[i] = self.first - t0
        rec.generated[i] = self.usage_tokens if self.usage_tokens is not None else self.chunks
        rec.itl[i] = self.gaps
        rec.status[i] = OK
        rec.completed += 1
        self.fut.set_result(None)

    def _fail(self, status: int, msg: str, now: float, abort: bool = False) -> None:
        rec, i, t0 = self.rec, self.i, self.rec.t0
        rec.end[i] = now - t0
        if self.first is not None:
            rec.first_token[i] = self.first - t0
        rec.generated[i] = self.chunks
        rec.itl[i] = self.gaps or None
        rec.status[i] = status
        rec.error[i] = msg
        rec.failed += 1
        if abort and self.abort is not None:
            self.abort()  # the rest of this response is of no use; the connection is out of step
        self.fut.set_result(None)


def _error_message(text: str) -> str:
    """The `message` of an OpenAI-style error body, else the text itself (one line)."""
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            err = obj.get("error", obj)
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"]).splitlines()[0]
            if isinstance(obj.get("message"), str):
                return obj["message"].splitlines()[0]
    except (json.JSONDecodeError, TypeError):
        pass
    return " ".join(text.split())[:ERROR_TEXT_MAX]
