"""What-if: a twin's risks and trajectories under hypothetical events, beside its own.

The scenario's events are placed at one explicit as-of time (the twin's latest event
unless the request sets one) and both answers — baseline and scenario — are computed at
that same time by :func:`serving.forecasting.forecast_batch`, the computation every
stored forecast uses: a later time would also move age, days-since features and
windows.  Nothing is stored and no twin changes; the service writes the access-log row.

Every answer says it is **associational**: the model learnt what happened to patients
whose records looked like the scenario, and patients who are given a treatment differ
from those who are not (confounding by indication) — a difference is not the effect of
doing it.  The service, the CLI, the page and the CDS card show that sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np

from features.events import NAT_US, EventArrays
from serving.errors import BadInput, Forbidden
from serving.forecasting import ForecastResult, forecast_batch, latest_times
from serving.model_source import LoadedModel
from serving.states import Role
from serving.store.twins import datetime_of, event_arrays
from serving.views import iso

INTERPRETATION = "associational"
INTERPRETATION_TEXT = (
    "Associational, not causal: a difference is what the records of similar patients "
    "show, not the effect of making the change. Patients who are given a treatment "
    "differ from those who are not in ways the records do not capture (confounding by "
    "indication), so a what-if cannot say what a treatment would do for this patient.")
TREATMENT_PREFIX = "RX//"
MAX_SCENARIO_EVENTS = 50
SCENARIO_ID = -1  # the scenario's copy of the twin, inside one forecast call (never stored)


@dataclass(frozen=True)
class ScenarioEvent:
    code: str
    numeric_value: float | None = None


def check_scenario(model: LoadedModel, events: list[ScenarioEvent], role: str) -> None:
    """A scenario the model can answer: codes it knows, with values where it reads them;
    no outcome or competing event; treatments only where the role or task allow."""
    task, spec = model.bundle.task, model.bundle.spec
    known = {c.code: c for c in spec.codes}
    policy = getattr(task, "what_if", None)  # None in tasks pickled before what-ifs
    allowed = set(policy.allowed_codes) if policy is not None else set()
    if not events:
        raise BadInput("a scenario has at least one event", ["body", "events"])
    seen: set[str] = set()
    for i, e in enumerate(events):
        if e.code in seen:
            raise BadInput(f"{e.code} appears twice: a scenario gives each code one value",
                           ["body", "events", i, "code"])
        seen.add(e.code)
    if len(events) > MAX_SCENARIO_EVENTS:
        raise BadInput(f"a scenario has at most {MAX_SCENARIO_EVENTS} events",
                       ["body", "events"])
    for i, e in enumerate(events):
        where = ["body", "events", i, "code"]
        if task.outcome.matches_code(e.code) or task.competing.matches_code(e.code):
            raise BadInput(f"{e.code} is the task's outcome or a competing event: a what-if "
                           "asks about the future, it cannot assume it", where)
        if e.code not in known or known[e.code].kind == "static":
            raise BadInput(f"{e.code} is not an event code the model reads, so it cannot "
                           "change the forecast", where)
        numeric = known[e.code].kind == "numeric"
        if numeric and e.numeric_value is None:
            raise BadInput(f"{e.code} is numeric: give numeric_value (in "
                           f"{known[e.code].unit or 'its unit'})",
                           ["body", "events", i, "numeric_value"])
        if not numeric and e.numeric_value is not None:
            raise BadInput(f"{e.code} carries no value", ["body", "events", i,
                                                           "numeric_value"])
        if e.code.startswith(TREATMENT_PREFIX) and role == Role.CLINICAL \
                and e.code not in allowed:
            raise Forbidden(f"treatment scenarios ({e.code}) are not open to the clinical "
                            "role for this task (the task's what_if.allowed_codes)")


def what_if(model: LoadedModel, subject_id: int, history_rows: list[tuple],
            events: list[ScenarioEvent], as_of: datetime | None) -> dict[str, Any]:
    """Baseline and scenario at one as-of time (naive UTC) from the twin's history rows
    ((subject_id, time, code, value, …), as the store or a MEDS file gives them).  The
    caller has checked the scenario (:func:`check_scenario`, before reading anything)."""
    base = event_arrays(history_rows)
    if as_of is None:
        t = int(latest_times(base, np.array([subject_id], dtype=np.int64))[0])
        if t == NAT_US:
            raise BadInput("the twin has no dated events: give as_of", ["body", "as_of"])
        as_of = datetime_of(t)
    # both in one call: the scenario as a second subject with the same history
    both = _with_scenario(base, subject_id, SCENARIO_ID, as_of, events)
    baseline_r, scenario_r = forecast_batch(model, both, [subject_id, SCENARIO_ID],
                                            [as_of, as_of], explain_rows=False)
    scenario_r = replace(scenario_r, subject_id=subject_id)
    if baseline_r.status != "ok":  # the scenario's own events never make a twin eligible
        scenario_r = replace(scenario_r, status=baseline_r.status, reason=baseline_r.reason,
                             risks=None, contributions=None, trajectories=None)
    return {
        "subject_id": subject_id, "as_of": iso(as_of),
        "model": {"name": model.name, "version": model.version, "run_id": model.run_id},
        "scenario_events": [{"code": e.code, "numeric_value": e.numeric_value,
                             "time": iso(as_of)} for e in events],
        "baseline": _answer(baseline_r), "scenario": _answer(scenario_r),
        "difference": _difference(baseline_r, scenario_r),
        "interpretation": INTERPRETATION, "interpretation_text": INTERPRETATION_TEXT,
        "stored": False,
    }


def _with_scenario(base: EventArrays, subject_id: int, scenario_id: int, as_of: datetime,
                   events: list[ScenarioEvent]) -> EventArrays:
    """The history as it is (``subject_id``) and, as ``scenario_id``, the history with
    the scenario's events at ``as_of``; a value of the same code recorded at that very
    time is replaced (else the higher of the two would read as the last: same-time
    events are ordered by value)."""
    t = int(np.datetime64(as_of, "us").view(np.int64))
    codes = np.asarray(base.categories, dtype=object)[base.code] if len(base) else \
        np.empty(0, dtype=object)
    times = base.time_us.astype("datetime64[us]")
    sids, values = base.subject_id.tolist(), base.value.tolist()
    rows = list(zip(sids, times, codes.tolist(), values, strict=True))
    replaced = (base.time_us == t) & np.isin(codes, [e.code for e in events])
    rows += [(scenario_id, times[i], codes[i], values[i])
             for i in np.flatnonzero(~replaced)]
    rows += [(scenario_id, np.datetime64(t, "us"), e.code,
              np.nan if e.numeric_value is None else float(e.numeric_value)) for e in events]
    return event_arrays(rows)


def _answer(r: ForecastResult) -> dict[str, Any]:
    return {"status": r.status, "reason": r.reason, "risks": r.risks,
            "trajectories": r.trajectories}


def _difference(a: ForecastResult, b: ForecastResult) -> dict[str, Any] | None:
    """Scenario minus baseline: risks per horizon, trajectory medians per code and
    horizon (None when either is not eligible)."""
    if a.status != "ok" or b.status != "ok":
        return None
    paths = [{"code": x["code"], "unit": x["unit"], "horizon_days": x["horizon_days"],
              "median": _round(y["median"] - x["median"])}
             for x, y in zip(a.trajectories or [], b.trajectories or [], strict=True)]
    return {"risks": {h: _round(b.risks[h] - a.risks[h]) for h in a.risks},
            "trajectories": paths}


def _round(v: float) -> float:
    return float(f"{v:.6g}")
