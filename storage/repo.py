"""Repository functions: module-level, session passed in, 2.0-style queries. Nothing here knows Slack."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Insert, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from storage.models import (
    CLOSED,
    DEFAULT_URGENCY,
    HOLDS_NOTHING_BACK,
    LADDER_KINDS,
    LANE_FREE_KINDS,
    OPEN,
    PENDING,
    RETIRED,
    URGENCY,
    Account,
    AckOptOut,
    Base,
    Conversation,
    Event,
    Expert,
    Lease,
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
        urgency=URGENCY.get(kind, DEFAULT_URGENCY),
        attempts=0,
        created_at=now,
        next_attempt_at=now,
    )
    # RETURNING, not rowcount: with ON CONFLICT DO NOTHING some drivers report -1 either way.
    written = session.scalar(statement.returning(Outbox.id)) is not None
    if written and kind in SUPERSEDED_KINDS and conversation_id is not None:
        supersede_older(session=session, kind=kind, conversation_ids=[conversation_id])
    if (
        written
        and conversation_id is not None
        and kind not in LANE_FREE_KINDS
        and URGENCY.get(kind, DEFAULT_URGENCY) < DEFAULT_URGENCY
    ):
        # An urgent message waits for the earlier unsent ones of its conversation (its lane): they
        # inherit its urgency, so that it is not held back behind them. Ladder notices keep no
        # place in the lane (LANE_FREE_KINDS): they wait for nothing, lend and borrow nothing.
        customer = kind in CUSTOMER_LANE
        session.execute(
            update(Outbox)
            .where(
                Outbox.conversation_id == conversation_id,
                Outbox.status == PENDING,
                Outbox.urgency > URGENCY.get(kind, DEFAULT_URGENCY),
                Outbox.kind.in_(CUSTOMER_LANE)
                if customer
                else Outbox.kind.not_in((*CUSTOMER_LANE, *HOLDS_NOTHING_BACK)),
            )
            .values(urgency=URGENCY.get(kind, DEFAULT_URGENCY))
            .execution_options(synchronize_session=False)
        )
    return written


CUSTOMER_LANE = ("ack", "reply")  # as bot.flow.outbox.CUSTOMER_KINDS: the customer's lane


def retire_ladder(
    *,
    session: Session,
    conversation_ids: Sequence[int],
    reason: str,
    now: datetime,
    kinds: Collection[str] = LADDER_KINDS,
) -> list[tuple[int, str, int]]:
    """Retire the unsent ladder rows (`kinds`: warning, breach, nag, escalation, reassign; on a
    close also the resolution notices, storage.models.RESOLUTION_KINDS) of conversations
    that were just answered or closed, in the caller's transaction; audit what was retired.

    Only `pending` rows are touched: a row being sent (`sending`) is settled by its sender. On
    PostgreSQL a row a sender is claiming right now is locked; this waits for that short claim
    and then no longer matches.

    Returns:
        (conversation id, kind, index) of each retired row.
    """
    if not conversation_ids:
        return []
    retired = session.execute(
        update(Outbox)
        .where(
            Outbox.conversation_id.in_(list(conversation_ids)),
            Outbox.status == PENDING,
            Outbox.kind.in_(sorted(kinds)),
        )
        .values(status=RETIRED, result=f"retired: {reason}"[:2000], lease_until=None)
        .returning(Outbox.conversation_id, Outbox.kind, Outbox.payload)
        .execution_options(synchronize_session=False)
    ).all()
    found: list[tuple[int, str, int]] = []
    by_conversation: dict[int, list[dict[str, Any]]] = {}
    # RETURNING comes in the table's physical order (on PostgreSQL, any order): list the steps
    # in the order they were due.
    retired = sorted(retired, key=lambda row: (str((row[2] or {}).get("scheduled_at") or ""), row[0]))
    for conversation_id, kind, payload in retired:
        index = int((payload or {}).get("index", 0))
        found.append((conversation_id, kind, index))
        by_conversation.setdefault(conversation_id, []).append(
            {"kind": kind, "index": index, "scheduled_at": (payload or {}).get("scheduled_at")}
        )
    for conversation_id, steps in by_conversation.items():
        record_event(
            session=session,
            at=now,
            actor="outbox",
            action="ladder_retired",
            conversation_id=conversation_id,
            reason=reason,
            steps=steps,
        )
    return found


# Kinds of which only the newest pending row per conversation matters: a card update renders the
# conversation as it is when sent; a nag says the conversation is still unanswered, so an older
# unsent nag says nothing the newer one does not. Superseding keeps what is owed to a rate-limited
# Slack channel bounded: at most one pending row of each per conversation, however long it waits.
SUPERSEDED_KINDS = ("card_update", "nag")


def supersede_older(*, session: Session, kind: str, conversation_ids: Sequence[int]) -> int:
    """Retire every pending `kind` row that a newer pending one of the same conversation makes
    redundant (`kind` is one of SUPERSEDED_KINDS). Returns how many were retired."""
    if not conversation_ids:
        return 0
    newer = aliased(Outbox)
    result = session.execute(
        update(Outbox)
        .where(
            Outbox.conversation_id.in_(list(conversation_ids)),
            Outbox.kind == kind,
            Outbox.status == PENDING,
            exists().where(
                newer.conversation_id == Outbox.conversation_id,
                newer.kind == kind,
                newer.status == PENDING,
                newer.id > Outbox.id,
            ),
        )
        .values(
            status=RETIRED,
            result=f"retired: superseded by a newer {kind.replace('_', ' ')}",
            lease_until=None,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def supersede_card_updates(*, session: Session, conversation_ids: Sequence[int]) -> int:
    """Retire every pending card update that a newer pending one of the same card makes redundant."""
    return supersede_older(session=session, kind="card_update", conversation_ids=conversation_ids)


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


def renew_lease(
    *,
    session: Session,
    name: str,
    holder: str,
    host: str,
    pid: int,
    now: datetime,
    expires_at: datetime,
) -> None:
    """Create or extend a lease row (the caller decides whether it may take it)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(Lease).values(
        name=name, holder=holder, host=host, pid=pid, acquired_at=now, expires_at=expires_at
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["name"],
            set_={"holder": holder, "host": host, "pid": pid, "expires_at": expires_at},
        )
    )
