"""Plain-row INSERT and COPY (mailsync/bulk.py): what goes in comes back out unchanged, defaults
are filled in, and a conflict is Django's IntegrityError (the sync's one-by-one fallback
catches that, not psycopg2's own class)."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from django.db import IntegrityError, transaction

from mailsync.bulk import copy_rows, insert_rows
from mailsync.models import Email, EmailParticipant
from tests.factories import MailboxFactory

pytestmark = pytest.mark.django_db

HOSTILE = "tab\there, new\nline, cr\rback\\slash \\N, quote ' \" , unicode ü 漢字 \U0001F600"
FIELDS = ("mailbox", "fingerprint", "message_id", "content_hash", "subject", "date", "to",
          "references", "direction", "size", "seen")


def _row(mailbox_id: int, n: int) -> tuple:
    return (mailbox_id, f"fp-{n}", f"id-{n}@example.com", "0" * 64, f"{HOSTILE} {n}",
            datetime(2024, 5, 17, 8, 30, tzinfo=timezone.utc),
            [{"name": HOSTILE, "email": "a@example.com"}], [f"ref-{n}@x", HOSTILE],
            "received", 1234 + n, n % 2 == 0)


@pytest.mark.parametrize("write", ["copy", "insert"])
def test_rows_round_trip_with_defaults(write):
    mailbox = MailboxFactory()
    rows = [_row(mailbox.pk, n) for n in range(3)]
    if write == "copy":
        ids = copy_rows(Email, FIELDS, rows, with_ids=True)
    else:
        ids = insert_rows(Email, FIELDS, rows, returning="id")
    assert len(ids) == 3
    for n, pk in enumerate(ids):
        email = Email.objects.get(pk=pk)
        assert email.fingerprint == f"fp-{n}"
        assert email.subject == f"{HOSTILE} {n}"
        assert email.to == [{"name": HOSTILE, "email": "a@example.com"}]
        assert email.references == [f"ref-{n}@x", HOSTILE]
        assert email.date == datetime(2024, 5, 17, 8, 30, tzinfo=timezone.utc)
        assert (email.size, email.seen) == (1234 + n, n % 2 == 0)
        # Fields not given take the model's defaults
        assert email.source == Email.Source.SYNC and email.parse_state == Email.ParseState.PENDING
        assert email.cc == [] and email.thread_id is None and email.created_at is not None
    # The sequence moved on: the ORM's next row gets a fresh id
    later = Email.objects.create(mailbox=mailbox, fingerprint="fp-orm", direction="received")
    assert later.pk > max(ids)

    copy_rows(EmailParticipant, ("email", "role", "name", "address"),
              [(ids[0], "from", HOSTILE, "a@example.com")])
    assert EmailParticipant.objects.get(email_id=ids[0]).name == HOSTILE


@pytest.mark.parametrize("write", ["copy", "insert"])
def test_a_conflict_is_djangos_integrity_error(write):
    mailbox = MailboxFactory()
    copy_rows(Email, FIELDS, [_row(mailbox.pk, 1)], with_ids=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        if write == "copy":
            copy_rows(Email, FIELDS, [_row(mailbox.pk, 1)], with_ids=True)
        else:
            insert_rows(Email, FIELDS, [_row(mailbox.pk, 1)], returning="id")
    assert Email.objects.filter(mailbox=mailbox).count() == 1
