"""Mastodon: mentions of our account become posts; replies go back as statuses in the same thread.

Settings (``[accounts.<name>]`` with ``kind = "mastodon"``):
    ``api_base_url``      (required) the instance, e.g. ``"https://mastodon.social"``.
    ``access_token_env``  name of the environment variable holding the access token
                          (default ``MASTODON_ACCESS_TOKEN``); the token needs the scopes
                          ``read:notifications``, ``read:statuses`` and ``write:statuses``.
    ``account_id``        our own account's id; its posts answer conversations (added to ``own_ids``).
    ``timeout``           seconds per HTTP request (default 30).

The cursor is the id of the newest mention notification already handed over. Each fetch asks
for the page immediately newer than it (``min_id``), oldest first, and returns that page with
its newest id as the next cursor and ``more=True`` while pages come back full; `Jobs.poll`
commits each page with its cursor, so a restart resumes after the last committed page (nothing
lost) and the unique key on posts makes a re-fetched page harmless (nothing stored twice). The
very first fetch (no cursor) takes only the newest page: older mentions are history.

Mastodon does not notify an account of its own statuses: our answers are seen when sent through
replyclock (stored by the outbox) or when written by another account of ours listed in
``own_ids`` that mentions this one (Mastodon keeps every mentioned account in a reply).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Unpack
from urllib.parse import urlsplit

import requests
from mastodon import (
    Mastodon,
    MastodonAPIError,
    MastodonError,
    MastodonNetworkError,
    MastodonRatelimitError,
    MastodonServerError,
    MastodonUnauthorizedError,
)

from bot.httputil import http_date, retry_after
from connectors.base import (
    AuthFailed,
    Batch,
    Connector,
    ConnectorError,
    ConnectorOptions,
    InboundPost,
    NotSent,
    RateLimited,
    ReplyAuthFailed,
    ReplyTarget,
    ShapeError,
    SkippedItem,
    describe_json,
)
from connectors.text import html_to_text

log = logging.getLogger("replyclock.connectors.mastodon")

PAGE_SIZE = 40
DEFAULT_TOKEN_ENV = "MASTODON_ACCESS_TOKEN"
DEFAULT_TIMEOUT = 30.0
# When the server gives no usable reset time: Mastodon's rate-limit window is five minutes.
DEFAULT_RATE_LIMIT_WAIT = timedelta(minutes=5)
SETTINGS = ("api_base_url", "access_token_env", "account_id", "timeout")

# The visibility of our reply, by the visibility of the customer's status: never more public
# than what they wrote, and never on the public timelines (an unlisted reply still shows in
# the thread). Anything unknown (a fork's "local", "limited") is answered privately.
REPLY_VISIBILITY: Mapping[str, str] = {
    "public": "unlisted",
    "unlisted": "unlisted",
    "private": "private",
    "direct": "direct",
}


class MastodonConnector(Connector):
    """Mentions of our account in, replies out, through Mastodon.py."""

    kind: ClassVar[str] = "mastodon"
    settings_keys: ClassVar[tuple[str, ...] | None] = SETTINGS
    settings_label: ClassVar[str] = "Mastodon"

    def __init__(
        self, name: str, *, session: requests.Session | None = None, **options: Unpack[ConnectorOptions]
    ) -> None:
        """Check the settings and build the client (no network call yet).

        Raises:
            ValueError: a setting is missing or malformed, or the token variable is unset.
        """
        super().__init__(name, **options)
        api_base_url = self.settings.get("api_base_url")
        if not isinstance(api_base_url, str) or not api_base_url.strip():
            raise ValueError(
                "setting 'api_base_url' is required (the instance, e.g. \"https://mastodon.social\")"
            )
        token_env = self.env_name_setting("access_token_env", DEFAULT_TOKEN_ENV)
        token = self.environ.get(token_env, "").strip()
        if not token:
            raise ValueError(f"environment variable {token_env} (the Mastodon access token) is not set")
        account_id = self.settings.get("account_id")
        if account_id is not None and not isinstance(account_id, str | int):
            raise ValueError("setting 'account_id' must be our account's id")
        timeout = self.seconds_setting("timeout", DEFAULT_TIMEOUT)
        if account_id is not None:
            self.include_own_id(str(account_id))
        self.api_base_url = api_base_url.strip().rstrip("/")
        self.account_id = str(account_id) if account_id is not None else None
        self.domain = (urlsplit(self.api_base_url).hostname or "").lower()
        self._last_response = threading.local()
        http = session or requests.Session()
        http.hooks["response"].append(self._remember_response)
        self.client = Mastodon(
            access_token=token,
            api_base_url=self.api_base_url,
            version_check_mode="none",
            ratelimit_method="throw",  # never sleep inside a job: Jobs.poll parks the connector instead
            request_timeout=timeout,
            session=http,
            user_agent="replyclock",
        )

    def is_own(self, post: InboundPost) -> bool:
        """Written by one of our accounts: by id, or by handle (``acme``, ``@acme@mastodon.social``).

        Mastodon gives local accounts a bare ``acct`` ("acme") and remote ones ``user@domain``;
        both sides are compared in full, the bare form completed with this instance's domain
        (or a parent domain of it, for instances whose handles use a shorter domain).
        """
        if post.author_id in self.own_ids:
            return True
        if not post.author_handle:
            return False
        user, _, domain = post.author_handle.lstrip("@").lower().partition("@")
        for own in self.own_ids:
            own_user, at, own_domain = own.lstrip("@").lower().partition("@")
            if own_user != user or (not at and own.isdigit()):
                continue
            if (domain or self.domain) == (own_domain or self.domain):
                return True
            if not domain and own_domain and self.domain.endswith("." + own_domain):
                return True
        return False

    def __repr__(self) -> str:  # never show the client (it holds the token)
        return f"MastodonConnector({self.name!r}, api_base_url={self.api_base_url!r})"

    # -- fetch -------------------------------------------------------------------------------------

    def fetch(self, cursor: str | None) -> Batch:
        """The page of mentions immediately newer than `cursor` (the newest page if none), oldest first."""
        try:
            if cursor is None:
                page = self.client.notifications(types=["mention"], limit=PAGE_SIZE)
            else:
                page = self.client.notifications(types=["mention"], min_id=cursor, limit=PAGE_SIZE)
        except MastodonError as error:
            raise self._fetch_error(error) from error
        shape = getattr(self._last_response, "shape", "array")
        if not isinstance(page, list) or shape != "array":
            # An error object, or a proxy's idea of an answer: nothing to skip, the poll fails.
            got = describe_json(page) if not isinstance(page, list) else shape
            raise ShapeError("body", f"expected an array of notifications, got {got}")
        notifications: list[Mapping[str, Any]] = []
        skipped: list[SkippedItem] = []
        newest = cursor
        for index, item in enumerate(page):
            where = f"[{index}]"
            if not isinstance(item, Mapping):
                skipped.append(
                    SkippedItem(
                        where, f"expected a notification object, got {describe_json(item)}", _jsonable(item)
                    )
                )
                continue
            notification_id = _id_text(item.get("id"))
            if notification_id is None:
                reason = f"expected a notification id, got {describe_json(item.get('id'))}"
                skipped.append(SkippedItem(f"{where}.id", reason, _jsonable(item)))
                continue
            if newest is None or _id_order(notification_id) > _id_order(newest):
                newest = notification_id
            if cursor is not None and _id_order(notification_id) <= _id_order(cursor):
                continue  # a server that ignored min_id: already handed over
            notifications.append(item)
        notifications.sort(key=lambda n: _id_order(str(_id_text(n.get("id")))))
        posts = []
        for number, notification in enumerate(notifications):
            try:
                post = self._normalise(notification)
            except ShapeError as error:
                skipped.append(
                    SkippedItem(
                        f"[{number}].{error.field}",
                        error.reason,
                        _jsonable(notification),
                        _id_text(notification.get("id")),
                    )
                )
                continue
            if post is not None:
                posts.append(post)
        # Only a full page of new notifications means more may be waiting; a server that ignored
        # min_id and sent old ones again is not asked again in this poll.
        more = cursor is not None and len(page) >= PAGE_SIZE and newest != cursor and bool(notifications)
        return Batch(posts=tuple(posts), cursor=newest, more=more, skipped=tuple(skipped))

    def _normalise(self, notification: Mapping[str, Any]) -> InboundPost | None:
        status = notification.get("status")
        if notification.get("type") != "mention" or not status:
            # An old server ignoring types[], or a mention whose status is already deleted.
            log.debug(
                "notification skipped",
                extra={
                    "account": self.name,
                    "notification_id": str(notification.get("id")),
                    "type": notification.get("type"),
                },
            )
            return None
        if not isinstance(status, Mapping):
            raise ShapeError("status", f"expected a status object, got {describe_json(status)}")
        status_id = _id_text(status.get("id"))
        if status_id is None:
            raise ShapeError("status.id", f"expected a status id, got {describe_json(status.get('id'))}")
        found = status.get("account")
        account: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        body = html_to_text(status.get("content"))
        attachments = [
            f"[{item.get('type') or 'attachment'}: {item['description']}]"
            if item.get("description")
            else f"[{item.get('type') or 'attachment'}]"
            for item in status.get("media_attachments") or ()
        ]
        if attachments:
            body = "\n".join([body, *attachments]) if body else "\n".join(attachments)
        if status.get("spoiler_text"):
            body = f"CW: {status['spoiler_text']}\n\n{body}"
        in_reply_to_id = status.get("in_reply_to_id")
        return InboundPost(
            external_id=status_id,
            author_id=str(account.get("id") or "unknown"),
            author_handle=_text(account.get("acct") or account.get("username")),
            author_name=_text(account.get("display_name") or account.get("username")),
            text=body,
            posted_at=_timestamp(status.get("created_at"))
            or _timestamp(notification.get("created_at"))
            or self.clock.now(),
            thread_id=str(in_reply_to_id) if in_reply_to_id else status_id,
            reply_to_id=str(in_reply_to_id) if in_reply_to_id else None,
            url=_text(status.get("url") or status.get("uri")),
            language=_text(status.get("language")),
            raw={
                "notification_id": str(notification.get("id")),
                "visibility": status.get("visibility"),
                "in_reply_to_account_id": status.get("in_reply_to_account_id"),
                "sensitive": bool(status.get("sensitive")),
                "uri": status.get("uri"),
            },
        )

    def _fetch_error(self, error: MastodonError) -> ConnectorError:
        if isinstance(error, MastodonRatelimitError):
            if self._last_status() == 429:
                return RateLimited(self._reset_at(), f"Mastodon {self.api_base_url} rate limit")
            return ConnectorError(f"Mastodon {self.api_base_url}: {error}")
        if isinstance(error, MastodonUnauthorizedError) or _status_code(error) == 403:
            return AuthFailed(
                f"Mastodon {self.api_base_url} refused the access token: {self._describe(error)}"
            )
        return ConnectorError(f"Mastodon {self.api_base_url}: {self._describe(error)}")

    # -- reply -------------------------------------------------------------------------------------

    def reply(self, to: ReplyTarget, text: str) -> str:
        """Answer the customer's status in its thread, as privately as they wrote, mentioning them.

        The original status is read first (one extra call) for its visibility and its author's
        ``acct``, unless ``to.extra`` carries ``visibility``. Mastodon delivers a reply to the
        accounts it mentions, so ``@acct`` is put in front unless the text already mentions them.

        Raises:
            NotSent: the reply was certainly not posted (refused, original gone, too long).
            RateLimited: ditto, retry after the reset.
            ReplyAuthFailed: the token was refused (an AuthFailed that is also NotSent).
            MastodonError: network failure or server error while posting: outcome unknown.
        """
        visibility = to.extra.get("visibility")
        acct = to.author_handle
        if not isinstance(visibility, str):
            try:
                original = self.client.status(to.external_id)
            except MastodonError as error:
                # Nothing was posted yet, so every failure here is safe to retry.
                raise self._reply_refused(error, f"could not read status {to.external_id}") from error
            visibility = str(original.get("visibility") or "direct")
            acct = (original.get("account") or {}).get("acct") or acct
        reply_visibility = REPLY_VISIBILITY.get(visibility, "direct")
        body = with_mention(text, acct)
        try:
            posted = self.client.status_post(
                body,
                in_reply_to_id=to.external_id,
                visibility=reply_visibility,
                # Mastodon answers a repeated key (for an hour) with the status it already made.
                idempotency_key=_idempotency_key(self.name, to.external_id, body),
            )
        except MastodonRatelimitError as error:
            if self._last_status() == 429:
                raise RateLimited(self._reset_at(), f"Mastodon {self.api_base_url} rate limit") from error
            raise  # raised after an answer arrived (a header Mastodon.py could not read): maybe posted
        except (MastodonNetworkError, MastodonServerError):
            raise  # the status may or may not exist: never resent blindly
        except MastodonAPIError as error:
            code = _status_code(error)
            if isinstance(error, MastodonUnauthorizedError) or (code is not None and 400 <= code < 500):
                raise self._reply_refused(error, f"reply to {to.external_id} refused") from error
            raise
        return str(posted["id"])

    def _reply_refused(self, error: MastodonError, what: str) -> ConnectorError:
        if isinstance(error, MastodonRatelimitError) and self._last_status() == 429:
            return RateLimited(self._reset_at(), f"Mastodon {self.api_base_url} rate limit")
        if isinstance(error, MastodonUnauthorizedError) or _status_code(error) == 403:
            return ReplyAuthFailed(
                f"Mastodon {self.api_base_url} refused the access token: {self._describe(error)}"
            )
        return NotSent(f"Mastodon {self.api_base_url}: {what}: {self._describe(error)}")

    # -- rate limits -------------------------------------------------------------------------------

    def _remember_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._last_response.status = response.status_code
        self._last_response.headers = dict(response.headers)
        self._last_response.error = None
        # The body's top-level JSON shape: Mastodon.py turns an object where a list belongs into
        # the list of its keys, so the connector looks at the first byte itself.
        head = response.content[:64].lstrip()[:1] if response.content is not None else b""
        self._last_response.shape = {b"[": "array", b"{": "an object"}.get(head, "something else")
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                self._last_response.error = body["error"][:500]

    def _describe(self, error: MastodonError) -> str:
        """Status, reason and the server's own words (Mastodon.py drops them on list endpoints)."""
        text = _describe(error)
        said = getattr(self._last_response, "error", None)
        if isinstance(said, str) and said and said not in text:
            text = f"{text}: {said}"
        return text

    def _last_status(self) -> int | None:
        status = getattr(self._last_response, "status", None)
        return status if isinstance(status, int) else None

    def _reset_at(self) -> datetime:
        """When the rate limit lifts, from the last answer's headers, on our clock."""
        headers = {k.lower(): v for k, v in (getattr(self._last_response, "headers", None) or {}).items()}
        return rate_limit_reset(headers, self.clock.now())


def rate_limit_reset(headers: Mapping[str, str], now: datetime) -> datetime:
    """The reset time of a 429 answer: ``Retry-After``, else ``X-RateLimit-Reset``, else five minutes.

    ``X-RateLimit-Reset`` is ISO 8601 on Mastodon (an epoch number on some other servers); when
    the answer has a ``Date`` it is read relative to that, so a skewed server clock does not matter.
    The result is between one second and six hours from `now`.

    Args:
        headers: the answer's headers, names in lower case.
        now: our clock.
    """
    wait = retry_after(headers.get("retry-after"), now=now, date=headers.get("date"))
    reset = headers.get("x-ratelimit-reset", "").strip()
    if wait is None and reset:
        moment = None
        if re.fullmatch(r"\d+(\.\d+)?", reset):
            moment = datetime.fromtimestamp(float(reset), UTC)
        else:
            moment = _timestamp(reset)
        if moment is not None:
            wait = moment - (http_date(headers.get("date")) or now)
    if wait is None:
        wait = DEFAULT_RATE_LIMIT_WAIT
    return now + min(max(wait, timedelta(seconds=1)), timedelta(hours=6))


def with_mention(text: str, acct: str | None) -> str:
    """`text` with ``@acct`` in front, unless it already mentions that account somewhere."""
    if not acct:
        return text
    handle = "@" + acct.lstrip("@")
    if re.search(rf"(?<![\w@/]){re.escape(handle)}(?![\w@]|[.-]\w)", text, re.IGNORECASE):
        return text
    return f"{handle} {text}"


def _text(value: object) -> str | None:
    """A plain str (Mastodon.py hands out str subclasses), or None for empty values."""
    return str(value) if value else None


def _idempotency_key(account: str, status_id: str, body: str) -> str:
    return hashlib.sha256(f"replyclock\n{account}\n{status_id}\n{body}".encode()).hexdigest()


def _id_text(value: object) -> str | None:
    """A Mastodon id as text (Mastodon.py may hand ids back as numbers); None when unusable."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    if isinstance(value, str) and value.strip():
        return value
    return None


def _jsonable(value: object) -> Any:
    return json.loads(json.dumps(value, default=str))


def _id_order(value: str) -> tuple[int, str]:
    """Mastodon ids are decimal strings that grow; compare them as numbers without converting."""
    return (len(value), value) if value.isdigit() else (0, value)


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _status_code(error: MastodonError) -> int | None:
    """The HTTP status Mastodon.py put in an API error's arguments."""
    for arg in error.args[1:2]:
        if isinstance(arg, int):
            return arg
    return None


def _describe(error: MastodonError) -> str:
    parts = [str(a) for a in error.args[1:] if a not in (None, "")] or [str(error)]
    return " ".join(parts)
