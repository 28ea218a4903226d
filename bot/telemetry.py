"""Process counters: what this process did, counted for Prometheus.

Counters and histograms (posts ingested, webhook requests, ladder-step lateness, connector
errors and rate-limit waits, Slack API errors) are module-level, so any layer can call
`record_ingested` and friends without importing the reports package; each app's own
`CollectorRegistry` (bot.reports.metrics.build_registry) includes them, so several apps in one
test process do not collide.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import Counter, Histogram

POSTS_INGESTED = Counter(
    "replyclock_posts_ingested",
    "Posts newly stored by ingest, per account and connector kind.",
    ["account", "kind"],
    registry=None,
)
WEBHOOK_REQUESTS = Counter(
    "replyclock_webhook_requests",
    "Webhook deliveries answered, per account and HTTP status code.",
    ["account", "code"],
    registry=None,
)


NAG_LATENESS = Histogram(
    "replyclock_nag_lateness_seconds",
    "Seconds between a ladder step's due time (warning, breach, nag, escalation, reassign) and its delivery.",
    ["kind"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
    registry=None,
)
CONNECTOR_ERRORS = Counter(
    "replyclock_connector_errors",
    "Failed connector fetches, per account and kind of failure (auth, error).",
    ["account", "error"],
    registry=None,
)
RATE_LIMIT_WAITS = Counter(
    "replyclock_rate_limit_waits",
    "Times a platform answered 429 and the account was parked, per account.",
    ["account"],
    registry=None,
)
RATE_LIMIT_SECONDS = Counter(
    "replyclock_rate_limit_wait_seconds",
    "Seconds accounts were parked by rate limits, per account.",
    ["account"],
    registry=None,
)
SLACK_API_ERRORS = Counter(
    "replyclock_slack_api_errors",
    "Slack Web API calls that failed, per method and error (ratelimited, channel_not_found, http_500...).",
    ["method", "error"],
    registry=None,
)
PROCESS_COUNTERS = (
    POSTS_INGESTED,
    WEBHOOK_REQUESTS,
    NAG_LATENESS,
    CONNECTOR_ERRORS,
    RATE_LIMIT_WAITS,
    RATE_LIMIT_SECONDS,
    SLACK_API_ERRORS,
)


def record_step_delivered(kind: str, scheduled_at: datetime, delivered_at: datetime) -> None:
    """Observe how late a ladder step reached its people."""
    NAG_LATENESS.labels(kind=kind).observe(max((delivered_at - scheduled_at).total_seconds(), 0.0))


def record_connector_error(account: str, error: str) -> None:
    """Count one failed fetch."""
    CONNECTOR_ERRORS.labels(account=account, error=error).inc()


def record_rate_limit(account: str, seconds: float) -> None:
    """Count one rate-limit parking and how long it lasts."""
    RATE_LIMIT_WAITS.labels(account=account).inc()
    RATE_LIMIT_SECONDS.labels(account=account).inc(max(seconds, 0.0))


def record_slack_error(method: str, error: str) -> None:
    """Count one failed Slack Web API call."""
    SLACK_API_ERRORS.labels(method=method, error=error).inc()


def record_ingested(account: str, kind: str, n: int) -> None:
    """Count `n` posts newly stored for `account` (a connector of `kind`); call after the commit."""
    if n > 0:
        POSTS_INGESTED.labels(account=account, kind=kind).inc(n)


def record_webhook_request(account: str, code: int) -> None:
    """Count one answered webhook request (use a fixed label for unknown accounts)."""
    WEBHOOK_REQUESTS.labels(account=account, code=str(code)).inc()
