"""The twin store's pure pieces."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

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
