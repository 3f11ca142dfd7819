"""A synthetic chronic kidney disease (CKD) cohort: the embedded default data set.

The generative model (the numbers live here):

* **Baseline** at enrolment (a date in 2012–2018): age ~ N(63, 12) clipped to 25–90;
  sex (47% female); diabetes (logistic in age, about 30%); hypertension (logistic in age
  and diabetes, about 60%); eGFR ~ N(46, 14) clipped 16–100 ml/min/1.73m²; urine
  albumin-creatinine ratio (UACR) log-normal around 60 mg/g, higher with diabetes; HbA1c
  ~ N(7.6, 1.1)% with diabetes, N(5.5, 0.35)% without; systolic blood pressure (SBP)
  ~ N(132 + 10·hypertension, 14) mmHg; ACE inhibitor and SGLT2 inhibitor use.
* **Progression**, monthly: true eGFR falls at a rate driven by diabetes, hypertension,
  albuminuria and SBP, times an **unobserved patient-specific factor** (log-normal with
  mean 1 and SD 0.9 on the log scale: two patients with the same risk factors can lose 1
  or 8 ml/min a year); 10% of patients are **unobserved fast progressors** (a further
  2–6 ml/min a year that no covariate explains); the rate **changes** at a random time
  (uniform over 30 years, so in about a third of patients during follow-up: it triples
  or falls to a third); and each month brings a 0.5% chance of an **acute kidney
  injury** that takes a lasting 10–35% of the remaining function.  So a patient's own
  trajectory carries information the covariates do not, and not all of the future is
  foreseeable.  An ACE inhibitor slows the fall by 30% and an SGLT2 inhibitor by 40%;
  SBP, HbA1c and UACR drift.
* **Measurement** at a visit: eGFR with probability 0.92, SBP 0.85, HbA1c 0.70
  (diabetes) or 0.15, UACR 0.35.  eGFR carries the noise seen between repeated clinical
  tests — a within-person coefficient of variation of about 8% (creatinine's analytical
  and biological variation; eGFR's reference change value is about ±20%) — and 4% of
  measurements fall during an intercurrent illness (volume depletion, a transient
  injury) and read 10–40% low; UACR varies by about 35% between tests, as it does.
* **Visits** follow what was *measured*, not the true state: each month a visit happens
  with a probability that rises as the last measured eGFR falls, and a measured fall of
  more than 15% since the previous value brings the patient back the next month with
  probability 0.6 (a clinician re-checks a worrying result).  Month 0 is the enrolment
  visit.  Medications start at visits (ACE inhibitor for hypertension or albuminuria;
  SGLT2 inhibitor for diabetes or a measured eGFR < 60, mostly from 2019).
* **Outcome**: ESKD (``DX//ESKD``: kidney failure treated by dialysis or a transplant).
  Its monthly hazard (at most 0.25) rises smoothly, with a scale of 4.5 ml/min, as true
  eGFR falls toward a **patient-specific threshold** (N(8, 3) ml/min, clipped 4–16:
  dialysis starts earlier in some patients than in others).  Some of the old choose
  **conservative care** instead (unobserved; 60% at the oldest ages): they rarely start
  dialysis, and below their threshold their risk of death is five times higher.
  **Competing event**: death (``MEDS_DEATH``), Gompertz in age, higher with low eGFR,
  diabetes and male sex.  **Loss to follow-up**: about 5% a year, after which nothing is
  recorded.  Subjects still followed at the end of 2024 get ``ADMIN//END_OF_FOLLOWUP``
  there (registry linkage knows they are alive and ESKD-free).

The result is a task of realistic difficulty: on 5,000 patients a LightGBM model on the
windowed features reaches a held-out AUROC of about 0.90 at one year and 0.90 at two
(published CKD progression scores reach 0.80–0.90 at two years in external validation;
the previous version of this simulator gave 0.98), and about a quarter of the patients
reach kidney failure over up to 13 years of follow-up.

Same seed, same events, same bytes on disk.

**A steady population** (``steady=True``, ``twincast simulate --steady``): patients
enrol uniformly from 1990 to 2024 and SGLT2 inhibitors are as common in every year, so
that after the first years (about 2000, once enrolment and exits balance) every calendar
window of visits is drawn from the same distribution as every other — the "unshifted"
deployment that monitoring's false-alarm rate is measured on.  The default cohort is a
closed one (enrolment 2012–2018, SGLT2 mostly from 2019): it ages, and its later years
really do differ from its pooled rows.

**Shifts** (for monitoring: ``twincast simulate --shift egfr_assay:1.15@2021-01-01``):
``egfr_assay`` — from the date on, the laboratory's eGFR assay reads ``factor`` times the
value the old assay would have given (a recalibrated creatinine method).  The kidneys'
true course is unchanged, but the clinic acts on what it measures — fewer visits and
re-checks, fewer SGLT2 starts for readings above 60 — so a model trained before the
change reads the patients as healthier than they are and under-estimates their risk.  A
shift draws no random numbers: the same seed gives the same patients, and the same
events before the date.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.events import (
    BIRTH_CODE,
    DEATH_CODE,
    END_OF_FOLLOWUP_CODE,
    canonical_order,
    meds_directory,
    write_shard,
)
from features.timeindex import US_PER_DAY

if TYPE_CHECKING:
    from distributed import Client

EPOCH = np.datetime64("1970-01-01", "D")
ENROL_FIRST = (np.datetime64("2012-01-01", "D") - EPOCH).astype(int)
ENROL_LAST = (np.datetime64("2018-12-31", "D") - EPOCH).astype(int)
STUDY_END = (np.datetime64("2024-12-31", "D") - EPOCH).astype(int)
SGLT2_ERA = (np.datetime64("2019-01-01", "D") - EPOCH).astype(int)
STEADY_FIRST = (np.datetime64("1990-01-01", "D") - EPOCH).astype(int)
MONTH_DAYS = 30.4375

CODES = pd.DataFrame(
    [
        ("LAB//EGFR", "Estimated glomerular filtration rate", "ml/min/1.73m²"),
        ("LAB//HBA1C", "Haemoglobin A1c", "%"),
        ("LAB//UACR", "Urine albumin-creatinine ratio", "mg/g"),
        ("VITAL//SBP", "Systolic blood pressure", "mmHg"),
        ("RX//ACEI", "ACE inhibitor started", None),
        ("RX//SGLT2", "SGLT2 inhibitor started", None),
        ("DX//DIABETES", "Diabetes mellitus", None),
        ("DX//HYPERTENSION", "Hypertension", None),
        ("DX//ESKD", "End-stage kidney disease (kidney failure)", None),
        ("GENDER//F", "Female", None),
        ("GENDER//M", "Male", None),
        (BIRTH_CODE, "Birth", None),
        (DEATH_CODE, "Death", None),
        (END_OF_FOLLOWUP_CODE, "Last date the subject is known to be followed", None),
    ],
    columns=["code", "description", "unit"],
)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class _Events:
    """Columnar event buffers appended month by month."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, str, np.ndarray]] = []

    def add(self, sid: np.ndarray, t_us: np.ndarray, code: str, value=None) -> None:
        if sid.size:
            v = np.full(sid.size, np.nan) if value is None else np.asarray(value, float)
            self.parts.append((sid, t_us, code, v))

    def frame(self) -> pd.DataFrame:
        sid = np.concatenate([p[0] for p in self.parts])
        t = np.concatenate([p[1] for p in self.parts])
        codes = pd.Categorical.from_codes(
            np.concatenate([np.full(p[0].size, CODES.index[CODES.code == p[2]][0])
                            for p in self.parts]),
            categories=CODES["code"].tolist(),
        )
        value = np.concatenate([p[3] for p in self.parts]).astype(np.float32)
        df = pd.DataFrame({
            "subject_id": sid.astype(np.int64),
            "time": t.view("datetime64[us]"),
            "code": codes,
            "numeric_value": value,
            "text_value": pd.Series([None] * sid.size, dtype="str"),
        })
        return df.iloc[canonical_order(df)].reset_index(drop=True)


@dataclass(frozen=True)
class Shift:
    """A documented change from a date on (see the module's docstring)."""

    kind: str
    factor: float
    start_day: int  # days since 1970-01-01

    KINDS: ClassVar[tuple[str, ...]] = ("egfr_assay",)

    @classmethod
    def parse(cls, text: str) -> Shift:
        """``KIND:FACTOR@YYYY-MM-DD``, e.g. ``egfr_assay:1.15@2021-01-01``."""
        try:
            head, date = text.split("@")
            kind, factor = head.split(":")
            day = int((np.datetime64(date, "D") - EPOCH).astype(int))
            value = float(factor)
        except ValueError:
            raise ValueError(f"a shift is KIND:FACTOR@YYYY-MM-DD (e.g. "
                             f"egfr_assay:1.15@2021-01-01), got {text!r}") from None
        if kind not in cls.KINDS:
            raise ValueError(f"unknown shift {kind!r}: one of {list(cls.KINDS)}")
        if not (0.2 <= value <= 5.0):
            raise ValueError(f"shift factor {value} is outside 0.2 to 5")
        return cls(kind, value, day)

    def describe(self) -> str:
        date = str(EPOCH + np.timedelta64(self.start_day, "D"))
        return f"{self.kind}: x{self.factor:g} from {date}"

    def text(self) -> str:
        """The ``KIND:FACTOR@YYYY-MM-DD`` form :meth:`parse` reads."""
        return f"{self.kind}:{self.factor:g}@{EPOCH + np.timedelta64(self.start_day, 'D')}"


@dataclass(frozen=True)
class Intervention:
    """The same patients in two worlds (the true effect a what-if is measured against):
    in month ``month`` of each patient's follow-up everyone still followed has a visit,
    at which an SGLT2 inhibitor is started for those not on one (``start=True``) or is
    not (``start=False``: then the natural course, later starts included).  Until that
    visit both worlds draw the same random numbers, so the histories are the same up to
    it; afterwards they differ by the treatment and what follows from it."""

    month: int
    start: bool


def simulate_cohort(n_subjects: int, seed: int | np.random.SeedSequence = 0,
                    first_subject_id: int = 1, shift: Shift | None = None,
                    steady: bool = False,
                    intervention: Intervention | None = None) -> pd.DataFrame:
    """Simulate ``n_subjects`` CKD patients as canonical MEDS events (``shift``: a
    documented change from a date on; ``steady``: an open cohort in a steady state;
    ``intervention``: a treatment decided for everyone at one month, see
    :class:`Intervention`; ``seed``: anything ``numpy.random.default_rng`` takes)."""
    rng = np.random.default_rng(seed)
    n = int(n_subjects)
    sid = np.arange(first_subject_id, first_subject_id + n, dtype=np.int64)
    ev = _Events()
    day_us = US_PER_DAY

    enrol_first = STEADY_FIRST if steady else ENROL_FIRST
    sglt2_era = STEADY_FIRST if steady else SGLT2_ERA
    enrol = rng.integers(enrol_first, (STUDY_END if steady else ENROL_LAST + 1), n)
    age0 = np.clip(rng.normal(63, 12, n), 25, 90)
    female = rng.random(n) < 0.47
    diabetes = rng.random(n) < _sigmoid(-0.9 + 0.03 * (age0 - 60))
    htn = rng.random(n) < _sigmoid(0.2 + 0.04 * (age0 - 60) + 0.5 * diabetes)
    egfr = np.clip(rng.normal(46, 14, n), 16, 100)
    log_uacr = rng.normal(np.log(60) + 0.6 * diabetes, 1.2, n)
    hba1c = np.where(diabetes, rng.normal(7.6, 1.1, n), rng.normal(5.5, 0.35, n))
    sbp = rng.normal(132 + 10 * htn, 14, n)
    frailty = np.exp(rng.normal(-0.4, 0.9, n))  # unobserved: the patient's own rate (mean 1)
    fast = rng.random(n) < 0.10  # unobserved fast progressors
    extra = np.where(fast, rng.uniform(2.0, 6.0, n), 0.0)  # ml/min a year, unexplained
    change_month = rng.integers(1, 12 * 30, n)  # a change point, often after follow-up
    change_factor = np.where(rng.random(n) < 0.5, 3.0, 1 / 3)
    threshold = np.clip(rng.normal(8.0, 3.0, n), 4.0, 16.0)  # where ESKD starts
    # conservative care (no dialysis), chosen by more of the old: unobserved
    conservative = rng.random(n) < 0.6 * _sigmoid((age0 - 78) / 4)
    on_ace = rng.random(n) < np.where(htn | (log_uacr > np.log(30)), 0.4, 0.1)
    on_sglt2 = rng.random(n) < np.where(diabetes, 0.1, 0.0)
    last_egfr = np.full(n, np.nan)  # the last measured eGFR: what the clinic knows
    recheck = np.zeros(n, dtype=bool)  # a worrying result: seen again next month

    birth_day = enrol - np.round(age0 * 365.25).astype(np.int64)
    static = np.full(n, np.iinfo(np.int64).min)
    ev.add(sid, birth_day * day_us, BIRTH_CODE)
    ev.add(sid[female], static[female], "GENDER//F")
    ev.add(sid[~female], static[~female], "GENDER//M")

    in_study = np.ones(n, dtype=bool)
    ended = np.zeros(n, dtype=bool)  # by ESKD, death or loss to follow-up
    months = int(np.ceil((STUDY_END - enrol_first) / MONTH_DAYS)) + 1
    for m in range(months):
        start = enrol + m * MONTH_DAYS
        active = in_study & (start <= STUDY_END)
        in_study &= start <= STUDY_END
        if not active.any():
            break
        idx = np.flatnonzero(active)
        k = idx.size
        age = age0[idx] + m / 12
        # -- progression
        decline = (0.8 + 1.4 * diabetes[idx] + 0.8 * htn[idx]
                   + 0.9 * np.maximum(log_uacr[idx] - np.log(30), 0)
                   + 0.04 * np.maximum(sbp[idx] - 130, 0)) * frailty[idx] + extra[idx]
        decline *= np.where(m >= change_month[idx], change_factor[idx], 1.0)
        decline *= np.where(on_ace[idx], 0.7, 1.0) * np.where(on_sglt2[idx], 0.6, 1.0)
        aki = rng.random(k) < 0.005  # acute kidney injury: a lasting loss, unforeseeable
        loss = np.where(aki, rng.uniform(0.65, 0.9, k), 1.0)
        egfr[idx] = np.maximum(egfr[idx] * loss - decline / 12 + rng.normal(0, 0.6, k), 2.0)
        sbp[idx] += rng.normal(0, 1.5, k) - 0.08 * (sbp[idx] - (132 + 10 * htn[idx]
                                                        - 6 * on_ace[idx]))
        hba1c[idx] += rng.normal(0, 0.05, k) - 0.03 * (hba1c[idx] - np.where(
            diabetes[idx], 7.4, 5.5))
        log_uacr[idx] += rng.normal(0.01, 0.05, k) - 0.01 * on_ace[idx]
        # -- visits (month 0 is the enrolment visit)
        seen = np.where(np.isnan(last_egfr[idx]), egfr[idx], last_egfr[idx])
        p_visit = (0.18 + 0.12 * (seen < 45) + 0.25 * (seen < 30) + 0.2 * (seen < 20))
        p_visit = np.where(recheck[idx], np.maximum(p_visit, 0.6), p_visit)
        visit = (rng.random(k) < p_visit) | (m == 0)
        forced = intervention is not None and m == intervention.month
        if forced:
            visit[:] = True
        vday = np.floor(start[idx] + rng.random(k) * MONTH_DAYS).astype(np.int64)
        vday = np.minimum(vday, STUDY_END)
        vt = vday * day_us + (8 * 60 + rng.integers(0, 540, k)) * 60_000_000
        measure = rng.random((4, k))
        noise = rng.normal(0, 1, (4, k))
        ill = rng.random(k) < 0.04  # measured during an intercurrent illness: reads low
        dip = np.where(ill, rng.uniform(0.6, 0.9, k), 1.0)
        v = visit
        if m == 0:
            d0, h0 = idx[diabetes[idx]], idx[htn[idx]]
            ev.add(sid[d0], vt[diabetes[idx]], "DX//DIABETES")
            ev.add(sid[h0], vt[htn[idx]], "DX//HYPERTENSION")
            ev.add(sid[idx[on_ace[idx]]], vt[on_ace[idx]], "RX//ACEI")
            ev.add(sid[idx[on_sglt2[idx]]], vt[on_sglt2[idx]], "RX//SGLT2")
        sel = v & (measure[0] < 0.92)
        measured = egfr[idx] * np.exp(0.08 * noise[0]) * dip
        if shift is not None and shift.kind == "egfr_assay":
            measured = np.where(vday >= shift.start_day, measured * shift.factor, measured)
        measured = np.round(measured, 1)
        ev.add(sid[idx[sel]], vt[sel], "LAB//EGFR", measured[sel])
        prev = last_egfr[idx]
        recheck[idx] = False
        recheck[idx[sel]] = measured[sel] < 0.85 * prev[sel]  # NaN before: no re-check
        last_egfr[idx[sel]] = measured[sel]
        sel = v & (measure[1] < 0.85)
        ev.add(sid[idx[sel]], vt[sel], "VITAL//SBP", np.round(sbp[idx[sel]] + 6 * noise[1, sel]))
        sel = v & (measure[2] < np.where(diabetes[idx], 0.70, 0.15))
        ev.add(sid[idx[sel]], vt[sel], "LAB//HBA1C",
               np.round(hba1c[idx[sel]] + 0.2 * noise[2, sel], 1))
        sel = v & (measure[3] < 0.35)
        ev.add(sid[idx[sel]], vt[sel], "LAB//UACR",
               np.round(np.exp(log_uacr[idx[sel]] + 0.35 * noise[3, sel]), 1))
        if m > 0:
            u = rng.random((2, k))
            start_ace = v & ~on_ace[idx] & (htn[idx] | (log_uacr[idx] > np.log(30))) & (u[0] < 0.12)
            era = np.where(vday >= sglt2_era, 1.0, 0.2)
            start_sglt2 = (v & ~on_sglt2[idx] & (diabetes[idx] | (seen < 60))
                           & (u[1] < 0.06 * era))
            if forced:  # the decision at the intervention's visit
                start_sglt2 = v & ~on_sglt2[idx] & intervention.start
            on_ace[idx[start_ace]] = True
            on_sglt2[idx[start_sglt2]] = True
            ev.add(sid[idx[start_ace]], vt[start_ace], "RX//ACEI")
            ev.add(sid[idx[start_sglt2]], vt[start_sglt2], "RX//SGLT2")
        # -- outcome, competing event, loss to follow-up (after this month's visit)
        h_eskd = 0.25 * _sigmoid(-(egfr[idx] - threshold[idx]) / 4.5)
        h_eskd *= np.where(conservative[idx], 0.15, 1.0)
        annual_death = (0.012 * np.exp(0.075 * (age - 65))
                        * (1 + 1.2 * (egfr[idx] < 30) + 1.5 * (egfr[idx] < 20)
                           + 4.0 * (conservative[idx] & (egfr[idx] < threshold[idx])))
                        * np.where(diabetes[idx], 1.4, 1.0) * np.where(female[idx], 1.0, 1.2))
        h_death = 1 - np.exp(-annual_death / 12)
        u = rng.random((3, k))
        eskd = u[0] < h_eskd
        death = ~eskd & (u[1] < h_death)
        lost = ~eskd & ~death & (u[2] < 0.0043)
        eday = np.maximum(np.floor(start[idx] + MONTH_DAYS * rng.random(k)).astype(np.int64),
                          vday + 1)
        et = np.minimum(eday, STUDY_END) * day_us + 12 * 3_600_000_000
        ev.add(sid[idx[eskd]], et[eskd], "DX//ESKD")
        ev.add(sid[idx[death]], et[death], DEATH_CODE)
        in_study[idx[eskd | death | lost]] = False
        ended[idx[eskd | death | lost]] = True
    still = ~ended
    ev.add(sid[still], np.full(still.sum(), STUDY_END * day_us + 23 * 3_600_000_000),
           END_OF_FOLLOWUP_CODE)
    return ev.frame()


# ----------------------------------------------------------------------------- shards

DATASET_NAME = "twincast-synthetic-ckd"


@dataclass(frozen=True)
class ShardPlan:
    """A cohort of ``n_subjects`` in ``shards`` contiguous id ranges, each simulated on its
    own: memory is bounded by one shard, and the shards can be made anywhere, in any order.

    Shard ``k`` holds ids ``first_subject_id + offset_k`` onwards (sizes as equal as
    possible, the larger first) and draws from ``SeedSequence(seed, spawn_key=(k,))`` —
    ``SeedSequence(seed).spawn(shards)[k]``.  Same plan, same bytes; another number of
    shards (``shards=1`` included) is another, equally valid, cohort, and none is the
    cohort :func:`simulate_cohort` draws from ``seed`` itself.

    >>> [ShardPlan(10, 3).ids(k) for k in range(3)]
    [range(1, 5), range(5, 8), range(8, 11)]
    """

    n_subjects: int
    shards: int
    seed: int = 0
    first_subject_id: int = 1
    shift: Shift | None = None
    steady: bool = False

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be at least 1, got {self.shards}")
        if self.n_subjects < self.shards:
            raise ValueError(f"{self.shards} shards need at least as many subjects, got "
                             f"{self.n_subjects}")
        if self.seed < 0:
            raise ValueError(f"the seed must be a non-negative integer, got {self.seed}")
        if self.first_subject_id < 0:
            raise ValueError(f"the first subject id must be non-negative, got "
                             f"{self.first_subject_id}")

    def ids(self, index: int) -> range:
        """The subject ids of shard ``index``."""
        if not 0 <= index < self.shards:
            raise IndexError(f"shard {index} of {self.shards}")
        size, extra = divmod(self.n_subjects, self.shards)
        start = self.first_subject_id + index * size + min(index, extra)
        return range(start, start + size + (index < extra))

    def seed_of(self, index: int) -> np.random.SeedSequence:
        """Shard ``index``'s seed: from the plan's seed and the index alone."""
        return np.random.SeedSequence(self.seed, spawn_key=(index,))

    def simulate(self, index: int) -> pd.DataFrame:
        """Shard ``index`` as canonical MEDS events."""
        ids = self.ids(index)
        return simulate_cohort(len(ids), seed=self.seed_of(index), first_subject_id=ids.start,
                               shift=self.shift, steady=self.steady)

    def version(self) -> str:
        """``dataset_version`` for ``metadata/dataset.json``: what makes the same bytes."""
        return (f"subjects={self.n_subjects},seed={self.seed},shards={self.shards}"
                + (f",first={self.first_subject_id}" if self.first_subject_id != 1 else "")
                + (f",shift={self.shift.text()}" if self.shift else "")
                + (",steady" if self.steady else ""))


def write_plan_shard(directory: Path, plan: ShardPlan, index: int) -> int:
    """Simulate shard ``index`` into ``directory/data/{index}.parquet`` atomically (written
    under a temporary name, then renamed), so a task re-run after a lost worker is
    harmless.  Returns its number of events."""
    directory = Path(directory)
    events = plan.simulate(index)
    work = Path(tempfile.mkdtemp(prefix=f".shard-{index}.", dir=directory))
    try:
        (work / "data").mkdir()
        write_shard(work, index, events)
        os.replace(work / "data" / f"{index}.parquet", directory / "data" / f"{index}.parquet")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return len(events)


def write_sharded_cohort(out: str | os.PathLike, plan: ShardPlan, *, overwrite: bool = False,
                         client: Client | None = None,
                         progress: Callable[[int], None] | None = None) -> int:
    """Write ``plan`` as a MEDS directory, atomically: ``data/{k}.parquet`` per shard,
    ``metadata/codes.parquet`` and ``dataset.json``.  Returns the number of events.

    Shards are made one at a time in this process, or as tasks on ``client``'s Dask
    workers (which must see ``out``'s parent directory); the bytes are the same.
    ``progress`` is called with each finished shard's event count.
    """
    done = progress or (lambda n: None)
    total = 0
    dataset = {"dataset_name": DATASET_NAME, "dataset_version": plan.version()}
    with meds_directory(out, overwrite=overwrite, dataset=dataset) as tmp:
        if client is None:
            for k in range(plan.shards):
                n = write_plan_shard(tmp, plan, k)
                total += n
                done(n)
        else:
            from distributed import as_completed

            futures = [client.submit(write_plan_shard, tmp, plan, k, pure=False)
                       for k in range(plan.shards)]
            try:
                for future in as_completed(futures):
                    n = future.result()
                    total += n
                    done(n)
            finally:
                client.cancel(futures)
            for stray in tmp.glob(".shard-*"):  # left by a worker that died mid-write
                shutil.rmtree(stray, ignore_errors=True)
        missing = [k for k in range(plan.shards)
                   if not (tmp / "data" / f"{k}.parquet").is_file()]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} of {plan.shards} were not written")
        pq.write_table(pa.Table.from_pandas(CODES, preserve_index=False),
                       tmp / "metadata" / "codes.parquet")
    return total
