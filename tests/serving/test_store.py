"""The twin store's pure pieces."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

from serving.store.repo import forecast_digest, idempotency_key, latest_values_of


def test_latest_value_is_by_time_then_arrival_not_by_arrival_alone():
    frame = pd.DataFrame({
        "subject_id": np.array([1, 1, 1, 1, 2], dtype=np.int64),
        "time": pd.to_datetime(["2021-05-01", "2020-01-01", "2021-05-01", None,
                                "2019-01-01"]).astype("datetime64[us]"),
        "code": ["LAB//A", "LAB//A", "LAB//B", "GENDER//F", "LAB//A"],
        "numeric_value": [40.0, 10.0, 1.0, np.nan, 7.0],
        "text_value": [None] * 5,
        "recorded_at": pd.to_datetime(["2021-06-01"] * 5),
        "id": [1, 2, 3, 4, 5],  # the 2020 value arrived last (a late backfill)
    })
    got = latest_values_of(frame)
    one = {v["code"]: v["numeric_value"] for v in got[1]}
    assert one == {"GENDER//F": None, "LAB//A": 40.0, "LAB//B": 1.0}
    assert [v["numeric_value"] for v in got[2]] == [7.0]
    assert latest_values_of(frame.iloc[:0]) == {}


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
