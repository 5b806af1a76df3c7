"""Review probes (session 10) of the REST API and the records' mail: what a salesperson or an
integrator notices of a record's mail list, attachment links, error bodies, large uploads and
a contact's corrected address.

Real PostgreSQL, the private Dovecot and the test SMTP server; mail rows are written directly
where the sync itself is not what is under test (as tests/mailsync/test_api_contract.py does).

Bugs found and fixed (each test says which):
- ``GET /api/v1/emails/?contact=`` (``lead``, ``deal``) listed each mailbox's copy of one
  mail: a customer's mail received by two colleagues' public mailboxes, or in two of the
  user's own mailboxes, was listed twice (and counted twice), while the record's page lists
  it once. Now one entry per message, the user's own copy where there is one.
- The API's attachment download ignored ``?inline=1``: the ``cid:`` images of the sanitized
  HTML (which link there with ``inline=1``) came as application/octet-stream downloads, so a
  client showing the API's html showed broken images. Now as the email page's attachment
  view: a PNG/JPEG/GIF/WebP image inline with its type, anything else (an SVG too) still a
  download, always ``nosniff``.
- An error inside a list field (one item of ``attachments``) came in the JSON body as a
  Python repr, "{0: [ErrorDetail(string='The submitted data was not a file...',
  code='invalid')]}". Now keyed by the item's path, ``attachments[0]``, with clean messages.
- ``POST /api/v1/emails/send/`` stored a too-large upload whole (on disk) and read it whole
  into memory before refusing it for the 18 MB limit. Now refused (400, JSON, saying the
  limit) as soon as the files pass the limit, without reading the rest.
- A contact's (or lead's) address corrected (or removed) kept the mail linked by the old
  address on the contact and its deals, shown to everyone the contact is shared with. Now
  that mail leaves it (mail of an address it still has, and mail sent from the CRM, stay)
  and the new address's mail comes.
"""
from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid

import pytest
from django.core.files import uploadhandler
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from crm import services as crm_services
from crm.models import Lead
from mailsync import sending, services
from mailsync.models import Email, EmailLink, EmailParticipant, Mailbox
from tests.factories import (AdministratorFactory, ContactFactory, DealFactory, LeadFactory,
                             MailboxFactory, UserFactory)
from tests.mailsync.conftest import make_message
from tests.mailsync.test_api_contract import mk_email
from tests.mailsync.test_association_records import mail  # a synced mail, as the sync writes it
from tests.mailsync.test_review_session9_api import api, sync  # noqa: F401 (api: a fixture)

pytestmark = pytest.mark.django_db




def copies(mailboxes: list[Mailbox], *, record: dict, subject: str, fingerprint: str) -> list[Email]:
    """One customer mail as each mailbox's sync stores it: one row per mailbox, one
    fingerprint, each linked to the record."""
    emails = []
    for mailbox in mailboxes:
        email = mk_email(mailbox, subject=subject, fingerprint=fingerprint)
        EmailLink.objects.create(email=email, **record)
        emails.append(email)
    return emails


def listed(api: APIClient, url: str) -> list[dict]:
    """Every item of a list, following ``next`` as given."""
    items: list[dict] = []
    while url:
        response = api.get(url)
        assert response.status_code == 200, response.content
        body = response.json()
        items += body["results"]
        url = body["next"]
    return items


# -- 1. a record's mail: each message once ---------------------------------------------------

def test_contact_filter_lists_a_mail_received_by_two_public_mailboxes_once_as_the_page(api):
    """BUG (fixed). Given a customer's mails received by two colleagues' public mailboxes
    (each mailbox stores its copy) on a contact a third colleague can see, and one of them
    also in the viewer's own mailbox, when they list ``/api/v1/emails/?contact=<id>``, then
    each mail is listed once (``count`` too, and paging over it), as on the contact's page;
    the viewer's own copy where they have one. ``mailbox=`` with the contact still finds that
    mailbox's copy; the unfiltered list lists every copy, as each mailbox's pages do."""
    ana, ben, viewer = UserFactory(), UserFactory(), UserFactory()
    ana_box = MailboxFactory(owner=ana, sharing=Mailbox.Sharing.PUBLIC)
    ben_box = MailboxFactory(owner=ben, sharing=Mailbox.Sharing.PUBLIC)
    own_box = MailboxFactory(owner=viewer)
    contact = ContactFactory(owner=ana, email="buyer@customer.example")
    crm_services.record_share(actor=ana, record=contact, user=viewer)
    on_contact = {"contact": contact}
    copies([ana_box, ben_box], record=on_contact, subject="Order 1", fingerprint="fp-order-1")
    copies([ana_box, ben_box], record=on_contact, subject="Order 2", fingerprint="fp-order-2")
    *_, mine = copies([ana_box, ben_box, own_box], record=on_contact, subject="Order 3",
                      fingerprint="fp-order-3")
    api.force_authenticate(viewer)

    body = api.get(f"/api/v1/emails/?contact={contact.pk}").json()

    assert sorted(e["subject"] for e in body["results"]) == ["Order 1", "Order 2", "Order 3"]
    assert body["count"] == 3
    assert next(e for e in body["results"] if e["subject"] == "Order 3")["id"] == mine.pk
    # Paging by cursor and by number lists each mail once too
    walked = listed(api, f"/api/v1/emails/?contact={contact.pk}&page_size=2")
    assert sorted(e["subject"] for e in walked) == ["Order 1", "Order 2", "Order 3"]
    numbered = api.get(f"/api/v1/emails/?contact={contact.pk}&page_size=2&page=2").json()
    assert numbered["count"] == 3 and len(numbered["results"]) == 1
    # As the contact's page lists them
    page = Client()
    page.force_login(viewer)
    html = page.get(f"/mail/records/contact/{contact.pk}/").content.decode()
    assert [html.count(f"Order {n}") for n in (1, 2, 3)] == [1, 1, 1]
    # A mailbox asked for with the contact: that mailbox's copies
    ben_only = api.get(f"/api/v1/emails/?contact={contact.pk}&mailbox={ben_box.pk}").json()
    assert ben_only["count"] == 3
    assert {e["mailbox"] for e in ben_only["results"]} == {ben_box.pk}
    # Without a record filter: every copy the viewer may see (as before)
    assert api.get("/api/v1/emails/").json()["count"] == 7


def test_deal_filter_lists_a_mail_in_two_of_my_own_mailboxes_once():
    """BUG (fixed). Given a customer's mail in two of the salesperson's own mailboxes (a
    personal and a team one) on their deal, when they list ``?deal=<id>`` (and
    ``?lead=<id>`` for a lead), then it is there once."""
    owner = UserFactory()
    first, second = MailboxFactory(owner=owner), MailboxFactory(owner=owner)
    deal = DealFactory(owner=owner)
    copies([first, second], record={"deal": deal}, subject="Signed", fingerprint="fp-signed")
    lead = crm_services.record_create(actor=owner, model=Lead, data={"last_name": "Prospect"})
    copies([first, second], record={"lead": lead}, subject="Hello", fingerprint="fp-hello")
    api = APIClient()
    api.force_authenticate(owner)

    for url, subject in ((f"/api/v1/emails/?deal={deal.pk}", "Signed"),
                         (f"/api/v1/emails/?lead={lead.pk}", "Hello")):
        body = api.get(url).json()
        assert [e["subject"] for e in body["results"]] == [subject], url
        assert body["count"] == 1


# -- 2. inline images of the API's html ------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'


def test_cid_images_of_the_api_html_show_inline_but_other_files_still_download(
        api, dovecot, mail_user, imap_mailbox):
    """BUG (fixed). Given a synced HTML mail with an inline logo (PNG) and an inline SVG
    (which can run scripts), when an API client shows the detail's html, whose cid: images
    link to ``…/attachments/{id}/?inline=1``, then the logo comes as image/png, inline, with
    ``nosniff`` (it came as an octet-stream download: a broken image); the SVG, and any
    file without ``inline``, stays a download."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Buyer <buyer@customer.example>", mail_user.email, "Logo"
    msg["Message-ID"] = make_msgid(domain="customer.example")
    msg.set_content("See the logo.")
    msg.add_alternative('<p>Logo <img src="cid:logo@customer.example"> '
                        '<img src="cid:chart@customer.example"></p>', subtype="html")
    msg.get_payload()[1].add_related(PNG, "image", "png", cid="<logo@customer.example>")
    msg.get_payload()[1].add_related(SVG, "image", "svg+xml", cid="<chart@customer.example>")
    dovecot.deliver(mail_user, msg.as_bytes().replace(b"\n", b"\r\n"))
    sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox, subject="Logo")
    api.force_authenticate(imap_mailbox.owner)
    body = api.get(f"/api/v1/emails/{email.pk}/").json()
    logo = next(a for a in body["attachments"] if a["content_type"] == "image/png")
    chart = next(a for a in body["attachments"] if a["content_type"] == "image/svg+xml")
    logo_url = f"/api/v1/emails/{email.pk}/attachments/{logo['id']}/?inline=1"
    assert f'src="{logo_url}"' in body["html"]

    shown = api.get(logo_url)

    assert shown.status_code == 200
    assert shown.content == PNG
    assert shown["Content-Type"] == "image/png"
    assert shown["Content-Disposition"].startswith("inline")
    assert shown["X-Content-Type-Options"] == "nosniff"
    # The README's boolean values work as for ?images=
    assert api.get(logo_url.replace("inline=1", "inline=true"))["Content-Type"] == "image/png"
    for url in (f"/api/v1/emails/{email.pk}/attachments/{chart['id']}/?inline=1", logo["download_url"]):
        response = api.get(url)
        assert response.status_code == 200
        assert response["Content-Type"] == "application/octet-stream", url
        assert response["Content-Disposition"].startswith("attachment"), url
        assert response["X-Content-Type-Options"] == "nosniff"


def test_schema_documents_the_inline_parameter_of_attachment_downloads(api):
    """With the fix above: ``inline`` is in the OpenAPI schema of the download."""
    paths = api.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()["paths"]
    operation = paths["/api/v1/emails/{id}/attachments/{attachment_id}/"]["get"]
    assert "inline" in {p["name"] for p in operation["parameters"]}


# -- 3. errors inside a list field -----------------------------------------------------------

def test_an_error_in_one_attachment_is_clean_json_keyed_by_its_index(api):
    """BUG (fixed). Given an integrator who sends file names (not files) as ``attachments``,
    when they POST to ``/api/v1/emails/send/``, then the 400 names each bad item,
    ``attachments[0]``, ``attachments[1]``, with DRF's message; no Python repr
    ("{0: [ErrorDetail(string=...)]}") in ``detail`` or ``errors``."""
    api.force_authenticate(UserFactory())

    response = api.post("/api/v1/emails/send/", {
        "from_address": "me@example.test", "to": "grace@navy.example", "subject": "Files",
        "text": "x", "attachments": ["quote.pdf", "terms.pdf"]}, format="json")

    assert response.status_code == 400
    body = response.json()
    message = "The submitted data was not a file. Check the encoding type on the form."
    assert body["errors"] == {"attachments[0]": [message], "attachments[1]": [message]}
    assert body["detail"] == f"Invalid input: attachments[0]: {message}"
    assert "ErrorDetail" not in response.content.decode()


# -- 4. a too-large upload is refused while it arrives ----------------------------------------

@pytest.fixture
def box(imap_mailbox: Mailbox, smtp_outbox) -> Mailbox:
    imap_mailbox.smtp_host, imap_mailbox.smtp_port = smtp_outbox.host, smtp_outbox.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username, imap_mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    imap_mailbox.save()
    return imap_mailbox


def test_a_too_large_upload_is_refused_before_it_is_stored_and_read_whole(api, box, smtp_outbox,
                                                                           monkeypatch):
    """BUG (fixed). Given a salesperson's API client attaching a 26 MB file (two files of
    13 MB) while at most 18 MB may be sent, when it POSTs the mail, then the answer is a 400
    in JSON that says the limit, nothing is stored or sent, and the upload stops at the
    limit: Django's upload handlers store at most the limit, not the whole 26 MB (which was
    stored, then read into memory, before being refused)."""
    received = {}  # bytes each of Django's upload handlers got (the one that stores them)
    for handler in (uploadhandler.TemporaryFileUploadHandler, uploadhandler.MemoryFileUploadHandler):
        original = handler.receive_data_chunk

        def counting(self, raw_data, start, original=original):  # noqa: ANN001, ANN202
            received[type(self).__name__] = received.get(type(self).__name__, 0) + len(raw_data)
            return original(self, raw_data, start)

        monkeypatch.setattr(handler, "receive_data_chunk", counting)
    api.force_authenticate(box.owner)
    thirteen_mb = b"x" * (13 * 1024 * 1024)

    response = api.post("/api/v1/emails/send/", {
        "from_address": box.email_address, "to": "grace@navy.example", "subject": "Big",
        "text": "x", "attachments": [SimpleUploadedFile("a.bin", thirteen_mb),
                                     SimpleUploadedFile("b.bin", thirteen_mb)]},
        format="multipart")

    assert response.status_code == 400
    assert received["TemporaryFileUploadHandler"] <= sending.MAX_ATTACHMENTS_BYTES, received
    body = response.json()
    assert body["errors"] == {"attachments": [
        "Attachments may total at most 18 MB; these are larger."]}
    assert body["detail"].startswith("Invalid input: attachments: Attachments may total at most 18 MB")
    assert not Email.objects.filter(mailbox=box).exists() and smtp_outbox.messages == []


def test_attachments_within_the_limit_are_still_sent(api, box, smtp_outbox):
    """With the fix above: files that together stay within the limit are sent whole."""
    api.force_authenticate(box.owner)
    data = bytes(range(256)) * 4096  # 1 MB

    response = api.post("/api/v1/emails/send/", {
        "from_address": box.email_address, "to": "grace@navy.example", "subject": "Fits",
        "text": "x", "attachments": [SimpleUploadedFile("a.bin", data),
                                     SimpleUploadedFile("b.bin", data)]}, format="multipart")

    assert response.status_code == 202, response.content
    stored = Email.objects.get(pk=response.json()["id"])
    assert sorted((a.filename, a.size) for a in stored.attachments.all()) == [
        ("a.bin", len(data)), ("b.bin", len(data))]


# -- 5. a contact's address corrected ------------------------------------------------------

def _api_subjects(api: APIClient, **record) -> set[str]:
    (name, value), = record.items()
    return {e["subject"] for e in listed(api, f"/api/v1/emails/?{name}={value.pk}")}


def test_corrected_contact_address_takes_the_wrong_persons_mail_off_the_contact_and_its_deal(api):
    """BUG (fixed). Given a contact saved with the customer's generic address
    (info@customer.example) by mistake, shared with a colleague, with a deal: the mail of
    info@ is on the contact and the deal. When the salesperson corrects the address to
    jon@customer.example (API PATCH), then info@'s mail leaves the contact and the deal (for
    the colleague too), Jon's mail comes; a mail with both on it, and the mail sent from the
    CRM on the contact, stay."""
    owner, colleague = UserFactory(), UserFactory()
    mbx = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=owner, email="info@customer.example", account=None)
    deal = DealFactory(owner=owner, contact=contact)
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    mail(mbx, sender="info@customer.example", subject="Newsletter from info")
    mail(mbx, sender="jon@customer.example", subject="From Jon")
    mail(mbx, sender="info@customer.example", cc="jon@customer.example", subject="Info with Jon in Cc")
    sent = mk_email(mbx, direction="sent", source="crm", subject="Sent from the contact page",
                    from_address=mbx.email_address, to=[{"name": "", "email": "info@customer.example"}])
    EmailParticipant.objects.create(email=sent, role="to", address="info@customer.example")
    EmailLink.objects.create(email=sent, contact=contact)
    api.force_authenticate(owner)
    assert _api_subjects(api, contact=contact) == {
        "Newsletter from info", "Info with Jon in Cc", "Sent from the contact page"}
    assert "Newsletter from info" in _api_subjects(api, deal=deal)

    response = api.patch(f"/api/v1/contacts/{contact.pk}/", {"email": "Jon@Customer.Example"},
                         format="json")

    assert response.status_code == 200, response.content
    after = {"From Jon", "Info with Jon in Cc", "Sent from the contact page"}
    assert _api_subjects(api, contact=contact) == after
    assert _api_subjects(api, deal=deal) == {"From Jon", "Info with Jon in Cc"}
    api.force_authenticate(colleague)
    assert "Newsletter from info" not in _api_subjects(api, contact=contact)
    page = Client()
    page.force_login(owner)
    html = page.get(f"/mail/records/contact/{contact.pk}/").content.decode()
    assert "From Jon" in html and "Newsletter from info" not in html
    # The mail stays in the mailbox (on no record now)
    assert Email.objects.filter(subject="Newsletter from info", deleted_at__isnull=True).exists()


def test_corrected_address_on_the_edit_page_also_takes_the_replies_of_that_conversation(
        dovecot, mail_user, imap_mailbox):
    """BUG (fixed). Given a conversation with the wrong person (their mail and their
    colleague's reply in that thread, which joined the contact with it) synced from Dovecot,
    when the salesperson fixes the contact's address on the edit page, then the whole
    conversation leaves the contact, and the right person's mail is on it."""
    owner, me = imap_mailbox.owner, mail_user.email
    contact = ContactFactory(owner=owner, email="wrong@customer.example", account=None)
    dovecot.deliver(mail_user, make_message(sender="Wrong <wrong@customer.example>", to=me,
                                            subject="Not for you", message_id="<w1@customer.example>"))
    dovecot.deliver(mail_user, make_message(
        sender="Accounts <accounts@customer.example>", to=me, subject="Re: Not for you",
        message_id="<w2@customer.example>", in_reply_to="<w1@customer.example>",
        references="<w1@customer.example>"))
    dovecot.deliver(mail_user, make_message(sender="Right <right@customer.example>", to=me,
                                            subject="The real customer"))
    sync(imap_mailbox)
    on_contact = lambda: set(EmailLink.objects.filter(contact=contact)  # noqa: E731
                             .values_list("email__subject", flat=True))
    assert on_contact() == {"Not for you", "Re: Not for you"}
    page = Client()
    page.force_login(owner)

    response = page.post(reverse("contact-edit", args=[contact.pk]), {
        "first_name": contact.first_name, "last_name": contact.last_name,
        "email": "right@customer.example", "secondary_email": "", "owner": owner.pk})

    assert response.status_code == 302, response.content.decode()[:3000]
    assert on_contact() == {"The real customer"}


def test_address_corrected_in_the_admin_console_takes_the_old_addresss_mail_off_the_lead():
    """BUG (fixed), the same from the Django admin: an administrator corrects a lead's
    address; the old address's mail leaves the lead and the new one's comes."""
    admin = AdministratorFactory()
    mbx = MailboxFactory(owner=admin)
    lead = LeadFactory(owner=admin, email="old@customer.example")
    mail(mbx, sender="old@customer.example", subject="To the old address")
    mail(mbx, sender="new@customer.example", subject="From the new address")
    on_lead = lambda: set(EmailLink.objects.filter(lead=lead)  # noqa: E731
                          .values_list("email__subject", flat=True))
    assert on_lead() == {"To the old address"}
    page = Client()
    page.force_login(admin)
    prefix = "crm-recordshare-content_type-object_id"

    response = page.post(reverse("admin:crm_lead_change", args=[lead.pk]), {
        "owner": admin.pk, "first_name": lead.first_name, "last_name": lead.last_name,
        "email": "new@customer.example", "status": lead.status,
        f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0",
        f"{prefix}-MIN_NUM_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "1000"})

    assert response.status_code == 302, response.content.decode()[:3000]
    assert on_lead() == {"From the new address"}
