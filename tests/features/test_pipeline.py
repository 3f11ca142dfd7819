"""Training sets end to end: MEDS directory + task → labelled point-in-time rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.events import open_meds, write_meds
from features.pipeline import TrainingSetBuilder, build_training_frame, write_training_set
from features.splits import assign_splits
from features.task import load_task, parse_task
from tests.conftest import PBC_MEDS, PBC_TASK, aces_labels, by_remainder_split, write_aces_labels


def test_written_training_set_matches_in_memory_build(small_cohort_dir, eskd_task, tmp_path):
    out = tmp_path / "train.parquet"
    summary = write_training_set(open_meds(small_cohort_dir), eskd_task, out,
                                 chunk_subjects=70)
    frame, spec = build_training_frame(open_meds(small_cohort_dir), eskd_task)
    written = pd.read_parquet(out)
    assert summary.rows == len(written) == len(frame)
    assert list(written.columns[:3]) == ["subject_id", "prediction_time", "split"]
    assert spec.feature_names == summary.spec.feature_names
    np.testing.assert_array_equal(written[spec.feature_names].to_numpy(),
                                  frame[spec.feature_names].to_numpy())
    assert written[spec.feature_names].dtypes.eq(np.float32).all()
    # each subject sits in exactly one split
    assert written.groupby("subject_id")["split"].nunique().max() == 1
    assert summary.events == sum(pq.ParquetFile(f).metadata.num_rows
                                 for f in open_meds(small_cohort_dir).files)


def test_failed_build_leaves_nothing(tmp_path, eskd_task, small_cohort):
    d = write_meds(small_cohort.head(50), tmp_path / "tiny")
    never = parse_task({"name": "x", "outcome": {"codes": ["DX//ESKD"]}, "horizons_days": [1],
                        "eligibility": {"min_visits": 1000}})
    with pytest.raises(ValueError, match="no eligible prediction times"):
        write_training_set(open_meds(d), never, tmp_path / "out.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_pbc_training_set():
    frame, spec = build_training_frame(open_meds(PBC_MEDS), load_task(PBC_TASK))
    assert frame["subject_id"].nunique() > 300 * 0.9
    assert "LAB//BILIRUBIN__all__last" in spec.feature_names
    assert spec.unit_of("LAB//BILIRUBIN") == "mg/dl"
    # death or transplant is the outcome: positives exist at both horizons, and with no
    # competing event a negative means observed event-free through the horizon
    assert (frame["label_365d"] == 1).sum() > 100
    neg = frame["label_730d"] == 0
    assert (frame.loc[neg, "event_time_days"] >= 730).all()


def test_label_file_replaces_derived_labels(tmp_path, small_cohort_dir):
    ids = [1, 2, 3]
    times = pd.to_datetime(["2016-01-01", "2016-06-01", "2017-01-01"]).astype("datetime64[us]")
    pq.write_table(pa.table({"subject_id": pa.array(ids, pa.int64()),
                             "prediction_time": pa.array(times),
                             "boolean_value": [True, False, True]}), tmp_path / "labels.parquet")
    (tmp_path / "task.yaml").write_text(
        "name: aces\noutcome: {codes: [DX//ESKD]}\nhorizons_days: [365]\n"
        "features: {min_code_subjects: 5}\nlabels: {path: labels.parquet}\n")
    frame, _ = build_training_frame(open_meds(small_cohort_dir), load_task(tmp_path / "task.yaml"))
    assert frame["subject_id"].tolist() == ids
    assert frame["label_365d"].tolist() == [1.0, 0.0, 1.0]
    assert list(frame["prediction_time"]) == list(times)


def test_an_aces_label_directory_gives_rows_labels_and_split(tmp_path, small_cohort,
                                                             eskd_task):
    """Labels from an ACES directory are used as given, nothing censored, and the
    directory's split wins over the dataset's own and over the hash."""
    given = aces_labels(small_cohort, eskd_task, 365)
    write_aces_labels(given, tmp_path / "labels")
    ids = np.unique(small_cohort["subject_id"])
    claims_train = pd.DataFrame({"subject_id": ids, "split": "train"})  # the data's split
    data = write_meds(small_cohort, tmp_path / "meds", subject_splits=claims_train)
    task = eskd_task.model_dump(mode="json")
    task.update(horizons_days=[365], labels={"path": str(tmp_path / "labels")},
                promotion={"primary_metric": "auroc"})
    task["alerts"]["thresholds"] = [t for t in task["alerts"]["thresholds"]
                                    if t["horizon_days"] == 365]  # its one horizon's
    builder = TrainingSetBuilder(open_meds(data), parse_task(task))
    spec = builder.fit_spec()
    frame = pd.concat(list(builder.chunks(spec)), ignore_index=True)
    key = ["subject_id", "prediction_time"]
    want = given.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(frame[key], want[key], check_dtype=False)
    assert (frame["label_365d"].to_numpy() == want["boolean_value"].to_numpy()).all()
    assert not frame["censored_365d"].any() and frame["label_365d"].notna().all()
    assert frame["split"].astype(str).tolist() == want["split"].tolist()
    assert (by_remainder_split(ids) != assign_splits(ids, parse_task(task).split)).any()
    # the FeatureSpec counts the directory's training subjects (and, for subjects the
    # directory lacks, the dataset's split): never its tuning or held-out ones
    split_of = dict(zip(given["subject_id"], given["split"], strict=True))
    train_ids = {i for i in ids if split_of.get(i, "train") == "train"}
    female = set(small_cohort.loc[small_cohort["code"] == "GENDER//F", "subject_id"])
    counted = {c.code: c.train_subjects for c in spec.codes}["GENDER//F"]
    assert counted == len(female & train_ids) < len(female)


def test_temporal_split(small_cohort_dir, eskd_task):
    data = eskd_task.model_dump(mode="json")
    data["split"]["temporal"] = {"cutoff": "2019-01-01"}
    task = parse_task(data)
    frame, _ = build_training_frame(open_meds(small_cohort_dir), task)
    cut = pd.Timestamp("2019-01-01")
    held = frame["split"] == "held_out"
    assert (frame.loc[held, "prediction_time"] >= cut).all()
    assert (frame.loc[~held, "prediction_time"] + pd.Timedelta(days=730) <= cut).all()
    # a trajectory target of a train or tuning row is known before the cutoff too
    before = frame[~held]
    col = "target_LAB//EGFR_730d"  # (at 365 days every such row is known by the cutoff)
    late = before["prediction_time"] + pd.Timedelta(days=730 + 90) > cut
    assert late.any() and before.loc[late, col].isna().all()
    assert before.loc[~late, col].notna().any()
