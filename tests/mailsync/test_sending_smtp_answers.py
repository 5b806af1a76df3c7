"""SMTP server answers that are not a plain 250 (recipient refusals, a reply that
never comes after DATA was accepted) and what the salesperson then sees."""
from __future__ import annotations

import asyncio

import pytest

from mailsync import sending
from mailsync.models import Email, Mailbox
from tests.testbed import smtp as testbed_smtp

pytestmark = pytest.mark.django_db

REFUSED = "nobody@client.example"


class _Handler(testbed_smtp._RecordingHandler):
    delay_after_data = 0.0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self._server.refuse:
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        answer = await super().handle_DATA(server, session, envelope)  # recorded: delivered
        if self._server.delay_after_data:
            await asyncio.sleep(self._server.delay_after_data)
        return answer


class ProbeServer(testbed_smtp.SMTPServer):
    handler_class = _Handler

    def __init__(self, ca):
        super().__init__(ca)
        self.refuse: set[str] = set()
        self.delay_after_data = 0.0


@pytest.fixture
def probe_smtp(test_ca):
    server = ProbeServer(test_ca)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def box(imap_mailbox: Mailbox, probe_smtp) -> Mailbox:
    imap_mailbox.smtp_host = probe_smtp.host
    imap_mailbox.smtp_port = probe_smtp.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username = probe_smtp.username
    imap_mailbox.smtp_password = probe_smtp.password
    imap_mailbox.save()
    return imap_mailbox


def _send(box, capture, **kw):
    fields = {"subject": "Offer", "text": "Our offer."} | kw
    with capture(execute=True):
        stored = sending.email_send(actor=box.owner, from_address=box.email_address, **fields)
    stored.refresh_from_db()
    return stored


def test_one_refused_recipient_of_several_is_reported(box, probe_smtp,
                                                      django_capture_on_commit_callbacks):
    probe_smtp.refuse = {REFUSED}
    stored = _send(box, django_capture_on_commit_callbacks,
                   to=f"grace@navy.example, {REFUSED}")
    [received] = probe_smtp.messages
    assert received.rcpt_tos == ("grace@navy.example",)
    # The mail went to Grace, not to nobody@: the salesperson must be told about nobody@.
    assert REFUSED in stored.send_error, (
        f"state={stored.send_state!r} send_error={stored.send_error!r}: a refused recipient "
        "is silently dropped")


def test_all_recipients_refused_fails_with_their_addresses(box, probe_smtp,
                                                           django_capture_on_commit_callbacks):
    probe_smtp.refuse = {REFUSED}
    stored = _send(box, django_capture_on_commit_callbacks, to=REFUSED)
    assert probe_smtp.messages == []
    assert stored.send_state == Email.SendState.FAILED
    assert REFUSED in stored.send_error and "550" in stored.send_error or \
        "User unknown" in stored.send_error, stored.send_error


def test_no_answer_after_data_is_not_offered_as_a_plain_retry(
        box, probe_smtp, monkeypatch, django_capture_on_commit_callbacks):
    """The server accepted (and delivered) the message but its 250 never reached us."""
    real = sending.smtp_settings
    monkeypatch.setattr(sending, "smtp_settings",
                        lambda mailbox, timeout=2.0: real(mailbox, timeout=2.0))
    probe_smtp.delay_after_data = 4.0
    stored = _send(box, django_capture_on_commit_callbacks, to="grace@navy.example")
    assert len(probe_smtp.messages) == 1  # the customer has it
    print("state", stored.send_state, "error", stored.send_error)
    probe_smtp.delay_after_data = 0.0
    first = (stored.send_state, stored.send_error)
    retried = None
    if stored.send_state == Email.SendState.FAILED:
        with django_capture_on_commit_callbacks(execute=True):
            retried = sending.email_send_retry(actor=box.owner, email=stored)
    # at most once: a mail the server accepted must not reach the customer twice by "Retry"
    assert len(probe_smtp.messages) == 1, (
        f"sent {len(probe_smtp.messages)} times; first attempt ended {first!r} "
        "and Retry was allowed")
