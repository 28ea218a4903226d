"""Engine and session factory for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_DATABASE_URL = "sqlite:///replyclock.db"
READ_ONLY = "replyclock_read_only"


def database_url() -> str:
    """`DATABASE_URL` from the environment, or the embedded SQLite default.

    Heroku-style ``postgres://`` and plain ``postgresql://`` URLs are mapped to psycopg 3,
    the only PostgreSQL driver replyclock installs.
    """
    url = os.environ.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """Create an engine with replyclock's per-database settings.

    SQLite runs in WAL mode with a busy timeout, and every transaction starts with
    ``BEGIN IMMEDIATE``: SQLite has one writer at a time, and taking the write lock up
    front means two transactions never deadlock upgrading a read lock (which SQLite would
    report as "database is locked" half-way through a sweep).
    """
    url = url or database_url()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": 30, **kwargs.pop("connect_args", {})}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine, float(connect_args["timeout"]))
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine, timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy's "begin" event below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Readers (metrics, health, digests, exports) need no write lock: in WAL mode a plain
        # BEGIN reads a consistent snapshot while the one writer goes on.
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """A session factory; use as ``with factory() as s, s.begin(): ...``.

    Args:
        read_only: for sessions that only read. On SQLite they start with a plain ``BEGIN``
            instead of taking the write lock; elsewhere nothing changes.
    """
    bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
    return sessionmaker(bind, expire_on_commit=False)


def is_postgres(engine_or_session: Engine | Session) -> bool:
    """True when talking to PostgreSQL (row locks with SKIP LOCKED are available)."""
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "postgresql"
