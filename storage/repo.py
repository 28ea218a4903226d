"""Repository functions: module-level, session passed in, 2.0-style queries. Nothing here knows Slack."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Insert, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import (
    CLOSED,
    OPEN,
    PENDING,
    Account,
    AckOptOut,
    Base,
    Conversation,
    Event,
    Expert,
    Outbox,
    Post,
    SkippedItem,
)


class SkippedItemData(Protocol):
    """What a connector reports about a malformed item (``connectors.base.SkippedItem``)."""

    @property
    def field(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def raw(self) -> Any: ...
    @property
    def external_id(self) -> str | None: ...


def insert_ignoring_conflicts(session: Session, model: type[Base], index_elements: Sequence[str]) -> Insert:
    """An INSERT into `model`'s table that silently skips rows violating the given unique key."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model).on_conflict_do_nothing(index_elements=list(index_elements))
    return sqlite.insert(model).on_conflict_do_nothing(index_elements=list(index_elements))


def get_or_create_account(*, session: Session, name: str, kind: str) -> Account:
    """The account row for a configured account, created on first use."""
    account = session.scalars(select(Account).where(Account.name == name)).one_or_none()
    if account is None:
        session.execute(insert_ignoring_conflicts(session, Account, ["name"]).values(name=name, kind=kind))
        account = session.scalars(select(Account).where(Account.name == name)).one()
    return account


def existing_external_ids(*, session: Session, account_id: int, external_ids: Iterable[str]) -> set[str]:
    """Which of these external ids are already stored for the account."""
    ids = list(set(external_ids))
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        found.update(
            session.scalars(
                select(Post.external_id).where(Post.account_id == account_id, Post.external_id.in_(chunk))
            )
        )
    return found


def post_by_external_id(*, session: Session, account_id: int, external_id: str) -> Post | None:
    """A stored post by its platform id."""
    return session.scalars(
        select(Post).where(Post.account_id == account_id, Post.external_id == external_id)
    ).one_or_none()


def orphan_replies_to(*, session: Session, account_id: int, external_id: str) -> list[Post]:
    """Our own posts replying to `external_id` that belong to no conversation yet."""
    return list(
        session.scalars(
            select(Post).where(
                Post.account_id == account_id,
                Post.reply_to_external_id == external_id,
                Post.direction == "out",
                Post.conversation_id.is_(None),
            )
        )
    )


def conversation_for_thread(*, session: Session, account_id: int, thread_key: str) -> Conversation | None:
    """The latest conversation of a platform thread that is not closed."""
    return session.scalars(
        select(Conversation)
        .where(
            Conversation.account_id == account_id,
            Conversation.thread_key == thread_key,
            Conversation.status != CLOSED,
        )
        .order_by(Conversation.id.desc())
        .limit(1)
    ).first()


def recent_conversation_of_author(
    *, session: Session, account_id: int, author_id: str, since: datetime
) -> Conversation | None:
    """The author's latest conversation on this account with a customer post since `since`, not closed."""
    return session.scalars(
        select(Conversation)
        .where(
            Conversation.account_id == account_id,
            Conversation.author_id == author_id,
            Conversation.last_customer_post_at >= since,
            Conversation.status != CLOSED,
        )
        .order_by(Conversation.id.desc())
        .limit(1)
    ).first()


def author_acknowledged_since(*, session: Session, account_id: int, author_id: str, since: datetime) -> bool:
    """True when the author got an acknowledgement on this account since `since`."""
    return (
        session.scalar(
            select(Conversation.id)
            .where(
                Conversation.account_id == account_id,
                Conversation.author_id == author_id,
                Conversation.acknowledged_at >= since,
            )
            .limit(1)
        )
        is not None
    )


def has_opted_out(*, session: Session, account_id: int, author_id: str) -> bool:
    """True when the author asked for no automatic acknowledgements on this account."""
    return session.get(AckOptOut, (account_id, author_id)) is not None


def record_opt_out(*, session: Session, account_id: int, author_id: str, now: datetime) -> None:
    """Remember that the author wrote "stop"."""
    session.execute(
        insert_ignoring_conflicts(session, AckOptOut, ["account_id", "author_id"]).values(
            account_id=account_id, author_id=author_id, at=now
        )
    )


def away_experts(*, session: Session, now: datetime) -> frozenset[str]:
    """Experts who said (with /replyclock away) that they are away at `now`."""
    return frozenset(session.scalars(select(Expert.id).where(Expert.away_until > now)))


def open_loads(*, session: Session, team: str) -> dict[str, int]:
    """Open conversations owned, per expert of a team."""
    rows = session.execute(
        select(Conversation.owner, func.count())
        .where(Conversation.team == team, Conversation.status == OPEN, Conversation.owner.is_not(None))
        .group_by(Conversation.owner)
    )
    return {owner: count for owner, count in rows if owner is not None}


def last_assigned(*, session: Session, team: str) -> str | None:
    """The expert most recently given a conversation of this team (for round robin)."""
    return session.scalar(
        select(Conversation.owner)
        .where(Conversation.team == team, Conversation.owner.is_not(None))
        .order_by(Conversation.assigned_at.desc(), Conversation.id.desc())
        .limit(1)
    )


def enqueue(
    *,
    session: Session,
    kind: str,
    key: str,
    payload: dict[str, Any],
    now: datetime,
    conversation_id: int | None = None,
) -> bool:
    """Write an outbox row unless one with the same idempotency key exists; True if written."""
    statement = insert_ignoring_conflicts(session, Outbox, ["idempotency_key"]).values(
        kind=kind,
        conversation_id=conversation_id,
        payload=payload,
        idempotency_key=key,
        status=PENDING,
        attempts=0,
        created_at=now,
        next_attempt_at=now,
    )
    # RETURNING, not rowcount: with ON CONFLICT DO NOTHING some drivers report -1 either way.
    return session.scalar(statement.returning(Outbox.id)) is not None


def record_skipped(*, session: Session, account: str, items: Sequence[SkippedItemData], now: datetime) -> int:
    """Keep malformed items a connector left out (with the raw item) for staff; returns how many."""
    if not items:
        return 0
    account_row = session.scalars(select(Account).where(Account.name == account)).one()
    for item in items:
        session.add(
            SkippedItem(
                account_id=account_row.id,
                at=now,
                external_id=item.external_id[:200] if item.external_id else None,
                field=item.field[:200],
                reason=item.reason,
                raw={"item": item.raw},
            )
        )
    session.flush()
    return len(items)


def record_event(
    *,
    session: Session,
    at: datetime,
    actor: str,
    action: str,
    conversation_id: int | None = None,
    **detail: Any,
) -> None:
    """Append one row to the audit trail."""
    session.add(Event(conversation_id=conversation_id, at=at, actor=actor, action=action, detail=detail))


def events_of(*, session: Session, conversation_id: int) -> list[Event]:
    """A conversation's audit trail, oldest first."""
    return list(
        session.scalars(select(Event).where(Event.conversation_id == conversation_id).order_by(Event.id))
    )


def save_cursor(*, session: Session, account_id: int, cursor: str | None, now: datetime) -> None:
    """Store the connector cursor (in the same transaction as the posts it covers)."""
    session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(cursor=cursor, cursor_updated_at=now, last_poll_at=now, last_success_at=now, last_error=None)
    )


def outbox_counts(*, session: Session) -> dict[str, int]:
    """Outbox rows per status."""
    return {
        status: count
        for status, count in session.execute(select(Outbox.status, func.count()).group_by(Outbox.status))
    }
