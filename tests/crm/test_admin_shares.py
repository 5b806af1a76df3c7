"""Sharing a record in the admin console follows the same rules as sharing from the pages or
the API (``crm.services.record_share``): not with the record's owner, not with a deactivated
user; whoever adds or changes a share is recorded as its "shared by". The admin's share
inline and its RecordShare page skipped those rules before (a share with a deactivated user
was saved, with no "shared by")."""
from __future__ import annotations

import pytest
from django.contrib.contenttypes.models import ContentType
from django.urls import reverse

from crm.models import RecordShare
from tests.factories import AdministratorFactory, LeadFactory, UserFactory

pytestmark = pytest.mark.django_db

PREFIX = "crm-recordshare-content_type-object_id"


def _lead_change(client, lead, shares: list[dict], initial: int = 0):  # noqa: ANN001, ANN202
    data = {
        "owner": lead.owner_id, "first_name": lead.first_name, "last_name": lead.last_name,
        "email": lead.email, "status": lead.status,
        f"{PREFIX}-TOTAL_FORMS": str(len(shares)), f"{PREFIX}-INITIAL_FORMS": str(initial),
        f"{PREFIX}-MIN_NUM_FORMS": "0", f"{PREFIX}-MAX_NUM_FORMS": "1000",
    }
    for n, share in enumerate(shares):
        data.update({f"{PREFIX}-{n}-{key}": value for key, value in share.items()})
    return client.post(reverse("admin:crm_lead_change", args=[lead.pk]), data)


@pytest.fixture
def admin_client(client):  # noqa: ANN001, ANN201
    admin = AdministratorFactory()
    client.force_login(admin)
    client.admin = admin
    return client


def test_lead_page_refuses_a_share_with_a_deactivated_user(admin_client):
    lead = LeadFactory()
    gone = UserFactory(is_active=False)
    response = _lead_change(admin_client, lead, [{"user": gone.pk, "access": "read"}])
    assert response.status_code == 200  # the page again, with the error
    assert "This user is deactivated." in response.content.decode()
    assert not RecordShare.objects.filter(user=gone).exists()


def test_lead_page_refuses_a_share_with_the_owner(admin_client):
    lead = LeadFactory()
    response = _lead_change(admin_client, lead, [{"user": lead.owner_id, "access": "read_write"}])
    assert response.status_code == 200
    assert "The owner already has full access." in response.content.decode()
    assert not RecordShare.objects.exists()


def test_lead_page_share_is_saved_with_who_shared_it_and_can_be_changed(admin_client):
    lead = LeadFactory()
    colleague = UserFactory()
    response = _lead_change(admin_client, lead, [{"user": colleague.pk, "access": "read"}])
    assert response.status_code == 302, response.content.decode()[:2000]
    share = RecordShare.objects.get(user=colleague)
    assert (share.access, share.shared_by) == ("read", admin_client.admin)
    assert share.record == lead

    # Changing the access of an existing share (an unchanged share is left alone)
    response = _lead_change(admin_client, lead, [{"id": share.pk, "user": colleague.pk,
                                                  "access": "read_write"}], initial=1)
    assert response.status_code == 302, response.content.decode()[:2000]
    share.refresh_from_db()
    assert share.access == "read_write"


def test_an_existing_share_with_a_user_deactivated_since_can_still_be_removed(admin_client):
    lead = LeadFactory()
    colleague = UserFactory()
    share = RecordShare.objects.create(content_type=ContentType.objects.get_for_model(lead),
                                       object_id=lead.pk, user=colleague, access="read")
    colleague.is_active = False
    colleague.save()
    response = _lead_change(admin_client, lead, [{"id": share.pk, "user": colleague.pk,
                                                  "access": "read", "DELETE": "on"}], initial=1)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert not RecordShare.objects.filter(pk=share.pk).exists()


def _share_add(client, **fields):  # noqa: ANN001, ANN003, ANN202
    return client.post(reverse("admin:crm_recordshare_add"), fields)


def test_share_page_applies_the_same_rules(admin_client):
    lead = LeadFactory()
    lead_type = ContentType.objects.get_for_model(lead).pk
    gone, colleague = UserFactory(is_active=False), UserFactory()

    refused = _share_add(admin_client, content_type=lead_type, object_id=lead.pk, user=gone.pk,
                         access="read")
    assert refused.status_code == 200 and "This user is deactivated." in refused.content.decode()
    nowhere = _share_add(admin_client, content_type=lead_type, object_id=lead.pk + 1000,
                         user=colleague.pk, access="read")
    assert nowhere.status_code == 200 and "There is no lead with this id." in nowhere.content.decode()
    not_a_record = _share_add(admin_client, content_type=ContentType.objects.get_for_model(RecordShare).pk,
                              object_id=1, user=colleague.pk, access="read")
    assert not_a_record.status_code == 200
    assert "Only leads, contacts, accounts and deals are shared." in not_a_record.content.decode()
    assert not RecordShare.objects.exists()

    saved = _share_add(admin_client, content_type=lead_type, object_id=lead.pk, user=colleague.pk,
                       access="read")
    assert saved.status_code == 302, saved.content.decode()[:2000]
    share = RecordShare.objects.get()
    assert (share.record, share.user, share.shared_by) == (lead, colleague, admin_client.admin)
