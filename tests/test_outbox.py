"""The outbox sender: at most once to customers, at least once to staff, retries with back-off."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import event, select

from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.delivery import customer_handlers
from bot.flow.outbox import (
    CUSTOMER_LANE,
    CUSTOMER_TURN,
    REMINDER_LANE,
    STAFF_BATCH,
    STAFF_LANE,
    Defer,
    OutboxMessage,
    OutboxSender,
    Retry,
)
from connectors.base import InboundPost, NotSent
from connectors.demo import DemoConnector
from storage import repo
from storage.models import Conversation, Outbox, Post
from tests.conftest import MONDAY
from tests.test_ingest import ingest, is_own, post


def rows(ctx: AppContext) -> dict[str, list[Outbox]]:
    found: dict[str, list[Outbox]] = {}
    with ctx.sessions() as session:
        for row in session.scalars(select(Outbox).order_by(Outbox.id)):
            found.setdefault(row.kind, []).append(row)
    return found


def recording(sink: list[OutboxMessage]):  # type: ignore[no-untyped-def]
    def handle(message: OutboxMessage) -> str:
        sink.append(message)
        return f"id-{message.id}"

    return handle


def test_everything_pending_is_sent_once(ctx: AppContext) -> None:
    ingest(ctx, post("1", "refund my invoice"), post("2", "hello", author="ben"))
    delivered: list[OutboxMessage] = []
    sender = OutboxSender(ctx, {"card": recording(delivered), "ack": recording(delivered)})
    first = sender.send_due()
    second = sender.send_due()
    assert first.sent == 4 and second.sent == 0
    assert sorted(m.kind for m in delivered) == ["ack", "ack", "card", "card"]
    assert all(row.status == "sent" and row.sent_at == MONDAY for kind in rows(ctx).values() for row in kind)


def test_a_staff_batchs_outcomes_are_recorded_row_by_row(ctx: AppContext, clock: FakeClock) -> None:
    """Each sent row of a staff batch keeps its own result (None too) and time, its earlier error
    and its lease cleared (on PostgreSQL the send loop records a batch's sends in one statement)."""
    ingest(ctx, *(post(str(i), "a question", author=f"customer{i}") for i in range(4)))
    cards = [row.id for row in rows(ctx)["card"]]
    with ctx.sessions() as session, session.begin():
        stale = session.get(Outbox, cards[2])
        assert stale is not None
        stale.last_error = "an earlier attempt failed"

    def handle(message: OutboxMessage) -> str | None:
        clock.advance(timedelta(seconds=1))
        return None if message.id == cards[1] else f"id-{message.id}"

    OutboxSender(ctx, {"card": handle, "ack": lambda message: "ok"}).send_due(lanes=(STAFF_LANE,))
    found = {row.id: row for row in rows(ctx)["card"]}
    assert [found[i].result for i in cards] == [f"id-{cards[0]}", None, f"id-{cards[2]}", f"id-{cards[3]}"]
    assert [found[i].sent_at for i in cards] == [MONDAY + timedelta(seconds=n) for n in (1, 2, 3, 4)]
    assert {(found[i].status, found[i].owner, found[i].lease_until, found[i].last_error) for i in cards} == {
        ("sent", None, None, None)
    }
    assert {row.status for row in rows(ctx)["ack"]} == {"pending"}  # another lane


def test_customer_message_with_unknown_outcome_is_never_resent(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund my invoice"))
    calls: list[OutboxMessage] = []

    def timeout(message: OutboxMessage) -> str:
        calls.append(message)
        raise TimeoutError("read timed out")

    sender = OutboxSender(ctx, {"ack": timeout, "card": lambda m: "ok"})
    result = sender.send_due()
    clock.advance(timedelta(hours=1))
    sender.send_due()
    assert result.unknown == 1 and len(calls) == 1
    found = rows(ctx)
    assert found["ack"][0].status == "unknown"
    assert "TimeoutError" in (found["ack"][0].last_error or "")
    # Staff are told, through the outbox like everything else.
    assert found["delivery_unknown"][0].payload["outbox_id"] == found["ack"][0].id


def test_refused_customer_message_is_retried_with_backoff_then_failed(
    ctx: AppContext, clock: FakeClock
) -> None:
    ingest(ctx, post("1", "refund my invoice"))
    calls: list[OutboxMessage] = []

    def refuse(message: OutboxMessage) -> str:
        calls.append(message)
        raise NotSent("503 from the platform")

    sender = OutboxSender(ctx, {"ack": refuse, "card": lambda m: "ok"}, max_attempts=3)
    sender.send_due()
    ack = rows(ctx)["ack"][0]
    assert ack.status == "pending" and ack.next_attempt_at > MONDAY and ack.attempts == 1
    sender.send_due()
    assert len(calls) == 1  # not before the back-off has passed
    for _ in range(3):
        clock.advance(timedelta(hours=1))
        sender.send_due()
    assert len(calls) == 3
    found = rows(ctx)
    assert found["ack"][0].status == "failed"
    assert len(found["delivery_failed"]) == 1


def test_staff_message_retries_after_a_failure(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "hello"))
    attempts: list[int] = []

    def flaky(message: OutboxMessage) -> str:
        attempts.append(message.attempts)
        if len(attempts) == 1:
            raise Retry("slack said 500")
        return "ok"

    sender = OutboxSender(ctx, {"card": flaky, "ack": lambda m: "ok"})
    sender.send_due()
    clock.advance(timedelta(minutes=5))
    sender.send_due()
    assert attempts == [1, 2]
    assert rows(ctx)["card"][0].status == "sent"


def test_recover_settles_abandoned_rows_by_kind(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund my invoice"))
    sender = OutboxSender(ctx, {}, lease=timedelta(minutes=5))
    # As if a process claimed both rows and died (a customer row is always claimed alone).
    assert [m.kind for m in sender._claim(10)] == ["ack"]
    assert [m.kind for m in sender._claim(10)] == ["card"]
    assert sender.recover() == 0  # leases still valid: maybe another live process
    clock.advance(timedelta(minutes=6))
    assert sender.recover() == 2
    found = rows(ctx)
    assert found["card"][0].status == "pending"  # staff: at least once
    assert found["ack"][0].status == "unknown"  # customer: at most once
    assert len(found["delivery_unknown"]) == 1


def test_acknowledgement_goes_through_the_connector_and_is_not_an_answer(
    ctx: AppContext, clock: FakeClock
) -> None:
    connector = DemoConnector("social", own_ids=("acme_support",), clock=clock)
    ingest(ctx, post("1", "refund my invoice"))
    sender = OutboxSender(ctx, {**customer_handlers(ctx, {"social": connector}), "card": lambda m: "ok"})
    sender.send_due()
    assert len(connector.sent) == 1
    target, text, external_id = connector.sent[0]
    assert target.external_id == "1" and text.startswith("Thanks @ana!")
    # The platform later shows our acknowledgement among the account's posts: a duplicate, not an answer.
    echo = InboundPost(external_id, "own", text, clock.now(), author_handle="acme_support", reply_to_id="1")
    result = ingest(ctx, echo)
    assert result.stored == 0 and result.answered == []
    with ctx.sessions() as session:
        assert session.scalars(select(Conversation.status)).one() == "open"
        assert session.scalars(select(Post.direction).where(Post.external_id == external_id)).one() == "out"
    assert is_own(echo)


def test_a_handler_missing_for_a_kind_fails_loudly(ctx: AppContext) -> None:
    ingest(ctx, post("1", "hello"))
    result = OutboxSender(ctx, {"ack": lambda m: "ok"}).send_due()
    assert result.failed == 1
    assert "no handler" in (rows(ctx)["card"][0].last_error or "")


def test_acknowledgement_is_not_sent_after_a_human_answered(ctx: AppContext, clock: FakeClock) -> None:
    connector = DemoConnector("social", own_ids=("acme_support",), clock=clock)
    ingest(ctx, post("1", "refund my invoice"))
    ingest(ctx, InboundPost("2", "own", "@ana on it", MONDAY, author_handle="acme_support", reply_to_id="1"))
    OutboxSender(
        ctx,
        {
            **customer_handlers(ctx, {"social": connector}),
            "card": lambda m: "ok",
            "card_update": lambda m: "ok",
        },
    ).send_due()
    assert connector.sent == []
    assert rows(ctx)["ack"][0].result == "skipped: a human answered first"


def test_staff_messages_of_a_conversation_keep_their_order_through_retries(
    ctx: AppContext, clock: FakeClock
) -> None:
    ingest(ctx, post("1", "the site is down!"), post("2", "hello", author="ben"))
    clock.advance(timedelta(hours=1, minutes=25))
    from bot.flow.sweep import sweep

    sweep(ctx)  # conversation 1 (urgent, 1 h): breach, escalation and a nag; conversation 2 has time
    with ctx.sessions() as session, session.begin():  # and the customer wrote again
        repo.enqueue(
            session=session, kind="thread_post", key="again-1", payload={}, conversation_id=1, now=clock.now()
        )
    order: list[tuple[int | None, str]] = []
    failures = {"card": 1}

    def flaky(message: OutboxMessage) -> str:
        if failures.get(message.kind, 0) and message.conversation_id == 1:
            failures[message.kind] -= 1
            raise Retry("slack said 500")
        order.append((message.conversation_id, message.kind))
        return "ok"

    handlers = {kind: flaky for kind in ("card", "breach", "escalation", "nag", "warning", "thread_post")}
    sender = OutboxSender(ctx, {**handlers, "ack": lambda m: "ok"})
    sender.send_due()
    # Conversation 1's card failed: the thread post after it in its lane waits; the ladder's
    # notices keep no place in the lane (a breach waits for no card: without it, it goes as a
    # top-level digest) and went; the customer lane and conversation 2 were not held up.
    assert sorted(kind for cid, kind in order if cid == 1) == ["breach", "escalation", "nag"]
    assert (2, "card") in order
    assert rows(ctx)["ack"][0].status == "sent"
    clock.advance(timedelta(minutes=5))
    sender.send_due()
    assert [kind for cid, kind in order if cid == 1][3:] == ["card", "thread_post"]


def test_a_deferred_message_is_not_an_attempt_and_comes_back_when_asked(
    ctx: AppContext, clock: FakeClock
) -> None:
    ingest(ctx, post("1", "hello"))
    attempts: list[int] = []

    def paced(message: OutboxMessage) -> str:
        attempts.append(message.attempts)
        if len(attempts) <= 20:  # far more than max_attempts: a pace is not a failure
            raise Defer("not yet", after=clock.now() + timedelta(seconds=1))
        return "ok"

    sender = OutboxSender(ctx, {"card": paced, "ack": lambda m: "ok"}, max_attempts=3)
    result = sender.send_due()
    assert (result.deferred, result.retried, result.failed) == (1, 0, 0)
    [card] = rows(ctx)["card"]
    assert (card.status, card.attempts, card.next_attempt_at) == ("pending", 0, MONDAY + timedelta(seconds=1))
    assert card.last_error is None
    assert sender.send_due().deferred == 0  # not due again before the time it asked for
    for _ in range(20):
        clock.advance(timedelta(seconds=1))
        sender.send_due()
    assert attempts == [1] * 21
    assert rows(ctx)["card"][0].status == "sent"


def sending_kinds(ctx: AppContext) -> list[str]:
    with ctx.read_sessions() as session:
        return sorted(session.scalars(select(Outbox.kind).where(Outbox.status == "sending")))


def test_staff_rows_are_claimed_in_batches_customer_rows_one_at_a_time(ctx: AppContext) -> None:
    ingest(ctx, *(post(str(n), "refund my invoice", author=f"c{n}") for n in range(3)))
    sender = OutboxSender(ctx, {})
    # Acknowledgements are more urgent than cards; each is claimed alone, never with the others.
    assert [m.kind for m in sender._claim(10)] == ["ack"]
    assert [m.kind for m in sender._claim(10)] == ["ack"]
    assert [m.kind for m in sender._claim(10)] == ["ack"]
    batch = sender._claim(10)
    assert [m.kind for m in batch] == ["card", "card", "card"]
    assert all(m.attempts == 1 and m.owner == sender.owner for m in batch)
    assert sending_kinds(ctx) == ["ack", "ack", "ack", "card", "card", "card"]


def test_a_customer_message_is_never_in_flight_beside_a_claimed_batch(ctx: AppContext) -> None:
    ingest(ctx, *(post(str(n), "refund my invoice", author=f"c{n}") for n in range(3)))
    seen: dict[str, list[list[str]]] = {"ack": [], "card": []}

    def handler(message: OutboxMessage) -> str:
        seen[message.kind].append(sending_kinds(ctx))
        return "ok"

    result = OutboxSender(ctx, {"ack": handler, "card": handler}, staff_batch=STAFF_BATCH).send_due()
    assert result.sent == 6
    # Each acknowledgement alone in flight (a kill leaves at most it `unknown`)...
    assert seen["ack"] == [["ack"], ["ack"], ["ack"]]
    # ...while the cards went as one batch, claimed together, no customer row among them.
    assert seen["card"][0] == ["card", "card", "card"]
    assert all("ack" not in kinds for kinds in seen["card"])


def test_stopping_mid_batch_hands_the_untried_staff_rows_back(ctx: AppContext) -> None:
    ingest(ctx, *(post(str(n), "refund my invoice", author=f"c{n}") for n in range(3)))
    sender = OutboxSender(ctx, {"ack": lambda m: "ok"})
    tried: list[int] = []

    def card(message: OutboxMessage) -> str:
        tried.append(message.id)
        sender.stop()  # SIGTERM during the first card of the batch
        return "ok"

    sender.handlers["card"] = card
    result = sender.send_due()
    assert result.sent == 3 + 1 and len(tried) == 1  # the acknowledgements' turn, then one card
    cards = rows(ctx)["card"]
    assert [row.status for row in cards if row.id in tried] == ["sent"]
    untried = [row for row in cards if row.id not in tried]
    assert len(untried) == 2
    assert all(r.status == "pending" and r.attempts == 0 and r.owner is None for r in untried)


def test_a_batch_records_each_outcome(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, *(post(str(n), "refund my invoice", author=f"c{n}") for n in range(4)))
    ids: list[int] = []

    def card(message: OutboxMessage) -> str:
        ids.append(message.id)
        if len(ids) == 2:
            raise Retry("Slack 503")
        if len(ids) == 3:
            raise Defer("paced", after=clock.now() + timedelta(seconds=1))
        return f"posted {message.id}"

    result = OutboxSender(ctx, {"ack": lambda m: "ok", "card": card}).send_due()
    assert (result.sent, result.retried, result.deferred) == (4 + 2, 1, 1)
    by_id = {row.id: row for row in rows(ctx)["card"]}
    sent = [by_id[ids[0]], by_id[ids[3]]]
    assert all(r.status == "sent" and r.result == f"posted {r.id}" and r.owner is None for r in sent)
    assert by_id[ids[1]].status == "pending" and by_id[ids[1]].last_error == "Slack 503"
    assert by_id[ids[1]].attempts == 1 and by_id[ids[1]].next_attempt_at > clock.now()
    deferred = by_id[ids[2]]
    assert deferred.status == "pending" and deferred.attempts == 0
    assert deferred.next_attempt_at == clock.now() + timedelta(seconds=1)


def test_acknowledgements_never_wait_behind_slack_rows_put_off_by_the_pacer(
    ctx: AppContext, clock: FakeClock
) -> None:
    """The 10,000-post storm's starvation: due urgent Slack rows, each put off by the pacer and due
    again, took every claim, and 7,698 acknowledgements were never sent. The lanes take turns."""
    ingest(ctx, post("0", "refund my invoice", author="c0"))
    with ctx.sessions() as session, session.begin():
        conversation_id = session.scalars(select(Conversation.id)).one()
        for n in range(40):
            repo.enqueue(
                session=session,
                kind="breach",
                key=f"storm-breach-{n}",
                payload={"conversation_id": conversation_id},
                now=clock.now(),
                conversation_id=None,  # each its own lane, as the storm's many conversations
            )
    put_off: list[int] = []

    def paced(message: OutboxMessage) -> str:
        put_off.append(message.id)
        raise Defer("Slack chat.postMessage: paced", after=clock.now())  # due again at once

    sender = OutboxSender(ctx, {"ack": lambda m: "ok", "card": paced, "breach": paced})
    result = sender.send_due(limit=20)
    assert [row.status for row in rows(ctx)["ack"]] == ["sent"]
    assert result.sent == 1 and result.deferred >= 10 and put_off


def test_reminders_take_turns_with_a_backlog_of_urgent_staff_rows(ctx: AppContext, clock: FakeClock) -> None:
    # 40 new conversations: 40 acknowledgements and 40 cards due (cards are more urgent than
    # nags), and a nag for the first one. The nag does not wait for the whole backlog: customer,
    # staff and reminder lanes take turns, a batch each.
    ingest(ctx, *(post(str(i), "a question", author=f"customer{i}") for i in range(40)))
    with ctx.sessions() as session, session.begin():
        repo.enqueue(session=session, kind="nag", key="nag-1", payload={}, conversation_id=1, now=MONDAY)
    order: list[str] = []

    def handle(message: OutboxMessage) -> str:
        order.append(message.kind)
        return "ok"

    statements: list[tuple[str, Any]] = []

    def capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        # The reminder lane's claim (on PostgreSQL in the send loop, one WITH .. UPDATE statement).
        if "outbox.kind = 'nag'" in statement and statement.lstrip().startswith(("SELECT", "WITH")):
            statements.append((statement, parameters))

    event.listen(ctx.engine, "before_cursor_execute", capture)
    try:
        OutboxSender(
            ctx, {kind: handle for kind in ("ack", "card", "nag")}, staff_batch=STAFF_BATCH
        ).send_due()
    finally:
        event.remove(ctx.engine, "before_cursor_execute", capture)
    assert order.index("nag") == CUSTOMER_TURN + STAFF_BATCH, order
    assert order.count("card") == 40 and order.count("ack") == 40
    assert statements
    if ctx.engine.dialect.name == "sqlite":  # the claim reads the nags' range of ix_outbox_urgency
        with ctx.engine.connect() as conn:
            plan = " ".join(
                str(row[3])
                for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statements[0][0], statements[0][1])
            )
        assert "ix_outbox_urgency" in plan and "TEMP B-TREE" not in plan, plan


def test_an_acknowledgement_does_not_wait_for_a_slack_batch(ctx: AppContext) -> None:
    # `run` drains the customer lane on one thread and the staff lanes on another: while a card's
    # Slack call hangs, the acknowledgement still goes, and a drain of all lanes started meanwhile
    # takes only the lane that is free.
    ingest(ctx, post("1", "hello, a question"), post("2", "another question", author="ben"))
    started, release = threading.Event(), threading.Event()
    acks: list[int] = []

    def slow_card(message: OutboxMessage) -> str:
        started.set()
        assert release.wait(10)
        return "ok"

    def ack(message: OutboxMessage) -> str:
        acks.append(message.id)
        return "ok"

    sender = OutboxSender(ctx, {"card": slow_card, "ack": ack})
    staff = threading.Thread(target=sender.send_due, kwargs={"lanes": (STAFF_LANE, REMINDER_LANE)})
    staff.start()
    try:
        assert started.wait(10)
        assert sender.send_due(lanes=(CUSTOMER_LANE,)).by_kind == {"ack": 2}
        ingest(ctx, post("3", "one more question", author="cy"))
        assert sender.send_due().by_kind == {"ack": 1}  # the staff lanes are busy: not the new card
        assert len(acks) == 3
    finally:
        release.set()
        staff.join(10)
    assert {row.status for row in rows(ctx)["card"]} == {"sent"}  # the staff drain went on
