"""Store a batch of fetched messages idempotently and advance the folder's cursor with them.

Only the header block is parsed here (what association and threading need); bodies and
attachments are parsed later by ``mailsync.services.emails_parse_pending`` so that full MIME
parsing, about six times the cost of the fetch, stays off the sync's hot path.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from ..association import email_links_insert, emails_associate
from ..mime import Address, Envelope
from ..models import (
    Email,
    EmailLocation,
    EmailParticipant,
    MailboxAlias,
    MailFolder,
    Mailbox,
    MessageError,
    Thread,
)
from ..protocols.base import FetchedMessage
from ..bulk import copy_rows, insert_rows, rows_where_in
from .copy import begin_sources, write_sources
from .prepare import Prepared, prepare

log = logging.getLogger(__name__)

__all__ = ["Prepared", "ingest_batch", "prepare"]


def _clean(value: str, limit: int) -> str:
    # PostgreSQL text rejects NUL bytes.
    return value.replace("\x00", "")[:limit]


def thread_key(envelope: Envelope, fp: str) -> str:
    """The root of the conversation: RFC 5322 3.6.4 puts the root first in References."""
    if envelope.references:
        return envelope.references[0]
    if envelope.in_reply_to:
        # Several ids: the last is the parent; RFC 822-era phrases put the author first.
        return envelope.in_reply_to[-1]
    return envelope.message_id or f"fp:{fp}"


def _addresses(addresses: Sequence[Address]) -> list[dict[str, str]]:
    return [{"name": _clean(a.name, 200), "email": _clean(a.email, 320)} for a in addresses[:200]]


def _direction(mailbox: Mailbox, folder: MailFolder, envelope: Envelope) -> str:
    own = mailbox.email_address.lower()
    if folder.special_use == "sent" or any(a.key == own for a in envelope.from_):
        return Email.Direction.SENT
    return Email.Direction.RECEIVED


def shareable(envelope: Envelope, excluded_domains: set[str]) -> bool:
    if not excluded_domains:
        return True
    for address in (*envelope.from_, *envelope.to, *envelope.cc, *envelope.bcc, *envelope.reply_to):
        if _excluded(sharing_domain(address), excluded_domains):
            return False
    return True


def sharing_domain(address: Address) -> str:
    """The domain an excluded-domains list is checked against: the matching key's, else
    (an address the key rules find implausible, such as "a b@bank.example") what follows
    the last "@" as written; brackets ("x@[bank.example]") and trailing dots stripped. An
    implausible address matches no record, but its mail may still be linked through another
    participant: it must not slip past the list (services._emails_reshare: the same rule
    over stored mail)."""
    written = address.key or address.email.strip().lower()
    return written.rpartition("@")[2].strip(SHARING_DOMAIN_STRIP) if "@" in written else ""


# What may wrap or end the domain of an address written oddly: "x@[bank.example]", a
# trailing dot, a stray quote or bracket.
SHARING_DOMAIN_STRIP = " \t<>[].\"'"


def _excluded(domain: str, excluded_domains: set[str]) -> bool:
    return bool(domain) and any(domain == d or domain.endswith("." + d) for d in excluded_domains)


# The Email fields the sync sets (every other one takes its default): see _email_row.
EMAIL_FIELDS = (
    "mailbox", "fingerprint", "message_id", "content_hash", "in_reply_to", "references",
    "thread", "subject", "date", "from_name", "from_address", "to", "cc", "direction", "size",
    "seen", "flagged", "shareable", "truncated",
)


@dataclass
class NewEmail:
    """An email about to be inserted: what threading needs, and its row (EMAIL_FIELDS)."""

    fingerprint: str
    message_id: str
    subject: str
    date: object
    prepared: Prepared
    row: list
    thread: Thread | None = None
    pk: int | None = None


def _new_email(mailbox: Mailbox, folder: MailFolder, p: Prepared, excluded_domains: set[str]) -> NewEmail:
    env, flags = p.envelope, p.message.flags
    sender = env.from_[0] if env.from_ else None
    message_id = _clean(env.message_id or "", 1000)
    subject = _clean(env.subject, 1000)
    date = env.date or p.message.internal_date
    row = [
        mailbox.pk, p.fingerprint, message_id, p.content_hash,
        _clean(env.in_reply_to[-1] if env.in_reply_to else "", 1000),
        [_clean(r, 1000) for r in env.references],
        None,  # the thread, set by _threads_for
        subject, date,
        _clean(sender.name, 500) if sender else "",
        _clean(sender.email, 500) if sender else "",
        _addresses(env.to), _addresses(env.cc),
        _direction(mailbox, folder, env),
        min(p.message.size, 2**31 - 1),  # a 32-bit column; a server may claim anything
        "\\Seen" in flags, "\\Flagged" in flags,
        shareable(env, excluded_domains),
        p.message.truncated,
    ]
    return NewEmail(p.fingerprint, message_id, subject, date, p, row)


def _participant_rows(email_id: int, env: Envelope) -> list[tuple[int, str, str, str]]:
    """(email, role, name, address) of each distinct address per role."""
    rows = []
    for role, addresses in (("from", env.from_), ("to", env.to), ("cc", env.cc),
                            ("bcc", env.bcc), ("reply_to", env.reply_to)):
        seen: set[str] = set()
        for address in addresses[:500]:
            if address.key and address.key not in seen:
                seen.add(address.key)
                rows.append((email_id, role, _clean(address.name, 500), _clean(address.key, 500)))
    return rows


def _participants(email: Email, env: Envelope) -> list[EmailParticipant]:
    return [EmailParticipant(email=email, role=role, name=name, address=address)
            for _, role, name, address in _participant_rows(email.pk, env)]


def _parents(envelope: Envelope) -> list[str]:
    """The ids of the mail this one answers: In-Reply-To, and the last of References (RFC
    5322 3.6.4: the parent; the root, References' first, is the thread key anyway)."""
    return [i for i in (*envelope.in_reply_to, *envelope.references[-1:]) if i]


def _threads_for(mailbox: Mailbox, emails: list[tuple[Email, Envelope]]) -> dict[str, Thread]:
    """Find or create the threads of new mails (before they are inserted, so thread_id goes
    in with the row): three queries per batch whatever its size.

    A mail that answers a stored mail joins that mail's thread: a reply with only
    In-Reply-To to a reply would otherwise be keyed by its parent's id and start a thread of
    its own. Else the thread is keyed by the conversation's root id."""
    quoted = {_clean(i, 1000) for _, env in emails for i in _parents(env)}
    stored: dict[str, int] = {}
    for message_id, thread_id in rows_where_in(Email, ("message_id", "thread"),
                                               where={"mailbox": mailbox.pk},
                                               field="message_id", values=quoted):
        if thread_id is not None:
            stored.setdefault(message_id, thread_id)
    joined: dict[int, Thread] = {
        pk: Thread(id=pk, mailbox_id=mailbox.pk, key=key, subject=subject, last_date=last_date)
        for pk, key, subject, last_date in rows_where_in(
            Thread, ("id", "key", "subject", "last_date"), where={"mailbox": mailbox.pk},
            field="id", values=set(stored.values()))
    }
    rest: list[tuple[Email, Envelope]] = []
    for email, env in emails:
        ids = (_clean(i, 1000) for i in _parents(env))
        thread_id = next((stored[i] for i in ids if i in stored and stored[i] in joined), None)
        if thread_id is None:
            rest.append((email, env))
        else:
            email.thread = joined[thread_id]
    threads = {t.key: t for t in joined.values()}
    emails = rest
    if not emails:
        return threads
    keys = {_clean(thread_key(env, email.fingerprint), 1000) for email, env in emails}
    insert_rows(Thread, ("mailbox", "key"), [(mailbox.pk, k) for k in sorted(keys)],
                ignore_conflicts=True)
    threads.update({
        key: Thread(id=pk, mailbox_id=mailbox.pk, key=key, subject=subject, last_date=last_date)
        for pk, key, subject, last_date in rows_where_in(
            Thread, ("id", "key", "subject", "last_date"), where={"mailbox": mailbox.pk},
            field="key", values=keys)
    })
    for email, env in emails:
        email.thread = threads[_clean(thread_key(env, email.fingerprint), 1000)]
    return threads


def _finish_threads(mailbox: Mailbox, emails: list[Email], threads: dict[str, Thread]) -> None:
    # Healing: replies that arrived before their parent started a thread keyed by the
    # parent's id; the parent knows the real root, so those replies join it.
    healing = {email.message_id: email.thread for email in emails
               if email.message_id and email.thread and email.thread.key != email.message_id}
    if healing:
        # A thread keyed by the id that already holds a mail with that id is no orphan: that
        # mail is its root, and the new one is another mail reusing the id (a broken client).
        # Merging would pull a whole unrelated conversation in.
        claimed = set(rows_where_in(Email, ("thread", "message_id"), where={"mailbox": mailbox.pk},
                                    field="message_id", values=healing.keys()))
        merge: dict[int, Thread] = {}
        for orphan_id, key in rows_where_in(Thread, ("id", "key"), where={"mailbox": mailbox.pk},
                                            field="key", values=healing.keys()):
            if orphan_id != healing[key].pk and (orphan_id, key) not in claimed:
                merge[orphan_id] = healing[key]

        def final(thread: Thread) -> Thread:
            # A chain of replies in one batch (only In-Reply-To): the thread a reply joins
            # may itself be merged into another; follow to the one that stays.
            seen: set[int] = set()
            while thread.pk in merge and thread.pk not in seen:
                seen.add(thread.pk)
                thread = merge[thread.pk]
            return thread

        moves = []
        for orphan_id, root in merge.items():
            target = final(root)
            if target.pk != orphan_id:  # (a cycle keeps one of its threads)
                moves.append((orphan_id, target.pk))
        _move_thread_mails(moves)
        gone = [orphan_id for orphan_id, _ in moves]
        Thread.objects.filter(pk__in=gone).delete()
        for email in emails:
            if email.thread is not None and email.thread.pk in gone:
                email.thread = final(email.thread)
    changed = []
    for email in emails:
        thread = email.thread
        if thread is not None and email.date and (thread.last_date is None or email.date > thread.last_date):
            thread.last_date, thread.subject = email.date, email.subject
            changed.append(thread)
    if changed:
        _update_thread_dates(list({t.pk: t for t in changed}.values()))


def _move_thread_mails(moves: list[tuple[int, int]]) -> None:
    """The mails of each (thread, into) pair moved into the other thread: one ``UPDATE ...
    FROM (VALUES ...)`` per 1,000 pairs on PostgreSQL. One UPDATE per thread was 2,500
    statements for 5,000 mails whose replies name only their parent (tests: scale)."""
    if not moves:
        return
    if connection.vendor != "postgresql":
        for orphan_id, target_id in moves:
            Email.objects.filter(thread_id=orphan_id).update(thread_id=target_id)
        return
    table = connection.ops.quote_name(Email._meta.db_table)
    with connection.cursor() as cursor:
        for start in range(0, len(moves), 1000):
            chunk = moves[start:start + 1000]
            cursor.execute(
                f"UPDATE {table} AS e SET thread_id = v.target FROM (VALUES "
                + ", ".join(["(%s::bigint, %s::bigint)"] * len(chunk))
                + ") AS v(orphan, target) WHERE e.thread_id = v.orphan",
                [value for pair in chunk for value in pair],
            )


def _update_thread_dates(threads: list[Thread]) -> None:
    """One ``UPDATE ... FROM (VALUES ...)`` per 1,000 threads on PostgreSQL. Django's
    bulk_update builds a CASE expression per row and field: measured on the POP3 bench it
    took ~12 % of the sync (bench/pop3_sync.py)."""
    if connection.vendor != "postgresql":
        Thread.objects.bulk_update(threads, ["last_date", "subject"], batch_size=500)
        return
    table = connection.ops.quote_name(Thread._meta.db_table)
    with connection.cursor() as cursor:
        for start in range(0, len(threads), 1000):
            chunk = threads[start:start + 1000]
            rows = ", ".join(["(%s, %s::timestamptz, %s)"] * len(chunk))
            cursor.execute(
                f"UPDATE {table} AS t SET last_date = v.last_date, subject = v.subject "
                f"FROM (VALUES {rows}) AS v(id, last_date, subject) WHERE t.id = v.id",
                [value for t in chunk for value in (t.pk, t.last_date, t.subject)],
            )


def assign_threads(mailbox: Mailbox, emails: list[tuple[Email, Envelope]]) -> None:
    """Put mails that are already saved (e.g. composed in the CRM) in their threads."""
    threads = _threads_for(mailbox, emails)
    for email, _ in emails:
        Email.objects.filter(pk=email.pk).update(thread=email.thread)
    _finish_threads(mailbox, [email for email, _ in emails], threads)


_assign_threads = assign_threads  # the name mailsync.sending imports


@dataclass
class BatchResult:
    stored: int = 0      # new Email rows
    located: int = 0     # new locations (a known mail found in another place)
    failed: int = 0
    bytes: int = 0       # progress: the messages' sizes (as counted in the run's totals)
    downloaded: int = 0  # the provider's daily budget: what came over the wire (headers only
    #                      of a message over the size limit)


def ingest_batch(
    *,
    mailbox: Mailbox,
    folder: MailFolder,
    uidvalidity: int,
    messages: Sequence[FetchedMessage] = (),
    advance_cursor: Callable[[MailFolder], None],
    prepared: Sequence[Prepared] | None = None,
    durable: bool = True,
    undelete: bool = True,
    progress: bool = True,
) -> BatchResult:
    """Store ``messages`` and, in the same transaction, advance the cursor.

    If the batch cannot be stored as a whole, messages are stored one by one and those that
    still fail are kept as raw bytes in ``MessageError`` (the sync goes on without them).

    ``durable=False`` (IMAP): the COMMIT does not wait for the WAL flush. A crash of
    PostgreSQL may then lose the last batches, but always together with the cursor that
    was advanced in the same transaction, and the mail is still on the server: the next run
    fetches it again. POP3 must not use it: a DELE follows the commit.

    ``undelete`` (IMAP): a known mail found again on the server (moved back from the Trash)
    is no longer a tombstone. POP3 passes False: a copy downloaded again (a second delivery,
    a server that renumbered its UIDLs) must not bring back mail deleted in the CRM.

    ``progress=False`` (Retry, outside a sync run): the run's done counts are left as they
    are (they would pass its totals); the daily budget is charged all the same.
    """
    if prepared is None:
        prepared = [prepare(m) for m in messages]
    try:
        with transaction.atomic():
            _commit_mode(durable)
            result = _store(mailbox, folder, uidvalidity, prepared, undelete)
            _finish(mailbox, folder, advance_cursor, result, progress)
            return result
    except (IntegrityError, DataError, ValueError) as exc:
        log.warning("mailbox %s: batch failed (%s); storing one by one", mailbox.pk, type(exc).__name__)
    result = BatchResult()
    for p in prepared:
        try:
            with transaction.atomic():
                _commit_mode(durable)
                one = _store(mailbox, folder, uidvalidity, [p], undelete)
            result.stored += one.stored
            result.located += one.located
            result.bytes += one.bytes
            result.downloaded += one.downloaded
        except (IntegrityError, DataError, ValueError) as exc:
            result.failed += 1
            result.bytes += p.message.size
            result.downloaded += _downloaded(p)
            MessageError.objects.update_or_create(
                folder=folder, uidvalidity=uidvalidity, uid=p.message.uid, resolved_at=None,
                defaults={"mailbox": mailbox, "error": f"Could not store this message: {exc}"[:2000],
                          "raw": p.compressed},
            )
    with transaction.atomic():
        _finish(mailbox, folder, advance_cursor, result, progress)
    return result


def _commit_mode(durable: bool) -> None:
    if not durable and connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _finish(mailbox: Mailbox, folder: MailFolder, advance_cursor: Callable[[MailFolder], None],
            result: BatchResult, progress: bool = True) -> None:
    advance_cursor(folder)
    folder.save()
    counts: dict[str, object] = {"budget_bytes_used": F("budget_bytes_used") + result.downloaded}
    if progress:
        counts.update(messages_done=F("messages_done") + result.stored + result.located + result.failed,
                      bytes_done=F("bytes_done") + result.bytes)
    Mailbox.objects.filter(pk=mailbox.pk).update(**counts)


def _downloaded(p: Prepared) -> int:
    return p.raw_size if p.message.truncated else p.message.size


def _store(mailbox: Mailbox, folder: MailFolder, uidvalidity: int,
           prepared: Sequence[Prepared], undelete: bool = True) -> BatchResult:
    result = BatchResult(bytes=sum(p.message.size for p in prepared),
                         downloaded=sum(_downloaded(p) for p in prepared))
    existing = dict(rows_where_in(Email, ("fingerprint", "id"), where={"mailbox": mailbox.pk},
                                  field="fingerprint", values={p.fingerprint for p in prepared}))
    new: dict[str, NewEmail] = {}
    # In every batch, first: the mailbox row is then always locked before any email row
    # (a settings save locks them in that order too).
    excluded = _excluded_domains_now(mailbox)
    for p in prepared:
        if p.fingerprint not in existing and p.fingerprint not in new:
            new[p.fingerprint] = _new_email(mailbox, folder, p, excluded)
    created = list(new.values())
    # The sources go to disk (a thread) while the rows below are inserted.
    # _store runs inside the batch's transaction: an error out of here rolls it back, so
    # no committed row will name the pack.
    sources = begin_sources([(e.prepared.compressed, e.prepared.raw_size) for e in created])
    try:
        result = _store_rows(mailbox, folder, uidvalidity, prepared, undelete, result, existing, created)
        sources.finish([e.pk for e in created])
    except BaseException:
        sources.discard()
        raise
    return result


def _excluded_domains_now(mailbox: Mailbox) -> set[str]:
    """The mailbox's excluded domains as they are now, its row locked until the batch
    commits. Not the run's copy, read when the sync began: a domain excluded during an
    hour-long first sync applies to the batches after it, and a change saved while this
    batch is stored waits for it, then reshares it with the rest (services._emails_reshare).
    Before, mail from a domain excluded mid-sync was still shared when stored later."""
    current = (Mailbox.objects.select_for_update(no_key=True).filter(pk=mailbox.pk)
               .values_list("excluded_domains", flat=True).first())
    return Mailbox(excluded_domains=current or "").excluded_domain_set


def _store_rows(mailbox: Mailbox, folder: MailFolder, uidvalidity: int,
                prepared: Sequence[Prepared], undelete: bool, result: BatchResult,
                existing: dict[str, int], created: list[NewEmail]) -> BatchResult:
    if created:
        threads = _threads_for(mailbox, [(e, e.prepared.envelope) for e in created])
        thread_at = EMAIL_FIELDS.index("thread")
        for e in created:
            e.row[thread_at] = e.thread.pk if e.thread else None
        ids = copy_rows(Email, EMAIL_FIELDS, [e.row for e in created], with_ids=True)
        for e, pk in zip(created, ids, strict=True):
            e.pk = pk
    result.stored = len(created)
    ids_by_fp = {**existing, **{e.fingerprint: e.pk for e in created}}

    participants: list[tuple[int, str, str, str]] = []
    addresses: dict[int, list[tuple[str, str]]] = {}
    for e in created:
        rows = _participant_rows(e.pk, e.prepared.envelope)
        participants += rows
        addresses[e.pk] = [(role, address) for _, role, _, address in rows]
    copy_rows(EmailParticipant, ("email", "role", "name", "address"), participants)
    insert_rows(EmailLocation, ("email", "folder", "uidvalidity", "uid", "flags"),
                [(ids_by_fp[p.fingerprint], folder.pk, uidvalidity, p.message.uid, list(p.message.flags))
                 for p in prepared],
                ignore_conflicts=True)
    result.located = max(0, len(prepared) - result.stored)
    # A known mail seen again somewhere (moved on the server) is no longer deleted, and is
    # read or flagged as its places now are; so is a new mail that came twice in this batch.
    if existing and undelete:
        # Not by a copy marked \Deleted (RFC 3501 2.3.2: deleted, waiting for an expunge):
        # on a server without UIDPLUS a delete or move from the CRM leaves exactly such a
        # copy behind (``ImapSession.expunge``/``move`` never send a bare EXPUNGE), and a
        # re-read of the folder (UIDVALIDITY change, "sync mail since" moved earlier)
        # brought the mail the user had deleted back to life.
        alive = {p.fingerprint for p in prepared if "\\Deleted" not in p.message.flags}
        Email.objects.filter(pk__in=[pk for fp, pk in existing.items() if fp in alive],
                             deleted_at__isnull=False).update(deleted_at=None)
    # A copy marked \Deleted (deleted in a mail program, not expunged yet) is stored with
    # its place, which follows the mark: a mail with no other place is a tombstone (not
    # shown; back if the mark is taken off). O(1) per message; a query only when the batch
    # holds such a copy.
    marked = [ids_by_fp[p.fingerprint] for p in prepared if "\\Deleted" in p.message.flags]
    if marked:
        tombstone_placeless(marked)
    if existing and folder.special_use == "sent":
        # Seen first in another folder (Gmail's All Mail, an archive): in Sent, it was sent.
        Email.objects.filter(pk__in=existing.values(), direction=Email.Direction.RECEIVED).update(
            direction=Email.Direction.SENT)
    seen_twice = len(prepared) - len({p.fingerprint for p in prepared})
    refresh_flags(list(existing.values()) + ([e.pk for e in created] if seen_twice else []))
    if created:
        _finish_threads(mailbox, created, threads)
        in_reply_to, references = EMAIL_FIELDS.index("in_reply_to"), EMAIL_FIELDS.index("references")
        emails_associate(email_ids=[e.pk for e in created],
                         exclude_addresses=_own(mailbox), addresses=addresses,
                         quoted={e.pk: [e.row[in_reply_to], *e.row[references]] for e in created},
                         written={e.pk: (mailbox.pk, e.message_id, e.thread.pk if e.thread else None)
                                  for e in created})
    _resolve_message_errors(folder, uidvalidity, [p.message.uid for p in prepared])
    return result


def _own(mailbox: Mailbox) -> set[str]:
    """The mailbox's address and aliases: never what its mail is matched to records by."""
    return {mailbox.email_address.strip().lower(),
            *(a.strip().lower() for a in MailboxAlias.objects.filter(mailbox=mailbox)
              .values_list("address", flat=True))}


def tombstone_placeless(email_ids: Collection[int]) -> None:
    """Mails with no place on the server they show from (none at all, or only copies
    marked \\Deleted) leave the CRM views but are kept (recoverable: found again on the
    server, or the mark taken off, they come back) until the retention ends."""
    if not email_ids:
        return
    places = EmailLocation.objects.filter(email=OuterRef("pk"))
    if connection.vendor == "postgresql":
        places = places.exclude(flags__contains=["\\Deleted"])
        Email.objects.filter(pk__in=list(email_ids), deleted_at__isnull=True).exclude(
            Exists(places)).update(deleted_at=timezone.now())
        return
    # SQLite (the embedded default) has no JSON "contains": the same rule in Python.
    live = {email_id for email_id, flags in EmailLocation.objects.filter(
        email_id__in=list(email_ids)).values_list("email_id", "flags")
        if "\\Deleted" not in (flags or [])}
    Email.objects.filter(pk__in=[pk for pk in email_ids if pk not in live],
                         deleted_at__isnull=True).update(deleted_at=timezone.now())


def refresh_flags(email_ids: Collection[int]) -> None:
    """Read and flagged as the mail is on the server: where any of its places (current
    UIDVALIDITY) has the flag. A mail with no place (POP3, a tombstone) keeps its own.

    Only its live places count where it has one: a copy marked \\Deleted (a mail program's
    move without expunge) keeps the flags it had when it was filed, so a mail read, filed,
    then marked unread in the other folder stayed read in the CRM."""
    if not email_ids:
        return
    if connection.vendor != "postgresql":
        # SQLite (the embedded default) has no JSON "contains": the same rule in Python.
        state: dict[int, dict[bool, list[bool]]] = {}
        for email_id, flags in (EmailLocation.objects.filter(email_id__in=list(email_ids),
                                                             uidvalidity=F("folder__uidvalidity"))
                                .values_list("email_id", "flags")):
            flags = flags or []
            seen_flagged = state.setdefault(email_id, {}).setdefault("\\Deleted" not in flags, [False, False])
            seen_flagged[0] |= "\\Seen" in flags
            seen_flagged[1] |= "\\Flagged" in flags
        for email_id, by_liveness in state.items():
            seen, flagged = by_liveness.get(True) or by_liveness[False]
            Email.objects.filter(pk=email_id).update(seen=seen, flagged=flagged)
        return
    places = EmailLocation.objects.filter(email=OuterRef("pk"), uidvalidity=F("folder__uidvalidity"))
    live = places.exclude(flags__contains=["\\Deleted"])
    emails = Email.objects.filter(pk__in=list(email_ids))
    emails.filter(Exists(live)).update(
        seen=Exists(live.filter(flags__contains=["\\Seen"])),
        flagged=Exists(live.filter(flags__contains=["\\Flagged"])),
    )
    emails.filter(Exists(places)).exclude(Exists(live)).update(
        seen=Exists(places.filter(flags__contains=["\\Seen"])),
        flagged=Exists(places.filter(flags__contains=["\\Flagged"])),
    )


def _resolve_message_errors(folder: MailFolder, uidvalidity: int, uids: list[int]) -> None:
    """Per-message errors of these UIDs are resolved: they were stored now."""
    if connection.vendor != "postgresql":
        MessageError.objects.filter(folder=folder, uidvalidity=uidvalidity, uid__in=uids,
                                    resolved_at__isnull=True).update(resolved_at=timezone.now())
        return
    # One array parameter instead of a placeholder per UID (see bulk.rows_where_in).
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {connection.ops.quote_name(MessageError._meta.db_table)} SET resolved_at = %s "
            "WHERE folder_id = %s AND uidvalidity = %s AND uid = ANY(%s) AND resolved_at IS NULL",
            [timezone.now(), folder.pk, uidvalidity, uids],
        )


def complete_truncated(mailbox: Mailbox, found: Sequence[tuple[int, Prepared]]) -> int:
    """Mails imported as their headers only (over the size limit then), now downloaded whole
    because the limit was raised: the same Email rows get their whole source, are parsed
    again (bodies, attachments) and lose their notices. Places, links, thread and flags stay
    as they are. Returns how many were completed."""
    from ..models import Attachment, EmailSource

    if not found:
        return 0
    with transaction.atomic():
        emails = {e.pk: e for e in Email.objects.select_for_update(of=("self",)).filter(
            pk__in=[email_id for email_id, _ in found], mailbox=mailbox, truncated=True)}
        # Another mail of the mailbox with the whole mail's fingerprint: a whole copy of it
        # was stored meanwhile (found in another folder): the headers-only row merges into it.
        taken = dict(Email.objects.filter(mailbox=mailbox, fingerprint__in=[p.fingerprint for _, p in found])
                     .exclude(pk__in=list(emails)).values_list("fingerprint", "pk"))
        done: list[Email] = []
        sources: list[tuple[int, bytes, int]] = []
        merged: dict[int, int] = {}  # headers-only email -> the whole copy it joins
        size = 0
        for email_id, p in found:
            email = emails.pop(email_id, None)
            if email is None:  # completed meanwhile, deleted, or not this mailbox's
                continue
            size += p.raw_size
            if p.fingerprint in taken:
                merged[email.pk] = taken[p.fingerprint]
                continue
            email.fingerprint = p.fingerprint
            taken[p.fingerprint] = email.pk
            email.content_hash = p.content_hash
            email.size = min(p.raw_size, 2**31 - 1)
            email.truncated = False
            email.parse_state, email.parse_error = Email.ParseState.PENDING, ""
            email.text = email.html = ""
            email.has_attachments = False
            done.append(email)
            sources.append((email.pk, p.compressed, p.raw_size))
        if merged:
            _merge_into(merged)
        if not done and not merged:
            return 0
        # The whole source replaces the header block, by binary COPY: an UPDATE sent it as
        # hex text (a 45 MB mail took the worker to ~390 MB).
        EmailSource.objects.filter(email_id__in=[email_id for email_id, _, _ in sources]).delete()
        write_sources(sources)
        Attachment.objects.filter(email__in=done).delete()
        Email.objects.bulk_update(done, ["fingerprint", "content_hash", "size", "truncated", "parse_state",
                                         "parse_error", "text", "html", "has_attachments"])
        # The "only its headers were imported" notices of every place of these mails.
        places = EmailLocation.objects.filter(email__in=[e.pk for e in done] + list(merged.values()))
        for folder_id, uidvalidity, uid in places.values_list("folder_id", "uidvalidity", "uid"):
            MessageError.objects.filter(folder_id=folder_id, uidvalidity=uidvalidity, uid=uid,
                                        resolved_at__isnull=True).update(resolved_at=timezone.now())
        Mailbox.objects.filter(pk=mailbox.pk).update(
            messages_done=F("messages_done") + len(done) + len(merged), bytes_done=F("bytes_done") + size,
            budget_bytes_used=F("budget_bytes_used") + size)
    return len(done) + len(merged)


def _merge_into(merged: dict[int, int]) -> None:
    """Headers-only emails whose whole copy is stored as another email: their places and
    record links (shown or Bcc-only as they were) move to that email, which is live if
    either was; then they go."""
    from ..models import EmailLink

    for gone, keeper in merged.items():
        EmailLocation.objects.filter(email_id=gone).update(email_id=keeper)
        links = list(EmailLink.objects.filter(email_id=gone).values_list(
            "lead_id", "contact_id", "deal_id", "bcc_only"))
        email_links_insert([(keeper, lead, contact, deal, bcc_only) for lead, contact, deal, bcc_only in links])
        if Email.objects.filter(pk=gone, deleted_at__isnull=True).exists():
            Email.objects.filter(pk=keeper).update(deleted_at=None)
    Email.objects.filter(pk__in=list(merged)).delete()
    refresh_flags(set(merged.values()))
