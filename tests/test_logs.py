"""Structured logs: one JSON object per line, extra fields kept, secrets scrubbed."""

from __future__ import annotations

import io
import json
import logging

from bot.logs import JsonFormatter, secret_values


def test_one_json_line_per_event_with_extras_and_no_secrets() -> None:
    env = {
        "SLACK_BOT_TOKEN": "xoxb-very-secret-token",
        "WEBHOOK_SECRET_SHOP": "hook-secret-123-0123456789-0123456789",
        "DATABASE_URL": "postgresql+psycopg://app:pa55word@db/replyclock",
        "LOG_LEVEL": "INFO",
    }
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(secret_values(env)))
    logger = logging.getLogger("replyclock.test-logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info(
        "card posted",
        extra={
            "conversation_id": 7,
            "ts": "1700000000.000100",
            "detail": "token xoxb-very-secret-token, pa55word",
        },
    )
    logger.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "card posted" and event["conversation_id"] == 7
    assert event["ts"].startswith("20") and event["extra_ts"] == "1700000000.000100"  # not overwritten
    for secret in env.values():
        if secret != "INFO" and "pa55word" not in secret:
            assert secret not in line
    assert "pa55word" not in line and "[redacted]" in line
