"""Read-side queries: what a user may see and change.

The rules, as users of hosted CRMs expect them:
- administrators see and change every record;
- managers see and change their own records and those of the users who report to them;
- everyone sees records shared with them, and changes those shared read-write;
- a standard user otherwise sees only what they own.
"""
from __future__ import annotations

from typing import TypeVar

from django.contrib.contenttypes.models import ContentType
from django.db.models import Q, QuerySet

from .models import Account, Contact, Deal, DealStage, Lead, OwnedRecord, RecordShare, User

R = TypeVar("R", bound=OwnedRecord)


def _team_ids(user: User) -> list[int]:
    return [user.pk, *User.objects.filter(manager=user).values_list("pk", flat=True)]


def _shared_ids(user: User, model: type[OwnedRecord], *, write: bool) -> QuerySet[RecordShare]:
    shares = RecordShare.objects.filter(
        user=user, content_type=ContentType.objects.get_for_model(model)
    )
    if write:
        shares = shares.filter(access=RecordShare.Access.READ_WRITE)
    return shares.values("object_id")


def records_visible_to(user: User, queryset: QuerySet[R]) -> QuerySet[R]:
    """The part of ``queryset`` that ``user`` may see."""
    return _restrict(user, queryset, write=False)


def records_editable_by(user: User, queryset: QuerySet[R]) -> QuerySet[R]:
    """The part of ``queryset`` that ``user`` may change or delete."""
    return _restrict(user, queryset, write=True)


def _restrict(user: User, queryset: QuerySet[R], *, write: bool) -> QuerySet[R]:
    if not user.is_authenticated or not user.is_active:
        return queryset.none()
    if user.is_administrator:
        return queryset
    owners = _team_ids(user) if user.is_manager else [user.pk]
    return queryset.filter(
        Q(owner_id__in=owners) | Q(pk__in=_shared_ids(user, queryset.model, write=write))
    )


def record_can_edit(*, user: User, record: OwnedRecord) -> bool:
    return records_editable_by(user, type(record).objects.filter(pk=record.pk)).exists()


def _search(queryset: QuerySet[R], query: str, fields: tuple[str, ...]) -> QuerySet[R]:
    query = query.strip()
    if not query:
        return queryset
    condition = Q()
    for word in query.split()[:8]:
        word_q = Q()
        for field in fields:
            word_q |= Q(**{f"{field}__icontains": word})
        condition &= word_q
    return queryset.filter(condition)


SEARCH_FIELDS: dict[type[OwnedRecord], tuple[str, ...]] = {
    Lead: ("first_name", "last_name", "email", "secondary_email", "company", "phone"),
    Contact: ("first_name", "last_name", "email", "secondary_email", "phone", "account__name"),
    Account: ("name", "website", "phone", "industry"),
    Deal: ("name", "contact__first_name", "contact__last_name", "account__name", "stage__name"),
}


def record_list(*, user: User, model: type[R], query: str = "") -> QuerySet[R]:
    """Records of ``model`` visible to ``user``, filtered by a free-text search."""
    queryset = records_visible_to(user, model.objects.all())
    if model is Deal:
        queryset = queryset.select_related("stage", "contact", "account", "owner")
    elif model is Contact:
        queryset = queryset.select_related("account", "owner")
    else:
        queryset = queryset.select_related("owner")
    return _search(queryset, query, SEARCH_FIELDS[model])


def deal_stages() -> QuerySet[DealStage]:
    return DealStage.objects.all()


def may_reassign_from(user: User, owner_id: int) -> bool:
    """Whether ``user`` may take a record away from its owner ``owner_id`` (give it to
    someone else): the owner, their manager, an administrator. Deactivated owners included:
    their records are kept so that they can be reassigned."""
    if user.is_administrator or owner_id == user.pk:
        return True
    return user.is_manager and owner_id in _team_ids(user)


def users_assignable_by(user: User) -> QuerySet[User]:
    """Users that ``user`` may set as a record's owner."""
    active = User.objects.filter(is_active=True)
    if user.is_administrator:
        return active
    if user.is_manager:
        return active.filter(pk__in=_team_ids(user))
    return active.filter(pk=user.pk)
