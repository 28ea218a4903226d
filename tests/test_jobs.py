"""Scheduled jobs: polls store posts with their cursor, failures park the account, the sweep is woken on time."""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import insert, select

from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from bot.jobs import OUTBOX_CUSTOMER_JOB, OUTBOX_JOB, SWEEP_JOB, SWEEP_WAKE_JOB, WAL_CHECKPOINT_JOB, Jobs
from connectors.base import AuthFailed, Batch, Connector, InboundPost, RateLimited, ReplyTarget
from connectors.demo import DemoConnector, ScriptedPost
from storage.db import WAL_AUTOCHECKPOINT_PAGES, checkpoint, make_engine, wal_bytes
from storage.migrate import upgrade
from storage.models import Account, Conversation, Event, Outbox
from tests.conftest import MONDAY


class Failing(Connector):
    kind = "demo"

    def __init__(self, error: Exception) -> None:
        super().__init__("social")
        self.error = error
        self.calls = 0

    def fetch(self, cursor: str | None) -> Batch:
        self.calls += 1
        raise self.error

    def reply(self, to: ReplyTarget, text: str) -> str:
        raise NotImplementedError


def script() -> list[ScriptedPost]:
    return [
        ScriptedPost(timedelta(0), "1", "c1", "ana", "Ana", "the site is down"),
        ScriptedPost(timedelta(minutes=5), "2", "c2", "ben", "Ben", "invoice question"),
    ]


def test_poll_stores_posts_and_cursor_and_wakes_the_sweep(ctx: AppContext, clock: FakeClock) -> None:
    connector = DemoConnector("social", clock=clock, script=script(), start=MONDAY)
    jobs = Jobs(ctx, {"social": connector}, OutboxSender(ctx, {}), send_after_poll=False)
    scheduler = BackgroundScheduler(timezone="UTC")
    jobs.install(scheduler)
    scheduler.start(paused=True)  # jobs go into the store (and replace each other) but never run here
    assert {job.id for job in scheduler.get_jobs()} >= {
        SWEEP_JOB,
        OUTBOX_JOB,
        OUTBOX_CUSTOMER_JOB,
        "poll:social",
    }
    assert jobs.poll("social") == 1
    clock.advance(timedelta(minutes=10))
    assert jobs.poll("social") == 1
    wake = scheduler.get_job(SWEEP_WAKE_JOB)
    assert jobs.poll("social") == 0
    with ctx.sessions() as session:
        assert session.scalars(select(Account.cursor)).one() == "2"
        urgent = session.scalars(select(Conversation).where(Conversation.priority == "urgent")).one()
    assert wake is not None
    # The urgent one's warning (45 min) is the earliest next action, but the wake never sleeps past the interval.
    assert wake.trigger.run_date == min(urgent.next_action_at, MONDAY + timedelta(minutes=11))
    scheduler.shutdown(wait=False)


def test_rate_limit_parks_the_account_until_reset(ctx: AppContext, clock: FakeClock) -> None:
    connector = Failing(RateLimited(MONDAY + timedelta(minutes=15)))
    jobs = Jobs(ctx, {"social": connector}, OutboxSender(ctx, {}))
    assert jobs.poll("social") == 0
    assert jobs.poll("social") == 0
    assert connector.calls == 1  # parked: the second poll did not call the platform
    clock.advance(timedelta(minutes=16))
    jobs.poll("social")
    assert connector.calls == 2


class LimitedAfterOnePage(Connector):
    """Page 1 holds one post and says there is more; page 2 is refused with a 429 until `reset`."""

    kind = "demo"

    def __init__(self, reset: datetime) -> None:
        super().__init__("social")
        self.reset = reset
        self.limited = True

    def fetch(self, cursor: str | None) -> Batch:
        if cursor is None:
            post = InboundPost("1", "ana", "the site is down", MONDAY, author_name="Ana")
            return Batch(posts=(post,), cursor="page-2", more=True)
        if self.limited:
            raise RateLimited(self.reset)
        return Batch(posts=(), cursor="done")

    def reply(self, to: ReplyTarget, text: str) -> str:
        raise NotImplementedError


def test_a_rate_limit_on_page_two_parks_the_account_with_page_one_stored(
    ctx: AppContext, clock: FakeClock
) -> None:
    reset = MONDAY + timedelta(minutes=15)
    connector = LimitedAfterOnePage(reset)
    jobs = Jobs(ctx, {"social": connector}, OutboxSender(ctx, {}), send_after_poll=False)
    assert jobs.poll("social") == 1
    with ctx.sessions() as session:
        account = session.scalars(select(Account)).one()
    # Parked with page 1's cursor; page 1's success does not wipe out why it is parked.
    assert (account.cursor, account.parked_until) == ("page-2", reset)
    assert account.last_error is not None and "rate limited" in account.last_error
    clock.advance(timedelta(minutes=16))
    connector.limited = False
    assert jobs.poll("social") == 0
    with ctx.sessions() as session:
        account = session.scalars(select(Account)).one()
        texts = [
            row.payload["text"] for row in session.scalars(select(Outbox).where(Outbox.kind == "admin_alert"))
        ]
    assert (account.cursor, account.parked_until, account.last_error) == ("done", None, None)
    assert any("polling resumed" in text for text in texts), texts


def test_refused_credentials_alert_the_admins_once_an_hour(ctx: AppContext, clock: FakeClock) -> None:
    connector = Failing(AuthFailed("401 Unauthorized"))
    jobs = Jobs(ctx, {"social": connector}, OutboxSender(ctx, {}))
    jobs.poll("social")
    clock.advance(timedelta(minutes=16))
    jobs.poll("social")
    with ctx.sessions() as session:
        alerts = session.scalars(select(Outbox).where(Outbox.kind == "admin_alert")).all()
        account = session.scalars(select(Account)).one()
    assert connector.calls == 2 and len(alerts) == 1
    assert "credentials refused" in alerts[0].payload["text"]
    assert account.last_error is not None and "401" in account.last_error


def test_a_crashing_fetch_is_logged_and_backed_off(ctx: AppContext) -> None:
    connector = Failing(ConnectionError("connection reset"))
    jobs = Jobs(ctx, {"social": connector}, OutboxSender(ctx, {}))
    assert jobs.poll("social") == 0
    with ctx.sessions() as session:
        account = session.scalars(select(Account)).one()
    assert account.parked_until is not None and account.parked_until > MONDAY
    assert connector.consecutive_failures == 1


def test_each_team_gets_its_digest_job_unless_off(ctx: AppContext) -> None:
    import dataclasses

    teams = dict(ctx.policy.teams)
    teams["care"] = dataclasses.replace(teams["care"], digest=None)
    ctx.policy = dataclasses.replace(ctx.policy, teams=teams)
    scheduler = BackgroundScheduler(timezone="UTC")
    Jobs(ctx, {}, OutboxSender(ctx, {})).install(scheduler)
    scheduler.start(paused=True)
    try:
        assert scheduler.get_job("digest:care") is None
        assert scheduler.get_job("digest:billing") is not None
    finally:
        scheduler.shutdown(wait=False)


# --- SQLite's write-ahead log: checkpointed by a job in idle time, not inside commits -------------


@pytest.fixture
def sqlite_ctx(tmp_path: Path, policy: Policy, clock: FakeClock) -> AppContext:
    engine = make_engine(f"sqlite:///{tmp_path / 'replyclock.db'}")
    upgrade(engine)
    checkpoint(engine, "TRUNCATE")
    return AppContext(policy=policy, engine=engine, clock=clock)


def fill(ctx: AppContext, kib: int) -> None:
    """About `kib` KiB of audit events, 100 rows per transaction."""
    for _ in range(kib // 100):
        with ctx.sessions() as session, session.begin():
            session.execute(
                insert(Event),
                [{"at": MONDAY, "actor": "test", "action": "filler", "detail": {"pad": "x" * 1000}}] * 100,
            )


def test_sqlite_checkpoints_in_idle_time_not_inside_commits(sqlite_ctx: AppContext) -> None:
    engine = sqlite_ctx.engine
    database = str(engine.url.database)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == WAL_AUTOCHECKPOINT_PAGES
    before = os.path.getsize(database)
    fill(sqlite_ctx, 6_000)  # some 1,500 pages: SQLite's default would have checkpointed in a commit
    assert os.path.getsize(database) == before  # no commit copied the log back
    assert wal_bytes(engine) > 1_000 * 4096
    jobs = Jobs(sqlite_ctx, {}, OutboxSender(sqlite_ctx, {}))
    done = jobs.checkpoint_wal()
    assert done is not None and done.complete and done.log_frames > 1_000
    assert os.path.getsize(database) > before + 5_000 * 1024
    with sqlite_ctx.read_sessions() as session:
        assert session.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) == 6_000


def test_a_log_held_by_a_reader_is_emptied_once_it_lets_go(
    sqlite_ctx: AppContext, caplog: pytest.LogCaptureFixture
) -> None:
    engine = sqlite_ctx.engine
    jobs = Jobs(sqlite_ctx, {}, OutboxSender(sqlite_ctx, {}))
    jobs.wal_truncate_above = 1024 * 1024
    jobs.wal_truncate_wait = timedelta(milliseconds=200)
    reader = sqlite3.connect(str(engine.url.database), isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # a long read: it sees the old pages
        fill(sqlite_ctx, 2_000)
        with caplog.at_level(logging.WARNING, logger="replyclock.jobs"):
            held = jobs.checkpoint_wal()
        assert held is not None and not held.complete
        assert "write-ahead log not checkpointed" in caplog.text
        assert wal_bytes(engine) > 1024 * 1024
    finally:
        reader.close()
    done = jobs.checkpoint_wal()
    assert done is not None and done.complete
    assert wal_bytes(engine) == 0  # TRUNCATE: the file is emptied, not only copied back


def test_the_checkpoint_job_is_sqlite_only(ctx: AppContext) -> None:
    jobs = Jobs(ctx, {}, OutboxSender(ctx, {}))
    scheduler = BackgroundScheduler(timezone="UTC")
    jobs.install(scheduler)
    scheduler.start(paused=True)
    try:
        installed = scheduler.get_job(WAL_CHECKPOINT_JOB) is not None
    finally:
        scheduler.shutdown(wait=False)
    sqlite = ctx.engine.dialect.name == "sqlite"
    assert installed == sqlite
    assert (jobs.checkpoint_wal() is not None) == sqlite
