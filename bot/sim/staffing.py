"""Staffing from a goal: the fewest expert-hours per weekday block that keep a promise.

The team's working week (its calendar's hours) is cut into blocks of at most four hours per
weekday. A schedule says how many experts work each block; they answer at the team's pace (the
answer-time model's team figures for that hour of the week). The search is greedy:

1. start from one expert in every block;
2. while the share answered within target over the period is below the goal, simulate and add
   one expert to the block in which the most late conversations arrived (ties: the earlier block);
3. then try taking one expert away from each block, largest first, keeping every removal after
   which the goal is still reached (until no removal is possible).

Each step is one run of the simulator over the period's arrivals for the team, with one seed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from bot.core.policy import WEEKDAY_NAMES, Expert, Policy
from bot.sim.engine import Arrival, SimConversation, Simulator
from bot.sim.model import AnswerTimes

BLOCK_MINUTES = 240
MAX_STEPS = 400

Block = tuple[int, int, int]  # weekday, start minute, end minute


def parse_goal(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text)
    if match is None or not 0 < float(match.group(1)) <= 100:
        raise SystemExit(f"error: --goal {text!r}: give a share such as 95% (0-100)")
    return float(match.group(1)) / 100


def blocks_of(policy: Policy, team: str) -> list[Block]:
    hours = policy.calendars[policy.teams[team].calendar].hours
    blocks: list[Block] = []
    for day in range(7):
        for start, end in hours.get(day, ()):
            low = start
            while low < end:
                high = min(low + BLOCK_MINUTES, end)
                blocks.append((day, low, high))
                low = high
    return blocks


def staffed(policy: Policy, team: str, schedule: dict[Block, int]) -> Policy:
    """The policy with `team` answered by one expert per scheduled seat, nobody else."""
    calendar = policy.calendars[policy.teams[team].calendar]
    experts = dict(policy.experts)
    members: list[str] = []
    for (day, low, high), count in schedule.items():
        for seat in range(count):
            ident = f"{WEEKDAY_NAMES[day]}-{low // 60:02d}{low % 60:02d}-{seat + 1}"
            experts[ident] = Expert(
                id=ident,
                name=ident,
                slack_id=f"USEAT{len(members):05d}",
                timezone=calendar.timezone,
                hours={day: ((low, high),)},
                holiday_country=calendar.holiday_country,
                holiday_subdivision=calendar.holiday_subdivision,
            )
            members.append(ident)
    spec = dataclasses.replace(policy.teams[team], experts=tuple(members), on_call=None)
    return dataclasses.replace(policy, experts=experts, teams={**policy.teams, team: spec})


def within(conversations: Sequence[SimConversation]) -> float:
    """Share answered by the deadline of the conversations opened in the period (no one: 1)."""
    if not conversations:
        return 1.0
    good = sum(
        1 for c in conversations if c.first_response_at is not None and c.first_response_at <= c.first_due_at
    )
    return good / len(conversations)


@dataclass
class Staffing:
    team: str
    goal: float
    reached: bool
    schedule: dict[Block, int]
    share: float
    conversations: list[SimConversation] = field(default_factory=list)
    runs: int = 0

    @property
    def hours(self) -> float:
        return sum(count * (high - low) / 60 for (_day, low, high), count in self.schedule.items())

    def render(self) -> str:
        lines = [
            f"team {self.team}: goal {100 * self.goal:.1f}% answered within target; "
            f"{'reached' if self.reached else 'NOT reached'} with {self.hours:.0f} expert-hours a week "
            f"({self.runs} simulations)",
            "schedule (experts per block, team calendar's time zone):",
        ]
        for day in range(7):
            cells = [
                f"{low // 60:02d}:{low % 60:02d}-{high // 60:02d}:{high % 60:02d} x{count}"
                for (d, low, high), count in sorted(self.schedule.items())
                if d == day
            ]
            if cells:
                lines.append(f"  {WEEKDAY_NAMES[day]}  " + "  ".join(cells))
        late = [
            c
            for c in self.conversations
            if c.first_response_at is None or c.first_response_at > c.first_due_at
        ]
        waits = sorted(
            (
                c.first_response_at - c.opened_at
                for c in self.conversations
                if c.first_response_at is not None
            ),
        )
        p50 = waits[len(waits) // 2] if waits else timedelta(0)
        p90 = waits[min(len(waits) - 1, int(0.9 * len(waits)))] if waits else timedelta(0)
        lines.append(
            f"simulated: {100 * self.share:.1f}% within target of {len(self.conversations)}, "
            f"{len(late)} late, first response p50 {p50.total_seconds() / 3600:.1f}h p90 {p90.total_seconds() / 3600:.1f}h"
        )
        return "\n".join(lines)


def search(
    simulator: Simulator,
    policy: Policy,
    model: AnswerTimes,
    arrivals: Sequence[Arrival],
    *,
    team: str,
    goal: float,
    seed: int,
    start: datetime,
    end: datetime,
) -> Staffing:
    """The greedy search described in the module docstring."""
    routed = simulator.run(arrivals, seed=seed, ladder=False).conversations
    keys = {c.key for c in routed if c.team == team}
    mine = [a for a in arrivals if a.key in keys]
    blocks = blocks_of(policy, team)
    if not blocks:
        raise SystemExit(f"error: team {team!r} has no working hours on its calendar to staff")
    schedule = {block: 1 for block in blocks}
    runs = 0

    def evaluate(plan: dict[Block, int]) -> list[SimConversation]:
        nonlocal runs
        runs += 1
        candidate = staffed(policy, team, {b: n for b, n in plan.items() if n > 0})
        return (
            Simulator(candidate, model, start=start, end=end, calendars=simulator.calendars)
            .run(mine, seed=seed, ladder=False)
            .conversations
        )

    def block_of(at: datetime, tz: ZoneInfo) -> Block:
        local = at.astimezone(tz)
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        # The block the conversation arrived in, else the next block to open.
        for offset in range(8):
            for block in blocks:
                if block[0] == (day + offset) % 7 and (offset > 0 or block[2] > minute):
                    return block
        return blocks[0]

    tz = simulator.calendars[policy.teams[team].calendar].tz
    result = evaluate(schedule)
    steps = 0
    while within(result) < goal and steps < MAX_STEPS:
        late: dict[Block, int] = {}
        for c in result:
            if c.first_response_at is None or c.first_response_at > c.first_due_at:
                block = block_of(c.opened_at, tz)
                late[block] = late.get(block, 0) + 1
        worst = max(blocks, key=lambda b: (late.get(b, 0), -blocks.index(b)))
        schedule[worst] += 1
        result = evaluate(schedule)
        steps += 1
    reached = within(result) >= goal
    if reached:
        improved = True
        while improved:
            improved = False
            for block in sorted(blocks, key=lambda b: -schedule[b]):
                if schedule[block] == 0:
                    continue
                trial = {**schedule, block: schedule[block] - 1}
                trial_result = evaluate(trial)
                if within(trial_result) >= goal:
                    schedule, result, improved = trial, trial_result, True
    return Staffing(
        team=team,
        goal=goal,
        reached=reached,
        schedule={b: n for b, n in schedule.items() if n > 0},
        share=within(result),
        conversations=list(result),
        runs=runs,
    )
