"""The compose page stops reading attachments at the 18 MB limit: a larger upload is refused
with the form's message, nothing is sent, and the web process never holds it (before, the
view read every uploaded file into memory, then refused: a 2 GB upload took 2 GB). CSRF is
still enforced (the limit has to be set before the CSRF check reads the body, so the view
checks CSRF itself). Real SMTP server; the page through Django's test client."""
from __future__ import annotations

import os
import tracemalloc

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client, RequestFactory

from mailsync import sending, views
from mailsync.models import Email, Mailbox

pytestmark = pytest.mark.django_db

MB = 1024 * 1024


@pytest.fixture
def box(imap_mailbox: Mailbox, smtp_outbox) -> Mailbox:  # noqa: ANN001
    imap_mailbox.smtp_host, imap_mailbox.smtp_port = smtp_outbox.host, smtp_outbox.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username, imap_mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    imap_mailbox.save()
    return imap_mailbox


def _fields(page: Client, box: Mailbox, **extra: object) -> dict:
    form = page.get("/mail/compose/").context["form"]
    return {"from_address": box.email_address, "to": "grace@navy.example", "subject": "Quote",
            "html": "<p>Our quote.</p>", "token": form.initial["token"], **extra}


def test_an_upload_over_the_limit_is_refused_with_the_forms_message_and_nothing_is_sent(
        box, smtp_outbox, django_capture_on_commit_callbacks):
    page = Client()
    page.force_login(box.owner)
    big = SimpleUploadedFile("scan.pdf", b"%PDF" + b"\0" * (sending.MAX_ATTACHMENTS_BYTES + MB),
                             content_type="application/pdf")
    with django_capture_on_commit_callbacks(execute=True):
        shown = page.post("/mail/compose/", _fields(page, box, attachments=[big]))
    assert shown.status_code == 200
    assert "at most 18 MB" in str(shown.context["form"].errors["attachments"])
    assert "Our quote." in shown.content.decode()  # what was typed is still there
    assert not Email.objects.filter(mailbox=box).exists() and smtp_outbox.messages == []

    small = SimpleUploadedFile("quote.pdf", b"%PDF-1.4 small", content_type="application/pdf")
    with django_capture_on_commit_callbacks(execute=True):
        done = page.post("/mail/compose/", _fields(page, box, attachments=[small]))
    assert done.status_code == 302, done.content[:2000]
    sent = Email.objects.get(mailbox=box)
    assert [a.filename for a in sent.attachments.all()] == ["quote.pdf"]
    assert len(smtp_outbox.wait_for(1)) == 1


def test_the_refused_upload_is_never_held_in_memory(box):
    """40 MB of a real file's kind of bytes uploaded: the view's process allocates a few MB
    at most while it reads and refuses it (the request body itself is built before the
    measurement; before, the view read it all: ~80 MB). (Django reads what follows the cut
    by lines: bytes with no line break at all would pass through memory in one piece.)"""
    page = Client()
    page.force_login(box.owner)
    fields = _fields(page, box)
    request = RequestFactory().post("/mail/compose/", {
        **fields, "attachments": SimpleUploadedFile("huge.bin", os.urandom(40 * MB))})
    request.user = box.owner
    request._dont_enforce_csrf_checks = True  # as the test client does
    tracemalloc.start()
    try:
        response = views.compose_view(request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200
    assert peak < 8 * MB, f"{peak / MB:.0f} MB allocated while refusing a 40 MB upload"


def test_csrf_is_still_checked_on_the_compose_page(box, smtp_outbox):
    page = Client(enforce_csrf_checks=True)
    page.force_login(box.owner)
    refused = page.post("/mail/compose/", _fields(page, box))
    assert refused.status_code == 403
    assert smtp_outbox.messages == [] and not Email.objects.filter(mailbox=box).exists()
