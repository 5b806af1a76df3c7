import ctypes
import sys

from django.apps import AppConfig

# glibc raises its mmap threshold to the size of each large buffer freed (up to 32 MB), so the
# sources and attachments of large mails (tens of MB) come from the heap after the first, and
# their memory stays with the worker when freed: RSS crept up by ~100 MB per large mail parsed.
# A fixed threshold keeps buffers of 1 MB or more mmapped, given back to the system when freed.
M_MMAP_THRESHOLD = -3
LARGE_BUFFER = 1 << 20


def _large_buffers_back_to_the_system() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER)
    except (OSError, AttributeError):  # not glibc (musl, say): its allocator does its own thing
        pass


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
