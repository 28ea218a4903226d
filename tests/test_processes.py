"""Real processes against one database: competing sweepers, and a sender killed mid-send.

The workers are separate Python processes (tests/procs/*.py) driven over pipes; time is a
FakeClock in each of them, passed on the command line, so nothing here waits for a deadline.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy import func, select

from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from storage.models import SENDING, SENT, UNKNOWN, Conversation, Event, Outbox
from tests.conftest import MONDAY
from tests.test_ingest import ingest, post

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROCS = Path(__file__).resolve().parent / "procs"
POLICY_FILE = Path(__file__).resolve().parent / "data" / "policy.toml"
ANSWER_TIMEOUT = 60.0


def is_postgres_url(url: str) -> bool:
    return url.startswith("postgresql")


# --------------------------------------------------------------------------------------------
# Child processes


class Child:
    """A helper script in its own process; JSON lines out, lines in."""

    def __init__(self, name: str, script: Path, args: Sequence[str], stderr_path: Path) -> None:
        self.name = name
        self.stderr_path = stderr_path
        self._stderr: IO[str] = stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            cwd=ROOT,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()[-4000:]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """The next JSON line the child printed."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no answer within {timeout} s\n{self.stderr_text()}") from None
        if line is None:
            code = self.proc.wait()
            raise AssertionError(f"{self.name} exited with {code} before answering\n{self.stderr_text()}")
        record: dict[str, Any] = json.loads(line)
        return record

    def finish(self, timeout: float = ANSWER_TIMEOUT) -> None:
        """Close its input and expect a clean exit."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        code = self.proc.wait(timeout=timeout)
        assert code == 0, f"{self.name} exited with {code}\n{self.stderr_text()}"

    def kill(self) -> None:
        """SIGKILL: no clean-up handler, no `finally`, no flush: like a power cut for the process."""
        self.proc.kill()
        self.proc.wait(timeout=ANSWER_TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self._stderr.close()


Spawn = Callable[..., Child]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start a tests/procs script; whatever is still running at the end of the test is killed."""
    started: list[Child] = []

    def start(script: str, *args: str, name: str) -> Child:
        child = Child(name, PROCS / script, args, tmp_path / f"{name}.stderr")
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


# --------------------------------------------------------------------------------------------
# 1. Two sweepers, one database, 1,000 due conversations: every ladder step exactly once.

CONVERSATIONS = 1000
DUE = MONDAY + timedelta(hours=1)  # "site is down" is urgent: first response within 1 h, wall clock
# The instants both sweepers are released at, and the ladder steps each brings to every
# conversation (urgent policy: warn at 75 %, escalate +10 min and +30 min, nag every 20 min).
# The last two come late, as after a busy spell: one sweep then takes two steps at once.
LADDER: tuple[tuple[datetime, tuple[tuple[str, int], ...]], ...] = (
    (MONDAY + timedelta(minutes=46), (("warning", 0),)),
    (MONDAY + timedelta(minutes=61), (("breach", 0),)),
    (MONDAY + timedelta(minutes=81), (("escalation", 0), ("nag", 1))),
    (MONDAY + timedelta(minutes=101), (("escalation", 1), ("nag", 2))),
)
LADDER_KINDS = ("warning", "breach", "escalation", "nag", "reassign")


def seed_urgent_conversations(ctx: AppContext, count: int) -> list[int]:
    posts = [post(f"down-{n}", "site is down", author=f"customer{n}") for n in range(count)]
    result = ingest(ctx, *posts)
    assert len(result.opened) == count
    with ctx.sessions() as session:
        first_actions = set(session.scalars(select(Conversation.next_action_at)))
    assert first_actions == {MONDAY + timedelta(minutes=45)}
    return sorted(result.opened)


def due_now(ctx: AppContext, at: datetime) -> int:
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).where(Conversation.next_action_at <= at)) or 0


def test_two_sweeper_processes_take_every_ladder_step_exactly_once(
    database_url: str, ctx: AppContext, spawn: Spawn
) -> None:
    sweepers = [
        spawn(
            "sweeper.py",
            "--database-url",
            database_url,
            "--policy",
            str(POLICY_FILE),
            "--start",
            MONDAY.isoformat(),
            "--batch-size",
            "50",
            name=f"sweeper-{n}",
        )
        for n in (1, 2)
    ]
    conversation_ids = seed_urgent_conversations(ctx, CONVERSATIONS)  # while they start up
    for sweeper in sweepers:
        assert sweeper.receive()["ready"] == sweeper.pid

    processed_by: Counter[str] = Counter()
    for at, due_steps in LADDER:
        for sweeper in sweepers:  # the barrier: both are blocked on their pipe until now
            sweeper.send(at.isoformat())
        reports = [sweeper.receive() for sweeper in sweepers]
        assert [r["failed"] for r in reports] == [0, 0], reports
        # Each due conversation was claimed by exactly one of them, and only once ...
        assert sum(r["processed"] for r in reports) == CONVERSATIONS, (at, reports)
        steps: Counter[str] = Counter()
        for report, sweeper in zip(reports, sweepers, strict=True):
            steps.update(report["steps"])
            processed_by[sweeper.name] += report["processed"]
        assert steps == {kind: CONVERSATIONS for kind, _ in due_steps}, (at, reports)
        # ... and between them nothing due was left behind.
        assert due_now(ctx, at) == 0
    for sweeper in sweepers:
        sweeper.finish()

    expected = {(cid, kind, index) for cid in conversation_ids for _, due in LADDER for kind, index in due}
    with ctx.sessions() as session:
        outbox = Counter(
            (conversation_id, kind, int(payload["index"]))
            for conversation_id, kind, payload in session.execute(
                select(Outbox.conversation_id, Outbox.kind, Outbox.payload).where(
                    Outbox.kind.in_(LADDER_KINDS)
                )
            )
        )
        # The outbox key is unique, so a step acted on twice would show only here, in the audit trail.
        acted = Counter(
            (conversation_id, action, int(detail["index"]))
            for conversation_id, action, detail in session.execute(
                select(Event.conversation_id, Event.action, Event.detail).where(Event.actor == "sweep")
            )
        )
        states = {
            tuple(state)
            for state in session.execute(
                select(
                    Conversation.warnings_sent,
                    Conversation.breach_cycle,
                    Conversation.escalation_step,
                    Conversation.nag_level,
                    Conversation.next_action_at,
                )
            )
        }
    assert set(outbox) == expected and set(outbox.values()) == {1}
    assert set(acted) == expected
    twice = {step: n for step, n in acted.items() if n != 1}
    assert not twice, f"{len(twice)} ladder steps acted on more than once, e.g. {sorted(twice.items())[:5]}"
    last_nag = max(index for _, due in LADDER for kind, index in due if kind == "nag")
    assert states == {(1, 0, 2, last_nag, DUE + (last_nag + 1) * timedelta(minutes=20))}
    if is_postgres_url(database_url):
        # SKIP LOCKED lets them work side by side; on SQLite BEGIN IMMEDIATE may let one do it all.
        assert len(processed_by) == 2 and all(n > 0 for n in processed_by.values()), processed_by
    print(f"conversations processed per sweeper: {dict(processed_by)}")


# --------------------------------------------------------------------------------------------
# 2. The sender killed between `sending` and the end of the customer call.


class StandIn:
    """A loopback stand-in for the platform (/customer) and Slack (/staff).

    It records every request body, and can hold the answer to the N-th customer request
    until `release` is set (`stalled` is set once that request has arrived).
    """

    def __init__(self, stall_customer_at: int | None = None) -> None:
        self.stall_customer_at = stall_customer_at
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._received: list[tuple[str, dict[str, Any]]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                with stand_in._lock:
                    stand_in._received.append((self.path, body))
                    serial = len(stand_in._received)
                    customer_requests = sum(1 for path, _ in stand_in._received if path == "/customer")
                if self.path == "/customer" and customer_requests == stand_in.stall_customer_at:
                    stand_in.stalled.set()
                    stand_in.release.wait(ANSWER_TIMEOUT)
                answer = json.dumps({"id": f"ext-{serial}"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                if isinstance(sys.exc_info()[1], ConnectionError):
                    return  # answering a client we killed
                super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="stand-in", daemon=True
        )
        self._thread.start()

    def received(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for where, body in self._received if where == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_ins() -> Iterator[Callable[[int | None], StandIn]]:
    made: list[StandIn] = []

    def make(stall_customer_at: int | None) -> StandIn:
        made.append(StandIn(stall_customer_at))
        return made[-1]

    yield make
    for stand_in in made:
        stand_in.close()


KILL_POINTS = ("before_request", "in_flight", "after_response")
KILLED = 2  # the customer message (in send order) the first sender dies on


def row(ctx: AppContext, outbox_id: int) -> Outbox:
    with ctx.sessions() as session:
        found = session.get(Outbox, outbox_id)
        assert found is not None
        return found


def wait_for(event: threading.Event, child: Child, what: str) -> None:
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while not event.wait(0.02):
        if child.proc.poll() is not None:
            raise AssertionError(
                f"{child.name} exited with {child.proc.returncode} before {what}\n{child.stderr_text()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{child.name}: no {what} within {ANSWER_TIMEOUT} s\n{child.stderr_text()}")


def kill_sender_and_restart(
    *,
    database_url: str,
    ctx: AppContext,
    clock: FakeClock,
    spawn: Spawn,
    stand_ins: Callable[[int | None], StandIn],
    kill_at: str,
    limit: int,
) -> tuple[StandIn, list[Outbox], dict[str, Any]]:
    """Three acks queued; the first sender dies on the 2nd; a second one recovers and finishes.

    Returns the stand-in server, the ack rows (send order) and the second sender's report.
    """
    ingest(
        ctx,
        *(post(str(n), "hello, a question", author=name) for n, name in enumerate(("ana", "ben", "carol"))),
    )
    with ctx.sessions() as session:
        acks = list(session.scalars(select(Outbox).where(Outbox.kind == "ack").order_by(Outbox.id)))
    assert len(acks) == 3
    killed = acks[KILLED - 1]
    stand_in = stand_ins(KILLED if kill_at == "in_flight" else None)
    common = ("--database-url", database_url, "--policy", str(POLICY_FILE), "--server", stand_in.url)
    pause: tuple[str, ...] = ()
    if kill_at != "in_flight":
        pause = ("--pause", "before" if kill_at == "before_request" else "after", "--pause-at", str(KILLED))
    first = spawn(
        "sender.py", *common, "--at", clock.now().isoformat(), "--limit", str(limit), *pause, name="sender-1"
    )
    if kill_at == "in_flight":
        wait_for(stand_in.stalled, first, "the stalled request")
    else:
        paused = first.receive()
        assert paused["event"] == "paused" and paused["outbox_id"] == killed.id, paused

    # The kill point: the row is `sending`, committed, and the call has (or has not) reached the server.
    assert row(ctx, killed.id).status == SENDING
    seen = [body["key"] for body in stand_in.received("/customer")]
    already = [ack.idempotency_key for ack in acks[: KILLED - 1]]
    assert seen == (already if kill_at == "before_request" else [*already, killed.idempotency_key])
    if is_postgres_url(database_url):
        # Several senders share PostgreSQL: a row whose sender is alive (its process exists, its
        # lease is renewed) is left alone; once the process is gone, the next sender settles it at
        # once, without waiting for any lease (same host).
        assert OutboxSender(ctx, {}).recover() == 0
        assert row(ctx, killed.id).status == SENDING
    first.kill()
    stand_in.release.set()

    if is_postgres_url(database_url):
        restart_at, recover = clock.now(), "lease"
    else:
        # One process per SQLite file (`replyclock run` holds a lock): every `sending` row is an orphan.
        restart_at, recover = clock.now(), "all"
    second = spawn(
        "sender.py",
        *common,
        "--at",
        restart_at.isoformat(),
        "--recover",
        recover,
        "--limit",
        str(limit),
        name="sender-2",
    )
    report = second.receive()
    assert report["event"] == "done", report
    second.finish()
    return stand_in, acks, report


def assert_at_most_once(stand_in: StandIn, acks: list[Outbox], kill_at: str) -> None:
    """The stand-in platform never got the same customer message twice, and got the killed one at most once."""
    delivered = stand_in.received("/customer")
    keys = Counter(body["key"] for body in delivered)
    texts = Counter(body["text"] for body in delivered)
    assert max(keys.values()) == 1, keys
    assert max(texts.values()) == 1, texts
    killed = acks[KILLED - 1]
    assert keys[killed.idempotency_key] == (0 if kill_at == "before_request" else 1)
    assert set(keys) <= {ack.idempotency_key for ack in acks}


def assert_staff_told(ctx: AppContext, stand_in: StandIn, killed: Outbox) -> None:
    """The message of unknown fate is not lost from view: an event, and a staff message that went out."""
    with ctx.sessions() as session:
        notice = session.scalars(
            select(Outbox).where(Outbox.idempotency_key == f"outbox:{killed.id}:unknown")
        ).one()
        events = [
            event
            for event in session.scalars(select(Event).where(Event.action == "delivery_unknown"))
            if event.detail.get("outbox_id") == killed.id
        ]
    assert notice.kind == "delivery_unknown" and notice.status == SENT
    assert notice.payload["outbox_id"] == killed.id and notice.payload["text"] == killed.payload["text"]
    assert len(events) == 1 and events[0].conversation_id == killed.conversation_id
    told = [
        body
        for body in stand_in.received("/staff")
        if body["kind"] == "delivery_unknown" and body["payload"]["outbox_id"] == killed.id
    ]
    assert len(told) == 1


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sender_killed_mid_send_never_sends_a_customer_message_twice(
    database_url: str,
    ctx: AppContext,
    clock: FakeClock,
    spawn: Spawn,
    stand_ins: Callable[[int | None], StandIn],
    kill_at: str,
) -> None:
    # One row per claim: when the process dies, the message in flight is the only one `sending`.
    stand_in, acks, report = kill_sender_and_restart(
        database_url=database_url,
        ctx=ctx,
        clock=clock,
        spawn=spawn,
        stand_ins=stand_ins,
        kill_at=kill_at,
        limit=1,
    )
    assert_at_most_once(stand_in, acks, kill_at)
    killed = acks[KILLED - 1]
    after = {ack.id: row(ctx, ack.id) for ack in acks}
    assert after[killed.id].status == UNKNOWN
    assert "process stopped" in (after[killed.id].last_error or "")
    assert [after[ack.id].status for ack in acks if ack.id != killed.id] == [SENT, SENT]
    assert Counter(body["key"] for body in stand_in.received("/customer")) == {
        ack.idempotency_key: 1 for ack in acks if ack.id != killed.id or kill_at != "before_request"
    }
    assert_staff_told(ctx, stand_in, killed)
    assert report["recovered"] == 1 and report["unknown"] == 0 and report["failed"] == 0
    with ctx.sessions() as session:
        statuses = Counter(session.scalars(select(Outbox.status)))
    assert statuses == {SENT: 3 + 2 + 1, UNKNOWN: 1}  # cards, other acks, the staff notice; nothing pending


def test_sender_killed_with_a_batch_claimed_leaves_only_the_message_in_flight_unknown(
    database_url: str,
    ctx: AppContext,
    clock: FakeClock,
    spawn: Spawn,
    stand_ins: Callable[[int | None], StandIn],
) -> None:
    kill_at = "in_flight"
    # As `replyclock run` sends: OutboxSender.send_due() with its default batch of 100.
    stand_in, acks, _report = kill_sender_and_restart(
        database_url=database_url,
        ctx=ctx,
        clock=clock,
        spawn=spawn,
        stand_ins=stand_ins,
        kill_at=kill_at,
        limit=100,
    )
    assert_at_most_once(stand_in, acks, kill_at)  # holds whatever the batch size
    killed = acks[KILLED - 1]
    assert row(ctx, killed.id).status == UNKNOWN
    assert_staff_told(ctx, stand_in, killed)
    never_tried = [ack for ack in acks[KILLED:] if row(ctx, ack.id).status == UNKNOWN]
    assert never_tried == [], "a message never attempted must not be marked unknown"
    assert [row(ctx, ack.id).status for ack in acks[KILLED:]] == [SENT]
