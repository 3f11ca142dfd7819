"""The twin service, independent of HTTP: the store, the served model, the one write
path, the refresh, and the reads the routes need.

A background thread per worker watches the ``champion`` alias and the served-version
row, creates a refresh job for twins nothing else will reach (imported ones), and claims
refresh jobs nobody holds (a new one, or one whose worker died).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from typing import Any

from serving.coalesce import Coalescer, GroupCommit
from serving.config import ServingConfig
from serving.errors import BadInput, NotFound, NotReady, Unauthorized
from serving.model_source import ModelSource
from serving.refresh import Refresher
from serving.served import ModelHolder
from serving.store import Store
from serving.store.db import worker_name
from serving.store.keys import REVOKED
from serving.store.twins import utcnow
from serving.tamper import ANCHOR_LEASE, anchor
from serving.views import forecast_json, iso
from serving.writes import AccessInfo, Caller, TwinWriter
from training.errors import RegistryUnreachable

log = logging.getLogger("twincast.service")


class TwinService:
    def __init__(self, config: ServingConfig, store: Store, source: ModelSource,
                 worker: str | None = None):
        self.config = config
        self.store = store
        self.source = source
        self.worker = worker or worker_name()
        self.models = ModelHolder(store, source, self.worker)
        self.writer = TwinWriter(store, self.models, failpoints=config.failpoints)
        self.coalescer = Coalescer(self.writer)  # concurrent one-twin writes, batched
        # concurrent logged reads of twins' views: their access rows in one commit
        self.view_reads: GroupCommit[tuple[int, Caller, AccessInfo], str] = GroupCommit(
            self._logged_views)
        self.refresher = Refresher(store, self.writer, self.worker, chunk=config.refresh_chunk,
                                   lease_seconds=config.refresh_lease_seconds,
                                   failpoints=config.failpoints)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.cds_verifier: Any = None  # serving.cds.Verifier, set by the wiring
        self.registry_state = "ok"  # or "unreachable", as the last look at the alias found
        self._next_anchor = time.monotonic() + config.anchor_seconds
        self._monitored: dict[str, Any] = {}  # earlier versions' bundles, for monitoring

    @property
    def task_name(self) -> str:
        return self.source.task_name

    # ------------------------------------------------------------------ monitoring
    def monitoring(self, since=None, until=None, window_days: int | None = None
                   ) -> dict[str, Any]:
        """The monitoring report of the served model's stored forecasts (as
        ``twincast monitor`` computes it) and the alerts monitoring runs stored."""
        from serving.monitoring import VersionData, monitor

        model = self.models.current()
        cache = self._monitored  # versions do not change once registered

        def version_data(version: str) -> VersionData | None:
            if version == model.version:
                return VersionData(model.bundle, model.metrics)
            if version not in cache:
                try:
                    loaded = self.source.load(version)
                    cache[version] = VersionData(loaded.bundle, loaded.metrics)
                except Exception as exc:  # gone from the registry, or refused: no reference
                    log.warning("monitoring: version %s could not be loaded (%s)", version,
                                type(exc).__name__)
                    return None
            return cache[version]

        report = monitor(self.store, model.bundle.task, model.name, version_data,
                         since=since, until=until, window_days=window_days)
        report["stored_alerts"] = self.store.alerts.recent(model.name, 100)
        return report

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load the champion (if any), then watch in the background.  A registry that
        does not answer does not stop the start: readiness says so, forecasts answer 503
        until a model is loaded, and the watcher keeps trying."""
        try:
            self.models.follow_champion("start")
            self.tick()
        except NotReady as exc:
            log.warning("%s", exc)
        except RegistryUnreachable:
            self._registry_down()
        if self.config.model_poll_seconds > 0:
            self._watcher = threading.Thread(target=self._watch, name="champion-watch",
                                             daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self.refresher.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.config.model_poll_seconds):
            try:
                self.tick()
            except RegistryUnreachable:
                self._registry_down()
            except Exception:
                log.exception("watching the champion failed")
            self._maybe_anchor()

    def _maybe_anchor(self) -> None:
        """Every ``anchor_seconds``, one worker (the lease's holder) anchors the chains."""
        every = self.config.anchor_seconds
        if every <= 0 or time.monotonic() < self._next_anchor:
            return
        self._next_anchor = time.monotonic() + every
        try:
            if self.store.leases.take(ANCHOR_LEASE, self.worker, every * 0.9):
                tags = anchor(self.store, self.source.tracker, by=self.worker)
                log.info("anchored forecasts up to %s and the access log up to %s",
                         tags["forecast_seq"], tags["access_upto"])
        except Exception as exc:
            log.warning("anchoring failed (%s): trying again in %.0f s",
                        type(exc).__name__, every)

    def _registry_down(self) -> None:
        if self.registry_state == "ok":
            log.warning("the model registry is unreachable: serving %s meanwhile",
                        f"version {self.models.model.version}" if self.models.model
                        else "nothing (no model loaded yet)")
        self.registry_state = "unreachable"

    def tick(self) -> None:
        """One round of watching: follow the alias, catch up with the served version,
        make sure stale twins have a job, claim a job nobody holds."""
        alias = self.source.champion_version()
        if self.registry_state != "ok":
            log.info("the model registry answers again")
        self.registry_state = "ok"
        if alias is None:
            return
        served = self.models.served_version()
        model = self.models.model
        if model is None or alias != model.version or served != alias:
            self.models.follow_champion("champion alias moved")
        model = self.models.current()
        self.store.jobs.ensure_job(model.name, model.version)
        self.refresher.try_claim(model)

    def reload(self, reason: str = "admin reload") -> dict[str, Any]:
        """Load the current champion now; a change starts a refresh (background)."""
        before = self.models.model.version if self.models.model else None
        changed, _ = self.models.follow_champion(reason)
        self.refresher.try_claim(self.models.current())
        return {"previous_version": before, "version": self.models.current().version,
                "changed": changed, "refresh": self.refresh_status()}

    # ------------------------------------------------------------------ reads
    def _logged_read(self, read, access: AccessInfo | None):
        """``read(s)`` in a read session, or — when there is an access-log row to write —
        in one write transaction with it (committed before the answer exists)."""
        if access is None:
            with self.store.read() as s:
                return read(s)
        return self.store.db.transact(read)

    def twin_view(self, subject_id: int, caller: Caller | None = None,
                  access: AccessInfo | None = None) -> str:
        """The twin's current state as JSON: one primary-key read of its kept view.  With
        ``access``, the read and its access-log row are one transaction (the row is
        committed before the answer exists), shared with concurrent reads."""
        if access is not None and caller is not None:
            return self.view_reads.submit((subject_id, caller, access))
        with self.store.read() as s:
            return _view_or_missing(subject_id, self.store.twins.views(s, [subject_id]))

    def _logged_views(self, reads: list[tuple[int, Caller, AccessInfo]]
                      ) -> list[str | BaseException]:
        """Reads of twins' views, each answered its view or why not, and the access rows
        of those answered, in one transaction."""
        def work(s) -> list[str | BaseException]:
            revoked = self.store.keys.revoked_among(
                s, [caller.key_id for _, caller, _ in reads if caller.confirm])
            views = self.store.twins.views(s, [sid for sid, _, _ in reads])
            out: list[str | BaseException] = []
            for sid, caller, _ in reads:
                if caller.key_id in revoked:  # told nothing, not even whether it exists
                    out.append(Unauthorized(REVOKED))
                    continue
                try:
                    out.append(_view_or_missing(sid, views))
                except NotFound as exc:
                    out.append(exc)
            self.store.access.add(s, [access.row(caller, sid) for (sid, caller, access), o
                                      in zip(reads, out, strict=True) if isinstance(o, str)])
            return out

        out = self.store.db.transact(work)
        for (_, _, access), o in zip(reads, out, strict=True):
            access.written = isinstance(o, str)
        return out

    def current_forecast(self, subject_id: int, caller: Caller | None = None,
                         access: AccessInfo | None = None) -> dict[str, Any]:
        return json.loads(self.twin_view(subject_id, caller, access))["forecast"]

    def what_if(self, subject_id: int, events: list, as_of, caller: Caller,
                access: AccessInfo | None = None) -> dict[str, Any]:
        """Risks and trajectories under hypothetical events beside the twin's own, at one
        as-of time (``serving.whatif``); stores nothing but the access-log row, which is
        committed before the answer exists."""
        from serving.whatif import check_scenario, what_if

        model = self.models.current_served()
        check_scenario(model, events, caller.role)  # refused before anything is read
        with self.store.read() as s:
            if not self.store.twins.exists(s, subject_id):
                raise NotFound(f"no twin with subject_id {subject_id}")
            rows = self.store.twins.history_rows(s, [subject_id])
        answer = what_if(model, subject_id, rows, events, as_of)
        if access is not None:
            def log_it(s) -> None:
                self.store.access.add(s, [access.row(caller, subject_id)])
            self.store.db.transact(log_it)
            access.written = True
        return answer

    def forecasts(self, subject_id: int, limit: int, offset: int) -> dict[str, Any]:
        with self.store.read() as s:
            if not self.store.twins.exists(s, subject_id):
                raise NotFound(f"no twin with subject_id {subject_id}")
            rows, total = self.store.twins.forecasts(s, subject_id, limit, offset)
            return {"items": [forecast_json(r) for r in rows], "total": total,
                    "limit": limit, "offset": offset}

    def access_log(self, subject_id: int | None, limit: int) -> list[dict[str, Any]]:
        return [{"time": iso(r.time), "key_name": r.key_name, "user_id": r.user_id,
                 "role": r.role,
                 "method": r.method, "path": r.path, "action": r.action,
                 "subject_id": r.subject_id, "status_code": r.status_code}
                for r in self.store.access.read(subject_id, limit)]

    def audit(self, forecast_id: str, subject_id: int | None = None) -> dict[str, Any]:
        """The verified chain behind one forecast (whichever task's model made it);
        with ``subject_id``, only a forecast of that twin (checked before any work)."""
        from serving.audit import audit_forecast

        with self.store.read() as s:
            row = self.store.twins.forecast_by_id(s, forecast_id)
            if row is None or (subject_id is not None and row.subject_id != subject_id):
                raise NotFound(f"no forecast {forecast_id}"
                               + (f" of twin {subject_id}" if subject_id is not None else ""))
            task = row.model_name.removeprefix("twincast-")
        source = self.source if task == self.task_name else ModelSource(self.source.tracker,
                                                                         task)
        return audit_forecast(self.store, source, forecast_id)

    # ------------------------------------------------------------------ population, alerts
    def population(self, horizon_days: int | None = None, *, sort: str = "risk",
                   min_risk: float | None = None, open_alert: bool = False,
                   max_quiet_days: int | None = None, expired: bool = False,
                   limit: int = 50, offset: int = 0, caller: Caller | None = None,
                   access: AccessInfo | None = None, now: datetime | None = None
                   ) -> dict[str, Any]:
        """One page of twins at a horizon of the served model (``serving.store.risks``):
        current forecasts by risk, rise or quiet time, or the expired ones.  Every twin
        shown is in the access log, committed with the read."""
        model = self.models.current_served()
        horizons = list(model.bundle.horizons)
        horizon = horizon_days if horizon_days is not None else model.bundle.task.primary_horizon
        if horizon not in horizons:  # the list at a horizon the model has not: no such list
            raise NotFound(f"the served model forecasts at {horizons} days, not at {horizon}")
        now = now or utcnow()

        def read(s) -> dict[str, Any]:
            rows, total = self.store.risks.population(
                s, horizon, now, sort=sort, min_risk=min_risk, open_alert=open_alert,
                max_quiet_days=max_quiet_days, expired=expired, limit=limit, offset=offset)
            if access is not None and caller is not None and rows:
                self.store.access.add(s, [access.row(caller, r["subject_id"]) for r in rows])
                access.written = True
            return {"items": [population_item(r, horizon, now) for r in rows],
                    "total": total, "limit": limit, "offset": offset,
                    "horizon_days": horizon, "now": iso(now), "sort": sort,
                    "expired": expired}

        return self._logged_read(read, access)

    def alerts(self, *, kind: str = "alert", state: str = "open",
               subject_id: int | None = None, limit: int = 50, offset: int = 0,
               now: datetime | None = None, caller: Caller | None = None,
               access: AccessInfo | None = None) -> dict[str, Any]:
        """Twin alerts (``alert``: for the care team; ``review``: the refresh's crossings
        after a model change), newest first.  Every twin listed is in the access log,
        committed with the read."""
        now = now or utcnow()

        def read(s) -> dict[str, Any]:
            rows, total = self.store.risks.alerts(s, now, kind=kind, state=state,
                                                  subject_id=subject_id, limit=limit,
                                                  offset=offset)
            if access is not None and caller is not None and rows:
                self.store.access.add(s, [access.row(caller, r["subject_id"]) for r in rows])
                access.written = True
            return {"items": [alert_item(r) for r in rows], "total": total, "limit": limit,
                    "offset": offset, "kind": kind, "state": state}

        return self._logged_read(read, access)

    def acknowledge(self, alert_id: int, reason: str, caller: Caller,
                    access: AccessInfo | None = None) -> dict[str, Any]:
        """Acknowledge an alert (or mark a queued crossing reviewed), with the reason,
        who and when; the access-log row is in the same transaction."""
        if not reason or not reason.strip():
            raise BadInput("an acknowledgement needs a reason", ["body", "reason"])

        def work(s) -> dict[str, Any]:
            done = self.store.risks.acknowledge(s, alert_id, caller.user_id, caller.name,
                                                reason, utcnow(), api_key_id=caller.key_id)
            if access is not None:
                self.store.access.add(s, [access.row(caller, done["subject_id"])])
                access.written = True
            return done

        return self.store.db.transact(work)

    def model_info(self) -> dict[str, Any]:
        return self.models.current().describe()

    def refresh_status(self) -> dict[str, Any] | None:
        job = self.store.jobs.latest(self.source.name)
        if job is None:
            return None
        return {"model_name": job.model_name, "model_version": job.model_version,
                "state": job.state, "total": job.total, "done": job.done,
                "worker": job.worker, "attempts": job.attempts, "verified": job.verified,
                "created_at": iso(job.created_at), "started_at": iso(job.started_at),
                "finished_at": iso(job.finished_at), "error": job.error}



def population_item(r: dict[str, Any], horizon: int, now: datetime) -> dict[str, Any]:
    """A population row as JSON: the risk for the window from as-of to its end."""
    last = r["last_event_time"]
    return {"subject_id": r["subject_id"], "horizon_days": horizon, "risk": r["risk"],
            "previous_risk": r["previous_risk"], "rise": r["rise"], "as_of": iso(r["as_of"]),
            "horizon_ends": iso(r["expires_at"]), "expired": r["expired"],
            "forecast_id": r["forecast_id"], "model_version": r["model_version"],
            "last_event_time": iso(last),
            "days_since_last_event": None if last is None else (now - last).days,
            "open_alert_id": r["open_alert_id"]}


def alert_item(r: dict[str, Any]) -> dict[str, Any]:
    return {**{k: iso(v) if isinstance(v, datetime) else v for k, v in r.items()
               if k not in ("expires_at",)},
            "horizon_ends": iso(r["expires_at"]),
            "acknowledged": r["acknowledged_at"] is not None}


def _view_or_missing(subject_id: int, views: dict[int, str | None]) -> str:
    """A twin's kept view, or NotFound saying why there is none."""
    if subject_id not in views:
        raise NotFound(f"no twin with subject_id {subject_id}")
    view = views[subject_id]
    if view is None:
        raise NotFound(f"twin {subject_id} has no forecast yet (a refresh will make one)")
    return view
