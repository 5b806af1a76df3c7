"""malformed input to the mailbox endpoints is a 400 with a JSON body, never a 500,
and nothing is saved."""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from mailsync.models import Mailbox
from tests.factories import MailboxFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def api():
    client = APIClient(raise_request_exception=False)
    return client


@pytest.fixture
def owner(api):
    user = UserFactory()
    api.force_authenticate(user)
    return user


def good(dovecot, mail_user, **overrides) -> dict:
    return {
        "display_name": "Sales", "email_address": mail_user.email,
        "incoming_host": dovecot.host, "incoming_port": dovecot.imaps_port,
        "incoming_security": "ssl", "username": mail_user.username,
        "password": mail_user.password, **overrides,
    }


def assert_json_400(response) -> dict:
    assert response.status_code == 400, (response.status_code, response.content[:500])
    body = response.json()
    assert "detail" in body and "code" in body, body
    return body


BAD = {
    "port_string": {"incoming_port": "abc"},
    "port_list": {"incoming_port": [993]},
    "port_negative": {"incoming_port": -1},
    "port_huge": {"incoming_port": 2**40},
    "protocol_unknown": {"protocol": "smtp"},
    "security_unknown": {"incoming_security": "tls13"},
    "provider_too_long": {"provider": "x" * 500},
    "display_name_list": {"display_name": ["a", "b"]},
    "display_name_huge": {"display_name": "x" * 100_000},
    "username_huge": {"username": "u" * 10_000},
    "email_junk": {"email_address": "not an address"},
    "host_huge": {"incoming_host": "h" * 1000},
    "folders_dict": {"folders": {"INBOX": 1}},
    "folders_ints": {"folders": [1, 2]},
    "folders_nested": {"folders": [["INBOX"]]},
    "folders_string": {"folders": "INBOX"},
    "folders_empty_name": {"folders": [""]},
    "excluded_junk": {"excluded_domains": "not a domain!\n<script>"},
    "excluded_list": {"excluded_domains": ["a.com"]},
    "sync_since_garbage": {"sync_since": "yesterday"},
    "sync_since_int": {"sync_since": 20240101},
    "sharing_unknown": {"sharing": "everyone"},
    "nul_in_username": {"username": "a\x00b"},
    "smtp_port_string": {"smtp_host": "smtp.example.com", "smtp_port": "x"},
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_create_is_400_json_and_saves_nothing(api, owner, dovecot, mail_user, name):
    response = api.post("/api/v1/mailboxes/", good(dovecot, mail_user, **BAD[name]), format="json")
    assert_json_400(response)
    assert not Mailbox.objects.exists()


def test_body_that_is_not_an_object_is_400(api, owner):
    for body in ([1, 2], "text", 5):
        assert_json_400(api.post("/api/v1/mailboxes/", body, format="json"))
    response = api.post("/api/v1/mailboxes/", b"{not json", content_type="application/json")
    assert_json_400(response)


def test_port_above_65535_is_refused_not_wrapped_to_another_port(api, owner, dovecot, mail_user):
    """getaddrinfo wraps a port modulo 65536: 65536 + 993 would log in on 993 and store a
    port no mail client would accept."""
    response = api.post("/api/v1/mailboxes/",
                        good(dovecot, mail_user, incoming_port=dovecot.imaps_port + 65536),
                        format="json")
    assert_json_400(response)
    assert not Mailbox.objects.exists()


def test_port_zero_is_400(api, owner, dovecot, mail_user):
    response = api.post("/api/v1/mailboxes/", good(dovecot, mail_user, incoming_port=0), format="json")
    assert_json_400(response)
    assert not Mailbox.objects.exists()


@pytest.mark.parametrize("host", ["a..b", "x" * 70 + ".example.com", ".", "exa mple.com",
                                  "imap://mail.example.com", "[::1]", "mail.example.com:993"])
def test_odd_hosts_are_400_not_500(api, owner, dovecot, mail_user, host):
    response = api.post("/api/v1/mailboxes/", good(dovecot, mail_user, incoming_host=host), format="json")
    assert_json_400(response)
    assert not Mailbox.objects.exists()


@pytest.mark.parametrize("host", ["a..b", "x" * 70 + ".example.com", "127.0.0.1", "::1",
                                  "localhost", "10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1"])
def test_odd_or_private_hosts_with_ssrf_guard_on_are_400(api, owner, dovecot, mail_user, settings, host):
    settings.MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS = False
    response = api.post("/api/v1/mailboxes/", good(dovecot, mail_user, incoming_host=host), format="json")
    body = assert_json_400(response)
    assert "incoming_host" in body["errors"] or body["code"] in {"config_error", "unreachable"}, body
    assert not Mailbox.objects.exists()


def test_smtp_host_odd_with_ssrf_guard_on_is_400(api, owner, dovecot, mail_user, settings, monkeypatch):
    settings.MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS = False
    # the incoming host must pass the guard: point it at a public name resolved locally
    import socket as _socket
    real = _socket.getaddrinfo

    def fake(host, *a, **k):  # noqa: ANN001, ANN002, ANN003
        if host == "imap.public.example":
            return [(_socket.AF_INET, _socket.SOCK_STREAM, 6, "", ("93.184.216.34", 993))]
        return real(host, *a, **k)

    monkeypatch.setattr(_socket, "getaddrinfo", fake)
    response = api.post("/api/v1/mailboxes/",
                        good(dovecot, mail_user, incoming_host="imap.public.example",
                             smtp_host="a..b", smtp_port=587), format="json")
    assert_json_400(response)
    assert not Mailbox.objects.exists()


def test_ten_thousand_folders_is_400_or_saved_without_500(api, owner, dovecot, mail_user):
    response = api.post("/api/v1/mailboxes/",
                        good(dovecot, mail_user, folders=[f"F{i}" for i in range(10_000)]),
                        format="json")
    assert response.status_code in (201, 400), (response.status_code, response.content[:300])


@pytest.mark.parametrize("patch", [
    {"incoming_port": "abc"}, {"folders": [None]}, {"sync_since": "2024-13-45"},
    {"excluded_domains": "bad domain"}, {"email_address": "x"}, {"protocol": "nntp"},
    {"incoming_host": "a..b"}, {"display_name": {"a": 1}},
])
def test_malformed_patch_is_400_and_changes_nothing(api, owner, patch):
    mailbox = MailboxFactory(owner=owner, is_active=True)
    before = {f: getattr(mailbox, f) for f in ("incoming_port", "folders", "sync_since",
                                                 "excluded_domains", "email_address", "protocol",
                                                 "incoming_host", "display_name")}
    response = api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", patch, format="json")
    assert_json_400(response)
    mailbox.refresh_from_db()
    assert {f: getattr(mailbox, f) for f in before} == before


def test_unknown_mailbox_ids_are_json_404(api, owner):
    for url in ("/api/v1/mailboxes/999999/", "/api/v1/mailboxes/abc/",
                "/api/v1/mailboxes/99999999999999999999/", "/api/v1/mailboxes/999999/status/"):
        response = api.get(url)
        assert response.status_code == 404, (url, response.status_code)
        assert response.json()["detail"], url
