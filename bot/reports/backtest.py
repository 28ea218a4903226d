"""The backtest (reads the digest figures through `bot.reports.simulation`): fit the answer-time model on earlier weeks of a history, simulate later ones.

`run_backtest` generates a realistic year (`bot.sim.synth`), takes what the synthetic experts
did as "what happened", fits an `EmpiricalModel` on the weeks before `split`, and simulates the
weeks from `split` on (the recorded arrivals, `replications` seeds, averaged). It returns the
error of the weekly share within target per team and week, and, as the floor no model can go
below, the error of "what happened" re-run with another seed (the same truth, other luck).

With `at_risk`, it also emulates the live "at risk" check on what happened after the split
(`bot.sim.engine.Probe`) and reports its precision and recall for every cut on the chance of a
breach (`at_risk_report`): the cut is chosen on the calibration weeks and judged on later ones.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from bot.core.policy import Policy
from bot.reports.simulation import weekly_shares, weeks_between
from bot.sim.engine import Probe, SimConversation, Simulator
from bot.sim.model import AnswerRecord, EmpiricalModel, fit
from bot.sim.synth import realistic_arrivals, realistic_policy, true_times


@dataclass
class Backtest:
    errors: dict[str, list[float]] = field(default_factory=dict)  # team -> points, per week
    floor: dict[str, list[float]] = field(default_factory=dict)
    rows: list[tuple[str, str, float, float]] = field(default_factory=list)  # team, week, actual, simulated
    conversations: int = 0
    fitted_samples: int = 0
    truth: list[SimConversation] = field(default_factory=list)
    model: EmpiricalModel | None = None
    policy: Policy | None = None
    # "At risk" notices emulated on what happened after the split (forecast with the fitted model).
    at_risk: AtRiskReport | None = None


@dataclass(frozen=True)
class AtRisk:
    """The at-risk notice with one cut on the chance of a breach, over the conversations opened in
    a span: a catch is a notice (always before the first warning: the check stops there) for a
    conversation answered after its deadline or never; a false alarm, one for a conversation
    answered within its target."""

    threshold: float
    conversations: int
    breached: int
    flagged: int
    flagged_and_breached: int
    median_lead: timedelta | None  # how long before its deadline a true alarm came

    @property
    def precision(self) -> float | None:
        return self.flagged_and_breached / self.flagged if self.flagged else None

    @property
    def recall(self) -> float | None:
        return self.flagged_and_breached / self.breached if self.breached else None

    @property
    def f1(self) -> float:
        p, r = self.precision or 0.0, self.recall or 0.0
        return 2 * p * r / (p + r) if p + r else 0.0


THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
MIN_PRECISION = 0.6  # the calibration's bar for "few false alarms"


@dataclass(frozen=True)
class AtRiskReport:
    """Cuts tried on the calibration weeks, the one chosen there, and every cut on the held-out weeks."""

    calibration: list[AtRisk]
    chosen: float
    evaluation: list[AtRisk]

    @property
    def result(self) -> AtRisk:
        return next(figures for figures in self.evaluation if figures.threshold == self.chosen)


def at_risk_figures(
    conversations: Sequence[SimConversation], since: datetime, until: datetime, threshold: float
) -> AtRisk:
    """Precision and recall of the notice (a chance of at least `threshold`) over [since, until)."""
    span = [c for c in conversations if since <= c.opened_at < until]
    breached = {id(c) for c in span if c.first_response_at is None or c.first_response_at > c.first_due_at}
    flagged = [(c, c.flagged_at(threshold)) for c in span]
    flagged = [(c, at) for c, at in flagged if at is not None]
    leads = sorted(c.first_due_at - at for c, at in flagged if id(c) in breached and at is not None)
    return AtRisk(
        threshold=threshold,
        conversations=len(span),
        breached=len(breached),
        flagged=len(flagged),
        flagged_and_breached=sum(1 for c, _ in flagged if id(c) in breached),
        median_lead=leads[len(leads) // 2] if leads else None,
    )


def choose_threshold(figures: Sequence[AtRisk], min_precision: float = MIN_PRECISION) -> float:
    """The cut with the best recall among those with precision >= `min_precision`; without any,
    the one with the best F1 (ties: the higher cut)."""
    good = [f for f in figures if (f.precision or 0.0) >= min_precision and f.recall is not None]
    if good:
        return max(good, key=lambda f: (f.recall or 0.0, f.threshold)).threshold
    return max(figures, key=lambda f: (f.f1, f.threshold)).threshold


def at_risk_report(
    conversations: Sequence[SimConversation],
    calibrate: tuple[datetime, datetime],
    evaluate: tuple[datetime, datetime],
) -> AtRiskReport:
    """Choose the cut on the calibration span only, then report every cut on the evaluation span."""
    calibration = [at_risk_figures(conversations, *calibrate, t) for t in THRESHOLDS]
    chosen = choose_threshold(calibration)
    evaluation = [at_risk_figures(conversations, *evaluate, t) for t in THRESHOLDS]
    return AtRiskReport(calibration=calibration, chosen=chosen, evaluation=evaluation)


def records_of(conversations: Sequence[SimConversation], before: datetime) -> list[AnswerRecord]:
    """History as the model sees it: who answered, assigned when (on arrival), answered when."""
    return [
        AnswerRecord(c.answered_by, c.team, c.opened_at.timestamp(), c.first_response_at.timestamp())
        for c in conversations
        if c.first_response_at is not None and c.answered_by is not None and c.first_response_at < before
    ]


def summary(errors: Sequence[float]) -> dict[str, float]:
    """Distribution of absolute errors (points): median, p90, max, share of weeks within 5."""
    absolute = sorted(abs(e) for e in errors)
    if not absolute:
        return {"weeks": 0, "mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0, "within5": 0.0}
    p90 = absolute[min(len(absolute) - 1, int(0.9 * len(absolute)))]
    return {
        "weeks": len(absolute),
        "mean": statistics.mean(errors),
        "median": statistics.median(absolute),
        "p90": p90,
        "max": absolute[-1],
        "within5": sum(1 for e in absolute if e <= 5.0) / len(absolute),
    }


def run_backtest(
    *,
    year: int = 2025,
    per_year: int = 100_000,
    copies: int = 4,
    split_week: int = 21,
    replications: int = 3,
    seed: int = 3,
    at_risk: bool = False,
    evaluate_week: int = 31,
    claims: bool = True,
) -> Backtest:
    """Generate, fit on the weeks before ISO week `split_week`, simulate the rest, compare;
    with `at_risk`, also emulate the at-risk check on what happened after the split: its cut on the
    chance of a breach is chosen on the weeks before `evaluate_week` and judged on the weeks from it."""
    policy = realistic_policy(copies)
    arrivals = realistic_arrivals(year=year, per_year=per_year, seed=seed)
    start = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    split = datetime.fromisocalendar(year, split_week, 1).replace(tzinfo=UTC)
    world = Simulator(policy, true_times(copies), start=start, end=end)
    truth = world.run(arrivals, seed=seed + 1000)
    other_luck = world.run(arrivals, seed=seed + 2000)
    model = fit(records_of(truth.conversations, split), world.clocks)
    later = [arrival for arrival in arrivals if arrival.at >= split]
    simulator = Simulator(policy, model, start=split, end=end, calendars=world.calendars)
    runs = [simulator.run(later, seed=seed + r) for r in range(replications)]
    result = Backtest(
        conversations=len(arrivals),
        fitted_samples=model.size,
        truth=truth.conversations,
        model=model,
        policy=policy,
    )
    if at_risk:
        # The same world (same seed, same answers) with the at-risk check emulated every 15 minutes,
        # with the model fitted before the split.
        probe = Probe(model, start=split, every=timedelta(minutes=15), claims=claims)
        probed = world.run(arrivals, seed=seed + 1000, ladder=False, probe=probe)
        held_out = datetime.fromisocalendar(year, evaluate_week, 1).replace(tzinfo=UTC)
        result.at_risk = at_risk_report(probed.conversations, (split, held_out), (held_out, end))
    for team, spec in policy.teams.items():
        zone = policy.calendars[spec.calendar].timezone
        # Whole weeks after the split (the first one lets the simulated queues fill up).
        weeks = weeks_between(split, end, zone)[1:-1]
        actual = weekly_shares(policy, world.calendars, truth.conversations, team, weeks)
        luck = weekly_shares(policy, world.calendars, other_luck.conversations, team, weeks)
        simulated = [weekly_shares(policy, world.calendars, run.conversations, team, weeks) for run in runs]
        errors, floor = result.errors.setdefault(team, []), result.floor.setdefault(team, [])
        for index, week in enumerate(weeks):
            values = [run[index] for run in simulated if run[index] is not None]
            truth_share, luck_share = actual[index], luck[index]
            if truth_share is None or not values:
                continue
            predicted = statistics.mean(v for v in values if v is not None)
            errors.append(100.0 * (predicted - truth_share))
            result.rows.append((team, week.label, 100.0 * truth_share, 100.0 * predicted))
            if luck_share is not None:
                floor.append(100.0 * (luck_share - truth_share))
    return result
