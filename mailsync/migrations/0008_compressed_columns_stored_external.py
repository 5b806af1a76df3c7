# Columns that hold zstd-compressed bytes are stored EXTERNAL on PostgreSQL: out of line like
# before, but without PostgreSQL's own pglz compression, which tried every value and rarely won
# anything on zstd output. It was a third of the database's time in the COPY of raw sources
# (perf record of the backend, 2,000 bench messages); that COPY took ~20 % less time without it.

from django.db import migrations

COLUMNS = [
    ("mailsync_emailsource", "data"),
    ("mailsync_attachmentblob", "data"),
    ("mailsync_messageerror", "raw"),
]


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
