"""A local submission server for the e-mail tests: aiosmtpd with STARTTLS (or implicit TLS) and AUTH.

It refuses to authenticate before TLS, refuses mail before AUTH, and records what it accepts
(envelope and the message bytes as they arrived) for the tests to read.
"""

from __future__ import annotations

import email
import email.policy
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.procs.launch import free_port

SMTP_USER = "support@acme.test"
SMTP_PASSWORD = "smtp-test-password-41c9"


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class _Handler:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.refuse_with: str | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refuse_with:
            return self.refuse_with
        content = envelope.original_content or b""
        self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 Message accepted for delivery"


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = (
        isinstance(data, LoginPassword)
        and data.login.decode() == SMTP_USER
        and data.password.decode() == SMTP_PASSWORD
    )
    return AuthResult(success=ok, handled=False)


class SubmissionServer:
    """``with SubmissionServer(cert, key, implicit_tls=False) as smtp``: ``smtp.port``, ``smtp.received``."""

    def __init__(self, cert: Path, key: Path, *, implicit_tls: bool = False) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        self.handler = _Handler()
        self.port = free_port()
        common: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": self.port,
            "authenticator": _authenticate,
            # aiosmtpd only knows STARTTLS as TLS; with implicit TLS the whole session is encrypted.
            "auth_require_tls": not implicit_tls,
            "auth_required": True,
        }
        if implicit_tls:
            self.controller = Controller(
                self.handler, ssl_context=context, server_hostname="localhost", **common
            )
        else:
            self.controller = Controller(self.handler, tls_context=context, require_starttls=True, **common)

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def __enter__(self) -> SubmissionServer:
        self.controller.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.controller.stop()
