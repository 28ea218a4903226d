"""The schema changes only through Alembic: the migrations must build exactly what the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from storage.models import Base


def test_models_and_migrations_agree(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, Base.metadata)
    assert differences == [], f"models and migrations differ; write a migration: {differences}"


def test_partial_index_on_next_action_at(engine: Engine) -> None:
    indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes("conversations")}
    assert "ix_conversations_next_action_at" in indexes
    assert indexes["ix_conversations_next_action_at"]["column_names"] == ["next_action_at"]
    options = indexes["ix_conversations_next_action_at"].get("dialect_options", {})
    where = options.get("postgresql_where") or options.get("sqlite_where")
    assert where is not None and "next_action_at IS NOT NULL" in str(where)


def test_read_only_sessions_do_not_wait_for_the_sqlite_writer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On SQLite a reader must not queue behind the write lock (metrics, health, digests, exports)."""
    from sqlalchemy import text

    from storage.db import make_engine, make_sessionmaker
    from storage.migrate import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'locks.db'}", connect_args={"timeout": 0.2})
    upgrade(engine)
    writer = make_sessionmaker(engine)()
    writer.begin()
    writer.execute(text("INSERT INTO accounts (name, kind) VALUES ('a', 'demo')"))  # holds the write lock
    try:
        with make_sessionmaker(engine, read_only=True)() as reader, reader.begin():
            assert (
                reader.execute(text("SELECT count(*) FROM accounts")).scalar() == 0
            )  # the committed snapshot
        import pytest
        from sqlalchemy.exc import OperationalError

        with (
            pytest.raises(OperationalError, match="locked"),
            make_sessionmaker(engine)() as other,
            other.begin(),
        ):
            other.execute(text("SELECT 1"))
    finally:
        writer.rollback()
        writer.close()
        engine.dispose()
