"""`twin calibrate` from captured steps, and `twin profiles`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tracekit.schema import KIND_STEPS, KIND_TRACE, new_context, write
from twin.api import ServingConfig
from twin.cli import main as twin_cli
from twin.profile import load_profile
from twin.timing import FEATURES, LinearStepTime

RANKS = {"a1": 8, "a2": 16, "a3": 32, "a4": 8}
TRUTH = {
    "intercept": 0.004, "prefill_tokens": 9e-5, "decode_tokens": 6e-4, "context_tokens": 2e-7,
    "lora_slots": 0.0, "num_adapters": 1.5e-3, "rank_sum": 2e-5, "lora_tokens": 3e-5, "lora_slot_tokens": 0.0,
}
CONFIG = {"max_loras": 2, "max_cpu_loras": 4, "max_lora_rank": 32, "max_num_seqs": 32,
          "max_num_batched_tokens": 512, "block_size": 16, "kv_capacity_tokens": 40_000, "max_model_len": 2048}


def _steps(n: int, seed: int, *, with_context: bool = True, load_ms: float = 0.0, noise: float = 0.02) -> tuple[dict[str, Any], np.ndarray]:
    """Steps whose durations follow TRUTH (+ multiplicative noise), like a CPU capture."""
    rng = np.random.default_rng(seed)
    decode = rng.integers(0, 32, n)
    prefill = np.where(rng.random(n) < 0.3, rng.integers(1, 512, n), 0)
    prefill = np.minimum(prefill, 512 - decode)
    decode[(prefill + decode) == 0] = 1
    ctx = decode * rng.integers(20, 600, n) + prefill
    names = list(RANKS)
    active = [sorted(set(rng.choice(names, size=rng.integers(0, 3), replace=True).tolist())) for _ in range(n)]
    a = np.array([len(x) for x in active])
    r = np.array([sum(RANKS[k] for k in x) for x in active])
    loads = np.where(rng.random(n) < 0.1, rng.integers(1, 3, n), 0)
    t = LinearStepTime(TRUTH).predict(prefill, decode, ctx, a, r, max_loras=2, max_lora_rank=32)
    dur = t * (1 + noise * rng.standard_normal(n)) + loads * load_ms / 1e3
    kv_usage = np.minimum(ctx / CONFIG["kv_capacity_tokens"], 1.0)
    data = {
        "step": np.arange(n), "t_s": np.cumsum(dur) - dur, "duration_s": dur,
        "num_running": (decode + (prefill > 0)).astype(np.int32), "num_waiting": np.zeros(n, np.int32),
        "prefill_reqs": (prefill > 0).astype(np.int32), "prefill_tokens": prefill.astype(np.int32),
        "decode_reqs": decode.astype(np.int32), "decode_tokens": decode.astype(np.int32),
        "active_adapters": active, "kv_usage": kv_usage, "num_preempted": np.zeros(n, np.int32),
        "adapter_loads": loads.astype(np.int32),
    }
    if with_context:
        data["context_tokens"] = ctx.astype(np.int64)
    return data, t


def _ctx() -> dict[str, Any]:
    return new_context(model="tiny-llama", source="test", adapters={k: {"rank": v, "path": None} for k, v in RANKS.items()}, **CONFIG)


def test_calibrate_recovers_the_step_model(tmp_path: Path) -> None:
    data, _ = _steps(3000, 0)
    steps = write(tmp_path / "steps.parquet", data, KIND_STEPS, _ctx())
    out = tmp_path / "prof.json"
    res = CliRunner().invoke(twin_cli, ["calibrate", str(steps), "--out", str(out), "--name", "cpu-tiny"])
    assert res.exit_code == 0, res.output
    assert "held_out" in res.output and "wrote" in res.output
    prof = load_profile(out)
    d = prof.data
    assert prof.name == "cpu-tiny"
    assert d["memory"] == {"kind": "fixed", "kv_tokens": 40_000, "max_model_len": 2048}
    assert prof.kv_capacity_tokens(ServingConfig()) == 40_000
    assert d["captured_server_config"]["max_loras"] == 2
    err = d["step_time"]["fit_error"]["held_out"]
    assert err["n"] == 600 and err["mape_pct"] < 3.0 and err["r2"] > 0.98
    # The fitted model predicts fresh batches like the truth does.
    fresh, truth = _steps(500, 7, noise=0.0)
    a = np.array([len(x) for x in fresh["active_adapters"]])
    r = np.array([sum(RANKS[k] for k in x) for x in fresh["active_adapters"]])
    pred = prof.step_time(fresh["prefill_tokens"], fresh["decode_tokens"], fresh["context_tokens"], a, r, max_lora_rank=32, max_loras=2)
    assert np.mean(np.abs(pred / truth - 1)) < 0.03
    for f in ("decode_tokens", "prefill_tokens", "num_adapters"):
        assert d["step_time"]["coef"][f] == pytest.approx(TRUTH[f], rel=0.15)


def test_calibrate_keeps_the_total_step_time_under_skewed_noise(tmp_path: Path) -> None:
    """CPU captures have a long right tail (contended steps): a relative-error fit follows
    the typical step and would lose part of the engine's busy time; the calibrated
    profile reproduces the captured total, which is what throughput and mean ITL add up."""
    data, truth = _steps(3000, 3, noise=0.0)
    rng = np.random.default_rng(4)
    slow = rng.random(len(truth)) < 0.05
    data["duration_s"] = truth * np.where(slow, 4.0, 1.0)  # 5% of steps 4x slower
    steps = write(tmp_path / "steps.parquet", data, KIND_STEPS, _ctx())
    out = tmp_path / "prof.json"
    res = CliRunner().invoke(twin_cli, ["calibrate", str(steps), "--out", str(out), "--holdout", "0"])
    assert res.exit_code == 0, res.output
    prof = load_profile(out)
    a = np.array([len(x) for x in data["active_adapters"]])
    r = np.array([sum(RANKS[k] for k in x) for x in data["active_adapters"]])
    pred = prof.step_time(data["prefill_tokens"], data["decode_tokens"], data["context_tokens"], a, r, max_lora_rank=32, max_loras=2)
    pred = pred + prof.adapter_load_s(8, 32) * data["adapter_loads"]  # loads regressed from the steps
    assert pred.sum() == pytest.approx(data["duration_s"].sum(), rel=0.01)
    # Without the correction the relative fit would sit near the typical (fast) step.
    assert pred.sum() > 1.1 * truth.sum()


def test_calibrate_directory_of_parts_without_context_tokens(tmp_path: Path) -> None:
    """A capture directory (several parts, a `_` sidecar) and no context_tokens column:
    context is estimated from kv_usage x KV capacity, and the profile says so."""
    cap = tmp_path / "capture"
    for i in range(3):
        data, _ = _steps(800, i, with_context=False)
        write(cap / f"part-{i:03d}.parquet", data, KIND_STEPS, _ctx())
    (cap / "_adapter_loads-x.jsonl").write_text("{}\n")
    out = tmp_path / "p.json"
    res = CliRunner().invoke(twin_cli, ["calibrate", str(cap), "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["fitted_from"]["steps"] == 2400 and d["fitted_from"]["context_tokens_estimated"]
    assert d["name"] == "calibrated-tiny-llama"
    assert d["step_time"]["fit_error"]["held_out"]["mape_pct"] < 5.0


def test_calibrate_fits_adapter_load_cost(tmp_path: Path) -> None:
    data, _ = _steps(4000, 3, load_ms=25.0, noise=0.01)
    steps = write(tmp_path / "s.parquet", data, KIND_STEPS, _ctx())
    out = tmp_path / "p.json"
    assert CliRunner().invoke(twin_cli, ["calibrate", str(steps), "--out", str(out)]).exit_code == 0
    prof = load_profile(out)
    assert prof.adapter_load_s(8, 32) == pytest.approx(0.025, rel=0.1)


def test_calibrate_measured_adapter_load_seconds(tmp_path: Path) -> None:
    data, _ = _steps(1000, 4, load_ms=10.0)
    data["adapter_load_s"] = data["adapter_loads"] * 0.010
    steps = write(tmp_path / "s.parquet", data, KIND_STEPS, _ctx())
    out = tmp_path / "p.json"
    assert CliRunner().invoke(twin_cli, ["calibrate", str(steps), "--out", str(out)]).exit_code == 0
    assert load_profile(out).adapter_load_s(16, 32) == pytest.approx(0.010, rel=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope.parquet", "--out", "x.json"], "nope.parquet: no such file"),
        (["TRACE", "--out", "x.json"], "expected"),
        (["FEW", "--out", "x.json"], "usable steps"),
    ],
)
def test_calibrate_bad_input_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    trace = write(tmp_path / "t.parquet", {"request_id": ["r"], "arrival_s": [0.0], "adapter": [None],
                                          "prompt_tokens": [3], "output_tokens": [2]}, KIND_TRACE, new_context())
    few, _ = _steps(5, 0)
    few_p = write(tmp_path / "few.parquet", few, KIND_STEPS, _ctx())
    args = [str(trace) if a == "TRACE" else str(few_p) if a == "FEW" else a for a in args]
    res = CliRunner().invoke(twin_cli, ["calibrate", *args], catch_exceptions=False)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in res.output


def test_profiles_command_lists_shipped() -> None:
    res = CliRunner().invoke(twin_cli, ["profiles"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in ("h100-llama-3.1-8b", "h100-qwen-2.5-7b"):
        assert name in res.output
    assert "aggregate benchmark runs" in res.output and "0.8.5" in res.output
    # In a terminal of 80 columns the table fits and the names a user types stay whole.
    narrow = CliRunner().invoke(twin_cli, ["profiles"], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80
    for name in ("h100-llama-3.1-8b", "h100-qwen-2.5-7b"):
        assert name in narrow.output


def test_features_cover_the_interface() -> None:
    """Every quantity the issue names reaches the model: prefill, decode, context,
    distinct adapters, their ranks (and slots)."""
    base = dict.fromkeys(FEATURES, 0.0)
    for f in FEATURES:
        coef = dict(base, **{f: 1.0})
        m = LinearStepTime(coef, min_s=0.0)
        t0 = m.predict(10, 10, 10, 2, 16, max_loras=4, prefill_reqs=1)
        t1 = m.predict(20, 20, 20, 3, 32, max_loras=8, prefill_reqs=2)
        if f in ("intercept", "lora_base"):  # constant per step (per LoRA step)
            assert float(t1) == float(t0) > 0, f
        else:
            assert float(t1) > float(t0), f


def test_calibrate_writes_the_captured_servers_behaviour(tmp_path: Path) -> None:
    """The profile's `server` section is what the captured vLLM ran with (the plugin's
    context), so `twin run` with that profile mirrors it unless a flag says otherwise."""
    from twin.options import config_from_options

    data, _ = _steps(500, 1)
    ctx = new_context(model="tiny-llama", source="test", adapters={k: {"rank": v, "path": None} for k, v in RANKS.items()},
                      **CONFIG, vllm_version="0.32.0", enable_prefix_caching=True, async_scheduling=False)  # fmt: skip
    steps = write(tmp_path / "s.parquet", data, KIND_STEPS, ctx)
    out = tmp_path / "p.json"
    res = CliRunner().invoke(twin_cli, ["calibrate", str(steps), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "enable_prefix_caching on" in res.output
    server = json.loads(out.read_text())["server"]
    assert server["vllm_version"] == "0.32.0" and server["enable_prefix_caching"] is True
    assert server["async_scheduling"] is False and server["block_size"] == 16
    assert server["max_num_seqs"] == 32 and server["max_num_batched_tokens"] == 512
    # Not recorded by this capture: vLLM 0.32's default (True), said in a note.
    assert server["scheduler_reserve_full_isl"] is True and "scheduler_reserve_full_isl" in server["note"]
    prof = load_profile(out)
    cfg = config_from_options(prof, None, {}, {})
    assert cfg.enable_prefix_caching and cfg.scheduler_reserve_full_isl and not cfg.async_scheduling
    assert cfg.max_num_seqs == 32 and cfg.max_num_batched_tokens == 512
    assert not config_from_options(prof, None, {}, {"enable_prefix_caching": False}).enable_prefix_caching
    # A capture that records the flag keeps it.
    ctx["scheduler_reserve_full_isl"] = False
    write(tmp_path / "s2.parquet", data, KIND_STEPS, ctx)
    assert CliRunner().invoke(twin_cli, ["calibrate", str(tmp_path / "s2.parquet"), "--out", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["server"]["scheduler_reserve_full_isl"] is False


def test_calibrate_without_kv_capacity_is_an_error_naming_the_flag(tmp_path: Path) -> None:
    data, _ = _steps(300, 2)
    ctx = _ctx()
    del ctx["kv_capacity_tokens"]
    steps = write(tmp_path / "s.parquet", data, KIND_STEPS, ctx)
    out = tmp_path / "p.json"
    res = CliRunner().invoke(twin_cli, ["calibrate", str(steps), "--out", str(out)])
    assert res.exit_code == 2 and "--kv-capacity-tokens" in res.output and "Traceback" not in res.output
    assert not out.exists()
    res = CliRunner().invoke(twin_cli, ["calibrate", str(steps), "--out", str(out), "--kv-capacity-tokens", "12345"])
    assert res.exit_code == 0, res.output
    assert load_profile(out).kv_capacity_tokens(ServingConfig()) == 12345


def test_profiles_and_calibrate_print_json(tmp_path: Path) -> None:
    """Every command that prints a summary has `--json`: one object a script can read."""
    res = CliRunner().invoke(twin_cli, ["profiles", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {"h100-llama-3.1-8b", "h100-qwen-2.5-7b"} <= {r["name"] for r in rows}
    data, _ = _steps(500, 3)
    steps = write(tmp_path / "s.parquet", data, KIND_STEPS, _ctx())
    out = tmp_path / "p.json"
    res = CliRunner().invoke(twin_cli, ["calibrate", str(steps), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["profile"] == str(out) and summary["steps"] == 500
    assert summary["kv_tokens"] == 40_000 and summary["fit_error"]["held_out"]["n"] == 100
    assert summary["coef"] == json.loads(out.read_text())["step_time"]["coef"]
