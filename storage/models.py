"""SQLAlchemy 2 models: everything that must survive a crash is a row here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.types import UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


# Conversation.status values
OPEN = "open"  # waiting for our (first or next) response
ANSWERED = "answered"  # a human answered; a further customer post reopens it
CLOSED = "closed"  # closed by staff without (further) reply
CONVERSATION_STATUSES = (OPEN, ANSWERED, CLOSED)

# Outbox.status values. RETIRED: never sent on purpose, before any attempt (a ladder step of a
# conversation answered or closed first, a card update superseded by a newer one); `result` says why.
PENDING, SENDING, SENT, FAILED, UNKNOWN, RETIRED = (
    "pending",
    "sending",
    "sent",
    "failed",
    "unknown",
    "retired",
)
OUTBOX_STATUSES = (PENDING, SENDING, SENT, FAILED, UNKNOWN, RETIRED)
# Staff messages that only matter while their conversation is open (retired when it is answered).
LADDER_KINDS = frozenset({"warning", "breach", "nag", "escalation", "reassign"})
# Staff messages that keep no place in their conversation's order (the outbox claim,
# bot.flow.outbox._claim_query): they wait for none of its other messages and none waits for them,
# so they lend and borrow no urgency either. A nag is a DM to the owner; a warning, breach or
# escalation goes to the card's thread, or, while the card is not posted yet (a storm), as a
# top-level overdue digest: a breach notice never waits behind a card.
LANE_FREE_KINDS = frozenset({"nag", "warning", "breach", "escalation"})
# Kinds that hold back none of their conversation's later messages: the lane-free ones, and card
# updates. A card update waits for the card (it edits it) but nothing written after it needs the
# edit first: a follow-up, a reassignment notice or a newer edit waited behind card updates that
# Slack paces at 50 a minute for the whole workspace. Neither do they borrow urgency.
HOLDS_NOTHING_BACK = LANE_FREE_KINDS | {"card_update"}
# The resolution ladder's notices: they outlive an answer (the target is closing it), not a close.
RESOLUTION_KINDS = frozenset({"resolution_warning", "resolution_breach"})
# Outbox.urgency by kind (lower first): what the sender claims first when more is due than it can
# send at once (a storm, a rate-limited channel). Within one conversation's lane, order of writing
# still rules. Kinds not listed: DEFAULT_URGENCY.
URGENCY = {
    "breach": 0,
    "resolution_breach": 0,
    "escalation": 0,
    "delivery_unknown": 0,
    "delivery_failed": 0,
    "ack": 1,
    "reply": 1,
    "warning": 2,
    "resolution_warning": 2,
    "admin_alert": 2,
    "card": 3,
    "thread_post": 3,
    "reassign": 4,
    "card_update": 5,
    "nag": 6,
    "digest": 7,
}
DEFAULT_URGENCY = 5


class Account(Base):
    """A connector account (one X handle, one Mastodon account, one feed, one webhook) and its cursor."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    cursor: Mapped[str | None] = mapped_column(Text)
    cursor_updated_at: Mapped[datetime | None]
    last_poll_at: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    parked_until: Mapped[datetime | None]


class Post(Base):
    """One post, incoming (customer) or outgoing (ours), stored once per account and external id."""

    __tablename__ = "posts"
    __table_args__ = (
        UniqueConstraint("account_id", "external_id", name="uq_posts_account_external"),
        Index("ix_posts_account_reply_to", "account_id", "reply_to_external_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    external_id: Mapped[str] = mapped_column(String(200))
    direction: Mapped[str] = mapped_column(String(3))  # "in" or "out"
    author_id: Mapped[str] = mapped_column(String(200))
    author_name: Mapped[str | None] = mapped_column(String(200))
    author_handle: Mapped[str | None] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(16))
    posted_at: Mapped[datetime]  # platform time
    received_at: Mapped[datetime]
    reply_to_external_id: Mapped[str | None] = mapped_column(String(200))
    thread_key: Mapped[str | None] = mapped_column(String(200))
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"), index=True)
    # Channel details a reply needs (an e-mail's subject, Message-ID, References), or None.
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Conversation(Base):
    """A customer's question and its deadline: the unit staff claim, answer and get nagged about."""

    __tablename__ = "conversations"
    __table_args__ = (
        # The sweep asks "which conversations need something done by now?". Only open ones carry
        # a next_action_at, so a partial index keeps that query O(due), not O(open or all).
        Index(
            "ix_conversations_next_action_at",
            "next_action_at",
            postgresql_where=text("next_action_at IS NOT NULL"),
            sqlite_where=text("next_action_at IS NOT NULL"),
        ),
        Index("ix_conversations_account_thread", "account_id", "thread_key"),
        Index("ix_conversations_account_author", "account_id", "author_id", "last_customer_post_at"),
        # Routing, per team: open conversations per owner (from the index alone) and the expert
        # assigned last (one index step), whatever the number of conversations.
        Index("ix_conversations_team_status_owner", "team", "status", "owner"),
        Index("ix_conversations_team_assigned", "team", "assigned_at", "id"),
        Index("ix_conversations_owner_status", "owner", "status"),
        # /metrics: open and overdue conversations per team, an index range over open ones only.
        Index("ix_conversations_status_team_due", "status", "team", "due_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    thread_key: Mapped[str | None] = mapped_column(String(200))
    author_id: Mapped[str] = mapped_column(String(200))
    author_name: Mapped[str | None] = mapped_column(String(200))
    author_handle: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=OPEN)
    team: Mapped[str] = mapped_column(String(100))
    priority: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str] = mapped_column(String(100))
    route_rule: Mapped[str | None] = mapped_column(String(100))
    owner: Mapped[str | None] = mapped_column(String(100))
    assigned_at: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_at: Mapped[datetime | None]
    opened_at: Mapped[datetime]
    # The deadline of the current cycle (cycle 0: first response; later cycles: next response).
    cycle: Mapped[int] = mapped_column(Integer, default=0)
    cycle_started_at: Mapped[datetime]
    clock_started_at: Mapped[datetime]
    due_at: Mapped[datetime]
    # The first-response deadline the customer was promised (kept when later cycles move due_at);
    # None only on rows from before migration 0004 that were already past their first cycle.
    first_due_at: Mapped[datetime | None]
    # The resolution target (policy `resolution`), moved on by the time spent waiting on the customer.
    resolution_due_at: Mapped[datetime | None]
    # Since when staff wait on the customer (response and resolution clocks paused); None: not waiting.
    waiting_since: Mapped[datetime | None]
    last_customer_post_at: Mapped[datetime]
    first_response_at: Mapped[datetime | None]
    answered_at: Mapped[datetime | None]
    answered_by: Mapped[str | None] = mapped_column(String(100))
    breached_at: Mapped[datetime | None]  # the first breach of this conversation
    breach_cycle: Mapped[int | None] = mapped_column(Integer)  # the cycle whose breach was announced
    closed_at: Mapped[datetime | None]
    close_reason: Mapped[str | None] = mapped_column(String(100))
    acknowledged_at: Mapped[datetime | None]
    # The ladder: what has been done in this cycle, and when the sweep must look again.
    warnings_sent: Mapped[int] = mapped_column(Integer, default=0)
    nag_level: Mapped[int] = mapped_column(Integer, default=0)
    escalation_step: Mapped[int] = mapped_column(Integer, default=0)
    reassignments: Mapped[int] = mapped_column(Integer, default=0)
    # The resolution ladder (policy `resolution`): warnings sent and the breach notice, whatever the cycle.
    resolution_warnings_sent: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    resolution_breach_sent: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    next_action_at: Mapped[datetime | None]
    slack_channel: Mapped[str | None] = mapped_column(String(100))
    slack_ts: Mapped[str | None] = mapped_column(String(40))
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}


class Expert(Base):
    """Runtime state of an expert from the policy file (the file stays the source of who exists)."""

    __tablename__ = "experts"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    slack_id: Mapped[str] = mapped_column(String(40))
    away_until: Mapped[datetime | None]
    active: Mapped[bool] = mapped_column(default=True)


class Event(Base):
    """Append-only audit trail: who did what, when."""

    __tablename__ = "events"
    __table_args__ = (
        # Every new card asks whether a storm summary was posted lately (bot.slack.delivery): a
        # partial index of those events by time, so that the question does not read the whole
        # audit trail (it did: a scan of every event per card).
        Index(
            "ix_events_storm",
            "at",
            postgresql_where=text("action = 'slack_storm'"),
            sqlite_where=text("action = 'slack_storm'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"), index=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class SkippedItem(Base):
    """A malformed item a connector left out of a page (the cursor moved past it), kept for staff."""

    __tablename__ = "skipped_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    at: Mapped[datetime]
    external_id: Mapped[str | None] = mapped_column(String(200))
    # Where in the page the problem was (``data[2].id``) and what was wrong.
    field: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    # The item as it came: {"item": <JSON value>}.
    raw: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Outbox(Base):
    """A message still to be sent (or sent): written in the same transaction as its cause."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_pending",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index("ix_outbox_status", "status"),
        # /metrics counts rows per status and kind for the statuses that do not pile up
        # (everything but sent): an index range, not a scan of every row ever sent.
        Index("ix_outbox_status_kind", "status", "kind"),
        # The claim's order: most urgent kind first, then oldest due (the reminder lane's claim:
        # the nags' urgency, oldest due first).
        Index(
            "ix_outbox_urgency",
            "urgency",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # The claim's lane check ("is an earlier row of this conversation still unsent?") probes
        # only unsent rows: a partial index keeps it O(unsent of that conversation) however many
        # rows were sent before, and the planner does not need fresh statistics to choose it.
        Index(
            "ix_outbox_lane",
            "conversation_id",
            "id",
            postgresql_where=text("status IN ('pending', 'sending')"),
            sqlite_where=text("status IN ('pending', 'sending')"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    urgency: Mapped[int] = mapped_column(Integer, default=DEFAULT_URGENCY, server_default=text("5"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    # The sender holding a `sending` row (a `Lease` name): while that lease is renewed the row is
    # in flight; once it lapses the owner is dead and recovery settles the row within seconds.
    owner: Mapped[str | None] = mapped_column(String(100))
    sent_at: Mapped[datetime | None]
    result: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)


class AckOptOut(Base):
    """A customer who wrote "stop": no more automatic acknowledgements to them on this account."""

    __tablename__ = "ack_opt_outs"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    author_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    at: Mapped[datetime]


class SeenRequest(Base):
    """A signed request already accepted (a Slack signature, a webhook-id), kept until it expires.

    The replay guard of every process: inserting an existing key fails, so a replay is refused
    whichever process it reaches and across restarts; the retention job deletes expired rows.
    """

    __tablename__ = "seen_requests"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Lease(Base):
    """A named lease a live process renews with a heartbeat (`expires_at` a few seconds ahead).

    ``sender:<id>``: one per outbox sender; rows it holds `sending` are abandoned once it lapses.
    ``run``: the one `replyclock run` allowed on an SQLite database (bot.runlock).
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class SlackPace(Base):
    """Slack's rate-limit budget for one (method, channel), shared by every process on the database.

    bot.slack.pacing: `tat` is the bucket's theoretical arrival time (GCRA, seconds since the
    epoch: a call may go while ``tat`` is at most the bucket's tolerance ahead of now);
    `tail` and `urgent_tail` are the next slots promised to calls put off (ordinary, urgent).
    ``channel`` is "" for a workspace-wide method tier. A row of method ``alias`` says which
    channel id a configured name (``#care``) is, so that every process spends from the id's row.
    """

    __tablename__ = "slack_pace"

    method: Mapped[str] = mapped_column(String(60), primary_key=True)
    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    tat: Mapped[float] = mapped_column(Double)
    tail: Mapped[float] = mapped_column(Double)
    urgent_tail: Mapped[float] = mapped_column(Double)
    same_as: Mapped[str | None] = mapped_column(String(100))
