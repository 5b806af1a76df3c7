"""Write-side operations on users and records: one function per state change.

Pages, the API, the admin console and management commands all call these, so the rules
(who may own, change, share or deactivate what) live in one place.
"""
from __future__ import annotations

from typing import Any, TypeVar

from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.utils import timezone

from .exceptions import RecordPermissionDenied, RecordValidationError
from .models import Account, Contact, Deal, OwnedRecord, RecordShare, User
from .selectors import may_reassign_from, record_can_edit, records_visible_to, users_assignable_by
from .signals import record_saved

R = TypeVar("R", bound=OwnedRecord)

# Foreign keys to other records: the actor must be able to see what they link to.
_LINKED_RECORDS = {"contact": Contact, "account": Account}


def _validate_links(actor: User, data: dict[str, Any]) -> None:
    for field, model in _LINKED_RECORDS.items():
        linked = data.get(field)
        if linked is not None and not records_visible_to(
            actor, model.objects.filter(pk=linked.pk)
        ).exists():
            raise RecordValidationError({field: [f"No such {field} visible to you."]})


def _validate_owner(actor: User, owner: User) -> None:
    if not users_assignable_by(actor).filter(pk=owner.pk).exists():
        raise RecordValidationError(
            {"owner": ["You may not assign records to this user (or the user is deactivated)."]}
        )


def _apply(record: R, data: dict[str, Any]) -> R:
    for name, value in data.items():
        setattr(record, name, value)
    if isinstance(record, Deal) and record.account_id is None and record.contact_id:
        # A deal with a contact but no account belongs to the contact's company.
        record.account_id = record.contact.account_id
    record.full_clean()
    record.save()
    return record


@transaction.atomic
def record_create(*, actor: User, model: type[R], data: dict[str, Any]) -> R:
    """Create a lead, contact, account or deal owned by ``data['owner']`` or the actor."""
    data = dict(data)
    owner = data.pop("owner", None) or actor
    _validate_owner(actor, owner)
    _validate_links(actor, data)
    record = _apply(model(owner=owner), data)
    record_saved.send(sender=model, record=record, created=True)
    return record


@transaction.atomic
def record_update(*, actor: User, record: R, data: dict[str, Any]) -> R:
    if not record_can_edit(user=actor, record=record):
        raise RecordPermissionDenied("You may view this record but not change it.")
    data = dict(data)
    owner = data.pop("owner", None)
    if owner is not None and owner.pk != record.owner_id:
        # Reassigning is for the owner, their manager or an administrator (whoever may
        # assign records to the current owner): a colleague the record is shared with for
        # writing could otherwise make it theirs, and the owner lose it.
        if not may_reassign_from(actor, record.owner_id):
            raise RecordPermissionDenied(
                "Only the record's owner, their manager or an administrator may change its owner.")
        _validate_owner(actor, owner)
        record.owner = owner
    _validate_links(actor, data)
    # The values before the change, for receivers that undo what an old value did (mail
    # linked by a contact's old address: mailsync).
    columns = {f.name: f.attname for f in type(record)._meta.concrete_fields}
    previous = {name: getattr(record, columns[name]) for name in data if name in columns}
    record = _apply(record, data)
    record_saved.send(sender=type(record), record=record, created=False, previous=previous)
    return record


@transaction.atomic
def record_delete(*, actor: User, record: OwnedRecord) -> None:
    if not record_can_edit(user=actor, record=record):
        raise RecordPermissionDenied("You may view this record but not delete it.")
    RecordShare.objects.filter(
        content_type=ContentType.objects.get_for_model(record), object_id=record.pk
    ).delete()
    record.delete()


@transaction.atomic
def record_share(
    *,
    actor: User,
    record: OwnedRecord,
    user: User,
    access: str = RecordShare.Access.READ,
) -> RecordShare:
    """Share ``record`` with ``user`` (or change the access of an existing share)."""
    if not record_can_edit(user=actor, record=record):
        raise RecordPermissionDenied("Only those who may change a record may share it.")
    check_share(record=record, user=user, access=access)
    share, _ = RecordShare.objects.update_or_create(
        content_type=ContentType.objects.get_for_model(record),
        object_id=record.pk,
        user=user,
        defaults={"access": access, "shared_by": actor},
    )
    return share


def check_share(*, record: OwnedRecord, user: User, access: str) -> None:
    """Raise RecordValidationError unless ``record`` may be shared with ``user`` at ``access``
    (the rules of ``record_share``, also applied by the admin console's share forms)."""
    if user.pk == record.owner_id:
        raise RecordValidationError({"user": ["The owner already has full access."]})
    if not user.is_active:
        raise RecordValidationError({"user": ["This user is deactivated."]})
    if access not in RecordShare.Access.values:
        raise RecordValidationError({"access": [f"Access must be one of {RecordShare.Access.values}."]})


@transaction.atomic
def record_unshare(*, actor: User, record: OwnedRecord, user: User) -> None:
    if not record_can_edit(user=actor, record=record):
        raise RecordPermissionDenied("Only those who may change a record may unshare it.")
    RecordShare.objects.filter(
        content_type=ContentType.objects.get_for_model(record), object_id=record.pk, user=user
    ).delete()


@transaction.atomic
def user_deactivate(*, actor: User, user: User) -> User:
    """Deactivate ``user``: no more logins or API tokens; records and mail are kept."""
    if not actor.is_administrator:
        raise RecordPermissionDenied("Only administrators may deactivate users.")
    if user.pk == actor.pk:
        raise RecordValidationError({"user": ["You cannot deactivate yourself."]})
    user.is_active = False
    user.deactivated_at = timezone.now()
    user.save(update_fields=["is_active", "deactivated_at"])
    # Tokens would otherwise keep working for API clients.
    from rest_framework.authtoken.models import Token

    Token.objects.filter(user=user).delete()
    return user


@transaction.atomic
def user_reactivate(*, actor: User, user: User) -> User:
    if not actor.is_administrator:
        raise RecordPermissionDenied("Only administrators may reactivate users.")
    user.is_active = True
    user.deactivated_at = None
    user.save(update_fields=["is_active", "deactivated_at"])
    return user
