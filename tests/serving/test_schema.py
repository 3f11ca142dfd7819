"""The migrated store is exactly the schema the models declare, on each database."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Integer, inspect

from serving.store.models import Base


def test_the_migrations_build_what_the_models_declare(store):
    """Alembic's own comparison finds nothing to change: no index the models dropped
    lingers (each costs every stored event an insertion), none they declare is missing."""
    def compare_type(context, inspected, metadata, inspected_type, metadata_type):
        # SQLite keeps every integer type alike (INTEGER affinity): BIGINT == BigInteger
        if context.dialect.name == "sqlite" and isinstance(inspected_type, Integer) \
                and isinstance(metadata_type, Integer):
            return False
        return None  # Alembic's own comparison

    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": compare_type})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_events_carry_only_the_indexes_reads_use(store):
    """Per stored event: the twin's idempotency key, its time order, and — for events of
    resources only — its logical id; nothing by arrival time alone."""
    indexes = {ix["name"]: ix for ix in inspect(store.engine).get_indexes("events")}
    assert set(indexes) >= {"ix_events_subject_time", "ix_events_subject_logical"}
    assert "ix_events_recorded_at" not in indexes
    where = indexes["ix_events_subject_logical"].get("dialect_options", {})
    assert "logical_id IS NOT NULL" in " ".join(str(v) for v in where.values())
