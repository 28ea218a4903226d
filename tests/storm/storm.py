"""One storm from start to finish: servers, processes, load, the wait for the ladder, the checks.

`run_storm` expects an empty, reachable PostgreSQL database (the caller resets it); it starts
the Slack stand-in and the reply endpoint in this process, `replyclock web` and the `run`
processes as subprocesses, sends the schedule, waits until every conversation is answered and
every outbox row settled, stops the processes and returns what `analysis.analyse` found.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError

from bot.demo.standin import DEFAULT_TOKEN, Call, SlackStandIn, SlackUser
from storage.db import make_engine
from storage.models import PENDING, SENDING, Conversation, Outbox
from tests.storm.analysis import Report, analyse
from tests.storm.cluster import Cluster, machine_cpu, process_cpu_seconds
from tests.storm.loader import Outcome, run_load
from tests.storm.scenario import (
    ACCOUNT,
    CHANNELS,
    EXPERTS,
    SECRET_ENV,
    Schedule,
    StormConfig,
    build_schedule,
    write_policy,
)
from tests.storm.servers import Reply, ReplyRecorder

SECRET = "storm-webhook-secret-value-0123456789-0123456789"
LEAD_IN = 1.0  # seconds between building the schedule and its first delivery
POLL = 0.5
ANALYZE_EVERY = 30.0  # seconds: what autovacuum would do for tables growing this fast
ANALYZED_TABLES = ("outbox", "conversations", "events", "posts")


@dataclass
class StormRun:
    config: StormConfig
    schedule: Schedule
    outcomes: list[Outcome]
    calls: list[Call]
    replies: list[Reply]
    report: Report
    started: datetime
    load_seconds: float  # first delivery due -> load generator done
    settle_seconds: float  # load generator done -> all settled
    exit_codes: dict[str, int]
    standin_errors: list[str]
    # CPU seconds from the first delivery to the end: each process, "postgres", "harness"
    cpu: dict[str, float]
    machine_busy: float | None  # share of the machine's CPU time busy over the same span (0..1)
    autovacuum: bool  # the server's own autovacuum is on
    analyzed: int  # ANALYZE rounds the harness ran in its place (when it is off)
    rate_limits: bool  # the Slack stand-in enforced Slack's published limits (and the processes paced)
    settled: bool  # everything answered and sent before the settle timeout
    peak_rss: dict[str, float]  # MB, per process, measured just before the stop


class StatisticsKeeper:
    """ANALYZE the storm's tables every ANALYZE_EVERY seconds when the server's autovacuum is off.

    A PostgreSQL with autovacuum (the default) re-analyzes a table once a tenth of it changed;
    some CI servers turn it off. Without fresh statistics the planner goes on believing the
    outbox holds a few rows, and plans that are right for a few rows are wrong for 80,000.
    """

    def __init__(self, database_url: str) -> None:
        self.engine = make_engine(database_url)
        with self.engine.connect() as db:
            self.autovacuum = str(db.scalar(text("SHOW autovacuum"))) == "on"
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storm-analyze", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(ANALYZE_EVERY):
            try:
                with self.engine.connect() as db:
                    db.execute(text(f"ANALYZE {', '.join(ANALYZED_TABLES)}"))
                    db.commit()
                self.rounds += 1
            except OperationalError:
                continue

    def start(self) -> None:
        if not self.autovacuum:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        self.engine.dispose()


def _outstanding(engine: Engine) -> tuple[int, int]:
    """(conversations not answered, outbox rows pending or sending)."""
    with engine.connect() as db:
        unanswered = db.scalar(
            select(func.count()).select_from(Conversation).where(Conversation.status != "answered")
        )
        unsent = db.scalar(
            select(func.count()).select_from(Outbox).where(Outbox.status.in_((PENDING, SENDING)))
        )
    return int(unanswered or 0), int(unsent or 0)


def postgres_cpu() -> float:
    """CPU seconds used so far by every process called postgres on this machine (Linux /proc)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        seconds = process_cpu_seconds(int(stat.parent.name))
        total += seconds or 0.0
    return total


def _cpu_snapshot(cluster: Cluster) -> dict[str, float]:
    found = cluster.cpu()
    found["postgres"] = postgres_cpu()
    found["harness"] = sum(os.times()[:2])
    return found


def run_storm(
    config: StormConfig,
    database_url: str,
    workdir: Path,
    *,
    settle_timeout: float = 120.0,
    extra_env: Mapping[str, str] | None = None,
    rate_limits: bool | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> StormRun:
    """Run one storm on `database_url` (empty); logs and the policy file go to `workdir`.

    `rate_limits`: the Slack stand-in enforces Slack's published limits, and the processes pace
    themselves (SLACK_PACING); None: as REPLYCLOCK_STANDIN_RATE_LIMITS says.
    """
    users = [SlackUser(slack_id, name) for name, slack_id in EXPERTS.values()]
    channels = {channel: team for team, channel in CHANNELS.items()}
    with (
        SlackStandIn(channels=channels, users=users, rate_limits=rate_limits) as slack,
        ReplyRecorder(SECRET) as recorder,
    ):
        policy = write_policy(config, recorder.url, workdir / "storm.toml")
        cluster = Cluster(
            workdir=workdir,
            database_url=database_url,
            policy_path=policy,
            secrets={SECRET_ENV: SECRET},
            slack_api_url=slack.base_url,
            slack_token=DEFAULT_TOKEN,
            runs=config.run_processes,
            outbox_interval=config.outbox_interval,
            sweep_max_interval=config.sweep_max_interval,
            slack_pacing="true" if slack.rate_limits else "false",
            extra_env=dict(extra_env or {}),
        )
        statistics = StatisticsKeeper(database_url)
        try:
            cluster.start()
            statistics.start()
            progress(f"web and {config.run_processes} run processes up")
            started = datetime.now(UTC) + timedelta(seconds=LEAD_IN)
            schedule = build_schedule(config, started)
            cpu_before = _cpu_snapshot(cluster)
            machine_before = machine_cpu()
            progress(
                f"{len(schedule.deliveries):,} deliveries ({len(schedule.customer_posts):,} posts, "
                f"{len(schedule.answers):,} answers) over {schedule.last_at:.0f} s, "
                f"{config.concurrency} at a time"
            )
            outcomes = run_load(
                cluster.base_url,
                ACCOUNT,
                SECRET,
                schedule.deliveries,
                start=started.timestamp(),
                concurrency=config.concurrency,
            )
            loaded = time.time()
            load_seconds = loaded - started.timestamp()
            progress(f"load sent in {load_seconds:.1f} s; waiting for the ladder to settle")
            deadline = time.monotonic() + settle_timeout
            settled = False
            last_note = 0.0
            watcher = make_engine(database_url)
            while True:
                try:
                    unanswered, unsent = _outstanding(watcher)
                except OperationalError:  # the database restarting (the machine is shared): look again
                    time.sleep(POLL)
                    continue
                if unanswered == 0 and unsent == 0:
                    settled = True
                    break
                if cluster.exited():
                    raise RuntimeError(f"processes exited during the storm: {cluster.exited()}")
                if time.monotonic() > deadline:
                    progress(f"gave up waiting: {unanswered} unanswered, {unsent} unsent")
                    break
                if time.monotonic() - last_note > 10:
                    progress(f"  {unanswered:,} conversations unanswered, {unsent:,} outbox rows unsent")
                    last_note = time.monotonic()
                time.sleep(POLL)
            settle_seconds = time.time() - loaded
            watcher.dispose()
            cpu_after = _cpu_snapshot(cluster)
            machine_after = machine_cpu()
            peak_rss = cluster.peak_rss()
        finally:
            statistics.stop()
            exit_codes = cluster.stop()
        calls = slack.calls
        replies = list(recorder.replies)
        standin_errors = list(slack.internal_errors)
    engine = make_engine(database_url)
    try:
        report = analyse(engine, schedule, outcomes, calls, replies, cluster.logs(), config)
    finally:
        engine.dispose()
    bad_exits = {name: code for name, code in exit_codes.items() if code not in (0, -15)}
    if bad_exits:
        report.problem(f"processes did not stop cleanly: {bad_exits}")
    if standin_errors:
        report.problem(f"{len(standin_errors)} internal errors in the Slack stand-in")
    if recorder.refused:
        report.problem(f"{recorder.refused} replies with a bad signature")
    return StormRun(
        config=config,
        schedule=schedule,
        outcomes=outcomes,
        calls=calls,
        replies=replies,
        report=report,
        started=started,
        load_seconds=load_seconds,
        settle_seconds=settle_seconds,
        exit_codes=exit_codes,
        standin_errors=standin_errors,
        autovacuum=statistics.autovacuum,
        analyzed=statistics.rounds,
        rate_limits=slack.rate_limits,
        settled=settled,
        peak_rss=peak_rss,
        cpu={name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after},
        machine_busy=(
            (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
            if machine_before is not None
            and machine_after is not None
            and machine_after[1] > machine_before[1]
            else None
        ),
    )
