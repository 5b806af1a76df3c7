"""Review session 11: hostile and odd mail, from the parser to the API.

Each test is a mail a real client or script sends; the ones marked "was:" failed before the fix
beside them."""
from __future__ import annotations

import base64

import pytest
from rest_framework.test import APIClient

from mailsync import services
from mailsync.mime import parse_message
from mailsync.mime.message import inline_only_if_shown
from mailsync.models import Email, Mailbox

HEAD = ("From: Customer <customer@client.example>\r\nTo: sales@example.test\r\n"
        "Subject: odd\r\nDate: Thu, 1 Jan 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n")
JPEG = b"\xff\xd8\xff\xe0 photo bytes"


def _apple_photo_mail(n: int = 1) -> bytes:
    # Apple Mail / iOS: a plain-text body and the photo as an inline part with a Content-ID.
    return (HEAD.replace("odd", f"Photo {n}") + f"Message-ID: <photo{n}@client.example>\r\n"
            "Content-Type: multipart/mixed; boundary=\"Apple-Mail=_1\"\r\n\r\n"
            "--Apple-Mail=_1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "Here is the site photo.\r\n"
            "--Apple-Mail=_1\r\nContent-Disposition: inline; filename=IMG_0001.jpg\r\n"
            "Content-Type: image/jpeg; name=\"IMG_0001.jpg\"\r\nContent-Id: <A1B2-C3@client.example>\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(JPEG).decode() + "--Apple-Mail=_1--\r\n").encode()


# -- attachments ------------------------------------------------------------------------------

def test_an_inline_photo_under_a_plain_text_body_is_listed_as_an_attachment():
    # was: stored inline, so neither the email page nor has_attachments showed the photo at all.
    [photo] = inline_only_if_shown(parse_message(_apple_photo_mail()).attachments, "")
    assert (photo.filename, photo.content, photo.inline) == ("IMG_0001.jpg", JPEG, False)


def test_an_inline_image_the_html_does_not_show_is_listed_but_a_shown_one_stays_inline():
    raw = (HEAD + "Content-Type: multipart/related; boundary=R\r\n\r\n"
           "--R\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hi <img src=\"CID:logo%40x\"></p>\r\n"
           "--R\r\nContent-Type: image/png\r\nContent-ID: <logo@x>\r\n\r\npng\r\n"
           "--R\r\nContent-Type: image/png; name=chart.png\r\nContent-ID: <chart@x>\r\n\r\nchart\r\n"
           "--R--\r\n").encode()
    parsed = parse_message(raw)
    logo, chart = inline_only_if_shown(parsed.attachments, parsed.html)
    assert (logo.content_id, logo.inline) == ("logo@x", True)
    assert (chart.filename, chart.inline) == ("chart.png", False)


# -- Content-Type written the way scripts and old clients write it ------------------------------

@pytest.mark.parametrize("ctype", [
    "text/plain charset=utf-8",  # the ";" forgotten (PHP mail() scripts)
    "text/plain (body text); charset=utf-8",  # an RFC 2045 comment
    "text / plain; charset=utf-8",
])
def test_a_body_whose_content_type_is_written_oddly_is_still_the_body(ctype):
    # was: the body became "attachment.bin" and the mail showed no text.
    msg = parse_message((HEAD + f"Content-Type: {ctype}\r\n\r\n").encode() + "Grüße aus Köln".encode())
    assert msg.text == "Grüße aus Köln" and msg.attachments == []


def test_a_multipart_whose_boundary_lost_its_semicolon_is_still_split():
    # was: no boundary found, so the whole MIME source (base64 and all) was the text body.
    raw = (HEAD + 'Content-Type: multipart/mixed boundary="=_b 1"\r\n\r\n'
           "--=_b 1\r\nContent-Type: text/plain\r\n\r\nSee the quote.\r\n"
           "--=_b 1\r\nContent-Type: application/pdf; name=quote.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           "JVBERi0x\r\n--=_b 1--\r\n").encode()
    msg = parse_message(raw)
    assert msg.text == "See the quote."
    assert [(a.filename, a.content) for a in msg.attachments] == [("quote.pdf", b"%PDF-1")]


def test_a_charset_with_a_comment_is_still_that_charset():
    msg = parse_message((HEAD + 'Content-Type: text/plain; charset="iso-8859-2" (Central European)\r\n\r\n')
                        .encode() + "Łódź".encode("iso-8859-2"))
    assert msg.text == "Łódź"
    assert not any("unknown charset" in d for d in msg.defects)


def test_html_without_a_charset_uses_its_meta_charset_but_valid_utf8_still_wins():
    # was: decoded as cp1252, Japanese shown as mojibake.
    sjis = parse_message((HEAD + "Content-Type: text/html\r\n\r\n").encode()
                         + b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=Shift_JIS">'
                         + b"</head><body>" + "お見積りの件".encode("shift_jis") + b"</body></html>")
    assert "お見積りの件" in sjis.html and sjis.text == "お見積りの件"
    lying = parse_message((HEAD + "Content-Type: text/html\r\n\r\n").encode()
                          + b'<meta charset="iso-8859-1"><p>' + "Grüße".encode() + b"</p>")
    assert lying.text == "Grüße"


# -- through a real sync, the parse task and the API --------------------------------------------

@pytest.mark.django_db
def test_odd_mails_sync_parse_and_show_in_the_api(dovecot, mail_user, imap_mailbox):
    odd = {
        "photo": _apple_photo_mail(7),
        "no semicolon": (HEAD.replace("odd", "no semicolon") + "Message-ID: <semi@client.example>\r\n"
                         "Content-Type: text/html charset=utf-8\r\n\r\n<p>Preis: 5 \xe2\x82\xac</p>\r\n").encode("latin-1"),
        "header only": (HEAD.replace("odd", "header only") + "Message-ID: <head@client.example>\r\n").encode(),
        # (Dovecot sends a NUL as 0x80 and a bare CR as CRLF: the parser sees those.)
        "long id": (HEAD.replace("odd", "long id")
                    + "Message-ID: <" + "x" * 10_000 + "@client.example>\r\n\r\nbo\x00dy\r\n").encode(),
    }
    for raw in odd.values():
        dovecot.append(mail_user, "INBOX", raw)
    services.mailbox_sync(mailbox_id=imap_mailbox.pk)
    while services.emails_parse_pending(mailbox_id=imap_mailbox.pk):
        pass

    emails = {e.subject: e for e in Email.objects.filter(mailbox=imap_mailbox)}
    assert set(emails) == {"Photo 7", "no semicolon", "header only", "long id"}
    assert {e.parse_state for e in emails.values()} == {Email.ParseState.PARSED}
    assert emails["Photo 7"].has_attachments
    assert emails["no semicolon"].text.strip() == "Preis: 5 €"
    imap_mailbox.refresh_from_db()
    assert imap_mailbox.state != Mailbox.State.ERROR

    api = APIClient()
    api.force_authenticate(imap_mailbox.owner)
    for email in emails.values():
        response = api.get(f"/api/v1/emails/{email.pk}/")
        assert response.status_code == 200, response.content
    photo = api.get(f"/api/v1/emails/{emails['Photo 7'].pk}/").json()
    assert [(a["filename"], a["inline"]) for a in photo["attachments"]] == [("IMG_0001.jpg", False)]
    download = api.get(photo["attachments"][0]["download_url"])
    assert download.status_code == 200 and b"".join(download.streaming_content
                                                    if download.streaming else [download.content]) == JPEG
