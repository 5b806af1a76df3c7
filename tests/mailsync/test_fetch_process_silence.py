"""A fetch process that stops answering (SIGSTOP, frozen) no longer hangs its sync until
Celery's hard time limit (~55 minutes of "in progress" and a connection slot held): after
SILENCE seconds without a frame the worker kills it and the sync ends with a transient error
(retried); the rerun stores exactly what the server holds. A slow server is not silence:
the child says it is alive (TICK) while it waits.

Real Dovecot, PostgreSQL and fetch processes; SILENCE and TICK are shortened for the test
(the child gets TICK in its argv when it is spawned)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import mailsync.sync.imap as engine
from mailsync.exceptions import MailTransientError
from mailsync.models import Email, Mailbox
from mailsync.sync import fetcher
from tests.mailsync.conftest import _fetch_processes
from tests.mailsync.test_sync_crashes_and_odd_replies import (
    assert_progress_sane,
    crm_view,
    deliver,
    hook_ingest,
    server_view,
    sync,
)

pytestmark = pytest.mark.django_db


def _state(pid: int) -> str:
    stat = open(f"/proc/{pid}/stat").read()  # noqa: PTH123, SIM115
    return stat[stat.rindex(")") + 2:].split()[0]


def test_a_stopped_fetch_process_ends_the_sync_with_a_retried_error_and_the_rerun_is_exact(
        dovecot, mail_user, imap_mailbox, settings, monkeypatch):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    monkeypatch.setattr(fetcher, "SILENCE", 2.0)
    monkeypatch.setattr(fetcher, "TICK", 0.3)
    # Incompressible bodies: the child cannot have pushed everything into the socket.
    subjects = deliver(dovecot, mail_user, 15, "Stopped", body_size=150_000)
    stopped: list[int] = []

    def on_call(n: int) -> None:
        if n == 2:
            for pid in _fetch_processes(os.getpid()):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)

    hook_ingest(monkeypatch, on_call)
    started = time.monotonic()
    try:
        with pytest.raises(MailTransientError, match="stopped answering"):
            sync(imap_mailbox)
    finally:
        for pid in stopped:  # never leave a stopped process behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    took = time.monotonic() - started
    assert stopped, "no fetch process was running"
    # Two SILENCE periods at most (a frame cut short, then nothing), plus the batches before.
    assert took < 2 * 2.0 + 10, took
    # The worker killed and reaped it: no stopped process is left holding a connection.
    assert not _fetch_processes(os.getpid())
    assert all(not os.path.exists(f"/proc/{pid}") for pid in stopped)
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == Mailbox.State.ERROR
    assert "stopped answering" in imap_mailbox.last_error
    assert 0 < Email.objects.filter(mailbox=imap_mailbox).count() < 15

    monkeypatch.undo()
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    sync(imap_mailbox)
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert crm_view(imap_mailbox) == server_view(dovecot, mail_user)
    assert_progress_sane(imap_mailbox)


def test_a_server_slower_than_the_silence_is_waited_for(
        dovecot, mail_user, imap_mailbox, settings, monkeypatch, fault_proxy):
    """The server goes quiet for 2.5 x SILENCE in the middle of the download (within the
    connection's own 10 s timeout): the child's ticks keep the sync going and it completes."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    monkeypatch.setattr(fetcher, "SILENCE", 2.0)
    monkeypatch.setattr(fetcher, "TICK", 0.3)
    subjects = deliver(dovecot, mail_user, 12, "Slow", body_size=100_000)
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=proxy.port)

    def on_call(n: int) -> None:
        if n == 2:
            proxy.stall("down")
            threading.Timer(5.0, proxy.resume).start()

    hook_ingest(monkeypatch, on_call)
    started = time.monotonic()
    sync(imap_mailbox)
    assert time.monotonic() - started >= 4.0  # it did wait through the stall
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert_progress_sane(imap_mailbox)


def test_ticks_between_frames_are_skipped_by_the_receiver():
    """The frame reader sees ticks only as a sign of life: a stream of ticks around the real
    frames yields the real frames in order."""
    import socket

    ours, theirs = socket.socketpair()
    try:
        out = theirs.makefile("wb")
        for frame in [("tick",), ("selected", 7), ("tick",), ("tick",), ("done",)]:
            fetcher.write_frame(out, frame)
        out.close()
        frames = fetcher.Frames(ours)
        assert fetcher._receive(frames) == ("selected", 7)
        assert fetcher._receive(frames) == ("done",)
    finally:
        ours.close()
        theirs.close()
