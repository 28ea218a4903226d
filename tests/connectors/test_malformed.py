"""Connectors that never stall: a malformed item is skipped and recorded, the cursor moves past it,
the next good item still arrives, and the admin channel hears of it once per account and hour.

Real clients (tweepy, Mastodon.py) talk to the loopback X and Mastodon stand-ins; posts go through
`Jobs.poll` into a real database.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from bot.jobs import Jobs
from connectors.base import Connector, ConnectorError, ShapeError
from connectors.mastodon import MastodonConnector
from connectors.x import XConnector
from storage.models import Account, Outbox, Post, SkippedItem
from tests.conftest import POLICY_TOML
from tests.connectors.mastodon_server import (
    MastodonStandIn,
    own_account_from_recording,
)
from tests.connectors.x_server import RECORDED_USER_ID, XServer, json_reply, tweet, user

START = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
MENTIONS = r"/2/users/[0-9]+/mentions"
X_ENV = {
    "X_BEARER_TOKEN": "AAAA-test-bearer-0123456789",
    "X_CONSUMER_KEY": "test-consumer-key",
    "X_CONSUMER_SECRET": "test-consumer-secret",
    "X_ACCESS_TOKEN": "783214-test-access-token",
    "X_ACCESS_TOKEN_SECRET": "test-access-token-secret",
}
TOKEN = "test-token-never-logged"
OWN_ID = "117020565966271181"
ANA = user("63046977", "ana", "Ana")


def _ctx(engine: Engine, clock: FakeClock, accounts: str) -> AppContext:
    text = POLICY_TOML + accounts
    return AppContext(
        policy=parse_policy(tomllib.loads(text), source="t", text=text), engine=engine, clock=clock
    )


def _poll(ctx: AppContext, name: str, connector: Connector) -> int:
    return Jobs(ctx, {name: connector}, OutboxSender(ctx, {}), send_after_poll=False).poll(name)


def _stored(ctx: AppContext) -> list[str]:
    with ctx.sessions() as session:
        return sorted(session.scalars(select(Post.external_id)))


def _skipped(ctx: AppContext) -> list[tuple[str, Any]]:
    with ctx.sessions() as session:
        return [
            (row.field, row.raw["item"])
            for row in session.scalars(select(SkippedItem).order_by(SkippedItem.id))
        ]


def _alerts(ctx: AppContext) -> list[str]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Outbox.idempotency_key).where(Outbox.kind == "admin_alert")))


def _cursor(ctx: AppContext, name: str) -> str | None:
    with ctx.sessions() as session:
        return session.scalars(select(Account.cursor).where(Account.name == name)).one()


# -- X ---------------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def x_server() -> Iterator[XServer]:
    with XServer() as running:
        yield running


@pytest.fixture
def x_ctx(engine: Engine, clock: FakeClock) -> AppContext:
    return _ctx(engine, clock, f'\n[accounts.x]\nkind = "x"\nuser_id = "{RECORDED_USER_ID}"\n')


def _x(server: XServer, clock: FakeClock) -> XConnector:
    return XConnector(
        "x",
        settings={"user_id": RECORDED_USER_ID, "api_base_url": server.base_url},
        environ=X_ENV,
        clock=clock,
    )


def _page(data: Any, **meta: Any) -> Any:
    return json_reply(200, "OK", {"data": data, "includes": {"users": [ANA]}, "meta": meta})


def _tweet(tweet_id: str, text: str = "@Twitter help please") -> dict[str, Any]:
    return tweet(tweet_id, text, author_id=ANA["id"])


def test_x_malformed_tweets_are_skipped_recorded_and_the_good_ones_arrive(
    x_ctx: AppContext, clock: FakeClock, x_server: XServer
) -> None:
    x = _x(x_server, clock)
    numeric = {**_tweet("1800000000000000010"), "id": 1800000000000000010}
    no_id = {key: value for key, value in _tweet("1800000000000000011").items() if key != "id"}
    x_server.script(
        "GET",
        MENTIONS,
        _page([numeric, "not a tweet", 42, no_id, _tweet("1800000000000000012")]),
        _page(_tweet("1800000000000000020")),  # a single tweet object as data
        _page([_tweet("1800000000000000012"), _tweet("1800000000000000030")]),  # since_id ignored
        _page([{**_tweet("1800000000000000040"), "id": 1800000000000000040}]),  # only a malformed one
        _page([_tweet("1800000000000000050")]),
    )
    assert _poll(x_ctx, "x", x) == 1
    assert _stored(x_ctx) == ["1800000000000000012"]
    skipped = _skipped(x_ctx)
    assert [field for field, _ in skipped] == ["data[0].id", "data[1]", "data[2]", "data[3].id"]
    assert (
        skipped[0][1]["id"] == 1800000000000000010 and skipped[1][1] == "not a tweet" and skipped[2][1] == 42
    )
    # The cursor moved past the number id too: it is the page's greatest id.
    assert json.loads(_cursor(x_ctx, "x") or "{}") == {"since_id": "1800000000000000012"}
    assert _poll(x_ctx, "x", x) == 1  # the single-object shape
    assert _poll(x_ctx, "x", x) == 1  # only the new one of a page that ignored since_id
    assert _poll(x_ctx, "x", x) == 0
    assert json.loads(_cursor(x_ctx, "x") or "{}") == {"since_id": "1800000000000000040"}
    assert _poll(x_ctx, "x", x) == 1
    assert _stored(x_ctx)[-1] == "1800000000000000050"
    assert [r.query.get("since_id") for r in x_server.sent("GET", MENTIONS)][1:] == [
        "1800000000000000012",
        "1800000000000000020",
        "1800000000000000030",
        "1800000000000000040",
    ]
    assert _alerts(x_ctx) == ["skipped:x:20261123T08"]  # once per account and hour
    clock.advance(timedelta(hours=1))
    x_server.script("GET", MENTIONS, _page([{"text": "no id"}]))
    _poll(x_ctx, "x", x)
    assert _alerts(x_ctx) == ["skipped:x:20261123T08", "skipped:x:20261123T09"]


def test_x_data_of_the_wrong_shape_is_a_typed_error_naming_the_field(
    x_ctx: AppContext, clock: FakeClock, x_server: XServer
) -> None:
    x_server.script("GET", MENTIONS, _page("surprise"), _page([_tweet("1800000000000000060")]))
    with pytest.raises(ShapeError) as raised:
        _x(x_server, clock).fetch(None)
    assert isinstance(raised.value, ConnectorError) and raised.value.field == "data"
    assert "expected an array of tweets, got string 'surprise'" in str(raised.value)
    assert _poll(x_ctx, "x", _x(x_server, clock)) == 1


# -- Mastodon --------------------------------------------------------------------------------------


@pytest.fixture
def m_server() -> Iterator[MastodonStandIn]:
    with MastodonStandIn(own_account=own_account_from_recording()) as stand_in:
        yield stand_in


@pytest.fixture
def m_ctx(engine: Engine, clock: FakeClock, m_server: MastodonStandIn) -> AppContext:
    accounts = f'\n[accounts.fedi]\nkind = "mastodon"\napi_base_url = "{m_server.base_url}"\naccount_id = "{OWN_ID}"\n'
    return _ctx(engine, clock, accounts)


def _m(server: MastodonStandIn, clock: FakeClock) -> MastodonConnector:
    return MastodonConnector(
        "fedi",
        settings={"api_base_url": server.base_url, "account_id": OWN_ID},
        environ={"MASTODON_ACCESS_TOKEN": TOKEN},
        clock=clock,
    )


def _mention(server: MastodonStandIn, number: int) -> dict[str, Any]:
    return server.mention(
        str(number), str(117100000000000000 + number), f"<p>question {number}</p>", at=START
    )


def test_mastodon_malformed_notifications_are_skipped_and_the_next_good_one_arrives(
    m_ctx: AppContext, clock: FakeClock, m_server: MastodonStandIn
) -> None:
    fedi = _m(m_server, clock)
    _mention(m_server, 21)
    assert _poll(m_ctx, "fedi", fedi) == 1 and _cursor(m_ctx, "fedi") == "21"
    good = _mention(m_server, 25)
    no_status_id = {**good, "id": "24", "status": {**good["status"], "id": None}}
    m_server.answer_raw(
        "GET",
        "/api/v1/notifications",
        [
            good,
            "oops",
            {**good, "id": None},
            no_status_id,
            {**good, "id": 23, "status": {**good["status"], "id": "117100000000000023"}},
        ],
    )
    assert _poll(m_ctx, "fedi", fedi) == 2  # 25 and the one with a number id (23)
    assert _cursor(m_ctx, "fedi") == "25"
    assert [field for field, _ in _skipped(m_ctx)] == ["[1]", "[2].id", "[1].status.id"]
    assert _skipped(m_ctx)[0][1] == "oops"
    assert "117100000000000023" in _stored(m_ctx) and "None" not in _stored(m_ctx)
    _mention(m_server, 26)
    assert _poll(m_ctx, "fedi", fedi) == 1
    assert _alerts(m_ctx) == ["skipped:fedi:20261123T08"]


def test_mastodon_object_body_is_a_typed_error_and_the_poll_recovers(
    m_ctx: AppContext, clock: FakeClock, m_server: MastodonStandIn
) -> None:
    fedi = _m(m_server, clock)
    _mention(m_server, 21)
    m_server.answer_raw("GET", "/api/v1/notifications", {"error": "maintenance"})
    with pytest.raises(ShapeError) as raised:
        fedi.fetch(None)
    assert raised.value.field == "body" and "got an object" in str(raised.value)
    m_server.answer_raw("GET", "/api/v1/notifications", {"error": "maintenance"})
    assert _poll(m_ctx, "fedi", fedi) == 0  # the poll fails, backs off, nothing is lost
    clock.advance(timedelta(minutes=20))
    assert _poll(m_ctx, "fedi", fedi) == 1


def test_mastodon_server_ignoring_min_id_is_asked_at_most_twice_per_poll(
    m_ctx: AppContext, clock: FakeClock, m_server: MastodonStandIn
) -> None:
    fedi = _m(m_server, clock)
    m_server.honour_min_id = False
    for number in range(21, 71):  # 50 mentions: more than a page
        _mention(m_server, number)
    assert _poll(m_ctx, "fedi", fedi) == 40  # the first poll takes the newest page
    before = len(m_server.requests_to("GET", "/api/v1/notifications"))
    assert _poll(m_ctx, "fedi", fedi) == 0
    assert len(m_server.requests_to("GET", "/api/v1/notifications")) - before == 1
    _mention(m_server, 71)
    before = len(m_server.requests_to("GET", "/api/v1/notifications"))
    assert _poll(m_ctx, "fedi", fedi) == 1
    assert len(m_server.requests_to("GET", "/api/v1/notifications")) - before <= 2
    assert _cursor(m_ctx, "fedi") == "71"
    with m_ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Post)) == 41
