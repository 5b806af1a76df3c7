from __future__ import annotations

from django.conf import settings
from django.db import models


class OrganizationEmail(models.Model):
    """An organization-wide address (e.g. sales@) usable as From or Reply-To once verified by
    a confirmation link sent to it."""

    address = models.EmailField(unique=True)
    display_name = models.CharField(max_length=255)
    verification_token = models.CharField(max_length=64, blank=True)
    # When the current link was sent: it works for VERIFICATION_DAYS (mailsync.senders).
    verification_sent_at = models.DateTimeField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # Who may send as this address; empty: every user.
    allowed_users = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="+")

    class Meta:
        ordering = ["address"]

    @property
    def is_verified(self) -> bool:
        return self.verified_at is not None

    def __str__(self) -> str:
        return f"{self.display_name} <{self.address}>"
