"""POST /api/v1/emails/send/: the compose fields and checks over the API."""
from __future__ import annotations

import email
import email.policy

import pytest
from rest_framework.test import APIClient

from mailsync.models import Email
from tests.factories import ContactFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def sender_mailbox(imap_mailbox, smtp_outbox):
    imap_mailbox.smtp_host, imap_mailbox.smtp_port = smtp_outbox.host, smtp_outbox.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username, imap_mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    imap_mailbox.save()
    return imap_mailbox


@pytest.fixture
def api(sender_mailbox):
    client = APIClient()
    client.force_authenticate(sender_mailbox.owner)
    return client


def test_send_over_the_api_with_an_attachment(api, sender_mailbox, smtp_outbox,
                                              django_capture_on_commit_callbacks):
    contact = ContactFactory(owner=sender_mailbox.owner, email="grace@navy.example")
    from django.core.files.uploadedfile import SimpleUploadedFile

    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": sender_mailbox.email_address, "to": "grace@navy.example",
            "subject": "Quote", "html": "<p>Attached.</p>", "contact": contact.pk,
            "attachments": [SimpleUploadedFile("quote.txt", b"42", content_type="text/plain")],
        }, format="multipart")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["send_state"] == "sending"  # as stored; delivered after the commit
    assert body["links"] == [{"lead": None, "contact": contact.pk, "deal": None}]
    assert [a["filename"] for a in body["attachments"]] == ["quote.txt"]
    assert Email.objects.get(pk=body["id"]).send_state == "sent"
    message = email.message_from_bytes(smtp_outbox.wait_for(1)[0].raw, policy=email.policy.default)
    assert message["Message-ID"].startswith(f"<crm.contact.{contact.pk}.")

    listed = api.get(f"/api/v1/emails/?contact={contact.pk}").json()
    assert listed["results"][0]["send_state"] == "sent"


@pytest.mark.parametrize("payload, field", [
    ({"to": ["a@b.example"], "subject": "x\r\nBcc: evil@x.example"}, "subject"),
    ({"to": ["a@b.example\nBcc: evil@x.example"], "subject": "x"}, "to"),
    ({"to": "not an address", "subject": "x"}, "to"),
    ({"to": [], "subject": "x"}, "to"),
    ({"to": ["a@b.example"], "subject": "x", "from_address": "boss@elsewhere.example"}, "from_address"),
    ({"to": ["a@b.example"], "subject": "x", "contact": 999999}, "contact"),
    ({"to": ["a@b.example"], "subject": "x", "in_reply_to": 999999}, "in_reply_to"),
])
def test_send_refuses_bad_input_with_400(api, sender_mailbox, smtp_outbox, payload, field):
    data = {"from_address": sender_mailbox.email_address, "text": "body", **payload}
    response = api.post("/api/v1/emails/send/", data, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert not Email.objects.filter(source="crm").exists()
    assert smtp_outbox.messages == []


def test_failed_send_can_be_retried_over_the_api(api, sender_mailbox, smtp_outbox,
                                                 django_capture_on_commit_callbacks):
    sender_mailbox.smtp_password = "wrong"
    sender_mailbox.save()
    with django_capture_on_commit_callbacks(execute=True):
        sent = api.post("/api/v1/emails/send/", {"from_address": sender_mailbox.email_address,
                                                 "to": ["a@b.example"], "subject": "x", "text": "y"},
                        format="json").json()
    failed = api.get(f"/api/v1/emails/{sent['id']}/").json()
    assert failed["send_state"] == "failed" and "password" in failed["send_error"]
    sender_mailbox.smtp_password = smtp_outbox.password
    sender_mailbox.save()
    with django_capture_on_commit_callbacks(execute=True):
        retried = api.post(f"/api/v1/emails/{sent['id']}/retry-send/")
    assert retried.status_code == 202
    assert api.get(f"/api/v1/emails/{sent['id']}/").json()["send_state"] == "sent"
    assert api.post(f"/api/v1/emails/{sent['id']}/retry-send/").status_code == 400
    assert len(smtp_outbox.messages) == 1


def test_a_request_repeated_with_the_same_idempotency_key_sends_once(
        api, sender_mailbox, smtp_outbox, django_capture_on_commit_callbacks):
    """A client that retries after a timeout (the first request did go through) sends the
    mail once: the repeat returns the first request's email. Another key is another mail."""
    payload = {"from_address": sender_mailbox.email_address, "to": ["grace@navy.example"],
               "subject": "Quote", "html": "<p>Hello</p>"}
    with django_capture_on_commit_callbacks(execute=True):
        first = api.post("/api/v1/emails/send/", payload, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        again = api.post("/api/v1/emails/send/", payload, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    smtp_outbox.wait_for(1)
    with django_capture_on_commit_callbacks(execute=True):
        other = api.post("/api/v1/emails/send/", payload, format="json", HTTP_IDEMPOTENCY_KEY="k-2")
    assert other.json()["id"] != first.json()["id"]
    smtp_outbox.wait_for(2)
    assert Email.objects.filter(subject="Quote").count() == 2
    assert len(smtp_outbox.messages) == 2


def test_the_compose_form_sent_twice_sends_once(sender_mailbox, smtp_outbox, django_capture_on_commit_callbacks):
    """The same compose form posted twice (a second click on Send while the first is on its
    way, a resubmit after Back): one email on the record, one delivery (found by a probe:
    nothing stopped the second)."""
    import re

    from django.test import Client

    contact = ContactFactory(owner=sender_mailbox.owner, email="grace@navy.example")
    client = Client()
    client.force_login(sender_mailbox.owner)
    page = client.get(f"/mail/compose/?record=contact:{contact.pk}").content.decode()
    token = re.search(r'name="token" value="([^"]+)"', page).group(1)
    form = {"record": f"contact:{contact.pk}", "token": token, "from_address": sender_mailbox.email_address,
            "to": "grace@navy.example", "subject": "Offer", "html": "<p>Our offer.</p>"}
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post("/mail/compose/", form).status_code == 302
        assert client.post("/mail/compose/", form).status_code == 302
    smtp_outbox.wait_for(1)
    assert Email.objects.filter(subject="Offer").count() == 1
    assert len(smtp_outbox.messages) == 1
    # A new form is a new mail
    fresh = client.get(f"/mail/compose/?record=contact:{contact.pk}").content.decode()
    assert re.search(r'name="token" value="([^"]+)"', fresh).group(1) != token
