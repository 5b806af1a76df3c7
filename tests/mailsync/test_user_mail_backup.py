"""An administrator backs up a (deactivated) user's emails from the admin console: a zip with
every stored mail of the user's mailboxes as a byte-exact .eml (sources in the database and
in pack files), a manifest that says where each was, nothing of another user's mail; a
source that cannot be read is listed, not fatal. Only administrators may do it. The shell
command writes the same archive."""
from __future__ import annotations

import csv
import io
import zipfile

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from crm.models import User
from mailsync import sourcestore
from mailsync.models import Email, EmailLocation, EmailSource, MailFolder
from mailsync.storage import compress
from tests.factories import AdministratorFactory, MailboxFactory, UserFactory

pytestmark = pytest.mark.django_db


def _raw(n: int, lf: bool = False) -> bytes:
    raw = (f"Message-ID: <backup-{n}@client.example>\r\nFrom: Client <client@client.example>\r\n"
           f"To: seller@example.com\r\nSubject: Offer {n}\r\nDate: Mon, 6 May 2024 10:0{n}:00 +0000\r\n"
           f"\r\nFrom the start of a line\r\n>From quoted\r\nbody {n}\r\n").encode()
    return raw.replace(b"\r\n", b"\n") if lf else raw


def _stored(mailbox, raw: bytes, *, pack: bool = False, folder: str = "INBOX"):  # noqa: ANN001, ANN202
    n = Email.objects.count()
    email = Email.objects.create(mailbox=mailbox, fingerprint=f"fp-{n}", content_hash="h",
                                 direction="received", message_id=f"backup-{n}@client.example",
                                 subject=f"Offer {n}", from_address="client@client.example",
                                 to=[{"name": "", "email": "seller@example.com"}], size=len(raw))
    if pack:
        name, offsets = sourcestore.write_pack([compress(raw)])
        EmailSource.objects.create(email=email, pack=name, offset=offsets[0],
                                   length=len(compress(raw)), size=len(raw))
    else:
        EmailSource.objects.create(email=email, data=compress(raw), size=len(raw))
    place, _ = MailFolder.objects.get_or_create(mailbox=mailbox, name=folder)
    EmailLocation.objects.create(email=email, folder=place, uidvalidity=1, uid=email.pk)
    return email


@pytest.fixture
def leaver(settings, tmp_path):  # noqa: ANN001, ANN201
    settings.MAILROOM_SOURCE_DIR = tmp_path / "sources"
    user = UserFactory(username="leaver")
    imap = MailboxFactory(owner=user, email_address="leaver@example.com")
    pop3 = MailboxFactory(owner=user, email_address="old@example.com", is_active=False)
    mails = {
        _stored(imap, _raw(1)).pk: _raw(1),
        _stored(imap, _raw(2), pack=True, folder="Sent").pk: _raw(2),
        _stored(pop3, _raw(3, lf=True)).pk: _raw(3, lf=True),  # bytes as stored, LF and all
    }
    other = MailboxFactory(owner=UserFactory(username="stays"), email_address="stays@example.com")
    _stored(other, _raw(4))
    user.is_active = False
    user.save()
    return user, mails


def _action(client, users):  # noqa: ANN001, ANN202
    return client.post(reverse("admin:crm_user_changelist"),
                       {"action": "back_up_emails", "_selected_action": [u.pk for u in users]})


def _zip(response) -> zipfile.ZipFile:  # noqa: ANN001
    return zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))


def test_admin_backs_up_every_mail_of_a_deactivated_user_byte_for_byte(client, leaver):
    user, mails = leaver
    client.force_login(AdministratorFactory())
    response = _action(client, [user])

    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"].startswith('attachment; filename="mailroom-mail-leaver-')
    archive = _zip(response)
    emls = {name: archive.read(name) for name in archive.namelist() if name.endswith(".eml")}
    assert sorted(emls.values()) == sorted(mails.values())  # byte-exact, and only this user's
    assert all(name.startswith("leaver/") for name in emls)
    rows = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    assert sorted(int(r["email_id"]) for r in rows) == sorted(mails)
    by_id = {int(r["email_id"]): r for r in rows}
    sent = [pk for pk, raw in mails.items() if raw == _raw(2)][0]
    assert by_id[sent]["folders"] == "Sent" and by_id[sent]["mailbox"] == "leaver@example.com"
    assert emls[by_id[sent]["file"]] == _raw(2)
    assert {r["subject"] for r in rows} == {e.subject for e in Email.objects.filter(pk__in=mails)}


def test_a_source_that_cannot_be_read_is_listed_and_the_rest_is_written(client, leaver):
    user, mails = leaver
    lost = EmailSource.objects.filter(email_id__in=mails).exclude(pack="").get()
    sourcestore.path_of(lost.pack).unlink()
    client.force_login(AdministratorFactory())
    archive = _zip(_action(client, [user]))

    rows = {int(r["email_id"]): r for r in csv.DictReader(io.StringIO(archive.read("manifest.csv").decode()))}
    assert rows[lost.email_id]["file"] == "" and "missing" in rows[lost.email_id]["note"]
    assert len([n for n in archive.namelist() if n.endswith(".eml")]) == len(mails) - 1


def test_only_administrators_back_up_other_users_mail(client, leaver):
    user, _ = leaver
    staff = UserFactory(is_staff=True, is_superuser=False)
    staff.user_permissions.add(*__import__("django.contrib.auth.models", fromlist=["Permission"])
                               .Permission.objects.filter(codename__in=["view_user", "change_user"]))
    client.force_login(staff)
    response = _action(client, [user])
    assert response.status_code == 302  # back to the list, with the message; no archive
    assert not response.get("Content-Disposition")


def test_shell_command_writes_the_same_archive(leaver, tmp_path):
    user, mails = leaver
    target = tmp_path / "leaver.zip"
    out = io.StringIO()
    call_command("backup_user_mail", "leaver", str(target), stdout=out)
    assert f"{len(mails)} emails written" in out.getvalue()
    with zipfile.ZipFile(target) as archive:
        assert sorted(archive.read(n) for n in archive.namelist() if n.endswith(".eml")) == sorted(mails.values())
    with pytest.raises(CommandError, match="exists already"):
        call_command("backup_user_mail", "leaver", str(target))
    with pytest.raises(CommandError, match="No user"):
        call_command("backup_user_mail", "nobody", str(tmp_path / "n.zip"))
    assert User.objects.filter(username="leaver", is_active=False).exists()
