"""Review probes (session 9) of what users see of their mail through the REST API, the pages
and the Django admin: filters, visibility, association, secrets, the schema.

Real PostgreSQL and the private Dovecot; mail rows are written directly where the sync itself
is not what is under test (as tests/mailsync/test_api_contract.py does).

Bugs found and fixed (each test says which):
- The Django admin saved a mailbox's excluded domains, folders and size limits unchecked:
  "a.example, b.example" was one "domain" matching no mail (mail of both stayed shared with
  colleagues), folders "INBOX" (a string) or [1, 2], a size limit of 1 byte.
- "Add as lead/contact" on a sent mail addressed to yourself (a note with the customers in
  Bcc) or with only Cc/Bcc recipients made a record of the salesperson's own address: it
  never gets any mail and the customer's mail stays unmatched.
"""
from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from crm.models import Contact, Lead
from mailsync import services
from mailsync.models import Email, EmailLink, Mailbox
from tests.factories import AdministratorFactory, ContactFactory, MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message
from tests.mailsync.test_api_contract import mk_email
from tests.mailsync.test_mailboxes_admin import _form_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def api():
    return APIClient(raise_request_exception=False)


def sync(mailbox: Mailbox) -> None:
    """What "Sync now" runs: the sync, then body parsing (its follow-up task)."""
    services.mailbox_sync(mailbox_id=mailbox.pk)
    services.emails_parse_pending(mailbox_id=mailbox.pk)


def _admin() -> Client:
    c = Client()
    c.force_login(AdministratorFactory())
    return c


# -- the Django admin: a mailbox's sharing and sync options ------------------------------------

def test_admin_refuses_excluded_domains_that_would_exclude_nothing_and_normalizes_good_ones(api):
    """BUG (fixed). An administrator lists a salesperson's excluded domains in the admin as
    one comma-separated line. Given: a public mailbox with a customer's mail from
    partner.example on a contact a colleague can see. When: the admin saves
    "partner.example, bank.example". Then: the form refuses it (as the mailbox page and the
    API do) instead of saving one "domain" that matches no mail while the colleague keeps
    seeing the partner's mail; "@Partner.Example" on its own line is saved normalized and
    hides the mail from the colleague at once."""
    owner, colleague = UserFactory(), UserFactory()
    mailbox = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=colleague, email="lawyer@partner.example")
    email = mk_email(mailbox, from_address="lawyer@partner.example")
    email.participants.create(role="from", address="lawyer@partner.example")
    EmailLink.objects.create(email=email, contact=contact)
    api.force_authenticate(colleague)
    assert api.get(f"/api/v1/emails/{email.pk}/").status_code == 200

    admin = _admin()
    url = reverse("admin:mailsync_mailbox_change", args=[mailbox.pk])
    response = admin.post(url, _form_data(admin, mailbox) | {
        "excluded_domains": "partner.example, bank.example"})
    assert response.status_code == 200, "saved a list that excludes nothing"
    assert "excluded_domains" in response.context["adminform"].form.errors
    mailbox.refresh_from_db()
    assert mailbox.excluded_domains == ""

    response = admin.post(url, _form_data(admin, mailbox) | {
        "excluded_domains": "@Partner.Example\r\nbank.example"})
    assert response.status_code == 302, response.context["adminform"].form.errors
    mailbox.refresh_from_db()
    assert mailbox.excluded_domains == "partner.example\nbank.example"
    assert api.get(f"/api/v1/emails/{email.pk}/").status_code == 404


@pytest.mark.parametrize("field, value", [
    ("folders", '"INBOX"'), ("folders", '{"INBOX": true}'), ("folders", "[1, 2]"),
    ("max_message_bytes", "1"), ("pop3_keep_days", "0"),
])
def test_admin_refuses_folders_and_limits_the_api_refuses(field, value):
    """BUG (fixed). Given a mailbox, when an administrator saves folders that are not a list
    of names (a bare "INBOX" was synced as the folders I, N, B, O, X) or a size limit or
    keep-days outside what the API and the page accept, then the admin form shows an error
    on that field and the mailbox keeps its settings."""
    mailbox = MailboxFactory(protocol="pop3", incoming_port=995, pop3_delete_after_download=False,
                             pop3_keep_days=30)
    before = getattr(mailbox, field)
    admin = _admin()
    response = admin.post(reverse("admin:mailsync_mailbox_change", args=[mailbox.pk]),
                          _form_data(admin, mailbox) | {field: value})
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    mailbox.refresh_from_db()
    assert getattr(mailbox, field) == before


# -- pages: "Add as lead / contact" from the unmatched mail ------------------------------------

def test_add_as_contact_on_a_note_to_self_with_the_customer_in_bcc_adds_the_customer(
        dovecot, mail_user, imap_mailbox):
    """BUG (fixed). A salesperson sends a note to themselves with the customer in Bcc (a
    common way to write to several customers), so the sent mail shows in "Mail not on any
    record". Given that mail synced from the Sent folder, when they click "Add as contact",
    then the contact is the customer (not their own address, which never matches any mail)
    and the mail is on it at once."""
    me = mail_user.email
    raw = make_message(sender=f"Me <{me}>", to=f"Me <{me}>", subject="Spring prices").replace(
        b"Subject:", b"Bcc: Ada Lovelace <ada@client.example>\r\nSubject:", 1)
    dovecot.append(mail_user, "Sent", raw, flags=["\\Seen"])
    sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox, subject="Spring prices")
    assert email.direction == Email.Direction.SENT
    client = Client()
    client.force_login(imap_mailbox.owner)
    assert "Spring prices" in client.get("/mail/").content.decode()

    response = client.post(f"/mail/{email.pk}/add-record/", {"kind": "contact"})
    assert response.status_code == 302
    contact = Contact.objects.get(owner=imap_mailbox.owner)
    assert contact.email.lower() == "ada@client.example"
    assert (contact.first_name, contact.last_name) == ("Ada", "Lovelace")
    assert EmailLink.objects.filter(contact=contact, email=email).exists()
    assert "Spring prices" not in client.get("/mail/").content.decode()


def test_add_as_lead_on_sent_mail_with_only_cc_takes_the_cc_and_never_your_own_address():
    """BUG (fixed). Given a sent mail with no To, only a Cc, and one with nobody but the
    owner's own addresses on it, when "Add as lead" is clicked: the first becomes a lead of
    the Cc'd person with the mail on it; the second creates no lead of the owner and says
    why."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, email_address="sales@crm.example")
    mailbox.aliases.create(address="info@crm.example")
    cc_only = mk_email(mailbox, direction="sent", from_address="sales@crm.example", to=[],
                       cc=[{"name": "Grace Hopper", "email": "grace@navy.example"}], subject="Cc only")
    cc_only.participants.create(role="from", address="sales@crm.example")
    cc_only.participants.create(role="cc", name="Grace Hopper", address="grace@navy.example")
    own_only = mk_email(mailbox, direction="sent", from_address="sales@crm.example",
                        to=[{"name": "", "email": "Info@crm.example"}], subject="Own only")
    client = Client()
    client.force_login(owner)

    client.post(f"/mail/{cc_only.pk}/add-record/", {"kind": "lead"})
    lead = Lead.objects.get(owner=owner)
    assert (lead.first_name, lead.last_name, lead.email) == ("Grace", "Hopper", "grace@navy.example")
    assert EmailLink.objects.filter(lead=lead, email=cc_only).exists()

    response = client.post(f"/mail/{own_only.pk}/add-record/", {"kind": "lead"}, follow=True)
    assert Lead.objects.filter(owner=owner).count() == 1
    assert "no one but you" in response.content.decode()


# -- excluded domains: internationalized domain names -------------------------------------------

def test_excluded_domains_accept_internationalized_domains_and_hide_their_mail(api, dovecot, mail_user,
                                                                              imap_mailbox):
    """BUG (fixed). A salesperson excludes their bank, банк.рф, whose mail arrives from
    manager@xn--80ab2al.xn--p1ai (the ASCII form mail headers carry). The API (and the
    page) answered "Not a domain" for both spellings: no domain under an internationalized
    top-level domain (.рф, .中国, ...) could be excluded. Given a public mailbox with that
    bank's mail on a contact a colleague sees, when the owner excludes "Банк.рф", then it
    is stored in its ASCII form, the colleague no longer sees the mail, and mail synced
    afterwards from that domain, in either spelling, is hidden as well."""
    owner, colleague = imap_mailbox.owner, UserFactory()
    imap_mailbox.sharing = Mailbox.Sharing.PUBLIC
    imap_mailbox.save()
    ContactFactory(owner=colleague, email="manager@xn--80ab2al.xn--p1ai", secondary_email="")
    dovecot.deliver(mail_user, make_message(sender="Manager <manager@xn--80ab2al.xn--p1ai>",
                                            to=mail_user.email, subject="Statement"))
    sync(imap_mailbox)
    api.force_authenticate(colleague)
    assert [e["subject"] for e in api.get("/api/v1/emails/").json()["results"]] == ["Statement"]

    api.force_authenticate(owner)
    for spelling in ("Банк.рф", "xn--80ab2al.xn--p1ai"):
        response = api.patch(f"/api/v1/mailboxes/{imap_mailbox.pk}/",
                             {"excluded_domains": spelling}, format="json")
        assert response.status_code == 200, response.json()
        assert response.json()["excluded_domains"] == "xn--80ab2al.xn--p1ai"
    api.force_authenticate(colleague)
    assert api.get("/api/v1/emails/").json()["count"] == 0

    later = make_message(sender="Manager <manager@xn--80ab2al.xn--p1ai>", to=mail_user.email,
                         subject="Later statement")
    dovecot.deliver(mail_user, later)
    sync(imap_mailbox)
    assert Email.objects.get(mailbox=imap_mailbox, subject="Later statement").shareable is False
    assert api.get("/api/v1/emails/").json()["count"] == 0
    # The Unicode spelling (mail of SMTPUTF8 senders) is the same domain.
    assert "банк.рф" in Mailbox.objects.get(pk=imap_mailbox.pk).excluded_domain_set


def test_the_mailbox_page_accepts_an_internationalized_excluded_domain():
    """BUG (fixed). The options form of the mailbox page refused "bücher.example" and
    "shop.xn--p1ai"; both are saved, in ASCII (IDNA) form."""
    from mailsync.forms import MailboxOptionsForm

    mailbox = MailboxFactory()
    form = MailboxOptionsForm({"sharing": "public", "excluded_domains": "Bücher.example\nshop.xn--p1ai",
                               "folders": "INBOX"}, mailbox=mailbox)
    assert form.is_valid(), form.errors
    assert form.cleaned_data["excluded_domains"] == "xn--bcher-kva.example\nshop.xn--p1ai"
    bad = MailboxOptionsForm({"sharing": "public", "excluded_domains": "not a domain",
                              "folders": "INBOX"}, mailbox=mailbox)
    assert not bad.is_valid() and "excluded_domains" in bad.errors


def test_admin_does_not_show_the_particulars_of_mail_of_an_excluded_domain(dovecot, mail_user,
                                                                           imap_mailbox):
    """BUG (fixed). A salesperson excludes their bank's domain: "mail from or to it is never
    shared". Given such mail synced (and an ordinary mail), when an administrator (not the
    mailbox owner) opens the Email list of the Django admin, searches it by a word of the
    subject, or opens the mail, then the subject, the addresses and the Message-ID of the
    bank's mail are not shown and the word finds nothing; the mail is still listed (found by
    its mailbox) with its places and state, for troubleshooting, and ordinary mail is shown
    as before."""
    imap_mailbox.sharing = Mailbox.Sharing.PUBLIC
    imap_mailbox.excluded_domains = "bank.example"
    imap_mailbox.save()
    dovecot.deliver(mail_user, make_message(sender="Loans <loans@bank.example>", to=mail_user.email,
                                            subject="Mortgage offer 4.1%",
                                            message_id="<offer-77@bank.example>"))
    dovecot.deliver(mail_user, make_message(sender="Buyer <buyer@client.example>", to=mail_user.email,
                                            subject="Quote for ACME"))
    sync(imap_mailbox)
    secret = Email.objects.get(mailbox=imap_mailbox, shareable=False)
    admin = _admin()
    changelist = reverse("admin:mailsync_email_changelist")

    listing = admin.get(changelist).content.decode()
    assert "Quote for ACME" in listing and "Mortgage offer" not in listing
    assert "bank.example" not in listing
    assert "Mortgage offer" not in admin.get(changelist, {"q": "Mortgage"}).content.decode()
    assert admin.get(changelist, {"q": "Mortgage"}).context["cl"].result_count == 0
    by_mailbox = admin.get(changelist, {"q": imap_mailbox.email_address})
    assert by_mailbox.context["cl"].result_count == 2
    assert "Mortgage offer" not in by_mailbox.content.decode()

    page = admin.get(reverse("admin:mailsync_email_change", args=[secret.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "Mortgage offer" not in html and "bank.example" not in html
    assert "INBOX" in html  # its place on the server, to troubleshoot

    # The owner of the mailbox, an administrator too, sees their own mail in full.
    owner = imap_mailbox.owner
    owner.is_staff = owner.is_superuser = True
    owner.save()
    own = Client()
    own.force_login(owner)
    assert "Mortgage offer" in own.get(changelist, {"q": "Mortgage"}).content.decode()


# -- the OpenAPI schema against real answers -----------------------------------------------------

def test_schema_documents_the_409s_of_deleting_and_syncing_a_mailbox(api):
    """BUG (fixed). The README says deleting a mailbox that holds mail, or syncing an inactive
    one, is a 409; the schema listed only 204 and 202, so a client generated from it had no
    type for those answers. Given such a mailbox, when it is deleted and synced, then each
    answer is a documented 409 whose keys the schema names."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, is_active=False)
    mk_email(mailbox)
    api.force_authenticate(owner)
    paths = api.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    components = paths["components"]["schemas"]
    paths = paths["paths"]
    for method, path, url in (
            ("delete", "/api/v1/mailboxes/{id}/", f"/api/v1/mailboxes/{mailbox.pk}/"),
            ("post", "/api/v1/mailboxes/{id}/sync/", f"/api/v1/mailboxes/{mailbox.pk}/sync/")):
        documented = paths[path][method]["responses"]
        assert "409" in documented, (method, path, list(documented))
        ref = documented["409"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        response = getattr(api, method)(url)
        assert response.status_code == 409, response.content
        body = response.json()
        assert set(components[ref]["required"]) <= set(body) <= set(components[ref]["properties"])
    assert Mailbox.objects.filter(pk=mailbox.pk).exists()
