"""How fast `replyclock export` writes CSV, and whether its memory stays flat as the table grows.

`bot.reports.export.write_export` streams conversations with ``yield_per`` (a server-side cursor on
PostgreSQL) and writes each row as it arrives, so its memory should not depend on the number
of rows. For every database and size N (default 10,000 and 100,000) this benchmark

1. creates a fresh, migrated database: an SQLite file in a temporary directory under /tmp
   (deleted afterwards), or the schema ``bench_export`` in the PostgreSQL database
   ``replyclock_bench`` (created if missing; the schema is dropped and recreated per size and
   dropped at the end; the tests' database is never touched);
2. seeds one account and N conversations of two teams with a realistic mix of outcomes
   (answered, open, closed with and without reply, some breached, some reopened): Core
   executemany on SQLite, COPY on PostgreSQL;
3. exports all of them to a sink that only counts characters, three times, and reports the
   best time as rows per second;
4. measures memory two ways: the peak of Python allocations traced by `tracemalloc` during
   one export in this process, and the peak resident set size (``VmHWM``) of a fresh child
   process that imports replyclock and runs one export (so import costs are the same for every
   size and only the export differs);
5. measures, at the smallest size only, what holding every row would take instead (tracemalloc
   peak of ``list(export_rows(...))``), per row, and extrapolates it to the largest size.

The verdict line compares the largest size's tracemalloc peak with the smallest's (flat means
a ratio near 1; above 1.5 a WARNING is printed; the exit status stays 0).

Run it from the project root (about a minute with PostgreSQL)::

    .venv/bin/python -m bench.export
    .venv/bin/python -m bench.export --databases sqlite --sizes 10000,100000,300000

PostgreSQL is used when reachable at ``--postgres-url`` (default: the environment variable
REPLYCLOCK_BENCH_DATABASE_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench;
the database name must contain "bench") and reported as skipped otherwise. Progress goes to
stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import psycopg
from psycopg import sql
from sqlalchemy import Engine, Table, insert

from bench.common import postgres_schema, prepare_postgres, sqlite_file
from bot.reports.export import export_rows, write_export
from storage.db import make_engine, make_sessionmaker
from storage.migrate import upgrade
from storage.models import Account, Conversation

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL_ENV = "REPLYCLOCK_BENCH_DATABASE_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench"
SCHEMA = "bench_export"
SINCE = datetime(2026, 1, 1, tzinfo=UTC)
CHUNK = 20_000
RATIO_LIMIT = 1.5

CONVERSATIONS = cast(Table, Conversation.__table__)
ACCOUNTS = cast(Table, Account.__table__)
COLUMNS: tuple[str, ...] = tuple(column.name for column in CONVERSATIONS.columns)
Row = dict[str, Any]


# --- seeding ---------------------------------------------------------------------------------


def conversation_rows(size: int, seed: int = 7) -> Iterator[Row]:
    """`size` conversations spread over 2026, in a realistic mix of outcomes."""
    rng = random.Random(seed)
    span = timedelta(days=330).total_seconds()
    for number in range(1, size + 1):
        opened = SINCE + timedelta(seconds=span * number / size)
        team = "billing" if number % 3 == 0 else "care"
        owner = rng.choice(("maria", "lee") if team == "billing" else ("sam", "nina"))
        due = opened + timedelta(hours=8 if team == "billing" else 24)
        took = timedelta(minutes=rng.randrange(5, 36 * 60))
        breached = took > due - opened
        fate = rng.random()
        row: Row = {
            "id": number,
            "account_id": 1,
            "thread_key": f"t{number}",
            "author_id": f"author-{rng.randrange(size)}",
            "author_name": None,
            "author_handle": f"customer{number}",
            "status": "answered",
            "team": team,
            "priority": "normal",
            "policy": team if team == "billing" else "classic",
            "route_rule": "billing words" if team == "billing" else None,
            "owner": owner,
            "assigned_at": opened,
            "claimed_by": owner if fate < 0.5 else None,
            "claimed_at": opened + timedelta(minutes=10) if fate < 0.5 else None,
            "opened_at": opened,
            "cycle": 0,
            "cycle_started_at": opened,
            "clock_started_at": opened,
            "due_at": due,
            "last_customer_post_at": opened,
            "first_response_at": opened + took,
            "answered_at": opened + took,
            "answered_by": f"expert:{owner}",
            "breached_at": due if breached else None,
            "breach_cycle": 0 if breached else None,
            "closed_at": None,
            "close_reason": None,
            "acknowledged_at": opened,
            "warnings_sent": 1,
            "nag_level": 0,
            "escalation_step": 0,
            "reassignments": 0,
            "next_action_at": None,
            "slack_channel": f"#{team}",
            "slack_ts": f"{1_700_000_000 + number}.000100",
            "version": 3,
        }
        if fate > 0.9:  # closed without reply (spam)
            row.update(
                status="closed",
                first_response_at=None,
                answered_at=None,
                answered_by=None,
                closed_at=opened + timedelta(minutes=30),
                close_reason="spam",
                breached_at=None,
                breach_cycle=None,
            )
        elif fate > 0.8:  # still open, waiting
            row.update(
                status="open",
                first_response_at=None,
                answered_at=None,
                answered_by=None,
                next_action_at=due,
            )
        elif fate > 0.7:  # reopened, answered again, closed
            row.update(
                status="closed",
                cycle=1,
                cycle_started_at=opened + took + timedelta(hours=2),
                answered_at=opened + took + timedelta(hours=5),
                closed_at=opened + took + timedelta(hours=6),
                close_reason="resolved",
            )
        yield row


def chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def seed(engine: Engine, size: int) -> None:
    with engine.begin() as conn:
        conn.execute(insert(ACCOUNTS).values(id=1, name="social", kind="demo"))
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            connection: psycopg.Connection[Any] = raw.driver_connection  # type: ignore[assignment]
            statement = sql.SQL("COPY conversations ({}) FROM STDIN").format(
                sql.SQL(", ").join(sql.Identifier(name) for name in COLUMNS)
            )
            with connection.cursor() as cursor:
                with cursor.copy(statement) as copy:
                    for row in conversation_rows(size):
                        copy.write_row([row[name] for name in COLUMNS])
                cursor.execute("ANALYZE conversations")
            connection.commit()
        finally:
            raw.close()
    else:
        with engine.begin() as conn:
            for chunk in chunks(conversation_rows(size), CHUNK):
                conn.execute(insert(CONVERSATIONS), chunk)
        raw = engine.raw_connection()  # outside any transaction (the engine's BEGIN IMMEDIATE)
        try:
            lite = raw.cursor()
            lite.execute("ANALYZE")
            lite.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            lite.close()
        finally:
            raw.close()


# --- measuring -------------------------------------------------------------------------------


class CountingSink:
    """A text file that only counts what is written to it."""

    def __init__(self) -> None:
        self.characters = 0

    def write(self, value: str) -> int:
        self.characters += len(value)
        return len(value)


def export_once(engine: Engine) -> tuple[int, float, int]:
    """One full export to a counting sink: rows, seconds, characters."""
    sink = CountingSink()
    started = time.perf_counter()
    with make_sessionmaker(engine)() as session:
        rows = write_export(session, sink, since=SINCE)  # type: ignore[arg-type]
    return rows, time.perf_counter() - started, sink.characters


def traced_peak(action: Any) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def child_max_rss(url: str) -> tuple[int, int]:
    """Peak RSS (KiB) of a fresh process that runs one export, and its rows."""
    output = subprocess.run(
        [sys.executable, "-m", "bench.export", "--child", url],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    answer = json.loads(output)
    return int(answer["max_rss_kib"]), int(answer["rows"])


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    Linux's ``ru_maxrss`` survives ``execve``, so a child would report its parent's peak at the
    moment of the fork; ``VmHWM`` belongs to the new address space. Elsewhere, ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(url: str) -> int:
    engine = make_engine(url)
    rows, _seconds, _characters = export_once(engine)
    engine.dispose()
    print(json.dumps({"rows": rows, "max_rss_kib": peak_rss_kib()}))
    return 0


@dataclass
class Result:
    database: str
    size: int
    rows: int
    best_seconds: float
    characters: int
    traced_peak: int
    child_rss_kib: int
    holding_all_per_row: float | None = None

    @property
    def rate(self) -> float:
        return self.rows / self.best_seconds


# --- databases -------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(database: str, size: int, postgres_url: str, *, holding_all: bool) -> Result:
    with ExitStack() as stack:
        url = (
            sqlite_file(stack, "replyclock-export-bench-")
            if database == "sqlite"
            else postgres_schema(postgres_url, SCHEMA, stack)
        )
        engine = make_engine(url)
        stack.callback(engine.dispose)
        upgrade(engine)
        progress(f"{database} {size:,}: seeding")
        seed(engine, size)
        progress(f"{database} {size:,}: exporting")
        runs = [export_once(engine) for _ in range(3)]
        rows, best, characters = min(runs, key=lambda run: run[1])
        if rows != size:
            raise RuntimeError(f"exported {rows} rows, expected {size}")
        peak = traced_peak(lambda: export_once(engine))
        rss, child_rows = child_max_rss(url)
        assert child_rows == size
        per_row: float | None = None
        if holding_all:
            progress(f"{database} {size:,}: holding every row, for comparison")

            def hold() -> None:
                with make_sessionmaker(engine)() as session:
                    held = list(export_rows(session, since=SINCE))
                    assert len(held) == size

            per_row = traced_peak(hold) / size
        return Result(database, size, rows, best, characters, peak, rss, per_row)


def print_report(results: Sequence[Result], skipped: dict[str, str]) -> None:
    print(f"replyclock export benchmark, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print()
    print(
        f"{'database':<10}{'rows':>10}{'best s':>9}{'rows/s':>10}{'CSV MB':>8}{'traced peak':>13}{'child max RSS':>15}"
    )
    for result in results:
        print(
            f"{result.database:<10}{result.rows:>10,}{result.best_seconds:>9.2f}{result.rate:>10,.0f}"
            f"{result.characters / 1e6:>8.1f}{result.traced_peak / 1e6:>10.2f} MB{result.child_rss_kib / 1024:>12.1f} MB"
        )
    for database, reason in skipped.items():
        print(f"{database:<10}skipped: {reason}")
    print()
    for database in dict.fromkeys(result.database for result in results):
        mine = sorted((r for r in results if r.database == database), key=lambda r: r.size)
        small, large = mine[0], mine[-1]
        ratio = large.traced_peak / small.traced_peak
        rss_ratio = large.child_rss_kib / small.child_rss_kib
        print(
            f"{database}: traced peak at {large.size:,} rows / at {small.size:,} rows = {ratio:.2f}; "
            f"child max RSS ratio {rss_ratio:.2f}"
            + ("" if ratio <= RATIO_LIMIT else f"  WARNING: above {RATIO_LIMIT}, memory grows with rows")
        )
        if small.holding_all_per_row is not None:
            print(
                f"{database}: holding every row instead takes {small.holding_all_per_row:,.0f} bytes/row "
                f"(traced at {small.size:,}), i.e. about {small.holding_all_per_row * large.size / 1e6:,.0f} MB "
                f"at {large.size:,} rows"
            )


def parse_sizes(value: str) -> list[int]:
    sizes = sorted({int(part.replace("_", "")) for part in value.split(",") if part.strip()})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes must be positive integers, e.g. 10000,100000")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[10_000, 100_000])
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL)
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child)
    results: list[Result] = []
    skipped: dict[str, str] = {}
    for database in [name.strip() for name in args.databases.split(",") if name.strip()]:
        if database == "postgres":
            try:
                prepare_postgres(args.postgres_url)
            except psycopg.Error as error:
                skipped[database] = f"not reachable at {args.postgres_url} ({str(error).splitlines()[0]})"
                continue
        elif database != "sqlite":
            raise SystemExit(f"unknown database {database!r} (sqlite, postgres)")
        for index, size in enumerate(args.sizes):
            results.append(measure(database, size, args.postgres_url, holding_all=index == 0))
    print_report(results, skipped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
