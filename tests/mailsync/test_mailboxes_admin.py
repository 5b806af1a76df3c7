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


def test_admin_shows_emails_and_their_errors_read_only_without_bodies():
    """The third face on the same models: an operator finds a mail (by subject, sender,
    Message-ID or mailbox), sees its places and state, but neither its body nor a way to
    change or delete it by hand (that goes through the CRM, which reaches the server)."""
    from mailsync.models import EmailLocation, MailFolder, MessageError

    client = _admin()
    box = MailboxFactory()
    email = make_email(box, subject="Quote for ACME", text="Secret price list: 42 EUR")
    folder = MailFolder.objects.create(mailbox=box, name="INBOX", uidvalidity=7)
    EmailLocation.objects.create(email=email, folder=folder, uidvalidity=7, uid=123, flags=["\\Seen"])
    MessageError.objects.create(mailbox=box, folder=folder, uidvalidity=7, uid=124, error="Could not store this message: x")

    listing = client.get(reverse("admin:mailsync_email_changelist"), {"q": "ACME"})
    assert listing.status_code == 200 and "Quote for ACME" in listing.content.decode()
    assert "Quote for ACME" not in client.get(reverse("admin:mailsync_email_changelist"),
                                              {"q": "nothing-like-it"}).content.decode()
    page = client.get(reverse("admin:mailsync_email_change", args=[email.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "Quote for ACME" in html and "123" in html
    assert "Secret price list" not in html
    assert client.get(reverse("admin:mailsync_email_add")).status_code == 403
    assert client.post(reverse("admin:mailsync_email_delete", args=[email.pk]), {"post": "yes"}).status_code == 403
    assert client.post(reverse("admin:mailsync_email_change", args=[email.pk]), {"subject": "x"}).status_code == 403
    errors = client.get(reverse("admin:mailsync_messageerror_changelist"))
    assert errors.status_code == 200 and "Could not store this message" in errors.content.decode()
