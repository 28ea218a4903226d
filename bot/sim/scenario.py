"""Changes to try: more or fewer arrivals, experts added or removed."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta

import numpy as np

from bot.core.policy import WEEKDAY_NAMES, Expert, Policy, WeekHours
from bot.sim.engine import Arrival

JITTER = timedelta(hours=1)


def scale_arrivals(arrivals: Sequence[Arrival], factor: float, *, seed: int) -> list[Arrival]:
    """`factor` times the arrivals: each kept with probability `factor` (below 1), or repeated
    floor(factor) times plus once more with probability frac(factor), copies moved by a uniform
    jitter of up to an hour either way (the original stays where it was)."""
    if factor < 0:
        raise ValueError("the arrivals factor must not be negative")
    rng = np.random.default_rng(seed)
    whole = int(factor)
    extra = factor - whole
    out: list[Arrival] = []
    draws = rng.random(len(arrivals)).tolist()
    jitters = rng.uniform(-1.0, 1.0, size=len(arrivals) * (whole + 1)).tolist()
    next_key = max((a.key for a in arrivals), default=0) + 1
    position = 0
    for arrival, u in zip(arrivals, draws, strict=True):
        copies = whole + (1 if u < extra else 0)
        for copy in range(copies):
            if copy == 0:
                out.append(arrival)
                continue
            shift = JITTER * jitters[position]
            position += 1
            out.append(
                dataclasses.replace(
                    arrival, key=next_key, at=arrival.at + shift, author_id=f"{arrival.author_id}#{copy}"
                )
            )
            next_key += 1
    out.sort(key=lambda a: (a.at, a.key))
    return out


def parse_hours(text: str) -> WeekHours:
    """``"mon-fri 09:00-17:00"`` or ``"mon-fri 09:00-13:00,sat 10:00-14:00"`` as week hours."""
    hours: dict[int, list[tuple[int, int]]] = {}
    for part in text.split(","):
        try:
            days, span = part.strip().split()
            first, _, last = days.lower().partition("-")
            low, high = WEEKDAY_NAMES.index(first), WEEKDAY_NAMES.index(last or first)
            begin, _, finish = span.partition("-")
            start = int(begin[:2]) * 60 + int(begin[3:5])
            end = int(finish[:2]) * 60 + int(finish[3:5])
        except ValueError:
            raise ValueError(f"not working hours: {part.strip()!r} (e.g. 'mon-fri 09:00-17:00')") from None
        if not (0 <= start < end <= 1440) or low > high:
            raise ValueError(f"not working hours: {part.strip()!r} (e.g. 'mon-fri 09:00-17:00')")
        for day in range(low, high + 1):
            hours.setdefault(day, []).append((start, end))
    return {day: tuple(sorted(periods)) for day, periods in hours.items()}


def add_expert(policy: Policy, team: str, hours: WeekHours, *, name: str | None = None) -> tuple[Policy, str]:
    """The policy with a new expert in `team`, working `hours` in the team calendar's zone."""
    if team not in policy.teams:
        raise ValueError(f"unknown team {team!r} (known: {', '.join(sorted(policy.teams))})")
    number = 1
    while f"new-{team}-{number}" in policy.experts:
        number += 1
    ident = name or f"new-{team}-{number}"
    calendar = policy.calendars[policy.teams[team].calendar]
    expert = Expert(
        id=ident,
        name=ident,
        slack_id=f"USIM{number:05d}",
        timezone=calendar.timezone,
        hours=hours,
        holiday_country=calendar.holiday_country,
        holiday_subdivision=calendar.holiday_subdivision,
    )
    spec = policy.teams[team]
    teams = {**policy.teams, team: dataclasses.replace(spec, experts=(*spec.experts, ident))}
    return dataclasses.replace(policy, experts={**policy.experts, ident: expert}, teams=teams), ident


def remove_expert(policy: Policy, expert_id: str) -> Policy:
    """The policy without an expert in any team's rotation (they may still be a manager)."""
    if expert_id not in policy.experts:
        raise ValueError(f"unknown expert {expert_id!r}")
    teams = {
        name: dataclasses.replace(
            spec,
            experts=tuple(e for e in spec.experts if e != expert_id),
            on_call=None if spec.on_call == expert_id else spec.on_call,
        )
        for name, spec in policy.teams.items()
    }
    return dataclasses.replace(policy, teams=teams)
