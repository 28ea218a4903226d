"""The discrete-event simulator: arrivals, routing, deadlines, experts answering, the ladder.

* Each arrival is routed with the real `bot.core.routing.classify`, gets its SLA policy with
  `Policy.policy_for`, its deadline and warnings with `bot.core.sla.compute_deadline`, and an
  owner with `bot.core.routing.choose_owner` (load = open conversations owned).
* Experts work one conversation at a time, only in their working hours. A free expert on duty
  takes the waiting conversation of their team(s) with the earliest deadline (their own or a
  colleague's: a conversation goes to whoever gets to it first, as with claiming in Slack).
  The time it takes is drawn from the answer-time model for that expert and the local hour of
  the week they start, and counts only their working hours.
* Afterwards the real ladder (`bot.core.ladder.plan`) is run for every conversation until its
  simulated answer, counting warnings, breaches, escalations and nags (nags only while the
  owner is on duty, as in the sweep).

Everything random comes from one seeded generator, so a seed gives the same result.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from bot.core.ladder import LadderState, plan
from bot.core.policy import Expert, Policy, SlaPolicy
from bot.core.routing import choose_owner, classify, is_on_duty
from bot.core.sla import BusinessCalendar, Deadline, compute_deadline
from bot.sim.model import AnswerTimes, EmpiricalModel
from bot.sim.queueing import QueueItem, queue_finishes
from bot.sim.workclock import WorkClock, to_datetime

# Conversations still waiting this long after the last arrival stay unanswered in the result.
DRAIN = timedelta(days=45)


@dataclass(frozen=True)
class Arrival:
    """A customer post that opens a conversation."""

    key: int
    at: datetime
    account: str
    author_id: str
    text: str
    author_handle: str | None = None
    language: str | None = None


@dataclass
class SimConversation:
    """One simulated conversation (times are aware UTC datetimes)."""

    key: int
    team: str
    policy: str
    calendar: str
    owner: str | None
    opened_at: datetime
    first_due_at: datetime
    first_target: timedelta
    warn_at: tuple[datetime, ...]
    first_response_at: datetime | None = None
    answered_by: str | None = None
    warnings: int = 0
    breached: bool = False
    nags: int = 0
    escalations: int = 0
    # The "at risk" check (`Probe`): each time the chance of missing the deadline rose to a new
    # high before the first warning, (when, chance); empty when never checked or never above 0.
    risk: list[tuple[datetime, float]] = field(default_factory=list)

    def flagged_at(self, threshold: float) -> datetime | None:
        """When the at-risk notice would have gone out with this cut on the chance (None: never)."""
        return next((at for at, chance in self.risk if chance >= threshold), None)


@dataclass(frozen=True)
class Probe:
    """Emulate the "at risk" check every `every` from `start`, with what the live check knows:
    each team's open conversations (waiting or being answered) earliest deadline first, the
    experts' hours and `model`. The chance that each one is answered after its deadline
    (`bot.sim.queueing.queue_finishes`, `draws` draws) is recorded while it is before its first
    warning and its deadline, in `SimConversation.risk`. What an expert is working on counts as
    claimed by them since they started (live: ``claimed_by``, ``claimed_at``); with `claims`
    off, the check knows nothing of who works on what (everyone is taken to be free)."""

    model: EmpiricalModel
    start: datetime
    every: timedelta = timedelta(minutes=5)
    draws: int = 200
    claims: bool = True


@dataclass
class SimResult:
    conversations: list[SimConversation]
    busy_seconds: dict[str, float] = field(default_factory=dict)
    policy: Policy | None = None


def deadline_of(
    policy: Policy, calendars: Mapping[str, BusinessCalendar], sla: SlaPolicy, team: str, at: datetime
) -> tuple[Deadline, str]:
    """The first-response deadline as the ingest computes it, and the calendar name it counts on."""
    name = sla.calendar or policy.teams[team].calendar
    needs = sla.clock == "business" or sla.calendar is not None or sla.weekend_first_response is not None
    return compute_deadline(sla, calendars[name] if needs else None, at, kind="first"), name


class Simulator:
    """One policy, one answer model, one span of time: run it on arrivals, as often as wanted."""

    def __init__(
        self,
        policy: Policy,
        model: AnswerTimes,
        *,
        start: datetime,
        end: datetime,
        calendars: Mapping[str, BusinessCalendar] | None = None,
    ) -> None:
        self.policy = policy
        self.model = model
        self.calendars = dict(calendars or {})
        for name, spec in policy.calendars.items():
            if name not in self.calendars:
                self.calendars[name] = BusinessCalendar(spec)
        self.start = start.timestamp()
        self.end = (end + DRAIN).timestamp()
        self.clocks = {
            expert.id: WorkClock(BusinessCalendar(expert.calendar()), self.start - 86400.0, self.end)
            for expert in policy.experts.values()
        }
        self.teams_of: dict[str, tuple[str, ...]] = {}
        for team in policy.teams.values():
            for expert_id in dict.fromkeys(team.experts):
                if expert_id in policy.experts:
                    self.teams_of[expert_id] = (*self.teams_of.get(expert_id, ()), team.name)

    def run(
        self, arrivals: Sequence[Arrival], *, seed: int = 0, ladder: bool = True, probe: Probe | None = None
    ) -> SimResult:
        policy = self.policy
        rng = np.random.default_rng(seed)
        draws = rng.random(len(arrivals) + 16).tolist()
        draw_index = 0
        clocks = self.clocks
        teams_of = self.teams_of
        team_experts = {
            name: [e for e in dict.fromkeys(team.experts) if e in clocks]
            for name, team in policy.teams.items()
        }

        conversations: list[SimConversation] = []
        waiting: dict[str, list[tuple[float, int]]] = {name: [] for name in policy.teams}
        load: dict[str, int] = {}
        last_assigned: dict[str, str | None] = {}
        busy: dict[str, bool] = {e: False for e in clocks}
        busy_seconds: dict[str, float] = {e: 0.0 for e in clocks}
        owner_of: list[str | None] = []
        due_of: list[float] = []
        team_of_conv: list[str] = []
        # Events: (time, order, seq, kind, subject); finishes sort before arrivals at one instant.
        events: list[tuple[float, int, int, int, int | str]] = []
        seq = 0
        for index, arrival in enumerate(arrivals):
            events.append((arrival.at.timestamp(), 1, seq, 1, index))
            seq += 1
        for expert_id, clock in clocks.items():
            for opening in clock.starts:
                events.append((opening, 2, seq, 2, expert_id))
                seq += 1
        current: dict[str, int] = {}  # expert -> the conversation they are working on
        began: dict[str, float] = {}  # expert -> when they started on it
        probe_until = (arrivals[-1].at.timestamp() if arrivals else 0.0) + 7 * 86400.0
        if probe is not None and arrivals:
            events.append((max(probe.start.timestamp(), arrivals[0].at.timestamp()), 3, seq, 3, 0))
            seq += 1
        heapq.heapify(events)

        def dispatch(expert_id: str, now: float) -> None:
            nonlocal seq, draw_index
            best: tuple[float, int] | None = None
            best_team = ""
            for team in teams_of.get(expert_id, ()):
                queue = waiting[team]
                if queue and (best is None or queue[0] < best):
                    best, best_team = queue[0], team
            if best is None:
                return
            heapq.heappop(waiting[best_team])
            index = best[1]
            clock = clocks[expert_id]
            if draw_index >= len(draws):
                draws.extend(rng.random(1024).tolist())
            u = draws[draw_index]
            draw_index += 1
            worked = self.model.sample(expert_id, best_team, clock.hour_of_week(now), u)
            finish = clock.wall(clock.work(now) + worked)
            busy[expert_id] = True
            current[expert_id] = index
            began[expert_id] = now
            busy_seconds[expert_id] += worked
            if finish != float("inf"):
                heapq.heappush(events, (finish, 0, seq, 0, f"{expert_id}\x00{index}"))
                seq += 1

        while events:
            now, _order, _seq, kind, subject = heapq.heappop(events)
            if now > self.end:
                break
            if kind == 1:
                assert isinstance(subject, int)
                arrival = arrivals[subject]
                route = classify(
                    policy,
                    account=arrival.account,
                    author_id=arrival.author_id,
                    author_handle=arrival.author_handle,
                    text=arrival.text,
                    language=arrival.language,
                )
                sla = policy.policy_for(team=route.team, account=arrival.account, priority=route.priority)
                deadline, calendar_name = deadline_of(policy, self.calendars, sla, route.team, arrival.at)
                choice = choose_owner(
                    policy,
                    team=route.team,
                    topics=route.topics,
                    at=arrival.at,
                    load=load,
                    last_assigned=last_assigned.get(route.team),
                )
                owner = choice.expert_id
                if owner is not None:
                    load[owner] = load.get(owner, 0) + 1
                    last_assigned[route.team] = owner
                index = len(conversations)
                conversations.append(
                    SimConversation(
                        key=arrival.key,
                        team=route.team,
                        policy=sla.name,
                        calendar=calendar_name,
                        owner=owner,
                        opened_at=arrival.at,
                        first_due_at=deadline.due_at,
                        first_target=deadline.target,
                        warn_at=deadline.warn_at,
                    )
                )
                owner_of.append(owner)
                due_ts = deadline.due_at.timestamp()
                due_of.append(due_ts)
                team_of_conv.append(route.team)
                heapq.heappush(waiting[route.team], (due_ts, index))
                # The owner first, then anyone else of the team who is free and at work.
                candidates = team_experts.get(route.team, [])
                if owner is not None and owner in clocks:
                    candidates = [owner, *candidates]
                for expert_id in candidates:
                    if not busy[expert_id] and clocks[expert_id].is_open(now):
                        dispatch(expert_id, now)
                        break
            elif kind == 0:
                assert isinstance(subject, str)
                expert_id, raw = subject.split("\x00")
                index = int(raw)
                conversation = conversations[index]
                conversation.first_response_at = to_datetime(now)
                conversation.answered_by = expert_id
                previous_owner = owner_of[index]
                if previous_owner is not None:
                    load[previous_owner] -= 1
                conversation.owner = expert_id
                busy[expert_id] = False
                current.pop(expert_id, None)
                if clocks[expert_id].is_open(now):
                    dispatch(expert_id, now)
            elif kind == 2:
                assert isinstance(subject, str)
                if not busy[subject]:
                    dispatch(subject, now)
            else:
                assert probe is not None
                self._probe(probe, now, waiting, current, began, conversations, due_of)
                following = now + probe.every.total_seconds()
                if following <= probe_until:
                    heapq.heappush(events, (following, 3, seq, 3, 0))
                    seq += 1

        if ladder:
            self._ladder(conversations)
        return SimResult(conversations=conversations, busy_seconds=busy_seconds, policy=policy)

    def _probe(
        self,
        probe: Probe,
        now: float,
        waiting: Mapping[str, list[tuple[float, int]]],
        current: Mapping[str, int],
        began: Mapping[str, float],
        conversations: Sequence[SimConversation],
        due_of: Sequence[float],
    ) -> None:
        # What an expert is working on counts as claimed by them (live: claimed_by, claimed_at).
        claimed: dict[int, tuple[str, float]] = {index: (e, began[e]) for e, index in current.items()}
        if not probe.claims:
            claimed = {index: ("", now) for index in claimed}
        being_answered: dict[str, list[tuple[float, int]]] = {}
        for index in claimed:
            being_answered.setdefault(conversations[index].team, []).append((due_of[index], index))
        for team, queue in waiting.items():
            order = sorted([*queue, *being_answered.get(team, ())])
            if not any(self._checkable(conversations[index], now) for _, index in order):
                continue
            members = self._members(team)
            place = {expert: i for i, (expert, _) in enumerate(members)}
            items = []
            for _, index in order:
                by, since = claimed.get(index, ("", now))
                owner = conversations[index].owner or ""
                items.append(QueueItem(place.get(owner, -1), place.get(by, -1), since))
            finishes = queue_finishes(
                probe.model, team=team, now=now, items=items, members=members, draws=probe.draws
            )
            for row, (due, index) in enumerate(order):
                conversation = conversations[index]
                if not self._checkable(conversation, now):
                    continue
                chance = float(np.mean(finishes[row] > due))
                if chance > (conversation.risk[-1][1] if conversation.risk else 0.0):
                    conversation.risk.append((to_datetime(now), chance))

    @staticmethod
    def _checkable(conversation: SimConversation, now: float) -> bool:
        """Open and still before its first warning (and its deadline): the live check's candidates."""
        first = conversation.warn_at[0] if conversation.warn_at else conversation.first_due_at
        return now < min(first, conversation.first_due_at).timestamp() and conversation.owner is not None

    def _members(self, team: str) -> list[tuple[str, WorkClock]]:
        return [
            (e, self.clocks[e]) for e in dict.fromkeys(self.policy.teams[team].experts) if e in self.clocks
        ]

    def _ladder(self, conversations: list[SimConversation]) -> None:
        policies = {sla.name: sla for sla in self.policy.policies}
        end = to_datetime(self.end)
        for conversation in conversations:
            sla = policies[conversation.policy]
            stop = conversation.first_response_at or end
            first = conversation.warn_at[0] if conversation.warn_at else conversation.first_due_at
            if first >= stop:
                continue
            expert = self.policy.experts.get(conversation.owner) if conversation.owner else None
            clock = self.clocks.get(conversation.owner) if conversation.owner else None

            def on_duty(at: datetime, expert: Expert | None = expert) -> bool:
                return True if expert is None else is_on_duty(expert, at)

            def next_on_duty(at: datetime, clock: WorkClock | None = clock) -> datetime | None:
                if clock is None:
                    return at
                found = clock.next_open(at.timestamp())
                return None if found == float("inf") else to_datetime(found)

            state = LadderState(claimed=True)
            now = first
            while True:
                step_plan = plan(
                    policy=sla,
                    due_at=conversation.first_due_at,
                    warn_at=conversation.warn_at,
                    state=state,
                    now=now,
                    owner_on_duty=on_duty,
                    owner_next_on_duty=next_on_duty,
                )
                for step in step_plan.steps:
                    if step.kind == "warning":
                        conversation.warnings += 1
                    elif step.kind == "breach":
                        conversation.breached = True
                    elif step.kind == "escalation":
                        conversation.escalations += 1
                    elif step.kind == "nag":
                        conversation.nags += 1
                state = step_plan.state
                following = step_plan.next_action_at
                if following is None or following >= stop or following <= now:
                    break
                now = following
