"""Review session 10: CRM moves and deletes of a mail with a copy flagged \\Deleted on the
server but not expunged (Thunderbird or Outlook in "mark as deleted" mode, or Thunderbird's
move without expunge). Each bug is fixed, with a test that failed before the fix; against
the private Dovecot, with a second IMAP client playing the other mail program.

Bugs found and fixed:
1. Moving a mail in the CRM into a folder whose only copy of it is \\Deleted (the folder a
   mail program had moved it out of) counted that copy as the mail being there already: the
   live copies elsewhere were removed and the mail was left only as the \\Deleted copy, which
   the other program's next expunge erased (mail lost from the server). A \\Deleted copy is
   no place for the move: a live copy moves into the folder (the \\Deleted one is left to
   that program), and the CRM shows the mail there.
2. Deleting such a mail from the CRM moved the \\Deleted copy to the Trash (it keeps its
   mark, RFC 6851 3.3) and expunged the live one: the "recoverable" mail in the Trash was a
   copy waiting for the other program's expunge. The copy that goes to the Trash is a live
   one now.

Checked and left as they are: marking read/unread or flagging also sets the flags on the
\\Deleted copies (harmless: they are the same mail, and no copy is added or removed); the
Trash is never synced, so the CRM never holds a \\Deleted copy in the Trash to mistake for
the mail being there.
"""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from mailsync.models import Email, EmailLocation, Mailbox
from tests.mailsync.conftest import filed_by_another_program, imap_sync
from tests.mailsync.test_two_connections_per_mailbox import client

pytestmark = pytest.mark.django_db


def api_for(mailbox: Mailbox) -> APIClient:
    api = APIClient()
    api.force_authenticate(mailbox.owner)
    return api


def on_server(dovecot, user, folder: str) -> list[tuple[str, bool]]:  # noqa: ANN001
    """(subject, flagged \\Deleted) of each message in the folder, as the server has it."""
    with client(dovecot, user) as c:
        c.select_folder(folder, readonly=True)
        uids = c.search(["ALL"])
        fetched = c.fetch(uids, ["ENVELOPE", "FLAGS"]) if uids else {}
    return sorted((data[b"ENVELOPE"].subject.decode(), b"\\Deleted" in data[b"FLAGS"])
                  for data in fetched.values())


def moved_by_thunderbird(dovecot, user, mailbox: Mailbox, subject: str) -> Email:  # noqa: ANN001
    """A mail delivered to INBOX and synced, then filed into "Projects" by a mail program that
    moves without expunging (a copy in Projects, the INBOX copy flagged \\Deleted), synced."""
    email = filed_by_another_program(dovecot, user, mailbox, subject)
    assert email.deleted_at is None
    assert on_server(dovecot, user, "INBOX") == [(subject, True)]
    assert on_server(dovecot, user, "Projects") == [(subject, False)]
    return email


def expunged_by_thunderbird(dovecot, user, folder: str) -> None:  # noqa: ANN001
    """The other program compacts the folder: its \\Deleted messages are gone for good."""
    with client(dovecot, user) as c:
        c.select_folder(folder)
        c.expunge()


# == 1. a move into the folder holding only a \Deleted copy =====================================

def test_moving_a_mail_back_into_the_folder_another_program_moved_it_out_of_keeps_it(
        dovecot, mail_user, imap_mailbox):
    """BUG (fixed). Given a mail Thunderbird filed from INBOX into "Projects" without
    expunging (the INBOX copy flagged \\Deleted), which the CRM shows in Projects; when the
    user moves it back to INBOX in the CRM (API PATCH), then the server holds a live copy
    in INBOX (before: the live copy in Projects was removed and only the \\Deleted INBOX
    copy was left), the API shows it in INBOX and ?folder=INBOX finds it; and when
    Thunderbird then compacts INBOX and the CRM syncs, the mail is still there and still
    shown (before: gone from the server, and from the CRM)."""
    email = moved_by_thunderbird(dovecot, mail_user, imap_mailbox, "Quote 7")
    api = api_for(imap_mailbox)

    response = api.patch(f"/api/v1/emails/{email.pk}/", {"folder": "INBOX"}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["folders"] == ["INBOX"]
    inbox = on_server(dovecot, mail_user, "INBOX")
    assert ("Quote 7", False) in inbox  # a live copy, not only the \Deleted one
    assert on_server(dovecot, mail_user, "Projects") == []
    assert [e["subject"] for e in api.get("/api/v1/emails/", {"folder": "INBOX"}).json()["results"]] == [
        "Quote 7"]

    expunged_by_thunderbird(dovecot, mail_user, "INBOX")
    imap_sync(imap_mailbox)

    assert on_server(dovecot, mail_user, "INBOX") == [("Quote 7", False)]
    email.refresh_from_db()
    assert email.deleted_at is None
    assert api.get(f"/api/v1/emails/{email.pk}/").json()["folders"] == ["INBOX"]
    assert list(EmailLocation.objects.filter(email=email).values_list("folder__name", flat=True)) == ["INBOX"]


# == 2. a delete takes the live copy to the Trash ===============================================

def test_deleting_a_mail_another_program_moved_sends_the_live_copy_to_the_trash(
        dovecot, mail_user, imap_mailbox):
    """BUG (fixed). Given a mail Thunderbird filed from INBOX into "Projects" without
    expunging, which the CRM shows in Projects; when the user deletes it in the CRM (API
    DELETE, told "trash": recoverable), then the Trash holds a live copy of it (before: the
    \\Deleted INBOX copy was moved there, keeping its mark, and the live copy in Projects
    was expunged, so Thunderbird's next compaction of the Trash erased the mail the user
    thought recoverable), and neither INBOX nor Projects keeps a copy."""
    email = moved_by_thunderbird(dovecot, mail_user, imap_mailbox, "Invoice 12")

    response = api_for(imap_mailbox).delete(f"/api/v1/emails/{email.pk}/")

    assert response.status_code == 204, response.content
    assert response["Mailroom-Delete-Outcome"] == "trash"
    assert on_server(dovecot, mail_user, "Trash") == [("Invoice 12", False)]
    assert on_server(dovecot, mail_user, "INBOX") == []
    assert on_server(dovecot, mail_user, "Projects") == []
    expunged_by_thunderbird(dovecot, mail_user, "Trash")
    assert on_server(dovecot, mail_user, "Trash") == [("Invoice 12", False)]  # recoverable
