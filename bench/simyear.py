"""Write a generated year of helpdesk history into a database, with its policy file.

The year is `bot.sim.synth.realistic_arrivals` answered by the synthetic experts of
`bot.sim.synth.realistic_policy` (their "true" speeds): posts, conversations, owners, first
responses, "answered" events and the ladder's warning/nag/escalation events, as replyclock would
have recorded them. Then ``replyclock simulate`` can replay it::

    .venv/bin/python -m bench.simyear --database sqlite:////tmp/year.db --policy /tmp/year.toml
    DATABASE_URL=sqlite:////tmp/year.db .venv/bin/replyclock simulate --current /tmp/year.toml \\
        --from 2025-09-01 --to 2025-11-30 --arrivals 1.2 --png /tmp/year.png
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

from bot.sim.engine import Simulator
from bot.sim.synth import (
    realistic_arrivals,
    realistic_policy,
    realistic_policy_text,
    true_times,
    write_history,
)
from storage.db import make_engine, make_sessionmaker
from storage.migrate import upgrade


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", required=True, help="SQLAlchemy URL (a new or migrated database)")
    parser.add_argument("--policy", required=True, help="where to write the policy file")
    parser.add_argument("--year", type=int, default=2025)
    parser.add_argument("--per-year", type=int, default=30_000)
    parser.add_argument("--copies", type=int, default=1, help="staff copies (4 for 100,000 a year)")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    began = time.perf_counter()
    Path(args.policy).write_text(realistic_policy_text(args.copies))
    policy = realistic_policy(args.copies)
    arrivals = realistic_arrivals(year=args.year, per_year=args.per_year, seed=args.seed)
    start, end = datetime(args.year, 1, 1, tzinfo=UTC), datetime(args.year + 1, 1, 1, tzinfo=UTC)
    history = Simulator(policy, true_times(args.copies), start=start, end=end).run(arrivals, seed=args.seed)
    engine = make_engine(args.database)
    try:
        upgrade(engine)
        with make_sessionmaker(engine)() as session:
            written = write_history(session, policy, arrivals, history.conversations)
            session.commit()
    finally:
        engine.dispose()
    print(
        f"wrote {written:,} conversations of {args.year} to {args.database} and {args.policy} "
        f"in {time.perf_counter() - began:.1f} s"
    )


if __name__ == "__main__":
    main()
