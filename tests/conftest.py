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


# pg_locks lists every database's locks: tests that read it keep to their own database (two
# test runs at once, a developer's and a CI clone's, or pytest-xdist processes, each have one;
# ids such as a mailbox's repeat between them).
THIS_DATABASE = "(SELECT oid FROM pg_database WHERE datname = current_database())"


def pytest_configure(config: pytest.Config) -> None:
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine and not os.environ.get("MAILROOM_TESTS_ALLOW_SQLITE"):
        raise pytest.UsageError(
            f"Tests run on PostgreSQL (DATABASE_URL); got {engine}. "
            "Use scripts/test, which starts PostgreSQL."
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests run last. Their Chromium also stops with each browser file
    (tests/testbed/browser.py), so the order is not what keeps the other tests working."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.fixture
def deal_stages(db):  # noqa: ANN001, ANN201, ARG001
    """The sales pipeline migration crm 0002 seeds. A transactional test that ran before
    (in any file) flushed every table at its end, seeded rows included, so tests that need
    the stages ask for them: seeding is idempotent."""
    import importlib  # noqa: PLC0415

    from django.apps import apps  # noqa: PLC0415

    importlib.import_module("crm.migrations.0002_seed_deal_stages").seed(apps, None)


@pytest.fixture(autouse=True)
def _celery_joins_allowed() -> None:
    """Eager tasks (CELERY_TASK_ALWAYS_EAGER) run inside Celery's ``denied_join_result()``,
    which saves and restores a process-wide flag; two threads running eager tasks at once (a
    sync in a thread beside an API call) can leave it set, and every later ``.get()`` in the
    process then raises "Never call result.get() within a task!". Production runs tasks in
    workers, never eagerly, so each test starts with the flag clear."""
    from celery._state import _set_task_join_will_block  # noqa: PLC0415

    _set_task_join_will_block(False)
