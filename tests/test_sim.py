"""The simulator (bot.sim): working-time arithmetic, the answer model, the queue, the ladder,
and the proofs that it is right (Erlang C for M/M/c, a backtest on a generated year)."""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from bot.config import parse_policy
from bot.core.policy import CalendarSpec, Policy
from bot.core.sla import BusinessCalendar
from bot.reports.backtest import run_backtest, summary
from bot.sim.engine import Arrival, Simulator
from bot.sim.erlang import erlang_c, response_within
from bot.sim.model import AnswerRecord, EmpiricalModel, fit
from bot.sim.synth import ExponentialTimes, mmc_policy, poisson_arrivals
from bot.sim.workclock import WorkClock

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday; Europe/Berlin changes to summer time on 29 March


def berlin() -> BusinessCalendar:
    return BusinessCalendar(
        CalendarSpec(
            name="office",
            timezone="Europe/Berlin",
            hours={d: ((540, 750), (810, 1020)) for d in range(5)},
            holiday_country="DE",
        )
    )


def test_work_clock_agrees_with_the_sla_clock() -> None:
    calendar = berlin()
    clock = WorkClock(calendar, START.timestamp(), (START + timedelta(days=120)).timestamp())
    rng = random.Random(5)
    for _ in range(300):
        t = START + timedelta(seconds=rng.uniform(0, 60 * 86400))
        amount = timedelta(seconds=rng.uniform(0, 40 * 3600))
        expected = calendar.add_business_time(t, amount)
        got = clock.wall(clock.work(t.timestamp()) + amount.total_seconds())
        assert abs(got - expected.timestamp()) < 1e-3, (t, amount)
        later = t + timedelta(seconds=rng.uniform(0, 20 * 86400))
        assert clock.between(t.timestamp(), later.timestamp()) == pytest.approx(
            calendar.business_time_between(t, later).total_seconds(), abs=1e-3
        )
        assert clock.is_open(t.timestamp()) == calendar.is_open(t)
        assert clock.next_open(t.timestamp()) == pytest.approx(calendar.next_open(t).timestamp())


def test_erlang_c_formula_known_values() -> None:
    # M/M/1: the response time is exponential with rate mu - lambda.
    assert response_within(1, 0.5, 1.0, 2.0) == pytest.approx(1 - math.exp(-1.0))
    # Erlang C for 2 servers at 1 Erlang is 1/3.
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    # c - 1 = a: the limit form, continuous with its neighbours.
    assert response_within(3, 2.0, 1.0, 1.5) == pytest.approx(
        response_within(3, 2.0 + 1e-6, 1.0, 1.5), abs=1e-5
    )


@pytest.mark.parametrize("servers", [1, 2, 3, 4, 5])
def test_simulated_mmc_agrees_with_erlang_c(servers: int) -> None:
    """Smaller than the bench (which holds 2 points on 60,000 arrivals): 12,000 arrivals, 4 points."""
    count, rate = 12_000, 0.7 * servers
    arrivals = poisson_arrivals(rate, count, start=START, seed=servers)
    simulator = Simulator(
        mmc_policy(servers, timedelta(hours=2)), ExponentialTimes(3600.0), start=START, end=arrivals[-1].at
    )
    result = simulator.run(arrivals, seed=7, ladder=False)
    counted = result.conversations[count // 10 :]
    within = sum(1 for c in counted if c.first_response_at and c.first_response_at <= c.first_due_at) / len(
        counted
    )
    assert abs(within - response_within(servers, rate, 1.0, 2.0)) < 0.04


def test_a_seed_gives_the_same_result_and_another_seed_another() -> None:
    arrivals = poisson_arrivals(2.0, 2000, start=START, seed=1)
    simulator = Simulator(
        mmc_policy(3, timedelta(hours=1)), ExponentialTimes(3600.0), start=START, end=arrivals[-1].at
    )

    def answers(seed: int) -> list[datetime | None]:
        return [c.first_response_at for c in simulator.run(arrivals, seed=seed).conversations]

    assert answers(4) == answers(4)
    assert answers(4) != answers(5)


@dataclass
class Fixed:
    seconds: float

    def sample(self, expert: str, team: str, hour_of_week: int, u: float) -> float:
        return self.seconds


def policy_from(text: str) -> Policy:
    return parse_policy(tomllib.loads(text), source="t.toml", text=text)


LADDER_POLICY = """
[settings]
default_team = "care"
[calendars.office]
timezone = "UTC"
hours = { mon-fri = ["09:00-17:00"] }
[experts.ann]
name = "Ann"
slack_id = "U00000001"
timezone = "UTC"
hours = { mon-fri = ["09:00-17:00"] }
[experts.boss]
name = "Boss"
slack_id = "U00000002"
timezone = "UTC"
[teams.care]
channel = "#care"
calendar = "office"
experts = ["ann"]
manager = "boss"
[[routing]]
name = "urgent"
team = "care"
priority = "urgent"
keywords = ["down"]
[[policies]]
name = "urgent"
match = { priorities = ["urgent"] }
clock = "wall"
first_response = "1h"
warn_at = [0.5]
nag_every = "15m"
escalation = [{ after = "0s", notify = "team_channel" }, { after = "30m", notify = "manager" }]
[[policies]]
name = "standard"
clock = "business"
calendar = "office"
first_response = "8h"
warn_at = [0.75]
nag_every = "1h"
"""


def test_ladder_steps_are_counted_until_the_simulated_answer() -> None:
    policy = policy_from(LADDER_POLICY)
    at = START.replace(hour=10)
    simulator = Simulator(policy, Fixed(150 * 60.0), start=START, end=START + timedelta(days=2))
    result = simulator.run([Arrival(1, at, "x", "c1", "site is down")], seed=0)
    (conversation,) = result.conversations
    assert conversation.policy == "urgent"
    assert conversation.first_due_at == at + timedelta(hours=1)
    assert conversation.first_response_at == at + timedelta(minutes=150)
    assert conversation.owner == "ann"
    # Warning at 30 min; breach at 60; escalations at 60 and 90; nags at 75, 90, 105, 120, 135.
    assert (conversation.warnings, conversation.breached, conversation.escalations, conversation.nags) == (
        1,
        True,
        2,
        5,
    )


def test_one_conversation_at_a_time_earliest_deadline_first_in_working_hours() -> None:
    policy = policy_from(LADDER_POLICY)
    friday_evening = START.replace(day=6, hour=16)  # Friday 16:00, one working hour left
    arrivals = [
        Arrival(1, friday_evening, "x", "c1", "a question"),  # standard: business 8h
        Arrival(2, friday_evening + timedelta(minutes=1), "x", "c2", "a question"),
        Arrival(3, friday_evening + timedelta(minutes=2), "x", "c3", "site is down"),  # urgent: 1h wall
    ]
    simulator = Simulator(policy, Fixed(40 * 60.0), start=START, end=START + timedelta(days=10))
    first, second, urgent = simulator.run(arrivals, seed=0).conversations
    # Ann starts the first at once; the urgent one jumps the queue; the second waits for Monday.
    assert first.first_response_at == friday_evening + timedelta(minutes=40)
    # 16:40-17:00 on Friday and 09:00-09:20 on Monday.
    assert urgent.first_response_at == START.replace(day=9, hour=9, minute=20)
    assert second.first_response_at == START.replace(day=9, hour=10, minute=0)


def test_fit_counts_from_the_later_of_assignment_and_previous_answer_in_working_hours() -> None:
    calendar = BusinessCalendar(
        CalendarSpec(name="ann", timezone="UTC", hours={d: ((540, 1020),) for d in range(5)})
    )
    clock = WorkClock(calendar, START.timestamp(), (START + timedelta(days=14)).timestamp())
    nine = START.replace(hour=9).timestamp()
    records = [
        AnswerRecord("ann", "care", nine, nine + 1800),  # 30 min of work
        AnswerRecord("ann", "care", nine + 300, nine + 3600),  # started at 09:30 when free: 30 min
        # Assigned Monday 16:30, answered Tuesday 09:15: 30 + 15 working minutes.
        AnswerRecord("ann", "care", nine + 7.5 * 3600, nine + 24 * 3600 + 900),
    ]
    model = fit(records, {"ann": clock}, min_samples=1)
    assert sorted(model.everyone) == [1800.0, 1800.0, 2700.0]
    assert model.expert_hours["ann"][9] == [1800.0, 1800.0]  # Monday 09:00-10:00 local
    assert model.expert_hours["ann"][16] == [2700.0]


def test_model_falls_back_from_the_hour_to_the_expert_to_the_team() -> None:
    model = EmpiricalModel(min_samples=2)
    model.add("ann", "care", 10, 60.0)
    model.add("ann", "care", 11, 120.0)
    model.add("bob", "care", 10, 600.0)
    assert model.samples("ann", "care", 10) == [60.0, 120.0]  # ann's hour 10 has one: ann's week
    assert model.samples("cid", "care", 10) == [60.0, 600.0]  # nobody called cid: the team's hour 10
    assert model.sample("ann", "care", 10, 0.99) == 120.0


def test_backtest_on_a_generated_year_predicts_weekly_share() -> None:
    """A smaller year than the bench's: 20,000 conversations, one copy of the staff."""
    result = run_backtest(per_year=20_000, copies=1, replications=2, seed=11)
    for team, errors in result.errors.items():
        figures = summary(errors)
        assert figures["weeks"] >= 25, team
        assert figures["median"] <= 2.5, (team, figures)
        assert figures["within5"] >= 0.85, (team, figures)
        assert abs(figures["mean"]) <= 2.0, (team, figures)


def test_scaling_arrivals_thins_and_repeats_with_jitter() -> None:
    from bot.sim.scenario import scale_arrivals

    arrivals = poisson_arrivals(10.0, 4000, start=START, seed=3)
    half = scale_arrivals(arrivals, 0.5, seed=1)
    assert 1800 < len(half) < 2200 and {a.key for a in half} <= {a.key for a in arrivals}
    more = scale_arrivals(arrivals, 1.5, seed=1)
    assert 5800 < len(more) < 6200
    assert len({a.key for a in more}) == len(more)
    assert [a.at for a in more] == sorted(a.at for a in more)
    copies = [a for a in more if "#" in a.author_id]
    originals = {a.author_id: a.at for a in arrivals}
    assert all(abs(a.at - originals[a.author_id.split("#")[0]]) <= timedelta(hours=1) for a in copies)
    assert scale_arrivals(arrivals, 1.5, seed=1) == more  # seeded


def test_hours_and_staffing_changes() -> None:
    from bot.sim.scenario import add_expert, parse_hours, remove_expert

    assert parse_hours("mon-wed 09:00-17:00,sat 10:00-14:00") == {
        0: ((540, 1020),),
        1: ((540, 1020),),
        2: ((540, 1020),),
        5: ((600, 840),),
    }
    with pytest.raises(ValueError, match="not working hours"):
        parse_hours("someday 9-5")
    policy = policy_from(LADDER_POLICY)
    bigger, ident = add_expert(policy, "care", parse_hours("mon-fri 12:00-20:00"))
    assert bigger.teams["care"].experts == ("ann", ident) and bigger.experts[ident].timezone == "UTC"
    assert remove_expert(bigger, "ann").teams["care"].experts == (ident,)


def _weekday_clock(start_minute: int, end_minute: int) -> WorkClock:
    spec = CalendarSpec(name="x", timezone="UTC", hours={d: ((start_minute, end_minute),) for d in range(5)})
    return WorkClock(BusinessCalendar(spec), START.timestamp(), (START + timedelta(days=20)).timestamp())


def _hour_long_answers(*experts: str) -> EmpiricalModel:
    model = EmpiricalModel(min_samples=1)
    for expert in experts:
        model.add(expert, "care", 9, 3600.0)  # every answer takes one working hour
    return model


def test_queue_forecast_works_through_the_queue_in_working_hours_only() -> None:
    from bot.sim.queueing import QueueItem, queue_finishes

    nine = START.replace(hour=9).timestamp()
    members = [("ann", _weekday_clock(9 * 60, 17 * 60))]
    finishes = queue_finishes(
        _hour_long_answers("ann"), team="care", now=nine, items=[QueueItem()] * 11, members=members, draws=5
    )
    assert finishes.shape == (11, 5)
    assert list(finishes[0]) == [nine + 3600] * 5
    assert finishes[3][0] == nine + 4 * 3600
    # Eight answers on Monday, then the ninth to eleventh on Tuesday from 09:00.
    assert finishes[10][0] == START.replace(day=3, hour=12).timestamp()


def test_queue_forecast_pins_claims_and_lets_owners_pick_up_their_own() -> None:
    from bot.sim.queueing import QueueItem, queue_finishes

    nine = START.replace(hour=9).timestamp()
    ann, bob = _weekday_clock(9 * 60, 17 * 60), _weekday_clock(9 * 60, 10 * 60)
    model = _hour_long_answers("ann", "bob")
    now = nine + 1800
    items = [
        QueueItem(owner=0, claimed_by=0, claimed_at=nine),  # Ann has spent half an hour on it
        QueueItem(owner=1),  # Bob's: he starts now, has half an hour left today
        QueueItem(owner=0),
    ]
    finishes = queue_finishes(model, team="care", now=now, items=items, members=[("ann", ann), ("bob", bob)])
    assert set(finishes[0]) == {nine + 3600}  # the rest of the hour, not a fresh one
    assert set(finishes[1]) == {START.replace(day=3, hour=9, minute=30).timestamp()}  # across the night
    assert set(finishes[2]) == {nine + 2 * 3600}  # Ann, once her claimed one is done
    # When Ann's own one comes next but Bob is free first, Bob takes it (whoever gets to it first).
    items[1:] = [QueueItem(owner=0), QueueItem()]
    again = queue_finishes(model, team="care", now=now, items=items, members=[("ann", ann), ("bob", bob)])
    assert set(again[1]) == {START.replace(day=3, hour=9, minute=30).timestamp()}
    assert set(again[2]) == {nine + 2 * 3600}


def test_at_risk_figures_count_catches_and_false_alarms_and_choose_the_cut_on_other_weeks() -> None:
    from bot.reports.backtest import at_risk_figures, at_risk_report, choose_threshold
    from bot.sim.engine import SimConversation

    def conversation(opened: datetime, late: bool | None, peaks: list[float]) -> SimConversation:
        due = opened + timedelta(hours=4)
        answered = None if late is None else due + timedelta(minutes=30 if late else -30)
        found = SimConversation(
            key=0,
            team="care",
            policy="p",
            calendar="c",
            owner="ann",
            opened_at=opened,
            first_due_at=due,
            first_target=timedelta(hours=4),
            warn_at=(opened + timedelta(hours=3),),
            first_response_at=answered,
        )
        found.risk = [(opened + timedelta(minutes=15 * (i + 1)), p) for i, p in enumerate(peaks)]
        return found

    week1, week2 = START, START + timedelta(weeks=1)
    history = [
        conversation(week1, True, [0.3, 0.9]),  # caught at 0.5 (its second check)
        conversation(week1, None, [0.6]),  # never answered: a breach, caught
        conversation(week1, True, []),  # a breach nobody saw coming
        conversation(week1, False, [0.7]),  # a false alarm at 0.5
        conversation(week1, False, [0.2]),
        conversation(week2, True, [0.95]),
        conversation(week2, False, [0.55]),
    ]
    figures = at_risk_figures(history, week1, week2, 0.5)
    assert (figures.conversations, figures.breached, figures.flagged, figures.flagged_and_breached) == (
        5,
        3,
        3,
        2,
    )
    assert figures.precision == pytest.approx(2 / 3) and figures.recall == pytest.approx(2 / 3)
    # The first check over the cut is when the notice goes: 3 h 30 min before the deadline.
    assert history[0].flagged_at(0.5) == week1 + timedelta(minutes=30)
    high = at_risk_figures(history, week1, week2, 0.8)
    assert (high.flagged, high.flagged_and_breached) == (1, 1)
    # Week 1: precision >= 60 % from 0.25 (2 of 3); recall 2 of 3 up to 0.6, then 1 of 3: the
    # best recall wins, the higher cut among equals. Judged on week 2 only.
    report = at_risk_report(history, (week1, week2), (week2, week2 + timedelta(weeks=1)))
    assert report.chosen == choose_threshold(report.calibration) == 0.6
    assert report.result.threshold == 0.6 and report.result.precision == 1.0 and report.result.recall == 1.0
    # At 0.5 week 2 has a false alarm too.
    assert next(f for f in report.evaluation if f.threshold == 0.5).precision == 0.5
