"""On SQLite only one `replyclock run` may write: a second one is refused with a clear message.

The guard lives in the database itself, as the ``run`` row of the ``leases`` table: a process
takes it in a write transaction (``BEGIN IMMEDIATE`` serialises two starting at once), renews it
every RUN_HEARTBEAT, and deletes it when it stops. A second process finds a live lease and is
refused, whatever name or hard link it opened the file by, and deleting a side file changes
nothing. A lease is free when it has lapsed (RUN_TTL without renewal) or when its holder ran on
this host and its process is gone (a SIGKILLed run restarts at once, without waiting RUN_TTL).
PostgreSQL needs no guard: there rows are claimed with ``SKIP LOCKED``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, update

from storage import repo
from storage.db import checkpoint, make_sessionmaker
from storage.models import Lease

log = logging.getLogger("replyclock.runlock")

RUN_LEASE = "run"
RUN_TTL = timedelta(seconds=15)
RUN_HEARTBEAT = timedelta(seconds=3)


class RunLockError(RuntimeError):
    """Another process already runs against this SQLite database."""


def single_writer_lock(engine: Engine) -> AbstractContextManager[None]:
    """Hold the database's ``run`` lease while inside (none needed on PostgreSQL).

    The schema must be current (the ``leases`` table) before entering.

    Raises:
        RunLockError: on entering, when another live process holds the lease.
    """
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return contextlib.nullcontext()
    return _run_lease(engine)


def _alive(host: str, pid: int) -> bool:
    """False only when the holder ran on this host and its process is gone."""
    if host != socket.gethostname()[:200]:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(engine: Engine, holder: str, now: datetime) -> None:
    """Take the ``run`` lease for `holder`, or raise RunLockError naming who has it."""
    database = str(engine.url.database)
    links = os.stat(database).st_nlink if os.path.exists(database) else 1
    if links > 1:
        # In WAL mode the write lock and the latest pages live in files named after the path
        # (-wal, -shm): two names for one file are two databases' worth of locks, so a writer
        # through each name corrupts it. Refuse rather than trust any lock.
        raise RunLockError(
            f"{database} has {links} names (hard links); SQLite allows one running process and its "
            "write-ahead log cannot be shared between names: remove the other links first."
        )
    sessions = make_sessionmaker(engine)
    host, pid = socket.gethostname()[:200], os.getpid()
    with sessions() as session, session.begin():
        current = session.get(Lease, RUN_LEASE)
        if (
            current is not None
            and current.holder != holder
            and current.expires_at > now
            and _alive(current.host, current.pid)
        ):
            raise RunLockError(
                f"{engine.url.database} is in use by replyclock run (pid {current.pid} on {current.host}, "
                f"lease renewed until {current.expires_at:%H:%M:%S} UTC); SQLite allows one running process. "
                "Stop it, or use PostgreSQL (DATABASE_URL=postgresql+psycopg://...) to run several."
            )
        repo.renew_lease(
            session=session,
            name=RUN_LEASE,
            holder=holder,
            host=host,
            pid=pid,
            now=now,
            expires_at=now + RUN_TTL,
        )


def renew(engine: Engine, holder: str, now: datetime) -> bool:
    """Extend the lease if `holder` still has it; False when another process took it."""
    with make_sessionmaker(engine)() as session, session.begin():
        changed = session.execute(
            update(Lease)
            .where(Lease.name == RUN_LEASE, Lease.holder == holder)
            .values(expires_at=now + RUN_TTL)
        ).rowcount  # type: ignore[attr-defined]
    # Copy the renewal into the main file, so that whoever opens it without our -wal file (a copy,
    # another name) still sees a live lease.
    checkpoint(engine)
    return bool(changed)


def release(engine: Engine, holder: str) -> None:
    """Give the lease up (only if `holder` still has it)."""
    with make_sessionmaker(engine)() as session, session.begin():
        session.execute(delete(Lease).where(Lease.name == RUN_LEASE, Lease.holder == holder))


@contextlib.contextmanager
def _run_lease(engine: Engine) -> Iterator[None]:
    holder = f"run:{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    acquire(engine, holder, datetime.now(UTC))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(RUN_HEARTBEAT.total_seconds()):
            try:
                if not renew(engine, holder, datetime.now(UTC)):
                    log.error("the run lease was taken by another process; stopping")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except Exception as error:  # the database is away: one line, try again next beat
                log.error(
                    "run lease not renewed",
                    extra={"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]},
                )

    thread = threading.Thread(target=beat, name="run-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            release(engine, holder)
