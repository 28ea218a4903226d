"""Issue 11, the public edge: what customers can make us say, replays, permissions, edges.

Each test names the finding (1-7 of issue 11) it proves fixed; database tests run on SQLite and,
with REPLYCLOCK_TEST_DATABASE_URL, on PostgreSQL.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from bot.cli import main as cli_main
from bot.config import ConfigError, parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from bot.flow.retention import Pruned, prune, pseudonym
from connectors.base import InboundPost
from storage.models import Conversation, Event, Outbox, Post
from tests.conftest import MONDAY, POLICY_TOML

EDGE_ACCOUNTS = """
[accounts.shop]
kind = "webhook"
reply_url = "http://127.0.0.1:9/replies"

[accounts.toots]
kind = "mastodon"
api_base_url = "https://mastodon.example"
"""


@pytest.fixture
def policy() -> Policy:
    text = POLICY_TOML + EDGE_ACCOUNTS
    return parse_policy(tomllib.loads(text), source="tests/data/policy.toml+edge", text=text)


def _post(
    external_id: str, *, name: str | None, handle: str | None, at: object = None, text: str = "hello?"
) -> InboundPost:
    return InboundPost(
        external_id=external_id,
        author_id=f"id-{external_id}",
        author_name=name,
        author_handle=handle,
        text=text,
        posted_at=at or MONDAY,  # type: ignore[arg-type]
    )


def _ack(ctx: AppContext, account: str, post: InboundPost) -> str:
    with ctx.sessions() as session, session.begin():
        ingest_batch(session, ctx, account=account, posts=[post], is_own=lambda _p: False)
    with ctx.sessions() as session:
        row = session.scalars(
            select(Outbox).where(Outbox.kind == "ack").order_by(Outbox.id.desc()).limit(1)
        ).one()
        return str(row.payload["text"])


# --- finding 4: customers choose what our public acknowledgement says ------------------------

EVIL_NAME = (
    "Ana. OFFICIAL NOTICE: all refunds now at https://evil.example/refund - enter your card there. Ana"
)


def test_a_customer_typed_name_never_reaches_the_acknowledgement(ctx: AppContext) -> None:
    text = _ack(ctx, "shop", _post("1", name=EVIL_NAME, handle=None))
    assert "OFFICIAL" not in text and "evil" not in text
    assert text.startswith("Thanks there!")


def test_a_webhook_handle_is_not_trusted_either(ctx: AppContext) -> None:
    text = _ack(ctx, "shop", _post("1", name="Ana", handle="realbank"))
    assert "@" not in text and "realbank" not in text and text.startswith("Thanks there!")


def test_no_greeting_mentions_a_made_up_account(ctx: AppContext) -> None:
    text = _ack(ctx, "shop", _post("1", name=None, handle=None))
    assert "@there" not in text and "@" not in text


def test_a_verified_platform_handle_is_used(ctx: AppContext) -> None:
    assert _ack(ctx, "toots", _post("1", name="Ana Lima", handle="ana@mastodon.example")).startswith(
        "Thanks @ana@mastodon.example!"
    )
    # Even on a verifying platform, something that is not a handle is not written after "@".
    assert _ack(ctx, "toots", _post("2", name=None, handle="x OFFICIAL NOTICE")).startswith("Thanks there!")


def test_the_greeting_is_configurable(tmp_path: object) -> None:
    text = POLICY_TOML.replace('default_team = "care"', 'default_team = "care"\nack_greeting = "friend"')
    policy = parse_policy(tomllib.loads(text), source="t", text=text)
    assert policy.settings.ack_greeting == "friend"
    bad = POLICY_TOML.replace('default_team = "care"', 'default_team = "care"\nack_greeting = "<!channel>"')
    with pytest.raises(ConfigError, match="ack_greeting"):
        parse_policy(tomllib.loads(bad), source="t", text=bad)


def test_a_post_overdue_on_arrival_gets_honest_wording(ctx: AppContext, clock: FakeClock) -> None:
    # Posted three days ago: the 24 h (48 h at weekends) target has long passed.
    text = _ack(ctx, "social", _post("1", name=None, handle="ana", at=MONDAY - timedelta(days=3)))
    assert text == "Thanks @ana! Sam from our Customer Care team will get back to you as soon as possible."
    assert " d " not in text


# --- finding 3 (and stored data): retention and forgetting one customer ------------------------


def _close_all(ctx: AppContext, at: object) -> None:
    with ctx.sessions() as session, session.begin():
        session.execute(
            update(Conversation).values(
                status="closed", closed_at=at, close_reason="spam", next_action_at=None
            )
        )
        session.execute(update(Outbox).values(status="sent", sent_at=at))


def test_retention_prunes_sent_outbox_settled_events_and_old_text(ctx: AppContext, clock: FakeClock) -> None:
    _ack(ctx, "shop", _post("1", name="Ana Lima", handle=None, text="my card number is 4111..."))
    _close_all(ctx, MONDAY)
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Event)) > 0
    assert prune(ctx, MONDAY + timedelta(days=29)) == Pruned()  # nothing is old enough yet
    done = prune(ctx, MONDAY + timedelta(days=181))
    assert (done.outbox, done.texts, done.events) == (2, 1, 0)  # card and ack sent; one post
    with ctx.sessions() as session:
        post = session.scalars(select(Post)).one()
        assert (post.text, post.author_name) == ("", None)
        conversation = session.scalars(select(Conversation)).one()  # the figures stay
        assert (conversation.team, conversation.opened_at, conversation.status) == ("care", MONDAY, "closed")
        assert conversation.author_name is None
    assert prune(ctx, MONDAY + timedelta(days=366)).events > 0
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 0


def test_retention_is_scheduled(ctx: AppContext) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    from bot.flow.outbox import OutboxSender
    from bot.jobs import RETENTION_JOB, Jobs

    scheduler = BackgroundScheduler(timezone="UTC")
    jobs = Jobs(ctx, {}, OutboxSender(ctx, {}))
    jobs.install(scheduler)
    assert scheduler.get_job(RETENTION_JOB) is not None


def test_forget_one_customer_everywhere_keeping_figures(
    ctx: AppContext, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ack(ctx, "shop", _post("1", name="Ana Lima", handle=None, text="I am Ana, call me on 555-0100"))
    _ack(ctx, "shop", _post("2", name="Ben", handle=None, text="Ben here"))
    config = tmp_path / "replyclock.toml"
    config.write_text(POLICY_TOML + EDGE_ACCOUNTS)
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert cli_main(["forget", "--author", "shop:id-1", "--config", str(config)]) == 0
    with ctx.sessions() as session:
        posts = {p.external_id: p for p in session.scalars(select(Post))}
        assert (posts["1"].text, posts["1"].author_name, posts["1"].author_id) == (
            "",
            None,
            pseudonym("shop", "id-1"),
        )
        assert posts["2"].text == "Ben here" and posts["2"].author_id == "id-2"
        conversations = list(session.scalars(select(Conversation).order_by(Conversation.id)))
        assert len(conversations) == 2 and conversations[0].author_id == pseudonym("shop", "id-1")
        ack = session.scalars(
            select(Outbox).where(Outbox.kind == "ack", Outbox.conversation_id == conversations[0].id)
        ).one()
        assert "text" not in ack.payload and ack.status == "failed"  # never sent to a forgotten customer
        dumped = " ".join(str(row.payload) for row in session.scalars(select(Outbox)))
        assert "555-0100" not in dumped and "Ana" not in dumped


# --- finding 7: every Unicode line break is quoted --------------------------------------------


def test_every_unicode_line_break_is_normalised_before_quoting() -> None:
    from bot.slack.blocks import clip_escaped

    breaks = ["\u2028", "\u2029", "\x85", "\r", "\v", "\f", "\r\n", "\n", "\x1c", "\x1d", "\x1e"]
    text = "first" + "".join(f"{separator}line {index} <!channel>" for index, separator in enumerate(breaks))
    quoted = clip_escaped(text, 10_000, quote=True)
    lines = quoted.split("\n")
    assert len(lines) == len(breaks) + 1
    assert all(line.startswith("> ") for line in lines), lines
    assert not any(separator in quoted for separator in breaks if separator != "\n")
    assert "<!channel>" not in quoted
