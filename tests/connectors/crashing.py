"""A connector that dies between a fetch and its commit, for the restart tests of each channel."""

from __future__ import annotations

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
