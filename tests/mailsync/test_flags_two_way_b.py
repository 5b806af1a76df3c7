"""A sync landing inside a CRM action (email_update) with another client's change."""
from __future__ import annotations

import pytest

from mailsync import services
from mailsync.models import Email
from mailsync.protocols.imap import ImapSession
from tests.mailsync.conftest import make_message
from tests.mailsync.test_flags_two_way_a import sync
from tests.mailsync.test_sync_places import imap, places, server_places

pytestmark = pytest.mark.django_db


def _interleave(monkeypatch, method, dovecot, user, mailbox, store):
    real = getattr(ImapSession, method)
    fired = []

    def wrapped(self, uids, flags):
        real(self, uids, flags)
        if not fired:
            fired.append(1)
            conn = imap(dovecot, user)
            conn.uid("STORE", "1", *store)
            conn.logout()
            sync(mailbox)

    monkeypatch.setattr(ImapSession, method, wrapped)
    return fired


def test_crm_unread_races_other_client_read_and_a_sync(dovecot, mail_user, imap_mailbox, monkeypatch):
    dovecot.deliver(mail_user, make_message(subject="Race unread"))
    dovecot.set_flags(mail_user, "INBOX", 1, ["\\Seen"])
    sync(imap_mailbox)
    email = Email.objects.get(subject="Race unread")
    fired = _interleave(monkeypatch, "remove_flags", dovecot, mail_user, imap_mailbox,
                        ("+FLAGS.SILENT", r"(\Seen)"))
    services.email_update(actor=imap_mailbox.owner, email=email, seen=False)
    assert fired
    sync(imap_mailbox)
    email.refresh_from_db()
    assert (email.seen, places(email)) == (True, server_places(dovecot, mail_user, ["INBOX"]))


def test_crm_read_does_not_undo_a_flag_another_client_set_meanwhile(
        dovecot, mail_user, imap_mailbox, monkeypatch):
    """The CRM only marks read; the other client's \\Flagged, already synced in between, must
    stay flagged in the CRM (email_update saves its stale in-memory 'flagged')."""
    dovecot.deliver(mail_user, make_message(subject="Lost flag"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Lost flag")
    fired = _interleave(monkeypatch, "add_flags", dovecot, mail_user, imap_mailbox,
                        ("+FLAGS.SILENT", r"(\Flagged)"))
    services.email_update(actor=imap_mailbox.owner, email=email, seen=True)
    assert fired
    sync(imap_mailbox)
    email.refresh_from_db()
    assert places(email) == server_places(dovecot, mail_user, ["INBOX"])
    assert (email.seen, email.flagged) == (True, True), places(email)
