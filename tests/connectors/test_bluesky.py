"""The Bluesky connector with the real atproto SDK against a loopback stand-in answering lexicon-shaped payloads."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from bot.config import ConfigError, parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow import staff as staff_flow
from bot.flow.channels import account_check, build_connectors
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from bot.jobs import Jobs
from connectors.base import AuthFailed, NotSent, RateLimited, ReplyTarget
from connectors.bluesky import BlueskyConnector, BlueskyCursor, mention_facet, normalise
from storage.models import Account, Conversation, Post
from tests.conftest import POLICY_TOML
from tests.connectors.bluesky_server import APP_PASSWORD, OUR_DID, OUR_HANDLE, BlueskyStandIn, fixture
from tests.connectors.common import CrashesAfterFetch, jobs_recording_staff

ENV = {"BLUESKY_APP_PASSWORD": APP_PASSWORD}
NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
RECORDED = fixture("notifications.json")["notifications"]
JANE_QUOTE, BOB_MENTION, CARLA_REPLY = (
    "at://did:plc:customerone0000000000000/app.bsky.feed.post/3lcq5u4kf2c2z",
    "at://did:plc:customertwo0000000000000/app.bsky.feed.post/3lcq5w7rd2s2b",
    "at://did:plc:customerthree00000000000/app.bsky.feed.post/3lcq5ztc3ks2c",
)


@pytest.fixture
def server() -> Iterator[BlueskyStandIn]:
    with BlueskyStandIn() as stand_in:
        for notification in reversed(RECORDED):
            stand_in.add(copy.deepcopy(notification))
        yield stand_in


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def sky_policy(server: BlueskyStandIn, session_file: Path, **extra: Any) -> Policy:
    lines = [
        "[accounts.sky]",
        'kind = "bluesky"',
        f'handle = "{OUR_HANDLE}"',
        f'service = "{server.base_url}"',
        f'session_file = "{session_file}"',
        'poll_interval = "30s"',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    text = POLICY_TOML + "\n" + "\n".join(lines) + "\n"
    return parse_policy(tomllib.loads(text), source="tests/connectors/test_bluesky.py", text=text)


def connector_for(
    server: BlueskyStandIn, tmp_path: Path, clock: FakeClock, **settings: Any
) -> BlueskyConnector:
    return BlueskyConnector(
        "sky",
        settings={
            "handle": OUR_HANDLE,
            "service": server.base_url,
            "session_file": str(tmp_path / "bluesky.session"),
            **settings,
        },
        environ=ENV,
        clock=clock,
    )


def mention(number: int, at: datetime) -> dict[str, Any]:
    """A further mention shaped like the recorded one, from one of five customers."""
    notification = copy.deepcopy(RECORDED[2])
    who = f"did:plc:customer{number % 5:02d}aaaaaaaaaaaaaaaa"
    rkey = f"3lcr{number:06d}aa"
    notification["uri"] = f"at://{who}/app.bsky.feed.post/{rkey}"
    notification["cid"] = f"bafyreicustomer{number:06d}"
    notification["author"] = {"did": who, "handle": f"customer{number % 5}.bsky.social", "labels": []}
    stamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    notification["record"]["createdAt"] = stamp
    notification["record"]["text"] = f"@acme.bsky.social question {number}"
    notification["indexedAt"] = stamp
    return notification


def count(ctx: AppContext, model: type) -> int:
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


# -- reading ---------------------------------------------------------------------------------------


def test_recorded_notifications_become_posts_and_likes_and_follows_do_not(
    server: BlueskyStandIn, tmp_path: Path, clock: FakeClock
) -> None:
    batch = connector_for(server, tmp_path, clock).fetch(None)
    assert [p.external_id for p in batch.posts] == [JANE_QUOTE, BOB_MENTION, CARLA_REPLY]  # oldest first
    jane, bob, carla = batch.posts
    assert (jane.author_handle, jane.author_name, jane.language) == ("jane.bsky.social", "Jane Doe", "de")
    assert jane.url == "https://bsky.app/profile/jane.bsky.social/post/3lcq5u4kf2c2z"
    assert bob.text == "@acme.bsky.social my kettle will not switch on. Help?"
    assert bob.posted_at == datetime(2026, 11, 23, 7, 55, tzinfo=UTC)
    assert carla.thread_id == BOB_MENTION  # reply.root
    assert carla.reply_to_id == "at://did:plc:acmesupport0000000000000/app.bsky.feed.post/3lcq5x2ab2k2a"
    assert carla.meta is not None and carla.meta["root"]["uri"] == BOB_MENTION
    assert BlueskyCursor.load(batch.cursor) == BlueskyCursor(seen="2026-11-23T07:58:01.112Z")
    (listed,) = server.calls("app.bsky.notification.listNotifications")
    assert listed.query["limit"] == ["50"] and "cursor" not in listed.query
    assert len(server.calls("com.atproto.server.createSession")) == 1


def test_odd_notifications_are_skipped_not_fatal() -> None:
    assert normalise({"reason": "mention"}) is None
    assert normalise({**RECORDED[2], "record": {"$type": "app.bsky.feed.like"}}) is None
    broken_time = copy.deepcopy(RECORDED[2])
    broken_time["record"]["createdAt"] = "yesterday"
    post = normalise(broken_time)
    assert post is not None and post.posted_at == datetime(2026, 11, 23, 7, 55, 0, 941000, tzinfo=UTC)


class CrashAfterFetch(CrashesAfterFetch, BlueskyConnector):
    pass


def test_pages_are_followed_and_a_restart_mid_page_loses_nothing_and_stores_nothing_twice(
    server: BlueskyStandIn, tmp_path: Path, engine: Engine, clock: FakeClock
) -> None:
    ctx = AppContext(policy=sky_policy(server, tmp_path / "s"), engine=engine, clock=clock)
    sender = OutboxSender(ctx, {})
    first = connector_for(server, tmp_path, clock, limit=40)
    assert Jobs(ctx, {"sky": first}, sender, send_after_poll=False).poll("sky") == 3

    start = clock.now()
    for number in range(95):  # newer than everything stored: three pages of 40, the last with old ones
        server.add(mention(number, start + timedelta(seconds=number)))
    crashing = CrashAfterFetch("sky", settings=first.settings, environ=ENV, clock=clock)
    crashing.crash_on = 2
    assert Jobs(ctx, {"sky": crashing}, sender, send_after_poll=False).poll("sky") == 40
    with ctx.sessions() as session:
        cursor = BlueskyCursor.load(session.scalars(select(Account.cursor)).one())
    assert cursor.seen == "2026-11-23T07:58:01.112Z" and cursor.page is not None
    assert cursor.newest == (start + timedelta(seconds=94)).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )

    clock.advance(timedelta(minutes=20))
    restarted = connector_for(server, tmp_path, clock, limit=40)
    assert Jobs(ctx, {"sky": restarted}, sender, send_after_poll=False).poll("sky") == 55
    assert count(ctx, Post) == 98
    with ctx.sessions() as session:
        cursor = BlueskyCursor.load(session.scalars(select(Account.cursor)).one())
    assert cursor == BlueskyCursor(
        seen=(start + timedelta(seconds=94)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    assert Jobs(ctx, {"sky": restarted}, sender, send_after_poll=False).poll("sky") == 0
    assert count(ctx, Post) == 98


# -- session ---------------------------------------------------------------------------------------


def test_session_is_refreshed_persisted_and_reused_across_restarts(
    server: BlueskyStandIn, tmp_path: Path, clock: FakeClock
) -> None:
    server.access_ttl = 600  # the SDK refreshes access tokens that expire within 15 minutes
    session_file = tmp_path / "bluesky.session"
    connector_for(server, tmp_path, clock).fetch(None)
    assert len(server.calls("com.atproto.server.createSession")) == 1
    assert len(server.calls("com.atproto.server.refreshSession")) >= 1
    saved = session_file.read_text().split(":::")
    assert saved[1] == OUR_DID and saved[3] in server.refresh_tokens  # the latest (rotated) refresh token
    assert session_file.stat().st_mode & 0o777 == 0o600

    server.access_ttl = 7200
    connector_for(server, tmp_path, clock).fetch(None)  # a restart: the saved session, no password login
    assert len(server.calls("com.atproto.server.createSession")) == 1

    server.refresh_tokens.clear()  # the session was revoked meanwhile (app password deleted and re-made)
    server.access_tokens.clear()
    connector_for(server, tmp_path, clock).fetch(None)
    assert len(server.calls("com.atproto.server.createSession")) == 2


def test_wrong_app_password_is_an_auth_failure(
    server: BlueskyStandIn, tmp_path: Path, clock: FakeClock
) -> None:
    wrong = BlueskyConnector(
        "sky",
        settings={"handle": OUR_HANDLE, "service": server.base_url},
        environ={"BLUESKY_APP_PASSWORD": "wrong-pass-word-here"},
        clock=clock,
    )
    with pytest.raises(AuthFailed, match="BLUESKY_APP_PASSWORD"):
        wrong.fetch(None)
    with pytest.raises(AuthFailed):
        wrong.reply(
            ReplyTarget(BOB_MENTION, "did:x", "bob", BOB_MENTION, {"uri": BOB_MENTION, "cid": "c"}), "hi"
        )


def test_rate_limit_parks_the_account_until_ratelimit_reset(
    server: BlueskyStandIn, tmp_path: Path, engine: Engine, clock: FakeClock
) -> None:
    limited = fixture("rateLimited.json")
    reset = datetime.fromtimestamp(int(limited["headers"]["ratelimit-reset"]), tz=UTC)
    server.fail_next["app.bsky.notification.listNotifications"].append(limited)
    ctx = AppContext(policy=sky_policy(server, tmp_path / "s"), engine=engine, clock=clock)
    connector = connector_for(server, tmp_path, clock)
    jobs = Jobs(ctx, {"sky": connector}, OutboxSender(ctx, {}), send_after_poll=False)
    assert jobs.poll("sky") == 0
    with ctx.sessions() as session:
        account = session.scalars(select(Account)).one()
        assert account.parked_until == reset and account.cursor is None
    calls = len(server.requests)
    assert jobs.poll("sky") == 0 and len(server.requests) == calls  # parked: no request

    server.fail_next["com.atproto.repo.createRecord"].append(limited)
    post = connector.fetch(None).posts[0]
    with pytest.raises(RateLimited) as caught:
        connector.reply(
            ReplyTarget(
                post.external_id, post.author_id, post.author_handle, post.thread_id, post.meta or {}
            ),
            "hi",
        )
    assert caught.value.reset_at == reset


# -- replying --------------------------------------------------------------------------------------


def test_acknowledgements_are_threaded_replies_with_a_mention_facet(
    server: BlueskyStandIn, tmp_path: Path, engine: Engine, clock: FakeClock
) -> None:
    ctx = AppContext(policy=sky_policy(server, tmp_path / "sky.session"), engine=engine, clock=clock)
    connectors = build_connectors(ctx.policy, ENV)
    jobs, _staff = jobs_recording_staff(ctx, connectors)
    sender = jobs.sender
    assert jobs.poll("sky") == 3
    created = server.calls("com.atproto.repo.createRecord")
    assert len(created) == 2  # Jane and Bob; Carla answered in Bob's thread, which is his conversation
    by_parent = {c.body["record"]["reply"]["parent"]["uri"]: c.body for c in created}
    bob = by_parent[BOB_MENTION]
    assert bob["repo"] == OUR_DID and bob["collection"] == "app.bsky.feed.post"
    assert (
        bob["record"]["reply"]["root"] == bob["record"]["reply"]["parent"]
    )  # a thread's first post is its root
    assert bob["record"]["text"].startswith("Thanks @bob.example.org!")  # the handle is not repeated
    assert bob["record"]["facets"][0]["index"]["byteStart"] == len("Thanks ")
    assert bob["record"]["createdAt"].endswith("Z")  # datetime format of the lexicon, in UTC
    datetime.fromisoformat(bob["record"]["createdAt"].replace("Z", "+00:00"))
    with ctx.sessions() as session:
        conversation = session.scalars(
            select(Conversation).where(Conversation.thread_key == BOB_MENTION)
        ).one()
        assert conversation.author_handle == "bob.example.org"

    # Staff answer from Slack: the reply goes under Carla's post, in the thread Bob started.
    with ctx.sessions() as session, session.begin():
        staff_flow.reply(session, ctx, conversation.id, "sam", "A new one is on its way.", clock.now())
    sender.send_due()
    record = server.calls("com.atproto.repo.createRecord")[-1].body["record"]
    assert record["$type"] == "app.bsky.feed.post"
    assert record["reply"]["parent"] == {
        "$type": "com.atproto.repo.strongRef",
        "uri": CARLA_REPLY,
        "cid": RECORDED[0]["cid"],
    }
    assert record["reply"]["root"] == {
        "$type": "com.atproto.repo.strongRef",
        "uri": BOB_MENTION,
        "cid": RECORDED[2]["cid"],
    }
    assert record["text"] == "@carla.bsky.social A new one is on its way."
    (facet,) = record["facets"]
    assert facet["index"] == {"$type": "app.bsky.richtext.facet#byteSlice", "byteStart": 0, "byteEnd": 18}
    assert facet["features"] == [
        {"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:customerthree00000000000"}
    ]
    with ctx.sessions() as session:
        ours = session.scalars(select(Post).where(Post.direction == "out")).all()
        assert {p.external_id for p in ours} == set(server.records)
        assert session.get(Conversation, conversation.id).status == "answered"  # type: ignore[union-attr]
    assert count(ctx, Conversation) == 2


def test_mention_facets_count_utf8_bytes() -> None:
    facet = mention_facet("Grüße @jane.bsky.social!", "jane.bsky.social", "did:plc:j")
    assert facet is not None and facet["index"] == {"byteStart": 8, "byteEnd": 25}


def test_reply_refusals_are_not_sent(server: BlueskyStandIn, tmp_path: Path, clock: FakeClock) -> None:
    connector = connector_for(server, tmp_path, clock)
    post = connector.fetch(None).posts[1]
    target = ReplyTarget(
        post.external_id, post.author_id, post.author_handle, post.thread_id, post.meta or {}
    )
    server.fail_next["com.atproto.repo.createRecord"].append(
        {"status": 400, "body": {"error": "InvalidRequest", "message": "Record/reply/parent not found"}}
    )
    with pytest.raises(NotSent):
        connector.reply(target, "hello")
    with pytest.raises(NotSent, match="no record reference"):
        connector.reply(ReplyTarget("at://x", "did:x", None, None, {}), "hello")


def test_settings_and_secrets_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BLUESKY_APP_PASSWORD"):
        BlueskyConnector("s", settings={"handle": OUR_HANDLE}, environ={})
    with pytest.raises(ValueError, match="handle"):
        BlueskyConnector("s", settings={"handle": "not a handle"}, environ=ENV)
    with pytest.raises(ValueError, match="limit"):
        BlueskyConnector("s", settings={"handle": OUR_HANDLE, "limit": 500}, environ=ENV)
    text = POLICY_TOML + f'\n[accounts.sky]\nkind = "bluesky"\nhandle = "{OUR_HANDLE}"\n'
    with pytest.raises(ConfigError, match="BLUESKY_APP_PASSWORD"):
        parse_policy(tomllib.loads(text), source="t", text=text, account_check=account_check({}))
    parse_policy(tomllib.loads(text), source="t", text=text, account_check=account_check(ENV))
