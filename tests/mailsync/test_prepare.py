"""What the sync computes of a fetched message before storing it (mailsync/sync/prepare.py):
the batch form used by the fetch process gives exactly what the one-message form gives."""
from __future__ import annotations

from itertools import product

from mailsync.mime import wire_form
from mailsync.protocols.base import FetchedMessage
from mailsync.storage import decompress
from mailsync.sync.prepare import prepare, prepare_batch
from tests.corpus import corpus_files

RAW = (b"Received: from mx.example.net by mx.example.com; Mon, 6 May 2024 10:00:00 +0000\r\n"
       b"Message-ID: <offer-1@client.example>\r\n"
       b"From: Ann Buyer <ann@client.example>\r\nTo: sales@example.com\r\n"
       b"Subject: Our offer\r\nDate: Mon, 6 May 2024 09:59:00 +0000\r\n\r\n"
       b"Hello,\r\n.\r\nsee the offer.\r\n")


def _message(uid: int, raw: bytes) -> FetchedMessage:
    return FetchedMessage(uid=uid, flags=("\\Seen",), size=len(raw), internal_date=None, raw=raw)


def test_wire_form_converts_exactly_when_an_lf_lacks_its_cr():
    """Every string of up to 8 characters from {a, CR, LF}: the scan for a bare LF decides as
    the rule 'every LF has its CR' does (the byte counts it replaced)."""
    for length in range(9):
        for chars in product((b"a", b"\r", b"\n"), repeat=length):
            raw = b"".join(chars)
            crlf = raw.count(b"\n") == raw.count(b"\r\n")
            wire = wire_form(raw)
            assert (wire is raw) == crlf, raw
            if not crlf:
                assert wire == raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), raw


def test_a_batch_is_prepared_as_each_of_its_messages_alone():
    raws = [RAW, RAW.replace(b"\r\n", b"\n"), RAW.replace(b"Message-ID: <offer-1@client.example>\r\n", b""),
            b"", b"no header at all", RAW.replace(b"see the offer.", b"see\rthe\noffer.")]
    raws += [path.read_bytes() for path in corpus_files()]
    messages: list[FetchedMessage | None] = [_message(n + 1, raw) for n, raw in enumerate(raws)]
    batch = prepare_batch(messages)

    assert messages == [None] * len(raws)  # consumed: a large mail's bytes can go
    assert len(batch) == len(raws)
    for raw, got in zip(raws, batch):
        alone = prepare(_message(got.message.uid, raw), keep_raw=False)
        assert got == alone, got.message.uid
        assert got.message.raw == b"" and got.raw_size == len(raw)
        assert decompress(got.compressed) == raw
    # LF and CRLF copies of one mail are one mail
    assert (batch[0].content_hash, batch[0].fingerprint) == (batch[1].content_hash, batch[1].fingerprint)


def test_an_empty_batch():
    assert prepare_batch([]) == []
