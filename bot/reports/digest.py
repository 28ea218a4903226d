"""The weekly digest: one team's figures for one ISO week, set against the week before.

The figures are pure functions of `ConversationFacts` (small frozen rows extracted from the
database by `load_facts`), so they are tested on hand-checked data without a database. The
database edge (`load_week`, `build_digest`) and the text (`render_text`) sit around them; the
chart is `bot.reports.chart.render_chart`.

What the figures mean (W is the ISO week ``[start, end)`` in the team calendar's time zone):

* **Posts received**: customer posts (direction "in") of the team's conversations whose
  ``posted_at`` falls in W. Posts from ignored authors belong to no team and are not counted.
* **Opened**: conversations whose ``opened_at`` falls in W.
* **First responses** ("answered"): conversations whose ``first_response_at`` falls in W,
  whenever they were opened. Response times (median and 90th percentile) are over these, from
  ``opened_at`` (the customer's post) to ``first_response_at``:

  - *wall*: plain elapsed time;
  - *business*: open time on the calendar the conversation's policy counts with (the policy's
    own calendar, else the team's), measured with `bot.core.sla.elapsed` on a business clock whatever
    clock the policy's deadline runs on, so wall-clock teams also see how many working hours
    customers waited.

* **Closed without reply**: conversations never answered whose ``closed_at`` falls in W, by
  reason. They leave every compliance figure (share within SLA, breaches), as the design says.
* **Within SLA** and **breached** are the verdict of `bot.core.sla_outcome.sla_outcome` on the
  *first* cycle's deadline ``first_due_at`` (stored at opening; recomputed from policy and
  calendar for rows older than that), the same function the export, ``/replyclock stats``, the
  App Home and the metrics use. Next-response cycles are not judged here.
* **Share answered within SLA**: every conversation is judged once, in the week its verdict
  became known: on time in the week of its first response (if that came by the deadline),
  missed in the week its first deadline passed unanswered. So
  ``share = on time / (on time + deadlines missed)``, and a conversation nobody answers drags
  the share down in the very week its deadline passes, not only once someone gets to it.
* **Deadlines missed** (breaches): the same missed conversations, each with its owner and how
  late: first response minus deadline when answered, else (still unanswered) week end minus
  deadline.
* **Resolution** (policies with ``resolution``): resolved = closed by staff after an answer; in
  time when closed by ``resolution_due_at`` (which moves on by the time spent waiting on the
  customer). Resolved within target counts those closed in W; resolution targets missed counts
  those whose target fell in W unresolved or resolved late (`bot.core.sla_outcome`).
* **Backlog**: conversations waiting for a response at the end of W: opened before the end,
  not closed by then, and either not yet first-answered then, or in a later cycle that started
  before the end and was not answered by then (an earlier reopened cycle that was already over
  by the time the facts are read cannot be seen on the row). The oldest is the one waiting
  longest.
* **Per expert**: first responses in W attributed to the expert who gave them (the actor of the
  first "answered" event, when that is an expert) or else to the conversation's owner; with how
  many were within SLA and the median response time.
* **Acknowledgements sent**: "ack" outbox rows sent in W (not the ones skipped because a human
  answered first).

Percentiles use the **nearest-rank** method (see `percentile`): every figure is a response time
some customer actually had, and "90 % were answered within P90" is literally true.

A digest is computed from what the database knows when it runs: closing an old conversation
without reply, or answering an old breach, can still change a past week's figures.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, not_, or_, select
from sqlalchemy.orm import Session

from bot.core.messages import duration_in_words, escape_mrkdwn
from bot.core.policy import SlaPolicy
from bot.core.sla import BusinessCalendar, elapsed
from bot.core.sla_outcome import SlaOutcome, resolution_outcome, sla_outcome
from bot.flow.context import AppContext
from bot.flow.conversations import deadline_for, first_due_at, policy_of
from storage.models import SENT, Conversation, Event, Outbox, Post

__all__ = [
    "BacklogItem",
    "Breach",
    "ConversationFacts",
    "DayFigures",
    "Digest",
    "ExpertFigures",
    "WeekData",
    "WeekFigures",
    "WeekRange",
    "build_digest",
    "compute_digest",
    "compute_week",
    "load_facts",
    "load_week",
    "median",
    "percentile",
    "render_text",
    "share",
]

UNASSIGNED = "(nobody)"
# How far before a week load_facts looks for conversations that may still matter to it (a first
# deadline in the week, for one opened this long before, would need a target of over a month).
LOOKBACK = timedelta(days=35)
# Breaches listed one by one in the text; more are summarised in one line.
MAX_LISTED_BREACHES = 15
_ZERO = timedelta(0)


# --- percentiles and shares --------------------------------------------------------------------


class _Comparable(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


OrderedT = TypeVar("OrderedT", bound=_Comparable)


def percentile(values: Iterable[OrderedT], q: float) -> OrderedT | None:
    """The q-th percentile by the nearest-rank method; None when there are no values.

    Sort the n values; the result is the one at rank ``max(1, ceil(q / 100 * n))`` (1-based):
    the smallest value with at least q % of the values at or below it. It is always one of the
    values (no interpolation), so it works for any ordered type (timedeltas, numbers). The median
    is ``percentile(values, 50)``: the lower middle value for an even count. ``q`` is read as the
    decimal it was written as (90.0, 99.9), so boundaries are exact.

    Examples (hand-checked): for ``[15, 20, 35, 40, 50]`` the 30th percentile is 20 (rank
    ceil(1.5) = 2), the 40th is 20 (rank 2), the 50th is 35 (rank ceil(2.5) = 3), the 100th
    is 50, the 0th is 15.

    Raises:
        ValueError: q is not within [0, 100].
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q!r}")
    ordered = sorted(values)
    if not ordered:
        return None
    exact = Fraction(q) if isinstance(q, int) else Fraction(repr(float(q)))
    rank = max(1, math.ceil(exact * len(ordered) / 100))
    return ordered[rank - 1]


def median(values: Iterable[OrderedT]) -> OrderedT | None:
    """The nearest-rank median (`percentile` 50): the lower middle value for an even count."""
    return percentile(values, 50)


def share(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator``, or None when there is nothing to share (denominator 0).

    Raises:
        ValueError: a negative count, or a numerator above the denominator.
    """
    if numerator < 0 or denominator < 0 or numerator > denominator:
        raise ValueError(f"not a share: {numerator} of {denominator}")
    if denominator == 0:
        return None
    return numerator / denominator


# --- weeks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Day:
    """One local calendar day of a week, as the UTC interval ``[start, end)`` it covers."""

    day: date
    start: datetime
    end: datetime


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of a local date, in UTC.

    A midnight inside a DST gap reads with the offset before the gap (``fold=0``), which lands on
    the first instant after the gap: still the first instant of that date.
    """
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True)
class WeekRange:
    """An ISO week (Monday to Sunday) in a time zone, as the UTC interval ``[start, end)``.

    A week across a DST change is not 168 hours long: the week of 2026-10-25 in Europe/Berlin
    has 169 hours, its Sunday 25.

    Attributes:
        year: ISO year.
        week: ISO week number (1 to 52 or 53).
        timezone: IANA name of the zone whose midnights bound the week.
        start: Monday 00:00 local, in UTC.
        end: the next Monday 00:00 local, in UTC.
    """

    year: int
    week: int
    timezone: str
    start: datetime = field(init=False, compare=False)
    end: datetime = field(init=False, compare=False)

    def __post_init__(self) -> None:
        try:
            monday = date.fromisocalendar(self.year, self.week, 1)
        except ValueError as error:
            raise ValueError(f"no ISO week {self.year}-W{self.week:02d}") from error
        try:
            tz = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {self.timezone!r}") from error
        object.__setattr__(self, "start", _local_midnight(monday, tz))
        object.__setattr__(self, "end", _local_midnight(monday + timedelta(days=7), tz))

    @classmethod
    def parse(cls, text: str, timezone: str) -> WeekRange:
        """A week from ``"2026-W47"`` (also ``"2026W47"``, ``"2026-w47"``).

        Raises:
            ValueError: not that shape, or no such week.
        """
        compact = text.strip().upper().replace("-", "")
        year_text, separator, week_text = compact.partition("W")
        if not separator or len(year_text) != 4 or not year_text.isdigit() or not week_text.isdigit():
            raise ValueError(f"not an ISO week: {text!r} (use e.g. 2026-W47)")
        return cls(int(year_text), int(week_text), timezone)

    @classmethod
    def containing(cls, instant: datetime, timezone: str) -> WeekRange:
        """The week whose local days include `instant`.

        Raises:
            ValueError: `instant` is naive.
        """
        if instant.tzinfo is None:
            raise ValueError("containing() needs a timezone-aware instant")
        iso = instant.astimezone(ZoneInfo(timezone)).isocalendar()
        return cls(iso.year, iso.week, timezone)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def label(self) -> str:
        """``2026-W47``."""
        return f"{self.year}-W{self.week:02d}"

    @property
    def first_day(self) -> date:
        """The Monday."""
        return date.fromisocalendar(self.year, self.week, 1)

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    def previous(self) -> WeekRange:
        iso = (self.first_day - timedelta(days=7)).isocalendar()
        return WeekRange(iso.year, iso.week, self.timezone)

    def next(self) -> WeekRange:
        iso = (self.first_day + timedelta(days=7)).isocalendar()
        return WeekRange(iso.year, iso.week, self.timezone)

    def days(self) -> tuple[Day, ...]:
        """The seven local days, Monday first."""
        tz = self.tz
        dates = [self.first_day + timedelta(days=offset) for offset in range(8)]
        bounds = [_local_midnight(day, tz) for day in dates]
        return tuple(Day(dates[i], bounds[i], bounds[i + 1]) for i in range(7))

    def day_index(self, instant: datetime) -> int | None:
        """Which local day (0 = Monday) `instant` falls on, None when outside the week."""
        if not self.start <= instant < self.end:
            return None
        starts = [day.start for day in self.days()]
        return bisect.bisect_right(starts, instant) - 1

    def __contains__(self, instant: object) -> bool:
        return isinstance(instant, datetime) and self.start <= instant < self.end

    def describe(self) -> str:
        """``Mon 23 Nov - Sun 29 Nov 2026`` (with an en dash)."""
        monday, sunday = self.first_day, self.first_day + timedelta(days=6)
        return f"{monday:%a} {monday.day} {monday:%b} \u2013 {sunday:%a} {sunday.day} {sunday:%b %Y}"


# --- the facts the figures are made of -----------------------------------------------------------


@dataclass(frozen=True)
class ConversationFacts:
    """What the digest needs to know about one conversation (extracted by `load_facts`).

    Attributes:
        id: The conversation id.
        policy: Name of its SLA policy (a key of the ``policies`` mapping).
        calendar: Name of the calendar business time is counted on (the policy's, else the team's).
        customer: The customer's handle or name, verbatim (untrusted: escaped when rendered).
        owner: Expert id of the owner, if any.
        opened_at: The customer's first post.
        first_due_at: Deadline of the first cycle (first response).
        first_target: The target that deadline was computed with (on the policy's clock).
        first_response_at: When the first human response came, if it did.
        first_responder: Expert id of whoever gave the first response, when known to be an expert.
        closed_at: When staff closed it, if they did.
        close_reason: Why.
        cycle: Current cycle (0 = waiting for or past the first response).
        cycle_started_at: When the current cycle started (defaults to ``opened_at``).
        answered_at: When the current cycle was answered (None while waiting).
    """

    id: int
    policy: str
    calendar: str
    customer: str
    owner: str | None
    opened_at: datetime
    first_due_at: datetime
    first_target: timedelta
    first_response_at: datetime | None = None
    first_responder: str | None = None
    closed_at: datetime | None = None
    close_reason: str | None = None
    cycle: int = 0
    cycle_started_at: datetime | None = None
    answered_at: datetime | None = None
    resolution_due_at: datetime | None = None
    waiting_on_customer_since: datetime | None = None

    def resolution(self, now: datetime) -> SlaOutcome | None:
        """The one verdict on the resolution target, as read at `now` (None without a target)."""
        if self.resolution_due_at is None:
            return None
        return resolution_outcome(
            resolution_due_at=self.resolution_due_at,
            first_response_at=self.first_response_at,
            closed_at=self.closed_at,
            waiting_since=self.waiting_on_customer_since,
            now=now,
        )

    @property
    def closed_without_reply(self) -> bool:
        return self.closed_at is not None and self.first_response_at is None

    def outcome(self, now: datetime) -> SlaOutcome:
        """The one verdict on the first response, as read at `now` (see `bot.core.sla_outcome`)."""
        return sla_outcome(
            due_at=self.first_due_at, responded_at=self.first_response_at, closed_at=self.closed_at, now=now
        )

    @property
    def answered_in_time(self) -> bool:
        return self.outcome(self.first_due_at).within

    def waiting_since(self, at: datetime) -> datetime | None:
        """Since when the customer was waiting for us at instant `at`, None if not waiting then."""
        if self.opened_at >= at or (self.closed_at is not None and self.closed_at < at):
            return None
        if self.first_response_at is None or self.first_response_at >= at:
            return self.opened_at
        started = self.cycle_started_at
        if (
            self.cycle > 0
            and started is not None
            and started < at
            and (self.answered_at is None or self.answered_at >= at)
        ):
            return started
        return None


@dataclass(frozen=True)
class WeekData:
    """Everything one week's figures are computed from."""

    week: WeekRange
    conversations: tuple[ConversationFacts, ...]
    posts: int
    acks: int


# --- the figures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Breach:
    """A first-response deadline missed in the week."""

    conversation_id: int
    customer: str
    owner: str | None
    owner_name: str
    due_at: datetime
    first_response_at: datetime | None
    late_by: timedelta  # response - deadline; if unanswered, week end - deadline

    @property
    def answered(self) -> bool:
        return self.first_response_at is not None


@dataclass(frozen=True)
class BacklogItem:
    """A conversation waiting for a response at the end of the week."""

    conversation_id: int
    customer: str
    owner: str | None
    owner_name: str
    waiting_since: datetime
    waited: timedelta  # until the end of the week


@dataclass(frozen=True)
class ExpertFigures:
    """One expert's first responses in the week."""

    expert: str
    name: str
    handled: int
    within_sla: int
    median_response: timedelta | None
    median_business: timedelta | None


@dataclass(frozen=True)
class DayFigures:
    """One local day, for the chart.

    Attributes:
        day: The local date.
        used: For each first response given that day, the share of its deadline's time used
            (response time on the policy's clock / target): 1.0 is exactly on the deadline.
            On a business clock a late answer given after hours uses exactly 1.0, hence:
        on_time: For each of `used`, whether that response was within SLA.
        median_used: Nearest-rank median of `used`, None without responses.
        missed: Deadlines that passed without a response by then, that day.
    """

    day: date
    used: tuple[float, ...]
    on_time: tuple[bool, ...]
    median_used: float | None
    missed: int


@dataclass(frozen=True)
class WeekFigures:
    """One week's figures (see the module docstring for what each means)."""

    week: WeekRange
    posts: int
    opened: int
    answered: int
    closed_without_reply: tuple[tuple[str, int], ...]  # (reason, count), most frequent first
    within_sla: int
    judged: int
    share_within_sla: float | None
    median_response: timedelta | None
    p90_response: timedelta | None
    median_business: timedelta | None
    p90_business: timedelta | None
    breaches: tuple[Breach, ...]
    backlog: int
    oldest: BacklogItem | None
    experts: tuple[ExpertFigures, ...]
    acks: int
    days: tuple[DayFigures, ...]
    # Resolution targets (policy `resolution`): resolved (closed after an answer) in time in the
    # week, and conversation ids whose resolution deadline passed in the week unresolved or late.
    resolved_within_target: int = 0
    resolution_breaches: tuple[int, ...] = ()

    @property
    def closed_without_reply_total(self) -> int:
        return sum(count for _reason, count in self.closed_without_reply)

    @property
    def is_empty(self) -> bool:
        """Nothing happened and nothing was waiting."""
        return not (
            self.posts
            or self.opened
            or self.answered
            or self.closed_without_reply
            or self.breaches
            or self.backlog
            or self.acks
        )


@dataclass(frozen=True)
class Digest:
    """A team's digest: this week's figures and last week's for comparison."""

    team: str
    team_label: str
    current: WeekFigures
    previous: WeekFigures

    @property
    def week(self) -> WeekRange:
        return self.current.week


NO_REASON = "no reason given"


def _business_view(policy: SlaPolicy) -> SlaPolicy:
    """The policy on a business clock: `elapsed` then counts the calendar's open time only."""
    return policy if policy.clock == "business" else replace(policy, clock="business")


def compute_week(
    data: WeekData,
    *,
    policies: Mapping[str, SlaPolicy],
    calendars: Mapping[str, BusinessCalendar],
    names: Mapping[str, str] | None = None,
) -> WeekFigures:
    """The figures of one week, from facts alone (pure).

    Args:
        data: The week, the facts of every conversation that may matter to it (others are
            ignored, so passing more is harmless), and the post and acknowledgement counts.
        policies: SLA policies by name (every ``facts.policy`` must be there).
        calendars: Business calendars by name (every ``facts.calendar`` must be there).
        names: Display names of experts by id (missing ones show as the id).

    Raises:
        KeyError: a policy or calendar named by the facts is missing.
    """
    week, facts = data.week, data.conversations
    people = names or {}

    def name_of(expert: str | None) -> str:
        return people.get(expert, expert) if expert else UNASSIGNED

    def in_week(instant: datetime | None) -> bool:
        return instant is not None and week.start <= instant < week.end

    first_responses = sorted(
        (f for f in facts if in_week(f.first_response_at)),
        key=lambda f: (f.first_response_at, f.id),
    )
    reasons = Counter(
        f.close_reason or NO_REASON for f in facts if f.first_response_at is None and in_week(f.closed_at)
    )
    missed = sorted(
        (f for f in facts if in_week(f.first_due_at) and f.outcome(week.end).breached),
        key=lambda f: (f.first_due_at, f.id),
    )
    on_time = [f for f in first_responses if f.answered_in_time]

    wall: dict[int, timedelta] = {}
    business: dict[int, timedelta] = {}
    used: dict[int, float] = {}
    for f in first_responses:
        responded = f.first_response_at
        assert responded is not None
        policy, calendar = policies[f.policy], calendars[f.calendar]
        wall[f.id] = max(responded - f.opened_at, _ZERO)
        business[f.id] = elapsed(_business_view(policy), calendar, f.opened_at, responded)
        if f.first_target > _ZERO:
            used[f.id] = elapsed(policy, calendar, f.opened_at, responded) / f.first_target

    breaches = tuple(
        Breach(
            conversation_id=f.id,
            customer=f.customer,
            owner=f.owner,
            owner_name=name_of(f.owner),
            due_at=f.first_due_at,
            first_response_at=f.first_response_at,
            late_by=f.outcome(week.end).late_by,
        )
        for f in missed
    )

    waiting = [(since, f) for f in facts if (since := f.waiting_since(week.end)) is not None]
    oldest: BacklogItem | None = None
    if waiting:
        since, f = min(waiting, key=lambda item: (item[0], item[1].id))
        oldest = BacklogItem(f.id, f.customer, f.owner, name_of(f.owner), since, week.end - since)

    by_expert: dict[str, list[ConversationFacts]] = {}
    for f in first_responses:
        by_expert.setdefault(f.first_responder or f.owner or UNASSIGNED, []).append(f)
    experts = tuple(
        sorted(
            (
                ExpertFigures(
                    expert=expert,
                    name=name_of(None if expert == UNASSIGNED else expert),
                    handled=len(handled),
                    within_sla=sum(1 for f in handled if f.answered_in_time),
                    median_response=median(wall[f.id] for f in handled),
                    median_business=median(business[f.id] for f in handled),
                )
                for expert, handled in by_expert.items()
            ),
            key=lambda e: (-e.handled, e.name, e.expert),
        )
    )

    days: list[DayFigures] = []
    used_by_day: list[list[tuple[float, bool]]] = [[] for _ in range(7)]
    missed_by_day = [0] * 7
    day_starts = [day.start for day in week.days()]
    for f in first_responses:
        if f.id in used:
            assert f.first_response_at is not None
            index = bisect.bisect_right(day_starts, f.first_response_at) - 1
            used_by_day[index].append((used[f.id], f.answered_in_time))
    for f in missed:
        missed_by_day[bisect.bisect_right(day_starts, f.first_due_at) - 1] += 1
    for index, day in enumerate(week.days()):
        values = tuple(value for value, _ in used_by_day[index])
        flags = tuple(flag for _, flag in used_by_day[index])
        days.append(DayFigures(day.day, values, flags, median(values), missed_by_day[index]))

    wall_times = list(wall.values())
    business_times = list(business.values())
    resolutions = [(f, f.resolution(week.end)) for f in facts]
    resolved_within = sum(
        1 for f, verdict in resolutions if verdict is not None and verdict.within and in_week(f.closed_at)
    )
    resolution_breaches = tuple(
        f.id
        for f, verdict in resolutions
        if verdict is not None and verdict.breached and in_week(verdict.due_at)
    )
    return WeekFigures(
        resolved_within_target=resolved_within,
        resolution_breaches=resolution_breaches,
        week=week,
        posts=data.posts,
        opened=sum(1 for f in facts if in_week(f.opened_at)),
        answered=len(first_responses),
        closed_without_reply=tuple(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        within_sla=len(on_time),
        judged=len(on_time) + len(missed),
        share_within_sla=share(len(on_time), len(on_time) + len(missed)),
        median_response=median(wall_times),
        p90_response=percentile(wall_times, 90),
        median_business=median(business_times),
        p90_business=percentile(business_times, 90),
        breaches=breaches,
        backlog=len(waiting),
        oldest=oldest,
        experts=experts,
        acks=data.acks,
        days=tuple(days),
    )


def compute_digest(
    team: str,
    current: WeekData,
    previous: WeekData,
    *,
    policies: Mapping[str, SlaPolicy],
    calendars: Mapping[str, BusinessCalendar],
    names: Mapping[str, str] | None = None,
    team_label: str | None = None,
) -> Digest:
    """A team's digest for `current`'s week against `previous` (pure; see `compute_week`)."""
    return Digest(
        team=team,
        team_label=team_label or team,
        current=compute_week(current, policies=policies, calendars=calendars, names=names),
        previous=compute_week(previous, policies=policies, calendars=calendars, names=names),
    )


# --- the database edge ---------------------------------------------------------------------------


def team_week(ctx: AppContext, team: str, text: str | None = None) -> WeekRange:
    """The week `text` (``2026-W47``) in the team's time zone; without it, the last completed week.

    Raises:
        KeyError: unknown team.
        ValueError: `text` is not an ISO week.
    """
    timezone = ctx.calendar(ctx.policy.teams[team].calendar).spec.timezone
    if text:
        return WeekRange.parse(text, timezone)
    return WeekRange.containing(ctx.clock.now(), timezone).previous()


def _expert_of_actor(ctx: AppContext, actor: str | None) -> str | None:
    """The expert id an audit actor names ("expert:maria", "maria", or a Slack id), if any."""
    if not actor:
        return None
    candidate = actor.split(":", 1)[1] if actor.startswith(("expert:", "slack:")) else actor
    if candidate in ctx.policy.experts:
        return candidate
    for expert in ctx.policy.experts.values():
        if expert.slack_id == candidate:
            return expert.id
    return None


def load_facts(session: Session, ctx: AppContext, team: str, week: WeekRange) -> list[ConversationFacts]:
    """The facts of every conversation of `team` that may matter to `week`'s figures.

    That is: opened before the week ends, and either with a first deadline that may fall in the
    week (looking back at most `LOOKBACK`), or waiting now, or answered, reopened or closed
    within or after the week. Anything else cannot change a figure of the week.
    """
    start, end = week.start, week.end
    still_relevant = or_(
        # Its first deadline may fall in the week: while in cycle 0, due_at *is* that deadline;
        # a later cycle has overwritten it, so those are taken if opened within LOOKBACK.
        (Conversation.opened_at >= start - LOOKBACK)
        & (((Conversation.cycle == 0) & (Conversation.due_at >= start)) | (Conversation.cycle > 0)),
        Conversation.first_response_at >= start,
        Conversation.answered_at >= start,
        Conversation.closed_at >= start,
        Conversation.cycle_started_at >= start,
        Conversation.resolution_due_at >= start,
        (
            Conversation.closed_at.is_(None)
            & (Conversation.first_response_at.is_(None) | Conversation.answered_at.is_(None))
        ),
    )
    rows = list(
        session.scalars(
            select(Conversation)
            .where(Conversation.team == team, Conversation.opened_at < end, still_relevant)
            .order_by(Conversation.id)
        )
    )
    responders = _first_responders(session, [row.id for row in rows if row.first_response_at is not None])
    team_calendar = ctx.policy.teams[team].calendar
    facts = []
    for row in rows:
        sla = policy_of(session, ctx, row)
        deadline = deadline_for(ctx, sla, team, row.opened_at, "first")
        facts.append(
            ConversationFacts(
                id=row.id,
                policy=sla.name,
                calendar=sla.calendar or team_calendar,
                customer=row.author_handle or row.author_name or row.author_id,
                owner=row.owner,
                opened_at=row.opened_at,
                # The stored deadline is what the customer was promised; recompute only when a
                # later cycle has overwritten it.
                first_due_at=first_due_at(session, ctx, row),
                first_target=deadline.target,
                first_response_at=row.first_response_at,
                first_responder=_expert_of_actor(ctx, responders.get(row.id)),
                closed_at=row.closed_at,
                close_reason=row.close_reason,
                cycle=row.cycle,
                cycle_started_at=row.cycle_started_at,
                answered_at=row.answered_at,
                resolution_due_at=row.resolution_due_at,
                waiting_on_customer_since=row.waiting_since,
            )
        )
    return facts


def _first_responders(session: Session, ids: Sequence[int]) -> dict[int, str]:
    """The actor of each conversation's first "answered" event (its first response)."""
    found: dict[int, str] = {}
    for offset in range(0, len(ids), 500):
        chunk = ids[offset : offset + 500]
        first = (
            select(Event.conversation_id, func.min(Event.id).label("event_id"))
            .where(Event.action == "answered", Event.conversation_id.in_(chunk))
            .group_by(Event.conversation_id)
            .subquery()
        )
        for conversation_id, actor in session.execute(
            select(Event.conversation_id, Event.actor).join(first, Event.id == first.c.event_id)
        ):
            if conversation_id is not None:
                found[conversation_id] = actor
    return found


def count_posts(session: Session, team: str, week: WeekRange) -> int:
    """Customer posts of the team's conversations posted in the week."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Post)
            .join(Conversation, Post.conversation_id == Conversation.id)
            .where(
                Conversation.team == team,
                Post.direction == "in",
                Post.posted_at >= week.start,
                Post.posted_at < week.end,
            )
        )
        or 0
    )


def count_acks(session: Session, team: str, week: WeekRange) -> int:
    """Acknowledgements sent in the week for the team's conversations (skipped ones excluded)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Outbox)
            .join(Conversation, Outbox.conversation_id == Conversation.id)
            .where(
                Conversation.team == team,
                Outbox.kind == "ack",
                Outbox.status == SENT,
                Outbox.sent_at >= week.start,
                Outbox.sent_at < week.end,
                or_(Outbox.result.is_(None), not_(Outbox.result.like("skipped%"))),
            )
        )
        or 0
    )


def load_week(session: Session, ctx: AppContext, team: str, week: WeekRange) -> WeekData:
    """Everything `compute_week` needs for one team and week, read from the database."""
    return WeekData(
        week=week,
        conversations=tuple(load_facts(session, ctx, team, week)),
        posts=count_posts(session, team, week),
        acks=count_acks(session, team, week),
    )


def build_digest(session: Session, ctx: AppContext, team: str, week: WeekRange) -> Digest:
    """Load and compute a team's digest for `week` against the week before."""
    current = load_week(session, ctx, team, week)
    previous = load_week(session, ctx, team, week.previous())
    calendar_names = {f.calendar for f in (*current.conversations, *previous.conversations)}
    return compute_digest(
        team,
        current,
        previous,
        policies={policy.name: policy for policy in ctx.policy.policies},
        calendars={name: ctx.calendar(name) for name in calendar_names},
        names={expert.id: expert.name for expert in ctx.policy.experts.values()},
        team_label=ctx.policy.teams[team].label,
    )


# --- text ------------------------------------------------------------------------------------------


def _duration(value: timedelta | None) -> str:
    if value is None:
        return "\u2013"
    if value <= _ZERO:
        return "0 min"
    return duration_in_words(value)


def _percent(value: float | None) -> str:
    return "\u2013" if value is None else f"{value:.0%}"


def render_text(digest: Digest, *, mrkdwn: bool = True) -> str:
    """The digest as Slack mrkdwn (``mrkdwn=True``) or plain terminal text.

    Last week's figures follow each of this week's in brackets. Customer-derived text
    (handles) and configured names are escaped with `bot.core.messages.escape_mrkdwn` for Slack.
    """
    now, before = digest.current, digest.previous
    tz_name = now.week.timezone

    def safe(text: str) -> str:
        return escape_mrkdwn(text) if mrkdwn else text

    def bold(text: str) -> str:
        return f"*{text}*" if mrkdwn else text

    bullet = "\u2022"
    lines = [
        f"{bold(f'{safe(digest.team_label)}: weekly digest {now.week.label}')} "
        f"({now.week.describe()}, {tz_name}); {before.week.label} in brackets"
    ]
    if now.is_empty:
        lines.append("No conversations this week.")
        if not before.is_empty:
            lines.append(
                f"({before.week.label}: {before.posts} posts, {before.opened} opened, "
                f"{before.answered} first responses)"
            )
        return "\n".join(lines)

    closed = f"Closed without reply: {now.closed_without_reply_total} ({before.closed_without_reply_total})"
    if now.closed_without_reply:
        closed += ": " + ", ".join(f"{safe(reason)} {count}" for reason, count in now.closed_without_reply)
    lines += [
        f"Posts received: {now.posts} ({before.posts})",
        f"Conversations opened: {now.opened} ({before.opened})",
        f"First responses: {now.answered} ({before.answered})",
        closed,
        f"Answered within SLA: {_percent(now.share_within_sla)}, {now.within_sla} of {now.judged} "
        f"({_percent(before.share_within_sla)}, {before.within_sla} of {before.judged})",
        f"First response, median: {_duration(now.median_response)} wall, "
        f"{_duration(now.median_business)} business "
        f"({_duration(before.median_response)}, {_duration(before.median_business)})",
        f"First response, 90th percentile: {_duration(now.p90_response)} wall, "
        f"{_duration(now.p90_business)} business "
        f"({_duration(before.p90_response)}, {_duration(before.p90_business)})",
        f"{bold('Deadlines missed')}: {len(now.breaches)} ({len(before.breaches)})",
    ]
    if now.resolved_within_target or now.resolution_breaches or before.resolution_breaches:
        lines.append(
            f"Resolved within target: {now.resolved_within_target} ({before.resolved_within_target}); "
            f"resolution targets missed: {len(now.resolution_breaches)} ({len(before.resolution_breaches)})"
        )
    for breach in now.breaches[:MAX_LISTED_BREACHES]:
        how = (
            f"answered {_duration(breach.late_by)} late"
            if breach.answered
            else f"unanswered, {_duration(breach.late_by)} late at week end"
        )
        lines.append(
            f"  {bullet} #{breach.conversation_id} @{safe(breach.customer)}, "
            f"owner {safe(breach.owner_name)}: {how}"
        )
    if len(now.breaches) > MAX_LISTED_BREACHES:
        lines.append(f"  {bullet} and {len(now.breaches) - MAX_LISTED_BREACHES} more")
    backlog = f"{bold('Backlog at week end')}: {now.backlog} ({before.backlog})"
    if now.oldest is not None:
        backlog += (
            f"; oldest #{now.oldest.conversation_id} @{safe(now.oldest.customer)}, "
            f"waiting {_duration(now.oldest.waited)}, owner {safe(now.oldest.owner_name)}"
        )
    lines.append(backlog)
    if now.experts:
        lines.append(f"{bold('Per expert')} (first responses, within SLA, median wall / business):")
        for expert in now.experts:
            lines.append(
                f"  {bullet} {safe(expert.name)}: {expert.handled}, {expert.within_sla} within SLA, "
                f"median {_duration(expert.median_response)} / {_duration(expert.median_business)}"
            )
    lines.append(f"Acknowledgements sent: {now.acks} ({before.acks})")
    return "\n".join(lines)
