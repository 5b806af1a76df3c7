"""A domain excluded from sharing while a long first sync runs applies to the mail stored
after it, and to a batch being stored at that very moment: mail with an excluded domain is
never left shared. Before, the run used the list it read when it began (an hour-long first
sync kept sharing the bank's mail), and a batch stored during the change escaped the
reshare. Real Dovecot and PostgreSQL; the change goes through services.mailbox_update, as
the page and the API make it."""
from __future__ import annotations

import threading

import pytest
from django.db import connection

import mailsync.sync.imap as engine
from mailsync import services
from mailsync.models import Email, Mailbox
from mailsync.sync import ingest
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message


def _deliver(dovecot, user, n: int) -> None:  # noqa: ANN001
    for i in range(n):
        dovecot.deliver(user, make_message(sender=f"Banker {i} <b{i}@bank.example>", subject=f"Bank {i}"))
        dovecot.deliver(user, make_message(sender=f"Friend {i} <f{i}@partner.example>", subject=f"Partner {i}"))


def _shared_bank_mail(mailbox: Mailbox) -> list[str]:
    return sorted(Email.objects.filter(mailbox=mailbox, subject__startswith="Bank", shareable=True)
                  .values_list("subject", flat=True))


@pytest.mark.django_db
def test_a_domain_excluded_during_the_first_sync_covers_the_mail_stored_after(
        dovecot, mail_user, imap_mailbox, monkeypatch):
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(sharing=Mailbox.Sharing.PUBLIC)
    monkeypatch.setattr(engine, "BATCH_MESSAGES", 2)
    _deliver(dovecot, mail_user, 5)
    real = engine.ingest_batch
    calls = {"n": 0}

    def ingest_batch(**kwargs):  # noqa: ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            # The user saves the settings page while the sync runs (its own copy of the row).
            services.mailbox_update(actor=imap_mailbox.owner, mailbox=Mailbox.objects.get(pk=imap_mailbox.pk),
                                    data={"excluded_domains": "bank.example"}, check_connection=False)
        return real(**kwargs)

    monkeypatch.setattr(engine, "ingest_batch", ingest_batch)
    imap_mailbox.refresh_from_db()
    ImapSync(imap_mailbox, timeout=10).run()

    assert calls["n"] >= 4
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 10
    assert _shared_bank_mail(imap_mailbox) == []
    assert Email.objects.filter(mailbox=imap_mailbox, subject__startswith="Partner", shareable=False).count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_change_saved_while_a_batch_is_being_stored_waits_for_it_and_covers_it(
        dovecot, mail_user, imap_mailbox, monkeypatch):
    """The batch has read the list (none excluded) and is inserting its rows when the
    change is saved: the save waits for the batch to commit, then reshares it."""
    Mailbox.objects.filter(pk=imap_mailbox.pk).update(sharing=Mailbox.Sharing.PUBLIC)
    _deliver(dovecot, mail_user, 2)
    in_batch, release = threading.Event(), threading.Event()
    real = ingest._store_rows

    def store_rows(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        in_batch.set()
        assert release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "_store_rows", store_rows)
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            ImapSync(Mailbox.objects.get(pk=imap_mailbox.pk), timeout=10).run()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    def save() -> None:
        try:
            services.mailbox_update(actor=imap_mailbox.owner, mailbox=Mailbox.objects.get(pk=imap_mailbox.pk),
                                    data={"excluded_domains": "bank.example"}, check_connection=False)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    syncing = threading.Thread(target=sync)
    syncing.start()
    try:
        assert in_batch.wait(20), "the batch never started"
        saving = threading.Thread(target=save)
        saving.start()
        saving.join(1.0)
        # The save waits for the batch (its row lock) rather than resharing before it.
        assert saving.is_alive(), "the change was saved while the batch was still uncommitted"
        release.set()
        saving.join(20)
        syncing.join(30)
    finally:
        release.set()
        syncing.join(30)
    assert not errors, errors
    assert Email.objects.filter(mailbox=imap_mailbox).count() == 4
    assert _shared_bank_mail(imap_mailbox) == []
