"""Text that people read: acknowledgements, deadlines in words, and safe customer text."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from bot.core import locale_text
from bot.core.policy import Expert, Team


def escape_mrkdwn(text: str) -> str:
    """Make untrusted text inert in Slack mrkdwn.

    Slack's control sequences all start with ``<`` (``<!channel>``, ``<@U123>``,
    ``<http://evil|bank>``); escaping ``&``, ``<`` and ``>`` as Slack documents turns them
    into plain text that pings nobody.
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def duration_in_words(delta: timedelta) -> str:
    """A short human duration: ``3 h 20 min``, ``2 d 4 h``, ``45 min``, ``under a minute``."""
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return "under a minute"


def due_in_words(due_at: datetime, now: datetime, tz: ZoneInfo) -> str:
    """``due in 3 h 20 min, Tue 14:00`` or ``overdue by 25 min (was due Tue 14:00)``."""
    local = due_at.astimezone(tz).strftime("%a %H:%M")
    if due_at == now:
        return f"due now ({local})"
    if due_at > now:
        return f"due in {duration_in_words(due_at - now)}, {local}"
    return f"overdue by {duration_in_words(now - due_at)} (was due {local})"


def local_time_label(at: datetime, tz: ZoneInfo) -> str:
    """``Tuesday 14:00 CET``: the deadline as a customer reads it in the team's zone."""
    return at.astimezone(tz).strftime("%A %H:%M %Z")


def render_acknowledgement(
    template: str,
    *,
    author: str,
    owner: Expert | None,
    team: Team,
    due_at: datetime,
    timezone: ZoneInfo,
    now: datetime,
    language: str = "en",
) -> str:
    """Fill an acknowledgement template (placeholders checked when the policy file was loaded).

    `language` is the template's language: {due}, {due_in} and the word for a missing owner are
    formatted for it (`bot.core.locale_text`), so no English word of ours reaches the customer.
    """
    handle = author if author.startswith("@") or " " in author else f"@{author}"
    nobody = locale_text.someone(language)
    return template.format(
        author=handle,
        owner_first_name=owner.first_name if owner else nobody,
        owner=owner.name if owner else nobody,
        team=team.label,
        due=locale_text.local_due_label(due_at, timezone, language),
        due_in=locale_text.duration_words(due_at - now, language),
    )
