"""Encryption of secrets at rest (mailbox passwords) with MultiFernet.

Keys come from ``MAILROOM_ENCRYPTION_KEYS`` (comma-separated Fernet keys). The first key
encrypts; every key decrypts, so a new key can be put in front, everything re-encrypted with
``manage.py rotate_encryption_keys``, and the old key dropped afterwards.
"""
from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.db import models

from .exceptions import EncryptionNotConfigured


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


@lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    if not keys:
        raise EncryptionNotConfigured(
            "MAILROOM_ENCRYPTION_KEYS is not set: generate one with "
            "`python manage.py generate_encryption_key`."
        )
    try:
        return MultiFernet([Fernet(key.encode("ascii")) for key in keys])
    except (ValueError, TypeError) as exc:
        raise EncryptionNotConfigured(
            "MAILROOM_ENCRYPTION_KEYS holds a key that is not a valid Fernet key "
            "(32 url-safe base64-encoded bytes)."
        ) from exc


def _current() -> MultiFernet:
    return _fernet(tuple(settings.MAILROOM_ENCRYPTION_KEYS))


def encrypt(plaintext: str) -> str:
    return _current().encrypt(plaintext.encode("utf-8")).decode("ascii")


def decrypt(token: str) -> str:
    try:
        return _current().decrypt(token.encode("ascii")).decode("utf-8")
    except InvalidToken as exc:
        raise EncryptionNotConfigured(
            "A stored secret cannot be decrypted with MAILROOM_ENCRYPTION_KEYS: "
            "was the key that encrypted it removed before rotation?"
        ) from exc


def rotate(token: str) -> str:
    """Re-encrypt ``token`` under the first (newest) key."""
    try:
        return _current().rotate(token.encode("ascii")).decode("ascii")
    except InvalidToken as exc:
        raise EncryptionNotConfigured(
            "A stored secret cannot be decrypted with any key in MAILROOM_ENCRYPTION_KEYS."
        ) from exc


class UnreadableSecret(str):
    """A stored secret no key in MAILROOM_ENCRYPTION_KEYS decrypts (its key was removed before
    rotation, or the value is corrupt). It reads as "" so nothing logs in with it, and its
    row still loads (one such mailbox must not break every page, poll or watcher that lists
    mailboxes); it saves back unchanged, so putting the key back restores it."""

    token: str

    def __new__(cls, token: str) -> UnreadableSecret:
        obj = super().__new__(cls, "")
        obj.token = token
        return obj


class EncryptedTextField(models.TextField):
    """Holds a Fernet token; the model attribute is the plaintext.

    Empty strings stay empty (no secret set). Never put such a field in a serializer's output
    or a form's initial data: the plaintext is only for the code that logs in with it.
    """

    description = "Text encrypted at rest with MultiFernet"

    def from_db_value(self, value, expression, connection):  # noqa: ANN001, ARG002
        if value is None or value == "":
            return value
        try:
            return _current().decrypt(value.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            return UnreadableSecret(value)

    def get_prep_value(self, value):  # noqa: ANN001
        if isinstance(value, UnreadableSecret):
            return value.token
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return encrypt(value)


def encrypted_fields() -> list[tuple[type[models.Model], str]]:
    """Every (model, field name) in the project that holds an encrypted secret."""
    from django.apps import apps

    return [
        (model, field.name)
        for model in apps.get_models()
        for field in model._meta.get_fields()
        if isinstance(field, EncryptedTextField)
    ]
