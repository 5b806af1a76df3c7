"""Record pages: list with search and paging, detail, create, edit, delete.

One set of views serves leads, contacts, accounts and deals; ``RECORD_KINDS`` says what each
shows. The views only translate HTTP to calls of ``crm.services`` and ``crm.selectors``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Count, Sum
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.views.decorators.http import require_http_methods

from . import services
from .exceptions import RecordPermissionDenied
from .forms import record_form_class
from .models import Account, Contact, Deal, DealStage, Lead, OwnedRecord
from .selectors import record_can_edit, record_list, records_visible_to

PAGE_SIZE = 25


@dataclass(frozen=True)
class RecordKind:
    model: type[OwnedRecord]
    slug: str  # URL segment, e.g. "leads"
    # (column title, attribute path) shown in the list
    columns: list[tuple[str, str]]
    # (label, attribute path) shown on the detail page
    details: list[tuple[str, str]]
    related: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.model._meta.verbose_name.title()

    @property
    def plural(self) -> str:
        return self.model._meta.verbose_name_plural.title()


RECORD_KINDS: dict[str, RecordKind] = {
    kind.slug: kind
    for kind in [
        RecordKind(
            Lead, "leads",
            columns=[("Name", "full_name"), ("Company", "company"), ("Email", "email"),
                     ("Status", "get_status_display"), ("Owner", "owner")],
            details=[("Company", "company"), ("Title", "title"), ("Email", "email"),
                     ("Secondary email", "secondary_email"), ("Phone", "phone"),
                     ("Mobile", "mobile"), ("Status", "get_status_display"),
                     ("Lead source", "source"), ("Owner", "owner"),
                     ("Description", "description")],
        ),
        RecordKind(
            Contact, "contacts",
            columns=[("Name", "full_name"), ("Account", "account"), ("Email", "email"),
                     ("Phone", "phone"), ("Owner", "owner")],
            details=[("Account", "account"), ("Title", "title"), ("Email", "email"),
                     ("Secondary email", "secondary_email"), ("Phone", "phone"),
                     ("Mobile", "mobile"), ("Owner", "owner"), ("Description", "description")],
            related=["deals"],
        ),
        RecordKind(
            Account, "accounts",
            columns=[("Name", "name"), ("Industry", "industry"), ("Phone", "phone"),
                     ("Website", "website"), ("Owner", "owner")],
            details=[("Website", "website"), ("Phone", "phone"), ("Industry", "industry"),
                     ("Owner", "owner"), ("Description", "description")],
            related=["contacts", "deals"],
        ),
        RecordKind(
            Deal, "deals",
            columns=[("Deal", "name"), ("Stage", "stage"), ("Amount", "amount"),
                     ("Contact", "contact"), ("Account", "account"), ("Owner", "owner")],
            details=[("Stage", "stage"), ("Amount", "amount"), ("Closing date", "closing_date"),
                     ("Contact", "contact"), ("Account", "account"), ("Owner", "owner"),
                     ("Description", "description")],
        ),
    ]
}


def _resolve(obj: object, attr_path: str) -> object:
    value: object = obj
    for part in attr_path.split("."):
        value = getattr(value, part, None)
        if callable(value):
            value = value()
        if value is None:
            return None
    return value


def _get_visible(request: HttpRequest, kind: RecordKind, pk: int) -> OwnedRecord:
    record = records_visible_to(request.user, kind.model.objects.filter(pk=pk)).first()
    if record is None:
        raise Http404(f"No such {kind.name.lower()}.")
    return record


@login_required
def home(request: HttpRequest) -> HttpResponse:
    counts = [
        (
            kind.plural,
            records_visible_to(request.user, kind.model.objects.all()).count(),
            reverse(f"{kind.model.url_name}-list"),
        )
        for kind in RECORD_KINDS.values()
    ]
    recent = records_visible_to(request.user, Deal.objects.all()).select_related("stage")[:5]
    return render(request, "crm/home.html", {"counts": counts, "recent_deals": recent})


@login_required
def record_list_view(request: HttpRequest, kind: RecordKind) -> HttpResponse:
    query = request.GET.get("q", "")
    page = Paginator(record_list(user=request.user, model=kind.model, query=query), PAGE_SIZE)
    page_obj = page.get_page(request.GET.get("page"))
    rows = [
        (record, [_resolve(record, attr) for _, attr in kind.columns]) for record in page_obj
    ]
    return render(
        request,
        "crm/record_list.html",
        {"kind": kind, "rows": rows, "page_obj": page_obj, "query": query},
    )


@login_required
def record_detail_view(request: HttpRequest, kind: RecordKind, pk: int) -> HttpResponse:
    record = _get_visible(request, kind, pk)
    details = [(label, _resolve(record, attr)) for label, attr in kind.details]
    related = {
        name: records_visible_to(request.user, getattr(record, name).all())
        for name in kind.related
    }
    return render(
        request,
        "crm/record_detail.html",
        {
            "kind": kind,
            "record": record,
            "details": details,
            "related": related,
            "can_edit": record_can_edit(user=request.user, record=record),
        },
    )


@login_required
@require_http_methods(["GET", "POST"])
def record_form_view(request: HttpRequest, kind: RecordKind, pk: int | None = None) -> HttpResponse:
    record = _get_visible(request, kind, pk) if pk is not None else None
    if record is not None and not record_can_edit(user=request.user, record=record):
        messages.error(request, "You may view this record but not change it.")
        return redirect(record)
    form_class = record_form_class(kind.model)
    form = form_class(request.POST or None, instance=record, user=request.user)
    if request.method == "POST" and form.is_valid():
        data = {name: form.cleaned_data[name] for name in form.fields}
        try:
            if record is None:
                record = services.record_create(actor=request.user, model=kind.model, data=data)
                messages.success(request, f"{kind.name} created.")
            else:
                # The form wrote the cleaned values onto the instance; reload so the service
                # compares against what is stored.
                record.refresh_from_db()
                record = services.record_update(actor=request.user, record=record, data=data)
                messages.success(request, f"{kind.name} saved.")
            return redirect(record)
        except ValidationError as exc:
            for field_name, errors in exc.message_dict.items():
                form.add_error(field_name if field_name in form.fields else None, errors)
    return render(request, "crm/record_form.html", {"kind": kind, "form": form, "record": record})


@login_required
@require_http_methods(["GET", "POST"])
def record_delete_view(request: HttpRequest, kind: RecordKind, pk: int) -> HttpResponse:
    record = _get_visible(request, kind, pk)
    if request.method == "POST":
        try:
            services.record_delete(actor=request.user, record=record)
        except RecordPermissionDenied as exc:
            messages.error(request, str(exc))
            return redirect(record)
        messages.success(request, f"{kind.name} “{record}” deleted.")
        return redirect(reverse(f"{kind.model.url_name}-list"))
    return render(request, "crm/record_confirm_delete.html", {"kind": kind, "record": record})


@login_required
def reports_view(request: HttpRequest) -> HttpResponse:
    """Pipeline summary: the visible deals per stage, their total and weighted amounts."""
    deals = records_visible_to(request.user, Deal.objects.all())
    by_stage = {
        row["stage"]: row
        for row in deals.values("stage").annotate(count=Count("pk"), total=Sum("amount"))
    }
    rows = []
    for stage in DealStage.objects.all():
        row = by_stage.get(stage.pk, {"count": 0, "total": None})
        total = row["total"] or 0
        rows.append(
            {"stage": stage, "count": row["count"], "total": total,
             "weighted": total * stage.probability / 100}
        )
    return render(request, "crm/reports.html", {"rows": rows})


@login_required
def setup_view(request: HttpRequest) -> HttpResponse:
    from rest_framework.authtoken.models import Token

    token = None
    if request.method == "POST" and request.POST.get("action") == "api-token":
        Token.objects.filter(user=request.user).delete()
        token = Token.objects.create(user=request.user).key
        messages.success(request, "A new API token was created; the old one no longer works.")
    has_token = Token.objects.filter(user=request.user).exists()
    return render(request, "crm/setup.html", {"token": token, "has_token": has_token})


def record_urlpatterns() -> list:
    patterns = []
    for kind in RECORD_KINDS.values():
        name, slug = kind.model.url_name, kind.slug
        patterns += [
            path(f"{slug}/", record_list_view, {"kind": kind}, name=f"{name}-list"),
            path(f"{slug}/new/", record_form_view, {"kind": kind}, name=f"{name}-create"),
            path(f"{slug}/<int:pk>/", record_detail_view, {"kind": kind}, name=f"{name}-detail"),
            path(f"{slug}/<int:pk>/edit/", record_form_view, {"kind": kind}, name=f"{name}-edit"),
            path(f"{slug}/<int:pk>/delete/", record_delete_view, {"kind": kind},
                 name=f"{name}-delete"),
        ]
    return patterns
