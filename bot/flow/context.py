"""What every job needs: the validated policy, the clock, the database, and cached calendars."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bot.core.clock import Clock, SystemClock
from bot.core.policy import Policy, SlaPolicy
from bot.core.sla import BusinessCalendar
from storage.db import make_sessionmaker


@dataclass
class AppContext:
    """Shared, read-mostly state of one replyclock process."""

    policy: Policy
    engine: Engine
    clock: Clock = field(default_factory=SystemClock)
    sessions: sessionmaker[Session] = field(init=False)
    # Sessions that only read (metrics, health, digests): no write lock on SQLite.
    read_sessions: sessionmaker[Session] = field(init=False)
    _calendars: dict[str, BusinessCalendar] = field(default_factory=dict, init=False, repr=False)
    _expert_calendars: dict[str, BusinessCalendar] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sessions = make_sessionmaker(self.engine)
        self.read_sessions = make_sessionmaker(self.engine, read_only=True)

    def calendar(self, name: str) -> BusinessCalendar:
        """The named calendar, built once (holiday tables are not cheap)."""
        with self._lock:
            found = self._calendars.get(name)
            if found is None:
                found = BusinessCalendar(self.policy.calendars[name])
                self._calendars[name] = found
            return found

    def expert_calendar(self, expert_id: str) -> BusinessCalendar:
        """An expert's own working hours as a calendar."""
        with self._lock:
            found = self._expert_calendars.get(expert_id)
            if found is None:
                found = BusinessCalendar(self.policy.experts[expert_id].calendar())
                self._expert_calendars[expert_id] = found
            return found

    def policy_calendar(self, sla: SlaPolicy, team: str) -> BusinessCalendar:
        """The calendar an SLA policy runs on: its own, else its team's."""
        return self.calendar(sla.calendar or self.policy.teams[team].calendar)
