"""Slack delivery on a real database, with the real slack_sdk WebClient against the Slack stand-in."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from slack_sdk import WebClient
from sqlalchemy import event, select, update

from bot.core.clock import FakeClock
from bot.demo.standin import DEFAULT_TOKEN, Message, SlackStandIn, SlackUser
from bot.flow import outbox as outbox_module
from bot.flow import staff
from bot.flow.context import AppContext
from bot.flow.conversations import mark_answered
from bot.flow.outbox import (
    STAFF_BATCH,
    STAFF_LANE,
    Defer,
    OutboxMessage,
    OutboxSender,
    Retry,
    keep_ahead,
    kept_ahead,
)
from bot.flow.sweep import earliest_next_action, sweep
from bot.slack.delivery import (
    CARD_METADATA_TYPE,
    FOLLOW_UP_METADATA_TYPE,
    OVERDUE_EVENT,
    OVERDUE_METADATA_TYPE,
    REMINDER_METADATA_TYPE,
    STORM_EVENT,
    SlackDelivery,
    SlackDeliveryError,
    slack_handlers,
)
from bot.slack.ids import ACTION_CLAIM, ACTION_REPLY
from bot.slack.pacing import Pacer
from storage import repo
from storage.models import Conversation, Event, Outbox, Post
from tests.conftest import MONDAY
from tests.test_ingest import ingest, post

CARE, BILLING, ALERTS = "C0CARE0001", "C0BILL0001", "C0ALERTS01"
MARIA, LEE, SAM, NINA = "U0MARIA01", "U0LEE0001", "U0SAM0001", "U0NINA001"
USERS = [
    SlackUser(MARIA, "Maria Keller", tz="Europe/Berlin"),
    SlackUser(LEE, "Lee Wong", tz="Europe/Berlin"),
    SlackUser(SAM, "Sam Okafor", tz="Europe/London"),
    SlackUser(NINA, "Nina Park", tz="America/New_York"),
]
NASTY = "I was charged twice on my invoice <!channel> <@U123> <http://evil.example|bank> & *now*"


class Crash(BaseException):
    """The process dies (not an Exception: nothing in the sender catches it)."""


@pytest.fixture
def slack() -> Iterator[SlackStandIn]:
    with SlackStandIn(channels={CARE: "care", BILLING: "billing", ALERTS: "alerts"}, users=USERS) as standin:
        yield standin
        assert standin.internal_errors == []


@pytest.fixture
def client(slack: SlackStandIn) -> WebClient:
    return WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)


def sender_for(ctx: AppContext, client: WebClient, **options: Any) -> OutboxSender:
    """The outbox sender with the Slack handlers (customer acknowledgements just succeed)."""
    return OutboxSender(
        ctx,
        {**slack_handlers(ctx, client, **options), "ack": lambda message: "ack sent"},
        staff_batch=STAFF_BATCH,
    )


def conversations(ctx: AppContext) -> list[Conversation]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Conversation).order_by(Conversation.id)))


def outbox(ctx: AppContext, kind: str) -> list[Outbox]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Outbox).where(Outbox.kind == kind).order_by(Outbox.id)))


def top_level(slack: SlackStandIn, channel: str) -> list[Message]:
    return [m for m in slack.messages(channel) if not m.is_reply]


def cards_in(slack: SlackStandIn, channel: str) -> list[Message]:
    """Top-level card messages (a card or a storm digest: metadata ``replyclock_card``) in `channel`."""
    return [
        m
        for m in top_level(slack, channel)
        if (m.data.get("metadata") or {}).get("event_type") == CARD_METADATA_TYPE
    ]


def notices_in(slack: SlackStandIn, channel: str, kind: str = "breach") -> list[tuple[int, float]]:
    """(conversation id, time posted) of every `kind` notice (breach, escalation, warning) in `channel`:
    a thread reply of its own, or a line of an overdue digest (its metadata lists them)."""
    pattern = re.compile(
        {
            "breach": r"^Deadline missed: #(\d+) ",
            "escalation": r"^Escalation: #(\d+) ",
            "warning": r"^#(\d+) is ",
        }[kind]
    )
    found: list[tuple[int, float]] = []
    for m in slack.messages(channel):
        metadata = m.data.get("metadata") or {}
        if metadata.get("event_type") == OVERDUE_METADATA_TYPE:
            found += [(int(cid), float(m.ts)) for cid in metadata["event_payload"].get(kind, [])]
            continue
        match = pattern.match(m.text)
        if match:
            found.append((int(match.group(1)), float(m.ts)))
    return found


def action_values(message: Message, action_id: str) -> list[str]:
    return [
        str(element.get("value"))
        for block in message.blocks
        if block.get("type") == "actions"
        for element in block["elements"]
        if element.get("action_id") == action_id
    ]


def enqueue(ctx: AppContext, row_kind: str, key: str, conversation_id: int, payload: dict[str, Any]) -> None:
    with ctx.sessions() as session, session.begin():
        repo.enqueue(
            session=session,
            kind=row_kind,
            key=key,
            payload={"conversation_id": conversation_id, **payload},
            conversation_id=conversation_id,
            now=MONDAY,
        )


def as_message(row: Outbox) -> OutboxMessage:
    return OutboxMessage(row.id, row.kind, row.conversation_id, dict(row.payload), row.idempotency_key, 1)


# ------------------------------------------------------------------------------------------------


def test_a_new_card_goes_to_the_team_channel_and_its_ts_is_stored(
    ctx: AppContext, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", NASTY))
    [before] = conversations(ctx)
    result = sender_for(ctx, client).send_due()
    assert (result.sent, result.retried, result.failed) == (2, 0, 0)
    [card] = slack.messages(BILLING)
    [after] = conversations(ctx)
    assert (after.slack_channel, after.slack_ts) == (BILLING, card.ts)
    assert after.version == before.version + 1
    assert card.mentions == (MARIA,)  # the proposed owner; nobody the customer named
    assert "&lt;!channel&gt; &lt;@U123&gt; &lt;http://evil.example|bank&gt; &amp;" in card.display_text
    assert "due in 8 h" in card.display_text
    assert action_values(card, ACTION_CLAIM) == [str(after.id)]
    call = slack.calls_to("chat.postMessage")[0]
    assert call.params["channel"] == "#billing"
    assert call.params["unfurl_links"] is False and call.params["parse"] == "none"
    assert call.params["metadata"]["event_payload"] == {"conversation_id": after.id}
    assert outbox(ctx, "card")[0].result == f"{BILLING} {card.ts}"


def test_a_ladder_run_threads_warnings_dms_nags_and_escalates(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "the site is down!"))  # urgent: 1 h, warn at 45 min, escalate +10 min, +30 min
    sender = sender_for(ctx, client)
    sender.send_due()
    end = MONDAY + timedelta(hours=2)
    while True:
        sweep(ctx)
        sender.send_due()
        wake = earliest_next_action(ctx)
        if wake is None or wake > end:
            break
        clock.set(max(wake, clock.now()))
    [conversation] = conversations(ctx)
    assert conversation.owner == "sam"
    assert all(row.status == "sent" for row in outbox(ctx, "nag") + outbox(ctx, "escalation"))

    card, *replies = slack.thread(CARE, str(conversation.slack_ts))
    assert len(top_level(slack, CARE)) == 1
    assert card.edits == 1 and "*Overdue*" in card.display_text  # the breach refreshed the card
    said = [reply.display_text for reply in replies]
    assert len(said) == 4, said
    assert "is due in 15 min" in said[0]
    assert said[1].startswith(":red_circle: *Deadline missed*")
    assert said[2].startswith(":rotating_light: *Escalation*") and "Can someone take it?" in said[2]
    assert replies[2].data.get("subtype") == "thread_broadcast"  # shown in the channel too
    assert "Escalated by DM to Lee Wong, the manager." in said[3]

    nags = slack.messages(SAM)
    assert [m.display_text.split("\n")[0][:26] for m in nags] == [":alarm_clock: Reminder: *#"] * 3
    assert all(action_values(m, ACTION_CLAIM) == [str(conversation.id)] for m in nags)
    [to_manager] = slack.messages(LEE)
    assert "Escalation* to you as manager for Customer Care" in to_manager.display_text
    assert action_values(to_manager, ACTION_CLAIM) == [str(conversation.id)]
    assert slack.calls_to("conversations.open")[0].params["users"] == SAM
    every = [m for channel in (CARE, SAM, LEE) for m in slack.messages(channel)]
    assert {uid for m in every for uid in m.mentions} <= {SAM}


def test_card_update_edits_the_same_message(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", NASTY))
    sender = sender_for(ctx, client)
    sender.send_due()
    clock.advance(timedelta(minutes=42))
    with ctx.sessions() as session, session.begin():
        conversation = session.scalars(select(Conversation)).one()
        mark_answered(session, conversation, at=clock.now(), by="expert:maria", now=clock.now())
    assert sender.send_due().sent == 1
    assert len(slack.calls_to("chat.postMessage")) == 1 and len(slack.calls_to("chat.update")) == 1
    [card] = slack.messages(BILLING)
    assert card.edits == 1
    assert "Answered by *Maria Keller* after 42 min (in time)" in card.display_text
    assert not action_values(card, ACTION_CLAIM)
    assert slack.calls_to("chat.update")[0].params["parse"] == "none"  # chat.update would re-parse otherwise


def test_a_card_retried_after_a_crash_is_not_posted_twice(
    ctx: AppContext, slack: SlackStandIn, client: WebClient
) -> None:
    handlers = slack_handlers(ctx, client)
    real_card = handlers["card"]

    def card_then_crash(message: OutboxMessage) -> str | None:
        real_card(message)  # posted to Slack and stored on the conversation...
        raise Crash  # ...and the process dies before the outbox row is marked sent

    ingest(ctx, post("1", "my invoice is wrong", thread="a"), account="blog")  # no acknowledgement
    with pytest.raises(Crash):
        OutboxSender(ctx, {**handlers, "card": card_then_crash}).send_due()
    assert outbox(ctx, "card")[0].status == "sending"
    restarted = OutboxSender(ctx, slack_handlers(ctx, client))
    assert restarted.recover(all_sending=True) == 1
    assert restarted.send_due().sent == 1
    assert len(slack.calls_to("chat.postMessage")) == 1
    assert len(slack.calls_to("chat.update")) == 1
    [card] = slack.messages(BILLING)
    assert outbox(ctx, "card")[0].result == f"updated {BILLING} {card.ts}"


def test_a_card_deleted_in_slack_is_posted_again_on_update(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "my invoice is wrong", thread="a"), account="blog")
    sender = sender_for(ctx, client)
    sender.send_due()
    [first] = conversations(ctx)
    slack.clear()  # the workspace lost the message (someone deleted it)
    enqueue(ctx, "card_update", "after-delete", first.id, {"reason": "claimed"})
    assert sender.send_due().sent == 1
    [card] = slack.messages(BILLING)
    [again] = conversations(ctx)
    assert again.slack_ts == card.ts and card.edits == 0  # a new message (the stand-in's ts restarted)
    assert slack.calls_to("chat.update")[0].error == "message_not_found"
    assert outbox(ctx, "card_update")[0].result == f"reposted {BILLING} {card.ts}"


def test_rate_limit_is_retried_after_retry_after_then_delivered(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "my invoice is wrong", thread="a"), account="blog")
    slack.fail_next("chat.postMessage", status=429, retry_after=7)
    with pytest.raises(Retry) as caught:
        slack_handlers(ctx, client)["card"](as_message(outbox(ctx, "card")[0]))
    assert caught.value.after == MONDAY + timedelta(seconds=7)

    slack.fail_next("chat.postMessage", status=429, retry_after=7)
    sender = sender_for(ctx, client)
    assert sender.send_due().deferred == 1  # Slack's "wait" is no failed attempt
    [row] = outbox(ctx, "card")
    assert row.status == "pending" and row.next_attempt_at == MONDAY + timedelta(seconds=7)
    assert row.attempts == 0
    assert "rate limit" in str(row.last_error) and "#billing" in str(row.last_error)
    assert slack.messages(BILLING) == []
    clock.advance(timedelta(seconds=6))
    assert sender.send_due().sent == 0  # not before Slack said
    clock.advance(timedelta(seconds=1))
    assert sender.send_due().sent == 1
    assert len(slack.messages(BILLING)) == 1


def test_server_errors_and_dropped_connections_are_retried(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "my invoice is wrong", thread="a"), account="blog")
    handler = slack_handlers(ctx, client)["card"]
    message = as_message(outbox(ctx, "card")[0])
    slack.fail_next("chat.postMessage", status=500, error="internal_error")
    with pytest.raises(Retry, match="HTTP 500"):
        handler(message)
    slack.fail_next("chat.postMessage", status=0, times=2)  # WebClient retries a dropped connection once
    with pytest.raises(Retry):
        handler(message)
    assert handler(message) == f"{BILLING} {slack.messages(BILLING)[0].ts}"


def test_channel_not_found_fails_clearly(
    ctx: AppContext, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ingest(ctx, post("1", "my invoice is wrong", thread="a"), account="blog")
    with SlackStandIn(channels={CARE: "care"}, users=USERS) as slack:  # no #billing
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        with pytest.raises(SlackDeliveryError) as caught:
            slack_handlers(ctx, client)["card"](as_message(outbox(ctx, "card")[0]))
        assert caught.value.code == "channel_not_found"
        assert "#billing" in str(caught.value) and "replyclock.toml" in str(caught.value)

        sender = OutboxSender(ctx, slack_handlers(ctx, client), max_attempts=2)
        with caplog.at_level(logging.ERROR, logger="replyclock.slack"):
            assert sender.send_due().retried == 1
            clock.advance(timedelta(hours=1))
            assert sender.send_due().failed == 1
    [row] = outbox(ctx, "card")
    assert row.status == "failed" and "channel_not_found" in str(row.last_error)
    refused = [r for r in caplog.records if r.getMessage() == "Slack refused the message"]
    assert refused and all(getattr(r, "channel", None) == "#billing" for r in refused)
    assert getattr(refused[0], "error", None) == "channel_not_found"


def test_a_storm_becomes_one_digest_message_that_is_every_conversation_card(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    posts = [
        post(str(i), "the site is down!" if i < 3 else f"a question, number {i}", author=f"user{i}")
        for i in range(14)
    ]
    ingest(ctx, *posts)  # 14 new conversations for Customer Care (#care), 3 urgent
    delivery = SlackDelivery(ctx, client, storm_threshold=5)
    sender = OutboxSender(ctx, {**delivery.handlers(), "ack": lambda message: "ack sent"})
    slack.fail_next("chat.postMessage", status=429, retry_after=1)  # Slack says "slow down" at first
    result = sender.send_due()
    assert result.failed == 0 and result.retried == 0
    assert top_level(slack, CARE) == []
    waiting = [row for row in outbox(ctx, "card") if row.status == "pending"]
    assert len(waiting) == 14 and all(row.attempts == 0 for row in waiting)

    clock.advance(timedelta(seconds=1))  # as Slack asked
    assert sender.send_due().by_kind.get("card") == 1  # one handler call posted all 14
    [digest] = top_level(slack, CARE)
    assert digest.text == "14 new mentions, 3 urgent"
    assert [m for m in slack.messages(CARE) if m.is_reply] == []  # no entries: ONE post for 14 cards
    assert len(slack.calls_to("chat.postMessage")) == 2  # the refused one, then the digest
    stored = conversations(ctx)
    assert {(c.slack_channel, c.slack_ts) for c in stored} == {(CARE, digest.ts)}
    claims = action_values_anywhere(digest, ACTION_CLAIM)
    assert sorted(claims) == sorted(str(c.id) for c in stored)  # a Claim button per conversation
    assert "a question, number 7" in digest.display_text and "&lt;" not in digest.text
    assert all(row.status == "sent" for row in outbox(ctx, "card"))
    with ctx.sessions() as session:
        assert len(list(session.scalars(select(Event).where(Event.action == STORM_EVENT)))) == 1

    # A change to one conversation edits the digest (all of them as they are now); its history
    # goes to the digest's thread.
    target = stored[5]
    with ctx.sessions() as session, session.begin():
        answered = session.get(Conversation, target.id)
        assert answered is not None
        mark_answered(session, answered, at=clock.now(), by="expert:sam", now=clock.now())
    enqueue(
        ctx,
        "delivery_unknown",
        "check-5",
        target.id,
        {"kind": "ack", "text": "Thanks @user5!", "error": "timeout"},
    )
    assert sender.send_due().sent == 2
    edited = slack.message(CARE, digest.ts)
    assert edited is not None and edited.edits == 1
    assert "Answered by" in edited.display_text and edited.text == "14 new mentions, 3 urgent"
    assert len(action_values_anywhere(edited, ACTION_CLAIM)) == 13  # the answered one has no button
    assert "CHECK BY HAND" in slack.messages(CARE)[-1].display_text
    assert slack.messages(CARE)[-1].thread_ts == digest.ts
    assert len(top_level(slack, CARE)) == 1


def action_values_anywhere(message: Message, action_id: str) -> list[str]:
    """Button values of `action_id` in actions blocks and section accessories."""
    found = action_values(message, action_id)
    for block in message.blocks:
        accessory = block.get("accessory") or {}
        if accessory.get("action_id") == action_id:
            found.append(str(accessory.get("value")))
    return found


def test_card_updates_of_a_digest_fold_into_one_edit(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, *(post(str(i), f"a question, number {i}", author=f"user{i}") for i in range(8)))
    sender = sender_for(ctx, client, storm_threshold=5)
    sender.send_due()
    [digest] = top_level(slack, CARE)
    with ctx.sessions() as session, session.begin():
        for conversation in session.scalars(select(Conversation)):
            mark_answered(session, conversation, at=clock.now(), by="expert:sam", now=clock.now())
    assert len([r for r in outbox(ctx, "card_update") if r.status == "pending"]) == 8
    sender.send_due()
    assert len(slack.calls_to("chat.update")) == 1  # one edit showed all eight answers
    updates = outbox(ctx, "card_update")
    assert sorted(r.status for r in updates) == ["sent"] * 8  # claimed in one batch: folded in, sent
    assert sum(1 for r in updates if r.result and "edited for them all" in r.result) == 7
    edited = slack.message(CARE, digest.ts)
    assert edited is not None and edited.display_text.count("Answered by") == 8


def test_a_few_cards_are_not_a_storm(ctx: AppContext, slack: SlackStandIn, client: WebClient) -> None:
    ingest(ctx, *[post(str(i), f"question {i}", author=f"user{i}") for i in range(5)])
    sender_for(ctx, client, storm_threshold=5).send_due()
    assert len(top_level(slack, CARE)) == 5 and not [m for m in slack.messages(CARE) if m.is_reply]


def test_an_owner_off_duty_is_named_in_the_thread_not_woken(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "my invoice is wrong", thread="a"), account="blog")
    sender = sender_for(ctx, client)
    sender.send_due()
    [conversation] = conversations(ctx)
    assert conversation.owner == "maria"
    clock.set(datetime.fromisoformat("2026-11-23T22:00:00+00:00"))  # 23:00 in Berlin
    enqueue(ctx, "escalation", "owner-night", conversation.id, {"notify": "owner", "owner": "maria"})
    assert sender.send_due().sent == 1
    assert slack.messages(MARIA) == [] and not slack.calls_to("conversations.open")
    note = slack.messages(BILLING)[-1]
    assert note.is_reply and MARIA not in note.mentions
    assert "*Maria Keller* (off duty)" not in note.display_text and "They are off duty" in note.display_text

    clock.set(datetime.fromisoformat("2026-11-24T09:00:00+00:00"))  # 10:00 in Berlin
    enqueue(ctx, "escalation", "owner-day", conversation.id, {"notify": "owner", "owner": "maria"})
    assert sender.send_due().sent == 1
    [dm] = slack.messages(MARIA)
    assert "Please answer it now" in dm.display_text


def test_thread_messages_wait_for_the_card_and_skip_answered_conversations(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "my invoice is wrong", thread="a"), account="blog")
    [conversation] = conversations(ctx)
    enqueue(ctx, "card_update", "early", conversation.id, {"reason": "answered"})
    handlers = slack_handlers(ctx, client)
    with pytest.raises(Retry, match="not posted yet"):
        handlers["card_update"](as_message(outbox(ctx, "card_update")[0]))
    ingest(ctx, post("2", "also <!here> please", thread="a"), account="blog")  # the customer writes again
    sender_for(ctx, client).send_due()
    _card, again = slack.thread(BILLING, str(conversations(ctx)[0].slack_ts))
    assert "wrote again" in again.display_text and "&lt;!here&gt;" in again.display_text
    assert again.mentions == (MARIA,)

    with ctx.sessions() as session, session.begin():
        found = session.get(Conversation, conversation.id)
        assert found is not None
        mark_answered(session, found, at=clock.now(), by="expert:maria", now=clock.now())
    enqueue(ctx, "nag", "late-nag", conversation.id, {"owner": "maria"})
    sender_for(ctx, client).send_due()
    assert outbox(ctx, "nag")[0].result == "skipped: conversation is answered"
    assert slack.messages(MARIA) == []


def test_admin_alerts_go_to_the_admin_channel(
    ctx: AppContext, slack: SlackStandIn, client: WebClient
) -> None:
    handler = slack_handlers(ctx, client)["admin_alert"]
    alert = OutboxMessage(
        1,
        "admin_alert",
        None,
        {"account": "social", "text": "credentials <!here> refused", "channel": "#alerts"},
        "k",
        1,
    )
    assert str(handler(alert)).startswith(ALERTS)
    [posted] = slack.messages(ALERTS)
    assert "replyclock alert* (social): credentials &lt;!here&gt; refused" in posted.display_text
    nowhere = OutboxMessage(2, "admin_alert", None, {"text": "x", "channel": None}, "k2", 1)
    assert handler(nowhere) == "skipped: no admin channel"  # the test policy has no admin_channel


# ------------------------------------------------------------------------------------------------
# Slack's published limits: the stand-in enforces them, the sender paces itself


def test_a_paced_storm_in_one_channel_gets_no_429_keeps_breaches_first_and_other_channels_going(
    ctx: AppContext, clock: FakeClock
) -> None:
    def seconds() -> float:
        return clock.now().timestamp()

    with SlackStandIn(
        channels={CARE: "care", BILLING: "billing"},
        users=USERS,
        clock=seconds,
        rate_limits=True,
        limit_clock=seconds,
    ) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        sender = sender_for(ctx, client, storm_threshold=10**9, pacer=Pacer(clock.now))
        # Two urgent conversations in #care with their cards out; their deadline (1 h) passes...
        ingest(ctx, *[post(f"u{i}", "the site is down!", author=f"u{i}") for i in range(2)])
        assert sender.send_due().sent == 4
        clock.set(MONDAY + timedelta(minutes=61))
        # ... just as a storm of 20 new posts reaches #care, and one billing post comes in.
        storm_at = clock.now()
        ingest(
            ctx, *[post(f"s{i}", f"a question, number {i}", author=f"s{i}", at=storm_at) for i in range(20)]
        )
        ingest(ctx, post("b1", "I was charged twice on my invoice", author="payer", at=storm_at))
        sweep(ctx)
        deferred = 0
        for _ in range(400):  # the sender comes round every 0.25 s
            result = sender.send_due()
            deferred += result.deferred
            with ctx.sessions() as session:
                if not session.scalars(select(Outbox).where(Outbox.status != "sent")).first():
                    break
            clock.advance(timedelta(seconds=0.25))
        took = (clock.now() - storm_at).total_seconds()
        assert slack.internal_errors == []

    statuses = [call.status for call in slack.calls]
    assert statuses.count(429) == 0
    # Waiting cards were spread over the next free slots, not re-tried all at every slot.
    assert 0 < deferred <= 2 * 20
    # Every message arrived exactly once: one card per conversation, one breach per urgent one.
    cards = cards_in(slack, CARE)
    assert len(cards) == 22 and len({m.ts for m in cards}) == 22
    assert sorted(str(c.slack_ts) for c in conversations(ctx) if c.slack_channel == CARE) == sorted(
        m.ts for m in cards
    )
    breaches = notices_in(slack, CARE)
    assert len(breaches) == 2 and len({cid for cid, _ in breaches}) == 2
    # The breach notices went first: within a second of the storm, before any of its cards.
    storm_cards = [m for m in cards if float(m.ts) >= storm_at.timestamp()]
    assert len(storm_cards) == 20
    assert max(ts for _, ts in breaches) - storm_at.timestamp() <= 1.0
    assert max(ts for _, ts in breaches) < min(float(m.ts) for m in storm_cards)
    # #care's storm took Slack's pace (about 1 s a card after a short burst) ...
    assert 15 <= took <= 30
    # ... while #billing was not held back by it.
    [billing_card] = top_level(slack, BILLING)
    assert float(billing_card.ts) - storm_at.timestamp() <= 0.5


def test_a_429_despite_the_pace_closes_the_channel_until_retry_after(
    ctx: AppContext, clock: FakeClock
) -> None:
    def seconds() -> float:
        return clock.now().timestamp()

    with SlackStandIn(channels={CARE: "care"}, users=USERS, rate_limits=True, limit_clock=seconds) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        sender = sender_for(ctx, client, storm_threshold=10**9, pacer=Pacer(clock.now))
        ingest(ctx, *[post(f"s{i}", f"a question, number {i}", author=f"s{i}") for i in range(8)])
        # Another process (its own pacer knows nothing of ours) posts into #care first.
        other = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        for n in range(4):
            other.chat_postMessage(channel=CARE, text=f"someone else {n}")
        result = sender.send_due()
        # One 429 for our first card; its Retry-After closes #care to the pacer, so the other
        # cards wait without calling Slack at all.
        assert (result.sent, result.by_kind, result.retried, result.deferred) == (8, {"ack": 8}, 0, 8)
        limited = [call for call in slack.calls_to("chat.postMessage") if call.status == 429]
        assert len(limited) == 1
        clock.advance(timedelta(seconds=1))
        for _ in range(80):
            sender.send_due()
            clock.advance(timedelta(seconds=0.25))
        assert len([call for call in slack.calls_to("chat.postMessage") if call.status == 429]) == 1
        assert len(cards_in(slack, CARE)) == 8


def test_a_storm_digest_keeps_the_pace(ctx: AppContext, clock: FakeClock) -> None:
    def seconds() -> float:
        return clock.now().timestamp()

    with SlackStandIn(channels={CARE: "care"}, users=USERS, rate_limits=True, limit_clock=seconds) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        sender = sender_for(ctx, client, pacer=Pacer(clock.now))  # storms summarised (threshold 5)
        ingest(ctx, *[post(str(i), f"a question, number {i}", author=f"user{i}") for i in range(60)])
        for _ in range(120):
            sender.send_due()
            if all(row.status == "sent" for row in outbox(ctx, "card")):
                break
            clock.advance(timedelta(seconds=0.25))
        took = (clock.now() - MONDAY).total_seconds()
        assert [call.status for call in slack.calls].count(429) == 0
        digests = top_level(slack, CARE)
        assert len(digests) == 2  # 60 conversations: 49 in the first digest, 11 in the second
        assert sorted(d.text for d in digests) == ["11 new mentions, 0 urgent", "49 new mentions, 0 urgent"]
        assert {str(c.slack_ts) for c in conversations(ctx)} == {d.ts for d in digests}
        assert took <= 2  # two posts, within the burst


# ------------------------------------------------------------------------------------------------
# Overdue digests: breach and escalation notices due together in one channel are one message


@contextmanager
def paced_standin(clock: FakeClock) -> Iterator[SlackStandIn]:
    """The Slack stand-in with `#care`, enforcing Slack's limits on the test's fake time."""

    def seconds() -> float:
        return clock.now().timestamp()

    with SlackStandIn(
        channels={CARE: "care"}, users=USERS, clock=seconds, rate_limits=True, limit_clock=seconds
    ) as slack:
        yield slack


def assert_inert(posted: dict[str, Any], shown: Message) -> None:
    """NASTY's text, as a digest carried it: no <!channel> anywhere in what Slack got (text and
    blocks), escaped in what Slack shows."""
    assert not [
        s
        for s in _strings({"text": posted["text"], "blocks": posted["blocks"]})
        if re.search(r"<!(channel|here|everyone)", s)
    ]
    assert (
        "&lt;!channel&gt;" in shown.display_text and "&lt;http://evil.example|bank&gt;" in shown.display_text
    )


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_breach_and_escalation_notices_due_together_are_one_overdue_digest(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    # Three urgent conversations for #care (1 h, warn at 45 min, escalate to the channel at +10 min);
    # one customer calls themself <!channel> and writes mrkdwn.
    ingest(
        ctx,
        post("1", f"the site is down! {NASTY}", author="<!channel>"),
        *[post(str(i), "the site is down!", author=f"user{i}") for i in (2, 3)],
    )
    sender = sender_for(ctx, client)
    sender.send_due()
    assert len(cards_in(slack, CARE)) == 3  # three cards (not a storm)
    clock.set(MONDAY + timedelta(minutes=46))
    sweep(ctx)
    sender.send_due()  # the three warnings, due together: one message too
    assert top_level(slack, CARE)[-1].text == "3 conversations due soon: 3 due soon"
    assert sorted(cid for cid, _ in notices_in(slack, CARE, "warning")) == [c.id for c in conversations(ctx)]
    clock.set(MONDAY + timedelta(minutes=61))
    sweep(ctx)
    assert len([r for r in outbox(ctx, "breach") if r.status == "pending"]) == 3
    result = sender.send_due()
    assert result.failed == 0 and result.retried == 0
    digest = top_level(slack, CARE)[-1]
    ids = [c.id for c in conversations(ctx)]
    assert digest.data["metadata"] == {
        "event_type": OVERDUE_METADATA_TYPE,
        "event_payload": {"breach": ids, "escalation": [], "warning": []},
    }
    assert digest.text == "3 conversations overdue: 3 deadlines missed"
    assert not [m for m in slack.messages(CARE) if m.is_reply and "Deadline missed" in m.text]
    # Customer text is inert: no <!channel> anywhere in what Slack got, escaped in what it shows.
    assert_inert(slack.calls_to("chat.postMessage")[-1].params, digest)
    # The owners are pinged as the single notice would (Sam is always on duty; Nina not at 09:01 UTC).
    owners = {c.owner for c in conversations(ctx)}
    assert set(digest.mentions) == {{"sam": SAM, "nina": NINA}[o] for o in owners if o == "sam"}
    # Every notice recorded as delivered: the rows sent, an audit event per conversation, the
    # cards' edits queued (they show it overdue).
    breaches = outbox(ctx, "breach")
    assert [r.status for r in breaches] == ["sent"] * 3
    assert all(str(r.result).startswith(f"overdue digest {CARE} {digest.ts}") for r in breaches)
    with ctx.sessions() as session:
        events = list(session.scalars(select(Event).where(Event.action == OVERDUE_EVENT)))
    assert sorted(e.conversation_id for e in events) == sorted(ids * 2)  # the warnings' digest, this one
    assert sorted(e.conversation_id for e in events if e.detail["ts"] == digest.ts) == ids
    assert all(e.detail["kinds"] == ["breach"] for e in events if e.detail["ts"] == digest.ts)
    sender.send_due()
    assert all("overdue" in slack.message(CARE, c.ts).display_text for c in cards_in(slack, CARE))  # type: ignore[union-attr]

    # Ten minutes later the three escalations to the team channel: one message again.
    clock.set(MONDAY + timedelta(minutes=71))
    sweep(ctx)
    sender.send_due()
    escalations = notices_in(slack, CARE, "escalation")
    assert sorted(cid for cid, _ in escalations) == ids and len({ts for _, ts in escalations}) == 1
    assert top_level(slack, CARE)[-1].text == "3 conversations overdue: 3 escalations"
    assert len(top_level(slack, CARE)) == 6  # three cards, three digests


def test_a_lone_breach_still_goes_to_its_cards_thread(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "the site is down!"))
    sender = sender_for(ctx, client)
    sender.send_due()
    clock.set(MONDAY + timedelta(minutes=61))
    sweep(ctx)
    sender.send_due()
    [card] = cards_in(slack, CARE)
    assert [m.text.split(":")[0] for m in slack.thread(CARE, card.ts)[1:]] == ["Deadline missed"]
    assert len(top_level(slack, CARE)) == 1


def test_in_a_paced_storm_no_breach_notice_waits_behind_a_card_or_a_nag(
    ctx: AppContext, clock: FakeClock
) -> None:
    with paced_standin(clock) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        sender = sender_for(ctx, client, storm_threshold=10**9, pacer=Pacer(clock.now))

        def drain(steps: int = 400) -> None:
            for _ in range(steps):  # the sender comes round every 0.25 s
                sender.send_due()
                with ctx.sessions() as session:
                    if not session.scalars(
                        select(Outbox).where(Outbox.status.in_(("pending", "sending")))
                    ).first():
                        return
                clock.advance(timedelta(seconds=0.25))

        # Six urgent conversations in #care, and three ordinary ones nobody owns (their nags go to
        # #care's threads); all cards out, then the urgent ones' warnings.
        ingest(ctx, *[post(f"u{i}", "the site is down!", author=f"u{i}") for i in range(6)])
        ingest(ctx, *[post(f"q{i}", f"a question, number {i}", author=f"q{i}") for i in range(3)])
        with ctx.sessions() as session, session.begin():
            unowned = list(session.scalars(select(Conversation).where(Conversation.priority != "urgent")))
            for conversation in unowned:
                conversation.owner = None
        drain()
        clock.set(MONDAY + timedelta(minutes=46))
        sweep(ctx)
        drain()
        # The deadline passes just as a storm of 30 new posts reaches #care and three nags are due.
        clock.set(MONDAY + timedelta(minutes=61))
        storm_at = clock.now()
        ingest(ctx, *[post(f"s{i}", f"another question {i}", author=f"s{i}", at=storm_at) for i in range(30)])
        for conversation in unowned:
            enqueue(ctx, "nag", f"nag-{conversation.id}", conversation.id, {"owner": None})
        sweep(ctx)
        drain()
        assert slack.internal_errors == []
        assert [call.status for call in slack.calls].count(429) == 0
        breaches = notices_in(slack, CARE)
        assert sorted(cid for cid, _ in breaches) == sorted(
            c.id for c in conversations(ctx) if c.priority == "urgent"
        )
        last_breach = max(ts for _, ts in breaches)
        assert last_breach - storm_at.timestamp() <= 1.0
        after = [float(m.ts) for m in slack.messages(CARE) if float(m.ts) >= storm_at.timestamp()]
        cards = [float(m.ts) for m in cards_in(slack, CARE) if float(m.ts) >= storm_at.timestamp()]
        nags = [float(m.ts) for m in slack.messages(CARE) if m.text.startswith("Reminder:")]
        assert len(cards) == 30 and len(nags) == 3
        assert last_breach < min(cards + nags)  # none waited behind a card or a nag
        assert len({ts for _, ts in breaches}) == 1  # six notices, one post
        assert len(after) == 1 + 30 + 3


def _own(ctx: AppContext, owners: dict[int, str]) -> None:
    with ctx.sessions() as session, session.begin():
        for conversation in session.scalars(select(Conversation)):
            conversation.owner = owners.get(conversation.id, conversation.owner)


def test_nags_for_one_person_due_together_are_one_reminder_dm(
    ctx: AppContext, slack: SlackStandIn, client: WebClient
) -> None:
    # Four conversations in #care: three Sam's (one customer writes mrkdwn and calls themself
    # <!channel>), one Nina's. Their cards have not gone out: a reminder by DM needs none.
    ingest(
        ctx,
        post("1", f"a question {NASTY}", author="<!channel>"),
        *[post(str(i), f"a question, number {i}", author=f"q{i}") for i in (2, 3, 4)],
    )
    ids = [c.id for c in conversations(ctx)]
    _own(ctx, {ids[0]: "sam", ids[1]: "sam", ids[2]: "sam", ids[3]: "nina"})
    for cid in ids:
        enqueue(ctx, "nag", f"nag-{cid}", cid, {"owner": "sam" if cid != ids[3] else "nina"})
    sender = OutboxSender(
        ctx,
        {**slack_handlers(ctx, client), "card": lambda m: None, "ack": lambda m: "ack sent"},
        staff_batch=STAFF_BATCH,
    )  # the cards wait (a handler that sends nothing)
    result = sender.send_due()
    assert result.failed == 0 and result.retried == 0

    [digest] = slack.messages(SAM)
    assert digest.text == "Reminder: 3 conversations are waiting for your answer"
    assert digest.data["metadata"] == {
        "event_type": REMINDER_METADATA_TYPE,
        "event_payload": {"nag": ids[:3]},
    }
    replies = [
        str(block["accessory"]["value"])
        for block in digest.blocks
        if block.get("accessory", {}).get("action_id") == ACTION_REPLY
    ]
    assert replies == [str(cid) for cid in ids[:3]]
    assert_inert(
        next(
            c.params for c in slack.calls_to("chat.postMessage") if c.params.get("channel") == digest.channel
        ),
        digest,
    )
    assert not digest.mentions
    [alone] = slack.messages(NINA)  # Nina's one nag goes alone, as always, with the card's buttons
    assert alone.text.startswith(f"Reminder: #{ids[3]} ")
    assert action_values(alone, ACTION_CLAIM) == [str(ids[3])]
    nags = {row.conversation_id: row for row in outbox(ctx, "nag")}
    assert all(nags[cid].status == "sent" for cid in ids)
    assert {str(nags[cid].result) for cid in ids[:3]} == {f"reminder digest {digest.channel} {digest.ts}"}
    assert str(nags[ids[3]].result).startswith("dm ")
    assert [row.status for row in outbox(ctx, "card")] == ["sent"] * 4


def test_nags_for_one_person_keep_within_two_seconds_at_slacks_pace(
    ctx: AppContext, clock: FakeClock
) -> None:
    """Slack allows a DM about one post a second: a nag every 0.25 s for the same person goes
    out within 2 s of being due, the ones put off by the pace together, with no 429."""

    with paced_standin(clock) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        sender = sender_for(ctx, client, pacer=Pacer(clock.now))
        ingest(ctx, *[post(f"q{i}", f"a question, number {i}", author=f"q{i}") for i in range(24)])
        ids = [c.id for c in conversations(ctx)]
        _own(ctx, dict.fromkeys(ids, "sam"))
        start = clock.now()
        due: dict[int, datetime] = {}
        for tick in range(40):  # 10 s; a new nag each of the first 24 ticks
            if tick < len(ids):
                due[ids[tick]] = clock.now()
                with ctx.sessions() as session, session.begin():
                    repo.enqueue(
                        session=session,
                        kind="nag",
                        key=f"nag-{ids[tick]}",
                        payload={"conversation_id": ids[tick], "owner": "sam"},
                        conversation_id=ids[tick],
                        now=clock.now(),
                    )
            sender.send_due()
            clock.advance(timedelta(seconds=0.25))
        assert slack.internal_errors == []
        assert [call.status for call in slack.calls].count(429) == 0
        dms = slack.messages(SAM)
        sent_at: dict[int, float] = {}
        for m in dms:
            listed = (m.data.get("metadata") or {}).get("event_payload", {}).get("nag")
            for cid in listed or [int(re.match(r"^Reminder: #(\d+) ", m.text).group(1))]:  # type: ignore[union-attr]
                assert cid not in sent_at, f"#{cid} reminded twice"
                sent_at[int(cid)] = float(m.ts)
        assert sorted(sent_at) == ids
        late = [sent_at[cid] - due[cid].timestamp() for cid in ids]
        assert max(late) < 2.0, late
        assert len(dms) < len(ids) / 2  # together, not one each
        assert float(dms[-1].ts) - start.timestamp() < 24 * 0.25 + 2


def test_a_breach_whose_card_is_not_posted_yet_does_not_wait_for_it(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "the site is down!"))  # urgent: 1 h
    [conversation] = conversations(ctx)
    clock.set(MONDAY + timedelta(minutes=61))
    sweep(ctx)

    def busy(message: OutboxMessage) -> str:  # the card cannot go yet (its channel's pace, say)
        raise Defer("not yet", after=clock.now() + timedelta(hours=1))

    handlers = slack_handlers(ctx, client)
    sender = OutboxSender(
        ctx, {**handlers, "card": busy, "ack": lambda m: "ack sent"}, staff_batch=STAFF_BATCH
    )
    sender.send_due()
    [notice] = top_level(slack, CARE)  # the breach, top-level: there is no thread to put it in
    assert notice.data["metadata"]["event_type"] == OVERDUE_METADATA_TYPE
    assert notice.data["metadata"]["event_payload"]["breach"] == [conversation.id]
    assert notice.text == "1 conversation overdue: 1 deadline missed"
    assert [row.status for row in outbox(ctx, "breach")] == ["sent"]
    assert [row.status for row in outbox(ctx, "card")] == ["pending"]
    # The card, when it goes, shows the conversation overdue.
    clock.advance(timedelta(hours=1))
    OutboxSender(ctx, {**handlers, "ack": lambda m: "ack sent"}).send_due(lanes=(STAFF_LANE,))
    [card] = cards_in(slack, CARE)
    assert "*Overdue*" in card.display_text


def test_one_reminder_dm_carries_all_of_a_persons_due_nags(
    ctx: AppContext, slack: SlackStandIn, client: WebClient
) -> None:
    # 60 overdue conversations of Sam's, a nag each: one DM shows 48 and says how many more.
    ingest(ctx, *[post(f"q{i}", f"a question, number {i}", author=f"q{i}") for i in range(60)])
    ids = [c.id for c in conversations(ctx)]
    _own(ctx, dict.fromkeys(ids, "sam"))
    for cid in ids:
        enqueue(ctx, "nag", f"nag-{cid}", cid, {"owner": "sam"})
    sender = OutboxSender(
        ctx,
        {**slack_handlers(ctx, client), "card": lambda m: None, "ack": lambda m: "ack sent"},
        staff_batch=STAFF_BATCH,
    )
    sender.send_due()
    [digest] = slack.messages(SAM)
    assert digest.text == "Reminder: 60 conversations are waiting for your answer"
    assert sorted(digest.data["metadata"]["event_payload"]["nag"]) == ids
    lines = [block for block in digest.blocks if block.get("accessory", {}).get("action_id") == ACTION_REPLY]
    assert len(lines) == 48 and len(digest.blocks) == 50  # the headline, 48 lines, how many more
    assert "and 12 more conversations waiting for you" in digest.display_text
    assert {row.status for row in outbox(ctx, "nag")} == {"sent"}


def test_a_new_cards_storm_check_reads_the_storm_events_index_not_the_audit_trail(
    ctx: AppContext, slack: SlackStandIn, client: WebClient
) -> None:
    if ctx.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's query plan (PostgreSQL plans by its statistics)")
    ingest(ctx, post("1", "a question"))
    statements: list[tuple[str, Any]] = []

    def capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        if "'slack_storm'" in statement and statement.lstrip().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(ctx.engine, "before_cursor_execute", capture)
    try:
        sender_for(ctx, client).send_due()
    finally:
        event.remove(ctx.engine, "before_cursor_execute", capture)
    assert cards_in(slack, CARE) and statements
    with ctx.engine.connect() as conn:
        plan = " ".join(
            str(row[3])
            for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statements[0][0], statements[0][1])
        )
    assert "ix_events_storm" in plan and "SCAN events" not in plan, plan


def test_loading_a_digests_conversations_together_reads_what_each_one_needs(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    """`_load_many` (three statements for a digest's conversations, in the order asked) gives each
    conversation with its first customer post, its team's time zone, and its card's storm parent
    and digest list; `_load` (one of them) shows the post it is asked for."""
    ingest(ctx, *(post(str(i), f"a question, number {i}", author=f"user{i}") for i in range(8)))
    delivery = SlackDelivery(ctx, client, storm_threshold=5)
    OutboxSender(ctx, {**delivery.handlers(), "ack": lambda message: "ack sent"}).send_due()
    clock.advance(timedelta(minutes=1))
    ingest(ctx, post("later", "one more question", author="late"))  # a card of its own, no digest
    OutboxSender(ctx, {**delivery.handlers(), "ack": lambda message: "ack sent"}).send_due()
    ingest(ctx, post("follow", "and another thing", author="user3"))  # a second post in one of them
    stored = conversations(ctx)
    ids = [c.id for c in stored]
    assert len(ids) == 9
    [digest] = [m for m in top_level(slack, CARE) if m.ts == stored[0].slack_ts]
    with ctx.sessions() as session:
        first_post = {
            c.id: session.scalars(
                select(Post)
                .where(Post.conversation_id == c.id, Post.direction == "in")
                .order_by(Post.posted_at, Post.id)
            ).first()
            for c in stored
        }
    expected = [
        (
            c.id,
            c.slack_ts,
            first_post[c.id].id,  # type: ignore[union-attr]
            ctx.calendar(ctx.policy.teams[c.team].calendar).tz.key,
            None,
            frozenset(ids[:8]) if c.slack_ts == digest.ts else frozenset(),
        )
        for c in reversed(stored)
    ]
    with ctx.sessions() as session:
        together = [
            (
                m.conversation.id,
                m.conversation.slack_ts,
                m.post.id if m.post else None,
                m.tz.key,
                m.card_parent_ts,
                frozenset(m.card_digest),
            )
            for m in delivery._load_many(session, list(reversed(ids)))
        ]
    assert together == expected
    assert "and another thing" not in {p.text for p in first_post.values() if p is not None}
    with ctx.sessions() as session:
        [follow] = session.scalars(select(Post).where(Post.text == "and another thing"))
        shown = delivery._load(session, ids[3], post_id=follow.id)
        assert shown.post is not None and shown.post.id == follow.id
        assert delivery._load(session, ids[3]).post is not None
        assert delivery._load(session, ids[3]).post.id == first_post[ids[3]].id  # type: ignore[union-attr]
    with ctx.sessions() as session, pytest.raises(SlackDeliveryError):
        delivery._load_many(session, [ids[0], 10**9])


def test_follow_ups_in_a_storm_digests_thread_are_one_reply(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    """Customers of one storm digest who write again get ONE reply in the digest's thread (a line
    each, their words escaped, in order), not a reply each at Slack's one post a second; a card
    update still unsent holds none of them back; a conversation with a card of its own still gets
    its own reply."""
    ingest(ctx, *(post(str(i), f"a question, number {i}", author=f"user{i}") for i in range(8)))
    sender = sender_for(ctx, client, storm_threshold=5)
    sender.send_due()
    [digest] = top_level(slack, CARE)
    stored = conversations(ctx)
    # Card edits queued for three of them (a breach would queue these), put off by chat.update's
    # pace (50 a minute for the whole workspace).
    for c in stored[:3]:
        enqueue(ctx, "card_update", f"edit-{c.id}", c.id, {"reason": "overdue"})
    with ctx.sessions() as session, session.begin():
        session.execute(
            update(Outbox)
            .where(Outbox.kind == "card_update")
            .values(next_attempt_at=clock.now() + timedelta(hours=1))
        )
    clock.advance(timedelta(minutes=1))
    ingest(ctx, post("lone", "my own question", author="lone"))
    sender.send_due()  # the lone conversation's card: a card of its own
    clock.advance(timedelta(minutes=1))
    follow_ups = [post("f0", "still <!channel> waiting", author="user0")]
    follow_ups += [post(f"f{i}", f"any news on {i}?", author=f"user{i}") for i in (2, 5, 6)]
    follow_ups.append(post("f2b", "hello again", author="user2"))
    follow_ups.append(post("lone2", "me again", author="lone"))
    ingest(ctx, *follow_ups)
    assert len([r for r in outbox(ctx, "thread_post") if r.status == "pending"]) == 6
    calls = len(slack.calls_to("chat.postMessage"))
    sender.send_due()
    replies = [m for m in slack.messages(CARE) if m.is_reply and m.thread_ts == digest.ts]
    assert len(replies) == 1
    [reply] = replies
    assert reply.text == "4 customers wrote again"
    shown = reply.display_text
    assert "&lt;!channel&gt;" in shown and "<!channel>" not in shown
    assert shown.index("any news on 2?") < shown.index("hello again")  # in the order written
    metadata = reply.data["metadata"]
    assert metadata["event_type"] == FOLLOW_UP_METADATA_TYPE
    ids = [c.id for c in stored]  # in the order of their first posts: user0 .. user7
    assert sorted(metadata["event_payload"]["thread_post"]) == sorted(
        [ids[0], ids[2], ids[2], ids[5], ids[6]]
    )
    [lone] = [c for c in conversations(ctx) if c.id not in ids]
    [_card, own] = slack.thread(CARE, str(lone.slack_ts))
    assert "me again" in own.display_text
    assert len(slack.calls_to("chat.postMessage")) == calls + 2  # the digest's reply, the lone one
    assert all(r.status == "sent" for r in outbox(ctx, "thread_post"))
    assert [r.status for r in outbox(ctx, "card_update")] == ["pending"] * 3  # held nothing back
    # Alone, too: the only follow-up due is of a conversation whose card edit waits.
    ingest(ctx, post("f1", "and me", author="user1"))
    sender.send_due()
    last = slack.messages(CARE)[-1]
    assert last.thread_ts == digest.ts and "and me" in last.display_text
    assert outbox(ctx, "thread_post")[-1].status == "sent"


def test_a_cards_read_made_with_the_previous_cards_store_is_the_read_it_would_make(
    ctx: AppContext, slack: SlackStandIn, client: WebClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a batch's card reads what it needs in the statement that stores the card before
    it (one round trip for both): it must be what the card would read itself, storm count too."""
    ingest(ctx, *(post(str(i), f"question {i}", author=f"user{i}") for i in range(7)))  # #care
    ingest(ctx, *(post(f"b{i}", f"my invoice {i} is wrong", author=f"payer{i}") for i in range(5)))
    delivery = SlackDelivery(ctx, client, storm_threshold=50)  # counts up to 50: none is a storm
    compared: list[tuple[Any, Any]] = []
    handle_card = delivery.card

    def card(message: OutboxMessage) -> str:
        ahead = kept_ahead(message.id)
        if ahead is not None:
            keep_ahead(message.id, ahead)  # still the handler's to take
            post_id = message.payload.get("post_id")
            assert message.conversation_id is not None and isinstance(post_id, int)
            fresh = delivery._read_new_card(message, message.conversation_id, post_id, ctx.clock.now())
            compared.append((getattr(ahead, "found", ahead), fresh))
        return handle_card(message)

    monkeypatch.setattr(delivery, "card", card)
    sender = OutboxSender(ctx, {**delivery.handlers(), "ack": lambda message: "ack sent"})
    assert sender.send_due().by_kind.get("card") == 12
    assert len(cards_in(slack, CARE)) == 7 and len(cards_in(slack, BILLING)) == 5
    if ctx.engine.dialect.name == "sqlite":
        assert compared == []  # each card reads for itself (no round trips to save)
        return
    assert len(compared) >= 12 - 3  # all but each batch's first card
    assert all(kept == fresh for kept, fresh in compared), compared
    assert {kept.waiting for kept, _fresh in compared} >= {1, 2, 3}  # the storm count, as it fell


def test_a_conversation_claimed_between_its_cards_read_and_post_ends_with_a_card_showing_the_owner(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A card's data may be read before its post by a round trip or two (on PostgreSQL, with the
    previous card's store): a change in between, such as a staff claim, queues a card update,
    which waits for the card and then edits it."""
    ingest(ctx, post("1", "question one", author="one"), post("2", "question two", author="two"))
    first, second = conversations(ctx)
    delivery = SlackDelivery(ctx, client)
    handle_card = delivery.card

    def card(message: OutboxMessage) -> str:
        if message.conversation_id == second.id:  # its data read already on PostgreSQL
            with ctx.sessions() as session, session.begin():
                assert staff.claim(session, ctx, second.id, "lee", clock.now()).won
        return handle_card(message)

    monkeypatch.setattr(delivery, "card", card)
    sender = OutboxSender(ctx, {**delivery.handlers(), "ack": lambda message: "ack sent"})
    sender.send_due()
    posts = [c for c in slack.calls_to("chat.postMessage") if "question two" in str(c.params["blocks"])]
    assert len(posts) == 1
    if ctx.engine.dialect.name == "postgresql":
        assert "(proposed)" in str(posts[0].params["blocks"])  # posted as read, before the claim
    card_two = slack.message(CARE, str(conversations(ctx)[1].slack_ts))
    assert card_two is not None
    assert f"Claimed by <@{LEE}>" in card_two.display_text and "(proposed)" not in card_two.display_text
    assert card_two.edits == 1
    assert [row.status for row in outbox(ctx, "card_update")] == ["sent"]
    assert first.id != second.id and len(cards_in(slack, CARE)) == 2


def test_a_connection_broken_mid_batch_is_given_up_and_no_card_goes_twice(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send loop's own connection dies in the middle of a batch (on PostgreSQL, the one that
    stores a card with the next card's read, claims and records): it is given up, the batch goes on
    over the pool, and the card whose store it lost is found in Slack on its retry, not posted again."""
    if ctx.engine.dialect.name != "postgresql":
        pytest.skip("kills the loop's PostgreSQL backend")
    ingest(ctx, *(post(str(i), f"question {i}", author=f"user{i}") for i in range(3)))
    first, second, _third = conversations(ctx)
    delivery = SlackDelivery(ctx, client)
    handle_card = delivery.card
    killed: list[int] = []

    def card(message: OutboxMessage) -> str:
        held = outbox_module._loop.held
        if message.conversation_id == second.id and held is not None and not killed:
            pid = held.reader.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            with ctx.engine.connect() as other:
                killed.append(other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})").scalar_one())
        return handle_card(message)

    monkeypatch.setattr(delivery, "card", card)
    sender = OutboxSender(ctx, {**delivery.handlers(), "ack": lambda message: "ack sent"})
    result = sender.send_due()
    assert killed == [True]
    assert result.by_kind.get("card") == 2 and result.retried == 1  # the second card's store was lost
    assert len(cards_in(slack, CARE)) == 3
    clock.advance(timedelta(minutes=1))  # its retry is due
    assert sender.send_due().by_kind.get("card") == 1
    assert len(cards_in(slack, CARE)) == 3  # found in Slack (its metadata), not posted again
    assert {row.status for row in outbox(ctx, "card")} == {"sent"}
    stored = {c.id: c.slack_ts for c in conversations(ctx)}
    assert all(stored.values()) and len(set(stored.values())) == 3
    assert first.id in stored
