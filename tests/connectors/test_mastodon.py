"""The Mastodon connector: the real Mastodon.py client against a loopback server replaying recorded responses."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from mastodon import MastodonServerError
from sqlalchemy import Engine, func, select

from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.channels import ConnectorSetupError, build_connectors
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from bot.flow.outbox import OutboxSender
from bot.jobs import Jobs
from connectors.base import AuthFailed, ConnectorError, InboundPost, NotSent, RateLimited, ReplyTarget
from connectors.mastodon import MastodonConnector, ReplyAuthFailed, rate_limit_reset, with_mention
from connectors.text import html_to_text
from storage.models import Account, Conversation, Outbox, Post
from tests.conftest import POLICY_TOML
from tests.connectors.common import CrashesAfterFetch, jobs_recording_staff
from tests.connectors.mastodon_server import (
    MastodonStandIn,
    own_account_from_recording,
    recorded_mention_notification,
)

TOKEN = "test-token-never-logged"
OWN_ID = "117020565966271181"  # mastodonpy_test, the account the recorded mention mentions
CUSTOMER_ID = "117020565693913441"  # admin, who wrote it
RECORDED_STATUS_ID = "117020577157693549"
RECORDED_AT = datetime(2026, 8, 1, 13, 51, 42, 823000, tzinfo=UTC)


def mastodon_policy(api_base_url: str) -> Policy:
    text = (
        POLICY_TOML
        + f"""
[accounts.fedi]
kind = "mastodon"
api_base_url = "{api_base_url}"
account_id = "{OWN_ID}"
poll_interval = "30s"
"""
    )
    return parse_policy(tomllib.loads(text), source="tests/connectors/test_mastodon.py", text=text)


@pytest.fixture
def server() -> Iterator[MastodonStandIn]:
    with MastodonStandIn(own_account=own_account_from_recording()) as stand_in:
        yield stand_in


@pytest.fixture
def recorded(server: MastodonStandIn) -> dict[str, Any]:
    return server.add_notification(recorded_mention_notification())


def connector_for(
    server: MastodonStandIn, clock: FakeClock | None = None, **settings: Any
) -> MastodonConnector:
    return MastodonConnector(
        "fedi",
        settings={"api_base_url": server.base_url, "account_id": OWN_ID, **settings},
        environ={"MASTODON_ACCESS_TOKEN": TOKEN},
        clock=clock,
    )


@pytest.fixture
def fedi_ctx(server: MastodonStandIn, engine: Engine, clock: FakeClock) -> AppContext:
    return AppContext(policy=mastodon_policy(server.base_url), engine=engine, clock=clock)


def customer(number: int) -> dict[str, Any]:
    account = dict(recorded_mention_notification()["account"])
    account.update(
        id=str(117020565693913441 + number * 1000),
        username=f"customer{number}",
        acct=f"customer{number}@example.social",
        display_name=f"Customer {number}",
        url=f"https://example.social/@customer{number}",
        uri=f"https://example.social/users/customer{number}",
    )
    return account


def count(ctx: AppContext, model: type) -> int:
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


# -- reading ---------------------------------------------------------------------------------------


def test_recorded_mention_is_normalised_and_the_request_asks_for_mentions_only(
    server: MastodonStandIn, recorded: dict[str, Any]
) -> None:
    connector = connector_for(server)
    batch = connector.fetch(None)
    (post,) = batch.posts
    assert post.external_id == RECORDED_STATUS_ID
    assert post.author_id == CUSTOMER_ID and post.author_handle == "admin"
    assert post.author_name == "admin"  # display_name is "" in the recording: the username stands in
    assert post.text == "@mastodonpy_test hello!"
    assert post.posted_at == RECORDED_AT and post.posted_at.utcoffset() == timedelta(0)
    assert post.thread_id == RECORDED_STATUS_ID and post.reply_to_id is None
    assert post.url == "http://localhost:3000/@admin/117020577157693549" and post.language == "en"
    assert post.raw["visibility"] == "public" and post.raw["notification_id"] == "21"
    assert batch.cursor == "21" and batch.more is False
    assert not connector.is_own(post)

    (request,) = server.requests
    assert request.path == "/api/v1/notifications"
    assert request.query == {"types[]": ["mention"], "limit": ["40"]}
    assert request.headers["authorization"] == f"Bearer {TOKEN}"

    again = connector.fetch(batch.cursor)
    assert again.posts == () and again.cursor == "21" and again.more is False
    assert server.requests[-1].query == {"types[]": ["mention"], "min_id": ["21"], "limit": ["40"]}


def test_missing_optional_fields_and_odd_notifications_are_tolerated(server: MastodonStandIn) -> None:
    at = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    server.mention(
        "30",
        "117100000000000001",
        '<p>Hi <span class="h-card"><a href="https://m.example/@acme" class="u-url mention">@<span>acme</span></a></span>'
        " my order &amp; invoice<br />are missing &lt;3</p><p>Link: "
        '<a href="https://shop.example/orders/12345678901234567890" rel="nofollow noopener" target="_blank">'
        '<span class="invisible">https://</span><span class="ellipsis">shop.example/orders/1234567</span>'
        '<span class="invisible">8901234567890</span></a></p>',
        account={**customer(1), "display_name": None},
        at=at,
        in_reply_to_id="117099999999999999",
        language=None,
        url=None,
        spoiler_text="order trouble",
        media_attachments=[{"type": "image", "description": "a screenshot"}, {"type": "video"}],
    )
    server.add_notification(
        {"id": "31", "type": "mention", "created_at": "2026-11-23T09:01:00.000Z", "status": None}
    )
    connector = connector_for(server)
    batch = connector.fetch("29")
    (post,) = batch.posts
    assert post.author_name == "customer1" and post.author_handle == "customer1@example.social"
    assert post.text == (
        "CW: order trouble\n\nHi @acme my order & invoice\nare missing <3\n\n"
        "Link: https://shop.example/orders/12345678901234567890\n[image: a screenshot]\n[video]"
    )
    assert post.reply_to_id == post.thread_id == "117099999999999999"
    assert post.url == "https://example.social/users/customer1/statuses/117100000000000001"  # uri stands in
    assert post.language is None and post.posted_at == at
    assert batch.cursor == "31"  # the notification without a status is skipped, not re-read forever


def test_a_server_that_ignores_the_type_filter_still_yields_only_mentions(server: MastodonStandIn) -> None:
    server.mention("40", "117100000000000040", "<p>@acme help</p>", account=customer(2))
    server.add_notification(dict(recorded_mention_notification(), id="41", type="favourite"))
    server.honour_types = False
    batch = connector_for(server).fetch("39")
    assert [p.external_id for p in batch.posts] == ["117100000000000040"] and batch.cursor == "41"


# -- paging and restarts ---------------------------------------------------------------------------


class CrashAfterFetch(CrashesAfterFetch, MastodonConnector):
    pass


def test_pages_are_followed_and_a_restart_loses_nothing_and_stores_nothing_twice(
    server: MastodonStandIn, recorded: dict[str, Any], fedi_ctx: AppContext, clock: FakeClock
) -> None:
    ctx = fedi_ctx
    sender = OutboxSender(ctx, {})
    first = connector_for(server, clock)
    jobs = Jobs(ctx, {"fedi": first}, sender, send_after_poll=False)
    assert jobs.poll("fedi") == 1  # the recorded mention; cursor "21"

    start = clock.now()
    for number in range(95):  # notifications 22..116, three pages of 40
        server.mention(
            str(22 + number),
            str(117100000000000100 + number),
            f"<p>@mastodonpy_test question {number}</p>",
            account=customer(number % 5),
            at=start + timedelta(seconds=number),
        )
    crashing = CrashAfterFetch(
        "fedi", settings=first.settings, environ={"MASTODON_ACCESS_TOKEN": TOKEN}, clock=clock
    )
    crashing.crash_on = 2
    jobs = Jobs(ctx, {"fedi": crashing}, sender, send_after_poll=False)
    assert jobs.poll("fedi") == 40  # page one committed; page two fetched, then the process "died"
    with ctx.sessions() as session:
        account = session.scalars(select(Account).where(Account.name == "fedi")).one()
        assert account.cursor == "61" and account.parked_until is not None

    clock.advance(timedelta(minutes=20))  # past the back-off; a new process starts
    restarted = connector_for(server, clock)
    jobs = Jobs(ctx, {"fedi": restarted}, sender, send_after_poll=False)
    assert jobs.poll("fedi") == 55
    min_ids = [r.query.get("min_id", [None])[0] for r in server.requests_to("GET", "/api/v1/notifications")]
    assert min_ids == [None, "21", "61", "61", "101"]
    assert count(ctx, Post) == 96
    with ctx.sessions() as session:
        assert session.scalars(select(Account.cursor).where(Account.name == "fedi")).one() == "116"
        stored = set(session.scalars(select(Post.external_id)))
    assert stored == {RECORDED_STATUS_ID} | {str(117100000000000100 + n) for n in range(95)}

    # A crash after the fetch but before the commit means the old cursor is read again: harmless.
    with ctx.sessions() as session, session.begin():
        again = restarted.fetch("21")
        result = ingest_batch(
            session, ctx, account="fedi", posts=again.posts, is_own=restarted.is_own, cursor=again.cursor
        )
    assert result.stored == 0 and result.duplicates == 40
    assert count(ctx, Post) == 96 and count(ctx, Conversation) == 6


# -- replying --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "expected"),
    [("direct", "direct"), ("private", "private"), ("unlisted", "unlisted"), ("public", "unlisted")],
)
def test_reply_keeps_the_conversation_as_private_as_the_customer_wrote(
    server: MastodonStandIn, original: str, expected: str
) -> None:
    server.mention(
        "50",
        "117100000000000050",
        "<p>@acme where is my parcel?</p>",
        account=customer(3),
        visibility=original,
    )
    connector = connector_for(server)
    target = ReplyTarget(
        external_id="117100000000000050",
        author_id=customer(3)["id"],
        author_handle="customer3@example.social",
        thread_id=None,
    )
    reply_id = connector.reply(target, "It left the warehouse today.")
    (lookup,) = server.requests_to("GET", "/api/v1/statuses/117100000000000050")
    assert lookup.headers["authorization"] == f"Bearer {TOKEN}"
    (post,) = server.requests_to("POST", "/api/v1/statuses")
    assert post.form["status"] == ["@customer3@example.social It left the warehouse today."]
    assert post.form["in_reply_to_id"] == ["117100000000000050"]
    assert post.form["visibility"] == [expected]
    assert len(post.headers["idempotency-key"]) == 64
    assert server.statuses[reply_id]["visibility"] == expected
    assert server.statuses[reply_id]["account"]["id"] == OWN_ID


def test_a_mention_already_in_the_text_is_not_repeated() -> None:
    assert with_mention("Thanks @admin! Sam will answer.", "admin") == "Thanks @admin! Sam will answer."
    assert with_mention("Thanks @admin.", "admin") == "Thanks @admin."
    assert with_mention("Thanks @administrator!", "admin") == "@admin Thanks @administrator!"
    assert with_mention("Thanks @bob!", "bob@other.social") == "@bob@other.social Thanks @bob!"
    assert with_mention("hello", None) == "hello"


def test_rate_limit_on_fetch_raises_rate_limited_and_parks_the_account(
    server: MastodonStandIn, fedi_ctx: AppContext, clock: FakeClock
) -> None:
    reset = (datetime.now(UTC) + timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    limited = {"X-RateLimit-Limit": "300", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}
    server.fail("GET", "/api/v1/notifications", 429, error="Too many requests", headers=limited, times=2)
    connector = connector_for(server, clock)
    with pytest.raises(RateLimited) as caught:
        connector.fetch("21")
    # Read against the server's Date header, then placed on our (fake) clock.
    assert timedelta(seconds=118) <= caught.value.reset_at - clock.now() <= timedelta(seconds=122)

    jobs = Jobs(fedi_ctx, {"fedi": connector}, OutboxSender(fedi_ctx, {}), send_after_poll=False)
    assert jobs.poll("fedi") == 0
    with fedi_ctx.sessions() as session:
        account = session.scalars(select(Account).where(Account.name == "fedi")).one()
        assert account.cursor is None
        assert account.parked_until is not None
        assert timedelta(seconds=118) <= account.parked_until - clock.now() <= timedelta(seconds=122)
    assert len(server.requests) == 2
    assert jobs.poll("fedi") == 0 and len(server.requests) == 2  # parked: no request at all


def test_rate_limit_on_reply_is_not_sent(
    server: MastodonStandIn, recorded: dict[str, Any], clock: FakeClock
) -> None:
    server.fail("POST", "/api/v1/statuses", 429, headers={"Retry-After": "30"})
    connector = connector_for(server, clock)
    target = ReplyTarget(RECORDED_STATUS_ID, CUSTOMER_ID, "admin", RECORDED_STATUS_ID)
    with pytest.raises(RateLimited) as caught:
        connector.reply(target, "hello")
    assert caught.value.reset_at == clock.now() + timedelta(seconds=30)
    assert len(server.statuses) == 1  # nothing posted


def test_refused_credentials_are_auth_failures(server: MastodonStandIn, recorded: dict[str, Any]) -> None:
    server.fail("GET", "/api/v1/notifications", 401, error="The access token is invalid")
    connector = connector_for(server)
    with pytest.raises(AuthFailed) as caught:
        connector.fetch(None)
    assert "The access token is invalid" in str(caught.value) and TOKEN not in str(caught.value)

    server.fail("GET", "/api/v1/statuses/", 401, error="The access token is invalid")
    target = ReplyTarget(RECORDED_STATUS_ID, CUSTOMER_ID, "admin", RECORDED_STATUS_ID)
    with pytest.raises(ReplyAuthFailed) as refused:
        connector.reply(target, "hello")
    # Certainly not posted (NotSent: the outbox may retry) and a human must fix the token (AuthFailed).
    assert isinstance(refused.value, NotSent) and isinstance(refused.value, AuthFailed)
    server.fail("POST", "/api/v1/statuses", 403, error="This action is outside the authorized scopes")
    with pytest.raises(ReplyAuthFailed):
        connector.reply(target, "hello")


def test_reply_failures_are_mapped_by_what_they_prove(
    server: MastodonStandIn, recorded: dict[str, Any]
) -> None:
    connector = connector_for(server)
    target = ReplyTarget(RECORDED_STATUS_ID, CUSTOMER_ID, "admin", RECORDED_STATUS_ID)
    server.fail(
        "POST", "/api/v1/statuses", 422, error="Validation failed: Text character limit of 500 exceeded"
    )
    with pytest.raises(NotSent, match="character limit"):
        connector.reply(target, "x" * 600)
    gone = ReplyTarget("117000000000000000", CUSTOMER_ID, "admin", None)
    with pytest.raises(NotSent, match="could not read status"):
        connector.reply(gone, "hello")  # the original was deleted: nothing posted
    server.fail("POST", "/api/v1/statuses", 500, error="Internal server error")
    with pytest.raises(MastodonServerError) as unknown:
        connector.reply(target, "hello")
    # Neither NotSent nor RateLimited: the outbox marks the message unknown and never resends it.
    assert not isinstance(unknown.value, ConnectorError)
    assert len(server.statuses) == 1


def test_rate_limit_reset_headers() -> None:
    now = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    date = "Mon, 23 Nov 2026 07:00:00 GMT"  # the server's clock is an hour behind ours
    assert rate_limit_reset(
        {"x-ratelimit-reset": "2026-11-23T07:03:00.869078Z", "date": date}, now
    ) == now + timedelta(minutes=3, microseconds=869078)
    assert rate_limit_reset({"x-ratelimit-reset": "2026-11-23T08:02:00Z"}, now) == now + timedelta(minutes=2)
    assert rate_limit_reset({"retry-after": "90"}, now) == now + timedelta(seconds=90)
    assert rate_limit_reset({}, now) == now + timedelta(minutes=5)
    assert rate_limit_reset({"x-ratelimit-reset": "2020-01-01T00:00:00Z"}, now) == now + timedelta(seconds=1)


# -- settings --------------------------------------------------------------------------------------


def test_settings_are_checked_and_the_token_comes_from_the_environment(server: MastodonStandIn) -> None:
    with pytest.raises(ValueError, match="api_base_url"):
        MastodonConnector("fedi", settings={}, environ={"MASTODON_ACCESS_TOKEN": TOKEN})
    with pytest.raises(ValueError, match="MASTODON_ACCESS_TOKEN"):
        MastodonConnector("fedi", settings={"api_base_url": server.base_url}, environ={})
    with pytest.raises(ValueError, match="FEDI_TOKEN"):
        MastodonConnector(
            "fedi", settings={"api_base_url": server.base_url, "access_token_env": "FEDI_TOKEN"}, environ={}
        )
    with pytest.raises(ValueError, match="did you mean 'api_base_url'"):
        MastodonConnector(
            "fedi", settings={"api_base_uri": server.base_url}, environ={"MASTODON_ACCESS_TOKEN": TOKEN}
        )

    policy = mastodon_policy(server.base_url)
    with pytest.raises(
        ConnectorSetupError, match=r"accounts\.fedi: environment variable MASTODON_ACCESS_TOKEN"
    ):
        build_connectors(policy, {})
    built = build_connectors(policy, {"MASTODON_ACCESS_TOKEN": TOKEN})["fedi"]
    assert isinstance(built, MastodonConnector) and built.own_ids == (OWN_ID,)
    assert TOKEN not in repr(built)


def test_our_accounts_are_recognised_by_id_and_by_handle() -> None:
    connector = MastodonConnector(
        "fedi",
        own_ids=("@acme@mastodon.social", "maria@other.social", "support"),
        settings={"api_base_url": "https://mastodon.social", "account_id": OWN_ID},
        environ={"MASTODON_ACCESS_TOKEN": TOKEN},
    )

    def by(author_id: str, handle: str | None) -> bool:
        post = InboundPost("1", author_id, "text", RECORDED_AT, author_handle=handle)
        return connector.is_own(post)

    assert by(OWN_ID, None)
    assert by("1", "acme")  # a local account: Mastodon leaves the domain off
    assert by("1", "ACME@mastodon.social") and by("1", "maria@other.social") and by("1", "support")
    assert not by("1", "acme@evil.example") and not by("1", "maria") and not by("1", "admin")
    split = MastodonConnector(  # handles @user@example.com on an instance served from mastodon.example.com
        "fedi",
        own_ids=("@acme@example.com",),
        settings={"api_base_url": "https://mastodon.example.com"},
        environ={"MASTODON_ACCESS_TOKEN": TOKEN},
    )
    assert split.is_own(InboundPost("1", "1", "text", RECORDED_AT, author_handle="acme"))


def test_mastodon_html_becomes_plain_text() -> None:
    content = recorded_mention_notification()["status"]["content"]
    assert html_to_text(content) == "@mastodonpy_test hello!"
    assert (
        html_to_text("<p>one<br>two</p><p>three &amp; &#8220;four&#8221;</p>")
        == "one\ntwo\n\nthree & \u201cfour\u201d"
    )
    assert (
        html_to_text(
            '<p><a href="https://x.example/tags/help" class="mention hashtag">#<span>help</span></a></p>'
        )
        == "#help"
    )


# -- end to end ------------------------------------------------------------------------------------


def test_recorded_post_in_acknowledged_once_and_our_reply_answers(
    server: MastodonStandIn, recorded: dict[str, Any], fedi_ctx: AppContext, clock: FakeClock
) -> None:
    ctx = fedi_ctx
    clock.set(RECORDED_AT + timedelta(minutes=1))
    connectors = build_connectors(ctx.policy, {"MASTODON_ACCESS_TOKEN": TOKEN})
    jobs, staff_messages = jobs_recording_staff(ctx, connectors)  # sends the outbox right after the poll
    sender = jobs.sender

    assert jobs.poll("fedi") == 1
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert conversation.status == "open" and conversation.author_handle == "admin"
        assert conversation.thread_key == RECORDED_STATUS_ID and conversation.first_response_at is None
        ack = session.scalars(select(Outbox).where(Outbox.kind == "ack")).one()
        assert ack.status == "sent"
    (sent,) = server.requests_to("POST", "/api/v1/statuses")
    assert sent.form["in_reply_to_id"] == [RECORDED_STATUS_ID]
    assert sent.form["visibility"] == ["unlisted"]  # the customer wrote in public: we answer unlisted
    assert sent.form["status"][0].startswith("Thanks @admin!")
    assert ack.result is not None and server.statuses[ack.result]["in_reply_to_id"] == RECORDED_STATUS_ID
    assert staff_messages == ["card"]

    sender.send_due()
    assert jobs.poll("fedi") == 0
    assert len(server.requests_to("POST", "/api/v1/statuses")) == 1  # acknowledged once

    # A colleague of ours answers in the thread (from our account id): the next fetch sees it.
    clock.advance(timedelta(minutes=30))
    server.mention(
        "22",
        "117020600000009999",
        '<p><span class="h-card"><a href="http://localhost:3000/@admin" class="u-url mention">@<span>admin</span></a>'
        "</span> hello back! How can we help?</p>",
        account=own_account_from_recording(),
        at=clock.now() - timedelta(minutes=1),
        in_reply_to_id=RECORDED_STATUS_ID,
    )
    assert jobs.poll("fedi") == 1
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert conversation.status == "answered"
        assert conversation.first_response_at == clock.now() - timedelta(minutes=1)
        assert conversation.answered_by == "account:mastodonpy_test"
        directions = sorted(session.scalars(select(Post.direction)))
        assert directions == ["in", "out", "out"]  # the customer's post, our acknowledgement, our answer
        assert session.scalars(select(Account.cursor).where(Account.name == "fedi")).one() == "22"
    assert staff_messages == ["card", "card_update"]
    assert len(server.requests_to("POST", "/api/v1/statuses")) == 1
