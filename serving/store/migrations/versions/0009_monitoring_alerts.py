"""monitoring alerts: what each monitoring run raised, with its evidence (append-only)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "monitoring_alerts",
        sa.Column("id", big, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("horizon_days", sa.Integer(), nullable=True),
        sa.Column("window_start", sa.DateTime(), nullable=False),
        sa.Column("window_end", sa.DateTime(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("reference", sa.Float(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
    )
    op.create_index("ix_monitoring_alerts_model", "monitoring_alerts",
                    ["model_name", "created_at"])
    # append-only, as forecasts and the access log are (0002)
    if op.get_bind().dialect.name == "sqlite":
        for what in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER monitoring_alerts_no_{what.lower()} BEFORE {what} "
                       "ON monitoring_alerts BEGIN SELECT RAISE(ABORT, "
                       "'monitoring_alerts is append-only'); END")
    else:
        op.execute("CREATE TRIGGER monitoring_alerts_append_only BEFORE UPDATE OR DELETE ON "
                   "monitoring_alerts FOR EACH ROW EXECUTE FUNCTION twincast_append_only()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for what in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS monitoring_alerts_no_{what}")
    else:
        op.execute("DROP TRIGGER IF EXISTS monitoring_alerts_append_only ON monitoring_alerts")
    op.drop_index("ix_monitoring_alerts_model", "monitoring_alerts")
    op.drop_table("monitoring_alerts")
