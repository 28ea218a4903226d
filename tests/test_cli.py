"""The command line, run as a user runs it: a real `replyclock` process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs.launch import free_port, run_lease_pid, start, wait_until_leased, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "tests" / "data" / "policy.toml"
EXAMPLE = ROOT / "examples" / "replyclock.toml"


def replyclock(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
    )


def test_demo_tells_the_whole_story() -> None:
    result = replyclock("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        "post in from @ana_lima",  # a post arrives and is routed
        "owner Maria Keller",  # to a named expert
        "slack posts #billing: #1 from Ana Lima",  # the card goes to the team's channel
        "public reply demo-reply-1): Thanks @ana_lima!",  # acknowledged at once
        "&lt;!channel&gt;",  # the customer's <!channel> reaches Slack escaped
        "Maria Keller clicks Claim on #1: it is theirs",  # staff claim from Slack
        "Lee Wong clicks Claim on #1 too late; Slack tells them: #1 is already claimed by",
        "slack posts #care thread: #2 is due in 15 min",  # warned before the deadline
        "slack posts #care thread: Deadline missed",  # breach
        "slack posts DM: Reminder: #2 is overdue by 20 min",  # nag to the owner
        "slack posts #care thread: Escalation: #2 is overdue by 10 min",  # escalation up the ladder
        "Escalated by DM to Lee Wong, the manager",
        "on the ignore list",
        "answer seen from our account in #2",  # answered on the platform: the clock stops
        "Maria Keller clicks Reply on #1 and writes",  # answered from Slack
        "social \u2192 @ana_lima (public reply demo-reply-3): @ana_lima Sorry about that!",
        # The e-mail conversation: acknowledged with threading headers, answered from Slack in the thread.
        "post in from Clara Weiss: #3 routed to team care",
        "mail \u2192 clara@example.org (Subject: Re: Where is my parcel?, Message-ID: <demo-mail-1@acme.example>, "
        "In-Reply-To: <7d1c-clara@example.org>, References: <7d1c-clara@example.org>, "
        "Auto-Submitted: auto-replied): Thanks there!",  # a sender-typed name is never used (issue 11)
        "slack posts #care thread: Clara Weiss wrote again: It is a gift",
        "Sam Okafor clicks Reply on #3 and writes",
        "mail \u2192 clara@example.org (Subject: Re: Where is my parcel?, Message-ID: <demo-mail-2@acme.example>, "
        "In-Reply-To: <9e2f-clara@example.org>, "
        "References: <7d1c-clara@example.org> <demo-mail-1@acme.example> <9e2f-clara@example.org>): Hello Clara",
        "figures: 3 conversations, 3 answered, 2 within SLA, 1 breached",
        "The Slack side",
    ):
        assert expected in out, f"{expected!r} missing from the demo transcript:\n{out}"
    assert (
        out.index("#2 is due in 15 min")
        < out.index("Deadline missed")
        < out.index("Reminder: #2")
        < out.index("answer seen from our account in #2")
    )
    story = out[: out.index("The Slack side")]
    after_answer = story[story.index("answer seen from our account in #2") :]
    assert "Reminder: #2" not in after_answer  # nothing nags after the answer
    assert "<!channel>" not in story  # never sent raw to Slack


def test_check_prints_a_summary_of_a_good_file() -> None:
    result = replyclock("check", "--no-secrets", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_reports_four_problems_and_exits_2(tmp_path: Path) -> None:
    broken = POLICY.read_text()
    broken = broken.replace('conversation_gap = "12h"', "conversation_gap = 12")  # wrong type
    broken = broken.replace(
        '[teams.billing]\ndisplay_name = "Billing"\nchannel = "#billing"\nexperts = ["maria", "lee"]\ncalendar = "berlin"',
        '[teams.billing]\ndisplay_name = "Billing"\nchannel = "#billing"\nexperts = ["maria", "lee"]\ncalendar = "berlinn"',
    )
    broken = broken.replace('timezone = "America/New_York"', 'timezone = "America/Nowhere"')
    broken = broken.replace('regex = "(?i)\\\\b(down|outage)\\\\b"', 'regex = "(down|outage"')
    path = tmp_path / "replyclock.toml"
    path.write_text(broken)
    result = replyclock("check", "--config", str(path))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, result.stderr
    text = "\n".join(errors)
    for key in (
        "settings.conversation_gap",
        "teams.billing.calendar",
        "experts.nina.timezone",
        "routing[0].regex",
    ):
        assert key in text, text
    assert "berlinn" in text and "America/Nowhere" in text
    assert all(re.match(rf"error: {re.escape(str(path))}:\d+: ", line) for line in errors), (
        text
    )  # file and line


def test_deadline_for_given_times_and_stdin() -> None:
    given = replyclock(
        "deadline",
        "--config",
        str(POLICY),
        "--calendar",
        "berlin",
        "--target",
        "8h",
        "--at",
        "2026-11-20T16:00:00+01:00",
    )
    assert given.returncode == 0, given.stderr
    assert "due 2026-11-23T16:00:00+01:00" in given.stdout  # Friday 16:00 + 8 business hours = Monday 16:00
    piped = replyclock(
        "deadline",
        "--config",
        str(POLICY),
        "--calendar",
        "berlin",
        "--target",
        "1h",
        stdin="2026-11-21T12:00:00+01:00\nnot-a-time\n",
    )
    assert piped.returncode == 1
    lines = piped.stdout.splitlines()
    assert "2026-11-23T10:00:00+01:00" in lines[0]  # Saturday: starts at Monday's opening
    assert lines[1].startswith("error: ") and "not-a-time" in lines[1]


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = replyclock("db", "upgrade", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    import sqlite3

    tables = {
        r[0]
        for r in sqlite3.connect(tmp_path / "fresh.db").execute(
            "select name from sqlite_master where type='table'"
        )
    }
    assert {"accounts", "posts", "conversations", "experts", "events", "outbox", "alembic_version"} <= tables


@pytest.mark.slow
def test_run_starts_and_a_second_run_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'run.db'}", "SWEEP_MAX_INTERVAL": "1"}
    first = start("run", "--config", str(POLICY), cwd=tmp_path, env=env)
    try:
        wait_until_leased(first, tmp_path / "run.db")
        # The guard is a lease row in the database itself: no side file to delete, and a hard
        # link to the file (another name for the same database) is refused just the same.
        assert not list(tmp_path.glob("*.lock"))
        for name, link in (("run.db", False), ("alias.db", True), ("run.db", True)):
            if link and not (tmp_path / "alias.db").exists():
                os.link(tmp_path / "run.db", tmp_path / "alias.db")
            second = subprocess.run(
                [sys.executable, "-m", "bot.cli", "run", "--config", str(POLICY)],
                cwd=tmp_path,
                env={**env, "DATABASE_URL": f"sqlite:///{tmp_path / name}"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == 1, second.stderr
            assert "SQLite allows one running process" in second.stderr
            assert ("hard links" if link else f"pid {first.pid}") in second.stderr
        (tmp_path / "alias.db").unlink()
    finally:
        first.send_signal(signal.SIGTERM)
        _out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert '"event": "replyclock running"' in err  # structured JSON log lines
    assert run_lease_pid(tmp_path / "run.db") is None  # given up on a clean stop


@pytest.mark.slow
def test_run_stops_within_ten_seconds_of_sigterm_while_its_jobs_wait_on_a_locked_database(
    tmp_path: Path,
) -> None:
    """Whatever a job waits on (here SQLite's 30 s busy timeout), SIGTERM ends the process within 10 s;
    the next start takes over the lease its predecessor could not give back."""
    import sqlite3

    database = tmp_path / "run.db"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{database}", "SWEEP_MAX_INTERVAL": "1"}
    first = start("run", "--config", str(POLICY), cwd=tmp_path, env=env, stdout=None)
    try:
        wait_until_leased(first, database)
        with contextlib.closing(sqlite3.connect(database, timeout=5, isolation_level=None)) as blocker:
            blocker.execute("BEGIN EXCLUSIVE")  # every job of the run now waits for the lock
            time.sleep(2.5)
            first.send_signal(signal.SIGTERM)
            began = time.monotonic()
            _out, err = first.communicate(timeout=30)
            stopped_after = time.monotonic() - began
            blocker.execute("ROLLBACK")
    finally:
        if first.poll() is None:
            first.kill()
    assert stopped_after < 10, stopped_after
    assert first.returncode == 0, err
    assert '"event": "stopping"' in err
    # The lease may still name the stopped process: a new run on this host takes it over at once.
    second = start("run", "--config", str(POLICY), cwd=tmp_path, env=env, stdout=None)
    try:
        wait_until_leased(second, database)
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=30)
    assert second.returncode == 0


@pytest.mark.slow
def test_web_serves_health_and_metrics(tmp_path: Path) -> None:
    import json
    import urllib.error
    import urllib.request

    port, operator_port = free_port(), free_port()
    url = f"sqlite:///{tmp_path / 'web.db'}"
    assert replyclock("db", "upgrade", env={"DATABASE_URL": url}).returncode == 0
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "OPERATOR_PORT": str(operator_port),
    }
    server = start("web", "--config", str(POLICY), cwd=tmp_path, env=env)
    try:
        health = wait_until_serving(f"http://127.0.0.1:{port}", server)
        assert health == {"status": "ok"}  # the public listener says no more (issue 11)
        with urllib.request.urlopen(f"http://127.0.0.1:{operator_port}/healthz", timeout=5) as response:
            assert json.loads(response.read())["database"]["ok"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{operator_port}/metrics", timeout=5) as response:
            assert b"replyclock_database_up 1.0" in response.read()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


def test_check_validates_email_and_bluesky_settings_and_secrets(tmp_path: Path) -> None:
    config = tmp_path / "replyclock.toml"
    config.write_text(
        POLICY.read_text()
        + '\n[accounts.mail]\nkind = "email"\naddress = "support@acme.example"\nimap_host = "imap.acme.example"\n'
        + 'imap_password_env = "ACME_MAIL_PW"\n'
        + '\n[accounts.sky]\nkind = "bluesky"\nhandle = "acme.bsky.social"\nlimit = 500\n'
    )
    clean = {"ACME_MAIL_PW": "", "BLUESKY_APP_PASSWORD": "x"}
    result = replyclock("check", "--config", str(config), env=clean)
    assert result.returncode == 2
    assert "accounts.mail: environment variable(s) ACME_MAIL_PW not set" in result.stderr
    assert re.search(
        r"accounts\.sky(\.limit)?: setting limit must be an integer from 1 to 100", result.stderr
    )
    fixed = config.read_text().replace("limit = 500", "limit = 50")
    config.write_text(fixed)
    result = replyclock(
        "check", "--config", str(config), env={"ACME_MAIL_PW": "secret", "BLUESKY_APP_PASSWORD": "x"}
    )
    assert result.returncode == 0, result.stderr
