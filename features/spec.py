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

SPEC_VERSION = 1


class CodeFeature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    kind: Literal["numeric", "categorical", "static"]
    numeric: bool = False  # for static codes: whether the value (not presence) is used
    unit: str | None = None
    train_subjects: int = 0


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
        )

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def unit_of(self, code: str) -> str | None:
        return next((c.unit for c in self.codes if c.code == code), None)


@dataclass
class CodeStats:
    """Per-code counts gathered shard by shard from the training split."""

    train_subjects: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    valued: dict[str, int] = field(default_factory=dict)
    timed: dict[str, int] = field(default_factory=dict)

    def add(self, arrays: EventArrays, is_train: np.ndarray) -> None:
        """Count codes in one shard (``is_train`` flags each event's subject)."""
        ncat = len(arrays.categories)
        if ncat == 0:
            return
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
            kept.append(CodeFeature(code=c, kind=kind, numeric=numeric, unit=units.get(c),
                                    train_subjects=n_subj))
        return FeatureSpec.from_codes(task, kept)


def fit_feature_spec(
    shards: Iterable[tuple[EventArrays, np.ndarray]], task: Task,
    units: dict[str, str] | None = None,
) -> FeatureSpec:
    """Freeze a FeatureSpec from (events, is-train flags) shards."""
    stats = CodeStats()
    for arrays, is_train in shards:
        stats.add(arrays, is_train)
    return stats.freeze(task, units)
