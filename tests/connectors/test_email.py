"""The e-mail connector against a real Dovecot (IMAP over TLS and STARTTLS) and a real SMTP server.

Dovecot runs as a private instance per test (tests/mail/dovecot.py); the messages are appended
over IMAP as a mail server would deliver them; answers go to aiosmtpd with STARTTLS (or implicit
TLS) and AUTH, and are read back as a mail client would thread them.
"""

from __future__ import annotations

import email.utils
import re
import ssl
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from imap_tools import MailBox
from sqlalchemy import Engine, func, select

from bot.config import ConfigError, parse_policy
from bot.core.clock import FakeClock
from bot.core.policy import Policy
from bot.flow import staff
from bot.flow.channels import account_check, build_connectors
from bot.flow.context import AppContext
from connectors.base import AuthFailed, NotSent, ReplyTarget
from connectors.mail import EmailConnector, ReplyAuthFailed, load_cursor
from storage.models import Account, Conversation, Event, Post
from tests.conftest import POLICY_TOML
from tests.connectors.common import jobs_recording_staff
from tests.mail import samples
from tests.mail.dovecot import DOVECOT, PASSWORD, USER, Dovecot
from tests.mail.smtp import SMTP_PASSWORD, SubmissionServer

pytestmark = pytest.mark.skipif(
    DOVECOT is None,
    reason="Dovecot is not installed: apt-get install dovecot-imapd (.ci/run installs it)",
)

ENV = {"EMAIL_IMAP_PASSWORD": PASSWORD, "EMAIL_SMTP_PASSWORD": SMTP_PASSWORD}
# Monday 23 November 2026, 08:00 UTC, a few minutes after the sample messages were written.
NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def dovecot_binary() -> None:
    assert DOVECOT is not None


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with Dovecot() as server:
        yield server


@pytest.fixture
def smtp(dovecot: Dovecot) -> Iterator[SubmissionServer]:
    with SubmissionServer(dovecot.ca_file, dovecot.dir / "key.pem") as server:
        yield server


def account_toml(dovecot: Dovecot, smtp: SubmissionServer, **extra: Any) -> str:
    settings: dict[str, Any] = {
        "kind": "email",
        "address": USER,
        "display_name": "Acme Support",
        "imap_host": "127.0.0.1",
        "imap_port": dovecot.imaps_port,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.port,
        "smtp_password_env": "EMAIL_SMTP_PASSWORD",
        "ca_file": str(dovecot.ca_file),
        "poll_interval": "30s",
        **extra,
    }
    lines = ["[accounts.mail]"]
    for key, value in settings.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines) + "\n"


def mail_policy(dovecot: Dovecot, smtp: SubmissionServer, **extra: Any) -> Policy:
    text = POLICY_TOML + "\n" + account_toml(dovecot, smtp, **extra)
    return parse_policy(tomllib.loads(text), source="tests/connectors/test_email.py", text=text)


def append(dovecot: Dovecot, raw: bytes, folder: str = "INBOX", received: datetime | None = None) -> None:
    """Deliver a message into the mailbox over IMAP, as an MDA or a mail client's "save to Sent" does."""
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with MailBox("127.0.0.1", dovecot.imaps_port, ssl_context=context).login(USER, PASSWORD) as mailbox:
        mailbox.append(raw, folder, dt=received)


class Harness:
    def __init__(self, ctx: AppContext, environ: dict[str, str] | None = None) -> None:
        self.ctx = ctx
        self.staff: list[str] = []
        self.start(environ)

    def start(self, environ: dict[str, str] | None = None) -> None:
        """(Re)start as a new process would: connectors built afresh from the policy."""
        self.connectors = build_connectors(self.ctx.policy, environ or ENV)
        self.jobs, _staff = jobs_recording_staff(self.ctx, self.connectors, self.staff)
        self.sender = self.jobs.sender

    def poll(self) -> int:
        return self.jobs.poll("mail")

    def posts(self) -> list[Post]:
        with self.ctx.sessions() as session:
            return list(session.scalars(select(Post).order_by(Post.id)))

    def conversations(self) -> list[Conversation]:
        with self.ctx.sessions() as session:
            return list(session.scalars(select(Conversation).order_by(Conversation.id)))

    def count(self, model: type) -> int:
        with self.ctx.sessions() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0

    def cursor(self) -> str | None:
        with self.ctx.sessions() as session:
            return session.scalar(select(Account.cursor).where(Account.name == "mail"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def harness(
    dovecot: Dovecot, smtp: SubmissionServer, engine: Engine, clock: FakeClock, **extra: Any
) -> Harness:
    return Harness(AppContext(policy=mail_policy(dovecot, smtp, **extra), engine=engine, clock=clock))


# -- the whole story -------------------------------------------------------------------------------


def test_samples_stored_once_acknowledged_safely_threaded_and_answered(
    engine: Engine, dovecot: Dovecot, smtp: SubmissionServer, clock: FakeClock
) -> None:
    h = harness(dovecot, smtp, engine, clock, sent_folder="Sent")
    for raw in (
        samples.plain(),
        samples.html_only(),
        samples.with_attachments(),
        samples.vacation_without_references(),
        samples.list_post(),
        samples.broken(),
    ):
        append(dovecot, raw)

    assert h.poll() == 6
    posts = {p.external_id: p for p in h.posts()}
    jane = posts["<0b1e2c3d-plain@example.com>"]
    assert jane.text == (
        "My order #4411 never arrived\n\nHello,\n\nI ordered a kettle two weeks ago and it never came. Can you check?"
    )  # the subject first, the signature gone
    assert jane.author_id == "jane@example.com" and jane.author_name == "Jane Doe"
    assert jane.meta is not None and jane.meta["subject"] == "My order #4411 never arrived"
    bob = posts["<CAHtml-only-77@mail.example.org>"]
    assert (
        bob.text
        == "Rückerstattung bitte\n\nHi team,\n\nI was charged twice for invoice 9921.\nPlease fix it."
    )
    with h.ctx.sessions() as session:  # "invoice" in the text: the billing team's routing rule applies
        assert session.get(Conversation, bob.conversation_id).team == "billing"  # type: ignore[union-attr]
    assert "tracker" not in bob.text and "alert" not in bob.text
    carla = posts["<6A1F0C11-AAAA-4B4B@example.net>"]
    assert carla.text.endswith("[attachments: receipt.pdf (3 KB), lid.png (508 B)]")
    assert carla.meta is not None and [a["name"] for a in carla.meta["attachments"]] == [
        "receipt.pdf",
        "lid.png",
    ]
    (damaged,) = [p for p in posts.values() if p.author_id == "unknown"]
    assert damaged.meta is not None and "missing From" in damaged.meta["flags"]
    assert "unknown charset 'x-klingon-42'" in damaged.meta["flags"]
    assert "qapla' my kettle is broken" in damaged.text and "[replyclock: broken MIME" in damaged.text

    # Three people acknowledged; the vacation responder, the list post and the damaged mail not.
    acks = smtp.received
    assert sorted(r.recipients[0] for r in acks) == [
        "bob@example.org",
        "carla@example.net",
        "jane@example.com",
    ]
    with h.ctx.sessions() as session:
        skipped = session.scalars(select(Event.detail).where(Event.action == "ack_skipped")).all()
    assert sorted(d["reason"] for d in skipped) == [
        "Precedence: bulk",
        "Precedence: list",
        "no sender address",
    ]
    to_jane = next(r for r in acks if r.recipients == ["jane@example.com"]).message
    assert to_jane["In-Reply-To"] == "<0b1e2c3d-plain@example.com>"
    assert to_jane["References"] == "<0b1e2c3d-plain@example.com>"
    assert to_jane["Subject"] == "Re: My order #4411 never arrived"
    assert to_jane["Auto-Submitted"] == "auto-replied"
    assert to_jane["From"] == f"Acme Support <{USER}>"
    # The sender's display name is theirs to type (and a forged From would carry it to someone
    # else): acknowledgements use the greeting (issue 11).
    assert to_jane.get_content().startswith("Thanks there!")
    assert email.utils.parseaddr(to_jane["From"])[1] == USER
    ack_id = str(to_jane["Message-ID"])
    to_bob = next(r for r in acks if r.recipients == ["bob@example.org"]).message
    assert to_bob["Subject"] == "Re: Rückerstattung bitte"

    # The mail client keeps a copy of what we sent in Sent: read again, it is a duplicate.
    for received in acks:
        append(dovecot, received.data, "Sent")
    # Jane answers the acknowledgement from Thunderbird; Carla's out-of-office answers hers;
    # Bob answers from Outlook without threading headers (subject and sender within the gap).
    to_carla = next(r for r in acks if r.recipients == ["carla@example.net"]).message
    clock.advance(timedelta(hours=1, minutes=31))
    append(
        dovecot,
        samples.thunderbird_reply(ack_id, f"<0b1e2c3d-plain@example.com> {ack_id}"),
    )
    append(dovecot, samples.out_of_office(str(to_carla["Message-ID"])))
    append(dovecot, samples.outlook_reply_without_references())
    conversations_before = h.count(Conversation)
    assert h.poll() == 3
    assert h.count(Conversation) == conversations_before  # all three continue their conversations
    assert len(smtp.received) == 3  # nothing acknowledged again, the out-of-office least of all
    posts = {p.external_id: p for p in h.posts()}
    reply = posts["<5c1d9a2e-reply@example.com>"]
    assert reply.text == "The tracking number is DHL 00340434161094042557."  # quote and history gone
    assert reply.conversation_id == jane.conversation_id
    assert posts["<oof-1234@example.net>"].conversation_id == carla.conversation_id
    outlook = posts["<AM6PR0102MB0001-outlook@eurprd01.prod.outlook.com>"]
    assert outlook.conversation_id == bob.conversation_id
    assert outlook.text == "Noch eine Frage: bekomme ich das Geld zurück auf die Karte?"
    assert posts[ack_id].direction == "out"  # stored when sent; Sent's copy was a duplicate

    # Staff answer Jane from Slack: a threaded reply, not marked automatic.
    with h.ctx.sessions() as session, session.begin():
        assert jane.conversation_id is not None
        staff.reply(
            session, h.ctx, jane.conversation_id, "sam", "Found it: it arrives tomorrow.", clock.now()
        )
    h.sender.send_due()
    answer = smtp.received[-1].message
    assert answer["In-Reply-To"] == "<5c1d9a2e-reply@example.com>"
    assert answer["References"] == f"<0b1e2c3d-plain@example.com> {ack_id} <5c1d9a2e-reply@example.com>"
    assert answer["Subject"] == "Re: My order #4411 never arrived"
    assert answer["Auto-Submitted"] is None
    assert answer.get_content().strip() == "Found it: it arrives tomorrow."

    # A colleague answers Carla from a mail client: its copy in Sent answers the conversation.
    clock.advance(timedelta(minutes=10))
    append(
        dovecot,
        samples.crlf(f"""
Message-ID: <answer-from-client@acme.test>
Date: {email.utils.format_datetime(clock.now() - timedelta(minutes=2))}
From: Acme Support <{USER}>
To: carla@example.net
Subject: Re: Broken lid, photos attached
In-Reply-To: <6A1F0C11-AAAA-4B4B@example.net>
References: <6A1F0C11-AAAA-4B4B@example.net>
Content-Type: text/plain; charset=utf-8

We are sending a new lid today.
"""),
        "Sent",
    )
    assert h.poll() == 1
    with h.ctx.sessions() as session:
        carla_conversation = session.get(Conversation, carla.conversation_id)
        assert carla_conversation is not None and carla_conversation.status == "answered"
        assert carla_conversation.first_response_at == clock.now() - timedelta(minutes=2)

    # A restart reads nothing twice; nor does a rebuilt mailbox with a new UIDVALIDITY.
    stored = h.count(Post)
    h.start()
    assert h.poll() == 0
    before = load_cursor(h.cursor())
    dovecot.doveadm("mailbox", "update", "-u", USER, "--uid-validity", "4242", "INBOX")
    h.start()
    assert h.poll() == 0
    after = load_cursor(h.cursor())
    assert after["INBOX"].uidvalidity == 4242 != before["INBOX"].uidvalidity
    assert after["INBOX"].uid == before["INBOX"].uid
    assert h.count(Post) == stored
    assert len(smtp.received) == 4


def test_a_bounce_of_our_reply_reopens_its_conversation_and_is_not_acknowledged(
    engine: Engine, dovecot: Dovecot, smtp: SubmissionServer, clock: FakeClock
) -> None:
    h = harness(dovecot, smtp, engine, clock)
    append(dovecot, samples.plain())
    assert h.poll() == 1
    assert len(smtp.received) == 1  # the acknowledgement
    with h.ctx.sessions() as session, session.begin():
        conversation = session.scalars(select(Conversation)).one()
        staff.reply(session, h.ctx, conversation.id, "sam", "It is on its way.", clock.now())
    h.sender.send_due()
    ours = str(smtp.received[-1].message["Message-ID"])
    # An out-of-office reply to our answer goes to the thread; the conversation stays answered.
    clock.advance(timedelta(minutes=2))
    append(dovecot, samples.out_of_office(ours, date=email.utils.format_datetime(clock.now())))
    assert h.poll() == 1
    (conversation,) = h.conversations()
    assert conversation.status == "answered" and conversation.cycle == 0
    assert h.staff.count("thread_post") == 1
    # Then the answer bounces: the customer never got it, so the conversation is open again.
    clock.advance(timedelta(minutes=3))
    append(dovecot, samples.bounce(ours, date=email.utils.format_datetime(clock.now())))
    assert h.poll() == 1
    (conversation,) = h.conversations()
    assert conversation.status == "open" and conversation.cycle == 1  # staff must look again
    bounce = h.posts()[-1]
    assert bounce.author_id == "mailer-daemon@mx.acme.test"
    assert bounce.meta is not None and bounce.meta["automatic"] == "Auto-Submitted: auto-replied"
    assert len(smtp.received) == 2  # neither the out-of-office nor the bounce was answered


def test_new_uidvalidity_with_renumbered_messages_stores_only_the_new_one(
    engine: Engine, dovecot: Dovecot, smtp: SubmissionServer, clock: FakeClock
) -> None:
    """The mailbox moved to a new server: UIDs start at 1 again and one new message arrived."""
    h = harness(dovecot, smtp, engine, clock, folder="Support")
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with MailBox("127.0.0.1", dovecot.imaps_port, ssl_context=context).login(USER, PASSWORD) as mailbox:
        mailbox.folder.create("Support")
    append(dovecot, samples.plain(), "Support")
    append(dovecot, samples.broken(), "Support")  # no Message-ID: recognised by the hash of its bytes
    assert h.poll() == 2
    with MailBox("127.0.0.1", dovecot.imaps_port, ssl_context=context).login(USER, PASSWORD) as mailbox:
        mailbox.folder.create("Old")
        mailbox.folder.set("Support")
        mailbox.move(mailbox.uids("ALL"), "Old")
        mailbox.folder.set("INBOX")
        mailbox.folder.delete("Support")
        mailbox.folder.create("Support")
        mailbox.folder.set("Old")
        mailbox.copy(mailbox.uids("ALL"), "Support")
    append(dovecot, samples.html_only(), "Support")
    before = load_cursor(h.cursor())["Support"]
    assert h.poll() == 1
    after = load_cursor(h.cursor())["Support"]
    assert after.uidvalidity != before.uidvalidity and after.uid == 3
    assert [p.direction for p in h.posts()].count("in") == 3 and h.count(Conversation) == 3
    assert sorted(r.recipients[0] for r in smtp.received) == ["bob@example.org", "jane@example.com"]


def test_a_message_over_the_size_limit_is_stored_from_its_header_and_flagged(
    engine: Engine, dovecot: Dovecot, smtp: SubmissionServer, clock: FakeClock
) -> None:
    h = harness(dovecot, smtp, engine, clock)
    append(dovecot, samples.large(26 * 1024 * 1024))  # over the default 25 MB
    append(dovecot, samples.plain())
    assert h.poll() == 2
    big = next(p for p in h.posts() if p.external_id == "<big-1@example.com>")
    assert big.meta is not None
    assert re.fullmatch(
        r"too large \(26\.\d MB over the 25\.0 MB limit\): only the header was read", big.meta["flags"][0]
    )
    assert big.author_id == "frank@example.com" and "[replyclock: too large" in big.text
    assert big.meta["subject"] == "Video of the problem"


def test_batches_follow_on_and_starttls_imap_works(
    engine: Engine, dovecot: Dovecot, smtp: SubmissionServer, clock: FakeClock
) -> None:
    h = harness(
        dovecot, smtp, engine, clock, imap_security="starttls", imap_port=dovecot.imap_port, batch_size=2
    )
    for raw in (samples.plain(), samples.html_only(), samples.with_attachments(), samples.list_post()):
        append(dovecot, raw)
    connector = h.connectors["mail"]
    first = connector.fetch(None)
    assert len(first.posts) == 2 and first.more
    second = connector.fetch(first.cursor)
    assert len(second.posts) == 2 and not second.more
    assert connector.fetch(second.cursor).posts == ()
    assert h.poll() == 4  # the job follows the pages in one poll


def test_since_date_leaves_old_mail_alone_also_after_a_uidvalidity_change(
    engine: Engine, dovecot: Dovecot, smtp: SubmissionServer, clock: FakeClock
) -> None:
    h = harness(dovecot, smtp, engine, clock, since_date="2026-11-01")
    append(
        dovecot,
        samples.html_only(date="Tue, 14 Jan 2025 10:00:00 +0000"),
        received=datetime(2025, 1, 14, tzinfo=UTC),
    )
    append(dovecot, samples.plain())
    assert h.poll() == 1
    assert [p.author_id for p in h.posts() if p.direction == "in"] == ["jane@example.com"]
    dovecot.doveadm("mailbox", "update", "-u", USER, "--uid-validity", "777", "INBOX")
    assert h.poll() == 0
    assert load_cursor(h.cursor())["INBOX"].uidvalidity == 777
    assert [r.recipients for r in smtp.received] == [["jane@example.com"]]


# -- sending ---------------------------------------------------------------------------------------


def target(**extra: Any) -> ReplyTarget:
    return ReplyTarget(
        external_id="<q@example.com>",
        author_id="jane@example.com",
        author_handle=None,
        thread_id="<q@example.com>",
        extra={
            "subject": "Re: Help",
            "message_id": "<q@example.com>",
            "references": ["<root@example.com>"],
            **extra,
        },
    )


def connector(dovecot: Dovecot, smtp_port: int, **settings: Any) -> EmailConnector:
    environ = settings.pop("environ", {})
    return EmailConnector(
        "mail",
        settings={
            "address": USER,
            "imap_host": "127.0.0.1",
            "imap_port": dovecot.imaps_port,
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_port,
            "ca_file": str(dovecot.ca_file),
            **settings,
        },
        environ={"EMAIL_IMAP_PASSWORD": PASSWORD, **environ},
        clock=FakeClock(NOW),
    )


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # TLS is implicit here
def test_smtps_and_reply_headers(dovecot: Dovecot) -> None:
    with SubmissionServer(dovecot.ca_file, dovecot.dir / "key.pem", implicit_tls=True) as smtps:
        mail = connector(
            dovecot,
            smtps.port,
            smtp_security="tls",
            smtp_password_env="SMTP_PW",
            environ={"SMTP_PW": SMTP_PASSWORD},
        )
        message_id = mail.reply(target(reply_address="jane.work@example.com"), "Hello")
    (sent,) = smtps.received
    message = sent.message
    assert sent.recipients == ["jane.work@example.com"]  # Reply-To wins over From
    assert message["Message-ID"] == message_id and message["Subject"] == "Re: Help"
    assert message["References"] == "<root@example.com> <q@example.com>"
    assert message["In-Reply-To"] == "<q@example.com>" and message["Auto-Submitted"] is None


def test_refusals_are_not_sent_and_bad_passwords_are_auth_failures(
    dovecot: Dovecot, smtp: SubmissionServer
) -> None:
    wrong = connector(dovecot, smtp.port, smtp_password_env="SMTP_PW", environ={"SMTP_PW": "wrong"})
    with pytest.raises(ReplyAuthFailed):
        wrong.reply(target(), "Hello")
    good = connector(dovecot, smtp.port, smtp_password_env="SMTP_PW", environ={"SMTP_PW": SMTP_PASSWORD})
    smtp.handler.refuse_with = "554 5.7.1 Rejected as spam"
    with pytest.raises(NotSent):
        good.reply(target(), "Hello")
    smtp.handler.refuse_with = None
    with pytest.raises(NotSent):
        connector(dovecot, 1, smtp_password_env="SMTP_PW", environ={"SMTP_PW": SMTP_PASSWORD}).reply(
            target(), "Hello"
        )
    assert smtp.received == []
    bad_imap = EmailConnector(
        "mail",
        settings={
            "address": USER,
            "imap_host": "127.0.0.1",
            "imap_port": dovecot.imaps_port,
            "ca_file": str(dovecot.ca_file),
        },
        environ={"EMAIL_IMAP_PASSWORD": "wrong"},
    )
    with pytest.raises(AuthFailed):
        bad_imap.fetch(None)


def test_an_untrusted_certificate_is_refused(dovecot: Dovecot, smtp: SubmissionServer) -> None:
    mail = EmailConnector(
        "mail",
        settings={"address": USER, "imap_host": "127.0.0.1", "imap_port": dovecot.imaps_port},
        environ={"EMAIL_IMAP_PASSWORD": PASSWORD},
    )
    with pytest.raises(Exception, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        mail.fetch(None)


def test_settings_and_secrets_are_checked() -> None:
    base = {"address": USER, "imap_host": "imap.example.com"}
    env = {"EMAIL_IMAP_PASSWORD": "x"}
    with pytest.raises(ValueError, match="address"):
        EmailConnector("m", settings={**base, "address": "nobody"}, environ=env)
    with pytest.raises(ValueError, match="EMAIL_IMAP_PASSWORD"):
        EmailConnector("m", settings=base, environ={})
    with pytest.raises(ValueError, match="imap_security"):
        EmailConnector("m", settings={**base, "imap_security": "none"}, environ=env)
    with pytest.raises(ValueError, match="unknown e-mail setting"):
        EmailConnector("m", settings={**base, "imap_hots": "x"}, environ=env)
    mail = EmailConnector("m", settings=base, environ=env)
    assert (mail.imap_port, mail.smtp_port, mail.smtp_host) == (993, 587, "imap.example.com")

    text = POLICY_TOML + '\n[accounts.mail]\nkind = "email"\naddress = "support@acme.test"\nimap_host = "x"\n'
    with pytest.raises(
        ConfigError, match="EMAIL_IMAP_PASSWORD"
    ):  # `replyclock check` sees the missing secret
        parse_policy(tomllib.loads(text), source="t", text=text, account_check=account_check({}))
    parse_policy(tomllib.loads(text), source="t", text=text, account_check=account_check(env))
