"""Review probes (session 11) of the REST API contract as a client developer meets it:
real answers checked against the OpenAPI schema, query parameters with odd values, bodies
of odd shape and size, and the mailbox fields. Database rows only (no mail server is
contacted)."""
from __future__ import annotations

import copy
import itertools
from datetime import datetime, timedelta, timezone

import jsonschema
import pytest
from rest_framework.test import APIClient

from mailsync.models import Email, Mailbox
from tests.factories import LeadFactory, MailboxFactory, UserFactory

pytestmark = pytest.mark.django_db

_n = itertools.count(1)
BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)


@pytest.fixture
def api():
    return APIClient(raise_request_exception=False)


def mk_email(mailbox: Mailbox, **kw) -> Email:  # noqa: ANN003
    n = next(_n)
    fields = {"fingerprint": f"fp-s11c-{n}", "content_hash": f"h-s11c-{n}", "direction": "received",
              "subject": f"Probe {n}", "date": BASE + timedelta(minutes=n),
              "from_address": "buyer@customer.example", "parse_state": "parsed", **kw}
    return Email.objects.create(mailbox=mailbox, **fields)


def ids(response) -> set[int]:  # noqa: ANN001
    assert response.status_code == 200, (response.status_code, response.content[:300])
    return {item["id"] for item in response.json()["results"]}


# -- answers against the OpenAPI schema -----------------------------------------------------

def _json_schema(node):  # noqa: ANN001, ANN202
    """OpenAPI 3.0 schema -> JSON Schema: ``nullable`` becomes a null type."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def check(document: dict, path: str, method: str, response) -> None:  # noqa: ANN001
    """The answer's status is documented for the operation, and its JSON body validates
    against the documented schema (additional properties refused: an undocumented key is a
    drift too)."""
    operation = document["paths"][path][method]
    status = str(response.status_code)
    assert status in operation["responses"], (path, method, status, sorted(operation["responses"]))
    content = operation["responses"][status].get("content")
    if not content:
        assert not response.content, (path, method, response.content[:200])
        return
    schema = _json_schema(content["application/json"]["schema"])
    components = {name: dict(_json_schema(value), additionalProperties=False)
                  if value.get("type") == "object" and "properties" in value else _json_schema(value)
                  for name, value in document["components"]["schemas"].items()}
    root = {**copy.deepcopy(schema), "components": {"schemas": components}}
    jsonschema.validate(response.json(), root)


def test_real_answers_validate_against_the_schema(api):
    """Given a mailbox with mail, when a client calls the list, detail, mailbox, status and
    sync operations, then each answer's status is documented and its body validates against
    the documented schema: types, nullability and enums, not only the key names."""
    owner = UserFactory()
    api.force_authenticate(owner)
    document = api.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    mailbox = MailboxFactory(owner=owner, is_active=True)
    email = mk_email(mailbox, to=["a@b.example"], date=None)
    mk_email(mailbox)
    check(document, "/api/v1/emails/", "get", api.get("/api/v1/emails/"))
    check(document, "/api/v1/emails/", "get", api.get("/api/v1/emails/?page=1"))
    check(document, "/api/v1/emails/{id}/", "get", api.get(f"/api/v1/emails/{email.pk}/"))
    check(document, "/api/v1/mailboxes/", "get", api.get("/api/v1/mailboxes/"))
    check(document, "/api/v1/mailboxes/{id}/", "get", api.get(f"/api/v1/mailboxes/{mailbox.pk}/"))
    check(document, "/api/v1/mailboxes/{id}/status/", "get",
          api.get(f"/api/v1/mailboxes/{mailbox.pk}/status/"))
    other = MailboxFactory(owner=owner, is_active=False)
    check(document, "/api/v1/mailboxes/{id}/sync/", "post", api.post(f"/api/v1/mailboxes/{other.pk}/sync/"))
    check(document, "/api/v1/mailboxes/{id}/", "delete", api.delete(f"/api/v1/mailboxes/{mailbox.pk}/"))
    check(document, "/api/v1/mailboxes/{id}/", "delete",
          api.delete(f"/api/v1/mailboxes/{mailbox.pk}/?delete_emails=yes"))
    check(document, "/api/v1/mailboxes/{id}/", "delete", api.delete(f"/api/v1/mailboxes/{other.pk}/"))


# -- the provider of a mailbox --------------------------------------------------------------

def test_an_unknown_provider_is_a_400_that_names_the_field_and_the_schema_lists_the_presets(api):
    """Given the presets of the setup page (gmail, yahoo, ...), when a client creates or
    patches a mailbox with a provider that is none of them (a typo, "Gmail", the page's
    "other-imap"), then it is a 400 naming ``provider``, not a mailbox stored with a
    provider nothing knows (its app-password hint and daily download budget silently
    those of "custom"); and the schema says which values there are."""
    from mailsync.providers import PRESETS

    owner = UserFactory()
    api.force_authenticate(owner)
    mailbox = MailboxFactory(owner=owner)
    for value in ("gmial", "Gmail", "other-imap", ""):
        response = api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", {"provider": value}, format="json")
        assert response.status_code == 400, (value, response.status_code, response.content[:300])
        assert "provider" in response.json()["errors"], response.json()
    mailbox.refresh_from_db()
    assert mailbox.provider == "custom"
    document = api.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()
    prop = document["components"]["schemas"]["Mailbox"]["properties"]["provider"]
    ref = prop.get("$ref") or prop["allOf"][0]["$ref"]
    enum = document["components"]["schemas"][ref.rsplit("/", 1)[1]]["enum"]
    assert set(enum) == set(PRESETS)


# -- boolean filters ------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("true", "unread"), ("True", "unread"), ("1", "unread"), ("yes", "unread"), ("on", "unread"),
    ("false", "read"), ("0", "read"), ("no", "read"), ("off", "read"),
])
def test_unread_filter_takes_the_boolean_spellings_the_readme_promises(api, value, expected):
    """README: boolean query parameters take true, 1, yes, on in any case. Given one read
    and one unread mail, ``?unread=yes`` lists the unread one only; it listed both (the
    filter understood true/false/1/0 only and dropped anything else without a word)."""
    owner = UserFactory()
    api.force_authenticate(owner)
    mailbox = MailboxFactory(owner=owner)
    unread, read = mk_email(mailbox, seen=False), mk_email(mailbox, seen=True)
    want = {"unread": {unread.pk}, "read": {read.pk}}[expected]
    assert ids(api.get(f"/api/v1/emails/?unread={value}")) == want
    flagged = mk_email(mailbox, flagged=True)
    if expected == "unread":
        assert ids(api.get(f"/api/v1/emails/?flagged={value}")) == {flagged.pk}


@pytest.mark.parametrize("query", ["unread=maybe", "flagged=2", "unread=tru", "flagged=null"])
def test_a_boolean_filter_with_another_value_is_a_400_naming_it(api, query):
    """``?unread=maybe`` was answered 200 with all mail, read and unread: a client with a
    typo believed it had the unread mail. Now a 400 that names the parameter."""
    owner = UserFactory()
    api.force_authenticate(owner)
    mk_email(MailboxFactory(owner=owner), seen=True)
    response = api.get(f"/api/v1/emails/?{query}")
    assert response.status_code == 400, (query, response.status_code, response.content[:300])
    assert query.split("=")[0] in response.json()["errors"], response.json()


# -- bodies of odd shape and size -----------------------------------------------------------

@pytest.mark.parametrize("url", ["/api/v1/leads/", "/api/v1/mailboxes/", "/api/v1/auth/token/"])
def test_a_deeply_nested_json_body_is_a_json_400_not_a_500(api, url):
    """A JSON body nested 100,000 levels (100 KB: ``[[[[...``) made the parser recurse
    past Python's limit: RecursionError, a 500. Now a 400 JSON parse error."""
    api.force_authenticate(UserFactory())
    body = b"[" * 100_000 + b"]" * 100_000
    response = api.generic("POST", url, body, content_type="application/json")
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response.json()["code"] == "parse_error"


def test_a_json_body_over_the_upload_limit_is_a_json_413(api, settings):
    """README: a body over the limit (DATA_UPLOAD_MAX_MEMORY_SIZE, 2.5 MB) is a 413. DRF's
    JSON parser reads the request stream itself, past Django's check: a JSON body of any
    size was read whole into memory and parsed. Now a 413 before it is parsed."""
    api.force_authenticate(UserFactory())
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = b'{"first_name": "' + b"x" * 5000 + b'", "last_name": "Big"}'
    response = api.generic("POST", "/api/v1/leads/", body, content_type="application/json")
    assert response.status_code == 413, (response.status_code, response.content[:300])
    assert response.json()["code"] == "request_too_large"
    small = api.post("/api/v1/leads/", {"last_name": "Small"}, format="json")
    assert small.status_code == 201, small.content[:300]


def test_options_of_send_describes_the_compose_fields(api):
    """OPTIONS /emails/send/ described, as what to POST, the fields of the email list
    (date, folders, has_attachments...), not from_address, to, subject, html. The browsable
    API's page of the endpoint still renders."""
    owner = UserFactory()
    api.force_authenticate(owner)
    MailboxFactory(owner=owner)
    post = api.options("/api/v1/emails/send/").json()["actions"]["POST"]
    assert {"from_address", "to", "subject", "html", "attachments"} <= set(post), sorted(post)
    assert "folders" not in post
    page = api.get("/api/v1/emails/send/", HTTP_ACCEPT="text/html")
    assert page.status_code == 405, page.status_code


# -- mailbox fields -------------------------------------------------------------------------

def test_a_mailbox_patch_with_an_unknown_field_is_a_400_not_a_silent_200(api):
    """A PATCH of ``{"pasword": ...}`` or ``{"sync_folders": [...]}`` (a typo, a name from
    another client) answered 200 and changed nothing: the client believed the mailbox's
    password or folders were changed. As an email PATCH, a name the mailbox does not have is
    a 400 naming it; the read-only fields of a GET body sent back stay accepted."""
    owner = UserFactory()
    api.force_authenticate(owner)
    mailbox = MailboxFactory(owner=owner)
    for body in ({"pasword": "new"}, {"sync_folders": ["Sales"]}, {"display_name": "X", "colour": "red"}):
        response = api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", body, format="json")
        assert response.status_code == 400, (body, response.status_code, response.content[:300])
        unknown = next(name for name in body if name not in ("display_name",))
        assert unknown in response.json()["errors"], response.json()
    mailbox.refresh_from_db()
    assert mailbox.display_name != "X"
    got = api.get(f"/api/v1/mailboxes/{mailbox.pk}/").json()
    back = {name: got[name] for name in ("id", "is_active", "state", "last_sync_at",
                                         "last_error", "created_at")}
    back["display_name"] = "Round trip"
    response = api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", back, format="json")
    assert response.status_code == 200, response.content[:300]
    assert response.json()["display_name"] == "Round trip"


# -- probes that passed (kept) --------------------------------------------------------------

def test_date_filters_honour_the_time_zone_of_the_value(api):
    """``date_after=2026-03-01T02:00:00+02:00`` is midnight UTC: the mail of 00:30 UTC is
    in, the one of 23:30 UTC the day before is out."""
    owner = UserFactory()
    api.force_authenticate(owner)
    mailbox = MailboxFactory(owner=owner)
    before = mk_email(mailbox, date=BASE - timedelta(minutes=30))
    after = mk_email(mailbox, date=BASE + timedelta(minutes=30))
    assert ids(api.get("/api/v1/emails/", {"date_after": "2026-03-01T02:00:00+02:00"})) == {after.pk}
    assert ids(api.get("/api/v1/emails/", {"date_before": "2026-03-01T02:00:00+02:00"})) == {before.pk}


def test_head_and_options_are_answered_without_a_body_error(api):
    owner = UserFactory()
    api.force_authenticate(owner)
    mailbox = MailboxFactory(owner=owner)
    assert api.head("/api/v1/emails/").status_code == 200
    assert api.head(f"/api/v1/mailboxes/{mailbox.pk}/status/").status_code == 200
    assert api.options("/api/v1/mailboxes/").status_code == 200
    stranger_box = MailboxFactory(owner=UserFactory())
    assert api.head(f"/api/v1/mailboxes/{stranger_box.pk}/").status_code == 404


def test_lead_filter_with_a_fraction_or_a_strangers_lead_lists_nothing(api):
    owner = UserFactory()
    api.force_authenticate(owner)
    lead = LeadFactory(owner=UserFactory())
    mk_email(MailboxFactory(owner=owner))
    response = api.get(f"/api/v1/emails/?lead={lead.pk}")
    assert response.status_code in (200, 400)
    if response.status_code == 200:
        assert response.json()["count"] == 0


def test_a_get_body_sent_back_with_unchanged_server_settings_tests_no_login(api):
    """A client that renames a mailbox by PATCHing back the body it got: the unchanged server
    fields made the service test the login each time (a 400 while the server was down, and
    a login at the provider per rename). A changed one, or a password typed, still does."""
    import socket

    with socket.socket() as probe:  # a port where nothing listens: the server is down
        probe.bind(("127.0.0.1", 0))
        down_port = probe.getsockname()[1]
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, incoming_host="127.0.0.1", incoming_port=down_port)
    api.force_authenticate(owner)
    body = api.get(f"/api/v1/mailboxes/{mailbox.pk}/").json()
    body["display_name"] = "Renamed"
    response = api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", body, format="json")
    assert response.status_code == 200, response.content
    assert Mailbox.objects.get(pk=mailbox.pk).display_name == "Renamed"

    for change in ({"incoming_port": down_port + 1 if down_port < 65535 else down_port - 1},
                   {"password": "typed again"}):
        response = api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", change, format="json")
        assert response.status_code == 400, (change, response.content)
