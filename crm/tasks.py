"""Celery tasks of the CRM core. Tasks are thin: they call one service."""
from __future__ import annotations

from celery import shared_task
from django.core.management import call_command


@shared_task(name="crm.clear_expired_sessions")
def clear_expired_sessions() -> None:
    call_command("clearsessions")
