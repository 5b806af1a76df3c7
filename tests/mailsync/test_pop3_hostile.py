"""Bounded reads against a hostile POP3 server: one that announces an absurd size and one
that never ends a RETR. Dovecot cannot be made to misbehave like this, so a small scripted
server on 127.0.0.1 plays the attacker; everything else about POP3 is tested against the
real Dovecot (test_pop3_sync.py)."""
from __future__ import annotations

import socket
import threading

import pytest

from mailsync.exceptions import MailProtocolError
from mailsync.models import Email, Mailbox, Pop3Message
from mailsync.protocols.base import ServerSettings
from mailsync.protocols.pop3 import Pop3Session
from mailsync.sync.pop3 import Pop3Sync
from tests.factories import MailboxFactory, UserFactory

pytestmark = pytest.mark.django_db

HUGE = 10**15


class HostileServer:
    """Answers like a POP3 server, except that RETR 1 never ends and message 2 claims to be
    a petabyte. Counts the bytes it managed to push before the client hung up."""

    def __init__(self, *, endless_status: bool = False, greeting: bytes = b"+OK hostile\r\n") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.greeting = greeting
        self.hung_up = threading.Event()  # the client closed its end
        self.port = self.listener.getsockname()[1]
        self.endless_status = endless_status
        self.streamed = 0
        self.commands: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        replies = {
            "CAPA": b"+OK\r\nTOP\r\nUIDL\r\nUSER\r\n.\r\n",
            "LIST": f"+OK\r\n1 1000\r\n2 {HUGE}\r\n.\r\n".encode(),
            "UIDL": b"+OK\r\n1 endless\r\n2 huge\r\n.\r\n",
            "TOP 1 0": b"+OK\r\nSubject: The endless one\r\n\r\n.\r\n",
            "TOP 2 0": b"+OK\r\nSubject: The huge one\r\n\r\n.\r\n",
        }
        try:
            with conn, conn.makefile("rb") as reader:
                conn.sendall(self.greeting)
                if self.greeting.startswith(b"-ERR"):
                    conn.settimeout(5)
                    if conn.recv(1) == b"":
                        self.hung_up.set()
                    return
                for line in reader:
                    command = line.decode().strip()
                    self.commands.append(command.split()[0])
                    if command == "RETR 1":
                        conn.sendall(b"+OK\r\nSubject: The endless one\r\n\r\n")
                        while True:  # until the client hangs up
                            conn.sendall(b"a" * 1000 + b"\r\n")
                            self.streamed += 1002
                    elif command == "LIST" and self.endless_status:
                        while True:
                            conn.sendall(b"+OK " + b"x" * 10_000)
                            self.streamed += 10_004
                    elif command == "QUIT":
                        conn.sendall(b"+OK bye\r\n")
                        return
                    else:
                        conn.sendall(replies.get(command, b"+OK\r\n"))
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def hostile():
    servers: list[HostileServer] = []

    def make(**kwargs) -> HostileServer:  # noqa: ANN003
        servers.append(HostileServer(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_endless_retr_and_absurd_size_are_kept_as_headers_with_bounded_memory(hostile):
    server = hostile()
    mailbox = MailboxFactory(owner=UserFactory(), protocol=Mailbox.Protocol.POP3,
                             incoming_port=server.port, incoming_security="none",
                             max_message_bytes=1024 * 1024, is_active=True)

    report = Pop3Sync(mailbox, timeout=5).run()

    # The petabyte message was never asked for whole (TOP, not RETR); the endless one was
    # cut at the limit, then fetched as headers on a new connection.
    assert server.commands.count("RETR") == 1
    # We hung up soon after the 1 MB limit (what the server could push beyond it sat in the
    # kernel's socket buffers, a few MB on loopback, never in our memory).
    assert server.streamed < 32 * 1024 * 1024
    assert report.new == 2
    emails = {e.subject: e for e in Email.objects.filter(mailbox=mailbox)}
    assert set(emails) == {"The endless one", "The huge one"}
    assert all(e.truncated for e in emails.values())
    assert set(Pop3Message.objects.filter(mailbox=mailbox).values_list("truncated", flat=True)) == {True}
    assert "DELE" not in server.commands  # headers only: never removed from the server
    mailbox.refresh_from_db()
    assert mailbox.messages_done == mailbox.messages_total == 2
    assert mailbox.bytes_done == mailbox.bytes_total < 1000


def test_endless_status_line_is_refused(hostile):
    server = hostile(endless_status=True)
    settings = ServerSettings("127.0.0.1", server.port, "none", "user", "password", timeout=5,
                              allow_private_hosts=True)
    with Pop3Session(settings) as session:
        with pytest.raises(MailProtocolError, match="too long"):
            session.listing()
        # poplib reads at most 2,049 bytes of a line; then the connection is given up.
        assert session.client is None


def test_a_refused_greeting_is_a_clear_error_and_the_socket_is_closed(hostile):
    server = hostile(greeting=b"-ERR too many connections\r\n")
    settings = ServerSettings("127.0.0.1", server.port, "none", "user", "password", timeout=5,
                              allow_private_hosts=True)
    with pytest.raises(MailProtocolError, match="too many connections") as excinfo:
        Pop3Session(settings).connect()
    # While the error (and its traceback) is still held, the connection is already closed.
    assert server.hung_up.wait(3)
    assert excinfo.value is not None
