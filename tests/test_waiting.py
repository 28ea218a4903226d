"""Resolution target and waiting on the customer, end to end through the Slack stand-in.

Billing runs on business hours (Berlin, Mon-Fri 09:00-17:00): first response 8 h, next response
4 h; here also `resolution = "16h"` (two working days) and `close_after_silence = "2d"`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from datetime import timedelta

from sqlalchemy import select

from bot.flow.ingest import ingest_batch
from bot.flow.sweep import sweep
from bot.reports.digest import WeekRange, build_digest, render_text
from bot.reports.export import write_export
from bot.slack.ids import ACTION_ANSWERED, ACTION_CLOSE, ACTION_WAIT
from connectors.base import InboundPost
from storage.models import Event
from tests.conftest import MONDAY
from tests.test_slack_app import MARIA, Harness, eventually, harness  # noqa: F401  (the fixture)

H = timedelta(hours=1)


def with_resolution(h: Harness) -> None:
    policies = tuple(
        dataclasses.replace(p, resolution=16 * H, close_after_silence=timedelta(days=2))
        if p.name == "billing"
        else p
        for p in h.ctx.policy.policies
    )
    h.ctx.policy = dataclasses.replace(h.ctx.policy, policies=policies)


def customer_writes(h: Harness, external_id: str, author: str, thread: str) -> None:
    post = InboundPost(
        external_id,
        f"id-{author}",
        "here is the order number",
        h.clock.now(),
        author_handle=author,
        author_name=author,
        thread_id=thread,
    )
    with h.ctx.sessions() as session, session.begin():
        ingest_batch(session, h.ctx, account="social", posts=[post], is_own=lambda _p: False)
    h.send()


def test_waiting_pauses_the_clocks_and_resolution_reaches_digest_and_export(harness: Harness) -> None:  # noqa: F811
    h = harness
    with_resolution(h)
    waited = h.seed("1", author="ana")  # Monday 09:00 Berlin: due 17:00, resolution Tuesday 17:00
    silent = h.seed("2", "invoice question", author="bo")
    late = h.seed("3", "refund for my invoice", author="cy")
    assert h.conversation(waited).resolution_due_at == MONDAY + 32 * H

    h.clock.advance(H)  # 10:00: Maria waits on ana from the card, on bo with the command
    assert h.click(ACTION_WAIT, waited, MARIA) == 200
    eventually(lambda: h.conversation(waited).waiting_since == MONDAY + H)
    note = h.slack.ephemerals(user=MARIA)
    eventually(lambda: bool(h.slack.ephemerals(user=MARIA)))
    note = h.slack.ephemerals(user=MARIA)[-1].text
    assert note.startswith(f"#{waited} waits on the customer") and "if they stay silent" in note
    assert h.command(f"wait {silent}").startswith(f"#{silent} waits on the customer")
    assert "already waiting" in h.command(f"wait {silent}")
    assert h.conversation(silent).next_action_at == MONDAY + H + timedelta(days=2)

    # Tuesday 10:00: the sweep leaves the waiting ones alone (no breach), ana writes again.
    h.clock.set(MONDAY + 25 * H)
    sweep(h.ctx)
    assert h.conversation(waited).breached_at is None and h.conversation(late).breached_at is not None
    assert h.command("stats billing").count("overdue") == 1 and "(1 overdue)" in h.command("stats billing")
    customer_writes(h, "4", "ana", thread="1")  # in the same thread, a day later
    resumed = h.conversation(waited)
    assert resumed.waiting_since is None
    # 7 open hours were left on the response clock and 15 on the resolution clock at 10:00 Monday.
    assert resumed.due_at == MONDAY + 32 * H  # Tuesday 17:00 Berlin
    assert resumed.resolution_due_at == MONDAY + 56 * H  # Wednesday 17:00 Berlin

    # Wednesday 10:00: Maria answers ana (elsewhere) and closes; bo has been silent for two days.
    h.clock.set(MONDAY + 50 * H)
    assert h.click(ACTION_ANSWERED, waited, MARIA) == 200
    eventually(lambda: h.conversation(waited).status == "answered")
    assert h.click(ACTION_CLOSE, waited, MARIA, value="no_reply_needed") == 200
    eventually(lambda: h.conversation(waited).status == "closed")
    sweep(h.ctx)
    closed = h.conversation(silent)
    assert closed.status == "closed" and closed.close_reason == "no word from the customer for 2d"
    with h.ctx.sessions() as session:
        assert (
            session.scalars(
                select(Event.actor).where(Event.conversation_id == silent, Event.action == "closed")
            ).one()
            == "sweep"
        )
    h.send()

    # Friday: the digest and the export of the week show the resolution verdicts.
    h.clock.set(MONDAY + 4 * 24 * H)
    with h.ctx.sessions() as session:
        digest = build_digest(session, h.ctx, "billing", WeekRange.containing(MONDAY, "Europe/Berlin"))
        out = io.StringIO()
        write_export(session, out, since=MONDAY - 24 * H, now=h.clock.now())
    assert digest.current.resolved_within_target == 1
    assert digest.current.resolution_breaches == (late,)
    assert "Resolved within target: 1 (0); resolution targets missed: 1 (0)" in render_text(
        digest, mrkdwn=False
    )
    rows = {int(r["conversation_id"]): r for r in csv.DictReader(io.StringIO(out.getvalue()))}
    assert rows[waited]["resolution_verdict"] == "within" and rows[waited]["waiting_since"] == ""
    assert rows[late]["resolution_verdict"] == "breached"
    assert rows[silent]["resolution_verdict"] == "not_judged"  # closed without an answer
    stats = h.command("stats billing")
    assert "resolved within target: 1, resolution targets missed: 1" in stats
