"""The Celery app. Tasks live in each app's ``tasks.py`` and carry explicit names."""
from __future__ import annotations

import os

from celery import Celery
from celery.schedules import crontab

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crm.settings")

app = Celery("mailroom")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Periodic jobs.
app.conf.beat_schedule = {
    # The safety net behind IMAP IDLE, and the only trigger for servers without IDLE.
    "mailsync.poll_mailboxes": {"task": "mailsync.poll_mailboxes", "schedule": 5 * 60},
    "mailsync.purge_tombstones": {
        "task": "mailsync.purge_tombstones", "schedule": crontab(hour=4, minute=7),
    },
    # Pack files of deleted mail, and of batches that never committed.
    "mailsync.sweep_sources": {
        "task": "mailsync.sweep_sources", "schedule": crontab(hour=4, minute=37),
    },
    "crm.clear_expired_sessions": {
        "task": "crm.clear_expired_sessions",
        "schedule": crontab(hour=3, minute=17),
    },
}
