"""Forms of the email pages. They check input shape; business rules stay in the services."""
from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from .models import Mailbox, Security, excluded_domain
from .providers import PRESETS, Preset, preset_for
from .sending import MAX_ATTACHMENTS_BYTES


# What the provider picker offers: the presets, then the two "other" entries.
PROVIDER_CHOICES = [
    *[(p.key, p.label) for p in PRESETS.values() if p.key != "custom"],
    ("other-imap", "Other IMAP"),
    ("other-pop3", "Other POP3"),
]


def provider_preset(choice: str) -> tuple[Preset, str | None]:
    """(preset, protocol fixed by the choice or None)."""
    if choice == "other-imap":
        return PRESETS["custom"], Mailbox.Protocol.IMAP
    if choice == "other-pop3":
        return PRESETS["custom"], Mailbox.Protocol.POP3
    return preset_for(choice), None


def preset_initial(choice: str, protocol: str | None = None) -> dict[str, Any]:
    preset, fixed = provider_preset(choice)
    protocol = fixed or protocol or Mailbox.Protocol.IMAP
    pop3 = protocol == Mailbox.Protocol.POP3
    return {
        "provider": choice,
        "protocol": protocol,
        "incoming_host": preset.pop3_host if pop3 else preset.imap_host,
        "incoming_port": (preset.pop3_port if pop3 else preset.imap_port) if preset.imap_host else (995 if pop3 else 993),
        "incoming_security": Security.SSL,
        "smtp_host": preset.smtp_host,
        "smtp_port": preset.smtp_port if preset.smtp_host else 587,
        "smtp_security": preset.smtp_security,
    }


def _attrs(form: forms.Form) -> None:
    for name, field in form.fields.items():
        field.widget.attrs.setdefault("id", f"id_{name}")
        if isinstance(field.widget, forms.Textarea) and name != "html":
            field.widget.attrs["rows"] = 4


class MailboxForm(forms.Form):
    """Add (or edit the connection of) a mailbox. Server details start from the preset."""

    provider = forms.ChoiceField(choices=PROVIDER_CHOICES, widget=forms.HiddenInput)
    protocol = forms.ChoiceField(
        choices=[(Mailbox.Protocol.IMAP, "IMAP (recommended)"), (Mailbox.Protocol.POP3, "POP3")],
        widget=forms.RadioSelect, initial=Mailbox.Protocol.IMAP, required=False,
    )
    display_name = forms.CharField(label="Name", max_length=255, required=False,
                                   help_text="Shown to recipients, e.g. “Ana Ruiz”.")
    email_address = forms.EmailField(label="Email address")
    password = forms.CharField(label="Password", widget=forms.PasswordInput(render_value=False),
                               required=False, strip=False)
    sync_since = forms.DateField(label="Sync mail since", required=False,
                                 widget=forms.DateInput(attrs={"type": "date"}),
                                 help_text="Leave empty to sync all mail.")
    incoming_host = forms.CharField(label="Incoming server", max_length=255, required=False)
    incoming_port = forms.IntegerField(label="Port", min_value=1, max_value=65535, required=False)
    incoming_security = forms.ChoiceField(label="Security", choices=Security.choices)
    username = forms.CharField(label="Username", max_length=255, required=False,
                               help_text="Usually the email address (the default).")
    smtp_host = forms.CharField(label="Outgoing (SMTP) server", max_length=255, required=False,
                                help_text="Needed to send mail from the CRM.")
    smtp_port = forms.IntegerField(label="SMTP port", min_value=1, max_value=65535, required=False)
    smtp_security = forms.ChoiceField(label="SMTP security", choices=Security.choices)
    smtp_username = forms.CharField(label="SMTP username", max_length=255, required=False,
                                    help_text="Only if it differs from the incoming login.")
    smtp_password = forms.CharField(label="SMTP password", required=False, strip=False,
                                    widget=forms.PasswordInput(render_value=False))
    aliases = forms.CharField(
        label="Additional “from” addresses", required=False, widget=forms.Textarea,
        help_text="Optional, one per line. You can choose them when sending; only mail received "
                  "in this mailbox is synced.",
    )

    def __init__(self, *args: Any, editing: Mailbox | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.editing = editing
        if editing is None:
            self.fields["password"].required = True
        else:
            del self.fields["aliases"]
            del self.fields["sync_since"]
            self.fields["password"].help_text = "Leave empty to keep the saved password."
            self.fields["smtp_password"].help_text = "Leave empty to keep the saved password."
        _attrs(self)
        self.fields["password"].widget.attrs["autocomplete"] = "new-password"
        self.fields["smtp_password"].widget.attrs["autocomplete"] = "new-password"

    @property
    def preset(self) -> Preset:
        choice = self.data.get("provider") or self.initial.get("provider") or "other-imap"
        return provider_preset(choice)[0]

    def clean_aliases(self) -> list[str]:
        lines = [line.strip() for line in self.cleaned_data.get("aliases", "").splitlines()]
        bad = []
        for line in filter(None, lines):
            try:
                forms.EmailField().clean(line)
            except ValidationError:
                bad.append(line)
        if bad:
            raise ValidationError(f"Not an email address: {', '.join(bad[:5])} (one per line).")
        return [line for line in lines if line]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        preset, fixed = provider_preset(data.get("provider") or "other-imap")
        data["protocol"] = fixed or data.get("protocol") or Mailbox.Protocol.IMAP
        pop3 = data.get("protocol") == Mailbox.Protocol.POP3
        if preset.key != "custom" and preset.pop3_host:
            # The page shows the preset's server of one protocol; switching the protocol swaps
            # it in mail.js only. Without JavaScript it came back unchanged: POP3 was tried on
            # the IMAP server. As the script, only what still is the other protocol's preset.
            before, after = ((preset.imap_host, preset.imap_port), (preset.pop3_host, preset.pop3_port))
            if not pop3:
                before, after = after, before
            if (data.get("incoming_host") or "").strip().lower() == before[0]:
                data["incoming_host"] = after[0]
            if data.get("incoming_port") == before[1]:
                data["incoming_port"] = after[1]
        if not data.get("incoming_host"):
            data["incoming_host"] = preset.pop3_host if pop3 else preset.imap_host
        if not data.get("incoming_port"):
            data["incoming_port"] = preset.pop3_port if pop3 else preset.imap_port
        if pop3 and preset.key != "custom" and not preset.pop3_host:
            self.add_error("protocol", f"{preset.label} does not offer POP3; use IMAP.")
        elif not data.get("incoming_host"):
            self.add_error("incoming_host", "Enter the incoming mail server (see Server Details).")
        if not data.get("smtp_host") and preset.smtp_host:
            data["smtp_host"] = preset.smtp_host
        if data.get("smtp_host") and not data.get("smtp_port"):
            data["smtp_port"] = preset.smtp_port or 587
        if data.get("smtp_username") and not data.get("smtp_password") and (
                self.editing is None or not self.editing.smtp_password):
            self.add_error("smtp_password", "Enter the password of the SMTP username.")
        return data

    def mailbox_data(self) -> dict[str, Any]:
        """The fields ``mailbox_create``/``mailbox_update`` take."""
        d = self.cleaned_data
        preset, _ = provider_preset(d["provider"])
        data = {
            "provider": preset.key,
            "protocol": d["protocol"],
            "display_name": d.get("display_name", ""),
            "email_address": d["email_address"],
            "password": d.get("password", ""),
            "incoming_host": d["incoming_host"].strip(),
            "incoming_port": d["incoming_port"],
            "incoming_security": d["incoming_security"],
            "username": (d.get("username") or "").strip() or d["email_address"],
            "smtp_host": (d.get("smtp_host") or "").strip(),
            "smtp_port": d.get("smtp_port"),
            "smtp_security": d["smtp_security"],
            "smtp_username": (d.get("smtp_username") or "").strip(),
            "smtp_password": d.get("smtp_password", ""),
        }
        if "sync_since" in d:
            data["sync_since"] = d.get("sync_since")
        return data


class MailboxOptionsForm(forms.Form):
    folders = forms.CharField(
        label="Folders to sync", required=False, widget=forms.Textarea,
        help_text="One folder per line. Empty: the Inbox and the Sent folder.",
    )
    sync_since = forms.DateField(label="Sync mail since", required=False,
                                 widget=forms.DateInput(attrs={"type": "date"}))
    pop3_delete_after_download = forms.TypedChoiceField(
        label="After download", coerce=lambda v: v == "remove", widget=forms.RadioSelect,
        choices=[("remove", "Remove mail from the server once it is safely stored"),
                 ("keep", "Leave a copy on the server")],
    )
    pop3_keep_days = forms.IntegerField(
        label="Remove the copy after (days)", required=False, min_value=1, max_value=3650,
        help_text="Empty: keep the copy on the server.",
    )
    sharing = forms.ChoiceField(
        label="Sharing", widget=forms.RadioSelect,
        choices=[(Mailbox.Sharing.PRIVATE, "Private — only you see this mailbox's mail"),
                 (Mailbox.Sharing.PUBLIC, "Public — mail linked to records is shown to "
                                          "everyone who can see those records")],
    )
    excluded_domains = forms.CharField(
        label="Exclude domains", required=False, widget=forms.Textarea,
        help_text="One domain per line (e.g. bank.example). Mail from or to them is never "
                  "shared, even from a public mailbox.",
    )

    def __init__(self, *args: Any, mailbox: Mailbox, **kwargs: Any) -> None:
        kwargs.setdefault("initial", {
            "folders": "\n".join(mailbox.folders),
            "sync_since": mailbox.sync_since,
            "pop3_delete_after_download": "remove" if mailbox.pop3_delete_after_download else "keep",
            "pop3_keep_days": mailbox.pop3_keep_days,
            "sharing": mailbox.sharing,
            "excluded_domains": mailbox.excluded_domains,
        })
        super().__init__(*args, **kwargs)
        self.mailbox = mailbox
        if mailbox.protocol != Mailbox.Protocol.POP3:
            del self.fields["pop3_delete_after_download"]
            del self.fields["pop3_keep_days"]
        else:
            del self.fields["folders"]  # POP3 has one folder
        _attrs(self)

    def clean_folders(self) -> list[str]:
        names = [line.strip() for line in self.cleaned_data.get("folders", "").splitlines()]
        bad = [n for n in names if n and (len(n) > 500 or any(ord(c) < 32 for c in n))]
        if bad:
            raise ValidationError("Folder names must be one line each and at most 500 characters.")
        return list(dict.fromkeys(n for n in names if n))

    def clean_excluded_domains(self) -> str:
        value = self.cleaned_data.get("excluded_domains", "")
        # models.excluded_domain: internationalized domains too, stored in ASCII form.
        lines = [line.strip() for line in value.splitlines() if line.strip()]
        bad = [line.lower().lstrip("@") for line in lines if excluded_domain(line) is None]
        if bad:
            raise ValidationError(f"Not a domain: {', '.join(bad[:5])} (one domain per line, "
                                  "like example.com).")
        return "\n".join(dict.fromkeys(excluded_domain(line) for line in lines))

    def options_data(self) -> dict[str, Any]:
        return {k: v for k, v in self.cleaned_data.items()}


class AliasForm(forms.Form):
    address = forms.EmailField(label="Address")
    display_name = forms.CharField(label="Display name", max_length=255, required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["address"].widget.attrs["id"] = "id_alias_address"
        self.fields["display_name"].widget.attrs["id"] = "id_alias_display_name"


class OrganizationEmailForm(forms.Form):
    address = forms.EmailField(label="Email address")
    display_name = forms.CharField(label="Display name", max_length=255,
                                   help_text="What recipients see, e.g. “Acme Sales”.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _attrs(self)


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data: Any, initial: Any = None) -> list[Any]:
        single = super().clean
        if isinstance(data, (list, tuple)):
            return [single(d, initial) for d in data if d]
        return [single(data, initial)] if data else []


class ComposeForm(forms.Form):
    from_address = forms.ChoiceField(label="From")
    to = forms.CharField(label="To", required=False,
                         help_text="Separate addresses with commas.")
    cc = forms.CharField(label="Cc", required=False)
    bcc = forms.CharField(label="Bcc", required=False)
    reply_to = forms.ChoiceField(label="Reply-To", required=False)
    subject = forms.CharField(label="Subject", max_length=998, required=False)
    html = forms.CharField(label="Message", required=False, widget=forms.Textarea(attrs={"rows": 12}))
    attachments = MultipleFileField(
        label="Attachments", required=False,
        help_text=f"Up to {MAX_ATTACHMENTS_BYTES // (1024 * 1024)} MB in all.",
    )
    # One per form shown: the same form sent twice (a second click on Send, a resubmit after
    # Back) is one email (sending.email_send's token).
    token = forms.CharField(required=False, max_length=100, widget=forms.HiddenInput)

    def __init__(self, *args: Any, senders: list[Any], **kwargs: Any) -> None:
        import secrets  # noqa: PLC0415

        kwargs.setdefault("initial", {})
        kwargs["initial"] = {**kwargs["initial"], "token": secrets.token_urlsafe(24)}
        super().__init__(*args, **kwargs)
        self.fields["from_address"].choices = [(s.address, s.label) for s in senders]
        self.fields["reply_to"].choices = [("", "— same as From —")] + [
            (s.address, s.label) for s in senders if s.kind == "organization"]
        if len(self.fields["reply_to"].choices) == 1:
            del self.fields["reply_to"]
        _attrs(self)
