"""The twin search: how many adapters of a trace's mix one GPU takes, found in the twin.

For one GPU's share of the fleet (`n` adapters with the fleet's mix of loads, their real
requests from the trace, and base-model requests in proportion), the twin runs the
configuration and reports the share of the offered tokens it served. For each max_loras
the search finds the *starving point*, the largest `n` served at more than 90%; over
max_loras it climbs to the one whose starving point is largest (the most adapters, hence
the most throughput, per GPU).

Per max_loras, each run moves the next guess by the saturation law: a saturated GPU
serves its capacity C whatever it is offered, so served(n) ~ C / (n x per-adapter load)
and the 90% point is near n x served / 0.9 (a lower bound when the run keeps up, so the
guess then steps further up). Runs bracket the point; the search stops when the bracket
is narrower than RESOLUTION or a run lands within it. Over max_loras: a hill climb on
the grid of values the memory allows, starting where the model (or, without one, the
middle of the grid) says; it stops at a max_loras whose neighbours both do worse.

The result is the same for any `jobs`: every max_loras' search starts from a fixed guess
(the model's, or the starving point of the max_loras it was reached from) and runs
sequentially inside; `jobs` only runs several max_loras at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

from tracekit.metrics import STARVING_THRESHOLD
from tracekit.parallel import single_thread_env

SERVED_OK = 1.0 - STARVING_THRESHOLD  # served above this does not starve (the paper's rule)
RESOLUTION = 0.02  # the starving point is located within 2% (the safety step is several %)
KEEPS_UP = 0.97  # served at or above: the run keeps up, its n x served / 0.9 is a lower bound
MAX_RUNS_PER_ML = 6
# A run offered more requests than this is far past any GPU's capacity: its window is
# shortened to hold about this many (at least MIN_WINDOW_S), which keeps overloaded probes cheap.
MAX_REQUESTS = 250_000
MIN_WINDOW_S = 600.0
# max_loras values the search may try: powers of two, and the paper's grid between 64 and
# 384 (vLLM takes any; a finer grid costs runs for a percent or two).
MAX_LORAS_GRID = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024)


@dataclass
class TwinRun:
    max_loras: int
    adapters: int
    served_frac: float
    throughput_tok_s: float
    offered_tok_s: float
    requests: int
    window_s: float
    p99_ttft_ms: float | None
    wall_s: float
    purpose: str = "search"
    load: float = 1.0  # the adapters' request rates scaled by this (probing past a fleet that fits)

    @property
    def x(self) -> float:
        """Adapters of the fleet's mix this run stands for: adapters x load."""
        return self.adapters * self.load

    @property
    def ok(self) -> bool:
        """Not starving (served > 90% of offered)."""
        return 1.0 - self.served_frac < STARVING_THRESHOLD

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), starved=not self.ok)


@dataclass
class MlResult:
    """One max_loras' search: its runs and the starving point they locate."""

    max_loras: int
    runs: list[TwinRun]
    starving_point: float  # adapters; <= 0 when even max_loras adapters starve
    fits: bool  # every adapter of the fleet is served at this max_loras (a lower bound)
    start: int

    @property
    def feasible(self) -> bool:
        """The starving point is at least max_loras: below it (even as many adapters as
        slots starve) it is an extrapolation to configurations vLLM would not take
        (max_cpu_loras >= max_loras), so it does not compete with max_loras that hold it."""
        return self.starving_point >= self.max_loras or any(r.ok for r in self.runs)

    @property
    def best_ok(self) -> TwinRun | None:
        ok = [r for r in self.runs if r.ok]
        return max(ok, key=lambda r: r.adapters) if ok else None


@dataclass
class SearchResult:
    per_ml: dict[int, MlResult]
    best: MlResult | None
    runs: list[TwinRun] = field(default_factory=list)
    wall_s: float = 0.0


class Trials:
    """Runs the twin on one GPU's share of a fleet."""

    def __init__(self, trace: pl.DataFrame, context: Mapping[str, Any], loads: Mapping[str, float],
                 profile: Any, config: Any, window_s: float, simulator: str = "twin.api:simulate"):
        from twin.profile import load_profile

        self.simulator = simulator  # module:function with twin.api.simulate's signature (tests use a toy)
        self.window_s = float(window_s)
        self.trace = trace.filter(pl.col("arrival_s") < self.window_s)
        self.context = dict(context)
        self.loads = dict(loads)
        self.profile = load_profile(profile)
        self.config = config
        self.n_fleet = len(self.loads)
        self._cache: dict[tuple[int, int, float], TwinRun] = {}
        self.on_run: Callable[[TwinRun], None] | None = None

    def subset(self, n: int) -> tuple[pl.DataFrame, dict[str, Any]]:
        """`n` adapters with the fleet's mix of loads and their requests, plus base-model
        requests in proportion n / fleet (a deterministic hash of request_id picks them)."""
        from predictor.plan import representative

        names = representative(self.loads, n)
        frac = min(1.0, n / max(self.n_fleet, 1))
        cond = pl.col("adapter").is_in(names)
        if frac < 1.0:
            cond = cond | (pl.col("adapter").is_null() & (pl.col("request_id").hash(7) % 1_000_000 < int(frac * 1e6)))
        else:
            cond = cond | pl.col("adapter").is_null()
        sub = self.trace.filter(cond)
        known = self.context.get("adapters") or {}
        rank = int(self.config.max_lora_rank)
        ctx = dict(self.context, window_s=self.window_s,
                   adapters={a: known.get(a, {"rank": rank}) for a in names})
        return sub, ctx

    def run(self, max_loras: int, n: int, purpose: str = "search", load: float = 1.0) -> TwinRun:
        from predictor.dataset import _resolve

        simulate = _resolve(self.simulator)
        n = max(1, min(int(n), self.n_fleet))
        ml = max(1, min(int(max_loras), n))
        load = round(float(load), 4)
        key = (ml, n, load)
        if key in self._cache:
            return self._cache[key]
        t0 = time.perf_counter()
        sub, ctx = self.subset(n)
        if load != 1.0:
            sub = overlay(sub, load, self.window_s)
        window = self.window_s
        if sub.height > MAX_REQUESTS:
            window = max(MIN_WINDOW_S, self.window_s * MAX_REQUESTS / sub.height)
            sub = sub.filter(pl.col("arrival_s") < window)
            ctx["window_s"] = window
        cfg = self.config.replace(max_loras=ml, max_cpu_loras=n)
        res = simulate(sub, self.profile, cfg, trace_context=ctx, window_s=window)
        s = res.summary
        run = TwinRun(max_loras=ml, adapters=n, served_frac=float(s["served_frac"]),
                      throughput_tok_s=float(s["throughput_tok_s"]), offered_tok_s=float(s["offered_tok_s"]),
                      requests=int(sub.height), window_s=float(window),
                      p99_ttft_ms=None if s.get("p99_ttft_ms") is None else float(s["p99_ttft_ms"]),
                      wall_s=time.perf_counter() - t0, purpose=purpose, load=load)
        self._cache[key] = run
        if self.on_run is not None:
            self.on_run(run)
        return run


def overlay(trace: pl.DataFrame, load: float, window_s: float) -> pl.DataFrame:
    """The trace with every request rate scaled by `load` > 1, same adapters and lengths:
    floor(load) copies shifted evenly through the window (wrapped), plus a deterministic
    part of one more. What this GPU would face if its fleet's traffic grew by `load`."""
    k = int(math.ceil(load - 1e-9))
    parts = []
    for i in range(k):
        c = trace.with_columns(
            ((pl.col("arrival_s") + i * window_s / k) % window_s).alias("arrival_s"),
            (pl.col("request_id").cast(pl.Utf8) + f"~{i}").alias("request_id"),
        )
        frac = load - (k - 1) if i == k - 1 else 1.0
        if frac < 1.0:
            c = c.filter(pl.col("request_id").hash(11) % 1_000_000 < int(frac * 1e6))
        parts.append(c)
    return pl.concat(parts).sort("arrival_s")


def _next_guess(run: TwinRun, up: float) -> float:
    """Where served would reach 90% by the saturation law; further up when the run kept up."""
    est = run.adapters * run.served_frac / SERVED_OK
    return est * up if run.served_frac >= KEEPS_UP else est


def starving_point(trials: Trials, max_loras: int, start: int, up: float, need: float | None = None) -> MlResult:
    """The starving point at `max_loras`, searched from `start` adapters (see the module).

    Where the whole fleet fits while it keeps up, its runs bound the point from below
    only; `need`: the point the answer must clear for the whole fleet to stay on one GPU
    (the fleet over 1 - the safety step). Below it, the fleet's rates are scaled up
    (`overlay`) until the point is located past it, or found short of it."""
    n_max = trials.n_fleet
    n_min = min(max_loras, n_max)  # vLLM needs max_cpu_loras >= max_loras
    n = int(min(max(round(start), n_min), n_max))
    lo: TwinRun | None = None
    hi: TwinRun | None = None
    runs: list[TwinRun] = []
    for _ in range(MAX_RUNS_PER_ML):
        r = trials.run(max_loras, n)
        runs.append(r)
        if r.ok:
            lo = r if lo is None or r.adapters > lo.adapters else lo
        else:
            hi = r if hi is None or r.adapters < hi.adapters else hi
        if lo is not None and lo.adapters >= n_max:
            break  # the whole fleet fits
        if hi is not None and hi.adapters <= n_min:
            break  # even the fewest adapters this max_loras allows starve
        if lo is not None and hi is not None and hi.adapters - lo.adapters <= max(1, RESOLUTION * lo.adapters):
            break
        guess = _next_guess(r, up)
        if abs(guess - n) <= RESOLUTION * n and r.served_frac < KEEPS_UP:
            break  # this run sits at the starving point
        nxt = int(round(guess))
        if lo is not None:
            nxt = max(nxt, lo.adapters + 1)
        if hi is not None:
            nxt = min(nxt, hi.adapters - 1)
        if lo is not None and hi is not None and not lo.adapters < nxt < hi.adapters:
            nxt = int(round(math.sqrt(lo.adapters * hi.adapters)))
        nxt = int(min(max(nxt, n_min), n_max))
        if nxt == n:
            break
        n = nxt
    fits = lo is not None and lo.adapters >= n_max
    if fits and need is not None and lo is not None and _locate(lo, hi) < need:
        # Past the fleet: the same adapters with more traffic, just enough to clear `need`.
        load = need * (1.0 + RESOLUTION) / n_max
        for _ in range(2):
            r = trials.run(max_loras, n_max, load=load)
            runs.append(r)
            if r.ok:
                lo = r
                break
            hi = r if hi is None or r.x < hi.x else hi
            load = max(1.0 + RESOLUTION, _locate(lo, hi) / n_max)
            if load * n_max <= lo.x * (1.0 + RESOLUTION):
                break
    return MlResult(max_loras=max_loras, runs=runs, starving_point=_locate(lo, hi), fits=fits, start=int(start))


def _locate(lo: TwinRun | None, hi: TwinRun | None) -> float:
    """The starving point (in adapters of the mix, `TwinRun.x`) from the bracketing runs:
    served interpolated linearly to 90% between them; from one side only, the
    saturation law (x x served / 0.9; from below, not less than the run itself)."""
    if lo is not None and hi is not None:
        ds = lo.served_frac - hi.served_frac
        if ds <= 0:
            return float(lo.x)
        t = (lo.served_frac - SERVED_OK) / ds
        return float(lo.x + t * (hi.x - lo.x))
    if lo is not None:
        return max(float(lo.x), lo.x * lo.served_frac / SERVED_OK)
    if hi is not None:
        return hi.x * hi.served_frac / SERVED_OK
    return 0.0


def allowed_max_loras(profile: Any, config: Any, n_fleet: int, pinned: int | None = None) -> list[int]:
    """max_loras values the memory allows (the profile's KV model says the server starts),
    at most the fleet size; `pinned` alone when the user fixed it."""
    from twin.profile import load_profile

    prof = load_profile(profile)
    grid = [pinned] if pinned else [m for m in MAX_LORAS_GRID if m <= n_fleet] or [n_fleet]
    if not pinned and n_fleet not in grid and n_fleet < MAX_LORAS_GRID[-1]:
        grid.append(n_fleet)
    out = []
    for ml in sorted(set(grid)):
        cfg = config.replace(max_loras=ml, max_cpu_loras=max(ml, n_fleet))
        if prof.kv_capacity_tokens(cfg) > 0:
            out.append(ml)
    return out


# --- the search over max_loras -----------------------------------------------------------

_WORKER: Trials | None = None


def _init_worker(args: tuple[Any, ...]) -> None:
    global _WORKER
    trace, ctx, loads, profile_data, config, window, simulator = args
    from twin.profile import Profile

    _WORKER = Trials(trace, ctx, loads, Profile.from_dict(profile_data), config, window, simulator)


def _worker_search(ml: int, start: int, up: float, need: float | None) -> MlResult:
    assert _WORKER is not None
    return starving_point(_WORKER, ml, start, up, need)


def _fleet_throughput(m: MlResult) -> float | None:
    """Throughput of `m`'s run of the whole fleet at its own rates (None if none ran)."""
    n = max((r.adapters for r in m.runs), default=0)
    at = [r.throughput_tok_s for r in m.runs if r.adapters == n and r.load == 1.0]
    return max(at) if at else None


def _better(a: MlResult, b: MlResult | None) -> bool:
    """Is `a` better than `b`: one whose runs found a served count beats one whose every
    run starved; where both serve the whole fleet, the one serving more of it; then a
    larger starving point (more adapters, or where the whole fleet fits, more headroom);
    exact ties go to fewer GPU slots (less memory reserved)."""
    if b is None:
        return True
    if a.feasible != b.feasible:
        return a.feasible
    if a.fits and b.fits:
        # Both serve the whole fleet: the goal is throughput on the user's own traffic, so
        # the one that serves more of it wins (beyond the search's resolution); headroom
        # past the fleet, whose bounds come from unequal probing, only breaks ties.
        ta, tb = _fleet_throughput(a), _fleet_throughput(b)
        if ta is not None and tb is not None and abs(ta - tb) > RESOLUTION * max(ta, tb):
            return ta > tb
    if a.starving_point != b.starving_point:
        return a.starving_point > b.starving_point
    return a.max_loras < b.max_loras


def search(
    trials: Trials,
    grid: list[int],
    start_ml: int,
    starts: Callable[[int], float] | None,
    *,
    up: float,
    jobs: int = 1,
    need: float | None = None,
    on_result: Callable[[MlResult], None] | None = None,
) -> SearchResult:
    """Hill-climb over `grid` (sorted max_loras values) from `start_ml`.

    `starts(ml)`: the first guess of the starving point at each max_loras (the model's);
    None: the first max_loras starts from the whole fleet (a probe), the others from the
    starving point of the max_loras they were reached from. `need`: see `starving_point`."""
    t0 = time.perf_counter()
    idx = {ml: i for i, ml in enumerate(grid)}
    done: dict[int, MlResult] = {}

    def guess(ml: int, origin: MlResult | None) -> int:
        if starts is not None:
            g = starts(ml)
        elif origin is None:
            g = trials.n_fleet
        else:
            g = origin.starving_point if origin.starving_point > 0 else ml
        return int(max(1, round(g)))

    pool = None
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
            initargs=((trials.trace, trials.context, trials.loads, trials.profile.to_dict(), trials.config,
                       trials.window_s, trials.simulator),))

    def run_all(todo: list[tuple[int, int]]) -> None:
        if pool is None:
            for ml, g in todo:
                res = starving_point(trials, ml, g, up, need)
                done[ml] = res
                if on_result:
                    on_result(res)
            return
        # The pool starts its workers at a submit, and they inherit the environment then.
        with single_thread_env():
            futs = {ml: pool.submit(_worker_search, ml, g, up, need) for ml, g in todo}
        for ml, _ in todo:
            res = futs[ml].result()
            done[ml] = res
            for r in res.runs:  # the main process's cache learns the workers' runs
                trials._cache.setdefault((r.max_loras, r.adapters, r.load), r)
            if on_result:
                on_result(res)

    try:
        best: MlResult | None = None
        frontier = [(start_ml, guess(start_ml, None))]
        if starts is not None:
            # With the model's guesses, the start's neighbours are known now: search them
            # together (both are needed to confirm or leave the start).
            i = idx[start_ml]
            frontier += [(grid[j], guess(grid[j], None)) for j in (i - 1, i + 1) if 0 <= j < len(grid)]
        while frontier:
            run_all(frontier)
            for ml, _ in frontier:
                if _better(done[ml], best):
                    best = done[ml]
            assert best is not None
            # Climb on from the best and from any max_loras within the resolution of it (a
            # tie between two single runs is noise, and the better one may lie past it).
            near = [best] + [r for r in done.values() if r is not best and not r.fits and not best.fits
                             and r.feasible and r.starving_point >= best.starving_point * (1.0 - RESOLUTION)]
            frontier = []
            for r in near:
                i = idx[r.max_loras]
                for j in (i - 1, i + 1):
                    if 0 <= j < len(grid) and grid[j] not in done and grid[j] not in {f[0] for f in frontier}:
                        frontier.append((grid[j], guess(grid[j], best)))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    runs = [r for ml in sorted(done) for r in done[ml].runs]
    return SearchResult(per_ml=done, best=best, runs=runs, wall_s=time.perf_counter() - t0)
