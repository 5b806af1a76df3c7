"""parse_envelope and the header helpers: encoded words, addresses, ids, dates, bounds."""
from __future__ import annotations

import random
import time
from datetime import datetime, timezone

UTC = timezone.utc

import pytest

from mailsync.mime import (
    Address,
    content_hash,
    derived_message_key,
    normalize_message_id,
    parse_envelope,
)


def _msg(*headers: str, body: str = "Hello\n") -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8")


# --- encoded words and folding -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_subject, expected",
    [
        ("=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Grüße aus Köln"),
        ("=?UTF-8?B?R3LDvMOfZQ==?=", "Grüße"),
        ("=?iso-8859-1?q?caf=E9?=", "café"),
        ("=?ISO-8859-1?B?Y2Fm6Q==?=", "café"),
        # RFC 2047 §6.2: white space between adjacent encoded words disappears...
        ("=?utf-8?q?Hello_?= =?utf-8?q?World?=", "Hello World"),
        ("=?utf-8?q?ab?=\r\n =?utf-8?q?cd?=", "abcd"),
        # ...but not between an encoded word and plain text.
        ("Re: =?utf-8?q?caf=C3=A9?= time", "Re: café time"),
        # A UTF-8 character split across two words (illegal but common) still decodes.
        ("=?utf-8?B?w6k=?= =?utf-8?B?w6k=?=", "éé"),
        ("=?utf-8?b?4oKs?=", "€"),
        ("plain subject", "plain subject"),
        ("=?utf-8?q?unterminated", "=?utf-8?q?unterminated"),
        ("=?x-unknown-charset?q?abc?=", "abc"),
    ],
)
def test_subject_encoded_words(raw_subject: str, expected: str) -> None:
    env = parse_envelope(_msg(f"Subject: {raw_subject}"))
    assert env.subject == expected


def test_folded_subject_is_unfolded() -> None:
    env = parse_envelope(b"Subject: a long\r\n subject\r\n\tfolded twice\r\n\r\nbody")
    assert env.subject == "a long subject folded twice"


def test_encoded_crlf_in_subject_cannot_inject_headers() -> None:
    # Given a subject that decodes to CR/LF (a reply reusing it would gain a Bcc header)
    env = parse_envelope(_msg("Subject: =?utf-8?q?hi=0D=0ABcc:_victim@example.com?="))
    # Then the decoded subject is one line
    assert "\r" not in env.subject and "\n" not in env.subject
    assert env.subject == "hi Bcc: victim@example.com"


def test_subject_is_capped() -> None:
    words = " ".join(["=?utf-8?q?Zypernsonne_qu=C3=A4lte?="] * 20_000)
    env = parse_envelope(_msg(f"Subject: {words}"))
    assert 0 < len(env.subject) <= 1000
    assert env.subject.startswith("Zypernsonne quälte")


# --- addresses ---------------------------------------------------------------------------------


def test_encoded_word_in_addr_spec_stays_literal() -> None:
    # RFC 2047 §5: encoded words are never decoded inside an address.
    env = parse_envelope(_msg("To: =?utf-8?q?admin?=@example.com"))
    assert env.to == [Address(name="", email="=?utf-8?q?admin?=@example.com")]
    assert env.to[0].key != "admin@example.com"


def test_display_name_that_looks_like_an_address() -> None:
    env = parse_envelope(_msg('From: "ceo@victim.com" <attacker@evil>'))
    assert env.from_ == [Address(name="ceo@victim.com", email="attacker@evil")]
    assert env.from_[0].key == "attacker@evil"


def test_display_names_decode_and_domains_lower_case() -> None:
    env = parse_envelope(
        _msg(
            "From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <Joerg.Mueller@EXAMPLE.COM>",
            'To: "Smith, Jane" <jane@x.example>, bob@y.example, undisclosed-recipients:;',
            "Cc: =?iso-8859-1?q?Ren=E9?= <rene@z.example>",
        )
    )
    assert env.from_[0].name == "Jörg Müller"
    assert env.from_[0].email == "Joerg.Mueller@example.com"  # local part kept as written
    assert env.from_[0].key == "joerg.mueller@example.com"
    assert [a.email for a in env.to] == ["jane@x.example", "bob@y.example"]
    assert env.to[0].name == "Smith, Jane"
    assert env.cc[0].name == "René"


@pytest.mark.parametrize(
    "email, key",
    [
        ("  Bob@Example.COM ", "bob@example.com"),
        ("not-an-address", ""),
        ("a@b@c", ""),
        ("@example.com", ""),
        ("bob@", ""),
        ("bob smith@example.com", ""),
        ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
        ("Bob@Example.COM.", "bob@example.com"),  # a fully qualified domain: the same one
        ("bob@.", ""),
        ("bob@example..com", ""),
        ("", ""),
    ],
)
def test_address_key(email: str, key: str) -> None:
    assert Address(name="", email=email).key == key


def test_weird_address_headers_do_not_raise() -> None:
    env = parse_envelope(
        _msg('To: "', "Cc: (only a comment)", "Bcc: <>", 'Reply-To: "unterminated <a@b>')
    )
    assert all(isinstance(a, Address) for a in env.to + env.cc + env.bcc + env.reply_to)


@pytest.mark.parametrize(
    "value",
    ["(" * 50_000 + "a@b.example", "a:" * 50_000 + "a@b.example", "<" * 100_000, "a@b " * 100_000],
)
def test_pathological_address_headers_are_bounded(value: str) -> None:
    # getaddresses alone recurses to RecursionError on the first two and is slow on the rest.
    started = time.perf_counter()
    env = parse_envelope(_msg(f"To: {value}", "Cc: ok@example.com"))
    assert time.perf_counter() - started < 5
    assert len(env.to) <= 1000
    assert [a.email for a in env.cc] == ["ok@example.com"]


def test_twenty_thousand_recipients_are_bounded_and_fast() -> None:
    to = ", ".join(f'"User {i}" <user{i}@example.com>' for i in range(20_000))
    raw = _msg("From: a@example.com", f"To: {to}", "Message-ID: <x@y>")
    started = time.perf_counter()
    env = parse_envelope(raw)
    elapsed = time.perf_counter() - started
    assert len(env.to) == 1000
    assert env.to[0].email == "user0@example.com"
    assert any("cut at 1000" in d for d in env.defects)
    assert elapsed < 5  # ~20 ms here; the stdlib alone takes seconds on the whole header


def test_several_from_headers_use_the_first() -> None:
    env = parse_envelope(_msg("From: first@example.com", "From: second@example.com"))
    assert [a.email for a in env.from_] == ["first@example.com"]
    assert any("from" in d for d in env.defects)


# --- message ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("<a@b>", "a@b"),
        (" <a@b> ", "a@b"),
        ("a@b", "a@b"),
        ("<a@b", "a@b"),
        ("\u2039[1a2b3c]@microsoft.com>", "[1a2b3c]@microsoft.com"),
        ("<very.long.id\r\n @host>", "very.long.id@host"),
        ("<a@b> <c@d>", "a@b"),
        ("<CaseKept@Host.Example>", "CaseKept@Host.Example"),
        ("<a\x00b@c>", "ab@c"),
        ("<>", None),
        ("", None),
        ("   ", None),
        (None, None),
        ("<" + "x" * 2000 + "@y>", None),
    ],
)
def test_normalize_message_id(value: str | None, expected: str | None) -> None:
    assert normalize_message_id(value) == expected


def test_message_id_from_header() -> None:
    assert parse_envelope(_msg("Message-ID:  <abc@host> ")).message_id == "abc@host"
    assert parse_envelope(_msg("Message-Id: \u2039[x]@microsoft.com>")).message_id == (
        "[x]@microsoft.com"
    )
    env = parse_envelope(_msg("Subject: none"))
    assert env.message_id is None
    assert "no Message-ID" in env.defects


def test_references_keep_order_dedupe_and_cap() -> None:
    ids = [f"<id{i}@example.com>" for i in range(500)]
    folded = "\r\n ".join(ids[:250] + ids[:10] + ids[250:])
    env = parse_envelope(_msg(f"References: {folded}", "In-Reply-To: <id499@example.com>"))
    assert len(env.references) == 100
    # The root and the most recent ancestors survive the cap (RFC 5322 §3.6.4).
    assert env.references[0] == "id0@example.com"
    assert env.references[-1] == "id499@example.com"
    assert env.references[1] == "id401@example.com"
    assert len(set(env.references)) == 100
    assert env.in_reply_to == ["id499@example.com"]


def test_in_reply_to_with_comment_and_missing_brackets() -> None:
    env = parse_envelope(
        _msg('In-Reply-To: "Joe\'s message of Monday" <a@b>', "References: x@y z@w")
    )
    assert env.in_reply_to == ["a@b"]
    assert env.references == ["x@y", "z@w"]


# --- dates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Mon, 6 May 2024 10:15:00 +0200", datetime(2024, 5, 6, 8, 15, tzinfo=timezone.utc)),
        ("6 May 2024 10:15:00 -0000", datetime(2024, 5, 6, 10, 15, tzinfo=timezone.utc)),
        ("Wed, 11 Feb 98 11:51 CST", datetime(1998, 2, 11, 17, 51, tzinfo=timezone.utc)),
        ("Sat, 1 Jan 05 00:00:00 GMT", datetime(2005, 1, 1, tzinfo=timezone.utc)),
        ("Tue, 3 Oct 2006 14:07:35 +0000 (UTC)", datetime(2006, 10, 3, 14, 7, 35, tzinfo=UTC)),
        ("Fri, 31 Dec 2016 23:59:60 +0000", datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("Mon, 30 Feb 2020 10:00:00 +0000", None),
        ("Mon, 1 Jan 0000 00:00:00 +0000", None),
        ("Mon, 1 Jan 1850 00:00:00 +0000", None),
        ("Mon, 1 Foo 2020 00:00:00 +0000", None),
        ("Mon, 1 Jan 2020 25:00:00 +0000", None),
        ("yesterday-ish", None),
        ("", None),
    ],
)
def test_dates(value: str, expected: datetime | None) -> None:
    env = parse_envelope(_msg(f"Date: {value}"))
    assert env.date == expected
    if env.date is not None:
        assert env.date.tzinfo is not None and env.date.utcoffset().total_seconds() == 0


def test_missing_date() -> None:
    assert parse_envelope(_msg("Subject: x")).date is None


# --- bytes-level hazards -----------------------------------------------------------------------


def test_nul_bytes_are_stripped() -> None:
    raw = (
        b"Subject: a\x00b\r\nFrom: \"Eve\x00\" <eve@example.com>\r\n"
        b"Message-ID: <x\x00@y>\r\nCc: =?utf-8?q?Mal=00lory=0D=0A?= <m@example.com>\r\n\r\nhi"
    )
    env = parse_envelope(raw)
    assert env.subject == "ab"
    assert env.from_[0].name == "Eve"
    assert env.message_id == "x@y"
    assert env.cc[0].name == "Mallory"


def test_raw_utf8_headers_rfc6532() -> None:
    raw = "Subject: Grüße\r\nFrom: Jörg <jörg@bücher.example>\r\n\r\nx".encode("utf-8")
    env = parse_envelope(raw)
    assert env.subject == "Grüße"
    assert env.from_[0].name == "Jörg"
    assert env.from_[0].key == "jörg@bücher.example"


def test_raw_legacy_8bit_header_uses_body_charset() -> None:
    raw = "Subject: Привет\r\nContent-Type: text/plain; charset=koi8-r\r\n\r\nx".encode("koi8-r")
    assert parse_envelope(raw).subject == "Привет"
    raw = b"Subject: caf\xe9\r\n\r\nx"  # no charset anywhere: windows-1252
    assert parse_envelope(raw).subject == "café"


@pytest.mark.parametrize(
    "raw",
    [b"", b"\r\n\r\nbody only", b"no headers at all", b"Subject: only headers", b"\n\n\n",
     b"From nobody Mon Jan 1 00:00:00 2024\nSubject: mbox\n\nx"],
)
def test_missing_headers(raw: bytes) -> None:
    env = parse_envelope(raw)
    assert env.from_ == [] and env.to == []
    assert env.date is None


def test_mbox_from_line_is_skipped() -> None:
    env = parse_envelope(b"From nobody Mon Jan 1 00:00:00 2024\nSubject: mbox\n\nx")
    assert env.subject == "mbox"


def test_obsolete_space_before_colon() -> None:
    assert parse_envelope(b"Subject : spaced\r\n\r\nx").subject == "spaced"


def test_huge_header_block_is_bounded() -> None:
    raw = b"Subject: big\r\n" + b"X-Junk: " + b"a" * (3 << 20) + b"\r\n\r\nbody"
    env = parse_envelope(raw)
    assert env.subject == "big"
    assert any("truncated" in d for d in env.defects)


def test_auto_submitted_and_list_id() -> None:
    assert parse_envelope(_msg("Auto-Submitted: auto-replied")).auto_submitted
    assert not parse_envelope(_msg("Auto-Submitted: no")).auto_submitted
    assert not parse_envelope(_msg("Subject: x")).auto_submitted
    report = _msg("Content-Type: multipart/report; report-type=delivery-status; boundary=b")
    assert parse_envelope(report).auto_submitted
    assert parse_envelope(_msg("Return-Path: <>")).auto_submitted
    env = parse_envelope(_msg("List-Id: Sales team <sales.lists.example.com>"))
    assert env.list_id == "sales.lists.example.com"


def test_never_raises_on_random_bytes() -> None:
    rng = random.Random(1234)
    alphabet = b"abc:<>@\"=?\r\n \t\x00\xff\xc3(),;-QB_"
    for _ in range(300):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        env = parse_envelope(raw)
        assert isinstance(env.subject, str)
    for odd in ("a str", None, bytearray(b"Subject: x\n\n"), memoryview(b"Subject: y\n\n")):
        assert isinstance(parse_envelope(odd).subject, str)  # type: ignore[arg-type]


# --- hashes and derived keys -------------------------------------------------------------------


def test_content_hash_ignores_line_ending_style() -> None:
    lf = b"Subject: x\n\nline 1\nline 2\n"
    assert content_hash(lf) == content_hash(lf.replace(b"\n", b"\r\n"))
    assert content_hash(lf) != content_hash(lf + b"more")
    assert len(content_hash(lf)) == 64


def test_derived_message_key_is_stable_across_copies() -> None:
    base = _msg("From: a@example.com", "To: b@example.com", "Subject: hi",
                "Date: Mon, 6 May 2024 10:15:00 +0200", body="Body text\r\n")
    copy = b"Received: from mx by imap; Mon, 6 May 2024 10:16:00 +0200\r\n" + base.replace(
        b"\r\n", b"\n"
    )
    key = derived_message_key(parse_envelope(base), base)
    assert key.startswith("derived:")
    assert key == derived_message_key(parse_envelope(copy), copy)
    other = base.replace(b"Body text", b"Other text")
    assert key != derived_message_key(parse_envelope(other), other)


def test_typical_envelope_speed() -> None:
    raw = _msg(
        *[
            f"Received: from relay{i}.example.net by mx.example.com;"
            f" Mon, 6 May 2024 10:15:0{i} +0200"
            for i in range(6)
        ],
        "From: =?utf-8?q?J=C3=B6rg?= <joerg@example.com>",
        "To: Sales <sales@example.com>, b@example.com",
        "Cc: c@example.com",
        "Subject: =?utf-8?q?Angebot_f=C3=BCr_Q3?=",
        "Date: Mon, 6 May 2024 10:15:00 +0200",
        "Message-ID: <CAKsfaBUx-V4rGeteUi3mDc@mail.gmail.com>",
        "In-Reply-To: <prev@mail.gmail.com>",
        "References: <root@mail.gmail.com> <prev@mail.gmail.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        body="Hello\r\n" * 200,
    )
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        parse_envelope(raw)
    per_message_ms = (time.perf_counter() - started) / rounds * 1000
    print(f"parse_envelope: {per_message_ms:.3f} ms per typical message")
    assert per_message_ms < 20  # loose: the target is < 0.3 ms; this only catches blow-ups
