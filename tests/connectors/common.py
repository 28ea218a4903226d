"""What the connector tests share: a connector that dies between a fetch and its commit, and
the jobs of a worker whose outbox answers customers through the connectors."""

from __future__ import annotations

from collections.abc import Mapping

from bot.flow.context import AppContext
from bot.flow.delivery import STAFF_KINDS, customer_handlers
from bot.flow.outbox import OutboxMessage, OutboxSender
from bot.jobs import Jobs
from connectors.base import Batch, Connector


class CrashesAfterFetch(Connector):
    """Mixed in before a connector class (``class C(CrashesAfterFetch, MastodonConnector)``): dies
    after the `crash_on`-th fetch got its answer, before Jobs.poll could commit it."""

    crash_on = 0
    calls = 0

    def fetch(self, cursor: str | None) -> Batch:
        batch = super().fetch(cursor)
        self.calls += 1
        if self.calls == self.crash_on:
            raise RuntimeError("process killed between fetch and commit")
        return batch


def jobs_recording_staff(
    ctx: AppContext, connectors: Mapping[str, Connector], staff: list[str] | None = None
) -> tuple[Jobs, list[str]]:
    """A worker's jobs whose outbox sends customer messages through `connectors` and, instead of
    posting staff messages to Slack, records their kinds in `staff` (returned; a new list if None)."""
    recorded: list[str] = [] if staff is None else staff

    def record(message: OutboxMessage) -> str | None:
        recorded.append(message.kind)
        return "noop"

    handlers = {**customer_handlers(ctx, dict(connectors)), **{kind: record for kind in STAFF_KINDS}}
    return Jobs(ctx, dict(connectors), OutboxSender(ctx, handlers)), recorded
