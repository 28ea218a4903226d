"""The escalation ladder as a pure function: given where a conversation stands and the time,
which steps are due now and when to look again.

Steps of one cycle (a cycle is the wait for one response):
  warning(s) at the policy's warn_at points before the deadline (a warning whose moment
  has passed by the deadline is dropped: the breach notice says more),
  breach at the deadline,
  escalation steps at deadline + after, in order, whatever the owner's hours,
  a nag to the owner every nag_every after the deadline, but only while the owner is on
  duty (nags that fall in their off hours collapse into one when they are back),
  reassignment to the next expert when nobody claimed it within claim_within, or when the
  owner who claimed it neither answered nor acted for reassign_if_silent (the claim is released).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from bot.core.policy import EscalationTarget, SlaPolicy

StepKind = Literal["warning", "breach", "escalation", "nag", "reassign"]


@dataclass(frozen=True)
class LadderState:
    """What has been done in the current cycle."""

    warnings_sent: int = 0
    breached: bool = False
    escalation_step: int = 0
    nag_level: int = 0
    reassignments: int = 0
    assigned_at: datetime | None = None
    claimed: bool = False
    # When the owner last acted on it (claimed, replied, snoozed...); for reassign_if_silent.
    owner_active_at: datetime | None = None


@dataclass(frozen=True)
class Step:
    """One thing to do now. `index` makes the step's idempotency key unique within its cycle."""

    kind: StepKind
    index: int
    scheduled_at: datetime
    notify: EscalationTarget


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    state: LadderState
    next_action_at: datetime | None


def plan(
    *,
    policy: SlaPolicy,
    due_at: datetime,
    warn_at: tuple[datetime, ...],
    state: LadderState,
    now: datetime,
    owner_on_duty: Callable[[datetime], bool],
    owner_next_on_duty: Callable[[datetime], datetime | None],
) -> Plan:
    """Decide the steps due at `now` and the next time the sweep must look.

    Args:
        policy: the conversation's SLA policy.
        due_at: the current cycle's deadline.
        warn_at: the cycle's warning instants (sorted, before due_at).
        state: what was done so far in this cycle.
        now: the current time.
        owner_on_duty: whether the owner may be nagged at an instant (True when there is no owner:
            nags then go to the team channel, which is always "on duty").
        owner_next_on_duty: the owner's next on-duty instant at or after a time, None if unknown.

    Returns:
        The steps to carry out now, the new state, and the next action time (None: nothing more).
    """
    steps: list[Step] = []
    warnings_sent = state.warnings_sent
    passed = [w for w in warn_at[warnings_sent:] if w <= now]
    if passed:
        if now < due_at:
            steps.append(Step("warning", warnings_sent + len(passed) - 1, passed[-1], "owner"))
        warnings_sent += len(passed)

    breached = state.breached
    if not breached and now >= due_at:
        steps.append(Step("breach", 0, due_at, "team_channel"))
        breached = True

    escalation_step = state.escalation_step
    while escalation_step < len(policy.escalation):
        level = policy.escalation[escalation_step]
        if now < due_at + level.after:
            break
        steps.append(Step("escalation", escalation_step, due_at + level.after, level.notify))
        escalation_step += 1

    nag_level = state.nag_level
    nag_every = policy.nag_every
    if breached and nag_every > timedelta(0):
        slots_passed = int((now - due_at) / nag_every)
        if slots_passed > nag_level and owner_on_duty(now):
            steps.append(Step("nag", slots_passed, due_at + slots_passed * nag_every, "owner"))
            nag_level = slots_passed

    reassignments = state.reassignments
    assigned_at = state.assigned_at
    if policy.claim_within is not None and not state.claimed and assigned_at is not None:
        offer_ends = assigned_at + policy.claim_within
        if now >= offer_ends:
            steps.append(Step("reassign", reassignments, offer_ends, "owner"))
            reassignments += 1
            assigned_at = now

    claimed = state.claimed
    silence = policy.reassign_if_silent
    if silence is not None and claimed and state.owner_active_at is not None:
        silent_since = state.owner_active_at + silence
        if now >= silent_since:
            steps.append(Step("reassign", reassignments, silent_since, "owner"))
            reassignments += 1
            assigned_at = now
            claimed = False

    new_state = replace(
        state,
        claimed=claimed,
        warnings_sent=warnings_sent,
        breached=breached,
        escalation_step=escalation_step,
        nag_level=nag_level,
        reassignments=reassignments,
        assigned_at=assigned_at,
    )

    candidates: list[datetime] = []
    if warnings_sent < len(warn_at) and warn_at[warnings_sent] < due_at:
        candidates.append(warn_at[warnings_sent])
    if not breached:
        candidates.append(due_at)
    if escalation_step < len(policy.escalation):
        candidates.append(due_at + policy.escalation[escalation_step].after)
    if breached and nag_every > timedelta(0):
        next_slot = due_at + (nag_level + 1) * nag_every
        if next_slot <= now:
            # A nag is owed but the owner is off duty: look again when they are back.
            back = owner_next_on_duty(now)
            candidates.append(back if back is not None and back > now else now + nag_every)
        else:
            candidates.append(next_slot)
    if policy.claim_within is not None and not claimed and assigned_at is not None:
        candidates.append(assigned_at + policy.claim_within)
    if silence is not None and claimed and state.owner_active_at is not None:
        candidates.append(state.owner_active_at + silence)
    return Plan(tuple(steps), new_state, min(candidates) if candidates else None)
