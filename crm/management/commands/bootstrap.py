"""First-run setup for the one-command start: create an administrator if there is none."""
from __future__ import annotations

import secrets

from django.core.management.base import BaseCommand

from crm.models import User


class Command(BaseCommand):
    help = "Create the first administrator (prints its password once) if no user exists."

    def add_arguments(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("--username", default="admin")
        parser.add_argument("--password", default=None, help="Default: a random one, printed.")
        parser.add_argument("--email", default="admin@localhost")

    def handle(self, *args, username: str, password: str | None, email: str, **options) -> None:  # noqa: ANN002, ANN003
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("An administrator exists already; nothing to do.")
            return
        password = password or secrets.token_urlsafe(12)
        User.objects.create_superuser(
            username=username, email=email, password=password, role=User.Role.ADMINISTRATOR
        )
        self.stdout.write(self.style.SUCCESS("Created the first administrator:"))
        self.stdout.write(f"  username: {username}")
        self.stdout.write(f"  password: {password}")
        self.stdout.write("  (shown once: change it under Admin > Users once logged in)")
