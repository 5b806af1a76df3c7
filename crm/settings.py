"""Mailroom settings: the one place that reads the environment.

Every option the apps need is read here and nowhere else (apps read ``django.conf.settings``).
``MAILROOM_ENV=production`` switches on the HTTPS-only, fail-closed settings that
``manage.py check --deploy`` expects; the default ``development`` runs on the embedded
defaults (SQLite, a filesystem Celery broker) so the app starts with no server installed.
"""
from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_bool(name: str, default: bool) -> bool:
    value = _env(name)
    if value is None:
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def _env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in (_env(name, default) or "").split(",") if item.strip()]


MAILROOM_ENV = _env("MAILROOM_ENV", "development")
if MAILROOM_ENV not in {"development", "production"}:
    raise ImproperlyConfigured("MAILROOM_ENV must be 'development' or 'production'")
PRODUCTION = MAILROOM_ENV == "production"

# Where the embedded defaults keep their files (SQLite database, broker queue, beat schedule).
DATA_DIR = Path(_env("MAILROOM_DATA_DIR", str(BASE_DIR / "var")))  # type: ignore[arg-type]

DEBUG = _env_bool("DJANGO_DEBUG", False)
# The debug 500 page hides any local that mentions a password (crm/security.py).
DEFAULT_EXCEPTION_REPORTER_FILTER = "crm.security.SecretsReporterFilter"

SECRET_KEY = _env("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when MAILROOM_ENV=production")
    # Development only: a fixed, obviously unsafe key so `manage.py` works before setup.
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"

ALLOWED_HOSTS = _env_list(
    "DJANGO_ALLOWED_HOSTS", "" if PRODUCTION else "localhost,127.0.0.1,[::1],testserver"
)
CSRF_TRUSTED_ORIGINS = _env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "crm",
    "mailsync",
    "dropbox.apps.BccDropboxConfig",
    "reports",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "crm.security.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "crm.urls"
WSGI_APPLICATION = "crm.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# DATABASE_URL (postgres://user@host:5432/name) in production; SQLite in var/ by default.
_default_sqlite = f"sqlite:///{DATA_DIR / 'mailroom.sqlite3'}"
DATABASES = {
    "default": dj_database_url.parse(
        _env("DATABASE_URL", _default_sqlite),  # type: ignore[arg-type]
        conn_max_age=int(_env("DATABASE_CONN_MAX_AGE", "60")),  # type: ignore[arg-type]
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server, the worker and beat share one SQLite file: WAL lets readers run beside a
    # writer, IMMEDIATE transactions take the write lock up front instead of failing mid-way
    # with "database is locked", and the timeout waits for a busy writer.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "crm.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = _env("MAILROOM_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(_env("DJANGO_STATIC_ROOT", str(BASE_DIR / "staticfiles")))  # type: ignore[arg-type]
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
MEDIA_ROOT = Path(_env("MAILROOM_MEDIA_ROOT", str(DATA_DIR / "media")))  # type: ignore[arg-type]

# --- Credentials encryption ------------------------------------------------------------------
# Comma-separated Fernet keys; the first encrypts, all decrypt (rotation: put the new key first,
# run `manage.py rotate_encryption_keys`, then drop the old one). Checked by a system check.
MAILROOM_ENCRYPTION_KEYS = _env_list("MAILROOM_ENCRYPTION_KEYS")

# Mail hosts on loopback/private networks are refused (SSRF) unless this is on (tests and
# on-premises mail servers).
MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS = _env_bool("MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS", False)

# Mail deleted on the server stays recoverable in the CRM this many days.
MAILROOM_TOMBSTONE_DAYS = int(_env("MAILROOM_TOMBSTONE_DAYS", "30"))  # type: ignore[arg-type]

# Raw sources (compressed) go to pack files in this directory, fsynced before the rows that
# name them commit (mailsync.sourcestore): PostgreSQL keeps where each one is. Every process
# (web, workers, IDLE watcher) must see the same directory, and it belongs to one database.
# Empty: the sources are stored in the database (slower; for hosts without a shared directory).
_source_dir = _env("MAILROOM_SOURCE_DIR", str(DATA_DIR / "sources"))
MAILROOM_SOURCE_DIR = Path(_source_dir) if _source_dir else None  # type: ignore[arg-type]

# An IMAP download of at least this many messages is fetched and prepared in a child process
# while the worker stores (mailsync/sync/fetcher.py); smaller ones in a thread. 0: never.
MAILROOM_SYNC_PROCESS_MIN_MESSAGES = int(
    _env("MAILROOM_SYNC_PROCESS_MIN_MESSAGES", "400")  # type: ignore[arg-type]
)
# A mailbox uses at most two connections to its server: the IDLE watcher's and one more that a
# sync, a CRM action (mark read, move, delete), a copy to Sent or a login test take in turn
# (mailsync.sync.lock.ConnectionSlot). How long an action waits for it (a running sync hands
# it over after its current batch) before the user is told to try again.
MAILROOM_CONNECTION_WAIT = float(_env("MAILROOM_CONNECTION_WAIT", "15"))  # type: ignore[arg-type]

# --- REST API --------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "crm.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_PARSER_CLASSES": [
        "crm.api.parsers.JSONParser",  # a deeply nested body is a 400, not a 500
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "crm.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Mailroom API",
    "DESCRIPTION": "Records, mailboxes and synced email of the Mailroom CRM.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    # Assets from drf-spectacular-sidecar: the docs work with no CDN reachable.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"SecurityEnum": "mailsync.models.Security"},
    # The error answers (400, 401, 403, 404) in their one JSON shape, on every operation.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "crm.api.schema.add_error_responses"],
}

# --- Celery ----------------------------------------------------------------------------------
# Redis in production (CELERY_BROKER_URL=redis://...). The embedded default is kombu's
# filesystem transport: a folder of message files, no server, good for one machine.
CELERY_BROKER_URL = _env("CELERY_BROKER_URL", "filesystem://localhost//")
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):  # type: ignore[union-attr]
    _queue_dir = DATA_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(_queue_dir / "processed"),
        "store_processed": False,
        # Else kombu writes its exchange tables to ./control in whatever folder it started in.
        "control_folder": str(_queue_dir / "control"),
    }
else:
    # A mail sync may run long; redelivery to a second worker is harmless (syncs take a
    # per-mailbox lock) but wasteful, so wait longer than the longest expected run.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 4 * 3600}
CELERY_TASK_ALWAYS_EAGER = _env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 3600
CELERY_TASK_SOFT_TIME_LIMIT = 3300
# A sync run ends itself between batches after this long, "in progress", and the next run
# starts at once (mailsync.sync.base.RunTimeUp): well before the soft time limit above
# interrupts it in the middle of a batch.
MAILROOM_SYNC_RUN_SECONDS = float(_env("MAILROOM_SYNC_RUN_SECONDS", "3000"))  # type: ignore[arg-type]
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_TIMEZONE = TIME_ZONE

# --- Security --------------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if PRODUCTION:
    SECURE_SSL_REDIRECT = _env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    # Behind a TLS-terminating proxy (the docker-compose shape) that sets X-Forwarded-Proto.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = int(_env("DJANGO_SECURE_HSTS_SECONDS", "31536000"))  # type: ignore[arg-type]
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    if not ALLOWED_HOSTS:
        raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS is required when MAILROOM_ENV=production")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": _env("MAILROOM_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
