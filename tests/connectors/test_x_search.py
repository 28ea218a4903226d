"""Listening on X: recent-search queries merged with mentions, against the loopback X server."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.jobs import Jobs
from connectors.x import XConnector, XState
from storage.models import Account, Conversation, Event, Post
from tests.conftest import POLICY_TOML
from tests.connectors.common import jobs_recording_staff
from tests.connectors.x_server import ENV, RECORDED_USER_ID, Timeline, XServer, tweet, user

QUERY = "acme app"
SENT_QUERY = "(acme app) -is:retweet"
NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
SEARCH = r"/2/tweets/search/recent"
MENTIONS = r"/2/users/[0-9]+/mentions"
ANNA = user("1001", "anna_k", "Anna K")
BEN = user("1002", "ben_w", "Ben W")
US = user(RECORDED_USER_ID, "Twitter", "Twitter")


def snowflake(at: datetime, sequence: int = 0) -> str:
    return str(((int(at.timestamp() * 1000) - 1288834974657) << 22) | sequence)


def mentioning_us(tweet_id: str, text: str, author: dict[str, str]) -> dict[str, Any]:
    data = tweet(tweet_id, text, author_id=author["id"])
    start = text.index("@Twitter")
    data["entities"] = {
        "mentions": [{"start": start, "end": start + 8, "username": "Twitter", "id": RECORDED_USER_ID}]
    }
    return data


@pytest.fixture
def server() -> Iterator[XServer]:
    with XServer() as running:
        running.timeline = Timeline()
        running.searches[SENT_QUERY] = Timeline()
        yield running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def x_ctx(server: XServer, engine: Engine, clock: FakeClock, **extra: str) -> AppContext:
    lines = [
        "[accounts.x]",
        'kind = "x"',
        f'user_id = "{RECORDED_USER_ID}"',
        f'api_base_url = "{server.base_url}"',
        f'search = ["{QUERY}"]',
        'search_team = "billing"',
        "max_results = 10",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    text = POLICY_TOML + "\n" + "\n".join(lines) + "\n"
    policy = parse_policy(tomllib.loads(text), source="tests/connectors/test_x_search.py", text=text)
    return AppContext(policy=policy, engine=engine, clock=clock)


def jobs_for(ctx: AppContext) -> tuple[Jobs, list[str]]:
    from bot.flow.channels import build_connectors

    connectors = build_connectors(ctx.policy, ENV)
    return jobs_recording_staff(ctx, connectors)


def test_search_hits_merge_with_mentions_once_go_to_the_listening_team_and_are_not_acknowledged(
    server: XServer, engine: Engine, clock: FakeClock
) -> None:
    assert server.timeline is not None
    both = mentioning_us(snowflake(NOW - timedelta(minutes=5)), "@Twitter the acme app logs me out", ANNA)
    overheard = tweet(
        snowflake(NOW - timedelta(minutes=4)), "ugh, acme app crashed again", author_id=BEN["id"]
    )
    ours = tweet(snowflake(NOW - timedelta(minutes=3)), "acme app 2.0 is out!", author_id=US["id"])
    server.timeline.add(both, users=[ANNA])
    server.searches[SENT_QUERY].add(both, overheard, ours, users=[ANNA, BEN, US])

    ctx = x_ctx(server, engine, clock)
    jobs, _staff = jobs_for(ctx)
    assert jobs.poll("x") == 2  # Anna's post once, though found both ways; our own tweet left out
    with ctx.sessions() as session:
        conversations = {c.author_id: c for c in session.scalars(select(Conversation))}
        assert set(conversations) == {ANNA["id"], BEN["id"]}
        anna, ben = conversations[ANNA["id"]], conversations[BEN["id"]]
        assert (anna.team, anna.priority) == ("care", "normal") and anna.acknowledged_at is not None
        assert (ben.team, ben.priority) == ("billing", "low") and ben.acknowledged_at is None
        skipped = session.scalars(select(Event).where(Event.action == "ack_skipped")).one()
        assert skipped.conversation_id == ben.id
        assert session.scalar(select(Post.id).where(Post.external_id == ours["id"])) is None
    replies = server.sent("POST", r"/2/tweets")
    assert len(replies) == 1 and replies[0].json()["reply"]["in_reply_to_tweet_id"] == both["id"]

    (search,) = server.sent("GET", SEARCH)
    assert search.query["query"] == SENT_QUERY and "since_id" not in search.query
    assert "entities" in search.query["tweet.fields"].split(",")
    assert search.query["max_results"] == "10"

    # The next round asks only for newer hits; nothing is stored twice.
    assert jobs.poll("x") == 0
    second = server.sent("GET", SEARCH)[-1]
    assert second.query["since_id"] == ours["id"]
    with ctx.sessions() as session:
        state = XState.load(session.scalars(select(Account.cursor)).one())
    assert state.query(QUERY).since_id == ours["id"] and state.mentions.since_id == both["id"]


def test_search_hits_can_be_acknowledged_when_the_account_says_so(
    server: XServer, engine: Engine, clock: FakeClock
) -> None:
    overheard = tweet(
        snowflake(NOW - timedelta(minutes=4)), "is acme app down for anyone?", author_id=BEN["id"]
    )
    server.searches[SENT_QUERY].add(overheard, users=[BEN])
    ctx = x_ctx(server, engine, clock, search_acknowledge="true", search_priority='"normal"')
    jobs, _ = jobs_for(ctx)
    assert jobs.poll("x") == 1
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        # "down" matches the outage rule: urgent stays urgent, the listening team still gets it.
        assert (conversation.team, conversation.priority) == ("billing", "urgent")
        assert conversation.acknowledged_at is not None
    assert len(server.sent("POST", r"/2/tweets")) == 1


def test_search_pages_are_followed_after_the_first_round_and_survive_a_restart(
    server: XServer, engine: Engine, clock: FakeClock
) -> None:
    first = tweet(snowflake(NOW - timedelta(hours=1)), "acme app is nice", author_id=BEN["id"])
    server.searches[SENT_QUERY].add(first, users=[BEN])
    connector = XConnector(
        "x",
        settings={
            "user_id": RECORDED_USER_ID,
            "api_base_url": server.base_url,
            "search": [QUERY],
            "max_results": 10,
        },
        environ=ENV,
        clock=clock,
    )
    batch = connector.fetch(None)
    assert [p.external_id for p in batch.posts] == [first["id"]] and not batch.more
    state = XState.load(batch.cursor)
    assert state.query(QUERY).since_id == first["id"] and state.mentions.since_id is None

    hits = [
        tweet(snowflake(NOW - timedelta(minutes=30 - n)), f"acme app thought {n}", author_id=BEN["id"])
        for n in range(25)
    ]
    server.searches[SENT_QUERY].add(*hits)
    seen: list[str] = []
    cursor = batch.cursor
    fetches = 0
    while True:
        fetches += 1
        # A new connector each time: a restart between pages continues from the stored cursor.
        restarted = XConnector("x", settings=connector.settings, environ=ENV, clock=clock)
        batch = restarted.fetch(cursor)
        seen.extend(p.external_id for p in batch.posts)
        cursor = batch.cursor
        if not batch.more:
            break
    assert fetches == 3 and sorted(seen) == sorted(h["id"] for h in hits)
    assert XState.load(cursor).query(QUERY).since_id == hits[-1]["id"]
    assert XState.load(cursor).query(QUERY).next_token is None


def test_search_settings_are_checked() -> None:
    base = {"user_id": RECORDED_USER_ID}
    with pytest.raises(ValueError, match="search must be a list"):
        XConnector("x", settings={**base, "search": "acme"}, environ=ENV)
    with pytest.raises(ValueError, match="search_priority"):
        XConnector("x", settings={**base, "search": ["a"], "search_priority": "meh"}, environ=ENV)
    with pytest.raises(ValueError, match="search_acknowledge"):
        XConnector("x", settings={**base, "search": ["a"], "search_acknowledge": "yes"}, environ=ENV)
    assert XState.load('{"since_id": "5"}').mentions.since_id == "5"  # the older cursor still loads
    assert XState.load("17").mentions.since_id == "17"


def test_check_reports_an_unknown_search_team() -> None:
    from bot.config import ConfigError
    from bot.flow.channels import account_check

    text = POLICY_TOML + (
        f'\n[accounts.x]\nkind = "x"\nuser_id = "{RECORDED_USER_ID}"\nsearch = ["acme"]\nsearch_team = "sales"\n'
    )
    with pytest.raises(
        ConfigError, match=r"accounts.x.search_team: unknown team 'sales' \(known: billing, care\)"
    ):
        parse_policy(tomllib.loads(text), source="t", text=text, account_check=account_check(ENV))
