"""Review session 11: the life of a mailbox and of its owner (account changed, a second
mailbox activated, an owner deactivated, keys rotated, tombstones purged)."""
from __future__ import annotations

import pytest

from mailsync import services
from mailsync.models import Email, Mailbox
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


def live_subjects(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))


def test_pointing_a_mailbox_at_another_account_syncs_its_mail_even_under_the_same_uidvalidity(
        dovecot, mail_user, imap_mailbox):
    # Given a mailbox synced from account A (two mails),
    dovecot.deliver(mail_user, make_message(subject="A one"))
    dovecot.deliver(mail_user, make_message(subject="A two"))
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    assert live_subjects(imap_mailbox) == ["A one", "A two"]
    # and account B holding two other mails under the same INBOX UIDVALIDITY (servers
    # number folders by time or from 1: two accounts often share it)
    other = dovecot.add_user()
    dovecot.deliver(other, make_message(subject="B one"))
    dovecot.deliver(other, make_message(subject="B two"))
    dovecot.doveadm("mailbox", "update", "-u", other.username, "--uid-validity",
                    str(dovecot.folder_state(mail_user).uidvalidity), "INBOX")

    # When the user points the mailbox at account B and it syncs
    services.mailbox_update(actor=imap_mailbox.owner, mailbox=imap_mailbox, data={
        "email_address": other.email, "username": other.username, "password": other.password})
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)

    # Then B's mail is in the CRM, and A's mail (the CRM's copy) was not lost on the way
    assert {"B one", "B two"} <= set(live_subjects(imap_mailbox)), (
        "the new account's mail was skipped: the old account's cursor was kept")
    assert live_subjects(imap_mailbox) == ["A one", "A two", "B one", "B two"]
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 4


def test_pointing_a_mailbox_at_another_account_keeps_the_old_accounts_mail(
        dovecot, mail_user, imap_mailbox):
    # Given a mailbox synced from account A
    dovecot.deliver(mail_user, make_message(subject="From A"))
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    other = dovecot.add_user()
    dovecot.deliver(other, make_message(subject="From B"))

    # When it is pointed at account B (another UIDVALIDITY) and syncs twice
    services.mailbox_update(actor=imap_mailbox.owner, mailbox=imap_mailbox, data={
        "email_address": other.email, "username": other.username, "password": other.password})
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)

    # Then A's mail stays (not a tombstone to be purged in 30 days: deleting a mailbox's mail
    # asks for a confirmation; pointing it elsewhere must not do it silently)
    assert live_subjects(imap_mailbox) == ["From A", "From B"]
    services.emails_purge_tombstones(older_than_days=0)
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 2


def test_the_same_server_under_a_new_host_name_duplicates_nothing(dovecot, mail_user, imap_mailbox):
    # Given a synced mailbox
    dovecot.deliver(mail_user, make_message(subject="Only once"))
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    # When its server is reached under another name (same account) and it syncs
    services.mailbox_update(actor=imap_mailbox.owner, mailbox=imap_mailbox, data={
        "incoming_host": "localhost", "password": mail_user.password})
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    # Then the mail is there once, with its place on the server
    assert live_subjects(imap_mailbox) == ["Only once"]
    email = Email.objects.get(mailbox=imap_mailbox)
    assert email.locations.count() == 1


def test_activating_a_second_mailbox_stops_the_first_and_keeps_its_mail(dovecot, mail_user, imap_mailbox):
    # Given an active mailbox with synced mail
    dovecot.deliver(mail_user, make_message(subject="Old mailbox mail"))
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    second_user = dovecot.add_user()
    second = MailboxFactory(owner=imap_mailbox.owner, email_address=second_user.email,
                            username=second_user.username, password=second_user.password,
                            incoming_host=dovecot.host, incoming_port=dovecot.imaps_port,
                            incoming_security="ssl", is_active=False)
    # When the second one is activated
    services.mailbox_activate(actor=imap_mailbox.owner, mailbox=second)
    dovecot.deliver(mail_user, make_message(subject="Arrives at the old one"))
    # Then the first no longer syncs, its mail stays
    assert services.mailbox_sync(mailbox_id=imap_mailbox.pk) is None
    assert live_subjects(imap_mailbox) == ["Old mailbox mail"]
    assert list(Mailbox.objects.filter(owner=imap_mailbox.owner, is_active=True)) == [second]


def test_a_password_no_key_decrypts_is_a_clear_error_not_a_500(settings):
    from cryptography.fernet import Fernet
    from rest_framework.test import APIClient

    owner = UserFactory()
    old = MailboxFactory(owner=owner, is_active=True)
    # Given a password encrypted under a key that was dropped before rotation
    settings.MAILROOM_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    client = APIClient()
    client.force_authenticate(owner)
    # When the owner lists their mailboxes
    response = client.get("/api/v1/mailboxes/")
    # Then the answer says what is wrong
    assert response.status_code != 500, response.content[:300]
    del old


def test_a_pop3_mailbox_pointed_at_another_account_downloads_its_mail(dovecot, mail_user, pop3_mailbox):
    # Given a POP3 mailbox that downloaded account A's mail and removed it (the default)
    dovecot.deliver(mail_user, make_message(subject="A mail"))
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    # and account B, whose message has the same UIDL as A's had (same UID and UIDVALIDITY)
    other = dovecot.add_user()
    dovecot.deliver(other, make_message(subject="B mail"))
    dovecot.doveadm("mailbox", "update", "-u", other.username, "--uid-validity",
                    str(dovecot.folder_state(mail_user).uidvalidity), "INBOX")
    # When the mailbox is pointed at B and syncs
    services.mailbox_update(actor=pop3_mailbox.owner, mailbox=pop3_mailbox, data={
        "email_address": other.email, "username": other.username, "password": other.password})
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    # Then B's mail is downloaded (not taken for A's, nor removed from B's server unread)
    assert live_subjects(pop3_mailbox) == ["A mail", "B mail"]
