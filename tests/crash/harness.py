"""The kill loop: `replyclock run` as a real process, SIGKILLed at random and at observed moments.

`Harness` starts ``python -m bot.cli run --config F`` against the loopback X (`CrashX`), the
Slack stand-in and a real database, kills it with SIGKILL, optionally leaves it down a moment
(0.3-2 s, half of the time), starts it again, and so on; then runs it once more without a kill
until everything is settled and stops it with SIGTERM. The kills are paced along the story (the
n-th not before n x window / kills seconds), and each waits for a trigger chosen with the seeded RNG:

``random_early``   0.1-2.5 s after the spawn: imports, migrations, recovery, the first jobs;
``random``         0-1.5 s after the process is up;
``page``           just after X served a mentions page with tweets in it (ingest);
``ack_in_flight``  while X holds its answer to a POST /2/tweets (an acknowledgement in flight);
``ack_answered``   0-20 ms after X received a POST /2/tweets (the answer on its way back, the
                   outbox row not yet settled);
``slack_step``     just after Slack received a ladder-step message (warning, breach, escalation,
                   nag, reassignment): the outbox, right after a sweep;
``sweep_step``     as soon as the process logs a ladder step (bot.flow.sweep logs each step inside the
                   sweep's transaction, before the commit); the process is left down before this
                   start, so that its catch-up sweep has many steps to take in one transaction.

A trigger whose event does not come within its patience (0.8-2.5 s) kills at that moment. Where
each kill landed is worked out from what was observed then: the process's last log line, the
stand-ins' records, and the outbox rows it left ``sending``. A kill can land in several places,
as the process runs its jobs in several threads.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from bot.demo.standin import DEFAULT_TOKEN, SlackStandIn, SlackUser
from bot.flow.outbox import CUSTOMER_KINDS
from storage.db import make_engine, make_sessionmaker
from storage.models import ANSWERED, OPEN, PENDING, SENDING, SENT, Conversation, Outbox, Post
from tests.crash.story import CUSTOMER_ROLES, IGNORED, OUR_ID, Publisher, Story
from tests.crash.xstandin import CrashX

ROOT = Path(__file__).resolve().parents[2]
CARE, BILLING, ADMIN = "C0CARE0001", "C0BILLING1", "C0ADMIN001"
EXPERTS = {
    "sam": ("Sam Okafor", "U0SAM0001"),
    "nina": ("Nina Park", "U0NINA001"),
    "maria": ("Maria Keller", "U0MARIA01"),
    "lee": ("Lee Wong", "U0LEE0001"),
}
ESCALATIONS = 2  # steps in the policy below
TRIGGERS = ("random", "page", "ack_in_flight", "ack_answered", "slack_step", "sweep_step")
TRIGGER_WEIGHTS = (3, 2, 2, 1, 2, 2)
LADDER_TEXT = re.compile(r"^(?:Deadline missed: |Reminder: |Escalation: )#\d+|^#\d+ (?:is |reassigned)")
STALL_SECONDS = 3.0  # the longest X holds a stalled answer (the kill comes long before)
LADDER_LOG = b'"event": "ladder step"'  # bot.flow.sweep logs each step before the sweep commits
RUNNING = "replyclock running"  # the log line `replyclock run` writes once its jobs are installed
CHILD_APPLICATION_NAME = "replyclock-crash-child"
STOP_PATIENCE = 20.0  # seconds for the final run to stop on SIGTERM
NEAR = 0.15  # seconds: an observation this close to the kill says where it landed


def policy_text(x_base_url: str) -> str:
    """The harness's policy: real-time targets of seconds, so a whole ladder runs in ~15 s."""
    experts = "\n".join(
        f'[experts.{key}]\nname = "{name}"\nslack_id = "{slack_id}"\ntimezone = "UTC"\n'
        f'hours = {{ mon-sun = ["00:00-24:00"] }}\ncapacity = 50\n'
        for key, (name, slack_id) in EXPERTS.items()
    )
    return f"""# tests/test_crash.py: seconds instead of hours, experts on duty around the clock.
[settings]
conversation_gap = "1s"
default_team = "care"
admin_channel = "{ADMIN}"

[calendars.always]
timezone = "UTC"
hours = {{ mon-sun = ["00:00-24:00"] }}

{experts}
[teams.care]
display_name = "Customer Care"
channel = "{CARE}"
experts = ["sam", "nina"]
calendar = "always"
on_call = "sam"
manager = "lee"

[teams.billing]
display_name = "Billing"
channel = "{BILLING}"
experts = ["maria", "lee"]
calendar = "always"
on_call = "lee"
manager = "maria"

[[policies]]
name = "billing"
clock = "wall"
calendar = "always"
first_response = "8s"
next_response = "6s"
warn_at = [0.5]
nag_every = "5s"
claim_within = "5s"
acknowledge = true
escalation = [ {{ after = "2s", notify = "team_channel" }}, {{ after = "6s", notify = "manager" }} ]
match = {{ teams = ["billing"] }}

[[policies]]
name = "fast"
clock = "wall"
calendar = "always"
first_response = "8s"
next_response = "6s"
warn_at = [0.5]
nag_every = "5s"
acknowledge = true
escalation = [ {{ after = "2s", notify = "team_channel" }}, {{ after = "6s", notify = "manager" }} ]

[[routing]]
name = "billing words"
team = "billing"
keywords = ["invoice", "refund", "charged"]

[authors]
ignore = ["spambot"]

[accounts.x]
kind = "x"
user_id = "{OUR_ID}"
api_base_url = "{x_base_url}"
max_results = 5
poll_interval = "1s"
timeout = 10

[acknowledgements.default]
en = "Thanks {{author}}! {{owner_first_name}} from our {{team}} team will get back to you by {{due}}."
"""


def slack_standin() -> SlackStandIn:
    """The Slack workspace: the teams' channels, the admin channel and every expert."""
    users = [SlackUser(slack_id, name, tz="UTC") for name, slack_id in EXPERTS.values()]
    return SlackStandIn(channels={CARE: "care", BILLING: "billing", ADMIN: "replyclock-admin"}, users=users)


def with_application_name(database_url: str) -> str:
    """On PostgreSQL, name the children's sessions, so that the harness can tell when they are gone."""
    if not database_url.startswith("postgresql"):
        return database_url
    return database_url + ("&" if "?" in database_url else "?") + f"application_name={CHILD_APPLICATION_NAME}"


def child_environment(database_url: str, slack: SlackStandIn) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "X_", "REPLYCLOCK_", "WEBHOOK_SECRET_")) and k != "DATABASE_URL"
    }
    env.update(
        DATABASE_URL=database_url,
        SLACK_BOT_TOKEN=DEFAULT_TOKEN,
        SLACK_API_URL=slack.base_url,
        # The stand-in here has no rate limits and the story's clock is compressed (nags a second
        # apart): pacing at Slack's real ~1 message/s per channel would let the queue grow without end.
        SLACK_PACING="false",
        X_BEARER_TOKEN="crash-harness-bearer",
        X_CONSUMER_KEY="crash-harness-consumer-key",
        X_CONSUMER_SECRET="crash-harness-consumer-secret",
        X_ACCESS_TOKEN="crash-harness-access-token",
        X_ACCESS_TOKEN_SECRET="crash-harness-access-secret",
        SWEEP_MAX_INTERVAL="1",
        OUTBOX_INTERVAL="0.2",
        LOG_LEVEL="INFO",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",  # a SIGABRT dumps the stacks (a SIGKILL, as ever, leaves no trace)
    )
    return env


@dataclass
class Kill:
    """One SIGKILL: what triggered it, whether the trigger's event came, and where it landed."""

    number: int
    trigger: str
    fired: bool
    uptime: float
    landed: list[str]
    left_sending: dict[str, int]
    down: float


@dataclass
class FinalState:
    """What the harness saw before answering everything in the final run."""

    open_cycles: dict[int, int]  # conversation id -> cycle, open when the final answers went out
    unanswered_threads: list[str]  # story threads (root ids) whose conversation was not open then
    answers: list[str]  # ids of the final answers
    seconds_to_settle: float


@dataclass
class RunReport:
    kills: list[Kill] = field(default_factory=list)
    starts: int = 0
    kill_phase_seconds: float = 0.0
    final_phase_seconds: float = 0.0
    final: FinalState | None = None
    customer_in_flight: set[int] = field(default_factory=set)  # outbox ids a kill left `sending`
    staff_in_flight: set[int] = field(default_factory=set)
    stop_hung: str | None = None  # the final run's stacks, when it did not stop on SIGTERM


class ChildFailed(AssertionError):
    """`replyclock run` exited on its own (it should only ever die by our hand)."""


class Harness:
    def __init__(
        self,
        *,
        workdir: Path,
        database_url: str,
        command: Sequence[str],
        x: CrashX,
        slack: SlackStandIn,
        story: Story,
        rng: random.Random,
    ) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.command = list(command)
        self.x = x
        self.slack = slack
        self.story = story
        self.rng = rng
        self.env = child_environment(with_application_name(database_url), slack)
        self.engine = make_engine(database_url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine, read_only=True)
        self.report = RunReport()
        self.publisher = Publisher(story, x)
        self._log: IO[str] | None = None
        self._children: list[subprocess.Popen[bytes]] = []

    def close(self) -> None:
        # A failure (an assertion while waiting on a child) must not leave a `replyclock run`
        # behind: an orphan keeps working on the test database and disturbs the next run there.
        for proc in self._children:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        self.publisher.stop()
        self.x.release()
        self.engine.dispose()
        if self._log is not None:
            self._log.close()

    # -- processes ------------------------------------------------------------------------------

    def log_path(self, number: int) -> Path:
        return self.workdir / f"run-{number:03d}.log"

    def spawn(self, number: int) -> subprocess.Popen[bytes]:
        if self._log is not None:
            self._log.close()
        self._log = self.log_path(number).open("w")
        self.report.starts += 1
        proc = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._children = [child for child in self._children if child.poll() is None] + [proc]
        return proc

    def _alive(self, proc: subprocess.Popen[bytes], number: int) -> None:
        if proc.poll() is not None:
            raise ChildFailed(
                f"run {number} exited by itself with {proc.returncode}:\n{self.tail(number, 6000)}"
            )

    def tail(self, number: int, chars: int = 3000) -> str:
        return self.log_path(number).read_text(errors="replace")[-chars:]

    # -- the kill loop --------------------------------------------------------------------------

    def run(self, kills: int) -> RunReport:
        self._story_start = time.monotonic()
        begun = self._story_start
        self.publisher.start(self._story_start)
        pace = self.story.window / kills
        for number in range(1, kills + 1):
            self.report.kills.append(self._one_kill(number, pace))
        self.report.kill_phase_seconds = time.monotonic() - begun
        final_begun = time.monotonic()
        self._final_run(kills + 1)
        self.report.final_phase_seconds = time.monotonic() - final_begun
        return self.report

    def _one_kill(self, number: int, pace: float) -> Kill:
        rng = self.rng
        trigger = rng.choices(TRIGGERS, weights=TRIGGER_WEIGHTS)[0]
        if trigger == "sweep_step":
            # Stay down until the paced moment: steps fall due meanwhile, and the catch-up sweep
            # at start-up takes them all in one transaction, which the kill then interrupts.
            time.sleep(max(0.0, self._story_start + (number - 1) * pace - time.monotonic()))
        proc = self.spawn(number)
        started = time.monotonic()
        if trigger == "random" and rng.random() < 0.35:
            trigger = "random_early"  # anywhere from the imports to the first jobs
        elif trigger != "sweep_step":
            # Let it start and work a while, pacing the kills along the story.
            self._until(proc, number, lambda: RUNNING in self.log_path(number).read_text(), 60, "start")
            ready = time.monotonic()
            self._sleep(
                proc,
                number,
                max(ready + rng.uniform(0.0, 0.6), self._story_start + (number - 1) * pace) - ready,
            )
        pages, posts = self.x.counts()
        slack_mark = len(self.slack.calls_to("chat.postMessage"))
        patience = rng.uniform(0.8, 2.5)
        fired = False
        try:
            if trigger == "random_early":
                self._sleep(proc, number, rng.uniform(0.1, 2.5))
                fired = True
            elif trigger == "random":
                self._sleep(proc, number, rng.uniform(0.0, 1.5))
                fired = True
            elif trigger == "page":
                fired = self._wait(proc, number, patience, lambda: any(p.ids for p in self.x.pages[pages:]))
                if fired:
                    time.sleep(rng.uniform(0.0, 0.03))
            elif trigger == "ack_in_flight":
                self.x.arm_stall(STALL_SECONDS)
                fired = self._wait(proc, number, patience, self.x.stalled.is_set)
            elif trigger == "ack_answered":
                fired = self._wait(proc, number, patience, lambda: len(self.x.posts) > posts)
                if fired:
                    time.sleep(rng.uniform(0.0, 0.02))
            elif trigger == "slack_step":
                fired = self._wait_slack_step(proc, number, patience, slack_mark)
                if fired:
                    time.sleep(rng.uniform(0.0, 0.01))
            else:
                fired = self._wait_log(proc, number, 10.0 + patience, LADDER_LOG)
            self._alive(proc, number)
            killed_at = time.time()
            in_flight = self.x.stalled.is_set()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            self.x.release()
        uptime = time.monotonic() - started
        self._settle_server()
        sending = self._sending()
        landed = self._landed(number, killed_at, in_flight, sending)
        down = 0.0 if rng.random() < 0.5 else rng.uniform(0.3, 2.0)
        time.sleep(down)
        return Kill(number, trigger, fired, round(uptime, 3), landed, dict(sending), round(down, 3))

    def _sleep(self, proc: subprocess.Popen[bytes], number: int, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._alive(proc, number)
            time.sleep(min(left, 0.05))

    def _wait(
        self, proc: subprocess.Popen[bytes], number: int, patience: float, condition: Callable[[], bool]
    ) -> bool:
        end = time.monotonic() + patience
        while (left := end - time.monotonic()) > 0:
            if self.x.wait_until(condition, min(left, 0.1)):
                return True
            self._alive(proc, number)
        return False

    def _wait_log(self, proc: subprocess.Popen[bytes], number: int, patience: float, needle: bytes) -> bool:
        """Wait until the process's log (from its start) has a line containing `needle`; polls each ms."""
        path = self.log_path(number)
        end = time.monotonic() + patience
        with path.open("rb") as log:
            seen = b""
            while time.monotonic() < end:
                chunk = log.read()
                if chunk:
                    seen = seen[-len(needle) :] + chunk
                    if needle in seen:
                        return True
                else:
                    self._alive(proc, number)
                    time.sleep(0.001)
        return False

    def _wait_slack_step(
        self, proc: subprocess.Popen[bytes], number: int, patience: float, mark: int
    ) -> bool:
        end = time.monotonic() + patience
        while (left := end - time.monotonic()) > 0:
            try:
                calls = self.slack.wait_for("chat.postMessage", count=mark + 1, timeout=min(left, 0.1))
            except TimeoutError:
                self._alive(proc, number)
                continue
            if any(LADDER_TEXT.search(str(call.params.get("text", ""))) for call in calls[mark:]):
                return True
            mark = len(calls)
        return False

    # -- where did it land? ---------------------------------------------------------------------

    def _settle_server(self) -> None:
        """On PostgreSQL, wait until the killed process's sessions are gone.

        A SIGKILL does not stop a COMMIT the server has already received: read too early, a claim
        that commits a moment later looks `pending` here and then is `sending` after all.
        """
        if self.engine.dialect.name != "postgresql":
            return
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with self.engine.connect() as connection:
                others = connection.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                    {"name": CHILD_APPLICATION_NAME},
                )
            if not others:
                return
            time.sleep(0.02)

    def _sending(self) -> Counter[str]:
        """The outbox rows this kill left `sending` (not counting any an earlier kill left), by lane."""
        try:
            with self.sessions() as session:
                rows = list(session.execute(select(Outbox.id, Outbox.kind).where(Outbox.status == SENDING)))
        except DBAPIError:  # killed before the first migration made the table
            return Counter()
        known = self.report.customer_in_flight | self.report.staff_in_flight
        fresh = Counter[str]()
        for outbox_id, kind in rows:
            if outbox_id in known:
                continue
            customer = kind in CUSTOMER_KINDS
            (self.report.customer_in_flight if customer else self.report.staff_in_flight).add(outbox_id)
            fresh["customer" if customer else "staff"] += 1
        return fresh

    def _landed(self, number: int, killed_at: float, in_flight: bool, sending: Counter[str]) -> list[str]:
        """What the process was in the middle of when the kill came (several things, in its threads)."""
        events: list[tuple[float, str]] = []
        for line in self.log_path(number).read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "ts" in record:
                events.append((_epoch(str(record["ts"])), str(record.get("event", ""))))
        if not any(event == RUNNING for _, event in events):
            return ["start-up (imports, migrations, recovery)"]
        last_at, last = events[-1]
        recent = killed_at - last_at < NEAR
        landed = []
        if last == "ladder step" and recent:
            landed.append("sweep: inside its transaction")
        elif last == "sweep" and recent:
            landed.append("sweep: just committed")
        if last == "conversation opened" and recent:
            landed.append("ingest: inside its transaction")
        elif any(p.ids and killed_at - _wall(p.at) < NEAR for p in self.x.pages[-3:]):
            landed.append("ingest: page fetched")
        if in_flight or sending["customer"]:
            landed.append("outbox: acknowledgement call to X not settled (row left sending)")
        elif self.x.posts and killed_at - _wall(self.x.posts[-1].at) < NEAR:
            landed.append("outbox: just after an X call (row settled)")
        if sending["staff"]:
            landed.append("outbox: Slack call not settled (row left sending)")
        elif self.slack.calls and killed_at - self.slack.calls[-1].timestamp < NEAR:
            landed.append("outbox: just after a Slack call (row settled)")
        return landed or ["between jobs"]

    # -- the final run --------------------------------------------------------------------------

    def _final_run(self, number: int) -> None:
        proc = self.spawn(number)
        try:
            self._final(proc, number)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_PATIENCE)
                except subprocess.TimeoutExpired:
                    # Hung on SIGTERM: SIGABRT makes faulthandler write every thread's stack to the log.
                    proc.send_signal(signal.SIGABRT)
                    proc.wait(timeout=30)
                    self.report.stop_hung = self.tail(number, 12000)
        if proc.returncode != 0 and self.report.stop_hung is None:
            raise ChildFailed(f"the final run ended with {proc.returncode}:\n{self.tail(number)}")

    def _final(self, proc: subprocess.Popen[bytes], number: int) -> None:
        self._until(proc, number, self.publisher.done.is_set, self.story.length + 30, "the story's end")
        customer_ids = {
            tid for tid, role in self.story.roles().items() if role in CUSTOMER_ROLES or role == IGNORED
        }
        self._until(
            proc, number, lambda: self._ladders_done(customer_ids), 60, "every open ladder to its last step"
        )
        # ... and sent: a step due before the answers must reach Slack (a stuck row may delay it by
        # seconds, never until the answer retires it).
        self._until(proc, number, self._ladders_sent, 20, "every owed ladder step sent")
        with self.sessions() as session:
            open_cycles = {
                cid: cycle
                for cid, cycle in session.execute(
                    select(Conversation.id, Conversation.cycle).where(Conversation.status == OPEN)
                )
            }
            conversation_of = {
                external_id: cid
                for external_id, cid in session.execute(
                    select(Post.external_id, Post.conversation_id).where(Post.direction == "in")
                )
            }
        # Threads the customer is waiting on whose conversation the product does not hold open.
        waiting = [t for t in self.story.threads.values() if not t.last_from_us]
        unanswered = [
            t.root for t in waiting if conversation_of.get(t.last_customer_tweet) not in open_cycles
        ]
        answers = self.story.final_answers()
        answered_at = time.monotonic()
        self.x.publish(answers)
        answer_ids = [str(a["id"]) for a in answers]
        self._until(proc, number, lambda: self._settled(answer_ids), 60, "everything answered and sent")
        self.report.final = FinalState(
            open_cycles, unanswered, answer_ids, round(time.monotonic() - answered_at, 3)
        )

    def _until(
        self,
        proc: subprocess.Popen[bytes],
        number: int,
        condition: Callable[[], bool],
        timeout: float,
        what: str,
    ) -> None:
        end = time.monotonic() + timeout
        while not condition():
            self._alive(proc, number)
            if time.monotonic() > end:
                raise AssertionError(f"run {number}: no {what} within {timeout} s\n{self.tail(number)}")
            time.sleep(0.1)

    def _ladders_done(self, customer_ids: set[str]) -> bool:
        with self.sessions() as session:
            stored = set(session.scalars(select(Post.external_id).where(Post.external_id.in_(customer_ids))))
            if stored != customer_ids:
                return False
            behind = session.scalar(
                select(Conversation.id)
                .where(
                    Conversation.status == OPEN,
                    (Conversation.escalation_step < ESCALATIONS)
                    | (Conversation.breach_cycle.is_(None))
                    | (Conversation.breach_cycle != Conversation.cycle),
                )
                .limit(1)
            )
            return behind is None

    def _ladders_sent(self) -> bool:
        with self.sessions() as session:
            unsent = session.scalar(
                select(Outbox.id)
                .join(Conversation, Conversation.id == Outbox.conversation_id)
                .where(
                    Conversation.status == OPEN,
                    Outbox.kind.in_(("breach", "escalation")),
                    Outbox.status.in_((PENDING, SENDING)),
                )
                .limit(1)
            )
            if unsent is not None:
                return False
            nagged = (
                select(Outbox.id)
                .where(Outbox.conversation_id == Conversation.id, Outbox.kind == "nag", Outbox.status == SENT)
                .exists()
            )
            return (
                session.scalar(select(Conversation.id).where(Conversation.status == OPEN, ~nagged).limit(1))
                is None
            )

    def _settled(self, answer_ids: list[str]) -> bool:
        with self.sessions() as session:
            stored = session.scalars(select(Post.external_id).where(Post.external_id.in_(answer_ids)))
            if len(set(stored)) != len(answer_ids):
                return False
            if session.scalar(select(Conversation.id).where(Conversation.status != ANSWERED).limit(1)):
                return False
            busy = session.scalar(select(Outbox.id).where(Outbox.status.in_((PENDING, SENDING))).limit(1))
            return busy is None


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _wall(monotonic: float) -> float:
    """A time.monotonic() reading as wall-clock time."""
    return time.time() - (time.monotonic() - monotonic)


def tail_logs(workdir: Path, runs: int) -> str:
    return "\n".join(
        f"--- run {n}\n" + (workdir / f"run-{n:03d}.log").read_text(errors="replace")[-1500:]
        for n in range(max(1, runs - 2), runs + 1)
        if (workdir / f"run-{n:03d}.log").exists()
    )


def main_command(*, policy: Path) -> list[str]:
    """``python -m bot.cli run --config F``, unchanged on both databases: a killed sender's rows are
    recovered once its lease lapses (seconds), with the default 5-minute row lease."""
    return [sys.executable, "-m", "bot.cli", "run", "--config", str(policy)]


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
