"""Ingest: store a batch of normalised posts and turn them into conversations with deadlines.

Everything one batch causes (posts, conversations, audit events, outbox rows, the connector
cursor) is written in the caller's single transaction: a crash anywhere before the commit
leaves nothing half-done, and re-fetching the same posts afterwards stores each once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached

from bot.context import AppContext
from bot.conversations import deadline_for, mark_answered, policy_of
from bot.messages import render_acknowledgement
from bot.routing import Route, choose_owner, classify
from connectors.base import InboundPost
from storage import repo
from storage.models import ANSWERED, CLOSED, OPEN, Conversation, Post

log = logging.getLogger("replyclock.ingest")


class _Keep:
    pass


KEEP_CURSOR: Final = _Keep()
ACK_PER_AUTHOR_WINDOW = timedelta(hours=24)


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


@dataclass
class _TeamState:
    """Per-batch cache of a team's load and round-robin position."""

    load: dict[str, int]
    last: str | None


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
    kind = configured.kind if configured else "unknown"
    account_row = repo.get_or_create_account(session=session, name=account, kind=kind)
    result = IngestResult()

    unique: dict[str, InboundPost] = {}
    for post in posts:
        unique.setdefault(post.external_id, post)
    result.duplicates = len(posts) - len(unique)
    known = repo.existing_external_ids(session=session, account_id=account_row.id, external_ids=unique)
    result.duplicates += len(known)
    fresh = sorted((p for p in unique.values() if p.external_id not in known), key=lambda p: p.posted_at)

    teams: dict[str, _TeamState] = {}
    for inbound in fresh:
        # A concurrent writer may have stored it since we looked: the savepoint keeps the batch intact.
        stored = _store_post(session, account_row.id, inbound, own=is_own(inbound), now=now)
        if stored is None:
            result.duplicates += 1
            continue
        result.stored += 1
        if stored.direction == "out":
            _apply_own_post(session, ctx, stored, account_row.id, now, result)
        else:
            _apply_customer_post(session, ctx, stored, inbound, account, account_row.id, now, teams, result)

    if not isinstance(cursor, _Keep):
        repo.save_cursor(session=session, account_id=account_row.id, cursor=cursor, now=now)
    return result


STOP_WORDS = frozenset({"stop", "unsubscribe", "stopp", "arrêter", "arreter"})


def is_stop_request(text: str) -> bool:
    """True when a customer's whole message asks us to stop writing (e.g. "STOP", "stop!")."""
    words = [w.strip(".,!?;:()[]\"'").casefold() for w in text.split()]
    words = [w for w in words if w and not w.startswith("@")]
    return len(words) == 1 and words[0] in STOP_WORDS


def _store_post(
    session: Session, account_id: int, inbound: InboundPost, *, own: bool, now: datetime
) -> Post | None:
    values: dict[str, Any] = dict(
        account_id=account_id,
        external_id=inbound.external_id,
        direction="out" if own else "in",
        author_id=inbound.author_id,
        author_name=inbound.author_name,
        author_handle=inbound.author_handle,
        text=inbound.text,
        url=inbound.url,
        language=inbound.language,
        posted_at=min(inbound.posted_at, now),
        received_at=now,
        reply_to_external_id=inbound.reply_to_id,
        thread_key=inbound.thread_id,
    )
    statement = (
        repo.insert_ignoring_conflicts(session, Post.__table__, ["account_id", "external_id"])  # type: ignore[arg-type]
        .values(**values)
        .returning(Post.id)
    )
    post_id = session.scalar(statement)
    if post_id is None:
        return None
    post = Post(id=post_id, **values)
    # Attach as already persistent (no SELECT): later changes become plain UPDATEs.
    make_transient_to_detached(post)
    session.add(post)
    return post


def _find_conversation(
    session: Session, ctx: AppContext, post: Post, account_id: int, *, by_author: bool
) -> Conversation | None:
    if post.reply_to_external_id:
        parent = repo.post_by_external_id(
            session=session, account_id=account_id, external_id=post.reply_to_external_id
        )
        if parent is not None and parent.conversation_id is not None:
            conversation = session.get(Conversation, parent.conversation_id)
            if conversation is not None and conversation.status != CLOSED:
                return conversation
    if post.thread_key:
        found = repo.conversation_for_thread(
            session=session, account_id=account_id, thread_key=post.thread_key
        )
        if found is not None:
            return found
    if by_author:
        return repo.recent_conversation_of_author(
            session=session,
            account_id=account_id,
            author_id=post.author_id,
            since=post.posted_at - ctx.policy.settings.conversation_gap,
        )
    return None


def _apply_own_post(
    session: Session, ctx: AppContext, post: Post, account_id: int, now: datetime, result: IngestResult
) -> None:
    conversation = _find_conversation(session, ctx, post, account_id, by_author=False)
    if conversation is None:
        return
    post.conversation_id = conversation.id
    if conversation.status == OPEN:
        mark_answered(
            session,
            conversation,
            at=post.posted_at,
            by=f"account:{post.author_handle or post.author_id}",
            now=now,
        )
        result.answered.append(conversation.id)


def _apply_customer_post(
    session: Session,
    ctx: AppContext,
    post: Post,
    inbound: InboundPost,
    account: str,
    account_id: int,
    now: datetime,
    teams: dict[str, _TeamState],
    result: IngestResult,
) -> None:
    if is_stop_request(post.text):
        repo.record_opt_out(session=session, account_id=account_id, author_id=post.author_id, now=now)
        repo.record_event(
            session=session,
            at=now,
            actor="system",
            action="ack_opt_out",
            author=post.author_handle or post.author_id,
        )
    conversation = _find_conversation(session, ctx, post, account_id, by_author=True)
    if conversation is not None:
        post.conversation_id = conversation.id
        conversation.last_customer_post_at = max(conversation.last_customer_post_at, post.posted_at)
        if conversation.status == ANSWERED:
            _reopen(session, ctx, conversation, post, now)
            result.reopened.append(conversation.id)
        else:
            result.continued.append(conversation.id)
            repo.enqueue(
                session=session,
                kind="thread_post",
                key=f"conv:{conversation.id}:post:{post.id}",
                payload={"conversation_id": conversation.id, "post_id": post.id},
                conversation_id=conversation.id,
                now=now,
            )
        return

    route = classify(
        ctx.policy,
        account=account,
        author_id=inbound.author_id,
        author_handle=inbound.author_handle,
        text=inbound.text,
        language=inbound.language,
    )
    if route.ignored:
        result.ignored += 1
        repo.record_event(
            session=session,
            at=now,
            actor="system",
            action="ignored",
            author=post.author_handle or post.author_id,
            post_id=post.id,
        )
        return
    conversation = _open(session, ctx, post, account, account_id, route, now, teams)
    post.conversation_id = conversation.id
    result.opened.append(conversation.id)
    # Platforms page newest first: our answer may have been stored before the question it answers.
    early = repo.orphan_replies_to(session=session, account_id=account_id, external_id=post.external_id)
    if early:
        for reply in early:
            reply.conversation_id = conversation.id
        first = min(early, key=lambda reply: reply.posted_at)
        mark_answered(
            session, conversation, at=first.posted_at, by=f"account:{first.author_handle or first.author_id}", now=now
        )
        result.answered.append(conversation.id)
        return
    if _acknowledge(session, ctx, conversation, post, account, now):
        result.acknowledgements += 1


def _open(
    session: Session,
    ctx: AppContext,
    post: Post,
    account: str,
    account_id: int,
    route: Route,
    now: datetime,
    teams: dict[str, _TeamState],
) -> Conversation:
    sla = ctx.policy.policy_for(team=route.team, account=account, priority=route.priority)
    deadline = deadline_for(ctx, sla, route.team, post.posted_at, "first")
    state = teams.get(route.team)
    if state is None:
        state = _TeamState(
            load=repo.open_loads(session=session, team=route.team),
            last=repo.last_assigned(session=session, team=route.team),
        )
        teams[route.team] = state
    choice = choose_owner(
        ctx.policy, team=route.team, topics=route.topics, at=now, load=state.load, last_assigned=state.last
    )
    if choice.expert_id is not None:
        state.load[choice.expert_id] = state.load.get(choice.expert_id, 0) + 1
        state.last = choice.expert_id
    first_action = deadline.warn_at[0] if deadline.warn_at else deadline.due_at
    if sla.claim_within is not None and choice.expert_id is not None:
        first_action = min(first_action, now + sla.claim_within)
    conversation = Conversation(
        account_id=account_id,
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
        last_customer_post_at=post.posted_at,
        next_action_at=first_action,
        slack_channel=ctx.policy.teams[route.team].channel,
    )
    session.add(conversation)
    session.flush()
    repo.record_event(
        session=session,
        at=now,
        actor="system",
        action="opened",
        conversation_id=conversation.id,
        team=route.team,
        priority=route.priority,
        policy=sla.name,
        rule=route.rule,
        owner=choice.expert_id,
        owner_reason=choice.reason,
        due_at=deadline.due_at.isoformat(),
    )
    repo.enqueue(
        session=session,
        kind="card",
        key=f"conv:{conversation.id}:card",
        payload={"conversation_id": conversation.id, "post_id": post.id},
        conversation_id=conversation.id,
        now=now,
    )
    log.info(
        "conversation opened",
        extra={"conversation_id": conversation.id, "team": route.team, "owner": choice.expert_id},
    )
    return conversation


def _reopen(session: Session, ctx: AppContext, conversation: Conversation, post: Post, now: datetime) -> None:
    """A customer wrote again after our answer: a new cycle with the next-response target."""
    sla = policy_of(session, ctx, conversation)
    deadline = deadline_for(ctx, sla, conversation.team, post.posted_at, "next")
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
    session.flush()
    repo.record_event(
        session=session,
        at=now,
        actor="system",
        action="reopened",
        conversation_id=conversation.id,
        cycle=conversation.cycle,
        due_at=deadline.due_at.isoformat(),
    )
    repo.enqueue(
        session=session,
        kind="card_update",
        key=f"conv:{conversation.id}:c{conversation.cycle}:reopened",
        payload={"conversation_id": conversation.id, "reason": "reopened", "post_id": post.id},
        conversation_id=conversation.id,
        now=now,
    )


def _acknowledge(
    session: Session, ctx: AppContext, conversation: Conversation, post: Post, account: str, now: datetime
) -> bool:
    """Queue the automatic acknowledgement when the policy asks and the safeguards allow."""
    sla = policy_of(session, ctx, conversation)
    configured = ctx.policy.accounts.get(account)
    if not sla.acknowledge or configured is None or not configured.can_reply:
        return False
    if repo.author_acknowledged_since(
        session=session,
        account_id=conversation.account_id,
        author_id=post.author_id,
        since=now - ACK_PER_AUTHOR_WINDOW,
    ):
        return False
    if repo.has_opted_out(session=session, account_id=conversation.account_id, author_id=post.author_id):
        return False
    if post.reply_to_external_id:
        parent = repo.post_by_external_id(
            session=session, account_id=conversation.account_id, external_id=post.reply_to_external_id
        )
        if parent is not None and parent.direction == "out":
            return False  # answering our own reply: they know someone is on it
    team = ctx.policy.teams[conversation.team]
    template = ctx.policy.acknowledgement_template(team=team.name, language=post.language or team.language)
    if template is None:
        return False
    owner = ctx.policy.experts.get(conversation.owner) if conversation.owner else None
    text = render_acknowledgement(
        template,
        author=post.author_handle or post.author_name or "there",
        owner=owner,
        team=team,
        due_at=conversation.due_at,
        timezone=ctx.calendar(team.calendar).tz,
        now=now,
    )
    conversation.acknowledged_at = now
    repo.enqueue(
        session=session,
        kind="ack",
        key=f"conv:{conversation.id}:ack",
        payload={"conversation_id": conversation.id, "post_id": post.id, "account": account, "text": text},
        conversation_id=conversation.id,
        now=now,
    )
    repo.record_event(
        session=session, at=now, actor="system", action="ack_queued", conversation_id=conversation.id
    )
    return True


def conversation_posts(session: Session, conversation_id: int) -> list[Post]:
    """The posts of a conversation, oldest first."""
    return list(
        session.scalars(
            select(Post).where(Post.conversation_id == conversation_id).order_by(Post.posted_at, Post.id)
        )
    )
