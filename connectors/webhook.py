"""The webhook channel: any system can push customer posts to replyclock as signed JSON.

A delivery is one JSON object POSTed to ``/hooks/<account>`` (see ``bot.web``), signed the
Standard Webhooks way (https://www.standardwebhooks.com/, the `standardwebhooks` package):
``webhook-id`` (unique per message, kept on retries), ``webhook-timestamp`` (Unix seconds; more
than five minutes off is refused) and ``webhook-signature: v1,<base64 HMAC-SHA256 of
"<id>.<timestamp>.<body>">``. The secret is the account's environment variable: ``whsec_<base64>``
or a plain string, at least 32 bytes either way. An account with ``legacy_signature = true``
also accepts the older, untimestamped HMAC-SHA256 over the raw body in the
``X-Replyclock-Signature: sha256=<hex>`` header::

    {"id": "123", "author": {"id": "u1", "name": "Ana", "handle": "ana"}, "text": "Hello?",
     "url": "https://shop.example/tickets/123", "created_at": "2026-11-23T09:00:00+01:00",
     "thread_id": "t-9", "reply_to_id": null, "language": "en"}

``parse_delivery`` is pure: bytes in, an `InboundPost` or a `WebhookError` naming the field out.
Replies go back, when the account has a ``reply_url``, as a JSON POST signed the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, NoReturn, Unpack
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from bot.httputil import client as http_client
from bot.httputil import retry_after
from connectors.base import (
    Batch,
    Connector,
    ConnectorError,
    ConnectorOptions,
    InboundPost,
    NotSent,
    RateLimited,
    ReplyTarget,
)

SIGNATURE_HEADER = "X-Replyclock-Signature"
SIGNATURE_PREFIX = "sha256="
MAX_ID_CHARS = 200
MAX_NAME_CHARS = 200
MAX_TEXT_CHARS = 20_000
MAX_URL_CHARS = 2_048
MAX_TIMESTAMP_CHARS = 64
MAX_LANGUAGE_CHARS = 16
# Clocks drift and queues delay, but a post from tomorrow is a bug (or an attempt to dodge the SLA).
MAX_FUTURE_SKEW = timedelta(days=1)
EARLIEST_POST = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_REPLY_TIMEOUT = 10.0
DEFAULT_RATE_LIMIT_WAIT = timedelta(seconds=60)

SETTINGS_KEYS = ("secret_env", "reply_url", "reply_timeout", "legacy_signature")
MIN_SECRET_BYTES = 32
# Standard Webhooks: a message more than this far from our clock is refused (a captured delivery
# cannot be replayed later; within it, the webhook-id is remembered).
TIMESTAMP_TOLERANCE = timedelta(minutes=5)
ID_HEADER, TIMESTAMP_HEADER, STANDARD_SIGNATURE_HEADER = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
)
MAX_MESSAGE_ID_CHARS = 120
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")


class WebhookError(ValueError):
    """A delivery was refused: `field` names what was wrong (``author.id``, ``created_at``, ``body``).

    The message never repeats the submitted value, so it is safe to log and to answer with.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def default_secret_env(account: str) -> str:
    """``WEBHOOK_SECRET_<ACCOUNT>``: the account name upper-cased, anything not alphanumeric as ``_``."""
    return "WEBHOOK_SECRET_" + re.sub(r"[^A-Z0-9]", "_", account.upper())


def _key(secret: bytes | str) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def sign(secret: bytes | str, body: bytes) -> str:
    """The signature header value for `body`: ``sha256=<hex HMAC-SHA256>``."""
    return SIGNATURE_PREFIX + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes | str, body: bytes, header: str | None) -> bool:
    """True when `header` is ``sha256=<hex>`` and the HMAC of the raw `body` matches (constant time).

    Args:
        secret: the shared HMAC key (a str is taken as UTF-8).
        body: the request body exactly as received.
        header: the signature header's value, or None when it was absent.
    """
    if header is None or not header.startswith(SIGNATURE_PREFIX):
        return False
    given = header[len(SIGNATURE_PREFIX) :].strip().lower()
    # compare_digest refuses non-ASCII str; the length of a digest is no secret.
    if not _HEX_DIGEST.fullmatch(given):
        return False
    expected = hmac.new(_key(secret), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret as configured: ``whsec_<base64>`` decoded, anything else as UTF-8.

    Raises:
        ValueError: the ``whsec_`` part is not base64.
    """
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_") + "==", validate=False)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    return secret.encode("utf-8")


def standard_headers(
    secret: bytes | str, body: bytes, *, now: datetime | None = None, message_id: str | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers signing `body` (for senders, tests and replies)."""
    key = secret_key(secret) if isinstance(secret, str) else secret
    at = now or datetime.now(UTC)
    message_id = message_id or f"msg_{uuid.uuid4().hex}"
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(math.floor(at.timestamp())),
        STANDARD_SIGNATURE_HEADER: Webhook(key).sign(message_id, at, body),
    }


def timestamp_problem(headers: Mapping[str, str], now: datetime) -> str | None:
    """Why the Standard Webhooks headers cannot be right whatever the body (checked before reading it)."""
    message_id = headers.get(ID_HEADER)
    raw = headers.get(TIMESTAMP_HEADER)
    if not message_id or not raw or not headers.get(STANDARD_SIGNATURE_HEADER):
        return "missing"
    if len(message_id) > MAX_MESSAGE_ID_CHARS or not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        return "malformed"
    if abs(int(raw) - now.timestamp()) > TIMESTAMP_TOLERANCE.total_seconds():
        return "stale"
    return None


def parse_delivery(body: bytes, *, now: datetime | None = None) -> InboundPost:
    """Validate one delivery and normalise it.

    Args:
        body: the raw request body.
        now: the current time, to refuse posts from the future (default: the system clock).

    Returns:
        The post, ready for ingest.

    Raises:
        WebhookError: anything about the body is wrong; no other exception escapes.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookError("body", "is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except WebhookError:
        raise
    except RecursionError:
        raise WebhookError("body", "is nested too deeply") from None
    except ValueError:  # JSONDecodeError, and integers too long to convert
        raise WebhookError("body", "is not valid JSON") from None
    if not isinstance(data, dict):
        raise WebhookError("body", f"must be a JSON object, not {_json_type(data)}")

    external_id = _string(data, "id", required=True, max_chars=MAX_ID_CHARS, non_empty=True)
    author = data.get("author")
    if author is None:
        raise WebhookError("author", "is required (an object with at least an id)")
    if not isinstance(author, dict):
        raise WebhookError("author", f"must be an object, not {_json_type(author)}")
    author_id = _string(author, "id", prefix="author.", required=True, max_chars=MAX_ID_CHARS, non_empty=True)
    author_name = _string(author, "name", prefix="author.", max_chars=MAX_NAME_CHARS)
    author_handle = _string(author, "handle", prefix="author.", max_chars=MAX_NAME_CHARS)
    post_text = _string(data, "text", required=True, max_chars=MAX_TEXT_CHARS)
    url = _url(data)
    posted_at = _timestamp(data, now or datetime.now(UTC))
    thread_id = _string(data, "thread_id", max_chars=MAX_ID_CHARS, non_empty=True)
    reply_to_id = _string(data, "reply_to_id", max_chars=MAX_ID_CHARS, non_empty=True)
    language = _string(data, "language", max_chars=MAX_LANGUAGE_CHARS)
    if language is not None and not _LANGUAGE.fullmatch(language):
        raise WebhookError("language", "must be a language tag such as 'en' or 'pt-BR'")
    assert external_id is not None and author_id is not None and post_text is not None
    return InboundPost(
        external_id=external_id,
        author_id=author_id,
        author_name=author_name,
        author_handle=author_handle,
        text=post_text,
        posted_at=posted_at,
        url=url,
        thread_id=thread_id,
        reply_to_id=reply_to_id,
        language=language,
        raw=data,
    )


def _refuse_constant(name: str) -> NoReturn:
    raise WebhookError("body", f"{name} is not valid JSON")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _string(
    table: Mapping[str, Any],
    key: str,
    *,
    prefix: str = "",
    required: bool = False,
    max_chars: int,
    non_empty: bool = False,
) -> str | None:
    field = prefix + key
    value = table.get(key)
    if value is None:
        if required:
            raise WebhookError(field, "is required")
        return None
    if not isinstance(value, str):
        raise WebhookError(field, f"must be a string, not {_json_type(value)}")
    if non_empty and not value.strip():
        raise WebhookError(field, "must not be empty")
    if len(value) > max_chars:
        raise WebhookError(field, f"is longer than {max_chars} characters")
    # Databases refuse NUL in text, and lone surrogates ("\ud800") cannot be encoded at all.
    if "\x00" in value:
        raise WebhookError(field, "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise WebhookError(field, "contains an unpaired surrogate") from None
    return value


def _url(data: Mapping[str, Any]) -> str | None:
    url = _string(data, "url", max_chars=MAX_URL_CHARS)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        raise WebhookError("url", "is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise WebhookError("url", "must be an absolute http(s) URL")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise WebhookError("url", "must not contain spaces or control characters")
    return url


def _timestamp(data: Mapping[str, Any], now: datetime) -> datetime:
    raw = _string(data, "created_at", required=True, max_chars=MAX_TIMESTAMP_CHARS)
    assert raw is not None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise WebhookError(
            "created_at", "must be an ISO 8601 timestamp such as 2026-11-23T09:00:00+01:00"
        ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise WebhookError("created_at", "must include a UTC offset (such as +01:00 or Z)")
    try:
        posted_at = parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise WebhookError("created_at", "is out of range") from None
    if posted_at < EARLIEST_POST:
        raise WebhookError("created_at", "is before 1970")
    if posted_at > now + MAX_FUTURE_SKEW:
        raise WebhookError("created_at", "is in the future")
    return posted_at


class WebhookConnector(Connector):
    """A push channel: posts arrive at ``POST /hooks/<account>``; it is never polled.

    Settings (the account's table in replyclock.toml):
        secret_env: the environment variable holding the HMAC secret
            (default ``WEBHOOK_SECRET_<ACCOUNT>``).
        reply_url: where replies are POSTed; without it the account cannot reply
            (set ``can_reply = false``).
        reply_timeout: seconds to wait for the reply endpoint (default 10).
        legacy_signature: also accept (and send) the untimestamped ``X-Replyclock-Signature``
            (default false: Standard Webhooks only).
    """

    kind: ClassVar[str] = "webhook"
    settings_keys: ClassVar[tuple[str, ...] | None] = SETTINGS_KEYS
    push: ClassVar[bool] = True

    def __init__(
        self, name: str, *, transport: httpx.BaseTransport | None = None, **options: Unpack[ConnectorOptions]
    ) -> None:
        super().__init__(name, **options)
        secret_env = self.env_name_setting("secret_env", default_secret_env(name))
        secret = self.environ.get(secret_env, "")
        if not secret:
            raise ValueError(f"webhook secret missing: set the environment variable {secret_env}")
        self.secret_env = secret_env
        self._secret = secret_key(secret)
        if len(self._secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"webhook secret in {secret_env} is {len(self._secret)} bytes; at least {MIN_SECRET_BYTES} "
                "are required (for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        self._standard = Webhook(self._secret)
        legacy = self.settings.get("legacy_signature", False)
        if not isinstance(legacy, bool):
            raise ValueError("legacy_signature must be true or false")
        self.legacy_signature = legacy
        reply_url = self.settings.get("reply_url")
        if reply_url is not None:
            if not isinstance(reply_url, str) or urlsplit(reply_url).scheme not in ("http", "https"):
                raise ValueError("reply_url must be an http(s) URL")
            if not urlsplit(reply_url).netloc:
                raise ValueError("reply_url must be an absolute http(s) URL")
        self.reply_url: str | None = reply_url
        self.reply_timeout = self.seconds_setting("reply_timeout", DEFAULT_REPLY_TIMEOUT)
        self._transport = transport

    def __repr__(self) -> str:  # never show the secret
        return (
            f"WebhookConnector({self.name!r}, secret_env={self.secret_env!r}, reply_url={self.reply_url!r})"
        )

    def verify(self, body: bytes, header: str | None) -> bool:
        """True when `header` is a valid legacy signature of `body` with this account's secret."""
        return verify_signature(self._secret, body, header)

    def verify_standard(self, body: bytes, headers: Mapping[str, str], now: datetime) -> str | None:
        """The ``webhook-id`` when the Standard Webhooks headers sign `body` within the tolerance.

        The timestamp is checked against `now` (the injected clock), then each ``v1,`` signature
        given against the package's own signing of ``<id>.<timestamp>.<body>`` (constant time).
        """
        if timestamp_problem(headers, now) is not None:
            return None
        message_id = headers[ID_HEADER]
        at = datetime.fromtimestamp(int(headers[TIMESTAMP_HEADER]), UTC)
        expected = self._standard.sign(message_id, at, body).encode("ascii")
        for given in headers[STANDARD_SIGNATURE_HEADER].split(" "):
            if given.isascii() and hmac.compare_digest(expected, given.encode("ascii")):
                return message_id
        return None

    def sign(self, body: bytes) -> str:
        """The legacy signature header value this account accepts for `body`."""
        return sign(self._secret, body)

    def signed_headers(self, body: bytes, now: datetime | None = None) -> dict[str, str]:
        """Standard Webhooks headers for `body` (and the legacy one for a legacy account)."""
        headers = standard_headers(self._secret, body, now=now)
        if self.legacy_signature:
            headers[SIGNATURE_HEADER] = self.sign(body)
        return headers

    def fetch(self, cursor: str | None) -> Batch:
        """Nothing to poll: deliveries arrive over HTTP."""
        return Batch(posts=(), cursor=cursor)

    def reply(self, to: ReplyTarget, text: str) -> str:
        """POST the reply to ``reply_url`` and return the id from its JSON answer.

        Raises:
            NotSent: no reply_url, the connection could not be opened, or the endpoint answered 4xx.
            RateLimited: the endpoint answered 429 (Retry-After honoured).
            ConnectorError, httpx.HTTPError: outcome unknown (5xx, timeout after sending, bad answer).
        """
        if self.reply_url is None:
            raise NotSent(f"webhook account {self.name!r} has no reply_url")
        body = json.dumps(
            {
                "in_reply_to": to.external_id,
                "thread_id": to.thread_id,
                "author_id": to.author_id,
                "text": text,
            },
            ensure_ascii=False,
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", **self.signed_headers(body, self.clock.now())}
        try:
            with http_client(timeout=self.reply_timeout, transport=self._transport) as client:
                response = client.post(self.reply_url, content=body, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            # No connection, so no request reached the endpoint: certainly not posted.
            raise NotSent(f"reply endpoint unreachable: {type(error).__name__}") from error
        status = response.status_code
        if status == 429:
            now = self.clock.now()
            wait = retry_after(
                response.headers.get("Retry-After"), now=now, date=response.headers.get("Date")
            )
            raise RateLimited(
                now + (DEFAULT_RATE_LIMIT_WAIT if wait is None else min(wait, timedelta(days=1)))
            )
        if 400 <= status < 500:
            raise NotSent(f"reply endpoint refused the reply: HTTP {status}")
        if status >= 300:
            raise ConnectorError(f"reply endpoint answered HTTP {status}; the reply may or may not be posted")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        reply_id = answer.get("id") if isinstance(answer, dict) else None
        if isinstance(reply_id, int) and not isinstance(reply_id, bool):
            reply_id = str(reply_id)
        if not isinstance(reply_id, str) or not reply_id or len(reply_id) > MAX_ID_CHARS:
            raise ConnectorError(f"reply endpoint answered HTTP {status} without a usable id")
        return reply_id
