"""The sender's pace for Slack (bot/slack/pacing.py), in fake time."""

from __future__ import annotations

from datetime import timedelta

from bot.core.clock import FakeClock
from bot.slack.pacing import POST, Pacer
from tests.conftest import MONDAY

POST_MESSAGE = "chat.postMessage"


def test_a_burst_then_one_a_second_per_channel() -> None:
    clock = FakeClock(MONDAY)
    pacer = Pacer(clock.now)
    assert [pacer.take(POST_MESSAGE, "C1") for _ in range(int(POST.burst))] == [None] * int(POST.burst)
    assert pacer.take(POST_MESSAGE, "C1") == MONDAY + timedelta(seconds=1)
    assert pacer.take(POST_MESSAGE, "C2") is None  # another channel, its own bucket
    clock.advance(timedelta(seconds=1))
    assert pacer.take(POST_MESSAGE, "C1") is None
    assert pacer.take("users.info", None) is None  # tiers are per method
    assert pacer.take("auth.test", None) is None  # not paced


def test_calls_put_off_together_are_spread_by_rank() -> None:
    clock = FakeClock(MONDAY)
    pacer = Pacer(clock.now)
    for _ in range(int(POST.burst)):
        pacer.take(POST_MESSAGE, "C1")
    slot = MONDAY + timedelta(seconds=1)
    cards = [pacer.take(POST_MESSAGE, "C1", rank=3) for _ in range(3)]
    assert cards == [slot, slot + timedelta(seconds=1), slot + timedelta(seconds=2)]
    # A breach put off after them is told the very next slot; a nag, the slot after the cards.
    assert pacer.take(POST_MESSAGE, "C1", rank=0) == slot
    assert pacer.take(POST_MESSAGE, "C1", rank=6) == slot + timedelta(seconds=4)
    assert pacer.ready(POST_MESSAGE, "C1") == slot  # a peek takes nothing and queues nothing


def test_a_429_closes_the_bucket_and_a_name_shares_its_ids_bucket() -> None:
    clock = FakeClock(MONDAY)
    pacer = Pacer(clock.now)
    for _ in range(int(POST.burst)):
        assert pacer.take(POST_MESSAGE, "#care") is None
    pacer.learn("#care", "C0CARE0001")
    assert pacer.take(POST_MESSAGE, "C0CARE0001") == MONDAY + timedelta(seconds=1)  # same bucket
    clock.advance(timedelta(seconds=5))
    pacer.block(POST_MESSAGE, "#care", MONDAY + timedelta(seconds=35))  # Retry-After: 30
    assert pacer.take(POST_MESSAGE, "C0CARE0001") == MONDAY + timedelta(seconds=35)
    clock.set(MONDAY + timedelta(seconds=35))
    assert pacer.take(POST_MESSAGE, "C0CARE0001") is None
    pacer.spend(POST_MESSAGE, "C0CARE0001")  # a note goes anyway, and counts
    assert pacer.ready(POST_MESSAGE, "C0CARE0001") == MONDAY + timedelta(seconds=37)
