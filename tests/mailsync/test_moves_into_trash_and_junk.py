"""A move into the Trash or Junk folder in the CRM ends as the same move in a mail program
does: those folders are never synced, so the mail leaves the CRM's views (a recoverable
tombstone, as a delete). Before, it stayed shown under "Junk" or "Trash", followed in a
folder the sync never reads, while the same move made in Thunderbird hid it (found in
review, session 11)."""
from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

from mailsync.models import Email
from tests.mailsync.conftest import imap_sync, make_message
from tests.mailsync.test_review_session10_moves import on_server

pytestmark = pytest.mark.django_db


def _synced_mail(dovecot, user, mailbox, subject: str) -> Email:  # noqa: ANN001
    dovecot.deliver(user, make_message(subject=subject))
    imap_sync(mailbox)
    return Email.objects.get(mailbox=mailbox, subject=subject)


@pytest.mark.parametrize("folder", ["Junk", "Trash"])
def test_a_crm_move_into_junk_or_trash_hides_the_mail_as_the_same_move_on_the_server_does(
        dovecot, mail_user, imap_mailbox, folder):
    moved_here = _synced_mail(dovecot, mail_user, imap_mailbox, "Moved in the CRM")
    moved_there = _synced_mail(dovecot, mail_user, imap_mailbox, "Moved in a mail program")
    api = APIClient()
    api.force_authenticate(imap_mailbox.owner)

    response = api.patch(f"/api/v1/emails/{moved_here.pk}/", {"folder": folder}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["folders"] == [folder]

    # The same move in another mail program, then a sync: the CRM's rule for a mail there.
    from tests.mailsync.test_two_connections_per_mailbox import client

    with client(dovecot, mail_user) as c:
        c.select_folder("INBOX")
        uid = c.search(["SUBJECT", "Moved in a mail program"])
        c.move(uid, folder)
    imap_sync(imap_mailbox)
    assert Email.objects.get(pk=moved_there.pk).deleted_at is not None

    # Both are on the server in that folder, and neither is shown in the CRM any more.
    assert [subject for subject, _ in on_server(dovecot, mail_user, folder)] == [
        "Moved in a mail program", "Moved in the CRM"]
    assert Email.objects.get(pk=moved_here.pk).deleted_at is not None
    listed = api.get("/api/v1/emails/").json()["results"]
    assert not [e for e in listed if e["id"] in (moved_here.pk, moved_there.pk)]
    assert api.get(f"/api/v1/emails/{moved_here.pk}/").status_code == 404
    # A later sync leaves both as they are (no mail back, none lost on the server).
    imap_sync(imap_mailbox)
    assert Email.objects.get(pk=moved_here.pk).deleted_at is not None
    assert len(on_server(dovecot, mail_user, folder)) == 2


def test_the_page_says_where_a_mail_moved_into_junk_went_and_goes_back_to_the_inbox(
        dovecot, mail_user, imap_mailbox):
    email = _synced_mail(dovecot, mail_user, imap_mailbox, "Spam offer")
    browser = Client()
    browser.force_login(imap_mailbox.owner)
    response = browser.post(f"/mail/{email.pk}/actions/", {"action": "move", "folder": "Junk"},
                            follow=True)
    assert response.status_code == 200
    assert response.redirect_chain and response.redirect_chain[-1][0].rstrip("/").endswith("/mail")
    assert "Moved to Junk" in response.content.decode()
    assert Email.objects.get(pk=email.pk).deleted_at is not None
