from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from crm.api.serializers import reject_unknown_fields

from .. import selectors
from ..models import Attachment, Email, Mailbox, excluded_domain
from ..providers import PRESETS, preset_for, preset_servers

# The limit of one message's size a mailbox may be given (max_message_bytes): below 1 MB
# ordinary mail would be cut to headers; memory follows it (a few times it per message).
MIN_MESSAGE_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024 * 1024


class MailboxSerializer(serializers.ModelSerializer):
    """Passwords are write-only: no response ever carries them."""

    password = serializers.CharField(write_only=True, required=False, allow_blank=True,
                                     style={"input_type": "password"})
    smtp_password = serializers.CharField(write_only=True, required=False, allow_blank=True,
                                          style={"input_type": "password"})
    # One of the presets (the model's field is free text): "gmial" or the page's "other-imap"
    # was stored, its app-password hint and download budget silently those of "custom".
    provider = serializers.ChoiceField(
        choices=[(p.key, p.label) for p in PRESETS.values()], required=False,
        help_text="The provider preset; custom for any other server.")

    class Meta:
        model = Mailbox
        fields = [
            "id", "display_name", "email_address", "protocol", "provider",
            "incoming_host", "incoming_port", "incoming_security", "username", "password",
            "smtp_host", "smtp_port", "smtp_security", "smtp_username", "smtp_password",
            "folders", "sync_since", "sharing", "excluded_domains", "pop3_delete_after_download",
            "pop3_keep_days", "max_message_bytes", "is_active", "state",
            "last_sync_at", "last_error", "created_at",
        ]
        read_only_fields = ["id", "is_active", "state", "last_sync_at", "last_error", "created_at"]
        # As the mailbox page's options form (mailsync.forms.MailboxOptionsForm).
        extra_kwargs = {
            "pop3_delete_after_download": {
                "help_text": "POP3 only: remove mail from the server once it is safely stored "
                             "(default), or leave a copy."},
            "pop3_keep_days": {
                "min_value": 1, "max_value": 3650,
                "help_text": "POP3 only, with a copy left on the server: remove it after N days "
                             "(null: keep it)."},
            "max_message_bytes": {
                "min_value": MIN_MESSAGE_BYTES, "max_value": MAX_MESSAGE_BYTES,
                "help_text": "Larger messages are kept as their headers only, with a notice "
                             "(1 MB to 1 GB; default 50 MB)."},
            # Filled in from the provider preset when left out of a create (validate()).
            "incoming_host": {"required": False, "help_text": "Left out with a provider preset: "
                                                              "the preset's server."},
            "incoming_port": {"required": False, "help_text": "Left out with a provider preset: "
                                                              "the preset's port."},
        }

    def validate_excluded_domains(self, value: str) -> str:
        # models.excluded_domain: internationalized domains too, stored in ASCII form.
        lines = [line.strip() for line in value.splitlines() if line.strip()]
        bad = [line for line in lines if excluded_domain(line) is None]
        if bad:
            raise serializers.ValidationError(f"Not a domain: {', '.join(bad[:5])} (one domain per line).")
        return "\n".join(excluded_domain(line) for line in lines)

    def validate_folders(self, value: object) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise serializers.ValidationError("A list of folder names.")
        return value

    def validate(self, attrs: dict) -> dict:
        """The POP3 options are for POP3 mailboxes (the page shows them for those only): on
        an IMAP mailbox a change is refused, not dropped; the value it has already (a GET
        body sent back) is accepted. A name the mailbox does not have ({"pasword": ...}) is
        refused too, as in an email PATCH: it answered 200 and changed nothing."""
        reject_unknown_fields(self)
        instance = self.instance
        protocol = attrs.get("protocol", instance.protocol if instance else Mailbox.Protocol.IMAP)
        if instance is None:
            attrs = self._servers_from_preset(attrs, protocol)
        if protocol != Mailbox.Protocol.POP3:
            errors = {}
            for name in ("pop3_delete_after_download", "pop3_keep_days"):
                if name in attrs:
                    current = (getattr(instance, name) if instance
                               else Mailbox._meta.get_field(name).get_default())
                    if attrs[name] != current:
                        errors[name] = ["Only POP3 mailboxes have this option."]
            if errors:
                raise serializers.ValidationError(errors)
        return attrs


    @staticmethod
    def _servers_from_preset(attrs: dict, protocol: str) -> dict:
        """A new mailbox with a provider preset gets the preset's servers for what it leaves
        out, as on the setup page ({"provider": "gmail", "email_address", "username",
        "password"} is enough); what it gives is kept."""
        provider = attrs.get("provider", "custom")
        preset = preset_for(provider)
        given = {name for name in ("incoming_host", "incoming_port", "incoming_security",
                                   "smtp_host", "smtp_port", "smtp_security")
                 if attrs.get(name) not in (None, "")}
        # The preset's port and security are for the preset's server, not for one given.
        if "incoming_host" in given:
            given |= {"incoming_port", "incoming_security"}
        if "smtp_host" in given:
            given |= {"smtp_port", "smtp_security"}
        filled = dict(attrs)
        filled.update({k: v for k, v in preset_servers(provider, protocol).items() if k not in given})
        if protocol == Mailbox.Protocol.POP3 and preset.key != "custom" and not preset.pop3_host \
                and "incoming_host" not in given:
            raise serializers.ValidationError({"protocol": [f"{preset.label} does not offer POP3; use IMAP."]})
        errors = {}
        if not filled.get("incoming_host"):
            errors["incoming_host"] = ["Enter the incoming mail server (or choose a provider preset)."]
        if not filled.get("incoming_port"):
            errors["incoming_port"] = ["Enter the incoming server's port (993 for IMAP over SSL/TLS, "
                                       "995 for POP3)."]
        if errors:
            raise serializers.ValidationError(errors)
        if filled.get("smtp_host") and not filled.get("smtp_port"):
            # A server the user gave (the preset's comes with its port): the port of its
            # security (STARTTLS by default), never the preset's (465 with STARTTLS never
            # connects).
            filled["smtp_port"] = 465 if filled.get("smtp_security") == "ssl" else 587
        return filled


class MailboxStatusSerializer(serializers.Serializer):
    state = serializers.CharField()
    state_display = serializers.CharField()
    messages_done = serializers.IntegerField()
    messages_total = serializers.IntegerField()
    bytes_done = serializers.IntegerField()
    bytes_total = serializers.IntegerField()
    estimated_completion = serializers.DateTimeField(allow_null=True)
    last_sync_at = serializers.DateTimeField(allow_null=True)
    paused_until = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField()
    last_error_code = serializers.CharField()
    interrupted = serializers.BooleanField(
        help_text="State is 'syncing' but no run is going on (the worker stopped): the next "
                  "check, within 5 minutes, resumes where it stopped.")
    needs_user = serializers.BooleanField(
        help_text="The error needs the user (password, TLS or settings); other errors are retried by themselves.")
    emails_stored = serializers.IntegerField(help_text="Emails of this mailbox in the CRM.")
    message_errors = serializers.ListField(child=serializers.DictField())
    emails_unparsed = serializers.IntegerField()


class AttachmentSerializer(serializers.ModelSerializer):
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = Attachment
        fields = ["id", "filename", "content_type", "size", "inline", "download_url"]

    def get_download_url(self, obj: Attachment) -> str:
        return f"/api/v1/emails/{obj.email_id}/attachments/{obj.pk}/"


class EmailListSerializer(serializers.ModelSerializer):
    folders = serializers.SerializerMethodField()

    class Meta:
        model = Email
        fields = [
            "id", "mailbox", "message_id", "subject", "date", "from_name", "from_address",
            "to", "cc", "direction", "source", "seen", "flagged", "has_attachments", "thread",
            "size", "folders", "send_state", "send_error",
        ]

    def get_folders(self, obj: Email) -> list[str]:
        return selectors.email_folders(obj.locations.all())  # prefetched with their folders


class EmailDetailSerializer(EmailListSerializer):
    html = serializers.SerializerMethodField()
    blocked_remote_images = serializers.SerializerMethodField()
    attachments = AttachmentSerializer(many=True, read_only=True)
    links = serializers.SerializerMethodField()

    class Meta(EmailListSerializer.Meta):
        fields = [*EmailListSerializer.Meta.fields, "text", "html", "blocked_remote_images",
                  "attachments", "in_reply_to", "references", "parse_state", "parse_error", "links"]

    def _sanitized(self, obj: Email):  # noqa: ANN202
        if not hasattr(obj, "_sanitized"):
            from crm.api.filters import flag

            from ..mime import sanitize_html

            request = self.context.get("request")
            allow = bool(request and flag(request.query_params, "images"))
            cid_urls = {
                a.content_id: f"/api/v1/emails/{obj.pk}/attachments/{a.pk}/?inline=1"
                for a in obj.attachments.all() if a.content_id
            }
            obj._sanitized = sanitize_html(obj.html, allow_remote_images=allow, cid_urls=cid_urls)
        return obj._sanitized

    def get_html(self, obj: Email) -> str:
        return self._sanitized(obj).html if obj.html else ""

    def get_blocked_remote_images(self, obj: Email) -> int:
        return self._sanitized(obj).blocked_remote_images if obj.html else 0

    def get_links(self, obj: Email) -> list[dict[str, int | None]]:
        """The records the mail is attached to, those the viewer may see: a colleague who sees
        it through a shared deal is not told which other records it belongs to, nor of a
        record that only had it in Bcc (the mailbox's owner is)."""
        from crm.models import Contact, Deal, Lead
        from crm.selectors import records_visible_to

        request = self.context.get("request")
        user = getattr(request, "user", None)
        links = list(obj.links.all())
        links = selectors.email_links_seen_by(user=user, email=obj, links=links) if user else []
        visible: dict[str, set[int]] = {}
        for field, model in (("lead", Lead), ("contact", Contact), ("deal", Deal)):
            ids = {getattr(link, f"{field}_id") for link in links} - {None}
            visible[field] = set(records_visible_to(user, model.objects.filter(pk__in=ids))
                                 .values_list("pk", flat=True)) if ids and user else set()
        return [{"lead": link.lead_id, "contact": link.contact_id, "deal": link.deal_id}
                for link in links
                if any(getattr(link, f"{field}_id") in visible[field] for field in visible)]


class EmailUpdateSerializer(serializers.Serializer):
    seen = serializers.BooleanField(required=False)
    flagged = serializers.BooleanField(required=False)
    folder = serializers.CharField(required=False, max_length=500)

    def validate(self, attrs: dict) -> dict:
        """Refuse what would change nothing: a name guessed from a filter ({"read": true},
        {"unread": false}) or an empty body is a 400, not a 200 that left the mail as it was."""
        given = self.initial_data if hasattr(self.initial_data, "keys") else {}
        unknown = sorted(str(name) for name in given.keys() if name not in self.fields)
        if unknown:
            raise serializers.ValidationError(
                {name: ["Unknown field: only seen, flagged and folder can be changed."]
                 for name in unknown})
        if not attrs:
            raise serializers.ValidationError(
                {"non_field_errors": ["Give at least one of seen, flagged, folder."]})
        return attrs


@extend_schema_field({"oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
                      "example": ["Grace Hopper <grace@navy.example>"]})
class AddressListField(serializers.Field):
    """Addresses as a list of strings or one comma-separated string."""

    default_error_messages = {"invalid": "A list of addresses or one comma-separated string."}

    def to_internal_value(self, data: object) -> list[str]:
        if isinstance(data, str):
            return [data] if data.strip() else []
        if isinstance(data, list) and all(isinstance(item, str) for item in data):
            return data
        self.fail("invalid")
        return []

    def to_representation(self, value: list[str]) -> list[str]:
        return value


class EmailSendSerializer(serializers.Serializer):
    """What ``POST /api/v1/emails/send/`` takes: the fields of the compose page."""

    from_address = serializers.CharField(max_length=320, help_text="One of your sending addresses.")
    to = AddressListField(required=False, default=list)
    cc = AddressListField(required=False, default=list)
    bcc = AddressListField(required=False, default=list)
    reply_to = serializers.CharField(required=False, allow_blank=True, default="",
                                     help_text="A verified organization email (optional).")
    subject = serializers.CharField(allow_blank=True, max_length=998, trim_whitespace=False)
    html = serializers.CharField(required=False, allow_blank=True, default="", trim_whitespace=False)
    text = serializers.CharField(required=False, allow_blank=True, default="", trim_whitespace=False)
    lead = serializers.IntegerField(required=False, help_text="Send from this lead (id).")
    contact = serializers.IntegerField(required=False)
    deal = serializers.IntegerField(required=False)
    in_reply_to = serializers.IntegerField(required=False, help_text="Id of the email replied to.")
    # Empty files are sent as mail clients send them; refused, the error came out as
    # "{2: [ErrorDetail(...)]}" (a ListField child error).
    attachments = serializers.ListField(child=serializers.FileField(allow_empty_file=True),
                                        required=False, default=list,
                                        help_text="Files (multipart/form-data), at most 18 MB "
                                                  "in all: a larger upload is a 400 as soon as "
                                                  "it passes the limit.")

    def validate(self, attrs: dict) -> dict:
        if sum(1 for name in ("lead", "contact", "deal") if attrs.get(name) is not None) > 1:
            raise serializers.ValidationError({"non_field_errors": ["Give at most one of lead, contact, deal."]})
        return attrs
