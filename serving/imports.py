"""Loading MEDS histories into the twin store in bulk (``twincast twins import``).

Events are appended idempotently through the store's own event path; the touched twins
are marked stale (no forecast version), so the service's refresh forecasts them with the
served model.  One transaction: an import lands whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from sqlalchemy import bindparam, func, select, update

from serving.errors import BadInput
from serving.store import Store
from serving.store.ids import CLIENT_ID_MAX
from serving.store.models import Event, Twin
from serving.store.twins import FLOAT32_MAX, EventRow, utcnow

CHUNK_SUBJECTS = 2_000


def import_events(store: Store, events: pd.DataFrame, *, source: str = "import",
                  progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Append canonical MEDS events to twins (created as needed); returns (twins touched,
    events added)."""
    if events.empty:
        return 0, 0
    sids = events["subject_id"].to_numpy(np.int64)
    values = events["numeric_value"].to_numpy(np.float64)
    finite = np.isnan(values) | (np.abs(values) <= FLOAT32_MAX)
    if not finite.all():
        raise BadInput(f"subject_id {int(sids[~finite][0])}: a numeric value is not finite "
                       "or outside the float32 range", ["numeric_value"])
    bad = (sids < 0) | (sids > CLIENT_ID_MAX)
    if bad.any():
        raise BadInput(f"subject_id {int(sids[bad][0])} is outside 0 to 2**52 - 1 (ids from "
                       "2**52 up are assigned by the store)", ["subject_id"])
    times = events["time"].to_numpy()
    codes = events["code"].astype(str).to_numpy(dtype=object)
    texts = events["text_value"].to_numpy(dtype=object)
    order = np.argsort(sids, kind="stable")
    uniq, starts = np.unique(sids[order], return_index=True)
    ends = np.r_[starts[1:], order.size]
    added = 0

    def work(s) -> int:
        n_added = 0
        for lo in range(0, uniq.size, CHUNK_SUBJECTS):
            chunk = {}
            for k in range(lo, min(lo + CHUNK_SUBJECTS, uniq.size)):
                rows = order[starts[k]:ends[k]]
                chunk[int(uniq[k])] = [EventRow(
                    None if np.isnat(times[i]) else pd.Timestamp(times[i]).to_pydatetime(),
                    codes[i], None if np.isnan(values[i]) else float(values[i]),
                    texts[i] if isinstance(texts[i], str) else None) for i in rows]
            store.twins.lock(s, list(chunk), create=True)
            counts = store.twins.append_events(s, chunk, source=source, now=utcnow())
            n_added += sum(c.added for c in counts.values())
            _recount(s, list(chunk))
            if progress is not None:
                progress(len(chunk))
        return n_added

    added = store.db.transact(work)
    store.db.analyze()
    return int(uniq.size), added


def _recount(s, ids: list[int]) -> None:
    """Counters from the live events; no forecast version, so the refresh picks them."""
    got = s.execute(select(Event.subject_id, func.count(), func.max(Event.time))
                    .where(Event.subject_id.in_(ids), Event.superseded_at.is_(None))
                    .group_by(Event.subject_id)).all()
    stmt = (update(Twin.__table__).where(Twin.__table__.c.subject_id == bindparam("sid"))
            .values(event_count=bindparam("n"), last_event_time=bindparam("t"),
                    model_version=None, model_name=None, updated_at=bindparam("now")))
    now = utcnow()
    s.connection().execute(stmt, [{"sid": r[0], "n": r[1], "t": r[2], "now": now}
                                  for r in got])
