"""Project-level guarantees: migrations match models, production settings pass
`check --deploy`, and Celery runs named tasks through a real Redis broker."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.utils import timezone

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_models_and_migrations_agree():
    # Raises SystemExit(1) if a model change has no migration.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def test_production_settings_pass_check_deploy():
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "crm.settings",
        "MAILROOM_ENV": "production",
        "DJANGO_SECRET_KEY": "x7#" + "k2P9qLmZ4vR8tW1yB6nD3hF5jS0cX" * 2,
        "DJANGO_ALLOWED_HOSTS": "crm.example.com",
    }
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)  # set by the browser fixture for the tests only
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_secret_key():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "crm.settings", "MAILROOM_ENV": "production"}
    env.pop("DJANGO_SECRET_KEY", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_named_task_runs_on_a_worker_through_redis():
    from celery.contrib.testing.worker import start_worker

    from crm.celery import app
    from crm.tasks import clear_expired_sessions

    Session.objects.create(
        session_key="expired-session", session_data="x",
        expire_date=timezone.now() - timedelta(days=1),
    )
    Session.objects.create(
        session_key="live-session", session_data="x",
        expire_date=timezone.now() + timedelta(days=1),
    )
    saved = dict(app.conf)
    assert app.conf.broker_url.startswith("redis://")  # tests/settings.py
    app.conf.update(task_always_eager=False)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            assert clear_expired_sessions.name == "crm.clear_expired_sessions"
            clear_expired_sessions.delay()
            deadline = time.monotonic() + 20
            while Session.objects.filter(session_key="expired-session").exists():
                assert time.monotonic() < deadline, "the worker never ran the task"
                time.sleep(0.1)
    finally:
        app.conf.update(saved)
    assert Session.objects.filter(session_key="live-session").exists()


def test_beat_schedule_names_registered_tasks():
    from crm.celery import app

    app.loader.import_default_modules()
    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in app.tasks
