"""bot.httputil: the one Retry-After reader, and one HTTP client (httpx) for our own calls."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.httputil import header, http_date, retry_after

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", timedelta(seconds=120)),
        (" 7 ", timedelta(seconds=7)),
        ("1.5", timedelta(seconds=1.5)),
        (30, timedelta(seconds=30)),
        (["45"], timedelta(seconds=45)),  # a list of one, as some clients hand headers out
        (b"60", timedelta(seconds=60)),
        ("Mon, 23 Nov 2026 08:02:00 GMT", timedelta(minutes=2)),
        ("Mon, 23 Nov 2026 07:59:00 GMT", timedelta(0)),  # in the past: no wait, never negative
        ("1e30", timedelta(days=366)),  # capped, no overflow
        (None, None),
        ("", None),
        ([], None),
        ("-5", None),
        ("nan", None),
        ("soon", None),
        (True, None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: object, expected: timedelta | None) -> None:
    assert retry_after(value, now=NOW) == expected


def test_an_http_date_is_read_against_the_answers_own_date() -> None:
    # The server's clock runs ten minutes ahead of ours: the wait is still two minutes.
    wait = retry_after("Mon, 23 Nov 2026 08:12:00 GMT", now=NOW, date="Mon, 23 Nov 2026 08:10:00 GMT")
    assert wait == timedelta(minutes=2)
    assert http_date("not a date") is None
    assert http_date("Mon, 23 Nov 2026 08:12:00 GMT") == datetime(2026, 11, 23, 8, 12, tzinfo=UTC)


def test_header_ignores_the_case_of_names() -> None:
    assert header({"retry-after": "3"}, "Retry-After") == "3"
    assert header({"RETRY-AFTER": ["3"]}, "Retry-After") == ["3"]
    assert header({}, "Retry-After") is None
    assert header(None, "Retry-After") is None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_our_own_calls_use_httpx_only() -> None:
    """urllib.request and requests are not used for calls of our own; tweepy (x.py) and
    Mastodon.py (mastodon.py) bring requests underneath, and the demo's stand-in is a server."""
    allowed_requests = {"connectors/x.py", "connectors/mastodon.py"}
    for path in [*(ROOT / "bot").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")]:
        relative = path.relative_to(ROOT).as_posix()
        imported = _imports(path)
        assert "urllib.request" not in imported, relative
        if relative not in allowed_requests:
            assert not any(name == "requests" or name.startswith("requests.") for name in imported), relative


def test_one_retry_after_parser() -> None:
    """Only bot/httputil.py parses the header; everyone else asks it."""
    for path in [*(ROOT / "bot").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")]:
        relative = path.relative_to(ROOT).as_posix()
        if relative in ("bot/httputil.py", "bot/demo/standin.py"):  # the stand-in sends the header
            continue
        text = path.read_text(encoding="utf-8")
        # A mail's own Date header (connectors/mail.py) is RFC 5322, not Retry-After: only a file that
        # reads Retry-After must not parse dates itself.
        if "retry-after" in text.lower() or "retry_after" in text:
            assert "parsedate_to_datetime" not in text, relative
