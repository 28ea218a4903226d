"""The shared replay guard: a signed request's key is accepted once, by any process, until it expires."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import Engine, delete, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import is_postgres
from storage.models import SeenRequest

KEY_LENGTH = 200  # SeenRequest.key's width


def stored_key(key: str) -> str:
    """`key` as it is stored (cut to KEY_LENGTH characters): what `remember_all` returns."""
    return key[:KEY_LENGTH]


def first_time(engine: Engine, key: str, *, expires_at: datetime, now: datetime) -> bool:
    """Record `key` until `expires_at`; False when it is already recorded and not yet expired.

    One short transaction of its own (committed before the request is acted on), so two
    processes racing with the same key cannot both see True: the primary key decides. An
    expired row with the same key is replaced (its timestamp was outside the window anyway).
    """
    key = stored_key(key)
    try:
        with engine.begin() as connection:
            connection.execute(
                delete(SeenRequest).where(SeenRequest.key == key, SeenRequest.expires_at <= now)
            )
            connection.execute(insert(SeenRequest).values(key=key, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


def prune(engine: Engine, now: datetime) -> int:
    """Delete expired keys (the retention job); returns how many."""
    with engine.begin() as connection:
        result = connection.execute(delete(SeenRequest).where(SeenRequest.expires_at <= now))
    return int(result.rowcount or 0)


def remember_all(session: Session, keys: Mapping[str, datetime], *, now: datetime) -> set[str]:
    """Like `first_time` for several keys (each with its expiry), inside the caller's transaction and
    in one statement: the keys recorded now.

    A key already recorded and not expired is left alone and not returned (a replay); an expired
    one is given its new expiry, as if recorded afresh. Keys are cut as `first_time` cuts them
    (`stored_key`); give each (cut) key once. Rows go in by key order, so two
    transactions recording the same keys wait for each other in one direction only.
    """
    if not keys:
        return set()
    dialect = postgresql if is_postgres(session) else sqlite
    statement = dialect.insert(SeenRequest)
    statement = statement.on_conflict_do_update(
        index_elements=[SeenRequest.key],
        set_={"expires_at": statement.excluded.expires_at},
        where=SeenRequest.expires_at <= now,
    ).returning(SeenRequest.key)
    rows = [{"key": stored_key(key), "expires_at": expires_at} for key, expires_at in sorted(keys.items())]
    return set(session.connection().execute(statement, rows).scalars())
