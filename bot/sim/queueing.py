"""The forecast of one conversation's answer from the team's queue (pure: no database).

Shared by `bot.sim.forecast` (live, from the database) and the simulator's at-risk emulation.
"""

from __future__ import annotations

import numpy as np

from bot.sim.model import EmpiricalModel
from bot.sim.workclock import TeamCapacity, WorkClock

DRAWS = 200

_arrays: dict[tuple[int, str, str, int], np.ndarray] = {}


def clear_samples() -> None:
    _arrays.clear()


def _samples(model: EmpiricalModel, expert: str, team: str, hour_of_week: int) -> np.ndarray:
    key = (id(model), expert, team, hour_of_week)
    found = _arrays.get(key)
    if found is None:
        if len(_arrays) > 50_000:
            _arrays.clear()
        found = np.asarray(model.samples(expert, team, hour_of_week), dtype=float)
        _arrays[key] = found
    return found


def forecast_finish(
    model: EmpiricalModel,
    *,
    owner: str,
    team: str,
    now: float,
    ahead: int,
    capacity: TeamCapacity,
    owner_clock: WorkClock,
    percentile: int,
    seed: int,
) -> float:
    """The percentile of the instant (POSIX seconds) the owner answers a conversation that has
    `ahead` conversations of its team before it (earlier deadlines).

    The team works through the ones ahead together (their pooled working hours, `capacity`,
    at the team's pace for this hour of the week); then the owner answers this one in their
    own working hours at their own pace. Over `DRAWS` seeded draws.
    """
    start = owner_clock.next_open(now)
    if start == float("inf"):
        return float("inf")
    hour = owner_clock.hour_of_week(start)
    own_values = _samples(model, owner, team, hour)
    rng = np.random.default_rng(seed)
    own = rng.choice(own_values, size=DRAWS)
    if ahead == 0:
        ahead_work = np.zeros(DRAWS)
    elif ahead <= 30:
        ahead_work = rng.choice(_samples(model, "", team, hour), size=(DRAWS, ahead)).sum(axis=1)
    else:  # the sum of many draws is close to normal
        team_values = _samples(model, "", team, hour)
        mean, spread = float(team_values.mean()), float(team_values.std())
        ahead_work = np.maximum(rng.normal(ahead * mean, spread * ahead**0.5, size=DRAWS), 0.0)
    starts = np.maximum(capacity.wall(capacity.work(now) + ahead_work), now)
    finish = owner_clock.wall_many(owner_clock.work_many(starts) + own)
    return float(np.percentile(finish, percentile))
