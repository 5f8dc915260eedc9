"""vLLM's KV block pool with prefix caching (`vllm/v1/core/block_pool.py`,
`kv_cache_manager.py`), as the twin's scheduler uses it, and the trace's prefix keys.

What vLLM does, and what is kept here:
- Every full block of `block_size` tokens gets a hash chained over the blocks before it,
  keyed by the LoRA adapter's name, and is cached under it *when it is allocated* (the
  scheduler caches the blocks a chunk will fill before the chunk runs, so a request
  admitted later in the same step already hits them).
- A freed block keeps its hash and waits in the free queue; it is evicted only when an
  allocation pops it. The free queue is one list: blocks without a hash (the never-used
  ones and a request's partial last block) are taken first, then hashed blocks, least
  recently freed first; a request frees its blocks tail first, so its deepest blocks are
  evicted before its prefix.
- A hit takes the longest run of cached blocks from the start of the prompt, capped at
  the prompt minus one token (vLLM recomputes the last token to sample), in whole blocks;
  a hit block still in the free queue is taken out of it (and counts as an allocation
  when vLLM checks the free blocks).
- KV usage = blocks held by some request / (GPU blocks - the null block): cached but free
  blocks are free.

The pool tracks *units*: the engine blocks one trace hash identifies (one block when the
trace's prefix block equals the engine's `block_size`, see `prefix_keys` for the rule),
and *runs*: counts of hashed blocks that no other request can hit (a request's generated
tokens, and what the trace's hashes do not cover), freed and evicted as counts. What
differs from vLLM, and why (the trace carries no more than this):
- A unit is evicted whole: when an allocation needs part of a unit of several blocks,
  the rest becomes uncached free blocks (the free count stays exact; only a later partial
  hit on that unit is lost). With one block per unit (token ids in the trace) eviction is
  vLLM's, block by block.
- A hit never ends inside a unit (the cap at prompt - 1 token stops before such a unit).
- A block recomputed under a hash already cached (a running request's chunk filling a
  unit that another request cached first, or the block under the hit cap) is a second
  copy: vLLM keeps both under that hash, the pool keeps the first only.
- Blocks of generated tokens are hashed in vLLM but no later prompt of a trace can name
  them, except the request's own after a preemption: those stay resumable by it.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from tracekit.schema import CTX_PREFIX_BLOCK_TOKENS, TracekitError

if TYPE_CHECKING:
    import polars as pl


class PrefixKeys:
    """The prefix units of every request (arrival order), read at admission only.

    Request r's trace hashes are `keys[offsets[r]:offsets[r] + usable[r]]` (its full
    prompt blocks); the engine's units are those that end an engine block
    (`engine_blocks_covered`), unit j ending at engine block `end` (cumulative from the
    prompt's start). The flat arrays may be views of the trace's own column (no copy of a
    million lists): `keys` is one array, or the column's chunks' values one after another
    (offsets count across them, a row's keys lie within one chunk). Keys compare for
    equality within one adapter only (the scheduler keeps one map per adapter)."""

    def __init__(self, offsets: np.ndarray, usable: np.ndarray, keys: np.ndarray | Sequence[np.ndarray],
                 trace_block: int, block_size: int):  # fmt: skip
        self.offsets = offsets
        self.usable = usable
        chunks = [keys] if isinstance(keys, np.ndarray) else list(keys)
        self._chunks = chunks
        self._bases = np.cumsum([0] + [len(c) for c in chunks[:-1]]).tolist()  # first offset of each chunk
        self.keys = chunks[0] if len(chunks) == 1 else None
        most = int(usable.max()) if len(usable) else 0
        pos = np.arange(most, dtype=np.int64)
        ends = engine_blocks_covered(pos + 1, trace_block, block_size)
        kept = ends > engine_blocks_covered(pos, trace_block, block_size)  # all when trace_block >= block_size
        self._all = bool(kept.all())
        self._kept = np.flatnonzero(kept)
        self._ends: list[int] = ends[kept].tolist()
        self._kept_below = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)  # kept among the first m

    def of(self, r: int) -> tuple[list[int], list[int]]:
        """Request r's (unit keys, engine-block ends)."""
        a, m = int(self.offsets[r]), int(self.usable[r])
        keys = self.keys
        if keys is None:
            c = bisect.bisect_right(self._bases, a) - 1
            keys, a = self._chunks[c], a - self._bases[c]
        if self._all:
            return keys[a : a + m].tolist(), self._ends[:m]
        k = int(self._kept_below[m])
        return keys[a : a + m][self._kept[:k]].tolist(), self._ends[:k]


def engine_blocks_covered(num_trace_blocks: Any, trace_block_tokens: int, block_size: int) -> Any:
    """The mapping rule from a trace's prefix blocks onto the engine's KV blocks.

    A trace hash covers its block and (chained) every block before it: equal hashes mean
    equal tokens from the prompt's start to the end of that block. So the first j trace
    blocks of `trace_block_tokens` tokens identify exactly the engine blocks that end
    within them: floor(j * trace_block_tokens / block_size). Engine blocks past that are
    the request's own. Equal sizes map one to one; a trace block of 512 tokens on 16-token
    engine blocks identifies 32 blocks; a trace block of 16 on 32-token engine blocks
    identifies one engine block every second trace block."""
    return (np.asarray(num_trace_blocks, dtype=np.int64) * int(trace_block_tokens)) // int(block_size)


def prefix_keys(
    trace: pa.Table | pl.DataFrame,
    context: Mapping[str, Any],
    block_size: int,
    adapter_names: Callable[[], Sequence[str | None]] | None = None,
) -> PrefixKeys | None:
    """The trace's prefix units for an engine of `block_size`: from `prompt_token_ids`
    (hashed here with `tracekit.prefix`, at the engine's block size) or from
    `prefix_hashes` (blocks of the context's `prefix_block_tokens`, mapped by
    `engine_blocks_covered`). Only hashes of *full* trace blocks of the prompt count.
    None when the trace carries neither (then no request shares a prefix)."""
    if not isinstance(trace, pa.Table):  # a polars frame
        trace = trace.to_arrow()
    n = trace.num_rows
    prompt = trace.column("prompt_tokens").to_numpy()
    if "prefix_hashes" in trace.column_names and trace.column("prefix_hashes").null_count < n:
        raw = context.get(CTX_PREFIX_BLOCK_TOKENS)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise TracekitError(
                f"the trace has prefix_hashes but its context's {CTX_PREFIX_BLOCK_TOKENS} is {raw!r} "
                "(expected the tokens per hashed block, an integer >= 1)"
            )
        offsets, lens, flat = _list_buffers(trace.column("prefix_hashes"))
        # Only hashes of the prompt's full trace blocks count.
        return PrefixKeys(offsets, np.minimum(lens, prompt // raw), flat, int(raw), block_size)
    if "prompt_token_ids" in trace.column_names and trace.column("prompt_token_ids").null_count < n:
        from tracekit.prefix import block_hashes

        ids = trace.column("prompt_token_ids").to_pylist()
        names = adapter_names() if adapter_names is not None else trace.column("adapter").to_pylist()
        lists = [[] if x is None else block_hashes(x, a, block_size) for x, a in zip(ids, names, strict=True)]
        lens = np.fromiter((len(h) for h in lists), dtype=np.int64, count=n)
        keys = np.fromiter((v for h in lists for v in h), dtype=np.int64, count=int(lens.sum()))
        offsets = np.zeros(n, np.int64)
        np.cumsum(lens[:-1], out=offsets[1:])
        return PrefixKeys(offsets, lens, keys, block_size, block_size)
    return None


def _list_buffers(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(start, length, flat values per chunk) of a list<int64> column's rows, without
    copying the values where Arrow allows it (a null row counts as an empty list). Chunks
    stay apart: concatenating a million rows' hashes (a trace read from several row
    groups) cost a third of a second of fresh pages; starts count across the chunks."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    starts, lens, flats = [], [], []
    base = 0
    for arr in chunks:
        offsets = np.asarray(arr.offsets)
        values = arr.values
        if values.null_count:
            values = values.fill_null(0)
        flats.append(values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
        n = np.diff(offsets)
        if arr.null_count:
            n = np.where(np.asarray(arr.is_null()), 0, n)
        starts.append(np.add(offsets[:-1], base, dtype=np.int64))
        lens.append(n)
        base += len(values)
    if not chunks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), [np.zeros(0, np.int64)]
    if len(chunks) == 1:
        return starts[0], lens[0], flats
    return np.concatenate(starts), np.concatenate(lens), flats


class BlockPool:
    """Free blocks and cached units (see the module docstring).

    `free_plain`: free blocks without a hash (taken first). `queue`: freed hashed
    entries, first to evict first: a unit id (>= 0), or a run id (< 0) with a block
    count. Units: `unit_key`, `unit_q` (adapter queue), `unit_width` (engine blocks),
    `unit_ref` (requests holding it); `cached[q][key] -> unit id` while it exists."""

    def __init__(self, num_blocks: int, num_queues: int):
        self.num_blocks = num_blocks
        self.free_plain = num_blocks
        self.queued_blocks = 0
        self.queue: OrderedDict[int, None] = OrderedDict()
        self.cached: list[dict[int, int]] = [{} for _ in range(num_queues)]
        self.unit_key: list[int] = []
        self.unit_q: list[int] = []
        self.unit_width: list[int] = []
        self.unit_ref: list[int] = []
        self._free_ids: list[int] = []
        self.run_count: dict[int, int] = {}
        self.run_owner: dict[int, int] = {}  # run id -> request that may resume on it (-1: none)
        self._next_run = -1
        self.evicted_units = 0

    # --- counts ---
    def num_free(self) -> int:
        return self.free_plain + self.queued_blocks

    # --- units ---
    def register(self, q: int, key: int, width: int) -> int:
        """A new cached unit of `width` blocks just allocated by one request (ref 1)."""
        if self._free_ids:
            uid = self._free_ids.pop()
            self.unit_key[uid], self.unit_q[uid], self.unit_width[uid], self.unit_ref[uid] = key, q, width, 1
        else:
            uid = len(self.unit_key)
            self.unit_key.append(key)
            self.unit_q.append(q)
            self.unit_width.append(width)
            self.unit_ref.append(1)
        self.cached[q][key] = uid
        return uid

    def touch(self, uid: int) -> int:
        """A hit on unit `uid`: one more holder. Returns the blocks it takes out of the
        free queue (its width when it was free, else 0)."""
        ref = self.unit_ref[uid]
        self.unit_ref[uid] = ref + 1
        if ref:
            return 0
        del self.queue[uid]
        w = self.unit_width[uid]
        self.queued_blocks -= w
        return w

    def release(self, uid: int) -> int:
        """One holder less; a unit nobody holds joins the free queue's tail. Returns the
        blocks freed."""
        ref = self.unit_ref[uid] - 1
        self.unit_ref[uid] = ref
        if ref:
            return 0
        self.queue[uid] = None
        w = self.unit_width[uid]
        self.queued_blocks += w
        return w

    # --- runs ---
    def add_run(self, count: int, owner: int = -1) -> int:
        """Freed hashed blocks that only `owner` (-1: nobody) could hit, at the tail."""
        rid = self._next_run
        self._next_run -= 1
        self.run_count[rid] = count
        self.run_owner[rid] = owner
        self.queue[rid] = None
        self.queued_blocks += count
        return rid

    def take_run(self, rid: int, count: int) -> None:
        """Request `run_owner[rid]` hits the first `count` blocks of its run; the rest
        becomes a run nobody can hit (its own recompute makes new copies)."""
        left = self.run_count[rid] - count
        self.queued_blocks -= count
        self.run_owner[rid] = -1
        if left > 0:
            self.run_count[rid] = left
        else:
            del self.run_count[rid], self.run_owner[rid], self.queue[rid]

    def disown_run(self, rid: int) -> None:
        if rid in self.run_owner:
            self.run_owner[rid] = -1

    def run_blocks(self, rid: int, owner: int) -> int:
        """Blocks of run `rid` still cached for `owner` (0: evicted or disowned)."""
        return self.run_count.get(rid, 0) if self.run_owner.get(rid) == owner else 0

    # --- allocation ---
    def take(self, n: int) -> None:
        """Allocate `n` free blocks (the caller checked `num_free`): blocks without a
        hash first, then the free queue from its head, evicting what they cached."""
        if n <= self.free_plain:
            self.free_plain -= n
            return
        n -= self.free_plain
        self.free_plain = 0
        queue = self.queue
        while n > 0:
            eid = next(iter(queue))
            if eid >= 0:
                del queue[eid]
                w = self.unit_width[eid]
                del self.cached[self.unit_q[eid]][self.unit_key[eid]]
                self._free_ids.append(eid)
                self.evicted_units += 1
                self.queued_blocks -= w
                if w > n:
                    self.free_plain += w - n  # the rest of an evicted unit: free, uncached
                n -= w
            else:
                c = self.run_count[eid]
                used = c if c <= n else n
                self.queued_blocks -= used
                n -= used
                if used == c:
                    del queue[eid], self.run_count[eid], self.run_owner[eid]
                else:
                    self.run_count[eid] = c - used  # its deepest blocks went first
        return

    def lookup(self, q: int, keys: list[int], ends: list[int], max_blocks: int) -> tuple[list[int], int, int]:
        """(hit units, blocks hit, units walked) for a prompt: the longest run of cached
        units from the start whose end is within `max_blocks`."""
        cached = self.cached[q]
        hit: list[int] = []
        blocks = 0
        for key, end in zip(keys, ends, strict=False):
            if end > max_blocks:
                break
            uid = cached.get(key)
            if uid is None:
                break
            hit.append(uid)
            blocks = end
        return hit, blocks, len(hit)

    def evictable(self, uids: list[int]) -> int:
        """Blocks of these units that sit in the free queue (vLLM counts them as
        allocated when it checks a new request against the free blocks)."""
        ref, width = self.unit_ref, self.unit_width
        return sum(width[u] for u in uids if not ref[u])

    def check(self) -> None:
        """Internal consistency (tests)."""
        q = sum(self.unit_width[e] if e >= 0 else self.run_count[e] for e in self.queue)
        assert q == self.queued_blocks, f"queued blocks {self.queued_blocks} != {q}"
        assert 0 <= self.free_plain and self.num_free() <= self.num_blocks
        live = set(range(len(self.unit_key))) - set(self._free_ids)
        for uid in live:
            assert self.cached[self.unit_q[uid]].get(self.unit_key[uid]) == uid, f"unit {uid} not in its map"
            assert self.unit_ref[uid] >= 0
            assert (uid in self.queue) == (self.unit_ref[uid] == 0), f"unit {uid}: free iff nobody holds it"
        assert sum(len(m) for m in self.cached) == len(live)


