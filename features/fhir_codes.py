"""The code mapping of the FHIR importer: which source codes become which twincast codes.

``features/fhir_mapping.yaml`` lists rules per resource kind; medications at clinical-drug
level come from a shipped, cited table (``features/rxnorm_classes.csv``: RxNorm SCD and
ingredient concepts → the ingredient classes the tasks use).  A coding matches the most
specific rule: an exact code before a code-hierarchy rule (``N18.3*``), a longer prefix
before a shorter one, so ``N18.31`` → CKD stage 3a while ``N18.9`` falls to the
unspecified CKD rule.  ICD-10 codes are compared in their dotted, upper-case form
(``n1831`` is ``N18.31``).  Quantities are converted by their UCUM code.
"""

from __future__ import annotations

import csv
import functools
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

DEFAULT_MAPPING = Path(__file__).with_name("fhir_mapping.yaml")
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/icd-10-cm",
                           "http://hl7.org/fhir/sid/icd-10"})


class Conversion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = 1.0
    offset: float = 0.0


class CodeRule(BaseModel):
    """One source code (or code hierarchy: ``N18.3*``) in a code system, and the
    twincast code it becomes.  For observations: the value type it takes, the target
    UCUM unit and the conversions from other UCUM units, or for coded values the
    concept → text table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str
    code: str
    to: str
    unit: str | None = Field(None, description="UCUM code the value is stored in")
    units: dict[str, Conversion] = Field(
        default_factory=dict, description="other UCUM code -> conversion to ``unit``")
    value: Literal["quantity", "string", "concept"] = "quantity"
    concepts: dict[str, str] = Field(
        default_factory=dict, description="'system|code' of a coded value -> stored text")

    @property
    def prefix(self) -> str | None:
        """The literal prefix of a hierarchy rule (``N18.3*`` → ``N18.3``), else None."""
        star = self.code.find("*")
        return None if star < 0 else self.code[:star]

    def matches(self, system: str | None, code: str | None) -> bool:
        return system == self.system and code is not None and fnmatchcase(
            normalise_code(system, code), self.code)


def normalise_code(system: str | None, code: str) -> str:
    """ICD-10 codes dotted and upper case (``n1831`` → ``N18.31``); others as sent."""
    if system in ICD10_SYSTEMS:
        code = code.strip().upper()
        if len(code) > 3 and "." not in code:
            code = f"{code[:3]}.{code[3:]}"
    return code


class RuleIndex:
    """Rules of one kind, looked up by (system, code): exact codes in a dict, hierarchy
    rules by prefix, longest first."""

    def __init__(self, rules: list[CodeRule]):
        self.exact: dict[tuple[str, str], CodeRule] = {}
        self.prefixes: dict[str, list[tuple[str, CodeRule]]] = {}
        self.globs: list[CodeRule] = []
        for r in rules:
            p = r.prefix
            if p is None:
                self.exact.setdefault((r.system, r.code), r)
            elif r.code == p + "*":
                self.prefixes.setdefault(r.system, []).append((p, r))
            else:
                self.globs.append(r)
        for items in self.prefixes.values():
            items.sort(key=lambda pr: -len(pr[0]))  # stable: file order among equals

    def best(self, codings: list[dict]) -> tuple[CodeRule | None, str]:
        """The most specific rule any coding matches, and a label for the coding it
        matched (else for the first coding)."""
        best: tuple[int, CodeRule, str] | None = None
        for c in codings:
            system, raw = c.get("system"), c.get("code")
            if not isinstance(system, str) or not isinstance(raw, str):
                continue
            code = normalise_code(system, raw)
            hit = self.exact.get((system, code))
            rank = 10_000 if hit is not None else -1
            if hit is None:
                for p, r in self.prefixes.get(system, ()):
                    if code.startswith(p):
                        hit, rank = r, len(p)
                        break
            if hit is None:
                for r in self.globs:
                    if r.matches(system, code):
                        hit, rank = r, 0
                        break
            if hit is not None and (best is None or rank > best[0]):
                best = (rank, hit, f"{system}|{code}")
        if best is not None:
            return best[1], best[2]
        first = codings[0] if codings else {}
        return None, f"{first.get('system')}|{first.get('code')}"


class FhirMapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    observations: list[CodeRule] = Field(default_factory=list)
    conditions: list[CodeRule] = Field(default_factory=list)
    medications: list[CodeRule] = Field(default_factory=list)
    medication_tables: list[str] = Field(
        default_factory=list, description="CSV tables of medication rules (rxcui, class), "
                                          "relative to the mapping file")
    _index: dict[str, RuleIndex] = PrivateAttr(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_MAPPING) -> FhirMapping:
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        # "x-…" keys hold YAML anchors shared by rules (unit spellings), nothing else
        mapping = cls.model_validate({k: v for k, v in raw.items() if not k.startswith("x-")})
        extra = [rule for t in mapping.medication_tables
                 for rule in medication_table(path.parent / t)]
        return mapping.model_copy(update={"medications": [*mapping.medications, *extra]})

    @staticmethod
    @functools.cache
    def default() -> FhirMapping:
        """The shipped mapping, loaded once per process."""
        return FhirMapping.load(DEFAULT_MAPPING)

    def index(self, kind: str) -> RuleIndex:
        """The lookup index of ``observations``, ``conditions`` or ``medications``."""
        if kind not in self._index:
            self._index[kind] = RuleIndex(getattr(self, kind))
        return self._index[kind]

    def units(self) -> dict[str, str]:
        """Each twincast code's UCUM unit (the MEDS codes table)."""
        return {r.to: r.unit for r in self.observations if r.unit}

    def targets(self) -> set[str]:
        """Every twincast code some rule can produce."""
        return {r.to for r in (*self.observations, *self.conditions, *self.medications)}


def medication_table(path: Path) -> list[CodeRule]:
    """Rules from a CSV with columns ``rxcui`` and ``class`` (others are documentation)."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(row for row in fh if not row.startswith("#"))]
    return [CodeRule(system=RXNORM, code=r["rxcui"].strip(), to=r["class"].strip())
            for r in rows if r.get("rxcui") and r.get("class")]
