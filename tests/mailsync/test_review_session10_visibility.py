"""Review session 10: what colleagues and the pages see of synced mail. Known bugs, each
fixed with a test that failed before the fix. Against the private Dovecot and the real SMTP
test server; nothing is mocked.

Bugs found and fixed:
1. Bcc revealed itself to colleagues: a salesperson's mail with a CRM contact only in Bcc
   (the sender's copy keeps the header: a Sent-folder sync, or a mail sent from the CRM) was
   linked to that contact like any other, so a colleague who sees the contact (public
   mailbox) found the mail on the contact's page, under ``GET /api/v1/emails/?contact=``
   and in the email's ``links``: told the contact got a blind copy. Now such a link
   (``EmailLink.bcc_only``: no From/To/Cc/Reply-To match of the record's addresses, not put
   on the record by the user) exists for the mailbox's owner only; for everyone else the
   mail is not on that record and does not become visible through it. Existing links are
   marked by migration 0015 where the stored participants show a Bcc-only match.
2. A copy of a mail marked \\Deleted on the IMAP server (deleted in a mail program, not
   expunged yet) still showed among the email's folders (API ``folders``, the email page's
   current folders) and found it under ``?folder=``, though the mail does not show from
   there (a mail whose every copy is so marked is a hidden tombstone).
"""
from __future__ import annotations

import importlib

import pytest
from django.apps import apps
from django.test import Client
from rest_framework.test import APIClient

from crm import services as crm_services
from crm.models import Contact
from mailsync.models import Email, EmailLink, EmailParticipant, Mailbox
from tests.factories import (
    ContactFactory,
    DealFactory,
    MailboxFactory,
    RecordShareFactory,
    UserFactory,
)
from tests.mailsync.conftest import filed_by_another_program, imap_sync, make_message

pytestmark = pytest.mark.django_db


def api_for(user) -> APIClient:  # noqa: ANN001
    client = APIClient()
    client.force_authenticate(user)
    return client


def page_for(user) -> Client:  # noqa: ANN001
    client = Client()
    client.force_login(user)
    return client


def listed(client: APIClient, **params) -> list[str]:  # noqa: ANN003
    response = client.get("/api/v1/emails/", params)
    assert response.status_code == 200, response.content
    return sorted(e["subject"] for e in response.json()["results"])


def with_bcc(raw: bytes, bcc: str) -> bytes:
    return raw.replace(b"Subject:", f"Bcc: {bcc}\r\nSubject:".encode(), 1)


# == 1. Bcc =====================================================================================

@pytest.fixture
def team(imap_mailbox: Mailbox):
    """A salesperson's public mailbox; a buyer and the buyer's boss (with a deal) as contacts
    of theirs, shared with a colleague who therefore sees both contacts and the deal."""
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(sharing=Mailbox.Sharing.PUBLIC)
    imap_mailbox.refresh_from_db()
    owner, colleague = imap_mailbox.owner, UserFactory()
    buyer = ContactFactory(owner=owner, email="buyer@client.example")
    boss = ContactFactory(owner=owner, email="boss@client.example")
    deal = DealFactory(owner=owner, contact=boss)
    for record in (buyer, boss, deal):
        RecordShareFactory(record=record, user=colleague)
    return imap_mailbox, colleague, buyer, boss, deal


def test_a_contact_only_in_bcc_of_sent_mail_is_not_shown_to_colleagues(dovecot, mail_user, team):
    """BUG (fixed). Given a salesperson's public mailbox and a colleague who sees the buyer,
    the buyer's boss and the boss's deal; when the salesperson's Sent folder syncs a quote
    to the buyer with the boss in Bcc, and a note to someone unknown with the boss in Bcc,
    then the colleague sees the quote on the buyer but neither mail on the boss's contact or
    deal (API list, record page), the quote's ``links`` and email page name only the buyer,
    and the note is not visible to the colleague at all; the salesperson still sees both on
    the boss, and the Bcc-only links in ``links``."""
    mailbox, colleague, buyer, boss, deal = team
    me = mail_user.email
    dovecot.append(mail_user, "Sent", with_bcc(make_message(
        sender=f"Me <{me}>", to="Buyer <buyer@client.example>", subject="Quote"),
        "Boss <boss@client.example>"), flags=["\\Seen"])
    dovecot.append(mail_user, "Sent", with_bcc(make_message(
        sender=f"Me <{me}>", to="someone@else.example", subject="Note"),
        "boss@client.example"), flags=["\\Seen"])
    imap_sync(mailbox)
    quote = Email.objects.get(mailbox=mailbox, subject="Quote")
    note = Email.objects.get(mailbox=mailbox, subject="Note")

    theirs, mine = api_for(colleague), api_for(mailbox.owner)
    assert listed(theirs, contact=buyer.pk) == ["Quote"]
    assert listed(theirs, contact=boss.pk) == []
    assert listed(theirs, deal=deal.pk) == []
    assert listed(theirs) == ["Quote"]  # the note is visible through nothing
    assert theirs.get(f"/api/v1/emails/{note.pk}/").status_code == 404
    assert theirs.get(f"/api/v1/emails/{quote.pk}/").json()["links"] == [
        {"lead": None, "contact": buyer.pk, "deal": None}]
    # ... nor on the pages
    browser = page_for(colleague)
    boss_page = browser.get(f"/mail/records/contact/{boss.pk}/").content.decode()
    assert "Quote" not in boss_page and "Note" not in boss_page
    assert "Quote" in browser.get(f"/mail/records/contact/{buyer.pk}/").content.decode()
    email_page = browser.get(f"/mail/{quote.pk}/").content.decode()
    assert buyer.get_absolute_url() in email_page and boss.get_absolute_url() not in email_page

    # The salesperson sees everything.
    assert listed(mine, contact=boss.pk) == ["Note", "Quote"]
    assert listed(mine, deal=deal.pk) == ["Note", "Quote"]
    links = mine.get(f"/api/v1/emails/{quote.pk}/").json()["links"]
    assert {(link["contact"], link["deal"]) for link in links} == {
        (buyer.pk, None), (boss.pk, None), (None, deal.pk)}
    assert "Quote" in page_for(mailbox.owner).get(f"/mail/records/contact/{boss.pk}/").content.decode()


def test_a_contact_created_later_gets_bcc_mail_for_the_owner_only(dovecot, mail_user, team):
    """BUG (fixed). Given a synced Sent mail with an address only in Bcc and To someone
    unknown; when a colleague (or anyone) later adds that address as a contact, and a deal
    for it, then the past mail attaches to both for the salesperson only: the colleague who
    sees the new contact and deal does not find it there, nor sees the mail at all. When
    the same person later writes themselves (From), that mail is on the contact for all."""
    mailbox, colleague, *_ = team
    me = mail_user.email
    dovecot.append(mail_user, "Sent", with_bcc(make_message(
        sender=f"Me <{me}>", to="someone@else.example", subject="Blind"),
        "cfo@client.example"), flags=["\\Seen"])
    imap_sync(mailbox)

    cfo = crm_services.record_create(actor=mailbox.owner, model=Contact,
                                     data={"last_name": "Cfo", "email": "CFO@client.example"})
    deal = DealFactory(owner=mailbox.owner, contact=cfo)
    from mailsync.association import email_associate_record
    email_associate_record(record=deal)
    for record in (cfo, deal):
        RecordShareFactory(record=record, user=colleague)

    theirs, mine = api_for(colleague), api_for(mailbox.owner)
    assert listed(mine, contact=cfo.pk) == ["Blind"] and listed(mine, deal=deal.pk) == ["Blind"]
    assert listed(theirs, contact=cfo.pk) == [] and listed(theirs, deal=deal.pk) == []
    assert listed(theirs) == []

    dovecot.deliver(mail_user, make_message(sender="CFO <cfo@client.example>", to=me,
                                            subject="Thanks"))
    imap_sync(mailbox)
    assert listed(theirs, contact=cfo.pk) == ["Thanks"]
    assert listed(mine, contact=cfo.pk) == ["Blind", "Thanks"]


@pytest.fixture
def sending_box(team, smtp_outbox):
    mailbox = team[0]
    mailbox.smtp_host, mailbox.smtp_port = smtp_outbox.host, smtp_outbox.port
    mailbox.smtp_security = "starttls"
    mailbox.smtp_username, mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    mailbox.save()
    return team


def test_a_contact_bcc_d_on_mail_sent_from_the_crm_is_not_shown_to_colleagues(
        sending_box, smtp_outbox, django_capture_on_commit_callbacks):
    """BUG (fixed). Given a public mailbox; when the salesperson sends a quote from the
    buyer's page with the boss in Bcc, then a colleague who sees both contacts finds it on
    the buyer, not on the boss nor the boss's deal, also after the Sent-folder copy is
    synced; the salesperson finds it on all three. And a mail sent from the boss's own page
    with the boss only in Bcc is on the boss for the colleague too: the user put it there."""
    mailbox, colleague, buyer, boss, deal = sending_box
    owner = api_for(mailbox.owner)
    for subject, record in (("Quote", buyer), ("Heads-up", boss)):
        with django_capture_on_commit_callbacks(execute=True):
            response = owner.post("/api/v1/emails/send/", {
                "from_address": mailbox.email_address, "to": "buyer@client.example",
                "bcc": "boss@client.example", "subject": subject, "text": "x",
                "contact": record.pk}, format="json")
        assert response.status_code == 202, response.content
    smtp_outbox.wait_for(2)

    theirs = api_for(colleague)
    for _ in range(2):  # as sent, then with the Sent-folder copies synced
        assert listed(theirs, contact=buyer.pk) == ["Heads-up", "Quote"]
        assert listed(theirs, contact=boss.pk) == ["Heads-up"]
        assert listed(theirs, deal=deal.pk) == []
        assert listed(owner, contact=boss.pk) == ["Heads-up", "Quote"]
        assert listed(owner, deal=deal.pk) == ["Heads-up", "Quote"]
        imap_sync(mailbox)
    quote = Email.objects.get(mailbox=mailbox, subject="Quote")
    assert theirs.get(f"/api/v1/emails/{quote.pk}/").json()["links"] == [
        {"lead": None, "contact": buyer.pk, "deal": None}]


def test_an_address_corrected_on_a_contact_keeps_its_bcc_mail_from_colleagues():
    """BUG (fixed). Given a mail To the buyer with the boss's private address in Bcc, and a
    contact of the boss saved with the buyer's address by mistake and the private one as
    secondary (so the mail was on it for everyone); when the mistaken address is removed,
    then the mail stays on the contact for the salesperson, but a colleague no longer finds
    it there (the boss only had it in Bcc); when the boss's address from To is added back
    as it should be, the colleague finds it again."""
    from mailsync.association import emails_associate

    owner, colleague = UserFactory(), UserFactory()
    mailbox = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    boss = ContactFactory(owner=owner, email="buyer@client.example", secondary_email="boss@home.example")
    RecordShareFactory(record=boss, user=colleague)
    email = Email.objects.create(mailbox=mailbox, fingerprint="fp", content_hash="h", subject="Quote",
                                 direction="sent", shareable=True)
    for role, address in (("from", mailbox.email_address), ("to", "buyer@client.example"),
                          ("bcc", "boss@home.example")):
        EmailParticipant.objects.create(email=email, role=role, address=address)
    emails_associate(email_ids=[email.pk], exclude_addresses=[mailbox.email_address])
    theirs, mine = api_for(colleague), api_for(owner)
    assert listed(theirs, contact=boss.pk) == ["Quote"]

    crm_services.record_update(actor=owner, record=boss, data={"email": ""})
    assert listed(mine, contact=boss.pk) == ["Quote"]
    assert listed(theirs, contact=boss.pk) == []

    crm_services.record_update(actor=owner, record=boss, data={"email": "BUYER@client.example"})
    assert listed(theirs, contact=boss.pk) == ["Quote"]


def test_the_migration_marks_existing_bcc_only_links():
    """BUG (fixed), for mail stored before the fix. Given links written before the flag
    existed; when migration 0015 runs, then a contact's link whose mail has the contact only
    in Bcc, and the link of that contact's deal, become Bcc-only; a contact in To (also in
    Bcc), and mail sent from the CRM (the record may be the one it was sent from), stay
    shown."""
    migration = importlib.import_module("mailsync.migrations.0015_emaillink_bcc_only")
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    boss = ContactFactory(owner=owner, email="Boss@Client.example")
    buyer = ContactFactory(owner=owner, email="x@client.example", secondary_email="buyer@client.example")
    deal = DealFactory(owner=owner, contact=boss)

    def mail(subject: str, source: str = Email.Source.SYNC, **roles: str) -> Email:
        email = Email.objects.create(mailbox=mailbox, fingerprint=subject, content_hash=subject,
                                     subject=subject, direction="sent", source=source)
        for role, address in roles.items():
            EmailParticipant.objects.create(email=email, role=role, address=address)
        return email

    blind = mail("Blind", to="buyer@client.example", bcc="boss@client.example")
    both = mail("Both", to="boss@client.example", bcc="boss@client.example")
    sent = mail("Sent", source=Email.Source.CRM, bcc="boss@client.example")
    for email in (blind, both, sent):
        EmailLink.objects.create(email=email, contact=boss)
        EmailLink.objects.create(email=email, deal=deal)
    EmailLink.objects.create(email=blind, contact=buyer)

    migration.forwards(apps, None)

    hidden = set(EmailLink.objects.filter(bcc_only=True).values_list("email__subject", "contact", "deal"))
    assert hidden == {("Blind", boss.pk, None), ("Blind", None, deal.pk)}


# == 2. copies marked \Deleted ====================================================================

def test_a_copy_marked_deleted_is_not_among_the_folders_nor_found_by_folder(dovecot, mail_user, imap_mailbox):
    """BUG (fixed). Given a mail in INBOX that the user filed into "Projects" with a mail
    program in "mark as deleted" mode (a copy in Projects, the INBOX copy flagged \\Deleted,
    not expunged); when the CRM syncs, then the API lists its folders as Projects only,
    ``?folder=inbox`` no longer finds it while ``?folder=Projects`` does, and the email page
    shows it in Projects, not in INBOX."""
    email = filed_by_another_program(dovecot, mail_user, imap_mailbox, "Filed")
    assert email.deleted_at is None

    api = api_for(imap_mailbox.owner)
    assert api.get(f"/api/v1/emails/{email.pk}/").json()["folders"] == ["Projects"]
    assert [e["folders"] for e in api.get("/api/v1/emails/").json()["results"]] == [["Projects"]]
    assert listed(api, folder="inbox") == []
    assert listed(api, folder="Projects") == ["Filed"]
    page = page_for(imap_mailbox.owner).get(f"/mail/{email.pk}/").content.decode()
    assert '<span class="muted">· Projects</span>' in page
