"""Training sets, shard by shard: events → labels → point-in-time features → parquet.

Two passes over a MEDS dataset: the first freezes the FeatureSpec from the training
split, the second labels and featurises bounded chunks of subjects and streams them to
one parquet file (written beside its destination and renamed, so a failure leaves
nothing).  Chunks are independent given the spec, so they can be spread over processes.

Output columns follow the MEDS label schema's names: ``subject_id``, ``prediction_time``,
then ``split``, ``event_type``, ``event_time_days``, ``label_<H>d``, ``censored_<H>d``,
the task's trajectory targets (``target_<code>_<H>d``, :mod:`features.targets`), and the
features (float32) in ``spec.feature_names`` order.  A task whose labels come
from a MEDS label file or directory (:mod:`features.label_files`) uses its prediction
times and labels as given, and a directory's own split wins over the dataset's.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.errors import FeaturesError
from features.events import EventArrays, MedsDataset, subject_bounds
from features.featurize import build_features
from features.label_files import read_labels
from features.labels import derive_labels, label_column
from features.spec import CodeStats, FeatureSpec, wants_kalman
from features.splits import assign_splits
from features.targets import target_column, trajectory_targets
from features.task import Task
from features.timeindex import US_PER_DAY

Progress = Callable[[int], None]
CACHE_EVENTS = 30_000_000  # keep shards in memory between the passes below this size


@dataclass
class TrainingSetSummary:
    rows: int
    subjects: int
    events: int
    rows_by_split: dict[str, int]
    positives: dict[int, int]
    censored: dict[int, int]
    spec: FeatureSpec

    def as_dict(self) -> dict:
        return {"rows": self.rows, "subjects": self.subjects, "events": self.events,
                "rows_by_split": self.rows_by_split, "positives": self.positives,
                "censored": self.censored, "features": len(self.spec.feature_names)}


class TrainingSetBuilder:
    """Builds the point-in-time training set of one task over one MEDS dataset."""

    def __init__(self, dataset: MedsDataset, task: Task, *, chunk_subjects: int = 25_000):
        self.dataset = dataset
        self.task = task
        self.chunk_subjects = chunk_subjects
        self._cache: list[EventArrays] | None = None
        given = read_labels(task.labels.path, task) if task.labels else None
        self._labels = given.rows if given else None
        self._known_splits = _given_splits(given.splits if given else None,
                                           dataset.known_splits())

    def splits_of(self, subject_ids: np.ndarray) -> np.ndarray:
        """Split per row of a subject-sorted id array (hashed once per subject)."""
        subjects, starts, ends = subject_bounds(np.asarray(subject_ids))
        per_subject = assign_splits(subjects, self.task.split, self._known_splits)
        return np.repeat(per_subject, ends - starts)

    def shards(self) -> Iterator[EventArrays]:
        if self._cache is not None:
            yield from self._cache
            return
        for events in self.dataset.iter_files():
            yield EventArrays.from_events(events)

    def fit_spec(self, progress: Progress | None = None) -> FeatureSpec:
        """Pass 1: count codes among training subjects and freeze the FeatureSpec."""
        stats, cache, total = CodeStats(kalman=wants_kalman(self.task)), [], 0
        for arrays in self.shards():
            stats.add(arrays, self.splits_of(arrays.subject_id) == "train")
            total += len(arrays)
            if total <= CACHE_EVENTS:
                cache.append(arrays)
            if progress:
                progress(len(arrays))
        if total <= CACHE_EVENTS and self._cache is None:
            self._cache = cache
        return stats.freeze(self.task, self.dataset.units())

    def array_chunks(self) -> Iterator[EventArrays]:
        """The events in chunks of at most ``chunk_subjects`` subjects."""
        for arrays in self.shards():
            subjects, starts, ends = subject_bounds(arrays.subject_id)
            for i in range(0, subjects.size, self.chunk_subjects):
                lo = starts[i]
                hi = ends[min(i + self.chunk_subjects, subjects.size) - 1]
                yield _slice(arrays, lo, hi)

    def chunks(self, spec: FeatureSpec, progress: Progress | None = None) -> Iterator[pd.DataFrame]:
        """Pass 2: labelled feature rows, one frame per chunk of subjects."""
        for part in self.array_chunks():
            frame = self.rows_for(part, spec)
            if progress:
                progress(len(part))
            if len(frame):
                yield frame

    def rows_for(self, arrays: EventArrays, spec: FeatureSpec) -> pd.DataFrame:
        """Label and featurise the subjects in ``arrays``."""
        if self._labels is not None:
            lab = self._labels
            labels = lab[lab["subject_id"].isin(np.unique(arrays.subject_id))]
            labels = labels.reset_index(drop=True)
        else:
            labels = derive_labels(arrays, self.task)
        split = self.splits_of(labels["subject_id"].to_numpy())
        labels.insert(2, "split", pd.Categorical(split, categories=["train", "tuning",
                                                                    "held_out"]))
        labels = self._temporal(labels)
        t_us = labels["prediction_time"].to_numpy().view(np.int64)
        x = build_features(arrays, labels["subject_id"].to_numpy(), t_us, spec)
        feats = pd.DataFrame(x, columns=spec.feature_names, index=labels.index)
        targets = trajectory_targets(arrays, self.task, labels["subject_id"].to_numpy(), t_us)
        if targets:
            self._before_cutoff(targets, labels["split"].to_numpy(), t_us)
            labels = pd.concat([labels, pd.DataFrame(targets, index=labels.index)], axis=1)
        return pd.concat([labels, feats], axis=1)

    def _temporal(self, labels: pd.DataFrame) -> pd.DataFrame:
        temporal = self.task.split.temporal
        if temporal is None:
            return labels
        cutoff = np.datetime64(temporal.cutoff, "us").view(np.int64)
        t = labels["prediction_time"].to_numpy().view(np.int64)
        horizon = max(self.task.horizons_days) * US_PER_DAY
        held = labels["split"].to_numpy() == "held_out"
        keep = np.where(held, t >= cutoff, t + horizon <= cutoff)
        return labels[keep].reset_index(drop=True)


    def _before_cutoff(self, targets: dict[str, np.ndarray], split: np.ndarray,
                       t_us: np.ndarray) -> None:
        """With a temporal hold-out, a train or tuning row's trajectory target must be
        known before the cutoff too: one whose window reaches past it is dropped."""
        temporal = self.task.split.temporal
        if temporal is None:
            return
        cutoff = np.datetime64(temporal.cutoff, "us").view(np.int64)
        before = split != "held_out"
        for t in self.task.trajectories:
            for h in t.horizons_days:
                late = before & (t_us + (h + t.tolerance_days) * US_PER_DAY > cutoff)
                targets[target_column(t.code, h)][late] = np.nan


def _given_splits(from_labels: pd.Series | None, from_data: pd.Series | None
                  ) -> pd.Series | None:
    """subject_id → split given with the data: a label directory's split wins over the
    MEDS dataset's (subjects it lacks keep the dataset's, else the hash)."""
    parts = [s for s in (from_labels, from_data) if s is not None and len(s)]
    return pd.concat(parts) if parts else None  # assign_splits keeps the first per subject


def _slice(a: EventArrays, lo: int, hi: int) -> EventArrays:
    return EventArrays(a.subject_id[lo:hi], a.time_us[lo:hi], a.code[lo:hi], a.categories,
                       a.value[lo:hi])


def build_training_frame(dataset: MedsDataset, task: Task) -> tuple[pd.DataFrame, FeatureSpec]:
    """The whole training set in memory (for modest cohorts and tests)."""
    builder = TrainingSetBuilder(dataset, task)
    spec = builder.fit_spec()
    frames = list(builder.chunks(spec))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return frame, spec


def write_training_set(
    dataset: MedsDataset,
    task: Task,
    out: str | os.PathLike,
    *,
    progress: Progress | None = None,
    chunk_subjects: int = 25_000,
) -> TrainingSetSummary:
    """Build the training set and stream it to ``out`` (parquet), atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    builder = TrainingSetBuilder(dataset, task, chunk_subjects=chunk_subjects)
    spec = builder.fit_spec()
    events = 0

    def count(n: int) -> None:
        nonlocal events
        events += n
        if progress:
            progress(n)

    with atomic_file(out) as tmp:
        counts = write_frames(builder.chunks(spec, count), tmp, task)
        if counts.rows == 0:
            raise FeaturesError(NO_ROWS)
    counts.events = events
    return counts.summary(spec)


SPLIT_TYPE = pa.dictionary(pa.int8(), pa.string())
NO_ROWS = ("no eligible prediction times: check the task's outcome, eligibility and "
           "prediction-time settings")


@dataclass
class FrameCounts:
    """What a training set (or a part of one) holds, summed chunk by chunk."""

    rows: int = 0
    subjects: int = 0
    events: int = 0
    by_split: dict[str, int] = field(default_factory=dict)
    positives: dict[int, int] = field(default_factory=dict)
    censored: dict[int, int] = field(default_factory=dict)

    def add(self, frame: pd.DataFrame, task: Task) -> None:
        self.rows += len(frame)
        self.subjects += frame["subject_id"].nunique()  # chunks never share a subject
        if "split" in frame:
            for k, v in frame["split"].value_counts().items():
                self.by_split[str(k)] = self.by_split.get(str(k), 0) + int(v)
        for h in task.horizons_days:
            if label_column(h) not in frame:  # forecasts (training.scoring) carry none
                continue
            lab = frame[label_column(h)].to_numpy()
            self.positives[h] = self.positives.get(h, 0) + int(np.nansum(lab == 1))
            self.censored[h] = self.censored.get(h, 0) + int(np.isnan(lab).sum())

    def merge(self, other: FrameCounts) -> None:
        self.rows += other.rows
        self.subjects += other.subjects
        self.events += other.events
        for mine, theirs in ((self.by_split, other.by_split),
                             (self.positives, other.positives),
                             (self.censored, other.censored)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def summary(self, spec: FeatureSpec) -> TrainingSetSummary:
        return TrainingSetSummary(self.rows, self.subjects, self.events, self.by_split,
                                  self.positives, self.censored, spec)


@contextlib.contextmanager
def atomic_file(out: Path) -> Iterator[str]:
    """A temporary path beside ``out`` that becomes ``out`` when the block succeeds (a
    failure, or a killed process, leaves no ``out``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_frames(frames: Iterator[pd.DataFrame], path: str, task: Task,
                 metadata: dict[str, str] | None = None) -> FrameCounts:
    """Stream labelled chunks to one parquet file, a row group each (zstd, the split
    dictionary-encoded), compressing one chunk while the next is built; ``metadata`` is
    added to the file's schema."""
    counts = FrameCounts(positives=dict.fromkeys(task.horizons_days, 0),
                         censored=dict.fromkeys(task.horizons_days, 0))
    writer = None
    pool = ThreadPoolExecutor(max_workers=1)
    pending = None
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if "split" in table.column_names:  # one type, whatever pandas made of it
                i = table.column_names.index("split")
                table = table.set_column(i, table.schema.field(i).with_type(SPLIT_TYPE),
                                         table.column(i).cast(SPLIT_TYPE))
            if metadata:
                table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{
                    k.encode(): v.encode() for k, v in metadata.items()}})
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd",
                                          use_dictionary=["split"])
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_table, table)
            counts.add(frame, task)
        if pending is not None:
            pending.result()
    finally:
        pool.shutdown(wait=True)
        if writer is not None:
            writer.close()
    return counts
