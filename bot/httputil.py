"""HTTP plumbing shared by both HTTP doors and our own outgoing calls.

A low module (no replyclock imports), usable from connectors too. (Not ``http.py``: that name
would shadow the standard library's ``http`` whenever a file of bot/ runs as a script.)

- `read_body`: the size-capped request body reader of both HTTP doors (webhooks, /slack/events);
- `client`: the httpx client for every call of our own (feed fetches, webhook replies); tweepy
  and Mastodon.py keep their own requests sessions underneath;
- `retry_after`: the one reader of a ``Retry-After`` header (delay-seconds or an HTTP date),
  used by the Slack sender and the feed, webhook and Mastodon connectors.
"""

from __future__ import annotations

import functools
import math
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from starlette.requests import Request


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (without reading on) anything over `limit` bytes.

    Raises:
        BodyTooLarge: Content-Length or the bytes actually received exceed `limit`.
        ValueError: the Content-Length header is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ValueError("Content-Length is not a number")
        if int(declared) > limit:
            raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def client(
    *,
    timeout: float,
    transport: httpx.BaseTransport | None = None,
    follow_redirects: bool = False,
    headers: Mapping[str, str] | None = None,
) -> httpx.Client:
    """An httpx client for one of our own calls (use it as a context manager).

    Args:
        timeout: seconds for connecting, and for each read and write.
        transport: another transport (tests); default: the network, with httpx's certificate
            checks, their context built once per process.
        follow_redirects: follow 3xx answers (a feed that moved).
        headers: headers sent with every request.
    """
    return httpx.Client(
        timeout=timeout,
        transport=transport,
        verify=_ssl_context(),
        follow_redirects=follow_redirects,
        headers=headers,
    )


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """httpx's default certificate verification, built once per process and shared by every call.

    Building it loads the whole CA bundle (about 10 ms of CPU, 100 ms on a busy machine); a new
    context per reply paid that for every acknowledgement. An SSLContext is safe to share between
    threads, and each call still opens a connection of its own.
    """
    return httpx.create_ssl_context()


_LONGEST = timedelta(days=366)  # no wait is read as longer (and no huge number overflows)


def http_date(value: str | None) -> datetime | None:
    """An HTTP date (``Wed, 21 Oct 2026 07:28:00 GMT``) as an aware datetime, or None."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def retry_after(value: object, *, now: datetime, date: str | None = None) -> timedelta | None:
    """The wait a ``Retry-After`` header asks for, or None when it is absent or unreadable.

    Args:
        value: the header's value: delay-seconds (``120``, also ``1.5``) or an HTTP date; a list
            or tuple of one value (as some clients hand headers out) is read too.
        now: our clock, for an HTTP date.
        date: the answer's ``Date`` header: an HTTP date is read relative to it when given, so a
            skewed server clock does not matter.

    Returns:
        The wait, never negative; callers apply their own default and bounds.
    """
    raw = value[0] if isinstance(value, list | tuple) and value else value
    if not isinstance(raw, str | bytes | int | float) or isinstance(raw, bool):
        return None
    text = (raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)).strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        moment = http_date(text)
        if moment is None:
            return None
        return max(moment - (http_date(date) or now), timedelta(0))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(timedelta(seconds=min(seconds, _LONGEST.total_seconds())), _LONGEST)


def header(headers: object, name: str) -> object:
    """A header's value from any mapping of headers, whatever the case of its name; None if absent."""
    if isinstance(headers, Mapping):
        wanted = name.lower()
        for key, found in headers.items():
            if str(key).lower() == wanted:
                return found
    return None
