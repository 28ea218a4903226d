"""Small helpers of the validator: time zones, holidays, quoting, "did you mean", days."""

from __future__ import annotations

import difflib
import string
import zoneinfo
from collections.abc import Collection, Iterable
from datetime import date, datetime, time
from functools import lru_cache
from typing import Final

import holidays

from bot.core.policy import (
    WEEKDAY_NAMES,
    Period,
)

PLACEHOLDERS: Final[tuple[str, ...]] = (
    "author",
    "owner_first_name",
    "owner",
    "team",
    "due",
    "due_in",
    "promise",
)
"""The placeholders an acknowledgement template may use."""


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
