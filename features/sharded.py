"""Training sets on a Dask cluster, one MEDS shard per task.

The same two passes as :func:`features.pipeline.write_training_set`, spread over
workers:

1. each shard's code statistics over its training subjects (:class:`CodeStats`, a few
   kilobytes) are computed on a worker and merged on the client *in shard order*, so
   the frozen FeatureSpec — the Kalman filter's noise sums included — is the one the
   single-process pass computes, to the last bit;
2. each shard is labelled and featurised with that spec on a worker, which writes its
   rows as a part file (a row group per chunk of subjects, exactly as the single process
   writes them) and returns only counts; the client then copies the parts' row groups,
   in shard order, into the one output file.

So the output equals the single-process output bit for bit, whatever the number of
workers or the order tasks finish in.  A worker holds one shard's events at a time; the
client holds one row group.  A task whose worker dies is re-run elsewhere: parts are
written under a temporary name and renamed, so a re-run replaces, never duplicates.
The MEDS directory and the output's folder must be visible to every worker.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from features.events import MedsDataset
from features.pipeline import (
    NO_ROWS,
    FrameCounts,
    TrainingSetBuilder,
    TrainingSetSummary,
    atomic_file,
    write_frames,
)
from features.spec import CodeStats, FeatureSpec, wants_kalman
from features.task import Task

if TYPE_CHECKING:
    from distributed import Client

Progress = Callable[[int], None]


def shard_of(dataset: MedsDataset, path: Path) -> MedsDataset:
    """The dataset restricted to one data file (its split, when files carry splits)."""
    splits = {path: dataset.file_splits[path]} if dataset.file_splits else None
    return replace(dataset, files=(path,), file_splits=splits)


def shard_stats(dataset: MedsDataset, task: Task, path: Path) -> tuple[CodeStats, int]:
    """Pass 1 on one shard: its code statistics over training subjects, and its size."""
    builder = TrainingSetBuilder(shard_of(dataset, path), task)
    stats = CodeStats(kalman=wants_kalman(task))
    events = 0
    for arrays in builder.shards():
        stats.add(arrays, builder.splits_of(arrays.subject_id) == "train")
        events += len(arrays)
    return stats, events


def shard_rows(dataset: MedsDataset, task: Task, spec: FeatureSpec, path: Path,
               part: str, chunk_subjects: int) -> FrameCounts:
    """Pass 2 on one shard: its labelled feature rows, written to ``part`` (atomically;
    no file when the shard has no rows)."""
    builder = TrainingSetBuilder(shard_of(dataset, path), task, chunk_subjects=chunk_subjects)
    events = 0

    def count(n: int) -> None:
        nonlocal events
        events += n

    tmp = f"{part}.{uuid.uuid4().hex}.tmp"
    try:
        counts = write_frames(builder.chunks(spec, count), tmp, task)
        counts.events = events
        if counts.rows:
            os.replace(tmp, part)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return counts


def fit_spec_on(client: Client, dataset: MedsDataset, task: Task,
                progress: Progress | None = None) -> tuple[FeatureSpec, int]:
    """Pass 1 on the cluster: the FeatureSpec (and the number of events)."""
    from distributed import as_completed

    data, job = client.scatter([dataset, task], broadcast=True, hash=False)
    futures = {client.submit(shard_stats, data, job, path, pure=False): i
               for i, path in enumerate(dataset.files)}
    results: list[CodeStats | None] = [None] * len(dataset.files)
    total = 0
    for future in as_completed(futures):
        stats, events = future.result()
        results[futures[future]] = stats
        total += events
        if progress:
            progress(events)
    merged = CodeStats(kalman=wants_kalman(task))
    for stats in results:  # in shard order: the single-process sums, bit for bit
        merged.merge(stats)
    return merged.freeze(task, dataset.units()), total


def write_training_set_on(
    client: Client,
    dataset: MedsDataset,
    task: Task,
    out: str | os.PathLike,
    *,
    progress: Progress | None = None,
    chunk_subjects: int = 25_000,
) -> TrainingSetSummary:
    """:func:`features.pipeline.write_training_set` on a Dask cluster (same output)."""
    from distributed import as_completed

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec, _ = fit_spec_on(client, dataset, task, progress)
    parts_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.parts.", dir=out.parent))
    try:
        parts = [str(parts_dir / f"part-{i:06d}.parquet") for i in range(len(dataset.files))]
        data, job, frozen = client.scatter([dataset, task, spec], broadcast=True, hash=False)
        futures = {client.submit(shard_rows, data, job, frozen, path, parts[i],
                                 chunk_subjects, pure=False): i
                   for i, path in enumerate(dataset.files)}
        counts = FrameCounts(positives=dict.fromkeys(task.horizons_days, 0),
                             censored=dict.fromkeys(task.horizons_days, 0))
        for future in as_completed(futures):
            part = future.result()
            counts.merge(part)
            if progress:
                progress(part.events)
        if counts.rows == 0:
            raise ValueError(NO_ROWS)
        with atomic_file(out) as tmp:
            concat_parts([p for p in parts if os.path.exists(p)], tmp)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return counts.summary(spec)


def concat_parts(parts: list[str], out: str, metadata: dict[str, str] | None = None) -> None:
    """Copy the parts' row groups, in order, into one parquet file (one row group in
    memory at a time); ``metadata`` is added to the file's schema."""
    writer, schema = None, None
    try:
        for p in parts:
            f = pq.ParquetFile(p)
            for g in range(f.num_row_groups):
                table = f.read_row_group(g)
                if writer is None:
                    schema = f.schema_arrow
                    if metadata:
                        schema = schema.with_metadata({**(schema.metadata or {}), **{
                            k.encode(): v.encode() for k, v in metadata.items()}})
                    writer = pq.ParquetWriter(out, schema, compression="zstd",
                                              use_dictionary=["split"])
                writer.write_table(table.replace_schema_metadata(schema.metadata))
    finally:
        if writer is not None:
            writer.close()


def shard_sizes(dataset: MedsDataset) -> np.ndarray:
    """Events per data file, from the parquet footers (nothing else is read)."""
    return np.array([pq.ParquetFile(f).metadata.num_rows for f in dataset.files],
                    dtype=np.int64)
