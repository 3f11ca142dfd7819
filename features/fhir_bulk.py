"""FHIR Bulk Data (``$export``) NDJSON to MEDS, streamed with bounded memory.

An export is NDJSON files per resource type (``Patient.ndjson``, ``Observation.ndjson``,
``Observation.2.ndjson`` …, optionally gzipped).  Files holding Patients and Medications
are read first, so references across files resolve (``Patient/<id>``); then every other
file is read line by line, each resource converted on its own and its events appended
to one of K spill files by subject.  A spill file then holds whole subjects: it is read
back alone, each resource's latest line kept (a later line with the same id replaces an
earlier one, an entered-in-error line takes it back), replayed values dropped, and
written as one MEDS shard.  Memory is bounded by the patient index and one spill file,
never by the size of the export.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.events import events_from_frame, meds_directory, write_shard
from features.fhir import (
    Converter,
    FhirError,
    FhirImport,
    FhirMapping,
    local_reference,
    subject_reference,
)

SPILL_BYTES = 512 * 2**20  # export bytes per spill file (one MEDS shard each)
SPILL_ROWS = 100_000  # rows buffered per spill file before a row group is written
SPILL_SCHEMA = pa.schema([
    ("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
    ("numeric_value", pa.float64()), ("text_value", pa.string()),
    ("event_id", pa.string()), ("updated", pa.int64()), ("occurrence", pa.int64()),
    ("retract", pa.bool_()), ("resource_type", pa.string())])
FIRST = ("Patient", "Medication")


class TooManyLines(FhirError):
    def __init__(self, limit: int):
        super().__init__(f"more than {limit} resources in one body")
        self.limit = limit


def _natural(path: Path) -> list:
    """``Observation.2.ndjson`` before ``Observation.10.ndjson``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def export_files(paths: Sequence[str | Path]) -> list[Path]:
    """The NDJSON files of an export: directories are searched for ``*.ndjson`` and
    ``*.ndjson.gz`` (in natural order of their names); files are taken as given."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted([*p.glob("*.ndjson"), *p.glob("*.ndjson.gz")], key=_natural)
            if not found:
                raise FhirError(f"{p}: no .ndjson files (a FHIR Bulk Data export)")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FhirError(f"{p}: no such file or directory")
    return files


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(
        path, encoding="utf-8")


def read_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, resource) of an NDJSON file; blank lines are allowed."""
    decode = json.JSONDecoder().decode
    with _open(path) as fh:
        for n, line in enumerate(fh, start=1):
            if line.isspace():
                continue
            try:
                res = decode(line)
            except (ValueError, RecursionError):
                raise FhirError("not JSON", where=f"{path.name} line {n}") from None
            if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                raise FhirError("expected a FHIR resource (an object with resourceType)",
                                where=f"{path.name} line {n}", element="resourceType")
            yield n, res


def _first_type(path: Path) -> str | None:
    for _, res in read_lines(path):
        return res["resourceType"]
    return None


@dataclass
class BulkImport:
    """An export's patients (key → subject id), identifiers and its mapping report."""

    subject_of: dict[str, int] = field(default_factory=dict)
    identifiers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    report: FhirImport = field(default_factory=FhirImport)
    kept: Counter = field(default_factory=Counter)  # events kept per resource type
    codes: set[str] = field(default_factory=set)
    events: int = 0
    shards: int = 0


class _Spill:
    """K parquet spill files, events routed by subject id."""

    def __init__(self, directory: Path, k: int):
        self.paths = [directory / f"spill-{i}.parquet" for i in range(k)]
        self.buffers: list[list[tuple]] = [[] for _ in range(k)]
        self.writers: list[pq.ParquetWriter | None] = [None] * k

    def add(self, row: tuple) -> None:
        i = row[0] % len(self.paths)
        self.buffers[i].append(row)
        if len(self.buffers[i]) >= SPILL_ROWS:
            self.flush(i)

    def flush(self, i: int) -> None:
        rows = self.buffers[i]
        if not rows:
            return
        cols = list(zip(*rows, strict=True))
        table = pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(cols, SPILL_SCHEMA, strict=True)],
            schema=SPILL_SCHEMA)
        if self.writers[i] is None:
            self.writers[i] = pq.ParquetWriter(self.paths[i], SPILL_SCHEMA)
        self.writers[i].write_table(table)
        self.buffers[i] = []

    def close(self) -> None:
        for i in range(len(self.paths)):
            self.flush(i)
            if self.writers[i] is not None:
                self.writers[i].close()


def ndjson_to_meds(paths: Sequence[str | Path], out: str | Path, *,
                   mapping: FhirMapping | None = None, first_id: int = 1,
                   overwrite: bool = False,
                   progress: Callable[[int], None] | None = None) -> BulkImport:
    """Convert a Bulk Data export to a MEDS directory (atomically); patients get subject
    ids in order of appearance.  ``progress`` is called with bytes read."""
    mapping = mapping or FhirMapping.default()
    files = export_files(paths)
    kinds = {f: _first_type(f) for f in files}
    order = sorted(files, key=lambda f: (kinds[f] not in FIRST, FIRST.index(kinds[f])
                                         if kinds[f] in FIRST else 0))
    result = BulkImport()
    out_imp = result.report
    conv = Converter(mapping, out_imp)
    refs: dict[str, str] = {}
    k = max(1, math.ceil(sum(f.stat().st_size for f in files) / SPILL_BYTES))
    occurrence = 0
    with meds_directory(out, overwrite=overwrite,
                        dataset={"source": "FHIR Bulk Data NDJSON"}) as tmp:
        spill = _Spill(tmp, k)

        def drain() -> None:
            for e in out_imp.events:
                sid = result.subject_of.get(e.patient)
                spill.add((sid, e.time, e.code, e.numeric_value, e.text_value, e.event_id,
                           e.version[0], e.version[1], e.retract,
                           e.source.split("/", 1)[0]))
            out_imp.events.clear()

        try:
            for path in order:
                first_pass = kinds[path] in FIRST
                name = path.name
                for n, res in read_lines(path):
                    kind = res["resourceType"]
                    conv.entry, conv.where = None, f"{name} line {n}"
                    occurrence += 1
                    rid = f"{kind}/{res.get('id') or f'{name}:{n}'}"
                    if kind in FIRST and not first_pass:
                        raise conv.fail(f"{kind} resources must come in their own files "
                                        f"(the $export layout), before the others",
                                        "resourceType")
                    if kind == "Patient":
                        rec = conv.patient(res)
                        if rec.key not in result.subject_of:
                            result.subject_of[rec.key] = first_id + len(result.subject_of)
                            result.identifiers[rec.key] = rec.identifiers
                        if isinstance(res.get("id"), str):
                            refs[f"Patient/{res['id']}"] = rec.key
                        start = len(out_imp.events)
                        conv.patient_events(res, rec.key, rid)
                        conv.stamp(res, start, occurrence)
                    elif kind == "Medication":
                        if isinstance(res.get("id"), str):  # its code is all we need
                            conv.medications[f"Medication/{res['id']}"] = {
                                "code": res.get("code")}
                    elif kind in ("Observation", "Condition", "MedicationRequest",
                                  "MedicationStatement"):
                        ref = subject_reference(res, conv)
                        patient = refs.get(ref) or refs.get(local_reference(ref))
                        if patient is None:
                            raise conv.fail("subject refers to a Patient that is not in "
                                            "the export", "subject.reference")
                        conv.resource(res, patient, rid, occurrence)
                    else:
                        out_imp.skipped[kind] += 1
                    drain()
                if progress is not None:
                    progress(path.stat().st_size)
            spill.close()
            for p in spill.paths:
                if not p.exists():
                    continue
                shard = _resolve(pq.read_table(p).to_pandas(), result)
                p.unlink()
                if len(shard):
                    write_shard(tmp, result.shards, shard)
                    result.shards += 1
            units = mapping.units()
            codes = pd.DataFrame({"code": sorted(result.codes)})
            codes["unit"] = codes["code"].map(units)
            pq.write_table(pa.Table.from_pandas(codes, preserve_index=False),
                           tmp / "metadata" / "codes.parquet")
            pq.write_table(pa.Table.from_pandas(identifier_frame(result),
                                                preserve_index=False),
                           tmp / "metadata" / "fhir_identifiers.parquet")
        finally:
            for w in spill.writers:
                if w is not None:
                    w.close()
    return result


def _resolve(df: pd.DataFrame, result: BulkImport) -> pd.DataFrame:
    """One spill file's events: each resource's latest occurrence (dropped when that is a
    retraction), replayed values once, canonical order."""
    # a resource without an id is its own family (it can be neither replaced nor retracted)
    family = df["event_id"].str.split("#", n=1).str[0].fillna(
        "#" + df["occurrence"].astype(str))
    keys = [df["subject_id"], family]
    newest = df.groupby(keys)["updated"].transform("max")  # meta.lastUpdated first
    df, family = df[df["updated"] == newest], family[df["updated"] == newest]
    latest = df.groupby([df["subject_id"], family])["occurrence"].transform("max")
    df = df[(df["occurrence"] == latest) & ~df["retract"]]
    df = df.drop_duplicates(["subject_id", "time", "code", "numeric_value", "text_value"])
    result.kept.update(df["resource_type"].value_counts().to_dict())
    result.codes.update(df["code"].unique().tolist())
    result.events += len(df)
    frame = pd.DataFrame({
        "subject_id": df["subject_id"].to_numpy(np.int64),
        "time": df["time"].astype("datetime64[us]"),
        "code": df["code"].astype(str),
        "numeric_value": df["numeric_value"].astype(np.float32),
        "text_value": df["text_value"].astype(object),
    })
    return events_from_frame(frame, source="FHIR export")


def identifier_frame(result: BulkImport) -> pd.DataFrame:
    return pd.DataFrame({"identifier": list(result.subject_of),
                         "subject_id": list(result.subject_of.values())})


def lines_to_bundle(raw: bytes | str, max_entries: int) -> dict[str, Any]:
    """NDJSON lines (any resource types, Patients included) as one collection Bundle —
    the service's way to take the same lines; each entry keeps its line number.  Lines
    end at ``\n`` only (U+2028 and its kind are valid inside JSON strings); a leading
    byte-order mark is dropped.  Raises :class:`TooManyLines` past ``max_entries``."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    entries = []
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        if len(entries) == max_entries:
            raise TooManyLines(max_entries)
        try:
            res = json.loads(line)
        except (ValueError, RecursionError):
            raise FhirError("not JSON", where=f"line {n}") from None
        entries.append({"resource": res, "line": n})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}
