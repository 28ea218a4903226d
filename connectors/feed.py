"""Feeds (RSS 2.0, Atom): blog comments become posts; comments by our staff answer them. Read-only.

Settings (``[accounts.<name>]`` with ``kind = "feed"``):
    ``url``            (required) the feed, e.g. a WordPress ``https://blog.example.com/comments/feed/``.
    ``staff_authors``  author names whose comments are ours (they answer the conversation);
                       compared without case. ``own_ids`` works too.
    ``timeout``        seconds for the HTTP request (default 20).

A feed cannot be answered through its feed, so `reply` always raises `NotSent`: configure the
account with ``can_reply = false`` so that no acknowledgement is ever queued for it, and answer
on the site itself (the staff comment then shows up in the feed and answers the conversation).

The cursor is JSON: ``{"etag", "modified", "seen"}``. The document is fetched here (httpx
through `bot.httputil.client`, our timeout, redirects followed) with ``If-None-Match``/
``If-Modified-Since`` from the cursor; 304 gives an empty batch and the same cursor. ``seen`` holds the ids of recent entries (every entry of the last
document, then older ones, at most `SEEN_LIMIT` unless the document itself holds more), so an
entry still in the feed is never handed over twice; the unique key on posts covers the rest.

The first fetch (no cursor) hands over every entry the document shows (a WordPress feed shows
the latest ten comments by default): comments still unanswered there are real work.

Threads: a comment belongs to the post it was written under. That is the ``thr:in-reply-to``
(RFC 4685, Atom feeds of WordPress and Blogger) link without its fragment when present, else
the comment's own link without ``#comment-N`` (WordPress RSS, which carries no threading
information), without a ``comment-page-N/`` path segment and without Blogger's ``showComment``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Unpack
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import feedparser
import httpx

from bot.httputil import client as http_client
from bot.httputil import retry_after
from connectors.base import (
    AuthFailed,
    Batch,
    Connector,
    ConnectorError,
    ConnectorOptions,
    InboundPost,
    NotSent,
    RateLimited,
    ReplyTarget,
)
from connectors.text import html_to_text

log = logging.getLogger("replyclock.connectors.feed")

DEFAULT_TIMEOUT = 20.0
SEEN_LIMIT = 500
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
USER_AGENT = "replyclock (feed connector; +https://github.com/replyclock)"
SETTINGS = ("url", "staff_authors", "timeout")
THREADING_NAMESPACES = (
    "http://purl.org/syndication/thread/1.0",
    "http://purl.org/rss/1.0/modules/threading/",
)
# Query parameters that point at one comment rather than at the post it belongs to.
COMMENT_QUERY_KEYS = frozenset({"showComment", "replytocom", "cid"})


@dataclass(frozen=True)
class FeedCursor:
    """What the connector remembers between fetches."""

    etag: str | None = None
    modified: str | None = None
    seen: tuple[str, ...] = ()

    @classmethod
    def load(cls, cursor: str | None) -> FeedCursor:
        if not cursor:
            return cls()
        try:
            data = json.loads(cursor)
        except ValueError:
            log.warning("feed cursor unreadable; starting afresh")
            return cls()
        if not isinstance(data, dict):
            return cls()
        etag, modified, seen = data.get("etag"), data.get("modified"), data.get("seen")
        return cls(
            etag=etag if isinstance(etag, str) else None,
            modified=modified if isinstance(modified, str) else None,
            seen=tuple(s for s in seen if isinstance(s, str)) if isinstance(seen, list) else (),
        )

    def dump(self) -> str:
        return json.dumps(
            {"etag": self.etag, "modified": self.modified, "seen": list(self.seen)},
            separators=(",", ":"),
            ensure_ascii=False,
        )


class FeedConnector(Connector):
    """Polls one RSS or Atom feed of comments."""

    kind: ClassVar[str] = "feed"
    settings_keys: ClassVar[tuple[str, ...] | None] = SETTINGS

    def __init__(
        self, name: str, *, transport: httpx.BaseTransport | None = None, **options: Unpack[ConnectorOptions]
    ) -> None:
        """Check the settings.

        Raises:
            ValueError: a setting is missing or malformed.
        """
        super().__init__(name, **options)
        url = self.settings.get("url")
        if not isinstance(url, str) or urlsplit(url.strip()).scheme not in ("http", "https"):
            raise ValueError("setting 'url' is required: the feed's http(s) address")
        staff = self.settings.get("staff_authors", [])
        if (
            isinstance(staff, str)
            or not isinstance(staff, Sequence)
            or not all(isinstance(s, str) for s in staff)
        ):
            raise ValueError("setting 'staff_authors' must be a list of author names")
        self.timeout = self.seconds_setting("timeout", DEFAULT_TIMEOUT)
        self.url = url.strip()
        self.staff_authors = frozenset(_name_key(s) for s in staff if s.strip())
        self._transport = transport

    # -- fetch -------------------------------------------------------------------------------------

    def fetch(self, cursor: str | None) -> Batch:
        """Entries not seen before, oldest first; an unchanged feed (304) gives none and the same cursor.

        Raises:
            RateLimited: 429 or 503 with a ``Retry-After``.
            AuthFailed: 401 or 403.
            ConnectorError: any other HTTP or network failure, or a document that is no feed.
        """
        state = FeedCursor.load(cursor)
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/atom+xml, application/rss+xml, application/xml;q=0.9, text/xml;q=0.8, */*;q=0.1",
            "Accept-Encoding": "gzip, deflate",
        }
        if state.etag:
            headers["If-None-Match"] = state.etag
        if state.modified:
            headers["If-Modified-Since"] = state.modified
        try:
            with (
                http_client(timeout=self.timeout, transport=self._transport, follow_redirects=True) as client,
                client.stream("GET", self.url, headers=headers) as response,
            ):
                if response.status_code == 304:
                    return Batch(posts=(), cursor=cursor)
                if response.status_code >= 300:
                    raise self._http_error(response)
                body = _read_capped(response)  # raw: decompressed below, within the same cap
                response_headers = response.headers
                final_url = str(response.url) or self.url
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as error:
            reason = str(error) or type(error).__name__
            raise ConnectorError(f"feed {self.url}: {reason}") from error
        if len(body) > MAX_DOCUMENT_BYTES:
            raise ConnectorError(f"feed {self.url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
        body = _decompress(body, response_headers.get("Content-Encoding", ""), self.url)

        parsed = feedparser.parse(
            io.BytesIO(body),  # a stream: feedparser would try a bytes value as a local file name
            response_headers={
                "content-type": response_headers.get("Content-Type", "application/xml"),
                "content-location": final_url,
            },
        )
        entries = list(parsed.get("entries") or [])
        cut_off = bool(parsed.get("bozo")) and not _ends_complete(body)
        if cut_off and entries:
            # A cut-off document: its last entry may be half there (an id without its text).
            # Leave it unseen; it comes whole with the next complete document.
            entries = entries[:-1]
        if not entries and (parsed.get("bozo") or not parsed.get("version")):
            problem = parsed.get("bozo_exception") or "not an RSS or Atom document"
            raise ConnectorError(f"feed {self.url} could not be read: {problem}")
        if parsed.get("bozo"):
            log.warning(
                "feed is malformed but readable",
                extra={"account": self.name, "problem": str(parsed.get("bozo_exception"))},
            )

        seen = set(state.seen)
        feed_info: Mapping[str, Any] = parsed.get("feed") or {}
        threading_keys = _threading_keys(parsed.get("namespaces") or {})
        current: dict[str, None] = {}  # the document's entry ids, in document order
        posts: list[InboundPost] = []
        for entry in entries:
            post = self._normalise(entry, feed_info, threading_keys)
            if post is None or post.external_id in current:
                continue
            current[post.external_id] = None
            if post.external_id not in seen:
                posts.append(post)
        posts.sort(key=lambda p: p.posted_at)
        limit = max(SEEN_LIMIT, len(current))
        remembered = [*current, *(s for s in state.seen if s not in current)][:limit]
        next_cursor = FeedCursor(
            # Validators of a cut-off document would turn the whole one away as "not modified".
            etag=None if cut_off else response_headers.get("ETag") or None,
            modified=None if cut_off else response_headers.get("Last-Modified") or None,
            seen=tuple(remembered),
        )
        return Batch(posts=tuple(posts), cursor=next_cursor.dump())

    def _http_error(self, response: httpx.Response) -> ConnectorError:
        code = response.status_code
        where = f"feed {self.url}: HTTP {code} {response.reason_phrase}"
        if code in (401, 403):
            return AuthFailed(where)
        header = response.headers.get("Retry-After")
        if code == 429 or (code == 503 and header):
            return RateLimited(self._retry_at(header, response.headers.get("Date")), where)
        return ConnectorError(where)

    def _retry_at(self, header: str | None, date: str | None) -> datetime:
        now = self.clock.now()
        wait = retry_after(header, now=now, date=date)
        if wait is None:
            wait = timedelta(minutes=5)
        return now + min(max(wait, timedelta(seconds=1)), timedelta(hours=6))

    def _normalise(
        self, entry: Mapping[str, Any], feed_info: Mapping[str, Any], threading_keys: Sequence[str]
    ) -> InboundPost | None:
        link = entry.get("link") or None
        external_id = entry.get("id") or link
        if not external_id:
            log.warning("feed entry without id or link skipped", extra={"account": self.name})
            return None
        detail = entry.get("author_detail") or {}
        name = (detail.get("name") or "").strip() or None
        email = (detail.get("email") or "").strip() or None
        if name is None and not detail:
            name = (entry.get("author") or "").strip() or None
        in_reply_to: Mapping[str, Any] = next(
            (entry[key] for key in threading_keys if isinstance(entry.get(key), Mapping)), {}
        )
        reply_ref = in_reply_to.get("ref") or None
        thread_source = in_reply_to.get("href") or link
        return InboundPost(
            external_id=str(external_id),
            author_id=name or email or "anonymous",
            author_name=name or email,
            text=_entry_text(entry),
            posted_at=_entry_time(entry) or _entry_time(feed_info) or self.clock.now(),
            thread_id=thread_of(thread_source) if thread_source else None,
            reply_to_id=str(reply_ref) if reply_ref else None,
            url=link,
            language=_language(entry, feed_info),
            raw={
                "title": entry.get("title"),
                "author_email": email,
                "author_url": detail.get("href"),
                "in_reply_to": dict(in_reply_to),
            },
        )

    # -- the rest of the interface -----------------------------------------------------------------

    def reply(self, to: ReplyTarget, text: str) -> str:
        """Feeds are read-only: always `NotSent` (the account must have ``can_reply = false``)."""
        raise NotSent("feeds are read-only")

    def is_own(self, post: InboundPost) -> bool:
        """A comment by one of `staff_authors` (or by an id in ``own_ids``)."""
        if post.author_name is not None and _name_key(post.author_name) in self.staff_authors:
            return True
        return super().is_own(post)


def thread_of(link: str) -> str:
    """The post a comment link belongs to: the link without fragment, comment page and comment query."""
    parts = urlsplit(link.strip())
    path = re.sub(r"/comment-page-\d+/?$", "/", parts.path)
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in COMMENT_QUERY_KEYS]
    )
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def _threading_keys(namespaces: Mapping[str, str]) -> list[str]:
    """feedparser's key for thr:in-reply-to: the prefix the document gave the threading namespace."""
    keys = [
        f"{prefix}_in-reply-to"
        for prefix, uri in namespaces.items()
        if uri in THREADING_NAMESPACES and prefix
    ]
    return [*keys, "thr_in-reply-to"]


def _entry_text(entry: Mapping[str, Any]) -> str:
    """The full comment (content:encoded, Atom content) if there, else the summary, as plain text."""
    candidates = list(entry.get("content") or [])
    summary = entry.get("summary_detail") or (
        {"value": entry["summary"], "type": "text/html"} if entry.get("summary") else None
    )
    if summary:
        candidates.append(summary)
    for detail in candidates:
        value = detail.get("value") or ""
        if not value.strip():
            continue
        if detail.get("type") == "text/plain":
            return "\n".join(line.strip() for line in value.strip().splitlines())
        return html_to_text(value)
    return ""


def _entry_time(item: Mapping[str, Any]) -> datetime | None:
    for key in ("published_parsed", "updated_parsed"):
        value = item.get(key)
        if isinstance(value, time.struct_time):
            return datetime(*value[:6], tzinfo=UTC)
    return None


def _language(entry: Mapping[str, Any], feed_info: Mapping[str, Any]) -> str | None:
    for detail in [*(entry.get("content") or []), entry.get("summary_detail") or {}]:
        if detail.get("language"):
            return _primary_language(detail["language"])
    language = feed_info.get("language")
    return _primary_language(language) if isinstance(language, str) and language else None


def _primary_language(tag: str) -> str:
    """ "en-US" -> "en", as routing rules and acknowledgement templates name languages."""
    return tag.split("-")[0].split("_")[0].strip().lower()


def _read_capped(response: httpx.Response) -> bytes:
    """The raw (still encoded) body, reading no more than one byte past `MAX_DOCUMENT_BYTES`."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_DOCUMENT_BYTES:
            break
    return b"".join(chunks)[: MAX_DOCUMENT_BYTES + 1]


def _decompress(body: bytes, encoding: str, url: str) -> bytes:
    """The body without its content encoding, refusing more than `MAX_DOCUMENT_BYTES` of output."""
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        formats = [16 + zlib.MAX_WBITS]
    elif encoding == "deflate":
        formats = [zlib.MAX_WBITS, -zlib.MAX_WBITS]  # zlib-wrapped, or raw as some servers send it
    else:
        return body
    problem: Exception | None = None
    for wbits in formats:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, MAX_DOCUMENT_BYTES + 1)
        except zlib.error as error:
            problem = error
            continue
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ConnectorError(f"feed {url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
        return data
    raise ConnectorError(f"feed {url}: could not decompress ({encoding}): {problem}")


def _ends_complete(body: bytes) -> bool:
    """Whether the document ends with the closing tag of an RSS, Atom or RSS 1.0 root."""
    tail = body[-64:].rstrip(b" \t\r\n\x00").lower()
    return tail.endswith((b"</rss>", b"</feed>", b"</rdf:rdf>"))


def _name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


__all__ = ["FeedConnector", "FeedCursor", "thread_of"]
