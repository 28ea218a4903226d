"""An outbox sender process for tests/test_processes.py, delivering over HTTP to a stand-in server.

It builds an AppContext on the given database with a FakeClock, optionally settles rows left
`sending` by a killed predecessor (``--recover all`` as `replyclock run` does on SQLite,
``--recover lease`` for expired leases only, as on PostgreSQL), then runs
``OutboxSender.send_due(limit=...)`` until a round finds nothing due, with real handlers of the shape bot.flow.outbox expects:

* customer kinds (ack, reply) POST ``{"key", "kind", "text", "outbox_id"}`` to ``<server>/customer``
  and return the id the server answers;
* staff kinds POST ``{"key", "kind", "payload"}`` to ``<server>/staff``.

``--pause before|after --pause-at N`` stops the process at the N-th customer message, just before
its request is made or just after its answer arrived (before the sender settles the row): it prints
``{"event": "paused", "where": ..., "key": ..., "outbox_id": ...}`` and waits to be killed.
At the end it prints ``{"event": "done", "recovered": n, "sent": n, ...}``. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from bot.config import load_policy
from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.delivery import STAFF_KINDS
from bot.flow.outbox import CUSTOMER_KINDS, Handler, OutboxMessage, OutboxSender
from storage.db import make_engine

NEVER_KILLED_EXIT = 3


def emit(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


class HttpHandlers:
    """The handlers, with the optional pause at the N-th customer message."""

    def __init__(self, server: str, pause: str | None, pause_at: int) -> None:
        self.server = server.rstrip("/")
        self.pause = pause
        self.pause_at = pause_at
        self.customer_calls = 0

    def _paused(self, where: str, message: OutboxMessage) -> None:
        emit({"event": "paused", "where": where, "key": message.idempotency_key, "outbox_id": message.id})
        threading.Event().wait(60)  # the test SIGKILLs us here
        raise SystemExit(NEVER_KILLED_EXIT)

    def customer(self, message: OutboxMessage) -> str | None:
        self.customer_calls += 1
        pause_here = self.customer_calls == self.pause_at
        if pause_here and self.pause == "before":
            self._paused("before", message)
        answer = post_json(
            f"{self.server}/customer",
            {
                "key": message.idempotency_key,
                "kind": message.kind,
                "text": message.payload.get("text"),
                "outbox_id": message.id,
            },
        )
        if pause_here and self.pause == "after":
            self._paused("after", message)
        return str(answer["id"])

    def staff(self, message: OutboxMessage) -> str | None:
        answer = post_json(
            f"{self.server}/staff",
            {"key": message.idempotency_key, "kind": message.kind, "payload": dict(message.payload)},
        )
        return str(answer["id"])

    def mapping(self) -> dict[str, Handler]:
        handlers: dict[str, Handler] = {kind: self.staff for kind in STAFF_KINDS}
        handlers.update({kind: self.customer for kind in CUSTOMER_KINDS})
        return handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--policy", required=True, help="policy TOML file")
    parser.add_argument("--server", required=True, help="base URL of the stand-in platform")
    parser.add_argument("--at", required=True, type=datetime.fromisoformat, help="the fake time")
    parser.add_argument("--recover", choices=("none", "all", "lease"), default="none")
    parser.add_argument("--pause", choices=("before", "after"))
    parser.add_argument("--pause-at", type=int, default=0, help="pause at this customer message (1-based)")
    parser.add_argument(
        "--limit", type=int, default=100, help="send_due batch size (OutboxSender's default: 100)"
    )
    args = parser.parse_args(argv)

    engine = make_engine(args.database_url)
    ctx = AppContext(policy=load_policy(args.policy), engine=engine, clock=FakeClock(args.at))
    sender = OutboxSender(ctx, HttpHandlers(args.server, args.pause, args.pause_at).mapping())
    recovered = 0
    if args.recover != "none":
        recovered = sender.recover(all_sending=args.recover == "all")
    totals = {"sent": 0, "retried": 0, "failed": 0, "unknown": 0}
    while True:  # as the outbox job does every few seconds, until a round finds nothing to do
        result = sender.send_due(limit=args.limit)
        done = {
            "sent": result.sent,
            "retried": result.retried,
            "failed": result.failed,
            "unknown": result.unknown,
        }
        if not any(done.values()):
            break
        totals = {name: totals[name] + count for name, count in done.items()}
    emit({"event": "done", "recovered": recovered, **totals})
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
