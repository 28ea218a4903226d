"""On SQLite only one `replyclock run` may write: a second one is refused with a clear message."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy import Engine


class RunLockError(RuntimeError):
    """Another process already runs against this SQLite database."""


def single_writer_lock(engine: Engine) -> AbstractContextManager[None]:
    """An exclusive lock beside the SQLite file (none needed on PostgreSQL, where rows are claimed)."""
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return contextlib.nullcontext()
    return _flock(Path(engine.url.database).resolve())


@contextlib.contextmanager
def _flock(database: Path) -> Iterator[None]:
    lock_path = database.with_name(database.name + ".run.lock")
    handle = open(lock_path, "a+")  # noqa: SIM115 - held for the life of the process
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunLockError(
                f"{database} is in use by replyclock run ({holder}); SQLite allows one running process. "
                "Stop it, or use PostgreSQL (DATABASE_URL=postgresql+psycopg://...) to run several."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
