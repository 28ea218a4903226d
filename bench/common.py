"""What every bench needs: a scratch database of the right kind, and the machine's name."""

from __future__ import annotations

import platform
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import text
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


def cpu_model() -> str:
    """The CPU's model name, as the benches print it beside their figures."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
