"""Typed policy model: what `replyclock.toml` means once validated.

These are plain frozen dataclasses with no behaviour beyond small helpers, so the
pure parts of replyclock (SLA clock, routing, ladder) can be tested from data alone.
`bot.config` turns a TOML file into a `Policy` and reports every mistake.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, time, timedelta
from typing import Literal

Priority = Literal["low", "normal", "high", "urgent"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high", "urgent")

# A period of the day, as minutes since local midnight: [start, end), 0 <= start < end <= 1440.
Period = tuple[int, int]
# Weekday (0 = Monday ... 6 = Sunday) -> open periods that day, sorted, not overlapping.
WeekHours = dict[int, tuple[Period, ...]]

WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# The days a calendar calls its weekend unless it says otherwise (5 = Saturday, 6 = Sunday).
DEFAULT_WEEKEND: frozenset[int] = frozenset({5, 6})

_DIGEST_TIME = re.compile(r"^(\S+)\s+(\S+)$")
_CLOCK_TIME = re.compile(r"^([0-9]{2}):([0-9]{2})$")
_DURATION_PART = re.compile(r"(\d+)\s*(w|d|h|m|s)")
_DURATION_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as ``"24h"``, ``"1h30m"``, ``"2d"`` or ``"90s"``.

    Raises:
        ValueError: the text is not a sequence of <number><unit> parts with units w, d, h, m, s.
    """
    compact = text.strip().lower().replace(" ", "")
    if not compact:
        raise ValueError("empty duration")
    seconds = 0
    position = 0
    for match in _DURATION_PART.finditer(compact):
        if match.start() != position:
            break
        seconds += int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(compact):
        raise ValueError(f"not a duration: {text!r} (use e.g. 24h, 1h30m, 2d, 90s)")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Render a duration compactly: ``timedelta(hours=25)`` -> ``"1d1h"``."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts)


@dataclass(frozen=True)
class DigestSchedule:
    """When a team's digest of last week is due: a weekday and a local time in the team's zone.

    Attributes:
        weekday: 0 = Monday ... 6 = Sunday, of the week after the one reported on.
        at: Local time of day (whole minutes) in the team calendar's time zone.
    """

    weekday: int = 0
    at: time = time(9, 0)

    def __post_init__(self) -> None:
        if not 0 <= self.weekday <= 6:
            raise ValueError(f"weekday must be 0 (Monday) to 6 (Sunday), got {self.weekday}")

    @classmethod
    def parse(cls, text: str) -> DigestSchedule:
        """Parse ``"mon 09:00"``: a weekday named as in working hours, then a 24-hour ``HH:MM``.

        Case and surrounding spaces do not matter: ``" Fri 17:30 "`` is Friday 17:30.

        Raises:
            ValueError: not that shape, an unknown weekday, or a time outside 00:00-23:59.
        """
        match = _DIGEST_TIME.match(text.strip())
        if match is None:
            raise ValueError(f'not a digest time: {text!r} (expected a weekday and HH:MM, e.g. "mon 09:00")')
        day, clock = match.group(1).lower(), match.group(2)
        if day not in WEEKDAY_NAMES:
            raise ValueError(
                f"not a digest time: {text!r} (unknown weekday {day!r}; expected one of "
                f'{", ".join(WEEKDAY_NAMES)}, e.g. "mon 09:00")'
            )
        hhmm = _CLOCK_TIME.match(clock)
        if hhmm is None or int(hhmm.group(1)) > 23 or int(hhmm.group(2)) > 59:
            raise ValueError(
                f'not a digest time: {text!r} (expected the time as HH:MM from 00:00 to 23:59, e.g. "mon 09:00")'
            )
        return cls(WEEKDAY_NAMES.index(day), time(int(hhmm.group(1)), int(hhmm.group(2))))

    def __str__(self) -> str:
        return f"{WEEKDAY_NAMES[self.weekday]} {self.at:%H:%M}"


@dataclass(frozen=True)
class CalendarSpec:
    """When a team (or an expert) is at work, in its own time zone."""

    name: str
    timezone: str
    hours: WeekHours
    holiday_country: str | None = None
    holiday_subdivision: str | None = None
    closed_dates: frozenset[date] = frozenset()
    # A date listed here uses these periods instead of its weekday's (empty tuple = closed).
    overrides: dict[date, tuple[Period, ...]] = field(default_factory=dict)
    # Weekdays (0 = Monday) that are the weekend, whatever the open hours say: a post arriving on
    # one of them (or on a public holiday or closed date) gets `weekend_first_response`.
    weekend: frozenset[int] = DEFAULT_WEEKEND


@dataclass(frozen=True)
class Expert:
    """A named person who answers customers."""

    id: str
    name: str
    slack_id: str
    timezone: str
    hours: WeekHours
    topics: tuple[str, ...] = ()
    capacity: int = 10
    away_until: date | None = None
    holiday_country: str | None = None
    holiday_subdivision: str | None = None
    email: str | None = None

    @property
    def first_name(self) -> str:
        return self.name.split()[0] if self.name.strip() else self.id

    def calendar(self) -> CalendarSpec:
        """The expert's working hours as a calendar of their own."""
        return CalendarSpec(
            name=f"expert:{self.id}",
            timezone=self.timezone,
            hours=self.hours,
            holiday_country=self.holiday_country,
            holiday_subdivision=self.holiday_subdivision,
        )


@dataclass(frozen=True)
class Team:
    """A group of experts sharing a Slack channel, a calendar and an escalation chain."""

    name: str
    channel: str
    experts: tuple[str, ...]
    calendar: str
    on_call: str | None = None
    manager: str | None = None
    language: str = "en"
    display_name: str | None = None
    # When the weekly digest of last week is posted to the channel; None: no digest ("off").
    digest: DigestSchedule | None = DigestSchedule()
    # Follow the sun: an open conversation whose owner's hours end before its deadline is handed
    # to the next expert on duty when they end.
    follow_the_sun: bool = False
    # Honest acknowledgements (bot.sim.forecast): promise the forecast answer time, not the deadline.
    forecast_ack: bool = False
    # Tell owner and team when the forecast for an open conversation moves past its deadline.
    at_risk: bool = False
    # Which percentile of the forecast answer time is promised and compared with the deadline.
    forecast_percentile: int = 80

    @property
    def label(self) -> str:
        return self.display_name or self.name


EscalationTarget = Literal["owner", "team_channel", "manager", "on_call"]


@dataclass(frozen=True)
class EscalationStep:
    """After `after` past the deadline, tell `notify`."""

    after: timedelta
    notify: EscalationTarget


@dataclass(frozen=True)
class SlaPolicy:
    """Reply targets and what to do as a deadline approaches and passes."""

    name: str
    clock: Literal["wall", "business"]
    calendar: str | None
    first_response: timedelta
    next_response: timedelta | None = None
    weekend_first_response: timedelta | None = None
    warn_at: tuple[float, ...] = (0.75,)
    nag_every: timedelta = timedelta(hours=1)
    escalation: tuple[EscalationStep, ...] = ()
    claim_within: timedelta | None = None
    # A claimed conversation whose owner neither answered nor acted for this long goes to the next
    # expert (the claim is released); None: a claim is kept however long.
    reassign_if_silent: timedelta | None = None
    # Time to resolution (staff close it after answering), on the policy's clock; None: no target.
    resolution: timedelta | None = None
    # A conversation waiting on the customer is closed after this much silence; None: never.
    close_after_silence: timedelta | None = None
    acknowledge: bool = False
    match_teams: tuple[str, ...] = ()
    match_accounts: tuple[str, ...] = ()
    match_priorities: tuple[Priority, ...] = ()

    def matches(self, *, team: str, account: str, priority: str) -> bool:
        """True when every non-empty match list admits this conversation."""
        return (
            (not self.match_teams or team in self.match_teams)
            and (not self.match_accounts or account in self.match_accounts)
            and (not self.match_priorities or priority in self.match_priorities)
        )


@dataclass(frozen=True)
class RoutingRule:
    """One ordered routing rule: the first rule that matches a post decides its team."""

    name: str
    team: str
    priority: Priority = "normal"
    accounts: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None
    authors: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Account:
    """A connector account: one place customers write to us."""

    name: str
    kind: str
    own_ids: tuple[str, ...] = ()
    poll_interval: timedelta = timedelta(minutes=1)
    can_reply: bool = True
    settings: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """Global knobs."""

    conversation_gap: timedelta = timedelta(hours=24)
    default_team: str | None = None
    admin_channel: str | None = None
    # What an acknowledgement calls a customer whose handle the platform does not verify
    # (webhook, feed): never their self-typed name.
    ack_greeting: str | None = None  # None: the template language's word (bot.core.locale_text)
    # Replaces the time left ({due_in}, "within {due_in}", "by {due}") when a post arrives overdue.
    ack_overdue_wording: str | None = None  # None: the template language's own (bot.core.locale_text)
    # Staff may act on another team's conversations (default: only that team, its manager and on-call).
    cross_team_actions: bool = False
    # Retention (None: keep forever): sent outbox rows, events of closed conversations, customer text.
    retention_outbox: timedelta | None = timedelta(days=30)
    retention_events: timedelta | None = timedelta(days=365)
    retention_text: timedelta | None = timedelta(days=180)


@dataclass(frozen=True)
class Policy:
    """The whole validated policy file."""

    source: str
    settings: Settings
    calendars: dict[str, CalendarSpec]
    experts: dict[str, Expert]
    teams: dict[str, Team]
    policies: tuple[SlaPolicy, ...]
    rules: tuple[RoutingRule, ...]
    accounts: dict[str, Account]
    vip_authors: frozenset[str] = frozenset()
    ignored_authors: frozenset[str] = frozenset()
    # team name or "default" -> language -> template
    acknowledgements: dict[str, dict[str, str]] = field(default_factory=dict)

    def policy_for(self, *, team: str, account: str, priority: str) -> SlaPolicy:
        """The first SLA policy that matches (validation guarantees a catch-all exists)."""
        for candidate in self.policies:
            if candidate.matches(team=team, account=account, priority=priority):
                return candidate
        raise LookupError(f"no SLA policy matches team={team} account={account} priority={priority}")

    def acknowledgement_choice(self, *, team: str, languages: Sequence[str]) -> tuple[str, str] | None:
        """The first template for `languages` (best first; team's table, then "default") and
        the language it is written in, which its dates and durations are formatted for."""
        for wanted in languages:
            for key in (team, "default"):
                template = self.acknowledgements.get(key, {}).get(wanted)
                if template:
                    return wanted, template
        return None

    def acknowledgement_template(self, *, team: str, language: str) -> str | None:
        """The acknowledgement template for a team in a language, falling back to defaults."""
        for wanted in (language, "en"):
            for key in (team, "default"):
                template = self.acknowledgements.get(key, {}).get(wanted)
                if template:
                    return template
        return None
