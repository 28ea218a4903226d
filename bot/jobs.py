"""Every scheduled job of a replyclock process, in one place, each with a stable id.

APScheduler (3.x, in-memory job store, one scheduler per process) only decides *when* a
process looks; the database decides *who* does the work (see bot.flow.sweep, bot.flow.outbox), so
any number of processes can run these jobs against one PostgreSQL.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm.exc import StaleDataError

from bot.flow.context import AppContext
from bot.flow.ingest import IngestResult, ingest_batch
from bot.flow.outbox import (
    CUSTOMER_LANE,
    LANES,
    RECOVER_INTERVAL,
    REMINDER_LANE,
    STAFF_LANE,
    OutboxSender,
    one_line,
)
from bot.flow.retention import prune
from bot.flow.startup import configuration_notices
from bot.flow.sweep import earliest_next_action, sweep
from bot.logs import redact_urls
from bot.reports.digest_delivery import DIGEST_JOB_PREFIX, digest_trigger, enqueue_due_digests
from bot.telemetry import record_connector_error, record_ingested, record_rate_limit
from connectors.base import AuthFailed, Connector, InboundPost, RateLimited, SkippedItem
from storage import repo
from storage.db import WAL_SIZE_LIMIT_BYTES, Checkpoint, checkpoint, wal_bytes
from storage.models import Account

log = logging.getLogger("replyclock.jobs")

SWEEP_JOB = "sweep"
SWEEP_WAKE_JOB = "sweep-wake"
SWEEP_WATCH_JOB = "sweep-watch"
# How often a process looks for ladder steps written elsewhere (a webhook's new conversation in the
# web process, another worker): one index probe; the wake-up moves earlier when a step is due sooner.
SWEEP_WATCH_INTERVAL = timedelta(seconds=1)
# A wake-up is never set sooner than this after a sweep ends: a step still due then is being taken
# by another process (SKIP LOCKED), and looking again at once would only spin until it commits.
MIN_WAKE_GAP = timedelta(milliseconds=100)
# Outbox drains that may run at once in a process: the interval job's and one started by a sweep.
OUTBOX_DRAINS = 2
OUTBOX_JOB = "outbox"  # the staff and reminder lanes (Slack)
OUTBOX_CUSTOMER_JOB = "outbox-customer"  # the customer lane (acknowledgements, replies)
STAFF_LANES = (STAFF_LANE, REMINDER_LANE)
OUTBOX_RECOVER_JOB = "outbox-recover"
STARTUP_JOB = "startup"
RETENTION_JOB = "retention"
RETENTION_INTERVAL = timedelta(hours=1)
# SQLite: the write-ahead log is copied into the database file by this job, in the process's idle
# time, rather than by SQLite inside whichever commit fills it (see storage.db).
WAL_CHECKPOINT_JOB = "wal-checkpoint"
WAL_CHECKPOINT_INTERVAL = timedelta(seconds=1)
# A log file still this big after a passive checkpoint is emptied by a TRUNCATE checkpoint, which
# waits up to WAL_TRUNCATE_WAIT for the writer and for readers that still see older pages.
WAL_TRUNCATE_ABOVE_BYTES = WAL_SIZE_LIMIT_BYTES
WAL_TRUNCATE_WAIT = timedelta(seconds=2)
MAX_PAGES_PER_POLL = 20
INGEST_ATTEMPTS = 3
ERROR_BACKOFF_BASE = timedelta(seconds=30)  # first back-off after a failed fetch: 1-2 x this
# The admin channel hears of a failing account after this many failed polls in a row (the
# default of REPLYCLOCK_ALERT_AFTER_FAILURES).
ALERT_AFTER_FAILURES = 3


def alert_after_failures() -> int:
    """`REPLYCLOCK_ALERT_AFTER_FAILURES` (default 3), validated with the other settings."""
    from bot.config.settings import load_settings

    return load_settings().replyclock_alert_after_failures


def sweep_max_interval() -> timedelta:
    """`SWEEP_MAX_INTERVAL` seconds (default 60): the longest the sweep ever sleeps."""
    from bot.config.settings import load_settings

    return timedelta(seconds=load_settings().sweep_max_interval)


@dataclass(frozen=True)
class _Park:
    """A poll's decision to park its account until `until`, for the reason `error`."""

    until: datetime
    error: str

    def values(self, now: datetime) -> dict[str, object]:
        """The account columns that record it."""
        return {"parked_until": self.until, "last_error": redact_urls(self.error)[:2000], "last_poll_at": now}


def wake_outbox(scheduler: BaseScheduler) -> None:
    """Start both outbox drains now (each skips the start while OUTBOX_DRAINS of it already run)."""
    for job_id in (OUTBOX_JOB, OUTBOX_CUSTOMER_JOB):
        scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))


class Jobs:
    """The jobs of one process, bound to its context, connectors and outbox sender."""

    def __init__(
        self,
        ctx: AppContext,
        connectors: Mapping[str, Connector],
        sender: OutboxSender,
        *,
        send_after_poll: bool = True,
    ) -> None:
        self.ctx = ctx
        self.send_after_poll = send_after_poll
        self.connectors = dict(connectors)
        self.sender = sender
        self.alert_after_failures = alert_after_failures()
        self.scheduler: BaseScheduler | None = None
        self._lock = threading.Lock()
        self._sweeping = 0  # run_sweep calls under way in this process (each sets the wake-up at its end)
        self.wal_truncate_above = WAL_TRUNCATE_ABOVE_BYTES
        self.wal_truncate_wait = WAL_TRUNCATE_WAIT

    def install(self, scheduler: BaseScheduler, *, outbox_interval: timedelta = timedelta(seconds=2)) -> None:
        """Register every job on `scheduler` (not yet started)."""
        self.scheduler = scheduler
        common = {"max_instances": 1, "coalesce": True, "replace_existing": True}
        # At start-up: sweep what fell due while the process was down, and post a digest missed then (once).
        scheduler.add_job(
            self._guard(self.catch_up), "date", id=STARTUP_JOB, replace_existing=True, misfire_grace_time=None
        )
        scheduler.add_job(
            self._guard(self.run_sweep),
            "interval",
            seconds=sweep_max_interval().total_seconds(),
            id=SWEEP_JOB,
            **common,
        )
        scheduler.add_job(
            self._guard(self.watch),
            "interval",
            seconds=SWEEP_WATCH_INTERVAL.total_seconds(),
            id=SWEEP_WATCH_JOB,
            **common,
        )
        # Two drains: customer messages never wait for a Slack batch (see OutboxSender.send_due).
        for job_id, lanes in ((OUTBOX_JOB, STAFF_LANES), (OUTBOX_CUSTOMER_JOB, (CUSTOMER_LANE,))):
            scheduler.add_job(
                self._guard(self.run_outbox),
                "interval",
                args=[lanes],
                seconds=outbox_interval.total_seconds(),
                id=job_id,
                next_run_time=datetime.now(UTC),  # at once: what a previous run left is due now
                **{**common, "max_instances": OUTBOX_DRAINS},
            )
        scheduler.add_job(
            self._guard(self.recover),
            "interval",
            seconds=RECOVER_INTERVAL.total_seconds(),
            id=OUTBOX_RECOVER_JOB,
            **common,
        )
        for team in self.ctx.policy.teams:
            # Each team's cron fires at its digest time in its own zone; run_digests is idempotent.
            trigger = digest_trigger(self.ctx, team)
            if trigger is None:  # digest = "off"
                continue
            scheduler.add_job(
                self._guard(self.run_digests),
                trigger,
                id=f"{DIGEST_JOB_PREFIX}{team}",
                misfire_grace_time=None,
                **common,
            )
        for name, connector in self.connectors.items():
            if connector.push:
                continue
            account = self.ctx.policy.accounts[name]
            scheduler.add_job(
                self._guard(self.poll),
                "interval",
                args=[name],
                seconds=account.poll_interval.total_seconds(),
                id=f"poll:{name}",
                next_run_time=datetime.now(UTC),
                **common,
            )

        # What replyclock keeps, and for how long (issue 11; see bot.flow.retention).
        scheduler.add_job(
            self._guard(self.run_retention),
            "interval",
            seconds=RETENTION_INTERVAL.total_seconds(),
            id=RETENTION_JOB,
            **common,
        )
        if self.ctx.engine.dialect.name == "sqlite":
            scheduler.add_job(
                self._guard(self.checkpoint_wal),
                "interval",
                seconds=WAL_CHECKPOINT_INTERVAL.total_seconds(),
                id=WAL_CHECKPOINT_JOB,
                **common,
            )

    def checkpoint_wal(self) -> Checkpoint | None:
        """SQLite: copy the write-ahead log into the database file while no sweep runs here.

        Passive: writers go on meanwhile. When the log file is then still above
        WAL_TRUNCATE_ABOVE_BYTES (a long reader kept it from restarting, or a burst grew it), a
        TRUNCATE checkpoint waits up to WAL_TRUNCATE_WAIT for the writer and the readers and empties
        it; a log still held is one warning line, and the next run tries again (SQLite's automatic
        checkpoint, storage.db, stays the backstop). None when skipped (a sweep is under way, or
        not SQLite).
        """
        engine = self.ctx.engine
        if engine.dialect.name != "sqlite":
            return None
        with self._lock:
            if self._sweeping:
                return None  # the sweep's commits go first; the next run comes within a second
        try:
            done = checkpoint(engine)
            if done is None or wal_bytes(engine) <= self.wal_truncate_above:
                return done
            done = checkpoint(engine, "TRUNCATE", busy_timeout=self.wal_truncate_wait.total_seconds())
        except sqlite3.Error as error:  # disk full, I/O error: one line, again in a second
            log.error("database unavailable", extra={"job": "checkpoint_wal", "error": one_line(error)})
            return None
        if done is not None and not done.complete:
            log.warning(
                "write-ahead log not checkpointed: a reader still holds it",
                extra={"wal_bytes": wal_bytes(engine), "log_frames": done.log_frames},
            )
        return done

    def run_retention(self) -> None:
        """Prune what the policy's retention says is no longer kept (several processes may run it)."""
        try:
            done = prune(self.ctx, self.ctx.clock.now())
        except Exception:
            log.exception("retention job failed")
            return
        log.info(
            "retention applied",
            extra={"outbox": done.outbox, "events": done.events, "texts": done.texts, "seen": done.seen},
        )

    def _guard(self, job: Callable[..., object]) -> Callable[..., None]:
        """A job as the scheduler runs it: a database that is away (connection cut, disk full, locked
        too long) is one error line naming the job, not a scheduler traceback; the job runs again
        on its schedule."""
        name = getattr(job, "__name__", "job")

        @functools.wraps(job)
        def guarded(*args: object) -> None:
            try:
                job(*args)
            except (OperationalError, InterfaceError) as error:
                log.error("database unavailable", extra={"job": name, "error": one_line(error)})

        return guarded

    def recover(self) -> None:
        """Settle rows of senders that died (within seconds: their leases lapse), then send them."""
        if self.sender.recover():
            self.send_soon()

    def catch_up(self) -> None:
        """What a process does first: tell the admins of doubtful settings, sweep everything due,
        then queue any digest whose time passed."""
        self.report_configuration()
        self.run_sweep()
        self.run_digests()

    def report_configuration(self) -> int:
        """Configuration problems found at start-up, to the admin channel, each once a day."""
        now = self.ctx.clock.now()
        written = 0
        for text in configuration_notices(self.ctx.policy):
            log.warning("configuration problem", extra={"problem": text})
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            with self.ctx.sessions() as session, session.begin():
                written += repo.enqueue(
                    session=session,
                    kind="admin_alert",
                    key=f"config:{digest}:{now:%Y%m%d}",
                    payload={
                        "account": "config",
                        "text": text,
                        "channel": self.ctx.policy.settings.admin_channel,
                    },
                    now=now,
                )
        return written

    def run_sweep(self) -> None:
        """Sweep now, set the wake-up for the next due conversation, then have what it wrote sent.

        The sending is the outbox job's, started now: a sweep that sent its own messages would
        set its next wake-up only after the whole outbox was drained, seconds or minutes late
        in a storm.
        """
        with self._lock:
            self._sweeping += 1
        try:
            result = sweep(self.ctx)
        finally:
            try:
                self.schedule_wake()
            finally:
                with self._lock:
                    self._sweeping -= 1
        if result.processed:
            log.info(
                "sweep",
                extra={"processed": result.processed, "steps": result.steps, "failed": result.failed},
            )
            self.send_soon()

    def send_soon(self) -> None:
        """Start the outbox job now (send here and now without a scheduler).

        When OUTBOX_DRAINS drains already run, the scheduler skips this start: they take the
        new rows, as each drain claims until nothing is due.
        """
        if self.scheduler is None:
            self.run_outbox()
            return
        wake_outbox(self.scheduler)

    def watch(self) -> None:
        """Wake the sweep sooner when a step written elsewhere falls due before the planned wake-up.

        Another process's writes (a webhook's new conversation, a step another worker planned)
        are otherwise seen only at this process's next sweep, up to SWEEP_MAX_INTERVAL later;
        and a wake-up the scheduler skipped because the sweep was still running is set again here.
        """
        if self.scheduler is None:
            return
        with self._lock:
            if self._sweeping:
                return  # the sweep under way sets the wake-up when it ends
        earliest = earliest_next_action(self.ctx)
        if earliest is None:
            return
        wake = self.scheduler.get_job(SWEEP_WAKE_JOB)
        if wake is not None and wake.next_run_time is not None and wake.next_run_time <= earliest:
            return
        self.schedule_wake()

    def schedule_wake(self) -> None:
        """Wake the sweep at the earliest next_action_at (the interval job is the safety net)."""
        if self.scheduler is None:
            return
        earliest = earliest_next_action(self.ctx)
        if earliest is None:
            return
        now = self.ctx.clock.now()
        when = max(min(earliest, now + sweep_max_interval()), now + MIN_WAKE_GAP)
        self.scheduler.add_job(
            self._guard(self.run_sweep),
            "date",
            run_date=when,
            id=SWEEP_WAKE_JOB,
            replace_existing=True,
            misfire_grace_time=None,
        )

    def run_digests(self) -> None:
        """Queue each team's digest of last week once its time has come (idempotent), then send."""
        if enqueue_due_digests(self.ctx):
            self.run_outbox()

    def run_outbox(self, lanes: Sequence[str] = LANES) -> None:
        result = self.sender.send_due(lanes=lanes)
        if result.unknown:
            # Sent but unconfirmed (a timeout after the request left): never resent, so a human
            # should look whether the customer got it.
            self._alert_admins(
                "outbox",
                f"{result.unknown} message(s) of unknown fate (the platform may or may not have posted "
                "them; they are not resent): see the outbox rows with status 'unknown'",
                topic="unknown",
            )
        if result.sent or result.retried or result.failed or result.unknown:
            log.info(
                "outbox",
                extra={
                    "sent": result.sent,
                    "retried": result.retried,
                    "failed": result.failed,
                    "unknown": result.unknown,
                },
            )

    def poll(self, name: str) -> int:
        """Fetch new posts of one account (following pages) and ingest them with their cursor."""
        connector = self.connectors[name]
        now = self.ctx.clock.now()
        with self.ctx.sessions() as session, session.begin():
            account = repo.get_or_create_account(session=session, name=name, kind=connector.kind)
            cursor, parked_until, account_id = account.cursor, account.parked_until, account.id
            last_error = account.last_error or ""
        if parked_until is not None and parked_until > now:
            return 0
        # The pages of one poll are ingested together, in one transaction with the last cursor, and
        # so in time order: platforms page newest first, and a page acted on before the older posts
        # on the next one are known answers a conversation for good although the customer wrote
        # again after our answer, or acknowledges a post whose author's earlier STOP is on the next
        # page. A failure part-way ingests the pages fetched so far, with their cursor.
        posts: list[InboundPost] = []
        skipped: list[SkippedItem] = []
        # Admin notices are written after the pages are ingested: the cursor comes first.
        notices: list[tuple[str, str]] = []
        # Parking (or resuming) is written with the cursor, in the ingest's transaction and after
        # it: nobody sees the account parked on a page whose cursor is not stored yet.
        park: _Park | None = None
        resumed = False
        fetched = cursor
        for _page in range(MAX_PAGES_PER_POLL):
            try:
                batch = connector.fetch(fetched)
            except RateLimited as error:
                record_rate_limit(name, (error.reset_at - now).total_seconds())
                park = _Park(error.reset_at, str(error))
                log.warning(
                    "connector rate limited", extra={"account": name, "until": error.reset_at.isoformat()}
                )
                notices.append(
                    (
                        "ratelimit",
                        f"{name}: rate limited; polling parked until {error.reset_at:%Y-%m-%d %H:%M} UTC",
                    )
                )
                break
            except AuthFailed as error:
                record_connector_error(name, "auth")
                connector.record_failure()
                park = _Park(now + timedelta(minutes=15), str(error))
                log.error("connector credentials refused", extra={"account": name, "error": str(error)})
                self._alert_admins(name, f"{name}: credentials refused ({error}); polling paused for 15 min")
                break
            except Exception as error:
                record_connector_error(name, "error")
                connector.record_failure()
                # Back off from the account's own interval (at most 30 s), not a fixed 30 s: an account
                # polled every few seconds should not go quiet for a minute after one 503.
                base = min(self.ctx.policy.accounts[name].poll_interval, ERROR_BACKOFF_BASE)
                park = _Park(now + connector.next_poll_delay(base), str(error))
                log.exception("connector fetch failed", extra={"account": name})
                if connector.consecutive_failures >= self.alert_after_failures:
                    notices.append(
                        (
                            "failing",
                            f"{name}: {connector.consecutive_failures} polls in a row failed "
                            f"({type(error).__name__}: {str(error)[:300]}); retrying with back-off",
                        )
                    )
                break
            if parked_until is not None and _page == 0:
                # It had been parked and works again; the admins hear of it when they heard of the
                # park (a rate limit, or failures enough to be reported), not after one blip.
                resumed = True
                if (
                    "rate limit" in last_error.lower()
                    or connector.consecutive_failures >= self.alert_after_failures
                ):
                    notices.append(("resumed", f"{name}: polling resumed"))
            connector.record_success()
            posts.extend(batch.posts)
            skipped.extend(batch.skipped)
            fetched = batch.cursor
            if not batch.more:
                break
        parking: dict[str, object] | None = None
        if park is not None:
            parking = park.values(self.ctx.clock.now())
        elif resumed:
            parking = {"parked_until": None}
        stored = 0
        if posts or skipped or fetched != cursor:
            try:
                result = self._ingest(name, connector, posts, fetched, skipped, account_id, parking)
            except Exception:
                if parking is not None:  # parked (or resumed) all the same: that is the platform's word
                    self._update_account(account_id, parking)
                raise
            stored = result.stored
            record_ingested(name, connector.kind, result.stored)
        elif parking is not None:
            self._update_account(account_id, parking)
        for topic, text in notices:
            self._alert_admins(name, text, topic=topic)
        if skipped:
            record_connector_error(name, "malformed")
            log.warning(
                "connector items skipped",
                extra={
                    "account": name,
                    "skipped": len(skipped),
                    "fields": sorted({s.field for s in skipped}),
                },
            )
            first = skipped[0]
            self._alert_admins(
                name,
                f"{name}: {len(skipped)} malformed item(s) skipped ({first.field}: {first.reason}); "
                "the rest of the page was ingested. The raw items are kept in skipped_items.",
                topic="skipped",
            )
        if stored:
            if self.send_after_poll:
                # Started as the outbox job, not sent from here: a send waiting on a slow Slack
                # must not hold the poll (the next poll would be skipped while it waits).
                self.send_soon()
            self.schedule_wake()
        return stored

    def _ingest(
        self,
        name: str,
        connector: Connector,
        posts: list[InboundPost],
        cursor: str | None,
        skipped: Sequence[SkippedItem] = (),
        account_id: int | None = None,
        account_values: Mapping[str, object] | None = None,
    ) -> IngestResult:
        """One batch in one transaction; again if a conversation changed under it (PostgreSQL).

        `account_values` (parking or resuming the account) are written in that transaction after
        the cursor, so the account is never seen parked with an older cursor than its posts.

        Ingest reads conversations without locking them and updates them with the optimistic
        version check, so a sweep that moved one meanwhile fails the batch with StaleDataError.
        The batch is idempotent (posts are stored once per external id): doing it again is safe.
        """
        for attempt in range(1, INGEST_ATTEMPTS + 1):
            try:
                with self.ctx.sessions() as session, session.begin():
                    result = ingest_batch(
                        session, self.ctx, account=name, posts=posts, is_own=connector.is_own, cursor=cursor
                    )
                    # Recorded with the cursor that moved past them, in the same transaction.
                    repo.record_skipped(
                        session=session, account=name, items=skipped, now=self.ctx.clock.now()
                    )
                    if account_id is not None and account_values:
                        session.execute(
                            update(Account).where(Account.id == account_id).values(**account_values)
                        )
                    return result
            except StaleDataError:
                if attempt == INGEST_ATTEMPTS:
                    raise
                log.info(
                    "a conversation changed during ingest; ingesting the batch again", extra={"account": name}
                )
        raise AssertionError("unreachable")

    def _alert_admins(self, account: str, text: str, *, topic: str = "alert") -> None:
        """One alert per account, topic and hour to the admin channel (through the outbox, like everything)."""
        now = self.ctx.clock.now()
        with self.ctx.sessions() as session, session.begin():
            repo.enqueue(
                session=session,
                kind="admin_alert",
                key=f"{topic}:{account}:{now:%Y%m%dT%H}",
                payload={
                    "account": account,
                    "text": redact_urls(text),
                    "channel": self.ctx.policy.settings.admin_channel,
                },
                now=now,
            )

    def _update_account(self, account_id: int, values: Mapping[str, object]) -> None:
        with self.ctx.sessions() as session, session.begin():
            session.execute(update(Account).where(Account.id == account_id).values(**values))
