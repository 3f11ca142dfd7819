"""the twin core: store-assigned ids, served version, refresh leases, twin model version

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ASSIGNED_MIN = 2**52
ASSIGNED_MAX = 2**53 - 1


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("twins") as batch:
        batch.add_column(sa.Column("model_name", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("model_version", sa.String(length=32), nullable=True))
        batch.create_index("ix_twins_model_version", ["model_version"])
    with op.batch_alter_table("identifiers") as batch:
        batch.alter_column("system", type_=sa.String(length=1024),
                           existing_type=sa.String(length=255), existing_nullable=False)
    with op.batch_alter_table("refresh_jobs") as batch:
        batch.drop_constraint("uq_refresh_model", type_="unique")
        batch.alter_column("worker", existing_type=sa.String(length=128), nullable=True)
        batch.alter_column("started_at", existing_type=sa.DateTime(), nullable=True)
        batch.add_column(sa.Column("created_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("verified", sa.Boolean(), nullable=True))
    op.create_table(
        "served_model",
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("changed_at", sa.DateTime(), nullable=False),
        sa.Column("changed_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("model_name"),
    )
    op.create_table(
        "id_counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("next_value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # twins created before this revision by "max + 1" may sit in the assigned range:
    # start above them
    top = op.get_bind().execute(sa.text(
        "SELECT MAX(subject_id) FROM twins WHERE subject_id >= :lo"), {"lo": ASSIGNED_MIN}
    ).scalar()
    start = max(ASSIGNED_MIN, (top or 0) + 1)
    if sqlite:
        op.execute(sa.text("INSERT INTO id_counters (name, next_value) VALUES ('twin', :v)")
                   .bindparams(v=start))
    else:
        op.execute(f"CREATE SEQUENCE twin_id_seq AS BIGINT START WITH {start} "
                   f"MINVALUE {ASSIGNED_MIN} MAXVALUE {ASSIGNED_MAX} NO CYCLE")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP SEQUENCE IF EXISTS twin_id_seq")
    op.drop_table("id_counters")
    op.drop_table("served_model")
    with op.batch_alter_table("refresh_jobs") as batch:
        for col in ("verified", "attempts", "heartbeat_at", "lease_expires_at", "created_at"):
            batch.drop_column(col)
        batch.create_unique_constraint("uq_refresh_model", ["model_name", "model_version"])
    with op.batch_alter_table("twins") as batch:
        batch.drop_index("ix_twins_model_version")
        batch.drop_column("model_version")
        batch.drop_column("model_name")
