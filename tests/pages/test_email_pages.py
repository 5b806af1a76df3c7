"""A new user walks the email pages in headless Chromium against the private Dovecot and the
SMTP fixture: configure a mailbox (a wrong password first), watch the sync complete, read a
contact's emails, reply, switch mailboxes, add an organization email."""
from __future__ import annotations

import email
import email.policy
import re

import pytest
from playwright.sync_api import expect

from crm.models import Lead
from mailsync.models import Email, Mailbox
from tests.factories import PASSWORD, AdministratorFactory, ContactFactory
from tests.mailsync.conftest import make_message

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
SYNC_TIMEOUT = 30_000


def field(page, label: str):  # noqa: ANN001, ANN201
    """The input labelled exactly ``label`` (required fields add " *" to their label)."""
    return page.get_by_label(re.compile(rf"^{re.escape(label)}( \*)?$"))


def fill_other_imap(page, dovecot, account, smtp, *, password: str, name: str = "Ana Ruiz") -> None:
    """The "Other IMAP" form as a user fills it for the private Dovecot and SMTP server."""
    field(page, "Name").fill(name)
    page.get_by_label("Email address").fill(account.email)
    field(page, "Password").fill(password)
    details = page.locator("details.server-details")
    if details.get_attribute("open") is None:
        details.locator("summary").click()
    page.get_by_label("Incoming server").fill(dovecot.host)
    field(page, "Port").fill(str(dovecot.imaps_port))
    field(page, "Security").select_option("ssl")
    field(page, "Username").fill(account.username)
    page.get_by_label("Outgoing (SMTP) server").fill(smtp.host)
    page.get_by_label("SMTP port").fill(str(smtp.port))
    page.get_by_label("SMTP security").select_option("starttls")
    page.get_by_label("SMTP username").fill(smtp.username)
    page.get_by_label("SMTP password").fill(smtp.password)


def sent_folder(dovecot, account) -> list[email.message.EmailMessage]:
    imap = dovecot.imap_login(account)
    try:
        imap.select("Sent", readonly=True)
        _, data = imap.uid("SEARCH", None, "ALL")
        found = []
        for uid in data[0].split():
            _, fetched = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            found.append(email.message_from_bytes(fetched[0][1], policy=email.policy.default))
        return found
    finally:
        imap.logout()


def test_configure_sync_read_reply_switch_and_organization_email(
        page, login, screenshot, dovecot, smtp_outbox):
    # Given an administrator with a contact, and a mailbox on the server with her mail
    ana = AdministratorFactory(username="ana", first_name="Ana", last_name="Ruiz")
    grace = ContactFactory(owner=ana, first_name="Grace", last_name="Hopper",
                           email="grace@navy.example")
    account = dovecot.add_user()
    dovecot.deliver(account, make_message(
        sender="Grace Hopper <grace@navy.example>", to=account.email,
        subject="Compiler licences", message_id="<licences@navy.example>",
        body="Hello Ana, we need 20 licences.",
        html='<p>Hello Ana,</p><p><b>we need 20 licences</b> for the team.</p>'
             '<img src="https://tracker.example/pixel.gif" alt="">',
        attachment=("requirements.txt", b"20 seats, 2 sites", "text/plain")))
    dovecot.deliver(account, make_message(
        sender="Grace Hopper <grace@navy.example>", to=account.email,
        subject="Training dates", body="Could we do the training in May?"))
    dovecot.deliver(account, make_message(
        sender="Linus Newbie <linus@startup.example>", to=account.email,
        subject="Interested in a demo", body="Do you have time next week?"))

    # When she logs in and opens Setup > Channels > Email > Email Configuration
    login(ana, PASSWORD)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Setup").click()
    page.get_by_role("link", name="Email Configuration").click()
    expect(page.get_by_role("heading", name="Popular IMAP Email Integrations")).to_be_visible()
    screenshot(page, "email-configuration-empty")

    # A preset fills the server details and says where app passwords come from
    page.get_by_role("link", name="Gmail").click()
    expect(page.get_by_label("Incoming server")).to_have_value("imap.gmail.com")
    expect(page.get_by_role("link", name="create one at Gmail")).to_have_attribute(
        "href", "https://myaccount.google.com/apppasswords")
    screenshot(page, "mailbox-form-gmail")

    # Other IMAP with a wrong password: a clear error and nothing saved
    page.get_by_role("link", name="Choose another provider").click()
    page.get_by_role("link", name="Other IMAP").click()
    fill_other_imap(page, dovecot, account, smtp_outbox, password="not the password")
    page.get_by_role("button", name="Test connection and save").click()
    alert = page.locator(".alert-error")
    expect(alert).to_contain_text("nothing was saved")
    expect(alert).to_contain_text("rejected the username or password")
    expect(alert).to_contain_text("app-specific password")
    assert not Mailbox.objects.exists()
    screenshot(page, "mailbox-wrong-password")

    # Then the right one: saved, active, and the status reaches Completed
    fill_other_imap(page, dovecot, account, smtp_outbox, password=account.password)
    page.get_by_role("button", name="Test connection and save").click()
    expect(page.get_by_role("heading", name=account.email)).to_be_visible(timeout=SYNC_TIMEOUT)
    expect(page.get_by_test_id("sync-state")).to_have_attribute("data-state", "completed",
                                                                timeout=SYNC_TIMEOUT)
    expect(page.locator("#sync-status")).to_contain_text("messages")
    mailbox = Mailbox.objects.get(owner=ana)
    assert mailbox.is_active and mailbox.password == account.password
    expect(page.locator(".folder-hint")).to_contain_text("Sent")  # listed live from the server
    screenshot(page, "mailbox-status-completed")

    # "Sync now" refreshes the panel in place
    with page.expect_response(lambda r: r.url.endswith("/sync/")) as sync_now:
        page.get_by_role("button", name="Sync now").click()
    assert sync_now.value.status == 200  # swapped in place by htmx (CSRF token sent)
    expect(page.get_by_test_id("sync-state")).to_have_attribute("data-state", "completed")

    # She opens the contact and reads her emails, grouped and newest first, unread marked
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Contacts").click()
    page.get_by_role("link", name="Grace Hopper").click()
    emails = page.locator("#related-emails")
    expect(emails.locator(".mailrow", has_text="Compiler licences")).to_have_count(1)
    expect(emails.locator(".mailrow.unread")).to_have_count(2)
    expect(emails).not_to_contain_text("Interested in a demo")
    rows = emails.locator(".mailrow").all_inner_texts()
    assert "Training dates" in rows[0] and "Compiler licences" in rows[1]
    emails.get_by_label("Email view").select_option("sent")
    expect(emails).to_contain_text("No emails in this view.")
    emails.get_by_label("Email view").select_option("all")
    expect(emails.locator(".mailrow")).to_have_count(2)
    screenshot(page, "contact-emails")

    from django.core.cache import cache
    cache.clear()  # the Move list is then asked of the server after the page is shown
    with page.expect_response(lambda r: r.url.endswith("/move-folders/")) as folders:
        emails.locator(".mailrow-link", has_text="Compiler licences").click()
    assert folders.value.status == 200
    expect(page.get_by_role("heading", name="Compiler licences")).to_be_visible()
    expect(page.get_by_label("Move to folder")).to_contain_text("Sent")
    expect(page.locator("dl.headers")).to_contain_text("<grace@navy.example>")
    body = page.frame_locator("#email-frame")
    expect(body.get_by_text("we need 20 licences")).to_be_visible()
    expect(body.locator("img[src]")).to_have_count(0)  # the remote image is blocked
    expect(page.get_by_text("1 remote image blocked")).to_be_visible()
    expect(page.get_by_role("link", name="requirements.txt")).to_be_visible()
    # Opening it marked it read, in the mailbox too; "Mark as unread" undoes that
    expect(page.get_by_role("button", name="Mark as unread")).to_be_visible()
    state = dovecot.folder_state(account)
    assert sum("\\Seen" in flags for _, flags in state.messages) == 1  # done on the server too
    screenshot(page, "email-view")
    page.get_by_role("button", name="Mark as unread").click()
    expect(page.get_by_text("Marked as unread.")).to_be_visible()
    expect(page.get_by_role("button", name="Mark as read")).to_be_visible()
    state = dovecot.folder_state(account)
    assert not any("\\Seen" in flags for _, flags in state.messages)
    page.get_by_role("link", name="Load images").click()
    expect(body.locator("img[src]")).to_have_count(1)

    # She replies from the CRM
    page.get_by_role("link", name="Reply", exact=True).click()
    expect(field(page, "To")).to_have_value("grace@navy.example")
    expect(page.get_by_label("Subject")).to_have_value("Re: Compiler licences")
    editor = page.locator(".editor-area")
    expect(editor.locator("blockquote")).to_contain_text("we need 20 licences")
    editor.click()
    page.keyboard.press("Control+Home")
    page.keyboard.type("Dear Grace, our offer for 20 licences is attached.")
    page.get_by_label("Attachments").set_input_files(files=[{
        "name": "offer.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.4 offer"}])
    screenshot(page, "compose-reply")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_text("Email “Re: Compiler licences” sent.")).to_be_visible(timeout=SYNC_TIMEOUT)
    expect(page.locator("#related-emails .mailrow", has_text="Re: Compiler licences")).to_contain_text("Sent")
    expect(page.locator("#related-emails .thread-head")).to_contain_text("Compiler licences")
    screenshot(page, "contact-emails-after-reply")

    # The reply reached the SMTP server, threaded, and the Sent folder on Dovecot
    [received] = smtp_outbox.wait_for(1)
    message = email.message_from_bytes(received.raw, policy=email.policy.default)
    assert received.rcpt_tos == ("grace@navy.example",) and received.tls
    assert message["In-Reply-To"] == "<licences@navy.example>"
    assert message["Message-ID"].startswith(f"<crm.contact.{grace.pk}.")
    assert "our offer for 20 licences" in message.get_body(("plain",)).get_content()
    assert [a.get_filename() for a in message.iter_attachments()] == ["offer.pdf"]
    [copy] = sent_folder(dovecot, account)
    assert copy["Message-ID"] == message["Message-ID"]
    stored = Email.objects.get(source=Email.Source.CRM)
    assert stored.send_state == "sent" and stored.links.filter(contact=grace).exists()

    # The mailbox view lists mail on no record; "Add as lead" attaches it at once
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Mail").click()
    expect(page.locator("#unmatched")).to_contain_text("Interested in a demo")
    expect(page.locator("#unmatched")).to_contain_text("<linus@startup.example>")
    screenshot(page, "mailbox-view")
    page.locator("#unmatched tr", has_text="Interested in a demo").get_by_role(
        "button", name="Add as lead").click()
    expect(page.get_by_role("heading", name="Linus Newbie")).to_be_visible()
    expect(page.locator("#related-emails")).to_contain_text("Interested in a demo")
    assert Lead.objects.get().email == "linus@startup.example"

    # She adds a second mailbox and switches to it: the first one stops syncing
    second = dovecot.add_user()
    page.goto("/setup/email/")
    page.get_by_role("link", name="Other IMAP").click()
    fill_other_imap(page, dovecot, second, smtp_outbox, password=second.password, name="Ana (2)")
    page.get_by_role("button", name="Test connection and save").click()
    expect(page.get_by_role("heading", name=second.email)).to_be_visible(timeout=SYNC_TIMEOUT)
    expect(page.locator("#sync-status")).to_contain_text("not active")
    page.goto("/setup/email/")
    page.get_by_role("button", name=f"Activate {second.email}").click()
    expect(page.get_by_text(f"{second.email} is now the active mailbox")).to_be_visible()
    expect(page.locator(".mailbox-row.active")).to_contain_text(second.email)
    assert list(Mailbox.objects.filter(is_active=True).values_list("email_address", flat=True)) == [
        second.email]
    screenshot(page, "email-configuration-two-mailboxes")

    # And an organization email, confirmed by the link sent to it
    page.get_by_role("link", name="Organization Emails").click()
    page.get_by_label("Email address").fill("sales@example.test")
    page.get_by_label("Display name").fill("Acme Sales")
    page.get_by_role("button", name="Add and send confirmation").click()
    expect(page.locator("#org-emails")).to_contain_text("Awaiting confirmation")
    confirmation = smtp_outbox.wait_for(2)[1]
    assert confirmation.rcpt_tos == ("sales@example.test",)
    text = email.message_from_bytes(confirmation.raw, policy=email.policy.default).get_content()
    link = re.search(r"https?://\S+/confirm-email/[\w-]+/", text).group(0)
    page.goto(link)
    page.get_by_role("button", name="Confirm this address").click()
    expect(page.get_by_role("heading", name="Confirmed")).to_be_visible()
    page.goto("/setup/email/organization/")
    expect(page.locator("#org-emails")).to_contain_text("Verified")
    screenshot(page, "organization-emails")

    # It is now offered as From when composing
    page.goto(f"/mail/compose/?record=contact:{grace.pk}")
    expect(page.get_by_label("From").locator("option", has_text="sales@example.test")).to_have_count(1)


def test_deleting_a_mailbox_that_holds_mail_needs_the_box_ticked(page, login, screenshot):
    from tests.factories import MailboxFactory, UserFactory
    from tests.mailsync.test_pages import make_email

    owner = UserFactory(username="rita")
    mailbox = MailboxFactory(owner=owner, email_address="rita@example.com")
    make_email(mailbox, ContactFactory(owner=owner))
    login(owner, PASSWORD)
    page.goto(f"/setup/email/{mailbox.pk}/")
    danger = page.locator("#delete-mailbox")
    expect(danger).to_contain_text("It holds 1 email in the CRM (1 on records)")
    danger.get_by_role("button", name="Delete mailbox").click()  # not ticked: the browser stops it
    expect(page.get_by_role("heading", name="rita@example.com")).to_be_visible()
    assert Mailbox.objects.filter(pk=mailbox.pk).exists()
    danger.get_by_label("Also delete its 1 email from the CRM").check()
    screenshot(page, "mailbox-delete")
    danger.get_by_role("button", name="Delete mailbox").click()
    expect(page.get_by_text("Mailbox rita@example.com and its 1 email deleted")).to_be_visible()
    assert not Mailbox.objects.filter(pk=mailbox.pk).exists() and not Email.objects.exists()
