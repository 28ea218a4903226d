"""How long the sweep takes to claim and process 1,000 due conversations, by size of the open backlog.

The sweep (`bot.flow.sweep.sweep`) asks the database for the conversations whose ``next_action_at``
has come. The partial index ``ix_conversations_next_action_at`` should make that cost depend on
the number *due*, not on the number *open*; this benchmark checks it. For every database it

1. creates one fresh, migrated database per size N: an SQLite file in a temporary directory
   under /tmp (deleted afterwards), or a schema ``bench_<N>`` in the PostgreSQL database
   ``replyclock_bench`` (the database is created if missing, the schema dropped and recreated,
   and dropped again at the end; the tests' database is never touched);
2. seeds one account and N open conversations under the "urgent" and "classic" policies of
   tests/data/policy.toml (SQLAlchemy Core executemany on SQLite, COPY on PostgreSQL):
   N - 1,000 not due, in the state a sweep at "now" leaves them (fresh ones waiting for a
   warning or their deadline, older breached ones waiting for their next nag), and 1,000 due,
   spread evenly over the table, whose deadline passed 1 to 150 minutes ago (so the sweep
   writes breach, escalation and nag outbox rows and events); then runs ANALYZE (SQLite, plus
   a WAL checkpoint) or VACUUM (ANALYZE) and CHECKPOINT (PostgreSQL), so no background work
   from the bulk load lands in the measurements;
3. times ``sweep(ctx)`` with a FakeClock at "now" claiming and processing the 1,000 due
   conversations, round after round; before each later round another 1,000 not-due
   conversations, again spread over the table, are made due by an UPDATE outside the timed
   region. The sizes take turns round by round (in ABBA order), so load from other processes
   on the machine falls on all sizes alike. On SQLite, the write-ahead log is checkpointed
   outside the timed region as ``replyclock run`` does in its idle time (bot.jobs,
   ``checkpoint_wal``): once after that UPDATE, so the sweep starts from an empty log, and once
   after the sweep, timed on its own and printed with the size of the log the sweep left (the
   cost moved out of the sweep, not hidden). SQLite's automatic checkpoint stays at its
   backstop (storage.db): if a sweep filled the log that far, it would be paid in the sweep;
4. prints per database and size the median wall time, the rate, every round, the Python
   process's CPU time (on SQLite nearly all the work; a wall time far above it means the
   machine was busy) and how long ``earliest_next_action`` takes (best of 50 calls, session
   included); then the ratio of the largest size's median to the smallest's (the goal: at
   most 1.5; above it a WARNING line is printed, the exit status stays 0), and the query
   plans of the claim query and of ``earliest_next_action`` exactly as the sweep sends them
   (a WARNING if either does not use the partial index).

Run it from the project root (the full run, 10k and 1M on both databases, takes 2 to 4 minutes)::

    .venv/bin/python -m bench.sweep
    .venv/bin/python -m bench.sweep --quick                 # 10k and 100k, a fast check
    .venv/bin/python -m bench.sweep --databases sqlite --sizes 10000,200000 --rounds 3
    .venv/bin/python -m bench.sweep --databases sqlite --profile 25  # and cProfile one more sweep
    .venv/bin/python -m bench.sweep --databases sqlite --reuse /tmp/replyclock-sweep-seeds

``--reuse DIR`` keeps each seeded SQLite file in DIR (about 0.6 GB at 1M open) and copies it in
place of seeding on later runs (the 1M seed takes one to two minutes); a file is reused only by
the same seeding code, policy file and migrations.

PostgreSQL is used when reachable at ``--postgres-url`` (default: the environment variable
REPLYCLOCK_BENCH_DATABASE_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench;
the database name must contain "bench") and reported as skipped otherwise. Progress goes to
stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import inspect
import io
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import psycopg
from sqlalchemy import Engine, Table, bindparam, event, func, insert, select, update
from sqlalchemy.engine import make_url

from bench.common import bulk_insert, cpu_model, postgres_schema, prepare_postgres, sqlite_file
from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.core.ladder import LadderState, plan
from bot.core.policy import Policy, SlaPolicy
from bot.flow.context import AppContext
from bot.flow.conversations import deadline_for
from bot.flow.sweep import earliest_next_action, sweep
from storage.db import checkpoint, make_engine, wal_bytes
from storage.migrate import upgrade
from storage.models import OPEN, Account, Conversation, Outbox

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POLICY_FILE = PROJECT_ROOT / "tests" / "data" / "policy.toml"
POSTGRES_URL_ENV = "REPLYCLOCK_BENCH_DATABASE_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_bench"
INDEX_NAME = "ix_conversations_next_action_at"

DUE = 1_000
RATIO_LIMIT = 1.5
CHUNK = 20_000
# Wednesday 25 November 2026, 14:00 UTC (15:00 in Berlin, 09:00 in New York). It and the day
# before are working days, so the "classic" deadlines of the due conversations are plain 24 hours.
NOW = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
TEAMS: dict[str, tuple[str, ...]] = {"care": ("sam", "nina"), "billing": ("maria", "lee")}

CONVERSATIONS = cast(Table, Conversation.__table__)
ACCOUNTS = cast(Table, Account.__table__)
OUTBOX = cast(Table, Outbox.__table__)
COLUMNS: tuple[str, ...] = tuple(column.name for column in CONVERSATIONS.columns)

Row = dict[str, Any]


# --- seeding ---------------------------------------------------------------------------------


@dataclass
class Seeder:
    """Builds conversation rows whose ladder state is what the sweep itself would have left."""

    ctx: AppContext
    account_id: int
    size: int
    _states: dict[tuple[str, str, datetime, bool], Row] = field(default_factory=dict)

    @property
    def stride(self) -> int:
        return self.size // DUE

    def due_in_round(self, index: int) -> int | None:
        """The round in which row `index` is made due, None if never."""
        round_, position = index % self.stride, index // self.stride
        return round_ if position < DUE else None

    def indexes_due_in(self, round_: int) -> list[int]:
        return list(range(round_, self.size, self.stride))[:DUE]

    def _sla(self, name: str) -> SlaPolicy:
        return next(sla for sla in self.ctx.policy.policies if sla.name == name)

    def _ladder(self, policy: str, team: str, start: datetime, due: bool) -> Row:
        """Deadline and ladder columns of a conversation opened at `start` (cached: starts are whole minutes).

        Not due: the state a sweep at NOW leaves (next_action_at after NOW). Due: the state a
        sweep a minute before the deadline left (warnings sent, next_action_at = the deadline).
        """
        key = (policy, team, start, due)
        found = self._states.get(key)
        if found is not None:
            return found
        sla = self._sla(policy)
        deadline = deadline_for(self.ctx, sla, team, start, "first")
        at = deadline.due_at - timedelta(minutes=1) if due else NOW
        decided = plan(
            policy=sla,
            due_at=deadline.due_at,
            warn_at=deadline.warn_at,
            state=LadderState(),
            now=at,
            owner_on_duty=lambda _at: True,
            owner_next_on_duty=lambda at_: at_,
        )
        next_action_at = decided.next_action_at
        if next_action_at is None or (next_action_at <= NOW) != due:
            raise AssertionError(f"seed row {policy}/{start} is not {'due' if due else 'pending'}")
        breached = decided.state.breached
        found = {
            "clock_started_at": deadline.clock_started_at,
            "due_at": deadline.due_at,
            "first_due_at": deadline.due_at,  # cycle 0: the first deadline is the current one
            "breached_at": deadline.due_at if breached else None,
            "breach_cycle": 0 if breached else None,
            "warnings_sent": decided.state.warnings_sent,
            "nag_level": decided.state.nag_level,
            "escalation_step": decided.state.escalation_step,
            "next_action_at": next_action_at,
        }
        self._states[key] = found
        return found

    def row(self, index: int, rng: random.Random, *, due: bool) -> Row:
        """Conversation `index` (its id is index + 1), due now or not."""
        pick = rng.random()
        if due:
            # Deadline 1-25 min (urgent) or 1-150 min (classic) ago: breach, maybe escalation and nag.
            if pick < 0.5:
                policy, team, priority = "urgent", "care", "urgent"
                start = NOW - timedelta(hours=1, minutes=rng.randint(1, 25))
            else:
                policy, team, priority = "classic", rng.choice(("care", "billing")), "normal"
                start = NOW - timedelta(hours=24, minutes=rng.randint(1, 150))
        elif pick < 0.25:  # urgent, warning within the next 45 minutes
            policy, team, priority = "urgent", "care", "urgent"
            start = NOW - timedelta(minutes=rng.randrange(45))
        elif pick < 0.7:  # classic, opened within the last 23 hours
            policy, team, priority = "classic", rng.choice(("care", "billing")), "normal"
            start = NOW - timedelta(minutes=rng.randrange(23 * 60))
        else:  # classic, breached 2 hours to 9 days ago, waiting for its next nag
            policy, team, priority = "classic", rng.choice(("care", "billing")), "normal"
            start = NOW - timedelta(minutes=rng.randrange(26 * 60, 10 * 24 * 60))
        owner = rng.choice(TEAMS[team]) if rng.random() < 0.8 else None
        return {
            "id": index + 1,
            "account_id": self.account_id,
            "thread_key": f"thread-{index}",
            "author_id": f"author-{index}",
            "author_name": None,
            "author_handle": f"@author{index}",
            "status": OPEN,
            "team": team,
            "priority": priority,
            "policy": policy,
            "route_rule": None,
            "owner": owner,
            "assigned_at": start if owner else None,
            "claimed_by": None,
            "claimed_at": None,
            "opened_at": start,
            "cycle": 0,
            "cycle_started_at": start,
            "last_customer_post_at": start,
            "first_response_at": None,
            "answered_at": None,
            "answered_by": None,
            "closed_at": None,
            "close_reason": None,
            "acknowledged_at": start,
            "reassignments": 0,
            "slack_channel": f"#{team}",
            "slack_ts": f"{1_700_000_000 + index}.000100",
            "version": 1,
            "resolution_due_at": None,
            "resolution_warnings_sent": 0,
            "resolution_breach_sent": False,
            "waiting_since": None,
            **self._ladder(policy, team, start, due),
        }

    def initial_rows(self) -> Iterator[Row]:
        rng = random.Random(20261125)
        for index in range(self.size):
            yield self.row(index, rng, due=self.due_in_round(index) == 0)


def seed(ctx: AppContext, size: int) -> Seeder:
    """One account and `size` open conversations, DUE of them due now (bench.common.bulk_insert:
    COPY on PostgreSQL, executemany on SQLite)."""
    engine = ctx.engine
    with engine.begin() as conn:
        inserted = conn.execute(insert(ACCOUNTS).values(name="social", kind="demo")).inserted_primary_key
    if inserted is None:
        raise RuntimeError("no account id")
    seeder = Seeder(ctx, int(inserted[0]), size)
    bulk_insert(engine, CONVERSATIONS, seeder.initial_rows(), chunk=CHUNK)
    return seeder


def make_due(seeder: Seeder, round_: int) -> None:
    """Turn the (still pending) conversations of `round_` into due ones: one UPDATE, untimed."""
    rng = random.Random(round_)
    rows = [seeder.row(index, rng, due=True) for index in seeder.indexes_due_in(round_)]
    statement = (
        update(CONVERSATIONS)
        .where(CONVERSATIONS.c.id == bindparam("b_id", type_=CONVERSATIONS.c.id.type))
        .values(
            {
                name: bindparam(f"b_{name}", type_=CONVERSATIONS.c[name].type)
                for name in COLUMNS
                if name != "id"
            }
        )
    )
    with seeder.ctx.engine.begin() as conn:
        conn.execute(statement, [{f"b_{name}": value for name, value in row.items()} for row in rows])


# --- databases -------------------------------------------------------------------------------


def settle(engine: Engine) -> None:
    """After the bulk load: fresh statistics, and nothing left for background work to do mid-measurement."""
    raw = engine.raw_connection()
    try:
        connection: Any = raw.driver_connection
        if engine.dialect.name == "sqlite":  # the driver connection is in autocommit mode (storage.db)
            connection.execute("ANALYZE")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            connection.autocommit = True  # VACUUM cannot run in a transaction
            try:
                connection.execute("VACUUM (ANALYZE)")  # and autovacuum has nothing left to do
                connection.execute("CHECKPOINT")
            finally:
                connection.autocommit = False  # the connection goes back to the pool
    finally:
        raw.close()


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Target:
    """One seeded database of one size, and what was measured on it."""

    database: str
    size: int
    ctx: AppContext
    seeder: Seeder
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    steps: dict[str, int] = field(default_factory=dict)
    probe_ms: float = 0.0
    # SQLite: pages the sweep left in the write-ahead log, its file size then, and the idle checkpoint after.
    wal_frames: list[int] = field(default_factory=list)
    wal_bytes: list[int] = field(default_factory=list)
    checkpoint_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def engine(self) -> Engine:
        return self.ctx.engine


def seed_key(size: int) -> str:
    """The name of a reusable seeded SQLite file: what seeded it (code, policy, migrations) and its size."""
    digest = hashlib.sha256()
    for part in (Seeder, seed, bulk_insert, settle, deadline_for, plan):
        digest.update(inspect.getsource(part).encode())
    digest.update(POLICY_FILE.read_bytes())
    for migration in sorted((PROJECT_ROOT / "alembic" / "versions").glob("*.py")):
        digest.update(migration.read_bytes())
    return f"sweep-{size}-{digest.hexdigest()[:16]}.db"


def open_target(
    database: str, size: int, policy: Policy, postgres_url: str, stack: ExitStack, reuse: Path | None = None
) -> Target:
    """A migrated database of `size` open conversations, DUE of them due."""
    if database == "sqlite":
        url = sqlite_file(stack)
    else:
        url = postgres_schema(postgres_url, f"bench_{size}", stack)
    kept = reuse / seed_key(size) if reuse is not None and database == "sqlite" else None
    started = time.perf_counter()
    if kept is not None and kept.exists():
        shutil.copyfile(kept, str(make_url(url).database))
    engine = make_engine(url)
    stack.callback(engine.dispose)
    upgrade(engine)
    ctx = AppContext(policy=policy, engine=engine, clock=FakeClock(NOW))
    for expert in policy.experts:  # warm the calendar caches, as in a running process
        ctx.expert_calendar(expert)
    if kept is not None and kept.exists():
        with engine.connect() as conn:
            account_id = conn.scalar(select(ACCOUNTS.c.id))
        seeder = Seeder(ctx, int(account_id or 0), size)
        progress(f"{database} {size:,}: copied from {kept} in {time.perf_counter() - started:.1f} s")
        return Target(database, size, ctx, seeder)
    seeder = seed(ctx, size)
    settle(engine)
    progress(f"{database} {size:,}: seeded and analysed in {time.perf_counter() - started:.1f} s")
    if kept is not None:  # settle() left an empty log: the file alone is the database
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_suffix(".partial")
        shutil.copyfile(str(make_url(url).database), partial)
        partial.rename(kept)
    return Target(database, size, ctx, seeder)


def run_round(target: Target, round_: int) -> None:
    """Make this round's conversations due (untimed, except in round 0 where seeding did), then time one sweep."""
    if round_:
        make_due(target.seeder, round_)
        # The UPDATE's pages: the sweep starts from an empty log, as after idle time.
        checkpoint(target.engine)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = sweep(target.ctx)
    target.seconds.append(time.perf_counter() - started)
    target.cpu_seconds.append(time.process_time() - cpu_started)
    if target.database == "sqlite":  # what replyclock run's idle checkpoint (bot.jobs) does next
        target.wal_bytes.append(wal_bytes(target.engine))
        started = time.perf_counter()
        done = checkpoint(target.engine)
        target.checkpoint_seconds.append(time.perf_counter() - started)
        target.wal_frames.append(done.log_frames if done is not None else 0)
    if result.processed != DUE or result.failed:
        raise RuntimeError(
            f"{target.database} round {round_}: processed {result.processed}, failed {result.failed}"
        )
    for kind, count in result.steps.items():
        target.steps[kind] = target.steps.get(kind, 0) + count
    progress(
        f"{target.database} {target.size:,}: round {round_ + 1}: {target.seconds[-1]:.3f} s {result.steps}"
    )


def check_and_probe(target: Target, rounds: int) -> None:
    """Every round wrote its breaches; time earliest_next_action (the scheduler's wake-up probe)."""
    with target.engine.connect() as conn:
        breaches = conn.scalar(select(func.count()).select_from(OUTBOX).where(OUTBOX.c.kind == "breach"))
    if breaches != rounds * DUE:
        raise RuntimeError(f"{target.database}: expected {rounds * DUE} breach outbox rows, found {breaches}")
    probes = []
    for _ in range(50):
        started = time.perf_counter()
        earliest_next_action(target.ctx)
        probes.append(time.perf_counter() - started)
    target.probe_ms = min(probes) * 1000


@dataclass
class Captured:
    statement: str
    parameters: Any


def capture(engine: Engine, action: Callable[[], object], wanted: Callable[[str], bool]) -> Captured:
    """The first statement matching `wanted` that `action` sends, with its driver parameters."""
    found: list[Captured] = []

    def listener(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        if not found and wanted(statement):
            found.append(Captured(statement, parameters))

    event.listen(engine, "before_cursor_execute", listener)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    if not found:
        raise RuntimeError("statement not captured")
    return found[0]


def explain(engine: Engine, captured: Captured) -> list[str]:
    """The database's plan for a captured statement, with the parameters it was sent with."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + captured.statement, captured.parameters)
            depth: dict[int, int] = {0: -1}
            lines = []
            for node, parent, _unused, detail in rows:
                depth[node] = depth.get(parent, -1) + 1
                lines.append("  " * depth[node] + str(detail))
            return lines
        rows = conn.exec_driver_sql("EXPLAIN " + captured.statement, captured.parameters)
        return [str(line) for (line,) in rows]


def one_line(statement: str) -> str:
    return " ".join(statement.split())


def short_sql(statement: str) -> str:
    """One line, a long SELECT list abbreviated to its column count."""
    flat = one_line(statement)
    head, found, tail = flat.partition(" FROM ")
    if found and head.startswith("SELECT ") and head.count(",") > 3:
        return f"SELECT <{head.count(',') + 1} columns of conversations> FROM {tail}"
    return flat


@dataclass
class Plans:
    database: str
    size: int
    claim_sql: str
    claim_plan: list[str]
    probe_sql: str
    probe_plan: list[str]


def plans_of(target: Target) -> Plans:
    """The claim query and earliest_next_action exactly as the sweep sends them, and their plans."""
    claim = capture(
        target.engine, lambda: sweep(target.ctx), lambda s: "FROM conversations" in s and "LIMIT" in s
    )
    probe = capture(target.engine, lambda: earliest_next_action(target.ctx), lambda s: "IS NOT NULL" in s)
    return Plans(
        target.database,
        target.size,
        short_sql(claim.statement),
        explain(target.engine, claim),
        short_sql(probe.statement),
        explain(target.engine, probe),
    )


def run_database(
    database: str,
    sizes: Sequence[int],
    rounds: int,
    policy: Policy,
    postgres_url: str,
    profile: int = 0,
    reuse: Path | None = None,
) -> tuple[list[Target], Plans]:
    """Seed every size, then time the rounds interleaved (ABBA order), so load from elsewhere hits all sizes alike."""
    with ExitStack() as stack:
        targets = [open_target(database, size, policy, postgres_url, stack, reuse) for size in sizes]
        for round_ in range(rounds):
            for target in targets if round_ % 2 == 0 else reversed(targets):
                run_round(target, round_)
        for target in targets:
            check_and_probe(target, rounds)
        if profile:
            for target in targets:
                profile_round(target, rounds, profile)
        return targets, plans_of(targets[-1])


def profile_round(target: Target, round_: int, lines: int) -> None:
    """One more round under cProfile (untimed, not in the table): the top `lines` functions by own and
    by cumulative time."""
    make_due(target.seeder, round_)
    checkpoint(target.engine)
    profiler = cProfile.Profile(time.process_time)  # CPU time: the machine may be shared
    profiler.enable()
    result = sweep(target.ctx)
    profiler.disable()
    if result.processed != DUE or result.failed:
        raise RuntimeError(f"profiled round: processed {result.processed}, failed {result.failed}")
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.strip_dirs().sort_stats(order).print_stats(lines)
        print(f"cProfile of sweep(), {target.database}, {target.size:,} open, {DUE:,} due, by {order}:")
        body = out.getvalue().strip().splitlines()
        print("\n".join(line for line in body if line.strip()))
        print()


# --- report ----------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def print_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table: the first column left-aligned, the others right-aligned, two spaces between."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for line in (header, *rows):
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


def print_table(targets: Sequence[Target]) -> None:
    header = (
        "database",
        "open",
        "due",
        "seconds (median)",
        "conversations/s",
        "each round (s)",
        "client cpu (s)",
        "next-wake probe (ms, best of 50)",
    )
    rows = [
        (
            t.database,
            f"{t.size:,}",
            f"{DUE:,}",
            f"{t.median:.3f}",
            f"{DUE / t.median:,.0f}",
            " ".join(f"{s:.3f}" for s in t.seconds),
            f"{statistics.median(t.cpu_seconds):.3f}",
            f"{t.probe_ms:.2f}",
        )
        for t in targets
    ]
    print_columns(header, rows)


def print_wal(targets: Sequence[Target]) -> None:
    """SQLite: what each sweep left in the write-ahead log, and the idle checkpoint that copied it back."""
    header = (
        "database",
        "open",
        "log pages after a sweep (median, max)",
        "log file (MB, max)",
        "idle checkpoint after it (ms, median, max)",
    )
    rows = [
        (
            t.database,
            f"{t.size:,}",
            f"{statistics.median(t.wal_frames):,.0f} {max(t.wal_frames):,}",
            f"{max(t.wal_bytes) / 2**20:.1f}",
            f"{statistics.median(t.checkpoint_seconds) * 1000:.0f} {max(t.checkpoint_seconds) * 1000:.0f}",
        )
        for t in targets
        if t.wal_frames
    ]
    if not rows:
        return
    print()
    print("write-ahead log (checkpointed outside the timed sweep, as replyclock run does when idle):")
    print_columns(header, rows)


def print_plans(plans: Plans) -> list[str]:
    """Print both plans; warnings for a plan that does not use the partial index."""
    verb = "EXPLAIN QUERY PLAN" if plans.database == "sqlite" else "EXPLAIN"
    warnings = []
    for name, statement, lines in (
        ("claim query", plans.claim_sql, plans.claim_plan),
        ("earliest_next_action", plans.probe_sql, plans.probe_plan),
    ):
        print(f"{plans.database}, {plans.size:,} open, {name}:")
        print(f"  {statement}")
        print(f"  {verb}:")
        print("\n".join(f"    {line}" for line in lines))
        if not any(INDEX_NAME in line for line in lines):
            warnings.append(f"WARNING: {plans.database} {name} does not use {INDEX_NAME}")
    return warnings


def parse_sizes(value: str) -> list[int]:
    sizes = sorted({int(part.replace("_", "")) for part in value.split(",") if part.strip()})
    if len(sizes) < 2 or sizes[0] < DUE:
        raise argparse.ArgumentTypeError(f"give at least two sizes, each at least {DUE}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sweep", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--sizes", type=parse_sizes, default=[10_000, 1_000_000], help="open conversations, comma separated"
    )
    parser.add_argument(
        "--databases", default="sqlite,postgres", help="sqlite and/or postgres, comma separated"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed sweeps per size (the median is reported)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="LINES",
        help="after the timed rounds, profile one more sweep of each size; print LINES lines",
    )
    parser.add_argument("--quick", action="store_true", help="10,000 and 100,000 open only: a fast check")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        metavar="DIR",
        help="SQLite: keep seeded files in DIR and copy them instead of seeding again",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL,
        help=f"the bench database (its name must contain 'bench'); default ${POSTGRES_URL_ENV} or %(default)s",
    )
    args = parser.parse_args(argv)
    sizes: list[int] = [10_000, 100_000] if args.quick else args.sizes
    databases = list(dict.fromkeys(name.strip() for name in args.databases.split(",") if name.strip()))
    unknown = set(databases) - {"sqlite", "postgres"}
    if unknown:
        parser.error(f"unknown databases: {', '.join(sorted(unknown))}")
    if not 1 <= args.rounds + (1 if args.profile else 0) <= sizes[0] // DUE:
        parser.error(f"--rounds must be between 1 and {sizes[0] // DUE} with {sizes[0]:,} open conversations")

    started = time.perf_counter()
    policy_text = POLICY_FILE.read_text()
    policy = parse_policy(tomllib.loads(policy_text), source=str(POLICY_FILE), text=policy_text)
    postgres_version = "not used"
    skipped: list[str] = []
    if "postgres" in databases:
        try:
            postgres_version = prepare_postgres(args.postgres_url)
        except psycopg.Error as error:
            postgres_version = "unreachable"
            skipped.append(f"postgres: skipped, not reachable ({one_line(str(error))})")
            databases.remove("postgres")

    targets: list[Target] = []
    plans: list[Plans] = []
    for database in databases:
        found, plan = run_database(
            database, sizes, args.rounds, policy, args.postgres_url, args.profile, args.reuse
        )
        targets.extend(found)
        plans.append(plan)

    print(f"replyclock sweep benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
        f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}; PostgreSQL {postgres_version}"
    )
    print(
        f"each row: one sweep(ctx) claiming and processing {DUE:,} due conversations (batches of 200) "
        f"among the open ones; median of {args.rounds} rounds, sizes interleaved"
    )
    print()
    print_table(targets)
    for line in skipped:
        print(line)
    print_wal(targets)
    print()
    warnings: list[str] = []
    for database in databases:
        by_size = {t.size: t for t in targets if t.database == database}
        ratio = by_size[sizes[-1]].median / by_size[sizes[0]].median
        print(f"ratio {database} {sizes[-1]:,} / {sizes[0]:,} open: {ratio:.2f} (limit {RATIO_LIMIT})")
        if ratio > RATIO_LIMIT:
            warnings.append(f"WARNING: {database} ratio {ratio:.2f} exceeds {RATIO_LIMIT}")
    if targets:
        steps = ", ".join(f"{kind} {count:,}" for kind, count in sorted(targets[0].steps.items()))
        print(f"outbox rows written per size over the {args.rounds} rounds: {steps}")
    for plan in plans:
        print()
        warnings.extend(print_plans(plan))
    if warnings:
        print()
        print("\n".join(warnings))
    print()
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
