"""Domain operations on one conversation shared by ingest, the sweep and (later) Slack actions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy.orm import Session

from bot.core.policy import SlaPolicy
from bot.core.sla import Deadline, compute_deadline
from bot.flow.context import AppContext
from storage import repo
from storage.models import ANSWERED, Account, Conversation


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


def answer(conversation: Conversation, *, at: datetime, by: str) -> None:
    """Put a conversation in the answered state: response stamped, the ladder stopped."""
    conversation.status = ANSWERED
    conversation.answered_at = at
    conversation.answered_by = by
    if conversation.first_response_at is None:
        conversation.first_response_at = at
    conversation.next_action_at = None


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
    repo.enqueue(
        session=session,
        kind="card_update",
        key=f"conv:{conversation.id}:c{conversation.cycle}:answered",
        payload={"conversation_id": conversation.id, "reason": "answered"},
        conversation_id=conversation.id,
        now=now,
    )
