"""Review session 11, push (IMAP IDLE): probes against real Dovecot and PostgreSQL, no mocks
of our own code. Those that failed before a fix say so in their docstring."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from django.db import connection

from mailsync import services
from mailsync.idle import IdleSupervisor, MailboxWatcher
from mailsync.models import Email, Mailbox
from mailsync.sync.imap import server_settings
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message, wait_for
from tests.testbed import dovecot as testbed

pytestmark = pytest.mark.django_db(transaction=True)


class Changes:
    """on_change for the watcher: how many times it asked for a sync."""

    def __init__(self, then=None) -> None:  # noqa: ANN001
        self._lock = threading.Lock()
        self.n = 0
        self.then = then

    def __call__(self, mailbox_id: int) -> None:
        with self._lock:
            self.n += 1
        if self.then is not None:
            self.then(mailbox_id)


def _set_server_password(dovecot, user, password: str) -> None:  # noqa: ANN001
    """Change the account's password on the server (the passwd-file Dovecot re-reads)."""
    path = Path(dovecot.users_dir) / user.username
    tmp = path.with_name(f".{user.username}.new")
    tmp.write_text(f"{user.username}:{{PLAIN}}{password}::::::\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    time.sleep(1.2)  # Dovecot re-stats a passwd-file at most once a second


def _run(sup: IdleSupervisor) -> threading.Thread:
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()
    return t


def test_a_login_refused_once_then_accepted_again_resumes_push_after_the_next_good_sync(
        dovecot, mail_user, imap_mailbox, fault_proxy):
    """The provider refuses the (unchanged) password for a while (an outage of its login
    service, a password reset undone, an account locked and unlocked): the watcher, kicked
    and reconnecting, is told "wrong password" and stops. Once the mailbox syncs again with
    the same stored password ("Sync now", the poll), push must come back by itself.

    Failed before the fix: the stopped watcher stayed in the supervisor's set under the same
    settings version, so the mailbox was never IDLEd again until the watcher process was
    restarted (new mail waited for the 5-minute poll, silently)."""
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=proxy.port)
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    changes = Changes()
    sup = IdleSupervisor(on_change=changes, refresh_interval=0.3, check_interval=0.2)
    t = _run(sup)
    try:
        wait_for(lambda: sup.watchers and next(iter(sup.watchers.values())).connected.is_set(), 15)
        watcher = next(iter(sup.watchers.values()))
        _set_server_password(dovecot, mail_user, "temporarily-refused")
        dovecot.kick(mail_user)
        wait_for(lambda: watcher.failed is not None, 20)
        _set_server_password(dovecot, mail_user, mail_user.password)
        logins = proxy.connections
        time.sleep(2)
        assert proxy.connections == logins, "the watcher retries a refused login without a good sync"
        services.mailbox_sync(mailbox_id=imap_mailbox.pk)
        assert Mailbox.objects.get(pk=imap_mailbox.pk).state == Mailbox.State.COMPLETED
        wait_for(lambda: any(w.connected.is_set() for w in sup.watchers.values()), 15)
        before = changes.n
        dovecot.deliver(mail_user, make_message(subject="after the outage"))
        wait_for(lambda: changes.n > before, 10)
    finally:
        sup.stopping.set()
        t.join(15)


def test_a_real_sync_on_each_change_settles_and_does_not_trigger_itself(dovecot, mail_user, imap_mailbox):
    """on_change runs the real sync (a second connection that fetches and may store flags):
    the sync's own effects must not come back as changes forever."""
    def sync(pk: int) -> None:
        try:
            services.mailbox_sync(mailbox_id=pk)
        finally:
            connection.close()  # the watcher thread's own database connection

    changes = Changes(then=sync)
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), changes,
                             check_interval=0.2)
    watcher.start()
    try:
        assert watcher.connected.wait(15)
        for i in range(5):
            dovecot.deliver(mail_user, make_message(subject=f"burst {i}"))
        wait_for(lambda: Email.objects.filter(mailbox=imap_mailbox, subject__startswith="burst").count() == 5,
                 30)
        time.sleep(3)
        settled = changes.n
        time.sleep(4)
        assert changes.n == settled, f"syncs keep triggering: {settled} -> {changes.n}"
        assert settled <= 8, f"{settled} syncs for 5 deliveries"
    finally:
        watcher.stop()
        watcher.join(15)


@pytest.mark.parametrize("how", ["reset", "kick-during-gap"])
def test_a_reset_connection_comes_back_and_mail_delivered_in_the_gap_is_synced(
        dovecot, mail_user, imap_mailbox, fault_proxy, how):
    """Production re-IDLE interval (25 min): a connection reset (RST, no EOF) is noticed
    without waiting for the re-IDLE; mail delivered while the watcher is away (its backoff)
    still asks for a sync once it is back."""
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    imap_mailbox.incoming_port = proxy.port
    imap_mailbox.save()
    changes = Changes()
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), changes,
                             check_interval=0.2)
    watcher.start()
    try:
        assert watcher.connected.wait(15)
        time.sleep(0.5)
        if how == "reset":
            proxy.drop_connections("reset")
        else:
            dovecot.kick(mail_user)
        wait_for(lambda: not watcher.connected.is_set(), 10)
        before = changes.n
        dovecot.deliver(mail_user, make_message(subject="in the gap"))
        wait_for(lambda: watcher.connected.is_set() and proxy.connections >= 2, 20)
        wait_for(lambda: changes.n > before, 10)
    finally:
        watcher.stop()
        watcher.join(15)
    assert not watcher.is_alive()


def _imap_sessions(server, user) -> int:  # noqa: ANN001
    out = server.doveadm("who", "-1")
    return sum(1 for line in out.splitlines()[1:]
               if line.split() and line.split()[0] == user.username and "imap" in line)


class _NoIdleDovecot(testbed.DovecotServer):
    def _write_config(self, uid: int, gid: int) -> None:
        super()._write_config(uid, gid)
        with self.config_path.open("a") as config:
            config.write("protocol imap {\n  imap_capability = IMAP4rev1 LITERAL+ SASL-IR "
                         "LOGIN-REFERRALS ID ENABLE NAMESPACE UIDPLUS MOVE CONDSTORE\n}\n")


@pytest.fixture(scope="module")
def no_idle_dovecot(test_ca):  # noqa: ANN001, ANN201
    with testbed.running_dovecot(test_ca, prefix="mailroom-noidle-", server_class=_NoIdleDovecot) as server:
        yield server


def test_a_server_without_idle_holds_no_connection_for_nothing(no_idle_dovecot, fault_proxy):
    """A server without IDLE: the poll covers the mailbox; the watcher must not keep a
    logged-in connection open that it never reads (one of the account's few connections,
    taken from the user's phone and mail apps for as long as the watcher runs).

    Failed before the fix: the watcher waited for its stop inside the session, holding it."""
    user = no_idle_dovecot.add_user()
    proxy = fault_proxy(no_idle_dovecot.host, no_idle_dovecot.imaps_port)
    mailbox = MailboxFactory(owner=UserFactory(), email_address=user.email, incoming_security="ssl",
                             username=user.username, password=user.password, is_active=True,
                             incoming_host=no_idle_dovecot.host, incoming_port=proxy.port)
    changes = Changes()
    watcher = MailboxWatcher(mailbox.pk, server_settings(mailbox), changes, check_interval=0.2)
    watcher.start()
    try:
        # It logs in once (to learn the server has no IDLE), then lets go.
        wait_for(lambda: proxy.connections >= 1, 15)
        time.sleep(1.0)
        wait_for(lambda: _imap_sessions(no_idle_dovecot, user) == 0, 10)
        time.sleep(2.0)
        assert proxy.connections == 1, "logins again and again"
        assert watcher.is_alive() and watcher.failed is None
    finally:
        watcher.stop()
        watcher.join(15)
    assert not watcher.is_alive()


def test_a_silently_stalled_idle_connection_is_given_up_at_the_re_idle_and_push_resumes(
        dovecot, mail_user, imap_mailbox, fault_proxy):
    """No FIN, no RST: the network stops carrying bytes (the fault proxy's stall). The re-IDLE
    (here after 2 s, 25 minutes in production) waits for DONE's reply at most the socket
    timeout, then the watcher reconnects with backoff; push works once the network does."""
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    imap_mailbox.incoming_port = proxy.port
    imap_mailbox.save()
    changes = Changes()
    settings = server_settings(imap_mailbox, timeout=5)
    watcher = MailboxWatcher(imap_mailbox.pk, settings, changes, check_interval=0.2, reidle_after=2.0)
    watcher.start()
    try:
        assert watcher.connected.wait(15)
        time.sleep(0.5)
        proxy.stall("both")
        wait_for(lambda: not watcher.connected.is_set(), 30)
        proxy.resume()
        wait_for(lambda: watcher.connected.is_set(), 60)
        time.sleep(0.5)
        before = changes.n
        dovecot.deliver(mail_user, make_message(subject="after the stall"))
        wait_for(lambda: changes.n > before, 10)
    finally:
        proxy.resume()
        watcher.stop()
        watcher.join(15)
    assert not watcher.is_alive()


def test_the_idle_connection_has_tcp_keepalive(dovecot, imap_mailbox):
    """A NAT or firewall that forgets a silent IDLE connection (many do within minutes) left
    it dead until the re-IDLE, 25 minutes on; the keepalive probes keep the mapping and notice
    a peer that is gone in about two minutes."""
    import socket

    from mailsync.protocols.base import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL
    from mailsync.protocols.imap import ImapSession
    from mailsync.sync.imap import server_settings

    with ImapSession(server_settings(imap_mailbox, timeout=60)) as session:
        sock = session.client._imap.sock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_COUNT
    assert KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT <= 180
