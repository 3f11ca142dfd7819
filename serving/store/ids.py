"""Twin ids: which ones clients choose and which ones the store assigns.

Every id is below 2**53, so JavaScript clients read it exactly.  Clients choose ids in
``[0, 2**52)`` on the native routes (``/v1/twins/{id}``, bulk, imports); the store assigns
ids in ``[2**52, 2**53)`` to patients known only by an external identifier (FHIR, CDS
Hooks) — from a PostgreSQL sequence, or a counter row updated in the same transaction on
SQLite — so an assigned id never meets a chosen one.
"""

from __future__ import annotations

CLIENT_ID_MAX = 2**52 - 1
ASSIGNED_MIN = 2**52
ASSIGNED_MAX = 2**53 - 1
SEQUENCE = "twin_id_seq"
COUNTER = "twin"


def is_client_id(subject_id: int) -> bool:
    """Whether a client may choose this id.

    >>> is_client_id(42), is_client_id(2**52), is_client_id(-1)
    (True, False, False)
    """
    return 0 <= subject_id <= CLIENT_ID_MAX
