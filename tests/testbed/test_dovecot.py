"""The private Dovecot behaves like a real provider: TLS verifies, mail arrives, doveadm agrees."""

from __future__ import annotations

import datetime as dt
import imaplib
import os
import poplib
import ssl
import time
from email.message import EmailMessage

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.testbed import dovecot as dovecot_module
from tests.testbed.dovecot import DovecotServer, DovecotSetupError, DovecotUser
from tests.testbed.tls import SYSTEM_BUNDLE, TestCA

TIMEOUT = 10


def make_message(subject: str, body: str = "Hello.\n", size: int = 0) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "bob@example.test"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    msg.set_content(body + ("x" * 76 + "\n") * (size // 77))
    return msg.as_bytes().replace(b"\n", b"\r\n")


def imaps(dovecot: DovecotServer, user: DovecotUser) -> IMAPClient:
    client = IMAPClient(dovecot.host, port=dovecot.imaps_port, ssl=True, timeout=TIMEOUT)
    client.login(user.username, user.password)
    return client


def test_ca_bundle_is_in_effect(test_ca: TestCA) -> None:
    assert os.environ["SSL_CERT_FILE"] == str(test_ca.bundle_path)
    bundle = test_ca.bundle_path.read_bytes()
    assert bundle.endswith(test_ca.ca_cert_path.read_bytes())
    if SYSTEM_BUNDLE.is_file():
        assert len(bundle) > len(test_ca.ca_cert_path.read_bytes()) * 10


def test_imaps_with_default_verification_sees_delivered_mail(
    dovecot: DovecotServer,
) -> None:
    user = dovecot.add_user()
    dovecot.deliver(user, make_message("first"))
    dovecot.deliver(user, make_message("second"))
    state = dovecot.folder_state(user)

    with imaps(dovecot, user) as client:
        selected = client.select_folder("INBOX")
        uids = client.search("ALL")
        fetched = client.fetch(uids, ["ENVELOPE", "BODY.PEEK[]"])

    assert selected[b"UIDVALIDITY"] == state.uidvalidity == state["uidvalidity"]
    assert sorted(uids) == state.uids == [1, 2]
    assert state.count == 2
    assert fetched[2][b"ENVELOPE"].subject == b"second"
    # LMTP prepends Return-Path/Delivered-To/Received, the body is intact.
    assert fetched[1][b"BODY[]"].endswith(make_message("first").split(b"\r\n\r\n", 1)[1])


def test_full_address_logs_in_too(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    with IMAPClient(dovecot.host, port=dovecot.imaps_port, ssl=True, timeout=TIMEOUT) as client:
        client.login(user.email, user.password)
        assert client.select_folder("INBOX")[b"EXISTS"] == 0


def test_starttls_on_plain_port_verifies_certificate(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    with IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=False, timeout=TIMEOUT) as client:
        assert b"STARTTLS" in client.capabilities()
        client.starttls(ssl.create_default_context())
        client.login(user.username, user.password)
        assert client._imap.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]


def test_certificate_not_trusted_without_test_ca(dovecot: DovecotServer) -> None:
    # Proves verification is real: a verifying context without our CA must refuse.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + hostname check
    if SYSTEM_BUNDLE.is_file():
        context.load_verify_locations(cafile=str(SYSTEM_BUNDLE))
    with pytest.raises(ssl.SSLCertVerificationError):
        IMAPClient(
            dovecot.host, port=dovecot.imaps_port, ssl=True, ssl_context=context, timeout=TIMEOUT
        )


def test_post_login_capabilities_and_special_use(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    with imaps(dovecot, user) as client:
        caps = set(client.capabilities())
        folders = {name: set(flags) for flags, _, name in client.list_folders()}
        subscribed = {name for _, _, name in client.list_sub_folders()}
    assert {b"CONDSTORE", b"QRESYNC", b"SPECIAL-USE", b"UIDPLUS", b"IDLE"} <= caps
    assert b"\\Sent" in folders["Sent"]
    assert b"\\Drafts" in folders["Drafts"]
    assert b"\\Trash" in folders["Trash"]
    assert b"\\Junk" in folders["Junk"]
    assert {"Sent", "Drafts", "Trash", "Junk"} <= subscribed


def test_pop3_ssl_lists_delivered_message(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    raw = make_message("pop me")
    dovecot.deliver(user, raw)

    pop = poplib.POP3_SSL(
        dovecot.host, dovecot.pop3s_port, context=ssl.create_default_context(), timeout=TIMEOUT
    )
    try:
        pop.user(user.username)
        pop.pass_(user.password)
        count, _ = pop.stat()
        _, listing, _ = pop.uidl()
        _, lines, _ = pop.retr(1)
    finally:
        pop.quit()
    assert count == 1
    assert len(listing) == 1
    assert b"Subject: pop me" in lines


def test_pop3_stls_on_plain_port(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    try:
        pop.stls(ssl.create_default_context())
        pop.user(user.username)
        pop.pass_(user.password)
        assert pop.stat() == (0, 0)
    finally:
        pop.quit()


def test_wrong_password_is_refused_quickly(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    started = time.monotonic()
    with (
        IMAPClient(dovecot.host, port=dovecot.imaps_port, ssl=True, timeout=TIMEOUT) as client,
        pytest.raises(LoginError),
    ):
        client.login(user.username, "not-" + user.password)
    pop = poplib.POP3_SSL(
        dovecot.host, dovecot.pop3s_port, context=ssl.create_default_context(), timeout=TIMEOUT
    )
    try:
        pop.user(user.username)
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
    finally:
        pop.close()
    # The right password still works right after (no lasting penalty for 127.0.0.1).
    with imaps(dovecot, user) as client:
        client.select_folder("INBOX")
    assert time.monotonic() - started < 5


def test_folder_state_reflects_flag_set_over_imap(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    dovecot.deliver(user, make_message("flag me"))
    before = dovecot.folder_state(user)
    with imaps(dovecot, user) as client:
        client.select_folder("INBOX")
        client.add_flags([1], [b"\\Flagged", b"$Important"])
    after = dovecot.folder_state(user)
    assert before.flags(1) == frozenset()
    assert after.flags(1) == {"\\Flagged", "$Important"}
    assert after.highestmodseq > before.highestmodseq


def test_append_with_flags_and_internal_date(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    when = dt.datetime(2021, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    uid = dovecot.append(
        user, "Archive 2021", make_message("old"), flags=["\\Seen"], internal_date=when
    )
    assert dovecot.folder_state(user, "Archive 2021").messages == [(uid, frozenset({"\\Seen"}))]
    with imaps(dovecot, user) as client:
        client.select_folder("Archive 2021", readonly=True)
        data = client.fetch([uid], ["INTERNALDATE", "FLAGS"])[uid]
    assert data[b"INTERNALDATE"].astimezone(dt.UTC).replace(tzinfo=None) == when.replace(
        tzinfo=None
    )
    assert set(data[b"FLAGS"]) - {b"\\Recent"} == {b"\\Seen"}


def test_doveadm_changes_are_seen_by_imap(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    dovecot.create_folder(user, "Projects/Acme")
    first = dovecot.append(user, "INBOX", make_message("one"))
    second = dovecot.append(user, "INBOX", make_message("two"))
    dovecot.set_flags(user, "INBOX", first, ["\\Answered", "\\Seen"])
    dovecot.expunge(user, "INBOX", second)

    state = dovecot.folder_state(user)
    assert state.messages == [(first, frozenset({"\\Answered", "\\Seen"}))]
    assert state.uidnext == second + 1
    with imaps(dovecot, user) as client:
        names = {name for _, _, name in client.list_folders()}
        client.select_folder("INBOX")
        assert client.search("ALL") == [first]
        assert set(client.get_flags([first])[first]) - {b"\\Recent"} == {b"\\Answered", b"\\Seen"}
    assert "Projects/Acme" in names

    dovecot.set_flags(user, "INBOX", first, [])
    assert dovecot.folder_state(user).flags(first) == frozenset()


def test_users_are_isolated(dovecot: DovecotServer) -> None:
    alice, bob = dovecot.add_user(), dovecot.add_user()
    dovecot.deliver(alice, make_message("for alice"))
    assert dovecot.folder_state(alice).count == 1
    assert dovecot.folder_state(bob).count == 0
    with pytest.raises(ValueError):
        dovecot.add_user(alice.username)


def test_reset_uidvalidity_renumbers_and_disconnects(dovecot: DovecotServer) -> None:
    user = dovecot.add_user()
    for subject in ("a", "b", "c"):
        dovecot.deliver(user, make_message(subject))
    dovecot.set_flags(user, "INBOX", 3, ["\\Seen"])
    dovecot.expunge(user, "INBOX", 2)
    before = dovecot.folder_state(user)
    client = imaps(dovecot, user)
    client.select_folder("INBOX")

    new_uidvalidity = dovecot.reset_uidvalidity(user)

    after = dovecot.folder_state(user)
    assert new_uidvalidity == after.uidvalidity != before.uidvalidity
    assert before.messages == [(1, frozenset()), (3, frozenset({"\\Seen"}))]
    assert after.messages == [(1, frozenset()), (2, frozenset({"\\Seen"}))]
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        client.noop()
    with imaps(dovecot, user) as fresh:
        assert fresh.select_folder("INBOX")[b"UIDVALIDITY"] == new_uidvalidity
        subjects = fresh.fetch([1, 2], ["ENVELOPE"])
    assert [subjects[uid][b"ENVELOPE"].subject for uid in (1, 2)] == [b"a", b"c"]


def test_missing_vmail_user_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dovecot_module, "VMAIL_USER", "mailroom-no-such-user")
    with pytest.raises(DovecotSetupError, match="scripts/install-test-deps"):
        dovecot_module.vmail_ids()
