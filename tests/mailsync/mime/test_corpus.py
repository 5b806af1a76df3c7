"""Every message of the shared corpus of real and broken mail parses; a few are spot-checked.

The corpus lives beside the repository (shared/corpus, read in place, never copied);
MAILROOM_CORPUS_DIR overrides the location.
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from mailsync.mime import (
    Envelope,
    ParsedMessage,
    content_hash,
    derived_message_key,
    parse_envelope,
    parse_message,
    sanitize_html,
)

from tests.corpus import CORPUS, corpus_files

FILES = corpus_files() if CORPUS.is_dir() else []


def _read(relative: str) -> bytes:
    path = CORPUS / relative
    if not path.is_file():
        pytest.fail(f"{relative} is not in the corpus at {CORPUS}")
    return path.read_bytes()


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CORPUS)) for p in FILES])
def test_corpus_message_parses(path: Path) -> None:
    raw = path.read_bytes()
    env = parse_envelope(raw)
    assert isinstance(env, Envelope)
    assert env.date is None or isinstance(env.date, datetime)
    assert "\x00" not in env.subject and "\n" not in env.subject and len(env.subject) <= 1000
    msg = parse_message(raw)
    assert isinstance(msg, ParsedMessage)
    assert msg.envelope == env  # the fast path and the full parse agree
    assert "\x00" not in msg.text + msg.html
    for att in msg.attachments:
        assert att.filename and len(att.filename) <= 255
        assert not any(c in att.filename for c in "\x00\r\n/\\\u202e")
        assert "/" in att.content_type
    if msg.html:
        sanitize_html(msg.html)
    key = env.message_id or derived_message_key(env, raw)
    assert key
    assert content_hash(raw) == content_hash(raw.replace(b"\r\n", b"\n"))


def test_torture_test_yields_attachments() -> None:
    msg = parse_message(_read("flanker/torture.eml"))
    assert msg.envelope.subject == "Multi-media mail demonstration"
    assert len(msg.attachments) >= 4
    types = {a.content_type for a in msg.attachments}
    assert "message/rfc822" in types and "audio/basic" in types
    assert "demonstration of multi-part mail" in msg.text


def test_bilingual_and_8bit_messages_are_readable() -> None:
    assert "А эта линия по-русски." in parse_message(_read("flanker/bilingual-simple.eml")).text
    env = parse_envelope(_read("flanker/bilingual-simple.eml"))
    assert env.subject == "Simple text. How are you? Как ты поживаешь?"
    assert "Превел" in parse_message(_read("flanker/8bitmime.eml")).text


def test_encoded_attachment_names() -> None:
    msg = parse_message(_read("mime4j/russian-headers.msg"))
    assert [a.filename for a in msg.attachments] == ["Список.doc"]
    yahoo = parse_message(_read("flanker/russian-attachment-yahoo.eml"))
    assert yahoo.attachments[0].filename.startswith("Картинка с очень")


def test_long_folded_subject_is_capped() -> None:
    env = parse_envelope(_read("flanker/long-header.eml"))
    assert env.subject.startswith("Die heiße Zypernsonne quälte Max")
    assert len(env.subject) <= 1000


def test_boundary_that_prefixes_another_boundary() -> None:
    msg = parse_message(_read("mime4j/boundary-name-clash.msg"))
    assert msg.text.startswith("Please see attachment for report")
    assert [a.filename for a in msg.attachments] == ["Daily_Stats-2022-05-12-0700.pdf"]
    assert msg.attachments[0].content.startswith(b"%PDF")


def test_bounces_are_auto_submitted() -> None:
    for name in ("flanker/bounce/zed.eml", "flanker/bounce/mailbox-full.eml"):
        assert parse_envelope(_read(name)).auto_submitted, name
    assert not parse_envelope(_read("flanker/text-only.eml")).auto_submitted


def test_whole_corpus_timing() -> None:
    raws = [p.read_bytes() for p in FILES]
    started = time.perf_counter()
    for raw in raws:
        parse_envelope(raw)
    envelope_s = time.perf_counter() - started
    started = time.perf_counter()
    for raw in raws:
        parse_message(raw)
    message_s = time.perf_counter() - started
    print(
        f"\n{len(raws)} messages: parse_envelope {envelope_s / len(raws) * 1000:.3f} ms/msg, "
        f"parse_message {message_s / len(raws) * 1000:.3f} ms/msg"
    )
    assert envelope_s + message_s < 30


def test_corpus_is_present():
    # Without it the parametrized tests above would run on nothing.
    assert len(corpus_files()) > 70
