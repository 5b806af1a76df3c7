"""Large mailboxes against the private Dovecot: what real users connect (Gmail, Outlook:
50,000-300,000 messages, UIDs far apart after years of deletions) must sync exactly.

The folders are written straight into the Maildir with the UIDs chosen here
(``DovecotServer.fill_maildir``: ~15,000 messages a second) so that the UID sets the sync
sends cannot be compressed into ranges, as in an old mailbox. Counts stay bounded (the file
runs in ~45 s on 2 cores) but above the limits that matter: Dovecot refuses a command line
over 64 KB (``imap_max_line_length``), imaplib a reply line over 1 MB (its default).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path

import pytest
from django.db.models import Count
from django.utils import timezone

from mailsync import services
from mailsync.models import Email, EmailLocation, MailFolder, Mailbox
from mailsync.protocols.imap import ImapSession
from mailsync.sync.imap import ImapSync, SyncReport
from tests.testbed.dovecot import DovecotServer, running_dovecot

pytestmark = pytest.mark.django_db

OWNER = "sales@example.test"
MEMORY = Path("/dev/shm")


@pytest.fixture(scope="module")
def dovecot(test_ca) -> Iterator[DovecotServer]:  # noqa: ANN001
    """This module's own Dovecot, its mail in memory where the system has a tmpfs: creating
    the 150,000 small files of these tests took ~25 s on this VM's disk, ~2 s on tmpfs."""
    with running_dovecot(test_ca, prefix="mailroom-scale-", parent=MEMORY if MEMORY.is_dir() else None) as server:
        yield server


def message(n: int, *, sent: bool = False, body_lines: int = 12) -> bytes:
    """A small message (~1 KB), unique by Message-ID; every fourth answers the one before
    (In-Reply-To + References), so threads are built at scale too."""
    customer = f"customer{n % 997}@client{n % 13}.example"
    sender, to = (f"Sales <{OWNER}>", customer) if sent else (f"Customer {n % 997} <{customer}>", OWNER)
    kind = "s" if sent else "m"
    headers = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: Quote request {n // 4}",
        f"Date: Mon, {1 + n % 28} Jun 2020 {n % 24:02d}:{n % 60:02d}:00 +0000",
        f"Message-ID: <{kind}{n}@client.example>",
    ]
    if n % 4:
        parent = f"<{kind}{n - 1}@client.example>"
        headers += [f"In-Reply-To: {parent}", f"References: {parent}"]
    body = "\r\n".join(f"Line {i} of message {n}: we would like a quote for item {n * 7 + i}." for i in range(body_lines))
    return ("\r\n".join(headers) + "\r\n\r\n" + body + "\r\n").encode()


def flags_of(n: int) -> str:
    """Maildir flags: every third read, every eleventh flagged, every seventeenth answered."""
    return ("S" if n % 3 == 0 else "") + ("F" if n % 11 == 0 else "") + ("R" if n % 17 == 0 else "")


def sync(mailbox: Mailbox, session_factory=ImapSession) -> SyncReport:  # noqa: ANN001
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=60, session_factory=session_factory).run()


def lesser(*hidden: str) -> type[ImapSession]:
    """A session that does not see some of Dovecot's capabilities (Gmail: no QRESYNC;
    Outlook.com: neither QRESYNC nor CONDSTORE)."""

    class Lesser(ImapSession):
        def has(self, capability: str) -> bool:
            return capability not in hidden and super().has(capability)

    return Lesser


def crm_view(mailbox: Mailbox, folder: str) -> dict[int, set[str]]:
    """The CRM's places in a folder (current UIDVALIDITY only): UID -> flags."""
    current = MailFolder.objects.get(mailbox=mailbox, name=folder).uidvalidity
    return {uid: set(flags) - {"\\Recent"} for uid, flags in EmailLocation.objects.filter(
        folder__mailbox=mailbox, folder__name=folder, uidvalidity=current).values_list("uid", "flags")}


def server_view(dovecot, user, folder: str) -> dict[int, set[str]]:  # noqa: ANN001
    return {uid: set(flags) for uid, flags in dovecot.folder_state(user, folder).messages}


def assert_stored_once(mailbox: Mailbox, expected: int) -> None:
    emails = Email.objects.filter(mailbox=mailbox)
    assert emails.count() == expected
    twice = emails.values("message_id").annotate(n=Count("id")).filter(n__gt=1)
    assert not twice.exists(), list(twice[:5])


def assert_crm_matches_server(dovecot, user, mailbox: Mailbox, folder: str) -> None:  # noqa: ANN001
    server, crm = server_view(dovecot, user, folder), crm_view(mailbox, folder)
    assert crm.keys() == server.keys(), (len(crm.keys() - server.keys()), len(server.keys() - crm.keys()))
    wrong = [uid for uid in server if server[uid] != crm[uid]]
    assert not wrong, [(uid, server[uid], crm[uid]) for uid in wrong[:5]]
    # Read and flagged in the lists follow the server (one place per mail here).
    live = {uid: (seen, flagged) for uid, seen, flagged in Email.objects.filter(
        mailbox=mailbox, deleted_at__isnull=True, locations__folder__name=folder)
        .values_list("locations__uid", "seen", "flagged")}
    assert live == {uid: ("\\Seen" in f, "\\Flagged" in f) for uid, f in server.items()}


def assert_completed(mailbox: Mailbox) -> None:
    mailbox.refresh_from_db()
    assert (mailbox.state, mailbox.last_error) == (Mailbox.State.COMPLETED, "")


def bytes_from_client(dovecot, user) -> int:  # noqa: ANN001
    """What the user's last IMAP session sent the server, as Dovecot logs it at logout
    ("Logged out in=<bytes> out=<bytes>")."""
    import re

    lines = [line for line in dovecot.log_path.read_text(errors="replace").splitlines()
             if f"imap({user.username})" in line and "Logged out in=" in line]
    return int(re.search(r"Logged out in=(\d+)", lines[-1]).group(1))


def uid_set(uids: list[int]) -> str:
    return ",".join(str(uid) for uid in uids)


# INBOX: 12,000 messages with UIDs three apart (no two adjacent: a set of them is 12,000
# numbers, ~96 KB, never "a:b" ranges), 7-digit as in an old Gmail mailbox; more than two
# flag runs of FLAG_BATCH (5,000) without CONDSTORE. Sent: 2,000. (20,000 until session 10:
# the same paths, for 40 % more CI time.)
INBOX_UIDS = [1_000_000 + 3 * n for n in range(12_000)]
SENT_UIDS = [400_000 + 5 * n for n in range(2_000)]


def test_large_sparse_mailbox_syncs_exactly_then_follows_thousands_of_server_changes(
        dovecot, mail_user, imap_mailbox):
    dovecot.fill_maildir(mail_user, "INBOX", ((uid, message(n), flags_of(n)) for n, uid in enumerate(INBOX_UIDS)))
    dovecot.fill_maildir(mail_user, "Sent", ((uid, message(n, sent=True), "S") for n, uid in enumerate(SENT_UIDS)))
    total = len(INBOX_UIDS) + len(SENT_UIDS)

    # Initial sync: two folders to backfill, so both are counted first (ImapSync._plan).
    report = sync(imap_mailbox)

    assert (report.new, report.located, report.failed, report.errors) == (total, 0, 0, [])
    assert_completed(imap_mailbox)
    assert_stored_once(imap_mailbox, total)
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox, "INBOX")
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox, "Sent")
    assert imap_mailbox.messages_done == imap_mailbox.messages_total == total
    assert imap_mailbox.bytes_done == imap_mailbox.bytes_total > total * 500
    assert Email.objects.filter(mailbox=imap_mailbox, direction="sent").count() == len(SENT_UIDS)
    # Threads at scale: every answer sits in its conversation's thread (four mails each).
    sizes = Counter(Email.objects.filter(mailbox=imap_mailbox).values_list("thread_id", flat=True))
    assert set(sizes.values()) == {4} and len(sizes) == total // 4

    # Nothing changed: nothing fetched, both folders seen unchanged by STATUS.
    report = sync(imap_mailbox)
    assert (report.new, report.flag_changes, report.expunged, report.unchanged_folders) == (0, 0, 0, 2)

    # The user works through their mail elsewhere, thousands of messages at a time, while
    # the server offers QRESYNC, then only CONDSTORE (Gmail), then neither (Outlook.com).
    gone: set[int] = set()
    rounds = [("qresync", ImapSession), ("condstore", lesser("QRESYNC")),
              ("neither", lesser("QRESYNC", "CONDSTORE"))]
    for index, (name, factory) in enumerate(rounds):
        left = [uid for uid in INBOX_UIDS if uid not in gone]
        before = server_view(dovecot, mail_user, "INBOX")
        # Every fifth message starting at a different place, so each round changes
        # messages the last one did not; every seventh of the rest expunged.
        flag = left[index::5][:3_000]
        flagged_now = set(flag)
        expunge = [uid for uid in left[index + 1::7] if uid not in flagged_now][:2_500]
        toggled = "\\Flagged" if index != 1 else "\\Seen"
        will_change = [uid for uid in flag if toggled not in before[uid]]
        dovecot.doveadm("flags", "add", "-u", mail_user.username, toggled, "mailbox", "INBOX",
                        "uid", uid_set(flag))
        dovecot.doveadm("expunge", "-u", mail_user.username, "mailbox", "INBOX", "uid", uid_set(expunge))
        gone |= set(expunge)

        report = sync(imap_mailbox, factory)

        assert (report.new, report.flag_changes, report.expunged, report.errors) == \
            (0, len(will_change), len(expunge), []), name
        # With CONDSTORE the changes are asked for over the folder's UID span in one
        # command, not with the ~10,000 UIDs themselves (~80 KB, 10 commands: on a remote
        # server as many round trips on every resync). Without it ("neither": every flag is
        # fetched each run), runs of 5,000 UIDs from the server's SEARCH ALL are asked for as
        # "first:last": three commands, not the ~80 KB of UIDs.
        assert bytes_from_client(dovecot, mail_user) < 8_000, name
        assert_completed(imap_mailbox)
        assert_crm_matches_server(dovecot, mail_user, imap_mailbox, "INBOX")
        assert_stored_once(imap_mailbox, total)  # expunged mail stays as tombstones
        assert Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=False).count() == len(gone)
        assert Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=True).count() == total - len(gone)


def test_uidvalidity_reset_of_a_large_folder_stores_nothing_twice(dovecot, mail_user, imap_mailbox):
    uids = [50_000 + 4 * n for n in range(8_000)]
    dovecot.fill_maildir(mail_user, "INBOX", ((uid, message(n), flags_of(n)) for n, uid in enumerate(uids)))
    assert sync(imap_mailbox).new == len(uids)
    ids = set(Email.objects.filter(mailbox=imap_mailbox).values_list("pk", flat=True))
    dovecot.expunge(mail_user, "INBOX", uids[5])  # one really gone meanwhile

    new_validity = dovecot.reset_uidvalidity(mail_user, "INBOX")  # UIDs renumbered 1..n
    report = sync(imap_mailbox)

    assert (report.new, report.located, report.errors) == (0, len(uids) - 1, [])
    assert_completed(imap_mailbox)
    assert set(Email.objects.filter(mailbox=imap_mailbox).values_list("pk", flat=True)) == ids
    assert_stored_once(imap_mailbox, len(uids))
    assert not EmailLocation.objects.filter(folder__mailbox=imap_mailbox).exclude(uidvalidity=new_validity).exists()
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox, "INBOX")
    assert list(Email.objects.filter(mailbox=imap_mailbox, deleted_at__isnull=False)
                .values_list("message_id", flat=True)) == ["m5@client.example"]
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.messages_done == imap_mailbox.messages_total == len(uids) - 1


def test_sync_since_a_day_then_earlier_downloads_the_older_mail_once(dovecot, mail_user, imap_mailbox):
    """A user starts with the last years only ("sync mail since"), then wants older mail: the
    backfill runs again below what is stored and fetches only what is missing."""
    start = datetime(2019, 1, 1, 12, tzinfo=dt_timezone.utc)
    # Three messages a day (at noon: SEARCH SINCE compares days), UIDs five apart.
    dated = [(200_000 + 5 * n, start + timedelta(days=n // 3, minutes=n % 3)) for n in range(9_000)]
    dovecot.fill_maildir(mail_user, "INBOX", ((uid, message(n), flags_of(n), when.timestamp())
                                              for n, (uid, when) in enumerate(dated)))
    dovecot.fill_maildir(mail_user, "Sent", ((300_000 + 2 * n, message(n, sent=True), "S", start.timestamp())
                                             for n in range(500)))
    since = date(2024, 6, 1)
    recent = [uid for uid, when in dated if when.date() >= since]
    assert 0 < len(recent) < len(dated)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(sync_since=since)

    report = sync(imap_mailbox)

    assert (report.new, report.errors) == (len(recent), [])
    assert sorted(crm_view(imap_mailbox, "INBOX")) == recent
    imap_mailbox.refresh_from_db()
    services.mailbox_update(actor=imap_mailbox.owner, mailbox=imap_mailbox,
                            data={"sync_since": date(2018, 1, 1)}, check_connection=False)

    report = sync(imap_mailbox)

    total = len(dated) + 500
    assert (report.new, report.located, report.errors) == (total - len(recent), 0, [])
    assert_completed(imap_mailbox)
    assert_stored_once(imap_mailbox, total)
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox, "INBOX")
    assert_crm_matches_server(dovecot, mail_user, imap_mailbox, "Sent")
    assert imap_mailbox.messages_done == imap_mailbox.messages_total == total - len(recent)


def test_a_folder_whose_uid_list_is_over_a_megabyte_is_counted_and_paused_not_an_error(
        dovecot, mail_user, imap_mailbox):
    """A Gmail mailbox of ~120,000 messages with 8-digit UIDs: its ``UID SEARCH ALL`` reply
    is one line of over 1 MB (imaplib's bound on a line), and its sizes are asked for in a
    UID set of over 1 MB. The day's download budget is spent, so the first sync only counts
    the mail and pauses (as it does when it reaches the budget at 2.5 GB)."""
    uids = [10_000_000 + 7 * n for n in range(120_000)]
    raw = [b"From: c@client.example\r\nSubject: s\r\nMessage-ID: <n%d@client.example>\r\n\r\nhi\r\n" % n
           for n in range(len(uids))]
    dovecot.fill_maildir(mail_user, "INBOX", ((uid, raw[n], "") for n, uid in enumerate(uids)))
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        provider="gmail", budget_day=timezone.now().date(), budget_bytes_used=int(2.5 * 1024**3))

    sync(imap_mailbox)

    imap_mailbox.refresh_from_db()
    assert (imap_mailbox.state, imap_mailbox.last_error) == (Mailbox.State.PAUSED, "")
    assert imap_mailbox.messages_total == len(uids)
    assert imap_mailbox.bytes_total == sum(len(r) for r in raw)
    assert not Email.objects.filter(mailbox=imap_mailbox).exists()
