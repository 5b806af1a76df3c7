"""The same mail in two users' mailboxes, seen on one contact."""
from __future__ import annotations

import pytest

from crm import services as crm_services
from mailsync import selectors
from mailsync.models import Mailbox
from tests.factories import ContactFactory, MailboxFactory, UserFactory
from tests.mailsync.test_pages import make_email

pytestmark = pytest.mark.django_db


def _setup(shareable_b=True):
    a, b, viewer = UserFactory(), UserFactory(), UserFactory()
    contact = ContactFactory(owner=a, email="customer@client.example")
    crm_services.record_share(actor=a, record=contact, user=viewer)
    crm_services.record_share(actor=a, record=contact, user=b)
    box_a = MailboxFactory(owner=a, sharing=Mailbox.Sharing.PUBLIC)
    box_b = MailboxFactory(owner=b, sharing=Mailbox.Sharing.PUBLIC)
    # b's copy synced first (lower pk); a has read the mail, b has not.
    copy_b = make_email(box_b, contact, fingerprint="same", seen=False, shareable=shareable_b)
    copy_a = make_email(box_a, contact, fingerprint="same", seen=True)
    return a, b, viewer, contact, copy_a, copy_b


def test_colleague_sees_a_mail_cc_to_two_public_mailboxes_once():
    a, b, viewer, contact, copy_a, copy_b = _setup()
    assert selectors.emails_of_record(user=viewer, record=contact).count() == 1


def test_unshareable_copy_does_not_hide_the_shareable_one():
    a, b, viewer, contact, copy_a, copy_b = _setup(shareable_b=False)
    assert list(selectors.emails_of_record(user=viewer, record=contact)) == [copy_a]
    assert list(selectors.emails_of_record(user=b, record=contact)) == [copy_b]


def test_owner_sees_their_own_copy_with_their_read_state():
    a, b, viewer, contact, copy_a, copy_b = _setup()
    listed = list(selectors.emails_of_record(user=a, record=contact))
    groups = list(selectors.record_email_groups(user=a, record=contact))
    assert listed == [copy_a], f"owner a is shown {[(e.pk, e.mailbox.owner_id) for e in listed]}, own copy is {copy_a.pk}"
    assert groups[0]["unread"] == 0, groups
