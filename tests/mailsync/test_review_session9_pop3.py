"""Review probes of the POP3 download (session 9), against the private Dovecot: what a user
of a hosted CRM would notice when the server reuses ids, when the mode changes between runs,
and what the status says. Each test reads given / when / then."""
from __future__ import annotations

from pathlib import Path

import pytest

from mailsync.models import Email, Mailbox, Pop3Message
from mailsync.sync.pop3 import Pop3Sync
from tests.mailsync.conftest import make_message

pytestmark = pytest.mark.django_db

UIDVALIDITY = 1_700_000_123


@pytest.fixture(autouse=True, params=["thread", "process"])
def fetch_mode(request, settings) -> str:
    """Both ways, as the other POP3 tests: the session in this process, or in a child."""
    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 0 if request.param == "thread" else 1
    return request.param


def sync(mailbox: Mailbox, **kwargs):
    mailbox.refresh_from_db()
    return Pop3Sync(mailbox, timeout=10, **kwargs).run()


def subjects(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox).values_list("subject", flat=True))


def on_server(dovecot, user) -> int:
    return dovecot.folder_state(user).count


def server_rebuilt_with(dovecot, user, messages: list[bytes]) -> None:
    """The server's maildrop is replaced and its index rebuilt from a uidlist that numbers
    the new messages from UID 1 under the same UIDVALIDITY (a restore, a migration): Dovecot's
    UIDLs (UID + UIDVALIDITY) are then the ones the old messages had."""
    dovecot.kick(user)
    inbox = Path(dovecot.doveadm("mailbox", "path", "-u", user.username, "INBOX").strip())
    for sub in ("cur", "new"):
        for path in (inbox / sub).iterdir():
            path.unlink()
    for path in inbox.iterdir():
        if path.name.startswith(("dovecot-uidlist", "dovecot.index")):
            path.unlink()
    dovecot.fill_maildir(user, "INBOX", [(i, raw, "") for i, raw in enumerate(messages, 1)],
                         uidvalidity=UIDVALIDITY)


def uidls(mailbox: Mailbox) -> set[str]:
    return set(Pop3Message.objects.filter(mailbox=mailbox, key_kind="uidl").values_list("key", flat=True))


def server_uidls(mailbox: Mailbox) -> set[str]:
    from mailsync.protocols.pop3 import Pop3Session
    from mailsync.sync.base import server_settings

    with Pop3Session(server_settings(mailbox, timeout=10)) as session:
        listing = session.listing()
        session.quit()
    return {item.uidl for item in listing}


# -- a UIDL the server reuses for another message ---------------------------------------------
def test_reused_uidl_after_removal_downloads_the_new_message_instead_of_deleting_it(
        dovecot, mail_user, pop3_mailbox):
    # Given a message downloaded and removed from the server (the default mode)
    dovecot.fill_maildir(mail_user, "INBOX", [(1, make_message(subject="Old order"), "")],
                         uidvalidity=UIDVALIDITY)
    sync(pop3_mailbox)
    assert subjects(pop3_mailbox) == ["Old order"] and on_server(dovecot, mail_user) == 0
    old_uidl = uidls(pop3_mailbox)
    # and a new customer mail that the server lists under the same UIDL
    server_rebuilt_with(dovecot, mail_user, [make_message(subject="New order")])
    assert server_uidls(pop3_mailbox) == old_uidl  # the same UIDL, another message

    # When the mailbox syncs again
    report = sync(pop3_mailbox)

    # Then the new mail is in the CRM (it was not taken for the old one and deleted unseen)
    assert subjects(pop3_mailbox) == ["New order", "Old order"], "a new mail was deleted, never stored"
    assert report.new == 1
    assert on_server(dovecot, mail_user) == 0  # removed after it was stored
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == "completed"
    assert pop3_mailbox.messages_done == pop3_mailbox.messages_total == 1

    # And a further run changes nothing
    assert sync(pop3_mailbox).new == 0
    assert subjects(pop3_mailbox) == ["New order", "Old order"]


def test_reused_uidl_in_keep_mode_downloads_the_other_message(dovecot, mail_user, pop3_mailbox):
    # Given a mailbox that leaves mail on the server, with one message downloaded
    pop3_mailbox.pop3_delete_after_download = False
    pop3_mailbox.pop3_keep_days = 7
    pop3_mailbox.save()
    dovecot.fill_maildir(mail_user, "INBOX", [(1, make_message(subject="First"), "")],
                         uidvalidity=UIDVALIDITY)
    sync(pop3_mailbox)
    # and the server rebuilt: that message gone (a phone deleted it), another, of another
    # size, listed under its UIDL
    server_rebuilt_with(dovecot, mail_user,
                        [make_message(subject="Second", body="A longer body than the first one.")])
    assert server_uidls(pop3_mailbox) == uidls(pop3_mailbox)  # the same UIDL, another message

    # When the mailbox syncs again
    sync(pop3_mailbox)

    # Then the other message is in the CRM, and still on the server (keep mode)
    assert subjects(pop3_mailbox) == ["First", "Second"], "a mail on the server never reached the CRM"
    assert on_server(dovecot, mail_user) == 1


# -- a mailbox switched from POP3 to IMAP -------------------------------------------------------
def live_subjects(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox, deleted_at__isnull=True)
                  .values_list("subject", flat=True))


def test_switching_to_imap_keeps_the_mail_pop3_downloaded(dovecot, mail_user, pop3_mailbox):
    from mailsync import services

    # Given a POP3 mailbox that downloaded one mail and removed it from the server (default),
    dovecot.deliver(mail_user, make_message(subject="Downloaded and removed"))
    sync(pop3_mailbox)
    # then, left on the server, another one
    pop3_mailbox.pop3_delete_after_download = False
    pop3_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Downloaded and kept"))
    sync(pop3_mailbox)
    assert on_server(dovecot, mail_user) == 1

    # When the user switches the mailbox to IMAP and it syncs (twice: a later check too)
    pop3_mailbox.refresh_from_db()
    pop3_mailbox.protocol = Mailbox.Protocol.IMAP
    pop3_mailbox.incoming_port = dovecot.imaps_port
    pop3_mailbox.save()
    dovecot.deliver(mail_user, make_message(subject="Arrived after the switch"))
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)

    # Then every mail is still in the CRM, once: the POP3 copies are the user's, not the
    # server's, and the one still on the server is the same email, now in its INBOX
    assert live_subjects(pop3_mailbox) == [
        "Arrived after the switch", "Downloaded and kept", "Downloaded and removed"
    ], "mail downloaded over POP3 left the CRM when the mailbox switched to IMAP"
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 3
    kept = Email.objects.get(mailbox=pop3_mailbox, subject="Downloaded and kept")
    assert {(loc.folder.name, loc.uidvalidity > 0) for loc in kept.locations.all()} == {("INBOX", True)}
    pop3_mailbox.refresh_from_db()
    assert pop3_mailbox.state == "completed"


def test_imap_then_pop3_then_imap_again_loses_and_duplicates_nothing(dovecot, mail_user, pop3_mailbox):
    from mailsync import services

    def switch(protocol: str, port: int) -> None:
        Mailbox.objects.filter(pk=pop3_mailbox.pk).update(protocol=protocol, incoming_port=port)

    # Given an IMAP mailbox with two mails synced
    switch(Mailbox.Protocol.IMAP, dovecot.imaps_port)
    for i in range(2):
        dovecot.deliver(mail_user, make_message(subject=f"Customer mail {i}"))
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    assert live_subjects(pop3_mailbox) == ["Customer mail 0", "Customer mail 1"]

    # When it is switched to POP3 (remove after download), then back to IMAP
    switch(Mailbox.Protocol.POP3, dovecot.pop3s_port)
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    assert on_server(dovecot, mail_user) == 0
    assert Email.objects.filter(mailbox=pop3_mailbox).count() == 2  # found, not stored twice
    switch(Mailbox.Protocol.IMAP, dovecot.imaps_port)
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)
    services.mailbox_sync(mailbox_id=pop3_mailbox.pk)

    # Then both mails are still in the CRM: POP3 took them off the server, the CRM copy stays
    assert live_subjects(pop3_mailbox) == ["Customer mail 0", "Customer mail 1"], \
        "mail the POP3 download removed from the server left the CRM after switching back to IMAP"


# -- the same mail over POP3 and over IMAP -------------------------------------------------------
def test_same_mail_in_a_pop3_and_an_imap_mailbox_of_one_user_shows_once_on_the_lead(
        dovecot, mail_user, pop3_mailbox):
    from mailsync.selectors import emails_of_record
    from mailsync.sync.imap import ImapSync
    from tests.factories import LeadFactory, MailboxFactory

    # Given a user with a POP3 mailbox and an (inactive) IMAP mailbox of another account,
    # both of which received the same customer mail (other trace headers on each server)
    owner = pop3_mailbox.owner
    other = dovecot.add_user()
    imap_box = MailboxFactory(
        owner=owner, email_address=other.email, incoming_host=dovecot.host,
        incoming_port=dovecot.imaps_port, incoming_security="ssl", username=other.username,
        password=other.password, is_active=False)
    lead = LeadFactory(owner=owner, email="buyer@client.example")
    raw = make_message(sender="Buyer <buyer@client.example>", subject="Quote request")
    dovecot.deliver(mail_user, raw)
    dovecot.deliver(other, raw)

    # When both are synced
    sync(pop3_mailbox)
    ImapSync(imap_box, timeout=10).run()

    # Then each mailbox has its copy, and the lead lists the mail once
    assert subjects(pop3_mailbox) == ["Quote request"] and subjects(imap_box) == ["Quote request"]
    assert [e.subject for e in emails_of_record(user=owner, record=lead)] == ["Quote request"]


# -- a message the server will not send ---------------------------------------------------------
def test_message_the_server_refuses_to_send_is_named_in_the_status_until_it_arrives(
        dovecot, mail_user, pop3_mailbox):
    from mailsync import selectors

    # Given two mails, one of which the server cannot read (RETR answers -ERR every time)
    dovecot.fill_maildir(mail_user, "INBOX", [(1, make_message(subject="Readable"), ""),
                                              (2, make_message(subject="Unreadable"), "")])
    inbox = Path(dovecot.doveadm("mailbox", "path", "-u", mail_user.username, "INBOX").strip())
    damaged = sorted((inbox / "cur").iterdir())[1]
    damaged.chmod(0)

    # When the mailbox syncs, twice
    sync(pop3_mailbox)
    sync(pop3_mailbox)

    # Then the readable one is in the CRM, the other is still on the server, and the status
    # says a mail is missing (not a plain "Completed" with nothing left to do)
    assert subjects(pop3_mailbox) == ["Readable"]
    assert on_server(dovecot, mail_user) == 1
    status = selectors.mailbox_status(mailbox=pop3_mailbox)
    assert status["state"] == "completed"
    assert "1 message the server refused to send" in status["last_error"], status

    # And once the server can send it, it arrives and the notice goes
    damaged.chmod(0o600)
    sync(pop3_mailbox)
    assert subjects(pop3_mailbox) == ["Readable", "Unreadable"]
    assert on_server(dovecot, mail_user) == 0
    assert selectors.mailbox_status(mailbox=pop3_mailbox)["last_error"] == ""
