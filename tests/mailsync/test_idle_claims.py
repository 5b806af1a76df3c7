"""IDLE watchers share the mailboxes by claims (PostgreSQL advisory locks), the default on
PostgreSQL: several ``imap_idle_watch`` processes split the active mailboxes between them,
a new one gets its share without any mailbox being IDLEd twice, and a killed one's
mailboxes are taken over by the others within a refresh (with static ``--shards`` they
waited for that process's restart, covered by the 5-minute poll only).

Real processes, real Dovecot and PostgreSQL; every subprocess is killed in a ``finally``
and every wait is bounded."""
from __future__ import annotations

import sys
import threading

import pytest
from tests.conftest import THIS_DATABASE
from django.db import connection

from mailsync.idle import CLAIMS_NAMESPACE, IdleClaims, IdleSupervisor
from mailsync.models import Mailbox
from tests.mailsync.conftest import make_message
from tests.mailsync.test_workers_and_watchers import (  # noqa: F401  (redis_db: a fixture)
    Proc,
    _env,
    _queued_syncs,
    established_to,
    explained,
    imap_sessions,
    mailbox_for,
    redis_db,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)


def _watcher(name: str) -> Proc:
    return Proc([sys.executable, "manage.py", "imap_idle_watch", "--refresh", "1"], _env(), name)


class _Sessions:
    """Samples every user's IMAP sessions in Dovecot in a thread: the most seen at once."""

    def __init__(self, dovecot, users) -> None:  # noqa: ANN001
        self.dovecot, self.users = dovecot, users
        self.most = {u.username: 0 for u in users}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            out = self.dovecot.doveadm("who", "-1")
            for user in self.users:
                n = sum(1 for line in out.splitlines()[1:]
                        if line.split() and line.split()[0] == user.username and "imap" in line)
                self.most[user.username] = max(self.most[user.username], n)

    def __enter__(self) -> _Sessions:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_watchers_share_the_mailboxes_and_take_over_a_killed_ones(dovecot, redis_db):  # noqa: F811
    users = [dovecot.add_user() for _ in range(6)]
    boxes = [mailbox_for(dovecot, u) for u in users]
    first = _watcher("claims-1")
    second = None
    try:
        with explained(lambda: (first, second), dovecot.log_path):
            wait_until(lambda: all(imap_sessions(dovecot, u) == 1 for u in users), 20,
                       "the first watcher IDLEs every mailbox")
            assert established_to(first.pid, dovecot.imaps_port) == 6

            # A second watcher starts: the first gives up half, the second takes them; no
            # mailbox is ever IDLEd by both (one IDLE connection per mailbox: providers cap them).
            with _Sessions(dovecot, users) as sessions:
                second = _watcher("claims-2")
                wait_until(lambda: established_to(first.pid, dovecot.imaps_port) == 3
                           and established_to(second.pid, dovecot.imaps_port) == 3, 30,
                           "the two watchers hold three mailboxes each")
                wait_until(lambda: all(imap_sessions(dovecot, u) == 1 for u in users), 10,
                           "every mailbox IDLEd once")
            assert max(sessions.most.values()) == 1, sessions.most

            # Push works for a mailbox the second watcher took over.
            taken = _held_by(second.pid)
            assert len(taken) == 3
            pushed = next(b for b in boxes if b.pk in taken)
            before = _queued_syncs(redis_db, pushed.pk)
            dovecot.deliver(users[boxes.index(pushed)], make_message(subject="push to the second"))
            wait_until(lambda: _queued_syncs(redis_db, pushed.pk) > before, 5, "sync queued on push")

            # The second watcher is killed (no clean shutdown): the first takes its mailboxes
            # back at its next refresh, and push works for them again.
            second.kill()
            wait_until(lambda: established_to(first.pid, dovecot.imaps_port) == 6, 20,
                       "the first watcher took the killed one's mailboxes over")
            wait_until(lambda: all(imap_sessions(dovecot, u) == 1 for u in users), 10,
                       "every mailbox IDLEd once again")
            before = _queued_syncs(redis_db, pushed.pk)
            dovecot.deliver(users[boxes.index(pushed)], make_message(subject="push after the kill"))
            wait_until(lambda: _queued_syncs(redis_db, pushed.pk) > before, 5, "sync queued on push")
    finally:
        first.kill()
        if second is not None:
            second.kill()


def _held_by(pid: int) -> set[int]:
    """Mailbox ids whose claim the watcher process ``pid`` holds (its database session is
    the one whose client is that process: matched through pg_stat_activity's client port)."""
    ports = _local_ports(pid)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT l.objid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objsubid = 2 "
            "AND l.objid <> 0 AND l.granted AND a.client_port = ANY(%s)",
            [CLAIMS_NAMESPACE, list(ports)])
        return {int(r[0]) for r in cursor.fetchall()}


def _local_ports(pid: int) -> set[int]:
    import os
    from pathlib import Path

    inodes = {os.readlink(fd)[8:-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
              if os.path.exists(fd) and os.readlink(fd).startswith("socket:[")}
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes and f[3] == "01":
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def _supervisor() -> IdleSupervisor:
    return IdleSupervisor(on_change=lambda _: None, refresh_interval=3600, claims=IdleClaims())


def _watched(supervisor: IdleSupervisor) -> set[int]:
    return {t.mailbox_id for t in supervisor.watchers}


def test_a_deactivated_mailbox_is_let_go_and_a_lost_claims_connection_starts_over(dovecot):
    """In one process: a mailbox deactivated is no longer IDLEd nor claimed once its
    connection closed; when the claims connection is lost (the database restarted, an
    idle-session timeout), every watcher stops at the next refresh (another process may hold
    those mailboxes now) and the claims are taken again at the one after."""
    users = [dovecot.add_user() for _ in range(3)]
    boxes = [mailbox_for(dovecot, u) for u in users]
    supervisor = _supervisor()
    try:
        supervisor.refresh()
        assert _watched(supervisor) == {b.pk for b in boxes}
        assert supervisor.claims.held() == {b.pk for b in boxes}

        Mailbox.objects.filter(pk=boxes[0].pk).update(is_active=False)
        supervisor.refresh()
        assert _watched(supervisor) == {boxes[1].pk, boxes[2].pk}
        assert supervisor.claims.held() == {boxes[1].pk, boxes[2].pk}
        wait_until(lambda: imap_sessions(dovecot, users[0]) == 0, 10, "its IDLE connection closed")

        with supervisor.claims._cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            claims_pid = cursor.fetchone()[0]
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [claims_pid])
        supervisor.refresh()
        assert _watched(supervisor) == set()
        supervisor.refresh()
        assert _watched(supervisor) == {boxes[1].pk, boxes[2].pk}
        assert supervisor.claims.held() == {boxes[1].pk, boxes[2].pk}
    finally:
        supervisor.shutdown()

    def claimed() -> int:
        # This test's mailboxes only (a watcher process of an earlier test in this database
        # may still be exiting), and waited for: a closed connection's server process lets
        # its locks go as it exits, a moment after the client closed it.
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                           f"AND database = {THIS_DATABASE} AND objid = ANY(%s)",
                           [CLAIMS_NAMESPACE, [b.pk for b in boxes]])
            return cursor.fetchone()[0]

    wait_until(lambda: claimed() == 0, 10, "shutdown let every claim go")


def test_two_supervisors_in_turn_never_hold_a_mailbox_twice(dovecot):
    """The share arithmetic with odd counts: 5 mailboxes, 2 then 3 watchers, refreshed in
    turn: every mailbox is held by exactly one, nobody holds more than its share."""
    users = [dovecot.add_user() for _ in range(5)]
    boxes = {mailbox_for(dovecot, u).pk for u in users}
    sups = [_supervisor(), _supervisor()]
    try:
        for _ in range(3):
            for s in sups:
                s.refresh()
        held = [s.claims.held() for s in sups]
        assert set().union(*held) == boxes and sum(map(len, held)) == 5, held
        assert sorted(map(len, held)) == [2, 3]
        sups.append(_supervisor())
        for _ in range(3):
            for s in sups:
                s.refresh()
        held = [s.claims.held() for s in sups]
        watched = [_watched(s) for s in sups]
        assert held == watched
        assert set().union(*held) == boxes and sum(map(len, held)) == 5, held
        assert max(map(len, held)) == 2, held
    finally:
        for s in sups:
            s.shutdown()
