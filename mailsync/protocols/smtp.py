"""SMTP adapter over aiosmtplib: log in, send one message.

Pure I/O like the other adapters: no ORM, plain values in, a MailError out when something
fails. Certificates and host names are always verified (``tls_context()``); STARTTLS, when
asked for, is required, never skipped when the server does not offer it.

aiosmtplib's low-level ``mail()``/``rcpt()`` pass CR/LF through to the wire (FIELD-NOTES), so
every envelope address and header is checked here as a last line before any command is sent.
A mail goes out as built, with DATA written in pieces (``_sendmail_in_pieces``), or, when the
server needs it re-generated (SMTPUTF8, 8-bit data without 8BITMIME), with ``send_message``.
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import re
import ssl
import threading
from collections.abc import Coroutine, Sequence
from email.message import EmailMessage
from typing import Any, TypeVar

import aiosmtplib

from ..mime.headers import without_fields
from ..exceptions import (
    MailAuthError,
    MailConfigError,
    MailDeliveryUncertain,
    MailError,
    MailProtocolError,
    MailServerUnreachable,
    MailTLSError,
    MailUserError,
)
from .base import ServerSettings, open_checked_socket, tls_context, translate_network_error

T = TypeVar("T")

# The name we give in EHLO. aiosmtplib's default is socket.getfqdn(), a DNS lookup that can
# hang for seconds on a machine without DNS; submission servers do not check it.
EHLO_NAME = "mailroom.localdomain"
_UNSAFE = re.compile(r"[\r\n\x00]")


class HeaderInjection(MailUserError):
    """A header or address carries CR, LF or NUL: it could smuggle extra headers."""

    code = "header_injection"


class RecipientsRefused(MailUserError):
    code = "recipients_refused"


class SenderRefused(MailUserError):
    code = "sender_refused"


class MessageTooLarge(MailUserError):
    code = "message_too_large"


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code.

    ``asyncio.run`` refuses to start inside a running loop, which is the case in the main
    thread while Playwright's sync API is active (browser tests) and in async callers: there
    the coroutine runs in a fresh thread with its own loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="mailroom-smtp", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def check_headers(message: EmailMessage) -> None:
    """Refuse a message whose header values contain CR, LF or NUL (header injection)."""
    for name, value in message.items():
        if _UNSAFE.search(str(name)) or _UNSAFE.search(str(value)):
            raise HeaderInjection(f"The {name} header contains a line break.")


def check_address(address: str) -> str:
    if not address or _UNSAFE.search(address) or any(c in address for c in " <>,"):
        raise HeaderInjection(f"{address!r} is not a single plain email address.")
    return address


def _client(settings: ServerSettings) -> aiosmtplib.SMTP:
    if settings.security not in {"ssl", "starttls", "none"}:
        raise MailConfigError(f"Unknown SMTP security {settings.security!r}.")
    # Connected here, to the address the SSRF check saw (open_checked_socket); TLS verifies
    # the certificate against the host name. Blocking is fine: the loop is this send's own.
    sock = open_checked_socket(settings)
    try:
        return aiosmtplib.SMTP(
            hostname=settings.host,
            sock=sock,
            use_tls=settings.security == "ssl",
            start_tls=settings.security == "starttls",
            validate_certs=True,
            tls_context=tls_context(),
            timeout=settings.timeout,
            local_hostname=EHLO_NAME,
        )
    except BaseException:
        sock.close()
        raise


def _too_large(exc: aiosmtplib.SMTPResponseException) -> bool:
    """552, or the enhanced codes 5.3.4 / 5.2.3 (RFC 3463: too big for the system, over the
    administrative limit)."""
    return exc.code == 552 or any(code in (exc.message or "") for code in ("5.3.4", "5.2.3"))


def _too_large_error(exc: aiosmtplib.SMTPResponseException, kind: type[MailError]) -> MailError:
    return kind(f"The mail is too large for the outgoing server ({exc.code} {exc.message}).",
                hint="Send smaller or fewer attachments (or a link to them).")


def _translate(exc: BaseException, settings: ServerSettings) -> MailError:
    """aiosmtplib and socket failures in plain words, marked as the outgoing server's."""
    host = settings.host
    if isinstance(exc, MailError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        text = (exc.message or "").lower()
        if "disabled" in text or "not enabled" in text:
            return MailConfigError(
                f"Outgoing mail (SMTP) server {host}: sending with a password is turned off "
                "for this account.",
                hint="Turn on SMTP authentication (\"authenticated SMTP\") in the provider's "
                     "account settings, or ask its administrator.",
            )
        return MailAuthError(
            f"Outgoing mail (SMTP) server {host} rejected the username or password.",
            hint=("If the account uses two-step verification (Gmail, Yahoo, iCloud, Outlook), "
                  "create an app-specific password and use it here; if the SMTP login differs "
                  "from the incoming one, enter it under Server Details."),
        )
    # A 4xx reply is temporary (RFC 5321 4.2.1: greylisting, a rate limit, a full queue):
    # the same mail may go through on Retry. Said as such, with the reply code; before, a
    # 451 rate limit read "may not be allowed to send as this address" and a 450 greylisting
    # like a wrong address, without the code that tells them apart.
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        if _too_large(exc):
            # Refused at MAIL FROM for the SIZE we declared (RFC 1870 6.1): the mail is too
            # large for this server (Postfix's default limit is 10 MB; we allow 18 MB of
            # attachments), not an address the account may not use.
            return _too_large_error(exc, SenderRefused)
        if 400 <= exc.code < 500:
            return SenderRefused(
                f"The server temporarily refused to send from {exc.sender} "
                f"({exc.code} {exc.message}).",
                hint="Nothing was sent. Try again later (Retry).",
            )
        return SenderRefused(
            f"The server refused to send from {exc.sender} ({exc.code} {exc.message}).",
            hint="The account may not be allowed to send as this address.",
        )
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = ", ".join(r.recipient for r in exc.recipients[:5])
        first = exc.recipients[0] if exc.recipients else None
        detail = f"{first.code} {first.message}" if first else ""
        if exc.recipients and all(400 <= r.code < 500 for r in exc.recipients):
            return RecipientsRefused(
                f"The server temporarily refused the recipient(s) {refused} ({detail}).",
                hint="Nothing was sent. Try again later (Retry).",
            )
        if "relay" in detail.lower():
            # "Relay access denied" is about the connection, not the addresses: the server
            # does not take mail for other domains from this (unauthenticated) client.
            return RecipientsRefused(
                f"Outgoing mail (SMTP) server {host} does not relay mail to {refused} "
                f"({detail}).",
                hint="Check the SMTP server name and port (submission: 587 or 465) and that "
                     "a login is used (SMTP username and password under Server Details).",
            )
        return RecipientsRefused(f"The server refused the recipient(s) {refused} ({detail}).")
    if isinstance(exc, aiosmtplib.SMTPDataError):
        # Refused at the end of DATA (RFC 5321 4.2.2): nothing was delivered. 552 / 5.3.4 is
        # the size limit of a server that did not announce SIZE (or checks it only here);
        # a 4xx is temporary (a rate limit, greylisting). Before, both read only "answered
        # 552: ..." without what to do.
        if _too_large(exc):
            return _too_large_error(exc, MessageTooLarge)
        if 400 <= exc.code < 500:
            return MailProtocolError(
                f"Outgoing mail (SMTP) server {host} temporarily refused the mail "
                f"({exc.code} {exc.message}).",
                hint="Nothing was sent. Try again later (Retry).",
            )
    if isinstance(exc, aiosmtplib.SMTPNotSupported) or (
        isinstance(exc, aiosmtplib.SMTPException) and not isinstance(exc, (
            aiosmtplib.SMTPResponseException, ConnectionError, TimeoutError))
    ):
        text = str(exc).lower()
        if "auth extension" in text and "tls" in text:
            return MailTLSError(
                f"Outgoing mail (SMTP) server {host} accepts a login only over an encrypted "
                "connection.",
                hint="Choose STARTTLS (usually port 587) or SSL/TLS (port 465).",
            )
        if "starttls extension" in text:
            return MailTLSError(
                f"Outgoing mail (SMTP) server {host} does not offer STARTTLS on port "
                f"{settings.port}.",
                hint="Use SSL/TLS (usually port 465) instead.",
            )
        if "auth extension" in text:
            return MailConfigError(
                f"Outgoing mail (SMTP) server {host} does not accept a login.",
                hint="Check the SMTP server name and port (submission is usually 587 or 465).",
            )
        if "smtputf8" in text:
            return MailConfigError(
                f"Outgoing mail (SMTP) server {host} cannot send to or from addresses with "
                "non-ASCII characters.",
            )
    if isinstance(exc, (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPReadTimeoutError)):
        return MailServerUnreachable(
            f"Outgoing mail (SMTP) server {host} did not answer in time.",
            hint="Check the server name, the port and the security setting: port 465 (SSL/TLS) "
                 "waits for encryption before it says anything.",
        )
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (ssl.SSLError, OSError)):
            return _prefix(translate_network_error(cause, host))
        text = str(exc)
        if "refused" in text.lower():
            return MailServerUnreachable(
                f"Outgoing mail (SMTP) server {host} refused the connection on port "
                f"{settings.port}.",
                hint="Check the port and the security setting.",
            )
        return MailServerUnreachable(f"Outgoing mail (SMTP) server {host}: {text}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ssl.SSLError):
            return _prefix(translate_network_error(cause, host))
        return MailServerUnreachable(
            f"Outgoing mail (SMTP) server {host} closed the connection.",
            hint="Check the port and the security setting (SSL/TLS or STARTTLS).",
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return MailProtocolError(
            f"Outgoing mail (SMTP) server {host} answered {exc.code}: {exc.message}"
        )
    if isinstance(exc, (ssl.SSLError, OSError, EOFError)):
        return _prefix(translate_network_error(exc, host))
    return MailProtocolError(f"Outgoing mail (SMTP) server {host}: {exc}")


def _prefix(error: MailError) -> MailError:
    error.message = f"Outgoing mail (SMTP): {error.message}"
    return error


async def _login(client: aiosmtplib.SMTP, settings: ServerSettings) -> None:
    await client.connect()
    if settings.username:
        await client.login(settings.username, settings.password)


async def _check_login(settings: ServerSettings) -> None:
    client = _client(settings)
    try:
        await _login(client, settings)
    finally:
        await _close(client)


async def _close(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        try:
            await client.quit()
        except Exception:  # noqa: BLE001  (closing must not mask the cause)
            client.close()
    if client.sock is not None:
        client.sock.close()  # never connected (TLS failed, say): the socket is still ours


class _NoAnswerAfterData(Exception):
    """The connection failed once the mail was handed over (the final dot written; with
    send_message, once DATA had begun): the server may have accepted the mail."""


_BCC = frozenset({b"bcc", b"resent-bcc"})


def _split(raw: bytes) -> tuple[bytes, int]:
    """The header block of a CRLF message (without the empty line) and where its body starts."""
    end = raw.find(b"\r\n\r\n")
    return (raw, len(raw)) if end < 0 else (raw[:end], end + 4)


# DATA is written in pieces of about this size, each ending at a line end.
DATA_PIECE = 1 << 20
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def _lines_in_pieces(parts: Sequence[bytes | memoryview], size: int = DATA_PIECE):  # noqa: ANN202
    """The concatenation of ``parts`` in pieces of about ``size`` bytes that each end after
    an LF (but the last), so that a CRLF is never split and each piece starts a line."""
    carry = b""
    for part in parts:
        view = memoryview(part)
        start = 0
        while start < len(view):
            end = min(start + size, len(view))
            if end < len(view):
                cut = bytes(view[end:min(end + 8192, len(view))]).find(b"\n")
                while cut < 0 and end < len(view):  # a very long line: look further
                    end = min(end + 8192, len(view))
                    cut = bytes(view[end:min(end + 8192, len(view))]).find(b"\n")
                end = len(view) if cut < 0 else end + cut + 1
            piece = carry + bytes(view[start:end]) if carry else bytes(view[start:end])
            start = end
            if piece.endswith(b"\n"):
                carry = b""
                yield piece
            else:
                carry = piece  # a part ended mid-line: joined with the next part's start
    if carry:
        yield carry


def _wire_pieces(parts: Sequence[bytes | memoryview]):  # noqa: ANN202
    """What DATA transmits, in pieces: every line end a CRLF (lone CR and LF too), lines
    that start with a dot doubled (RFC 5321 4.5.2), a CRLF at the end. The same bytes as
    aiosmtplib's ``execute_data_command`` without its terminating ``.CRLF``, which rewrote
    the whole message at once, three copies of it (issue 3: a worker under 200 MB)."""
    last = b""
    for piece in _lines_in_pieces(parts):
        out = _LEADING_DOT.sub(b"..", _LINE_ENDS.sub(b"\r\n", piece))
        last = out[-2:]
        yield out
    if last != b"\r\n":
        yield b"\r\n"


async def _sendmail_in_pieces(client: aiosmtplib.SMTP, sender: str, recipients: list[str],
                              parts: Sequence[bytes | memoryview], options: list[str],
                              timeout: float, begin_data) -> dict[str, aiosmtplib.SMTPResponse]:  # noqa: ANN001
    """``client.sendmail`` with DATA written piece by piece (flow-controlled) instead of the
    whole message rewritten in memory at once. MAIL, RCPT and RSET go through aiosmtplib's
    public commands; DATA through its protocol object (``write``, ``read_response`` and the
    drain of the transport's buffer), the way ``execute_data_command`` does it. The
    refused recipients are returned as sendmail returns them; all refused is
    SMTPRecipientsRefused."""
    if client.supports_extension("size"):
        options = [f"SIZE={sum(len(p) for p in _wire_pieces(parts))}", *options]
    try:
        await client.mail(sender, options=options, timeout=timeout)
        refused: list[aiosmtplib.SMTPRecipientRefused] = []
        for recipient in recipients:
            try:
                await client.rcpt(recipient, timeout=timeout)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused.append(exc)
        if len(refused) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(refused)
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        try:
            async with protocol._command_lock:  # noqa: SLF001
                protocol._response_pending = True  # noqa: SLF001
                protocol.write(b"DATA\r\n")
                start = await protocol.read_response(timeout=timeout)
                if start.code != aiosmtplib.SMTPStatus.start_input:
                    raise aiosmtplib.SMTPDataError(start.code, start.message)
                protocol._response_pending = True  # noqa: SLF001
                for piece in _wire_pieces(parts):
                    protocol.write(piece)
                    try:  # the transport's buffer stays small; a server that stops reading
                        # fails the send after the timeout, as aiosmtplib's read timeout did
                        await asyncio.wait_for(protocol._drain_helper(), timeout)  # noqa: SLF001
                    except TimeoutError as exc:
                        raise aiosmtplib.SMTPReadTimeoutError("Timed out sending the message") from exc
                # Only from here may the server hold the whole mail: a failure before the
                # final dot is no delivery (RFC 5321 4.1.1.4; 3.8: as a 451), one after it
                # may be one (MailDeliveryUncertain).
                await begin_data()
                protocol.write(b".\r\n")
                response = await protocol.read_response(timeout=timeout)
                if response.code != aiosmtplib.SMTPStatus.completed:
                    raise aiosmtplib.SMTPDataError(response.code, response.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            client.close()
            raise
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        try:
            await client.rset(timeout=timeout)
        except (ConnectionError, aiosmtplib.SMTPResponseException):
            pass
        raise
    return {exc.recipient: aiosmtplib.SMTPResponse(exc.code, exc.message) for exc in refused}


async def _send(settings: ServerSettings, raw: bytes, sender: str,
                recipients: Sequence[str]) -> dict[str, str]:
    client = _client(settings)
    data_begun = False
    real_data = client.data

    async def data(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nonlocal data_begun
        data_begun = True
        return await real_data(*args, **kwargs)

    client.data = data  # type: ignore[method-assign]
    try:
        await _login(client, settings)
        try:
            head, body_at = _split(raw)
            plain = sender.isascii() and all(r.isascii() for r in recipients)
            if plain and (raw.isascii() or client.supports_extension("8BITMIME")):
                # As built (CRLF, headers encoded): sent as it is, Bcc dropped from what is
                # transmitted (the envelope still carries it). Parsing and re-generating a
                # large mail took ~8 times its size in memory (issue 3: worker < 200 MB).
                options = ["BODY=8BITMIME"] if client.supports_extension("8BITMIME") else []
                kept = without_fields(head, _BCC)
                pieces = (kept, b"\r\n\r\n", memoryview(raw)[body_at:]) if body_at < len(raw) else (kept,)

                async def begin_data() -> None:
                    nonlocal data_begun
                    data_begun = True

                refused = await _sendmail_in_pieces(client, sender, list(recipients), pieces,
                                                    options, settings.timeout, begin_data)
            else:
                # SMTPUTF8 addresses, or 8-bit data to a server without 8BITMIME: the email
                # package re-generates it as that server needs (send_message drops Bcc).
                message = email.message_from_bytes(raw, _class=EmailMessage, policy=email.policy.SMTP)
                refused, _ = await client.send_message(message, sender=sender, recipients=list(recipients))
        except (aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected, ConnectionError,
                TimeoutError) as exc:
            if data_begun:
                raise _NoAnswerAfterData(str(exc)) from exc
            raise
        return {address: f"{reply.code} {reply.message}" for address, reply in refused.items()}
    finally:
        await _close(client)


def check_login(settings: ServerSettings) -> None:
    """Connect and log in to the SMTP server; raise a MailError that says what to fix."""
    try:
        run_coroutine(_check_login(settings))
    except Exception as exc:  # noqa: BLE001  (every failure is translated)
        raise _translate(exc, settings) from exc


def send(settings: ServerSettings, raw: bytes, *, sender: str,
         recipients: Sequence[str]) -> dict[str, str]:
    """Send the RFC 5322 message ``raw`` (Bcc headers are not transmitted) to ``recipients``.
    Returns the recipients the server refused (address -> its reply) when it took the mail
    for the others; refusing them all is an error. MailDeliveryUncertain: the connection
    failed after the mail was handed over."""
    head, _ = _split(raw)
    check_headers(email.parser.BytesHeaderParser(_class=EmailMessage, policy=email.policy.SMTP)
                  .parsebytes(head + b"\r\n\r\n"))
    check_address(sender)
    if not recipients:
        raise MailConfigError("The message has no recipients.")
    for recipient in recipients:
        check_address(recipient)
    try:
        return run_coroutine(_send(settings, raw, sender, recipients))
    except _NoAnswerAfterData as exc:
        raise MailDeliveryUncertain(
            f"Outgoing mail (SMTP) server {settings.host} stopped answering after it was "
            "handed the mail: it was probably sent.",
            hint="Check your Sent folder or ask the recipient before sending it again.",
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise _translate(exc, settings) from exc
