"""Write a user's mail (every mailbox they own) to a zip of .eml files with a manifest:
the admin console's "Back up emails" for large mailboxes, from a shell."""
from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from crm.models import User
from mailsync.backup import write_mail_backup


class Command(BaseCommand):
    help = "Back up a user's emails (byte-exact .eml files and manifest.csv) into a zip file."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("path", help="the zip file to write (must not exist)")

    def handle(self, *args: object, **options: str) -> None:
        user = User.objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"No user {options['username']!r}.")
        path = Path(options["path"])
        try:
            with path.open("xb") as out:
                summary = write_mail_backup([user], out)
        except FileExistsError as exc:
            raise CommandError(f"{path} exists already: give a new file name.") from exc
        self.stdout.write(f"{summary.emails} emails written to {path}"
                          + (f"; {len(summary.missing)} without a stored copy (see manifest.csv)"
                             if summary.missing else ""))
