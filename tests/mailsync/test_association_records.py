"""Association and visibility as plain database tests (written as probes by a review):
records created or changed later, deleted records, deactivated users, shared contacts."""
from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import pytest
from django.test import Client
from rest_framework.test import APIClient

from crm import services as crm_services
from crm.models import Contact, Deal, Lead
from mailsync.association import emails_associate
from mailsync.models import Email, EmailLink, EmailParticipant, Mailbox
from mailsync.selectors import emails_of_record, emails_unmatched, emails_visible_to
from tests.factories import (AdministratorFactory, ContactFactory, DealFactory, LeadFactory,
                             MailboxFactory, ManagerFactory, UserFactory)

pytestmark = pytest.mark.django_db
_n = itertools.count(1)


def mail(mailbox: Mailbox, *, sender: str, to: str | None = None, cc: str = "", subject: str | None = None) -> Email:
    n = next(_n)
    to = to or mailbox.email_address
    e = Email.objects.create(mailbox=mailbox, fingerprint=f"pfp{n}", content_hash=f"ph{n}",
                             message_id=f"pm{n}@client.example", subject=subject or f"M{n}",
                             from_address=sender, direction="received",
                             date=datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(hours=n))
    rows = [("from", sender), ("to", to)] + ([("cc", cc)] if cc else [])
    for role, a in rows:
        EmailParticipant.objects.create(email=e, role=role, address=a.lower())
    emails_associate(email_ids=[e.pk], exclude_addresses=[mailbox.email_address])
    return e


def test_deleted_lead_mail_returns_to_unmatched_and_colleague_loses_it():
    owner, colleague = UserFactory(), UserFactory()
    mbx = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    lead = LeadFactory(owner=owner, email="x@client.example")
    crm_services.record_share(actor=owner, record=lead, user=colleague)
    e = mail(mbx, sender="x@client.example")
    assert emails_visible_to(colleague).filter(pk=e.pk).exists()
    crm_services.record_delete(actor=owner, record=lead)
    assert not emails_visible_to(colleague).filter(pk=e.pk).exists()
    assert list(emails_unmatched(user=owner)) == [e]


def test_deactivated_colleague_sees_nothing_and_deactivated_owner_mail_stays_shared():
    admin, owner, colleague = AdministratorFactory(), UserFactory(), UserFactory()
    mbx = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=owner, email="c@client.example")
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    e = mail(mbx, sender="c@client.example")
    crm_services.user_deactivate(actor=admin, user=colleague)
    colleague.refresh_from_db()
    assert not emails_visible_to(colleague).exists()
    crm_services.user_reactivate(actor=admin, user=colleague)
    crm_services.user_deactivate(actor=admin, user=owner)
    colleague.refresh_from_db()
    assert emails_visible_to(colleague).filter(pk=e.pk).exists()
    assert emails_visible_to(admin).filter(pk=e.pk).exists()


def test_shared_contact_shows_mail_on_its_page_and_api_links_only_the_contact():
    owner, colleague = UserFactory(), UserFactory()
    mbx = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    contact = ContactFactory(owner=owner, email="c@client.example")
    deal = DealFactory(owner=owner, contact=contact)
    e = mail(mbx, sender="C@Client.Example", subject="Shared contact mail")
    assert set(EmailLink.objects.filter(email=e).values_list("contact", "deal")) == {(contact.pk, None), (None, deal.pk)}
    crm_services.record_share(actor=owner, record=contact, user=colleague)
    c = Client()
    c.force_login(colleague)
    assert "Shared contact mail" in c.get(f"/mail/records/contact/{contact.pk}/").content.decode()
    assert c.get(f"/mail/records/deal/{deal.pk}/").status_code == 404
    api = APIClient()
    api.force_authenticate(colleague)
    assert api.get(f"/api/v1/emails/{e.pk}/").json()["links"] == [{"lead": None, "contact": contact.pk, "deal": None}]
    assert api.get(f"/api/v1/emails/?deal={deal.pk}").json()["count"] == 0
    crm_services.record_unshare(actor=owner, record=contact, user=colleague)
    assert api.get(f"/api/v1/emails/{e.pk}/").status_code == 404


def test_manager_sees_reports_public_record_mail_but_not_private():
    manager = ManagerFactory()
    owner = UserFactory(manager=manager)
    pub = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC)
    priv = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PRIVATE)
    ContactFactory(owner=owner, email="c@client.example")
    e1, e2 = mail(pub, sender="c@client.example"), mail(priv, sender="c@client.example")
    visible = set(emails_visible_to(manager).values_list("pk", flat=True))
    assert visible == {e1.pk}


def test_deal_created_later_through_the_api_gets_the_contacts_past_mail():
    owner = UserFactory()
    mbx = MailboxFactory(owner=owner)
    contact = ContactFactory(owner=owner, email="c@client.example")
    e = mail(mbx, sender="c@client.example")
    api = APIClient()
    api.force_authenticate(owner)
    stage = DealFactory(owner=owner).stage
    r = api.post("/api/v1/deals/", {"name": "Later", "contact": contact.pk, "stage": stage.pk}, format="json")
    assert r.status_code == 201, r.content
    assert EmailLink.objects.filter(deal_id=r.json()["id"], email=e).exists()


def test_lead_created_with_secondary_email_in_other_case_gets_past_mail():
    owner = UserFactory()
    mbx = MailboxFactory(owner=owner)
    e = mail(mbx, sender="alt@client.example")
    lead = crm_services.record_create(actor=owner, model=Lead,
                                      data={"last_name": "L", "email": "main@client.example",
                                            "secondary_email": "ALT@Client.Example"})
    assert EmailLink.objects.filter(lead=lead, email=e).exists()


def test_contact_of_one_user_gets_mail_of_another_users_private_mailbox_but_cannot_see_it():
    a, b = UserFactory(), UserFactory()
    mbx_b = MailboxFactory(owner=b)
    contact = ContactFactory(owner=a, email="c@client.example")
    e = mail(mbx_b, sender="c@client.example")
    assert EmailLink.objects.filter(email=e, contact=contact).exists()
    assert list(emails_of_record(user=a, record=contact)) == []
