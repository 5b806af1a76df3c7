"""The Celery app. Tasks live in each app's ``tasks.py`` and carry explicit names."""
from __future__ import annotations

import os

from celery import Celery
from celery.schedules import crontab

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crm.settings")

app = Celery("mailroom")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Periodic jobs. Later issues add the mailbox poll (the safety net behind IMAP IDLE).
app.conf.beat_schedule = {
    "crm.clear_expired_sessions": {
        "task": "crm.clear_expired_sessions",
        "schedule": crontab(hour=3, minute=17),
    },
}
