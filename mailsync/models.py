"""Mailboxes a user connects. The sync engine (cursors, emails, locations) builds on these."""
from __future__ import annotations

from django.conf import settings
from django.db import models

from crm.encryption import EncryptedTextField


class Security(models.TextChoices):
    SSL = "ssl", "SSL/TLS"
    STARTTLS = "starttls", "STARTTLS"
    NONE = "none", "None (plain text)"


class Mailbox(models.Model):
    """One connected mailbox. Passwords are encrypted at rest and never leave the server."""

    class Protocol(models.TextChoices):
        IMAP = "imap", "IMAP"
        POP3 = "pop3", "POP3"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="mailboxes"
    )
    display_name = models.CharField(max_length=255, blank=True)
    email_address = models.EmailField()
    protocol = models.CharField(max_length=10, choices=Protocol.choices, default=Protocol.IMAP)
    provider = models.CharField(max_length=50, default="custom")

    incoming_host = models.CharField(max_length=255)
    incoming_port = models.PositiveIntegerField()
    incoming_security = models.CharField(
        max_length=10, choices=Security.choices, default=Security.SSL
    )
    username = models.CharField(max_length=255)
    password = EncryptedTextField(blank=True)

    smtp_host = models.CharField(max_length=255, blank=True)
    smtp_port = models.PositiveIntegerField(null=True, blank=True)
    smtp_security = models.CharField(
        max_length=10, choices=Security.choices, default=Security.STARTTLS
    )
    # Empty: log in to SMTP with the incoming username and password.
    smtp_username = models.CharField(max_length=255, blank=True)
    smtp_password = EncryptedTextField(blank=True)

    is_active = models.BooleanField(
        default=False, help_text="Only one mailbox per user is fetched at a time."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    modified_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "mailboxes"
        constraints = [
            # One active mailbox per user, enforced by the database, not only by a form.
            models.UniqueConstraint(
                fields=["owner"],
                condition=models.Q(is_active=True),
                name="mailbox_one_active_per_owner",
            ),
            models.UniqueConstraint(
                fields=["owner", "email_address"], name="mailbox_unique_address_per_owner"
            ),
        ]

    def __str__(self) -> str:
        return self.email_address
