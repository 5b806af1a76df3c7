"""What every sync run shares, whatever the protocol: the per-mailbox lock, the status a
user watches (state, progress, errors), and the provider's daily download budget."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from ..exceptions import MailError
from ..models import Mailbox
from ..protocols.base import ServerSettings
from ..providers import preset_for
from .lock import mailbox_lock


class BudgetExhausted(Exception):
    """The provider's daily download limit is used up: pause until it resets."""

    def __init__(self, until: datetime) -> None:
        super().__init__(f"Paused until {until.isoformat()}")
        self.until = until


@dataclass
class SyncReport:
    folders: int = 0
    new: int = 0
    located: int = 0
    failed: int = 0
    flag_changes: int = 0
    expunged: int = 0
    unchanged_folders: int = 0
    completed: int = 0  # headers-only mails downloaded whole (the size limit was raised)
    errors: list[str] = field(default_factory=list)


def server_settings(mailbox: Mailbox, *, timeout: float = 30.0) -> ServerSettings:
    return ServerSettings(
        host=mailbox.incoming_host, port=mailbox.incoming_port,
        security=mailbox.incoming_security, username=mailbox.username,
        password=mailbox.password, timeout=timeout,
        allow_private_hosts=settings.MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS,
    )


class SyncRun:
    """One run over one mailbox. Subclasses implement ``_work()``; ``run()`` takes the lock
    and turns the outcome into the mailbox's state."""

    def __init__(self, mailbox: Mailbox, *, timeout: float = 30.0) -> None:
        self.mailbox = mailbox
        self.timeout = timeout
        self.report = SyncReport()
        self.budget = preset_for(mailbox.provider).daily_download_bytes

    def _work(self) -> None:
        raise NotImplementedError

    def run(self) -> SyncReport:
        with mailbox_lock(self.mailbox.pk):
            self._start()
            try:
                self._work()
            except BudgetExhausted as paused:
                self._set(state=Mailbox.State.PAUSED, paused_until=paused.until,
                          last_error="", last_error_code="")
                return self.report
            except MailError as exc:
                self._set(state=Mailbox.State.ERROR, last_error=str(exc), last_error_code=exc.code)
                raise
            except Exception as exc:
                self._set(state=Mailbox.State.ERROR,
                          last_error=f"Unexpected error: {type(exc).__name__}",
                          last_error_code="internal")
                raise
            # Completed; what the user should still know (a folder to sync that is not on
            # the server, say) stays in last_error with the code "notice".
            notice = " ".join(self.report.errors)[:2000]
            self._set(state=Mailbox.State.COMPLETED, last_sync_at=timezone.now(),
                      paused_until=None, last_error=notice,
                      last_error_code="notice" if notice else "")
        return self.report

    def _set(self, **fields: object) -> None:
        Mailbox.objects.filter(pk=self.mailbox.pk).update(**fields)
        for name, value in fields.items():
            setattr(self.mailbox, name, value)

    def _start(self) -> None:
        today = timezone.now().date()
        fields: dict[str, object] = {
            "state": Mailbox.State.SYNCING, "sync_started_at": timezone.now(),
            "messages_done": 0, "messages_total": 0, "bytes_done": 0, "bytes_total": 0,
            "sync_requested": False,  # this run sees what was asked for before it began
        }
        if self.mailbox.budget_day != today:
            fields.update(budget_day=today, budget_bytes_used=0)
        self._set(**fields)

    def _check_budget(self) -> None:
        if self.budget is None:
            return
        used = Mailbox.objects.filter(pk=self.mailbox.pk).values_list(
            "budget_bytes_used", flat=True)[0]
        if used >= self.budget:
            tomorrow = timezone.now().date() + timedelta(days=1)
            raise BudgetExhausted(datetime.combine(tomorrow, time.min, tzinfo=dt_timezone.utc))

    def _add_totals(self, messages: int, size: int) -> None:
        Mailbox.objects.filter(pk=self.mailbox.pk).update(
            messages_total=F("messages_total") + messages, bytes_total=F("bytes_total") + size
        )
