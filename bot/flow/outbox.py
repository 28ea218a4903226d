"""The outbox sender: deliver what ingest and the sweep wrote, with the right guarantee per kind.

Messages to customers (acknowledgements, replies) go out AT MOST ONCE: a row is marked
`sending` and committed before the platform call. If the process dies during the call,
the row is still `sending` afterwards; recovery turns it into `unknown` and tells staff,
and it is never sent again blindly. A platform answer that proves nothing was posted
(`NotSent`, `RateLimited`) is retried with back-off.

Messages to staff (Slack cards, warnings, nags) go out AT LEAST ONCE: an abandoned
`sending` row goes back to `pending`; Slack-side idempotency (updating the stored card
rather than posting a new one) keeps repeats harmless.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, aliased

from bot.flow.context import AppContext
from bot.telemetry import record_step_delivered
from connectors.base import NotSent, RateLimited
from storage import repo
from storage.db import is_postgres
from storage.models import FAILED, PENDING, SENDING, SENT, UNKNOWN, Outbox

log = logging.getLogger("replyclock.outbox")

CUSTOMER_KINDS = frozenset({"ack", "reply"})
LADDER_KINDS = frozenset({"warning", "breach", "nag", "escalation", "reassign"})
DEFAULT_LEASE = timedelta(minutes=5)
MAX_ATTEMPTS = 8
BASE_BACKOFF = timedelta(seconds=5)
MAX_BACKOFF = timedelta(minutes=30)
# How long a sender waits for the database to record a send's outcome (see OutboxSender._settle).
SETTLE_PATIENCE = timedelta(minutes=2)
SETTLE_FIRST_PAUSE = 0.25  # seconds, doubling
SETTLE_MAX_PAUSE = 5.0


@dataclass(frozen=True)
class OutboxMessage:
    """A claimed outbox row, detached from the database."""

    id: int
    kind: str
    conversation_id: int | None
    payload: Mapping[str, Any]
    idempotency_key: str
    attempts: int


class Retry(Exception):
    """A staff-side delivery failed in a way worth retrying (optionally not before `after`)."""

    def __init__(self, message: str, after: datetime | None = None) -> None:
        super().__init__(message)
        self.after = after


# A handler delivers one message and returns a short result (e.g. the platform's message id).
Handler = Callable[[OutboxMessage], str | None]


@dataclass
class SendResult:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    unknown: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def backoff(attempts: int) -> timedelta:
    """Exponential back-off with full jitter, capped."""
    ceiling = min(BASE_BACKOFF.total_seconds() * 2 ** max(attempts - 1, 0), MAX_BACKOFF.total_seconds())
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


class OutboxSender:
    """Claims due outbox rows and hands each to the handler for its kind."""

    def __init__(
        self,
        ctx: AppContext,
        handlers: Mapping[str, Handler],
        *,
        lease: timedelta = DEFAULT_LEASE,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.lease = lease
        self.max_attempts = max_attempts
        # One send loop per process: the outbox job, a poll and a sweep all call send_due, and a
        # kill must find at most one customer message in flight (see send_due).
        self._sending = threading.Lock()

    def recover(self, *, all_sending: bool = False) -> int:
        """Settle rows left `sending` by a process that died.

        Args:
            all_sending: treat every `sending` row as abandoned (true at start-up on SQLite,
                where only one process sends); otherwise only rows whose lease has expired.

        Returns:
            How many rows were settled.
        """
        now = self.ctx.clock.now()
        settled = 0
        with self.ctx.sessions() as session, session.begin():
            query = select(Outbox).where(Outbox.status == SENDING)
            if not all_sending:
                query = query.where(Outbox.lease_until < now)
            if is_postgres(session):
                query = query.with_for_update(skip_locked=True)
            for row in session.scalars(query):
                settled += 1
                if row.kind in CUSTOMER_KINDS:
                    row.status = UNKNOWN
                    row.last_error = "process stopped during the send: the customer may or may not have it"
                    row.lease_until = None
                    _report(session, _detached(row), UNKNOWN, row.last_error, now)
                    log.warning(
                        "customer message fate unknown; not resending",
                        extra={"conversation_id": row.conversation_id, "outbox_id": row.id, "kind": row.kind},
                    )
                else:
                    row.status = PENDING
                    row.next_attempt_at = now
                    row.lease_until = None
        return settled

    def send_due(self, *, limit: int = 500) -> SendResult:
        """Send up to `limit` due rows, each claimed just before its own call; return what happened.

        Claiming one row at a time means a process that dies leaves only the message it was
        sending `sending`: a batch claimed up front would leave every untried customer message
        in it `unknown` after recovery, and a batch slower than the lease would be recovered by
        another process while this one still works through it. Rows beyond `limit` wait for the
        next call.
        """
        result = SendResult()
        if not self._sending.acquire(blocking=False):
            return result  # another thread of this process is sending; it takes these rows too
        try:
            for _ in range(limit):
                claimed = self._claim(1)
                if not claimed:
                    break
                self._deliver(claimed[0], result)
        finally:
            self._sending.release()
        return result

    def _claim(self, limit: int) -> list[OutboxMessage]:
        now = self.ctx.clock.now()
        with self.ctx.sessions() as session, session.begin():
            # Messages of one conversation go out in the order they were written, separately for the
            # customer and for staff: a row waits while an earlier one of its lane is still unsent.
            earlier = aliased(Outbox)
            customer = Outbox.kind.in_(CUSTOMER_KINDS)
            earlier_customer = earlier.kind.in_(CUSTOMER_KINDS)
            waits = (
                exists()
                .where(
                    earlier.conversation_id == Outbox.conversation_id,
                    earlier.id < Outbox.id,
                    earlier.status.in_((PENDING, SENDING)),
                    or_(and_(customer, earlier_customer), and_(~customer, ~earlier_customer)),
                )
                .correlate(Outbox)
            )
            query = (
                select(Outbox)
                .where(Outbox.status == PENDING, Outbox.next_attempt_at <= now, ~waits)
                .order_by(Outbox.next_attempt_at, Outbox.id)
                .limit(limit)
            )
            if is_postgres(session):
                query = query.with_for_update(skip_locked=True, of=Outbox)
            rows = list(session.scalars(query))
            claimed = []
            for row in rows:
                row.status = SENDING
                row.attempts += 1
                row.lease_until = now + self.lease
                claimed.append(_detached(row))
        # Committed: from here a crash leaves these rows `sending`, never silently `pending`.
        return claimed

    def _deliver(self, message: OutboxMessage, result: SendResult) -> None:
        handler = self.handlers.get(message.kind)
        if handler is None:
            self._settle(message, status=FAILED, error=f"no handler for kind {message.kind!r}")
            result.failed += 1
            return
        try:
            outcome = handler(message)
        except (NotSent, RateLimited, Retry) as error:
            after = getattr(error, "reset_at", None) or getattr(error, "after", None)
            if message.attempts >= self.max_attempts:
                self._settle(message, status=FAILED, error=str(error))
                result.failed += 1
            else:
                when = after or (self.ctx.clock.now() + backoff(message.attempts))
                self._settle(message, status=PENDING, error=str(error), next_attempt_at=when)
                result.retried += 1
            log.warning(
                "delivery failed, will retry" if message.attempts < self.max_attempts else "delivery failed",
                extra={
                    "conversation_id": message.conversation_id,
                    "outbox_id": message.id,
                    "error": str(error),
                },
            )
            return
        except Exception as error:
            if message.kind in CUSTOMER_KINDS:
                # The platform may have posted it: never resend a customer message blindly.
                self._settle(message, status=UNKNOWN, error=f"{type(error).__name__}: {error}")
                result.unknown += 1
            elif message.attempts >= self.max_attempts:
                self._settle(message, status=FAILED, error=f"{type(error).__name__}: {error}")
                result.failed += 1
            else:
                self._settle(
                    message,
                    status=PENDING,
                    error=f"{type(error).__name__}: {error}",
                    next_attempt_at=self.ctx.clock.now() + backoff(message.attempts),
                )
                result.retried += 1
            log.exception(
                "delivery raised", extra={"conversation_id": message.conversation_id, "outbox_id": message.id}
            )
            return
        self._settle(message, status=SENT, result_text=outcome)
        scheduled = message.payload.get("scheduled_at")
        if message.kind in LADDER_KINDS and isinstance(scheduled, str):
            record_step_delivered(message.kind, datetime.fromisoformat(scheduled), self.ctx.clock.now())
        result.sent += 1
        result.by_kind[message.kind] = result.by_kind.get(message.kind, 0) + 1

    def _settle(
        self,
        message: OutboxMessage,
        *,
        status: str,
        error: str | None = None,
        result_text: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> None:
        now = self.ctx.clock.now()
        values: dict[str, Any] = {"status": status, "lease_until": None}
        if status == SENT:
            values.update(sent_at=now, result=result_text, last_error=None)
        if error is not None:
            values["last_error"] = error[:2000]
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        # The call is made and its outcome is known only here: if the database is away (restarting,
        # failing over), wait for it rather than lose the outcome, which would leave the row
        # `sending` and its conversation's later messages waiting until the lease runs out, then
        # repeat a staff message or call a delivered customer message "unknown".
        pause, waited = SETTLE_FIRST_PAUSE, 0.0
        while True:
            try:
                with self.ctx.sessions() as session, session.begin():
                    changed = session.execute(
                        update(Outbox)
                        .where(Outbox.id == message.id, Outbox.status == SENDING)
                        .values(**values)
                    ).rowcount  # type: ignore[attr-defined]
                    if changed and status in (UNKNOWN, FAILED):
                        _report(session, message, status, error, now)
                return
            except (OperationalError, InterfaceError) as problem:
                if waited >= SETTLE_PATIENCE.total_seconds():
                    raise
                log.warning(
                    "database unavailable: outcome of a send not recorded yet, retrying",
                    extra={
                        "conversation_id": message.conversation_id,
                        "outbox_id": message.id,
                        "status": status,
                        "error": f"{type(problem.orig).__name__}: {problem.orig}".strip()[:500],
                    },
                )
                time.sleep(pause)
                waited += pause
                pause = min(pause * 2, SETTLE_MAX_PAUSE)


def _detached(row: Outbox) -> OutboxMessage:
    return OutboxMessage(
        row.id, row.kind, row.conversation_id, dict(row.payload), row.idempotency_key, row.attempts
    )


def _report(session: Session, message: OutboxMessage, status: str, error: str | None, now: datetime) -> None:
    repo.record_event(
        session=session,
        at=now,
        actor="outbox",
        action="delivery_unknown" if status == UNKNOWN else "delivery_failed",
        conversation_id=message.conversation_id,
        outbox_id=message.id,
        kind=message.kind,
        error=error,
    )
    if message.kind in CUSTOMER_KINDS:
        repo.enqueue(
            session=session,
            kind="delivery_unknown" if status == UNKNOWN else "delivery_failed",
            key=f"outbox:{message.id}:{status}",
            payload={
                "conversation_id": message.conversation_id,
                "outbox_id": message.id,
                "kind": message.kind,
                "text": message.payload.get("text"),
                "error": error,
            },
            conversation_id=message.conversation_id,
            now=now,
        )
