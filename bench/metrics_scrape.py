"""How long one /metrics scrape takes as the outbox grows: 10,000 and 1,000,000 rows, SQLite and PostgreSQL.

Issue 11: each scrape grouped the whole outbox table (0.74-0.84 s at 1,000,467 rows on SQLite),
so unauthenticated scrapers could slow everything else. Now the scrape counts only the statuses
that do not pile up (pending, sending, failed, unknown) through ``ix_outbox_status_kind``, and the
open/overdue conversations through ``ix_conversations_status_team_due``: its cost follows the
backlog, not the table.

For each database and size the bench builds a migrated scratch database, fills it server-side
(PostgreSQL ``generate_series``, SQLite a recursive CTE) with that many outbox rows, nearly all
``sent`` plus a backlog of 200 ``pending`` and 20 ``failed``, 5,000 conversations (200 open),
runs ``ANALYZE``, then times `bot.reports.metrics.exposition` (the whole /metrics body, as
served) --scrapes times after two warm-up scrapes. It prints the median and worst scrape, the
ratio of the largest size to the smallest, and whether the median is within 20 ms.

    .venv/bin/python -m bench.metrics_scrape
    .venv/bin/python -m bench.metrics_scrape --databases sqlite --sizes 10000,1000000 --scrapes 30

PostgreSQL: ``--postgres-url`` (default the database ``replyclock_bench_h11`` on 127.0.0.1; its
name must contain ``bench``); a scratch schema is created and dropped in it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tomllib
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime

from sqlalchemy import Engine, text

from bench.common import cpu_model, postgres_schema, prepare_postgres, sqlite_file
from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.reports.metrics import build_registry, exposition
from storage.db import make_engine
from storage.migrate import upgrade

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench_h11"
AIM_SECONDS = 0.020
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = """
[calendars.always]
timezone = "UTC"
hours = { mon-sun = ["00:00-24:00"] }

[experts.ana]
name = "Ana Lima"
slack_id = "U0ANA0001"
timezone = "UTC"

[teams.care]
channel = "#care"
experts = ["ana"]
calendar = "always"

[teams.billing]
channel = "#billing"
experts = ["ana"]
calendar = "always"

[[policies]]
name = "all"
first_response = "24h"

[accounts.shop]
kind = "webhook"
"""
CONVERSATIONS, OPEN_CONVERSATIONS, PENDING, FAILED = 5_000, 200, 200, 20


def _numbers(dialect: str, n: int) -> str:
    """A FROM clause yielding x = 1..n."""
    if dialect == "postgresql":
        return f"generate_series(1, {n}) AS g(x)"
    return f"(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT x FROM c)"


def fill(engine: Engine, rows: int) -> None:
    dialect = engine.dialect.name
    at = "'2026-11-20 12:00:00+00:00'" if dialect == "sqlite" else "TIMESTAMPTZ '2026-11-20 12:00:00+00'"
    payload = "'{}'"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts (id, name, kind) VALUES (1, 'shop', 'webhook')"))
        conn.execute(
            text(
                "INSERT INTO conversations (account_id, author_id, status, team, priority, policy, opened_at,"
                " cycle, cycle_started_at, clock_started_at, due_at, last_customer_post_at, warnings_sent,"
                " nag_level, escalation_step, reassignments, version) "
                f"SELECT 1, 'a' || x, CASE WHEN x <= {OPEN_CONVERSATIONS} THEN 'open' ELSE 'answered' END,"
                " CASE WHEN x % 2 = 0 THEN 'care' ELSE 'billing' END, 'normal', 'all',"
                f" {at}, 0, {at}, {at}, {at}, {at}, 0, 0, 0, 0, 1 FROM {_numbers(dialect, CONVERSATIONS)}"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outbox (kind, payload, idempotency_key, status, attempts, created_at,"
                " next_attempt_at) "
                "SELECT CASE WHEN x % 3 = 0 THEN 'ack' ELSE 'card' END, "
                f"{payload}, 'k' || x, CASE WHEN x <= {PENDING} THEN 'pending'"
                f" WHEN x <= {PENDING + FAILED} THEN 'failed' ELSE 'sent' END, 1, {at}, {at}"
                f" FROM {_numbers(dialect, rows)}"
            )
        )
    with engine.connect() as conn:
        if dialect == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
        else:
            conn.execute(text("ANALYZE"))
            conn.commit()


def measure(url: str, rows: int, scrapes: int) -> tuple[float, float, float]:
    """(seconds to fill, median scrape, worst scrape)."""
    engine = make_engine(url)
    try:
        upgrade(engine)
        started = time.perf_counter()
        fill(engine, rows)
        filled = time.perf_counter() - started
        policy = parse_policy(tomllib.loads(POLICY), source="bench", text=POLICY)
        registry = build_registry(AppContext(policy=policy, engine=engine, clock=FakeClock(NOW)))
        body, _ = exposition(registry)
        assert b"replyclock_database_up 1.0" in body, body[:500]
        assert b'replyclock_outbox_messages{kind="card",status="pending"}' in body
        exposition(registry)
        times = []
        for _ in range(scrapes):
            started = time.perf_counter()
            exposition(registry)
            times.append(time.perf_counter() - started)
        return filled, statistics.median(times), max(times)
    finally:
        engine.dispose()


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("sizes must be integers, e.g. 10000,1000000") from None
    if not sizes or any(size <= PENDING + FAILED for size in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be above {PENDING + FAILED}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=[10_000, 1_000_000])
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument(
        "--postgres-url", default=os.environ.get("REPLYCLOCK_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    )
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}; load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(
        f"{'database':<10} {'outbox rows':>12} {'fill s':>8} {'median ms':>10} {'worst ms':>9}  within 20 ms"
    )
    failed = False
    for database in [part.strip() for part in args.databases.split(",") if part.strip()]:
        medians = []
        for rows in args.sizes:
            with ExitStack() as stack:
                if database == "sqlite":
                    url = sqlite_file(stack, "replyclock-metrics-bench-")
                else:
                    version = prepare_postgres(args.postgres_url)
                    url = postgres_schema(args.postgres_url, f"metrics_{rows}", stack)
                    database = f"postgres{version.split('.')[0]}"
                filled, median, worst = measure(url, rows, args.scrapes)
            medians.append(median)
            ok = median <= AIM_SECONDS
            failed |= not ok
            print(
                f"{database:<10} {rows:>12,} {filled:>8.1f} {median * 1000:>10.2f} {worst * 1000:>9.2f}  "
                f"{'yes' if ok else 'NO'}",
                flush=True,
            )
        print(
            f"{database:<10} ratio of median scrape, {args.sizes[-1]:,} / {args.sizes[0]:,} rows: "
            f"{medians[-1] / medians[0]:.2f}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
