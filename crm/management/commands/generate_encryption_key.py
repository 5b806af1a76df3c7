from django.core.management.base import BaseCommand

from crm.encryption import generate_key


class Command(BaseCommand):
    help = "Print a new Fernet key for MAILROOM_ENCRYPTION_KEYS."

    def handle(self, *args, **options) -> None:  # noqa: ANN002, ANN003
        self.stdout.write(generate_key())
