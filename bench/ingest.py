"""Ingest throughput: posts per second through the whole ingest path, beside raw inserts.

For batches of 100 new customer posts, `ingest_batch` does everything a real poll does: dedupe
against stored posts, find or open the conversation, route it, compute its deadline, choose an
owner and write the audit events and outbox rows (card and acknowledgement), all in one
transaction per batch. Beside it, the same posts go into an empty copy of the same table with a
plain SQLAlchemy Core executemany INSERT, one transaction per batch: the floor any ingest path
stands on. The ratio says what the work of turning a post into a conversation costs.

Run:
    python -m bench.ingest [--posts 5000] [--batch 100] [--databases sqlite,postgres]
    python -m bench.ingest --databases sqlite --open 1000000 --reuse /tmp/replyclock-sweep-seeds

``--open N`` (SQLite) ingests into a database already holding N open conversations of the same
teams, seeded as bench.sweep seeds them (``--reuse DIR`` shares bench.sweep's seeded files):
routing reads each team's open loads and last assignment per batch, so this shows what the
backlog costs ingest. The raw insert column is then left out.

PostgreSQL is reached at $REPLYCLOCK_BENCH_DATABASE_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench); the database is created when
missing and its schema `bench_ingest` is dropped afterwards. SQLite files go under /tmp.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from sqlalchemy import Column, Engine, MetaData, Table, UniqueConstraint, insert

from bench.common import cpu_model, postgres_schema, prepare_postgres, sqlite_file
from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from connectors.base import InboundPost
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models import Post

ROOT = Path(__file__).resolve().parent.parent
POLICY_TEXT = (ROOT / "tests" / "data" / "policy.toml").read_text()
START = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)  # a Monday morning in Berlin
TEXTS = (
    "I was charged twice for my invoice, can you refund one?",
    "Is the app down? I cannot log in since this morning",
    "How do I change the delivery address of my order?",
    "Love the new feature, but where did the export button go?",
)
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench"


def make_posts(count: int, offset: int) -> list[InboundPost]:
    """Distinct authors so each post opens a conversation (the expensive path)."""
    return [
        InboundPost(
            external_id=f"p{offset + i}",
            author_id=f"a{offset + i}",
            author_handle=f"customer{offset + i}",
            author_name=f"Customer {offset + i}",
            text=TEXTS[i % len(TEXTS)],
            posted_at=START + timedelta(seconds=offset + i),
            thread_id=f"t{offset + i}",
            url=f"https://social.example/status/{offset + i}",
        )
        for i in range(count)
    ]


def never_own(_post: InboundPost) -> bool:
    return False


def time_ingest(engine: Engine, posts: int, batch: int) -> float:
    policy = parse_policy(tomllib.loads(POLICY_TEXT), source="tests/data/policy.toml", text=POLICY_TEXT)
    clock = FakeClock(START + timedelta(days=1))
    ctx = AppContext(policy=policy, engine=engine, clock=clock)
    batches = [make_posts(batch, start) for start in range(0, posts, batch)]
    began = time.perf_counter()
    for chunk in batches:
        with ctx.sessions() as session, session.begin():
            result = ingest_batch(
                session, ctx, account="social", posts=chunk, is_own=never_own, cursor=chunk[-1].external_id
            )
            assert result.stored == len(chunk) and len(result.opened) == len(chunk)
    return time.perf_counter() - began


def time_core_insert(engine: Engine, posts: int, batch: int) -> float:
    """The same rows into a copy of the posts table (same columns and unique key, no foreign keys)."""
    metadata = MetaData()
    raw = Table(
        "posts_raw",
        metadata,
        *(
            Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in Post.__table__.columns
        ),
        UniqueConstraint("account_id", "external_id"),
    )
    metadata.create_all(engine)
    now = START + timedelta(days=1)
    batches = [
        [
            {
                "account_id": 1,
                "external_id": p.external_id,
                "direction": "in",
                "author_id": p.author_id,
                "author_name": p.author_name,
                "author_handle": p.author_handle,
                "text": p.text,
                "url": p.url,
                "language": None,
                "posted_at": p.posted_at,
                "received_at": now,
                "reply_to_external_id": None,
                "thread_key": p.thread_id,
            }
            for p in make_posts(batch, start)
        ]
        for start in range(0, posts, batch)
    ]
    began = time.perf_counter()
    for rows in batches:
        with engine.begin() as connection:
            connection.execute(insert(raw), rows)
    return time.perf_counter() - began


@contextmanager
def sqlite_engine() -> Iterator[Engine]:
    with ExitStack() as stack:
        engine = make_engine(sqlite_file(stack, "replyclock-bench-ingest-"))
        upgrade(engine)
        yield engine
        engine.dispose()


@contextmanager
def postgres_engine(url: str) -> Iterator[Engine]:
    prepare_postgres(url)
    with ExitStack() as stack:
        engine = make_engine(postgres_schema(url, "bench_ingest", stack))
        try:
            upgrade(engine)
            yield engine
        finally:
            engine.dispose()


@contextmanager
def sqlite_backlog(size: int, reuse: Path | None) -> Iterator[Engine]:
    """An SQLite database holding `size` open conversations (bench.sweep's seed)."""
    from bench.sweep import open_target

    policy = parse_policy(tomllib.loads(POLICY_TEXT), source="tests/data/policy.toml", text=POLICY_TEXT)
    with ExitStack() as stack:
        yield open_target("sqlite", size, policy, "", stack, reuse).engine


def measure(
    name: str,
    factory: Callable[[], AbstractContextManager[Engine]],
    posts: int,
    batch: int,
    rounds: int,
    *,
    raw_insert: bool = True,
) -> None:
    ingest_rates: list[float] = []
    raw_rates: list[float] = []
    for _ in range(rounds):
        with factory() as engine:
            ingest_rates.append(posts / time_ingest(engine, posts, batch))
            if raw_insert:
                raw_rates.append(posts / time_core_insert(engine, posts, batch))
    ingest = statistics.median(ingest_rates)
    if not raw_insert:
        print(
            f"{name:<10} {posts:>7,} {batch:>6} {ingest:>16,.0f}   ({' '.join(f'{r:,.0f}' for r in ingest_rates)})"
        )
        return
    raw = statistics.median(raw_rates)
    print(
        f"{name:<10} {posts:>7,} {batch:>6} {ingest:>16,.0f} {raw:>18,.0f} {raw / ingest:>14.1f}"
        f"   ({' '.join(f'{r:,.0f}' for r in ingest_rates)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--posts", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--open", type=int, default=0, help="SQLite: open conversations already there")
    parser.add_argument("--reuse", type=Path, default=None, help="with --open: bench.sweep's seeded files")
    args = parser.parse_args()
    cpu = cpu_model()
    print(f"replyclock ingest benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}"
    )
    print(
        "each post opens a conversation: dedupe, route, deadline, owner, events, card + acknowledgement outbox rows"
    )
    print(
        f"{'database':<10} {'posts':>7} {'batch':>6} {'ingest posts/s':>16} {'core insert rows/s':>18} {'raw / ingest':>14}   (each round)"
    )
    for name in args.databases.split(","):
        if name == "sqlite" and args.open:
            print(f"(SQLite with {args.open:,} open conversations already there)")
            backlog = partial(sqlite_backlog, args.open, args.reuse)
            measure("sqlite", backlog, args.posts, args.batch, args.rounds, raw_insert=False)
        elif name == "sqlite":
            measure("sqlite", sqlite_engine, args.posts, args.batch, args.rounds)
        elif name == "postgres":
            url = os.environ.get("REPLYCLOCK_BENCH_DATABASE_URL", DEFAULT_PG)
            try:
                measure("postgres", partial(postgres_engine, url), args.posts, args.batch, args.rounds)
            except Exception as error:
                print(f"postgres: skipped ({type(error).__name__}: {error})")


if __name__ == "__main__":
    main()
