#!/usr/bin/env python
"""How fast Mailroom's POP3 download is, next to a bare poplib RETR loop and fetchmail.

One run prints figures; it is not a test. From the repository root, as root (the private
Dovecot drops to the ``mailroom-vmail`` user that ``scripts/install-test-deps`` creates):

    .venv/bin/python bench/pop3_sync.py --messages 2000

It reuses bench/imap_sync.py's setup (private Dovecot, the generated sales-mailbox corpus
written straight into the Maildir, a fresh PostgreSQL database ``mailroom_bench_pop3``),
then measures over POP3S with verified TLS on 127.0.0.1: the poplib RETR-loop ceiling,
Mailroom's adapter alone, Mailroom's download into PostgreSQL (remove after download, the
default, and leave on server), fetchmail when installed, and peak RSS, also for a mailbox of
very large messages. The Maildir is refilled (hard links, not timed) before each run that
empties it. Everything is stopped and dropped at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import poplib
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/pop3_sync.py` puts bench/ first, not the root
    sys.path.insert(0, str(ROOT))

from bench.imap_sync import (  # noqa: E402  (after the sys.path fix)
    fill_bench_mailbox,
    start_dovecot,
    DB_NAME_RE,
    Throughput,
    doveadm,
    drop_database,
    median_run,
    ChildPeak,
    peak_mb,
    reset_mail_tables,
    reset_peak,
    rss_mb,
    say,
    seed_crm,
    setup_django,
)

DEFAULT_DB_URL = "postgres://postgres@127.0.0.1:5432/mailroom_bench_pop3"
SUBPROCESS_TIMEOUT = 300.0


# == the mailbox ==================================================================================
class Refill:
    """Puts the same message files back after a run removed them (hard links: instant, and
    not timed), so every run starts from the same mailbox."""

    def __init__(self, server, user, workdir: Path) -> None:  # noqa: ANN001
        self.server, self.user = server, user
        self.cur = server.mail_root / user.username / "Maildir" / "cur"
        self.saved = workdir / f"saved-{user.username}"
        self.saved.mkdir()
        self.generation = 0
        for path in self.cur.iterdir():
            os.link(path, self.saved / path.name)
        self.total = len(list(self.saved.iterdir()))

    def __call__(self) -> int:
        if server_count(self.server, self.user) == self.total:
            return self.total
        for path in self.cur.iterdir():
            path.unlink()
        # Dovecot remembers the base names of expunged files: each refill gets fresh ones.
        self.generation += 1
        for path in self.saved.iterdir():
            stem, _, fields = path.name.partition(",")
            os.link(path, self.cur / f"{stem}.r{self.generation},{fields}")
        doveadm(self.server, "force-resync", "-u", self.user.username, "INBOX")
        return server_count(self.server, self.user)


def server_count(server, user) -> int:  # noqa: ANN001
    out = doveadm(server, "-f", "tab", "mailbox", "status", "-u", user.username, "messages", "INBOX")
    header, values = out.splitlines()[:2]
    return int(dict(zip(header.split("\t"), values.split("\t")))["messages"])


def pop3s(server, user, timeout: float = 60.0) -> poplib.POP3_SSL:  # noqa: ANN001
    pop = poplib.POP3_SSL(server.host, server.pop3s_port, context=ssl.create_default_context(),
                          timeout=timeout)
    pop.user(user.username)
    pop.pass_(user.password)
    return pop


# == measurements without Django ==================================================================
def ceiling_retr(server, user) -> Throughput:  # noqa: ANN001
    """Bare poplib: LIST, then RETR 1..N over one verified POP3S connection, login included
    (as in Mailroom's run); nothing stored, nothing deleted."""
    start = time.perf_counter()
    pop = pop3s(server, user)
    count = total = 0
    try:
        _, listing, _ = pop.list()
        for line in listing:
            number = int(line.split()[0])
            _, lines, octets = pop.retr(number)
            count += 1
            total += octets
            del lines
        pop.quit()
    finally:
        pop.close()
    return Throughput(count, total, time.perf_counter() - start)


def adapter_only(server, user) -> Throughput:  # noqa: ANN001
    """Mailroom's POP3 adapter over the engine's batches (LIST + UIDL, pipelined RETR), no DB."""
    from mailsync.protocols.base import ServerSettings
    from mailsync.protocols.pop3 import Pop3Request, Pop3Session
    from mailsync.sync import pop3 as engine

    settings = ServerSettings(server.host, server.pop3s_port, "ssl", user.username, user.password,
                              allow_private_hosts=True)
    start = time.perf_counter()
    count = total = 0
    with Pop3Session(settings) as session:
        listing = session.listing()
        for i in range(0, len(listing), engine.BATCH_MESSAGES):
            replies = session.retrieve([Pop3Request(item.number, 50 * 1024 * 1024)
                                        for item in listing[i:i + engine.BATCH_MESSAGES]])
            count += len(replies)
            total += sum(len(r.raw) for r in replies)
            del replies
        session.quit()
    return Throughput(count, total, time.perf_counter() - start)


def fetchmail_version() -> str | None:
    if shutil.which("fetchmail") is None:
        return None
    result = subprocess.run(["fetchmail", "--version"], capture_output=True, text=True, timeout=10,
                            stdin=subprocess.DEVNULL)
    line = next((l for l in (result.stdout + result.stderr).splitlines() if "release" in l), "")
    return line.replace("This is fetchmail release ", "fetchmail ").split("+")[0] or "fetchmail"


def fetchmail_run(server, user, ca, workdir: Path, expected: int, *, keep: bool) -> Throughput:  # noqa: ANN001
    """One fetchmail pass over POP3S with verified TLS, each message written to a BSMTP file
    (no process per message, no SMTP server: the cheapest delivery fetchmail has)."""
    # A new file per run, none deleted before the end (the work directory goes then): on this
    # machine's file system, writing right after deleting ~140 MB is slow (bench/README.md).
    runs = sorted(workdir.glob("fetchmail-*.bsmtp"))
    out = workdir / f"fetchmail-{len(runs)}.bsmtp"
    rc = workdir / "fetchmailrc"
    rc.write_text(
        f'set no syslog\n'
        f'poll localhost protocol POP3 port {server.pop3s_port} timeout 60\n'
        f'  user "{user.username}" there with password "{user.password}" is root here\n'
        f'  ssl sslcertck sslcertfile "{ca.ca_cert_path}"\n'
        f'  {"keep" if keep else "nokeep"} fetchall bsmtp "{out}"\n'
    )
    os.chmod(rc, 0o600)
    env = {**os.environ, "HOME": str(workdir), "FETCHMAILHOME": str(workdir)}
    start = time.perf_counter()
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "-i", str(workdir / "fetchids"), "--nodetach", "--silent"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=SUBPROCESS_TIMEOUT, env=env, check=False,
    )
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1):  # 1: no mail
        raise RuntimeError(f"fetchmail failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).decode(errors='replace').strip()[-400:]}")
    data = out.read_bytes() if out.exists() else b""
    messages = data.count(b"\r\nDATA\r\n") + data.count(b"\nDATA\n") if data else 0
    if messages != expected:
        raise RuntimeError(f"fetchmail delivered {messages} of {expected} messages")
    return Throughput(messages, len(data), seconds)


# == Mailroom =====================================================================================
@dataclass
class Run:
    throughput: Throughput
    rss_before: float
    rss_peak: float
    left_on_server: int


def new_mailbox(owner, server, user, *, delete: bool):  # noqa: ANN001, ANN201
    """A new, empty mailbox of a new CRM user (same address, same contacts to match): the
    rows of earlier runs stay. Emptying the tables instead (TRUNCATE unlinks their files)
    slowed the writes of the next run on this machine's file system (bench/README.md)."""
    from crm.models import User
    from mailsync.models import Mailbox

    n = User.objects.count()
    owner = User.objects.create_user(username=f"bench-owner-{n}", password=None,
                                     email=f"owner{n}@crm.example.com")
    return Mailbox.objects.create(
        owner=owner, display_name="Bench", email_address=user.email,
        protocol=Mailbox.Protocol.POP3, incoming_host=server.host,
        incoming_port=server.pop3s_port, incoming_security="ssl",
        username=user.username, password=user.password, is_active=True,
        pop3_delete_after_download=delete,
    )


def mailroom_run(owner, server, user, *, delete: bool, expected: int) -> Run:  # noqa: ANN001
    from mailsync.models import Email, MessageError
    from mailsync.sync.pop3 import Pop3Sync

    mailbox = new_mailbox(owner, server, user, delete=delete)
    before = rss_mb()
    reset_peak()
    start = time.perf_counter()
    report = Pop3Sync(mailbox).run()
    seconds = time.perf_counter() - start
    peak = peak_mb()
    mailbox.refresh_from_db()
    stored = Email.objects.filter(mailbox=mailbox).count()
    # (A notice without raw bytes is the size-limit notice, not a failure.)
    failed = MessageError.objects.filter(mailbox=mailbox, raw__isnull=False).exists()
    if stored != expected or report.failed or failed:
        raise RuntimeError(f"stored {stored} of {expected} messages ({report.failed} failed)")
    return Run(Throughput(report.new, mailbox.bytes_done, seconds), before, peak,
               server_count(server, user))


def big_messages(owner, server, workdir: Path) -> tuple[Run, str]:  # noqa: ANN001
    """Two 30 MB messages (under the 50 MB default limit) and one of 120 MB (over it: kept as
    headers). What the worker's memory does with messages this size."""
    from mailsync.models import Email
    from tests.testbed.dovecot import vmail_ids

    user = server.add_user("bench-big")
    uid, gid = vmail_ids()
    maildir = server.mail_root / user.username / "Maildir"
    for directory in (maildir.parent, maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chown(directory, uid, gid)
    sizes = (30, 30, 120)
    for n, megabytes in enumerate(sizes):
        line = (os.urandom(57).hex()[:76] + "\n").encode()  # base64-like 77-byte lines
        body = line * (megabytes * 1024 * 1024 // len(line))
        raw = (f"From: Big Sender <big@files.example>\nTo: {user.email}\n"
               f"Subject: Big {megabytes} MB #{n}\nMessage-ID: <big{n}@files.example>\n"
               f"Date: Mon, 1 Jun 2026 10:0{n}:00 +0000\nMIME-Version: 1.0\n"
               "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
               ).encode() + body
        path = maildir / "cur" / f"{1780000000 + n}.M{n}P{os.getpid()}.big,S={len(raw)}:2,"
        path.write_bytes(raw)
        os.chown(path, uid, gid)
        del raw, body
    doveadm(server, "force-resync", "-u", user.username, "INBOX")
    run = mailroom_run(owner, server, user, delete=True, expected=len(sizes))
    truncated = Email.objects.filter(mailbox__username=user.username, truncated=True).count()
    return run, f"{len(sizes) - truncated} stored whole, {truncated} kept as headers"


# == output =======================================================================================
def row(label: str, t: Throughput | None, note: str = "") -> str:
    if t is None:
        return f"  {label:<46}{'-':>9}{'-':>9}{'-':>9}  {note}"
    return (f"  {label:<46}{t.rate:>9,.0f}{t.mb_rate:>9,.1f}{t.seconds:>8.1f}s  {note}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="messages in the maildrop (default 2000)")
    p.add_argument("--runs", type=int, default=5,
                   help="rounds (each measures everything once); medians reported (default 5)")
    p.add_argument("--budget", type=float, default=160.0,
                   help="seconds; rounds are skipped once they would overrun it (default 160)")
    p.add_argument("--no-fetchmail", action="store_true", help="skip fetchmail even if installed")
    p.add_argument("--no-big", action="store_true", help="skip the very large messages")
    p.add_argument("--database-url", default=os.environ.get("BENCH_POP3_DATABASE_URL", DEFAULT_DB_URL),
                   help=f"dropped and re-created; name must match {DB_NAME_RE.pattern}")
    p.add_argument("--keep", action="store_true", help="keep the database and temp dir (debugging)")
    p.add_argument("--seed", type=int, default=20250101)
    args = p.parse_args(argv)
    if not 1 <= args.messages <= 20_000:
        p.error("--messages must be between 1 and 20000")
    return args


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _raise_interrupt(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0915
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/pop3_sync.py must run as root: the private Dovecot drops to mailroom-vmail.",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    deadline = time.perf_counter() + args.budget
    load = os.getloadavg()


    workdir = Path(tempfile.mkdtemp(prefix="mailroom-bench-pop3-"))
    os.chmod(workdir, 0o711)  # Dovecot's processes (not root) must traverse it
    server = None
    django_ready = False
    try:
        server, ca, dovecot_version = start_dovecot(workdir)
        user = server.add_user("bench")
        say(f"Dovecot {dovecot_version} on 127.0.0.1:{server.pop3s_port} (POP3S)")

        corpus, written, fill_seconds, stats = fill_bench_mailbox(server, user, args)
        refill = Refill(server, user, workdir)
        say(f"filled the maildrop: {written} messages, {stats.bytes / 1e6:.1f} MB "
            f"in {fill_seconds:.1f} s")

        django_ready = True  # from here on the database may exist: drop it at the end
        setup_django(args.database_url, workdir / "data")
        owner = seed_crm(corpus)
        say("database migrated; 50 contacts with deals, 20 leads")

        fetchmail = None if args.no_fetchmail else fetchmail_version()
        fetchmail_note = ("skipped (--no-fetchmail)" if args.no_fetchmail else
                          "not installed (apt-get install fetchmail)" if fetchmail is None else "")
        # Rounds: each measures everything once, back to back, so that a change in the
        # machine's load hits all of them alike; ratios are taken within a round.
        ceilings: list[Throughput] = []
        adapters: list[Throughput] = []
        runs: dict[bool, list[Run]] = {True: [], False: []}
        child_peak: float | None = None
        fm_remove: list[Throughput] = []
        fm_keep: list[Throughput] = []
        rounds_start = time.perf_counter()
        for i in range(max(1, args.runs)):
            if i and time.perf_counter() + (time.perf_counter() - rounds_start) / i + 25 > deadline:
                say("time budget: no more rounds")
                break
            refill()
            ceilings.append(ceiling_retr(server, user))
            adapters.append(adapter_only(server, user))
            for delete in (True, False):
                if refill() != written:
                    raise RuntimeError("the refilled maildrop is not complete")
                with ChildPeak() as child:
                    run = mailroom_run(owner, server, user, delete=delete, expected=written)
                child_peak = max(child_peak or 0.0, child.mb)
                expected_left = 0 if delete else written
                if run.left_on_server != expected_left:
                    raise RuntimeError(f"{run.left_on_server} left on the server, not {expected_left}")
                runs[delete].append(run)
            if fetchmail:
                try:
                    fm_keep.append(fetchmail_run(server, user, ca, workdir, written, keep=True))
                    fm_remove.append(fetchmail_run(server, user, ca, workdir, written, keep=False))
                    if server_count(server, user) != 0:
                        raise RuntimeError("fetchmail left messages on the server")
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    fetchmail, fetchmail_note = None, f"failed: {exc}"
                    say(f"fetchmail {fetchmail_note}")
            say(f"round {i + 1}: ceiling {ceilings[-1].rate:,.0f}, Mailroom "
                f"{runs[True][-1].throughput.rate:,.0f} (remove) / {runs[False][-1].throughput.rate:,.0f} "
                f"(leave), fetchmail {fm_remove[-1].rate if fm_remove else 0:,.0f} msg/s")
        rounds = len(ceilings)
        ceiling, adapter_t = median_run(ceilings), median_run(adapters)
        mailroom = median_run([r.throughput for r in runs[True]])
        leave = median_run([r.throughput for r in runs[False]])
        vs_ceiling = sorted(r.throughput.rate / c.rate for r, c in zip(runs[True], ceilings))
        fetchmail_result = median_run(fm_remove) if fm_remove else None
        fetchmail_keep = median_run(fm_keep) if fm_keep else None
        vs_fetchmail = sorted(r.throughput.rate / f.rate for r, f in zip(runs[True], fm_remove))
        if fetchmail_result:
            fetchmail_note = f"{fetchmail}, median of {len(fm_remove)}"

        big: tuple[Run, str] | None = None
        if not args.no_big and time.perf_counter() + 20 < deadline:
            reset_mail_tables()
            big = big_messages(owner, server, workdir)
            say(f"big messages: peak RSS {big[0].rss_peak:.0f} MB")

        # -- the figures ------------------------------------------------------------------------
        mb = stats.bytes / 1e6
        print()
        print(f"Mailroom POP3 download benchmark: {written:,} messages, {mb:,.1f} MB "
              f"(avg {stats.bytes / written / 1024:.1f} KiB; {stats.with_attachments} with "
              "attachments), POP3S with verified TLS on 127.0.0.1")
        print(f"machine: {os.cpu_count()} CPUs, load {load[0]:.2f} at start; {dovecot_version}; "
              f"Python {sys.version.split()[0]}; PostgreSQL via {args.database_url.rsplit('/', 1)[0]}/…")
        print()
        print(f"  {'':<46}{'msg/s':>9}{'MB/s':>9}{'time':>9}  ratio / notes (medians of {rounds} rounds)")
        print(row("ceiling: poplib RETR loop (nothing stored)", ceiling, "1.00"))
        print(row("Mailroom adapter only (pipelined RETR, no DB)", adapter_t,
                  f"{adapter_t.rate / ceiling.rate:.2f} of ceiling"))
        paired = f"{_median(vs_ceiling):.2f} of ceiling"
        if vs_fetchmail:
            paired += f", {_median(vs_fetchmail):.2f} x fetchmail"
        print(row("Mailroom -> PostgreSQL, remove after download", mailroom,
                  paired + " (per-round ratios: " + ", ".join(f"{v:.2f}" for v in vs_ceiling)
                  + (" / " + ", ".join(f"{v:.2f}" for v in vs_fetchmail) if vs_fetchmail else "") + ")"))
        print(row("Mailroom -> PostgreSQL, leave on server", leave,
                  f"{leave.rate / ceiling.rate:.2f} of ceiling"))
        if fetchmail_result is not None:
            print(row("fetchmail -> BSMTP file, remove (nokeep)", fetchmail_result, fetchmail_note))
            print(row("fetchmail -> BSMTP file, keep", fetchmail_keep, ""))
        else:
            print(row("fetchmail", None, fetchmail_note))
        first = runs[True][0]
        print()
        print(f"  peak RSS (VmHWM) in the first Mailroom run: {first.rss_peak:.0f} MB "
              f"(+{first.rss_peak - first.rss_before:.0f} MB over {first.rss_before:.0f} MB before); "
              "all runs: " + ", ".join(f"{r.rss_peak:.0f}" for r in runs[True] + runs[False]) + " MB")
        if child_peak is not None:
            print(f"  peak RSS of the POP3 process (a child of the worker, Pop3ChildSession): "
                  f"{child_peak:.0f} MB")
        if big is not None:
            run, note = big
            print(f"  very large messages (2 x 30 MB, 1 x 120 MB; limit 50 MB): {note}; peak RSS "
                  f"{run.rss_peak:.0f} MB (+{run.rss_peak - run.rss_before:.0f} MB), "
                  f"{run.throughput.seconds:.1f} s")
        targets = [f">= 0.5 x ceiling: {'yes' if _median(vs_ceiling) >= 0.5 else 'NO'}"]
        if vs_fetchmail:
            targets.append(f">= fetchmail: {'yes' if _median(vs_fetchmail) >= 1 else 'NO'}")
        print("  targets: " + "; ".join(targets))
        print(f"  every run stored all {written:,} messages exactly once; remove-after-download "
              "runs left 0 on the server, leave-on-server runs left all")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if server is not None:
            server.stop()
        if django_ready and not args.keep:
            drop_database(args.database_url)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
