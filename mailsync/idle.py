"""IMAP IDLE push (RFC 2177): one long-lived connection per active IMAP mailbox that turns
"something changed" into an incremental sync within a second or two.

The watcher never stores mail itself: it asks for ``on_change(mailbox_id)`` (by default, queue
the mailbox's sync task), so push, "Sync now" and the beat poll share one code path. The
supervisor's ``SyncRequests`` thread makes those calls, never a watcher thread itself.

Several watcher processes split the mailboxes between them. On PostgreSQL they do it by
themselves (``IdleClaims``): each holds an advisory lock per mailbox it watches, takes its
fair share of the unclaimed ones and gives up what it holds over its share when another
watcher starts; a watcher that dies loses its locks with its database session, and the
others take its mailboxes over at their next refresh. ``--shard I --shards N`` (and the
embedded SQLite default) split them statically by ``mailbox_id % shards``.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, DatabaseError, close_old_connections, connections
from django.utils import timezone

from .exceptions import MailError, MailServerUnreachable, MailUserError
from .models import Mailbox
from .protocols.base import ServerSettings
from .protocols.imap import ImapSession

log = logging.getLogger(__name__)

# RFC 2177: servers may drop an IDLE after 30 minutes; re-issue well before.
REIDLE_AFTER = 25 * 60
# How often idle_check wakes to look at the stop flag and the re-IDLE clock.
CHECK_INTERVAL = 1.0
BACKOFF_START, BACKOFF_MAX = 2.0, 300.0
# A session that lasted this long resets the reconnect backoff (one ended at once does not).
STABLE_AFTER = 60.0
# How long a new watcher waits for the stopped one of the same mailbox (settings changed, or
# deactivated and activated again) to close its connection before it connects anyway.
REPLACE_WAIT = 10.0
# Responses during IDLE that mean the folder changed (new mail, expunge, flag change).
CHANGE_RESPONSES = {b"EXISTS", b"EXPUNGE", b"FETCH", b"VANISHED"}

OnChange = Callable[[int], None]


def queue_sync(mailbox_id: int) -> None:
    from .tasks import sync_mailbox

    sync_mailbox.delay(mailbox_id)


# A sync that could not be queued (the broker down or slow) is asked for again after this
# many seconds, doubling up to NOTIFY_RETRY_MAX.
NOTIFY_RETRY_START, NOTIFY_RETRY_MAX = 1.0, 60.0
# At shutdown, how long the syncs still pending may take to be queued.
NOTIFY_FLUSH = 5.0


class SyncRequests(threading.Thread):
    """Queues the syncs the watchers ask for, from a thread of its own.

    A watcher thread only records the request and goes straight back to IDLE, whatever the
    broker does: a broker that is down, slow or hangs (a publish can block for seconds
    while the client retries; Celery's app is not made to be driven from many threads at
    once) never keeps a mailbox from being watched, and a request that could not be queued
    is tried again with backoff instead of being dropped (the 5-minute poll was its only
    cover). Requests for a mailbox that is already waiting to be queued count once."""

    def __init__(self, on_change: OnChange) -> None:
        super().__init__(name="idle-sync-requests", daemon=True)
        self.on_change = on_change
        self._pending: dict[int, None] = {}  # mailbox ids, in the order asked (a dict: no repeats)
        self._cond = threading.Condition()
        self._stopping = False
        self._stopped = threading.Event()
        self._flush_until = math.inf  # set by stop()

    def ask(self, mailbox_id: int) -> None:
        with self._cond:
            self._pending[mailbox_id] = None
            self._cond.notify()

    def pending(self) -> list[int]:
        with self._cond:
            return list(self._pending)

    def stop(self) -> None:
        """Stop once what is pending went out, or NOTIFY_FLUSH seconds from now at most (a
        publish already under way is not cut short)."""
        with self._cond:
            self._flush_until = time.monotonic() + NOTIFY_FLUSH
            self._stopping = True
            self._stopped.set()
            self._cond.notify()

    def _next(self) -> int | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            # Taken off before it is queued: one asked for again meanwhile (a change after
            # this sync may have started) is queued again, not merged into this one.
            mailbox_id = next(iter(self._pending))
            del self._pending[mailbox_id]
            return mailbox_id

    def _put_back(self, mailbox_id: int) -> None:
        with self._cond:
            self._pending = {mailbox_id: None, **self._pending}  # first in line again

    def _give_up(self) -> None:
        log.warning("IDLE watcher stopping: syncs not queued for mailboxes %s (the poll "
                    "covers them)", self.pending())

    def run(self) -> None:
        delay = NOTIFY_RETRY_START
        while True:
            mailbox_id = self._next()
            if mailbox_id is None:
                return
            if self._stopped.is_set() and time.monotonic() >= self._flush_until:
                self._put_back(mailbox_id)
                self._give_up()
                return
            try:
                self.on_change(mailbox_id)
                delay = NOTIFY_RETRY_START
                continue
            except Exception:  # noqa: BLE001  (the thread must go on: the next may work)
                log.exception("mailbox %s: could not queue a sync; trying again in %.0f s",
                              mailbox_id, delay)
            self._put_back(mailbox_id)
            if self._stopped.is_set():
                # Stopping: one more try only if it can start before the deadline.
                if time.monotonic() + delay >= self._flush_until:
                    self._give_up()
                    return
                time.sleep(delay)
            else:
                # Not woken by new requests (they would hammer a broker that is down); a
                # stop ends the wait, for the flush.
                self._stopped.wait(delay)
            delay = min(delay * 2, NOTIFY_RETRY_MAX)


def _changed(responses: list[tuple]) -> bool:
    # "* 3 EXISTS" parses as (3, b"EXISTS"); with QRESYNC an expunge is "* VANISHED 1",
    # which parses as (b"VANISHED", 1).
    return any((len(r) > 1 and r[1] in CHANGE_RESPONSES) or (r and r[0] == b"VANISHED")
               for r in responses)


class MailboxWatcher(threading.Thread):
    """Holds one IDLE connection for one mailbox, reconnecting with backoff."""

    def __init__(self, mailbox_id: int, settings: ServerSettings, on_change: OnChange, *,
                 folder: str = "INBOX", reidle_after: float = REIDLE_AFTER,
                 check_interval: float = CHECK_INTERVAL, stable_after: float = STABLE_AFTER,
                 replaces: MailboxWatcher | None = None) -> None:
        super().__init__(name=f"idle-{mailbox_id}", daemon=True)
        self.mailbox_id = mailbox_id
        self.settings = settings
        self.on_change = on_change
        self.folder = folder
        self.reidle_after = reidle_after
        self.check_interval = check_interval
        self.stable_after = stable_after
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.failed: MailError | None = None
        self.failed_at = None  # when (wall clock, to compare with Mailbox.last_sync_at)
        self._connected_at = 0.0
        # The stopped watcher of this mailbox, maybe still closing its connection.
        self.replaces = replaces

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        if self.replaces is not None:
            # A mailbox holds one IDLE connection (providers cap connections; the sync needs
            # the other): the old one ends first. Waited for here, not by the supervisor, so
            # that one stuck connecting (its own timeout) holds up no other mailbox. Not cut
            # short by our own stop: a watcher replaced while it waits is waited for in turn,
            # and so, through it, is the one that still holds the connection.
            self.replaces.join(REPLACE_WAIT)
            self.replaces = None
        backoff = BACKOFF_START
        while not self.stopping.is_set():
            try:
                self._watch()
                backoff = BACKOFF_START
            except MailUserError as exc:
                if not self.connected.is_set():
                    # Wrong password and the like: the sync status already tells the user;
                    # the supervisor restarts us when the mailbox settings change, or once a
                    # sync has logged in since (IdleSupervisor.refresh).
                    log.info("mailbox %s: IDLE stopped: %s", self.mailbox_id, exc.code)
                    self.failed, self.failed_at = exc, timezone.now()
                    return
                # After a working session (a TLS record cut by a dropped network, say): the
                # settings were right, the connection was lost.
                log.info("mailbox %s: IDLE connection lost (%s)", self.mailbox_id, exc.code)
            except (MailError, OSError) as exc:
                log.info("mailbox %s: IDLE connection lost (%s); retry in %.0f s",
                         self.mailbox_id, type(exc).__name__, backoff)
            except Exception:  # noqa: BLE001  (a watcher thread must never die silently)
                log.exception("mailbox %s: IDLE watcher error", self.mailbox_id)
            if self.connected.is_set() and time.monotonic() - self._connected_at >= self.stable_after:
                # It worked for a while: a drop, not a server that ends every session at once.
                backoff = BACKOFF_START
            self.connected.clear()
            # Jittered (half to all of the backoff): when a provider drops every connection at
            # once (a restart, a network cut), the watchers of all its mailboxes must not all
            # log in again in the same instant, and again in step at every doubling.
            if self.stopping.wait(backoff * random.uniform(0.5, 1.0)):
                return
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _notify(self) -> None:
        if self.stopping.is_set():
            # Deactivated or deleted meanwhile (a login that completed after the stop, the
            # DONE reply): no sync for a mailbox that is no longer watched.
            return
        try:
            self.on_change(self.mailbox_id)
        except Exception:  # noqa: BLE001
            log.exception("mailbox %s: could not queue a sync", self.mailbox_id)

    def _watch(self) -> None:
        with ImapSession(self.settings) as session:
            if not session.has("IDLE"):
                log.info("mailbox %s: server has no IDLE; beat polling covers it", self.mailbox_id)
                # Log out first: held unread till our stop, it took one of the account's
                # few connections from the sync and the user's own mail apps for nothing.
                session.close()
                self.stopping.wait()
                return
            session.select(self.folder, readonly=True)
            client = session.client
            assert client is not None
            # IMAPClient's idle_check takes the end of the stream for "nothing yet" and returns
            # at once, again and again (a busy loop that would notice the drop only at the
            # re-IDLE): the end of the stream is recorded here and ends the session.
            imap = client._imap
            read_line = imap._get_line
            ended = threading.Event()

            def get_line() -> bytes:
                try:
                    return read_line()
                except imap.abort as exc:
                    if "EOF" in str(exc):
                        ended.set()
                    raise

            imap._get_line = get_line
            self._connected_at = time.monotonic()
            self.connected.set()
            # Whatever happened while we were not connected.
            self._notify()
            while not self.stopping.is_set():
                # Changes made while we were not idling (queueing a sync) are only reported
                # in reply to a command: NOOP brings our view of the folder up to date.
                _text, responses = session._call(client.noop)
                if _changed(responses):
                    self._notify()
                    continue
                session._call(client.idle)
                started = time.monotonic()
                changed = False
                while (not changed and not self.stopping.is_set()
                       and time.monotonic() - started < self.reidle_after):
                    responses = session._call(client.idle_check, timeout=self.check_interval)
                    changed = _changed(responses)
                    if ended.is_set():
                        if changed:
                            self._notify()
                        raise MailServerUnreachable(f"{self.settings.host} closed the connection.")
                _text, responses = session._call(client.idle_done)
                if changed or _changed(responses):
                    self._notify()


# Advisory lock key space of IDLE claims (the first of the two int4 keys): (CLAIMS, id) is
# "a watcher process IDLEs mailbox id", (CLAIMS, 0), held shared, "a watcher process runs".
CLAIMS_NAMESPACE = 0x4D49  # "MI"
# How often a watcher checks that its claims connection still holds between refreshes.
CLAIMS_CHECK = 2.0


class IdleClaims:
    """The mailboxes this watcher process IDLEs, as PostgreSQL session advisory locks on a
    database connection of its own (Django's may be closed between refreshes). Only the
    lock decides: two watcher processes never hold one mailbox, and a killed one's locks go
    with its session. Every call may raise DatabaseError (the connection was lost: every
    claim with it)."""

    def __init__(self) -> None:
        self._db = None

    def _cursor(self):  # noqa: ANN202
        if self._db is None:
            db = connections.create_connection(DEFAULT_DB_ALIAS)
            db.ensure_connection()
            db.set_autocommit(True)
            with db.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_lock_shared(%s, 0)", [CLAIMS_NAMESPACE])
            self._db = db
        return self._db.cursor()

    def _value(self, sql: str, params: list) -> object:
        with self._cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()[0]

    def held(self) -> set[int]:
        with self._cursor() as cursor:
            cursor.execute(
                "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                "AND objsubid = 2 AND objid <> 0 AND granted AND pid = pg_backend_pid()",
                [CLAIMS_NAMESPACE])
            return {int(row[0]) for row in cursor.fetchall()}

    def loads(self) -> tuple[int, list[int]]:
        """How many mailboxes this process holds, and how many each other watcher process
        running against this database holds (0 for one that holds none yet)."""
        with self._cursor() as cursor:
            cursor.execute(
                "SELECT pid = pg_backend_pid(), count(*) FILTER (WHERE objid <> 0) FROM pg_locks "
                "WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "GROUP BY pid", [CLAIMS_NAMESPACE])
            rows = cursor.fetchall()
        return (next((int(n) for mine, n in rows if mine), 0),
                [int(n) for mine, n in rows if not mine])

    def alive(self) -> bool:
        """Whether the claims (the session) still hold: False once the connection is lost."""
        if self._db is None:
            return True  # none taken yet
        try:
            self._value("SELECT 1", [])
            return True
        except DatabaseError:
            return False

    def claim(self, mailbox_id: int) -> bool:
        return bool(self._value("SELECT pg_try_advisory_lock(%s, %s)", [CLAIMS_NAMESPACE, mailbox_id]))

    def release(self, mailbox_id: int) -> None:
        self._value("SELECT pg_advisory_unlock(%s, %s)", [CLAIMS_NAMESPACE, mailbox_id])

    def close(self) -> None:
        """Every claim goes (the session ends)."""
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except DatabaseError:
                pass


@dataclass(frozen=True)
class _Target:
    mailbox_id: int
    version: str  # changes when the connection settings change


class IdleSupervisor:
    """Keeps one watcher per active IMAP mailbox of this shard, refreshing the set."""

    def __init__(self, *, shard: int = 0, shards: int = 1, on_change: OnChange = queue_sync,
                 refresh_interval: float = 30.0, claims: IdleClaims | None = None,
                 **watcher_options: float) -> None:
        self.shard, self.shards = shard, shards
        self.claims = claims
        # Claimed mailboxes this process gives up (over its share): let go once their
        # watcher has closed its connection, so that the next holder never overlaps it.
        self.giving_up: set[int] = set()
        self.on_change = on_change
        # The watchers' requests for a sync, queued from one thread (started with the first
        # watcher: a supervisor made only to read its targets starts no thread).
        self.requests = SyncRequests(on_change)
        self.refresh_interval = refresh_interval
        self.watcher_options = watcher_options
        self.watchers: dict[_Target, MailboxWatcher] = {}
        # Stopped watchers that may still hold their connection, by mailbox: a new watcher of
        # the same mailbox (even refreshes later) waits for its predecessor.
        self.stopped: dict[int, MailboxWatcher] = {}
        self.stopping = threading.Event()
        # Mailbox.last_sync_at by id, as of the last targets().
        self.synced_at: dict[int, object] = {}

    def targets(self) -> dict[_Target, ServerSettings]:
        from .sync.imap import server_settings

        close_old_connections()
        mailboxes = Mailbox.objects.filter(
            protocol=Mailbox.Protocol.IMAP, is_active=True, owner__is_active=True
        )
        result = {}
        self.synced_at = {}
        for mailbox in mailboxes:
            if mailbox.pk % self.shards != self.shard:
                continue
            self.synced_at[mailbox.pk] = mailbox.last_sync_at
            version = f"{mailbox.incoming_host}:{mailbox.incoming_port}:{mailbox.incoming_security}:" \
                      f"{mailbox.username}:{hash(mailbox.password)}"
            try:
                result[_Target(mailbox.pk, version)] = server_settings(mailbox, timeout=60)
            except MailUserError:
                continue  # its password needs entering again (the sync status says so)
        if self.claims is not None:
            result = self._claimed(result)
        return result

    def _claimed(self, active: dict[_Target, ServerSettings]) -> dict[_Target, ServerSettings]:
        """This process's share of ``active``: what it holds, up to its share, plus unclaimed
        mailboxes it manages to claim. A lost claims connection (the database restarted)
        means nothing is held any more: every watcher stops, and claims start again."""
        assert self.claims is not None
        ids = {t.mailbox_id for t in active}
        try:
            held = self.claims.held()
            share = self._share(len(ids), *self.claims.loads())
            keep = sorted(pk for pk in held if pk in ids and pk not in self.giving_up)
            self.giving_up |= {*keep[share:], *(held - ids)}
            keep = keep[:share]
            unclaimed = [pk for pk in ids if pk not in held]
            random.shuffle(unclaimed)  # two watchers starting at once do not race for the same ones
            for pk in unclaimed:
                if len(keep) >= share:
                    break
                if self.claims.claim(pk):
                    keep.append(pk)
        except DatabaseError:
            log.warning("IDLE watcher: lost its claims (database connection); claiming again")
            self.claims.close()
            self.giving_up.clear()
            return {}
        kept = set(keep)
        return {t: settings for t, settings in active.items() if t.mailbox_id in kept}

    @staticmethod
    def _share(mailboxes: int, mine: int, others: list[int]) -> int:
        """How many mailboxes this watcher may hold: the fair share, rounded up; rounded
        down (give up the rest, claim nothing more) while another watcher holds less than
        that and this one does not, so that the mailboxes given up go to the one below:
        7 mailboxes over 3 watchers settle at 3/2/2, not 3/3/1."""
        watchers = 1 + len(others)
        low, high = mailboxes // watchers, math.ceil(mailboxes / watchers)
        if mine >= low and any(n < low for n in others):
            return low
        return high

    def _let_go(self) -> None:
        """Release the claims given up whose watcher has ended (waited for up to
        REPLACE_WAIT in all, not each: watchers stuck connecting to an unreachable server
        must not hold the refresh for 10 s apiece); one still closing is let go at a later
        refresh."""
        if self.claims is None or not self.giving_up:
            return
        watching = {t.mailbox_id for t in self.watchers}
        deadline = time.monotonic() + REPLACE_WAIT
        for pk in sorted(self.giving_up):
            if pk in watching:
                continue  # watched again (claimed back meanwhile)
            old = self.stopped.get(pk)
            if old is not None:
                old.join(max(0.0, deadline - time.monotonic()))
                if old.is_alive():
                    continue
            try:
                self.claims.release(pk)
            except DatabaseError:
                return  # the next refresh finds the connection lost
            self.giving_up.discard(pk)

    def refresh(self) -> None:
        wanted = self.targets()
        for target in list(self.watchers):
            if target not in wanted:
                watcher = self.watchers.pop(target)
                watcher.stop()
                self.stopped[target.mailbox_id] = watcher
        self._let_go()
        self.stopped = {pk: w for pk, w in self.stopped.items() if w.is_alive()}
        for target, settings in wanted.items():
            old = self.watchers.get(target)
            if (old is not None and old.failed is not None and not old.is_alive()
                    and (self.synced_at.get(target.mailbox_id) or old.failed_at) > old.failed_at):
                # Its login was refused (a provider's outage, a password reset undone), yet a
                # sync with the same settings has worked since: try again, once per such
                # sync. Else push stayed off until the settings changed or a restart.
                del self.watchers[target]
            if target not in self.watchers:
                if not self.requests.is_alive() and self.requests.ident is None:
                    self.requests.start()
                watcher = MailboxWatcher(target.mailbox_id, settings, self.requests.ask,
                                         replaces=self.stopped.pop(target.mailbox_id, None),
                                         **self.watcher_options)
                self.watchers[target] = watcher
                watcher.start()

    def run(self) -> None:
        if self.claims is not None:
            log.info("IDLE watcher started (mailboxes shared with the other watchers by claims)")
        else:
            log.info("IDLE watcher shard %s/%s started", self.shard, self.shards)
        while not self.stopping.is_set():
            try:
                self.refresh()
            except Exception:  # noqa: BLE001  (database hiccup: try again next round)
                log.exception("IDLE watcher: refresh failed")
            next_refresh = time.monotonic() + self.refresh_interval
            while not self.stopping.wait(min(CLAIMS_CHECK, max(0.0, next_refresh - time.monotonic()))):
                if time.monotonic() >= next_refresh:
                    break
                if self.claims is not None and not self.claims.alive():
                    # The claims went with the session: another watcher may take these
                    # mailboxes now; ours stop at once (refresh), not at the next refresh.
                    break
        self.shutdown()
        connections.close_all()  # this thread's (targets()); the claims' went in shutdown()

    def shutdown(self) -> None:
        self.stopping.set()
        for watcher in self.watchers.values():
            watcher.stop()
        for watcher in [*self.watchers.values(), *self.stopped.values()]:
            watcher.join(timeout=5)
        self.watchers.clear()
        self.stopped.clear()
        if self.requests.ident is not None:
            # What the watchers asked for last still goes out (for a few seconds at most).
            self.requests.stop()
            self.requests.join(NOTIFY_FLUSH + 1)
            self.requests = SyncRequests(self.on_change)
        if self.claims is not None:
            self.claims.close()  # after the connections closed: the next holder never overlaps
            self.giving_up.clear()
