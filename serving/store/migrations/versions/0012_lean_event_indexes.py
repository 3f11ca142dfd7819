"""events: two fewer index entries per stored event

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04

``ix_events_recorded_at`` answered no query: every read by arrival time is one twin's
(``subject_id`` first, which the other indexes lead with).  ``ix_events_subject_logical``
becomes partial (``logical_id IS NOT NULL``): only events of FHIR resources have a
logical id, and only they are looked up by it.  Each stored event so costs two index
insertions fewer, which is most of a bulk import's time in the database.

On PostgreSQL the partial index is built inside the migration's transaction, which holds
writes to ``events`` for one scan of the table (seconds for a few million events); a
store much larger than that is better migrated in a quiet moment.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

WITH_ID = sa.text("logical_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_events_recorded_at", "events")
    op.drop_index("ix_events_subject_logical", "events")
    op.create_index("ix_events_subject_logical", "events", ["subject_id", "logical_id"],
                    sqlite_where=WITH_ID, postgresql_where=WITH_ID)


def downgrade() -> None:
    op.drop_index("ix_events_subject_logical", "events")
    op.create_index("ix_events_subject_logical", "events", ["subject_id", "logical_id"])
    op.create_index("ix_events_recorded_at", "events", ["recorded_at"])
