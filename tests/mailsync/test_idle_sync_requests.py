"""The IDLE watcher asks for syncs through one thread of its own (``SyncRequests``): a
broker that fails or hangs never costs a push nor a mailbox its IDLE. Real Dovecot and
PostgreSQL; the broker is the one thing replaced (an ``on_change`` that fails or blocks the
way a publish to a Redis that is down does), because its failures are what is tested."""
from __future__ import annotations

import threading
import time

import pytest

from mailsync import idle
from mailsync.idle import IdleSupervisor, SyncRequests
from tests.mailsync.conftest import make_message, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class Broker:
    """Records the syncs queued; ``fail`` first calls raise as kombu does when Redis is
    down; while ``hold`` is clear, a call blocks (a broker that does not answer)."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls = 0
        self.queued: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self._lock = threading.Lock()

    def __call__(self, mailbox_id: int) -> None:
        with self._lock:
            self.calls += 1
            failing = self.calls <= self.fail
        self.hold.wait(30)
        if failing:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        with self._lock:
            self.queued.append(mailbox_id)


def _run(sup: IdleSupervisor) -> threading.Thread:
    t = threading.Thread(target=sup.run, daemon=True)
    t.start()
    return t


def _connected(sup: IdleSupervisor) -> bool:
    return bool(sup.watchers) and all(w.connected.is_set() for w in sup.watchers.values())


def test_a_push_the_broker_refused_is_queued_once_it_is_back(dovecot, mail_user, imap_mailbox, monkeypatch):
    """Redis is down when the watcher connects and when new mail arrives: the sync is
    queued as soon as it is back. (Before SyncRequests the watcher called the broker itself
    and logged the error: that push was lost until the 5-minute poll.)"""
    monkeypatch.setattr(idle, "NOTIFY_RETRY_START", 0.2)
    broker = Broker(fail=10**6)
    sup = IdleSupervisor(on_change=broker, refresh_interval=30, check_interval=0.2)
    t = _run(sup)
    try:
        wait_for(lambda: _connected(sup), 15)
        wait_for(lambda: broker.calls >= 2, 10)  # the connect-time request, refused, retried
        dovecot.deliver(mail_user, make_message(subject="while the broker is down"))
        time.sleep(1.5)  # the watcher has seen it and asked (the request waits, coalesced)
        assert broker.queued == []
        broker.fail = 0  # Redis is back
        wait_for(lambda: imap_mailbox.pk in broker.queued, 10)
        # One request per mailbox while it waits, however many changes came meanwhile.
        assert broker.queued.count(imap_mailbox.pk) == 1, broker.queued
        # And push goes on as usual afterwards.
        dovecot.deliver(mail_user, make_message(subject="after the broker is back"))
        wait_for(lambda: broker.queued.count(imap_mailbox.pk) == 2, 10)
    finally:
        sup.stopping.set()
        t.join(20)
    assert not t.is_alive()


def test_a_hung_broker_does_not_stop_the_watching(dovecot, mail_user, imap_mailbox):
    """The broker does not answer when the watcher connects: the watcher still goes into
    IDLE and sees new mail, and the sync for it is queued once the broker answers."""
    broker = Broker()
    broker.hold.clear()
    sup = IdleSupervisor(on_change=broker, refresh_interval=30, check_interval=0.2)
    t = _run(sup)
    try:
        wait_for(lambda: _connected(sup), 15)
        wait_for(lambda: broker.calls == 1, 10)  # blocked in the connect-time request
        watcher = next(iter(sup.watchers.values()))
        dovecot.deliver(mail_user, make_message(subject="while the broker hangs"))
        # Seen through IDLE (or the NOOP before it) while the first request still hangs:
        # the watcher was not held by the broker.
        wait_for(lambda: sup.requests.pending() == [imap_mailbox.pk], 10)
        assert watcher.is_alive() and watcher.connected.is_set()
        broker.hold.set()
        wait_for(lambda: broker.queued == [imap_mailbox.pk, imap_mailbox.pk], 10)
    finally:
        broker.hold.set()
        sup.stopping.set()
        t.join(20)
    assert not t.is_alive()


def test_what_is_asked_for_at_shutdown_still_goes_out_and_a_dead_broker_does_not_hold_it():
    """No server needed: requests made just before the watcher stops are queued before it
    exits; with the broker down they are given up after NOTIFY_FLUSH, not waited on."""
    broker = Broker()
    requests = SyncRequests(broker)
    requests.start()
    broker.hold.clear()
    requests.ask(1)  # in flight, blocked
    wait_for(lambda: broker.calls == 1, 5)
    for pk in (2, 3, 2):
        requests.ask(pk)
    requests.stop()
    broker.hold.set()
    requests.join(10)
    assert not requests.is_alive()
    assert broker.queued == [1, 2, 3]

    down = Broker(fail=10**6)
    requests = SyncRequests(down)
    requests.start()
    requests.ask(7)
    wait_for(lambda: down.calls >= 1, 5)
    started = time.monotonic()
    requests.stop()
    requests.join(idle.NOTIFY_FLUSH + 5)
    assert not requests.is_alive()
    assert time.monotonic() - started <= idle.NOTIFY_FLUSH + 2
    assert down.queued == [] and requests.pending() == [7]


def test_after_the_server_drops_every_connection_the_watchers_do_not_reconnect_in_step(dovecot):
    """A provider restart drops all IDLE connections at once: the reconnects are spread
    over the backoff (jitter), not all in the same instant (a burst of logins that providers
    answer with "too many connections" or a temporary lock). Without jitter all 8 came back
    within ~0.1 s of each other."""
    import uuid

    from tests.factories import MailboxFactory, UserFactory

    prefix = f"herd{uuid.uuid4().hex[:6]}"
    users = [dovecot.add_user(name=f"{prefix}-{i}") for i in range(8)]
    for user in users:
        MailboxFactory(owner=UserFactory(), email_address=user.email, incoming_host=dovecot.host,
                       incoming_port=dovecot.imaps_port, incoming_security="ssl",
                       username=user.username, password=user.password, is_active=True)
    sup = IdleSupervisor(on_change=lambda _: None, refresh_interval=30, check_interval=0.1)
    t = _run(sup)
    try:
        wait_for(lambda: len(sup.watchers) == 8 and _connected(sup), 20)
        watchers = list(sup.watchers.values())
        kicked = time.monotonic()
        dovecot.doveadm("kick", f"{prefix}-*")
        wait_for(lambda: not any(w.connected.is_set() for w in watchers), 5)
        back: dict[int, float] = {}
        deadline = time.monotonic() + 10
        while len(back) < len(watchers) and time.monotonic() < deadline:
            for w in watchers:
                if w.mailbox_id not in back and w.connected.is_set():
                    back[w.mailbox_id] = time.monotonic()
            time.sleep(0.01)
        assert len(back) == len(watchers), "not every watcher came back"
        spread = max(back.values()) - min(back.values())
        # Uniform over 1-2 s: 8 reconnects all within 0.2 s has a chance of ~1e-5.
        assert spread >= 0.2, f"all reconnected within {spread:.2f} s"
        # And not just spread by uneven logins on a busy machine: without jitter no watcher
        # can be back before the whole first backoff (2 s) has passed; with it, all 8 waiting
        # 1.8 s or more has a chance of 0.2**8 (~3e-6).
        first = min(back.values()) - kicked
        assert first < 0.9 * idle.BACKOFF_START, f"the first came back {first:.2f} s after the kick"
    finally:
        sup.stopping.set()
        t.join(20)
