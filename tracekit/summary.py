"""Results summaries for people: the tables `twin run`, `replay run`, `replay report` and
`replay compare` print, from the dicts of `tracekit.metrics` and a results context.

Rules the tables keep: integers print as integers, fractions with 3 digits, a latency
table says how many requests it covers out of how many, a per-adapter table is sorted
by requests and cut to the top 20 with a total line, and no table cuts a value a user
types (adapter names, flag names) to fit 80 columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def _table() -> type[Table]:
    # rich.table on first use: `twin run --json` prints no table (5-8 ms of imports here).
    from rich.table import Table

    return Table


def _box():  # type: ignore[no-untyped-def]
    from rich import box

    return box.SIMPLE_HEAVY


TOP_ADAPTERS = 20
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"), ("dispatch_lag", "dispatch lag"))
# What each limit of the twin's waiting scan is, in a user's words (the twin's
# summary `admission_blocked` counts the steps in which each ended the scan).
LIMITS = {
    "max_num_batched_tokens": "tokens per step (--max-num-batched-tokens {max_num_batched_tokens:,})",
    "max_num_seqs": "seats (--max-num-seqs {max_num_seqs:,})",
    "kv_blocks": "KV blocks (the KV cache holds {kv_capacity_tokens:,} tokens)",
    "max_loras": "adapter slots (--max-loras {max_loras:,})",
}
# The configuration a run prints, in this order (vLLM's names).
CONFIG_KEYS = ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens",
               "kv_capacity_tokens", "block_size", "enable_prefix_caching")


def fmt(v: Any, frac: bool = False) -> str:
    """A value for a table: integers (also integral floats of counts) as integers with
    thousands separators, fractions (`frac`) with 3 digits, other floats with 1 decimal
    (none from 1,000, 3 below 1), nothing as `-`."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if frac:
            return f"{v:.3f}"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 1 or a == 0:
            return f"{v:,.1f}"
        return f"{v:.3f}"
    return str(v)


def starving_reason(summary: Mapping[str, Any], twin: Mapping[str, Any] | None = None,
                    config: Mapping[str, Any] | None = None) -> str | None:
    """One line saying which limit a starving run hit, or None when it is not known.

    `twin`: the twin's counters (a `twin run` summary, or a results context's `twin`):
    `oom` (the server would not start) and `admission_blocked` {limit: steps in which
    that limit ended the waiting scan with requests still waiting}; the limit with the
    most steps is named. Without those counters (a real server, or a twin that does not
    count them) nothing is said rather than guessed."""
    twin = twin or {}
    if twin.get("oom"):
        return f"the server would not start: {twin.get('oom_reason') or 'no room for the KV cache'}"
    if not summary.get("starved"):
        return None
    blocked = twin.get("admission_blocked")
    if not isinstance(blocked, Mapping) or not blocked:
        return None
    counts = {k: int(v or 0) for k, v in blocked.items() if k in LIMITS}
    if not counts or max(counts.values()) <= 0:
        return None
    order = list(LIMITS)
    top = max(counts, key=lambda k: (counts[k], -order.index(k)))
    values = {**{k: "?" for k in CONFIG_KEYS}, **(config or {}), "kv_capacity_tokens": twin.get("kv_capacity_tokens")}
    try:
        what = LIMITS[top].format(**values)
    except (ValueError, TypeError):
        what = LIMITS[top].split(" (")[0]
    steps = twin.get("steps")
    of = f" of {int(steps):,}" if isinstance(steps, int) and steps > 0 else ""
    return f"the limit it hit: {what}, which held waiting requests back in {counts[top]:,}{of} steps"


def facts_table(title: str) -> Table:
    t = _table()(title=title, show_header=False, box=_box(), pad_edge=False)
    t.add_column("", style="bold", no_wrap=True)
    t.add_column("", justify="right", no_wrap=True)
    return t


def render_head(s: Mapping[str, Any], title: str, out: Console, twin: Mapping[str, Any] | None = None,
                config: Mapping[str, Any] | None = None) -> None:
    """Counts, throughput and the starvation verdict (with its reason when known)."""
    t = facts_table(title)
    rows = [
        ("requests (measured)", fmt(s["requests"])), ("completed", fmt(s["completed"])),
        ("unfinished", fmt(s["unfinished"])), ("errors (incl. timeouts)", fmt(s["errors"])),
    ]
    if s.get("timeouts"):
        rows.append(("timeouts", fmt(s["timeouts"])))
    if s.get("cancelled"):
        rows.append(("cancelled (client hung up)", fmt(s["cancelled"])))
    if twin and twin.get("rejected"):
        rows.append(("rejected (too long for the KV cache)", fmt(int(twin["rejected"]))))
    rows += [
        ("throughput (in+out tok/s, paper)", fmt(s["throughput_tok_s"])),
        ("output tok/s", fmt(s["output_tok_s"])),
        ("requests/s", fmt(s["req_s"])),
        ("offered (in+out tok/s)", fmt(s["offered_tok_s"])),
        ("served fraction", fmt(s["served_frac"], frac=True)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    t.add_row("starvation verdict", "[red]starving[/] (served < 90% of offered)" if s["starved"] else "[green]not starving[/]")
    out.print(t)
    reason = starving_reason(s, twin, config)
    if reason:
        out.print(f"[red]starving[/]: {reason}" if not (twin or {}).get("oom") else f"[bold red]OOM[/]: {reason}")


def render_latency(s: Mapping[str, Any], out: Console) -> None:
    """Latency percentiles, titled with the requests they cover out of all measured."""
    n, k = int(s["requests"]), int(s["completed"])
    title = f"latency (ms): {k:,} completed of {n:,} requests"
    t = _table()(title=title, box=_box(), min_width=len(title) + 2)
    for c in ("metric", "mean", "p50", "p90", "p99"):
        t.add_column(c, justify="right" if c != "metric" else "left", no_wrap=True)
    for key, label in LATENCIES:
        if key == "dispatch_lag" and s.get("mean_dispatch_lag_ms") is None:
            continue
        t.add_row(label, *(fmt(s.get(f"{p}_{key}_ms")) for p in ("mean", "p50", "p90", "p99")))
    out.print(t)
    if n and k < 0.9 * n:
        out.print(f"[yellow]note[/]: {n - k:,} of {n:,} requests did not complete: the latency above is not theirs")


def render_config(cfg: Mapping[str, Any] | None, out: Console) -> None:
    """The configuration a twin run ran with, each value with where it came from."""
    if not cfg:
        return
    t = _table()(title=f"configuration (profile {cfg.get('profile', '?')})", box=_box(), pad_edge=False)
    t.add_column("setting", style="bold", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    t.add_column("from")
    src = cfg.get("from") or {}
    for k in CONFIG_KEYS:
        if k in cfg:
            t.add_row(k, fmt(cfg[k]), str(src.get(k, "")))
    out.print(t)


def fit(first: int, columns: Sequence[tuple[str, Sequence[str]]], width: int, pad: int = 3) -> list[int]:
    """Indices of the columns (header, cells), in priority order, that fit `width`
    next to a first column `first` wide: a value is never cut, a column is left out.
    `pad`: the padding and separator each column costs (rich's SIMPLE boxes)."""
    used = first + pad
    keep: list[int] = []
    for i, (head, cells) in enumerate(columns):
        w = max([len(head), *(len(c) for c in cells)]) + pad
        if used + w > width:
            break  # in priority order: a later, narrower column does not jump the queue
        keep.append(i)
        used += w
    return keep


def per_adapter_table(rows: Sequence[Mapping[str, Any]], show_all: bool = False, top: int = TOP_ADAPTERS,
                      width: int = 80) -> Table:
    """Per-adapter rows sorted by requests (then name), the top `top` unless
    `show_all`, and a total line; columns that are all zero are left out, and so are
    the least needed ones that would not fit `width` (named in the caption)."""
    rows = sorted(rows, key=lambda r: (-int(r["requests"] or 0), str(r["adapter"])))
    shown = rows if show_all else rows[:top]
    # In priority order; the table shows them in this order too.
    cols = [("requests", "req"), ("completed", "done"), ("throughput_tok_s", "tok/s"), ("mean_ttft_ms", "TTFT ms"),
            ("unfinished", "unfin."), ("errors", "err"), ("p99_ttft_ms", "p99 TTFT"), ("mean_tpot_ms", "TPOT ms")]
    cols = [(c, h) for c, h in cols if c not in ("unfinished", "errors") or any(r.get(c) for r in rows)]
    totals = {c: sum((r.get(c) or 0) for r in rows) for c, _ in cols
              if c in ("requests", "completed", "unfinished", "errors", "throughput_tok_s")}
    cells = [(h, [fmt(r.get(c)) for r in shown] + [fmt(totals.get(c)) if c in totals else ""]) for c, h in cols]
    name_w = max([len("adapter"), *(len(str(r["adapter"])) for r in shown)])
    keep = fit(name_w, cells, width)
    left_out = [h for i, (_, h) in enumerate(cols) if i not in keep]
    cols = [cols[i] for i in keep]
    title = f"per adapter, by requests ({len(shown)} of {len(rows)})" if len(shown) < len(rows) else \
        f"per adapter, by requests ({len(rows)})"
    t = _table()(title=title, box=_box(), pad_edge=False, show_footer=True)
    t.add_column("adapter", "total", no_wrap=True, min_width=name_w)
    for c, h in cols:
        t.add_column(h, fmt(totals[c]) if c in totals else "", justify="right", no_wrap=True)
    for r in shown:
        t.add_row(str(r["adapter"]), *(fmt(r.get(c)) for c, _ in cols))
    notes = []
    if len(shown) < len(rows):
        notes.append(f"{len(rows) - len(shown)} more adapters: --all shows every row")
    if left_out:
        notes.append(f"left out to fit {width} columns: {', '.join(left_out)} (--json has them)")
    if notes:
        t.caption = "; ".join(notes)
    return t
