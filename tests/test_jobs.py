"""Scheduled jobs: polls store posts with their cursor, failures park the account, the sweep is woken on time."""

from __future__ import annotations

from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from bot.jobs import OUTBOX_JOB, SWEEP_JOB, SWEEP_WAKE_JOB, Jobs
from connectors.base import AuthFailed, Batch, Connector, InboundPost, RateLimited, ReplyTarget
from connectors.demo import DemoConnector, ScriptedPost
from storage.models import Account, Conversation, Outbox
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
    assert {job.id for job in scheduler.get_jobs()} >= {SWEEP_JOB, OUTBOX_JOB, "poll:social"}
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
