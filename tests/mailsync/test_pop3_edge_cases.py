"""POP3 edge cases against the private Dovecot (written as probes by a review; the ones
that failed were fixed): messages renumbered or deleted by another client, identical copies,
a server without UIDL or TOP (nothing deleted that was not stored), a message that fails to
store while over the size limit (the mailbox goes on), mail deleted in the CRM staying
deleted when a copy is downloaded again, and a progress that adds up when a message
vanishes mid-session."""
from __future__ import annotations

import os
import time

import pytest

from mailsync import selectors, services
from mailsync.models import Email, Mailbox, MessageError, Pop3Message
from mailsync.protocols.pop3 import Pop3Listing, Pop3Retrieved, Pop3Session
from mailsync.sync.pop3 import Pop3Sync
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True, params=["thread", "process"])
def fetch_mode(request, settings) -> str:
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0 if request.param == "thread" else 1
    return request.param


@pytest.fixture
def box(dovecot, mail_user) -> Mailbox:
    return MailboxFactory(
        owner=UserFactory(), email_address=mail_user.email, protocol=Mailbox.Protocol.POP3,
        incoming_host=dovecot.host, incoming_port=dovecot.pop3s_port, incoming_security="ssl",
        username=mail_user.username, password=mail_user.password, is_active=True,
    )


def sync(mailbox: Mailbox, **kwargs):
    mailbox.refresh_from_db()
    return Pop3Sync(mailbox, timeout=10, **kwargs).run()


def on_server(dovecot, user) -> int:
    return dovecot.folder_state(user).count


def live_subjects(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))


def all_subjects(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox).values_list("subject", flat=True))


# -- 3. another client deletes between syncs (numbers shift) -------------------------------
def test_other_client_expunges_between_syncs_numbers_shift(dovecot, mail_user, box):
    box.pop3_delete_after_download = False
    box.save()
    for i in range(4):
        dovecot.deliver(mail_user, make_message(subject=f"Shift {i}"))
    sync(box)
    uids = dovecot.folder_state(mail_user).uids
    dovecot.expunge(mail_user, "INBOX", uids[0])
    dovecot.expunge(mail_user, "INBOX", uids[2])
    dovecot.deliver(mail_user, make_message(subject="Shift new"))
    report = sync(box)
    assert report.new == 1 and report.located == 0
    assert all_subjects(box) == sorted([f"Shift {i}" for i in range(4)] + ["Shift new"])
    assert on_server(dovecot, mail_user) == 3
    box.refresh_from_db()
    assert box.state == "completed" and box.messages_done == box.messages_total == 1


# -- 4. same bytes twice (two UIDLs) -------------------------------------------------------
def test_same_bytes_twice_stored_once_both_removed(dovecot, mail_user, box):
    raw = make_message(subject="Twice same bytes")
    dovecot.append(mail_user, "INBOX", raw)
    dovecot.append(mail_user, "INBOX", raw)
    report = sync(box)
    assert report.new == 1 and report.located == 1
    assert all_subjects(box) == ["Twice same bytes"]
    assert on_server(dovecot, mail_user) == 0
    rows = Pop3Message.objects.filter(mailbox=box)
    assert rows.count() == 2 and all(r.email_id and r.deleted_from_server_at for r in rows)
    box.refresh_from_db()
    assert box.messages_done == box.messages_total == 2


def test_mail_deleted_in_crm_is_not_brought_back_by_a_later_identical_copy(dovecot, mail_user, box):
    """The user deletes a mail in the CRM; the same mail (same Message-ID and content, as
    from a mailing list and a direct copy) arrives again later: it must not reappear."""
    raw = make_message(subject="Deleted by the user")
    dovecot.deliver(mail_user, raw)
    sync(box)
    email = Email.objects.get(mailbox=box)
    services.email_delete(actor=box.owner, email=email)
    dovecot.deliver(mail_user, raw)  # second delivery, other trace headers
    sync(box)
    assert live_subjects(box) == [], "a mail deleted in the CRM came back"


def test_uidls_change_on_the_server_no_duplicates_and_deleted_stays_deleted(dovecot, mail_user, box):
    """Leave on server; the server rebuilds its index (new UIDVALIDITY: every UIDL changes).
    Nothing may be stored twice, and what the user deleted in the CRM stays deleted."""
    box.pop3_delete_after_download = False
    box.save()
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Rebuilt {i}"))
    sync(box)
    services.email_delete(actor=box.owner, email=Email.objects.get(mailbox=box, subject="Rebuilt 0"))
    dovecot.reset_uidvalidity(mail_user)
    report = sync(box)
    assert Email.objects.filter(mailbox=box).count() == 3  # no duplicates
    assert report.new == 0
    assert live_subjects(box) == ["Rebuilt 1", "Rebuilt 2"], "a mail deleted in the CRM came back"


# -- 5. a server without UIDL and without TOP (both optional in RFC 1939) -------------------
class NoUidlNoTop(Pop3Session):
    def listing(self) -> list[Pop3Listing]:
        return [Pop3Listing(i.number, i.size, None) for i in super().listing()]

    def retrieve(self, requests, *, delete_first=()):  # noqa: ANN001
        tops = [r for r in requests if r.headers_only]
        whole = [r for r in requests if not r.headers_only]
        out = super().retrieve(whole, delete_first=delete_first) if (whole or delete_first) else []
        return out + [Pop3Retrieved(r.number, b"", True, error="-ERR Unknown command: TOP")
                      for r in tops]


def _same_size_pair() -> tuple[bytes, bytes]:
    a = make_message(subject="Invoice AAAA", body="Please pay invoice AAAA.",
                     message_id="<aaaa@client.example>")
    b = make_message(subject="Invoice BBBB", body="Please pay invoice BBBB.",
                     message_id="<bbbb@client.example>")
    assert len(a) == len(b)
    return a, b


def test_server_without_uidl_and_top_never_deletes_an_undownloaded_message(dovecot, mail_user, box,
                                                                          settings):
    """Found by a probe: with neither UIDL nor TOP the key came from the size alone, so a new
    mail of the same size as one downloaded before looked known and, with "remove after
    download", was deleted from the server never stored. Now such messages are left alone
    (neither downloaded nor deleted): nothing can be lost."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0  # the session subclass runs in-process
    a, b = _same_size_pair()
    dovecot.append(mail_user, "INBOX", a)
    dovecot.append(mail_user, "INBOX", b)
    sync(box, session_factory=NoUidlNoTop)
    sync(box, session_factory=NoUidlNoTop)
    assert on_server(dovecot, mail_user) == 2  # nothing deleted that was not stored
    assert all_subjects(box) == []
    # ...and the status says so, with what to do (it said "completed" and nothing else)
    box.refresh_from_db()
    assert box.state == Mailbox.State.COMPLETED and box.last_error_code == "notice"
    assert "2 messages" in box.last_error and "left on the server" in box.last_error
    assert box.last_error.count("Not downloaded") == 1
    # A server with TOP (UIDL still missing): both are downloaded, then removed
    sync(box, session_factory=NoUidl)
    assert all_subjects(box) == ["Invoice AAAA", "Invoice BBBB"]
    assert on_server(dovecot, mail_user) == 0


class NoUidl(Pop3Session):
    def listing(self) -> list[Pop3Listing]:
        return [Pop3Listing(i.number, i.size, None) for i in super().listing()]


class ExpungeAfterListing(Pop3Session):
    """Another client deletes a message right after this session's LIST: its RETR fails."""
    victim: tuple | None = None

    def listing(self) -> list[Pop3Listing]:
        listing = super().listing()
        if ExpungeAfterListing.victim is not None:
            dovecot, user, uid = ExpungeAfterListing.victim
            ExpungeAfterListing.victim = None
            dovecot.expunge(user, "INBOX", uid)
        return listing


def test_message_vanishing_mid_session_status(dovecot, mail_user, box, settings):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Vanish {i}"))
    uid = dovecot.folder_state(mail_user).uids[1]
    ExpungeAfterListing.victim = (dovecot, mail_user, uid)
    report = sync(box, session_factory=ExpungeAfterListing)
    box.refresh_from_db()
    status = selectors.mailbox_status(mailbox=box)
    info = (f"report={report} state={box.state} done={box.messages_done}/{box.messages_total} "
            f"bytes={box.bytes_done}/{box.bytes_total} err={box.last_error!r} "
            f"notices={status['message_errors']} subjects={all_subjects(box)} "
            f"server={on_server(dovecot, mail_user)}")
    print(info)
    # A completed run's progress should add up (or the status should say why not).
    assert box.messages_done == box.messages_total or status["message_errors"] or box.last_error, info


def test_over_limit_message_that_fails_to_store_does_not_block_the_mailbox(
        dovecot, mail_user, box, monkeypatch, settings):
    """Found by a probe: its "over the limit" notice collided with its storing error, the
    transaction that records the batch's keys rolled back, and every run failed the same
    way, downloading the good mail of the batch again each time."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    box.max_message_bytes = 100_000
    box.save()
    dovecot.deliver(mail_user, make_message(subject="Huge broken",
                                            attachment=("a.bin", os.urandom(300_000),
                                                        "application/octet-stream")))
    dovecot.deliver(mail_user, make_message(subject="Small ok"))
    from mailsync.models import EmailLocation
    from mailsync.sync import ingest

    real = ingest._store

    def failing(mailbox, folder, uidvalidity, prepared, *rest):
        if any(p.envelope.subject == "Huge broken" for p in prepared):
            raise ValueError("simulated storage failure")
        return real(mailbox, folder, uidvalidity, prepared, *rest)

    monkeypatch.setattr(ingest, "_store", failing)
    for _ in range(3):
        sync(box)
        box.refresh_from_db()
        assert box.state == "completed", box.last_error
    assert all_subjects(box) == ["Small ok"]
    assert EmailLocation.objects.filter(email__mailbox=box).count() == 1  # not downloaded again
    assert on_server(dovecot, mail_user) == 1  # the huge one stays (only headers were read)
    assert MessageError.objects.filter(mailbox=box, resolved_at__isnull=True).count() == 1
