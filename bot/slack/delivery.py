"""Outbox handlers that talk to Slack: cards, their threads, DMs, admin alerts and storm summaries.

Each handler reads what it needs in one short session, makes its Slack calls with no
transaction open, then records the outcome in another short transaction. Slack messages are
delivered at least once (bot.flow.outbox); what makes a repeat harmless:

- A card's channel id and ``ts`` are stored on the conversation right after the post, with a
  compare-and-set (``slack_ts IS NULL``) that also bumps its version. A ``card`` row retried
  after that (the process died before the outbox row was marked sent) edits the stored card
  instead of posting a second one. The window left is between Slack's answer and that commit
  (or an answer lost to a timeout): every card carries message metadata (``replyclock_card``
  with the conversation id; a storm digest lists its conversations' ids), and a ``card`` row
  tried before whose card is still not stored looks it up first (``conversations.history`` with
  ``include_all_metadata``, or ``conversations.replies`` of a storm summary's thread) and stores
  what it finds instead of posting again.
- Everything else is a thread reply, a DM or an alert: a repeat is a duplicate line, never a
  lost one.

Errors: HTTP 429 raises `Retry` with Slack's ``Retry-After``; 5xx, timeouts and dropped
connections raise `Retry` (the outbox backs off); a refusal that waiting will not fix
(``channel_not_found``, ``not_in_channel``, ``is_archived``, ``invalid_auth``...) raises
`SlackDeliveryError` naming the channel and what to do, and is logged; the outbox retries it
with back-off up to its attempt limit, then marks it failed.

Storms: when more than `storm_threshold` cards for one channel are due within `storm_window`,
the first of them claims the others' outbox rows (as the sender claims: ``sending`` with a
lease, ``SKIP LOCKED`` on PostgreSQL, so no other sender posts them and a crash hands them
back) and posts ONE digest message for up to MAX_STORM of them ("14 new mentions, 3 urgent",
then a line and a Claim button per conversation): at Slack's one message a second per channel,
a storm costs one post per 49 conversations. The digest's ``ts`` is stored as each of its
conversations' card, in one transaction with the ``slack_storm`` audit event and the claimed
rows' settlement; their history (warnings, nags' notes...) goes to the digest's thread, and a
change to any of them edits the digest, folding in the other card updates of its conversations
written before (one ``chat.update`` per digest and moment). Cards threaded under an older-style
storm summary (entries in its thread) keep working as before.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.web import SlackResponse
from sqlalchemy import Select, Table, and_, bindparam, case, func, insert, literal, or_, select, true, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from bot.core.policy import Expert
from bot.core.routing import is_on_duty
from bot.flow.context import AppContext
from bot.flow.conversations import queue_card_refresh
from bot.flow.delivery import STAFF_KINDS
from bot.flow.outbox import (
    CUSTOMER_KINDS,
    DEFAULT_LEASE,
    Defer,
    Handler,
    OutboxMessage,
    Retry,
    backoff,
    keep_ahead,
    kept_ahead,
    loop_autocommit,
    loop_reader,
    loop_session,
    loop_transaction,
    next_in_batch,
    patiently,
    relaxed_commit,
    sql_constant,
    taken_over,
    untried_in_batch,
)
from bot.httputil import header, retry_after
from bot.logs import redact_urls
from bot.slack import blocks
from bot.slack.pacing import Pacer
from bot.telemetry import record_slack_error
from storage import repo
from storage.db import is_postgres
from storage.models import (
    CLOSED,
    DEFAULT_URGENCY,
    HOLDS_NOTHING_BACK,
    OPEN,
    PENDING,
    RETIRED,
    SENDING,
    SENT,
    URGENCY,
    Conversation,
    Event,
    Outbox,
    Post,
)

__all__ = [
    "CARD_EVENT",
    "FOLLOW_UP_METADATA_TYPE",
    "OVERDUE_EVENT",
    "OVERDUE_METADATA_TYPE",
    "REMINDER_METADATA_TYPE",
    "STORM_EVENT",
    "SlackDelivery",
    "SlackDeliveryError",
    "slack_handlers",
]

log = logging.getLogger("replyclock.slack")

CARD_EVENT = "slack_card"  # audit: where a conversation's card was posted (channel, ts, thread_ts)
STORM_EVENT = "slack_storm"  # audit: a storm summary (channel, ts, conversation ids)
CARD_METADATA_TYPE = "replyclock_card"
OVERDUE_EVENT = (
    "slack_overdue"  # audit: a conversation's breach/escalation notice went out in an overdue digest
)
OVERDUE_METADATA_TYPE = "replyclock_overdue"  # an overdue digest's metadata: which notices it carries
REMINDER_METADATA_TYPE = "replyclock_reminders"  # a reminder digest's metadata: the nags it carries
FOLLOW_UP_METADATA_TYPE = "replyclock_follow_ups"  # a follow-up digest's metadata: its thread posts
OVERDUE_KINDS = ("breach", "escalation", "warning")  # the notices an overdue digest coalesces
_STEP_ORDER = {"warning": 0, "breach": 1, "escalation": 2}  # which notice a conversation's digest line shows
OVERDUE_SCAN = 200  # candidate rows read for one overdue digest (a conversation may have two)
NAG_CARD_WAIT = timedelta(seconds=5)  # a nag for the card's thread, looking again for the card
MAX_STORM = 49  # conversations in one storm digest (blocks.MAX_BLOCKS less its headline); more make a second
REMINDER_FOLD = 500  # nags one reminder digest carries at most (its metadata lists them; it shows MAX_STORM)
# A card retried after an attempt whose outcome was not recorded is looked up before it is posted
# again: this many top-level messages per page (conversations.history), at most this many pages.
FIND_PAGE = 200
PUT_OFF_HORIZON = timedelta(minutes=15)  # as far ahead as the pacer puts a message off (pacing.POST)
FIND_PAGES = 5
STORM_MEMORY = timedelta(days=1)  # how long a card not yet posted still joins its storm's thread
DEFAULT_RETRY_AFTER = 30  # seconds, when a 429 comes without Retry-After
UTC = ZoneInfo("UTC")

# Refusals that retrying will not fix, and what a person should do about each.
PERMANENT_ERRORS: Mapping[str, str] = {
    "channel_not_found": "no such channel, or the app cannot see it: check the channel in replyclock.toml",
    "not_in_channel": "the app is not a member: /invite the app to the channel",
    "is_archived": "the channel is archived: unarchive it or change the team's channel",
    "invalid_auth": "the bot token was refused: check SLACK_BOT_TOKEN",
    "not_authed": "no bot token was sent: set SLACK_BOT_TOKEN",
    "account_inactive": "the bot token belongs to a deactivated app or user",
    "token_revoked": "the bot token was revoked: reinstall the app",
    "token_expired": "the bot token expired: reinstall the app",
    "missing_scope": "the app lacks a scope: reinstall it from the manifest",
    "user_not_found": "no such Slack user: check the expert's slack_id",
    "cannot_dm_bot": "the expert's slack_id is a bot",
    "restricted_action": "the workspace does not let the app post there",
}
RETRYABLE_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)


class SlackDeliveryError(Exception):
    """Slack refused a message for a reason that waiting alone will not fix.

    Attributes:
        code: Slack's error code (``channel_not_found``...), or None.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _Loaded:
    """A conversation as read in one short session (detached), with what a message needs."""

    conversation: Conversation
    post: Post | None  # the customer's post the card shows
    tz: ZoneInfo
    card_parent_ts: str | None  # the storm summary the card is threaded under, if any
    card_digest: tuple[int, ...] = ()  # the card is a storm digest: the conversations it shows


class _CardConversation(NamedTuple):
    """A conversation's columns that its card shows (blocks.CardConversation), read without the ORM."""

    id: int
    team: str
    status: str
    priority: str
    author_id: str
    author_name: str | None
    author_handle: str | None
    owner: str | None
    claimed_by: str | None
    due_at: datetime
    cycle_started_at: datetime
    answered_at: datetime | None
    first_response_at: datetime | None
    answered_by: str | None
    close_reason: str | None


class _CardPost(NamedTuple):
    """A post's columns that a card shows (blocks.CardPost)."""

    text: str
    url: str | None
    posted_at: datetime


class _NewCard(NamedTuple):
    """A card's one read (SlackDelivery._read_new_card)."""

    conversation: _CardConversation
    post: _CardPost
    slack_ts: str | None  # the card stored already (a retry): edit it
    stormy: bool  # a storm summary was posted lately (its thread may be this card's place)
    waiting: int  # other cards of its channel that would join a storm now (up to the storm threshold)


class _ReadAhead(NamedTuple):
    """A new card's read, made with the previous card's store (SlackDelivery._store_and_read)."""

    conversation_id: int
    found: _NewCard | None


@dataclass(frozen=True)
class _Storm:
    channel: str
    ts: str
    digest: bool = False  # one message for all its conversations (blocks.storm_digest), no entries


# What a digest records besides marking its rows sent: (session, conversations shown, kind ->
# conversation ids, channel, ts, the rows' result, now).
_Record = Callable[[Session, list[_Loaded], Mapping[str, list[int]], str, str, str, datetime], None]


@dataclass(frozen=True)
class _Group:
    """One kind of digest (SlackDelivery._digest): rows of several conversations due together for
    one channel, posted as one message."""

    name: str  # "overdue digest", "reminder digest": the log line and the rows' result
    channel: str  # where it goes (a team channel, a person's DM channel)
    kinds: tuple[str, ...]  # the outbox kinds it carries (its metadata lists each kind's conversations)
    metadata_type: str
    find: Callable[[Session, bool], list[tuple[int, str, int]]]  # (session, lock) -> the other rows
    # (conversations shown, their step, how many more it carries unshown, every row it carries as
    # (outbox id, kind, conversation id)) -> the message
    build: Callable[[list[_Loaded], Mapping[int, str], int, list[tuple[int, str, int]]], blocks.Message]
    record: _Record | None
    thread_ts: str | None = None  # a reply in this thread of `channel`; None: a top-level message


def slack_handlers(
    ctx: AppContext,
    client: WebClient,
    *,
    storm_threshold: int = 5,
    storm_window: timedelta = timedelta(minutes=1),
    pacer: Pacer | None = None,
) -> dict[str, Handler]:
    """Outbox handlers for every staff kind (bot.flow.delivery.STAFF_KINDS), delivering to Slack.

    Args:
        ctx: the process context (policy, clock, database).
        client: a slack_sdk WebClient with the bot token.
        storm_threshold: more cards than this for one channel, due within `storm_window`,
            are posted as one summary with the cards in its thread.
        storm_window: see `storm_threshold`.
        pacer: keep to Slack's limits per method and channel (bot.slack.pacing): a call over
            them is not made, the row is deferred (bot.flow.outbox.Defer) until its bucket
            allows it. None: no pacing (Slack's 429s alone hold the sender back).

    Returns:
        kind -> handler, for bot.flow.outbox.OutboxSender.
    """
    return SlackDelivery(
        ctx, client, storm_threshold=storm_threshold, storm_window=storm_window, pacer=pacer
    ).handlers()


class SlackDelivery:
    """The Slack side of the outbox; `handlers` maps each staff kind to one of its methods."""

    def __init__(
        self,
        ctx: AppContext,
        client: WebClient,
        *,
        storm_threshold: int = 5,
        storm_window: timedelta = timedelta(minutes=1),
        pacer: Pacer | None = None,
    ) -> None:
        self.ctx = ctx
        self.client = client
        self.storm_threshold = storm_threshold
        self.storm_window = storm_window
        self.pacer = pacer
        self._rank = threading.local()  # the urgency of the message being delivered on this thread
        self._dm_channels: dict[str, str] = {}  # Slack user id -> their DM channel id
        self._card_select: Select[Any] | None = None  # see _new_card_query
        self._store_and_read_select: Select[Any] | None = None  # see _store_and_read

    def handlers(self) -> dict[str, Handler]:
        """kind -> handler for every kind in bot.flow.delivery.STAFF_KINDS."""
        found: dict[str, Handler] = {
            "card": self.card,
            "card_update": self.card_update,
            "thread_post": self.thread_post,
            "warning": self.warning,
            "breach": self.breach,
            "nag": self.nag,
            "escalation": self.escalation,
            "reassign": self.reassign,
            "delivery_unknown": self.delivery_problem,
            "delivery_failed": self.delivery_problem,
            "admin_alert": self.admin_alert,
            "at_risk": self.at_risk,
            "resolution_warning": self.resolution_notice,
            "resolution_breach": self.resolution_notice,
        }
        assert set(found) == set(STAFF_KINDS), "every staff kind needs a Slack handler"
        return {kind: self._ranked(handler) for kind, handler in found.items()}

    def _ranked(self, handler: Handler) -> Handler:
        """`handler`, telling the pacer how urgent its message is (the outbox's urgency of its kind)."""

        def run(message: OutboxMessage) -> str | None:
            self._rank.value = URGENCY.get(message.kind, DEFAULT_URGENCY)
            try:
                return handler(message)
            finally:
                self._rank.value = DEFAULT_URGENCY

        return run

    # ----------------------------------------------------------------------------------------
    # Handlers

    def card(self, message: OutboxMessage) -> str:
        """Post a new conversation's card to its team's channel (or edit it, on a retry)."""
        conversation_id = _conversation_id(message)
        now = self.ctx.clock.now()
        post_id = message.payload.get("post_id")
        # One read for everything a new card needs, one statement of plain columns (each statement
        # and each session costs round trips on PostgreSQL, and ORM objects cost CPU per card).
        # On PostgreSQL in a batch it was read with the previous card's store (`_store_card`).
        ahead = kept_ahead(message.id)
        found: _NewCard | None = None
        if isinstance(ahead, _ReadAhead) and ahead.conversation_id == conversation_id:
            found = ahead.found
        elif self.ctx.policy.teams:
            found = self._read_new_card(
                message, conversation_id, post_id if isinstance(post_id, int) else None, now
            )
        if (
            found is not None
            and found.slack_ts is None
            and not found.stormy
            and message.attempts == 1
            and found.waiting + 1 <= self.storm_threshold
        ):
            # The usual case: not posted yet, first try, no storm.
            return self._post_card(
                found.conversation, found.post, self._team_tz(found.conversation.team), now
            )
        # Everything else (a retry, a card stored already, a storm): the conversation as ORM objects.
        storm: _Storm | None = None
        waiting = 0
        with loop_session(self.ctx, read_only=True) as session:
            loaded = self._load(session, conversation_id, post_id=post_id)
            if loaded.conversation.slack_ts is None:
                if found is None:
                    storm, waiting = self._storm_state(session, loaded.conversation, message, now)
                else:
                    waiting = found.waiting
                    if found.stormy:
                        storm = self._storm_covering(session, conversation_id, now)
        if loaded.conversation.slack_ts is not None:
            return self._refresh_card(loaded, now)
        if storm is not None and storm.digest:
            # Listed in a digest whose card was not stored for it (another card was, then gone?):
            # the digest is its card.
            self._store_card(conversation_id, storm.channel, storm.ts, now=now, thread_ts=None)
            return f"in storm digest {storm.channel} {storm.ts}"
        if message.attempts > 1:
            # Tried before and still no card stored: that attempt may have posted it and lost
            # the answer or the database before storing it. Look before posting again.
            found_ts = self._find_posted(loaded, storm, now)
            if found_ts is not None:
                return found_ts
        if storm is not None:
            ts = self._post_storm_entry(loaded, storm, now, outbox_id=None)
            return f"storm entry {storm.channel} {ts}"
        if waiting + 1 > self.storm_threshold:
            channel = self._team_channel(loaded.conversation)
            ready = self._ready(channel)
            if ready is not None:
                # The channel's pace is spent: the storm's cards wait together for its next free
                # moment (one statement), not each for a slot of its own.
                moved = self._put_off_storm(loaded.conversation, message.id, now, ready)
                raise Defer(
                    f"Slack chat.postMessage to {channel}: paced until {ready.isoformat()} "
                    f"with {moved} more cards",
                    after=ready,
                )
            claimed = self._claim_storm(loaded.conversation, message.id, now, owner=message.owner)
            if claimed:
                return self._post_storm(loaded, claimed, now)
        return self._post_card(loaded.conversation, loaded.post, loaded.tz, now)

    def card_update(self, message: OutboxMessage) -> str:
        """Edit the stored card to show the conversation as it is now."""
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if loaded.conversation.slack_ts is None:
            raise Retry(f"card of conversation {loaded.conversation.id} not posted yet")
        return self._refresh_card(loaded, now, message=message)

    def thread_post(self, message: OutboxMessage) -> str:
        """The customer wrote again: their words in the card's thread; when the card is a storm
        digest, with the other follow-ups due in that thread as one reply (`_follow_up_digest`)."""
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if loaded.card_digest:
            coalesced = self._follow_up_digest(message, loaded, now)
            if coalesced is not None:
                return coalesced
        with loop_session(self.ctx, read_only=True) as session:
            post_id = message.payload.get("post_id")
            post = session.get(Post, post_id) if isinstance(post_id, int) else None
        built = blocks.thread_post_message(loaded.conversation, post, ctx_policy=self.ctx.policy, now=now)
        return self._thread_reply(loaded, built)

    def warning(self, message: OutboxMessage) -> str:
        """The deadline is near: a line in the card's thread."""
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if not _still_open(loaded):
            return f"skipped: conversation is {loaded.conversation.status}"
        coalesced = self._overdue_digest(message, loaded, now, alone=loaded.conversation.slack_ts is None)
        if coalesced is not None:
            return coalesced
        built = blocks.warning_message(loaded.conversation, ctx_policy=self.ctx.policy, now=now, tz=loaded.tz)
        return self._thread_reply(loaded, built)

    def at_risk(self, message: OutboxMessage) -> str:
        """The forecast answer time passed the deadline: a line in the card's thread, pinging the owner."""
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if not _still_open(loaded):
            return f"skipped: conversation is {loaded.conversation.status}"
        forecast = datetime.fromisoformat(str(message.payload["forecast_at"]))
        built = blocks.at_risk_message(
            loaded.conversation, forecast, ctx_policy=self.ctx.policy, now=now, tz=loaded.tz
        )
        return self._thread_reply(loaded, built)

    def breach(self, message: OutboxMessage) -> str:
        """The deadline passed: the card turns overdue and the thread says so."""
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if not _still_open(loaded):
            return f"skipped: conversation is {loaded.conversation.status}"
        coalesced = self._overdue_digest(message, loaded, now, alone=loaded.conversation.slack_ts is None)
        if coalesced is not None:
            return coalesced
        if loaded.conversation.slack_ts is None:
            raise Retry(f"card of conversation {loaded.conversation.id} not posted yet")
        built = blocks.breach_message(loaded.conversation, ctx_policy=self.ctx.policy, now=now, tz=loaded.tz)
        sent = self._thread_reply(loaded, built)
        # The notice is out; the card's edit (chat.update, a workspace-wide tier of ~50 a minute)
        # must not hold it back: when that tier is spent, a card_update row does it later.
        self._refresh_or_queue(loaded, now, reason="overdue")
        return sent

    def _refresh_or_queue(self, loaded: _Loaded, now: datetime, *, reason: str) -> None:
        """Edit the card now if Slack's pace allows, else queue a ``card_update`` (newer ones supersede it)."""
        conversation = loaded.conversation
        try:
            self._refresh_card(loaded, now)
            return
        except (Retry, SlackDeliveryError) as error:
            after = error.after if isinstance(error, Retry) else None
        with self.ctx.sessions() as session, session.begin():
            queue_card_refresh(session, conversation, reason, max(after or now, now))

    def resolution_notice(self, message: OutboxMessage) -> str:
        """The resolution deadline is near or has passed: a line in the card's thread, pinging the
        owner (answered conversations too: the target is closing it)."""
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if loaded.conversation.status == CLOSED:
            return "skipped: conversation is closed"
        build = (
            blocks.resolution_breach_message
            if message.kind == "resolution_breach"
            else blocks.resolution_warning_message
        )
        built = build(loaded.conversation, ctx_policy=self.ctx.policy, now=now, tz=loaded.tz)
        return self._thread_reply(loaded, built)

    def reassign(self, message: OutboxMessage) -> str:
        """Nobody claimed it in time: the card shows the new owner and the thread says why."""
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if not _still_open(loaded):
            return f"skipped: conversation is {loaded.conversation.status}"
        if loaded.conversation.slack_ts is None:
            raise Retry(f"card of conversation {loaded.conversation.id} not posted yet")
        self._refresh_card(loaded, now)
        payload = message.payload
        built = blocks.reassign_message(
            loaded.conversation,
            ctx_policy=self.ctx.policy,
            now=now,
            owner=_text(payload.get("owner")),
            previous_owner=_text(payload.get("previous_owner")),
            note=_text(payload.get("note")),
            reason=_text(payload.get("reason")),
        )
        return self._thread_reply(loaded, built)

    def delivery_problem(self, message: OutboxMessage) -> str:
        """A message to the customer may not have arrived: say so loudly in the thread."""
        loaded = self._read(message)
        payload = message.payload
        built = blocks.delivery_problem_message(
            loaded.conversation,
            kind=_text(payload.get("kind")) or "message",
            problem=message.kind,
            text=_text(payload.get("text")),
            error=_text(payload.get("error")),
        )
        return self._thread_reply(loaded, built)

    def nag(self, message: OutboxMessage) -> str:
        """A reminder by DM to the owner, with the card's buttons (in the thread if nobody owns it).
        The person's other nags due together (or put off by their DM's pace) go with it as one
        reminder digest.

        The sweep only schedules nags in the owner's working hours, so this never checks them.
        """
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if not _still_open(loaded):
            return f"skipped: conversation is {loaded.conversation.status}"
        conversation = loaded.conversation
        owner = self._expert(conversation.claimed_by) or self._expert(conversation.owner)
        common: dict[str, Any] = {"ctx_policy": self.ctx.policy, "now": now, "tz": loaded.tz}
        if owner is None:
            if conversation.slack_ts is None:
                # A nag waits for no earlier message of its conversation (bot.flow.outbox): in the
                # thread it needs the card, so it waits for that here, without an attempt counted.
                raise Defer(
                    f"card of conversation {conversation.id} not posted yet", after=now + NAG_CARD_WAIT
                )
            return self._thread_reply(
                loaded, blocks.nag_message(conversation, loaded.post, in_thread=True, **common)
            )
        coalesced = self._reminder_digest(message, loaded, owner, now)
        if coalesced is not None:
            return coalesced
        return self._dm(owner, blocks.nag_message(conversation, loaded.post, **common), conversation.id)

    def escalation(self, message: OutboxMessage) -> str:
        """An escalation step: the team channel, or a DM to the manager, the on-call person or the owner.

        Manager and on-call are told whatever the hour (that is what they are for); an owner
        who is off duty is named in the thread instead of being woken.
        """
        now = self.ctx.clock.now()
        loaded = self._read(message)
        if not _still_open(loaded):
            return f"skipped: conversation is {loaded.conversation.status}"
        conversation = loaded.conversation
        notify = _text(message.payload.get("notify")) or "team_channel"
        if notify == "team_channel":
            coalesced = self._overdue_digest(message, loaded, now, alone=conversation.slack_ts is None)
            if coalesced is not None:
                return coalesced
        team = self.ctx.policy.teams.get(conversation.team)
        common: dict[str, Any] = {
            "ctx_policy": self.ctx.policy,
            "now": now,
            "tz": loaded.tz,
            "team_label": team.label if team else conversation.team,
        }
        if notify in ("manager", "on_call"):
            role = "manager" if notify == "manager" else "on-call person"
            target = self._expert(_text(message.payload.get(notify)))
            if target is None:
                built = blocks.escalation_message(
                    conversation, loaded.post, notify="team_channel", in_thread=True, **common
                )
                log.warning(
                    "escalation has nobody to go to; posted in the channel",
                    extra={"conversation_id": conversation.id, "notify": notify},
                )
                return self._in_thread(message, loaded, now, built, broadcast=True)
            sent = self._dm(
                target,
                blocks.escalation_message(conversation, loaded.post, notify=notify, **common),
                conversation.id,
            )
            self._note(loaded, f"Escalated by DM to {target.name}, the {role}.")
            return sent
        if notify == "owner":
            owner = (
                self._expert(conversation.claimed_by)
                or self._expert(conversation.owner)
                or self._expert(_text(message.payload.get("owner")))
            )
            if owner is not None and is_on_duty(owner, now):
                sent = self._dm(
                    owner,
                    blocks.escalation_message(conversation, loaded.post, notify="owner", **common),
                    conversation.id,
                )
                self._note(loaded, f"Escalated by DM to {owner.name}, the owner.")
                return sent
            if owner is not None:
                built = blocks.escalation_message(
                    conversation, loaded.post, notify="owner", in_thread=True, **common
                )
                return self._in_thread(message, loaded, now, built)
        # The team channel: one thread reply also shown in the channel (reply_broadcast), so the
        # whole team sees it and the card's thread keeps the history, in one message.
        built = blocks.escalation_message(
            conversation, loaded.post, notify="team_channel", in_thread=True, **common
        )
        return self._in_thread(message, loaded, now, built, broadcast=True)

    def _in_thread(
        self,
        message: OutboxMessage,
        loaded: _Loaded,
        now: datetime,
        built: blocks.Message,
        *,
        broadcast: bool = False,
    ) -> str:
        """A notice for the card's thread; while the card is not posted yet, a top-level overdue
        digest of one instead (a notice waits for no card: storage.models.LANE_FREE_KINDS)."""
        if loaded.conversation.slack_ts is None:
            alone = self._overdue_digest(message, loaded, now, alone=True)
            if alone is not None:
                return alone
        return self._thread_reply(loaded, built, broadcast=broadcast)

    def admin_alert(self, message: OutboxMessage) -> str:
        """An operator alert to the admin channel (skipped, with a log line, when there is none)."""
        payload = message.payload
        channel = _text(payload.get("channel")) or self.ctx.policy.settings.admin_channel
        text = redact_urls(_text(payload.get("text")) or "(no text)")
        if not channel:
            log.warning("admin alert not posted: no admin_channel configured", extra={"alert": text})
            return "skipped: no admin channel"
        built = blocks.admin_alert_message(text, account=_text(payload.get("account")))
        posted_channel, ts = self._post(built, channel=channel, conversation_id=message.conversation_id)
        return f"{posted_channel} {ts}"

    # ----------------------------------------------------------------------------------------
    # Cards

    def _post_card(
        self, conversation: blocks.CardConversation, post: blocks.CardPost | None, tz: ZoneInfo, now: datetime
    ) -> str:
        built = self._card_message(conversation, post, tz, now, compact=False)
        channel, ts = self._post(
            built,
            channel=self._team_channel(conversation),
            conversation_id=conversation.id,
            metadata=_card_metadata(conversation.id),
        )
        if not self._store_card(conversation.id, channel, ts, now=now, thread_ts=None):
            log.warning(
                "card posted twice: another sender stored one first",
                extra={"conversation_id": conversation.id, "channel": channel, "ts": ts},
            )
        log.info("card posted", extra={"conversation_id": conversation.id, "channel": channel, "ts": ts})
        return f"{channel} {ts}"

    def _refresh_card(self, loaded: _Loaded, now: datetime, *, message: OutboxMessage | None = None) -> str:
        """Edit the stored card; if someone deleted it in Slack, post it again. `message`: the
        ``card_update`` row this is for, if any."""
        conversation = loaded.conversation
        assert conversation.slack_ts is not None and conversation.slack_channel is not None
        if loaded.card_digest:
            return self._refresh_digest(loaded, now, message=message)
        built = self._card_message(
            loaded.conversation, loaded.post, loaded.tz, now, compact=loaded.card_parent_ts is not None
        )
        try:
            self._call(
                "chat.update",
                conversation.slack_channel,
                conversation.id,
                lambda: self.client.chat_update(
                    channel=str(conversation.slack_channel),
                    ts=str(conversation.slack_ts),
                    text=built.text,
                    blocks=built.blocks,
                    parse="none",
                    link_names=False,
                ),
            )
        except SlackDeliveryError as error:
            if error.code != "message_not_found":
                raise
            log.warning(
                "card gone from Slack; posting it again",
                extra={"conversation_id": conversation.id, "channel": conversation.slack_channel},
            )
            fresh = self._card_message(loaded.conversation, loaded.post, loaded.tz, now, compact=False)
            channel, ts = self._post(
                fresh,
                channel=self._team_channel(conversation),
                conversation_id=conversation.id,
                metadata=_card_metadata(conversation.id),
            )
            self._store_card(
                conversation.id, channel, ts, now=now, thread_ts=None, replacing=conversation.slack_ts
            )
            return f"reposted {channel} {ts}"
        return f"updated {conversation.slack_channel} {conversation.slack_ts}"

    def _refresh_digest(self, loaded: _Loaded, now: datetime, *, message: OutboxMessage | None) -> str:
        """Edit a storm digest to show each of its conversations as it is now.

        One edit stands for every change read: the card updates of the digest's conversations
        written before that read are folded in (pending ones retired; the ones this sender claimed
        in its batch marked sent, and its send loop told they are taken over), so a storm's
        changes cost one ``chat.update`` per digest and moment, not one per conversation.
        """
        conversation = loaded.conversation
        channel, ts = str(conversation.slack_channel), str(conversation.slack_ts)
        with loop_session(self.ctx, read_only=True) as session:
            seen = session.scalar(select(func.max(Outbox.id))) or 0
            shown = self._load_many(
                session,
                list(
                    session.scalars(
                        select(Conversation.id)
                        .where(
                            Conversation.id.in_(list(loaded.card_digest)),
                            Conversation.slack_ts == ts,
                            Conversation.slack_channel == channel,
                        )
                        .order_by(Conversation.id)
                    )
                ),
            )
        order = {cid: index for index, cid in enumerate(loaded.card_digest)}
        shown.sort(key=lambda m: order.get(m.conversation.id, len(order)))
        built = blocks.storm_digest(
            channel, [(m.conversation, m.post) for m in shown], ctx_policy=self.ctx.policy, now=now
        )
        shown_ids = [m.conversation.id for m in shown]
        own = message.id if message is not None else 0
        retired = 0
        if message is not None:
            # Fold first: while this edit waits for Slack's pace (chat.update is Tier 3), the other
            # updates of the digest wait in it, not each for a slot of its own.
            retired += self._fold(shown_ids, seen, own, f"folded into card update {own}")
        self._call(
            "chat.update",
            channel,
            conversation.id,
            lambda: self.client.chat_update(
                channel=channel, ts=ts, text=built.text, blocks=built.blocks, parse="none", link_names=False
            ),
        )
        folded_in = f"storm digest {channel} {ts} edited for them all"
        retired += self._fold(shown_ids, seen, own, folded_in, owner=message.owner if message else None)
        return (
            f"updated storm digest {channel} {ts} ({len(shown)} conversations, {retired} updates folded in)"
        )

    def _fold(
        self, conversation_ids: list[int], seen: int, own: int, why: str, *, owner: str | None = None
    ) -> int:
        """Settle the card updates of a digest's conversations written up to outbox id `seen`
        (except `own`): pending ones retired, ones `owner` claimed in its batch marked sent (its send
        loop is told they are taken over). Returns how many."""
        with loop_session(self.ctx) as session, session.begin():
            same = (
                Outbox.conversation_id.in_(conversation_ids),
                Outbox.kind == "card_update",
                Outbox.id <= seen,
                Outbox.id != own,
            )
            folded = session.execute(
                update(Outbox)
                .where(*same, Outbox.status == PENDING)
                .values(status=RETIRED, result=f"retired: {why}", lease_until=None)
                .execution_options(synchronize_session=False)
            )
            count = int(folded.rowcount or 0)  # type: ignore[attr-defined]
            if owner is not None:
                taken = list(
                    session.scalars(
                        update(Outbox)
                        .where(*same, Outbox.status == SENDING, Outbox.owner == owner)
                        .values(
                            status=SENT,
                            sent_at=self.ctx.clock.now(),
                            result=why,
                            lease_until=None,
                            owner=None,
                        )
                        .returning(Outbox.id)
                        .execution_options(synchronize_session=False)
                    )
                )
                taken_over(taken)
                count += len(taken)
        return count

    def _find_posted(self, loaded: _Loaded, storm: _Storm | None, now: datetime) -> str | None:
        """Store a card an earlier attempt posted but did not record; "found <channel> <ts>", or None.

        Every card and storm entry carries message metadata naming its conversation
        (`_card_metadata`), so it is found in its channel's recent history (newest first, up to
        FIND_PAGES pages of FIND_PAGE top-level messages) or, for a storm entry, in the summary's
        thread. A lookup Slack refuses (a scope missing, the app not in the channel) is logged and
        the card is posted as before: a second card is better than none.
        """
        conversation = loaded.conversation
        thread_ts = storm.ts if storm is not None else None
        channel = storm.channel if storm is not None else self._channel_id(conversation)
        if channel is None:
            return None  # no card of this channel stored yet: its id is not known here
        method = "conversations.replies" if thread_ts is not None else "conversations.history"
        cursor: str | None = None
        try:
            for _ in range(FIND_PAGES):

                def read(cursor: str | None = cursor) -> SlackResponse:
                    if thread_ts is not None:
                        return self.client.conversations_replies(
                            channel=channel,
                            ts=thread_ts,
                            limit=FIND_PAGE,
                            cursor=cursor,
                            include_all_metadata=True,
                        )
                    return self.client.conversations_history(
                        channel=channel, limit=FIND_PAGE, cursor=cursor, include_all_metadata=True
                    )

                response = self._call(method, None, conversation.id, read)
                for found in response.get("messages") or []:
                    listed = _card_of(found)
                    if conversation.id in listed and found.get("ts"):
                        ts = str(found["ts"])
                        if len(listed) > 1:  # a storm digest: the card of each conversation it lists
                            self._store_storm(channel, ts, sorted(listed), [], now=now)
                        else:
                            self._store_card(conversation.id, channel, ts, now=now, thread_ts=thread_ts)
                        log.warning(
                            "card found in Slack, not posted again",
                            extra={"conversation_id": conversation.id, "channel": channel, "ts": ts},
                        )
                        return f"found {channel} {ts}"
                metadata = response.get("response_metadata") or {}
                cursor = str(metadata.get("next_cursor") or "") or None
                if cursor is None:
                    break
        except SlackDeliveryError as error:
            log.warning(
                "could not look for a card posted before; posting it",
                extra={"conversation_id": conversation.id, "channel": channel, "error": str(error)},
            )
        return None

    def _channel_id(self, conversation: Conversation) -> str | None:
        """The id of the conversation's team channel (history takes no names): as configured when it
        is an id, else as Slack answered a post there (the pacer's, shared by the processes), else
        where a card of a team sharing that channel was stored."""
        configured = self._team_channel(conversation)
        if not configured.startswith("#"):
            return configured
        learned = self.pacer.channel_id(configured) if self.pacer is not None else None
        if learned is not None:
            return learned
        teams = [name for name, team in self.ctx.policy.teams.items() if team.channel == configured]
        with self.ctx.read_sessions() as session:
            return session.scalar(
                select(Conversation.slack_channel)
                .where(
                    Conversation.team.in_(teams),
                    Conversation.slack_ts.is_not(None),
                    Conversation.slack_channel.is_not(None),
                    Conversation.slack_channel.not_like("#%"),
                )
                .order_by(Conversation.id.desc())
                .limit(1)
            )

    def _card_message(
        self,
        conversation: blocks.CardConversation,
        post: blocks.CardPost | None,
        tz: ZoneInfo,
        now: datetime,
        *,
        compact: bool,
    ) -> blocks.Message:
        if compact:
            return blocks.storm_entry(conversation, post, ctx_policy=self.ctx.policy, now=now, tz=tz)
        return blocks.Message(
            text=blocks.card_text(conversation, post, ctx_policy=self.ctx.policy, now=now, tz=tz),
            blocks=blocks.conversation_card(conversation, post, ctx_policy=self.ctx.policy, now=now, tz=tz),
        )

    def _store_card(
        self,
        conversation_id: int,
        channel: str,
        ts: str,
        *,
        now: datetime,
        thread_ts: str | None,
        replacing: str | None = None,
        settle_outbox_id: int | None = None,
    ) -> bool:
        """Remember where the card is (compare-and-set); True if this call stored it.

        `settle_outbox_id` is another conversation's ``card`` row, claimed by a storm: it is
        marked sent in the same transaction.
        """
        if replacing is None and settle_outbox_id is None:
            with loop_autocommit() as connection:
                if connection is not None:
                    # PostgreSQL, in the send loop: the compare-and-set and its audit event in one
                    # statement (atomic by itself), one round trip.
                    card = {
                        "card_conversation_id": conversation_id,
                        "card_channel": channel,
                        "card_ts": ts,
                        "card_at": now,
                        "card_detail": {"channel": channel, "ts": ts, "thread_ts": thread_ts},
                    }
                    following = self._next_card(conversation_id)
                    if following is None:
                        return connection.execute(_store_card_statement(), card).first() is not None
                    return self._store_and_read(connection, card, following, now)
        with self._card_writer() as connection:
            result = connection.execute(
                _card_set_statement(replacing is not None),
                {
                    "card_conversation_id": conversation_id,
                    "card_channel": channel,
                    "card_ts": ts,
                    "card_replacing": replacing,
                },
            )
            stored = bool(result.rowcount)
            if stored:
                connection.execute(
                    _EVENT_INSERT,
                    {
                        "conversation_id": conversation_id,
                        "at": now,
                        "actor": "slack",
                        "action": CARD_EVENT,
                        "detail": {"channel": channel, "ts": ts, "thread_ts": thread_ts},
                    },
                )
            if settle_outbox_id is not None:
                connection.execute(
                    update(Outbox)
                    .where(Outbox.id == settle_outbox_id, Outbox.status == SENDING)
                    .values(
                        status=SENT,
                        sent_at=now,
                        result=f"storm entry {channel} {ts}",
                        lease_until=None,
                        last_error=None,
                    )
                )
        return stored

    @contextmanager
    def _card_writer(self) -> Iterator[Connection]:
        """A connection in a transaction for a card's writes (bot.flow.outbox.loop_transaction: the
        send loop's writer, statements built once, no ORM layer, commit relaxed on PostgreSQL: a
        card lost with a database crash is posted again, at least once)."""
        with loop_transaction(self.ctx) as connection:
            yield connection

    # ----------------------------------------------------------------------------------------
    # Storms

    def _storm_params(self, outbox_id: int, owner: str | None, now: datetime) -> dict[str, Any]:
        """Parameters of `_storm_candidates` and `_new_card_query` for this card."""
        return {
            "storm_outbox_id": outbox_id,
            "storm_owner": owner,
            # Cards put off by the pacer (due at their slot, up to its horizon) wait for the
            # channel as much as cards due now: they join the next digest rather than keep
            # a slot each.
            "storm_horizon": now + max(self.storm_window, PUT_OFF_HORIZON),
            "storm_since": now - STORM_MEMORY,
        }

    def _channel_of(self, team: Any) -> Any:
        """SQL: the Slack channel of a conversation's `team` column (from the policy)."""
        return case({name: t.channel for name, t in self.ctx.policy.teams.items()}, value=team, else_=None)

    def _read_new_card(
        self, message: OutboxMessage, conversation_id: int, post_id: int | None, now: datetime
    ) -> _NewCard | None:
        """What a new card needs, in one statement of plain columns: the conversation's card columns,
        its post, whether a storm summary was posted lately, and how many other cards of its channel
        would join a storm now (counted up to the storm threshold). None: no such conversation, or its post is not there (the ORM
        path finds the first one)."""
        with loop_reader(self.ctx) as connection:
            row = connection.execute(
                self._new_card_query(), self._new_card_params(message, conversation_id, post_id, now)
            ).first()
        return None if row is None else self._new_card_of(row)

    def _new_card_params(
        self, message: OutboxMessage, conversation_id: int, post_id: int | None, now: datetime
    ) -> dict[str, Any]:
        """Parameters of `_new_card_query` for the card of `message`."""
        return {
            **self._storm_params(message.id, message.owner, now),
            "card_conversation_id": conversation_id,
            "card_post_id": post_id,
            "storm_cap": max(self.storm_threshold, 0),
        }

    @staticmethod
    def _new_card_of(row: Sequence[Any]) -> _NewCard | None:
        """A row of `_new_card_query` as a `_NewCard`; None when its conversation or post is missing."""
        size, post_size = len(_CardConversation._fields), len(_CardPost._fields)
        if row[0] is None or row[size + 1] is None:  # the conversation's id, the post's
            return None
        return _NewCard(
            conversation=_CardConversation._make(row[:size]),
            post=_CardPost._make(row[size + 2 : size + 2 + post_size]),
            slack_ts=row[size],
            stormy=bool(row[-2]),
            waiting=int(row[-1] or 0),
        )

    def _next_card(self, conversation_id: int) -> tuple[OutboxMessage, int, int | None] | None:
        """The send loop's next row, its conversation and post, when it is a new card of another
        conversation than `conversation_id` (one whose read `_store_and_read` can make)."""
        following = next_in_batch() if self.ctx.policy.teams else None
        if following is None or following.kind != "card":
            return None
        try:
            next_conversation = _conversation_id(following)
        except SlackDeliveryError:
            return None
        if next_conversation == conversation_id:
            return None
        post_id = following.payload.get("post_id")
        return following, next_conversation, post_id if isinstance(post_id, int) else None

    def _store_and_read(
        self,
        connection: Connection,
        stored: Mapping[str, Any],
        following: tuple[OutboxMessage, int, int | None],
        now: datetime,
    ) -> bool:
        """Store a card (`_store_card_statement`'s parameters `stored`) and read the next card's data
        (`_read_new_card` for `following`) in one statement, one round trip; the read is kept for
        the next card's handler (bot.flow.outbox.keep_ahead). True if this call stored the card.

        The read is the one that card would make next anyway, after this store and before its own
        post, nothing between but the send loop's bookkeeping: the same answer, a round trip
        earlier. One difference the statement itself makes up for: its parts share a snapshot,
        so the read does not see this store; its storm count leaves out the conversation stored
        (once stored, it is posted; were it stored already, it would not be counted either).
        """
        message, next_conversation, post_id = following
        row = connection.execute(
            self._new_card_query(after_store=True),
            {
                **{f"stored_{name.removeprefix('card_')}": value for name, value in stored.items()},
                **self._new_card_params(message, next_conversation, post_id, now),
            },
        ).one()
        keep_ahead(message.id, _ReadAhead(next_conversation, self._new_card_of(row[1:])))
        return bool(row[0])

    def _new_card_query(self, *, after_store: bool = False) -> Select[Any]:
        """The statement of `_read_new_card` (Core, on the tables: no ORM entities), built once.

        `after_store` (PostgreSQL): a card's store first, then this read, in one statement (see
        `_store_and_read`): its first column says whether the card was stored, the others are
        this read's (all NULL when there is no such conversation)."""
        if after_store:
            if self._store_and_read_select is None:
                self._store_and_read_select = self._build_store_and_read()
            return self._store_and_read_select
        if self._card_select is None:
            self._card_select = self._build_new_card_query(after_store=False)
        return self._card_select

    def _build_new_card_query(self, *, after_store: bool) -> Select[Any]:
        """`_new_card_query`; `after_store`: its storm count leaves out the conversation
        ``stored_conversation_id`` (stored in the same statement, see `_store_and_read`)."""
        conversations: Table = Conversation.__table__  # type: ignore[assignment]
        posts: Table = Post.__table__  # type: ignore[assignment]
        outbox: Table = Outbox.__table__  # type: ignore[assignment]
        events: Table = Event.__table__  # type: ignore[assignment]
        other, other_conversation = outbox.alias("other"), conversations.alias("other_conversation")
        # Counted up to the storm threshold (one more would not change the decision): a
        # backlog of thousands of cards costs each of them a few rows, not all of them.
        others = (
            select(other.c.id)
            .join(other_conversation, other_conversation.c.id == other.c.conversation_id)
            .where(
                other.c.kind == "card",
                or_(
                    other.c.status == sql_constant(PENDING),  # ix_outbox_pending
                    and_(
                        other.c.status == sql_constant(SENDING),
                        other.c.owner == bindparam("storm_owner"),
                    ),
                ),
                other.c.id != bindparam("storm_outbox_id"),
                other.c.next_attempt_at <= bindparam("storm_horizon"),
                other_conversation.c.slack_ts.is_(None),
                self._channel_of(other_conversation.c.team) == self._channel_of(conversations.c.team),
            )
            .correlate(conversations)
            .limit(bindparam("storm_cap"))
        )
        if after_store:
            others = others.where(other.c.conversation_id != bindparam("stored_conversation_id"))
        waiting = select(func.count()).select_from(others.subquery("others")).scalar_subquery()
        recent = (
            select(events.c.id)
            # ix_events_storm: the constant in the SQL text lets the planner use the partial index
            .where(events.c.action == sql_constant(STORM_EVENT), events.c.at >= bindparam("storm_since"))
            .exists()
        )
        columns: list[Any] = [
            *(conversations.c[name] for name in _CardConversation._fields),
            conversations.c.slack_ts,
            posts.c.id,
            *(posts.c[name] for name in _CardPost._fields),
            recent,
            waiting,
        ]
        return (
            select(*columns)
            .select_from(conversations)
            .outerjoin(posts, posts.c.id == bindparam("card_post_id"))
            .where(conversations.c.id == bindparam("card_conversation_id"))
        )

    def _build_store_and_read(self) -> Select[Any]:
        """`_new_card_query(after_store=True)`: `_store_card_statement` (its parameters named
        ``stored_*``) as common table expressions, then the read, one row whatever it finds."""
        logged = _card_store("stored").cte("logged")
        counted = select(func.count().label("stored")).select_from(logged).subquery("counted")
        read = self._build_new_card_query(after_store=True).subquery("next_card")
        return select(counted.c.stored, *read.c).select_from(counted.outerjoin(read, true()))

    def _storm_state(
        self, session: Session, conversation: Conversation, message: OutboxMessage, now: datetime
    ) -> tuple[_Storm | None, int]:
        """A storm summary this card belongs to, if any; else how many other cards for this channel
        would join a storm now (see `_claim_storm`). One query in the usual case (no recent storm)."""
        if self.ctx.policy.teams.get(conversation.team) is None:
            return None, 0
        found = session.execute(
            _storm_state_query(message.owner is not None),
            {
                **self._storm_params(message.id, message.owner, now),
                "storm_teams": self._same_channel(conversation),
            },
        ).one()
        stormy, count = found[0], found[1]
        storm = self._storm_covering(session, conversation.id, now) if stormy else None
        return storm, 0 if storm is not None else int(count or 0)

    def _same_channel(self, conversation: Conversation) -> list[str]:
        team = self.ctx.policy.teams[conversation.team]
        return [name for name, other in self.ctx.policy.teams.items() if other.channel == team.channel]

    def _claim_storm(
        self, conversation: Conversation, outbox_id: int, now: datetime, *, owner: str | None = None
    ) -> list[tuple[int, int]]:
        """Claim the other pending cards for this channel, due within the window, if they make a storm.

        They are claimed as the outbox sender claims (``sending`` with a lease, ``SKIP LOCKED``
        on PostgreSQL), so no other sender posts them meanwhile, and a crash hands them back.
        Cards this sender claimed in its batch and has not tried yet join too: the send loop is
        told they are taken over (bot.flow.outbox.taken_over) and skips them.

        Returns:
            (outbox id, conversation id) of the claimed rows; empty when there is no storm.
        """
        if self.ctx.policy.teams.get(conversation.team) is None:
            return []
        with loop_session(self.ctx) as session, session.begin():
            query, params = self._storm_rows(session, select(Outbox), conversation, outbox_id, owner, now)
            rows = [row for row in session.scalars(query, params) if row.conversation_id is not None]
            if len(rows) + 1 <= self.storm_threshold:
                return []
            for row in rows:
                if row.status == PENDING:
                    row.attempts += 1
                row.status = SENDING
                row.lease_until = now + DEFAULT_LEASE
                row.owner = owner  # the claiming sender: its death hands them back within seconds
            taken_over(row.id for row in rows)
            return [(row.id, int(row.conversation_id or 0)) for row in rows]

    def _storm_rows(
        self,
        session: Session,
        columns: Select[Any],
        conversation: Conversation,
        outbox_id: int,
        owner: str | None,
        now: datetime,
    ) -> tuple[Select[Any], dict[str, Any]]:
        """The other cards of this conversation's channel that a storm takes (`columns` of them, locked
        on PostgreSQL, ``SKIP LOCKED``), oldest due first, and the statement's parameters."""
        query = (
            columns.where(_storm_candidates(owner is not None))
            .order_by(Outbox.next_attempt_at, Outbox.id)
            .limit(MAX_STORM - 1)
        )
        if is_postgres(session):
            query = query.with_for_update(skip_locked=True, of=Outbox)
        params = {
            **self._storm_params(outbox_id, owner, now),
            "storm_teams": self._same_channel(conversation),
        }
        return query, params

    def _put_off_storm(
        self, conversation: Conversation, outbox_id: int, now: datetime, until: datetime
    ) -> int:
        """Make the other pending cards of this channel's storm (as `_claim_storm` would take them) due
        at `until`, the channel's next free moment: whichever of them comes first then takes the
        rest into one digest. Returns how many."""
        with loop_session(self.ctx) as session, session.begin():
            query, params = self._storm_rows(session, select(Outbox.id), conversation, outbox_id, None, now)
            ids = list(session.scalars(query, params))
            if ids:
                relaxed_commit(session)
                session.execute(
                    update(Outbox)
                    .where(Outbox.id.in_(ids), Outbox.status == PENDING)
                    .values(next_attempt_at=until)
                    .execution_options(synchronize_session=False)
                )
            return len(ids)

    def _storm_covering(self, session: Session, conversation_id: int, now: datetime) -> _Storm | None:
        """A recent storm summary that lists this conversation (its entry is still to be posted)."""
        recent = session.scalars(
            select(Event)
            .where(Event.action == sql_constant(STORM_EVENT), Event.at >= now - STORM_MEMORY)
            .order_by(Event.id.desc())
        )
        for event in recent:
            detail = event.detail
            if conversation_id in detail.get("conversations", ()):
                return _Storm(
                    channel=str(detail["channel"]), ts=str(detail["ts"]), digest=bool(detail.get("digest"))
                )
        return None

    def _post_storm(self, first: _Loaded, claimed: list[tuple[int, int]], now: datetime) -> str:
        """ONE message in the channel for the whole storm (`blocks.storm_digest`: a line and a Claim
        button per conversation), stored as every one of its conversations' card.

        The digest, its ``slack_storm`` audit event, every conversation's card (compare-and-set, as
        `_store_card`) and the claimed rows' settlement are one transaction. If the post fails,
        the claimed rows go back to ``pending`` (due when Slack said, on a rate limit).
        """
        unposted = [outbox_id for outbox_id, _ in claimed]
        resume_at = now
        posted = False
        try:
            with loop_session(self.ctx, read_only=True) as session:
                others = self._load_many(session, [cid for _, cid in claimed])
            everyone = [first, *others]
            ids = [m.conversation.id for m in everyone]
            team_channel = self._team_channel(first.conversation)
            digest = blocks.storm_digest(
                team_channel,
                [(m.conversation, m.post) for m in everyone],
                ctx_policy=self.ctx.policy,
                now=now,
            )
            try:
                channel, ts = self._post(
                    digest,
                    channel=team_channel,
                    conversation_id=first.conversation.id,
                    metadata=_digest_metadata(ids),
                    group=True,
                )
            except Retry as error:
                # Slack failed (not paced): the rows it carried back off as the one that failed does,
                # rather than come straight back to fail again.
                resume_at = error.after or now + backoff(1)
                raise
            posted = True
            self._store_storm(channel, ts, ids, [outbox_id for outbox_id, _ in claimed], now=now)
            unposted = []
        finally:
            # Posted but not recorded (the database went away): the claim counts as an attempt,
            # so their retry looks the digest up (by its metadata) instead of posting again.
            self._release(unposted, resume_at, keep_attempt=posted)
        log.info("storm digest posted", extra={"channel": channel, "ts": ts, "cards": len(everyone)})
        return f"storm {channel} {ts}: {len(everyone)} conversations in one message"

    def _store_storm(
        self, channel: str, ts: str, conversation_ids: list[int], outbox_ids: list[int], *, now: datetime
    ) -> list[int]:
        """Record a posted digest as the card of each of its conversations (those without a card yet);
        settle the other claimed ``card`` rows. Returns the conversations stored."""
        stored: list[int] = []
        with loop_session(self.ctx) as session, session.begin():
            repo.record_event(
                session=session,
                at=now,
                actor="slack",
                action=STORM_EVENT,
                channel=channel,
                ts=ts,
                conversations=conversation_ids,
                digest=True,
            )
            stored = list(
                session.scalars(
                    update(Conversation)
                    .where(Conversation.id.in_(conversation_ids), Conversation.slack_ts.is_(None))
                    .values(slack_channel=channel, slack_ts=ts, version=Conversation.version + 1)
                    .returning(Conversation.id)
                    .execution_options(synchronize_session=False)
                )
            )
            for conversation_id in stored:
                repo.record_event(
                    session=session,
                    at=now,
                    actor="slack",
                    action=CARD_EVENT,
                    conversation_id=conversation_id,
                    channel=channel,
                    ts=ts,
                    thread_ts=None,
                    digest=conversation_ids,
                )
            if outbox_ids:
                session.execute(
                    update(Outbox)
                    .where(Outbox.id.in_(outbox_ids), Outbox.status == SENDING)
                    .values(
                        status=SENT,
                        sent_at=now,
                        result=f"storm digest {channel} {ts}",
                        lease_until=None,
                        last_error=None,
                    )
                    .execution_options(synchronize_session=False)
                )
        missed = sorted(set(conversation_ids) - set(stored))
        if missed:
            log.warning(
                "storm digest lists conversations whose card was already stored",
                extra={"channel": channel, "ts": ts, "conversations": missed},
            )
        return stored

    def _release(self, outbox_ids: list[int], when: datetime, *, keep_attempt: bool = False) -> None:
        """Hand storm-claimed rows back to the outbox, due at `when` (their claim was no attempt,
        unless `keep_attempt`: their card may have been posted)."""
        if not outbox_ids:
            return
        with loop_session(self.ctx) as session, session.begin():
            session.execute(
                update(Outbox)
                .where(Outbox.id.in_(outbox_ids), Outbox.status == SENDING)
                .values(
                    status=PENDING,
                    lease_until=None,
                    owner=None,
                    next_attempt_at=when,
                    attempts=Outbox.attempts
                    if keep_attempt
                    else func.greatest(Outbox.attempts - 1, 0)
                    if is_postgres(session)
                    else func.max(Outbox.attempts - 1, 0),
                )
                .execution_options(synchronize_session=False)
            )

    def _post_storm_entry(
        self, loaded: _Loaded, storm: _Storm, now: datetime, *, outbox_id: int | None
    ) -> str:
        conversation = loaded.conversation
        built = self._card_message(loaded.conversation, loaded.post, loaded.tz, now, compact=True)
        channel, ts = self._post(
            built,
            channel=storm.channel,
            thread_ts=storm.ts,
            conversation_id=conversation.id,
            metadata=_card_metadata(conversation.id),
        )
        if not self._store_card(
            conversation.id, channel, ts, now=now, thread_ts=storm.ts, settle_outbox_id=outbox_id
        ):
            log.warning(
                "card posted twice: another sender stored one first",
                extra={"conversation_id": conversation.id, "channel": channel, "ts": ts},
            )
        return ts

    # ----------------------------------------------------------------------------------------
    # Overdue and reminder digests

    def _overdue_digest(
        self, message: OutboxMessage, loaded: _Loaded, now: datetime, *, alone: bool = False
    ) -> str | None:
        """Post this breach, escalation or warning notice together with the others of its channel that
        are due (or were put off by the channel's pace) as ONE overdue digest; None when it is alone
        (unless `alone`: its card is not posted yet, and a notice waits for no card, so it goes as
        a top-level digest of one).

        After the post, the digest's transaction also records each conversation's ``slack_overdue``
        event, retires their other pending warnings and queues the card edits of the breached ones
        (``card_update``, which a storm digest folds)."""
        conversation = loaded.conversation
        if self.ctx.policy.teams.get(conversation.team) is None:
            return None
        channel = self._team_channel(conversation)

        def build(
            shown: list[_Loaded], step: Mapping[int, str], more: int, rows: list[tuple[int, str, int]]
        ) -> blocks.Message:
            return blocks.overdue_digest(
                channel,
                [blocks.OverdueItem(m.conversation, m.post, m.tz, step[m.conversation.id]) for m in shown],
                ctx_policy=self.ctx.policy,
                now=now,
            )

        group = _Group(
            name="overdue digest",
            channel=channel,
            kinds=OVERDUE_KINDS,
            metadata_type=OVERDUE_METADATA_TYPE,
            find=lambda session, lock: self._overdue_rows(session, message, conversation, now, lock=lock),
            build=build,
            record=self._record_overdue,
        )
        return self._digest(message, loaded, now, group, alone=alone)

    def _reminder_digest(
        self, message: OutboxMessage, loaded: _Loaded, owner: Expert, now: datetime
    ) -> str | None:
        """Post this nag together with the other nags for the same person that are due (or were put
        off by their DM's pace) as ONE reminder digest by DM; None when it is alone.

        At Slack's one message a second per channel, a storm's nags for one owner would otherwise
        queue behind each other in their DM, each later than the one before."""
        conversation = loaded.conversation
        channel = self._dm_channel(owner, conversation.id)
        expert_id = next(key for key, expert in self.ctx.policy.experts.items() if expert is owner)

        def build(
            shown: list[_Loaded], step: Mapping[int, str], more: int, rows: list[tuple[int, str, int]]
        ) -> blocks.Message:
            return blocks.reminder_digest(
                [blocks.OverdueItem(m.conversation, m.post, m.tz, "nag") for m in shown], now=now, more=more
            )

        group = _Group(
            name="reminder digest",
            channel=channel,
            kinds=("nag",),
            metadata_type=REMINDER_METADATA_TYPE,
            find=lambda session, lock: self._nag_rows(session, message, expert_id, now, lock=lock),
            build=build,
            record=None,
        )
        return self._digest(message, loaded, now, group)

    def _follow_up_digest(self, message: OutboxMessage, loaded: _Loaded, now: datetime) -> str | None:
        """Post this follow-up ("wrote again") together with the others due for conversations of the
        same storm digest as ONE reply in the digest's thread; None when it is alone.

        A storm's customers write again too (the storm bench: one post in ten): one reply each, at
        Slack's one message a second per channel, took more of a storm channel's minutes than all
        its cards and overdue notices together."""
        conversation = loaded.conversation
        channel, ts = str(conversation.slack_channel), str(conversation.slack_ts)

        def build(
            shown: list[_Loaded], step: Mapping[int, str], more: int, rows: list[tuple[int, str, int]]
        ) -> blocks.Message:
            with loop_session(self.ctx, read_only=True) as session:
                post_of = {
                    outbox_id: payload.get("post_id")
                    for outbox_id, payload in session.execute(
                        select(Outbox.id, Outbox.payload).where(Outbox.id.in_([row[0] for row in rows]))
                    )
                    if isinstance(payload, dict)
                }
                wanted = [post_id for post_id in post_of.values() if isinstance(post_id, int)]
                posts = {post.id: post for post in session.scalars(select(Post).where(Post.id.in_(wanted)))}
            follow_ups: dict[int, list[Post | None]] = {}
            for outbox_id, _, cid in sorted(rows):
                post_id = post_of.get(outbox_id)
                follow_ups.setdefault(cid, []).append(
                    posts.get(post_id) if isinstance(post_id, int) else None
                )
            return blocks.follow_up_digest(
                [(m.conversation, follow_ups.get(m.conversation.id, [])) for m in shown],
                ctx_policy=self.ctx.policy,
                now=now,
                more=more,
            )

        group = _Group(
            name="follow-up digest",
            channel=channel,
            kinds=("thread_post",),
            metadata_type=FOLLOW_UP_METADATA_TYPE,
            find=lambda session, lock: self._follow_up_rows(session, message, channel, ts, now, lock=lock),
            build=build,
            record=None,
            thread_ts=loaded.card_parent_ts or ts,
        )
        return self._digest(message, loaded, now, group)

    def _digest(
        self, message: OutboxMessage, loaded: _Loaded, now: datetime, group: _Group, *, alone: bool = False
    ) -> str | None:
        """Post `message` with the other rows `group` finds as ONE message to `group.channel`; None
        when there are none (the message then goes alone, as always), unless `alone` (then the
        digest carries `message` only).

        The other rows are claimed as the sender claims (``sending`` with a lease and this sender as
        owner, ``SKIP LOCKED`` on PostgreSQL); rows of this sender's batch not tried yet are taken
        over (its send loop skips them). When the channel's pace is spent, the rows wait together
        for its next free moment (one statement; no slot promised to each). After the post one
        transaction marks every row of the digest sent (this one too) with what `group.record`
        adds; a failed post hands the claimed rows back, due when Slack's pace allows.
        """
        conversation = loaded.conversation
        with loop_session(self.ctx, read_only=True) as session:
            if not group.find(session, False) and not alone:
                return None  # alone
        ready = self._ready(group.channel)
        claimed: list[tuple[int, str, int]] = []
        with loop_session(self.ctx) as session, session.begin():
            rows = group.find(session, True)
            if rows and ready is not None:
                session.execute(
                    update(Outbox)
                    .where(Outbox.id.in_([row[0] for row in rows]), Outbox.status == PENDING)
                    .values(next_attempt_at=ready)
                    .execution_options(synchronize_session=False)
                )
            elif rows:
                session.execute(
                    update(Outbox)
                    .where(Outbox.id.in_([row[0] for row in rows]))
                    .values(
                        status=SENDING,
                        attempts=case((Outbox.status == PENDING, Outbox.attempts + 1), else_=Outbox.attempts),
                        lease_until=now + DEFAULT_LEASE,
                        owner=message.owner,
                    )
                    .execution_options(synchronize_session=False)
                )
                taken_over(row[0] for row in rows)
                claimed = rows
        if ready is not None:
            raise Defer(
                f"Slack chat.postMessage to {group.channel}: paced until {ready.isoformat()} "
                f"with {len(rows)} more rows for its {group.name}",
                after=ready,
            )
        if not claimed and not alone:
            return None
        claimed_ids = [row[0] for row in claimed]
        step = {conversation.id: message.kind}
        order = [conversation.id]
        seen = {conversation.id}
        for _, kind, cid in claimed:
            if cid not in seen:
                order.append(cid)
                seen.add(cid)
            if _STEP_ORDER.get(kind, 0) > _STEP_ORDER.get(step.get(cid, kind), 0):
                step[cid] = kind
            step.setdefault(cid, kind)
        resume_at = now
        posted = False
        try:
            # A message shows MAX_STORM conversations at most (a reminder digest may carry more:
            # one line then says how many).
            cap = MAX_STORM if len(order) <= MAX_STORM else MAX_STORM - 1
            with loop_session(self.ctx, read_only=True) as session:
                shown = [loaded, *self._load_many(session, order[1:cap])]
            built = group.build(
                shown, step, len(order) - len(shown), [(message.id, message.kind, conversation.id), *claimed]
            )
            kinds: dict[str, list[int]] = {kind: [] for kind in group.kinds}
            kinds[message.kind].append(conversation.id)
            for _, kind, cid in claimed:
                kinds[kind].append(cid)
            try:
                posted_channel, ts = self._post(
                    built,
                    channel=group.channel,
                    thread_ts=group.thread_ts,
                    conversation_id=conversation.id,
                    metadata={"event_type": group.metadata_type, "event_payload": kinds},
                    group=True,
                )
            except Retry as error:
                # Slack failed (not paced): the rows it carried back off as the one that failed does,
                # rather than come straight back to fail again.
                resume_at = error.after or now + backoff(1)
                raise
            posted = True
            result = f"{group.name} {posted_channel} {ts}"
            # Posted: its record must not be lost to a database that blinks now (the rows would go
            # back and the digest be posted again), so wait for the database as the outbox does.
            patiently(
                functools.partial(
                    self._store_digest,
                    message,
                    group,
                    shown,
                    claimed_ids,
                    kinds,
                    posted_channel,
                    ts,
                    result,
                    now,
                ),
                f"database unavailable: {group.name} posted, not recorded yet, retrying",
                {
                    "conversation_id": conversation.id,
                    "outbox_id": message.id,
                    "status": SENT,
                    "rows": len(claimed) + 1,
                },
            )
            claimed_ids = []
        finally:
            self._release(claimed_ids, resume_at, keep_attempt=posted)
        log.info(
            f"{group.name} posted",
            extra={
                "conversation_id": conversation.id,
                "channel": posted_channel,
                "ts": ts,
                "conversations": len(order),
                "notices": len(claimed) + 1,
            },
        )
        return result

    def _waiting_rows(
        self,
        session: Session,
        message: OutboxMessage,
        now: datetime,
        *where: ColumnElement[bool],
        order_by: tuple[Any, ...] = (Outbox.next_attempt_at, Outbox.id),
        limit: int,
        lock: bool,
    ) -> list[Any]:
        """(id, kind, conversation id, payload, status) of the other rows `where` picks that a digest
        may take with `message`: pending (or ``sending`` for this very sender: its batch's rows),
        not `message` itself, and due now or put off by the pace (up to its horizon; a row backing
        off after a failure only once due again). In `order_by`, at most `limit`; with `lock`,
        locked on PostgreSQL (``SKIP LOCKED``: another sender's digest has them)."""
        pending = Outbox.status == sql_constant(PENDING)  # ix_outbox_pending
        query = (
            select(Outbox.id, Outbox.kind, Outbox.conversation_id, Outbox.payload, Outbox.status)
            .where(
                or_(
                    pending,
                    and_(Outbox.status == sql_constant(SENDING), Outbox.owner == message.owner),
                )
                if message.owner is not None
                else pending,
                Outbox.id != message.id,
                or_(
                    Outbox.next_attempt_at <= now,
                    and_(Outbox.next_attempt_at <= now + PUT_OFF_HORIZON, Outbox.last_error.is_(None)),
                ),
                *where,
            )
            .order_by(*order_by)
            .limit(limit)
        )
        if lock and is_postgres(session):
            query = query.with_for_update(skip_locked=True, of=Outbox)
        return list(session.execute(query))

    def _take(
        self,
        found: Iterator[Any],
        conversation_id: int,
        keep: Callable[[str, Any], bool] = lambda kind, payload: True,
        *,
        most: int = MAX_STORM,
    ) -> list[tuple[int, str, int]]:
        """(outbox id, kind, conversation id) of the rows a digest takes from `found` (id, kind,
        conversation id, payload, status): pending, or in this sender's batch and not tried yet
        (bot.flow.outbox.untried_in_batch), for at most `most` conversations in all
        (`conversation_id`'s counts)."""
        taken: list[tuple[int, str, int]] = []
        conversations = {conversation_id}
        untried = untried_in_batch()
        for outbox_id, kind, cid, payload, status in found:
            if status == SENDING and outbox_id not in untried:
                continue  # tried in this batch already: the send loop records its outcome
            if cid is None or not keep(str(kind), payload):
                continue
            if cid not in conversations:
                if len(conversations) >= most:
                    continue
                conversations.add(cid)
            taken.append((int(outbox_id), str(kind), int(cid)))
        return taken

    def _overdue_rows(
        self,
        session: Session,
        message: OutboxMessage,
        conversation: Conversation,
        now: datetime,
        *,
        lock: bool = False,
    ) -> list[tuple[int, str, int]]:
        """The other breach, escalation and warning notices for this channel that an overdue digest
        takes, of open conversations. Escalations only when they go to the team channel (DMs are
        other channels)."""
        found = self._waiting_rows(
            session,
            message,
            now,
            Outbox.kind.in_([sql_constant(kind) for kind in OVERDUE_KINDS]),
            _of_conversation(Conversation.team, Conversation.status == OPEN).in_(
                self._same_channel(conversation)
            ),
            limit=OVERDUE_SCAN,
            lock=lock,
        )
        return self._take(
            iter(found),
            conversation.id,
            lambda kind, payload: (
                kind != "escalation"
                or (_text((payload or {}).get("notify")) or "team_channel") == "team_channel"
            ),
        )

    def _nag_rows(
        self, session: Session, message: OutboxMessage, expert_id: str, now: datetime, *, lock: bool = False
    ) -> list[tuple[int, str, int]]:
        """The other nags a reminder digest takes: those of open conversations that `expert_id`
        has claimed, or owns while nobody has claimed them (where the nag handler sends them), up
        to REMINDER_FOLD: one DM reminds a person of all that is due, however many (it shows
        MAX_STORM and says how many more), so that their nags never queue behind each other at
        their DM's one message a second."""
        person = _of_conversation(
            func.coalesce(Conversation.claimed_by, Conversation.owner), Conversation.status == OPEN
        )
        found = self._waiting_rows(
            session,
            message,
            now,
            Outbox.kind == sql_constant("nag"),
            person == expert_id,
            limit=REMINDER_FOLD,
            lock=lock,
        )
        return self._take(iter(found), _conversation_id(message), most=REMINDER_FOLD)

    def _follow_up_rows(
        self,
        session: Session,
        message: OutboxMessage,
        channel: str,
        ts: str,
        now: datetime,
        *,
        lock: bool = False,
    ) -> list[tuple[int, str, int]]:
        """The other follow-ups a follow-up digest takes: thread posts of conversations whose card is
        the same storm digest, each in its conversation's order: one waits while an earlier message
        of its conversation's lane that the digest does not take is unsent (as the outbox claim
        has it; earlier follow-ups of the conversation taken along keep their order in the reply)."""
        earlier = aliased(Outbox)
        found = self._waiting_rows(
            session,
            message,
            now,
            Outbox.kind == sql_constant("thread_post"),
            _of_conversation(Conversation.slack_ts, Conversation.slack_channel == channel) == ts,
            order_by=(Outbox.id,),
            limit=OVERDUE_SCAN,
            lock=lock,
        )
        if not found:
            return []
        # What else of their lanes is unsent before them (kinds that hold nothing back aside).
        blocking = session.execute(
            select(earlier.id, earlier.conversation_id).where(
                earlier.conversation_id.in_({row[2] for row in found}),
                earlier.status.in_((PENDING, SENDING)),
                earlier.kind.not_in((*CUSTOMER_KINDS, *HOLDS_NOTHING_BACK)),
                earlier.id != message.id,
            )
        )
        candidates = {int(row[0]) for row in found}
        first_blocked: dict[int, int] = {}
        for outbox_id, cid in blocking:
            if (
                cid is not None
                and outbox_id not in candidates
                and outbox_id < first_blocked.get(cid, outbox_id + 1)
            ):
                first_blocked[cid] = outbox_id
        in_order = (row for row in found if row[0] < first_blocked.get(row[2], row[0] + 1))
        taken = self._take(in_order, _conversation_id(message))
        # A follow-up whose earlier one was found but not taken (tried in this batch, past the cap)
        # waits for it.
        kept: list[tuple[int, str, int]] = []
        stopped: set[int] = set()
        taken_ids = {row[0] for row in taken}
        for row in found:
            outbox_id, cid = int(row[0]), int(row[2])
            if cid in stopped:
                continue
            if outbox_id in taken_ids:
                kept.append((outbox_id, str(row[1]), cid))
            else:
                stopped.add(cid)
        return kept

    def _store_digest(
        self,
        message: OutboxMessage,
        group: _Group,
        shown: list[_Loaded],
        claimed_ids: list[int],
        kinds: Mapping[str, list[int]],
        channel: str,
        ts: str,
        result: str,
        now: datetime,
    ) -> None:
        """Record a posted digest: one transaction for every row and conversation in it."""
        with loop_session(self.ctx) as session, session.begin():
            mine = and_(Outbox.id == message.id, Outbox.status == SENDING)
            if message.owner is not None:
                mine = and_(mine, Outbox.owner == message.owner)
            session.execute(
                update(Outbox)
                .where(or_(mine, and_(Outbox.id.in_(claimed_ids), Outbox.status == SENDING)))
                .values(
                    status=SENT, sent_at=now, result=result, lease_until=None, owner=None, last_error=None
                )
                .execution_options(synchronize_session=False)
            )
            if group.record is not None:
                group.record(session, shown, kinds, channel, ts, result, now)

    def _record_overdue(
        self,
        session: Session,
        shown: list[_Loaded],
        kinds: Mapping[str, list[int]],
        channel: str,
        ts: str,
        result: str,
        now: datetime,
    ) -> None:
        """What an overdue digest records besides its rows: each conversation's ``slack_overdue``
        event, the retirement of their other pending warnings, the card edits of the breached."""
        ids = [m.conversation.id for m in shown]
        for loaded in shown:
            cid = loaded.conversation.id
            repo.record_event(
                session=session,
                at=now,
                actor="slack",
                action=OVERDUE_EVENT,
                conversation_id=cid,
                channel=channel,
                ts=ts,
                kinds=[kind for kind, listed in kinds.items() if cid in listed],
                digest=ids,
            )
        # A warning still unsent is moot once the deadline passed and staff were told.
        session.execute(
            update(Outbox)
            .where(
                Outbox.conversation_id.in_(ids),
                Outbox.kind == "warning",
                Outbox.status == PENDING,
            )
            .values(status=RETIRED, result=f"retired: superseded by {result}", lease_until=None)
            .execution_options(synchronize_session=False)
        )
        for loaded in shown:
            conversation = loaded.conversation
            if conversation.slack_ts is None or conversation.id not in kinds["breach"]:
                continue  # its card, when posted, shows it overdue; a warning leaves the card as is
            queue_card_refresh(session, conversation, "overdue", now)

    # ----------------------------------------------------------------------------------------
    # Reading

    def _read(self, message: OutboxMessage) -> _Loaded:
        with loop_session(self.ctx, read_only=True) as session:
            return self._load(session, _conversation_id(message))

    def _load(self, session: Session, conversation_id: int, *, post_id: object = None) -> _Loaded:
        """One conversation (`_load_many`), showing post `post_id` when it is there, else its first."""
        [loaded] = self._load_many(session, [conversation_id])
        post = session.get(Post, post_id) if isinstance(post_id, int) else None
        return loaded if post is None else dataclasses.replace(loaded, post=post)

    def _load_many(self, session: Session, conversation_ids: list[int]) -> list[_Loaded]:
        """Conversations with what their messages need: each one's first customer post, time zone and
        the storm summary its card is threaded under. Three statements, whatever their number (a
        digest's 49 conversations took 147 round trips one by one), in the order given.

        Raises:
            SlackDeliveryError: one of them is not found.
        """
        if not conversation_ids:
            return []
        ids = list(dict.fromkeys(conversation_ids))
        conversations = {
            c.id: c for c in session.scalars(select(Conversation).where(Conversation.id.in_(ids)))
        }
        first = (
            select(
                Post.id.label("post_id"),
                func.row_number()
                .over(partition_by=Post.conversation_id, order_by=(Post.posted_at, Post.id))
                .label("n"),
            )
            .where(Post.conversation_id.in_(ids), Post.direction == "in")
            .subquery()
        )
        posts = {
            p.conversation_id: p
            for p in session.scalars(
                select(Post).join(first, Post.id == first.c.post_id).where(first.c.n == 1)
            )
        }
        carded = [cid for cid, c in conversations.items() if c.slack_ts is not None]
        details: dict[int, Any] = {}
        if carded:
            last = (
                select(
                    Event.conversation_id.label("conversation_id"),
                    Event.detail.label("detail"),
                    func.row_number()
                    .over(partition_by=Event.conversation_id, order_by=Event.id.desc())
                    .label("n"),
                )
                .where(Event.conversation_id.in_(carded), Event.action == CARD_EVENT)
                .subquery()
            )
            details = {
                row.conversation_id: row.detail
                for row in session.execute(select(last.c.conversation_id, last.c.detail).where(last.c.n == 1))
            }
        missing = [cid for cid in ids if cid not in conversations]
        if missing:
            raise SlackDeliveryError(f"conversation {missing[0]} not found")
        return [
            self._loaded_from(conversations[cid], posts.get(cid), details.get(cid))
            for cid in conversation_ids
        ]

    def _loaded_from(self, conversation: Conversation, post: Post | None, detail: Any) -> _Loaded:
        """A `_Loaded` from its parts: `detail` is the conversation's last card event's detail."""
        parent: str | None = None
        digest: tuple[int, ...] = ()
        if (
            conversation.slack_ts is not None
            and isinstance(detail, dict)
            and detail.get("ts") == conversation.slack_ts
        ):
            parent = _text(detail.get("thread_ts"))
            listed = detail.get("digest")
            if isinstance(listed, list):
                digest = tuple(item for item in listed if isinstance(item, int))
        return _Loaded(
            conversation=conversation,
            post=post,
            tz=self._team_tz(conversation.team),
            card_parent_ts=parent,
            card_digest=digest,
        )

    def _team_tz(self, team_name: str) -> ZoneInfo:
        """The time zone of `team_name`'s calendar (UTC for a team no longer in the policy)."""
        team = self.ctx.policy.teams.get(team_name)
        return self.ctx.calendar(team.calendar).tz if team is not None else UTC

    def _expert(self, who: str | None) -> Expert | None:
        if not who:
            return None
        key = who.removeprefix("expert:")
        return self.ctx.policy.experts.get(key) or next(
            (e for e in self.ctx.policy.experts.values() if e.slack_id == key), None
        )

    def _team_channel(self, conversation: blocks.CardConversation) -> str:
        team = self.ctx.policy.teams.get(conversation.team)
        if team is None:
            raise SlackDeliveryError(
                f"conversation {conversation.id}: team {conversation.team!r} is not configured"
            )
        return team.channel

    # ----------------------------------------------------------------------------------------
    # Sending

    def _thread_reply(
        self, loaded: _Loaded, built: blocks.Message, *, broadcast: bool = False, paced: bool = True
    ) -> str:
        conversation = loaded.conversation
        if conversation.slack_ts is None or conversation.slack_channel is None:
            raise Retry(f"card of conversation {conversation.id} not posted yet")
        channel, ts = self._post(
            built,
            channel=conversation.slack_channel,
            # A storm entry is itself a thread reply: Slack wants the thread's parent here.
            thread_ts=loaded.card_parent_ts or conversation.slack_ts,
            broadcast=broadcast,
            conversation_id=conversation.id,
            paced=paced,
        )
        return f"thread {channel} {ts}"

    def _note(self, loaded: _Loaded, text: str) -> None:
        """Best effort: a line of history in the card's thread (the DM it records already went)."""
        try:
            # Its DM went already: a note is never deferred (that would repeat the DM); it still
            # counts against the channel's pace, and a 429 just loses the note.
            self._thread_reply(loaded, blocks.thread_note(text), paced=False)
        except (Retry, SlackDeliveryError) as error:
            log.warning(
                "thread note not posted",
                extra={"conversation_id": loaded.conversation.id, "error": str(error)},
            )

    def _dm(self, expert: Expert, built: blocks.Message, conversation_id: int | None) -> str:
        channel, ts = self._post(
            built, channel=self._dm_channel(expert, conversation_id), conversation_id=conversation_id
        )
        return f"dm {channel} {ts}"

    def _dm_channel(self, expert: Expert, conversation_id: int | None) -> str:
        """The id of `expert`'s DM channel with the app. It does not change: opened once per process
        (conversations.open is a workspace-wide tier of ~50 a minute, which a storm's nags would
        spend at once)."""
        channel_id = self._dm_channels.get(expert.slack_id)
        if channel_id is None:
            opened = self._call(
                "conversations.open",
                expert.slack_id,
                conversation_id,
                lambda: self.client.conversations_open(users=expert.slack_id),
            )
            channel_id = self._dm_channels[expert.slack_id] = str(opened["channel"]["id"])
        return channel_id

    def _post(
        self,
        built: blocks.Message,
        *,
        channel: str,
        conversation_id: int | None,
        thread_ts: str | None = None,
        broadcast: bool = False,
        metadata: dict[str, Any] | None = None,
        paced: bool = True,
        group: bool = False,
    ) -> tuple[str, str]:
        """chat.postMessage; returns (channel id, ts). Links in our messages never unfurl.

        `group`: the message stands for rows waiting together (a digest): put off, it is told
        when the channel is free, not promised a slot of its own (`Pacer.try_take`)."""
        response = self._call(
            "chat.postMessage",
            channel,
            conversation_id,
            lambda: self.client.chat_postMessage(
                channel=channel,
                text=built.text,
                blocks=built.blocks,
                thread_ts=thread_ts,
                reply_broadcast=True if broadcast else None,
                unfurl_links=False,
                unfurl_media=False,
                parse="none",
                link_names=False,
                metadata=metadata,
            ),
            paced=paced,
            group=group,
        )
        if self.pacer is not None:
            self.pacer.learn(channel, str(response["channel"]))
        return str(response["channel"]), str(response["ts"])

    def _ready(self, channel: str) -> datetime | None:
        """When a post to `channel` at this message's urgency could go (nothing taken, no slot
        promised: a group of rows waiting together needs one moment, not a slot each); None: now."""
        if self.pacer is None:
            return None
        return self.pacer.ready(
            "chat.postMessage", channel, rank=getattr(self._rank, "value", DEFAULT_URGENCY)
        )

    def _paced(self, method: str, channel: str | None) -> None:
        """Defer now if a `method` call to `channel` could not go yet (nothing taken)."""
        rank = getattr(self._rank, "value", DEFAULT_URGENCY)
        ready = self.pacer.ready(method, channel, rank=rank) if self.pacer is not None else None
        if ready is not None:
            raise Defer(f"Slack {method} to {channel}: paced until {ready.isoformat()}", after=ready)

    def _call(
        self,
        method: str,
        channel: str | None,
        conversation_id: int | None,
        call: Callable[[], SlackResponse],
        *,
        paced: bool = True,
        group: bool = False,
    ) -> SlackResponse:
        """Make one Web API call and translate its failure into Retry or SlackDeliveryError.

        With a pacer, a call beyond the pace of its (method, channel) is not made: `Defer`
        says when it may go (unless `paced` is false: then it goes, and counts).
        """
        if self.pacer is not None and not paced:
            self.pacer.spend(method, channel)
        elif self.pacer is not None:
            take = self.pacer.try_take if group else self.pacer.take
            ready = take(method, channel, rank=getattr(self._rank, "value", DEFAULT_URGENCY))
            if ready is not None:
                raise Defer(f"Slack {method} to {channel}: paced until {ready.isoformat()}", after=ready)
        try:
            return call()
        except SlackApiError as error:
            data = getattr(error.response, "data", None)
            code = data.get("error") if isinstance(data, dict) else None
            record_slack_error(method, str(code or f"http_{getattr(error.response, 'status_code', 0)}"))
            raise self._failure(error, method, channel, conversation_id) from error
        except (OSError, http.client.HTTPException) as error:  # timeouts, resets, refused connections
            record_slack_error(method, "unreachable")
            log.warning(
                "Slack unreachable",
                extra={"conversation_id": conversation_id, "method": method, "error": repr(error)},
            )
            raise Retry(f"Slack {method}: {type(error).__name__}: {error}") from error

    def _failure(
        self, error: SlackApiError, method: str, channel: str | None, conversation_id: int | None
    ) -> Exception:
        response = error.response
        status = int(getattr(response, "status_code", 0) or 0)
        data = getattr(response, "data", None)
        code = data.get("error") if isinstance(data, dict) else None
        code = str(code) if code is not None else None
        where = f" to {channel}" if channel else ""
        if status == 429 or code == "ratelimited":
            seconds = _retry_after(getattr(response, "headers", None))
            until = self.ctx.clock.now() + timedelta(seconds=seconds)
            if self.pacer is not None:
                self.pacer.block(method, channel, until)
            log.warning(
                "Slack rate limit",
                extra={
                    "conversation_id": conversation_id,
                    "method": method,
                    "channel": channel,
                    "retry_after": seconds,
                },
            )
            return Defer(f"Slack rate limit on {method}{where}: retry after {seconds} s", until, record=True)
        if status >= 500 or code in RETRYABLE_ERRORS:
            return Retry(f"Slack {method}{where}: HTTP {status} {code or ''}".rstrip())
        hint = PERMANENT_ERRORS.get(code or "")
        if hint is not None:
            log.error(
                "Slack refused the message",
                extra={
                    "conversation_id": conversation_id,
                    "method": method,
                    "channel": channel,
                    "error": code,
                },
            )
            return SlackDeliveryError(f"Slack {method}{where} failed: {code} ({hint})", code)
        return SlackDeliveryError(f"Slack {method}{where} failed: {code or f'HTTP {status}'}", code)


@functools.cache
def _card_set_statement(replacing: bool) -> Any:
    """Store a card's place on its conversation (compare-and-set on ``slack_ts``), built once."""
    expected = (
        Conversation.slack_ts == bindparam("card_replacing") if replacing else Conversation.slack_ts.is_(None)
    )
    return (
        update(Conversation)
        .where(Conversation.id == bindparam("card_conversation_id"), expected)
        .values(
            slack_channel=bindparam("card_channel"),
            slack_ts=bindparam("card_ts"),
            version=Conversation.version + 1,
        )
    )


_EVENT_INSERT = insert(Event)


@functools.cache
def _store_card_statement() -> Any:
    """A card's compare-and-set and its audit event, one statement (PostgreSQL), built once."""
    return _card_store("card")


def _card_store(prefix: str) -> Any:
    """A card's compare-and-set of its `ts` (a common table expression) and its audit event: an
    INSERT .. RETURNING with parameters `prefix`_conversation_id, _channel, _ts, _at, _detail."""
    stored = (
        update(Conversation)
        .where(Conversation.id == bindparam(f"{prefix}_conversation_id"), Conversation.slack_ts.is_(None))
        .values(
            slack_channel=bindparam(f"{prefix}_channel"),
            slack_ts=bindparam(f"{prefix}_ts"),
            version=Conversation.version + 1,
        )
        .returning(Conversation.id)
        .cte("stored")
    )
    return (
        insert(Event)
        .from_select(
            ["conversation_id", "at", "actor", "action", "detail"],
            select(
                stored.c.id,
                bindparam(f"{prefix}_at", type_=Event.at.type),
                literal("slack"),
                literal(CARD_EVENT),
                bindparam(f"{prefix}_detail", type_=Event.detail.type),
            ),
        )
        .returning(Event.id)
    )


@functools.cache
def _storm_candidates(mine: bool) -> ColumnElement[bool]:
    """The WHERE of a storm's other cards (parameters from SlackDelivery._storm_params): this
    channel's cards due within the window, not yet posted, pending or (`mine`) claimed by this
    very sender (in its batch, not tried yet). Built once: it runs for every new card. The card's
    conversation is looked up by its key (`_of_conversation`): as a join, 40-60 ms a statement.
    """
    ready = Outbox.status == sql_constant(PENDING)  # ix_outbox_status_kind / ix_outbox_pending
    claimed = and_(Outbox.status == sql_constant(SENDING), Outbox.owner == bindparam("storm_owner"))
    team_of_unposted = _of_conversation(Conversation.team, Conversation.slack_ts.is_(None))
    return and_(
        Outbox.kind == sql_constant("card"),
        or_(ready, claimed) if mine else ready,
        Outbox.id != bindparam("storm_outbox_id"),
        Outbox.next_attempt_at <= bindparam("storm_horizon"),
        team_of_unposted.in_(bindparam("storm_teams", expanding=True)),
    )


def _of_conversation(column: Any, *where: ColumnElement[bool]) -> Any:
    """SQL: `column` of the outbox row's conversation (NULL unless `where` holds), looked up by its
    key row by row: a correlated scalar subquery, which PostgreSQL's planner never turns into a
    join. The digests' and storms' look-ups for other rows start from the few unsent rows of a kind
    (ix_outbox_status_kind) this way. As joins, PostgreSQL's generic plans, with statistics from
    before a storm, read every conversation of the team (or every open one, for a person's nags)
    for each of them: 40-80 ms a statement in the storm bench, hundreds of times a minute."""
    return (
        select(column)
        .where(Conversation.id == Outbox.conversation_id, *where)
        .correlate(Outbox)
        .scalar_subquery()
    )


@functools.cache
def _storm_state_query(mine: bool) -> Select[Any]:
    """Is there a recent storm summary; how many other cards would join a storm (see above)."""
    recent = (
        select(Event.id)
        .where(
            Event.action == sql_constant(STORM_EVENT), Event.at >= bindparam("storm_since")
        )  # ix_events_storm
        .exists()
    )
    waiting = select(func.count()).select_from(Outbox).where(_storm_candidates(mine)).scalar_subquery()
    return select(recent, waiting)


def _conversation_id(message: OutboxMessage) -> int:
    found = message.conversation_id
    if found is None:
        candidate = message.payload.get("conversation_id")
        found = candidate if isinstance(candidate, int) else None
    if found is None:
        raise SlackDeliveryError(f"{message.kind} row {message.id} names no conversation")
    return found


def _still_open(loaded: _Loaded) -> bool:
    """Reminders about a conversation answered or closed since they were queued are dropped."""
    return loaded.conversation.status == OPEN


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _card_metadata(conversation_id: int) -> dict[str, Any]:
    return {"event_type": CARD_METADATA_TYPE, "event_payload": {"conversation_id": conversation_id}}


def _digest_metadata(conversation_ids: list[int]) -> dict[str, Any]:
    return {"event_type": CARD_METADATA_TYPE, "event_payload": {"conversation_ids": conversation_ids}}


def _card_of(message: Mapping[str, Any]) -> frozenset[int]:
    """The conversations a Slack message is the card of, from its metadata (a card names one, a
    storm digest several); empty when it is not one of our cards."""
    metadata = message.get("metadata")
    if not isinstance(metadata, Mapping) or metadata.get("event_type") != CARD_METADATA_TYPE:
        return frozenset()
    payload = metadata.get("event_payload")
    if not isinstance(payload, Mapping):
        return frozenset()
    one = payload.get("conversation_id")
    several = payload.get("conversation_ids")
    found = {one} if isinstance(one, int) else set()
    if isinstance(several, list):
        found.update(item for item in several if isinstance(item, int))
    return frozenset(found)


def _retry_after(headers: object) -> int:
    """Whole seconds from a Retry-After header (any case; a value or a list of one), else the default."""
    wait = retry_after(header(headers, "Retry-After"), now=datetime.now(UTC))
    return DEFAULT_RETRY_AFTER if wait is None else max(1, int(wait.total_seconds()))
