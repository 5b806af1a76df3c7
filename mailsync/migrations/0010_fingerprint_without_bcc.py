# The fingerprint no longer covers Bcc (nor Resent-Bcc): the sender's copies of a mail carry it
# (the CRM's stored copy, a Sent folder's) and the copy delivered to a Bcc recipient does not,
# so a mail Bcc'd to oneself came back as a second email. Stored emails that have Bcc
# recipients and a Message-ID get their fingerprint recomputed from their raw source (mail
# without a Bcc header hashes the same as before; mail without a Message-ID has a derived key
# that never covered Bcc).
#
# The hashing is written out here (as in 0007) so that later changes to prepare.py do not
# change what this migration computes. Not atomic: chunks commit on their own; rerunning is safe.

import hashlib
import logging

from django.db import IntegrityError, migrations, transaction

log = logging.getLogger(__name__)

CHUNK = 500
TRACE_HEADERS = frozenset({
    b"received", b"delivered-to", b"return-path", b"x-original-to", b"x-received",
    b"envelope-to", b"x-envelope-to", b"x-delivered-to", b"x-rcpt-to",
    b"authentication-results", b"received-spf", b"arc-seal", b"arc-message-signature",
    b"arc-authentication-results", b"x-spam-status", b"x-spam-score", b"x-spam-flag",
    b"x-spam-level", b"x-spam-checker-version", b"x-virus-scanned", b"status", b"x-status",
    b"x-keywords", b"x-uid", b"lines", b"content-length",
})
WITHOUT_BCC = TRACE_HEADERS | {b"bcc", b"resent-bcc"}


def crlf_form(raw: bytes) -> bytes:
    if raw.count(b"\n") == raw.count(b"\r\n"):  # every LF has its CR
        return raw
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def fingerprint(raw: bytes, message_id: str, left_out: frozenset) -> str:
    form = crlf_form(raw)
    digest = hashlib.sha256()
    digest.update(f"mid\n{message_id}\n".encode("utf-8", "surrogatepass"))
    end = form.find(b"\r\n\r\n")
    head, body = (form, b"") if end < 0 else (form[:end + 2], form[end + 2:])
    kept, skipping = [], False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() in left_out
        if not skipping:
            kept.append(line)
    digest.update(b"\r\n".join(kept))
    digest.update(body)
    return digest.hexdigest()


def _rehash(apps, left_out: frozenset) -> None:
    from mailsync.mime import parse_envelope
    from mailsync.storage import decompress

    Email = apps.get_model("mailsync", "Email")
    EmailParticipant = apps.get_model("mailsync", "EmailParticipant")
    EmailSource = apps.get_model("mailsync", "EmailSource")
    # Mail with Bcc recipients, and every sent mail (the copies that carry Bcc headers, an
    # empty one or Resent-Bcc included); others hash the same either way.
    ids = sorted(set(EmailParticipant.objects.filter(role="bcc").values_list("email_id", flat=True))
                 | set(Email.objects.filter(direction="sent").values_list("pk", flat=True)))
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        emails = Email.objects.in_bulk(chunk)
        for email_id, data in EmailSource.objects.filter(email_id__in=chunk).values_list("email_id", "data"):
            email = emails.get(email_id)
            if email is None or not email.message_id:
                continue
            raw = decompress(data)
            message_id = parse_envelope(raw).message_id
            if not message_id:
                continue
            new = fingerprint(raw, message_id, left_out)
            if new == email.fingerprint:
                continue
            try:
                with transaction.atomic():
                    Email.objects.filter(pk=email.pk).update(fingerprint=new)
            except IntegrityError:
                # Its Bcc-less copy is stored already (the duplicate this fixes): both stay.
                log.warning("email %s keeps its old fingerprint (another has the new one)", email.pk)


def forwards(apps, schema_editor) -> None:
    _rehash(apps, WITHOUT_BCC)


def backwards(apps, schema_editor) -> None:
    _rehash(apps, TRACE_HEADERS)


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('mailsync', '0009_port_range'),
    ]

    operations = [
        migrations.RunPython(forwards, backwards, elidable=True),
    ]
