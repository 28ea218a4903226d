"""Who may do what in Slack: one test per button, the reply modal, each /replyclock subcommand and
App Home, each for a Slack member outside the staff and for a staff member of another team.

The rules (bot.flow.staff):

- Acting on a conversation (every card button and the reply modal) is for staff only: the teams'
  experts, on-call people and managers. Anyone else is refused before anything is read or
  written, with a note only they see. Staff act only on their own teams' cards (its experts,
  manager and on-call; issue 11), unless the policy sets ``cross_team_actions = true``.
- Reading a queue or a team's figures (``/replyclock queue``, ``/replyclock stats``, App Home) is
  for the teams one works in (as expert, on-call or manager, so a manager reads the teams they
  manage); ``/replyclock mine`` and App Home's list are one's own conversations.

In tests/data/policy.toml: Maria is in billing; Sam and Nina are in care; Lee is in billing
and manages care. Everything runs over HTTP against the real web app (see tests/test_hostile.py's
`Door`), on one SQLite database for the module (each test uses conversations of its own).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from bot.core.clock import FakeClock
from bot.flow.context import AppContext
from bot.slack.ids import (
    ACTION_ANSWERED,
    ACTION_CLAIM,
    ACTION_CLOSE,
    ACTION_REASSIGN,
    ACTION_REPLY,
    ACTION_SNOOZE,
    ACTION_UNCLAIM,
    REPLY_BLOCK,
    VIEW_REPLY,
)
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models import Conversation
from tests.conftest import MONDAY
from tests.test_hostile import LEE, MARIA, NINA, SAM, STRANGER, Door, hostile_policy, open_door

NOT_STAFF = "Only replyclock staff"
BILLING_TEXT = "I was charged twice on my invoice"  # routed to billing (Maria or Lee)
CARE_TEXT = "Is the site down for everyone?"  # routed to care (urgent, Sam or Nina)
SUBCOMMANDS = [
    "mine",
    "queue",
    "queue care",
    "queue billing",
    "stats",
    "stats billing",
    "away until 2026-12-01",
    "back",
    "help",
    "",
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path: Path = tmp_path_factory.mktemp("permissions") / "replyclock.db"
    made = make_engine(f"sqlite:///{path}")
    upgrade(made)
    yield made
    made.dispose()


@pytest.fixture(scope="module")
def door(engine: Engine) -> Iterator[Door]:
    clock = FakeClock(MONDAY)
    ctx = AppContext(policy=hostile_policy(), engine=engine, clock=clock)
    yield from open_door(ctx, clock)


_seeded = [0]


def seed(door: Door, text: str) -> int:
    """A new conversation (its own author, so it never continues another one), card posted."""
    _seeded[0] += 1
    return door.seed(f"perm-{_seeded[0]}", text, author=f"customer{_seeded[0]}")


def close_everything(door: Door) -> None:
    """Close every open conversation left by earlier tests, so a queue lists only this test's."""
    with door.ctx.sessions() as session, session.begin():
        session.execute(
            update(Conversation)
            .where(Conversation.status != "closed")
            .values(status="closed", close_reason="test", next_action_at=None)
        )


def told(door: Door, user_id: str, since: int) -> list[str]:
    return [e.text for e in door.slack.ephemerals(user=user_id)[since:]]


# --------------------------------------------------------------------------------------------
# Card buttons and menus

BUTTONS = [
    pytest.param(ACTION_CLAIM, None, id="claim"),
    pytest.param(ACTION_UNCLAIM, None, id="unclaim"),
    pytest.param(ACTION_REASSIGN, MARIA, id="reassign"),
    pytest.param(ACTION_REPLY, None, id="reply"),
    pytest.param(ACTION_SNOOZE, "1h", id="snooze"),
    pytest.param(ACTION_ANSWERED, None, id="answered"),
    pytest.param(ACTION_CLOSE, "spam", id="close"),
]


@pytest.mark.parametrize(("action_id", "value"), BUTTONS)
def test_an_outsider_is_refused_on_every_card_button(door: Door, action_id: str, value: str | None) -> None:
    conversation_id = seed(door, BILLING_TEXT)
    if action_id == ACTION_UNCLAIM:  # something to unclaim: Maria holds it
        assert door.click(ACTION_CLAIM, conversation_id, MARIA) == 200
    before = door.state()
    notes = len(door.slack.ephemerals(user=STRANGER))
    opened = len(door.slack.calls_to("views.open"))
    assert door.click(action_id, conversation_id, STRANGER, value) == 200
    [note] = told(door, STRANGER, notes)
    assert note.startswith(NOT_STAFF)
    assert door.state() == before
    assert len(door.slack.calls_to("views.open")) == opened  # no reply form for them either


@contextmanager
def cross_team_actions(door: Door) -> Iterator[None]:
    policy = door.ctx.policy
    door.ctx.policy = dataclasses.replace(
        policy, settings=dataclasses.replace(policy.settings, cross_team_actions=True)
    )
    try:
        yield
    finally:
        door.ctx.policy = policy


@pytest.mark.parametrize(("action_id", "value"), BUTTONS)
def test_staff_of_another_team_are_refused_on_every_card_button(
    door: Door, action_id: str, value: str | None
) -> None:
    """Sam works in care; the conversation is billing's (issue 11, finding 6)."""
    conversation_id = seed(door, BILLING_TEXT)
    if action_id == ACTION_UNCLAIM:
        assert door.click(ACTION_CLAIM, conversation_id, MARIA) == 200
    before = door.state()
    notes = len(door.slack.ephemerals(user=SAM))
    opened = len(door.slack.calls_to("views.open"))
    assert door.click(action_id, conversation_id, SAM, value) == 200
    [note] = told(door, SAM, notes)
    assert "not one of your teams" in note
    assert door.state() == before
    assert len(door.slack.calls_to("views.open")) == opened


@pytest.mark.parametrize(("action_id", "value"), BUTTONS)
def test_staff_of_another_team_may_act_on_a_card_when_the_policy_allows(
    door: Door, action_id: str, value: str | None
) -> None:
    """With ``cross_team_actions = true`` acting is open to all staff."""
    with cross_team_actions(door):
        _act_across_teams(door, action_id, value)


def _act_across_teams(door: Door, action_id: str, value: str | None) -> None:
    conversation_id = seed(door, BILLING_TEXT)
    if action_id == ACTION_UNCLAIM:
        assert door.click(ACTION_CLAIM, conversation_id, SAM) == 200
    before = door.conversation(conversation_id)
    opened = len(door.slack.calls_to("views.open"))
    assert door.click(action_id, conversation_id, SAM, value) == 200
    after = door.conversation(conversation_id)
    expected: dict[str, Any] = {
        ACTION_CLAIM: lambda: after.claimed_by == "sam",
        ACTION_UNCLAIM: lambda: after.claimed_by is None and before.claimed_by == "sam",
        ACTION_REASSIGN: lambda: after.owner == "maria",
        ACTION_REPLY: lambda: len(door.slack.calls_to("views.open")) == opened + 1,
        ACTION_SNOOZE: lambda: after.next_action_at != before.next_action_at,
        ACTION_ANSWERED: lambda: after.status == "answered" and after.answered_by == "sam",
        ACTION_CLOSE: lambda: after.status == "closed" and after.close_reason == "spam",
    }
    assert expected[action_id](), action_id


# --------------------------------------------------------------------------------------------
# The reply modal


def test_an_outsider_cannot_submit_the_reply_modal(door: Door) -> None:
    conversation_id = seed(door, BILLING_TEXT)
    before = door.state()
    answer = door.submit_reply(STRANGER, conversation_id, "Refund granted, all of it!")
    assert answer.status == 200
    assert answer.json()["errors"][REPLY_BLOCK].startswith(NOT_STAFF)
    assert door.state() == before


def test_staff_of_another_team_cannot_submit_the_reply_modal(door: Door) -> None:
    conversation_id = seed(door, BILLING_TEXT)
    before = door.state()
    answer = door.submit_reply(NINA, conversation_id, "Sorry, the refund is on its way.")
    assert "not one of your teams" in answer.json()["errors"][REPLY_BLOCK]
    assert door.state() == before


def test_staff_of_another_team_may_submit_the_reply_modal_when_the_policy_allows(door: Door) -> None:
    conversation_id = seed(door, BILLING_TEXT)
    with cross_team_actions(door):
        answer = door.submit_reply(NINA, conversation_id, "Sorry, the refund is on its way.")
    assert answer.status == 200 and answer.body == ""  # the modal closes: the reply is queued
    after = door.conversation(conversation_id)
    assert (after.status, after.answered_by) == ("answered", "nina")


def test_an_outsider_cannot_submit_a_modal_of_another_kind_either(door: Door) -> None:
    conversation_id = seed(door, BILLING_TEXT)
    before = door.state()
    payload = door.slack.view_submission(
        STRANGER, {}, callback_id="some_other_modal", private_metadata=str(conversation_id)
    )
    assert door.interact(payload).status in (200, 404)
    assert door.state() == before
    assert VIEW_REPLY != "some_other_modal"


# --------------------------------------------------------------------------------------------
# /replyclock subcommands


@pytest.mark.parametrize("text", SUBCOMMANDS, ids=[text or "(empty)" for text in SUBCOMMANDS])
def test_an_outsider_gets_no_subcommand(door: Door, text: str) -> None:
    seed(door, BILLING_TEXT)
    seed(door, CARE_TEXT)
    before = door.state()
    answer = door.command(text, STRANGER)
    assert answer.startswith(NOT_STAFF)
    assert BILLING_TEXT not in answer and CARE_TEXT not in answer
    assert door.state() == before


@pytest.mark.parametrize(
    ("user_id", "team", "how"),
    [
        (MARIA, "care", "care"),
        (MARIA, "care", "Customer Care"),
        (MARIA, "care", "#care"),
        (SAM, "billing", "billing"),
        (NINA, "billing", "BILLING"),
    ],
    ids=["maria-care", "maria-care-by-label", "maria-care-by-channel", "sam-billing", "nina-billing"],
)
@pytest.mark.parametrize("verb", ["queue", "stats"])
def test_staff_cannot_read_another_teams_queue_or_figures(
    door: Door, verb: str, user_id: str, team: str, how: str
) -> None:
    theirs = seed(door, CARE_TEXT if team == "care" else BILLING_TEXT)
    before = door.state()
    answer = door.command(f"{verb} {how}", user_id)
    assert answer.startswith("You can only see the queues of your own teams"), answer
    assert f"#{theirs}" not in answer and "open" not in answer
    assert door.state() == before


@pytest.mark.parametrize(
    ("user_id", "team", "label"),
    [
        (MARIA, "billing", "Billing"),
        (SAM, "care", "Customer Care"),
        (LEE, "billing", "Billing"),  # an expert of billing
        (LEE, "care", "Customer Care"),  # the manager of care
    ],
    ids=["maria-billing", "sam-care", "lee-billing", "lee-manages-care"],
)
def test_staff_read_their_own_teams_and_managers_the_teams_they_manage(
    door: Door, user_id: str, team: str, label: str
) -> None:
    close_everything(door)
    conversation_id = seed(door, CARE_TEXT if team == "care" else BILLING_TEXT)
    queue = door.command(f"queue {team}", user_id)
    assert queue.startswith(f"*{label}*:") and f"#{conversation_id}" in queue
    assert queue.startswith(f"*{label}*: 1 open")
    stats = door.command(f"stats {team}", user_id)
    assert stats.startswith(f"*{label}*, this week") and "• open: 1 " in stats


def test_queue_and_stats_without_a_team_show_the_first_own_team(door: Door) -> None:
    seed(door, CARE_TEXT)
    assert door.command("queue", SAM).startswith("*Customer Care*")
    assert door.command("stats", MARIA).startswith("*Billing*")
    assert "No team called" in door.command("queue nowhere", MARIA)
    assert "Your teams: billing." in door.command("queue nowhere", MARIA)


def test_mine_lists_only_ones_own_conversations(door: Door) -> None:
    care = seed(door, CARE_TEXT)
    billing = seed(door, BILLING_TEXT)
    owner = door.conversation(billing).owner
    assert owner in ("maria", "lee")
    not_owner = {"maria": MARIA, "lee": LEE}[owner]
    mine = door.command("mine", SAM if door.conversation(care).owner == "sam" else NINA)
    assert f"#{care}" in mine and f"#{billing}" not in mine
    assert f"#{care}" not in door.command("mine", not_owner)


def test_away_and_back_change_only_the_asker(door: Door) -> None:
    before = door.state()
    assert door.command("away until 2026-12-01", NINA).startswith("You are away through")
    after = door.state()
    changed = {row for row in after[2] if row not in before[2]}
    assert {expert_id for expert_id, _until in changed} == {"nina"}
    assert door.command("back", NINA).startswith("Welcome back")


# --------------------------------------------------------------------------------------------
# App Home


def _home_text(view: dict[str, Any]) -> str:
    return json.dumps(view, ensure_ascii=False)


def test_app_home_shows_an_outsider_nothing(door: Door) -> None:
    seed(door, BILLING_TEXT)
    seed(door, CARE_TEXT)
    before = door.state()
    home = _home_text(door.open_home(STRANGER))
    assert "not in a replyclock team" in home
    assert "Your queue" not in home and "#" not in home.replace("#care", "")
    assert door.state() == before


@pytest.mark.parametrize(
    ("user_id", "teams", "not_shown"),
    [
        (MARIA, ["Billing"], ["Customer Care"]),
        (SAM, ["Customer Care"], ["Billing"]),
        (LEE, ["Customer Care", "Billing"], []),
    ],
    ids=["maria", "sam", "lee-manager"],
)
def test_app_home_shows_only_ones_own_conversations_and_teams(
    door: Door, user_id: str, teams: list[str], not_shown: list[str]
) -> None:
    care = seed(door, CARE_TEXT)
    billing = seed(door, BILLING_TEXT)
    view = door.open_home(user_id)
    sections = [block.get("text", {}).get("text", "") for block in view["blocks"]]
    figures = [text.split("*")[1] for text in sections if text.startswith("*") and "open ·" in text]
    assert figures == teams
    for label in not_shown:
        assert all(not text.startswith(f"*{label}*") for text in sections)
    expert = {MARIA: "maria", SAM: "sam", LEE: "lee"}[user_id]
    listed = " ".join(text for text in sections if text.startswith((":red_circle:", ":large_blue_circle:")))
    for conversation_id in (care, billing):
        conversation = door.conversation(conversation_id)
        mine = expert in (conversation.owner, conversation.claimed_by)
        assert (f"*#{conversation_id}*" in listed) == mine, (conversation_id, conversation.owner)
