"""Sync one mailbox now, in this process (the same service the task and "Sync now" use)."""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from mailsync import services
from mailsync.exceptions import MailError


class Command(BaseCommand):
    help = "Sync a mailbox now and print what changed."

    def add_arguments(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("mailbox_id", type=int)
        parser.add_argument("--parse", action="store_true", help="Also parse the new bodies now.")

    def handle(self, *args, mailbox_id: int, parse: bool, **options) -> None:  # noqa: ANN002, ANN003
        try:
            report = services.mailbox_sync(mailbox_id=mailbox_id)
        except MailError as exc:
            raise CommandError(f"{exc.code}: {exc}") from exc
        if report is None:
            self.stdout.write("Not synced: the mailbox is inactive or paused.")
            return
        self.stdout.write(
            f"new={report.new} located={report.located} failed={report.failed} "
            f"flags={report.flag_changes} expunged={report.expunged} "
            f"unchanged_folders={report.unchanged_folders}/{report.folders}"
        )
        while parse and services.emails_parse_pending(mailbox_id=mailbox_id):
            pass
