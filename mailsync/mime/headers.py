"""Header-level parsing: the header block, encoded words, addresses, message ids and dates.

Everything here is bounded and total: functions return a best effort and a note, never raise.
We split the header block ourselves instead of using `email.parser` because the stdlib returns
`Header` objects for raw 8-bit values (RFC 6532), has no size bounds and is slower on the hot
path; the stdlib is still used for what it does well (`getaddresses`, RFC 2231 parameters).
"""
from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import getaddresses, parsedate_tz

from mailsync.mime.charsets import decode_bytes, mostly_utf8, scrub

MAX_HEADER_BYTES = 1 << 20  # 1 MiB: far above any real header block (long References included)
MAX_ADDRESSES = 1_000  # per header; a 20,000-address To costs seconds in getaddresses
MAX_ADDRESS_CHARS = 64 * 1024  # 1,000 real addresses with names fit; getaddresses is ~1 µs/char
MAX_SUBJECT_CHARS = 1_000
MAX_ID_CHARS = 995  # RFC 5322 §2.1.1: a line is at most 998 chars, so is a msg-id with its <>
MAX_REFERENCES = 100
MAX_IN_REPLY_TO = 10

# RFC 5322 §2.2 (field-name = printable ASCII except colon) with §4.5's obsolete WSP before ":".
_FIELD_RE = re.compile(rb"([!-9;-~]+)[ \t]*:")
_CHARSET_PARAM_RE = re.compile(rb"""charset\s*=\s*["']?([A-Za-z0-9._:+-]{1,40})""", re.I)
_LENIENT_FIELD_RE = re.compile(rb"[^\s:]+[ \t]*:")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_WSP_RUN_RE = re.compile(r"\s+")
# RFC 2047 §2 encoded-word; the optional "*lang" suffix on the charset is RFC 2231 §5.
_ENCODED_WORD_RE = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_DELETE = bytes(sorted(set(range(256)) - set(_B64_ALPHABET)))
_B64_DELETE_KEEP_PAD = bytes(sorted(set(range(256)) - set(_B64_ALPHABET + b"=")))
_B64_PIECES = re.compile(rb"[^=]+=*|=+")


@dataclass
class HeaderBlock:
    """The raw header fields of one entity: lower-case name -> unfolded values (bytes) in order."""

    fields: dict[str, list[bytes]]
    body_offset: int
    defects: list[str] = field(default_factory=list)
    # Charset to try for raw 8-bit header values: this entity's Content-Type charset.
    charset_hint: str | None = None

    def first(self, name: str) -> bytes | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def text(self, name: str, fallback_charset: str | None = None) -> str | None:
        """First value of `name` as str (not RFC 2047-decoded), NUL and controls removed."""
        raw = self.first(name)
        if raw is None:
            return None
        return header_bytes_to_str(raw, fallback_charset or self.charset_hint)

    def texts(self, name: str, fallback_charset: str | None = None) -> list[str]:
        hint = fallback_charset or self.charset_hint
        return [header_bytes_to_str(v, hint) for v in self.fields.get(name, ())]


def without_fields(head: bytes, names: frozenset[bytes] | set[bytes]) -> bytes:
    """A CRLF header block (no empty line at its end) without the fields named in ``names``
    (lower-case), folded continuation lines included."""
    kept: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field above
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() in names
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept)


def split_header_block(raw: bytes, limit: int = MAX_HEADER_BYTES) -> HeaderBlock:
    """Split the header block (up to the first empty line) into unfolded fields."""
    fields: dict[str, list[bytes]] = {}
    defects: list[str] = []
    n = len(raw)
    end = min(n, limit)
    view = raw[:end] if end < n else raw
    if b"\n" not in view and b"\r" in view:
        # Bare-CR line ends (classic Mac): same length, so offsets still index `raw`.
        view = view.replace(b"\r", b"\n")
        defects.append("bare CR line endings")
    pos = 0
    if view.startswith(b"From "):
        # An mbox "From " separator line (RFC 4155) is not a header field.
        nl = view.find(b"\n")
        pos = end if nl == -1 else nl + 1
    name: str | None = None
    chunks: list[bytes] = []
    body_offset = -1

    def note(defect: str) -> None:
        if defect not in defects:
            defects.append(defect)

    def flush() -> None:
        if name:  # "" marks a skipped invalid field
            value = b"".join(chunks).strip(b" \t\r")
            fields.setdefault(name, []).append(value)

    while pos < end:
        nl = view.find(b"\n", pos, end)
        line_end, next_pos = (end, end) if nl == -1 else (nl, nl + 1)
        line = view[pos:line_end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            body_offset = next_pos
            break
        if line[0] in (0x20, 0x09):
            # RFC 5322 §2.2.3 unfolding: CRLF + WSP is just the WSP. Whitespace-only lines are
            # obsolete folding (§4.2), so they continue the field too.
            if name is not None:
                chunks.append(line)
            else:
                note("continuation line before any header")
        else:
            m = _FIELD_RE.match(line)
            if m is None and _LENIENT_FIELD_RE.match(line):
                # A field whose name breaks RFC 5322 §2.2 (8-bit, say): skip it, keep reading.
                flush()
                note("invalid header field name skipped")
                name, chunks = "", []
                pos = next_pos
                continue
            if m is None:
                # Not a header field (RFC 5322 §2.2): like the stdlib, take it as the body's
                # first line, which is what the sender most likely meant.
                defects.append("header block not ended by an empty line")
                body_offset = pos
                break
            flush()
            name = m.group(1).decode("ascii").lower()
            chunks = [line[m.end():]]
        pos = next_pos
    flush()
    if body_offset < 0:
        if end < n:
            defects.append(f"header block over {limit} bytes; truncated")
            ends = [i + len(sep) for sep in (b"\n\n", b"\n\r\n") if (i := raw.find(sep, end)) >= 0]
            body_offset = min(ends) if ends else n
        else:
            body_offset = n
    content_type = fields.get("content-type")
    hint_match = _CHARSET_PARAM_RE.search(content_type[0]) if content_type else None
    hint = hint_match.group(1).decode("ascii") if hint_match else None
    return HeaderBlock(fields=fields, body_offset=body_offset, defects=defects, charset_hint=hint)


def header_bytes_to_str(value: bytes, fallback_charset: str | None = None) -> str:
    """Decode a raw header value: ASCII, else UTF-8 (RFC 6532 §3.2), else the body's charset."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            # Not RFC 6532: UTF-8 cut mid-character, or legacy mailers writing raw 8-bit in the
            # body's charset. No RFC covers this; guess in that order, then cp1252.
            mostly = mostly_utf8(value)
            if mostly is not None:
                text = mostly
            else:
                text, _ = decode_bytes(value, fallback_charset)
    if "\x00" in text:
        text = text.replace("\x00", "")
    if _CONTROL_RE.search(text):
        text = _CONTROL_RE.sub(" ", text)
    return text


def b64decode_lenient(data: bytes) -> bytes:
    """Base64 that skips junk characters and repairs padding (RFC 2045 §6.8 says ignore them).
    Data padded in pieces ("SGk=" then "IQ==", as some senders write each line) is decoded
    piece by piece: the padding ends a piece."""
    pieces = _B64_PIECES.findall(data.translate(None, _B64_DELETE_KEEP_PAD))
    if len(pieces) > 1:
        return b"".join(_b64_piece(p) for p in pieces)
    return _b64_piece(data)


def _b64_piece(data: bytes) -> bytes:
    clean = data.translate(None, _B64_DELETE)
    rem = len(clean) % 4
    if rem == 1:
        clean = clean[:-1]  # a lone sextet does not make a byte
    elif rem:
        clean += b"=" * (4 - rem)
    try:
        return binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return b""


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words in unstructured text (subjects, display names)."""
    if "=?" not in text:
        return text
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    last = 0

    def flush() -> None:
        nonlocal pending, pending_charset
        if pending_charset is not None:
            decoded, _ = decode_bytes(bytes(pending), pending_charset)
            out.append(decoded)
        pending = bytearray()
        pending_charset = None

    for m in _ENCODED_WORD_RE.finditer(text):
        gap = text[last:m.start()]
        # RFC 2047 §6.2: white space between adjacent encoded words is not displayed.
        if not (pending_charset is not None and gap.strip() == ""):
            flush()
            out.append(gap)
        charset, encoding, payload = m.group(1).lower(), m.group(2).upper(), m.group(3)
        raw = payload.encode("utf-8", "replace")
        data = b64decode_lenient(raw) if encoding == "B" else binascii.a2b_qp(raw, header=True)
        if charset != pending_charset:
            # Words of one charset are joined before decoding: encoders split a multibyte
            # character across two words (illegal by RFC 2047 §5 but common).
            flush()
            pending_charset = charset
        pending += data
        last = m.end()
    flush()
    out.append(text[last:])
    return "".join(out)


def clean_line(text: str, max_chars: int | None = None) -> str:
    """One display line: controls and runs of white space to single spaces, NUL removed."""
    text = _WSP_RUN_RE.sub(" ", _CONTROL_RE.sub(" ", text.replace("\x00", ""))).strip()
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars].rstrip()
    return scrub(text)


def decode_unstructured(value: str, max_chars: int = MAX_SUBJECT_CHARS) -> str:
    """Decode a Subject-like header: bounded, RFC 2047-decoded, one clean line."""
    limit = max_chars * 16  # an encoded character costs at most ~12 input chars in Q or B
    if len(value) > limit:
        cut = value.rfind(" ", 0, limit)
        value = value[: cut if cut > 0 else limit]
    return clean_line(decode_words(value), max_chars)


# --- addresses -------------------------------------------------------------------------------

_ADDR_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"?|\((?:[^()\\]|\\.)*\)?|<[^<>]*>?|,|[^",(<]+', re.S)
_BARE_ADDR_RE = re.compile(r'<([^<>\s]+@[^<>\s]+)>|([^\s<>(),;:"]+@[^\s<>(),;:"]+)')
_PLAUSIBLE_LOCAL_RE = re.compile(r'^[^\s@<>()\[\],;:\\"]+$|^"[^"\s]+"$')
_LABEL = r"[^\s@<>()\[\],;:\\\"./]+"
_PLAUSIBLE_DOMAIN_RE = re.compile(rf"^(?:{_LABEL}\.)*{_LABEL}$|^\[[^\]\s]+\]$")


@dataclass(frozen=True)
class Address:
    """A mailbox from an address header."""

    name: str  # decoded display name ('' if none); NUL and CR/LF removed
    email: str  # addr-spec as written; domain lower-cased
    # Normalized for matching: lower-case, stripped; '' if not a plausible address. Computed
    # once, where the header is parsed (the sync's fetch process), and pickled along.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", _address_key(self.email))


def _address_key(address: str) -> str:
    email = address.strip().lower()
    if len(email) > 254 or email.count("@") != 1:
        return ""
    local, domain = email.split("@")
    # A fully qualified domain may end in a dot ("bank.example."): the same domain, so the
    # same contact and the same excluded domain.
    domain = domain.rstrip(".") if domain.endswith(".") and domain.strip(".") else domain
    if not _PLAUSIBLE_LOCAL_RE.match(local) or not _PLAUSIBLE_DOMAIN_RE.match(domain):
        return ""
    return f"{local}@{domain}"


# The shapes most address lists are made of, parsed without the stdlib's character-by-character
# parser (~4x faster; the sync parses every From/To/Cc): "Name <a@b>", "\"Last, First\" <a@b>",
# "<a@b>" and "a@b". Anything else (comments, groups, dots or specials in a name, quoted or
# non-ASCII addresses, obsolete routes, empty entries...) goes to getaddresses, and where the
# fast path answers it answers exactly what getaddresses would, strict or lax
# (tests/mailsync/mime/test_addresses_fast.py). No pattern here can backtrack more than
# linearly: one hostile header must not stall a sync.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_FAST_ADDR = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_FAST_WORD = r'[^\s()<>@,;:\\".\[\]\x00-\x1f\x7f]+'
_FAST_ENTRY_RE = re.compile(  # [ \t]*+: possessive, or blanks before a miss backtrack O(n^2)
    rf"""[ \t]*+(?:
        (?P<bare>{_FAST_ADDR})
      | (?:(?P<quoted>"[^"\\\r\n]*")|(?P<words>{_FAST_WORD}(?:[ \t]+{_FAST_WORD})*))?[ \t]*<(?P<angle>{_FAST_ADDR})>
    )?[ \t]*(?:,|\Z)""",
    re.X,
)


def _fast_getaddresses(value: str) -> list[tuple[str, str]] | None:
    """``getaddresses([value])`` for lists made only of the simple shapes above, else None."""
    pairs: list[tuple[str, str]] = []
    pos, end = 0, len(value)
    match = _FAST_ENTRY_RE.match
    while pos < end:
        m = match(value, pos)
        if m is None or m.end() == pos:
            return None
        pos = m.end()
        if m["bare"]:
            pairs.append(("", m["bare"]))
        elif m["angle"]:
            quoted, words = m["quoted"], m["words"]
            name = quoted[1:-1] if quoted else " ".join(words.split()) if words else ""
            pairs.append((name, m["angle"]))
        else:
            # An empty entry ("a@b,,c@d", a trailing comma): strict getaddresses (Python 3.13,
            # 3.12.6+, 3.11.10+) rejects the whole list then, the lax one skips it; the stdlib
            # decides, so that this path answers what getaddresses answers on every Python.
            return None
    if pairs and value.rstrip(" \t").endswith(","):
        return None  # an empty entry after the last comma (see above)
    return pairs


def _cut_address_list(value: str, cap: int) -> str:
    commas = 0
    for m in _ADDR_TOKEN_RE.finditer(value):
        if m.group() == ",":
            commas += 1
            if commas >= cap:
                return value[: m.start()]
    return value


def parse_addresses(values: list[str], cap: int = MAX_ADDRESSES) -> tuple[list[Address], list[str]]:
    """Parse address-list header values (already str). Only display names are 2047-decoded."""
    defects: list[str] = []
    if not values:
        return [], defects
    joined = ", ".join(values)
    if joined.count(",") >= cap:
        joined = _cut_address_list(joined, cap)
        defects.append(f"address list cut at {cap} addresses")
    if len(joined) > MAX_ADDRESS_CHARS:
        cut = joined.rfind(",", 0, MAX_ADDRESS_CHARS)
        joined = joined[: cut if cut > 0 else MAX_ADDRESS_CHARS]
        defects.append(f"address list cut at {MAX_ADDRESS_CHARS} characters")
    try:
        pairs = _fast_getaddresses(joined)
        if pairs is None:
            pairs = getaddresses([joined])
    except Exception:
        # The stdlib parser recurses on nested comments and groups ("((((", "a:a:a:") and has
        # had IndexError bugs: fall back to picking out anything shaped like an addr-spec.
        defects.append("address list unparseable; addresses picked out")
        pairs = [("", m.group(1) or m.group(2)) for m in _BARE_ADDR_RE.finditer(joined)]
    out: list[Address] = []
    for name, addr in pairs:
        if not name and not addr:
            continue
        # RFC 2047 §5: encoded words may stand for a display name (phrase), never inside an
        # addr-spec; "=?utf-8?q?admin?=@example.com" stays literal so it cannot pose as admin@.
        display = clean_line(decode_words(name), 256) if name else ""
        email = clean_line(addr)
        if "@" in email:
            local, _, domain = email.rpartition("@")
            email = f"{local}@{domain.lower()}"
        out.append(Address(name=display, email=email))
        if len(out) >= cap:
            break
    return out, defects


# --- message ids -----------------------------------------------------------------------------

_ANGLES = str.maketrans({"\u2039": "<", "\u203a": ">", "\uff1c": "<", "\uff1e": ">"})
_BRACKETED_RE = re.compile(r"<([^<>]*)>")
# RFC 822-era clients wrote In-Reply-To as a phrase: '"John" <john@x>'s message of Mon, 1 Jan
# 2024 <id@x>' (RFC 5322 §4.5.4 obs-in-reply-to: phrases and msg-ids). The possessive marks
# the bracketed token before it as the author's address, not a msg-id.
_POSSESSIVE_RE = re.compile(r"\s*['\u2019`]s\b", re.I)


def normalize_message_id(value: str | None) -> str | None:
    """'<abc@host>' and its variants -> 'abc@host'; None if absent or garbage."""
    if not value:
        return None
    text = value.translate(_ANGLES)
    m = _BRACKETED_RE.search(text)
    if m:
        text = m.group(1)
    else:
        # RFC 5322 §3.6.4 wants <id-left@id-right>; real mail drops or unbalances the brackets
        # (Exchange writes "‹...>"), so keep the bare token.
        text = text.strip().strip("<>")
        if " " in text.strip():
            text = text.split()[0]
    # Folding whitespace inside a long id is obsolete syntax (RFC 5322 §4.5.4), never content.
    text = "".join(text.split()).replace("\x00", "")
    text = _CONTROL_RE.sub("", text)
    if not text or len(text) > MAX_ID_CHARS or text in ("<", ">"):
        return None
    return scrub(text)


def parse_id_list(value: str | None, cap: int) -> list[str]:
    """References / In-Reply-To: normalized ids, order kept, duplicates dropped, capped.

    When over `cap`, keeps the first id (thread root) and the most recent ones, which is how
    RFC 5322 §3.6.4 suggests trimming References.
    """
    if not value:
        return []
    text = value.translate(_ANGLES)
    found = [m.group(1) for m in _BRACKETED_RE.finditer(text)
             if not _POSSESSIVE_RE.match(text, m.end())]
    if not found and not _BRACKETED_RE.search(text):
        # No <...> at all: keep only tokens that look like ids, not "Your message of Monday"
        # nor "john@x's message".
        found = [t for t in re.split(r"[\s,]+", text)
                 if "@" in t and not _POSSESSIVE_RE.search(t)]
    ids: list[str] = []
    seen: set[str] = set()
    for item in found:
        norm = normalize_message_id(item)
        if norm and norm not in seen:
            seen.add(norm)
            ids.append(norm)
    if len(ids) > cap:
        ids = ids[:1] + ids[len(ids) - (cap - 1):] if cap > 1 else ids[:cap]
    return ids


# --- dates -----------------------------------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}
# RFC 5322 §4.3 obsolete zones; military letters count as -0000 ("unknown"), i.e. UTC.
_ZONES = {"ut": 0, "utc": 0, "gmt": 0, "z": 0, "edt": -4, "est": -5, "cdt": -5, "cst": -6,
          "mdt": -6, "mst": -7, "pdt": -7, "pst": -8}
_DATE_RE = re.compile(
    r"""^\s*(?:[A-Za-z]{2,9}\.?\s*,?\s*)?
    (?P<day>\d{1,2})[\s-]+(?P<mon>[A-Za-z]{3,9})\.?[\s-]+(?P<year>\d{1,5})\s+
    (?P<h>\d{1,2}):(?P<m>\d{1,2})(?::(?P<s>\d{1,2}))?(?:[.,]\d+)?
    \s*(?P<zone>[+-]\d{1,2}:?\d{2}|[A-Za-z]{1,5})?""",
    re.X,
)


def _year(token: str) -> int:
    """RFC 5322 §4.3: 2-digit years <50 are 20xx, else 19xx; 3-digit years add 1900."""
    y = int(token)
    if len(token) == 2:
        return y + 2000 if y < 50 else y + 1900
    if len(token) == 3:
        return y + 1900
    return y


def _zone_offset(zone: str | None) -> tuple[timedelta | None, str | None]:
    if not zone:
        return timedelta(0), "Date without time zone; UTC assumed"
    if zone[0] in "+-":
        digits = zone[1:].replace(":", "").rjust(4, "0")
        hours, minutes = int(digits[:-2]), int(digits[-2:])
        if hours > 23 or minutes > 59:
            return timedelta(0), "Date zone out of range; UTC assumed"
        delta = timedelta(hours=hours, minutes=minutes)
        return (-delta if zone[0] == "-" else delta), None
    z = zone.lower()
    if z in _ZONES:
        return timedelta(hours=_ZONES[z]), None
    if len(z) == 1:
        return timedelta(0), None  # military zone: RFC 5322 §4.3 says treat as -0000
    return timedelta(0), "Date zone unknown; UTC assumed"


def parse_date(value: str | None) -> tuple[datetime | None, str | None]:
    """RFC 5322 §3.3 date-time (with §4.3 obsolete forms) -> aware UTC datetime, or None."""
    if not value:
        return None, None
    value = value[:200]
    m = _DATE_RE.match(value)
    try:
        if m:
            mon = _MONTHS.get(m.group("mon")[:3].lower())
            if mon is None:
                return None, "Date month unknown"
            year = _year(m.group("year"))
            # RFC 5322 §3.3: "the year MUST be 1900 or later".
            if year < 1900 or year > 9999:
                return None, "Date year impossible"
            second = min(int(m.group("s") or 0), 59)  # :60 is a leap second (RFC 5322 §3.3)
            offset, note = _zone_offset(m.group("zone"))
            local = datetime(year, mon, int(m.group("day")), int(m.group("h")), int(m.group("m")),
                             second)
            return (local - offset).replace(tzinfo=timezone.utc), note
        # Formats outside RFC 5322 (asctime, ISO 8601) seen from scripts and broken clients.
        parts = parsedate_tz(value)
        if parts is not None and parts[0] >= 1900:
            local = datetime(*parts[:6])
            return (local - timedelta(seconds=parts[9] or 0)).replace(tzinfo=timezone.utc), None
        iso = datetime.fromisoformat(value.strip())
        if iso.year < 1900:
            return None, "Date year impossible"
        if iso.tzinfo is None:
            return iso.replace(tzinfo=timezone.utc), "Date without time zone; UTC assumed"
        return iso.astimezone(timezone.utc), None
    except (ValueError, OverflowError, TypeError, IndexError):
        return None, "Date unparseable"
