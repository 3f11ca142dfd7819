"""Play a MEDS cohort through the one write path in time order, under a simulated clock.

Monitoring judges forecasts by what happened *after* they were made, so its tests and
demos need a store whose forecasts were made as a deployed service makes them: each
twin's events arrive in the order they happened, and each arrival is forecast at once.
Playback does exactly that, with the real :class:`~serving.writes.TwinWriter`: the
cohort's timeline is cut into steps (a week by default); at the end of each step (plus
a reporting delay) every twin with events in it receives them, as one batch, and is
forecast at its latest event — so each forecast's ``created_at`` is the simulated "now"
and its events' ``recorded_at`` the time they arrived.  A patient's static facts and
birth arrive with their first visit.

    twincast twins replay --meds DIR [--step-days 7] [--delay-hours 24]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from features.events import BIRTH_CODE, NAT_US
from serving.served import ModelHolder
from serving.store import Store
from serving.store.twins import EventRow
from serving.writes import Caller, TwinInput, TwinWriter

PLAYBACK_CALLER = Caller("system:playback")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC).replace(tzinfo=None)  # naive UTC, as stored
MAX_TWINS_PER_WRITE = 500


@dataclass
class PlaybackResult:
    steps: int
    writes: int
    events: int
    twins: int
    first: datetime | None
    last: datetime | None


class _Clock:
    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> datetime:
        return self.now


def play(store: Store, models: ModelHolder, events: pd.DataFrame, *, step_days: float = 7,
         delay_hours: float = 24, progress: Callable[[int], None] | None = None
         ) -> PlaybackResult:
    """Feed ``events`` (canonical MEDS rows) step by step; returns what was written.
    ``progress`` is called with the number of steps done after each step."""
    if events.empty:
        return PlaybackResult(0, 0, 0, 0, None, None)
    clock = _Clock()
    writer = TwinWriter(store, models, clock=clock)
    sid = events["subject_id"].to_numpy(np.int64)
    t = events["time"].to_numpy("datetime64[us]").view(np.int64)
    timed = t != NAT_US
    visit = timed & (events["code"].to_numpy(object) != BIRTH_CODE)
    # each subject's first visit: static facts, birth and anything earlier arrive then
    first = pd.Series(np.where(visit, t, np.iinfo(np.int64).max)).groupby(sid).transform("min")
    first = first.to_numpy(np.int64)
    when = np.where(visit, np.maximum(t, first), first)
    keep = when != np.iinfo(np.int64).max  # a subject with no visit never arrives
    step_us = int(step_days * 86_400e6)
    t0 = int(when[keep].min())
    bucket = np.full(sid.size, -1, dtype=np.int64)
    bucket[keep] = (when[keep] - t0) // step_us
    frame = events.assign(_bucket=bucket)[keep]
    delay = timedelta(hours=delay_hours)
    start = EPOCH + timedelta(microseconds=t0)
    writes = n_events = steps = 0
    for b, part in frame.groupby("_bucket", sort=True):
        clock.now = start + timedelta(microseconds=(int(b) + 1) * step_us) + delay
        inputs = [TwinInput(int(s), events=_rows(g)) for s, g in part.groupby("subject_id")]
        for i in range(0, len(inputs), MAX_TWINS_PER_WRITE):
            writer.write(inputs[i:i + MAX_TWINS_PER_WRITE], PLAYBACK_CALLER, None,
                         source="playback")
            writes += 1
        n_events += len(part)
        steps += 1
        if progress is not None:
            progress(steps)
    return PlaybackResult(steps, writes, n_events, int(np.unique(sid[keep]).size), start,
                          clock.now)


def steps_of(events: pd.DataFrame, step_days: float = 7) -> int:
    """How many steps :func:`play` will take (for a progress bar)."""
    t = events["time"].dropna()
    if t.empty:
        return 0
    return int((t.max() - t.min()) / pd.Timedelta(days=step_days)) + 1


def _rows(g: pd.DataFrame) -> list[EventRow]:
    times = g["time"].to_numpy("datetime64[us]")
    values = g["numeric_value"].to_numpy(np.float64)
    texts = g["text_value"].tolist() if "text_value" in g else [None] * len(g)
    out = []
    for tm, code, v, txt in zip(times, g["code"].tolist(), values, texts, strict=True):
        out.append(EventRow(None if np.isnat(tm) else tm.astype(datetime), code,
                            None if np.isnan(v) else float(v),
                            txt if isinstance(txt, str) else None))
    return out
