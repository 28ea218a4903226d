"""The App Home tab: the member's own queue, soonest deadline first, and their teams' figures.

Every figure comes from `bot.flow.staff.team_stats`, whose verdicts are those of the one-truth
module `bot.core.sla_outcome` (first response and resolution alike)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from slack_bolt import App, BoltContext
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.core.messages import due_in_words, escape_mrkdwn
from bot.flow import staff
from bot.flow.context import AppContext
from bot.slack.common import replyclock_of, session_of

log = logging.getLogger("replyclock.slack.home")

MAX_ITEMS = 40  # a Home view takes 100 blocks; leave room for the figures
JSON = dict[str, Any]


def register(app: App) -> None:
    """Register the App Home listener."""
    app.event("app_home_opened")(handle_app_home_opened_event)


def handle_app_home_opened_event(event: JSON, context: BoltContext, client: WebClient) -> None:
    """Publish the member's Home tab when they open it."""
    if event.get("tab", "home") != "home":
        return
    user_id = str(event.get("user") or "")
    ctx = replyclock_of(context)
    expert = staff.expert_for_slack_user(ctx.policy, user_id)
    now = ctx.clock.now()
    if expert is None:
        view = not_staff_view()
    else:
        session = session_of(context)
        items = staff.my_queue(session, expert.id)
        figures = [
            staff.team_stats(session, ctx, team, now) for team in staff.teams_of(ctx.policy, expert.id)
        ]
        view = home_view(ctx, items, figures, now=now, tz=ZoneInfo(expert.timezone))
    try:
        client.views_publish(user_id=user_id, view=view)
    except SlackApiError as error:
        log.warning(
            "views.publish failed", extra={"user": user_id, "error": str(error.response.get("error"))}
        )


def _section(text: str) -> JSON:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def not_staff_view() -> JSON:
    """The Home tab for members who are in no team."""
    return {
        "type": "home",
        "blocks": [
            _section(
                "*replyclock* makes sure every customer post gets a human answer on time.\n"
                "You are not in a replyclock team, so there is no queue for you here."
            )
        ],
    }


def home_view(
    ctx: AppContext,
    items: list[staff.QueueItem],
    figures: list[staff.TeamStats],
    *,
    now: datetime,
    tz: ZoneInfo,
) -> JSON:
    """The Home tab of an expert (a pure function of its data).

    Args:
        ctx: the process context (for team labels).
        items: the expert's open conversations, soonest deadline first.
        figures: one entry per team of theirs.
        now: the time the view describes.
        tz: the expert's time zone, for deadlines.
    """
    blocks: list[JSON] = [{"type": "header", "text": {"type": "plain_text", "text": "Your queue"}}]
    if not items:
        blocks.append(_section("Nothing waiting for you. :tada:"))
    for item in items[:MAX_ITEMS]:
        flat = " ".join(item.text.split())
        snippet = flat if len(flat) <= 140 else flat[:139] + "\u2026"
        marker = ":red_circle:" if item.overdue(now) else ":large_blue_circle:"
        claimed = "" if item.claimed_by else " · _unclaimed_"
        blocks.append(
            _section(
                f"{marker} *#{item.conversation_id}* @{escape_mrkdwn(item.author)} · {item.priority} · "
                f"{due_in_words(item.due_at, now, tz)}{claimed}\n\u201c{escape_mrkdwn(snippet)}\u201d"
            )
        )
    if len(items) > MAX_ITEMS:
        blocks.append(_section(f"…and {len(items) - MAX_ITEMS} more: `/replyclock mine` lists them."))
    if figures:
        blocks.append({"type": "divider"})
        blocks.append({"type": "header", "text": {"type": "plain_text", "text": "Your teams"}})
        for team in figures:
            label = ctx.policy.teams[team.team].label if team.team in ctx.policy.teams else team.team
            share = team.within_sla_share
            in_time = (
                "" if share is None else f" · {share:.0%} in time this week, {team.breached_this_week} missed"
            )
            # Resolution (policy `resolution`): the same verdicts as stats, digest, export and metrics.
            resolved = (
                f"\nResolution this week: {team.resolved_within_target} within target, "
                f"{team.resolution_breached_this_week} missed"
                if team.resolved_within_target or team.resolution_breached_this_week
                else ""
            )
            blocks.append(
                _section(
                    f"*{escape_mrkdwn(label)}*: {team.open} open · {team.overdue} overdue{in_time}{resolved}"
                )
            )
    blocks.append(
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": f"Updated {now.astimezone(tz):%a %d %b %H:%M %Z}"}],
        }
    )
    return {"type": "home", "blocks": blocks}
