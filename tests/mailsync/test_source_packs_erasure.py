"""Deleted mail leaves the disk too: the daily sweep rewrites a pack that still holds the
source of a deleted mail beside live ones (``sourcestore.compact``), and removes a pack no
row names once it is older than the grace period. Real Dovecot, real PostgreSQL, real files:
the proof reads every byte of every pack back and looks for each mail's marker."""
from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import pytest
import zstandard
from django.utils import timezone

from mailsync import services, sourcestore
from mailsync.models import Email, EmailSource
from mailsync.storage import decompress
from mailsync.sync.copy import read_source
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def packs_dir(settings, tmp_path):
    settings.MAILROOM_SOURCE_DIR = tmp_path / "sources"
    return settings.MAILROOM_SOURCE_DIR


def _on_disk(folder) -> bytes:  # noqa: ANN001
    """Every pack's content, decompressed frame after frame: all the mail bytes on disk."""
    out = []
    for path in sorted(folder.rglob("*" + sourcestore.SUFFIX)):
        with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(
                f, read_across_frames=True) as reader:
            out.append(reader.read())
    return b"".join(out)


def _deliver_marked(dovecot, mail_user, count: int) -> dict[str, bytes]:  # noqa: ANN001
    sent = {}
    for _ in range(count):
        marker = f"marker-{uuid.uuid4().hex}"
        raw = make_message(subject=marker, body=f"Body of {marker}.\n")
        dovecot.deliver(mail_user, raw)
        sent[marker] = raw
    return sent


def _sync(mailbox) -> None:  # noqa: ANN001
    ImapSync(mailbox, timeout=10).run()


def test_purged_mail_is_erased_from_the_packs_and_live_mail_still_reads(
        dovecot, mail_user, imap_mailbox, packs_dir):
    sent = _deliver_marked(dovecot, mail_user, 12)
    _sync(imap_mailbox)
    emails = {e.subject: e for e in Email.objects.filter(mailbox=imap_mailbox)}
    assert set(emails) == set(sent)
    disk = _on_disk(packs_dir)
    assert all(marker.encode() in disk for marker in sent)
    assert EmailSource.objects.filter(email__mailbox=imap_mailbox, data__isnull=True).exclude(pack="").count() == 12
    before = {marker: decompress(read_source(e.pk)) for marker, e in emails.items()}
    assert all(marker.encode() in raw for marker, raw in before.items())

    # Four mails were deleted on the server long ago: tombstones past the retention.
    gone = sorted(sent)[:4]
    Email.objects.filter(mailbox=imap_mailbox, subject__in=gone).update(
        deleted_at=timezone.now() - timedelta(days=40))
    assert services.emails_purge_tombstones(older_than_days=30) == 4  # mails, not rows
    assert not Email.objects.filter(subject__in=gone).exists()
    # Until the sweep, the bytes are still on disk (the rows are gone).
    assert all(marker.encode() in _on_disk(packs_dir) for marker in gone)

    result = sourcestore.sweep()
    assert result.compacted >= 1 and result.freed > 0
    disk = _on_disk(packs_dir)
    for marker in gone:
        assert marker.encode() not in disk, "a purged mail is still on the disk"
    for marker in sorted(sent)[4:]:
        assert marker.encode() in disk
        assert decompress(read_source(emails[marker].pk)) == before[marker]  # byte-exact
    # Nothing more to do on a second sweep.
    again = sourcestore.sweep()
    assert (again.removed, again.compacted) == (0, 0)


def test_a_deleted_mailbox_leaves_no_pack_behind_once_the_grace_is_over(
        dovecot, mail_user, imap_mailbox, packs_dir):
    _deliver_marked(dovecot, mail_user, 5)
    _sync(imap_mailbox)
    packs = list(packs_dir.rglob("*" + sourcestore.SUFFIX))
    assert packs
    imap_mailbox.delete()
    # Young: a batch writing that pack could still be about to commit its rows.
    assert sourcestore.sweep().removed == 0
    assert all(p.exists() for p in packs)
    result = sourcestore.sweep(now=time.time() + sourcestore.SWEEP_GRACE + 60)
    assert result.removed == len(packs)
    assert not list(packs_dir.rglob("*" + sourcestore.SUFFIX))


def test_a_reader_with_the_old_place_still_gets_the_mail_after_a_compaction(
        dovecot, mail_user, imap_mailbox, packs_dir):
    sent = _deliver_marked(dovecot, mail_user, 6)
    _sync(imap_mailbox)
    keep, drop = Email.objects.filter(mailbox=imap_mailbox).order_by("pk")[:2]
    source = EmailSource.objects.get(email=keep)
    old_place = (source.pack, source.offset, source.length)
    before = decompress(read_source(keep.pk))
    drop.delete()
    assert sourcestore.sweep().compacted == 1
    # The old pack is gone; the row names the new one.
    with pytest.raises(sourcestore.SourceMissing):
        sourcestore.read(*old_place)
    source.refresh_from_db()
    assert source.pack != old_place[0]
    assert decompress(read_source(keep.pk)) == before
    # A model instance loaded before the compaction reads again instead of failing.
    stale = EmailSource(email_id=keep.pk, pack=old_place[0], offset=old_place[1],
                        length=old_place[2], size=source.size)
    assert decompress(stale.compressed()) == before
    assert before.split(b"\n")[0]  # not empty
    assert keep.subject in sent


def test_an_orphan_pack_of_a_batch_that_never_committed_goes_after_the_grace(packs_dir):
    name, _ = sourcestore.write_pack([b"never committed"])
    path = sourcestore.path_of(name)
    assert path.exists()
    assert sourcestore.sweep().removed == 0
    old = time.time() - sourcestore.SWEEP_GRACE - 60
    os.utime(path, (old, old))
    assert sourcestore.sweep().removed == 1
    assert not path.exists()


def test_the_sweep_reports_packs_its_mails_name_that_are_gone_or_cut_short(
        dovecot, mail_user, imap_mailbox, packs_dir, caplog):
    """An operator learns from the nightly sweep that mail cannot be read (a directory not
    shared by every host, a restore without the packs), and touches nothing else."""
    _deliver_marked(dovecot, mail_user, 3)
    _sync(imap_mailbox)
    assert sourcestore.sweep().missing == 0
    name = EmailSource.objects.filter(email__mailbox=imap_mailbox).values_list("pack", flat=True).first()
    path = sourcestore.path_of(name)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with caplog.at_level("ERROR", logger="mailsync.sourcestore"):
        result = sourcestore.sweep()
    assert result.missing == 1 and "cut short" in caplog.text
    assert path.exists()  # never removed: the rows still name it
    path.unlink()
    caplog.clear()
    with caplog.at_level("ERROR", logger="mailsync.sourcestore"):
        result = sourcestore.sweep(now=time.time() + sourcestore.SWEEP_GRACE + 60)
    assert result.missing == 1 and "is missing" in caplog.text
    assert result.removed == 0
