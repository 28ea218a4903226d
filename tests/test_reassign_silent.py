"""Nobody sits on a conversation: a claimed one whose owner neither answers nor acts moves on."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from sqlalchemy import select

from bot.core.clock import FakeClock
from bot.core.ladder import LadderState, plan
from bot.core.policy import SlaPolicy
from bot.flow import staff
from bot.flow.context import AppContext
from bot.flow.sweep import sweep
from storage.models import Conversation, Event, Outbox
from tests.conftest import MONDAY
from tests.test_ingest import ingest, post

H = timedelta(hours=1)


def test_the_ladder_reassigns_a_silent_claim_and_only_then() -> None:
    policy = SlaPolicy(name="p", clock="wall", calendar=None, first_response=8 * H, reassign_if_silent=2 * H)
    state = LadderState(claimed=True, assigned_at=MONDAY, owner_active_at=MONDAY + H)
    kwargs = {"policy": policy, "due_at": MONDAY + 8 * H, "warn_at": (), "owner_on_duty": lambda _at: True}
    early = plan(state=state, now=MONDAY + 2 * H, owner_next_on_duty=lambda at: at, **kwargs)  # type: ignore[arg-type]
    assert early.steps == () and early.next_action_at == MONDAY + 3 * H
    due = plan(state=state, now=MONDAY + 3 * H, owner_next_on_duty=lambda at: at, **kwargs)  # type: ignore[arg-type]
    assert [(s.kind, s.scheduled_at) for s in due.steps] == [("reassign", MONDAY + 3 * H)]
    assert due.state.claimed is False and due.state.reassignments == 1
    unclaimed = plan(
        state=dataclasses.replace(state, claimed=False),
        now=MONDAY + 5 * H,
        owner_next_on_duty=lambda at: at,
        **kwargs,
    )  # type: ignore[arg-type]
    assert unclaimed.steps == ()


def test_a_silent_owner_loses_the_claim_an_active_one_keeps_it(ctx: AppContext, clock: FakeClock) -> None:
    ctx.policy = dataclasses.replace(
        ctx.policy,
        policies=tuple(
            dataclasses.replace(p, reassign_if_silent=2 * H) if p.name == "billing" else p
            for p in ctx.policy.policies
        ),
    )
    ingest(ctx, post("1", "refund for my invoice please"))  # billing, proposed to maria
    ingest(ctx, post("2", "another invoice question", author="bo"))
    with ctx.sessions() as session, session.begin():
        first, second = (c.id for c in session.scalars(select(Conversation).order_by(Conversation.id)))
        staff.claim(session, ctx, first, "maria", clock.now())
        staff.claim(session, ctx, second, "maria", clock.now())
    clock.advance(H)
    with ctx.sessions() as session, session.begin():  # maria acts on the second one
        staff.snooze(session, ctx, second, "maria", clock.now() + 30 * timedelta(minutes=1), clock.now())
    clock.advance(H + timedelta(minutes=1))  # 2 h 01 min after the claims
    sweep(ctx)
    with ctx.sessions() as session:
        silent = session.get(Conversation, first)
        active = session.get(Conversation, second)
        assert silent is not None and active is not None
        assert (silent.owner, silent.claimed_by) == ("lee", None)
        assert (active.owner, active.claimed_by) == ("maria", "maria")
        note = session.scalars(select(Outbox.payload).where(Outbox.kind == "reassign")).one()
        assert note["previous_owner"] == "maria" and note["reason"] == "silent" and "note" not in note
        assert (
            session.scalars(select(Event.action).where(Event.conversation_id == first)).all()[-1]
            == "reassign"
        )
    clock.advance(timedelta(minutes=58))
    sweep(ctx)  # the active owner's silence runs out only 2 h after the snooze
    with ctx.sessions() as session:
        active = session.get(Conversation, second)
        assert active is not None and active.claimed_by == "maria"
    clock.advance(timedelta(minutes=2))
    sweep(ctx)
    with ctx.sessions() as session:
        active = session.get(Conversation, second)
        assert active is not None and active.claimed_by is None and active.owner == "lee"


def _follow_the_sun(ctx: AppContext, enabled: bool) -> None:
    teams = dict(ctx.policy.teams)
    teams["care"] = dataclasses.replace(teams["care"], experts=("nina", "sam"), follow_the_sun=enabled)
    ctx.policy = dataclasses.replace(ctx.policy, teams=teams)


def test_follow_the_sun_hands_over_when_the_owners_day_ends_before_the_deadline(
    ctx: AppContext, clock: FakeClock
) -> None:
    from bot.slack.blocks import reassign_message

    _follow_the_sun(ctx, True)
    evening = MONDAY.replace(hour=21, minute=30)  # 16:30 in New York: Nina works until 17:00
    clock.set(evening)
    ingest(ctx, post("1", "the site is down", at=evening))  # urgent: due in 1 h, 22:30 UTC
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert conversation.owner == "nina" and conversation.due_at == evening + H
        assert conversation.next_action_at == MONDAY.replace(hour=22)  # her day's end comes first
    clock.set(MONDAY.replace(hour=22))
    sweep(ctx)
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert conversation.owner == "sam" and conversation.claimed_by is None
        note = session.scalars(select(Outbox).where(Outbox.kind == "reassign")).one()
        assert note.payload["reason"] == "handover" and note.payload["previous_owner"] == "nina"
        assert "handover" in session.scalars(select(Event.action)).all()
        text = reassign_message(
            conversation,
            ctx_policy=ctx.policy,
            now=clock.now(),
            owner="sam",
            previous_owner="nina",
            reason="handover",
        )
    assert "Handover: *Nina Park*'s working hours end before *#1*" in str(
        text
    ) and "<@U0SAM0001> takes it over" in str(text)


def test_without_follow_the_sun_the_owner_keeps_it_overnight(ctx: AppContext, clock: FakeClock) -> None:
    _follow_the_sun(ctx, False)
    evening = MONDAY.replace(hour=21, minute=30)
    clock.set(evening)
    ingest(ctx, post("1", "the site is down", at=evening))
    clock.set(MONDAY.replace(hour=22, minute=16))
    sweep(ctx)
    with ctx.sessions() as session:
        assert session.scalars(select(Conversation.owner)).one() == "nina"


def _silence_policy(ctx: AppContext) -> None:
    ctx.policy = dataclasses.replace(
        ctx.policy,
        policies=tuple(
            dataclasses.replace(p, reassign_if_silent=2 * H) if p.name == "billing" else p
            for p in ctx.policy.policies
        ),
    )


def test_silence_counts_the_owners_working_hours_not_the_night() -> None:
    """Pure: a claim at 17:55 by an owner who stops at 18:00 is silent 2 h later of their hours."""
    policy = SlaPolicy(name="p", clock="wall", calendar=None, first_response=48 * H, reassign_if_silent=2 * H)
    claimed_at = MONDAY.replace(hour=16, minute=55)  # 17:55 Berlin; the owner works 08:00-18:00

    def working_time_after(start: datetime, amount: timedelta) -> datetime:
        assert start == claimed_at and amount == 2 * H
        return MONDAY.replace(hour=8, minute=55) + 24 * H  # 5 min on Monday, 1 h 55 from 08:00

    state = LadderState(claimed=True, assigned_at=claimed_at, owner_active_at=claimed_at)
    kwargs = {
        "policy": policy,
        "due_at": MONDAY + 48 * H,
        "warn_at": (),
        "state": state,
        "owner_on_duty": lambda _at: True,
        "owner_next_on_duty": lambda at: at,
        "owner_working_time_after": working_time_after,
    }
    night = plan(now=claimed_at + 3 * H, **kwargs)  # type: ignore[arg-type]
    assert night.steps == () and night.next_action_at == MONDAY.replace(hour=8, minute=55) + 24 * H
    morning = plan(now=MONDAY.replace(hour=8, minute=55) + 24 * H, **kwargs)  # type: ignore[arg-type]
    assert [step.kind for step in morning.steps] == ["reassign"]


def test_a_claim_before_the_owners_day_ends_is_not_silent_overnight(
    ctx: AppContext, clock: FakeClock
) -> None:
    _silence_policy(ctx)
    claim_at = MONDAY.replace(hour=16, minute=55)  # 17:55 Berlin: Maria works until 18:00
    clock.set(claim_at)
    ingest(ctx, post("1", "refund for my invoice please", at=claim_at))
    with ctx.sessions() as session, session.begin():
        conversation_id = session.scalars(select(Conversation.id)).one()
        staff.claim(session, ctx, conversation_id, "maria", claim_at)
    tuesday_0955 = MONDAY.replace(hour=8, minute=55) + 24 * H  # 5 min Monday + 1 h 55 from 08:00
    clock.set(claim_at + 2 * H)  # the sweep looks when the claim offer would have run out
    sweep(ctx)
    with ctx.sessions() as session:
        conversation = session.get(Conversation, conversation_id)
        assert conversation is not None and conversation.claimed_by == "maria"
        assert conversation.next_action_at == tuesday_0955
    # The sweep looks in the night anyway (say, a restart): 2 h of wall time have passed, not of hers.
    clock.set(MONDAY.replace(hour=22))
    with ctx.sessions() as session, session.begin():
        session.get(Conversation, conversation_id).next_action_at = clock.now()  # type: ignore[union-attr]
    sweep(ctx)
    with ctx.sessions() as session:
        conversation = session.get(Conversation, conversation_id)
        assert conversation is not None and conversation.claimed_by == "maria"
        assert conversation.next_action_at == tuesday_0955
    clock.set(tuesday_0955 - timedelta(minutes=1))
    sweep(ctx)
    with ctx.sessions() as session:
        assert session.get(Conversation, conversation_id).claimed_by == "maria"  # type: ignore[union-attr]
    clock.set(tuesday_0955)
    sweep(ctx)
    with ctx.sessions() as session:
        conversation = session.get(Conversation, conversation_id)
        assert conversation is not None and (conversation.owner, conversation.claimed_by) == ("lee", None)
        note = session.scalars(select(Outbox.payload).where(Outbox.kind == "reassign")).one()
        assert note["reason"] == "silent" and note["scheduled_at"] == tuesday_0955.isoformat()


def test_a_claim_late_in_the_day_is_handed_over_at_the_shift_end(ctx: AppContext, clock: FakeClock) -> None:
    """Follow the sun: Nina (New York, 09:00-17:00) claims at 16:55 one due tomorrow 08:30;
    the sweep looks at 17:00 her time and Sam takes it then, not at the next ladder step."""
    _follow_the_sun(ctx, True)
    clock.set(MONDAY.replace(hour=13, minute=30))  # 08:30 in New York
    ingest(ctx, post("1", "where is my parcel?", at=clock.now()))  # care, classic: 24 h
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        conversation_id, due_at = conversation.id, conversation.due_at
    assert due_at == MONDAY.replace(hour=13, minute=30) + 24 * H  # before Nina is back at 09:00
    clock.set(MONDAY.replace(hour=21, minute=55))
    with ctx.sessions() as session, session.begin():
        staff.claim(session, ctx, conversation_id, "nina", clock.now())
    with ctx.sessions() as session:
        assert session.get(Conversation, conversation_id).next_action_at == MONDAY.replace(hour=22)  # type: ignore[union-attr]
    clock.set(MONDAY.replace(hour=22))
    sweep(ctx)
    with ctx.sessions() as session:
        conversation = session.get(Conversation, conversation_id)
        assert conversation is not None and (conversation.owner, conversation.claimed_by) == ("sam", None)
        note = session.scalars(select(Outbox.payload).where(Outbox.kind == "reassign")).one()
        assert note["reason"] == "handover" and note["previous_owner"] == "nina"


def _staggered_team(ctx: AppContext, team: str, policy: str, **changes: object) -> None:
    """`team` follows the sun with Maria (07:00-17:00 UTC), Nina (14:00-22:00 UTC) and Sam (always),
    under `policy` changed by `changes`."""
    teams = dict(ctx.policy.teams)
    teams[team] = dataclasses.replace(teams[team], experts=("maria", "nina", "sam"), follow_the_sun=True)
    policies = tuple(
        dataclasses.replace(p, **changes) if p.name == policy else p for p in ctx.policy.policies
    )
    ctx.policy = dataclasses.replace(ctx.policy, teams=teams, policies=policies)


def _reassignments_written(ctx: AppContext) -> tuple[int, list[tuple[str, int, object, object]], list[str]]:
    """The counter, the reassign notices (key, index, previous owner, owner) and the audited
    reassignments (handover and reassign events) of the only conversation."""
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        notes = [
            (
                note.idempotency_key,
                int(note.payload["index"]),
                note.payload["previous_owner"],
                note.payload["owner"],
            )
            for note in session.scalars(select(Outbox).where(Outbox.kind == "reassign").order_by(Outbox.id))
        ]
        events = list(
            session.scalars(
                select(Event.action).where(Event.action.in_(("handover", "reassign"))).order_by(Event.id)
            )
        )
        return conversation.reassignments, notes, events


def _maria_owns_one_due_at_2230(ctx: AppContext, clock: FakeClock, text: str) -> int:
    """One post at 16:30 UTC Monday, six hours to answer: Maria owns it, due 22:30 UTC. Its id."""
    clock.set(MONDAY.replace(hour=16, minute=30))
    ingest(ctx, post("1", text, at=clock.now()))
    with ctx.sessions() as session:
        conversation = session.scalars(select(Conversation)).one()
        assert (conversation.owner, conversation.due_at) == ("maria", MONDAY.replace(hour=22, minute=30))
        return conversation.id


def _assert_maria_nina_sam(ctx: AppContext, cid: int, events: list[str]) -> None:
    """Two reassignments in the cycle (Maria to Nina, Nina to Sam), each with its own key and event."""
    count, notes, written = _reassignments_written(ctx)
    assert notes == [
        (f"conv:{cid}:c0:reassign:0", 0, "maria", "nina"),
        (f"conv:{cid}:c0:reassign:1", 1, "nina", "sam"),
    ]
    assert written == events
    assert count == 2
    with ctx.sessions() as session:
        assert session.scalars(select(Conversation.owner)).one() == "sam"


def test_a_handover_then_a_second_handover_each_get_their_own_notice(
    ctx: AppContext, clock: FakeClock
) -> None:
    """Maria's day ends (17:00 UTC): Nina takes it; Nina's ends (22:00 UTC) before the deadline: Sam.
    Two reassignments in one cycle: two notices under their own keys, two events, a count of 2."""
    _staggered_team(ctx, "care", "urgent", first_response=6 * H)
    cid = _maria_owns_one_due_at_2230(ctx, clock, "the site is down")  # care, urgent
    for at in (MONDAY.replace(hour=17), MONDAY.replace(hour=21), MONDAY.replace(hour=22)):
        clock.set(at)
        sweep(ctx)
    _assert_maria_nina_sam(ctx, cid, ["handover", "handover"])


def test_a_handover_then_an_unclaimed_offer_each_get_their_own_notice(
    ctx: AppContext, clock: FakeClock
) -> None:
    """Maria's day ends (17:00 UTC): Nina takes it but does not claim it within the hour: Sam gets it
    at 18:00, with a notice and an event of its own (not the handover's key, written already)."""
    _staggered_team(ctx, "billing", "billing", clock="wall", first_response=6 * H, claim_within=H)
    cid = _maria_owns_one_due_at_2230(ctx, clock, "refund for my invoice please")  # billing
    for at in (MONDAY.replace(hour=17), MONDAY.replace(hour=18)):
        clock.set(at)
        sweep(ctx)
    _assert_maria_nina_sam(ctx, cid, ["handover", "reassign"])
