"""`tracekit synth`: the paper's workload generator, and more.

The paper (arXiv 2508.08343) gives every adapter its own Poisson arrival process with a
rate taken from a small set (e.g. 1.6, 0.8, 0.4 req/s), assigned round-robin and then
shuffled, and draws prompt/output lengths from ShareGPT. Beyond it: an S-LoRA-style
power-law popularity over a total rate (`--total-rate R --popularity zipf:ALPHA`) and
bursty gamma renewal arrivals (`--arrivals gamma:CV`), and rates that vary over time
(`--modulation sine:PERIOD_S,AMPLITUDE`, e.g. a diurnal cycle).

Everything is vectorised numpy: per-adapter counts are drawn first, then all arrival
times at once, then one sort; no per-request Python.

The trace context carries `source` ("synth"), `adapters` ({name: {"rank", "path": None,
"rate": the adapter's mean req/s}}), `window_s` (the duration), `generator` (every
parameter) and `seed`. Request ids are `req-00000000`, ... in arrival order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl

from tracekit import schema
from tracekit.cliutil import (
    console,
    err_console,
    parse_csv_floats,
    parse_csv_ints,
    renamed,
    user_errors,
)
from tracekit.lengths import SPEC_HELP, sample_pairs, source_pairs
from tracekit.schema import TracekitError


def adapter_names(n: int) -> list[str]:
    """`lora-0000`, `lora-0001`, ...: zero-padded so names sort in index order."""
    width = max(4, len(str(max(n - 1, 0))))
    return [f"lora-{i:0{width}d}" for i in range(n)]


def parse_popularity(spec: str) -> tuple[str, float]:
    """`uniform` -> ("uniform", 0); `zipf:ALPHA` -> ("zipf", ALPHA)."""
    name, _, arg = spec.partition(":")
    if name == "uniform" and not arg:
        return "uniform", 0.0
    if name == "zipf":
        try:
            alpha = float(arg)
        except ValueError:
            raise TracekitError(f"--popularity {spec!r}: expected zipf:ALPHA with a number ALPHA") from None
        if not np.isfinite(alpha) or alpha < 0:
            raise TracekitError(f"--popularity {spec!r}: ALPHA must be a non-negative number")
        return "zipf", alpha
    raise TracekitError(f"--popularity {spec!r}: expected uniform or zipf:ALPHA")


def popularity_weights(n: int, spec: str) -> np.ndarray:
    """Share of requests per adapter, summing to 1. Zipf ranks adapters in index order:
    lora-0000 is the most popular (S-LoRA's power law: weight of the i-th is i^-alpha)."""
    name, alpha = parse_popularity(spec)
    if name == "uniform":
        return np.full(n, 1.0 / n)
    w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return w / w.sum()


def parse_arrivals(spec: str) -> tuple[str, float]:
    """`poisson` -> ("poisson", 1); `gamma:CV` -> ("gamma", CV) (CV of inter-arrival times)."""
    name, _, arg = spec.partition(":")
    if name == "poisson" and not arg:
        return "poisson", 1.0
    if name == "gamma":
        try:
            cv = float(arg)
        except ValueError:
            raise TracekitError(f"--arrivals {spec!r}: expected gamma:CV with a number CV") from None
        if not np.isfinite(cv) or cv <= 0:
            raise TracekitError(f"--arrivals {spec!r}: CV must be a positive number")
        return "gamma", cv
    raise TracekitError(f"--arrivals {spec!r}: expected poisson or gamma:CV")


def parse_modulation(spec: str) -> tuple[float, float] | None:
    """`none` -> None; `sine:PERIOD,AMPLITUDE` -> (period_s, amplitude in [0, 1])."""
    name, _, arg = spec.partition(":")
    if name == "none" and not arg:
        return None
    if name == "sine":
        try:
            period_s, amp = (float(x) for x in arg.split(","))
        except ValueError:
            raise TracekitError(f"--modulation {spec!r}: expected sine:PERIOD_S,AMPLITUDE") from None
        if not (period_s > 0 and np.isfinite(period_s)) or not 0.0 <= amp <= 1.0:
            raise TracekitError(f"--modulation {spec!r}: PERIOD_S must be > 0 and AMPLITUDE in [0, 1]")
        return period_s, amp
    raise TracekitError(f"--modulation {spec!r}: expected none or sine:PERIOD_S,AMPLITUDE")


def assign_round_robin(values: list[Any], n: int, rng: np.random.Generator) -> np.ndarray:
    """values[i % len(values)] for each of n adapters, then shuffled (the paper's scheme)."""
    arr = np.asarray([values[i % len(values)] for i in range(n)])
    return rng.permutation(arr)


def _poisson_arrivals(rates: np.ndarray, duration_s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Given its count, a Poisson process's arrivals are i.i.d. uniform over the window.
    counts = rng.poisson(rates * duration_s)
    idx = np.repeat(np.arange(rates.size, dtype=np.int32), counts)
    times = rng.uniform(0.0, duration_s, size=idx.size)
    return times, idx


def _gamma_arrivals(
    rates: np.ndarray, duration_s: float, cv: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A gamma renewal process per adapter (mean gap 1/rate, gap CV `cv`).

    Gaps for all adapters are drawn in one array and cumulated per segment; adapters whose
    gaps fall short of the window (rare: the margin is 8 sigma) are drawn again."""
    shape = 1.0 / cv**2
    times_out: list[np.ndarray] = []
    idx_out: list[np.ndarray] = []
    todo = np.flatnonzero(rates > 0)
    while todo.size:
        r = rates[todo]
        mean_n = r * duration_s
        # The count of a renewal process has variance ~ mean * cv^2.
        n_draw = np.ceil(mean_n + 8.0 * np.sqrt(mean_n) * max(cv, 1.0) + 16).astype(np.int64)
        seg = np.repeat(np.arange(todo.size), n_draw)
        gaps = rng.gamma(shape, 1.0, size=seg.size) / (shape * r[seg])
        starts = np.concatenate(([0], np.cumsum(n_draw)[:-1]))
        # Stationary start (no burst at t=0): the window opens inside a gap drawn
        # length-biased (for Gamma(k) that is Gamma(k+1)), a uniform fraction of the way.
        gaps[starts] = (
            rng.gamma(shape + 1.0, 1.0, size=todo.size) / (shape * r) * rng.uniform(size=todo.size)
        )
        csum = np.cumsum(gaps)
        offset = np.repeat(csum[starts] - gaps[starts], n_draw)
        # Clip the rounding of one long cumsum: a tiny first gap must not turn negative.
        t = np.maximum(csum - offset, 0.0)
        last = t[starts + n_draw - 1]
        short = last < duration_s
        keep = (t < duration_s) & ~short[seg]
        times_out.append(t[keep])
        idx_out.append(todo[seg[keep]].astype(np.int32))
        todo = todo[short]
    if not times_out:
        return np.empty(0), np.empty(0, np.int32)
    return np.concatenate(times_out), np.concatenate(idx_out)


def synthesize(
    adapters: int,
    rates: list[float] | None,
    ranks: list[int],
    duration_s: float,
    lengths: str = "sharegpt",
    seed: int = 0,
    total_rate: float | None = None,
    popularity: str = "uniform",
    arrivals: str = "poisson",
    modulation: str = "none",
    turns: int = 1,
    system_prompts: str = "none",
    token_ids: str = "auto",
    token_id_range: tuple[int, int] = (1000, 2000),
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A synthetic trace (sorted by arrival) and its context.

    Either `rates` (per-adapter req/s, round-robin then shuffled) or `total_rate` split by
    `popularity` must be given; `rates` with a non-uniform `popularity` keeps sum(rates)
    and splits it by the law. `ranks` are assigned like rates, independently.
    `modulation` `sine:PERIOD_S,AMPLITUDE` makes every rate vary over time as
    rate x (1 + AMPLITUDE x sin(2 pi t / PERIOD_S)) (e.g. a diurnal cycle), by thinning.

    Prefix sharing (`turns`, `system_prompts`, see `_conversations`): the trace then
    carries its prompts as `prompt_token_ids` (`token_ids="ids"`, the default for such a
    trace) or as `prefix_hashes` (`"hashes"`, for traces too large to hold the ids)."""
    if adapters < 1:
        raise TracekitError("--adapters must be at least 1")
    if not (duration_s > 0 and np.isfinite(duration_s)):
        raise TracekitError(f"--window must be a positive number of seconds, got {duration_s}")
    if (rates is None) == (total_rate is None):
        raise TracekitError("give exactly one of --rates and --total-rate")
    if not ranks or any(int(r) < 1 for r in ranks):
        raise TracekitError(f"--ranks must be positive integers, got {ranks}")
    parse_popularity(popularity)
    n_sys, sys_tokens = parse_system_prompts(system_prompts)
    if turns < 1:
        raise TracekitError(f"--turns must be at least 1, got {turns}")
    if token_ids not in ("auto", "ids", "hashes", "none"):
        raise TracekitError(f"--token-ids must be auto, ids, hashes or none, got {token_ids!r}")
    sharing = turns > 1 or n_sys > 0
    if token_ids == "auto":
        token_ids = "ids" if sharing else "none"
    kind, cv = parse_arrivals(arrivals)
    mod = parse_modulation(modulation)
    pairs = source_pairs(lengths)  # checked before any work

    rng = np.random.default_rng(seed)
    if rates is not None:
        if any(not np.isfinite(r) or r < 0 for r in rates):
            raise TracekitError(f"--rates must be non-negative numbers, got {rates}")
        per_adapter = assign_round_robin(list(map(float, rates)), adapters, rng).astype(np.float64)
        if popularity != "uniform":
            # --rates with a popularity law: keep the offered load (the sum of the assigned
            # rates) and redistribute it by the law.
            per_adapter = per_adapter.sum() * popularity_weights(adapters, popularity)
    else:
        assert total_rate is not None
        if not np.isfinite(total_rate) or total_rate < 0:
            raise TracekitError(f"--total-rate must be a non-negative number, got {total_rate}")
        per_adapter = float(total_rate) * popularity_weights(adapters, popularity)
    if not per_adapter.sum() > 0:
        flag = "--rates" if rates is not None else "--total-rate"
        raise TracekitError(f"{flag}: every rate is 0, so the trace would hold no requests")
    per_rank = assign_round_robin([int(r) for r in ranks], adapters, rng).astype(np.int64)

    peak = per_adapter * (1.0 + (mod[1] if mod else 0.0))
    if kind == "poisson":
        times, idx = _poisson_arrivals(peak, duration_s, rng)
    else:
        times, idx = _gamma_arrivals(peak, duration_s, cv, rng)
    if mod:
        # Thinning: keep an arrival at t with probability rate(t) / peak rate, so the
        # mean over whole periods stays the assigned rate.
        period_s, amp = mod
        keep_p = (1.0 + amp * np.sin(2.0 * np.pi * times / period_s)) / (1.0 + amp)
        keep = rng.uniform(size=times.size) < keep_p
        times, idx = times[keep], idx[keep]
    order = np.argsort(times, kind="stable")
    times, idx = times[order], idx[order]
    n = times.size
    prompt, output = sample_pairs(pairs, n, rng)

    names = adapter_names(adapters)
    prompt_ids: list[np.ndarray] | None = None
    if sharing or token_ids != "none":
        prompt_ids = _conversations(idx, prompt, output, turns, n_sys, sys_tokens, token_id_range, rng)
        prompt = np.array([len(x) for x in prompt_ids], dtype=np.int64)
    width = max(8, len(str(max(n - 1, 0))))
    df = pl.DataFrame(
        {
            "request_id": pl.int_range(0, n, dtype=pl.Int64, eager=True)
            .cast(pl.String)
            .str.zfill(width),
            "arrival_s": times,
            "adapter": pl.Series("adapter", names, dtype=pl.String).gather(pl.Series(idx)),
            "prompt_tokens": pl.Series(prompt, dtype=pl.Int32),
            "output_tokens": pl.Series(output, dtype=pl.Int32),
        }
    ).with_columns(pl.concat_str(pl.lit("req-"), pl.col("request_id")).alias("request_id"))
    extra_ctx: dict[str, Any] = {}
    if prompt_ids is not None and token_ids == "ids":
        df = df.with_columns(pl.Series("prompt_token_ids", [x.tolist() for x in prompt_ids], dtype=pl.List(pl.Int32)))
    elif prompt_ids is not None and token_ids == "hashes":
        from tracekit.prefix import DEFAULT_BLOCK_TOKENS, block_hashes_many

        hashes = block_hashes_many(prompt_ids, df["adapter"].to_list(), DEFAULT_BLOCK_TOKENS)
        df = df.with_columns(pl.Series("prefix_hashes", hashes, dtype=pl.List(pl.Int64)))
        extra_ctx[schema.CTX_PREFIX_BLOCK_TOKENS] = DEFAULT_BLOCK_TOKENS

    generator = {
        "adapters": adapters,
        "rates": None if rates is None else [float(r) for r in rates],
        "ranks": [int(r) for r in ranks],
        "duration_s": float(duration_s),
        "lengths": lengths,
        "total_rate": None if total_rate is None else float(total_rate),
        "popularity": popularity,
        "arrivals": arrivals,
        "modulation": modulation,
        "turns": turns,
        "system_prompts": system_prompts,
        "token_ids": token_ids,
        "token_id_range": list(token_id_range),
    }
    context = schema.new_context(
        source="synth",
        adapters={
            name: {"rank": int(per_rank[i]), "path": None, "rate": float(per_adapter[i])}
            for i, name in enumerate(names)
        },
        window_s=float(duration_s),
        generator=generator,
        seed=int(seed),
        **extra_ctx,
    )
    return df, context


def parse_system_prompts(spec: str) -> tuple[int, int]:
    """`none` or `K:TOKENS` (K distinct system prompts of TOKENS tokens each)."""
    if spec == "none":
        return 0, 0
    try:
        k, tokens = (int(x) for x in spec.split(":"))
    except ValueError:
        raise TracekitError(f"--system-prompts: expected none or K:TOKENS, got {spec!r}") from None
    if k < 1 or tokens < 1:
        raise TracekitError(f"--system-prompts: K and TOKENS must be at least 1, got {spec!r}")
    return k, tokens


def _conversations(
    adapter_idx: np.ndarray,
    user_tokens: np.ndarray,
    output_tokens: np.ndarray,
    turns: int,
    n_sys: int,
    sys_tokens: int,
    id_range: tuple[int, int],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Prompt token ids of multi-turn conversations with shared system prompts.

    Each adapter's requests, in arrival order, form conversations of `turns` turns (the
    last may be shorter). A conversation opens with one of `n_sys` system prompts of
    `sys_tokens` tokens (the same K prompts for every adapter; the prefix cache still
    shares nothing across adapters), and turn k's prompt is the system prompt, then every
    earlier turn's user message and answer, then its own user message: the prompt grows
    as a chat does. A drawn length is the user message's; `output_tokens` is the answer's
    length, and the next turn's prompt holds an answer of that length (drawn ids: a
    replay with `ignore_eos` generates other tokens, as a real chat's history is what
    the client sends, not what the cache holds)."""
    lo, hi = id_range
    systems = [rng.integers(lo, hi, sys_tokens, dtype=np.int32) for _ in range(n_sys)]
    out: list[np.ndarray] = [np.empty(0, np.int32)] * len(adapter_idx)
    history: dict[int, tuple[int, np.ndarray]] = {}  # adapter -> (turns so far, prompt + answer)
    for i in range(len(adapter_idx)):
        a = int(adapter_idx[i])
        done, prefix = history.get(a, (0, None))  # type: ignore[arg-type]
        if prefix is None or done >= turns:
            prefix = systems[int(rng.integers(n_sys))] if n_sys else np.empty(0, np.int32)
            done = 0
        user = rng.integers(lo, hi, int(user_tokens[i]), dtype=np.int32)
        ids = np.concatenate([prefix, user])
        out[i] = ids
        answer = rng.integers(lo, hi, int(output_tokens[i]), dtype=np.int32)
        history[a] = (done + 1, np.concatenate([ids, answer]))
    return out


def summary(df: pl.DataFrame, context: dict[str, Any], out: Path, elapsed: float) -> dict[str, Any]:
    """What `synth` prints, as one dict (`--json`)."""
    window = float(context.get("window_s") or 0.0)
    return {
        "out": str(out), "requests": df.height, "adapters": len(context["adapters"]), "window_s": window,
        "mean_rate_req_s": df.height / window if window > 0 else None,
        "mean_prompt_tokens": float(df["prompt_tokens"].mean()) if df.height else None,  # type: ignore[arg-type]
        "mean_output_tokens": float(df["output_tokens"].mean()) if df.height else None,  # type: ignore[arg-type]
        "took_s": elapsed,
    }


def print_summary(df: pl.DataFrame, context: dict[str, Any], out: Path, elapsed: float) -> None:
    from rich.table import Table

    window = float(context.get("window_s") or 0.0)
    t = Table(title="tracekit synth", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("out", str(out))
    t.add_row("requests", f"{df.height:,}")
    t.add_row("adapters", f"{len(context['adapters']):,}")
    t.add_row("window", f"{window:,.1f} s")
    if window > 0:
        t.add_row("mean rate", f"{df.height / window:,.3f} req/s")
    if df.height:
        t.add_row("mean prompt / output", f"{df['prompt_tokens'].mean():.1f} / {df['output_tokens'].mean():.1f} tokens")
    t.add_row("generated in", f"{elapsed:.2f} s")
    console.print(t)


def _synth_and_write(out: Path, **kwargs: Any) -> tuple[pl.DataFrame, dict[str, Any]]:
    df, context = synthesize(**kwargs)
    if df.height == 0:
        total = sum(a["rate"] for a in context["adapters"].values())
        raise TracekitError(
            f"no request arrived: {total:g} req/s in all over {kwargs['duration_s']:g} s; raise the rates or the window"
        )
    schema.write(out, df, schema.KIND_TRACE, context)
    return df, context


@click.command("synth")
@click.option("--adapters", type=int, required=True, help="Number of LoRA adapters.")
@click.option("--rates", default=None, help="Per-adapter Poisson rates in req/s, e.g. 1.6,0.8,0.4 (round-robin, then shuffled).")
@click.option("--total-rate", type=float, default=None, help="Total rate in req/s, split over adapters by --popularity.")
@click.option("--popularity", default="uniform", show_default=True, help="uniform | zipf:ALPHA: splits --total-rate (or the sum of --rates) by a power law.")
@click.option("--arrivals", default="poisson", show_default=True, help="poisson | gamma:CV (bursty when CV > 1).")
@click.option("--modulation", default="none", show_default=True, help="none | sine:PERIOD_S,AMPLITUDE: rates vary over time (e.g. diurnal).")
@click.option("--ranks", default="8", show_default=True, help="LoRA ranks, e.g. 8,16,32 (round-robin, then shuffled).")
@click.option("--window", type=float, default=None, help="The trace's window in seconds [default: 3600].")
@click.option("--lengths", default="sharegpt", show_default=True, help=SPEC_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--turns", type=int, default=1, show_default=True,
              help="Multi-turn chats: each adapter's requests form conversations of N turns whose prompts grow.")
@click.option("--system-prompts", default="none", show_default=True,
              help="none | K:TOKENS: K shared system prompts of TOKENS tokens open the conversations.")
@click.option("--token-ids", "token_ids", type=click.Choice(["auto", "ids", "hashes", "none"]), default="auto",
              show_default=True, help="Write prompts as prompt_token_ids, as prefix_hashes (large traces), or "
              "not at all (auto: ids when --turns or --system-prompts share prefixes).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output trace Parquet file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@renamed("--duration", "--window", type=float)
@user_errors
def synth_cmd(
    adapters: int,
    rates: str | None,
    total_rate: float | None,
    popularity: str,
    arrivals: str,
    modulation: str,
    ranks: str,
    window: float | None,
    lengths: str,
    seed: int,
    turns: int,
    system_prompts: str,
    token_ids: str,
    out: Path,
    as_json: bool,
) -> None:
    """Synthesise a multi-adapter trace (the paper's generator and more)."""
    t0 = time.perf_counter()
    with err_console.status("synthesising and writing the trace..."):
        df, context = _synth_and_write(
            adapters=adapters,
            rates=parse_csv_floats(rates, "--rates") if rates is not None else None,
            ranks=parse_csv_ints(ranks, "--ranks"),
            duration_s=3600.0 if window is None else window,
            lengths=lengths,
            seed=seed,
            total_rate=total_rate,
            popularity=popularity,
            arrivals=arrivals,
            modulation=modulation,
            turns=turns,
            system_prompts=system_prompts,
            token_ids=token_ids,
            out=out,
        )
    if as_json:
        click.echo(json.dumps(summary(df, context, out, time.perf_counter() - t0)))
    else:
        print_summary(df, context, out, time.perf_counter() - t0)
