"""Run Alembic migrations from code (`replyclock db upgrade`, `run`/`web` start-up checks, tests, the demo).

The migrations' source is the top-level ``alembic/`` folder of the checkout; an installed wheel carries
the same files as the ``storage.migrations`` package (see setup.py). `migrations_dir` finds them in
either place, never in the Alembic library's own folder.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine

from alembic import command

CHECKOUT_MIGRATIONS = Path(__file__).resolve().parent.parent / "alembic"


class MigrationError(RuntimeError):
    """A migration could not be found or applied (an unknown revision, for one); the message says which."""


def migrations_dir() -> Path:
    """The folder holding env.py and versions/: the installed package's, else the checkout's."""
    spec = importlib.util.find_spec("storage.migrations")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "env.py").is_file():
                return Path(location)
    if (CHECKOUT_MIGRATIONS / "env.py").is_file():
        return CHECKOUT_MIGRATIONS
    raise MigrationError("the migrations are missing from this installation (storage/migrations)")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at replyclock's migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url:
        config.attributes["url"] = url
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database behind `engine` up to `revision`.

    Raises:
        MigrationError: an unknown revision (Alembic's own message, on one line).
    """
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    script = ScriptDirectory.from_config(config)
    try:
        script.get_revisions(revision)
    except CommandError as error:
        raise MigrationError(f"revision {revision!r}: {error}") from None
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands against the migrations shipped with this version."""

    current: tuple[str, ...]  # the revisions stamped in the database (empty: never migrated)
    heads: tuple[str, ...]  # the newest revisions shipped

    @property
    def is_current(self) -> bool:
        return bool(self.current) and set(self.current) == set(self.heads)

    def describe(self) -> str:
        if not self.current:
            return "the database has no schema yet"
        if self.is_current:
            return f"schema current ({', '.join(self.current)})"
        return f"schema at {', '.join(self.current)}, this version needs {', '.join(self.heads)}"


def schema_state(engine: Engine) -> SchemaState:
    """The database's revision against the shipped heads (reads only; connects once)."""
    script = ScriptDirectory.from_config(alembic_config())
    chatty = logging.getLogger("alembic.runtime.migration")  # "Context impl ..." at INFO: noise here
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_heads()
    finally:
        chatty.setLevel(level)
    return SchemaState(current=tuple(current), heads=tuple(script.get_heads()))
