"""Supervisor lifecycle (auth errors, deactivation, deletion, settings change),
flag/expunge push, and a change arriving while the sync lock is held."""
from __future__ import annotations

import threading
import time

import pytest

from mailsync.idle import IdleSupervisor, MailboxWatcher
from mailsync.models import Mailbox
from mailsync.sync.imap import server_settings
from tests.mailsync.conftest import make_message, sync_lock_held, wait_for

pytestmark = pytest.mark.django_db(transaction=True)



def _imap_sessions(dovecot, user) -> int:
    out = dovecot.doveadm("who", "-1")
    return sum(1 for line in out.splitlines()[1:] if line.split() and line.split()[0] == user.username
               and "imap" in line)


def test_wrong_password_in_supervisor_does_not_hammer(dovecot, mail_user, imap_mailbox, fault_proxy):
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    imap_mailbox.incoming_port = proxy.port
    imap_mailbox.password = "wrong"
    imap_mailbox.save()
    sup = IdleSupervisor(on_change=lambda _: None, refresh_interval=0.3, check_interval=0.2)
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()
    try:
        time.sleep(6)
        logins = proxy.connections
    finally:
        sup.stopping.set()
        t.join(10)
    assert logins <= 1, f"{logins} connections in 6 s with a wrong password"


@pytest.mark.parametrize("change", ["owner_inactive", "deleted", "mailbox_inactive"])
def test_supervisor_stops_watching_and_closes_connection(dovecot, mail_user, imap_mailbox, change):
    sup = IdleSupervisor(on_change=lambda _: None, refresh_interval=0.5, check_interval=0.2)
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(sup.watchers) == 1, 5)
        watcher = next(iter(sup.watchers.values()))
        assert watcher.connected.wait(10)
        wait_for(lambda: _imap_sessions(dovecot, mail_user) == 1, 5)
        if change == "owner_inactive":
            imap_mailbox.owner.is_active = False
            imap_mailbox.owner.save()
        elif change == "deleted":
            Mailbox.objects.filter(pk=imap_mailbox.pk).delete()
        else:
            Mailbox.objects.filter(pk=imap_mailbox.pk).update(is_active=False)
        wait_for(lambda: not watcher.is_alive(), 5)
        wait_for(lambda: _imap_sessions(dovecot, mail_user) == 0, 5)
        assert not sup.watchers
    finally:
        sup.stopping.set()
        t.join(10)


def test_settings_change_never_holds_two_idle_connections(dovecot, mail_user, imap_mailbox, fault_proxy):
    a = fault_proxy(dovecot.host, dovecot.imaps_port)
    b = fault_proxy(dovecot.host, dovecot.imaps_port)
    imap_mailbox.incoming_port = a.port
    imap_mailbox.save()
    sup = IdleSupervisor(on_change=lambda _: None, refresh_interval=0.3)  # default check_interval 1 s
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()
    peak = [0]
    done = threading.Event()

    def count():
        while not done.is_set():
            peak[0] = max(peak[0], _imap_sessions(dovecot, mail_user))
            time.sleep(0.02)

    try:
        wait_for(lambda: sup.watchers and next(iter(sup.watchers.values())).connected.is_set(), 10)
        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=b.port)
        wait_for(lambda: b.connections >= 1, 5)
        time.sleep(2)
        done.set()
        counter.join(5)
    finally:
        done.set()
        sup.stopping.set()
        t.join(10)
    assert peak[0] <= 1, f"{peak[0]} IMAP sessions at once for one mailbox during a settings change"


@pytest.mark.parametrize("what", ["flag", "expunge"])
def test_flag_change_and_expunge_trigger_on_change(dovecot, mail_user, imap_mailbox, what):
    dovecot.deliver(mail_user, make_message(subject="existing"))
    uid = dovecot.folder_state(mail_user).uids[0]
    changes: list[int] = []
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), changes.append,
                             check_interval=0.2)
    watcher.start()
    try:
        assert watcher.connected.wait(10)
        time.sleep(1.0)
        before = len(changes)
        if what == "flag":
            dovecot.set_flags(mail_user, "INBOX", uid, ["\\Seen", "\\Flagged"])
        else:
            dovecot.expunge(mail_user, "INBOX", uid)
        wait_for(lambda: len(changes) > before, 5)
    finally:
        watcher.stop()
        watcher.join(10)


def test_change_while_sync_lock_busy_runs_after_the_running_sync(imap_mailbox, monkeypatch,
                                                                  django_capture_on_commit_callbacks):
    """A change (IDLE) while a sync holds the mailbox: the task notes it and ends, with no
    retry against the lock; the running sync queues one more when it ends."""
    from mailsync import services
    from mailsync.models import Mailbox
    from mailsync.tasks import sync_mailbox

    queued = []
    monkeypatch.setattr(sync_mailbox, "retry", lambda *a, **k: pytest.fail("retried against the lock"))
    monkeypatch.setattr(sync_mailbox, "apply_async", lambda *a, **k: queued.append(a))
    monkeypatch.setattr(sync_mailbox, "delay", lambda *a, **k: queued.append(a))
    with sync_lock_held(imap_mailbox.pk):
        sync_mailbox.run(imap_mailbox.pk)
    assert Mailbox.objects.get(pk=imap_mailbox.pk).sync_requested and not queued
    # A run clears requests made before it began (it sees those changes): none queued.
    with django_capture_on_commit_callbacks(execute=True):
        services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    assert queued == []
    # A request noted while the run holds the mailbox: one more sync when it ends.
    from mailsync.sync.imap import ImapSync

    real = ImapSync._sync_folders

    def with_a_request_meanwhile(self, session):  # noqa: ANN001, ANN202
        Mailbox.objects.filter(pk=self.mailbox.pk).update(sync_requested=True)
        return real(self, session)

    monkeypatch.setattr(ImapSync, "_sync_folders", with_a_request_meanwhile)
    with django_capture_on_commit_callbacks(execute=True):
        services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    assert queued == [(imap_mailbox.pk,)]
    assert not Mailbox.objects.get(pk=imap_mailbox.pk).sync_requested
