"""CDS Hooks replay store: every JWT's (issuer, jti) until it expires

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cds_tokens",
        sa.Column("issuer", sa.String(length=512), primary_key=True),
        sa.Column("jti", sa.String(length=255), primary_key=True),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_cds_tokens_expires_at", "cds_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_cds_tokens_expires_at", "cds_tokens")
    op.drop_table("cds_tokens")
