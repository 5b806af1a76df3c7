"""Full MIME parse: bytes -> text, html and attachments. Iterative, bounded, never raises.

The MIME tree is walked with an explicit stack rather than the stdlib parser, which recurses
(RecursionError at ~3,000 levels) and parses every part before we could stop it. The stdlib
still parses Content-Type/Content-Disposition parameters (RFC 2231) for us.
"""
from __future__ import annotations

import binascii
import logging
import mimetypes
import re
from dataclasses import dataclass, replace
from email.message import Message
from urllib.parse import unquote

from mailsync.mime.charsets import decode_bytes, mostly_utf8
from mailsync.mime.envelope import Envelope, _coerce_bytes, envelope_from_block, parse_envelope
from mailsync.mime.filenames import safe_filename
from mailsync.mime.headers import (
    MAX_HEADER_BYTES,
    HeaderBlock,
    b64decode_lenient,
    decode_words,
    normalize_message_id,
    split_header_block,
)
from mailsync.mime.sanitize import html_to_text

MAX_DEFECTS = 100
_PART_LIMIT = "part limit reached while splitting a multipart"
# RFC 2045 §5.1 / RFC 6838 §4.2: type and subtype are restricted names.
_MEDIA_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
_EMBEDDED_MESSAGE_TYPES = ("message/rfc822", "message/global")  # message/global: RFC 6532 §3.5
# The type/subtype at the start of a Content-Type the stdlib could not split: RFC 2045 §5.1
# allows comments and white space around the tokens ("text/plain (body); charset=..."), and
# senders drop the ";" before the parameters ("text/plain charset=utf-8").
_LEADING_MEDIA_TYPE_RE = re.compile(
    r"^\s*([a-z0-9][a-z0-9!#$&^_.+-]{0,126})\s*/\s*([a-z0-9][a-z0-9!#$&^_.+-]{0,126})(?=[\s(;,]|$)")
_BOUNDARY_IN_TYPE_RE = re.compile(r"""\sboundary\s*=\s*(?:"([^"]{1,70})"|([^\s";]{1,70}))""", re.I)
_CHARSET_IN_TYPE_RE = re.compile(r"""charset\s*=\s*["']?([A-Za-z0-9._:+-]{1,40})""", re.I)
# HTML5 §13.2.3.2 (the prescan): a body sent without a charset names it in a <meta>.
_META_CHARSET_RE = re.compile(rb"""<meta\s[^>]{0,500}?charset\s*=\s*["']?\s*([A-Za-z0-9._:+-]{1,40})""", re.I)
# RFC 2392: an HTML body shows a part by "cid:" + its Content-ID (%-encoded, without <>).
_CID_REF_RE = re.compile(r"""cid:([^\s"'<>)]+)""", re.I)


def _media_type(value: str) -> str:
    """The stdlib's content type, or its leading type/subtype when it kept more than that."""
    if _MEDIA_TYPE_RE.match(value):
        return value
    m = _LEADING_MEDIA_TYPE_RE.match(value)
    return f"{m.group(1)}/{m.group(2)}" if m else value


def _meta_charset(html: bytes) -> str | None:
    m = _META_CHARSET_RE.search(html, 0, 8192)
    if m is None:
        return None
    label = m.group(1).decode("ascii")
    # HTML5 §13.2.3.2: a <meta> saying UTF-16 in an ASCII-compatible document means UTF-8.
    return "utf-8" if label.lower().replace("_", "-").startswith("utf-16") else label


def inline_only_if_shown(attachments: list[Attachment], html: str) -> list[Attachment]:
    """The attachments as the email shows them: a part stays inline only when the HTML body
    shows it (``Attachment.inline`` is what the part declares). Apple Mail sends photos under a
    plain-text body as inline parts with a Content-ID, and an unused signature logo is one too;
    left inline, they were listed nowhere (the pages, the API and has_attachments skip inline
    parts)."""
    if not any(a.inline for a in attachments):
        return attachments
    shown = {unquote(ref).strip("<>").lower() for ref in _CID_REF_RE.findall(html)}
    return [a if not a.inline or (a.content_id or "").lower() in shown else replace(a, inline=False)
            for a in attachments]


@dataclass(frozen=True)
class Attachment:
    """A non-body part of a message."""

    filename: str  # safe for display and Content-Disposition; never empty
    content_type: str  # lower-case type/subtype as declared, else application/octet-stream
    content: bytes  # decoded payload
    content_id: str | None  # without <>
    inline: bool  # an embedded image: has a Content-ID and is not disposition "attachment"


@dataclass(frozen=True)
class ParsedMessage:
    """The result of `parse_message`."""

    envelope: Envelope
    text: str  # best text/plain body (or text made from the HTML); NUL removed
    html: str  # best text/html body, unsanitized, NUL removed; '' if none
    attachments: list[Attachment]
    defects: list[str]  # the envelope's defects followed by the MIME ones


@dataclass
class _Pending:
    """A MIME entity waiting on the stack."""

    data: bytes | memoryview  # headers + body, still transfer-encoded (a view: a part of its parent)
    depth: int
    default_type: str
    alt_group: int | None  # id of the nearest multipart/alternative ancestor
    in_related: bool
    block: HeaderBlock | None = None


class _Walk:
    def __init__(self, max_parts: int, max_depth: int) -> None:
        self.max_parts = max_parts
        self.max_depth = max_depth
        self.defects: list[str] = []
        self.plain: list[tuple[int | None, str]] = []
        self.html: list[tuple[int | None, str]] = []
        self.attachments: list[Attachment] = []
        self.groups = 0
        self.charset_hint: str | None = None

    def note(self, defect: str) -> None:
        if len(self.defects) < MAX_DEFECTS and defect not in self.defects:
            self.defects.append(defect)

    def run(self, root: _Pending) -> None:
        stack = [root]
        seen = 0
        while stack:
            item = stack.pop()
            seen += 1
            if seen > self.max_parts:
                self.note(f"more than {self.max_parts} MIME parts; the rest skipped")
                return
            try:
                stack.extend(reversed(self.visit(item, self.max_parts - seen)))
            except Exception as exc:  # one bad part must not lose the others
                self.note(f"part {seen} unreadable ({type(exc).__name__})")

    def visit(self, item: _Pending, budget: int) -> list[_Pending]:
        block = item.block or self.header_block(item)
        if block.charset_hint is None:
            block.charset_hint = self.charset_hint  # raw 8-bit part headers: see HeaderBlock
        for defect in block.defects:
            if item.depth:
                self.note(f"part: {defect}")
        # A view, not a copy: a large part's body is otherwise held twice (and its children
        # once more) while it is split and decoded (worker memory, issue 3).
        body = memoryview(item.data)[block.body_offset:]
        params = _params(block, item.default_type)
        ctype = _media_type(params.get_content_type())
        if ctype.startswith("multipart/"):
            if item.depth >= self.max_depth:
                self.note(f"MIME nesting deeper than {self.max_depth}; not descended")
                return []
            boundary = _get(params.get_boundary)
            if not boundary:  # a Content-Type without its ";": the stdlib saw no parameters
                found = _BOUNDARY_IN_TYPE_RE.search(block.text("content-type") or "")
                boundary = found.group(1) or found.group(2) if found else None
            children = None
            if boundary:
                children, notes = split_multipart(body, boundary, budget)
                for n in notes:
                    self.note(f"more than {self.max_parts} MIME parts; the rest skipped"
                              if n is _PART_LIMIT else n)
            else:
                self.note("multipart without boundary parameter (RFC 2046 §5.1.1)")
            if children is not None:
                subtype = ctype.split("/", 1)[1]
                alt = item.alt_group
                if subtype == "alternative":
                    self.groups += 1
                    alt = self.groups
                # RFC 2046 §5.1.5: in multipart/digest the default type is message/rfc822.
                default = "message/rfc822" if subtype == "digest" else "text/plain"
                related = item.in_related or subtype == "related"
                return [_Pending(c, item.depth + 1, default, alt, related) for c in children]
            # The boundary is missing or never occurs: like the stdlib, keep the body as text
            # so nothing the sender wrote is lost.
            self.add_text("text/plain", body.tobytes(), _get(params.get_content_charset), item.alt_group)
            return []
        self.leaf(block, body, params, ctype, item)
        return []

    @staticmethod
    def header_block(item: _Pending) -> HeaderBlock:
        """The part's header block. A part of its parent's body is a view of the message
        (split_multipart): only its header is copied to be read, not its body."""
        if isinstance(item.data, bytes):
            return split_header_block(item.data)
        head = item.data[:MAX_HEADER_BYTES].tobytes()
        block = split_header_block(head)
        if block.body_offset >= len(head) and len(item.data) > len(head):
            # No end of the header within the limit: read as a whole, as before.
            item.data = item.data.tobytes()
            block = split_header_block(item.data)
        return block

    def leaf(
        self, block: HeaderBlock, body: memoryview, params: Message, ctype: str, item: _Pending
    ) -> None:
        disposition = (block.text("content-disposition") or "").split(";", 1)[0].strip().lower()
        raw_name = _get(params.get_filename)
        # RFC 2231 is the standard for non-ASCII parameters, but most clients send RFC 2047
        # encoded words inside quotes (forbidden by RFC 2047 §5); accept both.
        filename = decode_words(raw_name) if isinstance(raw_name, str) else None
        payload = self.transfer_decode(block, body)
        if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
            flowed = (str(_get(lambda: params.get_param("format")) or "").lower() == "flowed",
                      str(_get(lambda: params.get_param("delsp")) or "").lower() == "yes")
            charset = _get(params.get_content_charset)
            if charset is None:  # a Content-Type without its ";": the stdlib saw no parameters
                found = _CHARSET_IN_TYPE_RE.search(block.text("content-type") or "")
                charset = found.group(1) if found else None
            self.add_text(ctype, payload, charset, item.alt_group, flowed)
            return
        declared = _media_type((block.text("content-type") or "").split(";", 1)[0].strip().lower())
        if not _MEDIA_TYPE_RE.match(declared):
            declared = ctype if ctype in _EMBEDDED_MESSAGE_TYPES else "application/octet-stream"
        if not payload and not filename:
            return  # an empty unnamed part carries nothing to show or download
        if declared == "application/ms-tnef" or (filename or "").strip().lower() == "winmail.dat":
            inside = tnef_attachments(payload)
            if inside:  # else winmail.dat is kept as it came
                self.attachments.extend(inside)
                return
        if declared in _EMBEDDED_MESSAGE_TYPES:
            # A forwarded message downloads as .eml, named after its Subject if not named.
            filename = filename or parse_envelope(payload).subject[:200] or "message"
            if not filename.lower().endswith(".eml"):
                filename += ".eml"
        content_id = normalize_message_id(block.text("content-id"))
        inline = bool(content_id) and disposition != "attachment" and (
            disposition == "inline" or item.in_related
        )
        self.attachments.append(
            Attachment(
                filename=safe_filename(filename, declared),
                content_type=declared,
                content=payload,
                content_id=content_id,
                inline=inline,
            )
        )

    def add_text(self, ctype: str, payload: bytes, charset: str | None, alt: int | None,
                 flowed: tuple[bool, bool] = (False, False)) -> None:
        if charset is None and ctype == "text/html" and not payload.isascii():
            # Valid UTF-8 still wins (a <meta> copied from a template often lies); else the
            # page's own <meta charset> is the sender's word, not a guess at cp1252.
            meta = _meta_charset(payload)
            if meta and mostly_utf8(payload) is None:
                charset = meta
        text, defect = decode_bytes(payload, charset)
        if defect:
            self.note(defect)
        text = text.replace("\x00", "").replace("\r\n", "\n")
        if flowed[0] and ctype == "text/plain":
            text = unflow(text, delsp=flowed[1])
        if text.strip():
            (self.html if ctype == "text/html" else self.plain).append((alt, text))

    def transfer_decode(self, block: HeaderBlock, view: memoryview) -> bytes:
        cte = (block.text("content-transfer-encoding") or "").strip().lower()
        if cte == "base64":
            # The usual case (an attachment as encoders write it): decoded straight from the
            # message's bytes, without the lenient decoder's three working copies.
            decoded = _plain_base64(view)
            if decoded is not None:
                return decoded
        body = view.tobytes()
        if cte in ("", "7bit", "8bit", "binary"):
            return body
        if cte == "base64":
            data, trailer = split_base64_trailer(body)
            if not trailer:
                return b64decode_lenient(body)
            # A mailing list appended its footer to a base64 body: decoded, it would be junk.
            self.note("plain text after the base64 data (a list footer?) kept as text")
            decoded = b64decode_lenient(data)
            ctype = (block.text("content-type") or "text/plain").split(";", 1)[0].strip().lower()
            return decoded + b"\n" + trailer if ctype.startswith("text/") else decoded
        if cte == "quoted-printable":
            # RFC 2045 6.7 (3): whitespace at the end of an encoded line is to be deleted
            # (it may hide the "=" of a soft line break).
            return binascii.a2b_qp(_QP_TRAILING_WS.sub(b"", body))
        if cte in ("x-uuencode", "uuencode", "x-uue", "uue"):
            return _uudecode(body)
        # RFC 2045 §6.4: an unknown encoding means the data is opaque; keep it as it came.
        self.note(f"unknown Content-Transfer-Encoding {cte[:40]!r}; kept raw")
        return body


# Larger winmail.dat files are kept whole: the reader copies the rest of the data for each
# of its records (quadratic in the size).
TNEF_MAX_BYTES = 16 * 1024 * 1024


TNEF_MAX_RECORDS = 5000  # Outlook writes tens; a hostile file of tiny records would take minutes


def _tnef_records(data: bytes) -> int:
    """How many records the file holds, counted from their headers alone (level, id, type,
    a 32-bit length, the data, a checksum: MS-OXTNEF 2.1.3), stopping past the cap."""
    count, offset = 0, 6
    while offset + 9 <= len(data) and count <= TNEF_MAX_RECORDS:
        length = int.from_bytes(data[offset + 5:offset + 9], "little")
        offset += 11 + length
        count += 1
    return count


def tnef_attachments(data: bytes) -> list[Attachment]:
    """The files inside Outlook's winmail.dat (TNEF, application/ms-tnef), or [] when it
    holds none or cannot be read (then the caller keeps winmail.dat itself)."""
    if not data or len(data) > TNEF_MAX_BYTES or _tnef_records(data) > TNEF_MAX_RECORDS:
        return []
    try:
        from tnefparse import TNEF  # noqa: PLC0415

        logging.getLogger("tnefparse").setLevel(logging.ERROR)  # it warns on odd records
        found = TNEF(data, do_checksum=False).attachments
        out = []
        for item in found:
            content = bytes(item.data or b"")
            name = item.long_filename() or ""
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            name = name.strip("\x00").strip()
            if not content:
                continue
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            out.append(Attachment(filename=safe_filename(name, ctype), content_type=ctype,
                                  content=content, content_id=None, inline=False))
        return out
    except Exception:  # noqa: BLE001  (a hostile or broken file: keep it as it came)
        return []


_B64_OK = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n\t "


def split_base64_trailer(body: bytes) -> tuple[bytes, bytes]:
    """(base64 data, plain text appended after it). Mailing lists add their footer to a
    single-part body without re-encoding it; RFC 2045 6.8 says to skip characters outside
    the alphabet, but the footer's letters are in it and would decode as junk. The text
    starts at the first line after the data with characters no base64 has (or at the blank
    line before it), provided what follows reads as prose: a line of words with punctuation.
    A stray junk line inside the data (followed by more data) is left to the lenient decoder,
    as RFC 2045 asks. Clean base64, the usual case, is checked at C speed."""
    if not body.translate(None, _B64_OK):
        return body, b""
    lines = body.split(b"\n")
    stripped_lines = [line.strip() for line in lines]
    last_data = max((i for i, line in enumerate(stripped_lines) if _data_line(line)), default=-1)
    last_prose = max((i for i, line in enumerate(stripped_lines) if _prose(line)), default=-1)
    seen_data = False
    last_blank: int | None = None
    for index, stripped in enumerate(stripped_lines):
        if not stripped:
            if seen_data:
                last_blank = index
            continue
        if stripped.translate(None, _B64_OK) and seen_data:
            if last_data > index:
                continue  # base64 goes on after it: a stray junk line, skipped when decoding
            if last_prose >= index:
                cut = last_blank if last_blank is not None else index
                return b"\n".join(lines[:cut]), b"\n".join(lines[cut:]).strip(b"\r\n")
            return body, b""
        seen_data = True
    return body, b""


_NOT_PLAIN_BASE64 = re.compile(rb"[^A-Za-z0-9+/\r\n]")
_PADDING_AT_END = re.compile(rb"={1,2}[\r\n]*\Z")


def _plain_base64(body: memoryview) -> bytes | None:
    """Base64 as encoders write it (only the alphabet in lines, padding at the very end, a
    whole number of quanta) decoded straight from the message's bytes; None for anything
    else, which the lenient decoder reads (junk characters, padding in pieces, a footer)."""
    padding = _PADDING_AT_END.search(body, max(0, len(body) - 8))
    if _NOT_PLAIN_BASE64.search(body[:padding.start()] if padding else body):
        return None
    try:
        return binascii.a2b_base64(body)
    except binascii.Error:  # a count that is not a whole number of quanta: repaired there
        return None


def _data_line(line: bytes) -> bool:
    """A line of base64 data: only its alphabet, and as long as encoders write them (a word
    of a footer, "Unsubscribe", is short)."""
    return len(line) >= 40 and not line.translate(None, _B64_OK) and b" " not in line


def _prose(line: bytes) -> bool:
    """Words and punctuation ("list mailing list: https://..."), never a base64 line."""
    return b" " in line and bool(line.translate(None, _B64_OK))


def unflow(text: str, *, delsp: bool) -> str:
    """RFC 3676 format=flowed: a line ending in a space continues on the next line of the
    same quote depth (with delsp=yes that space goes); "-- " is the signature separator."""
    out: list[tuple[int, str]] = []
    joining = False
    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):  # space-stuffing (RFC 3676 4.4)
            content = content[1:]
        if joining and out and out[-1][0] == depth:
            out[-1] = (depth, out[-1][1] + content)
        else:
            out.append((depth, content))
        joining = content.endswith(" ") and content != "-- "
        if joining and delsp:
            out[-1] = (depth, out[-1][1][:-1])
    return "\n".join(">" * d + (" " if d and c else "") + c for d, c in out)


_QP_TRAILING_WS = re.compile(rb"[ \t]+(?=\r?\n|$)")


def _params(block: HeaderBlock, default_type: str) -> Message:
    """A stdlib Message holding only the MIME headers, for its RFC 2045/2231 parameter code.

    Its get_content_type() applies RFC 2045 §5.2: a missing or syntactically invalid
    Content-Type means text/plain (or the multipart/digest default, RFC 2046 §5.1.5).
    """
    msg = Message()
    msg.set_default_type(default_type)
    for name in ("content-type", "content-disposition"):
        value = block.text(name)
        if value is not None:
            msg[name] = value
    return msg


def _get(getter):  # type: ignore[no-untyped-def]
    """Call a stdlib parameter getter; they raise on some malformed RFC 2231 values."""
    try:
        return getter()
    except Exception:
        return None


def split_multipart(body: bytes, boundary: str, limit: int) -> tuple[list[bytes] | None, list[str]]:
    """Split a multipart body on its boundary (RFC 2046 §5.1.1). None if the boundary never occurs.

    Lenient as RFC 2046 asks of readers: trailing white space after a delimiter is ignored, a
    missing close delimiter ends the last part at the end of the data.
    """
    notes: list[str] = []
    # Without a leading "^" the pattern starts with a literal, which the regex engine finds
    # with a fast scan (at each level of nesting the whole body is scanned: ~10x faster
    # than trying the pattern at every line start); the line start is checked here.
    delim = re.compile(
        rb"--" + re.escape(boundary.encode("utf-8", "replace")) + rb"(--)?[ \t]*\r?$", re.M
    )
    parts: list[bytes] = []
    start: int | None = None
    closed = False
    for m in delim.finditer(body):
        if m.start() and body[m.start() - 1] != 0x0A:
            continue  # not at the start of a line
        if start is not None:
            end = m.start()
            # The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
            if end > start and body[end - 1] == 0x0A:
                end -= 1
                if end > start and body[end - 1] == 0x0D:
                    end -= 1
            parts.append(body[start:end])
            if len(parts) >= max(limit, 1):
                notes.append(_PART_LIMIT)
                return parts, notes
        if m.group(1):
            closed = True
            break
        start = m.end() + 1 if body[m.end():m.end() + 1] == b"\n" else m.end()
    if start is None:
        return (parts if closed else None), notes
    if not closed:
        notes.append("multipart without close delimiter (RFC 2046 §5.1.1)")
        parts.append(body[start:])
    return parts, notes


def _uudecode(body: bytes) -> bytes:
    out = bytearray()
    inside = False
    for line in body.splitlines():
        if not inside:
            inside = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`"):
            break
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Encoders that miscount the length byte: decode what the length allows.
            try:
                nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
                out += binascii.a2b_uu(line[:nbytes])
            except (binascii.Error, IndexError):
                continue
    return bytes(out)


def _pick(items: list[tuple[int | None, str]]) -> str:
    """Join body parts in order; within one multipart/alternative only the last of a type counts,
    as RFC 2046 §5.1.4 puts the preferred (richest) alternative last."""
    last: dict[int, int] = {}
    for i, (group, _) in enumerate(items):
        if group is not None:
            last[group] = i
    return "\n".join(t for i, (g, t) in enumerate(items) if g is None or last[g] == i)


def parse_message(raw: bytes, *, max_parts: int = 2000, max_depth: int = 50) -> ParsedMessage:
    """Parse a whole message. Never raises: problems become `defects`."""
    data = _coerce_bytes(raw)
    line_ends = []
    crlf = data.count(b"\r\n")
    if data.count(b"\r") - crlf > crlf and data.count(b"\n") == crlf:
        # CRs for line ends (classic Mac OS mail programs, some old gateways), maybe below
        # CRLF header lines the receiving server added (Received, Delivered-To): read as
        # CRLF, else the body's MIME structure was shown as text, boundaries and all. The
        # stored source stays as it came (byte-exact); only this reading changes.
        data = re.sub(rb"\r(?!\n)", b"\r\n", data)
        line_ends = ["bare CR line ends (read as CRLF)"]
    try:
        block = split_header_block(data)
        envelope = envelope_from_block(block)
        walk = _Walk(max_parts, max_depth)
        walk.charset_hint = block.charset_hint
        walk.run(_Pending(data, 0, "text/plain", None, False, block=block))
        html = _pick(walk.html)
        text = _pick(walk.plain)
        if not text and html:
            text = html_to_text(html)
        return ParsedMessage(
            envelope=envelope,
            text=text,
            html=html,
            attachments=walk.attachments,
            defects=envelope.defects + line_ends + walk.defects,
        )
    except Exception as exc:  # last resort: keep the envelope, report the failure
        envelope = parse_envelope(data)
        return ParsedMessage(
            envelope=envelope,
            text="",
            html="",
            attachments=[],
            defects=envelope.defects + [f"MIME parse failed ({type(exc).__name__})"],
        )
