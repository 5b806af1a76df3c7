"""A mail in INBOX and Sent marked unread by the CRM, then read in one copy; the race
of test_flags_two_way_a on a CONDSTORE-only server (Gmail) and after several syncs."""
from __future__ import annotations

import pytest

from mailsync import services
from mailsync.models import Email
from mailsync.protocols.imap import ImapSession
from tests.mailsync.conftest import make_message
from tests.mailsync.test_flags_two_way_a import _lesser, sync
from tests.mailsync.test_sync_places import imap, places, server_places

pytestmark = pytest.mark.django_db


def test_two_copies_crm_unread_then_one_copy_read(dovecot, mail_user, imap_mailbox):
    raw = make_message(subject="Twice")
    dovecot.deliver(mail_user, raw)
    dovecot.append(mail_user, "Sent", raw, flags=["\\Seen", "$Forwarded"])
    sync(imap_mailbox)
    email = Email.objects.get(subject="Twice")
    assert email.seen
    services.email_update(actor=imap_mailbox.owner, email=email, seen=False)
    assert all("\\Seen" not in f for _, f in dovecot.folder_state(mail_user, "Sent").messages)
    conn = imap(dovecot, mail_user, "Sent")
    conn.uid("STORE", "1", "+FLAGS.SILENT", r"(\Seen)")
    conn.logout()
    sync(imap_mailbox)
    email.refresh_from_db()
    assert places(email) == server_places(dovecot, mail_user, ["INBOX", "Sent"])
    assert email.seen is True


def test_race_on_condstore_only_server_persists(dovecot, mail_user, imap_mailbox, monkeypatch):
    gmail = _lesser("QRESYNC")
    dovecot.deliver(mail_user, make_message(subject="Gmail race"))
    sync(imap_mailbox, gmail)
    email = Email.objects.get(subject="Gmail race")
    real = ImapSession.add_flags

    def interleave(self, uids, flags):
        real(self, uids, flags)
        monkeypatch.setattr(ImapSession, "add_flags", real)
        conn = imap(dovecot, mail_user)
        conn.uid("STORE", "1", "-FLAGS.SILENT", r"(\Seen)")
        conn.logout()
        sync(imap_mailbox, gmail)

    monkeypatch.setattr(ImapSession, "add_flags", interleave)
    services.email_update(actor=imap_mailbox.owner, email=email, seen=True)
    for _ in range(3):
        sync(imap_mailbox, gmail)
    email.refresh_from_db()
    assert (email.seen, places(email)) == (False, server_places(dovecot, mail_user, ["INBOX"]))
