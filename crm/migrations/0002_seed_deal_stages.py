"""Seed the usual sales pipeline. Administrators may rename or re-weight stages later."""
from django.db import migrations

STAGES = [
    # (name, probability, is_closed)
    ("Qualification", 10, False),
    ("Needs Analysis", 20, False),
    ("Value Proposition", 40, False),
    ("Identify Decision Makers", 60, False),
    ("Proposal/Price Quote", 75, False),
    ("Negotiation/Review", 90, False),
    ("Closed Won", 100, True),
    ("Closed Lost", 0, True),
    ("Closed Lost to Competition", 0, True),
]


def seed(apps, schema_editor):
    DealStage = apps.get_model("crm", "DealStage")
    for order, (name, probability, closed) in enumerate(STAGES, start=1):
        DealStage.objects.get_or_create(
            name=name, defaults={"probability": probability, "order": order, "is_closed": closed}
        )


def unseed(apps, schema_editor):
    DealStage = apps.get_model("crm", "DealStage")
    DealStage.objects.filter(name__in=[name for name, _, _ in STAGES], deals__isnull=True).delete()


class Migration(migrations.Migration):
    dependencies = [("crm", "0001_initial")]
    operations = [migrations.RunPython(seed, unseed)]
