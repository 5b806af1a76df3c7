from __future__ import annotations

from django import forms
from django.contrib import admin

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

    def save_model(self, request, obj, form, change) -> None:  # noqa: ANN001
        before = Mailbox.objects.get(pk=obj.pk) if change else None
        super().save_model(request, obj, form, change)
        services.mailbox_saved_by_admin(
            mailbox=obj, excluded_before=before.excluded_domain_set if before else set(),
            activated=obj.is_active and (not change or "is_active" in form.changed_data),
            limit_before=before.max_message_bytes if before else None)


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

    list_display = ["subject", "from_address", "mailbox", "date", "direction", "source", "parse_state",
                    "send_state", "truncated", "deleted_at"]
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


@admin.register(MessageError)
class MessageErrorAdmin(ReadOnlyAdmin):
    list_display = ["mailbox", "folder", "uid", "error", "created_at", "resolved_at"]
    list_filter = ["resolved_at"]
    search_fields = ["mailbox__email_address", "error"]
    list_select_related = ["mailbox", "folder"]
    fields = ["mailbox", "folder", "uidvalidity", "uid", "error", "created_at", "resolved_at"]
    readonly_fields = fields
