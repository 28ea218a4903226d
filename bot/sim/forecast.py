"""Forecasts: when will the owner answer this conversation?

As in the simulator, the team works through its open conversations earliest deadline first,
each expert one at a time: before this one, the team's open conversations with an earlier
deadline are worked through in the team's pooled working hours at the team's pace (draws from
the answer-time model), then the owner answers this one in their own hours at their own pace.
The `percentile` (80 by default, per team) of that instant over a few hundred seeded draws is
the forecast. It is what honest
acknowledgements promise (never later than the deadline) and what the "at risk" notice compares
with the deadline.

The model is fitted from the database's last `HISTORY` of first responses and kept for
`MODEL_TTL` per database (the sweep asks often; history changes slowly).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from bot.core.policy import Policy
from bot.core.sla import BusinessCalendar
from bot.sim.history import load_answer_records
from bot.sim.model import EmpiricalModel, fit
from bot.sim.workclock import TeamCapacity, WorkClock, to_datetime
from storage.models import OPEN, Conversation

DRAWS = 200
HISTORY = timedelta(days=90)
MODEL_TTL = 3600.0  # seconds
MIN_HISTORY = 20  # first responses needed before anything is forecast


_arrays: dict[tuple[int, str, str, int], np.ndarray] = {}


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


@dataclass(frozen=True)
class Forecast:
    """When the owner is expected to answer (`at`), and what to promise (`promised`)."""

    at: datetime
    promised: datetime
    ahead: int


_models: dict[str, tuple[float, EmpiricalModel | None]] = {}
_lock = threading.Lock()


def model_for(
    session: Session, policy: Policy, now: datetime, calendar_of: Callable[[str], BusinessCalendar]
) -> EmpiricalModel | None:
    """The answer-time model for this database (refitted after MODEL_TTL), None without enough history."""
    bind = session.get_bind()
    key = f"{bind.engine.url!r}:{id(policy)}"
    with _lock:
        cached = _models.get(key)
        if cached is not None and time.monotonic() - cached[0] < MODEL_TTL:
            return cached[1]
    since = now - HISTORY
    records = load_answer_records(session, now, set(policy.experts), since=since)
    model: EmpiricalModel | None = None
    if len(records) >= MIN_HISTORY:
        clocks = {
            expert: WorkClock(calendar_of(expert), (since - timedelta(days=1)).timestamp(), now.timestamp())
            for expert in {r.expert for r in records}
        }
        model = fit(records, clocks)
    with _lock:
        _models[key] = (time.monotonic(), model)
    return model


def forget_models() -> None:
    """Drop every cached model and calendar (tests; a policy reload)."""
    with _lock:
        _models.clear()
        _capacities.clear()
        _arrays.clear()


def forecast_for(
    session: Session,
    policy: Policy,
    conversation: Conversation,
    now: datetime,
    *,
    calendar_of: Callable[[str], BusinessCalendar],
) -> Forecast | None:
    """The forecast for an open conversation, None when there is no owner, expert or history."""
    owner = conversation.claimed_by or conversation.owner
    team = policy.teams.get(conversation.team)
    if owner is None or owner not in policy.experts or team is None:
        return None
    model = model_for(session, policy, now, calendar_of)
    if model is None:
        return None
    # Ahead: earlier deadlines, and equal ones that came first (a new one has no id yet: last).
    earlier = Conversation.due_at < conversation.due_at
    if conversation.id is not None:
        earlier = or_(
            earlier, and_(Conversation.due_at == conversation.due_at, Conversation.id < conversation.id)
        )
    else:
        earlier = Conversation.due_at <= conversation.due_at
    query = select(Conversation.id).where(
        Conversation.team == conversation.team, Conversation.status == OPEN, earlier
    )
    with session.no_autoflush:
        ahead = len(session.scalars(query).all())
    capacity, clocks = _team_clocks(policy, conversation.team, owner, now, calendar_of)
    seed = zlib.crc32(f"{conversation.author_id}:{conversation.opened_at.isoformat()}:{ahead}".encode())
    finish = forecast_finish(
        model,
        owner=owner,
        team=conversation.team,
        now=now.timestamp(),
        ahead=ahead,
        capacity=capacity,
        owner_clock=clocks,
        percentile=team.forecast_percentile,
        seed=seed,
    )
    if finish == float("inf"):
        return None
    at = to_datetime(finish)
    return Forecast(at=at, promised=min(at, conversation.due_at), ahead=ahead)


_capacities: dict[tuple[int, str, str, int], tuple[TeamCapacity, WorkClock]] = {}


def _team_clocks(
    policy: Policy, team: str, owner: str, now: datetime, calendar_of: Callable[[str], BusinessCalendar]
) -> tuple[TeamCapacity, WorkClock]:
    """The team's pooled hours and the owner's, from an hour ago for 45 days (kept for an hour)."""
    hour = int(now.timestamp() // 3600)
    key = (id(policy), team, owner, hour)
    with _lock:
        found = _capacities.get(key)
    if found is not None:
        return found
    start, end = (hour - 1) * 3600.0, (hour + 45 * 24) * 3600.0
    members = [e for e in dict.fromkeys(policy.teams[team].experts) if e in policy.experts]
    clocks = {e: WorkClock(calendar_of(e), start, end) for e in {*members, owner}}
    found = (TeamCapacity([clocks[e] for e in members]), clocks[owner])
    with _lock:
        if len(_capacities) > 1000:
            _capacities.clear()
        _capacities[key] = found
    return found
