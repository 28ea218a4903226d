"""Weekly figures of simulated conversations, measured by the digest's own functions.

This module (with `bot.reports.simulate_command`) is the only part of `bot.sim` that imports `bot.reports`: the
simulated conversations are turned into the digest's `ConversationFacts` and measured with
`bot.reports.digest.compute_week`, exactly as the actual weeks are, so "share within target",
"p50/p90 first response" and "breaches" mean the same thing on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from bot.core.policy import Policy
from bot.core.sla import BusinessCalendar
from bot.reports.digest import ConversationFacts, WeekData, WeekFigures, WeekRange, compute_week
from bot.sim.engine import SimConversation


@dataclass(frozen=True)
class LadderCounts:
    warnings: int = 0
    nags: int = 0
    escalations: int = 0


def facts_of(conversation: SimConversation, index: int) -> ConversationFacts:
    return ConversationFacts(
        id=index,
        policy=conversation.policy,
        calendar=conversation.calendar,
        customer=str(conversation.key),
        owner=conversation.owner,
        opened_at=conversation.opened_at,
        first_due_at=conversation.first_due_at,
        first_target=conversation.first_target,
        first_response_at=conversation.first_response_at,
        first_responder=conversation.answered_by,
    )


def weeks_between(start: datetime, end: datetime, timezone: str) -> list[WeekRange]:
    """The ISO weeks (in `timezone`) that overlap [start, end)."""
    weeks = [WeekRange.containing(start, timezone)]
    while weeks[-1].end < end:
        weeks.append(weeks[-1].next())
    return weeks


def simulated_weeks(
    policy: Policy,
    calendars: Mapping[str, BusinessCalendar],
    conversations: Sequence[SimConversation],
    team: str,
    weeks: Sequence[WeekRange],
) -> list[tuple[WeekFigures, LadderCounts]]:
    """One team's digest figures for each week, and the ladder steps of its conversations.

    Ladder steps are counted in the week the conversation opened (the simulator counts them
    per conversation, not per instant).
    """
    if not weeks:
        return []
    starts = [week.start for week in weeks]
    buckets: list[list[ConversationFacts]] = [[] for _ in weeks]
    ladders = [[0, 0, 0] for _ in weeks]
    import bisect

    last_end = weeks[-1].end
    for index, conversation in enumerate(conversations):
        if conversation.team != team or conversation.opened_at >= last_end:
            continue
        facts = facts_of(conversation, index)
        until = max(conversation.first_response_at or last_end, conversation.first_due_at)
        first = max(bisect.bisect_right(starts, conversation.opened_at) - 1, 0)
        last = min(bisect.bisect_right(starts, until) - 1, len(weeks) - 1)
        opened_week = bisect.bisect_right(starts, conversation.opened_at) - 1
        if 0 <= opened_week < len(weeks):
            counts = ladders[opened_week]
            counts[0] += conversation.warnings
            counts[1] += conversation.nags
            counts[2] += conversation.escalations
        for position in range(first, last + 1):
            buckets[position].append(facts)
    policies = {sla.name: sla for sla in policy.policies}
    names = {expert.id: expert.name for expert in policy.experts.values()}
    result = []
    for week, facts_list, counts in zip(weeks, buckets, ladders, strict=True):
        posts = sum(1 for f in facts_list if week.start <= f.opened_at < week.end)
        figures = compute_week(
            WeekData(week=week, conversations=tuple(facts_list), posts=posts, acks=0),
            policies=policies,
            calendars=calendars,
            names=names,
        )
        result.append((figures, LadderCounts(*counts)))
    return result


def weekly_shares(
    policy: Policy,
    calendars: Mapping[str, BusinessCalendar],
    conversations: Iterable[SimConversation],
    team: str,
    weeks: Sequence[WeekRange],
) -> list[float | None]:
    """Share answered within target per week (the digest's definition)."""
    rows = simulated_weeks(policy, calendars, list(conversations), team, weeks)
    return [figures.share_within_sla for figures, _ in rows]
