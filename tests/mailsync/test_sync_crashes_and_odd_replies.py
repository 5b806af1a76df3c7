"""Crash safety of the IMAP initial sync (fetch process, budget, database, NIL bodies)."""
from __future__ import annotations

import base64
import os
import signal
from datetime import timedelta

import psycopg2
import pytest
from django.db import connection
from django.utils import timezone

import mailsync.protocols.imap as protocol
import mailsync.sync.imap as engine
from mailsync import services, tasks
from mailsync.exceptions import MailTransientError
from mailsync.models import Email, EmailLocation, Mailbox, MessageError
from mailsync.sync.imap import ImapSync
from mailsync.sync.lock import LOCK_NAMESPACE
from tests.mailsync.conftest import _fetch_processes, kill_worker_midway, make_message

pytestmark = pytest.mark.django_db


def sync(mailbox: Mailbox, budget: object = "default"):
    mailbox.refresh_from_db()
    run = ImapSync(mailbox, timeout=10)
    if budget != "default":
        run.budget = budget
    return run.run()


def crm_view(mailbox: Mailbox, folder: str = "INBOX") -> dict[int, set[str]]:
    return {uid: set(flags) - {"\\Recent"} for uid, flags in EmailLocation.objects.filter(
        folder__mailbox=mailbox, folder__name=folder).values_list("uid", "flags")}


def server_view(dovecot, user, folder: str = "INBOX") -> dict[int, set[str]]:
    return {uid: set(flags) - {"\\Recent"} for uid, flags in dovecot.folder_state(user, folder).messages}


def live_subjects(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))


def assert_progress_sane(mailbox: Mailbox) -> None:
    mailbox.refresh_from_db()
    assert mailbox.state == "completed", (mailbox.state, mailbox.last_error)
    assert mailbox.messages_done == mailbox.messages_total, (mailbox.messages_done, mailbox.messages_total)
    assert mailbox.bytes_done == mailbox.bytes_total, (mailbox.bytes_done, mailbox.bytes_total)


def deliver(dovecot, user, n: int, prefix: str, body_size: int = 30_000) -> list[str]:
    """Incompressible bodies: the fetch process cannot push everything into the pipe and end."""
    subjects = [f"{prefix} {i:02d}" for i in range(n)]
    for s in subjects:
        body = base64.encodebytes(os.urandom(body_size * 3 // 4)).decode()
        dovecot.deliver(user, make_message(subject=s, body=body))
    return subjects


def hook_ingest(monkeypatch, on_call):  # noqa: ANN001
    """Call ``on_call(n)`` before the n-th batch (1-based) is stored."""
    real = engine.ingest_batch
    calls = {"n": 0}

    def wrapped(**kwargs):  # noqa: ANN003
        calls["n"] += 1
        on_call(calls["n"])
        return real(**kwargs)

    monkeypatch.setattr(engine, "ingest_batch", wrapped)
    return calls


# 1. -----------------------------------------------------------------------------------------
def test_fetch_child_sigkilled_mid_download_then_rerun(dovecot, mail_user, imap_mailbox,
                                                             settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver(dovecot, mail_user, 15, "Child", body_size=150_000)
    killed = []

    def on_call(n: int) -> None:
        if n == 2:
            pids = _fetch_processes(os.getpid())
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    hook_ingest(monkeypatch, on_call)
    with pytest.raises(MailTransientError):
        sync(imap_mailbox)
    assert killed, "no fetch process was running"
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "error"
    assert 0 < Email.objects.filter(mailbox=imap_mailbox).count() < 15
    assert not _fetch_processes(os.getpid())

    monkeypatch.undo()
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    sync(imap_mailbox)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    assert_progress_sane(imap_mailbox)


# 2a. ----------------------------------------------------------------------------------------
def test_uidvalidity_changes_between_search_and_child_select(dovecot, mail_user, imap_mailbox,
                                                                   settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver(dovecot, mail_user, 12, "Validity", body_size=2000)
    real = engine.fetch_in_child

    def changed_first(job, child=None):  # noqa: ANN001
        dovecot.reset_uidvalidity(mail_user, "INBOX")
        return real(job, child)

    monkeypatch.setattr(engine, "fetch_in_child", changed_first)
    with pytest.raises(MailTransientError):
        sync(imap_mailbox)
    monkeypatch.setattr(engine, "fetch_in_child", real)
    sync(imap_mailbox)
    sync(imap_mailbox)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert live_subjects(imap_mailbox) == subjects
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    assert_progress_sane(imap_mailbox)


# 2b. ----------------------------------------------------------------------------------------
def test_new_mail_and_expunges_while_the_child_fetches(dovecot, mail_user, imap_mailbox,
                                                             settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver(dovecot, mail_user, 15, "Live")
    uids = dovecot.folder_state(mail_user).uids
    by_uid = dict(zip(sorted(uids), subjects))
    gone = [min(uids), max(uids)]  # the last batch to come (not fetched yet), the first (stored)

    def on_call(n: int) -> None:
        if n == 2:
            for uid in gone:
                dovecot.expunge(mail_user, "INBOX", uid)
            dovecot.deliver(mail_user, make_message(subject="Late", body="y" * 1000))
            dovecot.set_flags(mail_user, "INBOX", sorted(uids)[-2], ["\\Seen"])

    hook_ingest(monkeypatch, on_call)
    sync(imap_mailbox)
    monkeypatch.undo()
    sync(imap_mailbox)
    expected = sorted([s for u, s in by_uid.items() if u not in gone] + ["Late"])
    assert live_subjects(imap_mailbox) == expected
    assert Email.objects.filter(mailbox=imap_mailbox).count() == len(set(
        Email.objects.filter(mailbox=imap_mailbox).values_list("fingerprint", flat=True)))
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "completed"


# 3. -----------------------------------------------------------------------------------------
def test_budget_runs_out_mid_child_download_then_next_day(dovecot, mail_user, imap_mailbox,
                                                                settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver(dovecot, mail_user, 15, "Budget")
    sync(imap_mailbox, budget=150_000)  # ~2 batches of ~90 kB
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "paused"
    assert imap_mailbox.paused_until is not None
    stored = Email.objects.filter(mailbox=imap_mailbox).count()
    assert 0 < stored < 15
    assert imap_mailbox.messages_done == stored
    assert imap_mailbox.messages_total == 15
    assert not _fetch_processes(os.getpid())

    # The next day
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        budget_day=timezone.now().date() - timedelta(days=1),
        paused_until=timezone.now() - timedelta(seconds=1))
    sync(imap_mailbox, budget=10**9)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    assert_progress_sane(imap_mailbox)
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.messages_total == 15 - stored
    assert imap_mailbox.paused_until is None


# 4. -----------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fetch", ["process", "thread"])
def test_database_connection_terminated_mid_batch(dovecot, mail_user, imap_mailbox,
                                                        settings, monkeypatch, fetch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10 if fetch == "process" else 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver(dovecot, mail_user, 12, "Db", body_size=3000)
    db = connection.settings_dict

    def other():
        return psycopg2.connect(dbname=db["NAME"], user=db["USER"], host=db["HOST"] or None,
                                port=db["PORT"] or None, password=db["PASSWORD"] or None)

    def on_call(n: int) -> None:
        if n == 2:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pid = cursor.fetchone()[0]
            killer = other()
            killer.autocommit = True
            with killer.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
            killer.close()

    hook_ingest(monkeypatch, on_call)
    with pytest.raises(Exception) as raised:  # noqa: PT011
        sync(imap_mailbox)
    print("raised:", type(raised.value).__name__, raised.value)
    connection.close()  # the test's (dead) connection: a new one from here
    assert not _fetch_processes(os.getpid())
    # The lock is free: another worker can take it.
    check = other()
    with check.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_NAMESPACE, imap_mailbox.pk])
        assert cursor.fetchone()[0]
    check.close()
    imap_mailbox.refresh_from_db()
    # What the user sees: not "Sync in progress" forever, and what happened.
    assert imap_mailbox.state == "error", (imap_mailbox.state, imap_mailbox.last_error,
                                           type(raised.value).__name__, str(raised.value))
    assert imap_mailbox.last_error

    monkeypatch.undo()
    sync(imap_mailbox)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    assert_progress_sane(imap_mailbox)


# 5. -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["nil", "absent"])
def test_fetch_reply_without_a_body_is_never_lost_silently(dovecot, mail_user, imap_mailbox,
                                                                 settings, monkeypatch, shape):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0  # in-process: the reply can be doctored
    subjects = deliver(dovecot, mail_user, 5, "Nil", body_size=500)
    victim = sorted(dovecot.folder_state(mail_user).uids)[2]
    real = protocol._uid_fetch
    done = {"once": False}

    def doctored(client, uids, items, modifiers=None, **options):  # noqa: ANN001, ANN003
        reply = real(client, uids, items, modifiers, **options)
        if victim in reply and b"BODY[]" in reply[victim] and not done["once"]:
            done["once"] = True
            if shape == "nil":
                reply[victim][b"BODY[]"] = None  # "BODY[] NIL" (a server that cannot read it now)
            else:
                del reply[victim]  # no FETCH response for a UID still on the server
        return reply

    monkeypatch.setattr(protocol, "_uid_fetch", doctored)
    sync(imap_mailbox)
    assert done["once"]
    monkeypatch.setattr(protocol, "_uid_fetch", real)
    sync(imap_mailbox)  # a later run, the server fine again
    on_server = set(dovecot.folder_state(mail_user).uids)
    assert victim in on_server
    stored = sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True))
    pending = MessageError.objects.filter(mailbox=imap_mailbox, resolved_at__isnull=True, uid=victim)
    assert stored == subjects or pending.exists(), (
        f"UID {victim} is on the server, not in the CRM, and no error records it: {stored}")
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)


# 6. -----------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_state_after_killed_worker_is_reset_by_next_poll(dovecot, mail_user, imap_mailbox,
                                                               monkeypatch):
    subjects = deliver(dovecot, mail_user, 30, "Killed", body_size=20_000)
    kill_worker_midway(imap_mailbox, after_emails=8, fetch_process=True)
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "syncing"  # left by the dead worker
    queued = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert imap_mailbox.pk in queued  # the safety net runs it again

    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    assert_progress_sane(imap_mailbox)


# 2c. ----------------------------------------------------------------------------------------
def test_uidvalidity_changes_while_the_child_downloads(dovecot, mail_user, imap_mailbox,
                                                             settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver(dovecot, mail_user, 15, "Midway", body_size=150_000)

    def on_call(n: int) -> None:
        if n == 2:
            dovecot.reset_uidvalidity(mail_user, "INBOX")

    hook_ingest(monkeypatch, on_call)
    with pytest.raises(MailTransientError):
        sync(imap_mailbox)
    monkeypatch.undo()
    sync(imap_mailbox)
    sync(imap_mailbox)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert live_subjects(imap_mailbox) == subjects
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    assert_progress_sane(imap_mailbox)


# 2d. ----------------------------------------------------------------------------------------
def test_progress_of_a_completed_run_when_mail_is_expunged_during_it(
        dovecot, mail_user, imap_mailbox, settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    deliver(dovecot, mail_user, 15, "Progress", body_size=2000)
    lowest = min(dovecot.folder_state(mail_user).uids)

    real = engine.fetch_in_child

    def expunged_first(job, child=None):  # noqa: ANN001
        dovecot.expunge(mail_user, "INBOX", lowest)  # after SEARCH and the sizes, before FETCH
        return real(job, child)

    monkeypatch.setattr(engine, "fetch_in_child", expunged_first)
    sync(imap_mailbox)
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 14
    assert_progress_sane(imap_mailbox)


# 5b. ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bytes_each_time", ["same", "different"])
def test_message_with_a_wrong_size_does_not_block_the_mailbox(
        dovecot, mail_user, imap_mailbox, settings, monkeypatch, bytes_each_time):
    """A server (Exchange converts MIME on the fly) reports an RFC822.SIZE that is off for a
    message, every time."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver(dovecot, mail_user, 9, "Size", body_size=500)
    victim = sorted(dovecot.folder_state(mail_user).uids)[4]
    real = protocol._uid_fetch
    counter = {"n": 0}

    def doctored(client, uids, items, modifiers=None, **options):  # noqa: ANN001, ANN003
        reply = real(client, uids, items, modifiers, **options)
        data = reply.get(victim)
        if data is not None and data.get(b"BODY[]") is not None:
            counter["n"] += 1
            raw = data[b"BODY[]"]
            if bytes_each_time == "different":
                raw = raw.replace(b"\r\n\r\n", f"\r\nX-Conv: {counter['n']}\r\n\r\n".encode(), 1)
            data[b"BODY[]"] = raw
            data[b"RFC822.SIZE"] = len(raw) + 7
        return reply

    monkeypatch.setattr(protocol, "_uid_fetch", doctored)
    outcomes = []
    for _ in range(2):
        try:
            sync(imap_mailbox)
            outcomes.append("ok")
        except MailTransientError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
    stored = sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True))
    others = [s for s in subjects if s != subjects[4]]
    pending = MessageError.objects.filter(mailbox=imap_mailbox, resolved_at__isnull=True, uid=victim)
    imap_mailbox.refresh_from_db()
    assert set(others) <= set(stored), (outcomes, stored)
    assert subjects[4] in stored or pending.exists(), (outcomes, stored)
    assert imap_mailbox.state == "completed", (outcomes, imap_mailbox.last_error)
