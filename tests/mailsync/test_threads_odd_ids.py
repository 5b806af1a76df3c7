"""Threading with odd ids: RFC 822-era In-Reply-To phrases that carry the author's address,
and a broken client reusing a stored mail's Message-ID."""
from __future__ import annotations

import pytest

from mailsync.mime.headers import MAX_IN_REPLY_TO, parse_id_list
from mailsync.models import Email, Mailbox
from mailsync.sync.imap import ImapSync
from tests.mailsync.conftest import make_message

OLD_STYLE = "\"John\" <john@x.example>'s message of Mon, 1 Jan 2024 <{id}>"


def sync(mailbox: Mailbox):
    mailbox.refresh_from_db()
    return ImapSync(mailbox, timeout=10).run()


def thread_of(mailbox: Mailbox, message_id: str) -> int:
    return Email.objects.get(mailbox=mailbox, message_id=message_id).thread_id


# --- parser: no server -------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (OLD_STYLE.format(id="id@x.example"), ["id@x.example"]),
    ("John Doe <john@x.example>\u2019s mail of Monday <id@x.example>", ["id@x.example"]),
    # The phrase alone, no msg-id: nothing to thread on, and certainly not the address.
    ("\"John\" <john@x.example>'s message of Mon, 1 Jan 2024", []),
    ("john@x.example's message of Mon, 1 Jan 2024", []),
    ("<id@host>", ["id@host"]),
    ("<a@host> <b@host>", ["a@host", "b@host"]),
    ('"Joe\'s message of Monday" <a@b>', ["a@b"]),
])
def test_in_reply_to_phrases_yield_only_msg_ids(value, expected):
    assert parse_id_list(value, MAX_IN_REPLY_TO) == expected


# --- sync against the private Dovecot ----------------------------------------------------------

@pytest.mark.django_db
def test_old_style_in_reply_to_does_not_merge_unrelated_mails(dovecot, mail_user, imap_mailbox):
    # Given two separate mails from John answering two different (unstored) mails
    first = make_message(subject="Re: Invoice", message_id="<a1@x.example>",
                         in_reply_to=OLD_STYLE.format(id="p1@x.example"))
    second = make_message(subject="Re: Meeting", message_id="<a2@x.example>",
                          in_reply_to=OLD_STYLE.format(id="p2@x.example"))
    dovecot.deliver(mail_user, first)
    dovecot.deliver(mail_user, second)

    # When they sync
    sync(imap_mailbox)

    # Then each is in its own thread, and the stored parent is the msg-id, not John's address
    assert thread_of(imap_mailbox, "a1@x.example") != thread_of(imap_mailbox, "a2@x.example")
    parents = set(Email.objects.filter(mailbox=imap_mailbox).values_list("in_reply_to", flat=True))
    assert parents == {"p1@x.example", "p2@x.example"}


@pytest.mark.django_db
def test_several_in_reply_to_ids_take_the_last_as_parent(dovecot, mail_user, imap_mailbox):
    dovecot.deliver(mail_user, make_message(message_id="<m@x.example>",
                                            in_reply_to="<first@x.example> <last@x.example>"))
    sync(imap_mailbox)
    email = Email.objects.get(mailbox=imap_mailbox, message_id="m@x.example")
    assert email.in_reply_to == "last@x.example"
    assert email.thread.key == "last@x.example"


@pytest.mark.django_db
def test_reused_message_id_does_not_pull_a_stored_conversation_in(dovecot, mail_user,
                                                                   imap_mailbox):
    # Given a stored conversation: a root and a reply to it
    dovecot.deliver(mail_user, make_message(subject="Quote", message_id="<dup@x.example>",
                                            body="The original root."))
    dovecot.deliver(mail_user, make_message(subject="Re: Quote", message_id="<r1@x.example>",
                                            in_reply_to="<dup@x.example>",
                                            references="<dup@x.example>"))
    # and another, unrelated conversation
    dovecot.deliver(mail_user, make_message(subject="Holidays", message_id="<other@x.example>"))
    sync(imap_mailbox)
    quote = thread_of(imap_mailbox, "dup@x.example")
    assert thread_of(imap_mailbox, "r1@x.example") == quote

    # When a broken client answers the other conversation reusing the root's Message-ID
    dovecot.deliver(mail_user, make_message(subject="Re: Holidays", message_id="<dup@x.example>",
                                            body="A different mail, same id.",
                                            in_reply_to="<other@x.example>",
                                            references="<other@x.example>"))
    sync(imap_mailbox)

    # Then the reply joins the holidays thread, and the quote conversation stays apart
    holidays = thread_of(imap_mailbox, "other@x.example")
    reply = Email.objects.get(mailbox=imap_mailbox, message_id="dup@x.example", subject="Re: Holidays")
    assert reply.thread_id == holidays
    assert Email.objects.get(mailbox=imap_mailbox, message_id="dup@x.example",
                             subject="Quote").thread_id == quote
    assert thread_of(imap_mailbox, "r1@x.example") == quote
    assert quote != holidays


@pytest.mark.django_db
def test_reply_before_parent_still_heals(dovecot, mail_user, imap_mailbox):
    # The legitimate case the guard must keep: the orphan thread holds no mail with the id.
    dovecot.deliver(mail_user, make_message(message_id="<root@x.example>"))
    dovecot.deliver(mail_user, make_message(message_id="<child@x.example>",
                                            in_reply_to="<parent@x.example>"))
    sync(imap_mailbox)
    dovecot.deliver(mail_user, make_message(message_id="<parent@x.example>",
                                            in_reply_to="<root@x.example>",
                                            references="<root@x.example>"))
    sync(imap_mailbox)
    threads = set(Email.objects.filter(mailbox=imap_mailbox).values_list("thread", flat=True))
    assert len(threads) == 1
