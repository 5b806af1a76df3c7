"""The sync status a salesperson watches (GET /api/v1/mailboxes/{id}/status/ and the status
panel of the mailbox page), against the private Dovecot. Written as review probes; those that
failed were fixed: a TLS handshake cut by the network stopped syncing for good (now
transient); totals covered only the folders reached so far; Retry and held-back messages
made done pass total; "Completed · 0 messages" after a no-change check; a fixed password
said "Waiting for the first sync" and started nothing; a passing outage told the user to
fix settings; headers-only mail spent its full size of the daily budget; a killed worker
left "Sync in progress … about N left" (now "Interrupted")."""
from __future__ import annotations

import base64
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

import mailsync.protocols.imap as protocol
import mailsync.sync.imap as engine
from mailsync import providers, services, tasks
from mailsync.exceptions import MailError
from mailsync.models import Email, Mailbox
from mailsync.selectors import mailbox_status
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


def sync(mailbox: Mailbox):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def deliver(dovecot, user, n: int, prefix: str, body_size: int = 5000, folder: str | None = None) -> list[str]:
    subjects = [f"{prefix} {i:02d}" for i in range(n)]
    for s in subjects:
        body = base64.encodebytes(os.urandom(body_size * 3 // 4)).decode()
        if folder:
            dovecot.append(user, folder, make_message(sender=f"Me <{user.email}>", subject=s, body=body))
        else:
            dovecot.deliver(user, make_message(subject=s, body=body))
    return subjects


def api_for(mailbox: Mailbox) -> APIClient:
    api = APIClient()
    api.force_authenticate(mailbox.owner)
    return api


def panel(mailbox: Mailbox) -> str:
    from django.test import Client

    client = Client()
    client.force_login(mailbox.owner)
    response = client.get(f"/setup/email/{mailbox.pk}/status/")
    assert response.status_code == 200
    return " ".join(response.content.decode().split())


def set_server_password(dovecot, user, password: str) -> None:
    """Change the account's password on the server (the passwd-file Dovecot re-reads)."""
    path = Path(dovecot.users_dir) / user.username
    tmp = path.with_name(f".{user.username}.new")
    tmp.write_text(f"{user.username}:{{PLAIN}}{password}::::::\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    time.sleep(1.2)  # Dovecot re-stats a passwd-file at most once a second


# 1. ------------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_progress_polled_from_another_connection_during_an_initial_sync(
        dovecot, mail_user, imap_mailbox, settings, monkeypatch):
    """A user watching the status while the first sync of Inbox + Sent runs sees 'syncing',
    done counts that only grow and never pass the totals, bytes in step, an estimate in the
    future, and a total that is the size of the whole sync (not of the Inbox only, which
    would show '20 of 20' and then fall back to '20 of 40'). After: completed, done == total,
    last sync time set."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    monkeypatch.setattr(engine, "_TEST_STORE_DELAY", 0.15)
    deliver(dovecot, mail_user, 15, "In")
    deliver(dovecot, mail_user, 15, "Out", folder="Sent")
    api = api_for(imap_mailbox)

    errors: list[BaseException] = []

    def run() -> None:
        try:
            services.mailbox_sync(mailbox_id=imap_mailbox.pk)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    worker = threading.Thread(target=run)
    worker.start()
    samples = []
    while worker.is_alive():
        body = api.get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/").json()
        samples.append(body)
        time.sleep(0.05)
    worker.join()
    assert not errors, errors
    final = api.get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/").json()

    syncing = [s for s in samples if s["state"] == "syncing"]
    assert len(syncing) > 10, [s["state"] for s in samples]
    problems = []
    last_done = 0
    for s in syncing:
        if s["messages_done"] < last_done:
            problems.append(f"done went back {last_done} -> {s['messages_done']}")
        last_done = s["messages_done"]
        if s["messages_done"] > s["messages_total"] or s["bytes_done"] > s["bytes_total"]:
            problems.append(f"done over total: {s}")
        if s["bytes_done"] and not s["estimated_completion"]:
            problems.append(f"no estimate with bytes done: {s}")
    assert not problems, problems[:5]
    totals = sorted({s["messages_total"] for s in syncing if s["messages_total"]})
    assert totals == [30], f"the total the user saw while syncing: {totals} (30 messages in all)"
    assert final["state"] == "completed"
    assert final["messages_done"] == final["messages_total"] == 30
    assert final["bytes_done"] == final["bytes_total"] > 0
    assert final["last_sync_at"] and final["estimated_completion"] is None


# 1b. -----------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_estimate_is_sane_half_way(dovecot, mail_user, imap_mailbox, settings, monkeypatch):
    """Half way through a steady initial sync of Inbox + Sent (same size each), the estimate
    says roughly as long again (not 'almost done' because only the Inbox was counted)."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 2)
    monkeypatch.setattr(engine, "_TEST_STORE_DELAY", 0.2)
    deliver(dovecot, mail_user, 10, "In")
    deliver(dovecot, mail_user, 10, "Out", folder="Sent")
    errors: list[BaseException] = []
    started = time.monotonic()

    def run() -> None:
        try:
            services.mailbox_sync(mailbox_id=imap_mailbox.pk)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    worker = threading.Thread(target=run)
    worker.start()
    estimate = None
    while worker.is_alive():
        status = mailbox_status(mailbox=imap_mailbox)
        if status["state"] == "syncing" and status["messages_done"] >= 10 and estimate is None:
            estimate = (time.monotonic() - started,
                        (status["estimated_completion"] - timezone.now()).total_seconds()
                        if status["estimated_completion"] else None, dict(status))
        time.sleep(0.03)
    worker.join()
    assert not errors
    total = time.monotonic() - started
    assert estimate is not None
    elapsed, left, status = estimate
    assert left is not None and left > 0.25 * (total - elapsed), (
        f"at {elapsed:.1f}s ({status['messages_done']} of {status['messages_total']}) the estimate "
        f"said {left}s left; the sync really took {total - elapsed:.1f}s more")


# 2. ------------------------------------------------------------------------------------------
def test_an_incremental_run_counts_only_that_run(dovecot, mail_user, imap_mailbox):
    """After the first sync (5 mails) and 2 new mails, the status describes the second run:
    2 of 2 messages, the bytes of those 2, completed, a newer last sync time."""
    deliver(dovecot, mail_user, 5, "First")
    sync(imap_mailbox)
    first = mailbox_status(mailbox=imap_mailbox)
    deliver(dovecot, mail_user, 2, "Second")
    sync(imap_mailbox)
    second = mailbox_status(mailbox=imap_mailbox)
    sizes = sum(Email.objects.filter(mailbox=imap_mailbox, subject__startswith="Second")
                .values_list("size", flat=True))
    assert second["state"] == "completed"
    assert second["messages_done"] == second["messages_total"] == 2
    assert second["bytes_done"] == second["bytes_total"] == sizes
    assert second["last_sync_at"] > first["last_sync_at"]


# 2b. -----------------------------------------------------------------------------------------
def test_completed_panel_after_a_no_change_resync(dovecot, mail_user, imap_mailbox):
    """The 5-minute poll (or IDLE) runs a sync that finds nothing new. The panel of a mailbox
    holding 5 synced mails should not then read 'Completed · 0 messages'."""
    deliver(dovecot, mail_user, 5, "Kept")
    sync(imap_mailbox)
    text = panel(imap_mailbox)
    assert "Completed</strong> · 5 emails in the CRM" in text, text[text.find("status-line"):][:200]
    assert "5 messages fetched" in text
    sync(imap_mailbox)  # nothing new
    text = panel(imap_mailbox)
    assert "Completed</strong> · 5 emails in the CRM" in text, text[text.find("status-line"):][:200]
    assert "nothing new" in text


# 3. ------------------------------------------------------------------------------------------
def test_retry_of_a_failed_message_keeps_counts_consistent(dovecot, mail_user, imap_mailbox, monkeypatch):
    """One message failed to store: it is listed with its folder; Retry stores it. The status
    then still reads 'n of n', never more messages (or bytes) done than in total."""
    from mailsync.sync import ingest

    deliver(dovecot, mail_user, 3, "Retry")
    real_store = ingest._store

    def failing(mailbox, folder, uidvalidity, prepared, *rest):  # noqa: ANN001, ANN002
        if any(p.envelope.subject == "Retry 01" for p in prepared):
            raise ValueError("simulated storage failure")
        return real_store(mailbox, folder, uidvalidity, prepared, *rest)

    monkeypatch.setattr(ingest, "_store", failing)
    sync(imap_mailbox)
    status = api_for(imap_mailbox).get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/").json()
    assert status["state"] == "completed"
    assert [e["folder"] for e in status["message_errors"]] == ["INBOX"]
    assert status["message_errors"][0]["uid"]
    monkeypatch.setattr(ingest, "_store", real_store)
    retried = api_for(imap_mailbox).post(f"/api/v1/mailboxes/{imap_mailbox.pk}/retry/").json()
    assert retried["refetched"] == 1
    status = api_for(imap_mailbox).get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/").json()
    assert status["message_errors"] == []
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 3
    assert status["messages_done"] <= status["messages_total"], status
    assert status["bytes_done"] <= status["bytes_total"], status


# 3b. -----------------------------------------------------------------------------------------
def test_a_message_the_server_held_back_then_sends(dovecot, mail_user, imap_mailbox, settings, monkeypatch):
    """The server once answers a FETCH without the body of one message (listed as a
    per-message error); the next run gets it. Both runs end with consistent counts: bytes
    done == bytes total on the first, and not '1 of 0' on the second."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    deliver(dovecot, mail_user, 4, "Held")
    victim = sorted(dovecot.folder_state(mail_user).uids)[1]
    real = protocol._uid_fetch
    done = {"once": False}

    def doctored(client, uids, items, modifiers=None, **options):  # noqa: ANN001, ANN003
        reply = real(client, uids, items, modifiers, **options)
        if victim in reply and b"BODY[]" in reply[victim] and not done["once"]:
            done["once"] = True
            reply[victim][b"BODY[]"] = None
        return reply

    monkeypatch.setattr(protocol, "_uid_fetch", doctored)
    sync(imap_mailbox)
    first = mailbox_status(mailbox=imap_mailbox)
    assert [e["uid"] for e in first["message_errors"]] == [victim]
    monkeypatch.setattr(protocol, "_uid_fetch", real)
    sync(imap_mailbox)
    second = mailbox_status(mailbox=imap_mailbox)
    assert second["message_errors"] == []
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 4
    problems = []
    for name, s in (("first", first), ("second", second)):
        if s["messages_done"] > s["messages_total"] or s["bytes_done"] > s["bytes_total"]:
            problems.append((name, "over", s["messages_done"], s["messages_total"], s["bytes_done"], s["bytes_total"]))
        if s["state"] == "completed" and (s["messages_done"] != s["messages_total"]
                                          or s["bytes_done"] != s["bytes_total"]):
            problems.append((name, "not n of n", s["messages_done"], s["messages_total"],
                             s["bytes_done"], s["bytes_total"]))
    assert not problems, problems


# 4. ------------------------------------------------------------------------------------------
def test_password_changed_on_the_server_then_fixed_through_the_api(
        dovecot, mail_user, imap_mailbox, fault_proxy, monkeypatch):
    """The user changes their Gmail password elsewhere. The status says 'error', that the
    password was rejected and to use an app-specific password; no login is retried by the
    task, the poll or Sync-now-less waiting. After the new password is saved through the API,
    the error is gone and the next sync completes with the new mail."""
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=proxy.port, provider="gmail")
    deliver(dovecot, mail_user, 2, "Before")
    tasks.sync_mailbox.delay(imap_mailbox.pk)
    assert mailbox_status(mailbox=imap_mailbox)["state"] == "completed"

    set_server_password(dovecot, mail_user, "changed-elsewhere")
    deliver(dovecot, mail_user, 1, "After")
    before = proxy.connections
    tasks.sync_mailbox.delay(imap_mailbox.pk)  # the task swallows a user error
    status = api_for(imap_mailbox).get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/").json()
    assert status["state"] == "error" and status["last_error_code"] == "auth_failed"
    assert "app-specific password" in status["last_error"]
    assert "password" in status["last_error"].lower()
    queued = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert imap_mailbox.pk not in queued
    assert proxy.connections - before == 1, "logins tried with the wrong password"
    monkeypatch.undo()

    api = api_for(imap_mailbox)
    patched = api.patch(f"/api/v1/mailboxes/{imap_mailbox.pk}/", {"password": "changed-elsewhere"},
                        format="json")
    assert patched.status_code == 200, patched.content
    status = api.get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/").json()
    assert status["state"] != "error" and status["last_error"] == ""
    api.post(f"/api/v1/mailboxes/{imap_mailbox.pk}/sync/")
    status = api.get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/").json()
    assert status["state"] == "completed", status
    assert Email.objects.filter(mailbox=imap_mailbox, subject="After 00").exists()


# 4b. -----------------------------------------------------------------------------------------
def test_after_fixing_the_password_the_panel_does_not_say_waiting_for_the_first_sync(
        dovecot, mail_user, imap_mailbox, django_capture_on_commit_callbacks):
    """A mailbox that synced for months gets a wrong-password error; the user saves the new
    password. The panel should not read 'Waiting for the first sync…' (and the fix should
    start a sync, as creating a mailbox or raising its size limit does)."""
    deliver(dovecot, mail_user, 2, "Before")
    sync(imap_mailbox)
    set_server_password(dovecot, mail_user, "newpass-1")
    with pytest.raises(MailError):
        sync(imap_mailbox)
    deliver(dovecot, mail_user, 1, "After")
    api = api_for(imap_mailbox)
    with django_capture_on_commit_callbacks(execute=True):  # the queued sync runs (eager)
        assert api.patch(f"/api/v1/mailboxes/{imap_mailbox.pk}/", {"password": "newpass-1"},
                         format="json").status_code == 200
    text = panel(imap_mailbox)
    state = mailbox_status(mailbox=imap_mailbox)["state"]
    assert "Waiting for the first sync" not in text, (state, text[:400])
    assert Email.objects.filter(mailbox=imap_mailbox, subject="After 00").exists(), (
        f"no sync after the fix (state {state!r})")


# 5. ------------------------------------------------------------------------------------------
def test_server_unreachable_is_a_transient_error(dovecot, mail_user, imap_mailbox, fault_proxy, monkeypatch):
    """The mail server is down (the port is closed): the status says the server could not be
    reached (not 'wrong password'), and the mailbox is tried again by the poll."""
    deliver(dovecot, mail_user, 2, "Mail")
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=proxy.port)
    sync(imap_mailbox)
    proxy.close()
    with pytest.raises(MailError):
        sync(imap_mailbox)
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["state"] == "error"
    assert status["last_error_code"] not in Mailbox.USER_ERROR_CODES
    assert "password" not in status["last_error"].lower()
    assert "refused" in status["last_error"] or "reach" in status["last_error"], status["last_error"]
    queued = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert imap_mailbox.pk in queued


# 5b. -----------------------------------------------------------------------------------------
def test_unreachable_panel_does_not_tell_the_user_to_fix_settings(dovecot, mail_user, imap_mailbox, fault_proxy):
    """A server outage is retried by itself: the panel should not say 'Sync stopped … Fix the
    connection settings' as for a wrong password."""
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=proxy.port)
    sync(imap_mailbox)
    proxy.close()
    with pytest.raises(MailError):
        sync(imap_mailbox)
    text = panel(imap_mailbox)
    assert "Fix the connection settings" not in text, text[text.find("alert"):][:300]


# 5c. -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut_at", [0, 300])
def test_connection_dropped_during_the_tls_handshake_is_transient(
        dovecot, mail_user, imap_mailbox, fault_proxy, monkeypatch, cut_at):
    """The network drops while connecting (the server's TLS hello cut short). That is an
    outage, retried later; not a 'TLS failed, check your settings' error that stops syncing
    for good (the poll skips user errors)."""
    deliver(dovecot, mail_user, 1, "Mail")
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=proxy.port)
    sync(imap_mailbox)
    proxy.cut_after(cut_at, direction="down")
    with pytest.raises(MailError):
        sync(imap_mailbox)
    status = mailbox_status(mailbox=imap_mailbox)
    queued = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert status["last_error_code"] not in Mailbox.USER_ERROR_CODES, (
        status["last_error_code"], status["last_error"])
    assert imap_mailbox.pk in queued, "the poll never tries this mailbox again"


# 6. ------------------------------------------------------------------------------------------
def test_daily_budget_pauses_and_the_beat_resumes(dovecot, mail_user, imap_mailbox, settings, monkeypatch):
    """A provider preset with a tiny daily budget: the sync pauses until a time (the panel says
    so), keeps its counts; Sync now and the poll still sync it meanwhile (new mail and
    changes) but download no more of the older mail; the next day the beat poll resumes it;
    every mail is stored once, none lost."""
    import dataclasses

    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 2)
    gmail = providers.PRESETS["gmail"]
    monkeypatch.setitem(providers.PRESETS, "gmail", dataclasses.replace(gmail, daily_download_bytes=20_000))
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(provider="gmail")
    subjects = deliver(dovecot, mail_user, 12, "Budget", body_size=6000)

    tasks.sync_mailbox.delay(imap_mailbox.pk)
    status = mailbox_status(mailbox=imap_mailbox)
    stored = Email.objects.filter(mailbox=imap_mailbox).count()
    assert status["state"] == "paused", status
    assert status["paused_until"] and status["paused_until"] > timezone.now()
    assert 0 < stored < 12
    assert status["messages_done"] == stored and status["messages_total"] == 12
    assert "Paused until" in panel(imap_mailbox)

    api_for(imap_mailbox).post(f"/api/v1/mailboxes/{imap_mailbox.pk}/sync/")
    queued = []
    real_delay = tasks.sync_mailbox.delay
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert imap_mailbox.pk in queued
    monkeypatch.setattr(tasks.sync_mailbox, "delay", real_delay)
    tasks.sync_mailbox.delay(imap_mailbox.pk)
    assert mailbox_status(mailbox=imap_mailbox)["state"] == "paused"
    assert Email.objects.filter(mailbox=imap_mailbox).count() == stored

    # The next day (UTC): the budget is new and the pause over.
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        budget_day=timezone.now().date() - timedelta(days=1),
        paused_until=timezone.now() - timedelta(seconds=1))
    monkeypatch.setitem(providers.PRESETS, "gmail", dataclasses.replace(gmail, daily_download_bytes=10**9))
    tasks.poll_mailboxes()
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["state"] == "completed", status
    assert sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True)) == subjects
    assert status["paused_until"] is None


# 6b. -----------------------------------------------------------------------------------------
def test_headers_only_mail_does_not_spend_the_daily_budget(dovecot, mail_user, imap_mailbox, monkeypatch):
    """A 3 MB mail over a 100 kB size limit is imported as its headers (~1 kB). The daily
    download budget counts what was downloaded, not the 3 MB left on the server."""
    imap_mailbox.max_message_bytes = 100_000
    imap_mailbox.provider = "gmail"
    imap_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Huge", attachment=(
        "big.bin", os.urandom(3_000_000), "application/octet-stream")))
    sync(imap_mailbox)
    imap_mailbox.refresh_from_db()
    assert Email.objects.get(mailbox=imap_mailbox, subject="Huge").truncated
    assert imap_mailbox.budget_bytes_used < 100_000, imap_mailbox.budget_bytes_used


# 7. ------------------------------------------------------------------------------------------
def test_folder_notice_shows_with_completed(dovecot, mail_user, imap_mailbox):
    """A folder to sync that is not on the server: completed, with a notice naming it."""
    imap_mailbox.folders = ["INBOX", "Projects"]
    imap_mailbox.save()
    deliver(dovecot, mail_user, 2, "Mail")
    sync(imap_mailbox)
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["state"] == "completed"
    assert status["last_error_code"] == "notice" and "'Projects'" in status["last_error"]
    assert "Projects" in panel(imap_mailbox)
    sync(imap_mailbox)  # the notice stays while the folder is still missing
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["last_error_code"] == "notice" and "'Projects'" in status["last_error"]


# 8. ------------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_status_after_the_worker_was_killed(dovecot, mail_user, imap_mailbox):
    """The worker dies mid-sync. The status should not go on saying 'Sync in progress … about
    N left' while nothing syncs; Sync now recovers it."""
    from tests.mailsync.conftest import kill_worker_midway

    deliver(dovecot, mail_user, 30, "Killed", body_size=20_000)
    kill_worker_midway(imap_mailbox, after_emails=8)
    first = mailbox_status(mailbox=imap_mailbox)
    time.sleep(1.0)
    later = mailbox_status(mailbox=imap_mailbox)
    shown = panel(imap_mailbox)
    api_for(imap_mailbox).post(f"/api/v1/mailboxes/{imap_mailbox.pk}/sync/")
    recovered = mailbox_status(mailbox=imap_mailbox)
    assert recovered["state"] == "completed"
    assert recovered["messages_done"] == recovered["messages_total"]
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 30
    # The state stays what the database says, but the status knows no run holds the mailbox
    # and says so, without an estimate (the panel: "Interrupted … resumes at the next check").
    assert later["state"] == "syncing" and later["interrupted"], later
    assert first["estimated_completion"] is None and later["estimated_completion"] is None
    assert not recovered["interrupted"]
    assert "Interrupted" in shown and "resumes where it stopped" in shown and "left" not in shown
