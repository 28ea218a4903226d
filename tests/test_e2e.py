"""The production topology, end to end: `replyclock web` and `replyclock run` as real processes.

A customer post arrives at the web process's signed webhook; the worker process posts its
card to Slack (the loopback stand-in, reached by the real slack_sdk client through
SLACK_API_URL); a staff member clicks Claim, which Slack (the stand-in) sends, signed, to the
web process's /slack/events; the worker updates the card. Both processes share one SQLite file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bot.demo.standin import DEFAULT_SIGNING_SECRET, DEFAULT_TOKEN, SlackStandIn, SlackUser
from bot.slack.ids import ACTION_CLAIM
from tests.procs.launch import free_port, start, wait_until_serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SECRET = "e2e-webhook-secret-value-0123456789-0123456789"
CARE, BILLING = "C0CARE0001", "C0BILLING1"


def eventually(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    text = (ROOT / "tests" / "data" / "policy.toml").read_text()
    text = text.replace('channel = "#care"', f'channel = "{CARE}"').replace(
        'channel = "#billing"', f'channel = "{BILLING}"'
    )
    text += '\n[accounts.shop]\nkind = "webhook"\ncan_reply = false\nlegacy_signature = true\n'
    path = tmp_path / "replyclock.toml"
    path.write_text(text)
    return path


@pytest.fixture
def slack() -> Iterator[SlackStandIn]:
    users = [SlackUser("U0MARIA01", "Maria Keller", tz="Europe/Berlin"), SlackUser("U0LEE0001", "Lee Wong")]
    with SlackStandIn(channels={CARE: "care", BILLING: "billing"}, users=users) as standin:
        yield standin
    assert not standin.internal_errors


def test_webhook_to_card_to_claim_across_two_processes(
    tmp_path: Path, policy_file: Path, slack: SlackStandIn
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'e2e.db'}",
        "REPLYCLOCK_CONFIG": str(policy_file),
        "WEBHOOK_SECRET_SHOP": SECRET,
        "SLACK_BOT_TOKEN": DEFAULT_TOKEN,
        "SLACK_SIGNING_SECRET": DEFAULT_SIGNING_SECRET,
        "SLACK_API_URL": slack.base_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "OPERATOR_PORT": str(free_port()),  # not the default 9464: the machine may be running another
        "OUTBOX_INTERVAL": "0.2",
        "SWEEP_MAX_INTERVAL": "5",
    }
    assert (
        subprocess.run([sys.executable, "-m", "bot.cli", "db", "upgrade"], env=env, cwd=tmp_path).returncode
        == 0
    )
    processes = [start(command, cwd=tmp_path, env=env) for command in ("web", "run")]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, processes)
        body = json.dumps(
            {
                "id": "order-77",
                "author": {"id": "cust-9", "name": "Ana Lima", "handle": "ana"},
                "text": "My invoice was charged twice <!channel>",
                "created_at": datetime.now(UTC).isoformat(),
            }
        ).encode()
        signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(
            f"{base}/hooks/shop",
            data=body,
            headers={"X-Replyclock-Signature": signature, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            accepted = json.loads(response.read())
        assert response.status == 202 and accepted["duplicate"] is False

        # The worker posts the card to the team's channel (billing: "invoice", "charged").
        def card_posts() -> list[Any]:
            return [
                c for c in slack.calls_to("chat.postMessage") if "invoice was charged" in json.dumps(c.params)
            ]

        [card_call] = eventually(card_posts)
        assert card_call.params["channel"] == BILLING
        assert "<!channel>" not in json.dumps(card_call.params)  # escaped on its way into Slack
        card = next(m for m in slack.messages(BILLING) if m.ts == card_call.response["ts"])

        # Maria clicks Claim; Slack signs the request to the web process.
        click = slack.button_click(
            ACTION_CLAIM, str(accepted["conversation_id"]), "U0MARIA01", BILLING, card.ts
        )
        assert slack.send_interaction(f"{base}/slack/events", click).status == 200
        # The worker edits the same card: claimed by Maria.
        eventually(lambda: any("Claimed by" in json.dumps(c.params) for c in slack.calls_to("chat.update")))
        assert len(card_posts()) == 1

    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            _out, err = process.communicate(timeout=30)
            # uvicorn re-raises SIGTERM after its graceful shutdown, so the web process ends "by" it.
            assert process.returncode in (0, -signal.SIGTERM), err
            assert SECRET not in err and DEFAULT_SIGNING_SECRET not in err  # secrets never logged
