"""corrected and retracted events: each event's resource (logical id), superseded rows

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08

An event from a FHIR resource carries the resource's logical id; a new version of the
resource supersedes (``superseded_at``) the rows it no longer holds, and an entered-in-error
resource supersedes them all.  Superseded rows stay, so a past forecast still replays.
Rows stored before this revision by FHIR (key ``id:<resource>``, source ``fhir:…``) get
their logical id from the key.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("logical_id", sa.String(length=200), nullable=True))
    op.add_column("events", sa.Column("superseded_at", sa.DateTime(), nullable=True))
    op.execute("UPDATE events SET logical_id = substr(idempotency_key, 4) "
               "WHERE substr(idempotency_key, 1, 3) = 'id:' AND substr(source, 1, 5) = 'fhir:'")
    op.create_index("ix_events_subject_logical", "events", ["subject_id", "logical_id"])


def downgrade() -> None:
    op.drop_index("ix_events_subject_logical", "events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("superseded_at")
        batch.drop_column("logical_id")
