"""A real SMTP submission server (aiosmtpd) that records what our code sends.

Outgoing mail is tested end to end: the code under test opens a socket,
upgrades with STARTTLS (verified against the test CA), authenticates, and
sends; the test then inspects exactly what arrived. AUTH is mandatory and
only offered after TLS, like a real provider's port 587.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.testbed.tls import TestCA

HOST = "127.0.0.1"
DEFAULT_USERNAME = "mailroom@example.test"
START_ATTEMPTS = 3


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message, as the server saw it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    login: str | None
    peer: tuple[str, int]
    tls: bool
    mail_options: tuple[str, ...] = ()  # MAIL FROM parameters (SIZE=..., BODY=...)


class _RecordingHandler:
    """aiosmtpd handler: checks credentials and records accepted messages."""

    def __init__(self, server: SMTPServer) -> None:
        self._server = server

    def authenticate(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if mechanism not in ("LOGIN", "PLAIN") or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if self._server.check_credentials(login, password):
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        auth_data = session.auth_data
        login = (
            auth_data.login.decode("utf-8", "replace")
            if isinstance(auth_data, LoginPassword)
            else None
        )
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):  # only with decode_data=True, which we do not set
            raw = raw.encode("utf-8", "surrogateescape")
        self._server._record(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                raw=raw,
                login=login,
                peer=(str(session.peer[0]), int(session.peer[1])) if session.peer else ("", 0),
                tls=_is_tls(smtp, session),
                mail_options=tuple(envelope.mail_options),
            )
        )
        return "250 2.0.0 Message accepted"


def _is_tls(smtp: SMTP, session: Session) -> bool:
    """True after STARTTLS (session.ssl) or on the implicit-TLS port (an SSL transport)."""
    if session.ssl is not None:
        return True
    transport = smtp.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class _ImplicitTLSController(Controller):
    """Controller for a TLS-from-the-first-byte port (465 style)."""

    def factory(self) -> SMTP:
        smtp = super().factory()
        # aiosmtpd only counts STARTTLS as TLS for auth_require_tls; here the
        # whole connection is TLS. Switched off after construction, because
        # passing False warns on every connection.
        smtp._auth_require_tls = False
        return smtp


class SMTPServer:
    """STARTTLS submission port (``port``) and implicit-TLS port (``tls_port``).

    ``username``/``password`` is an account that always works; add more with
    ``add_credentials``. ``reset()`` drops recorded mail and extra accounts. A test server
    that answers otherwise (refusals, delays) sets ``handler_class`` to its own handler.
    """

    handler_class: type[_RecordingHandler] = _RecordingHandler

    def __init__(self, ca: TestCA) -> None:
        self.host = HOST
        self.port = 0
        self.tls_port = 0
        self.username = DEFAULT_USERNAME
        self.password = secrets.token_urlsafe(12)
        self._ca = ca
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._credentials: dict[str, str] = {self.username: self.password}
        self._controllers: list[Controller] = []

    # -- lifecycle --------------------------------------------------------

    def _server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._ca.cert_path, self._ca.key_path)
        return context

    def start(self) -> None:
        handler = self.handler_class(self)
        common: dict[str, Any] = {
            "hostname": HOST,
            "server_hostname": "localhost",  # skips a getfqdn() DNS lookup
            "authenticator": handler.authenticate,
            "auth_required": True,
            "auth_exclude_mechanism": ["CRAM-MD5"],
            "ready_timeout": 5.0,
        }
        # Port 587 style: plain connect, STARTTLS, then AUTH.
        self.port = self._start_controller(
            handler, tls_context=self._server_context(), auth_require_tls=True, **common
        )
        # Port 465 style: TLS from the first byte.
        self.tls_port = self._start_controller(
            handler,
            controller_class=_ImplicitTLSController,
            ssl_context=self._server_context(),
            auth_require_tls=True,
            **common,
        )

    def _start_controller(
        self,
        handler: _RecordingHandler,
        controller_class: type[Controller] = Controller,
        **kwargs: Any,
    ) -> int:
        last_error: Exception | None = None
        for _ in range(START_ATTEMPTS):
            port = _free_port()
            controller = controller_class(handler, port=port, **kwargs)
            try:
                controller.start()
            except OSError as error:  # port taken between probe and bind
                last_error = error
                continue
            self._controllers.append(controller)
            return port
        raise RuntimeError(f"aiosmtpd did not start: {last_error}")

    def stop(self) -> None:
        while self._controllers:
            controller = self._controllers.pop()
            with contextlib.suppress(AssertionError, RuntimeError):  # already stopped
                controller.stop()

    # -- accounts and records ---------------------------------------------

    def add_credentials(self, username: str, password: str) -> None:
        with self._lock:
            self._credentials[username] = password

    def check_credentials(self, username: str, password: str) -> bool:
        with self._lock:
            expected = self._credentials.get(username)
        return expected is not None and secrets.compare_digest(expected.encode(), password.encode())

    def _record(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot copy, safe to iterate while the server keeps receiving."""
        with self._lock:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait until at least ``count`` messages arrived (for senders in other threads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.messages
            if len(messages) >= count:
                return messages
            time.sleep(0.01)
        raise TimeoutError(f"expected {count} messages, got {len(self.messages)}")

    def reset(self) -> None:
        with self._lock:
            self._messages.clear()
            self._credentials = {self.username: self.password}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def smtp_server(test_ca: TestCA) -> Iterator[SMTPServer]:
    """Session-wide SMTP server; prefer ``smtp_outbox`` in tests for a clean record."""
    server = SMTPServer(test_ca)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_outbox(smtp_server: SMTPServer) -> Iterator[SMTPServer]:
    """The session SMTP server, emptied before and after the test."""
    smtp_server.reset()
    yield smtp_server
    smtp_server.reset()
