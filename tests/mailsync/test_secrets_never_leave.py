"""Mailbox passwords are encrypted at rest and never returned by any API, page, log or Celery
task argument. Written as review probes; those that failed were fixed: pointing a mailbox at
another server (API, page or Django admin) without typing the password again sent the saved
one there (now refused: services.secrets_to_reenter); key rotation could stop half-way; the
DEBUG 500 page showed the password in frame locals (crm.security.SecretsReporterFilter)."""
from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import socket
import threading
import time
import urllib.parse

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from rest_framework.test import APIClient

from mailsync.models import Email, Mailbox, MessageError
from mailsync.sync.imap import ImapSync
from tests.factories import AdministratorFactory, ContactFactory, MailboxFactory, UserFactory
from tests.mailsync.conftest import mailbox_input, make_message, wait_for

pytestmark = pytest.mark.django_db

SECRET = "Zq9xPr0beSekr3t7731"
SECRET_SPECIAL = 'Zq9"Pr0be\\Sekr3t!7732'
SECRET_UNICODE = "Zq9Prööbe€Sekr3t7733"
SMTP_SECRET = "Zq9xSmtpSekr3t7734"

LOGGERS = ["", "django", "django.db.backends", "django.request", "celery", "celery.app.trace",
           "imapclient", "imapclient.imaplib", "mailsync", "aiosmtplib", "asyncio", "crm",
           "kombu", "py.warnings"]


def variants(secret: str) -> list[str]:
    raw = secret.encode("utf-8")
    out = {secret, repr(secret)[1:-1], secret.replace("\\", "\\\\").replace('"', '\\"'),
           base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="),
           urllib.parse.quote(secret), urllib.parse.quote_plus(secret),
           raw.decode("latin-1"), str(raw)[2:-1]}
    return [v for v in out if v]


def assert_no_secret(text: str, *secrets: str, where: str = "") -> None:
    for secret in secrets:
        for v in variants(secret):
            assert v not in text, f"{where}: secret {secret!r} found as {v!r}: ...{text[max(0, text.find(v) - 300):text.find(v) + 100]}..."


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.records.append(f"{record.name} {text} {record.args!r}")

    @property
    def text(self) -> str:
        return "\n".join(self.records)


@contextlib.contextmanager
def all_logging():
    """Everything at DEBUG, SQL queries included (params hold ciphertext, never plaintext)."""
    handler = _Collect()
    saved = {}
    for name in LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (lg.level, lg.disabled)
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    root = logging.getLogger()
    root.addHandler(handler)
    old_force = connection.force_debug_cursor
    connection.force_debug_cursor = True
    try:
        yield handler
    finally:
        connection.force_debug_cursor = old_force
        root.removeHandler(handler)
        for name, (level, disabled) in saved.items():
            lg = logging.getLogger(name)
            lg.setLevel(level)
            lg.disabled = disabled


def raw_column(mailbox_id: int, column: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM mailsync_mailbox WHERE id = %s", [mailbox_id])
        return cursor.fetchone()[0]


def db_texts(mailbox: Mailbox) -> str:
    mailbox.refresh_from_db()
    parts = [mailbox.last_error]
    parts += list(MessageError.objects.filter(mailbox=mailbox).values_list("error", flat=True)) \
        if hasattr(MessageError, "error") else [str(v) for v in MessageError.objects.filter(mailbox=mailbox).values()]
    parts += [str(v) for v in Email.objects.filter(mailbox=mailbox).values("send_error", "subject")]
    return "\n".join(map(str, parts))


@pytest.fixture
def api():
    return APIClient(raise_request_exception=False)


@pytest.fixture
def secret_user(dovecot):
    return dovecot.add_user(password=SECRET)


def secret_mailbox(dovecot, user, **kw) -> Mailbox:
    return MailboxFactory(owner=kw.pop("owner", None) or UserFactory(), email_address=user.email,
                          incoming_host=dovecot.host, incoming_port=dovecot.imaps_port,
                          incoming_security="ssl", username=user.username, password=user.password,
                          is_active=True, **kw)


# -- logs, errors and the status during logins and syncs ---------------------------------------

@pytest.mark.parametrize("secret", [SECRET, SECRET_SPECIAL, SECRET_UNICODE])
def test_probe_good_and_wrong_passwords_never_in_logs_errors_or_status(api, dovecot, secret, capfd):
    user = dovecot.add_user(password=secret)
    owner = UserFactory()
    api.force_authenticate(owner)
    wrong = secret + "-wrong"
    with all_logging() as logs:
        r1 = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, user, password=wrong), format="json")
        assert r1.status_code == 400, r1.content
        r2 = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, user), format="json")
        assert r2.status_code == 201, r2.content
        mid = r2.json()["id"]
        dovecot.deliver(user, make_message(subject="one"))
        ImapSync(Mailbox.objects.get(pk=mid), timeout=10).run()
        r3 = api.post(f"/api/v1/mailboxes/{mid}/test/")
        Mailbox.objects.filter(pk=mid).update(password=wrong)
        r4 = api.post(f"/api/v1/mailboxes/{mid}/sync/")
        r5 = api.get(f"/api/v1/mailboxes/{mid}/status/")
        r6 = api.patch(f"/api/v1/mailboxes/{mid}/", {"password": wrong + "2"}, format="json")
    assert Mailbox.objects.get(pk=mid).state == Mailbox.State.ERROR
    out, err = capfd.readouterr()
    assert any("LOGIN" in r or "AUTHENTICATE" in r for r in logs.records), "imaplib debug not captured"
    for s in (secret, wrong, wrong + "2"):
        assert_no_secret(logs.text, s, where="logs")
        assert_no_secret(out + err, s, where="stdout/stderr")
        assert_no_secret(db_texts(Mailbox.objects.get(pk=mid)), s, where="db errors")
        for r in (r1, r2, r3, r4, r5, r6):
            assert_no_secret(r.content.decode(), s, where=f"response {r.status_code}")


def test_probe_fetch_process_env_cmdline_and_debug_stderr(dovecot, secret_user, settings,
                                                         monkeypatch, capfd):
    from mailsync.sync import fetcher

    settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = 3
    monkeypatch.setenv("MAILROOM_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PYTHONPROBE_SECRET_CARRIER", "harmless")
    import mailsync.sync.imap as imap_engine
    monkeypatch.setattr(imap_engine, "BATCH_MESSAGES", 3)
    mailbox = secret_mailbox(dovecot, secret_user)
    for i in range(8):
        dovecot.deliver(secret_user, make_message(subject=f"m{i}"))
    seen: list[tuple[int, bytes, bytes]] = []
    real_spawn = fetcher._spawn

    def spawn():
        child = real_spawn()
        seen.append((child.pid, open(f"/proc/{child.pid}/environ", "rb").read(),
                     open(f"/proc/{child.pid}/cmdline", "rb").read()))
        return child

    import subprocess
    import tempfile

    stderr_file = tempfile.TemporaryFile()
    real_popen = subprocess.Popen

    def popen(cmd, *a, **k):  # noqa: ANN001, ANN002, ANN003
        if "mailsync.sync.fetcher" in str(cmd):
            k["stderr"] = stderr_file
        return real_popen(cmd, *a, **k)

    monkeypatch.setattr(fetcher, "_spawn", spawn)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with all_logging() as logs:
        report = ImapSync(mailbox, timeout=10).run()
    monkeypatch.setattr(subprocess, "Popen", real_popen)
    assert report.new == 8
    assert seen, "no fetch process was used"
    out, err = capfd.readouterr()
    stderr_file.seek(0)
    err += stderr_file.read().decode("utf-8", "replace")
    assert "imapclient" in err or "LOGIN" in err, f"child debug output not seen: {err[:500]}"
    assert_no_secret(out + err, SECRET, where="child stderr")
    assert_no_secret(logs.text, SECRET, where="logs")
    keys = os.environ["MAILROOM_ENCRYPTION_KEYS"]
    for pid, environ, cmdline in seen:
        text = (environ + b"\n" + cmdline).decode("utf-8", "replace")
        assert_no_secret(text, SECRET, where=f"/proc/{pid}")
        assert keys not in text and "DATABASE_URL" not in text, text


def test_probe_pop3_login_failure_thread_and_process(dovecot, settings, monkeypatch, capfd):
    from mailsync.sync.pop3 import Pop3Sync

    monkeypatch.setenv("MAILROOM_LOG_LEVEL", "DEBUG")
    user = dovecot.add_user(password=SECRET)
    for mode in (0, 1):
        settings.MAILROOM_SYNC_PROCESS_MIN_MESSAGES = mode
        mailbox = MailboxFactory(owner=UserFactory(), email_address=user.email,
                                 protocol=Mailbox.Protocol.POP3, incoming_host=dovecot.host,
                                 incoming_port=dovecot.pop3s_port, incoming_security="ssl",
                                 username=user.username, password=SECRET + "-bad", is_active=True)
        with all_logging() as logs, contextlib.suppress(Exception):
            Pop3Sync(mailbox, timeout=10).run()
        mailbox.refresh_from_db()
        assert mailbox.state == Mailbox.State.ERROR and mailbox.last_error_code == "auth_failed", mailbox.last_error
        out, err = capfd.readouterr()
        for s in (SECRET, SECRET + "-bad"):
            assert_no_secret(logs.text + out + err + db_texts(mailbox), s, where=f"pop3 mode {mode}")
        # and a good login, via the child, syncing
        mailbox.password = SECRET
        mailbox.save()
        for i in range(3):
            dovecot.deliver(user, make_message(subject=f"p{mode}-{i}"))
        with all_logging() as logs:
            Pop3Sync(Mailbox.objects.get(pk=mailbox.pk), timeout=10).run()
        out, err = capfd.readouterr()
        assert_no_secret(logs.text + out + err, SECRET, where=f"pop3 good mode {mode}")
        mailbox.is_active = False
        mailbox.save()


def test_probe_smtp_send_and_auth_failure(dovecot, secret_user, smtp_outbox, capfd,
                                          django_capture_on_commit_callbacks):
    from mailsync import sending

    smtp_outbox.add_credentials("probe-smtp", SMTP_SECRET)
    mailbox = secret_mailbox(dovecot, secret_user, smtp_host=smtp_outbox.host,
                             smtp_port=smtp_outbox.port, smtp_security="starttls",
                             smtp_username="probe-smtp", smtp_password=SMTP_SECRET)
    contact = ContactFactory(owner=mailbox.owner, email="grace@navy.example")
    with all_logging() as logs:
        with django_capture_on_commit_callbacks(execute=True):
            ok = sending.email_send(actor=mailbox.owner, from_address=mailbox.email_address,
                                    to="grace@navy.example", subject="hi", text="x", record=contact)
        assert Email.objects.get(pk=ok.pk).send_state == Email.SendState.SENT
        Mailbox.objects.filter(pk=mailbox.pk).update(smtp_password=SMTP_SECRET + "-bad")
        with django_capture_on_commit_callbacks(execute=True):
            bad = sending.email_send(actor=mailbox.owner, from_address=mailbox.email_address,
                                     to="grace@navy.example", subject="hi2", text="y", record=contact)
        bad = Email.objects.get(pk=bad.pk)
        assert bad.send_state == Email.SendState.FAILED, bad.send_state
        # incoming login used for SMTP (no smtp_username)
        Mailbox.objects.filter(pk=mailbox.pk).update(smtp_username="", smtp_password="")
        with django_capture_on_commit_callbacks(execute=True):
            bad2 = sending.email_send(actor=mailbox.owner, from_address=mailbox.email_address,
                                      to="grace@navy.example", subject="hi3", text="z", record=contact)
    out, err = capfd.readouterr()
    texts = logs.text + out + err + db_texts(mailbox) + bad.send_error + Email.objects.get(pk=bad2.pk).send_error
    for s in (SECRET, SMTP_SECRET, SMTP_SECRET + "-bad"):
        assert_no_secret(texts, s, where="smtp")


def test_probe_idle_watcher_good_and_bad_login(dovecot, secret_user, capfd):
    from mailsync.idle import IdleSupervisor, MailboxWatcher
    from mailsync.sync.base import server_settings

    good = secret_mailbox(dovecot, secret_user)
    with all_logging() as logs:
        targets = [server_settings(good, timeout=10)]
        watcher = MailboxWatcher(good.pk, server_settings(good, timeout=10), lambda _id: None)
        watcher.start()
        wait_for(watcher.connected.is_set, 15)
        watcher.stop()
        watcher.join(10)
        Mailbox.objects.filter(pk=good.pk).update(password=SECRET + "-bad")
        good.refresh_from_db()
        bad = MailboxWatcher(good.pk, server_settings(good, timeout=10), lambda _id: None)
        bad.start()
        bad.join(20)
        assert bad.failed is not None
    out, err = capfd.readouterr()
    text = logs.text + out + err + repr(targets) + str(bad.failed) + repr(bad.failed)
    for s in (SECRET, SECRET + "-bad"):
        assert_no_secret(text, s, where="idle")


# -- Celery task arguments ------------------------------------------------------------------------

def test_probe_every_task_message_carries_ids_only(api, dovecot, secret_user, smtp_outbox, monkeypatch,
                                                   django_capture_on_commit_callbacks):
    from celery.app.task import Task

    from mailsync import sending, tasks

    sent: list = []
    real = Task.apply_async

    def record(self, args=None, kwargs=None, *a, **k):  # noqa: ANN001, ANN002, ANN003
        sent.append((self.name, args, kwargs, k))
        return real(self, args, kwargs, *a, **k)

    monkeypatch.setattr(Task, "apply_async", record)
    owner = UserFactory()
    api.force_authenticate(owner)
    dovecot.deliver(secret_user, make_message(sender="grace@navy.example", subject="hello"))
    with django_capture_on_commit_callbacks(execute=True):
        r = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, secret_user), format="json")
    assert r.status_code == 201, r.content
    mid = r.json()["id"]
    Mailbox.objects.filter(pk=mid).update(smtp_host=smtp_outbox.host, smtp_port=smtp_outbox.port,
                                          smtp_security="starttls", smtp_username=smtp_outbox.username,
                                          smtp_password=smtp_outbox.password)
    with django_capture_on_commit_callbacks(execute=True):
        api.post(f"/api/v1/mailboxes/{mid}/sync/")
        tasks.poll_mailboxes.delay()
        contact = ContactFactory(owner=owner, email="grace@navy.example")
        sending.email_send(actor=owner, from_address=secret_user.email, to="grace@navy.example",
                           subject="s", text="t", record=contact)
    from django.test import Client
    c = Client()
    c.force_login(owner)
    email = Email.objects.filter(mailbox_id=mid, direction=Email.Direction.RECEIVED).first()
    if email is not None:
        with django_capture_on_commit_callbacks(execute=True):
            c.get(f"/mail/{email.pk}/")
    names = {n for n, *_ in sent}
    assert {"mailsync.sync_mailbox", "mailsync.send_email"} <= names, names
    for name, args, kwargs, options in sent:
        assert all(isinstance(a, int) for a in (args or ())), (name, args)
        assert all(isinstance(v, int) for v in (kwargs or {}).values()), (name, kwargs)
        assert_no_secret(repr((args, kwargs, options)), SECRET, smtp_outbox.password, where=name)


# -- at rest and key rotation -----------------------------------------------------------------------

def test_probe_at_rest_not_plain_nor_base64_and_randomized():
    a = MailboxFactory(password=SECRET, smtp_password=SMTP_SECRET)
    b = MailboxFactory(password=SECRET)
    raw_a, raw_b = raw_column(a.pk, "password"), raw_column(b.pk, "password")
    smtp_raw = raw_column(a.pk, "smtp_password")
    for raw in (raw_a, raw_b, smtp_raw):
        assert_no_secret(raw, SECRET, SMTP_SECRET, where="column")
        decoded = base64.urlsafe_b64decode(raw + "==")
        assert SECRET.encode() not in decoded and SMTP_SECRET.encode() not in decoded
    assert raw_a != raw_b  # IV/timestamp: equal passwords do not show as equal


def test_probe_rotation_end_to_end_then_sync_with_only_new_key(dovecot, secret_user, settings):
    from crm.encryption import _fernet

    old = settings.MAILROOM_ENCRYPTION_KEYS[0]
    mailbox = secret_mailbox(dovecot, secret_user, smtp_password=SMTP_SECRET)
    empty = MailboxFactory(password="")
    new = Fernet.generate_key().decode()
    settings.MAILROOM_ENCRYPTION_KEYS = [new, old]
    assert Mailbox.objects.get(pk=mailbox.pk).password == SECRET  # old rows read under NEW,OLD
    out = io.StringIO()
    call_command("rotate_encryption_keys", stdout=out)
    settings.MAILROOM_ENCRYPTION_KEYS = [new]
    _fernet.cache_clear()
    fresh = Mailbox.objects.get(pk=mailbox.pk)
    assert (fresh.password, fresh.smtp_password) == (SECRET, SMTP_SECRET)
    assert Mailbox.objects.get(pk=empty.pk).password == ""
    dovecot.deliver(secret_user, make_message(subject="after rotation"))
    assert ImapSync(fresh, timeout=10).run().new == 1
    assert_no_secret(out.getvalue(), SECRET, SMTP_SECRET, where="command output")


def test_probe_rotation_failure_leaves_nothing_half_rotated(settings):
    """The command's docstring: "One transaction per model ... a failure leaves nothing
    half-rotated"; README: "in one transaction per table"."""
    old = settings.MAILROOM_ENCRYPTION_KEYS[0]
    good = MailboxFactory(password="pw-good", smtp_password="smtp-good")
    lost = Fernet.generate_key().decode()
    # A row whose smtp_password was encrypted under a key no longer configured.
    with connection.cursor() as cursor:
        cursor.execute("UPDATE mailsync_mailbox SET smtp_password = %s WHERE id = %s",
                       [Fernet(lost.encode()).encrypt(b"orphan").decode(), good.pk])
    before = raw_column(good.pk, "password")
    new = Fernet.generate_key().decode()
    settings.MAILROOM_ENCRYPTION_KEYS = [new, old]
    with pytest.raises(CommandError):
        call_command("rotate_encryption_keys", stdout=io.StringIO())
    assert raw_column(good.pk, "password") == before, "password column rotated although the table's rotation failed"


# -- pages, admin, schema ------------------------------------------------------------------------

def test_probe_pages_and_admin_show_neither_plaintext_nor_ciphertext(client, dovecot, secret_user):
    owner = UserFactory()
    mailbox = secret_mailbox(dovecot, secret_user, owner=owner, smtp_password=SMTP_SECRET,
                             smtp_host="127.0.0.1", smtp_port=587, smtp_username="x")
    cipher = raw_column(mailbox.pk, "password")
    smtp_cipher = raw_column(mailbox.pk, "smtp_password")
    client.force_login(owner)
    pages = [client.get(f"/setup/email/{mailbox.pk}/"), client.get("/setup/email/"),
             client.get(f"/setup/email/{mailbox.pk}/status/"),
             client.get(f"/setup/email/{mailbox.pk}/connection/")]
    form = {"provider": "other-imap", "protocol": "imap", "display_name": "x",
            "email_address": secret_user.email, "incoming_host": dovecot.host,
            "incoming_port": dovecot.imaps_port, "incoming_security": "ssl",
            "username": secret_user.username, "password": SECRET + "-bad",
            "smtp_security": "starttls", "smtp_password": SMTP_SECRET + "-bad"}
    pages.append(client.post(f"/setup/email/{mailbox.pk}/connection/", form))
    pages.append(client.post("/setup/email/new/", form | {"email_address": "other@example.test"}))
    admin = AdministratorFactory()
    client.force_login(admin)
    pages += [client.get("/admin/mailsync/mailbox/"),
              client.get(f"/admin/mailsync/mailbox/{mailbox.pk}/change/"),
              client.get(f"/admin/mailsync/mailbox/{mailbox.pk}/history/"),
              client.get(f"/admin/mailsync/mailbox/{mailbox.pk}/delete/"),
              client.get("/admin/mailsync/mailbox/?q=" + SECRET[:6]),
              client.get("/api/v1/schema/", HTTP_ACCEPT="application/json"),
              client.get("/api/v1/schema/")]
    for page in pages:
        assert page.status_code < 500, page.status_code
        text = page.content.decode("utf-8", "replace")
        assert cipher not in text and smtp_cipher not in text, page.request["PATH_INFO"]
        for s in (SECRET, SMTP_SECRET, SECRET + "-bad", SMTP_SECRET + "-bad"):
            assert_no_secret(text, s, where=f"{page.request['PATH_INFO']} {page.status_code}")


def test_probe_api_shows_no_ciphertext(api, dovecot, secret_user):
    owner = UserFactory()
    mailbox = secret_mailbox(dovecot, secret_user, owner=owner, smtp_password=SMTP_SECRET)
    cipher = raw_column(mailbox.pk, "password")
    api.force_authenticate(owner)
    for url in ("/api/v1/mailboxes/", f"/api/v1/mailboxes/{mailbox.pk}/",
                f"/api/v1/mailboxes/{mailbox.pk}/status/"):
        text = api.get(url).content.decode()
        assert cipher not in text and cipher[:20] not in text, url
        assert_no_secret(text, SECRET, SMTP_SECRET, where=url)


# -- crashes ----------------------------------------------------------------------------------------

def test_probe_crash_inside_sync_after_login(dovecot, secret_user, monkeypatch, capfd):
    from mailsync import tasks
    from mailsync.protocols.imap import ImapSession

    mailbox = secret_mailbox(dovecot, secret_user)
    dovecot.deliver(secret_user, make_message(subject="x"))

    def boom(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        raise RuntimeError(f"boom while holding {self.settings!r}")

    monkeypatch.setattr(ImapSession, "select", boom)
    result = None
    with all_logging() as logs, contextlib.suppress(RuntimeError):
        result = tasks.sync_mailbox.delay(mailbox.pk)
    mailbox.refresh_from_db()
    assert mailbox.state == Mailbox.State.ERROR, mailbox.state
    out, err = capfd.readouterr()
    text = logs.text + out + err + db_texts(mailbox) + repr(getattr(result, "result", "")) + \
        str(getattr(result, "traceback", ""))
    assert_no_secret(text, SECRET, where="crash")


@pytest.mark.parametrize("debug", [False, True])
def test_probe_500_after_login_does_not_leak(api, dovecot, secret_user, monkeypatch, settings, debug):
    from mailsync import services

    settings.DEBUG = debug
    real = services.mailbox_test

    def then_crash(**kw):  # noqa: ANN003
        real(**kw)
        raise RuntimeError("crash after a successful login")

    monkeypatch.setattr(services, "mailbox_test", then_crash)
    owner = UserFactory()
    api.force_authenticate(owner)
    with all_logging() as logs:
        r = api.post("/api/v1/mailboxes/", mailbox_input(dovecot, secret_user), format="json",
                     HTTP_ACCEPT="text/html")
    assert r.status_code == 500
    assert_no_secret(r.content.decode("utf-8", "replace"), SECRET, where=f"500 page DEBUG={debug}")
    assert_no_secret(logs.text, SECRET, where="logs")


# -- the stored password goes wherever someone else points the mailbox --------------------------

class _CaptureImap:
    """A plain-text IMAP server that records LOGIN lines and refuses them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.lines: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        f = conn.makefile("rwb")
        try:
            f.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
            f.flush()
            for line in f:
                self.lines.append(line)
                tag, _, rest = line.partition(b" ")
                cmd = rest.split(b" ", 1)[0].strip().upper()
                if cmd == b"CAPABILITY":
                    f.write(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
                elif cmd == b"LOGOUT":
                    f.write(b"* BYE\r\n" + tag + b" OK bye\r\n")
                    f.flush()
                    return
                else:
                    f.write(tag + b" NO [AUTHENTICATIONFAILED] no\r\n")
                f.flush()
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_probe_admin_repointing_a_users_mailbox_sends_them_its_stored_password(
        client, dovecot, secret_user, django_capture_on_commit_callbacks):
    """An administrator changes another user's mailbox server in the Django admin, leaving
    the password empty ("keep the stored password"): the user's stored password must not be
    sent to the new host."""
    from django.forms.models import model_to_dict

    victim = secret_mailbox(dovecot, secret_user)
    capture = _CaptureImap()
    try:
        admin = AdministratorFactory()
        client.force_login(admin)
        data = {k: ("" if v is None else v) for k, v in model_to_dict(victim).items()
                if k not in ("password", "smtp_password", "folders")}
        data.update(folders="[]", incoming_host="127.0.0.1", incoming_port=capture.port,
                    incoming_security="none", password="", smtp_password="",
                    is_active="on", pop3_delete_after_download="on")
        data = {k: v for k, v in data.items() if v is not False}
        with django_capture_on_commit_callbacks(execute=True):
            r = client.post(f"/admin/mailsync/mailbox/{victim.pk}/change/", data)
        # Refused: the password must be typed again for another server (found by this probe:
        # the save went through and the next sync sent the stored password there).
        assert r.status_code == 200 and "Enter the password again" in r.content.decode()
        # what the beat poll (or the IDLE supervisor) does next
        with contextlib.suppress(Exception):
            ImapSync(Mailbox.objects.get(pk=victim.pk), timeout=5).run()
        time.sleep(0.3)
        got = b"".join(capture.lines).decode("utf-8", "replace")
    finally:
        capture.close()
    assert_no_secret(got, SECRET, where="a host chosen by the administrator")


def test_probe_owner_api_repoint_without_password_sends_stored_password(api, dovecot, secret_user):
    """A PATCH of only incoming_host/port (an API token is enough) logs in to the new host
    with the stored password."""
    owner = UserFactory()
    mailbox = secret_mailbox(dovecot, secret_user, owner=owner)
    capture = _CaptureImap()
    try:
        api.force_authenticate(owner)
        r = api.patch(f"/api/v1/mailboxes/{mailbox.pk}/", {
            "incoming_host": "127.0.0.1", "incoming_port": capture.port,
            "incoming_security": "none"}, format="json")
        time.sleep(0.3)
        got = b"".join(capture.lines).decode("utf-8", "replace")
    finally:
        capture.close()
    assert_no_secret(got + r.content.decode(), SECRET, where=f"new host ({r.status_code})")

