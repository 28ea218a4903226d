"""Structured logs: one JSON object per line, with the conversation id where there is one.

Secret values from the environment are scrubbed from every line, whatever logged them: as they
are, and in the forms a library may log them in (JSON-escaped, percent-encoded once or twice as
in an OAuth 1.0a signature base string, form-encoded). Which values are secret: those of
variables ending in ``_TOKEN``, ``_SECRET``, ``_PASSWORD`` or ``_KEY``, of ``WEBHOOK_SECRET_*``,
the database password, and (`add_secrets`) the variables the policy names for its connectors'
credentials (``bearer_token_env = "ACME_X_BEARER"``), whatever they are called.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

SECRET_ENV_SUFFIXES = ("_TOKEN", "_SECRET", "_PASSWORD", "_KEY")
SECRET_ENV_PREFIXES = ("WEBHOOK_SECRET_",)
MIN_SECRET_CHARS = 6
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


REDACTED = "[redacted]"
# A URL anywhere in a text: scheme, optional userinfo, host and path, optional query. It stops at
# whitespace, quotes, a backslash (a JSON escape), and Slack's link delimiters < | >.
_URL = re.compile(
    r"(?i)\b([a-z][a-z0-9+.-]{1,15}://)"  # scheme
    r"(?:([^\s/?#@\"'\\<>|]*)@)?"  # userinfo
    r"([^\s?#\"'\\<>|]*)"  # host and path
    r"(?:\?([^\s#\"'\\<>|]*))?"  # query
)


def _redact_query(query: str) -> str:
    parts = []
    for part in re.split(r"([&;])", query):
        if part in ("&", ";") or not part:
            parts.append(part)
        elif "=" in part:
            parts.append(part.split("=", 1)[0] + "=" + REDACTED)
        else:
            parts.append(REDACTED)
    return "".join(parts)


def redact_urls(text: str) -> str:
    """Every URL in `text` without its secrets: userinfo and query values become ``[redacted]``.

    ``https://bob:pw@feeds.example/rss?access_token=abc&page=2`` becomes
    ``https://[redacted]@feeds.example/rss?access_token=[redacted]&page=[redacted]``. The one
    function used for whatever may carry a URL out of the process: every log line (`JsonFormatter`),
    an account's ``last_error`` as stored and shown by the health report, and the admin alerts
    posted to Slack.
    """

    def one(match: re.Match[str]) -> str:
        scheme, userinfo, rest, query = match.group(1), match.group(2), match.group(3), match.group(4)
        out = scheme + (REDACTED + "@" if userinfo else "") + rest
        return out + ("?" + _redact_query(query) if query is not None else "")

    return _URL.sub(one, text)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables that hold secrets (long enough to be worth scrubbing)."""
    env = os.environ if environ is None else environ
    values = [
        v
        for k, v in env.items()
        if (k.endswith(SECRET_ENV_SUFFIXES) or k.startswith(SECRET_ENV_PREFIXES))
        and len(v) >= MIN_SECRET_CHARS
    ]
    url = env.get("DATABASE_URL", "")
    if "@" in url and ":" in url.split("@", 1)[0].rsplit("/", 1)[-1]:
        password = url.split("@", 1)[0].rsplit(":", 1)[-1]
        if len(password) >= 4:
            values.append(password)
            values.append(urllib.parse.unquote(password))  # the URL holds it percent-encoded
    return sorted(set(values), key=len, reverse=True)


def scrubbed_forms(secret: str) -> set[str]:
    """`secret` and the encodings of it a log line may carry."""
    once = urllib.parse.quote(secret, safe="")
    return {
        secret,
        json.dumps(secret)[1:-1],  # how it looks inside a JSON string
        json.dumps(secret, ensure_ascii=False)[1:-1],
        once,
        json.dumps(once)[1:-1],
        urllib.parse.quote(secret, safe="~"),  # RFC 3986 unreserved, as OAuth encodes
        urllib.parse.quote(urllib.parse.quote(secret, safe="~"), safe="~"),  # an OAuth base string
        urllib.parse.quote_plus(secret),
    }


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON with its `extra` fields."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.add_secrets(secrets if secrets is not None else secret_values())

    def add_secrets(self, values: Iterable[str]) -> None:
        """Scrub these values (and their encoded forms) too, from now on."""
        forms = set(self.secrets)
        for value in values:
            if len(value) >= MIN_SECRET_CHARS:
                forms |= scrubbed_forms(value)
        # Longest first, so a secret is never half-replaced through a shorter one inside it.
        self.secrets = sorted(forms, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                # An extra field never overwrites the line's own ts/level/logger/event.
                event[key if key not in event else f"extra_{key}"] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        line = redact_urls(json.dumps(event, default=str, ensure_ascii=False))
        for secret in self.secrets:
            line = line.replace(secret, "[redacted]")
        return line


def add_secrets(values: Iterable[str]) -> None:
    """Scrub these values too, in every JSON line the root logger writes from now on.

    For secrets whose variable names come from the policy (``bearer_token_env`` and the like),
    known only once it is loaded, after `configure`.
    """
    found = [value for value in values if len(value) >= MIN_SECRET_CHARS]
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.add_secrets(found)


def configure(level: str | None = None, stream: Any = None) -> None:
    """Send replyclock's logs to `stream` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("LOG_LEVEL", "INFO")).upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
