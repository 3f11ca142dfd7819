"""Task files: validated, with errors that name the key and what was expected."""

from __future__ import annotations

import pytest

from features.errors import TaskError
from features.task import load_task, parse_task
from tests.conftest import ESKD_TASK, PBC_TASK

MIN = {"name": "t", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [730, 365]}


def test_example_tasks_load():
    eskd, pbc = load_task(ESKD_TASK), load_task(PBC_TASK)
    assert eskd.horizons_days == [365, 730] and eskd.competing.codes == ["MEDS_DEATH"]
    assert pbc.competing.is_empty() and pbc.primary_horizon == 730


def test_defaults_death_competes_and_horizons_sorted():
    t = parse_task(MIN)
    assert t.competing.codes == ["MEDS_DEATH"] and t.horizons_days == [365, 730]
    assert t.features.window_days() == [30, 365, float("inf")]


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"colour": "red"}, "colour: unknown key"),
        ({"outcome": {"codes": ["A"], "extra": 1}}, "outcome.extra: unknown key"),
        ({"horizons_days": [0]}, "horizons_days.0"),
        ({"horizons_days": [365, 365]}, "horizons repeat"),
        ({"features": {"windows": ["30 days"]}}, "window '30 days'"),
        ({"split": {"train": 0.5, "tuning": 0.1, "held_out": 0.1}}, "must be 1"),
        ({"outcome": {"predicates": ["LAB//EGFR lower 15"]}}, "not of the form"),
        ({"outcome": {"codes": ["MEDS_DEATH"]}}, "overlap on ['MEDS_DEATH']"),
        ({"promotion": {"horizon_days": 100}}, "not one of"),
        ({"name": "Bad Name"}, "name"),
        ({"outcome": {}}, "at least one code"),
    ],
)
def test_bad_tasks_are_rejected_with_the_key_named(patch, needle):
    with pytest.raises(TaskError) as info:
        parse_task({**MIN, **patch}, source="my.yaml")
    assert needle in str(info.value) and "my.yaml" in str(info.value)


def test_combined_outcome_without_competing_is_fine():
    t = parse_task({**MIN, "outcome": {"codes": ["MEDS_DEATH", "PROC//TX"]}, "competing": {}})
    assert t.competing.is_empty()


def test_overlap_through_glob_pattern_is_caught():
    with pytest.raises(TaskError, match="overlap"):
        parse_task({**MIN, "outcome": {"codes": ["DX//*"]}, "competing": {"codes": ["DX//X"]}})


def test_digest_changes_with_content():
    a, b = parse_task(MIN), parse_task({**MIN, "horizons_days": [365]})
    assert a.digest() == parse_task(MIN).digest() != b.digest()


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(TaskError, match="no such task file"):
        load_task(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(TaskError, match="not valid YAML"):
        load_task(tmp_path / "bad.yaml")
