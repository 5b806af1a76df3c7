"""The mailbox's size limit ("larger messages are imported as their headers") as a user sees it
when it changes, and Retry honouring it; against the private Dovecot."""
from __future__ import annotations

from unittest import mock

import pytest

from mailsync import services
from mailsync.models import Attachment, Email, EmailLink, Mailbox, MessageError
from mailsync.selectors import mailbox_status
from mailsync.storage import decompress
from mailsync.sync.imap import ImapSync
from tests.factories import ContactFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db

BIG = b"%PDF-1.4 " + bytes(range(256)) * 1200  # ~300 KB attachment


def sync(mailbox: Mailbox):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def parse_all(mailbox: Mailbox) -> None:
    while services.emails_parse_pending(mailbox_id=mailbox.pk):
        pass


def open_notices(mailbox: Mailbox) -> list[str]:
    return [e["error"] for e in mailbox_status(mailbox=mailbox)["message_errors"]]


def test_raising_the_limit_downloads_headers_only_mail_whole(dovecot, mail_user, imap_mailbox,
                                                              django_capture_on_commit_callbacks):
    """A 300 KB mail over a 100 KB limit shows as headers only with a notice. The user raises
    the limit: a sync starts by itself, and the same email (its link to the contact, its
    place, its read state kept) now has its body and attachment; the notice is gone. Nothing
    is downloaded twice by the runs after it, and the mail stays on the server."""
    contact = ContactFactory(email="customer@client.example", owner=imap_mailbox.owner)
    imap_mailbox.max_message_bytes = 100_000
    imap_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Quote PDF", body="Please find the quote.",
                                            attachment=("quote.pdf", BIG, "application/pdf")))
    dovecot.deliver(mail_user, make_message(subject="Small"))
    sync(imap_mailbox)
    parse_all(imap_mailbox)
    huge = Email.objects.get(mailbox=imap_mailbox, subject="Quote PDF")
    assert huge.truncated and not huge.has_attachments
    assert EmailLink.objects.filter(email=huge, contact=contact).exists()
    assert len(open_notices(imap_mailbox)) == 1
    # A second run with the limit unchanged downloads nothing more.
    assert sync(imap_mailbox).completed == 0

    with django_capture_on_commit_callbacks() as queued:
        services.mailbox_update(actor=imap_mailbox.owner, mailbox=imap_mailbox,
                                data={"max_message_bytes": 1_000_000}, check_connection=False)
    assert queued, "raising the limit queues a sync"

    report = sync(imap_mailbox)
    assert report.completed == 1 and report.new == 0
    parse_all(imap_mailbox)
    whole = Email.objects.get(pk=huge.pk)
    assert not whole.truncated
    assert len(decompress(whole.source_data.compressed())) > 300_000
    assert "Please find the quote." in whole.text
    assert whole.has_attachments
    assert [(a.filename, a.size) for a in Attachment.objects.filter(email=whole)] == [("quote.pdf", len(BIG))]
    assert EmailLink.objects.filter(email=whole, contact=contact).exists()
    assert whole.locations.count() == 1
    assert open_notices(imap_mailbox) == []
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 2

    again = sync(imap_mailbox)
    assert (again.completed, again.new) == (0, 0)
    assert dovecot.folder_state(mail_user).count == 2


def test_a_limit_raised_but_still_too_low_changes_nothing(dovecot, mail_user, imap_mailbox):
    imap_mailbox.max_message_bytes = 50_000
    imap_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Big", attachment=("a.pdf", BIG, "application/pdf")))
    sync(imap_mailbox)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(max_message_bytes=200_000)
    assert sync(imap_mailbox).completed == 0
    assert Email.objects.get(subject="Big").truncated
    assert len(open_notices(imap_mailbox)) == 1


def test_retry_honours_the_size_limit(dovecot, mail_user, imap_mailbox, monkeypatch):
    """A message that failed to store is fetched again by Retry; over the mailbox's limit it
    comes as its headers with the notice, as in any sync (found in review: Retry fetched it
    whole, whatever its size)."""
    imap_mailbox.max_message_bytes = 100_000
    imap_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Huge", attachment=("a.pdf", BIG, "application/pdf")))
    from mailsync.sync import ingest

    real_store = ingest._store

    def failing(mailbox, folder, uidvalidity, prepared, *rest):
        raise ValueError("simulated storage failure")

    monkeypatch.setattr(ingest, "_store", failing)
    assert sync(imap_mailbox).failed == 1
    monkeypatch.setattr(ingest, "_store", real_store)

    fetched_whole = []
    from mailsync.protocols.imap import ImapSession

    real_fetch = ImapSession.fetch_messages

    def spy(self, uids, **kwargs):
        fetched_whole.extend(uids)
        return real_fetch(self, uids, **kwargs)

    with mock.patch.object(ImapSession, "fetch_messages", spy):
        result = services.mailbox_retry_failed(actor=imap_mailbox.owner, mailbox=imap_mailbox)
    assert result["refetched"] == 1
    assert fetched_whole == []
    email = Email.objects.get(subject="Huge")
    assert email.truncated and len(decompress(email.source_data.compressed())) < 5_000
    notices = open_notices(imap_mailbox)
    assert len(notices) == 1 and "only its headers" in notices[0]
    assert not MessageError.objects.filter(error__startswith="Could not store", resolved_at__isnull=True).exists()


def test_retrying_a_failed_parse_does_not_list_attachments_twice(dovecot, mail_user, imap_mailbox):
    """Retry parses failed mails again; their attachments were listed by the first parse and
    must not appear twice on the mail (found in review)."""
    dovecot.deliver(mail_user, make_message(subject="With PDF", attachment=("q.pdf", b"%PDF-1.4 x", "application/pdf")))
    sync(imap_mailbox)
    parse_all(imap_mailbox)
    email = Email.objects.get(subject="With PDF")
    assert Attachment.objects.filter(email=email).count() == 1
    Email.objects.filter(pk=email.pk).update(parse_state=Email.ParseState.FAILED, parse_error="x")
    services.mailbox_retry_failed(actor=imap_mailbox.owner, mailbox=imap_mailbox)
    assert Attachment.objects.filter(email=email).count() == 1
    assert Email.objects.get(pk=email.pk).parse_state == Email.ParseState.PARSED


@pytest.mark.parametrize("fetch_mode", ["thread", "process"])
def test_pop3_raising_the_limit_downloads_the_message_whole_then_removes_it(
        dovecot, mail_user, settings, fetch_mode):
    """POP3, "remove from the server after download": a message over the limit was imported
    as headers and left on the server. Once the limit is raised the next download completes
    the same email (body, attachment, no notice), and only then may the mode remove it."""
    from mailsync.sync.pop3 import Pop3Sync
    from tests.factories import MailboxFactory, UserFactory

    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0 if fetch_mode == "thread" else 1
    box = MailboxFactory(owner=UserFactory(), email_address=mail_user.email, protocol=Mailbox.Protocol.POP3,
                         incoming_host=dovecot.host, incoming_port=dovecot.pop3s_port, incoming_security="ssl",
                         username=mail_user.username, password=mail_user.password, is_active=True,
                         max_message_bytes=100_000)
    dovecot.deliver(mail_user, make_message(subject="Scan", body="The signed scan.",
                                            attachment=("scan.pdf", BIG, "application/pdf")))

    def pop3_sync():
        box.refresh_from_db()
        return Pop3Sync(box, timeout=10).run()

    pop3_sync()
    email = Email.objects.get(mailbox=box, subject="Scan")
    assert email.truncated and dovecot.folder_state(mail_user).count == 1
    assert pop3_sync().completed == 0  # limit unchanged: nothing downloaded again

    Mailbox.objects.filter(pk=box.pk).update(max_message_bytes=1_000_000)
    report = pop3_sync()
    assert (report.completed, report.new) == (1, 0)
    parse_all(box)
    whole = Email.objects.get(pk=email.pk)
    assert not whole.truncated and "The signed scan." in whole.text
    assert [a.filename for a in Attachment.objects.filter(email=whole)] == ["scan.pdf"]
    assert open_notices(box) == []
    assert Email.objects.filter(mailbox=box).count() == 1
    # Stored whole: the mode removes it from the server now (on the run after the one
    # that stored it, as for any message whose DELE follows the commit).
    pop3_sync()
    assert dovecot.folder_state(mail_user).count == 0
    assert Email.objects.filter(mailbox=box).count() == 1
