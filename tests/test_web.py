"""GET /healthz and GET /metrics on real databases (and on unreachable ones)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, func, select, update

from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from bot.telemetry import record_ingested
from bot.web import bind_address, create_app, create_operator_app, operator_address, operator_token
from connectors.base import InboundPost
from storage.db import make_engine
from storage.models import Account, Outbox
from tests.conftest import MONDAY
from tests.test_webhook import (
    AppClient,
    asgi_client,
    delivery,
    encode,
    signed,
    webhook_connectors,
    webhook_policy,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def policy() -> Policy:
    return webhook_policy()


OPERATOR_TOKEN = "operator-token-0123456789-0123456789"
BEARER = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


@pytest.fixture
def client(ctx: AppContext, policy: Policy) -> Iterator[AppClient]:
    """The public app with the operator endpoints behind a bearer token."""
    app = create_app(ctx, webhook_connectors(policy), operator_token=OPERATOR_TOKEN)
    with asgi_client(app) as test_client:
        yield test_client


def customer_post(external_id: str, text: str, author: str, *, reply_to_id: str | None = None) -> InboundPost:
    return InboundPost(
        external_id=external_id,
        author_id=f"id-{author}",
        author_handle=author,
        text=text,
        posted_at=MONDAY,
        reply_to_id=reply_to_id,
    )


def seed(ctx: AppContext, clock: FakeClock) -> None:
    """Two billing conversations (one answered), one care conversation, a parked account; then 9 hours pass."""
    posts = [
        customer_post("1", "I was charged twice on my invoice", "ana"),
        customer_post("2", "refund please", "ben"),
        customer_post("3", "a general question", "carol"),
        customer_post("4", "cheap followers", "spambot"),  # ignored: no conversation
    ]
    with ctx.sessions() as session, session.begin():
        ingest_batch(session, ctx, account="social", posts=posts, is_own=lambda p: False, cursor="c1")
    clock.advance(timedelta(minutes=30))
    answer = customer_post("5", "@ben refunded", "acme_support", reply_to_id="2")
    with ctx.sessions() as session, session.begin():
        ingest_batch(
            session, ctx, account="social", posts=[answer], is_own=lambda p: p.author_handle == "acme_support"
        )
        first_ack = select(func.min(Outbox.id)).where(Outbox.kind == "ack").scalar_subquery()
        session.execute(update(Outbox).where(Outbox.id == first_ack).values(status="sent"))
    with ctx.sessions() as session, session.begin():
        ingest_batch(session, ctx, account="blog", posts=[], is_own=lambda p: False, cursor=None)
        session.execute(
            update(Account)
            .where(Account.name == "blog")
            .values(parked_until=MONDAY + timedelta(hours=10), last_error="rate limited; parked")
        )
    clock.advance(timedelta(hours=8, minutes=30))  # now MONDAY + 9 h: billing's 8 business hours are over


def scrape(client: AppClient) -> Samples:
    response = client.get("/metrics", headers=BEARER)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_healthz_reports_the_database_and_accounts(
    client: AppClient, ctx: AppContext, clock: FakeClock
) -> None:
    seed(ctx, clock)
    assert client.get("/healthz").json() == {"status": "ok"}  # public: nothing more
    response = client.get("/healthz/details", headers=BEARER)
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "ok" and report["database"] == {"ok": True}
    accounts = report["accounts"]
    assert set(accounts) == {"social", "blog", "shop", "form"}
    assert accounts["social"]["last_success_at"] == MONDAY.isoformat()  # the poll that saved cursor c1
    assert accounts["social"]["parked"] is False and accounts["social"]["last_error"] is None
    assert accounts["blog"]["parked"] is True
    assert accounts["blog"]["parked_until"] == (MONDAY + timedelta(hours=10)).isoformat()
    assert accounts["blog"]["last_error"] == "rate limited; parked"
    assert accounts["shop"] == {
        "kind": "webhook",
        "last_success_at": None,
        "parked_until": None,
        "parked": False,
        "last_error": None,
    }
    body = encode(delivery())
    assert client.post("/hooks/shop", content=body, headers=signed(body, now=clock.now())).status_code == 202
    shop = client.get("/healthz/details", headers=BEARER).json()["accounts"]["shop"]
    assert shop["last_success_at"] == clock.now().isoformat()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def unreachable_engine(kind: str, tmp_path: Path) -> Engine:
    if kind == "sqlite":
        not_a_directory = tmp_path / "file"
        not_a_directory.write_text("")
        return create_engine(f"sqlite:///{not_a_directory / 'replyclock.db'}")
    return make_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/replyclock",
        connect_args={"connect_timeout": 2},
    )


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_unreachable_database_is_503_and_metrics_say_so(
    kind: str, tmp_path: Path, policy: Policy, clock: FakeClock
) -> None:
    engine = unreachable_engine(kind, tmp_path)
    ctx = AppContext(policy=policy, engine=engine, clock=clock)
    with asgi_client(create_app(ctx, webhook_connectors(policy), operator_token=OPERATOR_TOKEN)) as client:
        assert client.get("/healthz").json() == {"status": "unavailable"}
        response = client.get("/healthz/details", headers=BEARER)
        assert response.status_code == 503
        report = response.json()
        assert report["status"] == "unavailable"
        assert report["database"] == {"ok": False, "error": "OperationalError"}
        assert report["accounts"]["shop"] == {"kind": "webhook"}
        samples = scrape(client)
        assert value(samples, "replyclock_database_up") == 0
        assert value(samples, "replyclock_conversations_open", team="care") is None
        body = encode(delivery())
        delivered = client.post("/hooks/shop", content=body, headers=signed(body))
        assert delivered.status_code == 503  # the sender should retry; not a client error
    engine.dispose()


def test_metrics_from_the_database(client: AppClient, ctx: AppContext, clock: FakeClock) -> None:
    seed(ctx, clock)
    samples = scrape(client)
    assert value(samples, "replyclock_database_up") == 1
    assert value(samples, "replyclock_conversations_open", team="billing") == 1  # ben's was answered
    assert value(samples, "replyclock_conversations_open", team="care") == 1
    assert value(samples, "replyclock_conversations_overdue", team="billing") == 1  # due MONDAY + 8 h
    assert value(samples, "replyclock_conversations_overdue", team="care") == 0  # due MONDAY + 24 h
    with ctx.sessions() as session:
        rows = list(
            session.execute(
                select(Outbox.status, Outbox.kind, func.count())
                .where(Outbox.status != "sent")  # not counted at scrape time (issue 11)
                .group_by(Outbox.status, Outbox.kind)
            )
        )
    assert rows
    outbox = {
        (dict(labels)["status"], dict(labels)["kind"]): count
        for (name, labels), count in samples.items()
        if name == "replyclock_outbox_messages"
    }
    assert outbox == {(status, kind): float(count) for status, kind, count in rows}
    assert (
        outbox[("pending", "card")] == 3 and outbox[("pending", "ack")] == 2 and ("sent", "ack") not in outbox
    )
    assert (
        value(samples, "replyclock_account_last_success_timestamp_seconds", account="social")
        == MONDAY.timestamp()
    )
    assert value(samples, "replyclock_account_last_success_timestamp_seconds", account="shop") is None
    assert value(samples, "replyclock_account_parked", account="blog") == 1
    assert value(samples, "replyclock_account_parked", account="social") == 0
    assert value(samples, "replyclock_account_parked", account="shop") == 0
    clock.advance(timedelta(hours=2))  # the park ends
    assert value(scrape(client), "replyclock_account_parked", account="blog") == 0


def test_metrics_count_ingested_posts_and_webhook_requests(client: AppClient, ctx: AppContext) -> None:
    def counts() -> tuple[float, ...]:
        samples = scrape(client)
        return tuple(
            value(samples, name, **labels) or 0.0
            for name, labels in [
                ("replyclock_posts_ingested_total", {"account": "shop", "kind": "webhook"}),
                ("replyclock_posts_ingested_total", {"account": "social", "kind": "demo"}),
                ("replyclock_webhook_requests_total", {"account": "shop", "code": "202"}),
                ("replyclock_webhook_requests_total", {"account": "shop", "code": "401"}),
                ("replyclock_webhook_requests_total", {"account": "-", "code": "401"}),
            ]
        )

    before = counts()
    body = encode(delivery())
    for _ in range(2):  # the second is a duplicate: a request, but no new post
        assert client.post("/hooks/shop", content=body, headers=signed(body)).status_code == 202
    assert client.post("/hooks/shop", content=body).status_code == 401
    assert client.post("/hooks/attacker-chosen-name", content=body).status_code == 401
    record_ingested("social", "demo", 3)
    record_ingested("social", "demo", 0)
    after = counts()
    assert tuple(b - a for a, b in zip(before, after, strict=True)) == (1, 3, 2, 1, 1)
    samples = scrape(client)
    assert not any(dict(labels).get("account") == "attacker-chosen-name" for _name, labels in samples)


def test_several_apps_have_their_own_registries(ctx: AppContext, policy: Policy) -> None:
    first = create_operator_app(ctx)
    second = create_app(ctx, webhook_connectors(policy), operator_token=OPERATOR_TOKEN)
    assert first.state.metrics_registry is not second.state.metrics_registry
    for app in (first, second):
        with asgi_client(app) as client:
            assert value(scrape(client), "replyclock_conversations_open", team="care") == 0


def test_bind_address() -> None:
    assert bind_address({}) == ("0.0.0.0", 8000)
    assert bind_address({"HOST": "127.0.0.1", "PORT": "5000"}) == ("127.0.0.1", 5000)
    with pytest.raises(ValueError, match="PORT"):
        bind_address({"PORT": "http"})


# --- issue 11, finding 2: operator endpoints apart, and no URL secrets anywhere -----------------

FEED_ERROR = (
    "HTTPError: 401 for url https://reader:hunter2pass@feeds.example/private.rss"
    "?access_token=tok_0123456789abcdef&page=2"
)


def test_the_public_listener_tells_only_ok(ctx: AppContext, policy: Policy, clock: FakeClock) -> None:
    seed(ctx, clock)
    with asgi_client(create_app(ctx, webhook_connectors(policy))) as public:
        health = public.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert public.get("/metrics").status_code == 404  # not served without an operator token
        assert public.get("/healthz/details").status_code == 404
    with asgi_client(create_app(ctx, webhook_connectors(policy), operator_token=OPERATOR_TOKEN)) as public:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": OPERATOR_TOKEN}):
            assert public.get("/metrics", headers=headers).status_code == 401
            assert public.get("/healthz/details", headers=headers).status_code == 401
        assert public.get("/metrics", headers=BEARER).status_code == 200
    with asgi_client(create_operator_app(ctx)) as operator:
        report = operator.get("/healthz").json()
        assert set(report["accounts"]) == {"social", "blog", "shop", "form"}
        assert b"replyclock_conversations_open" in operator.get("/metrics").content


def test_operator_settings_from_the_environment() -> None:
    assert operator_address({}) == ("127.0.0.1", 9464)
    assert operator_address({"OPERATOR_HOST": "10.0.0.5", "OPERATOR_PORT": "9100"}) == ("10.0.0.5", 9100)
    assert operator_address({"OPERATOR_PORT": "off"}) is None
    with pytest.raises(ValueError):
        operator_address({"OPERATOR_PORT": "http"})
    assert operator_token({}) is None
    with pytest.raises(ValueError, match="32"):
        operator_token({"OPERATOR_TOKEN": "short"})


def test_no_url_secret_reaches_health_logs_or_slack(
    ctx: AppContext, policy: Policy, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The feed URL's access_token and password: not in the health report, the stored error,
    the log line, or the admin alert queued for Slack (one redaction function for all)."""
    import io
    import logging

    from bot.jobs import Jobs
    from bot.logs import JsonFormatter, redact_urls
    from connectors.base import Batch, Connector

    class Failing(Connector):
        kind = "feed"

        def fetch(self, cursor: str | None) -> Batch:
            raise RuntimeError(FEED_ERROR)

        def reply(self, to: object, text: str) -> str:  # type: ignore[override]
            raise NotImplementedError

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(secrets=[]))
    logging.getLogger().addHandler(handler)
    try:
        jobs = Jobs(ctx, {"blog": Failing("blog")}, sender=None)  # type: ignore[arg-type]
        jobs.poll("blog")
        jobs._alert_admins("blog", f"blog: {FEED_ERROR}")
    finally:
        logging.getLogger().removeHandler(handler)
    secrets = ("hunter2pass", "tok_0123456789abcdef", "reader:")
    with asgi_client(create_operator_app(ctx)) as operator:
        shown = operator.get("/healthz").text
    with ctx.sessions() as session:
        stored = session.scalars(select(Account.last_error).where(Account.name == "blog")).one()
        alerts = [
            row.payload["text"] for row in session.scalars(select(Outbox).where(Outbox.kind == "admin_alert"))
        ]
    for text in (shown, str(stored), stream.getvalue(), *alerts):
        assert "feeds.example/private.rss" in text
        assert not any(secret in text for secret in secrets), text
    assert (
        redact_urls("see https://u:p@h.example/a?b=1&c")
        == "see https://[redacted]@h.example/a?b=[redacted]&[redacted]"
    )
