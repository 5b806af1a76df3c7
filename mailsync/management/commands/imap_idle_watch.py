"""Run the IMAP IDLE watcher: push for the active IMAP mailboxes this process watches."""
from __future__ import annotations

import faulthandler
import signal
import sys

from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from mailsync.idle import IdleClaims, IdleSupervisor


class Command(BaseCommand):
    help = ("Hold an IMAP IDLE connection per active mailbox and queue a sync on every change. "
            "Run as many as you like on PostgreSQL: they share the mailboxes out between them.")

    def add_arguments(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("--shards", type=int, default=0,
                            help="Split statically into this many processes (mailbox id modulo "
                                 "N) instead of sharing by claims; needs --shard.")
        parser.add_argument("--shard", type=int, default=0, help="This process's shard (0-based).")
        parser.add_argument("--refresh", type=float, default=30.0,
                            help="Seconds between re-reads of the active mailboxes.")

    def handle(self, *args, shard: int, shards: int, refresh: float, **options) -> None:  # noqa: ANN002, ANN003
        if shards < 0 or (shards and not 0 <= shard < shards):
            raise CommandError("--shard must be between 0 and --shards - 1.")
        if not shards and shard:
            # Else it would watch nothing (shard N of 1) while it counts as a watcher in
            # everyone's share of the claims: mailboxes left without IDLE.
            raise CommandError("--shard needs --shards (or leave both out to share by claims).")
        claims = None
        if not shards:
            shards = 1
            # On PostgreSQL the watchers share the mailboxes by claims (advisory locks); the
            # embedded SQLite default runs one watcher, which watches them all.
            if connection.vendor == "postgresql":
                claims = IdleClaims()
        supervisor = IdleSupervisor(shard=shard, shards=shards, refresh_interval=refresh, claims=claims)
        # `kill -USR1 <pid>` writes every thread's stack to stderr: what a watcher that
        # seems stuck is doing (a connection, the database, the broker), without stopping it.
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: supervisor.stopping.set())
        supervisor.run()
