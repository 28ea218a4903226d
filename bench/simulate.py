"""The simulator: how fast it is, and how right (Erlang C and a backtest).

Three parts (all by default; pick with --part):

* ``speed``: a generated year of about 100,000 conversations (two teams, 28 experts, weekly and
  daily seasonality, a launch spike, holidays) simulated with an answer-time model fitted on
  the year's history; prints the set-up and simulation times (the goal: under 30 s).
* ``erlang``: Poisson arrivals, exponential answering times, c = 1..5 experts always on duty, a
  wall-clock target, 3 runs per case with other seeds; their mean simulated share answered within the target against the Erlang C
  formula for M/M/c (the goal: within 2 points everywhere). The first 10 % of each run warms
  the queue up and is not counted.
* ``backtest``: fit on the weeks of the generated year before week 21, simulate weeks 22-52
  (3 seeds averaged), compare the weekly share within target per team with what happened;
  prints every week, the distribution of the errors, and the floor (what happened, re-run with
  other luck, against itself). The goal: within 5 points.
* ``atrisk``: on a smaller generated year (20,000 conversations, one copy of the staff) the
  "at risk" check is emulated every 15 minutes before each conversation's first warning on what
  happened after week 20 (the chance of a breach from the team's open queue, with the model
  fitted on weeks 1-20); the cut on that chance is chosen on weeks 21-30 and judged on weeks
  31-52: prints precision (notices for conversations that did breach) and recall (breaches
  noticed before the first warning) for every cut.

Run from the project root::

    .venv/bin/python -m bench.simulate
    .venv/bin/python -m bench.simulate --part erlang --arrivals 60000
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time
from datetime import UTC, datetime, timedelta

from bench.common import cpu_model
from bot.reports.backtest import AtRisk, records_of, run_backtest, summary
from bot.sim.engine import Simulator
from bot.sim.erlang import response_within
from bot.sim.model import fit
from bot.sim.synth import (
    ExponentialTimes,
    mmc_policy,
    poisson_arrivals,
    realistic_arrivals,
    realistic_policy,
    true_times,
)


def _load() -> str:
    one, five, _fifteen = os.getloadavg()
    return f"load {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def speed(per_year: int) -> None:
    print(f"== speed: a year of {per_year:,} conversations ==")
    start, end = datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)
    began = time.perf_counter()
    policy = realistic_policy(4)
    arrivals = realistic_arrivals(year=2025, per_year=per_year, seed=1)
    world = Simulator(policy, true_times(4), start=start, end=end)
    history = world.run(arrivals, seed=2, ladder=False)
    model = fit(records_of(history.conversations, end), world.clocks)
    prepared = time.perf_counter()
    cpu0 = time.process_time()
    simulator = Simulator(policy, model, start=start, end=end, calendars=world.calendars)
    built = time.perf_counter()
    result = simulator.run(arrivals, seed=3)
    done = time.perf_counter()
    cpu = time.process_time() - cpu0
    answered = sum(1 for c in result.conversations if c.first_response_at is not None)
    steps = sum(c.warnings + c.nags + c.escalations + c.breached for c in result.conversations)
    print(f"  arrivals {len(arrivals):,}, answered {answered:,}, ladder steps {steps:,}")
    print(f"  history generated and model fitted in {prepared - began:.1f} s ({model.size:,} samples)")
    print(
        f"  simulator set-up {built - prepared:.2f} s, simulation (routing, queues, ladder) {done - built:.2f} s"
    )
    total = done - prepared
    print(f"  total {total:.2f} s wall, {cpu:.2f} s CPU; {len(arrivals) / total:,.0f} conversations/s")
    print(
        f"  goal < 30 s: {'met' if total < 30 else 'NOT MET'} (ratio to goal {total / 30:.2f})  [{_load()}]"
    )


def erlang(count: int, replications: int) -> float:
    print(
        f"== Erlang C: M/M/c, {replications} x {count:,} arrivals per case (other seeds), "
        "mean answer 1 h, target 2 h =="
    )
    start = datetime(2026, 1, 5, tzinfo=UTC)
    target = timedelta(hours=2)
    worst = 0.0
    print(f"  {'c':>2} {'load':>5} {'Erlang C':>9} {'simulated':>10} {'diff (pts)':>11} {'s.e.':>6}")
    for servers in range(1, 6):
        for load in (0.5, 0.7, 0.85):
            rate = load * servers  # per hour, service rate 1 per hour
            policy = mmc_policy(servers, target)
            shares = []
            for replication in range(replications):
                seed = 1000 * replication + 100 * servers + int(load * 100)
                arrivals = poisson_arrivals(rate, count, start=start, seed=seed)
                simulator = Simulator(policy, ExponentialTimes(3600.0), start=start, end=arrivals[-1].at)
                result = simulator.run(arrivals, seed=seed, ladder=False)
                counted = result.conversations[count // 10 :]
                shares.append(
                    sum(
                        1
                        for c in counted
                        if c.first_response_at is not None and c.first_response_at <= c.first_due_at
                    )
                    / len(counted)
                )
            within = statistics.mean(shares)
            error = statistics.stdev(shares) / math.sqrt(len(shares)) if len(shares) > 1 else float("nan")
            exact = response_within(servers, rate, 1.0, 2.0)
            diff = 100 * (within - exact)
            worst = max(worst, abs(diff))
            print(
                f"  {servers:>2} {load:>5.2f} {100 * exact:>8.2f}% {100 * within:>9.2f}% {diff:>+11.2f} "
                f"{100 * error:>6.2f}"
            )
    print(f"  largest difference {worst:.2f} points; goal <= 2: {'met' if worst <= 2 else 'NOT MET'}")
    return worst


def backtest(per_year: int) -> None:
    print(f"== backtest: a generated year of ~{per_year:,} conversations, fit weeks 1-20, simulate 21-52 ==")
    began = time.perf_counter()
    result = run_backtest(per_year=per_year)
    print(f"  {result.conversations:,} conversations, {result.fitted_samples:,} answer-time samples fitted")
    print(f"  {'team':<8} {'week':<9} {'actual':>7} {'simulated':>10} {'error':>7}")
    for team, week, actual, simulated in result.rows:
        print(f"  {team:<8} {week:<9} {actual:>6.1f}% {simulated:>9.1f}% {simulated - actual:>+7.1f}")
    for team in result.errors:
        model, floor = summary(result.errors[team]), summary(result.floor[team])
        print(
            f"  {team}: |error| median {model['median']:.2f}, p90 {model['p90']:.2f}, max {model['max']:.2f} "
            f"points, mean error {model['mean']:+.2f}; weeks within 5 points {100 * model['within5']:.0f} % "
            f"of {model['weeks']}"
        )
        print(
            f"  {team} floor (same truth, other luck): |error| median {floor['median']:.2f}, "
            f"p90 {floor['p90']:.2f}, max {floor['max']:.2f}"
        )
    print(f"  took {time.perf_counter() - began:.1f} s  [{_load()}]")


def _risk_row(figures: AtRisk, chosen: float) -> str:
    precision = "-" if figures.precision is None else f"{100 * figures.precision:.1f}"
    recall = "-" if figures.recall is None else f"{100 * figures.recall:.1f}"
    lead = "-" if figures.median_lead is None else f"{figures.median_lead.total_seconds() / 3600:.1f}"
    mark = "  <- chosen on weeks 21-30" if figures.threshold == chosen else ""
    return (
        f"  {figures.threshold:>5.2f} {figures.flagged:>8,} {figures.flagged_and_breached:>6,} "
        f"{figures.breached:>8,} {precision:>9} {recall:>7} {lead:>8}{mark}"
    )


def at_risk(per_year: int, claims: bool) -> None:
    print(
        f"== at risk: a generated year of ~{per_year:,} conversations (one copy of the staff); model fitted "
        "on weeks 1-20, the check emulated every 15 min before each first warning; the cut on the "
        "chance of a breach chosen on weeks 21-30 (best recall with precision >= 60 %), judged on weeks 31-52; "
        + (
            "claims known (who is answering what, since when)"
            if claims
            else "WITHOUT claims (everyone taken to be free)"
        )
        + " =="
    )
    began = time.perf_counter()
    result = run_backtest(per_year=per_year, copies=1, replications=1, seed=11, at_risk=True, claims=claims)
    report = result.at_risk
    assert report is not None
    header = f"  {'cut':>5} {'flagged':>8} {'hits':>6} {'breached':>8} {'prec. %':>9} {'recall %':>7} {'lead h':>8}"
    print("  calibration, weeks 21-30:")
    print(header)
    for figures in report.calibration:
        print(_risk_row(figures, report.chosen))
    print("  held out, weeks 31-52:")
    print(header)
    for figures in report.evaluation:
        print(_risk_row(figures, report.chosen))
    final = report.result
    precision = "-" if final.precision is None else f"{100 * final.precision:.1f} %"
    recall = "-" if final.recall is None else f"{100 * final.recall:.1f} %"
    print(
        f"  held out at the chosen cut {report.chosen:.2f}: {final.conversations:,} conversations, "
        f"{final.breached:,} breached, {final.flagged:,} flagged; precision {precision}, recall {recall}"
    )
    print(f"  took {time.perf_counter() - began:.1f} s  [{_load()}]")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("all", "speed", "erlang", "backtest", "atrisk"), default="all")
    parser.add_argument("--per-year", type=int, default=100_000)
    parser.add_argument(
        "--without-claims", action="store_true", help="at risk: the check does not know who answers what"
    )
    parser.add_argument("--arrivals", type=int, default=60_000, help="arrivals per Erlang run")
    parser.add_argument("--replications", type=int, default=3, help="Erlang runs per case (averaged)")
    args = parser.parse_args()
    print(f"replyclock simulator bench on {cpu_model()}  [{_load()}]")
    if args.part in ("all", "speed"):
        speed(args.per_year)
    if args.part in ("all", "erlang"):
        erlang(args.arrivals, args.replications)
    if args.part in ("all", "backtest"):
        backtest(args.per_year)
    if args.part in ("all", "atrisk"):
        at_risk(20_000, not args.without_claims)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory {peak:.0f} MiB")


if __name__ == "__main__":
    main()
