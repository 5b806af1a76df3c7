"""IMAP adapter over IMAPClient: connect, list, status, fetch, change flags, move, delete.

Pure I/O: it knows nothing of the ORM. The engine in ``mailsync.sync`` decides what to fetch.
"""
from __future__ import annotations

import functools
import imaplib
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, timezone
from types import TracebackType

from imapclient import IMAPClient
from imapclient.imap4 import IMAP4WithTimeout
from imapclient.tls import IMAP4_TLS
from imapclient.tls import wrap_socket as tls_wrap_socket
from imapclient.exceptions import IMAPClientError, LoginError
from imapclient.imapclient import seq_to_parenstr_upper
from imapclient.datetime_util import parse_to_datetime
from imapclient.response_parser import parse_fetch_response

from ..exceptions import MailAuthError, MailConfigError, MailConnectionsLimit, MailProtocolError, MailTLSError
from .base import (
    CopiedMessages,
    FetchedMessage,
    FolderStatus,
    ServerSettings,
    not_this_protocol,
    open_checked_socket,
    tls_context,
    translate_network_error,
)
from .tls import MemoryTLS

log = logging.getLogger(__name__)

# Names of the Sent, Trash and Junk folders of servers without SPECIAL-USE (RFC 6154), as
# mail programs and providers create them in the languages our users write in, matched on the
# last part of the folder's path ("INBOX.Sent Items", "[Gmail]/Sent Mail"), case-insensitively.
# In order of preference when a mailbox has several.
SENT_NAMES = ("Sent", "Sent Items", "Sent Messages", "Sent Mail", "Sent-Mail", "Gesendet",
              "Gesendete Elemente", "Gesendete Objekte", "Envoyés", "Éléments envoyés",
              "Messages envoyés", "Enviados", "Elementos enviados", "Itens enviados",
              "Posta inviata", "Inviata", "Elementi inviati", "Verzonden", "Verzonden items",
              "Skickat", "Skickade objekt", "Sendt", "Sendte elementer", "Wysłane",
              "Odeslaná pošta", "Отправленные")
TRASH_NAMES = ("Trash", "Deleted Items", "Deleted Messages", "Deleted", "Bin", "Papierkorb",
               "Gelöschte Elemente", "Gelöschte Objekte", "Corbeille", "Éléments supprimés",
               "Papelera", "Elementos eliminados", "Lixeira", "Itens excluídos", "Cestino",
               "Elementi eliminati", "Prullenbak", "Verwijderde items", "Papperskorgen",
               "Borttagna objekt", "Papirkurv", "Slettede elementer", "Kosz", "Koš", "Корзина",
               "Удаленные")
JUNK_NAMES = ("Junk", "Junk Email", "Junk E-mail", "Junk Mail", "Spam", "Bulk Mail", "Bulk",
              "Spamverdacht", "Junk-E-Mail", "Courrier indésirable", "Indésirables",
              "Correo no deseado", "Lixo eletrônico", "Posta indesiderata", "Ongewenste e-mail",
              "Skräppost", "Søppelpost", "Spam-Verdacht", "Nevyžádaná pošta", "Спам")
_BY_NAME = (("sent", SENT_NAMES), ("trash", TRASH_NAMES), ("junk", JUNK_NAMES))
SPECIAL_FLAGS = {b"\\Sent": "sent", b"\\Trash": "trash", b"\\Junk": "junk", b"\\Drafts": "drafts",
                 b"\\All": "all", b"\\Archive": "archive", b"\\Flagged": "flagged"}
# Never synced: deleted mail and spam are not customer conversations.
NEVER_SYNC = {"trash", "junk"}

_FETCH_ITEMS = [b"UID", b"FLAGS", b"RFC822.SIZE", b"INTERNALDATE", b"BODY.PEEK[]"]


def _utc(value: object) -> datetime | None:
    """INTERNALDATE in UTC (IMAPClient's own FixedOffset tzinfo cannot be pickled, and the
    fetch process hands messages over pickled)."""
    if not isinstance(value, datetime):
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _flags(raw: Iterable[bytes | str]) -> tuple[str, ...]:
    return tuple(
        sorted(f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f) for f in raw)
    )


def uid_ranges(uids: Sequence[int]) -> str:
    """Compress UIDs into an IMAP sequence set: [1,2,3,7] -> '1:3,7'.

    IMAPClient 4.1 rejects "1:*" in fetch() (FIELD-NOTES): we always send explicit sets.
    """
    ordered = sorted(set(uids))
    parts: list[str] = []
    start = prev = None
    for uid in ordered:
        if start is None:
            start = prev = uid
        elif uid == prev + 1:  # type: ignore[operator]
            prev = uid
        else:
            parts.append(f"{start}:{prev}" if start != prev else str(start))
            start = prev = uid
    if start is not None:
        parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts)


# The longest UID set put in one command. Servers bound a command line (Dovecot: 64 KB,
# imap_max_line_length, answered "BAD Too long argument"); RFC 7162 section 4 asks clients
# to keep lines under 8,192 octets. UIDs far apart (an old mailbox after years of
# deletions) do not compress into ranges: 20,000 of them are ~160 KB.
MAX_UID_SET_CHARS = 8000


def uid_sets(uids: Sequence[int], *, max_chars: int = MAX_UID_SET_CHARS) -> list[str]:
    """``uid_ranges`` cut into sets of at most ``max_chars`` characters, one per command."""
    sets: list[str] = []
    parts: list[str] = []
    length = 0
    for part in uid_ranges(uids).split(","):
        if parts and length + 1 + len(part) > max_chars:
            sets.append(",".join(parts))
            parts, length = [], 0
        length += len(part) + (1 if parts else 0)
        parts.append(part)
    if parts and parts != [""]:
        sets.append(",".join(parts))
    return sets


def _expand_uid_set(text: str) -> list[int]:
    """'3:5,9' -> [3, 4, 5, 9], in the order given (COPYUID pairs UIDs by position)."""
    uids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        start, end = int(low), int(high or low)
        uids.extend(range(start, end + 1) if start <= end else range(start, end - 1, -1))
    return uids


_FETCH_HEAD_RE = re.compile(rb"\d+ \((.*?) ?BODY\[\] \{(\d+)\}", re.S)
_FETCH_PLAIN_RE = re.compile(rb"\d+ \(([^{}]*)\)", re.S)
_FETCH_ITEM_RE = re.compile(
    rb'(UID|RFC822\.SIZE) (\d+)|MODSEQ \((\d+)\)|FLAGS \(([^()"{}\x00-\x1f]*)\)|INTERNALDATE "([^"]*)"(?: |\Z)'
)


def _special_by_name(folders: list[tuple[str, str]], delimiters: dict[str, str]) -> list[tuple[str, str]]:
    """Sent, Trash and Junk recognized by name where the server flags none of that kind: one
    folder per kind, the best-ranked name, a top-level folder before a nested one."""
    flagged = {special for _, special in folders if special}
    out = list(folders)
    for kind, names in _BY_NAME:
        if kind in flagged:
            continue
        rank = {n.casefold(): i for i, n in enumerate(names)}
        best: tuple[int, int, int] | None = None
        for index, (name, special) in enumerate(out):
            if special:
                continue
            delim = delimiters.get(name, "/")
            parts = name.split(delim) if delim else [name]
            if parts[0].upper() == "INBOX" and len(parts) > 1:
                parts = parts[1:]  # Courier-style "INBOX.Sent Items"
            leaf = parts[-1].strip().casefold()
            if leaf in rank:
                key = (len(parts) > 1 and not parts[0].startswith("["), rank[leaf], index)
                if best is None or key < best:
                    best = key
        if best is not None:
            name, _ = out[best[2]]
            out[best[2]] = (name, kind)
    return out


def parse_message_fetch(data: list) -> dict[int, dict] | None:
    """A ``UID FETCH`` reply in the shapes servers send for our commands, parsed with regular
    expressions: ``n (UID .. FLAGS (..) RFC822.SIZE .. INTERNALDATE ".." BODY[] {size}`` +
    literal + ``)`` for messages, ``n (UID .. FLAGS (..) MODSEQ (..))`` or
    ``n (UID .. RFC822.SIZE ..)`` without one (as imaplib hands them over, without ``* `` and
    ``FETCH``). IMAPClient's general tokenizer was ~20 % of the fetch's CPU on the bench and
    0.3 s per 2,000 sizes or flags. Anything else (other items, items after the literal,
    unsolicited responses without a UID) returns None: the caller falls back to IMAPClient."""
    parsed: dict[int, dict] = {}
    i, n = 0, len(data)
    while i < n:
        item = data[i]
        values: dict[bytes, object] = {}
        if isinstance(item, tuple):
            if not (len(item) == 2 and i + 1 < n and data[i + 1] == b")"):
                return None
            head, literal = item
            match = _FETCH_HEAD_RE.fullmatch(head)
            if match is None or int(match.group(2)) != len(literal):
                return None
            values[b"BODY[]"] = literal
            i += 2
        elif isinstance(item, bytes):
            match = _FETCH_PLAIN_RE.fullmatch(item)
            if match is None:
                return None
            i += 1
        else:
            return None
        if not _fetch_items(match.group(1), values):
            return None
        uid = values.get(b"UID")
        if not isinstance(uid, int):
            return None
        # Several responses for one UID are merged, as IMAPClient does: with QRESYNC a
        # server may send a flag update (UID, FLAGS, MODSEQ) for a message after its body.
        parsed.setdefault(uid, {}).update(values)
    return parsed


def _fetch_items(items: bytes, values: dict[bytes, object]) -> bool:
    pos = 0
    while pos < len(items):
        m = _FETCH_ITEM_RE.match(items, pos)
        if m is None:
            return False
        name, number, modseq, flags, date = m.groups()
        if name is not None:
            values[name] = int(number)
        elif modseq is not None:
            values[b"MODSEQ"] = (int(modseq),)
        elif flags is not None:
            values[b"FLAGS"] = tuple(flags.split())
        else:
            try:
                values[b"INTERNALDATE"] = parse_to_datetime(date, normalise=False)
            except ValueError:
                return False
        pos = m.end()
        if items[pos:pos + 1] == b" ":
            pos += 1
    return True


def _uid_fetch(client: IMAPClient, uids: Sequence[int], items: Sequence[bytes],
               modifiers: Sequence[str] | None = None, *, span: bool = False) -> dict[int, dict]:
    """``UID FETCH`` with a compressed UID set ("1:500,700"), in as many commands as the
    set needs to stay within a command line (``uid_sets``).

    IMAPClient 4.1's ``fetch()`` converts the requested set to ints to filter the reply, so it
    rejects ranges and would send 5,000 UIDs as 5,000 comma-separated numbers. This is its
    own body with the set compressed; the reply is filtered to the requested UIDs here.
    """
    wanted = set(uids)
    found: dict[int, dict] = {}
    # ``span``: one command for "lowest:highest" instead of the UIDs themselves, for a
    # CHANGEDSINCE fetch whose reply holds only what changed: a sparse set of 300,000 UIDs
    # is ~300 commands, each a round trip to a remote server, on every resync.
    sets = [f"{min(wanted)}:{max(wanted)}"] if span and wanted else uid_sets(uids)
    for uid_set in sets:
        args = ["UID", "FETCH", uid_set.encode("ascii"), seq_to_parenstr_upper(list(items))]
        if modifiers:
            args.append(seq_to_parenstr_upper(list(modifiers)))
        tag = client._imap._command(*args)
        typ, data = client._imap._command_complete("FETCH", tag)
        client._checkok("fetch", typ, data)
        typ, data = client._imap._untagged_response(typ, data, "FETCH")
        response = parse_message_fetch(data)
        if response is None:
            response = parse_fetch_response(data, client.normalise_times, True)
        # Unsolicited FETCH responses (other messages' flag changes) are dropped.
        for uid, values in response.items():
            if uid in wanted:
                found.setdefault(uid, {}).update(values)
    return found


def parse_uid_set(text: str, *, limit: int = 10_000_000) -> set[int]:
    """'41,43:45' -> {41, 43, 44, 45}; bounded so a hostile server cannot exhaust memory."""
    uids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition(":")
        try:
            a, b = int(low), int(high or low)
        except ValueError:
            continue
        a, b = min(a, b), max(a, b)
        if b - a > limit or len(uids) > limit:
            raise MailProtocolError("The server reported an implausibly large set of UIDs.")
        uids.update(range(a, b + 1))
    return uids


Connector = Callable[[float | None], socket.socket]

# imaplib refuses a reply line over 1 MB (its _MAXLINE), a bound against a server that never
# ends a line. But a UID SEARCH reply is one line holding every matching UID: ~125,000
# messages with 7-digit UIDs (an old Gmail mailbox) pass 1 MB, and the sync could never
# start. A million 10-digit UIDs (the longest there are) take 11 MB.
MAX_REPLY_LINE = 32 * 2**20


class _LongLines(imaplib.IMAP4):
    def readline(self) -> bytes:
        """imaplib's readline with the MAX_REPLY_LINE bound."""
        line = self.file.readline(MAX_REPLY_LINE + 1)
        if not line:
            raise self.abort("socket error: EOF")
        if len(line) > MAX_REPLY_LINE:
            raise self.error(f"got more than {MAX_REPLY_LINE} bytes")
        return line


class _PinnedIMAP4(_LongLines, IMAP4WithTimeout):
    """Plain IMAP (and STARTTLS, which imaplib wraps with server_hostname = the host name)
    over a socket from ``open_checked_socket``."""

    def __init__(self, host: str, port: int, timeout: float | None, connector: Connector) -> None:
        self._connector = connector
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return self._connector(self._timeout if timeout is None else timeout)


class _PinnedIMAP4TLS(_LongLines, IMAP4_TLS):
    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 timeout: float | None, connector: Connector) -> None:
        self._connector = connector
        super().__init__(host, port, ssl_context, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = self._connector(self._timeout if timeout is None else timeout)
        try:
            return tls_wrap_socket(sock, self.ssl_context, self.host)
        except BaseException:
            sock.close()
            raise


class _IMAP4MemoryTLS(_PinnedIMAP4TLS):
    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = self._connector(self._timeout if timeout is None else timeout)
        return MemoryTLS.over(sock, self.ssl_context, self.host)  # type: ignore[return-value]


class _Client(IMAPClient):
    """IMAPClient whose TCP connection comes from ``open_checked_socket`` (the SSRF check
    and the connect see the same address). ``memory_tls``: TLS over ``MemoryTLS`` (port
    993), large reads for the fetch process's bulk download; not for IDLE, which polls the
    socket (records read into memory are invisible to a poll)."""

    def __init__(self, *args: object, connector: Connector, memory_tls: bool = False,
                 **kwargs: object) -> None:
        self._connector = connector
        self._memory_tls = memory_tls
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _create_IMAP4(self) -> imaplib.IMAP4:
        timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            cls = _IMAP4MemoryTLS if self._memory_tls else _PinnedIMAP4TLS
            return cls(self.host, self.port, self.ssl_context, timeout, self._connector)
        return _PinnedIMAP4(self.host, self.port, timeout, self._connector)


class ImapSession:
    """One logged-in IMAP connection. Use as a context manager."""

    def __init__(self, settings: ServerSettings, *, memory_tls: bool = False) -> None:
        """``memory_tls``: TLS through memory BIOs (``mailsync.protocols.tls``) for a bulk
        download over SSL/TLS; never for a session that IDLEs."""
        self.settings = settings
        self.memory_tls = memory_tls
        self.client: IMAPClient | None = None
        self.capabilities: frozenset[bytes] = frozenset()
        self.qresync = False

    # -- connection ---------------------------------------------------------------------------
    def __enter__(self) -> ImapSession:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        """Connect and log in. A login refused for too many connections is tried again twice
        within a second: a server counts a connection for a moment after it closed, and the
        mailbox's own connections take turns (one closes, the next opens at once)."""
        for pause in LIMIT_RETRY_PAUSES:
            try:
                return self._connect_once()
            except MailConnectionsLimit:
                time.sleep(pause)
        self._connect_once()

    def _connect_once(self) -> None:
        s = self.settings
        connector = functools.partial(open_checked_socket, s)
        try:
            if s.security == "ssl":
                client = _Client(s.host, port=s.port, ssl=True, ssl_context=tls_context(),
                                 timeout=s.timeout, connector=connector, memory_tls=self.memory_tls)
            else:
                client = _Client(s.host, port=s.port, ssl=False, timeout=s.timeout,
                                 connector=connector)
                if s.security == "starttls":
                    if b"STARTTLS" not in client.capabilities():
                        client.shutdown()
                        # Never fall back to plain text when STARTTLS was asked for.
                        raise MailTLSError(
                            f"{s.host} does not offer STARTTLS on port {s.port}.",
                            hint="Use SSL/TLS (usually port 993) instead.",
                        )
                    try:
                        client.starttls(ssl_context=tls_context())
                    except imaplib.IMAP4.abort:
                        raise  # the connection was lost: transient
                    except imaplib.IMAP4.error as exc:
                        # Offered, then refused (NO/BAD): the same fix as not offered, and
                        # still never a plaintext login (POP3 says the same).
                        client.shutdown()
                        raise MailTLSError(
                            f"{s.host} refused STARTTLS on port {s.port}.",
                            hint="Use SSL/TLS (usually port 993) instead.",
                        ) from exc
            # Aware datetimes for INTERNALDATE (IMAPClient's default converts to naive local).
            client.normalise_times = False
            # IMAPClient 4.1 sets imaplib's debug level to 5, so imaplib formats a repr of
            # every literal (whole messages) for a log line that is then dropped: ~40 % of
            # the fetch time and tens of MB per batch (bench/README.md).
            if not logging.getLogger("imapclient").isEnabledFor(logging.DEBUG):
                client._imap.debug = 0
            self.client = client
        except (OSError, ssl.SSLError, IMAPClientError, imaplib.IMAP4.error) as exc:
            # A greeting that is no IMAP line at all (an SMTP port's "220 ..."): imaplib says
            # "unexpected response: b'220 ...'", which read as "the connection was lost".
            greeting = str(exc).partition("unexpected response: b")[2].strip("'\"")
            if isinstance(exc, imaplib.IMAP4.abort) and greeting:
                raise not_this_protocol("IMAP", s.host, s.port, greeting) from exc
            raise translate_network_error(exc, s.host) from exc
        self.login()

    def login(self) -> None:
        assert self.client is not None
        username, password = self.settings.username, self.settings.password
        try:
            if username.isascii() and password.isascii():
                self.client.login(username, password)
            else:
                # LOGIN's strings are ASCII (imaplib cannot send others: it was a 500);
                # AUTHENTICATE PLAIN carries UTF-8 (RFC 4616).
                if b"AUTH=PLAIN" not in self.client.capabilities():
                    self.close()
                    raise MailAuthError(
                        "The password or username has characters (such as ä, é or €) that "
                        "this server's login cannot take.",
                        hint="Use only ASCII letters, digits and punctuation in the password "
                             "(change it at the provider), or check the username.",
                    )
                self.client.plain_login(username, password)
        except LoginError as exc:
            text = str(exc)
            self.close()
            if _too_many_connections(text):
                raise MailConnectionsLimit(
                    "The mail server refused another connection: too many are open to this "
                    "account at once (mail apps, phones, other services).",
                    hint="It is retried by itself. If this lasts, close mail apps you no longer use.",
                ) from exc
            if "PRIVACYREQUIRED" in text or "plaintext" in text.lower():
                raise MailTLSError(
                    "The server refuses passwords over an unencrypted connection.",
                    hint="Choose SSL/TLS or STARTTLS.",
                ) from exc
            raise MailAuthError(
                "The server rejected the username or password.",
                hint=("If the account uses two-step verification (Gmail, Yahoo, iCloud, "
                      "Outlook), create an app-specific password and use it here."),
            ) from exc
        except (OSError, ssl.SSLError, imaplib.IMAP4.abort) as exc:
            raise translate_network_error(exc, self.settings.host) from exc
        try:
            self.capabilities = frozenset(self.client.capabilities())
            if self.has("ENABLE") and self.has("QRESYNC"):
                # QRESYNC (RFC 7162) implies CONDSTORE and reports expunges as VANISHED.
                self.qresync = b"QRESYNC" in self.client.enable("QRESYNC")
            elif self.has("ENABLE") and self.has("CONDSTORE"):
                self.client.enable("CONDSTORE")
        except (OSError, imaplib.IMAP4.error, IMAPClientError) as exc:
            raise translate_network_error(exc, self.settings.host) from exc

    def close(self) -> None:
        if self.client is None:
            return
        try:
            self.client.logout()
        except Exception:  # noqa: BLE001  (closing a dead connection must not mask the cause)
            try:
                self.client.shutdown()
            except Exception:  # noqa: BLE001
                pass
        self.client = None

    def has(self, capability: str) -> bool:
        return capability.encode() in self.capabilities

    def _call(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        """Run one IMAPClient call, mapping failures to our error hierarchy."""
        try:
            return fn(*args, **kwargs)
        except (socket.timeout, TimeoutError, OSError, ssl.SSLError, imaplib.IMAP4.abort) as exc:
            raise translate_network_error(exc, self.settings.host) from exc
        except (IMAPClientError, imaplib.IMAP4.error) as exc:
            raise MailProtocolError(f"The IMAP server refused a command: {exc}") from exc

    # -- folders ------------------------------------------------------------------------------
    def list_folders(self) -> list[tuple[str, str]]:
        """(name, special-use) for every selectable folder."""
        assert self.client is not None
        folders: list[tuple[str, str]] = []
        delimiters: dict[str, str] = {}
        for flags, delim, name in self._call(self.client.list_folders):
            if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                continue
            special = next((SPECIAL_FLAGS[f] for f in flags if f in SPECIAL_FLAGS), "")
            if not special and name.upper() == "INBOX":
                special = "inbox"
            folders.append((name, special))
            if delim:
                delimiters[name] = delim.decode() if isinstance(delim, bytes) else str(delim)
        return _special_by_name(folders, delimiters)

    def default_sync_folders(self) -> list[tuple[str, str]]:
        """INBOX and the Sent folder (SPECIAL-USE, else a common name: ``list_folders``)."""
        folders = self.list_folders()
        chosen = [(name, "inbox") for name, _ in folders if name.upper() == "INBOX"][:1]
        sent = [f for f in folders if f[1] == "sent"]
        return chosen + sent[:1]

    def sent_folder(self) -> str | None:
        return next((name for name, special in self.list_folders() if special == "sent"), None)

    def trash_folder(self) -> str | None:
        return next((name for name, special in self.list_folders() if special == "trash"), None)

    def status(self, folder: str) -> FolderStatus:
        """STATUS without selecting: the cheap no-change check."""
        assert self.client is not None
        items = [b"UIDVALIDITY", b"UIDNEXT", b"MESSAGES"]
        if self.has("CONDSTORE"):
            items.append(b"HIGHESTMODSEQ")
        reply = self._call(self.client.folder_status, folder, items)
        return FolderStatus(
            name=folder,
            uidvalidity=int(reply[b"UIDVALIDITY"]),
            uidnext=int(reply[b"UIDNEXT"]),
            exists=int(reply[b"MESSAGES"]),
            highestmodseq=int(reply[b"HIGHESTMODSEQ"]) if b"HIGHESTMODSEQ" in reply else None,
        )

    def select(self, folder: str, *, readonly: bool = True) -> FolderStatus:
        assert self.client is not None
        reply = self._call(self.client.select_folder, folder, readonly=readonly)
        # Only from a server that offers CONDSTORE: a HIGHESTMODSEQ seen elsewhere (Dovecot
        # keeps sending it once a mailbox has mod-sequences) would lead to CHANGEDSINCE, a
        # command such a server need not know (RFC 7162 3.1).
        modseq = reply.get(b"HIGHESTMODSEQ") if self.has("CONDSTORE") else None
        return FolderStatus(
            name=folder,
            uidvalidity=int(reply[b"UIDVALIDITY"]),
            uidnext=int(reply.get(b"UIDNEXT", 0)),
            exists=int(reply.get(b"EXISTS", 0)),
            highestmodseq=int(modseq) if modseq is not None else None,
        )

    def create_folder(self, name: str) -> None:
        assert self.client is not None
        self._call(self.client.create_folder, name)

    # -- reading ------------------------------------------------------------------------------
    def search_uids(self, *, since: date | None = None, above: int = 0) -> list[int]:
        """UIDs in the selected folder, optionally only newer than a day or above a UID."""
        assert self.client is not None
        criteria: list = []
        if above:
            criteria += ["UID", f"{above + 1}:*"]
        if since:
            criteria += ["SINCE", since]
        uids = self._call(self.client.search, criteria or "ALL")
        # "UID n:*" always matches the last message even when its UID is below n (RFC 3501
        # 6.4.8): filter, and never trust UIDNEXT as a cursor.
        return sorted(uid for uid in uids if uid > above)

    def fetch_messages(self, uids: Sequence[int], *, recheck: bool = True) -> list[FetchedMessage]:
        """Whole messages with BODY.PEEK (fetching never marks mail read).

        IMAP literals are read to their announced length or the read fails, so a message
        cut off mid-transfer never gets here. A body whose length differs from RFC822.SIZE
        (some servers, Exchange among them, report sizes that are off) is fetched once more
        on its own: the same bytes twice are the message; different bytes leave it out, as
        does a reply without a body (``missing_still_there`` tells them from expunges).
        """
        assert self.client is not None
        if not uids:
            return []
        reply = self._call(_uid_fetch, self.client, uids, _FETCH_ITEMS)
        messages = []
        for uid, data in reply.items():
            raw = data.get(b"BODY[]")
            if raw is None:  # expunged between SEARCH and FETCH
                continue
            size = int(data.get(b"RFC822.SIZE", len(raw)))
            if len(raw) != size and recheck:
                again = self.fetch_messages([uid], recheck=False)
                if not again or again[0].raw != raw:
                    log.warning("UID %s: %s of %s bytes, not the same when fetched again", uid,
                                len(raw), size)
                    continue
                log.info("UID %s: RFC822.SIZE %s but %s bytes, twice; taking the bytes", uid, size, len(raw))
            size = len(raw) if not recheck or len(raw) != size else size
            messages.append(
                FetchedMessage(
                    uid=int(uid),
                    flags=_flags(data.get(b"FLAGS", ())),
                    size=size,
                    internal_date=_utc(data.get(b"INTERNALDATE")),
                    raw=raw,
                )
            )
        messages.sort(key=lambda m: m.uid)
        return messages

    def missing_still_there(self, uids: Sequence[int]) -> list[int]:
        """Of UIDs a FETCH did not deliver, those the selected folder still holds (the rest
        were expunged meanwhile)."""
        assert self.client is not None
        if not uids:
            return []
        found: set[int] = set()
        for uid_set in uid_sets(uids):  # a set of UIDs far apart is long (uid_sets)
            found.update(self._call(self.client.search, ["UID", uid_set]))
        wanted = set(uids)
        return sorted(u for u in found if u in wanted)

    def search_header(self, field: str, values: Sequence[str]) -> list[int]:
        """UIDs in the selected folder whose header ``field`` contains any of ``values``
        (``SEARCH OR HEADER f v1 HEADER f v2 ...``: a substring match, RFC 3501 6.4.4; the
        caller checks what it gets). ASCII values only, 50 per command."""
        assert self.client is not None
        wanted = [v for v in values if v and v.isascii() and v.isprintable()]
        found: set[int] = set()
        for start in range(0, len(wanted), 50):
            chunk = wanted[start:start + 50]
            criteria: list = ["OR"] * (len(chunk) - 1)
            for value in chunk:
                criteria += ["HEADER", field, value]
            found.update(self._call(self.client.search, criteria))
        return sorted(found)

    def fetch_headers(self, uids: Sequence[int]) -> list[FetchedMessage]:
        """Only the header block of messages too large to import whole (BODY.PEEK[HEADER])."""
        assert self.client is not None
        if not uids:
            return []
        reply = self._call(_uid_fetch, self.client, uids,
                           [b"UID", b"FLAGS", b"RFC822.SIZE", b"INTERNALDATE", b"BODY.PEEK[HEADER]"])
        messages = [
            FetchedMessage(
                uid=int(uid), flags=_flags(data.get(b"FLAGS", ())),
                size=int(data.get(b"RFC822.SIZE", 0)), internal_date=_utc(data.get(b"INTERNALDATE")),
                raw=data[b"BODY[HEADER]"], truncated=True,
            )
            for uid, data in reply.items() if data.get(b"BODY[HEADER]") is not None
        ]
        messages.sort(key=lambda m: m.uid)
        return messages

    def fetch_sizes(self, uids: Sequence[int]) -> dict[int, int]:
        assert self.client is not None
        if not uids:
            return {}
        reply = self._call(_uid_fetch, self.client, uids, [b"RFC822.SIZE"])
        return {int(uid): int(data.get(b"RFC822.SIZE", 0)) for uid, data in reply.items()}

    def fetch_changes(
        self, uids: Sequence[int], *, changed_since: int
    ) -> tuple[dict[int, tuple[str, ...]], set[int]]:
        """QRESYNC: flags changed since a mod-sequence and the UIDs expunged since, in one
        command per UID set (``UID FETCH set (FLAGS) (CHANGEDSINCE n VANISHED)``, RFC 7162
        3.2.6; the VANISHED responses of all of them are collected)."""
        assert self.client is not None and self.qresync
        if not uids:
            return {}, set()
        self.client._imap.untagged_responses.pop("VANISHED", None)
        # One command over the known UIDs' span: the reply holds only what changed or
        # vanished since (UIDs in the span that are not ours are dropped below).
        reply = self._call(_uid_fetch, self.client, uids, [b"FLAGS"],
                           [f"CHANGEDSINCE {changed_since}", "VANISHED"], span=True)
        vanished: set[int] = set()
        for line in self.client._imap.untagged_responses.pop("VANISHED", []):
            text = line.decode("ascii", "replace") if isinstance(line, bytes) else str(line)
            vanished |= parse_uid_set(text.replace("(EARLIER)", "").strip())
        flags = {int(uid): _flags(data.get(b"FLAGS", ())) for uid, data in reply.items()}
        return flags, vanished & set(uids)

    def fetch_flags(
        self, uids: Sequence[int], *, changed_since: int | None = None, span: bool = False
    ) -> dict[int, tuple[str, ...]]:
        """Flags of the given UIDs; with CONDSTORE only those changed since a mod-sequence
        (asked for over the UIDs' span in one command: the reply holds only the changes).
        ``span``: asked for as "lowest:highest" in any case (the caller knows the span holds
        few other messages); the reply is still filtered to ``uids``."""
        assert self.client is not None
        if not uids:
            return {}
        modifiers = [f"CHANGEDSINCE {changed_since}"] if changed_since is not None else None
        reply = self._call(_uid_fetch, self.client, uids, [b"FLAGS"], modifiers,
                           span=span or changed_since is not None)
        return {int(uid): _flags(data.get(b"FLAGS", ())) for uid, data in reply.items()}

    # -- changing -----------------------------------------------------------------------------
    def add_flags(self, uids: Sequence[int], flags: Sequence[str]) -> None:
        assert self.client is not None
        self._call(self.client.add_flags, list(uids), list(flags), silent=True)

    def remove_flags(self, uids: Sequence[int], flags: Sequence[str]) -> None:
        assert self.client is not None
        self._call(self.client.remove_flags, list(uids), list(flags), silent=True)

    def move(self, uids: Sequence[int], destination: str) -> CopiedMessages | None:
        """UID MOVE (RFC 6851), else COPY + \\Deleted + UID EXPUNGE (UIDPLUS), else COPY +
        \\Deleted only: a bare EXPUNGE would also destroy every other message the user had
        marked \\Deleted in their mail client.

        Returns the new UIDs when the server reports them (UIDPLUS COPYUID), else None.
        """
        assert self.client is not None
        # imaplib files response codes by name and keeps them across commands: drop stale ones.
        self.client._imap.untagged_responses.pop("COPYUID", None)
        if self.has("MOVE"):
            self._call(self.client.move, list(uids), destination)
            return self._copyuid()
        self._call(self.client.copy, list(uids), destination)
        copied = self._copyuid()
        self._call(self.client.add_flags, list(uids), [b"\\Deleted"], silent=True)
        if self.has("UIDPLUS"):
            self._call(self.client.uid_expunge, list(uids))
        return copied

    def _copyuid(self) -> CopiedMessages | None:
        """Parse "[COPYUID <uidvalidity> <source set> <destination set>]" (RFC 4315 3)."""
        assert self.client is not None
        codes = self.client._imap.untagged_responses.pop("COPYUID", None)
        if not codes:
            return None
        try:
            text = codes[-1].decode("ascii") if isinstance(codes[-1], bytes) else str(codes[-1])
            uidvalidity, source, dest = text.split()[:3]
            pairs = dict(zip(_expand_uid_set(source), _expand_uid_set(dest), strict=True))
            return CopiedMessages(uidvalidity=int(uidvalidity), uids=pairs)
        except (ValueError, UnicodeDecodeError):
            log.info("unparseable COPYUID response code")
            return None

    def expunge(self, uids: Sequence[int]) -> None:
        """\\Deleted + UID EXPUNGE (RFC 4315) of just these UIDs. Without UIDPLUS only the
        flag is set (the user's client expunges): a bare EXPUNGE would also destroy every
        other message marked \\Deleted in that folder."""
        assert self.client is not None
        self._call(self.client.add_flags, list(uids), [b"\\Deleted"], silent=True)
        if self.has("UIDPLUS"):
            self._call(self.client.uid_expunge, list(uids))

    def append(self, folder: str, raw: bytes, flags: Sequence[str] = (),
               when: datetime | None = None) -> None:
        assert self.client is not None
        crlf = raw.count(b"\r\n")
        if crlf == raw.count(b"\n") == raw.count(b"\r"):
            # Line ends are CRLF already (mail the CRM built): the literal goes as it is.
            # imaplib's append rewrites every line end with a regular expression first,
            # ~4 times a large mail in memory at once (issue 3: worker < 200 MB).
            self._call(self._append_as_is, folder, raw, list(flags), when)
            return
        self._call(self.client.append, folder, raw, flags=list(flags), msg_time=when)

    def _append_as_is(self, folder: str, raw: bytes, flags: list[str], when: datetime | None) -> None:
        """imaplib's APPEND without its line-end rewriting (RFC 3501 6.3.11)."""
        assert self.client is not None
        imap = self.client._imap
        imap.literal = raw
        typ, data = imap._simple_command(
            "APPEND", self.client._normalise_folder(folder),
            f"({' '.join(flags)})" if flags else None,
            imaplib.Time2Internaldate(when) if when else None)
        if typ != "OK":
            raise IMAPClientError(f"APPEND failed: {data!r}")

    def noop(self) -> None:
        assert self.client is not None
        self._call(self.client.noop)


# Seconds between logins refused for too many connections, in one connect().
LIMIT_RETRY_PAUSES = (0.15, 0.6)


def _too_many_connections(text: str) -> bool:
    """A LOGIN refused because the account has too many connections open, not because of
    its password: Dovecot "[LIMIT] Maximum number of connections from user+IP exceeded",
    Gmail "[ALERT] Too many simultaneous connections", others "[LIMIT]"/"[UNAVAILABLE]"
    (RFC 5530). Taken for a wrong password, it stopped the mailbox until the user acted."""
    lowered = text.lower()
    return ("[limit]" in lowered or "[unavailable]" in lowered or "too many simultaneous connections" in lowered
            or "maximum number of connections" in lowered or "too many connections" in lowered)


def check_login(settings: ServerSettings) -> list[tuple[str, str]]:
    """Log in and list the folders that would be synced; raises a MailError if it fails."""
    with ImapSession(settings) as session:
        folders = session.default_sync_folders()
    if not folders:
        raise MailConfigError("The mailbox has no INBOX.", hint="Is this an IMAP account?")
    return folders
