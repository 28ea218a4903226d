"""Domain operations on one conversation shared by ingest, the sweep and (later) Slack actions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy.orm import Session

from bot.core.policy import SlaPolicy
from bot.core.sla import BusinessCalendar, Deadline, add_on_clock, compute_deadline, resume_after_pause
from bot.core.sla_outcome import SlaOutcome, resolution_outcome, sla_outcome
from bot.flow.context import AppContext
from storage import repo
from storage.models import ANSWERED, OPEN, Account, Conversation


def policy_of(session: Session, ctx: AppContext, conversation: Conversation) -> SlaPolicy:
    """The SLA policy a conversation runs under (matched afresh if its policy left the file)."""
    for candidate in ctx.policy.policies:
        if candidate.name == conversation.policy:
            return candidate
    account = session.get(Account, conversation.account_id)
    return ctx.policy.policy_for(
        team=conversation.team, account=account.name if account else "", priority=conversation.priority
    )


def deadline_for(
    ctx: AppContext, sla: SlaPolicy, team: str, start: datetime, kind: Literal["first", "next"]
) -> Deadline:
    """The deadline for a customer post at `start` under `sla`, on the right calendar."""
    needs_calendar = (
        sla.clock == "business" or sla.calendar is not None or sla.weekend_first_response is not None
    )
    calendar = ctx.policy_calendar(sla, team) if needs_calendar else None
    return compute_deadline(sla, calendar, start, kind=kind)


def current_deadline(session: Session, ctx: AppContext, conversation: Conversation) -> Deadline:
    """The deadline of the conversation's current cycle, recomputed from its start (pure, repeatable)."""
    sla = policy_of(session, ctx, conversation)
    kind: Literal["first", "next"] = "first" if conversation.cycle == 0 else "next"
    return deadline_for(ctx, sla, conversation.team, conversation.cycle_started_at, kind)


def _clock_calendar(ctx: AppContext, sla: SlaPolicy, team: str) -> BusinessCalendar | None:
    return ctx.policy_calendar(sla, team) if sla.clock == "business" else None


def resolution_deadline(ctx: AppContext, sla: SlaPolicy, team: str, opened_at: datetime) -> datetime | None:
    """When a conversation opened at `opened_at` must be resolved (policy `resolution`), or None."""
    if sla.resolution is None:
        return None
    return add_on_clock(sla, _clock_calendar(ctx, sla, team), opened_at, sla.resolution)


def resume_from_wait(session: Session, ctx: AppContext, conversation: Conversation, at: datetime) -> None:
    """The customer wrote while staff waited on them: the paused clocks run again from `at`,
    with what was left on them when the wait began (an open cycle's deadline and the resolution)."""
    paused = conversation.waiting_since
    if paused is None:
        return
    sla = policy_of(session, ctx, conversation)
    calendar = _clock_calendar(ctx, sla, conversation.team)
    if conversation.resolution_due_at is not None:
        conversation.resolution_due_at = resume_after_pause(
            sla, calendar, conversation.resolution_due_at, paused, at
        )
    if conversation.status == OPEN:
        conversation.due_at = resume_after_pause(sla, calendar, conversation.due_at, paused, at)
    conversation.waiting_since = None


def resolution_verdict(conversation: Conversation, now: datetime) -> SlaOutcome | None:
    """The one verdict on the resolution target (None when the policy has none)."""
    if conversation.resolution_due_at is None:
        return None
    return resolution_outcome(
        resolution_due_at=conversation.resolution_due_at,
        first_response_at=conversation.first_response_at,
        closed_at=conversation.closed_at,
        waiting_since=conversation.waiting_since,
        now=now,
    )


@dataclass(frozen=True)
class OwnerHours:
    """An owner's working hours as the ladder asks about them (no owner: the team channel, which
    is always on duty). One helper for the set-wise and the one-at-a-time path."""

    calendar: BusinessCalendar | None

    def on_duty(self, at: datetime) -> bool:
        return self.calendar is None or self.calendar.is_open(at)

    def next_on_duty(self, at: datetime) -> datetime | None:
        if self.calendar is None:
            return at
        try:
            return self.calendar.next_open(at)
        except ValueError:
            return None

    def working_time_after(self, start: datetime, amount: timedelta) -> datetime:
        """When the owner has worked `amount` since `start` (wall time without hours to go by)."""
        if self.calendar is None:
            return start + amount
        try:
            return self.calendar.add_business_time(start, amount)
        except ValueError:  # never at work within a year: count wall time rather than never
            return start + amount


def owner_hours(ctx: AppContext, owner: str | None) -> OwnerHours:
    """The working hours of a conversation's owner (an id not among the experts counts as nobody)."""
    if owner is None or owner not in ctx.policy.experts:
        return OwnerHours(None)
    return OwnerHours(ctx.expert_calendar(owner))


def owner_shift_end(ctx: AppContext, owner: str | None, now: datetime, due_at: datetime) -> datetime | None:
    """When the owner's current working stretch ends, if they are at work now and it ends before
    `due_at` (follow the sun hands the conversation on then); else None."""
    if owner is None or owner not in ctx.policy.experts or now >= due_at:
        return None
    calendar = ctx.expert_calendar(owner)
    for start, end in calendar.open_intervals(now, due_at):
        if start <= now and end < due_at:
            return end
        break
    return None


def first_due_at(session: Session, ctx: AppContext, conversation: Conversation) -> datetime:
    """The first-response deadline the customer was promised.

    Stored since migration 0004; in cycle 0 it is also the current `due_at`; an older row already
    past its first cycle has it recomputed from the policy and calendar.
    """
    if conversation.first_due_at is not None:
        return conversation.first_due_at
    if conversation.cycle == 0:
        return conversation.due_at
    sla = policy_of(session, ctx, conversation)
    return deadline_for(ctx, sla, conversation.team, conversation.opened_at, "first").due_at


def first_response_outcome(
    session: Session, ctx: AppContext, conversation: Conversation, now: datetime
) -> SlaOutcome:
    """The one verdict on a conversation's first response (see `bot.core.sla_outcome`)."""
    return sla_outcome(
        due_at=first_due_at(session, ctx, conversation),
        responded_at=conversation.first_response_at,
        closed_at=conversation.closed_at,
        now=now,
    )


def current_cycle_outcome(conversation: Conversation, now: datetime) -> SlaOutcome:
    """The verdict on the current cycle's deadline (for cycle 0, the first response)."""
    return sla_outcome(
        due_at=conversation.due_at,
        responded_at=conversation.answered_at,
        closed_at=conversation.closed_at,
        now=now,
    )


def answer(conversation: Conversation, *, at: datetime, by: str) -> None:
    """Put a conversation in the answered state: response stamped, the ladder stopped."""
    conversation.status = ANSWERED
    conversation.answered_at = at
    conversation.answered_by = by
    if conversation.first_response_at is None:
        conversation.first_response_at = at
    # The response ladder stops; a resolution ladder still to climb has the sweep look again now
    # (it plans the next resolution notice; `at` may be a backfilled time, already past).
    resolution_pending = (
        conversation.resolution_due_at is not None and not conversation.resolution_breach_sent
    )
    conversation.next_action_at = at if resolution_pending else None


def mark_answered(
    session: Session, conversation: Conversation, *, at: datetime, by: str, now: datetime
) -> None:
    """A human answered: stamp the response, stop the ladder, audit it and update the card."""
    answer(conversation, at=at, by=by)
    session.flush()
    repo.record_event(
        session=session,
        at=now,
        actor=by,
        action="answered",
        conversation_id=conversation.id,
        cycle=conversation.cycle,
        response_at=at.isoformat(),
    )
    repo.retire_ladder(session=session, conversation_ids=[conversation.id], reason="answered first", now=now)
    queue_card_refresh(session, conversation, "answered", now)


def queue_card_refresh(session: Session, conversation: Conversation, reason: str, when: datetime) -> None:
    """Queue the card's edit for `reason`, due at `when`: once per cycle and reason (a newer card
    update of the card supersedes an older pending one)."""
    repo.enqueue(
        session=session,
        kind="card_update",
        key=f"conv:{conversation.id}:c{conversation.cycle}:{reason}",
        payload={"conversation_id": conversation.id, "reason": reason},
        conversation_id=conversation.id,
        now=when,
    )
