"""Our TreeSHAP (tables, and per row for deep leaves) gives LightGBM's own pred_contrib
values."""

from __future__ import annotations

import pickle

import lightgbm as lgb
import numpy as np
import pytest

from training.models import LightGBMHorizon
from training.treeshap import TABLE_DEPTH, TreeShap


def data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with NaNs, exact zeros, ties at split points and interactions (so the
    same feature splits again and again along a path)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    x[:, 1] = np.round(x[:, 1] * 2)  # few distinct values: rows sit on thresholds
    x[rng.random(n) < 0.2, 2] = np.nan
    x[rng.random(n) < 0.3, 3] = 0.0
    x[:, 7] = np.where(rng.random(n) < 0.5, np.nan, x[:, 7])
    logit = (x[:, 0] * x[:, 1] + np.sin(3 * x[:, 0]) + np.nan_to_num(x[:, 2]) ** 2
             - (x[:, 3] == 0) + 0.5 * np.nan_to_num(x[:, 7]))
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return x, y


def booster(x, y, **params) -> lgb.Booster:
    base = {"objective": "binary", "verbose": -1, "num_leaves": 31, "min_data_in_leaf": 5,
            "deterministic": True, "num_threads": 1, "seed": 1}
    return lgb.train({**base, **params}, lgb.Dataset(x, y), num_boost_round=40)


@pytest.mark.parametrize("params", [
    {},                                    # missing values as NaN (LightGBM's default)
    {"zero_as_missing": True},             # missing type Zero
    {"use_missing": False},                # missing type None: NaN treated as 0
    {"num_leaves": 127, "max_depth": 14, "min_data_in_leaf": 2},  # deep paths
    {"num_leaves": 2},                     # stumps
])
@pytest.mark.parametrize("table_depth", [TABLE_DEPTH, 3, 0])  # tables, mixed, none
def test_tables_give_lightgbms_own_contributions(params, table_depth):
    x, y = data()
    b = booster(x, y, **params)
    shap = TreeShap.from_booster(b, table_depth=table_depth)
    assert shap is not None
    tabled = shap.leaves["table_start"][:-1] >= 0
    depth = np.diff(shap.leaves["feat_start"])
    assert (tabled == (depth <= table_depth)).all()
    probe, _ = data(500, seed=1)
    probe[:5] = np.nan  # rows with every feature missing
    probe[5:10] = 0.0
    want = b.predict(probe, pred_contrib=True)[:, :-1]
    got = shap.contributions(probe)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # and they add up to the raw score, as Shapley values do
    bias = b.predict(probe, pred_contrib=True)[:, -1]
    np.testing.assert_allclose(got.sum(axis=1) + bias, b.predict(probe, raw_score=True),
                               atol=1e-9)


def test_a_table_budget_moves_leaves_to_per_row_and_categories_fall_back():
    x, y = data()
    b = booster(x, y, num_leaves=63, min_data_in_leaf=2)
    small = TreeShap.from_booster(b, max_bytes=1000)
    assert small is not None and small.leaves["table"].nbytes <= 1000
    assert (small.leaves["table_start"][:-1] < 0).any()
    probe, _ = data(300, seed=2)
    np.testing.assert_allclose(small.contributions(probe),
                               b.predict(probe, pred_contrib=True)[:, :-1], atol=1e-9)
    xc = x.copy()
    xc[:, 4] = np.abs(np.round(xc[:, 4] * 3))
    bc = lgb.train({"objective": "binary", "verbose": -1, "min_data_per_group": 5,
                    "cat_smooth": 1, "num_threads": 1},
                   lgb.Dataset(xc, y, categorical_feature=[4]), num_boost_round=20)
    assert "'=='" in str(bc.dump_model()["tree_info"])  # it did split on the category
    assert TreeShap.from_booster(bc) is None


def test_the_model_uses_the_tables_and_never_pickles_them():
    x, y = data()
    m = LightGBMHorizon({"num_leaves": 15, "min_data_in_leaf": 20, "learning_rate": 0.1})
    m.fit(x[:2000], y[:2000], np.ones(2000), x[2000:], y[2000:], np.ones(1000))
    before = pickle.dumps(m)
    got = m.contributions(x[:100])
    assert m.explainer() is not None
    np.testing.assert_allclose(got, m.booster_.predict(x[:100], pred_contrib=True)[:, :-1],
                               atol=1e-9)
    assert pickle.dumps(m) == before  # the artifact digest does not change
