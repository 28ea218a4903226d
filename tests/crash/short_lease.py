"""`replyclock run` with a short outbox lease: the PostgreSQL variant of tests/test_crash.py runs this.

On PostgreSQL several processes may send, so a restarted one settles only the ``sending`` rows
whose lease has run out (DEFAULT_LEASE, 5 minutes), and the recovery job looks once a lease.
The crash test cannot wait five minutes after each kill, so this wrapper shortens the lease
(the outbox sender's and the Slack storm claim's) and then runs bot.cli unchanged:

    python -m tests.crash.short_lease SECONDS run --config FILE
"""

from __future__ import annotations

import sys
from datetime import timedelta


def main(argv: list[str]) -> int:
    import bot.flow.outbox
    import bot.slack.delivery
    from bot.cli import main as cli_main

    lease = timedelta(seconds=float(argv[0]))
    defaults = bot.flow.outbox.OutboxSender.__init__.__kwdefaults__
    assert defaults is not None and "lease" in defaults
    defaults["lease"] = lease
    setattr(bot.slack.delivery, "DEFAULT_LEASE", lease)  # noqa: B010 - the storm claim reads it at call time
    return cli_main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
