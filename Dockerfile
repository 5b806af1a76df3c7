# Production image: gunicorn for the web, the same image for Celery worker and beat.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MAILROOM_ENV=production \
    MAILROOM_DATA_DIR=/var/lib/mailroom DJANGO_STATIC_ROOT=/app/staticfiles

WORKDIR /app
COPY pyproject.toml README.md ./
COPY crm crm
COPY mailsync mailsync
COPY dropbox dropbox
COPY reports reports
COPY templates templates
COPY static static
COPY manage.py Procfile ./
RUN pip install --no-cache-dir . \
    # Bytecode for the trees the processes import (WORKDIR /app comes first on their path:
    # manage.py, gunicorn's and celery's working directory; pip compiled its site-packages
    # copy): each large sync starts a fresh interpreter (mailsync/sync/fetcher.py) from /app,
    # which cannot write bytecode there (PYTHONDONTWRITEBYTECODE, and /app is root's) and
    # would compile ~18 modules from source (~30 ms) before its first batch
    # (bench/README.md, "Bytecode").
    && python -m compileall -q /app/crm /app/mailsync /app/dropbox /app/reports \
    && useradd --system --home-dir /var/lib/mailroom --create-home mailroom \
    # collectstatic needs settings that load; these build-time values are never used at runtime.
    && DJANGO_SECRET_KEY=build-only DJANGO_ALLOWED_HOSTS=build \
       MAILROOM_ENCRYPTION_KEYS=$(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())') \
       python manage.py collectstatic --noinput -v 0

USER mailroom
EXPOSE 8000
CMD ["gunicorn", "crm.wsgi", "--bind", "0.0.0.0:8000", "--workers", "3", "--access-logfile", "-"]
