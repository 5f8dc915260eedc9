"""Fleet results side by side, replica by replica (`replay compare` when both files have
a `replica` column): each replica's throughput, served fraction, TTFT and ITL with B's
relative error, how many requests both runs sent to the same replica, and which replica
saturated first.

Saturation onset of a replica: the first time its outstanding requests (arrived and not
finished) exceed its `max_num_seqs` seats and stay above them for `hold_s` (a queue
that lasts, not a burst). The seats come from the plan in the run's context; a replica
that never queues has no onset. "Saturates first": the replica with the earliest onset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from tracekit.metrics import summarize

PER_REPLICA = ("requests", "completed", "throughput_tok_s", "served_frac", "mean_ttft_ms", "p99_ttft_ms",
               "mean_itl_ms", "p99_itl_ms")


def replica_seats(ctx: Mapping[str, Any]) -> dict[str, int]:
    """GPU name -> max_num_seqs, from a fleet run's context (twin: its resolved configs;
    real: the plan's settings)."""
    fleet = ctx.get("fleet") or {}
    out: dict[str, int] = {}
    for g in fleet.get("gpus") or []:
        seats = (g.get("serving_config") or {}).get("max_num_seqs")
        if seats is not None:
            out[g["name"]] = int(seats)
    for g in (fleet.get("plan") or {}).get("gpus") or []:
        if g.get("name") not in out and g.get("max_num_seqs") is not None:
            out[g["name"]] = int(g["max_num_seqs"])
    return out


def saturation_onset(results: pl.DataFrame, seats: int, hold_s: float) -> float | None:
    """First time outstanding requests exceed `seats` and stay above for `hold_s`."""
    if results.height == 0:
        return None
    arr = results["arrival_s"].cast(pl.Float64).to_numpy()
    end = results["end_s"].cast(pl.Float64).fill_null(np.inf).to_numpy()
    times = np.concatenate([arr, end[np.isfinite(end)]])
    delta = np.concatenate([np.ones(len(arr), dtype=np.int64), -np.ones(int(np.isfinite(end).sum()), dtype=np.int64)])
    order = np.lexsort((-delta, times))  # at equal times, arrivals before ends
    times, level = times[order], np.cumsum(delta[order])
    above = np.concatenate([[0], (level > seats).astype(np.int8), [0]])
    d = np.diff(above)
    starts, stops = np.flatnonzero(d == 1), np.flatnonzero(d == -1)  # runs [start, stop)
    until = np.where(stops < len(times), times[np.minimum(stops, len(times) - 1)], math.inf)
    lasting = np.flatnonzero(until - times[starts] >= hold_s)
    return float(times[starts[lasting[0]]]) if lasting.size else None


def per_replica(a: pl.DataFrame, ctx_a: dict[str, Any], b: pl.DataFrame, ctx_b: dict[str, Any]) -> dict[str, Any]:
    from replay.compare import rel_err

    names = sorted(set(a["replica"].drop_nulls().unique().to_list()) | set(b["replica"].drop_nulls().unique().to_list()))
    window = summarize(a, ctx_a)["window_s"]
    hold = max(1.0, 0.02 * window)
    seats_a, seats_b = replica_seats(ctx_a), replica_seats(ctx_b)
    rows = []
    for name in names:
        sa = summarize(a.filter(pl.col("replica") == name), ctx_a)
        sb = summarize(b.filter(pl.col("replica") == name), ctx_b)
        row: dict[str, Any] = {"replica": name}
        for k in PER_REPLICA:
            row[f"{k}_a"], row[f"{k}_b"] = sa.get(k), sb.get(k)
            row[f"{k}_rel_err"] = rel_err(sa.get(k), sb.get(k))
        seats = seats_a.get(name) or seats_b.get(name)
        row["seats"] = seats
        row["saturation_s_a"] = saturation_onset(a.filter(pl.col("replica") == name), seats, hold) if seats else None
        row["saturation_s_b"] = saturation_onset(b.filter(pl.col("replica") == name), seats, hold) if seats else None
        rows.append(row)
    joined = a.select("request_id", pl.col("replica").alias("ra")).join(
        b.select("request_id", pl.col("replica").alias("rb")), on="request_id")
    same = float((joined["ra"] == joined["rb"]).mean()) if joined.height else None  # type: ignore[arg-type]

    def first(side: str) -> str | None:
        onsets = [(r[f"saturation_s_{side}"], r["replica"]) for r in rows if r[f"saturation_s_{side}"] is not None]
        return min(onsets)[1] if onsets else None

    return {"replicas": rows, "same_replica_frac": same, "hold_s": hold,
            "saturates_first": {"a": first("a"), "b": first("b")}}


def render_per_replica(d: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    from replay.compare import _pct
    from replay.report import _fmt

    t = Table(title="per replica: A, B and B's relative error")
    for c in ("replica", "throughput tok/s", "served", "mean ITL ms", "p99 TTFT ms", "saturates at s"):
        t.add_column(c, justify="left" if c == "replica" else "right")
    def trio(r: dict[str, Any], k: str) -> str:
        return f"{_fmt(r[f'{k}_a'])} / {_fmt(r[f'{k}_b'])} {_pct(r[f'{k}_rel_err'])}"

    for r in d["replicas"]:
        sat = f"{_fmt(r['saturation_s_a'])} / {_fmt(r['saturation_s_b'])}"
        t.add_row(r["replica"], trio(r, "throughput_tok_s"), trio(r, "served_frac"), trio(r, "mean_itl_ms"),
                  trio(r, "p99_ttft_ms"), sat)
    console.print(t)
    same = d.get("same_replica_frac")
    first = d["saturates_first"]
    console.print(
        (f"requests sent to the same replica in both: {same:.1%}; " if same is not None else "")
        + f"saturates first: A {first['a'] or 'none'}, B {first['b'] or 'none'}"
        + (" [green](same)[/]" if first["a"] == first["b"] else " [red](different)[/]")
    )
