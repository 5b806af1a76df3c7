"""Excluded domains hold for addresses written oddly (session 10).

A salesperson's mailbox is public, but mail from or to their bank is never shared: the bank's
domain is on the mailbox's excluded list. Mail reaches colleagues when another participant
(a customer who is a CRM contact) links it to a record. Before, a bank address the matching
rules found implausible ("x@bank.example." with the trailing dot of a fully qualified domain,
a local part with a space) was skipped by the exclusion check, so such mail was shown to
colleagues although its domain was excluded.

Real PostgreSQL and the private Dovecot: the mail is delivered, synced and read through the API.
"""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from mailsync import services
from mailsync.mime import parse_envelope
from mailsync.models import Email, Mailbox
from mailsync.sync.ingest import shareable, sharing_domain
from tests.factories import ContactFactory, UserFactory

pytestmark = pytest.mark.django_db


def _raw(sender: str, subject: str, to: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nCc: Customer <customer@client.example>\r\n"
            f"Subject: {subject}\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash(subject))}@mail.example>\r\n\r\nStatement attached.\r\n"
            ).encode()


@pytest.mark.parametrize("sender, domain", [
    ("Bank <x@bank.example.>", "bank.example"),
    ("Bank <x@Branch.Bank.Example..>", "branch.bank.example"),
    ("x@[bank.example]", "bank.example"),
    ('"a b"@bank.example', "bank.example"),
])
def test_the_sharing_domain_of_an_odd_address_is_its_domain(sender, domain):
    envelope = parse_envelope(_raw(sender, "s", "sales@example.test"))
    assert [sharing_domain(a) for a in envelope.from_] == [domain]
    assert shareable(envelope, {"bank.example"}) is False
    assert shareable(envelope, {"notbank.example", "example.org"}) is True


def test_a_trailing_dot_address_is_the_same_contact():
    """The fully qualified form of an address is the address: it matches its contact."""
    envelope = parse_envelope(_raw("Bank <X@Bank.Example.>", "s", "sales@example.test"))
    assert envelope.from_[0].key == "x@bank.example"


def test_mail_of_an_excluded_domain_written_oddly_is_not_shown_to_colleagues(
        dovecot, mail_user, imap_mailbox):
    """Given a public mailbox whose owner excluded bank.example, and a colleague who has the
    customer as a contact, when mail from the bank, written "x@bank.example." or
    "x@[bank.example]", copying the customer arrives, then the colleague does not see it,
    not after the sync, not after the list is changed and changed back (the recomputation
    over stored mail); mail of another domain with the same customer stays visible."""
    owner, colleague = imap_mailbox.owner, UserFactory()
    imap_mailbox.sharing = Mailbox.Sharing.PUBLIC
    imap_mailbox.save()
    ContactFactory(owner=colleague, email="customer@client.example", secondary_email="")
    api = APIClient()
    api.force_authenticate(owner)
    assert api.patch(f"/api/v1/mailboxes/{imap_mailbox.pk}/", {"excluded_domains": "bank.example"},
                     format="json").status_code == 200
    for sender, subject in (("Bank <x@bank.example.>", "Statement"),
                            ("x@[bank.example]", "Loan offer"),
                            ("Partner <p@partner.example>", "Partnership")):
        dovecot.deliver(mail_user, _raw(sender, subject, mail_user.email))
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    assert dict(Email.objects.filter(mailbox=imap_mailbox).values_list("subject", "shareable")) == {
        "Statement": False, "Loan offer": False, "Partnership": True}

    def seen_by_colleague() -> list[str]:
        api.force_authenticate(colleague)
        return sorted(e["subject"] for e in api.get("/api/v1/emails/").json()["results"])

    assert seen_by_colleague() == ["Partnership"]

    api.force_authenticate(owner)
    assert api.patch(f"/api/v1/mailboxes/{imap_mailbox.pk}/", {"excluded_domains": ""},
                     format="json").status_code == 200
    assert seen_by_colleague() == ["Loan offer", "Partnership", "Statement"]
    api.force_authenticate(owner)
    for excluded in ("bank.example", "example.org\nbank.example"):
        assert api.patch(f"/api/v1/mailboxes/{imap_mailbox.pk}/", {"excluded_domains": excluded},
                         format="json").status_code == 200
        assert seen_by_colleague() == ["Partnership"]
        api.force_authenticate(owner)
    # A domain that merely ends like the excluded one is not excluded.
    assert api.patch(f"/api/v1/mailboxes/{imap_mailbox.pk}/", {"excluded_domains": "ank.example"},
                     format="json").status_code == 200
    assert seen_by_colleague() == ["Loan offer", "Partnership", "Statement"]
