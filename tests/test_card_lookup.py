"""A card that reached Slack but whose ts was never stored is found by its metadata, not posted twice.

The window: Slack answered the post, then the database went away before the card's channel and ts
were stored (in the 10,000-post storm of 2026-12-06 PostgreSQL cut a worker's connection 0.26 s
after it posted a storm summary, and one conversation got two cards). The row is tried again; the
card handler, seeing an earlier attempt, reads the channel's history (or the storm summary's
thread) for a message carrying that conversation's ``replyclock_card`` metadata.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from slack_sdk import WebClient
from sqlalchemy.exc import OperationalError

from bot.core.clock import FakeClock
from bot.demo.standin import SlackStandIn
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from bot.slack.delivery import SlackDelivery
from bot.slack.pacing import Pacer
from tests.test_ingest import ingest, post
from tests.test_slack_delivery import BILLING, CARE, client, conversations, outbox, slack, top_level

__all__ = ["client", "slack"]  # fixtures


def cut_the_first_store(delivery: SlackDelivery) -> list[str]:
    """The database connection drops while the first card's ts is being stored (after Slack's answer)."""
    real_store = delivery._store_card
    cut: list[str] = []

    def store(conversation_id: int, channel: str, ts: str, **kwargs: Any) -> bool:
        if not cut:
            cut.append(ts)
            raise OperationalError("UPDATE conversations", {}, Exception("server closed the connection"))
        return real_store(conversation_id, channel, ts, **kwargs)

    delivery._store_card = store  # type: ignore[method-assign]
    return cut


def test_a_card_posted_but_not_stored_is_found_in_the_channel_history(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, post("1", "my invoice is wrong", thread="a"), account="blog")  # no acknowledgement
    delivery = SlackDelivery(ctx, client, pacer=Pacer(clock.now))  # learns #billing's id from the post
    cut = cut_the_first_store(delivery)
    sender = OutboxSender(ctx, delivery.handlers())
    assert sender.send_due().retried == 1
    [row] = outbox(ctx, "card")
    assert row.status == "pending" and cut and conversations(ctx)[0].slack_ts is None

    clock.advance(timedelta(minutes=5))  # past the back-off
    assert sender.send_due().sent == 1
    [card] = top_level(slack, BILLING)  # one card, not two
    assert card.ts == cut[0]
    assert len(slack.calls_to("chat.postMessage")) == 1
    [lookup] = slack.calls_to("conversations.history")
    assert lookup.params["channel"] == BILLING and lookup.params["include_all_metadata"] in (
        True,
        "1",
        "true",
    )
    [conversation] = conversations(ctx)
    assert (conversation.slack_channel, conversation.slack_ts) == (BILLING, card.ts)
    assert outbox(ctx, "card")[0].result == f"found {BILLING} {card.ts}"


def test_a_storm_digest_posted_but_not_stored_is_found_not_posted_again(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    ingest(ctx, *(post(str(i), f"a question, number {i}", author=f"user{i}") for i in range(6)))
    delivery = SlackDelivery(ctx, client, storm_threshold=5, pacer=Pacer(clock.now))
    real_store = delivery._store_storm
    cut: list[str] = []

    def store(channel: str, ts: str, *args: Any, **kwargs: Any) -> list[int]:
        if not cut:
            cut.append(ts)
            raise OperationalError("UPDATE conversations", {}, Exception("server closed the connection"))
        return real_store(channel, ts, *args, **kwargs)

    delivery._store_storm = store  # type: ignore[method-assign]
    sender = OutboxSender(ctx, {**delivery.handlers(), "ack": lambda message: "ack sent"})
    sender.send_due()
    assert cut
    for _ in range(3):
        clock.advance(timedelta(minutes=5))
        sender.send_due()
    [digest] = top_level(slack, CARE)  # one digest, not a second one nor six cards
    assert digest.ts == cut[0]
    assert len(slack.calls_to("chat.postMessage")) == 1
    assert len(slack.calls_to("conversations.history")) == 1
    assert {str(c.slack_ts) for c in conversations(ctx)} == {digest.ts}
    assert all(row.status == "sent" for row in outbox(ctx, "card"))


def test_a_card_retried_without_an_earlier_post_is_posted_once(
    ctx: AppContext, clock: FakeClock, slack: SlackStandIn, client: WebClient
) -> None:
    """A retry whose earlier attempt never reached Slack (a 500) looks, finds nothing, and posts."""
    ingest(
        ctx,
        post("1", "my invoice is wrong", thread="a"),
        post("2", "my invoice is wrong too", thread="b", author="other"),
        account="blog",
    )
    slack.fail_next("chat.postMessage", error="internal_error", status=500)  # the first card's post
    sender = OutboxSender(ctx, SlackDelivery(ctx, client, pacer=Pacer(clock.now)).handlers())
    first = sender.send_due()
    assert (first.sent, first.retried) == (1, 1)
    clock.advance(timedelta(minutes=5))
    assert sender.send_due().sent == 1
    cards = top_level(slack, BILLING)
    assert len(cards) == 2 and len(slack.calls_to("conversations.history")) == 1
    assert sorted(str(c.slack_ts) for c in conversations(ctx)) == sorted(m.ts for m in cards)
