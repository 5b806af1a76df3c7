"""A mailbox uses at most two connections to its server: the IDLE watcher's and one more,
which a sync, a CRM action (mark read, move, delete), the copy of a sent mail to Sent and a
login test take in turn (``mailsync.sync.lock.ConnectionSlot``).

Proven against a real Dovecot that allows two connections per user (``mail_max_userip_connections
= 2``, as providers cap them: Gmail about 15 for all of a user's devices, many hosts 2–5).
Before: a CRM action opened a third connection while a sync and IDLE ran, the server refused
it ("[LIMIT] Maximum number of connections") and that refusal was taken for a wrong password
(the action failed with "rejected the username or password"; a sync meeting it stopped the
mailbox until the user re-entered a password that was right all along). Now a running sync
hands its connection over between two batches and takes it back (the download goes on where
it stopped, nothing lost or stored twice), an action that cannot get it in time gets a 409
that says why, and a refused login for too many connections is a transient error, retried.
"""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import psycopg2
import pytest
from django.db import connection
from imapclient import IMAPClient
from rest_framework.test import APIClient

from mailsync import services
from mailsync.exceptions import MailConnectionsLimit
from mailsync.models import Email, Mailbox
from mailsync.sync import imap as imap_sync
from mailsync.sync.imap import ImapSync
from mailsync.sync.lock import CONNECTION_NAMESPACE
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message, wait_for
from tests.testbed import dovecot as testbed

pytestmark = pytest.mark.django_db(transaction=True)

LIMIT_LINE = "Maximum number of connections"


@pytest.fixture(scope="module")
def capped(test_ca):  # noqa: ANN001, ANN201
    """The test Dovecot, allowing two connections per user and IP."""
    with testbed.running_dovecot(test_ca, prefix="mailroom-capped-", max_userip_connections=2) as server:
        yield server


@contextlib.contextmanager
def client(server, user):  # noqa: ANN001, ANN201
    c = IMAPClient(server.host, port=server.imap_port, ssl=False, timeout=20)
    c.login(user.username, user.password)
    try:
        yield c
    finally:
        with contextlib.suppress(Exception):
            c.logout()


def fill(server, user, count: int) -> list[bytes]:  # noqa: ANN001
    raws = [make_message(subject=f"Quote {n}", body=f"Order {n}\n" + "x" * 2000) for n in range(count)]
    with client(server, user) as c:
        for raw in raws:
            c.append("INBOX", raw)
    return raws


def mailbox_on(server, user) -> Mailbox:  # noqa: ANN001
    return MailboxFactory(owner=UserFactory(), email_address=user.email, incoming_host=server.host,
                          incoming_port=server.imaps_port, incoming_security="ssl",
                          username=user.username, password=user.password, is_active=True)


def limit_refusals(server) -> int:  # noqa: ANN001
    return server.log_path.read_text(errors="replace").count(LIMIT_LINE)


def test_actions_during_a_long_sync_share_its_connection_and_lose_nothing(capped, monkeypatch):  # noqa: ANN001
    """With IDLE holding one of the two connections the server allows, marking a mail read,
    deleting one and testing the login while a first sync downloads 80 mails all work (they
    used to be refused by the server and reported as a wrong password), and the sync still
    stores every mail exactly once."""
    user = capped.add_user()
    fill(capped, user, 80)
    mailbox = mailbox_on(capped, user)
    refusals_before = limit_refusals(capped)
    # Small batches and a pause after each commit: the sync is still downloading when the
    # user acts (test hooks the engine reads; the download itself is real).
    monkeypatch.setattr(imap_sync, "BATCH_MESSAGES", 5)
    monkeypatch.setattr(imap_sync, "_TEST_STORE_DELAY", 0.15)
    outcome: dict[str, object] = {}

    def sync() -> None:
        try:
            outcome["report"] = ImapSync(Mailbox.objects.get(pk=mailbox.pk)).run()
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            outcome["error"] = exc
        finally:
            connection.close()

    with client(capped, user) as watcher:  # the IDLE watcher's connection
        watcher.select_folder("INBOX", readonly=True)
        watcher.idle()
        worker = threading.Thread(target=sync)
        worker.start()
        try:
            wait_for(lambda: Email.objects.filter(mailbox=mailbox).count() >= 10, 30)
            first, second = Email.objects.filter(mailbox=mailbox).order_by("pk")[:2]
            services.email_update(actor=mailbox.owner, email=first, seen=True)
            assert services.email_delete(actor=mailbox.owner, email=second) == "trash"
            assert services.mailbox_test(mailbox=Mailbox.objects.get(pk=mailbox.pk))
            assert worker.is_alive(), "the sync ended before the actions: nothing was shared"
        finally:
            worker.join(60)
        watcher.idle_done()

    assert "error" not in outcome, outcome.get("error")
    assert Email.objects.filter(mailbox=mailbox).count() == 80
    assert Email.objects.filter(mailbox=mailbox).values("message_id").distinct().count() == 80
    assert limit_refusals(capped) == refusals_before  # no connection beyond the two
    mailbox.refresh_from_db()
    assert mailbox.state == Mailbox.State.COMPLETED
    assert mailbox.messages_done == mailbox.messages_total == 80
    with client(capped, user) as c:
        c.select_folder("INBOX", readonly=True)
        seen = {m[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].split(b":", 1)[1].strip().decode()
                for m in c.fetch(c.search(["SEEN"]), ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).values()}
        assert seen == {first.message_id if first.message_id.startswith("<") else f"<{first.message_id}>"}
        assert len(c.search(["ALL"])) == 79
        c.select_folder("Trash", readonly=True)
        assert len(c.search(["ALL"])) == 1


def test_an_action_waits_a_bounded_time_for_the_connection_and_says_why(imap_mailbox, dovecot, mail_user, settings):  # noqa: ANN001
    """While something else holds the mailbox's connection (a sync in a long step), an action
    waits at most MAILROOM_CONNECTION_WAIT, then gets a 409 with a JSON body that says the
    connection is in use; nothing changed on the server or in the CRM."""
    dovecot.append(mail_user, "INBOX", make_message(subject="Pricing"))
    ImapSync(imap_mailbox).run()
    email = Email.objects.get(mailbox=imap_mailbox)
    settings.MAILROOM_CONNECTION_WAIT = 0.5
    db = connection.settings_dict
    holder = psycopg2.connect(dbname=db["NAME"], user=db["USER"], host=db["HOST"] or None,
                              port=db["PORT"] or None)
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", [CONNECTION_NAMESPACE, imap_mailbox.pk])
        api = APIClient()
        api.force_authenticate(imap_mailbox.owner)
        started = time.monotonic()
        response = api.patch(f"/api/v1/emails/{email.pk}/", {"flagged": True}, format="json")
        took = time.monotonic() - started
    finally:
        holder.close()
    assert response.status_code == 409, response.content
    body = response.json()
    assert body["code"] == "connection_busy"
    assert "in use" in body["detail"]
    assert 0.4 <= took < 5
    email.refresh_from_db()
    assert not email.flagged
    state = dovecot.folder_state(mail_user)
    assert state.flags(state.uids[0]) == frozenset()
    # Once it is free, the same request goes through.
    response = api.patch(f"/api/v1/emails/{email.pk}/", {"flagged": True}, format="json")
    assert response.status_code == 200, response.content
    state = dovecot.folder_state(mail_user)
    assert "\\Flagged" in state.flags(state.uids[0])


def test_a_login_refused_for_too_many_connections_is_retried_not_a_wrong_password(capped):  # noqa: ANN001
    """The user's phone and desktop mail app hold the two connections the server allows: the
    sync's login is refused with "[LIMIT]". That is a transient error the status says and the
    task retries, not "rejected the username or password" (which stopped the mailbox until the
    user re-typed a correct password)."""
    user = capped.add_user()
    fill(capped, user, 1)
    mailbox = mailbox_on(capped, user)
    with client(capped, user), client(capped, user):
        with pytest.raises(MailConnectionsLimit):
            ImapSync(mailbox).run()
    mailbox.refresh_from_db()
    assert mailbox.state == Mailbox.State.ERROR
    assert mailbox.last_error_code == "too_many_connections"
    assert mailbox.last_error_code not in Mailbox.USER_ERROR_CODES
    assert "too many" in mailbox.last_error and "password" not in mailbox.last_error
    # The phone and the desktop are gone: the next run (the task's retry) works.
    ImapSync(mailbox).run()
    assert Email.objects.filter(mailbox=mailbox).count() == 1


_SQLITE_SLOT = """
import os, sys, time
import django
django.setup()
from mailsync.exceptions import ConnectionBusy
from mailsync.sync.lock import ConnectionSlot
role, wait = sys.argv[1], float(sys.argv[2])
slot = ConnectionSlot(7)
def say(what):
    print(f"{what} {time.time():.3f}", flush=True)
if role == "holder":
    slot.acquire(wait)
    say("held")
    deadline = time.monotonic() + 20
    while not os.path.exists(sys.argv[3]):  # busy with something that cannot stop (a long step)
        assert time.monotonic() < deadline, "never told to go on"
        time.sleep(0.02)
    while not slot.wanted():
        assert time.monotonic() < deadline, "no waiter seen"
        time.sleep(0.02)
    say("wanted")
    slot.hand_over(wait)
    say("back")
    slot.release()
else:
    try:
        slot.acquire(wait)
    except ConnectionBusy as exc:
        say("busy")
        sys.exit(0)
    say("got")
    time.sleep(0.5)
    say("released")
    slot.release()
"""


def test_the_embedded_default_hands_the_connection_over_the_same_way(tmp_path):  # noqa: ANN001
    """SQLite (the README's first command, one machine) has no advisory locks: the slot is an
    flock under the data directory and a waiter leaves a marker. Real processes: a second
    caller that waits too short is told the connection is busy; one that waits gets it from
    the holder (a sync between two batches), and the holder gets it back after it is done."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}}
    env.update(DJANGO_SETTINGS_MODULE="crm.settings", MAILROOM_DATA_DIR=str(tmp_path), PYTHONPATH=str(root))

    go = tmp_path / "go"

    def run(role: str, wait: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _SQLITE_SLOT, role, str(wait), str(go)], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    holder = run("holder", 10)
    first = holder.stdout.readline().split()
    assert first[0] == "held", holder.stderr.read()
    impatient = run("waiter", 0.2)
    out, err = impatient.communicate(timeout=20)
    assert out.split()[0] == "busy", err
    go.touch()  # the holder reaches the end of a batch: it hands over to whoever waits
    patient = run("waiter", 10)
    out, err = patient.communicate(timeout=30)
    rest, holder_err = holder.communicate(timeout=30)
    assert holder.returncode == 0 and patient.returncode == 0, holder_err + err
    waiter = dict(line.split() for line in out.splitlines())
    held = dict(line.split() for line in rest.splitlines())
    assert float(held["wanted"]) <= float(waiter["got"]) + 0.1
    assert float(waiter["released"]) <= float(held["back"])
    assert not list((tmp_path / "locks").glob("*.want.*"))  # no marker left behind
