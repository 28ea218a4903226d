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
  owner who claimed it neither answered nor acted for reassign_if_silent of their own working
  hours (the claim is released).

The resolution ladder (`resolution_plan`, policy `resolution`) runs beside the cycles, from the
opening until staff close the conversation: a warning in the card's thread when the policy's
warn_at share of the resolution target has been used, and a breach notice at the resolution
deadline. Its clock stands still while staff wait on the customer (the sweep does not plan it
then) and it is retired when the conversation is closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from bot.core.policy import EscalationTarget, SlaPolicy

StepKind = Literal[
    "warning", "breach", "escalation", "nag", "reassign", "resolution_warning", "resolution_breach"
]


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
    owner_working_time_after: Callable[[datetime, timedelta], datetime] | None = None,
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
        owner_working_time_after: the instant when the owner has worked a duration since a time
            (their own working hours), for reassign_if_silent; None: wall time.

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
    silent_since: datetime | None = None
    if silence is not None and claimed and state.owner_active_at is not None:
        # Silence is counted in the owner's working hours: a claim at 17:55 is not silent overnight.
        silent_since = (
            owner_working_time_after(state.owner_active_at, silence)
            if owner_working_time_after is not None
            else state.owner_active_at + silence
        )
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
    if claimed and silent_since is not None:
        candidates.append(silent_since)
    return Plan(tuple(steps), new_state, min(candidates) if candidates else None)


@dataclass(frozen=True)
class ResolutionPlan:
    """The resolution ladder's steps due now, what has been sent after them, and its next moment."""

    steps: tuple[Step, ...]
    warnings_sent: int
    breach_sent: bool
    next_action_at: datetime | None


def resolution_plan(
    *,
    due_at: datetime,
    target: timedelta,
    warn_at: tuple[float, ...],
    warnings_sent: int,
    breach_sent: bool,
    now: datetime,
    left_on_clock: Callable[[datetime], timedelta],
    clock_after: Callable[[datetime, timedelta], datetime],
) -> ResolutionPlan:
    """Decide the resolution notices due at `now` (call it only while the clock runs: not while
    waiting on the customer, not once closed).

    The warnings come at the policy's warn_at shares of the target, measured on the target's
    clock as the time used so far (target minus what is left until `due_at`), so a wait that
    moved the deadline moves the warnings with it. As in `plan`, warnings whose moment passed
    together give one notice, and none once the deadline has passed (the breach notice says more).

    Args:
        due_at: the resolution deadline (moved on by the waits so far).
        target: the policy's resolution target.
        warn_at: the policy's warning shares (0 < share < 1; others are ignored).
        warnings_sent: resolution warnings already sent.
        breach_sent: whether the breach notice was already sent.
        now: the current time.
        left_on_clock: the time on the target's clock from an instant to `due_at`.
        clock_after: the instant a duration on the target's clock after an instant.

    Returns:
        The steps (kinds ``resolution_warning`` and ``resolution_breach``, for the owner in the
        card's thread), the new counts and the next instant to look again (None: nothing more).
    """
    shares = sorted({share for share in warn_at if 0.0 < share < 1.0})
    steps: list[Step] = []
    if now >= due_at:
        if not breach_sent:
            steps.append(Step("resolution_breach", 0, due_at, "owner"))
        return ResolutionPlan(tuple(steps), max(warnings_sent, len(shares)), True, None)
    used = target - left_on_clock(now)
    passed = sum(1 for share in shares if target * share <= used)
    if passed > warnings_sent:
        steps.append(Step("resolution_warning", passed - 1, now, "owner"))
        warnings_sent = passed
    next_at = due_at
    if warnings_sent < len(shares):
        next_at = min(due_at, clock_after(now, target * shares[warnings_sent] - used))
    return ResolutionPlan(tuple(steps), warnings_sent, breach_sent, next_at)


def step_key(conversation_id: int, cycle: int, step: Step) -> str:
    """The idempotency key of a step's outbox row: unique per conversation, cycle and step (the
    resolution ladder runs once per conversation, whatever the cycle)."""
    if step.kind.startswith("resolution_"):
        return f"conv:{conversation_id}:resolution:{step.kind.removeprefix('resolution_')}:{step.index}"
    return f"conv:{conversation_id}:c{cycle}:{step.kind}:{step.index}"
