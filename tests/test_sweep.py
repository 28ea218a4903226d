"""The sweep on a real database: the ladder climbed step by step, once each, stopped by an answer."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.flow.conversations import mark_answered
from bot.flow.sweep import apply_ladder, earliest_next_action, sweep
from storage import repo
from storage.models import OPEN, URGENCY, Conversation, Event, Outbox
from tests.conftest import MONDAY
from tests.test_ingest import ingest, post


def ladder_rows(ctx: AppContext) -> list[tuple[str, int]]:
    with ctx.sessions() as session:
        rows = session.scalars(
            select(Outbox)
            .where(Outbox.kind.in_(["warning", "breach", "nag", "escalation", "reassign"]))
            .order_by(Outbox.id)
        )
        return [(row.kind, int(row.payload["index"])) for row in rows]


def run_until(ctx: AppContext, clock: FakeClock, until: timedelta) -> None:
    """Jump the clock from one next_action_at to the next, sweeping each time (as the scheduler does)."""
    end = MONDAY + until
    while True:
        sweep(ctx)
        nxt = earliest_next_action(ctx)
        if nxt is None or nxt > end:
            clock.set(end)
            sweep(ctx)
            return
        clock.set(max(nxt, clock.now()))


def test_unanswered_urgent_post_climbs_the_whole_ladder(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "the site is down!"))  # urgent: 1 h, warn 75 %, escalate +10m/+30m, nag 20m
    run_until(ctx, clock, timedelta(hours=2))
    assert ladder_rows(ctx) == [
        ("warning", 0),
        ("breach", 0),
        ("escalation", 0),
        ("nag", 1),
        ("escalation", 1),
        ("nag", 2),
        ("nag", 3),
    ]
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert conversation.breached_at == MONDAY + timedelta(hours=1)
        lateness = [
            e.detail["lateness_seconds"] for e in session.scalars(select(Event).where(Event.actor == "sweep"))
        ]
    assert lateness and max(lateness) == 0  # the clock jumped exactly to each next_action_at


def test_an_answer_stops_the_ladder(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "the site is down!"))
    run_until(ctx, clock, timedelta(minutes=50))
    assert ladder_rows(ctx) == [("warning", 0)]
    with ctx.sessions() as session, session.begin():
        conversation = session.scalars(select(Conversation)).one()
        mark_answered(session, conversation, at=clock.now(), by="expert:sam", now=clock.now())
    run_until(ctx, clock, timedelta(hours=5))
    assert ladder_rows(ctx) == [("warning", 0)]
    assert earliest_next_action(ctx) is None


def test_sweeping_twice_at_the_same_moment_does_nothing_twice(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "the site is down!"))
    clock.advance(timedelta(hours=1, minutes=25))
    first = sweep(ctx)
    second = sweep(ctx)
    assert first.processed == 1 and second.processed == 0
    # A late sweep does what is due now in one go: no stale warning, the breach, one escalation, one nag.
    assert ladder_rows(ctx) == [("breach", 0), ("escalation", 0), ("nag", 1)]


def test_the_urgency_update_reads_the_batch_conversations_not_the_pending_outbox(
    ctx: AppContext, clock: FakeClock
) -> None:
    """A reassignment lends its urgency to the at-risk notice queued before it, found through
    ix_outbox_conversation_id: looking pending rows up in ix_outbox_status would read them all.
    (The ladder's notices lend nothing: they wait for no earlier row, storage.models.LANE_FREE_KINDS;
    a card update borrows nothing: no row waits for it, storage.models.HOLDS_NOTHING_BACK.)"""
    if ctx.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's query plan (PostgreSQL plans by its statistics)")
    # Billing, Maria, claim within 2 h: unclaimed after 2 h, each is offered to someone else.
    ingest(ctx, *(post(str(i), "refund for my invoice please", author=f"customer{i}") for i in range(20)))
    with ctx.sessions() as session, session.begin():
        repo.enqueue(
            session=session, kind="at_risk", key="at-risk-1", payload={}, conversation_id=1, now=MONDAY
        )
        repo.enqueue(
            session=session, kind="card_update", key="update-1", payload={}, conversation_id=1, now=MONDAY
        )
    clock.advance(timedelta(hours=2))
    sent: list[tuple[str, Any]] = []

    def capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        if statement.startswith("UPDATE outbox SET urgency"):
            sent.append((statement, parameters))

    event.listen(ctx.engine, "before_cursor_execute", capture)
    try:
        sweep(ctx)
    finally:
        event.remove(ctx.engine, "before_cursor_execute", capture)
    assert len(sent) == 1
    with ctx.engine.connect() as conn:
        plan = " ".join(
            str(row[3]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sent[0][0], sent[0][1])
        )
        urgencies = conn.execute(select(Outbox.kind, Outbox.urgency).order_by(Outbox.id)).all()
    assert "ix_outbox_conversation_id" in plan and "ix_outbox_status" not in plan, plan
    assert ("reassign", URGENCY["reassign"]) in urgencies
    assert ("at_risk", URGENCY["reassign"]) in urgencies  # lent by the reassignment behind it
    assert ("card_update", URGENCY["card_update"]) in urgencies  # holds nothing back: borrows nothing
    assert {urgency for kind, urgency in urgencies if kind == "card"} == {
        URGENCY["card"]
    }  # more urgent already


def test_unclaimed_business_item_is_reassigned(ctx: AppContext, clock: FakeClock) -> None:
    ingest(ctx, post("1", "refund for my invoice please"))  # billing, maria, claim_within 2 h
    clock.advance(timedelta(hours=2))
    sweep(ctx)
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        reassign = session.scalars(select(Outbox).where(Outbox.kind == "reassign")).one()
    assert conversation.owner == "lee"
    assert reassign.payload["previous_owner"] == "maria"
    assert conversation.next_action_at == MONDAY + timedelta(hours=4)  # 50 % warning of 8 business hours


def test_nags_wait_for_the_owner_while_escalation_goes_on(ctx: AppContext, clock: FakeClock) -> None:
    # Nina works 09:00-17:00 in New York. An urgent post at 22:00 UTC (17:00 New York) is due
    # at 23:00 UTC, long after she has left, and she is back at 14:00 UTC the next day.
    evening = MONDAY + timedelta(hours=14)
    clock.set(evening)
    ingest(ctx, post("1", "outage again", author="bigcustomer", at=evening))  # VIP -> urgent, care team
    with ctx.sessions() as session, session.begin():
        conversation = session.scalars(select(Conversation)).one()
        conversation.owner = "nina"  # as if claimed by Nina before she left
    run_until(ctx, clock, timedelta(hours=14 + 4))
    kinds = [kind for kind, _ in ladder_rows(ctx)]
    assert "escalation" in kinds and "breach" in kinds
    assert "nag" not in kinds  # Nina is off duty all night: no nag, the ladder escalated instead
    run_until(ctx, clock, timedelta(days=1, hours=6, minutes=30))  # Tuesday 14:30 UTC = 09:30 New York
    with ctx.sessions() as session:
        nags = session.scalars(select(Outbox).where(Outbox.kind == "nag").order_by(Outbox.id)).all()
    # The night's missed nags collapse into one at 09:00 New York; then every 20 minutes again.
    assert [(n.created_at, n.payload["owner"]) for n in nags] == [
        (MONDAY + timedelta(days=1, hours=6), "nina"),
        (MONDAY + timedelta(days=1, hours=6, minutes=20), "nina"),
    ]


Snapshot = dict[str, list[tuple[object, ...]]]


def snapshot_of(session: Session) -> Snapshot:
    """Everything the sweep writes, in write order, without the ids a rollback may not give back.

    A conversation's version is opaque (it only has to move when the row changes; the ORM bumped it
    twice for a reassignment, flushed once early), so only whether it moved is compared (bumped())."""
    return {
        "outbox": [
            (r.kind, r.conversation_id, r.idempotency_key, r.status, r.urgency, r.payload, r.created_at)
            for r in session.scalars(select(Outbox).order_by(Outbox.id))
        ],
        "events": [
            (e.conversation_id, e.at, e.actor, e.action, e.detail)
            for e in session.scalars(select(Event).order_by(Event.id))
        ],
        "conversations": [
            (
                c.id,
                c.owner,
                c.assigned_at,
                c.warnings_sent,
                c.escalation_step,
                c.nag_level,
                c.reassignments,
                c.breach_cycle,
                c.breached_at,
                c.next_action_at,
                c.version,
            )
            for c in session.scalars(select(Conversation).order_by(Conversation.id))
        ],
    }


def one_at_a_time(ctx: AppContext) -> Snapshot:
    """The reference: apply_ladder through the ORM for each due conversation in turn (the sweep
    before it worked set-wise), in a transaction that is rolled back; what it would have written."""
    now = ctx.clock.now()
    with ctx.sessions() as session:
        transaction = session.begin()
        due = session.scalars(
            select(Conversation)
            .where(Conversation.next_action_at <= now, Conversation.status == OPEN)
            .order_by(Conversation.next_action_at)
        ).all()
        for conversation in due:
            with session.begin_nested():
                apply_ladder(session, ctx, conversation, now)
        session.flush()
        session.expire_all()
        found = snapshot_of(session)
        transaction.rollback()
    return found


def bumped(before: Snapshot, after: Snapshot) -> Snapshot:
    """`after`, each conversation's version replaced by whether it moved since `before`."""
    versions = {row[0]: row[-1] for row in before["conversations"]}
    conversations = [
        (*row[:-1], cast(int, row[-1]) > cast(int, versions[row[0]])) for row in after["conversations"]
    ]
    return {**after, "conversations": conversations}


def test_set_wise_sweep_writes_what_one_conversation_at_a_time_did(ctx: AppContext, clock: FakeClock) -> None:
    # Urgent and classic posts in two teams, two unclaimed billing ones (reassigned in one batch:
    # the second sees the first's move in the load), pending cards and acknowledgements (which
    # urgent ladder rows lend their urgency to), small batches so a sweep spans several.
    ingest(
        ctx,
        post("1", "the site is down!"),
        post("2", "refund for my invoice please", author="bo"),
        post("3", "invoice wrong, refund?", author="cy"),
        post("4", "hello, a question", author="di"),
        post("5", "outage again", author="bigcustomer"),
    )
    for step in (30, 60, 60, 180, 360, 840, 60):
        clock.advance(timedelta(minutes=step))  # into the night, then a late sweep next morning
        with ctx.sessions() as session:
            before = snapshot_of(session)
        expected = bumped(before, one_at_a_time(ctx))
        result = sweep(ctx, batch_size=2)
        assert result.failed == 0
        with ctx.sessions() as session:
            found = bumped(before, snapshot_of(session))
        for table, rows in expected.items():
            assert len(found[table]) == len(rows), table
            for got, wanted in zip(found[table], rows, strict=True):
                assert got == wanted, table
    with ctx.sessions() as session:
        kinds = {row[0] for row in snapshot_of(session)["outbox"]}
    assert {"breach", "escalation", "nag", "reassign"} <= kinds


def test_a_failing_batch_write_falls_back_to_one_conversation_at_a_time(
    ctx: AppContext, clock: FakeClock
) -> None:
    ingest(
        ctx,
        post("1", "the site is down!"),
        post("2", "outage too", author="bo"),
        post("3", "down!", author="cy"),
    )
    with ctx.sessions() as session:
        bad = session.scalars(select(Conversation.id).order_by(Conversation.id)).all()[1]
    # A real database error for one conversation's audit rows: the batch's executemany fails.
    with ctx.engine.begin() as conn:
        if ctx.engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER boom BEFORE INSERT ON events WHEN NEW.conversation_id = {bad} "
                "AND NEW.actor = 'sweep' BEGIN SELECT RAISE(ABORT, 'boom'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.conversation_id = {bad} AND NEW.actor = 'sweep' THEN RAISE EXCEPTION 'boom'; END IF; "
                "RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER boom BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION boom()"
            )
    clock.advance(timedelta(hours=1, minutes=25))
    result = sweep(ctx)
    assert (result.processed, result.failed) == (2, 1)
    with ctx.sessions() as session:
        breached = session.scalars(
            select(Outbox.conversation_id).where(Outbox.kind == "breach").order_by(Outbox.conversation_id)
        ).all()
        retry_at = session.scalar(select(Conversation.next_action_at).where(Conversation.id == bad))
    assert bad not in breached and len(breached) == 2
    assert retry_at == clock.now() + timedelta(minutes=5)


def test_a_newer_nag_supersedes_the_unsent_one(ctx: AppContext, clock: FakeClock) -> None:
    """What is owed to a rate-limited channel stays bounded: one pending nag per conversation."""
    ingest(ctx, *(post(str(i), "the site is down!", author=f"customer{i}") for i in range(3)))
    run_until(ctx, clock, timedelta(hours=4))
    with ctx.sessions() as session:
        nags = session.scalars(select(Outbox).where(Outbox.kind == "nag").order_by(Outbox.id)).all()
    assert len(nags) > 3 * 3  # nags kept coming every 20 minutes for each conversation
    pending = [n for n in nags if n.status == "pending"]
    assert sorted(n.conversation_id for n in pending) == sorted({n.conversation_id for n in nags})
    for nag in pending:  # the newest of its conversation
        assert nag.id == max(n.id for n in nags if n.conversation_id == nag.conversation_id)
    retired = [n for n in nags if n.status == "retired"]
    assert len(retired) == len(nags) - 3
    assert {n.result for n in retired} == {"retired: superseded by a newer nag"}


def test_a_nag_written_one_at_a_time_supersedes_the_unsent_one(ctx: AppContext, clock: FakeClock) -> None:
    """The same through repo.enqueue (the one-at-a-time path)."""
    ingest(ctx, post("1", "the site is down!"))
    with ctx.sessions() as session, session.begin():
        conversation = session.scalars(select(Conversation)).one()
        for index in (1, 2):
            repo.enqueue(
                session=session,
                kind="nag",
                key=f"test-nag-{index}",
                payload={"conversation_id": conversation.id, "index": index},
                now=clock.now(),
                conversation_id=conversation.id,
            )
    with ctx.sessions() as session:
        nags = session.scalars(select(Outbox).where(Outbox.kind == "nag").order_by(Outbox.id)).all()
    assert [(n.payload["index"], n.status) for n in nags] == [(1, "retired"), (2, "pending")]
