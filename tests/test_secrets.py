"""No configured secret ever reaches the logs, even at LOG_LEVEL=DEBUG.

`replyclock web` and `replyclock run` run as real processes (as in tests/test_e2e.py) with every
kind of credential set to a distinctive dummy value: the Slack bot, app and signing secrets,
a webhook secret, X's five credentials (the bearer token under a name of the operator's
choosing, which the suffix rule alone would not catch), the Mastodon token and, on
PostgreSQL, the database password. Both processes are worked hard at DEBUG: webhook deliveries
good and bad, the X and Mastodon stand-ins answering and refusing, acknowledgements signed
with OAuth 1.0a and HMAC, Slack clicks signed, forged and replayed, a reply through the modal,
Slack API errors. Then stdout and stderr of both are searched for every secret, as it is and
in the forms a log line could carry it (JSON-escaped, URL-encoded, base64).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from bot.demo.standin import SlackStandIn, SlackUser
from bot.slack.ids import ACTION_CLAIM, REPLY_BLOCK, REPLY_INPUT, VIEW_REPLY
from connectors.webhook import SIGNATURE_HEADER, sign
from tests.conftest import fresh_database_url
from tests.connectors.mastodon_server import MastodonStandIn, own_account_from_recording
from tests.connectors.x_server import RECORDED_USER_ID, XServer, postman_unauthorized, problem
from tests.procs.launch import free_port, wait_until_serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CARE, BILLING = "C0CARE0001", "C0BILLING1"
MARIA, STRANGER = "U0MARIA01", "U0STRANGE1"
MASTODON_OWN_ID = "117020565966271181"  # the account the recorded mention mentions

# Distinctive dummy secrets: none of these strings may appear in any log line.
SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-SECRETBOT-0000111122223333",
    "SLACK_APP_TOKEN": "xapp-SECRETAPP-4444555566667777",
    "SLACK_SIGNING_SECRET": "SECRETSIGNING8888999900001111",
    "WEBHOOK_SECRET_SHOP": "SECRETHOOK-2222333344445555-66667777-88889999",
    # X credentials under names of the operator's choosing (no _TOKEN/_KEY/_SECRET suffix), one
    # with characters that URL encoding (and OAuth's double encoding) changes.
    "ACME_X_BEARER": "SECRETBEARER%2Bplus%3Dequals6666",
    "ACME_X_CONSUMER": "SECRETCONSUMER+KEY/77778888=",
    "ACME_X_CONSUMER_PRIVATE": "SECRETCONSUMERSECRET99990000",
    "ACME_X_USER": "1234567890-SECRETACCESSTOKEN1111",
    "ACME_X_USER_PRIVATE": "SECRETACCESSTOKENSECRET22223333",
    "MASTODON_ACCESS_TOKEN": "SECRETMASTODON4444555566667777",
}
DB_PASSWORD = 'SECRETdbPASS"with\\quote/and%40'  # needs escaping in JSON and encoding in URLs


def eventually(check: Callable[[], Any], timeout: float = 90.0, what: str = "condition") -> Any:
    """Wait for `check` (a bound for a machine under load: the processes it waits on are real)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def forms_of(secret: str) -> set[str]:
    """The ways a secret could show up in a log line."""
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote(urllib.parse.quote(secret, safe="~"), safe="~"),  # an OAuth base string
        urllib.parse.quote_plus(secret),
        urllib.parse.unquote(secret),
        base64.b64encode(secret.encode()).decode(),
    }


@dataclass
class ReplyEndpoint:
    """The shop's reply URL: takes signed replies and answers an id."""

    received: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def __enter__(self) -> ReplyEndpoint:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                endpoint.received.append(
                    {"body": json.loads(body), "signature": self.headers[SIGNATURE_HEADER]}
                )
                answer = json.dumps({"id": f"r-{len(endpoint.received)}"}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/replies"


def policy_text(x: XServer, mastodon: MastodonStandIn, replies: ReplyEndpoint) -> str:
    text = (ROOT / "tests" / "data" / "policy.toml").read_text()
    text = text.replace('channel = "#care"', f'channel = "{CARE}"').replace(
        'channel = "#billing"', f'channel = "{BILLING}"'
    )
    text = text.replace("[settings]\n", f'[settings]\nadmin_channel = "{CARE}"\n')
    return (
        text
        + f"""
[accounts.shop]
kind = "webhook"
reply_url = "{replies.url}"
legacy_signature = true

[accounts.tw]
kind = "x"
user_id = "{RECORDED_USER_ID}"
api_base_url = "{x.base_url}"
bearer_token_env = "ACME_X_BEARER"
consumer_key_env = "ACME_X_CONSUMER"
consumer_secret_env = "ACME_X_CONSUMER_PRIVATE"
access_token_env = "ACME_X_USER"
access_token_secret_env = "ACME_X_USER_PRIVATE"
poll_interval = "1s"
timeout = 5

[accounts.fedi]
kind = "mastodon"
api_base_url = "{mastodon.base_url}"
account_id = "{MASTODON_OWN_ID}"
poll_interval = "1s"
"""
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, list[str]]:
    """A database URL for the processes and the secrets in it (PostgreSQL: a password)."""
    url = fresh_database_url(request.param, tmp_path)
    if request.param == "sqlite":
        return url, []
    parsed = make_url(url)
    password = parsed.password if parsed.password else DB_PASSWORD
    # Trust authentication (CI's local server) ignores the password; elsewhere use a URL with one.
    with_password = parsed.set(password=str(password)).render_as_string(hide_password=False)
    return with_password, [str(password)]


@pytest.fixture
def slack() -> Iterator[SlackStandIn]:
    users = [SlackUser(MARIA, "Maria Keller", tz="Europe/Berlin"), SlackUser("U0LEE0001", "Lee Wong")]
    with SlackStandIn(
        channels={CARE: "care", BILLING: "billing"},
        users=users,
        tokens=(SECRETS["SLACK_BOT_TOKEN"],),
        signing_secret=SECRETS["SLACK_SIGNING_SECRET"],
    ) as standin:
        yield standin


def test_no_secret_reaches_the_logs_at_debug(
    tmp_path: Path, database: tuple[str, list[str]], slack: SlackStandIn
) -> None:
    database_url, database_secrets = database
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (
        XServer() as x,
        MastodonStandIn(own_account=own_account_from_recording()) as mastodon,
        ReplyEndpoint() as replies,
    ):
        policy = tmp_path / "replyclock.toml"
        policy.write_text(policy_text(x, mastodon, replies))
        mastodon.mention("501", "117100000000000501", "<p>@acme my invoice was charged twice</p>")
        # X: the first poll fails (503, retried after a back-off), later ones get the mentions;
        # the first acknowledgement is refused (401).
        x.script("GET", r"/2/users/[0-9]+/mentions", problem(503, "Service Unavailable", "over capacity"))
        x.script("POST", r"/2/tweets", postman_unauthorized())
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("SLACK_", "X_", "MASTODON_", "WEBHOOK_"))
            },
            **SECRETS,
            "DATABASE_URL": database_url,
            "REPLYCLOCK_CONFIG": str(policy),
            "SLACK_API_URL": slack.base_url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "OPERATOR_PORT": str(free_port()),  # not the default 9464: the machine may be running another
            "OUTBOX_INTERVAL": "0.2",
            "SWEEP_MAX_INTERVAL": "2",
            "LOG_LEVEL": "DEBUG",
        }
        upgrade = subprocess.run(
            [sys.executable, "-m", "bot.cli", "db", "upgrade"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert upgrade.returncode == 0, upgrade.stderr
        outputs: list[Path] = []
        processes: list[subprocess.Popen[bytes]] = []
        for command in ("web", "run"):
            process_env = dict(env)
            if command == "run":  # Socket Mode needs a real Slack; `run` uses the Web API only here
                process_env.pop("SLACK_APP_TOKEN")
            out, err = tmp_path / f"{command}.out", tmp_path / f"{command}.err"
            outputs += [out, err]
            with out.open("wb") as stdout, err.open("wb") as stderr:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bot.cli", command],
                        env=process_env,
                        cwd=tmp_path,
                        stdout=stdout,
                        stderr=stderr,
                    )
                )
        try:
            exercise(base, slack, x, mastodon, replies, processes)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=30)
    logged = "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in outputs)
    lines = logged.count("\n")
    assert lines > 200 and '"level": "debug"' in logged  # DEBUG really was on
    searched = [*SECRETS.items(), *(("database password", s) for s in database_secrets)]
    print(
        f"searched {len(logged):,} characters, {lines:,} lines of web and run output for "
        f"{len(searched)} secrets in {sum(len(forms_of(s)) for _n, s in searched)} forms"
    )
    for name, secret in searched:
        for form in forms_of(secret):
            at = logged.find(form)
            assert at < 0, f"{name} logged as {form!r}: ...{logged[max(0, at - 300) : at + 80]}..."
    # The processes really used the secrets: the stand-ins saw them.
    assert any(call.token == SECRETS["SLACK_BOT_TOKEN"] for call in slack.calls)
    assert any(r.headers.get("Authorization") == f"Bearer {SECRETS['ACME_X_BEARER']}" for r in x.sent("GET"))
    assert any("oauth_signature" in (r.headers.get("Authorization") or "") for r in x.sent("POST"))
    assert any(
        r.headers.get("authorization") == f"Bearer {SECRETS['MASTODON_ACCESS_TOKEN']}"
        for r in mastodon.requests
    )
    assert replies.received and all(r["signature"].startswith("sha256=") for r in replies.received)


def exercise(
    base: str,
    slack: SlackStandIn,
    x: XServer,
    mastodon: MastodonStandIn,
    replies: ReplyEndpoint,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Drive both processes through good and bad paths."""

    wait_until_serving(base, processes)

    def post(path: str, body: bytes, headers: dict[str, str]) -> int:
        request = urllib.request.Request(f"{base}{path}", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    secret = SECRETS["WEBHOOK_SECRET_SHOP"]
    delivery = json.dumps(
        {
            "id": "order-1",
            "author": {"id": "cust-1", "name": "Ana Lima", "handle": "ana"},
            "text": "My invoice was charged twice",
            "created_at": datetime.now(UTC).isoformat(),
        }
    ).encode()
    hook = {"Content-Type": "application/json"}
    assert post("/hooks/shop", delivery, {**hook, SIGNATURE_HEADER: sign(secret, delivery)}) == 202
    assert post("/hooks/shop", delivery, {**hook, SIGNATURE_HEADER: sign(secret, delivery)}) == 202  # again
    assert post("/hooks/shop", delivery, {**hook, SIGNATURE_HEADER: "sha256=" + "0" * 64}) == 401
    assert post("/hooks/shop", delivery, {**hook, SIGNATURE_HEADER: sign("guess", delivery)}) == 401
    assert post("/hooks/shop", b"{not json", {**hook, SIGNATURE_HEADER: sign(secret, b"{not json")}) == 400
    assert post("/hooks/nowhere", delivery, hook) == 401  # like a known account: no name is revealed

    # The worker posts the card (Slack), acknowledges on the shop (signed), X and Mastodon.
    def card() -> Any:
        for message in slack.messages(BILLING):
            # The shop's post (X has a "@acme my invoice was charged twice" of its own).
            if "My invoice was charged twice" in json.dumps(message.blocks) and not message.is_reply:
                return message
        return None

    posted = eventually(card, what="the card")
    # The shop's conversation: its number depends on whether X's first poll came before the webhook.
    shop = str(posted.data["metadata"]["event_payload"]["conversation_id"])
    eventually(lambda: replies.received, what="the shop acknowledgement")
    eventually(lambda: len(x.sent("POST", "/2/tweets")) >= 2, what="acknowledgements on X")
    eventually(
        lambda: mastodon.requests_to("POST", "/api/v1/statuses"), what="an acknowledgement on Mastodon"
    )

    # Slack: a stranger, a forged signature, a real claim, its replay, a reply through the modal.
    claim = slack.button_click(ACTION_CLAIM, shop, STRANGER, BILLING, posted.ts)
    assert slack.send_interaction(f"{base}/slack/events", claim).status == 200
    click = urllib.parse.urlencode(
        {"payload": json.dumps(slack.button_click(ACTION_CLAIM, shop, MARIA, BILLING, posted.ts))}
    ).encode()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert (
        post(
            "/slack/events",
            click,
            {
                **form,
                "X-Slack-Request-Timestamp": str(int(time.time())),
                "X-Slack-Signature": "v0=" + "0" * 64,
            },
        )
        == 401
    )
    signed = slack.sign(click)
    assert post("/slack/events", click, {**form, **signed}) == 200
    assert post("/slack/events", click, {**form, **signed}) == 401  # replayed
    slack.fail_next("chat.update", error="invalid_auth", status=200)  # the card edit is refused once
    eventually(lambda: slack.calls_to("chat.update"), what="the card update")
    reply = slack.view_submission(
        MARIA,
        {REPLY_BLOCK: {REPLY_INPUT: "Sorry! The refund is on its way."}},
        callback_id=VIEW_REPLY,
        private_metadata=shop,
    )
    assert slack.send_interaction(f"{base}/slack/events", reply).status == 200
    eventually(lambda: len(replies.received) >= 2, what="the reply on the shop")
    home = slack.send_event(f"{base}/slack/events", {"type": "app_home_opened", "user": MARIA, "tab": "home"})
    assert home.status == 200
    command = slack.send_command(f"{base}/slack/events", "/replyclock", "queue billing", user_id=MARIA)
    assert command.status == 200
    # Mastodon refuses the token: the worker logs it, parks the account and alerts the admins.
    polls = len(mastodon.requests_to("GET", "/api/v1/notifications"))
    mastodon.fail("GET", "/api/v1/notifications", 401, error="The access token is invalid")
    eventually(
        lambda: len(mastodon.requests_to("GET", "/api/v1/notifications")) > polls, what="a refused poll"
    )
    eventually(
        lambda: any("fedi" in json.dumps(m.blocks) + m.text for m in slack.messages(CARE)),
        what="the admin alert",
    )
