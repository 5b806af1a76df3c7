"""Review (session 11): a stored password no key decrypts, key rotation, and the admin console
(deactivate users, share records) as the README describes them."""
from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings
from django.urls import reverse
from rest_framework.test import APIClient

from crm import services as crm_services
from mailsync import idle, services, tasks
from mailsync.idle import IdleSupervisor
from mailsync.models import Mailbox
from tests.factories import AdministratorFactory, ContactFactory, MailboxFactory, UserFactory
from tests.mailsync.test_pages import make_email

pytestmark = pytest.mark.django_db

REMOVED_KEY = Fernet.generate_key().decode()


def _raw(mailbox: Mailbox) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT password FROM mailsync_mailbox WHERE id = %s", [mailbox.pk])
        return cursor.fetchone()[0]


def _unreadable_mailbox(**fields) -> Mailbox:  # noqa: ANN003
    """Given a mailbox whose password was encrypted under a key since removed from the list."""
    with override_settings(MAILROOM_ENCRYPTION_KEYS=[REMOVED_KEY]):
        return MailboxFactory(**fields)


def test_unreadable_password_pages_api_and_admin_answer_and_say_to_re_enter_it(client):
    owner = UserFactory()
    bad = _unreadable_mailbox(owner=owner, is_active=True)
    good = MailboxFactory(owner=UserFactory(), is_active=True)
    api = APIClient()
    api.force_authenticate(owner)
    # When the owner opens the pages and the API
    client.force_login(owner)
    for url in (reverse("mail-config"), reverse("mail-mailbox", args=[bad.pk]),
                reverse("mail-mailbox-edit", args=[bad.pk]), reverse("mail-mailbox-status", args=[bad.pk])):
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
    for url in ("/api/v1/mailboxes/", f"/api/v1/mailboxes/{bad.pk}/", f"/api/v1/mailboxes/{bad.pk}/status/"):
        response = api.get(url)
        assert response.status_code == 200, (url, response.status_code, response.content[:300])
    for url in (f"/api/v1/mailboxes/{bad.pk}/test/", f"/api/v1/mailboxes/{bad.pk}/sync/"):
        response = api.post(url)
        assert response.status_code < 500, (url, response.status_code, response.content[:300])
    # Then the test says what to fix: enter the password again
    response = api.post(f"/api/v1/mailboxes/{bad.pk}/test/")
    assert "password" in str(response.json()).lower(), response.json()
    # And the admin lists and opens it
    client.force_login(AdministratorFactory(is_staff=True, is_superuser=True))
    assert client.get("/admin/mailsync/mailbox/").status_code == 200
    assert client.get(f"/admin/mailsync/mailbox/{bad.pk}/change/").status_code == 200
    assert client.get(f"/admin/mailsync/mailbox/{good.pk}/change/").status_code == 200


def test_unreadable_password_sync_records_a_user_error_and_poll_and_idle_go_on(monkeypatch, client):
    monkeypatch.setattr(idle, "close_old_connections", lambda: None)
    bad = _unreadable_mailbox(is_active=True)
    good = MailboxFactory(is_active=True)
    # The poll queues every other mailbox; the IDLE watcher keeps the others
    queued: list[int] = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert good.pk in queued
    assert {good.pk} <= {t.mailbox_id for t in IdleSupervisor().targets()}
    assert bad.pk not in {t.mailbox_id for t in IdleSupervisor().targets()}
    # When its sync runs (no login is tried with an empty password)
    tasks.sync_mailbox(bad.pk, retry=False)
    # Then the status tells the user to re-enter the password, and the poll leaves it alone
    bad.refresh_from_db()
    assert bad.state == Mailbox.State.ERROR
    assert bad.last_error_code == "auth_failed"
    assert "password" in bad.last_error.lower()
    client.force_login(bad.owner)
    assert "password again" in client.get(reverse("mail-mailbox", args=[bad.pk])).content.decode()
    queued.clear()
    tasks.poll_mailboxes()
    assert bad.pk not in queued and good.pk in queued
    # The stored ciphertext was kept (re-adding the key would restore it)
    with override_settings(MAILROOM_ENCRYPTION_KEYS=[REMOVED_KEY]):
        assert Fernet(REMOVED_KEY.encode()).decrypt(_raw(bad).encode()) == b"app-password-123"
    # And entering the password again fixes it
    services.mailbox_update(actor=bad.owner, mailbox=Mailbox.objects.get(pk=bad.pk),
                            data={"password": "new-pass"}, check_connection=False)
    assert Mailbox.objects.get(pk=bad.pk).password == "new-pass"


def test_rotation_with_an_unreadable_secret_fails_and_leaves_all_as_they_were(settings):
    good = MailboxFactory(password="pw-good")
    bad = _unreadable_mailbox()
    before = (_raw(good), _raw(bad))
    settings.MAILROOM_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), *settings.MAILROOM_ENCRYPTION_KEYS]
    with pytest.raises(CommandError):
        call_command("rotate_encryption_keys", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert (_raw(good), _raw(bad)) == before


def test_admin_deactivate_action_stops_sync_and_keeps_shared_mail_visible(client, monkeypatch):
    from mailsync import selectors

    monkeypatch.setattr(idle, "close_old_connections", lambda: None)
    owner, colleague = UserFactory(), UserFactory()
    box = MailboxFactory(owner=owner, is_active=True, sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=owner, email="customer@client.example")
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    email = make_email(box, contact)
    # When an administrator deactivates the owner in the Django admin
    client.force_login(AdministratorFactory(is_staff=True, is_superuser=True))
    response = client.post("/admin/crm/user/", {"action": "deactivate_users", "_selected_action": [owner.pk]})
    assert response.status_code == 302
    owner.refresh_from_db()
    assert not owner.is_active
    # Then nothing syncs or watches their mailbox, and the colleague still sees the mail
    queued: list[int] = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert box.pk not in queued
    assert box.pk not in {t.mailbox_id for t in IdleSupervisor().targets()}
    assert list(selectors.emails_of_record(user=colleague, record=contact)) == [email]
