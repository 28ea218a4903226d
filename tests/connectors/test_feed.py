"""The feed connector: real-world-shaped RSS and Atom comment feeds from a loopback server that honours ETags."""

from __future__ import annotations

import gzip
import json
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.channels import build_connectors
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from bot.jobs import Jobs
from connectors.base import AuthFailed, ConnectorError, NotSent, RateLimited, ReplyTarget
from connectors.feed import SEEN_LIMIT, FeedConnector, FeedCursor, thread_of
from connectors.text import html_to_text
from storage.models import Account, Conversation, Outbox, Post
from tests.conftest import MONDAY, POLICY_TOML

FEEDS = Path(__file__).parent / "feeds"
FEED_PATH = "/comments/feed/"


@dataclass
class Document:
    body: bytes
    content_type: str = "application/rss+xml; charset=UTF-8"
    etag: str | None = None
    last_modified: datetime | None = None


@dataclass
class FeedServer:
    """Serves documents by path; answers 304 to a matching If-None-Match / If-Modified-Since."""

    documents: dict[str, Document] = field(default_factory=dict)
    errors: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    sent_headers: list[dict[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def serve(
        self, name: str, *, path: str = FEED_PATH, etag: bool = True, modified: datetime | None = MONDAY
    ) -> None:
        body = (FEEDS / name).read_bytes()
        kind = (
            "application/atom+xml"
            if name.endswith(".atom")
            else "text/html"
            if name.endswith(".html")
            else None
        )
        self.documents[path] = Document(
            body=body,
            content_type=f"{kind or 'application/rss+xml'}; charset=UTF-8",
            etag=f'"{abs(hash(body)):x}"' if etag else None,
            last_modified=modified,
        )

    def url(self, path: str = FEED_PATH) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.requests.append(headers)
        path = handler.path
        if path in self.errors:
            status, extra = self.errors[path]
            self._send(
                handler, status, b"<html><body>error</body></html>", {"Content-Type": "text/html", **extra}
            )
            return
        document = self.documents.get(path)
        if document is None:
            self._send(handler, 404, b"not found", {"Content-Type": "text/plain"})
            return
        validators: dict[str, str] = {}
        if document.etag:
            validators["ETag"] = document.etag
        if document.last_modified:
            validators["Last-Modified"] = format_datetime(document.last_modified, usegmt=True)
        if_none_match = headers.get("if-none-match")
        if_modified_since = headers.get("if-modified-since")
        if if_none_match is not None:
            not_modified = document.etag is not None and document.etag in {
                t.strip() for t in if_none_match.split(",")
            }
        elif if_modified_since is not None and document.last_modified is not None:
            not_modified = document.last_modified <= parsedate_to_datetime(if_modified_since)
        else:
            not_modified = False
        if not_modified:
            self._send(handler, 304, b"", validators)
            return
        body = document.body
        extra = {"Content-Type": document.content_type, **validators}
        if "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body)
            extra["Content-Encoding"] = "gzip"
        self._send(handler, 200, body, extra)

    def _send(
        self, handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        self.answers.append(status)
        self.sent_headers.append(headers)
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        if status != 304:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if status != 304:
            handler.wfile.write(body)


@pytest.fixture
def server() -> Iterator[FeedServer]:
    feeds = FeedServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            feeds.answer(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    feeds._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=feeds._server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield feeds
    feeds._server.shutdown()
    feeds._server.server_close()
    thread.join(timeout=5)


def connector_for(server: FeedServer, clock: FakeClock | None = None, **settings: Any) -> FeedConnector:
    return FeedConnector(
        "blog_comments",
        settings={"url": server.url(), "staff_authors": ["Maria from Acme"], **settings},
        clock=clock,
    )


def feed_policy(url: str) -> Policy:
    text = (
        POLICY_TOML
        + f"""
[accounts.blog_comments]
kind = "feed"
can_reply = false
poll_interval = "5m"
url = "{url}"
staff_authors = ["Maria from Acme"]
"""
    )
    return parse_policy(tomllib.loads(text), source="tests/connectors/test_feed.py", text=text)


@pytest.fixture
def feed_ctx(server: FeedServer, engine: Engine, clock: FakeClock) -> AppContext:
    return AppContext(policy=feed_policy(server.url()), engine=engine, clock=clock)


def stored_cursor(ctx: AppContext) -> str | None:
    with ctx.sessions() as session:
        return session.scalars(select(Account.cursor).where(Account.name == "blog_comments")).one_or_none()


# -- parsing ---------------------------------------------------------------------------------------


def test_wordpress_rss_comments_are_parsed(server: FeedServer) -> None:
    server.serve("wordpress-comments.rss")
    batch = connector_for(server).fetch(None)
    jana, tom = batch.posts  # oldest first
    assert jana.external_id == "https://blog.acme.example/?p=812#comment-1041"
    assert jana.author_id == jana.author_name == "Jana Novák" and jana.author_handle is None
    assert (
        jana.text
        == "Will existing customers keep the old price until renewal?\n\nI paid for a year in March & would like to plan ahead."
    )
    assert jana.posted_at == datetime(2026, 11, 23, 7, 41, 9, tzinfo=UTC)
    assert jana.thread_id == "https://blog.acme.example/2026/11/new-pricing-2027/"
    assert jana.url == "https://blog.acme.example/2026/11/new-pricing-2027/#comment-1041"
    assert (
        jana.reply_to_id is None and jana.language is None
    )  # WordPress writes no <language> in comment feeds
    assert tom.text == (
        "Since 4.2 the CSV export drops every row after 10\u00a0000.\n"
        "Is that a known bug? Our month-end report depends on it \u2013 thanks!"
    )
    assert tom.thread_id == "https://blog.acme.example/2026/11/release-notes-4-2/"  # comment-page-2/ dropped
    assert batch.more is False
    cursor = FeedCursor.load(batch.cursor)
    assert cursor.etag and cursor.modified == "Mon, 23 Nov 2026 08:00:00 GMT"
    assert cursor.seen == (tom.external_id, jana.external_id)
    (request,) = server.requests
    assert "if-none-match" not in request and "replyclock" in request["user-agent"]
    assert server.answers == [200]


def test_blogger_atom_comments_with_threading_are_parsed(server: FeedServer) -> None:
    server.serve("blogger-comments.atom")
    connector = connector_for(server, staff_authors=["Acme Engineering"])
    anonymous, pieter, ours = connector.fetch(None).posts
    post = "https://acme-engineering.blogspot.com/2026/11/offline-sync.html"
    assert pieter.external_id == "tag:blogger.com,1999:blog-4783316590218761273.post-8823051366279304112"
    assert pieter.author_id == "Pieter de Vries"  # not the e-mail: Blogger gives everyone noreply@blogger.com
    assert pieter.raw["author_email"] == "noreply@blogger.com"
    assert (
        pieter.text == "Does the new sync work offline? We often lose signal on the building sites.\n\nPieter"
    )
    assert pieter.posted_at == datetime(2026, 11, 23, 7, 47, 55, tzinfo=UTC)  # +01:00 in the feed
    assert pieter.thread_id == ours.thread_id == post
    assert pieter.reply_to_id == "tag:blogger.com,1999:blog-4783316590218761273.post-1379926120530431850"
    assert pieter.url == f"{post}?showComment=1763884075120#c8823051366279304112"
    assert ours.text.endswith("Conflicts show up in the History tab.")
    assert connector.is_own(ours) and not connector.is_own(pieter)
    assert anonymous.author_id == "Anonymous"
    assert anonymous.thread_id == "https://acme-engineering.blogspot.com/2026/11/eu-data-residency.html"


def test_thread_of_a_comment_link() -> None:
    assert thread_of("https://b.example/2026/11/post/#comment-12") == "https://b.example/2026/11/post/"
    assert (
        thread_of("https://b.example/2026/11/post/comment-page-3/#comment-12")
        == "https://b.example/2026/11/post/"
    )
    assert thread_of("https://b.example/?p=812#comment-1041") == "https://b.example/?p=812"
    assert (
        thread_of("https://x.blogspot.com/2026/11/p.html?showComment=1763#c55")
        == "https://x.blogspot.com/2026/11/p.html"
    )
    assert (
        thread_of("https://b.example/post/?replytocom=7&lang=de#respond") == "https://b.example/post/?lang=de"
    )


def test_comment_html_becomes_plain_text() -> None:
    html = (
        '<p class="comment-reply-to">In reply to <a href="https://b.example/p/#comment-1">Jana</a>.</p>\n'
        '<p>Yes&nbsp;&#8211; see <a href="https://b.example/faq">our FAQ</a>:</p>\n<ul><li>one</li><li>two</li></ul>'
        "<script>alert('x')</script><style>p{}</style>"
    )
    assert html_to_text(html) == "In reply to Jana.\n\nYes\u00a0\u2013 see our FAQ:\n\n- one\n- two"
    assert html_to_text("plain &amp; simple") == "plain & simple"


# -- conditional GET and dedupe --------------------------------------------------------------------


def test_an_unchanged_feed_is_not_fetched_again(server: FeedServer) -> None:
    server.serve("wordpress-comments.rss")
    connector = connector_for(server)
    first = connector.fetch(None)
    second = connector.fetch(first.cursor)
    assert second.posts == () and second.cursor == first.cursor
    assert server.answers == [200, 304]
    cursor = FeedCursor.load(first.cursor)
    assert server.requests[1]["if-none-match"] == cursor.etag
    assert server.requests[1]["if-modified-since"] == cursor.modified
    assert server.requests[0]["accept-encoding"] == "gzip, deflate"
    assert server.sent_headers[0]["Content-Encoding"] == "gzip"

    # A server without ETags still answers If-Modified-Since.
    server.serve("wordpress-comments.rss", etag=False)
    third = connector.fetch(None)
    assert FeedCursor.load(third.cursor).etag is None
    assert connector.fetch(third.cursor).posts == () and server.answers[-1] == 304


def test_entries_are_handed_over_once_across_fetches(server: FeedServer) -> None:
    server.serve("wordpress-comments.rss", etag=False, modified=None)  # no validators: always 200
    connector = connector_for(server)
    first = connector.fetch(None)
    assert len(first.posts) == 2
    again = connector.fetch(first.cursor)
    assert again.posts == () and server.answers == [200, 200]
    server.serve("wordpress-comments-answered.rss", etag=False, modified=None)
    later = connector.fetch(again.cursor)
    assert [p.author_name for p in later.posts] == ["Maria from Acme", "Priya S."]
    assert len(FeedCursor.load(later.cursor).seen) == 4


def test_the_seen_list_is_bounded_and_keeps_what_the_feed_still_shows(server: FeedServer) -> None:
    server.serve("wordpress-comments.rss", etag=False, modified=None)
    old = FeedCursor(
        seen=tuple(f"https://blog.acme.example/?p=1#comment-{n}" for n in range(SEEN_LIMIT + 100))
    )
    batch = connector_for(server).fetch(old.dump())
    seen = FeedCursor.load(batch.cursor).seen
    assert len(seen) == SEEN_LIMIT
    assert seen[:2] == (
        "https://blog.acme.example/?p=790#comment-1043",
        "https://blog.acme.example/?p=812#comment-1041",
    )
    assert seen[2] == old.seen[0]


def test_an_empty_feed_is_fine(server: FeedServer) -> None:
    server.serve("empty-comments.rss")
    batch = connector_for(server).fetch(None)
    assert batch.posts == () and FeedCursor.load(batch.cursor).etag is not None


# -- broken feeds ----------------------------------------------------------------------------------


def test_a_cut_off_feed_gives_its_complete_entries_and_the_rest_later(server: FeedServer) -> None:
    server.serve("truncated-comments.rss")
    connector = connector_for(server)
    batch = connector.fetch(None)
    # feedparser reads the first item whole and the second without its text: only the first is taken.
    assert [p.author_name for p in batch.posts] == ["Tom K."]
    cursor = FeedCursor.load(batch.cursor)
    assert cursor.seen == ("https://blog.acme.example/?p=790#comment-1043",)
    assert cursor.etag is None and cursor.modified is None  # so the whole document is fetched next time
    server.serve("wordpress-comments.rss")
    (jana,) = connector.fetch(batch.cursor).posts
    assert jana.author_name == "Jana Novák" and jana.text.endswith("would like to plan ahead.")


def test_a_broken_feed_raises_and_the_poll_keeps_the_cursor(
    server: FeedServer, feed_ctx: AppContext, clock: FakeClock
) -> None:
    server.serve("wordpress-comments.rss")
    connectors = build_connectors(feed_ctx.policy, {})
    jobs = Jobs(feed_ctx, connectors, OutboxSender(feed_ctx, {}), send_after_poll=False)
    assert jobs.poll("blog_comments") == 2
    cursor = stored_cursor(feed_ctx)

    server.serve("maintenance.html")  # 200 with an HTML page: bozo and no entries
    with pytest.raises(ConnectorError, match="could not be read"):
        connectors["blog_comments"].fetch(None)
    assert jobs.poll("blog_comments") == 0
    with feed_ctx.sessions() as session:
        account = session.scalars(select(Account).where(Account.name == "blog_comments")).one()
        assert account.cursor == cursor
        assert account.last_error is not None and "could not be read" in account.last_error
        assert account.parked_until is not None and account.parked_until > clock.now()

    server.errors[FEED_PATH] = (500, {})
    with pytest.raises(ConnectorError, match="HTTP 500"):
        connectors["blog_comments"].fetch(cursor)
    clock.advance(timedelta(minutes=10))
    assert jobs.poll("blog_comments") == 0 and stored_cursor(feed_ctx) == cursor


def test_http_refusals_map_to_rate_limits_and_auth_failures(server: FeedServer, clock: FakeClock) -> None:
    connector = connector_for(server, clock)
    server.errors[FEED_PATH] = (429, {"Retry-After": "120"})
    with pytest.raises(RateLimited) as limited:
        connector.fetch(None)
    assert limited.value.reset_at == clock.now() + timedelta(seconds=120)
    server.errors[FEED_PATH] = (403, {})
    with pytest.raises(AuthFailed):
        connector.fetch(None)
    del server.errors[FEED_PATH]
    unreachable = FeedConnector("blog_comments", settings={"url": server.url("/nothing-here/"), "timeout": 2})
    with pytest.raises(ConnectorError, match="HTTP 404"):
        unreachable.fetch(None)


# -- end to end ------------------------------------------------------------------------------------


def test_a_staff_comment_in_the_thread_answers_the_conversation(
    server: FeedServer, feed_ctx: AppContext, clock: FakeClock
) -> None:
    ctx = feed_ctx
    server.serve("wordpress-comments.rss")
    connectors = build_connectors(ctx.policy, {})
    jobs = Jobs(ctx, connectors, OutboxSender(ctx, {}), send_after_poll=False)
    assert jobs.poll("blog_comments") == 2
    with ctx.sessions() as session:
        conversations = {c.author_name: c for c in session.scalars(select(Conversation))}
        assert set(conversations) == {"Jana Novák", "Tom K."}
        assert conversations["Jana Novák"].thread_key == "https://blog.acme.example/2026/11/new-pricing-2027/"
        # can_reply = false: cards for the team, no acknowledgement for a feed nobody can post to.
        assert sorted(session.scalars(select(Outbox.kind))) == ["card", "card"]

    clock.advance(timedelta(minutes=30))
    assert jobs.poll("blog_comments") == 0  # unchanged: 304
    server.serve("wordpress-comments-answered.rss", modified=MONDAY + timedelta(minutes=25))
    assert jobs.poll("blog_comments") == 2
    with ctx.sessions() as session:
        conversations = {c.author_name: c for c in session.scalars(select(Conversation))}
        assert len(conversations) == 2
        jana, tom = conversations["Jana Novák"], conversations["Tom K."]
        assert jana.status == "answered" and jana.answered_by == "account:Maria from Acme"
        assert jana.first_response_at == datetime(2026, 11, 23, 8, 12, 47, tzinfo=UTC)
        assert tom.status == "open"  # Priya wrote in the same post's thread: it continues Tom's
        directions = {p.author_name: p.direction for p in session.scalars(select(Post))}
        assert directions == {"Jana Novák": "in", "Tom K.": "in", "Maria from Acme": "out", "Priya S.": "in"}
    assert server.answers == [200, 304, 200]
    assert json.loads(stored_cursor(ctx) or "{}")["modified"] == "Mon, 23 Nov 2026 08:25:00 GMT"


# -- the rest of the interface ---------------------------------------------------------------------


def test_feeds_are_read_only_and_settings_are_checked(server: FeedServer) -> None:
    connector = connector_for(server)
    with pytest.raises(NotSent, match="read-only"):
        connector.reply(ReplyTarget("x", "a", None, None), "hello")
    with pytest.raises(ValueError, match="'url'"):
        FeedConnector("blog_comments", settings={})
    with pytest.raises(ValueError, match="'url'"):
        FeedConnector("blog_comments", settings={"url": "file:///etc/passwd"})
    with pytest.raises(ValueError, match="staff_authors"):
        FeedConnector("blog_comments", settings={"url": server.url(), "staff_authors": "Maria"})
    with pytest.raises(ValueError, match="did you mean 'staff_authors'"):
        FeedConnector("blog_comments", settings={"url": server.url(), "staff_author": ["Maria"]})
    built = build_connectors(feed_policy(server.url()), {})["blog_comments"]
    assert isinstance(built, FeedConnector) and built.staff_authors == frozenset({"maria from acme"})
