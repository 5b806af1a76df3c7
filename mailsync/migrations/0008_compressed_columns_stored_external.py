# MessageError.raw holds zstd-compressed bytes: stored EXTERNAL on PostgreSQL (out of line,
# without PostgreSQL's own pglz compression, which rarely wins anything on zstd output), as
# migration 0002 already did for the raw sources and attachment blobs.

from django.db import migrations

COLUMNS = [("mailsync_messageerror", "raw")]


def _storage(mode: str):
    def run(apps, schema_editor) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        for table, column in COLUMNS:
            schema_editor.execute(
                f"ALTER TABLE {quote(table)} ALTER COLUMN {quote(column)} SET STORAGE {mode}")
    return run


class Migration(migrations.Migration):

    dependencies = [
        ('mailsync', '0007_wire_form_hashes'),
    ]

    operations = [
        migrations.RunPython(_storage("EXTERNAL"), _storage("EXTENDED")),
    ]
