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
