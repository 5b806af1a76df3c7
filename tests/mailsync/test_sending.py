"""Sending from the CRM against the real SMTP server (STARTTLS + AUTH) and the private
Dovecot: stored on the record at once, delivered, copied to the Sent folder, never twice;
header injection refused; failures say what to fix and can be retried."""
from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket

import pytest
from django.core.exceptions import ValidationError

from mailsync import sending, senders, services
from mailsync.exceptions import MailAuthError, MailServerUnreachable, MailTLSError
from mailsync.models import Email, EmailLink, Mailbox
from mailsync.protocols import smtp
from mailsync.protocols.base import ServerSettings
from mailsync.sync.imap import ImapSync
from tests.factories import AdministratorFactory, ContactFactory, DealFactory, UserFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


@pytest.fixture
def sender_mailbox(imap_mailbox: Mailbox, smtp_outbox) -> Mailbox:
    """The Dovecot mailbox, sending through the SMTP fixture on its STARTTLS port with its
    own SMTP login (as a provider whose SMTP account differs from the IMAP one)."""
    imap_mailbox.smtp_host = smtp_outbox.host
    imap_mailbox.smtp_port = smtp_outbox.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username = smtp_outbox.username
    imap_mailbox.smtp_password = smtp_outbox.password
    imap_mailbox.display_name = "Ana Ruiz"
    imap_mailbox.save()
    return imap_mailbox


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def sent_folder_messages(dovecot, user) -> list[bytes]:
    imap = dovecot.imap_login(user)
    try:
        imap.select("Sent", readonly=True)
        _, data = imap.uid("SEARCH", None, "ALL")
        found = []
        for uid in data[0].split():
            _, fetched = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            found.append(fetched[0][1])
        return found
    finally:
        imap.logout()


def test_send_stores_on_the_record_delivers_over_starttls_and_copies_to_sent(
        sender_mailbox, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    owner = sender_mailbox.owner
    contact = ContactFactory(owner=owner, email="grace@navy.example", first_name="Grace",
                             last_name="Hopper")
    deal = DealFactory(owner=owner, contact=contact)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        stored = sending.email_send(
            actor=owner, from_address=sender_mailbox.email_address,
            to="Grace Hopper <grace@navy.example>", cc="ops@navy.example",
            bcc="archive@crm.example.com", subject="Compiler licences — Ünïcode",
            html='<p>Hello <b>Grace</b></p><script>alert(1)</script>',
            attachments=[sending.OutgoingAttachment("../../quote.pdf", "application/pdf", b"%PDF-1.4 q")],
            record=contact,
        )
        # Stored at once, before the delivery task runs, with the "sending" state
        assert Email.objects.get(pk=stored.pk).send_state == Email.SendState.SENDING
    assert len(callbacks) == 1

    email_row = Email.objects.get(pk=stored.pk)
    assert email_row.send_state == Email.SendState.SENT, email_row.send_error
    assert email_row.direction == Email.Direction.SENT and email_row.source == Email.Source.CRM
    assert email_row.sent_by == owner and email_row.seen
    assert EmailLink.objects.filter(email=email_row, contact=contact).exists()
    assert EmailLink.objects.filter(email=email_row, deal=deal).exists()  # the contact's deal
    assert re.fullmatch(rf"crm\.contact\.{contact.pk}\.[0-9a-f]{{20}}@example\.test",
                        email_row.message_id)
    assert [a.filename for a in email_row.attachments.all()] == ["quote.pdf"]

    [received] = smtp_outbox.messages
    assert received.tls is True and received.login == smtp_outbox.username
    assert received.mail_from == sender_mailbox.email_address
    assert set(received.rcpt_tos) == {"grace@navy.example", "ops@navy.example",
                                      "archive@crm.example.com"}
    message = parsed(received.raw)
    assert message["Bcc"] is None and b"archive@crm.example.com" not in received.raw
    assert message["Message-ID"] == f"<{email_row.message_id}>"
    assert message["Subject"] == "Compiler licences — Ünïcode"
    assert message["From"].addresses[0].display_name == "Ana Ruiz"
    body = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "Hello Grace" in body.replace("*", "")
    assert "<b>Grace</b>" in html and "<script" not in html  # sanitized before sending
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "quote.pdf" and attachment.get_content() == b"%PDF-1.4 q"

    # The Sent folder on the server has the same message (Bcc kept there, as clients do)
    [copy] = sent_folder_messages(dovecot, mail_user)
    assert parsed(copy)["Message-ID"] == f"<{email_row.message_id}>"
    assert "archive@crm.example.com" in str(parsed(copy)["Bcc"])

    # A later sync of the Sent folder recognises it: one row, now with a location
    ImapSync(sender_mailbox, timeout=10).run()
    rows = Email.objects.filter(mailbox=sender_mailbox, message_id=email_row.message_id)
    assert rows.count() == 1
    assert [loc.folder.name for loc in rows.get().locations.select_related("folder")] == ["Sent"]


def test_reply_carries_threading_headers_and_joins_the_thread(
        sender_mailbox, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    owner = sender_mailbox.owner
    contact = ContactFactory(owner=owner, email="customer@client.example")
    dovecot.deliver(mail_user, make_message(
        subject="Quote please", message_id="<q1@client.example>", references="<root@client.example>",
        in_reply_to="<root@client.example>", to=mail_user.email))
    ImapSync(sender_mailbox, timeout=10).run()
    services.emails_parse_pending(mailbox_id=sender_mailbox.pk)
    parent = Email.objects.get(message_id="q1@client.example")

    defaults = sending.reply_defaults(email=parent)
    assert defaults["to"] == "customer@client.example"
    assert defaults["subject"] == "Re: Quote please"
    assert "<blockquote>" in defaults["html"] and "we would like a quote" in defaults["html"]
    with django_capture_on_commit_callbacks(execute=True):
        reply = sending.email_send(actor=owner, from_address=sender_mailbox.email_address,
                                   to=defaults["to"], subject=defaults["subject"],
                                   html="<p>Here it is.</p>" + defaults["html"],
                                   in_reply_to=parent, record=contact)

    message = parsed(smtp_outbox.wait_for(1)[0].raw)
    assert message["In-Reply-To"] == "<q1@client.example>"
    assert message["References"] == "<root@client.example> <q1@client.example>"
    reply.refresh_from_db()
    assert reply.thread_id == parent.thread_id
    assert reply.send_state == Email.SendState.SENT


@pytest.mark.parametrize("field, value", [
    ("subject", "Hi\r\nBcc: victim@evil.example"),
    ("subject", "Hi\nX-Injected: 1"),
    ("to", "grace@navy.example\r\nBcc: victim@evil.example"),
    ("cc", "a@b.example\nRCPT TO:<x@evil.example>"),
    ("bcc", "a@b.example\x00"),
])
def test_header_injection_is_refused_and_nothing_is_stored_or_sent(
        sender_mailbox, smtp_outbox, field, value, django_capture_on_commit_callbacks):
    fields = {"to": "grace@navy.example", "subject": "Hello", field: value}
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(ValidationError) as caught:
        sending.email_send(actor=sender_mailbox.owner, from_address=sender_mailbox.email_address,
                           text="body", **fields)
    assert field in caught.value.message_dict
    assert not Email.objects.filter(source=Email.Source.CRM).exists()
    assert smtp_outbox.messages == []


def test_the_smtp_adapter_itself_refuses_line_breaks(smtp_outbox):
    settings = ServerSettings(smtp_outbox.host, smtp_outbox.port, "starttls",
                              smtp_outbox.username, smtp_outbox.password, timeout=10,
                              allow_private_hosts=True)
    raw = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: x\r\n\r\nbody\r\n"
    with pytest.raises(smtp.HeaderInjection):
        smtp.send(settings, raw, sender="a@b.example", recipients=["c@d.example>\r\nDATA"])
    with pytest.raises(smtp.HeaderInjection):
        smtp.send(settings, raw, sender="a@b.example\r\nRCPT TO:<x@y.example>", recipients=["c@d.example"])
    assert smtp_outbox.messages == []


def test_failure_is_stored_with_the_reason_and_retry_sends_it_once(
        sender_mailbox, smtp_outbox, django_capture_on_commit_callbacks):
    sender_mailbox.smtp_password = "not the password"
    sender_mailbox.save()
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(actor=sender_mailbox.owner, to="grace@navy.example",
                                    from_address=sender_mailbox.email_address,
                                    subject="Offer", text="Our offer.")
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.FAILED
    assert "rejected the username or password" in stored.send_error
    assert "app-specific password" in stored.send_error
    assert smtp_outbox.messages == []

    # Running the task again (a redelivery) never sends a failed mail by itself
    sending.email_deliver(email_id=stored.pk)
    assert smtp_outbox.messages == []

    # Someone else cannot retry it
    with pytest.raises(Exception, match="Only the sender"):
        sending.email_send_retry(actor=UserFactory(), email=stored)

    sender_mailbox.smtp_password = smtp_outbox.password
    sender_mailbox.save()
    with django_capture_on_commit_callbacks(execute=True):
        sending.email_send_retry(actor=sender_mailbox.owner, email=stored)
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.SENT and stored.send_error == ""
    assert len(smtp_outbox.messages) == 1

    # Sent mail is never sent again, by a retry or a duplicate task
    with pytest.raises(ValidationError):
        sending.email_send_retry(actor=sender_mailbox.owner, email=stored)
    sending.email_deliver(email_id=stored.pk)
    assert len(smtp_outbox.messages) == 1


def test_implicit_tls_port_works_and_connection_failures_are_explained(sender_mailbox, smtp_outbox):
    sender_mailbox.smtp_port, sender_mailbox.smtp_security = smtp_outbox.tls_port, "ssl"
    sending.smtp_test(mailbox=sender_mailbox)  # no exception

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    sender_mailbox.smtp_port = closed
    with pytest.raises(MailServerUnreachable, match="refused the connection"):
        sending.smtp_test(mailbox=sender_mailbox)

    # STARTTLS asked for on the implicit-TLS port: the handshake fails, no plain-text login
    sender_mailbox.smtp_port, sender_mailbox.smtp_security = smtp_outbox.tls_port, "starttls"
    with pytest.raises((MailServerUnreachable, MailTLSError)):
        sending.smtp_test(mailbox=sender_mailbox)

    # No encryption on the STARTTLS port: the server offers AUTH only after STARTTLS
    sender_mailbox.smtp_port, sender_mailbox.smtp_security = smtp_outbox.port, "none"
    with pytest.raises(MailTLSError, match="encrypted connection"):
        sending.smtp_test(mailbox=sender_mailbox)


def test_certificates_are_verified(sender_mailbox, smtp_outbox, monkeypatch):
    # A host name the certificate does not name
    sender_mailbox.smtp_host = "127.0.0.2"
    with pytest.raises((MailTLSError, MailServerUnreachable)):
        sending.smtp_test(mailbox=sender_mailbox)
    # A CA we do not trust (the system bundle without the test CA)
    sender_mailbox.smtp_host = smtp_outbox.host
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(MailTLSError, match="not trusted"):
        sending.smtp_test(mailbox=sender_mailbox)


def test_sending_works_inside_a_running_event_loop(sender_mailbox, smtp_outbox):
    """Playwright's sync API keeps a loop running in the main thread: the adapter must not
    call asyncio.run there."""
    async def inside_a_loop() -> None:
        sending.smtp_test(mailbox=sender_mailbox)

    asyncio.run(inside_a_loop())


def test_adding_a_mailbox_tests_the_smtp_login_and_saves_nothing_on_failure(
        dovecot, mail_user, smtp_outbox):
    user = UserFactory()
    data = {
        "email_address": mail_user.email, "incoming_host": dovecot.host,
        "incoming_port": dovecot.imaps_port, "incoming_security": "ssl",
        "username": mail_user.username, "password": mail_user.password,
        "smtp_host": smtp_outbox.host, "smtp_port": smtp_outbox.port, "smtp_security": "starttls",
        "smtp_username": smtp_outbox.username, "smtp_password": "wrong",
    }
    with pytest.raises(MailAuthError, match="SMTP"):
        services.mailbox_create(actor=user, data=data)
    assert not Mailbox.objects.filter(owner=user).exists()
    data["smtp_password"] = smtp_outbox.password
    assert services.mailbox_create(actor=user, data=data).pk


def test_from_addresses_aliases_and_organization_emails(
        sender_mailbox, smtp_outbox, django_capture_on_commit_callbacks):
    owner = sender_mailbox.owner
    with pytest.raises(ValidationError):
        sending.email_send(actor=owner, from_address="ceo@elsewhere.example", to="a@b.example",
                           subject="x", text="y")
    with pytest.raises(ValidationError):
        senders.mailbox_alias_add(actor=owner, mailbox=sender_mailbox, address="x@y.example\r\nBcc: z")
    senders.mailbox_alias_add(actor=owner, mailbox=sender_mailbox, address="sales@example.test",
                              display_name="Sales")
    with django_capture_on_commit_callbacks(execute=True):
        sending.email_send(actor=owner, from_address="sales@example.test", to="a@b.example",
                           subject="From the alias", text="y")
    message = parsed(smtp_outbox.wait_for(1)[0].raw)
    assert str(message["From"]) == "Sales <sales@example.test>"
    # Bounces come back to the synced mailbox whatever the From
    assert smtp_outbox.messages[0].mail_from == sender_mailbox.email_address

    # An organization email: unusable until the link sent to it is opened
    admin = AdministratorFactory()
    admin_box = Mailbox.objects.create(
        owner=admin, email_address="admin@example.test", incoming_host="127.0.0.1",
        incoming_port=993, username="admin", password="x", smtp_host=smtp_outbox.host,
        smtp_port=smtp_outbox.port, smtp_security="starttls",
        smtp_username=smtp_outbox.username, smtp_password=smtp_outbox.password, is_active=True)
    with pytest.raises(Exception, match="administrators"):
        senders.organization_email_add(actor=owner, address="team@example.test",
                                       display_name="Team", link_for=str)
    with django_capture_on_commit_callbacks(execute=True):
        org = senders.organization_email_add(
            actor=admin, address="team@example.test", display_name="Acme Team",
            link_for=lambda token: f"https://crm.example/confirm-email/{token}/")
    confirmation = smtp_outbox.wait_for(2)[1]
    assert confirmation.rcpt_tos == ("team@example.test",)
    assert confirmation.mail_from == admin_box.email_address
    text = parsed(confirmation.raw).get_content()
    token = re.search(r"confirm-email/([\w-]+)/", text).group(1)
    assert senders.verification_mail(org).send_state == Email.SendState.SENT
    assert not org.is_verified and org.verification_token != token  # only a hash is stored
    with pytest.raises(ValidationError):
        sending.email_send(actor=owner, from_address="team@example.test", to="a@b.example",
                           subject="x", text="y")

    assert senders.organization_email_verify(token=token).is_verified
    with pytest.raises(ValidationError):
        senders.organization_email_verify(token=token)  # a link works once
    with django_capture_on_commit_callbacks(execute=True):
        sending.email_send(actor=owner, from_address="team@example.test", to="a@b.example",
                           reply_to="team@example.test", subject="As the team", text="y")
    message = parsed(smtp_outbox.wait_for(3)[2].raw)
    assert str(message["From"]) == "Acme Team <team@example.test>"
    assert str(message["Reply-To"]) == "Acme Team <team@example.test>"


def test_attachments_over_the_limit_are_refused(sender_mailbox, smtp_outbox):
    big = sending.OutgoingAttachment("big.bin", "application/octet-stream",
                                     b"x" * (sending.MAX_ATTACHMENTS_BYTES + 1))
    with pytest.raises(ValidationError) as caught:
        sending.email_send(actor=sender_mailbox.owner, from_address=sender_mailbox.email_address,
                           to="a@b.example", subject="Big", text="y", attachments=[big])
    assert "attachments" in caught.value.message_dict


def test_only_visible_records_and_mail_can_be_used(sender_mailbox, smtp_outbox):
    stranger_contact = ContactFactory()
    with pytest.raises(Exception, match="cannot see"):
        sending.email_send(actor=sender_mailbox.owner, from_address=sender_mailbox.email_address,
                           to="a@b.example", subject="x", text="y", record=stranger_contact)


def test_sent_folder_append_failure_keeps_the_mail_sent(
        sender_mailbox, smtp_outbox, django_capture_on_commit_callbacks):
    sender_mailbox.password = "wrong now"  # the IMAP login for the Sent copy fails
    sender_mailbox.save()
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(actor=sender_mailbox.owner, to="a@b.example",
                                    from_address=sender_mailbox.email_address,
                                    subject="x", text="y")
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.SENT
    assert stored.send_error.startswith("Sent, but not copied to the Sent folder")
    assert len(smtp_outbox.messages) == 1


def test_address_parsing():
    parsed_list = sending.parse_address_list('"Hopper, Grace" <grace@navy.example>; bob@x.example',
                                             field="to")
    assert [(a.display_name, a.addr_spec) for a in parsed_list] == [
        ("Hopper, Grace", "grace@navy.example"), ("", "bob@x.example")]
    for bad in ["not an address", "a@b.example <c@d.example", "<>", "a@@b.example"]:
        with pytest.raises(ValidationError):
            sending.parse_address_list(bad, field="to")


def test_a_mail_stuck_sending_can_be_retried_only_after_a_while(sender_mailbox, smtp_outbox):
    from datetime import timedelta

    from django.utils import timezone

    # Stored at once as "sending"; its delivery task is never run (as if the worker died)
    stored = sending.email_send(actor=sender_mailbox.owner, to="grace@navy.example",
                                from_address=sender_mailbox.email_address,
                                subject="Stuck", text="Hello.")
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.SENDING and stored.send_attempted_at
    with pytest.raises(ValidationError):
        sending.email_send_retry(actor=sender_mailbox.owner, email=stored)

    Email.objects.filter(pk=stored.pk).update(
        send_attempted_at=timezone.now() - sending.STALE_SENDING - timedelta(minutes=1))
    stored.refresh_from_db()
    retried = sending.email_send_retry(actor=sender_mailbox.owner, email=stored)
    assert retried.send_attempted_at > timezone.now() - timedelta(minutes=1)
    assert retried.created_at == stored.created_at  # the record of when it was written stays


def test_reply_to_hostile_mail_is_refused_cleanly_or_sent_without_its_broken_ids(
        sender_mailbox, smtp_outbox, dovecot, mail_user, client):
    from mailsync.sync.imap import ImapSync
    from tests.factories import ContactFactory
    from tests.mailsync.conftest import make_message

    contact = ContactFactory(owner=sender_mailbox.owner, email="grace@navy.example")
    raw = make_message(sender="Grace <grace@navy.example>", subject="=?utf-8?q?Offer=0D=0ABcc:_x@evil.example?=",
                       message_id="<=?utf-8?q?a=0D=0ABcc:_y@evil.example?=@navy.example>")
    dovecot.deliver(mail_user, raw)
    ImapSync(sender_mailbox, timeout=10).run()
    parent = Email.objects.get(mailbox=sender_mailbox)

    client.force_login(sender_mailbox.owner)
    assert client.get(f"/mail/compose/?reply={parent.pk}").status_code == 200
    # Posting the reply form with the decoded hostile subject: a form error, not a 500
    answer = client.post("/mail/compose/", {
        "reply": parent.pk, "from_address": sender_mailbox.email_address,
        "to": "grace@navy.example", "subject": "Re: =?utf-8?q?hi=0D=0ABcc:_x@evil.example?=",
        "html": "<p>Fine.</p>",
    })
    # An encoded word that decodes to a line break: a form error, not a 500
    assert answer.status_code == 200
    assert "line break" in answer.content.decode().lower() or "header" in answer.content.decode().lower()
    # Sending a reply whose subject decodes to a line break is refused with a message...
    with pytest.raises(Exception) as refused:
        sending.email_send(actor=sender_mailbox.owner, from_address=sender_mailbox.email_address,
                           to="grace@navy.example", subject=parent.subject + "\r\nBcc: z@evil.example",
                           text="x", record=contact, in_reply_to=parent)
    assert "line break" in str(refused.value).lower() or "header" in str(refused.value).lower()
    # ...and a plain subject goes out without quoting the hostile Message-ID
    stored = sending.email_send(actor=sender_mailbox.owner, from_address=sender_mailbox.email_address,
                                to="grace@navy.example", subject="Re: Offer", text="Fine.",
                                record=contact, in_reply_to=parent)
    source = __import__("mailsync.storage", fromlist=["x"]).decompress(stored.source_data.compressed())
    assert b"evil.example" not in source


def test_mail_waiting_to_go_out_is_not_sent_once_its_sender_is_deactivated(
        sender_mailbox, smtp_outbox, django_capture_on_commit_callbacks):
    """The salesperson is deactivated while a mail waits in the queue (or for a retry after
    a refused login): it never reaches the customer, and says why. Before, it went out."""
    from crm import services as crm_services

    owner = sender_mailbox.owner
    with django_capture_on_commit_callbacks(execute=False) as queued:
        stored = sending.email_send(actor=owner, to="grace@navy.example",
                                    from_address=sender_mailbox.email_address,
                                    subject="Last offer", text="Our offer.")
    assert len(queued) == 1  # the delivery task, not run yet
    crm_services.user_deactivate(actor=AdministratorFactory(), user=owner)

    for callback in queued:
        callback()

    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.FAILED
    assert "deactivated" in stored.send_error
    assert smtp_outbox.messages == []
    # A redelivery of the task does not send it either.
    sending.email_deliver(email_id=stored.pk)
    assert smtp_outbox.messages == []
