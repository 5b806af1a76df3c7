"""A user's mail as a zip archive: every stored email as a byte-exact ``.eml`` (what the
server sent, or what the CRM sent), with a ``manifest.csv`` that says where each was.

For the admin console's "Back up emails" on users (a salesperson leaving: their mail is kept
in the CRM after deactivation, and this is the copy to hand over or archive), and for
``manage.py backup_user_mail``. Sources are read one at a time and decompressed in pieces
(``storage.decompressed_chunks``), so a large mailbox never sits in memory whole.
"""
from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from crm.models import User

from .exceptions import SourceStoreError
from .models import Email, EmailLocation, Mailbox
from .storage import decompressed_chunks
from .sync.copy import read_source

MANIFEST_COLUMNS = ["file", "user", "mailbox", "email_id", "message_id", "date", "from", "to",
                    "subject", "direction", "folders", "deleted_in_crm", "note"]


@dataclass
class BackupSummary:
    emails: int = 0  # written as .eml
    missing: list[int] = field(default_factory=list)  # ids whose source could not be read
    users: list[str] = field(default_factory=list)


def write_mail_backup(users: Iterable[User], out: BinaryIO) -> BackupSummary:
    """Write the zip of ``users``' mail (every mailbox they own, deleted-in-CRM mail too) to
    ``out`` (a seekable binary file). A source that cannot be read is listed in the manifest
    with why, and the rest is written."""
    summary = BackupSummary()
    manifest = io.StringIO()
    writer = csv.writer(manifest)
    writer.writerow(MANIFEST_COLUMNS)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1,
                         allowZip64=True) as archive:
        for user in users:
            summary.users.append(user.username)
            for mailbox in Mailbox.objects.filter(owner=user).order_by("pk"):
                _write_mailbox(archive, writer, summary, user, mailbox)
        archive.writestr("manifest.csv", manifest.getvalue())
    return summary


def _write_mailbox(archive: zipfile.ZipFile, writer, summary: BackupSummary,  # noqa: ANN001
                   user: User, mailbox: Mailbox) -> None:
    folders: dict[int, list[str]] = {}
    for email_id, name in (EmailLocation.objects.filter(email__mailbox=mailbox)
                           .values_list("email_id", "folder__name")):
        folders.setdefault(email_id, []).append(name)
    emails = (Email.objects.filter(mailbox=mailbox).order_by("date", "pk")
              .only("pk", "message_id", "date", "from_address", "to", "subject", "direction",
                    "deleted_at"))
    directory = f"{_safe(user.username)}/{mailbox.pk}-{_safe(mailbox.email_address)}"
    for email in emails.iterator(chunk_size=500):
        name = f"{directory}/{email.pk}.eml"
        note = ""
        try:
            compressed = read_source(email.pk)
        except SourceStoreError as exc:
            compressed, note = None, str(exc)
        if compressed is None:
            note = note or "No stored copy of this mail."
            summary.missing.append(email.pk)
            name = ""
        else:
            with archive.open(name, "w", force_zip64=True) as target:
                for piece in decompressed_chunks(compressed):
                    target.write(piece)
            del compressed
            summary.emails += 1
        writer.writerow([
            name, user.username, mailbox.email_address, email.pk, email.message_id,
            email.date.isoformat() if email.date else "", email.from_address,
            "; ".join(a.get("email", "") for a in email.to or []),
            email.subject, email.direction, "; ".join(sorted(folders.get(email.pk, []))),
            "yes" if email.deleted_at else "", note,
        ])


def _safe(text: str) -> str:
    """A name for one level of the archive's paths: no separators, no dots first."""
    cleaned = "".join(c if c.isalnum() or c in "@.-_+" else "_" for c in text).lstrip(".")
    return cleaned[:100] or "_"
