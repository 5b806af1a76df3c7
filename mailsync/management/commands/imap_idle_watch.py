"""Run the IMAP IDLE watcher: push for every active IMAP mailbox of this shard."""
from __future__ import annotations

import signal

from django.core.management.base import BaseCommand, CommandError

from mailsync.idle import IdleSupervisor


class Command(BaseCommand):
    help = "Hold an IMAP IDLE connection per active mailbox and queue a sync on every change."

    def add_arguments(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("--shard", type=int, default=0, help="This process's shard (0-based).")
        parser.add_argument("--shards", type=int, default=1, help="Number of watcher processes.")
        parser.add_argument("--refresh", type=float, default=30.0,
                            help="Seconds between re-reads of the active mailboxes.")

    def handle(self, *args, shard: int, shards: int, refresh: float, **options) -> None:  # noqa: ANN002, ANN003
        if shards < 1 or not 0 <= shard < shards:
            raise CommandError("--shard must be between 0 and --shards - 1.")
        supervisor = IdleSupervisor(shard=shard, shards=shards, refresh_interval=refresh)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: supervisor.stopping.set())
        supervisor.run()
