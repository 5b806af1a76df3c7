from django.apps import AppConfig

from .malloc import large_buffers_back_to_the_system as _large_buffers_back_to_the_system


class MailsyncConfig(AppConfig):
    name = "mailsync"
    verbose_name = "Mail sync"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from crm.signals import record_saved

        _large_buffers_back_to_the_system()

        from .association import email_associate_record

        def _attach_past_mail(sender, record, created, previous=None, **kwargs):  # noqa: ANN001, ANN003, ANN202, ARG001
            email_associate_record(record=record, previous=previous or {})

        record_saved.connect(_attach_past_mail, weak=False, dispatch_uid="mailsync.attach_past_mail")
