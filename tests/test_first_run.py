"""A first run that guides, and expected failures as one clear line and an exit code (real processes)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import postgres_url
from tests.procs.launch import free_port, start, wait_until_leased, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "replyclock.toml"
POLICY = ROOT / "tests" / "data" / "policy.toml"
OUR_VARIABLES = (
    "DATABASE_URL",
    "REPLYCLOCK_CONFIG",
    "HOST",
    "PORT",
    "METRICS_PORT",
    "OUTBOX_INTERVAL",
    "SWEEP_MAX_INTERVAL",
    "LOG_LEVEL",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in OUR_VARIABLES and not k.startswith(("SLACK_", "WEBHOOK_"))
    }
    env.update(extra)
    return env


def replyclock(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=clean_env(PYTHONPATH=str(ROOT), **env),
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_bare_replyclock_prints_help_and_version(tmp_path: Path) -> None:
    bare = replyclock(cwd=tmp_path)
    assert bare.returncode == 0
    assert "usage: replyclock" in bare.stdout and "init" in bare.stdout and "demo" in bare.stdout
    version = replyclock("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("replyclock ")


def test_every_option_has_help_text() -> None:
    import argparse

    from bot.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    missing += walk(child, f"{path} {name}")
            elif action.help is None:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(build_parser(), "replyclock") == []


def test_env_file_in_the_current_directory_sets_database_url_and_the_real_environment_wins(
    tmp_path: Path,
) -> None:
    (tmp_path / ".env").write_text("DATABASE_URL=sqlite:///from-dotenv.db\n")
    assert replyclock("db", "upgrade", cwd=tmp_path).returncode == 0
    assert (tmp_path / "from-dotenv.db").is_file() and not (tmp_path / "replyclock.db").exists()
    real = replyclock("db", "upgrade", cwd=tmp_path, DATABASE_URL="sqlite:///from-env.db")
    assert real.returncode == 0 and (tmp_path / "from-env.db").is_file()
    other = tmp_path / "elsewhere.env"
    other.write_text("DATABASE_URL=sqlite:///from-env-file.db\n")
    given = replyclock("--env-file", str(other), "db", "upgrade", cwd=tmp_path)
    assert given.returncode == 0 and (tmp_path / "from-env-file.db").is_file()
    missing = replyclock("--env-file", "nope.env", "db", "upgrade", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.env: no such file" in one_error(missing)


def test_init_writes_files_that_pass_check(tmp_path: Path) -> None:
    made = replyclock(
        "init", "--yes", "--team", "help-desk", "--channel", "#helpdesk", "--timezone", "Europe/Berlin",
        "--connector", "webhook", "--connector", "feed", cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "help-desk" in (tmp_path / "replyclock.toml").read_text()
    assert "WEBHOOK_SECRET_SITE=" in (tmp_path / ".env").read_text()
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0
    checked = replyclock("check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "replyclock.toml: OK" in checked.stdout
    again = replyclock("init", "--yes", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in one_error(again)
    bad = replyclock("init", "--yes", "--force", "--timezone", "Mars/Olympus", cwd=tmp_path)
    assert bad.returncode == 2 and "Mars/Olympus" in one_error(bad)


def test_invalid_environment_settings_are_named_one_line_each(tmp_path: Path) -> None:
    result = replyclock(
        "check", "--config", str(EXAMPLE), cwd=tmp_path, PORT="http", OUTBOX_INTERVAL="-1", LOG_LEVEL="loud"
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: environment: ")]
    assert [e.split(":")[2].strip() for e in errors] == ["PORT", "OUTBOX_INTERVAL", "LOG_LEVEL"], (
        result.stderr
    )
    web = replyclock("web", "--config", str(POLICY), cwd=tmp_path, PORT="99999")
    assert web.returncode == 2 and "PORT" in one_error(web)


def test_read_only_commands_on_a_missing_sqlite_file_say_so_and_create_nothing(tmp_path: Path) -> None:
    for args in (("export", "--since", "2026-01-01"), ("digest", "--config", str(POLICY))):
        result = replyclock(*args, cwd=tmp_path)
        assert result.returncode == 3 and "no database at" in one_error(result), args
        assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_unmigrated_database_names_db_upgrade_and_export_writes_no_header(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "replyclock.db").close()  # a file without the schema
    export = replyclock("export", "--since", "2026-01-01", cwd=tmp_path)
    assert export.returncode == 3 and "replyclock db upgrade" in one_error(export)
    assert export.stdout == ""
    web = replyclock("web", "--config", str(POLICY), cwd=tmp_path)
    assert web.returncode == 3 and "replyclock db upgrade" in one_error(web)


def test_db_upgrade_to_an_unknown_revision_is_one_line(tmp_path: Path) -> None:
    result = replyclock("db", "upgrade", "9999", cwd=tmp_path)
    assert result.returncode == 2 and "9999" in one_error(result)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:hunter2-pw@127.0.0.1:1/replyclock", "cannot use the database"),  # no server
        ("postgresql://postgres@no-such-host.invalid/replyclock", "cannot find the database host"),
    ],
)
def test_an_unreachable_database_is_one_line(tmp_path: Path, url: str, expected: str) -> None:
    result = replyclock("db", "upgrade", cwd=tmp_path, DATABASE_URL=url)
    assert result.returncode == 3 and expected in one_error(result)
    assert "hunter2-pw" not in result.stderr  # the password is never shown


@pytest.mark.postgres
def test_a_missing_postgres_database_is_one_line(tmp_path: Path) -> None:
    url = postgres_url()
    if url is None:
        pytest.skip("needs REPLYCLOCK_TEST_DATABASE_URL")
    from sqlalchemy.engine import make_url

    missing = (
        make_url(url).set(database="replyclock_no_such_database_h9").render_as_string(hide_password=False)
    )
    result = replyclock("db", "upgrade", cwd=tmp_path, DATABASE_URL=missing)
    assert result.returncode == 3
    line = one_error(result)
    assert "does not exist" in line and "createdb" in line


def test_web_refuses_a_slack_token_without_signing_secret(tmp_path: Path) -> None:
    result = replyclock(
        "web", "--config", str(POLICY), cwd=tmp_path, SLACK_BOT_TOKEN="xoxb-1", PORT="0", HOST="127.0.0.1"
    )
    assert result.returncode == 2 and "SLACK_SIGNING_SECRET" in one_error(result)


def test_web_migrates_on_request_logs_one_startup_line_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port, operator_port = free_port(), free_port()
    env = clean_env(
        PYTHONPATH=str(ROOT),
        HOST="127.0.0.1",
        PORT=str(port),
        OPERATOR_PORT=str(operator_port),
        DATABASE_URL="sqlite:///web.db",
        WEBHOOK_SECRET_SHOP="s3cret-s3cret",
    )
    server = start("web", "--migrate", "--config", str(POLICY), cwd=tmp_path, env=env)
    try:
        health = wait_until_serving(f"http://127.0.0.1:{port}", server)
        assert health == {"status": "ok"}  # the public health says only ok or not (issue 11)
        with urllib.request.urlopen(f"http://127.0.0.1:{operator_port}/healthz", timeout=5) as response:
            assert json.loads(response.read())["database"]["ok"] is True
    finally:
        server.send_signal(signal.SIGINT)
        _out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "Traceback" not in err
    [startup] = [json.loads(line) for line in err.splitlines() if '"replyclock running"' in line]
    assert startup["role"] == "web" and startup["listen"] == f"127.0.0.1:{port}"
    assert startup["operator"] == f"127.0.0.1:{operator_port}"
    assert startup["schema"].startswith("schema current") and startup["database"] == "sqlite:///web.db"
    assert startup["version"] and startup["slack"] == "not configured"


def test_run_stops_on_ctrl_c_and_a_second_run_is_one_line(tmp_path: Path) -> None:
    env = clean_env(PYTHONPATH=str(ROOT), DATABASE_URL="sqlite:///run.db")
    first = start("run", "--config", str(POLICY), cwd=tmp_path, env=env)
    try:
        wait_until_leased(first, tmp_path / "run.db")
        second = replyclock("run", "--config", str(POLICY), cwd=tmp_path, DATABASE_URL="sqlite:///run.db")
        assert second.returncode == 1 and "SQLite allows one running process" in one_error(second)
    finally:
        first.send_signal(signal.SIGINT)
        _out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert "Traceback" not in err
    [startup] = [json.loads(line) for line in err.splitlines() if '"replyclock running"' in line]
    assert startup["role"] == "run" and "social (demo)" in startup["accounts"]


@pytest.mark.postgres
def test_run_refuses_an_unmigrated_postgres_database_unless_told_to_migrate(tmp_path: Path) -> None:
    from tests.conftest import reset_postgres

    url = postgres_url()
    if url is None:
        pytest.skip("needs REPLYCLOCK_TEST_DATABASE_URL")
    reset_postgres(url)  # an empty schema: never migrated
    refused = replyclock("run", "--config", str(POLICY), cwd=tmp_path, DATABASE_URL=url)
    assert refused.returncode == 3
    line = one_error(refused)
    assert "no schema yet" in line and "replyclock db upgrade" in line and "--migrate" in line
    web = replyclock("web", "--config", str(POLICY), cwd=tmp_path, DATABASE_URL=url)
    assert web.returncode == 3 and "replyclock db upgrade" in one_error(web)


def test_init_asks_on_a_terminal_and_its_answers_make_a_valid_policy(tmp_path: Path) -> None:
    from bot.config import load_policy
    from bot.config.starter import write_starter

    answers = iter(["billing", "", "America/New_York", "webhook, mastodon, feed, x"])
    asked: list[str] = []

    def reader(prompt: str) -> str:
        asked.append(prompt)
        return next(answers)

    write_starter(
        config=tmp_path / "replyclock.toml", env_file=tmp_path / ".env", interactive=True, reader=reader
    )
    assert len(asked) == 4 and "[#billing]" in asked[1]  # the channel defaults to the team's name
    policy = load_policy(tmp_path / "replyclock.toml")
    assert policy.teams["billing"].channel == "#billing"
    assert {a.kind for a in policy.accounts.values()} == {"webhook", "mastodon", "feed", "x"}
    env = (tmp_path / ".env").read_text()
    assert "MASTODON_ACCESS_TOKEN=" in env and "X_CONSUMER_KEY=" in env
