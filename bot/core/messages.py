"""Text that people read: acknowledgements, deadlines in words, and safe customer text."""

from __future__ import annotations

import re
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


# Connector kinds whose author handles the platform itself verifies (an account really has it).
# Anything else (webhook, feed, plug-ins) carries names the customer or integrator typed.
# E-mail display names are typed by the sender (and a forged From would carry them to someone else).
VERIFIED_HANDLE_KINDS = frozenset({"x", "mastodon", "bluesky", "demo"})
# X: 1-15 of [A-Za-z0-9_]; Mastodon: user or user@domain; Bluesky: a domain name. Nothing else
# is ever put after an "@".
_HANDLE = re.compile(
    r"@?(?:[A-Za-z0-9_]{1,30}(?:@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,250}[A-Za-z0-9])?)?"
    r"|[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?){1,10})"
)
# Where a further time phrase was removed, with the brackets around it and the space before it.
_REMOVED = "\x00"
_REMOVED_SPAN = re.compile(r"[ \t]*\([ \t]*\x00[ \t]*\)|[ \t]*\x00")


def _time_phrase(language: str) -> re.Pattern[str]:
    """{due}, {due_in} or {promise} with the language's words before them ("within", "bis")."""
    words = sorted(locale_text.time_words(language), key=len, reverse=True)
    before = "|".join(re.escape(word) for word in words)
    prefix = rf"(?:(?<!\w)(?:{before})\s+)?" if before else ""
    return re.compile(prefix + r"\{(?:due|due_in|promise)\}", flags=re.IGNORECASE)


def _overdue_template(template: str, language: str, wording: str) -> str:
    """The template with its first time phrase replaced by `wording` and the others removed."""
    literal = wording.replace("{", "{{").replace("}", "}}")
    seen = 0

    def replace(_match: re.Match[str]) -> str:
        nonlocal seen
        seen += 1
        return literal if seen == 1 else _REMOVED

    text = _time_phrase(language).sub(replace, template.replace(_REMOVED, ""))
    return _REMOVED_SPAN.sub("", text)


def verified_handle(kind: str, handle: str | None) -> str | None:
    """``@handle`` when `kind` is a platform that verifies handles and `handle` looks like one, else None."""
    if kind not in VERIFIED_HANDLE_KINDS or not handle or not _HANDLE.fullmatch(handle):
        return None
    return handle if handle.startswith("@") else f"@{handle}"


def render_acknowledgement(
    template: str,
    *,
    author: str | None,
    owner: Expert | None,
    team: Team,
    due_at: datetime,
    timezone: ZoneInfo,
    now: datetime,
    language: str = "en",
    greeting: str | None = None,
    overdue_wording: str | None = None,
) -> str:
    """Fill an acknowledgement template (placeholders checked when the policy file was loaded).

    `author` is a verified handle (`verified_handle`) or None, then `greeting` (or, unset, the
    language's own word) stands in: what
    a customer typed as their name never reaches a public reply. `language` is the template's
    language: {due}, {due_in}, {promise} and the word for a missing owner are formatted for it
    (`bot.core.locale_text`), so no English word of ours reaches the customer.

    {promise} is the language's own "by {due}" (``bis Dienstag 12:00 MEZ``). A post already due
    (overdue on arrival) is promised `overdue_wording`, else the language's own "as soon as
    possible": it stands in the first time phrase ({promise}, {due} or {due_in} with the words
    the language puts before them, "innerhalb von", "d'ici"...), and the others go.
    """
    due_label = locale_text.local_due_label(due_at, timezone, language)
    if due_at <= now:
        wording = overdue_wording or locale_text.overdue_wording(language)
        template = _overdue_template(template, language, wording)
    nobody = locale_text.someone(language)
    return template.format(
        author=author or greeting or locale_text.greeting(language),
        owner_first_name=owner.first_name if owner else nobody,
        owner=owner.name if owner else nobody,
        team=team.label,
        due=due_label,
        due_in=locale_text.duration_words(due_at - now, language),
        promise=locale_text.promise_pattern(language).format(due=due_label),
    )
