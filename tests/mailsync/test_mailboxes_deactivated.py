"""A deactivated user's mailboxes stop syncing; their shared mail stays visible."""
from __future__ import annotations

import pytest

from crm import services as crm_services
from mailsync import selectors, services
from mailsync.models import Mailbox
from tests.factories import AdministratorFactory, ContactFactory, MailboxFactory, UserFactory
from tests.mailsync.test_pages import make_email

pytestmark = pytest.mark.django_db


def test_deactivated_owner_is_not_polled_idled_or_synced_and_mail_stays(monkeypatch):
    from mailsync import idle, tasks
    from mailsync.idle import IdleSupervisor

    monkeypatch.setattr(idle, "close_old_connections", lambda: None)
    owner, colleague = UserFactory(), UserFactory()
    box = MailboxFactory(owner=owner, is_active=True, sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=owner, email="customer@client.example")
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    email = make_email(box, contact)
    crm_services.user_deactivate(actor=AdministratorFactory(), user=owner)
    queued = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert box.pk not in queued
    assert box.pk not in {t.mailbox_id for t in IdleSupervisor().targets()}
    assert services.mailbox_sync(mailbox_id=box.pk) is None
    assert list(selectors.emails_of_record(user=colleague, record=contact)) == [email]
