"""Restarting the local PostgreSQL cluster from a test, quickly, and always bringing it back.

Restarting the server affects everyone using it: only the one test that needs it does it, with
the server down for a second or two, and the server is started again whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import make_url

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", None, "")


@dataclass(frozen=True)
class Cluster:
    """A Debian/Ubuntu cluster (pg_ctlcluster) serving the test database."""

    version: str
    name: str
    host: str
    port: int


@dataclass(frozen=True)
class Downtime:
    """When the stop was asked for and done, when the start was asked for, when the server answered
    again (``time.time()``)."""

    stopping: float
    stopped: float
    starting: float
    ready: float

    @property
    def seconds(self) -> float:
        """From the stop request to the first answer of the restarted server."""
        return self.ready - self.stopping


def local_cluster(url: str) -> Cluster | str:
    """The cluster behind `url`, or why this machine cannot restart it."""
    parsed = make_url(url)
    if parsed.host not in LOCAL_HOSTS:
        return f"PostgreSQL at {parsed.host} is not local: cannot restart it"
    port = parsed.port or 5432
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        return "pg_ctlcluster is not installed: cannot restart PostgreSQL"
    if os.geteuid() != 0:
        return "restarting PostgreSQL with pg_ctlcluster needs root"
    listed = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, timeout=30, check=False)
    for line in listed.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == str(port) and fields[3] == "online":
            return Cluster(fields[0], fields[1], parsed.host or "127.0.0.1", port)
    return f"no online cluster on port {port} in pg_lsclusters"


def _ctl(cluster: Cluster, action: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster.version, cluster.name, action],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finish(command: subprocess.Popen[bytes], what: str) -> None:
    _out, err = command.communicate(timeout=60)
    if command.returncode != 0:
        raise RuntimeError(
            f"pg_ctlcluster {what} failed ({command.returncode}): {err.decode(errors='replace')}"
        )


def ready(cluster: Cluster) -> bool:
    probe = ["pg_isready", "-q", "-h", cluster.host, "-p", str(cluster.port)]
    return subprocess.run(probe, check=False, timeout=10).returncode == 0


def restart(cluster: Cluster, *, down_for: float, while_down: Callable[[], None] | None = None) -> Downtime:
    """Stop the cluster (fast mode: open connections are cut), keep it down about `down_for` seconds
    from the stop request, run `while_down` meanwhile, start it again and wait until it answers."""
    stopping = time.time()
    _finish(_ctl(cluster, "stop"), "stop")
    stopped = time.time()
    try:
        if while_down is not None:
            while_down()
        time.sleep(max(0.0, stopping + down_for - time.time()))
    finally:
        starting = time.time()
        start = _ctl(cluster, "start")
        deadline = time.monotonic() + 60
        while not ready(cluster):  # it answers before pg_ctlcluster returns
            if time.monotonic() > deadline:
                start.kill()
                raise RuntimeError(
                    f"PostgreSQL {cluster.version}/{cluster.name} did not come back within 60 s"
                )
            time.sleep(0.02)
        answered = time.time()
        _finish(start, "start")
    return Downtime(stopping, stopped, starting, answered)
