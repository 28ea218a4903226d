"""The escalation ladder as a pure function: steps in order, each once, owners' hours respected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.ladder import LadderState, Plan, Step, plan, resolution_plan, step_key
from bot.core.policy import EscalationStep, SlaPolicy

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
DUE = T0 + timedelta(hours=4)
WARN = (T0 + timedelta(hours=3),)
POLICY = SlaPolicy(
    name="p",
    clock="wall",
    calendar=None,
    first_response=timedelta(hours=4),
    warn_at=(0.75,),
    nag_every=timedelta(hours=1),
    escalation=(
        EscalationStep(timedelta(minutes=30), "team_channel"),
        EscalationStep(timedelta(hours=2), "manager"),
    ),
)


def always(_at: datetime) -> bool:
    return True


def back_now(at: datetime) -> datetime:
    return at


def run(state: LadderState, now: datetime, *, on_duty=always, next_on_duty=back_now, policy=POLICY) -> Plan:  # type: ignore[no-untyped-def]
    return plan(
        policy=policy,
        due_at=DUE,
        warn_at=WARN,
        state=state,
        now=now,
        owner_on_duty=on_duty,
        owner_next_on_duty=next_on_duty,
    )


def walk(until: datetime, *, on_duty=always, next_on_duty=back_now) -> list[tuple[str, int, datetime]]:  # type: ignore[no-untyped-def]
    """Follow next_action_at like the sweep does; return (kind, index, when-done)."""
    state = LadderState(assigned_at=T0)
    done: list[tuple[str, int, datetime]] = []
    now = T0
    while now <= until:
        result = run(state, now, on_duty=on_duty, next_on_duty=next_on_duty)
        done.extend((s.kind, s.index, now) for s in result.steps)
        state = result.state
        assert result.next_action_at is not None and result.next_action_at > now
        now = result.next_action_at
    return done


def test_nothing_before_the_first_warning() -> None:
    result = run(LadderState(), T0 + timedelta(hours=1))
    assert result.steps == ()
    assert result.next_action_at == WARN[0]


def test_full_ladder_in_order() -> None:
    done = walk(DUE + timedelta(hours=3, minutes=30))
    assert [(k, i) for k, i, _ in done] == [
        ("warning", 0),
        ("breach", 0),
        ("escalation", 0),
        ("nag", 1),
        ("escalation", 1),
        ("nag", 2),
        ("nag", 3),
    ]
    times = {(k, i): at for k, i, at in done}
    assert times[("warning", 0)] == WARN[0]
    assert times[("breach", 0)] == DUE
    assert times[("escalation", 0)] == DUE + timedelta(minutes=30)
    assert times[("nag", 1)] == DUE + timedelta(hours=1)
    assert times[("escalation", 1)] == DUE + timedelta(hours=2)


def test_a_late_sweep_does_not_send_a_stale_warning() -> None:
    result = run(LadderState(), DUE + timedelta(minutes=1))
    assert [s.kind for s in result.steps] == ["breach"]
    assert result.state.warnings_sent == 1


def test_nags_wait_for_the_owners_hours_but_escalation_does_not() -> None:
    back = DUE + timedelta(hours=5, minutes=15)

    def on_duty(at: datetime) -> bool:
        return at >= back

    def next_on_duty(at: datetime) -> datetime:
        return max(at, back)

    done = walk(DUE + timedelta(hours=5, minutes=30), on_duty=on_duty, next_on_duty=next_on_duty)
    kinds = [(k, i) for k, i, _ in done]
    # Escalations at their times although the owner is away; the missed nags collapse into one.
    assert ("escalation", 0) in kinds and ("escalation", 1) in kinds
    nags = [(i, at) for k, i, at in done if k == "nag"]
    assert nags == [(5, back)]


def test_reassign_when_unclaimed() -> None:
    policy = SlaPolicy(
        name="p",
        clock="wall",
        calendar=None,
        first_response=timedelta(hours=4),
        claim_within=timedelta(minutes=30),
    )
    first = run(LadderState(assigned_at=T0), T0, policy=policy)
    assert first.next_action_at == T0 + timedelta(minutes=30)
    second = run(first.state, T0 + timedelta(minutes=30), policy=policy)
    assert [s.kind for s in second.steps] == ["reassign"]
    assert second.state.assigned_at == T0 + timedelta(minutes=30)
    claimed = run(LadderState(assigned_at=T0, claimed=True), T0 + timedelta(hours=1), policy=policy)
    assert claimed.steps == ()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40))
def test_each_step_at_most_once_whatever_the_sweep_times(gaps: list[int]) -> None:
    """However irregularly the sweep runs, no step (kind, index) is ever produced twice."""
    state = LadderState(assigned_at=T0)
    now = T0
    seen: set[tuple[str, int]] = set()
    for gap in gaps:
        now += timedelta(minutes=gap)
        result = run(state, now)
        for step in result.steps:
            assert (step.kind, step.index) not in seen
            assert step.scheduled_at <= now
            seen.add((step.kind, step.index))
        state = result.state
    if now >= DUE:
        assert ("breach", 0) in seen
    if now >= DUE + timedelta(hours=2):
        assert ("escalation", 1) in seen


def test_step_keys_are_per_cycle_for_responses_and_per_conversation_for_resolution() -> None:
    at = datetime(2026, 11, 23, tzinfo=UTC)
    assert step_key(7, 2, Step("breach", 0, at, "team_channel")) == "conv:7:c2:breach:0"
    assert step_key(7, 2, Step("resolution_warning", 1, at, "owner")) == "conv:7:resolution:warning:1"
    assert step_key(7, 0, Step("resolution_breach", 0, at, "owner")) == "conv:7:resolution:breach:0"


@settings(max_examples=200, deadline=None)
@given(
    looks=st.lists(st.integers(min_value=0, max_value=30 * 60), min_size=1, max_size=12),
    shares=st.lists(st.sampled_from([0.25, 0.5, 0.75, 0.9, 1.0, 0.0]), max_size=4),
)
def test_resolution_notices_come_once_each_and_in_order(looks: list[int], shares: list[float]) -> None:
    """Whenever the sweep happens to look, each notice comes at most once, warnings before the
    breach, never a warning at or after the deadline, and the breach once the deadline is past."""
    start = datetime(2026, 11, 23, tzinfo=UTC)
    target = timedelta(hours=20)
    due = start + target
    sent, breach_sent, kinds = 0, False, []
    for minute in sorted(looks):
        now = start + timedelta(minutes=minute)
        decided = resolution_plan(
            due_at=due,
            target=target,
            warn_at=tuple(shares),
            warnings_sent=sent,
            breach_sent=breach_sent,
            now=now,
            left_on_clock=lambda at: max(due - at, timedelta(0)),
            clock_after=lambda at, amount: at + amount,
        )
        for step in decided.steps:
            assert step.kind != "resolution_warning" or now < due
            kinds.append((step.kind, step.index))
        sent, breach_sent = decided.warnings_sent, decided.breach_sent
        assert decided.next_action_at is None or decided.next_action_at > now
    assert len(kinds) == len(set(kinds))
    assert [kind for kind, _ in kinds].count("resolution_breach") == (1 if max(looks) >= 20 * 60 else 0)
    if ("resolution_breach", 0) in kinds:
        assert kinds[-1] == ("resolution_breach", 0)  # nothing after the breach notice
