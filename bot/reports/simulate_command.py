"""`replyclock simulate`: replay a period under a candidate policy or staffing, actual beside simulated.

Registered into the main parser by `register` (one line in bot/cli.py); everything heavy is
imported when the command runs. Actual figures come from the digest (`bot.reports.digest`:
`load_week` and `compute_week`); simulated ones from the same `compute_week` over the simulated
conversations (`bot.reports.simulation`), so both sides are measured alike.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.core.policy import Policy

if TYPE_CHECKING:
    from bot.reports.digest import WeekFigures
    from bot.reports.simulation import LadderCounts

EXIT_USAGE = 2


def register(sub: Any, *, load: Callable[[Path], Policy], config_path: Callable[[str | None], Path]) -> None:
    """Add the `simulate` sub-command to the `replyclock` sub-parsers.

    `load` reads and validates a policy file (exiting with the problems listed) and
    `config_path` finds the current one; both come from bot.cli, which this module never imports.
    """
    parser = sub.add_parser(
        "simulate",
        help="what if? replay a period under a candidate policy or staffing (actual beside simulated)",
    )
    parser.add_argument("--from", dest="start", required=True, help="first day (YYYY-MM-DD, UTC)")
    parser.add_argument("--to", dest="end", required=True, help="last day, inclusive (YYYY-MM-DD, UTC)")
    parser.add_argument(
        "--config", help="candidate policy file to simulate (default: the current one)", default=None
    )
    parser.add_argument(
        "--current",
        help="the policy the history was recorded under (default: $REPLYCLOCK_CONFIG or ./replyclock.toml)",
    )
    parser.add_argument("--arrivals", type=float, default=1.0, help="scale the posts, e.g. 1.5 or 0.8")
    parser.add_argument(
        "--add-expert",
        action="append",
        default=[],
        metavar="TEAM:HOURS",
        help="add an expert, e.g. 'care:mon-fri 09:00-17:00' (team calendar's zone; repeatable)",
    )
    parser.add_argument("--remove-expert", action="append", default=[], metavar="ID", help="repeatable")
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="random seed of the simulation (default 1; same seed, same result)",
    )
    parser.add_argument("--team", help="only this team")
    parser.add_argument(
        "--goal", help="with --team: find the fewest expert-hours reaching this share, e.g. 95%%"
    )
    parser.add_argument("--png", metavar="FILE", help="write a chart comparing actual and simulated weeks")
    parser.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    parser.set_defaults(func=functools.partial(cmd_simulate, load=load, config_path=config_path))


@dataclass(frozen=True)
class Row:
    team: str
    week: str
    source: str  # "actual" or "simulated"
    share: float | None
    p50: timedelta | None
    p90: timedelta | None
    judged: int
    breaches: int
    warnings: int
    nags: int
    escalations: int
    load: tuple[tuple[str, int], ...]


def _row(team: str, source: str, figures: WeekFigures, ladder: LadderCounts) -> Row:
    return Row(
        team=team,
        week=figures.week.label,
        source=source,
        share=figures.share_within_sla,
        p50=figures.median_response,
        p90=figures.p90_response,
        judged=figures.judged,
        breaches=len(figures.breaches),
        warnings=ladder.warnings,
        nags=ladder.nags,
        escalations=ladder.escalations,
        load=tuple((e.expert, e.handled) for e in figures.experts),
    )


def _day(text: str, what: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"error: {what} {text!r} is not a date (YYYY-MM-DD)") from None


def _hours(value: timedelta | None) -> str:
    if value is None:
        return "-"
    return f"{value.total_seconds() / 3600:.1f}h"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def cmd_simulate(
    args: argparse.Namespace, *, load: Callable[[Path], Policy], config_path: Callable[[str | None], Path]
) -> int:
    from bot.flow.context import AppContext
    from bot.sim.scenario import add_expert, parse_hours, remove_expert
    from storage.db import make_engine

    start_day, end_day = _day(args.start, "--from"), _day(args.end, "--to")
    if end_day < start_day:
        print("error: --to is before --from", file=sys.stderr)
        return EXIT_USAGE
    start = datetime.combine(start_day, datetime.min.time(), tzinfo=UTC)
    end = datetime.combine(end_day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    current = load(config_path(args.current))
    candidate = load(Path(args.config)) if args.config else current
    try:
        for spec in args.add_expert:
            team, _, hours = spec.partition(":")
            candidate, _ident = add_expert(candidate, team.strip(), parse_hours(hours))
        for expert_id in args.remove_expert:
            candidate = remove_expert(candidate, expert_id)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.team and args.team not in candidate.teams:
        print(f"error: unknown team {args.team!r}", file=sys.stderr)
        return EXIT_USAGE
    if not 0 <= args.arrivals <= 100:
        print("error: --arrivals must be from 0 to 100 (a factor, e.g. 1.5)", file=sys.stderr)
        return EXIT_USAGE
    if args.goal and not args.team:
        print("error: --goal needs --team", file=sys.stderr)
        return EXIT_USAGE
    engine = make_engine()
    try:
        ctx = AppContext(policy=current, engine=engine)
        return run(ctx, candidate, start, end, args)
    finally:
        engine.dispose()


def run(ctx: Any, candidate: Policy, start: datetime, end: datetime, args: argparse.Namespace) -> int:
    """The command's work once the policies and the database are in hand."""
    from bot.reports.digest import compute_week, load_week
    from bot.reports.simulation import simulated_weeks, weeks_between
    from bot.sim.engine import Simulator
    from bot.sim.history import load_answer_records, load_arrivals
    from bot.sim.model import fit
    from bot.sim.scenario import scale_arrivals
    from bot.sim.workclock import WorkClock

    current: Policy = ctx.policy
    with ctx.read_sessions() as session:
        arrivals = load_arrivals(session, start, end)
        records = load_answer_records(session, end, set(current.experts))
    if not records:
        print("error: no answered conversations before --to to learn answering times from", file=sys.stderr)
        return 1
    span_start = min(min(r.assigned_at for r in records), start.timestamp()) - 86400.0
    clocks = {
        expert_id: WorkClock(ctx.expert_calendar(expert_id), span_start, end.timestamp() + 86400.0 * 45)
        for expert_id in current.experts
    }
    model = fit(records, clocks)
    if args.arrivals != 1.0:
        arrivals = scale_arrivals(arrivals, args.arrivals, seed=args.seed)
    simulator = Simulator(candidate, model, start=start, end=end)

    if args.goal:
        from bot.sim.staffing import parse_goal, search

        goal = parse_goal(args.goal)
        found = search(
            simulator,
            candidate,
            model,
            arrivals,
            team=args.team,
            goal=goal,
            seed=args.seed,
            start=start,
            end=end,
        )
        print(found.render())
        return 0 if found.reached else 1

    result = simulator.run(arrivals, seed=args.seed)
    teams = [args.team] if args.team else [t for t in candidate.teams if t in current.teams]
    rows: list[Row] = []
    policies = {sla.name: sla for sla in current.policies}
    for team in teams:
        zone = current.calendars[current.teams[team].calendar].timezone
        weeks = weeks_between(start, end, zone)
        with ctx.read_sessions() as session:
            actual_ladder = _actual_ladder(session, team, weeks)
            for week, ladder in zip(weeks, actual_ladder, strict=True):
                data = load_week(session, ctx, team, week)
                calendars = {f.calendar: ctx.calendar(f.calendar) for f in data.conversations}
                figures = compute_week(data, policies=policies, calendars=calendars)
                rows.append(_row(team, "actual", figures, ladder))
        for figures, counts in simulated_weeks(
            candidate, simulator.calendars, result.conversations, team, weeks
        ):
            rows.append(_row(team, "simulated", figures, counts))
    rows.sort(key=lambda r: (teams.index(r.team), r.week, r.source))
    _print(rows, arrivals=len(arrivals), samples=model.size, seed=args.seed)
    if args.csv:
        _write_csv(Path(args.csv), rows)
        print(f"wrote {args.csv}")
    if args.png:
        Path(args.png).write_bytes(render_comparison(rows))
        print(f"wrote {args.png}")
    return 0


def _actual_ladder(session: Any, team: str, weeks: list[Any]) -> list[LadderCounts]:
    """Warnings, nags and escalations recorded for the team's conversations opened in each week."""
    from sqlalchemy import func, select

    from bot.reports.simulation import LadderCounts
    from storage.models import Conversation, Event

    counts = []
    for week in weeks:
        found = dict(
            session.execute(
                select(Event.action, func.count())
                .join(Conversation, Conversation.id == Event.conversation_id)
                .where(
                    Conversation.team == team,
                    Conversation.opened_at >= week.start,
                    Conversation.opened_at < week.end,
                    Event.action.in_(("warning", "nag", "escalation")),
                )
                .group_by(Event.action)
            ).all()
        )
        counts.append(LadderCounts(found.get("warning", 0), found.get("nag", 0), found.get("escalation", 0)))
    return counts


def _load_text(load: tuple[tuple[str, int], ...]) -> str:
    return ", ".join(f"{expert} {count}" for expert, count in load) or "-"


def _print(rows: list[Row], *, arrivals: int, samples: int, seed: int) -> None:
    print(
        f"simulated {arrivals} arrivals (seed {seed}); answer-time model from {samples} answered conversations"
    )
    header = f"{'team':<10} {'week':<9} {'':<9} {'in time':>8} {'p50':>7} {'p90':>7} {'judged':>6} {'breach':>6} {'warn':>5} {'nag':>5} {'esc':>5}  load per expert"
    print(header)
    for row in rows:
        print(
            f"{row.team:<10} {row.week:<9} {row.source:<9} {_share(row.share):>8} {_hours(row.p50):>7} "
            f"{_hours(row.p90):>7} {row.judged:>6} {row.breaches:>6} {row.warnings:>5} {row.nags:>5} "
            f"{row.escalations:>5}  {_load_text(row.load)}"
        )


def _write_csv(path: Path, rows: list[Row]) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "team",
                "week",
                "source",
                "share_within_target",
                "p50_first_response_hours",
                "p90_first_response_hours",
                "judged",
                "breaches",
                "warnings",
                "nags",
                "escalations",
                "load_per_expert",
            ]
        )
        for row in rows:
            writer.writerow(
                [
                    row.team,
                    row.week,
                    row.source,
                    "" if row.share is None else f"{row.share:.4f}",
                    "" if row.p50 is None else f"{row.p50.total_seconds() / 3600:.3f}",
                    "" if row.p90 is None else f"{row.p90.total_seconds() / 3600:.3f}",
                    row.judged,
                    row.breaches,
                    row.warnings,
                    row.nags,
                    row.escalations,
                    ";".join(f"{expert}={count}" for expert, count in row.load),
                ]
            )


def render_comparison(rows: list[Row]) -> bytes:
    """PNG: per team, the weekly share within target, actual against simulated, and breaches."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    teams = list(dict.fromkeys(row.team for row in rows))
    figure = Figure(figsize=(7.2, 2.6 * max(len(teams), 1) + 0.6), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    for number, team in enumerate(teams):
        axes = figure.add_subplot(len(teams), 1, number + 1)
        bars = axes.twinx()
        bars.set_ylabel("breaches", color="#c8323c", fontsize=8)
        bars.tick_params(labelsize=7, colors="#c8323c")
        weeks = list(dict.fromkeys(row.week for row in rows if row.team == team))
        positions = list(range(len(weeks)))
        for source, colour, style, offset in (
            ("actual", "#222222", "-", -0.2),
            ("simulated", "#2f6db5", "--", 0.2),
        ):
            by_week = {row.week: row for row in rows if row.team == team and row.source == source}
            shares = [
                100 * share if w in by_week and (share := by_week[w].share) is not None else float("nan")
                for w in weeks
            ]
            axes.plot(
                positions, shares, style, color=colour, marker="o", markersize=3, label=f"{source}: in time"
            )
            breaches = [by_week[w].breaches if w in by_week else 0 for w in weeks]
            bars.bar(
                [p + offset for p in positions],
                breaches,
                width=0.4,
                color="#c8323c",
                alpha=0.25 if source == "actual" else 0.55,
                label=f"{source}: breaches",
            )
        axes.set_zorder(2)
        axes.patch.set_visible(False)
        axes.set_ylim(0, 105)
        axes.yaxis.set_major_formatter(PercentFormatter())
        axes.set_title(f"{team}: share answered within target, actual vs simulated", fontsize=10, loc="left")
        step = max(1, len(weeks) // 12)
        axes.set_xticks(positions[::step], [w[-3:] for w in weeks][::step], fontsize=7)
        axes.tick_params(axis="y", labelsize=7)
        lines, labels = axes.get_legend_handles_labels()
        more_lines, more_labels = bars.get_legend_handles_labels()
        axes.legend([*lines, *more_lines], [*labels, *more_labels], fontsize=7, loc="lower left", ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
