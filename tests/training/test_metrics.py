"""Metric functions against scikit-learn and hand-computed, brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from features.labels import CENSORED, COMPETING, OUTCOME
from training import metrics as M
from training.calibration import PlattCalibrator, monotone
from training.censoring import CensoringSurvival, ipcw_weights


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    n = 500
    score = rng.random(n)
    y = (rng.random(n) < score).astype(float)
    w = rng.integers(1, 4, n).astype(float)
    return score, y, w


def test_auroc_and_auprc_match_sklearn(data):
    score, y, w = data
    assert M.auroc(score, y, w)[0] == pytest.approx(roc_auc_score(y, score, sample_weight=w))
    assert M.auprc(score, y, w)[0] == pytest.approx(
        average_precision_score(y, score, sample_weight=w))


def test_auroc_ties_count_half():
    score = np.array([0.5, 0.5, 0.2, 0.8])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    assert M.auroc(score, y, np.ones(4))[0] == pytest.approx(roc_auc_score(y, score))


def test_brier_without_censoring_matches_sklearn(data):
    score, y, _ = data
    ones = np.ones_like(y)
    assert M.brier(score, y, ones, ones)[0] == pytest.approx(brier_score_loss(y, score))


def test_many_columns_equal_one_at_a_time(data):
    score, y, _ = data
    rng = np.random.default_rng(2)
    w = rng.integers(0, 3, (score.size, 5)).astype(float)
    together = M.auroc(score, y, w)
    alone = [M.auroc(score, y, w[:, k])[0] for k in range(5)]
    np.testing.assert_allclose(together, alone)


def test_calibration_on_known_probabilities():
    """Outcomes drawn from known risks: the truth has slope 1 and CITL 0; a distorted
    risk (logit × 2) has slope 1/2, and Platt scaling recovers the truth."""
    rng = np.random.default_rng(3)
    p = rng.uniform(0.02, 0.6, 200_000)
    y = (rng.random(p.size) < p).astype(float)
    w = np.ones_like(p)
    a, b = M.recalibration(p, y, w)
    assert b[0] == pytest.approx(1.0, abs=0.03) and a[0] == pytest.approx(0.0, abs=0.03)
    assert M.calibration_in_the_large(p, y, w)[0] == pytest.approx(0.0, abs=0.02)
    z = np.log(p / (1 - p))
    distorted = 1 / (1 + np.exp(-2 * z))
    assert M.recalibration(distorted, y, w)[1][0] == pytest.approx(0.5, abs=0.02)
    fixed = PlattCalibrator.fit(distorted, y, w)(distorted)
    assert np.abs(fixed - p).max() < 0.02
    edges = M.bin_edges(p)
    assert M.ece(p, y, w, edges)[0] < 0.01
    assert M.ece(distorted, y, w, M.bin_edges(distorted))[0] > 0.05


def test_net_benefit_hand_computed():
    score = np.array([0.9, 0.6, 0.3, 0.1])
    y = np.array([1.0, 0.0, 1.0, 0.0])
    # at 0.5: treat the first two: TP 1, FP 1, n 4 -> 1/4 - 1/4 * 1 = 0
    assert M.net_benefit(score, y, np.ones(4), 0.5)[0] == pytest.approx(0.0)
    # at 0.2: treat three: TP 2, FP 1 -> 2/4 - 1/4 * 0.25
    assert M.net_benefit(score, y, np.ones(4), 0.2)[0] == pytest.approx(0.5 - 0.0625)


def test_kaplan_meier_censoring_by_hand():
    # times 1..5; censored at 2 and 4; events at 1, 3, 5
    t = np.array([1, 2, 3, 4, 5.0])
    e = np.array([OUTCOME, CENSORED, OUTCOME, CENSORED, COMPETING])
    g = CensoringSurvival.fit(t, e)
    # at 2: 4 at risk, one censored -> 3/4; at 4: 2 at risk -> 3/4 * 1/2
    np.testing.assert_allclose(g(np.array([1.5, 2, 3.9, 4, 10])), [1, 0.75, 0.75, 0.375, 0.375])
    assert g(np.array([2.0]), left=True)[0] == 1.0


def test_ipcw_weights_zero_for_censored_and_competing_is_observed():
    t = np.array([100, 50, 400, 30.0])
    label = np.array([1.0, 0.0, 0.0, np.nan])  # outcome, competing, event-free, censored
    e = np.array([OUTCOME, COMPETING, CENSORED, CENSORED])
    g = CensoringSurvival.fit(t, e)
    w = ipcw_weights(t, label, 365, g)
    assert w[3] == 0 and (w[:3] > 0).all()
    assert w[1] == pytest.approx(1 / g(np.array([50.0]), left=True)[0])


def test_nothing_censored_means_g_is_one_and_every_observed_row_weighs_one():
    """Labels from a MEDS label file: no censored rows, and no event times (NaN)."""
    for t in (np.array([5, 300, 40.0]), np.full(3, np.nan)):
        g = CensoringSurvival.fit(t, np.array([OUTCOME, COMPETING, -1]))
        assert g.times.size == 0
        probe = np.array([-1, 0, 10, 1e6, np.nan])
        np.testing.assert_array_equal(g(probe), np.ones(5))
        np.testing.assert_array_equal(g(probe, left=True), np.ones(5))
        w = ipcw_weights(t, np.array([1.0, 0.0, 0.0]), 365, g)
        np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    empty = CensoringSurvival.fit(np.empty(0), np.empty(0, dtype=np.int8))
    assert empty(np.array([1.0, 2.0])).tolist() == [1.0, 1.0]


def test_a_row_without_event_time_counts_as_followed_to_the_horizon():
    t = np.array([10, 20, 30, 400.0])
    g = CensoringSurvival.fit(t, np.array([CENSORED, OUTCOME, CENSORED, CENSORED]))
    w = ipcw_weights(np.array([np.nan]), np.array([0.0]), 365, g)
    assert w[0] == pytest.approx(1 / g(np.array([365.0]), left=True)[0])


def test_uno_c_ignores_rows_without_event_time():
    score = np.array([0.9, 0.1, 0.5])
    e = np.array([OUTCOME, -1, OUTCOME])
    assert np.isnan(M.uno_c(score, np.full(3, np.nan), e, 365, np.ones(3), np.ones(3))[0])
    t = np.array([10.0, 50.0, np.nan])
    assert M.uno_c(score, t, e, 365, np.ones(3), np.ones(3))[0] == pytest.approx(
        M.uno_c(score[:2], t[:2], e[:2], 365, np.ones(2), np.ones(2))[0])


def brute_uno(score, t, e, horizon, g_left, m):
    num = den = 0.0
    for i in range(t.size):
        if not (e[i] == OUTCOME and t[i] <= horizon):
            continue
        for j in range(t.size):
            if j == i:
                continue
            if t[j] > t[i] or (e[j] == COMPETING and t[j] <= t[i]):
                wij = m[i] / g_left[i] ** 2 * m[j]
                den += wij
                num += wij * (1.0 if score[i] > score[j] else 0.5 if score[i] == score[j] else 0)
    return num / den if den else np.nan


@given(st.lists(st.tuples(st.integers(1, 30), st.sampled_from([OUTCOME, COMPETING, CENSORED]),
                          st.integers(0, 5), st.integers(1, 3)), min_size=2, max_size=40))
def test_uno_c_matches_brute_force(rows):
    t = np.array([r[0] for r in rows], float)
    e = np.array([r[1] for r in rows])
    score = np.array([r[2] for r in rows], float) / 5
    m = np.array([r[3] for r in rows], float)
    g_left = np.linspace(1.0, 0.5, t.size)
    got = M.uno_c(score, t, e, 20, g_left, m)[0]
    want = brute_uno(score, t, e, 20, g_left, m)
    if np.isnan(want):
        assert np.isnan(got)
    else:
        assert got == pytest.approx(want)


def test_uno_c_without_censoring_is_harrell_like():
    rng = np.random.default_rng(4)
    t = rng.integers(1, 100, 300).astype(float)
    e = np.full(300, OUTCOME)
    score = -t + rng.normal(0, 1e-9, 300)  # earlier events, higher risk: perfect
    assert M.uno_c(score, t, e, 1000, np.ones(300), np.ones(300))[0] == pytest.approx(1.0)


def test_monotone_across_horizons():
    r = np.array([[0.3, 0.2, 0.5], [0.1, 0.2, 0.15]])
    np.testing.assert_array_equal(monotone(r), [[0.3, 0.3, 0.5], [0.1, 0.2, 0.2]])
