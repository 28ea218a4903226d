"""One truth: digest, export, /replyclock stats, App Home and metrics judge every conversation alike.

Answers arrive backfilled (stored after their deadline with no sweep in between) and the worker
is down over deadlines; every reading must still call a late answer late, and agree with the
others, before and after the sweep catches up.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from datetime import timedelta

from slack_bolt import BoltContext
from sqlalchemy import select

from bot.core.clock import FakeClock
from bot.core.sla_outcome import sla_outcome
from bot.flow import staff
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from bot.flow.sweep import sweep
from bot.reports.digest import WeekRange, build_digest
from bot.reports.export import write_export
from bot.reports.metrics import build_registry, exposition
from bot.slack.app import APP_CONTEXT, DB_SESSION
from bot.slack.commands import _stats
from bot.slack.home import home_view
from connectors.base import InboundPost
from storage.models import Conversation
from tests.conftest import MONDAY

H = timedelta(hours=1)


def customer(external_id: str, text: str, author: str, at_hours: float) -> InboundPost:
    at = MONDAY + timedelta(hours=at_hours)
    return InboundPost(
        external_id, f"id-{author}", text, at, author_handle=author, author_name=author.title()
    )


def ours(external_id: str, reply_to: str, at_hours: float) -> InboundPost:
    at = MONDAY + timedelta(hours=at_hours)
    return InboundPost(
        external_id, "own", "here you go", at, author_handle="acme_support", reply_to_id=reply_to
    )


def ingest(ctx: AppContext, *posts: InboundPost) -> None:
    with ctx.sessions() as session, session.begin():
        ingest_batch(
            session, ctx, account="social", posts=posts, is_own=lambda p: p.author_handle == "acme_support"
        )


def verdicts(ctx: AppContext) -> dict[str, str]:
    """The verdict per customer, straight from the one function (the reference)."""
    with ctx.sessions() as session:
        return {
            row.author_handle or "": sla_outcome(
                due_at=row.first_due_at,
                responded_at=row.first_response_at,
                closed_at=row.closed_at,
                now=ctx.clock.now(),
            ).verdict
            for row in session.scalars(select(Conversation))
            if row.first_due_at is not None
        }


def readings(ctx: AppContext) -> dict[str, object]:
    now = ctx.clock.now()
    with ctx.sessions() as session:
        ids = {row.id: row.author_handle for row in session.scalars(select(Conversation))}
        # Digest: the week in progress (every deadline in this test has passed already).
        digest = build_digest(session, ctx, "care", WeekRange.containing(now, "Europe/Berlin"))
        out = io.StringIO()
        write_export(session, out, since=MONDAY - 24 * H, now=now)
        stats_text = _stats(BoltContext({DB_SESSION: session, APP_CONTEXT: ctx}), ctx, "sam", ["care"])
        figures = staff.team_stats(session, ctx, "care", now)
        home = home_view(ctx, [], [figures], now=now, tz=ctx.calendar("berlin").tz)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    metrics = exposition(build_registry(ctx))[0].decode()
    return {
        "digest_breached": sorted(ids[b.conversation_id] for b in digest.current.breaches),
        "digest_late_by": {ids[b.conversation_id]: b.late_by for b in digest.current.breaches},
        "digest_counts": (digest.current.within_sla, len(digest.current.breaches)),
        "export_breached": sorted(r["author_handle"] for r in rows if r["breached"] == "true"),
        "export_late_by": {
            r["author_handle"]: timedelta(seconds=float(r["late_by_seconds"]))
            for r in rows
            if r["first_response_verdict"] == "breached"
        },
        "export_counts": (
            sum(r["first_response_verdict"] == "within" for r in rows),
            sum(r["first_response_verdict"] == "breached" for r in rows),
        ),
        "stats_counts": (figures.answered_within_sla, figures.breached_this_week),
        "resolution_digest": (
            digest.current.resolved_within_target,
            sorted(ids[c] for c in digest.current.resolution_breaches),
        ),
        "resolution_export": (
            sorted(r["author_handle"] for r in rows if r["resolution_verdict"] == "within"),
            sorted(r["author_handle"] for r in rows if r["resolution_verdict"] == "breached"),
        ),
        "resolution_stats": (figures.resolved_within_target, figures.resolution_breached_this_week),
        "stats_text": stats_text,
        "home": str(home),
        "metrics": metrics,
    }


def test_digest_export_stats_home_and_metrics_agree(ctx: AppContext, clock: FakeClock) -> None:
    # Monday 09:00 Berlin. "classic" is 24 h on the wall clock, "urgent" 1 h; classic conversations
    # must also be resolved (answered and closed) within 20 h.
    ctx.policy = dataclasses.replace(
        ctx.policy,
        policies=tuple(
            dataclasses.replace(p, resolution=20 * H) if p.name == "classic" else p
            for p in ctx.policy.policies
        ),
    )
    ingest(
        ctx,
        customer("a", "a general question", "ann", 0),  # classic: due Tue 08:00 UTC
        customer("b", "another general question", "bob", 0),  # classic
        customer("c", "the site is down", "cat", 0),  # urgent: due 09:00 UTC
        customer("d", "outage again", "dan", 0),  # urgent: due 09:00 UTC
        customer("e", "spam spam", "eve", 2),  # classic, closed without reply
    )
    clock.set(MONDAY + 2 * H)
    ingest(ctx, ours("rb", "b", 2))  # bob answered in 2 h: within
    with ctx.sessions() as session, session.begin():
        eve = session.scalars(select(Conversation).where(Conversation.author_handle == "eve")).one()
        staff.close(session, ctx, eve.id, "sam", "spam", clock.now())
        bob = session.scalars(select(Conversation).where(Conversation.author_handle == "bob")).one()
        staff.close(session, ctx, bob.id, "sam", "resolved", clock.now())  # resolved in 2 h: within
    # The worker is down from here: no sweep. Answers arrive later, backfilled with their times.
    clock.set(MONDAY + 31 * H)
    ingest(ctx, ours("ra", "a", 30), ours("rc", "c", 2.5))  # ann 6 h late, cat 1 h 30 min late
    with ctx.sessions() as session, session.begin():  # ann resolved at 31 h: 11 h past her 20 h
        ann = session.scalars(select(Conversation).where(Conversation.author_handle == "ann")).one()
        staff.close(session, ctx, ann.id, "sam", "resolved", clock.now())
    # dan is never answered: 30 h late at now.
    expected = {"ann": "breached", "bob": "within", "cat": "breached", "dan": "breached", "eve": "not_judged"}
    assert verdicts(ctx) == expected
    for phase in ("before the sweep", "after the sweep"):
        seen = readings(ctx)
        late = {"ann": 6 * H, "cat": 1.5 * H, "dan": 30 * H}
        assert seen["digest_breached"] == seen["export_breached"] == ["ann", "cat", "dan"], phase
        assert seen["export_late_by"] == late, phase
        digest_late = dict(seen["digest_late_by"])  # type: ignore[call-overload]
        assert digest_late["ann"] == late["ann"] and digest_late["cat"] == late["cat"], phase
        # The digest judges the unanswered one at its week's end, later than now.
        assert digest_late["dan"] > late["dan"], phase
        assert seen["digest_counts"] == seen["export_counts"] == seen["stats_counts"] == (1, 3), phase
        assert "25% within the deadline, 1 of 4" in str(seen["stats_text"]), phase
        assert "deadlines missed: 3" in str(seen["stats_text"]), phase
        assert "25% in time this week, 3 missed" in str(seen["home"]), phase
        # Resolution: bob within, ann late; eve closed unanswered is not judged; cat and dan
        # (urgent) have no target.
        assert seen["resolution_digest"] == (1, ["ann"]), phase
        assert seen["resolution_export"] == (["bob"], ["ann"]), phase
        assert seen["resolution_stats"] == (1, 1), phase
        assert "resolved within target: 1, resolution targets missed: 1" in str(seen["stats_text"]), phase
        assert "Resolution this week: 1 within target, 1 missed" in str(seen["home"]), phase
        metrics = str(seen["metrics"])
        assert 'replyclock_first_responses_this_week{team="care",verdict="within"} 1.0' in metrics, phase
        assert 'replyclock_first_responses_this_week{team="care",verdict="breached"} 3.0' in metrics, phase
        assert 'replyclock_resolutions_this_week{team="care",verdict="within"} 1.0' in metrics, phase
        assert 'replyclock_resolutions_this_week{team="care",verdict="breached"} 1.0' in metrics, phase
        sweep(ctx)
    assert verdicts(ctx) == expected
