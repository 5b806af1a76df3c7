"""A long first download (a large mailbox, a slow server) outlives one Celery task: the
worker's soft time limit (CELERY_TASK_SOFT_TIME_LIMIT, 55 minutes) raised
SoftTimeLimitExceeded in the middle of a batch, the status said "Unexpected error:
SoftTimeLimitExceeded" and nothing went on until the next poll (found in review, session
11). A run now ends itself between batches once MAILROOM_SYNC_RUN_SECONDS have passed,
still "in progress", and the next run starts as soon as it has let the mailbox go."""
from __future__ import annotations

import pytest

from mailsync import services
from mailsync.models import Email, Mailbox
from mailsync.sync import imap as imap_module
from tests.mailsync.conftest import imap_sync, make_message

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_run_time_is_well_within_the_tasks_soft_time_limit(settings):
    assert 0 < settings.MAILROOM_SYNC_RUN_SECONDS <= settings.CELERY_TASK_SOFT_TIME_LIMIT - 120


@pytest.mark.parametrize("fetch_process", [False, True])
def test_a_run_past_its_time_ends_between_batches_and_the_next_run_goes_on(
        dovecot, mail_user, imap_mailbox, settings, monkeypatch, fetch_process):
    for n in range(30):
        dovecot.deliver(mail_user, make_message(subject=f"Mail {n}"))
    monkeypatch.setattr(imap_module, "BATCH_MESSAGES", 4)
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10 if fetch_process else 0
    settings.MAILROOM_SYNC_RUN_SECONDS = 0.001  # every batch after the first is past the time

    report = imap_sync(imap_mailbox)

    stored = Email.objects.filter(mailbox=imap_mailbox).count()
    assert 0 < stored < 30 and report.new == stored, (stored, report.new)
    mailbox = Mailbox.objects.get(pk=imap_mailbox.pk)
    assert mailbox.state == Mailbox.State.SYNCING, (mailbox.state, mailbox.last_error)
    assert mailbox.last_error == "" and mailbox.sync_requested

    # Through the service, as the task runs it: each run stores a batch and hands on to the
    # next (eager here), until all is in; no mail twice, and the status ends completed.
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    mailbox.refresh_from_db()
    assert mailbox.state == Mailbox.State.COMPLETED, (mailbox.state, mailbox.last_error)
    subjects = list(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True))
    assert sorted(subjects) == sorted(f"Mail {n}" for n in range(30))
    assert not mailbox.sync_requested


def test_a_pop3_run_past_its_time_removes_only_what_it_stored_and_the_next_run_goes_on(
        dovecot, mail_user, pop3_mailbox, settings, monkeypatch):
    """POP3 in its default mode (remove after download): the run that ends for its time
    sends QUIT, so what it stored leaves the server and nothing else does."""
    from mailsync.sync import pop3 as pop3_module

    for n in range(30):
        dovecot.deliver(mail_user, make_message(subject=f"Mail {n}"))
    monkeypatch.setattr(pop3_module, "BATCH_MESSAGES", 4)
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    settings.MAILROOM_SYNC_RUN_SECONDS = 0.001

    pop3_module.pop3_mailbox_sync(mailbox=pop3_mailbox)
    stored = Email.objects.filter(mailbox=pop3_mailbox).count()
    assert 0 < stored < 30
    assert len(dovecot.folder_state(mail_user).uids) == 30 - stored  # only the stored ones left it
    mailbox = Mailbox.objects.get(pk=pop3_mailbox.pk)
    assert mailbox.state == Mailbox.State.SYNCING and mailbox.sync_requested

    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    mailbox.refresh_from_db()
    assert mailbox.state == Mailbox.State.COMPLETED, (mailbox.state, mailbox.last_error)
    subjects = list(Email.objects.filter(mailbox=pop3_mailbox).values_list("subject", flat=True))
    assert sorted(subjects) == sorted(f"Mail {n}" for n in range(30))
    assert dovecot.folder_state(mail_user).uids == []


def test_an_initial_sync_goes_newest_first(dovecot, mail_user, imap_mailbox, settings, monkeypatch):
    """Issue 3: the first sync downloads newest first, so what a user needs now is in the
    CRM first. A run ended after its first batch (its time up) holds the highest UIDs."""
    for n in range(20):
        dovecot.deliver(mail_user, make_message(subject=f"Mail {n:02}"))
    monkeypatch.setattr(imap_module, "BATCH_MESSAGES", 4)
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0
    settings.MAILROOM_SYNC_RUN_SECONDS = 0.001

    imap_sync(imap_mailbox)
    stored = sorted(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", flat=True))
    assert stored == [f"Mail {n:02}" for n in range(16, 20)], stored
