"""The sender's own pace for Slack, shared by every process on the database, so that 429s are rare.

Slack's published limits (docs.slack.dev, "Rate limits"): ``chat.postMessage`` about one
message per second per channel, short bursts allowed; other methods by tier, per method and
workspace (Tier 2 20, Tier 3 50, Tier 4 100 calls a minute). These limits belong to the
workspace, not to a process: four workers posting into one channel share its one message a
second. So the budget lives in the database (`storage.models.SlackPace`, one row per
(method, channel)) and every process spends from the same row.

Each row is a token bucket kept as one number, its theoretical arrival time ``tat`` (the
generic cell rate algorithm): a call may go while ``tat`` is at most the bucket's tolerance
ahead of now, and each call moves ``tat`` on by one interval (1 s for a channel). Taking a
token is one conditional UPDATE (``... SET tat = max(tat, now) + interval WHERE tat <= now +
tolerance``) in a transaction of its own, committed without waiting for the disk on
PostgreSQL (pace lost in a crash costs at most a 429). A call that finds no token is not made;
the caller learns when it may go (the outbox re-queues the row for then, so a waiting channel
holds neither a claimed row nor the sender, and other channels' messages go on). A 429 that
comes anyway pushes ``tat`` past its ``Retry-After`` for every process.

Urgency under the limits: the last `Pace.reserve` tokens of a bucket are kept for urgent calls
(rank `URGENT_RANK` or lower: breach and escalation notices, unknown-fate warnings), so a breach
finds a token at once even while cards and nags keep the channel at its pace; and calls put off
are promised slots in two queues (urgent, ordinary; `OVERBOOK` calls a slot) so that a backlog
of cards is not re-tried all at every slot, while a breach put off is told the very next slot. Among the ordinary ones
the outbox's claim order (urgency, then due time) decides who takes a free slot.

If the database cannot be reached, each process paces itself alone (the local buckets below,
as before pacing was shared) and tries the database again after `RETRY_SHARED`.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Double, Engine, Update, bindparam, case, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from storage.db import READ_ONLY, make_engine
from storage.models import SlackPace

__all__ = ["POST", "RETRY_SHARED", "TIERS", "URGENT_RANK", "Pace", "Pacer", "SharedPacer", "pacing_engine"]

log = logging.getLogger("replyclock.slack")

URGENT_RANK = 0  # storage.models.URGENCY of breach, escalation and unknown-fate notices
ALIAS = "alias"  # SlackPace.method of a row naming a channel's id
RETRY_SHARED = 5.0
OVERBOOK = 2  # calls put off that are promised each slot  # seconds of local pacing after a database failure before trying it again
_LOG_EVERY = 60.0  # seconds between two "shared pacing unavailable" log lines


@dataclass(frozen=True)
class Pace:
    """A bucket's shape: `burst` calls at once, then `per_second`.

    `reserve`: how many of the `burst` tokens only urgent calls may take. `horizon`: how far
    ahead (seconds) calls put off are promised distinct slots; beyond it they are spread at
    random over the next `horizon` (they ask again then).
    """

    per_second: float
    burst: float
    reserve: float = 1.0
    horizon: float = 60.0

    @property
    def interval(self) -> float:
        return 1.0 / self.per_second

    def tolerance(self, rank: int) -> float:
        """Seconds ``tat`` may be ahead of now for a call of `rank` to go."""
        spare = self.burst - 1.0 - (0.0 if rank <= URGENT_RANK else self.reserve)
        return max(spare, 0.0) * self.interval


# chat.postMessage per channel: Slack's ~1/s, with a burst of 3 (Slack publishes no number; the
# stand-in allows 4), the last one kept for breaches and escalations. Horizons are long: a call
# put off then asks again about once. (With 2 minutes, a storm's thousands of rows put off asked
# again every few minutes each, and the senders spent their time putting them off again while
# the acknowledgements waited.)
POST = Pace(per_second=1.0, burst=3.0, reserve=1.0, horizon=900.0)

# Per method (workspace-wide), a little under the published tier; unknown methods go unpaced.
_TIER3 = Pace(per_second=45 / 60, burst=10.0, reserve=3.0, horizon=900.0)  # Tier 3: 50/min
_TIER4 = Pace(per_second=90 / 60, burst=10.0, reserve=3.0, horizon=600.0)  # Tier 4: 100/min
TIERS: Mapping[str, Pace] = {
    "chat.update": _TIER3,
    "conversations.open": _TIER3,
    "conversations.history": _TIER3,  # looking up a card whose post was not recorded
    "conversations.replies": _TIER3,
    "chat.postEphemeral": _TIER4,
    "views.open": _TIER4,
    "views.update": _TIER4,
    "views.publish": _TIER4,
    "users.info": _TIER4,
}


@dataclass
class _State:
    """One bucket: its theoretical arrival time and the next promised slots (seconds since the epoch)."""

    tat: float
    tail: float
    urgent_tail: float

    @classmethod
    def full(cls, now: float) -> _State:
        return cls(now, now, now)


# What a call does to a bucket.
TAKE, READY, SPEND, BLOCK, TRY = "take", "ready", "spend", "block", "try"


def _step(state: _State, pace: Pace, now: float, op: str, rank: int, until: float) -> float | None:
    """Apply `op` to `state` (in place); None: the call may go now, else when it may go.

    TAKE takes a token or promises a slot; TRY takes a token or says when one is there (no slot
    promised: for a group of rows waiting together); READY only looks; SPEND takes a token even if there is
    none (a call made anyway); BLOCK closes the bucket until `until` (a 429's Retry-After), after
    which one call may go, then the pace.
    """
    interval = pace.interval
    if op == BLOCK:
        state.tat = max(state.tat, until + pace.tolerance(URGENT_RANK))
        return None
    if op == SPEND:
        state.tat = max(state.tat, now) + interval
        return None
    tolerance = pace.tolerance(rank)
    if state.tat <= now + tolerance:
        if op in (TAKE, TRY):
            state.tat = max(state.tat, now) + interval
        return None
    ready = state.tat - tolerance
    if op in (READY, TRY):
        return ready
    urgent = rank <= URGENT_RANK
    queue = state.urgent_tail if urgent else state.tail
    slot = max(ready, queue)
    if slot > now + pace.horizon:
        # A backlog longer than the horizon: ask again somewhere in the next horizon, not all at once.
        return max(ready, now + pace.horizon + random.uniform(0.0, pace.horizon))
    # Two calls promised each slot: one whose row was retired or taken by a storm meanwhile does
    # not leave the slot unused; if both come, the second is promised a later one.
    if urgent:
        state.urgent_tail = slot + interval / OVERBOOK
    else:
        state.tail = slot + interval / OVERBOOK
    return slot


def _moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class Pacer:
    """Token buckets keyed by (method, channel), in this process only; thread-safe.

    Args:
        now: the clock (the process's, so a fake clock in tests paces in fake time).
        post: the per-channel pace of ``chat.postMessage``.
        tiers: the per-method pace of other methods.
    """

    def __init__(
        self,
        now: Callable[[], datetime],
        *,
        post: Pace = POST,
        tiers: Mapping[str, Pace] = TIERS,
    ) -> None:
        self._now = now
        self._post = post
        self._tiers = dict(tiers)
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _State] = {}
        self._aliases: dict[str, str] = {}  # "#care" -> "C0CARE0001", as Slack answered

    def channel_id(self, name: str) -> str | None:
        """The id Slack answered for channel `name` (``#care``), if a post there taught it."""
        with self._lock:
            return self._aliases.get(name)

    def learn(self, name: str, channel_id: str) -> None:
        """`name` (``#care``, as configured) is `channel_id` (as Slack answered): one bucket for both."""
        if not name or name == channel_id:
            return
        with self._lock:
            if self._aliases.get(name) == channel_id:
                return
            self._aliases[name] = channel_id
            for method in {m for m, c in self._buckets if c == name}:
                old, new = self._buckets.pop((method, name)), self._buckets.get((method, channel_id))
                self._buckets[(method, channel_id)] = old if new is None or old.tat > new.tat else new

    def _key(self, method: str, channel: str | None) -> tuple[tuple[str, str], Pace] | None:
        """The bucket of a call and its pace; None: not paced."""
        if method == "chat.postMessage":
            channel = channel or ""
            with self._lock:
                return (method, self._aliases.get(channel, channel)), self._post
        pace = self._tiers.get(method)
        return ((method, ""), pace) if pace is not None else None

    def spend(self, method: str, channel: str | None) -> None:
        """A call made whatever the pace (a best-effort note): it uses a token, even one not there yet."""
        self._token(method, channel, SPEND)

    def take(self, method: str, channel: str | None, *, rank: int = 0) -> datetime | None:
        """Take one call's token: None if the call may go now, else when it may go.

        `rank` is the outbox's urgency (lower first): urgent calls (`URGENT_RANK`) may take the
        bucket's reserve. Calls put off are told the next slot promised to nobody of their queue
        (urgent or ordinary), so a queue of N cards is not re-tried N times a slot, while a
        breach put off is still told the very next slot.
        """
        return self._token(method, channel, TAKE, rank=rank)

    def try_take(self, method: str, channel: str | None, *, rank: int = 0) -> datetime | None:
        """Like `take`, but a call put off is promised no slot: told when a token is there.

        For a call that stands for a group of rows waiting together (a storm digest, an overdue
        digest): they need the channel's next free moment, once. (Promised a slot each time it is
        put off, a storm's digests drove the queue of promised slots minutes ahead of a channel
        that stood idle.)
        """
        return self._token(method, channel, TRY, rank=rank)

    def ready(self, method: str, channel: str | None, *, rank: int = 0) -> datetime | None:
        """Like `take` without taking: None if a call of `rank` could go now, else when it could."""
        return self._token(method, channel, READY, rank=rank)

    def block(self, method: str, channel: str | None, until: datetime) -> None:
        """Slack answered 429: no call of this bucket before `until` (its Retry-After)."""
        self._token(method, channel, BLOCK, until=until)

    def _token(
        self, method: str, channel: str | None, op: str, *, rank: int = 0, until: datetime | None = None
    ) -> datetime | None:
        found = self._key(method, channel)
        if found is None:
            return None
        key, pace = found
        now = self._now().timestamp()
        later = until.timestamp() if until is not None else now
        answer = self._apply(key, pace, now, op, rank, later)
        return None if answer is None else _moment(answer)

    def _apply(
        self, key: tuple[str, str], pace: Pace, now: float, op: str, rank: int, until: float
    ) -> float | None:
        with self._lock:
            state = self._buckets.get(key)
            if state is None:
                state = self._buckets[key] = _State.full(now)
            return _step(state, pace, now, op, rank, until)


class SharedPacer(Pacer):
    """The same buckets, kept in the database (`SlackPace`) so that every process spends from one budget.

    Args:
        now: the clock.
        engine: the database every process of this deployment uses; see `pacing_engine` for
            one whose commits do not wait for the disk on PostgreSQL.
        post, tiers: as for `Pacer`.

    A channel configured by name (``#care``) goes by its id once any process learned it from
    Slack's answer (an ``alias`` row; a process that does not know a name yet looks it up, at
    most every `RETRY_SHARED` seconds). A database error makes this process pace itself alone (`Pacer`) for `RETRY_SHARED`
    seconds, with one log line a minute at most.
    """

    def __init__(
        self,
        now: Callable[[], datetime],
        engine: Engine,
        *,
        post: Pace = POST,
        tiers: Mapping[str, Pace] = TIERS,
    ) -> None:
        super().__init__(now, post=post, tiers=tiers)
        self._engine = engine
        self._reader = engine.execution_options(**{READ_ONLY: True})  # no write lock on SQLite
        self._postgres = engine.dialect.name == "postgresql"
        self._insert = pg_insert if self._postgres else sqlite_insert
        self._local_until = 0.0  # monotonic: pace locally until then (the database failed)
        self._logged_at = -_LOG_EVERY
        self.fallbacks = 0  # calls paced locally because the database failed
        self._unknown: dict[str, float] = {}  # name -> monotonic time to look it up again

    def learn(self, name: str, channel_id: str) -> None:
        known = bool(name) and self._aliases.get(name) == channel_id
        super().learn(name, channel_id)
        if known or not name or name == channel_id:
            return
        try:
            with self._engine.connect() as db:
                db.execute(
                    self._insert(SlackPace)
                    .values(
                        method=ALIAS, channel=name, tat=0.0, tail=0.0, urgent_tail=0.0, same_as=channel_id
                    )
                    .on_conflict_do_nothing()
                )
                db.commit()
        except SQLAlchemyError:
            return  # best effort: other processes learn it from their own first post

    def channel_id(self, name: str) -> str | None:
        self._look_up(name)  # another process may have posted there
        return super().channel_id(name)

    def _key(self, method: str, channel: str | None) -> tuple[tuple[str, str], Pace] | None:
        if method == "chat.postMessage" and channel and channel.startswith("#"):
            self._look_up(channel)
        return super()._key(method, channel)

    def _look_up(self, name: str) -> None:
        """Learn which channel id `name` is, if another process has (not again for a while if not)."""
        with self._lock:
            if name in self._aliases or self._unknown.get(name, 0.0) > time.monotonic():
                return
            self._unknown[name] = time.monotonic() + RETRY_SHARED
        if time.monotonic() < self._local_until:
            return
        try:
            with self._reader.connect() as db:
                same_as = db.scalar(
                    select(SlackPace.same_as).where(SlackPace.method == ALIAS, SlackPace.channel == name)
                )
                db.rollback()
        except SQLAlchemyError:
            return
        if same_as:
            Pacer.learn(self, name, same_as)

    def _apply(
        self, key: tuple[str, str], pace: Pace, now: float, op: str, rank: int, until: float
    ) -> float | None:
        if time.monotonic() < self._local_until:
            self.fallbacks += 1
            return super()._apply(key, pace, now, op, rank, until)
        try:
            return self._shared(key, pace, now, op, rank, until)
        except SQLAlchemyError as error:
            self._local_until = time.monotonic() + RETRY_SHARED
            self.fallbacks += 1
            if time.monotonic() - self._logged_at >= _LOG_EVERY:
                self._logged_at = time.monotonic()
                orig = getattr(error, "orig", None) or error
                log.warning(
                    "shared Slack pacing unavailable; pacing this process alone",
                    extra={"error": f"{type(orig).__name__}: {orig}".splitlines()[0][:300]},
                )
            return super()._apply(key, pace, now, op, rank, until)

    def _shared(
        self, key: tuple[str, str], pace: Pace, now: float, op: str, rank: int, until: float
    ) -> float | None:
        method, channel = key
        where = (SlackPace.method == method, SlackPace.channel == channel)
        columns = (SlackPace.tat, SlackPace.tail, SlackPace.urgent_tail)
        if op == READY:
            with self._reader.connect() as db:
                found = db.execute(select(*columns).where(*where)).first()
                db.rollback()
            state = _State(*found) if found is not None else _State.full(now)
            return _step(state, pace, now, op, rank, until)
        with self._engine.connect() as db:
            if op in (TAKE, SPEND, TRY):
                # The common case, one statement built once: a token is there (or is spent anyway).
                limit = now + pace.tolerance(rank) if op != SPEND else math.inf
                changed = db.execute(
                    _TAKE,
                    {
                        "b_method": method,
                        "b_channel": channel,
                        "now": now,
                        "step": pace.interval,
                        "limit": limit,
                    },
                ).rowcount
                db.commit()
                if changed:
                    return None
            # No token (or a new bucket, or a 429): read, decide and write under the row's lock.
            for _ in range(2):
                query = select(*columns).where(*where)
                if self._postgres:
                    query = query.with_for_update()
                found = db.execute(query).first()
                state = _State(*found) if found is not None else _State.full(now)
                answer = _step(state, pace, now, op, rank, until)
                values = {"tat": state.tat, "tail": state.tail, "urgent_tail": state.urgent_tail}
                if found is not None:
                    db.execute(update(SlackPace).where(*where).values(**values))
                elif not db.execute(
                    self._insert(SlackPace)
                    .values(method=method, channel=channel, **values)
                    .on_conflict_do_nothing()
                ).rowcount:
                    db.rollback()
                    continue  # another process made the row meanwhile: decide on it
                db.commit()
                return answer
        raise RuntimeError("the pace row was both missing and present")  # pragma: no cover


def _take_statement() -> Update:
    """``UPDATE slack_pace SET tat = max(tat, :now) + :step WHERE (method, channel) = .. AND tat <= :limit``.

    Built once, with bound parameters only (SQLAlchemy then reuses its compiled form): the
    statement every paced Slack call runs. ``max`` as a CASE, which SQLite and PostgreSQL both speak.
    """
    now = bindparam("now", type_=Double)
    return (
        update(SlackPace)
        .where(
            SlackPace.method == bindparam("b_method"),
            SlackPace.channel == bindparam("b_channel"),
            SlackPace.tat <= bindparam("limit", type_=Double),
        )
        .values(tat=case((SlackPace.tat > now, SlackPace.tat), else_=now) + bindparam("step", type_=Double))
    )


_TAKE = _take_statement()


def pacing_engine(engine: Engine) -> Engine:
    """An engine for `SharedPacer` on `engine`'s database.

    On PostgreSQL a small one of its own whose commits do not wait for the WAL flush
    (``synchronous_commit=off``: a crash may lose the last few milliseconds of pace, which costs
    at most a 429, never a message); on SQLite `engine` itself (one process writes there).
    """
    if engine.dialect.name != "postgresql":
        return engine
    return make_engine(
        engine.url.render_as_string(hide_password=False),
        pool_size=2,
        max_overflow=4,
        connect_args={"options": "-c synchronous_commit=off"},
    )
