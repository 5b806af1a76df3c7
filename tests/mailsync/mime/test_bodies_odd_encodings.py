"""Bodies and attachments as a user sees them after emails_parse_pending's parse."""
from __future__ import annotations

import base64
import struct

from mailsync.mime.message import parse_message

H = b"From: a@client.example\r\nTo: sales@example.test\r\nSubject: t\r\nMessage-ID: <p@x>\r\nMIME-Version: 1.0\r\n"


def single(headers: bytes, body: bytes) -> bytes:
    return H + headers + b"\r\n\r\n" + body


def mixed(*parts: bytes, sub: bytes = b"mixed") -> bytes:
    out = H + b"Content-Type: multipart/" + sub + b"; boundary=XX\r\n\r\n"
    out += b"--XX\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
    for p in parts:
        out += b"--XX\r\n" + p + b"\r\n"
    return out + b"--XX--\r\n"


# -- charsets ---------------------------------------------------------------------------------

def test_iso_2022_jp_plain():
    raw = single(b"Content-Type: text/plain; charset=iso-2022-jp", "会議について".encode("iso2022_jp"))
    assert parse_message(raw).text == "会議について"


def test_iso_2022_jp_with_one_nec_special_char_is_not_shown_as_escape_codes():
    # Outlook/Japanese clients put NEC row-13 chars (①, ㈱) under the iso-2022-jp label (CP50220).
    body = "会議".encode("iso2022_jp")[:-3] + b"\x2d\x21" + "について".encode("iso2022_jp")[3:]
    text = parse_message(single(b"Content-Type: text/plain; charset=iso-2022-jp", body)).text
    assert "\x1b" not in text, repr(text)
    assert "会議" in text and "について" in text, repr(text)


def test_gb2312_label_with_gbk_only_characters():
    raw = single(b"Content-Type: text/plain; charset=gb2312", "你好，镕基 綫".encode("gbk"))
    assert parse_message(raw).text == "你好，镕基 綫"


def test_windows_1252_labelled_latin1():
    raw = single(b"Content-Type: text/plain; charset=iso-8859-1", b"\x93quote\x94 \x80 caf\xe9")
    assert parse_message(raw).text == "\u201cquote\u201d \u20ac caf\u00e9"


def test_utf8_with_a_few_invalid_bytes_keeps_the_rest():
    raw = single(b"Content-Type: text/plain; charset=utf-8", "héllo wörld ".encode() + b"\xff ok")
    text = parse_message(raw).text
    assert text.startswith("héllo wörld ") and text.endswith(" ok")


def test_utf8_label_on_windows_1252_text():
    raw = single(b"Content-Type: text/plain; charset=utf-8", b"caf\xe9 na\xefve \x93x\x94")
    assert parse_message(raw).text == "café naïve \u201cx\u201d"


def test_qp_soft_line_breaks():
    raw = single(b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable",
                 b"Hello wor=\r\nld caf=C3=A9")
    assert parse_message(raw).text == "Hello world café"


def test_qp_soft_line_break_with_trailing_whitespace_added_in_transport():
    # RFC 2045 §6.7 (3): trailing white space must be deleted; "=" + spaces + CRLF is a soft break.
    raw = single(b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable",
                 b"Hello wor= \t\r\nld")
    assert parse_message(raw).text == "Hello world"


def test_format_flowed_delsp_is_unflowed():
    raw = single(b"Content-Type: text/plain; charset=utf-8; format=flowed; delsp=yes",
                 b"A long line that was flo \r\nwed by the client.\r\n")
    assert parse_message(raw).text.strip() == "A long line that was flowed by the client."



def test_base64_attachment_encoded_in_padded_chunks_keeps_its_bytes():
    body = base64.b64encode(b"Hi") + b"\r\n" + base64.b64encode(b"!")  # "SGk=\r\nIQ=="
    raw = mixed(b"Content-Type: text/plain; name=x.txt\r\nContent-Disposition: attachment; filename=x.txt\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + body)
    [att] = parse_message(raw).attachments
    assert att.content == b"Hi!"


def test_list_footer_after_a_base64_body_is_shown_as_text_not_junk():
    """A mailing list appended its footer, unencoded, to a base64 body (found by a probe:
    the footer's letters were decoded as base64 and the user saw junk at the end)."""
    text = "Grüße aus Köln,\nwir möchten ein Angebot.\n".encode("utf-8")
    body = base64.encodebytes(text).replace(b"\n", b"\r\n")
    footer = (b"\r\n_______________________________________________\r\n"
              b"Unsubscribe\r\nsales-list mailing list: https://lists.example/sales\r\n")
    parsed = parse_message(single(b"Content-Type: text/plain; charset=utf-8\r\n"
                                  b"Content-Transfer-Encoding: base64", body + footer))
    assert parsed.text.startswith("Grüße aus Köln,\nwir möchten ein Angebot.")
    assert parsed.text.rstrip().endswith("sales-list mailing list: https://lists.example/sales")
    assert "Unsubscribe" in parsed.text and "\ufffd" not in parsed.text


def test_clean_base64_and_base64_with_a_stray_character_decode_as_before():
    text = b"Plain words. " * 20
    body = base64.encodebytes(text).replace(b"\n", b"\r\n")
    assert parse_message(single(b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64", body)
                         ).text.strip() == text.decode().strip()
    # A stray character inside the data (RFC 2045 6.8: ignored) is not taken for a footer:
    # the line goes on with data after it... it is the last line here, so it is data too.
    odd = body[:20] + b"!" + body[20:]
    assert "Plain words." in parse_message(
        single(b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64", odd)).text


# -- attachments ------------------------------------------------------------------------------

def test_rfc2231_continuations_with_charset():
    raw = mixed(b"Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n"
                b" filename*0*=utf-8''%E2%82%AC%20Angebot%20;\r\n filename*1*=r%C3%A9sum%C3%A9;\r\n"
                b" filename*2=\".pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0x")
    [att] = parse_message(raw).attachments
    assert (att.filename, att.content_type, att.content) == ("€ Angebot résumé.pdf", "application/pdf", b"%PDF-1")


def test_name_only_in_content_type_and_rfc2047_in_quotes():
    raw = mixed(b"Content-Type: application/pdf; name=\"=?UTF-8?B?w6l0w6kucGRm?=\"\r\n\r\n%PDF")
    [att] = parse_message(raw).attachments
    assert att.filename == "été.pdf"


def test_inline_image_vs_attachment():
    raw = mixed(
        b"Content-Type: image/png; name=logo.png\r\nContent-ID: <logo@x>\r\nContent-Disposition: inline\r\n\r\nPNG1",
        b"Content-Type: image/png; name=photo.png\r\nContent-ID: <photo@x>\r\n"
        b"Content-Disposition: attachment; filename=photo.png\r\n\r\nPNG2",
        b"Content-Type: image/png; name=plain.png\r\nContent-Disposition: inline; filename=plain.png\r\n\r\nPNG3",
    )
    got = {a.filename: a.inline for a in parse_message(raw).attachments}
    assert got == {"logo.png": True, "photo.png": False, "plain.png": False}


def test_attachment_with_no_filename_gets_a_typed_name():
    raw = mixed(b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=",
                b"Content-Type: text/calendar; method=REQUEST\r\n\r\nBEGIN:VCALENDAR")
    assert [(a.filename, a.content_type) for a in parse_message(raw).attachments] == [
        ("attachment.png", "image/png"), ("attachment.ics", "text/calendar")]


def test_forwarded_message_rfc822_is_one_eml_named_after_its_subject():
    inner = b"From: x@y.z\r\nSubject: Inner subj\r\n\r\ninner body\r\n"
    [att] = parse_message(mixed(b"Content-Type: message/rfc822\r\n\r\n" + inner)).attachments
    assert (att.filename, att.content_type, att.content.rstrip()) == ("Inner subj.eml", "message/rfc822", inner.rstrip())


def _tnef(files: list[tuple[str, bytes]]) -> bytes:
    def attr(level: int, ident: int, data: bytes) -> bytes:
        return bytes([level]) + struct.pack("<II", ident, len(data)) + data + struct.pack("<H", sum(data) & 0xFFFF)
    out = struct.pack("<IH", 0x223E9F78, 0x0001) + attr(1, 0x00089006, struct.pack("<I", 0x00010000))
    for name, data in files:
        out += attr(2, 0x00069002, b"\x01\x00" + b"\xff" * 12)  # attAttachRendData
        out += attr(2, 0x00018010, name.encode() + b"\x00")     # attAttachTitle
        out += attr(2, 0x0006800F, data)                         # attAttachData
    return out


def _tnef(files: list[tuple[bytes, bytes]]) -> bytes:
    """A winmail.dat as Outlook writes it (MS-OXTNEF 2.1.3): signature, key, then records of
    level, id, type, length, data, checksum; each attachment starts with attAttachRendData."""
    def record(level: int, name: int, kind: int, data: bytes) -> bytes:
        return (struct.pack("<BHHI", level, name, kind, len(data)) + data
                + struct.pack("<H", sum(data) & 0xFFFF))

    out = struct.pack("<IH", 0x223E9F78, 0x0001)
    out += record(1, 0x9006, 0x0008, struct.pack("<I", 0x00010000))  # attTnefVersion
    out += record(1, 0x9007, 0x0006, struct.pack("<II", 1252, 0))  # attOemCodepage
    for name, data in files:
        out += record(2, 0x9002, 0x0006, b"\x01\x00" + b"\xff" * 12)  # attAttachRendData
        out += record(2, 0x8010, 0x0001, name + b"\x00")  # attAttachTitle
        out += record(2, 0x800F, 0x0006, data)  # attAttachData
    return out


def test_outlook_winmail_dat_shows_the_files_inside_it():
    """Outlook (rich text) sends its attachments packed in winmail.dat: the user sees the
    files themselves, as in their mail program, not one unreadable winmail.dat."""
    tnef = _tnef([(b"Angebot.pdf", b"%PDF-1.4 offer"), (b"Preise.xlsx", b"PK\x03\x04sheet")])
    raw = mixed(b"Content-Type: application/ms-tnef; name=\"winmail.dat\"\r\n"
                b"Content-Disposition: attachment; filename=\"winmail.dat\"\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(tnef))
    parsed = parse_message(raw)
    assert [(a.filename, a.content_type, a.content) for a in parsed.attachments] == [
        ("Angebot.pdf", "application/pdf", b"%PDF-1.4 offer"),
        ("Preise.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", b"PK\x03\x04sheet"),
    ]


def test_an_unreadable_winmail_dat_is_kept_as_it_came():
    junk = b"\x78\x9f\x3e\x22" + b"\xff" * 40  # the signature, then nonsense
    raw = mixed(b"Content-Type: application/ms-tnef\r\nContent-Disposition: attachment; "
                b"filename=winmail.dat\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(junk))
    [att] = parse_message(raw).attachments
    assert (att.filename, att.content) == ("winmail.dat", junk)


def test_a_boundary_string_inside_a_line_is_not_a_delimiter():
    """Only a line that starts with "--boundary" splits the parts (RFC 2046 5.1.1)."""
    raw = (H + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\n"
           b"see the --XX marker and x--XX-- too\r\n--XX--\r\n")
    assert parse_message(raw).text.strip() == "see the --XX marker and x--XX-- too"
