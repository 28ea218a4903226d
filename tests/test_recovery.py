"""No wasted sends, and recovery in seconds (issue 12).

- Answering, closing or marking a conversation answered retires its pending ladder rows in the
  same transaction (audited as ``ladder_retired``); a newer pending card update of a card
  retires the older ones.
- A sender's `sending` rows carry its name; once its lease (renewed at each claim and by its
  heartbeat) lapses, any other sender's recovery settles them: within seconds, not minutes.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow import staff
from bot.flow.context import AppContext
from bot.flow.delivery import customer_handlers
from bot.flow.outbox import OWNER_TTL, STAFF_LANE, OutboxMessage, OutboxSender
from connectors.base import InboundPost, NotSent
from connectors.demo import DemoConnector
from storage.db import make_engine
from storage.models import PENDING, RETIRED, SENDING, Event, Lease, Outbox, Post
from tests.conftest import MONDAY
from tests.test_ingest import ingest, only_conversation, post
from tests.test_sweep import run_until

LADDER = ("warning", "breach", "nag", "escalation", "reassign")


# Sam works in Customer Care, the team of these conversations (issue 11 keeps teams apart).
def outbox(ctx: AppContext) -> list[Outbox]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Outbox).order_by(Outbox.id)))


def ladder_statuses(ctx: AppContext) -> list[tuple[str, str]]:
    return [(row.kind, row.status) for row in outbox(ctx) if row.kind in LADDER]


def retired_events(ctx: AppContext) -> list[Event]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Event).where(Event.action == "ladder_retired")))


def overdue_conversation(ctx: AppContext, clock: FakeClock) -> int:
    """An urgent conversation whose warning, breach and first escalation are written, unsent."""
    ingest(ctx, post("1", "the site is down!"))
    run_until(ctx, clock, timedelta(minutes=71))
    assert [kind for kind, _ in ladder_statuses(ctx)] == ["warning", "breach", "escalation"]
    return only_conversation(ctx).id


def act(ctx: AppContext, action) -> None:  # type: ignore[no-untyped-def]
    with ctx.sessions() as session, session.begin():
        action(session)


def test_marking_answered_retires_the_pending_ladder_in_the_same_transaction(
    ctx: AppContext, clock: FakeClock
) -> None:
    conversation_id = overdue_conversation(ctx, clock)
    act(ctx, lambda s: staff.mark_answered(s, ctx, conversation_id, "sam", clock.now()))
    assert ladder_statuses(ctx) == [("warning", RETIRED), ("breach", RETIRED), ("escalation", RETIRED)]
    assert all(r.result == "retired: answered first" for r in outbox(ctx) if r.kind in LADDER)
    (event,) = retired_events(ctx)
    assert [step["kind"] for step in event.detail["steps"]] == ["warning", "breach", "escalation"]
    # The sender never even looks at them; the card update (answered) still goes out.
    handled: list[str] = []

    def record(message: OutboxMessage) -> str:
        handled.append(message.kind)
        return "ok"

    OutboxSender(ctx, dict.fromkeys(("card", "ack", "card_update", *LADDER), record)).send_due()
    assert not set(handled) & set(LADDER)
    assert "card_update" in handled


def test_a_refused_answer_retires_nothing(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = overdue_conversation(ctx, clock)
    act(ctx, lambda s: staff.close(s, ctx, conversation_id, "sam", "spam", clock.now()))
    retired = ladder_statuses(ctx)
    assert retired == [("warning", RETIRED), ("breach", RETIRED), ("escalation", RETIRED)]
    with pytest.raises(staff.InvalidState):
        act(ctx, lambda s: staff.mark_answered(s, ctx, conversation_id, "sam", clock.now()))
    assert len(retired_events(ctx)) == 1


def test_a_reply_through_the_platform_retires_the_ladder_at_ingest(ctx: AppContext, clock: FakeClock) -> None:
    overdue_conversation(ctx, clock)
    ingest(
        ctx,
        InboundPost(
            "2",
            "own",
            "@ana fixed!",
            MONDAY + timedelta(minutes=70),
            author_handle="acme_support",
            reply_to_id="1",
        ),
    )
    assert {status for _, status in ladder_statuses(ctx)} == {RETIRED}
    assert len(retired_events(ctx)) == 1


def test_a_staff_reply_retires_the_ladder(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = overdue_conversation(ctx, clock)
    act(ctx, lambda s: staff.reply(s, ctx, conversation_id, "sam", "On it, sorry!", clock.now()))
    assert {status for _, status in ladder_statuses(ctx)} == {RETIRED}
    reply = [row for row in outbox(ctx) if row.kind == "reply"]
    assert len(reply) == 1 and reply[0].status == PENDING  # the customer's answer is not retired


def test_a_row_being_sent_is_left_to_its_sender(ctx: AppContext, clock: FakeClock) -> None:
    conversation_id = overdue_conversation(ctx, clock)
    sender = OutboxSender(ctx, {})
    while (batch := sender._claim(1)) and batch[0].kind not in LADDER:
        sender._record(
            [sender._outcome(batch[0], status="sent", result_text="ok")]
        )  # the card and the acknowledgement
    assert batch and batch[0].kind == "breach"  # the most urgent (it waits for no earlier row), now `sending`
    act(ctx, lambda s: staff.mark_answered(s, ctx, conversation_id, "sam", clock.now()))
    assert ladder_statuses(ctx) == [("warning", RETIRED), ("breach", SENDING), ("escalation", RETIRED)]


def test_only_the_newest_pending_card_update_of_a_card_is_kept(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund my invoice"))
    conversation_id = only_conversation(ctx).id
    act(ctx, lambda s: staff.claim(s, ctx, conversation_id, "lee", clock.now()))
    clock.advance(timedelta(minutes=1))
    act(ctx, lambda s: staff.unclaim(s, ctx, conversation_id, "lee", clock.now()))
    clock.advance(timedelta(minutes=1))
    act(ctx, lambda s: staff.claim(s, ctx, conversation_id, "maria", clock.now()))
    updates = [row for row in outbox(ctx) if row.kind == "card_update"]
    assert [row.status for row in updates] == [RETIRED, RETIRED, PENDING]
    assert updates[0].result == "retired: superseded by a newer card update"
    # A card update already sent or being sent is not touched by a newer one.
    sender = OutboxSender(ctx, {"card": lambda m: "ok", "ack": lambda m: "ok", "card_update": lambda m: "ok"})
    assert sender.send_due().by_kind == {"card": 1, "ack": 1, "card_update": 1}
    act(ctx, lambda s: staff.unclaim(s, ctx, conversation_id, "maria", clock.now()))
    assert [row.status for row in outbox(ctx) if row.kind == "card_update"] == [
        RETIRED,
        RETIRED,
        "sent",
        PENDING,
    ]


def test_rows_of_a_dead_sender_are_recovered_once_its_lease_lapses(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund my invoice"))
    dead = OutboxSender(ctx, {})
    ack, card = dead._claim(1)[0], dead._claim(1)[0]  # claimed, then the process died
    assert (ack.kind, card.kind) == ("ack", "card") and card.owner == dead.owner
    other = OutboxSender(ctx, {})
    assert other.recover() == 0  # its lease is live: the sends may be in flight
    clock.advance(OWNER_TTL - timedelta(seconds=1))
    assert other.recover() == 0
    clock.advance(timedelta(seconds=2))  # lapsed: long before the rows' own 5-minute lease
    assert other.recover() == 2
    by_kind = {row.kind: row for row in outbox(ctx)}
    assert by_kind["card"].status == PENDING and by_kind["card"].next_attempt_at == MONDAY  # first in line
    assert by_kind["card"].owner is None
    assert by_kind["ack"].status == "unknown"  # customers: at most once
    assert by_kind["delivery_unknown"].status == PENDING  # staff are told at once


def test_a_heartbeat_keeps_a_slow_send_its_own(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund my invoice"))
    slow = OutboxSender(ctx, {})
    slow._claim(1)
    other = OutboxSender(ctx, {})
    for _ in range(5):  # a send that lasts 5 x OWNER_TTL while its sender beats
        clock.advance(OWNER_TTL - timedelta(seconds=1))
        slow.heartbeat()
        assert other.recover() == 0
        assert slow.recover() == 0  # a sender never settles its own rows in flight
    with ctx.sessions() as session:
        lease = session.get(Lease, slow.owner)
        assert lease is not None and lease.expires_at == clock.now() + OWNER_TTL


def test_a_row_of_its_own_that_a_failed_write_left_sending_is_recovered_at_once(
    ctx: AppContext, clock: FakeClock
) -> None:
    """The sender lives on, but a write after the send gave up (the database stayed away longer
    than the sender waits): the row must not wait for its own 5-minute lease."""
    ingest(ctx, post("1", "refund my invoice"))
    ingest(ctx, post("2", "where is my parcel", author="bo"))
    sender = OutboxSender(ctx, {})
    [ack] = sender._claim(1)
    cards = sender._claim(10, lane=STAFF_LANE)
    assert ack.kind == "ack" and [m.kind for m in cards] == ["card", "card"]
    assert sender.recover() == 0  # in flight: its own, left alone
    sender._forget([ack.id, cards[0].id])  # their outcome was never recorded
    assert sender.recover() == 2
    by_id = {row.id: row for row in outbox(ctx)}
    assert by_id[cards[0].id].status == PENDING and by_id[cards[0].id].owner is None  # staff: again
    assert by_id[ack.id].status == "unknown"  # customers: at most once, staff told at once
    assert by_id[cards[1].id].status == SENDING  # still in flight
    assert sender.recover() == 0


def test_recovery_during_a_claim_leaves_the_rows_just_claimed_to_their_sender(
    ctx: AppContext, clock: FakeClock
) -> None:
    """On PostgreSQL the send loop claims a staff batch in one statement, committed before its
    sender knows the rows' ids: its own recovery, running meanwhile, must not take them for rows
    of its own that a failed write left `sending` (it would queue them again: sent twice)."""
    ingest(ctx, *(post(str(i), "a question", author=f"customer{i}") for i in range(3)))
    delivered: list[int] = []
    sender = OutboxSender(ctx, {"card": lambda m: str(delivered.append(m.id)), "ack": lambda m: "ok"})
    settled: list[int] = []

    def recover_meanwhile(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "'sending'" in statement and "RETURNING" in statement and not settled:
            # The claim is committed, its ids not known yet: recovery on another thread now.
            rows = {row.id: row for row in outbox(ctx)}
            assert {rows[i].status for i in rows if rows[i].kind == "card"} == {SENDING}
            worker = threading.Thread(target=lambda: settled.append(sender.recover()))
            worker.start()
            worker.join(10)

    event.listen(ctx.engine, "after_cursor_execute", recover_meanwhile)
    try:
        sender.send_due(lanes=(STAFF_LANE,))
    finally:
        event.remove(ctx.engine, "after_cursor_execute", recover_meanwhile)
    if ctx.engine.dialect.name == "sqlite":
        assert settled == []  # SQLite claims in a transaction (ids in flight before its commit)
    else:
        assert settled == [0]
    cards = [row for row in outbox(ctx) if row.kind == "card"]
    assert sorted(delivered) == [row.id for row in cards]  # each once
    assert {row.status for row in cards} == {"sent"}


# --------------------------------------------------------------------------------------------
# Honest records under database faults


class _Outage:
    """Takes the database away from everyone else (an exclusive lock) for `seconds`, on a thread."""

    def __init__(self, url: str, seconds: float) -> None:
        self.url, self.seconds = url, seconds
        self.held = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()
        assert self.held.wait(10)

    def _hold(self) -> None:
        engine = make_engine(self.url)
        try:
            with engine.connect() as connection:
                if engine.dialect.name == "sqlite":
                    connection.exec_driver_sql("COMMIT")  # leave the engine's BEGIN IMMEDIATE
                    connection.exec_driver_sql("BEGIN EXCLUSIVE")
                else:
                    connection.exec_driver_sql("LOCK TABLE outbox, posts IN ACCESS EXCLUSIVE MODE")
                self.held.set()
                time.sleep(self.seconds)
                connection.rollback()
        finally:
            engine.dispose()


class _BlinkAfterReply(DemoConnector):
    """The platform takes the message; right after, the database goes away for a moment."""

    outage: _Outage

    def reply(self, to, text):  # type: ignore[no-untyped-def]
        external_id = super().reply(to, text)
        self.outage.start()
        return external_id


def test_a_database_outage_right_after_a_delivered_customer_message_leaves_it_sent(
    database_url: str, engine: Engine, policy: Policy, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    del engine  # migrated the database
    # Short waits for locks, so that the outage is an error the sender sees, not a long wait.
    quick = {"timeout": 0.1} if database_url.startswith("sqlite") else {"options": "-c lock_timeout=100"}
    engine = make_engine(database_url, connect_args=quick)
    try:
        ctx = AppContext(policy=policy, engine=engine, clock=clock)
        ingest(ctx, post("1", "refund my invoice"))
        connector = _BlinkAfterReply("social", own_ids=("acme_support",), clock=clock)
        connector.outage = _Outage(database_url, seconds=1.5)
        sender = OutboxSender(ctx, {**customer_handlers(ctx, {"social": connector}), "card": lambda m: "ok"})
        with caplog.at_level(logging.WARNING, logger="replyclock.outbox"):
            result = sender.send_due()
        assert connector.outage.thread is not None
        connector.outage.thread.join(10)
        assert len(connector.sent) == 1
        assert result.sent == 2 and result.unknown == 0
        (ack,) = [row for row in outbox(ctx) if row.kind == "ack"]
        assert ack.status == "sent" and ack.result == connector.sent[0][2]
        assert not [row for row in outbox(ctx) if row.kind == "delivery_unknown"]
        with ctx.sessions() as session:  # our own post is stored: never mistaken for a human answer
            assert (
                session.scalars(select(Post.direction).where(Post.external_id == ack.result)).one() == "out"
            )
        assert any("not stored yet" in r.message or "not recorded yet" in r.message for r in caplog.records)
    finally:
        engine.dispose()


def test_a_database_error_before_the_call_is_a_retry_not_unknown(
    database_url: str, engine: Engine, policy: Policy, clock: FakeClock
) -> None:
    del engine  # migrated the database
    quick = {"timeout": 0.1} if database_url.startswith("sqlite") else {"options": "-c lock_timeout=100"}
    engine = make_engine(database_url, connect_args=quick)
    try:
        ctx = AppContext(policy=policy, engine=engine, clock=clock)
        ingest(ctx, post("1", "refund my invoice"))
        connector = DemoConnector("social", own_ids=("acme_support",), clock=clock)
        handlers = customer_handlers(ctx, {"social": connector})
        sender = OutboxSender(ctx, handlers)
        (ack,) = [row for row in outbox(ctx) if row.kind == "ack"]
        message = OutboxMessage(ack.id, "ack", ack.conversation_id, dict(ack.payload), ack.idempotency_key, 1)
        outage = _Outage(database_url, seconds=1.0)
        outage.start()
        with pytest.raises(NotSent, match="database unavailable before the send"):
            handlers["ack"](message)
        assert outage.thread is not None
        outage.thread.join(10)
        assert connector.sent == [] and sender.recover() == 0
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# Urgency


def test_under_a_storm_no_breach_or_escalation_waits_behind_a_card_or_a_nag(
    ctx: AppContext, clock: FakeClock
) -> None:
    # Five urgent conversations whose cards are out and whose ladders reach breach, escalation and
    # nags; then a storm of 30 new posts in the same channel (cards and acknowledgements), all due
    # at once when the sender comes round.
    ingest(ctx, *[post(str(i), "the site is down!", author=f"a{i}") for i in range(5)])
    OutboxSender(ctx, dict.fromkeys(("card", "ack"), lambda m: "ok")).send_due()
    run_until(ctx, clock, timedelta(minutes=95))
    ingest(ctx, *[post(f"s{i}", "the site is down!", author=f"s{i}", at=clock.now()) for i in range(30)])
    order: list[tuple[str, int | None]] = []

    def record(message: OutboxMessage) -> str:
        order.append((message.kind, message.conversation_id))
        return "ok"

    OutboxSender(ctx, dict.fromkeys(("card", "ack", *LADDER), record)).send_due()
    urgent = [i for i, (kind, _) in enumerate(order) if kind in ("breach", "escalation")]
    assert len(urgent) == 5 * 3  # breach + two escalations each
    overdue = {cid for kind, cid in order if kind in ("breach", "escalation")}
    # Before the last breach or escalation went nothing but the overdue conversations' own messages
    # (one conversation's messages keep the order they were written in: its warning before its
    # breach, its first nag before its second escalation): no card, no nag of the storm.
    # Acknowledgements go to the customer's platform, in their own lane (they take turns with
    # Slack's): they hold no Slack message back, so only the Slack messages ahead count here.
    ahead = [(kind, cid) for kind, cid in order[: max(urgent)] if kind not in ("ack", "reply")]
    assert {cid for _, cid in ahead} <= overdue, " ".join(kind for kind, _ in order)
    assert any(kind == "card" for kind, _ in order[max(urgent) :])
    kinds = [kind for kind, _ in order]
    assert kinds.index("ack") < kinds.index("card")  # customers before new cards
