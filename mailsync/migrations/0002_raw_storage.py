"""Raw sources and attachment blobs are zstd-compressed already: tell PostgreSQL not to
compress them again (TOAST pglz would spend CPU for nothing)."""
from django.db import migrations


def external_storage(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in ("mailsync_emailsource", "mailsync_attachmentblob"):
        schema_editor.execute(f'ALTER TABLE "{table}" ALTER COLUMN "data" SET STORAGE EXTERNAL')


class Migration(migrations.Migration):
    dependencies = [("mailsync", "0001_initial")]
    operations = [migrations.RunPython(external_storage, migrations.RunPython.noop)]
