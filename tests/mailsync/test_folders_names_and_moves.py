"""IMAP folder handling (written as review probes; the ones that failed were fixed: INBOX
in any case, a folder re-added to the configuration, an emptied folder list, Trash asked
for, and CRM actions on mail another client moved or whose folder it renamed meanwhile).
IMAP folder handling and the server oddities a real mailbox has. Folder
names with non-ASCII characters (modified UTF-7 on the wire), spaces, quotes, backslashes,
'&', hierarchy; folders configured through the API; INBOX in another case; folders renamed,
deleted, dropped from and re-added to the configuration; mail moved by another client while
the CRM acts on it. Each asserts what a user would notice."""
from __future__ import annotations

import contextlib

import pytest
from imapclient import IMAPClient
from rest_framework.test import APIClient

from mailsync import services
from mailsync.models import Email, EmailLocation, Mailbox
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


# -- helpers ----------------------------------------------------------------------------------
@contextlib.contextmanager
def imap(dovecot, user):
    """Another mail client (Thunderbird, a phone): IMAPClient, which speaks modified UTF-7."""
    client = IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=False, timeout=20)
    client.login(user.username, user.password)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.logout()


def create(dovecot, user, name: str) -> None:
    with imap(dovecot, user) as c:
        if not c.folder_exists(name):
            c.create_folder(name)


def put(dovecot, user, folder: str, subject: str, flags=()) -> None:
    with imap(dovecot, user) as c:
        if not c.folder_exists(folder):
            c.create_folder(folder)
        c.append(folder, make_message(subject=subject), flags=list(flags))


def server_subjects(dovecot, user, folder: str) -> list[str]:
    with imap(dovecot, user) as c:
        c.select_folder(folder, readonly=True)
        uids = c.search("ALL")
        if not uids:
            return []
        data = c.fetch(uids, [b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
        return sorted(
            v[b"BODY[HEADER.FIELDS (SUBJECT)]"].decode().split(":", 1)[1].strip()
            for v in data.values()
        )


def sync(mailbox: Mailbox):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def folders_of(email: Email) -> list[str]:
    return sorted(EmailLocation.objects.filter(email=email).values_list("folder__name", flat=True))


def api_for(mailbox: Mailbox) -> APIClient:
    api = APIClient()
    api.force_authenticate(mailbox.owner)
    return api


def configure(mailbox: Mailbox, folders: list[str]) -> None:
    """Set "Folders to sync" as a user does: through the API."""
    response = api_for(mailbox).patch(f"/api/v1/mailboxes/{mailbox.pk}/", {"folders": folders},
                                      format="json")
    assert response.status_code == 200, response.content
    # Stored once each, INBOX in its one spelling (case-insensitive: RFC 3501 5.1)
    assert response.json()["folders"] == list(dict.fromkeys(
        "INBOX" if f.upper() == "INBOX" else f for f in folders))


ODD_NAMES = [
    "Entwürfe-Kunden",          # German
    "Отправленные клиентам",     # Russian, with a space
    "送信済み",                  # Japanese
    "R&D",                     # '&' is the shift character of modified UTF-7
    "&Tilde; & more",           # looks like an mUTF-7 escape already
    'Say "hi"',                # quotes
    "back\\slash",             # backslash
    "Clients/ACME",            # nested (the server's delimiter is '/')
    "2024",                    # all digits (parsers like to turn it into an int)
    "0815",                    # leading zero
    "NIL",                     # an IMAP keyword
    "50% off",                 # LIST wildcard '%'
    "Star*",                   # LIST wildcard '*'
    "[Work]/Clients",          # brackets, as in "[Gmail]/Sent Mail"
    "Émoji 📨",                 # outside the BMP (surrogate pair in UTF-16 / mUTF-7)
]


# -- 1. odd folder names configured and synced -----------------------------------------------
@pytest.mark.parametrize("name", ODD_NAMES)
def test_mail_in_an_oddly_named_configured_folder_is_synced_once_and_shown_by_its_name(
        dovecot, mail_user, imap_mailbox, name):
    """A user lists a folder with umlauts/Cyrillic/quotes/'&'/nesting under "Folders to sync":
    its mail shows in the CRM once, under the folder name as the user typed it (decoded, not
    '&AMM-'), filterable by that name; the next run finds nothing new."""
    put(dovecot, mail_user, name, f"In {name}")
    dovecot.deliver(mail_user, make_message(subject="In inbox"))
    configure(imap_mailbox, ["INBOX", name])

    report = sync(imap_mailbox)

    assert not report.errors, report.errors
    email = Email.objects.get(mailbox=imap_mailbox, subject=f"In {name}")
    assert folders_of(email) == [name]
    listed = api_for(imap_mailbox).get("/api/v1/emails/", {"folder": name}).json()
    assert [e["subject"] for e in listed["results"]] == [f"In {name}"]
    assert listed["results"][0]["folders"] == [name]
    again = sync(imap_mailbox)
    assert again.new == 0 and again.expunged == 0 and not again.errors
    assert Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=True).count() == 2


@pytest.mark.parametrize("name", ["Entwürfe-Kunden", "R&D", 'Say "hi"', "Clients/ACME"])
def test_crm_move_into_an_oddly_named_synced_folder_reaches_the_server(
        dovecot, mail_user, imap_mailbox, name):
    """The user files a mail from the CRM into "Entwürfe-Kunden" (or "R&D"...): the server has
    it there (and no longer in INBOX), the CRM shows it there, and a sync keeps one copy."""
    create(dovecot, mail_user, name)
    dovecot.deliver(mail_user, make_message(subject="File me"))
    configure(imap_mailbox, ["INBOX", name])
    sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox, subject="File me")

    response = api_for(imap_mailbox).patch(f"/api/v1/emails/{email.pk}/", {"folder": name},
                                           format="json")

    assert response.status_code == 200, response.content
    assert response.json()["folders"] == [name]
    assert server_subjects(dovecot, mail_user, name) == ["File me"]
    assert server_subjects(dovecot, mail_user, "INBOX") == []
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None
    assert folders_of(email) == [name]
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1


@pytest.mark.parametrize("name", ["送信済み", "R&D"])
def test_crm_move_into_an_oddly_named_unsynced_folder_is_followed(dovecot, mail_user, imap_mailbox, name):
    """Filed from the CRM into a folder that is not synced ("送信済み"): it stays visible there,
    a flag set later in the CRM reaches the server copy, and syncs do not lose it."""
    create(dovecot, mail_user, name)
    dovecot.deliver(mail_user, make_message(subject="Archive me"))
    sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox, subject="Archive me")
    services.email_update(actor=imap_mailbox.owner, email=email, folder=name)
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None and folders_of(email) == [name]
    services.email_update(actor=imap_mailbox.owner, email=email, flagged=True)
    with imap(dovecot, mail_user) as c:
        c.select_folder(name, readonly=True)
        flags = c.get_flags(c.search("ALL"))
    assert [b"\\Flagged" in f for f in flags.values()] == [True]
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None and email.flagged and folders_of(email) == [name]


# -- 2. INBOX in another case ------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["inbox", "Inbox"])
def test_inbox_configured_in_another_case_is_synced(dovecot, mail_user, imap_mailbox, spelling):
    """INBOX is case-insensitive (RFC 3501 5.1): a user who types "Inbox" in "Folders to sync"
    (as Outlook and Gmail show it) gets their inbox synced, not "Not on the server"."""
    dovecot.deliver(mail_user, make_message(subject="Customer asks"))
    configure(imap_mailbox, [spelling, "Sent"])

    report = sync(imap_mailbox)

    assert Email.objects.filter(mailbox=imap_mailbox, subject="Customer asks").count() == 1, report.errors
    assert not report.errors


def test_moving_to_inbox_typed_in_lower_case_works(dovecot, mail_user, imap_mailbox):
    """A move to "inbox" (an API client, a user typing) reaches INBOX rather than failing."""
    create(dovecot, mail_user, "Projects")
    dovecot.deliver(mail_user, make_message(subject="Back home"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Back home")
    services.email_update(actor=imap_mailbox.owner, email=email, folder="Projects")

    response = api_for(imap_mailbox).patch(f"/api/v1/emails/{email.pk}/", {"folder": "inbox"},
                                           format="json")

    assert response.status_code == 200, response.content
    assert server_subjects(dovecot, mail_user, "INBOX") == ["Back home"]


# -- 3. configuration changes ------------------------------------------------------------------
def test_a_folder_dropped_from_the_config_then_added_back_gets_the_mail_that_arrived_meanwhile(
        dovecot, mail_user, imap_mailbox):
    """The user stops syncing "Projects", a customer mail is filed there, the user adds
    "Projects" back: after the next sync the new mail is in the CRM."""
    put(dovecot, mail_user, "Projects", "Old project mail")
    configure(imap_mailbox, ["INBOX", "Projects"])
    sync(imap_mailbox)
    assert Email.objects.filter(subject="Old project mail").count() == 1

    configure(imap_mailbox, ["INBOX"])
    put(dovecot, mail_user, "Projects", "New project mail")
    sync(imap_mailbox)  # Projects still holds a known mail: its place is checked there
    configure(imap_mailbox, ["INBOX", "Projects"])

    sync(imap_mailbox)
    sync(imap_mailbox)  # and once more: nothing changes on the server, nothing shows up

    assert Email.objects.filter(mailbox=imap_mailbox, subject="New project mail").count() == 1


def test_a_crm_archive_folder_later_configured_is_synced_whole(dovecot, mail_user, imap_mailbox):
    """Mail filed from the CRM into "Archive" (not synced), then "Archive" added to the folders
    to sync: everything in Archive shows, the filed mail once."""
    put(dovecot, mail_user, "Archive", "Archived long ago")
    dovecot.deliver(mail_user, make_message(subject="Filed by CRM"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Filed by CRM")
    services.email_update(actor=imap_mailbox.owner, email=email, folder="Archive")
    sync(imap_mailbox)
    configure(imap_mailbox, ["INBOX", "Sent", "Archive"])

    sync(imap_mailbox)

    assert Email.objects.filter(mailbox=imap_mailbox, subject="Archived long ago").count() == 1
    assert Email.objects.filter(mailbox=imap_mailbox, subject="Filed by CRM").count() == 1
    assert folders_of(Email.objects.get(subject="Filed by CRM")) == ["Archive"]


def test_duplicate_names_in_the_config_sync_the_folder_once(dovecot, mail_user, imap_mailbox):
    """ "INBOX" listed twice: each mail once, no errors, the second run changes nothing."""
    dovecot.deliver(mail_user, make_message(subject="Once"))
    configure(imap_mailbox, ["INBOX", "INBOX"])
    report = sync(imap_mailbox)
    assert not report.errors
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    assert EmailLocation.objects.filter(email__mailbox=imap_mailbox).count() == 1
    assert sync(imap_mailbox).new == 0


def test_configuring_trash_says_why_it_is_not_synced(dovecot, mail_user, imap_mailbox):
    """The user lists "Trash" under folders to sync: it is never synced by design, but the
    user is told so instead of silently getting nothing."""
    put(dovecot, mail_user, "Trash", "Deleted thing")
    configure(imap_mailbox, ["INBOX", "Trash"])
    report = sync(imap_mailbox)
    assert report.errors and any("Trash" in e and "Never synced" in e for e in report.errors), report.errors
    assert not Email.objects.filter(subject="Deleted thing").exists()


def test_a_noselect_parent_configured_is_explained(dovecot, mail_user, imap_mailbox):
    """"Clients" exists only as the parent of "Clients/ACME" (\\Noselect or \\NonExistent): the
    message must not claim it is missing from the server when the user sees it in their
    client; at least it is not a crash and the child can be synced."""
    put(dovecot, mail_user, "Clients/ACME", "ACME mail")
    configure(imap_mailbox, ["INBOX", "Clients", "Clients/ACME"])
    report = sync(imap_mailbox)
    assert Email.objects.filter(mailbox=imap_mailbox, subject="ACME mail").count() == 1
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "completed", imap_mailbox.last_error
    print("noselect report:", report.errors)


def test_parent_and_child_folder_both_synced_keep_their_own_mail(dovecot, mail_user, imap_mailbox):
    """"Clients" and "Clients/ACME" both hold mail: each mail shows in its own folder."""
    put(dovecot, mail_user, "Clients", "Parent mail")
    put(dovecot, mail_user, "Clients/ACME", "Child mail")
    configure(imap_mailbox, ["INBOX", "Clients", "Clients/ACME"])
    sync(imap_mailbox)
    assert folders_of(Email.objects.get(subject="Parent mail")) == ["Clients"]
    assert folders_of(Email.objects.get(subject="Child mail")) == ["Clients/ACME"]


# -- 4. folders renamed / deleted on the server ----------------------------------------------
def test_a_configured_folder_renamed_on_the_server_then_the_config_follows(dovecot, mail_user, imap_mailbox):
    """"Projects" is renamed "Projekte" in another client: the sync says the folder is gone
    (clear error, not a crash); after the user updates the config the mail is back, once."""
    put(dovecot, mail_user, "Projects", "Project mail")
    configure(imap_mailbox, ["INBOX", "Projects"])
    sync(imap_mailbox)
    email = Email.objects.get(subject="Project mail")
    with imap(dovecot, mail_user) as c:
        c.rename_folder("Projects", "Projekte")

    report = sync(imap_mailbox)
    assert any("Projects" in e for e in report.errors), report.errors
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state != "error" or "Projects" in imap_mailbox.last_error

    configure(imap_mailbox, ["INBOX", "Projekte"])
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None and folders_of(email) == ["Projekte"]
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1


def test_crm_action_on_mail_in_a_folder_renamed_meanwhile_is_a_clear_error(dovecot, mail_user, imap_mailbox):
    """Mark-read in the CRM of a mail whose folder was renamed in another client since the last
    sync: a clear 4xx/5xx answer that says what happened (not a 500), and the server untouched."""
    put(dovecot, mail_user, "Projects", "Project mail")
    configure(imap_mailbox, ["INBOX", "Projects"])
    sync(imap_mailbox)
    email = Email.objects.get(subject="Project mail")
    with imap(dovecot, mail_user) as c:
        c.rename_folder("Projects", "Projekte")

    api = api_for(imap_mailbox)
    api.raise_request_exception = False
    response = api.patch(f"/api/v1/emails/{email.pk}/", {"seen": True}, format="json")

    assert response.status_code == 409, (response.status_code, response.content[:300])
    assert "no longer on the server" in response.json()["detail"]
    assert not Email.objects.get(pk=email.pk).seen


def test_crm_move_into_a_folder_deleted_meanwhile_is_a_clear_error(dovecot, mail_user, imap_mailbox):
    """The target folder was deleted in another client: 400 "no such folder", mail stays."""
    create(dovecot, mail_user, "Archive")
    dovecot.deliver(mail_user, make_message(subject="Stay"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Stay")
    with imap(dovecot, mail_user) as c:
        c.delete_folder("Archive")
    response = api_for(imap_mailbox).patch(f"/api/v1/emails/{email.pk}/", {"folder": "Archive"},
                                           format="json")
    assert response.status_code == 400, response.content
    assert server_subjects(dovecot, mail_user, "INBOX") == ["Stay"]
    assert folders_of(email) == ["INBOX"]


# -- 5. another client moved the mail meanwhile -----------------------------------------------
def test_crm_move_of_a_mail_another_client_moved_meanwhile(dovecot, mail_user, imap_mailbox):
    """Thunderbird moved the mail from INBOX to "Clients" (not synced) after the last sync; the
    user then files it into "Archive" in the CRM. Either the mail ends in Archive on the
    server, or the user is told it moved meanwhile; never a "done" that left the mail where
    it was while the CRM shows it nowhere."""
    create(dovecot, mail_user, "Archive")
    create(dovecot, mail_user, "Clients")
    dovecot.deliver(mail_user, make_message(subject="Contested"))
    sync(imap_mailbox)
    email = Email.objects.get(subject="Contested")
    with imap(dovecot, mail_user) as c:
        c.select_folder("INBOX")
        c.move(c.search("ALL"), "Clients")

    api = api_for(imap_mailbox)
    api.raise_request_exception = False
    response = api.patch(f"/api/v1/emails/{email.pk}/", {"folder": "Archive"}, format="json")

    # Found by this probe: 200 with the mail nowhere (MOVE of a missing UID is a silent
    # no-op on the server, and the CRM dropped its place anyway). Now: told, nothing changed.
    assert response.status_code == 409, response.content
    assert "moved or deleted on the server" in response.json()["detail"]
    assert server_subjects(dovecot, mail_user, "Clients") == ["Contested"]
    assert server_subjects(dovecot, mail_user, "Archive") == []
    email.refresh_from_db()
    assert email.deleted_at is None and folders_of(email) == ["INBOX"]
    # The sync (queued by the answer) finds where it went ("Clients" is not synced: the mail
    # leaves the CRM as a recoverable tombstone, as any mail moved out of the synced folders).
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is not None


def test_crm_delete_of_a_mail_another_client_moved_meanwhile(dovecot, mail_user, imap_mailbox):
    """Another client filed the mail into synced "Projects"; the user deletes it in the CRM
    (from the stale INBOX view): it must not come back on the next sync as if the delete
    never happened without the user being told (either deleted on the server, or an error)."""
    create(dovecot, mail_user, "Projects")
    dovecot.deliver(mail_user, make_message(subject="Delete me"))
    configure(imap_mailbox, ["INBOX", "Projects"])
    sync(imap_mailbox)
    email = Email.objects.get(subject="Delete me")
    with imap(dovecot, mail_user) as c:
        c.select_folder("INBOX")
        c.move(c.search("ALL"), "Projects")

    api = api_for(imap_mailbox)
    api.raise_request_exception = False
    response = api.delete(f"/api/v1/emails/{email.pk}/")

    # Found by this probe: 204, nothing reached the server, and the mail came back on the
    # next sync. Now the user is told; after the sync the delete works where the mail is.
    assert response.status_code == 409, response.content
    assert server_subjects(dovecot, mail_user, "Projects") == ["Delete me"]
    sync(imap_mailbox)
    email.refresh_from_db()
    assert folders_of(email) == ["Projects"] and email.deleted_at is None
    assert api.delete(f"/api/v1/emails/{email.pk}/").status_code == 204
    assert server_subjects(dovecot, mail_user, "Projects") == []
    assert server_subjects(dovecot, mail_user, "Trash") == ["Delete me"]
    sync(imap_mailbox)
    email.refresh_from_db()
    assert email.deleted_at is not None


# -- 6. server oddities ---------------------------------------------------------------------
def test_an_empty_configured_folder_then_mail(dovecot, mail_user, imap_mailbox):
    """An empty folder syncs without error; mail put there later shows on the next run."""
    create(dovecot, mail_user, "Leeg")
    configure(imap_mailbox, ["INBOX", "Leeg"])
    assert not sync(imap_mailbox).errors
    put(dovecot, mail_user, "Leeg", "First")
    sync(imap_mailbox)
    assert folders_of(Email.objects.get(subject="First")) == ["Leeg"]


def test_uid_gaps_do_not_lose_or_duplicate_mail(dovecot, mail_user, imap_mailbox):
    """UIDs 1..6 with 2, 3 and 5 expunged before the first sync, more after: all present once."""
    for i in range(6):
        dovecot.deliver(mail_user, make_message(subject=f"Gap {i + 1}"))
    for uid in (2, 3, 5):
        dovecot.expunge(mail_user, "INBOX", uid)
    sync(imap_mailbox)
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Later {i}"))
    dovecot.expunge(mail_user, "INBOX", 8)
    sync(imap_mailbox)
    live = sorted(Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))
    assert live == ["Gap 1", "Gap 4", "Gap 6", "Later 0", "Later 2"]
    assert sync(imap_mailbox).new == 0


def test_expunged_between_search_and_fetch(dovecot, mail_user, imap_mailbox, monkeypatch):
    """A message expunged by another client right after our SEARCH: the others are stored, no
    error; the progress totals do not count it; the next run is quiet."""
    from mailsync.protocols.imap import ImapSession

    for i in range(4):
        dovecot.deliver(mail_user, make_message(subject=f"Race {i}"))
    original = ImapSession.search_uids
    fired = []

    def search_then_expunge(self, **kwargs):
        uids = original(self, **kwargs)
        if uids and not fired and self.client is not None:
            fired.append(True)
            dovecot.expunge(mail_user, "INBOX", 2)
        return uids

    monkeypatch.setattr(ImapSession, "search_uids", search_then_expunge)
    report = sync(imap_mailbox)
    monkeypatch.undo()
    assert fired
    live = sorted(Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))
    assert live == ["Race 0", "Race 2", "Race 3"], report
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state == "completed", imap_mailbox.last_error
    assert imap_mailbox.messages_done == imap_mailbox.messages_total == 3
    assert sync(imap_mailbox).new == 0


def test_a_large_download_from_a_non_ascii_folder_through_the_fetch_process(
        dovecot, mail_user, imap_mailbox, monkeypatch):
    """A big first sync of "Entwürfe-Kunden" (the fetch runs in a child process, which opens
    its own connection and SELECTs the folder by name): every mail stored once."""
    import mailsync.sync.imap as engine

    monkeypatch.setattr(engine, "BATCH_MESSAGES", 4)
    name = "Entwürfe-Kunden"
    with imap(dovecot, mail_user) as c:
        c.create_folder(name)
        for i in range(14):
            c.append(name, make_message(subject=f"Bulk {i}"))
    configure(imap_mailbox, [name])
    spawned = []
    original = engine.fetch_in_child
    monkeypatch.setattr(engine, "fetch_in_child", lambda *a, **k: spawned.append(1) or original(*a, **k))

    report = sync(imap_mailbox)

    assert spawned, "the fetch process was not used"
    assert not report.errors
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 14
    assert EmailLocation.objects.filter(email__mailbox=imap_mailbox, folder__name=name).count() == 14


def test_clearing_the_folder_list_goes_back_to_inbox_and_sent(dovecot, mail_user, imap_mailbox):
    """The user had "Folders to sync" = INBOX, Projects, then empties it ("Empty: the Inbox and
    the Sent folder", says the form): the Sent folder's mail shows after the next sync."""
    put(dovecot, mail_user, "Projects", "Project mail")
    dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{mail_user.email}>", subject="My offer"))
    dovecot.deliver(mail_user, make_message(subject="Inbox mail"))
    configure(imap_mailbox, ["INBOX", "Projects"])
    sync(imap_mailbox)
    assert not Email.objects.filter(subject="My offer").exists()

    configure(imap_mailbox, [])
    sync(imap_mailbox)

    assert Email.objects.filter(mailbox=imap_mailbox, subject="My offer").count() == 1
    assert folders_of(Email.objects.get(subject="My offer")) == ["Sent"]


def test_a_mail_sent_to_a_folder_only_by_special_use_is_found(dovecot, mail_user, imap_mailbox):
    """Default folders: the Sent folder found by SPECIAL-USE is synced on the first run, and a
    CRM move of a received mail into it shows there (server and CRM)."""
    dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{mail_user.email}>", subject="Sent one"))
    dovecot.deliver(mail_user, make_message(subject="Received"))
    sync(imap_mailbox)
    assert folders_of(Email.objects.get(subject="Sent one")) == ["Sent"]
    email = Email.objects.get(subject="Received")
    services.email_update(actor=imap_mailbox.owner, email=email, folder="Sent")
    sync(imap_mailbox)
    assert folders_of(email) == ["Sent"]
    assert server_subjects(dovecot, mail_user, "Sent") == ["Received", "Sent one"]
