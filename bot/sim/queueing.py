"""When a team's open conversations will be answered, simulated from its queue (pure: no database).

Shared by `bot.sim.forecast` (live, from the database) and the simulator's at-risk emulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bot.sim.model import EmpiricalModel
from bot.sim.workclock import WorkClock

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


def _start_walls(clock: WorkClock, w: np.ndarray) -> np.ndarray:
    """For working positions `w` (seconds of `clock`'s working time), the first open instant at
    which that much working time has passed: the end of a shift moves on to the next start."""
    starts, _, cum, cum_end = clock.arrays()
    if not len(starts):
        return np.full(w.shape, np.inf)
    j = np.searchsorted(cum_end, w, side="right")
    k = np.clip(j, 0, len(starts) - 1)
    return np.where(j < len(starts), starts[k] + (w - cum[k]), np.inf)


def _hours_of_week(clock: WorkClock, t: np.ndarray) -> np.ndarray:
    finite = np.isfinite(t)
    keys = np.where(finite, t // 3600.0, 0).astype(np.int64)
    unique, inverse = np.unique(keys, return_inverse=True)
    hours = np.array([clock.hour_of_week(float(k) * 3600.0) for k in unique.tolist()], dtype=np.int64)
    return hours[inverse].reshape(t.shape)


@dataclass(frozen=True)
class QueueItem:
    """One open conversation of the queue, by places in the team's list of experts (-1: none):
    its owner, and who is answering it (claimed it) since when (POSIX seconds)."""

    owner: int = -1
    claimed_by: int = -1
    claimed_at: float = 0.0


def queue_finishes(
    model: EmpiricalModel,
    *,
    team: str,
    now: float,
    items: Sequence[QueueItem],
    members: Sequence[tuple[str, WorkClock]],
    draws: int = DRAWS,
    seed: int = 0,
) -> np.ndarray:
    """When each of a team's open conversations (`items`) is answered: an array (len(items),
    draws) of POSIX seconds, by simulating the team working through them from `now`, over `draws`
    seeded draws (inf: not within the clocks' span).

    A claimed conversation is being answered by whoever claimed it: it keeps them busy until
    they finish, a draw from the answer-time model for them longer than the working time they
    have spent on it already. The others are taken in the order given (earliest deadline first):
    each expert of `members` works on one at a time, in their own working hours; the next goes to
    whoever can start on it first (its owner when they can start as soon as anyone, as when the
    owner picks up a new conversation) and takes a draw from the model for that expert and the
    local hour of the week they start. Conversations that arrive later are not counted (with one
    target per team they come after these). With the same `seed`, the same uniforms are drawn:
    checks of an unchanged queue agree (common random numbers).
    """
    count = len(items)
    out = np.full((count, draws), np.inf)
    if count == 0 or not members:
        return out
    rng = np.random.default_rng(seed)
    uniforms = rng.random((count, draws))
    clocks = [clock for _, clock in members]
    position = np.array([np.full(draws, clock.work(now)) for clock in clocks])  # (servers, draws)
    columns = np.arange(draws)
    for row, item in enumerate(items):
        if item.claimed_by < 0:
            continue
        expert, clock = members[item.claimed_by]
        began = min(item.claimed_at, now)
        values = _samples(model, expert, team, clock.hour_of_week(clock.next_open(began)))
        spent = clock.between(began, now)
        low = int(np.searchsorted(values, spent, side="right"))
        if low >= len(values):  # longer than anything seen: about to answer
            worked = np.full(draws, spent)
        else:
            worked = values[
                np.minimum(low + (uniforms[row] * (len(values) - low)).astype(np.int64), len(values) - 1)
            ]
        ends = np.maximum(clock.work(began) + worked, position[item.claimed_by])
        position[item.claimed_by] = ends
        out[row] = clock.wall_many(ends)
    for row, item in enumerate(items):
        if item.claimed_by >= 0:
            continue
        begin = np.array([_start_walls(clock, position[s]) for s, clock in enumerate(clocks)])
        begin = np.maximum(begin, now)
        chosen = np.argmin(begin, axis=0)
        started = begin[chosen, columns]
        if item.owner >= 0:
            chosen = np.where(begin[item.owner] <= started, item.owner, chosen)
        finish = np.full(draws, np.inf)
        for s, (expert, clock) in enumerate(members):
            mine = (chosen == s) & np.isfinite(started)
            if not mine.any():
                continue
            at = started[mine]
            hours = _hours_of_week(clock, at)
            worked = np.empty(at.shape)
            for hour in np.unique(hours).tolist():
                values = _samples(model, expert, team, int(hour))
                pick = hours == hour
                index = np.minimum(
                    (uniforms[row, mine][pick] * len(values)).astype(np.int64), len(values) - 1
                )
                worked[pick] = values[index]
            ends = clock.work_many(at) + worked
            position[s, mine] = ends
            finish[mine] = clock.wall_many(ends)
        out[row] = finish
    return out
