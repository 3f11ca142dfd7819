"""MEDS label files and ACES label directories: labels used as given, nothing censored,
the directory's split kept, and bad files named with the column to blame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.errors import DataValidationError, TaskError
from features.label_files import NO_OUTCOME, read_label_file, read_labels
from features.labels import OUTCOME
from features.task import load_task, parse_task
from tests.conftest import write_aces_labels

TASK = {"name": "aces", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [365],
        "labels": {"path": "labels"}}


def table(ids=(1, 2), times=("2016-01-01", "2016-06-01"), values=(True, False), **cols):
    t = pd.to_datetime(list(times)).astype("datetime64[us]")
    data = {"subject_id": pa.array(list(ids), pa.int64()), "prediction_time": pa.array(t),
            "boolean_value": pa.array(list(values), pa.bool_())}
    data.update(cols)
    return pa.table(data)


def rows(ids, split, values=None):
    n = len(ids)
    return pd.DataFrame({"subject_id": ids,
                         "prediction_time": pd.to_datetime(["2016-01-01"] * n),
                         "boolean_value": [True] * n if values is None else values,
                         "split": split})


def test_a_file_gives_observed_rows_weighted_one_never_censored(tmp_path):
    pq.write_table(table(ids=(2, 1), values=(False, True)), tmp_path / "l.parquet")
    got = read_label_file(tmp_path / "l.parquet", parse_task(TASK))
    assert got["subject_id"].tolist() == [1, 2]  # sorted by subject and time
    assert got["label_365d"].tolist() == [1.0, 0.0]
    assert not got["censored_365d"].any() and got["event_time_days"].isna().all()
    assert got["event_type"].tolist() == [OUTCOME, NO_OUTCOME]


def test_an_aces_directory_carries_its_split(tmp_path):
    frame = pd.concat([rows([1, 2, 3], "train"), rows([4], "tuning"),
                       rows([5, 6], "held_out", [True, False])])
    write_aces_labels(frame, tmp_path / "labels")
    got = read_labels(tmp_path / "labels", parse_task(TASK))
    assert got.rows["subject_id"].tolist() == [1, 2, 3, 4, 5, 6]
    assert got.rows["label_365d"].tolist() == [1, 1, 1, 1, 1, 0]
    assert got.splits.sort_index().to_dict() == {1: "train", 2: "train", 3: "train",
                                                 4: "tuning", 5: "held_out", 6: "held_out"}
    assert {p.parent.name for p in (tmp_path / "labels").rglob("*.parquet")} == {
        "train", "tuning", "held_out"}


def test_a_flat_directory_has_no_split_of_its_own(tmp_path):
    (tmp_path / "labels").mkdir()
    pq.write_table(table(ids=(1,), times=("2016-01-01",), values=(True,)),
                   tmp_path / "labels" / "0.parquet")
    pq.write_table(table(ids=(2,), times=("2016-01-01",), values=(False,)),
                   tmp_path / "labels" / "1.parquet")
    got = read_labels(tmp_path / "labels", parse_task(TASK))
    assert got.splits is None and got.rows["subject_id"].tolist() == [1, 2]


def test_times_with_a_zone_become_naive_utc_and_repeats_are_kept_once(tmp_path):
    t = pa.array(pd.to_datetime(["2016-01-01 01:00+01:00"] * 2), pa.timestamp("us", "UTC"))
    pq.write_table(pa.table({"subject_id": pa.array([7, 7], pa.int64()), "prediction_time": t,
                             "boolean_value": [True, True]}), tmp_path / "l.parquet")
    got = read_label_file(tmp_path / "l.parquet", parse_task(TASK))
    assert got["prediction_time"].tolist() == [pd.Timestamp("2016-01-01 00:00")]


@pytest.mark.parametrize(("write", "needle"), [
    (lambda p: pq.write_table(table().drop_columns(["boolean_value"]), p),
     "missing column(s) ['boolean_value']"),
    (lambda p: pq.write_table(table().set_column(2, "boolean_value", pa.array([1, 0])), p),
     "column 'boolean_value': has type int64, expected a boolean label"),
    (lambda p: pq.write_table(table().set_column(0, "subject_id", pa.array(["a", "b"])), p),
     "column 'subject_id': has type string"),
    (lambda p: pq.write_table(table().set_column(1, "prediction_time",
                                                 pa.array(["2016", "2017"])), p),
     "column 'prediction_time': has type string, expected a timestamp"),
    (lambda p: pq.write_table(table().set_column(2, "boolean_value",
                                                 pa.array([True, None])), p),
     "row 1, subject 2, column 'boolean_value': null boolean value"),
    (lambda p: pq.write_table(table().set_column(
        1, "prediction_time", pa.array([None, None], pa.timestamp("us"))), p),
     "row 0, subject 1, column 'prediction_time': null prediction time (1 more rows"),
    (lambda p: pq.write_table(table(ids=(3, 3), times=("2016-01-01",) * 2,
                                    values=(True, False)), p),
     "subject 3, column 'boolean_value': has both a true and a false label"),
    (lambda p: p.write_text("not parquet"), "cannot be read as parquet"),
])
def test_a_bad_label_file_is_named_with_its_column(tmp_path, write, needle):
    path = tmp_path / "bad.parquet"
    write(path)
    with pytest.raises(DataValidationError) as info:
        read_labels(path, parse_task(TASK))
    assert str(path) in str(info.value) and needle in str(info.value)


def test_a_subject_in_two_splits_or_a_stray_shard_is_an_error(tmp_path):
    write_aces_labels(pd.concat([rows([1, 2], "train"), rows([2], "held_out")]),
                      tmp_path / "two", shards=1)
    with pytest.raises(DataValidationError, match=r"subject 2, column 'subject_id': has "
                       r"label rows in more than one split \(held_out, train\)"):
        read_labels(tmp_path / "two", parse_task(TASK))
    write_aces_labels(rows([1], "train"), tmp_path / "stray", shards=1)
    pq.write_table(table(), tmp_path / "stray" / "extra.parquet")
    with pytest.raises(DataValidationError, match=r"extra\.parquet: is outside train/"):
        read_labels(tmp_path / "stray", parse_task(TASK))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match="contains no parquet label files"):
        read_labels(tmp_path / "empty", parse_task(TASK))
    with pytest.raises(DataValidationError, match="no such MEDS label file or directory"):
        read_labels(tmp_path / "nowhere", parse_task(TASK))


def test_a_label_task_keeps_its_outcome_codes_and_finds_the_labels_beside_it(tmp_path):
    (tmp_path / "task.yaml").write_text(
        "name: aces\noutcome: {codes: [DX//ESKD]}\ncompeting: {codes: [MEDS_DEATH]}\n"
        "horizons_days: [365]\nlabels: {path: aces/eskd}\n")
    task = load_task(tmp_path / "task.yaml")
    assert task.outcome.codes == ["DX//ESKD"] and task.competing.codes == ["MEDS_DEATH"]
    assert task.labels.path == tmp_path / "aces" / "eskd"
    assert np.array_equal(task.horizons_days, [365])


@pytest.mark.parametrize(("patch", "needle"), [
    ({"outcome": {}}, "still names its outcome"),
    ({"horizons_days": [365, 730]}, "exactly one horizon"),
    ({"promotion": {"primary_metric": "uno_c"}}, "uno_c needs event times"),
])
def test_a_label_task_that_does_not_validate(patch, needle):
    with pytest.raises(TaskError, match=needle):
        parse_task({**TASK, **patch}, source="my.yaml")
