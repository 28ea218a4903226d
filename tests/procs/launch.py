"""`replyclock` as a real process in tests: a free port, the command line, and the waits until a
started process serves HTTP (`web`) or holds its run lease (`run` on SQLite).

Every wait fails with the process's own output when it ends before it is up, and with a clear
message when it takes longer than `START_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def replyclock_command(*args: str) -> list[str]:
    """The command line of ``replyclock ARGS`` from this checkout's interpreter."""
    return [sys.executable, "-m", "bot.cli", *args]


def start(
    *args: str,
    cwd: Path,
    env: Mapping[str, str],
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """``replyclock ARGS`` started in `cwd` with exactly `env`, its output piped (text) unless redirected."""
    return subprocess.Popen(
        replyclock_command(*args), cwd=cwd, env=dict(env), stdout=stdout, stderr=stderr, text=True
    )


def _ended(process: subprocess.Popen[Any]) -> str:
    out, err = process.communicate()
    return f"{' '.join(map(str, process.args))} ended ({process.returncode})\n{out or ''}{err or ''}"


def wait_until_serving(
    base_url: str,
    processes: subprocess.Popen[Any] | Sequence[subprocess.Popen[Any]],
    *,
    timeout: float = START_TIMEOUT,
    path: str = "/healthz",
) -> Any:
    """Poll ``base_url + path`` until it answers 2xx, while every one of `processes` keeps running.

    Returns:
        The answer's body, parsed as JSON.
    """
    watched = [processes] if isinstance(processes, subprocess.Popen) else list(processes)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base_url + path, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            for process in watched:
                assert process.poll() is None, _ended(process)
            assert time.monotonic() < deadline, f"{base_url}{path} did not answer within {timeout} s"
            time.sleep(0.1)


def run_lease_pid(database: Path) -> int | None:
    """The pid holding the `run` lease of a SQLite database, or None (no file, no schema, no lease)."""
    if not database.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=5)) as connection:
            row = connection.execute("SELECT pid FROM leases WHERE name = 'run'").fetchone()
    except sqlite3.OperationalError:  # not migrated yet
        return None
    return int(row[0]) if row else None


def wait_until_leased(
    process: subprocess.Popen[Any], database: Path, *, timeout: float = START_TIMEOUT
) -> None:
    """Wait until `process` (a ``replyclock run`` on the SQLite file `database`) holds the run lease."""
    deadline = time.monotonic() + timeout
    while run_lease_pid(database) != process.pid:
        assert process.poll() is None, _ended(process)
        assert time.monotonic() < deadline, f"pid {process.pid} did not take the run lease within {timeout} s"
        time.sleep(0.1)
