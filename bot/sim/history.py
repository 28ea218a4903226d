"""What the database remembers, as the simulator needs it: arrivals and answer records."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.sim.engine import Arrival
from bot.sim.model import AnswerRecord
from storage.models import Account, Conversation, Event, Post


def load_arrivals(session: Session, start: datetime, end: datetime) -> list[Arrival]:
    """One arrival per conversation opened in [start, end): its first customer post, as received.

    Follow-up posts in an open conversation are not arrivals (the simulator judges first responses,
    as the digest does). Conversations of ignored authors never exist, so they are not replayed.
    """
    first_post = (
        select(Post.conversation_id, func.min(Post.id).label("post_id"))
        .where(Post.direction == "in", Post.conversation_id.is_not(None))
        .group_by(Post.conversation_id)
        .subquery()
    )
    rows = session.execute(
        select(Conversation.id, Conversation.opened_at, Account.name, Post)
        .join(Account, Account.id == Conversation.account_id)
        .join(first_post, first_post.c.conversation_id == Conversation.id)
        .join(Post, Post.id == first_post.c.post_id)
        .where(Conversation.opened_at >= start, Conversation.opened_at < end)
        .order_by(Conversation.opened_at, Conversation.id)
    )
    return [
        Arrival(
            key=conversation_id,
            at=opened_at,
            account=account,
            author_id=post.author_id,
            text=post.text,
            author_handle=post.author_handle,
            language=post.language,
        )
        for conversation_id, opened_at, account, post in rows
    ]


def load_answer_records(
    session: Session, until: datetime, experts: set[str], *, since: datetime | None = None
) -> list[AnswerRecord]:
    """Every first response before `until` by a known expert: who, for which team, assigned when.

    The responder is the actor of the first "answered" event when that names an expert
    ("expert:ann" or "ann"), else the owner; the assignment is ``assigned_at``, else the opening.
    """
    first = (
        select(Event.conversation_id, func.min(Event.id).label("event_id"))
        .where(Event.action == "answered")
        .group_by(Event.conversation_id)
        .subquery()
    )
    responder = (
        select(Event.conversation_id, Event.actor).join(first, Event.id == first.c.event_id).subquery()
    )
    rows = session.execute(
        select(
            Conversation.team,
            Conversation.owner,
            Conversation.assigned_at,
            Conversation.opened_at,
            Conversation.first_response_at,
            responder.c.actor,
        )
        .outerjoin(responder, responder.c.conversation_id == Conversation.id)
        .where(
            Conversation.first_response_at.is_not(None),
            Conversation.first_response_at < until,
            Conversation.first_response_at >= (since or datetime.min.replace(tzinfo=until.tzinfo)),
        )
    )
    records = []
    for team, owner, assigned_at, opened_at, answered_at, actor in rows:
        who = None
        if actor:
            candidate = actor.split(":", 1)[1] if actor.startswith(("expert:", "slack:")) else actor
            who = candidate if candidate in experts else None
        who = who or (owner if owner in experts else None)
        if who is None:
            continue
        records.append(
            AnswerRecord(who, team, (assigned_at or opened_at).timestamp(), answered_at.timestamp())
        )
    return records
