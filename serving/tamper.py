"""Tamper evidence that survives a database administrator.

Each forecast row's digest covers the twin's previous row's digest (``digest_version``
2), so the twin's forecasts form a chain whose head is kept on the twin's row.  Dropping
the append-only trigger and altering, re-digesting or deleting a row breaks the chain
(:func:`verify_chains`) — unless the whole rest of that twin's chain and its head are
rewritten too.  That is what anchors catch: :func:`anchor` writes, outside the database
(a run in the MLflow tracking store), a Merkle root over every twin's chain head up to a
forecast sequence number, and a SHA-256 over the access-log rows since the previous
anchor.  :func:`verify_anchors` recomputes both from the database: any row changed,
removed or re-digested after it was anchored is detected.  The access log is chained by
its anchors (contiguous id ranges, each hashed), not row by row: a per-row chain would
make every request wait for one global head row.

Rows are anchored only once they are ``SETTLE_SECONDS`` old, because PostgreSQL commits
sequence numbers out of order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, tuple_

from serving.store import Store
from serving.store.models import AccessLog, Forecast, Twin
from serving.store.twins import forecast_digest, utcnow
from training.tracking import Tracker

ANCHOR_EXPERIMENT = "twincast-audit-anchors"
ANCHOR_LEASE = "audit-anchor"
SETTLE_SECONDS = 60
FORECAST_FIELDS = (
    "forecast_id", "subject_id", "as_of", "watermark", "status", "reason", "risks",
    "contributions", "model_name", "model_version", "run_id", "feature_spec_digest",
    "task_digest", "feature_digest", "code_version", "requested_by", "api_key_id",
    "created_at", "prev_digest", "digest_version", "trajectories")
ACCESS_FIELDS = ("id", "time", "api_key_id", "key_name", "role", "method", "path", "action",
                 "subject_id", "status_code")


def forecast_dict(row: Forecast) -> dict[str, Any]:
    """A stored forecast row as :func:`forecast_digest` reads it."""
    return {c: getattr(row, c) for c in FORECAST_FIELDS}


@dataclass
class Break:
    subject_id: int | None
    forecast_id: str | None
    reason: str


# ---------------------------------------------------------------------- chains
def verify_chains(store: Store, batch: int = 5000) -> tuple[int, list[Break]]:
    """Every forecast row against its digest and its twin's chain, and every twin's
    head against its latest row; returns (rows checked, breaks).  Version-1 rows (written
    before the chains) are checked alone."""
    checked, breaks = 0, []
    after = (-1, 0)  # keyset: (subject_id, seq)
    current, prev = None, None
    last: dict[int, tuple[str, int]] = {}  # per twin: the latest row seen (digest, seq)
    while True:
        q = select(Forecast).where(tuple_(Forecast.subject_id, Forecast.seq) > tuple_(*after))
        with store.read() as s:
            rows = list(s.execute(q.order_by(Forecast.subject_id, Forecast.seq)
                                  .limit(batch)).scalars())
        for r in rows:
            if r.subject_id != current:
                current, prev = r.subject_id, None
            if forecast_digest(forecast_dict(r)) != r.row_digest:
                breaks.append(Break(r.subject_id, r.forecast_id,
                                    "content does not match its digest: altered"))
            if (r.digest_version or 1) >= 2 and r.prev_digest != prev:
                breaks.append(Break(r.subject_id, r.forecast_id,
                                    "does not follow the twin's previous row: a row before "
                                    "it was deleted or re-written"))
            prev = r.row_digest
            last[r.subject_id] = (r.row_digest, r.seq)
        checked += len(rows)
        if len(rows) < batch:
            break
        after = (rows[-1].subject_id, rows[-1].seq)
        # twins finished on this page: their heads now (the last one may go on)
        done = {sid: d for sid, d in last.items() if sid != rows[-1].subject_id}
        breaks += _check_heads(store, done)
        last = {sid: d for sid, d in last.items() if sid == rows[-1].subject_id}
    breaks += _check_heads(store, last)
    return checked, breaks


def _check_heads(store: Store, last: dict[int, tuple[str, int]]) -> list[Break]:
    """Each twin's head against its latest row seen; a twin forecast again since that
    row was read (the service is live) is not a break."""
    if not last:
        return []
    with store.read() as s:
        heads = dict(s.execute(select(Twin.subject_id, Twin.forecast_head)
                               .where(Twin.subject_id.in_(list(last)))).all())
        suspects = [sid for sid, (digest, _) in last.items()
                    if heads.get(sid) is not None and heads[sid] != digest]
        latest = dict(s.execute(select(Forecast.subject_id, func.max(Forecast.seq))
                                .where(Forecast.subject_id.in_(suspects))
                                .group_by(Forecast.subject_id)).all()) if suspects else {}
    newer = {sid for sid, seq in latest.items() if seq > last[sid][1]}
    return [Break(sid, None, "the twin's chain head is not its latest forecast row: the "
                             "latest row was deleted, or the head altered")
            for sid in suspects if sid not in newer]


# ---------------------------------------------------------------------- anchors
def merkle_root(leaves: list[bytes]) -> str:
    """The Merkle root (SHA-256, last node paired with itself) of ``leaves``.

    >>> merkle_root([]) == hashlib.sha256(b"").hexdigest(), len(merkle_root([b"a", b"b"]))
    (True, 64)
    """
    level = [hashlib.sha256(x).digest() for x in leaves]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [hashlib.sha256(level[i] + level[i + 1]).digest()
                 for i in range(0, len(level), 2)]
    return level[0].hex()


def forecast_root(store: Store, upto_seq: int) -> tuple[str, int]:
    """The Merkle root over every twin's chain head as of forecast ``upto_seq`` (each
    twin's latest row with seq at most that), and how many twins it covers."""
    latest = (select(Forecast.subject_id, func.max(Forecast.seq).label("m"))
              .where(Forecast.seq <= upto_seq).group_by(Forecast.subject_id).subquery())
    with store.read() as s:
        rows = s.execute(select(Forecast.subject_id, Forecast.row_digest)
                         .join(latest, Forecast.seq == latest.c.m)
                         .order_by(Forecast.subject_id)).all()
    return merkle_root([f"{sid}:{digest}".encode() for sid, digest in rows]), len(rows)


def access_digest(store: Store, after_id: int, upto_id: int) -> tuple[str, int]:
    """SHA-256 over the access-log rows with ``after_id < id <= upto_id``, in id order."""
    h, n = hashlib.sha256(), 0
    last = after_id
    while True:
        with store.read() as s:
            rows = s.execute(select(*[getattr(AccessLog, c) for c in ACCESS_FIELDS])
                             .where(AccessLog.id > last, AccessLog.id <= upto_id)
                             .order_by(AccessLog.id).limit(10_000)).all()
        for r in rows:
            h.update(json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in r],
                                separators=(",", ":")).encode() + b"\n")
        n += len(rows)
        if len(rows) < 10_000:
            return h.hexdigest(), n
        last = rows[-1][0]


def database_id(store: Store) -> str:
    """Which database anchors belong to (its URL without the password, hashed)."""
    url = store.engine.url.render_as_string(hide_password=True)
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def anchors(tracker: Tracker, store: Store) -> list[dict[str, str]]:
    """This database's anchors, oldest first (tags of the anchor runs)."""
    exp = tracker.client.get_experiment_by_name(ANCHOR_EXPERIMENT)
    if exp is None:
        return []
    runs = tracker.client.search_runs(
        [exp.experiment_id], filter_string=f"tags.database = '{database_id(store)}'",
        max_results=50_000)
    return sorted((dict(r.data.tags) for r in runs), key=lambda t: int(t["access_upto"]))


def anchor(store: Store, tracker: Tracker, *, by: str, settle_seconds: float = SETTLE_SECONDS
           ) -> dict[str, str]:
    """Write an anchor of everything older than ``settle_seconds`` to the tracking store;
    returns its tags."""
    cutoff = utcnow() - timedelta(seconds=settle_seconds)
    with store.read() as s:
        seq = s.execute(select(func.max(Forecast.seq))
                        .where(Forecast.created_at <= cutoff)).scalar_one() or 0
        upto = s.execute(select(func.max(AccessLog.id))
                         .where(AccessLog.time <= cutoff)).scalar_one() or 0
    previous = anchors(tracker, store)
    after = int(previous[-1]["access_upto"]) if previous else 0
    upto = max(upto, after)
    root, twins = forecast_root(store, seq)
    digest, n_access = access_digest(store, after, upto)
    tags = {"twincast.kind": "anchor", "database": database_id(store), "by": by[:128],
            "time": datetime.now(UTC).isoformat(), "forecast_seq": str(seq),
            "forecast_root": root, "twins": str(twins), "access_after": str(after),
            "access_upto": str(upto), "access_digest": digest, "access_rows": str(n_access)}
    exp = tracker.client.get_experiment_by_name(ANCHOR_EXPERIMENT)
    exp_id = exp.experiment_id if exp else tracker.client.create_experiment(ANCHOR_EXPERIMENT)
    run = tracker.client.create_run(exp_id, run_name=f"anchor {tags['time'][:19]}", tags=tags)
    tracker.client.set_terminated(run.info.run_id)
    return tags


def verify_anchors(store: Store, tracker: Tracker) -> list[dict[str, Any]]:
    """Each anchor recomputed from the database: ``ok`` and what differs."""
    out, expected_after = [], 0
    for a in anchors(tracker, store):
        problems = []
        root, _ = forecast_root(store, int(a["forecast_seq"]))
        if root != a["forecast_root"]:
            problems.append("forecast chain heads differ from the anchored ones: forecast "
                            "rows were altered, re-digested or deleted after anchoring")
        digest, _ = access_digest(store, int(a["access_after"]), int(a["access_upto"]))
        if digest != a["access_digest"]:
            problems.append("access-log rows differ from the anchored ones: rows were "
                            "altered, inserted or deleted after anchoring")
        if int(a["access_after"]) != expected_after:
            problems.append("the access-log ranges of the anchors are not contiguous")
        expected_after = int(a["access_upto"])
        out.append({"time": a["time"], "forecast_seq": int(a["forecast_seq"]),
                    "access_upto": int(a["access_upto"]), "ok": not problems,
                    "problems": problems})
    return out
