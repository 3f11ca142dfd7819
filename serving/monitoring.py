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
    """Every stored forecast of the model that has risks (one row each)."""
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
        "risks": [orjson.loads(r) if isinstance(r, str | bytes) else r for r in risks]})


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
    # the earliest arrival from each event on (later-dated events included), per subject
    ev["later_rec"] = ev.iloc[::-1].groupby("subject_id")["rec"].cummin().iloc[::-1]
    q = pd.DataFrame({"subject_id": subject_id, "t": as_of_us, "row": np.arange(subject_id.size)})
    merged = pd.merge_asof(q.sort_values("t"), ev.sort_values("t")[["subject_id", "t",
                                                                     "later_rec"]],
                           on="t", by="subject_id", direction="forward",
                           allow_exact_matches=False)
    hit = merged["later_rec"].notna().to_numpy()
    out[merged["row"].to_numpy()[hit]] = merged["later_rec"].to_numpy()[hit].astype(np.int64)
    return out


def windows_of(start_us: int, end_us: int, days: int) -> list[tuple[int, int]]:
    step = days * MON.US_PER_DAY
    out, t = [], start_us
    while t < end_us:
        out.append((t, min(t + step, end_us)))
        t += step
    return out


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
    lo = _us(since) if since is not None else int(as_of[keep].min()) if keep.any() else 0
    hi = _us(until) if until is not None else now_us + 1
    keep &= (as_of >= lo) & (as_of < hi)
    # the task's prediction-time policy, as training chose its rows (per version)
    for v in set(version[keep].tolist()):
        rows = np.flatnonzero(keep & (version == v))
        keep[rows[~policy_mask(sid[rows], as_of[rows], task)]] = False
    report["now"] = _iso(now_us)
    report["since"], report["until"] = _iso(lo), _iso(hi)
    report["forecasts"] = {"stored": len(fc), "counted": int(keep.sum()),
                           "not_counted": int((~keep).sum()),
                           "rule": "the first forecast per (version, subject, as-of time), "
                                   "made within max_forecast_delay_days of its as-of time "
                                   "and before anything later was known; then the task's "
                                   "prediction-time policy (min_gap_days), as training "
                                   "chose its rows"}
    if not keep.any():
        return report
    idx = np.flatnonzero(keep)
    sid, as_of, version = sid[idx], as_of[idx], version[idx]
    risks = fc["risks"].to_numpy(dtype=object)[idx]
    say(f"labelling {idx.size:,} counted forecasts")
    summary = subject_summary(arrays, task)
    labels = labels_at(arrays, task, sid, as_of, summary)
    horizons = list(task.horizons_days)
    risk = np.array([[r.get(f"{h}d", np.nan) if isinstance(r, dict) else np.nan
                      for h in horizons] for r in risks], dtype=np.float64)
    tests: list[MON.Test] = []
    for v in sorted(set(version.tolist()), key=_version_key):
        data = version_data(v)
        in_v = version == v
        report["versions"][v] = _version_report(
            v, data, task, cfg, arrays, sid[in_v], as_of[in_v], risk[in_v],
            labels[in_v].reset_index(drop=True), horizons, lo, hi, now_us, window_days,
            tests, say)
    report["tests"] = len(tests)
    report["alerts"] = MON.decide_alerts(tests, cfg)
    report["alpha"] = cfg.alpha
    return report


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (1 << 62, v)


def _version_report(v, data: VersionData | None, task: Task, cfg, arrays: EventArrays,
                    sid, as_of, risk, labels, horizons, lo, hi, now_us, window_days,
                    tests: list, say) -> dict[str, Any]:
    metrics = data.metrics if data is not None else {}
    reference = getattr(data.bundle, "reference", None) if data is not None else None
    out: dict[str, Any] = {
        "forecasts": int(sid.size), "patients": int(np.unique(sid).size),
        "heldout": {str(h): {m: _heldout(metrics, m, h) for m in MON.REALISED_METRICS}
                    for h in horizons},
        "reference": "stored with the version" if reference else
                     "none: this version was trained before monitoring (no drift)",
        "windows": []}
    feats = None
    first_rows = _one_per_patient(sid, as_of, lo, window_days, cfg.drift_sample)
    if reference and data is not None and first_rows.size:
        names = data.bundle.spec.feature_names
        wanted = [n for n in reference["top_features"] if n in names]
        say(f"version {v}: features of {first_rows.size:,} window patients for drift")
        x = data.bundle.features_for(arrays, sid[first_rows], as_of[first_rows])
        feats = {n: x[:, names.index(n)] for n in wanted}
        row_of = {int(r): k for k, r in enumerate(first_rows)}
    for w0, w1 in windows_of(lo, hi, window_days):
        in_w = (as_of >= w0) & (as_of < w1)
        if not in_w.any():
            continue
        window: dict[str, Any] = {"start": _iso(w0), "end": _iso(w1),
                                  "forecasts": int(in_w.sum()),
                                  "patients": int(np.unique(sid[in_w]).size),
                                  "horizons": {}}
        rows = np.flatnonzero(in_w)
        for i, h in enumerate(horizons):
            matured = as_of[rows] + h * MON.US_PER_DAY <= now_us
            hw = MON.horizon_window(risk[rows, i], sid[rows], labels.iloc[rows], matured, h,
                                    n_boot=cfg.n_bootstrap, seed=w0 % (2**31) + h)
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
            pick = [row_of[int(r)] for r in first_rows if w0 <= as_of[r] < w1]
            window["drift"] = _drift(v, window, reference, feats, pick,
                                     risk[first_rows][pick], horizons, cfg, tests)
        window["volume"] = _volume(arrays, w0, w1)
        out["windows"].append(window)
    return out


def _one_per_patient(sid, as_of, lo, days, cap) -> np.ndarray:
    """Per window, one counted forecast per patient, chosen at random (seeded) as the
    reference chose one training row per patient, so the two compare like with like (at
    most ``cap`` patients per window, a seeded sample): the rows drift is measured on."""
    if sid.size == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(0)
    w = (as_of - lo) // (days * MON.US_PER_DAY)
    order = np.lexsort((rng.random(sid.size), sid, w))
    first = np.r_[True, (w[order][1:] != w[order][:-1]) | (sid[order][1:] != sid[order][:-1])]
    rows = order[first]
    out = []
    for k in np.unique(w[rows]):
        r = rows[w[rows] == k]
        out.append(r if r.size <= cap else rng.choice(r, cap, replace=False))
    return np.sort(np.concatenate(out))


def _heldout(metrics: dict[str, float], m: str, h: int) -> dict[str, float] | None:
    base = f"{m}_{h}d"
    if base not in metrics:
        return None
    return {"estimate": metrics[base], "lower": metrics.get(base + "_lo"),
            "upper": metrics.get(base + "_hi")}


def _horizon_json(hw: MON.HorizonWindow) -> dict[str, Any]:
    d = asdict(hw)
    if hw.patients < MON.MIN_CELL:
        return {"horizon": hw.horizon, "result": INSUFFICIENT}
    if hw.matured_patients < MON.MIN_CELL:
        d["realised"] = d["realised_patients"] = INSUFFICIENT
        d["expected_on_matured"] = INSUFFICIENT
        d["matured_patients"] = f"<{MON.MIN_CELL}" if hw.matured_patients else 0
        d["matured_forecasts"] = d["events"] = None
    return MON._finite(d)


def _drift(v, window, reference, feats, pick, risk, horizons, cfg, tests) -> dict[str, Any]:
    n = len(pick)
    if n < MON.MIN_CELL:
        return {"result": INSUFFICIENT}
    out: dict[str, Any] = {"patients": n, "features": {}, "risks": {}}
    span = (window["start"], window["end"])
    for name, col in feats.items():
        d = MON.drift(col[pick], reference["features"][name])
        out["features"][name] = MON._finite(d)
        if n >= cfg.min_patients:
            tests.append(MON.Test("drift", v, span, name, None, d["psi"], 0.0, d))
    for i, h in enumerate(horizons):
        prof = reference["risks"].get(str(h))
        if prof is None:
            continue
        d = MON.drift(risk[:, i], prof)
        out["risks"][str(h)] = MON._finite(d)
        if n >= cfg.min_patients:
            tests.append(MON.Test("drift", v, span, f"risk_{h}d", h, d["psi"], 0.0, d))
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
