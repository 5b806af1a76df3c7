"""One sync per mailbox at a time, across every worker process and machine.

PostgreSQL: a session-level advisory lock, released by the server if the worker dies (no
stale lock after a crash). SQLite (the embedded default, one machine): a lease on the
mailbox row that expires by itself.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.db import connection
from django.db.models import Q
from django.utils import timezone

from ..exceptions import MailboxBusy
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
