"""Creating a mailbox over the API with a provider preset fills in the servers the user left
out, as the setup page does: {"provider": "gmail", "email_address", "username", "password"}
is enough. Before, the API answered 400 "incoming_host: This field is required." for a
preset the page handles.

The preset's servers are the private Dovecot and the SMTP test server (a preset entry
pointed at them: Gmail's own servers cannot be reached from here); the login test the API
runs on create is real."""
from __future__ import annotations

import dataclasses

import pytest
from rest_framework.test import APIClient

from mailsync import providers
from mailsync.models import Mailbox
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def api_owner():
    api = APIClient()
    user = UserFactory()
    api.force_authenticate(user)
    return api, user


@pytest.fixture
def local_preset(dovecot, smtp_outbox, monkeypatch):  # noqa: ANN001, ANN201
    """A preset whose servers are the test servers (IMAPS, POP3S and SMTP with STARTTLS)."""
    preset = dataclasses.replace(
        providers.PRESETS["zoho"], key="zoho", imap_host=dovecot.host, imap_port=dovecot.imaps_port,
        pop3_host=dovecot.host, pop3_port=dovecot.pop3s_port, smtp_host=smtp_outbox.host,
        smtp_port=smtp_outbox.port, smtp_security="starttls")
    monkeypatch.setitem(providers.PRESETS, "zoho", preset)
    return preset


def test_a_preset_and_a_login_are_enough_to_add_a_mailbox(api_owner, local_preset, mail_user, smtp_outbox):
    api, owner = api_owner
    response = api.post("/api/v1/mailboxes/", {
        "provider": "zoho", "email_address": mail_user.email, "username": mail_user.username,
        "password": mail_user.password, "smtp_username": smtp_outbox.username,
        "smtp_password": smtp_outbox.password}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["incoming_host"], body["incoming_port"], body["incoming_security"]) == (
        local_preset.imap_host, local_preset.imap_port, "ssl")
    assert (body["smtp_host"], body["smtp_port"], body["smtp_security"]) == (
        local_preset.smtp_host, local_preset.smtp_port, "starttls")
    assert Mailbox.objects.get(pk=body["id"]).incoming_host == local_preset.imap_host


def test_pop3_takes_the_presets_pop3_server_and_given_servers_win(
        api_owner, local_preset, mail_user, dovecot, smtp_outbox):
    api, owner = api_owner
    smtp = {"smtp_username": smtp_outbox.username, "smtp_password": smtp_outbox.password}
    response = api.post("/api/v1/mailboxes/", {
        "provider": "zoho", "protocol": "pop3", "email_address": mail_user.email,
        "username": mail_user.username, "password": mail_user.password, **smtp}, format="json")
    assert response.status_code == 201, response.content
    assert (response.json()["incoming_host"], response.json()["incoming_port"]) == (
        dovecot.host, dovecot.pop3s_port)

    # A server the user gives is kept, with its own port (not the preset's).
    other = UserFactory()
    api.force_authenticate(other)
    response = api.post("/api/v1/mailboxes/", {
        "provider": "zoho", "email_address": mail_user.email, "username": mail_user.username,
        "password": mail_user.password, "incoming_host": "localhost",
        "incoming_port": dovecot.imaps_port, **smtp}, format="json")
    assert response.status_code == 201, response.content
    assert (response.json()["incoming_host"], response.json()["incoming_port"]) == (
        "localhost", dovecot.imaps_port)


def test_without_a_preset_the_server_is_still_asked_for_and_pop3_where_there_is_none_is_refused(
        api_owner, mail_user):
    api, _ = api_owner
    response = api.post("/api/v1/mailboxes/", {
        "email_address": mail_user.email, "username": mail_user.username,
        "password": mail_user.password}, format="json")
    assert response.status_code == 400
    assert "incoming_host" in response.json()["errors"], response.json()

    response = api.post("/api/v1/mailboxes/", {
        "provider": "icloud", "protocol": "pop3", "email_address": mail_user.email,
        "username": mail_user.username, "password": mail_user.password}, format="json")
    assert response.status_code == 400
    assert "does not offer POP3" in str(response.json()["errors"]["protocol"]), response.json()
    assert not Mailbox.objects.exists()
