"""Hostile input at both HTTP doors of `replyclock web`, over a real socket.

The real app (`bot.web.create_app` with a webhook account and bolt mounted at /slack/events by
`bot.slack.app.slack_routes`) runs on uvicorn on loopback (`bot.web.serve_in_thread`); the
Slack stand-in plays Slack (it signs what it sends, and takes the cards the outbox posts).

Two rules for everything here: every answer is 2xx or 4xx (never 5xx, never a dropped
connection where an answer was due), and a refused request leaves the database exactly as it
was (rows of posts, conversations, outbox, events and experts, and every conversation's state).

- the nasty corpus, for both doors: 10 MB bodies (declared, chunked, streamed in full), invalid
  UTF-8, JSON nested 100,000 deep, wrong types in Slack payloads, SQL and mrkdwn injection in
  every text field (tests/hostile/strings.json), forged, stale, replayed and misplaced
  signatures, header case variants;
- a property test of /slack/events (random form bodies and payload shapes, signed and not).

The webhook's own property test is in tests/test_webhook.py. The number of examples comes from
REPLYCLOCK_HYPOTHESIS_EXAMPLES (default 150).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from slack_bolt import App, BoltRequest, BoltResponse
from slack_bolt.listener.listener_completion_handler import ListenerCompletionHandler
from slack_sdk import WebClient
from sqlalchemy import func, inspect, select

from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.demo.standin import AppResponse, SlackStandIn, SlackUser
from bot.flow.context import AppContext
from bot.flow.delivery import customer_handlers
from bot.flow.ingest import ingest_batch
from bot.flow.outbox import OutboxSender
from bot.slack.app import EVENTS_PATH, MAX_BODY_BYTES, create_bolt_app, slack_routes
from bot.slack.delivery import slack_handlers
from bot.slack.ids import (
    ACTION_ANSWERED,
    ACTION_CLAIM,
    ACTION_CLOSE,
    ACTION_REASSIGN,
    ACTION_REPLY,
    ACTION_SNOOZE,
    ACTION_UNCLAIM,
    CLOSE_REASONS,
    REPLY_BLOCK,
    REPLY_INPUT,
    SNOOZE_CHOICES,
    VIEW_REPLY,
)
from bot.web import MAX_BODY_BYTES as HOOK_MAX_BODY_BYTES
from bot.web import create_app, serve_in_thread
from connectors.base import Connector, InboundPost
from connectors.demo import DemoConnector
from connectors.webhook import SIGNATURE_HEADER, WebhookConnector, sign
from storage.models import Conversation, Event, Outbox, Post
from storage.models import Expert as ExpertRow
from tests.conftest import POLICY_TOML

EXAMPLES = int(os.environ.get("REPLYCLOCK_HYPOTHESIS_EXAMPLES", "150"))
HOSTILE = Path(__file__).parent / "hostile"
NASTY: dict[str, str] = json.loads((HOSTILE / "strings.json").read_text(encoding="utf-8"))

SHOP_SECRET = "hostile-shop-secret-0123456789-0123456789"
SHOP_ACCOUNT = '\n[accounts.shop]\nkind = "webhook"\ncan_reply = false\nlegacy_signature = true\n'
CARE, BILLING = "C0CARE0001", "C0BILL0001"
MARIA, LEE, SAM, NINA, STRANGER = "U0MARIA01", "U0LEE0001", "U0SAM0001", "U0NINA001", "U0STRANGE1"
STAFF = (MARIA, LEE, SAM, NINA)
USERS = [
    SlackUser(MARIA, "Maria Keller", tz="Europe/Berlin"),
    SlackUser(LEE, "Lee Wong", tz="Europe/Berlin"),
    SlackUser(SAM, "Sam Okafor", tz="Europe/London"),
    SlackUser(NINA, "Nina Park", tz="America/New_York"),
    SlackUser(STRANGER, "Stan Ger", tz="UTC"),
]
TEN_MB = 10 * 1024 * 1024
ACTIONS = (
    ACTION_CLAIM,
    ACTION_UNCLAIM,
    ACTION_REASSIGN,
    ACTION_REPLY,
    ACTION_SNOOZE,
    ACTION_ANSWERED,
    ACTION_CLOSE,
)
MRKDWN_CONTROLS = (
    "<!channel",
    "<!here",
    "<!everyone",
    "<!subteam",
    "<!date^1392734382",
    "<https://evil",
    "|lee>",
)

State = tuple[Any, ...]


# --------------------------------------------------------------------------------------------
# The harness


class Listeners:
    """Counts bolt listener runs started and finished, so a test can wait for the ones still
    running after bolt answered (it answers as soon as the listener acks)."""

    def __init__(self, app: App) -> None:
        self._lock = threading.Lock()
        self.started = 0
        self.finished = 0
        runner = app.listener_runner
        original_run = runner.run
        inner = runner.listener_completion_handler
        listeners = self

        def run(**kwargs: Any) -> BoltResponse | None:
            with listeners._lock:
                listeners.started += 1
            return original_run(**kwargs)

        class Finished(ListenerCompletionHandler):
            def handle(self, request: BoltRequest, response: BoltResponse | None) -> None:
                try:
                    inner.handle(request=request, response=response)
                finally:
                    with listeners._lock:
                        listeners.finished += 1

        runner.run = run  # type: ignore[method-assign, assignment]
        runner.listener_completion_handler = Finished()

    def settle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.finished >= self.started:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"listeners still running: {self.started - self.finished}")
            time.sleep(0.002)


@dataclass
class Door:
    """The running web app and what a test needs to knock on it."""

    ctx: AppContext
    clock: FakeClock
    slack: SlackStandIn
    client: WebClient
    base: str
    listeners: Listeners
    social: DemoConnector
    hook: WebhookConnector
    http: httpx.Client
    statuses: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Door({self.base})"

    @property
    def slack_url(self) -> str:
        return self.base + EVENTS_PATH

    @property
    def hook_url(self) -> str:
        return self.base + "/hooks/shop"

    # -- the database ---------------------------------------------------------------------

    def state(self) -> State:
        """Everything a request could change: row counts and each conversation's state."""
        with self.ctx.sessions() as session:
            counts = tuple(
                session.scalar(select(func.count()).select_from(model)) or 0
                for model in (Post, Conversation, Outbox, Event, ExpertRow)
            )
            rows = tuple(
                (c.id, c.status, c.owner, c.claimed_by, c.next_action_at, c.version, c.close_reason)
                for c in session.scalars(select(Conversation).order_by(Conversation.id))
            )
            experts = tuple(
                (e.id, e.away_until) for e in session.scalars(select(ExpertRow).order_by(ExpertRow.id))
            )
        return counts, rows, experts

    def tables(self) -> list[str]:
        return sorted(inspect(self.ctx.engine).get_table_names())

    def conversation(self, conversation_id: int) -> Conversation:
        with self.ctx.sessions() as session:
            found = session.get(Conversation, conversation_id)
            assert found is not None
            return found

    # -- customers ------------------------------------------------------------------------

    def deliver(self, data: Mapping[str, Any]) -> httpx.Response:
        """A signed webhook delivery to the shop account."""
        body = json.dumps(data).encode()
        headers = {SIGNATURE_HEADER: sign(SHOP_SECRET, body), "Content-Type": "application/json"}
        return self.http.post(self.hook_url, content=body, headers=headers)

    def seed(
        self, external_id: str, text: str = "I was charged twice on my invoice", author: str = "ana"
    ) -> int:
        """A customer post on the demo "social" account (which takes replies), its card posted."""
        post = InboundPost(
            external_id=external_id,
            author_id=f"id-{author}",
            author_handle=author,
            author_name=author.title(),
            text=text,
            posted_at=self.clock.now(),
        )
        with self.ctx.sessions() as session, session.begin():
            result = ingest_batch(session, self.ctx, account="social", posts=[post], is_own=lambda _p: False)
        self.send_outbox()
        return result.opened[0]

    def send_outbox(self) -> None:
        connectors: dict[str, Connector] = {"social": self.social, "shop": self.hook}
        handlers = {**slack_handlers(self.ctx, self.client), **customer_handlers(self.ctx, connectors)}
        OutboxSender(self.ctx, handlers).send_due()

    # -- Slack ----------------------------------------------------------------------------

    def post(self, body: bytes, headers: Mapping[str, str], path: str = EVENTS_PATH) -> int:
        """POST raw bytes with exactly these headers; waits for bolt's listeners to finish."""
        status = self.http.post(self.base + path, content=body, headers=dict(headers)).status_code
        self.listeners.settle()
        self.statuses.append(status)
        return status

    def signed(self, body: bytes, content_type: str = "application/x-www-form-urlencoded") -> dict[str, str]:
        return {"Content-Type": content_type, **self.slack.sign(body)}

    def interact(self, payload: Mapping[str, Any]) -> AppResponse:
        answer = self.slack.send_interaction(self.slack_url, dict(payload), timeout=10)
        self.listeners.settle()
        self.statuses.append(answer.status)
        return answer

    def click(self, action_id: str, conversation_id: int, user_id: str, value: str | None = None) -> int:
        card = self.conversation(conversation_id)
        assert card.slack_channel and card.slack_ts
        if value is None:
            payload = self.slack.button_click(
                action_id, str(conversation_id), user_id, card.slack_channel, card.slack_ts
            )
        else:
            payload = self.slack.menu_select(action_id, value, user_id, card.slack_channel, card.slack_ts)
        return self.interact(payload).status

    def command(self, text: str, user_id: str = MARIA) -> str:
        answer = self.slack.send_command(self.slack_url, "/replyclock", text, user_id=user_id, timeout=10)
        self.listeners.settle()
        self.statuses.append(answer.status)
        assert answer.status == 200, answer
        body = answer.json()
        assert body["response_type"] == "ephemeral"
        return str(body["text"])

    def submit_reply(self, user_id: str, conversation_id: int, text: str) -> AppResponse:
        payload = self.slack.view_submission(
            user_id,
            {REPLY_BLOCK: {REPLY_INPUT: text}},
            callback_id=VIEW_REPLY,
            private_metadata=str(conversation_id),
        )
        return self.interact(payload)

    def open_home(self, user_id: str) -> dict[str, Any]:
        before = len(self.slack.calls_to("views.publish"))
        answer = self.slack.send_event(
            self.slack_url, {"type": "app_home_opened", "user": user_id, "tab": "home"}, timeout=10
        )
        self.listeners.settle()
        self.statuses.append(answer.status)
        assert answer.status == 200
        self.slack.wait_for("views.publish", count=before + 1)
        view = self.slack.home_view(user_id)
        assert view is not None
        return view


def hostile_policy() -> Policy:
    text = POLICY_TOML + SHOP_ACCOUNT
    return parse_policy(tomllib.loads(text), source="tests/data/policy.toml+shop", text=text)


@pytest.fixture
def policy() -> Policy:
    return hostile_policy()


def open_door(ctx: AppContext, clock: FakeClock) -> Iterator[Door]:
    """The web app with its webhook account and Slack's endpoint, on a real socket."""
    hook = WebhookConnector(
        "shop", settings={"legacy_signature": True}, environ={"WEBHOOK_SECRET_SHOP": SHOP_SECRET}
    )
    social = DemoConnector("social", clock=clock)
    with SlackStandIn(channels={CARE: "care", BILLING: "billing"}, users=USERS) as slack:
        client = WebClient(token="xoxb-replyclock-standin", base_url=slack.base_url)
        bolt = create_bolt_app(
            ctx, token="xoxb-replyclock-standin", signing_secret=slack.signing_secret, client=client
        )
        listeners = Listeners(bolt)
        app = create_app(ctx, {"shop": hook, "social": social}, extra_routes=slack_routes(bolt))
        with serve_in_thread(app) as base, httpx.Client(timeout=10) as http:
            yield Door(ctx, clock, slack, client, base, listeners, social, hook, http)
    assert not slack.internal_errors


@pytest.fixture
def door(ctx: AppContext, clock: FakeClock) -> Iterator[Door]:
    yield from open_door(ctx, clock)


def delivery(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "order-1",
        "author": {"id": "cust-1", "name": "Ana Lima", "handle": "ana"},
        "text": "Where is my order?",
        "created_at": "2026-11-23T07:30:00Z",
    }
    data.update(fields)
    return data


def form(payload: Any) -> bytes:
    """A Slack interaction body: ``payload=<json>`` form-encoded (a str is sent as it is)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return urllib.parse.urlencode({"payload": text}).encode()


def assert_never_5xx(statuses: Sequence[int]) -> None:
    assert all(200 <= status < 500 for status in statuses), statuses


def _address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _status_of(answer: bytes) -> int | None:
    """The status code of an HTTP/1.1 answer's first line, None when nothing was answered."""
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer.split(b" ", 2)[1])


def raw_request(base: str, head: bytes, body: bytes = b"") -> int | None:
    """Send a request head (and maybe part of a body) over a fresh socket; read the answer's
    status line without sending anything more."""
    with socket.create_connection(_address(base), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n" not in answer:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    return _status_of(answer)


_SIGNATURE_NAMES = ("x-replyclock-signature", "x-slack-signature", "webhook-")


def head_of(path: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """A request head; without signature headers of its own it carries plausible (wrong) ones, so
    that it passes the header checks made before the body is read (issue 11) and meets the body's."""
    if not any(name.lower().startswith(_SIGNATURE_NAMES) for name, _ in headers):
        plausible = [
            (SIGNATURE_HEADER, "sha256=" + "0" * 64),
            ("X-Slack-Signature", "v0=" + "0" * 64),
            ("X-Slack-Request-Timestamp", str(int(time.time()))),
        ]
        headers = [*headers, *plausible]
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Streamed:
    status: int | None  # None: the server closed the connection before its answer could be read
    sent: int  # body bytes the client got out before the answer (or the close)


def stream_body(base: str, path: str, headers: Sequence[tuple[str, str]], size: int) -> Streamed:
    """POST a chunked body of `size` bytes as fast as the server takes it, reading its answer
    on the way: the answer may come (and should, for a body over the limit) long before the end."""
    sock = socket.create_connection(_address(base), timeout=10)
    sent = [0]
    piece = b"x" * 65536
    framed = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    def pump() -> None:
        try:
            sock.sendall(head_of(path, [*headers, ("Transfer-Encoding", "chunked")]))
            while sent[0] < size:
                sock.sendall(framed)
                sent[0] += len(piece)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading and closed: expected once it has answered

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    answer = b""
    try:
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    finally:
        sent_at_answer = sent[0]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.join(timeout=10)
    return Streamed(_status_of(answer), sent_at_answer)


# --------------------------------------------------------------------------------------------
# 10 MB bodies

DOORS = pytest.mark.parametrize(
    ("path", "limit"),
    [("/hooks/shop", HOOK_MAX_BODY_BYTES), (EVENTS_PATH, MAX_BODY_BYTES)],
    ids=["webhook", "slack"],
)


@DOORS
def test_ten_megabytes_declared_are_refused_before_a_byte_of_body_is_read(
    door: Door, path: str, limit: int
) -> None:
    before = door.state()
    head = head_of(path, [("Content-Type", "application/json"), ("Content-Length", str(TEN_MB))])
    assert raw_request(door.base, head) == 413  # answered with no body sent at all
    assert door.state() == before


@DOORS
def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(door: Door, path: str, limit: int) -> None:
    before = door.state()
    head = head_of(path, [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")])
    part = limit + 1
    # One byte over the limit, and the body never ends: the answer must not wait for the rest.
    assert raw_request(door.base, head, f"{part:x}\r\n".encode() + b"x" * part + b"\r\n") == 413
    assert door.state() == before


@DOORS
def test_ten_megabytes_streamed_in_full_get_413_not_5xx(door: Door, path: str, limit: int) -> None:
    before = door.state()
    body = b"payload=" if path == EVENTS_PATH else b""
    signed = door.slack.sign(body) if path == EVENTS_PATH else {SIGNATURE_HEADER: sign(SHOP_SECRET, body)}
    result = stream_body(door.base, path, [("Content-Type", "application/json"), *signed.items()], TEN_MB)
    # 413, or (rarely, when the server's close overtakes its answer on the wire) a reset:
    # never a 5xx, never the whole body taken in.
    assert result.status in (413, None), result
    print(f"10 MB streamed to {path}: {result}")
    assert door.state() == before
    assert door.http.get(door.base + "/healthz").status_code == 200  # and the server still serves
    assert door.deliver(delivery()).status_code == 202


# --------------------------------------------------------------------------------------------
# Bodies that do not parse


UNPARSEABLE = {
    "invalid UTF-8": b'{"id": "\xff\xfe", "text": "\xc3\x28"}',
    "invalid UTF-8 form": b"payload=%7B%22type%22%3A%22block_actions%22%7D\xff\xfe",
    "invalid UTF-8 in payload": b"payload=%FF%FE%7B%7D",
    "lone surrogate": b'{"id": "\\ud800", "type": "event_callback"}',
    "not JSON": b"{this is not json",
    "payload not JSON": b"payload=%7Bnope",
    "JSON array": b"[1, 2, 3]",
    "JSON string": b'"block_actions"',
    "NaN": b'{"type": NaN}',
    "NUL bytes": b"\x00" * 64,
    "empty": b"",
    "nested 30,000 deep": b"[" * 30_000 + b"]" * 30_000,  # inside the webhook's 64 KiB
    "nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "objects nested 100,000 deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "payload nested 100,000 deep": form("[" * 100_000 + "]" * 100_000),
    "unclosed 100,000 deep": b'{"type": "event_callback", "event": ' + b"[" * 100_000,
}


def test_bodies_that_do_not_parse_are_4xx_at_both_doors(door: Door) -> None:
    before = door.state()
    for name, body in UNPARSEABLE.items():
        for signed in (True, False):
            for content_type in ("application/json", "application/x-www-form-urlencoded"):
                slack_headers = door.signed(body, content_type) if signed else {"Content-Type": content_type}
                hook_headers = {"Content-Type": content_type}
                if signed:
                    hook_headers[SIGNATURE_HEADER] = sign(SHOP_SECRET, body)
                statuses = [door.post(body, slack_headers)]
                if len(body) <= HOOK_MAX_BODY_BYTES:  # larger ones: the 413 tests above
                    statuses.append(door.post(body, hook_headers, "/hooks/shop"))
                for status in statuses:
                    # Signed: refused as a bad body (bolt parses the lone surrogate, then finds no
                    # listener: 404); unsigned: refused before anything parses it.
                    expected = (400 <= status < 500) if signed else status in (401, 413)
                    assert expected, (name, signed, content_type, status)
    assert door.state() == before
    small = sum(len(body) <= HOOK_MAX_BODY_BYTES for body in UNPARSEABLE.values())
    assert len(door.statuses) == (len(UNPARSEABLE) + small) * 4


# --------------------------------------------------------------------------------------------
# Slack payloads of the wrong shape, correctly signed (so they get past verification)


def _claim_payload(door: Door, conversation_id: int, user_id: str = MARIA) -> dict[str, Any]:
    card = door.conversation(conversation_id)
    assert card.slack_channel and card.slack_ts
    return door.slack.button_click(
        ACTION_CLAIM, str(conversation_id), user_id, card.slack_channel, card.slack_ts
    )


def _reply_view(door: Door, conversation_id: int) -> dict[str, Any]:
    return door.slack.view_submission(
        MARIA,
        {REPLY_BLOCK: {REPLY_INPUT: "hello"}},
        callback_id=VIEW_REPLY,
        private_metadata=str(conversation_id),
    )


def _changed(payload: dict[str, Any], path: Sequence[str | int], value: Any) -> dict[str, Any]:
    """A deep copy of `payload` with the value at `path` replaced (... removes it)."""
    copied: dict[str, Any] = json.loads(json.dumps(payload))
    target: Any = copied
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copied


REFUSED, CLAIMS = "refused", "claims"
# (what is wrong, where, the value, what it must do) applied to a real click on Claim by Maria.
# CLAIMS: the click still says who and which conversation (bolt takes a bare user id string;
# a menu's conversation is in its block_id, so a useless value falls back to it): it may claim.
CLICK_DAMAGE: list[tuple[str, Sequence[str | int], Any, str]] = [
    ("actions a string", ["actions"], "claim", REFUSED),
    ("actions an object", ["actions"], {"action_id": "claim"}, REFUSED),
    ("actions empty", ["actions"], [], REFUSED),
    ("actions of strings", ["actions"], ["claim"], REFUSED),
    ("action_id a number", ["actions", 0, "action_id"], 7, REFUSED),
    ("action_id missing", ["actions", 0, "action_id"], ..., REFUSED),
    ("action_id unknown", ["actions", 0, "action_id"], "claim_all", REFUSED),
    ("block_id a number", ["actions", 0, "block_id"], 12, REFUSED),
    ("user missing", ["user"], ..., REFUSED),
    ("user a number", ["user"], 5, REFUSED),
    ("user a list", ["user"], [MARIA], REFUSED),
    ("user.id a dict", ["user", "id"], {"id": MARIA}, REFUSED),
    ("user.id null", ["user", "id"], None, REFUSED),
    ("user.id of a stranger", ["user", "id"], STRANGER, REFUSED),
    ("team a list", ["team"], ["T0"], REFUSED),
    ("channel a number", ["channel"], 3, REFUSED),
    ("container a string", ["container"], "message", REFUSED),
    ("message a list", ["message"], [], REFUSED),
    ("type a number", ["type"], 1, REFUSED),
    ("type unknown", ["type"], "dialog_submission", REFUSED),
    ("trigger_id a dict", ["trigger_id"], {}, REFUSED),
    ("authorizations a string", ["authorizations"], "all", REFUSED),
    ("user a bare id string", ["user"], MARIA, CLAIMS),
    ("value a dict", ["actions", 0, "value"], {"conversation": 1}, CLAIMS),
    ("value a list", ["actions", 0, "value"], [1], CLAIMS),
    ("value with 400 digits", ["actions", 0, "value"], "9" * 400, CLAIMS),
    ("value a superscript digit", ["actions", 0, "value"], "\u00b2", CLAIMS),
    ("value negative", ["actions", 0, "value"], "-1", CLAIMS),
    ("value SQL", ["actions", 0, "value"], "1 OR 1=1", CLAIMS),
    ("message.ts a dict", ["message", "ts"], {"ts": 1}, CLAIMS),
    ("response_url not a URL", ["response_url"], "not a url", CLAIMS),
    ("state a list", ["state"], [], CLAIMS),  # nothing reads the top-level state of a click
]
VIEW_DAMAGE: list[tuple[str, Sequence[str | int], Any]] = [
    ("view a string", ["view"], "reply_modal"),
    ("view null", ["view"], None),
    ("view.callback_id a number", ["view", "callback_id"], 3),
    ("view.callback_id missing", ["view", "callback_id"], ...),
    ("view.type missing", ["view", "type"], ...),
    ("private_metadata a dict", ["view", "private_metadata"], {"conversation_id": 1}),
    ("private_metadata JSON of a list", ["view", "private_metadata"], "[1]"),
    ("private_metadata JSON with a dict id", ["view", "private_metadata"], '{"conversation_id": {"a": 1}}'),
    ("private_metadata with 5,000 digits", ["view", "private_metadata"], "9" * 5000),
    ("private_metadata a superscript digit", ["view", "private_metadata"], "\u00b2"),
    ("private_metadata nested 100,000 deep", ["view", "private_metadata"], "[" * 100_000),
    ("private_metadata of no conversation", ["view", "private_metadata"], "999999"),
    ("state a string", ["view", "state"], "x"),
    ("state.values a list", ["view", "state", "values"], []),
    ("reply block a string", ["view", "state", "values", REPLY_BLOCK], "hi"),
    ("reply input a string", ["view", "state", "values", REPLY_BLOCK, REPLY_INPUT], "hi"),
    ("reply value a dict", ["view", "state", "values", REPLY_BLOCK, REPLY_INPUT, "value"], {"text": "hi"}),
    ("reply value a number", ["view", "state", "values", REPLY_BLOCK, REPLY_INPUT, "value"], 42),
    ("user missing", ["user"], ...),
    ("user a number", ["user"], 7),
    ("response_urls a string", ["response_urls"], "http://127.0.0.1:9/"),
]
EVENT_BODIES: dict[str, Any] = {
    "event a string": {"type": "event_callback", "event": "app_home_opened"},
    "event without a type": {"type": "event_callback", "event": {"user": MARIA}},
    "event type a number": {"type": "event_callback", "event": {"type": 5}},
    "event user a dict": {"type": "event_callback", "event": {"type": "app_home_opened", "user": {"x": 1}}},
    "event user a number": {"type": "event_callback", "event": {"type": "app_home_opened", "user": 1}},
    "event tab a list": {
        "type": "event_callback",
        "event": {"type": "app_home_opened", "user": MARIA, "tab": []},
    },
    "event channel a list": {"type": "event_callback", "event": {"type": "app_home_opened", "channel": [1]}},
    "authorizations a string": {"type": "event_callback", "authorizations": "x", "event": {"type": "x"}},
    "authorizations of numbers": {"type": "event_callback", "authorizations": [1], "event": {"type": "x"}},
    "shared channel, event a list": {"type": "event_callback", "is_ext_shared_channel": True, "event": []},
    "url_verification without challenge": {"type": "url_verification"},
    "url_verification challenge a dict": {"type": "url_verification", "challenge": {"a": 1}},
    "type a list": {"type": ["event_callback"]},
    "command a dict": {"command": {"name": "/replyclock"}, "user_id": MARIA, "text": "mine"},
    "command text a list": {"command": "/replyclock", "user_id": MARIA, "text": ["queue"]},
    "command user_id a dict": {"command": "/replyclock", "user_id": {"id": MARIA}, "text": "back"},
    "command from a stranger": {
        "command": "/replyclock",
        "user_id": STRANGER,
        "text": "away until 2026-12-01",
    },
    "enterprise a number": {"type": "event_callback", "enterprise": 1, "event": {"type": "x"}},
}


def test_slack_clicks_of_the_wrong_shape_are_4xx_or_harmless(door: Door) -> None:
    answers: dict[str, int] = {}
    conversation_id = door.seed("click-refused", author="refused")
    for index, (name, path, value, outcome) in enumerate(CLICK_DAMAGE):
        if outcome == CLAIMS:  # a conversation of its own, unclaimed
            conversation_id = door.seed(f"click-{index}", author=f"author{index}")
        before = door.state()
        answers[name] = door.interact(_changed(_claim_payload(door, conversation_id), path, value)).status
        if outcome == REFUSED or door.conversation(conversation_id).claimed_by is None:
            assert door.state() == before, name
        else:
            assert door.conversation(conversation_id).claimed_by == "maria", name
    assert {name: status for name, status in answers.items() if not 200 <= status < 500} == {}
    claimed = [name for name, *_rest, outcome in CLICK_DAMAGE if outcome == CLAIMS]
    assert len(claimed) == 10


def test_slack_submissions_and_events_of_the_wrong_shape_are_4xx_and_change_nothing(door: Door) -> None:
    conversation_id = door.seed("1")
    view = _reply_view(door, conversation_id)
    before = door.state()
    answers: dict[str, int] = {}
    for name, path, value in VIEW_DAMAGE:
        answers[f"view: {name}"] = door.interact(_changed(view, path, value)).status
    for name, body in EVENT_BODIES.items():
        raw = json.dumps(body).encode()
        answers[f"json: {name}"] = door.post(raw, door.signed(raw, "application/json"))
    assert {name: status for name, status in answers.items() if not 200 <= status < 500} == {}
    assert door.state() == before
    # The well-formed submission still works afterwards.
    assert door.interact(view).status == 200
    assert door.conversation(conversation_id).status == "answered"


# --------------------------------------------------------------------------------------------
# Signatures


def test_slack_signatures_forged_stale_replayed_or_misplaced_are_refused(door: Door) -> None:
    conversation_id = door.seed("1")
    body = form(_claim_payload(door, conversation_id))
    other = form(_claim_payload(door, conversation_id, user_id=LEE))
    now = int(time.time())
    good = door.slack.sign(body, timestamp=now)
    forged: dict[str, list[tuple[str, str]]] = {
        "no signature headers": [],
        "signature only": [("X-Slack-Signature", good["X-Slack-Signature"])],
        "timestamp only": [("X-Slack-Request-Timestamp", str(now))],
        "all zeros": [("X-Slack-Request-Timestamp", str(now)), ("X-Slack-Signature", "v0=" + "0" * 64)],
        "v1 scheme": [
            ("X-Slack-Request-Timestamp", str(now)),
            ("X-Slack-Signature", good["X-Slack-Signature"].replace("v0=", "v1=")),
        ],
        "upper-case hex": [
            ("X-Slack-Request-Timestamp", str(now)),
            ("X-Slack-Signature", "v0=" + good["X-Slack-Signature"][3:].upper()),
        ],
        "truncated": [
            ("X-Slack-Request-Timestamp", str(now)),
            ("X-Slack-Signature", good["X-Slack-Signature"][:-2]),
        ],
        "non-ASCII signature": [
            ("X-Slack-Request-Timestamp", str(now)),
            ("X-Slack-Signature", "v0=\xff" * 20),
        ],
        "timestamp not a number": [
            ("X-Slack-Request-Timestamp", "soon"),
            ("X-Slack-Signature", good["X-Slack-Signature"]),
        ],
        "timestamp with a fraction": [
            ("X-Slack-Request-Timestamp", f"{now}.5"),
            ("X-Slack-Signature", good["X-Slack-Signature"]),
        ],
        "timestamp huge": [("X-Slack-Request-Timestamp", "9" * 400), ("X-Slack-Signature", "v0=" + "0" * 64)],
        "other secret": [
            ("X-Slack-Request-Timestamp", str(now)),
            (
                "X-Slack-Signature",
                SlackStandIn(signing_secret="not-the-secret").sign(body, now)["X-Slack-Signature"],
            ),
        ],
        "signature of another body": [*door.slack.sign(other, timestamp=now).items()],
        "signed with another timestamp": [
            ("X-Slack-Request-Timestamp", str(now - 1)),
            ("X-Slack-Signature", good["X-Slack-Signature"]),
        ],
        "stale (6 min old)": [*door.slack.sign(body, timestamp=now - 6 * 60).items()],
        "from the future (6 min ahead)": [*door.slack.sign(body, timestamp=now + 6 * 60).items()],
        "forged, then the real one": [
            ("X-Slack-Request-Timestamp", str(now)),
            ("X-Slack-Signature", "v0=" + "1" * 64),
            ("X-Slack-Signature", good["X-Slack-Signature"]),
        ],
        "the real one, then forged": [
            ("X-Slack-Request-Timestamp", str(now)),
            ("X-Slack-Signature", good["X-Slack-Signature"]),
            ("X-Slack-Signature", "v0=" + "1" * 64),
        ],
    }
    before = door.state()
    content = [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(body)))]
    refused = {
        name: raw_request(door.base, head_of(EVENTS_PATH, [*content, *headers]), body)
        for name, headers in forged.items()
    }
    assert refused == dict.fromkeys(forged, 401)
    assert door.state() == before

    # Header names in any case are the same header: the real signature, spelled three ways.
    spellings: list[Callable[[str], str]] = [str.lower, str.upper, lambda name: name.title().swapcase()]
    for index, spell in enumerate(spellings):
        fresh = door.slack.sign(body, timestamp=now + index)
        headers = [(spell(name), value) for name, value in [*content, *fresh.items()]]
        assert raw_request(door.base, head_of(EVENTS_PATH, headers), body) == 200
        door.listeners.settle()
        if index == 0:
            assert door.conversation(conversation_id).claimed_by == "maria"
    # A replay of a delivered request, byte for byte, changes nothing.
    after_claim = door.state()
    replay = [*content, *door.slack.sign(body, timestamp=now).items()]
    assert raw_request(door.base, head_of(EVENTS_PATH, replay), body) == 401
    assert door.state() == after_claim


def test_webhook_signatures_forged_misplaced_or_replayed(door: Door) -> None:
    body = json.dumps(delivery()).encode()
    other = json.dumps(delivery(id="order-2")).encode()
    good = sign(SHOP_SECRET, body)
    forged: dict[str, list[tuple[str, str]]] = {
        "none": [],
        "empty": [(SIGNATURE_HEADER, "")],
        "bare hex": [(SIGNATURE_HEADER, good.removeprefix("sha256="))],
        "sha1 scheme": [(SIGNATURE_HEADER, good.replace("sha256=", "sha1="))],
        "upper-case scheme": [(SIGNATURE_HEADER, good.replace("sha256=", "SHA256="))],
        "all zeros": [(SIGNATURE_HEADER, "sha256=" + "0" * 64)],
        "truncated": [(SIGNATURE_HEADER, good[:-1])],
        "non-ASCII": [(SIGNATURE_HEADER, "sha256=" + "\xe9" * 64)],
        "other secret": [(SIGNATURE_HEADER, sign("not-the-secret", body))],
        "signature of another body": [(SIGNATURE_HEADER, sign(SHOP_SECRET, other))],
        "Slack's header instead": [("X-Slack-Signature", good)],
        "forged, then the real one": [(SIGNATURE_HEADER, "sha256=" + "1" * 64), (SIGNATURE_HEADER, good)],
    }
    before = door.state()
    content = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    refused = {
        name: raw_request(door.base, head_of("/hooks/shop", [*content, *headers]), body)
        for name, headers in forged.items()
    }
    assert refused == dict.fromkeys(forged, 401)
    assert door.state() == before
    # Any spelling of the header name, and upper-case hex, is the same valid signature.
    spellings = [
        SIGNATURE_HEADER.lower(),
        SIGNATURE_HEADER.upper(),
        SIGNATURE_HEADER.swapcase(),
    ]
    statuses = [
        raw_request(door.base, head_of("/hooks/shop", [*content, (name, good)]), body) for name in spellings
    ]
    upper_hex = "sha256=" + good.removeprefix("sha256=").upper()
    statuses.append(
        raw_request(door.base, head_of("/hooks/shop", [*content, (SIGNATURE_HEADER, upper_hex)]), body)
    )
    assert statuses == [202, 202, 202, 202]
    # The webhook scheme has no timestamp: a replay is the same delivery, stored once (dedupe
    # on the account + id), so replaying it changes nothing.
    counts = door.state()[0]
    assert counts[0] == before[0][0] + 1 and counts[1] == before[0][1] + 1


# --------------------------------------------------------------------------------------------
# SQL and mrkdwn injection in every text field


def assert_inert(shown: str) -> None:
    """No live mrkdwn control from the corpus in what Slack was given (shows where, if any)."""
    for control in MRKDWN_CONTROLS:
        at = shown.find(control)
        assert at < 0, shown[max(0, at - 300) : at + 100]


def _slack_output(door: Door) -> str:
    """Everything replyclock showed in Slack: messages, ephemerals, views (JSON, as sent)."""
    shown: list[Any] = [(m.text, m.blocks, m.previous_texts) for m in door.slack.messages()]
    shown += [(e.text, e.blocks) for e in door.slack.ephemerals()]
    shown += [
        call.params for call in door.slack.calls_to("views.publish") + door.slack.calls_to("views.open")
    ]
    return json.dumps(shown, ensure_ascii=False)


def test_injection_in_every_webhook_field_is_stored_verbatim_and_shown_inert(door: Door) -> None:
    tables = door.tables()
    expected: dict[str, tuple[str, str, str, str]] = {}
    for index, nasty in enumerate(NASTY.values()):
        short = nasty[:150]
        external_id = f"{index}:{short}"
        data = delivery(
            id=external_id,
            author={"id": f"{index}:{short}", "name": nasty[:200], "handle": short},
            text=nasty,
            url="https://shop.example/t/" + urllib.parse.quote(short, safe=""),
            thread_id=f"thread-{index}:{short}",
            reply_to_id=f"reply-{index}:{short}",
            language="en",
        )
        answer = door.deliver(data)
        assert answer.status_code == 202, (nasty, answer.text)
        expected[external_id] = (nasty, nasty[:200], short, f"thread-{index}:{short}")
        door.send_outbox()  # one card at a time (many at once would be summed up as a storm)
    with door.ctx.sessions() as session:
        stored = {
            post.external_id: (post.text, post.author_name, post.author_handle, post.thread_key)
            for post in session.scalars(select(Post))
        }
    assert stored == expected  # byte for byte: bound parameters, never SQL text
    assert door.tables() == tables
    assert door.state()[0][:2] == (len(NASTY), len(NASTY))  # every table still answers

    # Cards, the owner's /replyclock answers and App Home: the controls are escaped, not live.
    with door.ctx.sessions() as session:
        owners = {c.owner for c in session.scalars(select(Conversation))}
    slack_id = {"maria": MARIA, "lee": LEE, "sam": SAM, "nina": NINA}
    for owner in sorted(o for o in owners if o):
        answers = [door.command("mine", slack_id[owner]), door.command("queue", slack_id[owner])]
        door.open_home(slack_id[owner])
        for text in answers:
            assert not any(control in text for control in MRKDWN_CONTROLS), text
    shown = _slack_output(door)
    assert_inert(shown)
    assert "&lt;!channel&gt;'); DROP TABLE posts;--" in shown
    # The only member a card may mention is the conversation's owner (the corpus names Maria
    # and Lee in <@...> sequences: escaped, they mention nobody).
    with door.ctx.sessions() as session:
        owner_of = {c.slack_ts: c.owner for c in session.scalars(select(Conversation))}
    cards = [m for m in door.slack.messages() if not m.is_reply]
    assert len(cards) == len(NASTY)
    for card in cards:
        card_owner = owner_of.get(card.ts)
        assert set(card.mentions) <= ({slack_id[card_owner]} if card_owner else set()), card.mentions


def test_injection_in_every_slack_text_field_is_inert(door: Door) -> None:
    conversation_id = door.seed("1")
    tables = door.tables()
    card = door.conversation(conversation_id)
    assert card.slack_channel and card.slack_ts
    before = door.state()
    injections = [text for name, text in NASTY.items() if name.startswith(("sql_", "mrkdwn_"))]
    for nasty in injections:
        for text in (f"queue {nasty}", f"stats {nasty}", f"away until {nasty}", nasty):
            answer = door.command(text)
            assert not any(control in answer for control in MRKDWN_CONTROLS), answer
        menus = [
            (ACTION_SNOOZE, nasty),
            (ACTION_CLOSE, nasty),
            (ACTION_REASSIGN, nasty),
        ]
        for action_id, value in menus:
            payload = door.slack.menu_select(action_id, value, MARIA, card.slack_channel, card.slack_ts)
            assert door.interact(payload).status == 200
        for metadata in (nasty, json.dumps({"conversation_id": nasty})):
            payload = door.slack.view_submission(
                MARIA, {REPLY_BLOCK: {REPLY_INPUT: "hi"}}, callback_id=VIEW_REPLY, private_metadata=metadata
            )
            assert door.interact(payload).json()["response_action"] == "errors"
        click = door.slack.button_click(ACTION_CLAIM, nasty, STRANGER, card.slack_channel, nasty[:40])
        assert door.interact(click).status == 200
    assert door.state() == before  # nothing above was a valid action
    assert door.tables() == tables

    # A reply with every nasty string goes to the customer verbatim; Slack shows it escaped.
    reply = "\n".join(NASTY.values())[:4000]
    assert door.submit_reply(MARIA, conversation_id, reply).status == 200
    with door.ctx.sessions() as session:
        [row] = session.scalars(select(Outbox).where(Outbox.kind == "reply"))
        assert row.payload["text"] == reply.strip()
    door.send_outbox()
    assert door.social.sent[-1][1] == reply.strip()
    shown = _slack_output(door)
    assert_inert(shown)
    assert door.tables() == tables


# --------------------------------------------------------------------------------------------
# Property test: random bodies at /slack/events, signed and not

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
ABSENT = object()
nasty_text = st.sampled_from([text for name, text in NASTY.items() if name != "long_word"])
user_ids = (
    st.sampled_from([*STAFF, *STAFF, STRANGER, STRANGER, "", "U0NOBODY0"]) | st.text(max_size=12) | nasty_text
)
ids_or_junk = (
    st.sampled_from(["1", "2", "999999", "-1", " 1 ", "1e3", "\u00b2", "9" * 30]) | nasty_text | json_values
)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the strategy's value, sometimes left out."""
    return st.one_of(strategy, strategy, strategy, st.just(ABSENT))


def _step(target: Any, key: str | int) -> Any:
    """``target[key]`` when it exists, else ABSENT."""
    if isinstance(target, dict):
        return target.get(key, ABSENT) if isinstance(key, str) else ABSENT
    if isinstance(target, list) and isinstance(key, int) and key < len(target):
        return target[key]
    return ABSENT


def _damage(payload: Any, changes: Sequence[tuple[tuple[str | int, ...], Any]]) -> Any:
    """`payload` with a JSON value of any type at each path that exists (others left alone)."""
    for path, value in changes:
        parent = payload
        for key in path[:-1]:
            parent = _step(parent, key)
        last = path[-1]
        if (isinstance(parent, dict) and isinstance(last, str)) or _step(parent, last) is not ABSENT:
            parent[last] = value
    return payload


def _damaged(
    payloads: st.SearchStrategy[Any], paths: Sequence[tuple[str | int, ...]]
) -> st.SearchStrategy[Any]:
    """Well-shaped payloads, and the same with one or two fields of a random JSON type."""
    changes = st.lists(st.tuples(st.sampled_from(paths), json_values), min_size=1, max_size=2)
    return payloads | st.builds(_damage, payloads, changes)


def _present(data: Any) -> Any:
    """`data` without the ABSENT markers (keys left out, list items dropped)."""
    if isinstance(data, dict):
        return {key: _present(value) for key, value in data.items() if value is not ABSENT}
    if isinstance(data, list):
        return [_present(value) for value in data if value is not ABSENT]
    return data


users = _maybe(st.fixed_dictionaries({"id": _maybe(user_ids)}) | user_ids)
actions = st.fixed_dictionaries(
    {
        "action_id": st.sampled_from(ACTIONS) | st.text(max_size=8),
        "block_id": _maybe(st.sampled_from(["conversation:1", "conversation:2", "conversation:x", "b1"])),
        "value": _maybe(ids_or_junk),
        "selected_option": _maybe(
            st.fixed_dictionaries(
                {"value": _maybe(st.sampled_from([*SNOOZE_CHOICES, *CLOSE_REASONS]) | nasty_text)}
            )
        ),
        "selected_user": _maybe(user_ids),
    }
)
views = st.fixed_dictionaries(
    {
        "type": st.just("modal"),
        "callback_id": st.sampled_from([VIEW_REPLY, VIEW_REPLY, "other"]),
        "private_metadata": _maybe(ids_or_junk),
        "state": _maybe(
            st.fixed_dictionaries(
                {
                    "values": _maybe(
                        st.fixed_dictionaries(
                            {
                                REPLY_BLOCK: _maybe(
                                    st.fixed_dictionaries(
                                        {
                                            REPLY_INPUT: _maybe(
                                                st.fixed_dictionaries(
                                                    {
                                                        "type": st.just("plain_text_input"),
                                                        "value": _maybe(nasty_text | st.text(max_size=30)),
                                                    }
                                                )
                                            )
                                        }
                                    )
                                )
                            }
                        )
                    )
                }
            )
        ),
    }
)
interactions = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["block_actions", "block_actions", "view_submission", "view_closed", "shortcut"]
        ),
        "user": users | users,
        "actions": _maybe(st.lists(actions, min_size=1, max_size=2)),
        "view": _maybe(views),
        "container": _maybe(
            st.fixed_dictionaries(
                {
                    "message_ts": _maybe(st.sampled_from(["1700000000.000100", "1.2"]) | nasty_text),
                    "channel_id": _maybe(st.sampled_from([CARE, BILLING, "C0NONE"])),
                }
            )
        ),
        "channel": _maybe(st.fixed_dictionaries({"id": _maybe(st.sampled_from([CARE, BILLING, "C0NONE"]))})),
        "message": _maybe(st.fixed_dictionaries({"ts": _maybe(st.just("1700000000.000100"))})),
        "team": _maybe(st.fixed_dictionaries({"id": st.just("T0STANDIN1")})),
        "trigger_id": _maybe(st.text(max_size=10)),
        "response_url": _maybe(
            st.sampled_from(["", "not a url", "ftp://127.0.0.1:9/x", "http://127.0.0.1:9/hook"])
        ),
        "callback_id": _maybe(st.text(max_size=8)),
    }
).map(_present)
INTERACTION_PATHS: list[tuple[str | int, ...]] = [
    ("type",),
    ("user",),
    ("user", "id"),
    ("actions",),
    ("actions", 0),
    ("actions", 0, "action_id"),
    ("actions", 0, "value"),
    ("actions", 0, "block_id"),
    ("actions", 0, "selected_option"),
    ("actions", 0, "selected_option", "value"),
    ("actions", 0, "selected_user"),
    ("view",),
    ("view", "callback_id"),
    ("view", "private_metadata"),
    ("view", "state"),
    ("view", "state", "values"),
    ("view", "state", "values", REPLY_BLOCK),
    ("view", "state", "values", REPLY_BLOCK, REPLY_INPUT),
    ("view", "state", "values", REPLY_BLOCK, REPLY_INPUT, "value"),
    ("container",),
    ("container", "message_ts"),
    ("channel",),
    ("channel", "id"),
    ("message",),
    ("team",),
    ("trigger_id",),
    ("response_url",),
    ("state",),
    ("authorizations",),
    ("enterprise",),
]
EVENT_PATHS: list[tuple[str | int, ...]] = [
    ("type",),
    ("event",),
    ("event", "type"),
    ("event", "user"),
    ("event", "tab"),
    ("event", "channel"),
    ("authorizations",),
    ("challenge",),
    ("is_ext_shared_channel",),
    ("team_id",),
]
events = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["event_callback", "event_callback", "url_verification", "app_rate_limited"]),
        "challenge": _maybe(st.text(max_size=10)),
        "event": _maybe(
            st.fixed_dictionaries(
                {
                    "type": _maybe(st.sampled_from(["app_home_opened", "message", "app_mention"])),
                    "user": _maybe(user_ids),
                    "tab": _maybe(st.sampled_from(["home", "messages"])),
                    "channel": _maybe(st.text(max_size=8)),
                }
            )
        ),
        "authorizations": _maybe(
            st.lists(st.fixed_dictionaries({"team_id": st.just("T0STANDIN1")}), max_size=2)
        ),
        "is_ext_shared_channel": _maybe(st.booleans()),
        "team_id": _maybe(st.text(max_size=8)),
    }
).map(_present)
commands = st.fixed_dictionaries(
    {
        "command": _maybe(st.sampled_from(["/replyclock", "/other"])),
        "text": _maybe(
            st.sampled_from(
                [
                    "mine",
                    "queue",
                    "queue care",
                    "queue billing",
                    "stats",
                    "stats care",
                    "away until 2026-12-01",
                    "away until 9999-12-31",
                    "away until 0001-01-01",
                    "away",
                    "back",
                    "help",
                    "",
                ]
            )
            | nasty_text
            | st.text(max_size=30)
        ),
        "user_id": _maybe(user_ids),
        "channel_id": _maybe(st.sampled_from([CARE, "D0NONE"])),
        "trigger_id": _maybe(st.text(max_size=8)),
    }
).map(lambda fields: {k: v if isinstance(v, str) else json.dumps(v) for k, v in _present(fields).items()})


def _encode_form(fields: Mapping[str, str]) -> bytes:
    return urllib.parse.urlencode(fields).encode("utf-8", errors="surrogatepass")


any_interactions = _damaged(interactions, INTERACTION_PATHS)
bodies = st.one_of(
    any_interactions.map(lambda payload: ("form", _encode_form({"payload": json.dumps(payload)}), payload)),
    any_interactions.map(lambda payload: ("form", _encode_form({"payload": json.dumps(payload)}), payload)),
    any_interactions.map(lambda payload: ("json", json.dumps(payload).encode(), payload)),
    _damaged(events, EVENT_PATHS).map(lambda payload: ("json", json.dumps(payload).encode(), payload)),
    commands.map(lambda fields: ("form", _encode_form(fields), fields)),
    st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4).map(
        lambda fields: ("form", _encode_form(fields), fields)
    ),
    st.binary(max_size=200).map(lambda raw: ("form", raw, None)),
    st.binary(max_size=200).map(lambda raw: ("form", b"payload=" + raw, None)),
    json_values.map(lambda value: ("json", json.dumps(value).encode(), value)),
)
signatures = st.sampled_from(["valid", "valid", "valid", "valid", "missing", "stale", "forged", "other-body"])


def _acting_user(body: Any) -> str | None:
    """The Slack member a body claims to come from, as bolt reads it (None if none)."""
    if not isinstance(body, dict):
        return None
    user = body.get("user")
    if isinstance(user, dict):
        user = user.get("id")
    if user is None:
        user = body.get("user_id")
    return user if isinstance(user, str) else None


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(case=bodies, signature=signatures)
def test_fuzz_slack_events_never_5xx_and_only_staff_actions_change_anything(
    fuzz_door: Door, case: tuple[str, bytes, Any], signature: str
) -> None:
    kind, body, parsed = case
    content_type = "application/json" if kind == "json" else "application/x-www-form-urlencoded"
    now = int(time.time())
    headers = {"Content-Type": content_type}
    if signature == "valid":
        headers.update(fuzz_door.slack.sign(body, timestamp=now))
    elif signature == "stale":
        headers.update(fuzz_door.slack.sign(body, timestamp=now - 400))
    elif signature == "forged":
        headers.update({"X-Slack-Request-Timestamp": str(now), "X-Slack-Signature": "v0=" + "ab" * 32})
    elif signature == "other-body":
        headers.update(fuzz_door.slack.sign(body + b"&x=1", timestamp=now))
    before = fuzz_door.state()
    status = fuzz_door.post(body, headers)
    event(f"{signature if signature != 'valid' else 'signed'} -> HTTP {status}")
    assert 200 <= status < 500, (status, body[:300])
    if signature != "valid":
        assert status == 401
    staff_actor = signature == "valid" and _acting_user(parsed) in STAFF
    after = fuzz_door.state()
    if after != before:
        event("a staff action changed the database")
    if not staff_actor:
        assert after == before, (body[:300], status)


@pytest.fixture
def fuzz_door(ctx: AppContext, clock: FakeClock) -> Iterator[Door]:
    """The door, with two conversations whose cards are in #billing and #care."""
    for opened in open_door(ctx, clock):
        opened.seed("1")
        opened.seed("2", "the site is down", author="bo")
        yield opened


# --------------------------------------------------------------------------------------------
# Damaged policy files through the real command line

CONFIGS = HOSTILE / "configs"
_PROBLEM_COUNT = re.compile(r"\d+ problem\(s\) in .+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        cwd=path.parent if path.is_dir() else None,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def _damaged_configs(tmp: Path) -> list[Path]:
    directory = tmp / "a-directory.toml"
    directory.mkdir()
    return [
        *sorted(p for p in CONFIGS.glob("*.toml") if p.name != "bom.toml"),
        directory,
        tmp / "missing.toml",
    ]


def test_the_cli_reports_damaged_policy_files_as_errors_never_tracebacks(tmp_path: Path) -> None:
    paths = _damaged_configs(tmp_path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(paths, pool.map(run_check, paths), strict=True))
    for path, result in results.items():
        assert result.returncode == 2, (path.name, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, path.name
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and lines[0].startswith(f"error: {path}"), (path.name, lines[:3])
        assert all(line.startswith("error: ") or _PROBLEM_COUNT.fullmatch(line) for line in lines), (
            path.name,
            lines,
        )
        assert "OK" not in result.stdout
    # A byte-order mark is not damage: the file is read as the same policy.
    bom = run_check(CONFIGS / "bom.toml")
    assert bom.returncode == 0 and bom.stdout.rstrip().endswith(": OK"), bom.stderr


def test_the_cli_never_writes_control_characters_from_the_file_to_the_terminal() -> None:
    """Key names with ESC, BEL or NUL (a terminal escape sequence in a policy file) are shown escaped."""
    result = run_check(CONFIGS / "control_characters.toml")
    assert result.returncode == 2
    assert not _CONTROL.search(result.stderr), result.stderr
    assert 'settings."\\u001b]0;owned\\u0007": unknown key' in result.stderr
    assert "unknown day '\\x1b[2J'" in result.stderr
