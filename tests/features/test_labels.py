"""Labels follow DESIGN.md: outcome in (t, t+H] positive; competing first or observed
event-free through t+H negative; otherwise censored — never silently negative."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.events import EventArrays
from features.labels import CENSORED, COMPETING, OUTCOME, derive_labels
from features.task import parse_task
from tests.conftest import make_events

H = 365


def task(**over):
    base = {"name": "t", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [H]}
    base.update(over)
    return parse_task(base)


def labels_for(rows, **over) -> pd.DataFrame:
    return derive_labels(EventArrays.from_events(make_events(rows)), task(**over))


def at(day: float) -> str:
    return str(pd.Timestamp("2015-01-01") + pd.Timedelta(days=day))


def row_at(labels: pd.DataFrame, day: float) -> pd.Series:
    hit = labels[labels["prediction_time"] == pd.Timestamp(at(day))]
    assert len(hit) == 1, f"no prediction row at day {day}"
    return hit.iloc[0]


def test_outcome_exactly_at_t_makes_the_row_ineligible_not_positive():
    labels = labels_for([(1, at(0), "LAB//EGFR", 30.0), (1, at(100), "LAB//EGFR", 20.0),
                         (1, at(100), "DX//ESKD", None)])
    assert list(labels["prediction_time"]) == [pd.Timestamp(at(0))]
    assert (labels["prediction_time"] < pd.Timestamp(at(100))).all()


def test_outcome_at_t_plus_h_is_positive_and_just_after_is_not():
    on_edge = labels_for([(1, at(0), "LAB//EGFR", 30.0), (1, at(H), "DX//ESKD", None)])
    assert row_at(on_edge, 0)["label_365d"] == 1.0
    after = labels_for([(1, at(0), "LAB//EGFR", 30.0),
                        (1, at(H) .replace("00:00:00", "00:00:01"), "DX//ESKD", None)])
    r = row_at(after, 0)
    # observed (the outcome event itself) past t+H and event-free until then: negative
    assert r["label_365d"] == 0.0
    assert not r["censored_365d"]


def test_lost_to_follow_up_before_horizon_is_censored_with_its_time():
    labels = labels_for([(1, at(0), "LAB//EGFR", 30.0), (1, at(200), "LAB//EGFR", 28.0)])
    r = row_at(labels, 0)
    assert np.isnan(r["label_365d"]) and r["censored_365d"]
    assert r["event_type"] == CENSORED
    assert r["event_time_days"] == pytest.approx(200.0)


def test_observed_event_free_through_horizon_is_negative():
    labels = labels_for([(1, at(0), "LAB//EGFR", 30.0), (1, at(H), "LAB//EGFR", 28.0)])
    r = row_at(labels, 0)
    assert r["label_365d"] == 0.0 and not r["censored_365d"]


def test_competing_event_first_is_negative_not_censored():
    labels = labels_for([(1, at(0), "LAB//EGFR", 30.0), (1, at(50), "MEDS_DEATH", None),
                         ])
    r = row_at(labels, 0)
    assert r["label_365d"] == 0.0 and not r["censored_365d"]
    assert r["event_type"] == COMPETING


def test_outcome_tied_with_competing_event_counts_as_outcome():
    labels = labels_for([(1, at(0), "LAB//EGFR", 30.0), (1, at(50), "MEDS_DEATH", None),
                         (1, at(50), "DX//ESKD", None)])
    r = row_at(labels, 0)
    assert r["label_365d"] == 1.0 and r["event_type"] == OUTCOME


def test_dead_subjects_get_no_prediction_even_when_death_does_not_compete():
    labels = labels_for([(1, at(0), "LAB//EGFR", 30.0), (1, at(10), "MEDS_DEATH", None),
                         (1, at(20), "LAB//EGFR", 30.0)], competing={})
    assert list(labels["prediction_time"]) == [pd.Timestamp(at(0))]
    # death is not competing here, so it ends follow-up: censored, not negative
    assert row_at(labels, 0)["censored_365d"]


def test_predicate_outcome():
    labels = labels_for([(1, at(0), "LAB//EGFR", 30.0), (1, at(90), "LAB//EGFR", 14.0),
                         (1, at(400), "LAB//EGFR", 12.0)],
                        outcome={"predicates": ["LAB//EGFR below 15"]})
    assert list(labels["prediction_time"]) == [pd.Timestamp(at(0))]
    assert row_at(labels, 0)["label_365d"] == 1.0


def test_min_gap_keeps_at_most_one_prediction_per_gap():
    rows = [(1, at(d), "LAB//EGFR", 30.0) for d in (0, 30, 100, 179, 180, 200, 400, 1000)]
    labels = labels_for(rows, prediction_times={"min_gap_days": 180})
    days = [(t - pd.Timestamp(at(0))).days for t in labels["prediction_time"]]
    assert days == [0, 180, 400, 1000]


def test_eligibility_min_history_and_min_visits_and_admin_events_are_not_visits():
    rows = [(1, at(d), "LAB//EGFR", 30.0) for d in (0, 10, 40, 100)]
    rows.append((1, at(500), "ADMIN//END_OF_FOLLOWUP", None))
    labels = labels_for(rows, eligibility={"min_history_days": 30, "min_visits": 2})
    days = [(t - pd.Timestamp(at(0))).days for t in labels["prediction_time"]]
    assert days == [40, 100]
    # the administrative event still extends follow-up: day 100 is observed to day 465
    assert row_at(labels, 100)["label_365d"] == 0.0


def test_labels_on_the_cohort_are_consistent(small_cohort, eskd_task):
    labels = derive_labels(EventArrays.from_events(small_cohort), eskd_task)
    assert len(labels) > 1000
    for h in eskd_task.horizons_days:
        lab, cens = labels[f"label_{h}d"], labels[f"censored_{h}d"]
        assert (lab.isna() == cens).all()
        # positives are exactly outcome rows whose event falls within the horizon
        pos = (labels["event_type"] == OUTCOME) & (labels["event_time_days"] <= h)
        assert ((lab == 1) == pos).all()
        # censored rows are censored before the horizon
        assert (labels.loc[cens, "event_time_days"] < h).all()
    # a longer horizon never turns a positive negative
    assert not ((labels["label_365d"] == 1) & (labels["label_730d"] == 0)).any()
