"""Review session 11: POP3 probes. Against the private Dovecot, or, for server behaviour
Dovecot cannot show (a DELE refused, a QUIT answered -ERR, no CAPA/UIDL/TOP), a small
scriptable POP3 server on loopback (``FakePop3``, below). Nothing of ours is mocked.

Bug found and fixed: a DELE the server refused (-ERR) gave the whole session up; since every
run first DELEs the stored mail the mode removes, one message the server never lets go of
made every run fail before any new mail was downloaded. A DELE's reply is one line, so the
session now goes on: that message stays on the server (not recorded as removed) and the
status says so.
"""
from __future__ import annotations

import socketserver
import threading
from datetime import timedelta

import pytest
from django.utils import timezone

from mailsync.models import Email, Mailbox, Pop3Message
from mailsync.sync.pop3 import Pop3Sync
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


# == a scriptable POP3 server (loopback, plain text) ==========================================
class FakePop3:
    """One maildrop of (uidl, bytes). Options: ``capa`` (None: CAPA unknown), ``uidl`` and
    ``top`` (False: -ERR), ``refuse_dele`` (UIDLs whose DELE is answered -ERR), ``quit_err``
    (QUIT answered -ERR, nothing removed). DELEs are applied at a +OK QUIT (RFC 1939 6)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.capa: list[str] | None = ["USER", "UIDL", "TOP"]
        self.uidl = True
        self.top = True
        self.refuse_dele: set[str] = set()
        self.quit_err = False
        self.commands: list[str] = []
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                fake._serve(self.rfile, self.wfile)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, uidl: str, raw: bytes) -> None:
        self.messages.append((uidl, raw))

    def _serve(self, rfile, wfile) -> None:  # noqa: ANN001
        drop = list(self.messages)  # this session's snapshot
        deleted: set[int] = set()

        def send(line: str) -> None:
            wfile.write(line.encode() + b"\r\n")

        def multi(lines: list[bytes]) -> None:
            for line in lines:
                wfile.write((b"." + line if line.startswith(b".") else line) + b"\r\n")
            wfile.write(b".\r\n")

        send("+OK fake ready")
        while True:
            line = rfile.readline()
            if not line:
                return
            parts = line.decode().strip().split()
            if not parts:
                continue
            cmd, args = parts[0].upper(), parts[1:]
            self.commands.append(" ".join([cmd, *args]))
            n = int(args[0]) if args and args[0].isdigit() else 0
            valid = 1 <= n <= len(drop) and n not in deleted
            if cmd in ("USER", "PASS", "NOOP"):
                send("+OK")
            elif cmd == "CAPA":
                if self.capa is None:
                    send("-ERR unknown command")
                else:
                    send("+OK")
                    multi([c.encode() for c in self.capa])
            elif cmd == "STAT":
                send(f"+OK {len(drop)} 0")
            elif cmd == "LIST":
                send("+OK")
                multi([f"{i} {len(raw)}".encode() for i, (_, raw) in enumerate(drop, 1)
                       if i not in deleted])
            elif cmd == "UIDL":
                if not self.uidl:
                    send("-ERR unknown command")
                else:
                    send("+OK")
                    multi([f"{i} {u}".encode() for i, (u, _) in enumerate(drop, 1) if i not in deleted])
            elif cmd in ("RETR", "TOP"):
                if not valid or (cmd == "TOP" and not self.top):
                    send("-ERR no such message")
                    continue
                raw = drop[n - 1][1]
                if cmd == "TOP":
                    raw = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
                send(f"+OK {len(raw)} octets")
                multi(raw.rstrip(b"\r\n").split(b"\r\n"))
            elif cmd == "DELE":
                if not valid or drop[n - 1][0] in self.refuse_dele:
                    send("-ERR message cannot be deleted")
                else:
                    deleted.add(n)
                    send("+OK marked")
            elif cmd == "QUIT":
                if self.quit_err:
                    send("-ERR could not remove deleted messages")
                    return
                gone = {id(drop[i - 1]) for i in deleted}
                self.messages = [m for m in self.messages if id(m) not in gone]
                send("+OK bye")
                return
            else:
                send("-ERR unknown command")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["thread", "process"])
def fake_pop3(request, settings):
    """Both ways, as the other POP3 tests: the session here, or in a child process."""
    settings.MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS = True
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0 if request.param == "thread" else 1
    server = FakePop3()
    yield server
    server.close()


@pytest.fixture
def fake_box(fake_pop3) -> Mailbox:
    return MailboxFactory(owner=UserFactory(), email_address="sales@example.test",
                          protocol=Mailbox.Protocol.POP3, incoming_host="127.0.0.1",
                          incoming_port=fake_pop3.port, incoming_security="none",
                          username="sales", password="secret", is_active=True)


def sync(box: Mailbox):  # noqa: ANN201
    box.refresh_from_db()
    return Pop3Sync(box, timeout=10).run()


def subjects(box: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=box).values_list("subject", flat=True))


# == probes ====================================================================================

def test_a_message_whose_dele_is_refused_does_not_stop_new_mail(fake_pop3, fake_box):
    """Given a server that refuses DELE for one message for good (a read-only or held
    message); when the CRM syncs again and again and new mail arrives, then the new mail
    is still downloaded and removed, nothing is downloaded twice, and the status says the
    refused one was left on the server."""
    fake_pop3.refuse_dele = {"held"}
    fake_pop3.add("held", make_message(subject="Held"))
    fake_pop3.add("a", make_message(subject="First"))
    try:
        sync(fake_box)
    except Exception:  # noqa: BLE001  (what the first run does is not the point)
        pass
    fake_pop3.add("b", make_message(subject="Later"))
    sync(fake_box)
    sync(fake_box)
    fake_box.refresh_from_db()
    assert subjects(fake_box) == ["First", "Held", "Later"]
    assert [u for u, _ in fake_pop3.messages] == ["held"]
    assert fake_box.state == Mailbox.State.COMPLETED, fake_box.last_error
    assert "Not removed from the server: 1 downloaded message" in fake_box.last_error
    held = Pop3Message.objects.get(mailbox=fake_box, key="held")
    assert held.deleted_from_server_at is None  # the record does not say it was removed
    assert Pop3Message.objects.get(mailbox=fake_box, key="b").deleted_from_server_at is not None


def test_a_quit_answered_err_records_nothing_as_removed_and_the_next_run_removes_it(
        fake_pop3, fake_box):
    """Given a server that answers QUIT with -ERR (it could not apply the deletions); then
    the status is an error, the mail is stored, the records do not claim the mail left the
    server, and the next run removes it without downloading it again."""
    from mailsync.exceptions import MailProtocolError

    fake_pop3.add("a", make_message(subject="One"))
    fake_pop3.quit_err = True
    with pytest.raises(MailProtocolError):
        sync(fake_box)
    fake_box.refresh_from_db()
    assert fake_box.state == Mailbox.State.ERROR and len(fake_pop3.messages) == 1
    assert Pop3Message.objects.get(mailbox=fake_box, key="a").deleted_from_server_at is None
    fake_pop3.quit_err = False
    fake_pop3.commands.clear()
    sync(fake_box)
    assert subjects(fake_box) == ["One"] and fake_pop3.messages == []
    assert not any(c.startswith("RETR") for c in fake_pop3.commands)
    assert Pop3Message.objects.get(mailbox=fake_box, key="a").deleted_from_server_at is not None


def test_a_server_without_capa_uidl_or_pipelining_downloads_by_header_hash_one_at_a_time(
        fake_pop3, fake_box):
    """Given a minimal RFC 1939 server (no CAPA, no UIDL; TOP works); then every message,
    two identical copies included, is stored once and removed, one command at a time."""
    fake_pop3.capa = None
    fake_pop3.uidl = False
    twin = make_message(subject="Twin")
    for raw in (make_message(subject="A"), twin, twin, make_message(subject="B")):
        fake_pop3.add("-", raw)
    sync(fake_box)
    assert subjects(fake_box) == ["A", "B", "Twin"] and fake_pop3.messages == []
    assert Pop3Message.objects.filter(mailbox=fake_box).count() == 4
    fake_box.refresh_from_db()
    assert fake_box.state == Mailbox.State.COMPLETED, fake_box.last_error


def test_switching_from_keep_to_remove_then_keep_n_days_removes_without_downloading_again(
        fake_pop3, fake_box):
    """Given mail kept on the server; when the user switches to "remove after download",
    then the next run removes what was stored without a second download; and in "keep N
    days" a new mail stays until N days after its download, not a day less."""
    fake_box.pop3_delete_after_download = False
    fake_box.save()
    fake_pop3.add("a", make_message(subject="Kept"))
    sync(fake_box)
    assert len(fake_pop3.messages) == 1
    fake_box.pop3_delete_after_download = True
    fake_box.save()
    fake_pop3.commands.clear()
    sync(fake_box)
    assert fake_pop3.messages == [] and not any(c.startswith("RETR") for c in fake_pop3.commands)
    fake_box.pop3_delete_after_download = False
    fake_box.pop3_keep_days = 3
    fake_box.save()
    fake_pop3.add("b", make_message(subject="Fresh"))
    sync(fake_box)
    row = Pop3Message.objects.get(mailbox=fake_box, key="b")
    Pop3Message.objects.filter(pk=row.pk).update(downloaded_at=timezone.now() - timedelta(days=2, hours=23))
    sync(fake_box)
    assert [u for u, _ in fake_pop3.messages] == ["b"]
    Pop3Message.objects.filter(pk=row.pk).update(downloaded_at=timezone.now() - timedelta(days=3, minutes=1))
    sync(fake_box)
    assert fake_pop3.messages == [] and subjects(fake_box) == ["Fresh", "Kept"]
