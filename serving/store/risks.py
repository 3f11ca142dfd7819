"""Each twin's current risk per horizon, and the care team's alerts.

Every forecast a write stores also rewrites its twin's rows here, in the same
transaction (the twin is locked): the risk, the previous forecast's risk, when the
forecast's horizon ends, and the alert state.  A forecast that crosses its horizon's
threshold upward opens an alert — one open alert per twin and horizon — which re-arms
only once the risk has fallen below ``threshold - hysteresis``
(:class:`features.task.AlertPolicy`).  A crossing made by the all-twin refresh after a
new model version is stored as a ``review`` (queued for review, paging nobody), since
it says more about the model than about the patient.

A forecast whose horizon has ended (``as_of + horizon`` before now: a twin not seen
for years) is *expired*: it raises no alert, is left out of the risk ranking, and an
alert whose forecast has expired is no longer open.

Alerts and their acknowledgements are append-only; ``twin_risks`` is a projection, like
the twin's view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import serving.store.arrays as arrays
from serving.errors import Conflict, NotFound
from serving.store.models import AlertAck, TwinAlert, TwinRisk
from serving.store.twins import Twins

# what a twin's new forecast rewrites in its risk row at each horizon
RISK_UPDATES = ("risk", "previous_risk", "rise", "last_event_time", "as_of", "expires_at",
                "forecast_id", "model_version", "armed", "open_alert_id")
ALERT = "alert"    # a twin's new forecast crossed the threshold: for the care team
REVIEW = "review"  # the all-twin refresh did (a new model version): queued for review
SORTS = ("risk", "rise", "quiet")  # highest risk, risen most, longest without an event


@dataclass(frozen=True)
class Level:
    """A horizon's alert threshold and the fall below it that re-arms the alert."""

    threshold: float
    rearm: float  # threshold - hysteresis


def levels(task: Any) -> dict[int, Level]:
    """The served task's alert levels by horizon (days)."""
    hyst = task.alert_hysteresis
    return {h: Level(t.threshold, t.threshold - hyst)
            for h, t in task.alert_thresholds().items()}


class Risks:
    def __init__(self, twins: Twins):
        self.twins = twins
        self.sqlite = twins.sqlite
        r = TwinRisk.__table__.c
        a = TwinAlert.__table__.c
        ids = bindparam("ids", expanding=True)
        self._state = (select(r.subject_id, r.horizon_days, r.risk, r.armed, r.open_alert_id,
                              a.expires_at, r.model_version, r.as_of, r.expires_at)
                       .outerjoin(TwinAlert.__table__, a.id == r.open_alert_id)
                       .where(r.subject_id.in_(ids)))
        ins = (sqlite_insert if self.sqlite else pg_insert)(TwinRisk.__table__)
        self._upsert = ins.on_conflict_do_update(
            index_elements=["subject_id", "horizon_days"],
            set_={c: ins.excluded[c] for c in RISK_UPDATES})
        self._pg_upsert = arrays.insert_sql(  # the same, as one statement over arrays
            TwinRisk.__table__, ("subject_id", "horizon_days", *RISK_UPDATES),
            "ON CONFLICT (subject_id, horizon_days) DO UPDATE SET "
            + ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in RISK_UPDATES))
        self._add_alert = insert(TwinAlert.__table__).returning(
            a.id, sort_by_parameter_order=True)

    # ------------------------------------------------------------------ the write path
    def apply(self, s: Session, forecasts: list[dict[str, Any]], model_name: str,
              model_version: str, policy: Mapping[int, Level], now: datetime, *,
              refresh: bool, last_times: Mapping[int, datetime | None] | None = None,
              explicit: frozenset[int] | set[int] = frozenset()) -> list[dict[str, Any]]:
        """Rewrite the forecast twins' risk rows and open the alerts their forecasts
        raise.  The caller holds the twins' locks.  Returns the alerts opened.

        ``refresh``: the all-twin refresh (no new events); its crossings of twins whose
        previous forecast came from another model version are ``review`` items, which
        leave the slot armed (the twin's next own forecast above the line alerts, unless
        a reviewer marked it reviewed); so are those at a horizon the twin has no row for
        yet while it has rows from another version (a new version's new horizon).  A
        forecast at an ``explicit`` as-of time (twins named) earlier than the stored one
        changes nothing here; a twin's own latest-event forecast always does (its latest
        event may have been retracted)."""
        if not forecasts:
            return []
        conn = s.connection()
        state = {(row[0], row[1]): row for row in conn.execute(
            self._state, {"ids": sorted({f["subject_id"] for f in forecasts})})}
        by_twin: dict[int, list] = {}  # each twin's rows, every horizon
        for (sid, _), row in state.items():
            by_twin.setdefault(sid, []).append(row)
        last_times = last_times or {}
        upserts, alerts, slots = [], [], []
        for f in forecasts:
            sid, as_of = f["subject_id"], f["as_of"]
            risks = f["risks"] if f["status"] == "ok" else None
            # a not-eligible forecast clears the horizons the twin has rows for
            keys = risks or {f"{row[1]}d": None for row in by_twin.get(sid, ())}
            for key in keys:
                h = int(key.removesuffix("d"))
                prev = state.get((sid, h))
                if sid in explicit and prev is not None and prev[7] is not None \
                        and as_of is not None and as_of < prev[7]:
                    continue  # asked about an earlier time: not the current risk
                risk = risks[key] if risks else None
                armed, open_id = True, None
                if prev is not None:
                    armed, open_id = bool(prev[3]), prev[4]
                    if open_id is not None and (prev[5] is None or prev[5] <= now):
                        armed, open_id = True, None  # its window ended: lapsed, re-armed
                    if prev[8] is not None and prev[8] <= now:
                        armed = True  # back after an expired forecast
                same_version = prev is not None and prev[6] == model_version
                if prev is not None:
                    review = refresh and not same_version
                else:  # a new horizon of a new version, or a twin's first forecast
                    review = refresh and any(row[6] != model_version
                                             for row in by_twin.get(sid, ()))
                expires = as_of + timedelta(days=h) if as_of is not None else None
                level = policy.get(h)
                if level is not None and risk is not None and expires is not None \
                        and expires > now:
                    if risk >= level.threshold:
                        if armed and open_id is None:
                            slots.append((len(upserts), review))
                            alerts.append({
                                "created_at": now, "subject_id": sid, "horizon_days": h,
                                "kind": REVIEW if review else ALERT,
                                "forecast_id": f["forecast_id"], "risk": risk,
                                "previous_risk": None if prev is None else prev[2],
                                "threshold": level.threshold, "as_of": as_of,
                                "expires_at": expires, "model_name": model_name,
                                "model_version": model_version,
                                "previous_model_version": None if prev is None else prev[6]})
                        if not review:
                            armed = False
                    elif risk < level.rearm:
                        armed = True
                previous = None if prev is None else prev[2]
                upserts.append({
                    "subject_id": sid, "horizon_days": h, "risk": risk,
                    "previous_risk": previous,
                    # a rise across model versions is the model's, not the patient's
                    "rise": None if risk is None or previous is None or not same_version
                    else risk - previous,
                    "last_event_time": last_times.get(sid),
                    "as_of": as_of, "expires_at": expires, "forecast_id": f["forecast_id"],
                    "model_version": model_version, "armed": armed,
                    "open_alert_id": open_id})
        if alerts:
            new_ids = [row[0] for row in conn.execute(self._add_alert, alerts)]
            for (slot, review), alert, aid in zip(slots, alerts, new_ids, strict=True):
                if not review:  # a review is never an open alert
                    upserts[slot]["open_alert_id"] = aid
                alert["id"] = aid
        if upserts and not arrays.worth(upserts, sqlite=self.sqlite):
            conn.execute(self._upsert, upserts)
        elif upserts:  # one binary array per column
            arrays.distinct(upserts, "subject_id", "horizon_days")
            conn.exec_driver_sql(self._pg_upsert, arrays.arrays(
                TwinRisk.__table__, upserts, ("subject_id", "horizon_days", *RISK_UPDATES)))
        return alerts

    # ------------------------------------------------------------------ acknowledging
    def acknowledge(self, s: Session, alert_id: int, user_id: int | None, user_name: str,
                    reason: str, now: datetime, api_key_id: int | None = None
                    ) -> dict[str, Any]:
        """Record who acknowledged an alert (or reviewed a queued crossing), when and
        why — a person (``user_id``) or a key (``api_key_id``).  The twin's alert slot is
        free for its next crossing; a reviewed crossing disarms its slot while the risk
        stays above the threshold (the reviewer has seen it).  A second acknowledgement
        is a conflict."""
        reason = reason.strip()
        if not reason:
            raise ValueError("an acknowledgement needs a reason")
        alert = s.execute(select(TwinAlert).where(TwinAlert.id == alert_id)).scalar_one_or_none()
        if alert is None:
            raise NotFound(f"no alert {alert_id}")
        self.twins.lock(s, [alert.subject_id], create=False)  # as writes of the twin do
        if s.execute(select(AlertAck.alert_id).where(AlertAck.alert_id == alert_id)).first():
            raise Conflict(f"alert {alert_id} was acknowledged already")
        try:
            with s.begin_nested():
                s.execute(insert(AlertAck.__table__).values(
                    alert_id=alert_id, time=now, user_id=user_id, api_key_id=api_key_id,
                    user_name=user_name, reason=reason[:2000]))
        except IntegrityError:
            raise Conflict(f"alert {alert_id} was acknowledged already") from None
        r = TwinRisk.__table__.c
        slot = (r.subject_id == alert.subject_id, r.horizon_days == alert.horizon_days)
        if alert.kind == REVIEW:  # while the reviewed version's forecast stands
            s.execute(update(TwinRisk.__table__).where(
                *slot, r.risk >= alert.threshold, r.model_version == alert.model_version)
                .values(armed=False))
        else:
            s.execute(update(TwinRisk.__table__).where(*slot, r.open_alert_id == alert_id)
                      .values(open_alert_id=None))
        return {"alert_id": alert_id, "subject_id": alert.subject_id}

    # ------------------------------------------------------------------ reads
    def population(self, s: Session, horizon: int, now: datetime, *, sort: str = "risk",
                   min_risk: float | None = None, open_alert: bool = False,
                   max_quiet_days: int | None = None, expired: bool = False,
                   limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Twins at one horizon, a page of them and how many match.  Current forecasts
        only (``expired``: only those whose window has ended, most recent first); sorted
        by risk, by rise since the previous forecast of the same model version (twins
        without one are left out), or by time since the last event.  Ties go to the
        higher subject id, so each order is one index scan."""
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}")
        r, a = TwinRisk.__table__.c, TwinAlert.__table__.c
        where = [r.horizon_days == horizon]
        if expired:
            where.append(r.expires_at <= now)
        else:
            where += [r.risk.is_not(None), r.expires_at > now]
        if min_risk is not None:
            where.append(r.risk >= min_risk)
        if max_quiet_days is not None:
            where.append(r.last_event_time >= now - timedelta(days=max_quiet_days))
        if sort == "rise" and not expired:
            where.append(r.rise.is_not(None))
        if open_alert:  # the few twins with one: their own (partial) index, which a
            # range on its second column steers SQLite's planner to for the count too
            where.append(r.open_alert_id.is_not(None))
            if min_risk is None:
                where.append(r.risk >= 0)
        base = TwinRisk.__table__
        # an alert is open only until its forecast's window ends
        alert_on = and_(a.id == r.open_alert_id, a.expires_at > now)
        ranked = base.join(TwinAlert.__table__, alert_on) if open_alert else base
        order = {"risk": [r.risk.desc(), r.subject_id.desc()],
                 "rise": [r.rise.desc(), r.subject_id.desc()],
                 "quiet": [r.last_event_time.asc(), r.subject_id.asc()]}[sort]
        if expired:
            order = [r.expires_at.desc(), r.subject_id.desc()]
        total = s.execute(select(func.count()).select_from(ranked).where(*where)).scalar_one()
        # the page's ids from the index alone (skipping ``offset`` entries costs no row
        # reads), then its rows by primary key
        ids = list(s.execute(select(r.subject_id).select_from(ranked).where(*where)
                             .order_by(*order).limit(limit).offset(offset)).scalars())
        if not ids:
            return [], int(total)
        rows = {int(x[0]): x for x in s.execute(
            select(r.subject_id, r.risk, r.previous_risk, r.rise, r.as_of, r.expires_at,
                   r.forecast_id, r.model_version, r.last_event_time, a.id)
            .select_from(base.outerjoin(TwinAlert.__table__, alert_on))
            .where(r.horizon_days == horizon, r.subject_id.in_(ids)))}
        out = []
        for sid in ids:
            x = rows[sid]
            out.append({"subject_id": sid, "risk": x[1], "previous_risk": x[2], "rise": x[3],
                        "as_of": x[4], "expires_at": x[5], "forecast_id": x[6],
                        "model_version": x[7], "last_event_time": x[8], "open_alert_id": x[9],
                        "expired": x[5] is not None and x[5] <= now})
        return out, int(total)

    def current(self, s: Session, subject_id: int, now: datetime) -> list[dict[str, Any]]:
        """A twin's rows, one per horizon, with whether each has expired."""
        r, a = TwinRisk.__table__.c, TwinAlert.__table__.c
        rows = s.execute(
            select(r.horizon_days, r.risk, r.as_of, r.expires_at, r.forecast_id,
                   r.model_version, a.id)
            .select_from(TwinRisk.__table__.outerjoin(
                TwinAlert.__table__, and_(a.id == r.open_alert_id, a.expires_at > now)))
            .where(r.subject_id == subject_id).order_by(r.horizon_days)).all()
        return [{"horizon_days": x[0], "risk": x[1], "as_of": x[2], "expires_at": x[3],
                 "forecast_id": x[4], "model_version": x[5], "open_alert_id": x[6],
                 "expired": x[3] is not None and x[3] <= now} for x in rows]

    def alerts(self, s: Session, now: datetime, *, kind: str = ALERT, state: str = "open",
               subject_id: int | None = None, limit: int = 50, offset: int = 0
               ) -> tuple[list[dict[str, Any]], int]:
        """Alerts of one kind, newest first: ``open`` (unacknowledged, horizon not ended),
        ``acknowledged``, or ``all``; of one twin when ``subject_id``."""
        a, k = TwinAlert.__table__.c, AlertAck.__table__.c
        joined = TwinAlert.__table__.outerjoin(AlertAck.__table__, k.alert_id == a.id)
        where = [a.kind == kind]
        if subject_id is not None:
            where.append(a.subject_id == subject_id)
        if state == "open":
            where += [k.alert_id.is_(None), a.expires_at > now]
        elif state == "acknowledged":
            where.append(k.alert_id.is_not(None))
        elif state != "all":
            raise ValueError("state must be open, acknowledged or all")
        total = s.execute(select(func.count()).select_from(joined).where(*where)).scalar_one()
        rows = s.execute(select(a.id, a.created_at, a.subject_id, a.horizon_days, a.kind,
                                a.forecast_id, a.risk, a.previous_risk, a.threshold, a.as_of,
                                a.expires_at, a.model_name, a.model_version,
                                a.previous_model_version, k.time, k.user_name, k.reason)
                         .select_from(joined).where(*where)
                         .order_by(a.created_at.desc(), a.id.desc())
                         .limit(limit).offset(offset)).all()
        keys = ("id", "created_at", "subject_id", "horizon_days", "kind", "forecast_id",
                "risk", "previous_risk", "threshold", "as_of", "expires_at", "model_name",
                "model_version", "previous_model_version", "acknowledged_at",
                "acknowledged_by", "reason")
        out = []
        for x in rows:
            d = dict(zip(keys, x, strict=True))
            d["expired"] = d["expires_at"] <= now
            out.append(d)
        return out, int(total)

