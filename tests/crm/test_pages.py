"""Server-rendered pages and the admin answer, and keep records private."""
from __future__ import annotations

import pytest
from django.urls import reverse

from crm.models import Lead
from tests.factories import AdministratorFactory, DealFactory, LeadFactory, MailboxFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_pages_need_login(client):
    response = client.get("/leads/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_someone_elses_record_is_404(client):
    client.force_login(UserFactory())
    lead = LeadFactory()
    assert client.get(f"/leads/{lead.pk}/").status_code == 404
    assert client.post(f"/leads/{lead.pk}/delete/").status_code == 404
    assert Lead.objects.filter(pk=lead.pk).exists()


def test_list_pages_page_through_many_records(client):
    ana = UserFactory()
    LeadFactory.create_batch(60, owner=ana)
    client.force_login(ana)
    page3 = client.get("/leads/?page=3").content.decode()
    assert "Page 3 of 3" in page3


def test_delete_through_page(client):
    ana = UserFactory()
    deal = DealFactory(owner=ana)
    client.force_login(ana)
    response = client.post(f"/deals/{deal.pk}/delete/")
    assert response.status_code == 302
    assert not type(deal).objects.filter(pk=deal.pk).exists()


@pytest.mark.parametrize(
    "model", ["user", "lead", "contact", "account", "deal", "dealstage", "recordshare"]
)
def test_admin_changelists_and_add_forms_open(client, model):
    client.force_login(AdministratorFactory())
    DealFactory()
    assert client.get(reverse(f"admin:crm_{model}_changelist")).status_code == 200
    assert client.get(reverse(f"admin:crm_{model}_add")).status_code == 200


def test_admin_mailbox_page_never_shows_the_password(client):
    client.force_login(AdministratorFactory())
    mailbox = MailboxFactory(password="top-secret-pass", smtp_password="smtp-secret")
    page = client.get(reverse("admin:mailsync_mailbox_change", args=[mailbox.pk])).content.decode()
    assert "top-secret-pass" not in page and "smtp-secret" not in page


def test_admin_deactivate_action(client):
    admin, user = AdministratorFactory(), UserFactory()
    client.force_login(admin)
    client.post(
        reverse("admin:crm_user_changelist"),
        {"action": "deactivate_users", "_selected_action": [user.pk]},
    )
    user.refresh_from_db()
    assert user.is_active is False and user.deactivated_at is not None
