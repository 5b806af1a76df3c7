import time, logging
import pytest
from rest_framework.test import APIClient
from mailsync.idle import MailboxWatcher
from mailsync.sync.imap import server_settings
from tests.mailsync.conftest import make_message, wait_for
from tests.mailsync.test_idle import _sync_in_thread, _subjects
pytestmark = pytest.mark.django_db(transaction=True)

def test_push(dovecot, mail_user, imap_mailbox, caplog):
    caplog.set_level(logging.INFO)
    calls = []
    def on_change(pk):
        t = time.monotonic(); calls.append(("start", t))
        _sync_in_thread(pk)
        calls.append(("end", time.monotonic()))
    api = APIClient(); api.force_authenticate(imap_mailbox.owner)
    w = MailboxWatcher(imap_mailbox.pk, server_settings(imap_mailbox), on_change, check_interval=0.2)
    t0 = time.monotonic()
    w.start()
    try:
        assert w.connected.wait(10)
        wait_for(lambda: imap_mailbox.__class__.objects.get(pk=imap_mailbox.pk).state == "completed", 10)
        for i in range(3):
            s = f"Push {i}"; st = time.monotonic()
            dovecot.deliver(mail_user, make_message(subject=s))
            calls.append(("delivered", time.monotonic()))
            try:
                wait_for(lambda s=s: s in _subjects(api), 10)
            except AssertionError:
                raise AssertionError(f"round {i}: {[(k, round(v - t0, 2)) for k, v in calls]} state={imap_mailbox.__class__.objects.get(pk=imap_mailbox.pk).state} log={caplog.text[-3000:]}")
            calls.append(("seen", time.monotonic()))
    finally:
        w.stop(); w.join(10)
