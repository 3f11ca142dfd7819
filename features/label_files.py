"""MEDS label files, as ACES writes them: prediction times and labels taken as given.

A label file has one row per prediction: ``subject_id`` (integer), ``prediction_time``
(timestamp, naive UTC or with a time zone) and ``boolean_value`` (the label at the task's
single horizon); other MEDS label columns (``integer_value`` …) are ignored.  A task's
``labels.path`` names one such file or a directory of them; a directory in the ACES
layout — ``train/``, ``tuning/``, ``held_out/``, one file per shard — also carries the
split, which is then used as is (DESIGN.md: a split that comes with the data wins).

Labels from a file are observed: nothing is censored, every row weighs 1, and since the
file does not say when (or whether) the outcome or a competing event happened, the event
time is unknown (NaN) and a negative's event type is :data:`NO_OUTCOME`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.errors import DataValidationError
from features.events import SPLIT_ALIASES
from features.labels import OUTCOME, censored_column, label_column
from features.task import Task

LABEL_COLUMNS = ("subject_id", "prediction_time", "boolean_value")
NO_OUTCOME = -1  # a label file's negative: observed, without saying what ended follow-up


@dataclass(frozen=True)
class LabelSet:
    """Label rows (sorted by subject and time) and the split the files gave, if any."""

    rows: pd.DataFrame
    splits: pd.Series | None  # subject_id -> train / tuning / held_out


def read_labels(path: str | Path, task: Task) -> LabelSet:
    """Read a task's label file or label directory (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return LabelSet(read_label_file(path, task), None)
    if not path.is_dir():
        raise DataValidationError("no such MEDS label file or directory", source=str(path))
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise DataValidationError("contains no parquet label files", source=str(path))
    split_of = {f: _split_of(path, f) for f in files}
    with_split = [f for f, s in split_of.items() if s is not None]
    if with_split and len(with_split) != len(files):
        stray = next(f for f, s in split_of.items() if s is None)
        raise DataValidationError(
            "is outside train/, tuning/ and held_out/ while other label files are inside "
            "them: put every shard in its split's folder, or none", source=str(stray))
    frame = pd.concat([_rows_of(f, task, split_of[f]) for f in files], ignore_index=True)
    splits = None
    if with_split:
        per_subject = frame.drop_duplicates(["subject_id", "split"])
        twice = per_subject["subject_id"].duplicated(keep=False)
        if twice.any():
            sid = int(per_subject.loc[twice, "subject_id"].iloc[0])
            names = sorted(per_subject.loc[per_subject["subject_id"] == sid, "split"])
            raise DataValidationError(
                f"has label rows in more than one split ({', '.join(names)}); a subject "
                "belongs to one split", source=str(path), subject_id=sid, column="subject_id")
        splits = pd.Series(per_subject["split"].to_numpy(dtype=object),
                           index=per_subject["subject_id"].to_numpy(np.int64))
    frame = _sorted_unique(frame)
    return LabelSet(frame.drop(columns=["split", "_source"]), splits)


def read_label_file(path: str | Path, task: Task) -> pd.DataFrame:
    """One MEDS label file as label rows (``subject_id``, ``prediction_time``,
    ``event_type``, ``event_time_days``, ``label_<H>d``, ``censored_<H>d``)."""
    frame = _sorted_unique(_rows_of(Path(path), task, None))
    return frame.drop(columns=["split", "_source"])


def _split_of(root: Path, file: Path) -> str | None:
    parts = file.relative_to(root).parts
    return SPLIT_ALIASES.get(parts[0]) if len(parts) > 1 else None


def _rows_of(path: Path, task: Task, split: str | None) -> pd.DataFrame:
    source = str(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataValidationError(f"cannot be read as parquet: {exc}", source=source) from None
    missing = [c for c in LABEL_COLUMNS if c not in table.column_names]
    if missing:
        raise DataValidationError(
            f"missing column(s) {missing}; a MEDS label file has columns {list(LABEL_COLUMNS)}",
            source=source)
    sid = _plain(table.column("subject_id"))
    if not pa.types.is_integer(sid.type):
        raise DataValidationError(f"has type {sid.type}, expected an integer subject id",
                                  source=source, column="subject_id")
    _no_nulls(sid, source, "subject_id", None)
    ids = sid.cast(pa.int64()).to_numpy()
    t = _plain(table.column("prediction_time"))
    if pa.types.is_date(t.type):
        t = t.cast(pa.timestamp("us"))
    if not pa.types.is_timestamp(t.type):
        raise DataValidationError(
            f"has type {t.type}, expected a timestamp (naive UTC, or with a time zone)",
            source=source, column="prediction_time")
    if t.type.tz is not None:
        t = t.cast(pa.timestamp(t.type.unit, tz="UTC")).cast(pa.timestamp(t.type.unit))
    _no_nulls(t, source, "prediction_time", ids)
    times = t.cast(pa.timestamp("us"), safe=False).to_numpy().astype("datetime64[us]")
    value = _plain(table.column("boolean_value"))
    if not pa.types.is_boolean(value.type):
        raise DataValidationError(
            f"has type {value.type}, expected a boolean label (true: the outcome within "
            f"{task.horizons_days[0]} days)", source=source, column="boolean_value")
    _no_nulls(value, source, "boolean_value", ids)
    label = value.to_numpy(zero_copy_only=False).astype(bool)
    h = task.horizons_days[0]
    return pd.DataFrame({
        "subject_id": ids,
        "prediction_time": times,
        "event_type": np.where(label, OUTCOME, NO_OUTCOME).astype(np.int8),
        "event_time_days": np.full(ids.size, np.nan),
        label_column(h): label.astype(np.float32),
        censored_column(h): np.zeros(ids.size, dtype=bool),
        "split": split,
        "_source": source,
    })


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _no_nulls(col: pa.ChunkedArray, source: str, column: str, ids: np.ndarray | None) -> None:
    null = col.is_null().to_numpy(zero_copy_only=False)
    if null.any():
        row = int(np.flatnonzero(null)[0])
        raise DataValidationError(
            f"null {column.replace('_', ' ')}", source=source, row=row, column=column,
            subject_id=None if ids is None else int(ids[row]), count=int(null.sum()))


def _sorted_unique(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by subject and time; a repeated (subject, time) with the same label is kept
    once, with conflicting labels it is an error."""
    frame = frame.sort_values(["subject_id", "prediction_time"], kind="stable")
    key = ["subject_id", "prediction_time"]
    label = [c for c in frame.columns if c.startswith("label_")]
    frame = frame.drop_duplicates([*key, *label]).reset_index(drop=True)
    clash = frame.duplicated(key, keep=False).to_numpy()
    if clash.any():
        row = frame.loc[clash].iloc[0]
        raise DataValidationError("has both a true and a false label at one prediction time",
                                  source=row["_source"], column="boolean_value",
                                  subject_id=int(row["subject_id"]))
    return frame
