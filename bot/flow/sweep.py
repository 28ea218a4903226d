"""The sweep: claim conversations whose next_action_at has come and climb their ladder.

Claiming is the database's job, so any number of processes can sweep one PostgreSQL:
rows are taken with ``FOR UPDATE SKIP LOCKED`` (a row another sweeper holds is skipped,
one it has just finished no longer matches), and every step's outbox row carries an
idempotency key unique per conversation, cycle and step as a second guard. On SQLite the
transaction starts with ``BEGIN IMMEDIATE`` (see storage.db): one sweeper at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import Row, Table, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from bot.core.ladder import LadderState, Plan, ResolutionPlan, Step, plan, resolution_plan, step_key
from bot.core.policy import SlaPolicy
from bot.core.routing import OwnerChoice, choose_owner
from bot.core.sla import Deadline, add_on_clock, elapsed
from bot.flow import staff
from bot.flow.context import AppContext
from bot.flow.conversations import (
    OwnerHours,
    current_deadline,
    deadline_for,
    owner_hours,
    owner_shift_end,
    policy_of,
)
from storage import repo
from storage.db import is_postgres
from storage.models import (
    ANSWERED,
    DEFAULT_URGENCY,
    HOLDS_NOTHING_BACK,
    LANE_FREE_KINDS,
    OPEN,
    PENDING,
    URGENCY,
    Account,
    Conversation,
    Event,
    Outbox,
)

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
    """Process every conversation due now, in batches of `batch_size`, each batch one transaction.

    A batch is worked set-wise: its conversations are claimed as plain rows, the ladder is planned
    for each in memory, then its outbox rows, audit events and conversation updates are written with
    a handful of statements (executemany) in one savepoint. Should that fail, the batch falls back to
    one conversation at a time, each in its own savepoint, so one bad conversation cannot stop the rest.
    """
    result = SweepResult()
    batches = 0
    cache = _Cache(ctx)
    while max_batches is None or batches < max_batches:
        batches += 1
        now = ctx.clock.now()
        with ctx.sessions() as session, session.begin():
            claimed = _claim(session, now, batch_size)
            _process_batch(session, ctx, cache, claimed, now, result)
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
    """Notify owner and team (once per cycle) when an open conversation of a team with
    ``at_risk = true`` is likely to miss its deadline (bot.sim.forecast), before any warning."""
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
            if found is None or not found.at_risk:
                continue
            key = f"conv:{conversation.id}:c{conversation.cycle}:at_risk"
            payload: dict[str, object] = {
                "conversation_id": conversation.id,
                "owner": conversation.owner,
                "forecast_at": found.at.isoformat(),
                "due_at": conversation.due_at.isoformat(),
            }
            if _enqueue_audited(
                session,
                "at_risk",
                key,
                payload,
                conversation.id,
                now,
                forecast_at=found.at.isoformat(),
                ahead=found.ahead,
                chance=round(found.chance, 2),
            ):
                notified += 1
    return notified


# What the sweep reads of a claimed conversation (plain rows: no ORM identity map, no flush).
_CLAIMED = (
    Conversation.id,
    Conversation.account_id,
    Conversation.team,
    Conversation.priority,
    Conversation.policy,
    Conversation.owner,
    Conversation.assigned_at,
    Conversation.claimed_by,
    Conversation.cycle,
    Conversation.cycle_started_at,
    Conversation.due_at,
    Conversation.breach_cycle,
    Conversation.breached_at,
    Conversation.warnings_sent,
    Conversation.nag_level,
    Conversation.escalation_step,
    Conversation.reassignments,
    Conversation.next_action_at,
    Conversation.version,
    Conversation.status,
    Conversation.waiting_since,
    Conversation.resolution_due_at,
    Conversation.resolution_warnings_sent,
    Conversation.resolution_breach_sent,
)


def _claim(session: Session, now: datetime, limit: int) -> list[Row[Any]]:
    query = (
        select(*_CLAIMED)
        .where(
            Conversation.next_action_at <= now,
            # Answered ones carry a next_action_at only for their resolution ladder.
            or_(
                Conversation.status.in_((OPEN, ANSWERED)),
                Conversation.waiting_since.is_not(None),
            ),
        )
        .order_by(Conversation.next_action_at)
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    return list(session.execute(query))


def _resolution(
    ctx: AppContext,
    sla: SlaPolicy,
    team: str,
    *,
    due_at: datetime | None,
    warnings_sent: int,
    breach_sent: bool,
    now: datetime,
) -> ResolutionPlan | None:
    """The resolution ladder of a conversation whose clocks run (None: no resolution target)."""
    if due_at is None or sla.resolution is None:
        return None
    calendar = ctx.policy_calendar(sla, team) if sla.clock == "business" else None
    return resolution_plan(
        due_at=due_at,
        target=sla.resolution,
        warn_at=sla.warn_at,
        warnings_sent=warnings_sent,
        breach_sent=breach_sent,
        now=now,
        left_on_clock=lambda at: elapsed(sla, calendar, at, due_at),
        clock_after=lambda at, amount: add_on_clock(sla, calendar, at, amount),
    )


def _earliest(*instants: datetime | None) -> datetime | None:
    found = [at for at in instants if at is not None]
    return min(found) if found else None


class _Cache:
    """Pure look-ups repeated across one sweep: policies by name and deadlines by cycle start."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.by_name: dict[str, SlaPolicy] = {}
        for candidate in ctx.policy.policies:  # the first of a name wins, as in policy_of
            self.by_name.setdefault(candidate.name, candidate)
        self.matched: dict[tuple[int, str, str], SlaPolicy] = {}
        self.deadlines: dict[tuple[int, str, datetime, str], Deadline] = {}

    def policy(self, session: Session, row: Row[Any]) -> SlaPolicy:
        found = self.by_name.get(row.policy)
        if found is not None:
            return found
        key = (row.account_id, row.team, row.priority)
        matched = self.matched.get(key)
        if matched is None:  # its policy left the file: matched afresh, as policy_of does
            account = session.scalar(select(Account.name).where(Account.id == row.account_id))
            matched = self.ctx.policy.policy_for(team=row.team, account=account or "", priority=row.priority)
            self.matched[key] = matched
        return matched

    def deadline(self, sla: SlaPolicy, team: str, start: datetime, cycle: int) -> Deadline:
        kind: Literal["first", "next"] = "first" if cycle == 0 else "next"
        key = (id(sla), team, start, kind)
        found = self.deadlines.get(key)
        if found is None:
            found = self.deadlines[key] = deadline_for(self.ctx, sla, team, start, kind)
        return found


@dataclass
class _Batch:
    """Database look-ups of one batch that reassignment needs, read once and kept current in memory."""

    loads: dict[str, dict[str, int]] = field(default_factory=dict)
    away: frozenset[str] | None = None

    def load_of(self, session: Session, team: str) -> dict[str, int]:
        found = self.loads.get(team)
        if found is None:
            found = self.loads[team] = repo.open_loads(session=session, team=team)
        return found

    def away_experts(self, session: Session, now: datetime) -> frozenset[str]:
        if self.away is None:
            self.away = repo.away_experts(session=session, now=now)
        return self.away

    def moved(self, team: str, previous: str | None, new: str) -> None:
        """A conversation of `team` went from `previous` to `new` (as open_loads would now count)."""
        load = self.loads[team]
        if previous is not None:
            left = load.get(previous, 0) - 1
            if left > 0:
                load[previous] = left
            else:
                load.pop(previous, None)
        load[new] = load.get(new, 0) + 1


@dataclass
class _Decision:
    """The plan for one claimed conversation, not yet written."""

    row: Row[Any]
    steps: tuple[Step, ...]
    payloads: list[dict[str, object]]
    values: dict[str, object]


def _plain_ladder(session: Session, ctx: AppContext, cache: _Cache, row: Row[Any]) -> bool:
    """Whether a claimed conversation needs nothing but the ladders (the set-wise path)."""
    if row.waiting_since is not None or row.status not in (OPEN, ANSWERED):
        return False
    if cache.policy(session, row).reassign_if_silent is not None:
        return False
    team = ctx.policy.teams.get(row.team)
    return not (team is not None and team.follow_the_sun)


def _decide(
    session: Session, ctx: AppContext, cache: _Cache, batch: _Batch, row: Row[Any], now: datetime
) -> _Decision:
    """What apply_ladder would do to one conversation, computed without writing anything."""
    sla = cache.policy(session, row)
    deadline = cache.deadline(sla, row.team, row.cycle_started_at, row.cycle) if row.status == OPEN else None
    ladders = _plan_ladders(ctx, sla, row, deadline, owner_hours(ctx, row.owner), now)
    owner: str | None = row.owner
    assigned_at: datetime | None = row.assigned_at
    payloads: list[dict[str, object]] = []
    for step in ladders.steps:
        payload = _step_payload(ctx, row.id, row.team, step, owner, row.resolution_due_at)
        if step.kind == "reassign":
            new_owner = _reassign(
                ctx,
                payload,
                row.team,
                owner,
                now,
                load=batch.load_of(session, row.team),
                away=batch.away_experts(session, now),
            )
            if new_owner is not None:
                batch.moved(row.team, owner, new_owner)
                owner = new_owner
            assigned_at = now
        payloads.append(payload)
    columns = _response_columns(row, ladders)
    if ladders.resolution is not None:
        columns.update(_resolution_columns(ladders.resolution, ladders.response.next_action_at))
    values: dict[str, object] = {"owner": owner, "assigned_at": assigned_at, **columns}
    return _Decision(row, ladders.steps, payloads, values)


# --- the planner both paths share: what the ladders decide, a step's payload and audit detail ----


@dataclass(frozen=True)
class _Ladders:
    """Both ladders' decision for one conversation at a moment: nothing written yet."""

    response: Plan  # the response ladder (no steps for an answered conversation)
    resolution: ResolutionPlan | None  # None: no resolution target
    breached_before: bool  # the current cycle had breached before this sweep

    @property
    def steps(self) -> tuple[Step, ...]:
        """The steps due now, response ladder first, in the order they are carried out."""
        if self.resolution is None:
            return self.response.steps
        return self.response.steps + self.resolution.steps

    def handed_over(self, now: datetime) -> _Ladders:
        """The ladders after a follow-the-sun handover at `now` (apply_ladder): one reassignment
        more in the response ladder's state, so the columns written count it and the next
        reassignment of the cycle takes the next index (its own idempotency key)."""
        state = self.response.state
        after = replace(
            state, reassignments=state.reassignments + 1, assigned_at=now, claimed=False, owner_active_at=None
        )
        return replace(self, response=replace(self.response, state=after))


def _plan_ladders(
    ctx: AppContext,
    sla: SlaPolicy,
    conversation: Row[Any] | Conversation,
    deadline: Deadline | None,
    hours: OwnerHours,
    now: datetime,
    *,
    owner_active_at: datetime | None = None,
) -> _Ladders:
    """Plan a claimed conversation's ladders: the response ladder while it is open (`deadline`
    is its current cycle's), the resolution ladder while its resolution clock runs.

    `conversation` is a claimed row (the set-wise path) or the ORM object (one at a time); only
    the columns in _CLAIMED are read. `owner_active_at` is for reassign_if_silent (the
    one-at-a-time path reads it when the policy has it)."""
    breached = conversation.breach_cycle == conversation.cycle
    state = LadderState(
        warnings_sent=conversation.warnings_sent,
        breached=breached,
        escalation_step=conversation.escalation_step,
        nag_level=conversation.nag_level,
        reassignments=conversation.reassignments,
        assigned_at=conversation.assigned_at,
        claimed=conversation.claimed_by is not None,
        owner_active_at=owner_active_at,
    )
    if conversation.status == OPEN:
        assert deadline is not None
        response = plan(
            policy=sla,
            due_at=conversation.due_at,
            warn_at=deadline.warn_at if deadline.due_at == conversation.due_at else (),
            state=state,
            now=now,
            owner_on_duty=hours.on_duty,
            owner_next_on_duty=hours.next_on_duty,
            # Only reassign_if_silent counts in the claiming owner's working hours.
            owner_working_time_after=owner_hours(ctx, conversation.claimed_by).working_time_after
            if sla.reassign_if_silent is not None
            else None,
        )
    else:  # answered: only the resolution ladder is left
        response = Plan((), state, None)
    resolution = _resolution(
        ctx,
        sla,
        conversation.team,
        due_at=conversation.resolution_due_at,
        warnings_sent=conversation.resolution_warnings_sent,
        breach_sent=conversation.resolution_breach_sent,
        now=now,
    )
    return _Ladders(response, resolution, breached)


def _response_columns(
    conversation: Row[Any] | Conversation, ladders: _Ladders, *also_next: datetime | None
) -> dict[str, object]:
    """The response ladder's columns after its steps (owner and assigned_at aside: reassignments
    move those as they are carried out); next_action_at also no later than any of `also_next`."""
    state = ladders.response.state
    columns: dict[str, object] = {
        "warnings_sent": state.warnings_sent,
        "escalation_step": state.escalation_step,
        "nag_level": state.nag_level,
        "reassignments": state.reassignments,
    }
    if state.breached and not ladders.breached_before:
        columns["breach_cycle"] = conversation.cycle
        if conversation.breached_at is None:
            columns["breached_at"] = conversation.due_at
    columns["next_action_at"] = _earliest(ladders.response.next_action_at, *also_next)
    return columns


def _resolution_columns(resolution: ResolutionPlan, next_action_at: datetime | None) -> dict[str, object]:
    """The resolution ladder's columns after its steps; next_action_at the earlier of both ladders'."""
    return {
        "resolution_warnings_sent": resolution.warnings_sent,
        "resolution_breach_sent": resolution.breach_sent,
        "next_action_at": _earliest(next_action_at, resolution.next_action_at),
    }


def _step_payload(
    ctx: AppContext,
    conversation_id: int,
    team: str,
    step: Step,
    owner: str | None,
    resolution_due_at: datetime | None,
) -> dict[str, object]:
    """A ladder step's outbox payload (a reassignment's new owner is filled in by _reassign)."""
    payload: dict[str, object] = {
        "conversation_id": conversation_id,
        "step": step.kind,
        "index": step.index,
        "notify": step.notify,
        "scheduled_at": step.scheduled_at.isoformat(),
        "owner": owner,
    }
    if step.kind.startswith("resolution_"):
        payload["resolution_due_at"] = (
            resolution_due_at.isoformat() if resolution_due_at is not None else None
        )
    if step.kind == "escalation" and step.notify == "manager":
        payload["manager"] = ctx.policy.teams[team].manager
    if step.kind == "escalation" and step.notify == "on_call":
        payload["on_call"] = ctx.policy.teams[team].on_call
    return payload


def _choose_other(
    ctx: AppContext,
    team: str,
    previous: str | None,
    now: datetime,
    *,
    load: dict[str, int],
    away: frozenset[str],
) -> OwnerChoice:
    """Who of the team should take a conversation from `previous` (never them, nor anyone away)."""
    return choose_owner(
        ctx.policy,
        team=team,
        topics=(),
        at=now,
        load=load,
        last_assigned=previous,
        exclude=away | ({previous} if previous else set()),
    )


def _reassign(
    ctx: AppContext,
    payload: dict[str, object],
    team: str,
    previous: str | None,
    now: datetime,
    *,
    load: dict[str, int],
    away: frozenset[str],
) -> str | None:
    """A reassign step: the new owner (None: nobody else is on duty, it stays), said in `payload`."""
    choice = _choose_other(ctx, team, previous, now, load=load, away=away)
    if choice.expert_id is not None and choice.expert_id != previous:
        payload.update(owner=choice.expert_id, previous_owner=previous)
        return choice.expert_id
    payload.update(owner=previous, previous_owner=previous, note="no other expert on duty")
    return None


def _step_detail(step: Step, now: datetime) -> dict[str, object]:
    """The audit event's detail of a ladder step written at `now`."""
    return {
        "index": step.index,
        "notify": step.notify,
        "scheduled_at": step.scheduled_at.isoformat(),
        "lateness_seconds": (now - step.scheduled_at).total_seconds(),
    }


def _log_step(conversation_id: int, step: Step) -> None:
    log.info(
        "ladder step", extra={"conversation_id": conversation_id, "step": step.kind, "index": step.index}
    )


def _process_batch(
    session: Session,
    ctx: AppContext,
    cache: _Cache,
    claimed: Sequence[Row[Any]],
    now: datetime,
    result: SweepResult,
) -> None:
    """Plan every claimed conversation, then write the whole batch set-wise (see sweep).

    Conversations that need more than the plain ladder (waiting on the customer, a policy with
    reassign_if_silent, a follow-the-sun team) go through the ORM one at a time first."""
    plain: list[Row[Any]] = []
    for row in claimed:
        try:
            if _plain_ladder(session, ctx, cache, row):
                plain.append(row)
                continue
            conversation = session.get(Conversation, row.id)
        except Exception:
            _failed(session, row.id, now, result)
            continue
        if conversation is not None:
            _process_one(session, ctx, conversation, now, result)
    batch = _Batch()
    decisions: list[_Decision] = []
    for row in plain:
        try:
            decisions.append(_decide(session, ctx, cache, batch, row, now))
        except Exception:
            _failed(session, row.id, now, result)
    if not decisions:
        return
    try:
        with session.begin_nested():
            _write(session, decisions, now)
    except Exception:
        log.warning("sweep batch write failed; one conversation at a time", exc_info=True)
        for decision in decisions:
            conversation = session.get(Conversation, decision.row.id, populate_existing=True)
            if conversation is None or conversation.status not in (OPEN, ANSWERED):
                continue
            _process_one(session, ctx, conversation, now, result)
        return
    result.processed += len(decisions)
    for decision in decisions:
        for step in decision.steps:
            result.steps[step.kind] = result.steps.get(step.kind, 0) + 1


OUTBOX = cast(Table, Outbox.__table__)
EVENTS = cast(Table, Event.__table__)
CONVERSATIONS = cast(Table, Conversation.__table__)


def _write(session: Session, decisions: Sequence[_Decision], now: datetime) -> None:
    """Write a batch's outbox rows, audit events and conversation updates: a few statements in all.

    The outcome is the one of writing each conversation's steps in order with repo.enqueue (an
    existing idempotency key writes nothing; each urgent row written lends its urgency to the
    earlier unsent rows of its conversation's lane) and then updating the conversation.
    """
    wanted: list[tuple[_Decision, Step, dict[str, object], str]] = [
        (decision, step, payload, step_key(decision.row.id, decision.row.cycle, step))
        for decision in decisions
        for step, payload in zip(decision.steps, decision.payloads, strict=True)
    ]
    existing: set[str] = set()
    if wanted:
        existing = set(
            session.scalars(
                select(Outbox.idempotency_key).where(
                    Outbox.idempotency_key.in_([key for _, _, _, key in wanted])
                )
            )
        )
    to_write = [item for item in wanted if item[3] not in existing]

    # Urgency as enqueue leaves it: a row written takes the lowest urgency of the urgent rows
    # written after it for the same conversation; the rows there before take the lowest of all.
    rows: list[dict[str, Any]] = []
    lowest: dict[int, int] = {}
    for decision, step, payload, key in reversed(to_write):
        own = URGENCY.get(step.kind, DEFAULT_URGENCY)
        later = lowest.get(decision.row.id)
        urgency = own if later is None or step.kind in LANE_FREE_KINDS else min(own, later)
        if own < DEFAULT_URGENCY and step.kind not in LANE_FREE_KINDS:
            lowest[decision.row.id] = own if later is None else min(own, later)
        rows.append(
            {
                "kind": step.kind,
                "conversation_id": decision.row.id,
                "payload": payload,
                "idempotency_key": key,
                "status": PENDING,
                "urgency": urgency,
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
            }
        )
    rows.reverse()
    by_urgency: dict[int, list[int]] = {}
    for conversation_id, urgency in lowest.items():
        by_urgency.setdefault(urgency, []).append(conversation_id)
    for urgency, conversation_ids in sorted(by_urgency.items()):
        session.execute(
            update(OUTBOX)
            .where(
                OUTBOX.c.conversation_id.in_(conversation_ids),
                # `status || ''`: not a term SQLite can look up in ix_outbox_status, so it takes the
                # batch's conversations from ix_outbox_conversation_id instead of reading every
                # pending row of the outbox (11 % of the sweep's time, growing with the outbox).
                OUTBOX.c.status.concat("") == PENDING,
                OUTBOX.c.urgency > urgency,
                OUTBOX.c.kind.not_in((*repo.CUSTOMER_LANE, *HOLDS_NOTHING_BACK)),
            )
            .values(urgency=urgency)
        )

    written: set[str] = set()
    if rows:
        dialect = postgresql if is_postgres(session) else sqlite
        statement = dialect.insert(OUTBOX).on_conflict_do_nothing(index_elements=["idempotency_key"])
        written = set(session.scalars(statement.returning(OUTBOX.c.idempotency_key), rows))

    events: list[dict[str, Any]] = []
    for decision, step, _, key in to_write:
        if key not in written:
            continue
        events.append(
            {
                "conversation_id": decision.row.id,
                "at": now,
                "actor": "sweep",
                "action": step.kind,
                "detail": _step_detail(step, now),
            }
        )
        _log_step(decision.row.id, step)
    if events:
        session.execute(insert(EVENTS), events)
    # One pending nag per conversation: a nag written retires the older unsent ones (repo.enqueue).
    nagged = sorted(
        {decision.row.id for decision, step, _, key in to_write if step.kind == "nag" and key in written}
    )
    if nagged:
        repo.supersede_older(session=session, kind="nag", conversation_ids=nagged)

    # Like the ORM, only the columns that changed are written (nothing at all, and the version kept,
    # when none did), one executemany per set of changed columns: an owner written unchanged would
    # make SQLite rewrite its entry in ix_conversations_owner_status, one more scattered page per
    # conversation among a million open ones.
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for decision in decisions:
        row = decision.row
        changed = {name: value for name, value in decision.values.items() if getattr(row, name) != value}
        if changed:
            by_columns.setdefault(tuple(changed), []).append(
                {"b_id": row.id, "b_version": row.version, "version": row.version + 1, **changed}
            )
    statement = update(CONVERSATIONS).where(
        CONVERSATIONS.c.id == bindparam("b_id"), CONVERSATIONS.c.version == bindparam("b_version")
    )
    for updates in by_columns.values():
        updates.sort(key=lambda values: int(values["b_id"]))  # table order: fewer page visits, one lock order
        done = session.connection().execute(statement, updates)
        if session.get_bind().dialect.supports_sane_multi_rowcount and done.rowcount != len(updates):
            raise StaleDataError(f"sweep: {len(updates) - done.rowcount} conversations changed under it")


def _failed(session: Session, conversation_id: int, now: datetime, result: SweepResult) -> None:
    """One bad conversation must not stop the sweep: log it and look again later."""
    result.failed += 1
    log.exception("sweep failed for conversation", extra={"conversation_id": conversation_id})
    session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(next_action_at=now + RETRY_FAILED_ITEM_AFTER, version=Conversation.version + 1)
        .execution_options(synchronize_session=False)
    )


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
        _failed(session, conversation_id, now, result)


def apply_ladder(
    session: Session, ctx: AppContext, conversation: Conversation, now: datetime
) -> tuple[Step, ...]:
    """Carry out the ladder steps due for one claimed conversation; returns them.

    An open conversation climbs its response ladder (and, on a follow-the-sun team, is handed
    over when its owner's day ends before the deadline); with a resolution target, open or
    answered, it also climbs the resolution ladder. Planned as the set-wise path plans
    (_plan_ladders), written step by step through the ORM."""
    sla = policy_of(session, ctx, conversation)
    hours = owner_hours(ctx, conversation.owner)
    is_open = conversation.status == OPEN
    ladders = _plan_ladders(
        ctx,
        sla,
        conversation,
        current_deadline(session, ctx, conversation) if is_open else None,
        hours,
        now,
        owner_active_at=_owner_active_at(session, conversation)
        if sla.reassign_if_silent is not None
        else None,
    )
    for step in ladders.response.steps:
        _carry_out(session, ctx, conversation, step, now)
    team = ctx.policy.teams.get(conversation.team)
    follow_the_sun = team is not None and team.follow_the_sun and is_open
    if (
        follow_the_sun
        and hours.calendar is not None
        and not any(step.kind == "reassign" for step in ladders.response.steps)
    ):
        back = hours.next_on_duty(now)
        handover = not hours.on_duty(now) and (back is None or back > conversation.due_at)
        if handover and _hand_over(session, ctx, conversation, ladders.response.state.reassignments, now):
            ladders = ladders.handed_over(now)
    # Follow the sun: look again when the (possibly new) owner's working hours end before the deadline.
    shift_end = owner_shift_end(ctx, conversation.owner, now, conversation.due_at) if follow_the_sun else None
    _set_columns(conversation, _response_columns(conversation, ladders, shift_end))
    if ladders.resolution is not None:
        for step in ladders.resolution.steps:
            _carry_out(session, ctx, conversation, step, now)
        _set_columns(conversation, _resolution_columns(ladders.resolution, conversation.next_action_at))
    session.flush()
    return ladders.steps


def _set_columns(conversation: Conversation, columns: dict[str, object]) -> None:
    for name, value in columns.items():
        setattr(conversation, name, value)


def _hand_over(
    session: Session, ctx: AppContext, conversation: Conversation, index: int, now: datetime
) -> bool:
    """Follow the sun: the owner's day ended before the deadline; the next expert on duty takes it,
    as reassignment `index` of the response ladder (the caller counts it in the ladder's state).
    Returns whether it was handed over."""
    previous = conversation.owner
    choice = _choose_other(
        ctx,
        conversation.team,
        previous,
        now,
        load=repo.open_loads(session=session, team=conversation.team),
        away=repo.away_experts(session=session, now=now),
    )
    if choice.expert_id is None or choice.reason != "on_duty":
        return False  # nobody else at work: it stays, and the ladder goes on as usual
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
    return True


def _carry_out(
    session: Session, ctx: AppContext, conversation: Conversation, step: Step, now: datetime
) -> None:
    payload = _step_payload(
        ctx, conversation.id, conversation.team, step, conversation.owner, conversation.resolution_due_at
    )
    if step.kind == "reassign":
        previous = conversation.owner
        if conversation.claimed_by is not None:
            # reassign_if_silent: the owner claimed it but went silent; the claim goes with it.
            payload["reason"] = "silent"
            conversation.claimed_by = None
            conversation.claimed_at = None
        new_owner = _reassign(
            ctx,
            payload,
            conversation.team,
            previous,
            now,
            load=repo.open_loads(session=session, team=conversation.team),
            away=repo.away_experts(session=session, now=now),
        )
        if new_owner is not None:
            conversation.owner = new_owner
        conversation.assigned_at = now
    key = step_key(conversation.id, conversation.cycle, step)
    if _enqueue_audited(session, step.kind, key, payload, conversation.id, now, **_step_detail(step, now)):
        _log_step(conversation.id, step)


def _enqueue_audited(
    session: Session,
    kind: str,
    key: str,
    payload: dict[str, object],
    conversation_id: int,
    now: datetime,
    **detail: object,
) -> bool:
    """Queue a notice of the sweep's (repo.enqueue) and, when it was new, audit it as the sweep's
    `kind` action with `detail`; returns whether it was new."""
    written = repo.enqueue(
        session=session, kind=kind, key=key, payload=payload, conversation_id=conversation_id, now=now
    )
    if written:
        repo.record_event(
            session=session, at=now, actor="sweep", action=kind, conversation_id=conversation_id, **detail
        )
    return written


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
