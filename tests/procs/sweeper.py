"""A sweeper process for tests/test_processes.py: one real `bot.flow.sweep.sweep` per instant it is given.

Protocol, one JSON object per line on stdout (logs go to stderr):

* once connected and warmed up it prints ``{"ready": <pid>}`` and waits;
* for every line on stdin holding an ISO 8601 instant it sets its FakeClock there, runs
  ``sweep(ctx, batch_size=...)`` once (as the scheduler's sweep job does) and prints
  ``{"at": ..., "processed": n, "failed": n, "steps": {kind: n}}``;
* it exits at the end of its input.

The parent writes each instant to every sweeper at once, so they compete for the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import text

from bot.config import load_policy
from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.sweep import sweep
from storage.db import make_engine


def emit(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--policy", required=True, help="policy TOML file")
    parser.add_argument("--start", required=True, type=datetime.fromisoformat, help="initial fake time")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)

    clock = FakeClock(args.start)
    engine = make_engine(args.database_url)
    ctx = AppContext(policy=load_policy(args.policy), engine=engine, clock=clock)
    # Warm up before saying ready (connection, calendars), so both sweepers start on equal terms.
    with ctx.sessions() as session:
        session.execute(text("SELECT 1"))
    for name in ctx.policy.calendars:
        ctx.calendar(name)
    for expert in ctx.policy.experts:
        ctx.expert_calendar(expert)
    emit({"ready": os.getpid()})

    for line in sys.stdin:
        if not line.strip():
            continue
        at = datetime.fromisoformat(line.strip())
        clock.set(at)
        result = sweep(ctx, batch_size=args.batch_size)
        emit(
            {
                "at": at.isoformat(),
                "processed": result.processed,
                "failed": result.failed,
                "steps": result.steps,
            }
        )
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
