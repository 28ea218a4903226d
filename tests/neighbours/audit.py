"""Reading a run afterwards: which Slack call belongs to which conversation and outbox row, and in what order.

A staff outbox row that reached Slack records where its message went (``result``: ``"C… ts"``,
``"thread C… ts"``, ``"dm D… ts"``, ``"updated C… ts"``); the stand-in's log has every call with
its answer, so each delivered row has exactly one *delivering call*. Every other call that names
the conversation is an attempt (failed, or answered too late for the client), or a thread note.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from statistics import median
from typing import Any

from sqlalchemy import Engine, select

from storage.models import LANE_FREE_KINDS, SENT, Conversation, Outbox
from tests.neighbours.standins import Exchange

STAFF_POST_KINDS = ("card", "warning", "breach", "escalation", "nag", "reassign", "thread_post")
_ID = re.compile(r"#(\d+)\b")
_TEXT_KINDS = (
    (re.compile(r"^Reminder: "), "nag"),
    (re.compile(r"^Escalation: "), "escalation"),
    (re.compile(r"^Deadline missed: "), "breach"),
    (re.compile(r"^#\d+ is "), "warning"),
    (re.compile(r"^#\d+ from "), "card"),
    (re.compile(r"^Escalated by DM"), "note"),
)


@dataclass(frozen=True)
class Row:
    """An outbox row, detached."""

    id: int
    kind: str
    conversation_id: int | None
    status: str
    attempts: int
    created_at: datetime
    sent_at: datetime | None
    result: str | None
    last_error: str | None

    @property
    def delay(self) -> float | None:
        """Seconds from written to sent."""
        return None if self.sent_at is None else (self.sent_at - self.created_at).total_seconds()

    @property
    def skipped(self) -> bool:
        return (self.result or "").startswith("skipped")

    @property
    def posted_to(self) -> tuple[str, str] | None:
        """(channel, ts) of the message it posted, for rows delivered by chat.postMessage."""
        words = (self.result or "").split()
        if self.status != SENT or len(words) < 2 or words[0] in ("updated", "skipped:", "storm", "reposted"):
            return None
        return words[-2], words[-1]


def rows(engine: Engine) -> list[Row]:
    with engine.connect() as connection:
        found = connection.execute(
            select(
                Outbox.id,
                Outbox.kind,
                Outbox.conversation_id,
                Outbox.status,
                Outbox.attempts,
                Outbox.created_at,
                Outbox.sent_at,
                Outbox.result,
                Outbox.last_error,
            ).order_by(Outbox.id)
        ).all()
    return [Row(*r) for r in found]


def cards(engine: Engine) -> dict[int, tuple[str | None, str | None]]:
    """conversation id -> (channel, ts) of its stored card."""
    with engine.connect() as connection:
        found = connection.execute(select(Conversation.id, Conversation.slack_channel, Conversation.slack_ts))
        return {cid: (channel, ts) for cid, channel, ts in found}


OVERDUE_METADATA_TYPE = "replyclock_overdue"  # bot.slack.delivery: an overdue digest
REMINDER_METADATA_TYPE = "replyclock_reminders"  # bot.slack.delivery: a reminder digest (nags by DM)
FOLLOW_UP_METADATA_TYPE = "replyclock_follow_ups"  # bot.slack.delivery: follow-ups in a storm digest's thread
DIGEST_METADATA_TYPES = (OVERDUE_METADATA_TYPE, REMINDER_METADATA_TYPE, FOLLOW_UP_METADATA_TYPE)


def _metadata(params: Mapping[str, Any]) -> Mapping[str, Any] | None:
    metadata = params.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return None
    return metadata if isinstance(metadata, Mapping) else None


def is_overdue_digest(exchange: Exchange) -> bool:
    """An overdue or reminder digest: one top-level message carrying several conversations' notices."""
    metadata = _metadata(exchange.call.params) if exchange.call.method == "chat.postMessage" else None
    return metadata is not None and metadata.get("event_type") in DIGEST_METADATA_TYPES


def _metadata_conversation(params: Mapping[str, Any]) -> int | None:
    metadata = _metadata(params)
    if metadata is not None and metadata.get("event_type") not in DIGEST_METADATA_TYPES:
        payload = metadata.get("event_payload")
        if isinstance(payload, Mapping) and isinstance(payload.get("conversation_id"), int):
            return int(payload["conversation_id"])
    return None


def kind_of(exchange: Exchange) -> str:
    """What a call was: a message kind (card, warning, breach, escalation, nag, note), an update, or other."""
    call = exchange.call
    if call.method == "chat.update":
        return "update"
    if call.method != "chat.postMessage":
        return call.method
    if is_overdue_digest(exchange):
        return "digest"
    if _metadata_conversation(call.params) is not None:
        return "card"
    text = str(call.params.get("text") or "")
    for pattern, kind in _TEXT_KINDS:
        if pattern.search(text):
            return kind
    return "other"


@dataclass
class SlackAudit:
    """The Slack side of a run, call by call, against the outbox."""

    exchanges: list[Exchange]
    rows: list[Row]
    cards: Mapping[int, tuple[str | None, str | None]]
    client_timeout: float
    by_conversation: dict[int, list[Exchange]] = field(default_factory=dict)
    delivering: dict[int, Exchange] = field(default_factory=dict)  # outbox id -> its call

    def __post_init__(self) -> None:
        by_ts = {ts: cid for cid, (_channel, ts) in self.cards.items() if ts}
        grouped: dict[int, list[Exchange]] = defaultdict(list)
        for exchange in sorted(self.exchanges, key=lambda e: e.arrived):
            if is_overdue_digest(exchange):
                continue  # several conversations' notices in one top-level message: see lane_violations
            cid = self.conversation_of(exchange, by_ts)
            if cid is not None:
                grouped[cid].append(exchange)
        self.by_conversation = dict(grouped)
        posted = {
            (str(e.call.response.get("channel")), str(e.call.response.get("ts"))): e
            for e in self.exchanges
            if e.call.method == "chat.postMessage" and e.call.ok and e.call.response is not None
        }
        for row in self.rows:
            target = row.posted_to
            if target is not None and target in posted:
                self.delivering[row.id] = posted[target]

    @staticmethod
    def conversation_of(exchange: Exchange, card_ts: Mapping[str, int]) -> int | None:
        call = exchange.call
        if call.method == "chat.update":
            return card_ts.get(str(call.params.get("ts")))
        if call.method != "chat.postMessage":
            return None
        found = _metadata_conversation(call.params)
        if found is not None:
            return found
        thread = call.params.get("thread_ts")
        if isinstance(thread, str) and thread in card_ts:
            return card_ts[thread]
        match = _ID.search(str(call.params.get("text") or ""))
        return int(match.group(1)) if match else None

    # -- what happened --------------------------------------------------------------------

    def lost_answers(self) -> list[Exchange]:
        """Calls Slack carried out but answered after the client had given up (posted, answer lost)."""
        return [e for e in self.exchanges if e.call.ok and e.took >= self.client_timeout]

    def failures(self) -> Counter[str]:
        """Calls answered with an error, by HTTP status ("timeout" for answers the client never saw)."""
        counted: Counter[str] = Counter()
        for e in self.exchanges:
            if e.took >= self.client_timeout:
                counted["timeout"] += 1
            elif not e.call.ok:
                counted[str(e.call.status)] += 1
        return counted

    def extra_posts(self) -> dict[int, list[Exchange]]:
        """Per conversation, messages that reached Slack beyond one per delivered row and its notes."""
        delivering_ids = {id(e) for e in self.delivering.values()}
        extra: dict[int, list[Exchange]] = {}
        for cid, exchanges in self.by_conversation.items():
            found = [
                e
                for e in exchanges
                if e.call.method == "chat.postMessage"
                and e.call.ok
                and id(e) not in delivering_ids
                and kind_of(e) != "note"
            ]
            if found:
                extra[cid] = found
        return extra

    def lane_violations(self) -> list[str]:
        """Every call of a conversation must belong to the oldest of its staff rows not yet delivered.

        Walks each conversation's calls in arrival order: the delivering call of row k must come
        after that of row k-1, and any other call in between must be an attempt of row k (same
        kind) or a note of the row before.

        Rows a digest delivered are left out: an overdue digest is a top-level message for
        several conversations that needs none of their cards, so it may go before a card or a
        thread post of theirs (tests/test_slack_delivery.py checks what it carries); a follow-up
        digest carries several conversations' follow-ups in their order. So are the ladder's
        notices (storage.models.LANE_FREE_KINDS: warning, breach, escalation, nag): they keep no
        place in their conversation's order. So are card updates (storage.models.HOLDS_NOTHING_BACK):
        an edit needs its card's ts, so it follows the card anyway, and nothing waits for it.
        """
        problems: list[str] = []
        row_of = {row.id: row for row in self.rows}
        delivered_by = {id(e): row_id for row_id, e in self.delivering.items()}
        lanes: dict[int, list[Row]] = defaultdict(list)
        for row in self.rows:
            if row.id in self.delivering and is_overdue_digest(self.delivering[row.id]):
                continue
            if row.kind in LANE_FREE_KINDS:
                continue
            if row.kind == "card_update":
                continue
            if row.conversation_id is not None and row.id in self.delivering:
                lanes[int(row.conversation_id or 0)].append(row)
        for cid, exchanges in self.by_conversation.items():
            lane = sorted(lanes.get(cid, []), key=lambda r: r.id)
            k = 0
            for e in exchanges:
                head = lane[k] if k < len(lane) else None
                row_id = delivered_by.get(id(e))
                kind = kind_of(e)
                if kind == "update" or (row_id is not None and row_of[row_id].kind == "card_update"):
                    continue  # a card's edit (or an attempt of one): in no lane, see above
                if kind in (*LANE_FREE_KINDS, "note") or (
                    row_id is not None and row_of[row_id].kind in LANE_FREE_KINDS
                ):
                    # A ladder notice (or an attempt of one, or the note of a DM escalation): in no
                    # lane.
                    continue
                if row_id is not None:
                    if head is None or row_id != head.id:
                        problems.append(
                            f"#{cid}: row {row_id} ({row_of[row_id].kind}) delivered while row "
                            f"{head.id if head else None} ({head.kind if head else None}) was still unsent"
                        )
                    k = next((i + 1 for i, r in enumerate(lane) if r.id == row_id), k)
                    continue
                previous = lane[k - 1] if k > 0 else None
                if kind == "note" and previous is not None and previous.kind == "escalation":
                    continue
                if head is None or kind != head.kind:
                    problems.append(
                        f"#{cid}: a {kind} call at {e.arrived:.3f} while the oldest unsent row was "
                        f"{head.id if head else None} ({head.kind if head else None})"
                    )
        return problems


def delays(rows: Iterable[Row], kinds: Sequence[str] | None = None) -> dict[str, float]:
    """Seconds from written to sent: max, median, and how many rows."""
    values = [r.delay for r in rows if r.delay is not None and (kinds is None or r.kind in kinds)]
    clean = [v for v in values if v is not None]
    if not clean:
        return {"rows": 0, "max": 0.0, "median": 0.0}
    return {"rows": len(clean), "max": round(max(clean), 2), "median": round(median(clean), 2)}
