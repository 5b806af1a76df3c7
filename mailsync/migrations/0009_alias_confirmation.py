"""Additional From addresses (aliases) are usable once confirmed by a link mailed to them.
Aliases that exist already were usable before: they stay usable (confirmed as of now)."""
from django.db import migrations, models
from django.utils import timezone


def keep_existing_usable(apps, schema_editor):  # noqa: ANN001, ANN201
    apps.get_model("mailsync", "MailboxAlias").objects.update(verified_at=timezone.now())


class Migration(migrations.Migration):

    dependencies = [
        ("mailsync", "0008_compressed_columns_stored_external"),
    ]

    operations = [
        migrations.AddField(
            model_name="mailboxalias",
            name="verification_sent_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="mailboxalias",
            name="verification_token",
            field=models.CharField(blank=True, max_length=64),
        ),
        migrations.AddField(
            model_name="mailboxalias",
            name="verified_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(keep_existing_usable, migrations.RunPython.noop),
    ]
