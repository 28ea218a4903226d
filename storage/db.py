"""Engine and session factory for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_DATABASE_URL = "sqlite:///replyclock.db"
READ_ONLY = "replyclock_read_only"
# SQLite: a connection with this execution option opens no transaction of its own (no BEGIN): each
# statement is its own (SQLite's autocommit), as PostgreSQL's AUTOCOMMIT. For one-statement reads
# (the send loop's reader, bot.flow.outbox): a BEGIN and a ROLLBACK fewer per read.
STATEMENT_TRANSACTIONS = "replyclock_statement_transactions"

log = logging.getLogger("replyclock.db")

# SQLite's own checkpoint (copying the write-ahead log back into the database file) runs inside the
# commit that takes the log past `wal_autocheckpoint` pages, and its cost grows with the number of
# pages written since the last one: a sweep among a million open conversations touches a thousand
# scattered pages, and its commits paid for the checkpoint (0.27 s against 0.18 s among 10,000).
# `replyclock run` checkpoints in its idle time instead (bot.jobs, checkpoint_wal); the automatic
# checkpoint stays only as a backstop, so the log stays bounded even when no idle checkpoint runs
# (a process without the job, a sweep that never pauses, a job that keeps failing).
WAL_AUTOCHECKPOINT_PAGES = 16_384  # 64 MiB of 4 KiB pages
# After a checkpoint lets the log start again from its beginning, the file is cut back to this.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024


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
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Readers (metrics, health, digests, exports) need no write lock: in WAL mode a plain
        # BEGIN reads a consistent snapshot while the one writer goes on.
        options = connection.get_execution_options()
        if options.get(STATEMENT_TRANSACTIONS):
            return
        if options.get(READ_ONLY):
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


@dataclass(frozen=True)
class Checkpoint:
    """What one SQLite WAL checkpoint did (the three figures of ``PRAGMA wal_checkpoint``)."""

    busy: bool  # a RESTART or TRUNCATE checkpoint could not get the locks it waits for
    log_frames: int  # pages in the write-ahead log (0 once it was restarted or truncated)
    checkpointed: int  # of them, copied into the database file

    @property
    def complete(self) -> bool:
        """Every page of the log is in the database file."""
        return not self.busy and self.checkpointed >= self.log_frames


def wal_bytes(engine: Engine) -> int:
    """Size of an SQLite database's write-ahead log file (0 if none, or not SQLite)."""
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return 0
    try:
        return os.path.getsize(f"{engine.url.database}-wal")
    except OSError:
        return 0


def checkpoint(
    engine: Engine, mode: Literal["PASSIVE", "TRUNCATE"] = "PASSIVE", *, busy_timeout: float | None = None
) -> Checkpoint | None:
    """Copy SQLite's write-ahead log into the database file, outside any transaction (None: not SQLite).

    PASSIVE copies what it can without waiting for anyone: writers go on meanwhile, and readers
    that still see older pages keep the log from restarting. TRUNCATE also waits (up to
    `busy_timeout` seconds, else the connection's busy timeout) for the writer and for every
    reader to move on, then empties the log file: the remedy when PASSIVE has let it grow.
    """
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return None
    raw = engine.raw_connection()  # a checkpoint cannot run inside a transaction
    try:
        connection: Any = raw.driver_connection
        previous: int | None = None
        if busy_timeout is not None:
            previous = int(connection.execute("PRAGMA busy_timeout").fetchone()[0])
            connection.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        try:
            busy, log_frames, checkpointed = connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            if previous is not None:
                connection.execute(f"PRAGMA busy_timeout={previous}")
    finally:
        raw.close()
    # Not in WAL mode, the figures are -1: nothing to copy.
    return Checkpoint(bool(busy), max(int(log_frames), 0), max(int(checkpointed), 0))
