"""Prediction times, eligibility and censoring-aware labels (DESIGN.md, *Labels*).

At prediction time *t* and horizon *H* a row is

* **positive** if the outcome occurs in (*t*, *t*+*H*] (tied with a competing event, the
  outcome wins);
* **negative** if a competing event comes first (the target is the cumulative incidence
  of the outcome) or the subject is observed event-free through *t*+*H*;
* **censored** otherwise, with the censoring time kept — never silently negative.

A row is not eligible when the outcome or a competing event happened at or before *t*.
A subject's follow-up ends at their last event of any code.  All of it is vectorised
over subjects: no Python loop per subject or per prediction time.  Labels a task takes
from a MEDS label file are read by :mod:`features.label_files` instead.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.events import BIRTH_CODE, DEATH_CODE, NAT_US, EventArrays, subject_bounds
from features.task import EventDefinition, Task
from features.timeindex import DAYS_PER_YEAR, US_PER_DAY, TimeIndex

NEVER = np.iinfo(np.int64).max
OUTCOME, COMPETING, CENSORED = 1, 2, 0
_OPS = {"below": operator.lt, "above": operator.gt, "at_most": operator.le,
        "at_least": operator.ge}


def label_column(horizon_days: int) -> str:
    return f"label_{horizon_days}d"


def censored_column(horizon_days: int) -> str:
    return f"censored_{horizon_days}d"


def _code_flags(categories: tuple[str, ...], wanted) -> np.ndarray:
    """Per category, ``wanted(code)``."""
    return np.fromiter((bool(wanted(c)) for c in categories), dtype=bool,
                       count=len(categories))


def _predicate_flags(definition: EventDefinition, categories: tuple[str, ...]
                     ) -> list[tuple[np.ndarray, object, float]]:
    """Per value predicate of ``definition``: which categories are its code, with its
    comparison and threshold."""
    return [(_code_flags(categories, lambda c, p=pred: c == p.code), _OPS[pred.op],
             pred.value) for pred in definition.parsed_predicates()]


def _event_mask(arrays: EventArrays, flags) -> np.ndarray:
    """Rows (with a time) that are an occurrence of a definition, by its flags."""
    codes, preds = flags
    if not codes.size:
        return np.zeros(len(arrays), dtype=bool)
    mask = codes[arrays.code]
    for on_code, op, value in preds:
        with np.errstate(invalid="ignore"):
            mask |= on_code[arrays.code] & op(arrays.value, value)
    return mask & (arrays.time_us != NAT_US)


class _TaskCodes:
    """What a task's summary asks of each code (an outcome? a visit? ...), each code
    worked out once: a service summarises one patient at a time, each with its own few
    codes, from the same vocabulary."""

    MAX_CODES = 100_000

    def __init__(self, task: Task):
        from fnmatch import fnmatchcase

        excluded = task.features.exclude_codes
        self.outcome, self.competing = task.outcome, task.competing
        self._tests = (task.outcome.matches_code, task.competing.matches_code,
                       lambda c: c == BIRTH_CODE, lambda c: c == DEATH_CODE,
                       lambda c: c != BIRTH_CODE
                       and not any(fnmatchcase(c, p) for p in excluded))
        self._memo: dict[str, tuple[bool, ...]] = {}

    def flags(self, categories: tuple[str, ...]) -> _TaskFlags:
        memo = self._memo
        if len(memo) > self.MAX_CODES:
            memo.clear()
        rows = [memo.get(c) or memo.setdefault(c, tuple(bool(t(c)) for t in self._tests))
                for c in categories]
        table = np.array(rows, dtype=bool).reshape(len(categories), len(self._tests))
        return _TaskFlags(
            (table[:, 0], _predicate_flags(self.outcome, categories)),
            (table[:, 1], _predicate_flags(self.competing, categories)),
            table[:, 2], table[:, 3], table[:, 4])


@dataclass(frozen=True)
class _TaskFlags:
    """Per category of one vocabulary: the task's outcome and competing event (codes,
    and value predicates), birth, death, and whether an event of it makes a visit."""

    outcome: tuple
    competing: tuple
    birth: np.ndarray
    death: np.ndarray
    visit: np.ndarray

    @staticmethod
    def rows(flags: np.ndarray, arrays: EventArrays) -> np.ndarray:
        return flags[arrays.code] if flags.size else np.zeros(len(arrays), dtype=bool)


_TASKS: dict[int, tuple[Task, _TaskCodes]] = {}  # by id(task), the task kept alive
_TASKS_MAX = 32


def _task_flags(task: Task, categories) -> _TaskFlags:
    """The task's flags over ``categories`` (each code's worked out once per task)."""
    hit = _TASKS.get(id(task))
    if hit is None or hit[0] is not task:
        if len(_TASKS) >= _TASKS_MAX:
            _TASKS.clear()
        hit = _TASKS[id(task)] = (task, _TaskCodes(task))
    return hit[1].flags(tuple(categories))


def first_time_per_subject(
    arrays: EventArrays, mask: np.ndarray, starts: np.ndarray
) -> np.ndarray:
    """Earliest flagged time per subject segment (``NEVER`` when none)."""
    if starts.size == 0:
        return np.empty(0, dtype=np.int64)
    t = np.where(mask, arrays.time_us, NEVER)
    return np.minimum.reduceat(t, starts)


def subject_summary(arrays: EventArrays, task: Task) -> pd.DataFrame:
    """Per subject: follow-up end, first outcome, first competing event, birth, first visit."""
    return pd.DataFrame(summary_arrays(arrays, task))


def summary_arrays(arrays: EventArrays, task: Task) -> dict[str, np.ndarray]:
    """:func:`subject_summary` as plain arrays (no DataFrame: the online path is one
    subject, where building a frame would cost more than the numbers)."""
    subjects, starts, ends = subject_bounds(arrays.subject_id)
    timed = arrays.time_us != NAT_US
    last = np.where(timed, arrays.time_us, NAT_US)
    end = np.maximum.reduceat(last, starts) if starts.size else np.empty(0, np.int64)
    flags = _task_flags(task, arrays.categories)
    visit = _TaskFlags.rows(flags.visit, arrays) & timed
    return {
            "subject_id": subjects,
            "start": starts,
            "end": ends,
            "followup_end_us": end,
            "outcome_us": first_time_per_subject(
                arrays, _event_mask(arrays, flags.outcome), starts),
            "competing_us": first_time_per_subject(
                arrays, _event_mask(arrays, flags.competing), starts),
            "birth_us": first_time_per_subject(
                arrays, _TaskFlags.rows(flags.birth, arrays) & timed, starts),
            "death_us": first_time_per_subject(
                arrays, _TaskFlags.rows(flags.death, arrays) & timed, starts),
            "first_visit_us": first_time_per_subject(arrays, visit, starts),
        }


def _visit_mask(arrays: EventArrays, task: Task) -> np.ndarray:
    """Events that make a visit: timed, not birth, not an excluded (administrative) code."""
    flags = _task_flags(task, arrays.categories)
    return _TaskFlags.rows(flags.visit, arrays) & (arrays.time_us != NAT_US)


def visit_times(arrays: EventArrays, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (subject_id, time) pairs with at least one visit-making event."""
    m = _visit_mask(arrays, task)
    sid, t = arrays.subject_id[m], arrays.time_us[m]
    if sid.size == 0:
        return sid, t
    new = np.ones(sid.size, dtype=bool)
    new[1:] = (sid[1:] != sid[:-1]) | (t[1:] != t[:-1])
    return sid[new], t[new]


def _thin(sidx: np.ndarray, t: np.ndarray, gap_us: int, max_per_subject: int | None) -> np.ndarray:
    """Greedy 'at most one per gap': keep a time, skip later ones closer than ``gap_us``.

    Iterates once per kept time of the busiest subject, each step vectorised over all
    subjects (``sidx``/``t`` sorted by subject then time).
    """
    n = t.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    _, first, seg_end = subject_bounds(sidx)
    keep = np.zeros(n, dtype=bool)
    if gap_us <= 0 and max_per_subject is None:
        return ~keep
    index = TimeIndex.build(np.concatenate((t, t + gap_us)))
    keys = index.event_keys(sidx, t)
    cur, end = first.copy(), seg_end.copy()
    taken = 0
    while cur.size:
        keep[cur] = True
        taken += 1
        if max_per_subject is not None and taken >= max_per_subject:
            break
        if gap_us <= 0:
            nxt = cur + 1
        else:
            target = index.event_keys(sidx[cur], t[cur] + gap_us)
            nxt = np.searchsorted(keys, target, side="left")
        alive = nxt < end
        cur, end = nxt[alive], end[alive]
    return keep


def prediction_times(arrays: EventArrays, task: Task, summary: pd.DataFrame) -> pd.DataFrame:
    """Eligible prediction times per the task's policy, with each subject's summary row."""
    sid, t = visit_times(arrays, task)
    subj = summary["subject_id"].to_numpy()
    row = np.searchsorted(subj, sid)
    s = summary.iloc[row]
    first = s["first_visit_us"].to_numpy()
    pt, el = task.prediction_times, task.eligibility
    visit_no = _rank_within(sid)
    ok = (
        (t >= first + int(pt.start_after_days * US_PER_DAY))
        & (t < s["outcome_us"].to_numpy())
        & (t < s["competing_us"].to_numpy())
        & (t < s["death_us"].to_numpy())  # alive, whether or not death competes
        & (t - first >= int(el.min_history_days * US_PER_DAY))
        & (visit_no >= el.min_visits)
    )
    if el.min_age_years is not None or el.max_age_years is not None:
        birth = s["birth_us"].to_numpy()
        age = (t - birth) / (US_PER_DAY * DAYS_PER_YEAR)
        known = birth != NEVER
        if el.min_age_years is not None:
            ok &= known & (age >= el.min_age_years)
        if el.max_age_years is not None:
            ok &= known & (age <= el.max_age_years)
    sid, t, row = sid[ok], t[ok], row[ok]
    keep = _thin(np.searchsorted(subj, sid), t, int(pt.min_gap_days * US_PER_DAY),
                 pt.max_per_subject)
    return pd.DataFrame({"subject_id": sid[keep], "time_us": t[keep], "summary_row": row[keep]})


def policy_mask(subject_ids: np.ndarray, times_us: np.ndarray, task: Task) -> np.ndarray:
    """Which of these (subject, time) pairs the task's prediction-time policy keeps (at
    most one per ``min_gap_days``, at most ``max_per_subject``), greedily from each
    subject's first — as :func:`prediction_times` chooses training rows; any order."""
    sid = np.asarray(subject_ids, dtype=np.int64)
    t = np.asarray(times_us, dtype=np.int64)
    order = np.lexsort((t, sid))
    pt = task.prediction_times
    _, sidx = np.unique(sid[order], return_inverse=True)
    keep = _thin(sidx, t[order], int(pt.min_gap_days * US_PER_DAY), pt.max_per_subject)
    out = np.zeros(sid.size, dtype=bool)
    out[order[keep]] = True
    return out


def _rank_within(sid: np.ndarray) -> np.ndarray:
    """1-based position of each row within its subject (rows sorted by subject)."""
    if sid.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, starts, ends = subject_bounds(sid)
    return np.arange(sid.size) - np.repeat(starts, ends - starts) + 1


def label_rows(
    times: pd.DataFrame, summary: pd.DataFrame, horizons_days: list[int]
) -> pd.DataFrame:
    """Labels per horizon for prediction rows (``subject_id``, ``time_us``, ``summary_row``).

    Adds ``event_type`` (1 outcome, 2 competing, 0 censored: what ends observation first
    after *t*), ``event_time_days`` (days from *t* to it) and, per horizon,
    ``label_<H>d`` (1.0, 0.0, or NaN when censored) and ``censored_<H>d``.
    """
    s = summary.iloc[times["summary_row"].to_numpy()]
    t = times["time_us"].to_numpy()
    out_t, comp_t = s["outcome_us"].to_numpy(), s["competing_us"].to_numpy()
    end_t = s["followup_end_us"].to_numpy()
    outcome_first = (out_t != NEVER) & (out_t <= comp_t)  # a tie counts as the outcome
    competing_first = (comp_t != NEVER) & (comp_t < out_t)
    event_type = np.where(outcome_first, OUTCOME, np.where(competing_first, COMPETING, CENSORED))
    stop = np.where(outcome_first, out_t, np.where(competing_first, comp_t, end_t))
    frame = pd.DataFrame(
        {
            "subject_id": times["subject_id"].to_numpy(),
            "prediction_time": t.astype("datetime64[us]"),
            "event_type": event_type.astype(np.int8),
            "event_time_days": ((stop - t) / US_PER_DAY).astype(np.float64),
        }
    )
    for h in horizons_days:
        limit = t + h * US_PER_DAY
        pos = outcome_first & (out_t <= limit)
        neg = (competing_first & (comp_t <= limit)) | (~pos & (end_t >= limit))
        label = np.where(pos, 1.0, np.where(neg, 0.0, np.nan))
        frame[label_column(h)] = label.astype(np.float32)
        frame[censored_column(h)] = np.isnan(label)
    return frame


def derive_labels(arrays: EventArrays, task: Task) -> pd.DataFrame:
    """Prediction times and their labels for all subjects in ``arrays``."""
    summary = subject_summary(arrays, task)
    return label_rows(prediction_times(arrays, task, summary), summary, task.horizons_days)


def labels_at(arrays: EventArrays, task: Task, subject_ids: np.ndarray, times_us: np.ndarray,
              summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """The labels of given (subject, time) pairs — a stored forecast's realised outcome —
    by the very rows :func:`label_rows` gives training (one row per pair, in the given
    order).  A subject with no events in ``arrays`` is censored at ``t`` (nothing is
    known after it)."""
    summary = subject_summary(arrays, task) if summary is None else summary
    subject_ids = np.asarray(subject_ids, dtype=np.int64)
    times_us = np.asarray(times_us, dtype=np.int64)
    subj = summary["subject_id"].to_numpy()
    row = np.searchsorted(subj, subject_ids)
    known = (row < subj.size) & (subj[np.minimum(row, max(subj.size - 1, 0))] == subject_ids) \
        if subj.size else np.zeros(subject_ids.size, dtype=bool)
    if not known.all():  # unknown subjects: followed up to t, nothing after
        extra = pd.DataFrame({"subject_id": subject_ids[~known], "start": 0, "end": 0,
                              "followup_end_us": times_us[~known],
                              **{c: NEVER for c in ("outcome_us", "competing_us", "birth_us",
                                                    "death_us", "first_visit_us")}})
        row = row.copy()
        row[~known] = subj.size + np.arange(int((~known).sum()))
        summary = pd.concat([summary, extra], ignore_index=True)
    times = pd.DataFrame({"subject_id": subject_ids, "time_us": times_us, "summary_row": row})
    return label_rows(times, summary, task.horizons_days)


def ineligibility_reasons(arrays: EventArrays, task: Task, subject_ids: np.ndarray,
                          t_us: np.ndarray) -> list[str | None]:
    """Why each (subject, t) may not get a forecast (None when eligible), vectorised.

    The task's eligibility applies (alive, outcome and competing events not yet happened,
    minimum history, visits and age); the prediction-time policy (gaps) does not.
    """
    subject_ids = np.asarray(subject_ids, dtype=np.int64)
    t_us = np.asarray(t_us, dtype=np.int64)
    summary = summary_arrays(arrays, task)
    subj = summary["subject_id"]
    pos = np.searchsorted(subj, subject_ids)
    known = (pos < subj.size) & (subj[np.minimum(pos, max(subj.size - 1, 0))] == subject_ids) \
        if subj.size else np.zeros(subject_ids.size, dtype=bool)
    pos = np.minimum(pos, max(subj.size - 1, 0))

    def col(name: str) -> np.ndarray:
        return summary[name][pos] if subj.size else np.full(pos.size, NEVER)

    death, outcome, comp = col("death_us"), col("outcome_us"), col("competing_us")
    first, birth = col("first_visit_us"), col("birth_us")
    vsid, vt = visit_times(arrays, task)
    # visits at or before t: count per query via searchsorted on (subject, time) keys
    index = TimeIndex.build(np.concatenate((vt, t_us)))
    vkeys = index.event_keys(np.searchsorted(subj, vsid), vt)
    qkeys = index.event_keys(pos, t_us)
    start = np.searchsorted(vkeys, pos.astype(np.int64) * index.modulus, side="left")
    visits = np.searchsorted(vkeys, qkeys, side="right") - start
    el = task.eligibility
    age = (t_us - birth) / (US_PER_DAY * DAYS_PER_YEAR)
    out: list[str | None] = []
    for i in range(subject_ids.size):
        t = t_us[i]
        if not known[i]:
            reason = "no events for this subject"
        elif death[i] <= t:
            reason = "the subject died at or before the forecast time"
        elif outcome[i] <= t:
            reason = "the outcome has already happened"
        elif comp[i] <= t:
            reason = "a competing event has already happened"
        elif first[i] == NEVER or first[i] > t:
            reason = "no visit at or before the forecast time"
        elif t - first[i] < el.min_history_days * US_PER_DAY:
            reason = f"less than {el.min_history_days:g} days of history"
        elif visits[i] < el.min_visits:
            reason = f"fewer than {el.min_visits} visits"
        elif (el.min_age_years is not None or el.max_age_years is not None) and birth[i] == NEVER:
            reason = "age unknown (no birth date) and the task restricts age"
        elif el.min_age_years is not None and age[i] < el.min_age_years:
            reason = f"younger than {el.min_age_years:g} years"
        elif el.max_age_years is not None and age[i] > el.max_age_years:
            reason = f"older than {el.max_age_years:g} years"
        else:
            reason = None
        out.append(reason)
    return out


def ineligibility_reason(arrays: EventArrays, task: Task, subject_id: int, t_us: int) -> str | None:
    """Why one subject may not get a forecast at *t* (None when eligible)."""
    return ineligibility_reasons(arrays, task, np.array([subject_id]), np.array([t_us]))[0]
