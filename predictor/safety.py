"""How sure the predictor is, and how far below a GPU's starving point it stays: one rule
for every profile.

Both ways of answering (`recommend`'s twin search and its model-only `--fast` answer)
estimate the same quantity for each max_loras: the *starving point*, the largest number of
adapters of the trace's mix one GPU serves at more than 90% of what they offer (the
paper's starving rule, `tracekit.metrics.STARVING_THRESHOLD`). The recommendation is that
count minus a safety step, and the range of counts is the same width on both sides:

    sigma = twin error                                   (twin search)
    sigma = sqrt(twin error^2 + model error^2)           (model only)
    step  = SAFETY_Z x sigma
    adapters per GPU = floor(starving point x (1 - step)),  range starving point x (1 -/+ step)

`twin error` is what every profile has: its calibration error of a saturated run's
throughput (`twin_error`). `model error` is the model's own cross-validated error of the
starving load on held-out twin workloads (`model_error`). `SAFETY_Z`, the one knob, is
chosen on the real Llama-3.1-8B H100 sweeps with workloads held out
(`benchmarks/predictor_h100.py --tune` writes `predictor/rule.json`); the other profiles
are reported with it untouched (`benchmarks/predictor_lomo.py`).

Why a step below the starving point costs little: a GPU's throughput stops growing at its
knee (served ~ 100%), and the starving point (served = 90%) lies about 10% further;
anywhere between the two serves the GPU's full capacity. A step that stays within that
interval loses nothing and keeps the GPU from starving when the twin is optimistic.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RULE_PATH = Path(__file__).parent / "rule.json"
# Used when rule.json is missing (a source checkout before the first tuning).
DEFAULT_SAFETY_Z = 1.0
# A profile that records no calibration error at all: assume the width of the starving
# rule itself (10%), and say so.
UNKNOWN_TWIN_ERROR = 0.10


@dataclass(frozen=True)
class Rule:
    safety_z: float
    tuned_on: str = ""
    twin_commit: str = ""


def load_rule(path: Path = RULE_PATH) -> Rule:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return Rule(DEFAULT_SAFETY_Z, tuned_on="default (predictor/rule.json missing)")
    return Rule(float(d["safety_z"]), str(d.get("tuned_on", "")), str(d.get("twin_commit", "")))


def save_rule(rule: Rule, extra: dict[str, Any] | None = None, path: Path = RULE_PATH) -> Path:
    path.write_text(json.dumps({**asdict(rule), **(extra or {})}, indent=1) + "\n")
    return path


def twin_error(profile: Any) -> tuple[float, str]:
    """The twin's relative error in the throughput of a saturated GPU, from the profile's
    own calibration (held out), and where it came from.

    - Calibrated on whole runs (the paper's microbenchmarks: `fit_error.duration_s`): a
      run's duration is the sum of all its steps, i.e. its throughput: the MAPE of the
      held-out runs' durations.
    - Calibrated on captured steps (`twin calibrate`: `fit_error.held_out`): a run's
      throughput sums thousands of step times, so the per-step noise averages out and the
      systematic part stays: |mean signed error| of the held-out steps.
    - Neither: UNKNOWN_TWIN_ERROR.

    A profile's `validation` section (a check against real runs, where one exists) is
    deliberately not used: most profiles have none, and the rule must be the same for all.
    """
    data = getattr(profile, "data", profile) or {}
    err = ((data.get("step_time") or {}).get("fit_error")) or {}
    try:
        return float(err["duration_s"]["mape_pct"]) / 100.0, "held-out run durations (MAPE)"
    except (KeyError, TypeError, ValueError):
        pass
    try:
        return abs(float(err["held_out"]["bias_pct"])) / 100.0, "held-out step times (|bias|)"
    except (KeyError, TypeError, ValueError):
        pass
    return UNKNOWN_TWIN_ERROR, "no calibration error recorded: assumed"


def model_error(model: Any) -> float:
    """The model's cross-validated relative error of the starving load (mean absolute,
    on held-out twin workloads), from its meta; 0 when it records none."""
    meta = getattr(model, "meta", None) or {}
    cv = (meta.get("cv") or {}).get(getattr(model, "kind", ""), {})
    v = cv.get("capacity_mape")
    return float(v) if v is not None else 0.0


@dataclass(frozen=True)
class Safety:
    """The safety step of one answer, with what it was derived from."""

    twin_error: float
    twin_error_source: str
    model_error: float  # 0 for the twin search
    sigma: float
    z: float
    step: float

    def below(self, starving_point: float) -> int:
        """Adapters per GPU: the starving point less the step (at least 1)."""
        return max(1, int(math.floor(starving_point * (1.0 - self.step) + 1e-9)))

    def range(self, starving_point: float) -> tuple[int, int]:
        """Counts the errors allow for the starving point."""
        lo = self.below(starving_point)
        hi = max(lo, int(math.floor(starving_point * (1.0 + self.step) + 1e-9)))
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def safety(profile: Any, model: Any | None = None, rule: Rule | None = None) -> Safety:
    """The step for an answer from the twin (model None) or from the model alone."""
    r = rule or load_rule()
    e_t, src = twin_error(profile)
    e_m = model_error(model) if model is not None else 0.0
    sigma = math.sqrt(e_t * e_t + e_m * e_m)
    return Safety(twin_error=e_t, twin_error_source=src, model_error=e_m, sigma=sigma, z=r.safety_z,
                  step=min(0.9, r.safety_z * sigma))
