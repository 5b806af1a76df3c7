"""Two-way actions at the service level: who may act, and deleting for good."""
from __future__ import annotations

import pytest

from crm.exceptions import RecordPermissionDenied
from mailsync import services
from mailsync.models import Email
from mailsync.sync.imap import ImapSync
from tests.factories import AdministratorFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


def test_an_administrator_cannot_act_inside_someone_elses_mailbox(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Private"))
    ImapSync(imap_mailbox, timeout=10).run()
    email = Email.objects.get(mailbox=imap_mailbox)
    with pytest.raises(RecordPermissionDenied):
        services.email_update(actor=AdministratorFactory(), email=email, seen=True)
    with pytest.raises(RecordPermissionDenied):
        services.email_delete(actor=AdministratorFactory(), email=email)
    assert dovecot.folder_state(mail_user).flags(dovecot.folder_state(mail_user).uids[0]) == frozenset()


def test_deleting_mail_already_in_trash_expunges_it_on_the_server(dovecot, mail_user, imap_mailbox):
    dovecot.append(mail_user, "Trash", make_message(subject="Binned"))
    imap_mailbox.folders = ["INBOX", "Trash"]  # Trash is never synced, even when asked for
    imap_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="To delete"))
    ImapSync(imap_mailbox, timeout=10).run()
    email = Email.objects.get(mailbox=imap_mailbox)
    assert email.subject == "To delete"

    services.email_delete(actor=imap_mailbox.owner, email=email)
    trash = dovecot.folder_state(mail_user, "Trash")
    assert trash.count == 2 and dovecot.folder_state(mail_user).count == 0

    # Deleting it again from Trash (where a user might find it) removes it for good
    from mailsync.models import EmailLocation, MailFolder

    folder = MailFolder.objects.create(mailbox=imap_mailbox, name="Trash", uidvalidity=trash.uidvalidity)
    EmailLocation.objects.create(email=email, folder=folder, uidvalidity=trash.uidvalidity,
                                 uid=max(trash.uids))
    services.email_delete(actor=imap_mailbox.owner, email=email)
    assert dovecot.folder_state(mail_user, "Trash").count == 1


def test_actions_stop_when_the_folder_changed_uidvalidity_since_the_last_sync(dovecot, mail_user, imap_mailbox):
    from mailsync.exceptions import MailboxOutOfDate

    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Keep {i}"))
    ImapSync(imap_mailbox, timeout=10).run()
    target = Email.objects.get(mailbox=imap_mailbox, subject="Keep 0")
    # The server rebuilt its index: UIDs now name other messages (the oldest got expunged
    # first so that the old UID of "Keep 0" now points at "Keep 1")
    dovecot.expunge(mail_user, "INBOX", dovecot.folder_state(mail_user).uids[0])
    dovecot.reset_uidvalidity(mail_user, "INBOX")

    with pytest.raises(MailboxOutOfDate):
        services.email_delete(actor=imap_mailbox.owner, email=target)
    assert dovecot.folder_state(mail_user).count == 2  # nothing was deleted on the server
    assert dovecot.folder_state(mail_user, "Trash").count == 0
    with pytest.raises(MailboxOutOfDate):
        services.email_update(actor=imap_mailbox.owner, email=target, seen=True)
    assert all("\\Seen" not in f for _, f in dovecot.folder_state(mail_user).messages)


def test_without_uidplus_no_bare_expunge_destroys_other_deleted_mail(dovecot, mail_user, imap_mailbox):
    from mailsync.protocols.imap import ImapSession
    from mailsync.sync.imap import server_settings

    for i in range(2):
        dovecot.deliver(mail_user, make_message(subject=f"M {i}"))
    uids = dovecot.folder_state(mail_user).uids
    # The user's own client marked the second one \Deleted but has not expunged it
    dovecot.set_flags(mail_user, "INBOX", uids[1], ["\\Deleted"])
    with ImapSession(server_settings(imap_mailbox)) as session:
        session.capabilities = session.capabilities - {b"UIDPLUS", b"MOVE"}
        session.select("INBOX", readonly=False)
        session.expunge([uids[0]])
        session.move([uids[0]], "Sent")
    assert dovecot.folder_state(mail_user).count == 2  # flagged, not expunged


def test_a_host_that_now_points_into_our_network_is_refused_at_connect(
        dovecot, mail_user, imap_mailbox, settings):
    """The SSRF check runs at every connect, not only when the mailbox was saved: a name can
    be re-pointed to a private address later (DNS rebinding)."""
    from mailsync.exceptions import MailConfigError

    dovecot.deliver(mail_user, make_message())
    settings.MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS = False
    imap_mailbox.incoming_host = "localhost"  # saved long ago as a public name, say
    imap_mailbox.save()
    with pytest.raises(MailConfigError):
        ImapSync(imap_mailbox, timeout=10).run()
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "error" and "private or local" in imap_mailbox.last_error
    assert not Email.objects.filter(mailbox=imap_mailbox).exists()
