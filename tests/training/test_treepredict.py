"""The compiled tree walk gives LightGBM's own probabilities, bit for bit."""

from __future__ import annotations

import pickle

import lightgbm as lgb
import numpy as np
import pytest

from tests.training.test_treeshap import booster, data
from training.models import LightGBMHorizon
from training.treepredict import TreePredictor


def probe_rows(seed: int = 1) -> np.ndarray:
    x, _ = data(2000, seed=seed)
    x[:5] = np.nan  # every feature missing
    x[5:10] = 0.0
    x[10:20, :4] = 1e-36  # below LightGBM's zero threshold: read as 0.0
    x[20:30, :4] = -1e-36
    return x.astype(np.float32)  # as the service passes its features


@pytest.mark.parametrize("params", [
    {},                                    # missing type NaN
    {"zero_as_missing": True},             # missing type Zero
    {"use_missing": False},                # missing type None
    {"num_leaves": 127, "max_depth": 14, "min_data_in_leaf": 2},
    {"num_leaves": 2},
    {"objective": "binary", "sigmoid": 0.7},  # another sigmoid scale
])
def test_walk_equals_booster_predict_bit_for_bit(params):
    x, y = data()
    b = booster(x, y, **params)
    walk = TreePredictor.from_booster(b)
    assert walk is not None
    probe = probe_rows()
    want = b.predict(probe, num_threads=1)
    got = walk.predict(probe)
    assert got.dtype == want.dtype == np.float64
    assert np.array_equal(got, want), np.abs(got - want).max()
    assert np.array_equal(walk.raw(probe), b.predict(probe, raw_score=True, num_threads=1))


def test_float64_values_at_the_zero_threshold():
    """LightGBM's zero threshold is the float 1e-35f (1.00000002e-35 as a double)."""
    x, y = data()
    x[:, 3] = np.where(x[:, 3] == 0, 0.0, x[:, 3])
    for params in ({}, {"zero_as_missing": True}):
        b = booster(x, y, **params)
        walk = TreePredictor.from_booster(b)
        probe = probe_rows().astype(np.float64)
        probe[30:60] = 1.000000005e-35  # above 1e-35, below 1e-35f: zero to LightGBM
        probe[60:90] = -1.000000005e-35
        assert np.array_equal(walk.predict(probe), b.predict(probe, num_threads=1))


def test_categorical_and_other_objectives_are_left_to_lightgbm():
    x, y = data()
    x[:, 1] = np.abs(x[:, 1])  # non-negative integers: a categorical feature
    cat = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1},
                    lgb.Dataset(x, y, categorical_feature=[1]), num_boost_round=10)
    assert any(n.get("decision_type") == "==" for n in _nodes(cat))
    assert TreePredictor.from_booster(cat) is None
    multi = lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1,
                       "num_threads": 1}, lgb.Dataset(x, (y + (x[:, 0] > 0)).astype(float)),
                      num_boost_round=5)
    assert TreePredictor.from_booster(multi) is None
    pois = lgb.train({"objective": "poisson", "verbose": -1, "num_threads": 1},
                     lgb.Dataset(x, y.astype(float)), num_boost_round=5)
    assert TreePredictor.from_booster(pois) is None  # exp output: left to LightGBM
    for objective in ({"objective": "regression", "reg_sqrt": True},
                      {"objective": "quantile", "alpha": 0.5, "reg_sqrt": True}):
        rooted = lgb.train({"verbose": -1, "num_threads": 1, **objective},
                           lgb.Dataset(x, y.astype(float) + 1), num_boost_round=5)
        assert TreePredictor.from_booster(rooted) is None  # its output is squared
    x2 = np.nan_to_num(x)
    linear = lgb.train({"objective": "binary", "linear_tree": True, "verbose": -1,
                        "num_threads": 1}, lgb.Dataset(x2, y), num_boost_round=5)
    assert TreePredictor.from_booster(linear) is None
    forest = lgb.train({"objective": "binary", "boosting": "rf", "bagging_fraction": 0.5,
                        "bagging_freq": 1, "verbose": -1, "num_threads": 1},
                       lgb.Dataset(x, y), num_boost_round=5)
    assert TreePredictor.from_booster(forest) is None


@pytest.mark.parametrize("objective", [{"objective": "quantile", "alpha": 0.1},
                                       {"objective": "quantile", "alpha": 0.9},
                                       {"objective": "regression"}])
def test_regression_and_quantile_values_bit_for_bit(objective):
    """Trajectory models (``training.trajectory``) are quantile boosters: identity output."""
    x, y = data()
    target = x[:, 0] * 3 + np.nan_to_num(x[:, 2]) + y
    b = lgb.train({"verbose": -1, "num_threads": 1, **objective},
                  lgb.Dataset(x, target), num_boost_round=30)
    walk = TreePredictor.from_booster(b)
    assert walk is not None and walk.sigmoid is None
    probe = probe_rows()
    assert np.array_equal(walk.predict(probe), b.predict(probe, num_threads=1))


def test_wrong_width_is_refused():
    x, y = data()
    walk = TreePredictor.from_booster(booster(x, y))
    with pytest.raises(ValueError, match="expected 8 features"):
        walk.predict(np.zeros((1, 7), dtype=np.float32))


def test_the_family_scores_with_the_walk_and_pickles_without_it():
    x, y = data()
    m = LightGBMHorizon({"num_leaves": 15, "learning_rate": 0.1}).fit(
        x[:2000], y[:2000], np.ones(2000), x[2000:], y[2000:], np.ones(1000))
    probe = probe_rows()
    assert m.predictor() is not None
    assert np.array_equal(m.score(probe), m.booster_.predict(probe, num_threads=1))
    again = pickle.loads(pickle.dumps(m))
    assert "_walk" not in again.__dict__
    assert np.array_equal(again.score(probe), m.score(probe))


def _nodes(b: lgb.Booster):
    stack = [t["tree_structure"] for t in b.dump_model()["tree_info"]]
    while stack:
        n = stack.pop()
        if "split_index" in n:
            yield n
            stack += [n["left_child"], n["right_child"]]
