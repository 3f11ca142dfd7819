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

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from features.cluster import check_visible, keep, map_shards
from features.errors import FeaturesError
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
    import pandas as pd
    from distributed import Client

Progress = Callable[[int], None]


def shard_of(dataset: MedsDataset, path: Path) -> MedsDataset:
    """The dataset restricted to one data file: its split when files carry splits, and
    only its own subjects' rows of ``metadata/subject_splits.parquet`` (a worker holds
    its shard, not the cohort's split table)."""
    splits = {path: dataset.file_splits[path]} if dataset.file_splits else None
    subject_splits = dataset.subject_splits
    if subject_splits is not None:
        lo, hi = _id_range(path)
        ids = subject_splits["subject_id"]
        subject_splits = subject_splits[(ids >= lo) & (ids <= hi)]
    return replace(dataset, files=(path,), file_splits=splits, subject_splits=subject_splits)


def _id_range(path: Path) -> tuple[int, int]:
    """The smallest and largest subject id in a data file, from its footer's statistics
    when they are there."""
    meta = pq.ParquetFile(path).metadata
    col = meta.schema.to_arrow_schema().get_field_index("subject_id")
    lo, hi = None, None
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(col).statistics
        if st is None or not st.has_min_max:
            ids = pq.read_table(path, columns=["subject_id"]).column(0).to_numpy()
            return (int(ids.min()), int(ids.max())) if ids.size else (0, -1)
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    return (int(lo), int(hi)) if lo is not None else (0, -1)


def write_part(frames: Iterable[pd.DataFrame], part: str, task: Task,
               metadata: dict[str, str] | None = None) -> FrameCounts:
    """A task's frames as one part file, written under a temporary name and renamed (a
    re-run task replaces it; no file when there are no rows)."""
    tmp = f"{part}.{uuid.uuid4().hex}.tmp"
    try:
        counts = write_frames(frames, tmp, task, metadata)
        if counts.rows:
            os.replace(tmp, part)
        return counts
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def parts_beside(out: Path, n: int) -> Iterator[list[str]]:
    """Names for ``n`` part files in a temporary folder beside ``out``, removed after."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.parts.", dir=out.parent))
    try:
        yield [str(folder / f"part-{i:06d}.parquet") for i in range(n)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def shard_stats(path: Path, dataset: MedsDataset, task: Task) -> tuple[CodeStats, int]:
    """Pass 1 on one shard: its code statistics over training subjects, and its size."""
    builder = TrainingSetBuilder(shard_of(dataset, path), task)
    stats = CodeStats(kalman=wants_kalman(task))
    events = 0
    for arrays in builder.shards():
        stats.add(arrays, builder.splits_of(arrays.subject_id) == "train")
        events += len(arrays)
    return stats, events


def shard_rows(item: tuple[Path, str], dataset: MedsDataset, task: Task, spec: FeatureSpec,
               chunk_subjects: int) -> FrameCounts:
    """Pass 2 on one shard: its labelled feature rows, written to its part file."""
    path, part = item
    builder = TrainingSetBuilder(shard_of(dataset, path), task, chunk_subjects=chunk_subjects)
    events = 0

    def count(n: int) -> None:
        nonlocal events
        events += n

    counts = write_part(builder.chunks(spec, count), part, task)
    counts.events = events
    return counts


def fit_spec_on(client: Client, dataset: MedsDataset, task: Task,
                progress: Progress | None = None) -> tuple[FeatureSpec, int]:
    """Pass 1 on the cluster: the FeatureSpec (and the number of events)."""
    results: list[CodeStats | None] = [None] * len(dataset.files)
    total = 0
    for i, (stats, events) in map_shards(client, shard_stats, dataset.files,
                                         keep(client, dataset), keep(client, task)):
        results[i] = stats
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
    out = Path(out)
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_visible(client, dataset.root, out.parent)
    spec, _ = fit_spec_on(client, dataset, task, progress)
    with parts_beside(out, len(dataset.files)) as parts:
        counts = FrameCounts(positives=dict.fromkeys(task.horizons_days, 0),
                             censored=dict.fromkeys(task.horizons_days, 0))
        items = list(zip(dataset.files, parts, strict=True))
        for _, part in map_shards(client, shard_rows, items, keep(client, dataset),
                                  keep(client, task), keep(client, spec), chunk_subjects):
            counts.merge(part)
            if progress:
                progress(part.events)
        if counts.rows == 0:
            raise FeaturesError(NO_ROWS)
        publish(parts, out)
    return counts.summary(spec)


def as_directory(out: Path) -> bool:
    """Whether a cluster job's output is a folder of parts (a name without a suffix)
    rather than one parquet file."""
    return out.suffix == ""


def check_output(out: Path) -> None:
    """Refuse, before any work, an output folder that exists and is not empty."""
    if as_directory(out) and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")


def publish(parts: list[str], out: Path) -> None:
    """The parts as the job's output, atomically: copied in shard order into one parquet
    file (one row group in memory at a time: a serial copy of the whole output), or —
    for an output named without a suffix — renamed as a folder of part files, which
    readers take in name order, that is in shard order (no copy)."""
    present = [p for p in parts if os.path.exists(p)]
    if not as_directory(out):
        with atomic_file(out) as tmp:
            concat_parts(present, tmp)
        return
    check_output(out)
    if out.exists():
        out.rmdir()
    folder = Path(parts[0]).parent
    for p in folder.glob("*.tmp"):  # a killed task's leftovers
        p.unlink()
    os.replace(folder, out)


def concat_parts(parts: list[str], out: str) -> None:
    """Copy the parts' row groups, in order, into one parquet file (one row group in
    memory at a time), with the first part's schema and its metadata."""
    writer = None
    try:
        for p in parts:
            f = pq.ParquetFile(p)
            for g in range(f.num_row_groups):
                table = f.read_row_group(g)
                if writer is None:
                    writer = pq.ParquetWriter(out, f.schema_arrow, compression="zstd",
                                              use_dictionary=["split"])
                writer.write_table(table.replace_schema_metadata(f.schema_arrow.metadata))
    finally:
        if writer is not None:
            writer.close()
