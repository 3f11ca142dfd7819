"""forecast trajectories: a forecast row carries the biomarker trajectories it gave

Rows written from this revision have ``digest_version`` 3: their digest also covers
``trajectories``.  Older rows keep their version and their digests.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("forecasts", sa.Column("trajectories", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("forecasts") as batch:
        batch.drop_column("trajectories")
