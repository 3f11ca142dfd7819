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
        """Append a run's alerts (as :func:`training.monitoring.decide_alerts` gives them)."""
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
