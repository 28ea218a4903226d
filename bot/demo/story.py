"""`replyclock demo`: the whole pipeline on a temporary SQLite database with a sped-up clock.

A scripted stream of customer posts comes in through a real connector class, is stored,
routed and given deadlines by the real ingest; the real sweep climbs the ladder and the
real outbox sender delivers, while a fake clock jumps ahead a minute at a time. Slack is the
local stand-in (bot.demo.standin): the real slack_sdk client posts cards, threads and DMs to
it, and simulated staff click Claim and answer through the Reply modal with signed requests
to the real bolt app served by uvicorn on loopback. At the end the Slack side is printed.
"""

from __future__ import annotations

import email.utils
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from slack_sdk import WebClient
from sqlalchemy import Engine, func, select

from bot.config import parse_policy
from bot.core.clock import FakeClock
from bot.core.messages import duration_in_words
from bot.demo.standin import DEFAULT_SIGNING_SECRET, DEFAULT_TOKEN, SlackStandIn, SlackUser
from bot.flow.context import AppContext
from bot.flow.delivery import customer_handlers
from bot.flow.outbox import OutboxSender
from bot.flow.sweep import sweep
from bot.jobs import Jobs
from bot.slack.app import create_bolt_app, slack_routes
from bot.slack.delivery import slack_handlers
from bot.slack.ids import ACTION_CLAIM, ACTION_REPLY, REPLY_BLOCK, REPLY_INPUT
from bot.web import create_app, serve_in_thread
from connectors.demo import DemoConnector, DemoMailConnector, ScriptedMail, ScriptedPost
from storage.db import make_engine, make_sessionmaker
from storage.migrate import upgrade
from storage.models import ANSWERED, Conversation, Event, Outbox

DEMO_POLICY = """
[settings]
conversation_gap = "12h"
default_team = "care"

[calendars.berlin]
timezone = "Europe/Berlin"
hours = { mon-fri = ["09:00-17:00"] }
holidays = { country = "DE", subdivision = "BE" }

[calendars.always]
timezone = "Europe/Berlin"
hours = { mon-sun = ["00:00-24:00"] }

[experts.maria]
name = "Maria Keller"
slack_id = "U0MARIA01"
timezone = "Europe/Berlin"
hours = { mon-fri = ["08:00-18:00"] }
topics = ["invoices", "refunds"]

[experts.sam]
name = "Sam Okafor"
slack_id = "U0SAM0001"
timezone = "Europe/London"
hours = { mon-fri = ["08:00-18:00"] }
topics = ["outages"]

[experts.lee]
name = "Lee Wong"
slack_id = "U0LEE0001"
timezone = "Europe/Berlin"
hours = { mon-fri = ["09:00-17:00"] }

[teams.care]
display_name = "Customer Care"
channel = "C0CARE0001"
experts = ["sam", "lee"]
calendar = "always"
on_call = "lee"
manager = "lee"

[teams.billing]
display_name = "Billing"
channel = "C0BILLING1"
experts = ["maria", "lee"]
calendar = "berlin"
manager = "lee"

[[policies]]
name = "urgent"
clock = "wall"
first_response = "1h"
warn_at = [0.75]
nag_every = "20m"
acknowledge = true
escalation = [ { after = "10m", notify = "team_channel" }, { after = "30m", notify = "manager" } ]
match = { priorities = ["urgent"] }

[[policies]]
name = "billing"
clock = "business"
calendar = "berlin"
first_response = "4h"
next_response = "2h"
warn_at = [0.75]
nag_every = "1h"
acknowledge = true
escalation = [ { after = "1h", notify = "manager" } ]
match = { teams = ["billing"] }

[[policies]]
name = "classic"
clock = "wall"
calendar = "berlin"
first_response = "24h"
weekend_first_response = "48h"
warn_at = [0.75]
nag_every = "2h"
acknowledge = true
escalation = [ { after = "2h", notify = "team_channel" } ]

[[routing]]
name = "outage"
team = "care"
priority = "urgent"
regex = "(?i)\\\\b(down|outage|not working)\\\\b"
topics = ["outages"]

[[routing]]
name = "billing words"
team = "billing"
keywords = ["invoice", "refund", "charged"]
topics = ["invoices"]

[authors]
ignore = ["spambot9000"]

[accounts.social]
kind = "demo"
own_ids = ["acme_support"]

# The demo's mailbox is scripted (no IMAP/SMTP server needed); a real one has imap_host etc.
[accounts.mail]
kind = "email"

[acknowledgements.default]
en = "Thanks {author}! {owner_first_name} from our {team} team will get back to you by {due}."
"""

# Monday 23 November 2026, 08:30 UTC = 09:30 in Berlin.
DEMO_START = datetime(2026, 11, 23, 8, 30, tzinfo=UTC)


def _script() -> list[ScriptedPost]:
    minutes = timedelta(minutes=1)
    return [
        ScriptedPost(
            0 * minutes,
            "1001",
            "c-ana",
            "ana_lima",
            "Ana Lima",
            "Hi, my invoice for November was charged twice. Can someone refund one? <!channel>",
        ),
        ScriptedPost(
            5 * minutes, "1002", "c-ben", "ben_k", "Ben K.", "Is your app down? Login not working since 10am"
        ),
        ScriptedPost(6 * minutes, "1003", "c-spam", "spambot9000", "Spam Bot", "Buy followers cheap!!!"),
        ScriptedPost(
            110 * minutes,
            "1004",
            "own",
            "acme_support",
            "ACME Support",
            "@ben_k Sorry! We found the fault and it is fixed now. Please try again.",
            reply_to_id="1002",
        ),
        # 12:00 Maria answers Ana from Slack (STAFF_SCRIPT); Ana writes again in the same thread.
        ScriptedPost(
            170 * minutes,
            "1006",
            "c-ana",
            "ana_lima",
            "Ana Lima",
            "Thanks! Will I get a corrected invoice too?",
            thread_id="1001",
        ),
        ScriptedPost(
            200 * minutes,
            "1007",
            "own",
            "acme_support",
            "ACME Support",
            "@ana_lima Yes, it is in your account now.",
            reply_to_id="1006",
        ),
    ]


class Transcript:
    """Prints timestamped lines in the team's local time."""

    def __init__(self, clock: FakeClock, out: TextIO, tz: ZoneInfo) -> None:
        self.clock = clock
        self.out = out
        self.tz = tz
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        stamp = self.clock.now().astimezone(self.tz).strftime("%a %H:%M")
        text = f"[{stamp}] {line}"
        self.lines.append(text)
        print(text, file=self.out, flush=True)


# Simulated staff at work, by minute of the story: who clicks what on which conversation.
STAFF_SCRIPT: dict[int, tuple[str, int, str, str]] = {
    10: ("claim", 1, "maria", ""),
    11: ("claim", 1, "lee", ""),  # a moment too late: told who has it
    150: ("reply", 1, "maria", "@ana_lima Sorry about that! The duplicate charge is refunded, 3-5 days."),
    95: (
        "reply",
        3,
        "sam",
        "Hello Clara, your parcel left our warehouse this morning; DHL 00340434161094042557.",
    ),
}

DEMO_MAIL = "support@acme.example"


def _mail_script() -> list[ScriptedMail]:
    """Clara writes from Thunderbird, then answers our acknowledgement in the same thread."""

    def at(minutes: int) -> str:
        return email.utils.format_datetime(DEMO_START + timedelta(minutes=minutes))

    first = f"""Message-ID: <7d1c-clara@example.org>
Date: {at(20)}
From: Clara Weiss <clara@example.org>
To: ACME Support <{DEMO_MAIL}>
Subject: Where is my parcel?
Content-Type: text/plain; charset=UTF-8

Hello, I ordered a kettle on the 10th (order 4411) and nothing has arrived.

--\x20
Clara Weiss
"""
    again = f"""Message-ID: <9e2f-clara@example.org>
Date: {at(40)}
From: Clara Weiss <clara@example.org>
To: ACME Support <{DEMO_MAIL}>
Subject: Re: Where is my parcel?
In-Reply-To: <demo-mail-1@acme.example>
References: <7d1c-clara@example.org> <demo-mail-1@acme.example>
Content-Type: text/plain; charset=UTF-8

It is a gift, so I need it by Friday.

On 23.11.26 10:50, ACME Support wrote:
> Thanks Clara Weiss! Someone from our Customer Care team will get back to you.
"""
    return [
        ScriptedMail(timedelta(minutes=20), first.replace("\n", "\r\n").encode()),
        ScriptedMail(timedelta(minutes=40), again.replace("\n", "\r\n").encode()),
    ]


# Weeks of history `replyclock demo --keep` stores before the story (for `replyclock simulate`):
# posts by weight, and how fast each expert answers (median working minutes, log-normal).
HISTORY_TEXTS = (
    (0.3, "My invoice shows the wrong amount, please refund the difference"),
    (0.1, "The app is not working, I cannot log in"),
    (0.6, "Where is my parcel? I ordered it last week"),
)
HISTORY_SPEEDS = {"maria": 20.0, "sam": 25.0, "lee": 35.0}
HISTORY_PER_WEEK = 150


def write_demo_history(engine: Engine, weeks: int, *, seed: int = 5) -> tuple[int, int]:
    """Store `weeks` of generated past conversations of the demo's helpdesk before the story's
    Monday: posts with the demo's seasonality, routed and answered by the simulator with the
    demo's policy and experts of `HISTORY_SPEEDS`. Only those answered before the story are kept.
    Returns (conversations, answered with an owner)."""
    from bot.sim.engine import Simulator
    from bot.sim.synth import TrueTimes, recent_arrivals, write_history

    policy = parse_policy(tomllib.loads(DEMO_POLICY), source="<demo policy>", text=DEMO_POLICY)
    start = (DEMO_START - timedelta(weeks=weeks)).replace(hour=0, minute=0)
    arrivals = recent_arrivals(
        start=start,
        end=DEMO_START,
        per_week=HISTORY_PER_WEEK,
        seed=seed,
        texts=HISTORY_TEXTS,
        account="social",
    )
    result = Simulator(policy, TrueTimes(HISTORY_SPEEDS), start=start, end=DEMO_START).run(
        arrivals, seed=seed
    )
    kept = [
        (arrival, conversation)
        for arrival, conversation in zip(arrivals, result.conversations, strict=True)
        if conversation.first_response_at is not None and conversation.first_response_at < DEMO_START
    ]
    with make_sessionmaker(engine)() as session:
        written = write_history(session, policy, [a for a, _ in kept], [c for _, c in kept], account="social")
        session.commit()
    return written, sum(1 for _, c in kept if c.answered_by is not None)


def run_demo(
    out: TextIO = sys.stdout, *, minutes: int = 240, database: Path | None = None, history_weeks: int = 0
) -> int:
    """Run the scripted story and print its transcript; returns the exit code. With `database`,
    the SQLite file is kept there, and with `history_weeks`, weeks of generated past conversations
    are stored in it after the story (`write_demo_history`)."""
    policy = parse_policy(tomllib.loads(DEMO_POLICY), source="<demo policy>", text=DEMO_POLICY)
    users = [SlackUser(e.slack_id, e.name, tz=e.timezone) for e in policy.experts.values()]
    with tempfile.TemporaryDirectory(prefix="replyclock-demo-") as tmp:
        path = database or Path(tmp) / "demo.db"
        engine = make_engine(f"sqlite:///{path}")
        upgrade(engine)
        clock = FakeClock(DEMO_START)
        ctx = AppContext(policy=policy, engine=engine, clock=clock)
        say = Transcript(clock, out, ZoneInfo("Europe/Berlin"))
        connector = DemoConnector(
            "social", own_ids=("acme_support",), clock=clock, script=_script(), start=DEMO_START
        )
        mailbox = DemoMailConnector(
            "mail",
            address=DEMO_MAIL,
            display_name="ACME Support",
            clock=clock,
            script=_mail_script(),
            start=DEMO_START,
        )
        channels = {"C0CARE0001": "care", "C0BILLING1": "billing"}
        with SlackStandIn(channels=channels, users=users, clock=lambda: clock.now().timestamp()) as slack:
            client = WebClient(token=DEFAULT_TOKEN, base_url=slack.base_url)
            bolt = create_bolt_app(
                ctx, token=DEFAULT_TOKEN, signing_secret=DEFAULT_SIGNING_SECRET, client=client
            )
            connectors = {"social": connector, "mail": mailbox}
            handlers = {**slack_handlers(ctx, client), **customer_handlers(ctx, connectors)}
            sender = OutboxSender(ctx, handlers)
            jobs = Jobs(ctx, connectors, sender, send_after_poll=False)
            with serve_in_thread(create_app(ctx, {}, extra_routes=slack_routes(bolt))) as base:
                staff = _Staff(ctx, slack, f"{base}/slack/events", say)
                where = "in a temporary folder" if database is None else f"in {path}"
                say(f"replyclock demo: a sped-up Monday; SQLite {where}, Slack on a local stand-in")
                seen_calls = seen_replies = seen_mails = 0
                for minute in range(minutes + 1):
                    before = _event_count(ctx)
                    jobs.poll("social")
                    jobs.poll("mail")
                    _narrate_ingest(ctx, say, before)
                    if minute in STAFF_SCRIPT:
                        staff.act(*STAFF_SCRIPT[minute])
                    sweep(ctx)
                    sender.send_due()
                    seen_calls = _narrate_slack(
                        slack, say, seen_calls, {u.id: u.real_name for u in users}, channels
                    )
                    while seen_replies < len(connector.sent):
                        target, text, external_id = connector.sent[seen_replies]
                        say(f"social \u2192 @{target.author_handle} (public reply {external_id}): {text}")
                        seen_replies += 1
                    while seen_mails < len(mailbox.sent):
                        say(_mail_line(mailbox.sent[seen_mails]))
                        seen_mails += 1
                    clock.advance(timedelta(minutes=1))
                _print_figures(ctx, say)
                if history_weeks > 0:
                    written, answered = write_demo_history(engine, history_weeks)
                    say(
                        f"history: {written} conversations of the {history_weeks} weeks before this Monday "
                        f"stored ({answered} answered by an expert), for `replyclock simulate`"
                    )
                print("\nThe Slack side (the stand-in's record of every Web API call; times UTC):", file=out)
                for line in slack.transcript():
                    print("  " + line, file=out)
            if slack.internal_errors:
                print("stand-in errors:", *slack.internal_errors, sep="\n", file=sys.stderr)
                return 1
        engine.dispose()
    return 0


def _mail_line(message: EmailMessage) -> str:
    """An e-mail we sent, with the headers that thread it in the customer's mail client."""
    headers = ", ".join(
        f"{name}: {message[name]}"
        for name in ("Subject", "Message-ID", "In-Reply-To", "References", "Auto-Submitted")
        if message[name] is not None
    )
    body = " ".join(str(message.get_content()).split())
    return f"mail \u2192 {message['To']} ({headers}): {body}"


class _Staff:
    """Simulated staff: signed interactions sent to the real bolt app, as Slack would."""

    def __init__(self, ctx: AppContext, slack: SlackStandIn, url: str, say: Transcript) -> None:
        self.ctx, self.slack, self.url, self.say = ctx, slack, url, say

    def act(self, action: str, conversation_id: int, expert_id: str, text: str) -> None:
        expert = self.ctx.policy.experts[expert_id]
        with self.ctx.sessions() as session:
            card = session.get(Conversation, conversation_id)
            assert card is not None and card.slack_channel and card.slack_ts, (
                "the card must be in Slack first"
            )
            channel, ts = card.slack_channel, card.slack_ts
        if action == "claim":
            told = len(self.slack.calls_to("chat.postEphemeral"))
            self._send(
                self.slack.button_click(ACTION_CLAIM, str(conversation_id), expert.slack_id, channel, ts)
            )
            claimed = self._until(lambda c: c.claimed_by is not None, conversation_id)
            if claimed.claimed_by == expert_id and claimed.claimed_at == self.ctx.clock.now():
                self.say(f"{expert.name} clicks Claim on #{conversation_id}: it is theirs")
            else:
                notes = self.slack.wait_for("chat.postEphemeral", count=told + 1)
                note = str(notes[-1].params.get("text", ""))
                self.say(
                    f"{expert.name} clicks Claim on #{conversation_id} too late; Slack tells them: {note}"
                )
        elif action == "reply":
            opened = len(self.slack.calls_to("views.open"))
            self._send(
                self.slack.button_click(ACTION_REPLY, str(conversation_id), expert.slack_id, channel, ts)
            )
            view = self.slack.wait_for("views.open", count=opened + 1)[-1].response
            assert view is not None
            self.say(f"{expert.name} clicks Reply on #{conversation_id} and writes: {text}")
            payload = self.slack.view_submission(
                expert.slack_id, {REPLY_BLOCK: {REPLY_INPUT: text}}, view_id=view["view"]["id"]
            )
            self._send(payload)
            self._until(lambda c: c.status == "answered", conversation_id)

    def _send(self, payload: dict[str, Any]) -> None:
        answer = self.slack.send_interaction(self.url, payload)
        if answer.status != 200:
            raise RuntimeError(f"the Slack app answered {answer.status}")

    def _until(self, done: Callable[[Conversation], bool], conversation_id: int) -> Conversation:
        """Bolt acknowledges first and acts just after: wait (briefly, in real time) for the change."""
        deadline = time.monotonic() + 10
        while True:
            with self.ctx.sessions() as session:
                found = session.get(Conversation, conversation_id)
                assert found is not None
                if done(found):
                    return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slack app did not act on #{conversation_id}")
            time.sleep(0.02)


def _narrate_slack(
    slack: SlackStandIn, say: Transcript, seen: int, names: dict[str, str], channels: dict[str, str]
) -> int:
    """One line per message the app posted or edited since the last look."""
    calls = slack.calls
    for call in calls[seen:]:
        if call.method not in ("chat.postMessage", "chat.update") or not call.ok:
            continue
        channel = str(call.params.get("channel", ""))
        where = "DM" if channel.startswith("D") else "#" + channels.get(channel, channel)
        thread = " thread" if call.params.get("thread_ts") else ""
        verb = "edits" if call.method == "chat.update" else "posts"
        text = " ".join(str(call.params.get("text", "")).split())
        for user_id, name in names.items():
            text = text.replace(f"<@{user_id}>", f"@{name}")
        say(f"slack {verb} {where}{thread}: {text[:140]}")
    return len(calls)


def _who(conversation: Conversation) -> str:
    """``@handle`` on social channels; the name (or address) of an e-mail sender."""
    if conversation.author_handle:
        return f"@{conversation.author_handle}"
    return conversation.author_name or conversation.author_id


def _event_count(ctx: AppContext) -> int:
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(Event)) or 0


def _narrate_ingest(ctx: AppContext, say: Transcript, after_event: int) -> None:
    """Say what ingest decided (routing, owner, deadline) from the audit trail."""
    with ctx.sessions() as session:
        events = session.scalars(select(Event).where(Event.id > after_event).order_by(Event.id)).all()
        for event in events:
            if event.action == "ignored":
                say(
                    f"post in from @{event.detail.get('author')}: on the ignore list, stored, no conversation"
                )
                continue
            conversation = session.get(Conversation, event.conversation_id) if event.conversation_id else None
            if conversation is None:
                continue
            who = _who(conversation)
            if event.action == "opened":
                owner = ctx.policy.experts.get(str(event.detail.get("owner")))
                due = datetime.fromisoformat(str(event.detail["due_at"])).astimezone(
                    ZoneInfo("Europe/Berlin")
                )
                say(
                    f"post in from {who}: #{conversation.id} routed to team {event.detail['team']} "
                    f"({event.detail['priority']}, rule {event.detail['rule']}, policy {event.detail['policy']}), "
                    f"owner {owner.name if owner else 'nobody'}, due {due:%a %H:%M}"
                )
            elif event.action == "answered":
                say(f"answer seen from our account in #{conversation.id}: clock stopped")
            elif event.action == "reopened":
                due = datetime.fromisoformat(str(event.detail["due_at"])).astimezone(
                    ZoneInfo("Europe/Berlin")
                )
                say(f"{who} wrote again in #{conversation.id}: next-response deadline {due:%a %H:%M}")


def _print_figures(ctx: AppContext, say: Transcript) -> None:
    with ctx.sessions() as session:
        conversations = session.scalars(select(Conversation).order_by(Conversation.id)).all()
        sent = session.scalar(select(func.count()).select_from(Outbox).where(Outbox.status == "sent")) or 0
    answered = [c for c in conversations if c.first_response_at is not None]
    within = [c for c in answered if c.breached_at is None]
    say(
        f"figures: {len(conversations)} conversations, {len(answered)} answered, "
        f"{len(within)} within SLA, {sum(1 for c in conversations if c.breached_at)} breached, "
        f"{sum(1 for c in conversations if c.status != ANSWERED)} still open; {sent} messages delivered"
    )
    for conversation in answered:
        assert conversation.first_response_at is not None
        took = duration_in_words(conversation.first_response_at - conversation.opened_at)
        verdict = "late" if conversation.breached_at else "on time"
        say(f"  #{conversation.id} {_who(conversation)}: first response after {took} ({verdict})")
