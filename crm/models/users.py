from __future__ import annotations

from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A CRM user. ``is_active`` is the active/deactivated state; ``deactivated_at`` says when.

    A deactivated user cannot log in, but keeps ownership of their records and mail so that an
    administrator can reassign or back them up.
    """

    class Role(models.TextChoices):
        ADMINISTRATOR = "administrator", "Administrator"
        MANAGER = "manager", "Manager"
        STANDARD = "standard", "Standard"

    role = models.CharField(max_length=20, choices=Role.choices, default=Role.STANDARD)
    # Managers see the records of the users who report to them.
    manager = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="reports",
        help_text="The manager this user reports to.",
    )
    deactivated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["username"]

    @property
    def is_administrator(self) -> bool:
        return self.role == self.Role.ADMINISTRATOR or self.is_superuser

    @property
    def is_manager(self) -> bool:
        return self.role == self.Role.MANAGER

    def __str__(self) -> str:
        return self.get_full_name() or self.username
