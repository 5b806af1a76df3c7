"""Association, threading and visibility of synced mail against the private Dovecot
(written as probes by a review; the ones that failed were fixed): the mailbox's own address
and aliases never match a record, also when a record is created later; replies join the
thread of a stored parent (In-Reply-To only, across INBOX and Sent); excluded domains;
replies to mail the CRM sent."""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from crm import services as crm_services
from crm.models import Contact, Lead
from mailsync import services
from mailsync.models import Email, EmailLink, Mailbox, MailboxAlias
from mailsync.selectors import emails_of_record, emails_unmatched, emails_visible_to
from mailsync.sync.imap import ImapSync
from tests.factories import ContactFactory, DealFactory, LeadFactory, UserFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


def sync(mailbox: Mailbox):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def threads_of(mailbox, subjects):
    return {s: Email.objects.get(mailbox=mailbox, subject=s).thread_id for s in subjects}


# -- own address and aliases -------------------------------------------------------------------

def test_alias_of_the_mailbox_never_makes_a_match(dovecot, mail_user, imap_mailbox):
    alias = "team.alias@crm.example.com"
    MailboxAlias.objects.create(mailbox=imap_mailbox, address=alias)
    # someone recorded the salesperson's alias as a lead (or a colleague's contact)
    lead = LeadFactory(owner=imap_mailbox.owner, email=alias)
    dovecot.deliver(mail_user, make_message(sender="Stranger <stranger@nowhere.example>",
                                            to=f"Team <{alias}>", subject="To the alias"))
    sync(imap_mailbox)
    linked = set(EmailLink.objects.filter(lead=lead).values_list("email__subject", flat=True))
    assert linked == set(), f"alias matched lead: {linked}"


def test_own_address_never_matches_even_when_a_record_is_created_later(dovecot, mail_user, imap_mailbox):
    # a contact carries the mailbox owner's own address (e.g. a colleague's CRM entry for them)
    me = ContactFactory(owner=imap_mailbox.owner, email=mail_user.email.upper())
    dovecot.deliver(mail_user, make_message(sender="Prospect <prospect@client.example>",
                                            to=mail_user.email, subject="Hello from prospect"))
    sync(imap_mailbox)
    assert not EmailLink.objects.filter(contact=me).exists()  # sync honours the rule

    # the user now adds the prospect as a lead (past mail attaches)
    lead = crm_services.record_create(actor=imap_mailbox.owner, model=Lead,
                                      data={"last_name": "Prospect", "email": "prospect@client.example"})
    assert EmailLink.objects.filter(lead=lead).count() == 1
    linked = list(EmailLink.objects.filter(contact=me).values_list("email__subject", flat=True))
    assert linked == [], f"own-address contact got mail when another record was created: {linked}"


def test_record_created_with_the_owners_address_gets_no_mail(dovecot, mail_user, imap_mailbox):
    for i in range(3):
        dovecot.deliver(mail_user, make_message(sender=f"P{i} <p{i}@client.example>",
                                                to=mail_user.email, subject=f"Inbound {i}"))
    sync(imap_mailbox)
    lead = crm_services.record_create(actor=imap_mailbox.owner, model=Lead,
                                      data={"last_name": "Me", "email": mail_user.email})
    n = EmailLink.objects.filter(lead=lead).count()
    assert n == 0, f"lead with the mailbox owner's own address got {n} mails"


# -- threading -------------------------------------------------------------------------------

def test_reply_with_only_in_reply_to_joins_the_thread_of_a_stored_parent(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Project", message_id="<root@client.example>"))
    dovecot.deliver(mail_user, make_message(subject="Re: Project", message_id="<parent@client.example>",
                                            in_reply_to="<root@client.example>",
                                            references="<root@client.example>"))
    sync(imap_mailbox)
    # a client that sets only In-Reply-To, replying to the (already stored) parent
    dovecot.deliver(mail_user, make_message(subject="Re: Re: Project", message_id="<child@client.example>",
                                            in_reply_to="<parent@client.example>"))
    sync(imap_mailbox)
    t = threads_of(imap_mailbox, ["Project", "Re: Project", "Re: Re: Project"])
    assert len(set(t.values())) == 1, t


def test_reply_in_inbox_to_our_mail_in_sent_joins_the_conversation(dovecot, mail_user, imap_mailbox):
    me = mail_user.email
    dovecot.deliver(mail_user, make_message(sender="Buyer <buyer@client.example>", to=me,
                                            subject="Need a quote", message_id="<q1@client.example>"))
    dovecot.append(mail_user, "Sent", make_message(
        sender=f"Me <{me}>", to="buyer@client.example", subject="Re: Need a quote",
        message_id="<ans1@crm.example.com>", in_reply_to="<q1@client.example>",
        references="<q1@client.example>"), flags=["\\Seen"])
    sync(imap_mailbox)
    dovecot.deliver(mail_user, make_message(sender="Buyer <buyer@client.example>", to=me,
                                            subject="Re: Re: Need a quote",
                                            message_id="<q2@client.example>",
                                            in_reply_to="<ans1@crm.example.com>"))
    sync(imap_mailbox)
    t = threads_of(imap_mailbox, ["Need a quote", "Re: Need a quote", "Re: Re: Need a quote"])
    assert len(set(t.values())) == 1, t


def test_healing_in_one_batch_child_before_parent(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="C", message_id="<c@x.example>", in_reply_to="<b@x.example>"))
    dovecot.deliver(mail_user, make_message(subject="B", message_id="<b@x.example>", in_reply_to="<a@x.example>",
                                            references="<a@x.example>"))
    dovecot.deliver(mail_user, make_message(subject="A", message_id="<a@x.example>"))
    sync(imap_mailbox)
    t = threads_of(imap_mailbox, ["A", "B", "C"])
    assert len(set(t.values())) == 1, t


def test_healing_chain_over_three_syncs(dovecot, mail_user, imap_mailbox):
    # D (irt C) arrives, then C (irt B), then B (root)
    dovecot.deliver(mail_user, make_message(subject="D", message_id="<d@y.example>", in_reply_to="<c@y.example>"))
    sync(imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="C", message_id="<c@y.example>", in_reply_to="<b@y.example>"))
    sync(imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="B", message_id="<b@y.example>"))
    sync(imap_mailbox)
    t = threads_of(imap_mailbox, ["B", "C", "D"])
    assert len(set(t.values())) == 1, t


# -- unmatched mail and records created later -------------------------------------------------

def test_unmatched_then_contact_created_through_the_api_attaches_past_mail(dovecot, mail_user, imap_mailbox):
    colleague = UserFactory()
    dovecot.deliver(mail_user, make_message(sender="New <New.Person@Client.Example>", subject="Intro"))
    sync(imap_mailbox)
    intro = Email.objects.get(subject="Intro")
    assert list(emails_unmatched(user=imap_mailbox.owner)) == [intro]
    assert not emails_visible_to(colleague).filter(pk=intro.pk).exists()
    api = APIClient()
    api.force_authenticate(imap_mailbox.owner)
    r = api.post("/api/v1/contacts/", {"last_name": "Person", "email": "new.person@client.example"},
                 format="json")
    assert r.status_code == 201, r.content
    contact = Contact.objects.get(pk=r.json()["id"])
    assert EmailLink.objects.filter(contact=contact, email=intro).exists()
    assert list(emails_unmatched(user=imap_mailbox.owner)) == []
    # private mailbox: the colleague still sees nothing even with the contact shared
    crm_services.record_share(actor=imap_mailbox.owner, record=contact, user=colleague)
    assert not emails_visible_to(colleague).filter(pk=intro.pk).exists()


def test_contact_email_change_old_and_new_mail(dovecot, mail_user, imap_mailbox):
    contact = ContactFactory(owner=imap_mailbox.owner, email="old@client.example")
    deal = DealFactory(owner=imap_mailbox.owner, contact=contact)
    dovecot.deliver(mail_user, make_message(sender="O <old@client.example>", subject="From old"))
    dovecot.deliver(mail_user, make_message(sender="N <new@client.example>", subject="From new"))
    sync(imap_mailbox)
    crm_services.record_update(actor=imap_mailbox.owner, record=contact, data={"email": "new@client.example"})
    on_contact = set(EmailLink.objects.filter(contact=contact).values_list("email__subject", flat=True))
    on_deal = set(EmailLink.objects.filter(deal=deal).values_list("email__subject", flat=True))
    print("PROBE contact:", on_contact, "deal:", on_deal)
    assert "From new" in on_contact and "From new" in on_deal
    # later mail of the old address must no longer attach
    dovecot.deliver(mail_user, make_message(sender="O <old@client.example>", subject="Old again"))
    sync(imap_mailbox)
    assert not EmailLink.objects.filter(contact=contact, email__subject="Old again").exists()


# -- public mailbox, excluded domains ---------------------------------------------------------

def test_excluded_domain_subdomain_and_case_hide_mail_from_colleagues(dovecot, mail_user, imap_mailbox):
    imap_mailbox.sharing = Mailbox.Sharing.PUBLIC
    imap_mailbox.excluded_domains = "  @Partner.Example  \n"
    imap_mailbox.save()
    owner, colleague = imap_mailbox.owner, UserFactory()
    contact = ContactFactory(owner=owner, email="buyer@customer.example")
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    me = mail_user.email
    dovecot.deliver(mail_user, make_message(sender="L <Lawyer@EU.PARTNER.example>", to=me,
                                            subject="Sub-domain", attachment=("a.pdf", b"%PDF-1", "application/pdf"))
                    .replace(b"Subject:", b"Cc: buyer@customer.example\r\nSubject:", 1))
    dovecot.deliver(mail_user, make_message(sender="B <buyer@customer.example>", to=me,
                                            subject="Plain").replace(
        b"Subject:", b"Cc: someone@notpartner.example\r\nSubject:", 1))
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    services.emails_parse_pending(mailbox_id=imap_mailbox.pk)
    hidden, plain = Email.objects.get(subject="Sub-domain"), Email.objects.get(subject="Plain")
    assert EmailLink.objects.filter(email=hidden, contact=contact).exists()
    api = APIClient()
    api.force_authenticate(colleague)
    assert {e["subject"] for e in api.get("/api/v1/emails/").json()["results"]} == {"Plain"}
    assert api.get(f"/api/v1/emails/{hidden.pk}/").status_code == 404
    att = hidden.attachments.first()
    assert att is not None
    assert api.get(f"/api/v1/emails/{hidden.pk}/attachments/{att.pk}/").status_code == 404
    assert [e.subject for e in emails_of_record(user=colleague, record=contact)] == ["Plain"]
    api.force_authenticate(owner)
    assert api.get(f"/api/v1/emails/{hidden.pk}/attachments/{att.pk}/").status_code == 200
    assert plain.shareable is True


def test_private_mailbox_attachment_and_record_list_hidden_from_colleague(dovecot, mail_user, imap_mailbox):
    owner, colleague = imap_mailbox.owner, UserFactory()
    contact = ContactFactory(owner=owner, email="buyer@customer.example")
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    dovecot.deliver(mail_user, make_message(sender="B <buyer@customer.example>", subject="Private one",
                                            attachment=("x.pdf", b"%PDF-secret", "application/pdf")))
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    services.emails_parse_pending(mailbox_id=imap_mailbox.pk)
    mail = Email.objects.get(subject="Private one")
    att = mail.attachments.first()
    api = APIClient()
    api.force_authenticate(colleague)
    assert api.get(f"/api/v1/emails/{mail.pk}/attachments/{att.pk}/").status_code == 404
    assert api.get(f"/api/v1/emails/?contact={contact.pk}").json()["count"] == 0
    assert list(emails_of_record(user=colleague, record=contact)) == []
    from django.test import Client
    c = Client()
    c.force_login(colleague)
    assert c.get(f"/mail/{mail.pk}/attachments/{att.pk}/").status_code == 404
    assert "Private one" not in c.get(f"/mail/records/contact/{contact.pk}/").content.decode()


# -- CRM-sent mail and replies ----------------------------------------------------------------

def test_reply_quoting_crm_id_only_in_references_links_exactly(dovecot, mail_user, imap_mailbox):
    lead = LeadFactory(owner=imap_mailbox.owner, email="lead@prospect.example")
    other = LeadFactory(owner=imap_mailbox.owner, email="other@prospect.example")
    mid = f"crm.lead.{lead.pk}.00112233445566778899@crm.example.com"
    sent = Email.objects.create(mailbox=imap_mailbox, fingerprint="probe-sent", message_id=mid,
                                content_hash="x", direction="sent", source="crm", subject="Offer")
    EmailLink.objects.create(email=sent, lead=lead)
    # an assistant replies, quoting our id only in References (after another message)
    dovecot.deliver(mail_user, make_message(
        sender="Assistant <assistant@elsewhere.example>", subject="Re: Offer",
        in_reply_to="<intermediate@elsewhere.example>",
        references=f"<{mid}> <intermediate@elsewhere.example>"))
    sync(imap_mailbox)
    reply = Email.objects.get(subject="Re: Offer")
    assert set(EmailLink.objects.filter(email=reply).values_list("lead", flat=True)) == {lead.pk}
    assert not EmailLink.objects.filter(lead=other).exists()
