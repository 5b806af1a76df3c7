"""What the sync computes of a fetched message before storing it (mailsync/sync/prepare.py):
the batch form used by the fetch process gives exactly what the one-message form gives."""
from __future__ import annotations

from itertools import product

import pytest

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


def test_after_an_error_the_rest_of_the_batch_is_dropped_not_worked_on(monkeypatch):
    """An error is raised to the caller, and the helper does not go on hashing and
    compressing (and holding) the rest of a batch nobody will take (found in review)."""
    import time

    from mailsync.sync import prepare as module

    done: list[int] = []
    real = module._hashed_and_compressed

    def slow(raw: bytes):  # noqa: ANN202
        time.sleep(0.02)
        done.append(len(raw))
        return real(raw)

    def broken(raw: bytes):  # noqa: ANN202
        if b"Message 2" in raw:
            raise RuntimeError("parser bug")
        return real_parse(raw)

    real_parse = module.parse_envelope
    monkeypatch.setattr(module, "_hashed_and_compressed", slow)
    monkeypatch.setattr(module, "parse_envelope", broken)
    batch: list[FetchedMessage | None] = [
        _message(n, RAW.replace(b"Our offer", f"Message {n}".encode())) for n in range(1, 31)]
    with pytest.raises(RuntimeError, match="parser bug"):
        prepare_batch(batch)
    time.sleep(0.3)  # what was still queued would have run by now
    assert len(done) <= 4, len(done)


def test_a_forked_process_prepares_with_a_helper_of_its_own():
    """The helper thread does not survive fork(): a forked child that prepares starts its own
    instead of waiting forever on the parent's (found in review)."""
    import os
    import signal

    assert prepare_batch([_message(1, RAW)])  # the parent's helper exists now
    pid = os.fork()
    if pid == 0:  # the child: must finish within the alarm
        signal.alarm(10)
        try:
            ok = prepare_batch([_message(2, RAW)])[0].message.uid == 2
        finally:
            os._exit(0 if ok else 1)  # noqa: B012
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
