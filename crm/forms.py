"""Forms for the record pages. Validation of business rules stays in ``crm.services``."""
from __future__ import annotations

from django import forms

from .models import Account, Contact, Deal, Lead, OwnedRecord, User
from .selectors import records_visible_to, users_assignable_by

FORM_FIELDS: dict[type[OwnedRecord], list[str]] = {
    Lead: [
        "first_name", "last_name", "company", "title", "email", "secondary_email", "phone",
        "mobile", "status", "source", "owner", "description",
    ],
    Contact: [
        "first_name", "last_name", "account", "title", "email", "secondary_email", "phone",
        "mobile", "owner", "description",
    ],
    Account: ["name", "website", "phone", "industry", "owner", "description"],
    Deal: [
        "name", "contact", "account", "amount", "stage", "closing_date", "owner", "description",
    ],
}


class RecordForm(forms.ModelForm):
    """A ModelForm whose choices only offer what the user may see or assign."""

    def __init__(self, *args, user: User, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        if "owner" in self.fields:
            self.fields["owner"].queryset = users_assignable_by(user)
            self.fields["owner"].required = False
            self.fields["owner"].help_text = "Leave empty to own it yourself."
        for name, model in (("contact", Contact), ("account", Account)):
            if name in self.fields:
                self.fields[name].queryset = records_visible_to(user, model.objects.all())
        if "closing_date" in self.fields:
            self.fields["closing_date"].widget = forms.DateInput(attrs={"type": "date"})
        for field in self.fields.values():
            if isinstance(field.widget, forms.Textarea):
                field.widget.attrs.setdefault("rows", 4)


def _formfield(field, **kwargs):  # noqa: ANN001, ANN003, ANN202
    if field.get_internal_type() == "URLField":
        # "example.com" means https://example.com, as browsers and Django 6 assume.
        kwargs.setdefault("assume_scheme", "https")
    return field.formfield(**kwargs)


def record_form_class(model: type[OwnedRecord]) -> type[RecordForm]:
    return forms.modelform_factory(
        model, form=RecordForm, fields=FORM_FIELDS[model], formfield_callback=_formfield
    )
