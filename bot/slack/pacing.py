"""The sender's own pace for Slack: token buckets per (method, channel), so 429s are rare.

Slack's published limits (docs.slack.dev, "Rate limits"): ``chat.postMessage`` about one
message per second per channel, short bursts allowed; other methods by tier, per method and
workspace (Tier 2 20, Tier 3 50, Tier 4 100 calls a minute). The `Pacer` keeps a little under
them: a send that would go beyond is not made now; the caller learns when it may go (the
outbox re-queues the row for then, so a waiting channel holds neither a claimed row nor the
sender, and other channels' messages go on). A 429 that comes anyway closes that bucket until
its ``Retry-After`` has passed.

One pacer per process: several workers share Slack's limit but not their pacers, so with N
senders a channel can see up to N times the pace, and Slack's 429 (with ``Retry-After``,
honoured) takes over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["POST", "TIERS", "Pace", "Pacer"]


@dataclass(frozen=True)
class Pace:
    """A bucket's shape: `burst` calls at once, then `per_second`."""

    per_second: float
    burst: float


# chat.postMessage per channel: Slack's ~1/s, with a burst of 3 (Slack publishes no number).
POST = Pace(per_second=1.0, burst=3.0)

# Per method (workspace-wide), a little under the published tier; unknown methods go unpaced.
TIERS: Mapping[str, Pace] = {
    "chat.update": Pace(per_second=45 / 60, burst=10.0),  # Tier 3: 50/min
    "conversations.open": Pace(per_second=45 / 60, burst=10.0),  # Tier 3: 50/min
    "chat.postEphemeral": Pace(per_second=90 / 60, burst=10.0),  # Tier 4: 100/min
    "views.open": Pace(per_second=90 / 60, burst=10.0),  # Tier 4
    "views.update": Pace(per_second=90 / 60, burst=10.0),  # Tier 4
    "views.publish": Pace(per_second=90 / 60, burst=10.0),  # Tier 4
    "users.info": Pace(per_second=90 / 60, burst=10.0),  # Tier 4
}


class Pacer:
    """Token buckets keyed by (method, channel); thread-safe.

    Args:
        now: the clock (the process's, so a fake clock in tests paces in fake time).
        post: the per-channel pace of ``chat.postMessage``.
        tiers: the per-method pace of other methods.
    """

    def __init__(
        self,
        now: Callable[[], datetime],
        *,
        post: Pace = POST,
        tiers: Mapping[str, Pace] = TIERS,
    ) -> None:
        self._now = now
        self._post = post
        self._tiers = dict(tiers)
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, datetime]] = {}  # key -> (tokens, at)
        self._closed: dict[tuple[str, str], datetime] = {}  # key -> until (after a 429)
        self._aliases: dict[str, str] = {}  # "#care" -> "C0CARE0001", as Slack answered
        # Calls put off to the same moment, by rank: key -> (that moment, rank -> how many).
        self._queued: dict[tuple[str, str], tuple[datetime, dict[int, int]]] = {}

    def learn(self, name: str, channel_id: str) -> None:
        """`name` (``#care``, as configured) is `channel_id` (as Slack answered): one bucket for both."""
        if not name or name == channel_id:
            return
        with self._lock:
            if self._aliases.get(name) == channel_id:
                return
            self._aliases[name] = channel_id
            for method in {m for m, c in self._buckets if c == name}:
                old, new = self._buckets.pop((method, name)), self._buckets.get((method, channel_id))
                self._buckets[(method, channel_id)] = old if new is None or old[0] < new[0] else new
            for method in {m for m, c in self._closed if c == name}:
                until = self._closed.pop((method, name))
                self._closed[(method, channel_id)] = max(until, self._closed.get((method, channel_id), until))

    def _key(self, method: str, channel: str | None) -> tuple[tuple[str, str], Pace] | None:
        """The bucket of a call and its pace (lock held); None: not paced."""
        if method == "chat.postMessage":
            channel = channel or ""
            return (method, self._aliases.get(channel, channel)), self._post
        pace = self._tiers.get(method)
        return ((method, ""), pace) if pace is not None else None

    def spend(self, method: str, channel: str | None) -> None:
        """A call made whatever the pace (a best-effort note): it uses a token, even one not there yet."""
        self._token(method, channel, take=True, force=True)

    def take(self, method: str, channel: str | None, *, rank: int = 0) -> datetime | None:
        """Take one call's token: None if the call may go now, else when it may go.

        Calls put off together are spread over the next free slots by `rank` (lower first: the
        outbox's urgency): each is told the slot after those of the same or a lower rank put
        off before it, so a queue of N cards is not re-tried N times a slot, while a breach
        put off later is still told the very next slot (where it wins: the claim goes by
        urgency, and a card that loses is put off again).
        """
        return self._token(method, channel, take=True, rank=rank)

    def ready(self, method: str, channel: str | None) -> datetime | None:
        """Like `take` without taking: None if a call could go now, else when it could."""
        return self._token(method, channel, take=False)

    def _token(
        self, method: str, channel: str | None, *, take: bool, rank: int = 0, force: bool = False
    ) -> datetime | None:
        now = self._now()
        with self._lock:
            found = self._key(method, channel)
            if found is None:
                return None
            key, pace = found
            until = self._closed.get(key)
            if until is not None:
                if until > now:
                    return until
                del self._closed[key]
            tokens, at = self._buckets.get(key, (pace.burst, now))
            tokens = min(pace.burst, tokens + max((now - at).total_seconds(), 0.0) * pace.per_second)
            if tokens >= 1.0 or force:
                if take:
                    self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            ready = now + timedelta(seconds=(1.0 - tokens) / pace.per_second)
            if not take:
                return ready
            moment, counts = self._queued.get(key, (ready, {}))
            if abs((moment - ready).total_seconds()) > 0.001:
                moment, counts = ready, {}
            ahead = sum(count for queued_rank, count in counts.items() if queued_rank <= rank)
            counts[rank] = counts.get(rank, 0) + 1
            self._queued[key] = (moment, counts)
            return moment + timedelta(seconds=ahead / pace.per_second)

    def block(self, method: str, channel: str | None, until: datetime) -> None:
        """Slack answered 429: no call of this bucket before `until` (its Retry-After)."""
        with self._lock:
            found = self._key(method, channel)
            if found is None:
                return
            key, _ = found
            self._closed[key] = max(until, self._closed.get(key, until))
            self._buckets[key] = (1.0, until)  # one call may go at `until`, then the pace
            self._queued.pop(key, None)
