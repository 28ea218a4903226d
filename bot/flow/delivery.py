"""Outbox handlers: customer messages through connectors; staff messages as readable text.

Until the Slack app is configured, staff messages are rendered as plain text (the demo
prints them as a transcript, `replyclock run` logs them), so nothing is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from bot.core.messages import due_in_words, duration_in_words
from bot.flow.context import AppContext
from bot.flow.outbox import CUSTOMER_KINDS, Handler, OutboxMessage, one_line, patiently
from connectors.base import Connector, NotSent, ReplyTarget
from storage import repo
from storage.models import Account, AckOptOut, Conversation, Post

log = logging.getLogger("replyclock.delivery")

STAFF_KINDS = (
    "card",
    "card_update",
    "thread_post",
    "warning",
    "breach",
    "nag",
    "escalation",
    "reassign",
    "delivery_unknown",
    "delivery_failed",
    "admin_alert",
    "at_risk",
    "resolution_warning",
    "resolution_breach",
)


def customer_handlers(ctx: AppContext, connectors: Mapping[str, Connector]) -> dict[str, Handler]:
    """Handlers that send acknowledgements and replies through the conversation's connector."""

    def send(message: OutboxMessage) -> str | None:
        try:
            return deliver(message)
        except (OperationalError, InterfaceError) as error:
            # Raised before the platform call (after it, nothing touches the database unguarded):
            # nothing was sent, so this is a retry, never an `unknown`.
            raise NotSent(f"database unavailable before the send: {one_line(error)}") from error

    def deliver(message: OutboxMessage) -> str | None:
        with ctx.sessions() as session:
            if message.kind == "ack" and message.conversation_id is not None:
                conversation = session.get(Conversation, message.conversation_id)
                if conversation is not None and conversation.first_response_at is not None:
                    return "skipped: a human answered first"
            post = session.get(Post, message.payload["post_id"])
            if post is None:
                raise NotSent(f"post {message.payload['post_id']} not found")
            if message.kind == "ack" and session.scalar(
                select(AckOptOut.author_id).where(
                    AckOptOut.account_id == post.account_id, AckOptOut.author_id == post.author_id
                )
            ):
                return "skipped: the customer asked us to stop"
            account = session.get(Account, post.account_id)
            assert account is not None
        connector = connectors.get(account.name)
        if connector is None:
            raise NotSent(f"no connector running for account {account.name!r}")
        target = ReplyTarget(
            external_id=post.external_id,
            author_id=post.author_id,
            author_handle=post.author_handle,
            thread_id=post.thread_key,
            extra={**(post.meta or {}), "outbox_kind": message.kind},
        )
        text = str(message.payload["text"])
        external_id = connector.reply(target, text)
        # Sent: from here on a database error must not turn it into a failure. Our own post is
        # stored (retried while the database is away) so that seeing it on the platform later is
        # a duplicate, not a human's answer.
        try:
            patiently(
                lambda: _store_sent(ctx, account.id, post, external_id, text, message),
                "database unavailable: our sent post not stored yet, retrying",
                {"conversation_id": message.conversation_id, "outbox_id": message.id},
            )
        except (OperationalError, InterfaceError) as error:
            log.error(
                "our sent post could not be stored",
                extra={"outbox_id": message.id, "external_id": external_id, "error": one_line(error)},
            )
        return external_id

    return {kind: send for kind in CUSTOMER_KINDS}


def _store_sent(
    ctx: AppContext, account_id: int, parent: Post, external_id: str, text: str, message: OutboxMessage
) -> None:
    """Remember our own post, so seeing it again on the platform is a duplicate, not an answer."""
    now = ctx.clock.now()
    with ctx.sessions() as session, session.begin():
        session.execute(
            repo.insert_ignoring_conflicts(session, Post, ["account_id", "external_id"]).values(
                account_id=account_id,
                external_id=external_id,
                direction="out",
                author_id=f"replyclock:{message.kind}",
                author_name=None,
                author_handle=None,
                text=text,
                url=None,
                language=None,
                posted_at=now,
                received_at=now,
                reply_to_external_id=parent.external_id,
                thread_key=parent.thread_key,
                conversation_id=message.conversation_id,
            )
        )


def describe(session: Session, ctx: AppContext, message: OutboxMessage, now: datetime) -> str:
    """One staff message as text: what the Slack app will post, minus the buttons."""
    if message.kind == "admin_alert":
        return f"{message.payload.get('channel') or 'admins'}: ALERT {message.payload.get('text')}"
    conversation = session.get(Conversation, message.conversation_id) if message.conversation_id else None
    if conversation is None:
        return f"[{message.kind}] {dict(message.payload)}"
    tz = (
        ctx.calendar(ctx.policy.teams[conversation.team].calendar).tz
        if conversation.team in ctx.policy.teams
        else None
    )
    who = _person(ctx, conversation.owner)
    customer = conversation.author_handle or conversation.author_name or conversation.author_id
    due = due_in_words(conversation.due_at, now, tz) if tz else conversation.due_at.isoformat()
    channel = conversation.slack_channel or "?"
    kind = message.kind
    payload = message.payload
    if kind == "card":
        post = session.get(Post, payload.get("post_id"))
        text = post.text if post else ""
        return (
            f"{channel}: new #{conversation.id} from @{customer} [{conversation.priority}] "
            f"\u201c{_clip(text)}\u201d, {due}, owner {who}"
        )
    if kind == "card_update":
        reason = payload.get("reason", "updated")
        if reason == "answered" and conversation.first_response_at:
            took = duration_in_words(conversation.first_response_at - conversation.opened_at)
            return f"{channel}: card #{conversation.id} updated: answered by {conversation.answered_by} after {took}"
        return f"{channel}: card #{conversation.id} updated: {reason}, {due}"
    if kind == "thread_post":
        post = session.get(Post, payload.get("post_id"))
        return f"{channel} thread #{conversation.id}: @{customer} wrote again \u201c{_clip(post.text if post else '')}\u201d"
    if kind == "warning":
        return f"{channel} thread #{conversation.id}: warning to {who}: {due}"
    if kind == "breach":
        return f"{channel} thread #{conversation.id}: DEADLINE MISSED, {due}; owner {who}"
    if kind in ("resolution_warning", "resolution_breach"):
        resolve_by = conversation.resolution_due_at
        words = due_in_words(resolve_by, now, tz) if tz and resolve_by else str(resolve_by)
        if kind == "resolution_warning":
            return f"{channel} thread #{conversation.id}: resolution warning to {who}: {words}"
        return f"{channel} thread #{conversation.id}: RESOLUTION TARGET MISSED, {words}; owner {who}"
    if kind == "nag":
        return f"DM to {who}: #{conversation.id} from @{customer} is {due.split(' (')[0]}; please answer"
    if kind == "escalation":
        target = payload.get("notify")
        if target == "manager":
            return f"DM to manager {_person(ctx, payload.get('manager'))}: #{conversation.id} {due.split(' (')[0]}"
        if target == "on_call":
            return f"DM to on-call {_person(ctx, payload.get('on_call'))}: #{conversation.id} {due.split(' (')[0]}"
        if target == "owner":
            return f"DM to {who}: escalation, #{conversation.id} {due.split(' (')[0]}"
        return (
            f"{channel}: escalation, #{conversation.id} from @{customer} is {due.split(' (')[0]}, owner {who}"
        )
    if kind == "reassign":
        previous = _person(ctx, payload.get("previous_owner"))
        return f"{channel} thread #{conversation.id}: nobody claimed it, offered to {who} (was {previous})"
    if kind == "at_risk":
        return (
            f"{channel} thread #{conversation.id}: AT RISK, forecast to be answered at "
            f"{payload.get('forecast_at')}, after its deadline ({due}); owner {who}"
        )
    if kind in ("delivery_unknown", "delivery_failed"):
        state = "may not have reached" if kind == "delivery_unknown" else "could not be sent to"
        return f"{channel} thread #{conversation.id}: CHECK BY HAND: our {payload.get('kind')} {state} @{customer}"
    return f"[{kind}] #{conversation.id} {dict(payload)}"


def text_handlers(ctx: AppContext, emit: Callable[[str], None]) -> dict[str, Handler]:
    """Handlers that render staff messages as text and pass them to `emit` (print, log)."""

    def handle(message: OutboxMessage) -> str | None:
        with ctx.sessions() as session:
            line = describe(session, ctx, message, ctx.clock.now())
        emit(line)
        return "text"

    return {kind: handle for kind in STAFF_KINDS}


def _person(ctx: AppContext, expert_id: object) -> str:
    if not isinstance(expert_id, str):
        return "nobody"
    expert = ctx.policy.experts.get(expert_id)
    return expert.name if expert else expert_id


def _clip(text: str, limit: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "\u2026"
