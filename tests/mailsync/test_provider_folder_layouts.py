"""Real providers' folder layouts (Outlook, Gmail, iCloud, Yahoo, German and French hosting,
Courier '.' hierarchy) as a salesperson connecting them meets them. Written as review probes;
those that failed were fixed: Sent/Trash/Junk are recognized by name in many languages and
on the last part of the path, in one place (``ImapSession.list_folders``), so localized Sent
folders sync, CRM delete goes to a localized Trash instead of expunging for good, the CRM's
Sent copy goes where the sync reads, unflagged Trash/Junk are never synced; a folder's
special use is updated when found later; a mail seen first in All Mail becomes "sent" in
Sent; the API's DELETE says what happened (Mailroom-Delete-Outcome).

Servers without SPECIAL-USE are real: extra private Dovecot instances started here from the
testbed's config with the namespace changed (no ``special_use`` mailboxes, or a Courier-style
``INBOX.`` prefix with '.' separator, or Gmail's flagged "[Gmail]/..." folders). No
monkeypatching of product code."""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from email.utils import make_msgid
from pathlib import Path

import pytest
from imapclient import IMAPClient
from rest_framework.test import APIClient

from mailsync import services
from mailsync.models import Email, EmailLocation, MailFolder, Mailbox
from mailsync.protocols.imap import ImapSession
from mailsync.sync.base import server_settings
from mailsync.sync.imap import ImapSync
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message
from tests.testbed import dovecot as testbed

pytestmark = pytest.mark.django_db

# -- extra Dovecot instances with other namespaces ---------------------------------------------
_NS_RE = re.compile(r"namespace inbox \{\{.*?\n\}\}\n", re.S)

NAMESPACES = {
    # No SPECIAL-USE flag on any folder, no auto-created folders (Outlook/Exchange IMAP without
    # flags, many hosting providers, older servers).
    "plain": "namespace inbox {{\n  inbox = yes\n  separator = /\n}}\n",
    # Courier / cPanel style: everything under INBOX., '.' as the separator.
    "courier": "namespace inbox {{\n  inbox = yes\n  separator = .\n  prefix = INBOX.\n}}\n",
    # Gmail: flagged folders under [Gmail]/.
    "gmail": (
        "namespace inbox {{\n  inbox = yes\n  separator = /\n"
        '  mailbox "[Gmail]/Sent Mail" {{\n    special_use = \\Sent\n    auto = subscribe\n  }}\n'
        '  mailbox "[Gmail]/Trash" {{\n    special_use = \\Trash\n    auto = subscribe\n  }}\n'
        '  mailbox "[Gmail]/Spam" {{\n    special_use = \\Junk\n    auto = subscribe\n  }}\n'
        '  mailbox "[Gmail]/All Mail" {{\n    special_use = \\All\n    auto = subscribe\n  }}\n'
        '  mailbox "[Gmail]/Drafts" {{\n    special_use = \\Drafts\n    auto = subscribe\n  }}\n'
        "}}\n"
    ),
}


class _Server(testbed.DovecotServer):
    def __init__(self, root: Path, ca, namespace: str) -> None:  # noqa: ANN001
        super().__init__(root, ca)
        self.template = _NS_RE.sub(lambda _m: namespace, testbed.CONFIG_TEMPLATE, count=1)
        assert self.template != testbed.CONFIG_TEMPLATE

    def _write_config(self, uid: int, gid: int) -> None:
        saved = testbed.CONFIG_TEMPLATE
        testbed.CONFIG_TEMPLATE = self.template
        try:
            super()._write_config(uid, gid)
        finally:
            testbed.CONFIG_TEMPLATE = saved


_servers: dict[str, _Server] = {}


@pytest.fixture(scope="module")
def servers(test_ca):  # noqa: ANN001, ANN201
    """Lazily started extra Dovecots, stopped at the end of the module."""
    roots = []

    def get(kind: str) -> _Server:
        if kind not in _servers:
            root = Path(tempfile.mkdtemp(prefix=f"mailroom-probe-{kind}-"))
            roots.append(root)
            server = _Server(root, test_ca, NAMESPACES[kind])
            server.start()
            _servers[kind] = server
        return _servers[kind]

    yield get
    for server in list(_servers.values()):
        server.stop()
    _servers.clear()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------------------
@contextlib.contextmanager
def imap(server, user):  # noqa: ANN001, ANN201
    """Another mail client (webmail, Outlook, a phone) on the same account."""
    client = IMAPClient(server.host, port=server.imap_port, ssl=False, timeout=20)
    client.login(user.username, user.password)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.logout()


def create(server, user, *names: str) -> None:  # noqa: ANN001
    with imap(server, user) as c:
        for name in names:
            if not c.folder_exists(name):
                c.create_folder(name)


def put(server, user, folder: str, raw: bytes, flags=()) -> None:  # noqa: ANN001
    with imap(server, user) as c:
        if folder != "INBOX" and not c.folder_exists(folder):
            c.create_folder(folder)
        c.append(folder, raw, flags=list(flags))


def server_folders(server, user) -> dict[str, tuple]:  # noqa: ANN001
    with imap(server, user) as c:
        return {name: tuple(flags) for flags, _d, name in c.list_folders()}


def count_in(server, user, folder: str) -> int:  # noqa: ANN001
    with imap(server, user) as c:
        c.select_folder(folder, readonly=True)
        return len(c.search("ALL"))


def mailbox_on(server, user, folders=()) -> Mailbox:  # noqa: ANN001
    return MailboxFactory(
        owner=UserFactory(), email_address=user.email, incoming_host=server.host,
        incoming_port=server.imaps_port, incoming_security="ssl", username=user.username,
        password=user.password, is_active=True, folders=list(folders),
    )


def sync(mailbox: Mailbox):  # noqa: ANN201
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def synced_folder_names(mailbox: Mailbox) -> set[str]:
    return set(MailFolder.objects.filter(mailbox=mailbox).values_list("name", flat=True))


def email_by_subject(mailbox: Mailbox, subject: str) -> Email:
    return Email.objects.get(mailbox=mailbox, subject=subject)


def sent_mail(subject: str, frm: str = "Sales Team <team@company.example>") -> bytes:
    """A mail the salesperson sent from their mail program (From: a send-as alias, as
    salespeople often send from a team or shared address)."""
    return make_message(sender=frm, to="Customer <customer@client.example>", subject=subject)


# -- provider layouts without SPECIAL-USE ----------------------------------------------------
# (label, sent, trash, junk, other folders)
LAYOUTS = [
    ("outlook", "Sent Items", "Deleted Items", "Junk Email", ["Drafts", "Archive"]),
    ("gmail-unflagged", "[Gmail]/Sent Mail", "[Gmail]/Trash", "[Gmail]/Spam",
     ["[Gmail]/All Mail", "[Gmail]/Drafts", "[Gmail]/Starred"]),
    ("icloud", "Sent Messages", "Deleted Messages", "Junk", ["Drafts", "Archive"]),
    ("yahoo", "Sent", "Trash", "Bulk Mail", ["Draft", "Archive"]),
    ("german", "Gesendet", "Papierkorb", "Spam", ["Entwürfe"]),
    ("german-outlook", "Gesendete Elemente", "Gelöschte Elemente", "Junk-E-Mail", ["Entwürfe"]),
    ("french", "Envoyés", "Corbeille", "Indésirables", ["Brouillons"]),
    ("french-outlook", "Éléments envoyés", "Éléments supprimés", "Courrier indésirable",
     ["Brouillons"]),
    ("lowercase", "sent items", "deleted items", "junk e-mail", ["drafts"]),
]
LAYOUT_IDS = [layout[0] for layout in LAYOUTS]


def _layout(servers, label, sent, trash, junk, others):  # noqa: ANN001, ANN202
    server = servers("plain")
    user = server.add_user()
    create(server, user, sent, trash, junk, *others)
    flags = server_folders(server, user)
    assert not any(f for fl in flags.values() for f in fl if f in (b"\\Sent", b"\\Trash", b"\\Junk")), flags
    return server, user


@pytest.mark.parametrize("label,sent,trash,junk,others", LAYOUTS, ids=LAYOUT_IDS)
def test_default_sync_takes_inbox_and_the_providers_sent_folder(servers, label, sent, trash,
                                                                junk, others):
    """Default "folders to sync": INBOX and the provider's Sent folder (no SPECIAL-USE, so by
    its name); never Trash, Junk/Spam, All Mail. A mail in Sent (from a send-as alias) is
    shown as sent."""
    server, user = _layout(servers, label, sent, trash, junk, others)
    server.deliver(user, make_message(subject="From customer"))
    put(server, user, trash, make_message(subject="Binned"))
    put(server, user, junk, make_message(subject="Spammy"))
    put(server, user, sent, sent_mail("Our quote"))
    mailbox = mailbox_on(server, user)

    report = sync(mailbox)

    assert not report.errors, report.errors
    assert synced_folder_names(mailbox) == {"INBOX", sent}
    assert set(Email.objects.filter(mailbox=mailbox).values_list("subject", flat=True)) == {
        "From customer", "Our quote"}
    assert email_by_subject(mailbox, "Our quote").direction == Email.Direction.SENT


@pytest.mark.parametrize("label,sent,trash,junk,others", LAYOUTS, ids=LAYOUT_IDS)
def test_crm_delete_moves_the_mail_to_the_providers_trash(servers, label, sent, trash, junk,
                                                          others):
    """Delete in the CRM: the mail goes to the provider's own Trash ("Deleted Items",
    "Papierkorb", "Corbeille"...), not expunged for good and no new "Trash" made."""
    server, user = _layout(servers, label, sent, trash, junk, others)
    server.deliver(user, make_message(subject="Delete me"))
    mailbox = mailbox_on(server, user)
    sync(mailbox)
    before = set(server_folders(server, user))

    outcome = services.email_delete(actor=mailbox.owner, email=email_by_subject(mailbox, "Delete me"))

    assert outcome == "trash"
    assert count_in(server, user, "INBOX") == 0
    assert count_in(server, user, trash) == 1, f"the mail is not in {trash!r}"
    assert set(server_folders(server, user)) == before  # no new folder


@pytest.mark.parametrize("label,sent,trash,junk,others", LAYOUTS, ids=LAYOUT_IDS)
def test_mail_sent_from_the_crm_is_copied_to_the_synced_sent_folder(servers, label, sent,
                                                                    trash, junk, others):
    """The CRM's Sent-folder copy goes to the same Sent folder the sync reads (else the mail
    sent from the CRM is never found on the server, or lands in a folder nobody syncs)."""
    from mailsync.sending import _append_to_sent

    server, user = _layout(servers, label, sent, trash, junk, others)
    mailbox = mailbox_on(server, user)
    sync(mailbox)
    synced_sent = synced_folder_names(mailbox) - {"INBOX"}

    folder = _append_to_sent(mailbox, sent_mail("Sent from CRM"))

    assert folder == sent
    assert {folder} == synced_sent
    assert count_in(server, user, sent) == 1


@pytest.mark.parametrize("label,sent,trash,junk,others", LAYOUTS, ids=LAYOUT_IDS)
def test_users_own_list_with_the_unflagged_trash_or_junk_leaves_them_out(servers, label, sent,
                                                                        trash, junk, others):
    """A user who adds the Trash and the Spam folder to "Folders to sync" on a server without
    SPECIAL-USE: README promises Trash and Junk are never synced (they are not customer
    conversations; spam would land on leads), and says so."""
    server, user = _layout(servers, label, sent, trash, junk, others)
    server.deliver(user, make_message(subject="Real"))
    put(server, user, trash, make_message(subject="Binned"))
    put(server, user, junk, make_message(subject="Spammy", sender="Spam <customer@client.example>"))
    mailbox = mailbox_on(server, user, ["INBOX", sent, trash, junk])

    report = sync(mailbox)

    subjects = set(Email.objects.filter(mailbox=mailbox).values_list("subject", flat=True))
    assert "Binned" not in subjects and "Spammy" not in subjects, subjects
    assert any("Never synced" in e for e in report.errors), report.errors


def test_outlook_user_syncing_deleted_items_mail_deleted_in_the_crm_stays_deleted(servers):
    """Outlook without SPECIAL-USE, the user lists "Deleted Items" among the folders to sync:
    a mail deleted in the CRM (moved to "Deleted Items" by the CRM itself) must not come back
    on the next sync."""
    server = servers("plain")
    user = server.add_user()
    create(server, user, "Sent Items", "Deleted Items", "Junk Email")
    server.deliver(user, make_message(subject="Delete me"))
    mailbox = mailbox_on(server, user, ["INBOX", "Sent Items", "Deleted Items"])
    sync(mailbox)
    email = email_by_subject(mailbox, "Delete me")

    assert services.email_delete(actor=mailbox.owner, email=email) == "trash"
    sync(mailbox)

    email.refresh_from_db()
    assert email.deleted_at is not None, "the deleted mail is back in the CRM"


def test_explicitly_listed_unflagged_sent_folder_mail_is_shown_as_sent(servers):
    """The user types their folders (INBOX, "Sent Items") on a server without SPECIAL-USE:
    mail in Sent Items, sent from a send-as alias, is still "sent" (it is in the Sent folder
    the CRM itself recognises by name)."""
    server = servers("plain")
    user = server.add_user()
    create(server, user, "Sent Items", "Deleted Items")
    put(server, user, "Sent Items", sent_mail("Quote v1"))
    mailbox = mailbox_on(server, user, ["INBOX", "Sent Items"])

    sync(mailbox)

    assert email_by_subject(mailbox, "Quote v1").direction == Email.Direction.SENT


def test_switching_back_to_default_folders_keeps_sent_recognised_and_stops_relisting(servers):
    """A user first typed ["INBOX", "Sent Items"], later clears the list (default): "Sent
    Items" is the Sent folder from then on (new mail from an alias there is "sent")."""
    server = servers("plain")
    user = server.add_user()
    create(server, user, "Sent Items")
    mailbox = mailbox_on(server, user, ["INBOX", "Sent Items"])
    sync(mailbox)
    Mailbox.objects.filter(pk=mailbox.pk).update(folders=[])
    sync(mailbox)
    put(server, user, "Sent Items", sent_mail("After the switch"))

    sync(mailbox)

    assert synced_folder_names(mailbox) == {"INBOX", "Sent Items"}
    assert MailFolder.objects.get(mailbox=mailbox, name="Sent Items").special_use == "sent"
    assert email_by_subject(mailbox, "After the switch").direction == Email.Direction.SENT


# -- two candidates, case, spaces -------------------------------------------------------------
def test_two_unflagged_sent_candidates_one_choice_consistent_across_runs_and_sending(servers):
    """Both "Sent" and "Sent Items" exist (the user's phone made "Sent", Outlook uses "Sent
    Items"), no flags: one is chosen, the same each run, and the CRM's own sent copy goes
    to the chosen one."""
    from mailsync.sending import _append_to_sent

    server = servers("plain")
    user = server.add_user()
    create(server, user, "Sent Items", "Sent")
    put(server, user, "Sent Items", sent_mail("In Sent Items"))
    put(server, user, "Sent", sent_mail("In Sent"))
    mailbox = mailbox_on(server, user)
    sync(mailbox)
    first = synced_folder_names(mailbox)
    sync(mailbox)
    sync(mailbox)

    assert len(first) == 2 and synced_folder_names(mailbox) == first
    chosen = (first - {"INBOX"}).pop()
    assert _append_to_sent(mailbox, sent_mail("From CRM")) == chosen


def test_flagged_sent_wins_over_a_user_made_sent_name(dovecot, mail_user, imap_mailbox):
    """The testbed's Dovecot flags "Sent" \\Sent; the user also has an unflagged "Sent Items"
    (from an old client): the flagged one is synced, every run."""
    create(dovecot, mail_user, "Sent Items")
    put(dovecot, mail_user, "Sent Items", sent_mail("Old client"))
    sync(imap_mailbox)
    sync(imap_mailbox)
    assert synced_folder_names(imap_mailbox) == {"INBOX", "Sent"}


def test_gmail_flagged_sent_mail_wins_over_an_unflagged_sent(servers):
    """Gmail flags "[Gmail]/Sent Mail"; Thunderbird once created a plain "Sent" label: the
    flagged folder is synced, consistently, and the CRM's sent copy goes there."""
    from mailsync.sending import _append_to_sent

    server = servers("gmail")
    user = server.add_user()
    create(server, user, "Sent")
    flags = server_folders(server, user)
    assert b"\\Sent" in flags["[Gmail]/Sent Mail"] and b"\\All" in flags["[Gmail]/All Mail"], flags
    mailbox = mailbox_on(server, user)
    sync(mailbox)
    sync(mailbox)
    assert synced_folder_names(mailbox) == {"INBOX", "[Gmail]/Sent Mail"}
    assert _append_to_sent(mailbox, sent_mail("From CRM")) == "[Gmail]/Sent Mail"


def test_sent_folder_name_with_a_trailing_space_is_found(servers):
    """A folder "Sent Items " (trailing space, as some Exchange migrations leave): still the
    Sent folder, or at least the user is told no Sent folder was found."""
    server = servers("plain")
    user = server.add_user()
    create(server, user, "Sent Items ")  # Dovecot keeps the name as given
    assert "Sent Items " in server_folders(server, user)
    put(server, user, "Sent Items ", sent_mail("Trailing"))
    mailbox = mailbox_on(server, user)
    report = sync(mailbox)
    assert synced_folder_names(mailbox) == {"INBOX", "Sent Items "} or any(
        "Sent" in e for e in report.errors), (synced_folder_names(mailbox), report.errors)


# -- Trash missing / \Noselect ------------------------------------------------------------------
def test_no_trash_delete_expunges_and_says_so(servers):
    """A server with no Trash at all, and "Trash" only as the \\Noselect parent of
    "Trash/Old": delete expunges (documented), reports "expunged", creates no folder."""
    server = servers("plain")
    user = server.add_user()
    create(server, user, "Sent", "Trash/Old")
    flags = server_folders(server, user)
    assert "Trash" not in flags or any(f in flags["Trash"] for f in (b"\\Noselect", b"\\NonExistent")), flags
    server.deliver(user, make_message(subject="Gone"))
    mailbox = mailbox_on(server, user)
    sync(mailbox)
    before = set(server_folders(server, user))

    outcome = services.email_delete(actor=mailbox.owner, email=email_by_subject(mailbox, "Gone"))

    assert outcome == "expunged"
    assert count_in(server, user, "INBOX") == 0
    assert count_in(server, user, "Trash/Old") == 0
    assert set(server_folders(server, user)) == before
    assert Email.objects.get(mailbox=mailbox, subject="Gone").deleted_at is not None


def test_no_trash_delete_by_api_tells_the_client_it_was_deleted_for_good(servers):
    """Over the API (DELETE emails/{id}/), the page's "deleted in the mailbox too, it has no
    Trash" must be visible to the client somehow (a body or header saying the outcome)."""
    server = servers("plain")
    user = server.add_user()
    create(server, user, "Sent")
    server.deliver(user, make_message(subject="Gone by API"))
    mailbox = mailbox_on(server, user)
    sync(mailbox)
    api = APIClient()
    api.force_authenticate(mailbox.owner)

    response = api.delete(f"/api/v1/emails/{email_by_subject(mailbox, 'Gone by API').pk}/")

    assert response.status_code in (200, 204)
    said = response.content.decode() + " ".join(f"{k}: {v}" for k, v in response.items())
    assert "expunge" in said.lower() or "trash" in said.lower(), (response.status_code, said)


# -- Courier-style '.' hierarchy --------------------------------------------------------------
COURIER = [
    ("courier", "INBOX.Sent", "INBOX.Trash", "INBOX.Junk"),
    ("courier-outlook", "INBOX.Sent Items", "INBOX.Deleted Items", "INBOX.Junk Email"),
    ("courier-icloud-like", "INBOX.Sent Messages", "INBOX.Deleted Messages", "INBOX.spam"),
]


@pytest.mark.parametrize("label,sent,trash,junk", COURIER, ids=[c[0] for c in COURIER])
def test_courier_hierarchy_sent_and_trash(servers, label, sent, trash, junk):
    """Courier/cPanel ('.' separator, everything under "INBOX."): Sent found, a Sent mail is
    "sent", CRM delete goes to the Trash under INBOX."""
    server = servers("courier")
    user = server.add_user()
    create(server, user, sent, trash, junk)
    names = server_folders(server, user)
    assert sent in names and trash in names, names
    server.deliver(user, make_message(subject="Delete me"))
    put(server, user, sent, sent_mail("Courier sent"))
    mailbox = mailbox_on(server, user)

    report = sync(mailbox)
    assert not report.errors, report.errors
    assert synced_folder_names(mailbox) == {"INBOX", sent}
    assert email_by_subject(mailbox, "Courier sent").direction == Email.Direction.SENT
    before = set(server_folders(server, user))
    assert services.email_delete(actor=mailbox.owner, email=email_by_subject(mailbox, "Delete me")) == "trash"
    assert count_in(server, user, trash) == 1
    assert set(server_folders(server, user)) == before


# -- Gmail with flags, All Mail ---------------------------------------------------------------
def test_gmail_defaults_and_delete_to_gmail_trash(servers):
    server = servers("gmail")
    user = server.add_user()
    server.deliver(user, make_message(subject="Hi"))
    put(server, user, "[Gmail]/Spam", make_message(subject="Spam"))
    mailbox = mailbox_on(server, user)
    report = sync(mailbox)
    assert not report.errors
    assert synced_folder_names(mailbox) == {"INBOX", "[Gmail]/Sent Mail"}
    assert services.email_delete(actor=mailbox.owner, email=email_by_subject(mailbox, "Hi")) == "trash"
    assert count_in(server, user, "[Gmail]/Trash") == 1
    assert "Trash" not in server_folders(server, user)


def test_gmail_all_mail_added_no_duplicates_and_delete_is_sane(servers):
    """Gmail shows every mail in "[Gmail]/All Mail" too (same bytes). The user adds All Mail
    to the folders to sync: each mail is one email in the CRM (two places); a sent mail is
    "sent" whichever folder is read first; delete leaves it only in [Gmail]/Trash and it does
    not come back."""
    server = servers("gmail")
    user = server.add_user()
    inbox_raw = make_message(subject="Customer asks", message_id=make_msgid(domain="client.example"))
    sent_raw = sent_mail("We answer")
    put(server, user, "INBOX", inbox_raw)
    put(server, user, "[Gmail]/All Mail", inbox_raw)
    put(server, user, "[Gmail]/Sent Mail", sent_raw, flags=["\\Seen"])
    put(server, user, "[Gmail]/All Mail", sent_raw, flags=["\\Seen"])
    mailbox = mailbox_on(server, user, ["INBOX", "[Gmail]/All Mail", "[Gmail]/Sent Mail"])

    report = sync(mailbox)

    assert not report.errors, report.errors
    assert Email.objects.filter(mailbox=mailbox).count() == 2
    asks = email_by_subject(mailbox, "Customer asks")
    answer = email_by_subject(mailbox, "We answer")
    assert EmailLocation.objects.filter(email=asks).count() == 2
    assert services.email_delete(actor=mailbox.owner, email=asks) == "trash"
    assert count_in(server, user, "INBOX") == 0
    assert count_in(server, user, "[Gmail]/All Mail") == 1  # only the sent mail
    assert count_in(server, user, "[Gmail]/Trash") == 1
    sync(mailbox)
    asks.refresh_from_db()
    assert asks.deleted_at is not None
    assert Email.objects.filter(mailbox=mailbox).count() == 2
    assert answer.direction == Email.Direction.SENT, "sent mail shown as received"


def test_gmail_user_lists_spam_and_trash_they_are_never_synced(servers):
    server = servers("gmail")
    user = server.add_user()
    put(server, user, "[Gmail]/Spam", make_message(subject="Spam"))
    put(server, user, "[Gmail]/Trash", make_message(subject="Bin"))
    mailbox = mailbox_on(server, user, ["INBOX", "[Gmail]/Spam", "[Gmail]/Trash"])
    report = sync(mailbox)
    assert Email.objects.filter(mailbox=mailbox).count() == 0
    assert any("Never synced" in e for e in report.errors), report.errors


# -- move ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,target", [("plain", "Archive"), ("gmail", "[Gmail]/Starred-ish"),
                                         ("courier", "INBOX.Archive")])
def test_crm_move_to_a_provider_folder(servers, kind, target):
    server = servers(kind)
    user = server.add_user()
    create(server, user, target)
    server.deliver(user, make_message(subject="Move me"))
    mailbox = mailbox_on(server, user)
    sync(mailbox)
    email = email_by_subject(mailbox, "Move me")
    services.email_update(actor=mailbox.owner, email=email, folder=target)
    assert count_in(server, user, "INBOX") == 0
    assert count_in(server, user, target) == 1
    sync(mailbox)
    email.refresh_from_db()
    assert email.deleted_at is None
    assert list(EmailLocation.objects.filter(email=email).values_list("folder__name", flat=True)) == [target]


def test_imap_session_names_for_reference(servers):
    """Not a probe: what LIST gives on the plain server (documents the workaround)."""
    server = servers("plain")
    user = server.add_user()
    create(server, user, "Sent Items", "Deleted Items")
    mailbox = mailbox_on(server, user)
    with ImapSession(server_settings(mailbox, timeout=10)) as session:
        # No flags on the wire; the session recognizes the folders by name
        assert dict(session.list_folders()) == {"INBOX": "inbox", "Sent Items": "sent", "Deleted Items": "trash"}
