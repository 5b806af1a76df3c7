"""Helpers for mail tests: messages built like real clients build them, and a mailbox in
the CRM pointed at a fresh user of the private Dovecot."""
from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timedelta, timezone

import pytest

from mailsync.models import Mailbox
from tests.factories import MailboxFactory, UserFactory

_counter = itertools.count(1)


def make_message(
    *,
    sender: str = "Customer <customer@client.example>",
    to: str = "sales@example.test",
    subject: str | None = None,
    body: str = "Hello, we would like a quote.",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: str | None = None,
    attachment: tuple[str, bytes, str] | None = None,
    date: datetime | None = None,
    html: str | None = None,
) -> bytes:
    n = next(_counter)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject or f"Message {n}"
    msg["Date"] = format_datetime(date or datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=n))
    msg["Message-ID"] = message_id or make_msgid(idstring=str(n), domain="client.example")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    msg.set_content(body)
    if html:
        msg.add_alternative(html, subtype="html")
    if attachment:
        name, data, ctype = attachment
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes().replace(b"\n", b"\r\n")


@pytest.fixture
def mail_user(dovecot):
    return dovecot.add_user()


def _active_mailbox(mail_user, **server) -> Mailbox:  # noqa: ANN001, ANN003
    return MailboxFactory(owner=UserFactory(), email_address=mail_user.email, incoming_security="ssl",
                          username=mail_user.username, password=mail_user.password, is_active=True,
                          **server)


@pytest.fixture
def imap_mailbox(dovecot, mail_user) -> Mailbox:
    """An active IMAP mailbox over verified TLS (IMAPS) on the private Dovecot."""
    return _active_mailbox(mail_user, incoming_host=dovecot.host, incoming_port=dovecot.imaps_port)


@pytest.fixture
def pop3_mailbox(dovecot, mail_user) -> Mailbox:
    """An active POP3 mailbox over verified TLS (POP3S) on the private Dovecot, in the
    default mode: remove from the server after download."""
    return _active_mailbox(mail_user, protocol=Mailbox.Protocol.POP3, incoming_host=dovecot.host,
                           incoming_port=dovecot.pop3s_port)


def wait_for(predicate, timeout: float) -> float:  # noqa: ANN001
    """Seconds until ``predicate()`` is true, polled every 20 ms; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s")


def mailbox_input(dovecot, user, **overrides) -> dict:  # noqa: ANN001
    """What an API client sends to create an IMAPS mailbox on the private Dovecot."""
    return {
        "display_name": "Sales", "email_address": user.email, "incoming_host": dovecot.host,
        "incoming_port": dovecot.imaps_port, "incoming_security": "ssl",
        "username": user.username, "password": user.password, **overrides,
    }


@contextlib.contextmanager
def sync_lock_held(mailbox_id: int) -> Iterator[None]:
    """The mailbox's sync lock held, as a running sync holds it: by a worker's own database
    session (a PostgreSQL advisory lock), released when that session ends."""
    import psycopg2
    from django.db import connection

    from mailsync.sync.lock import LOCK_NAMESPACE

    db = connection.settings_dict
    worker = psycopg2.connect(dbname=db["NAME"], user=db["USER"], host=db["HOST"] or None,
                              port=db["PORT"] or None, password=db["PASSWORD"] or None)
    try:
        with worker.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", [LOCK_NAMESPACE, mailbox_id])
        yield
    finally:
        worker.close()


def kill_worker_midway(mailbox: Mailbox, *, after_emails: int, timeout: float = 30,
                       fetch_process: bool = False) -> None:
    """Run ``manage.py sync_mailbox`` in a real worker process and SIGKILL it once it has
    committed ``after_emails`` emails. Small batches and a pause after each commit (test
    hooks read by the engines) aim the kill between two batches."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from django.db import connection

    from mailsync.models import Email

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{connection.settings_dict['NAME']}",
           "MAILROOM_TEST_BATCH_MESSAGES": "4", "MAILROOM_TEST_STORE_DELAY": "0.15"}
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "sync_mailbox", str(mailbox.pk)],
        cwd=Path(__file__).resolve().parents[2], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while Email.objects.filter(mailbox=mailbox).count() < after_emails:
            assert worker.poll() is None, worker.stdout.read().decode()
            assert time.monotonic() < deadline, "the worker stored nothing"
            time.sleep(0.02)
        helpers = _fetch_processes(worker.pid)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait(10)
    # A download of 10 or more messages runs in a child process (MAILROOM_SYNC_PROCESS_MIN_MESSAGES
    # is 10 in tests). It must not outlive the worker: it would hold the mailbox's connection.
    # (``fetch_process``: it must be there at the kill; an IMAP one may have sent everything
    # into the pipe and ended already.)
    assert helpers or not fetch_process, "the worker did not use a fetch process"
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() and _is_fetch_process(pid) for pid in helpers):
        assert time.monotonic() < deadline, "the fetch process outlived the killed worker"
        time.sleep(0.05)


def _is_fetch_process(pid: int) -> bool:
    from pathlib import Path

    try:
        return b"mailsync.sync.fetcher" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _fetch_processes(parent: int) -> list[int]:
    """The fetch processes (mailsync/sync/fetcher.py) that ``parent`` started."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == parent and _is_fetch_process(int(proc.name)):
            found.append(int(proc.name))
    return found


def imap_sync(mailbox: Mailbox):  # noqa: ANN201
    """One IMAP sync of the mailbox as it is stored now (what a worker runs); its report."""
    from mailsync.sync.imap import ImapSync  # noqa: PLC0415

    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def filed_by_another_program(dovecot, user, mailbox: Mailbox, subject: str,  # noqa: ANN001
                             folder: str = "Projects"):  # noqa: ANN201
    """A mail delivered to INBOX and synced, then filed into ``folder`` by a mail program
    that moves without expunging (Thunderbird's "mark as deleted" mode: a copy in the folder,
    the INBOX copy flagged \\Deleted), synced again. The Email."""
    from mailsync.models import Email  # noqa: PLC0415
    from tests.mailsync.test_two_connections_per_mailbox import client  # noqa: PLC0415

    with client(dovecot, user) as c:
        c.create_folder(folder)
    Mailbox.objects.filter(pk=mailbox.pk).update(folders=["INBOX", folder])
    dovecot.deliver(user, make_message(subject=subject))
    imap_sync(mailbox)
    with client(dovecot, user) as c:
        c.select_folder("INBOX")
        uids = c.search(["SUBJECT", subject])
        c.copy(uids, folder)
        c.add_flags(uids, ["\\Deleted"])
    imap_sync(mailbox)
    return Email.objects.get(mailbox=mailbox, subject=subject)


@contextlib.contextmanager
def tmpfs(mount, size: str) -> Iterator:  # noqa: ANN001
    """A small real file system (tmpfs of ``size``, e.g. "256k") at ``mount``, unmounted at the
    end: a disk that really fills up. The tests run as root (scripts/test, .ci/run); a machine
    where mounting is refused fails the test rather than skipping it, since a skipped test
    proves nothing."""
    import subprocess

    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode:
        pytest.fail(f"a full-disk test needs root to mount a tmpfs: {done.stderr.decode(errors='replace')}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
