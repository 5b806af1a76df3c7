"""A large mailbox downloads over several days under its provider's daily limit (Gmail: 2.5 GB
over IMAP). Meanwhile the salesperson's new customer mail must still reach the CRM, and what
they read or delete in their mail program must show: only the older mail waits for the next
day (``mailsync.sync.base.OLDER_MAIL_SHARE`` of the budget is older mail's, the rest new mail's).

Real Dovecot and PostgreSQL; the provider's budget is a Gmail preset with a small daily limit.
"""
from __future__ import annotations

import base64
import dataclasses
import os
from datetime import timedelta

import pytest
from django.utils import timezone

import mailsync.sync.imap as engine
from mailsync import providers, services, tasks
from mailsync.models import Email, EmailLocation, Mailbox
from mailsync.selectors import mailbox_status
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


def deliver(dovecot, user, subjects: list[str], size: int = 8000) -> None:  # noqa: ANN001
    for subject in subjects:
        body = base64.encodebytes(os.urandom(size * 3 // 4)).decode()
        dovecot.deliver(user, make_message(subject=subject, body=body))


def stored(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))


def used(mailbox: Mailbox) -> int:
    return Mailbox.objects.get(pk=mailbox.pk).budget_bytes_used


def test_new_mail_and_changes_keep_coming_while_the_older_mail_waits_for_the_next_day(
        dovecot, mail_user, imap_mailbox, settings, monkeypatch):
    # Given a Gmail mailbox whose day allows ~170 KB, with 24 mails of ~11 KB on the server
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10  # the download runs in a fetch process
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 2)
    gmail = providers.PRESETS["gmail"]
    monkeypatch.setitem(providers.PRESETS, "gmail", dataclasses.replace(gmail, daily_download_bytes=170_000))
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(provider="gmail")
    older = [f"Older {i:02d}" for i in range(24)]
    deliver(dovecot, mail_user, older)

    # When the first sync has spent older mail's share of the day
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)

    # Then it is paused until midnight UTC with part of the older mail in
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["state"] == "paused" and status["paused_until"] > timezone.now(), status
    first_day = stored(imap_mailbox)
    assert 0 < len(first_day) < len(older)
    spent = used(imap_mailbox)
    assert 170_000 * 0.9 <= spent < 170_000

    # When a customer writes, and the salesperson reads one of the stored mails and deletes
    # another in their mail program, and IDLE (or the poll) syncs the mailbox
    deliver(dovecot, mail_user, ["Fresh from a customer"], size=3000)
    places = dict(EmailLocation.objects.filter(email__mailbox=imap_mailbox)
                  .values_list("email__subject", "uid"))
    read, deleted = first_day[0], first_day[1]
    dovecot.doveadm("flags", "add", "-u", mail_user.username, "\\Seen", "mailbox", "INBOX",
                    "uid", str(places[read]))
    dovecot.doveadm("expunge", "-u", mail_user.username, "mailbox", "INBOX", "uid", str(places[deleted]))
    queued: list[int] = []
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda pk, **_: queued.append(pk))
    tasks.poll_mailboxes()
    assert queued == [imap_mailbox.pk]
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)

    # Then the new mail is in, the read and the delete show, no more older mail was
    # downloaded, and the status still says when the older mail goes on
    now_in = stored(imap_mailbox)
    assert "Fresh from a customer" in now_in
    assert Email.objects.get(mailbox=imap_mailbox, subject=read).seen
    assert deleted not in now_in
    assert sorted(set(now_in) - {"Fresh from a customer"}) == sorted(set(first_day) - {deleted})
    assert used(imap_mailbox) < spent + 6000  # the new mail only, not a dropped batch
    status = mailbox_status(mailbox=imap_mailbox)
    assert status["state"] == "paused" and status["paused_until"] > timezone.now(), status

    # When the whole day's budget is spent, a sync downloads nothing at all (not even a
    # batch to throw away), and the new mail waits too
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(budget_bytes_used=170_000)
    deliver(dovecot, mail_user, ["Later that day"], size=3000)
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    assert used(imap_mailbox) == 170_000
    assert "Later that day" not in stored(imap_mailbox)
    assert mailbox_status(mailbox=imap_mailbox)["state"] == "paused"

    # The next day: everything still on the server is in, each mail once
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        budget_day=timezone.now().date() - timedelta(days=1),
        paused_until=timezone.now() - timedelta(seconds=1))
    monkeypatch.setitem(providers.PRESETS, "gmail", dataclasses.replace(gmail, daily_download_bytes=10**9))
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    assert mailbox_status(mailbox=imap_mailbox)["state"] == "completed"
    expected = sorted(set(older) - {deleted} | {"Fresh from a customer", "Later that day"})
    assert stored(imap_mailbox) == expected
    assert Email.objects.filter(mailbox=imap_mailbox).count() == len(expected) + 1  # + the tombstone
