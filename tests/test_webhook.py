"""The webhook channel: delivery validation, signatures, the connector, and POST /hooks/{account}.

Most app tests drive the ASGI app in-process; the `real server` tests go over a loopback
socket to a real uvicorn server. The fuzz test's number of examples comes from
REPLYCLOCK_HYPOTHESIS_EXAMPLES (default 300).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anyio.from_thread
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm.exc import StaleDataError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bot.flow.channels
import bot.flow.ingest
import bot.web
from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.context import AppContext
from bot.web import MAX_BODY_BYTES, create_app, serve_in_thread
from connectors.base import Connector, ConnectorError, InboundPost, NotSent, RateLimited, ReplyTarget
from connectors.demo import DemoConnector
from connectors.webhook import (
    SIGNATURE_HEADER,
    WebhookConnector,
    WebhookError,
    default_secret_env,
    parse_delivery,
    sign,
    standard_headers,
    verify_signature,
)
from storage.models import Account, Conversation, Event, Outbox, Post, SeenRequest
from storage.seen import remember_all
from tests.conftest import MONDAY, POLICY_TOML

EXAMPLES = int(os.environ.get("REPLYCLOCK_HYPOTHESIS_EXAMPLES", "300"))
SHOP_SECRET = "shop-secret-0123456789-abcdefghijklmnop"
FORM_SECRET = "form-secret-9876543210-abcdefghijklmnop"
ENVIRON = {"WEBHOOK_SECRET_SHOP": SHOP_SECRET, "CONTACT_FORM_SECRET": FORM_SECRET}
WEBHOOK_ACCOUNTS = """
[accounts.shop]
kind = "webhook"
reply_url = "http://127.0.0.1:9/replies"
own_ids = ["shop_support"]

[accounts.form]
kind = "webhook"
can_reply = false
secret_env = "CONTACT_FORM_SECRET"
"""


def webhook_policy() -> Policy:
    """The shared test policy plus two webhook accounts (one that can reply, one that cannot)."""
    text = POLICY_TOML + WEBHOOK_ACCOUNTS
    return parse_policy(tomllib.loads(text), source="tests/data/policy.toml+webhook", text=text)


def webhook_connectors(policy: Policy) -> dict[str, Connector]:
    built: dict[str, Connector] = {}
    for name, account in policy.accounts.items():
        if account.kind == "webhook":
            built[name] = WebhookConnector(
                name, own_ids=account.own_ids, settings=account.settings, environ=ENVIRON
            )
        else:
            built[name] = DemoConnector(name, own_ids=account.own_ids, settings=account.settings)
    return built


def delivery(**overrides: Any) -> dict[str, Any]:
    """A valid delivery; `overrides` replace fields (a value of ... removes the field)."""
    data: dict[str, Any] = {
        "id": "order-1001",
        "author": {"id": "cust-7", "name": "Ana Lima", "handle": "ana"},
        "text": "I was charged twice on my invoice",
        "url": "https://shop.example/tickets/1001",
        "created_at": "2026-11-23T09:00:00+01:00",
        "thread_id": "ticket-1001",
    }
    for key, value in overrides.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def encode(data: Any) -> bytes:
    return json.dumps(data).encode("utf-8")


def signed(
    body: bytes, secret: str = SHOP_SECRET, *, message_id: str | None = None, now: datetime = MONDAY
) -> dict[str, str]:
    """Standard Webhooks headers at the test clock's time (MONDAY unless told)."""
    return {
        **standard_headers(secret, body, now=now, message_id=message_id),
        "Content-Type": "application/json",
    }


def snapshot(ctx: AppContext) -> tuple[int, ...]:
    """Row counts of everything a delivery could write."""
    with ctx.sessions() as session:
        return tuple(
            session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Post, Conversation, Outbox, Event)
        )


NOTHING = (0, 0, 0, 0)


@pytest.fixture
def policy() -> Policy:
    return webhook_policy()


@pytest.fixture
def connectors(policy: Policy) -> dict[str, Connector]:
    return webhook_connectors(policy)


@pytest.fixture
def app(ctx: AppContext, connectors: dict[str, Connector]) -> Starlette:
    return create_app(ctx, connectors)


class AppClient:
    """A blocking client for an ASGI app, in-process (httpx's ASGI transport on a portal's event loop)."""

    def __init__(self, app: Starlette, portal: anyio.from_thread.BlockingPortal) -> None:
        self.portal = portal
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            return await self.http.request(method, url, **kwargs)

        return self.portal.call(send)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@contextmanager
def asgi_client(app: Starlette) -> Iterator[AppClient]:
    with anyio.from_thread.start_blocking_portal() as portal:
        client = AppClient(app, portal)
        try:
            yield client
        finally:
            portal.call(client.http.aclose)


@pytest.fixture
def client(app: Starlette) -> Iterator[AppClient]:
    with asgi_client(app) as test_client:
        yield test_client


# --- parse_delivery ---------------------------------------------------------------------------


def test_parse_a_full_delivery() -> None:
    post = parse_delivery(encode(delivery(reply_to_id="order-999", language="pt-BR")), now=MONDAY)
    assert post == InboundPost(
        external_id="order-1001",
        author_id="cust-7",
        author_name="Ana Lima",
        author_handle="ana",
        text="I was charged twice on my invoice",
        posted_at=MONDAY,
        url="https://shop.example/tickets/1001",
        thread_id="ticket-1001",
        reply_to_id="order-999",
        language="pt-BR",
    )
    assert post.posted_at.tzinfo is UTC


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"url": ..., "thread_id": ...}, id="optional-fields-absent"),
        pytest.param(
            {"url": None, "thread_id": None, "reply_to_id": None, "language": None}, id="optional-null"
        ),
        pytest.param({"author": {"id": "cust-7"}}, id="author-without-name"),
        pytest.param({"author": {"id": "cust-7", "name": None, "handle": None}}, id="author-name-null"),
        pytest.param({"created_at": "2026-11-23T08:00:00Z"}, id="created-at-zulu"),
        pytest.param({"created_at": "2026-11-23T08:00:00.123456+00:00"}, id="created-at-fraction"),
        pytest.param({"created_at": "2026-11-24T07:00:00Z"}, id="created-at-within-skew"),
        pytest.param({"text": ""}, id="empty-text"),
        pytest.param({"text": "x" * 20_000}, id="text-at-limit"),
        pytest.param({"id": "i" * 200}, id="id-at-limit"),
        pytest.param({"extra": {"nested": [1, 2]}, "source": "shop"}, id="unknown-keys-ignored"),
        pytest.param({"url": "HTTP://shop.example/x"}, id="url-upper-scheme"),
        pytest.param({"language": "en"}, id="language"),
        pytest.param({"text": "emoji 🎉 and ünïcode"}, id="unicode-text"),
    ],
)
def test_parse_accepts(overrides: dict[str, Any]) -> None:
    post = parse_delivery(encode(delivery(**overrides)), now=MONDAY)
    assert post.external_id == overrides.get("id", "order-1001")


def _raw(text: str) -> Callable[[], bytes]:
    return lambda: text.encode("utf-8")


BAD_BODIES: list[Any] = [
    # (body factory, field)
    pytest.param(lambda: b"\xff\xfe{}", "body", id="invalid-utf8"),
    pytest.param(lambda: b'{"id": "a\xc3"}', "body", id="truncated-utf8"),
    pytest.param(_raw(""), "body", id="empty"),
    pytest.param(_raw("not json"), "body", id="not-json"),
    pytest.param(_raw('{"id": "1",'), "body", id="truncated-json"),
    pytest.param(_raw("[]"), "body", id="array"),
    pytest.param(_raw('"text"'), "body", id="string"),
    pytest.param(_raw("null"), "body", id="null"),
    pytest.param(_raw("42"), "body", id="number"),
    pytest.param(_raw('{"id": NaN}'), "body", id="nan"),
    pytest.param(_raw('{"id": "1", "x": Infinity}'), "body", id="infinity"),
    pytest.param(_raw("-Infinity"), "body", id="minus-infinity"),
    pytest.param(_raw("[" * 100_000 + "]" * 100_000), "body", id="deep-nesting"),
    pytest.param(_raw('{"a":' * 50_000 + "1" + "}" * 50_000), "body", id="deep-objects"),
    pytest.param(_raw('{"id": ' + "9" * 5000 + "}"), "body", id="huge-integer"),
    pytest.param(lambda: encode(delivery(id=...)), "id", id="id-missing"),
    pytest.param(lambda: encode(delivery(id=None)), "id", id="id-null"),
    pytest.param(lambda: encode(delivery(id=1001)), "id", id="id-number"),
    pytest.param(lambda: encode(delivery(id=True)), "id", id="id-bool"),
    pytest.param(lambda: encode(delivery(id=["a"])), "id", id="id-array"),
    pytest.param(lambda: encode(delivery(id="")), "id", id="id-empty"),
    pytest.param(lambda: encode(delivery(id="   ")), "id", id="id-blank"),
    pytest.param(lambda: encode(delivery(id="i" * 201)), "id", id="id-too-long"),
    pytest.param(lambda: encode(delivery(id="a\x00b")), "id", id="id-nul"),
    pytest.param(_raw('{"id": "\\ud800", "author": {"id": "a"}}'), "id", id="id-lone-surrogate"),
    pytest.param(_raw('{"id": 1e999}'), "id", id="id-overflowing-float"),
    pytest.param(lambda: encode(delivery(author=...)), "author", id="author-missing"),
    pytest.param(lambda: encode(delivery(author=None)), "author", id="author-null"),
    pytest.param(lambda: encode(delivery(author="ana")), "author", id="author-string"),
    pytest.param(lambda: encode(delivery(author=["ana"])), "author", id="author-array"),
    pytest.param(lambda: encode(delivery(author={})), "author.id", id="author-id-missing"),
    pytest.param(lambda: encode(delivery(author={"id": 7})), "author.id", id="author-id-number"),
    pytest.param(lambda: encode(delivery(author={"id": ""})), "author.id", id="author-id-empty"),
    pytest.param(lambda: encode(delivery(author={"id": "a" * 201})), "author.id", id="author-id-too-long"),
    pytest.param(
        lambda: encode(delivery(author={"id": "a", "name": 5})), "author.name", id="author-name-number"
    ),
    pytest.param(
        lambda: encode(delivery(author={"id": "a", "name": "n" * 201})), "author.name", id="author-name-long"
    ),
    pytest.param(
        lambda: encode(delivery(author={"id": "a", "handle": {}})), "author.handle", id="author-handle-object"
    ),
    pytest.param(lambda: encode(delivery(text=...)), "text", id="text-missing"),
    pytest.param(lambda: encode(delivery(text=None)), "text", id="text-null"),
    pytest.param(lambda: encode(delivery(text=5)), "text", id="text-number"),
    pytest.param(lambda: encode(delivery(text=["hi"])), "text", id="text-array"),
    pytest.param(lambda: encode(delivery(text="x" * 20_001)), "text", id="text-too-long"),
    pytest.param(lambda: encode(delivery(text="nul \x00 inside")), "text", id="text-nul"),
    pytest.param(lambda: encode(delivery(url=5)), "url", id="url-number"),
    pytest.param(lambda: encode(delivery(url="ftp://shop.example/x")), "url", id="url-ftp"),
    pytest.param(lambda: encode(delivery(url="javascript:alert(1)")), "url", id="url-javascript"),
    pytest.param(lambda: encode(delivery(url="/tickets/1")), "url", id="url-relative"),
    pytest.param(lambda: encode(delivery(url="https://")), "url", id="url-no-host"),
    pytest.param(lambda: encode(delivery(url="https://shop.example/a b")), "url", id="url-space"),
    pytest.param(lambda: encode(delivery(url="https://[::1/x")), "url", id="url-unparseable"),
    pytest.param(lambda: encode(delivery(url="https://x/" + "a" * 3000)), "url", id="url-too-long"),
    pytest.param(lambda: encode(delivery(created_at=...)), "created_at", id="created-missing"),
    pytest.param(lambda: encode(delivery(created_at=None)), "created_at", id="created-null"),
    pytest.param(lambda: encode(delivery(created_at=1764000000)), "created_at", id="created-epoch-number"),
    pytest.param(
        lambda: encode(delivery(created_at="2026-11-23T08:00:00")), "created_at", id="created-naive"
    ),
    pytest.param(lambda: encode(delivery(created_at="2026-11-23")), "created_at", id="created-date-only"),
    pytest.param(lambda: encode(delivery(created_at="yesterday")), "created_at", id="created-words"),
    pytest.param(
        lambda: encode(delivery(created_at="2026-13-01T00:00:00Z")), "created_at", id="created-month-13"
    ),
    pytest.param(
        lambda: encode(delivery(created_at="2030-01-01T00:00:00Z")), "created_at", id="created-future"
    ),
    pytest.param(
        lambda: encode(delivery(created_at="9999-12-31T23:59:59-05:00")), "created_at", id="created-overflow"
    ),
    pytest.param(
        lambda: encode(delivery(created_at="0001-01-01T00:00:00+05:00")), "created_at", id="created-underflow"
    ),
    pytest.param(
        lambda: encode(delivery(created_at="1960-01-01T00:00:00Z")), "created_at", id="created-before-1970"
    ),
    pytest.param(
        lambda: encode(delivery(created_at="2026-11-23T08:00:00Z" + " " * 80)),
        "created_at",
        id="created-long",
    ),
    pytest.param(lambda: encode(delivery(thread_id=5)), "thread_id", id="thread-number"),
    pytest.param(lambda: encode(delivery(thread_id="")), "thread_id", id="thread-empty"),
    pytest.param(lambda: encode(delivery(thread_id="t" * 201)), "thread_id", id="thread-too-long"),
    pytest.param(lambda: encode(delivery(reply_to_id={})), "reply_to_id", id="reply-to-object"),
    pytest.param(lambda: encode(delivery(reply_to_id=False)), "reply_to_id", id="reply-to-bool"),
    pytest.param(lambda: encode(delivery(language=5)), "language", id="language-number"),
    pytest.param(lambda: encode(delivery(language="english please")), "language", id="language-words"),
    pytest.param(lambda: encode(delivery(language="e")), "language", id="language-short"),
    pytest.param(lambda: encode(delivery(language="en-" + "x" * 14)), "language", id="language-too-long"),
]


@pytest.mark.parametrize(("make_body", "field"), BAD_BODIES)
def test_parse_rejects_naming_the_field(make_body: Callable[[], bytes], field: str) -> None:
    with pytest.raises(WebhookError) as caught:
        parse_delivery(make_body(), now=MONDAY)
    assert caught.value.field == field
    assert caught.value.message


def test_error_messages_do_not_echo_the_submitted_value() -> None:
    with pytest.raises(WebhookError) as caught:
        parse_delivery(encode(delivery(url="javascript:steal('SECRET-VALUE')")), now=MONDAY)
    assert "SECRET-VALUE" not in str(caught.value)


# --- signatures and the connector -----------------------------------------------------------


def test_verify_signature() -> None:
    secret, body = b"k3y", b'{"id": "1"}'
    good = sign(secret, body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert verify_signature(secret, body, good)
    assert verify_signature(secret, body, "sha256=" + good[7:].upper())
    assert not verify_signature(secret, body, None)
    assert not verify_signature(secret, body, "")
    assert not verify_signature(secret, body, good[7:])  # no prefix
    assert not verify_signature(secret, body, "sha1=" + good[7:])
    assert not verify_signature(secret, body, good[:-1])
    assert not verify_signature(secret, body + b" ", good)
    assert not verify_signature(b"other", body, good)
    assert not verify_signature(secret, body, "sha256=" + "é" * 64)  # non-ASCII never reaches compare_digest


def test_connector_settings_and_secret() -> None:
    assert default_secret_env("my-shop.eu") == "WEBHOOK_SECRET_MY_SHOP_EU"
    connector = WebhookConnector(
        "my-shop.eu", environ={"WEBHOOK_SECRET_MY_SHOP_EU": "s3cret-value-0123456789-0123456789"}
    )
    assert connector.kind == "webhook" and connector.push
    assert connector.fetch(None).posts == () and connector.fetch("c").cursor == "c"
    assert "s3cret-value-0123456789-0123456789" not in repr(connector)
    assert connector.verify(b"x", sign(b"s3cret-value-0123456789-0123456789", b"x"))
    with pytest.raises(ValueError, match="WEBHOOK_SECRET_SHOP"):
        WebhookConnector("shop", environ={})
    with pytest.raises(ValueError, match="MY_SECRET"):
        WebhookConnector(
            "shop", settings={"secret_env": "MY_SECRET"}, environ={"WEBHOOK_SECRET_SHOP": SHOP_SECRET}
        )
    with pytest.raises(ValueError, match="reply_ur1"):
        WebhookConnector(
            "shop", settings={"reply_ur1": "https://x"}, environ={"WEBHOOK_SECRET_SHOP": SHOP_SECRET}
        )
    with pytest.raises(ValueError, match="reply_url"):
        WebhookConnector(
            "shop", settings={"reply_url": "ftp://x"}, environ={"WEBHOOK_SECRET_SHOP": SHOP_SECRET}
        )
    with pytest.raises(ValueError, match="reply_timeout"):
        WebhookConnector("shop", settings={"reply_timeout": 0}, environ={"WEBHOOK_SECRET_SHOP": SHOP_SECRET})


def test_build_connectors_passes_the_environment(monkeypatch: pytest.MonkeyPatch, policy: Policy) -> None:
    monkeypatch.setattr(
        bot.flow.channels, "connector_classes", lambda: {"demo": DemoConnector, "webhook": WebhookConnector}
    )
    built = bot.flow.channels.build_connectors(policy, ENVIRON)
    shop = built["shop"]
    assert isinstance(shop, WebhookConnector) and shop.reply_url == "http://127.0.0.1:9/replies"
    assert shop.own_ids == ("shop_support",)
    with pytest.raises(bot.flow.channels.ConnectorSetupError, match=r"accounts\.form: .*CONTACT_FORM_SECRET"):
        bot.flow.channels.build_connectors(policy, {"WEBHOOK_SECRET_SHOP": SHOP_SECRET})


TARGET = ReplyTarget(
    external_id="order-1001", author_id="cust-7", author_handle="ana", thread_id="ticket-1001"
)


def replying(handler: Callable[[httpx.Request], httpx.Response]) -> WebhookConnector:
    return WebhookConnector(
        "shop",
        settings={"reply_url": "https://shop.example/replies"},
        environ=ENVIRON,
        transport=httpx.MockTransport(handler),
    )


def test_reply_posts_signed_json_and_returns_the_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"id": 555})

    assert replying(handler).reply(TARGET, "Sorry, refunded!") == "555"
    (request,) = seen
    assert str(request.url) == "https://shop.example/replies"
    # Standard Webhooks, checked by the package itself (against the real clock: replies are sent now).
    Webhook(SHOP_SECRET.encode()).verify(request.content, dict(request.headers))
    assert SIGNATURE_HEADER not in request.headers  # legacy only for legacy_signature accounts
    assert json.loads(request.content) == {
        "in_reply_to": "order-1001",
        "thread_id": "ticket-1001",
        "author_id": "cust-7",
        "text": "Sorry, refunded!",
    }


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(400, json={"error": "bad"}), NotSent),
        (httpx.Response(403), NotSent),
        (httpx.Response(404), NotSent),
        (httpx.Response(429, headers={"Retry-After": "30"}), RateLimited),
        (httpx.Response(500), ConnectorError),
        (httpx.Response(503), ConnectorError),
        (httpx.Response(200, text="ok"), ConnectorError),  # posted, but no id: outcome unknown
        (httpx.Response(200, json={"id": ""}), ConnectorError),
    ],
)
def test_reply_outcomes(response: httpx.Response, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        replying(lambda _request: response).reply(TARGET, "hi")
    # Only NotSent and RateLimited may be retried: everything else must not be a NotSent.
    assert isinstance(caught.value, NotSent | RateLimited) == (error in (NotSent, RateLimited))
    if isinstance(caught.value, RateLimited):
        assert caught.value.reset_at > datetime.now(UTC) + timedelta(seconds=25)


def test_a_reply_is_signed_and_parked_by_the_connectors_clock() -> None:
    """Like every connector, the webhook one takes `clock` (connectors.base.ConnectorOptions): its
    replies are stamped, and a 429 parks it, by that clock, not by the machine's."""
    clock = FakeClock(MONDAY)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return (
            httpx.Response(429, headers={"Retry-After": "30"})
            if len(seen) > 1
            else httpx.Response(201, json={"id": 7})
        )

    connector = WebhookConnector(
        "shop",
        settings={"reply_url": "https://shop.example/replies"},
        environ=ENVIRON,
        clock=clock,
        transport=httpx.MockTransport(handler),
    )
    assert connector.reply(TARGET, "hi") == "7"
    assert seen[0].headers["webhook-timestamp"] == str(int(MONDAY.timestamp()))
    assert (
        connector.verify_standard(seen[0].content, seen[0].headers, MONDAY) == seen[0].headers["webhook-id"]
    )
    with pytest.raises(RateLimited) as caught:
        connector.reply(TARGET, "hi again")
    assert caught.value.reset_at == MONDAY + timedelta(seconds=30)


def test_reply_network_errors() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def read_timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    with pytest.raises(NotSent):  # never connected: certainly not posted
        replying(refused).reply(TARGET, "hi")
    with pytest.raises(httpx.ReadTimeout):  # sent, no answer: unknown, must not be NotSent
        replying(read_timeout).reply(TARGET, "hi")
    with pytest.raises(NotSent, match="no reply_url"):
        WebhookConnector("shop", environ=ENVIRON).reply(TARGET, "hi")


def test_reply_over_a_real_socket_to_a_signature_checking_endpoint() -> None:
    received: list[dict[str, Any]] = []

    async def endpoint(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            Webhook(SHOP_SECRET.encode()).verify(body, dict(request.headers), json_parse=False)
        except WebhookVerificationError:
            return JSONResponse({"error": "bad signature"}, status_code=401)
        received.append(json.loads(body))
        return JSONResponse({"id": f"reply-{len(received)}"}, status_code=201)

    stand_in = Starlette(routes=[Route("/replies", endpoint, methods=["POST"])])
    with serve_in_thread(stand_in) as base_url:
        connector = WebhookConnector("shop", settings={"reply_url": f"{base_url}/replies"}, environ=ENVIRON)
        assert connector.reply(TARGET, "On it!") == "reply-1"
        wrong = WebhookConnector(
            "shop",
            settings={"reply_url": f"{base_url}/replies"},
            environ={"WEBHOOK_SECRET_SHOP": "wrong-secret-0123456789-0123456789"},
        )
        with pytest.raises(NotSent, match="401"):
            wrong.reply(TARGET, "On it!")
    assert received == [
        {"in_reply_to": "order-1001", "thread_id": "ticket-1001", "author_id": "cust-7", "text": "On it!"}
    ]


# --- the app, in-process --------------------------------------------------------------------


def post_delivery(
    client: AppClient, data: Any, *, account: str = "shop", secret: str = SHOP_SECRET
) -> httpx.Response:
    body = data if isinstance(data, bytes) else encode(data)
    return client.post(f"/hooks/{account}", content=body, headers=signed(body, secret))


def test_a_delivery_opens_a_conversation_with_card_and_ack(client: AppClient, ctx: AppContext) -> None:
    response = post_delivery(client, delivery())
    assert response.status_code == 202
    answer = response.json()
    assert answer["status"] == "accepted" and answer["duplicate"] is False
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert answer["conversation_id"] == conversation.id
        assert (conversation.team, conversation.owner) == ("billing", "maria")
        assert conversation.due_at == MONDAY + timedelta(hours=8)
        post = session.scalars(select(Post)).one()
        assert (post.external_id, post.author_handle, post.thread_key) == ("order-1001", "ana", "ticket-1001")
        assert list(session.scalars(select(Outbox.kind).order_by(Outbox.id))) == ["card", "ack"]
        account = session.scalars(select(Account).where(Account.name == "shop")).one()
        assert account.kind == "webhook" and account.last_success_at == MONDAY


def test_a_repeated_delivery_is_stored_once(client: AppClient, ctx: AppContext) -> None:
    first = post_delivery(client, delivery())
    again = post_delivery(client, delivery(text="edited text, same id"))
    assert again.status_code == 202
    assert again.json() == {
        "status": "accepted",
        "duplicate": True,
        "conversation_id": first.json()["conversation_id"],
    }
    assert snapshot(ctx)[:3] == (1, 1, 2)


def test_an_account_that_cannot_reply_gets_no_acknowledgement(client: AppClient, ctx: AppContext) -> None:
    assert post_delivery(client, delivery(), account="form", secret=FORM_SECRET).status_code == 202
    with ctx.sessions() as session:
        assert list(session.scalars(select(Outbox.kind))) == ["card"]


def test_our_own_post_answers_the_conversation(client: AppClient, ctx: AppContext) -> None:
    post_delivery(client, delivery())
    own = delivery(
        id="order-1001-r",
        author={"id": "staff-1", "handle": "shop_support"},
        text="Refunded!",
        reply_to_id="order-1001",
        created_at="2026-11-23T09:30:00+01:00",
    )
    assert post_delivery(client, own).status_code == 202
    with ctx.sessions() as session:
        assert session.scalars(select(Conversation.status)).one() == "answered"


BAD_SIGNATURES = {
    "missing": None,
    "empty": "",
    "wrong": "sha256=" + "0" * 64,
    "garbled": "garbage",
    "no-prefix": sign(SHOP_SECRET.encode(), encode(delivery())).removeprefix("sha256="),
    "other-accounts-secret": sign(FORM_SECRET.encode(), encode(delivery())),
    "other-body": sign(SHOP_SECRET.encode(), encode(delivery(id="x"))),
}


def test_a_bad_signature_is_refused_and_nothing_stored(client: AppClient, ctx: AppContext) -> None:
    for case, header in BAD_SIGNATURES.items():
        headers = {} if header is None else {SIGNATURE_HEADER: header}
        response = client.post("/hooks/shop", content=encode(delivery()), headers=headers)
        assert response.status_code == 401, case
        assert "signature" in response.json()["error"]
    # Checked on the raw bytes before parsing: an unsigned bad body is 401, a signed one 400.
    assert client.post("/hooks/shop", content=b"not json").status_code == 401
    assert post_delivery(client, b"not json").status_code == 400
    assert snapshot(ctx) == NOTHING


BAD_INPUT: list[tuple[Any, str]] = [
    (delivery(author={"id": 7}), "author.id"),
    (delivery(created_at="2026-11-23T08:00:00"), "created_at"),
    (delivery(text=None), "text"),
    (delivery(url="ftp://x.example"), "url"),
    (delivery(id="i" * 201), "id"),
    (b"\xff", "body"),
    (b"[" * 10_000, "body"),
    (b'{"id": NaN}', "body"),
]


def test_bad_input_is_400_naming_the_field(client: AppClient, ctx: AppContext) -> None:
    for data, field in BAD_INPUT:
        response = post_delivery(client, data)
        assert response.status_code == 400, field
        assert response.json()["field"] == field and response.json()["error"]
    assert snapshot(ctx) == NOTHING


def test_unknown_accounts_answer_like_known_ones(client: AppClient, ctx: AppContext) -> None:
    """Issue 11, finding 2: the answer tells nobody which account names exist."""
    body = encode(delivery())
    known = client.post("/hooks/shop", content=body)
    assert known.status_code == 401
    for account in ("nosuch", "social", "SHOP", "shop.x"):  # "social" exists but is not a webhook account
        for headers in ({}, signed(body)):
            response = client.post(f"/hooks/{account}", content=body, headers=headers)
            assert (response.status_code, response.content) == (401, known.content)
    assert client.get("/hooks/shop").status_code == 405
    assert snapshot(ctx) == NOTHING


def test_body_limit_in_process(client: AppClient, ctx: AppContext) -> None:
    at_limit = delivery()
    at_limit["padding"] = ""
    at_limit["padding"] = "p" * (MAX_BODY_BYTES - len(encode(at_limit)))
    body = encode(at_limit)
    assert len(body) == MAX_BODY_BYTES
    assert post_delivery(client, body).status_code == 202
    over = body[:-1] + b" }"
    assert len(over) == MAX_BODY_BYTES + 1
    response = client.post("/hooks/shop", content=over, headers=signed(over))
    assert response.status_code == 413
    assert snapshot(ctx)[0] == 1
    bad_length = client.post("/hooks/shop", content=b"{}", headers={**signed(b"{}"), "Content-Length": "abc"})
    assert bad_length.status_code == 400


def test_logs_carry_neither_body_nor_secrets(client: AppClient, caplog: pytest.LogCaptureFixture) -> None:
    private = "PRIVATE-CUSTOMER-TEXT"
    caplog.set_level(logging.DEBUG)
    accepted = encode(delivery(text=private))
    refused = encode(delivery(text=private, created_at="not a time"))
    assert post_delivery(client, accepted).status_code == 202
    assert post_delivery(client, refused).status_code == 400
    assert (
        client.post(
            "/hooks/shop", content=refused, headers={SIGNATURE_HEADER: "sha256=" + "a" * 64}
        ).status_code
        == 401
    )
    web_records = [r for r in caplog.records if r.name == "replyclock.web"]
    assert [r.status for r in web_records] == [202, 400, 401]  # type: ignore[attr-defined]
    assert web_records[1].field == "created_at"  # type: ignore[attr-defined]
    logged = " ".join(str(vars(r)) for r in caplog.records)
    for secret in (private, SHOP_SECRET, sign(SHOP_SECRET, accepted).removeprefix("sha256="), "a" * 64):
        assert secret not in logged


def test_a_database_failure_is_503_not_500(
    client: AppClient, ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any) -> None:
        raise OperationalError("INSERT", {}, Exception("connection lost"))

    monkeypatch.setattr(bot.web, "_store", broken)
    response = post_delivery(client, delivery())
    assert response.status_code == 503 and "retry" in response.json()["error"]


# --- a real uvicorn server on loopback --------------------------------------------------------


@pytest.fixture
def base_url(app: Starlette) -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


def test_real_server_end_to_end(base_url: str, ctx: AppContext) -> None:
    body = encode(delivery())
    with httpx.Client(base_url=base_url, timeout=10) as http:
        # Refusals first: their bodies are left unread, and the connection must still serve the next request.
        unknown = http.post("/hooks/elsewhere", content=body, headers=signed(body))
        unsigned = http.post("/hooks/shop", content=encode(delivery(id="other")))
        first = http.post("/hooks/shop", content=body, headers=signed(body))
        again = http.post("/hooks/shop", content=body, headers=signed(body))
    assert first.status_code == 202 and first.json()["duplicate"] is False
    assert again.status_code == 202 and again.json()["duplicate"] is True
    assert again.json()["conversation_id"] == first.json()["conversation_id"]
    assert (unsigned.status_code, unknown.status_code) == (401, 401)
    with ctx.sessions() as session:
        assert list(session.scalars(select(Outbox.kind).order_by(Outbox.id))) == ["card", "ack"]
    assert snapshot(ctx)[:3] == (1, 1, 2)


def test_real_server_refuses_oversized_bodies(base_url: str, ctx: AppContext) -> None:
    big = encode(delivery(text="x" * 100_000))
    headers = signed(big)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    with httpx.Client(base_url=base_url, timeout=10) as http:
        declared = http.post("/hooks/shop", content=big, headers=headers)
        chunked = http.post("/hooks/shop", content=chunks(), headers=headers)
    assert declared.status_code == 413 and declared.json()["error"].startswith("body larger")
    assert chunked.status_code == 413
    assert snapshot(ctx) == NOTHING
    with httpx.Client(base_url=base_url, timeout=10) as http:  # still serving
        assert (
            http.post(
                "/hooks/shop", content=encode(delivery()), headers=signed(encode(delivery()))
            ).status_code
            == 202
        )


def _raw_exchange(base_url: str, head: bytes, body_part: bytes) -> bytes:
    """Send a request head and part of its body, then read the answer without sending the rest."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + body_part)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


def test_real_server_stops_reading_at_the_limit(base_url: str, ctx: AppContext) -> None:
    sig = "".join(f"{name}: {value}\r\n" for name, value in signed(b"").items()).encode()
    # A declared length over the limit: answered before a single body byte is sent.
    head = b"POST /hooks/shop HTTP/1.1\r\nHost: test\r\n" + sig + b"Content-Length: 100000000\r\n\r\n"
    assert _raw_exchange(base_url, head, b"").startswith(b"HTTP/1.1 413")
    # Chunked: answered as soon as 64 KiB + 1 arrived, though the body never ends.
    head = b"POST /hooks/shop HTTP/1.1\r\nHost: test\r\n" + sig + b"Transfer-Encoding: chunked\r\n\r\n"
    part = MAX_BODY_BYTES + 1
    assert _raw_exchange(base_url, head, f"{part:x}\r\n".encode() + b"x" * part + b"\r\n").startswith(
        b"HTTP/1.1 413"
    )
    assert snapshot(ctx) == NOTHING


# --- fuzz -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
ABSENT = object()


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, valid, json_values, st.just(ABSENT))


def _without_absent(data: dict[str, Any]) -> dict[str, Any]:
    return {
        key: {k: v for k, v in value.items() if v is not ABSENT} if isinstance(value, dict) else value
        for key, value in data.items()
        if value is not ABSENT
    }


timestamps = st.datetimes(
    min_value=datetime(1968, 1, 1),
    max_value=datetime(2026, 11, 26),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
).map(lambda d: d.isoformat())
valid_looking = st.fixed_dictionaries(
    {
        "id": _field(st.text(min_size=1, max_size=12)),
        "author": _field(
            st.fixed_dictionaries(
                {
                    "id": _field(st.text(min_size=1, max_size=8)),
                    "name": _field(st.text(max_size=8) | st.none()),
                }
            )
        ),
        "text": _field(st.text(max_size=40)),
        "url": _field(
            st.sampled_from(["https://shop.example/t/1", "http://x", "ftp://x", "not a url"]) | st.none()
        ),
        "created_at": _field(
            timestamps | st.sampled_from(["2026-11-23T08:00:00", "2026-11-23T08:00:00Z", "soon"])
        ),
        "thread_id": _field(st.text(max_size=8) | st.none()),
        "reply_to_id": _field(st.text(max_size=8) | st.none()),
        "language": _field(st.sampled_from(["en", "de", "pt-BR", "??"]) | st.none()),
    }
).map(_without_absent)
# Valid deliveries (ids from a small alphabet, so duplicates happen), and ones with one field off.
valid_deliveries = st.fixed_dictionaries(
    {
        "id": st.text(alphabet="abc", min_size=1, max_size=3),
        "author": st.fixed_dictionaries({"id": st.sampled_from(["u1", "u2", "u3"])}),
        "text": st.text(max_size=60),
        "created_at": st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2026, 11, 23)).map(
            lambda d: d.replace(tzinfo=UTC).isoformat()
        ),
    },
    optional={
        "thread_id": st.sampled_from(["t1", "t2"]) | st.none(),
        "reply_to_id": st.text(alphabet="abc", min_size=1, max_size=3) | st.none(),
        "language": st.sampled_from(["en", "de"]) | st.none(),
        "url": st.just("https://shop.example/t/1") | st.none(),
    },
)
FIELDS = ("id", "author", "text", "created_at", "thread_id", "reply_to_id", "language", "url")


def _one_field_off(data: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    changed = dict(data)
    if value is ABSENT:
        changed.pop(field, None)
    else:
        changed[field] = value
    return changed


one_field_off = st.builds(
    _one_field_off, valid_deliveries, st.sampled_from(FIELDS), json_values | st.just(ABSENT)
)
bodies = st.one_of(
    valid_deliveries.map(encode),
    one_field_off.map(encode),
    valid_looking.map(encode),
    json_values.map(encode),
    st.binary(max_size=200),
    st.sampled_from([b"NaN", b'{"id": Infinity}', b"[" * 5000, b'{"a":' * 3000, b"\xef\xbb\xbf{}", b""]),
    st.integers(MAX_BODY_BYTES - 2, MAX_BODY_BYTES + 50).map(lambda n: b"x" * n),
)
signature_kinds = st.sampled_from(
    ["valid", "valid", "valid", "missing", "garbled", "wrong", "other-secret", "raw"]
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(body=bodies, signature=signature_kinds, raw_header=st.binary(max_size=80))
def test_fuzz_never_500_and_rejections_store_nothing(
    client: AppClient, ctx: AppContext, body: bytes, signature: str, raw_header: bytes
) -> None:
    headers: dict[str, str | bytes] = {}
    if signature == "valid":
        headers[SIGNATURE_HEADER] = sign(SHOP_SECRET.encode(), body)
    elif signature == "garbled":
        headers[SIGNATURE_HEADER] = sign(SHOP_SECRET.encode(), body)[:-3] + "zz"
    elif signature == "wrong":
        headers[SIGNATURE_HEADER] = sign(SHOP_SECRET.encode(), body + b"!")
    elif signature == "other-secret":
        headers[SIGNATURE_HEADER] = sign(FORM_SECRET.encode(), body)
    elif signature == "raw":
        headers[SIGNATURE_HEADER] = raw_header.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
    before = snapshot(ctx)
    response = client.post("/hooks/shop", content=body, headers=headers)
    assert response.status_code in (202, 400, 401, 413), response.text
    event(f"HTTP {response.status_code}")
    if response.status_code != 202:
        assert snapshot(ctx) == before
        assert "error" in response.json()
    else:
        assert signature == "valid" and len(body) <= MAX_BODY_BYTES
        after = snapshot(ctx)
        assert after[0] - before[0] == (0 if response.json()["duplicate"] else 1)


# --- issue 11, finding 5: signed, timestamped deliveries; replays never touch health ---------------


def _set_error(ctx: AppContext, message: str) -> None:
    with ctx.sessions() as session, session.begin():
        session.execute(update(Account).where(Account.name == "shop").values(last_error=message))


def _health(ctx: AppContext) -> tuple[Any, ...]:
    with ctx.sessions() as session:
        account = session.scalars(select(Account).where(Account.name == "shop")).one()
        return (account.last_success_at, account.last_error)


def test_a_replayed_delivery_changes_nothing_not_even_health(client: AppClient, ctx: AppContext) -> None:
    body = encode(delivery())
    headers = signed(body, message_id="msg_1")
    assert client.post("/hooks/shop", content=body, headers=headers).status_code == 202
    _set_error(ctx, "reply endpoint answered HTTP 500")  # the integrator is failing meanwhile
    before = (snapshot(ctx), _health(ctx))
    for replay in (headers, signed(body, message_id="msg_2")):  # the same id, and a new id, same post
        again = client.post("/hooks/shop", content=body, headers=replay)
        assert again.status_code == 202 and again.json()["duplicate"] is True
    assert (snapshot(ctx), _health(ctx)) == before
    assert _health(ctx)[1] == "reply endpoint answered HTTP 500"


def test_a_stale_or_future_timestamp_is_refused(client: AppClient, ctx: AppContext) -> None:
    body = encode(delivery())
    for skew in (timedelta(minutes=-6), timedelta(minutes=6)):
        headers = {
            **standard_headers(SHOP_SECRET, body, now=MONDAY + skew),
            "Content-Type": "application/json",
        }
        assert client.post("/hooks/shop", content=body, headers=headers).status_code == 401
    headers = {**standard_headers(SHOP_SECRET, body, now=MONDAY - timedelta(minutes=4))}
    assert client.post("/hooks/shop", content=body, headers=headers).status_code == 202


def test_a_forged_standard_signature_is_refused(client: AppClient, ctx: AppContext) -> None:
    body = encode(delivery())
    other = standard_headers("another-secret-0123456789-0123456789", body, now=MONDAY)
    assert client.post("/hooks/shop", content=body, headers=other).status_code == 401
    good = signed(body)
    tampered = {**good, "webhook-id": "msg_other"}  # the id is signed too
    assert client.post("/hooks/shop", content=body, headers=tampered).status_code == 401
    assert snapshot(ctx) == NOTHING


def test_the_legacy_signature_only_where_the_account_opts_in(ctx: AppContext) -> None:
    body = encode(delivery())
    legacy = {SIGNATURE_HEADER: sign(SHOP_SECRET.encode(), body), "Content-Type": "application/json"}
    plain = webhook_connectors(ctx.policy)
    with asgi_client(create_app(ctx, plain)) as client:
        assert client.post("/hooks/shop", content=body, headers=legacy).status_code == 401
    opted = dict(plain)
    shop = ctx.policy.accounts["shop"]
    opted["shop"] = WebhookConnector(
        "shop", settings={**shop.settings, "legacy_signature": True}, environ=ENVIRON
    )
    with asgi_client(create_app(ctx, opted)) as client:
        assert client.post("/hooks/shop", content=body, headers=legacy).status_code == 202


def test_a_short_secret_is_refused_at_load_and_by_check(policy: Policy) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        WebhookConnector("shop", environ={"WEBHOOK_SECRET_SHOP": "x"})
    # replyclock check builds each connector with the real environment (bot.flow.channels).
    check = bot.flow.channels.account_check(
        {"WEBHOOK_SECRET_SHOP": "short", "CONTACT_FORM_SECRET": FORM_SECRET}
    )
    assert any("at least 32" in message for _where, message in check(policy.accounts["shop"]))
    assert check(policy.accounts["form"]) == []
    # whsec_ secrets are base64: their decoded length counts.
    assert WebhookConnector("shop", environ={"WEBHOOK_SECRET_SHOP": "whsec_" + "QUFB" * 11})
    with pytest.raises(ValueError, match="is 24 bytes"):
        WebhookConnector("shop", environ={"WEBHOOK_SECRET_SHOP": "whsec_" + "QUFB" * 8})


# --- group commit: concurrent deliveries share a transaction, each with its own answer ---------


class _Held:
    """Holds the first transaction of deliveries open while the next deliveries queue behind it.

    Wraps bot.web._store_deliveries (every transaction of deliveries goes through it) and
    bot.web._GroupCommit.store (every delivery joins its queue there): records the deliveries of
    each transaction, counts the deliveries that joined a queue, and keeps the first transaction
    waiting until `release`.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.transactions: list[list[str]] = []
        self.queued = 0
        self.entered = threading.Event()
        self.released = threading.Event()
        store_deliveries = bot.web._store_deliveries
        join = bot.web._GroupCommit.store

        def holding(*args: Any) -> Any:
            self.transactions.append([d.post.external_id for d in args[3]])
            if len(self.transactions) == 1:
                self.entered.set()
                assert self.released.wait(30)
            return store_deliveries(*args)

        async def counting(group: Any, account: str, delivery: Any) -> Any:
            self.queued += 1
            return await join(group, account, delivery)

        monkeypatch.setattr(bot.web, "_store_deliveries", holding)
        monkeypatch.setattr(bot.web._GroupCommit, "store", counting)

    def send(
        self, pool: ThreadPoolExecutor, base_url: str, body: bytes, headers: dict[str, str]
    ) -> Future[httpx.Response]:
        """Post a delivery from the pool; return once it waits in its queue (so order is known)."""
        before = self.queued
        answer = pool.submit(httpx.post, f"{base_url}/hooks/shop", content=body, headers=headers, timeout=30)
        deadline = time.monotonic() + 10
        while self.queued == before:
            assert time.monotonic() < deadline, "the delivery never joined the queue"
            time.sleep(0.005)
        return answer


def _posts_by_id(ctx: AppContext) -> dict[str, int | None]:
    with ctx.sessions() as session:
        return {
            external_id: conversation_id
            for external_id, conversation_id in session.execute(
                select(Post.external_id, Post.conversation_id)
            )
        }


def test_deliveries_waiting_together_are_stored_in_one_transaction_each_with_its_answer(
    base_url: str, ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _Held(monkeypatch)
    first_body = encode(delivery(id="first", author={"id": "cust-1"}, thread_id="t-first"))
    bodies = {
        name: encode(delivery(id=name, author={"id": f"cust-{name}"}, thread_id=f"t-{name}", text=text))
        for name, text in (
            ("b", "I was charged twice"),
            ("c", "The app is down, I cannot log in"),
            ("d", "Where is my parcel?"),
        )
    }
    with ThreadPoolExecutor(8) as pool:
        first = held.send(pool, base_url, first_body, signed(first_body, message_id="msg_first"))
        assert held.entered.wait(10)
        # While the first transaction is open, these wait; then they go together, in this order.
        waiting = {
            "b": held.send(pool, base_url, bodies["b"], signed(bodies["b"], message_id="msg_b")),
            # the very same request again (a replay of its webhook-id) inside the same batch
            "b-replay": held.send(pool, base_url, bodies["b"], signed(bodies["b"], message_id="msg_b")),
            "c": held.send(pool, base_url, bodies["c"], signed(bodies["c"], message_id="msg_c")),
            # the same post under a new webhook-id inside the same batch, and the first post again
            "c-again": held.send(pool, base_url, bodies["c"], signed(bodies["c"], message_id="msg_c2")),
            "first-again": held.send(pool, base_url, first_body, signed(first_body, message_id="msg_f2")),
            "d": held.send(pool, base_url, bodies["d"], signed(bodies["d"], message_id="msg_d")),
        }
        held.released.set()
        answers = {name: future.result() for name, future in {"first": first, **waiting}.items()}
    assert held.transactions == [["first"], ["b", "b", "c", "c", "first", "d"]]
    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(answers, 202)
    stored = _posts_by_id(ctx)
    assert sorted(stored) == ["b", "c", "d", "first"]
    assert len(set(stored.values())) == 4 and None not in stored.values()
    expected = {
        "first": (False, stored["first"]),
        "b": (False, stored["b"]),
        "b-replay": (True, stored["b"]),
        "c": (False, stored["c"]),
        "c-again": (True, stored["c"]),
        "first-again": (True, stored["first"]),
        "d": (False, stored["d"]),
    }
    assert {
        name: (a.json()["duplicate"], a.json()["conversation_id"]) for name, a in answers.items()
    } == expected
    # One conversation, one card (and an acknowledgement) per post; one replay-guard row per id kept.
    assert snapshot(ctx)[:3] == (4, 4, 8)
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(SeenRequest)) == 6
        routed = {
            thread: (team, priority)
            for thread, team, priority in session.execute(
                select(Conversation.thread_key, Conversation.team, Conversation.priority)
            )
        }
    assert len({routed["t-b"], routed["t-c"], routed["t-d"]}) == 3  # each post routed on its own text


def test_a_failing_batch_keeps_nothing_and_its_deliveries_are_stored_one_at_a_time(
    base_url: str, ctx: AppContext, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    held = _Held(monkeypatch)
    real_classify = bot.flow.ingest.classify

    def classify(*args: Any, **kwargs: Any) -> Any:
        # After the batch's posts and webhook-ids are written: the whole transaction must go.
        if "POISON" in kwargs["text"]:
            raise RuntimeError("a delivery this code cannot route")
        return real_classify(*args, **kwargs)

    monkeypatch.setattr(bot.flow.ingest, "classify", classify)
    names = ["first", "b", "poison", "c"]
    bodies = {
        name: encode(
            delivery(
                id=name,
                author={"id": f"cust-{name}"},
                thread_id=f"t-{name}",
                text="POISON" if name == "poison" else "Where is my parcel?",
            )
        )
        for name in names
    }
    with ThreadPoolExecutor(8) as pool, caplog.at_level(logging.INFO, logger="replyclock.web"):
        futures = {
            "first": held.send(pool, base_url, bodies["first"], signed(bodies["first"], message_id="m-first"))
        }
        assert held.entered.wait(10)
        for name in names[1:]:
            futures[name] = held.send(
                pool, base_url, bodies[name], signed(bodies[name], message_id=f"m-{name}")
            )
        held.released.set()
        answers = {name: future.result() for name, future in futures.items()}
    # The batch of three failed; then each went alone: the poisoned one fails by itself.
    assert held.transactions == [["first"], ["b", "poison", "c"], ["b"], ["poison"], ["c"]]
    assert {name: a.status_code for name, a in answers.items()} == {
        "first": 202,
        "b": 202,
        "poison": 500,
        "c": 202,
    }
    stored = _posts_by_id(ctx)
    assert sorted(stored) == ["b", "c", "first"]
    for name in ("b", "c"):
        assert answers[name].json() == {
            "status": "accepted",
            "duplicate": False,
            "conversation_id": stored[name],
        }
    # Nothing of the failed batch was kept: no post, card or webhook-id twice, none of the poison's.
    assert snapshot(ctx)[:3] == (3, 3, 6)
    with ctx.sessions() as session:
        assert sorted(session.scalars(select(SeenRequest.key))) == [
            "webhook:shop:m-b",
            "webhook:shop:m-c",
            "webhook:shop:m-first",
        ]
    assert any(r.getMessage().startswith("webhook batch not stored") for r in caplog.records)
    # The sender retries the poisoned delivery once it is fixed: its id is not taken.
    fixed = encode(delivery(id="poison", author={"id": "cust-poison"}, text="fixed"))
    retry = httpx.post(f"{base_url}/hooks/shop", content=fixed, headers=signed(fixed, message_id="m-poison"))
    assert retry.status_code == 202 and retry.json()["duplicate"] is False


def test_a_batch_that_finds_the_database_down_is_503_for_each_and_stores_nothing(
    base_url: str, ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _Held(monkeypatch)
    holding = bot.web._store_deliveries

    def down(*args: Any) -> Any:
        if len(held.transactions) >= 1:
            held.transactions.append([d.post.external_id for d in args[3]])
            raise OperationalError("BEGIN", {}, Exception("connection refused"))
        return holding(*args)

    monkeypatch.setattr(bot.web, "_store_deliveries", down)
    bodies = {
        name: encode(delivery(id=name, author={"id": f"cust-{name}"}, thread_id=f"t-{name}"))
        for name in "abc"
    }
    with ThreadPoolExecutor(4) as pool:
        first = held.send(pool, base_url, bodies["a"], signed(bodies["a"]))
        assert held.entered.wait(10)
        others = [held.send(pool, base_url, bodies[name], signed(bodies[name])) for name in "bc"]
        held.released.set()
        assert first.result().status_code == 202
        answers = [future.result() for future in others]
    assert [a.status_code for a in answers] == [503, 503]
    assert all("retry" in a.json()["error"] for a in answers)
    assert held.transactions == [["a"], ["b", "c"], ["b"], ["c"]]
    assert sorted(_posts_by_id(ctx)) == ["a"]


def test_a_lone_delivery_is_stored_at_once_in_a_transaction_of_its_own(
    base_url: str, ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions: list[int] = []
    store_deliveries = bot.web._store_deliveries

    def counting(*args: Any) -> Any:
        transactions.append(len(args[3]))
        return store_deliveries(*args)

    monkeypatch.setattr(bot.web, "_store_deliveries", counting)
    with httpx.Client(base_url=base_url, timeout=10) as http:
        for name in ("a", "b", "c"):
            body = encode(delivery(id=name, author={"id": f"cust-{name}"}, thread_id=f"t-{name}"))
            answer = http.post("/hooks/shop", content=body, headers=signed(body))
            assert answer.status_code == 202 and answer.json()["duplicate"] is False
    assert transactions == [1, 1, 1]


def test_a_batch_that_meets_a_concurrent_change_is_stored_again_one_at_a_time(
    base_url: str, ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _Held(monkeypatch)
    real = bot.web.ingest_batch
    batches: list[int] = []

    def conflicted(*args: Any, **kwargs: Any) -> Any:
        batches.append(len(kwargs["posts"]))
        result = real(*args, **kwargs)
        if len(kwargs["posts"]) > 1:  # does its writes, then the flush finds a conversation changed
            raise StaleDataError("UPDATE statement on table 'conversations' expected to update 1 row(s)")
        return result

    monkeypatch.setattr(bot.web, "ingest_batch", conflicted)
    bodies = {
        name: encode(delivery(id=name, author={"id": f"cust-{name}"}, thread_id=f"t-{name}"))
        for name in "abc"
    }
    with ThreadPoolExecutor(4) as pool:
        first = held.send(pool, base_url, bodies["a"], signed(bodies["a"], message_id="m-a"))
        assert held.entered.wait(10)
        others = {
            name: held.send(pool, base_url, bodies[name], signed(bodies[name], message_id=f"m-{name}"))
            for name in "bc"
        }
        held.released.set()
        answers = {"a": first.result(), **{name: future.result() for name, future in others.items()}}
    assert batches == [1, 2, 1, 1]
    stored = _posts_by_id(ctx)
    assert sorted(stored) == ["a", "b", "c"]
    assert {name: a.json() for name, a in answers.items()} == {
        name: {"status": "accepted", "duplicate": False, "conversation_id": stored[name]} for name in "abc"
    }
    assert snapshot(ctx)[:3] == (3, 3, 6)


def test_remember_all_records_new_and_expired_keys_only(ctx: AppContext) -> None:
    later = MONDAY + timedelta(minutes=6)
    with ctx.sessions() as session, session.begin():
        assert remember_all(session, {"k1": later, "k2": later}, now=MONDAY) == {"k1", "k2"}
    with ctx.sessions() as session, session.begin():
        session.execute(update(SeenRequest).where(SeenRequest.key == "k2").values(expires_at=MONDAY))
    with ctx.sessions() as session, session.begin():
        # k1 is still remembered (a replay); k2 expired and is taken afresh; k3 is new.
        assert remember_all(session, {"k1": later, "k2": later, "k3": later}, now=MONDAY) == {"k2", "k3"}
        assert remember_all(session, {}, now=MONDAY) == set()
    with ctx.sessions() as session:
        assert {key: at for key, at in session.execute(select(SeenRequest.key, SeenRequest.expires_at))} == {
            "k1": later,
            "k2": later,
            "k3": later,
        }
