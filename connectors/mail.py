"""The e-mail channel: a mailbox read over IMAP (TLS or STARTTLS), answers sent by SMTP.

Settings (``[accounts.<name>]`` in replyclock.toml, besides ``kind = "email"``):

    ``address``              our address (required): the From of what we send, and our own id.
    ``display_name``         optional name in our From header (``"Acme Support"``).
    ``imap_host``            the IMAP server (required).
    ``imap_port``            default 993 for ``tls``, 143 for ``starttls``.
    ``imap_security``        ``"tls"`` (implicit TLS, default) or ``"starttls"``.
    ``imap_user``            login name (default: ``address``).
    ``imap_password_env``    env var with the IMAP password or app password (default ``EMAIL_IMAP_PASSWORD``).
    ``folder``               the mailbox to read (default ``INBOX``).
    ``sent_folder``          optional: also read this folder (e.g. ``"Sent"``); our answers written in a
                             mail client are found there and answer their conversation.
    ``smtp_host``            the submission server (default: ``imap_host``).
    ``smtp_port``            default 465 for ``tls``, 587 for ``starttls``.
    ``smtp_security``        ``"tls"`` (SMTPS) or ``"starttls"`` (default).
    ``smtp_user``            login name (default: ``imap_user``).
    ``smtp_password_env``    env var with the SMTP password (default: the IMAP one).
    ``ca_file``              optional: a CA certificate file to trust besides the system's (a private server).
    ``max_size``             bytes; larger messages are stored from their headers only, flagged (default 25 MB).
    ``batch_size``           messages per fetch (default 50).
    ``timeout``              seconds per network operation (default 30).
    ``reply_languages``      languages the quoted-history detector knows (default ``["en", "de", "fr", "es"]``).
    ``since_date``           optional ``2026-11-01``: when a folder is first read (or read again after a
                             UIDVALIDITY change), leave mail received before this date alone; set it
                             when connecting a mailbox with old mail, which would all be acknowledged.

TLS is always verified (certificate and host name); plain-text IMAP or SMTP is not offered.

The cursor is a JSON object, one entry per folder read: ``{"INBOX": {"uidvalidity": V, "uid": U}}``:
every message up to UID U of that folder is stored. When the server's UIDVALIDITY of a folder
is no longer V (the mailbox was rebuilt or moved), its UIDs mean nothing any more: the folder
is read again from the start, and the messages already stored are recognised by their
external id, the Message-ID (or, for a message without one, a hash of its bytes), and stored
once.

A post's ``meta`` keeps what an answer needs: the subject, the Message-ID and References, the
address to answer (Reply-To or From), the attachments by name and size, and ``flags`` for damaged
mail. Mail that is itself automatic (RFC 3834: ``Auto-Submitted``, ``Precedence: bulk/list/junk``,
``List-Id``, ``X-Auto-Response-Suppress``, bounces, mailer-daemon and noreply senders) is stored
with ``acknowledge = False``: it is never answered automatically.
"""

from __future__ import annotations

import contextlib
import email
import email.utils
import hashlib
import imaplib
import json
import logging
import os
import re
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from typing import Any, ClassVar, Unpack

from imap_tools import MailBox, MailBoxStartTls
from imap_tools.errors import ImapToolsError, MailboxLoginError
from imap_tools.mailbox import BaseMailBox
from imap_tools.message import MailMessage
from mailparser_reply import EmailReplyParser  # type: ignore[import-untyped]

from connectors.base import (
    AuthFailed,
    Batch,
    Connector,
    ConnectorError,
    ConnectorOptions,
    InboundPost,
    NotSent,
    ReplyAuthFailed,
    ReplyOutcomeUnknown,
    ReplyTarget,
)
from connectors.text import html_to_text

log = logging.getLogger("replyclock.connectors.email")

SETTINGS_KEYS = (
    "address",
    "display_name",
    "imap_host",
    "imap_port",
    "imap_security",
    "imap_user",
    "imap_password_env",
    "folder",
    "sent_folder",
    "smtp_host",
    "smtp_port",
    "smtp_security",
    "smtp_user",
    "smtp_password_env",
    "ca_file",
    "max_size",
    "batch_size",
    "timeout",
    "reply_languages",
    "since_date",
)
SECURITY = ("tls", "starttls")
DEFAULT_IMAP_PASSWORD_ENV = "EMAIL_IMAP_PASSWORD"
DEFAULT_MAX_SIZE = 25 * 1024 * 1024
DEFAULT_BATCH_SIZE = 50
DEFAULT_TIMEOUT = 30.0
DEFAULT_REPLY_LANGUAGES = ("en", "de", "fr", "es")
MAX_ID_LENGTH = 200  # posts.external_id and thread_key are String(200)
MAX_TEXT = 20_000  # characters of a message kept for staff
FETCH_BYTES = 32 * 1024 * 1024  # message bytes asked for in one FETCH (several small, or one large)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Senders that are machines (RFC 3834 section 2 and common practice).
_MACHINE_LOCAL = re.compile(
    r"^(mailer-daemon|postmaster|no-?reply|do-?not-?reply|donotreply|bounces?|auto-?reply|"
    r"autoresponder|notifications?)([+\-._].*)?$",
    re.IGNORECASE,
)
_AUTOMATIC_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply"})
_MSGID = re.compile(r"<[^<>\s]+>")
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
_SUBJECT_PREFIX = re.compile(r"^\s*((re|aw|sv|vs|antw|fwd?|wg)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


# -- reading a message ---------------------------------------------------------------------------


def _header(message: Message, name: str) -> str | None:
    """A header decoded to text (RFC 2047 words, unknown charsets replaced), or None."""
    raw = message.get(name)
    if raw is None:
        return None
    try:
        return str(make_header(decode_header(str(raw)))).strip()
    except (LookupError, UnicodeError, ValueError, TypeError, AssertionError):
        return str(raw).encode("ascii", "replace").decode("ascii").strip()


def message_ids(value: str | None) -> list[str]:
    """The ``<...>`` ids in a Message-ID, In-Reply-To or References header, in order."""
    return _MSGID.findall(value or "")


def short_id(message_id: str) -> str:
    """A Message-ID as stored (external id, thread key): itself, or a hash when it is too long."""
    if len(message_id) <= MAX_ID_LENGTH:
        return message_id
    return "<sha256:" + hashlib.sha256(message_id.encode()).hexdigest() + "@replyclock.invalid>"


def normalised_subject(subject: str | None) -> str:
    """The subject without ``Re:``/``Fwd:``/``AW:`` prefixes, whitespace collapsed, case folded."""
    return " ".join(_SUBJECT_PREFIX.sub("", subject or "").split()).casefold()


def _decode_part(part: Message, flags: list[str]) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        flags.append(f"unknown charset {charset[:40]!r}")
        return payload.decode("utf-8", errors="replace")


@dataclass
class _Body:
    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    original_ids: list[str] = field(default_factory=list)  # Message-IDs in a bounce's returned headers


def _walk(message: Message, body: _Body, flags: list[str]) -> None:
    for part in message.walk():
        if part.is_multipart():
            continue
        content_type = part.get_content_type()
        filename = part.get_filename()
        disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
        if content_type in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers"):
            returned = _decode_part(part, flags) if content_type != "message/rfc822" else str(part)
            for line in returned.splitlines():
                if line.lower().startswith("message-id:"):
                    body.original_ids.extend(message_ids(line))
            continue
        if filename or disposition == "attachment":
            payload = part.get_payload(decode=True)
            name = filename
            if name:
                with contextlib.suppress(LookupError, UnicodeError, ValueError, TypeError, AssertionError):
                    name = str(make_header(decode_header(name)))
            body.attachments.append(
                {
                    "name": (name or "unnamed")[:200],
                    "size": len(payload) if isinstance(payload, bytes) else 0,
                    "type": content_type,
                }
            )
            continue
        if content_type == "text/plain":
            body.plain.append(_decode_part(part, flags))
        elif content_type == "text/html":
            body.html.append(_decode_part(part, flags))


def latest_reply(text: str, languages: Sequence[str]) -> str:
    """The new part of a reply: quoted history, client reply headers and the signature removed."""
    text = text.replace("\r\n", "\n").strip()
    if not text:
        return ""
    try:
        parsed = EmailReplyParser(languages=list(languages)).read(text)
        replies = parsed.replies
        newest = replies[0].body if replies else text
    except Exception:  # the parser is heuristics over regexes: never let it lose a message
        log.warning("reply parser failed; keeping the whole text", exc_info=True)
        return text
    # Quoted lines the parser left (a bottom-quoting client) are history too.
    lines = [line for line in str(newest).split("\n") if not line.lstrip().startswith(">")]
    return "\n".join(lines).strip() or text


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def automatic_reason(message: Message, sender: str | None, own: Sequence[str]) -> str | None:
    """Why this message must not be answered automatically (RFC 3834), or None."""
    auto = (_header(message, "Auto-Submitted") or "").split(";")[0].strip().lower()
    if auto and auto != "no":
        return f"Auto-Submitted: {auto}"
    precedence = (_header(message, "Precedence") or "").strip().lower()
    if precedence in _AUTOMATIC_PRECEDENCE:
        return f"Precedence: {precedence}"
    for name in ("List-Id", "List-Unsubscribe", "List-Post"):
        if message.get(name) is not None:
            return name
    suppress = (_header(message, "X-Auto-Response-Suppress") or "").strip()
    if suppress and suppress.lower() != "none":
        return f"X-Auto-Response-Suppress: {suppress}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Reply"):
        if message.get(name) is not None:
            return name
    if message.get_content_type() == "multipart/report":
        return "delivery or read report"
    return_path = (_header(message, "Return-Path") or "").strip()
    if return_path == "<>":
        return "null sender (Return-Path: <>)"
    if sender is None:
        return "no sender address"
    local = sender.split("@", 1)[0]
    if _MACHINE_LOCAL.match(local):
        return f"machine sender {local}"
    if sender.lower() in {address.lower() for address in own}:
        return "our own address"
    return None


def is_bounce(message: Message, sender: str | None) -> bool:
    """A delivery failure report (RFC 3464) or a mail system's notice: the message did not arrive."""
    if message.get_content_type() == "multipart/report":
        return str(message.get_param("report-type") or "").lower() == "delivery-status"
    local = (sender or "").split("@", 1)[0].lower()
    return local in ("mailer-daemon", "postmaster") or (_header(message, "Return-Path") or "").strip() == "<>"


def _first_address(value: str | None) -> tuple[str | None, str | None]:
    """(display name, lowercased address) of the first address in a header."""
    if not value:
        return None, None
    for name, address in email.utils.getaddresses([value]):
        address = address.strip().lower()
        if _ADDRESS.match(address):
            return (name.strip() or None), address
    return None, None


def parse_message(
    raw: bytes,
    *,
    own: Sequence[str] = (),
    languages: Sequence[str] = DEFAULT_REPLY_LANGUAGES,
    now: datetime,
    headers_only_reason: str | None = None,
) -> InboundPost:
    """One RFC 5322 message as an `InboundPost`; never raises on a damaged message.

    Args:
        raw: the message bytes (only the header when ``headers_only_reason`` is set).
        own: our addresses (never acknowledged).
        languages: for the quoted-history detector.
        now: the time for a message without a usable Date.
        headers_only_reason: why only the header was read (a message over the size limit).
    """
    flags: list[str] = []
    message = email.message_from_bytes(raw)
    if message.defects and not headers_only_reason:  # a header alone lacks the parts it announces
        flags.append("broken MIME: " + ", ".join(sorted({type(d).__name__ for d in message.defects}))[:200])
    if headers_only_reason:
        flags.append(headers_only_reason)

    ids = message_ids(_header(message, "Message-ID"))
    if ids:
        message_id = ids[0]
    else:
        message_id = "<sha256:" + hashlib.sha256(raw).hexdigest() + "@replyclock.invalid>"
        flags.append("missing Message-ID")
    in_reply_to = message_ids(_header(message, "In-Reply-To"))
    references = message_ids(_header(message, "References"))

    author_name, sender = _first_address(_header(message, "From"))
    if sender is None:
        author_name, sender = _first_address(_header(message, "Sender"))
    if sender is None:
        flags.append("missing From")
    _reply_name, reply_address = _first_address(_header(message, "Reply-To"))

    posted_at: datetime | None = None
    date = _header(message, "Date")
    if date:
        try:
            posted_at = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError):
            posted_at = None
    if posted_at is None or posted_at.tzinfo is None:
        flags.append("missing or unreadable Date")
        posted_at = now
    posted_at = posted_at.astimezone(UTC)

    subject = _header(message, "Subject")
    if subject is None:
        flags.append("missing Subject")

    body = _Body()
    if not headers_only_reason:
        try:
            _walk(message, body, flags)
        except Exception as error:  # a part the email package cannot decode: keep what was read
            flags.append(f"unreadable part: {type(error).__name__}")
    plain = "\n\n".join(part for part in body.plain if part.strip())
    if not plain.strip() and body.html:
        plain = "\n\n".join(html_to_text(part) for part in body.html)
    text = latest_reply(plain, languages)[:MAX_TEXT]

    automatic = automatic_reason(message, sender, own)
    reply_to_id = in_reply_to[-1] if in_reply_to else (references[-1] if references else None)
    if reply_to_id is None and body.original_ids:
        # A bounce or report about one of our messages: it belongs to that conversation.
        reply_to_id = body.original_ids[0]
    root = references[0] if references else (reply_to_id or message_id)

    notes = []
    if body.attachments:
        listed = ", ".join(f"{a['name']} ({human_size(int(a['size']))})" for a in body.attachments)
        notes.append(f"[attachments: {listed}]")
    if flags:
        notes.append("[replyclock: " + "; ".join(flags) + "]")
    # A new subject says what the mail is about (and routing rules match it): it leads the text.
    # A reply's "Re: ..." adds nothing to the thread.
    opening = subject if subject and reply_to_id is None and not _SUBJECT_PREFIX.match(subject) else None
    shown = "\n\n".join(part for part in (opening, text, *notes) if part)

    meta: dict[str, Any] = {
        "channel": "email",
        "subject": subject,
        "message_id": message_id,
        "references": [*references, *([] if in_reply_to and in_reply_to[-1] in references else in_reply_to)],
        "reply_address": reply_address or sender,
        "attachments": body.attachments,
        "flags": flags,
    }
    if automatic:
        meta["automatic"] = automatic
        if is_bounce(message, sender):
            meta["bounce"] = True
    return InboundPost(
        external_id=short_id(message_id),
        author_id=sender or "unknown",
        text=shown,
        posted_at=posted_at,
        author_name=author_name,
        author_handle=None,
        thread_id=short_id(root),
        reply_to_id=short_id(reply_to_id) if reply_to_id else None,
        raw={"subject": subject},
        acknowledge=automatic is None,
        meta=meta,
    )


# -- the cursor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderCursor:
    uidvalidity: int
    uid: int


def load_cursor(text: str | None) -> dict[str, FolderCursor]:
    """The stored cursor, one entry per folder.

    Raises:
        ConnectorError: the text is not such an object (not retryable: it needs a human).
    """
    if text is None or not text.strip():
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return {
            str(folder): FolderCursor(int(entry["uidvalidity"]), int(entry["uid"]))
            for folder, entry in data.items()
        }
    except (ValueError, KeyError, TypeError) as error:
        problem = ConnectorError(
            f'e-mail cursor is not {{"<folder>": {{"uidvalidity": V, "uid": U}}}}: {text[:200]!r}'
        )
        problem.retryable = False
        raise problem from error


def dump_cursor(cursor: Mapping[str, FolderCursor]) -> str:
    return json.dumps(
        {folder: {"uidvalidity": c.uidvalidity, "uid": c.uid} for folder, c in sorted(cursor.items())},
        sort_keys=True,
    )


# -- sending -------------------------------------------------------------------------------------


def reply_subject(subject: str | None) -> str:
    subject = " ".join((subject or "").split())
    if not subject:
        return "Re: your message"
    if re.match(r"^re\s*:", subject, re.IGNORECASE):
        return subject
    return f"Re: {subject}"


def build_reply(
    *,
    sender: str,
    display_name: str | None,
    to: ReplyTarget,
    text: str,
    automatic: bool,
    now: datetime,
    message_id: str | None = None,
) -> EmailMessage:
    """The answer to `to` as a threaded message (RFC 5322 section 3.6.4).

    Args:
        message_id: the new message's id (default: a fresh one in our domain).
    """
    extra = to.extra
    recipient = extra.get("reply_address") or to.author_id
    if not isinstance(recipient, str) or not _ADDRESS.match(recipient):
        raise NotSent(f"no address to answer {to.external_id}: {recipient!r}")
    stored_id = extra.get("message_id")
    parent: str = stored_id if isinstance(stored_id, str) else to.external_id
    references = [r for r in extra.get("references") or [] if isinstance(r, str)]
    if parent not in references:
        references.append(parent)
    message = EmailMessage()
    message["From"] = email.utils.formataddr((display_name or "", sender)) if display_name else sender
    message["To"] = recipient
    message["Subject"] = reply_subject(
        extra.get("subject") if isinstance(extra.get("subject"), str) else None
    )
    message["Date"] = email.utils.format_datetime(now.astimezone(UTC))
    message["Message-ID"] = message_id or email.utils.make_msgid(domain=sender.rsplit("@", 1)[1])
    message["In-Reply-To"] = parent
    # RFC 5322 allows trimming long References; keep the first (the root) and the newest.
    kept = references if len(references) <= 20 else [references[0], *references[-19:]]
    message["References"] = " ".join(kept)
    if automatic:
        message["Auto-Submitted"] = "auto-replied"
        message["X-Auto-Response-Suppress"] = "All"
    message.set_content(text)
    return message


def _by_size(uids: Sequence[int], sizes: Mapping[int, int], limit: int) -> list[list[int]]:
    """`uids` in order, grouped so that each group's messages add up to at most `limit` bytes
    (a larger message alone), and at most 20 a group."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if current and (total + size > limit or len(current) >= 20):
            groups.append(current)
            current, total = [], 0
        current.append(uid)
        total += size
    if current:
        groups.append(current)
    return groups


def _raw(message: MailMessage) -> bytes:
    return message.raw if isinstance(message, _RawMessage) else message.obj.as_bytes()


class _RawMessage(MailMessage):
    """imap-tools' message that also keeps the bytes as the server sent them (hashed for missing ids)."""

    def __init__(self, fetch_data: list[Any]) -> None:
        super().__init__(fetch_data)
        self.raw: bytes = self._get_message_data_parts(fetch_data)[0]


# -- the connector -------------------------------------------------------------------------------


class EmailConnector(Connector):
    """A mailbox over IMAP in, answers by SMTP out."""

    kind: ClassVar[str] = "email"
    settings_keys: ClassVar[tuple[str, ...] | None] = SETTINGS_KEYS
    settings_label: ClassVar[str] = "e-mail"

    def __init__(self, name: str, **options: Unpack[ConnectorOptions]) -> None:
        super().__init__(name, **options)
        s = self.settings
        address = s.get("address")
        if not isinstance(address, str) or not _ADDRESS.match(address.strip()):
            raise ValueError(f"setting address must be our e-mail address, not {address!r}")
        self.address = address.strip().lower()
        self.own_ids = tuple(dict.fromkeys([*(i.lower() for i in self.own_ids), self.address]))
        display = s.get("display_name")
        if display is not None and not isinstance(display, str):
            raise ValueError(f"setting display_name must be text, not {display!r}")
        self.display_name = display or None

        self.imap_host = self._host("imap_host", s.get("imap_host"))
        self.imap_security = self._security("imap_security", "tls")
        self.imap_port = self._port("imap_port", 993 if self.imap_security == "tls" else 143)
        self.imap_user = self._text("imap_user", self.address)
        self.imap_password_env = self._text("imap_password_env", DEFAULT_IMAP_PASSWORD_ENV)
        self.smtp_host = self._host("smtp_host", s.get("smtp_host", self.imap_host))
        self.smtp_security = self._security("smtp_security", "starttls")
        self.smtp_port = self._port("smtp_port", 465 if self.smtp_security == "tls" else 587)
        self.smtp_user = self._text("smtp_user", self.imap_user)
        self.smtp_password_env = self._text("smtp_password_env", self.imap_password_env)
        self.imap_password = self.environ.get(self.imap_password_env, "")
        self.smtp_password = self.environ.get(self.smtp_password_env, "")
        missing = sorted(
            {
                var
                for var, value in (
                    (self.imap_password_env, self.imap_password),
                    (self.smtp_password_env, self.smtp_password),
                )
                if not value
            }
        )
        if missing:
            raise ValueError(
                f"environment variable(s) {', '.join(missing)} not set: the mailbox password "
                "(or app password) is needed to read and send mail"
            )
        self.folder = self._text("folder", "INBOX")
        sent = s.get("sent_folder")
        if sent is not None and (not isinstance(sent, str) or not sent.strip()):
            raise ValueError(f"setting sent_folder must name a folder, not {sent!r}")
        self.folders = tuple(dict.fromkeys([self.folder, *([sent.strip()] if sent else [])]))
        ca_file = s.get("ca_file")
        if ca_file is not None and (not isinstance(ca_file, str) or not os.path.isfile(ca_file)):
            raise ValueError(f"setting ca_file must be a readable certificate file, not {ca_file!r}")
        self.ca_file = ca_file
        self.max_size = self._positive_int("max_size", DEFAULT_MAX_SIZE)
        self.batch_size = self._positive_int("batch_size", DEFAULT_BATCH_SIZE)
        self.timeout = self.seconds_setting("timeout", DEFAULT_TIMEOUT)
        languages = s.get("reply_languages", list(DEFAULT_REPLY_LANGUAGES))
        if not isinstance(languages, list) or not all(isinstance(x, str) for x in languages):
            raise ValueError(f"setting reply_languages must be a list of language codes, not {languages!r}")
        self.languages = tuple(languages)
        since = s.get("since_date")
        if since is not None and not isinstance(since, date):
            if not isinstance(since, str):
                raise ValueError(f"setting since_date must be a date such as 2026-11-01, not {since!r}")
            try:
                since = date.fromisoformat(since)
            except ValueError:
                raise ValueError(
                    f"setting since_date must be a date such as 2026-11-01, not {since!r}"
                ) from None
        if isinstance(since, datetime):
            since = since.date()
        self.since_date: date | None = since

    # -- settings helpers --

    def _text(self, key: str, default: str) -> str:
        value = self.settings.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"setting {key} must be non-empty text, not {value!r}")
        return value.strip()

    def _host(self, key: str, value: object) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", value.strip()):
            raise ValueError(f"setting {key} must be a host name, not {value!r}")
        return value.strip()

    def _security(self, key: str, default: str) -> str:
        value = self.settings.get(key, default)
        if value not in SECURITY:
            raise ValueError(f"setting {key} must be 'tls' or 'starttls', not {value!r}")
        return str(value)

    def _port(self, key: str, default: int) -> int:
        value = self.settings.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ValueError(f"setting {key} must be a TCP port, not {value!r}")
        return value

    def _positive_int(self, key: str, default: int) -> int:
        value = self.settings.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"setting {key} must be a positive integer, not {value!r}")
        return value

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_file:
            context.load_verify_locations(cafile=self.ca_file)
        return context

    def __repr__(self) -> str:
        return f"EmailConnector({self.name!r}, address={self.address!r}, imap_host={self.imap_host!r})"

    # -- reading --

    def _mailbox(self) -> BaseMailBox:
        if self.imap_security == "tls":
            mailbox: BaseMailBox = MailBox(
                self.imap_host, self.imap_port, timeout=self.timeout, ssl_context=self._tls()
            )
        else:
            mailbox = MailBoxStartTls(
                self.imap_host, self.imap_port, timeout=self.timeout, ssl_context=self._tls()
            )
        mailbox.email_message_class = _RawMessage
        return mailbox

    def fetch(self, cursor: str | None) -> Batch:
        """New messages of the folders after the cursor, at most ``batch_size``; ``more`` if any are left.

        Raises:
            AuthFailed: the server refused the login.
            ConnectorError: network, TLS or protocol failures.
        """
        state = load_cursor(cursor)
        try:
            mailbox = self._mailbox()
        except (OSError, imaplib.IMAP4.error, ssl.SSLError) as error:
            raise ConnectorError(f"could not connect to IMAP {self.imap_host}: {error}") from error
        try:
            try:
                mailbox.login(self.imap_user, self.imap_password, initial_folder=None)
            except MailboxLoginError as error:
                raise AuthFailed(
                    f"IMAP {self.imap_host} refused the login of {self.imap_user}; check {self.imap_password_env}"
                ) from error
            posts: list[InboundPost] = []
            more = False
            for folder in self.folders:
                room = self.batch_size - len(posts)
                if room <= 0:
                    more = True
                    break
                found, left = self._fetch_folder(mailbox, folder, state, room)
                posts.extend(found)
                more = more or left
            return Batch(posts=tuple(posts), cursor=dump_cursor(state), more=more)
        except (OSError, imaplib.IMAP4.error, ImapToolsError, ssl.SSLError) as error:
            raise ConnectorError(f"IMAP {self.imap_host} failed: {type(error).__name__}: {error}") from error
        finally:
            with contextlib.suppress(Exception):  # the connection may already be gone
                mailbox.logout()

    def _fetch_folder(
        self, mailbox: BaseMailBox, folder: str, state: dict[str, FolderCursor], room: int
    ) -> tuple[list[InboundPost], bool]:
        mailbox.folder.set(folder, readonly=True)
        status = mailbox.folder.status(folder, ["UIDVALIDITY", "UIDNEXT"])
        uidvalidity = int(status["UIDVALIDITY"])
        known = state.get(folder)
        if known is not None and known.uidvalidity != uidvalidity:
            log.warning(
                "IMAP UIDVALIDITY changed; reading the folder again (stored messages are kept once)",
                extra={"account": self.name, "folder": folder, "was": known.uidvalidity, "now": uidvalidity},
            )
            known = None
        last = known.uid if known else 0
        criteria = f"UID {last + 1}:*"
        if known is None and self.since_date is not None:
            # First read (or a re-sync): leave older mail alone, as `since_date` asks.
            criteria += (
                f" SINCE {self.since_date.day}-{_MONTHS[self.since_date.month - 1]}-{self.since_date.year}"
            )
        # "N:*" always names the newest message even below N: keep only UIDs above the cursor.
        uids = sorted(int(u) for u in mailbox.uids(criteria) if int(u) > last)
        if not uids:
            state[folder] = FolderCursor(uidvalidity, last)
            return [], False
        chosen, left = uids[:room], len(uids) > room
        now = self.clock.now()
        # Headers and sizes first (one FETCH), then the bodies of the messages under the limit.
        heads: dict[int, tuple[int, bytes]] = {
            int(m.uid): (m.size_rfc822, _raw(m))
            for m in mailbox.fetch(
                uid_list=[str(u) for u in chosen], mark_seen=False, headers_only=True, bulk=True
            )
            if m.uid
        }
        sizes = {uid: size for uid, (size, _header) in heads.items()}
        small = [u for u in chosen if u in heads and sizes[u] <= self.max_size]
        bodies: dict[int, bytes] = {}
        for chunk in _by_size(small, sizes, FETCH_BYTES):
            for message in mailbox.fetch(uid_list=[str(u) for u in chunk], mark_seen=False, bulk=True):
                if message.uid:
                    bodies[int(message.uid)] = _raw(message)
        posts: list[InboundPost] = []
        for uid in chosen:
            if uid not in heads or (uid not in bodies and sizes[uid] <= self.max_size):
                # Expunged between the search and the fetch: nothing left to store.
                log.info(
                    "e-mail gone before it was read",
                    extra={"account": self.name, "folder": folder, "uid": uid},
                )
                continue
            try:
                if uid in bodies:
                    post = self._parse(bodies[uid], now, None)
                else:
                    size = sizes[uid]
                    reason = (
                        f"too large ({human_size(size)} over the {human_size(self.max_size)} limit): "
                        "only the header was read"
                    )
                    post = self._parse(heads[uid][1], now, reason)
                posts.append(post)
            except Exception:  # never let one message stop the poll
                log.exception(
                    "unreadable e-mail skipped", extra={"account": self.name, "folder": folder, "uid": uid}
                )
        state[folder] = FolderCursor(uidvalidity, chosen[-1])
        return posts, left

    def _parse(self, raw: bytes, now: datetime, headers_only_reason: str | None) -> InboundPost:
        return parse_message(
            raw, own=self.own_ids, languages=self.languages, now=now, headers_only_reason=headers_only_reason
        )

    def is_own(self, post: InboundPost) -> bool:
        return post.author_id.lower() in self.own_ids

    # -- writing --

    def reply(self, to: ReplyTarget, text: str) -> str:
        """Send `text` to the customer as a threaded answer; returns its Message-ID.

        Raises:
            ReplyAuthFailed: the server refused our login (nothing sent).
            NotSent: no connection, TLS failure, the server refused sender, recipient or message.
            ReplyOutcomeUnknown: the connection broke after the message was handed over.
        """
        automatic = to.extra.get("outbox_kind") == "ack"
        message = build_reply(
            sender=self.address,
            display_name=self.display_name,
            to=to,
            text=text,
            automatic=automatic,
            now=self.clock.now(),
        )
        message_id = str(message["Message-ID"])
        try:
            client = self._smtp()
        except (OSError, smtplib.SMTPException, ssl.SSLError) as error:
            raise NotSent(f"could not connect to SMTP {self.smtp_host}: {type(error).__name__}") from error
        try:
            try:
                client.login(self.smtp_user, self.smtp_password)
            except smtplib.SMTPAuthenticationError as error:
                raise ReplyAuthFailed(
                    f"SMTP {self.smtp_host} refused the login of {self.smtp_user}; check {self.smtp_password_env}"
                ) from error
            except smtplib.SMTPException as error:
                raise NotSent(f"SMTP {self.smtp_host} login failed: {error}") from error
            try:
                refused = client.send_message(message)
            except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as error:
                raise NotSent(f"SMTP {self.smtp_host} refused the message: {error}") from error
            except (smtplib.SMTPServerDisconnected, OSError) as error:
                raise ReplyOutcomeUnknown(
                    f"SMTP {self.smtp_host} connection broke while sending ({type(error).__name__}); "
                    "the message may or may not be sent"
                ) from error
            if refused:
                raise NotSent(f"SMTP {self.smtp_host} refused recipient(s) {', '.join(refused)}")
        finally:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()
        log.info("e-mail sent", extra={"account": self.name, "message_id": message_id, "ack": automatic})
        return short_id(message_id)

    def _smtp(self) -> smtplib.SMTP:
        if self.smtp_security == "tls":
            return smtplib.SMTP_SSL(self.smtp_host, self.smtp_port, timeout=self.timeout, context=self._tls())
        client = smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=self.timeout)
        try:
            client.ehlo()
            if not client.has_extn("starttls"):
                raise NotSent(f"SMTP {self.smtp_host} does not offer STARTTLS; refusing to send in clear")
            client.starttls(context=self._tls())
            client.ehlo()
        except BaseException:
            client.close()
            raise
        return client


__all__ = [
    "EmailConnector",
    "ReplyAuthFailed",
    "ReplyOutcomeUnknown",
    "build_reply",
    "load_cursor",
    "parse_message",
]
