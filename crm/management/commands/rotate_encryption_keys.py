"""Re-encrypt every stored secret under the first key of MAILROOM_ENCRYPTION_KEYS.

Rotation: put the new key first (``NEW,OLD``), run this command, then remove the old key.
Loading a row decrypts with any key; saving encrypts with the first. One transaction for
all of them, rows locked, so a failure (a secret under a key no longer configured) leaves
nothing half-rotated; secrets are few (one or two per mailbox).
"""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from crm.encryption import UnreadableSecret, encrypted_fields
from crm.exceptions import EncryptionNotConfigured

BATCH = 500  # rows per UPDATE: keeps statements small while avoiding a round trip per row


class Command(BaseCommand):
    help = "Re-encrypt all encrypted fields with the newest key in MAILROOM_ENCRYPTION_KEYS."

    def handle(self, *args, **options) -> None:  # noqa: ANN002, ANN003
        total = 0
        done: list[str] = []
        try:
            with transaction.atomic():
                for model, field in encrypted_fields():
                    rows = list(
                        model._base_manager.select_for_update().exclude(**{field: ""}).only("pk", field)
                    )
                    unreadable = [r.pk for r in rows if isinstance(getattr(r, field), UnreadableSecret)]
                    if unreadable:
                        raise EncryptionNotConfigured(
                            f"{model._meta.label}.{field} of id(s) {unreadable[:20]} cannot be decrypted "
                            "with any key in MAILROOM_ENCRYPTION_KEYS: put its key back in the list, "
                            "or enter those passwords again."
                        )
                    model._base_manager.bulk_update(rows, [field], batch_size=BATCH)
                    total += len(rows)
                    done.append(f"{model._meta.label}.{field}: {len(rows)} re-encrypted")
        except EncryptionNotConfigured as exc:
            raise CommandError(str(exc)) from exc
        for line in done:
            self.stdout.write(line)
        self.stdout.write(self.style.SUCCESS(f"Done: {total} secret(s) now under the newest key."))
