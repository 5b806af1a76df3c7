"""Celery tasks of mail sync: thin, they take ids and call one service."""
from __future__ import annotations

import logging

from celery import shared_task
from django.core.exceptions import ObjectDoesNotExist
from django.utils import timezone

from . import services
from .exceptions import MailboxBusy, MailTransientError, MailUserError
from .models import Email, Mailbox
from .providers import PRESETS

log = logging.getLogger(__name__)


@shared_task(
    name="mailsync.sync_mailbox", bind=True, acks_late=True,
    autoretry_for=(MailTransientError,), retry_backoff=30, retry_backoff_max=900,
    retry_jitter=True, max_retries=8,
)
def sync_mailbox(self, mailbox_id: int, retry: bool = True) -> None:  # noqa: ANN001
    """``retry=False`` (the beat poll's syncs): a transient fault is left to the next poll,
    a few minutes later. Retried with backoff too, each poll started a chain of up to nine
    logins while a server was down, and the chains of successive polls overlapped: several
    times the poll's own rate of attempts (found in review)."""
    try:
        services.mailbox_sync(mailbox_id=mailbox_id)
    except MailboxBusy:
        # A sync is running and may have passed the point where this change shows: it runs
        # one more when it ends (however long it takes: a first sync may take an hour). No
        # retry against the lock: that used the transient-fault budget and ended in an error.
        if services.mailbox_sync_requested(mailbox_id=mailbox_id):
            sync_mailbox.apply_async((mailbox_id,), countdown=1)  # it ended meanwhile
    except MailTransientError as exc:  # after MailboxBusy, one of them
        if retry:
            raise  # autoretry_for: backoff, at most max_retries
        log.info("mailbox %s: %s (not retried: the next poll tries again)", mailbox_id, exc.code)
    except MailUserError as exc:
        # Wrong password and the like: the status says what to fix; retrying would only
        # lock the account at the provider.
        log.info("mailbox %s: %s (not retried)", mailbox_id, exc.code)
    except Mailbox.DoesNotExist:
        log.info("mailbox %s: deleted before its sync ran", mailbox_id)


@shared_task(
    name="mailsync.mark_opened_read", acks_late=True,
    autoretry_for=(MailTransientError,), retry_backoff=30, retry_backoff_max=300,
    retry_jitter=True, max_retries=3,
)
def mark_opened_read(email_id: int, user_id: int) -> None:
    """The owner opened an unread mail in the CRM: read, on the mail server first."""
    from django.contrib.auth import get_user_model

    from .models import Email

    try:
        email = Email.objects.select_related("mailbox").get(pk=email_id, deleted_at__isnull=True)
        services.email_opened(actor=get_user_model().objects.get(pk=user_id), email=email)
    except MailUserError as exc:
        log.info("email %s: not marked read (%s; not retried)", email_id, exc.code)
    except ObjectDoesNotExist:
        log.info("email %s: gone before it was marked read", email_id)


@shared_task(name="mailsync.parse_emails", acks_late=True)
def parse_emails(mailbox_id: int) -> None:
    # One batch per task run, then chain: a long backlog never holds one worker for hours.
    if services.emails_parse_pending(mailbox_id=mailbox_id) and Email.objects.filter(
            mailbox_id=mailbox_id, parse_state=Email.ParseState.PENDING).exists():
        parse_emails.delay(mailbox_id)


@shared_task(name="mailsync.poll_mailboxes")
def poll_mailboxes() -> int:
    """The safety net behind IDLE: queue a sync of every active mailbox not failed on a user
    error, nor a POP3 one paused by its provider's daily limit (a paused IMAP mailbox still
    syncs its new mail and changes: services.mailbox_sync)."""
    now = timezone.now()
    ids = list(
        Mailbox.objects.filter(is_active=True, owner__is_active=True)
        .exclude(protocol=Mailbox.Protocol.POP3, state=Mailbox.State.PAUSED, paused_until__gt=now,
                 provider__in=[key for key, p in PRESETS.items() if p.daily_download_bytes])
        .exclude(state=Mailbox.State.ERROR, last_error_code__in=Mailbox.USER_ERROR_CODES)
        .values_list("pk", flat=True)
    )
    for mailbox_id in ids:
        sync_mailbox.delay(mailbox_id, retry=False)
    return len(ids)


@shared_task(name="mailsync.purge_tombstones")
def purge_tombstones() -> int:
    from django.conf import settings

    return services.emails_purge_tombstones(older_than_days=settings.MAILROOM_TOMBSTONE_DAYS)


@shared_task(name="mailsync.sweep_sources")
def sweep_sources() -> dict[str, int]:
    from dataclasses import asdict

    from . import sourcestore

    return asdict(sourcestore.sweep())


@shared_task(name="mailsync.send_email", acks_late=False, ignore_result=True)
def send_email(email_id: int) -> None:
    """Deliver one mail composed in the CRM. Acknowledged on receipt and never retried
    automatically: a mail must not reach a customer twice (see ``mailsync.sending``)."""
    from . import sending

    try:
        sending.email_deliver(email_id=email_id)
    except sending.Email.DoesNotExist:
        log.info("email %s: deleted before it was sent", email_id)
