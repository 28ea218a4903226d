"""Load and validate ``replyclock.toml``: the policy file.

`load_policy` reads the file with `tomllib`, checks *everything* and either returns a
`bot.core.policy.Policy` or raises `ConfigError` listing every problem it found, each one
naming the file, the line, the dotted key and what was expected::

    replyclock.toml:14: teams.billing.calendar: unknown calendar 'eu-ofice' (known: eu-office, us-office)

`replyclock check` runs the same validation without starting anything and prints `summarize`.

Schema
======

Durations are strings of ``<number><unit>`` parts with units ``w d h m s``: ``"24h"``,
``"1h30m"``, ``"2d"``, ``"90s"``. Dates are TOML dates (``2026-12-24``) or strings
(``"2026-12-24"``). Names of calendars, experts, teams and accounts are the table keys below
and are how other sections refer to them.

Working hours (``hours``, used by calendars and experts) is a table from days to arrays of
open periods. Days are ``mon tue wed thu fri sat sun`` or a forward range such as
``mon-fri``; a day not listed is closed. A period is ``"HH:MM-HH:MM"`` in local time, the
end may be ``"24:00"``, and the periods of one day must not overlap::

    hours = { mon-fri = ["09:00-12:30", "13:30-17:00"], sat = ["10:00-14:00"] }

Public holidays (``holidays``, for calendars and experts) come from the `holidays` package::

    holidays = { country = "DE", subdivision = "BE" }   # subdivision is optional

``[settings]`` (optional)
    ``conversation_gap``  duration, default ``"24h"``: a post by the same author on the same
    account within this gap continues their open conversation.
    ``default_team``      team for posts that no routing rule matches (default: the first team).
    ``admin_channel``     Slack channel for operational notices (``"#replyclock-admin"``).
    ``ack_greeting``      default ``"there"``: what ``{author}`` becomes when the platform does not
                          verify handles (webhook, feed); a customer-typed name is never used.
    ``ack_overdue_wording`` default ``"as soon as possible"``: replaces the time left in an
                          acknowledgement of a post that arrives already overdue.
    ``cross_team_actions`` boolean, default false: let any expert act on any team's conversation
                          (otherwise only its team, its manager and its on-call).
    ``retention_outbox``  duration or ``"off"``, default ``"30d"``: sent outbox rows are deleted after it.
    ``retention_events``  default ``"365d"``: events of conversations closed or answered that long ago.
    ``retention_text``    default ``"180d"``: customer text (and names) of settled conversations is
                          blanked after it; figures (times, teams, counts) stay.

``[calendars.<name>]``
    ``timezone``  (required) IANA time zone such as ``"Europe/Berlin"``.
    ``hours``     (required) working hours, as above.
    ``holidays``  public holidays, as above.
    ``closed``    array of extra closed dates.
    ``overrides`` table from date to the periods open that day instead of the usual
                  ones (``[]`` = closed): ``{ "2026-12-31" = ["09:00-12:00"] }``.

``[experts.<id>]``
    ``name``       (required) full name; the first word is used in acknowledgements.
    ``slack_id``   (required) Slack member id, starting with ``U`` or ``W``.
    ``timezone``   (required) the expert's own IANA time zone.
    ``hours``      working hours in that zone, default ``mon-fri 09:00-17:00``.
    ``holidays``   the expert's public holidays.
    ``topics``     array of topics the expert prefers (routing rules can set topics).
    ``capacity``   integer >= 1, default 10: open conversations before others are preferred.
    ``away_until`` date; not assigned anything before it.
    ``email``      optional e-mail address.

``[teams.<name>]``
    ``channel``      (required) Slack channel, ``"#care"`` or a channel id ``"C0123ABCD"``.
    ``experts``      (required) array of expert ids.
    ``calendar``     (required) name of a calendar.
    ``on_call``      expert id used when nobody in the team is on duty.
    ``manager``      expert id (managers are listed under ``[experts]`` too).
    ``language``     language code for acknowledgements, default ``"en"``.
    ``display_name`` name shown in Slack, default the team's key.
    ``digest``       when the weekly digest is posted to the channel: ``"<day> HH:MM"`` in the
                     team calendar's time zone (a day as in working hours, a 24-hour time),
                     default ``"mon 09:00"``; ``"off"`` for no digest. It reports the last
                     completed ISO week (Monday to Sunday), on that day of the week after.

``[[policies]]`` (at least one; the first that matches a conversation applies)
    ``name``                   (required, unique)
    ``clock``                  ``"wall"`` (default) or ``"business"`` (counts only the
                               calendar's open hours).
    ``calendar``               required for a business clock, and for a wall clock with
                               ``weekend_first_response`` (to tell working days).
    ``first_response``         (required) duration to the first human answer.
    ``next_response``          duration to answer a customer's further post.
    ``weekend_first_response`` wall clock only: target for posts arriving on a closed day
                               (the classic "24 hours, 48 at weekends").
    ``warn_at``                array of fractions in (0, 1) of the target at which to warn,
                               default ``[0.75]``; ``[]`` for none.
    ``nag_every``              duration between reminders once overdue, default ``"1h"``.
    ``claim_within``           offer the conversation to the next expert if unclaimed by then.
    ``acknowledge``            boolean, default false: send the auto-acknowledgement.
    ``escalation``             array of ``{ after = <duration past the deadline>, notify =
                               "owner" | "team_channel" | "manager" | "on_call" }`` in order.
    ``match``                  ``{ teams = [...], accounts = [...], priorities = [...] }``;
                               every list given must admit the conversation. The LAST policy
                               must have no ``match`` so that every conversation gets one.

``[[routing]]`` (ordered; the first rule that matches a post decides team and priority)
    ``name``      rule name, default ``rule-<n>``.
    ``team``      (required) team name.
    ``priority``  ``"low" | "normal" (default) | "high" | "urgent"``.
    Conditions (all given ones must match; a rule with none matches every post):
    ``accounts`` (account names), ``keywords`` (any of them, as whole words or phrases,
    ignoring case), ``regex`` (a Python regular expression found anywhere in the text, ignoring
    case), ``authors`` (ids or handles), ``languages`` (language codes; ``"pt"`` admits
    ``"pt-BR"``).
    ``topics``    topics given to the conversation, used to pick an expert by topic.

``[authors]`` (optional)
    ``vip``    handles or ids whose posts are urgent, whatever the routing rule says.
    ``ignore`` handles whose posts are ignored (bots, spam).

``[accounts.<name>]``
    ``kind``          (required) connector kind: ``"x"``, ``"mastodon"``, ``"feed"``,
                      ``"webhook"`` or one provided by a plug-in.
    ``own_ids``       our own handles/ids on that account (their posts answer conversations).
    ``poll_interval`` duration, default ``"60s"``.
    ``can_reply``     boolean, default true.
    Any other key goes to the connector, which checks it when it starts: e.g. ``user_id``
    (x), ``api_base_url`` (mastodon), ``url`` (feed), ``secret_env`` and ``reply_url``
    (webhook). Credentials never go here: connectors read them from the environment.

``[acknowledgements.<team name or "default">]``
    Language code to template, e.g. ``en = "Thanks {author}! {owner_first_name} from our
    {team} team will answer within {due_in}."``. Placeholders: ``{author}`` (the customer's
    handle), ``{owner}`` and ``{owner_first_name}`` (the assigned expert), ``{team}`` (its
    display name), ``{due}`` (the deadline, e.g. ``Tuesday 14:00 CET``), ``{due_in}`` (the time
    left, e.g. ``3 h 20 min``); write ``{{`` and ``}}`` for literal braces. The template is
    looked up in the team's table, then ``default``, in the post's language, then in ``en``.

Checks across sections
    Every name used must be defined (calendars, experts, teams, accounts); a policy or routing
    rule after one that matches everything can never apply; an escalation step that notifies
    ``manager`` or ``on_call`` needs every team the policy covers to have one; a policy with
    ``acknowledge = true`` needs a template for each team it covers; the ``topics`` of a routing
    rule must be listed by an expert of its team; Slack ids are unique; no author is both
    ``vip`` and ``ignore``.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import re
import string
import tomllib
import zoneinfo
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import holidays

from bot.core.policy import (
    PRIORITIES,
    WEEKDAY_NAMES,
    Account,
    CalendarSpec,
    DigestSchedule,
    EscalationStep,
    EscalationTarget,
    Expert,
    Period,
    Policy,
    Priority,
    RoutingRule,
    Settings,
    SlaPolicy,
    Team,
    WeekHours,
    format_duration,
    parse_duration,
)

__all__ = [
    "PLACEHOLDERS",
    "ConfigError",
    "ConfigProblem",
    "KeyLocator",
    "KeyPath",
    "load_policy",
    "parse_policy",
    "render_key",
    "summarize",
]

KeyPath = tuple[str | int, ...]
"""A key's position in the document: table keys and array indices, e.g. ``("policies", 0, "name")``."""

T = TypeVar("T")

PLACEHOLDERS: Final[tuple[str, ...]] = ("author", "owner_first_name", "owner", "team", "due", "due_in")
"""The placeholders an acknowledgement template may use."""

ESCALATION_TARGETS: Final[tuple[EscalationTarget, ...]] = ("owner", "team_channel", "manager", "on_call")

_PRIORITY_BY_NAME: Final[dict[str, Priority]] = {name: name for name in PRIORITIES}
_TARGET_BY_NAME: Final[dict[str, EscalationTarget]] = {name: name for name in ESCALATION_TARGETS}
_CLOCKS: Final[dict[str, Literal["wall", "business"]]] = {"wall": "wall", "business": "business"}

_TOP_KEYS = (
    "settings",
    "calendars",
    "experts",
    "teams",
    "policies",
    "routing",
    "authors",
    "accounts",
    "acknowledgements",
)
_SETTINGS_KEYS = (
    "conversation_gap",
    "default_team",
    "admin_channel",
    # issue 11 (the public edge): see bot.core.policy.Settings
    "ack_greeting",
    "ack_overdue_wording",
    "cross_team_actions",
    "retention_outbox",
    "retention_events",
    "retention_text",
)
_CALENDAR_KEYS = ("timezone", "hours", "holidays", "closed", "overrides")
_HOLIDAY_KEYS = ("country", "subdivision")
_EXPERT_KEYS = (
    "name",
    "slack_id",
    "email",
    "timezone",
    "hours",
    "topics",
    "capacity",
    "away_until",
    "holidays",
)
_TEAM_KEYS = ("channel", "experts", "calendar", "on_call", "manager", "language", "display_name", "digest")
_POLICY_KEYS = (
    "name",
    "clock",
    "calendar",
    "first_response",
    "next_response",
    "weekend_first_response",
    "warn_at",
    "nag_every",
    "claim_within",
    "acknowledge",
    "escalation",
    "match",
)
_STEP_KEYS = ("after", "notify")
_MATCH_KEYS = ("teams", "accounts", "priorities")
_RULE_KEYS = ("name", "team", "priority", "accounts", "keywords", "regex", "authors", "languages", "topics")
_RULE_CONDITIONS = ("accounts", "keywords", "regex", "authors", "languages")
_AUTHOR_KEYS = ("vip", "ignore")
_ACCOUNT_KEYS = ("kind", "own_ids", "poll_interval", "can_reply")

_DEFAULT_EXPERT_HOURS: Final[WeekHours] = {day: ((540, 1020),) if day < 5 else () for day in range(7)}

_PERIOD_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SLACK_USER_RE = re.compile(r"^[UW][A-Z0-9]{2,}$")
_CHANNEL_RE = re.compile(r"^(#[^\s#@,.]{1,80}|[CG][A-Z0-9]{6,})$")
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_TOML_POSITION_RE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")


# --------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class ConfigProblem:
    """One mistake in the policy file.

    Attributes:
        file: the file as it was named to `load_policy` (or the ``source`` of `parse_policy`).
        line: 1-based line of the offending key, or None when it cannot be located.
        key: dotted key path such as ``teams.billing.calendar`` or ``policies[0].warn_at[1]``;
            empty for problems with the file as a whole (syntax errors).
        message: what was wrong and what was expected.
    """

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The policy file is invalid; `problems` lists every mistake found, in file order."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems: list[ConfigProblem] = list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the policy file:"
        return "\n".join([head, *(f"  {problem}" for problem in self.problems)])

    def __str__(self) -> str:
        return self._text()


_KEY_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


def render_key(path: Sequence[str | int]) -> str:
    """Render a key path as TOML-ish dotted text: ``("policies", 0, "match")`` -> ``policies[0].match``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if isinstance(part, str) else str(part)
        if not _BARE_KEY_RE.match(text):
            escaped = text.replace("\\", "\\\\").replace('"', '\\"')
            # As a TOML basic string writes them: an ESC or NUL in a key never reaches a terminal raw.
            text = '"' + _KEY_CONTROL_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'
        out += f".{text}" if out else text
    return out


# --------------------------------------------------------------------------------------------
# Locating keys in the source text


class _ScanStop(Exception):
    """The locator met text it does not understand; it keeps what it found so far."""


_BARE_KEY_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SPACES: Final = frozenset(" \t")
_NEWLINES: Final = frozenset("\r\n")
_SCALAR_END: Final = frozenset(["", ",", "]", "}", "#", "\n", "\r"])
_ESCAPES: Final = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


class KeyLocator:
    """Find the line on which a key path is defined in TOML source text.

    `tomllib` reports no positions, so this scans the text once, understanding table
    headers (``[a.b]``), arrays of tables (``[[a]]``, counted to give indices), dotted keys,
    inline tables and (multi-line) arrays, whose elements get indices.  It is meant for text
    that `tomllib` has accepted; on anything it does not understand it stops and keeps what it
    had found.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1
        self._lines: dict[KeyPath, int] = {}
        self._explicit: set[KeyPath] = set()
        self._tables_of_arrays: dict[KeyPath, int] = {}
        with contextlib.suppress(_ScanStop, RecursionError):
            self._document()
        self._text = ""

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line defining `path`, else that of its nearest enclosing table, else None."""
        key = tuple(path)
        while key:
            line = self._lines.get(key)
            if line is not None:
                return line
            key = key[:-1]
        return None

    def exact_line_of(self, path: Sequence[str | int]) -> int | None:
        """The line defining exactly `path` (no fallback), or None."""
        return self._lines.get(tuple(path))

    # -- bookkeeping

    def _explicit_at(self, path: KeyPath, line: int) -> None:
        if path not in self._explicit:
            self._explicit.add(path)
            self._lines[path] = line

    def _implicit_at(self, path: KeyPath, line: int) -> None:
        self._lines.setdefault(path, line)

    def _define(self, base: KeyPath, keys: tuple[str, ...], line: int) -> None:
        for length in range(1, len(keys)):
            self._implicit_at(base + keys[:length], line)
        self._explicit_at(base + keys, line)

    # -- characters

    def _peek(self, offset: int = 0) -> str:
        index = self._pos + offset
        return self._text[index] if index < len(self._text) else ""

    def _advance(self, count: int = 1) -> None:
        chunk = self._text[self._pos : self._pos + count]
        self._line += chunk.count("\n")
        self._pos += len(chunk)

    def _skip_spaces(self) -> None:
        while self._peek() in _SPACES:
            self._pos += 1

    def _skip_blank(self, *, newlines: bool) -> None:
        while True:
            char = self._peek()
            if char in _SPACES or (newlines and char in _NEWLINES):
                self._advance()
            elif char == "#":
                end = self._text.find("\n", self._pos)
                self._pos = len(self._text) if end == -1 else end
            else:
                return

    def _expect(self, token: str) -> None:
        if not self._text.startswith(token, self._pos):
            raise _ScanStop
        self._advance(len(token))

    # -- grammar

    def _document(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip_blank(newlines=True)
            char = self._peek()
            if char == "":
                return
            if char == "[":
                table = self._header()
            else:
                line = self._line
                keys = self._key()
                self._skip_spaces()
                self._expect("=")
                self._skip_spaces()
                self._define(table, keys, line)
                self._value(table + keys)
            self._skip_blank(newlines=False)
            if self._peek() not in _NEWLINES and self._peek() != "":
                raise _ScanStop

    def _header(self) -> KeyPath:
        line = self._line
        self._expect("[")
        is_array = self._peek() == "["
        if is_array:
            self._advance()
        self._skip_spaces()
        keys = self._key()
        self._skip_spaces()
        self._expect("]]" if is_array else "]")
        resolved: list[str | int] = []
        for position, part in enumerate(keys):
            resolved.append(part)
            here = tuple(resolved)
            if is_array and position == len(keys) - 1:
                index = self._tables_of_arrays.get(here, 0)
                self._tables_of_arrays[here] = index + 1
                self._implicit_at(here, line)
                resolved.append(index)
            else:
                if here in self._tables_of_arrays:
                    resolved.append(self._tables_of_arrays[here] - 1)
                self._implicit_at(tuple(resolved), line)
        path = tuple(resolved)
        self._explicit_at(path, line)
        return path

    def _key(self) -> tuple[str, ...]:
        parts = [self._simple_key()]
        while True:
            self._skip_spaces()
            if self._peek() != ".":
                return tuple(parts)
            self._advance()
            self._skip_spaces()
            parts.append(self._simple_key())

    def _simple_key(self) -> str:
        char = self._peek()
        if char == '"':
            return self._basic_string()
        if char == "'":
            return self._literal_string()
        start = self._pos
        while self._peek() in _BARE_KEY_CHARS and self._peek() != "":
            self._pos += 1
        if self._pos == start:
            raise _ScanStop
        return self._text[start : self._pos]

    def _basic_string(self) -> str:
        self._expect('"')
        out: list[str] = []
        while True:
            char = self._peek()
            if char == "" or char in _NEWLINES:
                raise _ScanStop
            if char == '"':
                self._advance()
                return "".join(out)
            if char == "\\":
                escape = self._peek(1)
                if escape in ("u", "U"):
                    width = 4 if escape == "u" else 8
                    digits = self._text[self._pos + 2 : self._pos + 2 + width]
                    try:
                        out.append(chr(int(digits, 16)))
                    except (ValueError, OverflowError) as error:
                        raise _ScanStop from error
                    self._advance(2 + width)
                else:
                    out.append(_ESCAPES.get(escape, escape))
                    self._advance(2)
            else:
                out.append(char)
                self._pos += 1

    def _literal_string(self) -> str:
        self._expect("'")
        end = self._text.find("'", self._pos)
        newline = self._text.find("\n", self._pos)
        if end == -1 or (newline != -1 and newline < end):
            raise _ScanStop
        value = self._text[self._pos : end]
        self._pos = end + 1
        return value

    def _multiline_string(self, quote: str) -> None:
        self._expect(quote * 3)
        while True:
            char = self._peek()
            if char == "":
                raise _ScanStop
            if char == "\\" and quote == '"':
                self._advance(2)
            elif self._text.startswith(quote * 3, self._pos):
                run = 3
                while run < 5 and self._peek(run) == quote:
                    run += 1
                self._advance(run)
                return
            else:
                self._advance()

    def _value(self, path: KeyPath) -> None:
        char = self._peek()
        if char in ('"', "'"):
            if self._text.startswith(char * 3, self._pos):
                self._multiline_string(char)
            elif char == '"':
                self._basic_string()
            else:
                self._literal_string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            start = self._pos
            while self._peek() not in _SCALAR_END:
                self._pos += 1
            if self._pos == start:
                raise _ScanStop

    def _array(self, path: KeyPath) -> None:
        self._expect("[")
        index = 0
        while True:
            self._skip_blank(newlines=True)
            if self._peek() == "]":
                self._advance()
                return
            self._explicit_at((*path, index), self._line)
            self._value((*path, index))
            self._skip_blank(newlines=True)
            if self._peek() == ",":
                self._advance()
                index += 1
            elif self._peek() == "]":
                self._advance()
                return
            else:
                raise _ScanStop

    def _inline_table(self, path: KeyPath) -> None:
        self._expect("{")
        while True:
            self._skip_blank(newlines=True)
            if self._peek() == "}":
                self._advance()
                return
            line = self._line
            keys = self._key()
            self._skip_spaces()
            self._expect("=")
            self._skip_spaces()
            self._define(path, keys, line)
            self._value(path + keys)
            self._skip_blank(newlines=True)
            if self._peek() == ",":
                self._advance()
            elif self._peek() == "}":
                self._advance()
                return
            else:
                raise _ScanStop


# --------------------------------------------------------------------------------------------
# Small helpers


@lru_cache(maxsize=1)
def _time_zones() -> frozenset[str]:
    try:
        return frozenset(zoneinfo.available_timezones())
    except Exception:  # pragma: no cover - a broken tz database; fall back to ZoneInfo below
        return frozenset()


@lru_cache(maxsize=1)
def _holiday_countries() -> dict[str, tuple[str, ...]]:
    return {code: tuple(subdivisions) for code, subdivisions in holidays.list_supported_countries().items()}


@lru_cache(maxsize=256)
def _holiday_subdivision_ok(country: str, subdivision: str) -> bool:
    try:
        holidays.country_holidays(country, subdiv=subdivision)
    except (NotImplementedError, KeyError, ValueError, TypeError, AttributeError):
        return False
    return True


def _zone_ok(name: str) -> bool:
    zones = _time_zones()
    if zones:
        return name in zones
    try:  # pragma: no cover - only without a tz database listing
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True  # pragma: no cover


def _quote(value: str, limit: int = 80) -> str:
    """Quote a user's value for a message: backslashes stay as typed, control characters escaped."""
    text = value if len(value) <= limit else value[: limit - 1] + "…"
    return "'" + "".join(char if char.isprintable() else repr(char)[1:-1] for char in text) + "'"


def describe(value: object) -> str:
    """Describe a TOML value for an error message: ``the integer 5``, ``a table``."""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {_quote(value)}"
    if isinstance(value, datetime):
        return f"the date-time {value.isoformat()}"
    if isinstance(value, date):
        return f"the date {value.isoformat()}"
    if isinstance(value, time):
        return f"the time {value.isoformat()}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _known(names: Collection[str], *, limit: int = 12) -> str:
    ordered = sorted(names)
    if len(ordered) > limit:
        return ", ".join(ordered[:limit]) + f", … ({len(ordered)} in all)"
    return ", ".join(ordered)


def _suggest(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    pool = list(candidates)
    matches = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    if matches:
        return matches[0]
    lowered = {candidate.lower(): candidate for candidate in pool}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[matches[0]] if matches else None


def _clock_text(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _period_text(period: Period) -> str:
    return f"{_clock_text(period[0])}-{_clock_text(period[1])}"


def _parse_days(key: str) -> tuple[int, ...] | str:
    """Days named by an ``hours`` key, or an error message."""
    lowered = key.strip().lower()
    expected = "expected mon, tue, wed, thu, fri, sat, sun or a range such as mon-fri"
    if lowered in WEEKDAY_NAMES:
        return (WEEKDAY_NAMES.index(lowered),)
    first, dash, last = lowered.partition("-")
    if dash and first.strip() in WEEKDAY_NAMES and last.strip() in WEEKDAY_NAMES:
        start, end = WEEKDAY_NAMES.index(first.strip()), WEEKDAY_NAMES.index(last.strip())
        if start > end:
            return f"day range {_quote(key)} runs backwards ({expected})"
        return tuple(range(start, end + 1))
    guess = _suggest(lowered, [*WEEKDAY_NAMES, "mon-fri", "sat-sun"])
    hint = f"did you mean '{guess}'? " if guess else ""
    return f"unknown day {_quote(key)} ({hint}{expected})"


def _template_problem(template: str) -> str | None:
    """What is wrong with an acknowledgement template, or None."""
    allowed = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        return f"bad template: {error} (write {{{{ and }}}} for literal braces)"
    unknown: list[str] = []
    for _literal, field_name, format_spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS:
            unknown.append("{" + field_name + "}")
        elif format_spec or conversion:
            return f"placeholder {{{field_name}}} takes no format spec or conversion (write {{{field_name}}})"
    if unknown:
        listed = ", ".join(dict.fromkeys(unknown))
        noun = "placeholder" if len(unknown) == 1 else "placeholders"
        guess = _suggest(unknown[0].strip("{}"), PLACEHOLDERS)
        hint = f"did you mean {{{guess}}}? " if guess and len(unknown) == 1 else ""
        return f"unknown {noun} {listed} ({hint}allowed: {allowed}; write {{{{ and }}}} for literal braces)"
    return None


# --------------------------------------------------------------------------------------------
# The validator


class _Validator:
    """Walks the parsed TOML, collecting problems and building the policy objects."""

    def __init__(self, source: str, locator: KeyLocator | None) -> None:
        self.source = source
        self.locator = locator
        self.problems: list[ConfigProblem] = []
        # (table path, known key) for unknown keys reported as a likely typo of that key: the
        # known key is then not reported missing as well.
        self.typos: set[tuple[KeyPath, str]] = set()

    # -- reporting

    def add(self, path: KeyPath, message: str) -> None:
        line = self.locator.line_of(path) if self.locator is not None else None
        self.problems.append(ConfigProblem(self.source, line, render_key(path), message))

    def wrong_type(self, path: KeyPath, expected: str, value: object, hint: str = "") -> None:
        self.add(path, f"expected {expected}, got {describe(value)}{hint}")

    def check_keys(self, table: Mapping[str, object], path: KeyPath, allowed: Sequence[str]) -> None:
        for key in table:
            if key in allowed:
                continue
            guess = _suggest(str(key), allowed)
            if guess is not None:
                self.typos.add((path, guess))
            hint = f"did you mean '{guess}'?" if guess else f"expected one of: {', '.join(allowed)}"
            self.add((*path, key), f"unknown key {_quote(str(key))} ({hint})")

    # -- generic field access

    def field(
        self,
        table: Mapping[str, object],
        path: KeyPath,
        key: str,
        convert: Callable[[object, KeyPath], T | None],
        *,
        required: str | None = None,
    ) -> T | None:
        """Convert ``table[key]``; when absent, report it if `required` (what is expected)."""
        if key not in table:
            if required is not None and (path, key) not in self.typos:
                self.add((*path, key), f"required key '{key}' is missing (expected {required})")
            return None
        return convert(table[key], (*path, key))

    def table(self, value: object, path: KeyPath, expected: str = "a table") -> dict[str, object] | None:
        if isinstance(value, dict):
            return value
        self.wrong_type(path, expected, value)
        return None

    def section(self, data: Mapping[str, object], key: str) -> dict[str, object]:
        if key not in data:
            return {}
        return self.table(data[key], (key,), f"a table (write [{key}.<name>] or [{key}])") or {}

    def array_of_tables(
        self, data: Mapping[str, object], key: str
    ) -> list[tuple[KeyPath, dict[str, object]]]:
        if key not in data:
            return []
        value = data[key]
        if not isinstance(value, list):
            self.wrong_type((key,), f"an array of tables (write [[{key}]] before each entry)", value)
            return []
        out: list[tuple[KeyPath, dict[str, object]]] = []
        for index, item in enumerate(value):
            table = self.table(item, (key, index), f"a table (write [[{key}]] before each entry)")
            if table is not None:
                out.append(((key, index), table))
        return out

    # -- scalar converters

    def string(self, value: object, path: KeyPath) -> str | None:
        if not isinstance(value, str):
            self.wrong_type(path, "a string", value)
            return None
        if not value.strip():
            self.add(path, "must not be empty")
            return None
        return value

    def boolean(self, value: object, path: KeyPath) -> bool | None:
        if not isinstance(value, bool):
            self.wrong_type(path, "true or false", value)
            return None
        return value

    def positive_integer(self, value: object, path: KeyPath) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong_type(path, "an integer", value)
            return None
        if value < 1:
            self.add(path, f"must be at least 1, got {value} (use away_until to pause assignments)")
            return None
        return value

    def duration(self, value: object, path: KeyPath, *, allow_zero: bool = False) -> timedelta | None:
        if not isinstance(value, str):
            self.wrong_type(path, 'a duration such as "24h", "1h30m" or "90s"', value)
            return None
        try:
            result = parse_duration(value)
        except (ValueError, OverflowError):
            self.add(
                path,
                f"bad duration {_quote(value)}: expected numbers with units w, d, h, m or s, "
                "such as 24h, 1h30m, 2d or 90s",
            )
            return None
        if result <= timedelta(0) and not allow_zero:
            self.add(path, f"must be longer than zero, got {_quote(value)}")
            return None
        return result

    def any_duration(self, value: object, path: KeyPath) -> timedelta | None:
        return self.duration(value, path, allow_zero=True)

    def date_value(self, value: object, path: KeyPath) -> date | None:
        if isinstance(value, datetime):
            self.add(path, f"expected a date without a time such as 2026-12-24, got {describe(value)}")
            return None
        if isinstance(value, date):
            return value
        if isinstance(value, str):
            if _DATE_RE.match(value.strip()):
                try:
                    return date.fromisoformat(value.strip())
                except ValueError:
                    pass
            self.add(path, f"bad date {_quote(value)}: expected YYYY-MM-DD such as 2026-12-24")
            return None
        self.wrong_type(path, "a date such as 2026-12-24", value)
        return None

    def timezone(self, value: object, path: KeyPath) -> str | None:
        name = self.string(value, path)
        if name is None:
            return None
        if _zone_ok(name):
            return name
        guess = _suggest(name, _time_zones())
        hint = f"did you mean '{guess}'?" if guess else "expected an IANA name such as 'Europe/Berlin'"
        self.add(path, f"unknown time zone {_quote(name)} ({hint})")
        return None

    def matching(self, pattern: re.Pattern[str], expected: str) -> Callable[[object, KeyPath], str | None]:
        def convert(value: object, path: KeyPath) -> str | None:
            text = self.string(value, path)
            if text is None:
                return None
            if not pattern.match(text):
                self.add(path, f"bad value {_quote(text)}: expected {expected}")
                return None
            return text

        return convert

    def channel(self, value: object, path: KeyPath) -> str | None:
        return self.matching(
            _CHANNEL_RE, "a Slack channel such as '#care' or a channel id such as 'C0123ABCD'"
        )(value, path)

    def language(self, value: object, path: KeyPath) -> str | None:
        return self.matching(_LANGUAGE_RE, "a language code such as 'en' or 'de'")(value, path)

    def digest_time(self, value: object, path: KeyPath) -> DigestSchedule | Literal["off"] | None:
        """A team's digest time such as ``"mon 09:00"``, or ``"off"``."""
        expected = '"mon 09:00" or "off"'
        if not isinstance(value, str):
            self.wrong_type(path, expected, value)
            return None
        if value.strip().lower() == "off":
            return "off"
        try:
            return DigestSchedule.parse(value)
        except ValueError:
            self.add(path, f"expected {expected}, got {_quote(value)}")
            return None

    def string_list(self, value: object, path: KeyPath) -> tuple[str, ...] | None:
        return self.list_of(self.string, "an array of strings")(value, path)

    def list_of(
        self, convert: Callable[[object, KeyPath], T | None], expected: str
    ) -> Callable[[object, KeyPath], tuple[T, ...] | None]:
        def convert_all(value: object, path: KeyPath) -> tuple[T, ...] | None:
            if not isinstance(value, list):
                short = isinstance(value, str) and len(value) < 40 and '"' not in value and "\\" not in value
                self.wrong_type(path, expected, value, f' (write ["{value}"])' if short else "")
                return None
            out: list[T] = []
            for index, item in enumerate(value):
                converted = convert(item, (*path, index))
                if converted is not None:
                    out.append(converted)
            return tuple(out)

        return convert_all

    def reference(
        self, kind: str, known: Collection[str], how_to_define: str
    ) -> Callable[[object, KeyPath], str | None]:
        """A converter for a name that must be one of `known` (calendars, experts, ...)."""

        def convert(value: object, path: KeyPath) -> str | None:
            name = self.string(value, path)
            if name is None:
                return None
            if name in known:
                return name
            if not known:
                self.add(path, f"unknown {kind} {_quote(name)} (none are defined: {how_to_define})")
            elif len(known) > 12 and (guess := _suggest(name, known)):
                self.add(
                    path,
                    f"unknown {kind} {_quote(name)} (did you mean {_quote(guess)}? known: {_known(known)})",
                )
            else:
                self.add(path, f"unknown {kind} {_quote(name)} (known: {_known(known)})")
            return None

        return convert

    def unique(self, values: Sequence[object], path: KeyPath, what: str) -> None:
        seen: set[str] = set()
        for index, value in enumerate(values):
            if not isinstance(value, str):
                continue
            if value in seen:
                self.add((*path, index), f"{what} {_quote(value)} is listed twice")
            seen.add(value)

    # -- compound converters

    def period(self, value: object, path: KeyPath) -> Period | None:
        if not isinstance(value, str):
            self.wrong_type(path, 'a period such as "09:00-17:00"', value)
            return None
        match = _PERIOD_RE.match(value)
        if match is None:
            self.add(path, f"bad period {_quote(value)}: expected HH:MM-HH:MM such as 09:00-17:00")
            return None
        start_h, start_m, end_h, end_m = (int(group) for group in match.groups())
        if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m != 0):
            self.add(path, f"bad period {_quote(value)}: times run from 00:00 to 24:00")
            return None
        start, end = start_h * 60 + start_m, end_h * 60 + end_m
        if start >= end:
            self.add(
                path,
                f"bad period {_quote(value)}: the start must be before the end "
                "(split a period past midnight, e.g. 22:00-24:00 and 00:00-02:00 on the next day)",
            )
            return None
        return (start, end)

    def periods(self, value: object, path: KeyPath) -> tuple[Period, ...] | None:
        if not isinstance(value, list):
            self.wrong_type(path, 'an array of periods such as ["09:00-17:00"] ([] = closed)', value)
            return None
        found: list[tuple[Period, int]] = []
        for index, item in enumerate(value):
            period = self.period(item, (*path, index))
            if period is not None:
                found.append((period, index))
        found.sort()
        ok = True
        for (before, _), (after, index) in itertools.pairwise(found):
            if after[0] < before[1]:
                self.add(
                    (*path, index),
                    f"periods {_period_text(before)} and {_period_text(after)} overlap",
                )
                ok = False
        if not ok or len(found) != len(value):
            return None
        return tuple(period for period, _ in found)

    def week_hours(self, value: object, path: KeyPath) -> WeekHours | None:
        table = self.table(value, path, 'a table of days, such as { mon-fri = ["09:00-17:00"] }')
        if table is None:
            return None
        hours: WeekHours = {day: () for day in range(7)}
        given_by: dict[int, str] = {}
        ok = True
        for key, raw in table.items():
            days = _parse_days(str(key))
            if isinstance(days, str):
                self.add((*path, key), days)
                ok = False
                continue
            periods = self.periods(raw, (*path, key))
            for day in days:
                if day in given_by:
                    self.add((*path, key), f"{WEEKDAY_NAMES[day]} is already given by '{given_by[day]}'")
                    ok = False
                    break
            for day in days:
                given_by.setdefault(day, str(key))
            if periods is None:
                ok = False
                continue
            for day in days:
                hours[day] = periods
        return hours if ok else None

    def holidays_spec(self, value: object, path: KeyPath) -> tuple[str, str | None] | None:
        table = self.table(value, path, 'a table such as { country = "DE", subdivision = "BE" }')
        if table is None:
            return None
        self.check_keys(table, path, _HOLIDAY_KEYS)
        country = self.field(table, path, "country", self.string, required="a country code such as 'DE'")
        subdivision = self.field(table, path, "subdivision", self.string)
        if country is None:
            return None
        countries = _holiday_countries()
        if country not in countries:
            guess = country.upper() if country.upper() in countries else None
            hint = f"did you mean {_quote(guess)}? " if guess else ""
            self.add(
                (*path, "country"),
                f"holidays for country {_quote(country)} are not supported by the holidays package "
                f"({hint}use an ISO 3166 code such as 'DE', 'US' or 'GB')",
            )
            return None
        if subdivision is not None:
            known = countries[country]
            if subdivision not in known and not _holiday_subdivision_ok(country, subdivision):
                listed = f"known: {_known(known, limit=40)}" if known else f"{country} has no subdivisions"
                self.add(
                    (*path, "subdivision"),
                    f"subdivision {_quote(subdivision)} of {country} is not supported by the holidays "
                    f"package ({listed})",
                )
                return None
        return (country, subdivision)

    def fractions(self, value: object, path: KeyPath) -> tuple[float, ...] | None:
        items: list[object]
        if isinstance(value, list):
            items = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            items = [value]
        else:
            self.wrong_type(path, "an array of fractions such as [0.5, 0.75]", value)
            return None
        out: list[float] = []
        ok = True
        for index, item in enumerate(items):
            where = (*path, index) if isinstance(value, list) else path
            if isinstance(item, bool) or not isinstance(item, int | float):
                self.wrong_type(where, "a fraction between 0 and 1 such as 0.75", item)
                ok = False
            elif not 0 < item < 1:
                self.add(where, f"{item} is not a fraction between 0 and 1 (exclusive); write 75 % as 0.75")
                ok = False
            else:
                out.append(float(item))
        return tuple(sorted(set(out))) if ok else None

    # -- sections

    def calendars(self, data: Mapping[str, object]) -> dict[str, CalendarSpec]:
        out: dict[str, CalendarSpec] = {}
        for name, raw in self.section(data, "calendars").items():
            path: KeyPath = ("calendars", name)
            table = self.table(raw, path)
            if table is None:
                continue
            self.check_keys(table, path, _CALENDAR_KEYS)
            zone = self.field(
                table, path, "timezone", self.timezone, required="an IANA time zone such as 'Europe/Berlin'"
            )
            hours = self.field(
                table,
                path,
                "hours",
                self.week_hours,
                required='working hours such as { mon-fri = ["09:00-17:00"] }',
            )
            spec = self.field(table, path, "holidays", self.holidays_spec)
            closed = self.field(table, path, "closed", self.list_of(self.date_value, "an array of dates"))
            overrides = self.field(table, path, "overrides", self.overrides)
            if zone is None or hours is None:
                continue
            out[name] = CalendarSpec(
                name=name,
                timezone=zone,
                hours=hours,
                holiday_country=spec[0] if spec else None,
                holiday_subdivision=spec[1] if spec else None,
                closed_dates=frozenset(closed or ()),
                overrides=overrides or {},
            )
        return out

    def overrides(self, value: object, path: KeyPath) -> dict[date, tuple[Period, ...]] | None:
        table = self.table(value, path, 'a table of dates, such as { "2026-12-31" = ["09:00-12:00"] }')
        if table is None:
            return None
        out: dict[date, tuple[Period, ...]] = {}
        for key, raw in table.items():
            day = self.date_value(key, (*path, key))
            periods = self.periods(raw, (*path, key))
            if day is not None and periods is not None:
                out[day] = periods
        return out

    def experts(self, data: Mapping[str, object]) -> dict[str, Expert]:
        out: dict[str, Expert] = {}
        slack_owner: dict[str, str] = {}
        for expert_id, raw in self.section(data, "experts").items():
            path: KeyPath = ("experts", expert_id)
            table = self.table(raw, path)
            if table is None:
                continue
            self.check_keys(table, path, _EXPERT_KEYS)
            name = self.field(table, path, "name", self.string, required="the expert's name")
            slack_id = self.field(
                table,
                path,
                "slack_id",
                self.matching(
                    _SLACK_USER_RE,
                    "a Slack member id starting with U or W, such as 'U0123ABCD' "
                    "(Slack profile > ⋮ > Copy member ID)",
                ),
                required="a Slack member id such as 'U0123ABCD'",
            )
            email = self.field(table, path, "email", self.matching(_EMAIL_RE, "an e-mail address"))
            zone = self.field(
                table, path, "timezone", self.timezone, required="an IANA time zone such as 'Europe/Berlin'"
            )
            hours = self.field(table, path, "hours", self.week_hours)
            topics = self.field(table, path, "topics", self.string_list)
            capacity = self.field(table, path, "capacity", self.positive_integer)
            away_until = self.field(table, path, "away_until", self.date_value)
            spec = self.field(table, path, "holidays", self.holidays_spec)
            if slack_id is not None:
                if slack_id in slack_owner:
                    self.add(
                        (*path, "slack_id"),
                        f"Slack id {slack_id} is also used by expert {_quote(slack_owner[slack_id])}",
                    )
                slack_owner.setdefault(slack_id, expert_id)
            if name is None or slack_id is None or zone is None:
                continue
            if "hours" in table and hours is None:
                continue
            out[expert_id] = Expert(
                id=expert_id,
                name=name,
                slack_id=slack_id,
                timezone=zone,
                hours=hours if hours is not None else dict(_DEFAULT_EXPERT_HOURS),
                topics=topics or (),
                capacity=capacity if capacity is not None else 10,
                away_until=away_until,
                holiday_country=spec[0] if spec else None,
                holiday_subdivision=spec[1] if spec else None,
                email=email,
            )
        return out

    def teams(
        self, data: Mapping[str, object], calendars: Collection[str], experts: Collection[str]
    ) -> dict[str, Team]:
        out: dict[str, Team] = {}
        expert_ref = self.reference("expert", experts, "add an [experts.<id>] table")
        calendar_ref = self.reference("calendar", calendars, "add a [calendars.<name>] table")
        for name, raw in self.section(data, "teams").items():
            path: KeyPath = ("teams", name)
            table = self.table(raw, path)
            if table is None:
                continue
            self.check_keys(table, path, _TEAM_KEYS)
            channel = self.field(
                table, path, "channel", self.channel, required="a Slack channel such as '#care'"
            )
            members = self.field(
                table,
                path,
                "experts",
                self.list_of(expert_ref, "an array of expert ids"),
                required="an array of expert ids",
            )
            if "experts" in table and isinstance(table["experts"], list):
                self.unique(table["experts"], (*path, "experts"), "expert")
                if not table["experts"]:
                    self.add((*path, "experts"), "a team needs at least one expert")
            calendar = self.field(table, path, "calendar", calendar_ref, required="the name of a calendar")
            on_call = self.field(table, path, "on_call", expert_ref)
            manager = self.field(table, path, "manager", expert_ref)
            language = self.field(table, path, "language", self.language)
            display_name = self.field(table, path, "display_name", self.string)
            digest: DigestSchedule | Literal["off"] | None = self.field(
                table, path, "digest", self.digest_time
            )
            if channel is None or members is None or calendar is None:
                continue
            out[name] = Team(
                name=name,
                channel=channel,
                experts=tuple(dict.fromkeys(members)),
                calendar=calendar,
                on_call=on_call,
                manager=manager,
                language=language or "en",
                display_name=display_name,
                digest=None if digest == "off" else (digest if digest is not None else DigestSchedule()),
            )
        if data.get("teams", {}) == {}:
            self.add(("teams",), "no teams are defined (add a [teams.<name>] table)")
        return out

    def accounts(self, data: Mapping[str, object]) -> dict[str, Account]:
        out: dict[str, Account] = {}
        for name, raw in self.section(data, "accounts").items():
            path: KeyPath = ("accounts", name)
            table = self.table(raw, path)
            if table is None:
                continue
            for key in table:
                if key in _ACCOUNT_KEYS:
                    continue
                guess = _suggest(str(key), _ACCOUNT_KEYS, cutoff=0.8)
                if guess is not None:
                    self.typos.add((path, guess))
                    self.add((*path, key), f"unknown key {_quote(str(key))} (did you mean '{guess}'?)")
            kind = self.field(
                table,
                path,
                "kind",
                self.matching(_KIND_RE, "a connector kind such as 'x', 'mastodon', 'feed' or 'webhook'"),
                required="a connector kind such as 'x', 'mastodon', 'feed' or 'webhook'",
            )
            own_ids = self.field(table, path, "own_ids", self.string_list)
            poll_interval = self.field(table, path, "poll_interval", self.duration)
            can_reply = self.field(table, path, "can_reply", self.boolean)
            if kind is None:
                continue
            out[name] = Account(
                name=name,
                kind=kind,
                own_ids=own_ids or (),
                poll_interval=poll_interval if poll_interval is not None else timedelta(minutes=1),
                can_reply=can_reply if can_reply is not None else True,
                settings={key: value for key, value in table.items() if key not in _ACCOUNT_KEYS},
            )
        return out

    def settings(self, data: Mapping[str, object], teams: Collection[str]) -> Settings:
        table = self.section(data, "settings")
        path: KeyPath = ("settings",)
        self.check_keys(table, path, _SETTINGS_KEYS)
        gap = self.field(table, path, "conversation_gap", self.duration)
        default_team = self.field(
            table, path, "default_team", self.reference("team", teams, "add a [teams.<name>] table")
        )
        admin_channel = self.field(table, path, "admin_channel", self.channel)
        edge = self.edge_settings(table, path)
        return Settings(
            conversation_gap=gap if gap is not None else timedelta(hours=24),
            default_team=default_team,
            admin_channel=admin_channel,
            **edge,
        )

    def edge_settings(self, table: Mapping[str, object], path: KeyPath) -> dict[str, Any]:
        """The public-edge settings (issue 11): greeting, overdue wording, cross-team, retention."""
        out: dict[str, Any] = {}
        for key in ("ack_greeting", "ack_overdue_wording"):
            value = self.field(table, path, key, self.string)
            if value is None:
                continue
            if not value.strip() or len(value) > 80 or any(ch in value for ch in "<>@{}\n"):
                self.add((*path, key), "must be 1-80 characters of plain text (no < > @ { } or newline)")
                continue
            out[key] = value.strip()
        cross = self.field(table, path, "cross_team_actions", self.boolean)
        if cross is not None:
            out["cross_team_actions"] = cross
        for key in ("retention_outbox", "retention_events", "retention_text"):
            if table.get(key) == "off":
                out[key] = None
                continue
            kept = self.field(table, path, key, self.duration)
            if kept is not None:
                out[key] = kept
        return out

    def authors(self, data: Mapping[str, object]) -> tuple[frozenset[str], frozenset[str]]:
        table = self.section(data, "authors")
        path: KeyPath = ("authors",)
        self.check_keys(table, path, _AUTHOR_KEYS)
        vip = self.field(table, path, "vip", self.string_list) or ()
        ignore = self.field(table, path, "ignore", self.string_list) or ()
        raw_ignore = table.get("ignore")
        if isinstance(raw_ignore, list):
            for index, item in enumerate(raw_ignore):
                if isinstance(item, str) and item in vip:
                    self.add((*path, "ignore", index), f"{_quote(item)} is listed both as vip and as ignore")
        return frozenset(vip), frozenset(ignore)

    def policies(
        self,
        data: Mapping[str, object],
        calendars: Collection[str],
        teams: Collection[str],
        accounts: Collection[str],
    ) -> list[tuple[KeyPath, SlaPolicy]]:
        out: list[tuple[KeyPath, SlaPolicy]] = []
        names: dict[str, KeyPath] = {}
        catch_all: tuple[KeyPath, str] | None = None
        unsure = False  # a policy's 'match' is broken, so whether a catch-all exists is unknown
        entries = self.array_of_tables(data, "policies")
        if data.get("policies", []) == []:
            self.add(("policies",), "no SLA policies are defined (add at least one [[policies]] table)")
        calendar_ref = self.reference("calendar", calendars, "add a [calendars.<name>] table")
        for path, table in entries:
            self.check_keys(table, path, _POLICY_KEYS)
            name = self.field(table, path, "name", self.string, required="a policy name")
            if name is not None:
                if name in names:
                    self.add(
                        (*path, "name"),
                        f"duplicate policy name {_quote(name)} (also {render_key(names[name])})",
                    )
                names.setdefault(name, path)
            clock: Literal["wall", "business"] | None = self.field(
                table, path, "clock", self.choice(_CLOCKS, "clock")
            )
            calendar = self.field(table, path, "calendar", calendar_ref)
            first = self.field(
                table, path, "first_response", self.duration, required="a duration such as 24h"
            )
            next_response = self.field(table, path, "next_response", self.duration)
            weekend = self.field(table, path, "weekend_first_response", self.duration)
            warn_at = self.field(table, path, "warn_at", self.fractions)
            nag_every = self.field(table, path, "nag_every", self.duration)
            claim_within = self.field(table, path, "claim_within", self.duration)
            acknowledge = self.field(table, path, "acknowledge", self.boolean)
            escalation = self.field(table, path, "escalation", self.escalation)
            match = self.field(table, path, "match", self.match_spec(teams, accounts))
            clock_name: Literal["wall", "business"] = clock or "wall"
            if clock_name == "business" and "calendar" not in table:
                self.add(
                    (*path, "calendar"),
                    'a business clock needs a calendar (add calendar = "<name>"; '
                    f"known: {_known(calendars) or 'none'})",
                )
            elif "weekend_first_response" in table and clock_name == "business":
                self.add(
                    (*path, "weekend_first_response"),
                    "only applies to a wall clock (a business clock already skips closed days); "
                    'remove it or use clock = "wall"',
                )
            elif "weekend_first_response" in table and "calendar" not in table:
                self.add(
                    (*path, "weekend_first_response"),
                    "needs a calendar to tell working days from weekends and holidays "
                    f'(add calendar = "<name>" to this policy; known: {_known(calendars) or "none"})',
                )
            raw_match = table.get("match")
            if raw_match is not None and not isinstance(raw_match, dict):
                unsure = True
            is_catch_all = raw_match is None or (
                isinstance(raw_match, dict) and not any(raw_match.get(key) for key in _MATCH_KEYS)
            )
            if catch_all is not None:
                self.add(
                    path,
                    f"policy {_quote(name or '?')} can never apply: {_quote(catch_all[1])} "
                    f"({render_key(catch_all[0])}) before it matches every conversation",
                )
            elif is_catch_all:
                catch_all = (path, name or "?")
            if (
                name is None
                or first is None
                or any(
                    key in table and value is None
                    for key, value in (
                        ("clock", clock),
                        ("calendar", calendar),
                        ("next_response", next_response),
                        ("weekend_first_response", weekend),
                        ("warn_at", warn_at),
                        ("nag_every", nag_every),
                        ("claim_within", claim_within),
                        ("acknowledge", acknowledge),
                        ("escalation", escalation),
                        ("match", match),
                    )
                )
            ):
                continue
            teams_, accounts_, priorities = match or ((), (), ())
            out.append(
                (
                    path,
                    SlaPolicy(
                        name=name,
                        clock=clock_name,
                        calendar=calendar,
                        first_response=first,
                        next_response=next_response,
                        weekend_first_response=weekend,
                        warn_at=warn_at if warn_at is not None else (0.75,),
                        nag_every=nag_every if nag_every is not None else timedelta(hours=1),
                        escalation=escalation or (),
                        claim_within=claim_within,
                        acknowledge=bool(acknowledge),
                        match_teams=teams_,
                        match_accounts=accounts_,
                        match_priorities=priorities,
                    ),
                )
            )
        if entries and catch_all is None and not unsure:
            last = entries[-1][0]
            self.add(
                (*last, "match"),
                "the last policy must be a catch-all without 'match', so that every conversation "
                "gets a policy (add a final [[policies]] table without 'match')",
            )
        return out

    def choice(self, options: Mapping[str, T], what: str) -> Callable[[object, KeyPath], T | None]:
        def convert(value: object, path: KeyPath) -> T | None:
            text = self.string(value, path)
            if text is None:
                return None
            if text in options:
                return options[text]
            allowed = ", ".join(f"'{option}'" for option in options)
            guess = _suggest(text, options)
            hint = f"did you mean '{guess}'? " if guess else ""
            self.add(path, f"unknown {what} {_quote(text)} ({hint}expected one of {allowed})")
            return None

        return convert

    def escalation(self, value: object, path: KeyPath) -> tuple[EscalationStep, ...] | None:
        if not isinstance(value, list):
            self.wrong_type(
                path, 'an array of steps such as [{ after = "1h", notify = "team_channel" }]', value
            )
            return None
        steps: list[EscalationStep] = []
        ok = True
        for index, item in enumerate(value):
            where: KeyPath = (*path, index)
            table = self.table(item, where, 'a step such as { after = "1h", notify = "manager" }')
            if table is None:
                ok = False
                continue
            self.check_keys(table, where, _STEP_KEYS)
            after = self.field(
                table, where, "after", self.any_duration, required="a duration past the deadline"
            )
            notify: EscalationTarget | None = self.field(
                table,
                where,
                "notify",
                self.choice(_TARGET_BY_NAME, "escalation target"),
                required="one of 'owner', 'team_channel', 'manager', 'on_call'",
            )
            if after is None or notify is None:
                ok = False
                continue
            if steps and after < steps[-1].after:
                self.add(
                    (*where, "after"),
                    f"steps must be in order of 'after': {format_duration(after)} comes after "
                    f"{format_duration(steps[-1].after)}",
                )
                ok = False
            steps.append(EscalationStep(after=after, notify=notify))
        return tuple(steps) if ok else None

    def match_spec(
        self, teams: Collection[str], accounts: Collection[str]
    ) -> Callable[[object, KeyPath], tuple[tuple[str, ...], tuple[str, ...], tuple[Priority, ...]] | None]:
        team_list = self.list_of(
            self.reference("team", teams, "add a [teams.<name>] table"), "an array of team names"
        )
        account_list = self.list_of(
            self.reference("account", accounts, "add an [accounts.<name>] table"), "an array of account names"
        )
        priority_list: Callable[[object, KeyPath], tuple[Priority, ...] | None] = self.list_of(
            self.choice(_PRIORITY_BY_NAME, "priority"), "an array of priorities"
        )

        def convert(
            value: object, path: KeyPath
        ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[Priority, ...]] | None:
            table = self.table(
                value, path, 'a table such as { teams = ["billing"], priorities = ["urgent"] }'
            )
            if table is None:
                return None
            self.check_keys(table, path, _MATCH_KEYS)
            found_teams = self.field(table, path, "teams", team_list)
            found_accounts = self.field(table, path, "accounts", account_list)
            found_priorities: tuple[Priority, ...] | None = self.field(
                table, path, "priorities", priority_list
            )
            if any(
                key in table and value is None
                for key, value in zip(
                    _MATCH_KEYS, (found_teams, found_accounts, found_priorities), strict=True
                )
            ):
                return None
            return (found_teams or (), found_accounts or (), found_priorities or ())

        return convert

    def regex(self, value: object, path: KeyPath) -> re.Pattern[str] | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            return re.compile(text, re.IGNORECASE)
        except re.error as error:
            where = f" at position {error.pos}" if error.pos is not None else ""
            self.add(path, f"bad regular expression {_quote(text)}: {error.msg}{where}")
        except (OverflowError, RecursionError, ValueError) as error:
            self.add(path, f"bad regular expression {_quote(text)}: {error}")
        return None

    def routing(
        self,
        data: Mapping[str, object],
        team_names: Collection[str],
        accounts: Collection[str],
        teams: Mapping[str, Team],
        experts: Mapping[str, Expert],
    ) -> tuple[RoutingRule, ...]:
        out: list[RoutingRule] = []
        team_ref = self.reference("team", team_names, "add a [teams.<name>] table")
        account_list = self.list_of(
            self.reference("account", accounts, "add an [accounts.<name>] table"), "an array of account names"
        )
        language_list = self.list_of(self.language, "an array of language codes")
        names: dict[str, KeyPath] = {}
        unconditional: tuple[KeyPath, str] | None = None
        for number, (path, table) in enumerate(self.array_of_tables(data, "routing"), start=1):
            self.check_keys(table, path, _RULE_KEYS)
            name = self.field(table, path, "name", self.string) or f"rule-{number}"
            if name in names:
                self.add(
                    (*path, "name"), f"duplicate rule name {_quote(name)} (also {render_key(names[name])})"
                )
            names.setdefault(name, path)
            team = self.field(table, path, "team", team_ref, required="the name of a team")
            priority: Priority | None = self.field(
                table, path, "priority", self.choice(_PRIORITY_BY_NAME, "priority")
            )
            rule_accounts = self.field(table, path, "accounts", account_list)
            keywords = self.field(table, path, "keywords", self.string_list)
            pattern = self.field(table, path, "regex", self.regex)
            authors = self.field(table, path, "authors", self.string_list)
            languages = self.field(table, path, "languages", language_list)
            topics = self.field(table, path, "topics", self.string_list)
            if unconditional is not None:
                self.add(
                    path,
                    f"rule {_quote(name)} can never apply: {_quote(unconditional[1])} "
                    f"({render_key(unconditional[0])}) before it has no conditions and matches every post",
                )
            elif not any(key in table for key in _RULE_CONDITIONS):
                unconditional = (path, name)
            members = teams[team].experts if team is not None and team in teams else None
            raw_topics = table.get("topics")
            # Only when the team and all its experts are valid, so one mistake is reported once.
            if (
                team is not None
                and members is not None
                and isinstance(raw_topics, list)
                and all(member in experts for member in members)
            ):
                offered = {topic for member in members for topic in experts[member].topics}
                for position, topic in enumerate(raw_topics):
                    if isinstance(topic, str) and topic.strip() and topic not in offered:
                        known = f"their topics: {_known(offered)}" if offered else "none lists any topics"
                        self.add(
                            (*path, "topics", position),
                            f"no expert of team {_quote(team)} lists topic {_quote(topic)} ({known})",
                        )
            if team is None:
                continue
            out.append(
                RoutingRule(
                    name=name,
                    team=team,
                    priority=priority or "normal",
                    accounts=rule_accounts or (),
                    keywords=keywords or (),
                    regex=pattern,
                    authors=authors or (),
                    languages=languages or (),
                    topics=topics or (),
                )
            )
        return tuple(out)

    def acknowledgements(
        self, data: Mapping[str, object], teams: Collection[str]
    ) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for key, raw in self.section(data, "acknowledgements").items():
            path: KeyPath = ("acknowledgements", key)
            if key != "default" and key not in teams:
                known = ", ".join(["'default'", *(f"'{team}'" for team in sorted(teams))])
                self.add(path, f"unknown team {_quote(key)} (expected one of {known})")
            table = self.table(
                raw, path, 'a table of language codes to templates, such as { en = "Thanks {author}!" }'
            )
            if table is None:
                continue
            templates: dict[str, str] = {}
            for language, template in table.items():
                where: KeyPath = (*path, language)
                if not _LANGUAGE_RE.match(str(language)):
                    self.add(where, f"bad language code {_quote(str(language))} (expected e.g. en or de)")
                    continue
                text = self.string(template, where)
                if text is None:
                    continue
                problem = _template_problem(text)
                if problem is not None:
                    self.add(where, problem)
                    continue
                templates[language] = text
            out[key] = templates
        return out

    # -- cross checks

    def ladder_targets(self, entries: Sequence[tuple[KeyPath, SlaPolicy]], teams: Mapping[str, Team]) -> None:
        for path, policy in entries:
            covered = [teams[name] for name in (policy.match_teams or tuple(teams)) if name in teams]
            for index, step in enumerate(policy.escalation):
                if step.notify == "manager":
                    missing = [team.name for team in covered if team.manager is None]
                elif step.notify == "on_call":
                    missing = [team.name for team in covered if team.on_call is None]
                else:
                    continue
                if missing:
                    self.add(
                        (*path, "escalation", index, "notify"),
                        f"escalates to '{step.notify}', but team{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} {'have' if len(missing) > 1 else 'has'} no {step.notify} "
                        f'(set {step.notify} = "<expert id>" in [teams.<name>])',
                    )

    def acknowledgement_coverage(self, entries: Sequence[tuple[KeyPath, SlaPolicy]], policy: Policy) -> None:
        for path, sla in entries:
            if not sla.acknowledge:
                continue
            for name in sla.match_teams or tuple(policy.teams):
                team = policy.teams.get(name)
                if team is None or policy.acknowledgement_template(team=name, language=team.language):
                    continue
                languages = _quote(team.language) + (" or 'en'" if team.language != "en" else "")
                self.add(
                    (*path, "acknowledge"),
                    f"acknowledgements are on, but there is no template for team {_quote(name)} in "
                    f'{languages} (add {team.language} = "..." under '
                    f"[acknowledgements.{name}] or [acknowledgements.default])",
                )

    # -- everything

    def run(self, data: Mapping[str, object]) -> Policy | None:
        self.check_keys(data, (), _TOP_KEYS)
        raw_names = {
            section: set(self.section_keys(data, section))
            for section in ("calendars", "experts", "teams", "accounts")
        }
        calendars = self.calendars(data)
        experts = self.experts(data)
        teams = self.teams(data, raw_names["calendars"], raw_names["experts"])
        accounts = self.accounts(data)
        settings = self.settings(data, raw_names["teams"])
        vip, ignored = self.authors(data)
        entries = self.policies(data, raw_names["calendars"], raw_names["teams"], raw_names["accounts"])
        rules = self.routing(data, raw_names["teams"], raw_names["accounts"], teams, experts)
        acknowledgements = self.acknowledgements(data, raw_names["teams"])
        policy = Policy(
            source=self.source,
            settings=settings,
            calendars=calendars,
            experts=experts,
            teams=teams,
            policies=tuple(sla for _, sla in entries),
            rules=rules,
            accounts=accounts,
            vip_authors=vip,
            ignored_authors=ignored,
            acknowledgements=acknowledgements,
        )
        self.ladder_targets(entries, teams)
        self.acknowledgement_coverage(entries, policy)
        return None if self.problems else policy

    def section_keys(self, data: Mapping[str, object], key: str) -> list[str]:
        value = data.get(key)
        return [str(name) for name in value] if isinstance(value, dict) else []


# --------------------------------------------------------------------------------------------
# Public API


def _sorted(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return sorted(problems, key=lambda problem: (problem.line is None, problem.line or 0))


def parse_policy(data: Mapping[str, object], *, source: str, text: str | None = None) -> Policy:
    """Validate already-parsed TOML data and build the `Policy`.

    Args:
        data: the document as `tomllib` returns it.
        source: the file name used in problems and kept as `Policy.source`.
        text: the TOML source, used only to find the line of each problem (None: no lines).

    Raises:
        ConfigError: every problem found, in file order.
    """
    locator = KeyLocator(text) if text is not None else None
    validator = _Validator(source, locator)
    policy = validator.run(data)
    if policy is None:
        raise ConfigError(_sorted(validator.problems))
    return policy


def _syntax_problem(source: str, text: str, error: tomllib.TOMLDecodeError) -> ConfigProblem:
    message = str(error)
    line: int | None = None
    match = _TOML_POSITION_RE.search(message)
    if match is not None:
        message = message[: match.start()]
        if match.group(1) is not None:
            line = int(match.group(1))
            message += f" at column {match.group(2)}"
        else:
            line = max(1, len(text.rstrip().splitlines()))
            message += " at the end of the file"
    message = message[:1].lower() + message[1:]
    return ConfigProblem(source, line, "", f"TOML syntax error: {message}")


def load_policy(path: str | Path) -> Policy:
    """Read, parse and validate a policy file.

    Args:
        path: the TOML file; problems name it as given here.

    Returns:
        The validated policy.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML (one problem, with
            tomllib's line) or breaks the schema (every problem found, in file order).
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(
            [ConfigProblem(source, None, "", f"cannot read the file: {error.strerror or error}")]
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(
            [ConfigProblem(source, line, "", f"the file is not UTF-8 text (byte {error.start})")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_problem(source, text, error)]) from None
    except RecursionError:
        raise ConfigError(
            [ConfigProblem(source, None, "", "TOML syntax error: values nested too deeply")]
        ) from None
    return parse_policy(data, source=source, text=text)


# --------------------------------------------------------------------------------------------
# Summary


def _hours_text(hours: WeekHours) -> str:
    groups: list[tuple[int, int, tuple[Period, ...]]] = []
    for day in range(7):
        periods = hours.get(day, ())
        if groups and groups[-1][2] == periods and groups[-1][1] == day - 1:
            groups[-1] = (groups[-1][0], day, periods)
        else:
            groups.append((day, day, periods))
    parts = []
    for first, last, periods in groups:
        if not periods:
            continue
        days = WEEKDAY_NAMES[first] if first == last else f"{WEEKDAY_NAMES[first]}-{WEEKDAY_NAMES[last]}"
        parts.append(f"{days} {', '.join(_period_text(period) for period in periods)}")
    return "; ".join(parts) or "always closed"


def _holiday_text(country: str | None, subdivision: str | None) -> str:
    if country is None:
        return "no public holidays"
    return f"holidays {country}" + (f"-{subdivision}" if subdivision else "")


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def summarize(policy: Policy) -> str:
    """A readable multi-line summary of a validated policy, for ``replyclock check``."""
    lines = [
        f"{policy.source}: "
        + ", ".join(
            [
                _plural(len(policy.calendars), "calendar"),
                _plural(len(policy.experts), "expert"),
                _plural(len(policy.teams), "team"),
                _plural(len(policy.policies), "SLA policy", "SLA policies"),
                _plural(len(policy.rules), "routing rule"),
                _plural(len(policy.accounts), "account"),
            ]
        ),
        "",
        "Settings: conversation gap "
        + format_duration(policy.settings.conversation_gap)
        + f", default team {policy.settings.default_team or '(none)'}"
        + f", admin channel {policy.settings.admin_channel or '(none)'}",
    ]
    lines += ["", "Calendars:"]
    for calendar in policy.calendars.values():
        extras = [_holiday_text(calendar.holiday_country, calendar.holiday_subdivision)]
        if calendar.closed_dates:
            extras.append(_plural(len(calendar.closed_dates), "closed date"))
        if calendar.overrides:
            extras.append(_plural(len(calendar.overrides), "override"))
        lines.append(
            f"  {calendar.name}: {calendar.timezone}, {_hours_text(calendar.hours)}; {', '.join(extras)}"
        )
    lines += ["", "Teams:"]
    for team in policy.teams.values():
        label = f"{team.name} ({team.display_name})" if team.display_name else team.name
        lines.append(
            f"  {label}: {team.channel}, calendar {team.calendar}, language {team.language}; "
            f"experts {', '.join(team.experts)}; on call {team.on_call or '-'}; manager {team.manager or '-'}; "
            f"digest {team.digest or 'off'}"
        )
    lines += ["", "Experts:"]
    for expert in policy.experts.values():
        details = [expert.timezone, _hours_text(expert.hours), f"capacity {expert.capacity}"]
        if expert.topics:
            details.append(f"topics {', '.join(expert.topics)}")
        if expert.away_until:
            details.append(f"away until {expert.away_until.isoformat()}")
        lines.append(f"  {expert.id} ({expert.name}, {expert.slack_id}): {'; '.join(details)}")
    lines += ["", "SLA policies (the first that matches applies):"]
    for number, sla in enumerate(policy.policies, start=1):
        clock = f"business clock on {sla.calendar}" if sla.clock == "business" else "wall clock"
        if sla.clock == "wall" and sla.calendar:
            clock += f" ({sla.calendar} for working days)"
        targets = [f"first response {format_duration(sla.first_response)}"]
        if sla.weekend_first_response is not None:
            targets.append(f"{format_duration(sla.weekend_first_response)} from a closed day")
        if sla.next_response is not None:
            targets.append(f"next response {format_duration(sla.next_response)}")
        if sla.claim_within is not None:
            targets.append(f"claim within {format_duration(sla.claim_within)}")
        conditions = [
            f"{label} {', '.join(values)}"
            for label, values in (
                ("teams", sla.match_teams),
                ("accounts", sla.match_accounts),
                ("priorities", sla.match_priorities),
            )
            if values
        ]
        warn = ", ".join(f"{fraction:.0%}" for fraction in sla.warn_at) or "never"
        ladder = (
            ", ".join(f"+{format_duration(step.after)} {step.notify}" for step in sla.escalation) or "none"
        )
        lines.append(f"  {number}. {sla.name} [{'; '.join(conditions) or 'everything else'}]: {clock}")
        lines.append(f"     {', '.join(targets)}")
        lines.append(
            f"     warn at {warn}; nag every {format_duration(sla.nag_every)}; escalation {ladder}; "
            f"acknowledge {'yes' if sla.acknowledge else 'no'}"
        )
    lines += ["", "Routing rules (the first that matches decides):"]
    for number, rule in enumerate(policy.rules, start=1):
        conditions = [
            f"{label} {', '.join(values)}"
            for label, values in (
                ("accounts", rule.accounts),
                ("keywords", rule.keywords),
                ("authors", rule.authors),
                ("languages", rule.languages),
            )
            if values
        ]
        if rule.regex is not None:
            conditions.append(f"regex /{rule.regex.pattern}/")
        topics = f", topics {', '.join(rule.topics)}" if rule.topics else ""
        lines.append(
            f"  {number}. {rule.name}: {' and '.join(conditions) or 'every post'} -> "
            f"team {rule.team}, {rule.priority}{topics}"
        )
    if not policy.rules:
        lines.append("  (none)")
    if policy.settings.default_team:
        lines.append(f"  otherwise -> team {policy.settings.default_team}")
    lines += ["", "Accounts:"]
    for account in policy.accounts.values():
        extra = f"; settings {', '.join(sorted(account.settings))}" if account.settings else ""
        own = f"; own ids {', '.join(account.own_ids)}" if account.own_ids else ""
        lines.append(
            f"  {account.name}: {account.kind}, poll every {format_duration(account.poll_interval)}, "
            f"{'replies' if account.can_reply else 'read-only'}{own}{extra}"
        )
    if not policy.accounts:
        lines.append("  (none)")
    lines += [
        "",
        f"Authors: {len(policy.vip_authors)} VIP, {len(policy.ignored_authors)} ignored",
        "Acknowledgements: "
        + (
            "; ".join(
                f"{key} ({', '.join(sorted(templates))})"
                for key, templates in policy.acknowledgements.items()
            )
            or "none"
        ),
    ]
    return "\n".join(lines)
