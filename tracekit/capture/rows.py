"""One results-kind row per request the proxy receives, and the parts they go to.

A `Record` follows one request from its arrival to its end; `row_of` turns it into a
row exactly once. `CaptureWriter` buffers rows and writes them as Parquet parts off the
event loop; while the output directory is unwritable it keeps them in memory (bounded)
and writes them when it works again.

Statuses: `ok` (served: the server's answer reached the client whole), `cancelled` (the
client hung up first; the server was told at once), `unfinished` (still running when the
proxy stopped and its drain timeout ran out), `error` (the server or the proxy failed it;
`error` says how). Requests that ended before the server reported usage keep the token
counts the request itself tells (the length of a token-id prompt, `max_tokens`), else 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracekit.cliutil import err_console
from tracekit.schema import KIND_RESULTS, PartWriter, TracekitError, full_schema

MAX_BUFFERED_ROWS = 1_000_000  # while the output dir is unwritable, keep at most this many rows

ROW_FIELDS = (
    "request_id", "arrival_s", "adapter", "prompt_tokens", "output_tokens", "prompt_token_ids",
    "prefix_hashes", "target", "status", "dispatch_s", "first_token_s", "end_s", "generated_tokens",
    "ttft_s", "e2e_s", "tpot_s", "error", "itl_s", "cached_tokens",
)  # fmt: skip


@dataclass(eq=False)  # identity: a Record is a key of the proxy's in-flight table
class Record:
    arrival: float
    model: str | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int | None = None
    stream: bool = False
    first: float | None = None
    last_chunk: float | None = None
    gaps: list[float] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    status: str = "ok"
    error: str | None = None
    done: bool = False  # the whole answer went to the client (a stream's `[DONE]` too)
    answered: bool = False  # the server's response headers arrived
    cut: bool = False  # ended by the proxy's stop
    end: float | None = None
    prefix_hashes: list[int] | None = None
    prompt_len: int | None = None  # from the server's /tokenize, for a request with no usage
    finished: bool = False  # its row exists (or is being completed): never a second one

    def fail(self, status: str, error: str) -> None:
        """Mark how the request ended, unless an earlier, more precise cause is set."""
        if self.status == "ok":
            self.status, self.error = status, error


def _cached_tokens(usage: dict[str, Any]) -> int | None:
    details = usage.get("prompt_tokens_details")
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    return n if isinstance(n, int) and n >= 0 else None


def row_of(rec: Record, request_id: str, adapter: str | None, keep_token_ids: bool) -> tuple[Any, ...]:
    """The request's row (ROW_FIELDS order); an `ok` request without usage becomes an error."""
    end = rec.end if rec.end is not None else rec.arrival
    usage = rec.usage or {}
    prompt = usage.get("prompt_tokens")
    gen = usage.get("completion_tokens")
    if not isinstance(prompt, int) or prompt < 1:
        prompt = len(rec.prompt_ids) if rec.prompt_ids else (rec.prompt_len or 1)
        rec.fail("error", "server reported no usage")
    generated = gen if isinstance(gen, int) else (len(rec.gaps) + 1 if rec.first is not None else None)
    output = generated if generated and generated > 0 and rec.status == "ok" else (
        rec.max_tokens if rec.max_tokens and rec.max_tokens > 0 else max(generated or 1, 1))
    ttft = rec.first - rec.arrival if rec.first is not None else None
    e2e = end - rec.arrival
    tpot = (end - rec.first) / (generated - 1) if rec.first is not None and generated and generated > 1 else None
    return (
        request_id, rec.arrival, adapter, prompt, output, rec.prompt_ids if keep_token_ids else None,
        rec.prefix_hashes, "proxy", rec.status, rec.arrival, rec.first, end, generated, ttft, e2e, tpot,
        rec.error, rec.gaps if rec.gaps else None, _cached_tokens(usage),
    )  # fmt: skip


def rows_to_table(rows: list[tuple[Any, ...]]) -> Any:
    import pyarrow as pa

    schema = full_schema(KIND_RESULTS)
    cols = list(zip(*rows, strict=True))
    return pa.table({name: pa.array(col, type=schema.field(name).type) for name, col in zip(ROW_FIELDS, cols, strict=True)})


class CaptureWriter:
    """Buffers rows (event-loop thread) and writes each flush as one part (worker thread)."""

    def __init__(self, out_dir: Path, context: Callable[[], dict[str, Any]]):
        self.out_dir = out_dir
        self.context = context  # called at each write: adapters learnt so far
        self.rows: list[tuple[Any, ...]] = []
        self.writer: PartWriter | None = None
        self.parts = 0
        self.rows_written = 0
        self.write_errors = 0
        self.rows_dropped = 0
        self.write_error: str | None = None

    def add(self, row: tuple[Any, ...]) -> None:
        self.rows.append(row)

    def _write(self, rows: list[tuple[Any, ...]]) -> bool:
        """Write rows as one part; False (after reporting, once per distinct error) if it
        failed. Runs in a worker thread: it touches only the writer, never `self.rows`."""
        try:
            if self.writer is None:
                self.writer = PartWriter(self.out_dir, KIND_RESULTS, self.context(), prefix="capture")
            self.writer.context = self.context()
            self.writer.write_part(rows_to_table(rows))
        except (TracekitError, OSError) as e:
            self.write_errors += 1
            if str(e) != self.write_error:
                self.write_error = str(e)
                err_console.print(f"[red]tracekit proxy: cannot write capture: {e}; still serving, rows kept in memory[/]")
            return False
        self.parts += 1
        self.rows_written += len(rows)
        if self.write_error is not None:
            err_console.print(f"[green]tracekit proxy: writing to {self.out_dir} works again[/]")
            self.write_error = None
        return True

    def _requeue(self, rows: list[tuple[Any, ...]]) -> None:
        """Put unwritten rows back in front (event-loop thread only), bounded."""
        self.rows[:0] = rows
        excess = len(self.rows) - MAX_BUFFERED_ROWS
        if excess > 0:
            del self.rows[:excess]
            self.rows_dropped += excess

    async def flush(self) -> None:
        """Write what is buffered as one part, off the event loop; traffic is never affected."""
        rows, self.rows = self.rows, []  # swapped in the loop thread: no append is lost
        if rows and not await asyncio.to_thread(self._write, rows):
            self._requeue(rows)
