"""Retry (fetch again the messages that failed) stays within the provider's daily download
limit, as the sync does: Gmail answers a client that goes over its 2.5 GB a day by refusing
IMAP for up to a day. Before, Retry fetched whatever failed whatever the day had used. And a
POP3 pause under one provider's limit ends when the mailbox's provider changes.

Real Dovecot and PostgreSQL; the provider is the Gmail preset with a small daily limit, its
servers the private Dovecot (behind a counting TCP proxy where logins are counted)."""
from __future__ import annotations

import base64
import dataclasses
import os
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

import mailsync.sync.imap as engine
from mailsync import providers, services
from mailsync.models import Email, Mailbox, MessageError
from mailsync.sync import ingest
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db

SIZE = 20_000


def _tomorrow() -> datetime:
    return datetime.combine(timezone.now().date() + timedelta(days=1), time.min, tzinfo=dt_timezone.utc)


@pytest.fixture
def failed_three(dovecot, mail_user, imap_mailbox, monkeypatch):  # noqa: ANN001, ANN201
    """A Gmail mailbox with 'Fine' stored and 'Broken 0..2' failed to store (errors kept)."""
    gmail = providers.PRESETS["gmail"]
    monkeypatch.setitem(providers.PRESETS, "gmail", dataclasses.replace(gmail, daily_download_bytes=10_000_000))
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(provider="gmail")
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 1)
    for subject in ["Fine", "Broken 0", "Broken 1", "Broken 2"]:
        body = base64.encodebytes(os.urandom(SIZE * 3 // 4)).decode()
        dovecot.deliver(mail_user, make_message(subject=subject, body=body))
    assert sync_failing_broken(imap_mailbox, monkeypatch) == 3
    return imap_mailbox


def sync_failing_broken(mailbox: Mailbox, monkeypatch) -> int:  # noqa: ANN001
    """One sync in which storing every mail whose subject starts with "Broken" fails (setup
    only: the failures Retry then works on); how many failed."""
    real_store = ingest._store

    def failing(mailbox, folder, uidvalidity, prepared, *rest):  # noqa: ANN001, ANN002, ANN202
        if any(p.envelope.subject.startswith("Broken") for p in prepared):
            raise ValueError("simulated storage failure")
        return real_store(mailbox, folder, uidvalidity, prepared, *rest)

    monkeypatch.setattr(ingest, "_store", failing)
    try:
        mailbox.refresh_from_db()
        return ImapSync(mailbox, timeout=10).run().failed
    finally:
        monkeypatch.setattr(ingest, "_store", real_store)


def _spend(mailbox: Mailbox, left: int) -> None:
    """Today's budget has ``left`` bytes left (0: spent)."""
    limit = providers.PRESETS["gmail"].daily_download_bytes
    Mailbox.objects.filter(pk=mailbox.pk).update(budget_day=timezone.now().date(),
                                                  budget_bytes_used=limit - left)


def _open_errors(mailbox: Mailbox) -> int:
    return MessageError.objects.filter(mailbox=mailbox, resolved_at__isnull=True).count()


def _subjects(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox).values_list("subject", flat=True))


def test_a_spent_day_fetches_nothing_and_says_from_when_retry_works(failed_three, fault_proxy, dovecot):
    mailbox = failed_three
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    Mailbox.objects.filter(pk=mailbox.pk).update(incoming_port=proxy.port)
    mailbox.refresh_from_db()
    _spend(mailbox, 0)

    result = services.mailbox_retry_failed(actor=mailbox.owner, mailbox=mailbox)

    assert result["refetched"] == 0 and result["refetch_paused_until"] == _tomorrow()
    assert proxy.connections == 0, "logged in although nothing could be fetched"
    assert _open_errors(mailbox) == 3 and _subjects(mailbox) == ["Fine"]


def test_retry_stops_at_the_limit_between_batches_and_the_next_day_fetches_the_rest(failed_three):
    mailbox = failed_three
    _spend(mailbox, SIZE // 2)  # room for one message (batches of one here), not two

    result = services.mailbox_retry_failed(actor=mailbox.owner, mailbox=mailbox)

    assert result["refetched"] == 1 and result["refetch_paused_until"] == _tomorrow()
    assert _open_errors(mailbox) == 2 and len(_subjects(mailbox)) == 2
    # What Retry downloaded was counted against the day, as a sync's downloads are.
    limit = providers.PRESETS["gmail"].daily_download_bytes
    assert Mailbox.objects.get(pk=mailbox.pk).budget_bytes_used > limit

    # The next day the budget is new: Retry fetches the rest.
    Mailbox.objects.filter(pk=mailbox.pk).update(budget_day=timezone.now().date() - timedelta(days=1))
    result = services.mailbox_retry_failed(actor=mailbox.owner, mailbox=mailbox)
    assert result["refetched"] == 2 and result["refetch_paused_until"] is None
    assert _open_errors(mailbox) == 0
    assert _subjects(mailbox) == ["Broken 0", "Broken 1", "Broken 2", "Fine"]


def test_the_api_and_the_page_say_when_retry_works_again(failed_three):
    mailbox = failed_three
    _spend(mailbox, 0)
    api = APIClient()
    api.force_authenticate(mailbox.owner)
    response = api.post(f"/api/v1/mailboxes/{mailbox.pk}/retry/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["refetched"] == 0
    assert datetime.fromisoformat(body["refetch_paused_until"].replace("Z", "+00:00")) == _tomorrow()

    page = Client()
    page.force_login(mailbox.owner)
    response = page.post(f"/setup/email/{mailbox.pk}/retry/", follow=True)
    text = response.content.decode()
    assert "daily download limit is reached" in text
    assert _open_errors(mailbox) == 3


# -- a POP3 pause under one provider's limit, then another provider ---------------------------
def test_a_pop3_mailbox_paused_by_gmails_limit_downloads_at_once_when_its_provider_changes(
        dovecot, mail_user, pop3_mailbox, monkeypatch, django_capture_on_commit_callbacks):
    """Paused by Gmail's daily limit, the user corrects the provider (the account is on the
    company's own server, no limit): the download goes on at once, and the 5-minute poll no
    longer leaves it out. Before, it stayed paused until midnight UTC whatever the provider."""
    from mailsync import tasks
    from mailsync.sync.pop3 import Pop3Sync

    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Pop {i}"))
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(provider="gmail")
    _spend_gmail(pop3_mailbox)
    pop3_mailbox.refresh_from_db()
    Pop3Sync(pop3_mailbox, timeout=10).run()
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == Mailbox.State.PAUSED and not _subjects(pop3_mailbox)
    assert services.mailbox_sync(mailbox_id=pop3_mailbox.pk) is None  # still Gmail: waits
    queued: list[int] = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **kw: queued.append(pk))
    assert tasks.poll_mailboxes() == 0

    with django_capture_on_commit_callbacks(execute=True):  # the sync is queued on commit
        services.mailbox_update(actor=pop3_mailbox.owner, mailbox=pop3_mailbox,
                                data={"provider": "custom"}, check_connection=False)

    assert queued == [pop3_mailbox.pk], "no sync queued when the provider changed"
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == Mailbox.State.COMPLETED
    assert _subjects(pop3_mailbox) == ["Pop 0", "Pop 1", "Pop 2"]


def test_the_poll_leaves_out_a_paused_pop3_mailbox_only_while_its_providers_limit_holds(
        pop3_mailbox, monkeypatch):
    from mailsync import tasks

    queued: list[int] = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **kw: queued.append(pk))
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(
        state=Mailbox.State.PAUSED, paused_until=_tomorrow(), provider="gmail")
    assert tasks.poll_mailboxes() == 0
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(provider="custom")  # e.g. by the admin
    assert tasks.poll_mailboxes() == 1 and queued == [pop3_mailbox.pk]


def _spend_gmail(mailbox: Mailbox) -> None:
    Mailbox.objects.filter(pk=mailbox.pk).update(
        budget_day=timezone.now().date(), budget_bytes_used=providers.PRESETS["gmail"].daily_download_bytes)
