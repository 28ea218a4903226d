"""A scripted channel for `replyclock demo`: sample customer posts that arrive as its clock moves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import ClassVar, Unpack

from bot.core.clock import Clock
from connectors.base import Batch, Connector, ConnectorOptions, InboundPost, ReplyTarget
from connectors.mail import build_reply, parse_message, short_id


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
        script: Sequence[ScriptedPost] = (),
        start: datetime | None = None,
        **options: Unpack[ConnectorOptions],
    ) -> None:
        super().__init__(name, **options)
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


@dataclass(frozen=True)
class ScriptedMail:
    """A raw RFC 5322 message that arrives `after` the script starts."""

    after: timedelta
    raw: bytes


class DemoMailConnector(Connector):
    """A scripted mailbox for `replyclock demo`: the e-mail connector's own parser and reply builder,
    with the messages served from the script instead of IMAP and the answers kept instead of sent
    by SMTP (so the demo needs no mail server). Sent messages get ids ``<demo-mail-N@domain>``."""

    kind: ClassVar[str] = "email"

    def __init__(
        self,
        name: str,
        *,
        address: str,
        display_name: str | None = None,
        clock: Clock | None = None,
        script: Sequence[ScriptedMail] = (),
        start: datetime | None = None,
    ) -> None:
        super().__init__(name, own_ids=(address.lower(),), clock=clock)
        self.address = address.lower()
        self.display_name = display_name
        self.start = start or self.clock.now()
        self.script = sorted(script, key=lambda m: m.after)
        self.sent: list[EmailMessage] = []

    def fetch(self, cursor: str | None) -> Batch:
        delivered = int(cursor or 0)
        now = self.clock.now()
        due = [m for m in self.script[delivered:] if self.start + m.after <= now]
        posts = tuple(parse_message(m.raw, own=self.own_ids, now=now) for m in due)
        return Batch(posts=posts, cursor=str(delivered + len(posts)))

    def reply(self, to: ReplyTarget, text: str) -> str:
        message = build_reply(
            sender=self.address,
            display_name=self.display_name,
            to=to,
            text=text,
            automatic=to.extra.get("outbox_kind") == "ack",
            now=self.clock.now(),
            message_id=f"<demo-mail-{len(self.sent) + 1}@{self.address.rsplit('@', 1)[1]}>",
        )
        self.sent.append(message)
        return short_id(str(message["Message-ID"]))

    def is_own(self, post: InboundPost) -> bool:
        return post.author_id.lower() in self.own_ids
