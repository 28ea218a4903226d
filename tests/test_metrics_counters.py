"""Process metrics an operator needs: ladder lateness, connector errors and rate limits, Slack errors."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import generate_latest
from slack_sdk import WebClient

from bot.core.clock import FakeClock
from bot.demo.standin import DEFAULT_TOKEN, SlackStandIn
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from bot.flow.sweep import sweep
from bot.jobs import Jobs
from bot.reports.metrics import build_registry
from bot.slack.delivery import slack_handlers
from connectors.base import RateLimited
from tests.conftest import MONDAY
from tests.test_ingest import ingest, post
from tests.test_jobs import Failing


def sample(ctx: AppContext, name: str, **labels: str) -> float:
    registry = build_registry(ctx)
    value = registry.get_sample_value(name, labels)
    return value or 0.0


def test_ladder_lateness_and_slack_errors_are_measured(ctx: AppContext, clock: FakeClock) -> None:
    before_late = sample(ctx, "replyclock_nag_lateness_seconds_count", kind="breach")
    before_errors = sample(
        ctx, "replyclock_slack_api_errors_total", method="chat.postMessage", error="ratelimited"
    )
    with SlackStandIn(channels={"C0CARE0001": "care"}) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)  # "#care" resolves to C0CARE0001
        sender = OutboxSender(ctx, {**slack_handlers(ctx, client), "ack": lambda m: "ok"})
        ingest(ctx, post("1", "the site is down"))
        slack.fail_next("chat.postMessage", error="ratelimited", status=429, retry_after=1)
        sender.send_due()  # the card meets a 429
        clock.advance(timedelta(seconds=2))
        sender.send_due()
        clock.advance(timedelta(hours=1))  # urgent: 1 h; the breach is due at +1 h
        sweep(ctx)
        clock.advance(timedelta(seconds=3))  # delivered 3 s after it fell due
        sender.send_due()
    assert (
        sample(ctx, "replyclock_slack_api_errors_total", method="chat.postMessage", error="ratelimited")
        == before_errors + 1
    )
    assert sample(ctx, "replyclock_nag_lateness_seconds_count", kind="breach") == before_late + 1
    text = generate_latest(build_registry(ctx)).decode()
    assert 'replyclock_nag_lateness_seconds_bucket{kind="breach",le="5.0"}' in text


def test_connector_errors_and_rate_limit_waits_are_counted(ctx: AppContext, clock: FakeClock) -> None:
    waits = sample(ctx, "replyclock_rate_limit_waits_total", account="social")
    errors = sample(ctx, "replyclock_connector_errors_total", account="social", error="error")
    Jobs(ctx, {"social": Failing(RateLimited(MONDAY + timedelta(minutes=15)))}, OutboxSender(ctx, {})).poll(
        "social"
    )
    clock.advance(timedelta(minutes=16))
    Jobs(ctx, {"social": Failing(ConnectionError("reset"))}, OutboxSender(ctx, {})).poll("social")
    assert sample(ctx, "replyclock_rate_limit_waits_total", account="social") == waits + 1
    assert sample(ctx, "replyclock_rate_limit_wait_seconds_total", account="social") >= 15 * 60
    assert sample(ctx, "replyclock_connector_errors_total", account="social", error="error") == errors + 1
