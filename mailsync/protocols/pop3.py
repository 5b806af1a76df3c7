"""POP3 adapter over poplib: connect, log in, list, retrieve, delete, quit.

Pure I/O: it knows nothing of the ORM. The engine in ``mailsync.sync.pop3`` decides what to
fetch and when it is safe to delete.

Why not poplib's own ``retr()``: it reads line by line with a 2,048-byte line limit (a real
message with a longer line fails), keeps every line in a list, and has no limit on the total
(a server that never sends the final "." fills the worker's memory). Multi-line replies are
read here in blocks from the buffered socket, with a cap on the total, and commands are
pipelined where the server allows it (RFC 2449 PIPELINING).
"""
from __future__ import annotations

import functools
import logging
import poplib
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from ..exceptions import (
    MailAuthError,
    MailConnectionsLimit,
    MailConfigError,
    MailError,
    MailProtocolError,
    MailServerUnreachable,
    MailTLSError,
)
from .base import ServerSettings, not_this_protocol, open_checked_socket, tls_context, translate_network_error
from .tls import MemoryTLS

log = logging.getLogger(__name__)

# Socket buffer: large enough that one peek() usually holds a whole small message.
READ_BUFFER = 256 * 1024
# LIST and UIDL replies: about 30 bytes a message, so ~2 million messages.
LISTING_MAX_BYTES = 64 * 1024 * 1024
# Commands in flight at once with PIPELINING (RFC 2449 6.6): enough to hide the round trip,
# few enough that the commands fit in the socket buffers (no deadlock while we read).
PIPELINE_WINDOW = 32
_TERMINATORS = (b"\n.\r\n", b"\n.\n")

APP_PASSWORD_HINT = ("If the account uses two-step verification (Gmail, Yahoo, iCloud, Outlook), "
                     "create an app-specific password and use it here.")


@dataclass(frozen=True)
class Pop3Listing:
    """One message in the maildrop: its number in this session, LIST size, UIDL (or None)."""

    number: int
    size: int | None  # None: the server sent no usable size
    uidl: str | None


@dataclass(frozen=True)
class Pop3Request:
    number: int
    max_bytes: int
    headers_only: bool = False  # TOP n 0 instead of RETR


@dataclass(frozen=True)
class Pop3Retrieved:
    number: int
    raw: bytes
    headers_only: bool
    # False: the reply went over ``max_bytes``; ``raw`` holds the first bytes only and the
    # session was closed (the rest of the reply can no longer be told from the next one).
    complete: bool = True
    error: str = ""  # the server answered -ERR for this message
    # Bytes of the reply that came over the wire (what a provider's daily transfer limit
    # counts), also when ``raw`` was cut short or handed on without its bytes.
    received: int = 0


class _TooLong(Exception):
    def __init__(self, partial: bytes) -> None:
        super().__init__("reply over the size limit")
        self.partial = partial


def _login_error(reply: str, host: str) -> MailError:
    """Map a refused USER/PASS to what the user must do (RFC 3206 response codes)."""
    text = reply.lower()
    if "plaintext" in text or "[privacy" in text or "ssl/tls" in text:
        return MailTLSError(
            "The server refuses passwords over an unencrypted connection.",
            hint="Choose SSL/TLS or STARTTLS.",
        )
    if ("not enabled for pop" in text or "pop access" in text or "pop3 is disabled" in text
            or "pop disabled" in text or "protocol disabled" in text):
        return MailConfigError(
            "POP3 is turned off for this account at the provider.",
            hint=("Turn on POP in the account's settings (Gmail: Settings, Forwarding and "
                  "POP/IMAP, Enable POP), then try again."),
        )
    if "maximum number of connections" in text or "too many" in text and "connection" in text:
        return MailConnectionsLimit(
            "The mail server refused another connection: too many are open to this account "
            "at once (mail apps, phones, other services).",
            hint="It is retried by itself. If this lasts, close mail apps you no longer use.",
        )
    if "[in-use]" in text:
        return MailProtocolError(
            "Another program is reading this mailbox over POP3 right now; the sync will try again."
        )
    if "[sys/temp]" in text:
        return MailProtocolError(f"{host} could not open the mailbox just now; the sync will try again.")
    return MailAuthError("The server rejected the username or password.", hint=APP_PASSWORD_HINT)


def _reply_text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _terminator(buffer: bytes, before: int) -> tuple[int, int] | None:
    """The first end of a multi-line reply (LF "." CRLF, or LF "." LF from servers that
    send bare LF) whose LF is before ``before``: (position of the LF, length).

    One pass: "\n." only occurs at a terminator or at a stuffed line ("\n..")."""
    at = buffer.find(b"\n.", 0, before + 1)
    while at != -1 and at < before:
        follow = buffer[at + 2:at + 4]
        if follow == b"\r\n":
            return at, 4
        if follow[:1] == b"\n":
            return at, 3
        if len(follow) < 2 and follow != b".":
            return None  # cut by the end of the buffer: decided with the next block
        at = buffer.find(b"\n.", at + 1, before + 1)
    return None


def _parse_int(text: bytes) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


class _POP3(poplib.POP3):
    """poplib's client with TLS over memory BIOs (``MemoryTLS``: large reads) from the first
    byte (``context``, port 995) or after STLS."""

    def __init__(self, host: str, port: int, timeout: float, context: ssl.SSLContext | None,
                 connector: Callable[[float], socket.socket]) -> None:
        self._tls_context = context
        self._connector = connector  # open_checked_socket: the address the SSRF check saw
        try:
            super().__init__(host, port, timeout)
        except BaseException:
            if getattr(self, "sock", None) is not None:  # the greeting failed: no socket left open
                self.file = getattr(self, "file", None)
                try:
                    self.close()
                except OSError:
                    pass
            raise

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = self._connector(timeout)
        if self._tls_context is None:
            return sock
        return MemoryTLS.over(sock, self._tls_context, self.host)  # type: ignore[return-value]

    def stls(self, context: ssl.SSLContext | None = None) -> bytes:
        """As poplib's (RFC 2595), with ``MemoryTLS``."""
        if self._tls_established or self._tls_context is not None:
            raise poplib.error_proto("-ERR TLS session already established")
        if "STLS" not in self.capa():
            raise poplib.error_proto("-ERR STLS not supported by server")
        resp = self._shortcmd("STLS")
        self.sock = MemoryTLS(self.sock, context or tls_context(), self.host)  # type: ignore[assignment]
        self.file = self.sock.makefile("rb")
        self._tls_established = True
        return resp


class Pop3Session:
    """One logged-in POP3 connection. Use as a context manager.

    Leaving the block without ``quit()`` closes the socket without QUIT: the server then
    applies no DELE of this session (RFC 1939 6), which is what we want after any failure.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.client: poplib.POP3 | None = None
        self.capabilities: frozenset[str] = frozenset()
        # Bytes of multi-line replies read so far, complete or not: an error that ends a
        # RETR/TOP pipeline carries those of its replies as ``received`` (the provider
        # counted them, stored or not).
        self.received = 0
        # DELEs the server answered -ERR (number: reply): those messages stay on the server.
        self._refused_deletes: dict[int, str] = {}

    # -- connection ---------------------------------------------------------------------------
    def __enter__(self) -> Pop3Session:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abandon()

    def connect(self) -> None:
        s = self.settings
        if s.security not in ("ssl", "starttls", "none"):
            raise MailConfigError(f"Unknown security setting {s.security!r}.")
        try:
            client = _POP3(s.host, s.port, s.timeout,
                           tls_context() if s.security == "ssl" else None,
                           functools.partial(open_checked_socket, s))
            self.client = client
            if s.security == "starttls":
                try:
                    client.stls(context=tls_context())
                except poplib.error_proto as exc:
                    # Never fall back to plain text when STARTTLS was asked for.
                    self.abandon()
                    raise MailTLSError(
                        f"{s.host} does not offer STARTTLS (STLS) on port {s.port}.",
                        hint="Use SSL/TLS (usually port 995) instead.",
                    ) from exc
        except MailError:
            self.abandon()
            raise
        except (OSError, ssl.SSLError, EOFError, poplib.error_proto) as exc:
            self.abandon()
            reply = _reply_text(exc) if isinstance(exc, poplib.error_proto) else ""
            if reply and not reply.startswith(("-ERR", "line too long")):
                # The greeting is no POP3 reply ("+OK"/"-ERR"): e.g. an SMTP port's "220 ...".
                raise not_this_protocol("POP3", s.host, s.port, reply) from exc
            raise self._translate(exc) from exc
        self.login()

    def login(self) -> None:
        client = self._client()
        try:
            client.user(self.settings.username)
            client.pass_(self.settings.password)
        except poplib.error_proto as exc:
            reply = _reply_text(exc)
            self.abandon()
            if reply.startswith("-ERR EOF"):
                raise MailServerUnreachable(f"{self.settings.host} closed the connection at login.") from exc
            raise _login_error(reply, self.settings.host) from exc
        except (OSError, ssl.SSLError, EOFError) as exc:
            self.abandon()
            raise self._translate(exc) from exc
        # A bigger buffer for the bulk of the session. Safe to swap now: the server waits for
        # our next command, so the old buffer holds nothing unread.
        client.file.close()
        client.file = client.sock.makefile("rb", buffering=READ_BUFFER)
        try:
            self.capabilities = frozenset(self._call(client.capa))
        except MailProtocolError:  # CAPA is optional (RFC 2449)
            self.capabilities = frozenset()

    def quit(self) -> None:
        """QUIT: the server now removes the messages marked with DELE (RFC 1939 6).

        Raises if the server does not confirm: the deletions may then not have happened.
        """
        client = self._client()
        try:
            self._call(client.quit)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close the connection without QUIT (no pending DELE is applied)."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            client.close()
        except Exception:  # noqa: BLE001  (closing a dead connection must not mask the cause)
            pass

    def _client(self) -> poplib.POP3:
        if self.client is None:
            raise MailServerUnreachable(f"The connection to {self.settings.host} is closed.")
        return self.client

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.capabilities

    def _translate(self, exc: BaseException) -> MailError:
        if isinstance(exc, poplib.error_proto):
            reply = _reply_text(exc)
            if reply.startswith("-ERR EOF"):
                return MailServerUnreachable(f"The connection to {self.settings.host} was lost.")
            if reply == "line too long":
                return MailProtocolError(f"{self.settings.host} sent a reply line that is too long.")
            return MailProtocolError(f"The POP3 server refused a command: {reply[:200]}")
        return translate_network_error(exc, self.settings.host)

    def _call(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        """Run one poplib call, mapping failures to our error hierarchy."""
        try:
            return fn(*args, **kwargs)
        except (OSError, ssl.SSLError, EOFError, poplib.error_proto) as exc:
            raise self._fail(exc) from exc

    def _fail(self, exc: BaseException) -> MailError:
        """The error to raise for ``exc``; the connection is given up unless the server
        merely refused a command (then the dialogue is still in step)."""
        error = self._translate(exc)
        if not (isinstance(exc, poplib.error_proto) and _reply_text(exc).startswith("-ERR")
                and not _reply_text(exc).startswith("-ERR EOF")):
            self.abandon()
        return error

    # -- reading ------------------------------------------------------------------------------
    def _read_multiline(self, max_bytes: int) -> bytes:
        """The body of a multi-line reply, dot-unstuffed, line ends as sent (RFC 1939 3).

        Reads blocks from the buffered socket up to the terminating CRLF "." CRLF, never past
        it (with pipelining the next reply follows at once). Over ``max_bytes``: _TooLong.
        """
        file = self._client().file
        data = bytearray()
        while True:
            block = file.peek(READ_BUFFER)
            if not block:
                raise poplib.error_proto("-ERR EOF")
            # A terminator may start in the last bytes already read (after a virtual line
            # end: a reply may be empty), or anywhere in this block.
            head = bytes(data[-4:]) if len(data) >= 4 else b"\n" + bytes(data)
            edge = _terminator(head + block[:3], len(head))
            if edge is not None:
                at, length = edge[0] - len(head), edge[1]
            else:
                found = _terminator(block, len(block))
                if found is None:
                    data += file.read(len(block))
                    self.received += len(block)
                    if len(data) > max_bytes:
                        raise _TooLong(bytes(data[:max_bytes]))
                    continue
                at, length = found
            keep = at + 1  # bytes of the block up to the message's last line end
            consumed = file.read(at + length)
            self.received += len(consumed)
            if keep > 0:
                data += consumed[:keep]
            elif keep < 0:  # part of the terminator was read with the previous block
                del data[keep:]
            break
        if len(data) > max_bytes:
            raise _TooLong(bytes(data[:max_bytes]))
        # Byte-stuffing: a line that starts with "." was sent with one more "." in front.
        if data.startswith(b".."):
            del data[0]
        body = bytes(data)
        return body.replace(b"\n..", b"\n.") if b"\n.." in body else body

    def _long_command(self, command: str, max_bytes: int) -> bytes:
        client = self._client()
        try:
            client._putcmd(command)
            client._getresp()
            return self._read_multiline(max_bytes)
        except _TooLong as exc:
            self.abandon()
            raise MailProtocolError(
                f"The reply of {self.settings.host} to {command.split()[0]} is over "
                f"{max_bytes} bytes."
            ) from exc
        except (OSError, ssl.SSLError, EOFError, poplib.error_proto) as exc:
            raise self._fail(exc) from exc

    def listing(self) -> list[Pop3Listing]:
        """LIST sizes and UIDL ids of every message (UIDL None where the server lacks it)."""
        sizes: dict[int, int | None] = {}
        for line in self._long_command("LIST", LISTING_MAX_BYTES).splitlines():
            parts = line.split()
            if len(parts) >= 2 and (number := _parse_int(parts[0])):
                sizes[number] = _parse_int(parts[1])
        uidls: dict[int, str] = {}
        try:
            reply = self._long_command("UIDL", LISTING_MAX_BYTES)
        except MailProtocolError:
            if self.client is None:  # the connection is gone, not just the command
                raise
            log.info("POP3 server without UIDL; keys fall back to header hashes")
        else:
            for line in reply.splitlines():
                parts = line.split(maxsplit=1)
                if len(parts) == 2 and (number := _parse_int(parts[0])):
                    # RFC 1939 7: 1 to 70 characters in 0x21..0x7E; others are not ids.
                    uidl = parts[1].strip()
                    if 0 < len(uidl) <= 70 and all(0x21 <= c <= 0x7E for c in uidl):
                        uidls[number] = uidl.decode("ascii")
        return [Pop3Listing(number, size, uidls.get(number)) for number, size in sorted(sizes.items())]

    def retrieve(self, requests: Sequence[Pop3Request], *,
                 delete_first: Sequence[int] = ()) -> list[Pop3Retrieved]:
        """RETR (or TOP n 0) each request, pipelined when the server offers PIPELINING;
        ``delete_first``: DELE these numbers first, in the same pipeline.

        Stops early, with the session closed, at the first reply over its ``max_bytes``
        (that last result has ``complete=False``). A -ERR for one message is reported in its
        result and the others go on; so is a refused DELE (``refused_deletes()``).
        """
        client = self._client()
        commands = [f"DELE {n}" for n in delete_first] + [self._command(r) for r in requests]
        window = PIPELINE_WINDOW if self.pipelining else 1
        results: list[Pop3Retrieved] = []
        sent = 0
        before = self.received
        try:
            while sent < min(window, len(commands)):
                client._putcmd(commands[sent])
                sent += 1
            for index in range(len(commands)):
                if index < len(delete_first):
                    self._dele_reply(delete_first[index])
                elif not self._receive(requests[index - len(delete_first)], results):
                    return results
                if sent < len(commands):
                    client._putcmd(commands[sent])
                    sent += 1
        except (OSError, ssl.SSLError, EOFError, poplib.error_proto) as exc:
            self.abandon()
            error = self._translate(exc)
            error.received = self.received - before  # type: ignore[attr-defined]
            raise error from exc
        return results

    def _dele_reply(self, number: int) -> None:
        """Read one DELE reply. A DELE's reply is one line, so a -ERR leaves the pipeline in
        step: the message stays on the server and the session goes on (giving it up made one
        message the server never lets go of fail every run before any new mail came)."""
        try:
            self._client()._getresp()
        except poplib.error_proto as exc:
            reply = _reply_text(exc)
            if not reply.startswith("-ERR") or reply.startswith("-ERR EOF"):
                raise
            self._refused_deletes[number] = reply[:200]

    def refused_deletes(self) -> dict[int, str]:
        """The DELEs of this session the server refused: {message number: its reply}."""
        return dict(self._refused_deletes)

    def _receive(self, request: Pop3Request, results: list[Pop3Retrieved]) -> bool:
        """Read one RETR/TOP reply into ``results``; False once the session was given up."""
        try:
            self._client()._getresp()
        except poplib.error_proto as exc:
            reply = _reply_text(exc)
            if reply.startswith("-ERR EOF") or reply == "line too long":
                raise
            results.append(Pop3Retrieved(request.number, b"", request.headers_only, error=reply[:200]))
            return True
        before = self.received
        try:
            raw = self._read_multiline(request.max_bytes)
        except _TooLong as exc:
            self.abandon()
            results.append(Pop3Retrieved(request.number, exc.partial, request.headers_only,
                                         complete=False, received=self.received - before))
            return False
        results.append(Pop3Retrieved(request.number, raw, request.headers_only,
                                     received=self.received - before))
        return True

    @staticmethod
    def _command(request: Pop3Request) -> str:
        return f"TOP {request.number} 0" if request.headers_only else f"RETR {request.number}"

    # -- changing -----------------------------------------------------------------------------
    def delete(self, numbers: Sequence[int]) -> None:
        """DELE: marks only; the server removes the messages at QUIT (RFC 1939 6)."""
        self.retrieve([], delete_first=numbers)

    def stat(self) -> tuple[int, int]:
        return self._call(self._client().stat)


def check_login(settings: ServerSettings) -> list[tuple[str, str]]:
    """Log in and count the messages; raises a MailError if it fails.

    Returns the one "folder" POP3 has, in the shape of the IMAP check.
    """
    with Pop3Session(settings) as session:
        session.stat()
        session.quit()
    return [("INBOX", "inbox")]
