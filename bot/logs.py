"""Structured logs: one JSON object per line, with the conversation id where there is one.

Secret values from the environment are scrubbed from every line, whatever logged them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

SECRET_ENV_SUFFIXES = ("_TOKEN", "_SECRET", "_PASSWORD", "_KEY")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables that hold secrets (long enough to be worth scrubbing)."""
    env = os.environ if environ is None else environ
    values = [v for k, v in env.items() if k.endswith(SECRET_ENV_SUFFIXES) and len(v) >= 6]
    url = env.get("DATABASE_URL", "")
    if "@" in url and ":" in url.split("@", 1)[0].rsplit("/", 1)[-1]:
        password = url.split("@", 1)[0].rsplit(":", 1)[-1]
        if len(password) >= 4:
            values.append(password)
    return sorted(set(values), key=len, reverse=True)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON with its `extra` fields."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        self.secrets = secrets if secrets is not None else secret_values()

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
        line = json.dumps(event, default=str, ensure_ascii=False)
        for secret in self.secrets:
            line = line.replace(secret, "[redacted]")
        return line


def configure(level: str | None = None, stream: Any = None) -> None:
    """Send replyclock's logs to `stream` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("LOG_LEVEL", "INFO")).upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
