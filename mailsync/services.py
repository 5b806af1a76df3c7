"""Mailbox and email operations: the one entry point for each state change.

Pages, the API, Celery tasks, the IDLE watcher and management commands call these.
"""
from __future__ import annotations

import contextlib
from datetime import date, timedelta
import functools
import logging
import re
import socket
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.views.decorators.debug import sensitive_variables
from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef, Q, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from crm.exceptions import RecordPermissionDenied
from crm.models import User

from .exceptions import MailboxBusy, MailboxHoldsMail, MailboxOutOfDate, MailProtocolError
from .mime import parse_message
from .models import (
    Attachment,
    AttachmentBlob,
    Email,
    EmailLocation,
    EmailParticipant,
    EmailSource,
    MailFolder,
    Mailbox,
)
from .protocols.base import CopiedMessages, is_public_address
from .protocols.imap import NEVER_SYNC, check_login
from .protocols.pop3 import check_login as pop3_check_login
from .providers import preset_for
from .storage import compress, decompress
from .sync.base import budget_spent_until
from .sync.imap import SyncReport, imap_mailbox_sync, server_settings
from .sync.pop3 import detach_pop3_places, pop3_mailbox_sync

log = logging.getLogger(__name__)

# Bodies parsed per call of emails_parse_pending: one transaction each, ~2 ms a message.
PARSE_BATCH = 200
PARSE_BATCH_BYTES = 64 * 1024 * 1024


def _check_host(host: str) -> None:
    """Refuse mail hosts on loopback, private or link-local networks (SSRF): a user must not
    make our workers connect to services inside our network."""
    if settings.MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS:
        return
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValidationError({"incoming_host": [f"The server {host} was not found."]}) from exc
    except (UnicodeError, ValueError) as exc:  # "a..b", a label over 63 characters
        raise ValidationError({"incoming_host": [f"{host!r} is not a valid server name."]}) from exc
    for info in infos:
        if not is_public_address(info[4][0]):
            raise ValidationError(
                {"incoming_host": [f"{host} is a private or local address; use the provider's public server."]}
            )


def _check_owner(actor: User, mailbox: Mailbox) -> None:
    if mailbox.owner_id != actor.pk and not actor.is_administrator:
        raise RecordPermissionDenied("Only the owner of a mailbox may change it.")


def _check_mail_owner(actor: User, mailbox: Mailbox) -> None:
    """Actions on the mail itself reach the owner's real mailbox: the owner only, not even
    an administrator (who may see settings, not act inside someone's mailbox)."""
    if mailbox.owner_id != actor.pk:
        raise RecordPermissionDenied("Only the owner of this mailbox may change its mail.")


def _validate(mailbox: Mailbox) -> None:
    from .sync.imap import wanted_folders  # noqa: PLC0415

    mailbox.folders = wanted_folders(mailbox.folders or [])
    # "Sync mail since" a day to come synced nothing, new mail included (SEARCH SINCE leaves
    # it out), under a "Completed" status. A day's margin: the user's today may be our tomorrow.
    if mailbox.sync_since and mailbox.sync_since > timezone.localdate() + timedelta(days=1):
        raise ValidationError({"sync_since": [
            "This date is in the future: no mail would sync. Choose today or an earlier day, "
            "or leave it empty to sync all mail."]})
    _check_host(mailbox.incoming_host)
    if mailbox.smtp_host:
        try:
            _check_host(mailbox.smtp_host)
        except ValidationError as exc:
            raise ValidationError({"smtp_host": exc.message_dict["incoming_host"]}) from exc
    mailbox.full_clean(exclude=["owner"])
    # full_clean skips constraints on the excluded owner: without this, adding the same
    # mailbox twice hit mailbox_unique_address_per_owner as an IntegrityError (a 500).
    _check_not_added(mailbox)


def _check_not_added(mailbox: Mailbox) -> None:
    if Mailbox.objects.filter(
        owner_id=mailbox.owner_id, email_address__iexact=mailbox.email_address
    ).exclude(pk=mailbox.pk).exists():
        raise ValidationError({"email_address": ["You have already added this mailbox."]})


@sensitive_variables("data")
@transaction.atomic
def mailbox_create(*, actor: User, data: dict[str, Any], check_connection: bool = True) -> Mailbox:
    """Create a mailbox after a successful login test: nothing is saved half-way.

    The first mailbox of a user becomes the active one.
    """
    mailbox = Mailbox(owner=actor, **data)
    _validate(mailbox)
    if check_connection:
        mailbox_test(mailbox=mailbox)
    # Two first mailboxes created at once: the owner's row serializes the decision (else both
    # would be active and the second INSERT would hit mailbox_one_active_per_owner).
    list(User.objects.select_for_update().filter(pk=actor.pk).values_list("pk", flat=True))
    # Checked again under that lock: the same form sent twice (two tabs, a double submit)
    # passed the first check side by side during the login tests (it was a 500).
    _check_not_added(mailbox)
    mailbox.is_active = not Mailbox.objects.filter(owner=actor, is_active=True).exists()
    mailbox.save()
    if mailbox.is_active:
        _queue_sync(mailbox)
    return mailbox


def _queue_sync(mailbox: Mailbox) -> None:
    """Start a sync once the change is committed (the page, the API and the admin alike)."""
    from . import tasks  # noqa: PLC0415  (tasks import services)

    mailbox_id = mailbox.pk

    def queue() -> None:
        try:
            tasks.sync_mailbox.delay(mailbox_id)
        except Exception:  # noqa: BLE001  (broker down: the 5-minute beat poll picks it up)
            log.warning("mailbox %s: could not queue its first sync", mailbox_id, exc_info=True)

    transaction.on_commit(queue)


REENTER = "Enter the password again: a saved password is only sent to the server it was entered for."


def secrets_to_reenter(before: dict[str, Any], after: dict[str, Any], given: set[str]) -> dict[str, list[str]]:
    """Which passwords must be typed again because of a settings change: a stored password
    goes only to the server it was entered for. Pointing the mailbox at another host (or
    switching to no encryption, or to the other protocol) without the password would send
    the saved one there (anyone with the mailbox's settings page, an API token or the admin
    could collect it). ``before``/``after``: the fields' values; ``given``: passwords typed."""
    errors: dict[str, list[str]] = {}

    def moved(host: str, security: str, *extra: str) -> bool:
        return ((before.get(host) or "").strip().lower() != (after.get(host) or "").strip().lower()
                or (after.get(security) == "none" and before.get(security) != "none")
                or any(before.get(name) != after.get(name) for name in extra))

    incoming_moved = moved("incoming_host", "incoming_security", "protocol")
    if incoming_moved and "password" not in given and before.get("password"):
        errors["password"] = [REENTER]
    if after.get("smtp_host") and moved("smtp_host", "smtp_security"):
        # SMTP logs in with its own password when it has its own username, else the incoming one.
        field = "smtp_password" if after.get("smtp_username") else "password"
        if field not in given and before.get(field):
            errors.setdefault(field, [REENTER])
    return errors


_DESTINATION_FIELDS = ("incoming_host", "incoming_security", "protocol", "smtp_host", "smtp_security",
                       "smtp_username", "password", "smtp_password")


@sensitive_variables("data", "before", "value")
@transaction.atomic
def mailbox_update(*, actor: User, mailbox: Mailbox, data: dict[str, Any],
                   check_connection: bool = True) -> Mailbox:
    _check_owner(actor, mailbox)
    connection_fields = {"protocol", "incoming_host", "incoming_port", "incoming_security", "username",
                         "password", "smtp_host", "smtp_port", "smtp_security", "smtp_username",
                         "smtp_password"}
    excluded_before = mailbox.excluded_domain_set
    since_before = mailbox.sync_since
    limit_before = mailbox.max_message_bytes
    provider_before = mailbox.provider
    before = {name: getattr(mailbox, name) for name in _DESTINATION_FIELDS}
    settings_before = {name: getattr(mailbox, name) for name in connection_fields}
    for name, value in data.items():
        if name in {"password", "smtp_password"} and not value:
            continue  # write-only: empty keeps the stored secret
        setattr(mailbox, name, value)
    given = {name for name in ("password", "smtp_password") if data.get(name)}
    # What the connection uses changed: a password typed (even the same one: "try again"),
    # or another value. The same values sent back (a client PATCHing a GET body to rename
    # the mailbox) tested the login each time, and were a 400 while the server was down.
    changed = given | {name for name in connection_fields & data.keys() - {"password", "smtp_password"}
                       if getattr(mailbox, name) != settings_before[name]}
    reenter = secrets_to_reenter(before, {name: getattr(mailbox, name) for name in _DESTINATION_FIELDS}, given)
    if reenter:
        raise ValidationError(reenter)
    _validate(mailbox)
    if check_connection and changed:
        mailbox_test(mailbox=mailbox)
    reconnect = bool(changed)
    try:
        reconnect = _forget_old_account(mailbox=mailbox, host=settings_before["incoming_host"],
                                        username=settings_before["username"]) or reconnect
    except MailboxBusy as exc:
        raise ValidationError({"username": [
            "A sync is running: change the account when it has finished (see the status)."]}) from exc
    # Only what this change sets is written: the copy the request loaded may be older than
    # a sync that committed meanwhile (its state, last sync, the day's downloaded bytes):
    # a whole-row save wrote those back (a spent daily budget forgotten, a pause undone).
    columns = {f.name for f in Mailbox._meta.concrete_fields}
    fields = {name for name in data
              if name in columns and (name not in {"password", "smtp_password"} or data[name])}
    current = Mailbox.objects.select_for_update().filter(pk=mailbox.pk).values(
        "state", "last_sync_at", "last_error", "last_error_code").first() or {}
    for name, value in current.items():
        setattr(mailbox, name, value)
    if mailbox.state == Mailbox.State.ERROR and reconnect:
        # Fixed (the login test passed): as before the error; the sync queued below shows
        # the rest. "New" only for a mailbox that never synced.
        mailbox.state = Mailbox.State.NEW if mailbox.last_sync_at is None else Mailbox.State.COMPLETED
        mailbox.last_error, mailbox.last_error_code = "", ""
        fields |= {"state", "last_error", "last_error_code"}
    mailbox.save(update_fields=sorted({*fields, "modified_at"}))
    # A sync now (one, whatever the reasons): after a connection fix (not 5 minutes later),
    # older mail wanted ("sync mail since" earlier), or a raised size limit (headers-only
    # mail downloaded whole).
    sync_now = reconnect or mailbox.max_message_bytes > limit_before
    if (mailbox.state == Mailbox.State.PAUSED and mailbox.provider != provider_before
            and not _budget_still_spent(mailbox)):
        sync_now = True  # paused by the old provider's daily limit: the new one allows more
    if mailbox.excluded_domain_set != excluded_before:
        _emails_reshare(mailbox=mailbox)
    try:
        if _backfill_again_if_earlier(mailbox=mailbox, since_before=since_before):
            sync_now = True
    except MailboxBusy as exc:
        raise ValidationError({"sync_since": [
            "A sync is running: change this when it has finished (see the status)."]}) from exc
    if sync_now and mailbox.is_active:
        _queue_sync(mailbox)
    return mailbox


def _budget_still_spent(mailbox: Mailbox) -> bool:
    """Whether today's downloads still reach the daily limit of the mailbox's provider *as
    it is now*: a pause taken under another provider (Gmail, then the company's own server)
    or yesterday's budget no longer holds the mailbox back."""
    return budget_spent_until(mailbox.pk, preset_for(mailbox.provider).daily_download_bytes) is not None


def _forget_old_account(*, mailbox: Mailbox, host: str, username: str) -> bool:
    """The mailbox now logs in to another account (another server or user name): the
    cursors, places and POP3 keys of the old one say nothing about the new one. Kept, a
    UIDVALIDITY (or a UIDL) the two accounts share skipped the new account's mail below
    the old cursor; a different one tombstoned the old account's mail, purged 30 days later
    without the confirmation a mailbox delete asks for. So the mail stays as the CRM's copy
    (no place, as POP3 mail the server no longer has) and the folders are read whole again:
    mail the new account also holds is found by Message-ID + content hash (no duplicate)
    and gets its place back. True if so. MailboxBusy while a sync runs (it would write its
    cursor back over this)."""
    if mailbox.pk is None or ((host or "").strip().lower() == (mailbox.incoming_host or "").strip().lower()
                              and username == mailbox.username):
        return False
    from .models import Pop3Message  # noqa: PLC0415
    from .sync.lock import mailbox_lock  # noqa: PLC0415

    with mailbox_lock(mailbox.pk):
        EmailLocation.objects.filter(folder__mailbox=mailbox).delete()
        Pop3Message.objects.filter(mailbox=mailbox).delete()
        MailFolder.objects.filter(mailbox=mailbox).update(
            uidvalidity=None, uid_high=0, uid_low=None, backfill_done=False, highestmodseq=None,
            last_uidnext=None, last_exists=None)
    return True


def _backfill_again_if_earlier(*, mailbox: Mailbox, since_before: date | None) -> bool:
    """"Sync mail since" moved earlier (or cleared): older mail is wanted now, so each
    folder's backfill runs again below what it has (UIDs already stored are skipped, nothing
    is downloaded twice). Not while a sync runs: it would write its own cursor back over
    this (MailboxBusy). True if the folders were reset."""
    if since_before is None or (mailbox.sync_since is not None
                                and mailbox.sync_since >= since_before):
        return False
    from .sync.lock import mailbox_lock  # noqa: PLC0415

    with mailbox_lock(mailbox.pk):
        MailFolder.objects.filter(mailbox=mailbox, uid_low__isnull=False).update(
            backfill_done=False, uid_low=F("uid_high") + 1)
    return True


ADMIN_CONNECTION_FIELDS = frozenset({
    "protocol", "incoming_host", "incoming_port", "incoming_security", "username", "password",
    "smtp_host", "smtp_port", "smtp_security", "smtp_username", "smtp_password"})


def mailbox_saved_by_admin(*, mailbox: Mailbox, excluded_before: set[str], activated: bool,
                           limit_before: int | None = None, since_before: date | None = None,
                           reconnect: bool = False, account_before: tuple[str, str] | None = None) -> None:
    """The Django admin saved a mailbox with its own form: what mailbox_update and
    mailbox_activate do besides saving (mail already synced follows a new list of excluded
    domains; an activated mailbox syncs at once, and so does one whose size limit was
    raised or whose "sync mail since" moved earlier: without the latter, a date moved
    earlier in the admin never brought the older mail). ``reconnect``: connection settings
    (a password) changed: an error they caused is cleared and a sync tries them at once
    (the admin tests no login: a sync that fails says so again); without this, a password
    fixed in the admin left "auth_failed", which the poll skips, so the mailbox never
    synced again."""
    if mailbox.excluded_domain_set != excluded_before:
        _emails_reshare(mailbox=mailbox)
    if account_before is not None:  # another account: see _forget_old_account
        try:
            reconnect = _forget_old_account(mailbox=mailbox, host=account_before[0],
                                            username=account_before[1]) or reconnect
        except MailboxBusy:
            log.warning("mailbox %s: sync running while its account changed", mailbox.pk)
    if reconnect and mailbox.state == Mailbox.State.ERROR:
        mailbox.state = Mailbox.State.NEW if mailbox.last_sync_at is None else Mailbox.State.COMPLETED
        mailbox.last_error, mailbox.last_error_code = "", ""
        Mailbox.objects.filter(pk=mailbox.pk, state=Mailbox.State.ERROR).update(
            state=mailbox.state, last_error="", last_error_code="")
    raised = limit_before is not None and mailbox.max_message_bytes > limit_before
    try:
        earlier = _backfill_again_if_earlier(mailbox=mailbox, since_before=since_before)
    except MailboxBusy:
        # The admin has no form error to show at this point (the row is saved): said in the
        # log; saving the date again once the sync has ended does it.
        log.warning("mailbox %s: sync running, older mail not requested; save again later",
                    mailbox.pk)
        earlier = False
    if activated or ((raised or earlier or reconnect) and mailbox.is_active):
        _queue_sync(mailbox)


def _emails_reshare(*, mailbox: Mailbox) -> None:
    """Recompute ``Email.shareable`` after the excluded domains changed, so mail already
    synced follows the new list (the rule of ``sync.ingest.shareable``: a participant's
    domain is an excluded domain or a subdomain of one)."""
    domains = sorted(mailbox.excluded_domain_set)
    if not domains:
        Email.objects.filter(mailbox=mailbox, shareable=False).update(shareable=True)
        return
    # "@", then the domain or a subdomain of it, then only what sharing_domain strips
    # ("x@[bank.example]", "x@bank.example."), then the end of the address: a JSON list's
    # closing quote in To and Cc. Participants hold the plausible addresses (lower-cased, as
    # excluded domains are); From, To and Cc as written also hold the implausible ones.
    alternatives = "|".join(re.escape(d) for d in domains)
    # (Never "[." inside brackets: POSIX reads it as the start of a collating element.)
    head, tail = rf"@([^@\"]*[.\[ ])?({alternatives})", r"[]. \t<>'[]*"
    hit = (Exists(EmailParticipant.objects.filter(address__regex=f"{head}{tail}$",
                                                  email=OuterRef("pk")))
           | Q(from_address__iregex=f"{head}{tail}$")
           | Q(to_text__iregex=f'{head}{tail}"') | Q(cc_text__iregex=f'{head}{tail}"'))
    emails = Email.objects.filter(mailbox=mailbox).annotate(
        to_text=Cast("to", TextField()), cc_text=Cast("cc", TextField()))
    emails.filter(hit).exclude(shareable=False).update(shareable=False)
    emails.exclude(hit).exclude(shareable=True).update(shareable=True)


def mailbox_test(*, mailbox: Mailbox) -> list[tuple[str, str]]:
    """Log in to the incoming server, then to the SMTP server if one is set; raise a
    MailError that says what to fix."""
    if mailbox.protocol == Mailbox.Protocol.POP3:
        folders = pop3_check_login(server_settings(mailbox, timeout=15))
    elif mailbox.pk is None:
        folders = check_login(server_settings(mailbox, timeout=15))
    else:
        from .sync.lock import connection_slot  # noqa: PLC0415

        # A saved mailbox's sync may be running: the test takes its turn on the connection.
        with connection_slot(mailbox.pk, wait=settings.MAILROOM_CONNECTION_WAIT):
            folders = check_login(server_settings(mailbox, timeout=15))
    from .sending import smtp_test  # noqa: PLC0415  (sending imports the sync engine)

    smtp_test(mailbox=mailbox)
    return folders


def mailbox_delete(*, actor: User, mailbox: Mailbox, delete_emails: bool = False) -> int:
    """Delete a mailbox and, with it, the mail synced or sent through it from the CRM (never
    from the mail server). A mailbox that holds mail is deleted only with
    ``delete_emails=True``: its mail may sit on records other users rely on. Not while it
    syncs (MailboxBusy: a run would write into the rows being removed). Returns the number
    of emails removed."""
    from .sync.lock import mailbox_lock

    from .selectors import mailbox_holdings

    _check_owner(actor, mailbox)
    count, on_records = mailbox_holdings(mailbox=mailbox)
    if count and not delete_emails:
        raise MailboxHoldsMail(
            f"{mailbox.email_address} holds {count} emails ({on_records} on records). Deleting "
            "it removes them from the CRM (not from the mail server).",
            hint="Repeat with delete_emails=true to delete them too, or deactivate the mailbox "
                 "(activate another one) to stop syncing and keep its mail.")
    with mailbox_lock(mailbox.pk), transaction.atomic():
        mailbox.delete()
    return count


@transaction.atomic
def mailbox_activate(*, actor: User, mailbox: Mailbox) -> Mailbox:
    """Make this the user's one active mailbox; the others stop syncing."""
    _check_owner(actor, mailbox)
    # Serialize activations of one owner. The queryset must be evaluated to take the locks
    # (a bare select_for_update() locks nothing): without them, a concurrent activation's
    # UPDATE missed the mailbox just activated and the save hit mailbox_one_active_per_owner.
    list(Mailbox.objects.select_for_update().filter(owner=mailbox.owner).order_by("pk")
         .values_list("pk", flat=True))
    Mailbox.objects.filter(owner=mailbox.owner, is_active=True).exclude(pk=mailbox.pk).update(
        is_active=False
    )
    mailbox.is_active = True
    mailbox.save(update_fields=["is_active", "modified_at"])
    _queue_sync(mailbox)
    return mailbox


def mailbox_sync(*, mailbox_id: int) -> SyncReport | None:
    """Sync a mailbox now (the task, "Sync now", the IDLE watcher and beat all come here)."""
    mailbox = Mailbox.objects.select_related("owner").get(pk=mailbox_id)
    if not mailbox.is_active or not mailbox.owner.is_active:
        log.info("mailbox %s: not active, not syncing", mailbox_id)
        return None
    if (mailbox.protocol == Mailbox.Protocol.POP3 and mailbox.state == Mailbox.State.PAUSED
            and mailbox.paused_until and mailbox.paused_until > timezone.now()
            and _budget_still_spent(mailbox)):
        # POP3 downloads in one line, oldest first: nothing to do until the budget resets.
        # An IMAP mailbox still syncs: only its older mail waits (SyncRun._older_mail).
        log.info("mailbox %s: paused until %s", mailbox_id, mailbox.paused_until)
        return None
    from . import tasks  # noqa: PLC0415  (tasks import services)

    held = True  # this call held the mailbox's lock (not MailboxBusy)
    try:
        if mailbox.protocol == Mailbox.Protocol.POP3:
            report = pop3_mailbox_sync(mailbox=mailbox)
        else:
            detach_pop3_places(mailbox=mailbox)  # switched from POP3: its mail stays (see there)
            report = imap_mailbox_sync(mailbox=mailbox)
    except MailboxBusy:
        held = False
        raise
    finally:
        # Asked for while this run held the mailbox (the lock is released now): one more.
        if held and Mailbox.objects.filter(pk=mailbox_id, sync_requested=True).update(sync_requested=False):
            transaction.on_commit(lambda: tasks.sync_mailbox.delay(mailbox_id))
    if report.new or report.completed:
        transaction.on_commit(lambda: tasks.parse_emails.delay(mailbox_id))
    return report


def mailbox_sync_requested(*, mailbox_id: int) -> bool:
    """A sync was asked for while another held the mailbox: the running one will queue one
    more when it ends. True if none holds it any more (it ended meanwhile, before it could
    see the request): the caller should queue the sync itself."""
    from .selectors import _sync_running  # noqa: PLC0415

    Mailbox.objects.filter(pk=mailbox_id).update(sync_requested=True)
    if _sync_running(mailbox_id):
        return False
    return bool(Mailbox.objects.filter(pk=mailbox_id, sync_requested=True).update(sync_requested=False))


def emails_parse_pending(*, mailbox_id: int, limit: int = PARSE_BATCH) -> int:
    """Parse bodies and attachments of stored mails, a batch per transaction. A mail that
    cannot be parsed keeps its raw source and a parse error the user can see; it never
    stops the others. Rows are locked with SKIP LOCKED: two parse tasks (each sync queues
    one) never parse the same mail twice."""
    with transaction.atomic():
        candidates = list(
            Email.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(mailbox_id=mailbox_id, parse_state=Email.ParseState.PENDING)
            .order_by("-date").values_list("pk", "size")[:limit]
        )
        # Bounded in bytes too: a batch of large mails (each source is held while the batch
        # is parsed) must not take the worker's memory, or an OOM kill would repeat it forever.
        chosen: list[int] = []
        total = 0
        for pk, size in candidates:
            if chosen and total + size > PARSE_BATCH_BYTES:
                break
            chosen.append(pk)
            total += size
        emails = list(Email.objects.filter(pk__in=chosen).order_by("-date"))
        _parse_and_store(emails)
    return len(emails)


def email_parse(*, email: Email) -> Email:
    with transaction.atomic():
        locked = list(Email.objects.select_for_update(of=("self",)).filter(
            pk=email.pk, parse_state=Email.ParseState.PENDING))
        _parse_and_store(locked)
    email.refresh_from_db()
    return email


def _parse_and_store(emails: list[Email]) -> None:
    """Parse each mail's source and store its bodies and attachments. One mail at a time:
    its attachments' content is written (once per hash) before the next is parsed, and its
    sources are let go, so a batch of large mails is never all in memory (issue 3: the
    worker stays under 200 MB; a 40 MB mail took 530 MB)."""
    import hashlib

    from dataclasses import replace

    from .mime.message import inline_only_if_shown
    from .sync.copy import read_source, write_blobs

    # Parsed again (Retry after a failure, a completed headers-only mail): the attachments of
    # the earlier parse go, or each retry would list them once more.
    if emails:
        Attachment.objects.filter(email__in=emails).delete()
    rows: list[Attachment] = []
    digests: list[str] = []
    for email in emails:
        try:
            compressed = read_source(email.pk)  # one at a time, not the batch's at once
            if compressed is None:
                raise EmailSource.DoesNotExist("the mail has no stored source")
            raw = decompress(compressed)
            del compressed
            parsed = parse_message(raw)
            del raw
        except Exception as exc:  # noqa: BLE001  (any parser failure is recorded, never fatal)
            email.parse_state = Email.ParseState.FAILED
            email.parse_error = f"{type(exc).__name__}: {exc}"[:2000]
            continue
        email.text = parsed.text.replace("\x00", "")
        email.html = parsed.html.replace("\x00", "")
        # An inline part the HTML does not show is listed with the attachments.
        parsed = replace(parsed, attachments=inline_only_if_shown(parsed.attachments, parsed.html))
        email.has_attachments = any(not a.inline for a in parsed.attachments)
        # What could not be read is said, and the mail can be retried ("Retry" in the
        # status): a part the parser gave up on, or the whole MIME structure.
        lost = [d for d in parsed.defects if d.startswith("MIME parse failed") or " unreadable " in f" {d} "]
        email.parse_state = Email.ParseState.FAILED if lost else Email.ParseState.PARSED
        email.parse_error = "; ".join(lost)[:2000]
        hashed = [(part, hashlib.sha256(part.content).hexdigest()) for part in parsed.attachments]
        # Content stored once by hash, whichever mail brought it first.
        known = set(AttachmentBlob.objects.filter(sha256__in={d for _, d in hashed})
                    .values_list("sha256", flat=True))
        new = {digest: part for part, digest in hashed if digest not in known}
        write_blobs([(digest, compress(part.content), len(part.content)) for digest, part in new.items()])
        for part, digest in hashed:
            rows.append(Attachment(email=email, filename=part.filename[:255],
                                   content_type=part.content_type[:255],
                                   content_id=(part.content_id or "")[:500],
                                   inline=part.inline, size=len(part.content)))
            digests.append(digest)
        del parsed, hashed, new
    if rows:
        blob_ids = dict(AttachmentBlob.objects.filter(sha256__in=set(digests)).values_list("sha256", "pk"))
        for row, digest in zip(rows, digests):
            row.blob_id = blob_ids[digest]
        Attachment.objects.bulk_create(rows, batch_size=500)
    Email.objects.bulk_update(
        emails, ["text", "html", "has_attachments", "parse_state", "parse_error"], batch_size=100
    )


# -- two-way actions: what the user does in the CRM happens in the mailbox --------------------

def _locations_by_folder(email: Email) -> dict[str, list[int]]:
    """The mail's places on the server, by folder. A mail with a place under an earlier
    UIDVALIDITY (its folder is being read again, or was left half-way): nothing can be done
    on the server until the sync has found it again, so the user is told (acting on the
    CRM copy alone would be undone by that sync). So also when only one of its places is:
    acting on the others alone, a delete or move left that copy on the server, and the
    re-read, once it went on (after the day's download budget, say), brought the mail the
    user had deleted back (a flag change was undone the same way)."""
    grouped: dict[str, list[int]] = {}
    stale = False
    for location in email.locations.select_related("folder"):
        if location.folder.uidvalidity == location.uidvalidity:
            grouped.setdefault(location.folder.name, []).append(location.uid)
        else:
            stale = True
    if stale:
        _queue_sync(email.mailbox)
        raise MailboxOutOfDate(
            "This mail's folder is being read again from the server (it changed there).",
            hint="A sync is running or has started; try again in a moment.",
        )
    return grouped


def _places_for_action(email: Email) -> dict[str, list[int]]:
    """``_locations_by_folder``; for a mail sent from the CRM whose copy in the Sent folder
    the sync has not read yet (it has no place), that copy is looked for first (by
    Message-ID, then the same fingerprint) and recorded. Acted on in the CRM only, the
    change was undone by the sync that found the copy: a flag or "unread" taken back, a
    deleted mail back in the CRM (the copy was live on the server)."""
    places = _locations_by_folder(email)
    if (places or email.source != Email.Source.CRM or email.send_state != Email.SendState.SENT
            or not email.message_id):
        return places
    from .sync.prepare import prepare  # noqa: PLC0415

    mailbox = email.mailbox
    with _server_session(mailbox) as session:
        sent = session.sent_folder()
        if sent is None:
            return places
        selected = session.select(sent, readonly=True)
        uids = session.search_header("Message-ID", [email.message_id])
        found = [m for m in session.fetch_messages(uids) if prepare(m).fingerprint == email.fingerprint]
    if not found:
        return places
    folder, _ = MailFolder.objects.get_or_create(
        mailbox=mailbox, name=sent, defaults={"special_use": "sent", "uidvalidity": selected.uidvalidity})
    EmailLocation.objects.bulk_create(
        [EmailLocation(email=email, folder=folder, uidvalidity=selected.uidvalidity, uid=m.uid,
                       flags=list(m.flags)) for m in found],
        ignore_conflicts=True)
    return _locations_by_folder(email)


def _marked_folders(email: Email) -> set[str]:
    """The folders where every copy of the mail is flagged \\Deleted (another mail program's
    delete or move without expunge: RFC 3501 2.3.2, waiting for its expunge). The mail is
    not in such a folder (``selectors.email_folders``): a move or a delete must neither
    count it as a place the mail already is nor act through it (a \\Deleted copy keeps its
    mark when moved, RFC 6851 3.3, so that program's next expunge erases it)."""
    live: set[str] = set()
    marked: set[str] = set()
    for name, flags in email.locations.values_list("folder__name", "flags"):
        (marked if "\\Deleted" in (flags or []) else live).add(name)
    return marked - live


def _live_first(places: dict[str, list[int]], marked: set[str]) -> dict[str, list[int]]:
    """``places`` with the folders holding a live copy first: the one copy that moves (to
    the target, to the Trash) is the first one acted on."""
    return dict(sorted(places.items(), key=lambda item: item[0] in marked))


def _select_same_uids(session, mailbox: Mailbox, name: str, uids: list[int]):  # noqa: ANN001, ANN201
    """Select a folder to change messages in it, but only if our UIDs still mean the same
    messages and are still there. After a UIDVALIDITY change they may name other mails,
    which a delete or move would then hit (RFC 3501 2.3.1.1); a mail another mail program
    moved or deleted meanwhile is no longer under its UID, and a STORE, MOVE or EXPUNGE of
    a missing UID is a silent no-op on the server (the CRM would then record a change that
    never happened). In these cases nothing is done, a sync is queued and the user is told."""
    try:
        selected = session.select(name, readonly=False)
    except MailProtocolError:
        if name in {folder for folder, _ in session.list_folders()}:
            raise
        _queue_sync(mailbox)
        raise MailboxOutOfDate(
            f"The folder {name!r} is no longer on the server (renamed or deleted in another mail program).",
            hint="A sync has started; try again in a moment.",
        ) from None
    known = MailFolder.objects.filter(mailbox=mailbox, name=name).values_list(
        "uidvalidity", flat=True).first()
    if known != selected.uidvalidity:
        _queue_sync(mailbox)
        raise MailboxOutOfDate(
            f"The folder {name!r} changed on the server since the last sync.",
            hint="A sync has started; try again in a moment.",
        )
    if len(session.missing_still_there(uids)) != len(set(uids)):
        _queue_sync(mailbox)
        raise MailboxOutOfDate(
            "This mail was moved or deleted on the server (in another mail program) since the last sync.",
            hint="A sync has started; try again in a moment.",
        )
    return selected


def _check_every_place(session, mailbox: Mailbox,  # noqa: ANN001
                       places: dict[str, list[int]]) -> None:
    """A mail in several folders: every copy is checked (``_select_same_uids``) before any is
    changed. Checked folder by folder while acting, a copy another client had removed in
    the second folder was found only after the first copy was moved (to the target, or to
    the Trash): the user was told "nothing was done" while the mail had moved, and a mail
    filed into a folder that is not synced then left the CRM as a tombstone (its new place
    was never recorded). One folder: the action's own check is enough (no extra SELECT)."""
    if len(places) < 2:
        return
    for name, uids in places.items():
        _select_same_uids(session, mailbox, name, uids)


def _server_session(mailbox: Mailbox, *, timeout: float = 20):  # noqa: ANN202
    """A connection for a CRM action; the caller holds the mailbox's connection slot
    (``_one_action_per_email``)."""
    from .protocols.imap import ImapSession

    return ImapSession(server_settings(mailbox, timeout=timeout))


# Advisory lock key space of CRM actions on one email (the first of the two int4 keys).
ACTION_LOCK = 0x4143  # "AC"


def _one_action_per_email(fn):  # noqa: ANN001, ANN202
    """CRM actions on one email run one at a time (across workers): two at once (a move in
    one tab, a delete in another) both acted on the same UID, and the server, which moves
    by COPY + EXPUNGE, kept a copy in each target. The second now reads the places the
    first left and acts there (or is told the mail moved).

    An IMAP mailbox's action then holds the mailbox's one connection besides IDLE for all
    of its work (``ConnectionSlot``; a running sync hands it over after its current batch):
    the mail's places are read once it has it (a place the sync stored meanwhile is acted
    on too, not deleted from the CRM only), and no sync reads the server between the
    action's change there and its record here."""
    @functools.wraps(fn)
    def serialized(*, email: Email, **kwargs: Any):  # noqa: ANN202
        from .sync.lock import connection_slot  # noqa: PLC0415

        turn = (connection_slot(email.mailbox_id, wait=settings.MAILROOM_CONNECTION_WAIT)
                if email.mailbox.protocol == Mailbox.Protocol.IMAP else contextlib.nullcontext())
        if connection.vendor != "postgresql":
            with turn:
                return fn(email=email, **kwargs)
        key = [ACTION_LOCK, email.pk % 2**31]
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", key)
        try:
            with turn:
                return fn(email=email, **kwargs)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s, %s)", key)
    return serialized


@_one_action_per_email
def email_update(*, actor: User, email: Email, seen: bool | None = None,
                 flagged: bool | None = None, folder: str | None = None) -> Email:
    """Mark read/unread, flag/unflag, or move; done on the IMAP server first, then stored.

    POP3 mail has no server copy to change: only the CRM copy changes.
    """
    mailbox = email.mailbox
    _check_mail_owner(actor, mailbox)
    changes = {name: value for name, value in (("\\Seen", seen), ("\\Flagged", flagged))
               if value is not None}
    is_imap = mailbox.protocol == Mailbox.Protocol.IMAP
    if folder is not None:
        folder = folder.strip()
        if not folder:
            raise ValidationError({"folder": ["Choose a folder."]})
        if folder.upper() == "INBOX":  # case-insensitive (RFC 3501 5.1)
            folder = "INBOX"
        if not is_imap:
            raise ValidationError({"folder": ["POP3 mail has no folders on the server to move it to."]})
    places = ((_places_for_action(email) if changes or folder else _locations_by_folder(email))
              if is_imap else {})
    if folder is not None and is_imap and not places:
        # Sent from the CRM (its Sent-folder copy not synced yet) or no longer on the server:
        # nothing would move, and a 200 would say it had.
        raise ValidationError({"folder": ["This mail is not on the mail server, so it cannot be moved."]})
    moves: list[tuple[str, CopiedMessages]] = []
    target_special_use = ""
    modseq_before: dict[str, int | None] = {}
    if places and (changes or folder):
        with _server_session(mailbox) as session:
            if folder:
                server_folders = dict(session.list_folders())
                if folder not in server_folders:
                    raise ValidationError({"folder": [f"There is no folder {folder!r} in this mailbox."]})
                target_special_use = server_folders[folder]
            # One copy goes to the folder (none if it is there already); copies elsewhere are
            # removed: the mail is then in that folder only, as the CRM shows it.
            _check_every_place(session, mailbox, places)
            # A folder holding only \Deleted copies is not where the mail is: counted as
            # there, a move into it kept those copies and removed the live ones elsewhere,
            # so the mail was left for the other program's next expunge to erase. A live
            # copy moves there instead (the \Deleted ones stay, that program's business).
            marked = _marked_folders(email) if folder else set()
            move_one = folder not in places or folder in marked
            if move_one and len(places) > 1:
                # The copy moved is a live one: a copy marked \Deleted in a mail program
                # keeps the mark when moved (RFC 6851 3.3), and the others are removed, so
                # the mail was left only as a copy waiting for that program's expunge.
                places = _live_first(places, marked)
            for name, uids in places.items():
                modseq_before[name] = _select_same_uids(session, mailbox, name, uids).highestmodseq
                add = [flag for flag, on in changes.items() if on]
                remove = [flag for flag, on in changes.items() if not on]
                if add:
                    session.add_flags(uids, add)
                if remove:
                    session.remove_flags(uids, remove)
                if folder and folder != name:
                    if move_one:
                        move_one = False
                        copied = session.move(uids, folder)
                        if copied is not None:
                            moves.append((name, copied))
                    else:
                        session.expunge(uids)
    with transaction.atomic():
        # Only what was asked: a flag a sync recorded meanwhile is not written back over.
        fields = [name for name, value in (("seen", seen), ("flagged", flagged)) if value is not None]
        if seen is not None:
            email.seen = seen
        if flagged is not None:
            email.flagged = flagged
        if fields:
            email.save(update_fields=fields)
        # Locked and read again (not the caller's prefetched copies): two changes of one mail
        # at once (read by one client, flagged by another) would else each write back the
        # flags they read, and one would be lost.
        for location in EmailLocation.objects.select_for_update().filter(email=email).order_by("pk"):
            flags = set(location.flags)
            for flag, on in changes.items():
                (flags.add if on else flags.discard)(flag)
            location.flags = sorted(flags)
            location.save(update_fields=["flags"])
        if folder:
            _record_moves(email=email, folder=folder, special_use=target_special_use, moves=moves)
            email.locations.exclude(folder__name=folder).delete()
            if target_special_use in NEVER_SYNC:
                # Into the Trash or Junk, never synced: the mail leaves the CRM's views (a
                # recoverable tombstone) as the same move in a mail program makes it. Shown
                # there, it was followed in a folder the sync never reads.
                email.deleted_at = timezone.now()
                email.save(update_fields=["deleted_at"])
            elif moves:
                # A sync between the server's MOVE and this write saw the old UID vanish and
                # made the mail a tombstone: it is where the user put it.
                Email.objects.filter(pk=email.pk, deleted_at__isnull=False).update(deleted_at=None)
        if changes and modseq_before:
            # Another client may have changed these flags between our STORE and this write,
            # and a sync meanwhile may have recorded a later mod-sequence: the next sync
            # looks again from before our change (CHANGEDSINCE), not from after it.
            for name, modseq in modseq_before.items():
                folders = MailFolder.objects.filter(mailbox=mailbox, name=name)
                if modseq is not None:
                    folders.filter(highestmodseq__gt=modseq).update(highestmodseq=modseq)
                folders.update(last_exists=None)
            from .sync.ingest import refresh_flags  # noqa: PLC0415

            refresh_flags([email.pk])
            email.refresh_from_db(fields=["seen", "flagged"])
    return email


def opening_marks_read(*, actor: User, email: Email) -> bool:
    """Whether the owner opening this mail in the CRM marks it read: unread, their own, and
    (IMAP) a mailbox that is in use and not waiting for a new password or settings, so that
    opening mail never becomes a series of failed logins at the provider. A colleague
    reading a shared mailbox's mail changes nothing there."""
    mailbox = email.mailbox
    if email.seen or mailbox.owner_id != actor.pk:
        return False
    if mailbox.protocol != Mailbox.Protocol.IMAP:
        return True
    return mailbox.is_active and not (mailbox.state == Mailbox.State.ERROR
                                      and mailbox.last_error_code in Mailbox.USER_ERROR_CODES)


def email_opened(*, actor: User, email: Email) -> bool:
    """The owner opened the mail in the CRM: it is read, in the mailbox too, as a mail
    client marks what is opened (``email_update``: the IMAP server first). Run by the task
    ``mark_opened_read``, off the web request. True when it was marked now."""
    if not opening_marks_read(actor=actor, email=email):
        return False
    email_update(actor=actor, email=email, seen=True)
    return True


def _record_moves(*, email: Email, folder: str, special_use: str,
                  moves: list[tuple[str, CopiedMessages]]) -> None:
    """Store where a moved mail now is, from the server's COPYUID: without it, a mail moved
    to a folder that is not synced had no location left, and later changes (flags, move,
    delete) silently never reached the server. Servers without UIDPLUS: the next sync of
    a synced target finds the mail by fingerprint."""
    if not moves:
        return
    target, _ = MailFolder.objects.get_or_create(
        mailbox=email.mailbox, name=folder,
        defaults={"special_use": special_use, "uidvalidity": moves[0][1].uidvalidity},
    )
    flags = {(loc.folder.name, loc.uid): loc.flags
             for loc in email.locations.select_related("folder")}
    # Recorded under the server's UIDVALIDITY even when the CRM knows the folder under an
    # earlier one (rebuilt on the server since): dropped, the mail had no place at all and
    # in a folder that is not synced was never followed again (shown for good, its actions
    # refused as "not on the server"). Until the sync re-reads the folder the place counts
    # as stale (actions wait for it); that re-read keeps it, as it keeps every place under
    # the folder's new UIDVALIDITY.
    EmailLocation.objects.bulk_create(
        [EmailLocation(email=email, folder=target, uidvalidity=copied.uidvalidity, uid=new_uid,
                       flags=flags.get((source, old_uid), []))
         for source, copied in moves
         for old_uid, new_uid in copied.uids.items()],
        ignore_conflicts=True,
    )


@_one_action_per_email
def email_delete(*, actor: User, email: Email) -> str:
    """Delete: to the server's Trash for IMAP; in the CRM a recoverable tombstone. Returns
    what happened on the server: "trash" (one copy moved there, other copies removed),
    "expunged" (no Trash, or it was in the Trash already: deleted for good) or "crm" (POP3
    mail, or mail not on the server: the CRM only)."""
    mailbox = email.mailbox
    _check_mail_owner(actor, mailbox)
    places = _places_for_action(email) if mailbox.protocol == Mailbox.Protocol.IMAP else {}
    outcome = "crm"
    if places:
        # The copy that goes to the Trash is a live one: a \Deleted copy moved there keeps
        # its mark (RFC 6851 3.3) while the live ones are expunged, so the mail "in the
        # Trash" was only a copy the other mail program's next expunge erases.
        places = _live_first(places, _marked_folders(email))
        with _server_session(mailbox) as session:
            trash = session.trash_folder()
            to_trash = bool(trash) and trash not in places
            outcome = "trash" if to_trash else "expunged"
            _check_every_place(session, mailbox, places)
            for name, uids in places.items():
                _select_same_uids(session, mailbox, name, uids)
                if to_trash:
                    to_trash = False
                    session.move(uids, trash)
                else:
                    # Another copy went to the Trash, or there is none (or it was in it
                    # already): deleted for good, or a later UIDVALIDITY re-map would bring
                    # the mail back.
                    session.expunge(uids)
    with transaction.atomic():
        email.locations.all().delete()
        Email.objects.filter(pk=email.pk).update(deleted_at=timezone.now())
    return outcome


def mailbox_retry_failed(*, actor: User, mailbox: Mailbox) -> dict[str, object]:
    """Retry what failed: messages that could not be stored (fetched again from the server)
    and mails whose body could not be parsed (parsed again from the stored source).

    ``refetch_paused_until``: set when the provider's daily download limit stopped the
    fetching again (what was not fetched keeps its error; Retry works again from then);
    the bodies are parsed again all the same (nothing is downloaded for them)."""
    from .models import MessageError
    from .sync.base import BudgetExhausted

    # POP3: from the raw bytes kept with the error (the server may no longer have them).
    if mailbox.protocol == Mailbox.Protocol.POP3:
        from .sync.pop3 import retry_message_errors
    else:
        from .sync.imap import retry_message_errors

    _check_owner(actor, mailbox)
    refetched, paused_until = 0, None
    if MessageError.objects.filter(mailbox=mailbox, resolved_at__isnull=True).exists():
        try:
            refetched = retry_message_errors(mailbox=mailbox)
        except BudgetExhausted as paused:  # (IMAP: POP3 retries from the bytes it kept)
            refetched, paused_until = getattr(paused, "stored", 0), paused.until
    reparsed = Email.objects.filter(mailbox=mailbox, parse_state=Email.ParseState.FAILED).update(
        parse_state=Email.ParseState.PENDING, parse_error=""
    )
    while emails_parse_pending(mailbox_id=mailbox.pk):
        pass
    return {"refetched": refetched, "reparsed": reparsed, "refetch_paused_until": paused_until}


def emails_purge_tombstones(*, older_than_days: int) -> int:
    """Delete for good the mails deleted on the server more than N days ago."""
    cutoff = timezone.now() - timedelta(days=older_than_days)
    old = Email.objects.filter(deleted_at__lt=cutoff)
    # Not a mail hidden because its copies are marked \Deleted in a mail program: it is
    # still on the server, and back when the mark is taken off (purged, its place went
    # with it and the sync, past its UID, never looked at it again).
    if connection.vendor == "postgresql":
        old = old.exclude(Exists(EmailLocation.objects.filter(
            email=OuterRef("pk"), flags__contains=["\\Deleted"])))
    else:  # SQLite has no JSON "contains": the same rule in Python
        old = old.exclude(pk__in=[email_id for email_id, flags in EmailLocation.objects.filter(
            email__in=old).values_list("email_id", "flags") if "\\Deleted" in (flags or [])])
    _, deleted = old.delete()
    return deleted.get(Email._meta.label, 0)  # the mails, not their places and links too
