"""Prefix sharing without the prompt text: the trace's `prefix_hashes` column.

One 64-bit hash per *full* block of `block_tokens` prompt tokens, chained as vLLM chains
its KV block hashes (`vllm/v1/core/kv_cache_utils.py: hash_block_tokens`): a block's hash
covers its parent's hash, so equal hashes mean equal prompts up to the end of that block.
The chain starts from the adapter's name, as vLLM's block hash carries the LoRA name in
its extra keys, so two adapters with the same system prompt share nothing.

The hash is keyed BLAKE2b: with a per-capture random key (`new_salt`) that is written
nowhere, nobody can test a guessed prompt against a capture's hashes; equal prefixes
within one capture still hash equal. Synthetic and imported traces use the empty key.

Readers (the twin, replay) only ever compare hashes for equality, within one adapter.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_BLOCK_TOKENS = 16  # vLLM's default KV block size


def new_salt() -> bytes:
    """A fresh random key for one capture (keep it in memory only)."""
    return os.urandom(16)


def _h(data: bytes, key: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8, key=key).digest()


def block_hashes(
    token_ids: Sequence[int] | np.ndarray,
    adapter: str | None,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    key: bytes = b"",
) -> list[int]:
    """The chained hash of every full block of `token_ids`, as signed int64 values."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be at least 1, got {block_tokens}")
    ids = np.asarray(token_ids, dtype="<i4")
    n_full = len(ids) // block_tokens
    parent = _h(b"\x00adapter:" + (adapter or "").encode(), key)
    out: list[int] = []
    raw = ids[: n_full * block_tokens].tobytes()
    step = 4 * block_tokens
    for j in range(n_full):
        parent = _h(parent + raw[j * step : (j + 1) * step], key)
        out.append(int.from_bytes(parent, "little", signed=True))
    return out


def block_hashes_many(
    token_ids: Iterable[Sequence[int] | np.ndarray | None],
    adapters: Iterable[str | None],
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    key: bytes = b"",
) -> list[list[int] | None]:
    """`block_hashes` for each request (None where a request has no token ids)."""
    return [
        None if ids is None else block_hashes(ids, a, block_tokens, key)
        for ids, a in zip(token_ids, adapters, strict=True)
    ]
