"""The X connector with the real tweepy client against a loopback server replaying recorded X traffic."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import socket
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import pytest
from oauthlib.oauth1.rfc5849 import signature as oauth_signature  # type: ignore[import-untyped]
from sqlalchemy import select

from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.channels import ConnectorSetupError, build_connectors
from bot.flow.context import AppContext
from bot.flow.delivery import STAFF_KINDS, customer_handlers
from bot.flow.outbox import OutboxMessage, OutboxSender
from bot.jobs import Jobs
from connectors.base import AuthFailed, ConnectorError, NotSent, RateLimited, ReplyTarget
from connectors.x import (
    ReplyAuthFailed,
    ReplyOutcomeUnknown,
    XConnector,
    XCursor,
    parse_mentions,
    snowflake_time,
)
from storage.models import Account, Conversation, Outbox, Post
from tests.conftest import POLICY_TOML
from tests.connectors.x_server import (
    ENV,
    RECORDED_TWEET_ID,
    RECORDED_USER_ID,
    Timeline,
    XServer,
    json_reply,
    postman_client_forbidden,
    postman_example,
    postman_expanded_users,
    postman_rate_limited,
    postman_unauthorized,
    problem,
    recorded_mentions,
    tweet,
    user,
)
from tests.procs.launch import free_port

MENTIONS = r"/2/users/[0-9]+/mentions"
# When tweepy's suite recorded the mentions cassette (its `date` header): Friday 7 October 2022, 22:43:18 UTC.
RECORDED_AT = datetime(2022, 10, 7, 22, 43, 18, tzinfo=UTC)
RECORDED_IDS = [
    "1578516107798884353",
    "1578516142770909184",
    "1578516149339574274",
    "1578516190862794753",
    "1578516220231397376",
    "1578516230448631808",
    "1578516242867945475",
    "1578516249856077825",
    "1578516273537118209",
    "1578516295611748353",
]
US = user(RECORDED_USER_ID, "Twitter", "Twitter")
# The three people of the collection's includes.users example.
HAPPYCAMPER, SNOWMAN, JELLYBEAN = (
    user("63046977", "happycamper", "Emily Waligoske \U0001f3d5"),
    user("17200003", "snowman", "Jim Moffitt"),
    user("196883832", "jellybeanjones", "zachariah jones"),
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(RECORDED_AT + timedelta(minutes=1))


@pytest.fixture
def policy() -> Policy:
    text = POLICY_TOML + f'\n[accounts.x]\nkind = "x"\nuser_id = "{RECORDED_USER_ID}"\n'
    return parse_policy(tomllib.loads(text), source="tests/data/policy.toml + [accounts.x]", text=text)


@pytest.fixture
def server() -> Iterator[XServer]:
    with XServer() as running:
        yield running


def connector(server: XServer, clock: FakeClock | None = None, **settings: Any) -> XConnector:
    return XConnector(
        "x",
        settings={"user_id": RECORDED_USER_ID, "api_base_url": server.base_url, **settings},
        environ=ENV,
        clock=clock,
    )


def mention_queries(server: XServer) -> list[tuple[str | None, str | None]]:
    return [(r.query.get("since_id"), r.query.get("pagination_token")) for r in server.sent("GET", MENTIONS)]


def snowflake(at: datetime, sequence: int = 0) -> str:
    return str(((int(at.timestamp() * 1000) - 1288834974657) << 22) | sequence)


# -- reading ------------------------------------------------------------------------------------------


def test_recorded_mentions_are_normalised_oldest_first(server: XServer) -> None:
    batch = connector(server).fetch(None)
    assert [p.external_id for p in batch.posts] == RECORDED_IDS
    assert batch.more is True
    assert json.loads(batch.cursor or "") == {
        "newest_id": "1578516295611748353",
        "next_token": "7140dibdnow9c7btw423i3sy3u5zupmkcpofxcsmxj48j",
    }
    newest = batch.posts[-1]
    assert newest.text.startswith("@Twitter @TwitterSupport this is my ENTIRE feed")
    # The recording asked for no fields: author, time, conversation and language are all missing.
    assert (newest.author_id, newest.author_handle, newest.author_name) == ("unknown", None, None)
    assert newest.posted_at == datetime(
        2022, 10, 7, 22, 43, 6, 945000, tzinfo=UTC
    )  # 1665182506945 ms: the snowflake
    assert newest.thread_id == newest.external_id and newest.reply_to_id is None and newest.language is None
    assert newest.url == "https://x.com/i/status/1578516295611748353"
    for post in batch.posts:
        assert post.posted_at.tzinfo is UTC
        assert RECORDED_AT - timedelta(minutes=2) < post.posted_at < RECORDED_AT  # just before the response
    assert [p.posted_at for p in batch.posts] == sorted(p.posted_at for p in batch.posts)


def test_the_request_asks_for_the_fields_with_the_bearer_token(server: XServer) -> None:
    x = connector(server, max_results=50)
    x.fetch(None)
    x.fetch(
        XCursor(since_id="1578516107798884353", next_token="tok-2", newest_id="1578516295611748353").dump()
    )
    first, second = server.sent("GET", MENTIONS)
    assert first.path == f"/2/users/{RECORDED_USER_ID}/mentions"
    assert first.query == {
        "max_results": "50",
        "tweet.fields": "created_at,author_id,conversation_id,in_reply_to_user_id,referenced_tweets,lang",
        "expansions": "author_id",
        "user.fields": "username,name",
    }
    assert first.headers["Authorization"] == f"Bearer {ENV['X_BEARER_TOKEN']}"
    assert "Tweepy/" in first.headers["User-Agent"]
    assert second.query["since_id"] == "1578516107798884353"
    assert second.query["pagination_token"] == "tok-2"


def test_without_a_bearer_token_mentions_are_read_with_the_user_context(server: XServer) -> None:
    env = {k: v for k, v in ENV.items() if k != "X_BEARER_TOKEN"}
    XConnector(
        "x", settings={"user_id": RECORDED_USER_ID, "api_base_url": server.base_url}, environ=env
    ).fetch(None)
    assert server.sent("GET", MENTIONS)[0].headers["Authorization"].startswith("OAuth ")


def test_full_fields_in_the_collection_shapes() -> None:
    payload = postman_expanded_users()
    posts = {p.external_id: p for p in parse_mentions(payload)}
    assert len(posts) == 4
    post = posts["1276035977375477760"]
    assert (post.author_id, post.author_handle, post.author_name) == (
        "63046977",
        "happycamper",
        "Emily Waligoske \U0001f3d5",
    )
    assert post.posted_at == datetime(
        2020, 6, 25, 6, 14, 19, tzinfo=UTC
    )  # created_at wins over the snowflake
    assert post.reply_to_id == "1275653067283759104"
    assert post.thread_id == "1275653067283759104"  # no conversation_id asked for there: the replied-to tweet
    assert post.language == "en" and post.url == "https://x.com/happycamper/status/1276035977375477760"
    assert posts["1275763727908798470"].language is None  # lang "und"
    # A conversation_id, when present, is the thread.
    withconv = {**payload, "data": [{**payload["data"][0], "conversation_id": "1273733248749690880"}]}
    assert parse_mentions(withconv)[0].thread_id == "1273733248749690880"


def test_created_at_and_snowflake_agree_on_every_recorded_example() -> None:
    collection = postman_example(
        "Recent search", "200 Success - Request Tweet Fields with Expanded User Fields"
    )
    search = postman_example("Recent search", "200 Success - Request Expanded Media Fields")
    tweets = collection.json()["data"] + collection.json()["includes"]["tweets"] + search.json()["data"]
    assert len(tweets) == 17
    for t in tweets:
        created = datetime.fromisoformat(t["created_at"])
        assert snowflake_time(t["id"]).replace(microsecond=0) == created, t["id"]


def test_retweets_are_left_out_and_entities_are_unescaped() -> None:
    search = postman_example("Recent search", "200 Success - Request Tweet Fields").json()
    posts = parse_mentions(search)
    assert len(search["data"]) == 10
    # Seven of the ten are retweets ("RT @...": referenced_tweets type retweeted), not posts to answer.
    assert len(posts) == 3
    camps = next(p for p in posts if p.external_id == "1275840891014561796")
    assert "(not a worry in this setting) & kids from MD" in camps.text and "&amp;" not in camps.text


def test_an_empty_page_keeps_the_cursor(server: XServer) -> None:
    server.timeline = Timeline()
    batch = connector(server).fetch(XCursor(since_id="1578516295611748353").dump())
    assert batch.posts == () and batch.more is False
    assert json.loads(batch.cursor or "") == {"since_id": "1578516295611748353"}


def test_first_fetch_can_start_from_a_configured_since_id(server: XServer) -> None:
    server.timeline = Timeline()
    server.timeline.add(
        *[tweet(i, f"post {i}", author_id=SNOWMAN["id"]) for i in RECORDED_IDS], users=[SNOWMAN]
    )
    batch = connector(server, since_id=RECORDED_IDS[6]).fetch(None)
    assert [p.external_id for p in batch.posts] == RECORDED_IDS[7:]
    assert server.sent("GET", MENTIONS)[0].query["since_id"] == RECORDED_IDS[6]
    assert json.loads(batch.cursor or "") == {"since_id": RECORDED_IDS[-1]}


def test_an_expired_pagination_token_restarts_the_pages_without_skipping(server: XServer) -> None:
    server.timeline = Timeline()
    server.timeline.add(
        *[tweet(i, f"post {i}", author_id=SNOWMAN["id"]) for i in RECORDED_IDS], users=[SNOWMAN]
    )
    x = connector(server, max_results=5)
    batch = x.fetch(XCursor(since_id="1", next_token="expired", newest_id=RECORDED_IDS[-1]).dump())
    assert batch.posts == () and batch.more is True
    assert json.loads(batch.cursor or "") == {"since_id": "1"}
    again = x.fetch(batch.cursor)
    assert [p.external_id for p in again.posts] == RECORDED_IDS[5:]


def test_cursor_formats() -> None:
    assert XCursor.load(None) == XCursor()
    assert XCursor.load("1578516295611748353") == XCursor(since_id="1578516295611748353")
    cursor = XCursor(since_id="1", next_token="t", newest_id="9")
    assert XCursor.load(cursor.dump()) == cursor
    with pytest.raises(ConnectorError) as raised:
        XCursor.load('{"since_id": 12}')
    assert raised.value.retryable is False


# -- pagination and restarts through Jobs.poll, on a real database ------------------------------------


def test_pages_are_committed_one_by_one_and_a_restart_continues_where_it_stopped(
    ctx: AppContext, clock: FakeClock, server: XServer
) -> None:
    server.timeline = timeline = Timeline()
    postman = postman_expanded_users()
    oldest, *older = sorted(postman["data"], key=lambda t: int(t["id"]))
    timeline.add(oldest, users=postman["includes"]["users"])

    def poll(x: XConnector) -> int:
        return Jobs(ctx, {"x": x}, OutboxSender(ctx, {}), send_after_poll=False).poll("x")

    def stored_cursor() -> dict[str, str]:
        with ctx.sessions() as session:
            return dict(json.loads(session.scalars(select(Account.cursor)).one() or "{}"))

    first = connector(server, clock, max_results=5)
    assert poll(first) == 1
    assert stored_cursor() == {"since_id": oldest["id"]}

    # 13 new mentions: 3 from the collection (full fields) and the 10 recorded ones (no fields): 3 pages.
    timeline.add(*older, *recorded_mentions().json()["data"])
    server.script("GET", MENTIONS, None, None, problem(503, "Service Unavailable", "Service Unavailable"))
    assert poll(first) == 10  # pages 1 and 2 stored, page 3 failed: the poll stops and parks the account
    page_tokens = [q[1] for q in mention_queries(server)]
    assert mention_queries(server)[1:] == [
        (oldest["id"], None),
        (oldest["id"], page_tokens[2]),
        (oldest["id"], page_tokens[3]),
    ]
    assert stored_cursor() == {
        "since_id": oldest["id"],
        "next_token": page_tokens[3],
        "newest_id": RECORDED_IDS[-1],
    }
    with ctx.sessions() as session:
        assert session.scalars(select(Account.parked_until)).one() is not None

    # Meanwhile a new mention arrives; then the process restarts: a new connector, the cursor from the database.
    fresh = tweet(
        snowflake(RECORDED_AT + timedelta(seconds=30)), "@Twitter are you there?", author_id=JELLYBEAN["id"]
    )
    timeline.add(fresh, users=[JELLYBEAN])
    clock.advance(timedelta(minutes=5))
    restarted = connector(server, clock, max_results=5)
    assert poll(restarted) == 3  # page 3, with the same since_id and the stored token
    assert mention_queries(server)[-1] == (oldest["id"], page_tokens[3])
    assert stored_cursor() == {"since_id": RECORDED_IDS[-1]}
    assert poll(restarted) == 1  # the mention that came in during the pages
    assert mention_queries(server)[-1] == (RECORDED_IDS[-1], None)
    assert stored_cursor() == {"since_id": fresh["id"]}
    assert poll(restarted) == 0

    with ctx.sessions() as session:
        ids = list(session.scalars(select(Post.external_id).order_by(Post.posted_at)))
    expected = sorted([oldest["id"], *(t["id"] for t in older), *RECORDED_IDS, fresh["id"]], key=int)
    assert ids == expected  # nothing lost, nothing twice (15 mentions, 15 rows)


def test_rate_limit_parks_the_account_until_the_reset(
    ctx: AppContext, clock: FakeClock, server: XServer
) -> None:
    recorded = postman_rate_limited()
    server.script("GET", MENTIONS, recorded)
    with pytest.raises(RateLimited) as raised:
        connector(server).fetch(None)
    assert raised.value.reset_at == datetime.fromtimestamp(
        1593185073, tz=UTC
    )  # the recorded x-rate-limit-reset

    reset = clock.now() + timedelta(minutes=12)
    server.script("GET", MENTIONS, recorded.with_headers(x_rate_limit_reset=str(int(reset.timestamp()))))
    jobs = Jobs(ctx, {"x": connector(server, clock)}, OutboxSender(ctx, {}), send_after_poll=False)
    assert jobs.poll("x") == 0  # no exception escapes
    with ctx.sessions() as session:
        account = session.scalars(select(Account)).one()
        assert account.parked_until == reset and "rate limit" in (account.last_error or "")
    requests_before = len(server.requests)
    clock.advance(timedelta(minutes=11))
    assert jobs.poll("x") == 0 and len(server.requests) == requests_before  # still parked: X is not asked
    clock.advance(timedelta(minutes=2))
    assert jobs.poll("x") == 10


def test_a_spent_daily_cap_waits_for_its_own_reset(server: XServer) -> None:
    window, day = 1_700_000_000, 1_700_050_000
    server.script(
        "POST",
        "/2/tweets",
        postman_rate_limited().with_headers(
            x_rate_limit_reset=str(window),
            x_user_limit_24hour_remaining="0",
            x_user_limit_24hour_reset=str(day),
        ),
    )
    with pytest.raises(RateLimited) as raised:
        connector(server).reply(ReplyTarget("1", "u", None, None), "hello")
    assert raised.value.reset_at == datetime.fromtimestamp(day, tz=UTC)


def test_refused_credentials_are_auth_failures(ctx: AppContext, clock: FakeClock, server: XServer) -> None:
    server.script("GET", MENTIONS, postman_unauthorized(), postman_client_forbidden())
    x = connector(server, clock)
    with pytest.raises(AuthFailed) as raised:
        x.fetch(None)
    assert "X_BEARER_TOKEN" in str(raised.value) and ENV["X_BEARER_TOKEN"] not in str(raised.value)
    with pytest.raises(AuthFailed) as forbidden:
        x.fetch(None)
    assert "approved developer account" in str(forbidden.value)

    server.script("GET", MENTIONS, postman_unauthorized())
    jobs = Jobs(ctx, {"x": x}, OutboxSender(ctx, {}), send_after_poll=False)
    assert jobs.poll("x") == 0
    with ctx.sessions() as session:
        assert session.scalars(select(Account.parked_until)).one() == clock.now() + timedelta(minutes=15)


def test_other_failures_are_connector_errors(server: XServer) -> None:
    server.script("GET", MENTIONS, problem(500, "Internal Server Error", "Internal error"))
    with pytest.raises(ConnectorError):
        connector(server).fetch(None)
    with pytest.raises(ConnectorError):
        connector(server, api_base_url=f"http://127.0.0.1:{free_port()}").fetch(None)


def test_the_bearer_token_is_never_logged(server: XServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    x = connector(server)
    x.fetch(None)
    server.script("GET", MENTIONS, postman_unauthorized())
    with pytest.raises(AuthFailed):
        x.fetch(None)
    assert "Making API request" in caplog.text  # tweepy did log its request headers...
    for secret in ENV.values():
        assert secret not in caplog.text  # ...without the token
    assert all(secret not in repr(x) for secret in ENV.values())


# -- replying -----------------------------------------------------------------------------------------


def test_reply_posts_a_signed_reply_and_returns_the_id(server: XServer) -> None:
    target = ReplyTarget("1578516295611748353", "unknown", None, "1578516295611748353")
    assert connector(server).reply(target, "Thanks, we're on it & will answer soon") == RECORDED_TWEET_ID
    (sent,) = server.sent("POST", "/2/tweets")
    assert sent.json() == {
        "text": "Thanks, we're on it & will answer soon",
        "reply": {"in_reply_to_tweet_id": "1578516295611748353"},
    }
    header = sent.headers["Authorization"]
    assert header.startswith("OAuth ")
    oauth = {k.strip(): unquote(v.strip('"')) for k, v in (p.split("=", 1) for p in header[6:].split(","))}
    assert (
        oauth["oauth_consumer_key"] == ENV["X_CONSUMER_KEY"] and oauth["oauth_token"] == ENV["X_ACCESS_TOKEN"]
    )
    assert oauth["oauth_signature_method"] == "HMAC-SHA1" and oauth["oauth_version"] == "1.0"
    # Signed for api.twitter.com (the adapter swaps the host after signing), so X itself would accept it.
    params = [(k, v) for k, v in oauth.items() if k != "oauth_signature"]
    base = oauth_signature.signature_base_string(
        "POST",
        oauth_signature.base_string_uri("https://api.twitter.com/2/tweets"),
        oauth_signature.normalize_parameters(params),
    )
    key = f"{oauth_signature.utils.escape(ENV['X_CONSUMER_SECRET'])}&{oauth_signature.utils.escape(ENV['X_ACCESS_TOKEN_SECRET'])}"
    expected = base64.b64encode(hmac.new(key.encode(), base.encode(), hashlib.sha1).digest()).decode()
    assert oauth["oauth_signature"] == expected
    assert "Bearer" not in header


DUPLICATE = problem(403, "Forbidden", "You are not allowed to create a Tweet with duplicate content.")


@pytest.mark.parametrize(
    ("answer", "error", "words"),
    [
        (DUPLICATE, NotSent, "duplicate content"),
        (
            json_reply(
                400,
                "Bad Request",
                {
                    "errors": [
                        {"parameters": {"reply.in_reply_to_tweet_id": ["1"]}, "message": "tweet not found"}
                    ],
                    "title": "Invalid Request",
                    "detail": "One or more parameters to your request was invalid.",
                    "type": "https://api.twitter.com/2/problems/invalid-request",
                },
            ),
            NotSent,
            "tweet not found",
        ),
        (postman_unauthorized(), ReplyAuthFailed, "X_CONSUMER_KEY"),
        (postman_rate_limited(), RateLimited, "rate limit"),
        (
            json_reply(503, "Service Unavailable", {"errors": [{"code": 130, "message": "Over capacity"}]}),
            NotSent,
            "over capacity",
        ),
        (problem(503, "Service Unavailable", "Service Unavailable"), ReplyOutcomeUnknown, "may or may not"),
        (problem(500, "Internal Server Error", "Internal error"), ReplyOutcomeUnknown, "may or may not"),
        (json_reply(201, "Created", {"errors": [{"message": "odd"}]}), ReplyOutcomeUnknown, "no data.id"),
    ],
)
def test_reply_failures_tell_not_sent_from_unknown(
    server: XServer, answer: Any, error: type[Exception], words: str
) -> None:
    server.script("POST", "/2/tweets", answer)
    with pytest.raises(error) as raised:
        connector(server).reply(ReplyTarget("1", "u", None, None), "hello")
    assert words in str(raised.value)
    # The outbox retries only what certainly was not posted; anything else is "unknown", never resent.
    certain = isinstance(raised.value, NotSent | RateLimited)
    assert certain == (error is not ReplyOutcomeUnknown)
    if error is ReplyAuthFailed:
        assert isinstance(raised.value, AuthFailed)


def test_no_connection_means_not_sent() -> None:
    x = XConnector(
        "x",
        settings={"user_id": RECORDED_USER_ID, "api_base_url": f"http://127.0.0.1:{free_port()}"},
        environ=ENV,
    )
    with pytest.raises(NotSent, match="could not connect"):
        x.reply(ReplyTarget("1", "u", None, None), "hello")


def test_a_reply_read_timeout_is_unknown(server: XServer) -> None:
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(1)  # accepts the connection, never answers
    try:
        port = blackhole.getsockname()[1]
        x = connector(server, api_base_url=f"http://127.0.0.1:{port}", timeout=0.3)
        with pytest.raises(ReplyOutcomeUnknown):
            x.reply(ReplyTarget("1", "u", None, None), "hello")
    finally:
        blackhole.close()


# -- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "environ", "words"),
    [
        ({}, ENV, "user_id is required"),
        ({"user_id": "@acme"}, ENV, "numeric X user id"),
        ({"user_id": "1", "bearer_token": "x"}, ENV, "unknown X setting(s) bearer_token"),
        (
            {"user_id": "1"},
            {k: v for k, v in ENV.items() if "SECRET" not in k},
            "X_CONSUMER_SECRET, X_ACCESS_TOKEN_SECRET",
        ),
        ({"user_id": "1", "consumer_key_env": "ACME_X_KEY"}, ENV, "ACME_X_KEY"),
        ({"user_id": "1", "max_results": 500}, ENV, "between 5 and 100"),
        ({"user_id": "1", "api_base_url": "api.twitter.com"}, ENV, "http(s) URL"),
        ({"user_id": "1", "timeout": 0}, ENV, "timeout"),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, Any], environ: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError) as raised:
        XConnector("x", settings=settings, environ=environ)
    assert words in str(raised.value)
    assert not any(secret in str(raised.value) for secret in ENV.values())


def test_built_from_the_policy_through_the_entry_point(server: XServer) -> None:
    text = (
        POLICY_TOML
        + f'\n[accounts.x]\nkind = "x"\nuser_id = 783214\nown_ids = ["Twitter"]\napi_base_url = "{server.base_url}"\n'
    )
    policy = parse_policy(tomllib.loads(text), source="replyclock.toml", text=text)
    built = build_connectors(policy, ENV)
    x = built["x"]
    assert (
        isinstance(x, XConnector)
        and x.user_id == RECORDED_USER_ID
        and x.own_ids == ("Twitter", RECORDED_USER_ID)
    )
    assert len(x.fetch(None).posts) == 10
    with pytest.raises(ConnectorSetupError, match=r"accounts\.x: environment variable\(s\) X_CONSUMER_KEY"):
        build_connectors(policy, {k: v for k, v in ENV.items() if k != "X_CONSUMER_KEY"})


def test_own_posts(server: XServer) -> None:
    x = connector(server)
    assert x.own_ids == (RECORDED_USER_ID,)
    (ours,) = parse_mentions({"data": [tweet("5", "@happycamper done", author_id=RECORDED_USER_ID)]})
    (theirs,) = parse_mentions({"data": [tweet("6", "@Twitter help", author_id=HAPPYCAMPER["id"])]})
    assert x.is_own(ours) and not x.is_own(theirs)


# -- end to end ---------------------------------------------------------------------------------------


def test_mentions_open_conversations_acks_go_once_and_our_reply_answers(
    ctx: AppContext, clock: FakeClock, server: XServer
) -> None:
    # The 10 recorded mentions, with the fields the recording lacks filled in the collection's shapes.
    customers = [HAPPYCAMPER, SNOWMAN, JELLYBEAN]
    recorded = recorded_mentions().json()["data"]
    server.timeline = timeline = Timeline()
    timeline.add(
        *[
            {
                **tweet(t["id"], t["text"], author_id=customers[i % 3]["id"]),
                "edit_history_tweet_ids": t["edit_history_tweet_ids"],
            }
            for i, t in enumerate(reversed(recorded))
        ],
        users=customers,
    )
    x = connector(server, clock)

    def noop(message: OutboxMessage) -> str | None:
        return "staff"

    sender = OutboxSender(ctx, {**customer_handlers(ctx, {"x": x}), **dict.fromkeys(STAFF_KINDS, noop)})
    jobs = Jobs(ctx, {"x": x}, sender)

    assert jobs.poll("x") == 10  # ingest, then the outbox sends what it caused
    with ctx.sessions() as session:
        conversations = list(session.scalars(select(Conversation).order_by(Conversation.id)))
        acks = list(session.scalars(select(Outbox).where(Outbox.kind == "ack").order_by(Outbox.id)))
        openers = [session.get(Post, a.payload["post_id"]) for a in acks]
    assert [c.author_handle for c in conversations] == ["happycamper", "snowman", "jellybeanjones"]
    assert all(c.status == "open" for c in conversations)
    assert [a.status for a in acks] == ["sent"] * 3
    posted = server.sent("POST", "/2/tweets")
    assert [p.json()["reply"]["in_reply_to_tweet_id"] for p in posted] == [
        p.external_id for p in openers if p
    ]
    assert posted[0].json()["text"].startswith("Thanks @happycamper!")
    assert acks[0].result == RECORDED_TWEET_ID

    # Polling again, re-reading the same mentions from scratch and running the outbox send nothing twice.
    assert jobs.poll("x") == 0
    with ctx.sessions() as session, session.begin():
        session.scalars(select(Account)).one().cursor = None
    assert jobs.poll("x") == 0
    jobs.run_outbox()
    assert len(server.sent("POST", "/2/tweets")) == 3

    # We answer happycamper on X ourselves; the mention shows up on the next fetch.
    opener = openers[0]
    assert opener is not None
    clock.advance(timedelta(minutes=20))
    ours = tweet(
        snowflake(clock.now() - timedelta(minutes=1)),
        "@happycamper we hear you, a fix is on its way",
        author_id=RECORDED_USER_ID,
        conversation_id=opener.external_id,
        replied_to=opener.external_id,
        in_reply_to_user_id=HAPPYCAMPER["id"],
    )
    timeline.add(ours, users=[US])
    assert jobs.poll("x") == 1
    with ctx.sessions() as session:
        answered = session.get(Conversation, conversations[0].id)
        others = [session.get(Conversation, c.id) for c in conversations[1:]]
        reply_row = session.scalars(select(Post).where(Post.external_id == ours["id"])).one()
    assert answered is not None and answered.status == "answered"
    assert answered.first_response_at == clock.now() - timedelta(minutes=1)
    assert [c.status for c in others if c] == ["open", "open"]
    assert reply_row.direction == "out" and reply_row.author_handle == "Twitter"
    assert len(server.sent("POST", "/2/tweets")) == 3
