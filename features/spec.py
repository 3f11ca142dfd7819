"""The FeatureSpec: vocabulary and settings frozen from the *training* split only.

A code becomes features when at least ``min_code_subjects`` training subjects have it.
Its kind is fixed at fit time: ``static`` (never timed), ``numeric`` (most events carry a
value) or ``categorical``.  The spec is what a model version bundles, so the service
builds exactly the columns the model was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from features.events import BIRTH_CODE, DEATH_CODE, NAT_US, EventArrays
from features.task import Task
from features.timeindex import DAYS_PER_YEAR, US_PER_DAY

SPEC_VERSION = 1


class CodeFeature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    kind: Literal["numeric", "categorical", "static"]
    numeric: bool = False  # for static codes: whether the value (not presence) is used
    unit: str | None = None
    train_subjects: int = 0
    # the Kalman filter's noise, estimated on the training split (numeric codes, when the
    # task asks for it): [measurement variance, level variance a year, slope variance a
    # year, the slope's initial variance] — see :func:`kalman_noise`
    kalman: list[float] | None = None


class FeatureSpec(BaseModel):
    """Frozen feature settings; ``feature_names`` is the model's column order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = SPEC_VERSION
    task_name: str
    windows: list[str]
    window_days: list[float]
    numeric_aggregations: list[str]
    categorical_aggregations: list[str]
    codes: list[CodeFeature]
    feature_names: list[str]
    ewm_half_life_days: list[int] = []

    def features_by_code(self) -> dict[str, list[str]]:
        """Each code the model reads and the feature columns made from it."""
        return {c.code: [n for n in self.feature_names if n.split("__", 1)[0] == c.code]
                for c in self.codes}

    @staticmethod
    def feature_name(code: str, window: str | None, agg: str) -> str:
        return f"{code}__{agg}" if window is None else f"{code}__{window}__{agg}"

    @staticmethod
    def static_name(code: str) -> str:
        return f"{code}__static"

    @classmethod
    def from_codes(cls, task: Task, codes: list[CodeFeature]) -> FeatureSpec:
        fs = task.features
        names = ["age_years"]
        codes = sorted(codes, key=lambda c: ({"static": 0, "numeric": 1,
                                              "categorical": 2}[c.kind], c.code))
        for c in codes:
            if c.kind == "static":
                names.append(cls.static_name(c.code))
            elif c.kind == "numeric":
                names += [cls.feature_name(c.code, w, a) for w in fs.windows
                          for a in fs.numeric_aggregations]
                traj = fs.trajectory
                for h in traj.ewm_half_life_days if traj else ():
                    names += [cls.feature_name(c.code, f"ewm{h}d", a) for a in ("level", "trend")]
                if c.kalman is not None:
                    names += [cls.feature_name(c.code, "kalman", a) for a in ("level", "slope")]
            else:
                aggs = fs.categorical_aggregations
                if "ever" in aggs:
                    names.append(cls.feature_name(c.code, None, "ever"))
                if "count" in aggs:
                    names += [cls.feature_name(c.code, w, "count") for w in fs.windows]
                if "days_since_first" in aggs:
                    names.append(cls.feature_name(c.code, None, "days_since_first"))
        return cls(
            task_name=task.name,
            windows=list(fs.windows),
            window_days=fs.window_days(),
            numeric_aggregations=list(fs.numeric_aggregations),
            categorical_aggregations=list(fs.categorical_aggregations),
            codes=codes,
            feature_names=names,
            ewm_half_life_days=list(fs.trajectory.ewm_half_life_days) if fs.trajectory else [],
        )

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json")
        # specs without trajectory features keep the digest they had before them
        # (and unpickled older specs, whose objects lack the fields, dump without them)
        if not data.get("ewm_half_life_days"):
            data.pop("ewm_half_life_days", None)
        for c in data["codes"]:
            if c.get("kalman") is None:
                c.pop("kalman", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def unit_of(self, code: str) -> str | None:
        return next((c.unit for c in self.codes if c.code == code), None)


PAIR_BINS = np.geomspace(1 / (DAYS_PER_YEAR * 24), 30.0, 41)  # years: 1 hour to 30 years


def pair_bins(dt_years: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Successive-measurement pairs summarised by the time between them: per bin of
    ``PAIR_BINS``, [pairs, Σ Δ, Σ Δ², Σ (y₂ − y₁)²]."""
    b = np.clip(np.searchsorted(PAIR_BINS, dt_years, side="right") - 1, 0, PAIR_BINS.size - 2)
    n = PAIR_BINS.size - 1
    return np.column_stack([np.bincount(b, minlength=n), np.bincount(b, dt_years, n),
                            np.bincount(b, dt_years ** 2, n), np.bincount(b, d2, n)])


def kalman_noise(bins: np.ndarray) -> list[float] | None:
    """The local-linear-trend filter's noise for one code, from its training subjects'
    successive measurements: for a pair Δ years apart, E[(y₂ − y₁)²] = 2R + Q·Δ + S·Δ²
    (R: measurement variance; Q: the level's random-walk variance a year; S: the spread
    of the patients' slopes).  Fitted to the mean squared change per bin of Δ
    (``pair_bins``) by weighted least squares — a bin weighs its pairs over its variance,
    which grows as the square of its expected value, so the fit is iterated three times
    — with the three variances kept non-negative.  The slope drifts by S/10 a year.
    Returns [R, Q, S/10, S], or None with fewer than 30 pairs."""
    from scipy.optimize import nnls  # here: scipy.optimize costs a quarter second to import

    n = bins[:, 0]
    if n.sum() < 30:
        return None
    used = n > 0
    n, x1, x2, y = n[used], bins[used, 1] / n[used], bins[used, 2] / n[used], \
        bins[used, 3] / n[used]
    design = np.column_stack([np.ones_like(x1), x1, x2])
    expected = np.full_like(y, max(float(np.average(y, weights=n)), 1e-12))
    coef = np.zeros(3)
    for _ in range(3):
        w = np.sqrt(n) / np.maximum(expected, 1e-12)
        coef = nnls(design * w[:, None], y * w)[0]
        expected = design @ coef
    overall = float(np.average(y, weights=n))
    a, q, sl = coef
    r = max(a / 2, 1e-3 * overall, 1e-12)
    q, sl = max(q, 1e-6 * overall), max(sl, 1e-6 * overall)
    return [float(r), float(q), float(sl / 10), float(sl)]


@dataclass
class CodeStats:
    """Per-code counts gathered shard by shard from the training split (and, for the
    Kalman filter, sums over successive measurements: ``kalman_noise``)."""

    train_subjects: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    valued: dict[str, int] = field(default_factory=dict)
    timed: dict[str, int] = field(default_factory=dict)
    kalman: bool = False
    pair_sums: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, arrays: EventArrays, is_train: np.ndarray) -> None:
        """Count codes in one shard (``is_train`` flags each event's subject)."""
        ncat = len(arrays.categories)
        if ncat == 0:
            return
        if self.kalman:
            self._add_pairs(arrays, is_train)
        code = arrays.code.astype(np.int64)
        _, sidx = np.unique(arrays.subject_id, return_inverse=True)
        pairs = np.unique(sidx[is_train] * ncat + code[is_train])
        per_code = np.bincount(pairs % ncat, minlength=ncat)
        tot = np.bincount(code, minlength=ncat)
        val = np.bincount(code, weights=~np.isnan(arrays.value), minlength=ncat)
        tim = np.bincount(code, weights=arrays.time_us != NAT_US, minlength=ncat)
        for i, c in enumerate(arrays.categories):
            self.train_subjects[c] = self.train_subjects.get(c, 0) + int(per_code[i])
            self.events[c] = self.events.get(c, 0) + int(tot[i])
            self.valued[c] = self.valued.get(c, 0) + int(val[i])
            self.timed[c] = self.timed.get(c, 0) + int(tim[i])

    def merge(self, other: CodeStats) -> None:
        """Add another shard's counts.  Merged in shard order, the sums are those that
        :meth:`add` makes shard by shard, to the last bit (the Kalman noise too)."""
        for mine, theirs in ((self.train_subjects, other.train_subjects),
                             (self.events, other.events), (self.valued, other.valued),
                             (self.timed, other.timed)):
            for c, n in theirs.items():
                mine[c] = mine.get(c, 0) + n
        for c, add in other.pair_sums.items():
            self.pair_sums[c] = self.pair_sums[c] + add if c in self.pair_sums else add

    def _add_pairs(self, arrays: EventArrays, is_train: np.ndarray) -> None:
        keep = is_train & (arrays.time_us != NAT_US) & ~np.isnan(arrays.value)
        sid, code = arrays.subject_id[keep], arrays.code[keep].astype(np.int64)
        t, v = arrays.time_us[keep], arrays.value[keep]
        order = np.lexsort((t, sid, code))  # stable: ties keep their canonical order
        sid, code, t, v = sid[order], code[order], t[order], v[order]
        same = (sid[1:] == sid[:-1]) & (code[1:] == code[:-1])
        dt = (t[1:] - t[:-1])[same] / (US_PER_DAY * DAYS_PER_YEAR)
        d2 = ((v[1:] - v[:-1]) ** 2)[same]
        pair_code = code[1:][same]
        for i in np.unique(pair_code):
            m = pair_code == i
            c = arrays.categories[i]
            add = pair_bins(dt[m], d2[m])
            self.pair_sums[c] = self.pair_sums[c] + add if c in self.pair_sums else add

    def freeze(self, task: Task, units: dict[str, str] | None = None) -> FeatureSpec:
        """The FeatureSpec these counts and the task's feature settings give."""
        units = {**(units or {}), **task.features.units}
        kept: list[CodeFeature] = []
        for c in sorted(self.train_subjects):
            n_subj = self.train_subjects[c]
            if c in (BIRTH_CODE, DEATH_CODE) or task.is_excluded_from_features(c):
                continue
            if n_subj < task.features.min_code_subjects:
                continue
            numeric = self.valued[c] * 2 >= self.events[c]
            kind = "static" if self.timed[c] == 0 else "numeric" if numeric else "categorical"
            noise = None
            if kind == "numeric" and self.kalman and c in self.pair_sums:
                noise = kalman_noise(self.pair_sums[c])
            kept.append(CodeFeature(code=c, kind=kind, numeric=numeric, unit=units.get(c),
                                    train_subjects=n_subj, kalman=noise))
        return FeatureSpec.from_codes(task, kept)


def wants_kalman(task: Task) -> bool:
    traj = task.features.trajectory
    return traj is not None and traj.kalman


def fit_feature_spec(
    shards: Iterable[tuple[EventArrays, np.ndarray]], task: Task,
    units: dict[str, str] | None = None,
) -> FeatureSpec:
    """Freeze a FeatureSpec from (events, is-train flags) shards."""
    stats = CodeStats(kalman=wants_kalman(task))
    for arrays, is_train in shards:
        stats.add(arrays, is_train)
    return stats.freeze(task, units)
