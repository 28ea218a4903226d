"""Ingest: store a batch of normalised posts and turn them into conversations with deadlines.

Everything one batch causes (posts, conversations, audit events, outbox rows, the connector
cursor) is written in the caller's single transaction: a crash anywhere before the commit
leaves nothing half-done, and re-fetching the same posts afterwards stores each once.

The batch is worked set-wise, because connectors deliver pages of up to a hundred posts and
a statement per post per decision would cost more than the decisions: the posts go in with
one INSERT, what they may belong to (parent posts, threads, the authors' recent
conversations, earlier answers, acknowledgement history) is read with one query each, the
decisions are made in memory in time order, and new conversations, events, outbox rows and
post links are written with one statement each.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Table, bindparam, insert, select, text, update
from sqlalchemy.orm import Session

from bot.core.locale_text import language_candidates
from bot.core.messages import render_acknowledgement, verified_handle
from bot.core.policy import PRIORITIES
from bot.core.routing import Route, choose_owner, classify
from bot.flow.context import AppContext
from bot.flow.conversations import (
    answer,
    deadline_for,
    owner_shift_end,
    policy_of,
    resolution_deadline,
    resume_from_wait,
)
from connectors.base import InboundPost
from storage import repo
from storage.db import is_postgres
from storage.models import (
    ANSWERED,
    CLOSED,
    DEFAULT_URGENCY,
    OPEN,
    URGENCY,
    AckOptOut,
    Conversation,
    Event,
    Outbox,
    Post,
)

log = logging.getLogger("replyclock.ingest")

EVENTS = cast(Table, Event.__table__)
POSTS = cast(Table, Post.__table__)


class _Keep:
    pass


KEEP_CURSOR: Final = _Keep()
ACK_PER_AUTHOR_WINDOW = timedelta(hours=24)
STOP_WORDS = frozenset({"stop", "unsubscribe", "stopp", "arrêter", "arreter"})


@dataclass
class IngestResult:
    """What one batch did."""

    stored: int = 0
    duplicates: int = 0
    opened: list[int] = field(default_factory=list)
    continued: list[int] = field(default_factory=list)
    reopened: list[int] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    ignored: int = 0
    acknowledgements: int = 0
    # The posts this batch stored, by external id, each with its conversation (None: an ignored
    # post, or our own that answers nothing yet).
    conversations: dict[str, int | None] = field(default_factory=dict)


def is_stop_request(text: str) -> bool:
    """True when a customer's whole message asks us to stop writing (e.g. "STOP", "stop!")."""
    words = [w.strip(".,!?;:()[]\"'").casefold() for w in text.split()]
    words = [w for w in words if w and not w.startswith("@")]
    return len(words) == 1 and words[0] in STOP_WORDS


def ingest_batch(
    session: Session,
    ctx: AppContext,
    *,
    account: str,
    posts: Sequence[InboundPost],
    is_own: Callable[[InboundPost], bool],
    cursor: str | _Keep | None = KEEP_CURSOR,
) -> IngestResult:
    """Store `posts` for `account` idempotently and act on the new ones.

    Args:
        session: an open session inside a transaction; the caller commits.
        ctx: the process context (policy, clock, calendars).
        account: the configured account name.
        posts: normalised posts, any order; duplicates (stored before or repeated here) are skipped.
        is_own: tells our own posts (they answer conversations) from customers'.
        cursor: the connector cursor covering these posts, saved in the same transaction.

    Returns:
        Counts and ids of what happened.
    """
    now = ctx.clock.now()
    configured = ctx.policy.accounts.get(account)
    account_row = repo.get_or_create_account(
        session=session, name=account, kind=configured.kind if configured else "unknown"
    )
    result = IngestResult()

    unique: dict[str, InboundPost] = {}
    for post in posts:
        unique.setdefault(post.external_id, post)
    known = repo.existing_external_ids(session=session, account_id=account_row.id, external_ids=unique)
    fresh = sorted((p for p in unique.values() if p.external_id not in known), key=lambda p: p.posted_at)
    result.duplicates = len(posts) - len(fresh)

    if fresh:
        stored = _insert_posts(session, account_row.id, fresh, is_own, now)
        # A concurrent writer may have stored some since we looked: those are duplicates too.
        result.duplicates += len(fresh) - len(stored)
        result.stored = len(stored)
        _Batch(session, ctx, account, account_row.id, now, result).run(stored)
        result.conversations = {
            p.external_id: p.conversation.id if p.conversation is not None else None for p in stored
        }

    if not isinstance(cursor, _Keep):
        repo.save_cursor(session=session, account_id=account_row.id, cursor=cursor, now=now)
    return result


@dataclass
class _Post:
    """A post stored by this batch, with the conversation it turns out to belong to."""

    id: int
    external_id: str
    own: bool
    author_id: str
    author_name: str | None
    author_handle: str | None
    text: str
    language: str | None
    posted_at: datetime
    reply_to: str | None
    thread_key: str | None
    conversation: Conversation | None = None
    acknowledge: bool = True
    automatic: str | None = None
    bounce: bool = False
    team: str | None = None
    priority: str | None = None


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for `name` (the same in every process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def _insert_posts(
    session: Session,
    account_id: int,
    fresh: Sequence[InboundPost],
    is_own: Callable[[InboundPost], bool],
    now: datetime,
) -> list[_Post]:
    candidates = [
        _Post(
            id=0,
            external_id=p.external_id,
            own=is_own(p),
            author_id=p.author_id,
            author_name=p.author_name,
            author_handle=p.author_handle,
            text=p.text,
            language=p.language,
            posted_at=min(p.posted_at, now),
            reply_to=p.reply_to_id,
            thread_key=p.thread_id,
            acknowledge=p.acknowledge,
            team=p.team,
            priority=p.priority,
            automatic=str(p.meta["automatic"]) if p.meta and p.meta.get("automatic") else None,
            bounce=bool(p.meta and p.meta.get("bounce")),
        )
        for p in fresh
    ]
    urls = {p.external_id: p.url for p in fresh}
    metas = {p.external_id: dict(p.meta) if p.meta else None for p in fresh}
    rows = [
        {
            "account_id": account_id,
            "external_id": c.external_id,
            "direction": "out" if c.own else "in",
            "author_id": c.author_id,
            "author_name": c.author_name,
            "author_handle": c.author_handle,
            "text": c.text,
            "url": urls[c.external_id],
            "language": c.language,
            "posted_at": c.posted_at,
            "received_at": now,
            "reply_to_external_id": c.reply_to,
            "thread_key": c.thread_key,
            "meta": metas[c.external_id],
        }
        # In one order everywhere (by id): two batches sharing posts (a re-delivery reaching
        # another process) wait for each other's rows in one direction only, never in a circle.
        for c in sorted(candidates, key=lambda c: c.external_id)
    ]
    statement = repo.insert_ignoring_conflicts(session, Post, ["account_id", "external_id"])
    # The batch's statements go through the session's connection: plain Core executemany, without
    # the ORM's bulk machinery (which only would repeat, row by row, what the columns already say).
    ids = {
        external_id: post_id
        for post_id, external_id in session.connection().execute(
            statement.returning(Post.id, Post.external_id), rows
        )
    }
    stored = []
    for candidate in candidates:
        post_id = ids.get(candidate.external_id)
        if post_id is not None:
            candidate.id = post_id
            stored.append(candidate)
    return stored


@dataclass
class _TeamState:
    """A team's load and round-robin position, read once per batch."""

    load: dict[str, int]
    last: str | None


class _Batch:
    """The decisions for one batch, made in memory over state read once."""

    def __init__(
        self,
        session: Session,
        ctx: AppContext,
        account: str,
        account_id: int,
        now: datetime,
        result: IngestResult,
    ) -> None:
        self.session = session
        self.ctx = ctx
        self.account = account
        self.account_id = account_id
        self.now = now
        self.result = result
        self.gap = ctx.policy.settings.conversation_gap
        self.teams: dict[str, _TeamState] = {}
        self.away: frozenset[str] | None = None  # experts away via /replyclock away, read when first needed
        self.events: list[tuple[Conversation | None, dict[str, Any]]] = []
        self.messages: list[tuple[Conversation, str, str, dict[str, Any]]] = []
        self.links: list[_Post] = []
        self.opened: list[Conversation] = []
        self.continued: list[Conversation] = []
        self.reopened: list[Conversation] = []
        self.answered: list[Conversation] = []

    # -- reading what the batch may touch -------------------------------------------------

    def _serialize(self, posts: list[_Post]) -> None:
        """On PostgreSQL, wait for other transactions storing posts by the same authors or threads.

        Two posts by one customer stored at the same moment (two webhook requests, a poll and a
        webhook) would each read that the other's conversation does not exist yet, and each open
        a conversation and queue an acknowledgement. A transaction-scoped advisory lock per author
        and per thread makes the second wait until the first commits, then read its conversation.
        The locks are taken in one order (sorted keys), so two batches never wait in a circle.
        SQLite needs none: its writers take turns (BEGIN IMMEDIATE).
        """
        if not is_postgres(self.session):
            return
        names = {f"author:{p.author_id}" for p in posts if not p.own}
        names |= {f"thread:{p.thread_key}" for p in posts if not p.own and p.thread_key}
        keys = sorted({_lock_key(f"replyclock:{self.account_id}:{name}") for name in names})
        if keys:
            self.session.execute(
                text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k"),
                {"keys": keys},
            )

    def _prefetch(self, posts: list[_Post]) -> None:
        s, account_id = self.session, self.account_id
        customer = [p for p in posts if not p.own]
        batch_ids = {p.external_id for p in posts}
        reply_ids = {p.reply_to for p in posts if p.reply_to and p.reply_to not in batch_ids}
        self.parents: dict[str, tuple[int | None, bool]] = {}
        for chunk in _chunks(reply_ids):
            for external_id, conversation_id, direction in s.execute(
                select(Post.external_id, Post.conversation_id, Post.direction).where(
                    Post.account_id == account_id, Post.external_id.in_(chunk)
                )
            ):
                self.parents[external_id] = (conversation_id, direction == "out")

        conversations: dict[int, Conversation] = {}
        wanted_ids = {cid for cid, _own in self.parents.values() if cid is not None}
        for chunk in _chunks(wanted_ids):
            for conversation in s.scalars(select(Conversation).where(Conversation.id.in_(chunk))):
                conversations[conversation.id] = conversation
        threads = {p.thread_key for p in posts if p.thread_key}
        for chunk in _chunks(threads):
            for conversation in s.scalars(
                select(Conversation).where(
                    Conversation.account_id == account_id,
                    Conversation.thread_key.in_(chunk),
                    Conversation.status != CLOSED,
                )
            ):
                conversations[conversation.id] = conversation
        authors = {p.author_id for p in customer}
        if customer:
            since = min(p.posted_at for p in customer) - self.gap
            for chunk in _chunks(authors):
                for conversation in s.scalars(
                    select(Conversation).where(
                        Conversation.account_id == account_id,
                        Conversation.author_id.in_(chunk),
                        Conversation.last_customer_post_at >= since,
                        Conversation.status != CLOSED,
                    )
                ):
                    conversations[conversation.id] = conversation
        self.conversations = conversations
        self.by_thread: dict[str, Conversation] = {}
        self.by_author: dict[str, list[Conversation]] = defaultdict(list)
        for conversation in sorted(conversations.values(), key=lambda c: c.id):
            self._index(conversation)

        # Our answers stored before the question they answer (platforms page newest first).
        self.orphans: dict[str, list[_Post]] = defaultdict(list)
        customer_ids = {p.external_id for p in customer}
        for chunk in _chunks(customer_ids):
            for row in s.execute(
                select(
                    Post.id,
                    Post.external_id,
                    Post.reply_to_external_id,
                    Post.posted_at,
                    Post.author_id,
                    Post.author_handle,
                ).where(
                    Post.account_id == account_id,
                    Post.reply_to_external_id.in_(chunk),
                    Post.direction == "out",
                    Post.conversation_id.is_(None),
                )
            ):
                self.orphans[row.reply_to_external_id].append(
                    _Post(
                        row.id,
                        row.external_id,
                        True,
                        row.author_id,
                        None,
                        row.author_handle,
                        "",
                        None,
                        row.posted_at,
                        row.reply_to_external_id,
                        None,
                    )
                )

        self.acked: set[str] = set()
        self.opted_out: set[str] = set()
        for chunk in _chunks(authors):
            self.acked.update(
                s.scalars(
                    select(Conversation.author_id).where(
                        Conversation.account_id == account_id,
                        Conversation.author_id.in_(chunk),
                        Conversation.acknowledged_at >= self.now - ACK_PER_AUTHOR_WINDOW,
                    )
                )
            )
            self.opted_out.update(
                s.scalars(
                    select(AckOptOut.author_id).where(
                        AckOptOut.account_id == account_id, AckOptOut.author_id.in_(chunk)
                    )
                )
            )

    def _index(self, conversation: Conversation) -> None:
        if conversation.thread_key:
            self.by_thread[conversation.thread_key] = conversation
        self.by_author[conversation.author_id].append(conversation)

    # -- deciding, post by post in time order ---------------------------------------------

    def run(self, posts: list[_Post]) -> None:
        self._serialize(posts)
        self._prefetch(posts)
        self.in_batch: dict[str, _Post] = {}
        # New conversations are inserted together in _write, not one by one as queries run.
        with self.session.no_autoflush:
            for post in posts:
                if post.own:
                    self._own(post)
                else:
                    self._customer(post)
                self.in_batch[post.external_id] = post
        self._write()

    def _find(self, post: _Post, *, by_author: bool) -> Conversation | None:
        if post.reply_to:
            parent = self.in_batch.get(post.reply_to)
            found: Conversation | None = None
            if parent is not None:
                found = parent.conversation
            elif post.reply_to in self.parents:
                conversation_id = self.parents[post.reply_to][0]
                found = self.conversations.get(conversation_id) if conversation_id is not None else None
            if found is not None and found.status != CLOSED:
                return found
        if post.thread_key:
            found = self.by_thread.get(post.thread_key)
            if found is not None and found.status != CLOSED:
                return found
        if by_author:
            since = post.posted_at - self.gap
            candidates = [
                c
                for c in self.by_author.get(post.author_id, ())
                if c.status != CLOSED and c.last_customer_post_at >= since
            ]
            if candidates:
                return candidates[-1]  # lists are in creation order: the newest
        return None

    def _replies_to_ours(self, post: _Post) -> bool:
        if not post.reply_to:
            return False
        parent = self.in_batch.get(post.reply_to)
        if parent is not None:
            return parent.own
        return self.parents.get(post.reply_to, (None, False))[1]

    def _own(self, post: _Post) -> None:
        conversation = self._find(post, by_author=False)
        if conversation is None:
            if post.reply_to:
                self.orphans[post.reply_to].append(post)
            return
        self._link(post, conversation)
        if conversation.status == OPEN:
            self._answer(conversation, post)
            later = self._customer_post_after(conversation, post)
            if later is not None:
                # The customer wrote again after this answer, and that post was stored first
                # (platforms page newest first): the answer ends this cycle, the post opens the next.
                self._reopen(conversation, later)

    def _customer_post_after(self, conversation: Conversation, reply: _Post) -> _Post | None:
        """The conversation's earliest stored customer post after `reply`, if one came before it."""
        if conversation.id is None or conversation.last_customer_post_at <= reply.posted_at:
            return None
        row = self.session.execute(
            select(Post.id, Post.external_id, Post.author_id, Post.posted_at)
            .where(
                Post.conversation_id == conversation.id,
                Post.direction == "in",
                Post.posted_at > reply.posted_at,
            )
            .order_by(Post.posted_at, Post.id)
            .limit(1)
        ).first()
        if row is None:
            return None
        return _Post(
            row.id, row.external_id, False, row.author_id, None, None, "", None, row.posted_at, None, None
        )

    def _answer(self, conversation: Conversation, reply: _Post) -> None:
        by = f"account:{reply.author_handle or reply.author_id}"
        answer(conversation, at=reply.posted_at, by=by)
        self.answered.append(conversation)
        self._event(
            conversation,
            "answered",
            actor=by,
            cycle=conversation.cycle,
            response_at=reply.posted_at.isoformat(),
        )
        self._message(conversation, "card_update", f"c{conversation.cycle}:answered", reason="answered")

    def _customer(self, post: _Post) -> None:
        if is_stop_request(post.text):
            if post.author_id not in self.opted_out:
                repo.record_opt_out(
                    session=self.session, account_id=self.account_id, author_id=post.author_id, now=self.now
                )
                self.opted_out.add(post.author_id)
            self._event(None, "ack_opt_out", author=post.author_handle or post.author_id)
        conversation = self._find(post, by_author=True)
        if conversation is not None:
            self._link(post, conversation)
            conversation.last_customer_post_at = max(conversation.last_customer_post_at, post.posted_at)
            # An automatic answer (an out-of-office reply to our answer) is not the customer
            # writing again; a bounce of our answer is (they never got it).
            from_customer = not (post.automatic and not post.bounce)
            if (
                from_customer
                and conversation.waiting_since is not None
                and post.posted_at >= conversation.waiting_since
            ):
                # We were waiting on them: the paused clocks run again.
                waited_since = conversation.waiting_since
                resume_from_wait(self.session, self.ctx, conversation, post.posted_at)
                self._event(conversation, "resumed", waiting_since=waited_since.isoformat())
                if conversation.status == OPEN:
                    conversation.next_action_at = self.now  # the sweep re-plans the ladder
            if conversation.status == ANSWERED and from_customer:
                self._reopen(conversation, post)
            else:
                # An automatic answer (an out-of-office reply to our answer) goes to the thread
                # without reopening; a bounce of our answer reopens: the customer never got it.
                self.continued.append(conversation)
                self._message(conversation, "thread_post", f"post:{post.id}", post_id=post.id)
            return

        route = classify(
            self.ctx.policy,
            account=self.account,
            author_id=post.author_id,
            author_handle=post.author_handle,
            text=post.text,
            language=post.language,
        )
        if not route.ignored and (post.team or post.priority):
            route = self._hinted(route, post)
        if route.ignored:
            self.result.ignored += 1
            self._event(None, "ignored", author=post.author_handle or post.author_id, post_id=post.id)
            return
        conversation = self._open(post, route)
        early = self.orphans.pop(post.external_id, [])
        if early:
            for reply in early:
                self._link(reply, conversation)
            self._answer(conversation, min(early, key=lambda reply: reply.posted_at))
            return
        self._acknowledge(conversation, post)

    def _hinted(self, route: Route, post: _Post) -> Route:
        """The connector's team and priority (an X search hit: the listening team, low priority).

        An unknown team falls back to the rules' choice; an urgent route (a VIP, an outage rule)
        stays urgent.
        """
        team = route.team
        if post.team is not None:
            if post.team in self.ctx.policy.teams:
                team = post.team
            else:
                log.warning(
                    "connector named an unknown team", extra={"team": post.team, "account": self.account}
                )
        priority = route.priority
        if post.priority in PRIORITIES and route.priority != "urgent":
            priority = post.priority
        return replace(route, team=team, priority=priority)

    def _link(self, post: _Post, conversation: Conversation) -> None:
        post.conversation = conversation
        self.links.append(post)

    def _team(self, team: str) -> _TeamState:
        state = self.teams.get(team)
        if state is None:
            state = _TeamState(
                load=repo.open_loads(session=self.session, team=team),
                last=repo.last_assigned(session=self.session, team=team),
            )
            self.teams[team] = state
        return state

    def _open(self, post: _Post, route: Route) -> Conversation:
        ctx, now = self.ctx, self.now
        sla = ctx.policy.policy_for(team=route.team, account=self.account, priority=route.priority)
        deadline = deadline_for(ctx, sla, route.team, post.posted_at, "first")
        state = self._team(route.team)
        if self.away is None:
            self.away = repo.away_experts(session=self.session, now=now)
        choice = choose_owner(
            ctx.policy,
            team=route.team,
            topics=route.topics,
            exclude=self.away,
            at=now,
            load=state.load,
            last_assigned=state.last,
        )
        if choice.expert_id is not None:
            state.load[choice.expert_id] = state.load.get(choice.expert_id, 0) + 1
            state.last = choice.expert_id
        first_action = deadline.warn_at[0] if deadline.warn_at else deadline.due_at
        if sla.claim_within is not None and choice.expert_id is not None:
            first_action = min(first_action, now + sla.claim_within)
        if ctx.policy.teams[route.team].follow_the_sun:
            shift_end = owner_shift_end(ctx, choice.expert_id, now, deadline.due_at)
            if shift_end is not None:
                first_action = min(first_action, shift_end)
        if sla.resolution is not None and sla.resolution < deadline.target:
            # Same clock, same start, same warn_at shares: the resolution ladder's first notice
            # comes before the response ladder's first look, so the sweep plans both now.
            first_action = now
        conversation = Conversation(
            account_id=self.account_id,
            thread_key=post.thread_key or post.external_id,
            author_id=post.author_id,
            author_name=post.author_name,
            author_handle=post.author_handle,
            status=OPEN,
            team=route.team,
            priority=route.priority,
            policy=sla.name,
            route_rule=route.rule,
            owner=choice.expert_id,
            assigned_at=now if choice.expert_id else None,
            opened_at=post.posted_at,
            cycle=0,
            cycle_started_at=post.posted_at,
            clock_started_at=deadline.clock_started_at,
            due_at=deadline.due_at,
            first_due_at=deadline.due_at,
            resolution_due_at=resolution_deadline(ctx, sla, route.team, post.posted_at),
            last_customer_post_at=post.posted_at,
            next_action_at=first_action,
            slack_channel=ctx.policy.teams[route.team].channel,
            warnings_sent=0,
            nag_level=0,
            escalation_step=0,
            reassignments=0,
        )
        self.session.add(conversation)
        self.opened.append(conversation)
        self._index(conversation)
        self._link(post, conversation)
        self._event(
            conversation,
            "opened",
            team=route.team,
            priority=route.priority,
            policy=sla.name,
            rule=route.rule,
            owner=choice.expert_id,
            owner_reason=choice.reason,
            due_at=deadline.due_at.isoformat(),
        )
        self._message(conversation, "card", "card", post_id=post.id)
        return conversation

    def _reopen(self, conversation: Conversation, post: _Post) -> None:
        """A customer wrote again after our answer: a new cycle with the next-response target."""
        sla = policy_of(self.session, self.ctx, conversation)
        deadline = deadline_for(self.ctx, sla, conversation.team, post.posted_at, "next")
        conversation.status = OPEN
        conversation.cycle += 1
        conversation.cycle_started_at = post.posted_at
        conversation.clock_started_at = deadline.clock_started_at
        conversation.due_at = deadline.due_at
        conversation.answered_at = None
        conversation.warnings_sent = 0
        conversation.nag_level = 0
        conversation.escalation_step = 0
        conversation.next_action_at = deadline.warn_at[0] if deadline.warn_at else deadline.due_at
        if self.ctx.policy.teams[conversation.team].follow_the_sun:
            # Hand over at the owner's shift end when it comes before the new deadline.
            shift_end = owner_shift_end(self.ctx, conversation.owner, self.now, deadline.due_at)
            if shift_end is not None:
                conversation.next_action_at = min(conversation.next_action_at, shift_end)
        if conversation.resolution_due_at is not None and not conversation.resolution_breach_sent:
            conversation.next_action_at = self.now  # the sweep plans both ladders afresh
        self.reopened.append(conversation)
        self._event(conversation, "reopened", cycle=conversation.cycle, due_at=deadline.due_at.isoformat())
        self._message(
            conversation, "card_update", f"c{conversation.cycle}:reopened", reason="reopened", post_id=post.id
        )

    def _acknowledge(self, conversation: Conversation, post: _Post) -> None:
        """Queue the automatic acknowledgement when the policy asks and the safeguards allow."""
        ctx = self.ctx
        sla = policy_of(self.session, ctx, conversation)
        configured = ctx.policy.accounts.get(self.account)
        if not sla.acknowledge or configured is None or not configured.can_reply:
            return
        if not post.acknowledge:
            self._event(conversation, "ack_skipped", reason=post.automatic or "the connector said not to")
            return
        if post.author_id in self.acked or post.author_id in self.opted_out or self._replies_to_ours(post):
            return
        team = ctx.policy.teams[conversation.team]
        # The customer's language from the platform, else the team's; the template found decides
        # the locale of its dates and durations.
        choice = ctx.policy.acknowledgement_choice(
            team=team.name, languages=language_candidates(post.language, team.language)
        )
        if choice is None:
            return
        language, template = choice
        owner = ctx.policy.experts.get(conversation.owner) if conversation.owner else None
        text = render_acknowledgement(
            template,
            author=verified_handle(configured.kind, post.author_handle),
            greeting=ctx.policy.settings.ack_greeting,
            overdue_wording=ctx.policy.settings.ack_overdue_wording,
            owner=owner,
            team=team,
            due_at=self._promise(conversation),
            timezone=ctx.calendar(team.calendar).tz,
            now=self.now,
            language=language,
        )
        conversation.acknowledged_at = self.now
        self.acked.add(post.author_id)
        self.result.acknowledgements += 1
        self._message(conversation, "ack", "ack", post_id=post.id, account=self.account, text=text)
        self._event(conversation, "ack_queued")

    def _promise(self, conversation: Conversation) -> datetime:
        """The time to promise: the deadline, or the owner's forecast where the team asks for it."""
        if not self.ctx.policy.teams[conversation.team].forecast_ack:
            return conversation.due_at
        from bot.sim.forecast import forecast_for

        found = forecast_for(
            self.session, self.ctx.policy, conversation, self.now, calendar_of=self.ctx.expert_calendar
        )
        return conversation.due_at if found is None else found.promised

    # -- writing it all ---------------------------------------------------------------------

    def _event(
        self, conversation: Conversation | None, action: str, *, actor: str = "system", **detail: Any
    ) -> None:
        self.events.append(
            (conversation, {"at": self.now, "actor": actor, "action": action, "detail": detail})
        )

    def _message(self, conversation: Conversation, kind: str, key: str, **payload: Any) -> None:
        self.messages.append((conversation, kind, key, payload))

    def _write(self) -> None:
        session = self.session
        session.flush()  # new conversations get their ids (one multi-row INSERT), changed ones are updated
        connection = session.connection()
        if self.events:
            connection.execute(
                insert(EVENTS),
                [{**row, "conversation_id": c.id if c is not None else None} for c, row in self.events],
            )
        if self.messages:
            connection.execute(
                repo.insert_ignoring_conflicts(session, Outbox, ["idempotency_key"]),
                [
                    {
                        "kind": kind,
                        "conversation_id": c.id,
                        "payload": {"conversation_id": c.id, **payload},
                        "idempotency_key": f"conv:{c.id}:{key}",
                        "status": "pending",
                        "urgency": URGENCY.get(kind, DEFAULT_URGENCY),
                        "attempts": 0,
                        "created_at": self.now,
                        "next_attempt_at": self.now,
                    }
                    for c, kind, key, payload in self.messages
                ],
            )
            # Steps still waiting to be sent for a conversation this batch answered are moot now,
            # and of several card updates of one card only the newest matters.
            repo.retire_ladder(
                session=session,
                conversation_ids=sorted({c.id for c in self.answered}),
                reason="answered first",
                now=self.now,
            )
            repo.supersede_card_updates(
                session=session,
                conversation_ids=sorted({c.id for c, kind, _k, _p in self.messages if kind == "card_update"}),
            )
        links = [
            {"b_id": p.id, "conversation_id": p.conversation.id}
            for p in self.links
            if p.conversation is not None
        ]
        if links:
            connection.execute(update(POSTS).where(POSTS.c.id == bindparam("b_id")), links)
        result = self.result
        result.opened = [c.id for c in self.opened]
        result.continued = [c.id for c in self.continued]
        result.reopened = [c.id for c in self.reopened]
        result.answered = [c.id for c in self.answered]
        for conversation in self.opened:
            log.info(
                "conversation opened",
                extra={
                    "conversation_id": conversation.id,
                    "team": conversation.team,
                    "owner": conversation.owner,
                },
            )


def _chunks(values: set[str] | set[int], size: int = 500) -> list[list[Any]]:
    ordered = list(values)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def conversation_posts(session: Session, conversation_id: int) -> list[Post]:
    """The posts of a conversation, oldest first."""
    return list(
        session.scalars(
            select(Post).where(Post.conversation_id == conversation_id).order_by(Post.posted_at, Post.id)
        )
    )
