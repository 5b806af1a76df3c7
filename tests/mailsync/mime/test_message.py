"""parse_message: body selection, attachments, hostile names, broken and hostile structure."""
from __future__ import annotations

import base64
import random
import time

import pytest

from mailsync.mime import Attachment, ParsedMessage, parse_message, sanitize_html

HEAD = (
    "From: a@example.com\r\nTo: b@example.com\r\nSubject: test\r\n"
    "Message-ID: <t@example.com>\r\n"
)


def _mp(subtype: str, boundary: str, *parts: str, head: str = HEAD) -> bytes:
    body = "".join(f"--{boundary}\r\n{p}\r\n" for p in parts) + f"--{boundary}--\r\n"
    return (
        f"{head}MIME-Version: 1.0\r\nContent-Type: multipart/{subtype}; boundary=\"{boundary}\"\r\n"
        f"\r\npreamble\r\n{body}epilogue\r\n"
    ).encode("utf-8")


def _part(ctype: str, body: str, *extra: str) -> str:
    return "\r\n".join([f"Content-Type: {ctype}", *extra, "", body])


def _attachment(
    disposition: str, data: bytes = b"%PDF-1.4 data", ctype: str = "application/pdf"
) -> str:
    return _part(
        ctype,
        base64.b64encode(data).decode(),
        "Content-Transfer-Encoding: base64",
        f"Content-Disposition: {disposition}",
    )


def test_multipart_alternative_picks_text_and_html() -> None:
    raw = _mp(
        "alternative",
        "alt",
        _part("text/plain; charset=utf-8", "Hallo Welt – plain"),
        _part("text/html; charset=utf-8", "<p>Hallo <b>Welt</b></p>"),
    )
    msg = parse_message(raw)
    assert isinstance(msg, ParsedMessage)
    assert msg.text.strip() == "Hallo Welt – plain"
    assert msg.html.strip() == "<p>Hallo <b>Welt</b></p>"
    assert msg.attachments == []
    assert msg.envelope.message_id == "t@example.com"


def test_crlf_and_lf_copies_give_the_same_text() -> None:
    raw = _mp(
        "alternative", "alt", _part("text/plain", "one\r\ntwo"), _part("text/html", "<p>x</p>")
    )
    assert parse_message(raw).text == parse_message(raw.replace(b"\r\n", b"\n")).text


def test_mixed_with_attachments_and_rfc2231_names() -> None:
    raw = _mp(
        "mixed",
        "mix",
        _part("text/plain; charset=iso-8859-1", "Pi\xe8ce jointe",
              "Content-Transfer-Encoding: 8bit"),
        _attachment("attachment; filename*=utf-8''%E2%82%AC%20rates%202024.pdf"),
        _attachment("attachment; filename*0*=utf-8''Jahres; filename*1*=bericht%20%C3%BC.pdf"),
        _attachment('attachment; filename="=?utf-8?B?w6TDtsO8LnBkZg==?="'),
        _attachment("attachment"),
    )
    msg = parse_message(raw.decode("utf-8").encode("latin-1"))
    assert msg.text.strip() == "Pièce jointe"
    names = [a.filename for a in msg.attachments]
    assert names == ["€ rates 2024.pdf", "Jahresbericht ü.pdf", "äöü.pdf", "attachment.pdf"]
    assert all(a.content == b"%PDF-1.4 data" for a in msg.attachments)
    assert all(a.content_type == "application/pdf" for a in msg.attachments)


@pytest.mark.parametrize(
    "disposition, expected",
    [
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ('attachment; filename="C:\\\\Windows\\\\evil.exe"', "evil.exe"),
        ("attachment; filename*=utf-8''invoice%E2%80%AEfdp.exe", "invoicefdp.exe"),
        ("attachment; filename*=utf-8''a%0D%0AX-Injected%3A%20yes.txt", "aX-Injected_ yes.txt"),
        ("attachment; filename*=utf-8''nul%00byte.txt", "nulbyte.txt"),
        ('attachment; filename="=?utf-8?q?line=0D=0Abreak.txt?="', "linebreak.txt"),
        ('attachment; filename="quote\\"s.txt"', "quote_s.txt"),
        ('attachment; filename=".."', "attachment.pdf"),
        ('attachment; filename="   "', "attachment.pdf"),
        ('attachment; filename=".bashrc"', "bashrc"),
    ],
)
def test_hostile_attachment_names(disposition: str, expected: str) -> None:
    raw = _mp("mixed", "m", _part("text/plain", "body"), _attachment(disposition))
    [att] = parse_message(raw).attachments
    assert att.filename == expected
    assert not any(c in att.filename for c in "\x00\r\n/\\\u202e\"")


def test_long_attachment_name_is_capped_and_keeps_extension() -> None:
    raw = _mp("mixed", "m", _attachment(f'attachment; filename="{"a" * 600}.pdf"'))
    [att] = parse_message(raw).attachments
    assert len(att.filename) == 255
    assert att.filename.endswith(".pdf")


def test_declared_type_is_kept_even_when_the_name_lies() -> None:
    # text/html named .pdf: the download view must serve it by content_type, as an attachment.
    raw = _mp("mixed", "m", _part("text/plain", "hi"),
              _attachment('attachment; filename="invoice.pdf"', b"<script>x</script>", "text/html"))
    [att] = parse_message(raw).attachments
    assert (att.filename, att.content_type) == ("invoice.pdf", "text/html")


def test_missing_or_invalid_attachment_type() -> None:
    raw = _mp(
        "mixed", "m",
        "Content-Disposition: attachment; filename=a.bin\r\n\r\nraw",
        _attachment('attachment; filename="b.bin"', ctype="not a type"),
    )
    types = [a.content_type for a in parse_message(raw).attachments]
    assert types == ["application/octet-stream", "application/octet-stream"]


def test_unknown_charset_never_raises() -> None:
    raw = (HEAD + "Content-Type: text/plain; charset=x-klingon\r\n\r\nQapla\xe2\x80\x99").encode(
        "latin-1"
    )
    msg = parse_message(raw)
    assert msg.text == "Qapla\u2019"
    assert any("x-klingon" in d for d in msg.defects)


@pytest.mark.parametrize("charset", ["unicode_escape", "idna", "base64", "zlib", "rot13", "\x00"])
def test_hostile_charsets_are_ignored(charset: str) -> None:
    raw = (
        HEAD.encode()
        + f"Content-Type: text/plain; charset={charset}\r\n\r\n".encode()
        + b"caf\xc3\xa9 \\u0041"
    )
    assert parse_message(raw).text == "café \\u0041"


def test_wrong_declared_charset_falls_back() -> None:
    raw = HEAD.encode() + b"Content-Type: text/plain; charset=us-ascii\r\n\r\nStra\xc3\x9fe"
    assert parse_message(raw).text == "Straße"
    raw = HEAD.encode() + b"Content-Type: text/plain\r\n\r\nStra\xdfe \x93quoted\x94"
    assert parse_message(raw).text == "Straße \u201cquoted\u201d"


def test_utf7_html_decodes_to_markup_that_the_sanitizer_removes() -> None:
    raw = HEAD.encode() + (
        b"Content-Type: text/html; charset=utf-7\r\n\r\n+ADw-script+AD4-alert(1)+ADw-/script+AD4-hi"
    )
    msg = parse_message(raw)
    assert "<script>" in msg.html  # unsanitized by contract
    assert "script" not in sanitize_html(msg.html).html


def test_multipart_without_boundary_keeps_the_body() -> None:
    raw = (HEAD + "Content-Type: multipart/mixed\r\n\r\nJust text really\r\n").encode()
    msg = parse_message(raw)
    assert "Just text really" in msg.text
    assert any("boundary" in d for d in msg.defects)


def test_boundary_that_never_occurs_keeps_the_body() -> None:
    raw = (HEAD + 'Content-Type: multipart/alternative; boundary="zzz"\r\n\r\nAAA\r\n').encode()
    assert parse_message(raw).text.strip() == "AAA"


def test_missing_close_delimiter() -> None:
    raw = (
        HEAD + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nsecond\r\n"
    ).encode()
    msg = parse_message(raw)
    assert "first" in msg.text and "second" in msg.text
    assert any("close delimiter" in d for d in msg.defects)


def test_nested_message_rfc822_becomes_an_eml_attachment() -> None:
    inner = _mp(
        "mixed", "inner",
        _part("text/plain", "inner body"),
        _attachment('attachment; filename="inner.pdf"'),
        head="From: x@example.com\r\nSubject: =?utf-8?q?Original_=C3=BCber?=\r\n",
    ).decode()
    raw = _mp(
        "mixed", "outer", _part("text/plain", "see forwarded"), _part("message/rfc822", inner)
    )
    msg = parse_message(raw)
    assert msg.text.strip() == "see forwarded"
    [att] = msg.attachments
    assert att.filename == "Original über.eml"
    assert att.content_type == "message/rfc822"
    assert b"inner body" in att.content
    assert parse_message(att.content).attachments[0].filename == "inner.pdf"


def test_inline_image_in_related() -> None:
    png = b"\x89PNG\r\n\x1a\nrest"
    raw = _mp(
        "related", "rel",
        _part("text/html", '<p><img src="cid:logo@x"></p>'),
        _part("image/png", base64.b64encode(png).decode(), "Content-Transfer-Encoding: base64",
              "Content-ID: <logo@x>"),
        _attachment('inline; filename="photo.jpg"', b"jpeg", "image/jpeg"),
    )
    msg = parse_message(raw)
    logo, photo = msg.attachments
    assert logo == Attachment("attachment.png", "image/png", png, "logo@x", True)
    assert (photo.filename, photo.inline, photo.content_id) == ("photo.jpg", False, None)
    assert msg.text == ""  # from HTML with only an image
    assert msg.html.startswith("<p><img")


def test_html_only_gets_a_text_version() -> None:
    raw = (HEAD + "Content-Type: text/html; charset=utf-8\r\n\r\n"
           "<html><head><title>T</title><style>p{}</style></head><body><p>Hello&nbsp;<b>you</b></p>"
           "<p>Second &amp; last</p><script>alert(1)</script></body></html>").encode()
    msg = parse_message(raw)
    assert msg.text == "Hello you\nSecond & last"


def test_transfer_encodings() -> None:
    raw = _mp(
        "mixed", "m",
        _part("text/plain; charset=utf-8", "caf=C3=A9 =\r\nsoft break",
              "Content-Transfer-Encoding: quoted-printable"),
        _part("application/octet-stream", "aGVs bG8g\r\n!!**\r\nd29y bGQ",
              "Content-Transfer-Encoding: base64",
              'Content-Disposition: attachment; filename="a.bin"'),
        _part("application/octet-stream", "aGk", "Content-Transfer-Encoding: BASE64",
              'Content-Disposition: attachment; filename="b.bin"'),
        _part("application/octet-stream", "kept as is", "Content-Transfer-Encoding: x-martian",
              'Content-Disposition: attachment; filename="c.bin"'),
    )
    msg = parse_message(raw)
    assert msg.text.strip() == "café soft break"
    assert [a.content for a in msg.attachments] == [b"hello world", b"hi", b"kept as is"]
    assert any("x-martian" in d for d in msg.defects)


def test_digest_parts_default_to_message_rfc822() -> None:
    raw = _mp("digest", "d", "\r\nSubject: first\r\n\r\none", "\r\nSubject: second\r\n\r\ntwo")
    assert [a.filename for a in parse_message(raw).attachments] == ["first.eml", "second.eml"]


def test_nul_bytes_removed_from_bodies() -> None:
    raw = _mp(
        "alternative", "a", _part("text/plain", "a\x00b"), _part("text/html", "<p>c\x00d</p>")
    )
    msg = parse_message(raw)
    assert "\x00" not in msg.text + msg.html
    assert msg.text.strip() == "ab"


def _nested(levels: int) -> bytes:
    head = HEAD
    body = "Content-Type: text/plain\r\n\r\ndeepest\r\n"
    for i in range(levels):
        body = (f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n'
                f"--b{i}\r\n{body}\r\n--b{i}--\r\n")
    return (head + body).encode()


def test_three_thousand_levels_of_nesting() -> None:
    raw = _nested(3000)
    started = time.perf_counter()
    msg = parse_message(raw)
    elapsed = time.perf_counter() - started
    assert any("nesting deeper than 50" in d for d in msg.defects)
    assert elapsed < 10  # ~0.1 s here; the stdlib dies with RecursionError
    shallow = parse_message(_nested(10))
    assert shallow.text.strip() == "deepest"


def test_ten_thousand_tiny_parts_are_bounded() -> None:
    parts = [
        _part("application/octet-stream", f"p{i}", f"Content-Disposition: attachment; filename={i}")
        for i in range(10_000)
    ]
    raw = _mp("mixed", "many", *parts)
    started = time.perf_counter()
    msg = parse_message(raw, max_parts=2000)
    elapsed = time.perf_counter() - started
    assert len(msg.attachments) < 2000
    assert msg.attachments[0].content == b"p0"
    assert any("2000" in d for d in msg.defects)
    assert elapsed < 10
    assert len(parse_message(raw, max_parts=50).attachments) < 50


def test_deeply_nested_html_only_message_is_fast() -> None:
    raw = (HEAD + "Content-Type: text/html\r\n\r\n" + "<div>" * 100_000 + "bottom").encode()
    started = time.perf_counter()
    msg = parse_message(raw)
    assert time.perf_counter() - started < 5  # ~17 s if html_to_text fed this to nh3 as is
    assert msg.text == "bottom"


def test_never_raises_on_mangled_messages() -> None:
    rng = random.Random(99)
    seed = _mp(
        "mixed", "m",
        _part("text/plain; charset=utf-8", "hello"),
        _attachment("attachment; filename*=utf-8''%E2%82%AC.pdf"),
        _part("message/rfc822", "Subject: x\r\n\r\ny"),
    )
    for _ in range(300):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 20)):
            op = rng.random()
            pos = rng.randrange(len(data)) if data else 0
            if op < 0.4 and data:
                del data[pos:pos + rng.randint(1, 40)]
            elif op < 0.8:
                junk = (rng.choice(b"-=;\"'*\r\n\x00\xff?") for _ in range(rng.randint(1, 5)))
                data[pos:pos] = bytes(junk)
            else:
                data = data[: rng.randrange(len(data) + 1)]
        msg = parse_message(bytes(data))
        assert isinstance(msg.text, str) and isinstance(msg.attachments, list)
        assert all(a.filename for a in msg.attachments)


def test_a_message_with_only_cr_line_ends_is_read_with_its_parts() -> None:
    """Classic Mac OS mail programs and some old gateways end lines with a bare CR. The
    body's MIME structure was shown as text (boundaries, part headers and base64 and all)
    and the attachment was lost; now it reads as the CRLF copy does, with a defect noted."""
    crlf = (b"From: A <a@x.example>\r\nTo: b@y.example\r\nSubject: Hello CR\r\nMessage-ID: <1@x>\r\n"
            b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\nContent-Type: text/plain\r\n\r\n"
            b"plain body\r\nsecond line\r\n--BB\r\nContent-Type: application/pdf; name=q.pdf\r\n"
            b"Content-Disposition: attachment; filename=q.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"JVBERi0xLjQK\r\n--BB--\r\n")
    cr_only = crlf.replace(b"\r\n", b"\r")
    expected, got = parse_message(crlf), parse_message(cr_only)
    assert got.text == expected.text == "plain body\nsecond line"
    assert [(a.filename, a.content) for a in got.attachments] == [("q.pdf", b"%PDF-1.4\n")]
    assert got.envelope.subject == "Hello CR"
    assert "bare CR line ends (read as CRLF)" in got.defects
    # A bare CR inside a normal CRLF message is not a line end (RFC 5322) and changes nothing.
    odd = crlf.replace(b"plain body", b"plain\rbody")
    assert "bare CR" not in " ".join(parse_message(odd).defects)
