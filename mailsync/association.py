"""Attach emails to leads, contacts and the deals of matched contacts, by address.

Addresses are compared normalized (lower-case). The lookups use the functional indexes on
LOWER(email) and LOWER(secondary_email) of leads and contacts.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from django.db import connection
from django.db.models import Q
from django.db.models.functions import Lower

from crm.models import Contact, Deal, Lead, OwnedRecord

from .bulk import insert_rows, rows_where_in
from .models import EmailLink, EmailParticipant, Mailbox, MailboxAlias

# Matching uses these roles: the customer wrote it (From/Reply-To) or received it (To/Cc).
MATCH_ROLES = ["from", "to", "cc", "reply_to", "bcc"]


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


def _by_address(model: type[Lead] | type[Contact], addresses: set[str]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = defaultdict(list)
    if not addresses:
        return found
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
        for address in {e1, e2} & addresses:
            found[address].append(pk)
    return found


def emails_associate(*, email_ids: Iterable[int], exclude_addresses: Iterable[str] = (),
                     addresses: Mapping[int, Iterable[str]] | None = None,
                     quoted: Mapping[int, Iterable[str]] | None = None) -> int:
    """Link the given emails to every lead and contact one of their addresses belongs to,
    and to those contacts' deals. Idempotent. Returns the number of new links.

    The sync, which has just written them, passes each email's participant ``addresses``
    (normalized, every role) and the Message-IDs it ``quoted`` (In-Reply-To, References):
    then they are not read back from the database."""
    email_ids = list(email_ids)
    if not email_ids:
        return 0
    excluded = {a.lower() for a in exclude_addresses}
    by_email: dict[int, set[str]] = defaultdict(set)
    if addresses is None:
        addresses = defaultdict(list)
        for email_id, address in EmailParticipant.objects.filter(
            email_id__in=email_ids, role__in=MATCH_ROLES
        ).values_list("email_id", "address"):
            addresses[email_id].append(address)
    for email_id in email_ids:
        for address in addresses.get(email_id, ()):
            if address and address not in excluded:
                by_email[email_id].add(address)
    wanted = set().union(*by_email.values()) if by_email else set()
    leads = _by_address(Lead, wanted)
    contacts = _by_address(Contact, wanted)
    deals: dict[int, list[int]] = defaultdict(list)
    contact_ids = {pk for pks in contacts.values() for pk in pks}
    for deal_id, contact_id in rows_where_in(Deal, ("id", "contact"), where={},
                                             field="contact", values=contact_ids):
        deals[contact_id].append(deal_id)

    # (email, lead, contact, deal) rows: one record each
    links: list[tuple[int, int | None, int | None, int | None]] = []
    for email_id, email_addresses in by_email.items():
        lead_ids = {pk for a in email_addresses for pk in leads.get(a, ())}
        c_ids = {pk for a in email_addresses for pk in contacts.get(a, ())}
        d_ids = {pk for c in c_ids for pk in deals.get(c, ())}
        links += [(email_id, pk, None, None) for pk in lead_ids]
        links += [(email_id, None, pk, None) for pk in c_ids]
        links += [(email_id, None, None, pk) for pk in d_ids]
    links += [(link.email_id, link.lead_id, link.contact_id, link.deal_id)
              for link in _reply_links(email_ids, quoted)]
    return insert_rows(EmailLink, ("email", "lead", "contact", "deal"), links,
                       ignore_conflicts=True, count=True)


def _reply_links(email_ids: list[int], quoted: Mapping[int, Iterable[str]] | None) -> list[EmailLink]:
    """Replies to mail sent from the CRM join the records that mail was sent from, whatever
    address they come from: their In-Reply-To/References quote its Message-ID (which names
    the record and carries a random part, so it cannot be guessed to attach mail elsewhere)."""
    from .models import Email

    if quoted is None:
        quoted = {email_id: [in_reply_to, *(references or [])]
                  for email_id, in_reply_to, references in Email.objects.filter(
                      pk__in=email_ids).values_list("pk", "in_reply_to", "references")}
    ours = {email_id: ids for email_id, ids in (
        (email_id, {i for i in quoted.get(email_id, ()) if i and i.startswith("crm.")})
        for email_id in email_ids) if ids}
    if not ours:
        return []
    quoted = ours
    all_ids = set().union(*quoted.values())
    parents: dict[str, list[tuple[int | None, int | None, int | None]]] = defaultdict(list)
    for message_id, lead, contact, deal in EmailLink.objects.filter(
        email__source=Email.Source.CRM, email__message_id__in=all_ids
    ).values_list("email__message_id", "lead_id", "contact_id", "deal_id"):
        parents[message_id].append((lead, contact, deal))
    return [
        EmailLink(email_id=email_id, lead_id=lead, contact_id=contact, deal_id=deal)
        for email_id, ids in quoted.items()
        for message_id in ids
        for lead, contact, deal in parents.get(message_id, ())
    ]


def _record_addresses(record: Lead | Contact) -> set[str]:
    return {a.strip().lower() for a in (record.email, record.secondary_email) if a and a.strip()}


def email_associate_record(*, record: OwnedRecord) -> int:
    """Attach past mail to a lead, contact or deal just created or changed: no re-download,
    the participants of every synced mail are already stored."""
    if isinstance(record, Deal):
        if record.contact_id is None:
            return 0
        email_ids = EmailLink.objects.filter(contact_id=record.contact_id).values_list(
            "email_id", flat=True
        )
        links = [EmailLink(email_id=e, deal_id=record.pk) for e in email_ids]
        return len(EmailLink.objects.bulk_create(links, ignore_conflicts=True, batch_size=1000))
    if not isinstance(record, (Lead, Contact)):
        return 0
    addresses = _record_addresses(record)
    if not addresses:
        return 0
    found = list(EmailParticipant.objects.filter(address__in=addresses, role__in=MATCH_ROLES)
                 .values_list("email_id", "address", "email__mailbox_id"))
    # As the sync matches: never by the address of the mailbox the mail is in (or an alias
    # of it), e.g. a lead created with the salesperson's own address gets none of their mail.
    own = own_addresses(mailbox_id for _, _, mailbox_id in found)
    email_ids = {email_id for email_id, address, mailbox_id in found
                 if address not in own.get(mailbox_id, ())}
    if isinstance(record, Lead):
        links = [(email_id, record.pk, None, None) for email_id in email_ids]
    else:
        deal_ids = list(Deal.objects.filter(contact=record).values_list("pk", flat=True))
        links = [(email_id, None, record.pk, None) for email_id in email_ids]
        links += [(email_id, None, None, deal_id) for email_id in email_ids for deal_id in deal_ids]
    return insert_rows(EmailLink, ("email", "lead", "contact", "deal"), links,
                       ignore_conflicts=True, count=True)
