"""Weekends by name: the seed rule ("24 h, 48 h for posts at weekends") end to end through ingest.

The policy is the shipped example (`examples/replyclock.toml`): policy "standard" is a 24 h wall
clock with `weekend_first_response = "48h"` on calendar `care-days` (Europe/London, with Saturday
hours 10:00-14:00 and English public holidays). Every row says when a post arrives (London wall
time) and when a support lead expects the answer to be due.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, select

from bot.config import ConfigError, load_policy, parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import CalendarSpec, SlaPolicy
from bot.core.sla import BusinessCalendar, compute_deadline
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from connectors.base import InboundPost
from storage.models import Conversation

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "replyclock.toml"
LONDON = ZoneInfo("Europe/London")


def london(text: str, *, fold: int = 0) -> datetime:
    """A London wall time (fold=1: the second occurrence of a repeated hour) as a UTC instant."""
    return datetime.fromisoformat(text).replace(tzinfo=LONDON, fold=fold).astimezone(UTC)


# (label, arrives, due): the due times a support lead expects from "24 h, 48 h at weekends".
# Wall-clock hours are real hours: across a DST change the deadline's local time moves by an hour.
SEED_RULE = [
    ("Fri 18:00, a working day", london("2026-11-20T18:00"), london("2026-11-21T18:00")),
    ("Sat 10:00, inside Saturday hours", london("2026-11-21T10:00"), london("2026-11-23T10:00")),
    ("Sat 15:00, after Saturday hours", london("2026-11-21T15:00"), london("2026-11-23T15:00")),
    ("Sun 23:59", london("2026-11-22T23:59"), london("2026-11-24T23:59")),
    ("Mon 00:01", london("2026-11-23T00:01"), london("2026-11-24T00:01")),
    # In summer, Monday 00:01 in London is still Sunday in UTC: the calendar's zone decides.
    ("Mon 00:01 BST (Sunday in UTC)", london("2026-06-01T00:01"), london("2026-06-02T00:01")),
    ("Sat 00:30 BST (Friday in UTC)", london("2026-06-06T00:30"), london("2026-06-08T00:30")),
    ("Summer bank holiday Mon 11:00", london("2026-08-31T11:00"), london("2026-09-02T11:00")),
    ("Christmas Day Fri 09:00", london("2026-12-25T09:00"), london("2026-12-27T09:00")),
    ("Tue after the bank holiday", london("2026-09-01T11:00"), london("2026-09-02T11:00")),
    # Spring forward, Sun 29 March 2026 01:00 GMT -> 02:00 BST: 48 real hours.
    ("Sun 00:30 GMT before spring forward", london("2026-03-29T00:30"), london("2026-03-31T01:30")),
    ("Sun 03:00 BST after spring forward", london("2026-03-29T03:00"), london("2026-03-31T03:00")),
    ("Sat 23:30 GMT the night before", london("2026-03-28T23:30"), london("2026-03-31T00:30")),
    # Fall back, Sun 25 October 2026 02:00 BST -> 01:00 GMT: 01:30 happens twice.
    ("Sun 01:30 BST (first)", london("2026-10-25T01:30"), london("2026-10-27T00:30")),
    ("Sun 01:30 GMT (second)", london("2026-10-25T01:30", fold=1), london("2026-10-27T01:30")),
    ("Fri 23:30 BST before fall back", london("2026-10-23T23:30"), london("2026-10-24T23:30")),
]


@pytest.fixture
def example_ctx(engine: Engine) -> AppContext:
    return AppContext(policy=load_policy(EXAMPLE), engine=engine, clock=FakeClock(SEED_RULE[0][1]))


@pytest.mark.parametrize(("label", "arrives", "due"), SEED_RULE, ids=[row[0] for row in SEED_RULE])
def test_seed_rule_through_ingest(
    example_ctx: AppContext, label: str, arrives: datetime, due: datetime
) -> None:
    assert isinstance(example_ctx.clock, FakeClock)
    example_ctx.clock.set(arrives)
    post = InboundPost(
        external_id="1",
        author_id="id-ana",
        author_handle="ana",
        author_name="Ana",
        text="a general question about my account",
        posted_at=arrives,
    )
    with example_ctx.sessions() as session, session.begin():
        ingest_batch(session, example_ctx, account="x", posts=[post], is_own=lambda _post: False)
    with example_ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert conversation.policy == "standard", label
        assert conversation.due_at == due, f"{label}: due {conversation.due_at.astimezone(LONDON)}"


def _calendar(**changes: object) -> BusinessCalendar:
    spec = CalendarSpec(name="c", timezone="Asia/Dubai", hours={day: ((540, 1020),) for day in range(7)})
    return BusinessCalendar(CalendarSpec(**{**spec.__dict__, **changes}))  # type: ignore[arg-type]


def test_any_set_of_days_is_a_weekend_independent_of_hours() -> None:
    policy = SlaPolicy(
        name="p",
        clock="wall",
        calendar="c",
        first_response=timedelta(hours=24),
        weekend_first_response=timedelta(hours=48),
    )
    gulf = _calendar(weekend=frozenset({4, 5}))  # Friday and Saturday, open every day
    friday = datetime(2026, 11, 20, 8, tzinfo=UTC)  # 12:00 in Dubai
    sunday = friday + timedelta(days=2)
    assert gulf.is_working_day(friday.date()) and gulf.is_weekend_or_holiday(friday.date())
    assert compute_deadline(policy, gulf, friday).target == timedelta(hours=48)
    assert compute_deadline(policy, gulf, sunday).target == timedelta(hours=24)
    no_weekend = _calendar(weekend=frozenset(), closed_dates=frozenset({date(2026, 11, 24)}))
    assert compute_deadline(policy, no_weekend, sunday).target == timedelta(hours=24)
    closed_day = datetime(2026, 11, 24, 8, tzinfo=UTC)
    assert compute_deadline(policy, no_weekend, closed_day).target == timedelta(hours=48)


MINIMAL = """
[calendars.c]
timezone = "Asia/Dubai"
hours = { mon-thu = ["09:00-17:00"], sun = ["09:00-17:00"] }
WEEKEND
[experts.a]
name = "A B"
slack_id = "U0000AAAA"
timezone = "Asia/Dubai"
[teams.t]
channel = "#t"
experts = ["a"]
calendar = "c"
[[policies]]
name = "p"
calendar = "c"
first_response = "24h"
weekend_first_response = "48h"
"""


def _parse(weekend: str) -> object:
    import tomllib

    text = MINIMAL.replace("WEEKEND", weekend)
    return parse_policy(tomllib.loads(text), source="x.toml", text=text)


def test_weekend_key_is_validated() -> None:
    parsed = _parse('weekend = ["fri", "sat"]')
    assert parsed.calendars["c"].weekend == frozenset({4, 5})  # type: ignore[attr-defined]
    assert _parse("").calendars["c"].weekend == frozenset({5, 6})  # type: ignore[attr-defined]
    assert _parse("weekend = []").calendars["c"].weekend == frozenset()  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as caught:
        _parse('weekend = ["fri", "saturday", 3]')
    text = str(caught.value)
    assert "calendars.c.weekend[1]: unknown day 'saturday'" in text
    assert "calendars.c.weekend[2]: expected a day such as 'sat'" in text
    with pytest.raises(ConfigError, match=r"calendars\.c\.weekend: expected an array of days"):
        _parse('weekend = "sat"')
