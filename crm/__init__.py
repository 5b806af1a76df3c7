"""Mailroom project package: settings, Celery app, users, records and deals."""
from .celery import app as celery_app

__all__ = ["celery_app"]
