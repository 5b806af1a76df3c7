"""Everything about a fetched message that needs no database: its envelope (the headers that
association and threading need), its hashes and its compressed source.

No Django here: this runs in the sync's fetch process (``mailsync.sync.fetcher``) or in its
prefetch thread, beside the storing of the batch before it.
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from blake3 import blake3

from ..mime import Envelope, derived_message_key, parse_envelope, wire_form
from ..mime.headers import without_fields
from ..protocols.base import FetchedMessage
from ..storage import compress


@dataclass
class Prepared:
    message: FetchedMessage  # its ``raw`` is b"" once handed over by the fetch process
    envelope: Envelope
    content_hash: str
    fingerprint: str
    compressed: bytes
    raw_size: int = -1  # len(raw); kept when the raw bytes are dropped

    def __post_init__(self) -> None:
        if self.raw_size < 0:
            self.raw_size = len(self.message.raw)

    def without_raw(self) -> Prepared:
        """The same, without the raw bytes (the compressed source holds them)."""
        return replace(self, message=replace(self.message, raw=b""))


# Headers added along the way by each delivery or by mail stores, not by the author: the
# same mail has other values in each mailbox that receives it (RFC 5321 4.4, RFC 8617...).
TRACE_HEADERS = frozenset({
    b"received", b"delivered-to", b"return-path", b"x-original-to", b"x-received",
    b"envelope-to", b"x-envelope-to", b"x-delivered-to", b"x-rcpt-to",
    b"authentication-results", b"received-spf", b"arc-seal", b"arc-message-signature",
    b"arc-authentication-results", b"x-spam-status", b"x-spam-score", b"x-spam-flag",
    b"x-spam-level", b"x-spam-checker-version", b"x-virus-scanned", b"status", b"x-status",
    b"x-keywords", b"x-uid", b"lines", b"content-length",
})
# Left out of the fingerprint as well: the trace headers, and Bcc, which the sender's own
# copies carry (the CRM's, a Sent folder's) and the copy delivered to a Bcc recipient does
# not (SMTP clients drop it), so a mail Bcc'd to oneself is one mail (migration 0010).
NOT_FINGERPRINTED = TRACE_HEADERS | {b"bcc", b"resent-bcc"}


def _as_bytes(raw: object) -> bytes:
    return raw if isinstance(raw, bytes) else bytes(raw)  # type: ignore[call-overload]


def fingerprint(envelope: Envelope, raw: bytes, wire: bytes) -> str:
    """Who a message is, the same in every mailbox and folder that holds it: the Message-ID
    plus a hash of the message (``wire``: its ``wire_form``) without its trace headers
    (Received, Delivered-To, ...), which every delivery adds anew, so the same mail in a
    personal and a shared mailbox would otherwise look like two, and without Bcc. Two mails that merely share
    a Message-ID differ in some header or the body and stay apart.

    BLAKE3 (as the content hash, ``mime.content_hash``): a quarter of SHA-256's time here,
    where the two hashes over every byte of every message were a fifth of the fetch
    process's work (migration 0017, bench/README.md). Mail without a Message-ID keeps its
    derived key (SHA-256 of a short text)."""
    if not envelope.message_id:
        basis = f"derived\n{derived_message_key(envelope, raw)}"
        return hashlib.sha256(basis.encode("utf-8", "surrogatepass")).hexdigest()
    digest = blake3()
    digest.update(f"mid\n{envelope.message_id}\n".encode("utf-8", "surrogatepass"))
    # The message without its trace header fields, folded lines included (RFC 5322 2.2: a
    # header ends at the first empty line). The body is hashed in place, not copied.
    end = wire.find(b"\r\n\r\n")
    head, body = ((wire, memoryview(b"")) if end < 0
                  else (wire[:end + 2], memoryview(wire)[end + 2:]))
    digest.update(without_fields(head, NOT_FINGERPRINTED))
    digest.update(body)
    return digest.hexdigest()


def prepare(message: FetchedMessage, *, keep_raw: bool = True) -> Prepared:
    """Envelope, hashes and compressed source of a message; ``keep_raw=False`` is
    ``prepare(message).without_raw()`` without the second dataclass copy."""
    raw = _as_bytes(message.raw)
    envelope = parse_envelope(raw)
    wire = wire_form(raw)
    content_hash = blake3(wire).hexdigest()  # = mime.content_hash(raw)
    kept = message if keep_raw else replace(message, raw=b"")
    return Prepared(kept, envelope, content_hash, fingerprint(envelope, raw, wire), compress(raw),
                    raw_size=len(raw))


# One thread per process: the fetch process's, or a worker's for a small download.
_helper: ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()


def _hashed_and_compressed(raw: bytes) -> tuple[bytes, str, bytes]:
    wire = wire_form(raw)
    return wire, blake3(wire).hexdigest(), compress(raw)


def prepare_batch(messages: list[FetchedMessage | None]) -> list[Prepared]:
    """``prepare(m, keep_raw=False)`` of each message, in order. The content hash and the
    compression run in a helper thread: zstd and BLAKE3 let go of the GIL, so they overlap
    the envelope parsing (Python) of the messages beside them (bench/README.md).

    The list is consumed: each entry is set to None once its message is prepared, so the
    bytes of a large mail go as soon as it is done when the caller holds no other reference."""
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        helper = _helper
    pending = [helper.submit(_hashed_and_compressed, _as_bytes(m.raw))  # type: ignore[union-attr]
               for m in messages]
    out: list[Prepared] = []
    try:
        for index, future in enumerate(pending):
            message = messages[index]
            assert message is not None
            messages[index] = None
            raw = _as_bytes(message.raw)
            envelope = parse_envelope(raw)
            wire, content_hash, compressed = future.result()
            pending[index] = None  # type: ignore[call-overload]
            out.append(Prepared(replace(message, raw=b""), envelope, content_hash,
                                fingerprint(envelope, raw, wire), compressed, raw_size=len(raw)))
            del message, raw, wire, compressed
    finally:
        for left in pending:  # after an error: the rest is not worked on, nor kept
            if left is not None:
                left.cancel()
    return out


def _forget_helper() -> None:
    """In a forked child the helper thread does not exist: start a new one when needed."""
    global _helper, _helper_lock
    _helper, _helper_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helper)
