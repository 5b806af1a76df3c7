"""The IMAP sync engine: lock the mailbox, fetch the delta per folder, ingest idempotently,
advance the cursor.

Per folder, in order:
1. STATUS: if UIDVALIDITY, UIDNEXT, MESSAGES and HIGHESTMODSEQ are as last seen, stop here
   (the no-change resync costs one round trip).
2. UIDVALIDITY changed: drop the folder's locations and cursor; the refetch re-maps mails to
   their existing rows by fingerprint (Message-ID + content hash). Nothing is deleted.
3. New mail above ``uid_high``, oldest first, in batches committed with the cursor.
4. Initial sync / backfill below ``uid_low``, newest first, resumable.
5. Flags changed on the server (CONDSTORE ``CHANGEDSINCE``, else all flags).
6. Expunged on the server: a UID comparison; mails left with no location become tombstones.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
import time as time_module

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef, QuerySet
from django.utils import timezone

from ..exceptions import MailProtocolError, MailTransientError, MailUserError
from ..models import Email, EmailLocation, MailFolder, Mailbox
from ..protocols.base import ServerSettings
from ..protocols.imap import NEVER_SYNC, ImapSession
from ..providers import preset_for
from .fetcher import UNDELIVERED, FetchJob, discard, fetch_batch, fetch_in_child, spawn_ahead
from .pipeline import batched, run_ahead
from .ingest import complete_truncated, ingest_batch, refresh_flags, tombstone_placeless
from .prepare import prepare_batch
from .base import OLDER_MAIL_SHARE, BudgetExhausted, SyncReport, SyncRun, budget_spent_until, server_settings
from .lock import ConnectionSlot, connection_slot, mailbox_lock

log = logging.getLogger(__name__)

# A FETCH batch holds at most this many messages and about this many bytes: big enough to
# amortize the round trip and the bulk INSERTs, small enough to bound the worker's memory
# (a batch is held twice: raw and compressed) and the work lost to a cut connection.
BATCH_MESSAGES = int(os.environ.get("MAILROOM_TEST_BATCH_MESSAGES", "250"))
# 8 MB: the worker and its fetch process peak at 125 + 64 MB on the bench (12 MB: 131 + 80,
# as fast: bench/README.md).
BATCH_BYTES = 8 * 1024 * 1024
# Tests that kill a worker mid-sync slow each commit down to aim the kill between two.
# How long a sync waits for the connection a CRM action holds (they take seconds).
SYNC_CONNECTION_WAIT = 120.0
_TEST_STORE_DELAY = float(os.environ.get("MAILROOM_TEST_STORE_DELAY", "0"))
# Flags are fetched for this many UIDs per command where CONDSTORE is missing.
FLAG_BATCH = 5000


def _prefetch(fetch: Callable[[list[int]], list], batches: list[list[int]]) -> Iterator[tuple[list[int], list]]:
    """Yield (batch, prepared messages, messages not delivered), fetching the next batch in a
    worker thread.

    Only the worker thread touches the IMAP connection while this runs. An error in it is
    raised here, in order, after the batches before it were yielded.
    """
    def fetched(batch: list[int]) -> tuple[list[int], list, list]:
        messages = fetch(batch)
        kept_back = [m for m in messages if m.error]
        return batch, prepare_batch([m for m in messages if not m.error]), kept_back

    return run_ahead((fetched(batch) for batch in batches), name="imap-prefetch")


def _batches(uids: Sequence[int], sizes: dict[int, int]) -> Iterator[list[int]]:
    return batched(uids, lambda uid: sizes.get(uid, 0), max_items=BATCH_MESSAGES,
                   max_bytes=BATCH_BYTES)


def wanted_folders(names: Sequence[str]) -> list[str]:
    """The configured folder names, once each, INBOX in its one spelling: the name INBOX is
    case-insensitive (RFC 3501 5.1), so "Inbox" or "inbox" typed by a user is the inbox."""
    return list(dict.fromkeys("INBOX" if name.upper() == "INBOX" else name for name in names))


class ImapSync(SyncRun):
    """One run over one IMAP mailbox. Create per run; call ``run()``."""

    def __init__(self, mailbox: Mailbox, *, session_factory: Callable[[ServerSettings], ImapSession] = ImapSession,
                 timeout: float = 30.0) -> None:
        super().__init__(mailbox, timeout=timeout)
        self.session_factory = session_factory
        self.session: ImapSession | None = None
        self._own_session = False
        self._spare = None  # a fetch process started ahead (initial sync)
        self._slot: ConnectionSlot | None = None  # the connection slot, when this run holds it
        self._known_folders: list[MailFolder] = []  # this mailbox's folders, read by _folders
        self._sizes: dict[int, int] = {}  # RFC822.SIZE of the UIDs being downloaded
        self._kept_back: set[int] = set()  # folders with messages the server did not send
        self._to_complete: set[int] = set()  # folders with headers-only mail now under the limit
        # Folders counted before the download began: pk -> (UIDVALIDITY, UIDs, sizes to fetch)
        self._planned: dict[int, tuple[int, list[int], dict[int, int]]] = {}
        self._searched: dict[int, list[int]] = {}  # pk -> the UIDs _initial found (_backfill)

    def run(self, session: ImapSession | None = None) -> SyncReport:
        """Sync now. ``session``: an open, logged-in connection to reuse (the caller keeps
        it); by default a new one is opened and closed."""
        self.session = session
        return super().run()

    def _work(self) -> None:
        self._own_session = self.session is None
        if self.session is not None:
            self._sync_folders(self.session)
            return
        spare = None
        if self._can_use_fetch_process() and self._download_likely():
            spare = self._spare = spawn_ahead()
        try:
            # The mailbox's one connection besides IDLE: held for the run, handed over
            # between batches to a CRM action that waits for it (_hand_over).
            with connection_slot(self.mailbox.pk, wait=SYNC_CONNECTION_WAIT) as self._slot, \
                    self.session_factory(server_settings(self.mailbox, timeout=self.timeout)) as own:
                self._sync_folders(own)
        finally:
            self._slot = None
            # Also when it was handed over: a generator never started runs no finally
            # (an exception between the handover and its first batch). Ending an ended
            # process only reaps it.
            discard(spare)
            self._spare = None

    def _download_likely(self) -> bool:
        """A first sync, or one resuming an unfinished backfill: worth starting the fetch
        process before the server is asked (a no-change resync must not pay for it), unless
        today's download budget is already spent (the run stops at its first batch)."""
        if (self.budget is not None
                and self.mailbox.budget_bytes_used >= int(self.budget * OLDER_MAIL_SHARE)):
            return False
        wanted = set(wanted_folders(self.mailbox.folders))
        done = [backfill_done for name, special_use, backfill_done in
                MailFolder.objects.filter(mailbox=self.mailbox)
                .values_list("name", "special_use", "backfill_done")
                if (name in wanted if wanted else special_use in ("inbox", "sent"))]
        return not done or not all(done)

    def _sync_folders(self, session: ImapSession) -> None:
        from ..models import MessageError

        # Folders holding messages the server did not send last time: fetched again now.
        # (Plain SQL: this runs on every resync, and the ORM's query building alone costs
        # milliseconds on a slow machine.)
        # Folders holding mails imported as headers only that the (raised) size limit now
        # admits: downloaded whole now (partial index email_truncated: no scan).
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT DISTINCT folder_id, 'kept' FROM {MessageError._meta.db_table} "
                "WHERE mailbox_id = %s AND resolved_at IS NULL AND error = %s "
                f"UNION SELECT DISTINCT l.folder_id, 'whole' FROM {Email._meta.db_table} e "
                f"JOIN {EmailLocation._meta.db_table} l ON l.email_id = e.id "
                "WHERE e.mailbox_id = %s AND e.truncated AND e.deleted_at IS NULL AND e.size <= %s",
                [self.mailbox.pk, UNDELIVERED, self.mailbox.pk, self.mailbox.max_message_bytes])
            rows = cursor.fetchall()
        self._kept_back = {folder_id for folder_id, why in rows if why == "kept"}
        self._to_complete = {folder_id for folder_id, why in rows if why == "whole"}
        synced = self._folders(session)
        self._plan(session, synced)
        for folder in synced:
            self._sync_folder(session, folder)
        for folder in synced:  # planned but not downloaded (its turn stopped early)
            self._drop_plan(folder, usable=False)
        self._check_places_elsewhere(session, {f.pk for f in synced})

    def _plan(self, session: ImapSession, folders: list[MailFolder]) -> None:
        """A first sync (or unfinished backfills) of several folders: every folder's messages
        are counted before any is downloaded, so that the progress ("n of total") and its
        estimate cover the whole run, not only the folders reached so far."""
        pending = [f for f in folders if not f.backfill_done]
        if len(pending) < 2:
            return
        # Added to the totals once, after every folder is counted (a user polling the status
        # between two folders saw "0 of 15", then "0 of 30"); also if counting fails midway,
        # since a planned folder's counts leave the totals again (_drop_plan).
        messages = size = 0
        try:
            for folder in pending:
                try:
                    selected = session.select(folder.name, readonly=True)
                except MailProtocolError:
                    continue  # gone: the folder's own turn says so
                if folder.uidvalidity is not None and folder.uidvalidity != selected.uidvalidity:
                    continue  # re-mapped in its turn
                uids = self._search(session)
                known = set(EmailLocation.objects.filter(folder=folder, uidvalidity=selected.uidvalidity)
                            .values_list("uid", flat=True)) if folder.uidvalidity is not None else set()
                below = [u for u in uids if (folder.uid_low is None or u < folder.uid_low) and u not in known]
                sizes = session.fetch_sizes(below) if below else {}
                messages, size = messages + len(sizes), size + sum(sizes.values())
                self._planned[folder.pk] = (selected.uidvalidity, uids, sizes)
        finally:
            if messages or size:
                self._add_totals(messages, size)

    def _drop_plan(self, folder: MailFolder, *, usable: bool = True) -> dict[int, int] | None:
        """The folder's planned sizes if the plan still holds (same UIDVALIDITY); else its
        counts leave the run's totals (the folder is counted again, or is gone)."""
        plan = self._planned.pop(folder.pk, None)
        if plan is None:
            return None
        if usable and plan[0] == folder.uidvalidity:
            return plan[2]
        self._add_totals(-len(plan[2]), -sum(plan[2].values()))
        return None

    # -- mail the CRM moved to folders that are not synced ----------------------------------
    def _check_places_elsewhere(self, session: ImapSession, synced: set[int]) -> None:
        """A mail moved from the CRM to a folder that is not synced (an Archive, say) has its
        place recorded there (``services._record_moves``). Such places are checked each run,
        or a mail moved on from there, or deleted, would never leave the CRM: its flags and
        whether it is still there (a FETCH of just those UIDs), skipped while STATUS shows
        the folder unchanged. Nothing new is downloaded from these folders."""
        others = {f.pk: f for f in self._known_folders if f.pk not in synced}
        if not others:  # the usual case: no query at all
            return
        holding = set(EmailLocation.objects.filter(folder_id__in=list(others))
                      .values_list("folder_id", flat=True).distinct())
        for pk, folder in others.items():
            if pk in holding:
                self._check_places_in(session, folder)

    def _check_places_in(self, session: ImapSession, folder: MailFolder) -> None:
        try:
            status = session.status(folder.name)
        except MailProtocolError:
            if folder.name in {name for name, _ in session.list_folders()}:
                raise
            self._folder_gone(folder)
            return
        # Places under an earlier UIDVALIDITY: a re-map of this folder left half-way (the
        # day's budget, a crash), or the folder taken off "Folders to sync" during one.
        def void() -> QuerySet[EmailLocation]:  # read each time: the UIDVALIDITY may change below
            return (EmailLocation.objects.filter(folder=folder)
                    .exclude(uidvalidity=folder.uidvalidity))

        if (folder.uidvalidity == status.uidvalidity and folder.last_uidnext == status.uidnext
                and folder.last_exists == status.exists and status.highestmodseq is not None
                and folder.highestmodseq == status.highestmodseq and not void().exists()):
            return
        selected = session.select(folder.name, readonly=True)
        if folder.uidvalidity != selected.uidvalidity:
            # Its UIDs are void. Its cursor too: a folder that was synced before (taken off
            # "Folders to sync" since) kept uid_high/backfill_done of the old numbering, so
            # once added back only UIDs above the old uid_high were fetched and the rest of
            # its mail stayed tombstones while on the server. Reset as _uidvalidity_changed
            # does: synced again, it is fetched whole and re-mapped by fingerprint.
            folder.uidvalidity = selected.uidvalidity
            folder.uid_high, folder.uid_low, folder.backfill_done = 0, None, False
            folder.highestmodseq = None
            folder.save(update_fields=["uidvalidity", "uid_high", "uid_low", "backfill_done",
                                       "highestmodseq"])
        if void().exists():
            # A re-map never deletes in the CRM what is still on the server (issue 3): the
            # mails placed there are looked for by Message-ID (one SEARCH per 50 of them,
            # not a download of the folder, which is not synced) and keep a place where
            # their fingerprint matches. The places of the others are dropped (a mail with
            # no other place becomes a recoverable tombstone, back when seen in a synced
            # folder; a mail with no Message-ID cannot be searched for).
            self._relocate(session, folder, session.search_header("Message-ID", list(
                Email.objects.filter(pk__in=void().values("email_id")).exclude(message_id="")
                .values_list("message_id", flat=True))))
            self._drop_void_places(folder)
        known = self._known(folder)
        uids = sorted(known)
        there: dict[int, tuple[str, ...]] = {}
        for start in range(0, len(uids), FLAG_BATCH):
            there.update(session.fetch_flags(uids[start:start + FLAG_BATCH]))
        self._apply_flags(folder, known, there)
        self._apply_expunges(folder, known, [uid for uid in uids if uid not in there])
        after = session.status(folder.name)
        folder.last_uidnext, folder.last_exists = after.uidnext, after.exists
        folder.highestmodseq = after.highestmodseq if after.highestmodseq == selected.highestmodseq else None
        # Not synced: once it is again (back in "Folders to sync"), the mail that came
        # meanwhile is above its cursor though STATUS is as recorded here.
        folder.last_synced_at = None
        folder.save(update_fields=["last_uidnext", "last_exists", "highestmodseq", "last_synced_at"])

    # -- folders ------------------------------------------------------------------------------
    def _folders(self, session: ImapSession) -> list[MailFolder]:
        """The folders to sync. Known folders are reused without a LIST round trip (the
        no-change resync is then login + one STATUS per folder); LIST runs on the first
        sync, when the configured folders change, or when a known folder disappeared."""
        wanted = wanted_folders(self.mailbox.folders)
        known = self._known_folders = list(MailFolder.objects.filter(mailbox=self.mailbox).order_by("pk"))
        if wanted:
            reuse = [f for f in known if f.name in wanted]
            if len(reuse) == len(wanted):
                self.report.folders = len(reuse)
                return reuse
        else:
            # Both must be known: after an explicit list is cleared ("the Inbox and the Sent
            # folder"), or on a server where Sent appeared later, LIST finds the Sent folder.
            reuse = [f for f in known if f.special_use in ("inbox", "sent")]
            if {f.special_use for f in reuse} == {"inbox", "sent"}:
                self.report.folders = len(reuse)
                return reuse
        return self._discover_folders(session)

    def _discover_folders(self, session: ImapSession) -> list[MailFolder]:
        wanted = wanted_folders(self.mailbox.folders)
        if wanted:
            special = dict(session.list_folders())
            found = [(name, special.get(name, "")) for name in wanted
                     if name in special and special.get(name, "") not in NEVER_SYNC]
            missing = [name for name in wanted if name not in special]
            never = [name for name in wanted if name in special and special[name] in NEVER_SYNC]
            if missing:
                self.report.errors.append(
                    "Not on the server, so not synced: " + ", ".join(repr(n) for n in missing[:10])
                    + ". Check “Folders to sync” (the names as your mail program shows them;"
                    " a folder that only holds other folders cannot be synced itself).")
            if never:
                self.report.errors.append(
                    "Never synced: " + ", ".join(repr(n) for n in never[:10])
                    + " (the Trash and Junk folders are left out by design; take them off “Folders to sync”).")
        else:
            found = session.default_sync_folders()
        folders = []
        for name, special_use in found:
            folder, created = MailFolder.objects.get_or_create(
                mailbox=self.mailbox, name=name, defaults={"special_use": special_use}
            )
            if not created and folder.special_use != special_use and special_use:
                # e.g. a Sent folder first listed by hand, now found as the Sent folder
                folder.special_use = special_use
                folder.save(update_fields=["special_use"])
            folders.append(folder)
        self.report.folders = len(folders)
        return folders

    def _sync_folder(self, session: ImapSession, folder: MailFolder) -> None:
        try:
            status = session.status(folder.name)
        except MailProtocolError:
            if folder.name in {name for name, _ in session.list_folders()}:
                raise
            # Deleted or renamed on the server: its messages are gone from there (a renamed
            # folder's mail is found again, by fingerprint, once it is synced under its new
            # name), so they become tombstones like any expunged mail.
            log.info("mailbox %s: folder %s is gone from the server", self.mailbox.pk, folder.pk)
            self._drop_plan(folder, usable=False)  # its counts leave the totals
            self._folder_gone(folder)
            self.report.errors.append(f"Folder {folder.name!r} no longer exists on the server.")
            return
        if (
            folder.backfill_done
            and folder.last_synced_at is not None  # None: only its places were checked meanwhile
            and folder.pk not in self._kept_back
            and folder.pk not in self._to_complete
            and folder.uidvalidity == status.uidvalidity
            and folder.last_uidnext == status.uidnext
            and folder.last_exists == status.exists
            and status.highestmodseq is not None
            and folder.highestmodseq == status.highestmodseq
        ):
            self.report.unchanged_folders += 1
            return
        selected = session.select(folder.name, readonly=True)
        if folder.uidvalidity is not None and folder.uidvalidity != selected.uidvalidity:
            self._uidvalidity_changed(folder)
        if folder.uidvalidity is None:
            folder.uidvalidity = selected.uidvalidity
            folder.save(update_fields=["uidvalidity"])

        fresh = folder.uid_low is None
        if fresh:
            self._initial(session, folder)
        else:
            cursor = folder.uid_high  # before this run's new mail moved it
            self._new_mail(session, folder)
            self._older_mail(lambda: self._new_mail_left_out(session, folder, above=cursor))
        # Older mail, within its share of the provider's daily budget (SyncRun._older_mail):
        # once that is spent, the rest waits for the next day while this run, and the runs
        # until then, still bring new mail and the server's flag changes and deletes.
        if not folder.backfill_done and self._older_mail(lambda: self._backfill(session, folder)) \
                and self._older_mail(lambda: self._find_known_again(
                    session, folder, self._left_out_by_since(session, folder, remap=True)[2])):
            self._drop_void_places(folder)  # only once the folder was read whole
        if folder.pk in self._kept_back:
            self._older_mail(lambda: self._fetch_kept_back(session, folder))
        if folder.pk in self._to_complete:
            self._older_mail(lambda: self._complete_truncated(session, folder))
        if fresh and folder.backfill_done and session.qresync:
            # Every location was just written from a FETCH that carried its flags. What
            # changed on the server meanwhile (flags, expunges) is found by the next run:
            # QRESYNC, CHANGEDSINCE the mod-sequence of this run's SELECT (stored below).
            # Without QRESYNC, an expunge need not raise HIGHESTMODSEQ: the pass runs.
            pass
        elif session.qresync and folder.highestmodseq is not None and selected.highestmodseq is not None:
            self._changes_qresync(session, folder)
        else:
            on_server = self._flags(session, folder, selected.highestmodseq)
            self._expunges(session, folder, on_server)
        folder.highestmodseq = selected.highestmodseq
        # STATUS after our work: what the next run compares against.
        after = session.status(folder.name)
        folder.last_uidnext, folder.last_exists = after.uidnext, after.exists
        if after.highestmodseq is not None and after.highestmodseq != selected.highestmodseq:
            # Something changed while we worked: leave the mod-sequence where it was so the
            # next run looks again.
            folder.last_exists = None
        folder.last_synced_at = timezone.now()
        folder.save()

    def _folder_gone(self, folder: MailFolder) -> None:
        email_ids = set(EmailLocation.objects.filter(folder=folder).values_list("email_id", flat=True))
        with transaction.atomic():
            folder.delete()  # and its places
            _tombstone_placeless(email_ids)
            refresh_flags(email_ids)
        self.report.expunged += len(email_ids)

    def _uidvalidity_changed(self, folder: MailFolder) -> None:
        """RFC 3501 2.3.1.1: all UIDs of the folder are void. Re-map, never delete: the
        folder is fetched again and its mails found by fingerprint. The old places stay
        (nothing acts on them: their UIDVALIDITY is not the folder's) so that the mails keep
        showing meanwhile; once the folder is fetched whole, those still there have new
        places and the others are gone from the server (``_drop_void_places``)."""
        log.warning("mailbox %s folder %s: UIDVALIDITY changed; re-mapping", self.mailbox.pk, folder.pk)
        with transaction.atomic():
            folder.uidvalidity = None
            folder.uid_high, folder.uid_low, folder.backfill_done = 0, None, False
            folder.highestmodseq = None
            folder.save()

    def _fetch_kept_back(self, session: ImapSession, folder: MailFolder) -> None:
        """Messages the server did not send on an earlier run (still there then): asked for
        again; stored now they resolve their error, gone since they are resolved too."""
        from ..models import MessageError

        stale = MessageError.objects.filter(folder=folder, resolved_at__isnull=True, error=UNDELIVERED)
        # Under an earlier UIDVALIDITY the UIDs are void (the folder was fetched again whole).
        stale.exclude(uidvalidity=folder.uidvalidity).update(resolved_at=timezone.now())
        errors = stale.filter(uidvalidity=folder.uidvalidity)
        uids = sorted(set(errors.values_list("uid", flat=True)))
        if not uids:
            return
        sizes = session.fetch_sizes(uids)
        self._add_totals(len(sizes), sum(sizes.values()))

        def held_again(held: list) -> None:
            # Done for this run (its error stays), as in _notice_kept_back.
            Mailbox.objects.filter(pk=self.mailbox.pk).update(
                messages_done=F("messages_done") + len(held),
                bytes_done=F("bytes_done") + sum(sizes.get(m.uid, 0) for m in held))

        _, fetched, still = fetch_again(session, self.mailbox, folder, folder.uidvalidity, uids, sizes,
                                        progress=True, durable=False,
                                        before_batch=self._check_budget, on_held=held_again)
        errors.filter(uid__in=[u for u in uids if u not in fetched and u not in still]).update(
            resolved_at=timezone.now())

    def _complete_truncated(self, session: ImapSession, folder: MailFolder) -> None:
        """Mails imported as headers only, over the size limit then, that the limit now
        admits (it was raised): downloaded whole into the same emails (``complete_truncated``)."""
        limit = self.mailbox.max_message_bytes
        wanted = dict(EmailLocation.objects.filter(
            folder=folder, uidvalidity=folder.uidvalidity, email__truncated=True,
            email__deleted_at__isnull=True, email__size__lte=limit).values_list("uid", "email_id"))
        if not wanted:
            return
        sizes = {uid: size for uid, size in session.fetch_sizes(sorted(wanted)).items() if size <= limit}
        self._add_totals(len(sizes), sum(sizes.values()))
        for batch in _batches(sorted(sizes), sizes):
            self._check_budget()
            # Gone from the server meanwhile: not delivered; the expunge pass sees to it.
            prepared = prepare_batch(session.fetch_messages(batch))
            self.report.completed += complete_truncated(
                self.mailbox, [(wanted[p.message.uid], p) for p in prepared])

    def _drop_void_places(self, folder: MailFolder) -> None:
        """The folder is fetched whole under its UIDVALIDITY: places under an earlier one
        are void. Mails that were not found again are gone from the server."""
        void = EmailLocation.objects.filter(folder=folder).exclude(uidvalidity=folder.uidvalidity)
        # Per-message errors and notices under an earlier UIDVALIDITY name UIDs that mean
        # nothing now (Retry skips them, so they stayed in the status for good, beside the
        # new notice of the same mail): the folder was just read whole, so what still fails
        # or is still over the size limit has its own, current, entry.
        _resolve_errors(folder, stale=True)
        email_ids = set(void.values_list("email_id", flat=True))
        if not email_ids:
            return
        with transaction.atomic():
            void.delete()
            _tombstone_placeless(email_ids)
            refresh_flags(email_ids)

    def _search(self, session: ImapSession, *, above: int = 0) -> list[int]:
        return session.search_uids(since=self.mailbox.sync_since, above=above)

    def _initial(self, session: ImapSession, folder: MailFolder) -> None:
        # Searched now, after this folder's SELECT (not from the plan): mail that came since
        # the plan is below the cursor and downloaded by this run.
        # With "sync mail since", the cursor starts above the folder's last UID even when
        # that mail is older than the date (left out on purpose): else the next run's check
        # of new mail left out by the date (_new_mail_left_out) read the headers of all of
        # it, e.g. every message of a folder with nothing since the date. Asked for first:
        # mail of the date arriving between the two SEARCHes is in the second.
        top = max(session.search_uids(), default=0) if self.mailbox.sync_since is not None else 0
        uids = self._search(session)
        top = max(top, max(uids, default=0))
        folder.uid_high, folder.uid_low = top, top + 1
        folder.save(update_fields=["uid_high", "uid_low"])
        # The backfill that follows on this SELECT starts from this answer instead of a
        # second SEARCH (~0.08 s at 120,000 messages): mail arriving meanwhile is above
        # the cursor (the next run's), mail expunged meanwhile is not delivered.
        self._searched[folder.pk] = uids

    def _new_mail(self, session: ImapSession, folder: MailFolder) -> None:
        uids = self._search(session, above=folder.uid_high)
        if not uids:
            return
        sizes = session.fetch_sizes(uids)
        self._add_totals(len(sizes), sum(sizes.values()))
        def advance_to(batch: list[int]) -> Callable[[MailFolder], None]:
            def advance(f: MailFolder) -> None:
                f.uid_high = max(f.uid_high, max(batch))
            return advance

        self._fetch_and_store(session, folder, list(_batches(sorted(sizes), sizes)), advance_to, sizes)

    def _new_mail_left_out(self, session: ImapSession, folder: MailFolder, *, above: int) -> None:
        """New in the folder but older than "sync mail since" (a move keeps the INTERNALDATE):
        a mail the CRM holds, moved here from another folder by a mail program after the
        date was moved later, is followed here (``_find_known_again``) instead of staying
        a tombstone while it sits in a synced folder. The cursor then passes the rest (left
        out on purpose; "since" moved earlier backfills below it), so that they are looked
        at once, not on every run."""
        every, wanted, left_out = self._left_out_by_since(session, folder, above=above)
        if not left_out:
            return
        self._find_known_again(session, folder, left_out)
        # Not past mail of the date that came between the two SEARCHes (not fetched yet).
        waiting = [u for u in wanted if u > folder.uid_high]
        top = max((u for u in every if not waiting or u < min(waiting)), default=0)
        if top > folder.uid_high:
            folder.uid_high = top
            folder.save(update_fields=["uid_high"])

    def _left_out_by_since(self, session: ImapSession, folder: MailFolder, *, above: int = 0,
                           remap: bool = False) -> tuple[list[int], set[int], list[int]]:
        """(UIDs above ``above``, those of the "sync mail since" search, those it leaves out
        that the folder has no current place for). ``remap``: only while places under an
        earlier UIDVALIDITY are left that no mail found again covers (else there is nothing
        to look for)."""
        if self.mailbox.sync_since is None:
            return [], set(), []
        current = EmailLocation.objects.filter(folder=folder, uidvalidity=folder.uidvalidity)
        since = None
        if remap:
            lost = Email.objects.filter(pk__in=EmailLocation.objects.filter(folder=folder).exclude(
                uidvalidity=folder.uidvalidity).exclude(email_id__in=current.values("email_id"))
                .values("email_id"))
            if not lost.exists():
                return [], set(), []
            # Only as far back as the oldest mail to find (its Date, with two days' margin
            # for the INTERNALDATE): not the headers of years of mail the CRM never had.
            if not lost.filter(date__isnull=True).exists():
                oldest = lost.order_by("date").values_list("date", flat=True).first()
                since = (oldest - timedelta(days=2)).date()
        every = session.search_uids(since=since, above=above)
        if not every:  # no new mail at all (a flag change): one SEARCH
            return [], set(), []
        known = set(current.values_list("uid", flat=True))
        wanted = set(self._search(session, above=above))
        return every, wanted, [u for u in every if u not in wanted and u not in known]

    def _find_known_again(self, session: ImapSession, folder: MailFolder, uids: list[int]) -> None:
        """Of mail older than "sync mail since", what the CRM already holds (its Message-ID
        is a stored mail's) gets its place here, downloaded again (by fingerprint, the same
        row): moved later, the date must not drop mail the CRM had, though it is still on
        the server, when the folder is re-read (UIDVALIDITY change) or the mail is moved to
        another synced folder. Only the headers of the rest are read, and nothing new is
        stored for them (the date keeps them out)."""
        from ..mime import parse_envelope

        if not uids:
            return
        found: list[int] = []
        for start in range(0, len(uids), BATCH_MESSAGES):
            ids: dict[str, list[int]] = {}
            for message in session.fetch_headers(uids[start:start + BATCH_MESSAGES]):
                try:
                    message_id = parse_envelope(bytes(message.raw)).message_id
                except Exception:  # noqa: BLE001  (an unreadable header: not a known mail)
                    continue
                if message_id:
                    ids.setdefault(message_id.replace("\x00", "")[:1000], []).append(message.uid)
            for message_id in Email.objects.filter(mailbox=self.mailbox, message_id__in=list(ids)
                                                   ).values_list("message_id", flat=True):
                found += ids.pop(message_id, [])
        self._relocate(session, folder, sorted(found))

    def _relocate(self, session: ImapSession, folder: MailFolder, uids: list[int]) -> None:
        """Download these UIDs and give those that are mails the CRM holds (the same
        fingerprint: not merely the same Message-ID) their place here, read, flagged and
        live as that place says. The others are left alone: nothing new is imported."""
        if not uids:
            return
        sizes = session.fetch_sizes(uids)
        for batch in _batches(sorted(sizes), sizes):
            self._check_budget()
            prepared = prepare_batch([m for m in fetch_batch(session, batch, sizes,
                                                             self.mailbox.max_message_bytes)
                                      if not m.error])
            held = set(Email.objects.filter(mailbox=self.mailbox,
                                            fingerprint__in=[p.fingerprint for p in prepared])
                       .values_list("fingerprint", flat=True))
            mine = [p for p in prepared if p.fingerprint in held]
            if not mine:
                continue
            truncated = [p.message for p in mine if p.message.truncated]

            def notice(f: MailFolder, truncated: list = truncated) -> None:
                if truncated:
                    notice_truncated(self.mailbox, f, truncated)

            ingest_batch(mailbox=self.mailbox, folder=folder, uidvalidity=folder.uidvalidity,
                         prepared=mine, advance_cursor=notice, progress=False, durable=False)

    def _backfill(self, session: ImapSession, folder: MailFolder) -> None:
        # Below what the folder has; UIDs already stored are skipped (a backfill run again
        # after "sync mail since" moved earlier downloads only the older mail).
        known = set(EmailLocation.objects.filter(folder=folder, uidvalidity=folder.uidvalidity)
                    .values_list("uid", flat=True)) if folder.uidvalidity is not None else set()
        searched = self._searched.pop(folder.pk, None)
        uids = [u for u in (self._search(session) if searched is None else searched)
                if u < (folder.uid_low or 0) and u not in known]
        planned = self._drop_plan(folder)
        if planned is not None:  # counted already (_plan): only the difference now
            still_there = set(uids)
            gone = [u for u in planned if u not in still_there]
            self._add_totals(-len(gone), -sum(planned[u] for u in gone))
            sizes = {u: planned[u] for u in uids if u in planned}
            extra = [u for u in uids if u not in planned]
            if extra:
                more = session.fetch_sizes(extra)
                self._add_totals(len(more), sum(more.values()))
                sizes.update(more)
        else:
            sizes = session.fetch_sizes(uids) if uids else {}
            self._add_totals(len(sizes), sum(sizes.values()))
        def advance_to(batch: list[int]) -> Callable[[MailFolder], None]:
            def advance(f: MailFolder) -> None:
                f.uid_low = min(f.uid_low or min(batch), min(batch))
            return advance

        self._fetch_and_store(session, folder, list(_batches(sorted(sizes, reverse=True), sizes)),
                              advance_to, sizes)
        folder.backfill_done = True
        folder.save(update_fields=["backfill_done"])

    def _fetch_and_store(self, session: ImapSession, folder: MailFolder, batches: list[list[int]],
                         advance_to: Callable[[list[int]], Callable[[MailFolder], None]],
                         sizes: dict[int, int]) -> None:
        """Fetch batch n+1 (and hash, parse headers, compress it) while batch n is written to
        the database: in a child process for a large download (both cores work), else in a
        second thread. At most two batches are in memory. Messages over the mailbox's size
        limit are imported as their headers, with a notice."""
        limit = self.mailbox.max_message_bytes
        self._sizes = sizes
        if batches:
            # Before anything is fetched: the batch checks come after a batch is downloaded
            # (the fetch runs ahead), and a run while the day's budget is spent (new mail
            # and changes still sync then) must not download a batch only to drop it.
            self._check_budget()
        while batches:
            stored = self._fetch_and_store_some(session, folder, batches, advance_to, sizes, limit)
            batches = batches[stored:]
            if batches:  # stopped early: a CRM action waits for the connection
                self._hand_over(session, folder)

    def _fetch_and_store_some(self, session: ImapSession, folder: MailFolder, batches: list[list[int]],
                              advance_to: Callable[[list[int]], Callable[[MailFolder], None]],
                              sizes: dict[int, int], limit: int) -> int:
        """Batches fetched and stored, in order, until all are or something waits for the
        connection; how many were stored. The session is open and on the folder after all of
        them, closed after an early stop."""
        if self._use_fetch_process(batches):
            # The child opens its own connection; this one is closed meanwhile, so the
            # mailbox never holds more than two (the sync's and the IDLE watcher's).
            session.close()
            job = FetchJob(server_settings(self.mailbox, timeout=self.timeout), folder.name,
                           folder.uidvalidity, batches, sizes, limit)
            spare, self._spare = self._spare, None
            try:
                stored = self._store_batches(folder, fetch_in_child(job, spare), advance_to, len(batches))
            except BudgetExhausted as paused:
                if paused.older:  # the run goes on with new mail and changes: on this folder
                    self._reopen(session, folder)
                raise
            if stored == len(batches):
                self._reopen(session, folder)
            return stored

        def fetch(batch: list[int]) -> list:
            return fetch_batch(session, batch, sizes, limit)

        stored = self._store_batches(folder, _prefetch(fetch, batches), advance_to, len(batches))
        if stored < len(batches):
            session.close()
        return stored

    def _reopen(self, session: ImapSession, folder: MailFolder) -> None:
        session.connect()
        again = session.select(folder.name, readonly=True)
        if again.uidvalidity != folder.uidvalidity:
            raise MailTransientError(
                "The folder changed on the server (UIDVALIDITY) during the sync; it is "
                "synced again on the next run."
            )

    def _hand_over(self, session: ImapSession, folder: MailFolder) -> None:
        """The connection (closed) goes to the CRM action that waits for it; the download
        goes on from the next batch once it is done (a new connection)."""
        assert self._slot is not None
        log.info("mailbox %s: connection handed over to a waiting action", self.mailbox.pk)
        self._slot.hand_over(wait=SYNC_CONNECTION_WAIT)
        self._reopen(session, folder)

    def _can_use_fetch_process(self) -> bool:
        return (self._own_session and self.session_factory is ImapSession
                and settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES > 0)

    def _use_fetch_process(self, batches: list[list[int]]) -> bool:
        return (
            self._can_use_fetch_process()
            and len(batches) > 1
            and sum(len(batch) for batch in batches) >= settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES
        )

    def _store_batches(self, folder: MailFolder, source: Iterator[tuple[list[int], list]],
                       advance_to: Callable[[list[int]], Callable[[MailFolder], None]],
                       count: int) -> int:
        # Closed at once on an error or an early stop: the fetch process (or thread) stops
        # now, not when the traceback that references this frame is freed.
        with contextlib.closing(source):
            return self._store_all(folder, source, advance_to, count)

    def _store_all(self, folder: MailFolder, source: Iterator[tuple[list[int], list]],
                   advance_to: Callable[[list[int]], Callable[[MailFolder], None]],
                   count: int) -> int:
        """Store the batches of ``source`` (``count`` of them); after each, stop if a CRM
        action waits for the connection. How many were stored."""
        stored = 0
        for batch, prepared, kept_back in source:
            self._check_budget()
            truncated = [p.message for p in prepared if p.message.truncated]

            def advance(f: MailFolder, batch: list[int] = batch, truncated: list = truncated,
                        kept_back: list = kept_back, prepared: list = prepared) -> None:
                advance_to(batch)(f)
                if truncated:
                    self._notice_truncated(f, truncated)
                if kept_back:
                    self._notice_kept_back(f, kept_back)
                # Expunged between SEARCH and FETCH: off this run's totals.
                arrived = {p.message.uid for p in prepared} | {m.uid for m in kept_back}
                gone = [uid for uid in batch if uid not in arrived]
                if gone:
                    Mailbox.objects.filter(pk=self.mailbox.pk).update(
                        messages_total=F("messages_total") - len(gone),
                        bytes_total=F("bytes_total") - sum(self._sizes.get(uid, 0) for uid in gone))

            result = ingest_batch(mailbox=self.mailbox, folder=folder,
                                  uidvalidity=folder.uidvalidity, prepared=prepared,
                                  advance_cursor=advance, durable=False)
            if _TEST_STORE_DELAY:
                time_module.sleep(_TEST_STORE_DELAY)
            self.report.new += result.stored
            self.report.located += result.located
            self.report.failed += result.failed
            stored += 1
            if stored < count and self._slot is not None and self._slot.wanted():
                break
        return stored

    def _notice_kept_back(self, folder: MailFolder, messages: list) -> None:
        from ..models import MessageError

        MessageError.objects.bulk_create([
            MessageError(mailbox=self.mailbox, folder=folder, uidvalidity=folder.uidvalidity,
                         uid=m.uid, error=m.error)
            for m in messages
        ], ignore_conflicts=True)
        Mailbox.objects.filter(pk=self.mailbox.pk).update(
            messages_done=F("messages_done") + len(messages),
            bytes_done=F("bytes_done") + sum(self._sizes.get(m.uid, 0) for m in messages))
        self.report.failed += len(messages)

    def _notice_truncated(self, folder: MailFolder, messages: list) -> None:
        notice_truncated(self.mailbox, folder, messages)

    # -- server-side changes ------------------------------------------------------------------
    def _known(self, folder: MailFolder) -> dict[int, tuple[int, list[str]]]:
        return {
            uid: (email_id, flags)
            for uid, email_id, flags in EmailLocation.objects.filter(
                folder=folder, uidvalidity=folder.uidvalidity
            ).values_list("uid", "email_id", "flags")
        }

    def _flags(self, session: ImapSession, folder: MailFolder, modseq: int | None) -> list[int] | None:
        """Flag changes made on the server. Returns the folder's UIDs on the server when it
        had to list them (no CONDSTORE), for ``_expunges``."""
        known = self._known(folder)
        if not known:
            return None
        changed: dict[int, tuple[str, ...]] = {}
        if modseq is not None and folder.highestmodseq is not None:
            # CONDSTORE: what changed since, in one command whatever the folder's size.
            changed = session.fetch_flags(sorted(known), changed_since=folder.highestmodseq)
            self._apply_flags(folder, known, changed)
            return None
        # Without CONDSTORE (Outlook.com) every known message's flags are fetched on each
        # run. Asked for by the UIDs themselves, a folder whose UIDs lie far apart (years of
        # deletes) took a command per ~1,000 UIDs (a UID set is cut at 8,000 characters):
        # ~300 round trips per resync at 300,000 messages. The server's list of UIDs (the
        # SEARCH ALL the expunge check needs anyway) cuts the known ones still there into
        # runs of FLAG_BATCH, each asked for as "first:last" in one command, when the run's
        # span holds few other messages (the reply is at most what the span holds).
        on_server = session.search_uids()
        present = [uid for uid in on_server if uid in known]
        for start in range(0, len(present), FLAG_BATCH):
            run = present[start:start + FLAG_BATCH]
            spanned = bisect.bisect_right(on_server, run[-1]) - bisect.bisect_left(on_server, run[0])
            changed.update(session.fetch_flags(run, span=spanned <= 2 * len(run)))
        self._apply_flags(folder, known, changed)
        return on_server

    def _apply_flags(self, folder: MailFolder, known: dict[int, tuple[int, list[str]]],
                     changed: dict[int, tuple[str, ...]]) -> None:
        updates = [(uid, flags) for uid, flags in changed.items()
                   if uid in known and sorted(known[uid][1]) != list(flags)]
        if not updates:
            return
        # One UPDATE per distinct set of flags (a handful), not one per message: "mark all
        # as read" in a mail program changes every message of the folder (an UPDATE each
        # took ~0.4 ms: 8 s for 20,000 messages, in one transaction).
        by_flags: dict[tuple[str, ...], list[int]] = {}
        for uid, flags in updates:
            by_flags.setdefault(tuple(flags), []).append(uid)
        # A copy marked \Deleted in a mail program (deleted, waiting for an expunge: RFC 3501
        # 2.3.2) is not a place the mail shows from; the mark taken off, it is again.
        marked = {known[uid][0] for uid, flags in updates
                  if "\\Deleted" in flags and "\\Deleted" not in known[uid][1]}
        unmarked = {known[uid][0] for uid, flags in updates
                    if "\\Deleted" not in flags and "\\Deleted" in known[uid][1]}
        with transaction.atomic():
            for flags, uids in by_flags.items():
                EmailLocation.objects.filter(
                    folder=folder, uidvalidity=folder.uidvalidity, uid__in=uids
                ).update(flags=list(flags))
            # Read or flagged where any copy is (a mail may sit in two folders).
            refresh_flags({known[uid][0] for uid, _ in updates})
            if marked:
                tombstone_placeless(marked)
            if unmarked:
                Email.objects.filter(pk__in=list(unmarked), deleted_at__isnull=False).update(deleted_at=None)
        self.report.flag_changes += len(updates)

    def _changes_qresync(self, session: ImapSession, folder: MailFolder) -> None:
        """Flag changes and expunges since the last run, in one command whatever the
        folder's size (``fetch_changes``)."""
        known = self._known(folder)
        changed, vanished = session.fetch_changes(sorted(known), changed_since=folder.highestmodseq or 0)
        self._apply_flags(folder, known, {u: f for u, f in changed.items() if u not in vanished})
        self._apply_expunges(folder, known, sorted(vanished))

    def _expunges(self, session: ImapSession, folder: MailFolder,
                  listed: list[int] | None = None) -> None:
        """Known messages no longer on the server; ``listed``: the folder's UIDs as this run
        already had them from the server (``_flags``)."""
        known = self._known(folder)
        if not known:
            return
        on_server = set(session.search_uids() if listed is None else listed)
        self._apply_expunges(folder, known, [uid for uid in known if uid not in on_server])

    def _apply_expunges(self, folder: MailFolder, known: dict[int, tuple[int, list[str]]],
                        gone: list[int]) -> None:
        if not gone:
            return
        email_ids = {known[uid][0] for uid in gone}
        with transaction.atomic():
            EmailLocation.objects.filter(
                folder=folder, uidvalidity=folder.uidvalidity, uid__in=gone
            ).delete()
            _tombstone_placeless(email_ids)
            refresh_flags(email_ids)  # what the copies left say
            # Their notices ("only its headers were imported: raise the limit") go with them:
            # the status listed them for mail no longer on the server, for good.
            _resolve_errors(folder, uidvalidity=folder.uidvalidity, uids=gone)
        self.report.expunged += len(gone)


def _resolve_errors(folder: MailFolder, *, uidvalidity: int | None = None, uids: Sequence[int] = (),
                    stale: bool = False) -> None:
    """Resolve the folder's open per-message errors: of these UIDs, or (``stale``) all those
    under another UIDVALIDITY than the folder's."""
    from ..models import MessageError

    errors = MessageError.objects.filter(folder=folder, resolved_at__isnull=True)
    if stale:
        errors = errors.exclude(uidvalidity=folder.uidvalidity)
    else:
        errors = errors.filter(uidvalidity=uidvalidity, uid__in=list(uids))
    errors.update(resolved_at=timezone.now())


def _tombstone_placeless(email_ids: set[int] | list[int]) -> None:
    """Mails left with no place on the server leave the CRM views but are kept
    (recoverable: found again on the server, they come back) until the retention ends."""
    tombstone_placeless(email_ids)


def imap_mailbox_sync(*, mailbox: Mailbox, timeout: float = 30.0) -> SyncReport:
    """Sync one IMAP mailbox now. Raises MailUserError (no retry), MailTransientError (retry)."""
    return ImapSync(mailbox, timeout=timeout).run()


__all__ = ["BudgetExhausted", "ImapSync", "SyncReport", "imap_mailbox_sync", "MailUserError",
           "MailTransientError"]


class RetryPaused(BudgetExhausted):
    """Retry stopped at the provider's daily download limit; ``stored`` came before it."""

    def __init__(self, until: datetime, *, stored: int) -> None:
        super().__init__(until)
        self.stored = stored


def retry_message_errors(*, mailbox: Mailbox) -> int:
    """Fetch again the messages recorded in MessageError and store them (idempotent).

    Within the provider's daily download limit, as a sync is: RetryPaused (with what was
    stored before) when it is reached, before the first batch or between two."""
    from ..models import MessageError

    stored = 0
    errors = MessageError.objects.filter(mailbox=mailbox, resolved_at__isnull=True).select_related("folder")
    by_folder: dict[int, list[MessageError]] = {}
    for error in errors:
        if error.folder_id and error.uid:
            by_folder.setdefault(error.folder_id, []).append(error)
    if not by_folder:
        return 0
    limit = preset_for(mailbox.provider).daily_download_bytes
    in_folder: list[int] = []  # the errors of the folder being fetched again

    def within_budget() -> None:
        until = budget_spent_until(mailbox.pk, limit)
        if until is not None:
            # What was stored: the folders done, and in this one the errors a stored batch
            # resolved (those gone from the server are resolved after its fetch only).
            here = MessageError.objects.filter(pk__in=in_folder, resolved_at__isnull=False).count()
            raise RetryPaused(until, stored=stored + here)

    within_budget()  # spent already: not even a login
    with mailbox_lock(mailbox.pk), connection_slot(mailbox.pk, wait=settings.MAILROOM_CONNECTION_WAIT), \
            ImapSession(server_settings(mailbox)) as session:
        for folder_errors in by_folder.values():
            folder = folder_errors[0].folder
            selected = session.select(folder.name, readonly=True)
            already = set(EmailLocation.objects.filter(
                folder=folder, uidvalidity=selected.uidvalidity,
                uid__in=[e.uid for e in folder_errors]).values_list("uid", flat=True))
            # Notices about mail already stored (e.g. over the size limit: headers only) are
            # not failures to fetch again.
            current = [e for e in folder_errors
                       if e.uidvalidity == selected.uidvalidity and e.uid not in already]
            uids = sorted({e.uid for e in current})
            in_folder[:] = [e.pk for e in current]
            again, fetched, still = fetch_again(session, mailbox, folder, selected.uidvalidity, uids,
                                                session.fetch_sizes(uids), progress=False,
                                                before_batch=within_budget)
            stored += again
            # Gone from the server since: nothing left to retry. (Still there and not sent
            # again: the error stays.)
            MessageError.objects.filter(pk__in=[e.pk for e in current
                                                if e.uid not in fetched and e.uid not in still]).update(
                resolved_at=timezone.now()
            )
    return stored


def fetch_again(session: ImapSession, mailbox: Mailbox, folder: MailFolder, uidvalidity: int,
                uids: list[int], sizes: dict[int, int], *, progress: bool, durable: bool = True,
                before_batch: Callable[[], None] | None = None,
                on_held: Callable[[list], None] | None = None) -> tuple[int, set[int], set[int]]:
    """Messages fetched again (held back by the server on an earlier run, or failed to
    store), in the download's batches, each stored before the next is fetched: thousands
    of them are never in memory at once. Over the mailbox's size limit, the headers only,
    with the notice. Returns (stored or found in place, UIDs that came, UIDs the server held
    back again); ``on_held`` gets each batch's held-back messages."""
    stored, fetched, still = 0, set(), set()
    for batch in _batches(uids, sizes):
        if before_batch is not None:
            before_batch()
        got = fetch_batch(session, batch, sizes, mailbox.max_message_bytes)
        messages = [m for m in got if not m.error]
        held = [m for m in got if m.error]
        if held and on_held is not None:
            on_held(held)
        if messages:
            truncated = [m for m in messages if m.truncated]

            def notice(f: MailFolder, truncated: list = truncated) -> None:
                if truncated:
                    notice_truncated(mailbox, f, truncated)

            result = ingest_batch(mailbox=mailbox, folder=folder, uidvalidity=uidvalidity,
                                  messages=messages, advance_cursor=notice, progress=progress,
                                  durable=durable)
            stored += result.stored + result.located
        fetched |= {m.uid for m in messages}
        still |= {m.uid for m in held}
        del got, messages, held
    return stored, fetched, still


def notice_truncated(mailbox: Mailbox, folder: MailFolder, messages: list) -> None:
    """Say, per message, that only its headers were imported (over the size limit)."""
    from ..models import MessageError

    limit_mb = mailbox.max_message_bytes / 2**20
    MessageError.objects.bulk_create([
        MessageError(
            mailbox=mailbox, folder=folder, uidvalidity=folder.uidvalidity, uid=m.uid,
            error=(f"This message ({m.size / 2**20:.1f} MB) is over this mailbox's limit of "
                   f"{limit_mb:.1f} MB: only its headers were imported. It stays on the server; "
                   "raise the limit to download it whole."),
        ) for m in messages
    ], ignore_conflicts=True)
