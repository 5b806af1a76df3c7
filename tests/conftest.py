"""Fixtures shared by every test: real servers (tests/testbed) and model factories."""
from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.testbed.tls",
    "tests.testbed.dovecot",
    "tests.testbed.smtp",
    "tests.testbed.faultproxy",
    "tests.testbed.browser",
]


def pytest_configure(config: pytest.Config) -> None:
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine and not os.environ.get("MAILROOM_TESTS_ALLOW_SQLITE"):
        raise pytest.UsageError(
            f"Tests run on PostgreSQL (DATABASE_URL); got {engine}. "
            "Use scripts/test, which starts PostgreSQL."
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests run last: Playwright's sync API keeps an asyncio loop running in the
    main thread for the rest of the session, where ``asyncio.run`` would then refuse to run."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
