"""One user, two mailboxes holding the same conversation; switching the active one."""
from __future__ import annotations

import pytest

from mailsync import selectors, services
from mailsync.models import Email, Mailbox
from tests.factories import ContactFactory, MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db

CUSTOMER = "Customer <customer@client.example>"


def _box(dovecot, owner, mu, active):
    return MailboxFactory(owner=owner, email_address=mu.email, incoming_host=dovecot.host,
                          incoming_port=dovecot.imaps_port, incoming_security="ssl",
                          username=mu.username, password=mu.password, is_active=active)


def _sync(mailbox):
    report = services.mailbox_sync(mailbox_id=mailbox.pk)
    services.emails_parse_pending(mailbox_id=mailbox.pk)
    return report


def test_conversation_in_two_mailboxes_is_one_thread_after_switching(dovecot):
    owner = UserFactory()
    contact = ContactFactory(owner=owner, email="customer@client.example")
    mu_a, mu_b = dovecot.add_user(), dovecot.add_user()
    box_a, box_b = _box(dovecot, owner, mu_a, True), _box(dovecot, owner, mu_b, False)
    first = make_message(sender=CUSTOMER, subject="Quote", message_id="<q1@client.example>")
    dovecot.deliver(mu_a, first)
    dovecot.deliver(mu_b, first)
    assert _sync(box_a).new == 1
    assert _sync(box_b) is None  # inactive: not synced
    services.mailbox_activate(actor=owner, mailbox=box_b)
    assert _sync(box_b).new == 1
    reply = make_message(sender=CUSTOMER, subject="Re: Quote", message_id="<q2@client.example>",
                         in_reply_to="<q1@client.example>", references="<q1@client.example>")
    dovecot.deliver(mu_a, reply)
    dovecot.deliver(mu_b, reply)
    assert _sync(box_b).new == 1
    services.mailbox_activate(actor=owner, mailbox=box_a)
    box_b.refresh_from_db()
    assert not box_b.is_active
    assert _sync(box_b) is None
    assert _sync(box_a).new == 1  # incremental: only the reply
    assert Email.objects.filter(mailbox=box_a).count() == 2

    listed = list(selectors.emails_of_record(user=owner, record=contact))
    assert len(listed) == 2, [(e.pk, e.mailbox_id, e.subject) for e in listed]
    groups = list(selectors.record_email_groups(user=owner, record=contact))
    assert len(groups) == 1 and groups[0]["count"] == 2, (
        groups, [(e.pk, e.mailbox.email_address, e.subject, e.thread_id) for e in listed])


def test_inactive_mailbox_is_neither_polled_nor_idled(monkeypatch):
    from mailsync import tasks
    from mailsync import idle
    from mailsync.idle import IdleSupervisor

    monkeypatch.setattr(idle, "close_old_connections", lambda: None)

    owner = UserFactory()
    box_a = MailboxFactory(owner=owner, is_active=True)
    box_b = MailboxFactory(owner=owner, is_active=False)
    services.mailbox_activate(actor=owner, mailbox=box_b)
    queued = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert box_a.pk not in queued and box_b.pk in queued
    ids = {t.mailbox_id for t in IdleSupervisor().targets()}
    assert box_a.pk not in ids and box_b.pk in ids
