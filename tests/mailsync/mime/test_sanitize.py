"""sanitize_html against the hostile inputs in FIELD-NOTES, tracking pixels, cid: and links."""
from __future__ import annotations

import re
import time

import pytest

from mailsync.mime import SanitizedHtml, html_to_text, sanitize_html
from mailsync.mime.sanitize import limit_nesting


def _clean(html: str, **kwargs: object) -> str:
    return sanitize_html(html, **kwargs).html  # type: ignore[arg-type]


def _assert_inert(out: str) -> None:
    lowered = out.lower()
    for needle in ("<script", "javascript:", "vbscript:", "onerror", "onload", "onclick",
                   "onmouseover", "<svg", "<iframe", "<object", "<embed", "<form", "<input",
                   "<base", "<meta", "<link", "<style", "@import", "<area", "data:text",
                   "data:image/svg", "srcdoc", "formaction"):
        assert needle not in lowered, (needle, out)


@pytest.mark.parametrize(
    "hostile",
    [
        # event handlers
        '<img src=x onerror="alert(1)"><p onclick="x()" onmouseover=y>hi</p>',
        "<body onload=alert(1)>text</body>",
        '<div onpointerenter="alert(1)" style="width:100%">x</div>',
        # javascript: in every spelling
        '<a href="javascript:alert(1)">a</a>',
        '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)">b</a>',
        '<a href="&#x6A;avascript&colon;alert(1)">c</a>',
        '<a href="java&#x09;script:alert(1)">d</a>',
        '<a href="java\nscript:alert(1)">e</a>',
        '<a href=" \x01javascript:alert(1)">f</a>',
        '<a href="JaVaScRiPt:alert(1)">g</a>',
        '<a href="vbscript:msgbox(1)">h</a>',
        '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">i</a>',
        # SVG
        '<svg><use href="data:image/svg+xml;base64,'
        'PHN2ZyBpZD0neCc+PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pjwvc3ZnPg==#x"/></svg>',
        '<svg><animate attributeName="href" values="javascript:alert(1)"/>'
        "<a><text>go</text></a></svg>",
        '<svg><set attributeName="onmouseover" to="alert(1)"/></svg>',
        '<svg onload=alert(1)>',
        '<img src="data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=">',
        # image maps, base, meta, forms, frames, objects
        '<map name="m"><area href="javascript:alert(1)" shape="rect" coords="0,0,9,9"></map>',
        '<base href="http://evil.example/"><a href="page.html">relative</a>',
        '<meta http-equiv="refresh" content="0;url=http://evil.example/">',
        '<form action="http://evil.example/"><input name="pw" type="password">'
        '<button formaction="javascript:x">Go</button></form>',
        '<iframe src="http://evil.example/" srcdoc="<script>alert(1)</script>"></iframe>',
        '<object data="x.swf"></object><embed src="x.swf">'
        '<link rel="stylesheet" href="http://evil.example/x.css">',
        # CSS
        "<style>@import url(http://evil.example/x.css);"
        " p { background: url(http://evil.example/p) }</style><p>x</p>",
        '<p style="background:url(http://evil.example/p.gif)">x</p>',
        '<p style="width: expression(alert(1))">x</p>',
        '<p style="background: u\\72l(http://evil.example/p)">x</p>',
        '<p style="-moz-binding:url(http://evil.example/x.xml#x)">x</p>',
        # scripts in odd places
        "<script>alert(1)</script>"
        '<noscript><p title="</noscript><img src=x onerror=alert(1)>"></noscript>',
        "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
        "<!--[if gte mso 9]><script>alert(1)</script><![endif]-->text",
        '<template><script>alert(1)</script></template><textarea><script>x</script></textarea>',
    ],
)
def test_hostile_inputs_are_inert(hostile: str) -> None:
    _assert_inert(_clean(hostile))


def test_utf7_markup_stays_text() -> None:
    # UTF-7 only bites if a browser guesses the charset; the output has no markup to guess from.
    out = _clean("+ADw-script+AD4-alert(1)+ADw-/script+AD4-")
    assert "<" not in out
    assert out == "+ADw-script+AD4-alert(1)+ADw-/script+AD4-"


def test_safe_formatting_survives() -> None:
    html = (
        '<table width="600" cellpadding="4" bgcolor="#ffffff"><tr><td align="center" '
        'style="color: #333; font-size: 14px; position: fixed">Hi <b>there</b></td></tr></table>'
        "<ul><li><i>one</i></li></ul><blockquote>quoted</blockquote><hr><br>"
    )
    out = _clean(html)
    assert '<table width="600" cellpadding="4" bgcolor="#ffffff">' in out
    assert "<b>there</b>" in out and "<blockquote>quoted</blockquote>" in out
    assert "color:#333" in out.replace(" ", "") and "font-size:14px" in out.replace(" ", "")
    assert "position" not in out  # overlays could fake our UI


def test_id_class_and_target_are_dropped() -> None:
    out = _clean(
        '<div id="csrf_token" class="modal">x</div><a href="https://a.example" target="_top">y</a>'
    )
    assert "id=" not in out and "class=" not in out and "target=" not in out


def test_links_get_noopener_and_only_safe_schemes() -> None:
    out = _clean(
        '<a href="https://ok.example/path?a=1&amp;b=2">ok</a>'
        '<a href="mailto:sales@example.com">m</a>'
        '<a href="ftp://x.example/">f</a><a href="/relative">r</a><a href="#frag">h</a>'
    )
    assert '<a href="https://ok.example/path?a=1&amp;b=2" rel="noopener noreferrer">ok</a>' in out
    assert '<a href="mailto:sales@example.com" rel="noopener noreferrer">m</a>' in out
    assert out.count("href=") == 2
    assert out.count('rel="noopener noreferrer"') == 5


def test_tracking_pixels_and_remote_images_are_blocked() -> None:
    html = (
        '<img src="https://t.example/open.gif?u=42" width="1" height="1" alt="">'
        '<img src="http://cdn.example/logo.png" alt="Logo">'
        '<img src="//t.example/p2.gif"><img src="/\\t.example/p3.gif">'
        '<table background="http://t.example/bg.png"><tr><td>x</td></tr></table>'
        '<p style="background-image:url(\'https://t.example/bg2\'); color: red">y</p>'
    )
    result = sanitize_html(html)
    assert isinstance(result, SanitizedHtml)
    assert result.blocked_remote_images == 6
    assert "t.example" not in result.html and "cdn.example" not in result.html
    assert 'alt="Logo"' in result.html  # the reader still sees what was there
    assert "color:red" in result.html.replace(" ", "")


def test_remote_images_allowed_on_consent() -> None:
    html = (
        '<img src="https://cdn.example/logo.png"><img src="//cdn.example/a.png">'
        '<td background="https://cdn.example/bg.png"></td>'
        '<p style="background-image: url(https://cdn.example/bg2.png)">y</p>'
        '<img src="javascript:alert(1)"><img src="/local">'
    )
    result = sanitize_html(html, allow_remote_images=True)
    assert result.blocked_remote_images == 0
    assert 'src="https://cdn.example/logo.png"' in result.html
    assert 'src="https://cdn.example/a.png"' in result.html
    assert "https://cdn.example/bg2.png" in result.html
    assert "javascript" not in result.html and "/local" not in result.html


def test_cid_images_are_rewritten_or_dropped() -> None:
    html = (
        '<img src="cid:logo@x.example" alt="logo"><img src="cid:LOGO%40X.example">'
        '<img src="cid:missing@x.example"><a href="cid:logo@x.example">link</a>'
    )
    out = _clean(html, cid_urls={"logo@x.example": "/mail/attachments/7/?inline=1&sig=a\"b"})
    assert out.count('src="/mail/attachments/7/?inline=1&amp;sig=a&quot;b"') == 2
    assert "missing" not in out and "cid:" not in out
    assert _clean('<img src="cid:logo@x.example">') == "<img>"


def test_small_inline_data_images_are_kept() -> None:
    png = '<img src="data:image/png;base64,iVBORw0KGgo=">'
    assert _clean(png) == png
    assert _clean('<img src="data:image/png,notbase64<>">') == "<img>"


def test_blocked_count_ignores_non_remote() -> None:
    result = sanitize_html('<img src="cid:x"><img src="data:image/gif;base64,R0lGOD=">')
    assert result.blocked_remote_images == 0


@pytest.mark.parametrize(
    "html",
    ["<div>" * 100_000 + "deep", "<blockquote>" * 50_000, "<b>x</i>" * 50_000,
     "<div>" * 400 + "<section></x></div>" * 50_000],
)
def test_deep_nesting_is_bounded(html: str) -> None:
    # html5ever is quadratic in nesting depth: 100,000 <div>s alone take ~17 s.
    started = time.perf_counter()
    out = sanitize_html(html).html
    text = html_to_text(html)
    assert time.perf_counter() - started < 5
    assert out.count("<div>") <= 512 and out.count("<blockquote>") <= 512
    assert "deep" in text or "x" in text or text == ""


def test_normal_nesting_is_untouched() -> None:
    html = "<div>" * 300 + "<p>x</p>" + "</div>" * 300 + "<img src=x>" * 600
    assert limit_nesting(html) == html


def test_odd_strings_do_not_raise() -> None:
    assert sanitize_html("a\ud800b\x00c").html == "a\ufffdbc"
    assert html_to_text("x\udfff") == "x\ufffd"
    assert sanitize_html("").html == ""


def test_html_to_text() -> None:
    text = html_to_text(
        "<html><head><title>T</title><style>p{color:red}</style></head><body>"
        "<h1>Title</h1><p>Line&nbsp;one<br>Line two</p><ul><li>a</li><li>b &amp; c</li></ul>"
        "<script>alert(1)</script></body></html>"
    )
    assert text == "Title\nLine one\nLine two\na\nb & c"
    assert not re.search(r"<|alert|color:red", text)
