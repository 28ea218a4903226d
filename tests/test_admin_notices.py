"""The admin channel as the example promises: failing connectors, rate-limit parking and
resumption, messages of unknown fate; each told once per account, topic and hour."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from sqlalchemy import select

from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxMessage, OutboxSender
from bot.jobs import ALERT_AFTER_FAILURES, Jobs
from connectors.base import Batch, Connector, InboundPost, RateLimited, ReplyTarget
from storage import repo
from storage.models import Outbox
from tests.conftest import MONDAY


class Scripted(Connector):
    """Answers each fetch with the next scripted outcome: an exception to raise or a batch."""

    kind = "demo"

    def __init__(self, outcomes: Iterator[Exception | Batch]) -> None:
        super().__init__("social")
        self.outcomes = outcomes

    def fetch(self, cursor: str | None) -> Batch:
        outcome = next(self.outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def reply(self, to: ReplyTarget, text: str) -> str:
        raise NotImplementedError


def alerts(ctx: AppContext) -> list[tuple[str, str]]:
    with ctx.sessions() as session:
        rows = session.scalars(select(Outbox).where(Outbox.kind == "admin_alert").order_by(Outbox.id))
        return [(row.idempotency_key, str(row.payload["text"])) for row in rows]


def good(n: int, clock: FakeClock) -> Batch:
    post = InboundPost(str(n), f"id-{n}", "a general question", clock.now(), author_handle=f"c{n}")
    return Batch(posts=(post,), cursor=str(n))


def test_failures_after_n_tries_and_the_resumption_are_told_once(ctx: AppContext, clock: FakeClock) -> None:
    outcomes: list[Exception | Batch] = [
        ConnectionError(f"reset {i}") for i in range(ALERT_AFTER_FAILURES + 1)
    ]
    connector = Scripted(iter([*outcomes, good(1, clock), good(2, clock)]))
    jobs = Jobs(ctx, {"social": connector}, OutboxSender(ctx, {}), send_after_poll=False)
    for attempt in range(ALERT_AFTER_FAILURES + 1):
        jobs.poll("social")
        assert len(alerts(ctx)) == (1 if attempt + 1 >= ALERT_AFTER_FAILURES else 0)
        clock.advance(timedelta(minutes=16))  # past any back-off
    [(key, text)] = alerts(ctx)
    assert (
        key.startswith("failing:social:") and f"social: {ALERT_AFTER_FAILURES} polls in a row failed" in text
    )
    assert jobs.poll("social") == 1
    assert [key.split(":")[0] for key, _ in alerts(ctx)] == ["failing", "resumed"]
    clock.advance(timedelta(minutes=1))
    assert jobs.poll("social") == 1
    assert len(alerts(ctx)) == 2  # working normally: nothing more to say


def test_a_rate_limit_park_and_its_end_are_told(ctx: AppContext, clock: FakeClock) -> None:
    reset = MONDAY + timedelta(minutes=15)
    connector = Scripted(iter([RateLimited(reset), good(1, clock)]))
    jobs = Jobs(ctx, {"social": connector}, OutboxSender(ctx, {}), send_after_poll=False)
    jobs.poll("social")
    jobs.poll("social")  # still parked: X is not asked, nothing new is said
    [(key, text)] = alerts(ctx)
    assert key == "ratelimit:social:20261123T08" and "parked until 2026-11-23 08:15 UTC" in text
    clock.advance(timedelta(minutes=16))
    assert jobs.poll("social") == 1
    assert [key for key, _ in alerts(ctx)] == ["ratelimit:social:20261123T08", "resumed:social:20261123T08"]


def test_messages_of_unknown_fate_are_told_once_an_hour(ctx: AppContext, clock: FakeClock) -> None:
    def timeout(_message: OutboxMessage) -> str:
        raise TimeoutError("read timed out after the request was sent")

    sender = OutboxSender(ctx, {"ack": timeout})
    jobs = Jobs(ctx, {}, sender, send_after_poll=False)
    for n in range(3):
        with ctx.sessions() as session, session.begin():
            repo.enqueue(session=session, kind="ack", key=f"ack-{n}", payload={"text": "hi"}, now=clock.now())
        jobs.run_outbox()
        clock.advance(timedelta(minutes=10))
    [(key, text)] = alerts(ctx)
    assert key == "unknown:outbox:20261123T08" and "of unknown fate" in text


def test_configuration_problems_at_start_up_are_told_once_a_day(ctx: AppContext, clock: FakeClock) -> None:
    import dataclasses

    teams = dict(ctx.policy.teams)
    teams["billing"] = dataclasses.replace(teams["billing"], language="sv")  # no Swedish template
    policies = tuple(
        dataclasses.replace(p, resolution=timedelta(days=3)) if p.name == "classic" else p
        for p in ctx.policy.policies
    )
    ctx.policy = dataclasses.replace(ctx.policy, teams=teams, policies=policies)
    jobs = Jobs(ctx, {}, OutboxSender(ctx, {}), send_after_poll=False)
    assert jobs.report_configuration() == 2
    texts = [text for _key, text in alerts(ctx)]
    assert any(t.startswith("team billing: no acknowledgement template in its language 'sv'") for t in texts)
    assert any(
        t.startswith("policy classic: has a resolution target but no close_after_silence") for t in texts
    )
    clock.advance(timedelta(hours=3))
    assert jobs.report_configuration() == 0  # a restart the same day says nothing new
