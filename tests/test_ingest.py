"""Ingest on a real database: idempotent storage, conversations, routing, deadlines, outbox rows."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.ingest import IngestResult, ingest_batch
from connectors.base import InboundPost
from storage.models import Account, Conversation, Event, Outbox, Post
from tests.conftest import MONDAY

OWN = {"acme_support"}


def is_own(post: InboundPost) -> bool:
    return post.author_handle in OWN


def post(
    external_id: str,
    text: str = "hello, a question",
    *,
    author: str = "ana",
    at: datetime | None = None,
    reply_to: str | None = None,
    thread: str | None = None,
) -> InboundPost:
    return InboundPost(
        external_id=external_id,
        author_id=f"id-{author}",
        author_handle=author,
        author_name=author.title(),
        text=text,
        posted_at=at or MONDAY,
        reply_to_id=reply_to,
        thread_id=thread,
    )


def ingest(
    ctx: AppContext, *posts: InboundPost, account: str = "social", cursor: str | None = None
) -> IngestResult:
    with ctx.sessions() as session, session.begin():
        return ingest_batch(session, ctx, account=account, posts=posts, is_own=is_own, cursor=cursor)


def count(ctx: AppContext, model: type) -> int:
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def outbox_kinds(ctx: AppContext) -> list[str]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Outbox.kind).order_by(Outbox.id)))


def only_conversation(ctx: AppContext) -> Conversation:
    with ctx.sessions() as session:
        return session.scalars(select(Conversation)).one()


def test_a_post_opens_a_routed_conversation_with_deadline_card_and_ack(ctx: AppContext) -> None:
    result = ingest(ctx, post("1", "I was charged twice on my invoice"), cursor="c1")
    assert result.stored == 1 and len(result.opened) == 1 and result.acknowledgements == 1
    conversation = only_conversation(ctx)
    assert conversation.team == "billing" and conversation.policy == "billing"
    assert conversation.owner == "maria"  # topic "invoices" on duty in Berlin at 09:00
    # 8 business hours from Monday 09:00 Berlin = Monday 17:00 Berlin = 16:00 UTC.
    assert conversation.due_at == MONDAY + timedelta(hours=8)
    assert conversation.next_action_at == MONDAY + timedelta(hours=2)  # claim_within 2h comes before 50 %
    assert outbox_kinds(ctx) == ["card", "ack"]
    with ctx.sessions() as session:
        ack = session.scalars(select(Outbox).where(Outbox.kind == "ack")).one()
        assert (
            ack.payload["text"]
            == "Thanks @ana! Maria from our Billing team will get back to you by Monday 17:00 Central European Standard Time."
        )
        assert session.scalars(select(Account.cursor)).one() == "c1"
        assert [e.action for e in session.scalars(select(Event))] == ["opened", "ack_queued"]


def test_duplicates_are_stored_once(ctx: AppContext) -> None:
    first = ingest(ctx, post("1"), post("1"), post("2", author="ben"))
    again = ingest(ctx, post("2", author="ben"), post("1"))
    assert (first.stored, first.duplicates) == (2, 1)
    assert (again.stored, again.duplicates) == (0, 2)
    assert count(ctx, Post) == 2 and count(ctx, Conversation) == 2
    assert outbox_kinds(ctx).count("card") == 2


def test_same_thread_and_same_author_continue_beyond_the_gap_opens_anew(
    ctx: AppContext, clock: FakeClock
) -> None:
    ingest(ctx, post("1", thread="t1"))
    ingest(ctx, post("2", author="ben", at=MONDAY + timedelta(minutes=5), thread="t1"))  # same thread
    ingest(ctx, post("3", at=MONDAY + timedelta(hours=1), thread="other"))  # same author within 12 h
    assert count(ctx, Conversation) == 1
    ingest(ctx, post("4", author="carol", at=MONDAY + timedelta(hours=1)))
    assert count(ctx, Conversation) == 2
    clock.advance(timedelta(hours=14))
    ingest(ctx, post("5", at=MONDAY + timedelta(hours=14)))  # 13 h after ana's last post: a new one
    assert count(ctx, Conversation) == 3


def test_own_reply_answers_and_a_new_customer_post_reopens(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund please"))
    clock.advance(timedelta(hours=1))
    answered = ingest(
        ctx,
        InboundPost(
            "2",
            "own",
            "@ana done!",
            MONDAY + timedelta(minutes=50),
            author_handle="acme_support",
            reply_to_id="1",
        ),
    )
    assert len(answered.answered) == 1
    conversation = only_conversation(ctx)
    assert conversation.status == "answered"
    assert conversation.first_response_at == MONDAY + timedelta(minutes=50)
    assert conversation.next_action_at is None
    clock.advance(timedelta(hours=1))
    reopened = ingest(ctx, post("3", "and the invoice?", at=MONDAY + timedelta(hours=2), reply_to="2"))
    assert len(reopened.reopened) == 1
    conversation = only_conversation(ctx)
    assert conversation.status == "open" and conversation.cycle == 1
    assert conversation.first_response_at == MONDAY + timedelta(minutes=50)  # unchanged
    assert conversation.due_at == MONDAY + timedelta(hours=6)  # next_response 4 business hours
    assert outbox_kinds(ctx) == ["card", "ack", "card_update", "card_update"]


def test_ignored_authors_are_stored_without_a_conversation(ctx: AppContext) -> None:
    result = ingest(ctx, post("1", "cheap followers", author="spambot"))
    assert result.ignored == 1 and count(ctx, Post) == 1 and count(ctx, Conversation) == 0
    assert outbox_kinds(ctx) == []


def test_vip_is_urgent_and_urgent_policy_applies(ctx: AppContext) -> None:
    ingest(ctx, post("1", "hello", author="bigcustomer"))
    conversation = only_conversation(ctx)
    assert (conversation.priority, conversation.policy) == ("urgent", "urgent")
    assert conversation.due_at == MONDAY + timedelta(hours=1)


def test_weekend_posts_get_the_weekend_target(ctx: AppContext, clock: FakeClock) -> None:
    saturday = MONDAY - timedelta(days=2)
    clock.set(saturday)
    ingest(ctx, post("1", "a general question", at=saturday))
    conversation = only_conversation(ctx)
    assert conversation.policy == "classic"
    assert conversation.due_at == saturday + timedelta(hours=48)


def test_acknowledgement_safeguards(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "question one", thread="a"), account="blog")  # blog cannot reply
    assert "ack" not in outbox_kinds(ctx)
    ingest(ctx, post("2", "question two", thread="b"))
    clock.advance(timedelta(hours=13))
    ingest(ctx, post("3", "question three", at=MONDAY + timedelta(hours=13), thread="c"))  # new conversation
    assert outbox_kinds(ctx).count("ack") == 1  # one per author per 24 h
    assert count(ctx, Conversation) == 3


def test_a_failed_batch_leaves_nothing_behind(ctx: AppContext) -> None:
    with pytest.raises(RuntimeError), ctx.sessions() as session, session.begin():
        ingest_batch(session, ctx, account="social", posts=[post("1")], is_own=is_own, cursor="c9")
        raise RuntimeError("crash before commit")
    assert count(ctx, Post) == 0 and count(ctx, Conversation) == 0 and count(ctx, Outbox) == 0
    with ctx.sessions() as session:
        assert session.scalar(select(Account.cursor)) is None


def test_stop_opts_out_of_acknowledgements(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "@acme_support STOP!", thread="a"))
    assert "ack" not in outbox_kinds(ctx)
    clock.advance(timedelta(days=3))
    ingest(ctx, post("2", "my invoice is wrong", at=clock.now(), thread="b"))
    assert "ack" not in outbox_kinds(ctx) and count(ctx, Conversation) == 2
    ingest(ctx, post("3", "stop the charges on my card please", author="ben", at=clock.now()))
    assert outbox_kinds(ctx).count("ack") == 1  # "stop" inside a sentence is a question, not an opt-out


def test_no_acknowledgement_for_a_reply_to_our_own_post(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund please"))
    ingest(ctx, InboundPost("2", "own", "@ana done", MONDAY, author_handle="acme_support", reply_to_id="1"))
    with ctx.sessions() as session, session.begin():
        session.scalars(select(Conversation)).one().status = "closed"
    clock.advance(timedelta(days=2))
    ingest(ctx, post("3", "thanks, one more thing", at=clock.now(), reply_to="2"))
    assert count(ctx, Conversation) == 2
    assert outbox_kinds(ctx).count("ack") == 1  # only the first conversation's


def test_our_reply_stored_before_the_question_still_answers_it(ctx: AppContext, clock: FakeClock) -> None:
    # Platforms page newest first: the answer can arrive in an earlier batch than the question.
    clock.advance(timedelta(hours=1))
    ingest(
        ctx,
        InboundPost(
            "2",
            "own",
            "@ana done",
            MONDAY + timedelta(minutes=30),
            author_handle="acme_support",
            reply_to_id="1",
        ),
    )
    result = ingest(ctx, post("1", "refund please"))
    assert len(result.opened) == 1 and result.answered == result.opened
    conversation = only_conversation(ctx)
    assert conversation.status == "answered"
    assert conversation.first_response_at == MONDAY + timedelta(minutes=30)
    assert "ack" not in outbox_kinds(ctx)


def test_an_expert_who_said_they_are_away_gets_nothing_new(ctx: AppContext) -> None:
    from storage.models import Expert

    with ctx.sessions() as session, session.begin():
        session.add(
            Expert(
                id="maria", name="Maria Keller", slack_id="U0MARIA01", away_until=MONDAY + timedelta(days=3)
            )
        )
    ingest(ctx, post("1", "refund for my invoice please"))
    assert only_conversation(ctx).owner == "lee"  # maria has the topic, but is away
