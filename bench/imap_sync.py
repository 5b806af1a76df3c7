#!/usr/bin/env python
"""How fast Mailroom's IMAP initial sync is, next to a bare imaplib ceiling and mbsync.

One run prints figures; it is not a test. From the repository root, as root (the private
Dovecot drops to the ``mailroom-vmail`` user that ``scripts/install-test-deps`` creates):

    .venv/bin/python bench/imap_sync.py --messages 2000

It starts a private Dovecot (tests/testbed) on 127.0.0.1, fills one INBOX with generated
messages shaped like a sales mailbox (threads, charsets, attachments, senders who are CRM
contacts), migrates a fresh PostgreSQL database ``mailroom_bench``, then measures in this
process: the imaplib ceiling, Mailroom's initial sync (median of up to 3), the IMAP adapter
alone, mbsync, the no-change resync, body parsing, peak RSS and, when ``mailsync/idle.py``
offers ``MailboxWatcher``, IDLE push latency. Everything is stopped and dropped at the end,
also on Ctrl-C. See bench/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import functools
import gc
import hashlib
import html
import imaplib
import inspect
import io
import os
import platform
import pstats
import queue
import quopri
import random
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.header import Header
from email.utils import encode_rfc2231, format_datetime, formataddr
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/imap_sync.py` puts bench/ first, not the root
    sys.path.insert(0, str(ROOT))

DB_NAME_RE = re.compile(r"mailroom_bench[a-z0-9_]*")
DEFAULT_DB_URL = "postgres://postgres@127.0.0.1:5432/mailroom_bench"
SUBPROCESS_TIMEOUT = 300.0
_T0 = time.perf_counter()


def say(message: str) -> None:
    """Progress on stderr; the figures go to stdout."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# == the corpus ===================================================================================
# (display, ascii) pairs: display names are encoded as RFC 2047 words, addresses stay ASCII.
FIRST = [("Anna", "anna"), ("Jürgen", "juergen"), ("Zoë", "zoe"), ("Søren", "soren"),
         ("José", "jose"), ("Łukasz", "lukasz"), ("Chloé", "chloe"), ("Ольга", "olga"),
         ("Hiroshi", "hiroshi"), ("Fatima", "fatima"), ("Liam", "liam"), ("Mia", "mia"),
         ("François", "francois"), ("Ingrid", "ingrid"), ("Mehmet", "mehmet"),
         ("Priya", "priya"), ("Noah", "noah"), ("Emma", "emma"), ("Björn", "bjorn"),
         ("Aoife", "aoife"), ("Chen", "chen"), ("Lucía", "lucia"), ("Olivia", "olivia"),
         ("Mateo", "mateo")]
LAST = [("Schmidt", "schmidt"), ("Müller", "mueller"), ("Dupré", "dupre"), ("García", "garcia"),
        ("Wójcik", "wojcik"), ("Nakamura", "nakamura"), ("O'Brien", "obrien"),
        ("Kowalski", "kowalski"), ("Johansson", "johansson"), ("Rossi", "rossi"),
        ("Petrova", "petrova"), ("Yılmaz", "yilmaz"), ("Smith", "smith"), ("Brown", "brown"),
        ("Nguyen", "nguyen"), ("Fernández", "fernandez"), ("Novák", "novak"),
        ("Larsen", "larsen"), ("Weiß", "weiss"), ("Costa", "costa")]
COMPANIES = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay", "wonka", "stark",
             "tyrell", "cyberdyne", "soylent", "massive-dynamic", "aperture", "gringotts",
             "oceanic", "pied-piper", "dunder-mifflin", "wayne", "monarch", "oscorp"]
SUBJECTS = ["Quote for {n} licences", "Angebot Nr. {n} – Rückfrage", "Réunion de suivi jeudi",
            "Invoice {n} overdue", "Contract renewal {y}", "Demande de devis : façade",
            "Questions about the onboarding", "Präsentation für Donnerstag", "Pricing for Q{q}",
            "Meeting notes 📎", "Презентация проекта", "見積もりのお願い", "Shipping delay",
            "Follow-up: demo on {d}", "Support ticket #{n}", "Order confirmation {n}",
            "Lunch next week?", "Año nuevo — propuesta", "Straße und Hausnummer geändert",
            "Your trial ends in {q} days", "Signed NDA", "Budget approval ✔"]
WORDS = ("the we our your proposal pricing quote contract renewal delivery schedule invoice "
         "meeting agenda licence licences team project timeline budget approval customer "
         "support onboarding rollout migration integration demo feedback order shipment "
         "warehouse quarter revenue forecast discount terms conditions signature deadline "
         "please could would should will can thanks regards kind best next week Monday "
         "Tuesday Thursday Friday morning afternoon call attached document draft version "
         "update changes question answer confirm reschedule available office remote "
         "and or but with for from about into over after before during within per via").split()
LATIN1_WORDS = "Grüße Straße café naïve Angebot Bestätigung façade señor año Äpfel déjà Zürich " \
               "Übersicht Größe résumé crème Kündigung Rückmeldung".split()
UTF8_WORDS = "€ “quoted” — 🙂 👍 Привет 日本語 ✓ ½ naïve Kraków Łódź Ελλάδα Ωμέγα".split()
ATTACHMENTS = [("application/pdf", "Quote-{n}.pdf"), ("application/pdf", "Angebot-Müller-{n}.pdf"),
               ("image/jpeg", "IMG_{n}.jpg"), ("image/png", "screenshot {n}.png"),
               ("application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                "Contract draft v{n}.docx"),
               ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                "Preisliste_{n}.xlsx"),
               ("application/zip", "logs-{n}.zip")]


@dataclass(frozen=True)
class Person:
    name: str
    email: str      # as written in headers (some in mixed case, as real clients do)
    first: str = ""
    last: str = ""
    company: str = ""


@dataclass
class Corpus:
    """The people of the mailbox: who is in the CRM decides what association has to do."""

    owner: Person
    contacts: list[Person]
    leads: list[Person]
    others: list[Person]


@dataclass(frozen=True)
class Message:
    raw: bytes        # LF line endings, as Dovecot stores mail in a Maildir
    flags: str        # Maildir info letters, e.g. "FS"
    timestamp: float  # Date header and INTERNALDATE (file mtime)

    @property
    def size(self) -> int:
        """RFC822.SIZE: the size with CRLF line endings."""
        return len(self.raw) + self.raw.count(b"\n")


@dataclass
class CorpusStats:
    messages: int = 0
    bytes: int = 0
    with_attachments: int = 0
    replies: int = 0
    threads: int = 0
    from_contacts: int = 0
    from_leads: int = 0
    charsets: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def make_corpus(owner_email: str, seed: int) -> Corpus:
    rng = random.Random(seed)
    pairs = [(f, l) for f in FIRST for l in LAST]
    rng.shuffle(pairs)

    def person(i: int, company: str) -> Person:
        (first, first_a), (last, last_a) = pairs[i]
        email = f"{first_a}.{last_a}@{company}.example"
        if i % 7 == 0:  # mixed case in the header; the CRM stores it lower-case
            email = f"{first_a.title()}.{last_a.title()}@{company.title()}.example"
        return Person(f"{first} {last}", email, first, last, company)

    contacts = [person(i, COMPANIES[i % len(COMPANIES)]) for i in range(50)]
    leads = [person(50 + i, f"prospect{i}") for i in range(20)]
    others = [person(70 + i, f"vendor{i % 12}") for i in range(60)]
    others += [Person(f"Colleague {i}", f"colleague{i}@example.test") for i in range(10)]
    others += [Person("GitHub", "noreply@github.example"),
               Person("Newsletter", "news@saas.example"),
               Person("Billing", "billing@cloud.example"), Person("", "alerts@monitoring.example")]
    return Corpus(Person("Sales", owner_email), contacts, leads, others)


class MessageFactory:
    """Builds mail the way common clients do, fast (no email.message round trip)."""

    def __init__(self, corpus: Corpus, seed: int) -> None:
        self.corpus = corpus
        self.rng = random.Random(seed)
        rng = self.rng
        # Paragraph pools per charset class, wrapped once (textwrap is slow per message).
        self.paragraphs: dict[str, list[tuple[str, str]]] = {"ascii": [], "latin1": [], "utf8": []}
        kinds = (("ascii", []), ("latin1", LATIN1_WORDS), ("utf8", LATIN1_WORDS + UTF8_WORDS))
        for kind, extra in kinds:
            for _ in range(120):
                words = [rng.choice(extra) if extra and rng.random() < 0.08 else rng.choice(WORDS)
                         for _ in range(rng.randint(40, 130))]
                text = " ".join(words).capitalize() + "."
                self.paragraphs[kind].append((textwrap.fill(text, 72), html.escape(text)))
        self.stats = CorpusStats()

    # -- pieces ---------------------------------------------------------------------------------
    def _text(self, kind: str, target: int) -> tuple[str, str]:
        pool = self.paragraphs[kind] + (self.paragraphs["ascii"] if kind != "ascii" else [])
        plain, rich, size = [], [], 0
        while size < target:
            text, markup = self.rng.choice(pool)
            plain.append(text)
            rich.append(f"<p style=\"margin:0 0 12px 0\">{markup}</p>")
            size += len(text) + 1
        return "\n\n".join(plain) + "\n", "\n".join(rich)

    def _encoded_body(self, text: str, charset: str) -> tuple[str, bytes]:
        data = text.encode(charset)
        if charset == "us-ascii":
            return "7bit", data
        roll = self.rng.random()
        if roll < 0.55:
            return "quoted-printable", quopri.encodestring(data)
        if roll < 0.8 and charset == "utf-8":
            return "base64", base64.encodebytes(data)
        return "8bit", data

    def _part(self, ctype: str, charset: str, text: str) -> bytes:
        cte, body = self._encoded_body(text, charset)
        head = f"Content-Type: {ctype}; charset=\"{charset}\"\nContent-Transfer-Encoding: {cte}\n\n"
        return head.encode("ascii") + body

    def _multipart(self, subtype: str, parts: Sequence[bytes]) -> tuple[str, bytes]:
        boundary = f"----=_Part_{self.rng.getrandbits(48):012x}"
        b = boundary.encode("ascii")
        body = b"This is a multi-part message in MIME format.\n\n" if subtype == "mixed" else b""
        body += b"".join(b"--" + b + b"\n" + part + b"\n" for part in parts) + b"--" + b + b"--\n"
        return f"multipart/{subtype};\n boundary=\"{boundary}\"", body

    def _attachment(self, n: int, size: int) -> bytes:
        ctype, pattern = self.rng.choice(ATTACHMENTS)
        name = pattern.format(n=n)
        # Random bytes: PDFs, JPEGs and zips barely compress, so zstd does real work.
        data = base64.encodebytes(self.rng.randbytes(size))
        try:
            name.encode("ascii")
            disposition = f"attachment; filename=\"{name}\""
        except UnicodeEncodeError:  # RFC 2231, as Thunderbird and Apple Mail write it
            disposition = f"attachment;\n filename*={encode_rfc2231(name, 'utf-8')}"
        return (f"Content-Type: {ctype}; name=\"{name.encode('ascii', 'replace').decode()}\"\n"
                f"Content-Disposition: {disposition}\nContent-Transfer-Encoding: base64\n\n"
                .encode("utf-8") + data)

    def _header(self, value: str, charset: str) -> str:
        try:
            value.encode("ascii")
            return value
        except UnicodeEncodeError:
            try:
                value.encode(charset)
            except UnicodeEncodeError:
                charset = "utf-8"
            return Header(value, charset, maxlinelen=76).encode()

    def _address(self, p: Person, charset: str) -> str:
        if not p.name:
            return p.email
        try:
            p.name.encode(charset)
        except UnicodeEncodeError:
            charset = "utf-8"
        return formataddr((p.name, p.email), charset=charset)

    def _trace_headers(self, sender: Person, date: str) -> list[str]:
        rng = self.rng
        domain = sender.email.rpartition("@")[2].lower()
        ip = f"203.0.113.{rng.randint(1, 254)}"
        lines = [f"Return-Path: <{sender.email.lower()}>",
                 f"Delivered-To: {self.corpus.owner.email}"]
        for hop in range(rng.randint(1, 3)):
            lines.append(f"Received: from mail{hop}.{domain} (mail{hop}.{domain} [{ip}])\n"
                         f"\tby mx{hop}.example.test (Postfix) with ESMTPS id "
                         f"{rng.getrandbits(40):010X}\n"
                         f"\tfor <{self.corpus.owner.email}>; {date}")
        sig = base64.b64encode(rng.randbytes(256)).decode()
        lines.append("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=" + domain +
                     "; s=selector1;\n"
                     " h=from:to:subject:date:message-id:mime-version:content-type;\n"
                     f" bh={base64.b64encode(rng.randbytes(32)).decode()};\n b=" +
                     "\n  ".join(sig[i:i + 72] for i in range(0, len(sig), 72)))
        if rng.random() < 0.3:
            lines.append(f"ARC-Seal: i=1; a=rsa-sha256; t={int(time.time())}; cv=none; d={domain}; "
                         f"s=arc-2025;\n b={base64.b64encode(rng.randbytes(128)).decode()}")
            lines.append(f"Authentication-Results: mx.example.test; dkim=pass header.d={domain}; "
                         f"spf=pass smtp.mailfrom={domain}; dmarc=pass")
        return lines

    # -- one message ----------------------------------------------------------------------------
    def messages(self, count: int, *, start: datetime) -> Iterator[Message]:
        rng, corpus, stats = self.rng, self.corpus, self.stats
        threads: list[dict] = []
        step = timedelta(days=365) / max(count, 1)
        when = start
        for n in range(count):
            when += step * rng.uniform(0.2, 1.8)
            tz = timezone(timedelta(hours=rng.choice([-5, 0, 1, 2, 9])))
            date = format_datetime(when.astimezone(tz))
            kind = rng.choices(["utf-8", "us-ascii", "iso-8859-1"], [55, 25, 20])[0]
            stats.charsets[kind] += 1
            text_kind = {"utf-8": "utf8", "us-ascii": "ascii", "iso-8859-1": "latin1"}[kind]

            reply_to_thread = threads and rng.random() < 0.45
            if reply_to_thread:
                thread = rng.choice(threads[-40:])
                sender = thread["people"][rng.randrange(len(thread["people"]))]
                if rng.random() < 0.5:  # our own answer sits in Sent, not in this INBOX
                    thread["ids"].append(f"<{rng.getrandbits(64):016x}@example.test>")
                prefix = "AW: " if "ü" in thread["subject"] or "ä" in thread["subject"] else "Re: "
                subject = prefix + thread["subject"]
                refs = thread["ids"][:1] + thread["ids"][1:][-9:]
                stats.replies += 1
            else:
                roll = rng.random()
                if roll < 0.6:
                    sender = rng.choice(corpus.contacts)
                elif roll < 0.68:
                    sender = rng.choice(corpus.leads)
                else:
                    sender = rng.choice(corpus.others)
                subject = rng.choice(SUBJECTS).format(n=rng.randint(1000, 99999), y=2025,
                                                      q=rng.randint(1, 4), d="Monday")
                refs = []
                thread = {"subject": subject, "ids": [], "people": [sender]}
                threads.append(thread)
                stats.threads += 1
            stats.from_contacts += sender in corpus.contacts
            stats.from_leads += sender in corpus.leads
            domain = sender.email.rpartition("@")[2].lower()
            message_id = (f"<{rng.getrandbits(64):016x}.{n}@{domain}>" if rng.random() < 0.8 else
                          f"<AM6PR{rng.getrandbits(40):010X}{n}"
                          "@AM6PR07MB.eurprd07.prod.outlook.com>")
            thread["ids"].append(message_id)

            cc: list[Person] = []
            if rng.random() < 0.2:
                cc = rng.sample(corpus.contacts + corpus.others, rng.randint(1, 3))
                if sender in corpus.contacts and rng.random() < 0.5:
                    thread["people"].append(cc[0])

            headers = self._trace_headers(sender, date)
            headers += [f"From: {self._address(sender, kind)}",
                        f"To: {self._address(corpus.owner, kind)}"]
            if cc:
                headers.append("Cc: " + ",\n ".join(self._address(p, kind) for p in cc))
            if rng.random() < 0.01:  # raw UTF-8 in a header (RFC 6532 or a careless client)
                headers.append(f"Subject: {subject}")
            else:
                charset = kind if kind != "us-ascii" else "utf-8"
                headers.append(f"Subject: {self._header(subject, charset)}")
            headers += [f"Date: {date}", f"Message-ID: {message_id}"]
            if refs:
                headers.append(f"In-Reply-To: {refs[-1]}")
                headers.append("References: " + "\n ".join(refs))
            headers.append(rng.choice(["User-Agent: Mozilla Thunderbird 128.3",
                                       "X-Mailer: Microsoft Outlook 16.0",
                                       "X-Mailer: Apple Mail (2.3774)", "X-Mailer: iPhone Mail"]))
            if sender.email.startswith(("news@", "noreply@", "alerts@")):
                headers.append(f"List-Id: Updates <updates.{domain}>")
                headers.append(f"List-Unsubscribe: <https://{domain}/u/{rng.getrandbits(64):x}>")
            if rng.random() < 0.02:
                headers.append("Auto-Submitted: auto-replied")

            # Body: 2-20 KB of text (plain, or plain + HTML); ~15 % carry 50-500 KB files.
            target = rng.randint(2000, 20000)
            alternative = rng.random() < 0.65
            plain, rich = self._text(text_kind, int(target * (0.4 if alternative else 1.0)))
            body_part = self._part("text/plain", kind, plain)
            if alternative:
                markup = ("<html><head><meta http-equiv=\"Content-Type\" content=\"text/html\">"
                          "<style>p{font-family:Arial}</style></head><body><div dir=\"ltr\">"
                          + rich + "<p>--<br><b>"
                          # a character reference: the name may not fit the part's charset
                          + html.escape(sender.name).encode("ascii", "xmlcharrefreplace").decode()
                          + "</b></p>"
                          + "</div></body></html>\n")
                ctype, body = self._multipart("alternative", [
                    body_part, self._part("text/html", kind, markup)])
                body_part = f"Content-Type: {ctype}\n\n".encode("ascii") + body
            if rng.random() < 0.15:
                stats.with_attachments += 1
                files = [self._attachment(n, rng.randint(50_000, 500_000))]
                if rng.random() < 0.2:
                    files.append(self._attachment(n + 1, rng.randint(20_000, 100_000)))
                ctype, body = self._multipart("mixed", [body_part, *files])
                top = f"MIME-Version: 1.0\nContent-Type: {ctype}\n\n".encode("ascii") + body
            else:
                top = b"MIME-Version: 1.0\n" + body_part
            raw = "\n".join(headers).encode("utf-8") + b"\n" + top

            flags = ""
            if rng.random() < 0.05:
                flags += "F"
            if rng.random() < 0.75:
                flags += "RS" if rng.random() < 0.25 else "S"
            message = Message(raw, flags, when.timestamp())
            stats.messages += 1
            stats.bytes += message.size
            yield message


# == private Dovecot and filling it ===============================================================
def fill_maildir(server, user, messages: Iterator[Message]) -> int:  # noqa: ANN001
    """Write the messages straight into the user's Maildir, then have Dovecot index them.

    The fastest way in (see README): no protocol round trips, one ``force-resync`` at the
    end. Files are LF-only with ``S=``/``W=`` in the name, exactly as Dovecot writes them.
    """
    from tests.testbed.dovecot import vmail_ids

    uid, gid = vmail_ids()
    home = server.mail_root / user.username
    maildir = home / "Maildir"
    for directory in (home, maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chown(directory, uid, gid)
    cur = maildir / "cur"
    pid = os.getpid()
    count = 0
    for count, message in enumerate(messages, 1):
        name = (f"{int(message.timestamp)}.M{count:07d}P{pid}.bench,"
                f"S={len(message.raw)},W={message.size}:2,{message.flags}")
        fd = os.open(cur / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, message.raw)
            os.fchown(fd, uid, gid)
            os.utime(fd, (message.timestamp, message.timestamp))
        finally:
            os.close(fd)
    doveadm(server, "force-resync", "-u", user.username, "INBOX")
    return count


def doveadm(server, *args: str) -> str:  # noqa: ANN001
    """The testbed's doveadm helper has a 20 s timeout; a big force-resync may need more."""
    result = subprocess.run(["doveadm", "-c", str(server.config_path), *args],
                            stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=SUBPROCESS_TIMEOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"doveadm {' '.join(args)}: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode(errors="replace")


def imaps(server, user, timeout: float = 60.0) -> imaplib.IMAP4_SSL:  # noqa: ANN001
    """A verified-TLS stdlib session, as the ceiling and helpers use it."""
    imap = imaplib.IMAP4_SSL(server.host, server.imaps_port,
                             ssl_context=ssl.create_default_context(), timeout=timeout)
    imap.login(user.username, user.password)
    return imap


def uid_set(uids: Sequence[int]) -> str:
    parts, start, prev = [], None, None
    for uid in sorted(uids):
        if start is None:
            start = prev = uid
        elif uid == prev + 1:
            prev = uid
        else:
            parts.append(f"{start}:{prev}" if start != prev else str(start))
            start = prev = uid
    if start is not None:
        parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts)


def warm_up(server, user) -> int:  # noqa: ANN001
    """Let Dovecot build its index and cache before anything is timed (small reply)."""
    imap = imaps(server, user)
    try:
        imap.select("INBOX", readonly=True)
        _, data = imap.uid("SEARCH", "ALL")
        uids = [int(x) for x in data[0].split()]
        if uids:
            imap.uid("FETCH", uid_set(uids), "(FLAGS RFC822.SIZE INTERNALDATE)")
        return len(uids)
    finally:
        with contextlib.suppress(Exception):
            imap.logout()


# == measurements without Django ==================================================================
@dataclass
class Throughput:
    messages: int
    bytes: int
    seconds: float
    user: float = 0.0  # CPU seconds of a child process (mbsync), where measured
    system: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def mb_rate(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


def median_run(runs: Sequence[Throughput]) -> Throughput:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def ceiling_fetch(server, user, chunk: int, *, tls: bool = True) -> Throughput:  # noqa: ANN001
    """Bare imaplib: UID FETCH BODY.PEEK[] in big ranges over the same IMAPS connection type
    Mailroom uses (login included, as in Mailroom's run). ``tls=False``: the plain port, for
    comparison with figures measured without TLS."""
    count = total = 0
    start = time.perf_counter()
    if tls:
        imap = imaps(server, user)
    else:
        imap = imaplib.IMAP4(server.host, server.imap_port, timeout=60)
        imap.login(user.username, user.password)
    try:
        imap.select("INBOX", readonly=True)
        _, data = imap.uid("SEARCH", "ALL")
        uids = sorted(int(x) for x in data[0].split())
        for i in range(0, len(uids), chunk):
            _, data = imap.uid("FETCH", uid_set(uids[i:i + chunk]), "(BODY.PEEK[])")
            for item in data:
                if isinstance(item, tuple):
                    count += 1
                    total += len(item[1])
            del data
    finally:
        with contextlib.suppress(Exception):
            imap.logout()
    return Throughput(count, total, time.perf_counter() - start)


def status_roundtrip(server, user) -> float:  # noqa: ANN001
    """What a no-change check costs at least: connect, TLS, LOGIN, STATUS x2, LOGOUT."""
    start = time.perf_counter()
    imap = imaps(server, user)
    for folder in ("INBOX", "Sent"):
        imap.status(folder, "(UIDVALIDITY UIDNEXT MESSAGES HIGHESTMODSEQ)")
    imap.logout()
    return time.perf_counter() - start


def mbsync_version() -> str | None:
    if shutil.which("mbsync") is None:
        return None
    result = subprocess.run(["mbsync", "--version"], capture_output=True, text=True, timeout=10)
    return (result.stdout or result.stderr).strip() or "mbsync"


def mbsync_run(server, user, ca, workdir: Path, expected: int, round_no: int = 0) -> Throughput:  # noqa: ANN001
    """One full pull of INBOX into an empty Maildir with mbsync's defaults (incl. fsync).

    Each round gets its own Maildir and none is deleted before the last round: on this
    machine's file system (ext4, online discard) creating files right after deleting ~140 MB
    of them is slow, and deleting the last round's Maildir made each mbsync run slower than
    the one before (1.7 s, 2.4, 3.0, 3.8, 4.5 s in a row; 1.5-1.9 s each when kept)."""
    store = workdir / f"mbsync-maildir-{round_no}"
    store.mkdir(parents=True)
    config = workdir / "mbsyncrc"
    config.write_text(textwrap.dedent(f"""\
        IMAPAccount bench
        Host localhost
        Port {server.imaps_port}
        User {user.username}
        Pass {user.password}
        SSLType IMAPS
        CertificateFile {ca.ca_cert_path}

        IMAPStore bench-far
        Account bench

        MaildirStore bench-near
        Path {store}/
        Inbox {store}/INBOX

        Channel bench
        Far :bench-far:
        Near :bench-near:
        Patterns INBOX
        Sync Pull
        Create Near
        Expunge None
        SyncState *
        """))
    os.chmod(config, 0o600)
    before = os.times()
    start = time.perf_counter()
    result = subprocess.run(["mbsync", "-c", str(config), "-q", "bench"], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=SUBPROCESS_TIMEOUT, check=False)
    seconds = time.perf_counter() - start
    after = os.times()
    if result.returncode != 0:
        raise RuntimeError(f"mbsync failed ({result.returncode}): "
                           f"{result.stderr.decode(errors='replace').strip()[-500:]}")
    files = [p for sub in ("cur", "new") for p in (store / "INBOX" / sub).iterdir()]
    if len(files) != expected:
        raise RuntimeError(f"mbsync stored {len(files)} of {expected} messages")
    total = sum(p.stat().st_size for p in files)
    # The Maildir goes with the work directory. mbsync's own CPU, user and system: its
    # system time (creating and syncing 2,000 files) is most of its run and varies from run
    # to run on this VM far more than anything else measured here.
    return Throughput(len(files), total, seconds, after.children_user - before.children_user,
                      after.children_system - before.children_system)


def settle_disk() -> None:
    """Before each timed run (Mailroom's and mbsync's): PostgreSQL's CHECKPOINT and the
    kernel's sync, so that neither side pays for the writeback of the run before it.
    Without this, mbsync ran right after a Mailroom run while ~300 MB of WAL, table and
    TOAST pages were still being written out, and its fsyncs waited for them: its system
    time swung from 0.4 to 1.5 s between rounds (session 8)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CHECKPOINT")
    os.sync()
    time.sleep(0.2)


# == memory =======================================================================================
def _status_kb(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: ru_maxrss is the best the stdlib offers
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM, so each run gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


class ChildPeak:
    """Samples the peak RSS (VmHWM) of this process's children every 20 ms while in use: the
    sync's fetch process. (ru_maxrss of children is no use here: a child started with vfork
    reports the parent's size.)"""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ChildPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak_kb / 1024

    def _sample(self) -> None:
        me, children, rounds = str(os.getpid()), set(), 0
        while not self._stop.wait(0.02):
            if rounds % 10 == 0:  # look for new children every 0.2 s: a /proc scan costs ~2 ms
                for proc in Path("/proc").iterdir():
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        if proc.name.isdigit():
                            stat = (proc / "stat").read_text()
                            if stat[stat.rindex(")") + 2:].split()[1] == me:
                                children.add(proc)
            rounds += 1
            for proc in list(children):
                try:
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except OSError:
                    children.discard(proc)


# == Django =======================================================================================
def setup_django(db_url: str, data_dir: Path) -> None:
    import dj_database_url
    import psycopg2
    from cryptography.fernet import Fernet
    from psycopg2 import sql

    params = dj_database_url.parse(db_url)
    name = params["NAME"]
    if not DB_NAME_RE.fullmatch(name or ""):
        # It is dropped and re-created: never let a typo point that at a real database.
        raise SystemExit(f"refusing database {name!r}: its name must match {DB_NAME_RE.pattern}")
    admin = psycopg2.connect(dbname="postgres", user=params["USER"] or "postgres",
                             password=params["PASSWORD"] or None, host=params["HOST"] or None,
                             port=params["PORT"] or None, connect_timeout=10)
    try:
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                           .format(sql.Identifier(name)))
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        admin.close()

    os.environ.update({
        "DATABASE_URL": db_url,
        "MAILROOM_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS": "1",
        "CELERY_TASK_ALWAYS_EAGER": "1",
        "DJANGO_SETTINGS_MODULE": "crm.settings",
        "MAILROOM_ENV": "development",
        "DJANGO_DEBUG": "0",  # DEBUG keeps every query in memory: RSS figures would lie
        "MAILROOM_DATA_DIR": str(data_dir),
        "MAILROOM_LOG_LEVEL": os.environ.get("MAILROOM_LOG_LEVEL", "WARNING"),
    })
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)


def drop_database(db_url: str) -> None:
    import dj_database_url
    import psycopg2
    from psycopg2 import sql

    with contextlib.suppress(Exception):
        from django.db import connections
        connections.close_all()
    params = dj_database_url.parse(db_url)
    if not DB_NAME_RE.fullmatch(params["NAME"] or ""):
        return
    admin = psycopg2.connect(dbname="postgres", user=params["USER"] or "postgres",
                             password=params["PASSWORD"] or None, host=params["HOST"] or None,
                             port=params["PORT"] or None, connect_timeout=10)
    try:
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                           .format(sql.Identifier(params["NAME"])))
    finally:
        admin.close()


def seed_crm(corpus: Corpus):  # noqa: ANN201
    """The owner, and the contacts (with deals) and leads whose addresses send the mail."""
    from crm.models import Account, Contact, Deal, DealStage, Lead, User

    owner = User.objects.create_user(username="bench-owner", email="owner@crm.example.com",
                                     password=None, first_name="Bench", last_name="Owner")
    stage = DealStage.objects.filter(probability__gt=0).order_by("order").first()
    if stage is None:
        stage = DealStage.objects.create(name="Bench", probability=20)
    accounts = {c: Account.objects.create(owner=owner, name=c.replace("-", " ").title())
                for c in {p.company for p in corpus.contacts}}
    for i, p in enumerate(corpus.contacts):
        contact = Contact.objects.create(owner=owner, first_name=p.first, last_name=p.last,
                                         email=p.email.lower(), account=accounts[p.company])
        for d in range(1 + (i % 5 == 0)):
            Deal.objects.create(owner=owner, name=f"{p.company} deal {d + 1}", contact=contact,
                                account=accounts[p.company], stage=stage, amount=1000 * (i + 1))
    for p in corpus.leads:
        Lead.objects.create(owner=owner, first_name=p.first, last_name=p.last,
                            email=p.email.lower(), company=p.company)
    return owner


def new_mailbox(owner, server, user, round_no: int = 0):  # noqa: ANN001, ANN201
    """The bench mailbox, empty. From the second round on it belongs to a new CRM user (the
    same address, the same contacts to match): the rows of earlier rounds stay. Emptying the
    tables instead (TRUNCATE unlinks their files) slowed the writes of the next run on this
    machine's file system (see mbsync_run)."""
    from crm.models import User
    from mailsync.models import Mailbox

    if round_no:
        owner = User.objects.create_user(username=f"bench-owner-{round_no}", password=None,
                                         email=f"owner{round_no}@crm.example.com")
    return Mailbox.objects.create(
        owner=owner, display_name="Bench", email_address=user.email,
        protocol=Mailbox.Protocol.IMAP, incoming_host=server.host,
        incoming_port=server.imaps_port, incoming_security="ssl",
        username=user.username, password=user.password, is_active=True,
    )


def reset_mail_tables() -> None:
    """Empty every mailsync table (mailboxes included) between initial-sync runs."""
    from django.apps import apps
    from django.db import connection

    tables = [m._meta.db_table for m in apps.get_app_config("mailsync").get_models()]
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE " + ", ".join(connection.ops.quote_name(t) for t in tables)
                       + " RESTART IDENTITY CASCADE")


# == where the time goes (wrappers, not edits) ====================================================
# (depth, label, key): keys are wrapped functions; "=a-b-c" rows are derived by subtraction.
LAYOUT = [
    (0, "imap connect + TLS + LOGIN", "connect"),
    (0, "imap UID SEARCH", "search"),
    (0, "imap UID FETCH RFC822.SIZE", "sizes"),
    (0, "imap UID FETCH bodies (fetch_messages)", "fetch"),
    (1, "IMAPClient parse_fetch_response", "parse"),
    (1, "socket, TLS, imaplib (incl. its debug=5 logging)", "=fetch-parse"),
    (0, "ingest_batch", "ingest"),
    (1, "prepare: envelope, hashes, fingerprint", "prepare"),
    (1, "_store", "store"),
    (2, "zstd compress", "compress"),
    (2, "_assign_threads", "threads"),
    (2, "emails_associate", "associate"),
    (2, "bulk INSERTs and other queries", "=store-compress-threads-associate"),
    (1, "_finish (cursor, counters)", "finish"),
    (1, "COMMIT", "=ingest-prepare-store-finish"),
    (0, "flags/expunge check (_flags or _changes_qresync)", "flags"),
    (0, "other: lock, LIST, STATUS, SELECT, expunge check",
     "=total-connect-search-sizes-fetch-ingest-flags"),
]


class Timers:
    """Wraps functions of the sync path at run time to attribute wall time per phase.

    Nothing in the project is edited: module attributes are swapped for timed wrappers and
    put back afterwards. Each wrapper costs about a microsecond per call.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._restore: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, key: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:  # renamed in the project: that row just stays empty
            return

        @functools.wraps(original)
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1

        setattr(owner, attr, timed)
        self._restore.append((owner, attr, original))

    def install(self) -> None:
        from mailsync.protocols import imap as protocol
        from mailsync.sync import imap as engine
        from mailsync.sync import ingest

        self.wrap(protocol.ImapSession, "connect", "connect")
        self.wrap(protocol.ImapSession, "search_uids", "search")
        self.wrap(protocol.ImapSession, "fetch_sizes", "sizes")
        self.wrap(protocol.ImapSession, "fetch_messages", "fetch")
        self.wrap(protocol, "parse_fetch_response", "parse")
        self.wrap(engine, "ingest_batch", "ingest")
        self.wrap(ingest, "prepare", "prepare")
        self.wrap(ingest, "_store", "store")
        self.wrap(ingest, "compress", "compress")
        self.wrap(ingest, "_assign_threads", "threads")
        self.wrap(ingest, "emails_associate", "associate")
        self.wrap(ingest, "_finish", "finish")
        self.wrap(engine.ImapSync, "_flags", "flags")
        self.wrap(engine.ImapSync, "_changes_qresync", "flags")  # instead of _flags

    def uninstall(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        result = dict(self.seconds), dict(self.calls)
        self.seconds.clear()
        self.calls.clear()
        return result


def breakdown(total: float, seconds: dict[str, float], calls: dict[str, int]) -> list[str]:
    values = {**seconds, "total": total}
    lines = []
    for depth, label, key in LAYOUT:
        if key.startswith("="):
            first, *rest = key[1:].split("-")
            value = values.get(first, 0.0) - sum(values.get(k, 0.0) for k in rest)
            count = ""
        else:
            value = values.get(key, 0.0)
            count = f"({calls.get(key, 0):,} calls)"
        name = "  " * depth + label
        lines.append(f"  {name:<52}{value:>7.2f} s {value / total * 100:5.1f} %  {count}")
    return lines


class QueryStats:
    """SQL time and count per statement kind and table, via connection.execute_wrapper."""

    _TABLE = re.compile(r'(?:INSERT INTO|UPDATE|DELETE FROM|FROM)\s+"?([\w.]+)"?', re.I)

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    def __call__(self, execute, sql, params, many, context):  # noqa: ANN001, ANN204
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            head = sql[:300]
            verb = head.split(None, 1)[0].upper() if head.strip() else "?"
            match = self._TABLE.search(head)
            dml = {"INSERT", "UPDATE", "DELETE", "SELECT"}
            key = f"{verb} {match.group(1)}" if match and verb in dml else verb
            self.seconds[key] += time.perf_counter() - start
            self.count[key] += 1

    def top(self, limit: int) -> list[tuple[str, float, int]]:
        ranked = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:limit]
        return [(key, seconds, self.count[key]) for key, seconds in ranked]


# == CPU per process ==============================================================================
_DOVECOT_COMMS = ("imap", "dovecot", "auth", "log", "config", "anvil", "stats", "lmtp")


def _proc_cpu(prefixes: tuple[str, ...]) -> float:
    """User + system CPU seconds of the live processes whose name starts with a prefix, with
    the children they reaped (PostgreSQL's postmaster reaps its ended backends)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if stat[stat.index("(") + 1:stat.rindex(")")].startswith(prefixes):
                fields = stat[stat.rindex(")") + 2:].split()
                total += sum(int(f) for f in fields[11:15]) / tick
    return total


def cpu_snapshot() -> dict[str, float]:
    own = os.times()
    return {"worker": own.user + own.system, "fetch process": own.children_user + own.children_system,
            "PostgreSQL": _proc_cpu(("postgres",)), "Dovecot": _proc_cpu(_DOVECOT_COMMS)}


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    now = cpu_snapshot()
    return {key: now[key] - before[key] for key in before}


# == the Mailroom measurements ====================================================================
@dataclass
class SyncRun:
    throughput: Throughput
    rss_before: float
    rss_peak: float
    rss_after: float
    new: int
    failed: int
    phases: dict[str, float]
    calls: dict[str, int]
    queries: QueryStats
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process (cpu_snapshot)


def mailroom_sync(mailbox, timers: Timers) -> SyncRun:  # noqa: ANN001
    from django.db import connection

    from mailsync.sync.imap import ImapSync

    gc.collect()
    timers.snapshot()
    queries = QueryStats()
    rss_before = rss_mb()
    reset_peak()
    with connection.execute_wrapper(queries):
        cpu = cpu_snapshot()
        start = time.perf_counter()
        report = ImapSync(mailbox).run()
        seconds = time.perf_counter() - start
        cpu = cpu_since(cpu)
    peak = peak_mb()
    phases, calls = timers.snapshot()
    mailbox.refresh_from_db()
    return SyncRun(Throughput(report.new + report.located, mailbox.bytes_done, seconds),
                   rss_before, peak, rss_mb(), report.new, report.failed, phases, calls, queries,
                   cpu)


def adapter_only(mailbox) -> Throughput:  # noqa: ANN001
    """Mailroom's IMAP adapter alone (IMAPClient parsing, same batches), no database."""
    from mailsync.protocols.imap import ImapSession
    from mailsync.sync import imap as engine

    count = total = 0
    start = time.perf_counter()
    with ImapSession(engine.server_settings(mailbox)) as session:
        session.select("INBOX", readonly=True)
        uids = session.search_uids()
        sizes = session.fetch_sizes(uids)
        batches = getattr(engine, "_batches", None) or (
            lambda uids, _sizes: (uids[i:i + 250] for i in range(0, len(uids), 250)))
        for batch in batches(sorted(sizes), sizes):
            for message in session.fetch_messages(batch):
                count += 1
                total += message.size
    return Throughput(count, total, time.perf_counter() - start)


def no_change_resync(mailbox, runs: int) -> tuple[list[float], bool]:  # noqa: ANN001
    from mailsync.sync.imap import ImapSync

    times, unchanged = [], True
    for _ in range(runs):
        mailbox.refresh_from_db()
        start = time.perf_counter()
        report = ImapSync(mailbox).run()
        times.append(time.perf_counter() - start)
        unchanged &= report.new == 0 and report.unchanged_folders == report.folders
    return times, unchanged


def no_change_check_open(mailbox, runs: int) -> list[float]:  # noqa: ANN001
    """The no-change resync on a connection already open (as a long-lived worker or the
    IDLE watcher holds one): lock, STATUS per folder, bookkeeping; no TCP/TLS/LOGIN."""
    from mailsync.protocols.imap import ImapSession
    from mailsync.sync.imap import ImapSync, server_settings

    times = []
    with ImapSession(server_settings(mailbox)) as session:
        for _ in range(runs):
            mailbox.refresh_from_db()
            start = time.perf_counter()
            ImapSync(mailbox).run(session=session)
            times.append(time.perf_counter() - start)
    return times


def parse_pending(mailbox, deadline: float) -> tuple[Throughput, int, int]:  # noqa: ANN001
    from mailsync.models import Email
    from mailsync.services import PARSE_BATCH, emails_parse_pending

    count = 0
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        done = emails_parse_pending(mailbox_id=mailbox.pk, limit=PARSE_BATCH)
        if not done:
            break
        count += done
    seconds = time.perf_counter() - start
    emails = Email.objects.filter(mailbox=mailbox)
    size = sum(emails.exclude(parse_state=Email.ParseState.PENDING).values_list("size", flat=True))
    failed = emails.filter(parse_state=Email.ParseState.FAILED).count()
    pending = emails.filter(parse_state=Email.ParseState.PENDING).count()
    return Throughput(count, size, seconds), failed, pending


def profile_sync(mailbox, top: int) -> str:  # noqa: ANN001
    from mailsync.sync.imap import ImapSync

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(ImapSync(mailbox).run)
    seconds = time.perf_counter() - start
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    text = out.getvalue()
    # pstats prints absolute paths; the repository prefix is noise.
    text = text.replace(str(ROOT) + "/", "")
    title = (f"cProfile of one initial sync ({seconds:.1f} s under the profiler), "
             f"top {top} by cumulative:")
    return title + "\n" + "\n".join(line for line in text.splitlines() if line.strip())


def measure_idle(mailbox, server, user, rounds: int,  # noqa: ANN001
                 timeout: float) -> tuple[list[float], list[float], str]:
    """Delivery (LMTP) -> the watcher's on_change, and delivery -> the mail stored by a sync."""
    try:
        from mailsync import idle
        watcher_class = idle.MailboxWatcher
        parameters = inspect.signature(watcher_class).parameters
        if not {"mailbox_id", "settings", "on_change"} <= parameters.keys():
            return [], [], f"MailboxWatcher{inspect.signature(watcher_class)} not recognised"
    except Exception as exc:  # noqa: BLE001  (a module being written may not import)
        return [], [], f"mailsync/idle.py unusable ({type(exc).__name__}: {exc})"
    from mailsync.sync.imap import ImapSync, server_settings

    events: queue.Queue[float] = queue.Queue()
    watcher = watcher_class(mailbox_id=mailbox.pk, settings=server_settings(mailbox, timeout=60),
                            on_change=lambda _id: events.put(time.perf_counter()))
    push, stored = [], []
    note = ""
    watcher.start()
    try:
        connected = getattr(watcher, "connected", None)
        if connected is not None and not connected.wait(timeout):
            return [], [], "watcher did not connect"
        with contextlib.suppress(queue.Empty):  # the catch-up notification after connecting
            events.get(timeout=2.0)
        factory = MessageFactory(make_corpus(user.email, seed=99), seed=99)
        for i, message in enumerate(factory.messages(rounds, start=datetime.now(timezone.utc))):
            time.sleep(0.5)  # let the watcher get back into IDLE
            while not events.empty():
                events.get_nowait()
            start = time.perf_counter()
            server.deliver(user, message.raw.replace(b"\n", b"\r\n"))
            try:
                notified = events.get(timeout=timeout)
            except queue.Empty:
                note = f"no notification within {timeout:.0f} s (round {i + 1})"
                break
            push.append(notified - start)
            mailbox.refresh_from_db()
            report = ImapSync(mailbox).run()
            stored.append(time.perf_counter() - start)
            if report.new != 1:
                note = f"round {i + 1}: the sync stored {report.new} new mails, expected 1"
    finally:
        watcher.stop()
        watcher.join(timeout=10)
    return push, stored, note


# == output =======================================================================================
def machine_line(dovecot_version: str, mbsync: str | None, load: tuple[float, ...]) -> str:
    import django
    import imapclient
    from django.db import connection

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg = cursor.fetchone()[0].split()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: nproc {cores} ({cpu}), Python {platform.python_version()}, "
            f"Dovecot {dovecot_version}, PostgreSQL {pg}, Django {django.get_version()}, "
            f"IMAPClient {imapclient.__version__}, mbsync: {mbsync or 'not installed'}; "
            f"load average at start {load[0]:.2f} (other work on the machine skews the figures)\n"
            f"{speed_line()}")


def speed_line() -> str:
    """How fast this machine runs interpreted Python against C over memory, best of 3.

    Mailroom's sync is mostly Python (IMAP replies, headers, rows); mbsync is C and system
    calls. VMs of the same kind differ far more in the first than in the second, and so does
    the ratio Mailroom/mbsync: compare these two figures before comparing runs."""
    def best(work: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return min(times)

    def loop() -> None:
        total = 0
        for i in range(2_000_000):
            total += i

    data = random.Random(0).randbytes(32 * 2**20)
    python = best(loop)
    sha = best(lambda: hashlib.sha256(data).digest())
    return (f"speed: a 2,000,000-step Python loop {python * 1000:.0f} ms; SHA-256 of 32 MB "
            f"{sha * 1000:.0f} ms ({32 / sha:,.0f} MB/s); Python/C {python / sha:.1f}")


def fmt_rate(t: Throughput | None) -> tuple[str, str, str]:
    if t is None:
        return "-", "-", "-"
    return f"{t.rate:,.0f}", f"{t.mb_rate:,.1f}", f"{t.seconds:.2f} s"


def row(label: str, t: Throughput | None, note: str = "") -> str:
    rate, mb, secs = fmt_rate(t)
    return f"  {label:<44}{rate:>9}{mb:>9}{secs:>10}  {note}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# == main =========================================================================================
def compile_bytecode() -> int:
    """Byte-compile the project's packages, as a deployment has them (pip compiles what it
    installs; the Docker image compiles /app, where its processes import from): in a checkout run with
    PYTHONDONTWRITEBYTECODE=1 (this project's Dockerfile sets it, and so do many shells)
    nothing is cached, and each sync's fetch process, a new interpreter, would compile ~18
    modules from source first (~30 ms on its critical path). Returns the modules compiled."""
    import compileall
    import io

    packages = ("crm", "mailsync", "dropbox", "reports")

    def cached() -> int:
        return sum(1 for package in packages for _ in (ROOT / package).glob("**/__pycache__/*.pyc"))

    before = cached()
    with contextlib.redirect_stdout(io.StringIO()):
        for package in packages:
            compileall.compile_dir(str(ROOT / package), quiet=2, workers=1)
    return cached() - before


def start_dovecot(workdir: Path):  # noqa: ANN201
    """A private Dovecot from the test bed, its certificates trusted by this process.
    Returns (server, ca, version); the caller stops the server."""
    from tests.testbed.dovecot import DovecotServer
    from tests.testbed.tls import write_test_ca

    ca = write_test_ca(workdir / "tls")
    os.environ["SSL_CERT_FILE"] = str(ca.bundle_path)
    (workdir / "dovecot").mkdir()
    server = DovecotServer(workdir / "dovecot", ca)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    version = subprocess.run(["dovecot", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    return server, ca, version


def fill_bench_mailbox(server, user, args: argparse.Namespace):  # noqa: ANN001, ANN201
    """The realistic corpus written into the user's INBOX.
    Returns (corpus, messages written, seconds, stats)."""
    corpus = make_corpus(user.email, args.seed)
    factory = MessageFactory(corpus, args.seed)
    start = time.perf_counter()
    written = fill_maildir(server, user, factory.messages(
        args.messages, start=datetime.now(timezone.utc) - timedelta(days=366)))
    return corpus, written, time.perf_counter() - start, factory.stats


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000,
                   help="messages in the INBOX (default 2000)")
    p.add_argument("--runs", type=int, default=3,
                   help="initial-sync runs, median reported (default 3)")
    p.add_argument("--resync-runs", type=int, default=10, help="no-change resyncs (default 10)")
    p.add_argument("--idle-rounds", type=int, default=5,
                   help="IDLE deliveries measured (default 5)")
    p.add_argument("--budget", type=float, default=170.0,
                   help="seconds; repeats are skipped once they would overrun it (default 170)")
    p.add_argument("--fetch-chunk", type=int, default=1000,
                   help="UIDs per UID FETCH in the imaplib ceiling (default 1000)")
    p.add_argument("--profile", action="store_true",
                   help="one more initial sync under cProfile; print the top entries")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--no-mbsync", action="store_true", help="skip mbsync even if installed")
    p.add_argument("--no-settle", dest="settle", action="store_false",
                   help="no CHECKPOINT + sync before each timed run (see settle_disk)")
    p.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB_URL),
                   help=f"dropped and re-created; name must match {DB_NAME_RE.pattern}")
    p.add_argument("--keep", action="store_true", help="keep the database and temp dir (debugging)")
    p.add_argument("--seed", type=int, default=20250101)
    args = p.parse_args(argv)
    if not 1 <= args.messages <= 200_000:
        p.error("--messages must be between 1 and 200000")
    return args


def _raise_interrupt(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/imap_sync.py must run as root: the private Dovecot drops to mailroom-vmail.",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    deadline = time.perf_counter() + args.budget
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0,)


    workdir = Path(tempfile.mkdtemp(prefix="mailroom-bench-"))
    # Dovecot's auth and mail processes (not root) must traverse it to reach their files.
    os.chmod(workdir, 0o711)
    server = None
    django_ready = False
    try:
        compiled = compile_bytecode()
        say(f"byte-compiled the project ({compiled} modules new), as a deployment has it")
        server, ca, dovecot_version = start_dovecot(workdir)
        user = server.add_user("bench")
        say(f"Dovecot {dovecot_version} on 127.0.0.1:{server.imaps_port} (IMAPS)")

        corpus, written, fill_seconds, stats = fill_bench_mailbox(server, user, args)
        indexed = warm_up(server, user)
        if indexed != written:
            raise RuntimeError(f"Dovecot indexed {indexed} of {written} messages")
        say(f"filled INBOX: {written} messages, {stats.bytes / 1e6:.1f} MB in {fill_seconds:.1f} s")

        django_ready = True  # from here on the database may exist: drop it at the end
        setup_django(args.database_url, workdir / "data")
        owner = seed_crm(corpus)
        say("database migrated; 50 contacts with deals, 20 leads")

        from mailsync.models import Email, EmailLink, Thread

        timers = Timers()
        timers.install()
        runs: list[SyncRun] = []
        mailbox = None
        # mbsync runs right after each Mailroom run: on a shared machine whose speed drifts,
        # the ratio is taken within a round and its median reported.
        mbsync = mbsync_version()
        mbsync_note = "not installed" if mbsync is None else ""
        if mbsync and args.no_mbsync:
            mbsync, mbsync_note = None, "skipped (--no-mbsync)"
        mb_runs: list[Throughput] = []
        mb_dovecot: list[float] = []
        round_ratios: list[float] = []
        for i in range(max(1, args.runs)):
            if runs and time.perf_counter() + runs[-1].throughput.seconds * 1.5 + 40 > deadline:
                say("time budget: no more initial-sync runs")
                break
            mailbox = new_mailbox(owner, server, user, i)
            if args.settle:
                settle_disk()
            with ChildPeak() as child:
                run = mailroom_sync(mailbox, timers)
            runs.append(run)
            say(f"initial sync {i + 1}: {run.throughput.rate:,.0f} msg/s "
                f"({run.throughput.seconds:.1f} s), peak RSS {run.rss_peak:.0f} MB")
            if i == 0:
                child_peak = child.mb
            if mbsync:
                try:
                    if args.settle:
                        settle_disk()
                    dovecot_before = _proc_cpu(_DOVECOT_COMMS)
                    mb_runs.append(mbsync_run(server, user, ca, workdir, written, i))
                    mb_dovecot.append(_proc_cpu(_DOVECOT_COMMS) - dovecot_before)
                    round_ratios.append(run.throughput.rate / mb_runs[-1].rate)
                    say(f"mbsync {i + 1}: {mb_runs[-1].rate:,.0f} msg/s (CPU user "
                        f"{mb_runs[-1].user:.2f} s, system {mb_runs[-1].system:.2f} s); "
                        f"ratio {round_ratios[-1]:.2f}")
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    mbsync, mbsync_note = None, f"failed: {exc}"
                    say(f"mbsync {mbsync_note}")
        timers.uninstall()
        sync = sorted(runs, key=lambda r: r.throughput.seconds)[len(runs) // 2]
        emails = Email.objects.filter(mailbox=mailbox)
        stored = emails.count()
        links = EmailLink.objects.filter(email__mailbox=mailbox)
        link_counts = (links.filter(contact__isnull=False).count(),
                       links.filter(deal__isnull=False).count(),
                       links.filter(lead__isnull=False).count())
        linked_emails = links.values("email").distinct().count()
        thread_count = Thread.objects.filter(mailbox=mailbox).count()

        adapter_runs = [adapter_only(mailbox) for _ in range(2)]
        adapter = median_run(adapter_runs)
        say(f"adapter only: {adapter.rate:,.0f} msg/s")
        ceiling_runs = [ceiling_fetch(server, user, args.fetch_chunk) for _ in range(3)]
        ceiling = median_run(ceiling_runs)
        plain = median_run([ceiling_fetch(server, user, args.fetch_chunk, tls=False)
                            for _ in range(3)])
        say(f"ceiling: {ceiling.rate:,.0f} msg/s over TLS, {plain.rate:,.0f} msg/s plain")

        mbsync_result: Throughput | None = median_run(mb_runs) if mb_runs else None
        if mb_runs and len(mb_runs) == len(runs):
            mbsync_note = (f"median of {len(mb_runs)}, each right after a Mailroom run; Mailroom/mbsync "
                           f"per round: " + ", ".join(f"{r:.2f}" for r in round_ratios)
                           + "; mbsync CPU user/system per round: "
                           + ", ".join(f"{r.user:.2f}/{r.system:.2f}" for r in mb_runs) + " s")

        resync, unchanged = no_change_resync(mailbox, args.resync_runs)
        resync_open = no_change_check_open(mailbox, args.resync_runs)
        reference = [status_roundtrip(server, user) for _ in range(args.resync_runs)]
        say(f"no-change resync: median {ms(statistics.median(resync))}")

        parse, parse_failed, parse_left = parse_pending(
            mailbox, max(deadline, time.perf_counter() + 60))
        say(f"body parsing: {parse.rate:,.0f} msg/s")

        profile_text = ""
        if args.profile:
            reset_mail_tables()
            mailbox = new_mailbox(owner, server, user)
            profile_text = profile_sync(mailbox, args.profile_top)
            say("profiled one initial sync")

        idle_push, idle_stored, idle_note = [], [], ""
        if not (ROOT / "mailsync" / "idle.py").exists():
            idle_note = "mailsync/idle.py does not exist"
        else:
            mailbox.refresh_from_db()
            idle_push, idle_stored, idle_note = measure_idle(mailbox, server, user,
                                                             args.idle_rounds, timeout=15.0)
            say(f"idle: {len(idle_push)} rounds" + (f" ({idle_note})" if idle_note else ""))

        # -- the figures ------------------------------------------------------------------------
        mb = stats.bytes / 1e6
        print()
        print(f"Mailroom IMAP sync benchmark: {written:,} messages, {mb:,.1f} MB "
              f"(avg {stats.bytes / written / 1024:.1f} KiB; {stats.with_attachments} with "
              f"attachments; {stats.replies} replies; charsets "
              + ", ".join(f"{k} {v}" for k, v in sorted(stats.charsets.items())) + ")")
        print(machine_line(dovecot_version, mbsync, load))
        print(f"fill: Maildir files + doveadm force-resync, {fill_seconds:.1f} s "
              f"({written / fill_seconds:,.0f} msg/s); all over IMAPS (TLS, verified) on 127.0.0.1")
        print()
        print(f"  {'':<44}{'msg/s':>9}{'MB/s':>9}{'time':>10}  ratio / notes")
        print(row("ceiling: imaplib UID FETCH BODY.PEEK[]", ceiling,
                  f"1.00 (median of 3, {args.fetch_chunk} UIDs per FETCH)"))
        print(row("  same, plain IMAP (no TLS), reference only", plain,
                  f"{plain.rate / ceiling.rate:.2f}; TLS is the ceiling's limit here"))
        print(row("Mailroom adapter only (IMAPClient, no DB)", adapter,
                  f"{adapter.rate / ceiling.rate:.2f} of ceiling"))
        print(row("Mailroom initial sync -> PostgreSQL", sync.throughput,
                  f"{sync.throughput.rate / ceiling.rate:.3f} of ceiling (median of {len(runs)}: "
                  + ", ".join(f"{r.throughput.seconds:.1f}" for r in runs) + " s)"))
        if mbsync_result is not None:
            print(row("mbsync -> Maildir (defaults, fsync on)", mbsync_result,
                      f"Mailroom/mbsync {statistics.median(round_ratios):.2f} "
                      f"({mbsync_note})"))
        else:
            print(f"  {'mbsync':<44}{'-':>9}{'-':>9}{'-':>10}  mbsync: {mbsync_note}")
        print(row("body parsing (emails_parse_pending)", parse,
                  f"after sync, off the hot path; {parse_failed} failed, {parse_left} left"))
        print()
        print(f"  no-change resync (ImapSync.run, median of {len(resync)}): "
              f"{ms(statistics.median(resync))} (min {ms(min(resync))}, max {ms(max(resync))})"
              + ("" if unchanged else "  WARNING: some runs found changes")
              + f"; bare connect+LOGIN+2xSTATUS+LOGOUT {ms(statistics.median(reference))}")
        print(f"  no-change resync on an open connection (ImapSync.run(session=...), median of "
              f"{len(resync_open)}): {ms(statistics.median(resync_open))}")
        first = runs[0]
        print(f"  peak RSS during the first initial sync (VmHWM): {first.rss_peak:.0f} MB, growth "
              f"+{first.rss_peak - first.rss_before:.0f} MB over {first.rss_before:.0f} MB before, "
              f"{first.rss_after:.0f} MB after; later runs peak "
              + ", ".join(f"{r.rss_peak:.0f}" for r in runs[1:]) + " MB")
        print(f"  peak RSS of the fetch process (a child of the worker, mailsync/sync/fetcher.py): "
              f"{child_peak:.0f} MB")
        if sync.cpu:
            print("  CPU seconds per process, median initial sync: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sync.cpu.items())
                  + f" = {sum(sync.cpu.values()):.2f} (on {os.cpu_count()} cores)")
        if mb_runs and len(mb_dovecot) == len(mb_runs):
            mb_mid = sorted(range(len(mb_runs)), key=lambda k: mb_runs[k].seconds)[len(mb_runs) // 2]
            m = mb_runs[mb_mid]
            print(f"  CPU seconds, median mbsync run: mbsync user {m.user:.2f}, system {m.system:.2f}, "
                  f"Dovecot {mb_dovecot[mb_mid]:.2f} = {m.user + m.system + mb_dovecot[mb_mid]:.2f}")
        if idle_push:
            print(f"  IDLE: delivery -> on_change median {ms(statistics.median(idle_push))} "
                  f"(max {ms(max(idle_push))}); delivery -> stored by ImapSync median "
                  f"{ms(statistics.median(idle_stored))} (n={len(idle_push)})"
                  + (f"; {idle_note}" if idle_note else ""))
        else:
            print(f"  idle: not measured ({idle_note})")
        ok = stored == written and sync.failed == 0
        verdict = "OK" if ok else f"MISMATCH: expected {written}, {sync.failed} failed"
        print(f"  stored: {stored:,} emails ({verdict}), "
              f"{thread_count:,} threads, {linked_emails:,} emails linked "
              f"(links: {link_counts[0]:,} contact, {link_counts[1]:,} deal, "
              f"{link_counts[2]:,} lead); "
              f"corpus: {stats.from_contacts + stats.from_leads:,} from CRM people")

        total = sync.throughput.seconds
        print()
        print(f"where the time goes (median initial sync, {total:.2f} s wall; indented rows are "
              f"part of the row above; measured by wrapping functions at run time):")
        print("  (a download this large is fetched and prepared in the fetch process, a child of the "
              "worker: its work is not in\n   these rows, which time this process only; ingest_batch "
              "is the storing, and the rest mostly waits for the child)")
        print("\n".join(breakdown(total, sync.phases, sync.calls)))
        sql_total = sum(sync.queries.seconds.values())
        sql_count = sum(sync.queries.count.values())
        print(f"  SQL: {sql_count:,} statements, {sql_total:.2f} s "
              f"({sql_total / total * 100:.0f} % of the sync; COMMIT not included); the biggest:")
        for key, seconds, count in sync.queries.top(8):
            print(f"    {key:<50}{seconds:>7.2f} s  {count:>6,} statements")
        if profile_text:
            print()
            print(profile_text)
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        if server is not None:
            server.stop()
        if django_ready and not args.keep:
            with contextlib.suppress(Exception):
                drop_database(args.database_url)
        if args.keep:
            say(f"kept {workdir} and the database")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
