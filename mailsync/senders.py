"""The addresses a user may send as: their mailboxes' primary addresses, the additional
("alias") addresses of those mailboxes, and verified organization emails.

Organization emails (sales@, support@) are added by administrators and verified by a
confirmation link sent to the address through the normal sending path.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from datetime import timedelta
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from crm.exceptions import RecordPermissionDenied
from crm.models import OrganizationEmail, User

from .models import Email, Mailbox, MailboxAlias

# As sending._UNSAFE: what the email package takes for a line end (str.splitlines) and the
# other controls RFC 5322 forbids in a header; a display name with one could not be sent.
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


@dataclass(frozen=True)
class Sender:
    address: str
    display_name: str
    mailbox: Mailbox  # whose SMTP server sends it
    kind: str  # "mailbox", "alias" or "organization"

    @property
    def label(self) -> str:
        name = f"{self.display_name} <{self.address}>" if self.display_name else self.address
        return {"alias": f"{name} · additional address",
                "organization": f"{name} · organization email"}.get(self.kind, name)


def _sending_mailboxes(user: User) -> list[Mailbox]:
    """The user's mailboxes that have an outgoing server, the active one first."""
    return list(Mailbox.objects.filter(owner=user).exclude(smtp_host="")
                .prefetch_related("aliases").order_by("-is_active", "pk"))


def organization_emails_for(user: User) -> list[OrganizationEmail]:
    """Verified organization emails this user may use (no allowed users listed: everyone)."""
    return list(OrganizationEmail.objects.filter(verified_at__isnull=False).filter(
        Q(allowed_users=None) | Q(allowed_users=user)).distinct())


def sender_choices(user: User) -> list[Sender]:
    mailboxes = _sending_mailboxes(user)
    # An organization email is used under its own rules (confirmed, allowed users), never
    # as an alias someone added to their mailbox.
    organization = {a.lower() for a in OrganizationEmail.objects.values_list("address", flat=True)}
    # Nor as an alias of someone else's mailbox address: a user sends as a colleague only
    # by connecting that mailbox (its password), never by typing it in as an extra address
    # (aliases added before mailbox_alias_add refused it are not offered either).
    taken = {a.lower() for a in Mailbox.objects.exclude(owner=user)
             .values_list("email_address", flat=True)}
    choices: list[Sender] = []
    for mailbox in mailboxes:
        name = mailbox.display_name or user.get_full_name()
        choices.append(Sender(mailbox.email_address, name, mailbox, "mailbox"))
        choices += [Sender(a.address, a.display_name or name, mailbox, "alias")
                    for a in mailbox.aliases.all()
                    if a.address.lower() not in organization and a.address.lower() not in taken]
    if mailboxes:
        choices += [Sender(o.address, o.display_name, mailboxes[0], "organization")
                    for o in organization_emails_for(user)]
    unique: dict[str, Sender] = {}
    for choice in choices:
        unique.setdefault(choice.address.lower(), choice)
    return list(unique.values())


def sender_for(user: User, address: str) -> Sender:
    for choice in sender_choices(user):
        if choice.address.lower() == (address or "").strip().lower():
            return choice
    if not _sending_mailboxes(user):
        raise ValidationError({"from_address": [
            "Connect a mailbox with an outgoing (SMTP) server first (Setup › Email Configuration)."]})
    raise ValidationError({"from_address": [f"You may not send as {address!r}."]})


def reply_to_for(user: User, address: str) -> Sender | None:
    """The sender entry for a Reply-To address the user may put on a mail, or None."""
    return next((c for c in sender_choices(user) if c.address.lower() == address.lower()), None)


# -- additional from addresses ---------------------------------------------------------------

def _clean_address(address: str, field: str = "address") -> str:
    address = (address or "").strip()
    if _UNSAFE.search(address):
        raise ValidationError({field: ["Line breaks are not allowed."]})
    try:
        validate_email(address)
    except ValidationError as exc:
        raise ValidationError({field: ["Enter a valid email address."]}) from exc
    return address


def _clean_name(name: str) -> str:
    name = (name or "").strip()
    if _UNSAFE.search(name):
        raise ValidationError({"display_name": ["Line breaks are not allowed."]})
    return name[:255]


@transaction.atomic
def mailbox_alias_add(*, actor: User, mailbox: Mailbox, address: str,
                      display_name: str = "") -> MailboxAlias:
    """Add an extra From address to a mailbox (offered when sending)."""
    if mailbox.owner_id != actor.pk and not actor.is_administrator:
        raise RecordPermissionDenied("Only the owner of a mailbox may change it.")
    address = _clean_address(address)
    if address.lower() == mailbox.email_address.lower() or mailbox.aliases.filter(
            address__iexact=address).exists():
        raise ValidationError({"address": ["This mailbox already has this address."]})
    if OrganizationEmail.objects.filter(address__iexact=address).exists():
        raise ValidationError({"address": [
            "This is an organization email: it is offered to the users an administrator "
            "allows, once confirmed (Setup › Organization Emails), not as an alias."]})
    # Another user's mailbox address or alias: adding it would let this user send as them.
    if Mailbox.objects.exclude(owner=mailbox.owner_id).filter(email_address__iexact=address).exists() \
            or MailboxAlias.objects.exclude(mailbox__owner=mailbox.owner_id).filter(
                address__iexact=address).exists():
        raise ValidationError({"address": [
            "This address belongs to another user's mailbox: to send as it, connect that "
            "mailbox (with its password) instead."]})
    return MailboxAlias.objects.create(mailbox=mailbox, address=address,
                                       display_name=_clean_name(display_name))


def mailbox_alias_delete(*, actor: User, alias: MailboxAlias) -> None:
    if alias.mailbox.owner_id != actor.pk and not actor.is_administrator:
        raise RecordPermissionDenied("Only the owner of a mailbox may change it.")
    alias.delete()


# -- organization emails ---------------------------------------------------------------------

def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_admin(actor: User) -> None:
    if not actor.is_administrator:
        raise RecordPermissionDenied("Only administrators manage organization emails.")


def verification_tag(org_email: OrganizationEmail) -> str:
    """Message-ID label of confirmation mails, used to show how the last one went."""
    return f"crm.orgemail.{org_email.pk}"


def verification_mail(org_email: OrganizationEmail) -> Email | None:
    return (Email.objects.filter(message_id__startswith=verification_tag(org_email) + ".",
                                 source=Email.Source.CRM).order_by("-pk").first())


@transaction.atomic
def organization_email_add(*, actor: User, address: str, display_name: str,
                           link_for: Callable[[str], str]) -> OrganizationEmail:
    """Add an organization address (unverified) and send it a confirmation link."""
    _check_admin(actor)
    address = _clean_address(address)
    display_name = _clean_name(display_name)
    if not display_name:
        raise ValidationError({"display_name": ["Enter the name recipients will see."]})
    if OrganizationEmail.objects.filter(address__iexact=address).exists():
        raise ValidationError({"address": ["This organization email exists already."]})
    org_email = OrganizationEmail.objects.create(address=address, display_name=display_name,
                                                 created_by=actor)
    organization_email_send_confirmation(actor=actor, org_email=org_email, link_for=link_for)
    return org_email


@transaction.atomic
def organization_email_send_confirmation(*, actor: User, org_email: OrganizationEmail,
                                         link_for: Callable[[str], str]) -> Email:
    """Send (again) a confirmation link to the address, from the administrator's mailbox.
    A new link replaces the old one; only a hash of it is stored."""
    from .sending import email_send  # noqa: PLC0415

    _check_admin(actor)
    if org_email.is_verified:
        raise ValidationError({"address": ["This address is verified already."]})
    senders = [c for c in sender_choices(actor) if c.kind == "mailbox"]
    if not senders:
        raise ValidationError({"address": [
            "The confirmation link is sent from your mailbox: connect a mailbox with an "
            "outgoing (SMTP) server first."]})
    token = secrets.token_urlsafe(32)
    org_email.verification_token = _token_hash(token)
    org_email.verification_sent_at = timezone.now()
    org_email.save(update_fields=["verification_token", "verification_sent_at"])
    link = link_for(token)
    text = (f"Hello,\n\n{actor.get_full_name() or actor.username} added {org_email.address} "
            f"as an organization email of the CRM, to send as “{org_email.display_name}”.\n\n"
            f"To confirm that this address may be used, open (within {VERIFICATION_DAYS} "
            f"days):\n{link}\n\n"
            "If you did not expect this, ignore this message: the address stays unusable.\n")
    return email_send(actor=actor, from_address=senders[0].address, to=org_email.address,
                      subject=f"Confirm {org_email.address} as an organization email",
                      text=text, message_id_tag=verification_tag(org_email))


# A confirmation link stops working after this many days (a new one can be sent).
VERIFICATION_DAYS = 7


def organization_email_by_token(token: str) -> OrganizationEmail | None:
    """The unverified address this link confirms; None if the link is unknown, used,
    replaced by a newer one or older than VERIFICATION_DAYS."""
    if not token or len(token) > 200:
        return None
    return OrganizationEmail.objects.filter(
        verification_token=_token_hash(token), verified_at__isnull=True,
        verification_sent_at__gte=timezone.now() - timedelta(days=VERIFICATION_DAYS),
    ).first()


@transaction.atomic
def organization_email_verify(*, token: str) -> OrganizationEmail:
    org_email = organization_email_by_token(token)
    if org_email is None:
        raise ValidationError("This confirmation link is not valid (used already, replaced by a "
                              "newer one, or expired).")
    org_email.verified_at = timezone.now()
    org_email.verification_token = ""
    org_email.save(update_fields=["verified_at", "verification_token"])
    return org_email


def organization_email_delete(*, actor: User, org_email: OrganizationEmail) -> None:
    _check_admin(actor)
    org_email.delete()
