"""What staff can do with conversations, as plain functions on a session (nothing here knows Slack).

Every function works inside the caller's transaction and never commits: the Slack request's
session (or a test's ``with ctx.sessions() as s, s.begin():``) decides when. Each state change

- runs inside a savepoint, so a refusal (`StaffError`) leaves the caller's transaction as it was;
- writes an audit `Event` (who, what, when) and a ``card_update`` outbox row, so the Slack card
  follows (the outbox sender renders the card from the row's state when it sends it);
- is refused with `PermissionDenied`, before anything is read or written, when the actor is not
  one of the teams' experts.

Claiming is a single conditional UPDATE, so of any number of simultaneous clicks exactly one
wins, on SQLite (one writer at a time) and on PostgreSQL (a concurrent UPDATE waits for the
winner's row lock, then re-checks ``claimed_by IS NULL`` and finds it false). The other state
changes lock the row first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN
IMMEDIATE`` already serialises writers) and go through the ORM's version counter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, func, or_, select, update
from sqlalchemy.orm import Session

from bot.core.policy import Expert, Policy, format_duration, parse_duration
from bot.flow import conversations
from bot.flow.context import AppContext
from storage import repo
from storage.models import (
    CLOSED,
    LADDER_KINDS,
    OPEN,
    RESOLUTION_KINDS,
    Account,
    Conversation,
    Outbox,
    Post,
)
from storage.models import Expert as ExpertRow

__all__ = [
    "DEFAULT_REPLY_LIMIT",
    "REPLY_LIMITS",
    "ClaimResult",
    "Conflict",
    "InvalidState",
    "NotFound",
    "PermissionDenied",
    "QueueItem",
    "ReplyRejected",
    "ReplyResult",
    "StaffError",
    "TeamStats",
    "away_experts",
    "away_until",
    "back",
    "can_read_team",
    "claim",
    "close",
    "expert_for_slack_user",
    "is_staff",
    "mark_answered",
    "my_queue",
    "reassign",
    "reply",
    "reply_limit",
    "reply_limit_for",
    "require_staff",
    "require_team_reader",
    "set_away",
    "snooze",
    "snooze_until",
    "staff_experts",
    "team_queue",
    "team_stats",
    "teams_of",
    "unclaim",
    "validate_reply",
    "week_start",
]

# The longest public reply each channel takes, in characters (connector kind -> limit). A kind
# not listed (webhook, feed, demo, plug-ins) gets DEFAULT_REPLY_LIMIT.
REPLY_LIMITS: Mapping[str, int] = {"x": 280, "mastodon": 500}
DEFAULT_REPLY_LIMIT = 5000
# Connectors that put "@handle " in front of the reply unless the text already mentions the author.
_MENTION_PREFIXED = frozenset({"mastodon"})

CLOSE_REASON_MAX = 100
TOMORROW = "tomorrow"
_TOMORROW_FALLBACK = time(9, 0)


# --------------------------------------------------------------------------------------------
# Errors: each carries a sentence fit to show the person who asked.


class StaffError(Exception):
    """A staff action was refused; ``str(error)`` says why, in words for the person who asked."""


class PermissionDenied(StaffError):
    """The actor is not staff: nothing was read or changed."""


class NotFound(StaffError):
    """No such conversation."""


class InvalidState(StaffError):
    """The conversation is not in a state that allows the action (closed, already answered...)."""


class Conflict(StaffError):
    """Someone else changed the conversation at the same moment; trying again may work."""


class ReplyRejected(StaffError):
    """The reply cannot go out as written (too long, empty, or the channel takes no replies)."""

    def __init__(self, message: str, *, limit: int | None = None, length: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.length = length


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ClaimResult:
    """The outcome of a click on Claim.

    Attributes:
        won: this expert has it now.
        conversation_id: the conversation.
        claimed_by: who holds it (the winner, or whoever had it already); None when it is
            not claimed (the conversation was answered or closed instead).
        claimed_at: when they claimed it.
        status: the conversation's status after the attempt.
    """

    won: bool
    conversation_id: int
    claimed_by: str | None
    claimed_at: datetime | None
    status: str


@dataclass(frozen=True)
class ReplyResult:
    """A reply queued for the customer."""

    conversation_id: int
    outbox_key: str
    post_id: int
    answered: bool  # this reply answered the conversation (it was open)


@dataclass(frozen=True)
class QueueItem:
    """One conversation in a queue, detached from the database."""

    conversation_id: int
    team: str
    priority: str
    status: str
    owner: str | None
    claimed_by: str | None
    author: str
    text: str
    url: str | None
    due_at: datetime
    next_action_at: datetime | None
    slack_channel: str | None
    slack_ts: str | None

    def overdue(self, now: datetime) -> bool:
        """True once the deadline has passed."""
        return self.due_at < now


@dataclass(frozen=True)
class TeamStats:
    """A team's figures for the current week (Monday 00:00 in the team's time zone until now).

    ``within_sla_share`` is None when nothing was judged this week. Conversations closed
    without a reply are counted apart (``closed_this_week``) and are not in the compliance share.
    """

    team: str
    week_start: datetime
    open: int
    overdue: int
    answered_this_week: int
    answered_within_sla: int
    closed_this_week: int
    # First deadlines that passed this week unanswered or answered late (as the digest counts them).
    breached_this_week: int = 0
    # Resolution target (policy `resolution`): closed after an answer in time this week, and
    # resolution deadlines passed this week unresolved or resolved late.
    resolved_within_target: int = 0
    resolution_breached_this_week: int = 0

    @property
    def within_sla_share(self) -> float | None:
        """In time / (in time + breached), as in the digest; None when nothing was judged yet."""
        judged = self.answered_within_sla + self.breached_this_week
        if not judged:
            return None
        return self.answered_within_sla / judged


# --------------------------------------------------------------------------------------------
# Who is staff


def staff_experts(policy: Policy) -> frozenset[str]:
    """Expert ids that may act: every team's experts, on-call person and manager."""
    found: set[str] = set()
    for team in policy.teams.values():
        found.update(team.experts)
        found.update(name for name in (team.on_call, team.manager) if name is not None)
    return frozenset(name for name in found if name in policy.experts)


def expert_for_slack_user(policy: Policy, slack_user_id: str) -> Expert | None:
    """The staff expert behind a Slack member id, if any."""
    allowed = staff_experts(policy)
    for expert in policy.experts.values():
        if expert.slack_id == slack_user_id and expert.id in allowed:
            return expert
    return None


def is_staff(policy: Policy, slack_user_id: str) -> bool:
    """True when the Slack member is one of the teams' experts."""
    return expert_for_slack_user(policy, slack_user_id) is not None


def require_staff(policy: Policy, slack_user_id: str) -> str:
    """The expert id of a Slack member; raises `PermissionDenied` for anyone else."""
    expert = expert_for_slack_user(policy, slack_user_id)
    if expert is None:
        raise PermissionDenied("Only replyclock staff (the teams' experts) can do that.")
    return expert.id


def teams_of(policy: Policy, expert_id: str) -> tuple[str, ...]:
    """The teams an expert works in (as expert, on-call or manager), in policy order."""
    return tuple(
        name
        for name, team in policy.teams.items()
        if expert_id in team.experts or expert_id in (team.on_call, team.manager)
    )


def can_read_team(policy: Policy, expert_id: str, team: str) -> bool:
    """Whether an expert may read a team's queue and figures: only the teams they work in.

    Working in a team means being one of its experts, its on-call person or its manager, so a
    manager reads the queues of the teams they manage. Acting on a conversation (claim, reply,
    reassign, close...) follows the same rule (`can_act_on_team`) unless the policy sets
    ``cross_team_actions = true``.
    """
    return team in teams_of(policy, expert_id)


def require_team_reader(policy: Policy, expert_id: str, team: str) -> None:
    """Raise `PermissionDenied` unless the expert may read `team`'s queue (`can_read_team`)."""
    if not can_read_team(policy, expert_id, team):
        found = policy.teams.get(team)
        label = found.label if found is not None else team
        mine = ", ".join(teams_of(policy, expert_id)) or "none"
        raise PermissionDenied(
            f"You can only see the queues of your own teams ({mine}); {label} is not one of them."
        )


def can_act_on_team(policy: Policy, expert_id: str, team: str) -> bool:
    """Whether an expert may act on (claim, reply to, close...) a conversation of `team`.

    Its own experts, its manager and its on-call may; others only when the policy says
    ``cross_team_actions = true`` (a misrouted conversation is then handed across from its card;
    otherwise its team's manager or on-call reassigns it).
    """
    found = policy.teams.get(team)
    if found is None:
        return policy.settings.cross_team_actions
    return (
        expert_id in found.experts
        or expert_id in (found.on_call, found.manager)
        or policy.settings.cross_team_actions
    )


def require_team_actor(policy: Policy, expert_id: str, conversation: Conversation) -> None:
    """Raise `PermissionDenied` unless the expert may act on `conversation` (`can_act_on_team`)."""
    if not can_act_on_team(policy, expert_id, conversation.team):
        found = policy.teams.get(conversation.team)
        label = found.label if found is not None else conversation.team
        raise PermissionDenied(
            f"#{conversation.id} belongs to {label}, not one of your teams; ask its manager or on-call."
        )


def _require_expert(policy: Policy, expert_id: str) -> None:
    if expert_id not in staff_experts(policy):
        raise PermissionDenied("Only replyclock staff (the teams' experts) can do that.")


def _name(policy: Policy, expert_id: str | None) -> str:
    if expert_id is None:
        return "nobody"
    expert = policy.experts.get(expert_id)
    return expert.name if expert else expert_id


# --------------------------------------------------------------------------------------------
# Shared plumbing


@contextmanager
def _atomic(session: Session) -> Iterator[None]:
    """A savepoint: a refusal half-way leaves the caller's transaction untouched."""
    with session.begin_nested():
        yield


@contextmanager
def _acting_on(
    session: Session, ctx: AppContext, conversation_id: int, expert_id: str
) -> Iterator[Conversation]:
    """The shape of every action on a conversation: staff only (`PermissionDenied` before
    anything is read), in a savepoint (a refusal leaves the caller's transaction as it was),
    on the row locked once the expert may act on its team (`_locked`)."""
    _require_expert(ctx.policy, expert_id)
    with _atomic(session):
        yield _locked(session, conversation_id, ctx, expert_id)


def _locked(session: Session, conversation_id: int, ctx: AppContext, expert_id: str) -> Conversation:
    """The conversation, row-locked on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises),
    once `expert_id` is known to be allowed to act on its team (`require_team_actor`)."""
    conversation = session.scalars(
        select(Conversation)
        .where(Conversation.id == conversation_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if conversation is None:
        raise NotFound(f"Conversation #{conversation_id} does not exist.")
    require_team_actor(ctx.policy, expert_id, conversation)
    return conversation


def _card_update(
    session: Session, conversation: Conversation, reason: str, now: datetime, **extra: Any
) -> None:
    """Queue the card's refresh; one row per version, so every change gets its own."""
    session.flush()
    repo.enqueue(
        session=session,
        kind="card_update",
        key=f"conv:{conversation.id}:card:v{conversation.version}",
        payload={"conversation_id": conversation.id, "reason": reason, **extra},
        conversation_id=conversation.id,
        now=now,
    )


def _changed(
    session: Session,
    conversation: Conversation,
    now: datetime,
    *,
    actor: str,
    action: str,
    card: Mapping[str, object] | None = None,
    **detail: Any,
) -> None:
    """What every state change ends with: its audit event (`action` by `actor`, with `detail`) and
    the card's refresh (reason `action`, with `card` in its payload)."""
    repo.record_event(
        session=session, at=now, actor=actor, action=action, conversation_id=conversation.id, **detail
    )
    _card_update(session, conversation, action, now, **(card or {}))


def _mark_closed(conversation: Conversation, reason: str, now: datetime) -> str:
    """Close the conversation (by staff or after a silent customer); returns the status it had."""
    was = conversation.status
    conversation.status = CLOSED
    conversation.closed_at = now
    conversation.close_reason = reason[:CLOSE_REASON_MAX]
    conversation.next_action_at = None
    return was


def _retire_closed(session: Session, conversation: Conversation, now: datetime) -> None:
    """A closed conversation's unsent ladder and resolution notices are retired (audited)."""
    repo.retire_ladder(
        session=session,
        conversation_ids=[conversation.id],
        reason="closed first",
        now=now,
        kinds=LADDER_KINDS | RESOLUTION_KINDS,
    )


def _restart_offer(ctx: AppContext, session: Session, conversation: Conversation, now: datetime) -> None:
    """An unclaimed owner gets a fresh claim_within window; make sure the sweep looks then."""
    conversation.assigned_at = now
    if conversation.status != OPEN or conversation.owner is None:
        return
    sla = conversations.policy_of(session, ctx, conversation)
    if sla.claim_within is None:
        return
    offer_ends = now + sla.claim_within
    if conversation.next_action_at is None or offer_ends < conversation.next_action_at:
        conversation.next_action_at = offer_ends


def _look_at_shift_end(ctx: AppContext, conversation: Conversation, now: datetime) -> None:
    """Follow the sun: a new owner whose working hours end before the deadline hands it over
    then, so the sweep must look at that moment (not only at the next ladder step)."""
    team = ctx.policy.teams.get(conversation.team)
    if team is None or not team.follow_the_sun or conversation.status != OPEN:
        return
    shift_end = conversations.owner_shift_end(ctx, conversation.owner, now, conversation.due_at)
    if shift_end is not None and (
        conversation.next_action_at is None or shift_end < conversation.next_action_at
    ):
        conversation.next_action_at = shift_end


# --------------------------------------------------------------------------------------------
# Claiming and handing over


def claim(
    session: Session, ctx: AppContext, conversation_id: int, expert_id: str, now: datetime
) -> ClaimResult:
    """Claim an open, unclaimed conversation: the first click wins.

    Args:
        session: the caller's session (inside its transaction).
        ctx: the process context.
        conversation_id: the conversation.
        expert_id: who clicked.
        now: the time of the click.

    Returns:
        ``won=True`` for the winner; for anyone else who holds it and since when.

    Raises:
        PermissionDenied: `expert_id` is not staff.
        NotFound: no such conversation.
    """
    with _acting_on(session, ctx, conversation_id, expert_id):
        statement = (
            update(Conversation)
            .where(
                Conversation.id == conversation_id,
                Conversation.claimed_by.is_(None),
                Conversation.status == OPEN,
            )
            .values(
                claimed_by=expert_id,
                claimed_at=now,
                owner=expert_id,
                assigned_at=now,
                version=Conversation.version + 1,
            )
            .execution_options(synchronize_session=False)
        )
        won = cast(CursorResult[Any], session.execute(statement)).rowcount == 1
        conversation = session.get(Conversation, conversation_id, populate_existing=True)
        if conversation is None:
            raise NotFound(f"Conversation #{conversation_id} does not exist.")
        if won:
            silence = conversations.policy_of(session, ctx, conversation).reassign_if_silent
            if silence is not None:
                # The sweep must look when the owner's silence would run out (reassign_if_silent),
                # counted in their working hours.
                check_at = conversations.owner_hours(ctx, expert_id).working_time_after(now, silence)
                if conversation.next_action_at is None or conversation.next_action_at > check_at:
                    conversation.next_action_at = check_at
            _look_at_shift_end(ctx, conversation, now)
            _changed(
                session, conversation, now, actor=expert_id, action="claimed", card={"claimed_by": expert_id}
            )
        return ClaimResult(
            won=won,
            conversation_id=conversation_id,
            claimed_by=conversation.claimed_by,
            claimed_at=conversation.claimed_at,
            status=conversation.status,
        )


def unclaim(session: Session, ctx: AppContext, conversation_id: int, expert_id: str, now: datetime) -> None:
    """Give a claimed conversation back (it stays with its owner, unclaimed, and may be re-offered).

    Raises:
        PermissionDenied, NotFound: as for `claim`.
        InvalidState: this expert has not claimed it.
    """
    with _acting_on(session, ctx, conversation_id, expert_id) as conversation:
        if conversation.claimed_by != expert_id:
            holder = conversation.claimed_by
            raise InvalidState(
                "You have not claimed this conversation."
                if holder is None
                else f"It is claimed by {_name(ctx.policy, holder)}, not you."
            )
        conversation.claimed_by = None
        conversation.claimed_at = None
        _restart_offer(ctx, session, conversation, now)
        _look_at_shift_end(ctx, conversation, now)
        _changed(session, conversation, now, actor=expert_id, action="unclaimed")


def reassign(
    session: Session, ctx: AppContext, conversation_id: int, expert_id: str, to_expert: str, now: datetime
) -> None:
    """Hand a conversation to another expert; they own it unclaimed until they claim it.

    Raises:
        PermissionDenied, NotFound: as for `claim`.
        InvalidState: `to_expert` is not one of the teams' experts, already owns it, or the
            conversation is closed.
    """
    with _acting_on(session, ctx, conversation_id, expert_id) as conversation:
        if to_expert not in staff_experts(ctx.policy):
            raise InvalidState(f"{to_expert} is not a replyclock expert.")
        if conversation.status == CLOSED:
            raise InvalidState("This conversation is closed.")
        previous = conversation.owner
        if previous == to_expert:
            raise InvalidState(f"It is already {_name(ctx.policy, to_expert)}'s.")
        conversation.owner = to_expert
        conversation.claimed_by = None
        conversation.claimed_at = None
        _restart_offer(ctx, session, conversation, now)
        _look_at_shift_end(ctx, conversation, now)
        _changed(
            session,
            conversation,
            now,
            actor=expert_id,
            action="reassigned",
            card={"owner": to_expert, "previous_owner": previous},
            previous_owner=previous,
            owner=to_expert,
        )


# --------------------------------------------------------------------------------------------
# Reminders and closing


def snooze_until(ctx: AppContext, expert_id: str, choice: str, now: datetime) -> datetime:
    """When a snooze choice ends: a duration (``"30m"``, ``"1h"``, ``"4h"``) from now, or
    ``"tomorrow"``: the expert's first working moment tomorrow (09:00 their time if they have none).

    Raises:
        InvalidState: not a duration nor "tomorrow".
    """
    if choice == TOMORROW:
        expert = ctx.policy.experts.get(expert_id)
        if expert is None:
            return now + timedelta(days=1)
        calendar = ctx.expert_calendar(expert_id)
        tomorrow = now.astimezone(calendar.tz).date() + timedelta(days=1)
        midnight = datetime.combine(tomorrow, time(0), calendar.tz).astimezone(UTC)
        try:
            return calendar.next_open(midnight)
        except ValueError:
            return datetime.combine(tomorrow, _TOMORROW_FALLBACK, calendar.tz).astimezone(UTC)
    try:
        duration = parse_duration(choice)
    except ValueError as error:
        raise InvalidState(f"Cannot snooze for {choice!r}.") from error
    if duration <= timedelta(0):
        raise InvalidState("A snooze must last a while.")
    return now + duration


def snooze(
    session: Session, ctx: AppContext, conversation_id: int, expert_id: str, until: datetime, now: datetime
) -> None:
    """Quiet the reminders until `until`: the ladder resumes then; the deadline does not move.

    Raises:
        PermissionDenied, NotFound: as for `claim`.
        InvalidState: the conversation is not open, or `until` is not in the future.
    """
    with _acting_on(session, ctx, conversation_id, expert_id) as conversation:
        if until <= now:
            raise InvalidState("A snooze must end in the future.")
        if conversation.status != OPEN:
            raise InvalidState(f"This conversation is {conversation.status}: there is nothing to snooze.")
        previous = conversation.next_action_at
        conversation.next_action_at = until
        _changed(
            session,
            conversation,
            now,
            actor=expert_id,
            action="snoozed",
            card={"until": until.isoformat()},
            until=until.isoformat(),
            previous_next_action_at=previous.isoformat() if previous else None,
        )


def wait_on_customer(
    session: Session, ctx: AppContext, conversation_id: int, expert_id: str, now: datetime
) -> datetime | None:
    """Staff wait on the customer: the response and resolution clocks pause (and the reminders
    stop) until the customer writes again; with the policy's `close_after_silence`, the sweep
    closes the conversation after that much silence. Returns when that would be, else None.

    Raises:
        PermissionDenied, NotFound: as for `claim`.
        InvalidState: the conversation is closed or already waiting.
    """
    with _acting_on(session, ctx, conversation_id, expert_id) as conversation:
        if conversation.status == CLOSED:
            raise InvalidState("This conversation is closed: there is nobody to wait for.")
        if conversation.waiting_since is not None:
            raise InvalidState("This conversation is already waiting on the customer.")
        sla = conversations.policy_of(session, ctx, conversation)
        conversation.waiting_since = now
        close_at = now + sla.close_after_silence if sla.close_after_silence is not None else None
        conversation.next_action_at = close_at
        _changed(
            session,
            conversation,
            now,
            actor=expert_id,
            action="waiting",
            close_at=close_at.isoformat() if close_at else None,
        )
        return close_at


def close_silent(session: Session, ctx: AppContext, conversation: Conversation, now: datetime) -> bool:
    """Close a conversation that waited on a silent customer for the policy's `close_after_silence`
    (the sweep calls this); the card says why. Returns whether it closed."""
    sla = conversations.policy_of(session, ctx, conversation)
    since = conversation.waiting_since
    if since is None or sla.close_after_silence is None or conversation.status == CLOSED:
        conversation.next_action_at = None if since is not None else conversation.next_action_at
        return False
    if now < since + sla.close_after_silence:
        conversation.next_action_at = since + sla.close_after_silence
        return False
    was = _mark_closed(
        conversation, f"no word from the customer for {format_duration(sla.close_after_silence)}", now
    )
    _retire_closed(session, conversation, now)
    _changed(
        session,
        conversation,
        now,
        actor="sweep",
        action="closed",
        card={"close_reason": conversation.close_reason},
        reason=conversation.close_reason,
        was=was,
        waiting_since=since.isoformat(),
    )
    return True


def mark_answered(
    session: Session, ctx: AppContext, conversation_id: int, expert_id: str, now: datetime
) -> None:
    """Staff say it was answered elsewhere (phone, e-mail, by hand on the platform): the
    response is stamped now, the ladder stops, the card follows.

    Raises:
        PermissionDenied, NotFound: as for `claim`.
        InvalidState: the conversation is not open.
    """
    with _acting_on(session, ctx, conversation_id, expert_id) as conversation:
        if conversation.status != OPEN:
            raise InvalidState(f"This conversation is already {conversation.status}.")
        conversations.mark_answered(session, conversation, at=now, by=expert_id, now=now)


def close(
    session: Session, ctx: AppContext, conversation_id: int, expert_id: str, reason: str, now: datetime
) -> None:
    """Close without (further) reply, with a reason; a conversation closed unanswered leaves
    the compliance figures (it is counted apart).

    Raises:
        PermissionDenied, NotFound: as for `claim`.
        InvalidState: already closed, or no reason given.
    """
    reason = reason.strip()
    with _acting_on(session, ctx, conversation_id, expert_id) as conversation:
        if not reason:
            raise InvalidState("Say why it is closed.")
        if conversation.status == CLOSED:
            raise InvalidState("This conversation is already closed.")
        was = _mark_closed(conversation, reason, now)
        _changed(
            session,
            conversation,
            now,
            actor=expert_id,
            action="closed",
            card={"close_reason": conversation.close_reason},
            reason=conversation.close_reason,
            was=was,
        )
        # After the card: the same rows as retiring first (the card is no ladder row) and the
        # audit trail in the same order (closed, then ladder_retired).
        _retire_closed(session, conversation, now)


# --------------------------------------------------------------------------------------------
# Replying


def reply_limit(kind: str) -> int:
    """The longest reply a connector kind takes, in characters."""
    return REPLY_LIMITS.get(kind, DEFAULT_REPLY_LIMIT)


def _reply_length(kind: str, text: str, author_handle: str | None) -> int:
    """Characters the platform will count: the connector's own ``@handle`` prefix included."""
    length = len(text)
    if kind in _MENTION_PREFIXED and author_handle:
        mention = "@" + author_handle.lstrip("@")
        if mention.casefold() not in text.casefold():
            length += len(mention) + 1
    return length


def _reply_target(session: Session, ctx: AppContext, conversation: Conversation) -> tuple[Account, int]:
    """The account to answer on and the limit there; raises `ReplyRejected` if it takes no replies."""
    account = session.get(Account, conversation.account_id)
    if account is None:
        raise InvalidState("This conversation's account is gone.")
    configured = ctx.policy.accounts.get(account.name)
    if configured is not None and not configured.can_reply:
        raise ReplyRejected(f"replyclock cannot reply on {account.name}; answer there by hand.")
    kind = configured.kind if configured is not None else account.kind
    return account, reply_limit(kind)


def reply_limit_for(session: Session, ctx: AppContext, conversation: Conversation) -> int:
    """The longest reply the conversation's channel takes (for the reply modal's ``max_length``).

    Raises:
        ReplyRejected: the channel takes no replies from replyclock.
    """
    return _reply_target(session, ctx, conversation)[1]


def validate_reply(session: Session, ctx: AppContext, conversation_id: int, text: str) -> int:
    """Check a reply without writing anything; returns the channel's limit.

    Raises:
        NotFound: no such conversation.
        InvalidState: the conversation is closed.
        ReplyRejected: empty, too long for the channel, or the channel takes no replies.
    """
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise NotFound(f"Conversation #{conversation_id} does not exist.")
    if conversation.status == CLOSED:
        raise InvalidState("This conversation is closed; reopen it by hand before replying.")
    account, limit = _reply_target(session, ctx, conversation)
    configured = ctx.policy.accounts.get(account.name)
    kind = configured.kind if configured is not None else account.kind
    body = text.strip()
    if not body:
        raise ReplyRejected("Write something to send.", limit=limit, length=0)
    length = _reply_length(kind, body, conversation.author_handle)
    if length > limit:
        raise ReplyRejected(
            f"Too long for {account.name}: {length} characters, the limit is {limit} "
            f"({length - limit} over).",
            limit=limit,
            length=length,
        )
    return limit


def reply(
    session: Session, ctx: AppContext, conversation_id: int, expert_id: str, text: str, now: datetime
) -> ReplyResult:
    """Queue a public reply to the customer and mark the conversation answered, together.

    The outbox row (kind ``reply``, key ``conv:{id}:reply:{n}``) is written in the caller's
    transaction with the answer stamp and the events: either all of it commits or none. The
    outbox sender then posts it through the conversation's connector, at most once.

    Raises:
        PermissionDenied, NotFound: as for `claim`.
        InvalidState: the conversation is closed or has no customer post to answer.
        ReplyRejected: empty, too long for the channel, or the channel takes no replies;
            nothing is written.
        Conflict: another reply to it was queued at the same moment.
    """
    with _acting_on(session, ctx, conversation_id, expert_id) as conversation:
        validate_reply(session, ctx, conversation_id, text)
        account, _limit = _reply_target(session, ctx, conversation)
        post_id = session.scalar(
            select(Post.id)
            .where(Post.conversation_id == conversation_id, Post.direction == "in")
            .order_by(Post.posted_at.desc(), Post.id.desc())
            .limit(1)
        )
        if post_id is None:
            raise InvalidState("There is no customer post to answer.")
        earlier = session.scalar(
            select(func.count())
            .select_from(Outbox)
            .where(Outbox.conversation_id == conversation_id, Outbox.kind == "reply")
        )
        key = f"conv:{conversation_id}:reply:{(earlier or 0) + 1}"
        body = text.strip()
        written = repo.enqueue(
            session=session,
            kind="reply",
            key=key,
            payload={
                "conversation_id": conversation_id,
                "post_id": post_id,
                "account": account.name,
                "text": body,
            },
            conversation_id=conversation_id,
            now=now,
        )
        if not written:
            raise Conflict("Another reply to this conversation was just queued; check the thread first.")
        repo.record_event(
            session=session,
            at=now,
            actor=expert_id,
            action="reply_queued",
            conversation_id=conversation_id,
            outbox_key=key,
            post_id=post_id,
            length=len(body),
        )
        answered = conversation.status == OPEN
        if answered:
            conversations.mark_answered(session, conversation, at=now, by=expert_id, now=now)
        else:
            _card_update(session, conversation, "replied", now, by=expert_id)
        return ReplyResult(
            conversation_id=conversation_id, outbox_key=key, post_id=post_id, answered=answered
        )


# --------------------------------------------------------------------------------------------
# Away and back


def _expert_row(session: Session, ctx: AppContext, expert_id: str) -> ExpertRow:
    row = session.get(ExpertRow, expert_id, with_for_update=True)
    if row is None:
        expert = ctx.policy.experts[expert_id]
        row = ExpertRow(id=expert_id, name=expert.name, slack_id=expert.slack_id, active=True)
        session.add(row)
    return row


MAX_AWAY = timedelta(days=366)


def set_away(session: Session, ctx: AppContext, expert_id: str, until: date, now: datetime) -> datetime:
    """Away through `until` (a date in the expert's own time zone): routing skips them till then.

    Returns:
        The instant they count as back (midnight after `until`, their time, in UTC).

    Raises:
        PermissionDenied: not staff.
        InvalidState: `until` is already past in their time zone.
    """
    _require_expert(ctx.policy, expert_id)
    tz = ctx.expert_calendar(expert_id).tz
    today = now.astimezone(tz).date()
    if until < today:
        raise InvalidState(f"{until.isoformat()} is in the past.")
    if until > today + MAX_AWAY:
        # Also keeps the date arithmetic below in range (9999-12-31 + 1 day overflowed: HTTP 500).
        raise InvalidState(
            f"{until.isoformat()} is more than {MAX_AWAY.days} days away; pick a date within a year "
            "and set it again later if needed."
        )
    back_at = datetime.combine(until + timedelta(days=1), time(0), tz).astimezone(UTC)
    with _atomic(session):
        row = _expert_row(session, ctx, expert_id)
        row.away_until = back_at
        repo.record_event(
            session=session,
            at=now,
            actor=expert_id,
            action="away",
            until=until.isoformat(),
            back_at=back_at.isoformat(),
        )
    return back_at


def back(session: Session, ctx: AppContext, expert_id: str, now: datetime) -> bool:
    """Back at work now; returns whether they were away.

    Raises:
        PermissionDenied: not staff.
    """
    _require_expert(ctx.policy, expert_id)
    with _atomic(session):
        row = _expert_row(session, ctx, expert_id)
        was_away = row.away_until is not None and row.away_until > now
        row.away_until = None
        repo.record_event(session=session, at=now, actor=expert_id, action="back", was_away=was_away)
    return was_away


def away_experts(session: Session, now: datetime) -> frozenset[str]:
    """Experts who said they are away at `now` (for routing's ``exclude``)."""
    return repo.away_experts(session=session, now=now)


def away_until(session: Session, expert_id: str, now: datetime) -> datetime | None:
    """When an expert who is away now comes back; None when they are not away."""
    row = session.get(ExpertRow, expert_id)
    if row is None or row.away_until is None or row.away_until <= now:
        return None
    return row.away_until


# --------------------------------------------------------------------------------------------
# Queues and figures


def _queue(session: Session, *conditions: ColumnElement[bool]) -> list[QueueItem]:
    found = list(
        session.scalars(
            select(Conversation).where(*conditions).order_by(Conversation.due_at, Conversation.id)
        )
    )
    if not found:
        return []
    first_posts: dict[int, Post] = {}
    post: Post | None
    for post in session.scalars(
        select(Post)
        .where(Post.conversation_id.in_([c.id for c in found]), Post.direction == "in")
        .order_by(Post.posted_at.desc(), Post.id.desc())
    ):
        assert post.conversation_id is not None
        first_posts[post.conversation_id] = post  # the oldest wins: rows come newest first
    items = []
    for conversation in found:
        post = first_posts.get(conversation.id)
        items.append(
            QueueItem(
                conversation_id=conversation.id,
                team=conversation.team,
                priority=conversation.priority,
                status=conversation.status,
                owner=conversation.owner,
                claimed_by=conversation.claimed_by,
                author=conversation.author_handle or conversation.author_name or conversation.author_id,
                text=post.text if post else "",
                url=post.url if post else None,
                due_at=conversation.due_at,
                next_action_at=conversation.next_action_at,
                slack_channel=conversation.slack_channel,
                slack_ts=conversation.slack_ts,
            )
        )
    return items


def my_queue(session: Session, expert_id: str) -> list[QueueItem]:
    """Open conversations an expert owns or has claimed, soonest deadline first."""
    return _queue(
        session,
        Conversation.status == OPEN,
        or_(Conversation.owner == expert_id, Conversation.claimed_by == expert_id),
    )


def team_queue(session: Session, team: str) -> list[QueueItem]:
    """A team's open conversations, soonest deadline first."""
    return _queue(session, Conversation.status == OPEN, Conversation.team == team)


# How far back the stats look for old rows whose first deadline was never stored.
_STATS_LOOKBACK = timedelta(days=60)


def week_start(ctx: AppContext, team: str, now: datetime) -> datetime:
    """Monday 00:00 of the current week in the team's time zone, in UTC."""
    tz = ctx.calendar(ctx.policy.teams[team].calendar).tz
    today = now.astimezone(tz).date()
    monday = today - timedelta(days=today.weekday())
    return datetime.combine(monday, time(0), tz).astimezone(UTC)


def team_stats(session: Session, ctx: AppContext, team: str, now: datetime) -> TeamStats:
    """Open and overdue now; first responses, their verdicts and closed unanswered this week.

    The verdicts come from `bot.core.sla_outcome` on the first-response deadline, exactly as in
    the weekly digest: answered in time this week, or first deadline passed unanswered (or
    answered late) this week.

    Raises:
        KeyError: no such team.
    """
    start = week_start(ctx, team, now)

    def count(*conditions: Any) -> int:
        return (
            session.scalar(
                select(func.count()).select_from(Conversation).where(Conversation.team == team, *conditions)
            )
            or 0
        )

    candidates = session.scalars(
        select(Conversation).where(
            Conversation.team == team,
            Conversation.opened_at <= now,
            or_(
                Conversation.first_response_at >= start,
                Conversation.first_due_at >= start,
                Conversation.resolution_due_at >= start,
                Conversation.closed_at >= start,
                # Rows from before the first deadline was stored, past their first cycle.
                (Conversation.first_due_at.is_(None) & (Conversation.opened_at >= start - _STATS_LOOKBACK)),
            ),
        )
    )
    answered = within = breached = resolved_within = resolution_breached = 0
    for conversation in candidates:
        outcome = conversations.first_response_outcome(session, ctx, conversation, now)
        responded = conversation.first_response_at
        if responded is not None and start <= responded <= now:
            answered += 1
            within += outcome.within
        if start <= outcome.due_at < now and outcome.breached:
            breached += 1
        resolution = conversations.resolution_verdict(conversation, now)
        if resolution is not None:
            closed = conversation.closed_at
            if resolution.within and closed is not None and start <= closed <= now:
                resolved_within += 1
            if resolution.breached and start <= resolution.due_at < now:
                resolution_breached += 1
    return TeamStats(
        team=team,
        week_start=start,
        open=count(Conversation.status == OPEN),
        overdue=count(
            Conversation.status == OPEN, Conversation.due_at < now, Conversation.waiting_since.is_(None)
        ),
        answered_this_week=answered,
        answered_within_sla=within,
        breached_this_week=breached,
        resolved_within_target=resolved_within,
        resolution_breached_this_week=resolution_breached,
        closed_this_week=count(
            Conversation.status == CLOSED,
            Conversation.closed_at >= start,
            Conversation.first_response_at.is_(None),
        ),
    )
