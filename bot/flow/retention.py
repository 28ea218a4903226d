"""What replyclock keeps, and for how long: the retention job and ``replyclock forget``.

Retention (``[settings]``, defaults in bot.core.policy.Settings, run hourly by bot.jobs):

- ``retention_outbox`` (30 days): outbox rows sent that long ago are deleted (their text, a
  reply or an acknowledgement, went out long ago; the posts and events remain);
- ``retention_events`` (365 days): the events of conversations settled (answered or closed)
  that long ago are deleted;
- ``retention_text`` (180 days): the customer's words and names in conversations settled that
  long ago are blanked (posts' text, names, handles and URLs; the conversation's names);
  times, teams, owners and deadlines stay, so the figures (compliance, digests, exports) do not move.
- expired replay-guard keys (``seen_requests``) are deleted.

`forget_author` erases one customer (the GDPR right to erasure) at once, whatever their age.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import CursorResult, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from bot.flow.context import AppContext
from storage import repo
from storage.models import (
    ANSWERED,
    CLOSED,
    FAILED,
    PENDING,
    SENT,
    UNKNOWN,
    Account,
    AckOptOut,
    Conversation,
    Event,
    Outbox,
    Post,
)
from storage.seen import prune as prune_seen

BATCH = 10_000  # rows per delete statement: no transaction holds a big table for long
ERASED = ""  # what a customer's text becomes
CUSTOMER_KINDS = ("ack", "reply")  # outbox kinds that carry text to the customer


@dataclass
class Pruned:
    outbox: int = 0
    events: int = 0
    texts: int = 0
    seen: int = 0


def _count(result: object) -> int:
    return int(result.rowcount or 0) if isinstance(result, CursorResult) else 0


def _settled_before(cutoff: datetime) -> object:
    settled_at = func.coalesce(Conversation.closed_at, Conversation.answered_at)
    return select(Conversation.id).where(Conversation.status.in_((ANSWERED, CLOSED)), settled_at < cutoff)


def prune(ctx: AppContext, now: datetime) -> Pruned:
    """Apply the policy's retention once (each step its own short transactions)."""
    settings = ctx.policy.settings
    done = Pruned()
    if settings.retention_outbox is not None:
        cutoff = now - settings.retention_outbox
        while True:
            with ctx.sessions() as session, session.begin():
                ids = select(Outbox.id).where(Outbox.status == SENT, Outbox.sent_at < cutoff).limit(BATCH)
                removed = _count(session.execute(delete(Outbox).where(Outbox.id.in_(ids))))
            done.outbox += removed
            if removed < BATCH:
                break
    if settings.retention_events is not None:
        settled = _settled_before(now - settings.retention_events)
        with ctx.sessions() as session, session.begin():
            done.events = _count(
                session.execute(delete(Event).where(Event.conversation_id.in_(settled)))  # type: ignore[arg-type]
            )
    if settings.retention_text is not None:
        settled = _settled_before(now - settings.retention_text)
        with ctx.sessions() as session, session.begin():
            done.texts = _count(
                session.execute(
                    update(Post)
                    .where(Post.conversation_id.in_(settled), Post.text != ERASED)  # type: ignore[arg-type]
                    .values(text=ERASED, author_name=None, author_handle=None, url=None)
                    .execution_options(synchronize_session=False)
                )
            )
            session.execute(
                update(Conversation)
                .where(Conversation.id.in_(settled), Conversation.author_name.is_not(None))  # type: ignore[arg-type]
                .values(author_name=None, author_handle=None, version=Conversation.version + 1)
                .execution_options(synchronize_session=False)
            )
    done.seen = prune_seen(ctx.engine, now)
    return done


@dataclass
class Forgotten:
    posts: int = 0
    conversations: int = 0
    outbox: int = 0
    events: int = 0


def pseudonym(account: str, author_id: str) -> str:
    """What an erased author id becomes: not reversible, the same for the same person."""
    return "forgotten-" + hashlib.sha256(f"{account}\0{author_id}".encode()).hexdigest()[:16]


def forget_author(session: Session, account: str, author_id: str, now: datetime) -> Forgotten:
    """Erase one customer of `account`: their posts' text, their names and handles, our replies
    to them, the text queued for them, and their id (replaced by a `pseudonym`).

    Conversations stay (times, team, owner, deadline, outcome), so the figures do not change;
    their Slack cards are refreshed (a ``card_update``) to show the text is gone.
    """
    done = Forgotten()
    account_id = session.scalar(select(Account.id).where(Account.name == account))
    if account_id is None:
        return done
    alias = pseudonym(account, author_id)
    conversation_ids = list(
        session.scalars(
            select(Conversation.id).where(
                Conversation.account_id == account_id, Conversation.author_id == author_id
            )
        )
    )
    mine = Post.account_id == account_id
    theirs = and_(mine, Post.author_id == author_id)
    in_their_conversations = and_(mine, Post.conversation_id.in_(conversation_ids))
    done.posts = _count(
        session.execute(
            update(Post)
            .where(or_(theirs, in_their_conversations))
            .values(text=ERASED, author_name=None, author_handle=None, url=None)
            .execution_options(synchronize_session=False)
        )
    )
    session.execute(
        update(Post).where(theirs).values(author_id=alias).execution_options(synchronize_session=False)
    )
    done.conversations = _count(
        session.execute(
            update(Conversation)
            .where(Conversation.id.in_(conversation_ids))
            .values(author_id=alias, author_name=None, author_handle=None, version=Conversation.version + 1)
            .execution_options(synchronize_session=False)
        )
    )
    for row in session.scalars(select(Outbox).where(Outbox.conversation_id.in_(conversation_ids))):
        payload = dict(row.payload or {})
        if any(key in payload for key in ("text", "author", "handle")):
            for key in ("text", "author", "handle"):
                payload.pop(key, None)
            row.payload = payload
            done.outbox += 1
        if row.kind in CUSTOMER_KINDS and row.status in (PENDING, UNKNOWN):
            row.status, row.last_error = FAILED, "not sent: the customer was forgotten"
    for event in session.scalars(select(Event).where(Event.conversation_id.in_(conversation_ids))):
        detail = dict(event.detail or {})
        if "text" in detail:
            detail.pop("text")
            event.detail = detail
            done.events += 1
    session.execute(
        delete(AckOptOut).where(AckOptOut.account_id == account_id, AckOptOut.author_id == author_id)
    )
    for conversation_id in conversation_ids:
        repo.enqueue(
            session=session,
            kind="card_update",
            key=f"forget:{conversation_id}:{now.isoformat()}",
            payload={"conversation_id": conversation_id, "reason": "forgotten"},
            now=now,
            conversation_id=conversation_id,
        )
    repo.record_event(
        session=session, at=now, actor="system", action="author_forgotten", account=account, alias=alias
    )
    return done
