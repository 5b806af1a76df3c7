"""Read-side queries over mailboxes and emails, with the sharing rules.

- The owner of a mailbox sees all its mail (linked to records or not).
- Others see mail of *public* mailboxes that is linked to a record they can see, unless a
  participant belongs to one of the mailbox's excluded domains.
- Mail of private mailboxes is seen by its owner only. Tombstones (deleted on the server)
  are in no view.
- A link to a record that matched only by a Bcc address (``EmailLink.bcc_only``) exists for
  the mailbox's owner alone: for others the mail is not on that record, its links do not
  name it, and it does not make the mail visible (it would tell them who got a blind copy).
- A copy marked \\Deleted on the server (not expunged yet) is no place the mail shows from:
  not among its folders, not found by folder.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone

from django.db import connection
from django.db.models import Count, Exists, F, Max, Min, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from crm.models import Contact, Deal, Lead, User
from crm.selectors import records_visible_to

from .models import Email, EmailLink, EmailLocation, Mailbox, Thread


def mailboxes_of(user: User) -> QuerySet[Mailbox]:
    return Mailbox.objects.filter(owner=user)


def emails_visible_to(user: User) -> QuerySet[Email]:
    if not user.is_authenticated or not user.is_active:
        return Email.objects.none()
    linked_visible = EmailLink.objects.filter(email=OuterRef("pk"), bcc_only=False).filter(
        Q(lead__in=records_visible_to(user, Lead.objects.all()))
        | Q(contact__in=records_visible_to(user, Contact.objects.all()))
        | Q(deal__in=records_visible_to(user, Deal.objects.all()))
    )
    shared = Q(mailbox__sharing=Mailbox.Sharing.PUBLIC, shareable=True) & Exists(linked_visible)
    return Email.objects.filter(deleted_at__isnull=True).filter(Q(mailbox__owner=user) | shared)


def emails_of_record(*, user: User, record: Lead | Contact | Deal) -> QuerySet[Email]:
    """The record's mail the user may see, each message once: the same mail synced from two
    mailboxes (a personal and a shared one) has one fingerprint and is listed once."""
    field = {Lead: "lead", Contact: "contact", Deal: "deal"}[type(record)]
    linked = emails_linked_to(user=user, emails=emails_visible_to(user), field=field, records=[record.pk])
    return Email.objects.filter(pk__in=_first_of_each_message(user=user, emails=linked))


def emails_linked_to(*, user: User, emails: QuerySet[Email], field: str,
                     records: Iterable[int] | QuerySet) -> QuerySet[Email]:
    """``emails`` on one of these records (``field`` "lead", "contact" or "deal"; ids, or a
    query of ids), as ``user`` sees the links: a Bcc-only link is the mailbox owner's alone."""
    links = EmailLink.objects.filter(email=OuterRef("pk"), **{f"{field}__in": records})
    return emails.filter(Exists(links.filter(bcc_only=False)) | (Q(mailbox__owner=user) & Exists(links)))


def email_links_seen_by(*, user: User, email: Email, links: list[EmailLink]) -> list[EmailLink]:
    """The links of ``email`` (all of them, loaded) ``user`` may know of, before the
    records' own visibility: a Bcc-only link only to the mailbox's owner."""
    if email.mailbox.owner_id == user.pk:
        return links
    return [link for link in links if not link.bcc_only]


def email_folders(locations: Iterable[EmailLocation]) -> list[str]:
    """The folders a mail is in, from its locations (with their folders): not a copy
    marked \\Deleted (RFC 3501 2.3.2: deleted, waiting for an expunge), which is no place
    it shows from (``sync.ingest.tombstone_placeless``)."""
    return sorted({loc.folder.name for loc in locations if "\\Deleted" not in (loc.flags or [])})


def emails_in_folder(*, emails: QuerySet[Email], folder: str) -> QuerySet[Email]:
    """``emails`` with a copy in ``folder`` that is not marked \\Deleted."""
    places = EmailLocation.objects.filter(email=OuterRef("pk"), folder__name=folder)
    if connection.vendor == "postgresql":
        return emails.filter(Exists(places.exclude(flags__contains=["\\Deleted"])))
    # SQLite (the embedded default) has no JSON "contains": the same rule in Python.
    live = {email_id for email_id, flags in EmailLocation.objects.filter(
        email__in=emails.values("pk"), folder__name=folder).values_list("email_id", "flags")
        if "\\Deleted" not in (flags or [])}
    return emails.filter(pk__in=live)


def emails_one_per_message(*, user: User, emails: QuerySet[Email]) -> QuerySet[Email]:
    """``emails`` with each message once, as a record's page lists it (``emails_of_record``):
    copies of one mail in several mailboxes (two colleagues' public mailboxes, or two of the
    user's own) share a fingerprint. Keeps the order, filters and prefetches of ``emails``."""
    return emails.filter(pk__in=_first_of_each_message(user=user, emails=emails))


def _first_of_each_message(*, user: User, emails: QuerySet[Email]) -> QuerySet:
    # The viewer's own copy where there is one (their read state, and one they may act on).
    return emails.order_by().values("fingerprint").annotate(
        first=Coalesce(Min("pk", filter=Q(mailbox__owner=user)), Min("pk"))).values("first")


def mailbox_holdings(*, mailbox: Mailbox) -> tuple[int, int]:
    """How many emails the mailbox holds in the CRM, and how many of them are on records."""
    emails = Email.objects.filter(mailbox=mailbox)
    count = emails.count()
    return count, (emails.filter(links__isnull=False).distinct().count() if count else 0)


def mailbox_status(*, mailbox: Mailbox) -> dict[str, object]:
    """What the status panel and the API show: state, progress, estimate, errors."""
    from .models import MessageError

    # The lock is read before the state, and again after it: a sync sets its end state before
    # it lets go of the lock, and takes the lock before it says "syncing". Read the other way
    # round, a sync ending between the two reads showed as "Interrupted".
    running = _sync_running(mailbox.pk)
    mailbox.refresh_from_db()
    eta = None
    interrupted = (mailbox.state == Mailbox.State.SYNCING and not running
                   and not _sync_running(mailbox.pk))
    if (mailbox.state == Mailbox.State.SYNCING and not interrupted and mailbox.sync_started_at
            and mailbox.bytes_done):
        elapsed = (timezone.now() - mailbox.sync_started_at).total_seconds()
        remaining = max(mailbox.bytes_total - mailbox.bytes_done, 0)
        eta = _estimate(mailbox, remaining, mailbox.bytes_done / max(elapsed, 0.001))
    errors = MessageError.objects.filter(mailbox=mailbox, resolved_at__isnull=True).order_by("-created_at")
    return {
        "state": mailbox.state,
        "state_display": mailbox.get_state_display(),
        "messages_done": mailbox.messages_done,
        "messages_total": mailbox.messages_total,
        "bytes_done": mailbox.bytes_done,
        "bytes_total": mailbox.bytes_total,
        "estimated_completion": eta,
        "last_sync_at": mailbox.last_sync_at,
        "paused_until": mailbox.paused_until,
        "last_error": mailbox.last_error,
        "last_error_code": mailbox.last_error_code,
        # The state says "syncing" but no run holds the mailbox's lock: the worker stopped
        # (restarted, killed); the next check (within 5 minutes) resumes where it stopped.
        "interrupted": interrupted,
        # An error the user must fix (password, TLS, settings), or one retried by itself.
        "needs_user": mailbox.state == Mailbox.State.ERROR and mailbox.last_error_code in Mailbox.USER_ERROR_CODES,
        "emails_stored": Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True).count(),
        "message_errors": [
            {"id": e.pk, "folder": e.folder.name if e.folder else "", "uid": e.uid,
             "error": e.error, "created_at": e.created_at}
            for e in errors.select_related("folder")[:100]
        ],
        "emails_unparsed": Email.objects.filter(mailbox=mailbox, parse_state=Email.ParseState.FAILED).count(),
    }


def _estimate(mailbox: Mailbox, remaining: int, rate: float) -> datetime:
    """When ``remaining`` bytes are downloaded at ``rate`` bytes a second, within the
    provider's daily budget: what is over today's share of older mail waits for the next
    days (the budget resets at midnight UTC). Without it, a 10 GB Gmail mailbox
    said "in 1.5 hours" for a download of four days."""
    from .providers import preset_for
    from .sync.base import OLDER_MAIL_SHARE

    now = timezone.now()
    budget = preset_for(mailbox.provider).daily_download_bytes
    share = int(budget * OLDER_MAIL_SHARE) if budget else 0
    used = mailbox.budget_bytes_used if mailbox.budget_day == now.date() else 0
    today_left = max(share - used, 0)
    if not share or remaining <= today_left:
        return now + timedelta(seconds=remaining / rate)
    rest = remaining - today_left
    days = -(-rest // share)  # whole days after today that download older mail
    last_day = datetime.combine(now.date() + timedelta(days=days), time.min, tzinfo=dt_timezone.utc)
    return last_day + timedelta(seconds=(rest - (days - 1) * share) / rate)


def _sync_running(mailbox_id: int) -> bool:
    """Whether a sync run holds the mailbox's lock now (sync/lock.py). Read from pg_locks,
    never by taking the lock: a try-lock would make a sync starting at that moment fail as
    busy, and would succeed from the session that holds it (advisory locks are re-entrant)."""
    from django.db import connection

    from .sync.lock import LOCK_NAMESPACE

    if connection.vendor != "postgresql":
        from .sync.lock import lease_alive

        return lease_alive(mailbox_id)  # the embedded default's lease
    with connection.cursor() as cursor:
        # A two-key advisory lock is (classid, objid) with objsubid 2.
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s AND objid = %s AND objsubid = 2 AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()))",
            [LOCK_NAMESPACE, mailbox_id])
        return bool(cursor.fetchone()[0])


# -- pages: the Emails related list and the mailbox view -------------------------------------

# The view pick-list of the Emails related list.
EMAIL_VIEWS: dict[str, tuple[str, Q]] = {
    "all": ("All", Q()),
    "received": ("Received", Q(direction=Email.Direction.RECEIVED)),
    "sent": ("Sent", Q(direction=Email.Direction.SENT)),
    "bcc": ("BCC Dropbox", Q(source=Email.Source.BCC_DROPBOX)),
}


def _grouped(emails: QuerySet[Email]) -> QuerySet[Email]:
    # Threads belong to a mailbox; one conversation synced from two mailboxes (a personal and
    # a shared one) has a thread in each, under the same key (its root Message-ID): the group
    # is the first thread with that key. A mail outside any thread is a group of its own
    # (negative key: never a thread id).
    same_key = Thread.objects.filter(key=OuterRef("thread__key")).order_by("pk").values("pk")[:1]
    return emails.annotate(group=Coalesce(Subquery(same_key), -F("pk")))


def record_email_groups(*, user: User, record: Lead | Contact | Deal, view: str = "all"):  # noqa: ANN201
    """Threads of the record's mail in one view, newest first: rows of ``group`` (key),
    ``last`` (latest date), ``count`` and ``unread``. Page over this, then load the mails
    of one page with ``emails_of_groups`` (two queries whatever the record's size)."""
    condition = EMAIL_VIEWS.get(view, EMAIL_VIEWS["all"])[1]
    emails = emails_of_record(user=user, record=record).filter(condition)
    return (
        _grouped(emails).order_by().values("group")
        .annotate(last=Max("date"), count=Count("pk"), unread=Count("pk", filter=Q(seen=False)))
        .order_by(F("last").desc(nulls_last=True), "-group")
    )


def emails_of_groups(*, user: User, record: Lead | Contact | Deal, view: str,
                     groups: list[int]) -> QuerySet[Email]:
    condition = EMAIL_VIEWS.get(view, EMAIL_VIEWS["all"])[1]
    return (
        _grouped(emails_of_record(user=user, record=record).filter(condition))
        .filter(group__in=groups).select_related("mailbox")
        .order_by(F("date").desc(nulls_last=True), "-pk")
    )


def emails_unmatched(*, user: User, mailbox: Mailbox | None = None) -> QuerySet[Email]:
    """The user's synced mail that is linked to no lead, contact or deal, newest first."""
    emails = Email.objects.filter(
        mailbox__owner=user, deleted_at__isnull=True, source=Email.Source.SYNC,
    ).exclude(Exists(EmailLink.objects.filter(email=OuterRef("pk"))))
    if mailbox is not None:
        emails = emails.filter(mailbox=mailbox)
    return emails.select_related("mailbox").order_by(F("date").desc(nulls_last=True), "-pk")
