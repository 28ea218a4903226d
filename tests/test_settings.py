"""Environment settings: types, ranges and URLs, one clear line per bad variable, no secret echoed."""

from __future__ import annotations

import pytest

from bot.config.settings import SettingsError, load_settings


def test_defaults_and_empty_values_mean_the_default() -> None:
    settings = load_settings({"PORT": "", "OUTBOX_INTERVAL": "  ", "LOG_LEVEL": "debug"})
    assert settings.port == 8000 and settings.outbox_interval == 2 and settings.log_level == "DEBUG"
    assert settings.database_url == "sqlite:///replyclock.db"


def test_platform_postgres_urls_go_to_psycopg() -> None:
    url = load_settings({"DATABASE_URL": "postgres://u:p@db.example:5432/app"}).database_url
    assert url == "postgresql+psycopg://u:p@db.example:5432/app"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("PORT", "http", "valid integer"),
        ("PORT", "70000", "less than or equal to 65535"),
        ("METRICS_PORT", "0", "greater than or equal to 1"),
        ("OUTBOX_INTERVAL", "0", "greater than 0"),
        ("SWEEP_MAX_INTERVAL", "soon", "valid number"),
        ("SLACK_TIMEOUT", "-3", "greater than 0"),
        ("SLACK_API_URL", "slack.example/api", "URL"),
        ("LOG_LEVEL", "loud", "'DEBUG'"),
        ("DATABASE_URL", "mysql://u@h/db", "sqlite or postgresql"),
        ("DATABASE_URL", "postgresql://u@h", "database name"),
        ("DATABASE_URL", "not a url", "not a database URL"),
        ("SLACK_BOT_TOKEN", "xoxp-user-token", "xoxb-"),
        ("SLACK_APP_TOKEN", "xoxb-1", "xapp-"),
    ],
)
def test_each_bad_value_is_one_line_naming_the_variable(name: str, value: str, says: str) -> None:
    environ = {name: value}
    if name == "SLACK_APP_TOKEN":
        environ["SLACK_BOT_TOKEN"] = "xoxb-1"
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    [problem] = caught.value.problems
    assert problem.startswith(f"{name}: ") and says in problem, problem


def test_every_problem_at_once_and_no_secret_or_password_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            {
                "PORT": "x",
                "OUTBOX_INTERVAL": "-1",
                "SLACK_BOT_TOKEN": "not-a-bot-token-secret",
                "DATABASE_URL": "oracle://scott:tiger-pw@h/db",
            }
        )
    problems = caught.value.problems
    assert sorted(p.split(":")[0] for p in problems) == [
        "DATABASE_URL",
        "OUTBOX_INTERVAL",
        "PORT",
        "SLACK_BOT_TOKEN",
    ]
    text = "\n".join(problems)
    assert "not-a-bot-token-secret" not in text and "tiger-pw" not in text


def test_an_app_token_needs_a_bot_token() -> None:
    with pytest.raises(SettingsError, match="Socket Mode needs both"):
        load_settings({"SLACK_APP_TOKEN": "xapp-1"})
