"""The Mailbox admin with several mailboxes and synced mail."""
from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from mailsync.models import EmailParticipant, Mailbox
from tests.factories import AdministratorFactory, ContactFactory, MailboxFactory
from tests.mailsync.test_pages import make_email

pytestmark = pytest.mark.django_db


def _admin() -> Client:
    c = Client()
    c.force_login(AdministratorFactory())
    return c


def _form_data(client, mailbox) -> dict:
    response = client.get(reverse("admin:mailsync_mailbox_change", args=[mailbox.pk]))
    form = response.context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        value = form[name].value()
        if value is None:
            value = ""
        if isinstance(value, bool):
            if value:
                data[name] = "on"
            continue
        data[name] = value if not isinstance(value, list | dict) else __import__("json").dumps(value)
    return data


def test_admin_save_without_password_keeps_it_and_page_hides_it():
    client = _admin()
    mailbox = MailboxFactory(password="top-secret-pass", smtp_password="smtp-secret")
    page = client.get(reverse("admin:mailsync_mailbox_change", args=[mailbox.pk])).content.decode()
    assert "top-secret-pass" not in page and "smtp-secret" not in page
    data = _form_data(client, mailbox) | {"display_name": "Renamed"}
    response = client.post(reverse("admin:mailsync_mailbox_change", args=[mailbox.pk]), data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    mailbox.refresh_from_db()
    assert mailbox.display_name == "Renamed"
    assert mailbox.password == "top-secret-pass" and mailbox.smtp_password == "smtp-secret"


def test_admin_changelist_with_many_emails_opens():
    client = _admin()
    for _ in range(3):
        box = MailboxFactory()
        for _ in range(5):
            make_email(box)
    assert client.get(reverse("admin:mailsync_mailbox_changelist")).status_code == 200


def test_admin_activating_a_second_mailbox_is_not_a_500():
    client = _admin()
    first = MailboxFactory(is_active=True)
    second = MailboxFactory(owner=first.owner, is_active=False)
    data = _form_data(client, second) | {"is_active": "on"}
    response = client.post(reverse("admin:mailsync_mailbox_change", args=[second.pk]), data)
    assert response.status_code in (200, 302)


def test_admin_excluded_domain_unshares_existing_mail():
    client = _admin()
    mailbox = MailboxFactory(sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=mailbox.owner, email="customer@client.example")
    email = make_email(mailbox, contact)
    EmailParticipant.objects.create(email=email, role="from", address="customer@client.example")
    data = _form_data(client, mailbox) | {"excluded_domains": "client.example"}
    response = client.post(reverse("admin:mailsync_mailbox_change", args=[mailbox.pk]), data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    mailbox.refresh_from_db()
    assert mailbox.excluded_domains.strip() == "client.example"
    email.refresh_from_db()
    assert email.shareable is False, "mail from an excluded domain is still shared after the admin edit"
