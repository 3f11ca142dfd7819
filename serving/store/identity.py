"""External patient identifiers → twins, resolved so that two patients never merge.

Rules (README, "Twin ids and identifiers"):

- identifiers are resolved before any twin is locked, in sorted (system, value) order, each
  by ``INSERT … ON CONFLICT DO NOTHING RETURNING`` — a unique-violation exception would
  abort a PostgreSQL transaction, so "catch and re-read" cannot work there;
- a patient none of whose identifiers is known gets a new twin whose id comes from the
  database (a sequence on PostgreSQL, a counter row in the same transaction on SQLite), in
  the assigned range of :mod:`serving.store.ids`;
- identifiers of one patient that already belong to two twins, or an identifier linked to
  another twin than the rest of the patient's, are a :class:`~serving.errors.Conflict`
  (409): nothing is ever silently re-linked.

Logical ids are scoped by their sender before they get here (:func:`scoped_system`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from sqlalchemy import select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from serving.errors import BadInput, Conflict
from serving.store.ids import ASSIGNED_MAX, COUNTER, SEQUENCE
from serving.store.models import IdCounter, Identifier
from serving.store.twins import Twins, utcnow

Ident = tuple[str, str]
MAX_SYSTEM = 1024
MAX_VALUE = 255


def scoped_system(kind: str, sender: str) -> str:
    """A namespace for ids that only mean something to one sender (a FHIR Patient's
    logical id, an identifier without a system, a CDS client's patient id).

    >>> scoped_system("fhir-id", "ehr gateway")
    'urn:twincast:ehr%20gateway:fhir-id'
    >>> scoped_system("cds-patient", "cds:https://ehr.example|t1")
    'urn:twincast:cds%3Ahttps%3A%2F%2Fehr.example%7Ct1:cds-patient'
    """
    return f"urn:twincast:{quote(sender, safe='')}:{kind}"


@dataclass
class Claim:
    """One patient of a request: the identifiers that name it, resolved to a twin.
    ``label`` names it in messages (its place in the request, never an identifier)."""

    identifiers: tuple[Ident, ...]
    label: str
    subject_id: int | None = None
    created: bool = False


class Identities:
    def __init__(self, sqlite: bool, twins: Twins):
        self.sqlite = sqlite
        self.twins = twins
        self._insert = sqlite_insert if sqlite else pg_insert

    def lookup(self, s: Session, idents: Sequence[Ident]) -> dict[Ident, int]:
        if not idents:
            return {}
        q = select(Identifier.system, Identifier.value, Identifier.subject_id).where(
            tuple_(Identifier.system, Identifier.value).in_(list(idents)))
        return {(r[0], r[1]): int(r[2]) for r in s.execute(q)}

    def first_identifier(self, s: Session, subject_id: int) -> Ident | None:
        row = s.execute(select(Identifier.system, Identifier.value)
                        .where(Identifier.subject_id == subject_id)
                        .order_by(Identifier.id).limit(1)).first()
        return None if row is None else (row[0], row[1])

    def next_id(self, s: Session) -> int:
        """A fresh store-assigned twin id, from the database."""
        if self.sqlite:
            got = s.execute(update(IdCounter).where(IdCounter.name == COUNTER)
                            .values(next_value=IdCounter.next_value + 1)
                            .returning(IdCounter.next_value)).scalar_one()
            value = int(got) - 1
        else:
            value = int(s.execute(text(f"SELECT nextval('{SEQUENCE}')")).scalar_one())
        if value > ASSIGNED_MAX:
            raise RuntimeError("the store-assigned twin id range is exhausted")
        return value

    def _link(self, s: Session, ident: Ident, subject_id: int) -> int:
        """Insert the link unless the identifier exists; the twin it names now."""
        ins = self._insert(Identifier).values(
            system=ident[0], value=ident[1], subject_id=subject_id, created_at=utcnow()
        ).on_conflict_do_nothing(index_elements=["system", "value"]).returning(
            Identifier.subject_id)
        got = s.execute(ins).scalar_one_or_none()
        if got is not None:
            return int(got)
        # taken (committed, or by a transaction we just waited for): read its owner
        return int(s.execute(select(Identifier.subject_id).where(
            Identifier.system == ident[0], Identifier.value == ident[1])).scalar_one())

    def resolve(self, s: Session, claims: Sequence[Claim]) -> None:
        """Give every claim its twin (creating twins and links as needed)."""
        owner_of: dict[Ident, Claim] = {}
        for c in claims:
            if not c.identifiers:
                raise BadInput(f"{c.label} has no identifier", ["body"])
            for ident in c.identifiers:
                other = owner_of.setdefault(ident, c)
                if other is not c:
                    raise Conflict(f"{other.label} and {c.label} share an identifier: send "
                                   "one Patient per person")
        known = self.lookup(s, list(owner_of))
        for c in claims:
            twins = {known[i] for i in c.identifiers if i in known}
            if len(twins) > 1:
                raise Conflict(f"the identifiers of {c.label} belong to {len(twins)} "
                               f"different twins ({', '.join(map(str, sorted(twins)))}): "
                               "they are not linked automatically")
            c.subject_id = twins.pop() if twins else None
        for ident in sorted(i for i in owner_of if i not in known):
            c = owner_of[ident]
            if c.subject_id is None:
                candidate = self.next_id(s)
                self.twins.insert_new(s, candidate)
                got = self._link(s, ident, candidate)
                if got != candidate:  # another request created this patient first
                    self.twins.drop_new(s, candidate)
                else:
                    c.created = True
                c.subject_id = got
                continue
            got = self._link(s, ident, c.subject_id)
            if got != c.subject_id:
                raise Conflict(f"an identifier of {c.label} belongs to twin {got}, the "
                               f"others to twin {c.subject_id}: they are not linked "
                               "automatically")
        twins_of: dict[int, Claim] = {}
        for c in claims:
            other = twins_of.setdefault(c.subject_id, c)
            if other is not c:
                raise Conflict(f"{other.label} and {c.label} are the same twin "
                               f"({c.subject_id}): send one Patient per person")
