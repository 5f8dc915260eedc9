"""`predictor train`: the capacity model, its JSON form, cross-validation and baselines."""

from __future__ import annotations

import json

import numpy as np
import predictor_toy
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from predictor import train as T
from predictor.cli import main
from predictor.model import MODEL_FEATURES, CapacityModel


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return predictor_toy.make_dataset(tmp_path_factory.mktemp("toy"))


def test_capacity_table_targets_the_starving_load(toy) -> None:
    from predictor import pio

    df, _ = pio.read(toy[0])
    ct = T.capacity_table(df)
    sat = ct.filter(ct["saturated"])
    assert sat.height >= 20
    # The toy's capacity is known: served = min(offered, C) x 0.995 / offered falls to 90%
    # at offered = C x 0.995 / 0.9; C drops by at most 20% with churn (more adapters than
    # slots); each cell's own sample of lengths moves C by a little (length^0.1: 1%).
    for r in sat.iter_rows(named=True):
        cap = predictor_toy.toy_capacity(r["kv_capacity_tokens"], r["max_loras"], r["max_loras"], r["tokens_per_req"])
        assert 0.78 * cap * 0.995 / 0.9 <= r["capacity_tok_s"] <= 1.01 * cap * 0.995 / 0.9


def test_cv_error_and_the_safety_tradeoff_on_the_toy(toy) -> None:
    """The model's held-out error is small on the toy; its held-out decisions starve less
    as the safety step grows, and with a step wide enough for the lumpy mix of a few
    heavy adapters (a 16-adapter cell of three rates offers up to 10% more than their
    mean) none starves and little is lost (better than the paper's direct models)."""
    from predictor import pio

    model, cv = T.train(toy[0], kind="auto", folds=4)
    assert set(cv) == {"tree", "linear", "paper_tree", "paper_forest"}
    best = cv[model.kind]
    assert best["capacity_mape"] < 0.06
    assert best["capacity_mape"] == min(cv["tree"]["capacity_mape"], cv["linear"]["capacity_mape"])
    # The safety step of the held-out decisions is the rule's z x this model's own CV error.
    from predictor.safety import load_rule

    assert best["safety_step"] == pytest.approx(min(0.9, load_rule().safety_z * best["capacity_mape"]))
    df, _ = pio.read(toy[0])
    by_z = {z: T.cross_validate(df, kinds=(model.kind,), folds=4, baselines=False, safety_z=z)[model.kind]
            for z in (0.0, 2.0, 16.0)}
    starved = [by_z[z]["starved_frac"] for z in (0.0, 2.0, 16.0)]
    assert starved == sorted(starved, reverse=True) and starved[0] > 0 and starved[-1] == 0
    far = by_z[16.0]
    assert far["mean_shortfall"] < 0.05
    for paper in ("paper_tree", "paper_forest"):
        assert far["mean_shortfall"] + 0.3 * far["starved_frac"] < cv[paper]["mean_shortfall"] + 0.3 * cv[paper]["starved_frac"]
    assert model.meta["dataset"]["workloads"] == 16 and model.meta["cv"]["tree"]["workloads"] == 16
    assert model.residuals and len(model.residuals) == len(best["residuals"])
    assert model.meta["serving"]["max_num_seqs"] and "starving load" in model.meta["target"]


def test_json_model_equals_sklearn(toy) -> None:
    """The numpy evaluation of the saved tree and linear models reproduces scikit-learn."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeRegressor

    from predictor import pio

    df, _ = pio.read(toy[0])
    t = T.capacity_table(df)
    t = t.filter(t["saturated"])
    X, y = T._xy(t, MODEL_FEATURES)
    tree = DecisionTreeRegressor(max_depth=T.TREE_DEPTH, min_samples_leaf=T.MIN_LEAF, random_state=0).fit(X, y)
    m = T.fit("tree", t)
    np.testing.assert_allclose(m.predict_log(X), tree.predict(X))
    sc = StandardScaler().fit(X)
    sc.scale_ = np.where(sc.scale_ > 0, sc.scale_, 1.0)
    lin = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(sc.transform(X), y)
    m2 = T.fit("linear", t)
    np.testing.assert_allclose(m2.predict_log(X), lin.predict(sc.transform(X)), rtol=1e-9)

    @settings(max_examples=25, deadline=None)
    @given(arrays(np.float64, (5, X.shape[1]), elements=st.floats(-1e6, 1e6)))
    def same_anywhere(Z: np.ndarray) -> None:
        np.testing.assert_allclose(m.predict_log(Z), tree.predict(Z))

    same_anywhere()


def test_cli_train_saves_readable_model(toy, tmp_path) -> None:
    out = tmp_path / "m"
    r = CliRunner().invoke(main, ["train", str(toy[0]), "--out", str(out), "--kind", "tree", "--folds", "3"])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["kind"] == "tree" and d["features"] == MODEL_FEATURES
    assert d["meta"]["dataset"]["sha256_16"] and "paper_forest" in d["meta"]["cv"]
    m = CapacityModel.load(tmp_path / "m.json")
    words = m.explain(np.zeros(len(MODEL_FEATURES)))
    assert words[-1].startswith("-> starving load")
    r = CliRunner().invoke(main, ["train", str(toy[0]), "--out", str(out), "--kind", "tree", "--folds", "3", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["kind"] == "tree" and summary["cv"]["tree"]["workloads"] == d["meta"]["cv"]["tree"]["workloads"]


def test_cli_train_errors(tmp_path) -> None:
    r = CliRunner().invoke(main, ["train", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and r.output.startswith("error:") and "none.parquet" in r.output
    from tracekit import schema
    from tracekit.synth import synthesize

    df, ctx = synthesize(4, [0.1], [8], 10.0)
    schema.write(tmp_path / "t.parquet", df, "trace", ctx)
    r = CliRunner().invoke(main, ["train", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "expected a predictor dataset file, got a tracekit trace file" in r.output


@settings(max_examples=100, deadline=None)
@given(cap=st.floats(1e3, 2e4), loads=st.lists(st.floats(100, 5e4), min_size=2, max_size=12, unique=True))
def test_starving_load_brackets_the_limit(cap: float, loads: list[float]) -> None:
    off = np.sort(np.asarray(loads))
    thr = np.minimum(off, cap) * 0.995
    served = thr / off
    got = T.starving_load(off, thr, served)
    starved = 1.0 - served >= 0.1
    if not starved.any():
        assert got is None  # never starved: only a lower bound
        return
    j = int(np.flatnonzero(starved)[0])
    lo = off[j - 1] if j else 0.0
    assert lo <= got <= off[j]
    # The true limit (served = 90%) is cap x 0.995 / 0.9: found exactly when bracketed.
    assert got == pytest.approx(min(max(cap * 0.995 / 0.9, lo), off[j]))
