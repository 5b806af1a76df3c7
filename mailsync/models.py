"""Mailboxes, their folders and sync cursors, and the emails synced from them.

Idempotency comes from the data: a message location is unique per (folder, UIDVALIDITY, UID),
an email is unique per (mailbox, fingerprint), and a folder's cursor advances in the same
transaction as the rows it covers.
"""
from __future__ import annotations

import re

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from crm.encryption import EncryptedTextField

# A domain in ASCII form. The top-level label may be an IDNA one ("xn--p1ai" is .рф): with
# letters only there, no domain under an internationalized TLD could be excluded.
_ASCII_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})$")


def excluded_domain(line: str) -> str | None:
    """One line of an excluded-domains list as it is stored: lower-case, without "@", in
    ASCII (IDNA, "bücher.example" -> "xn--bcher-kva.example": the form mail headers carry);
    None if it is not a domain. The one rule of the API, the mailbox page and the admin."""
    value = line.strip().lower().lstrip("@")
    try:
        value = value.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return value if _ASCII_DOMAIN.match(value) else None


class Security(models.TextChoices):
    SSL = "ssl", "SSL/TLS"
    STARTTLS = "starttls", "STARTTLS"
    NONE = "none", "None (plain text)"


class Mailbox(models.Model):
    """One connected mailbox. Passwords are encrypted at rest and never leave the server."""

    class Protocol(models.TextChoices):
        IMAP = "imap", "IMAP"
        POP3 = "pop3", "POP3"

    class Sharing(models.TextChoices):
        PRIVATE = "private", "Private"
        PUBLIC = "public", "Public"

    class State(models.TextChoices):
        NEW = "new", "Not synced yet"
        SYNCING = "syncing", "Sync in progress"
        COMPLETED = "completed", "Completed"
        PAUSED = "paused", "Paused (provider limit)"
        ERROR = "error", "Error"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="mailboxes"
    )
    display_name = models.CharField(max_length=255, blank=True)
    email_address = models.EmailField()
    protocol = models.CharField(max_length=10, choices=Protocol.choices, default=Protocol.IMAP)
    provider = models.CharField(max_length=50, default="custom")

    incoming_host = models.CharField(max_length=255)
    incoming_port = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(65535)])
    incoming_security = models.CharField(
        max_length=10, choices=Security.choices, default=Security.SSL
    )
    username = models.CharField(max_length=255)
    password = EncryptedTextField(blank=True)

    smtp_host = models.CharField(max_length=255, blank=True)
    smtp_port = models.PositiveIntegerField(null=True, blank=True,
                                            validators=[MinValueValidator(1), MaxValueValidator(65535)])
    smtp_security = models.CharField(
        max_length=10, choices=Security.choices, default=Security.STARTTLS
    )
    # Empty: log in to SMTP with the incoming username and password.
    smtp_username = models.CharField(max_length=255, blank=True)
    smtp_password = EncryptedTextField(blank=True)

    # Empty list: INBOX and the Sent folder (found by SPECIAL-USE or a common name).
    folders = models.JSONField(default=list, blank=True)
    sync_since = models.DateField(null=True, blank=True, help_text="Only sync mail since this day.")
    sharing = models.CharField(max_length=10, choices=Sharing.choices, default=Sharing.PRIVATE)
    excluded_domains = models.TextField(
        blank=True, help_text="Mail from or to these domains (one per line) is never shared."
    )

    is_active = models.BooleanField(
        default=False, help_text="Only one mailbox per user is fetched at a time."
    )
    # POP3 options: remove mail from the server once it is safely stored (what POP3 users
    # expect), or leave a copy, optionally for N days.
    pop3_delete_after_download = models.BooleanField(default=True)
    pop3_keep_days = models.PositiveIntegerField(
        null=True, blank=True, help_text="With a copy left on the server: remove it after N days."
    )
    # Larger messages are kept as headers only, with a notice (never dropped silently).
    max_message_bytes = models.PositiveBigIntegerField(default=50 * 1024 * 1024)

    # Status a user can watch.
    state = models.CharField(max_length=20, choices=State.choices, default=State.NEW)
    messages_done = models.PositiveIntegerField(default=0)
    messages_total = models.PositiveIntegerField(default=0)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    sync_started_at = models.DateTimeField(null=True, blank=True)
    last_sync_at = models.DateTimeField(null=True, blank=True)
    paused_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    last_error_code = models.CharField(max_length=50, blank=True)
    # Errors only the user can fix (a new password, a certificate, the settings): no login
    # is tried again on their own until they do (the poll, opening mail).
    USER_ERROR_CODES = ("auth_failed", "tls_error", "config_error")
    # Provider download budget, counted per UTC day.
    budget_day = models.DateField(null=True, blank=True)
    budget_bytes_used = models.BigIntegerField(default=0)
    # Lease used as the sync lock where PostgreSQL advisory locks are unavailable (SQLite).
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_holder = models.CharField(max_length=300, blank=True, default="")  # "host:pid" (SQLite)
    # A sync was asked for while one ran (IDLE, "Sync now", the poll): the running one queues
    # one more when it ends, instead of the request retrying against the lock.
    sync_requested = models.BooleanField(default=False)

    created_at = models.DateTimeField(auto_now_add=True)
    modified_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "mailboxes"
        constraints = [
            # One active mailbox per user, enforced by the database, not only by a form.
            models.UniqueConstraint(
                fields=["owner"], condition=Q(is_active=True), name="mailbox_one_active_per_owner"
            ),
            models.UniqueConstraint(
                fields=["owner", "email_address"], name="mailbox_unique_address_per_owner"
            ),
        ]

    def __str__(self) -> str:
        return self.email_address

    @property
    def excluded_domain_set(self) -> set[str]:
        domains = {
            line.strip().lower().lstrip("@")
            for line in self.excluded_domains.splitlines()
            if line.strip()
        }
        # Also the Unicode spelling of an internationalized domain: mail of SMTPUTF8 senders
        # carries "банк.рф" where other mail carries "xn--80ab2al.xn--p1ai".
        for domain in list(domains):
            if "xn--" in domain:
                try:
                    domains.add(domain.encode("ascii").decode("idna"))
                except UnicodeError:
                    pass
        return domains


class MailFolder(models.Model):
    """A server folder being synced and its cursor.

    Invariant: every message with ``uid_low <= UID <= uid_high`` under ``uidvalidity`` is
    stored. New mail is fetched above ``uid_high``; the initial sync walks newest first,
    moving ``uid_low`` down until nothing older is left (``backfill_done``).
    """

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="mail_folders")
    name = models.CharField(max_length=500)
    special_use = models.CharField(max_length=20, blank=True)
    uidvalidity = models.BigIntegerField(null=True, blank=True)
    uid_high = models.BigIntegerField(default=0)
    uid_low = models.BigIntegerField(null=True, blank=True)
    backfill_done = models.BooleanField(default=False)
    highestmodseq = models.BigIntegerField(null=True, blank=True)
    # Cheap no-change check: compared against STATUS before any heavier command.
    last_uidnext = models.BigIntegerField(null=True, blank=True)
    last_exists = models.BigIntegerField(null=True, blank=True)
    last_synced_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "name"], name="mailfolder_unique_name")
        ]

    def __str__(self) -> str:
        return f"{self.mailbox} / {self.name}"


class MailboxAlias(models.Model):
    """An extra "from" address of a mailbox, offered when sending."""

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="aliases")
    address = models.EmailField()
    display_name = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "address"], name="alias_unique_address")
        ]

    def __str__(self) -> str:
        return self.address


class Pop3Message(models.Model):
    """A message seen on a POP3 server, by UIDL (or a header hash where UIDL is missing or
    not unique). Recorded in the same transaction as the stored email, before any DELE."""

    class KeyKind(models.TextChoices):
        UIDL = "uidl", "UIDL"
        HASH = "hash", "Header hash"

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="pop3_messages")
    key = models.CharField(max_length=255)
    key_kind = models.CharField(max_length=10, choices=KeyKind.choices, default=KeyKind.UIDL)
    email = models.ForeignKey("Email", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    size = models.PositiveBigIntegerField(default=0)
    downloaded_at = models.DateTimeField(auto_now_add=True)
    deleted_from_server_at = models.DateTimeField(null=True, blank=True)
    # Over the mailbox's size limit: only the headers were imported, so the message is left
    # on the server whatever the mode (deleting it would lose its body).
    truncated = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "key"], name="pop3message_unique_key")
        ]


class Thread(models.Model):
    # No index of its own: thread_unique_key (mailbox, key) serves lookups by mailbox.
    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="threads", db_index=False)
    # The root Message-ID (first of References, else In-Reply-To, else the mail's own id).
    key = models.CharField(max_length=1000)
    subject = models.CharField(max_length=1000, blank=True)
    last_date = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "key"], name="thread_unique_key")
        ]
        # One conversation across mailboxes (selectors._grouped): threads by key alone.
        indexes = [models.Index(fields=["key"], name="thread_key")]


class Email(models.Model):
    """One message in one mailbox, however many folders it sits in."""

    class Direction(models.TextChoices):
        RECEIVED = "received", "Received"
        SENT = "sent", "Sent"

    class Source(models.TextChoices):
        SYNC = "sync", "Mailbox sync"
        CRM = "crm", "Sent from the CRM"
        BCC_DROPBOX = "bcc_dropbox", "BCC Dropbox"

    class ParseState(models.TextChoices):
        PENDING = "pending", "Pending"
        PARSED = "parsed", "Parsed"
        FAILED = "failed", "Failed"

    # No index of its own: email_unique_fingerprint and email_mailbox_date start with it.
    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="emails", db_index=False)
    # Message-ID + content hash (or a derived key): the same mail in two folders is one row;
    # two mails that merely share a Message-ID are not merged.
    fingerprint = models.CharField(max_length=200)
    message_id = models.CharField(max_length=1000, blank=True, db_index=True)
    content_hash = models.CharField(max_length=64)
    in_reply_to = models.CharField(max_length=1000, blank=True)
    references = models.JSONField(default=list, blank=True)
    thread = models.ForeignKey(Thread, null=True, on_delete=models.SET_NULL, related_name="emails")

    subject = models.CharField(max_length=1000, blank=True)
    date = models.DateTimeField(null=True, blank=True, db_index=True)
    from_name = models.CharField(max_length=500, blank=True)
    from_address = models.CharField(max_length=500, blank=True)
    to = models.JSONField(default=list, blank=True)
    cc = models.JSONField(default=list, blank=True)
    direction = models.CharField(max_length=10, choices=Direction.choices)
    source = models.CharField(max_length=20, choices=Source.choices, default=Source.SYNC)
    size = models.PositiveIntegerField(default=0)

    seen = models.BooleanField(default=False)
    flagged = models.BooleanField(default=False)
    # False when a participant's domain is in the mailbox's excluded domains: such mail is
    # never shown to anyone but the mailbox owner, even from a public mailbox.
    shareable = models.BooleanField(default=True)

    text = models.TextField(blank=True)
    html = models.TextField(blank=True)
    has_attachments = models.BooleanField(default=False)
    parse_state = models.CharField(
        max_length=10, choices=ParseState.choices, default=ParseState.PENDING
    )
    parse_error = models.TextField(blank=True)

    # Mail sent from the CRM: stored at once with state "sending", then "sent" or "failed".
    class SendState(models.TextChoices):
        NONE = "", "Not sent from the CRM"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"

    send_state = models.CharField(max_length=10, choices=SendState.choices, default="", blank=True)
    send_error = models.TextField(blank=True)
    # When the current delivery attempt was queued: a mail "sending" for long (its worker
    # died) may be retried.
    send_attempted_at = models.DateTimeField(null=True, blank=True)
    sent_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The compose form's one-time token (or an API Idempotency-Key): the same form sent twice
    # (a second click, a resubmit) is one email, sent once.
    send_token = models.CharField(max_length=100, blank=True, default="")
    # Headers too large to keep whole (over the mailbox's size limit): a notice for the user.
    truncated = models.BooleanField(default=False)

    # A mail deleted on the server leaves the CRM views but stays recoverable until purged.
    deleted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["mailbox", "fingerprint"], name="email_unique_fingerprint"
            ),
            models.UniqueConstraint(
                fields=["sent_by", "send_token"], name="email_unique_send_token",
                condition=~Q(send_token=""),
            ),
        ]
        indexes = [
            models.Index(fields=["mailbox", "-date"], name="email_mailbox_date"),
            models.Index(
                fields=["parse_state"], name="email_parse_pending",
                condition=Q(parse_state="pending"),
            ),
            # Headers-only mail the sync downloads whole once the size limit admits it.
            models.Index(fields=["mailbox"], name="email_truncated", condition=Q(truncated=True)),
        ]

    def __str__(self) -> str:
        return self.subject or "(no subject)"


class EmailSource(models.Model):
    """The raw RFC 5322 bytes, zstd-compressed: byte-exact backups and re-parsing later."""

    email = models.OneToOneField(Email, on_delete=models.CASCADE, primary_key=True, related_name="source_data")
    # In the database (``data``), or ``length`` bytes at ``offset`` of a pack file on disk
    # (``pack``: mailsync.sourcestore, where MAILROOM_SOURCE_DIR is set).
    data = models.BinaryField(null=True, blank=True)
    pack = models.CharField(max_length=32, blank=True, default="", db_index=True)
    offset = models.BigIntegerField(null=True, blank=True)
    length = models.BigIntegerField(null=True, blank=True)
    size = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(pack="", data__isnull=False)
                           | (~Q(pack="") & Q(data__isnull=True, offset__isnull=False, offset__gte=0,
                                             length__isnull=False, length__gte=0))),
                name="source_in_db_or_pack",
            ),
        ]

    def compressed(self) -> bytes:
        """The zstd-compressed source, from the database or its pack."""
        if self.pack:
            from .sync.copy import read_source  # noqa: PLC0415  (reads again after a compaction)

            return bytes(read_source(self.email_id) or b"")
        return bytes(self.data or b"")


class EmailLocation(models.Model):
    """Where a message sits on the server: folder, UIDVALIDITY, UID and flags."""

    email = models.ForeignKey(Email, on_delete=models.CASCADE, related_name="locations")
    # No index of its own: location_unique_uid (folder, uidvalidity, uid) starts with it.
    folder = models.ForeignKey(MailFolder, on_delete=models.CASCADE, related_name="locations", db_index=False)
    uidvalidity = models.BigIntegerField()
    uid = models.BigIntegerField()
    flags = models.JSONField(default=list, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["folder", "uidvalidity", "uid"], name="location_unique_uid"
            )
        ]


class EmailParticipant(models.Model):
    """An address on a mail (From, To, Cc...), normalized for matching to records."""

    class Role(models.TextChoices):
        FROM = "from", "From"
        TO = "to", "To"
        CC = "cc", "Cc"
        BCC = "bcc", "Bcc"
        REPLY_TO = "reply_to", "Reply-To"

    email = models.ForeignKey(Email, on_delete=models.CASCADE, related_name="participants")
    role = models.CharField(max_length=10, choices=Role.choices)
    name = models.CharField(max_length=500, blank=True)
    address = models.CharField(max_length=500)  # lower-cased

    class Meta:
        # Equality lookups only (association): no varchar_pattern_ops twin for LIKE.
        indexes = [models.Index(fields=["address"], name="participant_address")]


class EmailLink(models.Model):
    """An email attached to a lead, a contact or a deal (exactly one of them)."""

    # No index of its own: the three unique constraints below start with it.
    email = models.ForeignKey(Email, on_delete=models.CASCADE, related_name="links", db_index=False)
    lead = models.ForeignKey("crm.Lead", null=True, blank=True, on_delete=models.CASCADE, related_name="email_links")
    contact = models.ForeignKey("crm.Contact", null=True, blank=True, on_delete=models.CASCADE, related_name="email_links")
    deal = models.ForeignKey("crm.Deal", null=True, blank=True, on_delete=models.CASCADE, related_name="email_links")
    # The record matched only by a Bcc address of the mail (none of its addresses in From,
    # To, Cc or Reply-To, and not put on it by the user): only the mailbox's owner sees such
    # a link; to anyone else it would tell that the person got a blind copy. A database
    # default too: links are also written by COPY and INSERTs naming their columns
    # (association, sync.ingest).
    bcc_only = models.BooleanField(default=False, db_default=False)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(lead__isnull=False, contact__isnull=True, deal__isnull=True)
                    | Q(lead__isnull=True, contact__isnull=False, deal__isnull=True)
                    | Q(lead__isnull=True, contact__isnull=True, deal__isnull=False)
                ),
                name="emaillink_exactly_one_record",
            ),
            models.UniqueConstraint(fields=["email", "lead"], name="emaillink_unique_lead"),
            models.UniqueConstraint(fields=["email", "contact"], name="emaillink_unique_contact"),
            models.UniqueConstraint(fields=["email", "deal"], name="emaillink_unique_deal"),
        ]


class AttachmentBlob(models.Model):
    """Attachment content stored once by hash, however many mails carry it."""

    sha256 = models.CharField(max_length=64, unique=True)
    data = models.BinaryField()
    size = models.PositiveIntegerField()


class Attachment(models.Model):
    email = models.ForeignKey(Email, on_delete=models.CASCADE, related_name="attachments")
    blob = models.ForeignKey(AttachmentBlob, on_delete=models.PROTECT, related_name="+")
    filename = models.CharField(max_length=255)
    content_type = models.CharField(max_length=255)
    content_id = models.CharField(max_length=500, blank=True)
    inline = models.BooleanField(default=False)
    size = models.PositiveIntegerField()


class MessageError(models.Model):
    """A message that could not be fetched or stored; the user sees it and can retry."""

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="message_errors")
    folder = models.ForeignKey(MailFolder, null=True, on_delete=models.CASCADE)
    uidvalidity = models.BigIntegerField(null=True)
    uid = models.BigIntegerField(null=True)
    error = models.TextField()
    raw = models.BinaryField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["folder", "uidvalidity", "uid"], name="messageerror_unique_uid",
                condition=Q(resolved_at__isnull=True),
            )
        ]
