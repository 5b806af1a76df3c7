"""The POP3 sync engine: a one-way download that never loses a message.

Per run, under the mailbox lock:
1. LIST + UIDL. Each message gets a key: its UIDL, or a hash of its headers (TOP n 0) where
   the server has no UIDL or gives two messages the same one.
2. Known keys (a ``Pop3Message`` row) are not downloaded again. Those the mode says to
   remove (remove after download; or a copy kept N days, now past) get a DELE.
3. New messages, in batches: RETR (or TOP n 0 over the size limit), stored through the
   same ingest as IMAP, and the ``Pop3Message`` rows written in the SAME transaction. Only
   after the commit does a DELE follow.
4. QUIT, which is when the server removes what was marked (RFC 1939 6). A connection lost
   before QUIT removes nothing: the next run finds those messages again, knows their keys,
   stores nothing twice and marks them again. ``deleted_from_server_at`` is set after the
   server confirmed QUIT, or, when that reply was lost, by the next run that no longer finds
   them listed.

The CRM copy is independent: nothing done in the CRM reaches the server, and a message
removed on the server stays in the CRM.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time as time_module
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Max
from django.utils import timezone

from ..bulk import insert_rows
from ..exceptions import MailError, MailProtocolError
from ..models import Email, EmailLocation, MailFolder, Mailbox, MessageError, Pop3Message
from ..protocols.base import FetchedMessage, ServerSettings
from ..protocols.pop3 import Pop3Listing, Pop3Request, Pop3Retrieved, Pop3Session
from ..storage import decompress
from .base import BudgetExhausted, SyncReport, SyncRun, server_settings
from .fetcher import Pop3ChildSession, retrieve_prepared
from .ingest import Prepared, complete_truncated, ingest_batch
from .pipeline import batched
from .lock import mailbox_lock

log = logging.getLogger(__name__)

# A batch (one transaction) holds at most this many messages and about this many bytes: the
# same trade-off as IMAP (bulk INSERTs amortized; memory and work lost to a cut bounded).
BATCH_MESSAGES = int(os.environ.get("MAILROOM_TEST_BATCH_MESSAGES", "250"))
BATCH_BYTES = 24 * 1024 * 1024
# Tests that kill a worker between storing and DELE slow each commit down to aim the kill.
_TEST_STORE_DELAY = float(os.environ.get("MAILROOM_TEST_STORE_DELAY", "0"))
# TOP n 0 of a message: headers only. A 20,000-address To header is ~600 KB.
HEADERS_MAX_BYTES = 2 * 1024 * 1024
# A run reconnects when a reply overflowed its cap (the connection cannot be reused); a
# message found over the limit that way is then fetched as headers. Bounded, in case a
# server keeps doing it.
MAX_SESSIONS = 5
# POP3 has one maildrop; its mail is stored under this folder (no UIDVALIDITY in POP3).
POP3_FOLDER = "INBOX"
POP3_UIDVALIDITY = 0
EMAIL_SIZE_MAX = 2**31 - 1  # Email.size is a 32-bit column; a LIST size may be anything
KNOWN_CHUNK = 5000
_UNIDENTIFIED = "Not downloaded:"
_REFUSED = "Not downloaded yet:"
_UNDELETED = "Not removed from the server:"
# Messages whose headers are hashed per pipelined round (servers without usable UIDL).
HASH_CHUNK = 200


Fetched = tuple[list[Pop3Retrieved], dict[int, Prepared]]


@dataclass
class Keyed:
    listing: Pop3Listing
    key: str
    kind: str  # Pop3Message.KeyKind


def header_hash_key(headers: bytes, size: int | None) -> str:
    """The fallback key: SHA-256 of the header block (CRLF/LF alike) and the LIST size."""
    basis = headers.replace(b"\r\n", b"\n") + f"\nsize:{size}".encode()
    return "hdr:" + hashlib.sha256(basis).hexdigest()


def assign_keys(listing: Sequence[Pop3Listing],
                hash_keys: Callable[[Sequence[Pop3Listing]], dict[int, str]]) -> list[Keyed]:
    """A key per message: its UIDL where it is present and unique in this listing, else a
    header hash (``hash_keys`` fetches TOP n 0 of the messages given and hashes them).
    Identical header hashes get an ordinal, so two copies of one message both count."""
    counts = Counter(item.uidl for item in listing if item.uidl)
    keyed: list[Keyed] = []
    need_hash = [item for item in listing if not item.uidl or counts[item.uidl] > 1]
    hashes = hash_keys(need_hash) if need_hash else {}
    seen: Counter[str] = Counter()
    for item in listing:
        if item.uidl and counts[item.uidl] == 1:
            keyed.append(Keyed(item, item.uidl, Pop3Message.KeyKind.UIDL))
            continue
        base = hashes.get(item.number)
        if base is None:
            # TOP refused (no UIDL either): a key from the size alone would take another
            # message of that size for this one, and a DELE could remove mail never stored.
            # Left alone this run: neither downloaded nor deleted.
            continue
        seen[base] += 1
        key = base if seen[base] == 1 else f"{base}:{seen[base]}"
        keyed.append(Keyed(item, key, Pop3Message.KeyKind.HASH))
    return keyed


class _Large(Exception):
    """This download is large enough to be done in a child process (fetcher.py)."""


@dataclass
class _Known:
    downloaded_at: datetime
    truncated: bool
    email_id: int | None = None
    size: int = 0
    gone: bool = False  # deleted_from_server_at is set: the server confirmed its removal


def _batches(items: Sequence[Keyed], size_of: Callable[[Keyed], int]) -> Iterator[list[Keyed]]:
    return batched(items, size_of, max_items=BATCH_MESSAGES, max_bytes=BATCH_BYTES)


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


class Pop3Sync(SyncRun):
    """One run over one POP3 mailbox. Create per run; call ``run()``."""

    def __init__(self, mailbox: Mailbox, *,
                 session_factory: Callable[[ServerSettings], Pop3Session] = Pop3Session,
                 timeout: float = 30.0) -> None:
        super().__init__(mailbox, timeout=timeout)
        self.session_factory = session_factory
        self.report.folders = 1
        # Keys whose RETR went over the limit although LIST said it fitted: headers only.
        self.too_large: set[str] = set()
        self.counted: set[str] = set()
        # Keys whose RETR the server refused this run, with its reply (for the status).
        self.refused: dict[str, str] = {}
        self.folder: MailFolder | None = None
        self.next_uid = 1
        self.key_of: dict[int, str] = {}  # this session's message numbers: their keys

    # -- entry --------------------------------------------------------------------------------
    def _work(self) -> None:
        factory = self.session_factory
        for _ in range(MAX_SESSIONS):
            try:
                if self._session(factory):
                    return
            except _Large:
                factory = Pop3ChildSession
            except MailError as exc:
                # Cut mid-RETR or mid-TOP: what came before the cut was counted by the provider.
                self._charge_budget(getattr(exc, "received", 0))
                raise
        raise MailProtocolError(
            "The server kept sending messages larger than it announced; try again later."
        )

    def _start(self) -> None:
        super()._start()
        self.folder, _ = MailFolder.objects.get_or_create(
            mailbox=self.mailbox, name=POP3_FOLDER,
            defaults={"special_use": "inbox", "uidvalidity": POP3_UIDVALIDITY, "backfill_done": True},
        )

    # -- one connection -----------------------------------------------------------------------
    def _session(self, factory: Callable[[ServerSettings], Pop3Session]) -> bool:
        """One connection: list, delete what the mode says, download what is new, QUIT.

        Returns False when the connection had to be given up after a reply over its size
        cap (nothing is lost: the run reconnects and goes on). Raises _Large, before any
        DELE, when the download is large enough for a child process (Pop3ChildSession).
        """
        with factory(server_settings(self.mailbox, timeout=self.timeout)) as session:
            listing = session.listing()
            keyed = assign_keys(listing, lambda items: self._hash_keys(session, items))
            known = self._known([k.key for k in keyed])
            keyed = self._rekey_reused(session, keyed, known)
            self.key_of = {k.listing.number: k.key for k in keyed}
            self._say_unidentified(len(listing) - len(keyed))
            self._note_removed(listing, keyed)
            minimum = settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES
            if (factory is Pop3Session and minimum > 0
                    and sum(k.key not in known for k in keyed) >= minimum):
                raise _Large  # leaving without QUIT: nothing is marked, nothing removed
            marked: list[str] = []
            try:
                expired = [k for k in keyed if k.key in known and self._remove(known[k.key])]
                if expired:
                    session.delete([k.listing.number for k in expired])
                    marked += [k.key for k in expired]
                new = [k for k in keyed if k.key not in known]
                if not self._download(session, new, marked):
                    return False
                if not self._complete(session, keyed, known):
                    return False
            except BudgetExhausted:
                self._quit(session, marked)  # what is marked is stored: let QUIT remove it
                raise
            self._quit(session, marked)
        self._say_refused()
        return True

    def _say_refused(self) -> None:
        """Messages the server would not send (RETR -ERR) stay on the server and are tried
        again next run. Without a word in the status, a message the server refuses every
        time (a damaged file, a server-side scan) was never imported while the mailbox
        showed "Completed" with nothing to do: the user had no way to know a customer
        mail was missing. One that vanished meanwhile (another client) is gone next run."""
        self.report.errors = [e for e in self.report.errors if not e.startswith(_REFUSED)]
        if self.refused:
            count = len(self.refused)
            reply = next(iter(self.refused.values()))
            self.report.errors.append(
                f"{_REFUSED} {count} message{'s' if count > 1 else ''} the server refused to send "
                f"(it answered: {reply[:120]}). {'They were' if count > 1 else 'It was'} left on the "
                "server and will be tried again at the next sync; if this lasts, open the message "
                "in webmail or ask the provider.")

    def _rekey_reused(self, session: Pop3Session, keyed: list[Keyed],
                      known: dict[str, _Known]) -> list[Keyed]:
        """A known UIDL that now names another message: the server reused it (RFC 1939 7
        says it must not; servers that rebuild their index, or number ids from 1, do). Its
        own message was removed from the server at a confirmed QUIT, or its LIST size was
        another. Taking the UIDL at its word would skip the new message (never stored) and,
        in remove mode, DELE it: mail lost on both sides. Such messages are keyed by their
        header hash instead (as without UIDL); a copy that is in fact the old message is
        then downloaded once more and found by Message-ID + content hash (no duplicate).
        ``known`` gets the rows of the new keys. Without TOP they are left alone."""
        reused = {k.listing.number for k in keyed
                  if k.kind == Pop3Message.KeyKind.UIDL and k.key in known
                  and (known[k.key].gone or (k.listing.size is not None and known[k.key].size
                                             and known[k.key].size != k.listing.size))}
        if not reused:
            return keyed
        hashes = self._hash_keys(session, [k.listing for k in keyed if k.listing.number in reused])
        taken = {k.key for k in keyed}
        rekeyed: list[Keyed] = []
        for item in keyed:
            if item.listing.number not in reused:
                rekeyed.append(item)
                continue
            base = hashes.get(item.listing.number)
            if base is None:
                continue  # no way to tell it apart: left alone (counted as unidentified)
            key, ordinal = base, 1
            while key in taken:  # identical copies: an ordinal, as in assign_keys
                ordinal += 1
                key = f"{base}:{ordinal}"
            taken.add(key)
            rekeyed.append(Keyed(item.listing, key, Pop3Message.KeyKind.HASH))
        known.update(self._known([k.key for k in rekeyed if k.listing.number in reused]))
        return rekeyed

    def _say_unidentified(self, count: int) -> None:
        """Messages with no UIDL and whose headers the server refused (TOP) cannot be told
        apart, so they are left alone: the status says so (once per run), with what to do."""
        self.report.errors = [e for e in self.report.errors if not e.startswith(_UNIDENTIFIED)]
        if count:
            self.report.errors.append(
                f"{_UNIDENTIFIED} {count} message{'s' if count > 1 else ''}: the server gives them no "
                "unique id (UIDL) and refuses their headers (TOP), so they were left on the server, "
                "not downloaded. Use IMAP for this mailbox if the provider offers it.")

    def _note_removed(self, listing: Sequence[Pop3Listing], keyed: list[Keyed]) -> None:
        """Stored messages the mode removes from the server that it no longer lists are
        gone from it: a QUIT whose reply was lost (the connection dropped after the server
        applied the DELEs) left them recorded as still there. Only a record is written
        (nothing is deleted anywhere), so a message listed again is taken for another one
        (``_rekey_reused``: downloaded once more, no duplicate). Only the rows the mode
        removes are read (in "remove after download" those not yet confirmed: a few), none
        where mail stays on the server for good."""
        mailbox = self.mailbox
        if not mailbox.pop3_delete_after_download and mailbox.pop3_keep_days is None:
            return
        rows = Pop3Message.objects.filter(mailbox=mailbox, deleted_from_server_at__isnull=True,
                                          truncated=False)
        if not mailbox.pop3_delete_after_download:
            rows = rows.filter(downloaded_at__lte=timezone.now() - timedelta(days=mailbox.pop3_keep_days or 0))
        if len(keyed) < len(listing):
            # Messages left unidentified (no UIDL, TOP refused): a header-hash key may be one
            # of them, still there.
            rows = rows.filter(key_kind=Pop3Message.KeyKind.UIDL)
        listed = {k.key for k in keyed} | {item.uidl for item in listing if item.uidl}
        gone = [key for key in rows.values_list("key", flat=True) if key not in listed]
        if gone:
            log.info("mailbox %s: %s stored messages removed from the server unconfirmed",
                     mailbox.pk, len(gone))
            for start in range(0, len(gone), KNOWN_CHUNK):
                rows.filter(key__in=gone[start:start + KNOWN_CHUNK]).update(
                    deleted_from_server_at=timezone.now())

    def _quit(self, session: Pop3Session, marked: list[str]) -> None:
        refused = session.refused_deletes()
        session.quit()
        # A refused DELE: the message stays on the server (recorded as there, the mode asks
        # again next run) and the status says so.
        kept = {self.key_of.get(number) for number in refused}
        marked = [key for key in marked if key not in kept]
        self.report.errors = [e for e in self.report.errors if not e.startswith(_UNDELETED)]
        if refused:
            count = len(refused)
            self.report.errors.append(
                f"{_UNDELETED} {count} downloaded message{'s' if count > 1 else ''}: the server "
                f"refused to delete {'them' if count > 1 else 'it'} (it answered: "
                f"{next(iter(refused.values()))[:120]}). {'They are' if count > 1 else 'It is'} "
                "in the CRM and will be removed at a later sync if the server allows it.")
        if marked:
            Pop3Message.objects.filter(mailbox=self.mailbox, key__in=marked).update(
                deleted_from_server_at=timezone.now()
            )

    def _hash_keys(self, session: Pop3Session, items: Sequence[Pop3Listing]) -> dict[int, str]:
        """Header-hash keys (TOP n 0), a chunk at a time: only the hashes are kept."""
        keys: dict[int, str] = {}
        sizes = {item.number: item.size for item in items}
        for start in range(0, len(items), HASH_CHUNK):
            replies = session.retrieve([Pop3Request(item.number, HEADERS_MAX_BYTES, headers_only=True)
                                        for item in items[start:start + HASH_CHUNK]])
            # The headers came over the wire: the provider's daily limit counts them.
            self._charge_budget(sum(r.received for r in replies))
            if replies and not replies[-1].complete:
                raise MailProtocolError("The server sent a header block over 2 MB.")
            keys.update({r.number: header_hash_key(r.raw, sizes[r.number])
                         for r in replies if not r.error})
        return keys

    def _known(self, keys: Sequence[str]) -> dict[str, _Known]:
        known: dict[str, _Known] = {}
        for start in range(0, len(keys), KNOWN_CHUNK):
            rows = Pop3Message.objects.filter(
                mailbox=self.mailbox, key__in=keys[start:start + KNOWN_CHUNK]
            ).values_list("key", "downloaded_at", "truncated", "email_id", "size", "deleted_from_server_at")
            known.update({key: _Known(at, truncated, email_id, size, gone is not None)
                          for key, at, truncated, email_id, size, gone in rows})
        return known

    def _remove(self, known: _Known) -> bool:
        """Does the mode say a stored message should leave the server now?"""
        if known.truncated:
            return False  # only its headers are in the CRM: the body stays on the server
        if self.mailbox.pop3_delete_after_download:
            return True
        days = self.mailbox.pop3_keep_days
        return days is not None and known.downloaded_at <= timezone.now() - timedelta(days=days)

    def _headers_only(self, item: Keyed) -> bool:
        size = item.listing.size
        return item.key in self.too_large or (size is not None and size > self.mailbox.max_message_bytes)

    def _download(self, session: Pop3Session, new: list[Keyed], marked: list[str]) -> bool:
        if not new:
            return True

        def size_of(item: Keyed) -> int:
            return 0 if self._headers_only(item) else (item.listing.size or 0)

        # Progress totals count each message once, however many connections the run takes.
        uncounted = [k for k in new if k.key not in self.counted]
        self.counted.update(k.key for k in uncounted)
        Mailbox.objects.filter(pk=self.mailbox.pk).update(
            messages_total=F("messages_total") + len(uncounted),
            bytes_total=F("bytes_total") + sum(size_of(k) for k in uncounted),
        )
        self.next_uid = self._first_free_uid()
        batches = list(_batches(new, size_of))
        removing = self.mailbox.pop3_delete_after_download
        # Stored and committed, DELE not sent yet. A DELE always leaves after the commit of
        # its message: it goes out with the fetch of a later batch, or at the end.
        committed: list[Keyed] = []

        def fetch(batch: list[Keyed], uids: list[int], deletes: list[Keyed]) -> Fetched:
            # The prefetch thread: the only user of the connection while it runs. Parsing
            # the envelope, hashing and compressing happen here too (as for IMAP), or in the
            # child process of a Pop3ChildSession.
            uid_of = {k.listing.number: uid for k, uid in zip(batch, uids, strict=True)}
            requests = self._requests(batch)
            delete_first = [k.listing.number for k in deletes]
            if isinstance(session, Pop3ChildSession):
                return session.retrieve_prepared(requests, delete_first, uid_of)
            return retrieve_prepared(session, requests, delete_first, uid_of)

        def submit(batch: list[Keyed], deletes: list[Keyed]) -> Future[Fetched]:
            # UIDs are handed out here, in order, in this thread.
            uids = list(range(self.next_uid, self.next_uid + len(batch)))
            self.next_uid += len(batch)
            return pool.submit(fetch, batch, uids, deletes)

        # One batch is fetched while the one before it is stored: the server's and the
        # database's time overlap (socket, TLS, zstd and psycopg2 release the GIL).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pop3-prefetch") as pool:
            try:
                self._check_budget()
                job, job_deletes = submit(batches[0], []), []
                for index, batch in enumerate(batches):
                    replies, prepared = job.result()  # the fetch's error, if any, is raised here
                    marked += [k.key for k in job_deletes]
                    complete = all(reply.complete for reply in replies)
                    paused: BudgetExhausted | None = None
                    if complete and index + 1 < len(batches):
                        try:
                            self._check_budget()
                        except BudgetExhausted as exc:
                            paused = exc
                        else:
                            job_deletes, committed = committed, []
                            job = submit(batches[index + 1], job_deletes)
                    stored = self._usable(batch, replies)
                    if stored:
                        self._store([(item, reply, prepared[reply.number]) for item, reply in stored])
                        if _TEST_STORE_DELAY:
                            time_module.sleep(_TEST_STORE_DELAY)
                        if removing and complete:
                            committed += [item for item, reply in stored if not reply.headers_only]
                    if not complete:
                        return False  # the connection is gone: no DELE, no QUIT this time
                    if paused is not None:
                        self._delete(session, committed, marked)
                        raise paused
                self._delete(session, committed, marked)
            except BudgetExhausted:
                raise  # nothing in flight: the caller sends QUIT
            except BaseException:
                # Stop the prefetch at once (its socket is closed under it); no QUIT follows.
                session.abandon()
                raise
        return True

    def _complete(self, session: Pop3Session, keyed: list[Keyed], known: dict[str, _Known]) -> bool:
        """Messages imported as headers only (over the size limit then) that the limit now
        admits: downloaded whole into the same emails (``ingest.complete_truncated``). They
        were left on the server, so the mode may remove them from the next run on.
        False when the connection had to be given up (a reply over the limit after all)."""
        limit = self.mailbox.max_message_bytes
        items = [k for k in keyed if k.key in known and known[k.key].truncated
                 and known[k.key].email_id is not None and k.key not in self.too_large
                 and k.listing.size is not None and k.listing.size <= limit]
        if not items:
            return True
        self._add_totals(len(items), sum(k.listing.size or 0 for k in items))
        for batch in _batches(items, lambda k: k.listing.size or 0):
            self._check_budget()
            numbers = {k.listing.number: k for k in batch}
            replies, prepared = retrieve_prepared(
                session, [Pop3Request(n, limit) for n in numbers], (), {n: n for n in numbers})
            whole = [(numbers[r.number], prepared[r.number]) for r in replies
                     if not r.error and r.complete and not r.headers_only and r.number in prepared]
            with transaction.atomic():
                self.report.completed += complete_truncated(
                    self.mailbox, [(known[k.key].email_id, p) for k, p in whole])  # type: ignore[misc]
                Pop3Message.objects.filter(mailbox=self.mailbox, key__in=[k.key for k, _ in whole]).update(
                    truncated=False)
            if replies and not replies[-1].complete:
                self._charge_budget(replies[-1].received)
                self.too_large.add(numbers[replies[-1].number].key)
                return False  # bigger than LIST said: it stays as it is; the run reconnects
        return True

    @staticmethod
    def _delete(session: Pop3Session, items: list[Keyed], marked: list[str]) -> None:
        if items:
            session.delete([k.listing.number for k in items])
            marked += [k.key for k in items]

    def _requests(self, batch: list[Keyed]) -> list[Pop3Request]:
        return [
            Pop3Request(k.listing.number, HEADERS_MAX_BYTES, headers_only=True)
            if self._headers_only(k)
            else Pop3Request(k.listing.number, self.mailbox.max_message_bytes)
            for k in batch
        ]

    def _usable(self, batch: list[Keyed],
                replies: list[Pop3Retrieved]) -> list[tuple[Keyed, Pop3Retrieved]]:
        """The replies to store; a refused RETR or one over the limit is dealt with here."""
        by_number = {k.listing.number: k for k in batch}
        usable: list[tuple[Keyed, Pop3Retrieved]] = []
        for reply in replies:
            item = by_number[reply.number]
            if reply.error:
                # Left on the server and tried again next run; never recorded as done. Off
                # this run's totals, so that its progress ends complete (another client may
                # have deleted it since the LIST).
                log.warning("mailbox %s: RETR refused (%s)", self.mailbox.pk, reply.error)
                self.report.failed += 1
                self.refused[item.key] = reply.error
                self.counted.discard(item.key)
                Mailbox.objects.filter(pk=self.mailbox.pk).update(
                    messages_total=F("messages_total") - 1,
                    bytes_total=F("bytes_total") - (0 if self._headers_only(item) else (item.listing.size or 0)),
                )
            elif not reply.complete and not reply.headers_only:
                # Bigger than LIST said: its headers are fetched on the next connection. The
                # bytes read until then count against the provider's daily limit.
                self._charge_budget(reply.received)
                self.too_large.add(item.key)
                Mailbox.objects.filter(pk=self.mailbox.pk).update(
                    bytes_total=F("bytes_total") - (item.listing.size or 0)
                )
            else:
                usable.append((item, reply))
        return usable

    def _first_free_uid(self) -> int:
        """POP3 mail is stored with a made-up UID per message (EmailLocation and MessageError
        are keyed by one); never reuse one taken by a location or an error."""
        assert self.folder is not None
        top = max(
            EmailLocation.objects.filter(folder=self.folder, uidvalidity=POP3_UIDVALIDITY)
            .aggregate(top=Max("uid"))["top"] or 0,
            MessageError.objects.filter(folder=self.folder, uidvalidity=POP3_UIDVALIDITY)
            .aggregate(top=Max("uid"))["top"] or 0,
        )
        return top + 1

    def _store(self, stored: list[tuple[Keyed, Pop3Retrieved, Prepared]]) -> None:
        """Ingest the batch; record its keys in the same transaction (the cursor callback)."""
        assert self.folder is not None
        planned = [(p.message.uid, item, reply, p.raw_size) for item, reply, p in stored]
        mailbox = self.mailbox
        for item, _, _ in stored:  # refused on an earlier connection of this run, sent now
            self.refused.pop(item.key, None)

        def record(folder: MailFolder) -> None:
            uids = [uid for uid, _, _, _ in planned]
            emails = dict(
                EmailLocation.objects.filter(folder=folder, uidvalidity=POP3_UIDVALIDITY, uid__in=uids)
                .values_list("uid", "email_id")
            )
            insert_rows(
                Pop3Message, ("mailbox", "key", "key_kind", "email", "size", "truncated"),
                [(mailbox.pk, item.key, str(item.kind), emails.get(uid), item.listing.size or raw_size,
                  reply.headers_only) for uid, item, reply, raw_size in planned],
                ignore_conflicts=True,
            )
            truncated = [(uid, item, raw_size) for uid, item, reply, raw_size in planned
                         if reply.headers_only]
            if truncated:
                for uid, item, _ in truncated:
                    if uid in emails:  # the size of the message, not of what was kept
                        Email.objects.filter(pk=emails[uid]).update(
                            truncated=True, size=min(item.listing.size or 0, EMAIL_SIZE_MAX)
                        )
                # The headers were not in the total announced at the start.
                Mailbox.objects.filter(pk=mailbox.pk).update(
                    bytes_total=F("bytes_total") + sum(raw_size for _, _, raw_size in truncated)
                )
                limit = _megabytes(mailbox.max_message_bytes)
                MessageError.objects.bulk_create([
                    MessageError(
                        mailbox=mailbox, folder=folder, uidvalidity=POP3_UIDVALIDITY, uid=uid,
                        error=(f"This message ({_megabytes(item.listing.size or 0)}) is over this "
                               f"mailbox's limit of {limit}: only its headers were imported. "
                               "It was left on the server; raise the limit to download it whole."),
                    )
                    for uid, item, _ in truncated
                ], ignore_conflicts=True)  # a message that also failed to store has its error

        result = ingest_batch(mailbox=mailbox, folder=self.folder, uidvalidity=POP3_UIDVALIDITY,
                              prepared=[p for _, _, p in stored], advance_cursor=record,
                              undelete=False)
        self.report.new += result.stored
        self.report.located += result.located
        self.report.failed += result.failed


def pop3_mailbox_sync(*, mailbox: Mailbox, timeout: float = 30.0) -> SyncReport:
    """Download a POP3 mailbox now. Raises MailUserError (no retry), MailTransientError (retry)."""
    return Pop3Sync(mailbox, timeout=timeout).run()


def retry_message_errors(*, mailbox: Mailbox) -> int:
    """Store again the messages that failed to store, from the raw bytes kept with the error
    (a POP3 message may be gone from the server). Notices without bytes stay as they are."""
    failed = MessageError.objects.filter(mailbox=mailbox, resolved_at__isnull=True, raw__isnull=False,
                                         folder__isnull=False, uid__isnull=False)
    # One at a time, with its bytes: thousands of failed messages are not held at once.
    ids = list(failed.order_by("pk").values_list("pk", flat=True))
    if not ids:
        return 0
    stored = 0
    with mailbox_lock(mailbox.pk):
        for pk in ids:
            error = failed.select_related("folder").filter(pk=pk).first()
            if error is None:
                continue  # resolved meanwhile (stored by an earlier one: the same UID)
            raw = decompress(error.raw)
            message = FetchedMessage(uid=error.uid, flags=(), size=len(raw), internal_date=None, raw=raw)
            # A success resolves the error (ingest resolves errors of the UIDs it stores).
            result = ingest_batch(mailbox=mailbox, folder=error.folder,
                                  uidvalidity=error.uidvalidity or POP3_UIDVALIDITY,
                                  messages=[message], advance_cursor=lambda f: None, progress=False)
            stored += result.stored + result.located
    return stored


def detach_pop3_places(*, mailbox: Mailbox) -> int:
    """A mailbox switched from POP3 to IMAP: the mail its POP3 downloads stored keeps living
    in the CRM. Call before an IMAP run; returns how many emails were detached.

    POP3 places are (INBOX, UIDVALIDITY 0, a made-up UID). IMAP reads any place in INBOX
    under another UIDVALIDITY than the server's as void once it has read the folder whole,
    and tombstones the mails left without a place: every mail the POP3 download had
    removed from the server (the default mode) would leave the CRM views and be purged
    after the retention period, although the README promises the POP3 copy is independent
    of the server. So those mails lose their places instead (a mail with no place is a CRM
    copy, as a mail the server no longer has) and INBOX is read whole again: what is still
    on the server is found by Message-ID + content hash (no duplicate) and gets its IMAP
    place back. Places of the same mails from an IMAP period before the POP3 one go too:
    POP3 may have removed those messages from the server since."""
    pop3_places = EmailLocation.objects.filter(folder__mailbox=mailbox, uidvalidity=POP3_UIDVALIDITY)
    # The usual case (an IMAP mailbox that never was POP3): one indexed query.
    if not Pop3Message.objects.filter(mailbox=mailbox).exists() or not pop3_places.exists():
        return 0
    with mailbox_lock(mailbox.pk), transaction.atomic():
        email_ids = set(pop3_places.values_list("email_id", flat=True))
        folder_ids = set(EmailLocation.objects.filter(email_id__in=email_ids)
                         .values_list("folder_id", flat=True))
        EmailLocation.objects.filter(email_id__in=email_ids).delete()
        MailFolder.objects.filter(pk__in=folder_ids).update(
            uidvalidity=None, uid_high=0, uid_low=None, backfill_done=False, highestmodseq=None,
            last_uidnext=None, last_exists=None)
    return len(email_ids)
