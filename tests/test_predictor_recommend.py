"""`predictor recommend`: the decision, the fleet split, --verify, --json and errors
(model trained on the toy system, whose true capacity is known in closed form)."""

from __future__ import annotations

import json
import math

import predictor_toy
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from predictor import features as F
from predictor import recommend as R
from predictor import train as T
from predictor.cli import main
from predictor.plan import split_fleet
from tracekit import schema
from tracekit.synth import synthesize
from twin.api import ServingConfig
from twin.profile import load_profile

KEYS = {"max_cpu_loras", "max_loras", "max_lora_rank", "throughput_tok_s", "gpus", "starving_risk", "explanation"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toyrec")
    ds, prof = predictor_toy.make_dataset(d)
    model, _ = T.train(ds, folds=4)
    mpath = model.save(d / "model.json")
    return d, prof, mpath


def _trace(d, rates, ranks, n=384, duration=600.0, seed=5, **kw):
    df, ctx = synthesize(n, rates, ranks, duration, seed=seed, **kw)
    return schema.write(d / f"t-{n}-{'-'.join(map(str, rates))}-{seed}.parquet", df, "trace", ctx)


@pytest.mark.parametrize("rates,ranks", [([0.4, 0.05, 0.0125], [8, 16, 16]), ([0.8, 0.4, 0.05], [8, 8, 32]),
                                         ([3.2, 1.6, 0.1], [16, 16, 16])])
def test_recommendation_is_near_the_true_optimum(toy, rates, ranks) -> None:
    d, prof, mpath = toy
    path = _trace(d, rates, ranks)
    rec = R.recommend(path, prof, mpath)
    f, _ = F.from_file(path)
    p = load_profile(prof)
    cfg = ServingConfig(max_loras=rec["max_loras"], max_cpu_loras=rec["max_cpu_loras"], max_lora_rank=rec["max_lora_rank"])
    true_cap = predictor_toy.toy_capacity(p.kv_capacity_tokens(cfg), rec["max_loras"], rec["max_cpu_loras"], f["tokens_per_req"])
    load = rec["max_cpu_loras"] * f["adapter_tok_s"]
    assert load <= true_cap / 0.9  # does not starve
    assert load >= 0.8 * true_cap  # and wastes little
    assert rec["max_lora_rank"] == max(ranks)
    assert rec["gpus"] == math.ceil(384 / rec["max_cpu_loras"])
    lf, meta = schema.scan(path)
    loads = F.compute_with_loads(lf, meta.context)[1]
    assert max(rec["gpu_load_tok_s"]) - min(rec["gpu_load_tok_s"]) <= max(loads.values()) + 0.1
    assert rec["max_loras"] <= rec["max_cpu_loras"]


def test_light_fleet_fits_one_gpu(toy) -> None:
    d, prof, mpath = toy
    rec = R.recommend(_trace(d, [0.01], [8], n=40), prof, mpath)
    assert rec["gpus"] == 1 and rec["max_cpu_loras"] == 40
    assert rec["starving_risk"] == 0.0 and "fits on one GPU" in rec["explanation"]


def _verify_with_scaled_model(toy, monkeypatch, tmp_path, factor: float) -> tuple[dict, dict]:
    """(recommendation, verified) from a copy of the toy model whose capacity is scaled by
    `factor`, with the toy system playing the twin."""
    d, prof, mpath = toy
    m = json.loads(mpath.read_text())
    if m["kind"] == "tree":
        m["params"]["value"] = [v + math.log(factor) for v in m["params"]["value"]]
    else:
        m["params"]["intercept"] += math.log(factor)
    path_m = tmp_path / f"scaled-{factor}.json"
    path_m.write_text(json.dumps(m))
    import twin.api

    monkeypatch.setattr(twin.api, "simulate", predictor_toy.simulate)
    path = _trace(d, [0.4, 0.05, 0.0125], [8, 16, 16])
    rec = R.recommend(path, prof, path_m)
    return rec, R.verify(rec, path, prof)


def test_verify_corrects_an_overoptimistic_model(toy, monkeypatch, tmp_path) -> None:
    """A model that promises twice the capacity is caught by --verify and the
    recommendation is walked back until it is served."""
    rec, out = _verify_with_scaled_model(toy, monkeypatch, tmp_path, 2.0)
    assert out["verify"]["runs"][0]["starved"]
    assert out["verify"]["corrected"] and out["max_cpu_loras"] < rec["max_cpu_loras"]
    assert not out["verify"]["runs"][-1]["starved"] or out["max_cpu_loras"] == 1
    assert "corrected" in out["explanation"]


def test_verify_raises_a_pessimistic_model(toy, monkeypatch, tmp_path) -> None:
    """A model that promises half the capacity: the twin shows headroom and --verify
    steps max_cpu_loras up while it still serves the sustained share."""
    rec, out = _verify_with_scaled_model(toy, monkeypatch, tmp_path, 0.5)
    assert out["verify"]["corrected"] and out["max_cpu_loras"] > rec["max_cpu_loras"]
    final = next(t for t in out["verify"]["runs"] if t["max_cpu_loras"] == out["max_cpu_loras"])
    assert not final["starved"] and final["work_frac"] >= R.SUSTAINED_SERVED
    assert "corrected" in out["explanation"]


def test_cli_json_keys_and_speed(toy) -> None:
    d, prof, mpath = toy
    path = _trace(d, [0.4, 0.05, 0.0125], [8, 16, 16], duration=3600.0)
    r = CliRunner().invoke(main, ["recommend", str(path), "--profile", prof, "--model", str(mpath), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert KEYS <= set(out)
    assert isinstance(out["explanation"], str) and "tok/s" in out["explanation"]
    # The budget is 100 ms; the shared test machine gets 3x slack.
    best = min(R.recommend(path, prof, mpath)["answer_ms"] for _ in range(3))
    assert best < 300
    r = CliRunner().invoke(main, ["recommend", str(path), "--profile", prof, "--model", str(mpath)])
    assert r.exit_code == 0 and "max_cpu_loras" in r.output


def test_cli_errors(toy, tmp_path) -> None:
    d, prof, mpath = toy
    path = _trace(d, [0.1], [8], n=10)
    r = CliRunner().invoke(main, ["recommend", str(path), "--profile", prof])
    assert r.exit_code == 2 and "no shipped model" in r.output
    (tmp_path / "junk.json").write_text("[1, 2]")
    r = CliRunner().invoke(main, ["recommend", str(path), "--profile", prof, "--model", str(tmp_path / "junk.json")])
    assert r.exit_code == 2 and "not a predictor model" in r.output
    r = CliRunner().invoke(main, ["recommend", str(tmp_path / "nope.parquet"), "--profile", prof, "--model", str(mpath)])
    assert r.exit_code == 2 and r.output.startswith("error:")


@settings(max_examples=60, deadline=None)
@given(loads=st.lists(st.floats(0, 1000), min_size=1, max_size=60), per_gpu=st.integers(1, 25))
def test_split_fleet_properties(loads, per_gpu) -> None:
    named = {f"a{i}": x for i, x in enumerate(loads)}
    gpus = split_fleet(named, per_gpu)
    flat = [a for g in gpus for a in g]
    assert sorted(flat) == sorted(named)  # every adapter exactly once
    assert len(gpus) == math.ceil(len(named) / per_gpu)
    assert all(len(g) <= per_gpu for g in gpus)
    totals = [sum(named[a] for a in g) for g in gpus]
    if len(gpus) > 1 and all(len(g) < per_gpu for g in gpus):
        # Unconstrained by slots, greedy LPT keeps the spread within the largest load.
        assert max(totals) - min(totals) <= max(loads) + 1e-6


def test_twin_margin_prefers_the_measured_real_bias() -> None:
    """The margin is the twin's measured over-prediction of real saturated throughput when
    the profile records one (an under-prediction gives no margin), else the calibration
    error; the shipped Llama profile carries its held-out check."""
    from twin.profile import Profile

    base = load_profile("h100-qwen-2.5-7b").to_dict()
    calib = base["step_time"]["fit_error"]["duration_s"]["mape_pct"]
    assert "validation" not in base
    assert R.twin_margin(Profile.from_dict(base)) == pytest.approx(1 - calib / 100)
    over = dict(base, validation={"saturated_throughput_bias_pct": 2.5})
    assert R.twin_margin(Profile.from_dict(over)) == pytest.approx(0.975)
    under = dict(base, validation={"saturated_throughput_bias_pct": -3.0})
    assert R.twin_margin(Profile.from_dict(under)) == 1.0
    llama = load_profile("h100-llama-3.1-8b")
    bias = llama.data["validation"]["saturated_throughput_bias_pct"]
    assert 0 < bias < 5 and R.twin_margin(llama) == pytest.approx(1 - bias / 100)
    assert "measured over-prediction" in R.margin_source(llama)


def test_work_done_counts_running_requests_and_drops_under_overload() -> None:
    """work_done (what --verify steps up on) counts completed requests whole and running
    ones as far as they got: near 1 for a GPU that keeps up, even where served_frac
    (completed only) is cut by the window's end; low for an overloaded GPU."""
    from twin.api import simulate

    prof = load_profile("h100-llama-3.1-8b")
    cfg = ServingConfig(max_loras=8, max_cpu_loras=16, max_lora_rank=16, max_num_seqs=2048, max_num_batched_tokens=2048)
    light, lctx = synthesize(adapters=16, rates=[0.2], ranks=[16], duration_s=120, lengths="sharegpt", seed=1)
    res = simulate(light, prof, cfg, trace_context=lctx, window_s=120)
    w = R.work_done(res.results)
    assert w > 0.97 and w > res.summary["served_frac"]
    heavy, hctx = synthesize(adapters=16, rates=[4.0], ranks=[16], duration_s=120, lengths="sharegpt", seed=1)
    res = simulate(heavy, prof, cfg, trace_context=hctx, window_s=120)
    assert R.work_done(res.results) < 0.8
