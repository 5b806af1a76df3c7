from __future__ import annotations

from django import forms
from django.contrib import admin

from . import services
from .models import Mailbox


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
