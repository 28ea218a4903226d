"""A local stand-in for Slack: the Web API methods replyclock uses, and Slack's requests to the app.

`SlackStandIn` is a small HTTP server on 127.0.0.1 that answers like ``https://slack.com/api/``
does, so the real ``slack_sdk.WebClient(token=..., base_url=standin.base_url)`` and a real
slack_bolt ``App(signing_secret=..., client=WebClient(token=..., base_url=standin.base_url))``
talk to it unmodified (bolt takes the token from the client it is given and ignores, with a
warning, a ``token=`` passed beside it). It
keeps the state a workspace would (channels, messages with their edits and thread replies,
ephemeral messages, views, uploaded files, DMs), records every call, can inject faults, and can
play Slack's other role: sending signed events, button clicks, modal submissions and slash
commands to an app served over HTTP. ``replyclock demo`` prints its `transcript` as "the
Slack side"; the tests use it as a fake Slack.

Usage::

    with SlackStandIn(channels={"C0CARE0001": "care"}, users=[SlackUser("U0MARIA01", "Maria Keller")]) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        client.chat_postMessage(channel="#care", text="hi <@U0MARIA01>")
        slack.messages("#care")[0].mentions  # ("U0MARIA01",)

Where the shapes come from (checked, not guessed): the response examples and error lists of
each method in Slack's reference (docs.slack.dev / api.slack.com, as collected in
``slack-ruby/slack-api-ref`` and ``slackapi/slack-api-specs``), the field unions in
``slackapi/java-slack-sdk``'s ``json-logs/samples/api``, and what slack_sdk 3.x itself reads
(``files_upload_v2`` reads ``upload_url``/``file_id``, needs HTTP 200 from the upload URL and
reads ``files`` from ``files.completeUploadExternal``; ``RateLimitErrorRetryHandler`` reads
an integer ``Retry-After``; slack_bolt reads ``user_id``/``bot_id``/``team_id``/``url``/``team``
from ``auth.test``). Errors are answered with HTTP 200 and ``{"ok": false, "error": ...}`` as
Slack does; rate limiting is HTTP 429 with ``Retry-After`` and ``{"ok": false, "error":
"ratelimited"}``. The ``response_metadata.messages`` texts for invalid blocks/views follow
Slack's ``[ERROR] ... [json-pointer:...]`` style but are approximations. Not modelled: scopes,
channel membership of humans, message deletion via the API, Socket Mode (``apps.connections.open``
answers ``unknown_method``), Enterprise Grid, pagination. Unverified and chosen here:
``unknown_method`` comes with HTTP 200 (slack_sdk raises SlackApiError whatever the status), and a
``thread_ts`` naming no message is accepted (the transcript flags such replies).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import email.parser
import email.policy
import hashlib
import hmac
import json
import math
import mimetypes
import os
import re
import socket
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

__all__ = [
    "ANY_METHOD",
    "DEFAULT_SIGNING_SECRET",
    "DEFAULT_TOKEN",
    "METHOD_TIERS",
    "POST_BURST",
    "POST_PER_SECOND",
    "PUBLISHED_LIMITS",
    "RATE_LIMITS_ENV",
    "RESPONSE_URL_METHOD",
    "TIER_PER_MINUTE",
    "UPLOAD_URL_METHOD",
    "AppResponse",
    "Call",
    "Ephemeral",
    "Limit",
    "Message",
    "SlackStandIn",
    "SlackUser",
    "UploadedFile",
]

JSON = dict[str, Any]

DEFAULT_TOKEN = "xoxb-replyclock-standin"
"""The bot token the stand-in accepts unless told otherwise."""

DEFAULT_SIGNING_SECRET = "replyclock-standin-signing-secret"
"""The signing secret `SlackStandIn.sign` uses unless told otherwise."""

UPLOAD_URL_METHOD = "upload_url"
"""`Call.method` of a POST to an upload URL from ``files.getUploadURLExternal`` (step 2 of files_upload_v2)."""

RESPONSE_URL_METHOD = "response_url"
"""`Call.method` of a POST to a ``response_url`` handed out with a slash command or interaction.

The JSON body acts as Slack's does (``replace_original``, ``delete_original``,
``response_type: "in_channel"``, else an ephemeral reply to the user) and is answered with
plain-text ``ok``; a URL not handed out answers 404 and bad JSON 400 (the stand-in's choice)."""

ANY_METHOD = "*"
"""Matches every method in `SlackStandIn.fail_next` and `SlackStandIn.delay_next`."""

RATE_LIMITS_ENV = "REPLYCLOCK_STANDIN_RATE_LIMITS"
"""Set to 1 (or true/yes/on) to turn on Slack's published rate limits in every stand-in by default."""

TIER_PER_MINUTE: Mapping[int, int] = {1: 1, 2: 20, 3: 50, 4: 100}
"""Slack's published Web API tiers: calls per minute per method per workspace (bursts allowed)."""

# The tier of each method the stand-in answers, from its page on docs.slack.dev (``Rate limits``).
# chat.postMessage is "Special": about one message per second per channel, short bursts allowed.
METHOD_TIERS: Mapping[str, int] = {
    "auth.test": 4,  # "Special" on the page; treated as Tier 4 here (the stand-in's choice)
    "chat.update": 3,
    "chat.postEphemeral": 4,
    "chat.getPermalink": 4,  # "Special"; Tier 4 here
    "conversations.open": 3,
    "conversations.history": 3,
    "conversations.replies": 3,
    "users.info": 4,
    "views.open": 4,
    "views.push": 4,
    "views.update": 4,
    "views.publish": 4,
    "files.getUploadURLExternal": 4,
    "files.completeUploadExternal": 4,
}

POST_PER_SECOND = 1.0
"""chat.postMessage: messages per second per channel ("about one message per second per channel")."""

POST_BURST = 4
"""chat.postMessage: how many messages a quiet channel takes at once before the 1/s pace applies
(Slack allows "short bursts" without publishing a number; four is the stand-in's choice)."""


@dataclass(frozen=True)
class Limit:
    """One rate limit: a bucket of `burst` calls refilled at `per_second`, per channel or per workspace."""

    per_second: float
    burst: float
    per_channel: bool = False


PUBLISHED_LIMITS: Mapping[str, Limit] = {
    "chat.postMessage": Limit(POST_PER_SECOND, float(POST_BURST), per_channel=True),
    **{
        method: Limit(TIER_PER_MINUTE[tier] / 60.0, float(TIER_PER_MINUTE[tier]))
        for method, tier in METHOD_TIERS.items()
    },
}
"""Every limit `SlackStandIn` enforces with ``rate_limits`` on, by method: the one table."""

MAX_MESSAGE_TEXT = 40_000  # chat.postMessage truncates longer text; chat.update answers msg_too_long
MAX_MESSAGE_BLOCKS = 50
MAX_VIEW_BLOCKS = 100
SLACKBOT_USER_AGENT = "Slackbot 1.0 (+https://api.slack.com/robots)"

_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
_ENTITY = re.compile(r"<([^<>]+)>")
_BLOCK_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


# --------------------------------------------------------------------------------------------
# Public records


@dataclass(frozen=True)
class SlackUser:
    """A member of the stand-in's workspace, as ``users.info`` describes them.

    ``tz`` is an IANA zone; ``tz_offset`` (seconds east of UTC) and ``tz_label`` are worked out
    from it at the time of the call unless given (the label is the zone's abbreviation, e.g.
    "CET", where Slack would say "Central European Time").
    """

    id: str
    real_name: str
    display_name: str = ""
    tz: str = "UTC"
    name: str = ""
    email: str = ""
    is_bot: bool = False
    is_admin: bool = False
    tz_label: str | None = None
    tz_offset: int | None = None

    @property
    def username(self) -> str:
        """The ``name`` handle: given, or made from the real name ("Maria Keller" -> "maria.keller")."""
        return self.name or ".".join(self.real_name.lower().split()) or self.id.lower()

    @property
    def label(self) -> str:
        """How Slack shows this person: the display name, else the real name."""
        return self.display_name or self.real_name or self.id


@dataclass(frozen=True)
class Call:
    """One HTTP request the stand-in received.

    ``method`` is the Web API method (``"chat.postMessage"``), or `UPLOAD_URL_METHOD` /
    `RESPONSE_URL_METHOD`. ``params`` merges the query string and the body (form-encoded,
    multipart or JSON; JSON keeps its types, form values are strings; for the upload URL it is
    ``{"file_id", "length"}``). ``token`` is the bearer token from the ``Authorization`` header
    (or a ``token`` parameter). ``status`` and ``response`` are what the stand-in answered
    (``status`` 0: the connection was dropped on purpose; ``response`` is None for non-JSON answers).
    """

    method: str
    params: JSON
    headers: dict[str, str]
    timestamp: float
    token: str | None
    status: int
    response: JSON | None

    @property
    def ok(self) -> bool:
        """HTTP 200 and, for JSON answers, ``"ok": true``."""
        return self.status == 200 and (self.response is None or bool(self.response.get("ok")))

    @property
    def error(self) -> str | None:
        """The Slack error code answered, if any."""
        if self.response is None:
            return None
        error = self.response.get("error")
        return error if isinstance(error, str) else None


@dataclass(frozen=True)
class Message:
    """A message as it stands now in a channel's history (edits applied, replies kept apart).

    ``data`` is the Slack message object (what ``conversations.history`` would return);
    the other fields are conveniences drawn from it.
    """

    channel: str
    ts: str
    text: str
    user: str
    blocks: list[JSON]
    thread_ts: str | None
    edits: int
    data: JSON
    previous_texts: tuple[str, ...] = ()

    @property
    def is_reply(self) -> bool:
        """Posted into a thread (``thread_ts`` names another message)."""
        return self.thread_ts is not None and self.thread_ts != self.ts

    @property
    def bot_id(self) -> str | None:
        value = self.data.get("bot_id")
        return value if isinstance(value, str) else None

    @property
    def files(self) -> list[JSON]:
        files = self.data.get("files")
        return list(files) if isinstance(files, list) else []

    @property
    def mentions(self) -> tuple[str, ...]:
        """User ids mentioned (``<@U…>`` in the text or the blocks), in order, without repeats."""
        return _mentions(self.text, self.blocks)

    @property
    def display_text(self) -> str:
        """What a person sees: a plain-text summary of the blocks, or the text when there are none."""
        return _blocks_summary(self.blocks) or self.text


@dataclass(frozen=True)
class Ephemeral:
    """A ``chat.postEphemeral`` message (or an ephemeral ``response_url`` reply): seen only by ``user``."""

    channel: str
    user: str
    ts: str
    text: str
    blocks: list[JSON]
    thread_ts: str | None
    data: JSON

    @property
    def mentions(self) -> tuple[str, ...]:
        return _mentions(self.text, self.blocks)

    @property
    def display_text(self) -> str:
        return _blocks_summary(self.blocks) or self.text


@dataclass(frozen=True)
class UploadedFile:
    """A file sent through the three steps of ``files_upload_v2``."""

    id: str
    filename: str
    title: str
    content: bytes
    channels: tuple[str, ...]
    completed: bool
    data: JSON


class AppResponse(NamedTuple):
    """The app's HTTP answer to something the stand-in sent it."""

    status: int
    body: str

    def json(self) -> Any:
        """The body parsed as JSON (bolt answers JSON for ``ack(response_action=...)``)."""
        return json.loads(self.body) if self.body else None


# --------------------------------------------------------------------------------------------
# Internals: requests, replies, state


class _SlackError(Exception):
    """Answer ``{"ok": false, "error": code, **extra}`` (HTTP 200, as Slack does)."""

    def __init__(self, code: str, **extra: Any) -> None:
        super().__init__(code)
        self.code = code
        self.extra = extra


@dataclass
class _Reply:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    json_body: JSON | None = None
    drop: bool = False

    @classmethod
    def of_json(cls, payload: JSON, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> _Reply:
        return cls(
            status=status,
            body=json.dumps(payload).encode(),
            headers=[("Content-Type", "application/json; charset=utf-8"), *headers],
            json_body=payload,
        )

    @classmethod
    def of_text(cls, text: str, status: int = 200) -> _Reply:
        return cls(status=status, body=text.encode(), headers=[("Content-Type", "text/plain; charset=utf-8")])


@dataclass
class _Fault:
    method: str
    status: int
    error: str
    retry_after: int | None
    remaining: int


@dataclass
class _Delay:
    method: str
    seconds: float
    remaining: int


@dataclass
class _Channel:
    id: str
    name: str
    is_member: bool = True
    is_archived: bool = False
    is_im: bool = False
    is_mpim: bool = False
    user: str | None = None  # the other person, for a DM


@dataclass
class _StoredMessage:
    channel: str
    data: JSON
    edits: int = 0
    previous_texts: list[str] = field(default_factory=list)
    deleted: bool = False

    @property
    def ts(self) -> str:
        return str(self.data["ts"])

    @property
    def thread_ts(self) -> str | None:
        value = self.data.get("thread_ts")
        return value if isinstance(value, str) and value != self.data["ts"] else None


@dataclass
class _Upload:
    file_id: str
    filename: str
    length: int
    ticket: str
    alt_txt: str | None
    snippet_type: str | None
    content: bytes | None = None
    title: str = ""
    channels: list[str] = field(default_factory=list)
    completed: bool = False
    data: JSON = field(default_factory=dict)


@dataclass
class _Hook:
    kind: str  # "commands" or "actions"
    channel: str
    user: str
    message_ts: str | None


@dataclass
class _Trigger:
    user: str
    used: bool = False


class _Limiter:
    """Rate limits as token buckets, one per (method, channel) or per method, from a table of `Limit`.

    A bucket holds up to its burst of calls and refills at its rate; a call finding it empty
    is refused with the whole seconds until a call would pass (Slack's ``Retry-After``, at
    least 1). Time comes from `clock` (seconds; monotonic by default, a fake one in tests).
    """

    def __init__(self, clock: Callable[[], float], limits: Mapping[str, Limit]) -> None:
        self._clock = clock
        self._limits = dict(limits)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (tokens, at)

    def check(self, method: str, channel: str | None) -> int | None:
        """Take a call's token: None if it passes, else the Retry-After seconds."""
        limit = self._limits.get(method)
        if limit is None:
            return None
        if limit.per_channel and channel is None:
            return None  # no channel: the method answers an error of its own
        key = (method, (channel or "") if limit.per_channel else "")
        now = self._clock()
        tokens, at = self._buckets.get(key, (limit.burst, now))
        tokens = min(limit.burst, tokens + max(now - at, 0.0) * limit.per_second)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return None
        self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / limit.per_second))


# --------------------------------------------------------------------------------------------
# The stand-in


class SlackStandIn:
    """A Slack workspace on 127.0.0.1 that slack_sdk and slack_bolt cannot tell from the real one.

    Args:
        channels: known channels, id -> name (``{"C0CARE0001": "care"}``). Posting to anything
            else answers ``channel_not_found``. Default: one channel, ``C0GENERAL1`` "general".
            More (including ones the bot is not in, or archived ones) via `add_channel`.
        users: the member directory for ``users.info``, mentions and payloads. The app's bot
            user is always added. More via `add_user`.
        tokens: bearer tokens accepted; others answer ``invalid_auth``, none ``not_authed``.
            ``None`` accepts any non-empty token.
        signing_secret: what `sign` signs Slack's requests to the app with.
        clock: seconds since the epoch for message timestamps (``ts``) and time zone offsets.
            Without one, ``ts`` counts up from ``"1700000000.000100"`` in steps of 100 µs, so
            runs are reproducible; with one (e.g. a demo's fake clock) ``ts`` follows it, still
            unique and increasing, and the transcript shows times.
        post_interval: a per-channel limit on ``chat.postMessage`` of one post per this many
            seconds, without a burst (in place of the published one): a post sooner answers HTTP
            429 ``ratelimited``. The same buckets as `rate_limits` (`PUBLISHED_LIMITS`).
        rate_limits: enforce Slack's published limits (`PUBLISHED_LIMITS`: `TIER_PER_MINUTE`
            per method by its tier, `METHOD_TIERS`; ``chat.postMessage`` `POST_PER_SECOND` per
            channel after a burst of `POST_BURST`): a call beyond them answers HTTP 429 with ``Retry-After`` (whole
            seconds) and ``{"ok": false, "error": "ratelimited"}``, as Slack does, and changes
            nothing. Default: off, unless the environment variable `RATE_LIMITS_ENV` is set to 1.
        limit_clock: seconds (any origin) for the rate limits; default ``time.monotonic``. Give
            a fake clock to test limits without sleeping.
        strict_triggers: answer ``invalid_trigger_id`` for ``views.open``/``views.push`` with a
            trigger the stand-in never issued. Re-using an issued trigger always answers
            ``exchanged_trigger_id``.
        team_id, team_domain, team_name, bot_user_id, bot_id, app_id, bot_name,
            verification_token: the identity of the workspace and the app.
        host, port: where to listen (port 0 picks a free one).
    """

    def __init__(
        self,
        *,
        channels: Mapping[str, str] | None = None,
        users: Iterable[SlackUser] = (),
        tokens: Iterable[str] | None = (DEFAULT_TOKEN,),
        signing_secret: str = DEFAULT_SIGNING_SECRET,
        clock: Callable[[], float] | None = None,
        post_interval: float | None = None,
        rate_limits: bool | None = None,
        limit_clock: Callable[[], float] | None = None,
        strict_triggers: bool = False,
        team_id: str = "T0STANDIN1",
        team_domain: str = "replyclock-standin",
        team_name: str = "replyclock stand-in",
        bot_user_id: str = "U0REPLYBOT",
        bot_id: str = "B0REPLYBOT",
        app_id: str = "A0REPLYCLK",
        bot_name: str = "replyclock",
        verification_token: str = "standin-verification-token",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.signing_secret = signing_secret
        self.team_id = team_id
        self.team_domain = team_domain
        self.team_name = team_name
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.app_id = app_id
        self.bot_name = bot_name
        self.verification_token = verification_token
        self.internal_errors: list[str] = []
        """Tracebacks of stand-in bugs (answered as HTTP 500 ``fatal_error``); tests may assert it stays empty."""

        self._tokens: frozenset[str] | None = None if tokens is None else frozenset(tokens)
        self._clock = clock
        if rate_limits is None:
            rate_limits = os.environ.get(RATE_LIMITS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        self.rate_limits = rate_limits
        self._limit_clock = limit_clock or time.monotonic
        limits: dict[str, Limit] = dict(PUBLISHED_LIMITS) if rate_limits else {}
        if post_interval is not None:  # one post per channel per post_interval, no burst
            limits["chat.postMessage"] = Limit(1.0 / post_interval, 1.0, per_channel=True)
        self._limits = limits
        self._strict_triggers = strict_triggers
        self._host = host
        self._port = port

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

        self._users: dict[str, SlackUser] = {}
        self._channels: dict[str, _Channel] = {}
        self.add_user(SlackUser(bot_user_id, bot_name, display_name=bot_name, name=bot_name, is_bot=True))
        for user in users:
            self.add_user(user)
        for channel_id, name in (channels if channels is not None else {"C0GENERAL1": "general"}).items():
            self.add_channel(channel_id, name)
        self._reset_state()

        self._methods: dict[str, Callable[[JSON], JSON]] = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "chat.getPermalink": self._chat_get_permalink,
            "conversations.open": self._conversations_open,
            "conversations.history": self._conversations_history,
            "conversations.replies": self._conversations_replies,
            "users.info": self._users_info,
            "views.open": self._views_open,
            "views.push": self._views_push,
            "views.update": self._views_update,
            "views.publish": self._views_publish,
            "files.getUploadURLExternal": self._files_get_upload_url_external,
            "files.completeUploadExternal": self._files_complete_upload_external,
        }

    def _reset_state(self) -> None:
        with self._lock:
            self._calls: list[Call] = []
            self._messages: dict[tuple[str, str], _StoredMessage] = {}
            self._ephemerals: list[Ephemeral] = []
            self._views: dict[str, JSON] = {}
            self._view_owner: dict[str, str] = {}
            self._home_views: dict[str, str] = {}
            self._uploads: dict[str, _Upload] = {}
            self._tickets: dict[str, str] = {}
            self._hooks: dict[str, _Hook] = {}
            self._triggers: dict[str, _Trigger] = {}
            self._faults: list[_Fault] = []
            self._delays: list[_Delay] = []
            self._limiter = _Limiter(self._limit_clock, self._limits)
            self._last_ts_us = 0
            self._serial = 0
            for channel_id in [c.id for c in self._channels.values() if c.is_im or c.is_mpim]:
                del self._channels[channel_id]

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> Self:
        """Start serving on a background thread; returns self."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError("SlackStandIn is already running")
            self._stopping.clear()
            server = _Server((self._host, self._port), self)
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="slack-standin", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (delayed answers in flight end at once). Safe to call twice."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:54321/``."""
        server = self._server
        if server is None:
            raise RuntimeError("SlackStandIn is not running; call start() or use it as a context manager")
        return f"http://{self._host}:{server.server_port}/"

    @property
    def base_url(self) -> str:
        """What to give ``WebClient(base_url=...)``: ``http://127.0.0.1:<port>/api/``."""
        return self.url + "api/"

    # ----------------------------------------------------------------------------------------
    # Configuration

    def add_user(self, user: SlackUser) -> None:
        """Add (or replace) a member of the directory."""
        with self._lock:
            self._users[user.id] = user

    def add_channel(
        self, channel_id: str, name: str, *, is_member: bool = True, is_archived: bool = False
    ) -> None:
        """Add a channel. Posting where the bot is not a member answers ``not_in_channel``;
        to an archived one, ``is_archived``."""
        with self._lock:
            self._channels[channel_id] = _Channel(
                channel_id, name.lstrip("#"), is_member=is_member, is_archived=is_archived
            )

    def user(self, user_id: str) -> SlackUser | None:
        with self._lock:
            return self._users.get(user_id)

    def channel_id(self, channel: str) -> str | None:
        """The id for a channel id, name (with or without ``#``), DM id or user id (-> their DM)."""
        with self._lock:
            return self._resolve_channel(channel, open_dm=True)

    def dm_channel(self, user_id: str) -> str:
        """The DM channel between the app and a user (opened if need be, like ``conversations.open``)."""
        with self._lock:
            return self._open_dm(user_id)[0]

    # ----------------------------------------------------------------------------------------
    # Fault injection

    def fail_next(
        self,
        method: str,
        error: str = "ratelimited",
        status: int = 429,
        retry_after: int | None = 1,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` calls to ``method`` (or `ANY_METHOD`) with a failure.

        ``status`` 429 sends ``Retry-After: <retry_after>`` and ``{"ok": false, "error":
        "ratelimited"}`` (Slack's rate-limit answer); 200 answers ``{"ok": false, "error":
        error}`` (any Slack error, e.g. ``"invalid_auth"``); 5xx answers that status with the
        same JSON body (e.g. ``status=500, error="internal_error"``); 0 drops the connection
        without answering. The call is recorded either way and changes no state.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.append(_Fault(method, status, error, retry_after if status == 429 else None, times))

    def delay_next(self, method: str, seconds: float, times: int = 1) -> None:
        """Hold the answer to the next ``times`` calls to ``method`` (or `ANY_METHOD`) for
        ``seconds`` (to make clients time out). Combines with `fail_next`."""
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._delays.append(_Delay(method, seconds, times))

    # ----------------------------------------------------------------------------------------
    # What happened

    @property
    def calls(self) -> list[Call]:
        """Every request received since start (or `clear`), oldest first (a copy)."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [call for call in self._calls if call.method == method]

    def wait_for(self, method: str, count: int = 1, timeout: float = 5.0) -> list[Call]:
        """Wait until at least ``count`` calls to ``method`` were received; returns them all.

        For apps that answer Slack first and call the API afterwards (bolt's default).
        Raises TimeoutError, naming the methods seen, when they do not come.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [call for call in self._calls if call.method == method]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({call.method for call in self._calls})
                    raise TimeoutError(
                        f"{len(found)} of {count} call(s) to {method} within {timeout}s; seen: {seen}"
                    )
                self._changed.wait(left)

    def messages(self, channel: str | None = None) -> list[Message]:
        """Messages as they stand now (edits applied; thread replies included, see
        `Message.is_reply`), oldest first; of one channel (id, name, or user id for the DM)
        or all. Ephemeral messages are apart: `ephemerals`."""
        with self._lock:
            wanted = None if channel is None else self._resolve_channel(channel, open_dm=False)
            if channel is not None and wanted is None:
                return []
            stored = [
                m
                for m in self._messages.values()
                if not m.deleted and (wanted is None or m.channel == wanted)
            ]
            return [_snapshot(m) for m in sorted(stored, key=lambda m: _ts_key(m.ts))]

    def message(self, channel: str, ts: str) -> Message | None:
        with self._lock:
            channel_id = self._resolve_channel(channel, open_dm=False)
            stored = self._messages.get((channel_id or channel, ts))
            return None if stored is None or stored.deleted else _snapshot(stored)

    def thread(self, channel: str, ts: str) -> list[Message]:
        """A thread: its parent, then its replies."""
        return [m for m in self.messages(channel) if m.ts == ts or m.thread_ts == ts]

    def ephemerals(self, channel: str | None = None, user: str | None = None) -> list[Ephemeral]:
        with self._lock:
            wanted = None if channel is None else self._resolve_channel(channel, open_dm=False)
            return [
                e
                for e in self._ephemerals
                if (channel is None or e.channel == wanted) and (user is None or e.user == user)
            ]

    def views(self) -> list[JSON]:
        """Every view opened, pushed or published, as it stands now (copies)."""
        with self._lock:
            return [copy.deepcopy(view) for view in self._views.values()]

    def view(self, view_id: str) -> JSON | None:
        with self._lock:
            view = self._views.get(view_id)
            return copy.deepcopy(view) if view is not None else None

    def home_view(self, user_id: str) -> JSON | None:
        """The App Home tab last published for a user."""
        with self._lock:
            view_id = self._home_views.get(user_id)
            return copy.deepcopy(self._views[view_id]) if view_id is not None else None

    def files(self) -> list[UploadedFile]:
        with self._lock:
            return [
                UploadedFile(
                    id=u.file_id,
                    filename=u.filename,
                    title=u.title or u.filename,
                    content=u.content or b"",
                    channels=tuple(u.channels),
                    completed=u.completed,
                    data=copy.deepcopy(u.data),
                )
                for u in self._uploads.values()
            ]

    def clear(self) -> None:
        """Forget calls, messages, ephemerals, views, files, DMs and pending faults; keep the
        configuration (users, channels, tokens)."""
        with self._lock:
            self._reset_state()
            self._changed.notify_all()

    # ----------------------------------------------------------------------------------------
    # Playing the humans

    def post_as_user(
        self,
        channel: str,
        user_id: str,
        text: str,
        *,
        thread_ts: str | None = None,
    ) -> JSON:
        """A person posts: the message joins the history (the app cannot ``chat.update`` it:
        ``cant_update_message``) and the ``message`` event Slack would send is returned, ready
        for `send_event`."""
        with self._lock:
            channel_id = self._resolve_channel(channel, open_dm=True)
            if channel_id is None:
                raise ValueError(f"unknown channel {channel!r}")
            ts = self._next_ts()
            data: JSON = {
                "type": "message",
                "user": user_id,
                "text": text,
                "ts": ts,
                "team": self.team_id,
                "client_msg_id": self._uuid(),
            }
            if thread_ts is not None:
                data["thread_ts"] = self._thread_root(channel_id, thread_ts)
            self._store_message(channel_id, data)
            event = dict(data, channel=channel_id, event_ts=ts, channel_type=self._channel_type(channel_id))
            return copy.deepcopy(event)

    # ----------------------------------------------------------------------------------------
    # Sending to the app (what Slack does to an app in HTTP mode)

    def sign(self, body: bytes | str, timestamp: int | None = None) -> dict[str, str]:
        """Slack's request signing: ``X-Slack-Request-Timestamp`` and ``X-Slack-Signature`` =
        ``"v0=" + hex(HMAC-SHA256(signing_secret, b"v0:<timestamp>:" + body))``.

        The timestamp defaults to the real time (not the stand-in's clock): apps reject
        signatures more than five minutes away from their own clock."""
        raw = body.encode() if isinstance(body, str) else body
        ts = int(time.time()) if timestamp is None else timestamp
        digest = hmac.new(
            self.signing_secret.encode(), f"v0:{ts}:".encode() + raw, hashlib.sha256
        ).hexdigest()
        return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": f"v0={digest}"}

    def send_event(
        self,
        url: str,
        event: JSON,
        *,
        event_id: str | None = None,
        retry_num: int | None = None,
        retry_reason: str = "http_timeout",
        timeout: float = 3.0,
    ) -> AppResponse:
        """POST an Events API delivery: ``event`` wrapped in Slack's ``event_callback``
        envelope (an already complete envelope, ``type`` ``event_callback`` or
        ``url_verification``, is sent as it is). ``retry_num`` adds ``X-Slack-Retry-Num`` /
        ``X-Slack-Retry-Reason`` as on Slack's redeliveries.

        Like every ``send_*`` method: signed with `sign`, a real HTTP POST, and ``timeout``
        defaults to the 3 seconds Slack gives an app to answer (a slower app raises
        TimeoutError); HTTP error statuses are returned, not raised."""
        if event.get("type") in ("event_callback", "url_verification", "app_rate_limited"):
            envelope = event
        else:
            body_event = dict(event)
            body_event.setdefault("event_ts", body_event.get("ts") or self._next_ts())
            envelope = {
                "token": self.verification_token,
                "team_id": self.team_id,
                "context_team_id": self.team_id,
                "context_enterprise_id": None,
                "api_app_id": self.app_id,
                "event": body_event,
                "type": "event_callback",
                "event_id": event_id or f"Ev{self._serial_id(10)}",
                "event_time": int(self._now()),
                "authorizations": [
                    {
                        "enterprise_id": None,
                        "team_id": self.team_id,
                        "user_id": self.bot_user_id,
                        "is_bot": True,
                        "is_enterprise_install": False,
                    }
                ],
                "is_ext_shared_channel": False,
                "event_context": f"4-{self._serial_id(24).lower()}",
            }
        extra = {}
        if retry_num is not None:
            extra = {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": retry_reason}
        return self._post_to_app(url, json.dumps(envelope).encode(), "application/json", extra, timeout)

    def send_url_verification(
        self, url: str, challenge: str = "standin-challenge", timeout: float = 3.0
    ) -> AppResponse:
        """POST the ``url_verification`` handshake Slack sends when the Request URL is saved."""
        body = {"token": self.verification_token, "challenge": challenge, "type": "url_verification"}
        return self._post_to_app(url, json.dumps(body).encode(), "application/json", {}, timeout)

    def send_interaction(self, url: str, payload: JSON, *, timeout: float = 3.0) -> AppResponse:
        """POST an interaction payload as Slack does: form-encoded ``payload=<json>``."""
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        return self._post_to_app(url, body, "application/x-www-form-urlencoded", {}, timeout)

    def send_command(
        self,
        url: str,
        command: str = "/replyclock",
        text: str = "",
        *,
        user_id: str,
        channel: str | None = None,
        trigger_id: str | None = None,
        timeout: float = 3.0,
    ) -> AppResponse:
        """POST a slash command invocation with the form fields Slack sends (``token``,
        ``team_id``, ``team_domain``, ``channel_id``, ``channel_name``, ``user_id``,
        ``user_name``, ``command``, ``text``, ``api_app_id``, ``is_enterprise_install``,
        ``response_url``, ``trigger_id``). ``channel`` defaults to the user's DM with the app;
        posts to ``response_url`` land back here (see `RESPONSE_URL_METHOD`)."""
        fields = self.command_fields(command, text, user_id=user_id, channel=channel, trigger_id=trigger_id)
        body = urllib.parse.urlencode(fields).encode()
        return self._post_to_app(url, body, "application/x-www-form-urlencoded", {}, timeout)

    def command_fields(
        self,
        command: str = "/replyclock",
        text: str = "",
        *,
        user_id: str,
        channel: str | None = None,
        trigger_id: str | None = None,
    ) -> dict[str, str]:
        """The form fields of a slash command invocation (what `send_command` posts)."""
        with self._lock:
            channel_id = self._resolve_channel(channel, open_dm=True) if channel is not None else None
            if channel_id is None:
                if channel is not None:
                    raise ValueError(f"unknown channel {channel!r}")
                channel_id = self._open_dm(user_id)[0]
            hook = self._new_hook("commands", channel_id, user_id, None)
            return {
                "token": self.verification_token,
                "team_id": self.team_id,
                "team_domain": self.team_domain,
                "channel_id": channel_id,
                "channel_name": self._payload_channel_name(channel_id),
                "user_id": user_id,
                "user_name": self._username(user_id),
                "command": command,
                "text": text,
                "api_app_id": self.app_id,
                "is_enterprise_install": "false",
                "response_url": hook,
                "trigger_id": trigger_id or self._issue_trigger(user_id),
            }

    def button_click(
        self,
        action_id: str,
        value: str,
        user_id: str,
        channel: str,
        message_ts: str,
        trigger_id: str | None = None,
        *,
        block_id: str | None = None,
    ) -> JSON:
        """The ``block_actions`` payload of a click on a button in a message.

        When the message is known here its current content fills ``message`` and the button's
        ``block_id``, ``text`` and ``style`` come from its blocks; ``response_url`` points back
        here (``replace_original`` / ``delete_original`` act on the message).
        """

        def action(element: JSON | None) -> JSON:
            made: JSON = {
                "text": (element or {}).get("text")
                or {"type": "plain_text", "text": action_id, "emoji": True},
                "value": value,
                "type": "button",
            }
            if element is not None and "style" in element:
                made["style"] = element["style"]
            return made

        return self._block_actions(action_id, user_id, channel, message_ts, trigger_id, block_id, action)

    def menu_select(
        self,
        action_id: str,
        value: str,
        user_id: str,
        channel: str,
        message_ts: str,
        trigger_id: str | None = None,
        *,
        block_id: str | None = None,
        element_type: str | None = None,
    ) -> JSON:
        """The ``block_actions`` payload of a choice in a select menu (or overflow, radio
        buttons, date/time picker) in a message.

        The element's type comes from the message's blocks (else ``element_type``, else
        ``static_select``) and decides the shape: ``selected_option`` (the option with that
        ``value``, from the element's ``options``/``option_groups``) for static/external
        selects, overflow menus and radio buttons; ``selected_user`` / ``selected_conversation``
        / ``selected_channel`` / ``selected_date`` / ``selected_time`` for the others. The
        choice is also in ``state.values``, as Slack reports it.
        """

        def action(element: JSON | None) -> JSON:
            kind = str((element or {}).get("type") or element_type or "static_select")
            made: JSON = {"type": kind}
            selected_key = _SELECTED_KEYS.get(kind)
            if selected_key is not None:
                made[selected_key] = value
            else:
                made["selected_option"] = _option_with_value(element or {}, value)
            if element is not None and isinstance(element.get("placeholder"), dict):
                made["placeholder"] = element["placeholder"]
            return made

        return self._block_actions(action_id, user_id, channel, message_ts, trigger_id, block_id, action)

    def _block_actions(
        self,
        action_id: str,
        user_id: str,
        channel: str,
        message_ts: str,
        trigger_id: str | None,
        block_id: str | None,
        make_action: Callable[[JSON | None], JSON],
    ) -> JSON:
        with self._lock:
            channel_id = self._resolve_channel(channel, open_dm=True) or channel
            stored = self._messages.get((channel_id, message_ts))
            ephemeral = stored is None and any(e.ts == message_ts for e in self._ephemerals)
            found_block, element = _find_action(stored.data.get("blocks", []) if stored else [], action_id)
            made = make_action(element)
            the_block = block_id or found_block or self._block_id()
            action: JSON = {
                "action_id": action_id,
                "block_id": the_block,
                **made,
                "action_ts": self._next_ts(),
            }
            state: JSON = {}
            if made["type"] != "button":
                state = {the_block: {action_id: {k: v for k, v in made.items() if k not in ("placeholder",)}}}
            payload: JSON = {
                "type": "block_actions",
                "user": self._payload_user(user_id),
                "api_app_id": self.app_id,
                "token": self.verification_token,
                "container": {
                    "type": "message",
                    "message_ts": message_ts,
                    "channel_id": channel_id,
                    "is_ephemeral": ephemeral,
                },
                "trigger_id": trigger_id or self._issue_trigger(user_id),
                "team": {"id": self.team_id, "domain": self.team_domain},
                "enterprise": None,
                "is_enterprise_install": False,
                "channel": {"id": channel_id, "name": self._payload_channel_name(channel_id)},
            }
            if stored is not None:
                payload["message"] = copy.deepcopy(stored.data)
            elif not ephemeral:
                payload["message"] = {"type": "message", "ts": message_ts, "text": ""}
            payload["state"] = {"values": state}
            payload["response_url"] = self._new_hook("actions", channel_id, user_id, message_ts)
            payload["actions"] = [action]
            return payload

    def view_submission(
        self,
        user_id: str,
        values: Mapping[str, Mapping[str, Any]],
        *,
        view_id: str | None = None,
        callback_id: str | None = None,
        private_metadata: str | None = None,
    ) -> JSON:
        """The ``view_submission`` payload of a modal being submitted.

        ``values`` is ``{block_id: {action_id: value}}``; a string value becomes
        ``{"type": <the element's type, else "plain_text_input">, "value": ...}``, a mapping is
        used as the element's state as it is (e.g. ``{"type": "static_select",
        "selected_option": {...}}``). With ``view_id`` of a view opened here, its blocks,
        ``callback_id`` and ``private_metadata`` are used unless overridden.
        """
        with self._lock:
            stored = copy.deepcopy(self._views.get(view_id)) if view_id is not None else None
            view: JSON = stored or {
                "id": view_id or self._new_view_id(),
                "team_id": self.team_id,
                "type": "modal",
                "blocks": [],
                "private_metadata": "",
                "callback_id": "",
                "hash": self._view_hash(),
                "title": {"type": "plain_text", "text": "Modal", "emoji": True},
                "clear_on_close": False,
                "notify_on_close": False,
                "close": None,
                "submit": {"type": "plain_text", "text": "Submit", "emoji": True},
                "previous_view_id": None,
                "root_view_id": view_id,
                "app_id": self.app_id,
                "external_id": "",
                "app_installed_team_id": self.team_id,
                "bot_id": self.bot_id,
            }
            if view.get("root_view_id") is None:
                view["root_view_id"] = view["id"]
            if callback_id is not None:
                view["callback_id"] = callback_id
            if private_metadata is not None:
                view["private_metadata"] = private_metadata
            element_types = _element_types(view.get("blocks", []))
            state: dict[str, dict[str, Any]] = {}
            for block, actions in values.items():
                state[block] = {}
                for action, value in actions.items():
                    if isinstance(value, Mapping):
                        state[block][action] = dict(value)
                    else:
                        kind = element_types.get((block, action), "plain_text_input")
                        state[block][action] = {"type": kind, "value": value}
            view["state"] = {"values": state}
            return {
                "type": "view_submission",
                "team": {"id": self.team_id, "domain": self.team_domain},
                "user": self._payload_user(user_id),
                "api_app_id": self.app_id,
                "token": self.verification_token,
                "trigger_id": self._issue_trigger(user_id),
                "view": view,
                "response_urls": [],
                "is_enterprise_install": False,
                "enterprise": None,
            }

    # ----------------------------------------------------------------------------------------
    # The transcript

    def transcript(self, lines_for_users: dict[str, str] | None = None) -> list[str]:
        """The Slack side, readably: per channel (in order of first activity), each message
        with its thread replies under it and ephemeral messages in place; mentions resolved to
        names and listed; buttons and files summarised; times shown when a clock was given.

        ``lines_for_users`` maps user ids to how to name them (default: the directory's
        display or real names).
        """
        with self._lock:
            names = {uid: u.label for uid, u in self._users.items()}
            names.update(lines_for_users or {})
            channels = {cid: self._transcript_channel_name(cid, names) for cid in self._channels}
            stored = sorted(
                (m for m in self._messages.values() if not m.deleted), key=lambda m: _ts_key(m.ts)
            )
            with_times = self._clock is not None

            first_seen: dict[str, tuple[int, int]] = {}
            for channel_id, ts in [
                *((m.channel, m.ts) for m in stored),
                *((e.channel, e.ts) for e in self._ephemerals),
            ]:
                first_seen[channel_id] = min(first_seen.get(channel_id, _ts_key(ts)), _ts_key(ts))

            lines: list[str] = []
            for channel_id in sorted(first_seen, key=lambda cid: first_seen[cid]):
                lines.append(channels.get(channel_id, channel_id))
                here = [m for m in stored if m.channel == channel_id]
                tops = [
                    m for m in here if m.thread_ts is None or (channel_id, m.thread_ts) not in self._messages
                ]
                entries: list[tuple[tuple[int, int], list[str]]] = []
                for m in tops:
                    block = self._render_message(m, names, channels, with_times, indent="  ")
                    for reply in (r for r in here if r.thread_ts == m.ts and r is not m):
                        block += self._render_message(
                            reply, names, channels, with_times, indent="      ", prefix="thread reply: "
                        )
                    entries.append((_ts_key(m.ts), block))
                for e in self._ephemerals:
                    if e.channel == channel_id:
                        who = names.get(e.user, e.user)
                        head = _time_prefix(e.ts, with_times) + f"(only @{who} sees) @{self.bot_name}: "
                        body = _render_body(e.text, e.blocks, [], names, channels)
                        entries.append((_ts_key(e.ts), _render_lines("  ", head, body, e.mentions, names)))
                for _, block in sorted(entries, key=lambda entry: entry[0]):
                    lines.extend(block)
            return lines

    def _render_message(
        self,
        m: _StoredMessage,
        names: Mapping[str, str],
        channels: Mapping[str, str],
        with_times: bool,
        *,
        indent: str,
        prefix: str = "",
    ) -> list[str]:
        data = m.data
        user = str(data.get("user", "?"))
        custom = data.get("username") if data.get("bot_id") else None
        author = custom if isinstance(custom, str) and custom else names.get(user, user)
        notes = []
        if m.edits:
            notes.append("edited" if m.edits == 1 else f"edited {m.edits}x")
        if data.get("subtype") == "thread_broadcast":
            notes.append("also sent to the channel")
        if m.thread_ts is not None and (m.channel, m.thread_ts) not in self._messages:
            notes.append(f"reply in a thread whose parent {m.thread_ts} is unknown")
        note = f" ({', '.join(notes)})" if notes else ""
        text, blocks = str(data.get("text", "")), _blocks_of(data)
        body = _render_body(text, blocks, _files_of(data), names, channels)
        head = _time_prefix(m.ts, with_times) + prefix + f"@{author}{note}: "
        return _render_lines(indent, head, body, _mentions(text, blocks), names)

    def _transcript_channel_name(self, channel_id: str, names: Mapping[str, str]) -> str:
        channel = self._channels.get(channel_id)
        if channel is None:
            return channel_id
        if channel.is_im and channel.user is not None:
            return f"DM with @{names.get(channel.user, channel.user)} ({channel_id})"
        if channel.is_mpim:
            return f"group DM {channel.name} ({channel_id})"
        return f"#{channel.name}"

    # ----------------------------------------------------------------------------------------
    # HTTP dispatch (called on the server's threads)

    def _handle(self, verb: str, raw_path: str, headers: dict[str, str], body: bytes) -> _Reply:
        parsed = urllib.parse.urlsplit(raw_path)
        path = parsed.path
        lower_headers = {k.lower(): v for k, v in headers.items()}
        if path.startswith("/api/"):
            method = path[len("/api/") :]
        elif path.startswith("/upload/v1/"):
            method = UPLOAD_URL_METHOD
        elif path.startswith("/hooks/"):
            method = RESPONSE_URL_METHOD
        elif path.startswith("/files/") and verb == "GET":
            return self._serve_file(path[len("/files/") :])
        else:
            return _Reply.of_text("Not Found", status=404)

        params: JSON = {}
        token: str | None = None
        try:
            if method == UPLOAD_URL_METHOD:
                params = {}
            elif method == RESPONSE_URL_METHOD:
                params = _parse_body(parsed.query, lower_headers, body, json_only=True)
            else:
                params = _parse_body(parsed.query, lower_headers, body)
                token = _bearer(lower_headers.get("authorization")) or _opt_str(params.get("token"))
        except _SlackError as error:
            bad = (
                _Reply.of_text("invalid_payload", status=400)
                if method == RESPONSE_URL_METHOD
                else _error_reply(error)
            )
            return self._record(method, params, headers, token, bad)

        delay = self._take_delay(method)
        if delay:
            self._stopping.wait(delay)
        fault = self._take_fault(method)
        if fault is not None:
            if fault.status == 0:
                reply = _Reply(status=0, body=b"", drop=True)
            elif fault.status == 429:
                retry = [("Retry-After", str(fault.retry_after if fault.retry_after is not None else 1))]
                reply = _Reply.of_json({"ok": False, "error": "ratelimited"}, status=429, headers=retry)
            else:
                reply = _Reply.of_json({"ok": False, "error": fault.error}, status=fault.status)
            return self._record(method, params, headers, token, reply)

        try:
            with self._lock:
                if method == UPLOAD_URL_METHOD:
                    reply, params = self._receive_upload(path[len("/upload/v1/") :], lower_headers, body)
                elif method == RESPONSE_URL_METHOD:
                    reply = self._receive_response_url(path, params)
                else:
                    reply = self._api(method, params, token)
        except Exception:
            self.internal_errors.append(traceback.format_exc())
            reply = _Reply.of_json({"ok": False, "error": "fatal_error"}, status=500)
        return self._record(method, params, headers, token, reply)

    def _record(
        self, method: str, params: JSON, headers: dict[str, str], token: str | None, reply: _Reply
    ) -> _Reply:
        call = Call(
            method=method,
            params=params,
            headers=dict(headers),
            timestamp=time.time(),
            token=token,
            status=reply.status,
            response=reply.json_body,
        )
        with self._changed:
            self._calls.append(call)
            self._changed.notify_all()
        return reply

    def _take_delay(self, method: str) -> float:
        with self._lock:
            for delay in self._delays:
                if delay.method in (method, ANY_METHOD):
                    delay.remaining -= 1
                    if delay.remaining <= 0:
                        self._delays.remove(delay)
                    return delay.seconds
        return 0.0

    def _take_fault(self, method: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method in (method, ANY_METHOD):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _api(self, method: str, params: JSON, token: str | None) -> _Reply:
        handler = self._methods.get(method)
        if handler is None:
            return _Reply.of_json({"ok": False, "error": "unknown_method", "req_method": method})
        if not token:
            return _Reply.of_json({"ok": False, "error": "not_authed"})
        if self._tokens is not None and token not in self._tokens:
            return _Reply.of_json({"ok": False, "error": "invalid_auth"})
        if self._limits:
            channel = _opt_str(params.get("channel"))
            if method == "chat.postMessage" and channel is not None:
                channel = self._resolve_channel(channel, open_dm=False) or channel
            wait = self._limiter.check(method, channel)
            if wait is not None:
                return _Reply.of_json(
                    {"ok": False, "error": "ratelimited"}, status=429, headers=[("Retry-After", str(wait))]
                )
        try:
            return _Reply.of_json({"ok": True, **handler(params)})
        except _SlackError as error:
            return _error_reply(error)

    # ----------------------------------------------------------------------------------------
    # Web API methods (called with the lock held)

    def _auth_test(self, params: JSON) -> JSON:
        return {
            "url": f"https://{self.team_domain}.slack.com/",
            "team": self.team_name,
            "user": self.bot_name,
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _chat_post_message(self, params: JSON) -> JSON:
        channel_id = self._postable_channel(params)
        text, blocks, attachments = self._message_content(params, for_update=False)
        if len(text) > MAX_MESSAGE_TEXT:
            text = text[:MAX_MESSAGE_TEXT]
        ts = self._next_ts()
        data = self._bot_message(text, blocks or [], attachments or [], ts)
        for name in ("username", "icon_emoji", "icon_url"):
            if _opt_str(params.get(name)):
                data[name] = params[name]
        metadata = _json_param(params, "metadata", "invalid_metadata_format")
        if metadata is not None:
            data["metadata"] = metadata
        thread_ts = _opt_str(params.get("thread_ts"))
        if thread_ts:
            data["thread_ts"] = self._thread_root(channel_id, thread_ts)
            if _truthy(params.get("reply_broadcast")):
                data["subtype"] = "thread_broadcast"
        self._store_message(channel_id, data)
        return {"channel": channel_id, "ts": ts, "message": copy.deepcopy(data)}

    def _chat_update(self, params: JSON) -> JSON:
        channel_id = self._existing_channel(params.get("channel"))
        ts = _opt_str(params.get("ts"))
        stored = self._messages.get((channel_id, ts or ""))
        if ts is None or stored is None or stored.deleted:
            raise _SlackError("message_not_found")
        if stored.data.get("bot_id") != self.bot_id:
            raise _SlackError("cant_update_message")
        text, blocks, attachments = self._message_content(params, for_update=True)
        if len(text) > MAX_MESSAGE_TEXT:
            raise _SlackError("msg_too_long")
        self._apply_edit(stored, text=_opt_str(params.get("text")), blocks=blocks, attachments=attachments)
        return {
            "channel": channel_id,
            "ts": ts,
            "text": stored.data.get("text", ""),
            "message": copy.deepcopy(stored.data),
        }

    def _chat_post_ephemeral(self, params: JSON) -> JSON:
        channel_id = self._postable_channel(params)
        user_id = _opt_str(params.get("user"))
        if not user_id or user_id not in self._users:
            raise _SlackError("user_not_in_channel")
        text, blocks, attachments = self._message_content(params, for_update=False)
        if len(text) > MAX_MESSAGE_TEXT:
            raise _SlackError("msg_too_long")
        ts = self._next_ts()
        data = self._bot_message(text, blocks or [], attachments or [], ts)
        thread_ts = _opt_str(params.get("thread_ts"))
        if thread_ts:
            data["thread_ts"] = thread_ts
        self._ephemerals.append(Ephemeral(channel_id, user_id, ts, text, _blocks_of(data), thread_ts, data))
        return {"message_ts": ts}

    def _chat_get_permalink(self, params: JSON) -> JSON:
        channel_id = self._existing_channel(params.get("channel"))
        ts = _opt_str(params.get("message_ts"))
        stored = self._messages.get((channel_id, ts or ""))
        if ts is None or stored is None or stored.deleted:
            raise _SlackError("message_not_found")
        link = f"https://{self.team_domain}.slack.com/archives/{channel_id}/p{ts.replace('.', '')}"
        if stored.thread_ts is not None:
            link += f"?thread_ts={stored.thread_ts}&cid={channel_id}"
        return {"channel": channel_id, "permalink": link}

    def _conversations_history(self, params: JSON) -> JSON:
        """A channel's top-level messages (and thread broadcasts), newest first, paged by ``limit``
        and ``cursor``, within ``oldest``/``latest`` (``inclusive``); message metadata only with
        ``include_all_metadata``, as Slack does."""
        channel_id = self._readable_channel(params)
        stored = [
            m
            for m in self._messages.values()
            if m.channel == channel_id
            and not m.deleted
            and (m.thread_ts is None or m.data.get("subtype") == "thread_broadcast")
        ]
        stored.sort(key=lambda m: _ts_key(m.ts), reverse=True)
        return self._message_page(self._within(stored, params), params)

    def _conversations_replies(self, params: JSON) -> JSON:
        """A thread: its parent first, then its replies oldest first (paged as history)."""
        channel_id = self._readable_channel(params)
        ts = _opt_str(params.get("ts"))
        parent = self._messages.get((channel_id, ts or ""))
        if ts is None or parent is None or parent.deleted:
            raise _SlackError("thread_not_found")
        root = parent.thread_ts or ts
        stored = [
            m
            for m in self._messages.values()
            if m.channel == channel_id and not m.deleted and (m.ts == root or m.thread_ts == root)
        ]
        stored.sort(key=lambda m: _ts_key(m.ts))
        return self._message_page(self._within(stored, params), params)

    def _readable_channel(self, params: JSON) -> str:
        """The channel a history read names: by id only (Slack takes no names here), the app a member."""
        channel_id = _opt_str(params.get("channel"))
        channel = self._channels.get(channel_id or "")
        if channel is None:
            raise _SlackError("channel_not_found")
        if not (channel.is_member or channel.is_im or channel.is_mpim):
            raise _SlackError("not_in_channel")
        return channel.id

    def _within(self, stored: list[_StoredMessage], params: JSON) -> list[_StoredMessage]:
        inclusive = _truthy(params.get("inclusive"))
        oldest = _opt_str(params.get("oldest"))
        latest = _opt_str(params.get("latest"))

        def keep(message: _StoredMessage) -> bool:
            key = _ts_key(message.ts)
            if oldest and (key < _ts_key(oldest) or (key == _ts_key(oldest) and not inclusive)):
                return False
            return not (latest and (key > _ts_key(latest) or (key == _ts_key(latest) and not inclusive)))

        return [m for m in stored if keep(m)]

    def _message_page(self, stored: list[_StoredMessage], params: JSON) -> JSON:
        try:
            limit = max(1, min(999, int(params.get("limit") or 100)))
        except (TypeError, ValueError) as error:
            raise _SlackError("invalid_limit") from error
        cursor = _opt_str(params.get("cursor"))
        try:
            start = int(base64.b64decode(cursor).decode().removeprefix("offset:")) if cursor else 0
        except ValueError as error:
            raise _SlackError("invalid_cursor") from error
        page = stored[start : start + limit]
        metadata = _truthy(params.get("include_all_metadata"))
        messages = []
        for message in page:
            data = copy.deepcopy(message.data)
            if not metadata:
                data.pop("metadata", None)
            messages.append(data)
        more = start + limit < len(stored)
        next_cursor = base64.b64encode(f"offset:{start + limit}".encode()).decode() if more else ""
        return {
            "messages": messages,
            "has_more": more,
            "pin_count": 0,
            "response_metadata": {"next_cursor": next_cursor},
        }

    def _conversations_open(self, params: JSON) -> JSON:
        users_param = params.get("users")
        channel_param = _opt_str(params.get("channel"))
        if not users_param:
            if channel_param is None:
                raise _SlackError("users_list_not_supplied")
            known = self._channels.get(channel_param)
            if known is None or not (known.is_im or known.is_mpim):
                raise _SlackError("channel_not_found")
            return {
                "no_op": True,
                "already_open": True,
                "channel": self._im_object(known, full=_truthy(params.get("return_im"))),
            }
        user_ids = [
            u.strip()
            for u in (users_param if isinstance(users_param, list) else str(users_param).split(","))
            if u.strip()
        ]
        if not user_ids:
            raise _SlackError("users_list_not_supplied")
        if len(user_ids) > 8:
            raise _SlackError("too_many_users")
        for user_id in user_ids:
            if user_id not in self._users:
                raise _SlackError("user_not_found")
        if len(user_ids) == 1:
            channel_id, existed = self._open_dm(user_ids[0])
        else:
            channel_id, existed = self._open_mpim(user_ids)
        channel = self._channels[channel_id]
        answer: JSON = {"channel": self._im_object(channel, full=_truthy(params.get("return_im")))}
        if existed:
            answer = {"no_op": True, "already_open": True, **answer}
        return answer

    def _users_info(self, params: JSON) -> JSON:
        user = self._users.get(_opt_str(params.get("user")) or "")
        if user is None:
            raise _SlackError("user_not_found")
        offset, label = self._tz_info(user)
        profile: JSON = {
            "title": "",
            "phone": "",
            "skype": "",
            "real_name": user.real_name,
            "real_name_normalized": user.real_name,
            "display_name": user.display_name,
            "display_name_normalized": user.display_name,
            "fields": None,
            "status_text": "",
            "status_emoji": "",
            "status_expiration": 0,
            "avatar_hash": hashlib.sha1(user.id.encode()).hexdigest()[:12],
            "first_name": user.real_name.split(" ")[0] if user.real_name else "",
            "last_name": " ".join(user.real_name.split(" ")[1:]),
            "team": self.team_id,
        }
        if user.email:
            profile["email"] = user.email
        if user.is_bot:
            profile.update({"bot_id": self.bot_id, "api_app_id": self.app_id, "always_active": True})
        answer: JSON = {
            "id": user.id,
            "team_id": self.team_id,
            "name": user.username,
            "deleted": False,
            "color": hashlib.sha1(user.id.encode()).hexdigest()[:6],
            "real_name": user.real_name,
            "tz": user.tz,
            "tz_label": label,
            "tz_offset": offset,
            "profile": profile,
            "is_admin": user.is_admin,
            "is_owner": False,
            "is_primary_owner": False,
            "is_restricted": False,
            "is_ultra_restricted": False,
            "is_bot": user.is_bot,
            "is_app_user": False,
            "updated": 1700000000,
            "is_email_confirmed": bool(user.email),
            "who_can_share_contact_card": "EVERYONE",
        }
        if _truthy(params.get("include_locale")):
            answer["locale"] = "en-US"
        return {"user": answer}

    def _views_open(self, params: JSON) -> JSON:
        user_id = self._exchange_trigger(params)
        spec = self._view_spec(params, kinds=("modal",))
        view = self._build_view(spec, self._new_view_id(), previous=None, root=None)
        self._views[view["id"]] = view
        self._view_owner[view["id"]] = user_id
        return {"view": copy.deepcopy(view)}

    def _views_push(self, params: JSON) -> JSON:
        user_id = self._exchange_trigger(params)
        spec = self._view_spec(params, kinds=("modal",))
        stack = [
            vid
            for vid, owner in self._view_owner.items()
            if owner == user_id and self._views[vid]["type"] == "modal"
        ]
        previous = stack[-1] if stack else None
        root = self._views[previous]["root_view_id"] if previous else None
        view = self._build_view(spec, self._new_view_id(), previous=previous, root=root)
        self._views[view["id"]] = view
        self._view_owner[view["id"]] = user_id
        return {"view": copy.deepcopy(view)}

    def _views_update(self, params: JSON) -> JSON:
        view_id = _opt_str(params.get("view_id"))
        external_id = _opt_str(params.get("external_id"))
        if view_id is None and external_id is None:
            raise _SlackError("invalid_arguments", response_metadata={"messages": ["invalid `view_id`"]})
        current = self._views.get(view_id) if view_id is not None else None
        if current is None and external_id is not None:
            current = next((v for v in self._views.values() if v.get("external_id") == external_id), None)
        if current is None:
            raise _SlackError("not_found")
        given_hash = _opt_str(params.get("hash"))
        if given_hash is not None and given_hash != current["hash"]:
            raise _SlackError("hash_conflict")
        spec = self._view_spec(params, kinds=(str(current["type"]),))
        view = self._build_view(
            spec, current["id"], previous=current.get("previous_view_id"), root=current.get("root_view_id")
        )
        self._views[view["id"]] = view
        return {"view": copy.deepcopy(view)}

    def _views_publish(self, params: JSON) -> JSON:
        user_id = _opt_str(params.get("user_id"))
        if not user_id or user_id not in self._users:
            raise _SlackError("invalid_arguments", response_metadata={"messages": ["invalid `user_id`"]})
        current_id = self._home_views.get(user_id)
        given_hash = _opt_str(params.get("hash"))
        if (
            current_id is not None
            and given_hash is not None
            and given_hash != self._views[current_id]["hash"]
        ):
            raise _SlackError("hash_conflict")
        spec = self._view_spec(params, kinds=("home",))
        view = self._build_view(spec, current_id or self._new_view_id(), previous=None, root=None)
        self._views[view["id"]] = view
        self._view_owner[view["id"]] = user_id
        self._home_views[user_id] = view["id"]
        return {"view": copy.deepcopy(view)}

    def _files_get_upload_url_external(self, params: JSON) -> JSON:
        filename = _opt_str(params.get("filename"))
        length = _opt_str(params.get("length"))
        if not filename or length is None:
            raise _SlackError("missing_argument")
        try:
            size = int(length)
        except ValueError:
            raise _SlackError("invalid_arguments") from None
        file_id = f"F{self._serial_id(10)}"
        ticket = f"{self._serial_id(24)}"
        upload = _Upload(
            file_id=file_id,
            filename=filename,
            length=size,
            ticket=ticket,
            alt_txt=_opt_str(params.get("alt_txt")),
            snippet_type=_opt_str(params.get("snippet_type")),
        )
        self._uploads[file_id] = upload
        self._tickets[ticket] = file_id
        return {"upload_url": f"{self.url}upload/v1/{ticket}", "file_id": file_id}

    def _files_complete_upload_external(self, params: JSON) -> JSON:
        files = _json_param(params, "files", "invalid_arguments")
        if (
            not isinstance(files, list)
            or not files
            or not all(isinstance(f, dict) and f.get("id") for f in files)
        ):
            raise _SlackError("invalid_arguments", response_metadata={"messages": ["invalid `files`"]})
        uploads: list[tuple[_Upload, JSON]] = []
        for item in files:
            upload = self._uploads.get(str(item["id"]))
            if upload is None or upload.content is None or upload.completed:
                raise _SlackError("file_not_found")
            uploads.append((upload, item))
        targets: list[str] = []
        channel_id = _opt_str(params.get("channel_id"))
        channels = _opt_str(params.get("channels"))
        for candidate in ([channel_id] if channel_id else []) + (channels.split(",") if channels else []):
            resolved = self._postable_channel({"channel": candidate.strip()})
            if resolved not in targets:
                targets.append(resolved)
        thread_ts = _opt_str(params.get("thread_ts"))
        comment = _opt_str(params.get("initial_comment")) or ""
        now = int(self._now())
        file_objects: list[JSON] = []
        for upload, item in uploads:
            upload.title = _opt_str(item.get("title")) or upload.filename
            upload.completed = True
            upload.channels = list(targets)
            mimetype = mimetypes.guess_type(upload.filename)[0] or "application/octet-stream"
            upload.data = {
                "id": upload.file_id,
                "created": now,
                "timestamp": now,
                "name": upload.filename,
                "title": upload.title,
                "mimetype": mimetype,
                "filetype": upload.filename.rsplit(".", 1)[-1].lower()
                if "." in upload.filename
                else "binary",
                "pretty_type": mimetype.split("/")[-1].upper(),
                "user": self.bot_user_id,
                "user_team": self.team_id,
                "size": len(upload.content or b""),
                "is_external": False,
                "is_public": any(
                    not self._channels[c].is_im and not self._channels[c].is_mpim for c in targets
                ),
                "url_private": f"{self.url}files/{upload.file_id}",
                "url_private_download": f"{self.url}files/{upload.file_id}",
                "permalink": f"https://{self.team_domain}.slack.com/files/{self.bot_user_id}/{upload.file_id}/{upload.filename}",
                "channels": [c for c in targets if not self._channels[c].is_im],
                "ims": [c for c in targets if self._channels[c].is_im],
            }
            if upload.alt_txt:
                upload.data["alt_txt"] = upload.alt_txt
            file_objects.append(upload.data)
        for target in targets:
            ts = self._next_ts()
            data: JSON = {
                "type": "message",
                "text": comment,
                "files": copy.deepcopy(file_objects),
                "upload": True,
                "user": self.bot_user_id,
                "bot_id": self.bot_id,
                "app_id": self.app_id,
                "display_as_bot": False,
                "ts": ts,
                "team": self.team_id,
            }
            if thread_ts:
                data["thread_ts"] = self._thread_root(target, thread_ts)
            self._store_message(target, data)
        return {"files": [{"id": upload.file_id, "title": upload.title} for upload, _ in uploads]}

    # ----------------------------------------------------------------------------------------
    # Upload URL, response_url, file downloads (called with the lock held)

    def _receive_upload(self, ticket: str, headers: Mapping[str, str], body: bytes) -> tuple[_Reply, JSON]:
        file_id = self._tickets.get(ticket)
        if file_id is None:
            return _Reply.of_text("Not Found", status=404), {"ticket": ticket}
        content = body
        ctype = headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            parts = _parse_multipart(ctype, body)
            chosen = parts.get("file") or next((v for v in parts.values() if isinstance(v, bytes)), None)
            if isinstance(chosen, bytes):
                content = chosen
            elif isinstance(chosen, str):
                content = chosen.encode()
        upload = self._uploads[file_id]
        upload.content = content
        return _Reply.of_text(f"OK - {len(content)}"), {"file_id": file_id, "length": len(content)}

    def _receive_response_url(self, path: str, params: JSON) -> _Reply:
        hook = self._hooks.get(path)
        if hook is None:
            return _Reply.of_text("invalid_token", status=404)
        text = _opt_str(params.get("text")) or ""
        raw_blocks = params.get("blocks")
        blocks = _with_block_ids(raw_blocks, self) if isinstance(raw_blocks, list) else None
        raw_attachments = params.get("attachments")
        attachments = list(raw_attachments) if isinstance(raw_attachments, list) else None
        original = self._messages.get((hook.channel, hook.message_ts or ""))
        if _truthy(params.get("delete_original")):
            if original is None or original.deleted:
                return _Reply.of_text("message_not_found", status=404)
            original.deleted = True
            return _Reply.of_text("ok")
        if _truthy(params.get("replace_original")) and original is not None and not original.deleted:
            self._apply_edit(original, text=text or None, blocks=blocks, attachments=attachments)
            return _Reply.of_text("ok")
        if not text and not blocks and not attachments:
            return _Reply.of_text("no_text", status=400)
        ts = self._next_ts()
        data = self._bot_message(text, blocks or [], attachments or [], ts)
        thread_ts = _opt_str(params.get("thread_ts"))
        if params.get("response_type") == "in_channel":
            if thread_ts:
                data["thread_ts"] = self._thread_root(hook.channel, thread_ts)
            self._store_message(hook.channel, data)
        else:
            self._ephemerals.append(
                Ephemeral(hook.channel, hook.user, ts, text, _blocks_of(data), thread_ts, data)
            )
        return _Reply.of_text("ok")

    def _serve_file(self, file_id: str) -> _Reply:
        with self._lock:
            upload = self._uploads.get(file_id)
            if upload is None or not upload.completed:
                return _Reply.of_text("Not Found", status=404)
            mimetype = mimetypes.guess_type(upload.filename)[0] or "application/octet-stream"
            return _Reply(status=200, body=upload.content or b"", headers=[("Content-Type", mimetype)])

    # ----------------------------------------------------------------------------------------
    # Helpers (lock held)

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.time()

    def _next_ts(self) -> str:
        with self._lock:
            if self._clock is None:
                now_us = self._last_ts_us + 100 if self._last_ts_us else 1_700_000_000_000_100
            else:
                now_us = max(int(self._clock() * 1_000_000), self._last_ts_us + 1)
            self._last_ts_us = now_us
            return f"{now_us // 1_000_000}.{now_us % 1_000_000:06d}"

    def _serial_id(self, width: int) -> str:
        with self._lock:
            self._serial += 1
            digest = hashlib.sha256(f"{self.team_id}:{self._serial}".encode()).hexdigest().upper()
            return f"{self._serial:04X}{digest}"[:width]

    def _uuid(self) -> str:
        raw = hashlib.sha256(f"uuid:{self._serial_id(12)}".encode()).hexdigest()
        return f"{raw[:8]}-{raw[8:12]}-4{raw[13:16]}-a{raw[17:20]}-{raw[20:32]}"

    def _block_id(self) -> str:
        digest = hashlib.sha256(self._serial_id(16).encode()).digest()
        return "".join(_BLOCK_ID_ALPHABET[b % len(_BLOCK_ID_ALPHABET)] for b in digest[:5])

    def _new_view_id(self) -> str:
        return f"V{self._serial_id(10)}"

    def _view_hash(self) -> str:
        return f"{int(self._now())}.{self._serial_id(8).lower()}"

    def _issue_trigger(self, user_id: str) -> str:
        with self._lock:
            serial = self._serial_id(32).lower()
            team_digits = int(hashlib.sha256(self.team_id.encode()).hexdigest()[:8], 16) % 10**10
            trigger = f"{int(self._now() * 1000)}.{team_digits:010d}.{serial}"
            self._triggers[trigger] = _Trigger(user_id)
            return trigger

    def _exchange_trigger(self, params: JSON) -> str:
        trigger_id = _opt_str(params.get("trigger_id")) or _opt_str(params.get("interactivity_pointer"))
        if not trigger_id:
            raise _SlackError("invalid_arguments", response_metadata={"messages": ["invalid `trigger_id`"]})
        known = self._triggers.get(trigger_id)
        if known is None:
            if self._strict_triggers:
                raise _SlackError("invalid_trigger_id")
            return ""
        if known.used:
            raise _SlackError("exchanged_trigger_id")
        known.used = True
        return known.user

    def _new_hook(self, kind: str, channel_id: str, user_id: str, message_ts: str | None) -> str:
        with self._lock:
            path = f"/hooks/{kind}/{self.team_id}/{self._serial_id(13)}/{self._serial_id(24).lower()}"
            self._hooks[path] = _Hook(kind, channel_id, user_id, message_ts)
            return self.url.rstrip("/") + path

    def _username(self, user_id: str) -> str:
        user = self._users.get(user_id)
        return user.username if user is not None else user_id.lower()

    def _payload_user(self, user_id: str) -> JSON:
        name = self._username(user_id)
        return {"id": user_id, "username": name, "name": name, "team_id": self.team_id}

    def _payload_channel_name(self, channel_id: str) -> str:
        channel = self._channels.get(channel_id)
        if channel is None:
            return channel_id
        if channel.is_im:
            return "directmessage"
        return channel.name

    def _channel_type(self, channel_id: str) -> str:
        channel = self._channels.get(channel_id)
        if channel is not None and channel.is_im:
            return "im"
        if channel is not None and channel.is_mpim:
            return "mpim"
        return "channel"

    def _resolve_channel(self, channel: str, *, open_dm: bool) -> str | None:
        if channel in self._channels:
            return channel
        name = channel.lstrip("#")
        for known in self._channels.values():
            if not known.is_im and known.name == name:
                return known.id
        if channel in self._users and channel != self.bot_user_id:
            existing = self._dm_of(channel)
            if existing is not None:
                return existing
            return self._open_dm(channel)[0] if open_dm else None
        return None

    def _dm_of(self, user_id: str) -> str | None:
        return next((c.id for c in self._channels.values() if c.is_im and c.user == user_id), None)

    def _open_dm(self, user_id: str) -> tuple[str, bool]:
        existing = self._dm_of(user_id)
        if existing is not None:
            return existing, True
        channel_id = f"D{self._serial_id(10)}"
        self._channels[channel_id] = _Channel(channel_id, user_id, is_im=True, user=user_id)
        return channel_id, False

    def _open_mpim(self, user_ids: list[str]) -> tuple[str, bool]:
        members = sorted({*user_ids, self.bot_user_id})
        name = "mpdm-" + "--".join(self._username(u) for u in members) + "-1"
        for known in self._channels.values():
            if known.is_mpim and known.name == name:
                return known.id, True
        channel_id = f"G{self._serial_id(10)}"
        self._channels[channel_id] = _Channel(channel_id, name, is_mpim=True)
        return channel_id, False

    def _im_object(self, channel: _Channel, *, full: bool) -> JSON:
        if not full:
            return {"id": channel.id}
        return {
            "id": channel.id,
            "created": int(self._now()),
            "is_im": channel.is_im,
            "is_org_shared": False,
            "user": channel.user,
            "last_read": "0000000000.000000",
            "latest": None,
            "unread_count": 0,
            "unread_count_display": 0,
            "is_open": True,
            "priority": 0,
        }

    def _existing_channel(self, value: Any) -> str:
        channel = _opt_str(value)
        resolved = self._resolve_channel(channel, open_dm=True) if channel else None
        if resolved is None:
            raise _SlackError("channel_not_found")
        return resolved

    def _postable_channel(self, params: JSON) -> str:
        channel_id = self._existing_channel(params.get("channel"))
        channel = self._channels[channel_id]
        if channel.is_archived:
            raise _SlackError("is_archived")
        if not channel.is_member:
            raise _SlackError("not_in_channel")
        return channel_id

    def _message_content(
        self, params: JSON, *, for_update: bool
    ) -> tuple[str, list[JSON] | None, list[JSON] | None]:
        """Text, blocks (with block ids) and attachments of a chat.* call; blocks/attachments
        are None when not given (chat.update keeps the old ones then)."""
        text = _opt_str(params.get("text")) or _opt_str(params.get("markdown_text")) or ""
        blocks_value = _json_param(params, "blocks", "invalid_blocks_format")
        attachments_value = _json_param(params, "attachments", "invalid_attachments")
        if blocks_value is not None and not isinstance(blocks_value, list):
            raise _SlackError("invalid_blocks_format")
        if attachments_value is not None and not isinstance(attachments_value, list):
            raise _SlackError("invalid_attachments")
        problems = _block_problems(list(blocks_value or []), "/blocks", MAX_MESSAGE_BLOCKS)
        if problems:
            raise _SlackError("invalid_blocks", response_metadata={"messages": problems})
        if not for_update and not text and not blocks_value and not attachments_value:
            raise _SlackError("no_text")
        if for_update and params.get("text") is None and blocks_value is None and attachments_value is None:
            raise _SlackError("no_text")
        blocks = None if blocks_value is None else _with_block_ids(list(blocks_value), self)
        attachments = None if attachments_value is None else list(attachments_value)
        return text, blocks, attachments

    def _bot_message(self, text: str, blocks: list[JSON], attachments: list[JSON], ts: str) -> JSON:
        data: JSON = {
            "user": self.bot_user_id,
            "type": "message",
            "ts": ts,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "text": text,
            "team": self.team_id,
            "bot_profile": {
                "id": self.bot_id,
                "app_id": self.app_id,
                "name": self.bot_name,
                "icons": {},
                "deleted": False,
                "updated": 1700000000,
                "team_id": self.team_id,
            },
        }
        if blocks:
            data["blocks"] = blocks
        if attachments:
            data["attachments"] = attachments
        return data

    def _thread_root(self, channel_id: str, thread_ts: str) -> str:
        """Slack threads a reply to a reply under the parent."""
        stored = self._messages.get((channel_id, thread_ts))
        if stored is not None and stored.thread_ts is not None:
            return stored.thread_ts
        return thread_ts

    def _store_message(self, channel_id: str, data: JSON) -> None:
        stored = _StoredMessage(channel_id, data)
        self._messages[(channel_id, stored.ts)] = stored
        parent_ts = stored.thread_ts
        parent = self._messages.get((channel_id, parent_ts)) if parent_ts else None
        if parent is not None:
            replies = [
                m for m in self._messages.values() if m.channel == channel_id and m.thread_ts == parent_ts
            ]
            authors: list[str] = []
            for reply in replies:
                author = str(reply.data.get("user", ""))
                if author and author not in authors:
                    authors.append(author)
            parent.data.update(
                {
                    "thread_ts": parent.ts,
                    "reply_count": len(replies),
                    "reply_users_count": len(authors),
                    "latest_reply": max((r.ts for r in replies), key=_ts_key),
                    "reply_users": authors,
                }
            )

    def _apply_edit(
        self,
        stored: _StoredMessage,
        *,
        text: str | None,
        blocks: list[JSON] | None,
        attachments: list[JSON] | None,
    ) -> None:
        """chat.update semantics: text replaced when given; blocks and attachments kept unless
        given (an empty list removes them)."""
        stored.previous_texts.append(
            _blocks_summary(_blocks_of(stored.data)) or str(stored.data.get("text", ""))
        )
        if text is not None:
            stored.data["text"] = text
        for key, value in (("blocks", blocks), ("attachments", attachments)):
            if value is None:
                continue
            if value:
                stored.data[key] = value
            else:
                stored.data.pop(key, None)
        stored.data["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        stored.edits += 1

    def _view_spec(self, params: JSON, *, kinds: tuple[str, ...]) -> JSON:
        spec = _json_param(params, "view", "invalid_arguments")
        if not isinstance(spec, dict):
            raise _SlackError(
                "invalid_arguments", response_metadata={"messages": ["[ERROR] missing required field: view"]}
            )
        kind = spec.get("type")
        if kind not in kinds:
            raise _SlackError(
                "invalid_arguments",
                response_metadata={
                    "messages": [f"[ERROR] must be one of {list(kinds)} [json-pointer:/view/type]"]
                },
            )
        problems = []
        title = spec.get("title")
        if kind == "modal":
            if not isinstance(title, dict) or not isinstance(title.get("text"), str):
                problems.append("[ERROR] missing required field: title [json-pointer:/view]")
            elif len(title["text"]) > 24:
                problems.append("[ERROR] must be less than 25 characters [json-pointer:/view/title/text]")
            raw_blocks = spec.get("blocks")
            blocks_for_submit: list[Any] = raw_blocks if isinstance(raw_blocks, list) else []
            if any(
                isinstance(b, dict) and b.get("type") == "input" for b in blocks_for_submit
            ) and not spec.get("submit"):
                problems.append(
                    "[ERROR] submit is required when an input block is present [json-pointer:/view/submit]"
                )
        if len(str(spec.get("private_metadata", ""))) > 3000:
            problems.append("[ERROR] must be less than 3001 characters [json-pointer:/view/private_metadata]")
        if len(str(spec.get("callback_id", ""))) > 255:
            problems.append("[ERROR] must be less than 256 characters [json-pointer:/view/callback_id]")
        blocks = spec.get("blocks")
        if not isinstance(blocks, list):
            problems.append("[ERROR] missing required field: blocks [json-pointer:/view]")
        else:
            problems.extend(_block_problems(blocks, "/view/blocks", MAX_VIEW_BLOCKS))
        if problems:
            raise _SlackError("invalid_arguments", response_metadata={"messages": problems})
        external_id = spec.get("external_id")
        if external_id:
            clash = next((v for v in self._views.values() if v.get("external_id") == external_id), None)
            current = _opt_str(params.get("view_id"))
            if (
                clash is not None
                and clash["id"] != current
                and clash.get("external_id") != _opt_str(params.get("external_id"))
            ):
                raise _SlackError("duplicate_external_id")
        return spec

    def _build_view(self, spec: JSON, view_id: str, *, previous: str | None, root: str | None) -> JSON:
        return {
            "id": view_id,
            "team_id": self.team_id,
            "type": spec["type"],
            "blocks": _with_block_ids(list(spec.get("blocks", [])), self),
            "private_metadata": str(spec.get("private_metadata", "")),
            "callback_id": str(spec.get("callback_id", "")),
            "state": {"values": {}},
            "hash": self._view_hash(),
            "title": spec.get("title"),
            "clear_on_close": bool(spec.get("clear_on_close", False)),
            "notify_on_close": bool(spec.get("notify_on_close", False)),
            "close": spec.get("close"),
            "submit": spec.get("submit"),
            "previous_view_id": previous,
            "root_view_id": root or view_id,
            "app_id": self.app_id,
            "external_id": str(spec.get("external_id", "")),
            "app_installed_team_id": self.team_id,
            "bot_id": self.bot_id,
        }

    def _tz_info(self, user: SlackUser) -> tuple[int, str]:
        try:
            moment = datetime.fromtimestamp(self._now(), ZoneInfo(user.tz))
        except (ZoneInfoNotFoundError, ValueError):
            moment = datetime.fromtimestamp(self._now(), UTC)
        offset = user.tz_offset
        if offset is None:
            delta = moment.utcoffset()
            offset = int(delta.total_seconds()) if delta is not None else 0
        return offset, user.tz_label or moment.tzname() or user.tz

    # ----------------------------------------------------------------------------------------
    # Talking to the app

    def _post_to_app(
        self,
        url: str,
        body: bytes,
        content_type: str,
        extra_headers: Mapping[str, str],
        timeout: float,
    ) -> AppResponse:
        headers = {
            "Content-Type": content_type,
            "User-Agent": SLACKBOT_USER_AGENT,
            "Accept": "application/json,*/*",
            **self.sign(body),
            **extra_headers,
        }
        # No proxy from the environment: the app is on loopback.
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.post(url, content=body, headers=headers)
        return AppResponse(response.status_code, response.content.decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------------------------
# The HTTP server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's default of 5 drops concurrent connects (1 s SYN retries)

    def __init__(self, address: tuple[str, int], standin: SlackStandIn) -> None:
        super().__init__(address, _Handler)
        self.standin = standin


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "SlackStandIn/1.0"

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, verb: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = dict(self.headers.items())
        reply = self.server.standin._handle(verb, self.path, headers, body)
        if reply.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: every request is in `SlackStandIn.calls`."""


# --------------------------------------------------------------------------------------------
# Parsing


def _parse_body(query: str, headers: Mapping[str, str], body: bytes, *, json_only: bool = False) -> JSON:
    params: JSON = {k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
    if not body:
        return params
    ctype = headers.get("content-type", "").lower()
    if json_only or ctype.startswith("application/json"):
        try:
            loaded = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _SlackError("invalid_json") from None
        if not isinstance(loaded, dict):
            raise _SlackError("json_not_object")
        params.update(loaded)
    elif ctype.startswith("multipart/form-data"):
        params.update(_parse_multipart(headers.get("content-type", ""), body))
    else:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _SlackError("invalid_charset") from None
        params.update({k: v[-1] for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()})
    return params


def _parse_multipart(content_type: str, body: bytes) -> dict[str, str | bytes]:
    """Fields of a multipart/form-data body: text fields as str, file fields as bytes."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    fields: dict[str, str | bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        raw = payload if isinstance(payload, bytes) else b""
        fields[name] = raw if part.get_filename() is not None else raw.decode("utf-8", errors="replace")
    return fields


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return None


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)


def _json_param(params: JSON, name: str, error: str) -> Any:
    value = params.get(name)
    if isinstance(value, str):
        if not value:
            return None
        try:
            return json.loads(value)
        except ValueError:
            raise _SlackError(error) from None
    return value


def _error_reply(error: _SlackError) -> _Reply:
    return _Reply.of_json({"ok": False, "error": error.code, **error.extra})


# --------------------------------------------------------------------------------------------
# Blocks


def _block_problems(blocks: list[Any], pointer: str, max_blocks: int) -> list[str]:
    """Slack's Block Kit limits that bite in practice (a long customer post in a section...)."""
    problems: list[str] = []
    if len(blocks) > max_blocks:
        problems.append(f"[ERROR] no more than {max_blocks} items allowed [json-pointer:{pointer}]")
    for index, block in enumerate(blocks):
        here = f"{pointer}/{index}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            problems.append(f"[ERROR] missing required field: type [json-pointer:{here}]")
            continue
        kind = block["type"]
        if len(str(block.get("block_id", ""))) > 255:
            problems.append(f"[ERROR] must be less than 256 characters [json-pointer:{here}/block_id]")
        text = block.get("text")
        if kind == "section":
            fields = block.get("fields")
            if text is None and not fields:
                problems.append(f"[ERROR] must provide either text or fields [json-pointer:{here}]")
            if isinstance(text, dict) and len(str(text.get("text", ""))) > 3000:
                problems.append(f"[ERROR] must be less than 3001 characters [json-pointer:{here}/text/text]")
            if isinstance(fields, list):
                if len(fields) > 10:
                    problems.append(f"[ERROR] no more than 10 items allowed [json-pointer:{here}/fields]")
                for i, item in enumerate(fields):
                    if isinstance(item, dict) and len(str(item.get("text", ""))) > 2000:
                        problems.append(
                            f"[ERROR] must be less than 2001 characters [json-pointer:{here}/fields/{i}/text]"
                        )
        elif kind == "header":
            if not isinstance(text, dict) or text.get("type") != "plain_text":
                problems.append(f"[ERROR] must be a plain_text object [json-pointer:{here}/text]")
            elif len(str(text.get("text", ""))) > 150:
                problems.append(f"[ERROR] must be less than 151 characters [json-pointer:{here}/text/text]")
        elif kind == "context":
            elements = block.get("elements")
            if isinstance(elements, list) and len(elements) > 10:
                problems.append(f"[ERROR] no more than 10 items allowed [json-pointer:{here}/elements]")
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not elements:
                problems.append(f"[ERROR] missing required field: elements [json-pointer:{here}]")
            elif len(elements) > 25:
                problems.append(f"[ERROR] no more than 25 items allowed [json-pointer:{here}/elements]")
        for where, element in _elements_of(block, here):
            if element.get("type") == "button":
                label = element.get("text")
                if isinstance(label, dict) and len(str(label.get("text", ""))) > 75:
                    problems.append(
                        f"[ERROR] must be less than 76 characters [json-pointer:{where}/text/text]"
                    )
                if len(str(element.get("value", ""))) > 2000:
                    problems.append(f"[ERROR] must be less than 2001 characters [json-pointer:{where}/value]")
            if len(str(element.get("action_id", ""))) > 255:
                problems.append(f"[ERROR] must be less than 256 characters [json-pointer:{where}/action_id]")
    return problems


def _elements_of(block: JSON, pointer: str) -> list[tuple[str, JSON]]:
    found: list[tuple[str, JSON]] = []
    accessory = block.get("accessory")
    if isinstance(accessory, dict):
        found.append((f"{pointer}/accessory", accessory))
    element = block.get("element")
    if isinstance(element, dict):
        found.append((f"{pointer}/element", element))
    if block.get("type") == "actions" and isinstance(block.get("elements"), list):
        for i, item in enumerate(block["elements"]):
            if isinstance(item, dict):
                found.append((f"{pointer}/elements/{i}", item))
    return found


def _with_block_ids(blocks: list[JSON], standin: SlackStandIn) -> list[JSON]:
    """Slack gives every block without a ``block_id`` a generated one."""
    result = []
    for block in blocks:
        block = copy.deepcopy(block)
        if isinstance(block, dict) and "block_id" not in block:
            block["block_id"] = standin._block_id()
        result.append(block)
    return result


def _find_action(blocks: Any, action_id: str) -> tuple[str | None, JSON | None]:
    if not isinstance(blocks, list):
        return None, None
    for block in blocks:
        if not isinstance(block, dict):
            continue
        for _, element in _elements_of(block, ""):
            if element.get("action_id") == action_id:
                block_id = block.get("block_id")
                return (block_id if isinstance(block_id, str) else None), element
    return None, None


_SELECTED_KEYS = {
    "users_select": "selected_user",
    "conversations_select": "selected_conversation",
    "channels_select": "selected_channel",
    "datepicker": "selected_date",
    "timepicker": "selected_time",
}


def _option_with_value(element: JSON, value: str) -> JSON:
    """The option object with this value among an element's options (or option groups)."""
    options: list[Any] = list(element.get("options") or [])
    for group in element.get("option_groups") or []:
        if isinstance(group, dict):
            options.extend(group.get("options") or [])
    for option in options:
        if isinstance(option, dict) and option.get("value") == value:
            return copy.deepcopy(option)
    return {"text": {"type": "plain_text", "text": value, "emoji": True}, "value": value}


def _element_types(blocks: Any) -> dict[tuple[str, str], str]:
    types: dict[tuple[str, str], str] = {}
    if not isinstance(blocks, list):
        return types
    for block in blocks:
        if not isinstance(block, dict) or not isinstance(block.get("block_id"), str):
            continue
        for _, element in _elements_of(block, ""):
            if isinstance(element.get("action_id"), str) and isinstance(element.get("type"), str):
                types[(block["block_id"], element["action_id"])] = element["type"]
    return types


def _blocks_of(data: JSON) -> list[JSON]:
    blocks = data.get("blocks")
    return [b for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else []


def _files_of(data: JSON) -> list[JSON]:
    files = data.get("files")
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []


def _strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    return []


def _rich_text_users(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = (
            [value["user_id"]]
            if value.get("type") == "user" and isinstance(value.get("user_id"), str)
            else []
        )
        return found + [u for v in value.values() for u in _rich_text_users(v)]
    if isinstance(value, list):
        return [u for v in value for u in _rich_text_users(v)]
    return []


def _mentions(text: str, blocks: list[JSON]) -> tuple[str, ...]:
    found: list[str] = []
    for source in [text, *_strings_in(blocks)]:
        found.extend(_MENTION.findall(source))
    found.extend(_rich_text_users(blocks))
    return tuple(dict.fromkeys(found))


def _plain(obj: Any) -> str:
    if isinstance(obj, dict):
        if isinstance(obj.get("text"), str):
            return str(obj["text"])
        if isinstance(obj.get("text"), dict):
            return _plain(obj["text"])
    return ""


def _rich_text(value: Any) -> str:
    if isinstance(value, list):
        return "".join(_rich_text(v) for v in value)
    if not isinstance(value, dict):
        return ""
    kind = value.get("type")
    if kind == "text":
        return str(value.get("text", ""))
    if kind == "user":
        return f"<@{value.get('user_id', '')}>"
    if kind == "channel":
        return f"<#{value.get('channel_id', '')}>"
    if kind == "link":
        return str(value.get("text") or value.get("url", ""))
    if kind == "emoji":
        return f":{value.get('name', '')}:"
    if kind == "broadcast":
        return f"<!{value.get('range', 'here')}>"
    inner = _rich_text(value.get("elements", []))
    if kind in ("rich_text_section", "rich_text_preformatted", "rich_text_quote"):
        return inner + "\n"
    if kind == "rich_text_list":
        return "".join(f"- {_rich_text(item)}" for item in value.get("elements", []))
    return inner


def _element_summary(element: JSON) -> str:
    kind = str(element.get("type", ""))
    label = _plain(element.get("text")) or _plain(element.get("placeholder"))
    if kind == "button":
        return f"[{label or element.get('action_id', 'button')}]"
    if kind == "image":
        return f"[image: {element.get('alt_text', '')}]"
    if kind in ("mrkdwn", "plain_text"):
        return str(element.get("text", ""))
    return f"[{kind}{': ' + label if label else ''}]"


def _blocks_summary(blocks: list[JSON]) -> str:
    """What a person reads in the blocks, as plain lines."""
    lines: list[str] = []
    for block in blocks:
        kind = block.get("type")
        if kind in ("header", "section"):
            text = _plain(block.get("text"))
            if text:
                lines.append(text)
            fields = block.get("fields")
            if isinstance(fields, list) and fields:
                lines.append(" | ".join(_plain(f) for f in fields if isinstance(f, dict)))
            accessory = block.get("accessory")
            if isinstance(accessory, dict):
                lines.append(_element_summary(accessory))
        elif kind == "context" or kind == "actions":
            elements = block.get("elements", [])
            lines.append(" ".join(_element_summary(e) for e in elements if isinstance(e, dict)))
        elif kind == "divider":
            lines.append("---")
        elif kind == "image":
            lines.append(f"[image: {block.get('alt_text', '')}]")
        elif kind == "rich_text":
            lines.append(_rich_text(block.get("elements", [])).rstrip("\n"))
        elif kind == "input":
            element = block.get("element")
            shown = _element_summary(element) if isinstance(element, dict) else ""
            lines.append(f"{_plain(block.get('label'))}: {shown}".strip())
        elif isinstance(kind, str):
            lines.append(f"[{kind}]")
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------------------------
# Transcript rendering


def _ts_key(ts: str) -> tuple[int, int]:
    seconds, _, micros = ts.partition(".")
    try:
        return int(seconds), int(micros or 0)
    except ValueError:
        return 0, 0


def _time_prefix(ts: str, with_times: bool) -> str:
    if not with_times:
        return ""
    seconds, _ = _ts_key(ts)
    return datetime.fromtimestamp(seconds, UTC).strftime("[%H:%M:%S] ")


def _humanize(text: str, names: Mapping[str, str], channels: Mapping[str, str]) -> str:
    """Slack's ``<...>`` entities as a person reads them."""

    def entity(match: re.Match[str]) -> str:
        inner = match.group(1)
        target, _, label = inner.partition("|")
        if target.startswith("@"):
            return f"@{names.get(target[1:], label or target[1:])}"
        if target.startswith("#"):
            shown = channels.get(target[1:], "")
            return shown if shown.startswith("#") else f"#{label or shown or target[1:]}"
        if target.startswith("!subteam^"):
            return label or f"@{target[len('!subteam^') :]}"
        if target.startswith("!"):
            return f"@{label or target[1:]}"
        return f"{label} <{target}>" if label else target

    shown = _ENTITY.sub(entity, text)
    return shown.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _render_body(
    text: str,
    blocks: list[JSON],
    files: list[JSON],
    names: Mapping[str, str],
    channels: Mapping[str, str],
) -> list[str]:
    shown = _blocks_summary(blocks) or text
    lines = [_humanize(line, names, channels) for line in shown.split("\n")] if shown else []
    for item in files:
        lines.append(
            f'[file: {item.get("name", "?")} ({item.get("size", 0)} bytes) "{item.get("title", "")}"]'
        )
    return lines or ["(empty)"]


def _render_lines(
    indent: str, head: str, body: list[str], mentions: tuple[str, ...], names: Mapping[str, str]
) -> list[str]:
    pad = indent + " " * len(head)
    lines = [indent + head + body[0]] + [pad + line for line in body[1:]]
    if mentions:
        lines.append(pad + "mentions: " + ", ".join(f"@{names.get(uid, uid)} ({uid})" for uid in mentions))
    return lines


def _snapshot(stored: _StoredMessage) -> Message:
    data = copy.deepcopy(stored.data)
    return Message(
        channel=stored.channel,
        ts=stored.ts,
        text=str(data.get("text", "")),
        user=str(data.get("user", "")),
        blocks=_blocks_of(data),
        thread_ts=stored.thread_ts,
        edits=stored.edits,
        data=data,
        previous_texts=tuple(stored.previous_texts),
    )
