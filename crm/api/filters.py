"""Query-parameter helpers shared by the API's views."""
from __future__ import annotations

from collections.abc import Mapping

from rest_framework.filters import OrderingFilter

TRUE_VALUES = frozenset({"true", "1", "yes", "on"})


def flag(params: Mapping[str, str], name: str) -> bool:
    """A boolean query parameter as HTTP libraries send it: true, True, 1, yes, on (any case)
    are true; anything else, or none, false. (Python requests sends params={"x": True} as
    x=True.)"""
    value = params.get(name)
    return value is not None and value.strip().lower() in TRUE_VALUES


class StableOrderingFilter(OrderingFilter):
    """The view's ``ordering`` or ``?ordering=``, then the primary key (in the direction of
    the last term): rows with equal values (many mails with one Date, or none) keep one order
    from request to request, so page-number paging lists each row once."""

    def get_ordering(self, request, queryset, view):  # noqa: ANN001, ANN201
        ordering = list(super().get_ordering(request, queryset, view) or [])
        if not any(term.lstrip("-") in {"pk", "id"} for term in ordering):
            ordering.append("-pk" if ordering and ordering[-1].startswith("-") else "pk")
        return ordering
