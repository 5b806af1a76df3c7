"""Query-parameter helpers shared by the API's views."""
from __future__ import annotations

from collections.abc import Mapping

import django_filters
from django import forms
from rest_framework.filters import OrderingFilter

TRUE_VALUES = frozenset({"true", "1", "yes", "on"})
FALSE_VALUES = frozenset({"false", "0", "no", "off"})


def flag(params: Mapping[str, str], name: str) -> bool:
    """A boolean query parameter as HTTP libraries send it: true, True, 1, yes, on (any case)
    are true; anything else, or none, false. (Python requests sends params={"x": True} as
    x=True.)"""
    value = params.get(name)
    return value is not None and value.strip().lower() in TRUE_VALUES


class _QueryBooleanField(forms.Field):
    def to_python(self, value: object) -> bool | None:
        if value is None or str(value).strip() == "":
            return None
        text = str(value).strip().lower()
        if text in TRUE_VALUES | FALSE_VALUES:
            return text in TRUE_VALUES
        raise forms.ValidationError("Enter true or false (also 1/0, yes/no, on/off).", code="invalid")


class QueryBooleanFilter(django_filters.BooleanFilter):
    """A boolean filter that takes the spellings ``flag`` takes (and their false ones) and
    refuses anything else with a 400: django-filter's knows true/false/1/0 only and drops
    any other value without a word, so ``?unread=yes`` listed read mail too."""

    field_class = _QueryBooleanField


class StableOrderingFilter(OrderingFilter):
    """The view's ``ordering`` or ``?ordering=``, then the primary key (in the direction of
    the last term): rows with equal values (many mails with one Date, or none) keep one order
    from request to request, so page-number paging lists each row once."""

    def get_ordering(self, request, queryset, view):  # noqa: ANN001, ANN201
        ordering = list(super().get_ordering(request, queryset, view) or [])
        if not any(term.lstrip("-") in {"pk", "id"} for term in ordering):
            ordering.append("-pk" if ordering and ordering[-1].startswith("-") else "pk")
        return ordering
