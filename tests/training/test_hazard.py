"""The discrete-time competing-risks family: person-period rows by the stated rules, and
cumulative incidence that recovers a known process; in training, a candidate like the
others."""

from __future__ import annotations

import numpy as np
import pytest

from training.hazard import HazardHorizon, HazardModel, period_edges, person_period


def test_periods_split_each_horizon_stretch_into_bins_of_at_most_90_days():
    assert period_edges([365, 730]).tolist() == [0, 73, 146, 219, 292, 365, 438, 511, 584,
                                                 657, 730]
    e = period_edges([30, 400])
    assert e[1] == 30 and np.all(np.diff(e) <= 90) and e[-1] == 400


def test_person_period_rows_follow_the_stated_rules():
    edges = np.array([0.0, 73, 146, 219])
    x = np.arange(5, dtype=np.float32)[:, None]
    t = np.array([100.0, 100.0, 50.0, np.inf, 146.0])
    e = np.array([1, 0, 2, 0, 1])  # outcome, censored, competing, followed beyond, outcome
    xp, cls, w = person_period(x, t, e, edges)
    rows = [(int(a), float(p), int(c), float(wt)) for (a, p), c, wt in zip(xp, cls, w,
                                                                           strict=True)]
    assert rows == [
        (0, 0.0, 0, 1.0), (0, 73.0, 1, 1.0),  # survives (0, 73], the outcome in (73, 146]
        (1, 0.0, 0, 1.0), (1, 73.0, 0, 0.5),  # censored inside (73, 146]: half at risk
        (2, 0.0, 2, 1.0),  # the competing event ends follow-up
        (3, 0.0, 0, 1.0), (3, 73.0, 0, 1.0), (3, 146.0, 0, 1.0),
        (4, 0.0, 0, 1.0), (4, 73.0, 1, 1.0)]  # on the boundary: in the period it closes


def test_cumulative_incidence_recovers_a_known_competing_risks_process():
    """Constant cause-specific hazards λ₁ (outcome) and λ₂ (competing), independent
    censoring: CIF(h) = λ₁/(λ₁+λ₂)·(1 − e^−(λ₁+λ₂)h); a feature that doubles λ₁ is found."""
    rng = np.random.default_rng(0)
    n = 30_000
    x = rng.integers(0, 2, n).astype(np.float32)[:, None]
    l1 = np.where(x[:, 0] == 1, 2 * 0.4, 0.4) / 365
    l2 = 0.3 / 365
    t_event = rng.exponential(1 / (l1 + l2))
    cause = np.where(rng.random(n) < l1 / (l1 + l2), 1, 2)
    censor = rng.uniform(100, 1500, n)
    t = np.minimum(t_event, censor)
    e = np.where(t_event <= censor, cause, 0)
    half = n // 2
    m = HazardModel({"num_leaves": 4, "learning_rate": 0.1, "min_data_in_leaf": 200},
                    [365, 730]).fit(x[:half], t[:half], e[:half], x[half:], t[half:], e[half:])
    got = m.cif(np.array([[0.0], [1.0]], dtype=np.float32))
    for row, lam1 in ((0, 0.4), (1, 0.8)):
        for j, h in enumerate((365, 730)):
            total = (lam1 + 0.3) / 365
            want = lam1 / 365 / total * (1 - np.exp(-total * h))
            assert got[row, j] == pytest.approx(want, abs=0.02), (row, h)
    assert (np.diff(got, axis=1) >= 0).all()
    view = HazardHorizon(m, 1)
    assert view.score(np.array([[1.0]], np.float32))[0] == pytest.approx(got[1, 1])
    c = view.contributions(np.array([[0.0], [1.0]], np.float32))
    assert c.shape == (2, 1) and c[1, 0] > c[0, 0]  # the feature raises the outcome's hazard


def test_the_hazard_family_is_a_candidate_like_the_others(trained):
    """Searched, calibrated, evaluated and packaged like the per-horizon families; one
    shared model behind both horizons, and the same risks after a pickle round trip."""
    from training.bundle import ModelBundle

    cand = trained.candidates["hazard"]
    assert cand.tuning_score > 0.5
    risk = cand.heldout_risk
    assert risk.shape[1] == 2 and (np.diff(risk, axis=1) >= 0).all()
    assert cand.report["horizons"]["730"]["rows"]["auroc"]["estimate"] > 0.6
    bundle = cand.bundle
    assert bundle.models[0].model is bundle.models[1].model
    x = np.random.default_rng(1).normal(50, 20, (7, len(bundle.spec.feature_names)))
    x = x.astype(np.float32)
    back = ModelBundle.loads(bundle.dumps())
    np.testing.assert_array_equal(back.predict_features(x), bundle.predict_features(x))
    assert len(bundle.contributions(x[:1])[0]) > 0
