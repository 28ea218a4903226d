"""The sweep on a real database: the ladder climbed step by step, once each, stopped by an answer."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.conversations import mark_answered
from bot.flow.sweep import earliest_next_action, sweep
from storage.models import Conversation, Event, Outbox
from tests.conftest import MONDAY
from tests.test_ingest import ingest, post


def ladder_rows(ctx: AppContext) -> list[tuple[str, int]]:
    with ctx.sessions() as session:
        rows = session.scalars(
            select(Outbox)
            .where(Outbox.kind.in_(["warning", "breach", "nag", "escalation", "reassign"]))
            .order_by(Outbox.id)
        )
        return [(row.kind, int(row.payload["index"])) for row in rows]


def run_until(ctx: AppContext, clock: FakeClock, until: timedelta) -> None:
    """Jump the clock from one next_action_at to the next, sweeping each time (as the scheduler does)."""
    end = MONDAY + until
    while True:
        sweep(ctx)
        nxt = earliest_next_action(ctx)
        if nxt is None or nxt > end:
            clock.set(end)
            sweep(ctx)
            return
        clock.set(max(nxt, clock.now()))


def test_unanswered_urgent_post_climbs_the_whole_ladder(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "the site is down!"))  # urgent: 1 h, warn 75 %, escalate +10m/+30m, nag 20m
    run_until(ctx, clock, timedelta(hours=2))
    assert ladder_rows(ctx) == [
        ("warning", 0),
        ("breach", 0),
        ("escalation", 0),
        ("nag", 1),
        ("escalation", 1),
        ("nag", 2),
        ("nag", 3),
    ]
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert conversation.breached_at == MONDAY + timedelta(hours=1)
        lateness = [
            e.detail["lateness_seconds"] for e in session.scalars(select(Event).where(Event.actor == "sweep"))
        ]
    assert lateness and max(lateness) == 0  # the clock jumped exactly to each next_action_at


def test_an_answer_stops_the_ladder(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "the site is down!"))
    run_until(ctx, clock, timedelta(minutes=50))
    assert ladder_rows(ctx) == [("warning", 0)]
    with ctx.sessions() as session, session.begin():
        conversation = session.scalars(select(Conversation)).one()
        mark_answered(session, conversation, at=clock.now(), by="expert:sam", now=clock.now())
    run_until(ctx, clock, timedelta(hours=5))
    assert ladder_rows(ctx) == [("warning", 0)]
    assert earliest_next_action(ctx) is None


def test_sweeping_twice_at_the_same_moment_does_nothing_twice(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "the site is down!"))
    clock.advance(timedelta(hours=1, minutes=25))
    first = sweep(ctx)
    second = sweep(ctx)
    assert first.processed == 1 and second.processed == 0
    # A late sweep does what is due now in one go: no stale warning, the breach, one escalation, one nag.
    assert ladder_rows(ctx) == [("breach", 0), ("escalation", 0), ("nag", 1)]


def test_unclaimed_business_item_is_reassigned(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund for my invoice please"))  # billing, maria, claim_within 2 h
    clock.advance(timedelta(hours=2))
    sweep(ctx)
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        reassign = session.scalars(select(Outbox).where(Outbox.kind == "reassign")).one()
    assert conversation.owner == "lee"
    assert reassign.payload["previous_owner"] == "maria"
    assert conversation.next_action_at == MONDAY + timedelta(hours=4)  # 50 % warning of 8 business hours


def test_nags_wait_for_the_owner_while_escalation_goes_on(ctx: AppContext, clock: FakeClock) -> None:
    # Nina works 09:00-17:00 in New York. An urgent post at 22:00 UTC (17:00 New York) is due
    # at 23:00 UTC, long after she has left, and she is back at 14:00 UTC the next day.
    evening = MONDAY + timedelta(hours=14)
    clock.set(evening)
    ingest(ctx, post("1", "outage again", author="bigcustomer", at=evening))  # VIP -> urgent, care team
    with ctx.sessions() as session, session.begin():
        conversation = session.scalars(select(Conversation)).one()
        conversation.owner = "nina"  # as if claimed by Nina before she left
    run_until(ctx, clock, timedelta(hours=14 + 4))
    kinds = [kind for kind, _ in ladder_rows(ctx)]
    assert "escalation" in kinds and "breach" in kinds
    assert "nag" not in kinds  # Nina is off duty all night: no nag, the ladder escalated instead
    run_until(ctx, clock, timedelta(days=1, hours=6, minutes=30))  # Tuesday 14:30 UTC = 09:30 New York
    with ctx.sessions() as session:
        nags = session.scalars(select(Outbox).where(Outbox.kind == "nag").order_by(Outbox.id)).all()
    # The night's missed nags collapse into one at 09:00 New York; then every 20 minutes again.
    assert [(n.created_at, n.payload["owner"]) for n in nags] == [
        (MONDAY + timedelta(days=1, hours=6), "nina"),
        (MONDAY + timedelta(days=1, hours=6, minutes=20), "nina"),
    ]
