"""The sender's pace for Slack (bot/slack/pacing.py), in fake time: alone, and shared through the database."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from slack_sdk import WebClient
from sqlalchemy import Engine, select

from bot.core.clock import FakeClock
from bot.demo.standin import DEFAULT_TOKEN, SlackStandIn
from bot.flow.context import AppContext
from bot.flow.outbox import STAFF_BATCH, OutboxSender
from bot.flow.sweep import sweep
from bot.slack.delivery import slack_handlers
from bot.slack.pacing import OVERBOOK, POST, Pacer, SharedPacer
from storage.db import make_engine
from storage.models import Outbox
from tests.conftest import MONDAY
from tests.test_ingest import ingest, post
from tests.test_slack_delivery import CARE, USERS, cards_in, notices_in

POST_MESSAGE = "chat.postMessage"
SECOND = timedelta(seconds=1)
SLOT = SECOND / OVERBOOK  # calls put off are promised a slot each OVERBOOK to a second


def test_a_burst_then_one_a_second_per_channel() -> None:
    clock = FakeClock(MONDAY)
    pacer = Pacer(clock.now)
    assert [pacer.take(POST_MESSAGE, "C1") for _ in range(int(POST.burst))] == [None] * int(POST.burst)
    assert pacer.take(POST_MESSAGE, "C1") == MONDAY + SECOND
    assert pacer.take(POST_MESSAGE, "C2") is None  # another channel, its own bucket
    clock.advance(SECOND)
    assert pacer.take(POST_MESSAGE, "C1") is None
    assert pacer.take("users.info", None) is None  # tiers are per method
    assert pacer.take("auth.test", None) is None  # not paced


def test_the_last_token_is_kept_for_breaches_and_calls_put_off_are_spread() -> None:
    clock = FakeClock(MONDAY)
    pacer = Pacer(clock.now)
    # Cards (rank 3) take the burst but its reserve: two of three.
    assert [pacer.take(POST_MESSAGE, "C1", rank=3) for _ in range(2)] == [None, None]
    later = [pacer.take(POST_MESSAGE, "C1", rank=3) for _ in range(3)]
    assert later == [MONDAY + SECOND, MONDAY + SECOND + SLOT, MONDAY + SECOND + 2 * SLOT]  # spread
    assert pacer.take(POST_MESSAGE, "C1", rank=0) is None  # a breach: the reserve, at once
    # A breach put off is told the very next slot; a nag, the slot after the cards'.
    assert pacer.take(POST_MESSAGE, "C1", rank=0) == MONDAY + SECOND
    assert pacer.take(POST_MESSAGE, "C1", rank=6) == MONDAY + SECOND + 3 * SLOT
    assert pacer.ready(POST_MESSAGE, "C1", rank=0) == MONDAY + SECOND  # a peek takes and promises nothing
    assert pacer.ready(POST_MESSAGE, "C1", rank=3) == MONDAY + 2 * SECOND


def test_a_group_put_off_is_told_the_next_free_moment_and_promised_no_slot(engine: Engine) -> None:
    """A digest (rows waiting together) put off again and again does not push the queue of promised
    slots ahead: a single card put off after it still gets the next slot."""
    clock = FakeClock(MONDAY)
    for pacer in (Pacer(clock.now), SharedPacer(clock.now, engine)):
        channel = f"C{id(pacer)}"
        assert [pacer.try_take(POST_MESSAGE, channel, rank=3) for _ in range(2)] == [None, None]
        assert [pacer.try_take(POST_MESSAGE, channel, rank=3) for _ in range(10)] == [MONDAY + SECOND] * 10
        assert pacer.take(POST_MESSAGE, channel, rank=3) == MONDAY + SECOND  # the first slot is still free
        assert pacer.take(POST_MESSAGE, channel, rank=3) == MONDAY + SECOND + SLOT


def test_a_backlog_beyond_the_horizon_asks_again_later_not_all_at_once() -> None:
    clock = FakeClock(MONDAY)
    pacer = Pacer(clock.now)
    slots = [pacer.take(POST_MESSAGE, "C1", rank=3) for _ in range(int(POST.horizon) * OVERBOOK * 2)]
    promised = [slot for slot in slots if slot is not None]
    horizon = MONDAY + timedelta(seconds=POST.horizon)
    near = [slot for slot in promised if slot <= horizon]
    # One call per slot up to the horizon (from the first slot, a second from now).
    assert len(near) == len(set(near)) == int((POST.horizon - 1) * OVERBOOK) + 1
    far = [slot for slot in promised if slot > horizon]
    assert all(slot <= horizon + timedelta(seconds=POST.horizon) for slot in far)
    assert len(set(far)) > len(far) // 2  # spread out, not one herd


def test_a_429_closes_the_bucket_and_a_name_shares_its_ids_bucket() -> None:
    clock = FakeClock(MONDAY)
    pacer = Pacer(clock.now)
    for _ in range(int(POST.burst)):
        assert pacer.take(POST_MESSAGE, "#care") is None
    pacer.learn("#care", "C0CARE0001")
    assert pacer.take(POST_MESSAGE, "C0CARE0001") == MONDAY + SECOND  # same bucket
    clock.advance(5 * SECOND)
    pacer.block(POST_MESSAGE, "#care", MONDAY + 35 * SECOND)  # Retry-After: 30
    assert pacer.take(POST_MESSAGE, "C0CARE0001") == MONDAY + 35 * SECOND
    assert pacer.take(POST_MESSAGE, "C0CARE0001", rank=3) == MONDAY + 36 * SECOND
    clock.set(MONDAY + 35 * SECOND)
    assert pacer.take(POST_MESSAGE, "C0CARE0001") is None  # one call at Retry-After, then the pace
    pacer.spend(POST_MESSAGE, "C0CARE0001")  # a note goes anyway, and counts
    assert pacer.ready(POST_MESSAGE, "C0CARE0001") == MONDAY + 37 * SECOND


# --- shared through the database ------------------------------------------------------------


def test_processes_share_one_budget_per_channel(engine: Engine) -> None:
    clock = FakeClock(MONDAY)
    one, two = SharedPacer(clock.now, engine), SharedPacer(clock.now, engine)
    assert one.take(POST_MESSAGE, "C1") is None
    assert two.take(POST_MESSAGE, "C1") is None
    assert one.take(POST_MESSAGE, "C1") is None
    # The channel's burst is spent by the two together: the other process is told to wait too.
    assert two.take(POST_MESSAGE, "C1", rank=3) == MONDAY + 2 * SECOND
    assert one.take(POST_MESSAGE, "C2") is None
    assert two.take("chat.update", "C1") is None  # tiers are workspace-wide, per method
    # Slots promised to calls put off are shared too: the next card is told the slot after,
    # a breach the very next slot.
    assert one.take(POST_MESSAGE, "C1", rank=3) == MONDAY + 2 * SECOND + SLOT
    assert two.take(POST_MESSAGE, "C1", rank=0) == MONDAY + SECOND
    # A 429 seen by one process closes the channel for every process.
    one.block(POST_MESSAGE, "C2", MONDAY + 30 * SECOND)
    assert two.take(POST_MESSAGE, "C2") == MONDAY + 30 * SECOND
    clock.advance(30 * SECOND)
    assert two.take(POST_MESSAGE, "C2") is None
    assert one.take(POST_MESSAGE, "C2") == MONDAY + 31 * SECOND
    assert one.fallbacks == two.fallbacks == 0


def test_shared_pacing_falls_back_to_pacing_alone_when_the_database_fails(tmp_path: Path) -> None:
    clock = FakeClock(MONDAY)
    broken = make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")  # no slack_pace table: every call fails
    pacer = SharedPacer(clock.now, broken)
    assert [pacer.take(POST_MESSAGE, "C1") for _ in range(int(POST.burst))] == [None] * int(POST.burst)
    assert pacer.take(POST_MESSAGE, "C1") == MONDAY + SECOND  # still paced, locally
    assert pacer.fallbacks == int(POST.burst) + 1
    broken.dispose()


# --- several senders, one channel, Slack's limits on -----------------------------------------


def _storm_with_senders(
    ctx: AppContext, clock: FakeClock, pacer: Callable[[], Pacer], staff_batch: int = STAFF_BATCH
) -> tuple[int, float, list[float]]:
    """Four senders (each its own pacer, client and thread, as four processes) and a storm in #care.

    `staff_batch` staff rows per claim: with the default, these four threads (serialised by one
    SQLite writer and the GIL) take the storm in a few batches, one after the other; with 1 their
    calls interleave as four processes' do.

    Two urgent conversations are overdue just as 20 new ones arrive. Checks that everything
    arrived once; returns the 429s, the seconds from the storm to the last breach notice, and
    for each card of the storm posted before that notice, how long before it.
    """

    def seconds() -> float:
        return clock.now().timestamp()

    with SlackStandIn(
        channels={CARE: "care"}, users=USERS, clock=seconds, rate_limits=True, limit_clock=seconds
    ) as slack:
        senders: list[OutboxSender] = [
            OutboxSender(
                ctx,
                {
                    **slack_handlers(
                        ctx,
                        WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url),
                        storm_threshold=10**9,
                        pacer=pacer(),
                    ),
                    "ack": lambda message: "ack sent",
                },
                staff_batch=staff_batch,
            )
            for _ in range(4)
        ]
        ingest(ctx, *[post(f"u{i}", "the site is down!", author=f"u{i}") for i in range(2)])
        for _ in range(8):
            for sender in senders:
                sender.send_due()
            clock.advance(timedelta(seconds=1))
        clock.set(MONDAY + timedelta(minutes=61))
        storm_at = clock.now()
        ingest(
            ctx, *[post(f"s{i}", f"a question, number {i}", author=f"s{i}", at=storm_at) for i in range(20)]
        )
        sweep(ctx)
        errors: list[BaseException] = []

        def run(sender: OutboxSender) -> None:
            try:
                sender.send_due()
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)

        for _ in range(200):  # every sender comes round every 0.25 s, all at the same moment
            threads = [threading.Thread(target=run, args=(sender,)) for sender in senders]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors
            with ctx.sessions() as session:
                if not session.scalars(
                    select(Outbox).where(Outbox.status.in_(("pending", "sending")))
                ).first():
                    break
            clock.advance(timedelta(seconds=0.25))
        assert slack.internal_errors == []
        limited = [call.status for call in slack.calls].count(429)
        cards = cards_in(slack, CARE)
        breaches = notices_in(slack, CARE)
    assert len(cards) == 22 and len({m.ts for m in cards}) == 22
    assert len(breaches) == 2 and len({cid for cid, _ in breaches}) == 2  # alone or in one digest
    storm_cards = [float(m.ts) for m in cards if float(m.ts) >= storm_at.timestamp()]
    assert len(storm_cards) == 20
    last_breach = max(ts for _, ts in breaches)
    before = [last_breach - ts for ts in storm_cards if ts < last_breach]
    return limited, last_breach - storm_at.timestamp(), before


@pytest.mark.parametrize("staff_batch", [1, STAFF_BATCH])
def test_four_senders_sharing_the_pace_get_no_429_and_send_breaches_first(
    ctx: AppContext, clock: FakeClock, staff_batch: int
) -> None:
    limited, breach_after, cards_before = _storm_with_senders(
        ctx, clock, lambda: SharedPacer(clock.now, ctx.engine), staff_batch
    )
    assert limited == 0
    assert breach_after <= 1.0
    # No breach notice waited behind the storm's cards: the senders running at the storm's first
    # moment may post the cards they claimed beside the breaches (at most the burst less the
    # reserve kept for breaches), in that first second; every other card went after the breaches.
    # (Senders in parallel race for that moment's tokens: when cards take the burst's share, the
    # second breach has the reserve and the one after it waits one refill, so "beside" is within
    # one second, not the same instant.)
    assert len(cards_before) <= int(POST.burst - POST.reserve)
    assert all(gap <= 1.0 for gap in cards_before)


def test_four_senders_pacing_alone_meet_429s(ctx: AppContext, clock: FakeClock) -> None:
    """What sharing the pace fixes: four pacers that know nothing of each other overrun the channel
    (their calls interleaved, as four processes' are: one staff row per claim)."""
    limited, _, _ = _storm_with_senders(ctx, clock, lambda: Pacer(clock.now), staff_batch=1)
    # How many depends on how the four threads' claims interleave (the customer and staff lanes
    # take turns); any 429 is the overrun sharing the pace prevents.
    assert limited >= 1, limited


@pytest.mark.parametrize("rank", [0, 3])
def test_a_peek_agrees_with_a_take(rank: int, engine: Engine) -> None:
    clock = FakeClock(MONDAY)
    shared, alone = SharedPacer(clock.now, engine), Pacer(clock.now)
    for _ in range(4):
        for pacer in (shared, alone):
            peek = pacer.ready(POST_MESSAGE, "C1", rank=rank)
            assert pacer.take(POST_MESSAGE, "C1", rank=rank) == peek or peek is not None
    assert shared.ready(POST_MESSAGE, "C1", rank=rank) == alone.ready(POST_MESSAGE, "C1", rank=rank)
