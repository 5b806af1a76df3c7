"""emails_parse_pending stores what the parser found, visibly and once."""
from __future__ import annotations

import hashlib

import pytest

from mailsync import services
from mailsync.mime import message as mime_message
from mailsync.models import Attachment, AttachmentBlob, Email, EmailSource
from mailsync.storage import compress
from tests.factories import MailboxFactory

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.4 same bytes in both mails"


def raw_with_pdf(n: int) -> bytes:
    import base64
    return (b"From: a@client.example\r\nTo: sales@example.test\r\nSubject: s%d\r\nMessage-ID: <m%d@x>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
            b"--XX\r\nContent-Type: text/plain\r\n\r\nSee attached\r\n"
            b"--XX\r\nContent-Type: application/pdf; name=q.pdf\r\nContent-Disposition: attachment; filename=q.pdf\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" % (n, n) + base64.encodebytes(PDF) + b"--XX--\r\n")


def store(mailbox, raw: bytes, n: int) -> Email:
    email = Email.objects.create(mailbox=mailbox, fingerprint=f"fp{n}", content_hash=hashlib.sha256(raw).hexdigest(),
                                 direction=Email.Direction.RECEIVED, subject=f"s{n}")
    EmailSource.objects.create(email=email, data=compress(raw), size=len(raw))
    return email


def test_same_attachment_in_two_mails_is_one_blob_and_reparse_adds_no_rows():
    mailbox = MailboxFactory()
    a, b = store(mailbox, raw_with_pdf(1), 1), store(mailbox, raw_with_pdf(2), 2)
    assert services.emails_parse_pending(mailbox_id=mailbox.pk) == 2
    services.email_parse(email=a)  # already parsed: nothing more
    assert AttachmentBlob.objects.filter(sha256=hashlib.sha256(PDF).hexdigest()).count() == 1
    assert Attachment.objects.filter(email=a).count() == 1 and Attachment.objects.filter(email=b).count() == 1
    a.refresh_from_db()
    assert a.text.strip() == "See attached" and a.has_attachments


def test_a_part_the_parser_could_not_read_is_visible_to_the_user(monkeypatch):
    # A parser bug on one part (simulated): the PDF is lost. The user must be told, and Retry
    # ("messages that failed to import") must be able to reach it once the bug is fixed.
    real_leaf = mime_message._Walk.leaf

    def leaf(self, block, body, params, ctype, item):  # noqa: ANN001
        if ctype == "application/pdf":
            raise ValueError("simulated parser bug")
        return real_leaf(self, block, body, params, ctype, item)

    monkeypatch.setattr(mime_message._Walk, "leaf", leaf)
    mailbox = MailboxFactory()
    email = store(mailbox, raw_with_pdf(3), 3)
    services.emails_parse_pending(mailbox_id=mailbox.pk)
    email.refresh_from_db()
    assert email.parse_state == Email.ParseState.FAILED  # listed with Retry in the status
    assert "unreadable" in email.parse_error and not email.has_attachments


def test_a_whole_mime_parse_failure_is_failed_and_retryable(monkeypatch):
    def boom(items):  # noqa: ANN001
        raise MemoryError("simulated")

    monkeypatch.setattr(mime_message, "_pick", boom)
    mailbox = MailboxFactory()
    email = store(mailbox, raw_with_pdf(4), 4)
    services.emails_parse_pending(mailbox_id=mailbox.pk)
    email.refresh_from_db()
    assert email.parse_state == Email.ParseState.FAILED, (email.parse_state, email.parse_error, email.text)


def test_large_mails_are_parsed_in_batches_bounded_in_bytes(monkeypatch, django_capture_on_commit_callbacks):
    """A backlog of large mails is parsed a few at a time (each batch holds its sources in
    memory): a batch of 200 mails of 20 MB would take gigabytes and an OOM kill of the
    worker would repeat it for ever. The parse task chains until every mail is parsed."""
    from mailsync import tasks

    mailbox = MailboxFactory()
    emails = [store(mailbox, raw_with_pdf(n), n) for n in range(1, 6)]
    for email in emails:  # as if each were 30 MB
        Email.objects.filter(pk=email.pk).update(size=30 * 1024 * 1024)
    assert services.emails_parse_pending(mailbox_id=mailbox.pk) == 2  # 64 MB per batch
    with django_capture_on_commit_callbacks(execute=True):
        tasks.parse_emails.delay(mailbox.pk)  # eager: chains batch after batch
    assert not Email.objects.filter(mailbox=mailbox, parse_state=Email.ParseState.PENDING).exists()
    # One mail larger than the bound is still parsed (alone)
    big = store(mailbox, raw_with_pdf(9), 9)
    Email.objects.filter(pk=big.pk).update(size=500 * 1024 * 1024)
    assert services.emails_parse_pending(mailbox_id=mailbox.pk) == 1
