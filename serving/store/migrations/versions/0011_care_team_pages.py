"""care-team pages: users and their sessions, each twin's current risk per horizon, and
twin alerts with their acknowledgements (append-only)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

APPEND_ONLY = ("twin_alerts", "alert_acks")
INDEXES = {  # as serving.store.models.TwinRisk declares them: each list's order and
    # filters in one index (so a page is an index range read), the counts' too
    "ix_twin_risks_rank": ["horizon_days", "risk", "subject_id", "expires_at",
                           "last_event_time"],
    "ix_twin_risks_rise": ["horizon_days", "rise", "subject_id", "expires_at", "risk",
                           "last_event_time"],
    "ix_twin_risks_quiet": ["horizon_days", "last_event_time", "subject_id", "expires_at",
                            "risk"],
    "ix_twin_risks_window": ["horizon_days", "expires_at", "risk", "rise", "last_event_time",
                             "subject_id"],
}
OPEN_INDEX = ("ix_twin_risks_open", ["horizon_days", "risk", "subject_id", "expires_at"],
              "open_alert_id IS NOT NULL")  # partial: the few twins with an open alert


def upgrade() -> None:
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "users",
        sa.Column("id", big, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("disabled_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "ui_sessions",
        sa.Column("id", big, primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_ui_sessions_user_id", "ui_sessions", ["user_id"])
    op.add_column("access_log", sa.Column("user_id", sa.BigInteger(), nullable=True))
    op.create_table(
        "twin_risks",
        sa.Column("subject_id", sa.BigInteger(), sa.ForeignKey("twins.subject_id"),
                  primary_key=True),
        sa.Column("horizon_days", sa.Integer(), primary_key=True),
        sa.Column("risk", sa.Float(), nullable=True),
        sa.Column("previous_risk", sa.Float(), nullable=True),
        sa.Column("rise", sa.Float(), nullable=True),
        sa.Column("last_event_time", sa.DateTime(), nullable=True),
        sa.Column("as_of", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("forecast_id", sa.String(36), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("armed", sa.Boolean(), nullable=False),
        sa.Column("open_alert_id", sa.BigInteger(), nullable=True),
    )
    for name, cols in INDEXES.items():
        op.create_index(name, "twin_risks", cols)
    name, cols, where = OPEN_INDEX
    op.create_index(name, "twin_risks", cols, sqlite_where=sa.text(where),
                    postgresql_where=sa.text(where))
    op.create_table(
        "twin_alerts",
        sa.Column("id", big, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("subject_id", sa.BigInteger(), sa.ForeignKey("twins.subject_id"),
                  nullable=False),
        sa.Column("horizon_days", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("forecast_id", sa.String(36), nullable=False),
        sa.Column("risk", sa.Float(), nullable=False),
        sa.Column("previous_risk", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("as_of", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("model_name", sa.String(255), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("previous_model_version", sa.String(32), nullable=True),
    )
    op.create_index("ix_twin_alerts_subject_id", "twin_alerts", ["subject_id"])
    op.create_index("ix_twin_alerts_open", "twin_alerts", ["kind", "created_at"])
    op.create_table(
        "alert_acks",
        sa.Column("alert_id", sa.BigInteger(), sa.ForeignKey("twin_alerts.id"),
                  primary_key=True),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id"), nullable=True),
        sa.Column("api_key_id", sa.BigInteger(), sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("user_name", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    _backfill()
    if op.get_bind().dialect.name == "sqlite":
        for table in APPEND_ONLY:
            for what in ("UPDATE", "DELETE"):
                op.execute(f"CREATE TRIGGER {table}_no_{what.lower()} BEFORE {what} ON "
                           f"{table} BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END")
    else:
        for table in APPEND_ONLY:
            op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON "
                       f"{table} FOR EACH ROW EXECUTE FUNCTION twincast_append_only()")


def _backfill() -> None:
    """Each twin's current forecast (its kept view) into ``twin_risks``, so an upgraded
    store's population is there at once; no alert is raised for what was already known
    (each slot is armed: the next crossing alerts)."""
    import json
    from datetime import datetime, timedelta

    bind = op.get_bind()
    table = sa.table("twin_risks", *(sa.column(c) for c in (
        "subject_id", "horizon_days", "risk", "previous_risk", "rise", "last_event_time",
        "as_of", "expires_at", "forecast_id", "model_version", "armed", "open_alert_id")))
    rows = []
    # streamed (a server-side cursor on PostgreSQL): the options on the statement only,
    # never on the connection, which runs the DDL after it
    result = bind.execute(sa.text("SELECT subject_id, view, last_event_time FROM twins "
                                  "WHERE view IS NOT NULL")
                          .execution_options(stream_results=True, yield_per=2000))
    for sid, view, last in result:
        fc = json.loads(view).get("forecast") or {}
        if fc.get("status") != "ok" or not fc.get("risks") or not fc.get("as_of"):
            continue
        as_of = datetime.fromisoformat(fc["as_of"].removesuffix("Z"))
        if isinstance(last, str):
            last = datetime.fromisoformat(last)
        for key, risk in fc["risks"].items():
            h = int(key.removesuffix("d"))
            rows.append({"subject_id": sid, "horizon_days": h, "risk": risk,
                         "previous_risk": None, "rise": None, "last_event_time": last,
                         "as_of": as_of, "expires_at": as_of + timedelta(days=h),
                         "forecast_id": fc["forecast_id"],
                         "model_version": str(fc["model"]["version"]), "armed": True,
                         "open_alert_id": None})
        if len(rows) >= 10_000:
            bind.execute(table.insert(), rows)
            rows = []
    if rows:
        bind.execute(table.insert(), rows)


def downgrade() -> None:
    for table in APPEND_ONLY:
        if op.get_bind().dialect.name == "sqlite":
            for what in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{what}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
    op.drop_table("alert_acks")
    op.drop_index("ix_twin_alerts_open", "twin_alerts")
    op.drop_index("ix_twin_alerts_subject_id", "twin_alerts")
    op.drop_table("twin_alerts")
    for name in (*INDEXES, OPEN_INDEX[0]):
        op.drop_index(name, "twin_risks")
    op.drop_table("twin_risks")
    with op.batch_alter_table("access_log") as b:
        b.drop_column("user_id")
    op.drop_index("ix_ui_sessions_user_id", "ui_sessions")
    op.drop_table("ui_sessions")
    op.drop_table("users")
