"""What every sync run shares, whatever the protocol: the per-mailbox lock, the status a
user watches (state, progress, errors), and the provider's daily download budget."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone
from time import monotonic

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from crm.encryption import UnreadableSecret

from ..exceptions import MailAuthError, MailError
from ..models import Mailbox
from ..protocols.base import ServerSettings
from ..providers import preset_for
from .lock import mailbox_lock


# Older mail (a first download, a backfill, refetches and repairs) may spend this share of
# the provider's daily budget; the rest is kept for new mail. A large Gmail mailbox takes days
# to download at 2.5 GB a day: meanwhile new customer mail, flag changes and deletes keep
# coming into the CRM, and only the older mail waits for the next day.
OLDER_MAIL_SHARE = 0.9


def budget_spent_until(mailbox_id: int, limit: int | None) -> datetime | None:
    """When the mailbox's downloads today have reached ``limit`` bytes (its provider's daily
    budget, or a share of it): the moment the budget resets (midnight UTC); else None."""
    if limit is None:
        return None
    used, day = Mailbox.objects.filter(pk=mailbox_id).values_list("budget_bytes_used", "budget_day")[0]
    today = timezone.now().date()
    if day != today:
        # Begun before midnight (UTC): the provider's day has turned and its budget is new.
        # Counted against yesterday's bytes, a run paused "until tomorrow", a day late (a
        # POP3 mailbox waited for that time).
        Mailbox.objects.filter(pk=mailbox_id).exclude(budget_day=today).update(
            budget_day=today, budget_bytes_used=0)
        used = Mailbox.objects.filter(pk=mailbox_id).values_list("budget_bytes_used", flat=True)[0]
    if used < limit:
        return None
    return datetime.combine(today + timedelta(days=1), time.min, tzinfo=dt_timezone.utc)


class BudgetExhausted(Exception):
    """The provider's daily download limit is used up: pause until it resets. ``older``: only
    older mail's share of it (``OLDER_MAIL_SHARE``); new mail may still come."""

    def __init__(self, until: datetime, *, older: bool = False) -> None:
        super().__init__(f"Paused until {until.isoformat()}")
        self.until = until
        self.older = older


class RunTimeUp(BudgetExhausted):
    """The run has worked MAILROOM_SYNC_RUN_SECONDS: it ends between batches, as a budget
    pause would (a POP3 QUIT applies the DELEs of what is stored), and the next run goes on
    at once, before the Celery task's soft time limit could interrupt a batch."""

    def __init__(self) -> None:
        super().__init__(timezone.now())


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


def login_password(secret: str) -> str:
    """The stored password to log in with; a user error if no key decrypts it any more (a
    login with "" would only fail at the server, or count against the account)."""
    if isinstance(secret, UnreadableSecret):
        raise MailAuthError(
            "The stored password can no longer be read (the encryption key it was saved "
            "with was removed).",
            hint="Enter the mailbox password again in its settings.",
        )
    return secret


def server_settings(mailbox: Mailbox, *, timeout: float = 30.0) -> ServerSettings:
    return ServerSettings(
        host=mailbox.incoming_host, port=mailbox.incoming_port,
        security=mailbox.incoming_security, username=mailbox.username,
        password=login_password(mailbox.password), timeout=timeout,
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
        self._older = False  # the download under way is older mail (_older_mail)
        self.older_paused: BudgetExhausted | None = None  # older mail waits for tomorrow
        self._ends_at: float | None = None  # monotonic time after which no batch starts

    def _work(self) -> None:
        raise NotImplementedError

    def run(self) -> SyncReport:
        with mailbox_lock(self.mailbox.pk):
            self._start()
            self._ends_at = monotonic() + settings.MAILROOM_SYNC_RUN_SECONDS
            try:
                self._work()
            except RunTimeUp:
                # Still in progress: the next run is queued when this one lets the mailbox
                # go (services.mailbox_sync, as for a change asked for meanwhile).
                self._set(sync_requested=True, last_error="", last_error_code="")
                return self.report
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
            if self.older_paused is not None:
                # New mail and changes are in; the older mail goes on when the budget resets.
                self._set(state=Mailbox.State.PAUSED, paused_until=self.older_paused.until,
                          last_sync_at=timezone.now(), last_error=notice,
                          last_error_code="notice" if notice else "")
                return self.report
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

    def _budget_limit(self) -> int | None:
        """What today's downloads may reach: the whole budget for new mail, its older-mail
        share for older mail (``_older_mail``)."""
        if self.budget is None:
            return None
        return int(self.budget * OLDER_MAIL_SHARE) if self._older else self.budget

    def _check_budget(self) -> None:
        """Before each batch: whether the day's download budget, and this run's time, allow
        one more (a run stores something before its time is up: every run gets somewhere)."""
        report = self.report
        if (self._ends_at is not None and monotonic() > self._ends_at
                and report.new + report.located + report.failed + report.completed > 0):
            raise RunTimeUp
        until = budget_spent_until(self.mailbox.pk, self._budget_limit())
        if until is not None:
            raise BudgetExhausted(until, older=self._older)

    def _charge_budget(self, size: int) -> None:
        """Bytes downloaded but not stored (a header read to tell messages apart, a reply
        the connection cut short): the provider counted them all the same. (What is stored
        is charged with its batch, ``ingest._finish``.)"""
        if size > 0:
            Mailbox.objects.filter(pk=self.mailbox.pk).update(
                budget_bytes_used=F("budget_bytes_used") + size)

    def _older_mail(self, work: Callable[[], object]) -> bool:
        """Run ``work``, a download of older mail, within its share of the daily budget: when
        that is spent, the older mail of this run stops there (``older_paused``; the run goes
        on with new mail and changes, and ends "paused until" the budget resets). True if
        ``work`` ran to its end."""
        if self.older_paused is not None:
            return False
        self._older = True
        try:
            work()
        except BudgetExhausted as paused:
            if not paused.older:
                raise
            self.older_paused = paused
            return False
        finally:
            self._older = False
        return True

    def _add_totals(self, messages: int, size: int) -> None:
        Mailbox.objects.filter(pk=self.mailbox.pk).update(
            messages_total=F("messages_total") + messages, bytes_total=F("bytes_total") + size
        )
