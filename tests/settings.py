"""Test settings: the production settings module with test defaults in the environment.

Tests run on PostgreSQL (as production does); ``DATABASE_URL`` may point elsewhere.
"""
import hashlib
import os
import tempfile
from pathlib import Path

# One database per test run (checkout and process): two runs on one machine (a developer's,
# a helper's, a CI clone's) must not create and drop each other's test database.
_checkout = hashlib.sha1(str(Path(__file__).resolve().parents[1]).encode()).hexdigest()[:8]
os.environ.setdefault(
    "DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/mailroom_{_checkout}_{os.getpid()}"
)
# A fixed key for tests only; tests of rotation set their own keys.
os.environ.setdefault("MAILROOM_ENCRYPTION_KEYS", "Yw2jv0n8r3xk9mH7x1J0p8oZ0bq2WkZ0bVJX1mQ2aS4=")
os.environ.setdefault("MAILROOM_DATA_DIR", tempfile.mkdtemp(prefix="mailroom-test-"))
os.environ.setdefault("CELERY_TASK_ALWAYS_EAGER", "1")
# Tests that run a real worker use Redis (started by scripts/test), on a database of its own;
# under pytest-xdist each test process takes its own (gw0 the given one, gw1 the one below...),
# since the worker tests flush theirs.
def _redis_url() -> str:
    url = os.environ.get("MAILROOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    base, _, db = url.rpartition("/")
    return f"{base}/{int(db or 15) - int(worker[2:])}"


os.environ.setdefault("CELERY_BROKER_URL", _redis_url())
# The private Dovecot and SMTP servers of the tests listen on 127.0.0.1.
os.environ.setdefault("MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS", "1")
# Test mailboxes are small: multi-batch downloads of 10 or more messages (the cut mid-FETCH,
# the killed worker) go through the fetch process as large ones do in production.
os.environ.setdefault("MAILROOM_SYNC_PROCESS_MIN_MESSAGES", "10")

from crm.settings import *  # noqa: E402, F403

# Hashing with the real PBKDF2 costs ~0.3 s per user; tests create hundreds.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# WhiteNoise warns when STATIC_ROOT is missing; tests serve static files through the finders.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True

# Threads of the live server and of watchers open their own connections: close them at the
# end of each request so that flushing the database between transactional tests never
# waits on (or deadlocks with) a connection left open.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
