"""Does synced mail stay on the right lead / contact / deal when the CRM records change
afterwards, as a salesperson of a hosted CRM would expect? (Written as review probes; the
ones that failed were fixed: records saved in the Django admin got no past mail; a reply
from the customer's colleague stayed off the deal; a contact saved while a sync stored its
mail got none of it.)"""
from __future__ import annotations

import threading

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from crm import services as crm_services
from crm.models import Contact, Deal, Lead
from crm.signals import record_saved
from mailsync import services
from mailsync.models import Email, EmailLink, Mailbox
from mailsync.selectors import emails_of_record, emails_unmatched, emails_visible_to
from mailsync.sync.imap import ImapSync
from tests.factories import (AdministratorFactory, ContactFactory, DealFactory, LeadFactory,
                             MailboxFactory, UserFactory)
from tests.mailsync.conftest import make_message
from tests.mailsync.test_association_records import mail  # a synced mail, as the sync writes it



def sync(mailbox: Mailbox):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def subjects(**link) -> set[str]:
    return set(EmailLink.objects.filter(**link).values_list("email__subject", flat=True))


# -- records changed in the admin console --------------------------------------------------------

@pytest.mark.django_db
def test_contact_created_in_admin_console_gets_past_mail():
    """An administrator adds a contact in the Django admin for a customer who already wrote:
    the contact page should list that customer's mail, as when created in the page or API."""
    admin = AdministratorFactory()
    mbx = MailboxFactory(owner=admin)
    e = mail(mbx, sender="buyer@client.example", subject="Before the contact existed")
    c = Client()
    c.force_login(admin)
    prefix = "crm-recordshare-content_type-object_id"
    r = c.post("/admin/crm/contact/add/", {
        "owner": admin.pk, "last_name": "Buyer", "email": "buyer@client.example",
        f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0",
        f"{prefix}-MIN_NUM_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "1000",
    })
    assert r.status_code == 302, r.content.decode()[:3000]
    contact = Contact.objects.get(email="buyer@client.example")
    assert EmailLink.objects.filter(contact=contact, email=e).exists(), \
        "contact created in the admin got none of its past mail"


@pytest.mark.django_db
def test_deal_contact_set_in_admin_console_gets_contacts_mail():
    """An administrator assigns a contact to an existing deal in the admin: the deal page
    should show that contact's conversation."""
    admin = AdministratorFactory()
    mbx = MailboxFactory(owner=admin)
    contact = ContactFactory(owner=admin, email="buyer@client.example")
    e = mail(mbx, sender="buyer@client.example")
    deal = DealFactory(owner=admin, contact=None, account=None)
    c = Client()
    c.force_login(admin)
    prefix = "crm-recordshare-content_type-object_id"
    r = c.post(f"/admin/crm/deal/{deal.pk}/change/", {
        "owner": admin.pk, "name": deal.name, "contact": contact.pk, "stage": deal.stage.pk,
        "amount": "10000",
        f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0",
        f"{prefix}-MIN_NUM_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "1000",
    })
    assert r.status_code == 302, r.content.decode()[:3000]
    deal.refresh_from_db()
    assert deal.contact_id == contact.pk
    assert EmailLink.objects.filter(deal=deal, email=e).exists(), "deal got none of the contact's mail"


# -- contacts' addresses changed ------------------------------------------------------------------

@pytest.mark.django_db
def test_contact_email_typo_fixed_on_the_edit_page_attaches_mail_of_the_right_address():
    """The salesperson fixes a typo in a contact's address on the edit page: the customer's
    past mail appears on the contact and on its deal at once."""
    owner = UserFactory()
    mbx = MailboxFactory(owner=owner)
    contact = ContactFactory(owner=owner, email="jon.smiht@client.example", account=None)
    deal = DealFactory(owner=owner, contact=contact)
    e = mail(mbx, sender="Jon.Smith@Client.Example")
    c = Client()
    c.force_login(owner)
    r = c.post(reverse("contact-edit", args=[contact.pk]), {
        "first_name": contact.first_name, "last_name": contact.last_name,
        "email": "jon.smith@client.example", "secondary_email": "", "owner": owner.pk,
    })
    assert r.status_code == 302, r.content.decode()[:3000]
    assert EmailLink.objects.filter(contact=contact, email=e).exists()
    assert EmailLink.objects.filter(deal=deal, email=e).exists()


@pytest.mark.django_db
def test_secondary_email_added_then_removed():
    """A secondary address added later brings its past mail to the contact and its deal;
    once removed, new mail of that address no longer attaches (and what it brought leaves
    the contact: tests/mailsync/test_review_session10_api.py)."""
    owner = UserFactory()
    mbx = MailboxFactory(owner=owner)
    contact = ContactFactory(owner=owner, email="main@client.example")
    deal = DealFactory(owner=owner, contact=contact)
    old = mail(mbx, sender="private@home.example", subject="From home")
    api = APIClient()
    api.force_authenticate(owner)
    r = api.patch(f"/api/v1/contacts/{contact.pk}/", {"secondary_email": "Private@Home.Example"}, format="json")
    assert r.status_code == 200, r.content
    assert EmailLink.objects.filter(contact=contact, email=old).exists()
    assert EmailLink.objects.filter(deal=deal, email=old).exists()
    assert api.get(f"/api/v1/emails/?deal={deal.pk}").json()["count"] == 1
    r = api.patch(f"/api/v1/contacts/{contact.pk}/", {"secondary_email": ""}, format="json")
    assert r.status_code == 200, r.content
    later = mail(mbx, sender="private@home.example", subject="From home again")
    assert not EmailLink.objects.filter(email=later).exists()
    print("PROBE after removal, old mail still on contact:",
          EmailLink.objects.filter(contact=contact, email=old).exists())


# -- deals created, moved, deleted; contacts deleted ----------------------------------------------

@pytest.mark.django_db
def test_deal_moved_to_another_contact_shows_the_new_contacts_mail():
    """A deal is handed from one contact to another (the buyer changed): the new contact's
    past mail appears on the deal."""
    owner = UserFactory()
    mbx = MailboxFactory(owner=owner)
    a = ContactFactory(owner=owner, email="a@client.example")
    b = ContactFactory(owner=owner, email="b@client.example")
    deal = DealFactory(owner=owner, contact=a)
    ea = mail(mbx, sender="a@client.example", subject="From A")
    eb = mail(mbx, sender="b@client.example", subject="From B")
    crm_services.record_update(actor=owner, record=deal, data={"contact": b})
    on_deal = subjects(deal=deal)
    print("PROBE deal after move:", on_deal)
    assert "From B" in on_deal
    # new mail of A no longer goes to the deal
    ea2 = mail(mbx, sender="a@client.example", subject="From A later")
    assert not EmailLink.objects.filter(deal=deal, email=ea2).exists()
    assert ea and eb


@pytest.mark.django_db
def test_contact_deleted_mail_stays_in_mailbox_and_on_its_deal():
    """Deleting a contact never deletes mail: it stays in the mailbox (back in Unmatched if it
    was on no other record) and on the deal it was on."""
    owner = UserFactory()
    mbx = MailboxFactory(owner=owner)
    contact = ContactFactory(owner=owner, email="c@client.example")
    deal = DealFactory(owner=owner, contact=contact)
    e = mail(mbx, sender="c@client.example", subject="Keep me")
    crm_services.record_delete(actor=owner, record=contact)
    assert Email.objects.filter(pk=e.pk, deleted_at__isnull=True).exists()
    deal.refresh_from_db()
    assert deal.contact_id is None
    assert [x.subject for x in emails_of_record(user=owner, record=deal)] == ["Keep me"]
    crm_services.record_delete(actor=owner, record=deal)
    assert Email.objects.filter(pk=e.pk, deleted_at__isnull=True).exists()
    assert list(emails_unmatched(user=owner)) == [e]


@pytest.mark.django_db
def test_deal_created_by_colleague_for_shared_contact_shows_public_mail():
    """A colleague with a shared contact opens a deal for it: the contact's mail from the
    owner's public mailbox shows on the colleague's new deal (page and API)."""
    owner, colleague = UserFactory(), UserFactory()
    mbx = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=owner, email="c@client.example")
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    e = mail(mbx, sender="c@client.example", subject="Public past mail")
    deal = crm_services.record_create(actor=colleague, model=Deal, data={
        "name": "Colleague deal", "contact": contact, "stage": DealFactory(owner=owner).stage})
    api = APIClient()
    api.force_authenticate(colleague)
    assert [x["id"] for x in api.get(f"/api/v1/emails/?deal={deal.pk}").json()["results"]] == [e.pk]
    c = Client()
    c.force_login(colleague)
    assert "Public past mail" in c.get(f"/mail/records/deal/{deal.pk}/").content.decode()


# -- several records, one address -----------------------------------------------------------------

@pytest.mark.django_db
def test_lead_and_two_contacts_same_address_all_get_mail_and_a_later_one_too():
    """Duplicates happen: a lead and two contacts share an address; each shows the mail, and
    one created later gets it too."""
    owner = UserFactory()
    mbx = MailboxFactory(owner=owner)
    lead = LeadFactory(owner=owner, email="dup@client.example")
    c1 = ContactFactory(owner=owner, email="DUP@client.example")
    e = mail(mbx, sender="dup@client.example")
    c2 = crm_services.record_create(actor=owner, model=Contact,
                                    data={"last_name": "Dup", "secondary_email": "dup@CLIENT.example"})
    for link in ({"lead": lead}, {"contact": c1}, {"contact": c2}):
        assert EmailLink.objects.filter(email=e, **link).exists(), link


# -- the real sync: roles, threads ----------------------------------------------------------------

@pytest.mark.django_db
def test_sync_contact_only_in_cc_and_only_in_bcc_of_own_sent_mail(dovecot, mail_user, imap_mailbox):
    """Mail where the contact is only in Cc, and the user's own sent mail with the contact
    only in Bcc, both land on the contact and its deal; mail from the user to nobody known
    lands nowhere."""
    owner, me = imap_mailbox.owner, mail_user.email
    contact = ContactFactory(owner=owner, email="boss@client.example")
    deal = DealFactory(owner=owner, contact=contact)
    dovecot.deliver(mail_user, make_message(sender="Other <other@client.example>", to=me, subject="Cc only")
                    .replace(b"Subject:", b"Cc: Boss <Boss@Client.Example>\r\nSubject:", 1))
    dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{me}>", to="someone@else.example",
                                                   subject="Bcc only")
                   .replace(b"Subject:", b"Bcc: boss@client.example\r\nSubject:", 1), flags=["\\Seen"])
    dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{me}>", to="nobody@else.example",
                                                   subject="To nobody"), flags=["\\Seen"])
    sync(imap_mailbox)
    assert subjects(contact=contact) == {"Cc only", "Bcc only"}
    assert subjects(deal=deal) == {"Cc only", "Bcc only"}
    assert not EmailLink.objects.filter(email__subject="To nobody").exists()


@pytest.mark.django_db
def test_sync_reply_from_customers_colleague_shows_in_the_deal_conversation(dovecot, mail_user, imap_mailbox):
    """The contact writes about the deal; the salesperson answers; the contact's colleague
    (not in the CRM) replies to that answer with the contact dropped. The salesperson
    expects the reply in the conversation on the deal and contact pages."""
    owner, me = imap_mailbox.owner, mail_user.email
    contact = ContactFactory(owner=owner, email="buyer@client.example")
    deal = DealFactory(owner=owner, contact=contact)
    dovecot.deliver(mail_user, make_message(sender="Buyer <buyer@client.example>", to=me,
                                            subject="Order", message_id="<o1@client.example>"))
    dovecot.append(mail_user, "Sent", make_message(
        sender=f"Me <{me}>", to="buyer@client.example", subject="Re: Order",
        message_id="<o2@crm.example.com>", in_reply_to="<o1@client.example>",
        references="<o1@client.example>"), flags=["\\Seen"])
    sync(imap_mailbox)
    dovecot.deliver(mail_user, make_message(
        sender="Accounts <accounts@client.example>", to=me, subject="Re: Re: Order",
        message_id="<o3@client.example>", in_reply_to="<o2@crm.example.com>",
        references="<o1@client.example> <o2@crm.example.com>"))
    sync(imap_mailbox)
    threads = set(Email.objects.filter(mailbox=imap_mailbox).values_list("thread", flat=True))
    assert len(threads) == 1, "not one thread"
    on_deal = {e.subject for e in emails_of_record(user=owner, record=deal)}
    assert on_deal == {"Order", "Re: Order", "Re: Re: Order"}, on_deal


@pytest.mark.django_db
def test_contact_created_after_the_thread_gets_the_colleagues_reply_too(dovecot, mail_user, imap_mailbox):
    """The same conversation synced before the contact exists: creating the contact brings
    the whole conversation (the colleague's reply included), as the sync does for replies
    that arrive later. Mail of the same colleague outside that conversation does not come."""
    owner, me = imap_mailbox.owner, mail_user.email
    dovecot.deliver(mail_user, make_message(sender="Buyer <buyer@client.example>", to=me,
                                            subject="Order", message_id="<p1@client.example>"))
    dovecot.deliver(mail_user, make_message(
        sender="Accounts <accounts@client.example>", to=me, subject="Re: Order",
        message_id="<p2@client.example>", in_reply_to="<p1@client.example>",
        references="<p1@client.example>"))
    dovecot.deliver(mail_user, make_message(
        sender="Accounts <accounts@client.example>", to=me, subject="Re: Re: Order",
        message_id="<p3@client.example>", in_reply_to="<p2@client.example>",
        references="<p1@client.example> <p2@client.example>"))
    dovecot.deliver(mail_user, make_message(sender="Accounts <accounts@client.example>", to=me,
                                            subject="Invoice run", message_id="<p4@client.example>"))
    sync(imap_mailbox)
    contact = crm_services.record_create(actor=owner, model=Contact, data={
        "first_name": "B", "last_name": "Buyer", "email": "buyer@client.example"})
    assert subjects(contact=contact) == {"Order", "Re: Order", "Re: Re: Order"}


# -- visibility ------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_public_mailbox_then_excluded_domain_then_private_for_colleague():
    """A colleague sees the public mailbox's mail on a shared contact (page and
    /api/v1/emails/?contact=); an excluded domain added afterwards hides that domain's
    mail; the mailbox made private hides the rest."""
    owner, colleague = UserFactory(), UserFactory()
    mbx = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=owner, email="c@client.example")
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    e1 = mail(mbx, sender="c@client.example", subject="Plain one")
    e2 = mail(mbx, sender="c@client.example", cc="lawyer@Legal.example", subject="With lawyer")
    api = APIClient()
    api.force_authenticate(colleague)

    def seen() -> set[str]:
        return {x["subject"] for x in api.get(f"/api/v1/emails/?contact={contact.pk}").json()["results"]}

    assert seen() == {"Plain one", "With lawyer"}
    services.mailbox_update(actor=owner, mailbox=mbx, data={"excluded_domains": "legal.example"})
    assert seen() == {"Plain one"}
    c = Client()
    c.force_login(colleague)
    page = c.get(f"/mail/records/contact/{contact.pk}/").content.decode()
    assert "Plain one" in page and "With lawyer" not in page
    services.mailbox_update(actor=owner, mailbox=mbx, data={"sharing": Mailbox.Sharing.PRIVATE})
    assert seen() == set()
    api.force_authenticate(owner)
    assert {x["subject"] for x in api.get(f"/api/v1/emails/?contact={contact.pk}").json()["results"]} \
        == {"Plain one", "With lawyer"}
    assert e1 and e2


# -- concurrency: a record created while a sync stores mail --------------------------------------

@pytest.mark.django_db(transaction=True)
def test_contact_created_while_sync_stores_its_mail_gets_it(dovecot, mail_user, imap_mailbox):
    """The salesperson saves a new contact at the moment the (always running: IDLE) sync
    stores that customer's new mail. The mail must end up on the contact: either the sync
    sees the contact or the contact's creation sees the mail."""
    owner = imap_mailbox.owner
    in_create, release = threading.Event(), threading.Event()

    def hold(sender, record, created, **kwargs):  # noqa: ANN001, ANN003, ARG001
        # after mailsync's receiver (past mail attached), before record_create commits
        in_create.set()
        release.wait(20)

    record_saved.connect(hold, weak=False, dispatch_uid="probe.hold")
    result: dict = {}

    def create() -> None:
        from django.db import connection
        try:
            result["contact"] = crm_services.record_create(
                actor=owner, model=Contact, data={"last_name": "Racer", "email": "racer@client.example"})
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc
        finally:
            connection.close()

    try:
        dovecot.deliver(mail_user, make_message(sender="R <racer@client.example>", subject="Racing mail"))
        t = threading.Thread(target=create)
        t.start()
        assert in_create.wait(20)
        sync(imap_mailbox)  # commits the mail while the contact's transaction is still open
        release.set()
        t.join(20)
    finally:
        release.set()
        record_saved.disconnect(dispatch_uid="probe.hold")
    assert "error" not in result, result
    contact = result["contact"]
    assert Email.objects.filter(subject="Racing mail").exists()
    assert EmailLink.objects.filter(contact=contact, email__subject="Racing mail").exists(), \
        "mail stored during the contact's creation is on no record, for good"
