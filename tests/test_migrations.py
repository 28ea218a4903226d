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
