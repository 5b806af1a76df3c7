"""CRM actions (read/flag/move/delete) overlapping a running sync, another mail program
changing the same mailbox, and the IDLE watcher. Real Dovecot, real PostgreSQL. Written as
review probes; those that failed were fixed: mail arriving during a first sync was missed
(the plan's UID list set the cursor), a mail moved to an unsynced folder while a sync saw its
old UID vanish stayed a tombstone, and actions during a UIDVALIDITY re-map changed only the
CRM copy (now a 409 and a sync)."""
from __future__ import annotations

import contextlib

import email as email_lib
import threading
import time

import pytest
from tests.conftest import THIS_DATABASE
from django.db import connection

from mailsync import services
from mailsync.exceptions import MailboxBusy, MailboxOutOfDate, MailError, MailUserError
from mailsync.models import Email, EmailLocation, MailFolder, Mailbox
from mailsync.protocols.imap import ImapSession
from mailsync.sync import imap as engine
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


# -- helpers ----------------------------------------------------------------------------------

def sync(mailbox: Mailbox):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def server_msgs(dovecot, user, folder: str) -> dict[int, tuple[str, frozenset]]:
    """uid -> (Message-ID, flags) as the server has them."""
    imap = dovecot.imap_login(user)
    try:
        typ, _ = imap.select(f'"{folder}"', readonly=True)
        if typ != "OK":
            return {}
        typ, data = imap.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        out = {}
        for item in data:
            if not isinstance(item, tuple):
                continue
            meta = item[0].decode()
            if " UID " not in meta and "(UID " not in meta:
                continue
            uid = int(meta.split("UID ")[1].split()[0].rstrip(")"))
            flags = frozenset(meta.split("FLAGS (")[1].split(")")[0].split()) - {"\\Recent"}
            msg_id = email_lib.message_from_bytes(item[1]).get("Message-ID", "").strip().strip("<>")
            out[uid] = (msg_id, flags)
        return out
    finally:
        imap.logout()


def crm_msgs(mailbox: Mailbox, folder: str) -> dict[int, tuple[str, frozenset]]:
    """uid -> (Message-ID, flags) of the live (not deleted) emails located in ``folder``."""
    f = MailFolder.objects.filter(mailbox=mailbox, name=folder).first()
    if f is None:
        return {}
    return {
        uid: (mid, frozenset(flags) - {"\\Recent"})
        for uid, mid, flags in EmailLocation.objects.filter(
            folder=f, uidvalidity=f.uidvalidity, email__deleted_at__isnull=True
        ).values_list("uid", "email__message_id", "flags")
    }


def assert_crm_matches_server(dovecot, user, mailbox: Mailbox, folders=("INBOX", "Sent")) -> None:
    problems = []
    for folder in folders:
        server, crm = server_msgs(dovecot, user, folder), crm_msgs(mailbox, folder)
        if server != crm:
            problems.append(f"{folder}: server-only={ {u: v for u, v in server.items() if crm.get(u) != v} } "
                            f"crm-only={ {u: v for u, v in crm.items() if server.get(u) != v} }")
    live = Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True)
    mids = list(live.values_list("message_id", flat=True))
    dups = {m for m in mids if mids.count(m) > 1}
    if dups:
        problems.append(f"duplicated live emails: {dups}")
    placeless = list(live.filter(locations__isnull=True).values_list("subject", flat=True))
    if placeless:
        problems.append(f"live emails with no place on the server: {placeless}")
    # Every live email's read/flag state is that of its places.
    for e in live.prefetch_related("locations"):
        flags = [set(loc.flags) for loc in e.locations.all()]
        if flags and (e.seen != any("\\Seen" in f for f in flags)
                      or e.flagged != any("\\Flagged" in f for f in flags)):
            problems.append(f"{e.subject}: seen={e.seen} flagged={e.flagged} but places {flags}")
    assert not problems, "\n".join(problems)


def email_of(mailbox: Mailbox, subject: str) -> Email:
    return Email.objects.select_related("mailbox").get(mailbox=mailbox, subject=subject)


def uid_of(dovecot, user, folder: str, subject_mid: str) -> int:
    for uid, (mid, _) in server_msgs(dovecot, user, folder).items():
        if mid == subject_mid:
            return uid
    raise AssertionError(f"{subject_mid} not in {folder}")


def hook_ingest(monkeypatch, on_call):  # noqa: ANN001
    """``on_call(n, folder_name)`` before the n-th batch (1-based) is stored."""
    real = engine.ingest_batch
    calls = {"n": 0}

    def wrapped(**kwargs):  # noqa: ANN003
        calls["n"] += 1
        on_call(calls["n"], kwargs["folder"].name)
        return real(**kwargs)

    monkeypatch.setattr(engine, "ingest_batch", wrapped)
    return calls


class Bg(threading.Thread):
    def __init__(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result = self.error = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        finally:
            connection.close()


def connection_waited_for(mailbox_id: int) -> bool:
    """Whether something waits for the mailbox's one connection besides IDLE (pg_locks)."""
    from mailsync.sync.lock import CONNECTION_NAMESPACE

    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND "
                       f"classid = %s AND objid = %s AND NOT granted AND database = {THIS_DATABASE})",
                       [CONNECTION_NAMESPACE, mailbox_id])
        return cursor.fetchone()[0]


def act_while_paused(mailbox: Mailbox, go: threading.Event, actions):  # noqa: ANN001, ANN201
    """Run ``actions()`` (CRM actions, another mail program) while the sync is paused in the
    middle of storing a batch; their result. The sync holds the mailbox's connection: the
    actions wait for it, the sync goes on once they do, and hands it over at the end of that
    batch (``ConnectionSlot``), so each action runs between two batches. (These tests used to
    run the actions while the sync was paused mid-batch, on a third connection.)"""
    worker = Bg(actions)
    worker.start()
    try:
        wait_for(lambda: connection_waited_for(mailbox.pk) or not worker.is_alive(), 30)
    finally:
        go.set()
    worker.join(120)
    assert not worker.is_alive(), "the actions never got the connection"
    if worker.error is not None:
        raise worker.error
    return worker.result


def deliver_many(dovecot, user, n: int, prefix: str) -> list[str]:
    subjects = [f"{prefix} {i:02d}" for i in range(n)]
    for s in subjects:
        dovecot.deliver(user, make_message(subject=s, message_id=f"<{mid(s)}>"))
    return subjects


def mid(subject: str) -> str:
    return f"{subject.replace(' ', '-')}@client.example"


def other_client(dovecot, user, folder="INBOX"):  # noqa: ANN001, ANN201
    imap = dovecot.imap_login(user)
    imap.select(f'"{folder}"')
    return imap


# -- 1. mail arriving in a second folder while the first folder's initial sync runs ------------

def test_mail_appended_to_sent_during_inbox_initial_sync_is_stored(dovecot, mail_user, imap_mailbox,
                                                                      monkeypatch):
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    deliver_many(dovecot, mail_user, 9, "In")
    dovecot.append(mail_user, "Sent", make_message(subject="Sent old", message_id="<%s>" % mid("Sent old")))

    def on_call(n: int, folder: str) -> None:
        if n == 2 and folder == "INBOX":  # another mail program files a sent mail meanwhile
            dovecot.append(mail_user, "Sent", make_message(subject="Sent new", message_id="<%s>" % mid("Sent new")))

    hook_ingest(monkeypatch, on_call)
    sync(imap_mailbox)
    monkeypatch.undo()
    sync(imap_mailbox)  # and one more: the CRM must match the server now
    assert Email.objects.filter(mailbox=imap_mailbox, subject="Sent new").exists(), \
        "a mail that reached Sent during the initial sync is not in the CRM after two syncs"
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox)


# -- 2. move (CRM) to a synced folder during the initial sync --------------------------------

def test_move_to_synced_folder_during_initial_sync(dovecot, mail_user, imap_mailbox, monkeypatch):
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver_many(dovecot, mail_user, 9, "In")
    dovecot.append(mail_user, "Sent", make_message(subject="Sent old", message_id="<%s>" % mid("Sent old")))
    moved = []

    def on_call(n: int, folder: str) -> None:
        if n == 2 and folder == "INBOX":
            e = email_of(imap_mailbox, subjects[-1])  # newest: stored by batch 1
            services.email_update(actor=imap_mailbox.owner, email=e, folder="Sent")
            moved.append(e.pk)

    hook_ingest(monkeypatch, on_call)
    sync(imap_mailbox)
    monkeypatch.undo()
    sync(imap_mailbox)
    assert moved
    e = Email.objects.get(pk=moved[0])
    assert e.deleted_at is None
    assert list(e.locations.values_list("folder__name", flat=True)) == ["Sent"], \
        "moved mail has no place in Sent after two syncs"
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox)


# -- 3. move (CRM) to a non-synced folder racing an incremental sync's QRESYNC pass ------------

def test_move_to_archive_while_incremental_sync_sees_the_vanished_uid(dovecot, mail_user, imap_mailbox,
                                                                      monkeypatch):
    subjects = deliver_many(dovecot, mail_user, 3, "In")
    dovecot.create_folder(mail_user, "Archive")
    sync(imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="Trigger"))  # something for the sync to do
    target = email_of(imap_mailbox, subjects[0])
    real_move = ImapSession.move
    started = []

    def move(self, uids, destination):  # noqa: ANN001, ANN202
        copied = real_move(self, uids, destination)
        # A sync (IDLE push, beat, "Sync now") starts right between the server's MOVE and
        # the CRM's write of it. (It used to run there and see the UID vanish; since the
        # action holds the mailbox's one connection besides IDLE, the sync waits for it
        # and runs after the action is written.)
        t = Bg(sync, Mailbox.objects.get(pk=imap_mailbox.pk))
        t.start()
        t.join(1)
        assert t.is_alive(), "the sync did not wait for the action's connection"
        started.append(t)
        return copied

    monkeypatch.setattr(ImapSession, "move", move)
    services.email_update(actor=imap_mailbox.owner, email=target, folder="Archive")
    monkeypatch.undo()
    [t] = started
    t.join(30)
    assert not t.is_alive() and t.error is None, t.error
    sync(imap_mailbox)
    sync(imap_mailbox)
    target.refresh_from_db()
    assert server_msgs(dovecot, mail_user, "Archive"), "not moved on the server"
    assert target.deleted_at is None, \
        "the mail is in Archive on the server but a tombstone (hidden, purged later) in the CRM"
    assert crm_msgs(imap_mailbox, "Archive") == server_msgs(dovecot, mail_user, "Archive")
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox)


# -- 4. delete / mark read while a UIDVALIDITY re-map is downloading ----------------------------

@pytest.mark.parametrize("action", ["delete", "read"])
def test_action_while_uidvalidity_remap_runs(dovecot, mail_user, imap_mailbox, monkeypatch, action):
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    subjects = deliver_many(dovecot, mail_user, 9, "In")
    sync(imap_mailbox)
    dovecot.reset_uidvalidity(mail_user, "INBOX")
    paused, go = threading.Event(), threading.Event()

    def on_call(n: int, folder: str) -> None:
        if n == 2:
            paused.set()
            go.wait(30)

    hook_ingest(monkeypatch, on_call)
    t = Bg(sync, Mailbox.objects.get(pk=imap_mailbox.pk))
    t.start()
    assert paused.wait(30)
    target = email_of(imap_mailbox, subjects[0])  # oldest: re-fetched by the last batch

    def act() -> str:
        try:
            if action == "delete":
                return services.email_delete(actor=imap_mailbox.owner, email=target)
            services.email_update(actor=imap_mailbox.owner, email=target, seen=True)
            return "done"
        except MailboxOutOfDate as exc:  # refusing ("try again in a moment") is acceptable
            return type(exc).__name__

    try:
        outcome = act_while_paused(imap_mailbox, go, act)
    finally:
        go.set()
        t.join(60)
    assert t.error is None, t.error
    monkeypatch.undo()
    sync(imap_mailbox)
    target.refresh_from_db()
    if outcome in ("trash", "done"):
        pass
    elif outcome not in ("MailboxOutOfDate",):
        if action == "delete":
            # The CRM told the user it was deleted ("crm": the CRM only)
            assert target.deleted_at is not None, (
                f"email_delete returned {outcome!r} during the re-map; the mail is back in the CRM "
                f"and still in the server's INBOX (Trash: {len(server_msgs(dovecot, mail_user, 'Trash'))})")
    if action == "delete" and outcome == "trash":
        assert target.deleted_at is not None
        assert mid(subjects[0]) in {m for m, _ in server_msgs(dovecot, mail_user, "Trash").values()}
    if action == "read" and outcome == "done":
        assert target.seen, "marked read during the re-map: unread again after the sync (lost update)"
        srv = {m: f for m, f in server_msgs(dovecot, mail_user, "INBOX").values()}
        assert "\\Seen" in srv[mid(subjects[0])], "marked read in the CRM, never on the server"
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox)


# -- 5. every action during an initial sync (fetch process) + another mail program -------------

def test_actions_and_other_client_during_initial_sync_fetch_process(dovecot, mail_user, imap_mailbox,
                                                                     monkeypatch, settings):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 4)
    subjects = deliver_many(dovecot, mail_user, 24, "In")  # newest first: 23..20 in batch 1
    dovecot.create_folder(mail_user, "Archive")
    uids = dovecot.folder_state(mail_user).uids
    paused, go = threading.Event(), threading.Event()
    used_child = []

    def on_call(n: int, folder: str) -> None:
        if n == 3 and folder == "INBOX":
            paused.set()
            go.wait(60)

    hook_ingest(monkeypatch, on_call)
    real_child = engine.fetch_in_child

    def child(*a, **k):  # noqa: ANN002, ANN003, ANN202
        used_child.append(True)
        return real_child(*a, **k)

    monkeypatch.setattr(engine, "fetch_in_child", child)
    t = Bg(sync, Mailbox.objects.get(pk=imap_mailbox.pk))
    t.start()
    assert paused.wait(60)

    def act() -> str:
        owner = imap_mailbox.owner
        services.email_update(actor=owner, email=email_of(imap_mailbox, subjects[23]), seen=True)
        services.email_update(actor=owner, email=email_of(imap_mailbox, subjects[22]), flagged=True)
        services.email_update(actor=owner, email=email_of(imap_mailbox, subjects[21]), folder="Archive")
        outcome = services.email_delete(actor=owner, email=email_of(imap_mailbox, subjects[20]))
        services.email_update(actor=owner, email=email_of(imap_mailbox, subjects[19]), folder="Sent")
        other = other_client(dovecot, mail_user)
        other.uid("STORE", str(uids[18]), "+FLAGS", "(\\Flagged)")   # stored already
        other.uid("STORE", str(uids[5]), "+FLAGS", "(\\Seen)")       # not yet stored
        other.uid("STORE", str(uids[17]), "+FLAGS", "(\\Deleted)")   # stored: expunged
        other.uid("STORE", str(uids[2]), "+FLAGS", "(\\Deleted)")    # not stored: expunged
        other.expunge()
        other.uid("MOVE", str(uids[4]), "Sent")                       # not stored: moved
        other.uid("MOVE", str(uids[16]), "Sent")                      # stored: moved
        other.logout()
        return outcome

    try:
        outcome = act_while_paused(imap_mailbox, go, act)
    finally:
        go.set()
        t.join(60)
    assert t.error is None, t.error
    monkeypatch.undo()
    sync(imap_mailbox)
    assert used_child and used_child[0]
    assert outcome == "trash"
    gone = email_of(imap_mailbox, subjects[20])
    assert gone.deleted_at is not None
    assert mid(subjects[20]) in {m for m, _ in server_msgs(dovecot, mail_user, "Trash").values()}
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox, folders=("INBOX", "Sent", "Archive"))


# -- 6. the same during an incremental (QRESYNC) sync --------------------------------------------

@pytest.mark.parametrize("child", [True, False], ids=["fetch-process", "in-process"])
def test_actions_and_other_client_during_incremental_sync(dovecot, mail_user, imap_mailbox,
                                                          monkeypatch, settings, child):
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 10 if child else 0
    old = deliver_many(dovecot, mail_user, 8, "Old")
    dovecot.create_folder(mail_user, "Archive")
    sync(imap_mailbox)
    sync(imap_mailbox)
    old_uids = dovecot.folder_state(mail_user).uids
    deliver_many(dovecot, mail_user, 16, "New")
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 4)
    paused, go = threading.Event(), threading.Event()

    def on_call(n: int, folder: str) -> None:
        if n == 2 and folder == "INBOX":
            paused.set()
            go.wait(60)

    hook_ingest(monkeypatch, on_call)
    t = Bg(sync, Mailbox.objects.get(pk=imap_mailbox.pk))
    t.start()
    assert paused.wait(60)

    def act() -> None:
        owner = imap_mailbox.owner
        services.email_update(actor=owner, email=email_of(imap_mailbox, old[0]), seen=True)
        services.email_update(actor=owner, email=email_of(imap_mailbox, old[1]), flagged=True, seen=True)
        services.email_update(actor=owner, email=email_of(imap_mailbox, old[2]), folder="Archive")
        services.email_delete(actor=owner, email=email_of(imap_mailbox, old[3]))
        services.email_update(actor=owner, email=email_of(imap_mailbox, "New 00"), seen=True)  # new, stored
        other = other_client(dovecot, mail_user)
        other.uid("STORE", str(old_uids[4]), "+FLAGS", "(\\Flagged)")
        other.uid("STORE", str(old_uids[5]), "+FLAGS", "(\\Deleted)")
        other.expunge()
        other.uid("MOVE", str(old_uids[6]), "Sent")
        other.uid("STORE", str(old_uids[0]), "-FLAGS", "(\\Seen)")  # undoes the CRM's read
        other.logout()

    try:
        act_while_paused(imap_mailbox, go, act)
    finally:
        go.set()
        t.join(60)
    assert t.error is None, t.error
    monkeypatch.undo()
    sync(imap_mailbox)
    assert email_of(imap_mailbox, old[3]).deleted_at is not None
    assert mid(old[3]) in {m for m, _ in server_msgs(dovecot, mail_user, "Trash").values()}
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox, folders=("INBOX", "Sent", "Archive"))


# -- 7. delete (CRM) of a mail whose other copy the running sync has fetched but not stored ----

def test_delete_while_same_mail_in_unstored_batch(dovecot, mail_user, imap_mailbox, monkeypatch):
    """The same message (same bytes) in Sent and INBOX; Sent was synced, INBOX is added and
    its initial sync has fetched the copy; the user deletes the mail meanwhile."""
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    raw = make_message(subject="Twin", message_id="<%s>" % mid("Twin"))
    dovecot.append(mail_user, "Sent", raw)
    imap_mailbox.folders = ["Sent"]
    imap_mailbox.save()
    sync(imap_mailbox)
    for s in deliver_many(dovecot, mail_user, 6, "In"):
        pass
    dovecot.append(mail_user, "INBOX", raw)  # newest: in INBOX's first batch
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(folders=["Sent", "INBOX"])
    paused, go = threading.Event(), threading.Event()

    def on_call(n: int, folder: str) -> None:
        if n == 1 and folder == "INBOX":  # fetched, about to be stored
            paused.set()
            go.wait(30)

    hook_ingest(monkeypatch, on_call)
    t = Bg(sync, Mailbox.objects.get(pk=imap_mailbox.pk))
    t.start()
    assert paused.wait(30)
    try:
        outcome = act_while_paused(imap_mailbox, go, lambda: services.email_delete(
            actor=imap_mailbox.owner, email=email_of(imap_mailbox, "Twin")))
    finally:
        go.set()
        t.join(60)
    assert t.error is None, t.error
    monkeypatch.undo()
    sync(imap_mailbox)
    twin = email_of(imap_mailbox, "Twin")
    in_inbox = mid("Twin") in {m for m, _ in server_msgs(dovecot, mail_user, "INBOX").values()}
    # Either the CRM also removed the INBOX copy, or it shows the mail (it is still on the server).
    assert (twin.deleted_at is None) == in_inbox, (outcome, twin.deleted_at, in_inbox)
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox)


# -- 8. two CRM sessions of the owner acting on one mail at once -----------------------------------

def _barrier_after_check(monkeypatch, parties: int) -> None:
    """Both actions meet right after their check, if they can: since actions on one email
    run one at a time (services._one_action_per_email) the first waits a moment in vain,
    then goes on, and the second starts from what the first left."""
    barrier = threading.Barrier(parties, timeout=2)
    real = services._select_same_uids

    def checked(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        selected = real(*args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        return selected

    monkeypatch.setattr(services, "_select_same_uids", checked)


def test_two_sessions_read_and_flag_same_mail_at_once(dovecot, mail_user, imap_mailbox, monkeypatch):
    deliver_many(dovecot, mail_user, 2, "In")
    sync(imap_mailbox)
    _barrier_after_check(monkeypatch, 2)
    a = Bg(services.email_update, actor=imap_mailbox.owner, email=email_of(imap_mailbox, "In 00"), seen=True)
    b = Bg(services.email_update, actor=imap_mailbox.owner, email=email_of(imap_mailbox, "In 00"), flagged=True)
    a.start(), b.start()
    a.join(30), b.join(30)
    assert a.error is None and b.error is None, (a.error, b.error)
    e = email_of(imap_mailbox, "In 00")
    assert e.seen and e.flagged
    monkeypatch.undo()
    sync(imap_mailbox)
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox)


def test_two_sessions_move_and_delete_same_mail_at_once(dovecot, mail_user, imap_mailbox, monkeypatch):
    deliver_many(dovecot, mail_user, 2, "In")
    dovecot.create_folder(mail_user, "Archive")
    sync(imap_mailbox)
    _barrier_after_check(monkeypatch, 2)
    a = Bg(services.email_update, actor=imap_mailbox.owner, email=email_of(imap_mailbox, "In 00"),
           folder="Archive")
    b = Bg(services.email_delete, actor=imap_mailbox.owner, email=email_of(imap_mailbox, "In 00"))
    a.start(), b.start()
    a.join(30), b.join(30)
    monkeypatch.undo()
    sync(imap_mailbox)
    sync(imap_mailbox)
    e = email_of(imap_mailbox, "In 00")
    in_archive = mid("In 00") in {m for m, _ in server_msgs(dovecot, mail_user, "Archive").values()}
    in_trash = mid("In 00") in {m for m, _ in server_msgs(dovecot, mail_user, "Trash").values()}
    detail = (f"move: {a.error!r}, delete: {b.result!r}/{b.error!r}; server Archive={in_archive} "
              f"Trash={in_trash}; CRM deleted_at={e.deleted_at} places="
              f"{list(e.locations.values_list('folder__name', flat=True))}")
    assert in_archive != in_trash, detail
    # Where it really is: in Archive -> live in the CRM there; in the Trash -> a tombstone.
    assert (e.deleted_at is None) == in_archive, detail
    if in_archive:
        assert crm_msgs(imap_mailbox, "Archive") == server_msgs(dovecot, mail_user, "Archive"), detail


# -- 9. password just became wrong -----------------------------------------------------------------

def test_action_with_wrong_password_changes_nothing(dovecot, mail_user, imap_mailbox):
    deliver_many(dovecot, mail_user, 2, "In")
    sync(imap_mailbox)
    mb = Mailbox.objects.get(pk=imap_mailbox.pk)
    mb.password = "wrong-now"
    mb.save()
    e = email_of(imap_mailbox, "In 00")
    with pytest.raises(MailUserError):
        services.email_update(actor=imap_mailbox.owner, email=e, seen=True, flagged=True)
    with pytest.raises(MailUserError):
        services.email_delete(actor=imap_mailbox.owner, email=e)
    with pytest.raises(MailUserError):
        services.email_update(actor=imap_mailbox.owner, email=e, folder="Sent")
    e.refresh_from_db()
    assert not e.seen and not e.flagged and e.deleted_at is None
    assert list(e.locations.values_list("folder__name", flat=True)) == ["INBOX"]
    mb.password = mail_user.password
    mb.save()
    sync(imap_mailbox)
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox)


# -- 10. IDLE watcher pushing syncs while the user acts ---------------------------------------------

def test_idle_triggered_syncs_while_user_acts(dovecot, mail_user, imap_mailbox):
    from mailsync.idle import MailboxWatcher
    from mailsync.sync.imap import server_settings

    deliver_many(dovecot, mail_user, 8, "Old")
    dovecot.create_folder(mail_user, "Archive")
    sync(imap_mailbox)
    busy = []
    running: list[threading.Thread] = []

    def sync_job(mailbox_id: int) -> None:
        try:
            for _ in range(60):  # as the task: MailboxBusy -> again 2 s later (here 0.2)
                try:
                    services.mailbox_sync(mailbox_id=mailbox_id)
                    return
                except MailboxBusy:
                    busy.append(1)
                    time.sleep(0.2)
        finally:
            connection.close()

    def on_change(mailbox_id: int) -> None:
        t = threading.Thread(target=sync_job, args=(mailbox_id,), daemon=True)
        running.append(t)
        t.start()

    watcher = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), on_change, check_interval=0.1)
    watcher.start()
    errors = []
    try:
        assert watcher.connected.wait(10)
        owner = imap_mailbox.owner
        acts = [
            lambda: services.email_update(actor=owner, email=email_of(imap_mailbox, "Old 00"), seen=True),
            lambda: dovecot.deliver(mail_user, make_message(subject="Push 1", message_id="<%s>" % mid("Push 1"))),
            lambda: services.email_update(actor=owner, email=email_of(imap_mailbox, "Old 01"), flagged=True),
            lambda: services.email_update(actor=owner, email=email_of(imap_mailbox, "Old 02"), folder="Archive"),
            lambda: services.email_delete(actor=owner, email=email_of(imap_mailbox, "Old 03")),
            lambda: services.email_update(actor=owner, email=email_of(imap_mailbox, "Old 00"), seen=False),
            lambda: dovecot.deliver(mail_user, make_message(subject="Push 2", message_id="<%s>" % mid("Push 2"))),
            lambda: services.email_update(actor=owner, email=email_of(imap_mailbox, "Old 04"), folder="Sent"),
            lambda: services.email_update(actor=owner, email=email_of(imap_mailbox, "Old 01"), flagged=False,
                                          seen=True),
        ]
        for act in acts:
            try:
                act()
            except MailError as exc:
                errors.append(repr(exc))
            time.sleep(0.3)
        time.sleep(2)
    finally:
        watcher.stop()
        watcher.join(10)
        for t in running:
            t.join(60)
    sync(imap_mailbox)
    assert not errors, errors
    e0, e1 = email_of(imap_mailbox, "Old 00"), email_of(imap_mailbox, "Old 01")
    assert not e0.seen and e1.seen and not e1.flagged
    assert email_of(imap_mailbox, "Old 03").deleted_at is not None
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox, folders=("INBOX", "Sent", "Archive"))


# -- 3b. the same race without a forced window: syncs back to back while the user moves ---------

def test_moves_to_archive_while_syncs_run_back_to_back(dovecot, mail_user, imap_mailbox):
    subjects = deliver_many(dovecot, mail_user, 15, "In")
    dovecot.create_folder(mail_user, "Archive")
    sync(imap_mailbox)
    stop = threading.Event()
    runs = []

    def loop() -> None:
        try:
            while not stop.is_set():
                try:
                    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
                    runs.append(1)
                except MailboxBusy:
                    pass
        finally:
            connection.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        for s in subjects:
            services.email_update(actor=imap_mailbox.owner, email=email_of(imap_mailbox, s), folder="Archive")
    finally:
        stop.set()
        t.join(30)
    sync(imap_mailbox)
    sync(imap_mailbox)
    hidden = list(Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=False)
                  .values_list("subject", flat=True))
    assert not hidden, f"{len(hidden)}/15 moved mails tombstoned though in Archive ({len(runs)} syncs ran)"
    assert crm_msgs(imap_mailbox, "Archive") == server_msgs(dovecot, mail_user, "Archive")


def test_mail_missed_during_initial_sync_stays_missing_until_folder_changes(dovecot, mail_user, imap_mailbox,
                                                                           monkeypatch):
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    deliver_many(dovecot, mail_user, 9, "In")

    def on_call(n: int, folder: str) -> None:
        if n == 2 and folder == "INBOX":
            dovecot.append(mail_user, "Sent", make_message(subject="Sent new", message_id="<%s>" % mid("Sent new")))

    hook_ingest(monkeypatch, on_call)
    sync(imap_mailbox)
    monkeypatch.undo()
    reports = [sync(imap_mailbox) for _ in range(3)]
    missing = not Email.objects.filter(mailbox=imap_mailbox, subject="Sent new").exists()
    dovecot.append(mail_user, "Sent", make_message(subject="Sent later", message_id="<%s>" % mid("Sent later")))
    sync(imap_mailbox)
    found_after_change = Email.objects.filter(mailbox=imap_mailbox, subject="Sent new").exists()
    assert not missing, (f"missing after 3 more syncs (unchanged folders per run: "
                         f"{[r.unchanged_folders for r in reports]}); found once Sent changed: {found_after_change}")
