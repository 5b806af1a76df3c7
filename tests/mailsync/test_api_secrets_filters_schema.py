"""the password never leaks (responses, logs, task args, schema); the emails API
with bad filters and bad PATCH bodies; the OpenAPI schema."""
from __future__ import annotations

import logging

import pytest
from django.urls import resolve
from rest_framework.test import APIClient

from mailsync.models import Email, Mailbox
from mailsync.sync.imap import ImapSync
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.conftest import mailbox_input, make_message

pytestmark = pytest.mark.django_db


@pytest.fixture
def api():
    return APIClient(raise_request_exception=False)


# -- the password ------------------------------------------------------------------------------

def test_password_not_in_logs_of_good_and_failing_logins(api, dovecot, mail_user, caplog):
    caplog.set_level(logging.DEBUG)
    owner = UserFactory()
    api.force_authenticate(owner)
    bad = "Wr0ng-Secret-Pass-42"
    r1 = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user, password=bad), format="json")
    assert r1.status_code == 400
    r2 = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user), format="json")
    assert r2.status_code == 201, r2.content
    mailbox_id = r2.json()["id"]
    r3 = api.post(f"/api/v1/mailboxes/{mailbox_id}/test/")
    Mailbox.objects.filter(pk=mailbox_id).update(password=bad)
    api.post(f"/api/v1/mailboxes/{mailbox_id}/sync/")
    r4 = api.get(f"/api/v1/mailboxes/{mailbox_id}/status/")
    for secret in (bad, mail_user.password):
        assert secret not in caplog.text
        for r in (r1, r2, r3, r4):
            assert secret not in r.content.decode()


def test_password_never_in_any_response_and_not_in_task_args(api, dovecot, mail_user, monkeypatch):
    from mailsync import tasks

    sent_args: list = []
    real = tasks.sync_mailbox.delay
    monkeypatch.setattr(tasks.sync_mailbox, "delay", lambda *a, **k: (sent_args.append((a, k)), real(*a, **k))[1])
    owner = UserFactory()
    api.force_authenticate(owner)
    smtp_secret = "smtp-Secret-99"
    created = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user), format="json")
    assert created.status_code == 201, created.content
    mid = created.json()["id"]
    other = MailboxFactory(owner=owner, password="factory-secret-77", smtp_password=smtp_secret)
    responses = [
        created, api.get("/api/v1/mailboxes/"), api.get(f"/api/v1/mailboxes/{mid}/"),
        api.patch(f"/api/v1/mailboxes/{mid}/", {"display_name": "X"}, format="json"),
        api.put(f"/api/v1/mailboxes/{mid}/", mailbox_input(dovecot, mail_user), format="json"),
        api.post(f"/api/v1/mailboxes/{other.pk}/activate/"),
        api.get(f"/api/v1/mailboxes/{other.pk}/"),
        api.post(f"/api/v1/mailboxes/{other.pk}/sync/"),
        api.get(f"/api/v1/mailboxes/{other.pk}/status/"),
        api.get("/api/v1/mailboxes/", HTTP_ACCEPT="text/html"),
        api.options("/api/v1/mailboxes/"), api.options(f"/api/v1/mailboxes/{mid}/"),
        api.get("/api/v1/schema/", HTTP_ACCEPT="application/json"),
    ]
    for r in responses:
        text = r.content.decode()
        for secret in (mail_user.password, "factory-secret-77", smtp_secret):
            assert secret not in text, (r.status_code, r.request["PATH_INFO"])
    for args, kwargs in sent_args:
        assert all(isinstance(a, int) for a in args) and not kwargs, sent_args


# -- the emails API ------------------------------------------------------------------------------

@pytest.fixture
def synced(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(subject="hello"))
    ImapSync(imap_mailbox, timeout=10).run()
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 1
    return imap_mailbox


BAD_QUERIES = [
    "deal=abc", "lead=1.5", "contact=99999999999999999999", "deal=-1", "deal=NaN", "deal=1e999",
    "mailbox=abc", "mailbox=99999999999999999999", "thread=abc", "thread=99999999999999999999",
    "date_after=garbage", "date_before=2024-13-45", "date_after=2024-01-01T25:00",
    "unread=maybe", "flagged=2", "direction=sideways", "source=%00", "folder=%00",
    "search=%00", "folder=INBOX%00x", "ordering=-nonexistent", "ordering=%00",
    "page=abc", "page=0", "page=99999", "page_size=abc", "page_size=-5", "page_size=100000",
    "cursor=abc", "cursor=", "cursor=%00", "cursor=abc&page=2",
    "mailbox=1&mailbox=2", "date_after=9999-12-31T23:59:59Z",
]


@pytest.mark.parametrize("query", BAD_QUERIES)
def test_bad_email_filters_are_4xx_or_empty_never_500(api, synced, query):
    api.force_authenticate(synced.owner)
    response = api.get(f"/api/v1/emails/?{query}")
    assert response.status_code in (200, 400, 404), (query, response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), query


def test_other_users_mailbox_filter_shows_nothing(api, synced):
    stranger = UserFactory()
    MailboxFactory(owner=stranger)
    api.force_authenticate(stranger)
    response = api.get(f"/api/v1/emails/?mailbox={synced.pk}")
    assert response.status_code in (200, 400)
    if response.status_code == 200:
        assert response.json()["count"] == 0


@pytest.mark.parametrize("body", [
    {"seen": "maybe"}, {"flagged": [True]}, {"folder": ["Trash"]}, {"folder": ""},
    {"folder": "x" * 600}, {"folder": {"a": 1}}, [1, 2], "seen",
])
def test_bad_email_patch_is_400_and_changes_nothing(api, synced, body):
    api.force_authenticate(synced.owner)
    email = Email.objects.get(mailbox=synced)
    response = api.patch(f"/api/v1/emails/{email.pk}/", body, format="json")
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response.json()["code"] == "invalid"
    email.refresh_from_db()
    assert email.seen is False and email.flagged is False


def test_email_ids_odd_are_json_404(api, synced):
    api.force_authenticate(synced.owner)
    for url in ("/api/v1/emails/abc/", "/api/v1/emails/99999999999999999999/",
                "/api/v1/emails/1/attachments/99999999999999999999/"):
        response = api.get(url)
        assert response.status_code == 404, (url, response.status_code)
        assert response["Content-Type"].startswith("application/json")


# -- the schema ----------------------------------------------------------------------------------

def test_schema_renders_and_every_path_resolves(client):
    response = client.get("/api/v1/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    for path, ops in schema["paths"].items():
        concrete = path.replace("{id}", "1").replace("{attachment_id}", "1")
        import re
        concrete = re.sub(r"\{[^}]+\}", "1", concrete)
        resolve(concrete)
        for method, op in ops.items():
            assert method in {"get", "post", "put", "patch", "delete", "parameters"}, (path, method)
    schemas = schema["components"]["schemas"]
    # The response shape has no password; the request shape has it (write-only).
    assert "password" not in schemas["Mailbox"]["properties"]
    assert "smtp_password" not in schemas["Mailbox"]["properties"]
    assert "password" in schemas.get("MailboxRequest", {}).get("properties", {"password": 1})
    # refs resolve
    text = response.content.decode()
    for ref in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert ref in schema["components"]["schemas"], ref


def test_schema_port_bounds_match_what_a_mail_client_accepts(client):
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    port = schema["components"]["schemas"]["Mailbox"]["properties"]["incoming_port"]
    assert port.get("maximum", 10**12) <= 65535, port


def test_schema_says_what_an_action_on_the_mail_server_may_answer(client):
    """PATCH and DELETE of an email act on the mail server first: the schema documents the
    409 (out_of_date, connection_busy) and 503 (too_many_connections) a client must handle,
    with the JSON error body (detail, code, hint)."""
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    path = schema["paths"]["/api/v1/emails/{id}/"]
    for method in ("patch", "delete"):
        responses = path[method]["responses"]
        assert {"409", "502", "503"} <= set(responses), (method, sorted(responses))
        assert "connection_busy" in responses["409"]["description"]
        body = responses["409"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert set(schema["components"]["schemas"][body]["properties"]) == {"detail", "code", "hint"}
