"""Large POP3 maildrops against the private Dovecot: what users connect (Gmail's POP, ISP
mailboxes that keep mail on the server: 20,000-100,000 messages) must download exactly, in
both modes, through a cut connection and a paused day, with nothing removed from the server
before it is stored.

The maildrop is written straight into the Maildir (``DovecotServer.fill_maildir``), so the
counts can be above what matters (UIDL and LIST replies of a few hundred KB, ten thousand
pipelined DELEs, keys looked up in chunks of ``KNOWN_CHUNK``, 5,000) while the file stays
well under a minute on 2 cores (the counts were 2-3 times these until session 10: the same
paths, three times the CI time).
"""
from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.db.models import Count
from django.utils import timezone

from mailsync import services
from mailsync.exceptions import MailServerUnreachable
from mailsync.models import Email, Mailbox, Pop3Message
from mailsync.sync.base import SyncReport
from mailsync.sync.pop3 import Pop3Sync
from tests.testbed.dovecot import DovecotServer, DovecotUser, running_dovecot

pytestmark = pytest.mark.django_db

OWNER = "sales@example.test"
MEMORY = Path("/dev/shm")
GMAIL_BUDGET = int(2.5 * 1024**3)


@pytest.fixture(scope="module")
def dovecot(test_ca) -> Iterator[DovecotServer]:  # noqa: ANN001
    """This module's own Dovecot, its mail in memory where the system has a tmpfs."""
    with running_dovecot(test_ca, prefix="mailroom-pop3-scale-",
                         parent=MEMORY if MEMORY.is_dir() else None) as server:
        yield server




def message(n: int) -> bytes:
    """A small message (~450 bytes), unique by Message-ID and subject."""
    customer = f"customer{n % 997}@client{n % 13}.example"
    return (
        f"From: Customer {n % 997} <{customer}>\r\n"
        f"To: {OWNER}\r\n"
        f"Subject: Order {n}\r\n"
        f"Date: Mon, {1 + n % 28} Jun 2020 {n % 24:02d}:{n % 60:02d}:00 +0000\r\n"
        f"Message-ID: <p{n}@client.example>\r\n"
        "\r\n"
        f"Please send a quote for item {n * 7}.\r\n"
        f".A line that starts with a dot, byte-stuffed over POP3 ({n}).\r\n"
        "Thanks.\r\n"
    ).encode()


def fill(dovecot: DovecotServer, user: DovecotUser, numbers: range) -> int:
    """The maildrop holds these messages (UIDs 1..n); returns their total size (CRLF)."""
    dovecot.fill_maildir(user, "INBOX", ((i + 1, message(n), "") for i, n in enumerate(numbers)))
    return sum(len(message(n)) for n in numbers)


def arrive(dovecot: DovecotServer, user: DovecotUser, numbers: range) -> None:
    """New mail, appended in one IMAP session (a login per message would be minutes)."""
    imap = dovecot.imap_login(user)
    try:
        for n in numbers:
            typ, data = imap.append("INBOX", None, None, message(n))
            assert typ == "OK", data
    finally:
        imap.logout()


def sync(mailbox: Mailbox) -> SyncReport:
    mailbox.refresh_from_db()
    return Pop3Sync(mailbox, timeout=60).run()


def on_server(dovecot: DovecotServer, user: DovecotUser) -> int:
    return dovecot.folder_state(user).count


def stored_orders(mailbox: Mailbox) -> list[int]:
    """The order numbers in the CRM, once per email (sorted; a duplicate shows twice)."""
    return sorted(int(s.split()[1]) for s in Email.objects.filter(mailbox=mailbox)
                  .values_list("subject", flat=True))


def assert_stored_once(mailbox: Mailbox, numbers: range | list[int]) -> None:
    assert stored_orders(mailbox) == sorted(numbers)
    twice = (Email.objects.filter(mailbox=mailbox).values("message_id")
             .annotate(n=Count("id")).filter(n__gt=1))
    assert not twice.exists(), list(twice[:5])
    assert Pop3Message.objects.filter(mailbox=mailbox).count() == len(numbers)


def assert_completed(mailbox: Mailbox) -> None:
    mailbox.refresh_from_db()
    assert (mailbox.state, mailbox.last_error) == (Mailbox.State.COMPLETED, "")


def removed_from_server(mailbox: Mailbox) -> int:
    return Pop3Message.objects.filter(mailbox=mailbox, deleted_from_server_at__isnull=False).count()



def assert_rest_downloaded_and_removed(dovecot, mail_user, mailbox: Mailbox, report,  # noqa: ANN001
                                       total: int, stored: int) -> None:
    """The run after an interrupted one stored exactly the rest (messages 0..total-1 each
    once) and, in delete mode, emptied the server."""
    assert (report.new, report.located, report.failed, report.errors) == (total - stored, 0, 0, [])
    assert_completed(mailbox)
    assert mailbox.messages_done == mailbox.messages_total == total - stored
    assert_stored_once(mailbox, range(total))
    assert on_server(dovecot, mail_user) == 0
    assert removed_from_server(mailbox) == total

def test_large_maildrop_left_on_the_server_then_new_mail_deletions_elsewhere_and_expiry(
        dovecot, mail_user, pop3_mailbox, fault_proxy):
    """12,000 messages kept on the server: downloaded once, a resync downloads none of them
    again, new mail alone is downloaded (also after another client deleted thousands, which
    renumbers the maildrop), and when their N days are up they all leave the server."""
    total = 12_000
    size = fill(dovecot, mail_user, range(total))
    proxy = fault_proxy(dovecot.host, dovecot.pop3s_port)  # transparent: it counts bytes
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(
        pop3_delete_after_download=False, incoming_port=proxy.port)

    report = sync(pop3_mailbox)

    assert (report.new, report.located, report.failed, report.errors) == (total, 0, 0, [])
    assert_completed(pop3_mailbox)
    assert_stored_once(pop3_mailbox, range(total))
    assert pop3_mailbox.messages_done == pop3_mailbox.messages_total == total
    assert pop3_mailbox.bytes_done == pop3_mailbox.bytes_total == size
    assert set(Pop3Message.objects.filter(mailbox=pop3_mailbox).values_list("key_kind", flat=True)) == {"uidl"}
    assert on_server(dovecot, mail_user) == total and removed_from_server(pop3_mailbox) == 0

    # Nothing new: only LIST and UIDL come down (~0.3 MB), not the ~5 MB of mail.
    before = proxy.bytes_down
    report = sync(pop3_mailbox)
    assert (report.new, report.located, report.failed) == (0, 0, 0)
    assert proxy.bytes_down - before < size // 5
    assert_completed(pop3_mailbox)
    assert on_server(dovecot, mail_user) == total

    # New mail arrives: only it is downloaded.
    arrive(dovecot, mail_user, range(total, total + 500))
    report = sync(pop3_mailbox)
    assert (report.new, report.located, report.failed) == (500, 0, 0)
    assert_completed(pop3_mailbox)
    assert pop3_mailbox.messages_done == pop3_mailbox.messages_total == 500
    assert_stored_once(pop3_mailbox, range(total + 500))

    # Another client deletes every sixth message (the rest are renumbered) while more
    # arrives: the new mail comes down, under its own subject; the CRM keeps every copy.
    gone = list(range(1, total + 1, 6))
    dovecot.doveadm("expunge", "-u", mail_user.username, "mailbox", "INBOX",
                    "uid", ",".join(map(str, gone)))
    arrive(dovecot, mail_user, range(total + 500, total + 950))
    report = sync(pop3_mailbox)
    assert (report.new, report.located, report.failed) == (450, 0, 0)
    assert_completed(pop3_mailbox)
    assert_stored_once(pop3_mailbox, range(total + 950))
    assert not Email.objects.filter(mailbox=pop3_mailbox, deleted_at__isnull=False).exists()
    left = total + 950 - len(gone)
    assert on_server(dovecot, mail_user) == left

    # Kept 7 days, now past for all of them: every copy on the server goes (~10,000 DELE
    # in one session), none is downloaded again, and the CRM records which left.
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(pop3_keep_days=7)
    Pop3Message.objects.filter(mailbox=pop3_mailbox).update(downloaded_at=timezone.now() - timedelta(days=8))
    report = sync(pop3_mailbox)
    assert (report.new, report.located, report.failed) == (0, 0, 0)
    assert_completed(pop3_mailbox)
    assert on_server(dovecot, mail_user) == 0
    # Those the other client deleted are recorded as gone too, once the mode would have
    # removed them (no longer listed: the check for a QUIT whose reply was lost).
    assert removed_from_server(pop3_mailbox) == total + 950
    assert_stored_once(pop3_mailbox, range(total + 950))


def test_remove_after_download_cut_midway_twice_then_rerun_loses_and_duplicates_nothing(
        dovecot, mail_user, pop3_mailbox, fault_proxy):
    """10,000 messages removed after download; the connection is cut in the middle of the
    download, then again in the middle of the rerun (after its DELE of what the first run
    stored). Nothing leaves the server without QUIT; the third run ends with every message
    stored once and the maildrop empty."""
    total = 10_000
    size = fill(dovecot, mail_user, range(total))
    proxy = fault_proxy(dovecot.host, dovecot.pop3s_port)
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(incoming_port=proxy.port)

    stored = 0
    for cut_at in (size // 3, size // 2):
        proxy.cut_after(cut_at, direction="down")
        with pytest.raises(MailServerUnreachable):
            sync(pop3_mailbox)
        proxy.reset()
        now = Email.objects.filter(mailbox=pop3_mailbox).count()
        assert stored < now < total
        stored = now
        assert Pop3Message.objects.filter(mailbox=pop3_mailbox).count() == stored
        assert on_server(dovecot, mail_user) == total  # no QUIT: no DELE took effect
        assert removed_from_server(pop3_mailbox) == 0
        pop3_mailbox.refresh_from_db()
        assert (pop3_mailbox.state, pop3_mailbox.last_error_code) == ("error", "unreachable")

    report = sync(pop3_mailbox)

    assert_rest_downloaded_and_removed(dovecot, mail_user, pop3_mailbox, report, total, stored)


def test_daily_budget_reached_in_a_large_maildrop_pauses_then_resumes_the_next_day(
        dovecot, mail_user, pop3_mailbox):
    """A Gmail POP mailbox whose day's 2.5 GB are nearly spent: the download pauses (not an
    error) with the progress right, only what was stored left the server; the next day the
    rest comes down, each message once."""
    total = 6_000
    size = fill(dovecot, mail_user, range(total))
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(
        provider="gmail", budget_day=timezone.now().date(), budget_bytes_used=GMAIL_BUDGET - size // 3)

    report = sync(pop3_mailbox)

    pop3_mailbox.refresh_from_db()
    assert (pop3_mailbox.state, pop3_mailbox.last_error, report.failed) == (Mailbox.State.PAUSED, "", 0)
    assert pop3_mailbox.paused_until is not None
    stored = Email.objects.filter(mailbox=pop3_mailbox).count()
    assert report.new == stored and total // 3 <= stored < total
    assert pop3_mailbox.messages_total == total and pop3_mailbox.bytes_total == size
    assert pop3_mailbox.messages_done == stored
    assert pop3_mailbox.budget_bytes_used >= GMAIL_BUDGET
    assert on_server(dovecot, mail_user) == total - stored
    assert removed_from_server(pop3_mailbox) == stored
    stored_numbers = stored_orders(pop3_mailbox)
    assert len(set(stored_numbers)) == stored

    # The next day.
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(
        budget_day=timezone.now().date() - timedelta(days=1), paused_until=timezone.now())
    report = sync(pop3_mailbox)

    assert_rest_downloaded_and_removed(dovecot, mail_user, pop3_mailbox, report, total, stored)


def test_server_that_renumbers_its_uidls_gets_its_maildrop_downloaded_again_stored_once(
        dovecot, mail_user, pop3_mailbox):
    """An index rebuild or a migration on the provider's side gives every message a new
    UIDL: a mailbox kept on the server is then downloaded again. Each message is found
    in the CRM (by its fingerprint), none is stored twice, and what the user did in the CRM
    stays (a deleted mail is not brought back, a read one stays read)."""
    total = 6_000
    fill(dovecot, mail_user, range(total))
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(pop3_delete_after_download=False)
    assert sync(pop3_mailbox).new == total
    owner = pop3_mailbox.owner
    deleted, read = Email.objects.filter(mailbox=pop3_mailbox).order_by("pk")[:2]
    services.email_delete(actor=owner, email=deleted)
    services.email_update(actor=owner, email=read, seen=True)
    keys = set(Pop3Message.objects.filter(mailbox=pop3_mailbox).values_list("key", flat=True))

    dovecot.reset_uidvalidity(mail_user)  # the UIDLs embed it: all new
    report = sync(pop3_mailbox)

    assert (report.new, report.located, report.failed, report.errors) == (0, total, 0, [])
    assert_completed(pop3_mailbox)
    assert pop3_mailbox.messages_done == pop3_mailbox.messages_total == total
    assert stored_orders(pop3_mailbox) == list(range(total))
    assert Pop3Message.objects.filter(mailbox=pop3_mailbox).count() == 2 * total
    # The new keys point at the emails the old ones did.
    renewed = Pop3Message.objects.filter(mailbox=pop3_mailbox).exclude(key__in=keys)
    assert renewed.count() == total
    assert set(renewed.values_list("email_id", flat=True)) == set(
        Email.objects.filter(mailbox=pop3_mailbox).values_list("pk", flat=True))
    assert list(Email.objects.filter(mailbox=pop3_mailbox, deleted_at__isnull=False)
                .values_list("pk", flat=True)) == [deleted.pk]
    assert list(Email.objects.filter(mailbox=pop3_mailbox, seen=True).values_list("pk", flat=True)) == [read.pk]
    assert on_server(dovecot, mail_user) == total

    # The new keys are known from now on: the next check downloads nothing.
    report = sync(pop3_mailbox)
    assert (report.new, report.located) == (0, 0)
