"""Review probe of "at most two connections per mailbox" (``mailsync.sync.lock.ConnectionSlot``)
as a salesperson meets it: a real Dovecot that allows two connections per user, real
PostgreSQL, a real worker process where a crash matters, a real SMTP server for sending.

Each test says in its docstring whether it failed before this review and what was fixed.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from mailsync import sending, services
from mailsync.exceptions import MailboxBusy, MailTransientError
from mailsync.models import Email, EmailLocation, MailFolder, Mailbox
from mailsync.sync import imap as imap_sync
from mailsync.sync.imap import ImapSync
from mailsync.sync.lock import CONNECTION_NAMESPACE, ConnectionSlot, connection_slot
from tests.mailsync.conftest import kill_worker_midway, wait_for
from tests.mailsync.test_two_connections_per_mailbox import client, fill, limit_refusals, mailbox_on
from tests.testbed import dovecot as testbed

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def capped(test_ca):  # noqa: ANN001, ANN201
    """A private Dovecot allowing two connections per user and IP (as providers cap them)."""
    with testbed.running_dovecot(test_ca, prefix="mailroom-slot-review-", max_userip_connections=2) as server:
        yield server


def slowed(monkeypatch, *, batch: int, delay: float) -> None:  # noqa: ANN001
    """Small batches and a pause after each commit (test hooks the engine reads): the sync is
    still downloading when the test acts. The download itself is real."""
    monkeypatch.setattr(imap_sync, "BATCH_MESSAGES", batch)
    monkeypatch.setattr(imap_sync, "_TEST_STORE_DELAY", delay)


class _Sync:
    """An ImapSync run in a thread of its own (as a worker runs it beside the web process)."""

    def __init__(self, mailbox_id: int) -> None:
        self.report = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(mailbox_id,), daemon=True)
        self._thread.start()

    def _run(self, mailbox_id: int) -> None:
        try:
            self.report = ImapSync(Mailbox.objects.get(pk=mailbox_id)).run()
        except BaseException as exc:  # noqa: BLE001  (asserted by the test)
            self.error = exc
        finally:
            connection.close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the sync did not end"


def slot_locks(mailbox_id: int) -> tuple[int, int]:
    """(holders, waiters) of the mailbox's connection slot in this database, from pg_locks."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted) FROM pg_locks "
            "WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [CONNECTION_NAMESPACE, mailbox_id])
        holders, waiters = cursor.fetchone()
    return holders, waiters


def stored(mailbox: Mailbox) -> int:
    return Email.objects.filter(mailbox=mailbox).count()


def assert_each_mail_once(mailbox: Mailbox, count: int) -> None:
    emails = Email.objects.filter(mailbox=mailbox)
    assert emails.count() == count
    assert emails.values("message_id").distinct().count() == count
    assert not emails.filter(deleted_at__isnull=False).exists()
    assert EmailLocation.objects.filter(email__mailbox=mailbox).count() == count


def server_flags(server, user, folder: str = "INBOX") -> dict[str, frozenset[bytes]]:  # noqa: ANN001
    """Message-ID -> flags, as the server has them (read with a plain IMAP client)."""
    with client(server, user) as c:
        c.select_folder(folder, readonly=True)
        fetched = c.fetch(c.search(["ALL"]), ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
    return {m[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].split(b":", 1)[1].strip().decode().strip("<>"):
            frozenset(m[b"FLAGS"]) - {b"\\Recent"} for m in fetched.values()}


@contextlib.contextmanager
def idle_watcher(server, user) -> Iterator[None]:  # noqa: ANN001
    """The IDLE watcher's connection: one of the two the server allows."""
    with client(server, user) as watcher:
        watcher.select_folder("INBOX", readonly=True)
        watcher.idle()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                watcher.idle_done()


def timed(action: Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


# -- 1. a worker killed while it holds the connection ------------------------------------------

def test_a_worker_killed_mid_download_frees_the_connection_at_once_and_the_next_sync_stores_each_mail_once(capped):  # noqa: ANN001
    """A real ``manage.py sync_mailbox`` worker is SIGKILLed mid-download while it holds the
    connection slot (IDLE holds the other connection): a mark-as-flagged right after gets the
    connection at once (the server drops the dead session's advisory lock; no 15 s wait, no
    refusal for too many connections), and the next sync stores every mail exactly once.
    Passed before this review."""
    user = capped.add_user()
    fill(capped, user, 40)
    mailbox = mailbox_on(capped, user)
    refusals = limit_refusals(capped)
    with idle_watcher(capped, user):
        kill_worker_midway(mailbox, after_emails=8)
        assert stored(mailbox) < 40, "the worker finished before it was killed"
        email = Email.objects.filter(mailbox=mailbox).order_by("pk").first()
        _, took = timed(lambda: services.email_update(actor=mailbox.owner, email=email, flagged=True))
        assert took < 3, f"the action waited {took:.1f} s for a dead worker's connection"
        ImapSync(Mailbox.objects.get(pk=mailbox.pk)).run()
    assert_each_mail_once(mailbox, 40)
    assert Email.objects.get(pk=email.pk).flagged
    assert b"\\Flagged" in server_flags(capped, user)[email.message_id.strip("<>")]
    assert limit_refusals(capped) == refusals
    assert slot_locks(mailbox.pk) == (0, 0)


# -- 2. UIDVALIDITY reset while an action holds the handed-over connection ---------------------

def test_a_uidvalidity_reset_while_an_action_holds_the_handed_over_connection_loses_and_duplicates_nothing(capped, monkeypatch):  # noqa: ANN001, E501
    """A first sync hands the connection over to an action; while the action holds it, the
    server forgets its UIDs (UIDVALIDITY reset, an index rebuild). The sync, taking the
    connection back, sees it and stops with a transient error (releasing the connection: an
    action right after gets it at once); the next sync re-maps by fingerprint: every mail
    once, none tombstoned, every place under the new UIDVALIDITY. Passed before this review."""
    user = capped.add_user()
    fill(capped, user, 40)
    mailbox = mailbox_on(capped, user)
    slowed(monkeypatch, batch=5, delay=0.1)
    sync = _Sync(mailbox.pk)
    wait_for(lambda: stored(mailbox) >= 10, 20)
    with connection_slot(mailbox.pk, wait=15):  # what _one_action_per_email takes for an action
        # The sync stopped after its batch and waits to take the connection back.
        wait_for(lambda: slot_locks(mailbox.pk)[1] == 1, 10)
        at_handover = stored(mailbox)
        new_uidvalidity = capped.reset_uidvalidity(user)
        assert stored(mailbox) == at_handover  # nothing read from the server meanwhile
    sync.join()
    assert isinstance(sync.error, MailTransientError), sync.error
    assert "UIDVALIDITY" in str(sync.error)
    assert slot_locks(mailbox.pk) == (0, 0)  # released with the error
    # A login test (the settings page) right after gets the connection at once. (A mark as
    # read would rightly be refused until the re-map: MailboxOutOfDate.)
    _, took = timed(lambda: services.mailbox_test(mailbox=Mailbox.objects.get(pk=mailbox.pk)))
    assert took < 3
    for _ in range(2):  # the re-map, then a no-change run
        ImapSync(Mailbox.objects.get(pk=mailbox.pk)).run()
    assert_each_mail_once(mailbox, 40)
    inbox = MailFolder.objects.get(mailbox=mailbox, name="INBOX")
    assert inbox.uidvalidity == new_uidvalidity and inbox.backfill_done
    assert not EmailLocation.objects.filter(email__mailbox=mailbox).exclude(uidvalidity=new_uidvalidity).exists()
    assert Mailbox.objects.get(pk=mailbox.pk).state == Mailbox.State.COMPLETED


# -- 3. an action that fails on the server releases the connection -----------------------------

def test_an_action_that_fails_on_the_server_midway_releases_the_connection_and_the_sync_completes(capped, monkeypatch):  # noqa: ANN001, E501
    """During a long first sync, the user moves a mail to "Archive", which another mail
    program deleted meanwhile: the action fails after it opened its connection (the folder is
    not there) and gives the connection back; the next action gets it within a batch, and the
    sync completes with every mail once. Passed before this review."""
    user = capped.add_user()
    fill(capped, user, 40)
    capped.create_folder(user, "Archive")
    mailbox = mailbox_on(capped, user)
    slowed(monkeypatch, batch=5, delay=0.1)
    refusals = limit_refusals(capped)
    with idle_watcher(capped, user):
        sync = _Sync(mailbox.pk)
        wait_for(lambda: stored(mailbox) >= 10, 20)
        capped.doveadm("mailbox", "delete", "-u", user.username, "Archive")
        email = Email.objects.filter(mailbox=mailbox).order_by("pk").first()
        with pytest.raises(ValidationError, match="no folder 'Archive'"):
            services.email_update(actor=mailbox.owner, email=email, folder="Archive")
        assert sync.alive(), "the sync ended before the actions"
        _, took = timed(lambda: services.email_update(actor=mailbox.owner, email=email, seen=True))
        assert took < 5
        sync.join()
    assert sync.error is None, sync.error
    assert_each_mail_once(mailbox, 40)
    assert server_flags(capped, user)[email.message_id.strip("<>")] == {b"\\Seen"}
    assert len(server_flags(capped, user)) == 40  # nothing moved
    assert limit_refusals(capped) == refusals
    assert slot_locks(mailbox.pk) == (0, 0)


# -- 4. sending during a long sync ---------------------------------------------------------

def test_a_mail_sent_during_a_long_sync_is_delivered_once_and_copied_to_sent_once(capped, smtp_outbox, monkeypatch):  # noqa: ANN001, E501
    """The user sends a mail from the CRM while the first sync downloads 40 mails (IDLE holds
    the other connection): it is delivered once, its copy waits for the connection (handed
    over between two batches) and lands in Sent once, the sync completes, and after the next
    sync the sent mail is one email in the CRM with its place in Sent. Passed before."""
    user = capped.add_user()
    fill(capped, user, 40)
    mailbox = mailbox_on(capped, user)
    mailbox.smtp_host, mailbox.smtp_port, mailbox.smtp_security = smtp_outbox.host, smtp_outbox.port, "starttls"
    mailbox.smtp_username, mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    mailbox.save()
    slowed(monkeypatch, batch=5, delay=0.1)
    refusals = limit_refusals(capped)
    with idle_watcher(capped, user):
        sync = _Sync(mailbox.pk)
        wait_for(lambda: stored(mailbox) >= 10, 20)
        sent = sending.email_send(actor=mailbox.owner, from_address=mailbox.email_address,
                                  to="Grace Hopper <grace@navy.example>", subject="Quote for 40 licences",
                                  text="Here is the quote.")
        # Delivered by the (eager) task: SMTP, then the copy to Sent on the shared connection.
        wait_for(lambda: Email.objects.get(pk=sent.pk).send_state == Email.SendState.SENT, 20)
        assert sync.alive(), "the sync ended before the mail was sent"
        sync.join()
    assert sync.error is None, sync.error
    row = Email.objects.get(pk=sent.pk)
    assert row.send_error == "", row.send_error
    assert len(smtp_outbox.messages) == 1
    in_sent = server_flags(capped, user, "Sent")
    assert list(in_sent) == [row.message_id.strip("<>")]
    ImapSync(Mailbox.objects.get(pk=mailbox.pk)).run()
    assert Email.objects.filter(mailbox=mailbox, message_id=row.message_id).count() == 1
    assert EmailLocation.objects.filter(email=row, folder__special_use="sent").count() == 1
    assert Email.objects.filter(mailbox=mailbox).exclude(pk=row.pk).count() == 40
    assert limit_refusals(capped) == refusals


# -- 5. ten quick actions during one sync --------------------------------------------------

def test_ten_quick_actions_during_one_long_sync_all_succeed_and_the_crm_matches_the_server(capped, monkeypatch):  # noqa: ANN001, E501
    """Ten marks (read, flagged, unread, unflagged) in a row during one 80-mail first sync,
    IDLE holding the other connection: all succeed, the sync completes, and the CRM's read and
    flagged states match the server's for every mail, also after the next sync. Passed before."""
    user = capped.add_user()
    fill(capped, user, 80)
    mailbox = mailbox_on(capped, user)
    slowed(monkeypatch, batch=5, delay=0.05)
    refusals = limit_refusals(capped)
    with idle_watcher(capped, user):
        sync = _Sync(mailbox.pk)
        wait_for(lambda: stored(mailbox) >= 10, 20)
        emails = list(Email.objects.filter(mailbox=mailbox).order_by("pk")[:4])
        for n in range(10):
            email = Email.objects.get(pk=emails[n % 4].pk)
            change = {"seen": n % 3 != 2} if n % 2 == 0 else {"flagged": n % 3 != 2}
            services.email_update(actor=mailbox.owner, email=email, **change)
        assert sync.alive(), "the sync ended before the actions"
        sync.join()
    assert sync.error is None, sync.error
    assert limit_refusals(capped) == refusals

    def crm_matches_server() -> None:
        flags = server_flags(capped, user)
        assert len(flags) == 80
        for email in Email.objects.filter(mailbox=mailbox):
            on_server = flags[email.message_id.strip("<>")]
            assert (email.seen, email.flagged) == (b"\\Seen" in on_server, b"\\Flagged" in on_server), email.pk

    assert_each_mail_once(mailbox, 80)
    crm_matches_server()
    assert Email.objects.filter(mailbox=mailbox, seen=True).exists()
    assert Email.objects.filter(mailbox=mailbox, flagged=True).exists()
    ImapSync(Mailbox.objects.get(pk=mailbox.pk)).run()
    crm_matches_server()
    mailbox.refresh_from_db()
    assert mailbox.messages_done == mailbox.messages_total


# -- 6. a second sync does not take the connection from a waiting action -----------------

def test_a_second_sync_while_an_action_waits_is_busy_and_the_action_gets_the_connection(capped, monkeypatch):  # noqa: ANN001
    """The first sync holds the connection and an action waits for it: a second sync started
    now (the beat, "Sync now") is told the mailbox is busy and opens no connection; the action
    gets the connection at the next batch, then the first sync completes. Passed before."""
    user = capped.add_user()
    fill(capped, user, 20)
    mailbox = mailbox_on(capped, user)
    slowed(monkeypatch, batch=5, delay=0.6)  # the action waits long enough to be seen
    refusals = limit_refusals(capped)
    outcome: dict[str, object] = {}
    with idle_watcher(capped, user):
        sync = _Sync(mailbox.pk)
        wait_for(lambda: stored(mailbox) >= 5, 20)
        email = Email.objects.filter(mailbox=mailbox).order_by("pk").first()

        def act() -> None:
            try:
                outcome["email"] = services.email_update(actor=mailbox.owner, email=email, flagged=True)
            except BaseException as exc:  # noqa: BLE001
                outcome["error"] = exc
            finally:
                connection.close()

        action = threading.Thread(target=act, daemon=True)
        action.start()
        wait_for(lambda: slot_locks(mailbox.pk) == (1, 1) or not action.is_alive(), 10)
        assert action.is_alive(), "the action did not wait (the sync ended?)"
        with pytest.raises(MailboxBusy):
            ImapSync(Mailbox.objects.get(pk=mailbox.pk)).run()
        action.join(15)
        assert not action.is_alive()
        assert "error" not in outcome, outcome.get("error")
        sync.join()
    assert sync.error is None, sync.error
    assert_each_mail_once(mailbox, 20)
    assert Email.objects.get(pk=email.pk).flagged
    assert limit_refusals(capped) == refusals


# -- 7. the other paths of the diff --------------------------------------------------------

def test_the_in_process_prefetch_hands_the_connection_over_too(capped, monkeypatch, settings):  # noqa: ANN001
    """MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0: the download runs in a thread of the worker,
    on the sync's own connection. An action during it gets the connection between two
    batches (the prefetch thread is stopped before the connection is closed), nothing is
    lost or stored twice, and no third connection is opened. Passed before this review."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    user = capped.add_user()
    fill(capped, user, 40)
    mailbox = mailbox_on(capped, user)
    slowed(monkeypatch, batch=5, delay=0.1)
    refusals = limit_refusals(capped)
    with idle_watcher(capped, user):
        sync = _Sync(mailbox.pk)
        wait_for(lambda: stored(mailbox) >= 10, 20)
        first, second = Email.objects.filter(mailbox=mailbox).order_by("pk")[:2]
        services.email_update(actor=mailbox.owner, email=first, seen=True)
        assert services.email_delete(actor=mailbox.owner, email=second) == "trash"
        assert sync.alive(), "the sync ended before the actions"
        sync.join()
    assert sync.error is None, sync.error
    assert Email.objects.filter(mailbox=mailbox).count() == 40
    assert Email.objects.filter(mailbox=mailbox).values("message_id").distinct().count() == 40
    assert Email.objects.filter(mailbox=mailbox, deleted_at__isnull=False).count() == 1
    assert len(server_flags(capped, user)) == 39
    assert limit_refusals(capped) == refusals


def test_a_hand_over_that_leaves_fewer_than_the_process_minimum_goes_on_in_process(capped, monkeypatch):  # noqa: ANN001
    """14 mails in batches of 3 start in the fetch process (10 or more in tests); an action
    takes the connection after the second batch, and the 8 mails left (under the minimum)
    are downloaded in-process on the reopened connection: all 14 once, no third connection."""
    user = capped.add_user()
    fill(capped, user, 14)
    mailbox = mailbox_on(capped, user)
    slowed(monkeypatch, batch=3, delay=0.3)
    refusals = limit_refusals(capped)
    with idle_watcher(capped, user):
        sync = _Sync(mailbox.pk)
        wait_for(lambda: stored(mailbox) >= 3, 20)
        email = Email.objects.filter(mailbox=mailbox).order_by("pk").first()
        services.email_update(actor=mailbox.owner, email=email, flagged=True)
        assert stored(mailbox) < 14, "the sync ended before the action"
        sync.join()
    assert sync.error is None, sync.error
    assert_each_mail_once(mailbox, 14)
    assert limit_refusals(capped) == refusals
    mailbox.refresh_from_db()
    assert mailbox.state == Mailbox.State.COMPLETED
    assert mailbox.messages_done == mailbox.messages_total == 14


def test_a_waiter_in_another_database_does_not_make_the_sync_hand_over(db_other_than_ours):  # noqa: ANN001
    """Advisory locks belong to one database, but ``ConnectionSlot.wanted`` read pg_locks
    of every database on the server: an action waiting for mailbox 1's connection in another
    CRM database on the same PostgreSQL (staging, a second tenant, another test run) made
    this one's sync of its mailbox 1 stop, close its connection and reconnect after every
    batch. FAILED before; fixed in lock.py ConnectionSlot.wanted (this database only)."""
    mailbox_id = 987_654
    holder, waiter = db_other_than_ours(), db_other_than_ours()
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s, %s)", [CONNECTION_NAMESPACE, mailbox_id])
    waiting = threading.Thread(target=_wait_for_lock, args=(waiter, mailbox_id), daemon=True)
    waiting.start()
    slot = ConnectionSlot(mailbox_id)
    try:
        wait_for(lambda: _waiters_anywhere(mailbox_id) == 1, 5)
        slot.acquire(1)  # ours is free: the other database's lock is another lock
        assert not slot.wanted()
    finally:
        slot.release()
        holder.close()
        waiting.join(10)
        waiter.close()


def _wait_for_lock(conn, mailbox_id: int) -> None:  # noqa: ANN001
    with contextlib.suppress(psycopg2.Error), conn.cursor() as cursor:
        cursor.execute("SET lock_timeout = '5s'")
        cursor.execute("SELECT pg_advisory_lock(%s, %s)", [CONNECTION_NAMESPACE, mailbox_id])


def _waiters_anywhere(mailbox_id: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                       "AND objid = %s AND objsubid = 2 AND NOT granted", [CONNECTION_NAMESPACE, mailbox_id])
        return cursor.fetchone()[0]


@pytest.fixture
def db_other_than_ours() -> Iterator[Callable[[], object]]:
    """Connections to another database of the same PostgreSQL server (``postgres``)."""
    db = connection.settings_dict
    opened = []

    def connect():  # noqa: ANN202
        conn = psycopg2.connect(dbname="postgres", user=db["USER"], host=db["HOST"] or None,
                                port=db["PORT"] or None, password=db["PASSWORD"] or None)
        conn.autocommit = True
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


_SQLITE_STALE_MARKER = """
import django
django.setup()
from mailsync.sync.lock import ConnectionSlot
slot = ConnectionSlot(7)
slot.acquire(5)
print("wanted" if slot.wanted() else "free", flush=True)
slot.release()
"""


def test_the_embedded_default_ignores_the_marker_of_a_waiter_that_died(tmp_path):  # noqa: ANN001
    """SQLite (the embedded default): a waiter killed while it waited (a web worker timed
    out and killed, an OOM kill) leaves its marker file. The sync took it for a live waiter
    for two minutes: after every batch it closed its connection, waited two seconds for
    nobody and logged in again. FAILED before; fixed in lock.py ConnectionSlot._wants (a
    marker of a process of this machine that is gone is no waiter)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / f"mailbox-7.want.{dead.pid}.140000000000").touch()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}}
    env.update(DJANGO_SETTINGS_MODULE="crm.settings", MAILROOM_DATA_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _SQLITE_STALE_MARKER], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["free"]


def test_hand_overs_over_plain_imap_meet_no_refusal_for_a_connection_just_closed(capped, monkeypatch):  # noqa: ANN001, E501
    """Dovecot counts a connection until its server process has ended, after the client saw
    LOGOUT's OK or reset the socket: a bare client logging in right after another's LOGOUT
    was refused "[LIMIT]" 12 times in 100 on plain loopback IMAP (88 in 100 right after a
    killed download). Over plain IMAP (no TLS handshake to hide the gap), ten hand-overs
    during one sync (the fetch process killed, the action logging in, the sync logging in
    again) met no refusal: the database round trips of the hand-over outlast the gap here.
    Passed before this review; see the report (fragile on a slower server)."""
    user = capped.add_user()
    fill(capped, user, 60)
    mailbox = mailbox_on(capped, user)
    refusals = limit_refusals(capped)
    mailbox.incoming_port, mailbox.incoming_security = capped.imap_port, "none"
    mailbox.save()
    slowed(monkeypatch, batch=5, delay=0.05)
    with idle_watcher(capped, user):
        sync = _Sync(mailbox.pk)
        wait_for(lambda: stored(mailbox) >= 10, 20)
        emails = list(Email.objects.filter(mailbox=mailbox).order_by("pk")[:5])
        for n in range(10):
            email = Email.objects.get(pk=emails[n % 5].pk)
            services.email_update(actor=mailbox.owner, email=email, seen=n < 5)
        assert sync.alive(), "the sync ended before the actions"
        sync.join()
    assert sync.error is None, sync.error
    assert_each_mail_once(mailbox, 60)
    assert not Email.objects.filter(mailbox=mailbox, seen=True).exists()
    assert limit_refusals(capped) == refusals


def test_the_settings_page_lists_the_servers_folders_during_a_long_sync(capped, monkeypatch):  # noqa: ANN001
    """The settings page (views._server_folders) opened during a first sync, IDLE holding the
    other connection: it gets the connection at the sync's next hand-over and lists the
    server's folders (not an error, no third connection); the sync completes. Passed before."""
    from django.core.cache import cache

    from mailsync import views

    user = capped.add_user()
    fill(capped, user, 40)
    capped.create_folder(user, "Customers")
    mailbox = mailbox_on(capped, user)
    slowed(monkeypatch, batch=5, delay=0.1)
    refusals = limit_refusals(capped)
    with idle_watcher(capped, user):
        sync = _Sync(mailbox.pk)
        wait_for(lambda: stored(mailbox) >= 10, 20)
        cache.clear()
        (names, error), took = timed(lambda: views._server_folders(Mailbox.objects.get(pk=mailbox.pk)))
        assert sync.alive(), "the sync ended before the page asked"
        sync.join()
    assert error == "" and took < 5
    assert {"INBOX", "Sent", "Customers"} <= set(names)
    assert sync.error is None, sync.error
    assert_each_mail_once(mailbox, 40)
    assert limit_refusals(capped) == refusals
