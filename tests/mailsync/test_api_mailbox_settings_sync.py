"""settings changed through the API and what the sync and the status then do,
against the private Dovecot; one active mailbox per user under concurrent creates."""
from __future__ import annotations

import threading
from datetime import date, datetime, timedelta, timezone as dt_timezone

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from mailsync import tasks
from mailsync.models import Email, Mailbox
from tests.factories import UserFactory
from tests.mailsync.conftest import mailbox_input, make_message

pytestmark = pytest.mark.django_db


@pytest.fixture
def api():
    return APIClient(raise_request_exception=False)


@pytest.mark.django_db(transaction=True)
def test_two_first_mailboxes_created_at_once_are_not_a_500(dovecot, monkeypatch):
    """Both requests see no active mailbox (services.mailbox_create) and both insert
    is_active=True: the second must not end as an IntegrityError (500)."""
    owner = UserFactory()
    users = [dovecot.add_user(), dovecot.add_user()]
    barrier = threading.Barrier(2, timeout=5)
    real_save = Mailbox.save

    def save(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if self.pk is None:
            try:
                barrier.wait()  # both have decided is_active before either inserts
            except threading.BrokenBarrierError:
                pass
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Mailbox, "save", save)
    results: list[tuple[int, bytes]] = []

    def create(user) -> None:  # noqa: ANN001
        try:
            client = APIClient(raise_request_exception=False)
            client.force_authenticate(owner)
            response = client.post("/api/v1/mailboxes/", mailbox_input(dovecot, user), format="json")
            results.append((response.status_code, response.content[:300]))
        finally:
            connection.close()

    threads = [threading.Thread(target=create, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    codes = sorted(code for code, _ in results)
    assert 500 not in codes, results
    assert Mailbox.objects.filter(owner=owner, is_active=True).count() == 1
    assert codes == [201, 201], results


def test_changing_protocol_is_login_tested_like_other_connection_settings(api, dovecot, mail_user, imap_mailbox):
    """Found by a probe: protocol was not among the connection settings tested before they
    are saved, so POP3 on the IMAPS port was saved and every sync then failed."""
    api.force_authenticate(imap_mailbox.owner)
    response = api.patch(f"/api/v1/mailboxes/{imap_mailbox.pk}/", {"protocol": "pop3"}, format="json")
    imap_mailbox.refresh_from_db()
    assert response.status_code in {400, 502}, (response.status_code, response.content[:300])
    assert "detail" in response.json()
    assert imap_mailbox.protocol == "imap"


def test_moving_sync_since_earlier_fetches_the_older_mail(api, dovecot, mail_user, imap_mailbox):
    api.force_authenticate(imap_mailbox.owner)
    old = datetime(2020, 6, 1, tzinfo=dt_timezone.utc)
    new = datetime(2026, 1, 5, tzinfo=dt_timezone.utc)
    dovecot.append(mail_user, "INBOX", make_message(subject="old", date=old), internal_date=old)
    dovecot.append(mail_user, "INBOX", make_message(subject="new", date=new), internal_date=new)
    url = f"/api/v1/mailboxes/{imap_mailbox.pk}/"
    assert api.patch(url, {"sync_since": "2025-01-01"}, format="json").status_code == 200
    api.post(f"{url}sync/")
    first = set(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True))
    assert api.patch(url, {"sync_since": None}, format="json").status_code == 200
    api.post(f"{url}sync/")
    status = api.get(f"{url}status/").json()
    subjects = set(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True))
    assert "new" in first, first
    assert subjects == {"old", "new"}, (first, subjects, status)


def test_folder_list_naming_no_existing_folder_is_not_reported_as_a_good_sync(api, dovecot, mail_user, imap_mailbox):
    """Found by a probe: folder names not on the server were dropped silently."""
    api.force_authenticate(imap_mailbox.owner)
    dovecot.deliver(mail_user, make_message(subject="in inbox"))
    url = f"/api/v1/mailboxes/{imap_mailbox.pk}/"
    assert api.patch(url, {"folders": ["INBOX", "Archive-typo"]}, format="json").status_code == 200
    api.post(f"{url}sync/")
    status = api.get(f"{url}status/").json()
    assert status["state"] == "completed" and status["last_error_code"] == "notice", status
    assert "'Archive-typo'" in status["last_error"] and "INBOX" not in status["last_error"]
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1  # the rest synced
    assert api.patch(url, {"folders": ["INBOX"]}, format="json").status_code == 200
    api.post(f"{url}sync/")
    assert api.get(f"{url}status/").json()["last_error"] == ""


def test_wrong_password_error_no_poll_then_fix_resumes(api, dovecot, mail_user, imap_mailbox):
    api.force_authenticate(imap_mailbox.owner)
    dovecot.deliver(mail_user, make_message(subject="after fix"))
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(password="stale-password-xyz")
    url = f"/api/v1/mailboxes/{imap_mailbox.pk}/"
    api.post(f"{url}sync/")
    status = api.get(f"{url}status/").json()
    assert status["state"] == "error" and status["last_error_code"] == "auth_failed", status
    assert "stale-password-xyz" not in str(status)
    assert tasks.poll_mailboxes.apply().get() == 0  # no retry storm
    # Fixing the password is tested and clears the error.
    fixed = api.patch(url, {"password": mail_user.password}, format="json")
    assert fixed.status_code == 200, fixed.content
    assert fixed.json()["state"] == "new" and fixed.json()["last_error"] == ""
    assert tasks.poll_mailboxes.apply().get() == 1
    api.post(f"{url}sync/")
    status = api.get(f"{url}status/").json()
    assert status["state"] == "completed", status
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1


def test_daily_budget_pauses_and_resumes_with_consistent_progress(api, dovecot, mail_user, imap_mailbox):
    api.force_authenticate(imap_mailbox.owner)
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"m{i}"))
    today = timezone.now().date()
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        provider="gmail", budget_day=today, budget_bytes_used=int(2.5 * 1024**3))
    url = f"/api/v1/mailboxes/{imap_mailbox.pk}/"
    api.post(f"{url}sync/")
    status = api.get(f"{url}status/").json()
    assert status["state"] == "paused", status
    until = datetime.fromisoformat(status["paused_until"].replace("Z", "+00:00"))
    assert timezone.now() < until <= timezone.now() + timedelta(days=1, minutes=1), status
    assert status["estimated_completion"] is None
    assert status["messages_done"] <= status["messages_total"]
    assert status["last_error"] == ""
    # The poll and "Sync now" still sync it (new mail and changes would come): with the
    # day's budget spent nothing is downloaded, and the status still says paused.
    assert tasks.poll_mailboxes.apply().get() == 1
    queued = api.post(f"{url}sync/")
    assert queued.status_code == 202 and queued.json()["state"] == "paused"
    assert not Email.objects.filter(mailbox=imap_mailbox).exists()
    # The next day.
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        budget_day=today - timedelta(days=1), paused_until=timezone.now() - timedelta(seconds=1))
    api.post(f"{url}sync/")
    status = api.get(f"{url}status/").json()
    assert status["state"] == "completed", status
    assert status["paused_until"] is None
    assert status["messages_done"] == status["messages_total"] == 3, status
    assert status["bytes_done"] == status["bytes_total"] > 0
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 3


def test_eta_is_not_in_the_past_or_absurd(imap_mailbox):
    from mailsync.selectors import mailbox_status

    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        state="syncing", sync_started_at=timezone.now() - timedelta(minutes=10),
        bytes_done=500, bytes_total=100, messages_done=5, messages_total=1)
    status = mailbox_status(mailbox=imap_mailbox)
    eta = status["estimated_completion"]
    assert eta is None or eta >= timezone.now() - timedelta(seconds=1)


def test_moving_sync_since_earlier_while_a_sync_runs_is_refused_not_lost(api, dovecot, mail_user, imap_mailbox):
    """Found in review: the running sync would write its cursor back over the reset, and the
    older mail would never come. Refused with the reason; nothing saved."""
    from tests.mailsync.conftest import sync_lock_held

    api.force_authenticate(imap_mailbox.owner)
    url = f"/api/v1/mailboxes/{imap_mailbox.pk}/"
    assert api.patch(url, {"sync_since": "2025-01-01"}, format="json").status_code == 200
    with sync_lock_held(imap_mailbox.pk):
        refused = api.patch(url, {"sync_since": "2020-01-01"}, format="json")
    assert refused.status_code == 400 and "sync is running" in str(refused.json()), refused.content
    imap_mailbox.refresh_from_db()
    assert str(imap_mailbox.sync_since) == "2025-01-01"
    assert api.patch(url, {"sync_since": "2020-01-01"}, format="json").status_code == 200
