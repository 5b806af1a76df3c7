"""Real processes: Celery workers (prefork, Redis), IDLE watcher shards, beat config. Written
as review probes; those that failed were fixed: a sync asked for while a long one ran
retried against the lock 60 times and failed (now noted on the mailbox and run by the
holder when it ends), and those retries used up and leaked the transient-fault budget. A
dead static IDLE shard's mailboxes wait for that process's restart (documented; the default
on PostgreSQL, sharing by claims, takes them over: test_idle_claims.py).

Every subprocess is killed in a ``finally``; every wait is bounded. Worker probes use a
private Redis database (MAILROOM_PROBE_REDIS_URL, default db 12) flushed before and after.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from mailsync.models import Email, Mailbox
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message, sync_lock_held

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
# A Redis database of this test process's own (these tests flush it): 12, or below under xdist.
_XDIST_N = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
REDIS_URL = os.environ.get("MAILROOM_PROBE_REDIS_URL", f"redis://127.0.0.1:6379/{12 - _XDIST_N}")


# --- helpers -------------------------------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    from django.db import connection

    return {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{connection.settings_dict['NAME']}",
            "CELERY_TASK_ALWAYS_EAGER": "0", "CELERY_BROKER_URL": REDIS_URL,
            "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def redis_db():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def producer(redis_db):
    from celery import Celery

    # Not the current app: the project's shared tasks must keep resolving to crm.celery's app.
    app = Celery("probe", broker=REDIS_URL, set_as_current=False)
    # CELERY_BROKER_URL in the environment (tests/settings.py) outranks ``broker=``.
    app.conf.broker_write_url = REDIS_URL
    yield app
    app.close()


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], name: str) -> None:
        self.log = Path(tempfile.mkstemp(prefix=f"probe-{name}-", suffix=".log")[1])
        self._fh = self.log.open("wb")
        self.p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._fh,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()


@contextlib.contextmanager
def explained(running: Callable[[], Iterable[Proc | None]], *files: Path) -> Iterator[None]:
    """A failure inside carries the logs of the processes ``running()`` names then, with
    the stacks of their threads for the watchers (SIGUSR1: faulthandler), so that a rare
    failure in CI can be read."""
    try:
        yield
    except AssertionError as exc:
        procs = list(running())
        alive = [p for p in procs if p is not None and p.p.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.5)
        logs = "\n".join([*(f"--- {p.log.name} ---\n{p.text()[-6000:]}" for p in procs if p is not None),
                          *(f"--- {f} ---\n{f.read_text(errors='replace')[-4000:]}" for f in files if f.exists())])
        raise AssertionError(f"{exc}\n{logs}") from exc


def start_worker(name: str, concurrency: int = 2, **extra: str) -> Proc:
    w = Proc([sys.executable, "-m", "celery", "-A", "crm", "worker", "-P", "prefork",
              "-c", str(concurrency), "-n", f"{name}@127.0.0.1", "--without-gossip",
              "--without-mingle", "--without-heartbeat", "-l", "INFO"], _env(**extra), name)
    deadline = time.monotonic() + 40
    while " ready." not in w.text():
        if w.p.poll() is not None or time.monotonic() > deadline:
            text = w.text()
            w.kill()
            raise AssertionError(f"worker {name} did not start:\n{text[-3000:]}")
        time.sleep(0.1)
    return w


def wait_until(predicate, timeout: float, what: str) -> float:  # noqa: ANN001
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(proc.name))
    return found


def fill(dovecot, user, n: int) -> None:  # noqa: ANN001
    imap = dovecot.imap_login(user)
    try:
        for i in range(n):
            imap.append("INBOX", None, None, make_message(subject=f"probe {i}"))
    finally:
        imap.logout()


def mailbox_for(dovecot, user, **kw) -> Mailbox:  # noqa: ANN001
    return MailboxFactory(owner=kw.pop("owner", None) or UserFactory(), email_address=user.email,
                          incoming_host=dovecot.host, incoming_port=kw.pop("port", dovecot.imaps_port),
                          incoming_security="ssl", username=user.username,
                          password=kw.pop("password", user.password), is_active=True, **kw)


def task_lines(log: str, task_id: str) -> list[str]:
    return [line for line in log.splitlines() if f"[{task_id}]" in line]


def final(log: str, task_id: str) -> str | None:
    for line in task_lines(log, task_id):
        if re.search(r"succeeded in|raised unexpected|\] failed|raised:", line):
            return line
    return None


def imap_sessions(dovecot, user) -> int:  # noqa: ANN001
    out = dovecot.doveadm("who", "-1")
    return sum(1 for line in out.splitlines()[1:]
               if line.split() and line.split()[0] == user.username and "imap" in line)


def established_ports(pid: int, port: int) -> set[int]:
    """Local ports of the established TCP connections that process ``pid`` holds to
    ``port`` (a connection closed and opened again gets a new one)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                found.add(int(f[1].rsplit(":", 1)[1], 16))
    return found


def established_to(pid: int, port: int) -> int:
    """Established TCP connections that process ``pid`` holds to ``port``."""
    return len(established_ports(pid, port))


# --- configuration -------------------------------------------------------------------------

def test_beat_and_task_limits_configuration():
    from django.conf import settings

    from crm.celery import app

    app.loader.import_default_modules()
    poll = app.conf.beat_schedule["mailsync.poll_mailboxes"]
    assert poll["task"] == "mailsync.poll_mailboxes" and float(poll["schedule"]) <= 5 * 60
    task = app.tasks["mailsync.sync_mailbox"]
    assert task.acks_late and settings.CELERY_TASK_REJECT_ON_WORKER_LOST
    assert settings.CELERY_TASK_SOFT_TIME_LIMIT < settings.CELERY_TASK_TIME_LIMIT
    # A redelivered (unacked) task must not be redelivered while it still runs.
    from mailsync.sync.lock import LEASE
    assert LEASE.total_seconds() > settings.CELERY_TASK_TIME_LIMIT
    if settings.CELERY_BROKER_URL.startswith("redis"):
        assert settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] > settings.CELERY_TASK_TIME_LIMIT


# --- workers -------------------------------------------------------------------------------

def test_killed_pool_child_task_is_redelivered_and_completes_without_duplicates(dovecot, producer):
    user = dovecot.add_user()
    fill(dovecot, user, 40)
    mailbox = mailbox_for(dovecot, user)
    w = start_worker("kill1", MAILROOM_TEST_BATCH_MESSAGES="4", MAILROOM_TEST_STORE_DELAY="0.15")
    try:
        producer.send_task("mailsync.sync_mailbox", args=[mailbox.pk])
        wait_until(lambda: Email.objects.filter(mailbox=mailbox).count() >= 8, 30, "8 emails stored")
        pool = children(w.pid)
        grandchildren = [g for c in pool for g in children(c)]
        for pid in pool:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: Mailbox.objects.get(pk=mailbox.pk).state == Mailbox.State.COMPLETED
                   and Email.objects.filter(mailbox=mailbox).count() == 40, 60,
                   "redelivered sync completes:\n" + w.text()[-2000:])
        wait_until(lambda: not any(Path(f"/proc/{g}").exists() for g in grandchildren), 10,
                   "fetch process of the killed child ended")
        ids = list(Email.objects.filter(mailbox=mailbox).values_list("message_id", flat=True))
        assert len(ids) == len(set(ids)) == 40
    except AssertionError:
        print(w.text()[-4000:])
        raise
    finally:
        w.kill()


def test_whole_worker_killed_task_waits_visibility_timeout_but_poll_recovers(dovecot, producer):
    from django.conf import settings

    user = dovecot.add_user()
    fill(dovecot, user, 30)
    mailbox = mailbox_for(dovecot, user)
    w1 = start_worker("whole1", MAILROOM_TEST_BATCH_MESSAGES="4", MAILROOM_TEST_STORE_DELAY="0.2")
    w2 = None
    try:
        producer.send_task("mailsync.sync_mailbox", args=[mailbox.pk])
        wait_until(lambda: Email.objects.filter(mailbox=mailbox).count() >= 8, 30, "8 emails stored")
        w1.kill()  # the whole process group: machine lost
        stored = Email.objects.filter(mailbox=mailbox).count()
        assert stored < 30
        w2 = start_worker("whole2")
        time.sleep(6)
        # Documented: the unacked task comes back only after the visibility timeout (4 h).
        assert Email.objects.filter(mailbox=mailbox).count() == stored, \
            f"redelivered early (visibility_timeout={settings.CELERY_BROKER_TRANSPORT_OPTIONS})"
        # The beat poll (safety net) recovers it; the dead session's advisory lock is gone.
        producer.send_task("mailsync.poll_mailboxes")
        wait_until(lambda: Mailbox.objects.get(pk=mailbox.pk).state == Mailbox.State.COMPLETED
                   and Email.objects.filter(mailbox=mailbox).count() == 30, 40,
                   "poll completes the mailbox:\n" + w2.text()[-2000:])
        ids = list(Email.objects.filter(mailbox=mailbox).values_list("message_id", flat=True))
        assert len(ids) == len(set(ids))
    finally:
        w1.kill()
        if w2:
            w2.kill()


def test_five_syncs_of_one_mailbox_at_once_on_two_workers(dovecot, producer):
    user = dovecot.add_user()
    fill(dovecot, user, 24)
    mailbox = mailbox_for(dovecot, user)
    extra = {"MAILROOM_TEST_BATCH_MESSAGES": "4", "MAILROOM_TEST_STORE_DELAY": "0.3"}
    a = start_worker("dupA", **extra)
    b = start_worker("dupB", **extra)
    try:
        ids = [producer.send_task("mailsync.sync_mailbox", args=[mailbox.pk]).id for _ in range(5)]
        log = lambda: a.text() + b.text()  # noqa: E731
        wait_until(lambda: all(final(log(), t) for t in ids), 90,
                   "all five tasks end:\n" + log()[-3000:])
        text = log()
        finals = {t: final(text, t) for t in ids}
        retries = sum(1 for line in text.splitlines() if "sync_mailbox" in line and "Retry in" in line)
        failed = [f for f in finals.values() if "succeeded" not in f]
        print(f"busy retries: {retries}; finals: {finals}")
        assert not failed, failed
        # The running sync queues one more for the requests it saw (sync_requested): done
        # when that one is.
        wait_until(lambda: Mailbox.objects.filter(pk=mailbox.pk, state=Mailbox.State.COMPLETED,
                                                  sync_requested=False).exists(), 60,
                   "the mailbox ends completed:\n" + log()[-2000:])
        assert Email.objects.filter(mailbox=mailbox).count() == 24
        assert retries <= 40, f"{retries} busy retries for 5 queued syncs (an error storm)"
    finally:
        a.kill()
        b.kill()


def test_sync_asked_for_during_a_long_sync_runs_after_it(dovecot, producer):
    """A change pushed (IDLE, "Sync now", the poll) while a long sync holds the mailbox: the
    request is noted (Mailbox.sync_requested) and the running sync queues one more when it
    ends, however long it took. Found by a probe: the request retried against the lock
    every 2 s, 60 times, then failed, and used up the transient-fault retry budget."""
    user = dovecot.add_user()
    fill(dovecot, user, 20)
    mailbox = mailbox_for(dovecot, user)
    w = start_worker("busy", MAILROOM_TEST_BATCH_MESSAGES="4", MAILROOM_TEST_STORE_DELAY="0.4",
                     MAILROOM_SYNC_PROCESS_MIN_MESSAGES="0")
    try:
        producer.send_task("mailsync.sync_mailbox", args=[mailbox.pk])
        wait_until(lambda: Email.objects.filter(mailbox=mailbox).count() >= 4, 60, "the first sync stores")
        fill(dovecot, user, 1)  # after the first sync's SEARCH
        asked = producer.send_task("mailsync.sync_mailbox", args=[mailbox.pk]).id
        wait_until(lambda: Email.objects.filter(mailbox=mailbox).count() == 21, 90,
                   "the sync asked for meanwhile runs after the long one:\n" + w.text()[-2000:])
        text = w.text()
        assert "succeeded" in (final(text, asked) or ""), task_lines(text, asked)
        assert not [line for line in text.splitlines() if "sync_mailbox" in line and "Retry in" in line]
        assert not Mailbox.objects.get(pk=mailbox.pk).sync_requested
    finally:
        w.kill()


def test_a_busy_mailbox_costs_no_retry_of_the_transient_budget(dovecot, producer):
    """The sync lock held: the task ends at once (noted for the holder), with no retry; so a
    later outage still gets the full backoff budget (found by a probe: busy retries counted
    against max_retries=8, and self.retry(max_retries=60) leaked into later tasks)."""
    user = dovecot.add_user()
    mailbox = mailbox_for(dovecot, user)
    w = start_worker("busy2", concurrency=1)
    try:
        with sync_lock_held(mailbox.pk):
            tid = producer.send_task("mailsync.sync_mailbox", args=[mailbox.pk]).id
            wait_until(lambda: final(w.text(), tid) is not None, 30, "the busy task ends")
            assert Mailbox.objects.get(pk=mailbox.pk).sync_requested
        assert "succeeded" in final(w.text(), tid)
        assert "Retry in" not in " ".join(task_lines(w.text(), tid))
    finally:
        w.kill()


def test_wrong_password_one_login_attempt_no_retry(dovecot, producer, fault_proxy):
    user = dovecot.add_user()
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    mailbox = mailbox_for(dovecot, user, port=proxy.port, password="wrong-password")
    mailbox.incoming_host = proxy.host
    mailbox.save()
    w = start_worker("auth")
    try:
        tid = producer.send_task("mailsync.sync_mailbox", args=[mailbox.pk]).id
        wait_until(lambda: final(w.text(), tid), 20, "task ends")
        time.sleep(4)
        m = Mailbox.objects.get(pk=mailbox.pk)
        assert m.state == Mailbox.State.ERROR and m.last_error_code == "auth_failed", m.last_error_code
        assert proxy.connections == 1, proxy.connections
        assert not any("Retry in" in x for x in task_lines(w.text(), tid))
        assert "succeeded" in final(w.text(), tid)
    finally:
        w.kill()


# --- IDLE watchers -------------------------------------------------------------------------

def _queued_syncs(redis_db, mailbox_id: int) -> int:
    import json

    n = 0
    for raw in redis_db.lrange("celery", 0, -1):
        headers = json.loads(raw).get("headers", {})
        if headers.get("task") == "mailsync.sync_mailbox" and headers.get("argsrepr") in (
                f"({mailbox_id},)", f"[{mailbox_id}]"):
            n += 1
    return n


def test_idle_watcher_shards_split_and_follow_changes(dovecot, redis_db):
    users = [dovecot.add_user() for _ in range(6)]
    boxes = [mailbox_for(dovecot, u) for u in users]
    shards = [Proc([sys.executable, "manage.py", "imap_idle_watch", "--shard", str(i),
                    "--shards", "2", "--refresh", "1"], _env(), f"idle{i}") for i in range(2)]
    try:
        # Exactly one IDLE connection per mailbox, each held by its shard.
        wait_until(lambda: all(imap_sessions(dovecot, u) == 1 for u in users), 20,
                   "one IMAP session per mailbox")
        time.sleep(1.5)
        assert [imap_sessions(dovecot, u) for u in users] == [1] * 6
        for i, shard in enumerate(shards):
            mine = sum(1 for b in boxes if b.pk % 2 == i)
            assert established_to(shard.pid, dovecot.imaps_port) == mine

        # New mail: a sync is queued at once.
        pushed = boxes[0]
        before = _queued_syncs(redis_db, pushed.pk)
        dovecot.deliver(users[0], make_message(subject="push"))
        took = wait_until(lambda: _queued_syncs(redis_db, pushed.pk) > before, 5, "sync queued on push")
        print(f"push -> queued in {took:.2f} s")

        # Changes while watchers run: password changed, deactivated, another mailbox added.
        changed, deactivated = boxes[1], boxes[2]
        changed.password = "not-the-password"
        changed.save()
        deactivated.is_active = False
        deactivated.save()
        # One active mailbox per owner: the deactivated one's owner activates another.
        new_user = dovecot.add_user()
        added = mailbox_for(dovecot, new_user, owner=deactivated.owner)
        wait_until(lambda: imap_sessions(dovecot, users[1]) == 0, 15, "changed password: old IDLE closed")
        wait_until(lambda: imap_sessions(dovecot, users[2]) == 0, 15, "deactivated: IDLE closed")
        wait_until(lambda: imap_sessions(dovecot, new_user) == 1, 15, "added mailbox watched")

        # One watcher process dies: its shard is static (pk % shards), so its mailboxes wait
        # for that process to be restarted (the 5-minute poll covers them meanwhile; without
        # --shards the watchers share by claims and take them over: test_idle_claims.py). The other shard's mailboxes stay watched.
        active = [(b, u) for b, u in zip(boxes + [added], users + [new_user])
                  if b.pk not in (changed.pk, deactivated.pk)]
        dead = 1
        shards[dead].kill()
        time.sleep(3)
        alive = [u.username for b, u in active if b.pk % 2 != dead and imap_sessions(dovecot, u) != 1]
        assert not alive, f"the surviving shard's mailboxes lost their IDLE connection: {alive}"
    finally:
        for s in shards:
            s.kill()


def test_a_poll_while_the_server_is_down_makes_one_login_attempt_a_sync_now_retries(
        dovecot, producer, fault_proxy):
    """The beat poll's sync leaves a transient fault to the next poll: retried with backoff
    as well, every poll started a chain of up to nine attempts while a server was down, and
    the chains of successive polls overlapped (found in review). "Sync now" still retries."""
    user = dovecot.add_user()
    fill(dovecot, user, 3)
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    mailbox = mailbox_for(dovecot, user, port=proxy.port)
    mailbox.incoming_host = proxy.host
    mailbox.save()
    proxy.cut_after(0)  # every connection closed at once: the server is down
    w = start_worker("down", concurrency=1)
    try:
        def sync_lines() -> list[str]:
            return [line for line in w.text().splitlines() if "mailsync.sync_mailbox" in line]

        producer.send_task("mailsync.poll_mailboxes")
        wait_until(lambda: any("succeeded" in line for line in sync_lines()), 30,
                   "the poll's sync ends:\n" + w.text()[-2000:])
        time.sleep(3)
        assert proxy.connections == 1, proxy.connections
        assert not [line for line in sync_lines() if "Retry in" in line], sync_lines()
        down = Mailbox.objects.get(pk=mailbox.pk)
        assert down.state == Mailbox.State.ERROR, down.state
        assert down.last_error_code not in Mailbox.USER_ERROR_CODES, down.last_error_code

        producer.send_task("mailsync.sync_mailbox", args=[mailbox.pk])  # "Sync now"
        wait_until(lambda: any("Retry in" in line for line in sync_lines()), 30,
                   "a sync asked for by the user is retried:\n" + w.text()[-2000:])

        proxy.reset()  # the server is back: the next poll brings the mail
        producer.send_task("mailsync.poll_mailboxes")
        wait_until(lambda: Email.objects.filter(mailbox=mailbox).count() == 3
                   and Mailbox.objects.get(pk=mailbox.pk).state == Mailbox.State.COMPLETED, 60,
                   "the next poll syncs:\n" + w.text()[-2000:])
    finally:
        w.kill()
