"""Hostile HTML through sanitize_html and the body view (remote loads, script, CSP)."""
from __future__ import annotations

import pytest
from django.test import Client

from mailsync.mime import sanitize_html
from mailsync.models import Attachment, AttachmentBlob
from mailsync.storage import compress
from tests.factories import MailboxFactory, UserFactory
from tests.mailsync.test_pages import make_email

LEAKY = [
    '<p style="background:url(https://e.x/a)">x</p>',
    '<p style="background-image: url(&quot;https://e.x/b&quot;)">x</p>',
    '<p style="background:URL(https://e.x/c)">x</p>',
    '<p style="list-style-image:url(https://e.x/f)">x</p>',
    '<p style="border-image:url(https://e.x/g)">x</p>',
    '<p style="content:url(https://e.x/i)">x</p>',
    '<p style="background:-webkit-cross-fade(url(https://e.x/k), url(https://e.x/k2), 50%)">x</p>',
    '<p style="background:url(&#x68;ttps://e.x/m)">x</p>',
    '<p style="background:u&#114;l(https://e.x/al)">x</p>',
    '<p style="--x: url(https://e.x/ao)">x</p>',
    '<p style="background:url(/\\e.x/s)">x</p>',
    '<table background="https://e.x/t"><tr background=" //e.x/u"><td background="HTTPS://e.x/v">x</td></tr></table>',
    '<img srcset="https://e.x/w 1x">',
    '<img src="x" lowsrc="https://e.x/x" dynsrc="https://e.x/y">',
    '<a href="https://e.x/z" ping="https://e.x/ping">l</a>',
    '<svg><image href="https://e.x/svgimg"/></svg>',
    '<math><mi xlink:href="https://e.x/math">m</mi></math>',
    '<link rel=stylesheet href="https://e.x/link.css">',
    '<meta http-equiv=refresh content="0;url=https://e.x/meta">',
    '<base href="https://e.x/base/"><img src="p.gif">',
    '<video poster="https://e.x/poster"></video><audio src="https://e.x/au"></audio>',
    '<input type=image src="https://e.x/inp">',
    '<body background="https://e.x/body">x</body>',
    '<img src="//e.x/ar">', '<img src="\\\\e.x/as">', '<img src="https:/e.x/at">',
    '<img src="HTTPS:\\\\e.x/av">', '<img src="ht&#x09;tps://e.x/af">',
    '<img src="data:image/png;base64,AAAA,https://e.x/ad">',
    '<style>@font-face{src:url(https://e.x/font)}</style>',
    '<object data="https://e.x/obj"></object><embed src="https://e.x/emb">',
    '<iframe src="https://e.x/frame"></iframe><frameset><frame src="https://e.x/frm">',
    '<div style="behavior:url(https://e.x/htc)">x</div>',
]


@pytest.mark.parametrize("html", LEAKY)
def test_no_remote_resource_survives_without_consent(html):
    out = sanitize_html(html).html
    # a link (href) is not a load; anything else naming e.x is
    stripped = out.replace('href="https://e.x/z"', "")
    assert "e.x" not in stripped, out


@pytest.mark.parametrize("html", [
    '<p style="background: src(\'https://e.x/h\')">x</p>',      # CSS Values 4 src()
    '<p style="background:image(\'https://e.x/j\')">x</p>',     # CSS Images 4 image()
])
def test_css_url_functions_other_than_url(html):
    """Latent: only url( is recognised; other URL-taking CSS functions pass the filter (the
    body CSP img-src still blocks them in browsers)."""
    out = sanitize_html(html)
    assert "e.x" not in out.html, out


@pytest.fixture
def owner_client():
    user = UserFactory()
    c = Client()
    c.force_login(user)
    return user, c


@pytest.mark.django_db
def test_body_view_csp_and_hostile_body(owner_client):
    user, c = owner_client
    mailbox = MailboxFactory(owner=user)
    html = "".join(LEAKY) + '<script>alert(1)</script><a href="javascript:alert(1)">j</a>'
    email = make_email(mailbox, html=html)
    body = c.get(f"/mail/{email.pk}/body/")
    text = body.content.decode()
    assert "<script>alert" not in text and "javascript:" not in text
    assert "e.x/a" not in text and "e.x/t" not in text
    csp = body["Content-Security-Policy"]
    assert "img-src 'self' data:;" in csp and "default-src 'none'" in csp
    assert "sandbox" in csp and "allow-scripts" not in csp and "allow-forms" not in csp
    assert body["Referrer-Policy"] == "no-referrer"
    page = c.get(f"/mail/{email.pk}/")
    # the detail page does not embed the body itself, only the iframe
    assert "e.x/" not in page.content.decode().replace('href="https://e.x/z"', "")
    assert "frame-ancestors 'none'" in page["Content-Security-Policy"]


@pytest.mark.django_db
def test_cid_image_is_served_inline_only_as_raster_image(owner_client):
    user, c = owner_client
    mailbox = MailboxFactory(owner=user)
    email = make_email(mailbox, html='<img src="cid:logo@x"><img src="cid:svg@x"><img src="cid:html@x">')
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 20
    blob1 = AttachmentBlob.objects.create(sha256="b" * 64, data=compress(png), size=len(png))
    blob2 = AttachmentBlob.objects.create(sha256="c" * 64, data=compress(b"<svg onload=alert(1)>"), size=21)
    blob3 = AttachmentBlob.objects.create(sha256="d" * 64, data=compress(b"<script>x</script>"), size=18)
    a1 = Attachment.objects.create(email=email, blob=blob1, filename="logo.png", content_type="image/png",
                                   content_id="logo@x", inline=True, size=len(png))
    a2 = Attachment.objects.create(email=email, blob=blob2, filename="x.svg", content_type="image/svg+xml",
                                   content_id="svg@x", inline=True, size=21)
    a3 = Attachment.objects.create(email=email, blob=blob3, filename="x.html", content_type="text/html",
                                   content_id="html@x", inline=True, size=18)
    body = c.get(f"/mail/{email.pk}/body/").content.decode()
    assert f"/mail/{email.pk}/attachments/{a1.pk}/?inline=1" in body
    r1 = c.get(f"/mail/{email.pk}/attachments/{a1.pk}/?inline=1")
    assert r1["Content-Type"] == "image/png" and r1["Content-Disposition"].startswith("inline")
    for a in (a2, a3):
        r = c.get(f"/mail/{email.pk}/attachments/{a.pk}/?inline=1")
        assert r["Content-Type"] == "application/octet-stream", r["Content-Type"]
        assert r["Content-Disposition"].startswith("attachment"), r["Content-Disposition"]
        assert r["X-Content-Type-Options"] == "nosniff"


@pytest.mark.django_db
@pytest.mark.parametrize("name", ['a"b.pdf', "a\r\nSet-Cookie: x=1.pdf", "invoice\u202egpj.exe", "ünï.pdf", ""])
def test_attachment_filename_header(owner_client, name):
    user, c = owner_client
    mailbox = MailboxFactory(owner=user)
    email = make_email(mailbox)
    blob = AttachmentBlob.objects.create(sha256="e" * 64, data=compress(b"x"), size=1)
    a = Attachment.objects.create(email=email, blob=blob, filename=name, content_type="application/pdf", size=1)
    r = c.get(f"/mail/{email.pk}/attachments/{a.pk}/")
    cd = r["Content-Disposition"]
    assert cd.startswith("attachment") and "\n" not in cd and "\r" not in cd, cd
    assert "Set-Cookie" not in r.headers or "x=1" not in r.headers.get("Set-Cookie", "")
    assert r["Content-Type"] == "application/octet-stream"


@pytest.mark.django_db
def test_huge_subject_and_many_recipients_render(owner_client):
    import time

    user, c = owner_client
    mailbox = MailboxFactory(owner=user)
    to = [{"name": f"Person {i}", "email": f"p{i}@x.example"} for i in range(5000)]
    email = make_email(mailbox, subject="S" * 1000, to=to, html="<p>hi</p>")
    t = time.monotonic()
    r = c.get(f"/mail/{email.pk}/")
    elapsed = time.monotonic() - t
    assert r.status_code == 200
    assert elapsed < 5, elapsed
    inbox_t = time.monotonic()
    assert c.get("/mail/").status_code == 200
    assert time.monotonic() - inbox_t < 5
