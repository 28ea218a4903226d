"""The outbox sender: deliver what ingest and the sweep wrote, with the right guarantee per kind.

Messages to customers (acknowledgements, replies) go out AT MOST ONCE: a row is marked
`sending` and committed before the platform call. If the process dies during the call,
the row is still `sending` afterwards; recovery turns it into `unknown` and tells staff,
and it is never sent again blindly. A platform answer that proves nothing was posted
(`NotSent`, `RateLimited`) is retried with back-off.

Messages to staff (Slack cards, warnings, nags) go out AT LEAST ONCE: an abandoned
`sending` row goes back to `pending`; Slack-side idempotency (updating the stored card
rather than posting a new one) keeps repeats harmless.

Who abandoned a row: every claimed row records its sender (`Outbox.owner`), and each sender
renews a short lease of its own (a `leases` row, OWNER_TTL ahead) at every claim and from a
heartbeat thread. Once that lease lapses the sender is dead, and any process's recovery (every
RECOVER_INTERVAL) settles its rows: a killed process's staff messages are sent again within
about OWNER_TTL + RECOVER_INTERVAL, not after the row's own (long) lease. A sender that ran on
the same host and whose process is gone is known dead at once (a restart takes over its rows
at start-up).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    DateTime,
    Integer,
    Select,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    exists,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.sql.elements import ColumnElement

from bot.flow.context import AppContext
from bot.telemetry import record_step_delivered
from connectors.base import NotSent, RateLimited
from storage import repo
from storage.db import READ_ONLY, STATEMENT_TRANSACTIONS, is_postgres
from storage.models import (
    FAILED,
    HOLDS_NOTHING_BACK,
    LADDER_KINDS,
    LANE_FREE_KINDS,
    PENDING,
    SENDING,
    SENT,
    UNKNOWN,
    URGENCY,
    Lease,
    Outbox,
)

log = logging.getLogger("replyclock.outbox")
T = TypeVar("T")

CUSTOMER_KINDS = frozenset({"ack", "reply"})
# The send loop's three lanes (see OutboxSender.send_due), and how long a lane found empty rests.
CUSTOMER_LANE, STAFF_LANE, REMINDER_LANE = "customer", "staff", "reminder"
LANES = (CUSTOMER_LANE, STAFF_LANE, REMINDER_LANE)  # the order of their turns
LANE_REST = timedelta(seconds=0.5)
CUSTOMER_TURN = 10  # customer rows (each claimed alone) per turn, as many as a staff batch
DEFAULT_LEASE = timedelta(minutes=5)
MAX_ATTEMPTS = 8
BASE_BACKOFF = timedelta(seconds=5)
MAX_BACKOFF = timedelta(minutes=30)
# How long a sender waits for the database to record a send's outcome (see OutboxSender._record).
SETTLE_PATIENCE = timedelta(minutes=2)
SETTLE_FIRST_PAUSE = 0.25  # seconds, doubling
SETTLE_MAX_PAUSE = 5.0
# A sender's own lease: renewed at each claim and every OWNER_HEARTBEAT; lapsed = the sender is dead.
OWNER_TTL = timedelta(seconds=6)
OWNER_HEARTBEAT = timedelta(seconds=2)
# How often a process looks for rows of dead senders (one probe of the few `sending` rows).
RECOVER_INTERVAL = timedelta(seconds=2)
# Lapsed sender leases are deleted after this (they only name rows that are settled by then).
FORGET_OWNER_AFTER = timedelta(hours=1)
# Staff rows are claimed (and their outcomes recorded) up to this many per transaction; see send_due.
STAFF_BATCH = 10
# A claimed batch's rows not yet tried after this long go back to `pending`: a slow Slack must
# not hold them (a breach that fell due meanwhile goes first), nor let their lease run out.
BATCH_PATIENCE = timedelta(seconds=0.5)


@dataclass(frozen=True)
class OutboxMessage:
    """A claimed outbox row, detached from the database."""

    id: int
    kind: str
    conversation_id: int | None
    payload: Mapping[str, Any]
    idempotency_key: str
    attempts: int
    owner: str | None = None  # the sender that claimed it (storm claims of other rows use it too)


class Retry(Exception):
    """A staff-side delivery failed in a way worth retrying (optionally not before `after`)."""

    def __init__(self, message: str, after: datetime | None = None) -> None:
        super().__init__(message)
        self.after = after


class Defer(Retry):
    """Not sent and not tried: the handler's own pace (e.g. Slack's per-channel limit) says wait.

    The row goes back to ``pending``, due at `after`, and the claim does not count as an
    attempt; meanwhile more urgent rows, and other channels' rows, go out as usual. A platform's
    own "wait" (Slack's 429 with Retry-After) is one too, with `record` true: its message is
    kept as the row's last error. (Counted, a storm's 429s made rows fail after MAX_ATTEMPTS.)
    """

    def __init__(self, message: str, after: datetime, *, record: bool = False) -> None:
        super().__init__(message, after)
        self.after: datetime = after
        self.record = record


# A handler delivers one message and returns a short result (e.g. the platform's message id).
Handler = Callable[[OutboxMessage], str | None]


@dataclass
class SendResult:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    unknown: int = 0
    deferred: int = 0  # not tried yet: the handler's pace put them off (Defer)
    by_kind: dict[str, int] = field(default_factory=dict)


_loop = threading.local()  # the send loop on this thread: its connection, its batch's rows taken over


@contextmanager
def loop_session(ctx: AppContext, *, read_only: bool = False) -> Iterator[Session]:
    """A session for the send loop and the handlers it calls (``with loop_session(ctx) as s, s.begin()``).

    The loop holds two connections while it runs, and these sessions use them: each session from
    the pool costs a checkout (and on PostgreSQL a ping, a round trip) besides its own
    statements, several per message. Reads (`read_only`) go through one in autocommit (no BEGIN
    and ROLLBACK; each statement reads its own snapshot); writes through the other (on
    PostgreSQL its commits do not wait for the WAL flush: staff messages, at least once; customer
    transactions on it call `durable_commit`). Outside the send loop, on a SQLite database in
    memory, or once a connection broke, a session of `ctx` as usual.
    """
    held: _Held | None = getattr(_loop, "held", None)
    connection = None if held is None else (held.reader if read_only else held.writer)
    if connection is None or connection.invalidated or connection.closed:
        with (ctx.read_sessions if read_only else ctx.sessions)() as session:
            yield session
        return
    assert held is not None
    with _given_up_if_broken(held), Session(bind=connection, expire_on_commit=False) as session:
        yield session


@contextmanager
def _given_up_if_broken(held: _Held) -> Iterator[None]:
    """Give up the send loop's own connections `held` when a statement on them finds the database
    gone or the connection invalidated: the next ones come from the pool (they ping, reconnect)."""
    try:
        yield
    except DBAPIError as error:
        if error.connection_invalidated or isinstance(error, (OperationalError, InterfaceError)):
            _loop.held = None
            held.close(broken=True)
        raise


def _dropping_held(action: Callable[[], T]) -> Callable[[], T]:
    """`action`, giving up the send loop's own connections when the database fails it (the next
    try gets a fresh connection from the pool, which pings)."""

    def run() -> T:
        try:
            return action()
        except (OperationalError, InterfaceError):
            _drop_held()
            raise

    return run


def _drop_held() -> None:
    """Give up the send loop's own connections (a database that went away broke them)."""
    held: _Held | None = getattr(_loop, "held", None)
    if held is not None:
        _loop.held = None
        held.close(broken=True)


@dataclass
class _Held:
    """The send loop's own connections (see `loop_session`)."""

    writer: Connection
    reader: Connection
    postgres: bool

    @classmethod
    def open(cls, engine: Engine) -> _Held | None:
        """Two connections from the pool; None when the database is away, or when they would share
        one SQLite connection (a database in memory: one connection per thread)."""
        postgres = is_postgres(engine)
        if not postgres and isinstance(engine.pool, (SingletonThreadPool, StaticPool)):
            return None
        connections: list[Connection] = []
        try:
            for _ in range(2):
                connections.append(engine.connect())
                if postgres:
                    connections[-1].exec_driver_sql("SET synchronous_commit TO off")
                    connections[-1].commit()
            writer, reader = connections
            if postgres:
                reader.execution_options(isolation_level="AUTOCOMMIT")
            else:
                # No BEGIN (storage.db), rather than SQLAlchemy's AUTOCOMMIT: that would change the
                # driver connection's isolation level, and the pool would set it back differently.
                reader.execution_options(**{READ_ONLY: True, STATEMENT_TRANSACTIONS: True})
        except (OperationalError, InterfaceError):
            for connection in connections:
                with contextlib.suppress(Exception):
                    connection.invalidate()
            return None  # the database is away: sessions from the pool will say so
        return cls(writer, reader, postgres)

    def close(self, *, broken: bool = False) -> None:
        """Back to the pool as they came (commits durable again), or discarded."""
        for connection in (self.writer, self.reader):
            try:
                if broken:
                    raise ConnectionError("broken")
                connection.rollback()
                if self.postgres:
                    connection.exec_driver_sql("RESET synchronous_commit")
                    connection.commit()
                connection.close()
            except Exception:
                with contextlib.suppress(Exception):
                    connection.invalidate()
                    connection.close()


@contextmanager
def loop_autocommit() -> Iterator[Connection | None]:
    """The send loop's autocommit connection (PostgreSQL; commits not waiting for the WAL flush),
    for a staff-side write in ONE statement (atomic by itself, one round trip); None elsewhere
    (SQLite's writes take the write lock up front: see storage.db)."""
    held: _Held | None = getattr(_loop, "held", None)
    connection = None if held is None or not held.postgres else held.reader
    if held is None or connection is None or connection.invalidated or connection.closed:
        yield None
        return
    with _given_up_if_broken(held):
        yield connection


def untried_in_batch() -> frozenset[int]:
    """Rows of this thread's batch that the send loop has not handed to their handler yet (a digest
    may take them over); empty outside a send loop. A row of the batch already handed over is
    the loop's to record, even if it is still ``sending`` (and one put off earlier and claimed
    again is in a new batch: untried once more)."""
    return frozenset(getattr(_loop, "untried", ()))


@contextmanager
def loop_reader(ctx: AppContext) -> Iterator[Connection]:
    """A Core connection for a read of the send loop and its handlers: the loop's reader (autocommit:
    no BEGIN, each statement its own snapshot), else a read-only one from the pool. No Session
    and no ORM objects: for a hot read of plain columns (a new card), they cost more CPU than the
    statement."""
    held: _Held | None = getattr(_loop, "held", None)
    connection = None if held is None else held.reader
    if held is None or connection is None or connection.invalidated or connection.closed:
        with ctx.engine.execution_options(**{READ_ONLY: True}).connect() as connection:
            yield connection
        return
    with _given_up_if_broken(held):
        if connection.in_transaction():
            yield connection
        else:
            with connection.begin():  # nothing is sent: the connection is in autocommit
                yield connection


@contextmanager
def loop_transaction(ctx: AppContext) -> Iterator[Connection]:
    """A staff-side write of the send loop and its handlers: a Core connection in a transaction, the
    loop's writer (else one from the pool), commit not waiting for PostgreSQL's WAL flush (staff
    messages go out at least once). No Session: for a write or two of statements built once, its
    bookkeeping costs more CPU than the writes."""
    held: _Held | None = getattr(_loop, "held", None)
    connection = None if held is None else held.writer
    if held is None or connection is None or connection.invalidated or connection.closed:
        with ctx.engine.begin() as connection:
            if is_postgres(ctx.engine):
                connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            yield connection
        return
    with _given_up_if_broken(held):
        if connection.in_transaction():  # inside the loop's own transaction (a session on the writer)
            yield connection
        else:
            with connection.begin():
                yield connection


def next_in_batch() -> OutboxMessage | None:
    """The row of this thread's batch that the send loop hands to its handler after the one being
    delivered, if it goes on (it may stop, or hand the rest back: see `_deliver_batch`); None at
    the end of the batch or outside a send loop. A handler may read what that row will need in the
    same statement as its own last write (`keep_ahead`): one round trip instead of two."""
    batch: Sequence[OutboxMessage] = getattr(_loop, "batch", ())
    taken: set[int] = getattr(_loop, "taken", None) or set()
    for message in batch[getattr(_loop, "position", 0) + 1 :]:
        if message.id not in taken:
            return message
    return None


def keep_ahead(outbox_id: int, value: object) -> None:
    """Keep `value` (a handler's read for a row of this batch not handed over yet: `next_in_batch`)
    for that row's handler; forgotten when the batch ends. Outside a send loop, nothing is kept."""
    ahead: dict[int, object] | None = getattr(_loop, "ahead", None)
    if ahead is not None:
        ahead[outbox_id] = value


def kept_ahead(outbox_id: int) -> object | None:
    """What a handler kept for row `outbox_id` in this batch (`keep_ahead`), once; else None."""
    ahead: dict[int, object] | None = getattr(_loop, "ahead", None)
    return None if ahead is None else ahead.pop(outbox_id, None)


def taken_over(outbox_ids: Iterable[int]) -> None:
    """A handler settled or released these other claimed rows itself (a storm posted them as one).

    The send loop on this thread skips them if they are in its batch (their outcome is recorded).
    """
    taken: set[int] | None = getattr(_loop, "taken", None)
    if taken is not None:
        ids = set(outbox_ids)
        taken.update(ids)
        sender: OutboxSender | None = getattr(_loop, "sender", None)
        if sender is not None:  # rows a handler claims for its send are in flight too
            with sender._flight:
                sender._in_flight.update(ids)


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
        staff_batch: int = STAFF_BATCH,
    ) -> None:
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.lease = lease
        self.max_attempts = max_attempts
        self.staff_batch = max(1, staff_batch)  # staff rows claimed per transaction (see send_due)
        # This sender's name in `leases` and in `Outbox.owner` (unique per process and sender).
        self.owner = f"sender:{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        # One send loop per lane per process: the outbox jobs, a poll and a sweep all call
        # send_due, and a kill must find at most one customer message in flight (see send_due).
        self._sending = {lane: threading.Lock() for lane in LANES}
        self._stopping = threading.Event()
        self._lease_until: datetime | None = None  # this sender's lease, as last renewed here
        # Rows this sender claimed and has not settled yet (its sends in flight). A row of its own
        # left `sending` but not in here was abandoned (a failed write after the send: the outcome
        # record gave up, a release met the database away) and recovery settles it within seconds,
        # as it would a dead sender's, instead of waiting for the row's own lease.
        self._in_flight: set[int] = set()
        self._claims_open = 0  # staff claims committed by one statement, their ids not in flight yet
        self._flight = threading.Lock()

    def recover(self, *, all_sending: bool = False) -> int:
        """Settle rows left `sending` by a sender that died.

        A row is abandoned when its sender's lease (see `heartbeat`) has lapsed, or its own
        lease (`lease_until`, a cap on one send) has run out. Rows of this very sender are its
        own sends in flight and are left alone (unless their own lease ran out).

        Args:
            all_sending: treat every `sending` row as abandoned (true at start-up on SQLite,
                where only one process sends); otherwise only abandoned rows as above.

        Returns:
            How many rows were settled.
        """
        now = self.ctx.clock.now()
        settled = 0
        with self.ctx.sessions() as session, session.begin():
            query = select(Outbox).where(Outbox.status == SENDING)
            if not all_sending:
                live_owner = exists().where(Lease.name == Outbox.owner, Lease.expires_at >= now)
                owners = session.scalars(
                    select(Outbox.owner).where(Outbox.status == SENDING, Outbox.owner.is_not(None)).distinct()
                )
                gone = [owner for owner in owners if owner and owner != self.owner and _gone(owner)]
                query = query.where(
                    or_(
                        Outbox.lease_until < now,
                        and_(Outbox.owner.is_not(None), Outbox.owner != self.owner, ~live_owner),
                        Outbox.owner.in_(gone),
                        Outbox.owner == self.owner,  # its own: those not in flight (below)
                    )
                )
            if is_postgres(session):
                query = query.with_for_update(skip_locked=True, of=Outbox)
            for row in session.scalars(query):
                if (
                    not all_sending
                    and row.owner == self.owner
                    and row.lease_until is not None
                    and row.lease_until >= now
                ):
                    # Read after the row is locked (PostgreSQL) or the write lock taken (SQLite):
                    # a send still in flight is in the set until its outcome is committed.
                    with self._flight:
                        if row.id in self._in_flight or self._claims_open:
                            continue
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
                    # Back in line where it was (it fell due before everything queued since).
                    row.status = PENDING
                    row.next_attempt_at = min(row.next_attempt_at, now)
                    row.lease_until = None
                    log.info(
                        "staff message of a stopped sender queued again",
                        extra={"conversation_id": row.conversation_id, "outbox_id": row.id, "kind": row.kind},
                    )
                row.owner = None
            session.execute(
                delete(Lease).where(Lease.name.like("sender:%"), Lease.expires_at < now - FORGET_OWNER_AFTER)
            )
        return settled

    def stop(self) -> None:
        """Send nothing more (the message in flight is finished and settled): the process is stopping."""
        self._stopping.set()

    def heartbeat(self) -> None:
        """Renew this sender's lease (OWNER_TTL from now): its `sending` rows are in flight."""
        with self.ctx.sessions() as session, session.begin():
            self._renew(session, self.ctx.clock.now())

    def _renew(self, session: Session, now: datetime) -> None:
        self._lease_until = now + OWNER_TTL
        repo.renew_lease(
            session=session,
            name=self.owner,
            holder=self.owner,
            host=socket.gethostname()[:200],
            pid=os.getpid(),
            now=now,
            expires_at=now + OWNER_TTL,
        )

    def start_heartbeat(self, stop: threading.Event) -> threading.Thread:
        """Renew the lease every OWNER_HEARTBEAT on a daemon thread until `stop` is set.

        A thread of its own, not a scheduler job: a send that waits on Slack or a busy
        executor must not let the lease lapse (another process would send the row again).
        """

        def beat() -> None:
            while not stop.wait(OWNER_HEARTBEAT.total_seconds()):
                try:
                    self.heartbeat()
                except Exception as error:  # the database is away: say so in one line, beat again
                    log.error(
                        "sender heartbeat failed",
                        extra={"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]},
                    )

        thread = threading.Thread(target=beat, name="outbox-heartbeat", daemon=True)
        thread.start()
        return thread

    def send_due(self, *, limit: int = 500, lanes: Sequence[str] = LANES) -> SendResult:
        """Send up to `limit` due rows of `lanes` in urgency order; return what happened.

        A lane another thread of this process is sending is left to it: `run` drains the customer
        lane on one thread and the staff and reminder lanes on another, so an acknowledgement never
        waits for a Slack batch (in a storm, acknowledgements queued behind staff batches came
        15 s late and more), and a call for all lanes takes those that are free.

        Customer messages are claimed one at a time, just before their own call: a process that
        dies leaves at most the one it was sending `sending` (recovery makes it `unknown`); a batch
        claimed up front would leave every untried customer message in it `unknown`. Staff
        messages go out at least once, so up to STAFF_BATCH due ones are claimed in one
        transaction and their outcomes recorded together (a death re-sends the batch's rows,
        Slack-side idempotency keeps cards single). Rows beyond `limit` wait for the next call.
        """
        result = SendResult()
        # Lanes another thread of this process is sending: it takes their rows too.
        mine = tuple(lane for lane in LANES if lane in lanes and self._sending[lane].acquire(blocking=False))
        if not mine:
            return result
        _loop.taken, _loop.sender = set(), self
        _loop.held = _Held.open(self.ctx.engine)
        try:
            done = 0
            # The lanes take turns: customer messages go to another platform than staff messages
            # and must never wait behind Slack's limits (under a storm thousands of due urgent
            # Slack rows, put off by the pacer and falling due again, starved them), nor staff
            # messages behind a customer platform's. Reminders (nags, by DM to their owners) have
            # a lane of their own for the same reason: the least urgent kind, they waited behind
            # a storm's urgent rows for rate-limited channels until the answer made them moot,
            # while their own channels (each person's DM) stood idle. A lane found empty is not
            # asked again for LANE_REST (one empty claim per staff batch would double the claims).
            rest_until = dict.fromkeys(mine, 0.0)
            lane = mine[0]  # whose turn it is
            run = 0  # customer rows sent in this turn (each claimed alone)
            while done < limit and not self._stopping.is_set():
                claimed: list[OutboxMessage] = []
                turn = mine.index(lane)
                for candidate in mine[turn:] + mine[:turn]:
                    if time.monotonic() < rest_until[candidate]:
                        continue
                    claimed = self._claim(min(self.staff_batch, limit - done), lane=candidate)
                    if claimed:
                        if candidate != lane:
                            lane, run = candidate, 0
                        break
                    rest_until[candidate] = time.monotonic() + LANE_REST.total_seconds()
                if not claimed:
                    break
                done += self._deliver_batch(claimed, result)
                # A turn is a batch's worth of rows in any lane: up to CUSTOMER_TURN customer
                # rows, one at a time, or one batch of staff rows or of reminders.
                run = run + 1 if lane == CUSTOMER_LANE else 0
                if lane != CUSTOMER_LANE or run >= CUSTOMER_TURN:
                    lane, run = mine[(mine.index(lane) + 1) % len(mine)], 0
        finally:
            held, _loop.held, _loop.taken, _loop.sender = _loop.held, None, None, None
            if held is not None:
                held.close()
            for lane in mine:
                self._sending[lane].release()
        return result

    def _deliver_batch(self, claimed: list[OutboxMessage], result: SendResult) -> int:
        """Deliver claimed rows in order, staff outcomes recorded together (see send_due); how many
        were tried (the rest went back in line, or a handler took them over)."""
        taken: set[int] = _loop.taken
        taken.clear()
        untried: set[int] = {m.id for m in claimed}
        _loop.untried = untried
        # What handlers read ahead for the batch's next row (`next_in_batch`, `keep_ahead`).
        _loop.batch, _loop.position, _loop.ahead = claimed, 0, {}
        outcomes: list[_Outcome] = []
        began = time.monotonic()
        tried = 0
        try:
            for index, message in enumerate(claimed):
                _loop.position = index
                if message.id in taken:
                    continue
                if index and (
                    self._stopping.is_set() or time.monotonic() - began > BATCH_PATIENCE.total_seconds()
                ):
                    # Stopping, or slow sends: the rest go back in line (a more urgent row that
                    # fell due meanwhile goes first), untried.
                    self._release([m for m in claimed[index:] if m.id not in taken])
                    break
                tried += 1
                untried.discard(message.id)
                outcome = self._deliver(message, result)
                if outcome is not None:
                    outcomes.append(outcome)
        finally:
            _loop.untried, _loop.batch, _loop.position, _loop.ahead = set(), (), 0, None
            try:
                self._record(outcomes)
            finally:
                # Settled, released or handed over; whatever a failed write left `sending`,
                # recovery now settles (see `recover`).
                self._forget([m.id for m in claimed] + list(taken))
        return tried

    def _forget(self, outbox_ids: Iterable[int]) -> None:
        with self._flight:
            self._in_flight.difference_update(outbox_ids)

    def _claim(self, limit: int, *, lane: str | None = None) -> list[OutboxMessage]:
        """Claim the most urgent due rows: the leading staff rows (up to `limit`), or one customer
        row; of one lane (`CUSTOMER_LANE` or `STAFF_LANE`), or of both (None)."""
        now = self.ctx.clock.now()
        try:
            return self._claim_now(now, limit, lane)
        except BaseException:
            # Not claimed, or (a commit cut off) claimed unbeknown: either way not in flight here,
            # so recovery settles whatever may be `sending` (see `recover`).
            with self._flight:
                self._in_flight.difference_update(getattr(_loop, "claiming", ()))
            raise
        finally:
            _loop.claiming = []

    def _claim_now(self, now: datetime, limit: int, lane: str | None) -> list[OutboxMessage]:
        if lane in (STAFF_LANE, REMINDER_LANE):
            with loop_autocommit() as connection:
                if connection is not None:
                    return self._claim_staff(connection, now, limit, lane)
        with loop_session(self.ctx) as session, session.begin():
            # Core on the session's connection: plain rows, no ORM execution (CPU per claim).
            connection = session.connection()
            query = _claim_query(is_postgres(session), lane)
            rows = connection.execute(query, {"now": now, "limit": limit}).all()
            if rows and rows[0].kind in CUSTOMER_KINDS:
                rows = rows[:1]
            else:
                # The customer row after them waits for its own claim; so do less urgent rows
                # (a batch of one urgency: a breach that its warning's send unblocks goes before
                # the cards that were next in line).
                staff = 0
                while (
                    staff < len(rows)
                    and rows[staff].kind not in CUSTOMER_KINDS
                    and rows[staff].urgency == rows[0].urgency
                ):
                    staff += 1
                rows = rows[:staff]
            claimed = []
            if rows and (
                self._lease_until is None or self._lease_until - now < OWNER_TTL - OWNER_HEARTBEAT / 2
            ):
                self._renew(session, now)
            if rows:
                # In flight before the claim is committed: recovery must never see them as abandoned.
                _loop.claiming = [row.id for row in rows]
                with self._flight:
                    self._in_flight.update(_loop.claiming)
                # One UPDATE for the batch, not one per row (each is a round trip on PostgreSQL).
                connection.execute(
                    _CLAIM_UPDATE,
                    {
                        "claim_ids": _loop.claiming,
                        "claim_lease_until": now + self.lease,
                        "claim_owner": self.owner,
                    },
                )
            claimed += [self._claimed(row, row.attempts + 1) for row in rows]
            if rows and rows[0].kind not in CUSTOMER_KINDS:
                relaxed_commit(session)
            elif rows:
                durable_commit(session)
        # Committed: from here a crash leaves these rows `sending`, never silently `pending`.
        return claimed

    def _claim_staff(
        self, connection: Connection, now: datetime, limit: int, lane: str
    ) -> list[OutboxMessage]:
        """PostgreSQL, in the send loop: claim a staff batch (`lane` STAFF_LANE or REMINDER_LANE) in
        ONE statement on the loop's autocommit connection (commit not waiting for the WAL flush, as
        every staff claim): one round trip instead of three (the SELECT, the UPDATE, the COMMIT).

        The same rows as `_claim_now`'s transaction: the claim's SELECT (FOR UPDATE SKIP LOCKED)
        as a common table expression, of which the UPDATE marks the most urgent ones (its batch is
        the leading rows of one urgency; these lanes hold no customer rows). The sender's own lease
        is renewed first when due, as the transaction does (its rows never name a lapsed sender).
        The rows are committed before their ids are known here: while the statement runs, this
        sender's recovery leaves all its own rows alone (`_claims_open`), so none of them is ever
        taken for abandoned.
        """
        if self._lease_until is None or self._lease_until - now < OWNER_TTL - OWNER_HEARTBEAT / 2:
            with loop_session(self.ctx) as session, session.begin():
                self._renew(session, now)
        with self._flight:
            self._claims_open += 1
        try:
            rows = list(
                connection.execute(
                    _staff_claim_statement(lane),
                    {
                        "now": now,
                        "limit": limit,
                        "claim_lease_until": now + self.lease,
                        "claim_owner": self.owner,
                    },
                ).all()
            )
            _loop.claiming = [row.id for row in rows]  # see _claim: forgotten if this fails
            with self._flight:
                self._in_flight.update(_loop.claiming)
        finally:
            with self._flight:
                self._claims_open -= 1
        rows.sort(key=lambda row: (row.urgency, row.next_attempt_at, row.id))  # the claim's order
        return [self._claimed(row, row.attempts) for row in rows]  # attempts counted by the UPDATE

    def _claimed(self, row: Any, attempts: int) -> OutboxMessage:
        """The message of a claimed row (the claim's plain columns), this sender its owner."""
        return OutboxMessage(
            row.id,
            row.kind,
            row.conversation_id,
            dict(row.payload),
            row.idempotency_key,
            attempts,
            self.owner,
        )

    def _release(self, messages: list[OutboxMessage]) -> None:
        """Hand claimed staff rows that were not tried back to the queue, as they were."""
        if not messages:
            return

        def release() -> None:
            with loop_session(self.ctx) as session, session.begin():
                relaxed_commit(session)
                for message in messages:
                    session.execute(
                        update(Outbox)
                        .where(Outbox.id == message.id, Outbox.status == SENDING, Outbox.owner == self.owner)
                        .values(status=PENDING, lease_until=None, owner=None, attempts=message.attempts - 1)
                        .execution_options(synchronize_session=False)
                    )

        # Patiently, as an outcome: the database may be away (its rows would wait for recovery).
        patiently(
            _dropping_held(release),
            "database unavailable: claimed rows not handed back yet, retrying",
            {
                "conversation_id": messages[0].conversation_id,
                "outbox_id": messages[0].id,
                "rows": len(messages),
            },
        )

    def _deliver(self, message: OutboxMessage, result: SendResult) -> _Outcome | None:
        """Hand `message` to its handler; its outcome, to record (customer rows: recorded already)."""
        outcome = self._attempt(message, result)
        if message.kind in CUSTOMER_KINDS:
            self._record([outcome])
            return None
        return outcome

    def _attempt(self, message: OutboxMessage, result: SendResult) -> _Outcome:
        handler = self.handlers.get(message.kind)
        if handler is None:
            result.failed += 1
            return self._outcome(message, status=FAILED, error=f"no handler for kind {message.kind!r}")
        try:
            answer = handler(message)
        except Defer as deferred:
            result.deferred += 1
            return self._outcome(
                message,
                status=PENDING,
                next_attempt_at=deferred.after,
                attempts=message.attempts - 1,
                error=str(deferred) if deferred.record else None,
            )
        except (NotSent, RateLimited, Retry) as error:
            after = getattr(error, "reset_at", None) or getattr(error, "after", None)
            log.warning(
                "delivery failed, will retry" if message.attempts < self.max_attempts else "delivery failed",
                extra={
                    "conversation_id": message.conversation_id,
                    "outbox_id": message.id,
                    "error": str(error),
                },
            )
            if message.attempts >= self.max_attempts:
                result.failed += 1
                return self._outcome(message, status=FAILED, error=str(error))
            result.retried += 1
            when = after or (self.ctx.clock.now() + backoff(message.attempts))
            return self._outcome(message, status=PENDING, error=str(error), next_attempt_at=when)
        except Exception as error:
            log.exception(
                "delivery raised", extra={"conversation_id": message.conversation_id, "outbox_id": message.id}
            )
            described = f"{type(error).__name__}: {error}"
            if message.kind in CUSTOMER_KINDS:
                # The platform may have posted it: never resend a customer message blindly.
                result.unknown += 1
                return self._outcome(message, status=UNKNOWN, error=described)
            if message.attempts >= self.max_attempts:
                result.failed += 1
                return self._outcome(message, status=FAILED, error=described)
            result.retried += 1
            return self._outcome(
                message,
                status=PENDING,
                error=described,
                next_attempt_at=self.ctx.clock.now() + backoff(message.attempts),
            )
        scheduled = message.payload.get("scheduled_at")
        if message.kind in LADDER_KINDS and isinstance(scheduled, str):
            record_step_delivered(message.kind, datetime.fromisoformat(scheduled), self.ctx.clock.now())
        result.sent += 1
        result.by_kind[message.kind] = result.by_kind.get(message.kind, 0) + 1
        return self._outcome(message, status=SENT, result_text=answer)

    def _outcome(
        self,
        message: OutboxMessage,
        *,
        status: str,
        error: str | None = None,
        result_text: str | None = None,
        next_attempt_at: datetime | None = None,
        attempts: int | None = None,
    ) -> _Outcome:
        now = self.ctx.clock.now()
        values: dict[str, Any] = {"status": status, "lease_until": None, "owner": None}
        if attempts is not None:
            values["attempts"] = attempts
        if status == SENT:
            values.update(sent_at=now, result=result_text, last_error=None)
        if error is not None:
            values["last_error"] = error[:2000]
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        return _Outcome(message, status, error, values, now)

    def _record(self, outcomes: list[_Outcome]) -> None:
        """Record the outcomes of sends in one transaction (staff only: relaxed commit on PostgreSQL).

        The calls are made and their outcomes are known only here: if the database is away
        (restarting, failing over), wait for it rather than lose them, which would leave rows
        `sending` and their conversations' later messages waiting for recovery, then repeat a
        staff message or call a delivered customer message "unknown".
        """
        if not outcomes:
            return
        sent = [o for o in outcomes if o.status == SENT]
        others = [o for o in outcomes if o.status != SENT]

        def record() -> None:
            if sent and not others and all(o.message.kind not in CUSTOMER_KINDS for o in sent):
                with loop_autocommit() as connection:
                    if connection is not None:
                        # PostgreSQL, in the send loop: a staff batch's sends, one statement (atomic
                        # by itself, committed without waiting for the WAL flush), one round trip;
                        # the transaction below costs two (the executemany's, the COMMIT).
                        connection.execute(
                            _SENT_ALL,
                            {
                                "b_ids": [o.message.id for o in sent],
                                "b_sent_at": [o.at for o in sent],
                                "b_results": [o.values["result"] for o in sent],
                            },
                        )
                        return
            with loop_session(self.ctx) as session, session.begin():
                if all(o.message.kind not in CUSTOMER_KINDS for o in outcomes):
                    relaxed_commit(session)
                else:
                    durable_commit(session)
                if sent:
                    # One statement for all sent rows (executemany: pipelined by psycopg).
                    session.connection().execute(
                        _SENT_UPDATE,
                        [
                            {"b_id": o.message.id, "b_sent_at": o.at, "b_result": o.values["result"]}
                            for o in sent
                        ],
                    )
                for outcome in others:
                    changed = session.execute(
                        update(Outbox)
                        .where(Outbox.id == outcome.message.id, Outbox.status == SENDING)
                        .values(**outcome.values)
                    ).rowcount  # type: ignore[attr-defined]
                    if changed and outcome.status in (UNKNOWN, FAILED):
                        _report(session, outcome.message, outcome.status, outcome.error, outcome.at)

        first = outcomes[0]
        patiently(
            _dropping_held(record),
            "database unavailable: outcome of a send not recorded yet, retrying",
            {
                "conversation_id": first.message.conversation_id,
                "outbox_id": first.message.id,
                "status": first.status,
                "rows": len(outcomes),
            },
        )


@dataclass(frozen=True)
class _Outcome:
    """What became of one claimed row, to be recorded (OutboxSender._record)."""

    message: OutboxMessage
    status: str
    error: str | None
    values: dict[str, Any]
    at: datetime


_OUTBOX: Table = Outbox.__table__  # type: ignore[assignment]
_CLAIM_UPDATE = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id.in_(bindparam("claim_ids", expanding=True)))
    .values(
        status=SENDING,
        attempts=_OUTBOX.c.attempts + 1,
        lease_until=bindparam("claim_lease_until"),
        owner=bindparam("claim_owner"),
    )
)
_SENT_UPDATE = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == bindparam("b_id"), _OUTBOX.c.status == SENDING)
    .values(
        status=SENT,
        lease_until=None,
        owner=None,
        sent_at=bindparam("b_sent_at"),
        result=bindparam("b_result"),
        last_error=None,
    )
)


def patiently(action: Callable[[], T], what: str, extra: Mapping[str, Any]) -> T:
    """Run a database `action`, again and again while the database is away (up to SETTLE_PATIENCE).

    For writes that record something already done outside (a send's outcome, our own post):
    losing them would make the record lie. Each failed try logs one warning line.
    """
    pause, waited = SETTLE_FIRST_PAUSE, 0.0
    while True:
        try:
            return action()
        except (OperationalError, InterfaceError) as problem:
            if waited >= SETTLE_PATIENCE.total_seconds():
                raise
            log.warning(what, extra={**extra, "error": one_line(problem)})
            time.sleep(pause)
            waited += pause
            pause = min(pause * 2, SETTLE_MAX_PAUSE)


def one_line(error: BaseException) -> str:
    """A database error as one short line (the driver's message, without SQL or traceback)."""
    orig = getattr(error, "orig", None) or error
    text = f"{type(orig).__name__}: {orig}".strip()
    return (text.splitlines() or [text])[0][:500]


def relaxed_commit(session: Session) -> None:
    """On PostgreSQL, commit this transaction without waiting for its WAL flush.

    Only for staff messages, which go out at least once: a database crash that loses the claim
    or the settle (a fraction of a second of commits) sends the message again. Customer
    messages keep durable commits: their claim must be on disk before the call (at most once).
    Saves a disk flush (about 3 ms here, far more on a busy disk) twice per staff message.
    (The send loop's own writer connection commits so already: no statement needed.)
    """
    if is_postgres(session) and not _on_relaxed_writer(session):
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))


def durable_commit(session: Session) -> None:
    """This transaction's commit waits for the WAL flush, even on the send loop's writer connection."""
    if _on_relaxed_writer(session):
        session.execute(text("SET LOCAL synchronous_commit TO ON"))


def _on_relaxed_writer(session: Session) -> bool:
    held: _Held | None = getattr(_loop, "held", None)
    return held is not None and held.postgres and session.bind is held.writer


@functools.cache
def _claim_query(postgres: bool, lane: str | None = None) -> Select[Any]:
    """The claim's SELECT, built once per lane (parameters ``now`` and ``limit``): rows of the
    customer's lane (`CUSTOMER_LANE`), of the staff's (`STAFF_LANE`, nags apart), the nags
    (`REMINDER_LANE`, oldest due first), or all (None).

    Most urgent kind first (`storage.models.URGENCY`: breach and escalation, then customer
    messages, warnings, new cards, reassignments, card updates, nags, digests), then oldest due.

    Messages of one conversation go out in the order they were written, separately for the
    customer and for staff: a row waits while an earlier one of its lane is still unsent. The
    ladder's notices (LANE_FREE_KINDS: warning, breach, escalation, nag) are out of that order:
    they need none of the conversation's other messages (a notice whose card is not posted yet
    goes as a top-level overdue digest, a nag by DM; a nag for the card's thread waits for the
    card in its handler), and none waits for them. Nor does any row wait for an earlier card
    update (it waits for the card itself; storage.models.HOLDS_NOTHING_BACK). In a storm a breach waited for its own card,
    and a nag behind its escalation in a rate-limited channel came after the answer that made it
    moot. The statuses are written into the SQL as literals, not parameters: only then can the planner prove
    that the partial indexes (ix_outbox_pending, ix_outbox_lane) apply (SQLite always; PostgreSQL
    once psycopg prepares the statement with a generic plan).
    """
    earlier = aliased(Outbox)
    kinds = [sql_constant(kind) for kind in sorted(CUSTOMER_KINDS)]
    customer = Outbox.kind.in_(kinds)
    earlier_customer = earlier.kind.in_(kinds)
    waits = (
        exists()
        .where(
            earlier.conversation_id == Outbox.conversation_id,
            earlier.id < Outbox.id,
            earlier.status.in_(_UNSENT),
            or_(and_(customer, earlier_customer), and_(~customer, ~earlier_customer)),
            Outbox.kind.not_in(_LANE_FREE),
            earlier.kind.not_in(_HOLDS_NOTHING_BACK),
        )
        .correlate(Outbox)
    )
    query = (
        # Plain columns, not entities: a claim needs no ORM objects (they cost CPU per row).
        select(
            Outbox.id,
            Outbox.kind,
            Outbox.conversation_id,
            Outbox.payload,
            Outbox.idempotency_key,
            Outbox.attempts,
            Outbox.urgency,
        )
        .where(Outbox.status == _PENDING, Outbox.next_attempt_at <= bindparam("now"), ~waits)
        .order_by(Outbox.urgency, Outbox.next_attempt_at, Outbox.id)
        .limit(bindparam("limit"))
    )
    if lane == CUSTOMER_LANE:
        query = query.where(customer)
    elif lane == STAFF_LANE:
        query = query.where(~customer, Outbox.kind != _REMINDER)
    elif lane == REMINDER_LANE:
        # Nags wait for nothing (no lane check) and keep their own urgency (they lend and borrow
        # none): one range of ix_outbox_urgency, oldest due first.
        query = (
            select(*query.selected_columns)
            .where(
                Outbox.status == _PENDING,
                Outbox.urgency == _REMINDER_URGENCY,
                Outbox.kind == _REMINDER,
                Outbox.next_attempt_at <= bindparam("now"),
            )
            .order_by(Outbox.urgency, Outbox.next_attempt_at, Outbox.id)
            .limit(bindparam("limit"))
        )
    if postgres:
        query = query.with_for_update(skip_locked=True, of=Outbox)
    return query


@functools.cache
def _staff_claim_statement(lane: str) -> Any:
    """`OutboxSender._claim_staff`'s statement for `lane`, built once: the claim's SELECT (with the
    rows' due time, for their order) as a CTE, and an UPDATE .. RETURNING of its most urgent rows."""
    picked = _claim_query(True, lane).add_columns(Outbox.next_attempt_at).cte("picked")
    return (
        update(_OUTBOX)
        .where(
            _OUTBOX.c.id == picked.c.id,
            picked.c.urgency == select(func.min(picked.c.urgency)).scalar_subquery(),
        )
        .values(
            status=sql_constant(SENDING),
            attempts=_OUTBOX.c.attempts + 1,
            lease_until=bindparam("claim_lease_until"),
            owner=bindparam("claim_owner"),
        )
        .returning(
            _OUTBOX.c.id,
            _OUTBOX.c.kind,
            _OUTBOX.c.conversation_id,
            _OUTBOX.c.payload,
            _OUTBOX.c.idempotency_key,
            _OUTBOX.c.attempts,
            picked.c.urgency,
            picked.c.next_attempt_at,
        )
    )


def _gone(owner: str) -> bool:
    """True when a sender ran on this host and its process no longer exists (no need to wait for
    its lease: a restarted process takes over its rows at once)."""
    parts = owner.split(":")
    if len(parts) != 4 or parts[1] != socket.gethostname()[:40] or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sql_constant(value: str) -> ColumnElement[str]:
    """A constant (an outbox status or kind) written into the SQL text, not sent as a parameter.

    Only then can the planner prove that a partial index (``WHERE status = 'pending'``...)
    applies (SQLite always; PostgreSQL once psycopg prepares the statement with a generic plan).
    In the statement's text from the start: rendered at each execution (``literal_execute``, an
    expanding IN), it cost CPU on every claim and every card.
    """
    if not _CONSTANT.fullmatch(value):
        raise ValueError(f"not a constant for SQL: {value!r}")
    return literal_column(f"'{value}'", String)


_CONSTANT = re.compile(r"[a-z_]+")
_PENDING = sql_constant(PENDING)
_UNSENT = (sql_constant(PENDING), sql_constant(SENDING))
_LANE_FREE = tuple(sql_constant(kind) for kind in sorted(LANE_FREE_KINDS))
_HOLDS_NOTHING_BACK = tuple(sql_constant(kind) for kind in sorted(HOLDS_NOTHING_BACK))
_REMINDER = sql_constant("nag")  # the reminder lane's kind
_REMINDER_URGENCY = literal_column(str(int(URGENCY["nag"])), Integer)

# _SENT_UPDATE for a batch's sent rows in one statement (PostgreSQL: the rows as arrays, unnested).
_SENT_ROWS = (
    func.unnest(
        bindparam("b_ids", type_=ARRAY(Integer)),
        bindparam("b_sent_at", type_=ARRAY(DateTime(timezone=True))),
        bindparam("b_results", type_=ARRAY(Text)),
    )
    .table_valued("id", "sent_at", "result")
    .render_derived(name="sent_rows")
)
_SENT_ALL = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == _SENT_ROWS.c.id, _OUTBOX.c.status == sql_constant(SENDING))
    .values(
        status=sql_constant(SENT),
        lease_until=null(),
        owner=null(),
        sent_at=_SENT_ROWS.c.sent_at,
        result=_SENT_ROWS.c.result,
        last_error=null(),
    )
)


def _detached(row: Outbox) -> OutboxMessage:
    return OutboxMessage(
        row.id, row.kind, row.conversation_id, dict(row.payload), row.idempotency_key, row.attempts, row.owner
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
