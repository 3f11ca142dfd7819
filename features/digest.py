"""twincast's digest of a MEDS dataset: SHA-256 over every event in canonical order.

Each event becomes a fixed 36-byte record (subject id, time, a hash of the code, the
float32 value bits with one NaN for null, a hash of the text value) and the records are
hashed in canonical order across all shards, so the digest depends on the events alone:
not on how they are sharded, ordered in files, or compressed.  MLflow's own pandas
digest reads only the first 10,000 rows; this one reads all of them.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pandas as pd

from features.events import MedsDataset

_RECORD = np.dtype([("subject_id", "<i8"), ("time", "<i8"), ("code", "<u8"),
                    ("value", "<u4"), ("text", "<u8")])
_NAN_BITS = np.float32(np.nan).view(np.uint32)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _records(events: pd.DataFrame) -> bytes:
    codes = events["code"]
    if not isinstance(codes.dtype, pd.CategoricalDtype):
        codes = codes.astype("category")
    code_hash = np.array([_hash64(str(c)) for c in codes.cat.categories], dtype=np.uint64)
    rec = np.empty(len(events), dtype=_RECORD)
    rec["subject_id"] = events["subject_id"].to_numpy()
    rec["time"] = events["time"].to_numpy().astype("datetime64[us]").view(np.int64)
    rec["code"] = code_hash[codes.cat.codes.to_numpy()] if len(code_hash) else 0
    value = events["numeric_value"].to_numpy(dtype=np.float32)
    bits = value.view(np.uint32).copy()
    bits[np.isnan(value)] = _NAN_BITS
    rec["value"] = bits
    text = events["text_value"]
    has = text.notna().to_numpy()
    th = np.zeros(len(events), dtype=np.uint64)
    if has.any():
        th[has] = [_hash64(str(t)) for t in text[has]]
    rec["text"] = th
    return rec.tobytes()


def events_digest(events: pd.DataFrame) -> str:
    """Digest of canonical events held in memory."""
    return hashlib.sha256(_records(events)).hexdigest()


def dataset_digest(dataset: MedsDataset) -> str:
    """Digest of a whole dataset, streamed shard by shard when shards hold disjoint,
    ordered subject ranges (read whole otherwise)."""
    ranges = []
    for path in dataset.files:
        import pyarrow.parquet as pq

        ids = pq.read_table(path, columns=["subject_id"]).column(0).to_numpy()
        ranges.append((int(ids.min()) if ids.size else 0, int(ids.max()) if ids.size else -1,
                       path))
    ranges.sort(key=lambda r: r[:2])
    disjoint = all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    h = hashlib.sha256()
    if not disjoint:
        h.update(_records(dataset.read_all()))
        return h.hexdigest()
    for _, _, path in ranges:
        h.update(_records(dataset.read_file(path)))
    return h.hexdigest()
