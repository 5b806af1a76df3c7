"""One sync per mailbox at a time, across every worker process and machine.

PostgreSQL: a session-level advisory lock, released by the server if the worker dies (no
stale lock after a crash). SQLite (the embedded default, one machine): a lease on the
mailbox row that expires by itself.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.db import connection
from django.db.models import Q
from django.utils import timezone

from ..exceptions import ConnectionBusy, MailboxBusy
from ..models import Mailbox

# Advisory lock key space of mailbox syncs (the first of the two int4 keys).
LOCK_NAMESPACE = 0x4D41  # "MA"
# Longer than the task time limit (CELERY_TASK_TIME_LIMIT, 1 h): a run never outlives its lease.
LEASE = timedelta(minutes=65)


@contextmanager
def mailbox_lock(mailbox_id: int) -> Iterator[None]:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_NAMESPACE, mailbox_id])
            if not cursor.fetchone()[0]:
                raise MailboxBusy("Another sync of this mailbox is running.")
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [LOCK_NAMESPACE, mailbox_id])
        return
    now = timezone.now()
    holder = f"{socket.gethostname()}:{os.getpid()}"
    taken = Mailbox.objects.filter(
        Q(lease_until__isnull=True) | Q(lease_until__lt=now), pk=mailbox_id
    ).update(lease_until=now + LEASE, lease_holder=holder)
    if not taken:
        # A worker killed mid-sync never gives its lease back: on this machine a holder
        # process that is gone is seen at once (else the mailbox waited 65 minutes).
        other = Mailbox.objects.filter(pk=mailbox_id).values_list("lease_holder", flat=True).first()
        if other and _gone(other):
            taken = Mailbox.objects.filter(pk=mailbox_id, lease_holder=other).update(
                lease_until=now + LEASE, lease_holder=holder)
    if not taken:
        raise MailboxBusy("Another sync of this mailbox is running.")
    try:
        yield
    finally:
        Mailbox.objects.filter(pk=mailbox_id).update(lease_until=None, lease_holder="")


def _gone(holder: str) -> bool:
    """A lease holder ("host:pid") that is a process of this machine no longer running."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process not reaped yet is a zombie: gone all the same (Linux)
        with open(f"/proc/{int(pid)}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def lease_alive(mailbox_id: int) -> bool:
    """SQLite: whether a sync run holds the mailbox's lease now."""
    row = Mailbox.objects.filter(pk=mailbox_id).values_list("lease_until", "lease_holder").first()
    if row is None or row[0] is None or row[0] < timezone.now():
        return False
    return not (row[1] and _gone(row[1]))


# -- the mailbox's one connection besides IDLE ---------------------------------------------
# Providers cap the connections of an account (Gmail about 15 for all of a user's devices,
# others 2–5; Dovecot's mail_max_userip_connections): a mailbox uses at most two, the IDLE
# watcher's and this one. The sync holds it for its run and hands it over between batches to a
# CRM action (mark read, move, delete), a copy to Sent or a login test that waits for it, then
# takes it back; these hold it while they talk to the server.
CONNECTION_NAMESPACE = 0x4D43  # "MC"
BUSY_CONNECTION = ("The mailbox's connection to the mail server is in use (by a sync or another "
                   "action; a mailbox uses at most two connections at once).")


class ConnectionSlot:
    """The right to hold the mailbox's one non-IDLE connection. PostgreSQL: a session-level
    advisory lock (waiters are queued and visible in pg_locks); SQLite, the embedded default on
    one machine: an flock on a file under DATA_DIR/locks, waiters leave a marker file."""

    def __init__(self, mailbox_id: int) -> None:
        self.mailbox_id = mailbox_id
        self.held = False
        self._file = None

    # -- PostgreSQL ----------------------------------------------------------------------
    def _key(self) -> list[int]:
        return [CONNECTION_NAMESPACE, self.mailbox_id % 2**31]

    def acquire(self, wait: float) -> None:
        """Take the slot, waiting up to ``wait`` seconds behind its holder; ConnectionBusy after."""
        assert not self.held
        if connection.vendor == "postgresql":
            self._pg_acquire(wait)
        else:
            self._file_acquire(wait)
        self.held = True

    def _pg_acquire(self, wait: float) -> None:
        from django.db import OperationalError, transaction

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", self._key())
            if cursor.fetchone()[0]:
                return
        try:
            # A blocking wait, queued (so that a sync handing the slot over sees the waiter,
            # and the waiter gets it before the sync takes it back), bounded by lock_timeout.
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = %s", [f"{max(1, int(wait * 1000))}ms"])
                cursor.execute("SELECT pg_advisory_lock(%s, %s)", self._key())
                cursor.execute("SET LOCAL lock_timeout TO DEFAULT")
        except OperationalError as exc:
            if getattr(exc.__cause__, "pgcode", None) == "55P03":  # lock_not_available
                raise ConnectionBusy(BUSY_CONNECTION, hint="Try again in a moment.") from None
            raise

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s, %s)", self._key())
        else:
            self._file_release()

    def wanted(self) -> bool:
        """Whether something else waits for the slot now."""
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                # Advisory locks belong to one database, pg_locks shows every database's: a
                # waiter for the same mailbox id in another CRM database on this server (a
                # second tenant, staging) is not ours.
                cursor.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
                    "AND classid = %s AND objid = %s AND objsubid = 2 AND NOT granted "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                    self._key())
                return bool(cursor.fetchone()[0])
        return any(path.name != self._want_name() for path in self._wants())

    def hand_over(self, wait: float) -> None:
        """Let whoever waits have the slot, then take it back (waiting up to ``wait``)."""
        self.release()
        if connection.vendor != "postgresql":
            # flock has no queue: give the waiter (polling every 50 ms) the time to take it.
            deadline = time.monotonic() + 2
            while self.wanted() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.acquire(wait)

    # -- SQLite (one machine) ------------------------------------------------------------
    def _dir(self):  # noqa: ANN202
        from django.conf import settings

        path = settings.DATA_DIR / "locks"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _want_name(self) -> str:
        return f"mailbox-{self.mailbox_id}.want.{os.getpid()}.{threading.get_ident()}"

    def _wants(self):  # noqa: ANN202
        fresh = time.time() - 120  # a waiter killed meanwhile leaves a stale marker
        host = socket.gethostname()
        found = []
        for path in self._dir().glob(f"mailbox-{self.mailbox_id}.want.*"):
            # "mailbox-<id>.want.<pid>.<thread>": a waiter that died (killed by a timeout or
            # the OOM killer) is no waiter, else the sync handed over to it after every batch
            # (closing its connection, waiting 2 s for nobody) until the marker aged out.
            pid = path.name.split(".")[2]
            try:
                if path.stat().st_mtime >= fresh and not _gone(f"{host}:{pid}"):
                    found.append(path)
            except OSError:
                continue
        return found

    def _file_acquire(self, wait: float) -> None:
        import fcntl

        handle = open(self._dir() / f"mailbox-{self.mailbox_id}.connection", "a+b")  # noqa: SIM115
        want = self._dir() / self._want_name()
        deadline = time.monotonic() + wait
        marked = False
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        handle.close()
                        raise ConnectionBusy(BUSY_CONNECTION, hint="Try again in a moment.") from None
                    if not marked:
                        want.touch()
                        marked = True
                    time.sleep(0.05)
        finally:
            if marked:
                want.unlink(missing_ok=True)
        self._file = handle

    def _file_release(self) -> None:
        import fcntl

        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


@contextmanager
def connection_slot(mailbox_id: int, *, wait: float) -> Iterator[ConnectionSlot]:
    """Hold the mailbox's one non-IDLE connection for the block (see ConnectionSlot)."""
    slot = ConnectionSlot(mailbox_id)
    slot.acquire(wait)
    try:
        yield slot
    finally:
        slot.release()


SEND_NAMESPACE = 0x4D53  # "MS"


@contextmanager
def send_claim(email_id: int) -> Iterator[bool]:
    """Whether this process may deliver the mail now (True), or another delivery of the same
    mail is running (False): a Retry queued beside a slow first attempt, a task delivered
    twice. Two at once both sent it, and the customer got it twice. PostgreSQL: a session
    advisory lock (let go if the worker dies); SQLite: an flock under DATA_DIR/locks."""
    if connection.vendor == "postgresql":
        key = [SEND_NAMESPACE, email_id % 2**31]
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", key)
            mine = bool(cursor.fetchone()[0])
        try:
            yield mine
        finally:
            if mine:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        return
    with _send_claim_file(email_id) as mine:
        yield mine


@contextmanager
def _send_claim_file(email_id: int) -> Iterator[bool]:
    """``send_claim`` without PostgreSQL (SQLite, one machine): an flock on a file."""
    import fcntl

    from django.conf import settings

    path = settings.DATA_DIR / "locks"
    path.mkdir(parents=True, exist_ok=True)
    with open(path / f"send-{email_id}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mine = True
        except BlockingIOError:
            mine = False
        try:
            yield mine
        finally:
            if mine:
                fcntl.flock(handle, fcntl.LOCK_UN)
