"""replies, the Sent-folder copy after an incremental sync, POP3 mailboxes, the
record link over the API."""
from __future__ import annotations

import email
import email.policy

import pytest
from rest_framework.test import APIClient

from mailsync import sending, services
from mailsync.models import Email, EmailLink, Mailbox
from mailsync.sync.imap import ImapSync
from tests.factories import ContactFactory, DealFactory, LeadFactory, MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db


def _smtp(mailbox, smtp_outbox):
    mailbox.smtp_host, mailbox.smtp_port = smtp_outbox.host, smtp_outbox.port
    mailbox.smtp_security = "starttls"
    mailbox.smtp_username, mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    mailbox.save()
    return mailbox


@pytest.fixture
def box(imap_mailbox: Mailbox, smtp_outbox) -> Mailbox:
    return _smtp(imap_mailbox, smtp_outbox)


def parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_sent_copy_is_not_stored_twice_after_an_incremental_sync_with_alias_and_bcc(
        box, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    from mailsync import senders

    dovecot.deliver(mail_user, make_message(to=mail_user.email, subject="Hello"))
    ImapSync(box, timeout=10).run()  # folders and cursors exist before the send
    senders.mailbox_alias_add(actor=box.owner, mailbox=box, address="sales@example.test",
                              display_name="Sales")
    contact = ContactFactory(owner=box.owner, email="grace@navy.example")
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(actor=box.owner, from_address="sales@example.test",
                                    to="grace@navy.example", bcc="me@example.test",
                                    subject="Angebot — Ü", text="x", record=contact,
                                    attachments=[sending.OutgoingAttachment(
                                        "Ä.txt", "text/plain", b"1")])
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.SENT and stored.send_error == ""
    ImapSync(box, timeout=10).run()
    ImapSync(box, timeout=10).run()
    rows = Email.objects.filter(mailbox=box, message_id=stored.message_id)
    assert rows.count() == 1, [(r.pk, r.source, r.direction) for r in rows]
    row = rows.get()
    assert row.direction == Email.Direction.SENT
    assert [loc.folder.name for loc in row.locations.select_related("folder")] == ["Sent"]
    assert EmailLink.objects.filter(email=row, contact=contact).count() == 1



def test_reply_without_record_is_linked_to_the_parents_record(
        box, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    owner = box.owner
    lead = LeadFactory(owner=owner, email="customer@client.example")
    dovecot.deliver(mail_user, make_message(to=mail_user.email, subject="Hi",
                                            message_id="<p7@client.example>"))
    ImapSync(box, timeout=10).run()
    services.emails_parse_pending(mailbox_id=box.pk)
    parent = Email.objects.get(message_id="p7@client.example")
    assert EmailLink.objects.filter(email=parent, lead=lead).exists()
    with django_capture_on_commit_callbacks(execute=True):
        reply = sending.email_send(actor=owner, from_address=box.email_address,
                                   to="customer@client.example", subject="Re: Hi",
                                   text="Hello.", in_reply_to=parent)
    assert EmailLink.objects.filter(email=reply, lead=lead).exists()


def test_pop3_mailbox_send_is_recorded_once_and_clean(
        dovecot, mail_user, smtp_outbox, django_capture_on_commit_callbacks):
    box = _smtp(MailboxFactory(owner=UserFactory(), email_address=mail_user.email,
                               protocol=Mailbox.Protocol.POP3, incoming_host=dovecot.host,
                               incoming_port=dovecot.pop3s_port, incoming_security="ssl",
                               username=mail_user.username, password=mail_user.password,
                               is_active=True), smtp_outbox)
    deal = DealFactory(owner=box.owner)
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(actor=box.owner, from_address=box.email_address,
                                    to="grace@navy.example", bcc=box.email_address,
                                    subject="From POP3", text="x", record=deal)
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.SENT and stored.send_error == ""
    assert len(smtp_outbox.messages) == 1
    assert EmailLink.objects.filter(email=stored, deal=deal).exists()
    # the Bcc-to-self copy lands in the INBOX; a POP3 download must recognise it
    dovecot.deliver(mail_user, smtp_outbox.messages[0].raw)
    from mailsync.sync.pop3 import Pop3Sync
    Pop3Sync(box, timeout=10).run()
    rows = Email.objects.filter(mailbox=box, message_id=stored.message_id)
    assert rows.count() == 1, [(r.pk, r.source, r.direction) for r in rows]


def test_api_send_on_a_deal_the_user_cannot_see_is_refused(
        box, smtp_outbox, django_capture_on_commit_callbacks):
    api = APIClient()
    api.force_authenticate(box.owner)
    hidden = DealFactory()
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": ["a@b.example"], "subject": "x",
            "text": "y", "deal": hidden.pk}, format="json")
    assert response.status_code == 400, response.content
    assert smtp_outbox.messages == [] and not Email.objects.filter(source=Email.Source.CRM).exists()
    mine = DealFactory(owner=box.owner)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": ["a@b.example"], "subject": "x",
            "text": "y", "deal": mine.pk}, format="json")
    assert response.status_code == 202, response.content
    assert EmailLink.objects.filter(email_id=response.json()["id"], deal=mine).exists()
    assert len(smtp_outbox.messages) == 1


@pytest.mark.parametrize("how", ["cc", "bcc"])
def test_copy_to_self_arriving_in_the_inbox_is_the_same_email(
        box, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks, how):
    """Cc/Bcc to one's own address: the copy delivered to the INBOX is the mail the CRM
    stored, not a second Email."""
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(actor=box.owner, from_address=box.email_address,
                                    to="grace@navy.example", subject=f"Self {how}", text="x",
                                    **{how: box.email_address})
    dovecot.deliver(mail_user, smtp_outbox.messages[0].raw)
    ImapSync(box, timeout=10).run()
    rows = Email.objects.filter(mailbox=box, message_id=stored.message_id)
    assert rows.count() == 1, [(r.pk, r.source, r.direction,
                                [l.folder.name for l in r.locations.select_related("folder")])
                               for r in rows]
