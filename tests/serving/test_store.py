"""The twin store's pure pieces."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.store.twins import History, forecast_digest, idempotency_key


def test_latest_value_is_by_time_then_arrival_not_by_arrival_alone():
    t = [datetime(2021, 5, 1), datetime(2020, 1, 1), datetime(2021, 5, 1), None,  # noqa: DTZ001
         datetime(2019, 1, 1)]  # noqa: DTZ001
    rec = datetime(2021, 6, 1)  # noqa: DTZ001
    rows = [(1, t[0], "LAB//A", 40.0, None, 1, rec), (1, t[1], "LAB//A", 10.0, None, 2, rec),
            (1, t[2], "LAB//B", 1.0, None, 3, rec), (1, t[3], "GENDER//F", None, None, 4, rec),
            (2, t[4], "LAB//A", 7.0, None, 5, rec)]  # the 2020 value arrived last: a backfill
    got = History.from_rows(rows).latest
    one = {v["code"]: v["numeric_value"] for v in got[1]}
    assert one == {"GENDER//F": None, "LAB//A": 40.0, "LAB//B": 1.0}
    assert [v["numeric_value"] for v in got[2]] == [7.0]
    assert History.from_rows([]).latest == {}


@settings(max_examples=300, deadline=None)
@given(sid=st.integers(0, 2**53), t=st.none() | st.datetimes(),
       code=st.text(max_size=30), value=st.none() | st.floats(allow_nan=False, width=32),
       text=st.none() | st.text(max_size=30))
def test_idempotency_keys_keep_the_stored_format(sid, t, code, value, text):
    """Keys stored before must match re-sent events: the hash of this exact JSON."""
    raw = json.dumps([sid, t.isoformat() if t else None, code,
                      None if value is None else repr(float(value)), text])
    assert idempotency_key(sid, t, code, value, text, None) == \
        "h:" + hashlib.sha256(raw.encode()).hexdigest()


def test_idempotency_keys_and_forecast_digests_see_every_field():
    t = datetime(2021, 1, 1, 10)  # noqa: DTZ001 - naive UTC, as stored
    base = idempotency_key(1, t, "LAB//A", 1.0, None, None)
    assert base == idempotency_key(1, t, "LAB//A", 1.0, None, None)
    assert len({base, idempotency_key(2, t, "LAB//A", 1.0, None, None),
                idempotency_key(1, t, "LAB//B", 1.0, None, None),
                idempotency_key(1, t, "LAB//A", 1.5, None, None)}) == 4
    assert idempotency_key(1, t, "LAB//A", 1.0, None, "ev-7") == "id:ev-7"
    row = {"forecast_id": "f", "subject_id": 1, "as_of": t, "risks": {"365d": 0.1}}
    assert forecast_digest(row) != forecast_digest({**row, "risks": {"365d": 0.2}})
    assert forecast_digest(row) != forecast_digest({**row, "requested_by": "someone"})


_TIMES = [None, datetime(2020, 1, 1), datetime(2020, 1, 1, 0, 0, 1),  # noqa: DTZ001
          datetime(2021, 6, 1), datetime(2022, 3, 4, 5, 6, 7, 8)]  # noqa: DTZ001
_event = st.tuples(st.sampled_from(_TIMES), st.sampled_from(["LAB//A", "LAB//B", "SEX//F"]),
                   st.none() | st.sampled_from([1.0, 2.5, -3.0, 88.1, 1e-7]),
                   st.none() | st.sampled_from(["x", "yz"]))


@settings(max_examples=400, deadline=None)
@given(stored=st.lists(_event, min_size=1, max_size=12),
       new=st.lists(_event, min_size=1, max_size=3))
def test_a_history_with_events_added_is_the_history_built_from_all_of_them(stored, new):
    """A write's history taken from the cached one plus the new events (the one-event
    write's shortcut) is exactly what the store's rows would give: canonical arrays
    (order, codes, float32 values), each code's latest value, watermark, last time and
    count — or None when it cannot be (a code the twin has not had), never something
    else."""
    from serving.store.twins import EventColumns

    rec = datetime(2023, 1, 1)  # noqa: DTZ001
    rows = [(7, t, c, v, x, i, rec) for i, (t, c, v, x) in enumerate(stored)]
    later = datetime(2023, 2, 1)  # noqa: DTZ001
    more = [(7, t, c, v, x, len(rows) + i, later) for i, (t, c, v, x) in enumerate(new)]
    got = History.from_rows(rows).appended(EventColumns.from_rows(more))
    if got is None:
        assert {c for _, c, _, _ in new} - {c for _, c, _, _ in stored}
        return
    want = History.from_rows(rows + more)
    assert got.arrays.categories == want.arrays.categories
    for name in ("subject_id", "time_us", "code"):
        assert getattr(got.arrays, name).tolist() == getattr(want.arrays, name).tolist()
    assert got.arrays.code.dtype == want.arrays.code.dtype
    assert np.array_equal(got.arrays.value, want.arrays.value, equal_nan=True)
    assert got.latest == want.latest
    assert (got.watermark, got.last_time, got.count) == \
        (want.watermark, want.last_time, want.count)
