"""DNS rebinding: a host name that passes the SSRF check with a public address and resolves to
loopback a millisecond later must not reach anything on our network. Every adapter (IMAP,
POP3, SMTP) connects to the very address the check saw.

The resolver seen by the check is replaced (it answers a public address); the real one would
answer 127.0.0.1 for "localhost", where the private Dovecot listens. The replaced socket
class records where connections go and refuses the public address itself, so no packet
leaves the machine (mocked: we cannot run a public DNS name here)."""
from __future__ import annotations

import socket as real_socket

import pytest

from mailsync.exceptions import MailError
from mailsync.protocols import base, smtp
from mailsync.protocols.base import ServerSettings, is_public_address
from mailsync.protocols.imap import ImapSession
from mailsync.protocols.pop3 import Pop3Session

PUBLIC = "8.8.8.8"  # what the attacker's name answers when it is checked


class _Rebinding:
    """Stands in for the socket module inside mailsync.protocols.base only."""

    def __init__(self) -> None:
        self.connected: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(real_socket, name)

    def getaddrinfo(self, host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        return [(real_socket.AF_INET, real_socket.SOCK_STREAM, real_socket.IPPROTO_TCP, "",
                 (PUBLIC, port))]

    def socket(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        outer = self

        class Recording(real_socket.socket):
            def connect(self, address):  # noqa: ANN001, ANN202
                outer.connected.append(address[0])
                if address[0] == PUBLIC:
                    raise ConnectionRefusedError("test: the public address is not reachable here")
                return super().connect(address)

        return Recording(*args, **kwargs)


@pytest.fixture
def rebinding(monkeypatch) -> _Rebinding:
    fake = _Rebinding()
    monkeypatch.setattr(base, "socket", fake)
    return fake


def _settings(port: int, security: str, user=None) -> ServerSettings:  # noqa: ANN001
    return ServerSettings(host="localhost", port=port, security=security,
                          username=user.username if user else "someone",
                          password=user.password if user else "secret", timeout=5,
                          allow_private_hosts=False)


@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_imap_connects_only_to_the_checked_address(dovecot, mail_user, rebinding, security):
    port = dovecot.imaps_port if security == "ssl" else dovecot.imap_port
    with pytest.raises(MailError):
        ImapSession(_settings(port, security, mail_user)).connect()
    assert rebinding.connected == [PUBLIC]


def test_imap_fetch_process_session_connects_only_to_the_checked_address(dovecot, mail_user,
                                                                         rebinding):
    with pytest.raises(MailError):
        ImapSession(_settings(dovecot.imaps_port, "ssl", mail_user), memory_tls=True).connect()
    assert rebinding.connected == [PUBLIC]


@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_pop3_connects_only_to_the_checked_address(dovecot, mail_user, rebinding, security):
    port = dovecot.pop3s_port if security == "ssl" else dovecot.pop3_port
    with pytest.raises(MailError):
        Pop3Session(_settings(port, security, mail_user)).connect()
    assert rebinding.connected == [PUBLIC]


def test_smtp_connects_only_to_the_checked_address(dovecot, rebinding):
    # Any local port: the point is that nothing but the checked address is tried.
    with pytest.raises(MailError):
        smtp.check_login(_settings(dovecot.imaps_port, "ssl"))
    assert rebinding.connected == [PUBLIC]


def test_a_private_answer_is_still_refused_before_any_connect(monkeypatch):
    fake = _Rebinding()
    fake.getaddrinfo = lambda host, port, *a, **k: [  # type: ignore[method-assign]
        (real_socket.AF_INET, real_socket.SOCK_STREAM, real_socket.IPPROTO_TCP, "", ("10.0.0.5", port))]
    monkeypatch.setattr(base, "socket", fake)
    with pytest.raises(MailError, match="private or local"):
        ImapSession(_settings(993, "ssl")).connect()
    assert fake.connected == []


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("64:ff9b::808:808", True),
    ("10.0.0.1", False), ("127.0.0.1", False), ("169.254.169.254", False), ("::1", False),
    ("fe80::1%eth0", False),
    # IPv6 forms that wrap a private IPv4 address (Python calls some of them global)
    ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::a00:1", False), ("2002:7f00:1::", False),
    ("::ffff:127.0.0.1", False), ("::127.0.0.1", False),
])
def test_wrapped_private_addresses_are_not_public(address, public):
    assert is_public_address(address) is public


def test_an_address_family_this_host_cannot_open_does_not_stop_the_next_address(monkeypatch):
    """As socket.create_connection: a name with an AAAA record on a host without IPv6
    still reaches its IPv4 address (found in review)."""
    fake = _Rebinding()
    fake.getaddrinfo = lambda host, port, *a, **k: [  # type: ignore[method-assign]
        (real_socket.AF_INET6, real_socket.SOCK_STREAM, real_socket.IPPROTO_TCP, "",
         ("2001:4860:4860::8888", port, 0, 0)),
        (real_socket.AF_INET, real_socket.SOCK_STREAM, real_socket.IPPROTO_TCP, "", (PUBLIC, port))]
    real_factory = fake.socket

    def no_ipv6(family=real_socket.AF_INET, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if family == real_socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real_factory(family, *args, **kwargs)

    fake.socket = no_ipv6  # type: ignore[method-assign]
    monkeypatch.setattr(base, "socket", fake)
    with pytest.raises(MailError):
        ImapSession(_settings(993, "ssl")).connect()
    assert fake.connected == [PUBLIC]  # the IPv4 address was tried
