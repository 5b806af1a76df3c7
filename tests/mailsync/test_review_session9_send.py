"""Review session 9, sending: what a salesperson notices when sending from the CRM over the
REST API and the compose page, against the real SMTP server (tests/testbed/smtp.py) and the
private Dovecot. Nothing is mocked."""
from __future__ import annotations

import email
import email.policy

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from crm import services as crm_services
from mailsync import sending, senders
from mailsync.models import Email, EmailLink, Mailbox
from mailsync.sync.imap import ImapSync
from tests.factories import ContactFactory, DealFactory, MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message
from tests.testbed import smtp as testbed_smtp

pytestmark = pytest.mark.django_db


@pytest.fixture
def box(imap_mailbox: Mailbox, smtp_outbox) -> Mailbox:
    imap_mailbox.smtp_host, imap_mailbox.smtp_port = smtp_outbox.host, smtp_outbox.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username, imap_mailbox.smtp_password = smtp_outbox.username, smtp_outbox.password
    imap_mailbox.display_name = "Ana Ruiz"
    imap_mailbox.save()
    return imap_mailbox


@pytest.fixture
def api(box) -> APIClient:
    client = APIClient()
    client.force_authenticate(box.owner)
    return client


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


# -- header injection through characters Python's email package takes for line breaks -------

@pytest.mark.parametrize("field, value", [
    ("subject", "Quote\x0bBcc: victim@evil.example"),      # vertical tab
    ("subject", "Quote\u2028Bcc: victim@evil.example"),    # LINE SEPARATOR
    ("subject", "Angebot\x85X-Injected: 1"),               # NEL
    ("to", '"Grace\x0cHopper" <grace@navy.example>'),      # form feed in a display name
    ("cc", '"Ops\x1e" <ops@navy.example>'),                 # record separator
])
def test_a_line_break_python_recognises_in_a_header_is_a_400_not_a_500(
        api, box, smtp_outbox, field, value, django_capture_on_commit_callbacks):
    # Given a salesperson composing over the API, with a subject or a recipient name that
    # holds a character str.splitlines() (and so the email package) treats as a line end
    payload = {"from_address": box.email_address, "to": "grace@navy.example",
               "subject": "Quote", "text": "Hello", field: value}
    # When they send it
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", payload, format="json")
    # Then they get a 400 naming the field (not a 500), and nothing is stored or sent
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert not Email.objects.filter(mailbox=box).exists()
    assert smtp_outbox.messages == []


def test_a_reply_to_mail_whose_subject_holds_a_vertical_tab_can_be_sent(
        box, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    # Given a received mail whose (encoded-word) subject decodes to text with a vertical tab
    dovecot.deliver(mail_user, make_message(
        subject="=?utf-8?q?Offer=0Bpart_two?=", message_id="<vt@client.example>",
        to=mail_user.email))
    ImapSync(box, timeout=10).run()
    parent = Email.objects.get(message_id="vt@client.example")
    # When the salesperson answers it with the reply defaults of the compose page
    defaults = sending.reply_defaults(email=parent)
    with django_capture_on_commit_callbacks(execute=True):
        reply = sending.email_send(actor=box.owner, from_address=box.email_address,
                                   to=defaults["to"], subject=defaults["subject"],
                                   html=defaults["html"], in_reply_to=parent)
    # Then the reply goes out, with the odd character made a space and one "Re:"
    reply.refresh_from_db()
    assert reply.send_state == Email.SendState.SENT, reply.send_error
    assert parsed(smtp_outbox.wait_for(1)[0].raw)["Subject"] == "Re: Offer part two"


# -- attachments -----------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["message/rfc822", "multipart/mixed"])
def test_attaching_a_saved_email_file_sends_it_intact(
        api, box, smtp_outbox, content_type, django_capture_on_commit_callbacks):
    # Given a saved email (.eml), which browsers upload as message/rfc822
    eml = b"From: a@b.example\r\nSubject: old\r\n\r\nthe old mail\r\n"
    upload = SimpleUploadedFile("forwarded.eml", eml, content_type=content_type)
    # When it is attached to a mail sent over the API
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": "grace@navy.example",
            "subject": "The mail you asked for", "text": "Attached.", "attachments": [upload],
        }, format="multipart")
    # Then it is accepted and sent, and the recipient gets the file byte for byte
    assert response.status_code == 202, response.content
    stored = Email.objects.get(pk=response.json()["id"])
    assert stored.send_state == Email.SendState.SENT, stored.send_error
    [attachment] = list(parsed(smtp_outbox.wait_for(1)[0].raw).iter_attachments())
    assert attachment.get_filename() == "forwarded.eml"
    assert attachment.get_content() == eml


def test_odd_attachment_names_and_an_empty_file_arrive_as_given(
        api, box, smtp_outbox, django_capture_on_commit_callbacks):
    # Given files named with quotes, a path, unicode, and one of zero bytes
    files = [SimpleUploadedFile('Q3 "final" offer.pdf', b"%PDF-1.4", content_type="application/pdf"),
             SimpleUploadedFile("..\\..\\Übersicht – 2026.txt", "grüße".encode(), content_type="text/plain"),
             SimpleUploadedFile("empty.csv", b"", content_type="text/csv")]
    # When sent over the API
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": "grace@navy.example",
            "subject": "Files", "text": "x", "attachments": files}, format="multipart")
    assert response.status_code == 202, response.content
    # Then the recipient gets three files with safe names and the same bytes
    # (quotes become "_", as in every file name the CRM stores: safe_filename)
    got = {a.get_filename(): a.get_payload(decode=True) for a in
           parsed(smtp_outbox.wait_for(1)[0].raw).iter_attachments()}
    assert got == {"Q3 _final_ offer.pdf": b"%PDF-1.4", "Übersicht – 2026.txt": "grüße".encode(),
                   "empty.csv": b""}
    # And the stored mail lists the same names and sizes
    stored = Email.objects.get(pk=response.json()["id"])
    assert sorted((a.filename, a.size) for a in stored.attachments.all()) == sorted(
        [("Q3 _final_ offer.pdf", 8), ("Übersicht – 2026.txt", 7), ("empty.csv", 0)])


def test_attachments_over_the_limit_are_a_400_with_json(api, box, smtp_outbox, monkeypatch):
    monkeypatch.setattr(sending, "MAX_ATTACHMENTS_BYTES", 1024)
    big = SimpleUploadedFile("big.bin", b"x" * 2048, content_type="application/octet-stream")
    response = api.post("/api/v1/emails/send/", {
        "from_address": box.email_address, "to": "grace@navy.example", "subject": "Big",
        "text": "x", "attachments": [big]}, format="multipart")
    assert response.status_code == 400
    assert "attachments" in response.json()["errors"]
    assert not Email.objects.filter(mailbox=box).exists() and smtp_outbox.messages == []


# -- from addresses --------------------------------------------------------------------------

def test_an_alias_that_is_a_colleagues_mailbox_address_cannot_be_used_to_send_as_them(
        box, smtp_outbox, dovecot):
    # Given a colleague with their own mailbox with an outgoing server
    colleague = UserFactory()
    theirs = MailboxFactory(owner=colleague, email_address="boss@example.test",
                            smtp_host=box.smtp_host, smtp_port=box.smtp_port, is_active=True)
    theirs.aliases.create(address="boss-alias@example.test")
    # When the salesperson tries to add the colleague's address (or alias) to their own mailbox
    for address in ("Boss@example.test", "boss-alias@example.test"):
        with pytest.raises(ValidationError) as caught:
            senders.mailbox_alias_add(actor=box.owner, mailbox=box, address=address)
        # Then it is refused with a message on the address field
        assert "address" in caught.value.message_dict
    # And an alias row that exists already (added before the rule) is not offered, nor usable
    box.aliases.create(address="boss@example.test")
    assert "boss@example.test" not in {c.address for c in senders.sender_choices(box.owner)}
    with pytest.raises(ValidationError) as caught:
        sending.email_send(actor=box.owner, from_address="boss@example.test",
                           to="grace@navy.example", subject="Hi", text="x")
    assert "from_address" in caught.value.message_dict
    # While the colleague still sends as themself
    assert "boss@example.test" in {c.address for c in senders.sender_choices(colleague)}


# -- recipients, Bcc, the record link ---------------------------------------------------------

def test_a_recipient_repeated_across_to_cc_and_bcc_gets_one_copy_and_bcc_stays_private(
        api, box, smtp_outbox, django_capture_on_commit_callbacks):
    owner = box.owner
    box.sharing = Mailbox.Sharing.PUBLIC
    box.save()
    contact = ContactFactory(owner=owner, email="grace@navy.example")
    deal = DealFactory(owner=owner, contact=contact)
    colleague = UserFactory()
    crm_services.record_share(actor=owner, record=deal, user=colleague)
    # When the salesperson sends on the deal with Grace in To, Cc and Bcc (any case) and a
    # private Bcc to their manager
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": ["grace@navy.example"],
            "cc": "GRACE@navy.example", "bcc": "grace@navy.example, manager@example.test",
            "subject": "Offer", "text": "x", "deal": deal.pk}, format="json")
    assert response.status_code == 202, response.content
    # Then the server is asked to deliver once per person, and the Bcc is never transmitted
    [received] = smtp_outbox.wait_for(1)
    assert sorted(r.lower() for r in received.rcpt_tos) == ["grace@navy.example", "manager@example.test"]
    assert b"manager@example.test" not in received.raw
    # And the mail is on the deal and on its contact
    stored = Email.objects.get(pk=response.json()["id"])
    assert EmailLink.objects.filter(email=stored, deal=deal).exists()
    assert EmailLink.objects.filter(email=stored, contact=contact).exists()
    # And a colleague who sees the deal sees the mail, but not who was in Bcc
    other = APIClient()
    other.force_authenticate(colleague)
    seen = other.get(f"/api/v1/emails/{stored.pk}/")
    assert seen.status_code == 200, seen.content
    assert b"manager@example.test" not in seen.content
    page = Client()
    page.force_login(colleague)
    html = page.get(f"/mail/{stored.pk}/")
    assert html.status_code == 200 and b"manager@example.test" not in html.content
    # While the sender does see it
    mine = Client()
    mine.force_login(owner)
    assert b"manager@example.test" in mine.get(f"/mail/{stored.pk}/").content


def test_no_recipient_at_all_is_a_400(api, box, smtp_outbox):
    response = api.post("/api/v1/emails/send/", {
        "from_address": box.email_address, "to": [" ", ""], "cc": "", "subject": "x",
        "text": "x"}, format="json")
    assert response.status_code == 400 and "to" in response.json()["errors"]


# -- replies from the compose page -------------------------------------------------------------

def test_replying_on_the_page_keeps_one_re_and_the_thread(
        box, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    owner = box.owner
    contact = ContactFactory(owner=owner, email="customer@client.example")
    dovecot.deliver(mail_user, make_message(subject="RE: Quote please", message_id="<p1@client.example>",
                                            to=mail_user.email))
    ImapSync(box, timeout=10).run()
    parent = Email.objects.get(message_id="p1@client.example")
    page = Client()
    page.force_login(owner)
    shown = page.get(f"/mail/compose/?reply={parent.pk}")
    assert shown.status_code == 200
    form = shown.context["form"]
    assert form.initial["subject"] == "RE: Quote please"
    with django_capture_on_commit_callbacks(execute=True):
        done = page.post("/mail/compose/", {
            "reply": parent.pk, "from_address": form.initial["from_address"],
            "to": form.initial["to"], "subject": form.initial["subject"],
            "html": "<p>Here.</p>", "token": form.initial["token"]})
    assert done.status_code == 302, done.content[:2000]
    message = parsed(smtp_outbox.wait_for(1)[0].raw)
    assert message["Subject"] == "RE: Quote please"
    assert message["In-Reply-To"] == "<p1@client.example>"
    reply = Email.objects.get(message_id=message["Message-ID"].strip("<>"))
    assert reply.thread_id == parent.thread_id
    assert EmailLink.objects.filter(email=reply, contact=contact).exists()


# -- SMTP answers: temporary (4xx) against permanent (5xx) -------------------------------------


class _DeferringHandler(testbed_smtp._RecordingHandler):
    """Answers MAIL or RCPT with the reply queued in ``server.answers`` (then 250)."""

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self._server.answers.get("MAIL"):
            return self._server.answers["MAIL"].pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self._server.answers.get("RCPT"):
            return self._server.answers["RCPT"].pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"


class _DeferringServer(testbed_smtp.SMTPServer):
    handler_class = _DeferringHandler

    def __init__(self, ca):
        super().__init__(ca)
        self.answers: dict[str, list[str]] = {}


@pytest.fixture
def deferring_smtp(test_ca):
    server = _DeferringServer(test_ca)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("command, answer, temporary", [
    ("MAIL", "451 4.7.1 Rate limit reached, try again later", True),
    ("RCPT", "450 4.2.0 <grace@navy.example>: Recipient address rejected: Greylisted", True),
    ("MAIL", "553 5.7.1 Sender address rejected: not owned by user", False),
    ("RCPT", "550 5.1.1 <grace@navy.example>: User unknown", False),
])
def test_a_temporary_refusal_says_to_try_again_and_retry_sends_once(
        imap_mailbox, deferring_smtp, command, answer, temporary,
        django_capture_on_commit_callbacks):
    box = imap_mailbox
    box.smtp_host, box.smtp_port, box.smtp_security = deferring_smtp.host, deferring_smtp.port, "starttls"
    box.smtp_username, box.smtp_password = deferring_smtp.username, deferring_smtp.password
    box.save()
    # Given a server that answers the first MAIL or RCPT with a refusal
    deferring_smtp.answers = {command: [answer]}
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(actor=box.owner, from_address=box.email_address,
                                    to="grace@navy.example", subject="Offer", text="x")
    # Then the mail is "failed", with the server's own code and words shown
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.FAILED
    assert answer.split(" ", 1)[0] in stored.send_error
    # and a temporary refusal is told as temporary (not "may not send as this address")
    assert ("temporar" in stored.send_error.lower()) is temporary, stored.send_error
    assert deferring_smtp.messages == []
    # When the salesperson presses Retry, it is sent once
    with django_capture_on_commit_callbacks(execute=True):
        sending.email_send_retry(actor=box.owner, email=stored)
    stored.refresh_from_db()
    assert stored.send_state == Email.SendState.SENT, stored.send_error
    assert len(deferring_smtp.messages) == 1


# -- long non-ASCII subjects and names -----------------------------------------------------------

SUBJECTS = [
    "Angebot für Ihre Anfrage zur Lieferung von Büromaterial im nächsten Quartal – Rückfragen erwünscht",
    "Presupuesto de instalación para la sede de Málaga: revisión técnica y condiciones de pago " * 3,
    "Коммерческое предложение по поставке оборудования для вашего склада в Москве и области",
    "Προσφορά για την προμήθεια εξοπλισμού γραφείου και τις υπηρεσίες συντήρησης του επόμενου έτους",
    # Failed before the fix: "... Öl ÄrgerÄnderung Übergabe", "... ÄrgerQualität Lösung Öl"
    "Änderung Übergabe Größe für Müller Straße Qualität Lösung Bürostühle Öl Ärger Änderung Übergabe",
    "für Lösung der Lösung das für und Änderung Angebot das Ärger Öl und Änderung Ärger Qualität Lösung Öl",
    "Ärger " * 160,
]


@pytest.mark.parametrize("subject", SUBJECTS)
def test_a_long_non_ascii_subject_reaches_the_recipient_with_its_spaces(
        api, box, smtp_outbox, subject, django_capture_on_commit_callbacks):
    subject = subject.strip()[:998].strip()
    # When a salesperson sends a mail with a long subject in their language
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": "kunde@client.example",
            "subject": subject, "text": "x"}, format="json")
    assert response.status_code == 202, response.content
    # Then the recipient reads the subject as typed: no two words glued together where the
    # header was folded (RFC 2047 6.2: white space between encoded words is not text)
    [received] = smtp_outbox.wait_for(1)
    assert parsed(received.raw)["Subject"] == subject
    assert max(len(line) for line in received.raw.split(b"\r\n\r\n")[0].split(b"\r\n")) <= 78
    # And the mail on the record shows it so too
    assert Email.objects.get(pk=response.json()["id"]).subject == subject


def test_the_compose_page_shows_a_form_message_for_a_line_separator_in_the_subject(
        box, smtp_outbox, django_capture_on_commit_callbacks):
    page = Client()
    page.force_login(box.owner)
    form = page.get("/mail/compose/").context["form"]
    with django_capture_on_commit_callbacks(execute=True):
        shown = page.post("/mail/compose/", {
            "from_address": box.email_address, "to": "grace@navy.example",
            "subject": "Offer\u2028Bcc: victim@evil.example", "html": "<p>x</p>",
            "token": form.initial["token"]})
    # Then the page comes back with the message on the subject, and nothing is sent
    assert shown.status_code == 200
    assert "subject" in shown.context["form"].errors
    assert not Email.objects.filter(mailbox=box).exists() and smtp_outbox.messages == []


def test_retry_is_refused_with_json_for_a_colleague_and_for_a_sent_mail(
        api, box, smtp_outbox, django_capture_on_commit_callbacks):
    box.sharing = Mailbox.Sharing.PUBLIC
    box.save()
    contact = ContactFactory(owner=box.owner, email="grace@navy.example")
    colleague = UserFactory()
    crm_services.record_share(actor=box.owner, record=contact, user=colleague)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": "grace@navy.example", "subject": "Hi",
            "text": "x", "contact": contact.pk}, format="json")
    email_id = response.json()["id"]
    # A sent mail cannot be sent again, not even by its sender
    again = api.post(f"/api/v1/emails/{email_id}/retry-send/")
    assert again.status_code == 400 and "send_state" in again.json()["errors"]
    # A colleague who sees it may not send it
    other = APIClient()
    other.force_authenticate(colleague)
    theirs = other.post(f"/api/v1/emails/{email_id}/retry-send/")
    assert theirs.status_code == 403 and theirs.json()["detail"]
    assert len(smtp_outbox.messages) == 1


def test_a_reply_from_an_unknown_address_to_mail_sent_on_a_deal_lands_on_that_deal(
        api, box, smtp_outbox, dovecot, mail_user, django_capture_on_commit_callbacks):
    # Given a mail sent on a deal (not on its contact) over the API
    contact = ContactFactory(owner=box.owner, email="grace@navy.example")
    deal = DealFactory(owner=box.owner, contact=contact)
    DealFactory(owner=box.owner, contact=contact)  # another deal of the same contact
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": "grace@navy.example", "subject": "Quote 7",
            "text": "x", "deal": deal.pk}, format="json")
    sent_id = Email.objects.get(pk=response.json()["id"]).message_id
    assert sent_id.startswith(f"crm.deal.{deal.pk}.")
    # When the customer's colleague, unknown to the CRM, answers it
    dovecot.deliver(mail_user, make_message(
        sender="Someone <someone@gmail.example>", to=mail_user.email, subject="Re: Quote 7",
        message_id="<answer@gmail.example>", in_reply_to=f"<{sent_id}>", references=f"<{sent_id}>"))
    ImapSync(box, timeout=10).run()
    ImapSync(box, timeout=10).run()
    # Then the answer is on that deal (and in the thread), and the sent mail is still one
    # email. (Not on the contact's other deal: neither is the sent mail, since session 10.)
    answer = Email.objects.get(message_id="answer@gmail.example")
    assert EmailLink.objects.filter(email=answer, deal=deal).exists()
    assert EmailLink.objects.filter(email=answer, contact=contact).exists()
    assert answer.thread_id == Email.objects.get(message_id=sent_id).thread_id
    assert Email.objects.filter(mailbox=box, message_id=sent_id).count() == 1


def stored_not_sent(api, box, subject: str, capture) -> tuple[int, list]:  # noqa: ANN001
    """Send over the API with the delivery task held back (a busy queue): the stored mail's
    id and the held-back callbacks, to run when the test says."""
    with capture(execute=False) as queued:
        response = api.post("/api/v1/emails/send/", {
            "from_address": box.email_address, "to": "grace@navy.example",
            "subject": subject, "text": "x"}, format="json")
    assert response.status_code == 202
    return response.json()["id"], queued


def test_a_mail_deleted_while_it_waits_to_be_sent_is_not_sent(
        api, box, smtp_outbox, django_capture_on_commit_callbacks):
    # Given a mail stored as "sending" whose delivery task has not run yet (a busy queue)
    email_id, queued = stored_not_sent(api, box, "Wrong price", django_capture_on_commit_callbacks)
    # When the salesperson deletes it at once (wrong price!)
    assert api.delete(f"/api/v1/emails/{email_id}/").status_code == 204
    # and the delivery task then runs
    for callback in queued:
        callback()
    # Then nothing reaches the customer, and the mail is not reported as sent
    assert smtp_outbox.messages == []
    stored = Email.objects.get(pk=email_id)
    assert stored.send_state != Email.SendState.SENT


def test_a_mail_too_large_for_the_server_says_so_not_that_the_address_is_not_allowed(
        imap_mailbox, deferring_smtp, django_capture_on_commit_callbacks):
    box = imap_mailbox
    box.smtp_host, box.smtp_port, box.smtp_security = deferring_smtp.host, deferring_smtp.port, "starttls"
    box.smtp_username, box.smtp_password = deferring_smtp.username, deferring_smtp.password
    box.save()
    # Given a server with a size limit (Postfix's default is 10 MB; the CRM allows 18 MB of
    # attachments), which refuses at MAIL FROM once it reads the declared SIZE
    deferring_smtp.answers = {"MAIL": ["552 5.3.4 Message size exceeds fixed limit"]}
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(actor=box.owner, from_address=box.email_address,
                                    to="grace@navy.example", subject="Catalogue", text="x",
                                    attachments=[sending.OutgoingAttachment(
                                        "catalogue.pdf", "application/pdf", b"%PDF" * 1000)])
    stored.refresh_from_db()
    # Then the failure says the mail is too large, not that the address may not be used
    assert stored.send_state == Email.SendState.FAILED
    assert "too large" in stored.send_error
    assert "may not be allowed to send as" not in stored.send_error


def test_sending_from_a_mailbox_that_is_not_the_active_one_is_recorded_once_after_switching(
        box, smtp_outbox, dovecot, django_capture_on_commit_callbacks):
    from mailsync import services

    # Given a user whose active mailbox is another one; the first stays connected
    other_user = dovecot.add_user()
    Mailbox.objects.filter(pk=box.pk).update(is_active=False)
    active = MailboxFactory(owner=box.owner, email_address=other_user.email, is_active=True,
                            incoming_host=dovecot.host, incoming_port=dovecot.imaps_port,
                            incoming_security="ssl", username=other_user.username,
                            password=other_user.password, smtp_host=box.smtp_host,
                            smtp_port=box.smtp_port, smtp_username=box.smtp_username,
                            smtp_password=box.smtp_password)
    box.refresh_from_db()
    # When they send choosing the inactive mailbox's address
    with django_capture_on_commit_callbacks(execute=True):
        stored = sending.email_send(actor=box.owner, from_address=box.email_address,
                                    to="grace@navy.example", subject="Hola — qué tal", text="x")
    stored.refresh_from_db()
    # Then it goes out from that address, with its copy in that mailbox's Sent folder
    assert stored.send_state == Email.SendState.SENT and stored.send_error == ""
    assert stored.mailbox_id == box.pk
    assert smtp_outbox.wait_for(1)[0].mail_from == box.email_address
    # And once that mailbox is the active one and synced, the mail is there once
    services.mailbox_activate(actor=box.owner, mailbox=box)
    ImapSync(Mailbox.objects.get(pk=box.pk), timeout=10).run()
    assert Email.objects.filter(message_id=stored.message_id).count() == 1
    assert active.emails.count() == 0


def test_a_second_delivery_beside_one_still_running_does_not_send_the_mail_twice(
        api, box, smtp_outbox, django_capture_on_commit_callbacks):
    """BUG (fixed in review, session 9). A Retry of a mail that looked stuck, queued while its
    first delivery was still running (a slow server), sent it a second time: each delivery
    checked the state, then sent. Now a delivery runs only while it holds the mail's send
    claim (``sync.lock.send_claim``)."""
    import threading

    from django.db import connection

    from mailsync.sync.lock import send_claim

    # Given a stored mail and a first delivery of it still running: its claim is held by
    # another thread on its own database connection (the real delivery would be in SMTP now)
    email_id, queued = stored_not_sent(api, box, "Quote", django_capture_on_commit_callbacks)
    holding, release = threading.Event(), threading.Event()

    def first_delivery() -> None:
        try:
            with send_claim(email_id) as mine:
                assert mine
                holding.set()
                release.wait(10)
        finally:
            connection.close()

    first = threading.Thread(target=first_delivery)
    first.start()
    assert holding.wait(5)
    try:
        # When a second delivery of the same mail runs meanwhile
        second = sending.email_deliver(email_id=email_id)
        # Then it sends nothing and leaves the mail to the first
        assert smtp_outbox.messages == []
        assert second.send_state == Email.SendState.SENDING
    finally:
        release.set()
        first.join(10)
    # When the queued delivery runs with no other holding the claim, and a late duplicate after it
    for callback in queued:
        callback()
    sending.email_deliver(email_id=email_id)
    # Then the customer gets the mail once
    assert len(smtp_outbox.messages) == 1
    assert Email.objects.get(pk=email_id).send_state == Email.SendState.SENT


def test_the_send_claim_without_postgresql_is_held_by_one_delivery_at_a_time(settings, tmp_path):
    """The embedded default (SQLite) claims a delivery with an flock under DATA_DIR/locks
    (the suite runs on PostgreSQL, so the file claim is exercised directly): while one
    delivery holds it a second is refused, and once let go it can be taken again."""
    from mailsync.sync.lock import _send_claim_file

    settings.DATA_DIR = tmp_path
    with _send_claim_file(41) as first:
        with _send_claim_file(41) as second, _send_claim_file(42) as other_mail:
            assert (first, second, other_mail) == (True, False, True)
    with _send_claim_file(41) as again:
        assert again
