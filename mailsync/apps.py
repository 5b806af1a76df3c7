from django.apps import AppConfig


class MailsyncConfig(AppConfig):
    name = "mailsync"
    verbose_name = "Mail sync"
    default_auto_field = "django.db.models.BigAutoField"
