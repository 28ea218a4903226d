"""A storm of 10,000 customer posts on four `replyclock run` processes: throughput, spread, lateness.

The long version of tests/test_storm.py, with the same harness (tests/storm/): a real `replyclock
web` process receives signed webhook deliveries from a load generator with a fixed number of
requests in flight (10,000 posts over 150 seconds by default, some delivered twice at the same
moment, every tenth a follow-up by an author who wrote seconds before); four real `replyclock
run` processes share one PostgreSQL and do the cards (to the Slack stand-in), the
acknowledgements (to a loopback endpoint, the webhook account's `reply_url`) and the ladder.
The policy's targets are real seconds: first response 60 s, a warning at half of it, the breach
at the deadline, an escalation to the team channel 15 s later and a nag to the owner every 20 s,
until our staff's answer arrives through the webhook 85 s after each first post. So about 9,000
deadlines fall due over three and a half minutes while posts keep coming, each with four steps
(warning at 30 s, breach at 60 s, escalation at 75 s, nag at 80 s): some 36,000 ladder steps.

It prints:

* throughput: webhook deliveries accepted per second, cards per second, acknowledgements;
* the spread of the work over the four processes (from their own JSON log lines: "sweep" lines
  with the conversations processed, "outbox" lines with the messages sent, cards posted);
* nag lateness: for every ladder step (warning, breach, escalation, nag), the seconds between
  its scheduled time and its Slack call (the stand-in's record of the chat.postMessage whose
  channel and ts the outbox row stored), p50/p99/max, per kind, split into the sweep's part and
  the sender's part, and over time; the aim is a p99 under 2 seconds;
* the CPU time each process used, and every check of the test (nothing twice, nothing lost).

Run it from the project root (PostgreSQL must be reachable; about 6 minutes)::

    .venv/bin/python -m bench.storm
    .venv/bin/python -m bench.storm --posts 3000 --seconds 60       # a shorter storm
    .venv/bin/python -m bench.storm --sweep-max-interval 1            # override the product's timing

The database is --database-url (default: $REPLYCLOCK_STORM_DATABASE_URL, else
postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_storm); its name must contain "storm"
or "bench" because its public schema is dropped and recreated. It is created when missing.
Logs and the policy file go to a temporary directory (kept with --keep). Progress goes to
stderr, the report to stdout; the exit status is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

from bench.common import cpu_model, prepare_postgres
from storage.db import make_engine
from tests.storm.analysis import OWED_MARGIN, Spread, timeline
from tests.storm.scenario import LADDER_KINDS, StormConfig
from tests.storm.storm import StormRun, run_storm

DATABASE_URL_ENV = "REPLYCLOCK_STORM_DATABASE_URL"
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/replyclock_storm"
AIM_P99 = 2.0


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def prepare_database(url: str) -> str:
    """Create the database if missing and empty its public schema; returns the server version."""
    version = prepare_postgres(url, name_must_contain=("storm", "bench"))
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()
    return version


def _spread_row(label: str, spread: Spread | None) -> str:
    if spread is None or spread.count == 0:
        return f"  {label:<22} {'-':>8}"
    return f"  {label:<22} {spread.count:>8,} {spread.p50:>9.3f} {spread.p99:>9.3f} {spread.max:>9.3f}"


def print_report(run: StormRun, postgres_version: str) -> None:
    report, config = run.report, run.config
    started = run.started
    print(
        f"replyclock storm, {started:%Y-%m-%d %H:%M} UTC: {config.posts:,} posts over {config.seconds:.0f} s "
        f"({config.rate:.0f}/s), {config.concurrency} requests in flight, {config.run_processes} run processes"
    )
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"PostgreSQL {postgres_version}; "
        + (
            f"machine CPU busy {run.machine_busy:.0%} during the storm"
            if run.machine_busy is not None
            else ""
        )
    )
    print(
        f"policy: first response {config.first_response:.0f} s, warning at {config.warn_at:.0%}, "
        f"escalation +{config.escalation_after:.0f} s, nag every {config.nag_every:.0f} s, "
        f"answered {config.answer_after:.0f} s after the first post; "
        f"OUTBOX_INTERVAL {config.outbox_interval if config.outbox_interval is not None else 'default (2)'}, "
        f"SWEEP_MAX_INTERVAL {config.sweep_max_interval if config.sweep_max_interval is not None else 'default (60)'}"
    )
    if not run.autovacuum:
        print(
            f"PostgreSQL's autovacuum is off on this server: the harness ran ANALYZE on the storm's "
            f"tables every 30 s in its place ({run.analyzed} times)"
        )
    print()
    print("throughput")
    accepted_rate = report.webhook_accepted / report.webhook_seconds if report.webhook_seconds else 0.0
    cards = report.counts.get("cards posted", 0)
    card_rate = cards / report.card_seconds if report.card_seconds else 0.0
    print(
        f"  webhook: {report.webhook_accepted:,} deliveries accepted in {report.webhook_seconds:.1f} s "
        f"= {accepted_rate:.1f}/s (schedule: {len(run.schedule.deliveries) / max(run.schedule.last_at, 1e-9):.1f}/s; "
        f"{report.counts.get('retried deliveries', 0)} retried after a 5xx)"
    )
    print(f"  cards:   {cards:,} posted in {report.card_seconds:.1f} s = {card_rate:.1f}/s")
    print(f"  acknowledgements: {report.counts.get('acknowledgements received', 0):,}")
    outbox_rate = report.outbox_sent / report.outbox_seconds if report.outbox_seconds else 0.0
    print(
        f"  outbox:  {report.outbox_sent:,} messages sent (Slack, acknowledgements, skipped steps) in "
        f"{report.outbox_seconds:.1f} s = {outbox_rate:.1f}/s by {config.run_processes} processes"
    )
    print(f"  {'':<22} {'n':>8} {'p50 s':>9} {'p99 s':>9} {'max s':>9}")
    print(_spread_row("webhook 202 -> card", report.card_latency))
    print(_spread_row("webhook 202 -> ack", report.ack_latency))
    print(f"  load sent in {run.load_seconds:.1f} s; everything settled {run.settle_seconds:.1f} s later")
    print()
    print("spread over the processes (their own log lines)")
    print(
        f"  {'process':<8} {'sweeps':>7} {'conv. swept':>11} {'steps written':>13} {'sent':>8} "
        f"{'cards':>7} {'storms':>7} {'CPU s':>7}"
    )
    for name, work in sorted(report.work.items()):
        cpu = run.cpu.get(name)
        print(
            f"  {name:<8} {work.sweeps:>7,} {work.processed:>11,} {work.ladder_steps:>13,} {work.sent:>8,} "
            f"{work.cards + work.storm_cards:>7,} {work.storm_summaries:>7,} "
            f"{(f'{cpu:.1f}' if cpu is not None else '?'):>7}"
        )
    others = ", ".join(
        f"{name} {seconds:.1f}" for name, seconds in sorted(run.cpu.items()) if not name.startswith("run")
    )
    print(f"  CPU seconds elsewhere: {others} (postgres: every server process on the machine)")
    print()
    print("nag lateness: Slack call minus the step's scheduled time")
    print(f"  {'':<22} {'n':>8} {'p50 s':>9} {'p99 s':>9} {'max s':>9}")
    print(_spread_row("all steps", report.lateness.get("all")))
    for kind in LADDER_KINDS:
        print(_spread_row(kind, report.lateness.get(kind)))
    print(_spread_row("  sweep's part", report.sweep_lateness))
    print(_spread_row("  sender's part", report.send_delay))
    missing = sum(report.missing_steps.values())
    print(
        f"  steps owed (due {OWED_MARGIN:.0f} s or more before the answer arrived): {report.owed_steps:,}; "
        f"never in Slack: {missing:,} "
        + (
            "(" + ", ".join(f"{kind} {n:,}" for kind, n in sorted(report.missing_steps.items())) + ": "
            "merged by a late sweep, or skipped because the answer came first)"
            if missing
            else ""
        )
    )
    overall = report.lateness.get("all")
    if overall is not None and overall.count:
        verdict = "within" if overall.p99 <= AIM_P99 else "ABOVE"
        print(f"  p99 {overall.p99:.3f} s: {verdict} the aim of {AIM_P99:.0f} s")
    print("  by when the steps were due (seconds after the first post):")
    for offset, spread in timeline(report.points, started.timestamp(), bucket=30.0):
        print(_spread_row(f"  {offset:>4.0f}-{offset + 30:<4.0f}", spread))
    print()
    counts = ", ".join(f"{key} {value:,}" for key, value in report.counts.items())
    print(f"counts: {counts}")
    print(f"Slack calls: {dict(report.slack_calls)}")
    if report.problems:
        print(f"CHECKS FAILED ({len(report.problems)}):")
        for problem in report.problems:
            print(f"  - {problem}")
    else:
        print(
            "checks: every post stored once, one card per conversation, every ladder step once "
            "(events, outbox, Slack), one acknowledgement per conversation and per customer, nothing "
            "left unsent, all processes worked: OK"
        )


def main(argv: list[str] | None = None) -> int:
    defaults = StormConfig(
        posts=10_000,
        seconds=150.0,
        concurrency=32,
        first_response=60.0,
        warn_at=0.5,
        escalation_after=15.0,
        nag_every=20.0,
        answer_after=85.0,
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL,
        help=f"PostgreSQL to use (name must contain 'storm' or 'bench'); default ${DATABASE_URL_ENV} or %(default)s",
    )
    parser.add_argument("--posts", type=int, default=defaults.posts)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="span the posts arrive over")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests in flight")
    parser.add_argument("--runs", type=int, default=defaults.run_processes, help="replyclock run processes")
    parser.add_argument("--first-response", type=float, default=defaults.first_response, help="seconds")
    parser.add_argument("--warn-at", type=float, default=defaults.warn_at, help="fraction of the target")
    parser.add_argument("--escalation-after", type=float, default=defaults.escalation_after, help="seconds")
    parser.add_argument("--nag-every", type=float, default=defaults.nag_every, help="seconds")
    parser.add_argument("--answer-after", type=float, default=defaults.answer_after, help="seconds")
    parser.add_argument("--outbox-interval", type=float, help="OUTBOX_INTERVAL (default: the product's)")
    parser.add_argument(
        "--sweep-max-interval", type=float, help="SWEEP_MAX_INTERVAL (default: the product's)"
    )
    parser.add_argument("--settle-timeout", type=float, default=300.0, help="seconds to wait after the load")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the policy file")
    args = parser.parse_args(argv)
    config = StormConfig(
        posts=args.posts,
        seconds=args.seconds,
        concurrency=args.concurrency,
        run_processes=args.runs,
        first_response=args.first_response,
        warn_at=args.warn_at,
        escalation_after=args.escalation_after,
        nag_every=args.nag_every,
        answer_after=args.answer_after,
        outbox_interval=args.outbox_interval,
        sweep_max_interval=args.sweep_max_interval,
    )
    version = prepare_database(args.database_url)
    workdir = Path(tempfile.mkdtemp(prefix="replyclock-storm-"))
    began = time.monotonic()
    try:
        run = run_storm(
            config, args.database_url, workdir, settle_timeout=args.settle_timeout, progress=progress
        )
        progress(f"done in {time.monotonic() - began:.0f} s ({datetime.now(UTC):%H:%M:%S} UTC)")
        print_report(run, version)
    finally:
        if args.keep:
            progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if run.report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
