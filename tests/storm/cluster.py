"""The processes of a storm: one `replyclock web` and N `replyclock run`, as an operator starts them.

Each process gets its own environment (the same database and policy file), its standard error
goes to a file (`<name>.log`: the JSON log lines), and `Cluster.stop` ends them with SIGTERM
as a process manager does. `log_records` reads a process's JSON log lines back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
# Inherited variables that would change what the processes do.
_DROP = ("DATABASE_URL", "REPLYCLOCK_CONFIG", "OUTBOX_INTERVAL", "SWEEP_MAX_INTERVAL", "HOST", "PORT")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a process (lines that are not JSON are skipped)."""
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return records


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process, from /proc (None where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (None elsewhere)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(value) for value in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident set size of a running process (VmHWM), in MB (Linux /proc; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    returncode: int | None = None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the process has used so far (Linux /proc; None elsewhere or once gone)."""
        return process_cpu_seconds(self.popen.pid)

    def tail(self, chars: int = 3000) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")[-chars:]


@dataclass
class Cluster:
    """`replyclock web` plus `runs` x `replyclock run` on one database."""

    workdir: Path
    database_url: str
    policy_path: Path
    secrets: Mapping[str, str]  # WEBHOOK_SECRET_* and the like
    slack_api_url: str
    slack_token: str
    runs: int = 4
    outbox_interval: float | None = None
    sweep_max_interval: float | None = None
    # "false" against a stand-in without Slack's rate limits (pacing would only slow the storm down)
    slack_pacing: str = "true"
    extra_env: Mapping[str, str] = field(default_factory=dict)  # for every process (e.g. PYTHONPATH)
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _DROP and not k.startswith(("SLACK_", "WEBHOOK_SECRET_"))
        }
        env.update(
            DATABASE_URL=self.database_url,
            REPLYCLOCK_CONFIG=str(self.policy_path),
            LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
            **self.secrets,
            **self.extra_env,
            **extra,
        )
        return env

    def _spawn(self, name: str, command: str, env: dict[str, str]) -> Process:
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", command],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        process = Process(name, popen, log_path, log_file)
        self.processes.append(process)
        return process

    def upgrade(self) -> None:
        """`replyclock db upgrade`: the release step."""
        done = subprocess.run(
            [sys.executable, "-m", "bot.cli", "db", "upgrade"],
            cwd=self.workdir,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"replyclock db upgrade failed:\n{done.stderr[-3000:]}")

    def start(self) -> None:
        """Start web and the run processes; return once web answers /healthz and every run logged it runs."""
        self.upgrade()
        # No operator listener: its fixed default port (9464) would keep a second storm (a test
        # and a bench side by side) from starting, and nothing here reads it.
        self._spawn("web", "web", self._env(HOST="127.0.0.1", PORT=str(self.port), OPERATOR_PORT="off"))
        timing: dict[str, str] = {}
        if self.outbox_interval is not None:
            timing["OUTBOX_INTERVAL"] = str(self.outbox_interval)
        if self.sweep_max_interval is not None:
            timing["SWEEP_MAX_INTERVAL"] = str(self.sweep_max_interval)
        for number in range(1, self.runs + 1):
            self._spawn(
                f"run{number}",
                "run",
                self._env(
                    SLACK_BOT_TOKEN=self.slack_token,
                    SLACK_API_URL=self.slack_api_url,
                    SLACK_PACING=self.slack_pacing,
                    **timing,
                ),
            )
        deadline = time.monotonic() + START_TIMEOUT
        waiting = {p.name for p in self.processes}
        while waiting:
            for process in self.processes:
                if process.popen.poll() is not None:
                    raise RuntimeError(f"{process.name} exited at start-up:\n{process.tail()}")
            for name in sorted(waiting):
                if self._ready(name):
                    waiting.discard(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {START_TIMEOUT} s: {sorted(waiting)}")
            time.sleep(0.1)

    def _ready(self, name: str) -> bool:
        if name == "web":
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False
        process = next(p for p in self.processes if p.name == name)
        return any(r.get("event") == "replyclock running" for r in log_records(process.log_path))

    def run_processes(self) -> list[Process]:
        return [p for p in self.processes if p.name.startswith("run")]

    def exited(self) -> list[str]:
        """Names of processes that have exited (none should, before `stop`)."""
        return [p.name for p in self.processes if p.popen.poll() is not None]

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each process still running."""
        found: dict[str, float] = {}
        for process in self.processes:
            seconds = process.cpu_seconds()
            if seconds is not None:
                found[process.name] = seconds
        return found

    def peak_rss(self) -> dict[str, float]:
        """Peak resident memory (MB) of each process still running."""
        found: dict[str, float] = {}
        for process in self.processes:
            mb = peak_rss_mb(process.popen.pid)
            if mb is not None:
                found[process.name] = mb
        return found

    def stop(self) -> dict[str, int]:
        """SIGTERM to every process, then wait; returns the exit codes (SIGKILL after STOP_TIMEOUT: -9)."""
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        codes: dict[str, int] = {}
        deadline = time.monotonic() + STOP_TIMEOUT  # one grace period for all of them
        for process in self.processes:
            try:
                process.returncode = process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.returncode = process.popen.wait(timeout=STOP_TIMEOUT)
            process.log_file.close()
            codes[process.name] = process.returncode
        return codes

    def logs(self) -> dict[str, list[dict[str, Any]]]:
        return {p.name: log_records(p.log_path) for p in self.processes}
