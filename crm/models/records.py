from __future__ import annotations

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.db.models.functions import Lower
from django.urls import reverse


class OwnedRecord(models.Model):
    """Base of every CRM record: an owner and timestamps.

    Visibility (owner, manager, administrator, shares) is decided in ``crm.selectors``.
    """

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # Indexed: "most recently modified deal" is a hot query for the BCC dropbox.
    modified_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        abstract = True

    # Set by subclasses: the URL name prefix of their pages (e.g. "lead" -> "lead-detail").
    url_name: str = ""

    def get_absolute_url(self) -> str:
        return reverse(f"{self.url_name}-detail", args=[self.pk])


class RecordShare(models.Model):
    """A record shared with one user, read-only or read-write."""

    class Access(models.TextChoices):
        READ = "read", "Read only"
        READ_WRITE = "read_write", "Read and write"

    content_type = models.ForeignKey(ContentType, on_delete=models.CASCADE)
    object_id = models.BigIntegerField()
    record = GenericForeignKey("content_type", "object_id")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="record_shares"
    )
    access = models.CharField(max_length=20, choices=Access.choices, default=Access.READ)
    shared_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["content_type", "object_id", "user"], name="record_share_unique"
            )
        ]
        indexes = [models.Index(fields=["user", "content_type"])]

    def __str__(self) -> str:
        return f"{self.content_type.model} #{self.object_id} -> {self.user}"


class Account(OwnedRecord):
    """A company."""

    url_name = "account"

    name = models.CharField(max_length=255)
    website = models.URLField(blank=True)
    phone = models.CharField(max_length=50, blank=True)
    industry = models.CharField(max_length=100, blank=True)
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(Lower("name"), name="account_name_lower")]

    def __str__(self) -> str:
        return self.name


class _Person(OwnedRecord):
    first_name = models.CharField(max_length=100, blank=True)
    last_name = models.CharField(max_length=100)
    email = models.EmailField(blank=True)
    secondary_email = models.EmailField(blank=True)
    phone = models.CharField(max_length=50, blank=True)
    mobile = models.CharField(max_length=50, blank=True)
    title = models.CharField(max_length=100, blank=True)
    description = models.TextField(blank=True)

    class Meta:
        abstract = True
        ordering = ["last_name", "first_name"]

    @property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}".strip()

    def __str__(self) -> str:
        return self.full_name


class Lead(_Person):
    url_name = "lead"

    class Status(models.TextChoices):
        NEW = "new", "New"
        CONTACTED = "contacted", "Contacted"
        QUALIFIED = "qualified", "Qualified"
        UNQUALIFIED = "unqualified", "Unqualified"

    company = models.CharField(max_length=255, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.NEW)
    source = models.CharField(max_length=100, blank=True)

    class Meta(_Person.Meta):
        # Emails attach to leads by address, case-insensitively: these make the lookup an
        # index scan.
        indexes = [
            models.Index(Lower("email"), name="lead_email_lower"),
            models.Index(Lower("secondary_email"), name="lead_secondary_email_lower"),
        ]


class Contact(_Person):
    url_name = "contact"

    account = models.ForeignKey(
        Account, null=True, blank=True, on_delete=models.SET_NULL, related_name="contacts"
    )

    class Meta(_Person.Meta):
        indexes = [
            models.Index(Lower("email"), name="contact_email_lower"),
            models.Index(Lower("secondary_email"), name="contact_secondary_email_lower"),
        ]
