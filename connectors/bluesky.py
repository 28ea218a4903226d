"""The Bluesky channel: mentions, replies and quotes of our account in, threaded replies out (atproto SDK).

Settings (``[accounts.<name>]`` in replyclock.toml, besides ``kind = "bluesky"``):

    ``handle``               our handle (required), e.g. ``acme.bsky.social``; the login identifier.
    ``app_password_env``     env var with an app password (default ``BLUESKY_APP_PASSWORD``); create one
                             under Settings, Privacy and security, App passwords. Never the main password.
    ``service``              the PDS or entryway (default ``https://bsky.social``).
    ``session_file``         optional: where the session (access and refresh tokens) is kept between
                             restarts, written with mode 0600; without it every start logs in again.
    ``limit``                notifications per page, 1 to 100 (default 50).
    ``timeout``              seconds per HTTP request (default 30).

The cursor is a JSON object. Between polls it is ``{"seen": T}``: every notification indexed up
to time T is stored. ``app.bsky.notification.listNotifications`` pages newest first, so a poll
that finds more than a page stores one page per fetch with ``{"seen": T, "page": C, "newest":
N}``: a restart continues at page C with the same bound T, and N, the newest time of the first
page, becomes the new bound only once the last new page is stored. Notifications are stored
once by their record URI in any case. The very first poll (no cursor) reads one page only.

Replies are ``app.bsky.feed.post`` records with ``reply.parent`` the customer's post and
``reply.root`` the root of its thread (the post itself when it starts one), and a mention facet
for the customer's handle so they are notified.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Unpack

from atproto import Client, models  # type: ignore[import-untyped]
from atproto_client.client.session import Session, SessionEvent  # type: ignore[import-untyped]
from atproto_client.exceptions import (  # type: ignore[import-untyped]
    AtProtocolError,
    BadRequestError,
    NetworkError,
    RequestErrorBase,
    UnauthorizedError,
)
from atproto_client.request import Request  # type: ignore[import-untyped]

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
    ReplyOutcomeUnknown,
    ReplyTarget,
)

log = logging.getLogger("replyclock.connectors.bluesky")

SETTINGS_KEYS = ("handle", "app_password_env", "service", "session_file", "limit", "timeout")
DEFAULT_PASSWORD_ENV = "BLUESKY_APP_PASSWORD"
DEFAULT_SERVICE = "https://bsky.social"
DEFAULT_LIMIT = 50
DEFAULT_TIMEOUT = 30.0
# Notification reasons that are someone writing to or about us in a post.
POST_REASONS = ("mention", "reply", "quote")
DEFAULT_RATE_LIMIT_WAIT = timedelta(minutes=5)
_HANDLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*\.[A-Za-z]{2,}$")


@dataclass(frozen=True)
class BlueskyCursor:
    seen: str | None = None
    page: str | None = None
    newest: str | None = None

    def dump(self) -> str:
        values = {"seen": self.seen, "page": self.page, "newest": self.newest}
        return json.dumps({k: v for k, v in values.items() if v is not None}, sort_keys=True)

    @classmethod
    def load(cls, text: str | None) -> BlueskyCursor:
        if text is None or not text.strip():
            return cls()
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not all(
                isinstance(data.get(k), str | None) for k in ("seen", "page", "newest")
            ):
                raise ValueError("not an object of strings")
            for key in ("seen", "newest"):
                if data.get(key) is not None:
                    _time(data[key])
        except ValueError as error:
            problem = ConnectorError(f'Bluesky cursor is not {{"seen": ..., "page": ...}}: {text[:200]!r}')
            problem.retryable = False
            raise problem from error
        return cls(seen=data.get("seen"), page=data.get("page"), newest=data.get("newest"))


def _time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"time without zone: {value!r}")
    return parsed.astimezone(UTC)


def _later(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if _time(a) >= _time(b) else b


def post_url(handle: str | None, uri: str) -> str | None:
    """``https://bsky.app/profile/<handle>/post/<rkey>`` for an ``at://`` post URI."""
    match = re.fullmatch(r"at://([^/]+)/app\.bsky\.feed\.post/([^/]+)", uri)
    if match is None:
        return None
    return f"https://bsky.app/profile/{handle or match.group(1)}/post/{match.group(2)}"


def normalise(notification: Mapping[str, Any]) -> InboundPost | None:
    """One notification (as JSON, lexicon ``app.bsky.notification.listNotifications#notification``)."""
    if notification.get("reason") not in POST_REASONS:
        return None
    record = notification.get("record")
    uri, cid = notification.get("uri"), notification.get("cid")
    author = notification.get("author")
    if not isinstance(record, Mapping) or not isinstance(uri, str) or not isinstance(cid, str):
        return None
    if not isinstance(author, Mapping) or not isinstance(author.get("did"), str):
        return None
    if record.get("$type", "app.bsky.feed.post") != "app.bsky.feed.post":
        return None
    handle = author.get("handle") if isinstance(author.get("handle"), str) else None
    name = author.get("displayName") if isinstance(author.get("displayName"), str) else None
    posted_at: datetime | None = None
    for value in (record.get("createdAt"), notification.get("indexedAt")):
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                posted_at = _time(value)
                break
    if posted_at is None:
        return None
    reply = record.get("reply") if isinstance(record.get("reply"), Mapping) else None
    root = reply.get("root") if reply and isinstance(reply.get("root"), Mapping) else None
    parent = reply.get("parent") if reply and isinstance(reply.get("parent"), Mapping) else None
    root_ref = (
        {"uri": root["uri"], "cid": root["cid"]}
        if root and isinstance(root.get("uri"), str) and isinstance(root.get("cid"), str)
        else {"uri": uri, "cid": cid}
    )
    langs = record.get("langs")
    language = langs[0] if isinstance(langs, list) and langs and isinstance(langs[0], str) else None
    text = record.get("text")
    return InboundPost(
        external_id=uri,
        author_id=str(author["did"]),
        text=text if isinstance(text, str) else "",
        posted_at=posted_at,
        author_name=name or None,
        author_handle=handle,
        url=post_url(handle, uri),
        thread_id=root_ref["uri"],
        reply_to_id=parent["uri"] if parent and isinstance(parent.get("uri"), str) else None,
        language=language,
        raw=dict(notification),
        meta={"uri": uri, "cid": cid, "root": root_ref, "did": author["did"], "handle": handle},
    )


def mention_facet(text: str, handle: str, did: str) -> dict[str, Any] | None:
    """The ``app.bsky.richtext.facet`` for the first ``@handle`` in `text` (UTF-8 byte offsets)."""
    mention = "@" + handle
    start = text.find(mention)
    if start < 0:
        return None
    byte_start = len(text[:start].encode("utf-8"))
    return {
        "index": {"byteStart": byte_start, "byteEnd": byte_start + len(mention.encode("utf-8"))},
        "features": [{"$type": "app.bsky.richtext.facet#mention", "did": did}],
    }


class BlueskyConnector(Connector):
    """Mentions, replies and quotes of our Bluesky account; replies posted in their thread."""

    kind: ClassVar[str] = "bluesky"
    settings_keys: ClassVar[tuple[str, ...] | None] = SETTINGS_KEYS
    settings_label: ClassVar[str] = "Bluesky"

    def __init__(self, name: str, **options: Unpack[ConnectorOptions]) -> None:
        super().__init__(name, **options)
        s = self.settings
        handle = s.get("handle")
        if not isinstance(handle, str) or not _HANDLE.match(handle.lstrip("@")):
            raise ValueError(
                f"setting handle must be our Bluesky handle (e.g. acme.bsky.social), not {handle!r}"
            )
        self.handle = handle.lstrip("@").lower()
        self.include_own_id(self.handle)
        self.password_env = self.env_name_setting("app_password_env", DEFAULT_PASSWORD_ENV)
        self.password = self.environ.get(self.password_env, "").strip()
        if not self.password:
            raise ValueError(
                f"environment variable {self.password_env} not set: a Bluesky app password of {self.handle} is needed"
            )
        self.service = self.url_setting("service", DEFAULT_SERVICE)
        session_file = s.get("session_file")
        if session_file is not None and (not isinstance(session_file, str) or not session_file):
            raise ValueError(f"setting session_file must be a file path, not {session_file!r}")
        self.session_file = Path(session_file) if session_file else None
        limit = s.get("limit", DEFAULT_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ValueError(f"setting limit must be an integer from 1 to 100, not {limit!r}")
        self.limit = limit
        self.timeout = self.seconds_setting("timeout", DEFAULT_TIMEOUT)
        self.did: str | None = None
        self._client: Client | None = None

    def __repr__(self) -> str:
        return f"BlueskyConnector({self.name!r}, handle={self.handle!r}, service={self.service!r})"

    # -- session -------------------------------------------------------------------------------

    def _save_session(self, event: SessionEvent, session: Session) -> None:
        self.did = session.did
        if self.session_file is None:
            return
        self.session_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.session_file.with_suffix(self.session_file.suffix + ".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(session.export())
        os.replace(temporary, self.session_file)
        log.info("Bluesky session saved", extra={"account": self.name, "event": event.value})

    def client(self) -> Client:
        """The logged-in client: the saved session if it still works, else an app-password login.

        Raises:
            AuthFailed: the app password was refused.
            ConnectorError: the service could not be reached.
        """
        if self._client is not None:
            return self._client
        client = Client(base_url=self.service, request=Request(timeout=self.timeout))
        client.on_session_change(self._save_session)
        saved = self._saved_session()
        if saved:
            try:
                client.login(session_string=saved)
                self._client = client
                return client
            except (UnauthorizedError, BadRequestError, ValueError):
                log.info("saved Bluesky session refused; logging in again", extra={"account": self.name})
                client = Client(base_url=self.service, request=Request(timeout=self.timeout))
                client.on_session_change(self._save_session)
            except RequestErrorBase as error:
                raise self._error(error, "logging in") from error
        try:
            client.login(self.handle, self.password)
        except UnauthorizedError as error:
            raise AuthFailed(
                f"Bluesky refused the app password of {self.handle}; check {self.password_env}"
            ) from error
        except RequestErrorBase as error:
            raise self._error(error, "logging in") from error
        self._client = client
        return client

    def _saved_session(self) -> str | None:
        if self.session_file is None or not self.session_file.exists():
            return None
        text = self.session_file.read_text().strip()
        return text or None

    # -- reading -------------------------------------------------------------------------------

    def fetch(self, cursor: str | None) -> Batch:
        """One page of notifications after the cursor, oldest first; ``more`` while older new pages remain.

        Raises:
            RateLimited: 429, until ``ratelimit-reset``.
            AuthFailed: the session and the app password were refused.
            ConnectorError: anything else.
        """
        state = BlueskyCursor.load(cursor)
        client = self.client()
        try:
            response = client.app.bsky.notification.list_notifications(
                params={"limit": self.limit, **({"cursor": state.page} if state.page else {})}
            )
        except RequestErrorBase as error:
            raise self._error(error, "reading notifications") from error
        payload = response.model_dump(by_alias=True, exclude_none=True)
        notifications = [n for n in payload.get("notifications") or [] if isinstance(n, Mapping)]
        times = [n["indexedAt"] for n in notifications if isinstance(n.get("indexedAt"), str)]
        page_newest = None
        for value in times:
            page_newest = _later(page_newest, value)
        seen = state.seen
        fresh = [
            n
            for n in notifications
            if seen is None or not isinstance(n.get("indexedAt"), str) or _time(n["indexedAt"]) > _time(seen)
        ]
        newest = _later(state.newest, page_newest) if state.page else page_newest
        posts = []
        for notification in fresh:
            post = normalise(notification)
            if post is not None:
                posts.append(post)
        posts.sort(key=lambda p: p.posted_at)
        next_page = payload.get("cursor")
        all_new = bool(notifications) and len(fresh) == len(notifications)
        if (
            seen is not None
            and all_new
            and isinstance(next_page, str)
            and next_page
            and next_page != state.page
        ):
            return Batch(
                posts=tuple(posts),
                cursor=BlueskyCursor(seen=seen, page=next_page, newest=newest).dump(),
                more=True,
            )
        return Batch(posts=tuple(posts), cursor=BlueskyCursor(seen=_later(newest, seen)).dump())

    def is_own(self, post: InboundPost) -> bool:
        return (self.did is not None and post.author_id == self.did) or super().is_own(post)

    # -- writing -------------------------------------------------------------------------------

    def reply(self, to: ReplyTarget, text: str) -> str:
        """Post `text` in reply to `to` (parent: that post; root: its thread's root); returns the new URI.

        Raises:
            RateLimited: 429 (nothing posted).
            ReplyAuthFailed: 401/403 (nothing posted).
            NotSent: 400, the post or thread is gone or refused, or no connection was made.
            ReplyOutcomeUnknown: 5xx, a timeout or a broken connection: the post may exist.
        """
        meta = to.extra
        uri, cid = meta.get("uri"), meta.get("cid")
        if not isinstance(uri, str) or not isinstance(cid, str):
            raise NotSent(f"no record reference (uri, cid) stored for {to.external_id}")
        stored_root = meta.get("root")
        root: Mapping[str, Any] = (
            stored_root if isinstance(stored_root, Mapping) else {"uri": uri, "cid": cid}
        )
        handle = to.author_handle
        if handle and ("@" + handle).casefold() not in text.casefold():
            text = f"@{handle} {text}"
        facets = []
        if handle:
            facet = mention_facet(text, handle, to.author_id)
            if facet is not None:
                facets.append(models.AppBskyRichtextFacet.Main.model_validate(facet))
        try:
            client = self.client()
        except AuthFailed as error:
            raise ReplyAuthFailed(str(error)) from error
        except ConnectorError as error:
            raise NotSent(str(error)) from error
        assert self.did is not None
        reply_ref = models.AppBskyFeedPost.ReplyRef(
            parent=models.ComAtprotoRepoStrongRef.Main(uri=uri, cid=cid),
            root=models.ComAtprotoRepoStrongRef.Main(uri=str(root["uri"]), cid=str(root["cid"])),
        )
        record = models.AppBskyFeedPost.Record(
            created_at=self.clock.now().astimezone(UTC).isoformat().replace("+00:00", "Z"),
            text=text,
            reply=reply_ref,
            facets=facets or None,
        )
        try:
            created = client.com.atproto.repo.create_record(
                models.ComAtprotoRepoCreateRecord.Data(
                    repo=self.did, collection="app.bsky.feed.post", record=record
                )
            )
        except RequestErrorBase as error:
            status = error.response.status_code if error.response is not None else None
            if status == 429:
                raise self._rate_limited(error, "posting") from error
            if status in (401, 403):
                raise ReplyAuthFailed(f"Bluesky refused our session posting a reply ({error})") from error
            if status is not None and 400 <= status < 500:
                raise NotSent(f"Bluesky refused the reply: {error}") from error
            if isinstance(error, NetworkError) and error.response is None and _not_connected(error):
                raise NotSent(f"could not connect to Bluesky: {error.__cause__!r}") from error
            raise ReplyOutcomeUnknown(
                f"Bluesky answered {status or type(error).__name__}; the reply may or may not be posted"
            ) from error
        except AtProtocolError as error:
            raise ReplyOutcomeUnknown(f"Bluesky reply failed: {error}") from error
        return str(created.uri)

    # -- errors --------------------------------------------------------------------------------

    def _rate_limited(self, error: RequestErrorBase, doing: str) -> RateLimited:
        reset = None
        headers = error.response.headers if error.response is not None else {}
        value = headers.get("ratelimit-reset")
        if isinstance(value, str) and value.isdigit():
            reset = datetime.fromtimestamp(int(value), tz=UTC)
        return RateLimited(
            reset or self.clock.now() + DEFAULT_RATE_LIMIT_WAIT, f"Bluesky rate limit {doing} for {self.name}"
        )

    def _error(self, error: RequestErrorBase, doing: str) -> ConnectorError:
        status = error.response.status_code if error.response is not None else None
        if status == 429:
            return self._rate_limited(error, doing)
        if status in (401, 403):
            self._client = None  # the next call logs in again, with the password
            if self.session_file is not None:
                self.session_file.unlink(missing_ok=True)
            return AuthFailed(f"Bluesky refused our session {doing} ({error}); check {self.password_env}")
        return ConnectorError(f"Bluesky failed {doing}: {status or type(error).__name__}: {error}")


def _not_connected(error: NetworkError) -> bool:
    import httpx

    return isinstance(error.__cause__, httpx.ConnectError)
