"""Errors the CRM raises on purpose. The API's exception handler maps them to 4xx replies."""
from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError


class RecordPermissionDenied(PermissionDenied):
    """The user may see the record but not change it (or may not see it at all)."""


class RecordValidationError(ValidationError):
    """Input that breaks a business rule; carries a message per field."""


class EncryptionNotConfigured(RuntimeError):
    """MAILROOM_ENCRYPTION_KEYS is missing or invalid: a deployment fault, not user input."""
