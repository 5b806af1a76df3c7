"""factory_boy factories for every model."""
from __future__ import annotations

import factory
from django.contrib.contenttypes.models import ContentType

from crm.models import Account, Contact, Deal, DealStage, Lead, RecordShare, User
from mailsync.models import Mailbox

PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    first_name = factory.Faker("first_name")
    last_name = factory.Faker("last_name")
    email = factory.LazyAttribute(lambda u: f"{u.username}@crm.example.com")
    role = User.Role.STANDARD
    password = factory.django.Password(PASSWORD)


class AdministratorFactory(UserFactory):
    role = User.Role.ADMINISTRATOR
    is_staff = True
    is_superuser = True


class ManagerFactory(UserFactory):
    role = User.Role.MANAGER


class DealStageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DealStage
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"Stage {n}")
    probability = 50
    order = factory.Sequence(lambda n: 100 + n)


class AccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Account

    owner = factory.SubFactory(UserFactory)
    name = factory.Faker("company")
    website = factory.LazyAttribute(lambda a: f"https://{a.name.split()[0].lower().strip(',')}.example")


class LeadFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Lead

    owner = factory.SubFactory(UserFactory)
    first_name = factory.Faker("first_name")
    last_name = factory.Faker("last_name")
    company = factory.Faker("company")
    email = factory.Sequence(lambda n: f"lead{n}@prospect.example")


class ContactFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Contact

    owner = factory.SubFactory(UserFactory)
    first_name = factory.Faker("first_name")
    last_name = factory.Faker("last_name")
    email = factory.Sequence(lambda n: f"contact{n}@customer.example")
    account = factory.SubFactory(AccountFactory, owner=factory.SelfAttribute("..owner"))


class DealFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Deal

    owner = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"Deal {n}")
    contact = factory.SubFactory(ContactFactory, owner=factory.SelfAttribute("..owner"))
    account = factory.LazyAttribute(lambda d: d.contact.account if d.contact else None)
    amount = 10000
    # The seeded pipeline (migration 0002) is used where it exists.
    stage = factory.LazyFunction(
        lambda: DealStage.objects.filter(name="Qualification").first()
        or DealStageFactory(name="Qualification", probability=10)
    )


class RecordShareFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RecordShare
        exclude = ["record"]

    record = factory.SubFactory(LeadFactory)
    content_type = factory.LazyAttribute(lambda s: ContentType.objects.get_for_model(s.record))
    object_id = factory.LazyAttribute(lambda s: s.record.pk)
    user = factory.SubFactory(UserFactory)
    access = RecordShare.Access.READ


class MailboxFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Mailbox

    owner = factory.SubFactory(UserFactory)
    display_name = factory.LazyAttribute(lambda m: str(m.owner))
    email_address = factory.Sequence(lambda n: f"sales{n}@crm.example.com")
    protocol = Mailbox.Protocol.IMAP
    incoming_host = "127.0.0.1"
    incoming_port = 993
    username = factory.LazyAttribute(lambda m: m.email_address)
    password = "app-password-123"
