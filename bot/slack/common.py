"""What the Slack feature modules share: the request's session, the acting expert, replies.

`bot.slack.app` puts these into the bolt context (its middleware); the feature modules
(actions, commands, home, views) read them through the functions here, so no feature module
imports `bot.slack.app` and the app imports the features without a circle.
"""

from __future__ import annotations

import http.client
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from slack_bolt import BoltContext
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.webhook import WebhookClient
from sqlalchemy.orm import Session

from bot.flow import staff
from bot.flow.context import AppContext

log = logging.getLogger("replyclock.slack")

DB_SESSION = "db_session"
"""Context key of the request's SQLAlchemy session."""
APP_CONTEXT = "replyclock"
"""Context key of the process's `AppContext`."""
EXPERT_ID = "expert_id"
"""Context key of the acting expert's id (set for clicks, submissions and commands)."""
ON_CHANGE = "replyclock_on_change"

NOT_STAFF = "Only replyclock staff (the teams' experts) can do that. Ask your admin to add you to a team."


def session_of(context: BoltContext) -> Session:
    """The request's database session (opened by `DatabaseSession`)."""
    session = context.get(DB_SESSION)
    if not isinstance(session, Session):
        raise RuntimeError("no database session in the bolt context: was create_bolt_app used?")
    return session


def replyclock_of(context: BoltContext) -> AppContext:
    """The process's policy, clock and database."""
    found = context.get(APP_CONTEXT)
    if not isinstance(found, AppContext):
        raise RuntimeError("no replyclock context in the bolt context: was create_bolt_app used?")
    return found


def expert_of(context: BoltContext) -> str:
    """The acting expert's id (`StaffCheck` refused everyone else)."""
    expert_id = context.get(EXPERT_ID)
    if not isinstance(expert_id, str):
        raise staff.PermissionDenied(NOT_STAFF)
    return expert_id


def commit(context: BoltContext) -> None:
    """Make the request's changes durable now (before telling anyone), then run ``on_change``."""
    session_of(context).commit()
    hook = context.get(ON_CHANGE)
    if callable(hook):
        try:
            hook()
        except Exception:
            log.exception("on_change hook failed")


def discard(context: BoltContext) -> None:
    """Throw away whatever the request changed so far."""
    session_of(context).rollback()


def tell(client: WebClient, body: Mapping[str, Any], text: str) -> None:
    """Show `text` to the person who clicked, and only to them.

    In a channel: an ephemeral message. Elsewhere (the App Home tab has no channel): the
    interaction's ``response_url`` if it has one, else a DM from the app.

    Best effort, whatever the payload holds (a ``user`` that is a bare id, a ``response_url``
    that is no URL): a failure is logged, never raised, so a refusal never becomes a 500.
    """
    user = body.get("user")
    user_id = str((user.get("id") if isinstance(user, dict) else user) or body.get("user_id") or "")
    channel = _object(body.get("channel")).get("id") or _object(body.get("container")).get("channel_id")
    try:
        if isinstance(channel, str) and channel:
            client.chat_postEphemeral(channel=channel, user=user_id, text=text)
            return
        response_url = body.get("response_url")
        if isinstance(response_url, str) and response_url:
            WebhookClient(response_url).send(text=text, response_type="ephemeral", replace_original=False)
            return
        client.chat_postMessage(channel=user_id, text=text)
    except SlackApiError as error:
        log.warning(
            "could not tell the user", extra={"user": user_id, "error": str(error.response.get("error"))}
        )
    except (SlackClientError, OSError, ValueError, http.client.HTTPException) as error:  # bad response_url
        log.warning("could not tell the user", extra={"user": user_id, "error": type(error).__name__})


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def user_timezone(client: WebClient, user_id: str, fallback: str = "UTC") -> ZoneInfo:
    """The Slack member's own time zone (``users.info``), else `fallback`."""
    name = fallback
    try:
        found = client.users_info(user=user_id).get("user") or {}
        name = str(found.get("tz") or fallback)
    except SlackApiError as error:
        log.warning("users.info failed", extra={"user": user_id, "error": str(error.response.get("error"))})
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def clock_time(at: datetime, tz: ZoneInfo, now: datetime) -> str:
    """``10:42`` on the same local day as `now`, else ``Tue 24 Nov 10:42``."""
    local = at.astimezone(tz)
    if local.date() == now.astimezone(tz).date():
        return local.strftime("%H:%M")
    return local.strftime("%a %d %b %H:%M")


def mention(ctx: AppContext, expert_id: str | None) -> str:
    """``<@U...>`` for an expert with a Slack id, else their name (or "nobody")."""
    if expert_id is None:
        return "nobody"
    expert = ctx.policy.experts.get(expert_id)
    if expert is None:
        return expert_id
    return f"<@{expert.slack_id}>" if expert.slack_id else expert.name
