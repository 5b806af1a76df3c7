"""Data migrations. 0007: emails stored with the old hashes (taken of a CRLF -> LF copy) get the hashes
of the CRLF form, so a mail fetched again is still recognized and not stored twice; and back
again. 0010: the fingerprint leaves Bcc out. 0017: both hashes are BLAKE3 instead of SHA-256;
what 0007 and 0010 computed is what 0017 starts from, and 0017 computes what the sync does now."""
from __future__ import annotations

import importlib

import pytest
from django.apps import apps

from mailsync.models import Email, EmailSource
from mailsync.protocols.base import FetchedMessage
from mailsync.storage import compress
from mailsync.sync.prepare import prepare
from tests.corpus import corpus_files
from tests.factories import MailboxFactory

migration = importlib.import_module("mailsync.migrations.0007_wire_form_hashes")
blake3_migration = importlib.import_module("mailsync.migrations.0017_blake3_hashes")

RAW = (b"Received: from mx.example.net by mx.example.com; Mon, 6 May 2024 10:00:00 +0000\r\n"
       b"Message-ID: <offer-1@client.example>\r\n"
       b"From: Ann Buyer <ann@client.example>\r\nTo: sales@example.com\r\n"
       b"Subject: Our offer\r\nDate: Mon, 6 May 2024 09:59:00 +0000\r\n\r\n"
       b"Hello,\r\n.\r\nsee the offer.\r\n")
NO_ID = RAW.replace(b"Message-ID: <offer-1@client.example>\r\n", b"")


def _old(raw: bytes, fingerprint: str) -> tuple[str, str]:
    from mailsync.mime import parse_envelope

    return migration.hashes(raw, parse_envelope(raw).message_id, fingerprint, crlf=False)


def test_the_migration_computes_what_0017_starts_from():
    """Its frozen copy of the hashing agrees with the SHA-256 hashes 0017 replaces (the
    sync's before 0017; Bcc aside, which 0010 left out later), on the shared corpus too."""
    from mailsync.mime import parse_envelope

    for raw in [RAW, NO_ID, RAW.replace(b"\r\n", b"\n")] + [p.read_bytes() for p in corpus_files()]:
        if b"\nbcc:" in raw.lower() or b"\nresent-bcc:" in raw.lower():
            continue
        p = prepare(FetchedMessage(uid=1, flags=(), size=len(raw), internal_date=None, raw=raw))
        mid = parse_envelope(raw).message_id
        assert migration.hashes(raw, mid, p.fingerprint, crlf=True) \
            == blake3_migration.hashes(raw, mid, p.fingerprint, new=False)


def test_old_and_new_hashes_differ_and_lf_copies_match_in_both():
    content, fp = migration.hashes(RAW, "offer-1@client.example", "", crlf=True)
    old_content, old_fp = migration.hashes(RAW, "offer-1@client.example", "", crlf=False)
    assert content != old_content and fp != old_fp
    lf = RAW.replace(b"\r\n", b"\n")
    assert migration.hashes(lf, "offer-1@client.example", "", crlf=True) == (content, fp)
    assert migration.hashes(lf, "offer-1@client.example", "", crlf=False) == (old_content, old_fp)
    # A trace header does not change who the mail is
    moved = b"Delivered-To: other@example.com\r\n" + RAW
    assert migration.hashes(moved, "offer-1@client.example", "", crlf=True)[1] == fp


def _sha256(raw: bytes, fingerprint: str) -> tuple[str, str]:
    """The hashes before 0017 (SHA-256)."""
    from mailsync.mime import parse_envelope

    return blake3_migration.hashes(raw, parse_envelope(raw).message_id, fingerprint, new=False)


def _prepared(raw: bytes):
    return prepare(FetchedMessage(uid=1, flags=(), size=len(raw), internal_date=None, raw=raw))


def test_bare_line_ends_neither_merge_two_mails_nor_split_copies_of_one():
    """Found in review: deciding "already CRLF" by equal CR and LF counts let bare CRs balance
    bare LFs; two mails then hid their From/Subject in a dropped Received line and shared a
    fingerprint (the second would never be stored)."""
    a = (b"Message-ID: <m@x>\r\nReceived: by mx\nFrom: boss@corp.example\nSubject: Pay invoice 1"
         b"\r\n\r\nSee\r attached\r.\r\n")
    b = a.replace(b"boss@corp.example", b"eve@evil.example").replace(b"invoice 1", b"invoice 2")
    assert a.count(b"\r") == a.count(b"\n")
    assert _prepared(a).fingerprint != _prepared(b).fingerprint
    assert _prepared(a).content_hash != _prepared(b).content_hash
    # A CRLF mail with a bare CR and a bare LF in its body matches its LF copy
    mixed = RAW.replace(b"see the offer.", b"see\rthe\noffer.")
    lf = mixed.replace(b"\r\n", b"\n")
    assert (_prepared(mixed).content_hash, _prepared(mixed).fingerprint) == \
        (_prepared(lf).content_hash, _prepared(lf).fingerprint)


@pytest.mark.django_db
def test_stored_emails_are_rehashed_forwards_and_back():
    mailbox = MailboxFactory()
    stored = {}
    for n, raw in enumerate([RAW, NO_ID]):
        p = prepare(FetchedMessage(uid=n + 1, flags=(), size=len(raw), internal_date=None, raw=raw))
        old_content, old_fp = _old(raw, p.fingerprint)
        email = Email.objects.create(mailbox=mailbox, fingerprint=old_fp, content_hash=old_content,
                                     direction="received")
        EmailSource.objects.create(email=email, data=compress(raw), size=len(raw))
        stored[email.pk] = (p, old_content, old_fp)
    without_source = Email.objects.create(mailbox=mailbox, fingerprint="kept", content_hash="kept",
                                          direction="received")

    migration.forwards(apps, None)
    for pk, (p, _, _) in stored.items():
        email = Email.objects.get(pk=pk)
        raw = [RAW, NO_ID][list(stored).index(pk)]
        assert (email.content_hash, email.fingerprint) == _sha256(raw, p.fingerprint)
    # Without a Message-ID the fingerprint is a derived key, the same before and after
    no_id = Email.objects.get(pk=list(stored)[1])
    assert no_id.fingerprint == stored[no_id.pk][2]
    without_source.refresh_from_db()
    assert (without_source.fingerprint, without_source.content_hash) == ("kept", "kept")

    migration.backwards(apps, None)
    for pk, (_, old_content, old_fp) in stored.items():
        email = Email.objects.get(pk=pk)
        assert (email.content_hash, email.fingerprint) == (old_content, old_fp)


@pytest.mark.django_db
def test_compressed_columns_are_not_compressed_again_by_postgresql():
    """Migrations 0002 and 0008: zstd output is stored EXTERNAL (no pglz attempt on every value)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, a.attname, a.attstorage FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid WHERE (c.relname, a.attname) IN "
            "(('mailsync_emailsource', 'data'), ('mailsync_attachmentblob', 'data'), "
            "('mailsync_messageerror', 'raw'))")
        storage = {(table, column): mode for table, column, mode in cursor.fetchall()}
    assert storage == {("mailsync_emailsource", "data"): "e", ("mailsync_attachmentblob", "data"): "e",
                       ("mailsync_messageerror", "raw"): "e"}


bcc_migration = importlib.import_module("mailsync.migrations.0010_fingerprint_without_bcc")


def test_0010_computes_the_fingerprint_0017_starts_from():
    """Its frozen hashing agrees with the SHA-256 fingerprint 0017 replaces, Bcc or not, on the
    shared corpus too; and a copy without its Bcc header is the same mail."""
    from mailsync.mime import parse_envelope

    with_bcc = RAW.replace(b"To: sales@example.com\r\n", b"To: sales@example.com\r\nBcc: me@example.com\r\n")
    for raw in [RAW, with_bcc, with_bcc.replace(b"\r\n", b"\n")] + [p.read_bytes() for p in corpus_files()]:
        mid = parse_envelope(raw).message_id
        if mid:
            assert bcc_migration.fingerprint(raw, mid, bcc_migration.WITHOUT_BCC) \
                == blake3_migration.hashes(raw, mid, "", new=False)[1]
    assert _prepared(with_bcc).fingerprint == _prepared(RAW).fingerprint
    assert _prepared(with_bcc).content_hash != _prepared(RAW).content_hash  # the bytes differ


@pytest.mark.django_db
def test_0010_rehashes_stored_mail_with_bcc_forwards_and_back():
    from mailsync.models import EmailParticipant

    mailbox = MailboxFactory()
    with_bcc = RAW.replace(b"To: sales@example.com\r\n", b"To: sales@example.com\r\nBcc: me@example.com\r\n")
    old = bcc_migration.fingerprint(with_bcc, "offer-1@client.example", bcc_migration.TRACE_HEADERS)
    email = Email.objects.create(mailbox=mailbox, fingerprint=old, content_hash="h", direction="sent",
                                 message_id="offer-1@client.example")
    EmailSource.objects.create(email=email, data=compress(with_bcc), size=len(with_bcc))
    EmailParticipant.objects.create(email=email, role="bcc", name="", address="me@example.com")
    untouched = Email.objects.create(mailbox=mailbox, fingerprint="no-bcc", content_hash="h",
                                     direction="received", message_id="other@client.example")

    bcc_migration.forwards(apps, None)
    email.refresh_from_db()
    assert email.fingerprint == _sha256(RAW, "")[1]  # = its copy without Bcc
    untouched.refresh_from_db()
    assert untouched.fingerprint == "no-bcc"
    bcc_migration.backwards(apps, None)
    email.refresh_from_db()
    assert email.fingerprint == old


# -- 0017: BLAKE3 -----------------------------------------------------------------------------
def test_0017_computes_what_the_sync_computes():
    """Its frozen BLAKE3 hashing agrees with prepare() and mime.content_hash today, on the
    shared corpus too; SHA-256 (before) gives other values, and an LF copy is the same mail."""
    from mailsync.mime import content_hash, parse_envelope

    for raw in [RAW, NO_ID, RAW.replace(b"\r\n", b"\n")] + [p.read_bytes() for p in corpus_files()]:
        p = _prepared(raw)
        mid = parse_envelope(raw).message_id
        assert blake3_migration.hashes(raw, mid, p.fingerprint, new=True) == (p.content_hash, p.fingerprint)
        assert content_hash(raw) == p.content_hash
        before = blake3_migration.hashes(raw, mid, p.fingerprint, new=False)
        assert before[0] != p.content_hash
        assert (before[1] != p.fingerprint) == bool(mid)  # a derived key stays as it is
    assert _prepared(RAW.replace(b"\r\n", b"\n")).fingerprint == _prepared(RAW).fingerprint
    # A trace header or a Bcc does not change who the mail is; another body does
    assert _prepared(b"Delivered-To: other@example.com\r\n" + RAW).fingerprint == _prepared(RAW).fingerprint
    assert _prepared(RAW.replace(b"see the offer", b"see the offer!")).fingerprint != _prepared(RAW).fingerprint


@pytest.mark.django_db
def test_0017_rehashes_stored_mail_in_the_database_and_in_packs_forwards_and_back(settings, tmp_path, caplog):
    """Emails stored with SHA-256 hashes get the sync's BLAKE3 hashes, whether the source is
    in the database or in a pack file, so a mail fetched again is recognized (not stored
    twice); a pack that is gone leaves its email's hashes alone (with a warning) and the
    migration goes on; backwards restores the SHA-256 hashes."""
    from mailsync import sourcestore
    from mailsync.sync.ingest import ingest_batch  # noqa: F401  (the sync's own module loads)

    settings.MAILROOM_SOURCE_DIR = tmp_path / "sources"
    mailbox = MailboxFactory()
    raws = [RAW, NO_ID, RAW.replace(b"offer-1@", b"offer-2@")]
    name, offsets = sourcestore.write_pack([compress(raws[1]), compress(raws[2])])
    lost, lost_offsets = sourcestore.write_pack([compress(raws[0])])
    stored = {}
    for n, raw in enumerate(raws):
        p = _prepared(raw)
        old = _sha256(raw, p.fingerprint)
        email = Email.objects.create(mailbox=mailbox, fingerprint=old[1], content_hash=old[0],
                                     direction="received", message_id=p.envelope.message_id or "")
        if n == 0:
            EmailSource.objects.create(email=email, data=compress(raw), size=len(raw))
        else:
            EmailSource.objects.create(email=email, pack=name, offset=offsets[n - 1],
                                       length=len(compress(raw)), size=len(raw))
        stored[email.pk] = (p, old)
    missing_raw = RAW.replace(b"offer-1@", b"offer-3@")
    missing_old = _sha256(missing_raw, "")
    missing = Email.objects.create(mailbox=mailbox, fingerprint=missing_old[1], content_hash=missing_old[0],
                                   direction="received", message_id="offer-3@client.example")
    EmailSource.objects.create(email=missing, pack=lost, offset=lost_offsets[0],
                               length=len(compress(raws[0])), size=len(missing_raw))
    sourcestore.path_of(lost).unlink()

    with caplog.at_level("WARNING"):
        blake3_migration.forwards(apps, None)
    for pk, (p, _) in stored.items():
        email = Email.objects.get(pk=pk)
        assert (email.content_hash, email.fingerprint) == (p.content_hash, p.fingerprint)
    missing.refresh_from_db()
    assert (missing.content_hash, missing.fingerprint) == missing_old
    assert f"email {missing.pk} keeps its hashes" in caplog.text

    # Run twice (an interrupted run resumed): the same
    blake3_migration.forwards(apps, None)
    assert {e.pk: (e.content_hash, e.fingerprint) for e in Email.objects.filter(pk__in=stored)} \
        == {pk: (p.content_hash, p.fingerprint) for pk, (p, _) in stored.items()}

    blake3_migration.backwards(apps, None)
    for pk, (_, old) in stored.items():
        email = Email.objects.get(pk=pk)
        assert (email.content_hash, email.fingerprint) == old
