"""`replyclock run` as a real process, its policy, and its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from bot.demo.standin import DEFAULT_TOKEN
from tests.connectors.x_server import RECORDED_USER_ID

ROOT = Path(__file__).resolve().parents[2]
CARE = "C0CARE0001"
SAM = ("U0SAM0001", "Sam Okafor")
LEE = ("U0LEE0001", "Lee Wong")
X_ENV = {
    "X_BEARER_TOKEN": "AAAA-neighbours-bearer-0123456789",
    "X_CONSUMER_KEY": "neighbours-consumer-key",
    "X_CONSUMER_SECRET": "neighbours-consumer-secret",
    "X_ACCESS_TOKEN": "783214-neighbours-access-token",
    "X_ACCESS_TOKEN_SECRET": "neighbours-access-token-secret",
}

T = TypeVar("T")
# How long a process may take to start (imports, migrations) before it logs "replyclock running":
# seconds on a quiet machine, 15 and more on a loaded 2-core one. Kept apart from the waits for
# the behaviour under test, which start counting once the process runs.
START_TIMEOUT = 90.0
RUNNING_EVENT = "replyclock running"


def policy_toml(
    x_base_url: str,
    *,
    first_response: str = "15s",
    warn_at: float = 0.5,
    nag_every: str = "4s",
    escalation: str = '[ { after = "2s", notify = "team_channel" }, { after = "5s", notify = "manager" } ]',
    poll_interval: str = "1s",
    max_results: int = 5,
) -> str:
    """One team on duty round the clock, a wall-clock policy in seconds, and the X account."""
    return f"""
[settings]
conversation_gap = "1h"
default_team = "care"

[calendars.always]
timezone = "UTC"
hours = {{ mon-sun = ["00:00-24:00"] }}

[experts.sam]
name = "{SAM[1]}"
slack_id = "{SAM[0]}"
timezone = "UTC"
hours = {{ mon-sun = ["00:00-24:00"] }}

[experts.lee]
name = "{LEE[1]}"
slack_id = "{LEE[0]}"
timezone = "UTC"
hours = {{ mon-sun = ["00:00-24:00"] }}

[teams.care]
display_name = "Customer Care"
channel = "{CARE}"
experts = ["sam"]
calendar = "always"
on_call = "sam"
manager = "lee"

[[policies]]
name = "fast"
clock = "wall"
calendar = "always"
first_response = "{first_response}"
next_response = "{first_response}"
warn_at = [{warn_at}]
nag_every = "{nag_every}"
acknowledge = true
escalation = {escalation}

[accounts.x]
kind = "x"
user_id = "{RECORDED_USER_ID}"
api_base_url = "{x_base_url}"
poll_interval = "{poll_interval}"
max_results = {max_results}

[acknowledgements.default]
en = "Thanks {{author}}! {{owner_first_name}} from our {{team}} team will get back to you by {{due}}."
"""


@dataclass(frozen=True)
class LogLine:
    """One line the process wrote to stderr: parsed JSON, or None when it was not JSON."""

    text: str
    event: dict[str, Any] | None

    def get(self, key: str) -> Any:
        return None if self.event is None else self.event.get(key)


class Worker:
    """``python -m bot.cli run`` in its own process; its stderr (JSON log lines) goes to a file."""

    def __init__(self, env: Mapping[str, str], cwd: Path, name: str = "run") -> None:
        self.log_path = cwd / f"{name}.stderr"
        self._log: IO[str] = self.log_path.open("w")
        self.started = time.time()
        self._running = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "run"],
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            text=True,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_running(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the process has logged that it runs; fail if it exits or takes `timeout` s."""
        if self._running:
            return
        deadline = time.monotonic() + timeout
        while not self.events(RUNNING_EVENT):
            if not self.alive:
                raise AssertionError(
                    f"replyclock run exited ({self.proc.returncode}) at start\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"replyclock run did not start within {timeout} s\n{self.tail()}")
            time.sleep(0.1)
        self._running = True

    def lines(self) -> list[LogLine]:
        if not self._log.closed:
            self._log.flush()
        found = []
        for text in self.log_path.read_text().splitlines():
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            found.append(LogLine(text, event if isinstance(event, dict) else None))
        return found

    def events(self, name: str) -> list[LogLine]:
        return [line for line in self.lines() if line.get("event") == name]

    def tail(self, n: int = 40) -> str:
        return "\n".join(line.text for line in self.lines()[-n:])

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code (the scheduler shuts down and the process exits 0)."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(timeout=15)
        if not self._log.closed:
            self._log.close()


def run_env(
    *,
    database_url: str,
    config: Path,
    slack_url: str | None = None,
    slack_timeout: float | None = None,
    outbox_interval: float = 0.2,
    sweep_max_interval: float = 1.0,
) -> dict[str, str]:
    """The environment of a `replyclock run`: dummy X credentials, Slack at the stand-in (or none)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLACK_", "X_", "WEBHOOK_SECRET_")) and key != "DATABASE_URL"
    }
    env.update(X_ENV)
    env.update(
        {
            "DATABASE_URL": database_url,
            "REPLYCLOCK_CONFIG": str(config),
            "OUTBOX_INTERVAL": str(outbox_interval),
            "SWEEP_MAX_INTERVAL": str(sweep_max_interval),
            "LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
    )
    if slack_url is not None:
        # SLACK_PACING off: the stand-in answers 429s only where a test asks it to, and the compressed
        # clock nags once a second; Slack's real per-channel pace would hold the backlog back.
        env.update({"SLACK_BOT_TOKEN": DEFAULT_TOKEN, "SLACK_API_URL": slack_url, "SLACK_PACING": "false"})
    if slack_timeout is not None:
        env["SLACK_TIMEOUT"] = str(slack_timeout)
    return env


def eventually(check: Callable[[], T | None], timeout: float, what: str, worker: Worker | None = None) -> T:
    """Poll `check` until it returns something truthy; fail with the worker's last log lines.

    With a `worker`, the `timeout` counts from when it runs: its start-up is not what is awaited.
    """
    if worker is not None:
        worker.wait_running()
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if worker is not None and not worker.alive:
            raise AssertionError(
                f"replyclock run exited ({worker.proc.returncode}) waiting for {what}\n{worker.tail()}"
            )
        if time.monotonic() > deadline:
            tail = worker.tail() if worker is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.1)
