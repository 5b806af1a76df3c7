"""Mailbox secrets are encrypted at rest, and keys rotate without losing a secret."""
from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection

from crm.encryption import _fernet
from mailsync.models import Mailbox
from tests.factories import MailboxFactory

pytestmark = pytest.mark.django_db


def _raw(mailbox: Mailbox, column: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM mailsync_mailbox WHERE id = %s", [mailbox.pk])
        return cursor.fetchone()[0]


def test_password_is_stored_encrypted_and_read_back_plain():
    mailbox = MailboxFactory(password="s3cret-app-pass")

    raw = _raw(mailbox, "password")
    assert "s3cret" not in raw
    assert Mailbox.objects.get(pk=mailbox.pk).password == "s3cret-app-pass"


def test_rotation_re_encrypts_under_the_new_key_and_old_key_can_go(settings):
    old_key = settings.MAILROOM_ENCRYPTION_KEYS[0]
    mailbox = MailboxFactory(password="pw-one", smtp_password="pw-two")
    before = _raw(mailbox, "password")

    new_key = Fernet.generate_key().decode()
    settings.MAILROOM_ENCRYPTION_KEYS = [new_key, old_key]
    call_command("rotate_encryption_keys", stdout=open("/dev/null", "w"))

    after = _raw(mailbox, "password")
    assert after != before
    # Only the new key is needed from now on
    assert Fernet(new_key.encode()).decrypt(after.encode()) == b"pw-one"
    settings.MAILROOM_ENCRYPTION_KEYS = [new_key]
    fresh = Mailbox.objects.get(pk=mailbox.pk)
    assert (fresh.password, fresh.smtp_password) == ("pw-one", "pw-two")


def test_missing_key_is_reported_by_system_check(settings):
    from crm.checks import check_encryption_keys

    settings.MAILROOM_ENCRYPTION_KEYS = []
    _fernet.cache_clear()
    errors = check_encryption_keys(None)
    assert [e.id for e in errors] == ["mailroom.E001"]


def test_one_active_mailbox_per_user_is_enforced_by_the_database():
    from django.db import IntegrityError, transaction

    first = MailboxFactory(is_active=True)
    MailboxFactory(owner=first.owner, is_active=False)  # several configured: fine
    with pytest.raises(IntegrityError), transaction.atomic():
        MailboxFactory(owner=first.owner, is_active=True)
