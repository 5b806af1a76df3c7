"""The email pages through Django's test client: configuration, the Emails related list,
the email view (sanitized, sandboxed, downloads), the mailbox view of unmatched mail, and
organization emails. The browser walk-through is in tests/pages/."""
from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import pytest
from django.test import Client

from crm.models import Contact, OrganizationEmail
from mailsync.models import Attachment, AttachmentBlob, Email, EmailLink, Mailbox, Thread
from mailsync.storage import compress
from tests.factories import (
    AdministratorFactory,
    ContactFactory,
    DealFactory,
    LeadFactory,
    MailboxFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db
_n = itertools.count(1)


def make_email(mailbox: Mailbox, *records, thread: Thread | None = None, **fields) -> Email:
    """A synced mail stored directly (the sync itself is tested elsewhere)."""
    n = next(_n)
    defaults = {
        "fingerprint": f"fp{n}", "content_hash": f"h{n}", "message_id": f"m{n}@client.example",
        "subject": f"Message {n}", "from_address": "customer@client.example",
        "from_name": "Customer", "direction": Email.Direction.RECEIVED,
        "date": datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(hours=n),
        "parse_state": Email.ParseState.PARSED, "text": f"Body {n}", "seen": True,
        "to": [{"name": "", "email": mailbox.email_address}],
    }
    email = Email.objects.create(mailbox=mailbox, thread=thread, **(defaults | fields))
    for record in records:
        field = record._meta.model_name
        EmailLink.objects.create(email=email, **{field: record})
    return email


@pytest.fixture
def user():
    return UserFactory()


@pytest.fixture
def client(user):
    c = Client()
    c.force_login(user)
    return c


def test_configuration_pages_offer_the_providers_and_app_password_help(client):
    page = client.get("/setup/email/").content.decode()
    for label in ["Gmail", "Yahoo", "Outlook/Hotmail", "Zoho Mail", "iCloud", "AOL", "Fastmail",
                  "Other IMAP", "Other POP3"]:
        assert label in page
    assert "IMAP is recommended" in page

    gmail = client.get("/setup/email/new/?provider=gmail").content.decode()
    assert 'value="imap.gmail.com"' in gmail and 'value="smtp.gmail.com"' in gmail
    assert "https://myaccount.google.com/apppasswords" in gmail
    assert "<details class=\"server-details\">" in gmail  # collapsed for a preset
    other = client.get("/setup/email/new/?provider=other-imap").content.decode()
    assert "<details class=\"server-details\" open>" in other


def test_add_mailbox_page_tests_the_login_and_explains_a_wrong_password(
        client, user, dovecot, mail_user, smtp_outbox, django_capture_on_commit_callbacks):
    form = {
        "provider": "other-imap", "protocol": "imap", "display_name": "Ana",
        "email_address": mail_user.email, "password": "wrong password",
        "incoming_host": dovecot.host, "incoming_port": dovecot.imaps_port,
        "incoming_security": "ssl", "username": mail_user.username,
        "smtp_host": smtp_outbox.host, "smtp_port": smtp_outbox.port, "smtp_security": "starttls",
        "smtp_username": smtp_outbox.username, "smtp_password": smtp_outbox.password,
        "aliases": "sales@example.test",
    }
    response = client.post("/setup/email/new/", form)
    page = response.content.decode()
    assert response.status_code == 200
    assert "nothing was saved" in page and "rejected the username or password" in page
    assert "app-specific password" in page
    assert not Mailbox.objects.filter(owner=user).exists()

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/setup/email/new/", form | {"password": mail_user.password})
    mailbox = Mailbox.objects.get(owner=user)
    assert response.status_code == 302 and response["Location"] == f"/setup/email/{mailbox.pk}/"
    assert mailbox.is_active and mailbox.smtp_username == smtp_outbox.username
    assert list(mailbox.aliases.values_list("address", flat=True)) == ["sales@example.test"]
    status = client.get(f"/setup/email/{mailbox.pk}/status/").content.decode()
    assert 'data-state="completed"' in status  # the first sync ran (eager Celery in tests)


def test_other_pop3_tests_the_pop3_login_and_saves_the_protocol(client, user, dovecot, mail_user):
    form = {"provider": "other-pop3", "email_address": mail_user.email, "password": "wrong",
            "incoming_host": dovecot.host, "incoming_port": dovecot.pop3s_port,
            "incoming_security": "ssl", "smtp_security": "starttls"}
    refused = client.post("/setup/email/new/", form)
    assert "nothing was saved" in refused.content.decode()
    assert not Mailbox.objects.filter(owner=user).exists()
    response = client.post("/setup/email/new/", form | {"password": mail_user.password})
    assert response.status_code == 302
    mailbox = Mailbox.objects.get(owner=user)
    assert mailbox.protocol == "pop3" and mailbox.incoming_port == dovecot.pop3s_port
    page = client.get(f"/setup/email/{mailbox.pk}/").content.decode()
    assert "Remove mail from the server once it is safely stored" in page


def test_options_validate_excluded_domains_one_per_line(client, user):
    mailbox = MailboxFactory(owner=user, is_active=True)
    url = f"/setup/email/{mailbox.pk}/"
    bad = client.post(url, {"folders": "INBOX\nArchive", "sharing": "public",
                            "excluded_domains": "bank.example\nnot a domain"})
    assert "Not a domain: not a domain" in bad.content.decode()
    good = client.post(url, {"folders": "INBOX\nArchive\nINBOX", "sharing": "public",
                             "excluded_domains": "Bank.example\n@lawyers.example\n", "sync_since": "2025-01-31"})
    assert good.status_code == 302
    mailbox.refresh_from_db()
    assert mailbox.folders == ["INBOX", "Archive"]
    assert mailbox.excluded_domains == "bank.example\nlawyers.example"
    assert mailbox.sharing == "public" and str(mailbox.sync_since) == "2025-01-31"


def test_activating_a_second_mailbox_stops_the_first(client, user):
    first = MailboxFactory(owner=user, is_active=True, incoming_port=1)
    second = MailboxFactory(owner=user, is_active=False, incoming_port=1)
    client.post(f"/setup/email/{second.pk}/activate/")
    first.refresh_from_db(), second.refresh_from_db()
    assert second.is_active and not first.is_active
    other = MailboxFactory()
    assert client.post(f"/setup/email/{other.pk}/activate/").status_code == 404


def test_emails_related_list_groups_threads_newest_first_with_views_and_paging(client, user):
    contact = ContactFactory(owner=user, email="customer@client.example")
    mailbox = MailboxFactory(owner=user)
    thread = Thread.objects.create(mailbox=mailbox, key="root@client.example")
    old = make_email(mailbox, contact, thread=thread, subject="Quote")
    reply = make_email(mailbox, contact, thread=thread, subject="Re: Quote", seen=False)
    sent = make_email(mailbox, contact, subject="Our offer", direction=Email.Direction.SENT,
                      source=Email.Source.CRM, send_state="sent", from_address=mailbox.email_address)
    bcc = make_email(mailbox, contact, subject="Dropped in", source=Email.Source.BCC_DROPBOX)
    make_email(mailbox, subject="Not about this contact")

    page = client.get(f"/contacts/{contact.pk}/").content.decode()
    body = page[page.index('id="related-emails"'):]
    # newest conversation first; the thread shows its two mails, the unread one marked
    assert body.index("Dropped in") < body.index("Our offer") < body.index("Re: Quote")
    assert "1 unread" in body and "Not about this contact" not in body
    assert "customer@client.example" in body  # the real address, not only the name

    def listed(view: str) -> str:
        return client.get(f"/mail/records/contact/{contact.pk}/?emails_view={view}").content.decode()

    assert "Our offer" in listed("sent") and "Quote" not in listed("sent")
    assert "Re: Quote" in listed("received") and "Our offer" not in listed("received")
    assert "Dropped in" in listed("bcc") and "Our offer" not in listed("bcc")
    del old, reply, sent, bcc

    for _ in range(25):
        make_email(mailbox, contact)
    first = client.get(f"/mail/records/contact/{contact.pk}/").content.decode()
    assert "Page 1 of 3" in first and "Older" in first
    third = client.get(f"/mail/records/contact/{contact.pk}/?emails_page=3").content.decode()
    assert "Quote" in third  # the oldest conversation is on the last page


def test_deals_and_leads_have_the_emails_section_too(client, user):
    deal = DealFactory(owner=user)
    lead = LeadFactory(owner=user)
    mailbox = MailboxFactory(owner=user)
    make_email(mailbox, deal, subject="About the deal")
    make_email(mailbox, lead, subject="About the lead")
    assert "About the deal" in client.get(f"/deals/{deal.pk}/").content.decode()
    assert "About the lead" in client.get(f"/leads/{lead.pk}/").content.decode()


def test_email_view_is_sanitized_sandboxed_and_shows_real_addresses(client, user):
    contact = ContactFactory(owner=user)
    mailbox = MailboxFactory(owner=user)
    email = make_email(
        mailbox, contact, from_name="ceo@victim.example", from_address="attacker@evil.example",
        html='<p onclick="x()">Hi</p><script>alert(1)</script><img src="https://track.example/p.gif">'
             '<a href="javascript:alert(1)">x</a>',
    )
    blob = AttachmentBlob.objects.create(sha256="a" * 64, data=compress(b"<script>x</script>"), size=18)
    attachment = Attachment.objects.create(email=email, blob=blob, filename="invoice.pdf",
                                           content_type="text/html", size=18)

    response = client.get(f"/mail/{email.pk}/?record=contact:{contact.pk}")
    page = response.content.decode()
    assert "&lt;attacker@evil.example&gt;" in page  # the real address next to the fake name
    # The page itself runs no script but its own files (crm/security.py), no remote image
    page_csp = response["Content-Security-Policy"]
    assert "script-src 'self';" in page_csp and "img-src 'self' data:;" in page_csp
    assert "frame-ancestors 'none'" in page_csp
    assert "1 remote image blocked" in page and "Load images" in page
    assert 'sandbox="allow-same-origin allow-popups allow-popups-to-escape-sandbox"' in page

    body = client.get(f"/mail/{email.pk}/body/")
    html = body.content.decode()
    assert "<script" not in html
    assert "alert(1)" not in html and "onclick" not in html and "track.example" not in html
    assert "javascript:" not in html
    csp = body["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp and "script-src" not in csp
    assert body["X-Frame-Options"] == "SAMEORIGIN"
    with_images = client.get(f"/mail/{email.pk}/body/?images=1")
    assert "https://track.example/p.gif" in with_images.content.decode()
    assert "https:" in with_images["Content-Security-Policy"]

    download = client.get(f"/mail/{email.pk}/attachments/{attachment.pk}/")
    assert download["Content-Type"] == "application/octet-stream"
    assert download["Content-Disposition"].startswith("attachment;")
    assert download["X-Content-Type-Options"] == "nosniff"
    # ?inline=1 never serves HTML inline
    assert client.get(f"/mail/{email.pk}/attachments/{attachment.pk}/?inline=1")[
        "Content-Disposition"].startswith("attachment;")


def test_private_mail_is_the_owners_only(client, user):
    other_mailbox = MailboxFactory()
    contact = ContactFactory(owner=user)
    email = make_email(other_mailbox, contact, subject="Someone else's")
    assert client.get(f"/mail/{email.pk}/").status_code == 404
    assert client.get(f"/mail/{email.pk}/body/").status_code == 404
    assert "Someone else's" not in client.get(f"/contacts/{contact.pk}/").content.decode()
    assert client.post(f"/mail/{email.pk}/add-record/", {"kind": "lead"}).status_code == 404


def test_unmatched_mail_view_and_add_as_contact_attaches_past_mail(client, user):
    mailbox = MailboxFactory(owner=user)
    from mailsync.models import EmailParticipant

    mails = [make_email(mailbox, subject=f"From Linus {i}", from_name="Linus Torvalds",
                        from_address="Linus@Kernel.example") for i in range(2)]
    for mail in mails:
        EmailParticipant.objects.create(email=mail, role="from", name="Linus Torvalds",
                                        address="linus@kernel.example")
    page = client.get("/mail/").content.decode()
    assert "From Linus 0" in page and "Add as lead" in page and "Add as contact" in page

    response = client.post(f"/mail/{mails[0].pk}/add-record/", {"kind": "contact"})
    contact = Contact.objects.get(owner=user)
    assert (contact.first_name, contact.last_name, contact.email) == ("Linus", "Torvalds",
                                                                      "Linus@Kernel.example")
    assert response["Location"] == f"/contacts/{contact.pk}/#related-emails"
    assert set(EmailLink.objects.filter(contact=contact).values_list("email_id", flat=True)) == {
        m.pk for m in mails}
    assert "From Linus" not in client.get("/mail/").content.decode()


def test_organization_emails_are_for_administrators_and_verified_by_post(client, user):
    assert client.get("/setup/email/organization/").status_code == 403
    org = OrganizationEmail.objects.create(address="team@example.test", display_name="Team")
    from mailsync import senders

    from datetime import timedelta

    from django.utils import timezone

    token = "t" * 40
    anonymous = Client()
    # A link older than a week no longer works (the administrator can send a new one)
    OrganizationEmail.objects.filter(pk=org.pk).update(
        verification_token=senders._token_hash(token),
        verification_sent_at=timezone.now() - timedelta(days=senders.VERIFICATION_DAYS, minutes=1))
    expired = anonymous.get(f"/confirm-email/{token}/")
    assert expired.status_code == 404 and "more than 7 days old" in expired.content.decode()
    anonymous.post(f"/confirm-email/{token}/")
    org.refresh_from_db()
    assert not org.is_verified

    OrganizationEmail.objects.filter(pk=org.pk).update(verification_sent_at=timezone.now())
    shown = anonymous.get(f"/confirm-email/{token}/")
    assert shown.status_code == 200 and "Confirm this address" in shown.content.decode()
    org.refresh_from_db()
    assert not org.is_verified  # a link scanner's GET confirms nothing
    anonymous.post(f"/confirm-email/{token}/")
    org.refresh_from_db()
    assert org.is_verified
    assert anonymous.get(f"/confirm-email/{token}/").status_code == 404

    admin_client = Client()
    admin_client.force_login(AdministratorFactory())
    page = admin_client.get("/setup/email/organization/").content.decode()
    assert "team@example.test" in page and "Verified" in page
    assert "tracked only if that address is also configured as some user's mailbox" in page
    # Without a sending mailbox the administrator is told what to do; nothing is saved
    added = admin_client.post("/setup/email/organization/", {"address": "sales@example.test",
                                                             "display_name": "Sales"})
    assert "connect a mailbox" in added.content.decode()
    assert not OrganizationEmail.objects.filter(address="sales@example.test").exists()


def test_email_actions_reach_the_imap_server(dovecot, mail_user, imap_mailbox):
    from mailsync import services
    from mailsync.sync.imap import ImapSync
    from tests.mailsync.conftest import make_message

    owner_client = Client()
    owner_client.force_login(imap_mailbox.owner)
    dovecot.create_folder(mail_user, "Archive")
    dovecot.deliver(mail_user, make_message(subject="Act on me"))
    ImapSync(imap_mailbox, timeout=10).run()
    services.emails_parse_pending(mailbox_id=imap_mailbox.pk)
    email = Email.objects.get(mailbox=imap_mailbox)
    url = f"/mail/{email.pk}/actions/"

    # The page never waits for the server: on a cold cache it loads the Move list afterwards
    from django.core.cache import cache
    from mailsync.protocols.imap import ImapSession

    cache.clear()
    real_connect = ImapSession.connect
    ImapSession.connect = lambda self: pytest.fail("the email page asked the IMAP server")
    try:
        page = owner_client.get(f"/mail/{email.pk}/").content.decode()
    finally:
        ImapSession.connect = real_connect
    assert f'hx-get="/mail/{email.pk}/move-folders/"' in page
    # meanwhile (and without JavaScript) the folders the sync knows: here only INBOX, where it is
    assert '<option value="Archive">' not in page
    fragment = owner_client.get(f"/mail/{email.pk}/move-folders/").content.decode()
    assert '<option value="Archive">' in fragment  # folders listed from the server
    assert '<option value="INBOX">' not in fragment  # where it already is
    page = owner_client.get(f"/mail/{email.pk}/").content.decode()
    assert '<option value="Archive">' in page  # listed in the page while the cache holds them

    owner_client.post(url, {"action": "flag"})
    [uid] = dovecot.folder_state(mail_user).uids
    assert "\\Flagged" in dovecot.folder_state(mail_user).flags(uid)
    owner_client.post(url, {"action": "move", "folder": "Archive"})
    assert dovecot.folder_state(mail_user).count == 0
    assert dovecot.folder_state(mail_user, "Archive").count == 1
    response = owner_client.post(url, {"action": "delete"})
    assert response.status_code == 302
    assert dovecot.folder_state(mail_user, "Archive").count == 0
    assert dovecot.folder_state(mail_user, "Trash").count == 1
    assert owner_client.get(f"/mail/{email.pk}/").status_code == 404  # gone from the CRM views

    # Someone who may see the mail (an administrator) still cannot act in the mailbox
    admin = Client()
    admin.force_login(AdministratorFactory())
    email2 = make_email(imap_mailbox, ContactFactory(owner=imap_mailbox.owner))
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(sharing="public")
    admin.post(f"/mail/{email2.pk}/actions/", {"action": "flag"})
    email2.refresh_from_db()
    assert not email2.flagged
    assert admin.get(f"/mail/{email2.pk}/move-folders/").status_code == 404  # nor list its folders


def test_opening_an_unread_mail_marks_it_read_in_the_mailbox_too(dovecot, mail_user, imap_mailbox):
    """As a mail client does; asked by the page once shown (a slow server never holds the
    page up). "Mark as unread" leaves it unread; others reading a shared mail change nothing."""
    import socket

    from mailsync.sync.imap import ImapSync
    from tests.mailsync.conftest import make_message

    owner = Client()
    owner.force_login(imap_mailbox.owner)
    dovecot.deliver(mail_user, make_message(subject="Read me"))
    ImapSync(imap_mailbox, timeout=10).run()
    email = Email.objects.get(mailbox=imap_mailbox)
    [uid] = dovecot.folder_state(mail_user).uids
    opened = f'hx-post="/mail/{email.pk}/opened/"'

    def seen_on_server() -> bool:
        return "\\Seen" in dovecot.folder_state(mail_user).flags(uid)

    assert not email.seen and not seen_on_server()
    assert opened in owner.get(f"/mail/{email.pk}/").content.decode()
    assert not seen_on_server()  # showing the page changes nothing by itself
    assert owner.get(f"/mail/{email.pk}/opened/").status_code == 405  # never on a GET
    fragment = owner.post(f"/mail/{email.pk}/opened/").content.decode()
    assert "Mark as unread" in fragment and 'id="read-buttons"' in fragment
    assert seen_on_server()
    email.refresh_from_db()
    assert email.seen
    assert opened not in owner.get(f"/mail/{email.pk}/").content.decode()  # read already

    # "Mark as unread" brings the owner back to the page, which leaves it unread, reloaded too;
    # once another mail was opened, opening it again reads it
    back = owner.post(f"/mail/{email.pk}/actions/", {"action": "unread", "next": f"/mail/{email.pk}/"},
                      follow=True).content.decode()
    assert "Mark as read" in back and opened not in back
    assert opened not in owner.get(f"/mail/{email.pk}/").content.decode()
    assert not seen_on_server()
    other = make_email(imap_mailbox, seen=False)
    assert f'hx-post="/mail/{other.pk}/opened/"' in owner.get(f"/mail/{other.pk}/").content.decode()
    assert opened in owner.get(f"/mail/{email.pk}/").content.decode()

    # A mailbox waiting for a new password: opening mail tries no login (the provider could
    # lock the account); the buttons still work
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(state="error", last_error_code="auth_failed")
    assert opened not in owner.get(f"/mail/{email.pk}/").content.decode()
    assert "Mark as read" in owner.post(f"/mail/{email.pk}/opened/").content.decode()
    email.refresh_from_db()
    assert not email.seen and not seen_on_server()
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(state="completed", last_error_code="")

    # Someone else who may see it (a public mailbox, an administrator) reads it: still unread
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(sharing="public")
    shared = make_email(imap_mailbox, ContactFactory(owner=imap_mailbox.owner), seen=False)
    admin = Client()
    admin.force_login(AdministratorFactory())
    page = admin.get(f"/mail/{shared.pk}/")
    assert page.status_code == 200 and "/opened/" not in page.content.decode()
    assert admin.post(f"/mail/{shared.pk}/opened/").status_code == 404
    assert admin.post(f"/mail/{email.pk}/opened/").status_code == 404
    shared.refresh_from_db()
    assert not shared.seen and not seen_on_server()

    # The server does not answer: the buttons come back with the reason, the mail stays unread
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(incoming_port=port)
    fragment = owner.post(f"/mail/{email.pk}/opened/").content.decode()
    assert "Not marked as read in your mailbox" in fragment and "Mark as read" in fragment
    email.refresh_from_db()
    assert not email.seen


def test_marking_an_opened_mail_read_never_retries_a_wrong_password(dovecot, mail_user, imap_mailbox):
    """The task behind opening: a wrong password is not retried (the provider could lock the
    account); a mail deleted meanwhile is nothing to do."""
    from mailsync import tasks
    from mailsync.sync.imap import ImapSync
    from tests.mailsync.conftest import make_message

    dovecot.deliver(mail_user, make_message(subject="Read me later"))
    ImapSync(imap_mailbox, timeout=10).run()
    email = Email.objects.get(mailbox=imap_mailbox)
    imap_mailbox.password = "not the password"
    imap_mailbox.save()
    attempts = []
    real = tasks.services.email_opened
    tasks.services.email_opened = lambda **kw: attempts.append(1) or real(**kw)
    try:
        assert tasks.mark_opened_read.apply(args=(email.pk, imap_mailbox.owner_id)).successful()
    finally:
        tasks.services.email_opened = real
    assert attempts == [1]
    email.refresh_from_db()
    assert not email.seen
    Email.objects.filter(pk=email.pk).update(deleted_at=datetime.now(timezone.utc))
    assert tasks.mark_opened_read.apply(args=(email.pk, imap_mailbox.owner_id)).successful()


def test_deleting_a_mailbox_asks_before_its_mail_leaves_the_crm(client, user):
    empty = MailboxFactory(owner=user, email_address="old@example.com", is_active=False)
    page = client.get(f"/setup/email/{empty.pk}/").content.decode()
    assert "Delete mailbox" in page and 'name="delete_emails"' not in page
    response = client.post(f"/setup/email/{empty.pk}/delete/", follow=True)
    assert response.redirect_chain[-1][0] == "/setup/email/"
    assert "Mailbox old@example.com deleted" in response.content.decode()
    assert not Mailbox.objects.filter(pk=empty.pk).exists()

    mailbox = MailboxFactory(owner=user, email_address="me@example.com")
    on_record = make_email(mailbox, ContactFactory(owner=user))
    unmatched = make_email(mailbox)
    page = client.get(f"/setup/email/{mailbox.pk}/").content.decode()
    assert "It holds 2 emails in the CRM (1 on records)" in page
    assert 'name="delete_emails" value="1" required' in page
    # Not ticked (a browser would not even send it): nothing is deleted, and it says why
    response = client.post(f"/setup/email/{mailbox.pk}/delete/", follow=True)
    assert response.redirect_chain[-1][0] == f"/setup/email/{mailbox.pk}/"
    assert "holds 2 emails (1 on records)" in response.content.decode()
    assert "Tick “Also delete its emails”" in response.content.decode()
    assert Email.objects.filter(pk__in=[on_record.pk, unmatched.pk]).count() == 2
    # Someone else's mailbox: not found, nothing deleted
    stranger = Client()
    stranger.force_login(UserFactory())
    assert stranger.post(f"/setup/email/{mailbox.pk}/delete/", {"delete_emails": "1"}).status_code == 404
    assert Mailbox.objects.filter(pk=mailbox.pk).exists()
    # While a sync holds the mailbox: not now, and why
    from tests.mailsync.conftest import sync_lock_held

    with sync_lock_held(mailbox.pk):
        busy = client.post(f"/setup/email/{mailbox.pk}/delete/", {"delete_emails": "1"}, follow=True)
    assert "is syncing right now: try again in a minute" in busy.content.decode()
    assert Mailbox.objects.filter(pk=mailbox.pk).exists()
    # Ticked: the mailbox and its mail leave the CRM
    response = client.post(f"/setup/email/{mailbox.pk}/delete/", {"delete_emails": "1"}, follow=True)
    assert "Mailbox me@example.com and its 2 emails deleted" in response.content.decode()
    assert not Mailbox.objects.filter(pk=mailbox.pk).exists()
    assert not Email.objects.filter(pk__in=[on_record.pk, unmatched.pk]).exists()
    assert client.get(f"/setup/email/{mailbox.pk}/delete/").status_code in {404, 405}


def test_status_panel_shows_progress_pause_and_errors_with_the_fix(client, user):
    from django.utils import timezone

    mailbox = MailboxFactory(owner=user, is_active=True)
    url = f"/setup/email/{mailbox.pk}/status/"
    now = timezone.now()
    Mailbox.objects.filter(pk=mailbox.pk).update(
        state="syncing", messages_done=500, messages_total=2000, bytes_done=50 * 2**20,
        bytes_total=200 * 2**20, sync_started_at=now - timedelta(minutes=1))
    from tests.mailsync.conftest import sync_lock_held

    with sync_lock_held(mailbox.pk):  # a run is going on (else: "Interrupted")
        panel = client.get(url).content.decode()
    assert 'data-state="syncing"' in panel and "Sync in progress" in panel
    assert '<progress max="2000" value="500"' in panel
    panel = panel.replace("\xa0", " ")
    assert "500 of 2,000 messages" in panel and "50.0 MB of 200.0 MB" in panel
    assert "left" in panel and 'hx-trigger="every 2s"' in panel  # polls while syncing

    Mailbox.objects.filter(pk=mailbox.pk).update(state="paused", paused_until=now + timedelta(hours=5))
    panel = client.get(url).content.decode()
    assert "Paused until" in panel and "resumes by itself" in panel

    Mailbox.objects.filter(pk=mailbox.pk).update(
        state="error", last_error_code="auth_failed",
        last_error="The server rejected the username or password. Use an app-specific password.")
    panel = client.get(url).content.decode()
    assert "app-specific password" in panel
    assert f'href="/setup/email/{mailbox.pk}/connection/"' in panel
    # An outage is retried by itself: no "fix the settings"
    Mailbox.objects.filter(pk=mailbox.pk).update(
        state="error", last_error_code="unreachable", last_error="mail.example.com refused the connection.")
    panel = client.get(url).content.decode()
    assert "retried by itself" in panel and "connection/" not in panel

    from mailsync.models import MailFolder, MessageError

    folder = MailFolder.objects.create(mailbox=mailbox, name="INBOX", uidvalidity=1)
    MessageError.objects.create(mailbox=mailbox, folder=folder, uidvalidity=1, uid=42,
                                error="Could not store this message: bad bytes")
    panel = client.get(url).content.decode()
    assert "Messages that failed to import" in panel and "bad bytes" in panel
    assert f'action="/setup/email/{mailbox.pk}/retry/"' in panel


def test_connection_settings_are_tested_before_they_are_saved(
        client, user, dovecot, mail_user, smtp_outbox):
    mailbox = MailboxFactory(
        owner=user, email_address=mail_user.email, incoming_host=dovecot.host,
        incoming_port=dovecot.imaps_port, incoming_security="ssl", username=mail_user.username,
        password=mail_user.password, is_active=True)
    url = f"/setup/email/{mailbox.pk}/connection/"
    page = client.get(url).content.decode()
    assert f'value="{dovecot.imaps_port}"' in page and mail_user.password not in page
    form = {"provider": "other-imap", "email_address": mail_user.email, "password": "",
            "incoming_host": dovecot.host, "incoming_port": dovecot.imaps_port,
            "incoming_security": "ssl", "username": mail_user.username,
            "smtp_host": smtp_outbox.host, "smtp_port": smtp_outbox.port,
            "smtp_security": "starttls", "smtp_username": smtp_outbox.username,
            "smtp_password": "wrong"}
    refused = client.post(url, form).content.decode()
    assert "Outgoing mail (SMTP)" in refused and "nothing was saved" in refused
    mailbox.refresh_from_db()
    assert mailbox.smtp_host == "" and mailbox.password == mail_user.password
    assert client.post(url, form | {"smtp_password": smtp_outbox.password}).status_code == 302
    mailbox.refresh_from_db()
    assert (mailbox.smtp_host, mailbox.smtp_username) == (smtp_outbox.host, smtp_outbox.username)
    assert mailbox.password == mail_user.password  # an empty password keeps the saved one


def test_provider_messages_that_imap_is_off_become_advice():
    from imapclient.exceptions import LoginError

    from mailsync.exceptions import MailAuthError
    from mailsync.views import explain

    try:
        try:
            raise LoginError("[ALERT] Your account is not enabled for IMAP use.")
        except LoginError as cause:
            raise MailAuthError("The server rejected the username or password.") from cause
    except MailAuthError as exc:
        text = explain(exc)
    assert "turned off for this account" in text and "Forwarding and POP/IMAP" in text
