# EmailLink.bcc_only: a record that matched a mail only by a Bcc address is linked for the
# mailbox's owner alone (mailsync.selectors); shown to colleagues, the link told them the
# person had a blind copy. The column comes with a constant database default (PostgreSQL 11+
# adds it without rewriting the table): existing links stay visible unless the backfill
# below finds them Bcc-only.
#
# The backfill marks what the association would mark now, as far as the stored rows tell:
# a lead's or contact's link whose mail has one of the record's addresses in Bcc and none in
# From, To, Cc or Reply-To, and a deal's link whose contact's link is so marked. Mail sent
# from the CRM is left as it is (the record it was sent from is not recorded apart from the
# others), and so are replies that inherited a link from such a mail (no address of theirs
# matched). One UPDATE per record kind, in SQL both PostgreSQL and SQLite read.

from django.db import connection as default_connection
from django.db import migrations, models


def forwards(apps, schema_editor) -> None:
    link = apps.get_model("mailsync", "EmailLink")
    email = apps.get_model("mailsync", "Email")
    participant = apps.get_model("mailsync", "EmailParticipant")
    connection = schema_editor.connection if schema_editor is not None else default_connection
    q = connection.ops.quote_name
    links, emails, people = (q(m._meta.db_table) for m in (link, email, participant))
    with connection.cursor() as cursor:
        for field, model in (("lead", "Lead"), ("contact", "Contact")):
            records = q(apps.get_model("crm", model)._meta.db_table)
            matched = (f"SELECT 1 FROM {people} p JOIN {records} r ON r.id = {links}.{field}_id "
                       f"WHERE p.email_id = {links}.email_id "
                       "AND p.address IN (LOWER(r.email), LOWER(r.secondary_email)) AND p.role")
            cursor.execute(
                f"UPDATE {links} SET bcc_only = %s WHERE {field}_id IS NOT NULL AND NOT bcc_only "
                f"AND email_id IN (SELECT id FROM {emails} WHERE source <> %s) "
                f"AND EXISTS ({matched} = %s) AND NOT EXISTS ({matched} <> %s)",
                [True, "crm", "bcc", "bcc"])
        deals = q(apps.get_model("crm", "Deal")._meta.db_table)
        cursor.execute(
            f"UPDATE {links} SET bcc_only = %s WHERE deal_id IS NOT NULL AND NOT bcc_only "
            f"AND email_id IN (SELECT id FROM {emails} WHERE source <> %s) "
            f"AND EXISTS (SELECT 1 FROM {links} c JOIN {deals} d ON d.contact_id = c.contact_id "
            f"WHERE d.id = {links}.deal_id AND c.email_id = {links}.email_id AND c.bcc_only)",
            [True, "crm"])


class Migration(migrations.Migration):

    dependencies = [
        ('mailsync', '0014_mailbox_sync_requested_lease_holder'),
    ]

    operations = [
        migrations.AddField(
            model_name='emaillink',
            name='bcc_only',
            field=models.BooleanField(db_default=False, default=False),
        ),
        migrations.RunPython(forwards, migrations.RunPython.noop, elidable=True),
    ]
