"""MEDS events: the one table every other part of twincast reads.

One row per event: ``subject_id`` (int64), ``time`` (naive UTC, microseconds; null for
static facts), ``code`` (``VOCABULARY//VALUE``), ``numeric_value`` (float32, nullable) and
``text_value`` (string, nullable).  In memory the table is a pandas DataFrame whose
``code`` column is categorical and whose rows are in *canonical order* (subject, time
with static facts first, code, value), so digests and features never depend on the
order a file happened to be written in.

Reading validates: a missing column, a wrong type, a non-finite value, a null subject or
code, or a time in the future raises :class:`DataValidationError` naming the file, the
row, the subject and the column.  Writing is atomic: a MEDS directory appears whole or
not at all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.errors import DataValidationError

EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value", "text_value")
REQUIRED_COLUMNS = ("subject_id", "time", "code")
BIRTH_CODE = "MEDS_BIRTH"
DEATH_CODE = "MEDS_DEATH"
END_OF_FOLLOWUP_CODE = "ADMIN//END_OF_FOLLOWUP"
SPLITS = ("train", "tuning", "held_out")

MEDS_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("time", pa.timestamp("us")),
        pa.field("code", pa.string(), nullable=False),
        pa.field("numeric_value", pa.float32()),
        pa.field("text_value", pa.string()),
    ]
)


def utc_now_naive() -> np.datetime64:
    """The current time as naive-UTC ``datetime64[us]``, the unit MEDS stores."""
    return np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us")


def _fail(mask: np.ndarray, message: str, *, source: str, column: str, subject_ids,
          line_offset: int | None = None) -> None:
    """Raise for the first row flagged in ``mask`` (if any), counting the others."""
    bad = np.flatnonzero(mask)
    if bad.size:
        row = int(bad[0])
        subject = None
        if subject_ids is not None and column != "subject_id":
            subject = int(subject_ids[row])
        line = None if line_offset is None else row + line_offset
        raise DataValidationError(
            message, source=source, row=row, column=column, subject_id=subject,
            count=bad.size, line=line,
        )


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col


def validate_table(
    table: pa.Table, *, source: str, now: np.datetime64 | None = None,
    line_offset: int | None = None,
) -> pa.Table:
    """Check an Arrow table against the MEDS contract and return it with canonical types.

    Timezone-aware times are converted to naive UTC; any timestamp unit is accepted and
    cast to microseconds.  ``numeric_value`` and ``text_value`` may be absent (all null).
    ``line_offset`` turns row indices into text-file line numbers in messages.
    """
    fail = functools.partial(_fail, line_offset=line_offset)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataValidationError(
            f"missing required column(s) {missing}; a MEDS table has columns "
            f"{list(EVENT_COLUMNS)} (numeric_value and text_value may be omitted)",
            source=source,
        )
    n = table.num_rows
    if n == 0:
        return MEDS_SCHEMA.empty_table()
    sid = _column(table, "subject_id")
    if not pa.types.is_integer(sid.type):
        raise DataValidationError(
            f"has type {sid.type}, expected an integer subject id", source=source,
            column="subject_id",
        )
    fail(sid.is_null().to_numpy(zero_copy_only=False), "null subject id", source=source,
          column="subject_id", subject_ids=None)
    sid = sid.cast(pa.int64())
    subject_ids = sid.to_numpy()

    time = _column(table, "time")
    if pa.types.is_date(time.type):
        time = time.cast(pa.timestamp("us"))
    if not pa.types.is_timestamp(time.type):
        raise DataValidationError(
            f"has type {time.type}, expected a timestamp (naive UTC, or with a time zone)",
            source=source, column="time",
        )
    if time.type.tz is not None:
        time = time.cast(pa.timestamp(time.type.unit, tz="UTC")).cast(pa.timestamp(time.type.unit))
    time = time.cast(pa.timestamp("us"), safe=False)
    now = utc_now_naive() if now is None else now
    t = time.to_numpy().astype("datetime64[us]")
    fail(~np.isnat(t) & (t > now), "time is in the future", source=source, column="time",
          subject_ids=subject_ids)

    code = _column(table, "code")
    if not (pa.types.is_string(code.type) or pa.types.is_large_string(code.type)):
        raise DataValidationError(
            f"has type {code.type}, expected text such as 'LAB//EGFR'", source=source,
            column="code",
        )
    code = code.cast(pa.string())
    empty = pc.fill_null(pc.equal(pc.utf8_length(code), 0), True)
    fail(empty.to_numpy(zero_copy_only=False), "empty or null code", source=source,
          column="code", subject_ids=subject_ids)

    if "numeric_value" in table.column_names:
        value = _column(table, "numeric_value")
        if not (pa.types.is_floating(value.type) or pa.types.is_integer(value.type)
                or pa.types.is_null(value.type)):
            raise DataValidationError(
                f"has type {value.type}, expected a number (or null)", source=source,
                column="numeric_value",
            )
        value = value.cast(pa.float64())
        v = value.to_numpy(zero_copy_only=False)  # nulls become NaN here ...
        real_nan = np.isnan(v) & ~value.is_null().to_numpy(zero_copy_only=False)
        fail(real_nan | np.isinf(v), "non-finite numeric value (NaN or infinity); leave it "
              "null when there is no value", source=source, column="numeric_value",
              subject_ids=subject_ids)
        big = np.abs(np.nan_to_num(v)) > np.finfo(np.float32).max
        fail(big, "numeric value out of the float32 range", source=source,
              column="numeric_value", subject_ids=subject_ids)
        value = value.cast(pa.float32())
    else:
        value = pa.nulls(n, pa.float32())

    if "text_value" in table.column_names:
        text = _column(table, "text_value")
        if pa.types.is_null(text.type):
            text = text.cast(pa.string())
        if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
            raise DataValidationError(
                f"has type {text.type}, expected text (or null)", source=source,
                column="text_value",
            )
        text = text.cast(pa.string())
    else:
        text = pa.nulls(n, pa.string())
    return pa.table([sid, time, code, value, text], schema=MEDS_SCHEMA)


def canonical_order(events: pd.DataFrame) -> np.ndarray:
    """Row order by subject, time (static facts first), code, numeric value.

    Data written by twincast is already in this order; that is checked in one linear
    pass and the sort skipped.
    """
    codes = events["code"]
    if not isinstance(codes.dtype, pd.CategoricalDtype):
        codes = codes.astype("category")
    cats = codes.cat.categories
    rank = np.empty(len(cats), dtype=np.int64)
    rank[np.argsort(np.asarray(cats, dtype=object), kind="stable")] = np.arange(len(cats))
    code_rank = rank[codes.cat.codes.to_numpy()]
    t = events["time"].to_numpy().view(np.int64)  # NaT is the smallest int64: static first
    s = events["subject_id"].to_numpy()
    v = events["numeric_value"].to_numpy()
    if _is_sorted(s, t, code_rank, v):
        return np.arange(len(events))
    return np.lexsort((v, code_rank, t, s))


def _is_sorted(s: np.ndarray, t: np.ndarray, c: np.ndarray, v: np.ndarray) -> bool:
    if s.size < 2:
        return True
    # comparisons, not differences: NaT is int64's minimum and would overflow
    with np.errstate(invalid="ignore"):
        v_ok = (v[:-1] <= v[1:]) | np.isnan(v[1:])
    same_s, same_t, same_c = s[1:] == s[:-1], t[1:] == t[:-1], c[1:] == c[:-1]
    ok = (s[1:] > s[:-1]) | (same_s & ((t[1:] > t[:-1]) | (same_t & (
        (c[1:] > c[:-1]) | (same_c & v_ok)))))
    return bool(ok.all())


def table_to_events(table: pa.Table) -> pd.DataFrame:
    """A validated Arrow table as the canonical in-memory events frame."""
    df = pd.DataFrame(
        {
            "subject_id": table.column("subject_id").to_numpy(),
            "time": table.column("time").to_numpy().astype("datetime64[us]"),
            "code": pd.Categorical(table.column("code").to_pandas()),
            "numeric_value": table.column("numeric_value").to_numpy(zero_copy_only=False)
            .astype(np.float32),
            "text_value": table.column("text_value").to_pandas(),
        }
    )
    return df.iloc[canonical_order(df)].reset_index(drop=True)


def events_from_frame(
    frame: pd.DataFrame, *, source: str = "events", now: np.datetime64 | None = None
) -> pd.DataFrame:
    """Validate and canonicalise events given as a DataFrame (the online path uses this)."""
    frame = frame.copy()
    if "code" in frame and isinstance(frame["code"].dtype, pd.CategoricalDtype):
        frame["code"] = frame["code"].astype(str)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    return table_to_events(validate_table(table, source=source, now=now))


def events_to_table(events: pd.DataFrame) -> pa.Table:
    """The canonical events frame as an Arrow table with the MEDS schema."""
    return pa.table(
        {
            "subject_id": pa.array(events["subject_id"].to_numpy(), pa.int64()),
            "time": pa.array(events["time"].to_numpy(), pa.timestamp("us")),
            "code": pa.array(events["code"].astype(str).to_numpy(dtype=object), pa.string()),
            "numeric_value": pa.array(
                events["numeric_value"].to_numpy(dtype=np.float32),
                pa.float32(), from_pandas=True,
            ),
            "text_value": pa.array(events["text_value"].to_numpy(dtype=object), pa.string(),
                                   from_pandas=True),
        },
        schema=MEDS_SCHEMA,
    )


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class MedsDataset:
    """A MEDS directory (``data/**/*.parquet`` + ``metadata/``) or a single parquet file.

    ``file_splits`` maps a data file to its split when the dataset is laid out as
    ``data/train``, ``data/tuning``, ``data/held_out``; ``subject_splits`` is
    ``metadata/subject_splits.parquet`` when present.  Either wins over twincast's own
    hash split, so results compare with other MEDS tools.
    """

    root: Path
    files: tuple[Path, ...]
    file_splits: dict[Path, str] | None = None
    subject_splits: pd.DataFrame | None = None
    codes: pd.DataFrame | None = None

    def read_file(self, path: Path, *, now: np.datetime64 | None = None) -> pd.DataFrame:
        """Read and validate one data file into canonical events."""
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataValidationError(f"cannot be read as parquet: {exc}", source=str(path))\
                from None
        return table_to_events(validate_table(table, source=str(path), now=now))

    def iter_files(self, *, now: np.datetime64 | None = None) -> Iterator[pd.DataFrame]:
        for path in self.files:
            yield self.read_file(path, now=now)

    def read_all(self, *, now: np.datetime64 | None = None) -> pd.DataFrame:
        frames = list(self.iter_files(now=now))
        if not frames:
            return empty_events()
        events = pd.concat(frames, ignore_index=True)
        events["code"] = events["code"].astype(str).astype("category")
        return events.iloc[canonical_order(events)].reset_index(drop=True)

    def known_splits(self) -> pd.Series | None:
        """subject_id → split given by the dataset itself, or None."""
        if self.subject_splits is not None:
            s = self.subject_splits
            return pd.Series(s["split"].astype(str).to_numpy(), index=s["subject_id"].to_numpy())
        if self.file_splits:
            parts = []
            for path, split in self.file_splits.items():
                ids = pq.read_table(path, columns=["subject_id"]).column(0).to_numpy()
                ids = np.unique(ids)
                parts.append(pd.Series(split, index=ids))
            return pd.concat(parts)
        return None

    def units(self) -> dict[str, str]:
        """Each code's unit, from ``metadata/codes.parquet`` when it carries one."""
        if self.codes is None or "unit" not in self.codes:
            return {}
        c = self.codes.dropna(subset=["unit"])
        return dict(zip(c["code"].astype(str), c["unit"].astype(str), strict=True))


SPLIT_ALIASES = {"train": "train", "tuning": "tuning", "held_out": "held_out",
                  "heldout": "held_out", "test": "held_out", "val": "tuning", "valid": "tuning"}


def open_meds(path: str | os.PathLike) -> MedsDataset:
    """Open a MEDS directory or a single parquet file (nothing is read yet)."""
    root = Path(path)
    if root.is_file():
        return MedsDataset(root=root.parent, files=(root,))
    if not root.is_dir():
        raise DataValidationError("no such MEDS directory or parquet file", source=str(root))
    data = root / "data"
    base = data if data.is_dir() else root
    files = tuple(sorted(base.rglob("*.parquet")))
    if not files:
        raise DataValidationError("contains no parquet files under data/", source=str(root))
    file_splits = None
    if data.is_dir():
        split_of = {}
        for f in files:
            first = f.relative_to(data).parts[0]
            if len(f.relative_to(data).parts) > 1 and first in SPLIT_ALIASES:
                split_of[f] = SPLIT_ALIASES[first]
        if split_of and len(split_of) == len(files):
            file_splits = split_of
    meta = root / "metadata"
    subject_splits = None
    if (meta / "subject_splits.parquet").is_file():
        subject_splits = pd.read_parquet(meta / "subject_splits.parquet")
        unknown = set(subject_splits["split"].astype(str)) - set(SPLIT_ALIASES)
        if unknown:
            raise DataValidationError(
                f"unknown split name(s) {sorted(unknown)}; expected train, tuning, held_out",
                source=str(meta / "subject_splits.parquet"), column="split",
            )
        subject_splits["split"] = subject_splits["split"].astype(str).map(SPLIT_ALIASES)
    codes = None
    if (meta / "codes.parquet").is_file():
        codes = pd.read_parquet(meta / "codes.parquet")
    return MedsDataset(root=root, files=files, file_splits=file_splits,
                       subject_splits=subject_splits, codes=codes)


def read_events(path: str | os.PathLike, *, now: np.datetime64 | None = None) -> pd.DataFrame:
    """Read a whole MEDS directory or parquet file into canonical events."""
    return open_meds(path).read_all(now=now)


def empty_events() -> pd.DataFrame:
    return table_to_events(MEDS_SCHEMA.empty_table())


# ----------------------------------------------------------------------------- writing


def _shards(events: pd.DataFrame, shard_subjects: int) -> Iterator[pd.DataFrame]:
    sid = events["subject_id"].to_numpy()
    uniq, starts = np.unique(sid, return_index=True)  # canonical order: sorted by subject
    for i in range(0, len(uniq), shard_subjects):
        lo = starts[i]
        hi = starts[i + shard_subjects] if i + shard_subjects < len(uniq) else len(sid)
        yield events.iloc[lo:hi]


def write_meds(
    events: pd.DataFrame,
    out: str | os.PathLike,
    *,
    shard_subjects: int = 10_000,
    codes: pd.DataFrame | None = None,
    dataset: dict | None = None,
    subject_splits: pd.DataFrame | None = None,
    overwrite: bool = False,
) -> Path:
    """Write canonical events as a MEDS directory, atomically.

    The directory is assembled beside ``out`` and renamed into place, so a failure leaves
    nothing behind; an existing non-empty ``out`` is an error unless ``overwrite``.
    """
    with meds_directory(out, overwrite=overwrite, dataset=dataset) as tmp:
        for i, shard in enumerate(_shards(events, shard_subjects)):
            write_shard(tmp, i, shard)
        if codes is not None:
            pq.write_table(pa.Table.from_pandas(codes, preserve_index=False),
                           tmp / "metadata" / "codes.parquet")
        if subject_splits is not None:
            pq.write_table(pa.Table.from_pandas(subject_splits, preserve_index=False),
                           tmp / "metadata" / "subject_splits.parquet")
    return Path(out)


def write_shard(directory: Path, index: int, events: pd.DataFrame) -> None:
    """One data shard of a MEDS directory being written (canonical events)."""
    pq.write_table(events_to_table(events), directory / "data" / f"{index}.parquet",
                   compression="zstd")


@contextlib.contextmanager
def meds_directory(out: str | os.PathLike, *, overwrite: bool = False,
                   dataset: dict | None = None) -> Iterator[Path]:
    """A MEDS directory written in pieces (``data/``, ``metadata/``) and renamed into
    place at the end, so a failure leaves nothing behind."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "data").mkdir()
        (tmp / "metadata").mkdir()
        yield tmp
        meta = {"dataset_name": out.name, "meds_version": "0.3.3", "etl_name": "twincast"}
        meta.update(dataset or {})
        (tmp / "metadata" / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def subject_bounds(subject_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique subjects of a sorted id array with each one's [start, end) row range."""
    if subject_ids.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    change = np.flatnonzero(np.diff(subject_ids)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [subject_ids.size]))
    return subject_ids[starts], starts, ends


def select_subjects(events: pd.DataFrame, subject_ids: Sequence[int]) -> pd.DataFrame:
    """The rows of the given subjects (canonical order is kept)."""
    return events[events["subject_id"].isin(np.asarray(subject_ids))]


NAT_US = np.iinfo(np.int64).min


@dataclass(frozen=True)
class EventArrays:
    """Canonical events as plain arrays for the vectorised core.

    ``time_us`` is int64 microseconds with ``NAT_US`` for static facts; ``code`` indexes
    ``categories``; ``value`` is float64 with NaN where there is no numeric value.
    """

    subject_id: np.ndarray
    time_us: np.ndarray
    code: np.ndarray
    categories: tuple[str, ...]
    value: np.ndarray

    @classmethod
    def from_events(cls, events: pd.DataFrame) -> EventArrays:
        codes = events["code"]
        if not isinstance(codes.dtype, pd.CategoricalDtype):
            codes = codes.astype("category")
        return cls(
            subject_id=events["subject_id"].to_numpy(dtype=np.int64),
            time_us=events["time"].to_numpy().astype("datetime64[us]").view(np.int64),
            code=codes.cat.codes.to_numpy().astype(np.int32),
            categories=tuple(str(c) for c in codes.cat.categories),
            value=events["numeric_value"].to_numpy(dtype=np.float64),
        )

    def __len__(self) -> int:
        return int(self.subject_id.size)

    def code_mask(self, wanted) -> np.ndarray:
        """Rows whose code satisfies ``wanted(code) -> bool`` (evaluated once per code)."""
        hit = np.fromiter((bool(wanted(c)) for c in self.categories), dtype=bool,
                          count=len(self.categories))
        return hit[self.code] if hit.size else np.zeros(len(self), dtype=bool)


def shortest_f32(values) -> list[float | None]:
    """Values held as 32-bit floats (MEDS's type) as the Python floats of their shortest
    decimals — what a person wrote, and what reads back to the same float32: 5.3, not
    5.300000190734863.  NaN becomes None.

    >>> shortest_f32(np.array([5.3, 88.1, np.nan], dtype=np.float32))
    [5.3, 88.1, None]
    """
    a = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))
    return orjson.loads(orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY))

