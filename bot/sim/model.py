"""The answer-time model: how long an expert works on a conversation before answering.

History gives, per answered conversation, who answered, when they could start on it and when
they answered. With each expert working one conversation at a time, they could start at the
later of its assignment and their previous answer; the time from there to the answer, counted
in the expert's own working hours, is one sample of their answering time. Samples are kept
per expert and per local hour of the week in which work started, as an empirical distribution
(sampling one of the recorded values). A bucket with fewer than `min_samples` falls back to the
expert's whole week, then to the team's hour, the team's week, and finally everyone's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from bot.sim.workclock import WEEK_HOURS, WorkClock


class AnswerTimes(Protocol):
    """Anything that draws working seconds for an expert starting at a local hour of the week."""

    def sample(self, expert: str, team: str, hour_of_week: int, u: float) -> float: ...


@dataclass(frozen=True)
class AnswerRecord:
    """One answered conversation, as history tells it (POSIX seconds)."""

    expert: str
    team: str
    assigned_at: float
    answered_at: float


@dataclass
class EmpiricalModel:
    """Empirical answering times (working seconds) by expert and team and local hour of week."""

    min_samples: int = 20
    expert_hours: dict[str, list[list[float]]] = field(default_factory=dict)
    team_hours: dict[str, list[list[float]]] = field(default_factory=dict)
    everyone: list[float] = field(default_factory=list)
    _choice: dict[tuple[str, str, int], list[float]] = field(default_factory=dict, repr=False)

    def add(self, expert: str, team: str, hour_of_week: int, seconds: float) -> None:
        self.expert_hours.setdefault(expert, [[] for _ in range(WEEK_HOURS)])[hour_of_week].append(seconds)
        self.team_hours.setdefault(team, [[] for _ in range(WEEK_HOURS)])[hour_of_week].append(seconds)
        self.everyone.append(seconds)
        self._choice.clear()

    def samples(self, expert: str, team: str, hour_of_week: int) -> list[float]:
        """The values a draw for this expert, team and hour chooses among (after fallbacks)."""
        key = (expert, team, hour_of_week)
        found = self._choice.get(key)
        if found is not None:
            return found
        candidates: list[list[float]] = []
        for table in (self.expert_hours.get(expert), self.team_hours.get(team)):
            if table is not None:
                candidates.append(table[hour_of_week])
                candidates.append([value for bucket in table for value in bucket])
        candidates.append(self.everyone)
        for values in candidates:
            if len(values) >= self.min_samples:
                found = sorted(values)
                break
        else:
            found = sorted(self.everyone)  # holds every sample: the largest
        if not found:
            raise ValueError("the answer-time model has no samples at all (no answered conversations)")
        self._choice[key] = found
        return found

    def sample(self, expert: str, team: str, hour_of_week: int, u: float) -> float:
        values = self.samples(expert, team, hour_of_week)
        return values[min(int(u * len(values)), len(values) - 1)]

    def quantile(self, expert: str, team: str, hour_of_week: int, q: float) -> float:
        return self.sample(expert, team, hour_of_week, q)

    @property
    def size(self) -> int:
        return len(self.everyone)


def fit(
    records: Iterable[AnswerRecord], clocks: Mapping[str, WorkClock], *, min_samples: int = 20
) -> EmpiricalModel:
    """Fit the model from answered conversations; `clocks` holds each expert's working hours.

    Records of experts without a clock (no longer in the policy) are skipped. A sample of zero
    working time (answered before the expert's hours began, e.g. from a phone) is kept: it is
    what happened.
    """
    model = EmpiricalModel(min_samples=min_samples)
    by_expert: dict[str, list[AnswerRecord]] = {}
    for record in records:
        if record.expert in clocks and record.answered_at >= record.assigned_at:
            by_expert.setdefault(record.expert, []).append(record)
    for expert, rows in by_expert.items():
        clock = clocks[expert]
        rows.sort(key=lambda r: (r.answered_at, r.assigned_at))
        previous = float("-inf")
        for row in rows:
            start = max(row.assigned_at, previous)
            previous = row.answered_at
            began = clock.next_open(start)
            if began == float("inf") or began > row.answered_at:
                began = start
            model.add(expert, row.team, clock.hour_of_week(began), clock.between(start, row.answered_at))
    return model
