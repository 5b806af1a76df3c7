# The content hash and the fingerprint of an email are now BLAKE3 instead of SHA-256: the two
# hashes over every byte of every fetched message were a fifth of the sync's fetch process's
# CPU, and BLAKE3 takes a quarter of SHA-256's time there (bench/README.md, session 14). What is
# hashed does not change (the message in its CRLF wire form; for the fingerprint, the
# Message-ID and the message without its trace headers and Bcc). Stored emails get both hashes
# recomputed from their raw source, in the database or in a pack file (mailsync.sourcestore),
# so that a mail fetched again (a UIDVALIDITY change, a copy in another folder or mailbox, the
# Sent copy of a mail sent from the CRM) is still recognized and not stored twice.
#
# The hashing is written out here, both ways (as in 0007 and 0010), so that later changes to
# prepare.py do not change what this migration computes; the Message-ID comes from the live
# parse_envelope, the source from the live sourcestore and decompress. Mail without a
# Message-ID keeps its fingerprint (a derived key, SHA-256 of a short text, unchanged); only its
# content hash changes. A source that cannot be read (one pack missing from MAILROOM_SOURCE_DIR)
# leaves that email's hashes as they were, with a warning; a source directory that is not set
# or not there at all stops the migration (it would pass over every pack).
#
# Not atomic: each chunk commits on its own, so rows are not locked until the end and memory
# stays bounded. Rerunning after an interruption is safe: rows already done are equal.

import hashlib
import logging
import re

from blake3 import blake3
from django.db import IntegrityError, migrations, transaction

log = logging.getLogger(__name__)

CHUNK = 500
CHUNK_BYTES = 64 * 1024 * 1024  # raw size; the compressed data is smaller
LEFT_OUT = frozenset({
    b"received", b"delivered-to", b"return-path", b"x-original-to", b"x-received",
    b"envelope-to", b"x-envelope-to", b"x-delivered-to", b"x-rcpt-to",
    b"authentication-results", b"received-spf", b"arc-seal", b"arc-message-signature",
    b"arc-authentication-results", b"x-spam-status", b"x-spam-score", b"x-spam-flag",
    b"x-spam-level", b"x-spam-checker-version", b"x-virus-scanned", b"status", b"x-status",
    b"x-keywords", b"x-uid", b"lines", b"content-length", b"bcc", b"resent-bcc",
})
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


def wire_form(raw: bytes) -> bytes:
    if _BARE_LF.search(raw) is None:
        return raw
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def hashes(raw: bytes, message_id: str | None, old_fingerprint: str, *, new: bool) -> tuple[str, str]:
    """(content hash, fingerprint) of ``raw``: BLAKE3 (``new``) or SHA-256 (before)."""
    algorithm = blake3 if new else hashlib.sha256
    wire = wire_form(raw)
    content = algorithm(wire).hexdigest()
    if not message_id:
        return content, old_fingerprint  # a derived key: the same either way
    digest = algorithm()
    digest.update(f"mid\n{message_id}\n".encode("utf-8", "surrogatepass"))
    end = wire.find(b"\r\n\r\n")
    head, body = (wire, b"") if end < 0 else (wire[:end + 2], memoryview(wire)[end + 2:])
    kept, skipping = [], False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() in LEFT_OUT
        if not skipping:
            kept.append(line)
    digest.update(b"\r\n".join(kept))
    digest.update(body)
    return content, digest.hexdigest()


def _source(row) -> bytes | None:
    """The raw source of an EmailSource row, or None when this one source cannot be read (its
    pack gone, its bytes damaged). A directory that is not configured or not there at all
    (MAILROOM_SOURCE_DIR unset, a volume not mounted where ``migrate`` runs) stops the
    migration instead: passing over every pack would leave all that mail with the old
    hashes, and the sync would store each of it again when it is fetched again."""
    from mailsync import sourcestore
    from mailsync.storage import decompress

    if row.pack:
        folder = sourcestore.directory()
        if folder is None or not folder.is_dir():
            raise RuntimeError(
                f"Mail is stored in pack files, but MAILROOM_SOURCE_DIR ({folder or 'not set'}) "
                "is not a directory here: run migrate where the workers' source directory is "
                "mounted, with the same settings.")
    try:
        data = sourcestore.read(row.pack, row.offset, row.length) if row.pack else row.data
        return decompress(data) if data is not None else None
    except Exception as exc:  # noqa: BLE001  (one missing pack, a damaged frame: keep going)
        log.warning("email %s keeps its hashes: its source could not be read (%s)", row.email_id, exc)
        return None


def _rehash(apps, *, new: bool) -> None:
    from mailsync.mime import parse_envelope

    Email = apps.get_model("mailsync", "Email")
    EmailSource = apps.get_model("mailsync", "EmailSource")
    last = 0
    while True:
        sizes = list(EmailSource.objects.filter(email_id__gt=last).order_by("email_id")
                     .values_list("email_id", "size")[:CHUNK])
        if not sizes:
            return
        ids, total = [], 0
        for email_id, size in sizes:
            if ids and total + size > CHUNK_BYTES:
                break
            ids.append(email_id)
            total += size
        last = ids[-1]
        # Only the hashes: an email's bodies and headers stay in the database.
        emails = Email.objects.only("pk", "fingerprint", "content_hash").in_bulk(ids)
        changed = []
        for row in EmailSource.objects.filter(email_id__in=ids).order_by("email_id"):
            email = emails.get(row.email_id)
            raw = None if email is None else _source(row)
            if raw is None:
                continue
            content, fingerprint = hashes(raw, parse_envelope(raw).message_id, email.fingerprint, new=new)
            if (content, fingerprint) != (email.content_hash, email.fingerprint):
                email.content_hash, email.fingerprint = content, fingerprint
                changed.append(email)
            del raw
        try:
            with transaction.atomic():
                Email.objects.bulk_update(changed, ["content_hash", "fingerprint"], batch_size=CHUNK)
        except IntegrityError:
            # Two stored mails that the new hash calls one (mailbox, fingerprint) cannot
            # happen unless the old one collided; keep the old hashes of that one rather
            # than fail the migration.
            for email in changed:
                try:
                    with transaction.atomic():
                        Email.objects.filter(pk=email.pk).update(
                            content_hash=email.content_hash, fingerprint=email.fingerprint)
                except IntegrityError:
                    log.warning("email %s keeps its old fingerprint (another has the new one)",
                                email.pk)


def forwards(apps, schema_editor) -> None:
    _rehash(apps, new=True)


def backwards(apps, schema_editor) -> None:
    _rehash(apps, new=False)


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('mailsync', '0016_sources_in_pack_files'),
    ]

    operations = [
        migrations.RunPython(forwards, backwards, elidable=True),
    ]
