"""Monitoring alerts: appended by each monitoring run, never updated or deleted."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select

from serving.store.db import Database
from serving.store.models import MonitoringAlert
from serving.store.twins import utcnow

COLUMNS = ("id", "created_at", "run_id", "model_name", "model_version", "kind", "name",
           "horizon_days", "window_start", "window_end", "value", "reference", "evidence")


class Alerts:
    def __init__(self, db: Database):
        self.db = db

    def add(self, model_name: str, run_id: str, alerts: list[dict[str, Any]]) -> int:
        """Append a run's new alerts (as :func:`training.monitoring.decide_alerts` gives
        them): one already stored for the same version, test and window is not stored
        again (a later run re-judges the same windows).  Returns how many were stored."""
        if not alerts:
            return 0
        with self.db.read() as s:
            seen = {(str(v), k, n, h, ws.isoformat(), we.isoformat()) for v, k, n, h, ws, we in
                    s.execute(select(MonitoringAlert.model_version, MonitoringAlert.kind,
                                     MonitoringAlert.name, MonitoringAlert.horizon_days,
                                     MonitoringAlert.window_start, MonitoringAlert.window_end)
                              .where(MonitoringAlert.model_name == model_name))}
        alerts = [a for a in alerts if (str(a["model_version"]), a["kind"], a["name"],
                                        a["horizon_days"], a["window_start"],
                                        a["window_end"]) not in seen]
        if not alerts:
            return 0
        now = utcnow()
        rows = [{"created_at": now, "run_id": run_id, "model_name": model_name,
                 "model_version": a["model_version"], "kind": a["kind"], "name": a["name"],
                 "horizon_days": a["horizon_days"],
                 "window_start": datetime.fromisoformat(a["window_start"]),
                 "window_end": datetime.fromisoformat(a["window_end"]),
                 "value": a["value"], "reference": a["reference"],
                 "evidence": a["evidence"]} for a in alerts]
        with self.db.write(urgent=False) as s:
            s.execute(insert(MonitoringAlert), rows)
        return len(rows)

    def recent(self, model_name: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest alerts of a model, newest first."""
        cols = [getattr(MonitoringAlert, c) for c in COLUMNS]
        with self.db.read() as s:
            rows = s.execute(select(*cols).where(MonitoringAlert.model_name == model_name)
                             .order_by(MonitoringAlert.id.desc()).limit(limit)).all()
        out = []
        for r in rows:
            d = dict(zip(COLUMNS, r, strict=True))
            for k in ("created_at", "window_start", "window_end"):
                d[k] = d[k].isoformat()
            out.append(d)
        return out
