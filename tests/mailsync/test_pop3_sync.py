"""The POP3 download against the private Dovecot: both modes, faults at every step between
RETR and QUIT, a killed worker, size limits, duplicate UIDLs, TLS, and independence of the
CRM copy. After each fault the rerun must leave every message in the CRM exactly once and
the server holding exactly what the mode says (read back with doveadm)."""
from __future__ import annotations

import os
import socket
import ssl
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from mailsync import selectors, services, tasks
from mailsync.exceptions import MailAuthError, MailServerUnreachable, MailTLSError
from mailsync.mime import content_hash
from mailsync.models import Email, Mailbox, MessageError, Pop3Message
from mailsync.protocols.base import tls_context
from mailsync.protocols.pop3 import Pop3Session, check_login
from mailsync.protocols.tls import MemoryTLS
from mailsync.storage import decompress
from mailsync.sync import pop3 as engine
from mailsync.sync.imap import server_settings
from mailsync.sync.pop3 import Pop3Sync
from tests.corpus import corpus_files
from tests.mailsync.conftest import kill_worker_midway, make_message
from tests.testbed.dovecot import DovecotUser

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True, params=["thread", "process"])
def pop3_fetch_mode(request, settings) -> str:
    """Every test runs twice: with the session in this process (small downloads) and with
    the session and the preparing in a child process (large ones: Pop3ChildSession), where
    every command, DELE and QUIT included, crosses the pipe."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0 if request.param == "thread" else 1
    return request.param




def sync(mailbox: Mailbox, **kwargs):
    mailbox.refresh_from_db()
    return Pop3Sync(mailbox, timeout=10, **kwargs).run()


def on_server(dovecot, user) -> int:
    return dovecot.folder_state(user).count


def crm_subjects(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox).values_list("subject", flat=True))


def stored_source(email: Email) -> bytes:
    return decompress(email.source_data.compressed())


def assert_whole(mailbox: Mailbox, originals: dict[str, bytes]) -> None:
    """Every stored source is the delivered message, whole (Dovecot only adds trace headers
    in front)."""
    for email in Email.objects.filter(mailbox=mailbox).select_related("source_data"):
        assert stored_source(email).endswith(originals[email.subject]), email.subject


def test_download_with_attachments_removes_from_server(dovecot, mail_user, pop3_mailbox):
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40
    originals = {}
    for i in range(6):
        attachment = ("quote.pdf", pdf, "application/pdf") if i % 2 else None
        # A line starting with "." exercises POP3 byte-stuffing (RFC 1939 3).
        originals[f"Order {i}"] = make_message(subject=f"Order {i}", body=f".leading dot\nline {i}\n",
                                               attachment=attachment)
        dovecot.deliver(mail_user, originals[f"Order {i}"])

    report = sync(pop3_mailbox)

    assert report.new == 6 and report.failed == 0
    assert crm_subjects(pop3_mailbox) == [f"Order {i}" for i in range(6)]
    assert_whole(pop3_mailbox, originals)
    assert on_server(dovecot, mail_user) == 0  # removed after download (the default)
    rows = Pop3Message.objects.filter(mailbox=pop3_mailbox)
    assert rows.count() == 6
    assert all(r.key_kind == "uidl" and r.deleted_from_server_at and r.email_id for r in rows)
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == "completed"
    assert pop3_mailbox.messages_done == pop3_mailbox.messages_total == 6
    assert pop3_mailbox.bytes_done == pop3_mailbox.bytes_total > 3 * len(pdf)

    while services.emails_parse_pending(mailbox_id=pop3_mailbox.pk):
        pass
    with_pdf = Email.objects.filter(mailbox=pop3_mailbox, has_attachments=True)
    assert with_pdf.count() == 3
    for email in with_pdf:
        attachment = email.attachments.get()
        assert attachment.filename == "quote.pdf"
        assert decompress(attachment.blob.data) == pdf
    assert ".leading dot" in Email.objects.get(subject="Order 0").text

    # A second run finds nothing to do
    assert sync(pop3_mailbox).new == 0
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 6


def test_every_corpus_message_downloads_byte_for_byte(dovecot, mail_user, pop3_mailbox):
    files = corpus_files()
    originals = [path.read_bytes() for path in files]
    for raw in originals:
        dovecot.append(mail_user, "INBOX", raw)
    count = on_server(dovecot, mail_user)
    assert count == len(files)

    report = sync(pop3_mailbox)

    assert report.failed == 0
    assert Pop3Message.objects.filter(mailbox=pop3_mailbox).count() == count
    assert on_server(dovecot, mail_user) == 0
    # Same bytes as appended, line ends aside (POP3 ends every message with a line end, so
    # one is added where the file had none): dot-unstuffing and long lines survive.
    stored = {e.content_hash for e in Email.objects.filter(mailbox=pop3_mailbox)}
    assert stored == {content_hash(raw if raw.endswith(b"\n") else raw + b"\n") for raw in originals}
    while services.emails_parse_pending(mailbox_id=pop3_mailbox.pk):
        pass
    assert set(Email.objects.filter(mailbox=pop3_mailbox).values_list("parse_state", flat=True)) == {"parsed"}


def test_leave_on_server_then_remove_after_n_days(dovecot, mail_user, pop3_mailbox):
    pop3_mailbox.pop3_delete_after_download = False
    pop3_mailbox.pop3_keep_days = 7
    pop3_mailbox.save()
    for i in range(4):
        dovecot.deliver(mail_user, make_message(subject=f"Kept {i}"))

    sync(pop3_mailbox)
    sync(pop3_mailbox)  # nothing new, nothing old enough

    assert crm_subjects(pop3_mailbox) == [f"Kept {i}" for i in range(4)]
    assert on_server(dovecot, mail_user) == 4
    assert not Pop3Message.objects.filter(deleted_from_server_at__isnull=False).exists()

    # Two of them were downloaded 8 days ago: their copy on the server goes, the rest stays.
    old = Pop3Message.objects.filter(email__subject__in=["Kept 0", "Kept 1"])
    old.update(downloaded_at=timezone.now() - timedelta(days=8))
    dovecot.deliver(mail_user, make_message(subject="Kept 4"))
    report = sync(pop3_mailbox)

    assert report.new == 1
    assert crm_subjects(pop3_mailbox) == [f"Kept {i}" for i in range(5)]
    assert on_server(dovecot, mail_user) == 3
    assert set(Pop3Message.objects.filter(deleted_from_server_at__isnull=False)
               .values_list("email__subject", flat=True)) == {"Kept 0", "Kept 1"}


def test_leave_on_server_forever_without_n_days(dovecot, mail_user, pop3_mailbox):
    pop3_mailbox.pop3_delete_after_download = False
    pop3_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Forever"))
    sync(pop3_mailbox)
    Pop3Message.objects.update(downloaded_at=timezone.now() - timedelta(days=3650))
    sync(pop3_mailbox)
    assert on_server(dovecot, mail_user) == 1
    assert crm_subjects(pop3_mailbox) == ["Forever"]


class CutBeforeQuit(Pop3Session):
    """The connection drops after every RETR and DELE, just before QUIT."""

    def __init__(self, settings, proxy) -> None:  # noqa: ANN001
        super().__init__(settings)
        self.proxy = proxy

    def quit(self) -> None:
        self.proxy.drop_connections()
        super().quit()


def test_connection_lost_before_quit_deletes_nothing_and_rerun_duplicates_nothing(
    dovecot, mail_user, pop3_mailbox, fault_proxy
):
    for i in range(5):
        dovecot.deliver(mail_user, make_message(subject=f"Before quit {i}"))
    proxy = fault_proxy(dovecot.host, dovecot.pop3s_port)
    pop3_mailbox.incoming_port = proxy.port
    pop3_mailbox.save()

    with pytest.raises(MailServerUnreachable):
        sync(pop3_mailbox, session_factory=lambda s: CutBeforeQuit(s, proxy))

    # Stored and recorded, DELE sent, but no QUIT: the server removed nothing.
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 5
    assert on_server(dovecot, mail_user) == 5
    assert not Pop3Message.objects.filter(deleted_from_server_at__isnull=False).exists()
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == "error" and pop3_mailbox.last_error_code == "unreachable"

    report = sync(pop3_mailbox)

    assert report.new == report.located == 0  # known by UIDL: not even downloaded again
    assert crm_subjects(pop3_mailbox) == [f"Before quit {i}" for i in range(5)]
    assert on_server(dovecot, mail_user) == 0
    assert Pop3Message.objects.filter(deleted_from_server_at__isnull=False).count() == 5


@pytest.mark.parametrize("delete_after_download", [True, False])
def test_connection_cut_mid_retr_then_rerun_loses_and_duplicates_nothing(
    dovecot, mail_user, pop3_mailbox, fault_proxy, monkeypatch, delete_after_download
):
    big = os.urandom(150_000)
    originals = {}
    for i in range(10):
        originals[f"Big {i}"] = make_message(subject=f"Big {i}",
                                             attachment=("specs.bin", big, "application/octet-stream"))
        dovecot.deliver(mail_user, originals[f"Big {i}"])
    pop3_mailbox.pop3_delete_after_download = delete_after_download
    proxy = fault_proxy(dovecot.host, dovecot.pop3s_port)
    pop3_mailbox.incoming_port = proxy.port
    pop3_mailbox.save()
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 3)
    # Login, LIST, UIDL and the first batch pass; the cut lands inside a later RETR.
    proxy.cut_after(1_000_000, direction="down")

    with pytest.raises(MailServerUnreachable):
        sync(pop3_mailbox)

    stored = Email.objects.filter(mailbox=pop3_mailbox).count()
    assert 0 < stored < 10
    assert on_server(dovecot, mail_user) == 10  # no QUIT, so no DELE took effect
    assert_whole(pop3_mailbox, originals)  # never a partial message stored as whole

    proxy.reset()
    sync(pop3_mailbox)

    assert crm_subjects(pop3_mailbox) == sorted(f"Big {i}" for i in range(10))
    assert_whole(pop3_mailbox, originals)
    assert on_server(dovecot, mail_user) == (0 if delete_after_download else 10)


@pytest.mark.django_db(transaction=True)
def test_worker_killed_between_store_and_dele_then_rerun_matches_the_server(
    dovecot, mail_user, pop3_mailbox
):
    """A real worker process is SIGKILLed after some batches were committed and marked with
    DELE, before QUIT: the server still has every message; the rerun stores none twice and
    removes them all."""
    for i in range(40):
        dovecot.deliver(mail_user, make_message(subject=f"Kill {i}", body="x" * 20_000))
    kill_worker_midway(pop3_mailbox, after_emails=8, fetch_process=True)
    partial = Email.objects.filter(mailbox=pop3_mailbox).count()
    assert 8 <= partial < 40
    assert Pop3Message.objects.filter(mailbox=pop3_mailbox).count() == partial
    assert on_server(dovecot, mail_user) == 40

    report = sync(pop3_mailbox)  # the rerun: PostgreSQL released the dead worker's lock

    assert report.new == 40 - partial and report.located == 0
    assert crm_subjects(pop3_mailbox) == sorted(f"Kill {i}" for i in range(40))
    assert on_server(dovecot, mail_user) == 0


def test_wrong_password_is_a_clear_error_without_retry(dovecot, mail_user, pop3_mailbox):
    pop3_mailbox.password = "wrong"
    pop3_mailbox.save()
    with pytest.raises(MailAuthError):
        sync(pop3_mailbox)
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == "error"
    assert pop3_mailbox.last_error_code == "auth_failed"
    assert "app-specific password" in pop3_mailbox.last_error

    # The task swallows a user error (no retry storm) and polling skips the mailbox
    tasks.sync_mailbox.delay(pop3_mailbox.pk)
    assert tasks.poll_mailboxes() == 0


def test_poll_and_sync_now_reach_pop3_mailboxes(dovecot, mail_user, pop3_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Polled"))
    assert tasks.poll_mailboxes() == 1  # eager in tests: the sync ran
    assert crm_subjects(pop3_mailbox) == ["Polled"]
    dovecot.deliver(mail_user, make_message(subject="Sync now"))
    report = services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    assert report.new == 1
    assert on_server(dovecot, mail_user) == 0


def test_crm_and_server_are_independent(dovecot, mail_user, pop3_mailbox):
    pop3_mailbox.pop3_delete_after_download = False  # so there is a server copy to compare
    pop3_mailbox.save()
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Mine {i}"))
    sync(pop3_mailbox)
    before = dovecot.folder_state(mail_user).messages

    # In the CRM: read, flag, delete. The server does not change.
    owner = pop3_mailbox.owner
    first, second = Email.objects.filter(mailbox=pop3_mailbox).order_by("subject")[:2]
    services.email_update(actor=owner, email=first, seen=True, flagged=True)
    services.email_delete(actor=owner, email=second)
    assert dovecot.folder_state(mail_user).messages == before
    # ...and the next download does not bring the deleted mail back.
    sync(pop3_mailbox)
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 3
    assert Email.objects.get(pk=second.pk).deleted_at is not None

    # On the server: the user deletes a message in their mail client. The CRM copy stays.
    dovecot.expunge(mail_user, "INBOX", dovecot.folder_state(mail_user).uids[2])
    sync(pop3_mailbox)
    third = Email.objects.get(mailbox=pop3_mailbox, subject="Mine 2")
    assert third.deleted_at is None
    assert Email.objects.filter(mailbox=pop3_mailbox, deleted_at__isnull=True).count() == 2


def test_stls_on_the_plain_port_with_certificate_verification(dovecot, mail_user, pop3_mailbox,
                                                              monkeypatch):
    pop3_mailbox.incoming_port = dovecot.pop3_port
    pop3_mailbox.incoming_security = "starttls"
    pop3_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Over STLS"))

    assert check_login(server_settings(pop3_mailbox)) == [("INBOX", "inbox")]
    assert services.mailbox_test(mailbox=pop3_mailbox) == [("INBOX", "inbox")]
    assert sync(pop3_mailbox).new == 1

    # A certificate we do not trust stops the connection before the password is sent.
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    dovecot.deliver(mail_user, make_message(subject="Never over plain text"))
    with pytest.raises(MailTLSError, match="not trusted"):
        sync(pop3_mailbox)
    assert crm_subjects(pop3_mailbox) == ["Over STLS"]


def test_pop3s_verifies_the_certificate_and_the_host_name(dovecot, mail_user, pop3_mailbox,
                                                        monkeypatch):
    """Port 995 (TLS from the first byte, mailsync/protocols/tls.py): an untrusted certificate
    or a name it was not issued for stops the connection before the password is sent."""
    dovecot.deliver(mail_user, make_message(subject="Kept on the server"))
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(MailTLSError, match="not trusted"):
        check_login(server_settings(pop3_mailbox))
    monkeypatch.undo()

    # A name the certificate was not issued for (the handshake of MemoryTLS itself)
    with socket.create_connection((dovecot.host, dovecot.pop3s_port), timeout=10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            MemoryTLS(sock, tls_context(), "mail.example.com")
    # The certificate it was issued for: the greeting arrives through the memory BIOs
    with socket.create_connection((dovecot.host, dovecot.pop3s_port), timeout=10) as sock:
        tls = MemoryTLS(sock, tls_context(), dovecot.host)
        assert tls.makefile("rb").readline().startswith(b"+OK")
    assert crm_subjects(pop3_mailbox) == []
    assert dovecot.folder_state(mail_user).count == 1


def test_message_over_the_size_limit_is_kept_as_headers_with_a_notice(dovecot, mail_user, pop3_mailbox):
    pop3_mailbox.max_message_bytes = 100_000
    pop3_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Huge", body="Body of the huge one",
                                            attachment=("scan.tif", os.urandom(300_000), "image/tiff")))
    dovecot.deliver(mail_user, make_message(subject="Small"))

    report = sync(pop3_mailbox)

    assert report.new == 2
    huge = Email.objects.get(mailbox=pop3_mailbox, subject="Huge")
    assert huge.truncated and huge.size > 400_000
    source = stored_source(huge)
    assert b"Subject: Huge" in source and b"Body of the huge one" not in source
    assert not Email.objects.get(subject="Small").truncated
    notices = selectors.mailbox_status(mailbox=pop3_mailbox)["message_errors"]
    assert len(notices) == 1 and "only its headers" in notices[0]["error"]
    # Only the small one left the server: deleting the huge one would lose its body.
    assert on_server(dovecot, mail_user) == 1

    sync(pop3_mailbox)
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 2
    assert MessageError.objects.filter(mailbox=pop3_mailbox).count() == 1
    assert on_server(dovecot, mail_user) == 1
    # "Retry" has nothing to fetch for a notice, and does not fail on a POP3 mailbox
    assert services.mailbox_retry_failed(actor=pop3_mailbox.owner, mailbox=pop3_mailbox)["refetched"] == 0


def test_duplicate_uidls_fall_back_to_header_hashes(dovecot, pop3_mailbox):
    # A real Dovecot told to give every message the same UIDL (the folder's UIDVALIDITY).
    name = f"dupuidl{time.monotonic_ns() % 10**9}"
    path = dovecot.users_dir / name
    path.write_text(f"{name}:{{PLAIN}}secret::::::userdb_pop3_uidl_format=%%v\n")
    os.chmod(path, 0o644)
    user = DovecotUser(username=name, password="secret", email=f"{name}@example.test")
    same = make_message(subject="Twice")
    dovecot.append(user, "INBOX", same)
    dovecot.append(user, "INBOX", same)  # the same message twice: one email, both removed
    dovecot.append(user, "INBOX", make_message(subject="Other"))
    pop3_mailbox.username, pop3_mailbox.password, pop3_mailbox.email_address = name, "secret", user.email
    pop3_mailbox.save()

    sync(pop3_mailbox)

    rows = Pop3Message.objects.filter(mailbox=pop3_mailbox)
    assert rows.count() == 3 and set(rows.values_list("key_kind", flat=True)) == {"hash"}
    assert crm_subjects(pop3_mailbox) == ["Other", "Twice"]
    assert on_server(dovecot, user) == 0

    dovecot.append(user, "INBOX", make_message(subject="Later"))
    assert sync(pop3_mailbox).new == 1
    assert crm_subjects(pop3_mailbox) == ["Later", "Other", "Twice"]


def test_provider_budget_exhausted_pauses_without_touching_the_server(dovecot, mail_user, pop3_mailbox):
    for i in range(3):
        dovecot.deliver(mail_user, make_message())
    pop3_mailbox.provider = "gmail"
    pop3_mailbox.save()
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(
        budget_bytes_used=int(2.5 * 1024**3), budget_day=timezone.now().date()
    )
    sync(pop3_mailbox)
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == "paused" and pop3_mailbox.paused_until is not None
    assert not Email.objects.filter(mailbox=pop3_mailbox).exists()
    assert on_server(dovecot, mail_user) == 3
    assert services.mailbox_sync(mailbox_id=pop3_mailbox.pk) is None  # skipped until then


def test_budget_running_out_mid_download_removes_only_what_was_stored(dovecot, mail_user, pop3_mailbox,
                                                                     monkeypatch):
    for i in range(5):
        dovecot.deliver(mail_user, make_message(subject=f"Budget {i}"))
    pop3_mailbox.provider = "gmail"
    pop3_mailbox.save()
    Mailbox.objects.filter(pk=pop3_mailbox.pk).update(
        budget_bytes_used=int(2.5 * 1024**3) - 1, budget_day=timezone.now().date()
    )
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 2)

    sync(pop3_mailbox)

    # The budget is checked before each fetch; a fetch runs ahead of the store before it,
    # so two batches get in. What is stored is removed (QUIT still sent); the rest waits.
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == "paused"
    stored = Email.objects.filter(mailbox=pop3_mailbox).count()
    assert stored == 4
    assert on_server(dovecot, mail_user) == 5 - stored
    assert Pop3Message.objects.filter(deleted_from_server_at__isnull=False).count() == stored


def test_message_that_fails_to_store_is_kept_raw_and_retried_from_the_crm(dovecot, mail_user,
                                                                          pop3_mailbox, monkeypatch):
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Retry {i}"))
    from mailsync.sync import ingest

    real_store = ingest._store

    def store_failing_on_retry_1(mailbox, folder, uidvalidity, prepared, *rest):
        if any(p.envelope.subject == "Retry 1" for p in prepared):
            raise ValueError("simulated storage failure")
        return real_store(mailbox, folder, uidvalidity, prepared, *rest)

    monkeypatch.setattr(ingest, "_store", store_failing_on_retry_1)
    report = sync(pop3_mailbox)

    assert report.failed == 1
    assert crm_subjects(pop3_mailbox) == ["Retry 0", "Retry 2"]
    # Its bytes are in the CRM (with the error the user sees), so it may leave the server.
    error = MessageError.objects.get(mailbox=pop3_mailbox)
    assert b"Retry 1" in decompress(error.raw) and "simulated" in error.error
    assert on_server(dovecot, mail_user) == 0

    monkeypatch.setattr(ingest, "_store", real_store)
    result = services.mailbox_retry_failed(actor=pop3_mailbox.owner, mailbox=pop3_mailbox)
    assert result["refetched"] == 1
    assert crm_subjects(pop3_mailbox) == ["Retry 0", "Retry 1", "Retry 2"]
    assert selectors.mailbox_status(mailbox=pop3_mailbox)["message_errors"] == []


def test_downloaded_mail_is_threaded_and_attached_to_records(dovecot, mail_user, pop3_mailbox):
    from datetime import datetime
    from datetime import timezone as dt_timezone

    from mailsync.models import EmailLink, Thread
    from tests.factories import ContactFactory

    contact = ContactFactory(email="buyer@client.example")
    first = datetime(2026, 3, 1, 9, 0, tzinfo=dt_timezone.utc)
    dovecot.deliver(mail_user, make_message(sender="Buyer <Buyer@Client.example>", subject="Offer",
                                            message_id="<offer@client.example>", date=first))
    dovecot.deliver(mail_user, make_message(sender="Buyer <buyer@client.example>", subject="Re: Offer",
                                            message_id="<re@client.example>",
                                            in_reply_to="<offer@client.example>",
                                            references="<offer@client.example>",
                                            date=first + timedelta(days=2)))
    sync(pop3_mailbox)

    thread = Thread.objects.get(mailbox=pop3_mailbox)
    assert thread.emails.count() == 2
    assert (thread.last_date, thread.subject) == (first + timedelta(days=2), "Re: Offer")
    assert EmailLink.objects.filter(contact=contact).count() == 2
