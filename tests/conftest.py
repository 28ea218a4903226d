"""Shared fixtures: real databases (an SQLite file; PostgreSQL when REPLYCLOCK_TEST_DATABASE_URL is set)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.context import AppContext
from storage.db import make_engine
from storage.migrate import upgrade

PG_ENV = "REPLYCLOCK_TEST_DATABASE_URL"
POLICY_TOML = (Path(__file__).parent / "data" / "policy.toml").read_text()

# Monday 23 November 2026, 08:00 UTC (09:00 in Berlin).
MONDAY = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def postgres_url() -> str | None:
    return os.environ.get(PG_ENV) or None


def reset_postgres(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def fresh_database_url(kind: str, tmp_path: Path) -> str:
    """A migrated, empty database of the given kind."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'replyclock.db'}"
    url = postgres_url()
    if url is None:
        pytest.skip(
            f"PostgreSQL tests need {PG_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)"
        )
    reset_postgres(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request.param, tmp_path)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def policy() -> Policy:
    return parse_policy(tomllib.loads(POLICY_TOML), source="tests/data/policy.toml", text=POLICY_TOML)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(MONDAY)


@pytest.fixture
def ctx(policy: Policy, engine: Engine, clock: FakeClock) -> AppContext:
    return AppContext(policy=policy, engine=engine, clock=clock)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say once why the PostgreSQL half was skipped, instead of once per test."""
    skipped = terminalreporter.stats.get("skipped", [])
    if postgres_url() is None and skipped:
        terminalreporter.write_line(
            f"{len(skipped)} tests skipped; PostgreSQL variants need {PG_ENV} "
            "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)"
        )
