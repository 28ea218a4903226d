"""A scripted channel for `replyclock demo`: sample customer posts that arrive as its clock moves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from bot.core.clock import Clock, SystemClock
from connectors.base import Batch, Connector, InboundPost, ReplyTarget


@dataclass(frozen=True)
class ScriptedPost:
    """A post that appears `after` the script starts."""

    after: timedelta
    external_id: str
    author_id: str
    author_handle: str
    author_name: str
    text: str
    reply_to_id: str | None = None
    thread_id: str | None = None


class DemoConnector(Connector):
    """Serves a fixed script of posts by time, and keeps the replies it is asked to post."""

    kind: ClassVar[str] = "demo"

    def __init__(
        self,
        name: str,
        *,
        own_ids: tuple[str, ...] = (),
        settings: Mapping[str, Any] | None = None,
        clock: Clock | None = None,
        script: Sequence[ScriptedPost] = (),
        start: datetime | None = None,
    ) -> None:
        super().__init__(name, own_ids=own_ids, settings=settings)
        self.clock = clock or SystemClock()
        self.start = start or self.clock.now()
        self.script = sorted(script, key=lambda p: p.after)
        self.sent: list[tuple[ReplyTarget, str, str]] = []

    def fetch(self, cursor: str | None) -> Batch:
        """Scripted posts due by now, after the cursor (the count already delivered)."""
        delivered = int(cursor or 0)
        now = self.clock.now()
        due = [p for p in self.script[delivered:] if self.start + p.after <= now]
        posts = tuple(
            InboundPost(
                external_id=p.external_id,
                author_id=p.author_id,
                author_handle=p.author_handle,
                author_name=p.author_name,
                text=p.text,
                posted_at=self.start + p.after,
                reply_to_id=p.reply_to_id,
                thread_id=p.thread_id or p.reply_to_id or p.external_id,
                url=f"https://social.example/{p.author_handle}/{p.external_id}",
            )
            for p in due
        )
        return Batch(posts=posts, cursor=str(delivered + len(posts)))

    def reply(self, to: ReplyTarget, text: str) -> str:
        external_id = f"demo-reply-{len(self.sent) + 1}"
        self.sent.append((to, text, external_id))
        return external_id
