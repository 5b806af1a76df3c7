"""Review session 11: two-way IMAP sync semantics against the private Dovecot, with a second
IMAP client playing the user's other mail program. Written as probes; those that failed were
fixed, a few that held are kept as regression tests.

Bugs found and fixed:
1. A mail read (or flagged) in INBOX, then filed by a mail program that moves without
   expunging (the INBOX copy keeps \\Seen and gets \\Deleted), then marked unread (or
   unflagged) in the other folder stayed read (flagged) in the CRM for good: the read state
   counted the \\Deleted copy. Only live copies count now where the mail has one
   (``sync.ingest.refresh_flags``).
2. A mail sent from the CRM has no place on the server until the sync reads its copy in the
   Sent folder: flagged or marked unread in the CRM meanwhile, the sync that found the copy
   took the change back; deleted meanwhile, it came back (its copy was live in Sent). A CRM
   action on such a mail now looks for that copy first and acts on it
   (``services._places_for_action``).
"""
from __future__ import annotations

import pytest

from mailsync import services
from mailsync.models import Email, EmailLocation, Mailbox
from tests.mailsync.conftest import imap_sync, make_message
from tests.mailsync.test_two_connections_per_mailbox import client

pytestmark = pytest.mark.django_db


def uid_of(dovecot, user, folder: str, subject: str) -> int:  # noqa: ANN001
    with client(dovecot, user) as c:
        c.select_folder(folder, readonly=True)
        (uid,) = c.search(["SUBJECT", subject])
    return uid


def set_flags(dovecot, user, folder: str, subject: str, flags: list[str]) -> None:  # noqa: ANN001
    with client(dovecot, user) as c:
        c.select_folder(folder)
        c.set_flags(c.search(["SUBJECT", subject]), flags)


def folders_of(email: Email) -> list[str]:
    return sorted(EmailLocation.objects.filter(email=email).values_list("folder__name", flat=True))


# == 1. read state of a mail filed by a program that moves without expunging ===================

def test_read_state_follows_the_live_copy_not_the_deleted_one(dovecot, mail_user, imap_mailbox):
    """BUG (fixed). Given a mail read and flagged in INBOX, then filed into "Projects" by Thunderbird
    without expunging (the INBOX copy keeps \\Seen \\Flagged and gets \\Deleted); when the user
    marks it unread and unflags it in Thunderbird (in Projects), then after a sync the CRM
    shows it unread and not flagged, as the only live copy is (before: read and flagged,
    from the \\Deleted INBOX copy, for good)."""
    with client(dovecot, mail_user) as c:
        c.create_folder("Projects")
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(folders=["INBOX", "Projects"])
    dovecot.deliver(mail_user, make_message(subject="Filed read"))
    imap_sync(imap_mailbox)
    set_flags(dovecot, mail_user, "INBOX", "Filed read", ["\\Seen", "\\Flagged"])
    with client(dovecot, mail_user) as c:  # filed without expunging
        c.select_folder("INBOX")
        uids = c.search(["SUBJECT", "Filed read"])
        c.copy(uids, "Projects")
        c.add_flags(uids, ["\\Deleted"])
    imap_sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    assert email.seen and email.flagged and email.deleted_at is None

    set_flags(dovecot, mail_user, "Projects", "Filed read", [])
    imap_sync(imap_mailbox)

    email.refresh_from_db()
    assert (email.seen, email.flagged) == (False, False)


# == kept probes (no bug) =====================================================================

def visible(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))


def test_a_folder_emptied_on_the_server_leaves_only_tombstones(dovecot, mail_user, imap_mailbox):
    """Given three mails synced (the second run on QRESYNC); when another client empties
    INBOX, then none is shown and none keeps a place; new mail then shows."""
    for subject in ("One", "Two", "Three"):
        dovecot.deliver(mail_user, make_message(subject=subject))
    imap_sync(imap_mailbox)
    imap_sync(imap_mailbox)
    with client(dovecot, mail_user) as c:
        c.select_folder("INBOX")
        c.add_flags(c.search(["ALL"]), ["\\Deleted"])
        c.expunge()
    imap_sync(imap_mailbox)
    assert visible(imap_mailbox) == []
    assert EmailLocation.objects.filter(email__mailbox=imap_mailbox).count() == 0
    dovecot.deliver(mail_user, make_message(subject="Four"))
    imap_sync(imap_mailbox)
    assert visible(imap_mailbox) == ["Four"]


def test_crm_move_to_an_unsynced_folder_then_back_is_one_mail_in_inbox(dovecot, mail_user, imap_mailbox):
    """Undo: a mail filed from the CRM into "Archive" (not synced), then moved back to INBOX
    from the CRM, is one mail, in INBOX on the server and in the CRM, and acts there."""
    with client(dovecot, mail_user) as c:
        c.create_folder("Archive")
    dovecot.deliver(mail_user, make_message(subject="Undo me"))
    imap_sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    services.email_update(actor=imap_mailbox.owner, email=email, folder="Archive")
    imap_sync(imap_mailbox)
    services.email_update(actor=imap_mailbox.owner, email=Email.objects.get(pk=email.pk), folder="INBOX")
    imap_sync(imap_mailbox)
    imap_sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None
    assert folders_of(email) == ["INBOX"]
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    assert dovecot.folder_state(mail_user, "Archive").count == 0
    assert dovecot.folder_state(mail_user, "INBOX").count == 1
    services.email_update(actor=imap_mailbox.owner, email=email, seen=True)
    assert dovecot.folder_state(mail_user, "INBOX").messages[0][1] >= {"\\Seen"}


def test_keywords_set_by_another_client_reach_the_crm_and_survive_crm_actions(
        dovecot, mail_user, imap_mailbox):
    """$Forwarded and a custom keyword set by another client reach the CRM's place, and a
    CRM read + flag keeps them on the server."""
    dovecot.deliver(mail_user, make_message(subject="Fwd"))
    imap_sync(imap_mailbox)
    set_flags(dovecot, mail_user, "INBOX", "Fwd", ["$Forwarded", "Customer"])
    imap_sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    (flags,) = EmailLocation.objects.filter(email=email).values_list("flags", flat=True)
    assert {"$Forwarded", "Customer"} <= set(flags)
    services.email_update(actor=imap_mailbox.owner, email=email, seen=True, flagged=True)
    imap_sync(imap_mailbox)
    uid = uid_of(dovecot, mail_user, "INBOX", "Fwd")
    assert dovecot.folder_state(mail_user).flags(uid) >= {"$Forwarded", "Customer", "\\Seen", "\\Flagged"}
    email.refresh_from_db()
    assert email.seen and email.flagged


def with_smtp(mailbox: Mailbox, smtp_outbox) -> Mailbox:  # noqa: ANN001
    mailbox.refresh_from_db()
    mailbox.smtp_host, mailbox.smtp_port, mailbox.smtp_security = smtp_outbox.host, smtp_outbox.port, "starttls"
    mailbox.smtp_username, mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    mailbox.save()
    return mailbox


# == 2. a mail sent from the CRM, acted on before the sync read its Sent copy ==================


def test_a_crm_sent_mail_flagged_before_its_sent_copy_is_synced_stays_flagged(
        imap_mailbox, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    """BUG (fixed). Given a mail sent from the CRM (its copy appended to Sent, not synced
    yet); when the user flags it and marks it unread in the CRM, then the server's copy is
    changed and the next sync keeps it so (before: the CRM alone changed, and the sync that
    found the Sent copy took the flag off and made it read again)."""
    from mailsync import sending
    from tests.factories import ContactFactory

    with_smtp(imap_mailbox, smtp_outbox)
    imap_sync(imap_mailbox)
    contact = ContactFactory(owner=imap_mailbox.owner, email="grace@navy.example")
    with django_capture_on_commit_callbacks(execute=True):
        sent = sending.email_send(actor=imap_mailbox.owner, from_address=mail_user.email,
                                  to="grace@navy.example", subject="Follow up", text="x", record=contact)
    sent.refresh_from_db()
    assert sent.send_state == Email.SendState.SENT

    services.email_update(actor=imap_mailbox.owner, email=sent, flagged=True, seen=False)
    imap_sync(imap_mailbox)

    sent.refresh_from_db()
    assert folders_of(sent) == ["Sent"]
    assert (sent.flagged, sent.seen) == (True, False), "the CRM's change was undone by the sync"
    uid = uid_of(dovecot, mail_user, "Sent", "Follow up")
    flags = dovecot.folder_state(mail_user, "Sent").flags(uid)
    assert "\\Flagged" in flags and "\\Seen" not in flags


def test_a_crm_sent_mail_deleted_before_its_sent_copy_is_synced_stays_deleted(
        imap_mailbox, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    """BUG (fixed). Given a mail sent from the CRM, its Sent copy not synced yet; when the
    user deletes it in the CRM, then its copy goes to the Trash and the next sync leaves it
    deleted (before: "crm" only, and the sync brought it back from the live Sent copy)."""
    from mailsync import sending

    with_smtp(imap_mailbox, smtp_outbox)
    imap_sync(imap_mailbox)
    with django_capture_on_commit_callbacks(execute=True):
        sent = sending.email_send(actor=imap_mailbox.owner, from_address=mail_user.email,
                                  to="grace@navy.example", subject="Oops", text="x")
    sent.refresh_from_db()
    assert services.email_delete(actor=imap_mailbox.owner, email=sent) == "trash"
    imap_sync(imap_mailbox)
    sent.refresh_from_db()
    assert sent.deleted_at is not None, "the deleted mail came back"
    assert dovecot.folder_state(mail_user, "Sent").count == 0

