"""The resolution ladder end to end through the Slack stand-in: warnings before the resolution
deadline and a breach notice when it passes, in the card's thread, the owner mentioned.

Billing runs on business hours (Berlin, Mon-Fri 09:00-17:00), warn_at = [0.5, 0.75]; here also
`resolution = "16h"` (two working days). A post on Monday 09:00 must be resolved by Tuesday
17:00; the warnings fall when 8 h and 12 h of the target are used: Monday 17:00, Tuesday 13:00.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from bot.core.clock import FakeClock
from bot.core.ladder import ResolutionPlan, resolution_plan
from bot.flow.context import AppContext
from bot.flow.sweep import sweep
from bot.slack.ids import ACTION_ANSWERED, ACTION_CLOSE, ACTION_WAIT
from storage.models import Conversation, Outbox
from tests.conftest import MONDAY
from tests.test_ingest import ingest, post
from tests.test_slack_app import MARIA, Harness, eventually, harness  # noqa: F401  (the fixture)

H = timedelta(hours=1)


def with_resolution(h: Harness, *, one_at_a_time: bool) -> None:
    """Billing gets a 16 h resolution target; `one_at_a_time` adds reassign_if_silent, which
    sends the sweep down its one-at-a-time path instead of the set-wise one."""
    policies = tuple(
        dataclasses.replace(p, resolution=16 * H, reassign_if_silent=(100 * H if one_at_a_time else None))
        if p.name == "billing"
        else p
        for p in h.ctx.policy.policies
    )
    h.ctx.policy = dataclasses.replace(h.ctx.policy, policies=policies)


def resolution_rows(h: Harness, conversation_id: int) -> list[tuple[str, str, str]]:
    with h.ctx.sessions() as session:
        return [
            (row.kind, row.idempotency_key, row.status)
            for row in session.scalars(
                select(Outbox)
                .where(Outbox.conversation_id == conversation_id, Outbox.kind.like("resolution_%"))
                .order_by(Outbox.id)
            )
        ]


def thread_lines(h: Harness, conversation_id: int) -> list[str]:
    """The mrkdwn of each reply in the card's thread."""
    card = h.conversation(conversation_id)
    assert card.slack_channel and card.slack_ts
    lines: list[str] = []
    for message in h.slack.thread(card.slack_channel, card.slack_ts):
        if message.is_reply:
            lines.extend(block["text"]["text"] for block in message.blocks if block.get("type") == "section")
    return lines


def answer(h: Harness, conversation_id: int) -> None:
    assert h.click(ACTION_ANSWERED, conversation_id, MARIA) == 200
    eventually(lambda: h.conversation(conversation_id).status == "answered")


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["set-wise", "one-at-a-time"])
def test_resolution_warnings_and_breach_in_the_thread(harness: Harness, one_at_a_time: bool) -> None:  # noqa: F811
    h = harness
    with_resolution(h, one_at_a_time=one_at_a_time)
    kept = h.seed("1", author="ana<!channel>")  # Monday 09:00 Berlin: resolve by Tuesday 17:00
    waiting = h.seed("2", "invoice question", author="bo")
    closed = h.seed("3", "refund for my invoice", author="cy")
    assert h.conversation(kept).resolution_due_at == MONDAY + 32 * H

    h.clock.advance(H)  # 10:00: Maria answers all three; she waits on bo
    for conversation_id in (kept, waiting, closed):
        answer(h, conversation_id)
    assert h.click(ACTION_WAIT, waiting, MARIA) == 200
    eventually(lambda: h.conversation(waiting).waiting_since is not None)
    sweep(h.ctx)
    # Answered, the response ladder is done; the resolution ladder looks at 8 h used: 17:00.
    assert h.conversation(kept).next_action_at == MONDAY + 8 * H
    assert resolution_rows(h, kept) == []

    # Monday 17:00: half the target used: the first warning, once, however often the sweep runs.
    h.clock.set(MONDAY + 8 * H)
    sweep(h.ctx)
    sweep(h.ctx)
    assert resolution_rows(h, kept) == [
        ("resolution_warning", f"conv:{kept}:resolution:warning:0", "pending")
    ]
    assert resolution_rows(h, waiting) == []  # its clocks stand still while it waits
    assert h.conversation(kept).next_action_at == MONDAY + 28 * H  # Tuesday 13:00 Berlin
    # Closed before its warning went out: the warning is retired, never posted.
    assert h.click(ACTION_CLOSE, closed, MARIA, value="no_reply_needed") == 200
    eventually(lambda: h.conversation(closed).status == "closed")
    assert [status for _, _, status in resolution_rows(h, closed)] == ["retired"]
    h.send()
    [warning] = thread_lines(h, kept)
    assert warning.startswith(":hourglass_flowing_sand: *Resolution* of") and "is due in 1 d (" in warning
    assert f"<@{MARIA}>" in warning  # the owner, on duty (08:00-18:00 Berlin), is pinged
    assert "<!channel>" not in warning and "&lt;!channel&gt;" in warning  # the customer's name is inert
    assert not [line for line in thread_lines(h, closed) if "Resolution" in line]

    # Tuesday 13:00: 12 h used, the second warning; 17:00: the breach notice, then nothing more.
    h.clock.set(MONDAY + 28 * H)
    sweep(h.ctx)
    h.clock.set(MONDAY + 32 * H)
    sweep(h.ctx)
    h.send()
    assert [kind for kind, _, _ in resolution_rows(h, kept)] == [
        "resolution_warning",
        "resolution_warning",
        "resolution_breach",
    ]
    assert h.conversation(kept).next_action_at is None
    breach = thread_lines(h, kept)[-1]
    assert breach.startswith(":red_circle: *Resolution target missed*") and f"<@{MARIA}>" in breach
    h.clock.advance(24 * H)
    sweep(h.ctx)
    assert len(resolution_rows(h, kept)) == 3
    assert resolution_rows(h, waiting) == []


def test_the_resolution_plan_follows_the_clock_used() -> None:
    """Pure: warnings at the shares of the target used, the breach at the deadline; a wait that
    moved the deadline moves the warnings; a late look sends only the breach."""
    target = 10 * H
    due = MONDAY + target

    def at(
        now_offset: timedelta, *, sent: int = 0, breach_sent: bool = False, due_at: datetime = due
    ) -> ResolutionPlan:
        return resolution_plan(
            due_at=due_at,
            target=target,
            warn_at=(0.5, 0.8, 1.0),
            warnings_sent=sent,
            breach_sent=breach_sent,
            now=MONDAY + now_offset,
            left_on_clock=lambda instant: max(due_at - instant, timedelta(0)),
            clock_after=lambda instant, amount: instant + amount,
        )

    early = at(H)
    assert early.steps == () and early.next_action_at == MONDAY + 5 * H
    first = at(5 * H)
    assert [(s.kind, s.index) for s in first.steps] == [("resolution_warning", 0)]
    assert first.warnings_sent == 1 and first.next_action_at == MONDAY + 8 * H
    both = at(9 * H)  # a late look: the two warnings collapse into one (the later)
    assert [(s.kind, s.index) for s in both.steps] == [("resolution_warning", 1)]
    assert both.next_action_at == due
    late = at(12 * H, sent=1)
    assert [(s.kind, s.scheduled_at) for s in late.steps] == [("resolution_breach", due)]
    assert late.breach_sent and late.next_action_at is None
    assert at(13 * H, sent=2, breach_sent=True).steps == ()
    # Waited 3 h after 4 h: the deadline moved to 13 h; the first warning comes at 5 h used = 8 h.
    moved = at(7 * H, due_at=MONDAY + 13 * H)
    assert moved.steps == () and moved.next_action_at == MONDAY + 8 * H


def test_a_resolution_target_shorter_than_the_response_target_is_planned_from_the_start(
    ctx: AppContext, clock: FakeClock
) -> None:
    """Resolution 2 h, first response 8 h (both business hours): the first resolution warning
    (1 h used, 10:00) comes before the response ladder's first look (4 h used, 13:00)."""
    ctx.policy = dataclasses.replace(
        ctx.policy,
        policies=tuple(
            dataclasses.replace(p, resolution=2 * H) if p.name == "billing" else p
            for p in ctx.policy.policies
        ),
    )
    ingest(ctx, post("1", "refund for my invoice please"))  # Monday 09:00 Berlin
    sweep(ctx)
    with ctx.sessions() as session:
        assert session.scalars(select(Conversation.next_action_at)).one() == MONDAY + H
    clock.set(MONDAY + H)
    sweep(ctx)
    with ctx.sessions() as session:
        assert session.scalars(
            select(Outbox.idempotency_key).where(Outbox.kind.like("resolution_%"))
        ).all() == ["conv:1:resolution:warning:0"]
