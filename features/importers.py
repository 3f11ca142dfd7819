"""Importers: long CSV files and wide per-visit tables into MEDS events.

Errors name the file, the line (CSV) or row, the subject and the column; no value from
the file is echoed.  Times without an offset are taken as UTC; times with one are
converted to UTC.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from features.errors import DataValidationError
from features.events import EVENT_COLUMNS, table_to_events, validate_table

_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
               "-infinity"}


def _read_csv_as_text(path: Path) -> pd.DataFrame:
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                strings_can_be_null=True, null_values=[""], column_types=None,
                auto_dict_encode=False,
            ),
            read_options=pacsv.ReadOptions(autogenerate_column_names=False),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        msg = str(exc).split("\n")[0]
        raise DataValidationError(f"cannot be read as CSV ({msg.split(':')[0]})",
                                  source=str(path)) from None
    cols = {name: table.column(name).cast(pa.string()) for name in table.column_names}
    return pd.DataFrame({k: v.to_pandas() for k, v in cols.items()})


def _first_bad(bad: np.ndarray, message: str, *, path: Path, column: str,
               subject_ids: np.ndarray | None, line_offset: int) -> None:
    idx = np.flatnonzero(bad)
    if idx.size:
        row = int(idx[0])
        sid = None
        if subject_ids is not None and not np.isnan(subject_ids[row]):
            sid = int(subject_ids[row])
        raise DataValidationError(message, source=str(path), row=row, line=row + line_offset,
                                  column=column, subject_id=sid, count=idx.size)


def parse_subject_ids(text: pd.Series, *, path: Path, column: str, line_offset: int) -> np.ndarray:
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = text.notna().to_numpy() & (np.isnan(values) | (values != np.round(values)))
    _first_bad(bad, "not an integer subject id", path=path, column=column, subject_ids=None,
               line_offset=line_offset)
    _first_bad(text.isna().to_numpy(), "missing subject id", path=path, column=column,
               subject_ids=None, line_offset=line_offset)
    return values


def parse_times(text: pd.Series, *, path: Path, column: str, subject_ids: np.ndarray,
                line_offset: int) -> np.ndarray:
    """ISO 8601 text to naive-UTC datetime64[us] (NaT where the cell is empty)."""
    parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
    bad = text.notna().to_numpy() & parsed.isna().to_numpy()
    _first_bad(bad, "unparseable time (expected ISO 8601, e.g. 2021-03-04T10:00:00)",
               path=path, column=column, subject_ids=subject_ids, line_offset=line_offset)
    return parsed.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy().astype("datetime64[us]")


def parse_numbers(text: pd.Series, *, path: Path, column: str, subject_ids: np.ndarray,
                  line_offset: int) -> np.ndarray:
    lowered = text.str.strip().str.lower()
    nonfinite = lowered.isin(_NON_FINITE).to_numpy()
    _first_bad(nonfinite, "non-finite number (NaN or infinity); leave the cell empty instead",
               path=path, column=column, subject_ids=subject_ids, line_offset=line_offset)
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = text.notna().to_numpy() & np.isnan(values)
    _first_bad(bad, "not a number", path=path, column=column, subject_ids=subject_ids,
               line_offset=line_offset)
    return values


def import_long_csv(path: str | os.PathLike, *, now: np.datetime64 | None = None) -> pd.DataFrame:
    """Read ``subject_id,time,code,numeric_value[,text_value]`` rows into canonical events."""
    path = Path(path)
    raw = _read_csv_as_text(path)
    missing = [c for c in ("subject_id", "time", "code", "numeric_value") if c not in raw]
    if missing:
        raise DataValidationError(
            f"missing column(s) {missing}; expected header "
            "subject_id,time,code,numeric_value[,text_value]", source=str(path)
        )
    unknown = [c for c in raw if c not in EVENT_COLUMNS]
    if unknown:
        raise DataValidationError(f"unknown column(s) {unknown}; expected {list(EVENT_COLUMNS)}",
                                  source=str(path))
    line = 2  # header is line 1
    sid = parse_subject_ids(raw["subject_id"], path=path, column="subject_id", line_offset=line)
    time = parse_times(raw["time"], path=path, column="time", subject_ids=sid, line_offset=line)
    value = parse_numbers(raw["numeric_value"], path=path, column="numeric_value",
                          subject_ids=sid, line_offset=line)
    text = raw["text_value"] if "text_value" in raw else pd.Series([None] * len(raw))
    table = pa.table({
        "subject_id": pa.array(sid.astype(np.int64)),
        "time": pa.array(time, pa.timestamp("us")),
        "code": pa.array(raw["code"].to_numpy(dtype=object), pa.string(), from_pandas=True),
        "numeric_value": pa.array(value, pa.float64(), from_pandas=True),
        "text_value": pa.array(text.to_numpy(dtype=object), pa.string(), from_pandas=True),
    })
    return table_to_events(validate_table(table, source=str(path), now=now, line_offset=line))


# ----------------------------------------------------------------------------- wide tables


class WideColumn(BaseModel):
    """How one column of a wide table becomes events.

    ``numeric``: one event with the cell as ``numeric_value``; ``text``: the cell as
    ``text_value``; ``flag``: an event (no value) where the cell is 1/true/yes;
    ``prefix``: the event code is ``code`` + the cell (e.g. ``GENDER//`` + ``F``).
    ``static`` columns give one undated event per subject.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    kind: Literal["numeric", "text", "flag", "prefix"] = "numeric"
    static: bool = False
    unit: str | None = None


class WideMapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    subject_id: str = "subject_id"
    time: str = "time"
    columns: dict[str, WideColumn]

    @classmethod
    def load(cls, path: str | os.PathLike) -> WideMapping:
        data = yaml.safe_load(Path(path).read_text())
        if isinstance(data, dict) and isinstance(data.get("columns"), dict):
            data["columns"] = {k: {"code": v} if isinstance(v, str) else v
                               for k, v in data["columns"].items()}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise DataValidationError(f"mapping does not validate: {errs}",
                                      source=str(path)) from None

    def units(self) -> dict[str, str]:
        return {c.code: c.unit for c in self.columns.values() if c.unit}


_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}


def import_wide(
    path: str | os.PathLike, mapping: WideMapping, *, now: np.datetime64 | None = None
) -> pd.DataFrame:
    """Turn a wide per-visit table (CSV or parquet) into canonical events."""
    path = Path(path)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        raw = pd.DataFrame({c: frame[c].astype("string").astype(object)
                            .where(frame[c].notna(), None) for c in frame})
        line = None
    else:
        raw = _read_csv_as_text(path)
        line = 2
    offset = line if line is not None else 0
    needed = [mapping.subject_id, mapping.time, *mapping.columns]
    missing = [c for c in needed if c not in raw]
    if missing:
        raise DataValidationError(f"missing column(s) {missing} named in the mapping",
                                  source=str(path))
    sid = parse_subject_ids(raw[mapping.subject_id], path=path, column=mapping.subject_id,
                            line_offset=offset)
    time = parse_times(raw[mapping.time], path=path, column=mapping.time, subject_ids=sid,
                       line_offset=offset)
    _first_bad(np.isnat(time), "missing visit time", path=path, column=mapping.time,
               subject_ids=sid, line_offset=offset)
    parts = []
    for column, spec in mapping.columns.items():
        cell = raw[column]
        present = cell.notna().to_numpy().copy()
        value = np.full(len(raw), np.nan)
        code = np.full(len(raw), spec.code, dtype=object)
        text = np.full(len(raw), None, dtype=object)
        if spec.kind == "numeric":
            value = parse_numbers(cell, path=path, column=column, subject_ids=sid,
                                  line_offset=offset)
        elif spec.kind == "text":
            text = cell.to_numpy(dtype=object)
        elif spec.kind == "flag":
            low = cell.str.strip().str.lower()
            bad = present & ~low.isin(_TRUE | _FALSE).to_numpy()
            _first_bad(bad, "not a yes/no flag (expected 1/0, true/false, yes/no)", path=path,
                       column=column, subject_ids=sid, line_offset=offset)
            present &= low.isin(_TRUE).to_numpy()
        else:
            code = (spec.code + cell.fillna("").str.strip()).to_numpy(dtype=object)
        t = time.copy()
        if spec.static:
            t[:] = np.datetime64("NaT")
            first = np.zeros(len(raw), dtype=bool)
            order = np.flatnonzero(present)
            _, keep = np.unique(sid[order], return_index=True)
            first[order[keep]] = True
            present = first
        parts.append(pd.DataFrame({"subject_id": sid[present].astype(np.int64),
                                   "time": t[present], "code": code[present],
                                   "numeric_value": value[present],
                                   "text_value": text[present]}))
    frame = pd.concat(parts, ignore_index=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    return table_to_events(validate_table(table, source=str(path), now=now))
