"""Review session 10: known bugs of the sync engines and of sending, each fixed with a test
that failed before the fix. Against the private Dovecot and the real SMTP test server;
nothing is mocked but the faults a test needs (a cut connection, a lost reply).

Bugs found and fixed:
1. IMAP: a message flagged \\Deleted on the server but not expunged (Thunderbird's or
   Outlook's "mark as deleted" mode) was imported as live mail, and a copy flagged so
   afterwards kept showing; after a folder re-read on a server without UIDPLUS such a copy
   showed as a second place of the mail. Now a mail whose every place is \\Deleted is a
   tombstone (hidden, kept, nothing removed from the server), and it is back once the flag
   is removed; a CRM move takes a live copy, never a \\Deleted one.
2. POP3: the provider's daily download budget was not charged for TOP (the header hashes
   of servers without usable UIDL) nor for the bytes of a RETR the connection cut short.
3. POP3: DELEs applied at a QUIT whose reply was lost left ``deleted_from_server_at`` unset
   for good; the next sync now records it for stored mail no longer listed.
4. Sending: a long non-ASCII display name in From/To/Cc lost a space where Python's email
   package folded the header (the subject's bug, fixed in session 9), and a list of such
   names even had its comma encoded, merging two recipients.
5. Sending: a mail sent from a deal was also linked to every other deal of the contact.

Found here, fixed in test_review_session10_visibility.py (EmailLink.bcc_only, migration
0015): a contact who was only in Bcc had the mail on their record, which told colleagues who
can see that contact that they were sent a blind copy.
"""
from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from email.utils import getaddresses

import pytest

from mailsync.models import Email, EmailLink, Mailbox
from tests.factories import ContactFactory, DealFactory
from tests.mailsync.conftest import filed_by_another_program, imap_sync, make_message
from tests.mailsync.test_review_session9_send import api, box  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db


def addresses(raw: bytes, header: str) -> list[tuple[str, str]]:
    """(display name, address) of a header as a mail program reads it: RFC 2047 6.2, white
    space between two encoded words is not text. (The stdlib's ``policy.default`` address
    parser puts a space there, whoever wrote the header: the legacy API reads it right.)"""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [(str(make_header(decode_header(name))), address)
            for name, address in getaddresses(message.get_all(header, []))]


# == sending ===================================================================================

# -- 4. long non-ASCII display names ---------------------------------------------------------
# Names whose header Python 3.11's folding broke (found by sending random ones): "Zoë Ärger
# Département..." arrived as "ZoëÄrgerDépartement...".
NAMES = [
    "Jürgen Żółkiewski Département Comptabilité Département Comptabilité",
    "Zoë Ärger Département Comptabilité Qualitätssicherung",
    "Jürgen Kühn Leiterin Öffentlichkeitsarbeit Département Comptabilité",
    "Łukasz Größe-Müller Vertriebsleitung Süd Geschäftsführung",
]


def test_long_non_ascii_names_in_from_to_and_cc_reach_the_recipient_with_their_spaces(
        api, box, smtp_outbox, django_capture_on_commit_callbacks):
    """BUG (fixed). Given a salesperson whose sending name is long and not ASCII; when they
    send to two customers and copy two more, each with a long name in their language, then
    the recipient's mail program shows every name as typed (no two words glued together
    where the header was folded), and the mail on the record shows them so too."""
    box.display_name = "Geschäftsführerin Ánna Ruíz de la Peña Vertriebsleitung Süd Österreich"
    box.save()
    to = [(NAMES[0], "a@client.example"), (NAMES[1], "b@client.example")]
    cc = [(NAMES[2], "c@client.example"), (NAMES[3], "d@client.example")]
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": [f'"{n}" <{a}>' for n, a in to],
            "cc": ", ".join(f'"{n}" <{a}>' for n, a in cc),
            "subject": "Angebot", "text": "x"}, format="json")
    assert response.status_code == 202, response.content

    [received] = smtp_outbox.wait_for(1)
    assert addresses(received.raw, "From") == [(box.display_name, box.email_address)]
    assert addresses(received.raw, "To") == to
    assert addresses(received.raw, "Cc") == cc
    assert sorted(r.lower() for r in received.rcpt_tos) == [a for _, a in to + cc]
    assert max(len(line) for line in received.raw.split(b"\r\n\r\n")[0].split(b"\r\n")) <= 78
    stored = Email.objects.get(pk=response.json()["id"])
    assert stored.from_name == box.display_name
    assert [(a["name"], a["email"]) for a in stored.to] == to
    assert [(a["name"], a["email"]) for a in stored.cc] == cc


# -- 5. a mail sent from a deal ---------------------------------------------------------------
def test_a_mail_sent_from_a_deal_is_on_that_deal_and_the_contact_not_on_the_contacts_other_deals(
        api, box, smtp_outbox, django_capture_on_commit_callbacks):
    """BUG (fixed). Given a contact with two deals (a renewal and a new project); when the
    salesperson sends a quote from the renewal deal, then the quote is on the renewal deal
    and on the contact, and not on the new-project deal (whose page would else list a quote
    that does not belong to it)."""
    contact = ContactFactory(owner=box.owner, email="grace@navy.example")
    renewal = DealFactory(owner=box.owner, contact=contact)
    project = DealFactory(owner=box.owner, contact=contact)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": "grace@navy.example",
            "subject": "Renewal quote", "text": "x", "deal": renewal.pk}, format="json")
    assert response.status_code == 202, response.content
    smtp_outbox.wait_for(1)
    sent = response.json()["id"]

    on_renewal = api.get("/api/v1/emails/", {"deal": renewal.pk}).json()["results"]
    on_project = api.get("/api/v1/emails/", {"deal": project.pk}).json()["results"]
    on_contact = api.get("/api/v1/emails/", {"contact": contact.pk}).json()["results"]
    assert [e["id"] for e in on_renewal] == [sent]
    assert [e["id"] for e in on_contact] == [sent]
    assert on_project == []
    # ... also once the Sent-folder copy is synced (the same email, nothing re-linked).
    from mailsync.sync.imap import ImapSync
    box.refresh_from_db()
    ImapSync(box, timeout=10).run()
    assert not EmailLink.objects.filter(deal=project).exists()
    assert EmailLink.objects.filter(email_id=sent, deal=renewal).exists()


# == POP3 ======================================================================================

@pytest.fixture(params=["thread", "process"])
def pop3_fetch_mode(request, settings) -> str:
    """Both ways, as the other POP3 tests: the session in this process, or in a child."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0 if request.param == "thread" else 1
    return request.param


def pop3_sync(mailbox: Mailbox, **kwargs):
    from mailsync.sync.pop3 import Pop3Sync

    mailbox.refresh_from_db()
    return Pop3Sync(mailbox, timeout=10, **kwargs).run()


def budget_used(mailbox: Mailbox) -> int:
    return Mailbox.objects.values_list("budget_bytes_used", flat=True).get(pk=mailbox.pk)


def on_gmail(mailbox: Mailbox) -> Mailbox:
    """A provider with a daily download limit (Gmail: 2.5 GB), nothing used yet today."""
    from django.utils import timezone

    Mailbox.objects.filter(pk=mailbox.pk).update(provider="gmail", budget_bytes_used=0,
                                                 budget_day=timezone.now().date())
    mailbox.refresh_from_db()
    return mailbox


# -- 2. the daily budget counts TOP and cut RETRs --------------------------------------------
def test_header_reads_of_a_server_without_uidl_count_against_the_daily_limit(
        dovecot, mail_user, pop3_mailbox, settings):
    """BUG (fixed). Given a Gmail mailbox (a daily download limit) on a server without UIDL,
    mail left on the server; when the CRM checks it again and again (every 5 minutes), then
    each check's header reads (TOP, to tell the messages apart) count against the day's
    limit, as they do at the provider: the CRM pauses before the provider locks the account
    out, instead of believing nothing was downloaded."""
    import re

    from mailsync.protocols.pop3 import Pop3Listing, Pop3Session

    class NoUidl(Pop3Session):
        def listing(self) -> list[Pop3Listing]:
            return [Pop3Listing(i.number, i.size, None) for i in super().listing()]

    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0  # the session subclass runs here
    pop3_mailbox.pop3_delete_after_download = False
    pop3_mailbox.save()
    on_gmail(pop3_mailbox)
    heads = 0
    for i in range(3):
        raw = make_message(subject=f"Kept {i}", body="x" * 2000)
        heads += len(re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0])
        dovecot.deliver(mail_user, raw)
    pop3_sync(pop3_mailbox, session_factory=NoUidl)
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 3
    before = budget_used(pop3_mailbox)

    report = pop3_sync(pop3_mailbox, session_factory=NoUidl)

    assert report.new == 0  # nothing new, but every header block was read again
    assert budget_used(pop3_mailbox) - before >= heads


def test_a_retr_cut_by_the_connection_counts_against_the_daily_limit(
        dovecot, mail_user, pop3_mailbox, fault_proxy, monkeypatch, pop3_fetch_mode):
    """BUG (fixed). Given a Gmail mailbox (a daily download limit) with large mail; when the
    connection drops in the middle of a download, then what came over the wire before the
    drop counts against the day's limit (the provider counted it), not only the messages
    that were stored; and the next sync still stores every message once."""
    import os

    from mailsync.exceptions import MailServerUnreachable
    from mailsync.sync import pop3 as engine

    big = os.urandom(150_000)
    for i in range(10):
        dovecot.deliver(mail_user, make_message(
            subject=f"Big {i}", attachment=("specs.bin", big, "application/octet-stream")))
    proxy = fault_proxy(dovecot.host, dovecot.pop3s_port)
    pop3_mailbox.incoming_port = proxy.port
    pop3_mailbox.save()
    on_gmail(pop3_mailbox)
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    proxy.cut_after(1_000_000, direction="down")  # inside a RETR of the second batch

    with pytest.raises(MailServerUnreachable):
        pop3_sync(pop3_mailbox)

    stored = sum(Email.objects.filter(mailbox=pop3_mailbox).values_list("size", flat=True))
    assert 0 < stored < proxy.bytes_down
    # What came down, but for the TLS framing and the partial last record: counted.
    assert budget_used(pop3_mailbox) >= 0.9 * proxy.bytes_down
    proxy.reset()
    pop3_sync(pop3_mailbox)
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 10


# -- 3. QUIT applied but its reply lost --------------------------------------------------------
def test_mail_removed_at_a_quit_whose_reply_was_lost_is_recorded_as_removed_next_time(
        dovecot, mail_user, pop3_mailbox, settings):
    """BUG (fixed). Given a mailbox that removes mail from the server once stored; when the
    connection drops right after QUIT, after the server applied the deletions but before its
    answer came, then the next sync records those mails as removed from the server (they no
    longer are listed), downloads nothing again, and a mail that came meanwhile is stored
    before it is removed: nothing is lost."""
    from mailsync.exceptions import MailServerUnreachable
    from mailsync.models import Pop3Message
    from mailsync.protocols.pop3 import Pop3Session
    from tests.mailsync.conftest import wait_for

    class QuitReplyLost(Pop3Session):
        def quit(self) -> None:
            self._client()._putcmd("QUIT")
            # The server removes the marked messages and answers; the answer is lost with
            # the connection.
            wait_for(lambda: dovecot.folder_state(mail_user).count == 0, 10)
            self.abandon()
            raise MailServerUnreachable(f"The connection to {self.settings.host} was lost.")

    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0  # the session subclass runs here
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Order {i}"))
    with pytest.raises(MailServerUnreachable):
        pop3_sync(pop3_mailbox, session_factory=QuitReplyLost)
    assert dovecot.folder_state(mail_user).count == 0  # removed from the server
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 3  # stored first
    dovecot.deliver(mail_user, make_message(subject="Meanwhile"))

    report = pop3_sync(pop3_mailbox)

    assert report.new == 1 and dovecot.folder_state(mail_user).count == 0
    assert sorted(Email.objects.filter(mailbox=pop3_mailbox).values_list("subject", flat=True)) == [
        "Meanwhile", "Order 0", "Order 1", "Order 2"]
    assert not Pop3Message.objects.filter(mailbox=pop3_mailbox,
                                          deleted_from_server_at__isnull=True).exists()
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == Mailbox.State.COMPLETED


# == IMAP: copies marked \Deleted ==============================================================

def visible(mailbox: Mailbox) -> list[str]:
    """The subjects the CRM shows (tombstones left out), once per email row."""
    return sorted(Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))


def uid_of(dovecot, user, folder: str, subject: str) -> int:
    from tests.mailsync.test_two_connections_per_mailbox import client

    with client(dovecot, user) as c:
        c.select_folder(folder, readonly=True)
        [uid] = c.search(["SUBJECT", subject])
    return uid


def test_mail_marked_deleted_in_a_mail_program_is_not_shown_and_comes_back_when_unmarked(
        dovecot, mail_user, imap_mailbox):
    """BUG (fixed). Given Thunderbird (or Outlook) in "mark as deleted" mode on the same
    account: a deleted mail stays in INBOX flagged \\Deleted until the folder is compacted.
    When the CRM syncs for the first time, then that mail is not shown as live mail; when a
    new mail arrives already marked, or a shown mail is marked later, then it is not shown
    either; when the user takes the mark off (undelete), then it is back, as the same email;
    and nothing is ever removed from the server by the CRM (nor purged from the CRM while
    the marked copy is there)."""
    dovecot.append(mail_user, "INBOX", make_message(subject="Customer"))
    dovecot.append(mail_user, "INBOX", make_message(subject="Binned"), flags=["\\Deleted", "\\Seen"])

    imap_sync(imap_mailbox)
    assert visible(imap_mailbox) == ["Customer"]

    dovecot.append(mail_user, "INBOX", make_message(subject="Arrived marked"), flags=["\\Deleted"])
    dovecot.set_flags(mail_user, "INBOX", uid_of(dovecot, mail_user, "INBOX", "Customer"), ["\\Deleted"])
    imap_sync(imap_mailbox)
    assert visible(imap_mailbox) == []
    assert dovecot.folder_state(mail_user).count == 3  # nothing removed from the server
    from mailsync import services
    services.emails_purge_tombstones(older_than_days=0)  # the retention purge keeps them

    for subject in ("Binned", "Customer"):  # undeleted in the mail program
        dovecot.set_flags(mail_user, "INBOX", uid_of(dovecot, mail_user, "INBOX", subject), ["\\Seen"])
    imap_sync(imap_mailbox)
    assert visible(imap_mailbox) == ["Binned", "Customer"]
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 3  # no duplicates
    assert Email.objects.get(mailbox=imap_mailbox, subject="Binned").seen


def test_a_crm_move_of_a_mail_moved_by_thunderbird_without_expunge_takes_the_live_copy(
        dovecot, mail_user, imap_mailbox):
    """BUG (fixed). Given a mail in INBOX that Thunderbird, in "mark as deleted" mode, then
    filed into "Projects" (a copy there, the INBOX copy flagged \\Deleted); when the user
    files it from the CRM into "Archive", then the copy that goes to Archive is the live one
    (the \\Deleted copy would carry its mark there, and Thunderbird's next compaction would
    erase the only copy left); after the next sync the CRM shows it in Archive."""
    from mailsync import services
    from mailsync.models import EmailLocation
    from tests.mailsync.test_two_connections_per_mailbox import client

    with client(dovecot, mail_user) as c:
        c.create_folder("Archive")
    email = filed_by_another_program(dovecot, mail_user, imap_mailbox, "Filed")
    assert email.deleted_at is None  # shown, from Projects

    services.email_update(actor=imap_mailbox.owner, email=email, folder="Archive")
    imap_sync(imap_mailbox)

    archived = dovecot.folder_state(mail_user, "Archive").messages
    assert len(archived) == 1 and not any("\\Deleted" in flags for _, flags in archived)
    email.refresh_from_db()
    assert email.deleted_at is None
    assert sorted(EmailLocation.objects.filter(email=email).values_list("folder__name", flat=True)) == ["Archive"]
