"""The envelope: the few headers that association, dedup and threading need, parsed fast."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from blake3 import blake3

from mailsync.mime.headers import (
    MAX_IN_REPLY_TO,
    MAX_REFERENCES,
    Address,
    HeaderBlock,
    clean_line,
    decode_unstructured,
    normalize_message_id,
    parse_addresses,
    parse_date,
    parse_id_list,
    split_header_block,
)

_LIST_ID_RE = re.compile(r"<([^<>]+)>")


@dataclass(frozen=True)
class Envelope:
    """What association and threading need from a message's header block."""

    message_id: str | None  # 'abc@host': no <>, no white space; None if absent or garbage
    in_reply_to: list[str]  # normalized ids, at most 10
    references: list[str]  # normalized ids, order kept, deduplicated, root + latest 99
    subject: str  # RFC 2047-decoded, one line, no NUL/CR/LF, at most 1,000 chars
    date: datetime | None  # aware UTC; None if missing or impossible
    from_: list[Address]  # an Address may have email '' (name only) or key '' (not plausible)
    sender: list[Address]
    reply_to: list[Address]
    to: list[Address]  # at most 1,000 per header
    cc: list[Address]
    bcc: list[Address]
    list_id: str | None  # RFC 2919 id without <>
    auto_submitted: bool  # Auto-Submitted not "no", multipart/report, Return-Path <>, X-Autoreply
    defects: list[str]  # what was odd, without personal data (safe to log)


def _empty_envelope(defects: list[str]) -> Envelope:
    return Envelope(None, [], [], "", None, [], [], [], [], [], [], None, False, defects)


def _coerce_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    try:
        return bytes(raw)  # type: ignore[call-overload]
    except Exception:
        return b""


def parse_envelope(raw: bytes) -> Envelope:
    """Parse only the header block of `raw`. Never raises."""
    try:
        return envelope_from_block(split_header_block(_coerce_bytes(raw)))
    except Exception as exc:  # a bug here must not stop a mailbox sync
        return _empty_envelope([f"envelope parse failed ({type(exc).__name__})"])


def envelope_from_block(block: HeaderBlock) -> Envelope:
    """Build an Envelope from an already split header block."""
    defects = list(block.defects)
    content_type = block.text("content-type") or ""

    def text(name: str) -> str | None:
        return block.text(name)

    def addresses(name: str, single: bool = False) -> list[Address]:
        values = block.texts(name)
        if single and len(values) > 1:
            # RFC 5322 §3.6: From, Sender and Reply-To occur at most once; trust the first.
            defects.append(f"{len(values)} {name} headers; first used")
            values = values[:1]
        found, notes = parse_addresses(values)
        defects.extend(f"{name}: {note}" for note in notes)
        return found

    raw_id = text("message-id")
    message_id = normalize_message_id(raw_id)
    if raw_id is None:
        defects.append("no Message-ID")
    elif message_id is None:
        defects.append("Message-ID unusable")

    subject_raw = text("subject")
    date, date_note = parse_date(text("date"))
    if date_note:
        defects.append(date_note)

    list_id = None
    list_raw = text("list-id")
    if list_raw:
        # RFC 2919 §3: the list identifier is the part inside angle brackets.
        lm = _LIST_ID_RE.search(list_raw)
        list_id = clean_line(lm.group(1) if lm else list_raw, 255) or None

    return Envelope(
        message_id=message_id,
        in_reply_to=parse_id_list(text("in-reply-to"), MAX_IN_REPLY_TO),
        references=parse_id_list(" ".join(block.texts("references")), MAX_REFERENCES),
        subject=decode_unstructured(subject_raw) if subject_raw else "",
        date=date,
        from_=addresses("from", single=True),
        sender=addresses("sender", single=True),
        reply_to=addresses("reply-to", single=True),
        to=addresses("to"),
        cc=addresses("cc"),
        bcc=addresses("bcc"),
        list_id=list_id,
        auto_submitted=_is_auto_submitted(block, content_type),
        defects=defects,
    )


def _is_auto_submitted(block: HeaderBlock, content_type: str) -> bool:
    auto = block.text("auto-submitted")
    # RFC 3834 §5: any Auto-Submitted value other than "no" marks a machine-sent message.
    if auto is not None and auto.split(";")[0].strip().lower() not in ("", "no"):
        return True
    # RFC 6522: multipart/report carries delivery (RFC 3464) and read (RFC 8098) reports.
    if content_type.split(";")[0].strip().lower() == "multipart/report":
        return True
    # RFC 5321 §4.5.5: notifications are sent with a null reverse-path, seen as Return-Path: <>.
    return_path = block.text("return-path")
    if return_path is not None and return_path.replace(" ", "") == "<>":
        return True
    # Not in an RFC: vacation responders that predate RFC 3834.
    return "x-autoreply" in block.fields or "x-autorespond" in block.fields


# An LF without its CR. The pattern starts with the literal LF, so the regex engine scans
# for it in C and looks back only at each one found: less than half the time of comparing
# the counts of LFs and CRLFs, which it replaced (same answer: tests/mailsync/test_prepare.py).
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


def wire_form(raw: bytes) -> bytes:
    """The message with CRLF line ends, as IMAP and POP3 send it (RFC 3501 4.3, RFC 1939 3):
    the form the content hash and the fingerprint are taken of, so that a copy with LF line
    ends (a file, a message built in the CRM) hashes the same. Mail from a server is already
    in this form and is not copied: checking that is one scan for an LF without its CR
    (bare CRs are not line ends), a fraction of the CRLF -> LF copy these hashes were taken
    of before migration 0007 (bench/README.md)."""
    if _BARE_LF.search(raw) is None:
        return raw
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def content_hash(raw: bytes) -> str:
    """BLAKE3 hex of the raw message in its ``wire_form`` (CRLF and LF copies match); SHA-256
    before migration 0017 (BLAKE3 takes a quarter of the time: bench/README.md)."""
    return blake3(wire_form(_coerce_bytes(raw))).hexdigest()


def derived_message_key(envelope: Envelope, raw: bytes) -> str:
    """A stable key for mail without a Message-ID: 'derived:' + SHA-256 of Date, From, Subject,
    To and the body. Headers that servers add on delivery (Received...) are left out, so two
    copies of one message fetched from different folders or accounts get the same key."""
    data = _coerce_bytes(raw)
    block = split_header_block(data)
    body = data[block.body_offset:].replace(b"\r\n", b"\n").rstrip()
    parts = [
        envelope.date.isoformat() if envelope.date else "",
        ",".join(a.key or a.email.lower() for a in envelope.from_),
        envelope.subject,
        ",".join(sorted(a.key or a.email.lower() for a in envelope.to)),
        hashlib.sha256(body).hexdigest(),
    ]
    joined = "\x1f".join(parts).encode("utf-8", "replace")
    return "derived:" + hashlib.sha256(joined).hexdigest()
