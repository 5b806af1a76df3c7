from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import BooleanField, ExpressionWrapper, Q, QuerySet
from django.http import HttpRequest

from . import services
from .models import Email, EmailLocation, Mailbox, MessageError


class MailboxAdminForm(forms.ModelForm):
    """Passwords are write-only: the form never renders the stored secret, and an empty
    input keeps it."""

    password = forms.CharField(
        required=False, widget=forms.PasswordInput(render_value=False),
        help_text="Leave empty to keep the stored password.",
    )
    smtp_password = forms.CharField(
        required=False, widget=forms.PasswordInput(render_value=False),
        help_text="Leave empty to keep the stored password.",
    )

    class Meta:
        model = Mailbox
        fields = "__all__"

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.initial.pop("password", None)
        self.initial.pop("smtp_password", None)

    # The admin's form is built from the model, which takes any text or JSON: without these,
    # "a.example, b.example" was saved as one "domain" that matches no mail (so mail of both
    # stayed shared with colleagues), and folders "INBOX" (a string, synced as the folders
    # I, N, B, O, X) or a size limit of 1 byte were saved too. Same rules as the API and the
    # mailbox page (mailsync/api/serializers.py).
    def _api_rule(self, name: str, value: Any) -> Any:  # noqa: ANN401
        from rest_framework.exceptions import ValidationError as ApiValidationError

        from .api.serializers import MailboxSerializer

        try:
            return getattr(MailboxSerializer(), f"validate_{name}")(value)
        except ApiValidationError as exc:
            raise forms.ValidationError([str(m) for m in exc.detail]) from exc

    def clean_excluded_domains(self) -> str:
        return self._api_rule("excluded_domains", self.cleaned_data.get("excluded_domains") or "")

    def clean_folders(self) -> list[str]:
        return self._api_rule("folders", self.cleaned_data.get("folders") or [])

    def clean_max_message_bytes(self) -> int | None:
        from .api.serializers import MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES

        value = self.cleaned_data.get("max_message_bytes")
        if value is not None and not MIN_MESSAGE_BYTES <= value <= MAX_MESSAGE_BYTES:
            raise forms.ValidationError(
                f"Between {MIN_MESSAGE_BYTES} (1 MB) and {MAX_MESSAGE_BYTES} (1 GB) bytes.")
        return value

    def clean_pop3_keep_days(self) -> int | None:
        value = self.cleaned_data.get("pop3_keep_days")
        if value is not None and not 1 <= value <= 3650:  # as the API and the options form
            raise forms.ValidationError("Between 1 and 3650 days (empty: keep the copy).")
        return value

    def clean(self) -> dict:
        cleaned = super().clean()
        if self.instance.pk:
            fields = ("incoming_host", "incoming_security", "protocol", "smtp_host", "smtp_security",
                      "smtp_username", "password", "smtp_password")
            before = {name: getattr(self.instance, name) for name in fields}
            after = {name: cleaned.get(name, before[name]) for name in fields}
            given = {name for name in ("password", "smtp_password") if cleaned.get(name)}
            after.update({name: before[name] for name in ("password", "smtp_password") if name not in given})
            for name, messages in services.secrets_to_reenter(before, after, given).items():
                self.add_error(name, messages)
        for name in ("password", "smtp_password"):
            if not cleaned.get(name) and self.instance.pk:
                cleaned[name] = getattr(self.instance, name)
        return cleaned


@admin.register(Mailbox)
class MailboxAdmin(admin.ModelAdmin):
    form = MailboxAdminForm
    list_display = ["email_address", "owner", "protocol", "incoming_host", "is_active"]
    list_filter = ["protocol", "is_active"]
    search_fields = ["email_address", "owner__username"]
    # Written by the sync as it runs: a form posted back wrote the values the page was opened
    # with over them (an error fixed since came back, and the poll skipped the mailbox for
    # good; the day's download count went back, past the provider's limit).
    readonly_fields = ["state", "messages_done", "messages_total", "bytes_done", "bytes_total",
                       "sync_started_at", "last_sync_at", "paused_until", "last_error",
                       "last_error_code", "budget_day", "budget_bytes_used", "lease_until",
                       "lease_holder", "sync_requested"]

    def save_model(self, request, obj, form, change) -> None:  # noqa: ANN001
        before = Mailbox.objects.get(pk=obj.pk) if change else None
        super().save_model(request, obj, form, change)
        services.mailbox_saved_by_admin(
            mailbox=obj, excluded_before=before.excluded_domain_set if before else set(),
            activated=obj.is_active and (not change or "is_active" in form.changed_data),
            limit_before=before.max_message_bytes if before else None,
            since_before=before.sync_since if before else None,
            reconnect=change and bool(services.ADMIN_CONNECTION_FIELDS & set(form.changed_data)),
            account_before=(before.incoming_host, before.username) if before else None)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Mail is changed by the sync and by the CRM's actions (which reach the IMAP server),
    never by hand here: the admin shows it to troubleshoot."""

    def has_add_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False

    def has_change_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False

    def has_delete_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


class EmailLocationInline(admin.TabularInline):
    model = EmailLocation
    fields = ["folder", "uidvalidity", "uid", "flags"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


@admin.register(Email)
class EmailAdmin(ReadOnlyAdmin):
    """What an operator needs to answer "where is this mail?": its mailbox, places, state and
    errors. Bodies and sources are not shown: a salesperson's mail is read in the CRM, under
    its sharing rules."""

    list_display = ["shown_subject", "shown_from_address", "mailbox", "date", "direction", "source",
                    "parse_state", "send_state", "truncated", "deleted_at"]
    list_filter = ["direction", "source", "parse_state", "send_state", "truncated"]
    search_fields = ["subject", "from_address", "message_id", "mailbox__email_address"]
    list_select_related = ["mailbox"]
    show_full_result_count = False  # a COUNT(*) over every mail on each page is slow
    fields = ["mailbox", "subject", "from_name", "from_address", "to", "cc", "date", "direction",
              "source", "message_id", "in_reply_to", "thread", "size", "seen", "flagged", "shareable",
              "truncated", "has_attachments", "parse_state", "parse_error", "send_state", "send_error",
              "deleted_at", "created_at"]
    readonly_fields = fields
    inlines = [EmailLocationInline]

    # Mail from or to an excluded domain is "never shared" (the mailbox's owner said so, for
    # their bank, lawyer, doctor...): an operator who is not the owner sees its mailbox,
    # places and state, not its subject, addresses or Message-ID (which names the domain),
    # and finds it by its mailbox or exact Message-ID, never by a word of its subject or
    # sender. Other mail is shown as before.
    PARTICULARS = ("subject", "from_name", "from_address", "to", "cc", "message_id", "in_reply_to",
                   "send_error")
    HIDDEN = "(hidden: mail from or to an excluded domain of this mailbox)"

    @staticmethod
    def _hidden(user: Any) -> Q:  # noqa: ANN401
        return Q(shareable=False) & ~Q(mailbox__owner=user)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Email]:
        return super().get_queryset(request).annotate(
            hidden=ExpressionWrapper(self._hidden(request.user), output_field=BooleanField()))

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Email],
                           search_term: str) -> tuple[QuerySet[Email], bool]:
        results, duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term:
            findable = Q(mailbox__email_address__iexact=term) | Q(message_id=term.strip("<>"))
            results = results.exclude(self._hidden(request.user) & ~findable)
        return results, duplicates

    # What the address may filter by (?direction__exact=, ?mailbox__id__exact=): the admin
    # allows any lookup on the model's own fields, so ?subject__icontains= or
    # ?text__icontains= found hidden mail by its subject, sender or body (found in review).
    FILTERABLE = frozenset({"id", "mailbox", "thread", "date", "direction", "source", "seen",
                            "flagged", "shareable", "truncated", "has_attachments", "parse_state",
                            "send_state", "deleted_at", "created_at"})
    _BY_ID = frozenset({"id", "pk", "exact", "in", "isnull"})

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        first, *rest = lookup.split("__")
        if first not in self.FILTERABLE or (first in {"mailbox", "thread"} and not set(rest) <= self._BY_ID):
            return False
        return super().lookup_allowed(lookup, value, request)

    @admin.display(description="subject")
    def shown_subject(self, obj: Email) -> str:
        return self.HIDDEN if obj.hidden else (obj.subject or "(no subject)")

    @admin.display(description="from address")
    def shown_from_address(self, obj: Email) -> str:
        return "" if obj.hidden else obj.from_address

    @admin.display(description="particulars")
    def hidden_particulars(self, obj: Email) -> str:
        return self.HIDDEN

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Email | None:
        obj = super().get_object(request, object_id, from_field)
        if obj is not None and obj.hidden:
            # The page's title and breadcrumbs show str(obj), the subject. Never saved: the
            # admin cannot change mail (ReadOnlyAdmin).
            obj.subject = self.HIDDEN
        return obj

    def get_fields(self, request: HttpRequest, obj: Email | None = None) -> list[str]:
        if obj is not None and getattr(obj, "hidden", False):
            return ["mailbox", "hidden_particulars",
                    *(name for name in self.fields if name not in {"mailbox", *self.PARTICULARS})]
        return list(self.fields)

    def get_readonly_fields(self, request: HttpRequest, obj: Email | None = None) -> list[str]:
        return self.get_fields(request, obj)


@admin.register(MessageError)
class MessageErrorAdmin(ReadOnlyAdmin):
    list_display = ["mailbox", "folder", "uid", "error", "created_at", "resolved_at"]
    list_filter = ["resolved_at"]
    search_fields = ["mailbox__email_address", "error"]
    list_select_related = ["mailbox", "folder"]
    fields = ["mailbox", "folder", "uidvalidity", "uid", "error", "created_at", "resolved_at"]
    readonly_fields = fields
