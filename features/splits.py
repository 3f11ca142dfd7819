"""Subject-level splits that stay put as data grows.

A subject's split is a function of a salted hash of its id alone, so adding subjects or
events never moves anyone from train into held-out.  A MEDS dataset's own split, when it
has one, wins.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from features.task import SplitSettings

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def subject_hash_unit(subject_ids: np.ndarray, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per subject id, fixed by ``salt``.

    >>> u = subject_hash_unit(np.array([1, 2, 3]), "twincast")
    >>> bool(((u >= 0) & (u < 1)).all())
    True
    """
    salt_key = np.uint64(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little"))
    h = _splitmix64(np.asarray(subject_ids, dtype=np.int64).view(np.uint64) ^ salt_key)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign_splits(
    subject_ids: np.ndarray, settings: SplitSettings, known: pd.Series | None = None
) -> np.ndarray:
    """Split name (``train``/``tuning``/``held_out``) per subject id.

    ``known`` (subject_id → split from the dataset) is used where it has the subject; a
    subject it lacks falls back to the hash so that new subjects still get a stable home.
    """
    ids = np.asarray(subject_ids, dtype=np.int64)
    u = subject_hash_unit(ids, settings.salt)
    out = np.where(
        u < settings.train, "train",
        np.where(u < settings.train + settings.tuning, "tuning", "held_out"),
    ).astype(object)
    if known is not None and settings.use_dataset_split and len(known):
        known = known[~known.index.duplicated()]
        mapped = known.reindex(ids).to_numpy(dtype=object)
        have = pd.notna(mapped)
        out[have] = mapped[have]
    return out
