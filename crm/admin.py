"""The Django admin for every CRM model. Deactivation goes through ``crm.services``."""
from __future__ import annotations

import tempfile

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.contrib.contenttypes.admin import GenericTabularInline
from django.contrib.contenttypes.forms import BaseGenericInlineFormSet
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import FileResponse, HttpRequest, HttpResponse
from django.utils import timezone

from . import services
from .exceptions import RecordValidationError
from .models import Account, Contact, Deal, DealStage, Lead, OwnedRecord, RecordShare, User
from .signals import record_saved


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_display = ["username", "email", "first_name", "last_name", "role", "is_active", "manager"]
    list_filter = ["role", "is_active", "is_staff"]
    fieldsets = (
        *BaseUserAdmin.fieldsets,
        ("CRM", {"fields": ("role", "manager", "deactivated_at")}),
    )
    readonly_fields = ["deactivated_at"]
    actions = ["deactivate_users", "reactivate_users", "back_up_emails"]

    @admin.action(description="Deactivate selected users (keeps their records and mail)")
    def deactivate_users(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        done = 0
        for user in queryset:
            try:
                services.user_deactivate(actor=request.user, user=user)
                done += 1
            except (ValidationError, PermissionError) as exc:
                self.message_user(request, f"{user}: {exc}", messages.ERROR)
            except Exception as exc:  # PermissionDenied from the service
                self.message_user(request, f"{user}: {exc}", messages.ERROR)
        self.message_user(request, f"{done} user(s) deactivated.")

    @admin.action(description="Back up selected users' emails (a zip of .eml files)")
    def back_up_emails(self, request: HttpRequest, queryset: QuerySet[User]) -> HttpResponse | None:
        """Every stored mail of the selected users' mailboxes, byte for byte, with a
        manifest (mailsync.backup): what an administrator keeps or hands over when a
        salesperson leaves. Administrators only: it is other people's mail."""
        if not getattr(request.user, "is_administrator", False):
            self.message_user(request, "Only administrators may back up other users' emails.",
                              messages.ERROR)
            return None
        from mailsync.backup import write_mail_backup  # noqa: PLC0415  (crm does not import mailsync at load)

        users = list(queryset.order_by("username"))
        archive = tempfile.TemporaryFile()  # noqa: SIM115  (FileResponse closes it)
        try:
            summary = write_mail_backup(users, archive)
            archive.seek(0)
        except BaseException:
            archive.close()
            raise
        names = "-".join(u.username for u in users[:3]) + ("-and-more" if len(users) > 3 else "")
        response = FileResponse(archive, as_attachment=True, content_type="application/zip",
                                filename=f"mailroom-mail-{names}-{timezone.now():%Y%m%d}.zip")
        response["X-Mailroom-Emails"] = str(summary.emails)
        response["X-Mailroom-Missing"] = str(len(summary.missing))
        return response

    @admin.action(description="Reactivate selected users")
    def reactivate_users(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        for user in queryset:
            services.user_reactivate(actor=request.user, user=user)
        self.message_user(request, f"{queryset.count()} user(s) reactivated.")


def _share_errors(form: forms.BaseForm, record: object) -> None:
    """The sharing rules of ``services.record_share`` on one share form, as form errors."""
    user, access = form.cleaned_data.get("user"), form.cleaned_data.get("access")
    if user is None or access is None or record is None:
        return
    try:
        services.check_share(record=record, user=user, access=access)  # type: ignore[arg-type]
    except RecordValidationError as exc:
        for field, errors in exc.message_dict.items():
            form.add_error(field if field in form.fields else None, errors)


class ShareInlineFormSet(BaseGenericInlineFormSet):
    """A record's shares in its admin page: the same rules as sharing from the pages or the
    API (not with the owner, not with a deactivated user)."""

    def clean(self) -> None:
        super().clean()
        for form in self.forms:
            if (not hasattr(form, "cleaned_data") or not form.has_changed()
                    or self._should_delete_form(form)):
                continue
            _share_errors(form, self.instance)


class ShareInline(GenericTabularInline):
    model = RecordShare
    formset = ShareInlineFormSet
    ct_field = "content_type"
    ct_fk_field = "object_id"
    extra = 0
    fields = ["user", "access", "shared_by", "created_at"]
    readonly_fields = ["shared_by", "created_at"]


class RecordAdmin(admin.ModelAdmin):
    inlines = [ShareInline]
    list_select_related = ["owner"]
    readonly_fields = ["created_at", "modified_at"]
    list_filter = ["owner"]

    def save_formset(self, request, form, formset, change) -> None:  # noqa: ANN001
        if formset.model is not RecordShare:
            super().save_formset(request, form, formset, change)
            return
        # As record_share does: whoever adds or changes a share is its "shared by".
        for share in formset.save(commit=False):
            share.shared_by = request.user
            share.save()
        for share in formset.deleted_objects:
            share.delete()

    def save_model(self, request, obj, form, change) -> None:  # noqa: ANN001
        super().save_model(request, obj, form, change)
        # What record_create/record_update do besides saving: the record's past mail (by
        # its addresses, a deal's by its contact) attaches at once, as from the pages, and
        # mail linked by an address it no longer has goes.
        if change:
            previous = {name: form.initial.get(name) for name in form.changed_data}
            record_saved.send(sender=type(obj), record=obj, created=False, previous=previous)
        else:
            record_saved.send(sender=type(obj), record=obj, created=True)


@admin.register(Lead)
class LeadAdmin(RecordAdmin):
    list_display = ["__str__", "company", "email", "status", "owner", "modified_at"]
    list_filter = ["status", "owner"]
    search_fields = ["first_name", "last_name", "email", "secondary_email", "company"]


@admin.register(Contact)
class ContactAdmin(RecordAdmin):
    list_display = ["__str__", "account", "email", "owner", "modified_at"]
    search_fields = ["first_name", "last_name", "email", "secondary_email", "account__name"]
    autocomplete_fields = ["account"]


@admin.register(Account)
class AccountAdmin(RecordAdmin):
    list_display = ["name", "industry", "phone", "owner", "modified_at"]
    search_fields = ["name", "website"]


@admin.register(Deal)
class DealAdmin(RecordAdmin):
    list_display = ["name", "stage", "amount", "contact", "account", "owner", "modified_at"]
    list_filter = ["stage", "owner"]
    list_select_related = ["owner", "stage", "contact", "account"]
    search_fields = ["name", "contact__last_name", "account__name"]
    autocomplete_fields = ["contact", "account"]


@admin.register(DealStage)
class DealStageAdmin(admin.ModelAdmin):
    list_display = ["name", "probability", "order", "is_closed"]
    list_editable = ["probability", "order", "is_closed"]


class RecordShareForm(forms.ModelForm):
    class Meta:
        model = RecordShare
        fields = ["content_type", "object_id", "user", "access"]

    def clean(self) -> dict:
        cleaned = super().clean()
        content_type, object_id = cleaned.get("content_type"), cleaned.get("object_id")
        if content_type is None or object_id is None:
            return cleaned
        model = content_type.model_class()
        if model is None or not issubclass(model, OwnedRecord):
            self.add_error("content_type", "Only leads, contacts, accounts and deals are shared.")
            return cleaned
        record = model._default_manager.filter(pk=object_id).first()
        if record is None:
            self.add_error("object_id", f"There is no {content_type.name} with this id.")
            return cleaned
        _share_errors(self, record)
        return cleaned


@admin.register(RecordShare)
class RecordShareAdmin(admin.ModelAdmin):
    form = RecordShareForm
    list_display = ["__str__", "access", "shared_by", "created_at"]
    list_filter = ["access", "content_type"]
    readonly_fields = ["shared_by", "created_at"]

    def save_model(self, request, obj, form, change) -> None:  # noqa: ANN001
        obj.shared_by = request.user  # as record_share does
        super().save_model(request, obj, form, change)
