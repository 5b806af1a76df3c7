"""Flags the CRM does not manage survive its actions; races; lesser servers."""
from __future__ import annotations

import pytest

from mailsync import services
from mailsync.models import Email
from mailsync.protocols.imap import ImapSession
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message
from tests.mailsync.test_sync_places import imap, places, server_places, use_projects

pytestmark = pytest.mark.django_db

OTHER = {"$Forwarded", "$Junk", "\\Answered", "\\Draft", "Customer_Keyword"}


def _lesser(*hidden):
    class Lesser(ImapSession):
        def has(self, capability: str) -> bool:
            return capability not in hidden and super().has(capability)
    return Lesser


def sync(mailbox, factory=ImapSession):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10, session_factory=factory).run()


def test_other_flags_survive_crm_read_flag_and_move(dovecot, mail_user, imap_mailbox):
    use_projects(dovecot, mail_user, imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="Keywords"))
    dovecot.set_flags(mail_user, "INBOX", 1, sorted(OTHER))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Keywords")
    owner = imap_mailbox.owner
    for kw in ({"seen": True}, {"flagged": True}, {"seen": False}, {"flagged": False}):
        services.email_update(actor=owner, email=Email.objects.get(pk=email.pk), **kw)
    assert dovecot.folder_state(mail_user).flags(1) == frozenset(OTHER)
    services.email_update(actor=owner, email=Email.objects.get(pk=email.pk), folder="Projects", seen=True)
    sync(imap_mailbox)
    [uid] = dovecot.folder_state(mail_user, "Projects").uids
    assert dovecot.folder_state(mail_user, "Projects").flags(uid) == frozenset(OTHER | {"\\Seen"})
    email.refresh_from_db()
    assert places(email) == server_places(dovecot, mail_user, ["INBOX", "Projects"])
    assert (email.seen, email.flagged) == (True, False)


def test_crm_read_races_other_client_unread_and_a_sync(dovecot, mail_user, imap_mailbox, monkeypatch):
    """CRM STOREs +\\Seen; before it writes its DB, another client removes \\Seen and a sync
    runs to the end. The next sync must make the CRM agree with the server."""
    dovecot.deliver(mail_user, make_message(subject="Race"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Race")
    real = ImapSession.add_flags
    fired = []

    def add_then_interleave(self, uids, flags):
        real(self, uids, flags)
        if not fired:
            fired.append(1)
            conn = imap(dovecot, mail_user)
            conn.uid("STORE", "1", "-FLAGS.SILENT", r"(\Seen)")
            conn.logout()
            sync(imap_mailbox)

    monkeypatch.setattr(ImapSession, "add_flags", add_then_interleave)
    services.email_update(actor=imap_mailbox.owner, email=email, seen=True)
    monkeypatch.setattr(ImapSession, "add_flags", real)
    assert fired
    sync(imap_mailbox)
    email.refresh_from_db()
    server = dovecot.folder_state(mail_user).flags(1)
    assert email.seen == ("\\Seen" in server), (places(email), server)


def test_crm_read_then_other_client_unread(dovecot, mail_user, imap_mailbox, monkeypatch):
    """Plain interleave: the other client's -\\Seen lands right after the CRM's STORE."""
    dovecot.deliver(mail_user, make_message(subject="Race2"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Race2")
    real = ImapSession.add_flags

    def add_then_other(self, uids, flags):
        real(self, uids, flags)
        conn = imap(dovecot, mail_user)
        conn.uid("STORE", "1", "-FLAGS.SILENT", r"(\Seen)")
        conn.logout()

    monkeypatch.setattr(ImapSession, "add_flags", add_then_other)
    services.email_update(actor=imap_mailbox.owner, email=email, seen=True)
    monkeypatch.setattr(ImapSession, "add_flags", real)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.seen is False and places(email) == server_places(dovecot, mail_user, ["INBOX"])


@pytest.mark.parametrize("hidden", [("QRESYNC",), ("QRESYNC", "CONDSTORE")], ids=["condstore", "neither"])
def test_lesser_server_flags_and_flag_then_move(dovecot, mail_user, imap_mailbox, hidden):
    factory = _lesser(*hidden)
    use_projects(dovecot, mail_user, imap_mailbox)
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"L{i}"))
    sync(imap_mailbox, factory)
    dovecot.set_flags(mail_user, "INBOX", 1, ["\\Seen", "$Forwarded"])
    conn = imap(dovecot, mail_user)
    conn.uid("STORE", "2", "+FLAGS.SILENT", r"(\Flagged \Seen)")
    conn.uid("MOVE", "2", "Projects")
    conn.logout()
    sync(imap_mailbox, factory)
    sync(imap_mailbox, factory)
    for subject, seen, flagged in (("L0", True, False), ("L1", True, True), ("L2", False, False)):
        e = Email.objects.get(subject=subject)
        assert e.deleted_at is None, subject
        assert places(e) == [p for p in server_places(dovecot, mail_user, ["INBOX", "Projects"])
                             if (p[0], p[1]) in {(loc[0], loc[1]) for loc in places(e)}] and places(e)
        assert (e.seen, e.flagged) == (seen, flagged), (subject, places(e))
    # a flag-only change, and then the same unchanged again
    conn = imap(dovecot, mail_user)
    conn.uid("STORE", "1", "-FLAGS.SILENT", r"(\Seen)")
    conn.logout()
    sync(imap_mailbox, factory)
    assert Email.objects.get(subject="L0").seen is False


def test_flag_batches_chunked(dovecot, mail_user, imap_mailbox, monkeypatch):
    from mailsync.sync import imap as engine
    for i in range(11):
        dovecot.deliver(mail_user, make_message(subject=f"B{i}"))
    sync(imap_mailbox)
    monkeypatch.setattr(engine, "FLAG_BATCH", 3)
    conn = imap(dovecot, mail_user)
    conn.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Seen)")
    conn.uid("STORE", "2,9,11", "+FLAGS.SILENT", r"(\Flagged)")
    conn.uid("STORE", "4", "-FLAGS.SILENT", r"(\Seen)")
    conn.logout()
    for factory in (ImapSession, _lesser("QRESYNC"), _lesser("QRESYNC", "CONDSTORE")):
        sync(imap_mailbox, factory)
        got = {e.subject: (e.seen, e.flagged) for e in Email.objects.filter(mailbox=imap_mailbox)}
        want = {f"B{i}": (i != 3, i + 1 in (2, 9, 11)) for i in range(11)}
        assert got == want, factory
        conn = imap(dovecot, mail_user)
        conn.uid("STORE", "1:*", "FLAGS.SILENT", r"(\Seen)")
        conn.uid("STORE", "2,9,11", "+FLAGS.SILENT", r"(\Flagged)")
        conn.uid("STORE", "4", "-FLAGS.SILENT", r"(\Seen)")
        conn.logout()


def test_sent_and_inbox_copies(dovecot, mail_user, imap_mailbox):
    raw = make_message(subject="Both")
    dovecot.deliver(mail_user, raw)
    sent_uid = dovecot.append(mail_user, "Sent", raw, flags=["\\Seen"])
    sync(imap_mailbox)
    email = Email.objects.get(subject="Both", mailbox=imap_mailbox)
    assert len(places(email)) == 2, places(email)
    assert email.seen is True
    dovecot.expunge(mail_user, "Sent", sent_uid)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.seen is False and email.deleted_at is None, places(email)


def test_deleted_flag_not_expunged(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Marked deleted"))
    sync(imap_mailbox)
    dovecot.set_flags(mail_user, "INBOX", 1, ["\\Deleted", "\\Seen"])
    sync(imap_mailbox)
    email = Email.objects.get(subject="Marked deleted")
    print("DELETED-FLAG:", email.deleted_at, email.seen, places(email))
    assert email.seen is True
