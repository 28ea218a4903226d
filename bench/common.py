"""What every bench needs: a scratch database of the right kind, and the machine's name."""

from __future__ import annotations

import itertools
import platform
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine, Table, insert, text
from sqlalchemy.engine import make_url

from storage.db import make_engine


def prepare_postgres(url: str, *, name_must_contain: Iterable[str] = ("bench",)) -> str:
    """Create the bench database when missing; the server's version.

    Refuses a database whose name contains none of `name_must_contain`, so a bench can never
    drop schemas in a database that holds anything else (the tests' `test`, production).
    Raises psycopg.Error when the server is unreachable.
    """
    parsed = make_url(url)
    name = parsed.database or ""
    allowed = tuple(name_must_contain)
    if not any(part in name for part in allowed):
        raise SystemExit(
            f"refusing to use database {name!r}: its name must contain {' or '.join(map(repr, allowed))}"
        )
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        version = conn.execute("SHOW server_version").fetchone()
    return str(version[0]) if version else "?"


def postgres_schema(base_url: str, schema: str, stack: ExitStack) -> str:
    """A fresh schema in the bench database (dropped again on exit); a URL whose search_path is it."""

    def recreate(create: bool) -> None:
        engine = make_engine(base_url)
        try:
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                if create:
                    conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        finally:
            engine.dispose()

    recreate(True)
    stack.callback(recreate, False)
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def scratch_directory(stack: ExitStack, prefix: str = "replyclock-bench-") -> Path:
    """A new directory under /tmp, removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    stack.callback(shutil.rmtree, directory, True)
    return directory


def sqlite_file(stack: ExitStack, prefix: str = "replyclock-bench-") -> str:
    """A URL for a new SQLite file in a scratch directory (removed on exit)."""
    return f"sqlite:///{scratch_directory(stack, prefix) / 'bench.db'}"


def bulk_insert(
    engine: Engine, table: Table, rows: Iterable[Mapping[str, Any]], *, chunk: int = 20_000
) -> int:
    """Write `rows` (each with every column of `table`) the fastest way each database takes them:
    COPY on PostgreSQL (then the id sequence moved past the largest id), SQLAlchemy Core executemany
    in chunks of `chunk` rows on SQLite; one transaction. Returns how many rows were written."""
    columns = [column.name for column in table.columns]
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return 0
    if set(first) != set(columns):
        raise ValueError(
            f"rows for {table.name} differ from its columns in {sorted(set(columns) ^ set(first))}"
        )
    written = 0
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            connection: psycopg.Connection[Any] = raw.driver_connection  # type: ignore[assignment]
            statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(table.name), sql.SQL(", ").join(sql.Identifier(name) for name in columns)
            )
            with connection.cursor() as cursor:
                with cursor.copy(statement) as copy:
                    for row in itertools.chain((first,), iterator):
                        copy.write_row([row[name] for name in columns])
                        written += 1
                if "id" in columns:
                    cursor.execute(
                        sql.SQL(
                            "SELECT setval(pg_get_serial_sequence({}, 'id'), (SELECT max(id) FROM {}))"
                        ).format(sql.Literal(table.name), sql.Identifier(table.name))
                    )
            connection.commit()
        finally:
            raw.close()
        return written
    with engine.begin() as conn:
        rest = itertools.chain((first,), iterator)
        while batch := list(itertools.islice(rest, chunk)):
            conn.execute(insert(table), batch)
            written += len(batch)
    return written


def cpu_model() -> str:
    """The CPU's model name, as the benches print it beside their figures."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
