"""The weekly digest: pure figures on hand-checked data, a seeded week on a real database, delivery."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from slack_sdk import WebClient
from sqlalchemy import select

from bot.core.clock import FakeClock
from bot.core.policy import CalendarSpec, Policy, SlaPolicy
from bot.core.policy import DigestSchedule as PolicyDigestSchedule
from bot.core.sla import BusinessCalendar
from bot.demo.standin import DEFAULT_TOKEN, SlackStandIn
from bot.flow.context import AppContext
from bot.flow.conversations import mark_answered
from bot.flow.delivery import STAFF_KINDS
from bot.flow.outbox import Handler, OutboxMessage, OutboxSender
from bot.flow.sweep import sweep
from bot.reports.chart import render_chart
from bot.reports.digest import (
    ConversationFacts,
    Digest,
    WeekData,
    WeekRange,
    build_digest,
    compute_digest,
    compute_week,
    load_facts,
    median,
    percentile,
    render_text,
    share,
)
from bot.reports.digest_delivery import (
    DigestSchedule,
    digest_command,
    digest_due_at,
    digest_handlers,
    digest_trigger,
    enqueue_due_digests,
    post_digest,
    schedule_of,
)
from connectors.base import InboundPost
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models import CLOSED, Conversation, Outbox
from tests.test_ingest import ingest, post

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
H = timedelta(hours=1)


def utc(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def berlin(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    """A Berlin wall time in 2026, as UTC."""
    return datetime(2026, month, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


def new_york(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    """A New York wall time in 2026, as UTC."""
    return datetime(2026, month, day, hour, minute, tzinfo=NEW_YORK).astimezone(UTC)


# --- percentiles and shares ----------------------------------------------------------------------


def test_percentile_nearest_rank_on_hand_checked_lists() -> None:
    values = [15, 20, 35, 40, 50]  # ranks: ceil(q/100 * 5)
    assert percentile(values, 5) == 15  # rank ceil(0.25) = 1
    assert percentile(values, 30) == 20  # rank ceil(1.5) = 2
    assert percentile(values, 40) == 20  # rank 2 exactly
    assert percentile(values, 50) == 35  # rank ceil(2.5) = 3
    assert percentile(values, 100) == 50
    assert percentile(values, 0) == 15  # rank max(1, 0)
    ten = [3, 6, 7, 8, 8, 10, 13, 15, 16, 20]
    assert [percentile(ten, q) for q in (25, 50, 75, 90, 100)] == [7, 8, 15, 16, 20]
    assert percentile(list(reversed(ten)), 70) == 13  # rank 7 exactly: no float rounding up to 8
    assert median([4, 1, 3, 2]) == 2  # the lower middle for an even count
    assert median([timedelta(hours=5), timedelta(minutes=30), timedelta(hours=2)]) == timedelta(hours=2)
    assert percentile([7], 90) == 7


def test_percentile_of_nothing_is_none_and_q_is_checked() -> None:
    assert percentile([], 90) is None
    assert median([]) is None
    for bad in (-1, 100.5, float("nan")):
        with pytest.raises(ValueError):
            percentile([1, 2], bad)


@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=60), st.integers(0, 100))
def test_percentile_is_the_smallest_value_with_q_percent_at_or_below(values: list[int], q: int) -> None:
    result = percentile(values, q)
    assert result in values
    n = len(values)
    at_or_below = sum(1 for v in values if v <= result)
    below = sum(1 for v in values if v < result)
    assert Fraction(at_or_below, n) >= Fraction(q, 100)
    assert below == 0 or Fraction(below, n) < Fraction(q, 100)


def test_share() -> None:
    assert share(0, 0) is None
    assert share(3, 4) == 0.75
    assert share(0, 5) == 0.0
    assert share(2, 2) == 1.0
    for numerator, denominator in ((3, 2), (-1, 2), (0, -1)):
        with pytest.raises(ValueError):
            share(numerator, denominator)


# --- weeks ---------------------------------------------------------------------------------------


def test_week_range_is_local_monday_to_monday_in_utc() -> None:
    week = WeekRange.parse("2026-W47", "Europe/Berlin")
    assert (week.year, week.week, week.label) == (2026, 47, "2026-W47")
    assert week.start == utc(2026, 11, 15, 23) and week.end == utc(2026, 11, 22, 23)
    assert week.duration == timedelta(hours=168)
    assert week.describe() == "Mon 16 Nov \u2013 Sun 22 Nov 2026"
    assert WeekRange.parse("2026w47", "Europe/Berlin") == week
    assert WeekRange.containing(utc(2026, 11, 22, 22, 59), "Europe/Berlin") == week
    assert WeekRange.containing(utc(2026, 11, 22, 23), "Europe/Berlin") == week.next()
    assert WeekRange.parse("2027-W01", "UTC").previous().label == "2026-W53"  # 2026 has 53 ISO weeks
    assert WeekRange.parse("2026-W53", "UTC").next().label == "2027-W01"
    for bad in ("2026-W54", "2025-W53", "2026-47", "W47", "26-W47"):
        with pytest.raises(ValueError):
            WeekRange.parse(bad, "Europe/Berlin")
    with pytest.raises(ValueError):
        WeekRange(2026, 47, "Mars/Olympus")


def test_the_autumn_dst_week_has_169_hours_and_its_days_bucket_locally() -> None:
    week = WeekRange.parse("2026-W43", "Europe/Berlin")  # Mon 19 - Sun 25 October 2026
    assert week.duration == timedelta(hours=169)
    days = week.days()
    assert [d.day for d in days] == [date(2026, 10, 19) + timedelta(days=i) for i in range(7)]
    assert [(d.end - d.start) / H for d in days] == [24, 24, 24, 24, 24, 24, 25]
    assert days[6].start == utc(2026, 10, 24, 22) and days[6].end == utc(2026, 10, 25, 23)
    assert week.day_index(utc(2026, 10, 24, 21, 30)) == 5  # Sat 23:30 CEST
    assert week.day_index(utc(2026, 10, 25, 0, 30)) == 6  # Sun 02:30 CEST (first 02:30)
    assert week.day_index(utc(2026, 10, 25, 1, 30)) == 6  # Sun 02:30 CET (second 02:30)
    assert week.day_index(utc(2026, 10, 25, 22, 59)) == 6  # Sun 23:59 CET
    assert week.day_index(utc(2026, 10, 25, 23, 0)) is None  # Mon 26 00:00 CET: next week
    spring = WeekRange.parse("2026-W13", "Europe/Berlin")  # DST starts Sun 29 March 2026
    assert spring.duration == timedelta(hours=167)
    assert (spring.days()[6].end - spring.days()[6].start) == timedelta(hours=23)


# --- figures from hand-made facts ----------------------------------------------------------------

ROUND_THE_CLOCK = BusinessCalendar(
    CalendarSpec("berlin-24x7", "Europe/Berlin", {day: ((0, 1440),) for day in range(7)})
)
OFFICE = BusinessCalendar(
    CalendarSpec("office", "Europe/Berlin", {day: ((9 * 60, 17 * 60),) for day in range(5)})
)
WALL_4H = SlaPolicy("wall4", "wall", "berlin-24x7", timedelta(hours=4))
BUSINESS_8H = SlaPolicy("office8", "business", "office", timedelta(hours=8))
POLICIES = {policy.name: policy for policy in (WALL_4H, BUSINESS_8H)}
CALENDARS = {"berlin-24x7": ROUND_THE_CLOCK, "office": OFFICE}


def wall_facts(
    conversation_id: int, opened: datetime, answered: datetime | None = None, **more: object
) -> ConversationFacts:
    facts = ConversationFacts(
        id=conversation_id,
        policy="wall4",
        calendar="berlin-24x7",
        customer=f"c{conversation_id}",
        owner="sam",
        opened_at=opened,
        first_due_at=opened + 4 * H,
        first_target=4 * H,
        first_response_at=answered,
    )
    return replace(facts, **more)  # type: ignore[arg-type]


def test_an_empty_week_has_no_figures_and_says_so() -> None:
    week = WeekRange.parse("2026-W43", "Europe/Berlin")
    figures = compute_week(WeekData(week, (), posts=0, acks=0), policies=POLICIES, calendars=CALENDARS)
    assert figures.is_empty
    assert (figures.opened, figures.answered, figures.judged, figures.backlog) == (0, 0, 0, 0)
    assert figures.share_within_sla is None
    assert figures.median_response is None and figures.p90_response is None
    assert figures.median_business is None and figures.p90_business is None
    assert figures.oldest is None and figures.breaches == () and figures.experts == ()
    assert [day.median_used for day in figures.days] == [None] * 7
    digest = Digest("care", "Care", figures, figures)
    text = render_text(digest, mrkdwn=False)
    assert text.splitlines() == [
        "Care: weekly digest 2026-W43 (Mon 19 Oct \u2013 Sun 25 Oct 2026, Europe/Berlin); 2026-W43 in brackets",
        "No conversations this week.",
    ]
    assert render_chart(digest).startswith(PNG_MAGIC)


def test_a_week_across_the_dst_change_counts_real_elapsed_time_and_local_days() -> None:
    week = WeekRange.parse("2026-W43", "Europe/Berlin")
    facts = (
        # Sat 24 Oct 23:00 CEST -> Sun 25 Oct 03:00 CET: 5 real hours (the clock showed 4), late.
        wall_facts(1, utc(2026, 10, 24, 21), utc(2026, 10, 25, 2)),
        # Sun 25 Oct 01:30 CEST -> 02:15 CET: 1 h 45 min, on time, answered on Sunday.
        wall_facts(2, utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 1, 15)),
        # Mon 19 Oct 08:00 CEST -> 10:00: 2 h, on time; opened and answered on Monday.
        wall_facts(3, utc(2026, 10, 19, 6), utc(2026, 10, 19, 8)),
        # Sun 25 Oct 21:00 CET, still waiting at week end (Mon 26 00:00 CET = 23:00 UTC).
        wall_facts(4, utc(2026, 10, 25, 20)),
    )
    figures = compute_week(WeekData(week, facts, posts=5, acks=2), policies=POLICIES, calendars=CALENDARS)
    assert (figures.opened, figures.answered) == (4, 3)
    # Verdicts: #1 missed (due Sun 01:00 UTC), #2 and #3 on time; #4 is due next week.
    assert (figures.within_sla, figures.judged, figures.share_within_sla) == (2, 3, 2 / 3)
    # Wall times 2 h, 1 h 45, 5 h -> nearest-rank median (rank 2) 2 h, p90 (rank 3) 5 h; on a
    # round-the-clock calendar business time equals real elapsed time, across the change too.
    assert (figures.median_response, figures.p90_response) == (2 * H, 5 * H)
    assert (figures.median_business, figures.p90_business) == (2 * H, 5 * H)
    assert [(b.conversation_id, b.late_by) for b in figures.breaches] == [(1, H)]
    assert figures.backlog == 1 and figures.oldest is not None
    assert (figures.oldest.conversation_id, figures.oldest.waited) == (4, 3 * H)
    used = {day.day.isoformat(): day.used for day in figures.days if day.used}
    assert used == {"2026-10-19": (0.5,), "2026-10-25": (0.4375, 1.25)}  # in order of response
    assert [day.missed for day in figures.days] == [0, 0, 0, 0, 0, 0, 1]  # #1 was due on Sunday


def test_verdicts_closures_backlog_and_experts_on_hand_made_facts() -> None:
    week = WeekRange.parse("2026-W48", "Europe/Berlin")  # [Sun 22 23:00 UTC, Sun 29 23:00 UTC)
    monday = week.start
    facts: tuple[ConversationFacts, ...] = (
        # Answered on time this week though due next week: judged (on time) this week.
        wall_facts(1, monday + 166 * H, monday + 167 * H, first_due_at=monday + 170 * H),
        # Due last week, answered late this week: a first response of this week, judged last week.
        wall_facts(2, monday - 10 * H, monday + 2 * H, owner="nina", first_responder="sam"),
        # Due this week and never answered, then closed as spam: out of every compliance figure.
        wall_facts(3, monday + 20 * H, None, closed_at=monday + 30 * H, close_reason="spam"),
        # Closed without reply and without a reason.
        wall_facts(4, monday + 21 * H, None, closed_at=monday + 22 * H),
        # Answered on time, reopened on Friday, waiting for the next response at week end.
        wall_facts(
            5,
            monday + 24 * H,
            monday + 25 * H,
            cycle=1,
            cycle_started_at=monday + 100 * H,
            owner=None,
        ),
        # Answered on time and reopened, but that cycle was answered before the end.
        wall_facts(
            6,
            monday + 26 * H,
            monday + 27 * H,
            cycle=1,
            cycle_started_at=monday + 40 * H,
            answered_at=monday + 41 * H,
        ),
        # Opened this week, due at +154 h, answered next week (+170 h): a breach, 16 h late.
        wall_facts(7, monday + 150 * H, monday + 160 * H, owner="nina"),
    )
    facts = tuple(replace(f, first_response_at=monday + 170 * H) if f.id == 7 else f for f in facts)
    figures = compute_week(
        WeekData(week, facts, posts=9, acks=4),
        policies=POLICIES,
        calendars=CALENDARS,
        names={"sam": "Sam Okafor", "nina": "Nina Park"},
    )
    assert figures.opened == 6  # all but #2
    assert figures.answered == 4  # #1, #2, #5, #6 (#7's answer is next week)
    assert figures.closed_without_reply == (("no reason given", 1), ("spam", 1))
    assert figures.closed_without_reply_total == 2
    # On time this week: #1, #5, #6; missed this week: #7. #2 was judged last week, #3 left.
    assert (figures.within_sla, figures.judged, figures.share_within_sla) == (3, 4, 0.75)
    assert [(b.conversation_id, b.late_by, b.answered, b.owner_name) for b in figures.breaches] == [
        (7, 16 * H, True, "Nina Park")
    ]
    # Waiting at week end: #5 (next response, since +100 h). #7 was too (answered after the end).
    assert figures.backlog == 2 and figures.oldest is not None
    assert (figures.oldest.conversation_id, figures.oldest.owner_name, figures.oldest.waited) == (
        5,
        "(nobody)",
        68 * H,
    )
    # #2's first response was Sam's though Nina owns it; the others fall to their owners.
    assert [(e.expert, e.name, e.handled, e.within_sla, e.median_response) for e in figures.experts] == [
        ("sam", "Sam Okafor", 3, 2, H),  # #1 1 h, #2 12 h (late), #6 1 h -> median 1 h
        ("(nobody)", "(nobody)", 1, 1, H),  # #5
    ]


# --- a seeded week on a real database ------------------------------------------------------------


def deliver_everything(ctx: AppContext) -> dict[str, Handler]:
    """Outbox handlers that deliver every kind; an ack is skipped once a human answered (as the real one)."""

    def deliver(message: OutboxMessage) -> str | None:
        if message.kind == "ack" and message.conversation_id is not None:
            with ctx.sessions() as session:
                conversation = session.get(Conversation, message.conversation_id)
                if conversation is not None and conversation.first_response_at is not None:
                    return "skipped: a human answered first"
        return "delivered"

    return {kind: deliver for kind in (*STAFF_KINDS, "ack", "reply")}


class Week:
    """Drives the real ingest, sweep, outbox and answering along a FakeClock."""

    def __init__(self, ctx: AppContext, clock: FakeClock) -> None:
        self.ctx, self.clock = ctx, clock
        self.sender = OutboxSender(ctx, deliver_everything(ctx))
        self.ids: dict[str, int] = {}

    def at(self, when: datetime) -> None:
        assert when >= self.clock.now(), "the story must run forwards"
        self.clock.set(when)
        sweep(self.ctx)

    def send(self) -> None:
        self.sender.send_due()

    def open(
        self, name: str, when: datetime, author: str, text: str, owner: str, *, send: bool = True
    ) -> None:
        self.at(when)
        result = ingest(self.ctx, post(name, text, author=author, at=when, thread=f"t{name}"))
        assert len(result.opened) == 1, result
        self.ids[name] = result.opened[0]
        with self.ctx.sessions() as session, session.begin():
            conversation = session.get(Conversation, self.ids[name])
            assert conversation is not None
            conversation.owner = conversation.claimed_by = owner  # claimed at once, so never reassigned
            conversation.claimed_at = when
        if send:
            self.send()

    def follow_up(self, name: str, when: datetime, text: str, author: str) -> None:
        self.at(when)
        ingest(self.ctx, post(f"{name}-{when:%d%H%M}", text, author=author, at=when, thread=f"t{name}"))
        self.send()

    def answer(self, name: str, when: datetime, expert: str) -> None:
        self.at(when)
        with self.ctx.sessions() as session, session.begin():
            conversation = session.get(Conversation, self.ids[name])
            assert conversation is not None
            mark_answered(session, conversation, at=when, by=f"expert:{expert}", now=when)

    def close(self, name: str, when: datetime, reason: str) -> None:
        self.at(when)
        with self.ctx.sessions() as session, session.begin():
            conversation = session.get(Conversation, self.ids[name])
            assert conversation is not None
            conversation.status, conversation.closed_at, conversation.close_reason = CLOSED, when, reason
            conversation.next_action_at = None


def seed_billing_weeks(ctx: AppContext, clock: FakeClock) -> dict[str, int]:
    """Weeks 47 and 48 of 2026 for the billing team (8 business hours, Mon-Fri 09-17 Berlin).

    Every deadline below is worked out by hand in the test that reads these weeks.
    """
    week = Week(ctx, clock)
    clock.set(berlin(11, 18, 9))
    # Week 47 (Mon 16 - Sun 22 November).
    week.open("I", berlin(11, 18, 10), "ivy", "my invoice is wrong", "maria")
    week.answer("I", berlin(11, 18, 11), "maria")
    week.open("J", berlin(11, 19, 10), "jon", "refund please", "lee")
    week.open("H", berlin(11, 20, 15), "hal", "I was charged twice", "lee")
    # Week 48 (Mon 23 - Sun 29 November).
    week.open("A", berlin(11, 23, 10), "ana", "question about my invoice", "maria")
    week.answer("J", berlin(11, 23, 10), "lee")
    week.open("Z", berlin(11, 23, 10, 30), "zed", "hello, a question", "sam")  # team care
    week.answer("A", berlin(11, 23, 12), "maria")
    week.answer("H", berlin(11, 23, 14), "lee")
    week.open("B", berlin(11, 23, 16), "ben", "refund status?", "lee")
    week.open("C", berlin(11, 24, 9, 30), "cat<!here>", "charged again", "maria")
    week.answer("B", berlin(11, 24, 10), "lee")
    week.follow_up("A", berlin(11, 24, 11), "and a copy of the invoice?", "ana")  # reopens A
    week.follow_up("C", berlin(11, 24, 12), "hello??", "cat<!here>")  # C still waits
    week.answer("A", berlin(11, 24, 12), "maria")  # A's next response
    week.open("D", berlin(11, 25, 14), "dan", "invoice missing", "maria")
    week.answer("D", berlin(11, 26, 16), "maria")
    week.open("E", berlin(11, 27, 16, 30), "eve", "free refund, click here", "lee")
    week.close("E", berlin(11, 27, 17), "spam")
    week.open("F", berlin(11, 28, 11), "fay", "where is my invoice?", "lee", send=False)
    week.at(berlin(11, 28, 11, 30))
    own = InboundPost(
        "F-reply", "own", "@fay sent it again!", clock.now(), author_handle="acme_support", reply_to_id="F"
    )
    ingest(ctx, own)  # our own account answered on the platform: the ack is then skipped
    week.send()
    week.open("G", berlin(11, 29, 20), "gus", "charged for nothing", "lee")
    week.at(berlin(11, 30, 9))  # Monday morning, digest time
    week.send()
    return week.ids


def test_a_seeded_week_gives_the_hand_computed_digest(
    ctx: AppContext, clock: FakeClock, tmp_path: Path
) -> None:
    ids = seed_billing_weeks(ctx, clock)
    week48 = WeekRange.parse("2026-W48", "Europe/Berlin")
    with ctx.sessions() as session:
        digest = build_digest(session, ctx, "billing", week48)
        facts = {f.id: f for f in load_facts(session, ctx, "billing", week48)}

    # Deadlines by hand (8 business hours, Mon-Fri 09-17 Berlin = UTC+1 in November):
    #   A opened Mon 10:00 -> due Tue 10:00 (Mon 7 h + Tue 1 h); reopened, so recomputed.
    #   B Mon 16:00 -> Tue 16:00.  C Tue 09:30 -> Wed 09:30.  D Wed 14:00 -> Thu 14:00.
    #   F Sat 11:00 -> clock starts Mon 30 09:00 -> due Mon 30 17:00.
    #   H Fri 20 15:00 -> Mon 23 15:00 (Fri 2 h + Mon 6 h).  J Thu 19 10:00 -> Fri 20 10:00.
    assert facts[ids["A"]].cycle == 1 and facts[ids["A"]].first_due_at == berlin(11, 24, 10)
    assert facts[ids["F"]].first_due_at == berlin(11, 30, 17)
    assert facts[ids["F"]].first_responder is None  # answered by the account: credited to the owner
    assert facts[ids["J"]].first_responder == "lee"
    assert ids["Z"] not in facts  # another team
    assert ids["I"] not in facts  # opened, due and answered in week 47: cannot change week 48
    assert {ids[name] for name in "ABCDEFGHJ"} == set(facts)

    now = digest.current
    assert now.posts == 9  # A, A's follow-up, B, C, C's follow-up, D, E, F, G
    assert now.opened == 7  # A B C D E F G
    assert now.answered == 6  # J, A, H (Mon), B (Tue), D (Thu), F (Sat)
    assert now.closed_without_reply == (("spam", 1),)
    # On time: A, H, B, F. Missed this week: C (due Wed, unanswered), D (due Thu 14:00, answered
    # 16:00). J was due last week; G is due next week; E was closed as spam.
    assert (now.within_sla, now.judged, now.share_within_sla) == (4, 6, 4 / 6)
    # Wall: F 30 min, A 2 h, B 18 h, D 26 h, H 71 h, J 96 h -> median rank 3, p90 rank ceil(5.4) = 6.
    assert (now.median_response, now.p90_response) == (18 * H, 96 * H)
    # Business: F 0 (weekend), A 2 h, B 2 h (Mon 1 h + Tue 1 h), H 7 h (Fri 2 h + Mon 5 h),
    # D 10 h (Wed 3 h + Thu 7 h), J 16 h (Thu 7 h + Fri 8 h + Mon 1 h).
    assert (now.median_business, now.p90_business) == (2 * H, 16 * H)
    week_end = berlin(11, 30, 0)
    assert [(b.conversation_id, b.owner, b.due_at, b.first_response_at, b.late_by) for b in now.breaches] == [
        (ids["C"], "maria", berlin(11, 25, 9, 30), None, week_end - berlin(11, 25, 9, 30)),
        (ids["D"], "maria", berlin(11, 26, 14), berlin(11, 26, 16), 2 * H),
    ]
    assert now.breaches[0].late_by == timedelta(days=4, hours=14, minutes=30)
    assert now.backlog == 2  # C and G
    assert now.oldest is not None
    assert (now.oldest.conversation_id, now.oldest.customer, now.oldest.waited) == (
        ids["C"],
        "cat<!here>",
        timedelta(days=5, hours=14, minutes=30),
    )
    assert [
        (e.expert, e.handled, e.within_sla, e.median_response, e.median_business) for e in now.experts
    ] == [
        ("lee", 4, 3, 18 * H, 2 * H),  # J (late), H, B, F: wall 96, 71, 18, 0.5 h; business 16, 7, 2, 0
        ("maria", 2, 1, 2 * H, 2 * H),  # A, D (late): wall 2, 26 h; business 2, 10 h
    ]
    assert now.acks == 6  # A B C D E G; F's was skipped (answered first)
    # The chart's days: share of the 8 business hours used per first response, by local day.
    assert [(day.day.day, day.used, day.on_time, day.median_used, day.missed) for day in now.days] == [
        (23, (2.0, 0.25, 0.875), (False, True, True), 0.875, 0),  # J 16 h (late), A 2 h, H 7 h
        (24, (0.25,), (True,), 0.25, 0),  # B
        (25, (), (), None, 1),  # C missed
        (26, (1.25,), (False,), 1.25, 1),  # D 10 h, missed
        (27, (), (), None, 0),
        (28, (0.0,), (True,), 0.0, 0),  # F on a Saturday: no business time used
        (29, (), (), None, 0),
    ]

    before = digest.previous
    assert before.week.label == "2026-W47"
    assert (before.posts, before.opened, before.answered, before.closed_without_reply) == (3, 3, 1, ())
    assert (before.within_sla, before.judged, before.share_within_sla) == (1, 2, 0.5)  # I on time, J missed
    assert (before.median_response, before.p90_response, before.median_business) == (H, H, H)
    assert [(b.conversation_id, b.late_by, b.answered) for b in before.breaches] == [(ids["J"], 72 * H, True)]
    assert before.backlog == 2 and before.oldest is not None  # J and H, waiting at Sun 22 24:00
    assert (before.oldest.conversation_id, before.oldest.waited) == (ids["J"], timedelta(days=3, hours=14))
    assert [(e.expert, e.handled, e.within_sla, e.median_response) for e in before.experts] == [
        ("maria", 1, 1, H)
    ]
    assert before.acks == 3

    c, d = ids["C"], ids["D"]
    assert render_text(digest).splitlines() == [
        "*Billing: weekly digest 2026-W48* (Mon 23 Nov \u2013 Sun 29 Nov 2026, Europe/Berlin); 2026-W47 in brackets",
        "Posts received: 9 (3)",
        "Conversations opened: 7 (3)",
        "First responses: 6 (1)",
        "Closed without reply: 1 (0): spam 1",
        "Answered within SLA: 67%, 4 of 6 (50%, 1 of 2)",
        "First response, median: 18 h wall, 2 h business (1 h, 1 h)",
        "First response, 90th percentile: 4 d wall, 16 h business (1 h, 1 h)",
        "*Deadlines missed*: 2 (1)",
        f"  \u2022 #{c} @cat&lt;!here&gt;, owner Maria Keller: unanswered, 4 d 14 h late at week end",
        f"  \u2022 #{d} @dan, owner Maria Keller: answered 2 h late",
        f"*Backlog at week end*: 2 (2); oldest #{c} @cat&lt;!here&gt;, waiting 5 d 14 h, owner Maria Keller",
        "*Per expert* (first responses, within SLA, median wall / business):",
        "  \u2022 Lee Wong: 4, 3 within SLA, median 18 h / 2 h",
        "  \u2022 Maria Keller: 2, 1 within SLA, median 2 h / 2 h",
        "Acknowledgements sent: 6 (3)",
    ]
    plain = render_text(digest, mrkdwn=False)
    assert "@cat<!here>" in plain and "*" not in plain

    png = render_chart(digest)
    assert png.startswith(PNG_MAGIC) and 5_000 < len(png) < 300_000
    (tmp_path / "digest.png").write_bytes(png)


# --- delivery: the outbox row, catch-up, the handler ---------------------------------------------


def digest_rows(ctx: AppContext) -> list[tuple[str, dict[str, object]]]:
    with ctx.sessions() as session:
        rows = session.scalars(select(Outbox).where(Outbox.kind == "digest").order_by(Outbox.id))
        return [(row.idempotency_key, dict(row.payload)) for row in rows]


def test_digest_time_is_monday_nine_in_the_team_zone() -> None:
    assert DigestSchedule is PolicyDigestSchedule  # one class, defined in bot.core.policy
    week = WeekRange.parse("2026-W43", "Europe/Berlin")  # the DST week: Monday after is CET
    assert digest_due_at(week, DigestSchedule()) == utc(2026, 10, 26, 8)
    assert digest_due_at(week, DigestSchedule.parse("fri 17:30")) == utc(2026, 10, 30, 16, 30)
    assert str(DigestSchedule.parse(" Mon 09:00 ")) == "mon 09:00"
    assert DigestSchedule.parse("SUN\t23:59") == DigestSchedule(6, time(23, 59))
    for bad in ("monday 9:00", "mon 9", "mon 25:00", "mon", "mon 09:00:30", "off", "", "mon 24:00"):
        with pytest.raises(ValueError):
            DigestSchedule.parse(bad)
    with pytest.raises(ValueError, match=r"unknown weekday 'monday'"):
        DigestSchedule.parse("monday 09:00")
    with pytest.raises(ValueError, match=r"HH:MM from 00:00 to 23:59"):
        DigestSchedule.parse("mon 09:60")
    with pytest.raises(ValueError, match=r"weekday must be 0 \(Monday\) to 6 \(Sunday\), got 7"):
        DigestSchedule(7)


def test_a_friday_evening_digest_follows_new_york_daylight_saving_time() -> None:
    friday = DigestSchedule.parse("fri 17:30")
    # The US leaves summer time on 1 November 2026, a week after Europe: 17:30 EDT, then EST.
    assert digest_due_at(WeekRange.parse("2026-W43", "America/New_York"), friday) == utc(2026, 10, 30, 21, 30)
    assert digest_due_at(WeekRange.parse("2026-W44", "America/New_York"), friday) == utc(2026, 11, 6, 22, 30)


def with_digests(ctx: AppContext, **digests: str) -> AppContext:
    """The same database and clock, the care team working from New York, and these digest times."""
    policy = ctx.policy
    calendars = {
        **policy.calendars,
        "new-york": CalendarSpec("new-york", "America/New_York", {day: ((540, 1020),) for day in range(5)}),
    }
    teams = dict(policy.teams)
    teams["care"] = replace(teams["care"], calendar="new-york")
    for team, text in digests.items():
        teams[team] = replace(teams[team], digest=None if text == "off" else DigestSchedule.parse(text))
    return AppContext(
        policy=replace(policy, calendars=calendars, teams=teams), engine=ctx.engine, clock=ctx.clock
    )


def one_conversation_each(ctx: AppContext) -> None:
    """Both teams had a conversation in week 48 (no digest is posted for weeks before the first)."""
    ingest(ctx, post("w48-care", "a general question"), post("w48-billing", "my invoice", author="bo"))


def test_no_digest_for_weeks_before_the_first_conversation(ctx: AppContext, clock: FakeClock) -> None:
    assert enqueue_due_digests(ctx, now=berlin(11, 30, 9)) == []  # a new install: nothing happened
    clock.set(berlin(12, 1, 10))
    ingest(ctx, post("w49", "a general question", at=berlin(12, 1, 10)))
    assert enqueue_due_digests(ctx, now=berlin(12, 1, 11)) == []  # week 48 still had nothing
    assert enqueue_due_digests(ctx, now=berlin(12, 7, 9)) == ["digest:care:2026-W49"]
    assert digest_rows(ctx) and enqueue_due_digests(ctx, now=berlin(12, 7, 10)) == []


def test_a_team_digest_on_friday_evening_in_new_york(ctx: AppContext) -> None:
    one_conversation_each(ctx)
    ny = with_digests(ctx, care="fri 17:30")
    assert schedule_of(ny, "care") == DigestSchedule(4, time(17, 30))
    assert schedule_of(ny, "billing") == DigestSchedule()
    # Monday 09:00 in Berlin: billing's week 48 is due; care's (New York's week) waits for Friday.
    assert enqueue_due_digests(ny, now=berlin(11, 30, 9)) == ["digest:billing:2026-W48"]
    assert enqueue_due_digests(ny, now=new_york(12, 4, 17, 29)) == []
    assert enqueue_due_digests(ny, now=new_york(12, 4, 17, 30)) == ["digest:care:2026-W48"]
    assert enqueue_due_digests(ny, now=new_york(12, 4, 18)) == []
    # Billing's next Monday comes first again; then a Friday missed while down is caught up, once.
    assert enqueue_due_digests(ny, now=berlin(12, 7, 9)) == ["digest:billing:2026-W49"]
    assert enqueue_due_digests(ny, now=new_york(12, 12, 10)) == ["digest:care:2026-W49"]
    assert enqueue_due_digests(ny, now=new_york(12, 12, 11)) == []
    assert [key for key, _ in digest_rows(ctx)] == [
        "digest:billing:2026-W48",
        "digest:care:2026-W48",
        "digest:billing:2026-W49",
        "digest:care:2026-W49",
    ]
    trigger = digest_trigger(ny, "care")
    assert trigger.get_next_fire_time(None, new_york(12, 1, 12)) == new_york(12, 4, 17, 30)
    assert trigger.get_next_fire_time(None, new_york(12, 4, 17, 31)) == new_york(12, 11, 17, 30)
    billing = digest_trigger(ny, "billing")
    assert billing.get_next_fire_time(None, new_york(12, 1, 12)) == berlin(12, 7, 9)


def test_a_team_whose_digest_is_off_gets_no_trigger_no_row_and_no_post(
    ctx: AppContext, clock: FakeClock
) -> None:
    one_conversation_each(ctx)
    off = with_digests(ctx, care="off")
    assert schedule_of(off, "care") is None
    assert digest_trigger(off, "care") is None
    assert digest_trigger(off, "billing") is not None
    assert enqueue_due_digests(off, now=berlin(11, 30, 9)) == ["digest:billing:2026-W48"]
    assert enqueue_due_digests(off, now=berlin(12, 14, 9), teams=["care"]) == []  # even when asked by name
    assert [key for key, _ in digest_rows(ctx)] == ["digest:billing:2026-W48"]
    # A row queued while the digest was still on is not posted once it is off.
    assert enqueue_due_digests(ctx, now=berlin(11, 30, 9), teams=["care"]) == ["digest:care:2026-W48"]
    emitted: list[str] = []
    clock.set(berlin(11, 30, 9))
    assert OutboxSender(off, digest_handlers(off, None, emitted.append)).send_due().sent == 2
    assert [line.split(":")[0] for line in emitted] == ["#billing"]
    with ctx.sessions() as session:
        results = {row.idempotency_key: row.result for row in session.scalars(select(Outbox))}
    assert results["digest:care:2026-W48"] == "skipped: the digest of team 'care' is off"


def test_enqueue_is_idempotent_and_waits_for_the_team_time(ctx: AppContext) -> None:
    one_conversation_each(ctx)
    assert enqueue_due_digests(ctx, now=berlin(11, 30, 8, 59)) == []  # W48 is over, but not 09:00 yet
    assert enqueue_due_digests(ctx, now=berlin(11, 30, 9)) == [
        "digest:care:2026-W48",
        "digest:billing:2026-W48",
    ]
    assert enqueue_due_digests(ctx, now=berlin(11, 30, 9)) == []
    assert enqueue_due_digests(ctx, now=berlin(11, 30, 10)) == []
    assert digest_rows(ctx) == [
        ("digest:care:2026-W48", {"team": "care", "week": "2026-W48"}),
        ("digest:billing:2026-W48", {"team": "billing", "week": "2026-W48"}),
    ]


def test_a_missed_monday_is_caught_up_once_when_the_process_returns(ctx: AppContext) -> None:
    one_conversation_each(ctx)
    # Down from Sunday to Wednesday: the first run after start-up queues week 48, once.
    assert enqueue_due_digests(ctx, now=berlin(12, 2, 14), teams=["billing"]) == ["digest:billing:2026-W48"]
    assert enqueue_due_digests(ctx, now=berlin(12, 2, 14, 1), teams=["billing"]) == []
    assert enqueue_due_digests(ctx, now=berlin(12, 7, 8), teams=["billing"]) == []  # W49: not 09:00 yet
    assert enqueue_due_digests(ctx, now=berlin(12, 7, 9, 5), teams=["billing"]) == ["digest:billing:2026-W49"]
    assert [key for key, _ in digest_rows(ctx)] == ["digest:billing:2026-W48", "digest:billing:2026-W49"]


def test_without_slack_the_digest_handler_emits_the_text(ctx: AppContext, clock: FakeClock) -> None:
    clock.set(berlin(11, 16, 10))  # a conversation in week 47; week 48 then has none
    ingest(ctx, post("w47", "my invoice", at=clock.now()))
    with ctx.sessions() as session, session.begin():
        session.scalars(select(Conversation)).one().status = "closed"
        session.scalars(select(Conversation)).one().closed_at = clock.now()
    clock.set(berlin(11, 30, 9))
    enqueue_due_digests(ctx, teams=["billing"])
    emitted: list[str] = []
    result = OutboxSender(ctx, digest_handlers(ctx, None, emitted.append)).send_due()
    assert result.sent == 1
    assert len(emitted) == 1
    assert emitted[0].startswith("#billing: Billing: weekly digest 2026-W48 (Mon 23 Nov")
    assert "No conversations this week." in emitted[0]


@pytest.fixture
def slack() -> Iterator[SlackStandIn]:
    with SlackStandIn(channels={"C0BILLING1": "billing", "C0CARE0001": "care"}) as standin:
        yield standin


def test_with_slack_the_text_and_chart_are_posted_once_even_across_a_retry(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn
) -> None:
    seed_billing_weeks(ctx, clock)  # leaves the clock at Mon 30 Nov 09:00 Berlin
    client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
    assert enqueue_due_digests(ctx, teams=["billing"]) == ["digest:billing:2026-W48"]
    slack.fail_next("files.getUploadURLExternal", error="internal_error", status=200)
    sender = OutboxSender(ctx, digest_handlers(ctx, client, lambda _line: None))
    first = sender.send_due()
    assert (first.sent, first.retried) == (0, 1)  # the text went out, the chart failed
    clock.advance(timedelta(minutes=5))
    second = sender.send_due()
    assert second.sent == 1
    messages = [m for m in slack.messages("billing") if not m.files]
    assert len(messages) == 1  # the retry did not post the text again
    assert messages[0].text.startswith("*Billing: weekly digest 2026-W48*")
    assert "@cat&lt;!here&gt;" in messages[0].text and "<!here>" not in messages[0].text
    uploads = [f for f in slack.files() if f.completed]
    assert len(uploads) == 1 and uploads[0].content.startswith(PNG_MAGIC)
    assert uploads[0].channels == ("C0BILLING1",) and uploads[0].filename == "replyclock-billing-2026-W48.png"
    with ctx.sessions() as session:
        row = session.scalars(select(Outbox).where(Outbox.kind == "digest")).one()
    assert row.status == "sent" and row.payload["text_ts"] == messages[0].ts
    assert row.payload["file_id"] == uploads[0].id


def test_post_digest_skips_the_steps_already_done(ctx: AppContext, slack: SlackStandIn) -> None:
    client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
    with ctx.sessions() as session:
        digest = build_digest(session, ctx, "care", WeekRange.parse("2026-W48", "Europe/Berlin"))
    ts = post_digest(client, "#care", digest, done={"text_ts": "1.000", "channel_id": "C0CARE0001"})
    assert ts == "1.000"
    assert slack.calls_to("chat.postMessage") == []
    assert [f.channels for f in slack.files()] == [("C0CARE0001",)]


# --- `replyclock digest` -------------------------------------------------------------------------


class Lines:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_digest_command_prints_writes_the_png_and_posts(
    ctx: AppContext, clock: FakeClock, tmp_path: Path, slack: SlackStandIn
) -> None:
    seed_billing_weeks(ctx, clock)
    out, err = Lines(), Lines()
    png = tmp_path / "digest.png"
    status = digest_command(ctx, team="billing", png=png, out=out, err=err)  # type: ignore[arg-type]
    assert status == 0
    assert out.text.startswith("Billing: weekly digest 2026-W48 ")  # the last completed week
    assert "Answered within SLA: 67%, 4 of 6" in out.text
    assert png.read_bytes().startswith(PNG_MAGIC)

    out = Lines()
    assert digest_command(ctx, week="2026-W47", png=png, out=out, err=err) == 0  # type: ignore[arg-type]
    assert (
        "Billing: weekly digest 2026-W47" in out.text and "Customer Care: weekly digest 2026-W47" in out.text
    )
    assert (tmp_path / "digest-billing.png").exists() and (tmp_path / "digest-care.png").exists()

    client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
    out = Lines()
    assert digest_command(ctx, team="care", post=True, client=client, out=out, err=err) == 0  # type: ignore[arg-type]
    assert out.text.startswith("posted the 2026-W48 digest of care to #care")
    assert len(slack.messages("care")) == 2  # the text, and the chart with its comment

    err = Lines()
    assert digest_command(ctx, team="sales", out=out, err=err) == 2  # type: ignore[arg-type]
    assert "unknown team 'sales'" in err.text
    assert digest_command(ctx, week="2026-W99", out=out, err=err) == 2  # type: ignore[arg-type]
    assert digest_command(ctx, post=True, out=out, err=err) == 2  # type: ignore[arg-type]
    assert "--post needs SLACK_BOT_TOKEN" in err.text


# --- the example chart ---------------------------------------------------------------------------


def seed_busy_week(ctx: AppContext, clock: FakeClock) -> None:
    """A plausible week of the billing team: ~7 posts a working day, most answered in time."""
    rng = random.Random(48)
    week = Week(ctx, clock)
    events: list[tuple[datetime, str, str]] = []
    for day in range(23, 30):
        count = 7 if day <= 27 else 2
        for index in range(count):
            opened = berlin(11, day, 8 + rng.randrange(10), rng.randrange(60))
            name = f"{day}-{index}"
            events.append((opened, "open", name))
            hours = rng.choice([0.5, 1, 1.5, 2, 3, 4, 5, 6, 7, 9, 12, 20, 30])
            if rng.random() < 0.92:
                events.append((opened + timedelta(hours=hours), "answer", name))
    clock.set(berlin(11, 23, 7))
    for when, action, name in sorted(events):
        if when >= berlin(11, 30, 9):
            continue
        if action == "open":
            week.open(
                name, when, f"customer{name}", "a question about my invoice", rng.choice(["maria", "lee"])
            )
        else:
            week.answer(name, when, rng.choice(["maria", "lee"]))
    week.at(berlin(11, 30, 9))


def test_the_chart_of_a_busy_seeded_week(policy: Policy, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'busy.db'}")
    upgrade(engine)
    clock = FakeClock(berlin(11, 23, 7))
    ctx = AppContext(policy=policy, engine=engine, clock=clock)
    seed_busy_week(ctx, clock)
    with ctx.sessions() as session:
        digest = build_digest(session, ctx, "billing", WeekRange.parse("2026-W48", "Europe/Berlin"))
    engine.dispose()
    assert digest.current.answered > 25 and digest.current.breaches
    png = render_chart(digest)
    assert png.startswith(PNG_MAGIC) and 10_000 < len(png) < 300_000
    (tmp_path / "digest.png").write_bytes(png)
    if os.environ.get("REPLYCLOCK_WRITE_DOCS"):  # REPLYCLOCK_WRITE_DOCS=1 pytest -k busy: refresh the docs
        (Path(__file__).parent.parent / "docs" / "digest-example.png").write_bytes(png)


def test_compute_digest_is_pure_and_compares_two_weeks() -> None:
    week = WeekRange.parse("2026-W43", "Europe/Berlin")
    this = WeekData(week, (wall_facts(1, utc(2026, 10, 20, 8), utc(2026, 10, 20, 9)),), posts=1, acks=1)
    last = WeekData(week.previous(), (), posts=0, acks=0)
    digest = compute_digest("care", this, last, policies=POLICIES, calendars=CALENDARS, team_label="Care")
    assert digest == compute_digest(
        "care", this, last, policies=POLICIES, calendars=CALENDARS, team_label="Care"
    )
    assert digest.previous.week.label == "2026-W42" and digest.previous.is_empty
    assert digest.current.median_response == H
    text = render_text(digest, mrkdwn=False)
    assert "Posts received: 1 (0)" in text and "Answered within SLA: 100%, 1 of 1 (\u2013, 0 of 0)" in text
