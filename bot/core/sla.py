"""The SLA clock: business calendars, business time and reply deadlines.

Everything here is pure: data in, data out, no I/O and no reading of the current time.

Semantics (the tests hold the code to them with a slow minute-by-minute oracle):

* An instant ``t`` is **open** on a calendar iff the local wall time ``L`` of ``t`` in the
  calendar's IANA zone has a time of day inside one of the open periods of ``L``'s local date.
* The periods of a local date ``D`` are: ``overrides[D]`` if present (an empty tuple means
  closed); otherwise nothing if ``D`` is in ``closed_dates`` or is a public holiday; otherwise
  ``hours[D.weekday()]`` (a missing weekday is closed).
* That definition settles daylight saving time without special cases: on a fall-back day a
  period covering the repeated hour is open for both occurrences of it, and on a spring-forward
  day a period that starts inside the gap opens at the first instant after the gap.
* Business time between two instants is the measure of the open instants between them.

Nothing walks minute by minute: each local day's periods are turned into UTC intervals once
(cached), and the arithmetic runs over those intervals.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from bot.core.policy import CalendarSpec, Period, SlaPolicy

__all__ = [
    "BusinessCalendar",
    "Deadline",
    "add_on_clock",
    "compute_deadline",
    "deadline_lines",
    "elapsed",
    "resume_after_pause",
]

Interval = tuple[datetime, datetime]

_DAY = timedelta(days=1)
_SECOND = timedelta(seconds=1)
_ZERO = timedelta(0)
# next_open gives up when nothing opens within this long (and so does add_business_time when a
# calendar falls silent for this long): a calendar that never opens must not loop forever.
_SEARCH_LIMIT = timedelta(days=366)
# Time zone offsets are sampled this far apart when looking for transitions. tzdata has never had
# two transitions that cancel out within six hours, so equal offsets at both ends mean none between.
_OFFSET_SAMPLE = timedelta(hours=6)
# Bound on the per-calendar memo of local dates (a few years of dates is a few thousand entries).
_MEMO_LIMIT = 20_000


def _require_aware(value: datetime, what: str) -> datetime:
    """The same instant in UTC; naive datetimes are refused, since their instant is unknown."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _normalise_periods(periods: Iterable[Period], where: str) -> tuple[Period, ...]:
    """Validate periods and merge overlapping or touching ones (09-12 + 12-17 is 09-17)."""
    checked: list[Period] = []
    for period in periods:
        start, end = period
        if not (0 <= start < end <= 1440):
            raise ValueError(f"{where}: bad period {period!r} (need 0 <= start < end <= 1440 minutes)")
        checked.append((start, end))
    checked.sort()
    merged: list[Period] = []
    for start, end in checked:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return tuple(merged)


class _HolidayTable:
    """One country's (and subdivision's) public holidays, shared by every calendar that uses them.

    Building a `holidays` table costs tens of milliseconds, and the object fills in years lazily
    (mutating itself) on lookup, so it is built once per (country, subdivision) and guarded by a lock.
    """

    def __init__(self, country: str, subdivision: str | None) -> None:
        try:
            self._table: Any = holidays.country_holidays(country, subdiv=subdivision)
        except NotImplementedError as error:  # the package's way of saying "unknown country/subdiv"
            raise ValueError(f"unknown holiday country/subdivision {country!r}/{subdivision!r}") from error
        self._lock = threading.Lock()

    def __contains__(self, day: date) -> bool:
        with self._lock:
            return day in self._table


@lru_cache(maxsize=64)
def _holiday_table(country: str, subdivision: str | None) -> _HolidayTable:
    return _HolidayTable(country, subdivision)


def _utc_offset(tz: ZoneInfo, instant: datetime) -> timedelta:
    offset = instant.astimezone(tz).utcoffset()
    assert offset is not None  # a ZoneInfo always knows its offset for an aware instant
    return offset


@lru_cache(maxsize=8192)
def _offset_segments(tz: ZoneInfo, day: date) -> tuple[tuple[datetime, datetime, timedelta], ...]:
    """Stretches of constant UTC offset covering every instant whose local date can be `day`.

    The window runs from one day before `day`'s midnight (read as UTC) to two days after it,
    which covers any real offset (-12 h to +14 h). Returns (start, end, offset) triples in UTC.
    Shared between calendars: ZoneInfo instances are cached per key, so equal zones hit.
    """
    midnight = datetime.combine(day, time(), tzinfo=UTC)
    window_start, window_end = midnight - _DAY, midnight + 2 * _DAY
    segments: list[tuple[datetime, datetime, timedelta]] = []
    seg_start, seg_offset = window_start, _utc_offset(tz, window_start)
    probe = window_start
    while probe < window_end:
        following = min(probe + _OFFSET_SAMPLE, window_end)
        offset = _utc_offset(tz, following)
        if offset != seg_offset:
            # Bisect to the second: tzdata transitions fall on whole seconds.
            low, high = probe, following
            while high - low > _SECOND:
                middle = low + (high - low) // 2
                middle -= timedelta(microseconds=middle.microsecond)
                if middle <= low:
                    break
                if _utc_offset(tz, middle) == seg_offset:
                    low = middle
                else:
                    high = middle
            segments.append((seg_start, high, seg_offset))
            seg_start, seg_offset = high, _utc_offset(tz, high)
            # Look again from the transition, so a second one in the same sample is not missed.
            probe = high
        else:
            probe = following
    segments.append((seg_start, window_end, seg_offset))
    return tuple(segments)


class BusinessCalendar:
    """A `CalendarSpec` made computable: open/closed tests and business-time arithmetic.

    Build one per calendar and keep it: it memoises each local date's periods (holiday lookups
    are slow-ish) and their UTC intervals. Safe to share between threads.

    Attributes:
        spec: The calendar definition.
        tz: The calendar's time zone.
    """

    spec: CalendarSpec
    tz: ZoneInfo

    def __init__(self, spec: CalendarSpec) -> None:
        """Validate the spec and prepare its lookups.

        Raises:
            ValueError: unknown time zone or holiday country, or a malformed period.
        """
        self.spec = spec
        try:
            self.tz = ZoneInfo(spec.timezone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"calendar {spec.name!r}: unknown time zone {spec.timezone!r}") from error
        self._hours: dict[int, tuple[Period, ...]] = {}
        for weekday, periods in spec.hours.items():
            if weekday not in range(7):
                raise ValueError(f"calendar {spec.name!r}: weekday {weekday!r} is not 0 (Mon) .. 6 (Sun)")
            self._hours[weekday] = _normalise_periods(periods, f"calendar {spec.name!r} weekday {weekday}")
        self._overrides = {
            day: _normalise_periods(periods, f"calendar {spec.name!r} override {day.isoformat()}")
            for day, periods in spec.overrides.items()
        }
        self._holidays = (
            _holiday_table(spec.holiday_country, spec.holiday_subdivision) if spec.holiday_country else None
        )
        self._periods_memo: dict[date, tuple[Period, ...]] = {}
        self._intervals_memo: dict[date, tuple[Interval, ...]] = {}

    def __repr__(self) -> str:
        return f"BusinessCalendar({self.spec.name!r}, {self.spec.timezone!r})"

    # -- the definition -------------------------------------------------------------------------

    def _periods(self, day: date) -> tuple[Period, ...]:
        """The open periods of a local date, by the precedence override > closed > weekday."""
        found = self._periods_memo.get(day)
        if found is not None:
            return found
        if day in self._overrides:
            found = self._overrides[day]
        elif day in self.spec.closed_dates or (self._holidays is not None and day in self._holidays):
            found = ()
        else:
            found = self._hours.get(day.weekday(), ())
        if len(self._periods_memo) >= _MEMO_LIMIT:
            self._periods_memo.clear()
        self._periods_memo[day] = found
        return found

    def _day_intervals(self, day: date) -> tuple[Interval, ...]:
        """The UTC intervals whose instants have local date `day` and lie in one of its periods.

        For each stretch of constant offset, a period's wall-time interval maps to UTC by
        subtracting the offset; clipping to the stretch handles gaps (part of the wall interval
        has no instant) and folds (the repeated wall hour appears in two stretches).
        """
        found = self._intervals_memo.get(day)
        if found is not None:
            return found
        pieces: list[Interval] = []
        periods = self._periods(day)
        if periods:
            midnight = datetime.combine(day, time(), tzinfo=UTC)
            for seg_start, seg_end, offset in _offset_segments(self.tz, day):
                for start, end in periods:
                    low = max(midnight + timedelta(minutes=start) - offset, seg_start)
                    high = min(midnight + timedelta(minutes=end) - offset, seg_end)
                    if low < high:
                        pieces.append((low, high))
            pieces.sort()
            merged: list[Interval] = []
            for low, high in pieces:
                if merged and low <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
                else:
                    merged.append((low, high))
            pieces = merged
        found = tuple(pieces)
        if len(self._intervals_memo) >= _MEMO_LIMIT:
            self._intervals_memo.clear()
        self._intervals_memo[day] = found
        return found

    def _pieces(self, since: datetime, until: datetime | None) -> Iterator[Interval]:
        """Open stretches in UTC order after `since` (UTC), clipped to start there, not coalesced.

        Yields disjoint intervals, sorted; consecutive ones may touch (a period ending at 24:00 and
        the next day's starting at 00:00, or a split made here). With `until`, stops once nothing
        more can start before it; without, stops after `_SEARCH_LIMIT` with nothing open.
        """
        # Intervals of a local date D lie within [D - 1 day, D + 2 days) read as UTC (see
        # _offset_segments), so dates before since's UTC date - 1 end before `since`; one more
        # day of margin costs a memo lookup.
        day = since.date() - 2 * _DAY
        pending: list[Interval] = []
        last_open = since
        while True:
            day_intervals = self._day_intervals(day)
            # Every later local date's intervals start at or after this instant.
            horizon = datetime.combine(day, time(), tzinfo=UTC)
            for low, high in day_intervals:
                if high > since:
                    # Clip here so that every piece handed out lies after `since`.
                    bisect.insort(pending, (max(low, since), high))
            # Hand out everything before the horizon; nothing later can land before it.
            while pending and pending[0][0] < horizon:
                low, high = pending[0]
                if high <= horizon:
                    pending.pop(0)
                    yield (low, high)
                else:
                    pending[0] = (horizon, high)
                    yield (low, horizon)
                last_open = min(high, horizon)
            if until is not None:
                if horizon >= until:
                    break
            elif not pending and horizon - last_open > _SEARCH_LIMIT + 2 * _DAY:
                return
            day += _DAY
        yield from pending

    def _advance(self, start: datetime, amounts: Sequence[timedelta]) -> list[datetime]:
        """The earliest instants by which each amount of open time has passed since `start`.

        `amounts` must be sorted and not negative; an amount of 0 gives the next opening. One
        walk over the calendar serves them all (a deadline and its warnings).
        """
        results: list[datetime] = []
        if not amounts:
            return results
        index, consumed = 0, _ZERO
        for low, high in self._pieces(start, None):
            low = max(low, start)
            length = high - low
            while amounts[index] - consumed <= length:
                results.append(low + (amounts[index] - consumed))
                index += 1
                if index == len(amounts):
                    return results
            consumed += length
        raise ValueError(
            f"calendar {self.spec.name!r} has no open time for {_SEARCH_LIMIT.days} days after "
            f"{start.isoformat()}; cannot add {amounts[index]}"
        )

    # -- public API ------------------------------------------------------------------------------

    def is_open(self, at: datetime) -> bool:
        """Whether the calendar is open at an instant.

        Args:
            at: A timezone-aware instant.

        Raises:
            ValueError: `at` is naive.
        """
        local = _require_aware(at, "at").astimezone(self.tz)
        second = local.hour * 3600 + local.minute * 60 + local.second
        # Periods are whole minutes, so comparing whole seconds is exact even with microseconds.
        return any(start * 60 <= second < end * 60 for start, end in self._periods(local.date()))

    def is_working_day(self, day: date) -> bool:
        """Whether a local date has any open period (after overrides, closures and holidays).

        A day whose only period falls entirely inside a DST gap still counts as a working day.

        Raises:
            TypeError: `day` is a datetime (it would never match a date key); pass
                ``instant.astimezone(calendar.tz).date()`` instead.
        """
        if isinstance(day, datetime):
            raise TypeError("is_working_day takes a local date, not a datetime")
        return bool(self._periods(day))

    def is_weekend_or_holiday(self, day: date) -> bool:
        """Whether a local date is a weekend day by name, a public holiday or a closed date.

        This is what a support lead means by "posts at weekends": it depends on the calendar's
        ``weekend`` days, not on its open hours, so a Saturday with Saturday hours is still a
        weekend day. Overrides change the hours of a date, not whether it is a weekend.

        Raises:
            TypeError: `day` is a datetime (pass a local date).
        """
        if isinstance(day, datetime):
            raise TypeError("is_weekend_or_holiday takes a local date, not a datetime")
        if day.weekday() in self.spec.weekend or day in self.spec.closed_dates:
            return True
        return self._holidays is not None and day in self._holidays

    def open_intervals(self, start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
        """The open stretches between two instants, as UTC intervals clipped to [start, end).

        Adjacent stretches are merged, so a period ending at 24:00 followed by one starting at
        00:00 the next day yields one interval.

        Args:
            start: Timezone-aware start (inclusive).
            end: Timezone-aware end (exclusive); nothing is yielded if it is not after `start`.

        Raises:
            ValueError: a naive argument (raised at once, not on first iteration).
        """
        start_utc = _require_aware(start, "start")
        end_utc = _require_aware(end, "end")
        return self._clipped(start_utc, end_utc)

    def _clipped(self, start: datetime, end: datetime) -> Iterator[Interval]:
        if end <= start:
            return
        current: Interval | None = None
        for low, high in self._pieces(start, end):
            if low >= end:
                break
            low, high = max(low, start), min(high, end)
            if current is not None and low <= current[1]:
                current = (current[0], high)
            else:
                if current is not None:
                    yield current
                current = (low, high)
        if current is not None:
            yield current

    def next_open(self, at: datetime) -> datetime:
        """The first open instant at or after `at`, in UTC (`at` itself when already open).

        Raises:
            ValueError: `at` is naive, or nothing opens within 366 days.
        """
        at_utc = _require_aware(at, "at")
        for low, _high in self._pieces(at_utc, None):
            found = max(low, at_utc)
            if found - at_utc > _SEARCH_LIMIT:
                break
            return found
        raise ValueError(f"calendar {self.spec.name!r} does not open within 366 days of {at.isoformat()}")

    def add_business_time(self, start: datetime, amount: timedelta) -> datetime:
        """The instant (UTC) at which `amount` of open time has elapsed since `start`.

        This is the earliest such instant, so a deadline that uses up a period exactly falls on
        the period's end (Friday 17:00), not on the next opening. An amount of zero gives
        `next_open(start)`.

        Raises:
            ValueError: naive `start`, negative `amount`, or the calendar stays closed for 366
                days before the amount is used up.
        """
        start_utc = _require_aware(start, "start")
        if amount < _ZERO:
            raise ValueError(f"amount must not be negative, got {amount}")
        if amount == _ZERO:
            return self.next_open(start_utc)
        return self._advance(start_utc, [amount])[0]

    def business_time_between(self, start: datetime, end: datetime) -> timedelta:
        """The open time between two instants (zero when `end` is not after `start`).

        Raises:
            ValueError: a naive argument.
        """
        total = _ZERO
        for low, high in self.open_intervals(start, end):
            total += high - low
        return total


@dataclass(frozen=True)
class Deadline:
    """When a reply is due, and when to warn that it soon will be.

    Attributes:
        clock_started_at: When the clock actually started (the next opening on a business clock).
        due_at: When the reply is due (UTC).
        target: The target that applied (first_response, next_response or weekend_first_response).
        warn_at: One instant per warn fraction strictly between 0 and 1, sorted, each before due_at.
    """

    clock_started_at: datetime
    due_at: datetime
    target: timedelta
    warn_at: tuple[datetime, ...]


def _target_for(
    policy: SlaPolicy, calendar: BusinessCalendar | None, received_at: datetime, kind: str
) -> timedelta:
    if kind == "next":
        return policy.next_response if policy.next_response is not None else policy.first_response
    if kind != "first":
        raise ValueError(f"kind must be 'first' or 'next', got {kind!r}")
    if policy.weekend_first_response is not None and calendar is not None:
        local_day = received_at.astimezone(calendar.tz).date()
        if calendar.is_weekend_or_holiday(local_day):
            return policy.weekend_first_response
    return policy.first_response


def _business_calendar(policy: SlaPolicy, calendar: BusinessCalendar | None) -> BusinessCalendar:
    if calendar is None:
        raise ValueError(f"policy {policy.name!r} runs on business time and needs a calendar")
    return calendar


def compute_deadline(
    policy: SlaPolicy,
    calendar: BusinessCalendar | None,
    received_at: datetime,
    *,
    kind: Literal["first", "next"] = "first",
) -> Deadline:
    """The deadline for a reply to a post received at `received_at`.

    The target is `first_response` (kind "first") or `next_response` (kind "next", falling back
    to `first_response`). For a first response, if the policy has `weekend_first_response` and a
    calendar is given, a post whose local date (in the calendar's zone) is a weekend day of the
    calendar, a public holiday or a closed date gets that target instead, whatever the open hours. On
    a "wall" clock the deadline is `received_at + target` (the calendar only decides the working
    day); on a "business" clock the clock starts at the next opening and counts open time only.

    Args:
        policy: The SLA policy that matched the conversation.
        calendar: The policy's calendar; required for a business clock.
        received_at: When the customer's post arrived (timezone-aware).
        kind: "first" for a first response, "next" for a reply after we already answered.

    Returns:
        The deadline, every instant in UTC. Warn fractions outside (0, 1) are ignored, and
        repeated ones give one warning.

    Raises:
        ValueError: naive `received_at`, a business clock without a calendar, a negative target,
            or a business calendar that stays closed for a year.
    """
    received = _require_aware(received_at, "received_at")
    target = _target_for(policy, calendar, received, kind)
    if target < _ZERO:
        raise ValueError(f"policy {policy.name!r}: negative target {target}")
    fractions = sorted({fraction for fraction in policy.warn_at if 0.0 < fraction < 1.0})
    warn_amounts = [target * fraction for fraction in fractions]
    if policy.clock == "wall":
        started = received
        due = received + target
        warnings = [received + amount for amount in warn_amounts]
    elif policy.clock == "business":
        business = _business_calendar(policy, calendar)
        # One walk over the calendar gives the start (amount 0), every warning and the deadline.
        instants = business._advance(received, [_ZERO, *warn_amounts, target])
        started, due, warnings = instants[0], instants[-1], instants[1:-1]
    else:
        raise ValueError(f"policy {policy.name!r}: unknown clock {policy.clock!r}")
    # Sub-microsecond rounding of target * fraction could land a warning on the deadline itself.
    warn_at = tuple(sorted({instant for instant in warnings if instant < due}))
    return Deadline(clock_started_at=started, due_at=due, target=target, warn_at=warn_at)


def elapsed(
    policy: SlaPolicy, calendar: BusinessCalendar | None, start: datetime, end: datetime
) -> timedelta:
    """Time on the policy's clock between two instants (zero when `end` is not after `start`).

    Raises:
        ValueError: a naive argument, or a business clock without a calendar.
    """
    start_utc = _require_aware(start, "start")
    end_utc = _require_aware(end, "end")
    if policy.clock == "business":
        return _business_calendar(policy, calendar).business_time_between(start_utc, end_utc)
    return max(end_utc - start_utc, _ZERO)


def add_on_clock(
    policy: SlaPolicy, calendar: BusinessCalendar | None, start: datetime, amount: timedelta
) -> datetime:
    """The instant `amount` of the policy's clock after `start` (wall: plain; business: open time).

    Raises:
        ValueError: a naive `start`, a negative amount, or a business clock without a calendar.
    """
    start_utc = _require_aware(start, "start")
    if amount < _ZERO:
        raise ValueError(f"amount must not be negative, got {amount}")
    if policy.clock == "business":
        return _business_calendar(policy, calendar).add_business_time(start_utc, amount)
    return start_utc + amount


def resume_after_pause(
    policy: SlaPolicy,
    calendar: BusinessCalendar | None,
    due_at: datetime,
    paused_at: datetime,
    resumed_at: datetime,
) -> datetime:
    """A deadline moved by a pause: what was left on the policy's clock when it paused is left
    when it resumes. A deadline already passed when the pause began does not move.

    Raises:
        ValueError: a naive argument, or a business clock without a calendar.
    """
    due = _require_aware(due_at, "due_at")
    paused = _require_aware(paused_at, "paused_at")
    resumed = _require_aware(resumed_at, "resumed_at")
    if due <= paused or resumed <= paused:
        return due
    left = elapsed(policy, calendar, paused, due)
    return max(add_on_clock(policy, calendar, resumed, left), due)


def _format_utc(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def deadline_lines(calendar: BusinessCalendar, target: timedelta, starts: Iterable[str]) -> Iterator[str]:
    """Lines for `replyclock deadline`: the business-time deadline for each start time.

    Each start is an ISO-8601 date-time, either with an offset or naive (then read as local time
    in the calendar's zone; an ambiguous fall-back time means its first occurrence, and a time
    inside a spring-forward gap is read with the offset before the gap, as `zoneinfo` does).
    Blank strings are skipped. A start that cannot be used yields a line beginning ``error: ``
    and the remaining starts are still processed.

    Yields:
        ``"<start as given>  ->  due <local ISO with offset>  (<UTC ISO ending in Z>)"``.

    Raises:
        ValueError: `target` is negative.
    """
    if target < _ZERO:
        raise ValueError(f"target must not be negative, got {target}")
    return _deadline_lines(calendar, target, starts)


def _deadline_lines(calendar: BusinessCalendar, target: timedelta, starts: Iterable[str]) -> Iterator[str]:
    for raw in starts:
        text = raw.strip()
        if not text:
            continue
        try:
            start = datetime.fromisoformat(text)
        except ValueError:
            yield f"error: {text!r} is not an ISO-8601 date-time (e.g. 2026-03-06T16:00+01:00)"
            continue
        if start.tzinfo is None:
            start = start.replace(tzinfo=calendar.tz)
        try:
            due = calendar.add_business_time(start, target)
        except (ValueError, OverflowError) as error:
            yield f"error: {text!r}: {error}"
            continue
        yield f"{text}  ->  due {due.astimezone(calendar.tz).isoformat()}  ({_format_utc(due)})"
