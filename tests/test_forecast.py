"""Honest acknowledgements and "at risk" notices (bot.sim.forecast), end to end: real database,
ingest, the sweep, the outbox sender and the real slack_sdk client against the Slack stand-in."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from slack_sdk import WebClient
from sqlalchemy import Engine, select

from bot.config import ConfigError, parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.demo.standin import DEFAULT_TOKEN, SlackStandIn, SlackUser
from bot.flow.context import AppContext
from bot.flow.outbox import OutboxSender
from bot.flow.sweep import sweep
from bot.sim.engine import SimConversation
from bot.sim.forecast import AT_RISK_CHANCE, forecast_for, forget_models
from bot.sim.synth import write_history
from bot.slack.delivery import slack_handlers
from storage.models import Conversation, Event, Outbox
from tests.conftest import MONDAY, POLICY_TOML
from tests.test_ingest import ingest, post

BILLING_CHANNEL = "C0BILL0001"
USERS = [
    SlackUser("U0MARIA01", "Maria Keller", tz="Europe/Berlin"),
    SlackUser("U0LEE0001", "Lee Wong", tz="Europe/Berlin"),
    SlackUser("U0SAM0001", "Sam Okafor", tz="Europe/London"),
    SlackUser("U0NINA001", "Nina Park", tz="America/New_York"),
]


def forecasting_policy(extra: str = "forecast_ack = true\nat_risk = true\n") -> Policy:
    text = POLICY_TOML.replace(
        'on_call = "lee"\nmanager = "lee"\n', f'on_call = "lee"\nmanager = "lee"\n{extra}', 1
    )
    return parse_policy(tomllib.loads(text), source="forecast.toml", text=text)


@pytest.fixture
def fctx(engine: Engine) -> Iterator[AppContext]:
    forget_models()
    ctx = AppContext(policy=forecasting_policy(), engine=engine, clock=FakeClock(MONDAY))
    # History: four weeks of billing conversations, each answered by Maria in 30 working minutes.
    history: list[SimConversation] = []
    for week in range(1, 5):
        for day in range(5):
            for hour in (9, 11, 14):
                opened = MONDAY - timedelta(weeks=week) + timedelta(days=day, hours=hour - 8)
                history.append(
                    SimConversation(
                        key=len(history),
                        team="billing",
                        policy="billing",
                        calendar="berlin",
                        owner="maria",
                        opened_at=opened,
                        first_due_at=opened + timedelta(hours=8),
                        first_target=timedelta(hours=8),
                        warn_at=(),
                        first_response_at=opened + timedelta(minutes=30),
                        answered_by="maria",
                    )
                )
    from bot.sim.engine import Arrival

    arrivals = [Arrival(c.key, c.opened_at, "x", f"old{c.key}", "old invoice") for c in history]
    with ctx.sessions() as session, session.begin():
        write_history(session, ctx.policy, arrivals, history)
    yield ctx
    forget_models()


def test_forecast_keys_are_validated() -> None:
    assert forecasting_policy().teams["billing"].forecast_ack
    assert not forecasting_policy().teams["care"].at_risk
    with pytest.raises(ConfigError, match="forecast_percentile: must be from 50 to 99"):
        forecasting_policy("forecast_percentile = 40\n")
    with pytest.raises(ConfigError):
        forecasting_policy('at_risk = "yes"\n')


def test_the_acknowledgement_promises_the_forecast_not_the_deadline(fctx: AppContext) -> None:
    ingest(fctx, post("1", "I was charged twice on my invoice"))
    with fctx.sessions() as session:
        conversation = session.scalars(select(Conversation).where(Conversation.status == "open")).one()
        ack = session.scalars(select(Outbox).where(Outbox.kind == "ack")).one()
    assert conversation.due_at == datetime(2026, 11, 23, 16, 0, tzinfo=UTC)  # 17:00 Berlin
    # An empty queue and 30-minute answers: promised for 09:30 Berlin, not 17:00.
    assert "09:30" in ack.payload["text"] and "17:00" not in ack.payload["text"]


def test_without_the_switch_the_acknowledgement_promises_the_deadline(engine: Engine) -> None:
    ctx = AppContext(policy=forecasting_policy(""), engine=engine, clock=FakeClock(MONDAY))
    ingest(ctx, post("1", "I was charged twice on my invoice"))
    with ctx.sessions() as session:
        ack = session.scalars(select(Outbox).where(Outbox.kind == "ack")).one()
    assert "17:00" in ack.payload["text"]


def test_a_claim_keeps_its_claimer_busy_for_the_rest_of_the_answer(fctx: AppContext) -> None:
    # Three billing questions at 09:00 Berlin; Maria and Lee each answer in 30 working minutes.
    ingest(fctx, *(post(str(i), f"refund please, order {i}", author=f"c{i}") for i in range(3)))
    with fctx.sessions() as session, session.begin():
        first, second, third = session.scalars(
            select(Conversation)
            .where(Conversation.status == "open")
            .order_by(Conversation.due_at, Conversation.id)
        ).all()
        before = forecast_for(session, fctx.policy, third, MONDAY, calendar_of=fctx.expert_calendar)
        # Nothing claimed: both start on the first two now, the third follows at 09:30 -> 10:00.
        assert before is not None and before.ahead == 2 and before.at == MONDAY + timedelta(hours=1)
        # Maria claimed the first ten minutes ago: twenty left, then she takes the third (-> 09:50).
        first.claimed_by, first.claimed_at = "maria", MONDAY - timedelta(minutes=10)
        session.flush()
        after = forecast_for(session, fctx.policy, third, MONDAY, calendar_of=fctx.expert_calendar)
        assert after is not None and after.at == MONDAY + timedelta(minutes=50)
        # Due at 13:00: no chance of a breach, nothing at risk.
        assert after.chance == 0.0 and not after.at_risk and after.promised == after.at
        assert second.due_at == third.due_at


def test_at_risk_reaches_slack_before_any_warning(fctx: AppContext) -> None:
    # Forty billing questions at once: far more than two experts answer in one working day.
    ingest(fctx, *(post(str(i), f"refund please, order {i}", author=f"c{i}") for i in range(40)))
    with SlackStandIn(channels={BILLING_CHANNEL: "billing", "C0CARE0001": "care"}, users=USERS) as slack:
        client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
        sender = OutboxSender(fctx, {**slack_handlers(fctx, client), "ack": lambda message: "ack sent"})
        result = sweep(fctx)
        assert result.at_risk > 0
        for _ in range(5):
            sender.send_due()
        notices = [m for m in slack.messages(BILLING_CHANNEL) if m.is_reply and "At risk" in m.text]
        assert slack.internal_errors == []
    with fctx.sessions() as session:
        at_risk = list(session.scalars(select(Event).where(Event.action == "at_risk")))
        warnings = list(session.scalars(select(Event).where(Event.action == "warning")))
        conversations = {
            c.id: c for c in session.scalars(select(Conversation).where(Conversation.status == "open"))
        }
    assert len(notices) == len(at_risk) == result.at_risk
    assert warnings == []  # the fixed warning (13:00 Berlin) has not fired yet
    # The owner is pinged in the card's thread, where the team sees it.
    assert all("Owner: <@U0" in str(notice.blocks) for notice in notices)
    flagged = {event.conversation_id for event in at_risk}
    # The earliest deadlines of each owner's queue are not at risk; the latest are.
    for conversation in conversations.values():
        forecast = next((e.detail for e in at_risk if e.conversation_id == conversation.id), None)
        if forecast is not None:
            assert datetime.fromisoformat(forecast["forecast_at"]) > conversation.due_at
            assert forecast["chance"] >= AT_RISK_CHANCE
    assert 0 < len(flagged) < len(conversations)
    # Once per cycle: later sweeps may flag more (time passes, nobody answers), never one again.
    assert isinstance(fctx.clock, FakeClock)
    for _ in range(3):
        fctx.clock.advance(timedelta(minutes=10))
        sweep(fctx)
    with fctx.sessions() as session:
        flagged_ids = [
            e.conversation_id for e in session.scalars(select(Event).where(Event.action == "at_risk"))
        ]
    assert len(flagged_ids) == len(set(flagged_ids)) >= len(flagged)
