"""CRM actions (move, delete) on POP3 mail, mail in two folders, odd folder names, no Trash."""
from __future__ import annotations

import pytest
from django.test import Client

from mailsync.models import Email, EmailLocation, MailFolder, Mailbox
from tests.mailsync.conftest import make_message
from tests.mailsync.test_pages import make_email

pytestmark = pytest.mark.django_db


def _sync(mailbox):
    from mailsync import services
    from mailsync.sync.imap import ImapSync

    ImapSync(mailbox, timeout=10).run()
    services.emails_parse_pending(mailbox_id=mailbox.pk)


def _owner(mailbox) -> Client:
    c = Client()
    c.force_login(mailbox.owner)
    return c


def _messages(response) -> list[str]:
    return [str(m) for m in response.wsgi_request._messages]


def test_move_of_pop3_mail_is_refused_and_keeps_its_location():
    from tests.factories import MailboxFactory

    mailbox = MailboxFactory(protocol=Mailbox.Protocol.POP3, is_active=True)
    email = make_email(mailbox)
    inbox = MailFolder.objects.create(mailbox=mailbox, name="INBOX", uidvalidity=1)
    EmailLocation.objects.create(email=email, folder=inbox, uidvalidity=1, uid=7)
    response = _owner(mailbox).post(f"/mail/{email.pk}/actions/", {"action": "move", "folder": "Archive"})
    msgs = _messages(response)
    assert EmailLocation.objects.filter(email=email).count() == 1, ("the POP3 location was dropped", msgs)
    assert not any(m.startswith("Moved to") for m in msgs), msgs  # POP3 has no folders


def test_move_to_a_folder_that_does_not_exist(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Nowhere"))
    _sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    response = _owner(imap_mailbox).post(f"/mail/{email.pk}/actions/", {"action": "move", "folder": "Nope"})
    assert any("no folder" in m for m in _messages(response))
    assert dovecot.folder_state(mail_user).count == 1
    assert email.locations.count() == 1


def test_move_with_an_empty_folder_claims_nothing(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="Empty"))
    _sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    response = _owner(imap_mailbox).post(f"/mail/{email.pk}/actions/", {"action": "move", "folder": "  "})
    msgs = _messages(response)
    assert "Moved to ." not in msgs, msgs


@pytest.mark.parametrize("name", ['Quo"ted', "Ärchiv & Co", "Back\\slash", "日本語"])
def test_move_to_odd_folder_names(dovecot, mail_user, imap_mailbox, name):
    dovecot.create_folder(mail_user, name)
    dovecot.deliver(mail_user, make_message(subject="Odd"))
    _sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    response = _owner(imap_mailbox).post(f"/mail/{email.pk}/actions/", {"action": "move", "folder": name})
    assert f"Moved to {name}." in _messages(response), _messages(response)
    assert dovecot.folder_state(mail_user).count == 0
    assert dovecot.folder_state(mail_user, name).count == 1
    # and the move list / page render the name escaped
    page = _owner(imap_mailbox).get(f"/mail/{email.pk}/").content.decode()
    assert 'Quo"ted' not in page


def test_move_of_a_mail_in_two_folders_leaves_one_copy(dovecot, mail_user, imap_mailbox):
    raw = make_message(subject="Twice", message_id="<twice@client.example>")
    dovecot.create_folder(mail_user, "Archive")
    dovecot.create_folder(mail_user, "Done")
    dovecot.deliver(mail_user, raw)
    dovecot.append(mail_user, "Archive", raw)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(folders=["INBOX", "Archive"])
    imap_mailbox.refresh_from_db()
    _sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    assert email.locations.count() == 2
    _owner(imap_mailbox).post(f"/mail/{email.pk}/actions/", {"action": "move", "folder": "Done"})
    assert dovecot.folder_state(mail_user).count == 0
    assert dovecot.folder_state(mail_user, "Archive").count == 0
    assert dovecot.folder_state(mail_user, "Done").count == 1, "moved twice: duplicate in Done"


def test_move_of_a_mail_in_two_folders_into_one_of_them(dovecot, mail_user, imap_mailbox):
    raw = make_message(subject="Twice", message_id="<twice2@client.example>")
    dovecot.create_folder(mail_user, "Archive")
    dovecot.deliver(mail_user, raw)
    dovecot.append(mail_user, "Archive", raw)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(folders=["INBOX", "Archive"])
    imap_mailbox.refresh_from_db()
    _sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    # the page offers no move to where it already is; a POST does it anyway
    _owner(imap_mailbox).post(f"/mail/{email.pk}/actions/", {"action": "move", "folder": "INBOX"})
    assert dovecot.folder_state(mail_user, "Archive").count == 0
    assert dovecot.folder_state(mail_user).count == 1, "duplicate in INBOX"


def test_delete_without_trash_expunges_only_that_mail(dovecot, mail_user, imap_mailbox, monkeypatch):
    from mailsync.protocols.imap import ImapSession

    dovecot.deliver(mail_user, make_message(subject="Keep me"))
    dovecot.deliver(mail_user, make_message(subject="Delete me"))
    _sync(imap_mailbox)
    [keep_uid, _] = dovecot.folder_state(mail_user).uids
    dovecot.set_flags(mail_user, "INBOX", keep_uid, ["\\Deleted"])  # the user's client marked it
    monkeypatch.setattr(ImapSession, "trash_folder", lambda self: None)
    email = Email.objects.get(mailbox=imap_mailbox, subject="Delete me")
    response = _owner(imap_mailbox).post(f"/mail/{email.pk}/actions/", {"action": "delete"})
    assert response.status_code == 302
    state = dovecot.folder_state(mail_user)
    assert state.uids == [keep_uid], state
    msgs = _messages(response)
    assert not any("moved to the Trash" in m for m in msgs), msgs  # there is no Trash


def test_delete_of_a_mail_in_two_folders_leaves_one_in_trash(dovecot, mail_user, imap_mailbox):
    raw = make_message(subject="Twice", message_id="<twice3@client.example>")
    dovecot.create_folder(mail_user, "Archive")
    dovecot.deliver(mail_user, raw)
    dovecot.append(mail_user, "Archive", raw)
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(folders=["INBOX", "Archive"])
    imap_mailbox.refresh_from_db()
    _sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox)
    _owner(imap_mailbox).post(f"/mail/{email.pk}/actions/", {"action": "delete"})
    assert dovecot.folder_state(mail_user).count == 0
    assert dovecot.folder_state(mail_user, "Archive").count == 0
    assert dovecot.folder_state(mail_user, "Trash").count == 1, "two copies in Trash"


def test_pop3_delete_does_not_claim_the_trash():
    from tests.factories import MailboxFactory

    mailbox = MailboxFactory(protocol=Mailbox.Protocol.POP3, is_active=True)
    email = make_email(mailbox)
    response = _owner(mailbox).post(f"/mail/{email.pk}/actions/", {"action": "delete"})
    msgs = _messages(response)
    assert not any("Trash" in m for m in msgs), msgs
