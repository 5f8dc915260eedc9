"""The prompt of a recorded request, as the server tokenizes it: token ids and the
`prefix_hashes` column (one keyed hash per full KV block, `tracekit.prefix`).

Route: the proxy, not the step plugin. Token-id prompts are hashed in the proxy (a few
microseconds); text and chat prompts are tokenized by the server itself through its
`/tokenize` endpoint, with the same chat-template fields the request carried, so the
ids are the ones vLLM hashes into its KV blocks. The call is made after the request's
answer is complete, off its path (the client's latency does not include it), a few at a
time. The other route (the plugin reads vLLM's block hashes in the engine and the rows are
joined by request id) needs the plugin installed wherever the proxy is used, and a join
across two processes' outputs on the engine's internal request ids, which the OpenAI
server does not return; the proxy alone gives each of its rows its hashes.

Privacy: the key is drawn per capture (`tracekit.prefix.new_salt`) and kept in memory
only, so nobody can test a guessed prompt against the capture; equal prefixes within one
capture, one adapter, still hash equal.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from tracekit.prefix import DEFAULT_BLOCK_TOKENS, block_hashes, new_salt

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# The fields of vLLM's TokenizeChatRequest that shape the templated prompt; the chat
# request's own values are passed on, so the server applies the template as it did.
CHAT_FIELDS = ("model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
               "chat_template", "chat_template_kwargs", "tools", "mm_processor_kwargs")
TOKENIZE_TIMEOUT_S = 30.0


def prompt_ids(body: Mapping[str, Any]) -> list[int] | None:
    """The prompt's token ids when the request sends token ids (one prompt only)."""
    p = body.get("prompt")
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        return p
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], list) and all(isinstance(x, int) for x in p[0]):
        return p[0]
    return None


def tokenize_body(path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `/tokenize` request that yields this request's prompt ids, or None (token ids
    already, a batch of prompts, or nothing to tokenize)."""
    if path == COMPLETIONS:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str):
            return None
        out: dict[str, Any] = {"prompt": p}
        for k in ("model", "add_special_tokens"):
            if k in body:
                out[k] = body[k]
        return out
    if path == CHAT and isinstance(body.get("messages"), list):
        return {k: body[k] for k in CHAT_FIELDS if k in body}
    return None


class PrefixHasher:
    """`prefix_hashes` of one capture: its block size and its secret key."""

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS, key: bytes | None = None):
        self.block_tokens = block_tokens
        self._key = key if key is not None else new_salt()

    def hashes(self, ids: list[int], adapter: str | None) -> list[int]:
        return block_hashes(ids, adapter, self.block_tokens, self._key)


async def tokenize(session: Any, upstream: str, tbody: Mapping[str, Any]) -> list[int]:
    """The server's token ids for a prompt (raises on any failure: the caller records the
    row without hashes)."""
    import aiohttp

    async with session.post(upstream + "/tokenize", data=json.dumps(tbody).encode(),
                            headers={"Content-Type": "application/json"},
                            timeout=aiohttp.ClientTimeout(total=TOKENIZE_TIMEOUT_S)) as r:
        data = await r.read()
        if r.status != 200:
            raise ValueError(f"/tokenize answered HTTP {r.status}: {data[:200].decode(errors='replace')}")
    tokens = json.loads(data).get("tokens")
    if not isinstance(tokens, list):
        raise ValueError("/tokenize answered without tokens")
    return tokens


def block_size_from_metrics(text: str) -> tuple[int | None, bool | None]:
    """(block_size, enable_prefix_caching) from vLLM's `vllm:cache_config_info` gauge."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(_labels(line[line.index("{") + 1 : line.rindex("}")]))
            try:
                bs = int(labels["block_size"])
            except (KeyError, ValueError):
                bs = None
            epc = labels.get("enable_prefix_caching")
            return bs, (epc == "True") if epc is not None else None
    return None, None


def _labels(s: str) -> list[tuple[str, str]]:
    out = []
    i = 0
    while i < len(s):
        eq = s.find("=", i)
        if eq < 0 or eq + 1 >= len(s) or s[eq + 1] != '"':
            break
        j = eq + 2
        val = []
        while j < len(s) and s[j] != '"':
            if s[j] == "\\" and j + 1 < len(s):
                j += 1
            val.append(s[j])
            j += 1
        out.append((s[i:eq].strip(" ,"), "".join(val)))
        i = j + 1
    return out


async def gather_quietly(tasks: set[asyncio.Task[Any]], timeout: float) -> None:
    """Wait up to `timeout` for tasks, then cancel what is left and let it finish."""
    if not tasks:
        return
    _, left = await asyncio.wait(set(tasks), timeout=max(timeout, 0.0))
    for t in left:
        t.cancel()
    if left:
        await asyncio.wait(left, timeout=5.0)
