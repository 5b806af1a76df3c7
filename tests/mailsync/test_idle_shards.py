"""Every active IMAP mailbox is watched by exactly one shard (2 and 3 shards)."""
from __future__ import annotations

import pytest

from mailsync.idle import IdleSupervisor
from tests.factories import MailboxFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("shards", [2, 3])
def test_each_active_mailbox_in_exactly_one_shard(dovecot, shards):
    active = set()
    for i in range(7):
        user = dovecot.add_user()
        m = MailboxFactory(owner=UserFactory(), email_address=user.email, incoming_host=dovecot.host,
                           incoming_port=dovecot.imaps_port, username=user.username,
                           password=user.password, is_active=True)
        active.add(m.pk)
    seen: list[int] = []
    for shard in range(shards):
        seen += [t.mailbox_id for t in IdleSupervisor(shard=shard, shards=shards,
                                                      on_change=lambda _: None).targets()]
    assert sorted(seen) == sorted(active)
