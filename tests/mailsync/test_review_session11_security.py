"""Review session 11: security and privacy of the REST API, the mail pages and the Django
admin. Real PostgreSQL; mail rows are written directly where the sync is not under test.

Bugs found and fixed (each test says which):
1. A Bcc travelled to a colleague through a reply: a salesperson's mail sent from the CRM
   with a customer's boss in Bcc was on the boss for its sender only, but a reply to it
   stored in a colleague's mailbox (the colleague answering it from the CRM, or the
   customer answering with the colleague in Cc) inherited that Bcc-only link. The
   colleague, owner of that copy, then found the reply on the boss's page and among its
   ``links``: told the boss got a blind copy of the first mail.
2. The Django admin hid the subject and addresses of mail of an excluded domain from
   operators, and found it by no word of them in the search box, but a filter in the
   address (``?subject__icontains=``, ``?from_address__iendswith=``, ``?text__icontains=``)
   still found it: an oracle over the hidden particulars, and over the bodies of anyone's
   mail, which the admin never shows.
"""
from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from mailsync.models import Attachment, AttachmentBlob, Email, EmailLink, EmailParticipant, Mailbox
from mailsync.storage import compress
from tests.factories import (
    AdministratorFactory,
    ContactFactory,
    MailboxFactory,
    RecordShareFactory,
    UserFactory,
)
from tests.mailsync.test_api_contract import mk_email

pytestmark = pytest.mark.django_db


def api_for(user) -> APIClient:  # noqa: ANN001
    client = APIClient(raise_request_exception=False)
    client.force_authenticate(user)
    return client


def listed(client: APIClient, **params) -> list[str]:  # noqa: ANN003
    response = client.get("/api/v1/emails/", params)
    assert response.status_code == 200, response.content
    return sorted(e["subject"] for e in response.json()["results"])


@pytest.fixture
def team():
    """Alice's public mailbox (with an outgoing server: nothing is delivered, the tests do
    not run the commit hooks), Bob's too; a buyer and the buyer's boss, Alice's contacts,
    shared with Bob."""
    alice, bob = UserFactory(), UserFactory()
    alices = MailboxFactory(owner=alice, sharing=Mailbox.Sharing.PUBLIC, is_active=True,
                            smtp_host="127.0.0.1", smtp_port=587)
    bobs = MailboxFactory(owner=bob, sharing=Mailbox.Sharing.PUBLIC, is_active=True,
                          smtp_host="127.0.0.1", smtp_port=587)
    buyer = ContactFactory(owner=alice, email="buyer@client.example")
    boss = ContactFactory(owner=alice, email="boss@client.example")
    for record in (buyer, boss):
        RecordShareFactory(record=record, user=bob)
    return alices, bobs, buyer, boss


def test_a_reply_in_a_colleagues_mailbox_does_not_inherit_a_bcc_only_record(team):
    """BUG 1 (fixed). Given Alice's quote sent from the buyer's page To the buyer with the
    boss in Bcc (on the boss for Alice only); when Bob, who sees both contacts, answers it
    from the CRM, and the buyer's answer with Bob in Cc reaches Bob's mailbox, then Bob finds
    neither on the boss's page nor the boss among their links; both are on the buyer."""
    alices, bobs, buyer, boss = team
    alice, bob = api_for(alices.owner), api_for(bobs.owner)
    sent = alice.post("/api/v1/emails/send/", {
        "from_address": alices.email_address, "to": "buyer@client.example",
        "bcc": "boss@client.example", "subject": "Quote", "text": "x", "contact": buyer.pk},
        format="json")
    assert sent.status_code == 202, sent.content
    quote = Email.objects.get(pk=sent.json()["id"])
    assert listed(alice, contact=boss.pk) == ["Quote"]
    assert listed(bob, contact=boss.pk) == []

    reply = bob.post("/api/v1/emails/send/", {
        "from_address": bobs.email_address, "to": "buyer@client.example", "subject": "Re: Quote",
        "text": "y", "in_reply_to": quote.pk}, format="json")
    assert reply.status_code == 202, reply.content

    # The buyer answers all: the copy that reaches Bob's mailbox quotes Alice's Message-ID.
    from mailsync.association import emails_associate

    answer = mk_email(bobs, subject="Re: Quote (buyer)", from_address="buyer@client.example",
                      in_reply_to=quote.message_id, references=[quote.message_id],
                      to=[{"name": "", "email": alices.email_address}],
                      cc=[{"name": "", "email": bobs.email_address}], shareable=True)
    for role, address in (("from", "buyer@client.example"), ("to", alices.email_address),
                          ("cc", bobs.email_address)):
        EmailParticipant.objects.create(email=answer, role=role, address=address)
    emails_associate(email_ids=[answer.pk], exclude_addresses=[bobs.email_address])

    assert listed(bob, contact=boss.pk) == []
    assert listed(bob, contact=buyer.pk) == ["Quote", "Re: Quote", "Re: Quote (buyer)"]
    for email_id in (reply.json()["id"], answer.pk):
        links = bob.get(f"/api/v1/emails/{email_id}/").json()["links"]
        assert {"lead": None, "contact": boss.pk, "deal": None} not in links, links
        assert {"lead": None, "contact": buyer.pk, "deal": None} in links, links
    # Alice still has her own quote on the boss.
    assert listed(alice, contact=boss.pk) == ["Quote"]


def test_admin_url_filters_find_no_hidden_particulars_nor_bodies():
    """BUG 2 (fixed). Given a public mailbox that excludes its owner's bank, with the bank's
    mail and an ordinary one; when an administrator (not the owner) filters the admin's Email
    list through the address by a word of the hidden subject, the bank's domain in the
    sender, or a word of a body, then that is refused (400) instead of telling which mail
    matches; the filters of the sidebar and the mailbox filter still work."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC, excluded_domains="bank.example")
    mk_email(mailbox, subject="Mortgage offer 4.1%", from_address="loans@bank.example",
             message_id="offer-77@bank.example", text="Your salary of 91,000", shareable=False)
    mk_email(mailbox, subject="Quote for ACME", text="Hello")
    admin = Client(raise_request_exception=False)
    admin.force_login(AdministratorFactory())
    changelist = reverse("admin:mailsync_email_changelist")

    for lookup, value in (("subject__icontains", "Mortgage"), ("subject__startswith", "M"),
                          ("from_address__iendswith", "bank.example"), ("to__icontains", "bank"),
                          ("text__icontains", "salary"), ("html__icontains", "salary"),
                          ("message_id__contains", "bank"), ("participants__address__contains", "bank"),
                          ("mailbox__emails__subject__icontains", "Mortgage"),
                          ("thread__key__contains", "bank")):
        response = admin.get(changelist, {lookup: value})
        assert response.status_code == 400, (lookup, response.status_code)

    assert admin.get(changelist, {"direction__exact": "received"}).context["cl"].result_count == 2
    assert admin.get(changelist, {"mailbox__id__exact": mailbox.pk}).context["cl"].result_count == 2
    assert admin.get(changelist, {"shareable__exact": "0"}).context["cl"].result_count == 1


def test_colleague_cannot_download_attachments_of_hidden_or_deleted_public_mail(team):
    """Probe (no bug): a colleague who sees a public mail downloads its attachment; not that
    of mail of an excluded domain on the same shared contact, nor of a mail deleted since,
    through the API or the pages; nor ``?thread=`` shows the hidden mail."""
    alices, bobs, buyer, boss = team
    Mailbox.objects.filter(pk=alices.pk).update(excluded_domains="bank.example")
    blob = AttachmentBlob.objects.create(sha256="e" * 64, data=compress(b"secret"), size=6)
    shown = mk_email(alices, subject="Shown", shareable=True)
    hidden = mk_email(alices, subject="Hidden", shareable=False, cc=[{"name": "", "email": "x@bank.example"}],
                      thread=None)
    deleted = mk_email(alices, subject="Deleted", shareable=True)
    attachments = {}
    for email in (shown, hidden, deleted):
        EmailLink.objects.create(email=email, contact=buyer)
        attachments[email.subject] = Attachment.objects.create(
            email=email, blob=blob, filename="a.pdf", content_type="application/pdf", size=6)
    from django.utils import timezone

    Email.objects.filter(pk=deleted.pk).update(deleted_at=timezone.now())
    bob = api_for(bobs.owner)
    page = Client()
    page.force_login(bobs.owner)
    assert listed(bob, contact=buyer.pk) == ["Shown"]
    for email in (shown, hidden, deleted):
        a = attachments[email.subject]
        expected = 200 if email is shown else 404
        assert bob.get(f"/api/v1/emails/{email.pk}/attachments/{a.pk}/").status_code == expected
        assert page.get(f"/mail/{email.pk}/attachments/{a.pk}/").status_code == expected
        # Another mail's attachment through a mail one may see: never.
        if email is not shown:
            assert bob.get(f"/api/v1/emails/{shown.pk}/attachments/{a.pk}/").status_code == 404


def test_a_deactivated_user_reads_no_mail_by_session_or_token(team):
    """Probe (no bug): a salesperson deactivated in the Django admin (the checkbox, which
    keeps their API token) reaches none of their own mail any more, by the API (token or
    session) or the pages; their public mail stays on the shared contact for a colleague."""
    from rest_framework.authtoken.models import Token

    alices, bobs, buyer, _ = team
    email = mk_email(alices, subject="Mine", shareable=True)
    EmailLink.objects.create(email=email, contact=buyer)
    token = Token.objects.create(user=alices.owner)
    page = Client()
    page.force_login(alices.owner)
    session_api = APIClient()
    session_api.force_login(alices.owner)
    alices.owner.is_active = False
    alices.owner.save()

    by_token = APIClient().get("/api/v1/emails/", HTTP_AUTHORIZATION=f"Token {token.key}")
    assert by_token.status_code == 401
    assert session_api.get(f"/api/v1/emails/{email.pk}/").status_code in (401, 403)
    assert page.get(f"/mail/{email.pk}/").status_code == 302  # to the login page
    assert listed(api_for(bobs.owner), contact=buyer.pk) == ["Mine"]
