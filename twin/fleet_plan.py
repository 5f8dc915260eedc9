"""A fleet plan: GPUs, each with its serving configuration (by vLLM's names) and the
adapters deployed on it. One small JSON file, read by `twin run --fleet`, `replay run
--plan` and written by `predictor plan`:

    {
      "fleet_plan": 1,
      "profile": "h100-llama-3.1-8b",
      "router": "placement",
      "gpus": [
        {"name": "gpu-00", "adapters": ["lora-0001", "lora-0007"],
         "max_loras": 16, "max_lora_rank": 8, "why": "rank-8 adapters ..."},
        {"name": "gpu-01", "adapters": ["lora-0000"], "max_loras": 1}
      ],
      "meta": {}
    }

Per GPU: `adapters` (names; `null` stands for the base model, which every GPU serves
anyway), any `ServingConfig` field (`max_loras`, `max_cpu_loras`, `max_lora_rank`,
`max_num_seqs`, ...; unset ones come from the profile's server, as on the command line),
an optional `name` (default `gpu-NN`) and `why` (words). `profile`, `router` (what the
plan was made for) and `meta` (free-form) are optional.

Defaults that differ from one server's command line, because a plan deploys adapters:
`max_cpu_loras` = the adapters listed (at least `max_loras`), and `max_lora_rank` = the
largest rank among the adapters the GPU may receive (its own with the `placement` router,
every adapter of the trace with a router that ignores the placement).

`resolve` checks a plan against a trace and a profile, with one error line each for: a
trace adapter that no GPU holds (listing them), a GPU whose configuration vLLM would
refuse or whose memory leaves no KV cache (naming the GPU); a plan adapter the trace
never uses is a warning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tracekit.schema import TracekitError
from twin.config import ServingConfig

PLAN_VERSION = 1
CONFIG_FIELDS = {f.name: f.type for f in fields(ServingConfig)}
GPU_KEYS = {"name", "adapters", "why"} | set(CONFIG_FIELDS)
TOP_KEYS = {"fleet_plan", "profile", "router", "gpus", "meta"}


def _names(items: Iterable[Any], limit: int = 5) -> str:
    items = [("<base>" if x is None else str(x)) for x in items]
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _suggest(key: str, allowed: Iterable[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


@dataclass(frozen=True)
class GpuPlan:
    name: str
    adapters: tuple[str | None, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)  # ServingConfig fields as given
    why: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        out.update(self.settings)
        if self.why:
            out["why"] = self.why
        out["adapters"] = list(self.adapters)
        return out


@dataclass(frozen=True)
class FleetPlan:
    gpus: tuple[GpuPlan, ...]
    profile: str | None = None
    router: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<plan>"

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.gpus]

    def placement(self) -> dict[str | None, list[int]]:
        """Adapter -> the GPUs (indices, ascending) that list it."""
        out: dict[str | None, list[int]] = {}
        for i, g in enumerate(self.gpus):
            for a in g.adapters:
                out.setdefault(a, []).append(i)
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fleet_plan": PLAN_VERSION}
        if self.profile:
            out["profile"] = self.profile
        if self.router:
            out["router"] = self.router
        out["gpus"] = [g.to_dict() for g in self.gpus]
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        except OSError as e:
            raise TracekitError(f"{p}: cannot write: {e.strerror or e}") from None
        return p

    @classmethod
    def load(cls, path: str | Path) -> FleetPlan:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise TracekitError(f"{p}: cannot read the plan: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TracekitError(f"{p}: not a JSON plan (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(data, str(p))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<plan>") -> FleetPlan:
        if not isinstance(data, Mapping):
            raise TracekitError(f"{source}: a plan is a JSON object with a 'gpus' list")
        unknown = set(data) - TOP_KEYS
        if unknown:
            k = sorted(unknown)[0]
            raise TracekitError(f"{source}: unknown key {k!r}{_suggest(k, TOP_KEYS)}; a plan has {', '.join(sorted(TOP_KEYS))}")
        version = data.get("fleet_plan", PLAN_VERSION)
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise TracekitError(f"{source}: plan version {version!r} is newer than this tool reads ({PLAN_VERSION})")
        gpus_raw = data.get("gpus")
        if not isinstance(gpus_raw, list) or not gpus_raw:
            raise TracekitError(f"{source}: 'gpus' must be a non-empty list of GPUs")
        gpus: list[GpuPlan] = []
        seen: set[str] = set()
        width = max(2, len(str(len(gpus_raw) - 1)))
        for i, g in enumerate(gpus_raw):
            where = f"{source}: gpus[{i}]"
            if not isinstance(g, Mapping):
                raise TracekitError(f"{where}: expected an object with 'adapters' and serving fields")
            name = g.get("name", f"gpu-{i:0{width}d}")
            if not isinstance(name, str) or not name:
                raise TracekitError(f"{where}: 'name' must be a non-empty string")
            where = f"{source}: {name}"
            if name in seen:
                raise TracekitError(f"{where}: two GPUs have this name")
            seen.add(name)
            unknown = set(g) - GPU_KEYS
            if unknown:
                k = sorted(unknown)[0]
                raise TracekitError(f"{where}: unknown field {k!r}{_suggest(k, GPU_KEYS)}")
            adapters = g.get("adapters")
            if not isinstance(adapters, list) or not all(a is None or (isinstance(a, str) and a) for a in adapters):
                raise TracekitError(f"{where}: 'adapters' must be a list of adapter names (null: the base model)")
            if len(set(adapters)) != len(adapters):
                dup = sorted({a for a in adapters if adapters.count(a) > 1}, key=str)
                raise TracekitError(f"{where}: adapter(s) listed twice: {_names(dup)}")
            settings: dict[str, Any] = {}
            for k in sorted(set(g) & set(CONFIG_FIELDS)):
                settings[k] = _check_value(where, k, g[k])
            why = g.get("why")
            if why is not None and not isinstance(why, str):
                raise TracekitError(f"{where}: 'why' must be a string")
            gpus.append(GpuPlan(name=name, adapters=tuple(adapters), settings=settings, why=why))
        profile = data.get("profile")
        router = data.get("router")
        for key, v in (("profile", profile), ("router", router)):
            if v is not None and not isinstance(v, str):
                raise TracekitError(f"{source}: '{key}' must be a string")
        meta = data.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise TracekitError(f"{source}: 'meta' must be an object")
        return cls(gpus=tuple(gpus), profile=profile, router=router, meta=dict(meta), source=source)


def _check_value(where: str, key: str, v: Any) -> Any:
    kind = str(CONFIG_FIELDS[key])
    if v is None:
        return None
    if "bool" in kind:
        if not isinstance(v, bool):
            raise TracekitError(f"{where}: {key} must be true or false, got {v!r}")
    elif "float" in kind:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TracekitError(f"{where}: {key} must be a number, got {v!r}")
        v = float(v)
    elif "int" in kind:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TracekitError(f"{where}: {key} must be an integer, got {v!r}")
    return v


def check_covers(plan: FleetPlan, trace_adapters: Iterable[str | None]) -> list[str]:
    """Raise (listing them) when trace adapters are on no GPU of the plan; return the
    warning about plan adapters the trace never uses."""
    used = set(trace_adapters)
    placed = plan.placement()
    missing = sorted(a for a in used if a is not None and a not in placed)
    if missing:
        raise TracekitError(f"{plan.source}: {len(missing)} trace adapter(s) on no GPU of the plan: {_names(missing)}")
    unused = sorted(a for a in placed if a is not None and a not in used)
    return [f"{plan.source}: {len(unused)} plan adapter(s) the trace never uses: {_names(unused)}"] if unused else []


@dataclass
class ResolvedFleet:
    """A plan checked against a trace and a profile: one ServingConfig per GPU."""

    plan: FleetPlan
    configs: list[ServingConfig]
    kv_capacity_tokens: list[int]
    warnings: list[str]


def resolve(
    plan: FleetPlan,
    profile: Any,
    trace_adapters: Iterable[str | None],
    ranks: Mapping[str, int],
    router: str,
) -> ResolvedFleet:
    """Check `plan` for a trace using `trace_adapters` (None: base-model requests) with
    `ranks`, under `router`; one TracekitError line for what cannot run."""
    src = plan.source
    used = set(trace_adapters)
    warnings = check_covers(plan, used)
    follows_placement = router == "placement"
    trace_max = max((ranks[a] for a in used if a is not None and a in ranks), default=None)
    configs: list[ServingConfig] = []
    kvs: list[int] = []
    for g in plan.gpus:
        where = f"{src}: {g.name}"
        # What this GPU may be sent: its own adapters, or any trace adapter.
        receives = [a for a in g.adapters if a is not None] if follows_placement else sorted(a for a in used if a is not None)
        own_max = max((ranks[a] for a in receives if a in ranks), default=None)
        kw = dict(g.settings)
        if kw.get("max_lora_rank") is None:
            kw["max_lora_rank"] = own_max if own_max is not None else (trace_max or 16)
        if kw.get("max_cpu_loras") is None:
            n_listed = sum(1 for a in g.adapters if a is not None)
            ml = kw.get("max_loras") or ServingConfig.for_profile(profile).max_loras
            kw["max_cpu_loras"] = max(ml, n_listed)
        try:
            config = ServingConfig.for_profile(profile, **kw).check()
        except TracekitError as e:
            raise TracekitError(f"{where}: {e}") from None
        if receives and not config.enable_lora:
            raise TracekitError(f"{where}: enable_lora is false but the GPU serves adapters")
        too_big = [a for a in receives if ranks.get(a, 0) > config.max_lora_rank]
        if too_big:
            a = too_big[0]
            how = "holds" if follows_placement else f"may be sent (--router {router})"
            raise TracekitError(
                f"{where}: {how} adapter {a!r} of rank {ranks[a]} > max_lora_rank {config.max_lora_rank} (vLLM refuses to load it)"
            )
        kv = int(profile.kv_capacity_tokens(config))
        if kv // config.block_size - 1 <= 0:
            est = getattr(profile, "kv_estimate", None)
            reason = (getattr(est(config), "reason", "") if est else "") or "no room for the KV cache"
            raise TracekitError(
                f"{where}: does not fit its memory (max_loras {config.max_loras} x max_lora_rank {config.max_lora_rank} "
                f"on {getattr(profile, 'name', 'the profile')}: {reason})"
            )
        configs.append(config)
        kvs.append(kv)
    return ResolvedFleet(plan=plan, configs=configs, kv_capacity_tokens=kvs, warnings=warnings)
