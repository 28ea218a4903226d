"""The validator's field converters: reporting, generic access, scalars and compound values."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Literal, TypeVar

from bot.config.helpers import (
    _holiday_countries,
    _holiday_subdivision_ok,
    _known,
    _parse_days,
    _period_text,
    _quote,
    _suggest,
    _time_zones,
    _zone_ok,
    describe,
)
from bot.config.locator import KeyLocator
from bot.config.problems import ConfigProblem, KeyPath, render_key
from bot.config.shape import HolidaysTable, keys_of
from bot.core.policy import (
    WEEKDAY_NAMES,
    DigestSchedule,
    Period,
    WeekHours,
    parse_duration,
)

T = TypeVar("T")

_HOLIDAY_KEYS = keys_of(HolidaysTable)
_PERIOD_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CHANNEL_RE = re.compile(r"^(#[^\s#@,.]{1,80}|[CG][A-Z0-9]{6,})$")
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


class _Fields:
    """Converts and checks single values, collecting problems with their key paths and lines."""

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

    def named_tables(
        self, data: Mapping[str, object], key: str, allowed: Sequence[str] | None = None
    ) -> Iterator[tuple[str, KeyPath, dict[str, object]]]:
        """(name, path, table) for each ``[key.<name>]`` that is a table; with `allowed`, its keys
        are checked (the others are reported, with a "did you mean")."""
        for name, raw in self.section(data, key).items():
            path: KeyPath = (key, name)
            table = self.table(raw, path)
            if table is None:
                continue
            if allowed is not None:
                self.check_keys(table, path, allowed)
            yield name, path, table

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
