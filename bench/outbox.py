"""The outbox: claim time by table size, and the sender against a bare slack_sdk loop.

1. **Claim time.** For each size N (default 10,000 and 1,000,000 rows), a fresh migrated
   database holds 10,000 conversations and N outbox rows: N - 1,000 `sent` (each conversation
   has N / 10,000 of them) and 1,000 `pending`, the newest row of 1,000 different conversations,
   due now. Statistics are left as the bulk load left them (no ANALYZE), as on a server whose
   autovacuum is behind. Timed: `OutboxSender._claim(1)` (one transaction: pick the next due
   row whose conversation has no earlier unsent row in its lane, mark it `sending`), 300 times;
   printed: median and p90 per claim, and the ratio of the largest size's median to the
   smallest's (goal: at most 1.5).
2. **Sender vs bare loop.** 300 new conversations (ingested as posts) are delivered to the
   Slack stand-in (bot.demo.standin, in a process of its own, rate limits off) on loopback by the
   real `OutboxSender` with the Slack handlers (the cards ingest wrote; storm summaries off; no
   pacing), then the very same `chat.postMessage` calls (channel, text, blocks, metadata, as the
   stand-in recorded them) are posted again by a bare loop of `slack_sdk.WebClient.chat_postMessage`.
   Printed: both times and their ratio (goal: at most 2). ``--profile N`` prints the top of the
   sender's cProfile; ``--standin-in-process`` runs the stand-in as a thread of this process.

Run from the project root::

    .venv/bin/python -m bench.outbox                      # SQLite, sizes 10k and 1M
    .venv/bin/python -m bench.outbox --sizes 10000,100000 --databases sqlite,postgresql

PostgreSQL: ``--postgres-url`` (default REPLYCLOCK_BENCH_DATABASE_URL, else
postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench; the name must contain "bench").
Each size gets its own schema, dropped at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from slack_sdk import WebClient
from sqlalchemy import Engine, func, select, text

from bench.common import cpu_model, postgres_schema, prepare_postgres, sqlite_file
from bot.config import load_policy
from bot.core.clock import FakeClock
from bot.demo.standin import DEFAULT_TOKEN, SlackStandIn, SlackUser
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from bot.flow.outbox import OutboxSender
from bot.slack.delivery import slack_handlers
from connectors.base import InboundPost
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models import Conversation, Outbox

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "tests" / "data" / "policy.toml"
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # a Monday morning: experts on duty
CONVERSATIONS = 10_000
PENDING = 1_000
CLAIMS = 300
MESSAGES = 300
POSTED = ("channel", "text", "blocks", "metadata")  # what the bare loop posts again


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def post(index: int) -> InboundPost:
    return InboundPost(
        external_id=f"b{index}",
        author_id=f"id-c{index}",
        author_handle=f"c{index}",
        author_name=f"Customer {index}",
        text=f"hello, question number {index} about my invoice",
        posted_at=NOW - timedelta(seconds=1),
    )


def seed_conversations(ctx: AppContext, count: int, *, keep_cards: bool = False) -> None:
    """`count` conversations through the real ingest (in batches), their outbox rows then removed
    (all, or all but their cards, as ingest wrote them)."""
    for start in range(0, count, 500):
        with ctx.sessions() as session, session.begin():
            ingest_batch(
                session,
                ctx,
                account="social",
                posts=[post(i) for i in range(start, min(count, start + 500))],
                is_own=lambda p: False,
                cursor=None,
            )
    with ctx.sessions() as session, session.begin():
        session.execute(text("DELETE FROM outbox" + (" WHERE kind <> 'card'" if keep_cards else "")))
        session.execute(text("DELETE FROM events"))


def seed_outbox(engine: Engine, size: int) -> None:
    """`size` rows: all but PENDING `sent`, then one pending (due) row in each of PENDING conversations."""
    postgres = engine.dialect.name == "postgresql"
    sent = size - PENDING
    when = "'2026-11-23 08:00:00+00'" if postgres else "'2026-11-23 08:00:00.000000'"
    due = "'2026-11-23 08:59:00+00'" if postgres else "'2026-11-23 08:59:00.000000'"
    series = (
        "generate_series(1, :n) AS s(i)"
        if postgres
        else "(WITH RECURSIVE s(i) AS (VALUES (1) UNION ALL SELECT i + 1 FROM s WHERE i < :n) SELECT i FROM s)"
    )
    columns = (
        "kind, conversation_id, payload, idempotency_key, status, attempts, created_at, "
        "next_attempt_at, sent_at, result"
    )
    with engine.begin() as conn:
        low = conn.scalar(select(func.min(Conversation.id)))
        conn.execute(
            text(
                f"INSERT INTO outbox ({columns}) SELECT 'nag', :low + (i % :k), '{{}}', 'sent:' || i, 'sent', 1, "
                f"{when}, {when}, {when}, 'thread C0 1.2' FROM {series}"
            ),
            {"n": sent, "low": low, "k": CONVERSATIONS},
        )
        step = CONVERSATIONS // PENDING
        conn.execute(
            text(
                f"INSERT INTO outbox ({columns}) SELECT 'nag', :low + ((i * :step) % :k), "
                f"'{{\"index\": 1}}', 'pending:' || i, 'pending', 0, {due}, {due}, NULL, NULL FROM {series}"
            ),
            {"n": PENDING, "low": low, "k": CONVERSATIONS, "step": step},
        )
    if not postgres:
        with engine.connect() as conn:
            conn.exec_driver_sql("COMMIT")
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def time_claims(ctx: AppContext) -> list[float]:
    sender = OutboxSender(ctx, {})
    times = []
    for _ in range(CLAIMS):
        began = time.perf_counter()
        claimed = sender._claim(1)
        times.append(time.perf_counter() - began)
        assert claimed, "nothing claimed"
    return times


def claim_bench(database: str, sizes: Sequence[int], postgres_url: str) -> list[tuple[int, list[float]]]:
    policy = load_policy(POLICY)
    results = []
    for size in sizes:
        with ExitStack() as stack:
            if database == "sqlite":
                url = sqlite_file(stack, "replyclock-bench-outbox-")
            else:
                url = postgres_schema(postgres_url, f"bench_outbox_{size}", stack)
            engine = make_engine(url)
            stack.callback(engine.dispose)
            upgrade(engine)
            ctx = AppContext(policy=policy, engine=engine, clock=FakeClock(NOW))
            progress(f"{database} {size:,}: seeding")
            began = time.monotonic()
            seed_conversations(ctx, CONVERSATIONS)
            seed_outbox(engine, size)
            with ctx.sessions() as session:
                total = session.scalar(select(func.count()).select_from(Outbox))
            assert total == size, (total, size)
            progress(f"{database} {size:,}: seeded in {time.monotonic() - began:.1f} s; claiming")
            results.append((size, time_claims(ctx)))
    return results


def _serve_standin(conn: Connection, channels: dict[str, str], users: list[SlackUser]) -> None:
    """A child process: the Slack stand-in (limits off), its URL sent back, then its posts on request."""
    with SlackStandIn(channels=channels, users=users, rate_limits=False) as slack:
        conn.send(slack.base_url)
        while (request := conn.recv()) != "stop":
            assert request == "calls"
            conn.send(
                [(c.method, c.ok, {k: v for k, v in c.params.items() if k in POSTED}) for c in slack.calls]
            )


@contextmanager
def standin(
    channels: dict[str, str], users: list[SlackUser], *, own_process: bool
) -> Iterator[tuple[str, Callable[[], list[tuple[str, bool, dict[str, Any]]]]]]:
    """The Slack stand-in (rate limits off): its base URL, and a function listing its calls.

    In its own process by default: Slack is not in our process in production, and a stand-in
    thread in ours competes for the GIL with the code measured (the sender's database waits
    end with a GIL hand-over, a bare HTTP loop has few).
    """
    if not own_process:
        with SlackStandIn(channels=channels, users=users, rate_limits=False) as slack:
            yield (
                slack.base_url,
                lambda: [
                    (c.method, c.ok, {k: v for k, v in c.params.items() if k in POSTED}) for c in slack.calls
                ],
            )
        return
    parent, child = multiprocessing.get_context("fork").Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=_serve_standin, args=(child, channels, users), daemon=True
    )
    process.start()
    try:
        base_url = parent.recv()

        def calls() -> list[tuple[str, bool, dict[str, Any]]]:
            parent.send("calls")
            found: list[tuple[str, bool, dict[str, Any]]] = parent.recv()
            return found

        yield base_url, calls
    finally:
        parent.send("stop")
        process.join(10)


@dataclass(frozen=True)
class SenderFigures:
    sender_seconds: float
    bare_seconds: float
    messages: int
    sender_cpu: float  # this process's CPU seconds (the stand-in's own process not counted)
    bare_cpu: float


def sender_bench(
    database: str, postgres_url: str, *, profile: int = 0, standin_in_process: bool = False
) -> SenderFigures:
    """Wall and CPU seconds of the sender and of the bare loop for MESSAGES cards.

    Both post to the same stand-in (rate limits off) and the sender paces nothing (no pacer):
    like with like. `profile` > 0: run the sender under cProfile and print that many lines of
    its profile (by own time, then cumulative), to stderr.
    """
    policy = load_policy(POLICY)
    users = [SlackUser(e.slack_id, e.name, tz="UTC") for e in policy.experts.values()]
    with ExitStack() as stack:
        if database == "sqlite":
            url = sqlite_file(stack, "replyclock-bench-sender-")
        else:
            url = postgres_schema(postgres_url, "bench_outbox_sender", stack)
        engine = make_engine(url)
        stack.callback(engine.dispose)
        upgrade(engine)
        ctx = AppContext(policy=policy, engine=engine, clock=FakeClock(NOW))
        base_url, calls = stack.enter_context(
            standin(
                {"C0CARE0001": "care", "C0BILLING1": "billing"}, users, own_process=not standin_in_process
            )
        )
        client = WebClient(token=DEFAULT_TOKEN, base_url=base_url)
        seed_conversations(ctx, MESSAGES, keep_cards=True)
        handlers = slack_handlers(ctx, client, storm_threshold=10**9, pacer=None)
        sender = OutboxSender(ctx, handlers)
        client.auth_test()  # warm up: channel lookups, first connection
        before = len(calls())
        profiler = cProfile.Profile() if profile else None
        began, cpu_began = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        result = sender.send_due(limit=MESSAGES + 10)
        if profiler is not None:
            profiler.disable()
        sender_seconds = time.perf_counter() - began
        sender_cpu = time.process_time() - cpu_began
        if profiler is not None:
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out).strip_dirs()
            stats.sort_stats("tottime").print_stats(profile)
            stats.sort_stats("cumulative").print_stats(profile)
            progress(f"{database}: sender profile (cProfile)\n{out.getvalue()}")
        assert result.sent == MESSAGES, result
        made = calls()[before:]
        posts = [params for method, ok, params in made if method == "chat.postMessage" and ok]
        if len(made) > len(posts):
            progress(f"(the sender also made {len(made) - len(posts)} other Slack calls)")
        began, cpu_began = time.perf_counter(), time.process_time()
        for params in posts:
            client.chat_postMessage(**params)
        bare_seconds = time.perf_counter() - began
        bare_cpu = time.process_time() - cpu_began
        return SenderFigures(sender_seconds, bare_seconds, len(posts), sender_cpu, bare_cpu)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--databases", default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("REPLYCLOCK_BENCH_DATABASE_URL")
        or "postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench",
    )
    parser.add_argument("--skip-claims", action="store_true")
    parser.add_argument("--skip-sender", action="store_true")
    parser.add_argument(
        "--standin-in-process",
        action="store_true",
        help="run the Slack stand-in in this process (a thread), as before: it competes for the GIL",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="sender rounds (each on a fresh database); the median ratio is the figure",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N lines of the sender's cProfile"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    databases = [d.strip() for d in args.databases.split(",")]
    load = os.getloadavg()
    print(
        f"replyclock outbox bench, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at start"
    )
    status = 0
    for database in databases:
        if database == "postgresql":
            version = prepare_postgres(args.postgres_url)
            print(f"PostgreSQL {version}")
        if not args.skip_claims:
            results = claim_bench(database, sizes, args.postgres_url)
            print(f"{database}: claim of one due row ({CLAIMS} claims; {PENDING:,} pending, the rest sent)")
            print(f"  {'rows':>10}  {'median ms':>10}  {'p90 ms':>8}")
            for size, times in results:
                ordered = sorted(times)
                print(
                    f"  {size:>10,}  {statistics.median(ordered) * 1000:>10.3f}  "
                    f"{ordered[int(len(ordered) * 0.9)] * 1000:>8.3f}"
                )
            ratio = statistics.median(results[-1][1]) / statistics.median(results[0][1])
            verdict = "OK" if ratio <= 1.5 else "WARNING: over 1.5"
            print(f"  ratio {results[-1][0]:,} / {results[0][0]:,}: {ratio:.2f} ({verdict})")
            status |= ratio > 1.5
        if not args.skip_sender:
            ratios: list[float] = []
            for round_ in range(1, max(1, args.rounds) + 1):
                figures = sender_bench(
                    database,
                    args.postgres_url,
                    profile=args.profile if round_ == 1 else 0,
                    standin_in_process=args.standin_in_process,
                )
                count = figures.messages
                ratios.append(figures.sender_seconds / figures.bare_seconds)
                print(
                    f"{database} round {round_}: {count} cards to the Slack stand-in: sender "
                    f"{figures.sender_seconds:.2f} s ({count / figures.sender_seconds:.0f}/s), bare slack_sdk "
                    f"loop {figures.bare_seconds:.2f} s ({count / figures.bare_seconds:.0f}/s); ratio "
                    f"{ratios[-1]:.2f}; CPU of this process per message: sender "
                    f"{figures.sender_cpu / count * 1000:.2f} ms, bare loop "
                    f"{figures.bare_cpu / count * 1000:.2f} ms ({figures.sender_cpu / figures.bare_cpu:.2f}x); "
                    f"load {os.getloadavg()[0]:.1f}"
                )
            ratio = statistics.median(ratios)
            verdict = "OK" if ratio <= 2 else "WARNING: over 2"
            print(
                f"{database}: sender / bare loop, median of {len(ratios)} rounds: {ratio:.2f} ({verdict}); "
                f"range {min(ratios):.2f} to {max(ratios):.2f}"
            )
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
