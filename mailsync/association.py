"""Attach emails to leads, contacts and the deals of matched contacts, by address.

Addresses are compared normalized (lower-case). The lookups use the functional indexes on
LOWER(email) and LOWER(secondary_email) of leads and contacts.

A record that matched a mail only by a Bcc address (none of its addresses in From, To, Cc or
Reply-To, nor in the mail a reply answers) gets a link marked ``bcc_only``: the mailbox's
owner sees it, nobody else does (``selectors``), since it would tell them that the person
was sent a blind copy. A link found both ways is shown.
"""
from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence

from django.db import connection
from django.db.models import Q
from django.db.models.functions import Lower

from crm.models import Contact, Deal, Lead, OwnedRecord

from .bulk import copy_rows, insert_rows, rows_where_in
from .models import EmailLink, EmailParticipant, Mailbox, MailboxAlias

# Matching uses these roles: the customer wrote it (From/Reply-To) or received it (To/Cc),
# or was sent a blind copy (Bcc: the sender's copy keeps the header).
MATCH_ROLES = ["from", "to", "cc", "reply_to", "bcc"]
# The roles everyone who gets the mail can read: a match by one of them is a link shown to
# whoever sees the record; a match by Bcc alone is the owner's (``bcc_only``).
SHOWN_ROLES = ["from", "to", "cc", "reply_to"]

# (lead, contact, deal): one of them set.
Record = tuple[int | None, int | None, int | None]
LINK_FIELDS = ("email", "lead", "contact", "deal", "bcc_only")


def _add(into: dict[Record, bool], record: Record, bcc_only: bool) -> bool:
    """Put ``record`` into ``into`` (record -> only by Bcc); found another way too, it is
    not Bcc-only. Whether ``into`` changed."""
    before = into.get(record)
    if before is None or (before and not bcc_only):
        into[record] = bcc_only
        return True
    return False


def _merge(into: dict[Record, bool], records: Mapping[Record, bool]) -> bool:
    changed = False
    for record, bcc_only in records.items():
        changed |= _add(into, record, bcc_only)
    return changed


def email_links_insert(rows: Sequence[tuple[int, int | None, int | None, int | None, bool]]) -> int:
    """Insert links (email, lead, contact, deal, bcc_only) that may exist already. One that
    exists keeps its row, but a Bcc-only link now found another way (by a To address, a
    reply's parent, the user's own choice) is shown from then on; a shown link is never
    hidden by this. Returns the number of new links. Two queries more only when some of
    ``rows`` existed."""
    if not rows:
        return 0
    inserted = insert_rows(EmailLink, LINK_FIELDS, rows, ignore_conflicts=True, count=True)
    # SQLite's bulk_create cannot say how many conflicted: always looked at there.
    if inserted < len(rows) or connection.vendor != "postgresql":
        shown = {tuple(row[:4]) for row in rows if not row[4]}
        hidden = rows_where_in(EmailLink, ("id", "email", "lead", "contact", "deal"),
                               where={"bcc_only": True}, field="email",
                               values={key[0] for key in shown})
        ids = [pk for pk, *key in hidden if tuple(key) in shown]
        if ids:
            EmailLink.objects.filter(pk__in=ids).update(bcc_only=False)
    return inserted


def own_addresses(mailbox_ids: Iterable[int]) -> dict[int, set[str]]:
    """Each mailbox's own address and its aliases, lower-case: a mail never matches a record
    by them (every mail of the mailbox carries one)."""
    ids = list(set(mailbox_ids))
    own: dict[int, set[str]] = defaultdict(set)
    for pk, address in Mailbox.objects.filter(pk__in=ids).values_list("pk", "email_address"):
        own[pk].add(address.strip().lower())
    for pk, address in MailboxAlias.objects.filter(mailbox_id__in=ids).values_list("mailbox_id", "address"):
        own[pk].add(address.strip().lower())
    return own


def address_forms(address: str) -> set[str]:
    """The address and, for an internationalized domain, its other spelling: mail carries
    the ASCII form ("xn--bcher-kva.example", IDNA) unless its sender used SMTPUTF8, while a
    record's address is typed as a mail program shows it ("bücher.example"). Either way,
    the same person (as ``Mailbox.excluded_domain_set`` takes both spellings of a domain)."""
    forms = {address}
    local, at, domain = address.rpartition("@")
    if not at or not domain:
        return forms
    try:
        if not domain.isascii():
            forms.add(f"{local}@{domain.encode('idna').decode('ascii')}")
        elif "xn--" in domain:
            forms.add(f"{local}@{domain.encode('ascii').decode('idna').lower()}")
    except UnicodeError:  # not a valid IDNA name: only as written
        pass
    return forms


def _all_forms(addresses: Iterable[str]) -> set[str]:
    return {form for address in addresses for form in address_forms(address)}


def _by_address(model: type[Lead] | type[Contact], wanted: set[str]) -> dict[str, list[int]]:
    """Per address of ``wanted``, the records that have it (in either spelling of an
    internationalized domain: ``address_forms``)."""
    found: dict[str, list[int]] = defaultdict(list)
    if not wanted:
        return found
    asked_as: dict[str, set[str]] = defaultdict(set)  # a spelling -> the addresses it stands for
    for address in wanted:
        for form in address_forms(address):
            asked_as[form].add(address)
    addresses = set(asked_as)
    if connection.vendor == "postgresql":
        # The addresses as one array parameter (see bulk.rows_where_in); the functional
        # indexes on LOWER(...) serve "= ANY".
        meta = model._meta
        quote = connection.ops.quote_name
        e1, e2 = (quote(meta.get_field(f).column) for f in ("email", "secondary_email"))
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {quote(meta.pk.column)}, LOWER({e1}), LOWER({e2}) FROM {quote(meta.db_table)} "
                f"WHERE LOWER({e1}) = ANY(%s) OR LOWER({e2}) = ANY(%s)",
                [list(addresses), list(addresses)],
            )
            rows = cursor.fetchall()
    else:
        rows = list(
            model.objects.annotate(e1=Lower("email"), e2=Lower("secondary_email"))
            .filter(Q(e1__in=addresses) | Q(e2__in=addresses))
            .values_list("pk", "e1", "e2")
        )
    for pk, e1, e2 in rows:
        for address in {a for form in {e1, e2} & addresses for a in asked_as[form]}:
            found[address].append(pk)
    return found


def emails_associate(*, email_ids: Iterable[int], exclude_addresses: Iterable[str] = (),
                     addresses: Mapping[int, Iterable[tuple[str, str]]] | None = None,
                     quoted: Mapping[int, Iterable[str]] | None = None,
                     written: Mapping[int, tuple[int, str, int | None]] | None = None) -> int:
    """Link the given emails to every lead and contact one of their addresses belongs to,
    and to those contacts' deals (``bcc_only`` where only a Bcc address matched).
    Idempotent. Returns the number of new links.

    The sync, which has just written them, passes each email's participant ``addresses``
    ((role, normalized address), every role), the Message-IDs it ``quoted`` (In-Reply-To, References) and
    what it ``written``: (mailbox id, Message-ID, thread id) per email, which also says
    they were written in this transaction; then none of it is read back from the database
    and their links go in by COPY (~0.1 s of a 2,000-message sync: bench/imap_sync.py)."""
    email_ids = list(email_ids)
    if not email_ids:
        return 0
    _association_lock(shared=True)
    excluded = {a.lower() for a in exclude_addresses}
    # Per email, its addresses -> whether only in Bcc.
    by_email: dict[int, dict[str, bool]] = defaultdict(dict)
    if addresses is None:
        addresses = defaultdict(list)
        for email_id, role, address in EmailParticipant.objects.filter(
            email_id__in=email_ids, role__in=MATCH_ROLES
        ).values_list("email_id", "role", "address"):
            addresses[email_id].append((role, address))
    for email_id in email_ids:
        for role, address in addresses.get(email_id, ()):
            if address and address not in excluded:
                seen = by_email[email_id]
                seen[address] = seen.get(address, True) and role == "bcc"
    wanted = set().union(*by_email.values()) if by_email else set()
    leads = _by_address(Lead, wanted)
    contacts = _by_address(Contact, wanted)
    deals: dict[int, list[int]] = defaultdict(list)
    contact_ids = {pk for pks in contacts.values() for pk in pks}
    for deal_id, contact_id in rows_where_in(Deal, ("id", "contact"), where={},
                                             field="contact", values=contact_ids):
        deals[contact_id].append(deal_id)

    # Per email, the (lead, contact, deal) it belongs to, one record each, and whether only
    # by Bcc: a record matched by any address of it in From/To/Cc/Reply-To is shown.
    found: dict[int, dict[Record, bool]] = defaultdict(dict)
    for email_id, email_addresses in by_email.items():
        records = found[email_id]
        for address, bcc_only in email_addresses.items():
            for pk in leads.get(address, ()):
                _add(records, (pk, None, None), bcc_only)
            for pk in contacts.get(address, ()):
                _add(records, (None, pk, None), bcc_only)
                for deal_id in deals.get(pk, ()):
                    _add(records, (None, None, deal_id), bcc_only)
    _inherit_from_parents(email_ids, quoted, found, written)
    links = [(email_id, lead, contact, deal, bcc_only)
             for email_id, records in found.items() for (lead, contact, deal), bcc_only in records.items()]
    replies = _pass_to_stored_replies(found, written)
    if written is not None:
        # Mails written in this transaction: no link of theirs can exist yet (no other
        # transaction sees them), and ``found`` holds each record once: COPY, no conflicts.
        copy_rows(EmailLink, LINK_FIELDS, links)
        return len(links) + email_links_insert(replies)
    return email_links_insert(links + replies)


def _inherit_from_parents(email_ids: list[int], quoted: Mapping[int, Iterable[str]] | None,
                          found: dict[int, dict[Record, bool]],
                          written: Mapping[int, tuple[int, str, int | None]] | None = None) -> None:
    """A reply joins the records of the mail it answers (its In-Reply-To/References), so the
    whole conversation shows on the deal even when a reply comes from someone the CRM does
    not know (the customer's colleague): parents stored in the same mailbox (only those who
    got the thread know their Message-IDs) or in this batch, and mail sent from the CRM
    (its Message-ID names the record and carries a random part: it cannot be guessed).
    A record the parent has only by Bcc the reply has so too (unless it matches itself), in
    the parent's mailbox only: in another mailbox it would tell that mailbox's owner."""
    from .models import Email

    mailbox_of: dict[int, int] = {}
    in_batch: dict[tuple[int, str], int] = {}
    if written is not None and quoted is not None and all(pk in written for pk in email_ids):
        for pk in email_ids:
            mailbox_id, message_id, _ = written[pk]
            mailbox_of[pk] = mailbox_id
            if message_id:
                in_batch.setdefault((mailbox_id, message_id), pk)
    else:
        rows = Email.objects.filter(pk__in=email_ids).values_list(
            "pk", "mailbox_id", "message_id", "in_reply_to", "references")
        stored_quotes: dict[int, list[str]] = {}
        for pk, mailbox_id, message_id, in_reply_to, references in rows:
            mailbox_of[pk] = mailbox_id
            if message_id:
                in_batch.setdefault((mailbox_id, message_id), pk)
            stored_quotes[pk] = [in_reply_to, *(references or [])]
        if quoted is None:
            quoted = stored_quotes
    quotes = {pk: {i for i in quoted.get(pk, ()) if i} for pk in email_ids if pk in mailbox_of}
    all_ids = set().union(*quotes.values()) if quotes else set()
    if not all_ids:
        return
    parents: dict[tuple[int | None, str], dict[Record, bool]] = defaultdict(dict)
    for message_id, mailbox_id, source, lead, contact, deal, bcc_only in _links_of_mails(
            set(mailbox_of.values()), all_ids):
        _add(parents[(mailbox_id, message_id)], (lead, contact, deal), bcc_only)
        # A Bcc-only record is the parent mailbox's owner's alone: a reply in another
        # mailbox (a colleague's) that took it would show its owner who got the blind copy.
        if source == Email.Source.CRM and message_id.startswith("crm.") and not bcc_only:
            _add(parents[(None, message_id)], (lead, contact, deal), bcc_only)
    for _ in range(5):  # replies to replies within one batch
        changed = False
        for pk, ids in quotes.items():
            mailbox_id = mailbox_of[pk]
            for message_id in ids:
                changed |= _merge(found[pk], parents.get((mailbox_id, message_id), {}))
                changed |= _merge(found[pk], parents.get((None, message_id), {}))
                parent = in_batch.get((mailbox_id, message_id))
                if parent is not None and parent != pk:
                    changed |= _merge(found[pk], found.get(parent, {}))
        if not changed:
            break


def _links_of_mails(mailbox_ids: set[int], message_ids: set[str],
                    ) -> list[tuple[str, int, str, int | None, int | None, int | None, bool]]:
    """(Message-ID, mailbox, source, lead, contact, deal, bcc_only) of the links of the mails
    with these Message-IDs stored in these mailboxes or sent from the CRM."""
    from .models import Email

    if connection.vendor == "postgresql":
        # The ids as array parameters: the ORM's __in builds a placeholder per value
        # (bulk.rows_where_in), hundreds per batch here.
        quote = connection.ops.quote_name
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT e.message_id, e.mailbox_id, e.source, l.lead_id, l.contact_id, l.deal_id, l.bcc_only "
                f"FROM {quote(EmailLink._meta.db_table)} l JOIN {quote(Email._meta.db_table)} e "
                "ON e.id = l.email_id WHERE e.message_id = ANY(%s) "
                "AND (e.mailbox_id = ANY(%s) OR e.source = %s)",
                [list(message_ids), list(mailbox_ids), Email.Source.CRM])
            return cursor.fetchall()
    return list(EmailLink.objects.filter(
        Q(email__mailbox_id__in=mailbox_ids) | Q(email__source=Email.Source.CRM),
        email__message_id__in=message_ids,
    ).values_list("email__message_id", "email__mailbox_id", "email__source", "lead_id", "contact_id", "deal_id",
                  "bcc_only"))


def _mails_in_threads(threads: set[int], besides: Iterable[int]) -> list[tuple[int, int, str, str, list[str]]]:
    """(id, mailbox, Message-ID, In-Reply-To, References) of the mails in these threads,
    but ``besides``."""
    from .models import Email

    if connection.vendor == "postgresql":
        quote = connection.ops.quote_name
        with connection.cursor() as cursor:
            cursor.execute(
                f'SELECT id, mailbox_id, message_id, in_reply_to, "references" '
                f"FROM {quote(Email._meta.db_table)} WHERE thread_id = ANY(%s) AND NOT id = ANY(%s)",
                [list(threads), list(besides)])
            # Django reads jsonb as text (its JSONField decodes it): decoded here.
            return [(pk, mailbox_id, message_id, in_reply_to,
                     json.loads(references) if isinstance(references, str) else references)
                    for pk, mailbox_id, message_id, in_reply_to, references in cursor.fetchall()]
    return list(Email.objects.filter(thread_id__in=threads).exclude(pk__in=list(besides))
                .values_list("pk", "mailbox_id", "message_id", "in_reply_to", "references"))


def _pass_to_stored_replies(found: Mapping[int, dict[Record, bool]],
                            written: Mapping[int, tuple[int, str, int | None]] | None = None,
                            ) -> list[tuple[int, int | None, int | None, int | None, bool]]:
    """The other way round: replies stored before the mail they answer (a first sync goes
    newest first) get its records when it arrives, and replies to those replies too."""
    from .models import Email

    sources = [pk for pk, records in found.items() if records]
    if not sources:
        return []
    if written is not None and all(pk in written for pk in sources):
        rows = [(pk, written[pk][2], written[pk][0], written[pk][1]) for pk in sources]
    else:
        rows = list(Email.objects.filter(pk__in=sources).values_list("pk", "thread_id", "mailbox_id", "message_id"))
    threads = {thread for _, thread, _, _ in rows if thread is not None}
    if not threads:
        return []
    records_of: dict[tuple[int, str], dict[Record, bool]] = defaultdict(dict)
    for pk, _, mailbox_id, message_id in rows:
        if message_id:
            _merge(records_of[(mailbox_id, message_id)], found[pk])
    candidates = _mails_in_threads(threads, list(found))
    extra: dict[int, dict[Record, bool]] = defaultdict(dict)
    changed = True
    while changed:
        changed = False
        for pk, mailbox_id, message_id, in_reply_to, references in candidates:
            grew = False
            for quoted in (in_reply_to, *(references or [])):
                if quoted:
                    grew |= _merge(extra[pk], records_of.get((mailbox_id, quoted), {}))
            if grew:
                if message_id:
                    _merge(records_of[(mailbox_id, message_id)], extra[pk])
                changed = True
    return [(pk, lead, contact, deal, bcc_only)
            for pk, records in extra.items() for (lead, contact, deal), bcc_only in records.items()]


def _record_addresses(record: Lead | Contact) -> set[str]:
    return {a.strip().lower() for a in (record.email, record.secondary_email) if a and a.strip()}


def _replies_within_threads(email_ids: set[int]) -> set[int]:
    """The replies (in their threads) to these emails, and replies to those: what a new
    record gets besides its own address's mail, as the sync gives it to new replies
    (``_inherit_from_parents``)."""
    from .models import Email

    if not email_ids:
        return set()
    rows = list(Email.objects.filter(pk__in=email_ids).values_list("thread_id", "mailbox_id", "message_id"))
    threads = {thread for thread, _, _ in rows if thread is not None}
    if not threads:
        return set()
    known = {(mailbox_id, message_id) for _, mailbox_id, message_id in rows if message_id}
    candidates = [row for row in Email.objects.filter(thread_id__in=threads).exclude(pk__in=email_ids)
                  .values_list("pk", "mailbox_id", "message_id", "in_reply_to", "references")]
    # Walked from the known mails to their replies through an index by what each reply
    # names: a pass over every candidate until none was added took one pass per generation,
    # quadratic for a long chain stored newest first (3,000 mails: 3.6 s).
    replies_to: dict[tuple[int, str], list[tuple[int, int, str]]] = defaultdict(list)
    for pk, mailbox_id, message_id, in_reply_to, references in candidates:
        for named in {in_reply_to, *(references or [])}:
            if named:
                replies_to[(mailbox_id, named)].append((pk, mailbox_id, message_id))
    found: set[int] = set()
    queue = deque(known)
    while queue:
        for pk, mailbox_id, message_id in replies_to.get(queue.popleft(), ()):
            if pk in found:
                continue
            found.add(pk)
            if message_id and (mailbox_id, message_id) not in known:
                known.add((mailbox_id, message_id))
                queue.append((mailbox_id, message_id))
    return found


# Advisory lock key space of association (the first of the two int4 keys; see sync/lock.py).
ASSOCIATION_LOCK = (0x4153, 1)  # "AS"


def _association_lock(*, shared: bool) -> None:
    """Storing mail (shared) and saving a record (exclusive) each match against what the
    other has committed. Without this, a contact saved while a sync batch stored its mail
    got none of it, for good: under READ COMMITTED neither transaction saw the other's rows.
    Held to the end of the transaction, so whichever side comes second sees the other's
    rows; batches never wait for each other."""
    if connection.vendor != "postgresql" or not connection.in_atomic_block:
        return
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT pg_advisory_xact_lock{'_shared' if shared else ''}(%s, %s)",
                       list(ASSOCIATION_LOCK))


def email_associate_record(*, record: OwnedRecord, previous: Mapping[str, object] | None = None) -> int:
    """Attach past mail to a lead, contact or deal just created or changed: no re-download,
    the participants of every synced mail are already stored. ``previous``: the values of
    the changed fields before the change (crm.signals.record_saved); mail linked by an
    address the lead or contact no longer has leaves it (``_unlink_old_addresses``)."""
    _association_lock(shared=False)
    if previous and isinstance(record, (Lead, Contact)):
        old = {str(previous.get(name, getattr(record, name)) or "").strip().lower()
               for name in ("email", "secondary_email")} - {""}
        _unlink_old_addresses(record=record, addresses=old - _record_addresses(record))
    if isinstance(record, Deal):
        if record.contact_id is None:
            return 0
        # The contact's mail, shown or Bcc-only as it is on the contact; not what was sent
        # from another of its deals (``sending._store``: that deal's alone).
        return email_links_insert([
            (email_id, None, None, record.pk, bcc_only) for email_id, bcc_only in
            EmailLink.objects.filter(contact_id=record.contact_id)
            .exclude(_sent_from_a_deal("email__")).values_list("email_id", "bcc_only")])
    if not isinstance(record, (Lead, Contact)):
        return 0
    addresses = _record_addresses(record)
    if not addresses:
        return 0
    found = list(EmailParticipant.objects.filter(address__in=_all_forms(addresses), role__in=MATCH_ROLES)
                 .values_list("email_id", "address", "role", "email__mailbox_id"))
    # As the sync matches: never by the address of the mailbox the mail is in (or an alias
    # of it), e.g. a lead created with the salesperson's own address gets none of their mail.
    own = own_addresses(mailbox_id for *_, mailbox_id in found)
    matched = [(email_id, role) for email_id, address, role, mailbox_id in found
               if address not in own.get(mailbox_id, ())]
    # Shown: matched by a role everyone reads, and the replies in those conversations;
    # the rest (and its replies) only by Bcc.
    shown = {email_id for email_id, role in matched if role != "bcc"}
    shown |= _replies_within_threads(shown)
    hidden = {email_id for email_id, _ in matched} - shown
    hidden |= _replies_within_threads(hidden) - shown
    ids = [(email_id, email_id in hidden) for email_id in shown | hidden]
    if isinstance(record, Lead):
        links = [(email_id, record.pk, None, None, bcc_only) for email_id, bcc_only in ids]
    else:
        deal_ids = list(Deal.objects.filter(contact=record).values_list("pk", flat=True))
        links = [(email_id, None, record.pk, None, bcc_only) for email_id, bcc_only in ids]
        # Not to its deals: what was sent from one of them (``sending._store``: that deal's
        # alone). Every save of the contact (a new phone number) put it on all of them.
        from .models import Email

        from_deals = set(Email.objects.filter(_sent_from_a_deal(), pk__in=[email_id for email_id, _ in ids])
                         .values_list("pk", flat=True)) if deal_ids else set()
        links += [(email_id, None, None, deal_id, bcc_only) for email_id, bcc_only in ids
                  if email_id not in from_deals for deal_id in deal_ids]
    return email_links_insert(links)


def _sent_from_a_deal(path: str = "") -> Q:
    """Mail sent from a deal in the CRM (its Message-ID names it: ``sending._message_id``);
    ``path`` leads from the model queried to the Email ("email__" from EmailLink)."""
    from .models import Email

    return Q(**{f"{path}source": Email.Source.CRM, f"{path}message_id__startswith": "crm.deal."})


def _unlink_old_addresses(*, record: Lead | Contact, addresses: set[str]) -> int:
    """A lead's or contact's address was corrected or removed: the mail it had only by those
    addresses (and the replies in those conversations it got with them) leaves it, and a
    contact's deals. It stayed (found in review): a contact saved with a colleague's or a
    wrong customer's address kept showing that person's mail after the fix, to everyone the
    contact is shared with. Kept: mail of an address the record still has, the replies
    within those conversations, and mail sent from the CRM (put on the record by the user);
    such mail that the record now has only by a Bcc address is Bcc-only from then on."""
    from .models import Email

    if not addresses:
        return 0
    field = "lead" if isinstance(record, Lead) else "contact"
    links = EmailLink.objects.filter(**{field: record}).values("email_id")
    linked = {row["email_id"] for row in links}
    if not linked:
        return 0

    def matching(wanted: set[str], roles: list[str] = MATCH_ROLES) -> set[int]:
        if not wanted:
            return set()
        found = list(EmailParticipant.objects.filter(
            email_id__in=links, address__in=_all_forms(wanted), role__in=roles,
        ).values_list("email_id", "address", "email__mailbox_id"))
        # As the sync matches: never by the mailbox's own addresses (they link nothing).
        own = own_addresses(mailbox_id for _, _, mailbox_id in found)
        return {email_id for email_id, address, mailbox_id in found
                if address not in own.get(mailbox_id, ())}

    by_old = matching(addresses)
    if not by_old:
        return 0
    current = _record_addresses(record)
    shown = matching(current, SHOWN_ROLES) | set(
        Email.objects.filter(pk__in=links, source=Email.Source.CRM).values_list("pk", flat=True))
    shown |= _replies_within_threads(shown) & linked
    kept = shown | matching(current)
    kept |= _replies_within_threads(kept) & linked
    touched = by_old | (_replies_within_threads(by_old) & linked)
    gone = touched - kept
    hide = (touched & kept) - shown  # kept only by a Bcc address now
    if not gone and not hide:
        return 0
    records = Q(**{field: record})
    if isinstance(record, Contact):
        records |= Q(deal__in=Deal.objects.filter(contact=record).values("pk"))
    if hide:
        EmailLink.objects.filter(records, email_id__in=hide, bcc_only=False).update(bcc_only=True)
    deleted, _ = EmailLink.objects.filter(records, email_id__in=gone).delete() if gone else (0, {})
    return deleted
