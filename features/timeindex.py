"""Exact (subject, time) keys for vectorised point-in-time look-ups.

Events and queries are both sorted by subject then time.  Each event time is replaced by
its rank among the distinct event times, so a (subject, time) pair becomes one int64
``subject_index * M + rank`` that sorts exactly like the pair, and "the events of subject
*s* with time <= *t*" is a single ``np.searchsorted``.  No rounding, no Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

US_PER_DAY = 86_400_000_000
DAYS_PER_YEAR = 365.25


@dataclass(frozen=True)
class TimeIndex:
    """Ranks over a set of event times (int64 microseconds, no NaT)."""

    times: np.ndarray  # sorted distinct event times

    @classmethod
    def build(cls, event_times_us: np.ndarray) -> TimeIndex:
        return cls(sorted_unique(event_times_us))

    @classmethod
    def build_with_keys(
        cls, subject_index: np.ndarray, times_us: np.ndarray
    ) -> tuple[TimeIndex, np.ndarray]:
        """The index of ``times_us`` and the event keys of those same events.

        One radix argsort gives both (no binary search per event).
        """
        order = np.argsort(times_us, kind="stable")
        s = times_us[order]
        new = np.empty(s.size, dtype=bool)
        if s.size:
            new[0] = True
            np.not_equal(s[1:], s[:-1], out=new[1:])
        rank = np.empty(s.size, dtype=np.int64)
        rank[order] = np.cumsum(new)
        index = cls(s[new])
        return index, subject_index.astype(np.int64) * index.modulus + rank

    @property
    def modulus(self) -> int:
        return int(self.times.size) + 1

    def event_keys(self, subject_index: np.ndarray, times_us: np.ndarray) -> np.ndarray:
        """Keys of events; every event time must be in the index."""
        rank = np.searchsorted(self.times, times_us, side="left") + 1
        return subject_index.astype(np.int64) * self.modulus + rank

    def upto_keys(self, subject_index: np.ndarray, times_us: np.ndarray) -> np.ndarray:
        """Query keys: an event key is <= this key iff same subject and time <= t."""
        rank = np.searchsorted(self.times, times_us, side="right")
        return subject_index.astype(np.int64) * self.modulus + rank


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` for int64 through a radix sort (several times faster here)."""
    s = np.sort(values, kind="stable")
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
