"""The ``/replyclock`` slash command: mine, queue [team], stats [team], away until <date>, back, help.

Every answer is ephemeral (only the person who typed it sees it) and is the command's own
HTTP answer (``ack(text=...)``): the queries are single indexed reads, well inside Slack's three
seconds. ``away`` and ``back`` commit before answering, so "you are away" is never said about a
change that was not stored. ``queue`` and ``stats`` answer only for the asker's own teams (as
expert, on-call or manager; see `bot.flow.staff.can_read_team`).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from slack_bolt import Ack, App, BoltContext

from bot.core.messages import due_in_words, escape_mrkdwn
from bot.flow import staff
from bot.flow.context import AppContext
from bot.slack.common import commit, discard, expert_of, mention, replyclock_of, session_of
from bot.slack.ids import COMMAND

MAX_LISTED = 25
HELP = "\n".join(
    [
        "*/replyclock* — what you can ask:",
        "• `/replyclock mine` — the conversations you own or claimed, soonest deadline first",
        "• `/replyclock queue [team]` — one of your teams' open conversations (default: your first team)",
        "• `/replyclock stats [team]` — open, overdue, answered this week and the share in time, for one of your teams",
        "• `/replyclock wait N` — conversation N waits on the customer: its clocks pause until they write",
        "• `/replyclock away until YYYY-MM-DD` — get no new conversations through that day",
        "• `/replyclock back` — take new conversations again",
        "• `/replyclock help` — this list",
    ]
)


def register(app: App) -> None:
    """Register the slash command listener."""
    app.command(COMMAND)(handle_replyclock_command)


def handle_replyclock_command(ack: Ack, command: dict[str, Any], context: BoltContext) -> None:
    """Answer ``/replyclock <subcommand>`` ephemerally; anything unknown gets the help."""
    words = str(command.get("text") or "").split()
    verb = words[0].lower() if words else "help"
    arguments = words[1:]
    ctx = replyclock_of(context)
    expert_id = expert_of(context)
    try:
        if verb == "mine":
            text = _mine(context, ctx, expert_id)
        elif verb == "queue":
            text = _queue(context, ctx, expert_id, arguments)
        elif verb == "stats":
            text = _stats(context, ctx, expert_id, arguments)
        elif verb == "wait":
            text = _wait(context, ctx, expert_id, arguments)
        elif verb == "away":
            text = _away(context, ctx, expert_id, arguments)
        elif verb == "back":
            was_away = staff.back(session_of(context), ctx, expert_id, ctx.clock.now())
            commit(context)
            text = (
                "Welcome back: new conversations can come to you again."
                if was_away
                else "You were not away; nothing changed."
            )
        else:
            text = HELP
    except staff.StaffError as error:
        discard(context)
        text = str(error)
    ack(text=text, response_type="ephemeral")


def _tz(ctx: AppContext, expert_id: str) -> ZoneInfo:
    expert = ctx.policy.experts.get(expert_id)
    return ZoneInfo(expert.timezone) if expert else ZoneInfo("UTC")


def _lines(
    ctx: AppContext, items: list[staff.QueueItem], tz: ZoneInfo, now: datetime, *, owners: bool
) -> list[str]:
    lines = []
    for item in items[:MAX_LISTED]:
        flat = " ".join(item.text.split())
        snippet = flat if len(flat) <= 80 else flat[:79] + "\u2026"
        owner = f", {mention(ctx, item.claimed_by or item.owner)}" if owners else ""
        claimed = "" if item.claimed_by else " (unclaimed)"
        lines.append(
            f"• *#{item.conversation_id}* @{escape_mrkdwn(item.author)} [{item.priority}] "
            f"{due_in_words(item.due_at, now, tz)}{owner}{claimed} — \u201c{escape_mrkdwn(snippet)}\u201d"
        )
    if len(items) > MAX_LISTED:
        lines.append(f"…and {len(items) - MAX_LISTED} more.")
    return lines


def _mine(context: BoltContext, ctx: AppContext, expert_id: str) -> str:
    now = ctx.clock.now()
    items = staff.my_queue(session_of(context), expert_id)
    if not items:
        return "Nothing waiting for you. :tada:"
    overdue = sum(item.overdue(now) for item in items)
    head = f"*Your queue*: {len(items)} open" + (f", {overdue} overdue" if overdue else "")
    return "\n".join([head, *_lines(ctx, items, _tz(ctx, expert_id), now, owners=False)])


def _team(ctx: AppContext, expert_id: str, arguments: list[str]) -> str:
    """The team named in `arguments` (default: the expert's first team); only one of their own."""
    if arguments:
        wanted = " ".join(arguments).lstrip("#").casefold()
        for name, team in ctx.policy.teams.items():
            if wanted in (name.casefold(), team.label.casefold(), team.channel.lstrip("#").casefold()):
                staff.require_team_reader(ctx.policy, expert_id, name)
                return name
        known = ", ".join(staff.teams_of(ctx.policy, expert_id)) or "none"
        raise staff.InvalidState(
            f"No team called {escape_mrkdwn(repr(' '.join(arguments)))}. Your teams: {known}."
        )
    mine = staff.teams_of(ctx.policy, expert_id)
    if not mine:
        raise staff.InvalidState("You are in no team; name one: `/replyclock queue <team>`.")
    return mine[0]


def _queue(context: BoltContext, ctx: AppContext, expert_id: str, arguments: list[str]) -> str:
    now = ctx.clock.now()
    team = _team(ctx, expert_id, arguments)
    label = ctx.policy.teams[team].label
    items = staff.team_queue(session_of(context), team)
    if not items:
        return f"*{label}*: nothing open. :tada:"
    overdue = sum(item.overdue(now) for item in items)
    head = f"*{label}*: {len(items)} open" + (f", {overdue} overdue" if overdue else "")
    return "\n".join([head, *_lines(ctx, items, _tz(ctx, expert_id), now, owners=True)])


def _stats(context: BoltContext, ctx: AppContext, expert_id: str, arguments: list[str]) -> str:
    now = ctx.clock.now()
    team = _team(ctx, expert_id, arguments)
    figures = staff.team_stats(session_of(context), ctx, team, now)
    share = figures.within_sla_share
    in_time = (
        "no answers yet this week"
        if share is None
        else f"{share:.0%} within the deadline, {figures.answered_within_sla} of "
        f"{figures.answered_within_sla + figures.breached_this_week}"
    )
    return "\n".join(
        [
            f"*{ctx.policy.teams[team].label}*, this week (since {figures.week_start.astimezone(_tz(ctx, expert_id)):%a %d %b %H:%M}):",
            f"• open: {figures.open} ({figures.overdue} overdue)",
            f"• answered: {figures.answered_this_week} ({in_time})",
            f"• deadlines missed: {figures.breached_this_week}",
            *(
                [
                    f"• resolved within target: {figures.resolved_within_target}, "
                    f"resolution targets missed: {figures.resolution_breached_this_week}"
                ]
                if figures.resolved_within_target or figures.resolution_breached_this_week
                else []
            ),
            f"• closed without reply: {figures.closed_this_week}",
        ]
    )


def _wait(context: BoltContext, ctx: AppContext, expert_id: str, arguments: list[str]) -> str:
    if len(arguments) != 1 or not arguments[0].lstrip("#").isdigit():
        return "Say which conversation: `/replyclock wait 42`."
    conversation_id = int(arguments[0].lstrip("#"))
    close_at = staff.wait_on_customer(session_of(context), ctx, conversation_id, expert_id, ctx.clock.now())
    commit(context)
    closing = (
        f"; closed {close_at.astimezone(_tz(ctx, expert_id)):%a %d %b %H:%M} if they stay silent"
        if close_at
        else ""
    )
    return f"#{conversation_id} waits on the customer: the clocks stand still until they write{closing}."


def _away(context: BoltContext, ctx: AppContext, expert_id: str, arguments: list[str]) -> str:
    words = [word for word in arguments if word.lower() != "until"]
    if len(words) != 1:
        return "Say until when: `/replyclock away until 2026-12-31` (a date, your time zone)."
    try:
        until = date.fromisoformat(words[0])
    except ValueError:
        return f"{escape_mrkdwn(repr(words[0]))} is not a date; write it as YYYY-MM-DD."
    back_at = staff.set_away(session_of(context), ctx, expert_id, until, ctx.clock.now())
    commit(context)
    last_day = (back_at.astimezone(_tz(ctx, expert_id)) - timedelta(seconds=1)).date()
    return (
        f"You are away through {last_day:%A %d %B %Y}: no new conversations come to you until then. "
        "`/replyclock back` ends it early."
    )
