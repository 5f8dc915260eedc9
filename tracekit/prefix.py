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


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap bijective, well-mixed hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def tokens_from_block_hashes(
    prompt_tokens: np.ndarray,
    hash_offsets: np.ndarray,
    hash_values: np.ndarray,
    block_tokens: int = 512,
    vocab_size: int = 32000,
    *,
    id_range: tuple[int, int] | None = None,
    first_request: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt token ids that reproduce a trace's prefix sharing: Mooncake `hash_ids`, or a
    capture's `prefix_hashes` (whose chain makes equal hashes mean equal prefixes).

    Request i's token j lies in block j // block_tokens; tokens of a block are a fixed
    function of the block's hash, so two prompts share exactly the blocks whose hashes
    they share (and a prefix cache hits exactly there). Blocks past the listed hashes get
    ids unique to the request (`first_request + i`, so requests built one call at a time
    stay distinct). Returns (offsets, int32 values) of a list column. Ids are drawn from
    `id_range` [lo, hi), by default the vocabulary less its first 1,000 (special tokens
    live there)."""
    lens = prompt_tokens.astype(np.int64)
    n = lens.size
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    req = np.repeat(np.arange(n, dtype=np.int64), lens)
    pos = np.arange(offsets[-1], dtype=np.int64) - offsets[req]
    block = pos // block_tokens
    nblocks = np.diff(hash_offsets)
    listed = block < nblocks[req]
    flat = np.where(listed, hash_offsets[req] + block, 0)
    h = np.where(listed, hash_values[np.minimum(flat, max(hash_values.size - 1, 0))] if hash_values.size else 0, 0)
    # Unlisted blocks: a key no hash can take in practice (negative, unique per request and block).
    h = np.where(listed, h, -((req + first_request) * 1_000_003 + block) - 1)
    # Mix the hash before adding the position: every bit of a 64-bit hash counts.
    z = _mix64(_mix64(h.astype(np.uint64)) ^ (pos % block_tokens).astype(np.uint64))
    lo, hi = id_range if id_range is not None else (1000 if vocab_size > 2000 else 0, vocab_size)
    if not 0 <= lo < hi:
        raise ValueError(f"id_range must satisfy 0 <= lo < hi, got {(lo, hi)}")
    values = (z % np.uint64(hi - lo)).astype(np.int64) + lo
    return offsets, values.astype(np.int32)
