"""System checks: say at startup what configuration is missing, not at first use."""
from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register

from .encryption import _fernet
from .exceptions import EncryptionNotConfigured


@register()
def check_encryption_keys(app_configs, **kwargs):  # noqa: ANN001, ARG001
    try:
        _fernet(tuple(settings.MAILROOM_ENCRYPTION_KEYS))
    except EncryptionNotConfigured as exc:
        return [
            Error(
                str(exc),
                hint="Set MAILROOM_ENCRYPTION_KEYS to one or more comma-separated Fernet keys.",
                id="mailroom.E001",
            )
        ]
    return []
