"""Every scheduled job of a replyclock process, in one place, each with a stable id.

APScheduler (3.x, in-memory job store, one scheduler per process) only decides *when* a
process looks; the database decides *who* does the work (see bot.sweep, bot.outbox), so
any number of processes can run these jobs against one PostgreSQL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import update

from bot.context import AppContext
from bot.digest_delivery import DIGEST_JOB_PREFIX, digest_trigger, enqueue_due_digests
from bot.ingest import ingest_batch
from bot.metrics import record_connector_error, record_ingested, record_rate_limit
from bot.outbox import OutboxSender
from bot.sweep import earliest_next_action, sweep
from connectors.base import AuthFailed, Connector, RateLimited
from storage import repo
from storage.models import Account

log = logging.getLogger("replyclock.jobs")

SWEEP_JOB = "sweep"
SWEEP_WAKE_JOB = "sweep-wake"
OUTBOX_JOB = "outbox"
OUTBOX_RECOVER_JOB = "outbox-recover"
STARTUP_JOB = "startup"
MAX_PAGES_PER_POLL = 20
ERROR_BACKOFF_BASE = timedelta(seconds=30)  # first back-off after a failed fetch: 1-2 x this


def sweep_max_interval() -> timedelta:
    """`SWEEP_MAX_INTERVAL` seconds (default 60): the longest the sweep ever sleeps."""
    return timedelta(seconds=float(os.environ.get("SWEEP_MAX_INTERVAL", "60")))


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
        self.scheduler: BaseScheduler | None = None

    def install(self, scheduler: BaseScheduler, *, outbox_interval: timedelta = timedelta(seconds=2)) -> None:
        """Register every job on `scheduler` (not yet started)."""
        self.scheduler = scheduler
        common = {"max_instances": 1, "coalesce": True, "replace_existing": True}
        # At start-up: sweep what fell due while the process was down, and post a digest missed then (once).
        scheduler.add_job(
            self.catch_up, "date", id=STARTUP_JOB, replace_existing=True, misfire_grace_time=None
        )
        scheduler.add_job(
            self.run_sweep, "interval", seconds=sweep_max_interval().total_seconds(), id=SWEEP_JOB, **common
        )
        scheduler.add_job(
            self.run_outbox, "interval", seconds=outbox_interval.total_seconds(), id=OUTBOX_JOB, **common
        )
        scheduler.add_job(
            self.sender.recover,
            "interval",
            seconds=self.sender.lease.total_seconds(),
            id=OUTBOX_RECOVER_JOB,
            **common,
        )
        for team in self.ctx.policy.teams:
            # Each team's cron fires at its digest time in its own zone; run_digests is idempotent.
            trigger = digest_trigger(self.ctx, team)
            if trigger is None:  # digest = "off"
                continue
            scheduler.add_job(
                self.run_digests,
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
                self.poll,
                "interval",
                args=[name],
                seconds=account.poll_interval.total_seconds(),
                id=f"poll:{name}",
                next_run_time=datetime.now(UTC),
                **common,
            )

    def catch_up(self) -> None:
        """What a process does first: sweep everything due, then queue any digest whose time passed."""
        self.run_sweep()
        self.run_digests()

    def run_sweep(self) -> None:
        """Sweep now, then set the wake-up for the next due conversation."""
        try:
            result = sweep(self.ctx)
            if result.processed:
                log.info(
                    "sweep",
                    extra={"processed": result.processed, "steps": result.steps, "failed": result.failed},
                )
                self.run_outbox()
        finally:
            self.schedule_wake()

    def schedule_wake(self) -> None:
        """Wake the sweep at the earliest next_action_at (the interval job is the safety net)."""
        if self.scheduler is None:
            return
        earliest = earliest_next_action(self.ctx)
        if earliest is None:
            return
        limit = self.ctx.clock.now() + sweep_max_interval()
        when = max(min(earliest, limit), self.ctx.clock.now())
        self.scheduler.add_job(
            self.run_sweep,
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

    def run_outbox(self) -> None:
        result = self.sender.send_due()
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
        if parked_until is not None and parked_until > now:
            return 0
        stored = 0
        for _page in range(MAX_PAGES_PER_POLL):
            try:
                batch = connector.fetch(cursor)
            except RateLimited as error:
                record_rate_limit(name, (error.reset_at - now).total_seconds())
                self._park(account_id, error.reset_at, str(error))
                log.warning(
                    "connector rate limited", extra={"account": name, "until": error.reset_at.isoformat()}
                )
                return stored
            except AuthFailed as error:
                record_connector_error(name, "auth")
                connector.record_failure()
                self._park(account_id, now + timedelta(minutes=15), str(error))
                log.error("connector credentials refused", extra={"account": name, "error": str(error)})
                self._alert_admins(name, f"{name}: credentials refused ({error}); polling paused for 15 min")
                return stored
            except Exception as error:
                record_connector_error(name, "error")
                connector.record_failure()
                # Back off from the account's own interval (at most 30 s), not a fixed 30 s: an account
                # polled every few seconds should not go quiet for a minute after one 503.
                base = min(self.ctx.policy.accounts[name].poll_interval, ERROR_BACKOFF_BASE)
                self._park(account_id, now + connector.next_poll_delay(base), str(error))
                log.exception("connector fetch failed", extra={"account": name})
                return stored
            connector.record_success()
            with self.ctx.sessions() as session, session.begin():
                result = ingest_batch(
                    session,
                    self.ctx,
                    account=name,
                    posts=batch.posts,
                    is_own=connector.is_own,
                    cursor=batch.cursor,
                )
            stored += result.stored
            record_ingested(name, connector.kind, result.stored)
            cursor = batch.cursor
            if not batch.more:
                break
        if stored:
            if self.send_after_poll:
                self.run_outbox()
            self.schedule_wake()
        return stored

    def _alert_admins(self, account: str, text: str) -> None:
        """One alert per account and hour to the admin channel (through the outbox, like everything)."""
        now = self.ctx.clock.now()
        with self.ctx.sessions() as session, session.begin():
            repo.enqueue(
                session=session,
                kind="admin_alert",
                key=f"alert:{account}:{now:%Y%m%dT%H}",
                payload={"account": account, "text": text, "channel": self.ctx.policy.settings.admin_channel},
                now=now,
            )

    def _park(self, account_id: int, until: datetime, error: str) -> None:
        with self.ctx.sessions() as session, session.begin():
            session.execute(
                update(Account)
                .where(Account.id == account_id)
                .values(parked_until=until, last_error=error[:2000], last_poll_at=self.ctx.clock.now())
            )
