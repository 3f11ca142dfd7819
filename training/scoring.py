"""Batch scoring: a model version's forecasts for a whole MEDS cohort, as parquet.

``twincast score`` forecasts, with one registered model version's bundle, either every
subject's prediction times as the task defines them (``at="prediction-times"``: the
rows of its training set, each with its split) or every subject once, at its last timed
event (``at="last-event"``: where each patient's record ends; no eligibility rule is
applied there, so a patient who has died or reached the outcome is scored too, where the
service would answer "not eligible").  One MEDS shard is one
unit of work, in this process or on a Dask cluster (:mod:`features.cluster`); each
shard's rows are written as a part file and the parts are copied in shard order into
the output, so both give the same file contents.  A worker holds one shard's events and
features at a time and returns only counts; the output carries the model's name,
version and bundle digest in its schema metadata.

Columns: ``subject_id``, ``prediction_time``, (``split``,) then ``risk_<H>d`` per
horizon (float64, calibrated and non-decreasing across horizons, as served).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from features.cluster import check_visible, keep, map_shards
from features.errors import FeaturesError
from features.events import NAT_US, EventArrays, MedsDataset, subject_bounds
from features.pipeline import TrainingSetBuilder
from features.sharded import check_output, parts_beside, publish, shard_of, write_part
from training.bundle import ModelBundle

if TYPE_CHECKING:
    from distributed import Client

At = Literal["prediction-times", "last-event"]
Progress = Callable[[int], None]


@dataclass
class ScoreSummary:
    rows: int
    subjects: int
    events: int
    shards: int


def risk_column(h: int) -> str:
    return f"risk_{h}d"


def last_event_times(arrays: EventArrays) -> tuple[np.ndarray, np.ndarray]:
    """Each subject with a timed event, and the time of its last one (µs)."""
    timed = arrays.time_us != NAT_US
    subjects, _, ends = subject_bounds(arrays.subject_id[timed])
    return subjects, arrays.time_us[timed][ends - 1] if subjects.size else \
        np.empty(0, np.int64)


def score_chunk(builder: TrainingSetBuilder, bundle: ModelBundle, arrays: EventArrays,
                at: At) -> pd.DataFrame:
    """The forecasts for one chunk of subjects."""
    spec = bundle.spec
    if at == "prediction-times":
        rows = builder.rows_for(arrays, spec)
        ids = rows[["subject_id", "prediction_time", "split"]].reset_index(drop=True)
        x = rows[spec.feature_names].to_numpy(np.float32)
    else:
        subjects, t_us = last_event_times(arrays)
        ids = pd.DataFrame({"subject_id": subjects,
                            "prediction_time": t_us.astype("datetime64[us]")})
        x = bundle.features_for(arrays, subjects, t_us)
    risk = bundle.predict_features(x) if len(ids) else np.empty((0, len(bundle.horizons)))
    for i, h in enumerate(bundle.horizons):
        ids[risk_column(h)] = risk[:, i].astype(np.float64)
    return ids


def score_shard(item: tuple[Path, str], dataset: MedsDataset, bundle: ModelBundle, at: At,
                chunk_subjects: int, metadata: dict[str, str] | None = None
                ) -> tuple[int, int, int]:
    """One shard's forecasts, written to its part file; returns (rows, subjects, events)."""
    path, part = item
    builder = TrainingSetBuilder(shard_of(dataset, path), bundle.task,
                                 chunk_subjects=chunk_subjects)
    events = 0

    def frames():
        nonlocal events
        for arrays in builder.array_chunks():
            events += len(arrays)
            frame = score_chunk(builder, bundle, arrays, at)
            if len(frame):
                yield frame

    counts = write_part(frames(), part, bundle.task, metadata)
    return counts.rows, counts.subjects, events


def write_scores(dataset: MedsDataset, bundle: ModelBundle, out: str | os.PathLike, *,
                 at: At = "prediction-times", client: Client | None = None,
                 metadata: dict[str, str] | None = None, progress: Progress | None = None,
                 chunk_subjects: int = 25_000) -> ScoreSummary:
    """Score every shard of ``dataset`` with ``bundle`` into ``out`` (parquet),
    atomically; on the cluster when ``client`` is given."""
    out = Path(out)
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if client is not None:
        check_visible(client, dataset.root, out.parent)
    rows = subjects = events = 0
    with parts_beside(out, len(dataset.files)) as parts:
        items = list(zip(dataset.files, parts, strict=True))
        if client is None:
            results = ((i, score_shard(item, dataset, bundle, at, chunk_subjects, metadata))
                       for i, item in enumerate(items))
        else:
            results = map_shards(client, score_shard, items, keep(client, dataset),
                                 keep(client, bundle), at, chunk_subjects, metadata)
        for _, (r, s, e) in results:
            rows, subjects, events = rows + r, subjects + s, events + e
            if progress:
                progress(e)
        if rows == 0:
            raise FeaturesError("no subject has a prediction time to score: check the "
                                "task's prediction-time settings, or score at the last "
                                "event")
        publish(parts, out)
    return ScoreSummary(rows, subjects, events, len(dataset.files))
