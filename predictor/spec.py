"""Sweep specifications: which workloads, which configurations.

A SPEC is given to `predictor dataset --workloads SPEC` as one of

1. a JSON file path, or inline JSON (starts with `{`)::

     {"duration_s": 300, "max_requests": 12000, "max_load_req_s": 80, "seed": 0,
      "workloads": [{"rates": [0.4, 0.05, 0.0125], "ranks": [8, 16, 16],
                     "lengths": "sharegpt", "popularity": "uniform",
                     "arrivals": "poisson", "seed": 0, "name": "w0"}],
      "random": {"n": 50, "seed": 0, "rate_min": 0.003, "rate_max": 3.2,
                 "ranks": [8, 16, 32], "arrivals": ["poisson", "gamma:2"]},
      "configs": {"max_loras": [16, 32, 64], "max_cpu_loras": [16, 32, 64, 96, 128]},
      "serving": {"max_num_seqs": 256}}

   (`workloads` and `random` may be combined; at least one is needed. `serving` sets
   other serving flags by vLLM's names for every cell; unset ones are the profile's
   server's, as in `twin run`.)

2. a one-line grid: `key=value` items separated by `;`, lists by `,`, and the values of
   one workload's rates or ranks by `/`. Every combination of `rates` x `ranks` is a
   workload::

     rates=0.4/0.05/0.0125,0.8/0.4/0.05;ranks=8/16/16;max_loras=16,32;max_cpu_loras=16,32,64;duration=300

   Grid keys: rates, ranks, max_loras, max_cpu_loras, duration, max_requests, max_load
   (req/s), seed, lengths, arrivals, popularity, random (N random workloads, as in JSON).

Configurations are every (max_loras, max_cpu_loras) with max_loras <= max_cpu_loras (vLLM
refuses the others); `max_lora_rank` is the workload's largest rank, as vLLM needs.
Each cell simulates a trace of `max_cpu_loras` adapters (one GPU's share of the fleet),
for `duration_s`, shortened so that it holds at most about `max_requests` requests:
deeply overloaded cells would otherwise cost the most and teach the least. Cells offered
more than `max_load_req_s` per GPU are skipped for the same reason.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracekit.schema import TracekitError

DEFAULT_MAX_LORAS = [16, 32, 64, 96, 128]
DEFAULT_MAX_CPU_LORAS = [8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384]
# The paper's rates span 0.003125..3.2 req/s per adapter and its ranks 8/16/32.
RANDOM_RATES = [3.2, 1.6, 0.8, 0.4, 0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125]
RANDOM_RANKS = [8, 16, 32]


@dataclass(frozen=True)
class Workload:
    rates: tuple[float, ...]
    ranks: tuple[int, ...]
    lengths: str = "sharegpt"
    popularity: str = "uniform"
    arrivals: str = "poisson"
    seed: int = 0
    name: str = ""

    @property
    def key(self) -> str:
        d = asdict(self)
        d.pop("name")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        r = "-".join(f"{x:g}" for x in self.rates)
        k = "-".join(str(x) for x in self.ranks)
        extra = "" if self.arrivals == "poisson" else f"_{self.arrivals}"
        return f"rate_{r}_size_{k}{extra}_s{self.seed}"


@dataclass(frozen=True)
class Cell:
    workload: Workload
    max_loras: int
    max_cpu_loras: int
    duration_s: float
    max_requests: int
    serving: tuple[tuple[str, Any], ...] = ()  # other serving flags (vLLM names), sorted

    @property
    def max_lora_rank(self) -> int:
        return int(max(self.workload.ranks))

    @property
    def key(self) -> str:
        k = f"{self.workload.key}:{self.max_loras}:{self.max_cpu_loras}:{self.duration_s:g}:{self.max_requests}"
        if self.serving:
            k += ":" + hashlib.sha1(json.dumps(list(self.serving)).encode()).hexdigest()[:8]
        return k

    def cell_duration(self) -> float:
        """The simulated window: `duration_s`, shortened to hold ~max_requests requests."""
        mean_rate = float(np.mean(self.workload.rates))
        expected = mean_rate * self.max_cpu_loras * self.duration_s
        if expected <= self.max_requests or mean_rate <= 0:
            return self.duration_s
        return max(60.0, self.max_requests / (mean_rate * self.max_cpu_loras))


@dataclass
class Spec:
    workloads: list[Workload]
    max_loras: list[int] = field(default_factory=lambda: list(DEFAULT_MAX_LORAS))
    max_cpu_loras: list[int] = field(default_factory=lambda: list(DEFAULT_MAX_CPU_LORAS))
    duration_s: float = 300.0
    max_requests: int = 12000
    # Skip cells offered more than this many req/s per GPU (n x mean rate): far past any
    # GPU's capacity they only confirm starvation, at the highest simulation cost.
    max_load_req_s: float = 80.0
    serving: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        out = []
        serving = tuple(sorted(self.serving.items()))
        for w in self.workloads:
            mean_rate = float(np.mean(w.rates))
            for ml, n in itertools.product(self.max_loras, self.max_cpu_loras):
                if ml <= n and n * mean_rate <= self.max_load_req_s:
                    out.append(Cell(w, int(ml), int(n), self.duration_s, self.max_requests, serving))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {
            "workloads": [asdict(w) for w in self.workloads],
            "configs": {"max_loras": self.max_loras, "max_cpu_loras": self.max_cpu_loras},
            "duration_s": self.duration_s,
            "max_requests": self.max_requests,
            "max_load_req_s": self.max_load_req_s,
        }
        if self.serving:
            d["serving"] = dict(self.serving)
        return d


def random_workloads(n: int, seed: int = 0, **opts: Any) -> list[Workload]:
    """`n` workloads like the paper's: three per-adapter rates and three ranks drawn from
    the paper's sets (or a log-uniform range given by rate_min/rate_max), plus, when
    asked, bursty arrivals and Zipf-skewed shares."""
    rng = np.random.default_rng(seed)
    ranks_pool = [int(r) for r in opts.get("ranks", RANDOM_RANKS)]
    arrivals = list(opts.get("arrivals", ["poisson"]))
    lengths = list(opts.get("lengths", ["sharegpt"]))
    k = int(opts.get("n_rates", 3))
    out = []
    for i in range(n):
        if "rate_min" in opts or "rate_max" in opts:
            lo, hi = np.log(float(opts.get("rate_min", 0.003125))), np.log(float(opts.get("rate_max", 3.2)))
            rates = tuple(sorted((float(np.round(np.exp(rng.uniform(lo, hi)), 6)) for _ in range(k)), reverse=True))
        else:
            rates = tuple(sorted((float(x) for x in rng.choice(RANDOM_RATES, size=k, replace=False)), reverse=True))
        ranks = tuple(sorted(int(x) for x in rng.choice(ranks_pool, size=k)))
        out.append(
            Workload(
                rates=rates,
                ranks=ranks,
                lengths=str(lengths[i % len(lengths)]),
                arrivals=str(arrivals[int(rng.integers(len(arrivals)))]),
                seed=int(seed * 100003 + i),
            )
        )
    return out


def _ints(v: Any, what: str) -> list[int]:
    try:
        vals = [int(x) for x in (v if isinstance(v, list) else [v])]
    except (TypeError, ValueError):
        raise TracekitError(f"workload spec: {what} must be integers, got {v!r}") from None
    if not vals or any(x < 1 for x in vals):
        raise TracekitError(f"workload spec: {what} must be positive integers, got {v!r}")
    return vals


def _workload(d: dict[str, Any], i: int) -> Workload:
    if not isinstance(d, dict):
        raise TracekitError(f"workload spec: workloads[{i}] must be an object")
    unknown = set(d) - {"rates", "ranks", "lengths", "popularity", "arrivals", "seed", "name"}
    if unknown:
        raise TracekitError(f"workload spec: workloads[{i}]: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        rates = tuple(float(x) for x in d["rates"])
        ranks = tuple(int(x) for x in d.get("ranks", [16]))
    except KeyError:
        raise TracekitError(f"workload spec: workloads[{i}]: missing 'rates'") from None
    except (TypeError, ValueError):
        raise TracekitError(f"workload spec: workloads[{i}]: rates/ranks must be lists of numbers") from None
    if not rates or any(not np.isfinite(r) or r <= 0 for r in rates):
        raise TracekitError(f"workload spec: workloads[{i}]: rates must be positive numbers, got {list(rates)}")
    if not ranks or any(r < 1 for r in ranks):
        raise TracekitError(f"workload spec: workloads[{i}]: ranks must be positive integers, got {list(ranks)}")
    if str(d.get("popularity", "uniform")) != "uniform":
        # Per-adapter rates already fix every adapter's share; Zipf shares need a total rate.
        raise TracekitError(f"workload spec: workloads[{i}]: popularity applies to a total rate; give per-adapter rates instead")
    return Workload(
        rates=rates,
        ranks=ranks,
        lengths=str(d.get("lengths", "sharegpt")),
        popularity="uniform",
        arrivals=str(d.get("arrivals", "poisson")),
        seed=int(d.get("seed", 0)),
        name=str(d.get("name", "")),
    )


# Swept per cell, or set by the workload: not serving settings a spec may fix.
_SWEPT = {"max_loras", "max_cpu_loras", "max_lora_rank"}


def _serving(d: Any) -> dict[str, Any]:
    from twin.options import SERVING_FLAG_NAMES

    if not isinstance(d, dict):
        raise TracekitError("workload spec: serving must be an object of vLLM flag names")
    bad = set(d) - (set(SERVING_FLAG_NAMES) - _SWEPT)
    if bad:
        raise TracekitError(f"workload spec: serving: unknown or swept flag(s) {', '.join(sorted(bad))}")
    return dict(d)


def from_dict(d: dict[str, Any]) -> Spec:
    if not isinstance(d, dict):
        raise TracekitError("workload spec: expected a JSON object")
    unknown = set(d) - {"workloads", "random", "configs", "duration_s", "max_requests", "max_load_req_s", "seed",
                        "serving"}
    if unknown:
        raise TracekitError(f"workload spec: unknown key(s) {', '.join(sorted(unknown))}")
    ws = [_workload(w, i) for i, w in enumerate(d.get("workloads") or [])]
    if d.get("random"):
        r = dict(d["random"]) if isinstance(d["random"], dict) else {"n": d["random"]}
        n = _ints(r.pop("n", 0), "random.n")[0]
        ws += random_workloads(n, seed=int(r.pop("seed", d.get("seed", 0))), **r)
    if not ws:
        raise TracekitError("workload spec: no workloads (give 'workloads' and/or 'random')")
    cfg = d.get("configs") or {}
    spec = Spec(
        workloads=ws,
        max_loras=_ints(cfg.get("max_loras", DEFAULT_MAX_LORAS), "max_loras"),
        max_cpu_loras=_ints(cfg.get("max_cpu_loras", DEFAULT_MAX_CPU_LORAS), "max_cpu_loras"),
        duration_s=float(d.get("duration_s", 300.0)),
        max_requests=int(d.get("max_requests", 12000)),
        max_load_req_s=float(d.get("max_load_req_s", 80.0)),
        serving=_serving(d.get("serving") or {}),
    )
    if not spec.duration_s > 0:
        raise TracekitError("workload spec: duration_s must be positive")
    if not spec.cells():
        raise TracekitError("workload spec: no cell left (max_loras <= max_cpu_loras and n x rate <= max_load_req_s)")
    return spec


def parse_grid(text: str) -> Spec:
    """The one-line grid syntax (see the module docstring)."""
    items: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise TracekitError(f"workload spec: {part.strip()!r} is not key=value")
        items[key.strip()] = value.strip()
    known = {"rates", "ranks", "max_loras", "max_cpu_loras", "duration", "max_requests", "max_load", "seed",
             "lengths", "arrivals", "popularity", "random"}
    unknown = set(items) - known
    if unknown:
        raise TracekitError(f"workload spec: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")

    def groups(key: str, default: str) -> list[list[str]]:
        return [g.split("/") for g in items.get(key, default).split(",") if g.strip()]

    d: dict[str, Any] = {"workloads": [], "configs": {}}
    seed = int(items.get("seed", 0))
    if "rates" in items:
        for rates, ranks in itertools.product(groups("rates", ""), groups("ranks", "16")):
            d["workloads"].append(
                {
                    "rates": rates,
                    "ranks": ranks,
                    "lengths": items.get("lengths", "sharegpt"),
                    "arrivals": items.get("arrivals", "poisson"),
                    "popularity": items.get("popularity", "uniform"),
                    "seed": seed,
                }
            )
    if "random" in items:
        d["random"] = {"n": items["random"], "seed": seed}
    for key in ("max_loras", "max_cpu_loras"):
        if key in items:
            d["configs"][key] = [x for x in items[key].split(",") if x.strip()]
    if "duration" in items:
        d["duration_s"] = items["duration"]
    if "max_requests" in items:
        d["max_requests"] = items["max_requests"]
    if "max_load" in items:
        d["max_load_req_s"] = items["max_load"]
    try:
        return from_dict(d)
    except (TypeError, ValueError) as e:
        raise TracekitError(f"workload spec: {e}") from None


def load(spec: str) -> Spec:
    """A Spec from a JSON file path, inline JSON, or the grid syntax."""
    text = spec.strip()
    if text.startswith("{"):
        source = "inline JSON"
    elif "=" not in text:
        p = Path(text)
        if not p.exists():
            raise TracekitError(f"--workloads {spec}: no such file (and not a key=value grid)")
        source, text = str(p), p.read_text()
    else:
        return parse_grid(text)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise TracekitError(f"--workloads {source}: invalid JSON: {e}") from None
    try:
        return from_dict(d)
    except (TypeError, ValueError) as e:
        raise TracekitError(f"--workloads {source}: {e}") from None
