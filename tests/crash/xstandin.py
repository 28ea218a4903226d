"""A loopback X whose mentions timeline grows while `replyclock run` is killed and restarted.

`CrashX` is tests/connectors/x_server.XServer (the recorded response shapes, X's paging: newest
first, ``since_id``, ``max_results``, opaque ``next_token`` bound to a position) with three
additions for the crash harness:

- tweets become visible when `publish` is called (the harness publishes them on a schedule);
- every mentions page served and every ``POST /2/tweets`` received is recorded with its arrival
  time (``time.monotonic()``), and `wait_until` lets the harness wait for the next one;
- `arm_stall` holds the answer to the next ``POST /2/tweets`` (the tweet is already created,
  as X would have done), so that a kill lands while the call is in flight.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.connectors.x_server import Reply, Request, Timeline, XServer

MENTIONS_PATH = re.compile(r"/2/users/[0-9]+/mentions")
SNOWFLAKE_EPOCH_MS = 1288834974657


def snowflake(at: float, sequence: int) -> str:
    """A tweet id for wall-clock time `at` (seconds since the epoch); `sequence` keeps ids unique."""
    return str(((int(at * 1000) - SNOWFLAKE_EPOCH_MS) << 22) | (sequence & 0x3FFFFF))


@dataclass(frozen=True)
class PageServed:
    """One answer to ``GET /2/users/:id/mentions``."""

    at: float
    ids: tuple[str, ...]
    since_id: str | None
    pagination_token: str | None


@dataclass(frozen=True)
class PostReceived:
    """One ``POST /2/tweets``: what our account posted (an acknowledgement, in this harness)."""

    at: float
    in_reply_to: str | None
    text: str
    created_id: str | None
    status: int


def _ignore_client_errors(request: Any, client_address: Any) -> None:
    """The server thread answering a process that was killed mid-call gets a broken pipe: expected."""


class CrashX(XServer):
    """The loopback X API with a growing timeline, request records and a stall for POST /2/tweets."""

    def __init__(self) -> None:
        super().__init__()
        self.timeline = Timeline()
        self._httpd.handle_error = _ignore_client_errors  # type: ignore[method-assign]
        self.published: dict[str, dict[str, Any]] = {}
        self.pages: list[PageServed] = []
        self.posts: list[PostReceived] = []
        self.stalled = threading.Event()
        self._seen = threading.Condition()
        self._stall = 0.0
        self._release = threading.Event()

    def __enter__(self) -> CrashX:
        super().__enter__()
        return self

    # -- the timeline ---------------------------------------------------------------------------

    def publish(self, tweets: Sequence[Mapping[str, Any]], users: Sequence[Mapping[str, Any]] = ()) -> None:
        """Make `tweets` visible in the mentions timeline from now on."""
        with self._lock:
            assert self.timeline is not None
            self.timeline.add(*tweets, users=users)
            for tweet in tweets:
                self.published[str(tweet["id"])] = dict(tweet)

    # -- observing and stalling -----------------------------------------------------------------

    def arm_stall(self, seconds: float) -> None:
        """Hold the answer to the next POST /2/tweets for up to `seconds` (or until `release`)."""
        with self._seen:
            self._stall = seconds
            self.stalled.clear()
            self._release.clear()

    def release(self) -> None:
        """Disarm the stall and let a held answer go."""
        with self._seen:
            self._stall = 0.0
        self._release.set()
        self.stalled.clear()

    def counts(self) -> tuple[int, int]:
        """(pages served, posts received) so far: marks to wait beyond."""
        with self._seen:
            return len(self.pages), len(self.posts)

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition` (called with the records locked) holds; False on timeout."""
        with self._seen:
            return self._seen.wait_for(condition, timeout)

    def answer(self, request: Request) -> Reply:
        reply = super().answer(request)
        now = time.monotonic()
        if request.method == "GET" and MENTIONS_PATH.fullmatch(request.path):
            data = reply.json().get("data", []) if reply.status == 200 else []
            page = PageServed(
                now,
                tuple(str(tweet["id"]) for tweet in data),
                request.query.get("since_id"),
                request.query.get("pagination_token"),
            )
            with self._seen:
                self.pages.append(page)
                self._seen.notify_all()
        elif request.method == "POST" and request.path == "/2/tweets":
            body = request.json()
            created = reply.json().get("data", {}).get("id") if reply.status == 201 else None
            target = (body.get("reply") or {}).get("in_reply_to_tweet_id")
            with self._seen:
                self.posts.append(PostReceived(now, target, str(body.get("text", "")), created, reply.status))
                stall, self._stall = self._stall, 0.0
                if stall:
                    self.stalled.set()
                self._seen.notify_all()
            if stall:
                self._release.wait(stall)
        return reply
