"""Raw sources in pack files on disk (MAILROOM_SOURCE_DIR, mailsync/sourcestore.py), against
the private Dovecot, the SMTP test server and PostgreSQL; nothing of ours is mocked (spies
only record calls where the order is the point).

What an operator or a user would notice: every message the server holds reads back from the
CRM byte for byte, whichever way its source was stored (a pack, or the database before the
setting was turned on); nothing is lost or stored twice when the disk refuses a write or a
worker dies mid-run, and the status says what to check; a pack that went missing makes its
mails "failed to read", not a 500; a row naming a path outside the directory is refused; the
nightly sweep erases what deleted mail and uncommitted batches left on disk, and nothing
else."""
from __future__ import annotations

import builtins
import email.parser
import email.policy
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from rest_framework.test import APIClient

import mailsync.sync.imap as engine
from mailsync import sending, services, sourcestore, tasks
from mailsync.exceptions import MailServerUnreachable, SourceStoreError
from mailsync.models import Email, EmailLocation, EmailSource, MailFolder, Mailbox
from mailsync.selectors import mailbox_status
from mailsync.storage import compress, decompress
from mailsync.sync import copy as source_copy
from mailsync.sync.copy import read_source
from mailsync.sync.pop3 import Pop3Sync
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import imap_sync, kill_worker_midway, make_message, tmpfs

pytestmark = pytest.mark.django_db

FAR_FUTURE = lambda: time.time() + sourcestore.SWEEP_GRACE + 60  # noqa: E731


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture
def source_dir(settings, tmp_path) -> Path:
    """This test's own pack directory (not created yet: the first write makes it)."""
    folder = tmp_path / "sources"
    settings.MAILROOM_SOURCE_DIR = folder
    return folder


def deliver(dovecot, user, n: int, prefix: str, *, attachment_size: int = 0) -> list[str]:  # noqa: ANN001
    """``n`` messages with distinct subjects; random (incompressible) attachments of varied
    sizes when ``attachment_size`` is given, so pieces and offsets in a pack differ."""
    subjects = []
    for i in range(n):
        subject = f"{prefix} {i:02d}"
        attachment = None
        if attachment_size:
            attachment = ("data.bin", os.urandom(attachment_size + 997 * i), "application/octet-stream")
        dovecot.deliver(user, make_message(subject=subject, body=f"Body of {subject}\nÄÖÜ 8-bit text.\n",
                                           attachment=attachment))
        subjects.append(subject)
    return subjects


def server_sources(dovecot, user, folder: str = "INBOX") -> dict[int, bytes]:  # noqa: ANN001
    """UID -> the message exactly as the server holds it (BODY.PEEK[]: nothing marked read)."""
    imap = dovecot.imap_login(user)
    try:
        typ, data = imap.select(f'"{folder}"', readonly=True)
        assert typ == "OK", data
        if int(data[0]) == 0:
            return {}
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK", data
        found = {}
        for item in data:
            if isinstance(item, tuple):
                found[int(re.search(rb"UID (\d+)", item[0]).group(1))] = item[1]
        return found
    finally:
        imap.logout()


def by_subject(sources: dict[int, bytes]) -> dict[str, bytes]:
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    return {str(parser.parsebytes(raw)["Subject"]): raw for raw in sources.values()}


def crm_source(email_id: int) -> bytes:
    compressed = read_source(email_id)
    assert compressed is not None, f"email {email_id} has no stored source"
    return decompress(compressed)


def crm_sources(mailbox: Mailbox, folder: str = "INBOX") -> dict[int, bytes]:
    """UID -> the CRM's stored source of the mail at that place."""
    return {uid: crm_source(email_id) for uid, email_id in EmailLocation.objects.filter(
        folder__mailbox=mailbox, folder__name=folder).values_list("uid", "email_id")}


def packs_on_disk(folder: Path) -> set[str]:
    names = {p.name[:-len(sourcestore.SUFFIX)] for p in folder.glob(f"??/*{sourcestore.SUFFIX}")}
    return {n for n in names if re.fullmatch(r"[0-9a-f]{32}", n)}


def packs_named() -> set[str]:
    return set(EmailSource.objects.exclude(pack="").values_list("pack", flat=True))


def removed_count(result) -> int:  # noqa: ANN001
    """How many packs a sweep removed: an int, or the ``removed`` of a richer result."""
    if isinstance(result, int):
        return result
    if isinstance(result, dict):
        return result["removed"]
    return result.removed


def assert_in_packs(mailbox: Mailbox, folder: Path) -> None:
    rows = EmailSource.objects.filter(email__mailbox=mailbox)
    assert rows.exists()
    assert not rows.filter(pack="").exists(), "a source was stored in the database"
    assert not rows.filter(data__isnull=False).exists()
    named = set(rows.values_list("pack", flat=True))
    assert named <= packs_on_disk(folder), "a row names a pack that is not on disk"
    for name in named:
        assert sourcestore.path_of(name).parent.parent == folder
        assert sourcestore.path_of(name).name == f"{name}{sourcestore.SUFFIX}"
        assert re.fullmatch(r"[0-9a-f]{32}", name) and sourcestore.path_of(name).parent.name == name[:2]


def assert_every_email_has_a_source(mailbox: Mailbox) -> None:
    orphans = Email.objects.filter(mailbox=mailbox, source_data__isnull=True)
    assert not orphans.exists(), list(orphans.values_list("subject", flat=True))


def assert_cursor_claims_only_stored_mail(dovecot, user, mailbox: Mailbox) -> None:  # noqa: ANN001
    """MailFolder's invariant: every server UID in [uid_low, uid_high] is stored."""
    for folder in MailFolder.objects.filter(mailbox=mailbox, uidvalidity__isnull=False):
        located = set(EmailLocation.objects.filter(folder=folder, uidvalidity=folder.uidvalidity)
                      .values_list("uid", flat=True))
        low = folder.uid_low if folder.uid_low is not None else 1
        claimed = {u for u in dovecot.folder_state(user, folder.name).uids if low <= u <= folder.uid_high}
        assert claimed <= located, (folder.name, sorted(claimed - located), folder.uid_low, folder.uid_high)


def broken_dir(tmp_path: Path) -> Path:
    """A MAILROOM_SOURCE_DIR that cannot be created: beneath a regular file (ENOTDIR; the
    tests run as root, so permissions would not stop a write)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"a regular file")
    return blocker / "sources"


# 1. An initial sync stores every source in packs, byte-exact ---------------------------------
def test_imap_initial_sync_in_several_batches_through_the_fetch_process_stores_in_packs(
        dovecot, mail_user, imap_mailbox, source_dir, settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 4)
    children = []
    real_fetch_in_child = engine.fetch_in_child

    def fetch_in_child(job, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202  (records only)
        children.append(len(job.batches))
        return real_fetch_in_child(job, *args, **kwargs)

    monkeypatch.setattr(engine, "fetch_in_child", fetch_in_child)
    deliver(dovecot, mail_user, 26, "Packed", attachment_size=3_000)
    dovecot.deliver(mail_user, make_message(subject="Large", attachment=(
        "big.bin", os.urandom(1_500_000), "application/octet-stream")))
    dovecot.deliver(mail_user, make_message(subject="Empty body", body=""))
    for i in range(2):
        dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{mail_user.email}>",
                                                       to="customer@client.example", subject=f"Sent {i}"))

    report = imap_sync(imap_mailbox)

    assert report.new == 30
    assert children, "the download did not go through the fetch process"
    assert_in_packs(imap_mailbox, source_dir)
    # One pack per stored batch (several batches, none over BATCH_MESSAGES sources)
    per_pack: dict[str, int] = {}
    for name in EmailSource.objects.filter(email__mailbox=imap_mailbox).values_list("pack", flat=True):
        per_pack[name] = per_pack.get(name, 0) + 1
    assert len(per_pack) >= 7 and max(per_pack.values()) <= 4, per_pack
    # Every message reads back exactly as the server holds it, in both folders
    for folder in ("INBOX", "Sent"):
        server = server_sources(dovecot, mail_user, folder)
        assert crm_sources(imap_mailbox, folder) == server, folder
    # The model's own accessor agrees with read_source
    for row in EmailSource.objects.filter(email__mailbox=imap_mailbox)[:5]:
        assert bytes(row.compressed()) == bytes(read_source(row.email_id))
        assert len(decompress(row.compressed())) == row.size
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "completed"


@pytest.mark.parametrize("fetch", ["thread", "process"])
def test_pop3_download_stores_in_packs_byte_exact(dovecot, mail_user, pop3_mailbox, source_dir,
                                                  settings, fetch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0 if fetch == "thread" else 1
    deliver(dovecot, mail_user, 7, "Pop", attachment_size=2_000)
    # Read over IMAP (same store, PEEK) before POP3 takes them off the server.
    originals = by_subject(server_sources(dovecot, mail_user))

    report = Pop3Sync(Mailbox.objects.get(pk=pop3_mailbox.pk), timeout=10).run()

    assert report.new == 7
    assert dovecot.folder_state(mail_user).count == 0  # the default mode: removed after download
    assert_in_packs(pop3_mailbox, source_dir)
    stored = {e.subject: crm_source(e.pk) for e in Email.objects.filter(mailbox=pop3_mailbox)}
    assert stored == originals


# 2. Sources in the database, then the setting turned on: a mix that reads back ---------------
def test_sources_in_the_database_then_packs_read_back_and_parse(dovecot, mail_user, imap_mailbox,
                                                                 settings, tmp_path):
    packs = tmp_path / "sources"
    settings.MAILROOM_SOURCE_DIR = None
    old = deliver(dovecot, mail_user, 4, "Before", attachment_size=1_000)
    imap_sync(imap_mailbox)

    rows = EmailSource.objects.filter(email__mailbox=imap_mailbox)
    assert rows.count() == 4
    assert not rows.exclude(pack="").exists() and not rows.filter(data__isnull=True).exists()
    assert not packs.exists()
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)

    settings.MAILROOM_SOURCE_DIR = packs
    new = deliver(dovecot, mail_user, 4, "After", attachment_size=1_000)
    imap_sync(imap_mailbox)

    in_db = set(rows.filter(pack="", data__isnull=False).values_list("email__subject", flat=True))
    in_packs = set(rows.exclude(pack="").filter(data__isnull=True).values_list("email__subject", flat=True))
    assert in_db == set(old) and in_packs == set(new)
    assert packs_named() <= packs_on_disk(packs)
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)

    # Body parsing reads both kinds
    while services.emails_parse_pending(mailbox_id=imap_mailbox.pk):
        pass
    for e in Email.objects.filter(mailbox=imap_mailbox):
        assert e.parse_state == Email.ParseState.PARSED, (e.subject, e.parse_error)
        assert f"Body of {e.subject}" in e.text and e.has_attachments

    # Turned off again: the database's sources still read; those in packs say what to set.
    settings.MAILROOM_SOURCE_DIR = None
    for e in Email.objects.filter(mailbox=imap_mailbox, subject__in=old):
        assert crm_source(e.pk)
    with pytest.raises(SourceStoreError, match="MAILROOM_SOURCE_DIR"):
        read_source(Email.objects.get(mailbox=imap_mailbox, subject=new[0]).pk)


# 3. The store fails: nothing lost, the status says what to check -----------------------------
def test_imap_sync_while_the_source_dir_cannot_be_written_loses_nothing(
        dovecot, mail_user, imap_mailbox, settings, tmp_path, monkeypatch):
    good = tmp_path / "sources"
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    first = deliver(dovecot, mail_user, 12, "Initial", attachment_size=1_000)

    # The initial sync (fetch process, several batches) on a broken directory
    settings.MAILROOM_SOURCE_DIR = broken_dir(tmp_path)
    with pytest.raises(SourceStoreError):
        imap_sync(imap_mailbox)
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["state"] == "error" and status["last_error_code"] == "storage", status
    assert "MAILROOM_SOURCE_DIR" in status["last_error"], status["last_error"]
    assert not status["needs_user"]  # retried by itself, not the mailbox owner's to fix
    assert not Email.objects.filter(mailbox=imap_mailbox).exists()
    assert not EmailSource.objects.exists()
    assert_cursor_claims_only_stored_mail(dovecot, mail_user, imap_mailbox)

    # Fixed: everything comes, once
    settings.MAILROOM_SOURCE_DIR = good
    imap_sync(imap_mailbox)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == first
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)
    assert_in_packs(imap_mailbox, good)
    inbox_before = MailFolder.objects.get(mailbox=imap_mailbox, name="INBOX")

    # New mail while the directory is broken again (the incremental path, in a thread)
    later = deliver(dovecot, mail_user, 5, "Later")
    (tmp_path / "again").mkdir()
    settings.MAILROOM_SOURCE_DIR = broken_dir(tmp_path / "again")
    with pytest.raises(SourceStoreError):
        imap_sync(imap_mailbox)
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["state"] == "error" and status["last_error_code"] == "storage", status
    inbox = MailFolder.objects.get(mailbox=imap_mailbox, name="INBOX")
    assert inbox.uid_high == inbox_before.uid_high, "the cursor passed mail that was not stored"
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 12
    assert_every_email_has_a_source(imap_mailbox)
    assert_cursor_claims_only_stored_mail(dovecot, mail_user, imap_mailbox)

    settings.MAILROOM_SOURCE_DIR = good
    imap_sync(imap_mailbox)
    subjects = list(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True))
    assert sorted(subjects) == sorted(first + later)
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["state"] == "completed" and status["last_error"] == "", status


def test_pop3_download_while_the_source_dir_cannot_be_written_leaves_the_mail_on_the_server(
        dovecot, mail_user, pop3_mailbox, settings, tmp_path):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    subjects = deliver(dovecot, mail_user, 6, "Kept")
    originals = by_subject(server_sources(dovecot, mail_user))

    settings.MAILROOM_SOURCE_DIR = broken_dir(tmp_path)
    with pytest.raises(SourceStoreError):
        Pop3Sync(Mailbox.objects.get(pk=pop3_mailbox.pk), timeout=10).run()
    # No DELE for mail that was not stored
    assert dovecot.folder_state(mail_user).count == 6
    assert not Email.objects.filter(mailbox=pop3_mailbox).exists()
    status = mailbox_status(mailbox=pop3_mailbox)
    assert status["last_error_code"] == "storage" and "MAILROOM_SOURCE_DIR" in status["last_error"], status

    settings.MAILROOM_SOURCE_DIR = tmp_path / "sources"
    Pop3Sync(Mailbox.objects.get(pk=pop3_mailbox.pk), timeout=10).run()
    assert dovecot.folder_state(mail_user).count == 0
    stored = {e.subject: crm_source(e.pk) for e in Email.objects.filter(mailbox=pop3_mailbox)}
    assert sorted(stored) == subjects and stored == originals


@pytest.fixture
def small_disk(tmp_path) -> Path:  # noqa: ANN001
    """A 256 KB file system that really fills up (conftest ``tmpfs``)."""
    with tmpfs(tmp_path / "small-disk", "256k") as mount:
        yield mount


def test_a_full_disk_stops_the_sync_with_what_to_check_and_the_rerun_after_it_grew_loses_nothing(
        dovecot, mail_user, imap_mailbox, settings, monkeypatch, small_disk):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    settings.MAILROOM_SOURCE_DIR = small_disk / "sources"
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 2)
    subjects = deliver(dovecot, mail_user, 6, "Full", attachment_size=100_000)  # ~200 KB a pack

    with pytest.raises(SourceStoreError):
        imap_sync(imap_mailbox)
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["last_error_code"] == "storage", status
    assert "disk is full" in status["last_error"] and "MAILROOM_SOURCE_DIR" in status["last_error"]
    stored = Email.objects.filter(mailbox=imap_mailbox).count()
    assert 0 < stored < 6, stored  # the first batch fitted, a later one did not
    assert_every_email_has_a_source(imap_mailbox)
    assert_cursor_claims_only_stored_mail(dovecot, mail_user, imap_mailbox)
    # The pack that did not fit is not left behind taking the space
    assert packs_on_disk(settings.MAILROOM_SOURCE_DIR) == packs_named()

    # The operator grows the volume; the next run brings the rest, once
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    imap_sync(imap_mailbox)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)
    assert mailbox_status(mailbox=imap_mailbox)["state"] == "completed"


# 4. Killed or cut mid-run, then rerun; the sweep and orphans ---------------------------------
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fault", ["killed worker", "cut connection"])
def test_a_run_stopped_midway_then_rerun_matches_the_server_and_the_sweep_keeps_named_packs(
        dovecot, mail_user, imap_mailbox, source_dir, settings, monkeypatch, fault_proxy, fault):
    if fault == "killed worker":
        deliver(dovecot, mail_user, 40, "Kill", attachment_size=15_000)
        # The worker is another process: it reads the directory from its environment.
        monkeypatch.setenv("MAILROOM_SOURCE_DIR", str(source_dir))
        kill_worker_midway(imap_mailbox, after_emails=8)
    else:
        deliver(dovecot, mail_user, 12, "Cut", attachment_size=150_000)
        settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
        monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
        proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
        Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=proxy.port)
        proxy.cut_after(1_500_000, direction="down")  # after the first batches, mid-FETCH
        with pytest.raises(MailServerUnreachable):
            imap_sync(imap_mailbox)
        proxy.reset()
    partial = Email.objects.filter(mailbox=imap_mailbox).count()
    assert 0 < partial < dovecot.folder_state(mail_user).count
    # What was committed before the stop reads back already
    for email_id in Email.objects.filter(mailbox=imap_mailbox).values_list("pk", flat=True):
        assert crm_source(email_id)
    # A batch that never committed (a pack no row names), written just now
    orphan, _ = sourcestore.write_pack([compress(b"a batch that rolled back")])

    imap_sync(imap_mailbox)

    server = server_sources(dovecot, mail_user)
    live = Email.objects.filter(mailbox=imap_mailbox)
    assert live.count() == len(server)
    assert len(set(live.values_list("message_id", flat=True))) == live.count()  # nothing twice
    assert crm_sources(imap_mailbox) == server
    assert_in_packs(imap_mailbox, source_dir)
    named = packs_named()
    before = packs_on_disk(source_dir)
    assert orphan in before - named

    # Young orphans stay (a batch may be about to commit its rows)
    assert removed_count(sourcestore.sweep()) == 0
    assert packs_on_disk(source_dir) == before

    # Past the grace: every pack no row names goes, every named one stays, all still read
    removed = removed_count(sourcestore.sweep(now=FAR_FUTURE()))
    assert removed == len(before - named) >= 1
    assert packs_on_disk(source_dir) == packs_named() == named
    assert crm_sources(imap_mailbox) == server


# 5. Deleted mail: its packs go --------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_the_sweep_erases_the_packs_of_deleted_mail_and_keeps_living_mail_readable(
        dovecot, mail_user, imap_mailbox, source_dir, settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    deliver(dovecot, mail_user, 6, "Kept or purged", attachment_size=4_000)
    imap_sync(imap_mailbox)
    by_uid = dict(EmailLocation.objects.filter(folder__mailbox=imap_mailbox).values_list("uid", "email_id"))
    pack_of = dict(EmailSource.objects.filter(email__mailbox=imap_mailbox).values_list("email_id", "pack"))
    uids = sorted(by_uid)
    # Newest first, three a batch: one pack for UIDs 4-6, one for 1-3.
    low, high = pack_of[by_uid[uids[0]]], pack_of[by_uid[uids[-1]]]
    assert low != high
    assert {pack_of[by_uid[u]] for u in uids[:3]} == {low} and {pack_of[by_uid[u]] for u in uids[3:]} == {high}

    # Deleted on the server: all of the low pack's mail, one of the high pack's
    gone_uids = uids[:4]
    for uid in gone_uids:
        dovecot.expunge(mail_user, "INBOX", uid)
    imap_sync(imap_mailbox)
    assert Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=False).count() == 4
    services.emails_purge_tombstones(older_than_days=0)
    living = [by_uid[u] for u in uids[4:]]
    assert set(Email.objects.filter(mailbox=imap_mailbox).values_list("pk", flat=True)) == set(living)

    # A second mailbox (another user) deleted with its mail
    other_user = dovecot.add_user()
    other = MailboxFactory(owner=UserFactory(), email_address=other_user.email, incoming_security="ssl",
                           incoming_host=dovecot.host, incoming_port=dovecot.imaps_port,
                           username=other_user.username, password=other_user.password, is_active=True)
    deliver(dovecot, other_user, 2, "Other mailbox")
    imap_sync(other)
    other_packs = set(EmailSource.objects.filter(email__mailbox=other).values_list("pack", flat=True))
    assert services.mailbox_delete(actor=other.owner, mailbox=other, delete_emails=True) == 2

    assert {low, high} | other_packs <= packs_on_disk(source_dir)
    # Within the grace no pack is removed whole (a pack still named may be rewritten)
    assert removed_count(sourcestore.sweep()) == 0
    assert {low} | other_packs <= packs_on_disk(source_dir)
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)

    removed = removed_count(sourcestore.sweep(now=FAR_FUTURE()))

    after = packs_on_disk(source_dir)
    assert removed >= 1 + len(other_packs)
    assert low not in after and not (other_packs & after), "a pack of deleted mail stayed"
    assert after == packs_named(), "a pack no row names stayed, or a named one went"
    server = server_sources(dovecot, mail_user)
    assert crm_sources(imap_mailbox) == server and len(server) == 2
    # Nothing of deleted mail is left on disk: the packs hold the living sources only
    on_disk_bytes = sum(sourcestore.path_of(n).stat().st_size for n in after)
    live_bytes = sum(EmailSource.objects.filter(email_id__in=living).values_list("length", flat=True))
    assert on_disk_bytes == live_bytes


# 5b. A headers-only mail downloaded whole later ----------------------------------------------
def test_a_headers_only_mail_completed_later_reads_whole_and_the_sweep_drops_its_headers(
        dovecot, mail_user, imap_mailbox, source_dir, django_capture_on_commit_callbacks):
    """Over the size limit a mail is stored as its headers; the limit raised, the same email
    gets its whole source (a new pack). The headers-only copy is not read any more, and the
    sweep erases it from disk; every source still reads as the server holds it."""
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(max_message_bytes=100_000)
    dovecot.deliver(mail_user, make_message(subject="Huge", attachment=(
        "big.bin", os.urandom(300_000), "application/octet-stream")))
    deliver(dovecot, mail_user, 2, "Small")
    imap_sync(imap_mailbox)
    huge = Email.objects.get(mailbox=imap_mailbox, subject="Huge")
    assert huge.truncated
    server = server_sources(dovecot, mail_user)
    [huge_uid] = [uid for uid, raw in server.items() if b"Subject: Huge" in raw]
    headers_only = crm_source(huge.pk)
    assert len(headers_only) < 10_000 and server[huge_uid].startswith(headers_only.rstrip(b"\r\n"))
    first_pack = EmailSource.objects.get(email=huge).pack

    Mailbox.objects.filter(pk=imap_mailbox.pk).update(max_message_bytes=10_000_000)
    assert imap_sync(imap_mailbox).completed == 1

    huge.refresh_from_db()
    assert not huge.truncated
    row = EmailSource.objects.get(email=huge)
    assert row.pack and row.pack != first_pack and row.data is None
    assert crm_sources(imap_mailbox) == server
    with django_capture_on_commit_callbacks(execute=True):
        sourcestore.sweep(now=FAR_FUTURE())
    assert packs_on_disk(source_dir) == packs_named()
    on_disk_bytes = sum(sourcestore.path_of(n).stat().st_size for n in packs_on_disk(source_dir))
    assert on_disk_bytes == sum(EmailSource.objects.values_list("length", flat=True))
    assert crm_sources(imap_mailbox) == server
    while services.emails_parse_pending(mailbox_id=imap_mailbox.pk):
        pass
    huge.refresh_from_db()
    assert huge.parse_state == Email.ParseState.PARSED and huge.has_attachments


def test_packs_rewritten_by_the_sweep_are_private_as_packs_written_by_a_sync(
        dovecot, mail_user, imap_mailbox, source_dir, settings, monkeypatch,
        django_capture_on_commit_callbacks):
    """Raw mail is written 0600 (``write_pack``), and so is a pack the sweep rewrites
    without deleted mail (``compact``; it took the umask's 0644 at first): a copy of the
    directory (the README's backup step) keeps the file's own mode."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 10)
    source_dir.mkdir(mode=0o755)  # made by the operator, as a mount point is
    deliver(dovecot, mail_user, 3, "Private")
    imap_sync(imap_mailbox)
    assert {oct(sourcestore.path_of(n).stat().st_mode & 0o777) for n in packs_on_disk(source_dir)} == {"0o600"}
    dovecot.expunge(mail_user, "INBOX", dovecot.folder_state(mail_user).uids[0])
    imap_sync(imap_mailbox)
    services.emails_purge_tombstones(older_than_days=0)
    old = os.umask(0o022)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            sourcestore.sweep(now=FAR_FUTURE())
    finally:
        os.umask(old)
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)
    modes = {n: oct(sourcestore.path_of(n).stat().st_mode & 0o777) for n in packs_on_disk(source_dir)}
    assert set(modes.values()) == {"0o600"}, modes


# 6. A pack missing on disk ------------------------------------------------------------------
def test_a_missing_pack_fails_the_parse_of_its_mails_visibly_and_the_others_parse(
        dovecot, mail_user, imap_mailbox, source_dir, settings, monkeypatch, client):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 2)
    deliver(dovecot, mail_user, 6, "Parse")
    imap_sync(imap_mailbox)
    victim = Email.objects.get(mailbox=imap_mailbox, subject="Parse 00")
    pack = victim.source_data.pack
    lost = set(EmailSource.objects.filter(pack=pack).values_list("email_id", flat=True))
    assert victim.pk in lost and len(lost) < 6
    sourcestore.path_of(pack).unlink()

    with pytest.raises(SourceStoreError, match="missing"):
        read_source(victim.pk)
    while services.emails_parse_pending(mailbox_id=imap_mailbox.pk):
        pass

    for e in Email.objects.filter(mailbox=imap_mailbox):
        if e.pk in lost:
            assert e.parse_state == Email.ParseState.FAILED, e.subject
            assert "stored copy of this mail is missing" in e.parse_error, e.parse_error
        else:
            assert e.parse_state == Email.ParseState.PARSED, (e.subject, e.parse_error)
            assert f"Body of {e.subject}" in e.text
    assert mailbox_status(mailbox=imap_mailbox)["emails_unparsed"] == len(lost)

    api = APIClient()
    api.force_authenticate(imap_mailbox.owner)
    response = api.get(f"/api/v1/emails/{victim.pk}/")
    assert response.status_code == 200, response.content
    assert response.json()["parse_state"] == "failed" and "missing" in response.json()["parse_error"]
    assert api.get("/api/v1/emails/").status_code == 200
    client.force_login(imap_mailbox.owner)
    page = client.get(f"/mail/{victim.pk}/")
    assert page.status_code == 200 and "missing" in page.content.decode()


# 7. A row naming a path outside the directory ----------------------------------------------
@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "../" + "a" * 29,
                                 "A" * 32, "a" * 31 + "\n", "a" * 30 + "/.", "a" * 31])
def test_a_bad_pack_name_is_refused_and_opens_nothing(dovecot, mail_user, imap_mailbox, source_dir,
                                                      monkeypatch, bad):
    deliver(dovecot, mail_user, 1, "Tampered")
    imap_sync(imap_mailbox)
    email_row = Email.objects.get(mailbox=imap_mailbox)
    assert EmailSource.objects.filter(email=email_row).update(pack=bad) == 1  # the database allows it

    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def open_spy(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202  (records only)
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def os_open_spy(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        opened.append(str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_spy)
    monkeypatch.setattr(os, "open", os_open_spy)
    with pytest.raises(SourceStoreError, match="invalid pack name"):
        read_source(email_row.pk)
    with pytest.raises(SourceStoreError):
        EmailSource.objects.get(email=email_row).compressed()
    monkeypatch.undo()
    root = os.path.realpath(source_dir)
    outside = [p for p in opened if not p.isdigit() and not os.path.realpath(p).startswith(root + os.sep)]
    assert not outside, outside

    services.emails_parse_pending(mailbox_id=imap_mailbox.pk)
    email_row.refresh_from_db()
    assert email_row.parse_state == Email.ParseState.FAILED and "invalid pack name" in email_row.parse_error


# 8. Mail sent from the CRM ------------------------------------------------------------------
@pytest.fixture
def sender_mailbox(imap_mailbox: Mailbox, smtp_outbox) -> Mailbox:
    imap_mailbox.smtp_host, imap_mailbox.smtp_port = smtp_outbox.host, smtp_outbox.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username, imap_mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    imap_mailbox.save()
    return imap_mailbox


def test_mail_sent_from_the_crm_keeps_its_copy_in_a_pack(sender_mailbox, smtp_outbox, dovecot, mail_user,
                                                         source_dir, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(
            actor=sender_mailbox.owner, from_address=sender_mailbox.email_address,
            to="Grace <grace@navy.example>", subject="Quote — Ünïcode", html="<p>Hello <b>Grace</b></p>",
            attachments=[sending.OutgoingAttachment("q.bin", "application/octet-stream", os.urandom(50_000))])
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.SENT, stored.send_error

    row = EmailSource.objects.get(email=stored)
    assert row.pack and row.data is None and row.pack in packs_on_disk(source_dir)
    source = crm_source(stored.pk)
    assert len(source) == row.size
    # What went out, and the copy in the Sent folder, are the stored bytes
    [received] = smtp_outbox.wait_for(1)
    assert received.raw.rstrip(b"\r\n") == source.rstrip(b"\r\n")
    [copy] = server_sources(dovecot, mail_user, "Sent").values()
    assert copy == source


def test_sending_while_the_source_dir_cannot_be_written_is_a_503_and_sends_nothing(
        sender_mailbox, smtp_outbox, settings, tmp_path, django_capture_on_commit_callbacks):
    settings.MAILROOM_SOURCE_DIR = broken_dir(tmp_path)
    api = APIClient()
    api.force_authenticate(sender_mailbox.owner)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": sender_mailbox.email_address, "to": ["grace@navy.example"],
            "subject": "Not stored", "text": "body"}, format="json")
    assert response.status_code == 503, response.content
    assert response.json()["code"] == "storage" and "MAILROOM_SOURCE_DIR" in response.json()["detail"]
    assert not Email.objects.filter(source=Email.Source.CRM).exists()
    assert smtp_outbox.messages == []


# 9. Durable before named -------------------------------------------------------------------
def test_each_pack_is_fsynced_before_the_rows_that_name_it_are_inserted(
        dovecot, mail_user, imap_mailbox, source_dir, settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 2)
    deliver(dovecot, mail_user, 6, "Order", attachment_size=2_000)
    events: list[tuple] = []
    lock = threading.Lock()
    real_fsync, real_copy_rows = os.fsync, source_copy.copy_rows

    def fsync_spy(fd: int) -> None:  # records which file was made durable, once it is
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = "?"
        real_fsync(fd)
        with lock:
            events.append(("fsync", target))

    def copy_rows_spy(model, names, rows, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if model is EmailSource:
            at = list(names).index("pack")
            for name in {row[at] for row in rows}:
                path = sourcestore.path_of(name)
                with lock:
                    events.append(("rows", name, path.stat().st_size if path.exists() else None,
                                   sum(row[list(names).index("length")] for row in rows if row[at] == name)))
        return real_copy_rows(model, names, rows, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync_spy)
    monkeypatch.setattr(source_copy, "copy_rows", copy_rows_spy)
    imap_sync(imap_mailbox)
    monkeypatch.undo()

    inserted = [e for e in events if e[0] == "rows"]
    assert {e[1] for e in inserted} == packs_named() and len(inserted) == 3, events
    for index, event in enumerate(events):
        if event[0] != "rows":
            continue
        _, name, size_on_disk, length = event
        path = os.path.realpath(sourcestore.path_of(name))
        done_before = {e[1] for e in events[:index] if e[0] == "fsync"}
        assert path in done_before, f"rows of {name} inserted before the pack was fsynced"
        assert os.path.dirname(path) in done_before, f"rows of {name} before its directory was fsynced"
        assert size_on_disk == length, "rows inserted before the whole pack was written"
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)


# 10. The nightly sweep ---------------------------------------------------------------------
def test_the_sweep_is_scheduled_and_the_task_removes_old_orphans_only(
        dovecot, mail_user, imap_mailbox, source_dir):
    from crm.celery import app

    entry = app.conf.beat_schedule["mailsync.sweep_sources"]
    assert entry["task"] == "mailsync.sweep_sources"
    assert "mailsync.sweep_sources" in app.tasks

    deliver(dovecot, mail_user, 2, "Swept")
    imap_sync(imap_mailbox)
    named = packs_named()
    old_orphan, _ = sourcestore.write_pack([compress(b"old, never committed")])
    young_orphan, _ = sourcestore.write_pack([compress(b"young, maybe about to commit")])
    long_ago = time.time() - sourcestore.SWEEP_GRACE - 3600
    for name in named | {old_orphan}:  # named packs as old as the orphan: still kept
        os.utime(sourcestore.path_of(name), (long_ago, long_ago))
    # What is not a pack is never touched
    stray = [source_dir / "README.txt", source_dir / old_orphan[:2] / "notes.zpack",
             source_dir / "zz" / ("0" * 32 + ".tmp")]
    for path in stray:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"the operator's")
        os.utime(path, (long_ago, long_ago))

    result = tasks.sweep_sources.delay().get()

    assert removed_count(result) == 1
    assert packs_on_disk(source_dir) == named | {young_orphan}
    assert all(path.exists() for path in stray)
    assert crm_sources(imap_mailbox) == server_sources(dovecot, mail_user)


# Found while testing: a delivery whose pack is gone ------------------------------------------
def test_a_mail_whose_pack_is_gone_before_delivery_fails_visibly_and_is_not_sent(
        sender_mailbox, smtp_outbox, source_dir, django_capture_on_commit_callbacks):
    """A stored copy that cannot be read at delivery (its pack gone) makes the mail
    "failed" with the reason (what the administrator should check), as other delivery
    failures do; it once escaped the task and left the mail "sending" with no error."""
    with django_capture_on_commit_callbacks(execute=False) as queued:
        stored = sending.email_send(actor=sender_mailbox.owner, from_address=sender_mailbox.email_address,
                                    to="grace@navy.example", subject="Lost before delivery", text="body")
    assert len(queued) == 1
    sourcestore.path_of(EmailSource.objects.get(email=stored).pack).unlink()

    try:
        queued[0]()  # the delivery task (eager)
    except SourceStoreError:
        pass  # what the worker's log would show; the user sees the mail's state
    stored.refresh_from_db()
    assert smtp_outbox.messages == []
    assert stored.send_state == Email.SendState.FAILED, (stored.send_state, stored.send_error)
    assert "MAILROOM_SOURCE_DIR" in stored.send_error


# Found while testing: directories created by the first write -------------------------------
def test_directories_the_first_write_creates_are_fsynced_in_their_parents_before_rows_name_them(
        dovecot, mail_user, imap_mailbox, settings, tmp_path, monkeypatch):
    """MAILROOM_SOURCE_DIR defaults to <MAILROOM_DATA_DIR>/sources and is created by the
    first write (``_make_directory``); each directory it creates is fsynced in its parent
    before rows name packs in it, or a power cut after the first batch commits could take
    the whole directory (it once made the parents with ``mkdir(parents=True)`` unsynced)."""
    fresh = tmp_path / "data" / "sources"  # neither exists yet, as on a new deployment
    settings.MAILROOM_SOURCE_DIR = fresh
    deliver(dovecot, mail_user, 2, "First write")
    synced: list[tuple[str, bool]] = []
    real_fsync, real_copy_rows = os.fsync, source_copy.copy_rows

    def fsync_spy(fd: int) -> None:  # records only
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = "?"
        real_fsync(fd)
        synced.append((target, False))

    def copy_rows_spy(model, names, rows, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if model is EmailSource:
            synced.append(("rows", True))
        return real_copy_rows(model, names, rows, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync_spy)
    monkeypatch.setattr(source_copy, "copy_rows", copy_rows_spy)
    imap_sync(imap_mailbox)
    monkeypatch.undo()

    [name] = packs_named()
    before_rows = {target for target, _ in synced[:synced.index(("rows", True))]}
    pack = Path(os.path.realpath(sourcestore.path_of(name)))
    # Each entry on the way to the pack, from the first directory created: its parent fsynced
    created = [pack, pack.parent, pack.parent.parent, pack.parent.parent.parent]
    missing = [str(p.parent) for p in created if str(p.parent) not in before_rows]
    assert not missing, f"not fsynced before the rows named the pack: {missing}"
