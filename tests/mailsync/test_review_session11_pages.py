"""Review probes (session 11) of what a salesperson sees and does around their mailbox in
the browser pages: the mailbox form and its errors, presets without JavaScript, options,
the status panel, and mail pages with odd data."""
from __future__ import annotations

import datetime as dt
import socket
import threading

import pytest
from django.test import Client
from django.utils import timezone

from mailsync.forms import MailboxForm
from mailsync.models import Email, Mailbox
from tests.factories import ContactFactory, MailboxFactory, UserFactory
from tests.mailsync.test_pages import make_email

pytestmark = pytest.mark.django_db


@pytest.fixture
def user():
    return UserFactory()


@pytest.fixture
def client(user):
    c = Client()
    c.force_login(user)
    return c


def _imap_form(dovecot, mail_user, smtp_outbox, **overrides) -> dict:  # noqa: ANN001
    return {
        "provider": "other-imap", "protocol": "imap", "display_name": "Ana Ruiz",
        "email_address": mail_user.email, "password": mail_user.password,
        "incoming_host": dovecot.host, "incoming_port": dovecot.imaps_port,
        "incoming_security": "ssl", "username": mail_user.username,
        "smtp_host": smtp_outbox.host, "smtp_port": smtp_outbox.port, "smtp_security": "starttls",
        "smtp_username": smtp_outbox.username, "smtp_password": smtp_outbox.password,
        "aliases": "sales@example.test\nteam@example.test", "sync_since": "2025-03-04",
        **overrides,
    }


def test_a_failed_connection_keeps_everything_typed_but_the_passwords(
        client, user, dovecot, mail_user, smtp_outbox):
    form = _imap_form(dovecot, mail_user, smtp_outbox, password="wrong-Secret-1",
                      smtp_password="smtp-Secret-2")
    page = client.post("/setup/email/new/", form).content.decode()
    assert "nothing was saved" in page
    for value in ("Ana Ruiz", mail_user.email, f'value="{dovecot.imaps_port}"', mail_user.username,
                  "sales@example.test\nteam@example.test", 'value="2025-03-04"',
                  smtp_outbox.username):
        assert value in page, value
    assert "wrong-Secret-1" not in page and "smtp-Secret-2" not in page
    assert not Mailbox.objects.filter(owner=user).exists()


class _FakeImapWithoutStarttls:
    """An IMAP server that never offers STARTTLS (as some old on-premises servers)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"* OK IMAP4rev1 ready\r\n")
                f = conn.makefile("rb")
                for line in f:
                    tag, _, command = line.decode().strip().partition(" ")
                    if command.upper().startswith("CAPABILITY"):
                        conn.sendall(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag.encode() + b" OK done\r\n")
                    elif command.upper().startswith("LOGOUT"):
                        conn.sendall(b"* BYE\r\n" + tag.encode() + b" OK bye\r\n")
                        break
                    else:
                        conn.sendall(tag.encode() + b" BAD no\r\n")

    def close(self) -> None:
        self.sock.close()


def test_starttls_not_offered_says_so_and_what_to_choose(client, dovecot, mail_user, smtp_outbox):
    server = _FakeImapWithoutStarttls()
    try:
        page = client.post("/setup/email/new/", _imap_form(
            dovecot, mail_user, smtp_outbox, incoming_port=server.port,
            incoming_security="starttls")).content.decode()
    finally:
        server.close()
    assert "nothing was saved" in page
    assert "does not offer STARTTLS" in page and "SSL/TLS" in page


@pytest.mark.parametrize(("provider", "protocol", "name"), [("other-imap", "imap", "an IMAP"),
                                                            ("other-pop3", "pop3", "a POP3")])
def test_an_smtp_port_entered_as_the_incoming_server_says_to_check_the_port(
        client, dovecot, mail_user, smtp_outbox, provider, protocol, name):
    """The SMTP port typed as the incoming one: the page said "the connection was lost
    (unexpected response: b'220 ...')" (IMAP) or "the POP3 server refused a command: 220"."""
    for port, security in ((smtp_outbox.port, "none"), (smtp_outbox.tls_port, "ssl")):
        page = client.post("/setup/email/new/", _imap_form(
            dovecot, mail_user, smtp_outbox, provider=provider, protocol=protocol,
            incoming_port=port, incoming_security=security)).content.decode()
        assert "nothing was saved" in page
        assert f"did not answer as {name} server on port {port}" in page
        assert "Check the port" in page and "outgoing mail (SMTP)" in page


def test_ssl_on_a_plain_port_says_to_check_the_security_setting(client, dovecot, mail_user, smtp_outbox):
    page = client.post("/setup/email/new/", _imap_form(
        dovecot, mail_user, smtp_outbox, incoming_port=dovecot.imap_port)).content.decode()
    assert "nothing was saved" in page
    assert "security setting" in page


def test_sync_since_in_the_future_is_refused_on_the_new_mailbox_form(
        client, user, dovecot, mail_user, smtp_outbox):
    future = (timezone.localdate() + dt.timedelta(days=30)).isoformat()
    response = client.post("/setup/email/new/", _imap_form(dovecot, mail_user, smtp_outbox,
                                                           sync_since=future))
    assert response.status_code == 200
    assert "future" in response.content.decode()
    assert not Mailbox.objects.filter(owner=user).exists()


def test_sync_since_in_the_future_is_refused_in_the_options(client, user):
    mailbox = MailboxFactory(owner=user, is_active=True)
    future = (timezone.localdate() + dt.timedelta(days=400)).isoformat()
    response = client.post(f"/setup/email/{mailbox.pk}/", {"folders": "", "sharing": "private",
                                                           "sync_since": future})
    assert response.status_code == 200 and "future" in response.content.decode()
    mailbox.refresh_from_db()
    assert mailbox.sync_since is None
    today = timezone.localdate().isoformat()
    assert client.post(f"/setup/email/{mailbox.pk}/", {"folders": "", "sharing": "private",
                                                       "sync_since": today}).status_code == 302


@pytest.mark.parametrize("provider", ["gmail", "yahoo", "outlook", "zoho", "aol", "fastmail"])
def test_choosing_pop3_on_a_preset_without_javascript_uses_the_pop3_server(provider):
    """Without JavaScript the incoming server fields keep the IMAP preset when the user
    ticks POP3: the form must not then try POP3 on the IMAP server."""
    from mailsync.forms import preset_initial
    from mailsync.providers import PRESETS

    preset = PRESETS[provider]
    shown = preset_initial(provider)  # what the page was rendered with
    form = MailboxForm({**shown, "protocol": "pop3", "email_address": "ana@example.test",
                        "password": "x", "smtp_port": shown["smtp_port"]})
    assert form.is_valid(), form.errors
    data = form.mailbox_data()
    assert (data["incoming_host"], data["incoming_port"]) == (preset.pop3_host, preset.pop3_port)
    # And the way back: a POP3 page (?protocol=pop3) sent with IMAP ticked.
    shown = preset_initial(provider, "pop3")
    form = MailboxForm({**shown, "protocol": "imap", "email_address": "ana@example.test",
                        "password": "x"})
    assert form.is_valid(), form.errors
    data = form.mailbox_data()
    assert (data["incoming_host"], data["incoming_port"]) == (preset.imap_host, preset.imap_port)


def test_a_pop3_status_does_not_promise_imap_push(client, user):
    mailbox = MailboxFactory(owner=user, is_active=True, protocol=Mailbox.Protocol.POP3,
                             state=Mailbox.State.COMPLETED, last_sync_at=timezone.now())
    page = client.get(f"/setup/email/{mailbox.pk}/status/").content.decode()
    assert "Completed" in page
    assert "IMAP push" not in page and "within seconds" not in page
    imap = MailboxFactory(owner=UserFactory(), is_active=True, state=Mailbox.State.COMPLETED,
                          last_sync_at=timezone.now())
    other = Client()
    other.force_login(imap.owner)
    assert "IMAP push" in other.get(f"/setup/email/{imap.pk}/status/").content.decode()


def test_excluded_domains_accept_uppercase_leading_at_and_idn(client, user):
    mailbox = MailboxFactory(owner=user, is_active=True)
    response = client.post(f"/setup/email/{mailbox.pk}/", {
        "folders": "", "sharing": "public",
        "excluded_domains": "  @Bank.EXAMPLE \r\n\r\nbücher.example\r\nBÜCHER.example\r\n@xn--p1ai.рф\r\n"})
    assert response.status_code == 302, response.content.decode()[:3000]
    mailbox.refresh_from_db()
    assert mailbox.excluded_domains.splitlines() == ["bank.example", "xn--bcher-kva.example",
                                                     "xn--p1ai.xn--p1ai"]
    page = client.get(f"/setup/email/{mailbox.pk}/").content.decode()
    assert "bank.example\nxn--bcher-kva.example" in page


def test_odd_mail_without_subject_sender_or_date_renders_everywhere(client, user):
    mailbox = MailboxFactory(owner=user, is_active=True)
    contact = ContactFactory(owner=user, email="customer@client.example")
    bare = make_email(mailbox, contact, subject="", from_address="", from_name="", date=None,
                      to=[], text="", message_id="")
    sent = make_email(mailbox, contact, subject="", direction=Email.Direction.SENT, date=None,
                      to=[], from_address=mailbox.email_address)
    for url in (f"/mail/{bare.pk}/", f"/mail/{sent.pk}/", f"/mail/{bare.pk}/body/", "/mail/",
                f"/mail/records/contact/{contact.pk}/", f"/mail/compose/?reply={bare.pk}",
                f"/mail/compose/?reply={sent.pk}&all=1", contact.get_absolute_url()):
        response = client.get(url)
        assert response.status_code == 200, url
    assert "(no subject)" in client.get(f"/mail/{bare.pk}/").content.decode()
    # A sent mail with no To (its recipients all in Bcc) was a 500 on the record's Emails.
    assert "To undisclosed recipients" in client.get(f"/mail/records/contact/{contact.pk}/").content.decode()


def test_mailbox_pages_of_a_server_that_vanished_do_not_fail(client, user):
    mailbox = MailboxFactory(owner=user, is_active=True, incoming_host="gone.invalid",
                             state=Mailbox.State.ERROR, last_error_code="unreachable",
                             last_error="The server gone.invalid was not found.")
    email = make_email(mailbox)
    for url in (f"/setup/email/{mailbox.pk}/", f"/setup/email/{mailbox.pk}/status/",
                f"/setup/email/{mailbox.pk}/folders/", f"/setup/email/{mailbox.pk}/connection/",
                "/setup/email/", f"/mail/{email.pk}/", f"/mail/{email.pk}/move-folders/"):
        response = client.get(url)
        assert response.status_code == 200, url


@pytest.mark.parametrize("state", [
    {"state": Mailbox.State.PAUSED, "paused_until": None},
    {"state": Mailbox.State.COMPLETED, "last_sync_at": None},
    {"state": Mailbox.State.SYNCING, "messages_total": 0, "bytes_total": 0},
    {"state": Mailbox.State.ERROR, "last_error_code": "", "last_error": ""},
])
def test_status_panel_with_odd_rows_does_not_fail(client, user, state):
    mailbox = MailboxFactory(owner=user, is_active=True, **state)
    for url in (f"/setup/email/{mailbox.pk}/status/", f"/setup/email/{mailbox.pk}/"):
        assert client.get(url).status_code == 200, url


def test_an_invalid_additional_address_is_shown_again_with_the_error(client, user):
    """It was a redirect to an empty field under "Enter a valid email address."."""
    mailbox = MailboxFactory(owner=user, is_active=True)
    response = client.post(f"/setup/email/{mailbox.pk}/aliases/",
                           {"address": "sales at example", "display_name": "Sales"})
    page = response.content.decode()
    assert response.status_code == 200
    assert 'value="sales at example"' in page and 'value="Sales"' in page
    assert "Not an email address: sales at example" in page
    assert not mailbox.aliases.exists()
    # The page is shown at the alias URL: its options form still goes to the options.
    assert f'action="/setup/email/{mailbox.pk}/" class="card form"' in page
