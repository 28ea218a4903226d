"""The e-mail parser on hostile and damaged input (no server needed): never raises, flags what it met."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.mail import automatic_reason, parse_message, reply_subject
from tests.mail import samples

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def test_raw_8bit_headers_garbage_dates_and_no_body() -> None:
    raw = (
        b"From: J\xe9r\xf4me <jerome@example.fr>\r\n"
        b"Subject: Caf\xe9 \xff\xfe\r\n"
        b"Date: the day before yesterday\r\n"
        b"Message-ID: <x@y>\r\n\r\n"
    )
    post = parse_message(raw, now=NOW)
    assert post.author_id == "jerome@example.fr" and post.posted_at == NOW
    assert post.meta is not None and "missing or unreadable Date" in post.meta["flags"]


def test_a_very_long_message_id_is_hashed_to_fit_and_stays_stable() -> None:
    long_id = "<" + "a" * 300 + "@example.com>"
    raw = samples.plain().replace(b"<0b1e2c3d-plain@example.com>", long_id.encode())
    first, second = parse_message(raw, now=NOW), parse_message(raw, now=NOW)
    assert len(first.external_id) <= 200 and first.external_id == second.external_id
    assert first.meta is not None and first.meta["message_id"] == long_id  # the real id, for In-Reply-To


def test_automatic_mail_is_recognised() -> None:
    import email

    def reason(headers: str, sender: str = "a@example.com") -> str | None:
        return automatic_reason(email.message_from_string(headers + "\n\nx"), sender, ["support@acme.test"])

    assert reason("Auto-Submitted: no") is None
    assert reason("Auto-Submitted: auto-generated") == "Auto-Submitted: auto-generated"
    assert reason("Precedence: junk") == "Precedence: junk"
    assert reason("X-Auto-Response-Suppress: OOF, AutoReply") is not None
    assert reason("X-Auto-Response-Suppress: None") is None
    assert reason("Subject: hi", "no-reply@shop.example") == "machine sender no-reply"
    assert reason("Subject: hi", "noreply+bounce@shop.example") == "machine sender noreply+bounce"
    assert reason("Subject: hi", "support@acme.test") == "our own address"
    assert reason("Subject: hi", "norah@example.com") is None


def test_reply_subjects() -> None:
    assert reply_subject("Help") == "Re: Help"
    assert reply_subject("RE: Help") == "RE: Help"
    assert reply_subject(None) == "Re: your message"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_become_a_post(raw: bytes) -> None:
    post = parse_message(raw, now=NOW)
    assert post.external_id and post.posted_at.tzinfo is not None


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300), st.sampled_from([b"utf-8", b"x-unknown", b"iso-8859-1", b"utf-7"]))
def test_any_body_in_any_charset(body: str, charset: bytes) -> None:
    raw = (
        b"From: a@example.com\r\nMessage-ID: <b@c>\r\nContent-Type: text/plain; charset="
        + charset
        + b"\r\n\r\n"
    ) + body.encode("utf-8", "surrogatepass")
    post = parse_message(raw, now=NOW)
    assert post.author_id == "a@example.com"


def test_gmail_reply_keeps_only_the_new_text() -> None:
    post = parse_message(
        samples.gmail_reply("<demo@acme.test>", "<root@example.com> <demo@acme.test>"), now=NOW
    )
    assert post.text == "Thanks, it arrived today!\n\nJane"
    assert (post.reply_to_id, post.thread_id) == ("<demo@acme.test>", "<root@example.com>")
