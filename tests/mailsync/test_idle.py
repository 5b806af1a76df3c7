"""IMAP IDLE push against the private Dovecot: a new mail reaches the API within seconds,
IDLE is re-issued, lost connections come back, shards split the mailboxes."""
from __future__ import annotations

import time

import pytest
from django.db import connection
from rest_framework.test import APIClient

from mailsync import services
from mailsync.exceptions import MailAuthError
from mailsync.idle import IdleSupervisor, MailboxWatcher
from mailsync.sync.imap import server_settings
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _sync_in_thread(mailbox_id: int) -> None:
    try:
        services.mailbox_sync(mailbox_id=mailbox_id)
    finally:
        connection.close()  # the watcher thread's own connection



def _explained_wait(predicate, what: str, mailbox, watcher) -> None:  # noqa: ANN001
    """wait_for(predicate, 10), failing with what a rare CI failure needs to be read: the
    mailbox's state and error, and whether the watcher is connected."""
    try:
        wait_for(predicate, 10)
    except AssertionError as exc:
        box = mailbox.__class__.objects.get(pk=mailbox.pk)
        raise AssertionError(
            f"not within 10 s: {what}; mailbox {box.state!r} {box.last_error!r} "
            f"(last sync {box.last_sync_at}); watcher alive={watcher.is_alive()} "
            f"connected={watcher.connected.is_set()} failed={watcher.failed!r}") from exc


def _subjects(api: APIClient) -> set[str]:
    return {e["subject"] for e in api.get("/api/v1/emails/?page_size=500").json()["results"]}


def test_new_mail_reaches_the_api_within_two_seconds(dovecot, mail_user, imap_mailbox):
    api = APIClient()
    api.force_authenticate(imap_mailbox.owner)
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), _sync_in_thread,
                             check_interval=0.2)
    watcher.start()
    try:
        assert watcher.connected.wait(10)
        _explained_wait(lambda: imap_mailbox.__class__.objects.get(pk=imap_mailbox.pk).state == "completed",
                        "the first sync completed", imap_mailbox, watcher)
        latencies = []
        for i in range(3):
            subject = f"Push {i}"
            start = time.monotonic()
            dovecot.deliver(mail_user, make_message(subject=subject))
            _explained_wait(lambda s=subject: s in _subjects(api), f"{subject!r} in the API",
                            imap_mailbox, watcher)
            latencies.append(time.monotonic() - start)
    finally:
        watcher.stop()
        watcher.join(10)
    # Dovecot itself waits 0.5 s before notifying. The median keeps a single slow round on a
    # loaded machine from failing the test; none may be really slow.
    assert sorted(latencies)[1] < 2.0 and max(latencies) < 5.0, latencies


def test_idle_is_reissued_and_a_dropped_connection_comes_back(dovecot, mail_user, imap_mailbox):
    changes: list[int] = []
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), changes.append,
                             reidle_after=0.5, check_interval=0.1)
    watcher.start()
    try:
        assert watcher.connected.wait(10)
        time.sleep(1.5)  # several IDLE / DONE cycles
        before = len(changes)
        dovecot.deliver(mail_user, make_message())
        wait_for(lambda: len(changes) > before, 5)

        dovecot.kick(mail_user)  # the server drops the connection
        wait_for(lambda: not watcher.connected.is_set(), 5)
        wait_for(watcher.connected.is_set, 10)  # reconnected after backoff
        before = len(changes)
        dovecot.deliver(mail_user, make_message())
        wait_for(lambda: len(changes) > before, 5)
    finally:
        watcher.stop()
        watcher.join(10)
    assert set(changes) == {imap_mailbox.pk}


def test_wrong_password_stops_the_watcher_without_hammering(dovecot, mail_user, imap_mailbox):
    imap_mailbox.password = "wrong"
    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), lambda _: None)
    watcher.start()
    watcher.join(10)
    assert not watcher.is_alive()
    assert isinstance(watcher.failed, MailAuthError)


def test_shards_split_mailboxes_and_inactive_ones_are_not_watched(dovecot):
    mailboxes = []
    for _ in range(4):
        user = dovecot.add_user()
        mailboxes.append(MailboxFactory(
            owner=UserFactory(), email_address=user.email, incoming_host=dovecot.host,
            incoming_port=dovecot.imaps_port, username=user.username, password=user.password,
            is_active=True,
        ))
    inactive_user = dovecot.add_user()
    MailboxFactory(owner=UserFactory(), email_address=inactive_user.email, incoming_host=dovecot.host,
                   incoming_port=dovecot.imaps_port, username=inactive_user.username,
                   password=inactive_user.password, is_active=False)

    shard_sets = []
    for shard in range(2):
        supervisor = IdleSupervisor(shard=shard, shards=2, on_change=lambda _: None)
        shard_sets.append({t.mailbox_id for t in supervisor.targets()})
    assert shard_sets[0].isdisjoint(shard_sets[1])
    assert shard_sets[0] | shard_sets[1] == {m.pk for m in mailboxes}

    supervisor = IdleSupervisor(on_change=lambda _: None, check_interval=0.2)
    try:
        supervisor.refresh()
        assert len(supervisor.watchers) == 4
        for watcher in supervisor.watchers.values():
            assert watcher.connected.wait(10)
        # Deactivating a mailbox stops its watcher at the next refresh
        mailboxes[0].is_active = False
        mailboxes[0].save()
        supervisor.refresh()
        assert mailboxes[0].pk not in {t.mailbox_id for t in supervisor.watchers}
    finally:
        supervisor.shutdown()
