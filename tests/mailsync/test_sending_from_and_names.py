"""From / Reply-To choices and how names, subjects and attachment names arrive."""
from __future__ import annotations

import email
import email.policy

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from crm.models import OrganizationEmail
from mailsync import sending, senders
from mailsync.models import Email, Mailbox
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def box(imap_mailbox: Mailbox, smtp_outbox) -> Mailbox:
    imap_mailbox.smtp_host = smtp_outbox.host
    imap_mailbox.smtp_port = smtp_outbox.port
    imap_mailbox.smtp_security = "starttls"
    imap_mailbox.smtp_username = smtp_outbox.username
    imap_mailbox.smtp_password = smtp_outbox.password
    imap_mailbox.display_name = "José Müller-Łukasz"
    imap_mailbox.save()
    return imap_mailbox


def parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def _send(box, capture, **kw):
    fields = {"from_address": box.email_address, "to": "grace@navy.example",
              "subject": "Offer", "text": "Our offer."} | kw
    with capture(execute=True):
        stored = sending.email_send(actor=box.owner, **fields)
    stored.refresh_from_db()
    return stored


def test_org_email_of_other_users_is_refused_as_from_and_reply_to(box, smtp_outbox):
    other = UserFactory()
    org = OrganizationEmail.objects.create(address="board@example.test", display_name="Board",
                                           verified_at=timezone.now())
    org.allowed_users.add(other)
    for field in ("from_address", "reply_to"):
        kw = {"from_address": box.email_address, field: "board@example.test"}
        with pytest.raises(ValidationError) as caught:
            sending.email_send(actor=box.owner, to="a@b.example", subject="x", text="y", **kw)
        assert field in caught.value.message_dict
    assert smtp_outbox.messages == []


@pytest.mark.parametrize("verified, allowed_other", [(False, False), (True, True)])
def test_an_alias_cannot_bypass_organization_email_rules(
        box, smtp_outbox, django_capture_on_commit_callbacks, verified, allowed_other):
    """An unverified organization email, or one reserved for other users, is refused as
    From; adding it as an 'additional address' of one's own mailbox must not unlock it."""
    org = OrganizationEmail.objects.create(address="team@example.test", display_name="Acme Team",
                                           verified_at=timezone.now() if verified else None)
    if allowed_other:
        org.allowed_users.add(UserFactory())
    with pytest.raises(ValidationError):
        sending.email_send(actor=box.owner, from_address="team@example.test", to="a@b.example",
                           subject="x", text="y")
    try:
        senders.mailbox_alias_add(actor=box.owner, mailbox=box, address="team@example.test",
                                  display_name="Acme Team")
    except ValidationError:
        return  # refused: fine
    try:
        _send(box, django_capture_on_commit_callbacks, from_address="team@example.test")
    except ValidationError:
        return
    sent = [parsed(m.raw)["From"] for m in smtp_outbox.messages]
    assert not sent, f"sent as the organization email through an alias: From {sent}"


def test_non_ascii_names_subject_and_attachment_names_round_trip(
        box, smtp_outbox, django_capture_on_commit_callbacks):
    subject = "Angebot für Café „Zürich“ — 日本語 " + "ä" * 300
    stored = _send(box, django_capture_on_commit_callbacks,
                   to='"Müller, Hans" <hans@client.example>, Zoë <zoe@client.example>',
                   subject=subject,
                   attachments=[sending.OutgoingAttachment("Angebot Ä€ 報告.pdf", "application/pdf",
                                                           b"%PDF-1.4")])
    assert stored.send_state == Email.SendState.SENT, stored.send_error
    [received] = smtp_outbox.messages
    assert set(received.rcpt_tos) == {"hans@client.example", "zoe@client.example"}
    msg = parsed(received.raw)
    assert msg["Subject"] == subject
    assert msg["From"].addresses[0].display_name == "José Müller-Łukasz"
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Müller, Hans", "hans@client.example"), ("Zoë", "zoe@client.example")]
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == stored.attachments.get().filename
    assert "報告" in att.get_filename() and "€" in att.get_filename()
    assert stored.subject == subject


def test_idn_recipient_gets_a_valid_to_header(box, smtp_outbox,
                                              django_capture_on_commit_callbacks):
    stored = _send(box, django_capture_on_commit_callbacks, to="kunde@bücher.example")
    raw = smtp_outbox.messages[0].raw if smtp_outbox.messages else b""
    to_line = next((l for l in raw.split(b"\r\n") if l.lower().startswith(b"to:")), b"")
    print(stored.send_state, stored.send_error, smtp_outbox.messages[:1] and smtp_outbox.messages[0].rcpt_tos)
    # Either the punycode form (xn--bcher-kva.example) or a UTF-8 header; never an
    # encoded word inside the domain, which no mail client reads as an address.
    assert b"=?" not in to_line, f"{stored.send_state=} To header on the wire: {to_line!r}"
    assert stored.to[0]["email"] in {"kunde@bücher.example", "kunde@xn--bcher-kva.example"}


def test_subject_over_998_chars_is_a_field_error(box, smtp_outbox):
    with pytest.raises(ValidationError) as caught:
        sending.email_send(actor=box.owner, from_address=box.email_address, to="a@b.example",
                           subject="x" * 999, text="y")
    assert "subject" in caught.value.message_dict


def test_display_name_with_line_break_in_user_name_is_a_clear_error(box, smtp_outbox):
    box.display_name = ""
    box.save()
    box.owner.first_name = "Ana\r\nBcc: victim@evil.example"
    box.owner.save()
    with pytest.raises(ValidationError) as caught:
        sending.email_send(actor=box.owner, from_address=box.email_address, to="a@b.example",
                           subject="x", text="y")
    assert "from_address" in caught.value.message_dict
    assert smtp_outbox.messages == []
