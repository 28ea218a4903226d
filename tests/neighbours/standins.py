"""The loopback Slack and X stand-ins, made to fail on a timetable and to log when each request came.

`FlakySlack` is the real `SlackStandIn` whose faults follow wall-clock windows ("answer 500 from
t1 to t2") instead of counts, and which keeps, beside each recorded `Call`, when the request
arrived and when it was answered (a call held past the client's timeout is one the client
never saw answered, although Slack acted on it: Slack's "posted, but the answer was lost").

`LoggedX` is the real `XServer` serving a `Timeline`, with the arrival time and the answer of
every request, and `arm` to add tweets and scripted answers in one step (no poll in between).

Both can hold the next request (a Slack post, an X mentions poll) until the test releases it:
the way to have a call in flight at the moment something else (the database) goes away.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bot.demo.standin import Call, SlackStandIn, _Fault, _Reply
from tests.connectors.x_server import Reply, Request, Timeline, XServer

MENTIONS = r"/2/users/[0-9]+/mentions"
HOLD_LIMIT = 20.0  # seconds a held call waits for `release` at most
SNOWFLAKE_EPOCH_MS = 1288834974657


# --------------------------------------------------------------------------------------------
# Slack


@dataclass(frozen=True)
class Outage:
    """From `start` to `end` (``time.time()``), every Web API call fails this way.

    `delay` > 0: the answer is held that long, then the call is carried out as usual (a timeout
    for a client that waits less). Otherwise the call is answered `status` (429 with
    ``Retry-After: retry_after``; 5xx with ``{"ok": false, "error": error}``) and changes nothing.
    """

    name: str
    start: float
    end: float
    status: int = 500
    error: str = "internal_error"
    retry_after: int | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class Exchange:
    """A recorded call with when its request arrived and when the stand-in answered it."""

    call: Call
    arrived: float
    answered: float
    held: bool = False  # held by `FlakySlack.hold_next_post` until released

    @property
    def took(self) -> float:
        return self.answered - self.arrived


class FlakySlack(SlackStandIn):
    """A `SlackStandIn` that fails during scheduled outages and times every exchange."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.outages: list[Outage] = []
        self._exchanges: list[Exchange] = []
        self._arrival = threading.local()
        self.held = threading.Event()
        self._released = threading.Event()
        self._holding = False

    def start(self) -> FlakySlack:
        super().start()
        server = self._server
        assert server is not None
        default = server.handle_error

        def handle_error(request: Any, client_address: Any) -> None:
            # Writing the answer to a client that timed out and hung up is expected here.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                default(request, client_address)

        setattr(server, "handle_error", handle_error)  # noqa: B010 - an instance override, not a method
        return self

    def hold_next_post(self) -> None:
        """Hold the next chat.postMessage (before acting on it) until `release`; `held` is set when it comes."""
        with self._lock:
            self.held = threading.Event()
            self._released = threading.Event()
            self._holding = True

    def release(self) -> None:
        self._released.set()

    def schedule(self, outage: Outage) -> None:
        with self._lock:
            self.outages.append(outage)

    def outage_at(self, at: float) -> Outage | None:
        with self._lock:
            return next((o for o in self.outages if o.start <= at < o.end), None)

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    # The stand-in's own hooks: a fault or a delay per call.

    def _take_delay(self, method: str) -> float:
        with self._lock:
            hold = self._holding and method == "chat.postMessage"
            if hold:
                self._holding = False
        self._arrival.held = hold
        if hold:
            self.held.set()
            self._released.wait(HOLD_LIMIT)
        outage = self.outage_at(time.time())
        if outage is not None and outage.delay > 0:
            return outage.delay
        return super()._take_delay(method)

    def _take_fault(self, method: str) -> _Fault | None:
        outage = self.outage_at(time.time())
        if outage is not None and outage.delay == 0:
            return _Fault(method, outage.status, outage.error, outage.retry_after, 1)
        return super()._take_fault(method)

    def _handle(self, verb: str, raw_path: str, headers: dict[str, str], body: bytes) -> _Reply:
        self._arrival.at = time.time()
        self._arrival.held = False
        return super()._handle(verb, raw_path, headers, body)

    def _record(
        self, method: str, params: dict[str, Any], headers: dict[str, str], token: str | None, reply: _Reply
    ) -> _Reply:
        with self._lock:  # re-entrant: the base class appends the call under the same lock
            answered = super()._record(method, params, headers, token, reply)
            call = self._calls[-1]
            arrived = getattr(self._arrival, "at", call.timestamp)
            held = bool(getattr(self._arrival, "held", False))
            self._exchanges.append(Exchange(call, arrived, call.timestamp, held))
        return answered


# --------------------------------------------------------------------------------------------
# X


@dataclass(frozen=True)
class Served:
    """One request to the X stand-in, when it arrived, and what it was answered."""

    at: float
    request: Request
    reply: Reply
    held: bool = False  # held by `LoggedX.hold_next_mentions` until released

    @property
    def tweet_ids(self) -> list[str]:
        """Ids of the tweets in a successful mentions page."""
        if self.reply.status != 200 or self.request.method != "GET":
            return []
        data = self.reply.json().get("data") or []
        return [str(t["id"]) for t in data]


class LoggedX(XServer):
    """`XServer` with a `Timeline`, a timed request log, and atomic arming."""

    def __init__(self) -> None:
        super().__init__()
        self.timeline = Timeline()
        self.log: list[Served] = []
        self.held = threading.Event()
        self._released = threading.Event()
        self._holding = False

    def __enter__(self) -> LoggedX:
        super().__enter__()
        return self

    def hold_next_mentions(self) -> None:
        """Hold the next mentions request until `release`; `held` is set when it comes."""
        with self._lock:
            self._hold_next()

    def _hold_next(self) -> None:
        self.held = threading.Event()
        self._released = threading.Event()
        self._holding = True

    def release(self) -> None:
        self._released.set()

    def answer(self, request: Request) -> Reply:
        at = time.time()
        with self._lock:
            hold = (
                self._holding and request.method == "GET" and re.fullmatch(MENTIONS, request.path) is not None
            )
            if hold:
                self._holding = False
        if hold:
            self.held.set()
            self._released.wait(HOLD_LIMIT)
        reply = super().answer(request)
        with self._lock:
            self.log.append(Served(at, request, reply, hold))
        return reply

    def arm(
        self,
        tweets: Sequence[Mapping[str, Any]] = (),
        *,
        users: Sequence[Mapping[str, Any]] = (),
        mentions: Iterable[Reply | None] = (),
        hold: bool = False,
    ) -> None:
        """Add `tweets` to the timeline and script the next mentions answers, with no request between
        (`hold`: and hold the next mentions request, see `hold_next_mentions`)."""
        with self._lock:
            assert self.timeline is not None
            self.timeline.add(*tweets, users=users)
            self._scripts.setdefault(("GET", MENTIONS), deque()).extend(mentions)
            if hold:
                self._hold_next()

    def served(self, method: str = "GET", mentions_only: bool = True) -> list[Served]:
        with self._lock:
            found = [s for s in self.log if s.request.method == method]
        if mentions_only:
            found = [s for s in found if s.request.path.endswith("/mentions")]
        return found


def snowflake(at: datetime, sequence: int) -> str:
    """A tweet id created at `at` (X's ids carry their creation time)."""
    return str(((int(at.timestamp() * 1000) - SNOWFLAKE_EPOCH_MS) << 22) | sequence)
