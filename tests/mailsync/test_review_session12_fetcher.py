"""Review of session 12's fetch-process channel (mailsync/sync/fetcher.py): the child's frames
now come over one end of a ``socket.socketpair()`` (``Frames``, ``write_frame``) instead of
a pickle stream on a pipe.

Probed here, against the private Dovecot and the real engines (ImapSync, Pop3Sync):
leaks of file descriptors, threads and child processes in a long-lived worker across many
syncs that fail in every way; a child that dies (SIGKILL) or ends at every point of the
exchange; POP3 through the child; one large message near the size limit crossing the
channel; the descriptors the child inherits; and the child outliving its worker.

Tests whose docstring starts with "Fixed (was a bug)" failed against the first version of
the socket channel and pass since."""
from __future__ import annotations

import gc
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

import mailsync.sync.imap as imap_engine
import mailsync.sync.pop3 as pop3_engine
from mailsync.exceptions import (MailAuthError, MailError, MailServerUnreachable,
                                 MailTransientError)
from mailsync.models import Email, Mailbox
from mailsync.protocols.base import ServerSettings
from mailsync.storage import decompress
from mailsync.sync import fetcher
from mailsync.sync.imap import ImapSync
from mailsync.sync.lock import ConnectionSlot
from mailsync.sync.pop3 import Pop3Sync
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import _fetch_processes, make_message

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


# -- what this process holds -------------------------------------------------------------------
def open_fds() -> dict[int, str]:
    """This process's open descriptors and what each is (socket:[...], pipe:[...], a path)."""
    held = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            held[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory's own descriptor, closed meanwhile
            continue
    return held


def _children() -> list[tuple[int, str, bytes]]:
    """(pid, state, cmdline) of this process's direct children."""
    me = os.getpid()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == me:
            found.append((int(proc.name), fields[0], cmdline))
    return found


def zombies() -> list[int]:
    return [pid for pid, state, _ in _children() if state == "Z"]


def fetch_children() -> list[int]:
    return _fetch_processes(os.getpid())


def kinds(fds: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for target in fds.values():
        kind = target.split(":", 1)[0] if ":" in target else "file"
        out[kind] = out.get(kind, 0) + 1
    return out


def settle(baseline: dict[int, str], timeout: float = 5.0) -> dict[int, str]:
    """Descriptors once asynchronous closes (a proxy's threads, Dovecot's side) are done."""
    deadline = time.monotonic() + timeout
    while True:
        now = open_fds()
        if len(now) <= len(baseline) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def sync_imap(mailbox: Mailbox):  # noqa: ANN201
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def sync_pop3(mailbox: Mailbox):  # noqa: ANN201
    mailbox.refresh_from_db()
    return Pop3Sync(mailbox, timeout=10).run()


def crm_mailbox(dovecot, user, *, protocol: str = "imap", port: int | None = None,  # noqa: ANN001
                password: str | None = None, **fields) -> Mailbox:  # noqa: ANN003
    """A new CRM mailbox on the server account ``user``: its first sync downloads everything."""
    pop3 = protocol == "pop3"
    return MailboxFactory(
        owner=UserFactory(), email_address=user.email, incoming_security="ssl",
        incoming_host=dovecot.host,
        incoming_port=port or (dovecot.pop3s_port if pop3 else dovecot.imaps_port),
        protocol=Mailbox.Protocol.POP3 if pop3 else Mailbox.Protocol.IMAP,
        username=user.username, password=password or user.password, is_active=True, **fields)


def stored(mailbox: Mailbox) -> int:
    return Email.objects.filter(mailbox=mailbox).count()


class IngestHook:
    """Calls ``action(n)`` before the n-th batch is stored, in whichever engine runs."""

    def __init__(self, monkeypatch) -> None:  # noqa: ANN001
        self.action = None
        self.calls = 0
        real_imap, real_pop3 = imap_engine.ingest_batch, pop3_engine.ingest_batch

        def wrap(real):  # noqa: ANN001, ANN202
            def wrapped(**kwargs):  # noqa: ANN003, ANN202
                self.calls += 1
                if self.action is not None:
                    self.action(self.calls)
                return real(**kwargs)
            return wrapped

        monkeypatch.setattr(imap_engine, "ingest_batch", wrap(real_imap))
        monkeypatch.setattr(pop3_engine, "ingest_batch", wrap(real_pop3))

    def set(self, action) -> None:  # noqa: ANN001
        self.calls = 0
        self.action = action


def noise(size: int) -> str:
    """``size`` characters of base64 of random bytes: what an attachment compresses to."""
    import base64

    return base64.encodebytes(os.urandom(size * 3 // 4)).decode()


def kill_fetch_children() -> list[int]:
    pids = fetch_children()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


# == 1. Leaks across many syncs, failures included ===============================================
def test_twenty_four_syncs_with_every_kind_of_failure_leak_no_descriptor_thread_or_process(
        dovecot, fault_proxy, settings, monkeypatch):
    """A worker runs syncs for days: every run through the fetch process, whichever way it
    ends (done, wrong password, the child SIGKILLed mid-download or before SELECT, the
    store failing, UIDVALIDITY changed, a CRM action taking the connection between two
    batches, the server cutting the connection mid-FETCH, a spare started ahead and never
    used, POP3 through Pop3ChildSession and its child killed mid-RETR), must give back
    every socket and pipe, leave no zombie and no fetch process, and no receiving thread.

    Measured: /proc/self/fd, the process's children (state Z), threading.enumerate(). Two
    rounds of twelve runs; the first sync of each kind is run once before the baseline so
    that lazily opened things (the database connection, caches) are not counted."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(imap_engine, "BATCH_MESSAGES", 3)
    monkeypatch.setattr(pop3_engine, "BATCH_MESSAGES", 3)
    imap_user, pop3_user = dovecot.add_user(), dovecot.add_user()
    # Incompressible bodies: the child cannot push everything into the socket and end
    # before the kills below.
    for i in range(15):
        dovecot.deliver(imap_user, make_message(subject=f"Imap {i:02d}", body=noise(120_000)))
        dovecot.deliver(pop3_user, make_message(subject=f"Pop {i:02d}", body=noise(120_000)))
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    hook = IngestHook(monkeypatch)
    spawned: list[int] = []
    real_spawn = fetcher._spawn

    def counting_spawn():  # noqa: ANN202
        child = real_spawn()
        spawned.append(child.pid)
        return child

    monkeypatch.setattr(fetcher, "_spawn", counting_spawn)
    real_send = fetcher._send
    real_fetch_in_child = imap_engine.fetch_in_child
    outcomes: list[tuple[str, str]] = []

    def expect(name: str, run, error: type[BaseException] | None, check=None,  # noqa: ANN001
               children: int = 1) -> None:
        first = len(spawned)
        try:
            run()
        except BaseException as exc:  # noqa: BLE001
            assert error is not None and isinstance(exc, error), (name, repr(exc))
            outcomes.append((name, type(exc).__name__))
        else:
            assert error is None, (name, "no error")
            outcomes.append((name, "ok"))
        finally:
            hook.set(None)
            monkeypatch.setattr(fetcher, "_send", real_send)
            monkeypatch.setattr(imap_engine, "fetch_in_child", real_fetch_in_child)
            monkeypatch.setattr(ConnectionSlot, "wanted", ConnectionSlot.wanted)
            proxy.reset()
        if check is not None:
            check()
        assert len(spawned) - first >= children, (name, "no fetch process was used")
        assert not fetch_children(), (name, "a fetch process outlived its sync")
        assert not zombies(), (name, "a child was never reaped")

    def good_imap() -> None:
        box = crm_mailbox(dovecot, imap_user)
        expect("imap done", lambda: sync_imap(box), None, lambda: _eq(stored(box), 15))

    def wrong_password() -> None:
        box = crm_mailbox(dovecot, imap_user, password="wrong")
        expect("imap wrong password", lambda: sync_imap(box), MailAuthError)

    def child_killed_mid_download() -> None:
        box = crm_mailbox(dovecot, imap_user)
        hook.set(lambda n: n == 2 and kill_fetch_children())
        expect("imap child SIGKILL mid-download", lambda: sync_imap(box), MailTransientError)

    def child_killed_before_selected() -> None:
        def send_then_kill(child, obj):  # noqa: ANN001, ANN202
            real_send(child, obj)
            child.kill()

        monkeypatch.setattr(fetcher, "_send", send_then_kill)
        box = crm_mailbox(dovecot, imap_user)
        expect("imap child SIGKILL before SELECT", lambda: sync_imap(box), MailTransientError)

    def store_fails() -> None:
        def boom(n: int) -> None:
            if n == 2:
                raise RuntimeError("the database went away")

        box = crm_mailbox(dovecot, imap_user)
        hook.set(boom)
        expect("imap store fails", lambda: sync_imap(box), RuntimeError)

    def uidvalidity_changed() -> None:
        def other_validity(job, child=None):  # noqa: ANN001, ANN202
            job.uidvalidity += 1
            return real_fetch_in_child(job, child)

        monkeypatch.setattr(imap_engine, "fetch_in_child", other_validity)
        box = crm_mailbox(dovecot, imap_user)
        expect("imap UIDVALIDITY changed", lambda: sync_imap(box), MailTransientError)

    def action_takes_the_connection() -> None:
        asked = {"n": 0}

        def wanted(self) -> bool:  # noqa: ANN001
            asked["n"] += 1
            return asked["n"] == 1  # after the first batch, once

        monkeypatch.setattr(ConnectionSlot, "wanted", wanted)
        box = crm_mailbox(dovecot, imap_user)
        expect("imap early stop + hand over", lambda: sync_imap(box), None,
               lambda: (_eq(stored(box), 15), _eq(asked["n"] > 1, True)), children=2)

    def server_cut_mid_fetch() -> None:
        box = crm_mailbox(dovecot, imap_user, port=proxy.port)
        proxy.cut_after(40_000, direction="down")
        expect("imap server gone mid-FETCH", lambda: sync_imap(box), MailServerUnreachable)

    def spare_never_used() -> None:
        settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 1000
        box = crm_mailbox(dovecot, imap_user)
        try:
            expect("imap spare discarded", lambda: sync_imap(box), None)
        finally:
            settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10

    def good_pop3() -> None:
        box = crm_mailbox(dovecot, pop3_user, protocol="pop3", pop3_delete_after_download=False)
        expect("pop3 done", lambda: sync_pop3(box), None, lambda: _eq(stored(box), 15))

    def pop3_child_killed_mid_retr() -> None:
        box = crm_mailbox(dovecot, pop3_user, protocol="pop3", pop3_delete_after_download=False)
        hook.set(lambda n: n == 2 and kill_fetch_children())
        expect("pop3 child SIGKILL mid-RETR", lambda: sync_pop3(box), MailTransientError)

    def pop3_wrong_password() -> None:
        box = crm_mailbox(dovecot, pop3_user, protocol="pop3", password="wrong",
                          pop3_delete_after_download=False)
        expect("pop3 wrong password", lambda: sync_pop3(box), MailAuthError, children=0)

    scenarios = [good_imap, wrong_password, child_killed_mid_download, child_killed_before_selected,
                 store_fails, uidvalidity_changed, action_takes_the_connection, server_cut_mid_fetch,
                 spare_never_used, good_pop3, pop3_child_killed_mid_retr, pop3_wrong_password]
    for scenario in scenarios:  # warm-up: the database connection, TLS contexts, the proxy
        scenario()
    baseline, threads = open_fds(), {t.name for t in threading.enumerate()}
    for _ in range(2):
        for scenario in scenarios:
            scenario()
    after = settle(baseline)
    leaked = {fd: what for fd, what in after.items() if fd not in baseline or baseline[fd] != what}
    assert len(outcomes) == 3 * len(scenarios)
    assert len(spawned) >= 3 * 12, len(spawned)
    assert len(after) <= len(baseline), (kinds(baseline), kinds(after), leaked, outcomes)
    assert {t.name for t in threading.enumerate()} <= threads | {"MainThread"}, threading.enumerate()


def _eq(got: object, want: object) -> None:
    assert got == want, (got, want)


# == 2. The parent's side of the channel, whatever the child does =================================
# A stand-in for the fetch process, started as ``fetcher._spawn`` starts it (stdin a pipe,
# stdout our socket's other end): it reads its job, then runs the test's script (Python,
# with ``frame(obj)``, ``raw(bytes)``, ``die()`` and BATCH at hand).
_FAKE_CHILD = """
import os, pickle, signal, struct, sys, time
job = pickle.load(sys.stdin.buffer)
out = os.fdopen(1, "wb", buffering=0)
def raw(data):
    out.write(data)
def frame(obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    raw(struct.pack("!Q", len(data)) + data)
def die():
    os.kill(os.getpid(), signal.SIGKILL)
BATCH = ("batch", [1], [], [])
"""


def fake_child(script: str) -> subprocess.Popen:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child = subprocess.Popen([sys.executable, "-c", _FAKE_CHILD + textwrap.dedent(script)],
                                 stdin=subprocess.PIPE, stdout=theirs.fileno())
    finally:
        theirs.close()
    child.frames = fetcher.Frames(ours)  # type: ignore[attr-defined]
    return child


def small_job(uidvalidity: int = 7) -> fetcher.FetchJob:
    return fetcher.FetchJob(ServerSettings("127.0.0.1", 1, "ssl", "u", "secret"), "INBOX",
                            uidvalidity, [[1], [2], [3]], {1: 10, 2: 10, 3: 10}, 10**6)


def consume(items, deadline: float) -> tuple[list, BaseException | None, bool]:  # noqa: ANN001
    """Iterate ``items`` in a thread (as the engine's main thread does): what came, the
    error it ended with, and whether it ended within ``deadline`` seconds."""
    got: list = []
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            for item in items:
                got.append(item)
        except BaseException as exc:  # noqa: BLE001
            ended.append(exc)
        else:
            ended.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    return got, (ended[0] if ended else None), not thread.is_alive()


@pytest.mark.parametrize(("script", "batches", "error"), [
    pytest.param("die()", 0, MailTransientError, id="killed-before-any-frame"),
    pytest.param("raw(struct.pack('!Q', 100)[:5]); die()", 0, MailTransientError,
                 id="killed-mid-length"),
    pytest.param("frame(('selected', 7)); d = pickle.dumps(('batch', [1], [os.urandom(16 << 20)], []));"
                 " raw(struct.pack('!Q', len(d))); raw(d[:len(d) // 2]); die()", 0, MailTransientError,
                 id="killed-mid-16MB-frame"),
    pytest.param("frame(('selected', 7)); frame(BATCH); die()", 1, MailTransientError,
                 id="killed-between-frames"),
    pytest.param("frame(('selected', 7)); frame(BATCH); frame(BATCH); sys.exit(0)", 2,
                 MailTransientError, id="exits-0-without-done"),
    pytest.param("frame(('selected', 7)); os.close(1); time.sleep(60)", 0, MailTransientError,
                 id="closes-its-end-and-lives-on"),
    pytest.param("frame(('selected', 7)); frame(['batch']); time.sleep(60)", 0, MailError,
                 id="sends-a-list"),
    pytest.param("frame(('selected', 8)); frame(BATCH); frame(('done',))", 0, MailTransientError,
                 id="uidvalidity-changed"),
    pytest.param("frame(('selected', 7)); frame(BATCH); frame(('error', OSError('disk'))); "
                 "time.sleep(60)", 1, OSError, id="error-frame-then-hangs"),
    pytest.param("frame(('selected', 7)); frame(BATCH); frame(('done',)); time.sleep(60)", 1, None,
                 id="done-then-lingers"),
])
def test_the_receiving_side_ends_promptly_and_cleanly_wherever_the_child_stops(script, batches, error):
    """``fetch_in_child`` against a scripted child: killed before its first frame, inside
    the length, half-way through a 16 MB frame, between two frames; exiting normally without
    "done"; closing its socket end while it lives on; sending a non-tuple; another
    UIDVALIDITY; an error frame; "done" followed by a child that does not exit. Each must
    end (within 10 s: nothing waits on the child to exit by itself) with the batches before
    the fault and the right error, the child reaped, and both ends of the channel closed."""
    before = open_fds()
    child = fake_child(script)
    got, ended, finished = consume(fetcher.fetch_in_child(small_job(), child), deadline=10)
    if not finished:
        child.kill()
    assert finished, "the sync hung on the fetch process"
    assert len(got) == batches, got
    if error is None:
        assert ended is None, repr(ended)
    else:
        assert isinstance(ended, error), repr(ended)
    assert child.returncode is not None, "the child was not reaped"
    assert child.stdin.closed and child.frames.sock.fileno() == -1
    assert not zombies()
    assert len(settle(before)) <= len(before), (kinds(before), kinds(open_fds()))


# == 3. The fetch process does not outlive its worker ===========================================
# A worker in miniature: it starts a fetch process the way the engine does (``_spawn``, the
# job on stdin), prints its pid, then sleeps or exits at once.
_WORKER = """
import os, sys, time, types
sys.path.insert(0, {root!r})
crm = types.ModuleType("crm"); crm.__path__ = [{root!r} + "/crm"]; sys.modules["crm"] = crm
from mailsync.protocols.base import ServerSettings
from mailsync.sync import fetcher
child = fetcher._spawn()
job = fetcher.FetchJob(ServerSettings("127.0.0.1", {port}, "none", "u", "p", timeout=20,
                                      allow_private_hosts=True), "INBOX", 1, [[1]], {{1: 10}}, 10**6)
fetcher._send(child, job)
child.stdin.close()
print(child.pid, flush=True)
if {exit_at_once}:
    os._exit(0)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _silent_server() -> socket.socket:
    """A mail server that accepts and never greets: the fetch process waits on it (up to
    its timeout, 20 s here) without writing a frame, so no broken socket can end it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(5)
    return server


def _start_worker(port: int, *, exit_at_once: bool) -> tuple[subprocess.Popen, int]:
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER.format(root=str(ROOT), port=port, exit_at_once=exit_at_once)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
    return worker, int(worker.stdout.readline())


def test_a_worker_killed_while_its_fetch_process_waits_on_the_server_takes_it_along():
    """The worker SIGKILLed while its fetch process waits on a silent server (not writing:
    the broken socket cannot end it): PR_SET_PDEATHSIG kills it at once, it does not hold
    the mailbox's connection until its timeout (20 s). No process with the bootstrap
    command line is left."""
    server = _silent_server()
    worker, pid = _start_worker(server.getsockname()[1], exit_at_once=False)
    try:
        connection, _ = server.accept()  # the child is past its start-up: it logs in
        worker.kill()
        worker.wait(5)
        deadline = time.monotonic() + 3
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(pid), "the fetch process outlived its worker"
        assert connection.recv(100) == b"", "its connection to the server is still open"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        worker.kill()
        worker.wait(5)
        server.close()


def test_a_worker_killed_during_its_fetch_process_start_up_leaves_no_orphan_logging_in():
    """Fixed (was a bug; the worker's pid now comes in argv): fetcher.py main() read its parent's pid with ``os.getppid()``
    after its interpreter and imports started (~0.15-0.3 s after the fork), then sets
    PR_SET_PDEATHSIG and compares ``os.getppid()`` with that value. A worker that died in
    that window (OOM killer, Celery's hard time limit, a deploy's SIGKILL, right after
    ``fetch_in_child`` spawned the child and wrote the job, which it does at once when no
    spare was started) has already been replaced as parent (by init), both reads agree, the
    death signal is armed too late to ever fire, and the orphan goes on: it reads the job,
    connects and logs in to the mail server with the mailbox's password, and lives until it
    first writes a frame ("selected") or the server times out (20 s here, the sync's
    timeout: 30 s in production, per command). Fix: pass the worker's pid in argv
    (``[sys.executable, "-c", _BOOTSTRAP, root, str(os.getpid())]``) and compare
    ``os.getppid()`` with it after the prctl, returning at once when they differ."""
    server = _silent_server()
    worker, pid = _start_worker(server.getsockname()[1], exit_at_once=True)
    worker.wait(5)
    server.settimeout(3)
    try:
        try:
            connection, _ = server.accept()
        except TimeoutError:
            connection = None
        else:
            connection.close()
        alive_after = _alive(pid)
        assert connection is None, "the orphaned fetch process connected to the mail server"
        assert not alive_after, "the fetch process outlived its worker"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        server.close()


# == 4. What the fetch process holds ============================================================
def _socket_inodes(pid: int | str) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return out


def test_a_fetch_process_holds_no_descriptor_of_the_worker_nor_of_another_fetch_process(db):
    """EOF on a fetch process's socket relies on that process being the only holder of the
    other end. A second fetch process started while the first runs (a spare, another
    mailbox's sync in the same worker) must not inherit it, nor anything else of the
    worker's: its database connection, our ends of the channels, the stdin pipes. Checked
    in /proc/<pid>/fd of both children (after their start-up), and by behaviour: the first
    one killed, its channel reports EOF at once while the second lives."""
    from django.db import connection

    connection.ensure_connection()
    database = os.readlink(f"/proc/self/fd/{connection.connection.fileno()}")
    first = fetcher._spawn()
    second = fetcher._spawn()
    try:
        ours = {os.readlink(f"/proc/self/fd/{c.frames.sock.fileno()}") for c in (first, second)}
        stdin_pipes = {os.readlink(f"/proc/self/fd/{c.stdin.fileno()}") for c in (first, second)}
        worker = set(open_fds().values())
        deadline = time.monotonic() + 10
        for child in (first, second):  # after main() has dup'ed its frames and moved stdout
            while len(_socket_inodes(child.pid)) < 4:
                assert time.monotonic() < deadline and child.poll() is None
                time.sleep(0.02)
        held = {c.pid: set(_socket_inodes(c.pid).values()) for c in (first, second)}
        for pid, targets in held.items():
            assert database not in targets, (pid, targets)
            assert not (targets & ours), (pid, targets & ours)
        # Each child's end of the channel is a socket the worker does not hold; no socket
        # is held by both children.
        sockets = {pid: {t for t in targets if t.startswith("socket:")} for pid, targets in held.items()}
        assert not (sockets[first.pid] & sockets[second.pid]), sockets
        assert not ((sockets[first.pid] | sockets[second.pid]) & worker)
        assert not (held[second.pid] & {os.readlink(f"/proc/{first.pid}/fd/0")})  # its stdin
        assert not (held[first.pid] & stdin_pipes - {os.readlink(f"/proc/{first.pid}/fd/0")})
        # Behaviour: the first one's death is EOF on its channel, the second still running.
        first.kill()
        first.wait(5)
        first.frames.sock.settimeout(5)
        with pytest.raises(EOFError):
            first.frames.load()
        assert second.poll() is None
    finally:
        fetcher._end(first)
        fetcher._end(second)


# == 5. Large frames ===========================================================================
def _server_messages(dovecot, user) -> dict[str, tuple[int, bytes]]:  # noqa: ANN001
    """Subject -> (RFC822.SIZE, the whole message) as the server holds it."""
    import email

    imap = dovecot.imap_login(user)
    try:
        imap.select("INBOX", readonly=True)
        _, data = imap.uid("FETCH", "1:*", "(RFC822.SIZE BODY.PEEK[])")
        out = {}
        for item in data:
            if isinstance(item, tuple):
                size = int(item[0].split(b"RFC822.SIZE ")[1].split()[0])
                out[email.message_from_bytes(item[1])["Subject"]] = (size, item[1])
        return out
    finally:
        imap.logout()


def test_a_message_exactly_at_the_size_limit_crosses_the_channel_whole_in_one_frame(
        dovecot, settings, monkeypatch):
    """A mailbox limit set to the exact RFC822.SIZE of a ~6 MB message (base64 of random
    bytes: ~4.6 MB once compressed, one frame of its own): that message arrives through the
    fetch process whole, byte for byte, in one frame of that size; one a few bytes larger
    is kept as its headers (truncated, with its notice); the ten small ones beside them are
    all stored. The frames seen by the worker are bounded by the batch they carry."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(imap_engine, "BATCH_MESSAGES", 4)
    user = dovecot.add_user()
    for i in range(10):
        dovecot.deliver(user, make_message(subject=f"Small {i}"))
    body = noise(6_000_000)
    dovecot.deliver(user, make_message(subject="At the limit", body=body))
    dovecot.deliver(user, make_message(subject="Over the limit", body=body + "tail of a few more bytes\n"))
    on_server = _server_messages(dovecot, user)
    limit = on_server["At the limit"][0]
    assert on_server["Over the limit"][0] > limit
    box = crm_mailbox(dovecot, user, max_message_bytes=limit)
    frames: list[int] = []
    real_exactly = fetcher.Frames._exactly

    def exactly(self, size: int):  # noqa: ANN001, ANN202
        if size != fetcher.Frames._HEADER.size:
            frames.append(size)
        return real_exactly(self, size)

    monkeypatch.setattr(fetcher.Frames, "_exactly", exactly)
    report = sync_imap(box)
    assert frames, "the fetch process was not used"
    assert report.new == 12, report
    at_limit = Email.objects.get(mailbox=box, subject="At the limit")
    over = Email.objects.get(mailbox=box, subject="Over the limit")
    assert not at_limit.truncated and at_limit.size == limit
    assert decompress(at_limit.source_data.compressed()) == on_server["At the limit"][1]
    assert over.truncated
    assert len(decompress(over.source_data.compressed())) < 10_000
    assert max(frames) > 4_000_000, frames  # the large message: one frame
    assert max(frames) < limit, frames  # compressed, and never the raw bytes besides


def _peak_of(load) -> int:  # noqa: ANN001
    """Bytes allocated at the peak of ``load()`` (tracemalloc), the result freed after."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


def test_receiving_a_frame_costs_no_more_memory_than_over_the_pipe():
    """Fixed (was a bug; a frame over WHOLE_FRAME, 32 MB, is now unpickled as it arrives, while
    batches, up to 8 MB, still come in one system call): ``Frames.load`` allocated the whole frame as one
    bytearray (zero-filled before a byte arrives), then ``pickle.loads`` copies every bytes
    object out of it: while a frame comes in, the worker holds it twice. Measured here for
    one 40 MB message: 2.00x the payload, against 1.00x for ``pickle.load`` on the pipe of
    before (the C unpickler ``readinto``s each large bytes object straight into place).
    That breaks imap.py's "At most two batches are in memory" (``_fetch_and_store``): with
    batch n being stored and batch n+1 arriving there are three batches' worth; for one
    message near the mailbox's limit (default 50 MB, up to 1 GB through the API) that is
    one more copy of the limit in a worker that the memory tests hold to 200 MB. Fix
    keeping one system call per large piece: read the 8-byte length, then
    ``pickle.load(io.BufferedReader(raw))`` where ``raw`` is a small ``io.RawIOBase`` whose
    ``readinto(b)`` loops ``sock.recv_into(b, len(b), MSG_WAITALL)`` (bounded by the
    frame's remaining length): the unpickler then receives each large bytes object into
    its final buffer, the GIL released, with no second copy."""
    payload = os.urandom(40 << 20)
    frame = ("batch", [1], [payload], [])
    written = io.BytesIO()
    fetcher.write_frame(written, frame)
    data = written.getvalue()
    body = data[fetcher.Frames._HEADER.size:]  # the pickle alone, as the pipe carried it
    del written

    def over_socket() -> object:
        ours, theirs = socket.socketpair()
        writer = threading.Thread(target=lambda: (theirs.sendall(data), theirs.close()))
        writer.start()
        try:
            return fetcher.Frames(ours).load()
        finally:
            writer.join()
            ours.close()

    def over_pipe() -> object:
        read_end, write_end = os.pipe()

        def write() -> None:
            with os.fdopen(write_end, "wb") as out:
                out.write(body)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            with os.fdopen(read_end, "rb") as stream:
                return pickle.load(stream)
        finally:
            writer.join()

    socket_peak, pipe_peak = _peak_of(over_socket), _peak_of(over_pipe)
    ratio, before = socket_peak / len(payload), pipe_peak / len(payload)
    print(f"peak while receiving a {len(payload) >> 20} MB frame: socket {ratio:.2f}x, pipe {before:.2f}x")
    assert before < 1.3, before  # the measure itself: the pipe's one copy
    assert ratio < 1.3, f"{ratio:.2f}x the payload while receiving (pipe: {before:.2f}x)"


# == 6. POP3 through the fetch process ===========================================================
def test_pop3_through_the_child_sends_dele_only_for_stored_mail_and_a_killed_child_applies_none(
        dovecot, settings, monkeypatch):
    """Remove mode, 15 messages in batches of 3 through Pop3ChildSession: every command
    crosses the channel as its own small frame. (1) Every message number in a DELE (sent
    with a later batch's RETR, or alone) belongs to a message already stored when the
    command was sent; the session ends with QUIT and the server is empty. (2) A second
    account: its child SIGKILLed mid-download (batch 3's RETR in flight, DELE of batch 1
    already sent in the session): a transient error, no QUIT, so the server applies no
    DELE and still holds all 15; the rerun stores each of them once and empties it.
    Neither child's command line or environment carries the password."""
    from mailsync.sync.fetcher import Pop3ChildSession

    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(pop3_engine, "BATCH_MESSAGES", 3)
    hook = IngestHook(monkeypatch)
    stored_uids: set[int] = set()
    real_ingest = pop3_engine.ingest_batch

    def ingest(**kwargs):  # noqa: ANN003, ANN202
        result = real_ingest(**kwargs)
        stored_uids.update(p.message.uid for p in kwargs["prepared"])
        return result

    monkeypatch.setattr(pop3_engine, "ingest_batch", ingest)
    commands: list[tuple[str, list[int], set[int]]] = []  # name, DELE numbers, stored then
    uid_of: dict[int, int] = {}
    real_call = Pop3ChildSession._call

    def call(self, *command):  # noqa: ANN001, ANN002, ANN202
        name = command[0]
        if name == "retrieve_prepared":
            deletes = list(command[2])
            uid_of.update(command[3])
        elif name == "delete":
            deletes = list(command[1])
        else:
            deletes = []
        commands.append((name, deletes, set(stored_uids)))
        return real_call(self, *command)

    monkeypatch.setattr(Pop3ChildSession, "_call", call)
    children: list[tuple[bytes, bytes]] = []
    real_spawn = fetcher._spawn

    def spawn():  # noqa: ANN202
        child = real_spawn()
        children.append((Path(f"/proc/{child.pid}/cmdline").read_bytes(),
                         Path(f"/proc/{child.pid}/environ").read_bytes()))
        return child

    monkeypatch.setattr(fetcher, "_spawn", spawn)

    # (1) the order of DELE and the commits
    user = dovecot.add_user()
    for i in range(15):
        dovecot.deliver(user, make_message(subject=f"Remove {i:02d}", body=noise(30_000)))
    box = crm_mailbox(dovecot, user, protocol="pop3")
    assert box.pop3_delete_after_download
    sync_pop3(box)
    assert stored(box) == 15
    assert dovecot.folder_state(user).count == 0
    names = [name for name, _, _ in commands]
    assert names[0] == "listing" and names[-1] == "quit", names
    deleted = [(number, then) for _, deletes, then in commands for number in deletes]
    assert sorted(number for number, _ in deleted) == list(range(1, 16)), deleted
    early = [number for number, then in deleted if uid_of[number] not in then]
    assert not early, f"DELE sent for messages not stored yet: {early}"

    # (2) the child killed mid-download
    commands.clear()
    killed: list[int] = []
    other = dovecot.add_user()
    for i in range(15):
        dovecot.deliver(other, make_message(subject=f"Killed {i:02d}", body=noise(100_000)))
    box = crm_mailbox(dovecot, other, protocol="pop3")
    hook.set(lambda n: n == 3 and killed.extend(kill_fetch_children()))
    with pytest.raises(MailTransientError):
        sync_pop3(box)
    hook.set(None)
    assert killed, "no fetch process was running"
    assert any(deletes for _, deletes, _ in commands), "no DELE was sent before the kill"
    assert "quit" not in [name for name, _, _ in commands]
    assert 0 < stored(box) < 15
    assert dovecot.folder_state(other).count == 15  # no QUIT: no DELE applied
    sync_pop3(box)
    assert sorted(Email.objects.filter(mailbox=box).values_list("subject", flat=True)) == [
        f"Killed {i:02d}" for i in range(15)]
    assert dovecot.folder_state(other).count == 0

    assert len(children) >= 2
    for cmdline, environ in children:
        for secret in (user.password, other.password):
            assert secret.encode() not in cmdline and secret.encode() not in environ
    assert not fetch_children() and not zombies()


def test_pop3_child_session_abandoned_while_a_command_waits_ends_that_command_at_once(
        dovecot, fault_proxy):
    """The POP3 engine's error path: the main thread calls ``session.abandon()`` while the
    prefetch thread waits in ``_call`` for a RETR answer (here the server stopped sending:
    the proxy stalls). The waiting command must end at once with a transient error (EOF
    from the killed child), not after the server's timeout; the session refuses further
    commands; the child is reaped and the channel closed (descriptors back to before)."""
    from mailsync.protocols.pop3 import Pop3Request
    from mailsync.sync.fetcher import Pop3ChildSession

    user = dovecot.add_user()
    for i in range(3):
        dovecot.deliver(user, make_message(subject=f"Stalled {i}", body=noise(200_000)))
    proxy = fault_proxy(dovecot.host, dovecot.pop3s_port)
    settings = ServerSettings(dovecot.host, proxy.port, "ssl", user.username, user.password,
                              timeout=20, allow_private_hosts=True)
    before = open_fds()
    session = Pop3ChildSession(settings).__enter__()
    try:
        listing = session.listing()
        assert len(listing) == 3
        proxy.stall("down")
        outcome: list[BaseException | None] = []

        def retrieve() -> None:
            try:
                session.retrieve([Pop3Request(item.number, 10**7) for item in listing])
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001
                outcome.append(exc)

        waiting = threading.Thread(target=retrieve)
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive(), outcome
        started = time.monotonic()
        session.abandon()
        waiting.join(5)
        assert not waiting.is_alive(), "the command kept waiting after abandon()"
        assert time.monotonic() - started < 3
        assert isinstance(outcome[0], MailTransientError), outcome
        with pytest.raises(MailServerUnreachable):
            session.listing()
    finally:
        proxy.reset()
        session.__exit__(None, None, None)
    assert not fetch_children() and not zombies()
    assert len(settle(before)) <= len(before), (kinds(before), kinds(open_fds()))
