"""One sync per mailbox at a time, across every worker process and machine.

PostgreSQL: a session-level advisory lock, released by the server if the worker dies (no
stale lock after a crash). SQLite (the embedded default, one machine): a lease on the
mailbox row that expires by itself.
"""
from __future__ import annotations

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
    taken = Mailbox.objects.filter(
        Q(lease_until__isnull=True) | Q(lease_until__lt=now), pk=mailbox_id
    ).update(lease_until=now + LEASE)
    if not taken:
        raise MailboxBusy("Another sync of this mailbox is running.")
    try:
        yield
    finally:
        Mailbox.objects.filter(pk=mailbox_id).update(lease_until=None)
