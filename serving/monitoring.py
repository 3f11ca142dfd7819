"""Monitoring from the twin store: the stored forecasts, what has happened since, and
the computations of :mod:`training.monitoring` over them.

``monitor(...)`` reads every forecast a model made (with risks), the live histories of
the twins they belong to and each version's held-out metrics and drift reference, and
returns one JSON-able report: per served version and window of as-of times, the
realised metrics on matured forecasts beside the held-out ones, the expected metrics
("expected if calibration holds") on all counted forecasts, drift per top feature and
per horizon's risk, event volume per code, and the alerts of the run.  Nothing in it
describes fewer than 10 patients.  ``twincast monitor`` stores the alerts and logs the
run to MLflow; ``GET /v1/monitoring`` answers the same report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import pandas as pd

from features.events import NAT_US, EventArrays
from features.labels import labels_at, policy_mask, subject_summary
from features.task import Task
from serving.store import Store
from serving.store.twins import EventColumns
from training import monitoring as MON

CHUNK_SUBJECTS = 5_000
NEVER = np.iinfo(np.int64).max
INSUFFICIENT = "insufficient data"


@dataclass
class VersionData:
    """What monitoring needs of a model version: its bundle (features, reference) and
    its held-out metrics as training logged them."""

    bundle: Any
    metrics: dict[str, float]


def _us(t: datetime | None) -> int | None:
    return None if t is None else int(np.datetime64(t, "us").view(np.int64))


def _iso(us: int) -> str:
    return str(np.datetime64(int(us), "us").astype(datetime).isoformat())


def load_forecasts(store: Store, model_name: str) -> pd.DataFrame:
    """Every stored forecast of the model that has risks (one row each; the risks as
    stored, parsed by :func:`monitor` for the forecasts that count)."""
    text = "" if store.sqlite else "::text"
    sql = (f"SELECT forecast_id, subject_id, as_of{text}, created_at{text}, model_version, "
           f"risks{text} FROM forecasts WHERE model_name = ? AND status = 'ok' "
           "AND as_of IS NOT NULL ORDER BY seq")
    with store.read() as s:
        result = s.connection().exec_driver_sql(
            sql if store.sqlite else sql.replace("?", "%s"), (model_name,))
        rows = result.cursor.fetchall()
        result.close()
    if not rows:
        return pd.DataFrame({"forecast_id": [], "subject_id": np.empty(0, np.int64),
                             "as_of_us": np.empty(0, np.int64),
                             "created_us": np.empty(0, np.int64), "version": [],
                             "risks": []})
    fid, sid, as_of, created, version, risks = zip(*rows, strict=True)
    return pd.DataFrame({
        "forecast_id": list(fid), "subject_id": np.array(sid, dtype=np.int64),
        "as_of_us": np.array(as_of, dtype="datetime64[us]").view(np.int64),
        "created_us": np.array(created, dtype="datetime64[us]").view(np.int64),
        "version": [str(v) for v in version],
        "risks": list(risks)})  # JSON text (dicts on PostgreSQL): parsed when counted


def load_events(store: Store, subject_ids: np.ndarray,
                progress: Callable[[int], None] | None = None) -> EventColumns:
    """The twins' live events, read in chunks of subjects."""
    parts = []
    ids = np.unique(subject_ids).tolist()
    for i in range(0, len(ids), CHUNK_SUBJECTS):
        chunk = ids[i:i + CHUNK_SUBJECTS]
        with store.read() as s:
            parts.append(EventColumns.from_rows(store.twins.history_rows(s, chunk)))
        if progress is not None:
            progress(len(chunk))
    return EventColumns.concat(parts)


def known_after(arrays: EventArrays, rec: np.ndarray, subject_id: np.ndarray,
                as_of_us: np.ndarray) -> np.ndarray:
    """Per forecast: when the first event dated after its as-of time arrived (the
    earliest arrival among them; NEVER when none)."""
    out = np.full(subject_id.size, NEVER, dtype=np.int64)
    timed = arrays.time_us != NAT_US
    if not timed.any() or subject_id.size == 0:
        return out
    ev = pd.DataFrame({"subject_id": arrays.subject_id[timed], "t": arrays.time_us[timed],
                       "rec": rec[timed]})
    # per (subject, time): the earliest arrival at that time; then, over a subject's
    # distinct times from the last back, the earliest arrival from each time on
    ev = ev.groupby(["subject_id", "t"], sort=True, as_index=False)["rec"].min()
    ev["later_rec"] = ev.iloc[::-1].groupby("subject_id")["rec"].cummin().iloc[::-1]
    q = pd.DataFrame({"subject_id": subject_id, "t": as_of_us, "row": np.arange(subject_id.size)})
    merged = pd.merge_asof(q.sort_values("t", kind="stable"),
                           ev.sort_values("t", kind="stable")[["subject_id", "t", "later_rec"]],
                           on="t", by="subject_id", direction="forward",
                           allow_exact_matches=False)
    hit = merged["later_rec"].notna().to_numpy()
    out[merged["row"].to_numpy()[hit]] = merged["later_rec"].to_numpy()[hit].astype(np.int64)
    return out


def windows_of(as_of: np.ndarray, lo: int, hi: int, days: int) -> list[tuple[int, int]]:
    """The windows (from ``lo``, ``days`` long, the last cut at ``hi``) that hold at
    least one of the as-of times: however long the span asked for, only these are
    judged."""
    step = days * MON.US_PER_DAY
    ks = np.unique((as_of[(as_of >= lo) & (as_of < hi)] - lo) // step)
    return [(lo + int(k) * step, min(lo + (int(k) + 1) * step, hi)) for k in ks]


def monitor(store: Store, task: Task, model_name: str,
            version_data: Callable[[str], VersionData | None], *,
            since: datetime | None = None, until: datetime | None = None,
            window_days: int | None = None, now: datetime | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The monitoring report of ``model_name``'s stored forecasts (see the module)."""
    cfg = MON.settings_of(task)
    window_days = window_days or cfg.window_days
    say = progress or (lambda _msg: None)
    fc = load_forecasts(store, model_name)
    report: dict[str, Any] = {
        "model": model_name, "task": task.name, "window_days": window_days,
        "labels": "realised from the task's outcome, competing and follow-up events by "
                  "the training label code",
        "estimate_label": MON.ESTIMATE_LABEL, "versions": {}, "alerts": [], "tests": 0}
    if task.outcome.is_empty():
        report["labels"] = "unavailable: the task names no outcome codes"
    if fc.empty:
        report.update({"now": None, "forecasts": {"stored": 0, "counted": 0}})
        return report
    say(f"reading the histories of {fc['subject_id'].nunique():,} twins")
    cols = load_events(store, fc["subject_id"].to_numpy())
    arrays, rec = cols.canonical()
    now_us = _us(now) if now is not None else int(rec.max()) if rec.size else \
        int(fc["created_us"].max())
    after = known_after(arrays, rec, fc["subject_id"].to_numpy(), fc["as_of_us"].to_numpy())
    sid, as_of = fc["subject_id"].to_numpy(), fc["as_of_us"].to_numpy()
    created = fc["created_us"].to_numpy()
    version = fc["version"].to_numpy(dtype=object)
    keep = MON.counted(version, sid, as_of, created, after, cfg.max_forecast_delay_days)
    # eligible on the history as it stands: an outcome, competing event or death dated
    # at or before the as-of time that arrived after the forecast leaves it out (training
    # has no such row)
    summary = subject_summary(arrays, task)
    known = _eligible_now(summary, sid, as_of)
    late_outcome = keep & ~known
    keep &= known
    # the task's prediction-time policy, as training chose its rows (per version, over
    # all its forecasts: the choice does not depend on the window asked for)
    for v in set(version[keep].tolist()):
        rows = np.flatnonzero(keep & (version == v))
        keep[rows[~policy_mask(sid[rows], as_of[rows], task)]] = False
    day = MON.US_PER_DAY
    first = int(as_of[keep].min()) if keep.any() else now_us
    lo = _us(since) if since is not None else first // day * day  # UTC midnight
    hi = _us(until) if until is not None else now_us + 1
    if hi <= lo:
        report["note"] = "the span asked for holds no day (until is not after since)"
    in_span = (as_of >= lo) & (as_of < hi)
    keep &= in_span
    report["now"] = _iso(now_us)
    report["since"], report["until"] = _iso(lo), _iso(hi)
    report["forecasts"] = {"stored": len(fc), "counted": int(keep.sum()),
                           "not_counted": int((~keep).sum()),
                           "outcome_known_before_as_of": int(late_outcome.sum()),
                           "rule": "the first forecast per (version, subject, as-of time), "
                                   "made within max_forecast_delay_days of its as-of time "
                                   "and before anything later was known, still eligible on "
                                   "the history as it stands; then the task's prediction-"
                                   "time policy (min_gap_days), as training chose its rows"}
    if not keep.any():
        return report
    idx = np.flatnonzero(keep)
    risks = [orjson.loads(r) if isinstance(r, str | bytes) else r
             for r in fc["risks"].to_numpy(dtype=object)[idx]]
    horizons = list(task.horizons_days)
    risk = np.array([[r.get(f"{h}d", np.nan) if isinstance(r, dict) else np.nan
                      for h in horizons] for r in risks], dtype=np.float64)
    say(f"labelling {idx.size:,} counted forecasts")
    report.update(judge(task, arrays, sid[idx], as_of[idx], version[idx], risk, version_data,
                        lo=lo, hi=hi, now_us=now_us, window_days=window_days, say=say,
                        summary=summary))
    return report


def judge(task: Task, arrays: EventArrays, sid: np.ndarray, as_of: np.ndarray,
          version: np.ndarray, risk: np.ndarray,
          version_data: Callable[[str], VersionData | None], *, lo: int, hi: int,
          now_us: int, window_days: int, say: Callable[[str], None] = lambda _m: None,
          summary: pd.DataFrame | None = None) -> dict[str, Any]:
    """The judged part of the report, from counted forecasts (subject, as-of time,
    version, risks per horizon) and the histories: per version and window, realised,
    expected and drift; then the run's alerts."""
    cfg = MON.settings_of(task)
    summary = subject_summary(arrays, task) if summary is None else summary
    labels = labels_at(arrays, task, sid, as_of, summary)
    horizons = list(task.horizons_days)
    tests: list[MON.Test] = []
    versions = {}
    for v in sorted(set(version.tolist()), key=_version_key):
        data = version_data(v)
        in_v = version == v
        versions[v] = _version_report(
            v, data, task, cfg, arrays, sid[in_v], as_of[in_v], risk[in_v],
            labels[in_v].reset_index(drop=True), horizons, lo, hi, now_us, window_days,
            tests, say)
    return {"versions": versions, "tests": len(tests),
            "alerts": MON.decide_alerts(tests, cfg), "alpha": cfg.alpha}


def _eligible_now(summary: pd.DataFrame, sid: np.ndarray, as_of: np.ndarray) -> np.ndarray:
    """No outcome, competing event or death dated at or before each as-of time."""
    subj = summary["subject_id"].to_numpy()
    pos = np.minimum(np.searchsorted(subj, sid), max(subj.size - 1, 0))
    if subj.size == 0:
        return np.ones(sid.size, dtype=bool)
    known = subj[pos] == sid
    first = np.minimum.reduce([summary[c].to_numpy()[pos] for c in
                               ("outcome_us", "competing_us", "death_us")])
    return ~known | (first > as_of)


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (1 << 62, v)


def _version_report(v, data: VersionData | None, task: Task, cfg, arrays: EventArrays,
                    sid, as_of, risk, labels, horizons, lo, hi, now_us, window_days,
                    tests: list, say) -> dict[str, Any]:
    metrics = data.metrics if data is not None else {}
    reference = getattr(data.bundle, "reference", None) if data is not None else None
    out: dict[str, Any] = {
        "forecasts": _count(int(sid.size)), "patients": _count(int(np.unique(sid).size)),
        "heldout": {str(h): {m: _heldout(metrics, m, h) for m in MON.REALISED_METRICS}
                    for h in horizons},
        "reference": "stored with the version" if reference else
                     "none: this version was trained before monitoring (no drift)",
        "windows": []}
    feats = None
    first_rows = _drift_rows(sid, as_of, lo, window_days, cfg.drift_sample)
    if reference and data is not None and first_rows.size:
        names = data.bundle.spec.feature_names
        wanted = [n for n in reference["top_features"] if n in names]
        say(f"version {v}: features of {first_rows.size:,} forecasts for drift")
        x = data.bundle.features_for(arrays, sid[first_rows], as_of[first_rows])
        feats = {n: x[:, names.index(n)] for n in wanted}
        drift_as_of, drift_sid, drift_risk = as_of[first_rows], sid[first_rows], \
            risk[first_rows]
    for w0, w1 in windows_of(as_of, lo, hi, window_days):
        in_w = (as_of >= w0) & (as_of < w1)
        window: dict[str, Any] = {"start": _iso(w0), "end": _iso(w1),
                                  "forecasts": _count(int(in_w.sum())),
                                  "patients": _count(int(np.unique(sid[in_w]).size)),
                                  "horizons": {}}
        rows = np.flatnonzero(in_w)
        boot = MON.bootstrap_weights(sid[rows], cfg.n_bootstrap, w0 % (2**31))
        for i, h in enumerate(horizons):
            # matured: the horizon has passed, and the outcome lag after it (outcomes
            # dated just before the horizon's end may still be on their way)
            matured = as_of[rows] + (h + cfg.outcome_lag_days) * MON.US_PER_DAY <= now_us
            hw = MON.horizon_window(risk[rows, i], sid[rows], labels.iloc[rows], matured, h,
                                    n_boot=cfg.n_bootstrap, seed=w0 % (2**31), boot=boot)
            window["horizons"][str(h)] = _horizon_json(hw)
            judged = hw.matured_patients >= cfg.min_patients and hw.events >= cfg.min_events
            window["horizons"][str(h)]["judged"] = judged
            if judged:
                for m in MON.REALISED_METRICS:
                    ref = MON.heldout_value(metrics, m, h)
                    got = hw.realised.get(m)
                    if ref is None or got is None or not np.isfinite(got["estimate"]):
                        continue
                    tests.append(MON.Test("metric", v, (window["start"], window["end"]), m, h,
                                          got["estimate"], ref[0], {
                                              "se_realised": got["se"], "se_reference": ref[1],
                                              "realised_interval": [got["lower"], got["upper"]],
                                              "matured_patients": hw.matured_patients,
                                              "events": hw.events}))
        window["judged"] = any(
            window["horizons"][str(h)].get("judged") for h in horizons)
        if feats is not None:
            pick = np.flatnonzero((drift_as_of >= w0) & (drift_as_of < w1))
            window["drift"] = _drift(v, window, reference, feats, pick, drift_risk[pick],
                                     int(np.unique(drift_sid[pick]).size), horizons, cfg,
                                     tests)
        window["volume"] = _volume(arrays, w0, w1)
        out["windows"].append(window)
    return out


def _drift_rows(sid, as_of, lo, days, cap) -> np.ndarray:
    """The counted forecasts drift is measured on: all of a window's (rows, as the
    reference's shares are of training rows), from at most ``cap`` of its patients (a
    seeded sample)."""
    if sid.size == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(0)
    w = (as_of - lo) // (days * MON.US_PER_DAY)
    out = []
    for k in np.unique(w):
        rows = np.flatnonzero(w == k)
        patients = np.unique(sid[rows])
        if patients.size > cap:
            rows = rows[np.isin(sid[rows], rng.choice(patients, cap, replace=False))]
        out.append(rows)
    return np.sort(np.concatenate(out))


def _count(n: int) -> int | str:
    """A count as published: under 10 (and above 0) it says so, not how many."""
    return n if n == 0 or n >= MON.MIN_CELL else f"<{MON.MIN_CELL}"


def _heldout(metrics: dict[str, float], m: str, h: int) -> dict[str, float] | None:
    base = f"{m}_{h}d"
    if base not in metrics:
        return None
    return {"estimate": metrics[base], "lower": metrics.get(base + "_lo"),
            "upper": metrics.get(base + "_hi")}


def _horizon_json(hw: MON.HorizonWindow) -> dict[str, Any]:
    d = asdict(hw)
    if hw.patients < MON.MIN_CELL:
        return {"horizon": hw.horizon, "result": INSUFFICIENT, "patients": _count(hw.patients)}
    if hw.matured_patients < MON.MIN_CELL:
        d["realised"] = d["realised_patients"] = INSUFFICIENT
        d["expected_on_matured"] = d["calibration"] = INSUFFICIENT
    for k in ("forecasts", "patients", "matured_forecasts", "matured_patients", "events"):
        d[k] = _count(d[k])
    return MON._finite(d)


def _drift(v, window, reference, feats, pick, risk, n, horizons, cfg, tests
           ) -> dict[str, Any]:
    """Drift of the window's forecasts (``n`` patients: the noise level's sample size)."""
    if n < MON.MIN_CELL:
        return {"result": INSUFFICIENT}
    out: dict[str, Any] = {"patients": n, "features": {}, "risks": {}}
    span = (window["start"], window["end"])
    for name, col in feats.items():
        d = MON.drift(col[pick], reference["features"][name], n)
        out["features"][name] = _published(d)
        if n >= cfg.min_patients:
            tests.append(MON.Test("drift", v, span, name, None, d["psi"], 0.0, d))
    for i, h in enumerate(horizons):
        prof = reference["risks"].get(str(h))
        if prof is None:
            continue
        d = MON.drift(risk[:, i], prof, n)
        out["risks"][str(h)] = _published(d)
        if n >= cfg.min_patients:
            tests.append(MON.Test("drift", v, span, f"risk_{h}d", h, d["psi"], 0.0, d))
    return out


def _published(d: dict[str, Any]) -> dict[str, Any]:
    """A drift result as published: a missing share of fewer than 10 patients is not."""
    out = MON._finite(d)
    if out.get("missing_now") and 0 < out["missing_now"] * d["n"] < MON.MIN_CELL:
        out["missing_now"] = f"<{MON.MIN_CELL} patients"
    return out


def _volume(arrays: EventArrays, w0: int, w1: int) -> dict[str, Any]:
    """Events and patients per code dated in the window (codes of fewer than 10
    patients: not shown)."""
    m = (arrays.time_us >= w0) & (arrays.time_us < w1)
    if not m.any():
        return {}
    frame = pd.DataFrame({"code": arrays.code[m], "sid": arrays.subject_id[m]})
    g = frame.groupby("code").agg(events=("sid", "size"), patients=("sid", "nunique"))
    out = {}
    for code, row in g.iterrows():
        if row["patients"] >= MON.MIN_CELL:
            out[arrays.categories[int(code)]] = {"events": int(row["events"]),
                                                 "patients": int(row["patients"])}
    return out
