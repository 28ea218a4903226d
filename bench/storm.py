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
* the CPU time each process used, and every check of the test (nothing twice, nothing lost);
* Slack's limits (on by default: the stand-in enforces Slack's published limits, the processes
  pace themselves from one budget in the database; ``--no-rate-limits`` for the unlimited
  stand-in): per channel (the two storm channels, the "quiet" team's channel that gets every
  500th post, and each person's DMs) its posts, 429s and busiest 10 seconds, whether it was
  rate-limited, and the lateness of breach and escalation notices, of cards (webhook answered
  -> card) and of nags; nag lateness where the limit allows; the share of sends that were
  skips (a handler that found nothing to send; target <= 1 %); each process's peak RSS
  (target <= 200 MB); and whether everything was sent before ``--settle-timeout``. At Slack's
  pace (one post a second per channel) a storm of thousands of conversations in two channels
  cannot settle in minutes: the report says what was still unsent when the wait ended.

Run it from the project root (PostgreSQL must be reachable; about 6 to 10 minutes)::

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
from tests.storm.analysis import LIMITED_SHARE, OWED_MARGIN, POST_WINDOW, Spread, timeline
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


def _spread_cells(spread: Spread) -> str:
    if spread.count == 0:
        return f"{'-':>6} {'':>7} {'':>7} {'':>7}"
    return f"{spread.count:>6,} {spread.p50:>7.1f} {spread.p99:>7.1f} {spread.max:>7.1f}"


def print_limits(run: StormRun) -> None:
    """Slack's limits: per channel, and the figures the issue asks for."""
    report = run.report
    print()
    print(
        f"Slack's limits: {'ON' if run.rate_limits else 'off'} in the stand-in "
        f"(chat.postMessage 1/s per channel after a burst of 4, chat.update and conversations.open "
        f"50/min per workspace); SLACK_PACING {'on (shared through the database)' if run.rate_limits else 'off'}"
    )
    pending = {
        k.removeprefix("outbox ").removesuffix(" pending"): n
        for k, n in report.counts.items()
        if k.endswith(" pending")
    }
    if run.settled:
        print(f"  settled: everything answered and sent {run.settle_seconds:.0f} s after the load")
    else:
        print(
            f"  NOT settled: {run.settle_seconds:.0f} s after the load, still unsent: "
            + (
                ", ".join(f"{kind} {n:,}" for kind, n in sorted(pending.items()))
                or "nothing pending (sending)"
            )
        )
    print(
        f"  a channel counts as rate-limited when some {POST_WINDOW:.0f} s took >= {LIMITED_SHARE:.0%} of its 1/s"
    )
    print(
        f"  {'channel':<14} {'posts':>6} {'/s':>5} {'429s':>5} {'peak':>5} {'limited':>7} | "
        f"{'breach+escalation n p50 p99 max':>31} | {'cards n p50 p99 max':>31} | {'nags n p50 p99 max':>31}"
    )
    for figures in sorted(report.channels.values(), key=lambda c: (not c.limited, c.label)):
        print(
            f"  {figures.label:<14} {figures.posts:>6,} "
            f"{figures.posts / figures.span if figures.span else 0.0:>5.2f} {figures.refused:>5,} {figures.peak:>5} "
            f"{'yes' if figures.limited else 'no':>7} | {_spread_cells(Spread.of(figures.urgent))} | "
            f"{_spread_cells(Spread.of(figures.cards))} | {_spread_cells(Spread.of(figures.nags))}"
        )
    refused = sum(c.refused for c in report.channels.values())
    posts = sum(c.posts for c in report.channels.values())
    print(
        f"  429s: {refused:,} of {posts + refused:,} chat.postMessage calls; all Slack calls: {dict(report.slack_calls)}"
    )
    print(f"  {'':<44} {'n':>6} {'p50 s':>7} {'p99 s':>7} {'max s':>7}")
    print(f"  {'within their limit: nag lateness':<44} {_spread_cells(report.by_limit(False, 'nags'))}")
    print(
        f"  {'within their limit: breach+escalation':<44} {_spread_cells(report.by_limit(False, 'urgent'))}"
    )
    print(
        f"  {'within their limit: cards (webhook -> card)':<44} {_spread_cells(report.by_limit(False, 'cards'))}"
    )
    print(
        f"  {'rate-limited: breach+escalation lateness':<44} {_spread_cells(report.by_limit(True, 'urgent'))}"
    )
    print(f"  {'rate-limited: cards (webhook -> card)':<44} {_spread_cells(report.by_limit(True, 'cards'))}")
    print(f"  {'rate-limited: nag lateness':<44} {_spread_cells(report.by_limit(True, 'nags'))}")
    within = report.by_limit(False, "nags")
    if within.count:
        print(
            f"  nag p99 where Slack's limit allows: {within.p99:.2f} s ({'within' if within.p99 < AIM_P99 else 'ABOVE'} the aim of {AIM_P99:.0f} s)"
        )
    retired = sum(n for key, n in report.counts.items() if key.endswith(" retired"))
    print(
        f"  skipped sends: {report.skipped_sends:,} of {report.sends:,} sends = {report.skip_share:.2%} "
        f"({'within' if report.skip_share <= 0.01 else 'ABOVE'} the target of 1 %); "
        f"outbox rows retired unsent (answered first, or a newer card update): {retired:,}"
    )
    rss = ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(run.peak_rss.items()))
    worst = max(run.peak_rss.values(), default=0.0)
    print(f"  peak RSS (MB): {rss} ({'within' if worst <= 200 else 'ABOVE'} the target of 200 MB)")


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
        f"{'cards':>7} {'storms':>7} {'overdue':>7} {'notices':>7} {'remind':>7} {'nags':>7} {'CPU s':>7}"
    )
    for name, work in sorted(report.work.items()):
        cpu = run.cpu.get(name)
        print(
            f"  {name:<8} {work.sweeps:>7,} {work.processed:>11,} {work.ladder_steps:>13,} {work.sent:>8,} "
            f"{work.cards + work.storm_cards:>7,} {work.storm_summaries:>7,} "
            f"{work.overdue_digests:>7,} {work.overdue_notices:>7,} "
            f"{work.reminder_digests:>7,} {work.reminder_nags:>7,} "
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
    print_limits(run)
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
        quiet_every=500,
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
    parser.add_argument("--settle-timeout", type=float, default=150.0, help="seconds to wait after the load")
    parser.add_argument(
        "--rate-limits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the Slack stand-in enforces Slack's published limits and the processes pace themselves",
    )
    parser.add_argument(
        "--quiet-every",
        type=int,
        default=defaults.quiet_every,
        help='every n-th first post goes to the "quiet" team, whose channel stays within its limit',
    )
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
        quiet_every=args.quiet_every,
        outbox_interval=args.outbox_interval,
        sweep_max_interval=args.sweep_max_interval,
    )
    version = prepare_database(args.database_url)
    workdir = Path(tempfile.mkdtemp(prefix="replyclock-storm-"))
    began = time.monotonic()
    try:
        run = run_storm(
            config,
            args.database_url,
            workdir,
            settle_timeout=args.settle_timeout,
            rate_limits=args.rate_limits,
            progress=progress,
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
