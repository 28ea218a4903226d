"""Forecasts: when will the owner answer this conversation?

The owner works one conversation at a time, earliest deadline first (the simulator's model):
before this one they will finish the open conversations they own with an earlier deadline. The
working time that takes is the sum of that many draws from the answer-time model plus one for
this conversation; its `percentile` (80 by default, per team) over a few hundred seeded draws,
laid onto the owner's working hours from now, is the forecast. It is what honest
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
from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.core.policy import Policy
from bot.core.sla import BusinessCalendar
from bot.sim.history import load_answer_records
from bot.sim.model import EmpiricalModel, fit
from bot.sim.workclock import WorkClock
from storage.models import OPEN, Conversation

DRAWS = 400
HISTORY = timedelta(days=90)
MODEL_TTL = 3600.0  # seconds
MIN_HISTORY = 20  # first responses needed before anything is forecast


def forecast_work(
    model: EmpiricalModel, expert: str, team: str, hour_of_week: int, ahead: int, percentile: int, seed: int
) -> float:
    """Working seconds until `ahead` conversations and then this one are answered (the percentile)."""
    values = np.asarray(model.samples(expert, team, hour_of_week))
    rng = np.random.default_rng(seed)
    totals = rng.choice(values, size=(DRAWS, ahead + 1)).sum(axis=1)
    return float(np.percentile(totals, percentile))


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
    """Drop every cached model (tests; a policy reload)."""
    with _lock:
        _models.clear()


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
    query = select(Conversation.id).where(
        Conversation.owner == owner, Conversation.status == OPEN, Conversation.due_at <= conversation.due_at
    )
    if conversation.id is not None:
        query = query.where(Conversation.id != conversation.id)
    with session.no_autoflush:
        ahead = len(session.scalars(query).all())
    calendar = calendar_of(owner)
    start = calendar.next_open(now)
    local = start.astimezone(calendar.tz)
    hour_of_week = local.weekday() * 24 + local.hour
    seed = zlib.crc32(f"{conversation.author_id}:{conversation.opened_at.isoformat()}:{ahead}".encode())
    work = forecast_work(model, owner, conversation.team, hour_of_week, ahead, team.forecast_percentile, seed)
    at = calendar.add_business_time(now, timedelta(seconds=work))
    return Forecast(at=at, promised=min(at, conversation.due_at), ahead=ahead)
