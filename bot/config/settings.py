"""Settings from the environment, validated in one place (pydantic-settings).

Every variable replyclock reads from its environment that is not a connector's credential is a field
here, with its type, range and default. `replyclock run`, `web` and `check` validate them at start-up
and report every problem at once, one line each (`SettingsError.problems`); the rest of the code reads
the validated values instead of calling float()/int() on raw strings.

The `.env` file is not read here: `replyclock` loads it into the process environment first (from the
current directory, or `--env-file`), the real environment winning, so that connectors that read their
own secrets see the same values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite:///replyclock.db"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
Port = Annotated[int, Field(ge=1, le=65535)]
# Connector credentials are read by the connectors for the accounts that need them (their default
# variable names are module constants there); webhook accounts read one variable each, by this prefix.
CONNECTOR_SECRET_PREFIXES = ("WEBHOOK_SECRET_",)


class SettingsError(ValueError):
    """One or more environment settings are invalid; `problems` holds one line for each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Settings(BaseSettings):
    """The environment settings (names are the variables' names in lower case)."""

    model_config = SettingsConfigDict(
        case_sensitive=False, env_ignore_empty=True, extra="ignore", str_strip_whitespace=True
    )

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL: sqlite:///FILE (default sqlite:///replyclock.db) or postgresql://...",
    )
    replyclock_config: str | None = Field(None, description="the policy file (default ./replyclock.toml)")

    slack_bot_token: str = Field("", repr=False, description="xoxb- bot token; empty: Slack is off")
    slack_app_token: str = Field("", repr=False, description="xapp- app-level token: Socket Mode for run")
    slack_signing_secret: str = Field("", repr=False, description="signs Slack's requests to web")
    slack_api_url: AnyHttpUrl | None = Field(None, description="another Slack Web API base URL (a proxy)")
    slack_timeout: float = Field(30, gt=0, le=600, description="seconds per Slack Web API call")
    slack_pacing: bool = Field(
        True,
        description="pace sends under Slack's published rate limits (off only for an unlimited stand-in)",
    )

    host: str = Field("0.0.0.0", min_length=1, description="address `web` listens on")
    port: int = Field(8000, ge=0, le=65535, description="port `web` listens on (0: any free port)")
    metrics_port: Port | None = Field(None, description="`run` serves /metrics on this port when set")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="address of run's /metrics")

    outbox_interval: float = Field(2, gt=0, le=3600, description="seconds between outbox drains")
    sweep_max_interval: float = Field(60, gt=0, le=86400, description="longest sleep of the sweep (s)")
    replyclock_alert_after_failures: int = Field(
        3, ge=1, le=1000, description="failed polls in a row before the admin channel hears of it"
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        normalized = normalize_database_url(value)
        try:
            url = make_url(normalized)
        except ArgumentError:
            raise ValueError("not a database URL (sqlite:///FILE or postgresql://USER@HOST/NAME)") from None
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"replyclock runs on sqlite or postgresql, not {backend}")
        if backend == "postgresql" and not url.database:
            raise ValueError("a PostgreSQL URL needs a database name (postgresql://USER@HOST/NAME)")
        return normalized

    @field_validator("slack_bot_token")
    @classmethod
    def _bot_token(cls, value: str) -> str:
        if value and not value.startswith("xoxb-"):
            raise ValueError("must be a bot token starting with xoxb- (OAuth & Permissions page)")
        return value

    @field_validator("slack_app_token")
    @classmethod
    def _app_token(cls, value: str) -> str:
        if value and not value.startswith("xapp-"):
            raise ValueError("must be an app-level token starting with xapp- (Basic Information page)")
        return value

    @model_validator(mode="after")
    def _slack_pairs(self) -> Settings:
        if self.slack_app_token and not self.slack_bot_token:
            raise ValueError("SLACK_APP_TOKEN is set but SLACK_BOT_TOKEN is not: Socket Mode needs both")
        return self


def normalize_database_url(url: str) -> str:
    """Heroku-style ``postgres://`` and plain ``postgresql://`` go to psycopg 3, the driver installed."""
    url = url.strip() or DEFAULT_DATABASE_URL
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def variable_names() -> list[str]:
    """The names of the environment variables `Settings` reads."""
    return [name.upper() for name in Settings.model_fields]


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Validate the settings in `environ` (default: the process environment).

    Raises:
        SettingsError: with one line per invalid variable, naming it and what it must be.
    """
    source = os.environ if environ is None else environ
    wanted = {name.lower(): name for name in variable_names()}
    values = {
        field: source[upper].strip()
        for field, upper in wanted.items()
        if upper in source and source[upper].strip()
    }
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        raise SettingsError([_problem(item, values) for item in error.errors()]) from None


def _problem(item: Any, values: Mapping[str, str]) -> str:
    field = str(item["loc"][0]) if item.get("loc") else ""
    message = str(item["msg"]).removeprefix("Value error, ")
    if not field:
        return message
    name = field.upper()
    secret = "token" in field or "secret" in field or field == "database_url"  # a URL may hold a password
    shown = "" if secret or field not in values else f" (got {values[field]!r})"
    return f"{name}: {message}{shown}"
