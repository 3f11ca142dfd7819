"""Reading, validating and writing MEDS events."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.errors import DataValidationError
from features.events import open_meds, read_events, write_meds
from tests.conftest import PBC_MEDS


def table(**cols) -> pa.Table:
    base = {
        "subject_id": pa.array([1, 1, 2], pa.int64()),
        "time": pa.array([np.datetime64("2020-01-01T10:00", "us"), None,
                          np.datetime64("2021-05-01T09:30", "us")], pa.timestamp("us")),
        "code": pa.array(["LAB//EGFR", "GENDER//F", "LAB//EGFR"]),
        "numeric_value": pa.array([45.0, None, 30.0], pa.float32()),
    }
    base.update(cols)
    return pa.table({k: v for k, v in base.items() if v is not None})


def write(tmp_path, t: pa.Table, name="0.parquet"):
    (tmp_path / "data").mkdir(exist_ok=True)
    pq.write_table(t, tmp_path / "data" / name)
    return tmp_path


def error_of(tmp_path, t: pa.Table) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        read_events(write(tmp_path, t))
    return info.value


def test_reads_sorts_and_round_trips(tmp_path):
    t = table().take([2, 0, 1])  # unsorted input is sorted, not rejected
    ev = read_events(write(tmp_path, t))
    assert ev["subject_id"].tolist() == [1, 1, 2]
    assert pd.isna(ev["time"].iloc[0]) and ev["code"].iloc[0] == "GENDER//F"  # static first
    out = write_meds(ev, tmp_path / "copy")
    again = read_events(out)
    pd.testing.assert_frame_equal(ev.assign(code=ev["code"].astype(str)),
                                  again.assign(code=again["code"].astype(str)))


def test_missing_column_is_named(tmp_path):
    err = error_of(tmp_path, table(code=None))
    assert "missing required column" in str(err) and "code" in str(err)
    assert "0.parquet" in str(err)


def test_wrong_type_is_named(tmp_path):
    err = error_of(tmp_path, table(subject_id=pa.array(["a", "b", "c"])))
    assert err.column == "subject_id" and "expected an integer" in str(err)
    err = error_of(tmp_path, table(time=pa.array(["2020", "x", "y"])))
    assert err.column == "time" and "expected a timestamp" in str(err)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_value_names_row_subject_and_column(tmp_path, bad):
    err = error_of(tmp_path, table(numeric_value=pa.array([45.0, None, bad], pa.float64())))
    assert (err.row, err.subject_id, err.column) == (2, 2, "numeric_value")
    assert "non-finite" in str(err)
    assert str(bad) not in str(err).replace("infinity", "")  # the value is not echoed


def test_future_time_is_an_error(tmp_path):
    future = np.datetime64("2999-01-01", "us")
    err = error_of(tmp_path, table(time=pa.array([future, None, future], pa.timestamp("us"))))
    assert (err.row, err.subject_id, err.column, err.count) == (0, 1, "time", 2)
    assert "future" in str(err)


def test_null_subject_and_empty_code_are_errors(tmp_path):
    err = error_of(tmp_path, table(subject_id=pa.array([1, None, 2], pa.int64())))
    assert err.row == 1 and err.column == "subject_id"
    err = error_of(tmp_path, table(code=pa.array(["A//B", "", "A//B"])))
    assert err.row == 1 and err.column == "code"


def test_timezone_aware_times_become_naive_utc(tmp_path):
    t = table(time=pa.array([pd.Timestamp("2020-01-01T12:00+02:00"), None,
                             pd.Timestamp("2020-01-01T12:00+00:00")], pa.timestamp("us", "UTC")))
    ev = read_events(write(tmp_path, t))
    assert ev["time"].iloc[1] == pd.Timestamp("2020-01-01T10:00")


def test_write_is_atomic_and_refuses_to_clobber(tmp_path, small_cohort):
    out = write_meds(small_cohort, tmp_path / "m", shard_subjects=100)
    assert len(list((out / "data").glob("*.parquet"))) == 4
    with pytest.raises(FileExistsError):
        write_meds(small_cohort, out)
    bad = small_cohort.copy()
    bad["subject_id"] = bad["subject_id"].astype(object)
    bad.loc[0, "subject_id"] = "not an id"
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError)):
        write_meds(bad, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dataset_split_directories_are_used(tmp_path, small_cohort):
    ids = small_cohort["subject_id"].unique()
    for split, part in zip(("train", "tuning", "held_out"), np.array_split(ids, 3), strict=True):
        d = tmp_path / "data" / split
        d.mkdir(parents=True)
        from features.events import events_to_table
        pq.write_table(events_to_table(small_cohort[small_cohort["subject_id"].isin(part)]),
                       d / "0.parquet")
    known = open_meds(tmp_path).known_splits()
    assert set(known.loc[np.array_split(ids, 3)[2]]) == {"held_out"}


def test_pbc_ships_with_units():
    ds = open_meds(PBC_MEDS)
    assert ds.units()["LAB//BILIRUBIN"] == "mg/dl"
    ev = ds.read_all()
    assert ev["subject_id"].nunique() == 312
    # 1,945 visits, each with bilirubin
    assert (ev["code"] == "LAB//BILIRUBIN").sum() == 1945


def test_digest_ignores_sharding_but_sees_every_event(tmp_path, small_cohort):
    from features.digest import dataset_digest, events_digest

    a = open_meds(write_meds(small_cohort, tmp_path / "a", shard_subjects=400))
    b = open_meds(write_meds(small_cohort, tmp_path / "b", shard_subjects=37))
    assert dataset_digest(a) == dataset_digest(b) == events_digest(small_cohort)
    changed = small_cohort.copy()
    changed.loc[len(changed) - 1, "numeric_value"] = np.float32(1.5)  # the very last row
    assert events_digest(changed) != events_digest(small_cohort)
