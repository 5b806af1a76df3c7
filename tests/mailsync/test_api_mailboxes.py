"""The mailbox API against the private Dovecot: adding a mailbox tests the login first and
saves nothing if it fails, the password never comes back out, one active mailbox per user,
"Sync now" and the status panel."""
from __future__ import annotations

import threading
import time

import pytest
from django.db import IntegrityError, connection, transaction
from rest_framework.test import APIClient

from mailsync import services
from mailsync.models import Email, Mailbox
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import make_message
from tests.testbed.dovecot import free_ports

pytestmark = pytest.mark.django_db


@pytest.fixture
def api():
    return APIClient()


@pytest.fixture
def owner(api):
    user = UserFactory()
    api.force_authenticate(user)
    return user


def mailbox_input(dovecot, mail_user, **overrides) -> dict:
    """What a user types into "Add mailbox" for an account on the private Dovecot."""
    return {
        "display_name": "Sales",
        "email_address": mail_user.email,
        "incoming_host": dovecot.host,
        "incoming_port": dovecot.imaps_port,
        "incoming_security": "ssl",
        "username": mail_user.username,
        "password": mail_user.password,
        **overrides,
    }


def stored_password_column(mailbox_id: int) -> str:
    """The password column as the database holds it (the model field decrypts on read)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT password FROM mailsync_mailbox WHERE id = %s", [mailbox_id])
        return cursor.fetchone()[0]


def test_create_over_imaps_tests_the_login_and_never_returns_the_password(api, owner, dovecot, mail_user):
    created = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user), format="json")

    assert created.status_code == 201, created.content
    body = created.json()
    assert body["email_address"] == mail_user.email
    assert body["is_active"] is True  # the first mailbox of a user is the one that syncs
    assert body["state"] == "new"
    mailbox_id = body["id"]
    responses = [
        created,
        api.get("/api/v1/mailboxes/"),
        api.get(f"/api/v1/mailboxes/{mailbox_id}/"),
        api.get(f"/api/v1/mailboxes/{mailbox_id}/status/"),
        api.post(f"/api/v1/mailboxes/{mailbox_id}/test/"),
    ]
    for response in responses:
        assert response.status_code in (200, 201), response.content
        assert mail_user.password not in response.content.decode()
        assert "password" not in response.json() or response.json()["password"] is None
    assert "password" not in body and "smtp_password" not in body
    assert responses[4].json() == {"ok": True, "folders": ["INBOX", "Sent"]}
    # Encrypted at rest; the code that logs in still gets the plaintext.
    column = stored_password_column(mailbox_id)
    assert column and mail_user.password not in column
    assert Mailbox.objects.get(pk=mailbox_id).password == mail_user.password


def test_wrong_password_is_400_auth_failed_with_app_password_hint_and_saves_nothing(api, owner, dovecot, mail_user):
    response = api.post(
        "/api/v1/mailboxes/", mailbox_input(dovecot, mail_user, password="not-the-password"), format="json"
    )

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "auth_failed"
    assert "app" in body["hint"].lower() and "password" in body["hint"].lower()
    assert "not-the-password" not in response.content.decode()
    assert not Mailbox.objects.exists()


def test_closed_port_is_a_clear_400_and_saves_nothing(api, owner, dovecot, mail_user):
    [closed] = free_ports(1)

    response = api.post(
        "/api/v1/mailboxes/", mailbox_input(dovecot, mail_user, incoming_port=closed), format="json"
    )

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "unreachable"
    assert "refused" in body["detail"] and body["hint"]
    assert not Mailbox.objects.exists()


def test_ssl_on_the_plain_port_is_a_tls_error_not_a_hang(api, owner, dovecot, mail_user):
    response = api.post(
        "/api/v1/mailboxes/", mailbox_input(dovecot, mail_user, incoming_port=dovecot.imap_port),
        format="json",
    )

    assert response.status_code == 400
    assert response.json()["code"] == "tls_error"
    assert not Mailbox.objects.exists()


def test_starttls_on_the_plain_port_works_and_verifies_the_certificate(api, owner, dovecot, mail_user, monkeypatch):
    starttls = mailbox_input(dovecot, mail_user, incoming_port=dovecot.imap_port,
                             incoming_security="starttls")

    # Given a trust store without the test CA, the server's certificate is refused ...
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    untrusted = api.post("/api/v1/mailboxes/", starttls, format="json")
    assert untrusted.status_code == 400
    assert untrusted.json()["code"] == "tls_error"
    assert "not trusted" in untrusted.json()["detail"]
    assert not Mailbox.objects.exists()

    # ... and with it, the same settings are accepted.
    monkeypatch.undo()
    trusted = api.post("/api/v1/mailboxes/", starttls, format="json")
    assert trusted.status_code == 201, trusted.content
    assert trusted.json()["incoming_security"] == "starttls"


def test_bad_excluded_domain_is_a_field_error_and_good_ones_are_normalized(api, owner, dovecot, mail_user):
    bad = api.post(
        "/api/v1/mailboxes/",
        mailbox_input(dovecot, mail_user, excluded_domains="partner.example\nnot a domain"),
        format="json",
    )
    assert bad.status_code == 400
    assert bad.json()["code"] == "invalid"
    assert "not a domain" in bad.json()["errors"]["excluded_domains"][0]
    assert not Mailbox.objects.exists()

    good = api.post(
        "/api/v1/mailboxes/",
        mailbox_input(dovecot, mail_user, excluded_domains="  @Partner.Example \n\nMail.Lawyers.example\n"),
        format="json",
    )
    assert good.status_code == 201, good.content
    assert good.json()["excluded_domains"] == "partner.example\nmail.lawyers.example"
    assert Mailbox.objects.get().excluded_domain_set == {"partner.example", "mail.lawyers.example"}


def test_adding_the_same_address_twice_is_a_400_not_a_crash(api, owner, dovecot, mail_user):
    assert api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user), format="json").status_code == 201

    again = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user), format="json")

    assert again.status_code == 400
    assert again.json()["errors"]["email_address"] == ["You have already added this mailbox."]
    assert Mailbox.objects.count() == 1


def test_activate_switches_the_one_active_mailbox(api, owner, dovecot, mail_user):
    first = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user), format="json").json()
    second_user = dovecot.add_user()
    second = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, second_user), format="json").json()
    assert (first["is_active"], second["is_active"]) == (True, False)

    activated = api.post(f"/api/v1/mailboxes/{second['id']}/activate/")

    assert activated.status_code == 200
    assert activated.json()["is_active"] is True
    listed = {m["id"]: m["is_active"] for m in api.get("/api/v1/mailboxes/").json()["results"]}
    assert listed == {first["id"]: False, second["id"]: True}
    # The database itself refuses a second active mailbox, whatever code path tries.
    with pytest.raises(IntegrityError), transaction.atomic():
        Mailbox.objects.filter(pk=first["id"]).update(is_active=True)


def _wait_until_a_session_waits_on_a_lock(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            # pg_stat_activity is read once per transaction unless the snapshot is cleared.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                return
            time.sleep(0.01)
    raise AssertionError("the second activation never waited for the first")


@pytest.mark.django_db(transaction=True)
def test_two_activations_at_once_leave_exactly_one_active_mailbox():
    owner = UserFactory()
    MailboxFactory(owner=owner, is_active=True)
    second, third = MailboxFactory(owner=owner), MailboxFactory(owner=owner)
    errors: list[Exception] = []

    def activate_third() -> None:
        try:
            services.mailbox_activate(actor=owner, mailbox=Mailbox.objects.get(pk=third.pk))
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)
        finally:
            connection.close()

    # Given one activation in flight (not committed yet), a second one starts (another tab).
    with transaction.atomic():
        services.mailbox_activate(actor=owner, mailbox=second)
        racer = threading.Thread(target=activate_third)
        racer.start()
        _wait_until_a_session_waits_on_a_lock()
    racer.join(10)

    # The later one wins; neither fails with a constraint violation.
    assert errors == []
    assert list(Mailbox.objects.filter(owner=owner, is_active=True).values_list("pk", flat=True)) == [third.pk]


def test_sync_now_on_an_inactive_mailbox_is_409(api, owner):
    MailboxFactory(owner=owner, is_active=True)
    inactive = MailboxFactory(owner=owner, is_active=False)

    response = api.post(f"/api/v1/mailboxes/{inactive.pk}/sync/")

    assert response.status_code == 409
    assert response.json()["code"] == "inactive"
    assert "Activate" in response.json()["detail"]


def test_sync_now_runs_the_sync_and_status_shows_it_completed(api, dovecot, mail_user, imap_mailbox):
    api.force_authenticate(imap_mailbox.owner)
    for i in range(3):
        dovecot.deliver(mail_user, make_message(subject=f"Quote {i}"))
    dovecot.append(mail_user, "Sent", make_message(sender=f"Me <{mail_user.email}>", subject="Offer"))

    queued = api.post(f"/api/v1/mailboxes/{imap_mailbox.pk}/sync/")
    status = api.get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/")

    assert queued.status_code == 202
    assert status.status_code == 200
    body = status.json()
    assert body["state"] == "completed"
    assert body["messages_done"] == body["messages_total"] == 4
    assert body["bytes_done"] == body["bytes_total"] > 0
    assert body["last_sync_at"] is not None
    assert body["last_error"] == "" and body["message_errors"] == []
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 4


def test_sync_failure_shows_in_status_with_what_to_fix(api, dovecot, mail_user, imap_mailbox):
    api.force_authenticate(imap_mailbox.owner)
    # The user changed the password at the provider after adding the mailbox.
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(password="changed-elsewhere")

    api.post(f"/api/v1/mailboxes/{imap_mailbox.pk}/sync/")
    body = api.get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/").json()

    assert body["state"] == "error"
    assert body["last_error_code"] == "auth_failed"
    assert "password" in body["last_error"]
    assert "changed-elsewhere" not in str(body)


def test_another_users_mailbox_is_404_everywhere(api, owner, imap_mailbox):
    url = f"/api/v1/mailboxes/{imap_mailbox.pk}/"

    assert api.get("/api/v1/mailboxes/").json()["count"] == 0
    assert api.get(url).status_code == 404
    assert api.get(f"{url}status/").status_code == 404
    for action in ("test", "activate", "sync"):
        assert api.post(f"{url}{action}/").status_code == 404, action
    assert api.patch(url, {"display_name": "Mine"}, format="json").status_code == 404
    assert api.delete(url).status_code == 404
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.display_name != "Mine" and imap_mailbox.state == "new"


def test_openapi_schema_lists_the_mail_endpoints(client):
    paths = client.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()["paths"]

    for path in (
        "/api/v1/mailboxes/", "/api/v1/mailboxes/{id}/", "/api/v1/mailboxes/{id}/test/",
        "/api/v1/mailboxes/{id}/activate/", "/api/v1/mailboxes/{id}/sync/",
        "/api/v1/mailboxes/{id}/status/", "/api/v1/emails/", "/api/v1/emails/{id}/",
        "/api/v1/emails/{id}/attachments/{attachment_id}/",
    ):
        assert path in paths, path
    assert set(paths["/api/v1/emails/{id}/"]) >= {"get", "patch", "delete"}
    assert "put" not in paths["/api/v1/emails/{id}/"]


def test_creating_the_first_mailbox_through_the_api_starts_its_first_sync(
        api, owner, dovecot, mail_user, django_capture_on_commit_callbacks):
    from tests.mailsync.conftest import make_message

    dovecot.deliver(mail_user, make_message(subject="Waiting in the inbox"))
    with django_capture_on_commit_callbacks(execute=True):
        created = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user), format="json")
    assert created.status_code == 201, created.content
    status = api.get(f"/api/v1/mailboxes/{created.json()['id']}/status/").json()
    assert status["state"] == "completed" and status["messages_done"] == 1
    assert [e["subject"] for e in api.get("/api/v1/emails/").json()["results"]] == ["Waiting in the inbox"]


def test_deleting_a_mailbox_that_holds_mail_asks_for_confirmation(api, dovecot, mail_user, imap_mailbox):
    """Its mail may sit on records colleagues rely on: a bare DELETE removes nothing and says
    how much would go; with delete_emails=true the mailbox and its mail leave the CRM (the
    server keeps them). Not while it syncs."""
    from mailsync.sync.imap import ImapSync
    from tests.factories import ContactFactory

    api.force_authenticate(imap_mailbox.owner)
    ContactFactory(owner=imap_mailbox.owner, email="buyer@customer.example")
    dovecot.deliver(mail_user, make_message(sender="Buyer <buyer@customer.example>"))
    dovecot.deliver(mail_user, make_message())
    ImapSync(imap_mailbox, timeout=10).run()
    url = f"/api/v1/mailboxes/{imap_mailbox.pk}/"

    refused = api.delete(url)
    assert refused.status_code == 409
    assert refused.json()["code"] == "holds_mail"
    assert "2 emails (1 on records)" in refused.json()["detail"]
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 2

    # A sync holds the mailbox's lock (a worker's own database session)
    from tests.mailsync.conftest import sync_lock_held

    with sync_lock_held(imap_mailbox.pk):
        busy = api.delete(url + "?delete_emails=true")
    assert busy.status_code == 409 and busy.json()["code"] == "busy"
    assert Mailbox.objects.filter(pk=imap_mailbox.pk).exists()

    assert api.delete(url + "?delete_emails=true").status_code == 204
    assert not Mailbox.objects.filter(pk=imap_mailbox.pk).exists()
    assert not Email.objects.filter(mailbox_id=imap_mailbox.pk).exists()
    assert dovecot.folder_state(mail_user).count == 2  # nothing deleted on the server


def test_sync_now_answers_in_the_shape_of_status(api, dovecot, mail_user, imap_mailbox):
    """sync/ answers what status/ answers (found in review: sync/ sent the selector's dict
    as it was, its times in another format than status/'s serializer)."""
    api.force_authenticate(imap_mailbox.owner)
    dovecot.deliver(mail_user, make_message(subject="Quote"))

    queued = api.post(f"/api/v1/mailboxes/{imap_mailbox.pk}/sync/")  # run at once (eager tasks)
    status = api.get(f"/api/v1/mailboxes/{imap_mailbox.pk}/status/")

    assert queued.status_code == 202
    assert queued.json()["last_sync_at"] is not None
    assert queued.json() == status.json()
