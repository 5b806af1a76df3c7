"""Worker and web memory stays under 200 MB on every path a large mail takes (issue 3), not
only the IMAP sync and the parse (test_memory_large_mail.py): POP3 sync, the IMAP sync in
the worker's own process, Retry, completing a headers-only mail once the limit is raised,
attachment downloads (API and page) and sending with a large attachment (SMTP, then the copy
to Sent). Each stage runs in a real process (the worker's, or a web process calling the view
through django.test.Client and reading the response as a WSGI server does) against the
private Dovecot, PostgreSQL and SMTP server; its peak resident memory (VmHWM, reset with
``clear_refs`` between stages) is read from the kernel, and so is its fetch process's.

Mails are near the default size limit (50 MB): incompressible attachments (os.urandom)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

from mailsync.models import Attachment, Email, EmailLocation, EmailSource, Mailbox, MailFolder, MessageError
from mailsync.storage import decompress
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db(transaction=True)

MB = 2**20
LIMIT_KB = 200 * 1024

# The worker's (or web process's) side: one named stage after another, each measured alone.
_RUN = r"""
import json, os, sys, threading, time
import django
django.setup()

def peak_kb(pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

children_kb = [0]

def watch_children():
    # The fetch process's peak: VmHWM only grows, so its last reading is its peak.
    me = os.getpid()
    while True:
        for task in os.listdir(f"/proc/{me}/task"):
            try:
                kids = open(f"/proc/{me}/task/{task}/children").read().split()
            except OSError:
                continue
            for kid in kids:
                children_kb[0] = max(children_kb[0], peak_kb(kid))
        time.sleep(0.01)

threading.Thread(target=watch_children, daemon=True).start()

from mailsync import services, sending
from mailsync.models import Attachment, Email, Mailbox

mailbox = Mailbox.objects.get(pk=int(sys.argv[1]))

def parse():
    while services.emails_parse_pending(mailbox_id=mailbox.pk):
        pass

def sync():
    from mailsync.sync.imap import ImapSync
    from mailsync.sync.pop3 import Pop3Sync
    (Pop3Sync if mailbox.protocol == Mailbox.Protocol.POP3 else ImapSync)(mailbox).run()

def retry():
    services.mailbox_retry_failed(actor=mailbox.owner, mailbox=mailbox)

def _download(url):
    from django.test import Client
    client = Client()
    client.force_login(mailbox.owner)
    response = client.get(url)
    assert response.status_code == 200, response.status_code
    # As a WSGI server: the body goes to the socket piece by piece, nothing kept.
    total = 0
    for piece in (response.streaming_content if response.streaming else [response.content]):
        total += len(piece)
    response.close()
    return total

def download_api():
    a = Attachment.objects.filter(email__mailbox=mailbox).order_by("-size").first()
    return _download(f"/api/v1/emails/{a.email_id}/attachments/{a.pk}/")

def download_page():
    a = Attachment.objects.filter(email__mailbox=mailbox).order_by("-size").first()
    return _download(f"/mail/{a.email_id}/attachments/{a.pk}/")

def send():
    sending._queue = lambda email_id: None  # delivered below, as its own stage
    mb = int(sys.argv[3])
    data = os.urandom(mb * 2**20)
    email = sending.email_send(
        actor=mailbox.owner, from_address=mailbox.email_address, to="grace@navy.example",
        subject="Drawings", text="Attached.",
        attachments=[sending.OutgoingAttachment("drawings.pdf", "application/pdf", data)])
    del data
    return email.pk

def deliver():
    real, sending._append_to_sent = sending._append_to_sent, lambda mailbox, raw: None
    try:  # the copy to Sent is measured as its own stage (sent_copy)
        email = Email.objects.filter(mailbox=mailbox, source=Email.Source.CRM).get()
        return sending.email_deliver(email_id=email.pk).send_state
    finally:
        sending._append_to_sent = real

def sent_copy():
    from mailsync.storage import decompress
    from mailsync.sync.copy import read_source
    email = Email.objects.filter(mailbox=mailbox, source=Email.Source.CRM).get()
    raw = decompress(read_source(email.pk))
    return sending._append_to_sent(mailbox, raw)

def idle():
    from django.test import Client
    from mailsync.api import views
    return 0

out = {}
for stage in sys.argv[2].split(","):
    reset_peak()
    children_kb[0] = 0
    result = globals()[stage]()
    out[stage] = {"kb": peak_kb(), "child_kb": children_kb[0], "result": result}
print(json.dumps(out))
"""


def _run(mailbox: Mailbox, stages: str, *extra: str, min_messages: int = 10) -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{connection.settings_dict['NAME']}",
           "MAILROOM_SYNC_PROCESS_MIN_MESSAGES": str(min_messages), "CELERY_TASK_ALWAYS_EAGER": "0"}
    done = subprocess.run([sys.executable, "-c", _RUN, str(mailbox.pk), stages, *extra], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _under_limit(peaks: dict) -> None:
    print(json.dumps({k: (v["kb"] // 1024, v["child_kb"] // 1024) for k, v in peaks.items()}))
    for stage, peak in peaks.items():
        assert peak["kb"] < LIMIT_KB, (stage, peaks)
        assert peak["child_kb"] < LIMIT_KB, (stage, peaks)


def _large_mails(dovecot, user, sizes: list[int]) -> dict[str, bytes]:  # noqa: ANN001
    payloads = {}
    for n, mb in enumerate(sizes):
        name = f"drawings-{n}.pdf"
        payloads[name] = os.urandom(mb * MB)
        dovecot.append(user, "INBOX", make_message(
            subject=f"Drawings {n}", attachment=(name, payloads[name], "application/pdf")))
    return payloads


def _whole(mailbox: Mailbox, payloads: dict[str, bytes]) -> None:
    emails = Email.objects.filter(mailbox=mailbox)
    assert emails.count() == len(payloads)
    assert set(emails.values_list("parse_state", flat=True)) == {Email.ParseState.PARSED}
    assert set(emails.values_list("truncated", flat=True)) == {False}
    attachments = Attachment.objects.filter(email__mailbox=mailbox).select_related("blob")
    assert sorted(a.filename for a in attachments) == sorted(payloads)
    for attachment in attachments:
        assert decompress(attachment.blob.data) == payloads[attachment.filename]




@pytest.mark.parametrize("min_messages", [0, 1], ids=["in_process", "fetch_process"])
def test_pop3_sync_and_parse_of_two_large_mails_stay_under_200_mb(
        dovecot, mail_user, pop3_mailbox, min_messages):  # noqa: ANN001
    """POP3 sync of a 45 MB and a 41 MB mail, then their parse.

    In the worker's process: sync 228 MB before, 195 MB now (write_sources copied each
    batch's compressed sources into one buffer for the COPY: now streamed); parse 192 MB
    before, 166 MB now (read_source: a COPY TO brought a source as one message, held ~3x by
    libpq, psycopg2 and the buffer: now read in 4 MB pieces). With the fetch process: sync
    142 MB (worker) and 145 MB (child), passed as it was."""
    payloads = _large_mails(dovecot, mail_user, [33, 30])
    _under_limit(_run(pop3_mailbox, "sync,parse", min_messages=min_messages))
    _whole(pop3_mailbox, payloads)


def test_imap_sync_in_the_workers_process_and_retry_stay_under_200_mb(
        dovecot, mail_user, imap_mailbox):  # noqa: ANN001
    """IMAP sync of a 45 MB mail in the worker's own process (a small download), its parse;
    then Retry of the same mail recorded as failed to store, fetched again.

    Passed as it was: sync 156 MB; parse and Retry (which parses) 191 MB before, 165 MB now
    (read_source in pieces)."""
    payloads = _large_mails(dovecot, mail_user, [33])
    peaks = _run(imap_mailbox, "sync,parse", min_messages=0)
    _whole(imap_mailbox, payloads)
    # The mail failed to store (as a batch that could not be written): Retry fetches it again.
    folder = MailFolder.objects.get(mailbox=imap_mailbox, name="INBOX")
    email = Email.objects.get(mailbox=imap_mailbox)
    uid = email.locations.get().uid
    Email.objects.filter(pk=email.pk).delete()
    MessageError.objects.create(mailbox=imap_mailbox, folder=folder, uidvalidity=folder.uidvalidity,
                                uid=uid, error="Could not store this message")
    peaks.update(_run(imap_mailbox, "retry", min_messages=0))
    _under_limit(peaks)
    _whole(imap_mailbox, payloads)
    assert not MessageError.objects.filter(mailbox=imap_mailbox, resolved_at__isnull=True).exists()


def test_completing_a_headers_only_mail_when_the_limit_is_raised_stays_under_200_mb(
        dovecot, mail_user, imap_mailbox):  # noqa: ANN001
    """A 45 MB mail over a 10 MB limit is imported as its headers; the limit goes back to
    50 MB and the next sync downloads it whole into the same email, then parses it.

    Sync 393 MB before, 156 MB now: complete_truncated wrote the whole source with an
    UPDATE (bytea as hex text); now binary COPY (write_sources). Parse 265 MB before (the
    sync's heap left in the process), 165 MB now."""
    payloads = _large_mails(dovecot, mail_user, [33])
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(max_message_bytes=10 * MB)
    _run(imap_mailbox, "sync", min_messages=0)
    assert Email.objects.get(mailbox=imap_mailbox).truncated
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(max_message_bytes=50 * MB)
    _under_limit(_run(imap_mailbox, "sync,parse", min_messages=0))
    _whole(imap_mailbox, payloads)


def test_downloading_a_large_attachment_stays_under_200_mb(dovecot, mail_user, imap_mailbox):  # noqa: ANN001
    """A 33 MB attachment downloaded through the API and the page, in a web process (82 MB
    idle). API 250 MB and page 283 MB before (the blob as hex text from the SELECT, its
    bytes, a copy, the content, the response); 140 MB now: the compressed content is read
    in pieces and streamed as it is decompressed (StreamingHttpResponse)."""
    payloads = _large_mails(dovecot, mail_user, [33])
    _run(imap_mailbox, "sync,parse", min_messages=0)
    _whole(imap_mailbox, payloads)
    peaks = _run(imap_mailbox, "idle,download_api,download_page")
    assert peaks["download_api"]["result"] == peaks["download_page"]["result"] == 33 * MB
    _under_limit(peaks)


def test_sending_with_an_18_mb_attachment_and_its_copy_to_sent_stay_under_200_mb(
        dovecot, mail_user, imap_mailbox, smtp_outbox):  # noqa: ANN001
    """A mail with an 18 MB attachment (the limit; a 24 MB message) composed in the CRM,
    then delivered over SMTP and copied to the Sent folder, each stage measured alone.

    Compose 320 MB, then 198 MB (the source and the attachment were INSERTed as hex
    text: now binary COPY), now 150 MB (the email package held the attachment ~4 times
    while encoding and generating: now a stand-in replaced by its base64 lines,
    sending._with_contents). Deliver 385 MB, then 233 MB (the source was SELECTed as hex
    text: now read_source; smtp.send and sending._recipients parsed the whole mail: now its
    header block only), now 137 MB (aiosmtplib's DATA rewrote the whole message's line ends
    at once, ~4 copies: now written in 1 MB pieces, smtp._sendmail_in_pieces). Sent copy
    234 MB, now 136-140 MB (imaplib's APPEND rewrote every line end:
    ImapSession._append_as_is)."""
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(
        smtp_host=smtp_outbox.host, smtp_port=smtp_outbox.port, smtp_security="starttls",
        smtp_username=smtp_outbox.username, smtp_password=smtp_outbox.password)
    peaks = _run(imap_mailbox, "idle,send,deliver,sent_copy", "18")
    assert peaks["deliver"]["result"] == Email.SendState.SENT
    email = Email.objects.get(mailbox=imap_mailbox, source=Email.Source.CRM)
    attachment = Attachment.objects.select_related("blob").get(email=email)
    assert attachment.size == 18 * MB
    assert len(decompress(EmailSource.objects.get(email=email).compressed())) == email.size
    _under_limit(peaks)


def test_many_messages_held_back_or_failed_are_fetched_again_in_batches_under_200_mb(
        dovecot, mail_user, imap_mailbox):  # noqa: ANN001
    """Ten 8 MB mails (80 MB) that a server held back on an earlier run (its reply had no
    body), then the same that failed to store, fetched again by the next sync and by Retry:
    each was one FETCH of every such message at once, raw and compressed in memory together
    (with fifteen, sync and Retry each peaked at 368 MB); now in batches as any download (99
    and 119 MB with fifteen). Ten since session 10, for CI time: ~2.5 times 80 MB is still
    over the limit for the old way."""
    payloads = _large_mails(dovecot, mail_user, [8] * 10)
    _run(imap_mailbox, "sync,parse", min_messages=0)
    _whole(imap_mailbox, payloads)
    folder = MailFolder.objects.get(mailbox=imap_mailbox, name="INBOX")

    def lost(error: str) -> None:
        """As if the mails had not been stored: their rows gone, an error per message."""
        uids = list(EmailLocation.objects.filter(folder=folder).values_list("uid", flat=True))
        assert len(uids) == 10
        Email.objects.filter(mailbox=imap_mailbox).delete()
        MessageError.objects.bulk_create([MessageError(
            mailbox=imap_mailbox, folder=folder, uidvalidity=folder.uidvalidity, uid=uid,
            error=error) for uid in uids])

    from mailsync.sync.fetcher import UNDELIVERED

    lost(UNDELIVERED)  # held back by the server: the next sync asks for them again
    peaks = _run(imap_mailbox, "sync", min_messages=0)
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 10
    lost("Could not store this message")  # failed to store: the user's Retry
    peaks.update(_run(imap_mailbox, "retry,parse", min_messages=0))
    _under_limit(peaks)
    _whole(imap_mailbox, payloads)
    assert not MessageError.objects.filter(mailbox=imap_mailbox, resolved_at__isnull=True).exists()


def test_pop3_retry_of_many_failed_messages_stays_under_200_mb(pop3_mailbox):  # noqa: ANN001
    """POP3 keeps the raw bytes of a message it could not store with its error (the server
    may have deleted it since). Retry of ten such 8 MB mails (~80 MB compressed) read every
    error with its bytes at once (fifteen: 468 MB): now one at a time (fifteen: 138 MB)."""
    from mailsync.storage import compress

    folder = MailFolder.objects.create(mailbox=pop3_mailbox, name="INBOX", special_use="inbox")
    payloads = {}
    for n in range(10):
        name = f"scan-{n}.pdf"
        payloads[name] = os.urandom(8 * MB)
        raw = make_message(subject=f"Scan {n}", attachment=(name, payloads[name], "application/pdf"))
        MessageError.objects.create(mailbox=pop3_mailbox, folder=folder, uidvalidity=0, uid=n + 1,
                                    error="Could not store this message", raw=compress(raw))
    peaks = _run(pop3_mailbox, "retry", min_messages=0)
    _under_limit(peaks)
    _whole(pop3_mailbox, payloads)
    assert not MessageError.objects.filter(mailbox=pop3_mailbox, resolved_at__isnull=True).exists()
