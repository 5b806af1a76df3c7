"""Who sees and changes which records: owners, managers, administrators, shares."""
from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from crm import services
from crm.exceptions import RecordPermissionDenied
from crm.models import Lead, RecordShare
from crm.selectors import record_list, records_visible_to
from tests.factories import (
    AdministratorFactory,
    ContactFactory,
    DealFactory,
    LeadFactory,
    ManagerFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


def test_standard_user_sees_only_own_and_shared_records():
    ana, bob = UserFactory(), UserFactory()
    mine = LeadFactory(owner=ana)
    theirs = LeadFactory(owner=bob)
    shared = LeadFactory(owner=bob)
    services.record_share(actor=bob, record=shared, user=ana)

    visible = set(records_visible_to(ana, Lead.objects.all()))

    assert visible == {mine, shared}
    assert theirs not in visible


def test_manager_sees_team_records_and_administrator_sees_all():
    manager = ManagerFactory()
    report = UserFactory(manager=manager)
    outsider = UserFactory()
    team_lead = LeadFactory(owner=report)
    other_lead = LeadFactory(owner=outsider)

    assert set(records_visible_to(manager, Lead.objects.all())) == {team_lead}
    assert set(records_visible_to(AdministratorFactory(), Lead.objects.all())) == {
        team_lead, other_lead,
    }


def test_read_only_share_cannot_edit_but_read_write_can():
    owner, reader, writer = UserFactory(), UserFactory(), UserFactory()
    lead = LeadFactory(owner=owner, last_name="Before")
    services.record_share(actor=owner, record=lead, user=reader, access=RecordShare.Access.READ)
    services.record_share(actor=owner, record=lead, user=writer, access="read_write")

    with pytest.raises(RecordPermissionDenied):
        services.record_update(actor=reader, record=lead, data={"last_name": "Hacked"})
    services.record_update(actor=writer, record=lead, data={"last_name": "After"})

    lead.refresh_from_db()
    assert lead.last_name == "After"


def test_deactivated_user_sees_nothing_and_cannot_be_assigned():
    admin = AdministratorFactory()
    user = UserFactory()
    LeadFactory(owner=user)
    services.user_deactivate(actor=admin, user=user)

    assert not records_visible_to(user, Lead.objects.all()).exists()
    with pytest.raises(ValidationError) as excinfo:
        services.record_create(actor=admin, model=Lead, data={"last_name": "X", "owner": user})
    assert "owner" in excinfo.value.message_dict


def test_only_administrators_deactivate_and_not_themselves():
    admin, user = AdministratorFactory(), UserFactory()
    with pytest.raises(RecordPermissionDenied):
        services.user_deactivate(actor=UserFactory(), user=user)
    with pytest.raises(ValidationError):
        services.user_deactivate(actor=admin, user=admin)


def test_deal_cannot_link_a_contact_the_user_cannot_see():
    ana = UserFactory()
    hidden_contact = ContactFactory()
    deal = DealFactory(owner=ana)
    with pytest.raises(ValidationError) as excinfo:
        services.record_update(actor=ana, record=deal, data={"contact": hidden_contact})
    assert "contact" in excinfo.value.message_dict


@pytest.mark.usefixtures("deal_stages")
def test_deal_takes_account_from_contact():
    ana = UserFactory()
    contact = ContactFactory(owner=ana)
    from crm.models import Deal, DealStage

    deal = services.record_create(
        actor=ana, model=Deal,
        data={"name": "Renewal", "contact": contact, "stage": DealStage.objects.get(name="Negotiation/Review")},
    )
    assert deal.account == contact.account


def test_search_matches_every_word_across_fields():
    ana = UserFactory()
    LeadFactory(owner=ana, first_name="Grace", last_name="Hopper", company="Navy")
    LeadFactory(owner=ana, first_name="Grace", last_name="Kelly", company="Film")

    found = record_list(user=ana, model=Lead, query="grace navy")
    assert [lead.last_name for lead in found] == ["Hopper"]


@pytest.mark.usefixtures("deal_stages")
def test_seeded_pipeline_has_probabilities_from_0_to_100():
    from crm.models import DealStage

    stages = {s.name: s.probability for s in DealStage.objects.all()}
    assert stages["Qualification"] == 10
    assert stages["Needs Analysis"] == 20
    assert stages["Closed Won"] == 100
    assert stages["Closed Lost"] == 0


def test_stage_probability_above_100_is_rejected_by_the_database():
    from django.db import IntegrityError, transaction

    from crm.models import DealStage

    with pytest.raises(IntegrityError), transaction.atomic():
        DealStage.objects.create(name="Impossible", probability=150)
