"""The test SMTP server demands STARTTLS + AUTH and records exactly what arrived."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
from email.message import EmailMessage

import aiosmtplib
import pytest

from tests.testbed.smtp import SMTPServer

TIMEOUT = 10


def make_message(subject: str = "Quote for Acme") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sales@example.test"
    msg["To"] = "Client <client@example.org>"
    msg["Subject"] = subject
    msg.set_content("Please find our offer.\n")
    return msg


def send(server: SMTPServer, message: EmailMessage, **kwargs: object) -> None:
    coroutine = aiosmtplib.send(
        message,
        hostname=server.host,
        timeout=TIMEOUT,
        **kwargs,  # type: ignore[arg-type]
    )
    asyncio.run(coroutine)


def test_starttls_auth_send_is_recorded(smtp_outbox: SMTPServer) -> None:
    send(
        smtp_outbox,
        make_message(),
        port=smtp_outbox.port,
        start_tls=True,
        username=smtp_outbox.username,
        password=smtp_outbox.password,
    )

    [received] = smtp_outbox.messages
    assert received.login == smtp_outbox.username
    assert received.mail_from == "sales@example.test"
    assert received.rcpt_tos == ("client@example.org",)
    assert received.tls is True
    assert b"Subject: Quote for Acme" in received.raw
    assert received.raw.endswith(b"Please find our offer.\r\n")


def test_implicit_tls_port(smtp_outbox: SMTPServer) -> None:
    send(
        smtp_outbox,
        make_message("implicit"),
        port=smtp_outbox.tls_port,
        use_tls=True,
        username=smtp_outbox.username,
        password=smtp_outbox.password,
    )
    [received] = smtp_outbox.messages
    assert received.tls is True
    assert received.login == smtp_outbox.username


def test_send_without_auth_is_refused(smtp_outbox: SMTPServer) -> None:
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as excinfo:
        send(smtp_outbox, make_message(), port=smtp_outbox.port, start_tls=True)
    assert excinfo.value.code == 530
    assert smtp_outbox.messages == []


def test_wrong_password_is_refused(smtp_outbox: SMTPServer) -> None:
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        send(
            smtp_outbox,
            make_message(),
            port=smtp_outbox.port,
            start_tls=True,
            username=smtp_outbox.username,
            password="wrong",
        )
    assert smtp_outbox.messages == []


def test_auth_is_not_offered_before_starttls(smtp_outbox: SMTPServer) -> None:
    with smtplib.SMTP(smtp_outbox.host, smtp_outbox.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        token = base64.b64encode(
            f"\0{smtp_outbox.username}\0{smtp_outbox.password}".encode()
        ).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {token}")
        assert code == 538

        client.starttls(context=ssl.create_default_context())
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        assert "LOGIN" in client.esmtp_features["auth"]
        client.login(smtp_outbox.username, smtp_outbox.password)


def test_extra_credentials_and_reset(smtp_outbox: SMTPServer) -> None:
    smtp_outbox.add_credentials("other@example.test", "s3cret")
    send(
        smtp_outbox,
        make_message(),
        port=smtp_outbox.port,
        start_tls=True,
        username="other@example.test",
        password="s3cret",
    )
    assert [m.login for m in smtp_outbox.wait_for(1)] == ["other@example.test"]

    smtp_outbox.reset()
    assert smtp_outbox.messages == []
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        send(
            smtp_outbox,
            make_message(),
            port=smtp_outbox.port,
            start_tls=True,
            username="other@example.test",
            password="s3cret",
        )
