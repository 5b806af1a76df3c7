"""Mail of others by id, CSRF on state changes."""
from __future__ import annotations

import pytest
from django.test import Client

from mailsync.models import Attachment, AttachmentBlob, Email, Mailbox
from mailsync.storage import compress
from tests.factories import AdministratorFactory, ContactFactory, MailboxFactory, UserFactory
from tests.mailsync.test_pages import make_email

pytestmark = pytest.mark.django_db


def _client(user, **kw) -> Client:
    c = Client(**kw)
    c.force_login(user)
    return c


def test_stranger_reaches_nothing_by_id():
    mailbox = MailboxFactory(is_active=True)
    email = make_email(mailbox, html="<p>secret</p>", seen=False)
    blob = AttachmentBlob.objects.create(sha256="f" * 64, data=compress(b"secret"), size=6)
    a = Attachment.objects.create(email=email, blob=blob, filename="s.pdf", content_type="application/pdf", size=6)
    c = _client(UserFactory())
    for url in (f"/mail/{email.pk}/", f"/mail/{email.pk}/body/", f"/mail/{email.pk}/move-folders/",
                f"/mail/{email.pk}/attachments/{a.pk}/", f"/mail/{email.pk}/attachments/{a.pk}/?inline=1",
                f"/mail/compose/?reply={email.pk}"):
        assert c.get(url).status_code == 404, url
    for action in ("read", "flag", "move", "delete"):
        assert c.post(f"/mail/{email.pk}/actions/", {"action": action, "folder": "X"}).status_code == 404
    assert c.post(f"/mail/{email.pk}/opened/").status_code == 404
    email.refresh_from_db()
    assert email.deleted_at is None and not email.flagged and not email.seen


def test_attachment_of_another_mail_through_my_mail_id():
    user = UserFactory()
    mine = make_email(MailboxFactory(owner=user))
    theirs = make_email(MailboxFactory())
    blob = AttachmentBlob.objects.create(sha256="9" * 64, data=compress(b"secret"), size=6)
    a = Attachment.objects.create(email=theirs, blob=blob, filename="s.pdf", content_type="application/pdf", size=6)
    assert _client(user).get(f"/mail/{mine.pk}/attachments/{a.pk}/").status_code == 404


def test_shared_mail_viewer_cannot_act_or_mark_read():
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, sharing=Mailbox.Sharing.PUBLIC, is_active=True)
    colleague = AdministratorFactory()
    email = make_email(mailbox, ContactFactory(owner=owner), seen=False, shareable=True)
    c = _client(colleague)
    assert c.get(f"/mail/{email.pk}/").status_code == 200
    assert c.post(f"/mail/{email.pk}/opened/").status_code == 404
    assert c.get(f"/mail/{email.pk}/move-folders/").status_code == 404
    c.post(f"/mail/{email.pk}/actions/", {"action": "delete"})
    c.post(f"/mail/{email.pk}/actions/", {"action": "read"})
    email.refresh_from_db()
    assert email.deleted_at is None and not email.seen
    page = c.get(f"/mail/{email.pk}/").content.decode()
    assert 'name="action" value="delete"' not in page


def test_state_changes_need_csrf():
    user = UserFactory()
    mailbox = MailboxFactory(owner=user, protocol=Mailbox.Protocol.POP3, is_active=True)
    email = make_email(mailbox, seen=False)
    c = _client(user, enforce_csrf_checks=True)
    for url, data in ((f"/mail/{email.pk}/actions/", {"action": "delete"}),
                      (f"/mail/{email.pk}/actions/", {"action": "flag"}),
                      (f"/mail/{email.pk}/opened/", {}),
                      (f"/mail/{email.pk}/add-record/", {"kind": "lead"})):
        assert c.post(url, data).status_code == 403, url
    # GET never changes state
    assert c.get(f"/mail/{email.pk}/actions/?action=delete").status_code == 405
    assert c.get(f"/mail/{email.pk}/opened/").status_code == 405
    email.refresh_from_db()
    assert email.deleted_at is None and not email.flagged


def test_action_next_is_not_an_open_redirect():
    user = UserFactory()
    mailbox = MailboxFactory(owner=user, protocol=Mailbox.Protocol.POP3, is_active=True)
    email = make_email(mailbox)
    c = _client(user)
    for nxt in ("https://evil.example/", "//evil.example/", "/\\evil.example/", "\\\\evil.example"):
        r = c.post(f"/mail/{email.pk}/actions/", {"action": "flag", "next": nxt})
        assert "evil.example" not in r["Location"], (nxt, r["Location"])
