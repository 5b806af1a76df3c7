"""Errors the CRM raises on purpose. The API's exception handler maps them to 4xx replies."""
from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError


class RecordPermissionDenied(PermissionDenied):
    """The user may see the record but not change it (or may not see it at all)."""


class RecordValidationError(ValidationError):
    """Input that breaks a business rule; carries a message per field."""


class EncryptionNotConfigured(RuntimeError):
    """MAILROOM_ENCRYPTION_KEYS is missing or invalid: a deployment fault, not user input."""


class ServiceError(Exception):
    """An error a service raises on purpose, with a code and a hint that say what to fix.

    The API maps it to ``http_status`` (400 by default) with ``{"detail", "code", "hint"}``.
    """

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()
