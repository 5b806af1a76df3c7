"""The REST API contract as an integrator uses it: errors as JSON 4xx, secrets never
returned, the OpenAPI schema against reality, filters, paging, deletes and patches.

Written as review probes; the 17 that failed were fixed: POP3 options and max_message_bytes
not settable over the API; too many query parameters or form fields and an oversized
multipart field answered with Django's HTML page; unknown fields in an email PATCH and a
move of mail that is on no server folder answered 200; ?mailbox= and ?thread= told other
users' ids from nonexistent ones; ?folder=inbox missed the INBOX; ?images=True was not
understood; paging over equal dates repeated and missed mail (no unique tiebreaker); an
Idempotency-Key of a since-deleted email was a 500 and keys over 100 characters were cut;
non-ASCII passwords and usernames were a 500 (IMAP LOGIN is ASCII only: now AUTHENTICATE
PLAIN in UTF-8); two PATCHes of one email at once lost a flag. Paging while new mail arrives
repeated mail (page-number paging over a live list): ``next`` now carries a cursor.

Most tests use database rows only (no server is contacted: mail without a location on the
server changes in the CRM only); the ones where the server matters use the real Dovecot."""
from __future__ import annotations

import itertools
import threading
from datetime import datetime, timedelta, timezone

import pytest
from django.db import connection
from rest_framework.test import APIClient

from crm import services as crm_services
from mailsync.models import (Attachment, AttachmentBlob, Email, EmailLink, EmailLocation, MailFolder,
                             Mailbox, Thread)
from mailsync.storage import compress
from tests.factories import ContactFactory, LeadFactory, MailboxFactory, UserFactory

pytestmark = pytest.mark.django_db

_n = itertools.count(1)
BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def api():
    return APIClient(raise_request_exception=False)


def mk_email(mailbox: Mailbox, **kw) -> Email:
    n = next(_n)
    fields = {"fingerprint": f"fp-{n}", "content_hash": f"h{n}", "direction": "received",
              "subject": f"Probe {n}", "date": BASE + timedelta(minutes=n),
              "from_address": "buyer@customer.example", "parse_state": "parsed", **kw}
    return Email.objects.create(mailbox=mailbox, **fields)


def locate(email: Email, folder_name: str, uid: int, flags=()) -> EmailLocation:  # noqa: ANN001
    folder, _ = MailFolder.objects.get_or_create(mailbox=email.mailbox, name=folder_name,
                                                 defaults={"uidvalidity": 1})
    return EmailLocation.objects.create(email=email, folder=folder, uidvalidity=1, uid=uid,
                                        flags=list(flags))


def is_json(response) -> bool:  # noqa: ANN001
    return response.get("Content-Type", "").startswith("application/json")


def schema(api) -> dict:  # noqa: ANN001
    response = api.get("/api/v1/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return response.json()


# -- the OpenAPI schema ---------------------------------------------------------------------

def test_schema_is_a_valid_openapi_3_document(api):
    """An integrator feeding /api/v1/schema/ to a code generator gets a document that
    validates against the OpenAPI 3.0 JSON schema."""
    from drf_spectacular.validation import validate_schema

    validate_schema(schema(api))


def test_schema_documents_every_readme_email_filter_and_the_idempotency_key(api):
    """The README's emails/ filters, ?images= on the detail and Idempotency-Key on send/
    are all in the schema."""
    paths = schema(api)["paths"]
    names = {p["name"] for p in paths["/api/v1/emails/"]["get"]["parameters"]}
    assert {"lead", "contact", "deal", "mailbox", "folder", "direction", "source", "date_after",
            "date_before", "unread", "flagged", "page", "page_size", "cursor", "search",
            "ordering"} <= names
    detail = {p["name"] for p in paths["/api/v1/emails/{id}/"]["get"]["parameters"]}
    assert "images" in detail
    send = paths["/api/v1/emails/send/"]["post"]["parameters"]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in send)


def test_response_fields_match_the_schema(api):
    """Every key of a real list item, email detail, mailbox, status and sync answer is
    documented, and every documented (non write-only) property is there."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, is_active=True)
    email = mk_email(mailbox)
    api.force_authenticate(owner)
    comps = schema(api)["components"]["schemas"]

    def keys(name: str) -> set[str]:
        return set(comps[name]["properties"])

    assert set(api.get("/api/v1/emails/").json()["results"][0]) == keys("EmailList")
    assert set(api.get(f"/api/v1/emails/{email.pk}/").json()) == keys("EmailDetail")
    assert set(api.get(f"/api/v1/mailboxes/{mailbox.pk}/").json()) == keys("Mailbox")
    assert set(api.get(f"/api/v1/mailboxes/{mailbox.pk}/status/").json()) == keys("MailboxStatus")


def test_mailbox_options_documented_in_the_readme_are_settable_over_the_api(api):
    """README (POP3 mailboxes) names per-mailbox options pop3_delete_after_download,
    pop3_keep_days and max_message_bytes. An integrator PATCHes them on a POP3 mailbox:
    they must be applied (or refused with a 400), never silently dropped with a 200 -- the
    client would believe mail is kept on the server while it is being deleted."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, protocol="pop3", incoming_port=995)
    api.force_authenticate(owner)
    response = api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", {
        "pop3_delete_after_download": False, "pop3_keep_days": 30,
        "max_message_bytes": 100 * 1024 * 1024}, format="json")
    mailbox.refresh_from_db()
    applied = (mailbox.pop3_delete_after_download, mailbox.pop3_keep_days,
               mailbox.max_message_bytes) == (False, 30, 100 * 1024 * 1024)
    assert applied or response.status_code == 400, (response.status_code, response.json())


# -- errors are JSON 4xx --------------------------------------------------------------------

@pytest.mark.parametrize("method, url", [
    ("get", "/api/v1/emails/"), ("get", "/api/v1/emails/1/"), ("patch", "/api/v1/emails/1/"),
    ("get", "/api/v1/emails/1/attachments/1/"), ("post", "/api/v1/emails/send/"),
    ("get", "/api/v1/mailboxes/"), ("get", "/api/v1/mailboxes/1/status/"),
    ("post", "/api/v1/mailboxes/1/sync/"),
])
def test_missing_credentials_are_a_json_401(api, method, url):
    """No token: 401 (not 403) with a JSON body and a WWW-Authenticate header."""
    response = getattr(api, method)(url)
    assert response.status_code == 401, response.status_code
    assert is_json(response) and response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"].startswith("Token")


def test_a_bad_token_is_a_json_401(api):
    """A wrong or empty Authorization header is a JSON 401, not a 500."""
    for header in ("Token nope", "Token", "Token a b", "Token \u00e9\u00e9"):
        response = api.get("/api/v1/emails/", HTTP_AUTHORIZATION=header)
        assert response.status_code == 401 and is_json(response), (header, response.status_code)


@pytest.mark.parametrize("method, path", [
    ("put", "/api/v1/emails/{e}/"), ("post", "/api/v1/emails/"), ("delete", "/api/v1/emails/"),
    ("get", "/api/v1/emails/send/"), ("get", "/api/v1/mailboxes/{m}/sync/"),
    ("patch", "/api/v1/mailboxes/{m}/status/"), ("delete", "/api/v1/emails/{e}/attachments/1/"),
    ("post", "/api/v1/emails/{e}/"),
])
def test_wrong_method_is_a_json_405(api, method, path):
    """A method an endpoint does not take is 405 with a JSON body and an Allow header."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    email = mk_email(mailbox)
    api.force_authenticate(owner)
    response = getattr(api, method)(path.format(e=email.pk, m=mailbox.pk))
    assert response.status_code == 405, response.status_code
    assert is_json(response) and response.json()["code"] == "method_not_allowed"
    assert response.has_header("Allow")


@pytest.mark.parametrize("url, content_type, body, status", [
    ("/api/v1/mailboxes/", "application/json", b'{"display_name": ', 400),
    ("/api/v1/mailboxes/", "text/plain", b"display_name=x", 415),
    ("/api/v1/mailboxes/", "application/xml", b"<a/>", 415),
    ("/api/v1/mailboxes/", "application/json", b"\xff\xfe{}", 400),
    ("/api/v1/emails/send/", "application/json", b"[", 400),
    ("/api/v1/emails/send/", "application/json", b"null", 400),
    ("/api/v1/emails/send/", "application/json", b'"text"', 400),
    ("/api/v1/emails/send/", "multipart/form-data", b"garbage", 400),
])
def test_unparseable_bodies_are_json_4xx(api, url, content_type, body, status):
    """A body that is not JSON, or of a type the API does not take, is a 400/415 JSON error."""
    owner = UserFactory()
    MailboxFactory(owner=owner, smtp_host="127.0.0.1", smtp_port=2525)
    api.force_authenticate(owner)
    response = api.generic("POST", url, body, content_type=content_type)
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert is_json(response) and "detail" in response.json()


def test_a_bad_patch_body_on_an_email_is_json_400(api):
    """PATCH with a non-object JSON body or a null is a 400 JSON error."""
    owner = UserFactory()
    email = mk_email(MailboxFactory(owner=owner))
    api.force_authenticate(owner)
    for body in (b"null", b"42", b'{"seen": null}', b'{"folder": null}'):
        response = api.generic("PATCH", f"/api/v1/emails/{email.pk}/", body,
                               content_type="application/json")
        assert response.status_code == 400 and is_json(response), (body, response.status_code)


def test_too_many_query_parameters_is_a_json_400(api):
    """A list URL with over 1000 query parameters (Django's DATA_UPLOAD_MAX_NUMBER_FIELDS,
    e.g. a client building ?mailbox=1&mailbox=2&... from a long id list) is a JSON 400."""
    owner = UserFactory()
    api.force_authenticate(owner)
    query = "&".join(f"mailbox={i}" for i in range(1, 1200))
    response = api.get(f"/api/v1/emails/?{query}")
    assert 400 <= response.status_code < 500, response.status_code
    assert is_json(response), (response["Content-Type"], response.content[:200])


def test_too_many_form_fields_is_a_json_400(api):
    """A form-encoded POST with over 1000 fields is a JSON 400, not Django's HTML page."""
    owner = UserFactory()
    api.force_authenticate(owner)
    body = "&".join(f"folders={i}" for i in range(1200))
    response = api.generic("POST", "/api/v1/mailboxes/", body,
                           content_type="application/x-www-form-urlencoded")
    assert 400 <= response.status_code < 500, response.status_code
    assert is_json(response), (response["Content-Type"], response.content[:200])


def test_oversized_multipart_send_is_a_json_4xx(api):
    """A multipart send whose text field is over DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB) is a
    JSON 4xx (e.g. 413), not an HTML page."""
    owner = UserFactory()
    MailboxFactory(owner=owner, smtp_host="127.0.0.1", smtp_port=2525)
    api.force_authenticate(owner)
    response = api.post("/api/v1/emails/send/", {"from_address": "x@example.com", "to": "a@b.example",
                                                 "subject": "s", "text": "x" * (3 * 1024 * 1024)},
                        format="multipart")
    assert 400 <= response.status_code < 500, response.status_code
    assert is_json(response), (response["Content-Type"], response.content[:200])


def test_unknown_fields_in_an_email_patch_are_refused(api):
    """PATCH {"read": true} or {"unread": false} (names an integrator guesses from the
    ?unread= filter) must be a 400 naming the field, not a 200 that changed nothing."""
    owner = UserFactory()
    email = mk_email(MailboxFactory(owner=owner))
    api.force_authenticate(owner)
    for body in ({"read": True}, {"unread": False}, {"is_read": True}):
        response = api.patch(f"/api/v1/emails/{email.pk}/", body, format="json")
        assert response.status_code == 400, (body, response.status_code, response.json())
    email.refresh_from_db()
    assert email.seen is False


def test_moving_a_mail_that_is_on_no_server_folder_is_not_a_silent_200(api):
    """A mail sent from the CRM whose Sent-folder copy does not exist (yet): PATCH
    {"folder": "No such folder"} must not answer 200 as if it had moved (no folder is
    checked, nothing moves on the server, the response shows no folder)."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, is_active=True)
    email = mk_email(mailbox, direction="sent", source="crm", send_state="sent")
    api.force_authenticate(owner)
    response = api.patch(f"/api/v1/emails/{email.pk}/", {"folder": "No such folder"}, format="json")
    assert response.status_code != 200 or response.json()["folders"] == ["No such folder"], (
        response.status_code, response.json())


# -- other users' ids ------------------------------------------------------------------------

@pytest.mark.parametrize("param", ["mailbox", "thread"])
def test_filters_do_not_reveal_which_ids_exist(api, param):
    """?mailbox=<someone else's mailbox> and ?mailbox=<an id that exists nowhere> (same for
    ?thread=) must look the same: otherwise a user enumerates other users' mailboxes and
    conversations (400 "Select a valid choice" vs 200 empty)."""
    stranger_box = MailboxFactory(owner=UserFactory())
    thread = Thread.objects.create(mailbox=stranger_box, key="<root@x>")
    owner = UserFactory()
    MailboxFactory(owner=owner)
    api.force_authenticate(owner)
    existing = stranger_box.pk if param == "mailbox" else thread.pk
    a = api.get(f"/api/v1/emails/?{param}={existing}")
    b = api.get(f"/api/v1/emails/?{param}={existing + 100000}")
    assert (a.status_code, a.json().get("count")) == (b.status_code, b.json().get("count")), (
        a.status_code, a.json(), b.status_code, b.json())


def test_other_users_email_and_attachment_are_404_everywhere(api):
    """A stranger's email: detail, attachment, PATCH, DELETE, retry-send all 404 JSON."""
    victim = UserFactory()
    email = mk_email(MailboxFactory(owner=victim))
    blob = AttachmentBlob.objects.create(sha256="a" * 64, data=compress(b"secret"), size=6)
    att = Attachment.objects.create(email=email, blob=blob, filename="s.txt", content_type="text/plain", size=6)
    api.force_authenticate(UserFactory())
    for method, url in [("get", f"/api/v1/emails/{email.pk}/"),
                        ("get", f"/api/v1/emails/{email.pk}/attachments/{att.pk}/"),
                        ("patch", f"/api/v1/emails/{email.pk}/"), ("delete", f"/api/v1/emails/{email.pk}/"),
                        ("post", f"/api/v1/emails/{email.pk}/retry-send/")]:
        response = getattr(api, method)(url, {"seen": True}, format="json")
        assert response.status_code == 404 and is_json(response), (method, url, response.status_code)
    assert b"secret" not in response.content


# -- secrets --------------------------------------------------------------------------------

def test_no_password_or_ciphertext_in_browsable_pages_or_errors(api):
    """The mailbox detail rendered as HTML (the browsable API renders a PUT form with the
    current values), a 400 on PATCH, and OPTIONS carry neither the password nor its
    encrypted form."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, password="Pr0be-Secret-1", smtp_password="Pr0be-Smtp-2",
                             smtp_host="127.0.0.1", smtp_port=2525)
    with connection.cursor() as cursor:
        cursor.execute("SELECT password, smtp_password FROM mailsync_mailbox WHERE id = %s", [mailbox.pk])
        stored = cursor.fetchone()
    assert "Pr0be-Secret-1" not in stored[0]
    api.force_authenticate(owner)
    responses = [
        api.get(f"/api/v1/mailboxes/{mailbox.pk}/", HTTP_ACCEPT="text/html"),
        api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", {"password": "Typed-New-Secret-3",
                                                       "incoming_port": "x"}, format="json"),
        api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", {"password": ["Typed-New-Secret-3"]}, format="json"),
        api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", {"smtp_password": {"a": "Typed-New-Secret-3"}},
                  format="json"),
        api.get(f"/api/v1/mailboxes/{mailbox.pk}/status/", HTTP_ACCEPT="text/html"),
    ]
    assert responses[0].status_code == 200 and responses[1].status_code == 400
    for r in responses:
        text = r.content.decode()
        for secret in ("Pr0be-Secret-1", "Pr0be-Smtp-2", "Typed-New-Secret-3", stored[0][:40], stored[1][:40]):
            assert secret not in text, (r.status_code, r.request["PATH_INFO"], secret)


# -- filters ---------------------------------------------------------------------------------

def test_combined_filters_contact_unread_direction_folder_source(api):
    """?contact= & ?unread= & ?direction= narrow together; folder names with spaces and
    non-ASCII characters match; source=bcc_dropbox/crm/sync each select their mail."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    contact, other = ContactFactory(owner=owner), ContactFactory(owner=owner)
    want = mk_email(mailbox)
    EmailLink.objects.create(email=want, contact=contact)
    locate(want, "Kunden/Angebote 2026 \u00e4\u00f6\u00fc", 1)
    read = mk_email(mailbox, seen=True)
    EmailLink.objects.create(email=read, contact=contact)
    sent = mk_email(mailbox, direction="sent", source="crm", send_state="sent")
    EmailLink.objects.create(email=sent, contact=contact)
    elsewhere = mk_email(mailbox)
    EmailLink.objects.create(email=elsewhere, contact=other)
    bcc = mk_email(mailbox, source="bcc_dropbox")
    api.force_authenticate(owner)

    def ids(query: str) -> set[int]:
        response = api.get(f"/api/v1/emails/?{query}")
        assert response.status_code == 200, (query, response.content)
        return {e["id"] for e in response.json()["results"]}

    assert ids(f"contact={contact.pk}&unread=true&direction=received") == {want.pk}
    assert ids(f"contact={contact.pk}&unread=false") == {read.pk}
    assert ids(f"contact={contact.pk}&direction=sent") == {sent.pk}
    from urllib.parse import quote
    assert ids("folder=" + quote("Kunden/Angebote 2026 \u00e4\u00f6\u00fc")) == {want.pk}
    assert ids("source=bcc_dropbox") == {bcc.pk}
    assert ids("source=crm") == {sent.pk}
    assert ids("source=sync") == {want.pk, read.pk, elsewhere.pk}


def test_folder_filter_matches_inbox_case_insensitively(api):
    """INBOX is case-insensitive in IMAP (RFC 3501 5.1), and PATCH {"folder": "inbox"}
    already treats it so; ?folder=inbox should list the INBOX mail, not nothing."""
    owner = UserFactory()
    email = mk_email(MailboxFactory(owner=owner))
    locate(email, "INBOX", 1)
    api.force_authenticate(owner)
    assert api.get("/api/v1/emails/?folder=INBOX").json()["count"] == 1
    assert api.get("/api/v1/emails/?folder=inbox").json()["count"] == 1


def test_date_range_filters_with_dates_and_datetimes(api):
    """date_after (inclusive) and date_before (exclusive) take ISO datetimes and plain dates."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    jan, feb, mar = (mk_email(mailbox, date=datetime(2026, m, 15, tzinfo=timezone.utc)) for m in (1, 2, 3))
    api.force_authenticate(owner)

    def ids(query: str) -> set[int]:
        response = api.get(f"/api/v1/emails/?{query}")
        assert response.status_code == 200, (query, response.content)
        return {e["id"] for e in response.json()["results"]}

    assert ids("date_after=2026-02-01T00:00:00Z&date_before=2026-03-01T00:00:00Z") == {feb.pk}
    assert ids("date_after=2026-02-15T00:00:00Z") == {feb.pk, mar.pk}
    assert ids("date_after=2026-02-01&date_before=2026-03-01") == {feb.pk}
    assert jan.pk not in ids("date_after=2026-01-16")
    bad = api.get("/api/v1/emails/?date_after=garbage")
    assert bad.status_code == 400 and "date_after" in bad.json()["errors"]


def test_record_filters_only_name_records_you_may_see(api):
    """?lead= of a lead you cannot see gives the same answer as a lead that does not exist."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, sharing="public")
    hidden = LeadFactory(owner=UserFactory())
    email = mk_email(mailbox)
    EmailLink.objects.create(email=email, lead=hidden)
    api.force_authenticate(owner)
    assert api.get(f"/api/v1/emails/?lead={hidden.pk}").json()["count"] == 0
    assert api.get(f"/api/v1/emails/?lead={hidden.pk + 100000}").json()["count"] == 0


def test_boolean_query_params_as_http_libraries_send_them(api):
    """The schema says ?images= is a boolean; Python requests sends params={"images": True}
    as images=True. Remote images must then be shown, as ?unread=True is understood too."""
    owner = UserFactory()
    email = mk_email(MailboxFactory(owner=owner), html='<p>Hi</p><img src="https://t.example/p.gif">')
    api.force_authenticate(owner)
    assert api.get("/api/v1/emails/?unread=True").json()["count"] == 1
    shown = api.get(f"/api/v1/emails/{email.pk}/?images=True").json()
    assert shown["blocked_remote_images"] == 0 and "https://t.example/p.gif" in shown["html"], shown["html"]


def test_reading_by_the_api_marks_nothing_read(api):
    """GET emails/{id}/ leaves the mail unread (README)."""
    owner = UserFactory()
    email = mk_email(MailboxFactory(owner=owner, is_active=True))
    api.force_authenticate(owner)
    assert api.get(f"/api/v1/emails/{email.pk}/").json()["seen"] is False
    email.refresh_from_db()
    assert email.seen is False


# -- ordering and paging ---------------------------------------------------------------------

def _walk(api, query: str, pages: int) -> list[int]:  # noqa: ANN001
    seen: list[int] = []
    for page in range(1, pages + 1):
        response = api.get(f"/api/v1/emails/?{query}&page={page}")
        assert response.status_code == 200, response.content
        seen += [e["id"] for e in response.json()["results"]]
    return seen


def test_paging_through_mail_with_equal_dates_lists_each_once(api):
    """Many mails share a Date (a batch import, a mailing, mail without a Date header): paging
    through them must list every mail exactly once (ordering needs a unique tiebreaker)."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    same = datetime(2026, 2, 1, tzinfo=timezone.utc)
    emails = [mk_email(mailbox, date=same if i % 3 else None) for i in range(300)]
    api.force_authenticate(owner)
    listed = _walk(api, "page_size=20", 15)
    assert len(listed) == len(set(listed)) == 300, (len(listed), len(set(listed)))
    assert set(listed) == {e.pk for e in emails}
    listed_asc = _walk(api, "page_size=20&ordering=date", 15)
    assert len(set(listed_asc)) == 300


def _follow(api, url: str, between=lambda: None) -> list[list[int]]:  # noqa: ANN001
    """The ids of each page, following ``next`` from ``url`` to the end; ``between`` runs
    before each request after the first (a sync storing or deleting mail meanwhile)."""
    pages: list[list[int]] = []
    while url:
        if pages:
            between()
        response = api.get(url)
        assert response.status_code == 200 and is_json(response), response.content[:300]
        body = response.json()
        assert set(body) == {"count", "next", "previous", "results"}, body.keys()
        pages.append([e["id"] for e in body["results"]])
        url = body["next"]
        assert len(pages) < 100, "next never ends"
    return pages


def test_paging_while_new_mail_arrives_lists_nothing_twice(api):
    """A client pages through the list by following ``next`` while a sync stores new mail
    between its requests: no mail is listed twice and none of the mail there at the start is
    missed (page-number links shifted by one per new mail: page 2 repeated page 1's last)."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    there = [mk_email(mailbox) for _ in range(7)]
    api.force_authenticate(owner)
    newer = itertools.count(1)

    def arrives() -> None:
        mk_email(mailbox, date=datetime(2027, 1, next(newer), tzinfo=timezone.utc))

    pages = _follow(api, "/api/v1/emails/?page_size=3", between=arrives)
    listed = [pk for page in pages for pk in page]
    assert len(listed) == len(set(listed)), pages
    assert listed == [e.pk for e in reversed(there)], pages  # newest first, each once


def test_following_next_after_deletions_loses_nothing_else(api):
    """Mail deleted between two requests (one already shown, one not yet): every other mail
    is still listed, once (an offset would skip the row that moved up into the gap)."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, protocol="pop3", incoming_port=995)
    emails = [mk_email(mailbox) for _ in range(9)]  # newest first: emails[8] .. emails[0]
    api.force_authenticate(owner)
    # After page 1: one mail it showed and one not shown yet; after page 2: its last mail,
    # the one the cursor points at.
    deletions = iter([[emails[8], emails[4]], [emails[2]]])

    def deleted() -> None:
        for email in next(deletions, []):
            assert api.delete(f"/api/v1/emails/{email.pk}/").status_code == 204

    pages = _follow(api, "/api/v1/emails/?page_size=3", between=deleted)
    listed = [pk for page in pages for pk in page]
    assert pages[1] == [emails[5].pk, emails[3].pk, emails[2].pk]
    assert listed == [e.pk for e in reversed(emails) if e != emails[4]], pages


@pytest.mark.parametrize("ordering", ["", "&ordering=date"])
def test_cursor_paging_over_equal_dates_and_no_date_lists_each_once(api, ordering):
    """Mail sharing a Date (and mail with none) across page boundaries: following ``next``
    lists each once in the order of page-number paging (no Date first when newest first,
    equal dates by id), and following ``previous`` back gives the same pages."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    same = datetime(2026, 2, 1, tzinfo=timezone.utc)
    for i in range(23):
        mk_email(mailbox, date=None if i % 4 in (0, 3) else same)
    mk_email(mailbox, date=same - timedelta(days=1))
    mk_email(mailbox, date=same + timedelta(days=1))
    api.force_authenticate(owner)
    by_page_number = _walk(api, f"page_size=4{ordering}", 7)
    pages = _follow(api, f"/api/v1/emails/?page_size=4{ordering}")
    assert [pk for page in pages for pk in page] == by_page_number
    assert len(set(by_page_number)) == 25 and [len(p) for p in pages] == [4] * 6 + [1]

    # and back from the last page by ``previous``
    url = api.get(f"/api/v1/emails/?page_size=4{ordering}").json()["next"]
    while (body := api.get(url).json())["next"]:
        url = body["next"]
    back = [[e["id"] for e in body["results"]]]
    while body["previous"]:
        body = api.get(body["previous"]).json()
        back.append([e["id"] for e in body["results"]])
    assert back[::-1] == pages


def test_filters_ordering_and_page_size_stay_in_the_next_link(api):
    """``next`` keeps every other parameter: the pages after the first are filtered and
    sized like the first, and ``count`` is the whole filtered list on each."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    sent = [mk_email(mailbox, direction="sent", flagged=True) for _ in range(5)]
    for _ in range(5):
        mk_email(mailbox, direction="received", flagged=True)
    mk_email(mailbox, direction="sent")
    api.force_authenticate(owner)
    url = "/api/v1/emails/?direction=sent&flagged=true&page_size=2&ordering=date"
    first = api.get(url).json()
    assert first["count"] == 5 and first["previous"] is None
    query = first["next"].split("?", 1)[1]
    assert {"direction=sent", "flagged=true", "page_size=2", "ordering=date"} <= set(query.split("&"))
    assert "page=" not in query.replace("page_size=", "")
    pages = _follow(api, url)
    assert pages == [[sent[0].pk, sent[1].pk], [sent[2].pk, sent[3].pk], [sent[4].pk]]
    second = api.get(first["next"]).json()
    assert second["count"] == 5 and second["previous"]


def test_a_bad_cursor_is_a_json_400(api):
    """An edited, cut, foreign or empty cursor, one made for the other ordering, or a cursor
    together with page=: a JSON 400 that names the cursor, never a 500."""
    from urllib.parse import parse_qs, urlsplit

    from django.core import signing

    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    for _ in range(3):
        mk_email(mailbox)
    api.force_authenticate(owner)
    link = api.get("/api/v1/emails/?page_size=1").json()["next"]
    (good,) = parse_qs(urlsplit(link).query)["cursor"]
    assert api.get(f"/api/v1/emails/?page_size=1&cursor={good}").status_code == 200
    forged = signing.dumps({"v": 1, "d": None, "i": 1, "o": "desc", "b": 0}, salt="other")
    odd = signing.dumps({"v": 1, "d": "2026-13-45T00:00:00+00:00", "i": 1, "o": "desc", "b": 0},
                        salt="crm.api.pagination.cursor")
    edited = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    for query in (f"cursor={good[:-3]}", f"cursor={edited}", "cursor=abc",
                  "cursor=", f"cursor={forged}", f"cursor={odd}", "cursor=%00" + "x" * 5000,
                  f"cursor={good}&ordering=date", f"cursor={good}&page=2"):
        response = api.get(f"/api/v1/emails/?page_size=1&{query}")
        assert response.status_code == 400 and is_json(response), (query, response.status_code)
        body = response.json()
        assert body["code"] == "invalid" and "cursor" in body["errors"], (query, body)


def test_page_numbers_page_as_before(api):
    """?page=N answers as it did: the same rows as the cursor pages, page-numbered links,
    and count; clients that count pages keep working."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    emails = [mk_email(mailbox) for _ in range(7)][::-1]  # newest first
    api.force_authenticate(owner)
    body = api.get("/api/v1/emails/?page_size=3&page=2").json()
    assert [e["id"] for e in body["results"]] == [e.pk for e in emails[3:6]]
    assert body["count"] == 7
    assert body["next"].endswith("/api/v1/emails/?page=3&page_size=3")
    assert body["previous"].endswith("/api/v1/emails/?page_size=3")
    last = api.get(body["next"]).json()
    assert [e["id"] for e in last["results"]] == [emails[6].pk] and last["next"] is None
    assert api.get("/api/v1/emails/?page_size=3&page=4").status_code == 404


def test_page_size_is_capped_and_bad_pages_are_json_404(api):
    """page_size above 500 is capped at 500; page=0 / past the end is a JSON 404."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner)
    Email.objects.bulk_create([Email(mailbox=mailbox, fingerprint=f"bulk{i}", content_hash="h",
                                     direction="received", date=BASE) for i in range(510)])
    api.force_authenticate(owner)
    assert len(api.get("/api/v1/emails/?page_size=100000").json()["results"]) == 500
    for q in ("page=0", "page=999999", "page=-1"):
        r = api.get(f"/api/v1/emails/?{q}")
        assert r.status_code == 404 and is_json(r), q


# -- delete and patch ------------------------------------------------------------------------

def test_delete_then_patch_and_delete_again_are_json_404(api):
    """After DELETE (204), PATCH, GET and a second DELETE of the same email are 404 JSON."""
    owner = UserFactory()
    email = mk_email(MailboxFactory(owner=owner, protocol="pop3", incoming_port=995))
    api.force_authenticate(owner)
    assert api.delete(f"/api/v1/emails/{email.pk}/").status_code == 204
    for r in (api.patch(f"/api/v1/emails/{email.pk}/", {"seen": True}, format="json"),
              api.get(f"/api/v1/emails/{email.pk}/"), api.delete(f"/api/v1/emails/{email.pk}/")):
        assert r.status_code == 404 and is_json(r), r.status_code


# -- sending: the Idempotency-Key --------------------------------------------------------------

def test_a_key_used_for_a_since_deleted_email_is_not_a_500(api):
    """Send with Idempotency-Key K, DELETE that email, later send again with K (a retry
    queue that replays old requests): the answer is a 4xx JSON or a new send, not a 500
    (sending.email_send returns the deleted email; the view then cannot find it)."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, smtp_host="127.0.0.1", smtp_port=2525)
    old = mk_email(mailbox, direction="sent", source="crm", send_state="sent", sent_by=owner,
                   send_token="order-4711")
    api.force_authenticate(owner)
    assert api.delete(f"/api/v1/emails/{old.pk}/").status_code == 204
    response = api.post("/api/v1/emails/send/", {"from_address": mailbox.email_address, "to": ["a@b.example"],
                                                 "subject": "Again", "text": "x"},
                        format="json", HTTP_IDEMPOTENCY_KEY="order-4711")
    assert response.status_code < 500, (response.status_code, response.content[:300])
    assert is_json(response)


def test_keys_longer_than_100_characters_are_refused_not_cut(api):
    """The schema says "at most 100 characters". Two different 101-character keys that share
    their first 100 characters (a common prefix plus a counter) must not be taken for the
    same message: the second send would silently return the first email and send nothing."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, smtp_host="127.0.0.1", smtp_port=2525)
    api.force_authenticate(owner)
    prefix = "tenant-42/campaign-2026-spring/" + "x" * (100 - 31)
    assert len(prefix) == 100
    payload = {"from_address": mailbox.email_address, "to": ["a@b.example"], "text": "x"}
    first = api.post("/api/v1/emails/send/", {**payload, "subject": "First"}, format="json",
                     HTTP_IDEMPOTENCY_KEY=prefix + "1")
    second = api.post("/api/v1/emails/send/", {**payload, "subject": "Second"}, format="json",
                      HTTP_IDEMPOTENCY_KEY=prefix + "2")
    assert first.status_code == 400 or (
        second.status_code == 202 and second.json()["id"] != first.json()["id"]), (
        first.status_code, second.status_code, second.json().get("subject"))


# -- concurrency on the real server ------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_two_patches_of_one_email_at_once_both_apply(dovecot, mail_user, imap_mailbox):
    """Two clients PATCH the same mail at once ({"seen": true} and {"flagged": true}): both
    are 200 and the mail ends read and flagged in the CRM and on the server."""
    from mailsync.sync.imap import ImapSync
    from tests.mailsync.conftest import make_message

    dovecot.deliver(mail_user, make_message(subject="race"))
    ImapSync(imap_mailbox, timeout=10).run()
    email = Email.objects.get(mailbox=imap_mailbox)
    results: dict[str, int] = {}
    bodies: list = []

    def patch(body: dict) -> None:
        client = APIClient(raise_request_exception=False)
        client.force_authenticate(imap_mailbox.owner)
        try:
            r = client.patch(f"/api/v1/emails/{email.pk}/", body, format="json")
            results[next(iter(body))] = r.status_code
            bodies.append((body, r.json().get("seen"), r.json().get("flagged")))
        finally:
            connection.close()

    threads = [threading.Thread(target=patch, args=(b,)) for b in ({"seen": True}, {"flagged": True})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {"seen": 200, "flagged": 200}, results
    state = dovecot.folder_state(mail_user, "INBOX")
    assert {"\\Seen", "\\Flagged"} <= set(state.flags(state.uids[-1])), "server"
    email.refresh_from_db()
    crm = (email.seen, email.flagged, [loc.flags for loc in email.locations.all()])
    assert crm[:2] == (True, True), (crm, bodies)


# -- more malformed input ----------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("password", "p\u00e4ssw\u00f6rt-\u20ac"),
                                          ("username", "j\u00fcrgen@example.test")])
def test_non_ascii_credentials_are_a_json_400_not_a_500(api, dovecot, mail_user, field, value):
    """A password or username with a non-ASCII character (common in German, French
    passwords) is refused as a wrong login (400 JSON with what to fix), not a 500; the
    password is not echoed."""
    from tests.mailsync.conftest import mailbox_input

    owner = UserFactory()
    api.force_authenticate(owner)
    response = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, mail_user, **{field: value}),
                        format="json")
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert is_json(response)
    assert "p\u00e4ssw\u00f6rt" not in response.content.decode()
    assert not Mailbox.objects.filter(owner=owner).exists()


def test_session_auth_without_csrf_is_a_json_403(api):
    """A browser session (no token) that POSTs without the CSRF token gets a JSON 403."""
    owner = UserFactory()
    mailbox = MailboxFactory(owner=owner, is_active=True)
    client = APIClient(enforce_csrf_checks=True, raise_request_exception=False)
    client.force_login(owner)
    response = client.post(f"/api/v1/mailboxes/{mailbox.pk}/sync/")
    assert response.status_code == 403 and is_json(response), response.status_code
    assert "CSRF" in response.json()["detail"]
