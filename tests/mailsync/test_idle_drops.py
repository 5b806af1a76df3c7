"""The IDLE connection is dropped by the server / network."""
from __future__ import annotations

import threading
import time

import pytest
from imapclient import IMAPClient

from mailsync.idle import MailboxWatcher
from mailsync.sync.imap import server_settings
from tests.mailsync.conftest import make_message, wait_for

pytestmark = pytest.mark.django_db(transaction=True)



@pytest.fixture
def idle_check_calls(monkeypatch):
    calls = {"n": 0}
    lock = threading.Lock()
    original = IMAPClient.idle_check

    def counting(self, timeout=None):
        with lock:
            calls["n"] += 1
        return original(self, timeout)

    monkeypatch.setattr(IMAPClient, "idle_check", counting)
    return calls


@pytest.mark.parametrize("how", ["proxy-close", "kick"])
def test_dropped_idle_connection_is_noticed_and_push_resumes(
    dovecot, mail_user, imap_mailbox, fault_proxy, idle_check_calls, how
):
    """Production defaults for reidle_after (25 min); check_interval 0.2 s."""
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    imap_mailbox.incoming_port = proxy.port
    imap_mailbox.save()
    changes: list[int] = []
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), changes.append,
                             check_interval=0.2)
    watcher.start()
    try:
        assert watcher.connected.wait(10)
        time.sleep(1.0)
        if how == "kick":
            dovecot.kick(mail_user)
        else:
            proxy.drop_connections("close")
        t0 = time.monotonic()
        n0 = idle_check_calls["n"]
        time.sleep(2.0)
        calls_in_2s = idle_check_calls["n"] - n0
        # At check_interval 0.2 a healthy watcher makes ~10 idle_check calls in 2 s.
        assert calls_in_2s < 100, f"busy loop: {calls_in_2s} idle_check calls in 2 s after the drop"
        wait_for(lambda: not watcher.connected.is_set() or proxy.connections > 1, 5)
        wait_for(lambda: proxy.connections >= 2 and watcher.connected.is_set(), 10)
        before = len(changes)
        dovecot.deliver(mail_user, make_message(subject="after drop"))
        wait_for(lambda: len(changes) > before, 5)
        print("recovered after", time.monotonic() - t0)
    finally:
        watcher.stop()
        watcher.join(10)
    assert not watcher.is_alive()


def test_backoff_resets_after_a_successful_reconnect(dovecot, mail_user, imap_mailbox):
    """Each drop happens after a healthy, established IDLE: reconnection should not get
    slower and slower (a flap last week must not delay push by minutes today)."""
    changes: list[int] = []
    # reidle_after short so the drop is noticed quickly (independent of the EOF issue).
    # stable_after: a session that lasted this long (here 0.5 s, in production a minute) was
    # a working one; only then is the backoff reset.
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), changes.append,
                             reidle_after=0.3, check_interval=0.1, stable_after=0.5)
    watcher.start()
    delays = []
    try:
        assert watcher.connected.wait(10)
        for _ in range(4):
            time.sleep(1.0)  # healthy for a while
            dovecot.kick(mail_user)
            wait_for(lambda: not watcher.connected.is_set(), 5)
            start = time.monotonic()
            try:
                wait_for(watcher.connected.is_set, 12)
            except AssertionError:
                delays.append(">12")
                break
            delays.append(round(time.monotonic() - start, 1))
    finally:
        watcher.stop()
        watcher.join(10)
    assert all(d != ">12" and d < 4.0 for d in delays), f"reconnect delays after each drop: {delays}"


def test_network_drop_is_not_mistaken_for_a_tls_setting_error(
    dovecot, mail_user, imap_mailbox, fault_proxy
):
    """A TCP connection closed without TLS close_notify (NAT timeout, proxy, server crash)
    must be retried, not treated as a user error that stops the watcher for good."""
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    imap_mailbox.incoming_port = proxy.port
    imap_mailbox.save()
    changes: list[int] = []
    # reidle_after short: the drop is noticed at the next DONE (independent of the EOF spin).
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), changes.append,
                             reidle_after=0.5, check_interval=0.1)
    watcher.start()
    try:
        assert watcher.connected.wait(10)
        time.sleep(1.0)
        proxy.drop_connections("close")
        time.sleep(1.5)
        assert watcher.failed is None, f"watcher gave up for good: {watcher.failed!r} ({watcher.failed.code})"
        assert watcher.is_alive()
        wait_for(lambda: proxy.connections >= 2 and watcher.connected.is_set(), 10)
        before = len(changes)
        dovecot.deliver(mail_user, make_message(subject="after drop"))
        wait_for(lambda: len(changes) > before, 5)
    finally:
        watcher.stop()
        watcher.join(10)
