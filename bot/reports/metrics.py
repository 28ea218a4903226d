"""Prometheus metrics: figures read from the database at scrape time, plus process counters.

Gauges (open and overdue conversations, outbox rows, account status) come from a collector
that queries the database when `/metrics` is scraped, so every process reports the same truth
and nothing drifts. The process counters (bot.telemetry) count what this process did; each app's own
`CollectorRegistry` includes them (several apps in one test process do not collide).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import and_, case, func, select
from sqlalchemy.exc import SQLAlchemyError

from bot.flow import staff
from bot.flow.context import AppContext
from bot.telemetry import PROCESS_COUNTERS
from storage.models import FAILED, OPEN, PENDING, SENDING, UNKNOWN, Account, Conversation, Outbox

log = logging.getLogger("replyclock.metrics")

# Outbox statuses the scrape counts: everything but "sent", so its cost follows the backlog, not
# the table (bench/metrics_scrape.py).
GAUGED_OUTBOX_STATUSES = (PENDING, SENDING, FAILED, UNKNOWN)


class DatabaseCollector:
    """Reads conversation, outbox and account figures from the database at each scrape."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def describe(self) -> Iterable[Metric]:
        """The metric families without samples (no database query at registration)."""
        return list(_Families().all())

    def collect(self) -> Iterable[Metric]:
        families = _Families()
        now = self.ctx.clock.now()
        try:
            self._fill(families, now)
        except SQLAlchemyError as error:
            log.warning("metrics: database unreachable", extra={"error": type(error).__name__})
            families = _Families()
            families.database_up.add_metric([], 0)
        else:
            families.database_up.add_metric([], 1)
        return list(families.all())

    def _fill(self, families: _Families, now: datetime) -> None:
        with self.ctx.read_sessions() as session:
            open_by_team = dict.fromkeys(self.ctx.policy.teams, 0)
            overdue_by_team = dict.fromkeys(self.ctx.policy.teams, 0)
            # One query (one round trip) for both, over the open conversations only.
            rows = session.execute(
                select(
                    Conversation.team,
                    func.count(),
                    func.coalesce(
                        func.sum(
                            case(
                                (and_(Conversation.due_at < now, Conversation.waiting_since.is_(None)), 1),
                                else_=0,
                            )
                        ),
                        0,
                    ),
                )
                .where(Conversation.status == OPEN)
                .group_by(Conversation.team)
            )
            for team, open_count, overdue_count in rows:
                open_by_team[team] = open_count
                overdue_by_team[team] = int(overdue_count)
            # Not "sent": sent rows pile up (until the retention job prunes them); counting them
            # grouped the whole table at every scrape (0.8 s at a million rows). The statuses
            # counted are the backlog and the trouble, an index range (ix_outbox_status_kind).
            outbox_rows = list(
                session.execute(
                    select(Outbox.status, Outbox.kind, func.count())
                    .where(Outbox.status.in_(GAUGED_OUTBOX_STATUSES))
                    .group_by(Outbox.status, Outbox.kind)
                )
            )
            accounts = list(
                session.execute(select(Account.name, Account.last_success_at, Account.parked_until))
            )
            # The same verdicts as /replyclock stats, the App Home and the digest (bot.core.sla_outcome).
            week = {
                team: staff.team_stats(session, self.ctx, team, now) for team in sorted(self.ctx.policy.teams)
            }
        for team, count in sorted(open_by_team.items()):
            families.open.add_metric([team], count)
        for team, count in sorted(overdue_by_team.items()):
            families.overdue.add_metric([team], count)
        for team, figures in week.items():
            families.first_responses.add_metric([team, "within"], figures.answered_within_sla)
            families.first_responses.add_metric([team, "breached"], figures.breached_this_week)
            families.resolutions.add_metric([team, "within"], figures.resolved_within_target)
            families.resolutions.add_metric([team, "breached"], figures.resolution_breached_this_week)
        for status, kind, count in sorted(outbox_rows):
            families.outbox.add_metric([status, kind], count)
        seen = set()
        for name, last_success_at, parked_until in sorted(accounts):
            seen.add(name)
            if last_success_at is not None:
                families.last_success.add_metric([name], last_success_at.timestamp())
            families.parked.add_metric([name], 1 if parked_until is not None and parked_until > now else 0)
        for name in sorted(set(self.ctx.policy.accounts) - seen):
            families.parked.add_metric([name], 0)


class _Families:
    """One scrape's metric families."""

    def __init__(self) -> None:
        self.database_up = GaugeMetricFamily(
            "replyclock_database_up", "1 when the database answered this scrape, else 0."
        )
        self.open = GaugeMetricFamily(
            "replyclock_conversations_open",
            "Open conversations (waiting for our response), per team.",
            labels=["team"],
        )
        self.overdue = GaugeMetricFamily(
            "replyclock_conversations_overdue",
            "Open conversations past their due_at, per team.",
            labels=["team"],
        )
        self.outbox = GaugeMetricFamily(
            "replyclock_outbox_messages",
            "Outbox rows per status and kind (pending = backlog); sent rows are not counted.",
            labels=["status", "kind"],
        )
        self.last_success = GaugeMetricFamily(
            "replyclock_account_last_success_timestamp_seconds",
            "Unix time of the account's last successful poll or delivery.",
            labels=["account"],
        )
        self.parked = GaugeMetricFamily(
            "replyclock_account_parked",
            "1 while the account is parked (rate limit or errors), else 0.",
            labels=["account"],
        )

        self.first_responses = GaugeMetricFamily(
            "replyclock_first_responses_this_week",
            "First-response verdicts of the team's current week (Monday 00:00 in its zone until now): "
            "within = answered in time this week, breached = first deadline passed this week unanswered "
            "or answered late.",
            labels=["team", "verdict"],
        )

        self.resolutions = GaugeMetricFamily(
            "replyclock_resolutions_this_week",
            "Resolution-target verdicts of the team's current week: within = closed after an answer in "
            "time this week, breached = resolution deadline passed this week unresolved or resolved late.",
            labels=["team", "verdict"],
        )

    def all(self) -> Iterator[Metric]:
        yield from (
            self.database_up,
            self.open,
            self.overdue,
            self.first_responses,
            self.resolutions,
            self.outbox,
            self.last_success,
            self.parked,
        )


def build_registry(ctx: AppContext) -> CollectorRegistry:
    """A registry of its own for one app: the database collector plus the process counters."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(ctx))
    for counter in PROCESS_COUNTERS:
        registry.register(counter)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type (blocking: queries the database)."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
