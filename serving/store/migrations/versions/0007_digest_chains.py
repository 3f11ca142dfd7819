"""tamper evidence: each twin's forecast digests chained (version 2), leases

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

Rows written before this revision keep ``digest_version`` 1 (their digest covers the
row alone) and still verify; new rows are version 2 (the digest also covers the previous
forecast row's digest of the same twin).  Columns are added, never rebuilt, so the
append-only triggers stay in place on SQLite.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("forecasts", sa.Column("prev_digest", sa.String(length=64), nullable=True))
    op.add_column("forecasts", sa.Column("digest_version", sa.Integer(), nullable=False,
                                         server_default="1"))
    op.add_column("twins", sa.Column("forecast_head", sa.String(length=64), nullable=True))
    # each twin's chain starts after its latest version-1 row
    op.execute("UPDATE twins SET forecast_head = (SELECT f.row_digest FROM forecasts f "
               "WHERE f.subject_id = twins.subject_id ORDER BY f.seq DESC LIMIT 1)")
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_column("twins", "forecast_head")
    op.drop_column("forecasts", "digest_version")
    op.drop_column("forecasts", "prev_digest")
