"""The connector interface: every channel normalises its posts to `InboundPost` at the edge."""

from __future__ import annotations

import os
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from difflib import get_close_matches
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypedDict

from bot.core.clock import Clock, SystemClock

ENTRY_POINT_GROUP = "replyclock.connectors"
_HTTP_URL = re.compile(r"https?://[^\s/?#]+(/[^\s?#]*)?")


@dataclass(frozen=True)
class InboundPost:
    """A post as replyclock sees it, whatever channel it came from.

    Attributes:
        external_id: the platform's id, unique per account.
        author_id: the platform's stable id of the author.
        text: plain text (HTML already stripped by the connector). Untrusted.
        posted_at: the platform's timestamp, timezone-aware.
        thread_id: the platform's thread or conversation id, when it has one.
        reply_to_id: external id of the post this one answers, when known.
        acknowledge: False when the post must never be acknowledged automatically (an automatic
            e-mail such as an out-of-office reply or a bounce, an X search hit nobody addressed to us).
        team, priority: where the post goes, set by a connector that knows better than the routing
            rules (an X search hit goes to the listening team at low priority); None: the rules decide.
        meta: channel details kept with the post and handed back to the connector when answering
            it (`ReplyTarget.extra`), e.g. an e-mail's subject and Message-ID. JSON-serialisable.
            Ingest reads two keys: ``automatic`` (why the post is machine-written: it is never
            acknowledged and does not reopen an answered conversation) and ``bounce`` (a delivery
            failure of our answer: it does reopen).
    """

    external_id: str
    author_id: str
    text: str
    posted_at: datetime
    author_name: str | None = None
    author_handle: str | None = None
    url: str | None = None
    thread_id: str | None = None
    reply_to_id: str | None = None
    language: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    acknowledge: bool = True
    team: str | None = None
    priority: str | None = None
    meta: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.posted_at.tzinfo is None:
            raise ValueError(f"post {self.external_id}: posted_at must be timezone-aware")
        if not self.external_id:
            raise ValueError("post without external_id")


@dataclass(frozen=True)
class SkippedItem:
    """An item of a page that could not be turned into a post: left out, recorded for staff.

    Attributes:
        field: Where in the page the problem is, e.g. ``data[2].id`` or ``[0]``.
        reason: What was wrong, e.g. ``expected a string of digits, got number 123``.
        raw: The item as it came (JSON-serialisable), for staff to inspect.
        external_id: The item's id when one could be read.
    """

    field: str
    reason: str
    raw: Any
    external_id: str | None = None


@dataclass(frozen=True)
class Batch:
    """What one fetch returned: posts since the cursor, and the cursor that covers them."""

    posts: tuple[InboundPost, ...]
    cursor: str | None
    # True when the source has more pages right now (fetch again without waiting).
    more: bool = False
    # Malformed items left out of `posts`; the cursor already covers them.
    skipped: tuple[SkippedItem, ...] = ()


@dataclass(frozen=True)
class ReplyTarget:
    """What a connector needs to answer a post."""

    external_id: str
    author_id: str
    author_handle: str | None
    thread_id: str | None
    extra: Mapping[str, Any] = field(default_factory=dict)


class ConnectorError(Exception):
    """A connector failed; `retryable` says whether trying again later may help."""

    retryable: bool = True


class ShapeError(ConnectorError):
    """The platform's answer does not have the shape we rely on; `field` names where.

    Raised for the whole answer (then the poll fails and is retried with back-off); a single
    malformed item of a page is skipped and recorded as a `SkippedItem` instead.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def describe_json(value: object) -> str:
    """A short description of a JSON value's type and value, for shape errors."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", type(None): "null"}
    for kind, name in names.items():
        if type(value) is kind:
            text = repr(value)
            return f"{name} {text[:60]}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


class RateLimited(ConnectorError):
    """The platform said 429: park this connector until `reset_at`."""

    def __init__(self, reset_at: datetime, message: str = "rate limited") -> None:
        super().__init__(f"{message}; parked until {reset_at.isoformat()}")
        self.reset_at = reset_at


class AuthFailed(ConnectorError):
    """Credentials refused (401/403): needs a human, not a retry loop."""

    retryable = False


class NotSent(ConnectorError):
    """The platform refused a reply and certainly did not post it (safe to retry later)."""


class ReplyAuthFailed(AuthFailed, NotSent):
    """The platform refused our credentials when posting: nothing was posted, and a human must fix them.

    An `AuthFailed` for the operator, and a `NotSent` for the outbox, which knows the customer
    certainly did not get the message (it retries, then reports it as failed, never "unknown").
    """


class ReplyOutcomeUnknown(ConnectorError):
    """The reply may or may not have been posted (5xx, timeout or a broken connection after sending)."""

    retryable = False


class ConnectorOptions(TypedDict, total=False):
    """The keywords every connector takes after its account name (see `Connector.__init__`).

    A subclass takes them as ``**options: Unpack[ConnectorOptions]`` and passes them on, so
    every connector is built the same way (bot.flow.channels) and none forgets one; its own
    extras (an HTTP transport for tests, a demo script) come as keywords before them.
    """

    own_ids: tuple[str, ...]
    settings: Mapping[str, Any] | None
    environ: Mapping[str, str] | None
    clock: Clock | None


class Connector(ABC):
    """One channel. Subclasses set `kind` and implement fetch, reply and is_own.

    The base class owns back-off: `next_poll_delay` grows exponentially with jitter after
    consecutive failures, so each connector does not reinvent it.
    """

    kind: ClassVar[str]
    push: ClassVar[bool] = False  # push connectors (webhook) never poll
    settings_keys: ClassVar[tuple[str, ...] | None] = None
    """The account keys this connector understands (besides kind, own_ids, poll_interval, can_reply):
    `replyclock check` reports any other key with its line, and the constructor refuses it.
    None: the connector checks them itself."""
    settings_label: ClassVar[str] = ""
    """How messages about the settings name the channel ("X", "e-mail"); the kind when empty."""

    def __init__(
        self,
        name: str,
        *,
        own_ids: tuple[str, ...] = (),
        settings: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Clock | None = None,
    ) -> None:
        """What every connector has: its account name, our own ids on the channel, the account's
        settings, where its secrets are read (the process environment unless given) and its clock.

        Raises:
            ValueError: a setting outside `settings_keys` (when the class declares them).
        """
        self.name = name
        self.own_ids = tuple(own_ids)
        self.settings: Mapping[str, Any] = settings or {}
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.clock: Clock = clock or SystemClock()
        self.consecutive_failures = 0
        if self.settings_keys is not None:
            self.reject_unknown_settings()

    # -- reading the account's settings: each refusal names the key and the value -------------------

    def reject_unknown_settings(self) -> None:
        """Raise ValueError naming every account key outside `settings_keys`, with a "did you mean"."""
        known = self.settings_keys or ()
        unknown = sorted(set(self.settings) - set(known))
        if not unknown:
            return
        guesses = [guess for key in unknown for guess in get_close_matches(key, known, n=1, cutoff=0.6)]
        hint = (
            f"did you mean {', '.join(repr(g) for g in guesses)}?"
            if guesses
            else f"known: {', '.join(known)}"
        )
        label = self.settings_label or getattr(self, "kind", "connector")
        raise ValueError(f"unknown {label} setting(s) {', '.join(unknown)} ({hint})")

    def include_own_id(self, own_id: str) -> None:
        """Count `own_id` (our account on the channel, from its settings) among `own_ids`."""
        if own_id not in self.own_ids:
            self.own_ids = (*self.own_ids, own_id)

    def env_name_setting(self, key: str, default: str) -> str:
        """The setting `key` that names an environment variable (a secret's)."""
        value = self.settings.get(key, default)
        if not isinstance(value, str) or not value:
            raise ValueError(f"setting {key} must name an environment variable, not {value!r}")
        return value

    def seconds_setting(self, key: str, default: float) -> float:
        """The setting `key` as a positive number of seconds (a timeout)."""
        value = self.settings.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"setting {key} must be a positive number of seconds, not {value!r}")
        return float(value)

    def url_setting(self, key: str, default: str) -> str:
        """The setting `key` as an http(s) base URL, without a trailing slash."""
        value = self.settings.get(key, default)
        if not isinstance(value, str) or not _HTTP_URL.fullmatch(value):
            raise ValueError(f"setting {key} must be an http(s) URL, not {value!r}")
        return value.rstrip("/")

    @abstractmethod
    def fetch(self, cursor: str | None) -> Batch:
        """New posts since `cursor`, oldest first, and the cursor that covers them."""

    @abstractmethod
    def reply(self, to: ReplyTarget, text: str) -> str:
        """Post a public reply to `to`; returns the reply's external id.

        Raises:
            NotSent: the platform refused and did not post (may be retried).
            RateLimited: ditto, retry after the reset.
            Any other exception: outcome unknown; the outbox will not resend.
        """

    def is_own(self, post: InboundPost) -> bool:
        """True when our own account wrote `post` (it answers the conversation)."""
        return post.author_id in self.own_ids or (
            post.author_handle is not None
            and post.author_handle.lstrip("@").lower() in {i.lstrip("@").lower() for i in self.own_ids}
        )

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self) -> None:
        self.consecutive_failures += 1

    def next_poll_delay(self, interval: timedelta, *, cap: timedelta = timedelta(minutes=15)) -> timedelta:
        """The wait before the next poll: the interval, or exponential back-off with jitter after failures."""
        if self.consecutive_failures == 0:
            return interval
        backoff = interval.total_seconds() * (2 ** min(self.consecutive_failures, 10))
        backoff = min(backoff, cap.total_seconds())
        return timedelta(seconds=random.uniform(backoff / 2, backoff))


def connector_classes() -> dict[str, type[Connector]]:
    """Connector classes registered in the `replyclock.connectors` entry-point group, by kind."""
    found: dict[str, type[Connector]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if isinstance(cls, type) and issubclass(cls, Connector):
            found[entry.name] = cls
    return found
