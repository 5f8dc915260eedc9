"""Reading vLLM's server-sent events as they are relayed: first token, gaps, usage.

Every event goes to the client unchanged, except the usage-only event the proxy asked
for on behalf of a client that did not (`strip_usage`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

# Chat streams open with a role-only delta that carries no token.
ROLE_ONLY = b'"delta":{"role":"assistant","content":""}'


def data_objects(event: bytes) -> Iterator[Any]:
    """The JSON value of each `data:` line of an SSE event; stops at one that is not JSON."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                yield json.loads(line[5:])
            except ValueError:
                return


def usage_of(event: bytes) -> dict[str, Any] | None:
    """The `usage` object of an SSE event, if it carries one (cheap test before parsing)."""
    if b'"usage":{' not in event and b'"usage": {' not in event:
        return None
    obj = next(data_objects(event), None)
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


def is_usage_only(event: bytes) -> bool:
    """The final event that include_usage adds: no choices, only usage."""
    return b'"choices":[]' in event or b'"choices": []' in event


def error_of(event: bytes) -> str | None:
    if b'"error"' not in event:
        return None
    for obj in data_objects(event):
        if isinstance(obj, dict) and obj.get("error"):
            err = obj["error"]
            return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    return None


async def relay_stream(up: Any, resp: Any, rec: Any, strip_usage: bool, clock: Callable[[], float]) -> None:
    """Forward SSE events as they arrive, each unchanged; note on `rec` the first-token
    time, the gaps, the usage, an error event, and `done` once `[DONE]` was written."""
    buf = b""
    async for chunk in up.content.iter_any():
        now = clock()
        buf = buf + chunk if buf else chunk
        out = []
        # SSE events end with a blank line; vLLM writes "\n\n". Walk an offset, cut the
        # buffer once: a proxy that falls behind reads many events per chunk, and
        # re-slicing the rest after each would make catching up quadratic.
        start = 0
        while True:
            cut = buf.find(b"\n\n", start)
            if cut < 0:
                break
            event, start = buf[start : cut + 2], cut + 2
            usage = usage_of(event)
            if usage is not None:
                rec.usage = usage  # the last one wins (continuous_usage_stats sends many)
            if usage is not None and is_usage_only(event):
                if strip_usage:
                    continue
            elif not event.startswith(b"data: [DONE]") and ROLE_ONLY not in event:
                err = error_of(event)
                if err is not None:
                    rec.status, rec.error = "error", err
                elif rec.first is None:
                    rec.first = now
                else:
                    rec.gaps.append(now - (rec.last_chunk or now))
                rec.last_chunk = now
            out.append(event)
        buf = buf[start:]
        if out:
            await resp.write(b"".join(out))
            if out[-1].startswith(b"data: [DONE]"):
                rec.done = True
    if buf:
        await resp.write(buf)  # a trailing partial event: forward as is
    rec.done = rec.done or rec.usage is not None
