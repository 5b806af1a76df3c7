# The content hash and the fingerprint of an email are now taken of the message with CRLF line
# ends (as IMAP and POP3 send it) instead of a CRLF -> LF copy of it: that copy was a third of
# the preparing of every fetched message (bench/README.md). Stored emails get their hashes
# recomputed from their raw source, so that a mail fetched again (a UIDVALIDITY change, a copy
# in another folder or mailbox, the Sent copy of a mail sent from the CRM) is still recognized.
#
# The hashing is written out here, both ways, so that later changes to prepare.py do not change
# what this migration computes (the Message-ID still comes from the live parse_envelope, and the
# source from the live decompress). Fingerprints of mail without a Message-ID (a derived key of
# Date, From, Subject, To and the body) did not change; only their content hash does.
#
# Not atomic: each chunk commits on its own, so rows are not locked until the end and memory
# stays bounded (chunks of at most CHUNK rows and CHUNK_BYTES of raw source). Rerunning after an
# interruption is safe: the hashes are recomputed from the source, rows already done are equal.

import hashlib
import logging

from django.db import IntegrityError, migrations, transaction

log = logging.getLogger(__name__)

CHUNK = 500
CHUNK_BYTES = 64 * 1024 * 1024  # raw size; the compressed data is smaller
TRACE_HEADERS = frozenset({
    b"received", b"delivered-to", b"return-path", b"x-original-to", b"x-received",
    b"envelope-to", b"x-envelope-to", b"x-delivered-to", b"x-rcpt-to",
    b"authentication-results", b"received-spf", b"arc-seal", b"arc-message-signature",
    b"arc-authentication-results", b"x-spam-status", b"x-spam-score", b"x-spam-flag",
    b"x-spam-level", b"x-spam-checker-version", b"x-virus-scanned", b"status", b"x-status",
    b"x-keywords", b"x-uid", b"lines", b"content-length",
})


def crlf_form(raw: bytes) -> bytes:
    if raw.count(b"\n") == raw.count(b"\r\n"):  # every LF has its CR
        return raw
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def lf_form(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def hashes(raw: bytes, message_id: str | None, old_fingerprint: str, *, crlf: bool) -> tuple[str, str]:
    """(content hash, fingerprint) of ``raw``: the new definition (``crlf``) or the old one."""
    eol = b"\r\n" if crlf else b"\n"
    form = crlf_form(raw) if crlf else lf_form(raw)
    content = hashlib.sha256(form).hexdigest()
    if not message_id:
        return content, old_fingerprint  # a derived key: the same either way
    digest = hashlib.sha256()
    digest.update(f"mid\n{message_id}\n".encode("utf-8", "surrogatepass"))
    end = form.find(eol + eol)
    head, body = (form, b"") if end < 0 else (form[:end + len(eol)], form[end + len(eol):])
    kept, skipping = [], False
    for line in head.split(eol):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() in TRACE_HEADERS
        if not skipping:
            kept.append(line)
    digest.update(eol.join(kept))
    digest.update(body)
    return content, digest.hexdigest()


def _rehash(apps, *, crlf: bool) -> None:
    from mailsync.mime import parse_envelope
    from mailsync.storage import decompress

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
        chunk = list(EmailSource.objects.filter(email_id__in=ids).values_list("email_id", "data"))
        emails = Email.objects.in_bulk([email_id for email_id, _ in chunk])
        changed = []
        for email_id, data in chunk:
            email = emails.get(email_id)
            if email is None:
                continue
            raw = decompress(data)
            content, fingerprint = hashes(raw, parse_envelope(raw).message_id, email.fingerprint,
                                          crlf=crlf)
            if (content, fingerprint) != (email.content_hash, email.fingerprint):
                email.content_hash, email.fingerprint = content, fingerprint
                changed.append(email)
        try:
            with transaction.atomic():
                Email.objects.bulk_update(changed, ["content_hash", "fingerprint"], batch_size=CHUNK)
        except IntegrityError:
            # Two stored mails that the new hash calls one (mailbox, fingerprint): keep the
            # old hashes of the later one rather than fail the migration.
            for email in changed:
                try:
                    with transaction.atomic():
                        Email.objects.filter(pk=email.pk).update(
                            content_hash=email.content_hash, fingerprint=email.fingerprint)
                except IntegrityError:
                    log.warning("email %s keeps its old fingerprint (another has the new one)",
                                email.pk)


def forwards(apps, schema_editor) -> None:
    _rehash(apps, crlf=True)


def backwards(apps, schema_editor) -> None:
    _rehash(apps, crlf=False)


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('mailsync', '0006_drop_redundant_indexes'),
    ]

    operations = [
        migrations.RunPython(forwards, backwards, elidable=True),
    ]
