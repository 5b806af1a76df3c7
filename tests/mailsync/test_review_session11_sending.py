"""Review session 11: sending from the CRM (From/Reply-To, recipients, headers on the
wire, replies, SMTP answers)."""
from __future__ import annotations

import email
import email.policy

import pytest

from mailsync import senders, sending
from mailsync.models import Email, Mailbox
from tests.testbed import smtp as testbed_smtp

pytestmark = pytest.mark.django_db


@pytest.fixture
def box(imap_mailbox: Mailbox, smtp_outbox) -> Mailbox:
    imap_mailbox.smtp_host, imap_mailbox.smtp_port = smtp_outbox.host, smtp_outbox.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username = smtp_outbox.username
    imap_mailbox.smtp_password = smtp_outbox.password
    imap_mailbox.save()
    return imap_mailbox


def _send(box, capture, **kw):
    fields = {"from_address": box.email_address, "subject": "Offer", "text": "Our offer."} | kw
    with capture(execute=True):
        stored = sending.email_send(actor=box.owner, **fields)
    stored.refresh_from_db()
    return stored


def _head_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_a_long_unbreakable_ascii_subject_and_name_keep_header_lines_short(
        box, smtp_outbox, django_capture_on_commit_callbacks):
    subject = "x" * 990
    name = "N" * 120
    stored = _send(box, django_capture_on_commit_callbacks, subject=subject,
                   to=f"{name} <grace@navy.example>")
    assert stored.send_state == Email.SendState.SENT, stored.send_error
    [received] = smtp_outbox.messages
    assert max(len(line) for line in _head_lines(received.raw)) <= 998
    msg = email.message_from_bytes(received.raw, policy=email.policy.default)
    assert msg["Subject"] == subject
    assert msg["To"].addresses[0].display_name == name
    assert stored.subject == subject


def test_names_with_commas_and_quotes_are_one_recipient_each(
        box, smtp_outbox, django_capture_on_commit_callbacks):
    stored = _send(box, django_capture_on_commit_callbacks,
                   to='"Doe, John" <john@client.example>, "Müller, Jörg" <jm@client.example>',
                   cc='"O\\"Brien, A" <ob@client.example>')
    assert stored.send_state == Email.SendState.SENT, stored.send_error
    [received] = smtp_outbox.messages
    assert sorted(received.rcpt_tos) == ["jm@client.example", "john@client.example",
                                         "ob@client.example"]
    msg = email.message_from_bytes(received.raw, policy=email.policy.default)
    assert [a.display_name for a in msg["To"].addresses] == ["Doe, John", "Müller, Jörg"]
    assert [a.display_name for a in msg["Cc"].addresses] == ['O"Brien, A']


def test_an_alias_from_with_an_organization_reply_to(
        box, smtp_outbox, django_capture_on_commit_callbacks):
    from crm.models import OrganizationEmail
    from django.utils import timezone

    senders.mailbox_alias_add(actor=box.owner, mailbox=box, address="me2@example.test",
                              display_name="Me Two")
    OrganizationEmail.objects.create(address="sales@example.test", display_name="Sales Team",
                                     created_by=box.owner, verified_at=timezone.now())
    stored = _send(box, django_capture_on_commit_callbacks, from_address="ME2@example.test",
                   reply_to="sales@example.test", to="grace@navy.example")
    assert stored.send_state == Email.SendState.SENT, stored.send_error
    [received] = smtp_outbox.messages
    msg = email.message_from_bytes(received.raw, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == "me2@example.test"
    assert msg["From"].addresses[0].display_name == "Me Two"
    assert msg["Reply-To"].addresses[0].addr_spec == "sales@example.test"
    assert msg["Reply-To"].addresses[0].display_name == "Sales Team"
    assert received.mail_from == box.email_address


def test_reply_all_to_mail_sent_to_an_alias_does_not_copy_the_user_or_the_sender_twice(box):
    senders.mailbox_alias_add(actor=box.owner, mailbox=box, address="me2@example.test")
    parent = Email.objects.create(
        mailbox=box, fingerprint="fp-s11-1", message_id="p1@client.example",
        subject="Hi", from_name="Grace", from_address="grace@navy.example",
        to=[{"name": "", "email": "ME2@example.test"}, {"name": "", "email": "bob@client.example"}],
        cc=[{"name": "", "email": box.email_address.upper()},
            {"name": "", "email": "Grace@Navy.example"}],
        direction=Email.Direction.RECEIVED, text="hello")
    defaults = sending.reply_defaults(email=parent, reply_all=True)
    assert defaults["to"] == "grace@navy.example"
    assert [a.strip().lower() for a in defaults["cc"].split(",")] == ["bob@client.example"]


class _AnsweringHandler(testbed_smtp._RecordingHandler):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self._server.rcpt_answer:
            return self._server.rcpt_answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self._server.data_answer:
            return self._server.data_answer
        return await super().handle_DATA(server, session, envelope)


class AnsweringServer(testbed_smtp.SMTPServer):
    handler_class = _AnsweringHandler

    def __init__(self, ca):
        super().__init__(ca)
        self.rcpt_answer = ""
        self.data_answer = ""


@pytest.fixture
def answering_smtp(test_ca):
    server = AnsweringServer(test_ca)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def answering_box(imap_mailbox: Mailbox, answering_smtp) -> Mailbox:
    imap_mailbox.smtp_host, imap_mailbox.smtp_port = answering_smtp.host, answering_smtp.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username = answering_smtp.username
    imap_mailbox.smtp_password = answering_smtp.password
    imap_mailbox.save()
    return imap_mailbox


def test_too_big_at_the_end_of_data_says_the_mail_is_too_large(
        answering_box, answering_smtp, django_capture_on_commit_callbacks):
    answering_smtp.data_answer = "552 5.3.4 Message size exceeds fixed maximum message size"
    stored = _send(answering_box, django_capture_on_commit_callbacks, to="grace@navy.example")
    assert stored.send_state == Email.SendState.FAILED
    assert "too large" in stored.send_error, stored.send_error
    assert "smaller" in stored.send_error, stored.send_error


def test_a_temporary_refusal_at_the_end_of_data_says_to_retry(
        answering_box, answering_smtp, django_capture_on_commit_callbacks):
    answering_smtp.data_answer = "451 4.7.1 Rate limit exceeded, try again later"
    stored = _send(answering_box, django_capture_on_commit_callbacks, to="grace@navy.example")
    assert stored.send_state == Email.SendState.FAILED
    assert "451" in stored.send_error and "Retry" in stored.send_error, stored.send_error
    assert not answering_smtp.messages


def test_relay_access_denied_says_to_check_the_server_and_login(
        answering_box, answering_smtp, django_capture_on_commit_callbacks):
    answering_smtp.rcpt_answer = "554 5.7.1 <grace@navy.example>: Relay access denied"
    stored = _send(answering_box, django_capture_on_commit_callbacks, to="grace@navy.example")
    assert stored.send_state == Email.SendState.FAILED
    assert "relay" in stored.send_error.lower(), stored.send_error
    assert "SMTP" in stored.send_error and "login" in stored.send_error.lower(), stored.send_error


def test_retry_refuses_a_from_address_the_user_may_no_longer_use(
        box, smtp_outbox, django_capture_on_commit_callbacks):
    alias = senders.mailbox_alias_add(actor=box.owner, mailbox=box, address="me2@example.test")
    box_port = box.smtp_port
    box.smtp_port = 1  # nothing listens: the first attempt fails
    box.save()
    stored = _send(box, django_capture_on_commit_callbacks, from_address="me2@example.test",
                   to="grace@navy.example")
    assert stored.send_state == Email.SendState.FAILED
    box.smtp_port = box_port
    box.save()
    senders.mailbox_alias_delete(actor=box.owner, alias=alias)
    from django.core.exceptions import ValidationError

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(ValidationError) as err:
        sending.email_send_retry(actor=box.owner, email=stored)
    assert "me2@example.test" in str(err.value)
    assert not smtp_outbox.messages
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.FAILED
