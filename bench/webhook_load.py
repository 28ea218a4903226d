"""Webhook load: requests per second and latency of ``POST /hooks/<account>`` on loopback.

For every database and every concurrency level this benchmark

1. creates a fresh, migrated database: an SQLite file in a temporary directory under /tmp, or a
   schema ``load_c<concurrency>`` in the PostgreSQL database ``replyclock_load`` (the database is
   created when missing, the schema dropped again at the end; the tests' database is never
   touched);
2. starts ``replyclock web`` as a real subprocess (the production server: uvicorn, JSON logs at
   INFO to a file) on a free loopback port, with tests/data/policy.toml plus a webhook account
   ``[accounts.shop] kind = "webhook" can_reply = false``, and waits for ``/healthz``;
3. drives it from this process with an asyncio load generator at a fixed concurrency (closed
   loop: each of C connections sends its next request when the answer to the previous one is
   in, keep-alive): N distinct signed deliveries, each from a new author with its own thread,
   so each opens a conversation (dedupe, route, deadline, owner, audit event, card outbox row:
   the expensive path), plus a share of exact re-deliveries of ids already sent, half of them
   within 32 requests of the original (often while it is still in flight), half later. It stops
   by itself after the last request, or at the time cap;
4. checks the outcome: only 202s, no transport errors; per id exactly one answer
   ``"duplicate": false`` and every other ``"duplicate": true``, all with the same
   conversation id; in the database the stored posts are exactly the ids accepted, each once,
   each in the conversation its answer named, one conversation and one card per post; the
   server's own counters (``/metrics``) agree; the server logged no warning or error;
5. prints requests/s, latency p50/p90/p99/max, the rate in each fifth of the run (the tables
   grow as it runs), status counts and the CPU seconds of the generator, of the server process
   and of everything else on the machine (PostgreSQL and other people's work included) while
   the load ran; on PostgreSQL also about how many connections the server opened; and how many
   transactions stored the posts (deliveries waiting together are stored together, bot.web).

Before the database runs, a generator-ceiling run posts the same requests to an unknown account:
the server answers 401 (as to an unsigned request) without reading the body or touching the
database, so the rate is what the HTTP stack and the generator manage together, and the
generator's CPU per request says how much of the 2 cores the generator itself needs.

The generator speaks HTTP/1.1 over raw asyncio streams (``--client raw``, the default, some
40-120 µs of CPU per request); ``--client httpx`` uses ``httpx.AsyncClient`` with a connection
limit of C instead, which costs some 1.4 ms of CPU per request and by itself caps the ceiling
run at a few hundred requests/s on 2 cores.

``--profile`` serves the same app in this process (``bot.web.create_app`` on
``bot.web.serve_in_thread``), drives it from a separate generator process and prints where the
server's time goes: the wall time of the ingest transactions (``bot.web._store_deliveries``, one
per batch of deliveries stored together), how many deliveries each carried, and how much of
it is spent inside the database driver, a per-statement table (calls, milliseconds per request,
mean in the first and last fifth of the run; a lock wait counts, as in ``BEGIN IMMEDIATE`` or
an ``UPDATE`` queued behind another transaction's row lock), and cProfile of the event-loop
thread and of one ingest call in ten (the others stay unprofiled, so the timings are not
inflated by the profiler).

Run it from the project root (defaults: 5,000 distinct posts plus 10 % re-deliveries, at
concurrency 16, 1 and 64, on SQLite and PostgreSQL; about 3 minutes)::

    .venv/bin/python -m bench.webhook_load
    .venv/bin/python -m bench.webhook_load --databases sqlite --concurrency 16 --posts 2000
    .venv/bin/python -m bench.webhook_load --profile --databases sqlite --concurrency 1 --posts 3000

PostgreSQL is used when reachable at ``--postgres-url`` (default: the environment variable
REPLYCLOCK_LOAD_DATABASE_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_load;
the database name must contain "load" or "bench") and reported as skipped otherwise. Progress
goes to stderr, the report to stdout; the exit status is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import math
import multiprocessing
import os
import platform
import pstats
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url

from bench.common import cpu_model, postgres_schema, prepare_postgres, scratch_directory
from connectors.webhook import SIGNATURE_HEADER, sign
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models import Account, Conversation, Outbox, Post

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POLICY_FILE = PROJECT_ROOT / "tests" / "data" / "policy.toml"
ACCOUNT = "shop"
UNKNOWN_ACCOUNT = "nobody-here"
SECRET = "load-bench-secret-0123456789-0123456789"
OPERATOR_TOKEN = "load-bench-operator-token-0123456789"
SECRET_ENV = "WEBHOOK_SECRET_SHOP"
WEBHOOK_ACCOUNT = f"""
[accounts.{ACCOUNT}]
kind = "webhook"
can_reply = false
legacy_signature = true
"""
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_load"
POSTGRES_URL_ENV = "REPLYCLOCK_LOAD_DATABASE_URL"
TEXTS = (  # the three routes of the test policy: billing (business hours), urgent, classic care
    "I was charged twice for my invoice, can you refund one?",
    "Is the app down? I cannot log in since this morning",
    "How do I change the delivery address of my order?",
    "Love the new feature, but where did the export button go?",
)
NEAR_DUPLICATE = 32  # a "near" re-delivery follows its original within this many requests
START_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0


# --- the workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One request to send: the id it carries, its body and signature header."""

    external_id: str
    body: bytes
    signature: str
    repeat: bool  # a re-delivery of an id sent earlier in the plan


def build_plan(
    posts: int, duplicate_share: float, *, tag: str, now: datetime, seed: int = 7
) -> list[Delivery]:
    """`posts` distinct deliveries, each a new author and thread, plus re-deliveries, in send order.

    Each re-delivery is byte-identical to its original (a sender retrying) and placed after it:
    half within NEAR_DUPLICATE requests, half anywhere later.
    """
    rng = random.Random(seed)
    originals: list[Delivery] = []
    base = now - timedelta(hours=1)
    for i in range(posts):
        data = {
            "id": f"{tag}-{i}",
            "author": {"id": f"{tag}-cust-{i}", "name": f"Customer {i}", "handle": f"customer_{i}"},
            "text": TEXTS[i % len(TEXTS)],
            "url": f"https://shop.example/tickets/{tag}-{i}",
            "created_at": (base + timedelta(milliseconds=i)).isoformat(),
            "thread_id": f"{tag}-thread-{i}",
            "language": "en",
        }
        body = json.dumps(data, separators=(",", ":")).encode("utf-8")
        originals.append(Delivery(f"{tag}-{i}", body, sign(SECRET, body), repeat=False))
    keyed: list[tuple[float, Delivery]] = [(float(i), d) for i, d in enumerate(originals)]
    repeats = round(posts * duplicate_share)
    for n, i in enumerate(rng.sample(range(posts), min(repeats, posts))):
        offset = rng.randint(1, NEAR_DUPLICATE) if n % 2 == 0 else rng.randint(1, max(1, posts - i))
        original = originals[i]
        keyed.append(
            (i + offset + 0.5, Delivery(original.external_id, original.body, original.signature, True))
        )
    keyed.sort(key=lambda pair: pair[0])
    return [delivery for _key, delivery in keyed]


# --- the load generator ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as the generator saw it."""

    index: int
    started: float
    finished: float
    status: int  # 0: no HTTP answer (see error)
    body: bytes = b""
    error: str | None = None


@dataclass
class DriveResult:
    outcomes: list[Outcome]
    wall: float
    cpu: float  # this process's CPU seconds while driving
    capped: bool


class _Cap:
    """Hands out plan indexes until the plan is done or the time cap is reached."""

    def __init__(self, count: int, deadline: float) -> None:
        self._next = 0
        self.count = count
        self.deadline = deadline
        self.capped = False

    def take(self) -> int | None:
        if self._next >= self.count:
            return None
        if time.perf_counter() > self.deadline:
            self.capped = True
            return None
        self._next += 1
        return self._next - 1


def raw_request(host: str, port: int, path: str, delivery: Delivery) -> bytes:
    """The whole HTTP/1.1 request, built once before the clock starts."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(delivery.body)}\r\n{SIGNATURE_HEADER}: {delivery.signature}\r\n\r\n"
    )
    return head.encode("ascii") + delivery.body


async def _raw_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    """Send one request and read one response: status, body, whether the server closes."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not supported by the raw client")
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def drive_raw(
    host: str, port: int, path: str, plan: Sequence[Delivery], concurrency: int, time_cap: float
) -> DriveResult:
    """Closed loop over `concurrency` keep-alive connections, HTTP/1.1 written by hand."""
    requests = [raw_request(host, port, path, d) for d in plan]
    outcomes: list[Outcome] = []
    cpu0, started = time.process_time(), time.perf_counter()
    cap = _Cap(len(plan), started + time_cap)

    async def worker() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while (index := cap.take()) is not None:
                began = time.perf_counter()
                try:
                    if writer is None or reader is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    status, body, close = await asyncio.wait_for(
                        _raw_exchange(reader, writer, requests[index]), REQUEST_TIMEOUT
                    )
                except (
                    OSError,
                    asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError,
                    TimeoutError,
                    ValueError,
                ) as error:
                    outcomes.append(Outcome(index, began, time.perf_counter(), 0, error=type(error).__name__))
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    continue
                outcomes.append(Outcome(index, began, time.perf_counter(), status, body))
                if close:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return DriveResult(outcomes, time.perf_counter() - started, time.process_time() - cpu0, cap.capped)


async def drive_httpx(
    host: str, port: int, path: str, plan: Sequence[Delivery], concurrency: int, time_cap: float
) -> DriveResult:
    """The same closed loop through one httpx.AsyncClient limited to `concurrency` connections."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = [{"Content-Type": "application/json", SIGNATURE_HEADER: d.signature} for d in plan]
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(
        base_url=f"http://{host}:{port}", limits=limits, timeout=REQUEST_TIMEOUT
    ) as client:
        cpu0, started = time.process_time(), time.perf_counter()
        cap = _Cap(len(plan), started + time_cap)

        async def worker() -> None:
            while (index := cap.take()) is not None:
                began = time.perf_counter()
                try:
                    response = await client.post(path, content=plan[index].body, headers=headers[index])
                except httpx.HTTPError as error:
                    outcomes.append(Outcome(index, began, time.perf_counter(), 0, error=type(error).__name__))
                    continue
                outcomes.append(
                    Outcome(index, began, time.perf_counter(), response.status_code, response.content)
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return DriveResult(outcomes, time.perf_counter() - started, time.process_time() - cpu0, cap.capped)


def drive(
    client: str, base_url: str, path: str, plan: Sequence[Delivery], concurrency: int, time_cap: float
) -> DriveResult:
    """Run the load generator to the end of the plan (or the time cap) on a new event loop."""
    parts = httpx.URL(base_url)
    host, port = parts.host, parts.port or 80
    driver = drive_raw if client == "raw" else drive_httpx
    return asyncio.run(driver(host, port, path, plan, concurrency, time_cap))


# --- the server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU seconds spent busy by all cores since boot (Linux /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def write_policy(directory: Path) -> Path:
    path = directory / "replyclock.toml"
    path.write_text(POLICY_FILE.read_text() + WEBHOOK_ACCOUNT)
    return path


class WebProcess:
    """``replyclock web`` in its own process, logging to a file."""

    def __init__(self, database_url: str, directory: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "web.log"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            SECRET_ENV: SECRET,
            "SLACK_BOT_TOKEN": "",  # set, so a .env cannot turn Slack on
            "SLACK_SIGNING_SECRET": "",
            "OPERATOR_TOKEN": OPERATOR_TOKEN,  # /metrics on the public port, for this bench only
            "OPERATOR_PORT": "off",
        }
        env.pop("REPLYCLOCK_CONFIG", None)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.command(write_policy(directory)),
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._log.flush()
        self.ready_at = self.log_path.stat().st_size  # warnings before this (start-up) are not the load's

    def command(self, policy: Path) -> list[str]:
        """`replyclock web` as the Procfile runs it (the module, so no installed script is needed)."""
        return [sys.executable, "-m", "bot.cli", "web", "--config", str(policy)]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=2) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"replyclock web exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    if http.get(f"{self.base_url}/healthz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replyclock web did not answer /healthz within {START_TIMEOUT:.0f} s")
                time.sleep(0.05)

    def cpu(self) -> float | None:
        return cpu_seconds(self.proc.pid)

    def log_tail(self, chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def log_problems(self) -> list[str]:
        """Log lines at warning level or above since the server answered /healthz."""
        if not self._log.closed:
            self._log.flush()
        problems = []
        with self.log_path.open("rb") as log:
            log.seek(self.ready_at)
            lines = log.read().decode("utf-8", errors="replace").splitlines()
        for line in lines:
            try:
                level = json.loads(line).get("level")
            except ValueError:
                problems.append(line)  # not JSON: a traceback or a crash message
                continue
            if level in ("warning", "error", "critical"):
                problems.append(line)
        return problems

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# --- databases ------------------------------------------------------------------------------------


def postgres_sessions(url: str) -> int | None:
    """Connections ever opened to the load database (pg_stat_database.sessions, PostgreSQL 14+)."""
    parsed = make_url(url)
    plain = parsed.set(drivername="postgresql", query={}).render_as_string(hide_password=False)
    try:
        with psycopg.connect(plain, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = %s", (parsed.database,)
            ).fetchone()
    except psycopg.Error:
        return None
    return int(row[0]) if row and row[0] is not None else None


def migrated(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


# --- checking and measuring -----------------------------------------------------------------------


@dataclass
class Stored:
    """What the database holds for the webhook account after a run."""

    posts: dict[str, int | None]  # external id -> conversation id
    post_rows: int
    conversations: int
    cards: int
    acks: int
    # Transactions that stored them: a transaction's posts share one received_at (ingest's clock
    # reading), so distinct values count transactions that stored a post.
    transactions: int = 0


def stored_state(url: str) -> Stored:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            account_id = conn.scalar(select(Account.id).where(Account.name == ACCOUNT))
            rows = list(
                conn.execute(
                    select(Post.external_id, Post.conversation_id).where(Post.account_id == account_id)
                )
            )
            conversations = conn.scalar(
                select(func.count()).select_from(Conversation).where(Conversation.account_id == account_id)
            )
            transactions = conn.scalar(
                select(func.count(func.distinct(Post.received_at))).where(Post.account_id == account_id)
            )
            kinds = {
                kind: count
                for kind, count in conn.execute(select(Outbox.kind, func.count()).group_by(Outbox.kind))
            }
    finally:
        engine.dispose()
    return Stored(
        posts={external_id: conversation_id for external_id, conversation_id in rows},
        post_rows=len(rows),
        conversations=conversations or 0,
        cards=kinds.get("card", 0),
        acks=kinds.get("ack", 0),
        transactions=transactions or 0,
    )


def scrape_counters(base_url: str) -> dict[str, float]:
    """The server's webhook and ingest counters for the account, by sample name and labels."""
    with httpx.Client(timeout=10) as http:
        body = http.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}).text
    wanted = ("replyclock_webhook_requests_total{", "replyclock_posts_ingested_total{")
    counters: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            counters[name] = float(value)
    return counters


def percentile(sorted_values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Run:
    """One database at one concurrency level: what was sent, what came back, what was stored."""

    database: str
    concurrency: int
    client: str
    plan: list[Delivery]
    result: DriveResult
    server_cpu: float | None
    machine_busy: float | None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def outcomes(self) -> list[Outcome]:
        return self.result.outcomes

    @property
    def rate(self) -> float:
        return len(self.outcomes) / self.result.wall if self.result.wall else math.nan

    def latencies_ms(self) -> list[float]:
        return sorted((o.finished - o.started) * 1000 for o in self.outcomes)

    def statuses(self) -> Counter[str]:
        return Counter(str(o.status) if o.status else f"error:{o.error}" for o in self.outcomes)

    def fifths(self) -> list[float]:
        """Requests/s in each fifth of the run, by completion order (does it slow as the tables grow?)."""
        done = sorted(o.finished for o in self.outcomes)
        if len(done) < 10:
            return []
        edges = [round(len(done) * k / 5) for k in range(6)]
        start = min(o.started for o in self.outcomes)
        times = [start, *(done[e - 1] for e in edges[1:])]
        return [
            (edges[k + 1] - edges[k]) / (times[k + 1] - times[k]) if times[k + 1] > times[k] else math.nan
            for k in range(5)
        ]

    @property
    def other_cpu(self) -> float | None:
        if self.machine_busy is None or self.server_cpu is None:
            return None
        return max(0.0, self.machine_busy - self.server_cpu - self.result.cpu)


def check_answers(run: Run) -> dict[str, int]:
    """Per-id checks on the answers; returns the conversation id each accepted id was given."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for outcome in run.outcomes:
        if outcome.status != 202:
            continue
        try:
            answer = json.loads(outcome.body)
        except ValueError:
            run.failures.append(f"a 202 answer is not JSON: {outcome.body[:200]!r}")
            continue
        by_id.setdefault(run.plan[outcome.index].external_id, []).append(answer)
    conversation_of: dict[str, int] = {}
    bad_flags = bad_conversations = 0
    for external_id, answers in by_id.items():
        if sum(1 for a in answers if a.get("duplicate") is False) != 1 or any(
            a.get("duplicate") not in (True, False) for a in answers
        ):
            bad_flags += 1
        ids = {a.get("conversation_id") for a in answers}
        if len(ids) != 1 or not isinstance(next(iter(ids)), int):
            bad_conversations += 1
            continue
        conversation_of[external_id] = next(iter(ids))  # type: ignore[assignment]
    if bad_flags:
        run.failures.append(f"{bad_flags} ids were not answered duplicate=false exactly once")
    if bad_conversations:
        run.failures.append(
            f"{bad_conversations} ids were answered with differing or missing conversation ids"
        )
    repeats_answered = sum(len(a) - 1 for a in by_id.values())
    run.notes.append(
        f"{len(by_id):,} distinct ids accepted; {repeats_answered:,} re-deliveries answered 202 duplicate=true"
    )
    return conversation_of


def check_run(run: Run, stored: Stored, counters: dict[str, float], log_problems: list[str]) -> None:
    """Everything the requirement asks of a run, as failure lines on `run`."""
    statuses = run.statuses()
    if set(statuses) != {"202"}:
        run.failures.append(f"answers other than 202: {dict(statuses)}")
    if run.result.capped:
        run.failures.append(
            f"stopped at the time cap after {len(run.outcomes):,} of {len(run.plan):,} requests"
        )
    conversation_of = check_answers(run)
    accepted = set(conversation_of)
    distinct_sent = {d.external_id for d in run.plan}
    if stored.post_rows != len(stored.posts):
        run.failures.append(f"{stored.post_rows} post rows for {len(stored.posts)} ids: an id stored twice")
    if set(stored.posts) != accepted:
        missing = len(accepted - set(stored.posts))
        extra = len(set(stored.posts) - accepted)
        run.failures.append(f"stored posts differ from accepted ids: {missing} missing, {extra} not accepted")
    if distinct_sent - accepted:
        run.failures.append(f"{len(distinct_sent - accepted)} ids sent but never accepted")
    wrong = sum(1 for i, c in conversation_of.items() if stored.posts.get(i) != c)
    if wrong:
        run.failures.append(f"{wrong} posts are not in the conversation their answer named")
    if stored.conversations != len(accepted) or stored.cards != len(accepted) or stored.acks:
        run.failures.append(
            f"expected {len(accepted)} conversations and cards and no acks, found "
            f"{stored.conversations}, {stored.cards}, {stored.acks}"
        )
    run.notes.append(
        f"database: {stored.post_rows:,} posts, {stored.conversations:,} conversations, {stored.cards:,} card rows; "
        f"stored by {stored.transactions:,} transactions "
        f"({stored.post_rows / max(1, stored.transactions):.1f} posts each on average)"
    )
    answered = counters.get(f'replyclock_webhook_requests_total{{account="{ACCOUNT}",code="202"}}', 0)
    ingested = counters.get(f'replyclock_posts_ingested_total{{account="{ACCOUNT}",kind="webhook"}}', 0)
    if answered != statuses.get("202", 0) or ingested != len(accepted):
        run.failures.append(
            f"server counters disagree: {answered:.0f} answered 202, {ingested:.0f} ingested "
            f"(client saw {statuses.get('202', 0)} and {len(accepted)})"
        )
    if log_problems:
        run.failures.append(
            f"the server logged {len(log_problems)} warnings/errors, first: {log_problems[0][:300]}"
        )


# --- one run --------------------------------------------------------------------------------------


def run_level(
    database: str,
    concurrency: int,
    args: argparse.Namespace,
    postgres_url: str,
    *,
    ceiling: bool = False,
) -> Run:
    """A fresh database and server; drive the plan at `concurrency`; check everything."""
    with ExitStack() as stack:
        directory = scratch_directory(stack, "replyclock-load-")
        if database == "sqlite":
            url = f"sqlite:///{directory / 'load.db'}"
        else:
            url = postgres_schema(postgres_url, f"load_c{concurrency}", stack)
        migrated(url)
        tag = f"c{concurrency}"
        plan = build_plan(args.posts, args.duplicates, tag=tag, now=datetime.now(UTC))
        server = WebProcess(url, directory)
        try:
            path = f"/hooks/{UNKNOWN_ACCOUNT if ceiling else ACCOUNT}"
            sessions0 = postgres_sessions(url) if database == "postgres" else None
            server_cpu0, busy0 = server.cpu(), machine_busy_seconds()
            result = drive(args.client, server.base_url, path, plan, concurrency, args.time_cap)
            server_cpu1, busy1 = server.cpu(), machine_busy_seconds()
            sessions1 = postgres_sessions(url) if database == "postgres" else None
            counters = scrape_counters(server.base_url) if not ceiling else {}
        finally:
            code = server.stop()
        run = Run(
            database="(401, no database)" if ceiling else database,
            concurrency=concurrency,
            client=args.client,
            plan=plan,
            result=result,
            server_cpu=None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0,
            machine_busy=None if busy0 is None or busy1 is None else busy1 - busy0,
        )
        if sessions0 is not None and sessions1 is not None:
            # One of the two look-ups is counted too; a rough figure, to see whether the pool churns.
            run.notes.append(
                f"PostgreSQL connections opened during the load: about {sessions1 - sessions0 - 1}"
            )
        if code not in (0, -signal.SIGTERM):  # uvicorn re-raises SIGTERM after its graceful shutdown
            run.failures.append(f"replyclock web exited with {code} after SIGTERM")
        if ceiling:
            statuses = run.statuses()
            if set(statuses) != {"401"}:
                run.failures.append(f"ceiling run: answers other than 401: {dict(statuses)}")
        else:
            check_run(run, stored_state(url), counters, server.log_problems())
        progress(
            f"{run.database} c={concurrency}: {len(run.outcomes):,} requests in {result.wall:.1f} s, "
            f"{run.rate:,.0f}/s{'; FAILED' if run.failures else ''}"
        )
        return run


# --- profiling ------------------------------------------------------------------------------------


PROFILE_EVERY = 10  # cProfile one ingest call in this many; the others are timed undisturbed
_profiling = threading.local()


class _StoreProfiler:
    """Wraps bot.web._store_deliveries (one transaction of deliveries, on a worker thread).

    Every PROFILE_EVERY-th call runs under cProfile (one profile per worker thread); the others
    only have their wall time taken, so the split between the driver and Python is measured on
    calls cProfile did not slow down (it inflates Python-heavy code several times over).
    """

    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original
        self.lock = threading.Lock()
        self.profiles: dict[int, cProfile.Profile] = {}
        self.calls = 0
        self.seconds: list[float] = []  # unprofiled calls only
        self.sizes: list[int] = []  # deliveries per call, all calls

    def __call__(self, *args: Any) -> Any:
        with self.lock:
            self.calls += 1
            self.sizes.append(len(args[3]))
            profiled = self.calls % PROFILE_EVERY == 0
            profile = (
                self.profiles.setdefault(threading.get_ident(), cProfile.Profile()) if profiled else None
            )
        if profile is not None:
            _profiling.active = True
            try:
                return profile.runcall(self.original, *args)
            finally:
                _profiling.active = False
        began = time.perf_counter()
        try:
            return self.original(*args)
        finally:
            elapsed = time.perf_counter() - began
            with self.lock:
                self.seconds.append(elapsed)


class _StatementTimer:
    """Wall time of each statement sent by unprofiled calls, by statement (BEGIN IMMEDIATE included)."""

    def __init__(self, engine: Any) -> None:
        self.started: dict[int, float] = {}
        self.lock = threading.Lock()
        self.timings: list[tuple[str, float]] = []  # in order of completion
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        self.engine = engine

    def _before(
        self, _conn: Any, cursor: Any, _statement: str, _params: Any, _context: Any, _many: bool
    ) -> None:
        if not getattr(_profiling, "active", False):
            self.started[id(cursor)] = time.perf_counter()

    def _after(
        self, _conn: Any, cursor: Any, statement: str, _params: Any, _context: Any, _many: bool
    ) -> None:
        began = self.started.pop(id(cursor), None)
        if began is not None:
            elapsed = time.perf_counter() - began
            with self.lock:
                self.timings.append((_short_statement(statement), elapsed))

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)

    def total(self) -> float:
        return sum(seconds for _statement, seconds in self.timings)

    def table(self, requests: int, rows: int = 14) -> list[tuple[str, ...]]:
        """Per statement: calls, ms per transaction, mean ms in the first and in the last fifth of the run."""
        by_statement: dict[str, list[float]] = {}
        for statement, elapsed in self.timings:
            by_statement.setdefault(statement, []).append(elapsed)
        ranked = sorted(by_statement.items(), key=lambda item: -sum(item[1]))[:rows]
        out: list[tuple[str, ...]] = []
        for statement, seconds in ranked:
            fifth = max(1, len(seconds) // 5)
            out.append(
                (
                    statement,
                    f"{len(seconds):,}",
                    f"{sum(seconds) / max(1, requests) * 1000:.3f}",
                    f"{sum(seconds[:fifth]) / fifth * 1000:.3f}",
                    f"{sum(seconds[-fifth:]) / fifth * 1000:.3f}",
                )
            )
        return out


def _short_statement(statement: str) -> str:
    flat = " ".join(statement.split())
    head, found, tail = flat.partition(" FROM ")
    if found and head.startswith("SELECT "):
        flat = f"SELECT {head.count(',') + 1} cols FROM {tail}"
    return flat if len(flat) <= 96 else flat[:93] + "..."


def _generator_process(
    client: str, base_url: str, plan: list[Delivery], concurrency: int, time_cap: float
) -> DriveResult:
    return drive(client, base_url, f"/hooks/{ACCOUNT}", plan, concurrency, time_cap)


def _category(filename: str, function: str) -> str:
    if "sqlite3" in function or "psycopg" in filename or "psycopg" in function:
        return "database driver"
    if "/sqlalchemy/" in filename:
        return "SQLAlchemy"
    if any(f"/{package}/" in filename for package in ("bot", "connectors", "storage")):
        return "replyclock"
    if any(f"/{package}/" in filename for package in ("uvicorn", "h11", "starlette", "anyio")):
        return "uvicorn, h11, starlette, anyio"
    return "other (stdlib, logging, json, ...)"


def _print_profile(title: str, profiles: Sequence[cProfile.Profile], rows: int) -> None:
    """Own time by kind of code, then the most expensive functions; waiting in epoll is left out."""
    if not profiles:
        return
    buffer = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=buffer)
    for extra in profiles[1:]:
        stats.add(extra)
    own: Counter[str] = Counter()
    idle = 0.0
    for (filename, _line, function), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "select.epoll" in function:
            idle += tottime
        else:
            own[_category(filename, function)] += tottime
    total = sum(own.values()) or 1.0
    shares = ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in own.most_common())
    stats.sort_stats("tottime").print_stats(rows)
    waiting = f" (and {idle:.1f} s waiting in epoll)" if idle else ""
    print(f"\n  {title}: {total:.1f} s own time under cProfile{waiting}: {shares}")
    lines = buffer.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("\n".join(f"    {line}" for line in lines[start:] if line.strip() and "select.epoll" not in line))


def profile_level(database: str, concurrency: int, args: argparse.Namespace, postgres_url: str) -> None:
    """Serve in this process (profiled), load it from a generator process, print where the time goes."""
    import bot.web
    from bot import logs
    from bot.config import load_policy
    from bot.flow.channels import build_connectors
    from bot.flow.context import AppContext

    with ExitStack() as stack:
        directory = scratch_directory(stack, "replyclock-load-")
        url = (
            f"sqlite:///{directory / 'load.db'}"
            if database == "sqlite"
            else postgres_schema(postgres_url, f"load_profile_c{concurrency}", stack)
        )
        migrated(url)
        log_file = stack.enter_context((directory / "web.log").open("w"))
        logs.configure(stream=log_file)  # INFO JSON lines, as the real process writes them
        policy = load_policy(write_policy(directory))
        engine = make_engine(url)
        stack.callback(engine.dispose)
        timer = _StatementTimer(engine)
        stack.callback(timer.close)
        ctx = AppContext(policy=policy, engine=engine)
        app = bot.web.create_app(ctx, build_connectors(policy, {**os.environ, SECRET_ENV: SECRET}))
        store = _StoreProfiler(bot.web._store_deliveries)
        loop_profile = cProfile.Profile()
        enabled: list[bool] = []

        async def profiled(scope: Any, receive: Any, send: Any) -> None:
            if not enabled:  # first call: from now on the event-loop thread is profiled
                enabled.append(True)
                loop_profile.enable()
            await app(scope, receive, send)

        bot.web._store_deliveries = store  # type: ignore[assignment]
        stack.callback(setattr, bot.web, "_store_deliveries", store.original)
        plan = build_plan(args.posts, args.duplicates, tag=f"p{concurrency}", now=datetime.now(UTC))
        spawn = multiprocessing.get_context("spawn")
        with spawn.Pool(1) as pool, bot.web.serve_in_thread(profiled) as base_url:
            cpu0 = time.process_time()
            result = pool.apply(_generator_process, (args.client, base_url, plan, concurrency, args.time_cap))
            server_cpu = time.process_time() - cpu0
        loop_profile.create_stats()
        statuses = Counter(o.status for o in result.outcomes)
        latencies = sorted((o.finished - o.started) * 1000 for o in result.outcomes)
        seconds = sorted(s * 1000 for s in store.seconds)
        requests = max(1, len(result.outcomes))
        store_total, in_driver = sum(store.seconds), timer.total()
        print(
            f"profile: {database}, concurrency {concurrency}, {len(result.outcomes):,} requests, client {args.client}"
        )
        print(
            f"  {len(result.outcomes) / result.wall:,.0f} requests/s with the profilers on; answers {dict(statuses)}; "
            f"latency p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms; "
            f"server CPU {server_cpu / requests * 1e6:,.0f} µs per request"
        )
        if seconds:
            print(
                f"  bot.web._store_deliveries (one transaction: {sum(store.sizes) / len(store.sizes):.1f} deliveries "
                f"on average, at most {max(store.sizes)}), {len(seconds):,} unprofiled calls: wall p50 "
                f"{percentile(seconds, 0.5):.2f} ms, p99 {percentile(seconds, 0.99):.2f} ms; of it "
                f"{in_driver / store_total:.0%} inside the driver's execute (SQL, and waits for locks) and "
                f"{1 - in_driver / store_total:.0%} in Python around it (SQLAlchemy, ingest, COMMIT)"
            )
        print(
            "\n  statements of the unprofiled calls, wall time (a wait for a lock counts, as in BEGIN IMMEDIATE):"
        )
        header = ("statement", "calls", "ms per transaction", "mean ms, first fifth", "mean ms, last fifth")
        print_table(header, timer.table(len(seconds)), indent="    ")
        _print_profile("event-loop thread (HTTP, routing, signature, parsing, logging)", [loop_profile], 12)
        _print_profile(
            f"worker threads running bot.web._store_deliveries, 1 call in {PROFILE_EVERY}",
            list(store.profiles.values()),
            20,
        )
        print()


# --- report ---------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def seconds_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for line in (header, *rows):
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        print(indent + "  ".join(cells).rstrip())


def report(runs: Sequence[Run]) -> None:
    rows: list[tuple[str, ...]] = []
    for run in runs:
        latencies = run.latencies_ms()
        statuses = run.statuses()
        rows.append(
            (
                run.database,
                str(run.concurrency),
                f"{len(run.outcomes):,}",
                f"{run.result.wall:.1f}",
                f"{run.rate:,.0f}",
                f"{percentile(latencies, 0.5):.1f}",
                f"{percentile(latencies, 0.9):.1f}",
                f"{percentile(latencies, 0.99):.1f}",
                f"{latencies[-1] if latencies else math.nan:.1f}",
                " ".join(f"{code}:{count:,}" for code, count in sorted(statuses.items())),
            )
        )
    print_table(
        (
            "database",
            "conc.",
            "requests",
            "seconds",
            "requests/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "answers",
        ),
        rows,
    )
    print()
    cpu_rows: list[tuple[str, ...]] = []
    for run in runs:
        requests = max(1, len(run.outcomes))
        cpu_rows.append(
            (
                run.database,
                str(run.concurrency),
                " ".join(f"{rate:,.0f}" for rate in run.fifths()),
                seconds_or_dash(run.result.cpu),
                f"{run.result.cpu / requests * 1e6:,.0f}",
                seconds_or_dash(run.server_cpu),
                "-" if run.server_cpu is None else f"{run.server_cpu / requests * 1e6:,.0f}",
                seconds_or_dash(run.other_cpu),
            )
        )
    print_table(
        (
            "database",
            "conc.",
            "requests/s by fifth of the run",
            "generator cpu s",
            "µs/req",
            "server cpu s",
            "µs/req",
            "rest of machine cpu s",
        ),
        cpu_rows,
    )


def parse_levels(value: str) -> list[int]:
    try:
        levels = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("concurrency levels are whole numbers, comma separated") from None
    if not levels or any(level < 1 or level > 1024 for level in levels):
        raise argparse.ArgumentTypeError("each concurrency level must be between 1 and 1024")
    return list(dict.fromkeys(levels))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.webhook_load", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--posts", type=int, default=5_000, help="distinct deliveries per run (default 5,000)"
    )
    parser.add_argument(
        "--duplicates", type=float, default=0.10, help="re-deliveries as a share of --posts (default 0.10)"
    )
    parser.add_argument(
        "--concurrency",
        type=parse_levels,
        default=[16, 1, 64],
        help="levels, comma separated (default 16,1,64)",
    )
    parser.add_argument(
        "--databases", default="sqlite,postgres", help="sqlite and/or postgres, comma separated"
    )
    parser.add_argument(
        "--client", choices=("raw", "httpx"), default="raw", help="load generator (default raw)"
    )
    parser.add_argument(
        "--time-cap", type=float, default=300.0, help="seconds per run before it stops (default 300)"
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip the 401 generator-ceiling run")
    parser.add_argument(
        "--profile", action="store_true", help="profile the server in-process instead of the runs"
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL,
        help=f"the load database (its name must contain 'load' or 'bench'); default ${POSTGRES_URL_ENV} or %(default)s",
    )
    args = parser.parse_args(argv)
    if args.posts < 1 or not 0 <= args.duplicates <= 1:
        parser.error("--posts must be positive and --duplicates between 0 and 1")
    databases = list(dict.fromkeys(name.strip() for name in args.databases.split(",") if name.strip()))
    if set(databases) - {"sqlite", "postgres"}:
        parser.error(f"unknown databases: {', '.join(sorted(set(databases) - {'sqlite', 'postgres'}))}")

    started = time.perf_counter()
    postgres_version = "not used"
    skipped: list[str] = []
    if "postgres" in databases:
        try:
            postgres_version = prepare_postgres(args.postgres_url, name_must_contain=("load", "bench"))
        except psycopg.Error as error:
            postgres_version = "unreachable"
            skipped.append(f"postgres: skipped, not reachable ({' '.join(str(error).split())})")
            databases.remove("postgres")

    if args.profile:
        for database in databases:
            for level in args.concurrency:
                profile_level(database, level, args, args.postgres_url)
        return 0

    runs: list[Run] = []
    if not args.no_ceiling:
        runs.append(
            run_level("sqlite", 16 if 16 in args.concurrency else args.concurrency[0], args, "", ceiling=True)
        )
    for database in databases:
        for level in args.concurrency:
            runs.append(run_level(database, level, args, args.postgres_url))

    print(f"replyclock webhook load benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
        f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}; PostgreSQL {postgres_version}"
    )
    repeats = round(args.posts * args.duplicates)
    print(
        f"each run: a fresh database and `replyclock web` process (uvicorn, JSON logs at INFO); "
        f"{args.posts:,} distinct signed posts, each a new author opening a conversation, plus {repeats:,} "
        f"re-deliveries; closed loop at the given concurrency over keep-alive loopback connections "
        f"({args.client} client); the generator and the server share the machine's cores"
    )
    print()
    report(runs)
    for line in skipped:
        print(line)
    print()
    failed = False
    for run in runs:
        for note in run.notes:
            print(f"{run.database} c={run.concurrency}: {note}")
        for failure in run.failures:
            failed = True
            print(f"FAIL {run.database} c={run.concurrency}: {failure}")
        if not run.failures and run.notes:
            print(
                f"{run.database} c={run.concurrency}: OK: only 202s, every accepted id stored once, re-deliveries flagged"
            )
    print()
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
