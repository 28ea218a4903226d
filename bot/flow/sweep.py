"""The sweep: claim conversations whose next_action_at has come and climb their ladder.

Claiming is the database's job, so any number of processes can sweep one PostgreSQL:
rows are taken with ``FOR UPDATE SKIP LOCKED`` (a row another sweeper holds is skipped,
one it has just finished no longer matches), and every step's outbox row carries an
idempotency key unique per conversation, cycle and step as a second guard. On SQLite the
transaction starts with ``BEGIN IMMEDIATE`` (see storage.db): one sweeper at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from bot.core.ladder import LadderState, Plan, Step, plan
from bot.core.routing import choose_owner
from bot.flow import staff
from bot.flow.context import AppContext
from bot.flow.conversations import current_deadline, owner_shift_end, policy_of
from storage import repo
from storage.db import is_postgres
from storage.models import OPEN, Conversation, Event

log = logging.getLogger("replyclock.sweep")

RETRY_FAILED_ITEM_AFTER = timedelta(minutes=5)


@dataclass
class SweepResult:
    """What one sweep did."""

    processed: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    at_risk: int = 0


def sweep(ctx: AppContext, *, batch_size: int = 200, max_batches: int | None = None) -> SweepResult:
    """Process every conversation due now, in batches of `batch_size`, each batch one transaction."""
    result = SweepResult()
    batches = 0
    while max_batches is None or batches < max_batches:
        batches += 1
        now = ctx.clock.now()
        with ctx.sessions() as session, session.begin():
            claimed = _claim(session, now, batch_size)
            for conversation in claimed:
                _process_one(session, ctx, conversation, now, result)
        if len(claimed) < batch_size:
            break
    try:
        result.at_risk = check_at_risk(ctx, ctx.clock.now())
    except Exception:  # a forecast must never stop the ladder: log it and carry on
        log.exception("at-risk check failed")
    return result


# Forecasts are checked at most this often per process ("at risk" notices, bot.sim.forecast).
AT_RISK_EVERY = timedelta(minutes=5)
_at_risk_checked: dict[int, datetime] = {}


def check_at_risk(ctx: AppContext, now: datetime) -> int:
    """Notify owner and team (once per cycle) when the forecast answer time of an open conversation
    of a team with ``at_risk = true`` is past its deadline, while no warning has gone out yet."""
    teams = [name for name, team in ctx.policy.teams.items() if team.at_risk]
    last = _at_risk_checked.get(id(ctx))
    if not teams or (last is not None and now - last < AT_RISK_EVERY):
        return 0
    _at_risk_checked[id(ctx)] = now
    from bot.sim.forecast import forecast_for

    notified = 0
    with ctx.sessions() as session, session.begin():
        candidates = session.scalars(
            select(Conversation).where(
                Conversation.status == OPEN,
                Conversation.team.in_(teams),
                Conversation.warnings_sent == 0,
                Conversation.due_at > now,
                Conversation.owner.is_not(None),
            )
        ).all()
        for conversation in candidates:
            if conversation.breach_cycle == conversation.cycle:
                continue
            found = forecast_for(session, ctx.policy, conversation, now, calendar_of=ctx.expert_calendar)
            if found is None or found.at <= conversation.due_at:
                continue
            key = f"conv:{conversation.id}:c{conversation.cycle}:at_risk"
            payload: dict[str, object] = {
                "conversation_id": conversation.id,
                "owner": conversation.owner,
                "forecast_at": found.at.isoformat(),
                "due_at": conversation.due_at.isoformat(),
            }
            if repo.enqueue(
                session=session,
                kind="at_risk",
                key=key,
                payload=payload,
                conversation_id=conversation.id,
                now=now,
            ):
                repo.record_event(
                    session=session,
                    at=now,
                    actor="sweep",
                    action="at_risk",
                    conversation_id=conversation.id,
                    forecast_at=found.at.isoformat(),
                    ahead=found.ahead,
                )
                notified += 1
    return notified


def _claim(session: Session, now: datetime, limit: int) -> list[Conversation]:
    query = (
        select(Conversation)
        .where(
            Conversation.next_action_at <= now,
            or_(Conversation.status == OPEN, Conversation.waiting_since.is_not(None)),
        )
        .order_by(Conversation.next_action_at)
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def _process_one(
    session: Session, ctx: AppContext, conversation: Conversation, now: datetime, result: SweepResult
) -> None:
    conversation_id = conversation.id
    try:
        with session.begin_nested():
            if conversation.waiting_since is not None:
                # Waiting on the customer: no ladder, only the close after silence.
                closed = staff.close_silent(session, ctx, conversation, now)
                session.flush()
                steps: tuple[Step, ...] = ()
                if closed:
                    result.steps["closed_silent"] = result.steps.get("closed_silent", 0) + 1
            else:
                steps = apply_ladder(session, ctx, conversation, now)
        result.processed += 1
        for step in steps:
            result.steps[step.kind] = result.steps.get(step.kind, 0) + 1
    except Exception:
        # One bad conversation must not stop the sweep: log it and look again later.
        result.failed += 1
        log.exception("sweep failed for conversation", extra={"conversation_id": conversation_id})
        session.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(next_action_at=now + RETRY_FAILED_ITEM_AFTER, version=Conversation.version + 1)
            .execution_options(synchronize_session=False)
        )


def apply_ladder(
    session: Session, ctx: AppContext, conversation: Conversation, now: datetime
) -> tuple[Step, ...]:
    """Carry out the ladder steps due for one claimed conversation; returns them."""
    sla = policy_of(session, ctx, conversation)
    deadline = current_deadline(session, ctx, conversation)
    owner = conversation.owner if conversation.owner in ctx.policy.experts else None

    def on_duty(at: datetime) -> bool:
        return owner is None or ctx.expert_calendar(owner).is_open(at)

    def next_on_duty(at: datetime) -> datetime | None:
        if owner is None:
            return at
        try:
            return ctx.expert_calendar(owner).next_open(at)
        except ValueError:
            return None

    state = LadderState(
        warnings_sent=conversation.warnings_sent,
        breached=conversation.breach_cycle == conversation.cycle,
        escalation_step=conversation.escalation_step,
        nag_level=conversation.nag_level,
        reassignments=conversation.reassignments,
        assigned_at=conversation.assigned_at,
        claimed=conversation.claimed_by is not None,
        owner_active_at=_owner_active_at(session, conversation)
        if sla.reassign_if_silent is not None
        else None,
    )
    decided: Plan = plan(
        policy=sla,
        due_at=conversation.due_at,
        warn_at=deadline.warn_at if deadline.due_at == conversation.due_at else (),
        state=state,
        now=now,
        owner_on_duty=on_duty,
        owner_next_on_duty=next_on_duty,
    )
    for step in decided.steps:
        _carry_out(session, ctx, conversation, step, now)
    team = ctx.policy.teams.get(conversation.team)
    follow_the_sun = team is not None and team.follow_the_sun and conversation.status == OPEN
    if follow_the_sun and owner is not None and not any(step.kind == "reassign" for step in decided.steps):
        back = next_on_duty(now)
        if not on_duty(now) and (back is None or back > conversation.due_at):
            _hand_over(session, ctx, conversation, now)
    conversation.warnings_sent = decided.state.warnings_sent
    conversation.escalation_step = decided.state.escalation_step
    conversation.nag_level = decided.state.nag_level
    conversation.reassignments = decided.state.reassignments
    if decided.state.breached and not state.breached:
        conversation.breach_cycle = conversation.cycle
        if conversation.breached_at is None:
            conversation.breached_at = conversation.due_at
    conversation.next_action_at = decided.next_action_at
    if follow_the_sun:
        # Look again when the (possibly new) owner's working hours end before the deadline.
        shift_end = owner_shift_end(ctx, conversation.owner, now, conversation.due_at)
        if shift_end is not None and (
            conversation.next_action_at is None or shift_end < conversation.next_action_at
        ):
            conversation.next_action_at = shift_end
    session.flush()
    return decided.steps


def _hand_over(session: Session, ctx: AppContext, conversation: Conversation, now: datetime) -> None:
    """Follow the sun: the owner's day ended before the deadline; the next expert on duty takes it."""
    previous = conversation.owner
    choice = choose_owner(
        ctx.policy,
        team=conversation.team,
        topics=(),
        at=now,
        load=repo.open_loads(session=session, team=conversation.team),
        last_assigned=previous,
        exclude=repo.away_experts(session=session, now=now) | ({previous} if previous else set()),
    )
    if choice.expert_id is None or choice.reason != "on_duty":
        return  # nobody else at work: it stays, and the ladder goes on as usual
    index = conversation.reassignments
    conversation.reassignments += 1
    conversation.owner = choice.expert_id
    conversation.assigned_at = now
    conversation.claimed_by = None
    conversation.claimed_at = None
    repo.enqueue(
        session=session,
        kind="reassign",
        key=f"conv:{conversation.id}:c{conversation.cycle}:reassign:{index}",
        payload={
            "conversation_id": conversation.id,
            "step": "reassign",
            "index": index,
            "notify": "owner",
            "scheduled_at": now.isoformat(),
            "owner": choice.expert_id,
            "previous_owner": previous,
            "reason": "handover",
        },
        conversation_id=conversation.id,
        now=now,
    )
    repo.record_event(
        session=session,
        at=now,
        actor="sweep",
        action="handover",
        conversation_id=conversation.id,
        owner=choice.expert_id,
        previous_owner=previous,
    )


def _carry_out(
    session: Session, ctx: AppContext, conversation: Conversation, step: Step, now: datetime
) -> None:
    payload: dict[str, object] = {
        "conversation_id": conversation.id,
        "step": step.kind,
        "index": step.index,
        "notify": step.notify,
        "scheduled_at": step.scheduled_at.isoformat(),
        "owner": conversation.owner,
    }
    if step.kind == "reassign":
        previous = conversation.owner
        if conversation.claimed_by is not None:
            # reassign_if_silent: the owner claimed it but went silent; the claim goes with it.
            payload["reason"] = "silent"
            conversation.claimed_by = None
            conversation.claimed_at = None
        choice = choose_owner(
            ctx.policy,
            team=conversation.team,
            topics=(),
            at=now,
            load=repo.open_loads(session=session, team=conversation.team),
            last_assigned=previous,
            exclude=repo.away_experts(session=session, now=now) | ({previous} if previous else set()),
        )
        if choice.expert_id is not None and choice.expert_id != previous:
            conversation.owner = choice.expert_id
            conversation.assigned_at = now
            payload.update(owner=choice.expert_id, previous_owner=previous)
        else:
            conversation.assigned_at = now
            payload.update(owner=previous, previous_owner=previous, note="no other expert on duty")
    if step.kind == "escalation" and step.notify == "manager":
        payload["manager"] = ctx.policy.teams[conversation.team].manager
    if step.kind == "escalation" and step.notify == "on_call":
        payload["on_call"] = ctx.policy.teams[conversation.team].on_call
    key = f"conv:{conversation.id}:c{conversation.cycle}:{step.kind}:{step.index}"
    written = repo.enqueue(
        session=session, kind=step.kind, key=key, payload=payload, conversation_id=conversation.id, now=now
    )
    if written:
        repo.record_event(
            session=session,
            at=now,
            actor="sweep",
            action=step.kind,
            conversation_id=conversation.id,
            index=step.index,
            notify=step.notify,
            scheduled_at=step.scheduled_at.isoformat(),
            lateness_seconds=(now - step.scheduled_at).total_seconds(),
        )
        log.info(
            "ladder step",
            extra={"conversation_id": conversation.id, "step": step.kind, "index": step.index},
        )


def _owner_active_at(session: Session, conversation: Conversation) -> datetime | None:
    """When the claiming owner last acted on the conversation: the claim, or their latest audited
    action on it (reply, snooze, reassign...), whichever is later."""
    claimer = conversation.claimed_by
    if claimer is None:
        return None
    latest = session.scalar(
        select(func.max(Event.at)).where(
            Event.conversation_id == conversation.id,
            or_(Event.actor == claimer, Event.actor == f"expert:{claimer}"),
        )
    )
    found = [at for at in (conversation.claimed_at, latest) if at is not None]
    return max(found) if found else None


def earliest_next_action(ctx: AppContext) -> datetime | None:
    """When the sweep must next wake (the partial index makes this a single index probe)."""
    with ctx.read_sessions() as session:
        return session.scalar(
            select(Conversation.next_action_at)
            .where(Conversation.next_action_at.is_not(None))
            .order_by(Conversation.next_action_at)
            .limit(1)
        )
