"""Roles and refresh-job states: each an enum with what it allows, in one place."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    CLINICAL = "clinical"
    AUDITOR = "auditor"
    ADMIN = "admin"


class Action(StrEnum):
    WRITE_TWINS = "write twins"        # events, FHIR bundles, bulk, CDS calls
    READ_TWINS = "read twins"          # twins, forecasts, the model, docs
    FORECAST = "ask for a stateless forecast"
    WHAT_IF = "ask a what-if question"  # stores nothing; treatments: see serving.whatif
    AUDIT = "read the audit trail"     # access log, forecast chains
    MONITOR = "read model monitoring"  # realised performance, drift, alerts
    ADMINISTER = "administer the service"


ALLOWED: dict[Action, frozenset[Role]] = {
    Action.WRITE_TWINS: frozenset({Role.CLINICAL, Role.ADMIN}),
    Action.READ_TWINS: frozenset({Role.CLINICAL, Role.AUDITOR, Role.ADMIN}),
    Action.FORECAST: frozenset({Role.CLINICAL, Role.ADMIN}),
    Action.WHAT_IF: frozenset({Role.CLINICAL, Role.AUDITOR, Role.ADMIN}),
    Action.AUDIT: frozenset({Role.AUDITOR, Role.ADMIN}),
    Action.MONITOR: frozenset({Role.AUDITOR, Role.ADMIN}),
    Action.ADMINISTER: frozenset({Role.ADMIN}),
}


def may(role: str, action: Action) -> bool:
    """Whether ``role`` may do ``action``.

    >>> may("auditor", Action.READ_TWINS), may("auditor", Action.WRITE_TWINS)
    (True, False)
    """
    return role in ALLOWED[action]


class RefreshState(StrEnum):
    PENDING = "pending"        # created when the served version changed; nobody runs it yet
    RUNNING = "running"        # claimed by a worker holding the lease
    DONE = "done"              # every twin carries the target version (verified)
    FAILED = "failed"          # an error; retried after a back-off
    SUPERSEDED = "superseded"  # the served version changed again first


TRANSITIONS: dict[RefreshState, frozenset[RefreshState]] = {
    RefreshState.PENDING: frozenset({RefreshState.RUNNING, RefreshState.SUPERSEDED}),
    # RUNNING → RUNNING: another worker takes over an expired lease
    RefreshState.RUNNING: frozenset({RefreshState.RUNNING, RefreshState.DONE,
                                     RefreshState.FAILED, RefreshState.SUPERSEDED}),
    RefreshState.FAILED: frozenset({RefreshState.RUNNING, RefreshState.SUPERSEDED}),
    RefreshState.DONE: frozenset(),
    RefreshState.SUPERSEDED: frozenset(),
}
# superseded when the served version changes (a failed one too, whatever its attempts)
ACTIVE = frozenset({RefreshState.PENDING, RefreshState.RUNNING, RefreshState.FAILED})


def can_move(src: str, dst: str) -> bool:
    """Whether a refresh job may go from ``src`` to ``dst``.

    >>> can_move("running", "done"), can_move("done", "running")
    (True, False)
    """
    return RefreshState(dst) in TRANSITIONS[RefreshState(src)]
