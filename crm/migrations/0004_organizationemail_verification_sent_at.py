"""Confirmation links of organization emails expire (mailsync.senders.VERIFICATION_DAYS). Links
sent before this migration have no send time: they get the full period from now on."""
from django.db import migrations, models
from django.utils import timezone


def start_the_clock(apps, schema_editor):  # noqa: ANN001, ANN201
    OrganizationEmail = apps.get_model("crm", "OrganizationEmail")
    OrganizationEmail.objects.filter(verified_at__isnull=True).exclude(verification_token="").update(
        verification_sent_at=timezone.now())


class Migration(migrations.Migration):

    dependencies = [
        ("crm", "0003_organizationemail"),
    ]

    operations = [
        migrations.AddField(
            model_name="organizationemail",
            name="verification_sent_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(start_the_clock, migrations.RunPython.noop),
    ]
