"""Review session 11: association and threads (written as probes; real Dovecot and
PostgreSQL, the sync as a worker runs it; CRM-sent mail written as ``sending`` stores it).

Bugs found and fixed:
1. A contact whose address has an internationalized domain, typed as mail programs show it
   ("anna@bücher.example"), got none of that customer's mail, which carries the ASCII form
   ("anna@xn--bcher-kva.example"); nor the other way round (SMTPUTF8 mail, a contact saved in
   the ASCII form). ``association.address_forms``: both spellings match.
2. A quote sent from one deal is that deal's alone, but it went onto the contact's other
   deals when a deal was created for the contact later, or when the contact was saved again
   (any edit: a new phone number). ``association.email_associate_record``.
"""
from __future__ import annotations

import pytest

from crm import services as crm_services
from crm.models import Contact, Deal
from mailsync.models import Email, EmailLink, Mailbox
from mailsync.selectors import emails_of_record, emails_visible_to, record_email_groups
from tests.factories import ContactFactory, DealFactory, MailboxFactory, RecordShareFactory, UserFactory
from tests.mailsync.conftest import imap_sync, make_message

pytestmark = pytest.mark.django_db


def subjects_on(**link) -> set[str]:  # noqa: ANN003
    return set(EmailLink.objects.filter(**link).values_list("email__subject", flat=True))


# -- addresses ---------------------------------------------------------------------------------

def test_idn_contact_typed_in_unicode_gets_mail_from_the_ascii_form(dovecot, mail_user, imap_mailbox):
    """BUG 1 (fixed). Given a contact saved as "anna@bücher.example"; when her mail comes
    (From in the ASCII form, as mail without SMTPUTF8 carries it), then it is on her contact."""
    contact = ContactFactory(owner=imap_mailbox.owner, email="anna@bücher.example")
    dovecot.deliver(mail_user, make_message(sender="Anna <anna@xn--bcher-kva.example>",
                                            to=mail_user.email, subject="IDN mail"))
    imap_sync(imap_mailbox)
    assert subjects_on(contact=contact) == {"IDN mail"}


def test_idn_contact_created_later_gets_past_mail(dovecot, mail_user, imap_mailbox):
    """BUG 1 (fixed), for a contact saved after the mail came."""
    dovecot.deliver(mail_user, make_message(sender="Anna <anna@xn--bcher-kva.example>",
                                            to=mail_user.email, subject="IDN before"))
    imap_sync(imap_mailbox)
    contact = crm_services.record_create(actor=imap_mailbox.owner, model=Contact,
                                         data={"last_name": "Anna", "email": "anna@bücher.example"})
    assert subjects_on(contact=contact) == {"IDN before"}


def test_display_name_that_looks_like_an_address_matches_nobody(dovecot, mail_user, imap_mailbox):
    """'"boss@bank.example" <evil@x.example>' is evil's mail, not the boss's."""
    boss = ContactFactory(owner=imap_mailbox.owner, email="boss@bank.example")
    dovecot.deliver(mail_user, make_message(sender='"boss@bank.example" <evil@x.example>',
                                            to=mail_user.email, subject="Spoof"))
    imap_sync(imap_mailbox)
    assert subjects_on(contact=boss) == set()


def test_idn_address_respelled_keeps_the_mail_and_a_new_address_takes_it_off(dovecot, mail_user, imap_mailbox):
    """BUG 1 (fixed), on address changes: the same address in its other spelling is the same
    person (the mail stays); another address takes the mail off."""
    owner = imap_mailbox.owner
    contact = ContactFactory(owner=owner, email="anna@bücher.example")
    dovecot.deliver(mail_user, make_message(sender="anna@xn--bcher-kva.example", to=mail_user.email,
                                            subject="IDN mail"))
    imap_sync(imap_mailbox)
    crm_services.record_update(actor=owner, record=contact, data={"email": "anna@xn--bcher-kva.example"})
    assert subjects_on(contact=contact) == {"IDN mail"}
    crm_services.record_update(actor=owner, record=contact, data={"email": "anna@books.example"})
    assert subjects_on(contact=contact) == set()


# -- sharing -----------------------------------------------------------------------------------

def test_colleague_counts_a_thread_mixing_public_and_excluded_mail(dovecot, mail_user, imap_mailbox):
    """A thread of a public mailbox whose reply has an excluded domain in To: a colleague
    sees and counts the first mail only; the owner both."""
    owner, colleague = imap_mailbox.owner, UserFactory()
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(sharing=Mailbox.Sharing.PUBLIC,
                                                      excluded_domains="lawyer.example")
    c = ContactFactory(owner=owner, email="c@client.example")
    RecordShareFactory(record=c, user=colleague)
    dovecot.deliver(mail_user, make_message(sender="c@client.example", to=mail_user.email,
                                            subject="Pub", message_id="<pub@client.example>"))
    dovecot.deliver(mail_user, make_message(sender="c@client.example", to=f"{mail_user.email}, x@LAWYER.example",
                                            subject="Re: Pub", message_id="<priv@client.example>",
                                            in_reply_to="<pub@client.example>", references="<pub@client.example>"))
    imap_sync(imap_mailbox)
    groups = list(record_email_groups(user=colleague, record=c))
    assert [g["count"] for g in groups] == [1]
    assert {e.subject for e in emails_visible_to(colleague)} == {"Pub"}
    assert [g["count"] for g in record_email_groups(user=owner, record=c)] == [2]


# -- mail sent from a deal -----------------------------------------------------------------------------------

def crm_sent(mailbox: Mailbox, record, *, subject: str, to: str, extra_links=()) -> Email:  # noqa: ANN001
    """A mail sent from ``record`` in the CRM, as sending stores it (its Message-ID names it)."""
    kind = record._meta.model_name
    mid = f"crm.{kind}.{record.pk}.{Email.objects.count():020x}@crm.example.com"
    e = Email.objects.create(mailbox=mailbox, fingerprint=f"crm-{mid}", message_id=mid, content_hash="x",
                             direction="sent", source="crm", subject=subject,
                             to=[{"name": "", "email": to}])
    e.participants.create(role="to", address=to)
    EmailLink.objects.create(email=e, **{kind: record})
    for link in extra_links:
        EmailLink.objects.create(email=e, **link)
    return e


def test_contact_deleted_and_created_again_gets_the_conversation_back(dovecot, mail_user, imap_mailbox):
    """Deleted, then created again (address in another case): its mail and the reply of the
    customer's colleague in that conversation come back, with no new download."""
    owner = imap_mailbox.owner
    c = ContactFactory(owner=owner, email="c@client.example")
    dovecot.deliver(mail_user, make_message(sender="c@client.example", to=mail_user.email, subject="Ask",
                                            message_id="<ask@client.example>"))
    dovecot.deliver(mail_user, make_message(sender="colleague@client.example", to=mail_user.email,
                                            subject="Re: Ask", in_reply_to="<ask@client.example>",
                                            references="<ask@client.example>"))
    imap_sync(imap_mailbox)
    assert subjects_on(contact=c) == {"Ask", "Re: Ask"}
    crm_services.record_delete(actor=owner, record=c)
    again = crm_services.record_create(actor=owner, model=Contact,
                                       data={"last_name": "C", "email": "C@Client.example"})
    assert {e.subject for e in emails_of_record(user=owner, record=again)} == {"Ask", "Re: Ask"}


def test_a_quote_sent_from_a_deal_stays_off_a_deal_created_later_for_the_contact():
    """BUG 2 (fixed). Given a renewal quote sent from the renewal deal; when a new project
    deal is opened for the same contact, then the quote is not listed on the project."""
    owner = UserFactory()
    box = MailboxFactory(owner=owner)
    c = ContactFactory(owner=owner, email="grace@navy.example")
    renewal = DealFactory(owner=owner, contact=c)
    crm_sent(box, renewal, subject="Renewal quote", to="grace@navy.example", extra_links=[{"contact": c}])
    project = crm_services.record_create(actor=owner, model=Deal, data={
        "name": "Project", "contact": c, "stage": renewal.stage})
    assert subjects_on(deal=project) == set()


def test_editing_the_contact_keeps_a_quote_sent_from_a_deal_off_its_other_deals():
    """BUG 2 (fixed). Given a contact with two deals and a quote sent from one; when the
    contact is edited (phone, a second address), then the quote stays on its deal only."""
    owner = UserFactory()
    box = MailboxFactory(owner=owner)
    c = ContactFactory(owner=owner, email="grace@navy.example")
    renewal, project = DealFactory(owner=owner, contact=c), DealFactory(owner=owner, contact=c)
    crm_sent(box, renewal, subject="Renewal quote", to="grace@navy.example", extra_links=[{"contact": c}])
    crm_services.record_update(actor=owner, record=c, data={"phone": "+1 555 0100"})
    crm_services.record_update(actor=owner, record=c, data={"secondary_email": "g2@navy.example"})
    assert subjects_on(deal=project) == set()
    assert subjects_on(deal=renewal) == {"Renewal quote"}


def test_boss_replying_to_a_forward_of_our_quote_lands_on_the_deal(dovecot, mail_user, imap_mailbox):
    """The customer forwards our quote to her boss (the forward keeps the threading headers,
    as Gmail's does); the boss, unknown to the CRM, answers us: the answer is on the deal."""
    owner = imap_mailbox.owner
    c = ContactFactory(owner=owner, email="grace@navy.example")
    deal = DealFactory(owner=owner, contact=c)
    quote = crm_sent(imap_mailbox, deal, subject="Quote", to="grace@navy.example", extra_links=[{"contact": c}])
    # Gmail's forward keeps the threading headers; the boss answers the forward.
    dovecot.deliver(mail_user, make_message(
        sender="boss@navy.example", to=mail_user.email, subject="Re: Fwd: Quote",
        in_reply_to="<fwd1@navy.example>", references=f"<{quote.message_id}> <fwd1@navy.example>"))
    imap_sync(imap_mailbox)
    assert subjects_on(deal=deal) == {"Quote", "Re: Fwd: Quote"}
