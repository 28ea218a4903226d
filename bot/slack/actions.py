"""The card's buttons and menus: Claim, Unclaim, Reassign, Reply, Snooze, Mark answered, Close.

Each handler acks at once, does its work in the request's session through bot.flow.staff, commits,
and only then talks to Slack (so no database lock is held across a Web API call). The card
itself is refreshed by the outbox (the ``card_update`` row bot.flow.staff writes with the change);
the person who clicked hears back directly only when something did not happen as they asked
(lost the claim race, refused) or when the card cannot show it (until when it is snoozed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from slack_bolt import Ack, App, BoltContext
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.core.messages import escape_mrkdwn
from bot.flow import staff
from bot.flow.context import AppContext
from bot.slack.blocks import conversation_id_from_block_id, reply_modal
from bot.slack.common import (
    clock_time,
    commit,
    discard,
    expert_of,
    mention,
    replyclock_of,
    session_of,
    tell,
    user_timezone,
)
from bot.slack.ids import (
    ACTION_ANSWERED,
    ACTION_CLAIM,
    ACTION_CLOSE,
    ACTION_REASSIGN,
    ACTION_REPLY,
    ACTION_SNOOZE,
    ACTION_UNCLAIM,
    ACTION_WAIT,
    CLOSE_REASONS,
    SNOOZE_CHOICES,
    parse_conversation_id,
)
from storage.models import CLOSED, Conversation, Post

log = logging.getLogger("replyclock.slack.actions")

Body = dict[str, Any]
_T = TypeVar("_T")
_SLACK_USER = re.compile(r"[UW][A-Z0-9]{2,20}")


def register(app: App) -> None:
    """Register the card's action listeners."""
    app.action(ACTION_CLAIM)(handle_claim_action)
    app.action(ACTION_UNCLAIM)(handle_unclaim_action)
    app.action(ACTION_REASSIGN)(handle_reassign_action)
    app.action(ACTION_REPLY)(handle_reply_action)
    app.action(ACTION_SNOOZE)(handle_snooze_action)
    app.action(ACTION_ANSWERED)(handle_answered_action)
    app.action(ACTION_WAIT)(handle_wait_action)
    app.action(ACTION_CLOSE)(handle_close_action)


# --------------------------------------------------------------------------------------------
# Finding the conversation and running a staff action


def conversation_id_of(session: Session, body: Body) -> int | None:
    """The conversation a click is about, or None when it cannot be told or does not add up.

    Buttons carry the id as their value; menus (whose option values are the choice) sit in the
    card's ``conversation:<id>`` actions block. When the click is on a message that is a stored
    card, the card's own conversation decides: a value or block naming another conversation is
    refused (None), so a button acts only on the conversation of the message it is on. Clicks
    elsewhere (the App Home, a DM) use the value.
    """
    action = _first_action(body)
    claimed = parse_conversation_id(action.get("value"))
    if claimed is None:
        claimed = conversation_id_from_block_id(action.get("block_id"))
    container = _dict(body.get("container"))
    ts = container.get("message_ts") or _dict(body.get("message")).get("ts")
    if not isinstance(ts, str) or not ts:
        return claimed
    channel = container.get("channel_id") or _dict(body.get("channel")).get("id")
    found = list(
        session.execute(
            select(Conversation.id, Conversation.slack_channel).where(Conversation.slack_ts == ts)
        )
    )
    if len(found) > 1:
        found = [row for row in found if row.slack_channel == channel] or found
    if not found:
        return claimed
    if claimed is not None and any(int(row.id) == claimed for row in found):
        return claimed  # a storm digest is the card of each conversation it lists
    card = int(found[0].id)
    if claimed is not None and claimed != card:
        log.warning(
            "a click named another conversation than its card; refused",
            extra={"card": card, "named": claimed, "user": _user_id(body)},
        )
        return None
    return card


def _run(
    context: BoltContext,
    client: WebClient,
    body: Body,
    action: Callable[[Session, AppContext, int, str, datetime], _T],
) -> _T | None:
    """Run one staff action on the clicked conversation and commit; tell the clicker if refused."""
    session = session_of(context)
    ctx = replyclock_of(context)
    conversation_id = conversation_id_of(session, body)
    if conversation_id is None:
        tell(client, body, "I cannot tell which conversation this card is about; it may be an old card.")
        return None
    try:
        result = action(session, ctx, conversation_id, expert_of(context), ctx.clock.now())
    except staff.StaffError as error:
        discard(context)
        tell(client, body, f"#{conversation_id}: {error}")
        return None
    commit(context)
    return result


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _first_action(body: Body) -> dict[str, Any]:
    actions = body.get("actions")
    return _dict(actions[0]) if isinstance(actions, list) and actions else {}


def _selected_option(body: Body) -> str | None:
    value = _dict(_first_action(body).get("selected_option")).get("value")
    return value if isinstance(value, str) else None


def _user_id(body: Body) -> str:
    return str(_dict(body.get("user")).get("id") or "")


# --------------------------------------------------------------------------------------------
# Handlers


def handle_claim_action(ack: Ack, body: Body, context: BoltContext, client: WebClient) -> None:
    """Claim: the first click wins; a later one hears who has it and since when (in their time)."""
    ack()
    result = _run(context, client, body, staff.claim)
    if result is None or result.won:
        return
    ctx = replyclock_of(context)
    user_id = _user_id(body)
    if result.claimed_by is None:
        tell(client, body, f"#{result.conversation_id} is {result.status}: there is nothing to claim.")
        return
    when = ""
    if result.claimed_at is not None:
        expert = ctx.policy.experts.get(expert_of(context))
        tz = user_timezone(client, user_id, fallback=expert.timezone if expert else "UTC")
        when = f" at {clock_time(result.claimed_at, tz, ctx.clock.now())}"
    if result.claimed_by == expert_of(context):
        tell(client, body, f"You already claimed #{result.conversation_id}{when}.")
        return
    tell(
        client,
        body,
        f"#{result.conversation_id} is already claimed by {mention(ctx, result.claimed_by)}{when}.",
    )


def handle_unclaim_action(ack: Ack, body: Body, context: BoltContext, client: WebClient) -> None:
    """Unclaim: give it back to the team (its owner keeps it, unclaimed)."""
    ack()
    _run(context, client, body, staff.unclaim)


def handle_reassign_action(ack: Ack, body: Body, context: BoltContext, client: WebClient) -> None:
    """Reassign (a users_select): the chosen member must be one of the teams' experts."""
    ack()
    ctx = replyclock_of(context)
    selected = _first_action(body).get("selected_user")
    target = staff.expert_for_slack_user(ctx.policy, selected) if isinstance(selected, str) else None
    if target is None:
        who = (
            f"<@{selected}>"
            if isinstance(selected, str) and _SLACK_USER.fullmatch(selected)
            else "That member"
        )
        tell(client, body, f"{who} is not one of replyclock's experts; pick someone from a team.")
        return
    _run(
        context,
        client,
        body,
        lambda session, app_ctx, conversation_id, expert_id, now: staff.reassign(
            session, app_ctx, conversation_id, expert_id, target.id, now
        ),
    )


def handle_reply_action(ack: Ack, body: Body, context: BoltContext, client: WebClient) -> None:
    """Reply: open the reply modal, limited to what the customer's channel takes."""
    ack()
    session = session_of(context)
    ctx = replyclock_of(context)
    conversation_id = conversation_id_of(session, body)
    conversation = session.get(Conversation, conversation_id) if conversation_id is not None else None
    if conversation is None:
        tell(client, body, "I cannot tell which conversation this card is about; it may be an old card.")
        return
    if conversation.status == CLOSED:
        tell(client, body, f"#{conversation.id} is closed; there is nobody to reply to.")
        return
    try:
        staff.require_team_actor(ctx.policy, expert_of(context), conversation)
        limit = staff.reply_limit_for(session, ctx, conversation)
    except staff.StaffError as error:
        tell(client, body, f"#{conversation.id}: {error}")
        return
    post = session.scalars(
        select(Post)
        .where(Post.conversation_id == conversation.id, Post.direction == "in")
        .order_by(Post.posted_at.desc(), Post.id.desc())
        .limit(1)
    ).first()
    if post is None:
        tell(client, body, f"#{conversation.id} has no customer post to answer.")
        return
    view = reply_modal(conversation, post, max_length=limit)
    try:
        client.views_open(trigger_id=body["trigger_id"], view=view)
    except SlackApiError as error:
        log.warning(
            "could not open the reply modal",
            extra={"conversation_id": conversation.id, "error": str(error.response.get("error"))},
        )
        tell(
            client, body, "Slack would not open the reply form (it took too long?); please click Reply again."
        )


def handle_snooze_action(ack: Ack, body: Body, context: BoltContext, client: WebClient) -> None:
    """Snooze (a static_select of durations or "tomorrow"): reminders pause; the deadline stays."""
    ack()
    ctx = replyclock_of(context)
    choice = _selected_option(body)
    if choice not in SNOOZE_CHOICES:
        tell(client, body, f"Unknown snooze choice {escape_mrkdwn(repr(choice))}.")
        return
    assert choice is not None
    until = staff.snooze_until(ctx, expert_of(context), choice, ctx.clock.now())

    def snooze(session: Session, ctx: AppContext, conversation_id: int, expert_id: str, now: datetime) -> int:
        staff.snooze(session, ctx, conversation_id, expert_id, until, now)
        return conversation_id

    done = _run(context, client, body, snooze)
    if done is None:
        return
    expert = ctx.policy.experts.get(expert_of(context))
    tz = user_timezone(client, _user_id(body), fallback=expert.timezone if expert else "UTC")
    tell(
        client,
        body,
        f"Snoozed #{done} until {clock_time(until, tz, ctx.clock.now())}: no reminders until then; "
        "the deadline has not moved.",
    )


def handle_answered_action(ack: Ack, body: Body, context: BoltContext, client: WebClient) -> None:
    """Mark answered: it was answered elsewhere; the response is stamped now and the ladder stops."""
    ack()
    _run(context, client, body, staff.mark_answered)


def handle_wait_action(ack: Ack, body: Body, context: BoltContext, client: WebClient) -> None:
    """Waiting on customer: the response and resolution clocks pause until the customer writes."""
    ack()
    ctx = replyclock_of(context)
    done = _run(context, client, body, lambda s, c, i, e, n: (i, staff.wait_on_customer(s, c, i, e, n)))
    if done is None:
        return
    conversation_id, close_at = done
    expert = ctx.policy.experts.get(expert_of(context))
    tz = user_timezone(client, _user_id(body), fallback=expert.timezone if expert else "UTC")
    closing = f"; closed {clock_time(close_at, tz, ctx.clock.now())} if they stay silent" if close_at else ""
    tell(
        client,
        body,
        f"#{conversation_id} waits on the customer: the clocks stand still until they write{closing}.",
    )


def handle_close_action(ack: Ack, body: Body, context: BoltContext, client: WebClient) -> None:
    """Close (a static_select of reasons): closed without reply, out of the compliance figures."""
    ack()
    reason = _selected_option(body)
    if reason not in CLOSE_REASONS:
        tell(client, body, f"Unknown close reason {escape_mrkdwn(repr(reason))}.")
        return
    assert reason is not None
    _run(
        context,
        client,
        body,
        lambda session, app_ctx, conversation_id, expert_id, now: staff.close(
            session, app_ctx, conversation_id, expert_id, reason, now
        ),
    )
