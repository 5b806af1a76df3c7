"""The IMAP sync engine against the private Dovecot: initial and incremental sync, server-side
changes, UIDVALIDITY, faults, locking, association and threading."""
from __future__ import annotations

import threading

import pytest
from django.db import connection

from crm import services as crm_services
from crm.models import Lead
from mailsync import services
from mailsync.exceptions import MailAuthError, MailboxBusy, MailServerUnreachable
from mailsync.models import Email, EmailLink, EmailLocation, Mailbox
from mailsync.sync.imap import ImapSync
from tests.factories import ContactFactory, DealFactory, MailboxFactory, UserFactory
from tests.corpus import corpus_files
from tests.mailsync.conftest import kill_worker_midway, make_message

pytestmark = pytest.mark.django_db


def sync(mailbox: Mailbox, **kwargs):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10, **kwargs).run()


def crm_view(mailbox: Mailbox, folder: str = "INBOX") -> dict[int, set[str]]:
    return {
        uid: set(flags) - {"\\Recent"}
        for uid, flags in EmailLocation.objects.filter(
            folder__mailbox=mailbox, folder__name=folder
        ).values_list("uid", "flags")
    }


def server_view(dovecot, user, folder: str = "INBOX") -> dict[int, set[str]]:
    state = dovecot.folder_state(user, folder)
    return {uid: set(flags) - {"\\Recent"} for uid, flags in state.messages}


def test_initial_sync_stores_every_message_once_without_marking_read(dovecot, mail_user, imap_mailbox):
    for i in range(30):
        dovecot.deliver(mail_user, make_message(subject=f"Quote {i}"))
    dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{mail_user.email}>",
                                                   to="customer@client.example", subject="Our offer"))

    report = sync(imap_mailbox)

    assert report.new == 31
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 31
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    # BODY.PEEK: syncing never marks mail read on the server
    assert all("\\Seen" not in flags for flags in server_view(dovecot, mail_user).values())
    sent = Email.objects.get(mailbox=imap_mailbox, subject="Our offer")
    assert sent.direction == "sent"
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "completed"
    assert imap_mailbox.messages_done == imap_mailbox.messages_total == 31
    assert imap_mailbox.bytes_done == imap_mailbox.bytes_total > 0


def test_second_run_without_changes_does_nothing(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message())
    sync(imap_mailbox)
    report = sync(imap_mailbox)
    assert report.new == 0
    assert report.unchanged_folders == report.folders == 2


def test_incremental_new_mail_flags_and_expunge_from_server(dovecot, mail_user, imap_mailbox):
    for i in range(5):
        dovecot.deliver(mail_user, make_message(subject=f"First {i}"))
    sync(imap_mailbox)
    uids = dovecot.folder_state(mail_user).uids

    dovecot.deliver(mail_user, make_message(subject="Late arrival"))
    dovecot.set_flags(mail_user, "INBOX", uids[0], ["\\Seen", "\\Flagged"])
    dovecot.expunge(mail_user, "INBOX", uids[1])
    report = sync(imap_mailbox)

    assert report.new == 1 and report.flag_changes == 1 and report.expunged == 1
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    first = Email.objects.get(locations__uid=uids[0], mailbox=imap_mailbox)
    assert first.seen and first.flagged
    # Deleted on the server: out of the CRM views but kept as a tombstone
    gone = Email.objects.get(subject="First 1", mailbox=imap_mailbox)
    assert gone.deleted_at is not None
    assert Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=True).count() == 5


def _session_without(*hidden: str):
    """An ImapSession that does not see some of the server's capabilities: Dovecot plays a
    server that offers less (Gmail: CONDSTORE without QRESYNC; Outlook.com: neither)."""
    from mailsync.protocols.imap import ImapSession

    class Lesser(ImapSession):
        def has(self, capability: str) -> bool:
            return capability not in hidden and super().has(capability)

    return Lesser


@pytest.mark.parametrize("hidden", [("QRESYNC",), ("QRESYNC", "CONDSTORE")],
                         ids=["condstore-only", "neither"])
def test_servers_without_qresync_still_see_flags_expunges_and_new_mail(
    dovecot, mail_user, imap_mailbox, hidden
):
    factory = _session_without(*hidden)
    for i in range(5):
        dovecot.deliver(mail_user, make_message(subject=f"First {i}"))
    assert sync(imap_mailbox, session_factory=factory).new == 5
    uids = dovecot.folder_state(mail_user).uids

    # Only a flag changed: UIDNEXT and EXISTS are as before, the change must still be seen.
    dovecot.set_flags(mail_user, "INBOX", uids[3], ["\\Flagged"])
    report = sync(imap_mailbox, session_factory=factory)
    assert report.flag_changes == 1 and report.new == report.expunged == 0
    assert Email.objects.get(locations__uid=uids[3], mailbox=imap_mailbox).flagged

    dovecot.deliver(mail_user, make_message(subject="Late arrival"))
    dovecot.set_flags(mail_user, "INBOX", uids[0], ["\\Seen"])
    dovecot.expunge(mail_user, "INBOX", uids[1])
    report = sync(imap_mailbox, session_factory=factory)

    assert report.new == 1 and report.flag_changes == 1 and report.expunged == 1
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    assert Email.objects.get(subject="First 1", mailbox=imap_mailbox).deleted_at is not None
    if "CONDSTORE" not in hidden:
        # CONDSTORE alone: the unchanged mailbox is still recognized by STATUS alone
        assert sync(imap_mailbox, session_factory=factory).unchanged_folders == 2


def test_move_on_server_keeps_one_email_with_its_new_location(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Will move"))
    sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    # The user files the message into Sent (a synced folder) in their mail client
    raw = dovecot.imap_login(mail_user)
    raw.select("INBOX")
    raw.uid("MOVE", "1", "Sent")
    raw.logout()

    sync(imap_mailbox)

    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    email.refresh_from_db()
    assert email.deleted_at is None
    assert [loc.folder.name for loc in email.locations.all()] == ["Sent"]


def test_uidvalidity_change_remaps_without_duplicates(dovecot, mail_user, imap_mailbox):
    for i in range(6):
        dovecot.deliver(mail_user, make_message(subject=f"Keep {i}"))
    sync(imap_mailbox)
    before = set(Email.objects.filter(mailbox=imap_mailbox).values_list("pk", "subject"))

    dovecot.reset_uidvalidity(mail_user, "INBOX")
    sync(imap_mailbox)

    after = set(Email.objects.filter(mailbox=imap_mailbox).values_list("pk", "subject"))
    assert after == before  # same rows, nothing duplicated or deleted
    assert not Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=False).exists()
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)


@pytest.mark.parametrize("fetch", ["process", "thread"])
def test_connection_cut_mid_fetch_then_rerun_loses_and_duplicates_nothing(
    dovecot, mail_user, imap_mailbox, fault_proxy, settings, fetch
):
    # A large download is fetched in a child process, a small one in a thread: both.
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10 if fetch == "process" else 0
    big = b"x" * 200_000
    for i in range(12):
        dovecot.deliver(mail_user, make_message(subject=f"Big {i}",
                                                attachment=("specs.bin", big, "application/octet-stream")))
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    imap_mailbox.incoming_port = proxy.port
    imap_mailbox.save()
    # Let login and the first batches through, then cut in the middle of a FETCH literal.
    proxy.cut_after(1_500_000, direction="down")
    from mailsync import sync as sync_package  # noqa: F401
    import mailsync.sync.imap as engine

    old = engine.BATCH_MESSAGES
    engine.BATCH_MESSAGES = 3
    try:
        with pytest.raises(MailServerUnreachable):
            sync(imap_mailbox)
        stored_after_cut = Email.objects.filter(mailbox=imap_mailbox).count()
        assert 0 < stored_after_cut < 12
        imap_mailbox.refresh_from_db()
        assert imap_mailbox.state == "error"

        proxy.reset()
        sync(imap_mailbox)
    finally:
        engine.BATCH_MESSAGES = old

    assert Email.objects.filter(mailbox=imap_mailbox).count() == 12
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == sorted(
        f"Big {i}" for i in range(12)
    )
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    # Every stored source is whole
    from mailsync.storage import decompress

    for email in Email.objects.filter(mailbox=imap_mailbox).select_related("source_data"):
        assert len(decompress(email.source_data.compressed())) == email.size


@pytest.mark.parametrize("fetch", ["process", "thread"])
def test_a_large_download_holds_one_sync_connection_at_a_time(
    dovecot, mail_user, imap_mailbox, fault_proxy, settings, fetch, monkeypatch
):
    """With the IDLE watcher's, a mailbox may hold two connections: the sync never holds two
    itself. For a large download the worker closes its own connection before the fetch
    process opens one, and opens it again (for the rest of the run) after that one ended."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10 if fetch == "process" else 0
    for i in range(12):
        dovecot.deliver(mail_user, make_message(subject=f"Count {i}"))
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    imap_mailbox.incoming_port = proxy.port
    imap_mailbox.save()
    import mailsync.sync.imap as engine

    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    report = sync(imap_mailbox)

    assert report.new == 12
    assert proxy.peak_open == 1
    # process: the worker's, the fetch process's, the worker's again
    assert proxy.connections == (3 if fetch == "process" else 1)
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)


def test_an_initial_sync_starts_its_fetch_process_early_and_a_resync_starts_none(
    dovecot, mail_user, imap_mailbox, settings, monkeypatch
):
    """The fetch process of a first sync starts before LOGIN (its start-up overlaps the
    worker's SEARCH); the sync then uses that one, never two; a spare that found no download
    is not left running; a resync of synced folders starts no process at all."""
    import mailsync.sync.fetcher as fetcher

    spawned = []
    real_spawn = fetcher._spawn

    def counting_spawn():
        spawned.append(real_spawn())
        return spawned[-1]

    monkeypatch.setattr(fetcher, "_spawn", counting_spawn)
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    for i in range(12):
        dovecot.deliver(mail_user, make_message(subject=f"Early {i}"))

    assert sync(imap_mailbox).new == 12
    assert len(spawned) == 1  # started ahead, then given the INBOX download
    assert spawned[0].poll() is not None

    dovecot.deliver(mail_user, make_message(subject="One more"))
    assert sync(imap_mailbox).new == 1
    assert len(spawned) == 1

    other = MailboxFactory(  # another user's mailbox on the same server account
        owner=UserFactory(), email_address=mail_user.email, incoming_host=dovecot.host,
        incoming_port=dovecot.imaps_port, incoming_security="ssl", username=mail_user.username,
        password=mail_user.password, is_active=True,
    )
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 1000  # a first sync with no large download
    assert sync(other).new == 13
    assert len(spawned) == 2
    assert spawned[1].poll() is not None  # the unused spare was ended with the run


def test_the_fetch_process_gets_no_secret_of_the_worker(monkeypatch):
    """Only the one mailbox's settings reach the fetch process (over its stdin): not the
    worker's keys or database URL. Read from the running child's /proc/<pid>/environ."""
    from mailsync.sync import fetcher

    monkeypatch.setenv("DJANGO_SECRET_KEY", "worker-secret")
    monkeypatch.setenv("MAILROOM_ENCRYPTION_KEYS", "worker-keys")
    monkeypatch.setenv("DATABASE_URL", "postgres://user:pw@db/x")
    monkeypatch.setenv("SSL_CERT_FILE", "/tmp/ca.pem")
    import time
    from pathlib import Path

    child = fetcher._spawn()  # waits for its job on stdin
    try:
        deadline = time.monotonic() + 5
        while not (raw := Path(f"/proc/{child.pid}/environ").read_text()):
            assert child.poll() is None, f"the fetch process ended ({child.returncode})"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    finally:
        fetcher._end(child)
    assert "DJANGO_SECRET_KEY" not in env and "MAILROOM_ENCRYPTION_KEYS" not in env
    assert "DATABASE_URL" not in env
    assert env.get("SSL_CERT_FILE") == "/tmp/ca.pem" and env.get("PYTHONPATH"), sorted(env)


def test_a_fetch_process_killed_mid_frame_is_a_transient_error():
    """A child killed while writing a batch leaves half a frame: the sync is retried later."""
    import io
    import socket

    from mailsync.exceptions import MailTransientError
    from mailsync.sync import fetcher

    written = io.BytesIO()
    fetcher.write_frame(written, ("batch", [1], [b"x" * 10_000]))
    whole = written.getvalue()
    for torn in (whole[:len(whole) // 2], whole[:5], b""):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(torn)
            theirs.close()  # the child is gone
            with pytest.raises(MailTransientError):
                fetcher._receive(fetcher.Frames(ours))
    # The whole frame reads back.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(whole)
        assert fetcher._receive(fetcher.Frames(ours)) == ("batch", [1], [b"x" * 10_000])


def test_wrong_password_is_a_clear_error_without_retry(dovecot, mail_user, imap_mailbox):
    imap_mailbox.password = "wrong"
    imap_mailbox.save()
    with pytest.raises(MailAuthError):
        sync(imap_mailbox)
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "error"
    assert imap_mailbox.last_error_code == "auth_failed"
    assert "app-specific password" in imap_mailbox.last_error

    # The task swallows a user error (no retry storm) and polling skips the mailbox
    from mailsync import tasks

    tasks.sync_mailbox.delay(imap_mailbox.pk)
    assert tasks.poll_mailboxes() == 0


@pytest.mark.django_db(transaction=True)
def test_only_one_sync_per_mailbox_at_a_time(dovecot, mail_user, imap_mailbox):
    for i in range(3):
        dovecot.deliver(mail_user, make_message())
    results: list[object] = []
    started = threading.Event()

    from mailsync.sync import lock

    def hold_lock():
        with lock.mailbox_lock(imap_mailbox.pk):
            started.set()
            release.wait(10)
        connection.close()

    release = threading.Event()
    holder = threading.Thread(target=hold_lock)
    holder.start()
    started.wait(10)
    try:
        with pytest.raises(MailboxBusy):
            sync(imap_mailbox)
    finally:
        release.set()
        holder.join(10)
    results.append(sync(imap_mailbox))
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 3


def test_mail_attaches_to_contacts_leads_and_the_contacts_deals(dovecot, mail_user, imap_mailbox):
    contact = ContactFactory(email="Buyer@Client.example")
    deal = DealFactory(contact=contact, owner=contact.owner)
    dovecot.deliver(mail_user, make_message(sender="Buyer <buyer@client.example>", subject="Order"))
    dovecot.deliver(mail_user, make_message(sender="Nobody <nobody@else.example>", subject="Spam"))
    sync(imap_mailbox)

    order = Email.objects.get(subject="Order")
    assert set(EmailLink.objects.filter(email=order).values_list("contact", "deal")) == {
        (contact.pk, None), (None, deal.pk)
    }
    # Unmatched mail is kept, linked to nothing
    assert not EmailLink.objects.filter(email__subject="Spam").exists()

    # A lead created later gets its past mail at once, without re-download
    lead = crm_services.record_create(
        actor=imap_mailbox.owner, model=Lead, data={"last_name": "Nobody", "email": "NOBODY@else.example"}
    )
    assert EmailLink.objects.filter(lead=lead, email__subject="Spam").exists()


def test_threads_heal_when_reply_arrives_before_parent(dovecot, mail_user, imap_mailbox):
    root = make_message(subject="Project", message_id="<root@client.example>")
    parent = make_message(subject="Re: Project", message_id="<parent@client.example>",
                          in_reply_to="<root@client.example>", references="<root@client.example>")
    # A client that only sets In-Reply-To (no References)
    child = make_message(subject="Re: Re: Project", message_id="<child@client.example>",
                         in_reply_to="<parent@client.example>")
    dovecot.deliver(mail_user, root)
    dovecot.deliver(mail_user, child)
    sync(imap_mailbox)
    dovecot.deliver(mail_user, parent)
    sync(imap_mailbox)

    threads = set(Email.objects.filter(mailbox=imap_mailbox).values_list("thread", flat=True))
    assert len(threads) == 1


def test_budget_exhausted_pauses_until_tomorrow(dovecot, mail_user, imap_mailbox):
    for i in range(4):
        dovecot.deliver(mail_user, make_message())
    imap_mailbox.provider = "gmail"
    imap_mailbox.save()
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        budget_bytes_used=int(2.5 * 1024**3), budget_day=__import__("django.utils.timezone").utils.timezone.now().date()
    )
    sync(imap_mailbox)
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "paused"
    assert imap_mailbox.paused_until is not None
    assert not Email.objects.filter(mailbox=imap_mailbox).exists()
    # Until then a sync (IDLE, the poll, "Sync now") still runs for new mail and changes,
    # and downloads nothing while the day's budget is spent: still paused, nothing stored.
    assert services.mailbox_sync(mailbox_id=imap_mailbox.pk) is not None
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "paused" and imap_mailbox.budget_bytes_used == int(2.5 * 1024**3)
    assert not Email.objects.filter(mailbox=imap_mailbox).exists()


def test_every_corpus_message_syncs_without_stopping_the_run(dovecot, mail_user, imap_mailbox):
    files = corpus_files()
    assert len(files) > 70
    for path in files:
        dovecot.append(mail_user, "INBOX", path.read_bytes())
    expected = len(dovecot.folder_state(mail_user).uids)

    report = sync(imap_mailbox)
    assert report.failed == 0
    assert EmailLocation.objects.filter(folder__mailbox=imap_mailbox, folder__name="INBOX").count() == expected
    # Bodies parse later, off the hot path; none of them may break that either
    while services.emails_parse_pending(mailbox_id=imap_mailbox.pk):
        pass
    states = set(Email.objects.filter(mailbox=imap_mailbox).values_list("parse_state", flat=True))
    assert states == {"parsed"}


@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_batch_then_rerun_matches_the_server(dovecot, mail_user, imap_mailbox):
    """A real worker process is SIGKILLed in the middle of the initial sync; the rerun ends
    with exactly the server's messages, each once."""
    for i in range(40):
        dovecot.deliver(mail_user, make_message(subject=f"Kill {i}", body="x" * 20_000))
    kill_worker_midway(imap_mailbox, after_emails=8)
    partial = Email.objects.filter(mailbox=imap_mailbox).count()
    assert 8 <= partial < 40

    sync(imap_mailbox)  # the rerun: PostgreSQL released the dead worker's lock

    subjects = list(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True))
    assert sorted(subjects) == sorted(f"Kill {i}" for i in range(40))
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)


def test_failed_message_is_kept_with_an_error_and_retried(dovecot, mail_user, imap_mailbox, monkeypatch):
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Retry {i}"))
    from mailsync.sync import ingest

    real_store = ingest._store

    def store_failing_on_retry_1(mailbox, folder, uidvalidity, prepared, *rest):
        if any(p.envelope.subject == "Retry 1" for p in prepared):
            raise ValueError("simulated storage failure")
        return real_store(mailbox, folder, uidvalidity, prepared, *rest)

    monkeypatch.setattr(ingest, "_store", store_failing_on_retry_1)
    report = sync(imap_mailbox)
    assert report.failed == 1
    assert set(Email.objects.values_list("subject", flat=True)) == {"Retry 0", "Retry 2"}
    status = __import__("mailsync.selectors", fromlist=["x"]).mailbox_status(mailbox=imap_mailbox)
    assert len(status["message_errors"]) == 1 and "simulated" in status["message_errors"][0]["error"]

    monkeypatch.setattr(ingest, "_store", real_store)
    result = services.mailbox_retry_failed(actor=imap_mailbox.owner, mailbox=imap_mailbox)
    assert result["refetched"] == 1
    assert set(Email.objects.values_list("subject", flat=True)) == {"Retry 0", "Retry 1", "Retry 2"}
    status = __import__("mailsync.selectors", fromlist=["x"]).mailbox_status(mailbox=imap_mailbox)
    assert status["message_errors"] == []


def test_sync_since_skips_older_mail_and_trash_is_never_synced(dovecot, mail_user, imap_mailbox):
    from datetime import date, datetime, timezone

    dovecot.append(mail_user, "INBOX", make_message(subject="Old"), internal_date=datetime(2020, 1, 1, tzinfo=timezone.utc))
    dovecot.append(mail_user, "INBOX", make_message(subject="New"), internal_date=datetime(2026, 6, 1, tzinfo=timezone.utc))
    dovecot.append(mail_user, "Trash", make_message(subject="Binned"))
    imap_mailbox.sync_since = date(2025, 1, 1)
    imap_mailbox.save()
    sync(imap_mailbox)
    assert set(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == {"New"}


def test_tombstones_are_purged_after_the_retention_period(dovecot, mail_user, imap_mailbox):
    from datetime import timedelta

    from django.utils import timezone

    dovecot.deliver(mail_user, make_message(subject="Old tombstone"))
    dovecot.deliver(mail_user, make_message(subject="Fresh tombstone"))
    sync(imap_mailbox)
    Email.objects.filter(subject="Old tombstone").update(deleted_at=timezone.now() - timedelta(days=31))
    Email.objects.filter(subject="Fresh tombstone").update(deleted_at=timezone.now() - timedelta(days=1))
    assert services.emails_purge_tombstones(older_than_days=30) >= 1
    assert set(Email.objects.values_list("subject", flat=True)) == {"Fresh tombstone"}


def test_qresync_reports_expunges_and_flags_without_a_uid_comparison(dovecot, mail_user, imap_mailbox,
                                                                     monkeypatch):
    for i in range(4):
        dovecot.deliver(mail_user, make_message(subject=f"Q {i}"))
    sync(imap_mailbox)
    uids = dovecot.folder_state(mail_user).uids
    dovecot.expunge(mail_user, "INBOX", uids[2])
    dovecot.set_flags(mail_user, "INBOX", uids[0], ["\\Answered"])

    def no_search(*args, **kwargs):
        raise AssertionError("QRESYNC servers need no UID comparison")

    monkeypatch.setattr(ImapSync, "_expunges", no_search)
    report = sync(imap_mailbox)

    assert report.expunged == 1 and report.flag_changes == 1
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)


def test_message_fetch_fast_parser_matches_imapclient_or_steps_aside():
    """The regex parser of the usual message FETCH reply gives what IMAPClient's parser
    gives; any other shape returns None (IMAPClient parses it then)."""
    from imapclient.response_parser import parse_fetch_response

    from mailsync.protocols.imap import parse_message_fetch

    body = b"Subject: hi\r\n\r\n(not an item) BODY[] {3}\r\n"
    usual = [
        (b'1 (UID 7 FLAGS (\\Seen $Forwarded) RFC822.SIZE %d INTERNALDATE "17-Jul-1996 02:44:25 -0700" '
         b"BODY[] {%d}" % (len(body), len(body)), body), b")",
        (b'2 (UID 9 MODSEQ (12) FLAGS () RFC822.SIZE 1 INTERNALDATE " 1-Jan-2024 00:00:00 +0000" '
         b"BODY[] {1}", b"x"), b")",
    ]
    fast = parse_message_fetch(usual)
    general = parse_fetch_response(usual, False, True)
    assert fast is not None and set(fast) == {7, 9}
    for uid in (7, 9):
        for key in (b"FLAGS", b"RFC822.SIZE", b"INTERNALDATE", b"BODY[]"):
            assert fast[uid][key] == general[uid][key], (uid, key)
    assert fast[7][b"FLAGS"] == (b"\\Seen", b"$Forwarded")

    # With QRESYNC on, a server may send a flag update for a message after its body, in the
    # same reply: both are kept (the body is not lost), the later flags win, as IMAPClient does
    updated = usual[:2] + [b"2 (UID 7 MODSEQ (5) FLAGS (\\Seen \\Flagged))"]
    fast, general = parse_message_fetch(updated), parse_fetch_response(updated, False, True)
    assert fast is not None and fast[7][b"BODY[]"] == body == general[7][b"BODY[]"]
    assert fast[7][b"FLAGS"] == general[7][b"FLAGS"] == (b"\\Seen", b"\\Flagged")

    # Sizes and flags (CONDSTORE) come without a literal
    plain = [b"1 (UID 7 RFC822.SIZE 1234)", b"2 (UID 9 FLAGS (\\Seen \\Flagged) MODSEQ (42))"]
    fast, general = parse_message_fetch(plain), parse_fetch_response(plain, False, True)
    assert fast is not None and set(fast) == {7, 9}
    assert fast[7][b"RFC822.SIZE"] == general[7][b"RFC822.SIZE"] == 1234
    assert fast[9][b"FLAGS"] == general[9][b"FLAGS"] and fast[9][b"MODSEQ"] == general[9][b"MODSEQ"]

    unusual = [
        # items after the literal
        [(b"1 (BODY[] {1}", b"x"), b" UID 7 FLAGS (\\Seen))"],
        # an unsolicited flag update between the messages
        [usual[0], usual[1], b"5 (FLAGS (\\Seen))"],
        # a literal shorter than announced, an unknown item, no UID
        [(b"1 (UID 7 BODY[] {5}", b"x"), b")"],
        [(b"1 (UID 7 X-GM-LABELS (a) BODY[] {1}", b"x"), b")"],
        [(b"1 (FLAGS () BODY[] {1}", b"x"), b")"],
        [b"1 (UID 7 X-GM-THRID 123)"],
        [b"1 (UID 7 FLAGS (\\Seen \x00evil))"],  # control characters: IMAPClient decides
    ]
    for data in unusual:
        assert parse_message_fetch(data) is None, data


def test_uid_sets_parse_and_stay_bounded():
    from mailsync.exceptions import MailProtocolError
    from mailsync.protocols.imap import parse_uid_set, uid_ranges

    assert parse_uid_set("41,43:45, 50") == {41, 43, 44, 45, 50}
    assert uid_ranges([7, 1, 2, 3, 9, 8]) == "1:3,7:9"
    with pytest.raises(MailProtocolError):
        parse_uid_set("1:4294967295")


def test_a_synced_folder_deleted_on_the_server_leaves_tombstones_and_the_sync_goes_on(
    dovecot, mail_user, imap_mailbox
):
    dovecot.create_folder(mail_user, "Projects")
    dovecot.append(mail_user, "Projects", make_message(subject="In a project folder"))
    dovecot.deliver(mail_user, make_message(subject="In the inbox"))
    imap_mailbox.folders = ["INBOX", "Projects"]
    imap_mailbox.save()
    sync(imap_mailbox)
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 2

    dovecot.doveadm("mailbox", "delete", "-u", mail_user.username, "-s", "Projects")
    dovecot.deliver(mail_user, make_message(subject="Later"))
    report = sync(imap_mailbox)

    assert report.new == 1
    assert Email.objects.get(subject="In a project folder").deleted_at is not None
    assert Email.objects.get(subject="In the inbox").deleted_at is None
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "completed"


def test_reply_to_crm_sent_mail_links_to_its_record_from_any_address(dovecot, mail_user, imap_mailbox):
    from mailsync.models import Email as EmailModel

    contact = ContactFactory(email="buyer@client.example")
    sent = EmailModel.objects.create(
        mailbox=imap_mailbox, fingerprint="sent-1", message_id="crm.contact.%d.0a1b2c3d4e5f60718293@crm.example" % contact.pk,
        content_hash="x", direction="sent", source="crm", subject="Our offer",
    )
    EmailLink.objects.create(email=sent, contact=contact)
    # The buyer answers from a private address the CRM does not know
    dovecot.deliver(mail_user, make_message(
        sender="Buyer <buyer.private@home.example>", subject="Re: Our offer",
        in_reply_to=f"<{sent.message_id}>", references=f"<{sent.message_id}>",
    ))
    # A forged reference to a CRM id that was never sent links nothing
    dovecot.deliver(mail_user, make_message(
        sender="Mallory <m@evil.example>", subject="Forged",
        in_reply_to="<crm.contact.%d.ffffffffffffffffffff@crm.example>" % contact.pk,
    ))
    sync(imap_mailbox)

    assert EmailLink.objects.filter(contact=contact, email__subject="Re: Our offer").exists()
    assert not EmailLink.objects.filter(email__subject="Forged").exists()


def test_the_same_mail_in_two_mailboxes_is_listed_once_on_the_record(dovecot):
    from mailsync.selectors import emails_of_record
    from tests.factories import MailboxFactory, UserFactory

    owner = UserFactory()
    contact = ContactFactory(owner=owner, email="buyer@client.example")
    raw = make_message(sender="Buyer <buyer@client.example>", subject="To both")
    mailboxes = []
    for _ in range(2):  # e.g. a personal and a shared account of the same salesperson
        user = dovecot.add_user()
        dovecot.deliver(user, raw)  # each delivery adds its own Received/Delivered-To
        mailboxes.append(MailboxFactory(owner=owner, email_address=user.email, incoming_host=dovecot.host,
                                        incoming_port=dovecot.imaps_port, username=user.username,
                                        password=user.password, is_active=not mailboxes))
    for mailbox in mailboxes:
        sync(mailbox)
    assert Email.objects.filter(subject="To both").count() == 2  # one per mailbox
    first, second = Email.objects.filter(subject="To both")
    assert first.content_hash != second.content_hash  # the raw bytes differ...
    assert first.fingerprint == second.fingerprint  # ...but it is the same message
    assert [e.subject for e in emails_of_record(user=owner, record=contact)] == ["To both"]


def test_two_mails_that_merely_share_a_message_id_stay_apart(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="First", message_id="<same@client.example>"))
    dovecot.deliver(mail_user, make_message(subject="Second", message_id="<same@client.example>",
                                            body="A different body."))
    sync(imap_mailbox)
    assert sorted(Email.objects.values_list("subject", flat=True)) == ["First", "Second"]


def test_mail_over_the_size_limit_is_kept_as_headers_with_a_notice(dovecot, mail_user, imap_mailbox):
    from mailsync.selectors import mailbox_status

    imap_mailbox.max_message_bytes = 100_000
    imap_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Huge", attachment=("big.bin", b"z" * 300_000,
                                                                      "application/octet-stream")))
    dovecot.deliver(mail_user, make_message(subject="Small"))
    sync(imap_mailbox)

    huge = Email.objects.get(mailbox=imap_mailbox, subject="Huge")
    assert huge.truncated and huge.size > 300_000
    from mailsync.storage import decompress

    assert len(decompress(huge.source_data.compressed())) < 5_000  # the header block only
    assert not Email.objects.get(subject="Small").truncated
    notices = mailbox_status(mailbox=imap_mailbox)["message_errors"]
    assert len(notices) == 1 and "only its headers" in notices[0]["error"]
    # Nothing refetched or duplicated by a second sync or by "Retry"
    sync(imap_mailbox)
    services.mailbox_retry_failed(actor=imap_mailbox.owner, mailbox=imap_mailbox)
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 2
    assert dovecot.folder_state(mail_user).count == 2
