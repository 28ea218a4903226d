"""Staff actions on a real database (SQLite file and PostgreSQL): claim races, replies, snooze,
close, away and back, queues and figures, and who may do any of it."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.core.clock import FakeClock
from bot.core.policy import Account as AccountSpec
from bot.flow import staff
from bot.flow.context import AppContext
from bot.flow.ingest import IngestResult, ingest_batch
from bot.flow.sweep import sweep
from connectors.base import InboundPost
from storage.models import Conversation, Event, Outbox
from storage.models import Expert as ExpertRow
from tests.conftest import MONDAY

BILLING_TEXT = "I was charged twice on my invoice"


def post(external_id: str, text: str, *, author: str = "ana", at: datetime | None = None) -> InboundPost:
    return InboundPost(
        external_id=external_id,
        author_id=f"id-{author}",
        author_handle=author,
        author_name=author.title(),
        text=text,
        posted_at=at or MONDAY,
    )


def ingest(ctx: AppContext, *posts: InboundPost, account: str = "social") -> IngestResult:
    with ctx.sessions() as session, session.begin():
        return ingest_batch(session, ctx, account=account, posts=posts, is_own=lambda _post: False)


def open_conversation(
    ctx: AppContext, external_id: str = "1", text: str = BILLING_TEXT, **kwargs: Any
) -> int:
    """Ingest one customer post and return its conversation's id."""
    result = ingest(ctx, post(external_id, text, **kwargs))
    assert len(result.opened) == 1
    return result.opened[0]


def act(ctx: AppContext, action: Callable[[Session], Any]) -> Any:
    """Run a staff action in its own transaction, as a Slack request does."""
    with ctx.sessions() as session, session.begin():
        return action(session)


def conversation(ctx: AppContext, conversation_id: int) -> Conversation:
    with ctx.sessions() as session:
        found = session.get(Conversation, conversation_id)
        assert found is not None
        return found


def outbox(ctx: AppContext, kind: str | None = None) -> list[Outbox]:
    with ctx.sessions() as session:
        query = select(Outbox).order_by(Outbox.id)
        if kind is not None:
            query = query.where(Outbox.kind == kind)
        return list(session.scalars(query))


def events(ctx: AppContext, conversation_id: int | None = None) -> list[tuple[str, str]]:
    with ctx.sessions() as session:
        query = select(Event).order_by(Event.id)
        if conversation_id is not None:
            query = query.where(Event.conversation_id == conversation_id)
        return [(event.actor, event.action) for event in session.scalars(query)]


def snapshot(ctx: AppContext) -> tuple[Any, ...]:
    """Everything a refused action must leave as it was."""
    with ctx.sessions() as session:
        rows = [
            (c.id, c.status, c.owner, c.claimed_by, c.next_action_at, c.version, c.close_reason)
            for c in session.scalars(select(Conversation).order_by(Conversation.id))
        ]
        return (
            rows,
            session.scalar(select(func.count()).select_from(Outbox)),
            session.scalar(select(func.count()).select_from(Event)),
            session.scalar(select(func.count()).select_from(ExpertRow)),
        )


@pytest.fixture
def social_x(ctx: AppContext) -> AppContext:
    """The test policy with an X account ("xsocial") and a Mastodon account ("toot") added."""
    accounts = {
        **ctx.policy.accounts,
        "xsocial": AccountSpec(name="xsocial", kind="x"),
        "toot": AccountSpec(name="toot", kind="mastodon"),
    }
    ctx.policy = dataclasses.replace(ctx.policy, accounts=accounts)
    return ctx


# --------------------------------------------------------------------------------------------
# Claiming


def test_eight_simultaneous_claims_have_exactly_one_winner(ctx: AppContext, clock: FakeClock) -> None:
    # Experts of both teams race: let them all act across teams (issue 11 keeps teams apart by default).
    ctx.policy = dataclasses.replace(
        ctx.policy, settings=dataclasses.replace(ctx.policy.settings, cross_team_actions=True)
    )
    conversation_id = open_conversation(ctx)
    experts = ["maria", "lee", "sam", "nina"] * 2
    barrier = threading.Barrier(len(experts))
    results: list[staff.ClaimResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def click(expert_id: str) -> None:
        try:
            barrier.wait(timeout=10)
            with ctx.sessions() as session, session.begin():
                result = staff.claim(session, ctx, conversation_id, expert_id, clock.now())
            with lock:
                results.append(result)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=click, args=(expert,)) for expert in experts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    winners = [result for result in results if result.won]
    assert len(results) == 8 and len(winners) == 1
    winner = winners[0].claimed_by
    assert all(result.claimed_by == winner and result.claimed_at == MONDAY for result in results)
    stored = conversation(ctx, conversation_id)
    assert stored.claimed_by == winner and stored.owner == winner and stored.claimed_at == MONDAY
    assert events(ctx, conversation_id).count((str(winner), "claimed")) == 1
    assert [row.payload["reason"] for row in outbox(ctx, "card_update")] == ["claimed"]


def test_claim_takes_ownership_and_a_late_click_hears_who_has_it(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = open_conversation(ctx)
    assert conversation(ctx, conversation_id).owner == "maria"
    first = act(ctx, lambda s: staff.claim(s, ctx, conversation_id, "lee", clock.now()))
    clock.advance(timedelta(minutes=3))
    before = snapshot(ctx)
    second = act(ctx, lambda s: staff.claim(s, ctx, conversation_id, "maria", clock.now()))
    assert first == staff.ClaimResult(True, conversation_id, "lee", MONDAY, "open")
    assert second == staff.ClaimResult(False, conversation_id, "lee", MONDAY, "open")
    assert snapshot(ctx) == before  # the loser changed nothing


def test_an_answered_or_closed_conversation_cannot_be_claimed(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = open_conversation(ctx)
    act(ctx, lambda s: staff.close(s, ctx, conversation_id, "maria", "spam", clock.now()))
    result = act(ctx, lambda s: staff.claim(s, ctx, conversation_id, "lee", clock.now()))
    assert (result.won, result.claimed_by, result.status) == (False, None, "closed")
    with pytest.raises(staff.NotFound):
        act(ctx, lambda s: staff.claim(s, ctx, 9999, "lee", clock.now()))


def test_unclaim_restarts_the_offer_and_reassign_hands_it_over(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = open_conversation(ctx)
    act(ctx, lambda s: staff.claim(s, ctx, conversation_id, "maria", clock.now()))
    with pytest.raises(staff.InvalidState, match="claimed by Maria Keller"):
        act(ctx, lambda s: staff.unclaim(s, ctx, conversation_id, "lee", clock.now()))
    clock.advance(timedelta(minutes=30))
    act(ctx, lambda s: staff.unclaim(s, ctx, conversation_id, "maria", clock.now()))
    stored = conversation(ctx, conversation_id)
    assert (stored.claimed_by, stored.owner) == (None, "maria")
    # billing's claim_within is 2 h: unclaiming starts a new offer, so at 10:00 (the first
    # offer's end) the sweep reassigns nothing and looks again when the new one runs out.
    assert stored.assigned_at == MONDAY + timedelta(minutes=30)
    clock.set(MONDAY + timedelta(hours=2))
    sweep(ctx)
    stored = conversation(ctx, conversation_id)
    assert stored.owner == "maria" and "reassign" not in [row.kind for row in outbox(ctx)]
    assert stored.next_action_at == MONDAY + timedelta(hours=2, minutes=30)

    act(ctx, lambda s: staff.reassign(s, ctx, conversation_id, "maria", "lee", clock.now()))
    stored = conversation(ctx, conversation_id)
    assert (stored.owner, stored.claimed_by, stored.assigned_at) == ("lee", None, clock.now())
    with pytest.raises(staff.InvalidState, match="already"):
        act(ctx, lambda s: staff.reassign(s, ctx, conversation_id, "maria", "lee", clock.now()))
    with pytest.raises(staff.InvalidState, match="not a replyclock expert"):
        act(ctx, lambda s: staff.reassign(s, ctx, conversation_id, "maria", "mallory", clock.now()))
    assert [a for _, a in events(ctx, conversation_id)][-3:] == ["claimed", "unclaimed", "reassigned"]
    updates = outbox(ctx, "card_update")
    assert [row.payload["reason"] for row in updates] == ["claimed", "unclaimed", "reassigned"]
    assert updates[-1].payload["previous_owner"] == "maria" and updates[-1].payload["owner"] == "lee"
    assert len({row.idempotency_key for row in updates}) == 3


# --------------------------------------------------------------------------------------------
# Replying


def test_reply_limits_live_in_one_table() -> None:
    assert staff.REPLY_LIMITS == {"x": 280, "mastodon": 500}
    assert (staff.reply_limit("x"), staff.reply_limit("mastodon"), staff.reply_limit("webhook")) == (
        280,
        500,
        5000,
    )


def test_a_reply_too_long_for_x_is_refused_and_nothing_is_written(
    social_x: AppContext, clock: FakeClock
) -> None:
    ctx = social_x
    result = ingest(ctx, post("1", BILLING_TEXT), account="xsocial")
    conversation_id = result.opened[0]
    before = snapshot(ctx)
    with pytest.raises(staff.ReplyRejected, match="281 characters, the limit is 280") as refused:
        act(ctx, lambda s: staff.reply(s, ctx, conversation_id, "maria", "x" * 281, clock.now()))
    assert (refused.value.limit, refused.value.length) == (280, 281)
    assert snapshot(ctx) == before
    act(ctx, lambda s: staff.reply(s, ctx, conversation_id, "maria", "x" * 280, clock.now()))
    assert len(outbox(ctx, "reply")) == 1


def test_mastodon_counts_the_mention_the_connector_adds(social_x: AppContext, clock: FakeClock) -> None:
    ctx = social_x
    conversation_id = ingest(ctx, post("1", BILLING_TEXT), account="toot").opened[0]
    with pytest.raises(staff.ReplyRejected, match="505 characters"):  # "@ana " comes in front
        act(ctx, lambda s: staff.reply(s, ctx, conversation_id, "maria", "y" * 500, clock.now()))
    act(ctx, lambda s: staff.reply(s, ctx, conversation_id, "maria", "@ana " + "y" * 495, clock.now()))


def test_empty_replies_and_channels_without_replies_are_refused(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = open_conversation(ctx)
    blog_id = ingest(ctx, post("b1", BILLING_TEXT, author="bea"), account="blog").opened[0]
    before = snapshot(ctx)
    with pytest.raises(staff.ReplyRejected, match="Write something"):
        act(ctx, lambda s: staff.reply(s, ctx, conversation_id, "maria", "   \n", clock.now()))
    with pytest.raises(staff.ReplyRejected, match="cannot reply on blog"):
        act(ctx, lambda s: staff.reply(s, ctx, blog_id, "maria", "thanks", clock.now()))
    assert snapshot(ctx) == before


def test_reply_queues_one_message_and_marks_answered_in_one_transaction(
    ctx: AppContext, clock: FakeClock
) -> None:
    conversation_id = open_conversation(ctx)
    clock.advance(timedelta(minutes=42))
    result = act(
        ctx, lambda s: staff.reply(s, ctx, conversation_id, "lee", "  Refund is on its way.  ", clock.now())
    )
    replies = outbox(ctx, "reply")
    assert len(replies) == 1
    row = replies[0]
    assert row.idempotency_key == f"conv:{conversation_id}:reply:1" == result.outbox_key
    assert row.payload == {
        "conversation_id": conversation_id,
        "post_id": result.post_id,
        "account": "social",
        "text": "Refund is on its way.",
    }
    stored = conversation(ctx, conversation_id)
    assert (stored.status, stored.answered_by, stored.first_response_at) == ("answered", "lee", clock.now())
    assert stored.next_action_at is None and result.answered
    assert events(ctx, conversation_id)[-2:] == [("lee", "reply_queued"), ("lee", "answered")]
    assert outbox(ctx, "card_update")[-1].payload["reason"] == "answered"

    # A follow-up reply is a second message, not a second answer.
    again = act(ctx, lambda s: staff.reply(s, ctx, conversation_id, "lee", "PS: 3-5 days.", clock.now()))
    assert again.outbox_key == f"conv:{conversation_id}:reply:2" and not again.answered
    assert len(outbox(ctx, "reply")) == 2
    assert [a for _, a in events(ctx, conversation_id)].count("answered") == 1


def test_a_failure_after_the_reply_leaves_neither_message_nor_answer(
    ctx: AppContext, clock: FakeClock
) -> None:
    conversation_id = open_conversation(ctx)
    before = snapshot(ctx)
    with pytest.raises(RuntimeError), ctx.sessions() as session, session.begin():
        staff.reply(session, ctx, conversation_id, "maria", "On it!", clock.now())
        raise RuntimeError("the request failed after the reply was written")
    assert snapshot(ctx) == before


def test_a_closed_conversation_takes_no_reply(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = open_conversation(ctx)
    act(ctx, lambda s: staff.close(s, ctx, conversation_id, "maria", "duplicate", clock.now()))
    with pytest.raises(staff.InvalidState, match="closed"):
        act(ctx, lambda s: staff.reply(s, ctx, conversation_id, "maria", "hi", clock.now()))


# --------------------------------------------------------------------------------------------
# Snooze, answered elsewhere, close


def test_snooze_moves_the_next_action_but_not_the_deadline(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = open_conversation(ctx)
    act(ctx, lambda s: staff.claim(s, ctx, conversation_id, "maria", clock.now()))
    due_at = conversation(ctx, conversation_id).due_at
    until = staff.snooze_until(ctx, "maria", "4h", clock.now())
    assert until == MONDAY + timedelta(hours=4)
    act(ctx, lambda s: staff.snooze(s, ctx, conversation_id, "maria", until, clock.now()))
    stored = conversation(ctx, conversation_id)
    assert (stored.next_action_at, stored.due_at) == (until, due_at)
    assert events(ctx, conversation_id)[-1] == ("maria", "snoozed")
    assert outbox(ctx, "card_update")[-1].payload == {
        "conversation_id": conversation_id,
        "reason": "snoozed",
        "until": until.isoformat(),
    }
    # The 50 % warning (13:00 Berlin) would be due at 4 h; at 3 h the sweep leaves it alone...
    clock.advance(timedelta(hours=3, minutes=59))
    assert sweep(ctx).processed == 0
    # ...and when the snooze ends the ladder resumes.
    clock.advance(timedelta(minutes=1))
    assert sweep(ctx).processed == 1
    assert [row.kind for row in outbox(ctx)][-1] == "warning"
    with pytest.raises(staff.InvalidState, match="future"):
        act(ctx, lambda s: staff.snooze(s, ctx, conversation_id, "maria", clock.now(), clock.now()))


def test_snooze_until_tomorrow_is_the_experts_next_working_morning(ctx: AppContext) -> None:
    friday_evening = datetime(2026, 11, 27, 19, 0, tzinfo=UTC)
    # Maria works mon-fri 08:00-18:00 Berlin: "tomorrow" from Friday evening is Monday 08:00.
    assert staff.snooze_until(ctx, "maria", "tomorrow", friday_evening) == datetime(
        2026, 11, 30, 7, 0, tzinfo=UTC
    )
    with pytest.raises(staff.InvalidState):
        staff.snooze_until(ctx, "maria", "soon", friday_evening)


def test_mark_answered_stamps_the_response_now(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = open_conversation(ctx)
    clock.advance(timedelta(minutes=10))
    act(ctx, lambda s: staff.mark_answered(s, ctx, conversation_id, "maria", clock.now()))
    stored = conversation(ctx, conversation_id)
    assert (stored.status, stored.first_response_at, stored.answered_by) == ("answered", clock.now(), "maria")
    assert stored.next_action_at is None
    with pytest.raises(staff.InvalidState, match="already answered"):
        act(ctx, lambda s: staff.mark_answered(s, ctx, conversation_id, "maria", clock.now()))
    assert outbox(ctx, "reply") == []


def test_close_stops_everything_and_leaves_the_compliance_figures(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = open_conversation(ctx)
    act(ctx, lambda s: staff.close(s, ctx, conversation_id, "lee", "spam", clock.now()))
    stored = conversation(ctx, conversation_id)
    assert (stored.status, stored.close_reason, stored.next_action_at, stored.closed_at) == (
        "closed",
        "spam",
        None,
        MONDAY,
    )
    assert events(ctx, conversation_id)[-1] == ("lee", "closed")
    assert outbox(ctx, "card_update")[-1].payload["reason"] == "closed"
    with ctx.sessions() as session:
        stats = staff.team_stats(session, ctx, "billing", clock.now())
    assert (stats.open, stats.answered_this_week, stats.closed_this_week, stats.within_sla_share) == (
        0,
        0,
        1,
        None,
    )
    with pytest.raises(staff.InvalidState, match="already closed"):
        act(ctx, lambda s: staff.close(s, ctx, conversation_id, "lee", "spam", clock.now()))
    with pytest.raises(staff.InvalidState, match="why"):
        act(
            ctx,
            lambda s: staff.close(s, ctx, open_conversation(ctx, "2", author="bo"), "lee", " ", clock.now()),
        )


# --------------------------------------------------------------------------------------------
# Away and back


def test_away_through_a_local_date_then_back(ctx: AppContext, clock: FakeClock) -> None:
    back_at = act(ctx, lambda s: staff.set_away(s, ctx, "nina", date(2026, 11, 25), clock.now()))
    # Nina is in New York: away through Wednesday there, back at Thursday 00:00 EST = 05:00 UTC.
    assert back_at == datetime(2026, 11, 26, 5, 0, tzinfo=UTC)
    with ctx.sessions() as session:
        assert staff.away_experts(session, clock.now()) == {"nina"}
        assert staff.away_until(session, "nina", clock.now()) == back_at
        assert staff.away_experts(session, back_at) == frozenset()
        row = session.get(ExpertRow, "nina")
        assert row is not None and (row.name, row.slack_id) == ("Nina Park", "U0NINA001")
    assert act(ctx, lambda s: staff.back(s, ctx, "nina", clock.now())) is True
    assert act(ctx, lambda s: staff.back(s, ctx, "nina", clock.now())) is False
    with ctx.sessions() as session:
        assert staff.away_experts(session, clock.now()) == frozenset()
    assert events(ctx) == [("nina", "away"), ("nina", "back"), ("nina", "back")]
    with pytest.raises(staff.InvalidState, match="in the past"):
        act(ctx, lambda s: staff.set_away(s, ctx, "nina", date(2026, 11, 1), clock.now()))


# --------------------------------------------------------------------------------------------
# Queues and figures


def test_queues_are_sorted_by_deadline_and_stats_count_this_week(ctx: AppContext, clock: FakeClock) -> None:
    urgent = open_conversation(ctx, "1", "the site is down", author="ann")  # care, urgent: due in 1 h
    general = open_conversation(ctx, "2", "a general question", author="bob")  # care, classic: 24 h
    billing = open_conversation(ctx, "3", BILLING_TEXT, author="cy")  # billing: 8 business hours
    late = open_conversation(ctx, "4", "is anybody there? outage!", author="dee")  # care, urgent
    with ctx.sessions() as session:
        sam_queue = staff.my_queue(session, "sam")
        care = staff.team_queue(session, "care")
    assert [item.conversation_id for item in care] == [urgent, late, general]
    assert [item.conversation_id for item in sam_queue] == [urgent, late, general]
    assert care[0].text == "the site is down" and care[0].author == "ann"

    clock.advance(timedelta(minutes=30))
    act(ctx, lambda s: staff.reply(s, ctx, urgent, "sam", "Back up now, sorry!", clock.now()))
    act(ctx, lambda s: staff.claim(s, ctx, billing, "lee", clock.now()))
    clock.advance(timedelta(hours=1))  # "late" is now overdue
    act(ctx, lambda s: staff.close(s, ctx, general, "sam", "no_reply_needed", clock.now()))
    act(ctx, lambda s: staff.mark_answered(s, ctx, late, "nina", clock.now()))  # answered, but late
    with ctx.sessions() as session:
        assert [item.conversation_id for item in staff.my_queue(session, "lee")] == [billing]
        assert staff.my_queue(session, "maria") == []  # lee claimed it from her
        care_stats = staff.team_stats(session, ctx, "care", clock.now())
        billing_stats = staff.team_stats(session, ctx, "billing", clock.now())
    assert care_stats.week_start == datetime(2026, 11, 22, 23, 0, tzinfo=UTC)  # Monday 00:00 Berlin
    assert (care_stats.open, care_stats.overdue) == (0, 0)
    assert (care_stats.answered_this_week, care_stats.answered_within_sla) == (2, 1)
    assert care_stats.within_sla_share == 0.5 and care_stats.closed_this_week == 1
    assert (billing_stats.open, billing_stats.overdue, billing_stats.answered_this_week) == (1, 0, 0)
    clock.advance(timedelta(hours=8))
    with ctx.sessions() as session:
        assert staff.team_stats(session, ctx, "billing", clock.now()).overdue == 1
        assert staff.team_queue(session, "billing")[0].overdue(clock.now())


# --------------------------------------------------------------------------------------------
# Permissions


def test_staff_are_the_teams_experts_by_slack_id(ctx: AppContext) -> None:
    assert staff.staff_experts(ctx.policy) == {"maria", "lee", "sam", "nina"}
    assert staff.is_staff(ctx.policy, "U0MARIA01") and not staff.is_staff(ctx.policy, "U0STRANGER")
    assert staff.require_staff(ctx.policy, "U0LEE0001") == "lee"
    with pytest.raises(staff.PermissionDenied):
        staff.require_staff(ctx.policy, "U0STRANGER")
    assert staff.teams_of(ctx.policy, "lee") == ("care", "billing")  # manager of care, expert in billing


@pytest.mark.parametrize(
    "action",
    [
        lambda s, ctx, cid, now: staff.claim(s, ctx, cid, "mallory", now),
        lambda s, ctx, cid, now: staff.unclaim(s, ctx, cid, "mallory", now),
        lambda s, ctx, cid, now: staff.reassign(s, ctx, cid, "mallory", "lee", now),
        lambda s, ctx, cid, now: staff.snooze(s, ctx, cid, "mallory", now + timedelta(hours=1), now),
        lambda s, ctx, cid, now: staff.mark_answered(s, ctx, cid, "mallory", now),
        lambda s, ctx, cid, now: staff.close(s, ctx, cid, "mallory", "spam", now),
        lambda s, ctx, cid, now: staff.reply(s, ctx, cid, "mallory", "hello", now),
        lambda s, ctx, cid, now: staff.set_away(s, ctx, "mallory", date(2026, 12, 1), now),
        lambda s, ctx, cid, now: staff.back(s, ctx, "mallory", now),
    ],
    ids=["claim", "unclaim", "reassign", "snooze", "answered", "close", "reply", "away", "back"],
)
def test_non_staff_are_refused_and_nothing_changes(
    ctx: AppContext, clock: FakeClock, action: Callable[[Session, AppContext, int, datetime], Any]
) -> None:
    conversation_id = open_conversation(ctx)
    before = snapshot(ctx)
    with pytest.raises(staff.PermissionDenied):
        act(ctx, lambda s: action(s, ctx, conversation_id, clock.now()))
    assert snapshot(ctx) == before
