"""Issue 11, the public edge: what customers can make us say, replays, permissions, edges.

Each test names the finding (1-7 of issue 11) it proves fixed; database tests run on SQLite and,
with REPLYCLOCK_TEST_DATABASE_URL, on PostgreSQL.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta

import pytest
from sqlalchemy import select

from bot.config import ConfigError, parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from connectors.base import InboundPost
from storage.models import Outbox
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
