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

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from bot.core.policy import Policy
from bot.core.sla import BusinessCalendar
from bot.sim.history import load_answer_records
from bot.sim.model import EmpiricalModel, fit
from bot.sim.queueing import clear_samples, forecast_finish
from bot.sim.workclock import TeamCapacity, WorkClock, to_datetime
from storage.models import OPEN, Conversation

HISTORY = timedelta(days=90)
MODEL_TTL = 3600.0  # seconds
MIN_HISTORY = 20  # first responses needed before anything is forecast


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
        clear_samples()


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
