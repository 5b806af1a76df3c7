"""What every mail protocol adapter shares: connection settings, plain results, error mapping.

Adapters do pure I/O: no ORM imports, plain dataclasses out.
"""
from __future__ import annotations

import functools
import imaplib
import os
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime

from ..exceptions import MailError, MailProtocolError, MailServerUnreachable, MailTLSError

# Every network call has a timeout; a stalled server never hangs a worker.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    security: str  # "ssl", "starttls" or "none"
    username: str
    password: str
    timeout: float = DEFAULT_TIMEOUT
    # Off: hosts that resolve to loopback, private or link-local addresses are refused at
    # every connect (SSRF), not only when the mailbox is saved: a name can be re-pointed.
    allow_private_hosts: bool = False

    def __repr__(self) -> str:  # never print the password
        return f"ServerSettings({self.host}:{self.port}, {self.security}, {self.username!r})"


@dataclass(frozen=True)
class FolderStatus:
    name: str
    uidvalidity: int
    uidnext: int
    exists: int
    highestmodseq: int | None


@dataclass(frozen=True)
class FetchedMessage:
    uid: int
    flags: tuple[str, ...]
    size: int
    internal_date: datetime | None
    raw: bytes
    # Only the header block was fetched (the message is over the mailbox's size limit).
    truncated: bool = False
    # Not delivered: the server holds the message but did not send it (usably); raw is b"".
    error: str = ""


@dataclass(frozen=True)
class CopiedMessages:
    """Where copied or moved messages landed (RFC 4315 COPYUID): source UID -> new UID."""

    uidvalidity: int
    uids: dict[int, int]


def _checked_addresses(settings: ServerSettings) -> list[tuple]:
    """getaddrinfo of the host, refused if any address is loopback, private or link-local."""
    from ..exceptions import MailConfigError

    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise translate_network_error(exc, settings.host) from exc
    except (UnicodeError, ValueError) as exc:  # "a..b", a label over 63 characters
        raise MailConfigError(f"{settings.host!r} is not a valid server name.",
                              hint="Check the server name.") from exc
    if not settings.allow_private_hosts:
        for info in infos:
            if not is_public_address(info[4][0]):
                raise MailConfigError(
                    f"{settings.host} points to a private or local address.",
                    hint="Use the provider's public server name.",
                )
    return infos


# NAT64 (RFC 6052) carries an IPv4 address in its last 32 bits: 64:ff9b::a9fe:a9fe reaches
# 169.254.169.254 on a NAT64 network although Python calls the IPv6 address global.
_NAT64 = ("64:ff9b::/96", "64:ff9b:1::/48")


def is_public_address(text: str) -> bool:
    """A global address, and so is every IPv4 address it wraps (IPv4-mapped or -compatible,
    6to4, Teredo, NAT64): a wrapped 127.0.0.1 or 10.x is not public (found in review)."""
    import ipaddress

    address = ipaddress.ip_address(text.split("%", 1)[0])
    if not address.is_global:
        return False
    if address.version == 4:
        return True
    embedded = [address.ipv4_mapped, address.sixtofour,
                address.teredo[1] if address.teredo else None]
    if any(address in ipaddress.ip_network(net) for net in _NAT64) or (
            address.packed[:12] == bytes(12)):  # IPv4-compatible ::a.b.c.d (deprecated)
        embedded.append(ipaddress.IPv4Address(address.packed[-4:]))
    return all(ip is None or ip.is_global for ip in embedded)


def check_public_host(settings: ServerSettings) -> None:
    """Refuse a user-entered host name that points into our own network (when the mailbox is
    saved; connections go through ``open_checked_socket``, which checks again)."""
    _checked_addresses(settings)


def open_checked_socket(settings: ServerSettings, timeout: float | None = None) -> socket.socket:
    """A TCP connection to ``settings.host``, to one of the very addresses that passed the
    SSRF check: the name is resolved once, so it cannot be re-pointed at a private address
    between the check and the connect (DNS rebinding with a zero TTL). TLS still verifies
    the certificate against the host name, which the callers pass as server_hostname."""
    timeout = settings.timeout if timeout is None else timeout
    error: OSError | None = None
    for family, kind, proto, _, address in _checked_addresses(settings):
        sock = None
        try:  # as socket.create_connection: on any failure, try the next address
            sock = socket.socket(family, kind, proto)  # fails where IPv6 is disabled, say
            sock.settimeout(timeout)
            sock.connect(address)
            _keep_alive(sock)
            return sock
        except OSError as exc:
            if sock is not None:
                sock.close()
            error = exc
    raise error or OSError(f"{settings.host} has no address")


# TCP keepalive on every mail connection: an IDLE connection is silent for up to its
# re-IDLE (25 minutes); a NAT or firewall that forgets it in the meantime (many do after a
# few minutes) left it dead and unnoticed until then, and new mail waited for the poll. The
# probes keep such mappings alive, and a peer gone for good is noticed in about 2 minutes.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 15, 4


def _keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def tls_context() -> ssl.SSLContext:
    """Certificates and host names verified, as a browser would (SSL_CERT_FILE honoured).
    One context per CA location and process: loading the CA bundle costs ~50 ms."""
    return _default_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=8)
def _default_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    return ssl.create_default_context()


def not_this_protocol(protocol: str, host: str, port: int, greeting: object) -> MailError:
    """A server that greets as another protocol (an SMTP port entered as the IMAP or POP3
    one): say which port to check, not "the connection was lost"."""
    text = greeting.decode("ascii", "replace") if isinstance(greeting, bytes) else str(greeting)
    article = "an" if protocol == "IMAP" else "a"
    return MailProtocolError(
        f"{host} did not answer as {article} {protocol} server on port {port} "
        f"(it said {text.strip()[:80]!r}).",
        hint="Check the port: IMAP is usually 993 (SSL/TLS) or 143 (STARTTLS), POP3 995 or "
             "110; 25, 465 and 587 are for outgoing mail (SMTP).")


def translate_network_error(exc: BaseException, host: str) -> MailError:
    """Map socket/TLS failures to errors that say in plain words what to fix."""
    if isinstance(exc, MailError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return MailTLSError(
            f"The certificate of {host} is not trusted ({exc.verify_message}).",
            hint="Check the server name; a self-signed certificate is not accepted.",
        )
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
        # The connection dropped during or after the handshake (a network blip, a server
        # restarting): retried by itself, not a setting for the user to fix.
        return MailServerUnreachable(
            f"The connection to {host} was cut during the TLS handshake.",
            hint="This is retried automatically; if it persists, check the port and security setting.",
        )
    if isinstance(exc, ssl.SSLError):
        return MailTLSError(
            f"TLS with {host} failed ({exc.reason or exc}).",
            hint="Check the port and the security setting (SSL/TLS or STARTTLS).",
        )
    if isinstance(exc, socket.gaierror):
        return MailServerUnreachable(
            f"The server {host} was not found.", hint="Check the server name."
        )
    if isinstance(exc, ConnectionRefusedError):
        return MailServerUnreachable(
            f"{host} refused the connection.", hint="Check the port and security setting."
        )
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return MailServerUnreachable(
            f"{host} did not answer in time.",
            hint="If this persists, check the port and the security setting: a port for SSL/TLS "
                 "(such as 993, 995 or 465) waits for encryption before it says anything.")
    if isinstance(exc, (ConnectionError, OSError, EOFError, imaplib.IMAP4.abort)):
        return MailServerUnreachable(f"The connection to {host} was lost ({exc}).")
    return MailProtocolError(f"Unexpected reply from {host}: {exc}")
