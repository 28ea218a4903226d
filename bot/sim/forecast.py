"""Forecasts: when will this conversation be answered, and how likely is it to miss its deadline?

As in the simulator, the team works through its open conversations earliest deadline first,
each expert one at a time in their own working hours, at their own pace for the hour of the
week (draws from the answer-time model); a claimed conversation is being answered by whoever
claimed it, since they claimed it; a new one is picked up by its owner when they are free
(`bot.sim.queueing.queue_finishes`, a few hundred seeded draws). From the draws:

* the `percentile` (80 by default, per team) of the answer time is what honest acknowledgements
  promise (never later than the deadline);
* the share of draws answered after the deadline is the chance of a breach; the "at risk" notice
  goes out when it is at least `AT_RISK_CHANCE` (chosen on the earlier weeks of the backtest,
  ``python -m bench.simulate --part atrisk``).

The model is fitted from the database's last `HISTORY` of first responses and kept for
`MODEL_TTL` per database (the sweep asks often; history changes slowly).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.core.policy import Policy
from bot.core.sla import BusinessCalendar
from bot.sim.history import load_answer_records
from bot.sim.model import EmpiricalModel, fit
from bot.sim.queueing import QueueItem, clear_samples, queue_finishes
from bot.sim.workclock import WorkClock, to_datetime
from storage.models import OPEN, Conversation

HISTORY = timedelta(days=90)
MODEL_TTL = 3600.0  # seconds
MIN_HISTORY = 20  # first responses needed before anything is forecast


# The chance of a breach from which an open conversation is "at risk": the cut chosen on weeks
# 21-30 of the backtest (the best recall with precision >= 60 %), judged on weeks 31-52.
AT_RISK_CHANCE = 0.45


@dataclass(frozen=True)
class Forecast:
    """When it is expected to be answered (`at`, the team's percentile), what to promise
    (`promised`), the chance it is answered after its deadline, and how many go before it."""

    at: datetime
    promised: datetime
    ahead: int
    chance: float = 0.0

    @property
    def at_risk(self) -> bool:
        return self.chance >= AT_RISK_CHANCE


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
    """Drop every cached model, calendar and queue (tests; a policy reload)."""
    with _lock:
        _models.clear()
        _clocks.clear()
        _queues.clear()
        clear_samples()


# A conversation of the queue: id, deadline, owner, claimed by, claimed at.
_Row = tuple[int | None, datetime, str | None, str | None, datetime | None]
_queues: dict[tuple[object, ...], np.ndarray] = {}


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
    members = _members(policy, conversation.team, now, calendar_of)
    if not members:
        return None
    # The team's open conversations, earliest deadline first (a new one, without an id yet, last
    # among equal deadlines).
    query = select(
        Conversation.id,
        Conversation.due_at,
        Conversation.owner,
        Conversation.claimed_by,
        Conversation.claimed_at,
    ).where(Conversation.team == conversation.team, Conversation.status == OPEN)
    with session.no_autoflush:
        rows: list[_Row] = [
            (ident, due, who, claimer, claimed)
            for ident, due, who, claimer, claimed in session.execute(query)
            if ident != conversation.id
        ]
    this = (
        conversation.id,
        conversation.due_at,
        conversation.owner,
        conversation.claimed_by,
        conversation.claimed_at,
    )
    rows.append(this)
    rows.sort(key=lambda row: (row[1], row[0] if row[0] is not None else float("inf")))
    row = rows.index(this)
    finishes = _finishes(model, conversation.team, members, rows, now)
    mine = finishes[row]
    if not np.isfinite(mine).any():
        return None
    at = to_datetime(float(np.percentile(mine, team.forecast_percentile)))
    chance = float(np.mean(mine > conversation.due_at.timestamp()))
    return Forecast(at=at, promised=min(at, conversation.due_at), ahead=row, chance=chance)


def _finishes(
    model: EmpiricalModel,
    team: str,
    members: Sequence[tuple[str, WorkClock]],
    rows: Sequence[_Row],
    now: datetime,
) -> np.ndarray:
    """The simulated answer times of the team's queue, kept for checks of the same queue at the
    same instant (the sweep asks once per open conversation)."""
    key = (id(model), team, now, tuple(rows))
    with _lock:
        found = _queues.get(key)
    if found is not None:
        return found
    place = {expert: i for i, (expert, _) in enumerate(members)}
    items = [
        QueueItem(
            owner=place.get(owner or "", -1),
            claimed_by=place.get(claimed_by or "", -1) if claimed_at is not None else -1,
            claimed_at=claimed_at.timestamp() if claimed_at is not None else 0.0,
        )
        for _, _, owner, claimed_by, claimed_at in rows
    ]
    found = queue_finishes(
        model,
        team=team,
        now=now.timestamp(),
        items=items,
        members=members,
        seed=zlib.crc32(team.encode()),
    )
    with _lock:
        if len(_queues) > 8:  # (rows x draws) arrays: keep few
            _queues.clear()
        _queues[key] = found
    return found


_clocks: dict[tuple[int, str, int], list[tuple[str, WorkClock]]] = {}


def _members(
    policy: Policy, team: str, now: datetime, calendar_of: Callable[[str], BusinessCalendar]
) -> list[tuple[str, WorkClock]]:
    """The team's experts and their hours, from a day ago for 45 days (kept for an hour)."""
    hour = int(now.timestamp() // 3600)
    key = (id(policy), team, hour)
    with _lock:
        found = _clocks.get(key)
    if found is not None:
        return found
    start, end = (hour - 24) * 3600.0, (hour + 45 * 24) * 3600.0
    found = [
        (e, WorkClock(calendar_of(e), start, end))
        for e in dict.fromkeys(policy.teams[team].experts)
        if e in policy.experts
    ]
    with _lock:
        if len(_clocks) > 1000:
            _clocks.clear()
        _clocks[key] = found
    return found
