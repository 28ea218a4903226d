"""The Slack stand-in against the real slack_sdk WebClient and a real slack_bolt App over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from slack_bolt import Ack, App, Respond
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler
from slack_sdk.http_retry.builtin_interval_calculators import FixedValueRetryIntervalCalculator
from slack_sdk.signature import SignatureVerifier

from bot.demo.standin import (
    DEFAULT_SIGNING_SECRET,
    DEFAULT_TOKEN,
    METHOD_TIERS,
    POST_BURST,
    POST_PER_SECOND,
    PUBLISHED_LIMITS,
    RATE_LIMITS_ENV,
    RESPONSE_URL_METHOD,
    TIER_PER_MINUTE,
    UPLOAD_URL_METHOD,
    SlackStandIn,
    SlackUser,
)

CARE = "C0CARE0001"
BILLING = "C0BILL0001"
MARIA = SlackUser("U0MARIA01", "Maria Keller", display_name="Maria", tz="Europe/Berlin")
SAM = SlackUser("U0SAM0001", "Sam Okafor", tz="Europe/London")
CARD_BLOCKS: list[dict[str, Any]] = [
    {"type": "section", "text": {"type": "mrkdwn", "text": "New post from @jane for <@U0MARIA01>"}},
    {
        "type": "actions",
        "block_id": "card_actions",
        "elements": [
            {
                "type": "button",
                "action_id": "claim",
                "text": {"type": "plain_text", "text": "Claim"},
                "value": "conv-42",
                "style": "primary",
            },
            {
                "type": "button",
                "action_id": "snooze",
                "text": {"type": "plain_text", "text": "Snooze"},
                "value": "42",
            },
        ],
    },
]
MODAL: dict[str, Any] = {
    "type": "modal",
    "callback_id": "snooze",
    "private_metadata": "conv-42",
    "title": {"type": "plain_text", "text": "Snooze"},
    "submit": {"type": "plain_text", "text": "Snooze"},
    "blocks": [
        {
            "type": "input",
            "block_id": "for",
            "label": {"type": "plain_text", "text": "For how long?"},
            "element": {"type": "plain_text_input", "action_id": "minutes"},
        }
    ],
}


@pytest.fixture
def slack() -> Iterator[SlackStandIn]:
    with SlackStandIn(channels={CARE: "care", BILLING: "billing"}, users=[MARIA, SAM]) as standin:
        yield standin
        assert standin.internal_errors == []


@pytest.fixture
def client(slack: SlackStandIn) -> WebClient:
    return WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)


def slack_error(call: Any) -> SlackApiError:
    with pytest.raises(SlackApiError) as caught:
        call()
    return caught.value


# ------------------------------------------------------------------------------------------------
# The Web API through slack_sdk's WebClient


def test_base_url_and_lifecycle() -> None:
    standin = SlackStandIn()
    with pytest.raises(RuntimeError):
        _ = standin.base_url
    with standin:
        assert standin.base_url.startswith("http://127.0.0.1:")
        assert standin.base_url.endswith("/api/")
        with pytest.raises(RuntimeError):
            standin.start()
    standin.stop()  # twice is fine


def test_auth_test_has_what_bolt_reads(slack: SlackStandIn, client: WebClient) -> None:
    answer = client.auth_test()
    assert answer["ok"] is True
    for field in ("url", "team", "user", "team_id", "user_id", "bot_id"):
        assert answer[field]
    assert answer["user_id"] == slack.bot_user_id
    call = slack.calls_to("auth.test")[0]
    assert call.token == DEFAULT_TOKEN
    assert call.headers["Authorization"] == f"Bearer {DEFAULT_TOKEN}"


def test_post_thread_reply_and_update(slack: SlackStandIn, client: WebClient) -> None:
    posted = client.chat_postMessage(channel="#care", text="New post for <@U0MARIA01>", blocks=CARD_BLOCKS)
    assert posted["channel"] == CARE
    ts = posted["ts"]
    assert posted["message"]["ts"] == ts
    assert posted["message"]["bot_id"] == slack.bot_id
    assert posted["message"]["user"] == slack.bot_user_id
    assert all(block.get("block_id") for block in posted["message"]["blocks"])  # Slack fills them in

    reply = client.chat_postMessage(channel=CARE, thread_ts=ts, text="Maria is on it")
    reply_to_reply = client.chat_postMessage(channel=CARE, thread_ts=reply["ts"], text="thanks")
    assert reply_to_reply["message"]["thread_ts"] == ts  # threaded under the parent, as Slack does
    second = client.chat_postMessage(channel="billing", text="other channel")
    assert float(ts) < float(reply["ts"]) < float(reply_to_reply["ts"]) < float(second["ts"])
    assert ts == "1700000000.000100"

    updated = client.chat_update(channel=CARE, ts=ts, text="Claimed by <@U0MARIA01>")
    assert updated["ts"] == ts
    assert updated["text"] == "Claimed by <@U0MARIA01>"
    assert updated["message"]["blocks"][0]["text"]["text"].startswith("New post")  # blocks kept unless given

    care = slack.messages("#care")
    assert [m.ts for m in care] == [ts, reply["ts"], reply_to_reply["ts"]]
    card = care[0]
    assert card.text == "Claimed by <@U0MARIA01>"
    assert card.edits == 1
    assert card.previous_texts and card.previous_texts[0].startswith("New post")
    assert card.mentions == ("U0MARIA01",)
    assert not card.is_reply and care[1].is_reply and care[1].thread_ts == ts
    assert card.data["reply_count"] == 2 and card.data["latest_reply"] == reply_to_reply["ts"]
    assert [m.text for m in slack.thread(CARE, ts)][1:] == ["Maria is on it", "thanks"]

    client.chat_update(channel=CARE, ts=ts, text="Answered", blocks=[])
    after = slack.message(CARE, ts)
    assert after is not None and after.blocks == [] and after.edits == 2 and after.display_text == "Answered"
    assert len(slack.messages()) == 4

    # slack_sdk sends chat.postMessage as JSON (types kept) and users.info as a form (strings).
    assert slack.calls_to("chat.postMessage")[0].params["blocks"][1]["block_id"] == "card_actions"
    client.users_info(user="U0MARIA01", include_locale=True)
    assert slack.calls_to("users.info")[0].params["include_locale"] == "1"


def test_ephemeral_and_permalink(slack: SlackStandIn, client: WebClient) -> None:
    posted = client.chat_postMessage(channel=CARE, text="card")
    answer = client.chat_postEphemeral(channel=CARE, user=MARIA.id, text="only you", thread_ts=posted["ts"])
    assert answer["message_ts"]
    [ephemeral] = slack.ephemerals(CARE)
    assert (ephemeral.user, ephemeral.text, ephemeral.ts) == (MARIA.id, "only you", answer["message_ts"])
    assert [m.text for m in slack.messages(CARE)] == ["card"]  # not part of the history
    assert slack_error(lambda: client.chat_postEphemeral(channel=CARE, user="U0NOBODY0", text="x")).response[
        "error"
    ] == ("user_not_in_channel")

    link = client.chat_getPermalink(channel=CARE, message_ts=posted["ts"])
    assert link["permalink"] == f"https://{slack.team_domain}.slack.com/archives/{CARE}/p1700000000000100"
    missing = slack_error(lambda: client.chat_getPermalink(channel=CARE, message_ts="1.2"))
    assert missing.response["error"] == "message_not_found"


def test_slack_errors(slack: SlackStandIn, client: WebClient) -> None:
    def error_of(call: Any) -> str:
        caught = slack_error(call)
        assert caught.response.status_code == 200  # Slack answers errors with HTTP 200
        return str(caught.response["error"])

    assert error_of(lambda: client.chat_postMessage(channel="C0NOPE0001", text="x")) == "channel_not_found"
    assert error_of(lambda: client.chat_postMessage(channel="#nope", text="x")) == "channel_not_found"
    with pytest.warns(UserWarning, match="text"):  # slack_sdk warns before sending; Slack answers no_text
        assert error_of(lambda: client.chat_postMessage(channel=CARE)) == "no_text"
    assert (
        error_of(lambda: client.chat_update(channel=CARE, ts="1700000000.999999", text="x"))
        == "message_not_found"
    )
    too_long = [{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3001}}]
    invalid = slack_error(lambda: client.chat_postMessage(channel=CARE, text="x", blocks=too_long))
    assert invalid.response["error"] == "invalid_blocks"
    assert "/blocks/0/text/text" in invalid.response["response_metadata"]["messages"][0]

    slack.add_channel("C0OTHER001", "other", is_member=False)
    slack.add_channel("C0OLD00001", "old", is_archived=True)
    assert error_of(lambda: client.chat_postMessage(channel="C0OTHER001", text="x")) == "not_in_channel"
    assert error_of(lambda: client.chat_postMessage(channel="#old", text="x")) == "is_archived"

    human = slack.post_as_user(CARE, SAM.id, "a person wrote this")
    assert (
        error_of(lambda: client.chat_update(channel=CARE, ts=human["ts"], text="x")) == "cant_update_message"
    )

    unknown = slack_error(lambda: client.api_call("chat.frobnicate"))
    assert unknown.response["error"] == "unknown_method"

    assert error_of(lambda: WebClient(base_url=slack.base_url).auth_test()) == "not_authed"
    assert (
        error_of(lambda: WebClient(token="xoxb-wrong", base_url=slack.base_url).auth_test()) == "invalid_auth"
    )
    assert all(call.error for call in slack.calls)


def test_injected_error_with_status_200(slack: SlackStandIn, client: WebClient) -> None:
    slack.fail_next("chat.postMessage", error="invalid_auth", status=200)
    assert (
        slack_error(lambda: client.chat_postMessage(channel=CARE, text="x")).response["error"]
        == "invalid_auth"
    )
    assert client.chat_postMessage(channel=CARE, text="x")["ok"]
    assert len(slack.messages(CARE)) == 1  # the failed call changed nothing


def test_rate_limited_429_and_retry_handler(slack: SlackStandIn, client: WebClient) -> None:
    slack.fail_next("chat.postMessage", retry_after=7)
    limited = slack_error(lambda: client.chat_postMessage(channel=CARE, text="x"))
    assert limited.response.status_code == 429
    assert limited.response.headers["Retry-After"] == "7"
    assert limited.response.data == {"ok": False, "error": "ratelimited"}

    retrying = WebClient(
        token=DEFAULT_TOKEN,
        base_url=slack.base_url,
        retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=1)],
    )
    slack.fail_next("chat.postMessage", retry_after=0)
    assert retrying.chat_postMessage(channel=CARE, text="after the wait")["ok"]
    assert [call.status for call in slack.calls_to("chat.postMessage")] == [429, 429, 200]
    assert [m.text for m in slack.messages(CARE)] == ["after the wait"]


def test_per_channel_post_rate_limit() -> None:
    with SlackStandIn(channels={CARE: "care", BILLING: "billing"}, post_interval=30) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        client.chat_postMessage(channel=CARE, text="one")
        limited = slack_error(lambda: client.chat_postMessage(channel=CARE, text="two"))
        assert limited.response.status_code == 429
        assert 1 <= int(limited.response.headers["Retry-After"]) <= 30
        assert client.chat_postMessage(channel=BILLING, text="elsewhere")["ok"]


class _Seconds:
    """A fake clock for the stand-in's rate limits: seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_published_limits_post_burst_then_429_with_retry_after_per_channel() -> None:
    clock = _Seconds()
    with SlackStandIn(
        channels={CARE: "care", BILLING: "billing"}, rate_limits=True, limit_clock=clock
    ) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        for n in range(POST_BURST):
            assert client.chat_postMessage(channel=CARE, text=f"burst {n}")["ok"]
        limited = slack_error(lambda: client.chat_postMessage(channel="#care", text="one too many"))
        assert limited.response.status_code == 429
        assert limited.response.headers["Retry-After"] == "1"
        assert limited.response.data == {"ok": False, "error": "ratelimited"}
        # Another channel has a bucket of its own.
        assert client.chat_postMessage(channel=BILLING, text="elsewhere")["ok"]
        clock.now += 0.5
        assert (
            slack_error(lambda: client.chat_postMessage(channel=CARE, text="too soon")).response.status_code
            == 429
        )
        clock.now += 0.5
        assert client.chat_postMessage(channel=CARE, text="a second later")["ok"]
        assert (
            slack_error(lambda: client.chat_postMessage(channel=CARE, text="again")).response.status_code
            == 429
        )
        clock.now += 10
        for n in range(POST_BURST):  # a quiet channel takes a burst again
            assert client.chat_postMessage(channel=CARE, text=f"later {n}")["ok"]
        texts = [m.text for m in slack.messages(CARE)]
        assert "one too many" not in texts and "too soon" not in texts and "again" not in texts
        assert len(texts) == 2 * POST_BURST + 1


def test_published_limits_tiers_per_method() -> None:
    clock = _Seconds()
    with SlackStandIn(channels={CARE: "care"}, users=[MARIA], rate_limits=True, limit_clock=clock) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        ts = client.chat_postMessage(channel=CARE, text="card")["ts"]
        assert METHOD_TIERS["chat.update"] == 3 and TIER_PER_MINUTE[3] == 50
        for n in range(50):
            assert client.chat_update(channel=CARE, ts=ts, text=f"edit {n}")["ok"]
        limited = slack_error(lambda: client.chat_update(channel=CARE, ts=ts, text="edit 50"))
        assert limited.response.status_code == 429
        assert limited.response.headers["Retry-After"] == "2"  # 60 s / 50 = 1.2 s, in whole seconds
        assert slack.message(CARE, ts).text == "edit 49"  # type: ignore[union-attr]
        # Another method's tier is counted apart (conversations.open: Tier 3 too, its own bucket).
        assert client.conversations_open(users="U0MARIA01")["ok"]
        clock.now += 1.2
        assert client.chat_update(channel=CARE, ts=ts, text="edit 51")["ok"]
        # Tier 4 allows 100 a minute.
        for _ in range(100):
            assert client.users_info(user="U0MARIA01")["ok"]
        assert slack_error(lambda: client.users_info(user="U0MARIA01")).response.status_code == 429
        assert [call.status for call in slack.calls_to("users.info")].count(429) == 1


def test_published_limits_are_one_table() -> None:
    """Every limit the stand-in enforces is a row of PUBLISHED_LIMITS: the tiers and the per-channel posts."""
    post = PUBLISHED_LIMITS["chat.postMessage"]
    assert (post.per_second, post.burst, post.per_channel) == (POST_PER_SECOND, POST_BURST, True)
    tiered = {method: limit for method, limit in PUBLISHED_LIMITS.items() if method != "chat.postMessage"}
    assert set(tiered) == set(METHOD_TIERS)
    for method, limit in tiered.items():
        per_minute = TIER_PER_MINUTE[METHOD_TIERS[method]]
        assert (limit.per_second * 60, limit.burst, limit.per_channel) == (per_minute, per_minute, False)


def test_published_limits_are_off_by_default_and_on_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RATE_LIMITS_ENV, raising=False)
    with SlackStandIn(channels={CARE: "care"}) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        for n in range(POST_BURST + 5):
            assert client.chat_postMessage(channel=CARE, text=f"fast {n}")["ok"]
    monkeypatch.setenv(RATE_LIMITS_ENV, "1")
    with SlackStandIn(channels={CARE: "care"}, limit_clock=_Seconds()) as slack:
        assert slack.rate_limits
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        statuses = []
        for n in range(POST_BURST + 2):
            try:
                client.chat_postMessage(channel=CARE, text=f"paced {n}")
                statuses.append(200)
            except SlackApiError as error:
                statuses.append(error.response.status_code)
        assert statuses == [200] * POST_BURST + [429, 429]


def test_server_error_dropped_connection_and_delay(slack: SlackStandIn, client: WebClient) -> None:
    slack.fail_next("auth.test", error="internal_error", status=500)
    failed = slack_error(client.auth_test)
    assert failed.response.status_code == 500 and failed.response["error"] == "internal_error"

    # slack_sdk's ConnectionErrorRetryHandler (a default one, here without its back-off) retries a dropped connection.
    slack.fail_next("chat.postMessage", status=0)
    quick_retry = ConnectionErrorRetryHandler(interval_calculator=FixedValueRetryIntervalCalculator(0.01))
    retrying = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url, retry_handlers=[quick_retry])
    assert retrying.chat_postMessage(channel=CARE, text="x")["ok"]
    assert [call.status for call in slack.calls_to("chat.postMessage")] == [0, 200]

    slack.delay_next("auth.test", 0.4)
    request = urllib.request.Request(slack.base_url + "auth.test", data=b"token=" + DEFAULT_TOKEN.encode())
    started = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        urllib.request.urlopen(request, timeout=0.1)
    assert time.monotonic() - started < 0.35
    slack.wait_for("auth.test", count=2, timeout=5)  # the delayed answer is still recorded


def test_stop_does_not_wait_for_delayed_answers() -> None:
    slack = SlackStandIn().start()
    slack.delay_next("auth.test", 30)
    request = urllib.request.Request(slack.base_url + "auth.test", data=b"token=x")
    thread = threading.Thread(target=lambda: urllib.request.urlopen(request, timeout=0.3), daemon=True)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    slack.stop()
    assert time.monotonic() - started < 2


def test_raw_form_get_and_token_parameter(slack: SlackStandIn) -> None:
    query = urllib.parse.urlencode({"token": DEFAULT_TOKEN, "user": MARIA.id})
    with urllib.request.urlopen(slack.base_url + "users.info?" + query, timeout=5) as response:
        answer = json.loads(response.read())
        assert response.headers["Content-Type"].startswith("application/json")
    assert answer["ok"] and answer["user"]["id"] == MARIA.id
    body = json.dumps({"channel": CARE, "text": "json body"}).encode()
    request = urllib.request.Request(
        slack.base_url + "chat.postMessage",
        data=body,
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Authorization": f"Bearer {DEFAULT_TOKEN}",
        },
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.loads(response.read())["ok"]
    assert slack.calls_to("users.info")[0].token == DEFAULT_TOKEN


def test_files_upload_v2_end_to_end(slack: SlackStandIn, client: WebClient) -> None:
    parent = client.chat_postMessage(channel=CARE, text="weekly numbers")
    answer = client.files_upload_v2(
        channel=CARE,
        content=b"png bytes",
        filename="chart.png",
        title="Response times",
        initial_comment="This week",
        thread_ts=parent["ts"],
    )
    assert answer["file"]["title"] == "Response times"
    assert [c.method for c in slack.calls][-3:] == [
        "files.getUploadURLExternal",
        UPLOAD_URL_METHOD,
        "files.completeUploadExternal",
    ]
    assert slack.calls_to("files.getUploadURLExternal")[0].params["length"] == "9"
    [uploaded] = slack.files()
    assert (uploaded.id, uploaded.content, uploaded.filename, uploaded.channels) == (
        answer["file"]["id"],
        b"png bytes",
        "chart.png",
        (CARE,),
    )
    share = slack.messages(CARE)[-1]
    assert share.is_reply and share.thread_ts == parent["ts"] and share.text == "This week"
    assert share.files[0]["name"] == "chart.png" and share.files[0]["mimetype"] == "image/png"
    with urllib.request.urlopen(share.files[0]["url_private"], timeout=5) as download:
        assert download.read() == b"png bytes"

    again = slack_error(lambda: client.files_completeUploadExternal(files=[{"id": uploaded.id}]))
    assert again.response["error"] == "file_not_found"  # completes once
    pending = client.files_getUploadURLExternal(filename="notes.txt", length=5)
    never_uploaded = slack_error(
        lambda: client.files_completeUploadExternal(files=[{"id": pending["file_id"]}])
    )
    assert never_uploaded.response["error"] == "file_not_found"

    # The upload URL also takes multipart form data, as Slack's does.
    boundary = "----standin"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="notes.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    ).encode()
    request = urllib.request.Request(
        pending["upload_url"],
        data=multipart,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    done = client.files_completeUploadExternal(files=[{"id": pending["file_id"]}], channel_id=BILLING)
    assert done["files"] == [{"id": pending["file_id"], "title": "notes.txt"}]
    assert [f.content for f in slack.files() if f.id == pending["file_id"]] == [b"hello"]


def test_failed_upload_step_fails_files_upload_v2(slack: SlackStandIn, client: WebClient) -> None:
    slack.fail_next(UPLOAD_URL_METHOD, status=500, error="internal_error")
    with pytest.raises(urllib.error.HTTPError, match="500"):  # slack_sdk's urlopen raises it as is
        client.files_upload_v2(channel=CARE, content=b"x", filename="a.txt")
    assert slack.calls_to("files.completeUploadExternal") == []


def test_views_open_push_update_publish(slack: SlackStandIn, client: WebClient) -> None:
    trigger = slack.command_fields(user_id=MARIA.id)["trigger_id"]
    opened = client.views_open(trigger_id=trigger, view=MODAL)["view"]
    assert opened["id"].startswith("V") and opened["root_view_id"] == opened["id"]
    assert (opened["callback_id"], opened["private_metadata"], opened["state"]) == (
        "snooze",
        "conv-42",
        {"values": {}},
    )
    reused = slack_error(lambda: client.views_open(trigger_id=trigger, view=MODAL))
    assert reused.response["error"] == "exchanged_trigger_id"
    missing = slack_error(lambda: client.views_open(view=MODAL))
    assert missing.response["error"] == "invalid_arguments"
    assert missing.response["response_metadata"]["messages"] == ["invalid `trigger_id`"]
    long_title = dict(MODAL, title={"type": "plain_text", "text": "A title far too long for a modal"})
    assert slack_error(lambda: client.views_open(trigger_id="1.2.3", view=long_title)).response["error"] == (
        "invalid_arguments"
    )

    pushed = client.views_push(trigger_id=slack.command_fields(user_id=MARIA.id)["trigger_id"], view=MODAL)[
        "view"
    ]
    assert pushed["previous_view_id"] == opened["id"] and pushed["root_view_id"] == opened["id"]

    changed = dict(MODAL, title={"type": "plain_text", "text": "Snoozed"})
    updated = client.views_update(view_id=opened["id"], view=changed, hash=opened["hash"])["view"]
    assert updated["id"] == opened["id"] and updated["title"]["text"] == "Snoozed"
    stale = slack_error(lambda: client.views_update(view_id=opened["id"], view=changed, hash=opened["hash"]))
    assert stale.response["error"] == "hash_conflict"
    assert (
        slack_error(lambda: client.views_update(view_id="V0NOPE", view=changed)).response["error"]
        == "not_found"
    )

    home = {
        "type": "home",
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "Your queue: 3"}}],
    }
    published = client.views_publish(user_id=MARIA.id, view=home)["view"]
    assert published["type"] == "home"
    republished = client.views_publish(user_id=MARIA.id, view=home)["view"]
    assert republished["id"] == published["id"]
    home_view = slack.home_view(MARIA.id)
    assert home_view is not None and home_view["blocks"][0]["text"]["text"] == "Your queue: 3"
    nobody = slack_error(lambda: client.views_publish(user_id="U0NOBODY0", view=home))
    assert nobody.response["response_metadata"]["messages"] == ["invalid `user_id`"]


def test_strict_triggers() -> None:
    with SlackStandIn(users=[MARIA], strict_triggers=True) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        assert slack_error(lambda: client.views_open(trigger_id="1.2.3", view=MODAL)).response["error"] == (
            "invalid_trigger_id"
        )
        payload = slack.button_click("claim", "42", MARIA.id, "general", "1700000000.000100")
        assert client.views_open(trigger_id=payload["trigger_id"], view=MODAL)["ok"]


def test_users_info_directory_and_time_zones() -> None:
    july = datetime(2026, 7, 1, 12, tzinfo=UTC).timestamp()
    with SlackStandIn(users=[MARIA, SAM], clock=lambda: july) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        maria = client.users_info(user=MARIA.id)["user"]
        assert (maria["tz"], maria["tz_offset"], maria["tz_label"]) == ("Europe/Berlin", 7200, "CEST")
        assert maria["real_name"] == "Maria Keller" and maria["profile"]["display_name"] == "Maria"
        assert maria["profile"]["real_name"] == "Maria Keller" and maria["is_bot"] is False
        assert client.users_info(user=SAM.id)["user"]["tz_offset"] == 3600
        bot = client.users_info(user=slack.bot_user_id)["user"]
        assert bot["is_bot"] is True
        unknown = slack_error(lambda: client.users_info(user="U0NOBODY0"))
        assert unknown.response["error"] == "user_not_found"


def test_conversations_open_and_dms(slack: SlackStandIn, client: WebClient) -> None:
    opened = client.conversations_open(users=MARIA.id)
    dm = opened["channel"]["id"]
    assert dm.startswith("D") and "already_open" not in opened.data
    again = client.conversations_open(users=[MARIA.id], return_im=True)
    assert (
        again["channel"]["id"] == dm
        and again["already_open"] is True
        and again["channel"]["user"] == MARIA.id
    )
    assert client.chat_postMessage(channel=dm, text="you have 2 overdue")["channel"] == dm
    assert client.chat_postMessage(channel=MARIA.id, text="posting to the user id")["channel"] == dm
    assert [m.text for m in slack.messages(MARIA.id)] == ["you have 2 overdue", "posting to the user id"]
    group = client.conversations_open(users=f"{MARIA.id},{SAM.id}")["channel"]["id"]
    assert group != dm
    unknown = slack_error(lambda: client.conversations_open(users="U0NOBODY0"))
    assert unknown.response["error"] == "user_not_found"


def test_concurrent_posts_get_unique_increasing_ts(slack: SlackStandIn) -> None:
    def post(n: int) -> None:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        for i in range(5):
            client.chat_postMessage(channel=CARE, text=f"{n}-{i}")

    threads = [threading.Thread(target=post, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps = [m.ts for m in slack.messages(CARE)]
    assert len(stamps) == len(set(stamps)) == 40 == len(slack.calls_to("chat.postMessage"))
    assert stamps == sorted(stamps, key=float)


def test_clear_keeps_configuration(slack: SlackStandIn, client: WebClient) -> None:
    client.chat_postMessage(channel=CARE, text="x")
    client.conversations_open(users=MARIA.id)
    slack.fail_next("auth.test")
    slack.clear()
    assert slack.calls == [] and slack.messages() == []
    assert client.auth_test()["ok"]  # the pending fault went too
    assert client.chat_postMessage(channel="#care", text="y")["ts"] == "1700000000.000100"
    assert client.users_info(user=MARIA.id)["ok"]


# ------------------------------------------------------------------------------------------------
# Slack's side of HTTP mode: signatures and payloads


def test_signature_verifies_with_slack_sdk(slack: SlackStandIn) -> None:
    body = b"payload=%7B%22type%22%3A%22block_actions%22%7D"
    headers = slack.sign(body)
    verifier = SignatureVerifier(DEFAULT_SIGNING_SECRET)
    assert verifier.is_valid_request(body, headers)
    assert verifier.is_valid(body, headers["X-Slack-Request-Timestamp"], headers["X-Slack-Signature"])
    assert not verifier.is_valid_request(body + b"x", headers)
    assert not SignatureVerifier("another-secret").is_valid_request(body, headers)
    expected = hmac.new(DEFAULT_SIGNING_SECRET.encode(), b"v0:1531420618:" + body, hashlib.sha256).hexdigest()
    assert slack.sign(body, timestamp=1531420618) == {
        "X-Slack-Request-Timestamp": "1531420618",
        "X-Slack-Signature": f"v0={expected}",
    }
    assert not verifier.is_valid_request(body, slack.sign(body, timestamp=int(time.time()) - 600))  # stale


def test_payload_shapes(slack: SlackStandIn, client: WebClient) -> None:
    card = client.chat_postMessage(channel=CARE, text="card", blocks=CARD_BLOCKS)
    click = slack.button_click("claim", "conv-42", MARIA.id, "#care", card["ts"])
    assert set(click) >= {
        "type",
        "user",
        "api_app_id",
        "token",
        "container",
        "trigger_id",
        "team",
        "channel",
        "message",
        "response_url",
        "actions",
    }
    assert click["type"] == "block_actions"
    assert click["user"] == {
        "id": MARIA.id,
        "username": "maria.keller",
        "name": "maria.keller",
        "team_id": slack.team_id,
    }
    assert click["container"] == {
        "type": "message",
        "message_ts": card["ts"],
        "channel_id": CARE,
        "is_ephemeral": False,
    }
    assert click["channel"] == {"id": CARE, "name": "care"}
    assert click["message"]["blocks"] == card["message"]["blocks"]
    [action] = click["actions"]
    assert (action["action_id"], action["block_id"], action["value"], action["type"]) == (
        "claim",
        "card_actions",
        "conv-42",
        "button",
    )
    assert action["text"]["text"] == "Claim" and action["action_ts"]
    assert click["trigger_id"].count(".") == 2

    menus = client.chat_postMessage(
        channel=CARE,
        text="menus",
        blocks=[
            {
                "type": "section",
                "block_id": "snooze_block",
                "text": {"type": "mrkdwn", "text": "Snooze?"},
                "accessory": {
                    "type": "static_select",
                    "action_id": "snooze",
                    "placeholder": {"type": "plain_text", "text": "Snooze for"},
                    "options": [
                        {"text": {"type": "plain_text", "text": "30 minutes"}, "value": "30m"},
                        {"text": {"type": "plain_text", "text": "1 hour"}, "value": "1h"},
                    ],
                },
            },
            {
                "type": "actions",
                "block_id": "people",
                "elements": [{"type": "users_select", "action_id": "reassign"}],
            },
        ],
    )
    snooze = slack.menu_select("snooze", "1h", MARIA.id, CARE, menus["ts"])
    [chosen] = snooze["actions"]
    assert (chosen["type"], chosen["block_id"], chosen["selected_option"]) == (
        "static_select",
        "snooze_block",
        {"text": {"type": "plain_text", "text": "1 hour"}, "value": "1h"},
    )
    assert snooze["state"]["values"]["snooze_block"]["snooze"]["selected_option"]["value"] == "1h"
    reassign = slack.menu_select("reassign", SAM.id, MARIA.id, CARE, menus["ts"])["actions"][0]
    assert (reassign["type"], reassign["selected_user"], reassign["block_id"]) == (
        "users_select",
        SAM.id,
        "people",
    )
    elsewhere = slack.menu_select("close", "spam", MARIA.id, CARE, "1.1")["actions"][0]
    assert elsewhere["selected_option"]["value"] == "spam" and elsewhere["type"] == "static_select"

    trigger = slack.command_fields(user_id=MARIA.id)["trigger_id"]
    view = client.views_open(trigger_id=trigger, view=MODAL)["view"]
    submitted = slack.view_submission(MARIA.id, {"for": {"minutes": "30"}}, view_id=view["id"])
    assert submitted["type"] == "view_submission"
    assert submitted["view"]["id"] == view["id"]
    assert (submitted["view"]["callback_id"], submitted["view"]["private_metadata"]) == ("snooze", "conv-42")
    assert submitted["view"]["state"] == {
        "values": {"for": {"minutes": {"type": "plain_text_input", "value": "30"}}}
    }

    fields = slack.command_fields("/replyclock", "stats", user_id=SAM.id, channel="#billing")
    assert list(fields) == [
        "token",
        "team_id",
        "team_domain",
        "channel_id",
        "channel_name",
        "user_id",
        "user_name",
        "command",
        "text",
        "api_app_id",
        "is_enterprise_install",
        "response_url",
        "trigger_id",
    ]
    assert (fields["channel_id"], fields["channel_name"], fields["text"]) == (BILLING, "billing", "stats")
    assert slack.command_fields(user_id=SAM.id)["channel_name"] == "directmessage"


def test_response_url_replaces_posts_and_whispers(slack: SlackStandIn, client: WebClient) -> None:
    card = client.chat_postMessage(channel=CARE, text="card", blocks=CARD_BLOCKS)

    def post(url: str, body: dict[str, Any]) -> int:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.read() == b"ok"
            return int(response.status)

    click = slack.button_click("claim", "conv-42", MARIA.id, CARE, card["ts"])
    assert (
        post(click["response_url"], {"replace_original": True, "text": "Claimed by Maria", "blocks": []})
        == 200
    )
    replaced = slack.message(CARE, card["ts"])
    assert replaced is not None and replaced.text == "Claimed by Maria" and replaced.blocks == []
    post(click["response_url"], {"text": "just for you"})
    assert [e.text for e in slack.ephemerals(CARE, user=MARIA.id)] == ["just for you"]
    post(click["response_url"], {"response_type": "in_channel", "text": "for everyone"})
    assert slack.messages(CARE)[-1].text == "for everyone"
    post(click["response_url"], {"delete_original": True})
    assert slack.message(CARE, card["ts"]) is None
    assert len(slack.calls_to(RESPONSE_URL_METHOD)) == 4


# ------------------------------------------------------------------------------------------------
# A real slack_bolt App in HTTP mode


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def bolt_app(slack: SlackStandIn) -> Iterator[tuple[App, str, list[dict[str, Any]]]]:
    # bolt uses the client's token when a client is given (a token= beside it is ignored).
    app = App(
        signing_secret=DEFAULT_SIGNING_SECRET,
        client=WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url),
    )
    seen: list[dict[str, Any]] = []

    @app.action("claim")
    def claim(ack: Ack, body: dict[str, Any], client: WebClient) -> None:
        ack()
        seen.append(body)
        client.chat_update(
            channel=body["channel"]["id"],
            ts=body["message"]["ts"],
            text=f"Claimed by <@{body['user']['id']}>",
            blocks=[],
        )

    @app.command("/replyclock")
    def command(ack: Ack, body: dict[str, Any], respond: Respond, client: WebClient) -> None:
        ack()
        client.views_open(trigger_id=body["trigger_id"], view=MODAL)
        respond(f"Snoozing, <@{body['user_id']}>")

    @app.view("snooze")
    def snooze(ack: Ack, view: dict[str, Any]) -> None:
        minutes = view["state"]["values"]["for"]["minutes"]["value"]
        if not minutes.isdigit():
            ack(response_action="errors", errors={"for": "Minutes, please"})
            return
        ack()

    @app.event("message")
    def message(event: dict[str, Any]) -> None:
        seen.append(event)

    server: WSGIServer = make_server("127.0.0.1", 0, SlackRequestHandler(app), handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_port}/slack/events", seen
    finally:
        server.shutdown()
        server.server_close()


def test_bolt_app_button_click_updates_the_message(
    slack: SlackStandIn, bolt_app: tuple[App, str, list[dict[str, Any]]]
) -> None:
    app, url, seen = bolt_app
    assert slack.calls_to("auth.test")  # bolt checked its token against the stand-in
    card = app.client.chat_postMessage(channel="#care", text="New post", blocks=CARD_BLOCKS)

    status, body = slack.send_interaction(
        url, slack.button_click("claim", "conv-42", MARIA.id, CARE, card["ts"])
    )
    assert (status, body) == (200, "")
    slack.wait_for("chat.update")
    updated = slack.message(CARE, card["ts"])
    assert updated is not None and updated.text == f"Claimed by <@{MARIA.id}>" and updated.blocks == []
    assert seen[0]["actions"][0]["value"] == "conv-42"
    update_call = slack.calls_to("chat.update")[0]
    assert update_call.token == DEFAULT_TOKEN and update_call.ok

    forged = slack.button_click("claim", "conv-42", MARIA.id, CARE, card["ts"])
    standin_with_wrong_secret = SlackStandIn(signing_secret="not-the-apps-secret")
    assert standin_with_wrong_secret.send_interaction(url, forged).status == 401


def test_bolt_app_command_modal_and_event(
    slack: SlackStandIn, bolt_app: tuple[App, str, list[dict[str, Any]]]
) -> None:
    _, url, seen = bolt_app
    assert (
        slack.send_command(url, "/replyclock", "snooze 30", user_id=MARIA.id, channel="#care").status == 200
    )
    slack.wait_for(RESPONSE_URL_METHOD)
    slack.wait_for("views.open")
    assert [e.text for e in slack.ephemerals(CARE, user=MARIA.id)] == [f"Snoozing, <@{MARIA.id}>"]
    [view] = slack.views()
    assert view["callback_id"] == "snooze"

    rejected = slack.send_interaction(
        url, slack.view_submission(MARIA.id, {"for": {"minutes": "soon"}}, view_id=view["id"])
    )
    assert rejected.status == 200
    assert rejected.json() == {"response_action": "errors", "errors": {"for": "Minutes, please"}}
    accepted = slack.send_interaction(
        url, slack.view_submission(MARIA.id, {"for": {"minutes": "30"}}, view_id=view["id"])
    )
    assert (accepted.status, accepted.body) == (200, "")

    event = slack.post_as_user(CARE, SAM.id, "I can take the next one")
    assert slack.send_event(url, event).status == 200
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen and seen[0]["text"] == "I can take the next one" and seen[0]["channel"] == CARE
    assert slack.send_url_verification(url, challenge="abc").json() == {"challenge": "abc"}


# ------------------------------------------------------------------------------------------------
# The transcript `replyclock demo` prints


def test_transcript() -> None:
    start = datetime(2026, 11, 23, 8, 0, tzinfo=UTC).timestamp()
    with SlackStandIn(channels={CARE: "care"}, users=[MARIA, SAM], clock=lambda: start) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        card = client.chat_postMessage(channel="#care", text="fallback", blocks=CARD_BLOCKS)
        client.chat_postMessage(
            channel=CARE, thread_ts=card["ts"], text="Escalating to <@U0SAM0001> &amp; co"
        )
        client.chat_update(channel=CARE, ts=card["ts"], text="Claimed by <@U0MARIA01>", blocks=[])
        client.chat_postEphemeral(channel=CARE, user=SAM.id, text="Only Sam sees this")
        client.chat_postMessage(channel=MARIA.id, text="You have 1 overdue post")
        client.files_upload_v2(channel=CARE, content=b"12345", filename="chart.png", title="SLA chart")
        lines = slack.transcript()
        renamed = slack.transcript({MARIA.id: "Maria K. (Billing)"})

    assert lines == [
        "#care",
        "  [08:00:00] @replyclock (edited): Claimed by @Maria",
        "                                   mentions: @Maria (U0MARIA01)",
        "      [08:00:00] thread reply: @replyclock: Escalating to @Sam Okafor & co",
        "                                            mentions: @Sam Okafor (U0SAM0001)",
        "  [08:00:00] (only @Sam Okafor sees) @replyclock: Only Sam sees this",
        '  [08:00:00] @replyclock: [file: chart.png (5 bytes) "SLA chart"]',
        f"DM with @Maria ({slack.dm_channel(MARIA.id)})",
        "  [08:00:00] @replyclock: You have 1 overdue post",
    ]
    assert "Claimed by @Maria K. (Billing)" in renamed[1]


def test_transcript_shows_blocks_and_buttons_without_times(slack: SlackStandIn, client: WebClient) -> None:
    client.chat_postMessage(channel=CARE, text="fallback", blocks=CARD_BLOCKS)
    assert slack.transcript() == [
        "#care",
        "  @replyclock: New post from @jane for @Maria",
        "               [Claim] [Snooze]",
        "               mentions: @Maria (U0MARIA01)",
    ]


def test_conversations_history_and_replies_with_metadata(slack: SlackStandIn, client: WebClient) -> None:
    """What a sender reads to find a card it posted but could not record: top-level messages newest
    first (thread replies only in conversations.replies), metadata only with include_all_metadata."""
    card = {"event_type": "replyclock_card", "event_payload": {"conversation_id": 7}}
    first = client.chat_postMessage(channel=CARE, text="card 7", metadata=card)
    client.chat_postMessage(channel=CARE, text="a note", thread_ts=first["ts"])
    entry_meta = {"event_type": "replyclock_card", "event_payload": {"conversation_id": 8}}
    entry = client.chat_postMessage(channel=CARE, text="entry 8", thread_ts=first["ts"], metadata=entry_meta)
    last = client.chat_postMessage(channel=CARE, text="later")
    client.chat_postMessage(channel=BILLING, text="elsewhere")

    history = client.conversations_history(channel=CARE, include_all_metadata=True)
    assert [m["text"] for m in history["messages"]] == ["later", "card 7"]
    assert history["messages"][1]["metadata"] == card and "metadata" not in history["messages"][0]
    assert "metadata" not in client.conversations_history(channel=CARE)["messages"][1]
    assert client.conversations_history(channel=CARE, oldest=first["ts"])["messages"][0]["ts"] == last["ts"]
    assert len(client.conversations_history(channel=CARE, oldest=first["ts"])["messages"]) == 1
    paged = client.conversations_history(channel=CARE, limit=1)
    assert paged["has_more"] and [m["text"] for m in paged["messages"]] == ["later"]
    rest = client.conversations_history(
        channel=CARE, limit=1, cursor=paged["response_metadata"]["next_cursor"]
    )
    assert [m["text"] for m in rest["messages"]] == ["card 7"] and not rest["has_more"]

    replies = client.conversations_replies(channel=CARE, ts=first["ts"], include_all_metadata=True)
    assert [m["text"] for m in replies["messages"]] == ["card 7", "a note", "entry 8"]
    assert replies["messages"][2]["metadata"] == entry_meta and replies["messages"][2]["ts"] == entry["ts"]
    with pytest.raises(SlackApiError) as error:
        client.conversations_replies(channel=CARE, ts="1.000001")
    assert error.value.response["error"] == "thread_not_found"
    assert METHOD_TIERS["conversations.history"] == METHOD_TIERS["conversations.replies"] == 3
    with pytest.raises(SlackApiError) as error:
        client.conversations_history(channel="#care")  # ids only, as Slack
    assert error.value.response["error"] == "channel_not_found"
