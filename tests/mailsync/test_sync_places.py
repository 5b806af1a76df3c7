"""Where a mail is on the server, and what the CRM shows after a sync: moves and copies between
folders (server side and CRM side), duplicates, deletes and restores, UIDVALIDITY changes
combined with other changes, places in folders that are not synced, and CRM actions that land
in the middle of a sync. After each, the CRM's places and read/flagged state match the server.
(Written as probes by a review; the ones that failed were fixed in the engine.)"""
from __future__ import annotations

import pytest

from mailsync import services
from mailsync.models import Email, EmailLocation, Mailbox
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


def sync(mailbox: Mailbox):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def places(email: Email) -> list[tuple[str, int, list[str]]]:
    return sorted((loc.folder.name, loc.uid, sorted(set(loc.flags) - {"\\Recent"}))
                  for loc in EmailLocation.objects.filter(email=email).select_related("folder"))


def server_places(dovecot, user, folders) -> list[tuple[str, int, list[str]]]:
    out = []
    for name in folders:
        for uid, flags in dovecot.folder_state(user, name).messages:
            out.append((name, uid, sorted(set(flags) - {"\\Recent"})))
    return sorted(out)


def imap(dovecot, user, folder="INBOX"):
    conn = dovecot.imap_login(user)
    conn.select(f'"{folder}"')
    return conn


def use_projects(dovecot, user, mailbox):
    dovecot.create_folder(user, "Projects")
    mailbox.folders = ["INBOX", "Projects"]
    mailbox.save()


# -- 1. moves between synced folders ----------------------------------------------------------
@pytest.mark.parametrize("how", ["move", "copy-expunge"])
def test_server_move_between_user_synced_folders(dovecot, mail_user, imap_mailbox, how):
    use_projects(dovecot, mail_user, imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="To file"))
    dovecot.deliver(mail_user, make_message(subject="Stays"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="To file")
    uid = dovecot.folder_state(mail_user).uids[0]
    conn = imap(dovecot, mail_user)
    if how == "move":
        assert conn.uid("MOVE", str(uid), "Projects")[0] == "OK"
    else:
        assert conn.uid("COPY", str(uid), "Projects")[0] == "OK"
        conn.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
        conn.expunge()
    conn.logout()

    sync(imap_mailbox)

    assert Email.objects.filter(mailbox=imap_mailbox).count() == 2
    email.refresh_from_db()
    assert email.deleted_at is None
    assert [p[0] for p in places(email)] == ["Projects"]
    assert sync(imap_mailbox).unchanged_folders == 2


def test_server_move_sent_to_inbox(dovecot, mail_user, imap_mailbox):
    dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{mail_user.email}>", subject="Mine"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Mine")
    conn = imap(dovecot, mail_user, "Sent")
    conn.uid("MOVE", "1", "INBOX")
    conn.logout()
    sync(imap_mailbox)
    email.refresh_from_db()
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    assert email.deleted_at is None
    assert [p[0] for p in places(email)] == ["INBOX"]


def test_server_read_then_move_keeps_read_state(dovecot, mail_user, imap_mailbox):
    """A mail client marks a mail read as it is opened, then the user files it."""
    use_projects(dovecot, mail_user, imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="Read and filed"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Read and filed")
    assert not email.seen
    conn = imap(dovecot, mail_user)
    conn.uid("STORE", "1", "+FLAGS.SILENT", r"(\Seen \Flagged)")
    conn.uid("MOVE", "1", "Projects")
    conn.logout()

    sync(imap_mailbox)

    email.refresh_from_db()
    assert places(email) == server_places(dovecot, mail_user, ["INBOX", "Projects"])
    sync(imap_mailbox)  # a later run does not repair it either
    email.refresh_from_db()
    assert (email.seen, email.flagged) == (True, True), places(email)


# -- 2. copies ----------------------------------------------------------------------------------
def test_server_copy_then_delete_one_copy(dovecot, mail_user, imap_mailbox):
    use_projects(dovecot, mail_user, imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="Copied"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Copied")
    conn = imap(dovecot, mail_user)
    conn.uid("COPY", "1", "Projects")
    conn.logout()
    sync(imap_mailbox)
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    assert [p[0] for p in places(email)] == ["INBOX", "Projects"]

    dovecot.expunge(mail_user, "INBOX", 1)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None
    assert [p[0] for p in places(email)] == ["Projects"]


# -- 3. the same message delivered twice --------------------------------------------------------
def test_duplicate_delivery_one_email_two_locations(dovecot, mail_user, imap_mailbox):
    raw = make_message(subject="Twice")
    dovecot.deliver(mail_user, raw)
    dovecot.deliver(mail_user, raw)
    sync(imap_mailbox)
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    email = Email.objects.get(subject="Twice")
    assert [p[:2] for p in places(email)] == [("INBOX", 1), ("INBOX", 2)]

    dovecot.expunge(mail_user, "INBOX", 1)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None
    assert [p[:2] for p in places(email)] == [("INBOX", 2)]


def test_duplicate_delivered_across_syncs(dovecot, mail_user, imap_mailbox):
    raw = make_message(subject="Twice later")
    dovecot.deliver(mail_user, raw)
    sync(imap_mailbox)
    dovecot.deliver(mail_user, raw)
    sync(imap_mailbox)
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    email = Email.objects.get(subject="Twice later")
    assert [p[:2] for p in places(email)] == [("INBOX", 1), ("INBOX", 2)]
    dovecot.expunge(mail_user, "INBOX", 2)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None and [p[:2] for p in places(email)] == [("INBOX", 1)]


# -- 4. CRM actions, then sync --------------------------------------------------------------------
def test_crm_move_to_synced_folder_then_sync(dovecot, mail_user, imap_mailbox):
    use_projects(dovecot, mail_user, imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="CRM files it"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="CRM files it")
    services.email_update(actor=imap_mailbox.owner, email=email, folder="Projects", seen=True)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    assert email.deleted_at is None and email.seen
    assert places(email) == server_places(dovecot, mail_user, ["INBOX", "Projects"])
    # and again, back
    services.email_update(actor=imap_mailbox.owner, email=email, folder="INBOX", seen=False)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None and not email.seen
    assert places(email) == server_places(dovecot, mail_user, ["INBOX", "Projects"])


def test_crm_move_to_unsynced_folder_then_sync_then_flag(dovecot, mail_user, imap_mailbox):
    dovecot.create_folder(mail_user, "Archive")
    dovecot.deliver(mail_user, make_message(subject="Archived"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Archived")
    services.email_update(actor=imap_mailbox.owner, email=email, folder="Archive")
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None
    assert [p[0] for p in places(email)] == ["Archive"]
    services.email_update(actor=imap_mailbox.owner, email=email, flagged=True)
    assert dovecot.folder_state(mail_user, "Archive").messages[0][1] >= {"\\Flagged"}
    report = sync(imap_mailbox)
    assert report.new == 0


def test_crm_flag_while_sync_lock_held_then_sync(dovecot, mail_user, imap_mailbox):
    from tests.mailsync.conftest import sync_lock_held

    dovecot.deliver(mail_user, make_message(subject="Flag me"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Flag me")
    with sync_lock_held(imap_mailbox.pk):
        services.email_update(actor=imap_mailbox.owner, email=email, flagged=True, seen=True)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.flagged and email.seen
    assert places(email) == server_places(dovecot, mail_user, ["INBOX"])


def test_crm_delete_then_sync_does_not_resurrect(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Bin me"))
    dovecot.deliver(mail_user, make_message(subject="Keep me"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Bin me")
    services.email_delete(actor=imap_mailbox.owner, email=email)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is not None
    assert Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=True).count() == 1
    assert dovecot.folder_state(mail_user, "Trash").count == 1


# -- 5. UIDVALIDITY changes combined with other server changes -----------------------------------
def test_uidvalidity_change_and_flag_change(dovecot, mail_user, imap_mailbox):
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"V {i}"))
    sync(imap_mailbox)
    dovecot.set_flags(mail_user, "INBOX", 2, ["\\Seen", "\\Flagged"])
    dovecot.reset_uidvalidity(mail_user, "INBOX")
    sync(imap_mailbox)
    sync(imap_mailbox)
    email = Email.objects.get(subject="V 1")
    assert places(email)[0][2] == ["\\Flagged", "\\Seen"]
    assert (email.seen, email.flagged) == (True, True), places(email)


def test_uidvalidity_change_and_expunge(dovecot, mail_user, imap_mailbox):
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"W {i}"))
    sync(imap_mailbox)
    dovecot.expunge(mail_user, "INBOX", 2)
    dovecot.reset_uidvalidity(mail_user, "INBOX")
    sync(imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="W later"))
    sync(imap_mailbox)  # later runs do not repair it either
    gone = Email.objects.get(subject="W 1")
    visible = set(Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))
    assert visible == {"W 0", "W 2", "W later"}, (visible, places(gone))


# -- 6. deleted on the server, then restored ------------------------------------------------------
def test_server_delete_then_restore_from_trash(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Oops"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Oops")
    conn = imap(dovecot, mail_user)
    conn.uid("MOVE", "1", "Trash")
    conn.logout()
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is not None
    conn = imap(dovecot, mail_user, "Trash")
    conn.uid("STORE", "1", "+FLAGS.SILENT", r"(\Seen)")
    conn.uid("MOVE", "1", "INBOX")
    conn.logout()
    sync(imap_mailbox)
    email.refresh_from_db()
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    assert email.deleted_at is None
    assert places(email) == server_places(dovecot, mail_user, ["INBOX"])
    assert email.seen, places(email)


def test_crm_delete_then_restore_on_server(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Regret"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Regret")
    services.email_delete(actor=imap_mailbox.owner, email=email)
    conn = imap(dovecot, mail_user, "Trash")
    conn.uid("MOVE", "1:*", "INBOX")
    conn.logout()
    sync(imap_mailbox)
    email.refresh_from_db()
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    assert email.deleted_at is None
    assert places(email) == server_places(dovecot, mail_user, ["INBOX"])


# -- 7. a Message-ID shared by two different mails -------------------------------------------------
def test_shared_message_id_expunge_one(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="First", message_id="<same@client.example>"))
    dovecot.deliver(mail_user, make_message(subject="Second", message_id="<same@client.example>",
                                            body="A different body."))
    sync(imap_mailbox)
    dovecot.expunge(mail_user, "INBOX", 1)
    sync(imap_mailbox)
    visible = list(Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=True)
                   .values_list("subject", flat=True))
    assert visible == ["Second"]
    # the survivor can still be acted on
    services.email_update(actor=imap_mailbox.owner, email=Email.objects.get(subject="Second"),
                          flagged=True)
    assert dovecot.folder_state(mail_user).flags(2) >= {"\\Flagged"}
    assert dovecot.folder_state(mail_user).flags(2) >= {"\\Flagged"}


# -- 4b. a CRM move to a folder the sync does not watch, then the user acts in their client ------
def test_crm_archive_then_client_unarchives_and_deletes(dovecot, mail_user, imap_mailbox):
    dovecot.create_folder(mail_user, "Archive")
    dovecot.deliver(mail_user, make_message(subject="Round trip"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Round trip")
    services.email_update(actor=imap_mailbox.owner, email=email, folder="Archive")
    # In Thunderbird the user moves it back to the inbox...
    conn = imap(dovecot, mail_user, "Archive")
    conn.uid("MOVE", "1:*", "INBOX")
    conn.logout()
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None
    # ...and later deletes it for good there.
    conn = imap(dovecot, mail_user, "INBOX")
    conn.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Deleted)")
    conn.expunge()
    conn.logout()
    assert dovecot.folder_state(mail_user).count == 0
    assert dovecot.folder_state(mail_user, "Archive").count == 0
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is not None, places(email)


def test_crm_duplicate_delete_moves_both_copies(dovecot, mail_user, imap_mailbox):
    raw = make_message(subject="Twice, binned")
    dovecot.deliver(mail_user, raw)
    dovecot.deliver(mail_user, raw)
    sync(imap_mailbox)
    email = Email.objects.get(subject="Twice, binned")
    services.email_delete(actor=imap_mailbox.owner, email=email)
    assert dovecot.folder_state(mail_user).count == 0
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is not None


def test_server_expunge_of_seen_copy_leaves_unseen_copy(dovecot, mail_user, imap_mailbox):
    """Two copies of one mail; the read one is deleted on the server: what the CRM shows should
    be the copy that is left."""
    use_projects(dovecot, mail_user, imap_mailbox)
    raw = make_message(subject="Two copies")
    dovecot.deliver(mail_user, raw)
    sync(imap_mailbox)
    conn = imap(dovecot, mail_user)
    conn.uid("COPY", "1", "Projects")
    conn.uid("STORE", "1", "+FLAGS.SILENT", r"(\Seen)")
    conn.logout()
    sync(imap_mailbox)
    email = Email.objects.get(subject="Two copies")
    dovecot.expunge(mail_user, "INBOX", 1)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert places(email) == server_places(dovecot, mail_user, ["Projects"])
    assert email.seen is False, places(email)


# -- 4c. a CRM action lands in the middle of a running sync ----------------------------------------
def test_crm_mark_read_during_sync_flag_pass(dovecot, mail_user, imap_mailbox, monkeypatch):
    dovecot.deliver(mail_user, make_message(subject="Racy"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Racy")
    dovecot.set_flags(mail_user, "INBOX", 1, ["\\Flagged"])  # the client flags it
    real = ImapSync._apply_flags
    fired = []

    def crm_acts_first(self, folder, known, changed):
        if not fired:
            fired.append(1)
            services.email_update(actor=imap_mailbox.owner, email=Email.objects.get(pk=email.pk), seen=True)
        return real(self, folder, known, changed)

    monkeypatch.setattr(ImapSync, "_apply_flags", crm_acts_first)
    sync(imap_mailbox)
    monkeypatch.setattr(ImapSync, "_apply_flags", real)
    assert fired
    sync(imap_mailbox)  # the next run must repair whatever the race left
    email.refresh_from_db()
    assert places(email) == server_places(dovecot, mail_user, ["INBOX"])
    assert (email.seen, email.flagged) == (True, True), places(email)


def test_crm_move_during_sync_expunge_pass(dovecot, mail_user, imap_mailbox, monkeypatch):
    use_projects(dovecot, mail_user, imap_mailbox)
    dovecot.deliver(mail_user, make_message(subject="Moved mid-sync"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Moved mid-sync")
    dovecot.deliver(mail_user, make_message(subject="Trigger"))
    real = ImapSync._changes_qresync
    fired = []

    def crm_moves_first(self, session, folder):
        if not fired and folder.name == "INBOX":
            fired.append(1)
            services.email_update(actor=imap_mailbox.owner, email=Email.objects.get(pk=email.pk),
                                  folder="Projects")
        return real(self, session, folder)

    monkeypatch.setattr(ImapSync, "_changes_qresync", crm_moves_first)
    sync(imap_mailbox)
    monkeypatch.setattr(ImapSync, "_changes_qresync", real)
    assert fired
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None
    assert places(email) == server_places(dovecot, mail_user, ["Projects"])
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 2


def test_a_mail_filed_by_the_crm_in_a_folder_not_synced_is_followed_there(
        dovecot, mail_user, imap_mailbox, monkeypatch):
    """Flags changed in that folder reach the CRM; a run with nothing new starts no fetch
    process for it (the folder has nothing to download)."""
    from mailsync.sync import fetcher

    dovecot.create_folder(mail_user, "Archive")
    dovecot.deliver(mail_user, make_message(subject="Filed"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Filed")
    services.email_update(actor=imap_mailbox.owner, email=email, folder="Archive")
    [uid] = dovecot.folder_state(mail_user, "Archive").uids
    dovecot.set_flags(mail_user, "Archive", uid, ["\\Seen", "\\Flagged"])
    spawned = []
    real_spawn = fetcher._spawn
    monkeypatch.setattr(fetcher, "_spawn", lambda: spawned.append(1) or real_spawn())
    sync(imap_mailbox)
    email.refresh_from_db()
    assert places(email) == server_places(dovecot, mail_user, ["INBOX", "Archive"])
    assert (email.seen, email.flagged) == (True, True)
    assert spawned == []
